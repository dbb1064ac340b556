"""A search that learns vs the grid over the same search space, under the same wall clock.

SST-2 (shared train/dev subsets), the embedded `minilm-l6` encoder, LoRA, 1 epoch. Both arms
search the same four hyper-parameters (the same base config, the same evaluations):

* `grid`: the full 3 x 3 x 2 x 2 grid a user would write over that space -- lr {1e-4, 1e-3,
  1e-2} (the ends and the geometric middle), r {4, 8, 16}, alpha {8, 32}, dropout {0, 0.1}:
  36 points, every trial to the end, visited in the grid sampler's seeded shuffled order;
* `tpe_asha`: TPE over the continuous version (lr [1e-4, 1e-2] log, r [4, 16] int log,
  alpha [8, 32] log, dropout [0, 0.1]; 5 random start-up trials) with ASHA pruning (first
  rung at the first evaluation, a third of the training; reduction factor 3) and a pruning
  margin of 1/sqrt(dev rows) -- two standard errors of a dev accuracy at its noisiest
  (p = 0.5): a trial within it of the best value at a rung is a tie, not pruned
  (`MarginPruner`; `--margin 0` for plain ASHA).

Each (arm, seed) is a `peftlab sweep --space` in its own process with one torch thread; all
of them start together (so every arm sees the same machine load) and get the same hard
budget: at the end the parent stops any arm still running, and only trials finished within
the budget count. The seed shuffles the grid's order / seeds TPE; the budget is meant to be
too short for the whole grid, so the grid's time-to-best is not just the luck of its order.

Per (arm, seed): the best dev accuracy of a finished trial and when it was first reached
(seconds from the start, from Optuna's trial timestamps), when the arm first reached the
grid's final best of the same seed, trials finished/pruned/failed; then medians over seeds.

    python benchmarks/sweep_search.py                 # 2,880 train rows, 872 dev rows, 3 seeds
    python benchmarks/sweep_search.py --quick         # 320 rows, 150 dev rows, 1 seed, 2 min

Writes benchmarks/results/sweep_search.{json,md} (`--out DIR` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from _common import RESULTS, SHARED, cpu_name, sst2_rows, write_jsonl

ARMS = ("grid", "tpe_asha")
# the grid a user would write over the space, and the continuous space it is a lattice of
GRID = {"train.lr": [1.0e-4, 1.0e-3, 1.0e-2], "method.r": [4, 8, 16],
        "method.alpha": [8, 32], "method.dropout": [0.0, 0.1]}
RANGES = {"train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
          "method.r": {"low": 4, "high": 16, "log": True},
          "method.alpha": {"low": 8.0, "high": 32.0, "log": True},
          "method.dropout": {"low": 0.0, "high": 0.1}}


def spaces(seed: int, eval_every: int, trials: int,
           margin: float) -> dict[str, dict[str, Any]]:
    """SPACE.yaml of each arm (the budget, --timeout, is added by the caller)."""
    return {
        "grid": {"params": GRID, "sampler": "grid", "pruner": "none", "seed": seed},
        "tpe_asha": {"params": RANGES, "sampler": {"name": "tpe", "startup_trials": 5},
                     "trials": trials, "seed": seed,
                     "pruner": {"name": "asha", "min_resource": eval_every,
                                "reduction_factor": 3, "margin": margin}},
    }


def base_config(data: dict[str, str], out: str, eval_every: int, threads: int) -> dict:
    return {"model": "minilm-l6", "task": "classification",
            "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
            "data": {"train": data["train"], "validation": data["validation"]},
            "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "max_length": 64, "seed": 0,
                      "warmup_ratio": 0.06, "log_every": 30, "eval_every": eval_every,
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


def summarize(trials: list[dict[str, Any]], started: float, budget: float) -> dict[str, Any]:
    """``trials``: ``{"state", "value", "start", "complete"}`` (unix seconds, value of a
    finished trial) -> counts within the budget, best accuracy, when it was first reached,
    the best-so-far curve. A trial ending after ``started + budget`` does not count."""
    end = started + budget
    ended = [t for t in trials if t["complete"] is not None and t["complete"] <= end]
    counts = {s: sum(t["state"] == s for t in ended) for s in ("COMPLETE", "PRUNED", "FAIL")}
    done = sorted((t for t in ended if t["state"] == "COMPLETE" and t["value"] is not None),
                  key=lambda t: t["complete"])
    curve, best = [], None
    for t in done:
        if best is None or t["value"] > best:
            best = t["value"]
            curve.append([round(t["complete"] - started, 1), best])
    return {"finished": counts["COMPLETE"], "pruned": counts["PRUNED"],
            "failed": counts["FAIL"], "cut_at_budget": len(trials) - len(ended),
            "best_accuracy": best, "best_at_s": curve[-1][0] if curve else None,
            "curve": curve, "finished_values": [t["value"] for t in done]}


def time_to_reach(curve: list[list[float]], target: float | None) -> float | None:
    """The first time the best-so-far curve is >= target (None: never)."""
    if target is None:
        return None
    return next((t for t, v in curve if v >= target - 1e-12), None)


def compare(arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One seed's arms -> per arm: when it first reached the grid's and TPE's final best."""
    grid_best = arms["grid"]["best_accuracy"]
    tpe_best = arms["tpe_asha"]["best_accuracy"]
    return {name: {"reach_grid_best_s": time_to_reach(a["curve"], grid_best),
                   "reach_tpe_best_s": time_to_reach(a["curve"], tpe_best)}
            for name, a in arms.items()}


def medians(seeds: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Median over an odd number of seeds of each arm's figures ("never" counts as later
    than any time); with an even number the per-seed rows are the result."""
    out: dict[str, dict[str, Any]] = {}
    for name in ARMS:
        rows = [{**s["arms"][name], **s["compare"][name]} for s in seeds.values()]
        med: dict[str, Any] = {}
        for key in ("best_accuracy", "best_at_s", "reach_grid_best_s", "reach_tpe_best_s",
                    "finished", "pruned", "failed", "cut_at_budget"):
            values = [r[key] for r in rows]
            m = statistics.median([float("inf") if v is None else v for v in values])
            med[key] = None if m == float("inf") else m
        out[name] = med
    return out


def read_study(out: Path) -> list[dict[str, Any]]:
    if not (out / "study.db").is_file():
        return []
    study = optuna.load_study(study_name="peftlab", storage=f"sqlite:///{out / 'study.db'}")
    return [{"state": t.state.name, "value": t.value,
             "start": t.datetime_start.timestamp() if t.datetime_start else None,
             "complete": t.datetime_complete.timestamp() if t.datetime_complete else None}
            for t in study.trials]


def table(results: dict[str, Any]) -> str:
    meta = results["meta"]
    seeds = results["seeds"]
    lines = [
        "# Sweep search: TPE + ASHA vs the full grid, same space, same wall-clock budget", "",
        f"SST-2, {meta['n_train']} train rows, {meta['n_dev']} dev rows (selection and "
        f"score), minilm-l6 + LoRA, 1 epoch ({meta.get('steps', '?')} steps), evaluation "
        f"every {meta['eval_every']} steps. Space: lr x r x alpha x dropout; grid = "
        f"{meta.get('grid_size', 36)} points in seeded shuffled order; TPE+ASHA over the "
        f"continuous ranges (5 random start-up trials), ASHA first rung at step "
        f"{meta['eval_every']}, reduction factor 3"
        f"{_margin_text(meta.get('asha_margin'))}. "
        f"{len(seeds)} seed(s) x 2 arms = {2 * len(seeds)} processes at once, 1 torch thread "
        f"each, hard budget {meta['budget_s']:.0f} s (trials still running then do not "
        f"count). CPU: {meta['cpu']} ({meta['cores']} cores), {meta['note']}.",
        "",
        "| seed | arm | best dev accuracy | reached at (s) | reaches the grid's best at (s) | "
        "reaches TPE's best at (s) | finished | pruned | failed | cut by the budget |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(str(seed), s["arms"], s["compare"]) for seed, s in seeds.items()]
    if "median" in results:
        med = results["median"]
        rows.append(("median", med, med))
    for label, arms, cmp in rows:
        for name in ARMS:
            a, c = arms[name], cmp[name]
            cells = [label, name, _pct(a["best_accuracy"]), _s(a["best_at_s"]),
                     _s(c["reach_grid_best_s"], "never"), _s(c["reach_tpe_best_s"], "never"),
                     _n(a["finished"]), _n(a["pruned"]), _n(a["failed"]),
                     _n(a["cut_at_budget"])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _s(x: float | None, missing: str = "-") -> str:
    return missing if x is None else f"{x:.0f}"


def _margin_text(margin: float | None) -> str:
    if not margin:
        return ""
    return (f", margin {100 * margin:.1f} points (a trial within it of the rung's best value "
            "is not pruned)")


def _n(x: float) -> str:
    return f"{x:g}"


def run_arms(work: Path, data: dict[str, str], seeds: list[int], args: argparse.Namespace,
             budget: float) -> tuple[float, list[str]]:
    """Start every (seed, arm) at once; stop those still running when the budget ends.
    Returns the start time and the runs that failed (their finished trials still count)."""
    procs = {}
    started = time.time()
    for seed in seeds:
        for name, space in spaces(seed, args.eval_every, args.trials, args.margin).items():
            run = f"{name}-s{seed}"
            cfg = base_config(data, str(work / run), args.eval_every, args.threads)
            cmd = [sys.executable, __file__, "--arm", name, "--config", json.dumps(cfg),
                   "--space", json.dumps(space), "--budget", str(budget)]
            log = (work / f"{run}.log").open("w")
            procs[run] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    while time.time() < started + budget and any(p.poll() is None for p in procs.values()):
        time.sleep(2)
    for p in procs.values():
        if p.poll() is None:
            p.terminate()  # the hard budget: its running trial does not count
    failed = []
    for run, p in procs.items():
        try:
            rc = p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        if rc not in (0, -15):
            print(f"sweep_search: arm {run} failed (exit {rc}); see {work / run}.log")
            failed.append(run)
    return started, failed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-dev", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, help="seconds, every arm")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--trials", type=int, default=500,
                   help="TPE arm's trial cap (the budget should be what stops it)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--margin", type=float, default=None,
                   help="ASHA's pruning margin (accuracy units; default 1/sqrt(dev rows))")
    p.add_argument("--work", default="/tmp/peftlab-sweep-search")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--note", default="shared with other jobs")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--space", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        arm_worker(args)
        return
    n_train = args.n_train or (320 if args.quick else 2880)
    n_dev = args.n_dev or (150 if args.quick else 872)
    budget = args.budget or (120.0 if args.quick else 1920.0)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    steps = -(-n_train // 32)
    if args.margin is None:
        args.margin = round(1 / n_dev ** 0.5, 4)
    args.eval_every = args.eval_every or max(1, steps // 3)
    if not (SHARED / "sst2" / "train.tsv").is_file():
        sys.exit(f"sweep_search: {SHARED / 'sst2'} not found (the shared SST-2 data)")
    work = Path(args.work)
    if work.exists():
        sys.exit(f"sweep_search: {work} exists; remove it or give --work")
    work.mkdir(parents=True)
    data = prepare_data(work, n_train, n_dev)
    load = os.getloadavg()[0]
    started, failed = run_arms(work, data, seeds, args, budget)
    load_end = os.getloadavg()
    by_seed: dict[str, dict[str, Any]] = {}
    for seed in seeds:
        arms = {name: summarize(read_study(work / f"{name}-s{seed}"), started, budget)
                for name in ARMS}
        by_seed[str(seed)] = {"arms": arms, "compare": compare(arms)}
    results = {"meta": {"n_train": n_train, "n_dev": n_dev, "budget_s": budget,
                        "steps": steps, "eval_every": args.eval_every, "threads": args.threads,
                        "grid_size": len(GRID["train.lr"]) * len(GRID["method.r"])
                        * len(GRID["method.alpha"]) * len(GRID["method.dropout"]),
                        "tpe_trial_cap": args.trials, "asha_margin": args.margin,
                        "seeds": seeds,
                        "cpu": cpu_name(), "cores": os.cpu_count(),
                        "note": f"{args.note}; load average {load:.1f} at the start, "
                                f"{load_end[1]:.1f} over the last 5 min",
                        "wall_s": round(time.time() - started, 1), "failed_runs": failed},
               "seeds": by_seed}
    if len(seeds) > 1 and len(seeds) % 2:
        results["median"] = medians(by_seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_search.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    (out / "sweep_search.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
