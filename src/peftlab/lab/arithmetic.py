"""Arithmetic word problems with exact answers, generated in code: a verifiable task for GRPO.

    python -m peftlab.lab.arithmetic runs/arithmetic        # train.jsonl + validation.jsonl

Each row is ``{"prompt": "...", "answer": 17}``: one addition, subtraction or multiplication
of small numbers told as a short story (names, objects, verbs drawn from fixed lists by a
private ``random.Random(seed)``). :func:`exact_answer` is the reward: 1.0 when the last
number in the answer equals ``answer``, else 0.0. GRPO's loop passes the rows' ``answer``
column to it (``grpo.reward_function: peftlab.lab.arithmetic:exact_answer``).
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path
from typing import Any

NAMES = ["Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Omar", "Zoe", "Ivan", "Nora", "Leo", "Ada"]
THINGS = ["apples", "books", "coins", "pencils", "stickers", "marbles", "cards", "shells",
          "stamps", "buttons", "cookies", "balloons"]
INSTRUCTION = "Give the final answer as a number."
_NUMBER = re.compile(r"-?\d+")


def make_problem(rng: random.Random) -> dict[str, Any]:
    """One problem as a row: ``prompt`` (with the instruction) and the exact ``answer``."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        text = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
        answer = a + b
    elif kind == "sub":
        a, b = sorted(rng.sample(range(2, 41), 2), reverse=True)
        text = (f"{name} has {a} {thing} and gives away {b}. "
                f"How many {thing} does {name} have left?")
        answer = a - b
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        text = (f"{name} buys {a} bags with {b} {thing} in each bag. "
                f"How many {thing} does {name} buy in total?")
        answer = a * b
    return {"prompt": f"{text} {INSTRUCTION}", "answer": answer, "kind": kind}


def generate_problems(n: int, seed: int = 0, exclude: set[str] | None = None,
                      ) -> list[dict[str, Any]]:
    """``n`` distinct problems (none whose prompt is in ``exclude``), deterministic in ``seed``."""
    rng = random.Random(f"peftlab-arithmetic:{seed}")
    seen = set(exclude or ())
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        row = make_problem(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def last_number(text: str) -> int | None:
    """The last integer in ``text`` (thousands separators ignored), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    return int(found[-1]) if found else None


def exact_answer(prompts: list[str], completions: list[str], answer: list[Any],
                 **columns: Any) -> list[float]:
    """Reward 1.0 where the completion's last number is the row's ``answer``, else 0.0."""
    return [float(last_number(c) == int(a)) for c, a in zip(completions, answer, strict=True)]


def write_arithmetic_data(directory: str | Path, n_train: int = 2000, n_validation: int = 200,
                          seed: int = 0) -> dict[str, Path]:
    """train.jsonl and validation.jsonl (no prompt in both) under ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    validation = generate_problems(n_validation, seed=seed + 1)
    train = generate_problems(n_train, seed=seed, exclude={r["prompt"] for r in validation})
    paths = {}
    for name, rows in (("train", train), ("validation", validation)):
        paths[name] = directory / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


if __name__ == "__main__":
    out = write_arithmetic_data(sys.argv[1] if len(sys.argv) > 1 else "runs/arithmetic")
    print(" ".join(str(p) for p in out.values()))
