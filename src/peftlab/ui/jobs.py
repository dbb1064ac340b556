"""The UI's queue of training runs: each a ``peftlab train`` subprocess, one at a time.

A subprocess (not a thread) so a run can be stopped (SIGINT, as Ctrl-C: the run records
"stopped" in its status.json), its memory is returned when it ends, and a crash in training
cannot take the UI down. The config is checked with the CLI's own loader before it is queued,
so a bad key gets the same did-you-mean message as ``peftlab train``.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

import peftlab
from peftlab.config import ConfigError, from_dict
from peftlab.training.run_dir import check_output_dir

JOBS_DIR = ".peftlab-ui"  # under the runs folder: the queued configs and the runs' logs
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STOP_GRACE_SECONDS = 30.0
# The child restores Python's Ctrl-C handler before running the CLI: a UI started in the
# background (`peftlab ui &`, nohup) has SIGINT ignored, children inherit that, and "stop"
# (SIGINT) would then do nothing until the grace period's SIGKILL.
_LAUNCH = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
           "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")


@dataclass
class Job:
    id: int
    name: str  # the run folder under the runs folder
    config_path: str
    log_path: str
    overwrite: bool = False
    state: str = "queued"  # queued | running | finished | failed | stopped
    error: str | None = None
    returncode: int | None = None
    submitted: float = field(default_factory=time.time)
    pid: int | None = None

    def public(self) -> dict[str, Any]:
        return asdict(self)


def build_config(raw: dict[str, Any], runs_dir: Path, name: str) -> dict[str, Any]:
    """The form's config with ``output_dir`` set to the run's folder; validated as the CLI
    validates a YAML file (ConfigError with the same message)."""
    if not _NAME.match(name or ""):
        raise ConfigError(f"run name {name!r}: use letters, digits, '.', '_' or '-' "
                          "(at most 64, no '/')")
    raw = dict(raw)
    raw["output_dir"] = str((runs_dir / name).resolve())
    from_dict(raw, "config")
    return raw


class JobQueue:
    """Runs queued jobs one after another in a background thread."""

    def __init__(self, runs_dir: Path, python: str = sys.executable,
                 module: str = "peftlab.cli") -> None:
        self.runs_dir, self.python, self.module = Path(runs_dir), python, module
        self.jobs: list[Job] = []
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._proc: subprocess.Popen | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="peftlab-ui-jobs", daemon=True)
        self._thread.start()

    def submit(self, raw: dict[str, Any], name: str, overwrite: bool = False) -> Job:
        """Check the config and the output folder now (errors as in the CLI), then queue it."""
        config = build_config(raw, self.runs_dir, name)
        out = Path(config["output_dir"])
        check_output_dir(out, overwrite=overwrite)
        with self._cond:
            if any(j.name == name and j.state in ("queued", "running") for j in self.jobs):
                raise ConfigError(f"run name {name!r} is already queued or running")
            job_dir = self.runs_dir / JOBS_DIR
            job_dir.mkdir(parents=True, exist_ok=True)
            job_id = next(self._ids)
            path = job_dir / f"{job_id:04d}-{name}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            job = Job(job_id, name, str(path), str(path.with_suffix(".log")), overwrite)
            self.jobs.append(job)
            self._cond.notify_all()
        return job

    def stop(self, job_id: int) -> Job:
        """Drop a queued job; interrupt a running one (SIGINT, then SIGKILL after a grace)."""
        with self._cond:
            job = self._get(job_id)
            if job.state == "queued":
                job.state, job.error = "stopped", "removed from the queue"
            elif job.state == "running" and self._proc is not None:
                self._proc.send_signal(signal.SIGINT)
                threading.Thread(target=self._kill_later, args=(self._proc,), daemon=True).start()
            return job

    def list(self) -> list[dict[str, Any]]:
        with self._cond:
            return [j.public() for j in self.jobs]

    def close(self) -> None:
        """Stop the running job (if any) and the worker thread."""
        with self._cond:
            self._closed = True
            for job in self.jobs:
                if job.state == "queued":
                    job.state, job.error = "stopped", "the UI was shut down"
            proc = self._proc
            self._cond.notify_all()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._thread.join(timeout=STOP_GRACE_SECONDS)

    def _get(self, job_id: int) -> Job:
        for job in self.jobs:
            if job.id == job_id:
                return job
        raise KeyError(f"no job {job_id}")

    def _kill_later(self, proc: subprocess.Popen) -> None:
        try:
            proc.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not any(j.state == "queued" for j in self.jobs):
                    self._cond.wait()
                if self._closed:
                    return
                job = next(j for j in self.jobs if j.state == "queued")
                job.state = "running"
                self._proc = self._start(job)
                job.pid = self._proc.pid
            code = self._proc.wait()
            with self._cond:
                self._proc = None
                job.returncode = code
                if code == 0:
                    job.state = "finished"
                elif code in (130, -signal.SIGINT, -signal.SIGKILL):
                    job.state, job.error = "stopped", "stopped from the UI"
                else:
                    job.state, job.error = "failed", _error_line(Path(job.log_path))

    def _start(self, job: Job) -> subprocess.Popen:
        cmd = [self.python, "-c", _LAUNCH, self.module, "train", job.config_path,
               "--no-progress"]
        if job.overwrite:
            cmd.append("--overwrite")
        env = dict(os.environ)
        # the subprocess imports the same peftlab as this UI (e.g. a source checkout)
        src = str(Path(peftlab.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(job.log_path, "wb") as log:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL)


def _error_line(log: Path) -> str:
    """The CLI's one error line (``peftlab train: error: ...``), else the log's last line."""
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "the run failed (no log)"
    for line in reversed(lines):
        if line.startswith("peftlab train: error: "):
            return line.removeprefix("peftlab train: error: ")
    return lines[-1] if lines else "the run failed (empty log)"
