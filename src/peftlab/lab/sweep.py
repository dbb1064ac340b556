"""Hyper-parameter search and side-by-side method comparison: many runs of one config.

A sweep is a base config plus a grid of ``key=v1,v2,...`` overrides on any config key
(``train.lr``, ``method.r``, ``method.name`` ...). Every combination, or a seeded random sample
of ``trials`` of them, is trained by the ordinary recipe into ``OUTPUT_DIR/trials/NN-<slug>``.
A finished trial leaves ``trial.json``; re-running the sweep skips it, so an interrupted sweep
resumes where it stopped. A trial whose overrides are invalid, or whose run fails on bad
input, is recorded with its error and the sweep goes on. Trials are ranked by the base
config's ``train.best_metric`` (e.g. ``val_loss``, ``val_accuracy``): ``sweep.md``,
``sweep.json`` and ``sweep.png`` in OUTPUT_DIR, with the finished/pruned/failed counts, the
optimisation history (``sweep_history.png``) and the Pareto front of metric vs trainable
parameters vs training seconds vs peak RSS (``peftlab.lab.pareto``).

The Optuna-driven search (``--space``: TPE/random/grid sampling, pruning, resumable SQLite
storage, parallel workers) is ``peftlab.lab.study``; it writes the same trial records and report.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from peftlab.config import ConfigError, RunConfig, load_config
from peftlab.files import CorruptFileError, read_json
from peftlab.lab.baseline import run_baseline
from peftlab.lab.pareto import pareto_front
from peftlab.lab.peak_rss import PeakRSS
from peftlab.runtime.plots import new_figure
from peftlab.training.recipe import run_training

TRIAL_FILE = "trial.json"


@dataclass
class Trial:
    index: int
    overrides: dict[str, str]
    directory: str
    status: str  # done | failed | pruned
    metric: str
    best_value: float | None = None
    best_step: int | None = None
    final_train_loss: float | None = None
    trainable_params: int | None = None
    seconds: float | None = None
    error: str | None = None
    peak_rss_mb: float | None = None
    method: str | None = None
    steps: int | None = None


@dataclass
class SweepResult:
    output_dir: Path
    metric: str
    lower_is_better: bool
    trials: list[Trial]
    # task: classification: the TF-IDF baseline on the base config's data (name, value of
    # ``metric``, seconds), the table's first row: the bar every trial has to beat
    baseline: dict[str, Any] | None = None
    importances: dict[str, float] | None = None  # Optuna's evaluator, --space sweeps only

    @property
    def ranked(self) -> list[Trial]:
        """Finished (not pruned) trials with a metric value, best first."""
        done = [t for t in self.trials if t.status == "done" and t.best_value is not None]
        return sorted(done, key=lambda t: t.best_value if self.lower_is_better else -t.best_value)

    @property
    def best(self) -> Trial | None:
        return self.ranked[0] if self.ranked else None

    def counts(self) -> dict[str, int]:
        return {status: sum(t.status == status for t in self.trials)
                for status in ("done", "pruned", "failed")}


def parse_grid(specs: list[str] | dict[str, list[Any]]) -> dict[str, list[str]]:
    """``["train.lr=1e-4,3e-4", "method.target_modules=[q,v],[q,k,v]"]`` (or a dict of lists)
    -> ``{key: [value strings]}``. Commas inside brackets or braces do not split values."""
    if isinstance(specs, dict):
        items = [(k, [v if isinstance(v, str) else json.dumps(v) for v in vals])
                 for k, vals in specs.items()]
    else:
        items = []
        for spec in specs:
            key, sep, values = spec.partition("=")
            if not sep or not key.strip() or not values.strip():
                raise ConfigError(f"sweep grid {spec!r}: expected KEY=VALUE1,VALUE2,... "
                                  "(e.g. train.lr=1e-4,3e-4)")
            items.append((key.strip(), _split_values(values, spec)))
    grid: dict[str, list[str]] = {}
    for key, values in items:
        if key in grid:
            raise ConfigError(f"sweep grid: key {key!r} given twice")
        if not values:
            raise ConfigError(f"sweep grid: key {key!r} has no values")
        if key == "output_dir":
            raise ConfigError("sweep grid: output_dir is set per trial (OUTPUT_DIR/trials/...)")
        grid[key] = values
    if not grid:
        raise ConfigError("sweep: the grid is empty (give at least one KEY=VALUE1,VALUE2)")
    return grid


def _split_values(text: str, spec: str) -> list[str]:
    values, depth, current = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"sweep grid {spec!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    if depth:
        raise ConfigError(f"sweep grid {spec!r}: unbalanced brackets")
    values.append(current.strip())
    if any(not v for v in values):
        raise ConfigError(f"sweep grid {spec!r}: empty value (two commas in a row?)")
    return values


def combinations(grid: dict[str, list[str]], trials: int | None = None,
                 seed: int = 0) -> list[dict[str, str]]:
    """All grid points in key order, or a seeded random sample of ``trials`` of them (kept in
    grid order, so a bigger sample extends a smaller one's trial names only where they agree)."""
    keys = list(grid)
    points = [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*grid.values())]
    if trials is not None:
        if trials < 1:
            raise ConfigError(f"sweep: trials must be >= 1, got {trials}")
        if trials < len(points):
            chosen = sorted(random.Random(seed).sample(range(len(points)), trials))
            points = [points[i] for i in chosen]
    return points


def slug(overrides: dict[str, str]) -> str:
    text = "-".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in overrides.items())
    return re.sub(r"[^A-Za-z0-9=.+_-]+", "_", text)[:80]


def run_sweep(config: RunConfig, grid: dict[str, list[str]], trials: int | None = None,
              seed: int = 0, progress: bool = True) -> SweepResult:
    """Train every grid point (or a sample), skipping trials already finished; write the
    ranked table. ``config`` is the validated base config; its output_dir holds the sweep."""
    out = Path(config.output_dir)
    metric = config.train.best_metric
    lower = metric.split("/")[0].endswith(("loss", "ppl"))
    base = config.to_dict()
    results: list[Trial] = []
    points = combinations(grid, trials, seed)
    bar = baseline_row(config, metric)
    for i, point in enumerate(points):
        directory = out / "trials" / f"{i:02d}-{slug(point)}"
        done = _read_trial(directory / TRIAL_FILE, point)
        if done is not None:
            print(f"sweep: trial {i + 1}/{len(points)} {point} already done, skipped")
            results.append(done)
            continue
        print(f"sweep: trial {i + 1}/{len(points)} {point} -> {directory}")
        trial = Trial(i, point, str(directory), "failed", metric)
        try:
            overrides = [f"{k}={v}" for k, v in point.items()] + [f"output_dir={directory}"]
            cfg = load_config(overrides=overrides, base=base)
            trial.method = cfg.method_name
            # a trial without a record did not finish: it starts again from scratch
            with PeakRSS() as rss:
                summary = run_training(cfg, progress=progress, overwrite=True)
        except (ConfigError, ValueError, FileNotFoundError, KeyError) as exc:
            trial.error = f"{type(exc).__name__}: {exc}"
            print(f"sweep: trial {i + 1} failed: {trial.error}")
        else:
            record_summary(trial, summary, rss.peak_mb)
            write_json(directory / TRIAL_FILE, asdict(trial))
            del summary
        gc.collect()
        results.append(trial)
    result = SweepResult(out, metric, lower, results, baseline=bar)
    write_report(result)
    return result


def baseline_row(config: RunConfig, metric: str) -> dict[str, Any] | None:
    """For ``task: classification``, the TF-IDF baseline on the base config's data, scored
    by the sweep's metric where it reports it (val_accuracy, val_macro_f1, val_f1_<label>)."""
    if config.task != "classification":
        return None
    try:
        result = run_baseline(config, write=False)
    except ValueError as exc:  # bad data fails every trial too, with the same message
        return {"name": "baseline", "value": None, "seconds": None, "error": str(exc)}
    value = result.metrics.get(metric)
    note = (f"C={result.params['C']}, class weights {result.params['class_weight'] or 'none'}"
            + ("" if value is not None else f"; the baseline has no {metric}"))
    print(f"sweep: baseline {result.name}: {metric} "
          + ("-" if value is None else f"{value:.4f}"))
    return {"name": result.name, "value": value, "seconds": round(result.seconds, 2),
            "note": note}


def record_summary(trial: Trial, summary: Any, peak_rss_mb: float) -> None:
    """Fill a finished run's numbers (a training.recipe.RunSummary) into ``trial``."""
    r = summary.result
    trial.status = "done"
    trial.best_value, trial.best_step = r.best_value, r.best_step
    trial.final_train_loss, trial.seconds = r.final_train_loss, round(r.seconds, 2)
    trial.trainable_params, trial.steps = summary.trainable_params, r.steps
    trial.peak_rss_mb = round(peak_rss_mb, 1)
    if r.best_metric != trial.metric:
        trial.error = f"ranked by {trial.metric} but the run tracked {r.best_metric}"
    elif r.best_value is None:
        trial.error = f"no {trial.metric} logged (no validation data?)"


def _read_trial(path: Path, point: dict[str, str]) -> Trial | None:
    if not path.is_file():
        return None
    try:
        trial = Trial(**read_json(path))
    except (CorruptFileError, TypeError) as exc:
        raise ValueError(f"{path}: unreadable trial record ({exc}); delete it to rerun the "
                         "trial") from None
    if trial.overrides != point:
        raise ValueError(f"{path}: recorded for {trial.overrides}, but this sweep's trial there "
                         f"is {point}; use a fresh output_dir for a different grid")
    return trial


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic: a crash never leaves a half-written record that would skip a trial."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def table(result: SweepResult) -> str:
    """Markdown: trials ranked best first, then the failed ones."""
    keys = list(dict.fromkeys(k for t in result.trials for k in t.overrides))
    head = ["rank", "trial", *keys, f"best {result.metric}", "at step", "final train loss",
            "trainable params", "seconds", "peak RSS MB", "status", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ranked = result.ranked
    rest = [t for t in result.trials if t not in ranked]
    if result.baseline is not None:  # first: the bar to beat
        b = result.baseline
        cells = ["-", b["name"], *("" for _ in keys), _num(b["value"]), "", "", "0",
                 _num(b["seconds"], ".1f"), (b.get("error") or b.get("note") or "")]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    for rank, t in enumerate(ranked + rest, start=1):
        cells = [str(rank) if t in ranked else "-", f"{t.index:02d}",
                 *(t.overrides.get(k, "") for k in keys),
                 _num(t.best_value), str(t.best_step or ""), _num(t.final_train_loss),
                 f"{t.trainable_params:,}" if t.trainable_params else "",
                 _num(t.seconds, ".1f"), _num(t.peak_rss_mb, ".0f"), t.status,
                 (t.error or "").replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "" if x is None else format(x, fmt)


def write_report(result: SweepResult) -> None:
    out = result.output_dir
    out.mkdir(parents=True, exist_ok=True)
    best = result.best
    counts = result.counts()
    front = pareto_front(result.ranked, result.lower_is_better)
    summary = {"metric": result.metric, "lower_is_better": result.lower_is_better,
               "counts": counts, "best": asdict(best) if best else None,
               "baseline": result.baseline, "importances": result.importances,
               "pareto_front": [t.index for t in front],
               "trials": [asdict(t) for t in result.trials]}
    write_json(out / "sweep.json", summary)
    direction = "lower" if result.lower_is_better else "higher"
    text = [f"# Sweep: {len(result.trials)} trials ranked by {result.metric} ({direction} is "
            "better)", "",
            f"{counts['done']} finished, {counts['pruned']} pruned, {counts['failed']} failed.",
            ""]
    if best:
        text += [f"Best: trial {best.index:02d} {best.overrides} -> {result.metric} "
                 f"{best.best_value:.4f}; adapter in {best.directory}/adapter.", ""]
    text += [table(result), ""]
    if result.ranked:
        text += ["![trials](sweep.png)", ""]
        _plot(result, out / "sweep.png")
    if any(t.best_value is not None for t in result.trials):
        text += ["## Optimisation history", "", "![history](sweep_history.png)", ""]
        _plot_history(result, out / "sweep_history.png")
    if result.importances:
        text += ["## Hyper-parameter importance", "",
                 "Optuna's importance evaluator over the finished trials (sums to 1).", "",
                 "| parameter | importance |", "|---|---|",
                 *(f"| {k} | {v:.3f} |" for k, v in result.importances.items()), ""]
    if front:
        text += ["## Pareto front", "", pareto_table(result, front), ""]
    (out / "sweep.md").write_text("\n".join(text))


def pareto_table(result: SweepResult, front: list[Trial]) -> str:
    """Markdown: the non-dominated trials (best metric vs trainable parameters vs training
    seconds vs peak RSS), then the best trial of each method and whether it is on the front."""
    head = ["trial", "method", f"best {result.metric}", "trainable params", "seconds",
            "peak RSS MB"]
    lines = ["Trials no other trial beats on all four axes at once (metric, trainable "
             "parameters, training seconds, peak RSS).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [_pareto_row(t) for t in front]
    by_method: dict[str, Trial] = {}
    for t in result.ranked:  # best first: the first of each method is its best
        by_method.setdefault(t.method or "?", t)
    if len(by_method) > 1:
        lines += ["", "Best trial of each method:", "",
                  "| " + " | ".join([*head, "on the front"]) + " |",
                  "|" + "---|" * (len(head) + 1)]
        lines += [_pareto_row(t, "yes" if t in front else "no") for t in by_method.values()]
    return "\n".join(lines)


def _pareto_row(t: Trial, *extra: str) -> str:
    cells = [f"{t.index:02d}", t.method or "", _num(t.best_value),
             f"{t.trainable_params:,}" if t.trainable_params else "", _num(t.seconds, ".1f"),
             _num(t.peak_rss_mb, ".0f"), *extra]
    return "| " + " | ".join(cells) + " |"


def _plot_history(result: SweepResult, path: Path) -> None:
    """Each trial's best metric in trial order (pruned ones hollow) and the best so far."""
    fig = new_figure(7.0, 3.6)
    ax = fig.subplots()
    for status, style in (("done", {"color": "tab:blue"}),
                          ("pruned", {"facecolors": "none", "edgecolors": "tab:gray"})):
        pts = [t for t in result.trials if t.status == status and t.best_value is not None]
        if pts:
            ax.scatter([t.index for t in pts], [t.best_value for t in pts], label=status,
                       zorder=3, **style)
    best, xs, ys = None, [], []
    for t in sorted(result.ranked, key=lambda t: t.index):
        if best is None or (t.best_value < best if result.lower_is_better else t.best_value > best):
            best = t.best_value
        xs.append(t.index)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"best {result.metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _plot(result: SweepResult, path: Path) -> None:
    ranked = result.ranked
    labels = [f"{t.index:02d} " + ", ".join(f"{k.rsplit('.', 1)[-1]}={v}"
                                            for k, v in t.overrides.items()) for t in ranked]
    fig = new_figure(7.0, 0.5 + 0.35 * len(ranked))
    ax = fig.subplots()
    ax.barh(range(len(ranked)), [t.best_value for t in ranked], color="tab:blue")
    ax.set_yticks(range(len(ranked)), labels, fontsize=8)
    ax.invert_yaxis()  # best on top
    ax.set_xlabel(f"best {result.metric}")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
