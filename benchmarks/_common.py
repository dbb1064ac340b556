"""What the real-data benchmark scripts share: paths, small JSONL helpers, SST-2 rows and
writing one part's result into a JSON + Markdown pair that several runs may fill in parallel."""

from __future__ import annotations

import csv
import json
import platform
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), for the machine line of a results table."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.open(encoding="utf-8")]


def sst2_rows(name: str) -> list[dict]:
    """``../shared/data/sst2/{name}`` (train.tsv or dev.tsv) as ``{"text", "label"}`` rows."""
    with (SHARED / "sst2" / name).open() as f:
        return [{"text": r["sentence"].strip(), "label": int(r["label"])}
                for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def save_part(path: Path, part: str, result: dict, tables: Callable[[dict], str]) -> str:
    """Merge ``result`` under ``part`` into the JSON file (re-read now: other invocations may
    have written other parts meanwhile), rewrite the Markdown next to it, return the tables."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results[part] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    text = tables(results)
    path.with_suffix(".md").write_text(text)
    return text
