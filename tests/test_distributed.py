"""Data parallelism (torch.distributed, gloo): 2 ranks x grad_accum 1 must train exactly what
one process trains with grad_accum 2 (same gradient norms at every step, on micro-batches of
unequal token counts); ranks end identical; only rank 0 writes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from peftlab.config import from_dict
from peftlab.models import load_model
from tests.ranks import as_rank, free_port


def _cfg(model_dir: Path, data: dict[str, Path], out: Path, grad_accum: int) -> dict:
    return {"model": str(model_dir),
            "method": {"name": "lora", "r": 4, "alpha": 8},
            "data": {"train": str(data["train"]), "validation": str(data["validation"]),
                     "max_rows": 40},
            # attention: sdpa -- separate processes are compared; attention: auto would time
            # the eager CPU kernel per process, and under load they may pick different ones
            "train": {"max_steps": 4, "batch_size": 4, "grad_accum": grad_accum, "lr": 3e-3,
                      "precision": "fp32", "attention": "sdpa", "log_every": 1, "eval_every": 2,
                      "max_grad_norm": 1.0, "warmup_steps": 0},
            "output_dir": str(out)}


def _train(cfg: dict, state_path: Path) -> None:
    from peftlab.training.recipe import run_training

    model, tok = load_model(cfg["model"])
    run_training(from_dict(cfg), progress=False, model=model, tokenizer=tok)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()
               if "lora_" in n}, str(state_path))


def _rank(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    with as_rank(rank, world, port):
        _train(cfg, Path(out) / f"rank{rank}.safetensors")


def _micro_batch_tokens(cfg: dict, out: Path) -> list[list[int]]:
    """Target tokens of each micro-batch of each step, as the single process groups them
    (with 2 ranks, rank r takes micro-batch r of each step)."""
    from peftlab.methods import get_method
    from peftlab.tasks import build_task
    from peftlab.training.trainer import Trainer

    run = from_dict(cfg)
    model, tok = load_model(cfg["model"])
    prepared = build_task(run, tok)
    get_method("lora").apply(model, run.method, "default")
    trainer = Trainer(model, prepared.task, prepared.train, None, run.train, out, progress=False)
    groups = trainer._step_groups(0)
    return [[prepared.task.count(prepared.task.collate([prepared.train[i] for i in idx]))
             for idx in next(groups)] for _ in range(run.train.max_steps)]


def test_two_ranks_equal_one_process_with_doubled_accumulation(tiny_chat_model_dir,
                                                                demo_data_dir, tmp_path):
    single = _cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / "single", grad_accum=2)
    # The ranks' micro-batches hold different numbers of target tokens, so the right gradient
    # (the token mean over both ranks) differs from the mean of the two ranks' own means.
    tokens = _micro_batch_tokens(single, tmp_path / "count")
    assert all(len(step) == 2 for step in tokens)
    assert all(a != b for a, b in tokens), tokens
    _train(single, tmp_path / "single.safetensors")

    ddp = _cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / "ddp", grad_accum=1)
    mp.spawn(_rank, args=(2, free_port(), ddp, str(tmp_path)), nprocs=2, join=True)

    expected = load_file(str(tmp_path / "single.safetensors"))
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert set(rank0) == set(expected) and len(expected) > 0
    for name, tensor in expected.items():
        torch.testing.assert_close(rank0[name], tensor, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(rank1[name], rank0[name], rtol=0, atol=0)
    saved = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(expected)

    def history(run: str) -> list[dict]:
        return [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").open()]

    one, two = history("single"), history("ddp")  # written once (rank 0), same numbers
    assert [r["step"] for r in one] == [r["step"] for r in two]
    # grad_norm is logged before clipping: the summed gradient itself, not just its direction
    # (clipping to max_grad_norm 1.0 would hide a gradient scaled by the number of ranks)
    assert sum("grad_norm" in r for r in one) == 4
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "val_loss", "epoch", "grad_norm"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-4 * max(1.0, abs(a[key])), (key, a, b)
    assert (tmp_path / "ddp" / "report.md").is_file()
