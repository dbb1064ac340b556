"""A search that learns vs the grid, under the same wall-clock budget.

SST-2 (shared train/dev subsets), the embedded `minilm-l6` encoder, LoRA. Two arms run at the
same time, each a `peftlab sweep --space` in its own process with one torch thread (so both
see the same machine load) and the same `--timeout` budget:

* `grid`: the usual hand grid, lr {3e-4, 1e-3, 3e-3} x r {4, 16}, every trial to the end;
* `tpe_asha`: TPE over lr in [1e-4, 1e-2] (log) and r in {4, 8, 16}, ASHA pruning at the
  evaluations (every `--eval-every` steps).

For each arm: the best dev accuracy of a finished trial, when it was first reached (seconds
from the arm's start, from Optuna's trial timestamps), trials finished/pruned/failed, and for
the TPE arm the time at which it first matched the grid's best accuracy.

    python benchmarks/sweep_search.py                # 1,200 train rows, 300 dev rows, 11 min/arm
    python benchmarks/sweep_search.py --quick        # 400 rows, 150 dev rows, 2 min/arm

A trial running when the budget ends finishes (Optuna's timeout starts no new trial), so an
arm may run past it; "arm s" is when its last trial ended.

Writes benchmarks/results/sweep_search.{json,md} (`--out DIR` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from _common import RESULTS, SHARED, sst2_rows, write_jsonl

ARMS = ("grid", "tpe_asha")


def spaces(trials: int, eval_every: int) -> dict[str, dict[str, Any]]:
    """SPACE.yaml of each arm (the budget, --timeout, is added by the caller)."""
    return {
        "grid": {"params": {"train.lr": [3.0e-4, 1.0e-3, 3.0e-3], "method.r": [4, 16]},
                 "sampler": "grid", "pruner": "none"},
        "tpe_asha": {"params": {"train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
                                "method.r": [4, 8, 16]},
                     "sampler": "tpe", "trials": trials,
                     "pruner": {"name": "asha", "min_resource": eval_every,
                                "reduction_factor": 3}},
    }


def base_config(data: dict[str, str], out: str, eval_every: int, threads: int) -> dict:
    return {"model": "minilm-l6", "task": "classification",
            "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
            "data": {"train": data["train"], "validation": data["validation"]},
            "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "max_length": 64, "seed": 0,
                      "warmup_ratio": 0.06, "log_every": 20, "eval_every": eval_every,
                      "best_metric": "val_accuracy", "num_threads": threads},
            "output_dir": out}


def prepare_data(work: Path, n_train: int, n_dev: int, seed: int = 0) -> dict[str, str]:
    train, dev = sst2_rows("train.tsv"), sst2_rows("dev.tsv")
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(dev)
    return {"train": write_jsonl(work / "sst2_train.jsonl", train[:n_train]),
            "validation": write_jsonl(work / "sst2_dev.jsonl", dev[:n_dev])}


def arm_worker(args: argparse.Namespace) -> None:
    """One arm in this process: the sweep itself (peftlab's public API)."""
    import peftlab  # here, not at the top: the parent process never loads torch

    cfg = json.loads(args.config)
    space = json.loads(args.space)
    peftlab.sweep(cfg, space=space, timeout=args.budget, progress=False)


def summarize(trials: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """``trials``: ``{"state", "value", "start", "complete"}`` (unix seconds, value of a
    finished trial) -> counts, best accuracy, when it was first reached, the best-so-far curve."""
    counts = {s: sum(t["state"] == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    done = sorted((t for t in trials if t["state"] == "COMPLETE" and t["value"] is not None),
                  key=lambda t: t["complete"])
    curve, best = [], None
    for t in done:
        if best is None or t["value"] > best:
            best = t["value"]
            curve.append([round(t["complete"] - started, 1), best])
    ends = [t["complete"] for t in trials if t["complete"] is not None]
    return {"finished": counts["COMPLETE"], "pruned": counts["PRUNED"],
            "failed": counts["FAIL"], "best_accuracy": best,
            "best_at_s": curve[-1][0] if curve else None, "curve": curve,
            "used_s": round(max(ends) - started, 1) if ends else 0.0}


def time_to_reach(curve: list[list[float]], target: float | None) -> float | None:
    """The first time the best-so-far curve is >= target (None: never)."""
    if target is None:
        return None
    return next((t for t, v in curve if v >= target - 1e-12), None)


def read_study(out: Path) -> list[dict[str, Any]]:
    study = optuna.load_study(study_name="peftlab", storage=f"sqlite:///{out / 'study.db'}")
    return [{"state": t.state.name, "value": t.value,
             "start": t.datetime_start.timestamp() if t.datetime_start else None,
             "complete": t.datetime_complete.timestamp() if t.datetime_complete else None}
            for t in study.trials]


def table(results: dict[str, Any]) -> str:
    meta = results["meta"]
    arms = results["arms"]
    grid_best = arms.get("grid", {}).get("best_accuracy")
    lines = [
        "# Sweep search: TPE + ASHA vs the grid, same wall-clock budget", "",
        f"SST-2, {meta['n_train']} train rows, {meta['n_dev']} dev rows, minilm-l6 + LoRA "
        f"(1 epoch, eval every {meta['eval_every']} steps); {meta['budget_s']:.0f} s per arm, "
        f"both arms at once, 1 thread each; TPE capped at {meta.get('tpe_trial_cap', '?')} "
        "trials. "
        f"CPU: {meta['cpu']} ({meta['cores']} cores), shared with other jobs: {meta['note']}.",
        "",
        "| arm | best dev accuracy | reached at (s) | reaches the grid's best at (s) | "
        "finished | pruned | failed | arm s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ARMS:
        a = arms.get(name)
        if not a:
            continue
        reach = time_to_reach(a["curve"], grid_best)
        cells = [name, _pct(a["best_accuracy"]), _s(a["best_at_s"]),
                 _s(reach) if reach is not None else "never", str(a["finished"]),
                 str(a["pruned"]), str(a["failed"]), _s(a["used_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-dev", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, help="seconds per arm")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--trials", type=int, default=200,
                   help="TPE arm's trial cap (the budget should be what stops it)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="/tmp/peftlab-sweep-search")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--note", default="load average at start shown")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--space", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        arm_worker(args)
        return
    n_train = args.n_train or (400 if args.quick else 1200)
    n_dev = args.n_dev or (150 if args.quick else 300)
    budget = args.budget or (120.0 if args.quick else 660.0)
    if not (SHARED / "sst2" / "train.tsv").is_file():
        sys.exit(f"sweep_search: {SHARED / 'sst2'} not found (the shared SST-2 data)")
    work = Path(args.work)
    if work.exists():
        sys.exit(f"sweep_search: {work} exists; remove it or give --work")
    work.mkdir(parents=True)
    data = prepare_data(work, n_train, n_dev)
    load = os.getloadavg()[0]
    procs, started = {}, time.time()
    for name, space in spaces(args.trials, args.eval_every).items():
        cfg = base_config(data, str(work / name), args.eval_every, args.threads)
        cmd = [sys.executable, __file__, "--arm", name, "--config", json.dumps(cfg),
               "--space", json.dumps(space), "--budget", str(budget)]
        log = (work / f"{name}.log").open("w")
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    for name, proc in procs.items():
        if proc.wait() != 0:
            sys.exit(f"sweep_search: arm {name} failed; see {work / name}.log")
    arms = {name: summarize(read_study(work / name), started) for name in ARMS}
    results = {"meta": {"n_train": n_train, "n_dev": n_dev, "budget_s": budget,
                        "eval_every": args.eval_every, "threads": args.threads,
                        "tpe_trial_cap": args.trials,
                        "cpu": cpu_name(), "cores": os.cpu_count(),
                        "note": f"{args.note} (load average {load:.1f} at start)",
                        "wall_s": round(time.time() - started, 1)},
               "arms": arms}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_search.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    (out / "sweep_search.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
