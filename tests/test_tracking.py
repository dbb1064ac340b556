"""train.report_to: the TensorBoard event files and the MLflow store hold what metrics.jsonl
holds (read back with tensorboard's EventAccumulator and MlflowClient), the run's status.json
says how it ended, and a tracker named wrong or not installed is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import peftlab
from peftlab.config import ConfigError, from_dict
from peftlab.runtime import tracking
from tests.deps import import_test_dep


def _cfg(model_dir: Path, data: dict[str, Path], out: Path, **train) -> dict:
    return {
        "model": str(model_dir),
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "data": {"train": str(data["train"]), "validation": str(data["validation"]),
                 "max_rows": 32},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 3e-3, "precision": "fp32",
                  "log_every": 2, "eval_every": 2, **train},
        "output_dir": str(out),
    }


def _jsonl_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append((record["step"], float(value)))
    return series


def test_tensorboard_and_mlflow_hold_the_metrics_jsonl_records(tiny_chat_model_dir,
                                                               demo_data_dir, tmp_path):
    import_test_dep("tensorboard")
    import_test_dep("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    peftlab.train(_cfg(tiny_chat_model_dir, demo_data_dir, out,
                       report_to=["tensorboard", "mlflow"]), progress=False)
    expected = _jsonl_scalars(out)
    assert {"loss", "lr", "tokens_per_s", "val_loss"} <= set(expected)

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, points in expected.items():
        got = events.Scalars(key)
        assert [e.step for e in got] == [step for step, _ in points], key
        assert [e.value for e in got] == pytest.approx([v for _, v in points], rel=1e-6), key

    client = MlflowClient(tracking_uri=tracking.mlflow_uri(out))
    (run,) = client.search_runs([client.get_experiment_by_name("peftlab").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.lr"] == "0.003"
    assert run.data.params["method.r"] == "4"
    assert run.data.params["train.report_to"] == "['tensorboard', 'mlflow']"
    for key, points in expected.items():
        history = client.get_metric_history(run.info.run_id, key)
        # MLflow stores a repeated (step, value) once: epoch is in train and val records
        assert sorted({(m.step, m.value) for m in history}) == sorted(set(points)), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= artifacts
    assert json.loads((out / "status.json").read_text())["state"] == "finished"


def test_no_tracker_by_default_and_status_failed_with_its_error(tiny_chat_model_dir,
                                                                demo_data_dir, tmp_path,
                                                                monkeypatch):
    out = tmp_path / "run"
    cfg = _cfg(tiny_chat_model_dir, demo_data_dir, out)

    def broken_plot(*args, **kwargs):
        raise OSError("disk full while drawing\nsecond line")

    monkeypatch.setattr("peftlab.training.recipe.plot_loss_curve", broken_plot)
    with pytest.raises(OSError):
        peftlab.train(cfg, progress=False)
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == "disk full while drawing"
    assert not (out / "tensorboard").exists() and not (out / "mlflow.db").exists()


def test_unknown_tracker_gets_a_did_you_mean(tiny_chat_model_dir):
    with pytest.raises(ConfigError, match=r"train.report_to\[0\]: 'tensorbord' is not one of "
                                          r"\['tensorboard', 'mlflow'\].*tensorboard"):
        from_dict({"model": str(tiny_chat_model_dir), "train": {"report_to": ["tensorbord"]}})


def test_missing_tracker_package_fails_before_training(monkeypatch):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="'mlflow' needs the mlflow-skinny package"):
        tracking.check_trackers(["mlflow"])


def test_flatten_config_for_mlflow_params():
    assert tracking.flatten({"train": {"lr": 1e-4, "x": None}, "model": "m", "e": {}}) == {
        "train.lr": "0.0001", "train.x": "None", "model": "m", "e": "{}"}
