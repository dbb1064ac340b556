"""A run's output directory: checked before anything is written, replaced only on request.

A run validates its config, data, model and save path first and touches ``output_dir``
only after that, so a bad input leaves an earlier run's files exactly as they were. A new
run never silently replaces an earlier one in the same directory: it must be continued
(``--resume``) or replaced (``--overwrite``) explicitly.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from peftlab.config import ConfigError
from peftlab.files import write_text_atomic
from peftlab.runtime import checkpoint as ckpt
from peftlab.runtime.tracking import MLFLOW_ARTIFACTS, MLFLOW_DB, TENSORBOARD_DIR

# Present after any run has started writing; their presence means "an earlier run lives here".
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "adapter", "checkpoints")
# Everything a run (and `peftlab eval` on it) writes into its directory; --overwrite removes
# these and nothing else (a user's own files, e.g. the demo's data/, stay).
RUN_OUTPUTS = (*RUN_MARKERS, "data_report.json", "report.md", "loss.png", "reward.png",
               "value_head.safetensors", "reference_logps.safetensors", "eval.json",
               "status.json", TENSORBOARD_DIR, MLFLOW_DB, MLFLOW_ARTIFACTS)
# status.json: what a run is doing, for `peftlab ui` and scripts -- "running" (with the pid),
# "finished", "failed" (with the error's first line) or "stopped" (interrupted).
STATUS_FILE = "status.json"
RUN_OUTPUT_PATTERNS = ("eval_*.json", "eval_*.jsonl", "predictions.jsonl",
                       "generation_metrics.json")


def earlier_run(out: Path) -> list[str]:
    """The markers of an earlier run found in ``out`` (empty: nothing to protect)."""
    return [name for name in RUN_MARKERS if (out / name).exists()]


def check_output_dir(out: Path, resume: bool | str = False, overwrite: bool = False) -> None:
    """Raise before any work if the run could not write ``out`` or would destroy a run there."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pick one")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} exists and is not a directory")
    ancestor = next(p for p in (out, *out.parents) if p.exists())
    if not ancestor.is_dir():
        raise ConfigError(f"output_dir: {out} cannot be created: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {out} is not writable (no write permission on "
                          f"{ancestor})")
    if resume:
        if resume is True:
            if ckpt.latest_checkpoint(out / "checkpoints") is None:
                raise FileNotFoundError(f"--resume: no complete checkpoint under "
                                        f"{out / 'checkpoints'}")
        else:
            ckpt.check_checkpoint(Path(resume))
        return
    found = earlier_run(out)
    if found and not overwrite:
        raise ConfigError(
            f"output_dir: {out} holds an earlier run ({', '.join(found)}); continue it with "
            "--resume, replace it with --overwrite, or choose another output_dir")


def clear_earlier_run(out: Path) -> None:
    """Remove what an earlier run wrote into ``out`` (only after every check has passed)."""
    paths = [out / name for name in RUN_OUTPUTS]
    paths += [p for pattern in RUN_OUTPUT_PATTERNS for p in out.glob(pattern)]
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_status(out: Path, state: str, **extra: Any) -> None:
    """Record the run's state in ``out/status.json`` (atomically: a reader never sees half)."""
    status = {"state": state, "pid": os.getpid(), "time": time.time(), **extra}
    write_text_atomic(out / STATUS_FILE, json.dumps(status, indent=2))


def error_line(exc: BaseException) -> str:
    """The first line of an exception's message, named by its type when it has none."""
    text = str(exc).strip()
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    return text.splitlines()[0] if text else type(exc).__name__
