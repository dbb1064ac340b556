"""peftlab ui's JSON API without a browser: the form's bad input gets the CLI's messages, run
status is read from the files a run writes (a killed run is "stopped", a half-written metrics
line waits for the next poll), compare ranks by each run's best metric, chat refuses a run it
cannot answer with, and the UI binds to loopback unless told otherwise."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from peftlab.cli import main
from peftlab.config import ConfigError, load_config
from peftlab.ui import runs as run_files
from peftlab.ui.app import make_app
from peftlab.ui.jobs import JobQueue


@pytest.fixture
def client(tmp_path):
    app = make_app(tmp_path / "runs")
    with TestClient(app) as c:
        yield c


def _form(model: str, **values: str) -> dict:
    return {"name": "r1", "model": model, "task": "sft", "method": "lora", "values": values}


def _cli_message(tmp_path: Path, raw: dict) -> str:
    """What ``peftlab train`` says about the same config in a YAML file (after the file name)."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return str(err.value).removeprefix(f"{path}: ")


def test_form_errors_read_as_the_cli_does(client, tmp_path):
    bad_key = client.post("/api/jobs", json={**_form("m"), "yaml": "trian: {lr: 1}"})
    assert bad_key.status_code == 400
    assert bad_key.json()["error"] == "config: " + _cli_message(
        tmp_path, {"model": "m", "trian": {"lr": 1}})

    bad_value = client.post("/api/jobs", json=_form("m", **{"train.lr": "fast"}))
    with pytest.raises(ConfigError) as err:
        load_config(base={"model": "m"}, overrides=["train.lr=fast"])
    assert bad_value.json()["error"] == str(err.value) == "train.lr: expected a number, got 'fast'"

    bad_method_key = client.post("/api/jobs", json=_form("m", **{"method.rank": "8"}))
    assert "method: unknown key 'rank' (did you mean 'r'?)" in bad_method_key.json()["error"]
    no_model = client.post("/api/jobs", json=_form(""))
    assert no_model.json()["error"].startswith("config: 'model' is required")
    bad_name = client.post("/api/jobs", json={**_form("m"), "name": "../x"})
    assert "run name '../x'" in bad_name.json()["error"]
    assert client.get("/api/runs").json()["jobs"] == []  # nothing was queued


def test_an_earlier_run_is_protected_as_in_the_cli(client):
    root = Path(client.app.state.root)
    (root / "r1").mkdir(parents=True)
    (root / "r1" / "config.yaml").write_text("model: m\n")
    resp = client.post("/api/jobs", json=_form("m"))
    assert resp.status_code == 400
    assert "holds an earlier run (config.yaml); continue it with --resume, replace it with " \
           "--overwrite" in resp.json()["error"]


def test_status_from_the_files_a_run_writes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert run_files.status(run)["state"] == "unknown"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": dead.pid}))
    assert run_files.status(run)["state"] == "stopped"
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": os.getpid()}))
    assert run_files.status(run)["state"] == "running"
    (run / "status.json").write_text(json.dumps({"state": "failed", "error": "boom"}))
    assert run_files.status(run) == {"state": "failed", "error": "boom"}


def test_metrics_poll_returns_only_complete_new_lines(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
                                       '{"step": 3, "lo')
    records, nxt = run_files.read_metrics(run)
    assert [r["step"] for r in records] == [1, 2] and nxt == 2
    with (run / "metrics.jsonl").open("a") as f:
        f.write('ss": 1.2}\n')
    records, nxt = run_files.read_metrics(run, nxt)
    assert records == [{"step": 3, "loss": 1.2}] and nxt == 3


def _fake_run(root: Path, name: str, val: list[float], metric: str = "val_loss") -> None:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"model": "m", "task": "sft", "method": {"name": "lora"},
         "train": {"best_metric": metric}}))
    lines = [{"step": i + 1, metric: v} for i, v in enumerate(val)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_compare_ranks_by_each_runs_best_metric(client):
    root = Path(client.app.state.root)
    _fake_run(root, "sweep/a", [3.0, 1.0, 2.0])
    _fake_run(root, "sweep/b", [2.5, 1.5])
    _fake_run(root, "c", [])
    listed = [r["name"] for r in client.get("/api/runs").json()["runs"]]
    assert listed == ["c", "sweep/a", "sweep/b"]
    data = client.get("/api/compare", params={"run": ["sweep/b", "c", "sweep/a"]}).json()
    assert [(r["name"], r["best_value"], r["best_step"]) for r in data["runs"]] == [
        ("sweep/a", 1.0, 2), ("sweep/b", 1.5, 2), ("c", None, None)]
    assert len(data["metrics"]["sweep/a"]) == 3
    _fake_run(root, "acc/x", [0.5, 0.9, 0.7], metric="val_accuracy")
    _fake_run(root, "acc/y", [0.8], metric="val_accuracy")
    ranked = client.get("/api/compare", params={"run": ["acc/y", "acc/x"]}).json()["runs"]
    assert [(r["name"], r["best_value"]) for r in ranked] == [("acc/x", 0.9), ("acc/y", 0.8)]
    assert client.get("/api/compare", params={"run": ["../etc"]}).status_code == 404


def test_chat_refuses_runs_it_cannot_answer_with(client):
    root = Path(client.app.state.root)
    run = root / "cls"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text("model: m\ntask: classification\n")
    resp = client.post("/api/chat", json={"run": "cls", "prompt": "hi"})
    assert resp.status_code == 400
    assert "chat: run 'cls' is a 'classification' run" in resp.json()["error"]
    _fake_run(root, "unfinished", [1.0])
    resp = client.post("/api/chat", json={"run": "unfinished", "prompt": "hi"})
    assert "has no saved adapter yet" in resp.json()["error"]


def test_schema_lists_methods_tasks_and_train_keys(client):
    schema = client.get("/api/schema").json()
    assert {"lora", "ia3", "prompt_tuning"} <= set(schema["methods"])
    assert "sft" in schema["tasks"] and "smollm2-135m-instruct" in [
        m["name"] for m in schema["models"]]
    train = {f["key"]: f for f in schema["sections"]["train"]}
    assert train["train.lr"]["type"] == "float" and train["train.lr"]["default"] == 2e-4
    assert train["train.scheduler"]["choices"] == ["cosine", "linear", "constant"]
    assert train["train.report_to"]["type"] == "list"
    assert "classification" in schema["sections"]  # a task's own section
    assert client.get("/").text.startswith("<!doctype html>")


def test_ui_refuses_a_non_loopback_host_without_the_flag(capsys, tmp_path):
    assert main(["ui", "--runs", str(tmp_path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftlab ui: error: --host 0.0.0.0: the UI starts training runs")
    assert "--allow-remote" in err


def test_ui_refuses_a_runs_folder_that_does_not_exist(capsys, tmp_path):
    missing = tmp_path / "typo"
    assert main(["ui", "--runs", str(missing)]) == 2
    assert capsys.readouterr().err.startswith(f"peftlab ui: error: --runs {missing}: not a folder")
    assert not missing.exists()  # nothing created for a mistyped folder


def test_queue_runs_one_job_at_a_time_and_stop_interrupts_it(tmp_path, tiny_chat_model_dir,
                                                            monkeypatch):
    """A module that sleeps stands in for ``peftlab.cli``. SIGINT is ignored here, as in a UI
    started in the background; stop must still interrupt the job (SIGINT, not the SIGKILL
    after the grace period)."""
    (tmp_path / "slow_job.py").write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr("peftlab.ui.jobs.STOP_GRACE_SECONDS", 20.0)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the job
    queue = JobQueue(tmp_path / "runs", module="slow_job")
    try:
        raw = {"model": str(tiny_chat_model_dir)}
        first, second = queue.submit(raw, "one"), queue.submit(raw, "two")
        with pytest.raises(ConfigError, match="'one' is already queued or running"):
            queue.submit(raw, "one")
        deadline = time.monotonic() + 30
        while first.state != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (first.state, second.state) == ("running", "queued")
        time.sleep(1.5)  # the child has set its Ctrl-C handler
        queue.stop(second.id)
        assert second.state == "stopped"
        queue.stop(first.id)
        while first.state == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.state == "stopped" and first.returncode == -signal.SIGINT
        assert second.state == "stopped" and second.pid is None  # never started
    finally:
        queue.close()
        signal.signal(signal.SIGINT, previous)
