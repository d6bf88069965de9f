"""The `knowledge` domain: a generated world, its documents and held-out questions."""

from __future__ import annotations

import re

import pytest
from k2_core.errors import ConfigError
from k2_data.corpus import STYLES, World, builtin_world
from k2_data.corpus.knowledge import question_templates


@pytest.fixture(scope="module")
def world():
    return World.generate(seed=3, n_people=400)


def test_deterministic(world):
    again = World.generate(seed=3, n_people=400)
    assert [d.text for d in again.documents()] == [d.text for d in world.documents()]
    assert again.questions() == world.questions()
    other = World.generate(seed=4, n_people=400)
    assert [d.text for d in other.documents()] != [d.text for d in world.documents()]


def test_entities_and_relations(world):
    kinds = {e.kind for e in world.entities}
    assert kinds == {"person", "city", "country", "org"}
    names = [e.name for e in world.entities]
    assert len(set(names)) == len(names)
    people = [e for e in world.entities if e.kind == "person"]
    assert len(people) == 400
    city_names = {e.name for e in world.entities if e.kind == "city"}
    org_names = {e.name for e in world.entities if e.kind == "org"}
    for p in people:
        assert set(p.facts) == {"profession", "birth_year", "home_city", "employer", "member_of"}
        assert p.facts["home_city"] in city_names and p.facts["employer"] in org_names
    person_names = {p.name for p in people}
    leaders = [e.facts["leader"] for e in world.entities if e.kind == "org" and "leader" in e.facts]
    assert leaders and set(leaders) <= person_names
    facts = world.facts()
    assert len({f.fact_id for f in facts}) == len(facts)


@pytest.mark.parametrize("style", STYLES)
def test_every_fact_is_stated_in_every_style(world, style):
    docs = {
        d.id.rsplit("/", 2)[-2] + "/" + d.id.rsplit("/", 1)[-1]: d.text
        for d in world.documents(style)
    }
    for e in world.entities:
        text = docs[e.id]
        assert (
            text.startswith(e.name)
            or text.startswith(f"Name: {e.name}")
            or e.name in text.split(".")[0]
        )
        for v in e.facts.values():
            assert v in text, (style, e.id, v)


def test_styles_and_variants_differ(world):
    a = [d.text for d in world.documents("encyclopedic", 0)]
    assert a != [d.text for d in world.documents("encyclopedic", 1)]
    assert a != [d.text for d in world.documents("narrative")]
    with pytest.raises(ConfigError):
        world.documents("poem")


def test_no_pronoun_in_object_position(world):
    for style in ("encyclopedic", "narrative"):
        for d in world.documents(style):
            assert not re.search(r"\b(of|to|at|by) (he|she)\b", d.text), d.text


@pytest.mark.parametrize("split", ["heldout", "train", "all"])
def test_questions_answered_by_docs_and_never_phrased_there(world, split):
    all_docs = [d.text for style in STYLES for v in (0, 1) for d in world.documents(style, v)]
    corpus = "\n".join(all_docs)
    qas = world.questions(split)
    assert qas
    for qa in qas:
        entity = world.by_id[qa.fact_id.rsplit(".", 1)[0]]
        for style in STYLES:
            assert qa.answer in world.document_of(entity.id, style)
        assert qa.question not in corpus
        assert entity.name in qa.question
    for kind in question_templates(split).values():
        for tpl in kind.values():
            stem = tpl.split("{n}")[0]
            if len(stem) >= 8:
                assert stem not in corpus, stem


def test_question_splits_partition_entities(world):
    train, held, every = (
        world.questions("train"),
        world.questions("heldout"),
        world.questions("all"),
    )
    t_ent = {q.fact_id.rsplit(".", 1)[0] for q in train}
    h_ent = {q.fact_id.rsplit(".", 1)[0] for q in held}
    assert t_ent and h_ent and not t_ent & h_ent
    assert len(every) == len(world.facts()) == len(train) + len(held)
    train_tpls = {t for k in question_templates("train").values() for t in k.values()}
    held_tpls = {t for k in question_templates("heldout").values() for t in k.values()}
    assert not train_tpls & held_tpls
    with pytest.raises(ConfigError):
        world.questions("test")


def test_builtin_world_matches_builtin_documents():
    from k2_data.corpus import builtin_documents

    w = builtin_world(seed=2, scale=0.05)
    assert [d.text for d in w.documents()] == [
        d.text for d in builtin_documents("knowledge", seed=2, scale=0.05)
    ]
