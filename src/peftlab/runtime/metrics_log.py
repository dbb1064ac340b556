"""``metrics.jsonl``: one JSON record per logged step, appended as training goes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftlab.files import write_text_atomic


class MetricsLog:
    """Appends records to ``path`` (only where ``writes``: rank 0 under torch.distributed)
    and keeps them in ``history`` for the run's report and plots."""

    def __init__(self, path: Path, writes: bool = True) -> None:
        self.path, self.writes = Path(path), writes

    def start(self) -> None:
        """A fresh run: forget an earlier run's lines."""
        if self.writes and self.path.exists():
            self.path.unlink()

    def append(self, record: dict[str, Any], history: list[dict[str, Any]]) -> None:
        history.append(record)
        if self.writes:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def trim(self, step: int, keep: list[dict[str, Any]] | None = None) -> None:
        """On resume: keep the lines up to ``step`` (a half-written last line is dropped),
        or replace the file with ``keep`` when the checkpoint carries the history."""
        if not self.writes:
            return
        if keep is not None:
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
            return
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a run killed mid-write
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        write_text_atomic(self.path, "".join(ln + "\n" for ln in kept))
