"""`k2 rephrase`: chunking, fidelity, styles, modes, provenance, and the command line."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from k2_core.errors import ConfigError
from k2_data.pipeline import read_outputs
from k2_data.rephrase import RephraseConfig, Style, get_style, register_style, run_rephrase
from k2_data.rephrase.chunking import count_tokens, split_chunks
from k2_data.rephrase.fidelity import lexical_similarity, parse_verdict
from k2_data.rephrase.stage import RephraseStage, looks_english, rewrite_messages
from synth_fake_llm import FakeEndpoint, reorder

LONG = "\n\n".join(
    " ".join(f"Paragraph {p} sentence {s} tells fact number {p * 10 + s}." for s in range(6))
    for p in range(5)
)


@pytest.fixture(scope="module")
def endpoint():
    ep = FakeEndpoint()
    yield ep
    ep.stop()


def cfg(tmp_path, ep, **kw):
    base = {
        "generator": {"options": {"base_url": ep.base_url, "model": "fake-llm"}},
        "pipeline": {
            "out": str(tmp_path / "out"),
            "shard_size": 4,
            "tracking": False,
            "progress": False,
        },
    }
    return RephraseConfig.model_validate({**base, **kw})


def test_chunks_respect_budget_and_boundaries():
    chunks = split_chunks(LONG, 40)
    assert len(chunks) > 3 and all(count_tokens(c) <= 40 for c in chunks)
    assert all(c.endswith(".") for c in chunks)  # cut between sentences only
    assert " ".join(" ".join(chunks).split()) == " ".join(LONG.split())
    assert split_chunks(LONG, 10_000) == [LONG]  # fits: one chunk, paragraphs intact
    long_sentence = " ".join(["word"] * 50) + "."
    assert all(count_tokens(c) <= 12 for c in split_chunks(long_sentence, 12))


def test_lexical_fidelity_separates_rewrites_from_unrelated_text():
    src = "Sikou is the capital of Droustesar. Its official language is Droustesi."
    assert lexical_similarity(src, reorder(src)) == pytest.approx(1.0)
    paraphrase = "Droustesar's capital city is Sikou, and Droustesi is its official language."
    assert lexical_similarity(src, paraphrase) > 0.6
    assert lexical_similarity(src, "Bananas are yellow fruit grown in warm places.") < 0.1
    assert parse_verdict('ok ```json\n{"faithful": false, "score": 0.2}\n```')["faithful"] is False


def test_chunkwise_autoregressive_rewrite_and_provenance(tmp_path, endpoint):
    docs = tmp_path / "long.jsonl"
    docs.write_text(json.dumps({"id": "long-1", "text": LONG}) + "\n")
    c = cfg(
        tmp_path,
        endpoint,
        source={"uri": str(docs), "domain": "lore"},
        chunk_tokens=60,
        context_tokens=30,
        n_rephrasings=3,
    )
    s = run_rephrase(c)
    assert s.complete and s.records == 3
    recs = read_outputs(c.pipeline.out)
    assert len({r["style"] for r in recs}) == 3
    r = recs[0]
    chunks = split_chunks(LONG, 60)
    assert r["chunks"]["n"] == len(chunks) > 1 and r["chunks"]["budget"] == 60
    assert r["text"] == "\n\n".join(reorder(ch) for ch in chunks)  # joined in order
    assert r["source_id"] == "long-1" and r["domain"] == "lore_rephrased"
    assert r["generator"]["model"] == "fake-llm" and r["fidelity"]["lexical"] > 0.95
    # chunk i is conditioned on the rewrite so far
    msgs = rewrite_messages(get_style("textbook"), chunks[1], reorder(chunks[0]), 1, len(chunks))
    assert "<rewrite_so_far>" in msgs[1]["content"] and "part 2 of" in msgs[1]["content"]


def test_unfaithful_dropped_and_judge_verdict_recorded(tmp_path, endpoint):
    docs = tmp_path / "d.jsonl"
    docs.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"x{i}",
                    "text": f"Tower {i} stands on hill {i}. "
                    + ("UNFAITHFUL. " if i == 1 else "")
                    + "It is tall.",
                }
            )
            + "\n"
            for i in range(4)
        )
    )
    c = cfg(
        tmp_path, endpoint, source={"uri": str(docs)}, n_rephrasings=2, fidelity={"judge": True}
    )
    s = run_rephrase(c)
    assert s.complete and s.rejected == {"unfaithful": 2} and s.records == 6
    assert all(r["fidelity"]["judge"]["faithful"] for r in read_outputs(c.pipeline.out))


def test_builtin_knowledge_styles_distinct_and_stable(tmp_path, endpoint):
    c = cfg(tmp_path, endpoint, max_docs=6, n_rephrasings=4)
    items = list(RephraseStage(c).items())
    by_doc: dict[str, list[str]] = {}
    for it in items:
        by_doc.setdefault(it["source_id"], []).append(it["style"])
    assert len(by_doc) == 6 and all(len(set(v)) == 4 for v in by_doc.values())
    assert items == list(RephraseStage(c).items())  # deterministic
    assert len({tuple(v) for v in by_doc.values()}) > 1  # styles rotate across documents


def test_math_notes_and_translate_modes(tmp_path, endpoint):
    m = cfg(
        tmp_path,
        endpoint,
        mode="math_notes",
        n_rephrasings=1,
        max_docs=3,
        source={"kind": "builtin", "domain": "math"},
    )
    assert [it["style"] for it in RephraseStage(m).items()] == ["learning_notes"] * 3
    s = run_rephrase(m)
    assert s.complete and s.records == 3
    assert "step" in rewrite_messages(get_style("learning_notes"), "x", "", 0, 1)[1]["content"]
    docs = tmp_path / "fr.jsonl"
    docs.write_text(
        json.dumps(
            {
                "id": "fr",
                "text": "La tour est grande. Elle est située sur "
                "la colline et date du siècle dernier.",
            }
        )
        + "\n"
        + json.dumps({"id": "en", "text": "The tower is tall and it stands on the hill."})
        + "\n"
    )
    assert not looks_english("La tour est grande et elle est située sur la colline.")
    t = cfg(tmp_path / "t", endpoint, mode="translate", n_rephrasings=1, source={"uri": str(docs)})
    s = run_rephrase(t)
    assert s.complete and s.rejected == {"already_english": 1} and s.records == 1


def test_custom_and_registered_styles(tmp_path, endpoint):
    register_style(
        Style(name="pirate_test", system="Rewrite.", instruction="As a pirate."), replace=True
    )
    with pytest.raises(ConfigError, match="exists"):
        register_style(Style(name="textbook", system="s", instruction="i"))
    c = cfg(
        tmp_path,
        endpoint,
        max_docs=2,
        n_rephrasings=2,
        styles=["pirate_test", "mine"],
        custom_styles=[{"name": "mine", "system": "Rewrite.", "instruction": "Briefly."}],
    )
    s = run_rephrase(c)
    assert s.complete and Counter(r["style"] for r in read_outputs(c.pipeline.out)) == {
        "pirate_test": 2,
        "mine": 2,
    }
    with pytest.raises(ConfigError, match="unknown style 'nope'"):
        RephraseStage(cfg(tmp_path, endpoint, styles=["nope"], n_rephrasings=1))


def test_output_is_a_k2_data_source(tmp_path, endpoint):
    from k2_data.config import SourceConfig
    from k2_data.sources import read_source

    c = cfg(tmp_path, endpoint, max_docs=5, n_rephrasings=2)
    run_rephrase(c)
    skipped: Counter = Counter()
    src = SourceConfig(uri=f"{c.pipeline.out}/data/*.jsonl", domain="knowledge_rephrased")
    docs = list(read_source(src, 0, skipped))
    assert len(docs) == 10 and not skipped and all("::" in d.id for d in docs)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from k2_core.cli import main

    assert main(["rephrase", f"pipeline.out={tmp_path}", "n_rephrasings=20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("k2: config error: ") and len(err.splitlines()) == 1
    assert "n_rephrasings (20) exceeds" in err
    assert main(["rephrase"]) == 2
    assert "pipeline: is required" in capsys.readouterr().err
    assert main(["rephrase", "--out", str(tmp_path), "source.uri=/nonexistent/*.jsonl"]) == 2
    assert "source /nonexistent/*.jsonl: no file matches" in capsys.readouterr().err


@pytest.mark.slow  # loads sentence-transformers and the offline MiniLM model
def test_embedding_fidelity_with_offline_minilm(tmp_path, endpoint):
    from k2_data.rephrase.fidelity import EmbeddingScorer

    sc = EmbeddingScorer()
    src = "The capital of Droustesar is Sikou."
    assert sc.similarity(src, "Sikou is the capital city of Droustesar.") > 0.8
    assert sc.similarity(src, "Bananas are yellow fruit.") < 0.3
    c = cfg(tmp_path, endpoint, max_docs=3, n_rephrasings=1, fidelity={"method": "embedding"})
    s = run_rephrase(c)
    assert s.complete and all(
        r["fidelity"]["embedding"] > 0.9 for r in read_outputs(c.pipeline.out)
    )


def test_synthesizer_slot_runs_rephrase(tmp_path, endpoint):
    from k2_core.plugins import get_registry

    syn = get_registry().build("synthesizer", "rephrase")
    data = {
        "max_docs": 2,
        "n_rephrasings": 1,
        "generator": {"options": {"base_url": endpoint.base_url, "model": "fake-llm"}},
        "pipeline": {"out": str(tmp_path / "o"), "tracking": False, "progress": False},
    }
    s = syn.run_dict(data)
    assert s.complete and s.records == 2
    with pytest.raises(ConfigError, match="n_rephrasings"):
        syn.run_dict({**data, "n_rephrasings": 0})
