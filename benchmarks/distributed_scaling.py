"""Tokens/s of full fine-tuning in 1 and 2 processes (1 thread each), DDP and FSDP.

Same code, same model, same per-process batch; the only change is the world size, so the
ratio (2-process tokens/s / 1-process tokens/s) is the scaling. Each run is ``peftlab train``
launched by ``torchrun --standalone`` (gloo on CPU) in its own subprocess. The model is a random
Llama built here (SmolLM2's tokenizer and architecture, narrower and shallower: SmolLM2-135M
itself takes ~15 s per full fine-tuning step on one thread), the data peftlab's demo chat rows.
Step 1 (start-up) is left out; the tokens/s of the later steps are a median.

No reference library: the comparison is 1 vs 2 processes of the same implementation.
The build machine has 2 cores shared with other jobs: 2 processes there compete with
whatever else runs, so the numbers are a floor, not a property of the code.

    python benchmarks/distributed_scaling.py             # 6 steps per run, ~4 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _common import cpu_name
from transformers import AutoConfig, AutoModelForCausalLM

from peftlab.lab.demo_data import write_demo_data
from peftlab.models.embedded import resolve_embedded

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def build_model(directory: Path, hidden: int, layers: int) -> int:
    """A random Llama with SmolLM2-135M's vocabulary and tokenizer; returns its parameters."""
    source = resolve_embedded("smollm2-135m-instruct")
    config = AutoConfig.from_pretrained(source)
    config.update({"hidden_size": hidden, "num_hidden_layers": layers,
                   "intermediate_size": hidden * 8 // 3, "num_attention_heads": hidden // 64,
                   "num_key_value_heads": hidden // 64})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, directory / name)
    return sum(p.numel() for p in model.parameters())


def run(model_dir: Path, data: dict[str, Path], out: Path, mode: str, procs: int, steps: int,
        batch: int, seq: int) -> dict:
    cfg = {"model": str(model_dir), "method": {"name": "full"},
           "data": {"train": str(data["train"])},
           "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-4, "precision": "fp32",
                     "max_length": seq, "log_every": 1, "num_threads": 1, "device": "cpu",
                     "distributed": mode, "save_every": 10_000, "warmup_steps": 0},
           "output_dir": str(out)}
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    torchrun = Path(sys.executable).with_name("torchrun")
    start = time.perf_counter()
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", str(procs),
                           "-m", "peftlab.cli", "train", str(config)],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{mode} x{procs} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").open()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > 1]
    return {"mode": mode, "processes": procs, "tokens_per_s": round(statistics.median(rates), 1),
            "steps": steps, "wall_s": round(wall, 1)}


def table(rows: list[dict]) -> str:
    base = {r["mode"]: r["tokens_per_s"] for r in rows if r["processes"] == 1}
    lines = ["| mode | processes | tokens/s (median, steps 2..N) | scaling vs 1 process | wall s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['processes']} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / base[r['mode']]:.2f}x | {r['wall_s']:.0f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4, help="rows per process per step")
    ap.add_argument("--seq", type=int, default=128, help="train.max_length")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS / "distributed_scaling.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="peftlab-scaling-") as tmp:
        root = Path(tmp)
        params = build_model(root / "model", args.hidden, args.layers)
        data = write_demo_data(root / "data")
        rows = [run(root / "model", data, root / f"{mode}-{procs}", mode, procs, args.steps,
                    args.batch, args.seq)
                for mode in ("ddp", "fsdp") for procs in (1, 2)]
    text = table(rows)
    print(text)
    result = {"rows": rows, "model": {"parameters": params, "hidden": args.hidden,
                                      "layers": args.layers, "vocab": 49152},
              "batch_per_process": args.batch, "max_length": args.seq, "method": "full",
              "cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
              "machine": "shared with other jobs (2 cores); 1 thread per process",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(
        f"# Distributed scaling (full fine-tuning, {params / 1e6:.1f}M-parameter random Llama)\n\n"
        f"{text}\n\nCPU: {result['cpu']} ({result['cores']} cores, shared with other jobs); "
        f"torch {torch.__version__}; {args.batch} rows x max_length {args.seq} per process per "
        "step, 1 thread per process.\n")


if __name__ == "__main__":
    main()
