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


class LogWindow:
    """The steps since the last logged record, so a record speaks for all of them.

    Logging the last step's loss would plot single batches (a zig-zag when ``log_every``
    is 20); the HF Trainer logs the mean over the window, and so do we. Throughput counts
    training time only: evaluation and checkpoint saving between steps are not in it.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.steps, self.tokens, self.seconds = 0.0, 0, 0, 0.0

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0
