"""``train.report_to``: TensorBoard event files and an MLflow store, written from metrics.jsonl's
records.

``metrics.jsonl`` stays the source of truth; the trackers get a copy of the same records (the
same keys, the same steps) when the run ends, plus, for MLflow, the flattened config as params
and the adapter folder as an artifact. Both packages are optional (the ``tracking`` extra):
:func:`check_trackers` fails before training when a named one is missing.

MLflow writes to a local SQLite store, ``OUTPUT_DIR/mlflow.db``, with artifacts under
``OUTPUT_DIR/mlruns``: MLflow 3 refuses its old file store (``./mlruns`` alone) by default.
Read it with ``mlflow ui --backend-store-uri sqlite:///OUTPUT_DIR/mlflow.db``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peftlab.config import ConfigError

# report_to name -> the module that must be importable, and the pip package providing it
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"),
             "mlflow": ("mlflow", "mlflow-skinny")}
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlruns"
EXPERIMENT = "peftlab"
_NOT_METRICS = ("step",)


def check_trackers(names: list[str]) -> None:
    """Raise a ConfigError now (before training) if a tracker's package is not installed."""
    for name in names:
        module, package = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.report_to: {name!r} needs the {package} package; "
                              f"pip install 'peftlab[tracking]' (or {package}), or remove it")


def mlflow_uri(out: Path) -> str:
    return f"sqlite:///{(Path(out) / MLFLOW_DB).resolve()}"


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{'train': {'lr': 1e-4}}`` -> ``{'train.lr': '0.0001'}`` (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def scalars(history: list[dict[str, Any]]) -> Iterator[tuple[int, str, float]]:
    """(step, key, value) of every number in the records, as metrics.jsonl has them."""
    for record in history:
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key in _NOT_METRICS or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                yield step, key, float(value)


def write_trackers(names: list[str], out: Path, config: dict[str, Any],
                   history: list[dict[str, Any]], adapter_dir: Path | None,
                   run_name: str) -> None:
    """Write the run's records to every tracker in ``names``."""
    if "tensorboard" in names:
        write_tensorboard(out / TENSORBOARD_DIR, history)
    if "mlflow" in names:
        write_mlflow(out, config, history, adapter_dir, run_name)


def write_tensorboard(directory: Path, history: list[dict[str, Any]]) -> None:
    from torch.utils.tensorboard import SummaryWriter  # optional: the tracking extra

    writer = SummaryWriter(log_dir=str(directory))
    try:
        for step, key, value in scalars(history):
            writer.add_scalar(key, value, global_step=step)
    finally:
        writer.close()


def write_mlflow(out: Path, config: dict[str, Any], history: list[dict[str, Any]],
                 adapter_dir: Path | None, run_name: str) -> None:
    # peftlab tracks locally; MLflow's usage telemetry would phone home, so it is off
    # unless the user set the variable themselves.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with _quiet_mlflow():
        from mlflow.entities import Metric, Param  # optional (tracking extra): check_trackers
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_uri(out))
        experiment = client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (experiment.experiment_id if experiment is not None else
                         client.create_experiment(
                             EXPERIMENT,
                             artifact_location=(Path(out) / MLFLOW_ARTIFACTS).resolve().as_uri()))
        run = client.create_run(experiment_id, run_name=run_name)
        run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in flatten(config).items()]
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for step, key, value in scalars(history)]
        for i in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics
            client.log_batch(run_id, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        if adapter_dir is not None and adapter_dir.is_dir():
            client.log_artifacts(run_id, str(adapter_dir), artifact_path="adapter")
        client.set_terminated(run_id)


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow's database set-up logs INFO lines and SQLAlchemy deprecation warnings; peftlab's
    terminal output stays peftlab's."""
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
