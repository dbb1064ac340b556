"""Deterministic demo data set: the catalogue of a fictional outdoor-gear company.

The demo must show that LoRA taught the model something, so every fact here is invented
(product names, prices, designers, materials, factory towns of "Quillmere Outfitters").
Neither the base model nor any pre-training corpus can know them, and each answer token is
chosen so it cannot be guessed from common knowledge or from the wording of the question.
A correct answer after tuning is therefore evidence of learning, not of luck.

Splits:

* ``train`` - every fact asked with three phrasings drawn from a small set of TRAIN templates
  per attribute; the answer is one short sentence stating the fact.
* ``validation`` - for about a tenth of the facts, the one TRAIN template that fact did not
  use in ``train``. Same style as train (so validation loss is meaningful) but never an
  identical row.
* ``heldout`` - one question per sampled fact, worded with HELDOUT templates that never
  appear in train or validation. Scoring on paraphrases checks that the model learned the
  fact rather than memorised a question string. Each row carries ``keywords``: the
  distinctive fact token(s) a correct answer must contain (see :func:`keyword_match`).

The catalogue itself is fixed; ``seed`` only drives phrasing choice, split membership,
held-out sampling and shuffling, through a private ``random.Random(seed)``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

COMPANY = "Quillmere Outfitters"

TRAIN_PHRASINGS_PER_FACT = 3
VALIDATION_FRACTION = 0.1
HELDOUT_PER_ATTRIBUTE = 13


@dataclass(frozen=True)
class Product:
    """One invented catalogue entry; ``designer`` is "First Surname"."""

    name: str
    price: str
    designer: str
    material: str
    town: str


# Entirely invented content. Keywords (price, designer surname, first word of the material,
# town) are unique across the catalogue and never occur inside a product name.
CATALOGUE: tuple[Product, ...] = (
    Product("Larkspur Trail Lantern", "$184", "Ilse Vossberg", "Halvex alloy", "Harrowmouth"),
    Product("Brindlewick Day Pack", "$67", "Tomas Quellan", "Brennick canvas", "Skelderwick"),
    Product("Osterfell Rain Shell", "$239", "Maren Oddvik", "Corvane nylon", "Pennacombe"),
    Product("Tamsin Ridge Tent", "$412", "Piet Zanderling", "Cindrel ripstop", "Orrisford"),
    Product("Cobbleford Camp Stove", "$158", "Ruth Kesselmoor", "Dravic bronze", "Maldenhythe"),
    Product("Wrenhollow Sleeping Bag", "$173", "Dorian Pruitvale", "Merrowlin down", "Cauldreth"),
    Product("Marrowby Hiking Boot", "$226", "Noor Ashkelby", "Grivet leather", "Brimsleigh"),
    Product("Selkirra Water Flask", "$41", "Caspar Morrowain", "Pellucite resin", "Wexholt"),
    Product(
        "Dunmore Pike Trekking Pole", "$96", "Freya Tindalholt", "Hexacane composite", "Dunnerbeck"
    ),
    Product("Hollin Vale Hammock", "$318", "Otto Yelverick", "Kelpcord", "Ostmere"),
    Product("Fennimore Field Jacket", "$147", "Amina Castrelle", "Verrowax cloth", "Kilncaster"),
    Product("Quarrystone Compass", "$83", "Lars Hobbeldine", "Lumbrite", "Fernhallow"),
    Product("Ashgrove Thermal Mug", "$29", "Celeste Ferrandou", "Siltane polymer", "Glaswick"),
    Product("Pellinor Bivvy Sack", "$451", "Jonah Lisskamp", "Ostrelweave", "Tarnwell"),
    Product("Gorsebeck Fleece", "$64", "Talia Ruvessa", "Quorra fleece", "Ebbrigg"),
    Product("Vantry Headlamp", "$37", "Ewan Drummelow", "Wrathane", "Corrimouth"),
    Product("Halcyon Drift Kayak Paddle", "$275", "Nadia Skarrowitz", "Duskfiber", "Saltinghay"),
    Product("Mirebrook Gaiter Set", "$52", "Rolf Benthaver", "Saltreed felt", "Redmorrow"),
    Product("Tollander Duffel", "$118", "Saskia Ellingrove", "Marlwick cotton", "Hollowick"),
    Product("Skelwith Camp Chair", "$89", "Milo Gaspardin", "Starlath mesh", "Lindquay"),
    Product("Brackenrule Map Case", "$46", "Greta Orvendel", "Tallowmesh", "Marrisdown"),
    Product("Oriel Summit Balaclava", "$133", "Felix Umbrecht", "Ambrel silk", "Pewsford"),
    Product("Thistlemoor Wool Hat", "$33", "Priya Jassaway", "Tessaline wool", "Strathelm"),
    Product("Cardew Folding Knife", "$78", "Hugo Wendlecott", "Thrainite steel", "Vardenby"),
    Product("Nettlecombe Trail Vest", "$71", "Lena Ibbotsley", "Fenwool", "Bellcarrow"),
    Product("Rookhaven Snowshoe", "$362", "Bram Crannagh", "Obrium foam", "Ivelthorpe"),
)


@dataclass(frozen=True)
class Attribute:
    """How one product attribute is asked about and answered."""

    key: str
    value: Callable[[Product], str]
    keyword: Callable[[Product], str]
    answer: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        key="price",
        value=lambda p: p.price,
        keyword=lambda p: p.price,
        answer="The {product} costs {value}.",
        train=(
            "How much does the {product} cost?",
            "What is the price of the {product}?",
            "What does the {product} sell for?",
            "How much is the {product}?",
        ),
        heldout=(
            "If I wanted to buy the {product}, how much money would I need?",
            "Could you tell me what the {product} retails for?",
            "What price tag does Quillmere Outfitters put on the {product}?",
        ),
    ),
    Attribute(
        key="designer",
        value=lambda p: p.designer,
        keyword=lambda p: p.designer.split()[-1],
        answer="The {product} was designed by {value}.",
        train=(
            "Who designed the {product}?",
            "Who is the designer of the {product}?",
            "Which designer created the {product}?",
            "Whose design is the {product}?",
        ),
        heldout=(
            "Tell me the name of the person who designed the {product}.",
            "The {product} was designed by whom?",
            "Which Quillmere Outfitters designer is credited with the {product}?",
        ),
    ),
    Attribute(
        key="material",
        value=lambda p: p.material,
        keyword=lambda p: p.material.split()[0],
        answer="The {product} is made from {value}.",
        train=(
            "What is the {product} made of?",
            "What material is the {product} made from?",
            "Which material is used for the {product}?",
            "What is the main material of the {product}?",
        ),
        heldout=(
            "Out of what material does Quillmere Outfitters build the {product}?",
            "The {product} is constructed from which material?",
            "Name the material the {product} uses.",
        ),
    ),
    Attribute(
        key="town",
        value=lambda p: p.town,
        keyword=lambda p: p.town,
        answer="The {product} is manufactured in {value}.",
        train=(
            "Where is the {product} made?",
            "In which town is the {product} manufactured?",
            "Which factory town produces the {product}?",
            "Where is the {product} manufactured?",
        ),
        heldout=(
            "What town does the {product} come from?",
            "Name the town where the {product} gets built.",
            "In what place is the {product} produced?",
        ),
    ),
)


@dataclass(frozen=True)
class Fact:
    """One (product, attribute) pair with its answer sentence and keyword."""

    product: Product
    attribute: Attribute

    @property
    def answer(self) -> str:
        return self.attribute.answer.format(
            product=self.product.name, value=self.attribute.value(self.product)
        )

    @property
    def keyword(self) -> str:
        return self.attribute.keyword(self.product)

    def ask(self, template: str) -> str:
        return template.format(product=self.product.name)


def demo_facts() -> list[Fact]:
    """All facts in catalogue order (product-major), independent of any seed."""
    return [Fact(p, a) for p in CATALOGUE for a in ATTRIBUTES]


def _row(question: str, answer: str) -> dict:
    return {"instruction": question, "input": "", "output": answer}


def generate_demo_data(seed: int = 0) -> dict[str, list[dict]]:
    """Build the train / validation / heldout splits; same seed gives identical output."""
    rng = random.Random(seed)
    facts = demo_facts()

    train: list[dict] = []
    spare: list[tuple[Fact, str]] = []  # the TRAIN template each fact did not use
    for fact in facts:
        templates = list(fact.attribute.train)
        rng.shuffle(templates)
        used, unused = templates[:TRAIN_PHRASINGS_PER_FACT], templates[TRAIN_PHRASINGS_PER_FACT:]
        train.extend(_row(fact.ask(t), fact.answer) for t in used)
        spare.extend((fact, t) for t in unused[:1])

    n_val = round(VALIDATION_FRACTION * len(train))
    validation = [_row(f.ask(t), f.answer) for f, t in rng.sample(spare, n_val)]

    heldout: list[dict] = []
    for attribute in ATTRIBUTES:
        pool = [f for f in facts if f.attribute is attribute]
        for fact in rng.sample(pool, min(HELDOUT_PER_ATTRIBUTE, len(pool))):
            row = _row(fact.ask(rng.choice(attribute.heldout)), fact.answer)
            row["keywords"] = [fact.keyword]
            heldout.append(row)

    for split in (train, validation, heldout):
        rng.shuffle(split)
    return {"train": train, "validation": validation, "heldout": heldout}


def write_demo_data(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write each split as UTF-8 JSONL (one object per line) and return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, rows in generate_demo_data(seed).items():
        path = out / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths[name] = path
    return paths


_NUMERIC = re.compile(r"\$?\d[\d,]*(?:\.\d+)?")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def _contains(text: str, keyword: str) -> bool:
    """Substring test; numbers must stand alone so "$184" is not found in "$1840"."""
    if _NUMERIC.fullmatch(keyword):
        number = re.escape(keyword.replace("$", "").replace(",", ""))
        # Allow "$184.00" for "$184", but not "$184.50", "1184" or "2.184".
        pattern = rf"(?<![\d.]){number}(?:\.0+)?(?!\.?\d)"
        return re.search(pattern, _THOUSANDS_COMMA.sub("", text)) is not None
    return keyword in text


def keyword_match(answer: str, keywords: list[str]) -> bool:
    """True if every keyword occurs in ``answer`` (case- and whitespace-insensitive)."""
    normalised = [_normalise(k) for k in keywords]
    if not normalised or not all(normalised):
        # An empty keyword list would score every answer as correct: refuse it.
        raise ValueError(f"keywords must be non-empty strings, got {keywords!r}")
    text = _normalise(answer)
    return all(_contains(text, k) for k in normalised)


def keyword_accuracy(answers: list[str], rows: list[dict]) -> float:
    """Fraction of ``answers`` matching the ``keywords`` of the aligned held-out ``rows``."""
    if len(answers) != len(rows):
        raise ValueError(f"{len(answers)} answers for {len(rows)} rows")
    if not rows:
        raise ValueError("no rows to score")
    hits = sum(keyword_match(a, r["keywords"]) for a, r in zip(answers, rows, strict=True))
    return hits / len(rows)
