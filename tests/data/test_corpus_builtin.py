"""k2_data.corpus.builtin_documents: the entry point the packer calls, sizes, speed, splits."""

from __future__ import annotations

import time

import pytest
from k2_core.errors import ConfigError
from k2_data.corpus import DOMAINS, builtin_documents
from k2_data.documents import Document


def chars(docs) -> int:
    return sum(len(d.text) for d in docs)


def test_scale_1_sizes_and_speed():
    t0 = time.perf_counter()
    sizes = {d: chars(builtin_documents(d)) for d in DOMAINS}
    val = {d: chars(builtin_documents(d, split="val")) for d in DOMAINS}
    elapsed = time.perf_counter() - t0
    assert 3_000_000 <= sizes["code"] <= 6_000_000
    assert 1_000_000 <= sizes["math"] <= 2_500_000
    assert 700_000 <= sizes["knowledge"] <= 2_000_000
    assert 4_000_000 <= sum(sizes.values()) <= 10_000_000
    assert all(v > 0 for v in val.values())
    assert elapsed < 10, f"scale-1 corpus took {elapsed:.1f}s"


@pytest.mark.parametrize("domain", DOMAINS)
def test_documents_shape_and_determinism(domain):
    a = list(builtin_documents(domain, scale=0.05))
    b = list(builtin_documents(domain, scale=0.05))
    assert a and a == b
    assert all(isinstance(d, Document) and d.domain == domain and d.text for d in a)
    assert len({d.id for d in a}) == len(a)
    other = list(builtin_documents(domain, scale=0.05, seed=1))
    assert [d.text for d in other] != [d.text for d in a]


@pytest.mark.parametrize("domain", DOMAINS)
def test_splits_disjoint(domain):
    texts = {
        s: {d.text for d in builtin_documents(domain, split=s, scale=0.3)}
        for s in ("train", "val", "test")
    }
    ids = {
        s: {d.id for d in builtin_documents(domain, split=s, scale=0.3)}
        for s in ("train", "val", "test")
    }
    for x, y in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not texts[x] & texts[y]
        assert not ids[x] & ids[y]


@pytest.mark.parametrize("domain", DOMAINS)
def test_scale_grows_the_corpus(domain):
    assert chars(builtin_documents(domain, scale=0.05)) < chars(
        builtin_documents(domain, scale=0.2)
    )


def test_bad_arguments_refused():
    with pytest.raises(ConfigError, match="domain"):
        builtin_documents("web")
    with pytest.raises(ConfigError, match="split"):
        builtin_documents("math", split="dev")
    with pytest.raises(ConfigError, match="scale"):
        builtin_documents("code", scale=0)
