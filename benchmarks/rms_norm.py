"""peftlab's eager-training RMSNorm (runtime/fast_rms_norm.py) vs transformers' LlamaRMSNorm.

Two measurements in one process, alternated so a drifting machine cancels out:
1. one norm's forward + backward at SmolLM2's shape (batch x 256 x 576, fp32, weight frozen as
   under LoRA), rounds of repeats, each side in turn;
2. whole SmolLM2-135M + LoRA (every linear layer) training steps on packed Alpaca, in pairs:
   one step with the model's norms, one with peftlab's, the order flipped every pair; the
   figure is the median of the pairs' time ratios.

    python benchmarks/rms_norm.py             # 3 x 20 norm repeats, 10 step pairs (~4 min)
    python benchmarks/rms_norm.py --pairs 20  # the README's figure

Writes ``benchmarks/results/rms_norm.{json,md}``. Needs ``../shared/data/alpaca`` for the
step pairs (skipped with the reason without it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402  (a sibling script: batches, adapter, machine info)

RESULTS = Path(__file__).resolve().parent / "results"
WIDTH, SEQ = 576, 256  # SmolLM2-135M's hidden size; the training benchmark's row length


def norm_times(batch: int, rounds: int, repeats: int) -> dict[str, list[float]]:
    """Milliseconds per forward + backward of one norm, per round, for both sides."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from peftlab.runtime.fast_rms_norm import FastRMSNorm

    torch.manual_seed(0)
    model_norm = LlamaRMSNorm(WIDTH, eps=1e-5)
    with torch.no_grad():
        model_norm.weight.uniform_(0.5, 1.5)
    model_norm.weight.requires_grad_(False)
    sides = {"transformers": model_norm, "peftlab": FastRMSNorm(model_norm)}
    x = torch.randn(batch, SEQ, WIDTH, requires_grad=True)
    grad = torch.randn(batch, SEQ, WIDTH)
    out = {name: [] for name in sides}
    for r in range(rounds):
        for name in (sides if r % 2 == 0 else reversed(list(sides))):
            norm = sides[name]
            norm(x).backward(grad)  # warm
            start = time.perf_counter()
            for _ in range(repeats):
                norm(x).backward(grad)
            out[name].append((time.perf_counter() - start) / repeats * 1e3)
    return out


def step_pairs(pairs: int, batch: int) -> dict[str, Any]:
    """Paired training steps: (model's norms, peftlab's norms) seconds, order alternating."""
    from peftlab.methods.lora import load_lora
    from peftlab.models import load_model, load_tokenizer
    from peftlab.runtime.cpu_attention import cpu_attention
    from peftlab.runtime.fast_dropout import fast_dropout
    from peftlab.runtime.fast_rms_norm import fast_rms_norm
    from peftlab.runtime.heap import keep_freed_memory
    from peftlab.tasks.sft.task import SFTTask

    keep_freed_memory()  # as the Trainer does on a CPU
    tokenizer = load_tokenizer(tt.MODEL)
    records = tt.read_jsonl(tt.require_file(tt.ALPACA, "Alpaca"), 3000)
    batches = tt.build_sft_batches(tokenizer, records, 3, batch, SEQ, source=str(tt.ALPACA))
    model, _ = load_model(tt.MODEL)
    with tempfile.TemporaryDirectory(prefix="rms-norm-") as tmp:
        tt.make_init_adapter(tt.MODEL, Path(tmp) / "adapter", seed=0)  # peft's LoRA init
        load_lora(model, str(Path(tmp) / "adapter"))
    task = SFTTask(pad_id=tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    calls = 0

    def step(fast: bool) -> float:
        nonlocal calls
        batch_t = {k: v[calls % 3] for k, v in batches.items()}
        calls += 1
        with fast_dropout(model), cpu_attention(model), fast_rms_norm(model, fast):
            start = time.perf_counter()
            loss_sum, count = task.loss(model, batch_t)
            (loss_sum / count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

    step(True), step(False)  # warm both (attention timing, allocator)
    rows = []
    for p in range(pairs):
        order = (False, True) if p % 2 == 0 else (True, False)
        got = {fast: step(fast) for fast in order}
        rows.append({"model_norm_s": round(got[False], 3), "peftlab_norm_s": round(got[True], 3),
                     "ratio": round(got[True] / got[False], 4)})
        print(f"  pair {p + 1}/{pairs}: model's norms {got[False]:.2f} s, peftlab's "
              f"{got[True]:.2f} s ({rows[-1]['ratio']:.3f})", flush=True)
    ratios = [r["ratio"] for r in rows]
    return {"pairs": rows, "median_ratio": statistics.median(ratios),
            "faster_pairs": sum(r < 1 for r in ratios), "batch": batch, "seq_len": SEQ,
            "model": tt.MODEL, "lora_targets": tt.LORA_TARGETS}


def markdown(result: dict[str, Any]) -> str:
    m, norm, steps = result["machine"], result["norm"], result["steps"]
    lines = ["# RMSNorm in eager training: peftlab vs transformers' LlamaRMSNorm", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers "
             f"{m['transformers']}; matmul peaks in this run: bf16 {result['peaks']['bf16']:.0f}, "
             f"fp32 {result['peaks']['fp32']:.0f} GFLOP/s.", "",
             f"One norm, forward + backward, {norm['batch']} x {SEQ} x {WIDTH} fp32, weight "
             f"frozen ({norm['rounds']} alternating rounds of {norm['repeats']}):", "",
             "| side | ms per norm (median of rounds) | rounds |", "|---|---:|---|"]
    for side in ("transformers", "peftlab"):
        ms = norm["ms"][side]
        lines.append(f"| {side} | {statistics.median(ms):.2f} | {', '.join(f'{x:.2f}' for x in ms)} |")
    lines.append("")
    if steps.get("skipped"):
        lines.append(f"Training steps: skipped ({steps['skipped']}).")
    else:
        lines += [f"Training steps ({steps['model']} + LoRA on every linear layer, batch "
                  f"{steps['batch']} x {steps['seq_len']}, fp32, {len(steps['pairs'])} pairs, "
                  "order alternating): peftlab's norms take "
                  f"**{steps['median_ratio']:.3f}x** the step time of the model's (median of the "
                  f"pairs' ratios; {steps['faster_pairs']} of {len(steps['pairs'])} pairs faster)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=10, help="paired training steps (0: none)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    result: dict[str, Any] = {"machine": tt.machine_info(), "peaks": tt.best_matmul_gflops(3)}
    print(f"one norm, {args.rounds} rounds x {args.repeats}", flush=True)
    result["norm"] = {"batch": args.batch_size, "rounds": args.rounds, "repeats": args.repeats,
                      "ms": norm_times(args.batch_size, args.rounds, args.repeats)}
    if args.pairs <= 0:
        result["steps"] = {"skipped": "--pairs 0"}
    elif not tt.ALPACA.is_file():
        result["steps"] = {"skipped": f"{tt.ALPACA} not found (../shared is absent)"}
    else:
        print(f"training steps, {args.pairs} pairs", flush=True)
        result["steps"] = step_pairs(args.pairs, args.batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rms_norm.json").write_text(json.dumps(result, indent=2) + "\n")
    report = markdown(result)
    (args.out / "rms_norm.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
