"""Reading run folders for the UI: status, config, data report, metrics -- only from the files a
run writes (``status.json``, ``config.yaml``, ``data_report.json``, ``metrics.jsonl``,
``adapter/``), so runs started from the CLI, a sweep or the UI look the same.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from peftlab.files import CorruptFileError, read_json
from peftlab.lab.study import lower_is_better
from peftlab.training.run_dir import STATUS_FILE

# folders inside a run that never hold another run
_SKIP = {"adapter", "checkpoints", "tensorboard", "mlruns", "data", ".peftlab-ui"}
MAX_DEPTH = 3  # runs/<sweep>/<trial> and one more level


def find_runs(root: Path) -> list[Path]:
    """Every run folder under ``root`` (one holding config.yaml or status.json), sorted."""
    found: list[Path] = []

    def walk(directory: Path, depth: int) -> None:
        if (directory / "config.yaml").is_file() or (directory / STATUS_FILE).is_file():
            found.append(directory)
        if depth >= MAX_DEPTH:
            return
        try:
            children = sorted(p for p in directory.iterdir() if p.is_dir())
        except OSError:
            return
        for child in children:
            if child.name not in _SKIP and not child.name.startswith("."):
                walk(child, depth + 1)

    if root.is_dir():
        walk(root, 0)
    return found


def run_name(root: Path, run: Path) -> str:
    return run.relative_to(root).as_posix() if run != root else "."


def resolve_run(root: Path, name: str) -> Path:
    """The run folder called ``name`` under ``root`` (never outside it)."""
    path = (root / name).resolve()
    if root.resolve() not in (path, *path.parents) or not (
            (path / "config.yaml").is_file() or (path / STATUS_FILE).is_file()):
        raise KeyError(f"no run {name!r} under {root}")
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def status(run: Path) -> dict[str, Any]:
    """``{"state": running|finished|failed|stopped|unknown, "error": ...}`` of one run.

    A run that says "running" but whose process is gone was killed without a word (e.g.
    SIGKILL, out of memory): "stopped". Runs from before status.json: "finished" when the
    adapter and the report exist, "unknown" otherwise."""
    path = run / STATUS_FILE
    if path.is_file():
        try:
            st = read_json(path)
        except CorruptFileError as exc:
            return {"state": "unknown", "error": str(exc)}
        if st.get("state") == "running" and not pid_alive(int(st.get("pid", 0))):
            return {**st, "state": "stopped", "error": "the training process ended without "
                    "a final status (killed?)"}
        return st
    if (run / "adapter" / "adapter_config.json").is_file() and (run / "report.md").is_file():
        return {"state": "finished"}
    return {"state": "unknown"}


def read_metrics(run: Path, since: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Records of ``metrics.jsonl`` from line ``since`` on, and the line to ask from next time.
    A half-written last line (the run is appending) is left for the next call."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return [], since
    records, line_no = [], since
    with path.open() as f:
        for i, line in enumerate(f):
            if i < since:
                continue
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a damaged line is skipped, as on resume
            line_no = i + 1
    return records, line_no


def read_config(run: Path) -> dict[str, Any]:
    path = run / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def best(records: list[dict[str, Any]], metric: str) -> tuple[float | None, int | None]:
    """The best value of ``metric`` in the records (lower for *loss/*ppl) and its step."""
    points = [(r[metric], r.get("step")) for r in records
              if isinstance(r.get(metric), (int, float))]
    if not points:
        return None, None
    pick = min if lower_is_better(metric) else max
    return pick(points, key=lambda p: p[0])


def summary(root: Path, run: Path, details: bool = False) -> dict[str, Any]:
    """What the runs list and the compare table show about one run."""
    config = read_config(run)
    records, _ = read_metrics(run)
    train = config.get("train") or {}
    metric = train.get("best_metric", "val_loss")
    value, step = best(records, metric)
    last_loss = next((r["loss"] for r in reversed(records) if "loss" in r), None)
    method = config.get("method") or {}
    info = {
        "name": run_name(root, run),
        "status": status(run),
        "model": config.get("model"),
        "task": config.get("task"),
        "method": method.get("name") if isinstance(method, dict) else method,
        "steps": max((r.get("step", 0) for r in records), default=0),
        "max_steps": train.get("max_steps"),
        "final_loss": last_loss,
        "best_metric": metric,
        "best_value": value,
        "best_step": step,
        "lower_is_better": lower_is_better(metric),
        "has_adapter": (run / "adapter" / "adapter_config.json").is_file(),
        "modified": max((p.stat().st_mtime for p in run.iterdir() if p.is_file()), default=0.0),
    }
    if details:
        info["config"] = config
        report = run / "data_report.json"
        try:
            info["data_report"] = read_json(report) if report.is_file() else None
        except CorruptFileError as exc:
            info["data_report"] = {"error": str(exc)}
        info["final_metrics"] = _final_metrics(records)
    return info


def _final_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The last logged value of every metric (train and validation)."""
    final: dict[str, Any] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("epoch",) and isinstance(value, (int, float)):
                final[key] = value
    return final


def rank(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs ranked by their best metric (each run's own train.best_metric), missing ones last."""
    def key(info: dict[str, Any]) -> tuple[int, float]:
        value = info["best_value"]
        if value is None:
            return (1, 0.0)
        return (0, value if info["lower_is_better"] else -value)
    return sorted(runs, key=key)
