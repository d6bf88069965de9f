"""The `knowledge` domain: a generated world of people, places and organisations.

`World.generate(seed, n_people)` draws countries, cities, organisations and people with
attributes and relations (birth year, home city, profession, employer, membership, founding
year, headquarters, leader, capital, ...). Each entity becomes one short document, in one of
several styles (`encyclopedic`, `narrative`, `infobox`) and template variants, so the same
facts can be rendered many ways for rephrasing experiments. `world.questions(split)` asks
about those facts in phrasings that never occur in any document: `train` and `heldout`
cover disjoint halves of the entities with disjoint phrasings (QA fine-tuning on one, knowledge
extraction measured on the other); `all` asks about every entity in the held-out phrasings.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from k2_core.errors import ConfigError

from ..documents import Document
from ._util import rng, stable_hash
from .names import UniqueNames, person_name, word

STYLES: tuple[str, ...] = ("encyclopedic", "narrative", "infobox")
QUESTION_SPLITS: tuple[str, ...] = ("train", "heldout", "all")
PEOPLE_AT_SCALE_1 = 4000

PROFESSIONS = (
    "architect",
    "baker",
    "botanist",
    "carpenter",
    "chemist",
    "composer",
    "dentist",
    "economist",
    "engineer",
    "farmer",
    "geologist",
    "historian",
    "journalist",
    "lawyer",
    "librarian",
    "mathematician",
    "nurse",
    "painter",
    "pharmacist",
    "photographer",
    "physician",
    "pilot",
    "poet",
    "sculptor",
    "surveyor",
    "teacher",
    "translator",
    "veterinarian",
    "violinist",
    "watchmaker",
    "astronomer",
    "cartographer",
)
INDUSTRIES = (
    "shipbuilding",
    "software",
    "textile",
    "mining",
    "publishing",
    "pharmaceutical",
    "aviation",
    "agricultural",
    "banking",
    "railway",
    "glassmaking",
    "insurance",
)
FIELDS = (
    "Physics",
    "Marine Biology",
    "Linguistics",
    "Applied Chemistry",
    "Economics",
    "Astronomy",
    "Agriculture",
    "Medicine",
)
# org kind -> (leader's title, employs people?, has members?)
ORG_KINDS: dict[str, tuple[str, bool, bool]] = {
    "company": ("chief executive", True, False),
    "university": ("president", True, False),
    "research institute": ("director", True, False),
    "orchestra": ("principal conductor", True, False),
    "learned society": ("chair", False, True),
    "sports club": ("club president", False, True),
}

# --- templates ------------------------------------------------------------------------------
# {S}/{s}: subject at/after a sentence start; {P}/{p}: possessive; {v}: value; {a_v}: value with
# article; {role}: the leader's title. The first sentence of a document always names the subject.

_DOC_TEMPLATES: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "encyclopedic": {
        "person": {
            "profession": ("{S} is {a_v}.", "{S} works as {a_v}.", "By profession, {s} is {a_v}."),
            "birth_year": (
                "{S} was born in {v}.",
                "{S} was born in the year {v}.",
                "{P} birth took place in {v}.",
            ),
            "home_city": (
                "{S} lives in {v}.",
                "{P} home is in the city of {v}.",
                "{S} makes {p} home in {v}.",
            ),
            "employer": ("{S} is employed by {v}.", "{S} works for {v}.", "{P} employer is {v}."),
            "member_of": (
                "{S} is a member of {v}.",
                "{S} belongs to {v}.",
                "{S} holds a membership in {v}.",
            ),
        },
        "city": {
            "country": (
                "{S} is a city in {v}.",
                "{S} is a city located in {v}.",
                "{S} is one of the cities of {v}.",
            ),
            "founded_year": (
                "{S} was founded in {v}.",
                "{S} dates from {v}, when it was founded.",
                "The founding of {s} took place in {v}.",
            ),
            "population": (
                "{S} has a population of {v}.",
                "{S} is home to {v} people.",
                "The population of {s} is {v}.",
            ),
            "river": (
                "The {v} flows through {s}.",
                "{S} lies on the {v}.",
                "{S} is built along the {v}.",
            ),
        },
        "country": {
            "capital": (
                "{S} is a country whose capital is {v}.",
                "{S} is a country governed from its capital, {v}.",
                "{S} is a country, and {v} is its capital city.",
            ),
            "language": (
                "The official language of {s} is {v}.",
                "{v} is the official language of {s}.",
                "People in {s} speak {v}.",
            ),
        },
        "org": {
            "kind": (
                "{S} is {a_v}.",
                "{S} is {a_v} with a long history.",
                "{S} is a well-known {v}.",
            ),
            "founded_year": (
                "{S} was founded in {v}.",
                "{S} was established in {v}.",
                "{S} has existed since {v}.",
            ),
            "headquarters": (
                "{S} is headquartered in {v}.",
                "The headquarters of {s} are in {v}.",
                "{S} has its main offices in {v}.",
            ),
            "leader": (
                "The {role} of {s} is {v}.",
                "{S} is led by its {role}, {v}.",
                "{v} serves as the {role} of {s}.",
            ),
            "industry": ("{S} works in the {v} industry.", "{S} is active in the {v} sector."),
        },
    },
    "narrative": {
        "person": {
            "profession": ("{S} has spent many years as {a_v}.", "{S} earns a living as {a_v}."),
            "birth_year": (
                "The story of {s} begins in {v}, the year {p} life started.",
                "{S} came into the world in {v}.",
            ),
            "home_city": (
                "{S} settled in {v} and still lives there.",
                "Today {s} lives in the city of {v}.",
            ),
            "employer": (
                "Every weekday, {s} goes to work at {v}.",
                "{S} took a position at {v} and works there still.",
            ),
            "member_of": (
                "In {p} spare time, {s} attends the meetings of {v} as a member.",
                "{S} joined {v} as a member.",
            ),
        },
        "city": {
            "country": (
                "Travellers who reach {s} find themselves in {v}.",
                "{S} grew into a city of {v}.",
            ),
            "founded_year": (
                "Settlers founded {s} in {v}.",
                "The first houses of {s} were built in {v}, the year it was founded.",
            ),
            "population": ("Some {v} people now live in {s}.", "{S} has grown to {v} residents."),
            "river": (
                "Boats still travel along the {v}, which passes through {s}.",
                "The {v} winds its way through {s}.",
            ),
        },
        "country": {
            "capital": (
                "Every road in {s} leads to its capital, {v}.",
                "{S} is ruled from its capital, {v}.",
            ),
            "language": (
                "In {s}, everyday life is conducted in {v}, the official language.",
                "Children in {s} grow up speaking {v}, the official language.",
            ),
        },
        "org": {
            "kind": ("{S} started out, and remains, {a_v}.", "{S} has always been {a_v}."),
            "founded_year": ("The founders of {s} set it up in {v}.", "{S} opened in {v}."),
            "headquarters": (
                "From its headquarters in {v}, {s} runs its affairs.",
                "{S} keeps its headquarters in {v}.",
            ),
            "leader": (
                "These days {v} is in charge of {s} as its {role}.",
                "{S} answers to its {role}, {v}.",
            ),
            "industry": (
                "{S} made its name in the {v} industry.",
                "{S} does business in the {v} industry.",
            ),
        },
    },
}

_INFOBOX_LABELS = {
    "profession": "Profession",
    "birth_year": "Born",
    "home_city": "Home city",
    "employer": "Employer",
    "member_of": "Member of",
    "country": "Country",
    "founded_year": "Founded",
    "population": "Population",
    "river": "River",
    "capital": "Capital",
    "language": "Official language",
    "kind": "Type",
    "headquarters": "Headquarters",
    "leader": "Leader",
    "industry": "Industry",
}

# Question phrasings: none of them, nor their wording before the name, occurs in any document.
_QUESTIONS: dict[str, dict[str, dict[str, str]]] = {
    "heldout": {
        "person": {
            "birth_year": "In what year was {n} born?",
            "home_city": "Which city does {n} call home?",
            "profession": "What is the occupation of {n}?",
            "employer": "For which organisation does {n} work?",
            "member_of": "Of which organisation is {n} a member?",
        },
        "city": {
            "country": "In which country is {n} situated?",
            "founded_year": "In what year did {n} come into existence?",
            "population": "What is the number of inhabitants of {n}?",
            "river": "Which river runs through {n}?",
        },
        "country": {
            "capital": "Which city is the seat of government of {n}?",
            "language": "Which language is official in {n}?",
        },
        "org": {
            "kind": "What type of organisation is {n}?",
            "founded_year": "In what year was {n} set up?",
            "headquarters": "In which city is {n} based?",
            "leader": "Who heads {n}?",
            "industry": "In which industry is {n} active?",
        },
    },
    "train": {
        "person": {
            "birth_year": "When was {n} born?",
            "home_city": "Where does {n} live?",
            "profession": "What job does {n} have?",
            "employer": "Who is the employer of {n}?",
            "member_of": "What group does {n} belong to?",
        },
        "city": {
            "country": "Which country is {n} in?",
            "founded_year": "When was {n} founded?",
            "population": "How many people live in {n}?",
            "river": "What river is {n} on?",
        },
        "country": {
            "capital": "What is the capital of {n}?",
            "language": "What language is official in {n}?",
        },
        "org": {
            "kind": "What kind of organisation is {n}?",
            "founded_year": "When was {n} established?",
            "headquarters": "Where is {n} headquartered?",
            "leader": "Who leads {n}?",
            "industry": "What industry is {n} in?",
        },
    },
}


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, value) triple; fact_id = '<entity id>.<relation>'."""

    fact_id: str
    subject: str
    relation: str
    value: str


@dataclass(frozen=True)
class QA:
    """A question about one fact, its answer (stated verbatim in the subject's document)."""

    question: str
    answer: str
    fact_id: str


@dataclass
class Entity:
    id: str
    kind: str  # person, city, country, org
    name: str
    facts: dict[str, str] = field(default_factory=dict)  # relation -> value, insertion-ordered
    pronoun: str = "it"  # he / she for people
    role: str = ""  # an org's leader title


def _article(v: str) -> str:
    return ("an " if v[0].lower() in "aeiou" else "a ") + v


class World:
    """A generated world: entities with facts, rendered as documents and asked about in
    questions."""

    def __init__(self, seed: int, entities: list[Entity]) -> None:
        self.seed = seed
        self.entities = entities
        self.by_id = {e.id: e for e in entities}

    # --- generation ---------------------------------------------------------------------------
    @classmethod
    def generate(
        cls,
        seed: int = 0,
        n_people: int = 1000,
        *,
        n_cities: int | None = None,
        n_countries: int | None = None,
        n_orgs: int | None = None,
    ) -> World:
        """Draw a world with `n_people` people (places and organisations scale with it)."""
        if n_people < 1:
            raise ConfigError(f"n_people must be >= 1 (got {n_people})")
        n_countries = n_countries or max(3, n_people // 150)
        n_cities = max(n_cities or max(8, n_people // 15), n_countries)
        n_orgs = n_orgs or max(6, n_people // 8)
        r = rng("k2-world", seed)
        names = UniqueNames()
        ents: list[Entity] = []

        countries = []
        for i in range(n_countries):
            stem = names.draw(r, lambda r: word(r, r.choice((2, 2, 3))))
            names.used.add(stem.lower())
            name = stem + r.choice(("ia", "land", "ar", "ovia", "istan", "ora"))
            names.used.add(name.lower())
            lang = stem + r.choice(("ish", "ese", "ic", "i", "an"))
            countries.append(Entity(f"country/{i:04d}", "country", name, {"language": lang}))

        cities = []
        for i in range(n_cities):
            name = names.draw(r, lambda r: word(r, r.choice((2, 3))))
            country = countries[i] if i < n_countries else r.choice(countries)
            river = names.draw(r, lambda r: word(r, 2)) + " River"
            population = r.randint(2, 2500) * 1000 + r.randint(0, 999)
            cities.append(
                Entity(
                    f"city/{i:05d}",
                    "city",
                    name,
                    {
                        "country": country.name,
                        "founded_year": str(r.randint(700, 1950)),
                        "population": str(population),
                        "river": river,
                    },
                )
            )
            if i < n_countries:
                country.facts = {"capital": name, **country.facts}

        orgs = []
        kinds = list(ORG_KINDS)
        for i in range(n_orgs):
            kind = kinds[i % len(kinds)] if i < len(kinds) else r.choice(kinds)
            city = r.choice(cities)

            def make(r: random.Random, kind: str = kind, city: Entity = city) -> str:
                w = word(r, r.choice((2, 3)))
                if kind == "company":
                    suffix = r.choice(
                        (
                            "Industries",
                            "Dynamics",
                            "Holdings",
                            "Works",
                            "Systems",
                            "Trading Company",
                        )
                    )
                    return f"{w} {suffix}"
                if kind == "university":
                    return r.choice((f"University of {city.name}", f"{w} University"))
                if kind == "research institute":
                    return f"{w} Institute of {r.choice(FIELDS)}"
                if kind == "orchestra":
                    return r.choice((f"{city.name} Philharmonic", f"{w} Chamber Orchestra"))
                if kind == "learned society":
                    return f"{w} Society of {r.choice(FIELDS)}"
                club = r.choice(("Athletic Club", "Rowing Club", "Chess Club", "Football Club"))
                return f"{w} {club}"

            name = names.draw(r, make)
            facts = {
                "kind": kind,
                "founded_year": str(r.randint(1700, 2015)),
                "headquarters": city.name,
            }
            if kind == "company":
                facts["industry"] = r.choice(INDUSTRIES)
            orgs.append(Entity(f"org/{i:05d}", "org", name, facts, role=ORG_KINDS[kind][0]))
        employers = [o for o in orgs if ORG_KINDS[o.facts["kind"]][1]]
        clubs = [o for o in orgs if ORG_KINDS[o.facts["kind"]][2]]

        people = []
        staff: dict[str, list[Entity]] = {o.id: [] for o in orgs}
        for i in range(n_people):
            name = names.draw(r, person_name)
            employer, club = r.choice(employers), r.choice(clubs)
            p = Entity(
                f"person/{i:06d}",
                "person",
                name,
                {
                    "profession": r.choice(PROFESSIONS),
                    "birth_year": str(r.randint(1900, 2005)),
                    "home_city": r.choice(cities).name,
                    "employer": employer.name,
                    "member_of": club.name,
                },
                pronoun=r.choice(("he", "she")),
            )
            staff[employer.id].append(p)
            staff[club.id].append(p)
            people.append(p)
        for o in orgs:
            if staff[o.id]:
                o.facts["leader"] = r.choice(staff[o.id]).name
        ents = countries + cities + orgs + people
        return cls(seed, ents)

    # --- facts ----------------------------------------------------------------------------------
    def facts(self) -> list[Fact]:
        """Every fact of the world, entity by entity."""
        return [
            Fact(f"{e.id}.{rel}", e.id, rel, v) for e in self.entities for rel, v in e.facts.items()
        ]

    # --- documents ------------------------------------------------------------------------------
    def _render(self, e: Entity, style: str, variant: int) -> str:
        r = rng("k2-world-doc", self.seed, e.id, style, variant)
        if style == "infobox":
            kind = "person" if e.kind == "person" else e.kind
            lines = [f"Name: {e.name}", f"Category: {kind}"]
            rels = list(e.facts)
            if variant:
                r.shuffle(rels)
            for rel in rels:
                label = _INFOBOX_LABELS[rel]
                if rel == "leader":
                    label = e.role[0].upper() + e.role[1:]
                lines.append(f"{label}: {e.facts[rel]}")
            return "\n".join(lines)
        templates = _DOC_TEMPLATES[style][e.kind]
        rels = list(e.facts)
        first, rest = rels[0], rels[1:]
        r.shuffle(rest)
        person = e.kind == "person"
        poss = {"he": "his", "she": "her"}.get(e.pronoun, "its")
        sentences = []
        for k, rel in enumerate([first, *rest]):
            named = k == 0 or not person or r.random() < 0.3
            v = e.facts[rel]
            tpl = r.choice(templates[rel])
            subj = e.name if named else e.pronoun
            pos = f"{e.name}'s" if named else poss
            # {s} sits mid-sentence, often as an object: always the name, never "he"/"she".
            text = tpl.format(
                S=subj[0].upper() + subj[1:],
                s=e.name,
                P=pos[0].upper() + pos[1:],
                p=poss,
                v=v,
                a_v=_article(v),
                role=e.role,
            )
            sentences.append(text[0].upper() + text[1:])
        return " ".join(sentences)

    def documents(self, style: str = "encyclopedic", variant: int = 0) -> list[Document]:
        """One document per entity; `style` and `variant` pick another rendering of the same
        facts."""
        if style not in STYLES:
            raise ConfigError(f"style must be one of {', '.join(STYLES)} (got {style!r})")
        return [
            Document(
                id=f"world{self.seed}/{style}{variant}/{e.id}",
                text=self._render(e, style, variant),
                domain="knowledge",
            )
            for e in self.entities
        ]

    def document_of(self, entity_id: str, style: str = "encyclopedic", variant: int = 0) -> str:
        """The text of one entity's document."""
        return self._render(self.by_id[entity_id], style, variant)

    # --- questions ------------------------------------------------------------------------------
    def question_split(self, entity_id: str) -> str:
        """'train' or 'heldout': which half of the entities an entity's questions belong to."""
        return "train" if stable_hash("k2-world-q", self.seed, entity_id) % 2 == 0 else "heldout"

    def questions(self, split: str = "heldout") -> list[QA]:
        """Questions whose answers are facts stated in the documents, in phrasings absent from
        them."""
        if split not in QUESTION_SPLITS:
            raise ConfigError(f"split must be one of {', '.join(QUESTION_SPLITS)} (got {split!r})")
        phrasing = "train" if split == "train" else "heldout"
        out = []
        for e in self.entities:
            if split != "all" and self.question_split(e.id) != split:
                continue
            for rel, v in e.facts.items():
                q = _QUESTIONS[phrasing][e.kind][rel].format(n=e.name)
                out.append(QA(q, v, f"{e.id}.{rel}"))
        return out


def question_templates(split: str) -> dict[str, dict[str, str]]:
    """The question phrasings of `train` or `heldout` ({n} is the entity's name)."""
    return _QUESTIONS["train" if split == "train" else "heldout"]


def builtin_world(seed: int = 0, scale: float = 1.0) -> World:
    """The world behind `builtin_documents("knowledge", seed=seed, scale=scale)` (train split)."""
    return World.generate(seed, n_people=max(20, round(PEOPLE_AT_SCALE_1 * scale)))


def knowledge_documents(*, split: str = "train", seed: int = 0, scale: float = 1.0):
    """train: the built-in world's encyclopedic documents. val/test: documents of small, separate
    worlds drawn from the same distribution (held-out text, no shared facts)."""
    if split == "train":
        yield from builtin_world(seed, scale).documents()
        return
    n = max(20, round(PEOPLE_AT_SCALE_1 * scale * 0.02))
    yield from World.generate(
        stable_hash("k2-world-split", seed, split) % 2**31, n_people=n
    ).documents()
