"""How often TPE + ASHA can beat the grid in `sweep_search.py`, by simulating many seeds.

`sweep_search.py` runs 3 seeds in 32 minutes; its question -- does the pruned search reach
the grid's best dev accuracy in clearly less time? -- is a race between maxima of noisy
values: every configuration on SST-2's plateau scores 84-86% on an 872-row dev set whose
standard error is 1.2 points. Three seeds cannot say how that race goes on average, so this
script runs it a few hundred times on a *surrogate* of the real trials: the same samplers
and pruners (Optuna's grid and TPE samplers, ASHA, peftlab's ``MarginPruner``), the same
space and budget, a simulated clock, and accuracies drawn from a model fitted by eye to the
84 real trials of `sweep_search.py`'s two full runs (README "Sweeps"):

* an effective learning rate ``z = log10(lr) + log10(alpha / 16) / 2 + log10(r / 8) / 4``;
* the plateau, ``-3.55 <= z <= -2.35``: final accuracy ~ N(84.8, 0.55) points, the first
  evaluation 2.0-4.5 points lower (real: 84.0-86.0 final, 79.4-83.0 at step 30);
* below it, a ramp from chance (52.9%, the majority class) towards the plateau (real: lr 1e-4
  ends at 53-72%); above it, divergence to chance, or a first evaluation of 64-79% that does
  not last (real: lr >= 5e-3);
* time: 18 s of start-up plus 44 s per evaluation interval (a pruned trial ~62 s, a full one
  ~150 s, as measured with 6 processes on 2 cores).

It is a model, not a measurement: use it for what it says about the *shape* of the race
(how much a seed's luck decides it), not for absolute times.

    python benchmarks/sweep_search_sim.py              # 300 seeds per variant, ~1.5 min
    python benchmarks/sweep_search_sim.py --seeds 30

Writes benchmarks/results/sweep_search_sim.{json,md} (`--out DIR` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path
from typing import Any

import optuna
from _common import RESULTS
from sweep_search import GRID, RANGES

from peftlab.lab.study import MarginPruner

CHANCE = 0.529  # SST-2 dev's majority class
STEPS = 90  # 2,880 rows / batch 32, 1 epoch
START_S, INTERVAL_S = 18.0, 44.0  # per trial; per 30 training steps + an evaluation
BUDGET_S = 1920.0
VARIANTS = {  # name -> TPE arm's settings (the grid arm never changes)
    "as benchmarked (5 start-up trials, ASHA at step 30, margin 3.4)": {},
    "plain ASHA (no margin)": {"margin": 0.0},
    "3 start-up trials": {"startup": 3},
    "multivariate TPE": {"multivariate": True},
    "first rung at step 15": {"eval_every": 15},
}


def accuracies(lr: float, r: int, alpha: float, rng: random.Random) -> list[float]:
    """Dev accuracy at steps 30, 60 and 90 of one simulated trial (see the module doc)."""
    z = math.log10(lr) + 0.5 * math.log10(alpha / 16) + 0.25 * math.log10(r / 8)
    if z < -3.55:  # too slow: a ramp from chance
        lift = max(0.0, min(1.0, (z + 4.2) / 0.65))
        final = CHANCE + (0.845 - CHANCE) * lift ** 1.5 + rng.gauss(0, 0.01)
        values = [CHANCE + (final - CHANCE) * 0.45 * lift,
                  CHANCE + (final - CHANCE) * 0.8, final]
    elif z > -2.35:  # too fast: diverges
        if rng.random() < 0.6:
            values = [CHANCE + rng.choice([0.0, 0.0, 0.01, -0.058]) for _ in range(3)]
        else:
            first = rng.uniform(0.64, 0.79)
            values = [first, rng.choice([CHANCE, first - 0.02]), rng.choice([CHANCE, first])]
    else:  # the plateau: flat within the dev set's noise
        final = rng.gauss(0.848, 0.0055)
        values = [final - rng.uniform(0.02, 0.045), final - rng.uniform(-0.003, 0.012),
                  final - rng.uniform(-0.003, 0.012)]
    return [min(max(v, 0.47), 0.87) for v in values]


def _at(values: list[float], step: float) -> float:
    """The accuracy curve through (0, chance) and the values at 30/60/90, at ``step``."""
    points = [(0, CHANCE), (30, values[0]), (60, values[1]), (90, values[2])]
    for (s0, v0), (s1, v1) in zip(points, points[1:], strict=False):
        if step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return values[-1]


def run_arm(arm: str, seed: int, startup: int = 5, eval_every: int = 30, margin: float = 0.034,
            multivariate: bool = False) -> dict[str, Any]:
    """One arm under the budget: its best-so-far curve [(seconds, accuracy)] and counts."""
    rng = random.Random(seed * 7919 + (arm == "grid"))
    if arm == "grid":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.GridSampler(GRID, seed=seed)
        pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup,
                                             multivariate=multivariate)
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=eval_every,
                                                        reduction_factor=3)
        pruner = MarginPruner(pruner, margin) if margin else pruner
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    clock, curve, best = 0.0, [], None
    interval = INTERVAL_S * eval_every / 30
    while arm != "grid" or len(study.trials) < math.prod(len(v) for v in GRID.values()):
        trial = study.ask()
        params = {}
        for key in GRID:
            if arm == "grid":
                params[key] = trial.suggest_categorical(key, GRID[key])
            elif key == "method.r":
                params[key] = trial.suggest_int(key, **RANGES[key])
            else:
                params[key] = trial.suggest_float(key, **RANGES[key])
        values = accuracies(params["train.lr"], params["method.r"], params["method.alpha"], rng)
        end, seen, pruned = clock + START_S, [], False
        for step in range(eval_every, STEPS + 1, eval_every):
            end += interval
            seen.append(_at(values, step))
            trial.report(seen[-1], step)
            if end > BUDGET_S or trial.should_prune():
                pruned = end <= BUDGET_S
                break
        if end > BUDGET_S:
            break  # the budget cuts the running trial: it does not count
        clock = end
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        study.tell(trial, max(seen))
        if best is None or max(seen) > best:
            best = max(seen)
            curve.append((clock, best))
    states = [t.state for t in study.trials]
    return {"curve": curve, "finished": states.count(optuna.trial.TrialState.COMPLETE),
            "pruned": states.count(optuna.trial.TrialState.PRUNED)}


def reach(curve: list[tuple[float, float]], target: float) -> float:
    """When the best-so-far curve first reaches ``target`` (inf: never, within the budget)."""
    return next((t for t, v in curve if v >= target - 1e-12), math.inf)


def variant(seeds: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Per seed, the grid's time to its final best and TPE's time to the same accuracy."""
    ratios, grid_s, tpe_s, finished, pruned = [], [], [], [], []
    for seed in range(seeds):
        grid = run_arm("grid", seed)
        tpe = run_arm("tpe", seed, **settings)
        t_grid, target = grid["curve"][-1]
        t_tpe = reach(tpe["curve"], target)
        grid_s.append(t_grid)
        tpe_s.append(t_tpe)
        ratios.append(t_tpe / t_grid)
        finished.append(tpe["finished"])
        pruned.append(tpe["pruned"])
    quartiles = statistics.quantiles(ratios, n=4)
    return {"settings": settings, "seeds": seeds,
            "reaches_grid_best": sum(t < math.inf for t in tpe_s) / seeds,
            "clearly_sooner": sum(r < 0.75 for r in ratios) / seeds,
            "sooner": sum(r < 1.0 for r in ratios) / seeds,
            "ratio_quartiles": [round(q, 2) if q < math.inf else None for q in quartiles],
            "median_grid_s": statistics.median(grid_s),
            "median_tpe_s": _finite(statistics.median(tpe_s)),
            "tpe_finished_mean": statistics.mean(finished),
            "tpe_pruned_mean": statistics.mean(pruned)}


def _finite(x: float) -> float | None:
    return None if x == math.inf else x


def table(results: dict[str, Any]) -> str:
    lines = ["# Simulated sweep_search: how often TPE + ASHA reaches the grid's best sooner", "",
             f"{results['seeds']} seeds per row, surrogate accuracies (see the script's "
             "docstring), the real samplers and pruners, budget "
             f"{BUDGET_S:.0f} s. Per seed: the grid's time to its final best, TPE's time to "
             "the same accuracy; 'clearly sooner' = under 0.75x the grid's time.", "",
             "| TPE arm | reaches the grid's best | sooner | clearly sooner | time ratio "
             "TPE/grid, quartiles | median s, grid / TPE | TPE finished / pruned |",
             "|---|---:|---:|---:|---|---|---|"]
    for name, r in results["variants"].items():
        q = ", ".join("never" if x is None else f"{x:.2f}" for x in r["ratio_quartiles"])
        tpe = "never" if r["median_tpe_s"] is None else f"{r['median_tpe_s']:.0f}"
        lines.append(f"| {name} | {r['reaches_grid_best']:.0%} | {r['sooner']:.0%} | "
                     f"{r['clearly_sooner']:.0%} | {q} | {r['median_grid_s']:.0f} / {tpe} | "
                     f"{r['tpe_finished_mean']:.1f} / {r['tpe_pruned_mean']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=300)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    results = {"seeds": args.seeds, "budget_s": BUDGET_S,
               "variants": {name: variant(args.seeds, settings)
                            for name, settings in VARIANTS.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_search_sim.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    (out / "sweep_search_sim.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
