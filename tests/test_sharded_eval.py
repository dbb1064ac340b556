"""Validation loss and generation sharded over 2 ranks (gloo) give rank 0 the numbers and
answers one process computes; each rank does only its share of the batches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from peftlab.config import from_dict
from peftlab.evaluation.loss import evaluate_loss
from peftlab.evaluation.text_metrics import (
    generation_report,
    sharded_generate,
    split_prompt_reference,
)
from peftlab.models import load_model
from peftlab.runtime.distributed import World
from peftlab.tasks import build_task
from tests.ranks import free_port

BATCH = 4  # 8 validation batches of the 31 examples (the last one short): 4 per rank


def _cfg(model_dir: Path, data: dict[str, Path]) -> dict:
    return {"model": str(model_dir), "method": {"name": "lora"},
            "data": {"train": str(data["train"]), "validation": str(data["validation"]),
                     "max_rows": 8},
            "train": {"precision": "fp32", "device": "cpu"}, "output_dir": "unused"}


def _evaluate(cfg: dict, world: World) -> dict | None:
    model, tok = load_model(cfg["model"])
    torch.manual_seed(0)  # the same noise in every process: varied answers from the tiny model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    prepared = build_task(from_dict(cfg), tok)
    val = prepared.validation
    calls: list[int] = []
    loss = prepared.task.loss

    def counted(model, batch):  # how many batches this rank evaluates
        calls.append(1)
        return loss(model, batch)

    prepared.task.loss = counted
    # FSDP's lockstep: 31 rows in batches of 5 are 7 batches, rank 1 pads its 3 to 4 passes
    locked = evaluate_loss(model, prepared.task, val, 5, "fp32", world=world, lockstep=True)
    lock_calls = len(calls)
    calls.clear()
    mean = evaluate_loss(model, prepared.task, val, BATCH, "fp32", world=world)
    report = generation_report(model, tok, val, max_new_tokens=6, batch_size=BATCH,
                               samples=None, world=world)
    prompts = [split_prompt_reference(ex)[0] for ex in val]  # the token ids generated
    rows = sharded_generate(model, tok, prompts, 6, BATCH, world)
    return {"examples": len(val), "loss": mean, "batches": len(calls), "rows": rows,
            "locked": locked, "lock_calls": lock_calls,
            "report": report}


def _rank(rank: int, port: int, cfg: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = _evaluate(cfg, World(rank, 2))
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_ranks_evaluate_what_one_process_does(tiny_chat_model_dir, demo_data_dir, tmp_path):
    cfg = _cfg(tiny_chat_model_dir, demo_data_dir)
    one = _evaluate(cfg, World())
    assert one["examples"] == 31 and one["batches"] == 8
    assert len({tuple(r) for r in one["rows"]}) > 1  # answers differ: an order mix-up shows
    mp.spawn(_rank, args=(free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (rank0["batches"], rank1["batches"]) == (4, 4)  # a share each, none twice
    for r in (rank0, rank1):  # every rank gets the summed loss
        torch.testing.assert_close(r["loss"], one["loss"])
        torch.testing.assert_close(r["locked"], one["locked"])  # padding passes not counted
    assert (one["lock_calls"], rank0["lock_calls"], rank1["lock_calls"]) == (7, 4, 4)
    assert rank0["rows"] == one["rows"]
    assert rank0["report"] == one["report"]
    assert rank1["rows"] is None and rank1["report"] is None  # rank 0 gathers
