"""LoRA options at equal steps on real data: PiSSA / OLoRA init vs the default init, LoRA+ vs
plain, NEFTune vs none. `smollm2-135m-instruct` + LoRA r16 all-linear on Alpaca.

    python benchmarks/lora_options.py --threads 1                 # every run (~2 h, shared 2 cores)
    python benchmarks/lora_options.py --runs default pissa        # any subset (merged into JSON)
    python benchmarks/lora_options.py --quick                     # tiny subsets, minutes

Every run trains the same rows in the same order (seed 0) for the same number of steps with the
same lr and schedule; only the option differs. Validation loss on held-out Alpaca rows is
measured every ``--eval-every`` steps and at the end (nothing is selected on it: the adapter of
the last step is the one evaluated). ``default_seed1`` repeats the default with another seed
(LoRA init and batch order), as a measure of run-to-run noise: differences smaller than the
gap between the two default runs are not evidence. Results:
benchmarks/results/lora_options.{json,md}; the resolved config of every run is in
``<work>/<run>/config.yaml`` (``peftlab train`` that file to rerun one alone).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch
from _common import REPO, RESULTS, SHARED, read_jsonl, save_part, write_jsonl

MODEL = "smollm2-135m-instruct"
LORA = {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}
# run name -> (what it is, method options, train options)
RUNS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "default": ("LoRA, default init (A kaiming, B = 0)", {}, {}),
    "default_seed1": ("the same, seed 1 (run-to-run noise)", {}, {"seed": 1}),
    "pissa": ("init: pissa", {"init": "pissa"}, {}),
    "olora": ("init: olora", {"init": "olora"}, {}),
    "lora_plus": ("lora_plus_ratio: 16 (LoRA+)", {"lora_plus_ratio": 16}, {}),
    "neftune": ("train.neftune_alpha: 5 (NEFTune)", {}, {"neftune_alpha": 5.0}),
}


def alpaca(work: Path, n_train: int, n_dev: int) -> dict[str, str]:
    """The same split as benchmarks/applications.py (shuffled with seed 0)."""
    rows = read_jsonl(SHARED / "alpaca" / "alpaca_5000.jsonl")
    random.Random(0).shuffle(rows)
    return {"train": write_jsonl(work / "alpaca_train.jsonl", rows[:n_train]),
            "validation": write_jsonl(work / "alpaca_dev.jsonl",
                                      rows[n_train:n_train + n_dev])}


def config(name: str, data: dict[str, str], work: Path, args: argparse.Namespace) -> dict:
    _, method, train = RUNS[name]
    return {
        "model": MODEL, "task": "sft", "method": {**LORA, **method},
        "data": {**data, "format": "alpaca"},
        # fp32 fixed: `auto` measures matmuls per process, and a busy machine may flip it
        # batch 4 x 2 accumulated = 8 rows per step, at half the activation memory
        "train": {"max_steps": args.steps, "batch_size": 4, "grad_accum": 2, "lr": 3e-4,
                  "max_length": 512,
                  "precision": "fp32", "seed": 0, "warmup_ratio": 0.05, "log_every": 5,
                  "eval_every": args.eval_every, "num_threads": args.threads, **train},
        "eval": {"batch_size": 4},
        "output_dir": str(work / name),
    }


def run_one(name: str, data: dict[str, str], work: Path, args: argparse.Namespace) -> dict:
    import peftlab

    cfg = config(name, data, work, args)
    t0 = time.perf_counter()
    summary = peftlab.train(cfg, progress=True, overwrite=True)
    seconds = time.perf_counter() - t0
    history = summary.result.history
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    train = [r["loss"] for r in history if "loss" in r]
    return {"what": RUNS[name][0], "steps": summary.result.steps, "seconds": round(seconds, 1),
            "train_seconds": round(summary.result.seconds, 1),
            "train_examples": summary.data_report.get("train", {}).get("kept"),
            "val_examples": summary.data_report.get("validation", {}).get("kept"),
            "val_curve": val, "final_val_loss": val[-1][1] if val else None,
            "last_train_losses": train[-4:], "trainable_params": summary.trainable_params,
            "method": cfg["method"], "train": {k: cfg["train"][k] for k in
                                               ("max_steps", "batch_size", "lr", "seed")}}


def base_loss(data: dict[str, str], work: Path, args: argparse.Namespace) -> float:
    """Validation loss of the base model (no adapter) on the same rows."""
    import peftlab

    cfg = config("default", data, work, args)
    cfg["output_dir"] = str(work / "base_eval")  # holds no adapter: the base model alone
    return peftlab.evaluate(cfg)["base"]["val_loss"]


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def write_tables(results: dict) -> str:
    base = results.get("base", {})
    runs = {k: results[k] for k in RUNS if k in results}  # in RUNS order, however written
    out = ["# LoRA options at equal steps (Alpaca)", ""]
    if not runs:
        return "\n".join(out)
    first = next(iter(runs.values()))
    out += [f"`{MODEL}` + LoRA r16 alpha 32 all-linear; {first['train_examples']} Alpaca rows, "
            f"8 rows per step (4 x 2 accumulated), {first['steps']} steps, lr 3e-4 (cosine, 5% warm-up), seed 0; validation "
            f"loss on {first['val_examples']} held-out rows (no selection: last step). "
            f"Base model (no adapter): val loss {base.get('val_loss', '?')}.", ""]
    ref = runs.get("default")
    steps = [s for s, _ in first["val_curve"]]
    out += ["| run | " + " | ".join(f"val loss @ {s}" for s in steps)
            + " | vs default (final) | train time | time vs default |",
            "|---|" + "---:|" * len(steps) + "---:|---:|---:|"]
    for name, r in runs.items():
        curve = " | ".join(f"{v:.4f}" for _, v in r["val_curve"])
        delta = (f"{r['final_val_loss'] - ref['final_val_loss']:+.4f}" if ref and name != "default"
                 else "")
        rel = f"{r['train_seconds'] / ref['train_seconds']:.2f}x" if ref else ""
        out.append(f"| {name}: {r['what']} | {curve} | {delta} | {r['train_seconds'] / 60:.1f} min "
                   f"| {rel} |")
    machines = {r.get("machine", {}).get("cpu") for r in runs.values()}
    loads = [x for r in runs.values() for x in (r.get("machine", {}).get("loadavg_start", [0])[0],
                                                  r.get("loadavg_end", [0])[0])]
    out += ["", f"Machine: {', '.join(sorted(m for m in machines if m))}, "
            f"{first.get('machine', {}).get('cores')} cores, shared with other jobs (load average "
            f"{min(loads):.1f}-{max(loads):.1f} during the runs); train.num_threads "
            f"{first.get('threads')}. Times are wall-clock on that shared machine: compare ratios, "
            "not minutes.", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="default 40 (quick: 4)")
    ap.add_argument("--eval-every", type=int, default=None, help="default 20 (quick: 2)")
    ap.add_argument("--no-base", action="store_true", help="skip the base model's val loss")
    ap.add_argument("--tables", action="store_true",
                    help="only rewrite the Markdown from the JSON results (runs nothing)")
    ap.add_argument("--work", default=str(REPO / "runs" / "bench_lora_options"))
    ap.add_argument("--results", default=str(RESULTS / "lora_options.json"))
    args = ap.parse_args()
    if args.tables:
        path = Path(args.results)
        path.with_suffix(".md").write_text(write_tables(json.loads(path.read_text())))
        return
    args.steps = args.steps or (4 if args.quick else 40)
    args.eval_every = args.eval_every or (2 if args.quick else 20)
    if not (SHARED / "alpaca").is_dir():
        raise SystemExit(f"needs the shared data sets in {SHARED}")
    if args.threads:
        torch.set_num_threads(args.threads)  # the base evaluation too, not only training
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = Path(args.results)
    data = alpaca(work, 32 if args.quick else 400, 16 if args.quick else 150)
    if not args.no_base:
        print(save_part(path, "base", {"val_loss": round(base_loss(data, work, args), 4)},
                        write_tables))
    for name in args.runs:
        machine = machine_info()
        result = run_one(name, data, work, args)
        result.update(machine=machine, threads=args.threads, quick=args.quick,
                      loadavg_end=[round(x, 2) for x in os.getloadavg()])
        print(save_part(path, name, result, write_tables))


if __name__ == "__main__":
    main()
