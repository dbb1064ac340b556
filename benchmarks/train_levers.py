"""Speed levers for SFT training, measured against peftlab's defaults on the same batches.

``train_throughput.py`` compares peftlab's defaults with transformers + peft. This script
re-checks the decisions behind those defaults, so they can be re-made on another machine
(e.g. a CPU with AMX, where bf16 matmuls should win):

* ``auto``    — peftlab's defaults (``precision: auto``, eager PyTorch).
* ``bf16``    — ``precision: bf16``: frozen base stored in bf16 (no fp32 copy), adapters and
  AdamW state in fp32, bf16 autocast.
* ``compile`` — the defaults plus ``torch.compile`` (inductor) of every transformer block. The
  inductor cache lives in a fresh temp dir, so round 1 pays a cold compile and later rounds
  show what a warm on-disk cache costs.
* ``eager``   — the defaults with ``compile: false`` (``auto`` compiles where a run is long
  enough to pay, which depends on the machine's speed).
* ``eager_sdpa`` — eager, with attention always through SDPA's kernel (``train.attention:
  sdpa``) instead of the kernel timed fastest per shape.
* ``compile_sdpa`` — compiled blocks with attention always through SDPA's kernel (what
  inductor calls for it), instead of the kernel timed fastest per shape.

Same model, LoRA, data, optimiser and worker as ``train_throughput.py`` (its helpers are
imported); each configuration runs in its own subprocess, alternating, for ``--repeats`` rounds.

    python benchmarks/train_levers.py --quick     # 4 steps x 1 round, ~4 min
    python benchmarks/train_levers.py             # 8 steps x 2 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import train_throughput as tt
from safetensors.torch import load_file, save_file

LEVERS = {
    "auto": {},
    "bf16": {"precision": "bf16"},
    "compile": {"compile": True},
    "eager": {"compile": False},
    "eager_sdpa": {"compile": False, "attention": "sdpa"},
    "compile_sdpa": {"compile": True, "attention": "sdpa"},
}


def lever_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    res = tt._train_peftlab(cfg, load_file(cfg["batches"]))
    res["peak_rss_mb"] = round(tt._peak_rss_mb(), 1)
    return res


def summarize(runs: dict[str, list[dict[str, Any]]], steps: int) -> dict[str, Any]:
    skip = min(tt.WARMUP_STEPS, steps - 1)
    tps = {c: statistics.median(tt.steady_rates(r, skip)) for c, r in runs.items()}
    return {
        "tokens_per_s": tps,
        "ratio_vs_auto": {c: tt.ratio(v, tps["auto"]) for c, v in tps.items()},
        "precision": {c: r[0]["precision"] for c, r in runs.items()},
        "first_step_seconds": {c: [round(x["step_seconds"][0], 2) for x in r]
                               for c, r in runs.items()},
        "startup_seconds": {c: [round(x["startup_seconds"], 2) for x in r]
                            for c, r in runs.items()},
        "wall_seconds": {c: [round(x["wall_seconds"], 1) for x in r] for c, r in runs.items()},
        "peak_rss_mb": {c: max(x["peak_rss_mb"] for x in r) for c, r in runs.items()},
        "final_loss": {c: statistics.median(x["losses"][-1] for x in r) for c, r in runs.items()},
    }


def markdown(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["summary"]
    lines = [
        "# SFT speed levers (peftlab vs peftlab)",
        "",
        f"{tt.MODEL}, LoRA r=16 on q,k,v,o,gate,up,down, batch {r['batch_size']} x "
        f"{r['seq_len']} packed Alpaca; {r['steps']} steps x {r['repeats']} round(s), median "
        f"tokens/s over steps after the first {min(tt.WARMUP_STEPS, r['steps'] - 1)}. Machine: "
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, AMX: {m['amx_bf16']}, matmul "
        f"peaks bf16 {m.get('bf16_peak_gflops', '?')} / fp32 {m.get('fp32_peak_gflops', '?')} "
        f"GFLOP/s; load "
        f"average {m['loadavg_start'][0]} at start, {r['loadavg_end'][0]} at end.",
        "",
        "| lever | precision | tokens/s | vs auto | first step s (per round) | start-up s | "
        "peak RSS MB | final loss |",
        "|---|---|---:|---:|---|---|---:|---:|",
    ]
    for c in s["tokens_per_s"]:
        lines.append(
            f"| {c} | {s['precision'][c]} | {s['tokens_per_s'][c]:.1f} | "
            f"{s['ratio_vs_auto'][c]:.2f}x | {', '.join(map(str, s['first_step_seconds'][c]))} | "
            f"{', '.join(map(str, s['startup_seconds'][c]))} | {s['peak_rss_mb'][c]:.0f} | "
            f"{s['final_loss'][c]:.4f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 steps x 1 round")
    p.add_argument("--steps", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--levers", nargs="+", choices=sorted(LEVERS), default=list(LEVERS))
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=tt.RESULTS)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # set by train_throughput.spawn
    p.add_argument("--worker-config", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_config:
        tt.run_worker(args, lever_worker)
        return
    steps = args.steps or (4 if args.quick else 8)
    repeats = args.repeats or (1 if args.quick else 2)
    if steps <= tt.WARMUP_STEPS:
        raise SystemExit(f"error: --steps must be > {tt.WARMUP_STEPS}")
    if "auto" not in args.levers:
        args.levers.insert(0, "auto")  # the baseline every ratio is taken against
    tt.require_file(tt.ALPACA, "Alpaca data")
    tt._quiet()
    from peftlab.models import load_tokenizer

    started = time.perf_counter()
    machine = tt.machine_info()
    from peftlab.runtime.precision import matmul_gflops

    peaks = matmul_gflops(repeats=10, budget_s=3.0)  # the machine's state, for the table
    machine.update(bf16_peak_gflops=round(peaks["bf16"], 1),
                   fp32_peak_gflops=round(peaks["fp32"], 1))
    with tempfile.TemporaryDirectory(prefix="peftlab-levers-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor")  # cold in round 1
        batches = tt.build_sft_batches(load_tokenizer(tt.MODEL), tt.read_jsonl(tt.ALPACA),
                                       steps, 8, 256, source=str(tt.ALPACA))
        batches_path = tmp / "batches.safetensors"
        save_file(batches, str(batches_path))
        adapter = tmp / "adapter"
        tt.make_init_adapter(tt.MODEL, adapter, seed=0)
        base = {"model": tt.MODEL, "batches": str(batches_path), "adapter": str(adapter),
                "steps": steps, "lr": 1e-4, "seed": 0}
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in args.levers}
        for rnd in range(repeats):
            for lever in args.levers:
                cfg = dict(base, name=tt.CANDIDATE, **LEVERS[lever])
                res = tt.spawn("lever", cfg, tmp, f"{lever}-{rnd}", args.threads,
                               script=Path(__file__))
                runs[lever].append(res)
                rate = statistics.median(tt.steady_rates([res], min(tt.WARMUP_STEPS, steps - 1)))
                print(f"  [{rnd + 1}/{repeats}] {lever:8s} {rate:7.1f} tok/s  first step "
                      f"{res['step_seconds'][0]:5.1f} s  rss {res['peak_rss_mb']:6.0f} MB  "
                      f"loss {res['losses'][-1]:.4f}", flush=True)
    result = {"model": tt.MODEL, "steps": steps, "repeats": repeats, "batch_size": 8,
              "seq_len": 256, "quick": args.quick, "machine": machine,
              "loadavg_end": [round(x, 2) for x in os.getloadavg()],
              "summary": summarize(runs, steps), "seconds": time.perf_counter() - started}
    report = markdown(result)
    print("\n" + report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_levers.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "train_levers.md").write_text(report + "\n")


if __name__ == "__main__":
    sys.exit(main())
