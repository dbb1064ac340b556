"""Never lose work: a training process killed with SIGKILL -- between steps or in the middle of
writing a checkpoint -- resumes with ``--resume`` to exactly the adapter an uninterrupted run
makes, and nothing half-written is ever picked up.

The runs happen in subprocesses (a real ``peftlab train``); the uninterrupted reference runs
in this process with the same config.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import peftlab
from peftlab.runtime import checkpoint as ckpt

MAX_STEPS = 12

# Runs `peftlab train` with safetensors' save_file replaced: on its KILL_AT_SAVE-th call it
# writes half the file, then the process kills itself (SIGKILL: no cleanup of any kind).
KILLING_SAVE = '''
import os, signal, sys
import peftlab.runtime.checkpoint as ckpt
from safetensors.torch import save_file as real_save

target = int(os.environ["KILL_AT_SAVE"])
calls = 0

def save_file(tensors, path, metadata=None):
    global calls
    calls += 1
    real_save(tensors, path, metadata=metadata)
    if calls == target:
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

ckpt.save_file = save_file
from peftlab.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _config(model_dir: Path, data: dict[str, Path], out: Path) -> dict:
    # dropout and evaluation make the result depend on the restored RNG state and the
    # best-checkpoint bookkeeping, not only on the weights
    return {
        "model": str(model_dir),
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": str(data["train"]), "validation": str(data["validation"]),
                 "max_rows": 48},
        # attention: sdpa -- the runs compared here are separate processes, and the eager
        # CPU kernel choice (attention: auto) is timed per process: under load two processes
        # may pick different kernels, whose rounding differs by more than atol=1e-6 after a
        # few steps. (A resume keeps its first part's kernels: test_train.py.)
        "train": {"max_steps": MAX_STEPS, "batch_size": 4, "lr": 3e-3, "precision": "fp32",
                  "save_every": 1, "eval_every": 4, "log_every": 1, "num_threads": 1,
                  "attention": "sdpa"},
        "output_dir": str(out),
    }


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _cli(*args: str, env: dict[str, str] | None = None, script: str | None = None):
    command = [sys.executable, "-c", script, *args] if script else [
        sys.executable, "-m", "peftlab.cli", *args]
    return subprocess.Popen(command, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass
    return max(steps, default=0)


@pytest.fixture(scope="module")
def reference(tiny_chat_model_dir, demo_data_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("crash") / "straight"
    cfg = _config(tiny_chat_model_dir, demo_data_dir, out)
    peftlab.train(cfg, progress=False)
    return {"cfg": cfg, "adapter": _adapter(out)}


def _assert_same_adapter(out: Path, reference: dict) -> None:
    got = _adapter(out)
    assert got.keys() == reference["adapter"].keys()
    for key, value in reference["adapter"].items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)


def _resume(cfg_path: Path, out: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "peftlab.cli", "train", str(cfg_path),
                           "--resume", "--no-progress"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"done: {MAX_STEPS} steps" in done.stdout
    return done.stdout + done.stderr


def test_sigkill_between_steps_resumes_to_the_uninterrupted_adapter(reference, tmp_path):
    kill_after = random.Random(os.getpid()).randint(2, MAX_STEPS - 3)  # a different step per run
    out = tmp_path / "killed"
    cfg_path = _write(dict(reference["cfg"], output_dir=str(out)), tmp_path / "run.yaml")
    proc = _cli("train", str(cfg_path), "--no-progress")
    deadline = time.monotonic() + 300
    while _steps_logged(out) < kill_after and proc.poll() is None:
        assert time.monotonic() < deadline, "training never reached the step to kill at"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill ({kill_after=})"
    assert not (out / "adapter").exists()

    log = _resume(cfg_path, out)
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    assert 1 <= resumed_at <= kill_after, log
    _assert_same_adapter(out, reference)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in x]
    assert steps == list(range(1, MAX_STEPS + 1)), f"{kill_after=}"


@pytest.mark.parametrize("kill_at_save", [4, 9, 13])  # trainable / optimizer / trainable files
def test_sigkill_while_writing_a_checkpoint_never_picks_up_half_a_file(reference, tmp_path,
                                                                      kill_at_save):
    out = tmp_path / "killed"
    cfg_path = _write(dict(reference["cfg"], output_dir=str(out)), tmp_path / "run.yaml")
    proc = _cli("train", str(cfg_path), "--no-progress",
                env={"KILL_AT_SAVE": str(kill_at_save)}, script=KILLING_SAVE)
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    root = out / "checkpoints"
    assert any(p.name.endswith(".tmp") for p in root.iterdir())  # the half-written one
    latest = ckpt.latest_checkpoint(root)
    assert latest is not None and not latest.name.endswith(".tmp")
    ckpt.check_checkpoint(latest)  # complete and readable

    log = _resume(cfg_path, out)
    assert f"resumed from {latest}" in log
    _assert_same_adapter(out, reference)


def test_resume_skips_a_corrupt_newest_checkpoint(reference, tmp_path):
    out = tmp_path / "run"
    cfg_path = _write(dict(reference["cfg"], output_dir=str(out)), tmp_path / "run.yaml")
    proc = _cli("train", str(cfg_path), "--no-progress", env={"KILL_AT_SAVE": "1000"},
                script=KILLING_SAVE)  # never kills: a whole run
    proc.wait(timeout=300)
    assert proc.returncode == 0, proc.stderr.read()
    root = out / "checkpoints"
    newest, older = sorted(root.glob("step-*"))[-1], sorted(root.glob("step-*"))[-2]
    weights = newest / "trainable.safetensors"  # damaged after the fact, e.g. a full disk
    weights.write_bytes(weights.read_bytes()[:100])
    (out / "adapter" / "adapter_model.safetensors").unlink()

    log = _resume(cfg_path, out)
    assert f"skipping checkpoint {newest}" in log and f"resumed from {older}" in log
    _assert_same_adapter(out, reference)


def test_a_replacement_cut_in_half_is_recovered(tmp_path):
    """save_checkpoint moves the old copy aside before renaming the new one in; a kill in
    between leaves only '<name>.old', which is then the last complete copy."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    ckpt.save_checkpoint(tmp_path / "step-0000001", model, opt, {"step": 1, "micro": 1})
    os.replace(tmp_path / "step-0000001", tmp_path / "step-0000001.old")
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-0000001"
    assert not (tmp_path / "step-0000001.old").exists()
