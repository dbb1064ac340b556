"""A search that learns: ``peftlab sweep CONFIG --space SPACE.yaml`` on an Optuna study.

The sampler (TPE, random or grid) proposes each trial's config overrides from the search
space (``peftlab.lab.search_space``); the trial trains through the ordinary recipe into
``OUTPUT_DIR/trials/NNN-<slug>``; the Trainer's ``on_evaluate`` hook reports
``train.best_metric`` to the pruner (median or ASHA) at every evaluation, and a trial the
pruner judges hopeless stops at once, keeps its files and is recorded ``pruned``.

The study lives in ``OUTPUT_DIR/study.db`` (SQLite through Optuna's RDB storage), so an
interrupted sweep resumes: finished trials are kept, a trial that was running when the process
died is marked failed ("interrupted") and its parameters are queued to run again. ``workers``
> 1 runs that many worker processes (``peftlab.lab.study_worker``) on the shared study, each
with ``train.num_threads = cores // workers``; Optuna's storage hands out trial numbers, so
no two trials share a directory. One sweep process per OUTPUT_DIR at a time.

The budget is ``trials`` trials in the study in total (a resumed sweep runs the rest; a
grid defaults to its size) and/or ``timeout`` seconds of this invocation (no new trial starts
after it). The report is ``peftlab.lab.sweep.write_report``'s, plus Optuna's importances.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from peftlab.config import ConfigError, RunConfig, load_config
from peftlab.files import CorruptFileError, read_json
from peftlab.lab.peak_rss import PeakRSS
from peftlab.lab.search_space import SearchSpace, override_text
from peftlab.lab.sweep import (
    TRIAL_FILE,
    SweepResult,
    Trial,
    baseline_row,
    record_summary,
    slug,
    write_json,
    write_report,
)
from peftlab.training.recipe import run_training

STUDY_DB = "study.db"
STUDY_FILE = "study.json"  # the base config and the space: what workers and a resume read
STUDY_NAME = "peftlab"
INTERRUPTED = "interrupted"
# What a user can fix in one trial's overrides or data: recorded, the search goes on.
TRIAL_ERRORS = (ConfigError, ValueError, FileNotFoundError, KeyError)


class TrialFailed(Exception):
    """A trial that ended without a metric value (Optuna marks it FAIL and goes on)."""


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def lower_is_better(metric: str) -> bool:
    return metric.split("/")[0].endswith(("loss", "ppl"))


def run_study(config: RunConfig, space: SearchSpace, progress: bool = True) -> SweepResult:
    """Run (or resume) the study of ``config`` over ``space``; write and return the report."""
    out = Path(config.output_dir)
    if space.trials is None and space.timeout is None:
        if space.sampler != "grid":
            raise ConfigError("sweep --space: give a budget: --trials N and/or --timeout "
                              "SECONDS (or trials:/timeout: in SPACE.yaml)")
        space.trials = space.grid_size
    if space.sampler == "grid":
        space.grid()  # a range the grid cannot walk fails here, before any trial
    check_space(space, config)
    _check_or_write_settings(out, config, space)
    storage = _storage(out)
    study = open_study(out, space, config.train.best_metric, storage=storage,
                       eval_every=config.train.eval_every)
    _recover_interrupted(study, storage, out, config.train.best_metric)
    if space.workers == 1:
        optimize(study, config.to_dict(), space, out, progress=progress)
    else:
        _run_workers(out, space.workers)
    result = collect(study, out, config.train.best_metric)
    result.baseline = baseline_row(config, config.train.best_metric)  # classification only
    write_report(result)
    return result


def check_space(space: SearchSpace, config: RunConfig) -> None:
    """Each param's values (its choices, or both ends of its range) applied alone to the base
    config must validate: a misspelt key or an unknown method fails now, naming the key, not
    as a failed trial after trial."""
    base = config.to_dict()
    for p in space.params:
        values = p.choices if p.kind == "categorical" else [p.low, p.high]
        for value in values:
            try:
                load_config(overrides=[f"{p.key}={override_text(value)}"], base=base)
            except ConfigError as exc:
                raise ConfigError(f"{space.source}: params.{p.key}: value {value!r} does not "
                                  f"apply to the config: {exc}") from None


def _check_or_write_settings(out: Path, config: RunConfig, space: SearchSpace) -> None:
    """A resumed study must be of the same base config, space and metric; otherwise its
    trials would be ranked against another question. Checked before anything is written."""
    settings = {"base": config.to_dict(), "space": space.to_dict()}
    path = out / STUDY_FILE
    if path.is_file():
        try:
            earlier = read_json(path)
        except CorruptFileError as exc:
            raise ValueError(f"{path}: unreadable study settings ({exc})") from None
        for key, what in (("base", "base config"), ("space", "search space")):
            mine = settings[key] if key == "base" else settings[key]["params"]
            theirs = earlier.get(key) if key == "base" else (earlier.get(key) or {}).get("params")
            if json.loads(json.dumps(mine)) != theirs:
                raise ValueError(f"{out}: holds a study of another {what}; use a fresh "
                                 "output_dir (or the same config and SPACE.yaml to resume it)")
    elif (out / "trials").exists():
        raise ValueError(f"{out}/trials: an earlier sweep without a study is there; use a "
                         "fresh output_dir")
    write_json(path, settings)


def _storage(out: Path) -> RDBStorage:
    # a long SQLite busy timeout: several worker processes write the same file
    return RDBStorage(f"sqlite:///{(out / STUDY_DB).resolve()}",
                      engine_kwargs={"connect_args": {"timeout": 120}})


def open_study(out: Path, space: SearchSpace, metric: str, worker: int = 0,
               storage: RDBStorage | None = None, eval_every: int | None = None) -> optuna.Study:
    """The study in OUTPUT_DIR/study.db, created on first use. Sampler and pruner are not
    stored: every process builds its own (seeded by ``seed + worker`` so that parallel TPE
    or random workers do not propose the same points). ``eval_every``: the base config's
    ``train.eval_every``, ASHA's default first rung."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
    out.mkdir(parents=True, exist_ok=True)
    return optuna.create_study(storage=storage or _storage(out), study_name=STUDY_NAME,
                               load_if_exists=True,
                               direction="minimize" if lower_is_better(metric) else "maximize",
                               sampler=make_sampler(space, space.seed + worker),
                               pruner=make_pruner(space, eval_every))


def make_sampler(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if space.sampler == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    # Optuna's default of 10 random start-up trials is most of a small CPU budget
    startup = 10 if space.trials is None else max(2, min(10, space.trials // 4))
    startup = space.sampler_options.get("startup_trials", startup)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def make_pruner(space: SearchSpace, eval_every: int | None = None) -> optuna.pruners.BasePruner:
    """ASHA's first rung defaults to the first evaluation (``eval_every``): Optuna's "auto"
    (a hundredth of the longest finished trial) puts several rungs below the first evaluation,
    so that one value must win them all at once -- a trial outside the top 1/3**k stops there.
    ``margin`` (median and ASHA): see :class:`MarginPruner`."""
    opts = space.pruner_options
    pruner: optuna.pruners.BasePruner
    if space.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=opts.get("startup_trials", 2),
                                             n_warmup_steps=opts.get("warmup_steps", 0))
    elif space.pruner == "asha":
        pruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=opts.get("min_resource", eval_every or "auto"),
            reduction_factor=opts.get("reduction_factor", 3))
    else:
        return optuna.pruners.NopPruner()
    margin = float(opts.get("margin", 0.0))
    return MarginPruner(pruner, margin) if margin > 0 else pruner


class MarginPruner(optuna.pruners.BasePruner):
    """Prune only what the wrapped pruner prunes *and* trails the best value any trial
    reported at the same step by more than ``margin`` (metric units).

    Why: the median rule and ASHA rank trials. Once a search has found the good region (what
    TPE is for), its trials tie within the validation metric's noise -- one sentence of an
    872-row dev set is 0.11 accuracy points, its standard error about 1.2 -- and ranking
    still stops two of every three of them at a rung, on noise. With a margin of about two
    standard errors, clearly bad trials still stop at the first rung while statistical ties
    with the leader train to the end."""

    def __init__(self, wrapped: optuna.pruners.BasePruner, margin: float):
        self.wrapped, self.margin = wrapped, margin

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if not self.wrapped.prune(study, trial):
            return False
        step = trial.last_step
        if step is None:
            return True
        value = trial.intermediate_values[step]
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        values = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False,
                                                                          states=states)
                  if step in t.intermediate_values]
        values = [v for v in values + [value] if not math.isnan(v)]
        if math.isnan(value) or not values:
            return True
        if study.direction == optuna.study.StudyDirection.MINIMIZE:
            return value > min(values) + self.margin
        return value < max(values) - self.margin


def _trial_dir(out: Path, number: int, overrides: dict[str, str]) -> Path:
    return out / "trials" / f"{number:03d}-{slug(overrides)}"


def _recover_interrupted(study: optuna.Study, storage: RDBStorage, out: Path,
                         metric: str) -> None:
    """Trials left RUNNING by a process that died: failed ("interrupted"), params queued."""
    study_id = storage.get_study_id_from_name(STUDY_NAME)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        overrides = t.user_attrs.get("overrides", {})
        directory = Path(t.user_attrs.get("directory") or _trial_dir(out, t.number, overrides))
        # attributes first: a finished trial can no longer be updated
        storage.set_trial_user_attr(trial_id, "directory", str(directory))
        storage.set_trial_user_attr(trial_id, INTERRUPTED, True)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        record = Trial(t.number, overrides, str(directory), "failed", metric,
                       error="interrupted: the sweep stopped during this trial; its "
                             "parameters were queued to run again")
        write_json(directory / TRIAL_FILE, record.__dict__)
        if t.params:
            study.enqueue_trial(t.params, skip_if_exists=False)
        print(f"sweep: trial {t.number} was interrupted; its parameters run again")


def counted_trials(study: optuna.Study) -> int:
    """Trials that use up the budget: finished, pruned, failed (not interrupted), running."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED):
            continue
        if t.state != TrialState.WAITING:
            n += 1
    return n


def optimize(study: optuna.Study, base: dict[str, Any], space: SearchSpace, out: Path,
             progress: bool = True, threads: int | None = None) -> None:
    """Run trials in this process until the budget is used up."""
    metric = base.get("train", {}).get("best_metric", "val_loss")
    if space.trials is not None and counted_trials(study) >= space.trials:
        print(f"sweep: the study already has {space.trials} trials")
        return

    def budget(study: optuna.Study, _trial: FrozenTrial) -> None:
        if space.trials is not None and counted_trials(study) >= space.trials:
            study.stop()

    def objective(trial: optuna.Trial) -> float:
        return run_trial(trial, base, space, out, metric, progress, threads)

    study.optimize(objective, timeout=space.timeout, callbacks=[budget],
                   catch=(TrialFailed,), gc_after_trial=True)


class _Reporter:
    """The Trainer's on_evaluate hook: report the metric, stop when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial, self.metric = trial, metric
        self.pruned_at: int | None = None

    def __call__(self, step: int, record: dict[str, Any]) -> bool:
        value = record.get(self.metric)
        if value is None:
            return False
        self.trial.report(float(value), step)
        if self.trial.should_prune():
            self.pruned_at = step
            return True
        return False


def run_trial(trial: optuna.Trial, base: dict[str, Any], space: SearchSpace, out: Path,
              metric: str, progress: bool, threads: int | None) -> float:
    overrides = space.suggest(trial)
    directory = _trial_dir(out, trial.number, overrides)
    trial.set_user_attr("overrides", overrides)
    trial.set_user_attr("directory", str(directory))
    trial.set_user_attr("pid", os.getpid())  # which worker process ran it
    record = Trial(trial.number, overrides, str(directory), "failed", metric)
    print(f"sweep: trial {trial.number} {overrides} -> {directory}")
    reporter = _Reporter(trial, metric)
    try:
        extra = [f"output_dir={directory}"]
        if threads:
            extra.append(f"train.num_threads={threads}")
        cfg = load_config(overrides=[f"{k}={v}" for k, v in overrides.items()] + extra,
                          base=base)
        record.method = cfg.method_name
        with PeakRSS() as rss:
            summary = run_training(cfg, progress=progress, overwrite=True,
                                   on_evaluate=reporter)
    except TRIAL_ERRORS as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        write_json(directory / TRIAL_FILE, record.__dict__)
        print(f"sweep: trial {trial.number} failed: {record.error}")
        raise TrialFailed(record.error) from exc
    except KeyboardInterrupt:  # Ctrl-C: Optuna marks it failed; the next run retries it
        trial.set_user_attr(INTERRUPTED, True)
        trial.study.enqueue_trial(trial.params, skip_if_exists=False)
        record.error = "interrupted (Ctrl-C); its parameters were queued to run again"
        write_json(directory / TRIAL_FILE, record.__dict__)
        raise
    record_summary(record, summary, rss.peak_mb)
    # judged at the last evaluation, the trial has paid for all its training: it is finished
    cut_short = summary.result.stopped_by_hook
    del summary  # the model goes with it (Optuna collects garbage after each trial)
    if reporter.pruned_at is not None and cut_short:
        record.status = "pruned"
        record.error = f"pruned at step {reporter.pruned_at}"
    write_json(directory / TRIAL_FILE, record.__dict__)
    for key in ("seconds", "trainable_params", "peak_rss_mb", "method"):
        trial.set_user_attr(key, getattr(record, key))
    if record.status == "pruned":
        print(f"sweep: trial {trial.number} pruned at step {reporter.pruned_at}")
        raise optuna.TrialPruned(record.error)
    if record.best_value is None or record.error:
        raise TrialFailed(record.error or f"no {metric} logged")
    print(f"sweep: trial {trial.number} finished: {metric} {record.best_value:.4f}")
    return record.best_value


def _run_workers(out: Path, workers: int) -> None:
    """``workers`` processes on the shared study, each with its share of the cores."""
    threads = max(1, available_cores() // workers)
    procs = [subprocess.Popen([sys.executable, "-m", "peftlab.lab.study_worker", str(out),
                               str(k), str(threads)]) for k in range(workers)]
    codes = [p.wait() for p in procs]
    bad = [(k, rc) for k, rc in enumerate(codes) if rc != 0]
    if bad:
        raise ValueError(f"sweep: worker(s) {', '.join(f'{k} (exit {rc})' for k, rc in bad)} "
                         "failed; see their output above. Rerun the sweep to resume the study.")


def collect(study: optuna.Study, out: Path, metric: str) -> SweepResult:
    """The trial records of the study, in trial order, and Optuna's importances."""
    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.WAITING, TrialState.RUNNING):
            continue
        directory = t.user_attrs.get("directory")
        try:
            if directory is None:
                raise OSError("the trial never started")
            trials.append(Trial(**read_json(Path(directory) / TRIAL_FILE)))
        except (CorruptFileError, OSError, TypeError) as exc:
            trials.append(Trial(t.number, t.user_attrs.get("overrides", {}),
                                str(directory or ""), "failed", metric,
                                error=f"no readable trial record ({exc})"))
    return SweepResult(out, metric, lower_is_better(metric), trials,
                       importances=importances(study))


def importances(study: optuna.Study) -> dict[str, float] | None:
    """Optuna's parameter importances, with at least 2 finished trials and 2 parameters."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = {name for t in done for name in t.params}
    if len(done) < 2 or len(names) < 2:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning and friends
            values = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None  # e.g. every finished trial has the same value
    return {k: round(float(v), 4) for k, v in values.items()}
