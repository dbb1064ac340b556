"""Hyper-parameter sweeps: grid parsing, seeded sampling, ranking by the run's best metric,
failed trials recorded (not fatal), finished trials skipped on a re-run, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import peftlab
from peftlab.cli import main
from peftlab.config import ConfigError
from peftlab.lab.sweep import combinations, parse_grid


def test_grid_values_split_on_top_level_commas_only():
    grid = parse_grid(["train.lr=1e-4, 3e-4", "method={name: lora, r: 4},{name: ia3}",
                       "method.target_modules=[q_proj,v_proj],all-linear"])
    assert grid == {"train.lr": ["1e-4", "3e-4"],
                    "method": ["{name: lora, r: 4}", "{name: ia3}"],
                    "method.target_modules": ["[q_proj,v_proj]", "all-linear"]}
    assert parse_grid({"train.lr": [1e-4, 0.001], "method.name": ["lora"]}) == {
        "train.lr": ["0.0001", "0.001"], "method.name": ["lora"]}
    for bad, msg in (("train.lr", "expected KEY=VALUE1"), ("train.lr=1,,2", "empty value"),
                     ("method={name: lora", "unbalanced"), ("output_dir=a,b", "set per trial")):
        with pytest.raises(ConfigError, match=msg):
            parse_grid([bad])
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["train.lr=1", "train.lr=2"])


def test_random_sample_is_a_seeded_subset_in_grid_order():
    grid = {"a": ["1", "2", "3"], "b": ["x", "y"]}
    full = combinations(grid)
    assert len(full) == 6 and full[0] == {"a": "1", "b": "x"} and full[1] == {"a": "1", "b": "y"}
    sample = combinations(grid, trials=3, seed=5)
    assert len(sample) == 3 and sample == combinations(grid, trials=3, seed=5)
    assert sorted(full.index(p) for p in sample) == [full.index(p) for p in sample]
    assert combinations(grid, trials=10) == full


def _cfg(model_dir: Path, data: dict[str, Path], out: Path) -> dict:
    return {"model": str(model_dir),
            "method": {"name": "lora", "r": 4, "alpha": 8},
            "data": {"train": str(data["train"]), "validation": str(data["validation"]),
                     "max_rows": 32},
            "train": {"max_steps": 4, "batch_size": 8, "lr": 3e-3, "precision": "fp32",
                      "log_every": 1, "eval_every": 2},
            "output_dir": str(out)}


def test_sweep_ranks_by_val_loss_records_failures_and_resumes(tiny_chat_model_dir,
                                                               demo_data_dir, tmp_path,
                                                               monkeypatch):
    out = tmp_path / "sweep"
    grid = ["train.lr=1e-5,3e-3", "method={name: lora, r: 4, alpha: 8},{name: ia3},{name: nope}"]
    result = peftlab.sweep(_cfg(tiny_chat_model_dir, demo_data_dir, out), grid, progress=False)
    assert len(result.trials) == 6
    failed = [t for t in result.trials if t.status == "failed"]
    assert len(failed) == 2 and all("nope" in t.error for t in failed)  # unknown method named
    done = [t for t in result.trials if t.status == "done"]
    assert len(done) == 4 and result.ranked == sorted(done, key=lambda t: t.best_value)
    for t in done:  # each trial is a complete run of its own, with its overrides applied
        cfg = yaml.safe_load((Path(t.directory) / "config.yaml").read_text())
        assert cfg["train"]["lr"] == float(t.overrides["train.lr"])
        assert cfg["method"]["name"] == yaml.safe_load(t.overrides["method"])["name"]
        assert (Path(t.directory) / "adapter" / "adapter_config.json").is_file()
        history = [json.loads(x) for x in (Path(t.directory) / "metrics.jsonl").open()]
        assert t.best_value == pytest.approx(min(r["val_loss"] for r in history
                                                 if "val_loss" in r))
    # a bigger learning rate on this tiny model beats a negligible one, for both methods
    assert float(result.best.overrides["train.lr"]) == 3e-3
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["best"]["index"] == result.best.index and summary["metric"] == "val_loss"
    report = (out / "sweep.md").read_text()
    assert "ranked by val_loss" in report and "nope" in report
    assert (out / "sweep.png").stat().st_size > 0

    # re-run: finished trials are skipped (training would fail loudly here), failures retried
    def no_training(*args, **kwargs):
        raise AssertionError("a finished trial was trained again")

    monkeypatch.setattr("peftlab.training.recipe.run_training", no_training)
    again = peftlab.sweep(_cfg(tiny_chat_model_dir, demo_data_dir, out), grid, progress=False)
    assert [t.best_value for t in again.ranked] == [t.best_value for t in result.ranked]

    record = Path(result.best.directory) / "trial.json"  # a record for other overrides
    data = json.loads(record.read_text())
    record.write_text(json.dumps(dict(data, overrides={"train.lr": "1"})))
    with pytest.raises(ValueError, match="fresh output_dir"):
        peftlab.sweep(_cfg(tiny_chat_model_dir, demo_data_dir, out), grid, progress=False)


def test_sweep_cli(tiny_chat_model_dir, demo_data_dir, tmp_path, capsys):
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(_cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / "s")))
    rc = main(["sweep", str(config), "--grid", "method.r=2,4", "--grid", "train.lr=1e-3,3e-3",
               "--trials", "2", "--set", "train.max_steps=2", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "best:" in text and "| rank | trial | method.r | train.lr |" in text
    trials = sorted(p.name for p in (tmp_path / "s" / "trials").iterdir())
    assert len(trials) == 2
    assert main(["sweep", str(config), "--grid", "train.lr"]) == 2
    assert "expected KEY=VALUE1" in capsys.readouterr().err
