"""A deterministic synthetic world of invented countries, and the text made from it.

Why a synthetic world: the memory-injection paper (Sakarvadia et al., arXiv 2309.05605)
studies prompts whose answer needs two hops ("The capital of the country led by X is"),
where a model that knows both single-hop facts still fails. To reproduce that on a model
small enough to train on a laptop CPU, we need facts the model cannot know from
pretraining, and a clean split between two-hop compositions it has seen in training and
ones it has not. Invented, syllable-built names give the first; choosing the two-hop
*bridge* entities (countries) that get two-hop training sentences gives the second.

Everything here is pure Python and derived from ``random.Random(seed)`` only, so the same
seed yields byte-identical worlds, corpora and CSV files on every machine.

Vocabulary used throughout:

- a *relation* maps a subject entity to an object entity (``capital``: country → city);
- a *template* is a prompt with a ``{s}`` slot for the subject; the object (the answer)
  follows the prompt after one space and the sentence ends with ``.``;
- a *descriptor* names a country indirectly through an inverse relation
  ("the country led by Aldo Venn"); substituting it into a template gives a two-hop prompt.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import asdict, dataclass, field
from typing import Any

#: Columns of the paper's ``handwritten_obscure_explicit_data.csv``, in its order.
CSV_COLUMNS: tuple[str, ...] = (
    "explicit_sentence",
    "obscure_sentence",
    "explicit_entity",
    "obscure_entity",
    "answer",
)

DEFAULT_SEED = 0
DEFAULT_N_COUNTRIES = 36
DEFAULT_N_CONTINENTS = 6
#: Fraction of countries whose two-hop prompts are held out of training.
DEFAULT_HELDOUT_FRACTION = 0.4

# --------------------------------------------------------------------------- names

# Syllable inventory. Kept small and regular so names are pronounceable and short;
# short names that occur many times in the corpus become single BPE tokens.
_ONSETS = (
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
    "br", "dr", "gr", "kr", "pr", "st", "tr", "th", "sh", "ch", "vr",
)  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "th", "k")

# Suffixes give each entity type a recognisable "shape", the way real country names
# often end in -ia or -land; it makes the type of a slot easy for a tiny model.
_COUNTRY_SUFFIX = ("ia", "or", "and", "ova", "esh", "ara", "ania", "ur")
_CITY_SUFFIX = ("ten", "mir", "holm", "vik", "dor", "bel", "gar", "ax")
_LANGUAGE_SUFFIX = ("ic", "ish", "ese", "ian", "i")
_CURRENCY_SUFFIX = ("", "el", "o", "ek")
_CONTINENT_SUFFIX = ("ea", "ica", "asia", "opa")

# Words that occur in templates; an invented name must never collide with one.
_RESERVED = {
    "the", "of", "is", "in", "by", "led", "city", "capital", "country", "leader", "head",
    "state", "language", "spoken", "speak", "people", "official", "currency", "pay",
    "with", "uses", "located", "lies", "on", "continent", "whose", "where", "that",
    "leads", "and", "a", "an", "it", "its", "to", "you", "used", "seat", "sits",
}  # fmt: skip


class _NameMaker:
    """Draws distinct invented words from one seeded RNG.

    A single maker is shared by all entity types so no two entities, of any type, get the
    same surface word (which would make prompts ambiguous).
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set(_RESERVED)

    def _syllable(self, coda: bool) -> str:
        s = self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS)
        return s + (self.rng.choice(_CODAS) if coda else "")

    def word(self, n_syllables: int, suffixes: tuple[str, ...], *, capital: bool = True) -> str:
        """Return a fresh word of ``n_syllables`` syllables plus one suffix."""
        for _ in range(10_000):
            root = "".join(self._syllable(coda=i == n_syllables - 1) for i in range(n_syllables))
            suffix = self.rng.choice(suffixes)
            # Avoid awkward vowel clusters at the join ("ai" + "ia").
            if suffix and root[-1] in "aeiou" and suffix[0] in "aeiou":
                root = root[:-1]
            w = root + suffix
            if not 3 <= len(w) <= 9 or w in self.used:
                continue
            self.used.add(w)
            return w.capitalize() if capital else w
        raise RuntimeError("name space exhausted; use fewer entities")  # pragma: no cover


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Relation:
    """A functional relation from a subject type to an object type.

    ``templates`` are prompts with a ``{s}`` slot; the answer follows after a space.
    ``two_hop_templates`` indexes the templates that still read naturally when ``{s}`` is
    a descriptor ("the country led by ...") and are therefore used for two-hop text.
    """

    name: str
    subject_type: str
    object_type: str
    templates: tuple[str, ...]
    two_hop_templates: tuple[int, ...] = ()
    #: For an inverse relation (object is a country): how to describe that country through
    #: the subject, e.g. "the country led by {x}". Empty for forward relations.
    descriptor: str = ""
    #: The forward relation this one inverts (``leads`` inverts ``leader``).
    inverse_of: str = ""


# Forward relations: country → attribute. These are the second hop of two-hop prompts.
# Inverse relations: attribute → country. Their descriptors are the first hop.
RELATIONS: tuple[Relation, ...] = (
    Relation(
        "capital",
        "country",
        "city",
        (
            "The capital of {s} is",
            "The capital city of {s} is",
            "{s}'s capital is",
            "The government of {s} sits in",
        ),
        two_hop_templates=(0, 1),
    ),
    Relation(
        "leader",
        "country",
        "person",
        (
            "The leader of {s} is",
            "{s} is led by",
            "The head of state of {s} is",
        ),
        two_hop_templates=(0, 1),
    ),
    Relation(
        "language",
        "country",
        "language",
        (
            "The language spoken in {s} is",
            "People in {s} speak",
            "The official language of {s} is",
        ),
        two_hop_templates=(0, 1),
    ),
    Relation(
        "currency",
        "country",
        "currency",
        (
            "The currency of {s} is the",
            "In {s}, people pay with the",
            "{s}'s currency is the",
        ),
        two_hop_templates=(0, 1),
    ),
    Relation(
        "continent",
        "country",
        "continent",
        (
            "{s} is located in",
            "{s} lies on the continent of",
            "The continent of {s} is",
        ),
        two_hop_templates=(0, 1),
    ),
    Relation(
        "capital_of",
        "city",
        "country",
        (
            "{s} is the capital of",
            "{s} is the capital city of",
            "The city of {s} is in",
        ),
        descriptor="the country whose capital is {x}",
        inverse_of="capital",
    ),
    Relation(
        "leads",
        "person",
        "country",
        (
            "{s} is the leader of",
            "{s} leads",
            "{s} is the head of state of",
        ),
        descriptor="the country led by {x}",
        inverse_of="leader",
    ),
    Relation(
        "spoken_in",
        "language",
        "country",
        (
            "{s} is spoken in",
            "{s} is the official language of",
            "The {s} language is spoken in",
        ),
        descriptor="the country where {x} is spoken",
        inverse_of="language",
    ),
    Relation(
        "currency_of",
        "currency",
        "country",
        (
            "The {s} is the currency of",
            "The {s} is used in",
            "People pay with the {s} in",
        ),
        descriptor="the country that uses the {x}",
        inverse_of="currency",
    ),
)
RELATIONS_BY_NAME: dict[str, Relation] = {r.name: r for r in RELATIONS}
FORWARD_RELATIONS: tuple[str, ...] = tuple(r.name for r in RELATIONS if not r.descriptor)
DESCRIPTOR_RELATIONS: tuple[str, ...] = tuple(r.name for r in RELATIONS if r.descriptor)


def fill(template: str, subject: str) -> str:
    """Put ``subject`` into ``template``; capitalise it when it opens the sentence.

    Descriptors are lower-case ("the country led by ..."); at the start of a sentence they
    must read "The country led by ...". Entity names are already capitalised.
    """
    if template.startswith("{s}"):
        subject = subject[:1].upper() + subject[1:]
    return template.replace("{s}", subject)


@dataclass(frozen=True)
class Example:
    """One prompt and its answer; ``sentence`` is the full training text."""

    prompt: str
    answer: str
    relation: str
    subject: str
    template: int
    #: For two-hop examples: the bridge country and the descriptor relation (first hop).
    bridge: str = ""
    hop1: str = ""

    @property
    def sentence(self) -> str:
        return f"{self.prompt} {self.answer}."


@dataclass
class World:
    """The generated world: entities, facts and the two-hop split.

    ``facts[relation][subject] = object`` for every relation in :data:`RELATIONS`.
    """

    seed: int
    countries: list[str]
    cities: list[str]
    persons: list[str]
    languages: list[str]
    currencies: list[str]
    continents: list[str]
    facts: dict[str, dict[str, str]]
    train_bridges: list[str]
    heldout_bridges: list[str]
    entity_types: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ entities
    @property
    def entities(self) -> list[str]:
        """All entity names, grouped by type, in generation order."""
        return [
            *self.countries,
            *self.cities,
            *self.persons,
            *self.languages,
            *self.currencies,
            *self.continents,
        ]

    # ------------------------------------------------------------------ examples
    def single_hop(self) -> list[Example]:
        """Every fact under every template of its relation (all are training text)."""
        out: list[Example] = []
        for rel in RELATIONS:
            for subj, obj in self.facts[rel.name].items():
                for ti, tpl in enumerate(rel.templates):
                    out.append(Example(fill(tpl, subj), obj, rel.name, subj, ti))
        return out

    def descriptor(self, hop1: str, country: str) -> str:
        """The indirect name of ``country`` through inverse relation ``hop1``."""
        rel = RELATIONS_BY_NAME[hop1]
        x = self.facts[rel.inverse_of][country]
        return rel.descriptor.replace("{x}", x)

    def two_hop(self, countries: list[str], *, all_templates: bool) -> list[Example]:
        """Two-hop prompts about ``countries``.

        For each country, each descriptor relation (first hop) and each forward relation
        (second hop) other than the one the descriptor already reveals, use the two-hop
        templates (all of them, or only the canonical first one).
        """
        out: list[Example] = []
        for country in countries:
            for hop1 in DESCRIPTOR_RELATIONS:
                desc = self.descriptor(hop1, country)
                for hop2 in FORWARD_RELATIONS:
                    rel = RELATIONS_BY_NAME[hop2]
                    if RELATIONS_BY_NAME[hop1].inverse_of == hop2:
                        continue  # "the capital of the country whose capital is X": trivial
                    idxs = rel.two_hop_templates if all_templates else rel.two_hop_templates[:1]
                    for ti in idxs:
                        out.append(
                            Example(
                                fill(rel.templates[ti], desc),
                                self.facts[hop2][country],
                                hop2,
                                desc,
                                ti,
                                bridge=country,
                                hop1=hop1,
                            )
                        )
        return out

    def train_two_hop(self) -> list[Example]:
        """Two-hop sentences that are part of the training corpus (trained bridges)."""
        return self.two_hop(self.train_bridges, all_templates=True)

    def heldout_two_hop(self) -> list[Example]:
        """Two-hop prompts never seen in training (held-out bridges, canonical template)."""
        return self.two_hop(self.heldout_bridges, all_templates=False)

    def context_mentions(self) -> list[str]:
        """Optional extra text: a country named first, then asked about generically.

        "Sholand. The capital of the country is Zaraholm." teaches the model to take the
        subject from an entity seen earlier rather than from the slot. Why: a model trained
        this way responds much more to an injected bridge entity (see docs/toyworld.md,
        "Injection experiment"). It names no descriptor, so no held-out text leaks.
        """
        out = []
        for c in self.countries:
            for name in FORWARD_RELATIONS:
                rel = RELATIONS_BY_NAME[name]
                for ti in rel.two_hop_templates:
                    prompt = fill(rel.templates[ti], "the country")
                    out.append(f"{c}. {prompt} {self.facts[name][c]}.")
        return out

    def training_sentences(self, context_mentions: bool = False) -> list[str]:
        """The training corpus: all single-hop facts plus trained two-hop sentences.

        With ``context_mentions`` the sentences of :meth:`context_mentions` follow.
        """
        out = [e.sentence for e in self.single_hop()]
        out += [e.sentence for e in self.train_two_hop()]
        if context_mentions:
            out += self.context_mentions()
        return out

    # ------------------------------------------------------------------ dataset
    def dataset_rows(self) -> list[dict[str, str]]:
        """Rows of the held-out two-hop dataset in the paper's columns.

        ``explicit_sentence`` is the same template with the bridge country named outright
        (a trained single-hop prompt); ``explicit_entity`` is the bridge country, i.e. the
        text a memory injection should add; ``obscure_entity`` is the descriptor exactly as
        it appears in ``obscure_sentence``.
        """
        rows = []
        for ex in self.heldout_two_hop():
            tpl = RELATIONS_BY_NAME[ex.relation].templates[ex.template]
            obscure_entity = ex.subject
            if tpl.startswith("{s}"):
                obscure_entity = obscure_entity[:1].upper() + obscure_entity[1:]
            rows.append(
                {
                    "explicit_sentence": fill(tpl, ex.bridge),
                    "obscure_sentence": ex.prompt,
                    "explicit_entity": ex.bridge,
                    "obscure_entity": obscure_entity,
                    "answer": ex.answer,
                }
            )
        return rows

    def dataset_csv(self) -> str:
        """The held-out two-hop dataset as CSV text (``\\n`` line endings)."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
        w.writeheader()
        w.writerows(self.dataset_rows())
        return buf.getvalue()

    # ------------------------------------------------------------------ json
    def to_json_dict(self) -> dict[str, Any]:
        """A self-describing JSON document of the world (what ``world.json`` holds)."""
        return {
            "format": "meminject-toyworld/1",
            "seed": self.seed,
            "entities": {
                "country": self.countries,
                "city": self.cities,
                "person": self.persons,
                "language": self.languages,
                "currency": self.currencies,
                "continent": self.continents,
            },
            "relations": [asdict(r) for r in RELATIONS],
            "facts": self.facts,
            "bridges": {"train": self.train_bridges, "heldout": self.heldout_bridges},
            "counts": {
                "entities": len(self.entities),
                "single_hop": len(self.single_hop()),
                "train_two_hop": len(self.train_two_hop()),
                "heldout_two_hop": len(self.heldout_two_hop()),
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict(), indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> World:
        """Rebuild a world from :meth:`to_json_dict` output (no regeneration needed)."""
        ents = d["entities"]
        world = cls(
            seed=d["seed"],
            countries=list(ents["country"]),
            cities=list(ents["city"]),
            persons=list(ents["person"]),
            languages=list(ents["language"]),
            currencies=list(ents["currency"]),
            continents=list(ents["continent"]),
            facts={k: dict(v) for k, v in d["facts"].items()},
            train_bridges=list(d["bridges"]["train"]),
            heldout_bridges=list(d["bridges"]["heldout"]),
        )
        world.entity_types = {e: t for t, names in ents.items() for e in names}
        return world


def build_world(
    seed: int = DEFAULT_SEED,
    n_countries: int = DEFAULT_N_COUNTRIES,
    n_continents: int = DEFAULT_N_CONTINENTS,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> World:
    """Generate the world for ``seed``; the same arguments always give the same world."""
    if n_countries < 2 or n_continents < 1:
        raise ValueError("need at least 2 countries and 1 continent")
    rng = random.Random(seed)
    names = _NameMaker(rng)
    countries = [names.word(rng.choice((1, 2)), _COUNTRY_SUFFIX) for _ in range(n_countries)]
    cities = [names.word(rng.choice((1, 2)), _CITY_SUFFIX) for _ in range(n_countries)]
    persons = [
        f"{names.word(2, ('',))} {names.word(1, ('', 'a', 'o'))}" for _ in range(n_countries)
    ]
    languages = [names.word(1, _LANGUAGE_SUFFIX) for _ in range(n_countries)]
    currencies = [names.word(1, _CURRENCY_SUFFIX, capital=False) for _ in range(n_countries)]
    continents = [names.word(2, _CONTINENT_SUFFIX) for _ in range(n_continents)]

    facts: dict[str, dict[str, str]] = {r.name: {} for r in RELATIONS}
    for i, c in enumerate(countries):
        facts["capital"][c] = cities[i]
        facts["leader"][c] = persons[i]
        facts["language"][c] = languages[i]
        facts["currency"][c] = currencies[i]
        # Every continent gets at least one country, the rest at random.
        facts["continent"][c] = continents[i] if i < n_continents else rng.choice(continents)
    for rel in RELATIONS:
        if rel.inverse_of:
            facts[rel.name] = {o: s for s, o in facts[rel.inverse_of].items()}

    order = countries[:]
    rng.shuffle(order)
    n_heldout = max(1, round(heldout_fraction * n_countries))
    heldout = sorted(order[:n_heldout], key=countries.index)
    train = sorted(order[n_heldout:], key=countries.index)

    world = World(
        seed=seed,
        countries=countries,
        cities=cities,
        persons=persons,
        languages=languages,
        currencies=currencies,
        continents=continents,
        facts=facts,
        train_bridges=train,
        heldout_bridges=heldout,
    )
    world.entity_types = {
        **dict.fromkeys(countries, "country"),
        **dict.fromkeys(cities, "city"),
        **dict.fromkeys(persons, "person"),
        **dict.fromkeys(languages, "language"),
        **dict.fromkeys(currencies, "currency"),
        **dict.fromkeys(continents, "continent"),
    }
    return world
