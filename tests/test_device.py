"""train.device: resolution (CUDA/MPS availability monkeypatched; no GPU here), the config
check, and that the Trainer and evaluation put batches on the resolved device (the meta device
stands in for a GPU: a batch left on the CPU would show up as a CPU tensor)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from peftlab.config import ConfigError, TrainConfig, from_dict
from peftlab.evaluation.loss import evaluate_loss
from peftlab.runtime import device as dev
from peftlab.runtime.distributed import World
from peftlab.tasks.base import Task
from peftlab.training.trainer import Trainer


def _machine(monkeypatch, cuda: int = 0, mps: bool = False) -> None:
    monkeypatch.setattr(dev, "_cuda_available", lambda: cuda > 0)
    monkeypatch.setattr(dev, "_mps_available", lambda: mps)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)


def test_auto_picks_this_ranks_gpu_then_mps_then_cpu(monkeypatch):
    _machine(monkeypatch, cuda=2)
    assert dev.resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert dev.resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert dev.resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    _machine(monkeypatch, mps=True)
    assert dev.resolve_device("auto") == torch.device("mps")
    _machine(monkeypatch)
    assert dev.resolve_device("auto", local_rank=1) == torch.device("cpu")
    assert dev.backend_for(torch.device("cuda", 0)) == "nccl"
    assert dev.backend_for(torch.device("cpu")) == "gloo"


@pytest.mark.parametrize(("spec", "cuda", "message"), [
    ("cuda", 0, "CUDA is not available"),
    ("cuda:1", 0, "CUDA is not available"),
    ("cuda:2", 2, "has 2 CUDA device(s)"),
    ("mps", 0, "'mps' is not available"),
])
def test_a_device_this_machine_lacks_is_a_config_error(monkeypatch, spec, cuda, message):
    _machine(monkeypatch, cuda=cuda)
    with pytest.raises(ConfigError, match="^train.device: ") as err:
        dev.resolve_device(spec)
    assert message in str(err.value)


def test_config_checks_device_and_distributed_keys():
    with pytest.raises(ConfigError, match=r"train.device: 'cuda1' .*did you mean 'cuda'"):
        from_dict({"model": "m", "method": {"name": "lora"}, "data": {"train": "t.jsonl"},
                   "train": {"device": "cuda1"}})
    with pytest.raises(ConfigError, match=r"train.distributed: 'fsdp2' .*did you mean 'fsdp'"):
        from_dict({"model": "m", "method": {"name": "lora"}, "data": {"train": "t.jsonl"},
                   "train": {"distributed": "fsdp2"}})
    cfg = from_dict({"model": "m", "method": {"name": "lora"}, "data": {"train": "t.jsonl"},
                     "train": {"device": "cuda:3"}})
    assert cfg.train.device == "cuda:3" and cfg.train.distributed == "ddp"


def test_to_device_walks_nested_batches():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "n": 3,
             "pair": (torch.zeros(1), [torch.zeros(2), "text"])}
    moved = dev.to_device(batch, torch.device("meta"))
    assert moved["input_ids"].is_meta and moved["input_ids"].dtype == torch.long
    assert moved["pair"][0].is_meta and moved["pair"][1][0].is_meta
    assert moved["n"] == 3 and moved["pair"][1][1] == "text"
    assert not batch["input_ids"].is_meta  # the input is not changed


class _DeviceRecordingTask(Task):
    """Loss = weight . mean(x); records the device of every batch tensor it is given."""

    def __init__(self) -> None:
        self.seen: list[torch.device] = []

    def length(self, example: dict[str, Any]) -> int:
        return 1

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"x": torch.stack([e["x"] for e in examples])}

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["x"].shape[0])

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        self.seen.append(batch["x"].device)
        if batch["x"].is_meta:  # a stand-in for a GPU batch: no numbers to compute
            if model.weight.is_meta:
                return torch.tensor(1.0), self.count(batch)
            return model.weight.sum() * 0 + 1.0, self.count(batch)
        return (model(batch["x"])).sum(), self.count(batch)


def test_trainer_and_evaluation_move_batches_to_the_device(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    task = _DeviceRecordingTask()
    examples = [{"x": torch.randn(3)} for _ in range(8)]
    cfg = TrainConfig(max_steps=2, batch_size=4, lr=1e-2, precision="fp32", warmup_steps=0,
                      log_every=1)
    trainer = Trainer(model, task, examples, None, cfg, tmp_path / "meta", progress=False,
                      world=World(device=torch.device("meta")))
    trainer.fit()
    assert task.seen and all(d.type == "meta" for d in task.seen)

    task.seen.clear()  # on the CPU: real numbers, and the optimizer state beside the weights
    trainer = Trainer(model, task, examples, None, cfg, tmp_path / "cpu", progress=False,
                      world=World(device=torch.device("cpu")))
    trainer.fit()
    state = trainer.optimizer.state[model.weight]
    assert state["exp_avg"].device.type == "cpu" and state["exp_avg"].abs().sum() > 0
    assert all(d.type == "cpu" for d in task.seen)

    task.seen.clear()  # evaluation follows the model's device
    evaluate_loss(model.to("meta"), task, examples, 4, "fp32")
    assert len(task.seen) == 2 and all(d.type == "meta" for d in task.seen)
