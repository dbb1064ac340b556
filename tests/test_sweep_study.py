"""``peftlab sweep --space``: search-space parsing, the samplers' configs, pruning through the
real Trainer, resume after the sweep process is killed, two workers on one study, and the
report (counts, importances, history, Pareto front)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

import peftlab
from peftlab.cli import main
from peftlab.config import ConfigError, load_config
from peftlab.lab.pareto import pareto_front
from peftlab.lab.search_space import load_space, override_text, space_from_dict
from peftlab.lab.study import (
    STUDY_DB,
    _check_or_write_settings,
    importances,
    make_pruner,
    make_sampler,
    open_study,
    optimize,
)
from peftlab.lab.sweep import SweepResult, Trial, write_report

SRC = Path(peftlab.__file__).resolve().parents[1]


def _cfg(model_dir: Path, data: dict[str, Path], out: Path, steps: int = 6) -> dict:
    return {"model": str(model_dir),
            "method": {"name": "lora", "r": 4, "alpha": 8},
            "data": {"train": str(data["train"]), "validation": str(data["validation"]),
                     "max_rows": 24},
            "train": {"max_steps": steps, "batch_size": 8, "lr": 3e-3, "precision": "fp32",
                      "log_every": 1, "eval_every": 2, "warmup_steps": 0,
                      "num_threads": 1},
            "output_dir": str(out)}


def test_space_parsing_and_errors(tmp_path):
    space = space_from_dict({
        "params": {"train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
                   "method.r": {"low": 2, "high": 8, "step": 2},
                   "train.warmup_ratio": {"low": 0.0, "high": 0.2, "step": 0.1},
                   "method": {"choices": [{"name": "lora", "r": 4}, {"name": "ia3"}]},
                   "train.batch_size": [4, 8]},
        "sampler": "grid", "pruner": {"name": "asha", "min_resource": 2}, "trials": 3})
    kinds = {p.key: p.kind for p in space.params}
    assert kinds == {"train.lr": "float", "method.r": "int", "train.warmup_ratio": "float",
                     "method": "categorical", "train.batch_size": "categorical"}
    assert space.pruner == "asha" and space.pruner_options == {"min_resource": 2}
    assert space.trials == 3 and space.sampler == "grid"
    assert [p.choices for p in space.params][3] == ["{name: lora, r: 4}", "{name: ia3}"]
    assert space.params[1].grid_values("s") == [2, 4, 6, 8]
    assert space.params[2].grid_values("s") == [0.0, 0.1, 0.2]
    with pytest.raises(ConfigError, match="params.train.lr: the grid sampler cannot walk a log"):
        space.grid()
    assert space_from_dict(space.to_dict()).to_dict() == space.to_dict()  # workers' round trip
    # floats become overrides YAML reads back as floats (YAML 1.1 reads "1e-05" as text)
    assert yaml.safe_load(override_text(1e-05)) == 1e-05
    assert yaml.safe_load(override_text(0.25)) == 0.25 and override_text(True) == "true"

    bad = [({"params": {}}, "'params' must map at least one"),
           ({"params": {"train.lr": {"low": 1e-3}}}, "train.lr: a range needs both"),
           ({"params": {"train.lr": {"low": "tiny", "high": 1.0}}}, "low: expected a number"),
           ({"params": {"train.lr": {"low": 1.0, "high": 0.5}}}, "low .1.0. must be below"),
           ({"params": {"train.lr": {"low": 0.0, "high": 0.5, "log": True}}}, "low > 0"),
           ({"params": {"train.lr": {"low": 0.1, "hihg": 0.5}}}, "'hihg'.*did you mean 'high'"),
           ({"params": {"train.lr": {"choices": []}}}, "non-empty list"),
           ({"params": {"train.lr": {"choices": [1, 1]}}}, "listed twice"),
           ({"params": {"output_dir": [1, 2]}}, "set per trial"),
           ({"params": {"train.lr": [1]}, "sampler": "cmaes"}, "sampler: 'cmaes' is not one"),
           ({"params": {"train.lr": [1]}, "sampler": {"name": "grid", "startup_trials": 2}},
            "sampler grid: unknown option 'startup_trials'"),
           ({"params": {"train.lr": [1]}, "sampler": {"name": "tpe", "startup_trials": -1}},
            "startup_trials: got -1"),
           ({"params": {"train.lr": [1]}, "pruner": "hyperband"}, "pruner: 'hyperband'"),
           ({"params": {"train.lr": [1]}, "pruner": {"name": "asha", "eta": 3}}, "'eta'"),
           ({"params": {"train.lr": [1]}, "pruner": {"name": "asha", "margn": 0.1}},
            "'margn'.*did you mean 'margin'"),
           ({"params": {"train.lr": [1]}, "trials": 0}, "trials: expected a positive"),
           ({"params": {"train.lr": [1]}, "trails": 3}, "'trails'.*did you mean 'trials'")]
    for raw, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            space_from_dict(raw, "space.yaml")
    path = tmp_path / "space.yaml"
    path.write_text("params: {train.lr: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"space.yaml: not valid YAML"):
        load_space(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_space(tmp_path / "missing.yaml")


def test_tpe_start_up_trials():
    """A quarter of the trial budget (2 to 10), or what the space sets."""
    def startup(**settings) -> int:
        space = space_from_dict({"params": {"train.lr": [1]}, **settings})
        assert space_from_dict(space.to_dict()).to_dict() == space.to_dict()
        return make_sampler(space, 0)._n_startup_trials

    assert startup(trials=20) == 5 and startup(trials=500) == 10 and startup() == 10
    assert startup(sampler={"name": "tpe", "startup_trials": 3}, trials=500) == 3


@pytest.mark.parametrize("sampler", ["tpe", "random", "grid"])
def test_samplers_propose_valid_configs(sampler, tiny_chat_model_dir, demo_data_dir, tmp_path):
    """Every proposal, applied as overrides to the base config, validates (no training)."""
    space = space_from_dict({
        "params": {"train.lr": ({"low": "1e-4", "high": 1.0e-2, "log": True}
                                if sampler != "grid" else [1.0e-4, 1.0e-3]),
                   "method": {"choices": [{"name": "lora", "alpha": 8},
                                          {"name": "lora", "use_dora": True}]},
                   "method.r": {"low": 2, "high": 6, "step": 2}},
        "sampler": sampler, "trials": 12})
    base = load_config(base=_cfg(tiny_chat_model_dir, demo_data_dir, tmp_path)).to_dict()
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0) if sampler == "tpe"
                                else optuna.samplers.RandomSampler(seed=0) if sampler == "random"
                                else optuna.samplers.GridSampler(space.grid(), seed=0))
    seen = set()

    def objective(trial: optuna.Trial) -> float:
        overrides = space.suggest(trial)
        cfg = load_config(overrides=[f"{k}={v}" for k, v in overrides.items()], base=base)
        assert 1e-4 <= cfg.train.lr <= 1e-2 and cfg.method_name == "lora"
        assert isinstance(cfg.train.lr, float)
        # the method block is applied first, then method.r inside it
        assert cfg.method.r == int(overrides["method.r"])
        assert cfg.method.use_dora == ("use_dora" in overrides["method"])
        assert (cfg.method.alpha == 8) == (not cfg.method.use_dora)
        seen.add(tuple(overrides.values()))
        return cfg.train.lr

    study.optimize(objective, n_trials=12 if sampler != "grid" else None)
    assert len(study.trials) == (12 if sampler != "grid" else space.grid_size)
    if sampler == "grid":  # every point exactly once
        assert len(seen) == space.grid_size == 2 * 3 * 2


def _records(out: Path) -> dict[int, dict]:
    recs = [json.loads(p.read_text()) for p in (out / "trials").glob("*/trial.json")]
    return {r["index"]: r for r in recs}


def test_pruner_stops_the_trial_whose_metric_is_worse(tiny_chat_model_dir, demo_data_dir,
                                                      tmp_path):
    """Trial 0 learns (lr 3e-2), trial 1 barely moves (lr 1e-7): the median pruner, fed by the
    Trainer's evaluations, stops trial 1 at its first evaluation; its files stay."""
    out = tmp_path / "study"
    base_cfg = load_config(base=_cfg(tiny_chat_model_dir, demo_data_dir, out, steps=8))
    space = space_from_dict({"params": {"train.lr": [3.0e-2, 1.0e-7]}, "sampler": "random",
                             "pruner": {"name": "median", "startup_trials": 1}, "trials": 2})
    _check_or_write_settings(out, base_cfg, space)
    study = open_study(out, space, "val_loss")
    study.enqueue_trial({"train.lr": 3.0e-2})
    study.enqueue_trial({"train.lr": 1.0e-7})
    optimize(study, base_cfg.to_dict(), space, out, progress=False)

    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    recs = _records(out)
    assert recs[0]["status"] == "done" and recs[0]["steps"] == 8
    assert recs[1]["status"] == "pruned" and recs[1]["steps"] == 2
    assert recs[1]["error"] == "pruned at step 2"
    pruned_dir = Path(recs[1]["directory"])
    history = [json.loads(x) for x in (pruned_dir / "metrics.jsonl").open()]
    assert max(r["step"] for r in history) == 2  # stopped at once, not trained to the end
    assert (pruned_dir / "adapter" / "adapter_config.json").is_file()  # its files are kept
    assert recs[1]["best_value"] > recs[0]["best_value"]



def test_a_trial_judged_at_its_last_evaluation_is_finished(tiny_chat_model_dir, demo_data_dir,
                                                           tmp_path):
    """Evaluated only at its last step, the worse trial has paid for all its training:
    pruning it would save nothing and lose a result, so it is recorded finished."""
    out = tmp_path / "study"
    cfg = _cfg(tiny_chat_model_dir, demo_data_dir, out, steps=3)  # 24 rows / 8: one epoch
    cfg["train"]["eval_every"] = 3
    base_cfg = load_config(base=cfg)
    space = space_from_dict({"params": {"train.lr": [3.0e-2, 1.0e-7]}, "sampler": "random",
                             "pruner": {"name": "median", "startup_trials": 1}, "trials": 2})
    _check_or_write_settings(out, base_cfg, space)
    study = open_study(out, space, "val_loss")
    study.enqueue_trial({"train.lr": 3.0e-2})
    study.enqueue_trial({"train.lr": 1.0e-7})
    optimize(study, base_cfg.to_dict(), space, out, progress=False)

    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    recs = _records(out)
    assert recs[1]["status"] == "done" and recs[1]["steps"] == 3 and recs[1]["error"] is None
    assert study.trials[1].value == recs[1]["best_value"] > recs[0]["best_value"]


def test_asha_first_rung_is_the_first_evaluation():
    """With ``train.eval_every`` 30 ASHA judges a trial first at step 30 (a report before it
    is never pruned), then keeps the top third; Optuna's "auto" would judge it at step 20."""
    space = space_from_dict({"params": {"train.lr": [1]}, "pruner": "asha"})
    study = optuna.create_study(direction="maximize", pruner=make_pruner(space, eval_every=30))
    for value in (0.5, 0.6, 0.7, 0.8, 0.9):  # finished trials, evaluated at steps 30 and 90
        trial = study.ask()
        for step in (30, 90):
            trial.report(value, step)
            trial.should_prune()  # records the rungs the trial passed
        study.tell(trial, value)
    hopeless, good = study.ask(), study.ask()
    hopeless.report(0.1, 20)
    assert not hopeless.should_prune()
    hopeless.report(0.1, 30)
    assert hopeless.should_prune()
    good.report(0.85, 30)  # in the top third of the six values at the first rung
    assert not good.should_prune()

@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_margin_keeps_ties_with_the_leader(direction):
    """ASHA alone stops a trial outside the top third; with ``margin`` it stops it only when
    it trails the best value reported at that step by more than the margin."""
    sign = 1.0 if direction == "maximize" else -1.0

    def study_with(margin: float) -> optuna.Study:
        pruner = {"name": "asha", "margin": margin} if margin else "asha"
        space = space_from_dict({"params": {"train.lr": [1]}, "pruner": pruner})
        study = optuna.create_study(direction=direction,
                                    pruner=make_pruner(space, eval_every=30))
        for value in (0.80, 0.84, 0.85, 0.86, 0.70, 0.60):  # six trials at the first rung
            trial = study.ask()
            trial.report(sign * value, 30)
            trial.should_prune()
            study.tell(trial, sign * value)
        return study

    for margin, pruned in ((0.0, {0.84: True, 0.83: True, 0.60: True}),
                           (0.02, {0.84: False, 0.83: True, 0.60: True}),
                           (0.2, {0.84: False, 0.83: False, 0.60: True})):
        study = study_with(margin)
        for value, expect in pruned.items():
            trial = study.ask()
            trial.report(sign * value, 30)
            assert trial.should_prune() == expect, (margin, value)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    with pytest.raises(ConfigError, match="margin: got -0.1, expected a number >= 0"):
        space_from_dict({"params": {"train.lr": [1]},
                         "pruner": {"name": "median", "margin": -0.1}}, "space.yaml")


def _cli_args(config: Path, space: Path) -> list[str]:
    return ["sweep", str(config), "--space", str(space), "--no-progress"]


def test_resume_after_the_sweep_process_is_killed(tiny_chat_model_dir, demo_data_dir, tmp_path):
    out = tmp_path / "study"
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(_cfg(tiny_chat_model_dir, demo_data_dir, out, steps=8)))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"params": {"train.lr": {"low": 1.0e-3, "high": 3.0e-2,
                                                             "log": True},
                                                "method.r": [2, 4]},
                                     "sampler": "random", "trials": 3}))
    env = dict(os.environ, PYTHONPATH=str(SRC))
    code = f"import sys; from peftlab.cli import main; sys.exit(main({_cli_args(config, space)!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:  # kill it while trial 1 trains, after trial 0 finished
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            dirs = list((out / "trials").glob("*")) if (out / "trials").exists() else []
            finished = [d for d in dirs if (d / "trial.json").is_file()]
            if finished and len(dirs) > len(finished) and any(
                    (d / "metrics.jsonl").is_file() for d in dirs if d not in finished):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    first = _records(out)
    assert list(first) == [0] and first[0]["status"] == "done"
    first_mtime = (Path(first[0]["directory"]) / "metrics.jsonl").stat().st_mtime_ns

    assert main(_cli_args(config, space)) == 0  # resume: the study continues
    recs = _records(out)
    dirs = sorted(p.name for p in (out / "trials").iterdir())
    assert len(dirs) == len(recs) == 4 and len({d[:3] for d in dirs}) == 4  # one dir per trial
    assert recs[1]["status"] == "failed" and recs[1]["error"].startswith("interrupted")
    assert [recs[i]["status"] for i in (0, 2, 3)] == ["done"] * 3  # 3 trials, as budgeted
    assert recs[2]["overrides"] == recs[1]["overrides"]  # the interrupted one ran again
    # the finished trial was not trained again
    assert (Path(recs[0]["directory"]) / "metrics.jsonl").stat().st_mtime_ns == first_mtime
    report = (out / "sweep.md").read_text()
    assert "3 finished, 0 pruned, 1 failed." in report
    assert "## Hyper-parameter importance" in report and "## Pareto front" in report
    assert (out / "sweep_history.png").stat().st_size > 0
    assert main(_cli_args(config, space)) == 0  # budget used: nothing more runs
    assert len(_records(out)) == 4

    space.write_text(yaml.safe_dump({"params": {"train.lr": [1.0e-3]}, "trials": 1}))
    assert main(_cli_args(config, space)) == 2  # another space on this study: refused


def test_cli_errors_are_one_line(tmp_path, capsys, tiny_chat_model_dir, demo_data_dir):
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(_cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / "s")))
    space = tmp_path / "space.yaml"
    space.write_text("params: {train.lr: {low: 1.0e-3, hgh: 1.0e-2}}\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("params: {train.lrr: [1.0e-3, 1.0e-2], method: [{name: lora}, {name: nope}]}"
                    "\ntrials: 2\n")
    cases = [(["--space", str(space)], "'hgh' (did you mean 'high'?)"),
             (["--space", str(typo)], "params.train.lrr: value 0.001 does not apply to the "
                                      "config: --set train.lrr: train has no key 'lrr' (did you "
                                      "mean 'lr'?)"),
             (["--space", str(space), "--grid", "train.lr=1,2"], "either --grid"),
             (["--grid", "train.lr=1e-3", "--workers", "2"], "workers needs a search space"),
             ([], "either --grid")]
    for extra, msg in cases:
        assert main(["sweep", str(config), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s").exists()  # nothing written


def test_two_workers_share_one_study(tiny_chat_model_dir, demo_data_dir, tmp_path):
    out = tmp_path / "study"
    result = peftlab.sweep(_cfg(tiny_chat_model_dir, demo_data_dir, out, steps=4),
                           space={"params": {"train.lr": {"low": 1.0e-3, "high": 3.0e-2,
                                                          "log": True}}},
                           sampler="random", trials=4, workers=2, progress=False)
    study = optuna.load_study(study_name="peftlab", storage=f"sqlite:///{out / STUDY_DB}")
    numbers = [t.number for t in study.trials]
    assert 4 <= len(numbers) <= 5 and len(set(numbers)) == len(numbers)  # budget: see study.py
    pids = {t.user_attrs["pid"] for t in study.trials}
    # the trials ran in worker processes, never twice; under load a worker that starts late
    # may find the budget used by the other (a fresh-clone CI saw one pid), so not always 2
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids
    recs = _records(out)
    assert sorted(recs) == sorted(numbers) and all(r["status"] == "done" for r in recs.values())
    lrs = [r["overrides"]["train.lr"] for r in recs.values()]
    assert len(set(lrs)) == len(lrs)  # differently seeded samplers: no repeated proposal
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    for r in recs.values():
        cfg = yaml.safe_load((Path(r["directory"]) / "config.yaml").read_text())
        assert cfg["train"]["num_threads"] == threads
    assert len(result.ranked) == len(numbers)


def _t(i: int, value: float | None, method: str, params: int, seconds: float, rss: float,
       status: str = "done") -> Trial:
    return Trial(i, {"method": method}, f"d{i}", status, "val_accuracy", best_value=value,
                 trainable_params=params, seconds=seconds, peak_rss_mb=rss, method=method)


def test_report_counts_pareto_front_and_importances(tmp_path):
    trials = [_t(0, 0.90, "lora", 1000, 10.0, 500),   # best accuracy: on the front
              _t(1, 0.85, "ia3", 100, 8.0, 450),      # cheaper everywhere: on the front
              _t(2, 0.80, "ia3", 200, 9.0, 460),      # dominated by 1
              _t(3, 0.95, "lora", 10, 1.0, 1.0, status="pruned"),  # pruned: not a result
              _t(4, None, "nope", 0, 0.0, 0.0, status="failed")]
    assert [t.index for t in pareto_front(trials[:3], lower_is_better=False)] == [0, 1]
    assert [t.index for t in pareto_front(trials[:3], lower_is_better=True)] == [2, 1]
    tie = _t(5, 0.85, "ia3", 100, 9.0, 450)  # as good as 1 everywhere but slower: dominated
    assert [t.index for t in pareto_front([*trials[:3], tie], lower_is_better=False)] == [0, 1]

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("x", 0, 1) * 10 + 0 * t.suggest_float("y", 0, 1),
                   n_trials=12)
    imp = importances(study)
    assert set(imp) == {"x", "y"} and imp["x"] > 0.9 > imp["y"]
    one = optuna.create_study()
    one.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    assert importances(one) is None  # one parameter: nothing to compare

    result = SweepResult(tmp_path, "val_accuracy", False, trials, importances=imp)
    write_report(result)
    text = (tmp_path / "sweep.md").read_text()
    assert "3 finished, 1 pruned, 1 failed." in text
    assert "| x | " in text and "## Optimisation history" in text
    front = text.split("## Pareto front")[1]
    assert "| 00 | lora | 0.9000 | 1,000 | 10.0 | 500 |" in front
    assert "| 01 | ia3 | 0.8500 | 100 | 8.0 | 450 |" in front
    assert "| 02 |" not in front.split("Best trial of each method")[0]
    assert "| 01 | ia3 | 0.8500 | 100 | 8.0 | 450 | yes |" in front
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["counts"] == {"done": 3, "pruned": 1, "failed": 1}
    assert summary["pareto_front"] == [0, 1] and summary["best"]["index"] == 0
    assert (tmp_path / "sweep_history.png").stat().st_size > 0
