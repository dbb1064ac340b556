"""How cost grows: peftlab vs transformers + peft over model size and sequence length.

Model sizes: SmolLM2-135M (the embedded model, real weights) and Llama configs shaped like
SmolLM2-360M and SmolLM2-1.7B with random weights built in the worker (no download; speed and
memory do not depend on the weights' values). Sequence lengths 256 / 1024 / 2048 at a fixed
2,048 tokens per step (batch 8 / 2 / 1), so a row shows what longer sequences cost per token.
Random token ids, every token labelled (the pre-training case: the LM head runs on all of them
for both sides).

* ``peftlab``: peftlab's defaults (precision ``auto``; ``train.compile: auto`` decided as for a
  50-step run), LoRA r=16 on every linear layer, Trainer + SFTTask.
* ``peer``: transformers + peft, the same LoRA, bf16 autocast, eager (the usual user setup);
  in fp32 on a CPU whose bf16 matmuls run far below its fp32 ones (no bf16 instructions: one
  bf16 step would take minutes), the only setup a user would run there (``peer_precision``).
* ``peftlab_ckpt``: peftlab + ``train.activation_checkpointing`` (at the longest sequence of each
  size only: the setting for when memory runs out; ``compile: auto`` decided as for ``peftlab``).

Each cell runs in its own subprocess (peak RSS is its own). "Fits in 24 GB" is an estimate, not
a run to exhaustion: resident memory after the model is built (``model_mb``) plus the measured
training growth per token (peak minus ``model_mb``, over 2,048 tokens) scaled to 24 GB.

A cell whose worker dies (the kernel's out-of-memory killer, on a 24 GB machine) is recorded
as such -- "does not fit" is a measurement too -- and the run goes on.

    python benchmarks/scaling.py --quick     # 135M and 360M, 2 timed steps
    python benchmarks/scaling.py             # + 1.7B
    python benchmarks/scaling.py --sizes 1.7B --merge   # re-measure cells, keep the others
    python benchmarks/scaling.py --configs peftlab_ckpt --merge   # only these configurations

Every cell records the machine state that measured it (``measured_on``: CPU and both matmul
peaks), so a merged file -- merged again and again -- still says which run measured which cell.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import train_throughput as tt
from safetensors.torch import load_file, save_file

RESULTS = tt.RESULTS
TOKENS_PER_STEP = 2048
SEQ_LENS = (256, 1024, 2048)
BUDGET_MB = 24 * 1024
# SmolLM2's own shapes (its config.json files), random weights
SHAPES: dict[str, dict[str, Any] | None] = {
    "135M": None,  # the embedded smollm2-135m-instruct, real weights
    "360M": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
             "num_attention_heads": 15, "num_key_value_heads": 5},
    "1.7B": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
             "num_attention_heads": 32, "num_key_value_heads": 32},
}
COMMON = {"vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 100000.0,
          "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
CONFIGS = ("peftlab", "peer", "peftlab_ckpt")


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> None:
    """Start a new peak (Linux: "5" to clear_refs resets VmHWM), so the training peak is not
    the transient of loading fp32 weights and converting them."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_since_reset_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def build_model(size: str):
    """(model, vocab size): the embedded 135M or a random SmolLM2-shaped Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab.models import load_model

    if SHAPES[size] is None:
        model, tokenizer = load_model(tt.MODEL)
        return model, len(tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(**COMMON, **SHAPES[size])
    return LlamaForCausalLM(config), config.vocab_size


def n_params(size: str) -> int:
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    from peftlab.models import resolve_spec

    config = (AutoConfig.from_pretrained(resolve_spec(tt.MODEL)) if SHAPES[size] is None
              else LlamaConfig(**COMMON, **SHAPES[size]))
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one (config, size, seq) cell for cfg["steps"] steps; timings and memory."""
    batches = load_file(cfg["batches"])
    model, _ = build_model(cfg["size"])
    name, steps = cfg["name"], cfg["steps"]
    clock = tt.step_clock(cfg)
    gc.collect()
    if name == "peer":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=tt.LORA_TARGETS))
        model_mb = _rss_now_mb()
        _reset_peak_rss()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=1e-4)
        model.train()
        seconds, losses = [], []
        autocast = cfg.get("peer_precision", "bf16-autocast") == "bf16-autocast"
        for t in range(steps):
            start = clock()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=batches["input_ids"][t],
                             labels=batches["labels"][t]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds.append(clock() - start)
            losses.append(float(loss.detach()))
        precision, compiled = "bf16-autocast" if autocast else "fp32", False
    else:
        from peftlab.config import TrainConfig
        from peftlab.methods import get_method
        from peftlab.methods.lora import LoraConfig
        from peftlab.runtime.precision import prepare_precision, resolve_precision
        from peftlab.tasks.sft.task import SFTTask
        from peftlab.training.compile import resolve_compile
        from peftlab.training.trainer import Trainer

        torch.manual_seed(0)
        get_method("lora").apply(model, LoraConfig(r=16, alpha=32, target_modules=tt.LORA_TARGETS),
                                 "default")
        precision = resolve_precision("auto")
        prepare_precision(model, precision)
        gc.collect()
        model_mb = _rss_now_mb()
        _reset_peak_rss()
        tcfg = TrainConfig(max_steps=steps, batch_size=1, lr=1e-4, scheduler="constant",
                           warmup_steps=0, max_grad_norm=None, precision=precision,
                           log_every=steps, save_every=10**9, seed=0,
                           activation_checkpointing=name == "peftlab_ckpt")
        # as auto would for a 50-step run: its timed half (eager steps of >= 4 s here, x 48
        # steps >= AUTO_MIN_SECONDS) passes wherever the up-front checks do
        tcfg.compile = resolve_compile(tcfg, model, 50, TOKENS_PER_STEP)[0] is not False
        compiled = bool(tcfg.compile)
        task = tt.FixedBatchTask(SFTTask(pad_id=0), {**batches, "attention_mask": torch.ones_like(
            batches["input_ids"])}, clock)
        trainer = Trainer(model, task, [{"index": i} for i in range(steps)], None, tcfg,
                          cfg["out_dir"], progress=False)
        ends: list[float] = []
        trainer.optimizer.register_step_post_hook(lambda *_: ends.append(clock()))
        trainer.fit()
        seconds = [e - s for s, e in zip(task.starts, ends, strict=True)]
        losses = task.losses
    return {"name": name, "size": cfg["size"], "seq_len": cfg["seq_len"],
            "precision": precision, "compiled": compiled, "step_seconds": seconds,
            "losses": losses, "model_mb": round(model_mb),
            "peak_rss_mb": round(_peak_rss_since_reset_mb()),  # training only, model included
            "peak_rss_with_load_mb": round(tt._peak_rss_mb())}


def make_batches(vocab: int, seq_len: int, steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    batch = TOKENS_PER_STEP // seq_len
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (steps, batch, seq_len), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def fits_tokens(cell: dict[str, Any]) -> int | None:
    """Tokens per step that fit in 24 GB at this sequence length (linear in the batch)."""
    growth = cell["peak_rss_mb"] - cell["model_mb"]
    if growth <= 0:
        return None
    return int(TOKENS_PER_STEP * (BUDGET_MB - cell["model_mb"]) / growth)


def failed_cell(cfg: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
    """The record of a worker that died: killed by signal 9 is the out-of-memory killer."""
    rc = res["returncode"]
    error = "killed: out of memory" if rc in (-9, 137) else f"failed (exit {rc})"
    return {"name": cfg["name"], "size": cfg["size"], "seq_len": cfg["seq_len"],
            "error": error, "log_tail": res["log_tail"][-2000:]}


def merged(old: list[dict[str, Any]], cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cells of an earlier result that this run did not re-measure, then this run's."""
    new = {(c["name"], c["size"], c["seq_len"]) for c in cells}
    return [c for c in old if (c["name"], c["size"], c["seq_len"]) not in new] + cells


def measured_on(machine: dict[str, Any], bf16: float, fp32: float) -> dict[str, Any]:
    """The machine state a cell was measured in: what its tokens/s may be compared with."""
    return {"cpu": machine["cpu"], "bf16_peak_gflops": round(bf16, 1),
            "fp32_peak_gflops": round(fp32, 1)}


def earlier_runs(cells: list[dict[str, Any]], here: dict[str, Any]) -> list[dict[str, Any]]:
    """The cells some other run measured, grouped by that run's machine state."""
    groups: list[dict[str, Any]] = []
    for c in cells:
        state = c.get("measured_on", here)
        if state == here:
            continue
        group = next((g for g in groups if g["measured_on"] == state), None)
        if group is None:
            group = {"measured_on": state, "cells": []}
            groups.append(group)
        group["cells"].append([c["name"], c["size"], c["seq_len"]])
    return groups


def summarize(cells: list[dict[str, Any]], skip: int) -> list[dict[str, Any]]:
    rows = []
    keys = sorted({(c["size"], c["seq_len"]) for c in cells},
                  key=lambda k: (list(SHAPES).index(k[0]), k[1]))
    for size, seq in keys:
        row: dict[str, Any] = {"size": size, "seq_len": seq, "batch": TOKENS_PER_STEP // seq}
        for c in cells:
            if (c["size"], c["seq_len"]) != (size, seq):
                continue
            if "error" in c:
                row[c["name"]] = {"error": c["error"]}
                continue
            timed = c["step_seconds"][skip:] or c["step_seconds"][-1:]
            row[c["name"]] = {"tokens_per_s": TOKENS_PER_STEP / statistics.median(timed),
                              "first_step_s": round(c["step_seconds"][0], 1),
                              "peak_rss_mb": c["peak_rss_mb"], "model_mb": c["model_mb"],
                              "fits_tokens_24gb": fits_tokens(c), "compiled": c["compiled"],
                              "precision": c["precision"], "final_loss": c["losses"][-1]}
        if "tokens_per_s" in row.get("peftlab", {}) and "tokens_per_s" in row.get("peer", {}):
            row["ratio"] = row["peftlab"]["tokens_per_s"] / row["peer"]["tokens_per_s"]
            row["rss_ratio"] = row["peftlab"]["peak_rss_mb"] / row["peer"]["peak_rss_mb"]
        rows.append(row)
    return rows


def peer_precision(peaks: dict[str, float]) -> tuple[str, str | None]:
    """(the peer's precision, why it is not bf16 autocast or None)."""
    if peaks["bf16"] >= tt.BF16_RUNNABLE * peaks["fp32"]:
        return "bf16-autocast", None
    return "fp32", (f"bf16 matmuls run at {peaks['bf16']:.1f} GFLOP/s here against fp32 "
                    f"{peaks['fp32']:.0f} (no bf16 instructions): the peer runs in fp32")


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    peer = result.get("peer_precision", "bf16-autocast").replace("bf16-autocast", "bf16 autocast")
    lines = [
        f"# How cost grows: peftlab vs transformers + peft ({peer})",
        "",
        f"LoRA r=16 on q,k,v,o,gate,up,down; {TOKENS_PER_STEP} tokens per step (batch x "
        f"sequence), random tokens, all labelled; {result['steps']} steps per cell, median "
        f"after the first {result['skip']}, timed by "
        f"{'CPU time at 1 thread' if result.get('clock') == 'cpu' else 'wall clock'}. "
        f"Machine: {m['cpu']}, {m['cores']} cores, torch "
        f"{m['torch']}; matmul peaks fp32 {result['fp32_peak_gflops']:.0f}, bf16 "
        f"{result['bf16_peak_gflops']:.0f} GFLOP/s; load average {m['loadavg_start'][0]} at "
        f"start, {m['loadavg_end'][0]} at end.",
        "",
        "| model | seq x batch | peftlab tok/s | peer tok/s | ratio | peftlab peak RSS GB | "
        "peer peak RSS GB | + act. ckpt tok/s | + act. ckpt RSS GB | tokens/step in 24 GB "
        "(peftlab / + ckpt / peer) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def gb(x: dict[str, Any] | None) -> str:
        return "–" if x is None or "error" in x else f"{x['peak_rss_mb'] / 1024:.1f}"

    def tps(x: dict[str, Any] | None) -> str:
        if x is not None and "error" in x:
            return x["error"]
        return "–" if x is None else f"{x['tokens_per_s']:.0f}"

    def fit(x: dict[str, Any] | None) -> str:
        return "–" if x is None or x.get("fits_tokens_24gb") is None else f"{x['fits_tokens_24gb']:,}"

    for row in result["rows"]:
        p, q, k = row.get("peftlab"), row.get("peer"), row.get("peftlab_ckpt")
        ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "–"
        lines.append(f"| {row['size']} | {row['seq_len']} x {row['batch']} | {tps(p)} | {tps(q)} | "
                     f"{ratio} | {gb(p)} | {gb(q)} | {tps(k)} | {gb(k)} | "
                     f"{fit(p)} / {fit(k)} / {fit(q)} |")
    measured = [c for c in result["cells"] if "error" not in c]
    compiled = sorted({c["size"] + (" + act. ckpt" if c["name"] == "peftlab_ckpt" else "")
                       for c in measured if c["compiled"]},
                      key=lambda s: (list(SHAPES).index(s.split()[0]), s))
    lines += ["", f"peftlab precision: {sorted({c['precision'] for c in measured if c['name'] != 'peer'})}; "
              f"train.compile auto on for: {', '.join(compiled) or 'none'}. Peak RSS: the training "
              "peak (reset after the model is built, so the fp32 load transient is not "
              "counted; the JSON keeps the peak with loading). Tokens/step in 24 GB: resident "
              "model memory + measured growth per token, extrapolated (not run)."]
    if result.get("peer_precision_why"):
        lines += ["", f"Peer: {result['peer_precision_why']}."]
    for group in result.get("earlier") or []:
        old = ", ".join(f"{n} {s} x {q}" for n, s, q in group["cells"])
        state = group["measured_on"]
        lines += ["", f"Merged run: the cells {old} come from an earlier run on "
                  f"{state['cpu']} (matmul peaks fp32 {state['fp32_peak_gflops']:.0f}, bf16 "
                  f"{state['bf16_peak_gflops']:.0f} GFLOP/s); compare their tokens/s only "
                  "with cells of the same run."]
    if result.get("earlier"):
        lines += ["", "The other cells come from this run (peaks above)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="135M and 360M only, 3 steps")
    p.add_argument("--sizes", nargs="+", choices=list(SHAPES), help="model sizes to run")
    p.add_argument("--seq-lens", nargs="+", type=int, default=list(SEQ_LENS))
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                   help="configurations to run (default: all)")
    p.add_argument("--steps", type=int, help="steps per cell (default 4, quick 3)")
    p.add_argument("--threads", type=int)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time steps by wall clock or by each worker's CPU time (--threads 1)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--merge", action="store_true",
                   help="keep the cells of OUT/scaling.json this run does not re-measure")
    p.add_argument("--worker", choices=["worker"], help=argparse.SUPPRESS)  # set by tt.spawn
    p.add_argument("--worker-config", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        tt.run_worker(args, worker)
        return
    sizes = args.sizes or (["135M", "360M"] if args.quick else list(SHAPES))
    steps = args.steps or (3 if args.quick else 4)
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit("error: --clock cpu needs --threads 1")
    if any(TOKENS_PER_STEP % s for s in args.seq_lens):
        raise SystemExit(f"error: --seq-lens must divide {TOKENS_PER_STEP}")
    previous = args.out / "scaling.json"
    args.previous = json.loads(previous.read_text()) if args.merge and previous.is_file() else None
    if args.previous:
        old = args.previous
        if (old["steps"], old["clock"], old["threads"]) != (steps, args.clock, args.threads):
            raise SystemExit(f"error: --merge: {previous} was measured with steps/clock/threads "
                             f"{old['steps']}/{old['clock']}/{old['threads']}; give the same")
    tt._quiet()
    started = time.perf_counter()
    machine = tt.machine_info()
    peaks = tt.best_matmul_gflops(3)
    args.peer_precision, why = peer_precision(peaks)
    if why:
        print(why, flush=True)
    cells: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="peftlab-scaling-") as tmp_name:
        tmp = Path(tmp_name)
        for size in sizes:
            vocab = COMMON["vocab_size"]
            for seq in args.seq_lens:
                path = tmp / f"batches-{seq}.safetensors"
                if not path.exists():
                    save_file(make_batches(vocab, seq, steps), str(path))
                names = CONFIGS if seq == max(args.seq_lens) else CONFIGS[:2]
                names = [n for n in names if n in args.configs]
                for name in names:
                    cfg = {"name": name, "size": size, "seq_len": seq, "steps": steps,
                           "batches": str(path), "clock": args.clock,
                           "peer_precision": args.peer_precision}
                    res = tt.spawn("worker", cfg, tmp, f"{name}-{size}-{seq}", args.threads,
                                   script=Path(__file__), check=False)
                    if res.get("failed"):
                        cells.append(failed_cell(cfg, res))
                        write_results(args, machine, peaks, steps, sizes, cells, started)
                        print(f"  {size:5s} seq {seq:5d} {name:13s} {cells[-1]['error']}",
                              flush=True)
                        continue
                    cells.append(res)
                    write_results(args, machine, peaks, steps, sizes, cells, started)
                    print(f"  {size:5s} seq {seq:5d} {name:13s} "
                          f"{TOKENS_PER_STEP / statistics.median(res['step_seconds'][1:] or res['step_seconds']):7.1f} tok/s "
                          f"rss {res['peak_rss_mb'] / 1024:5.1f} GB (model {res['model_mb'] / 1024:.1f})"
                          f"{' compiled' if res['compiled'] else ''}", flush=True)
    write_results(args, machine, peaks, steps, sizes, cells, started, final=True)


def write_results(args, machine: dict[str, Any], peaks: dict[str, float], steps: int,
                  sizes: list[str], cells: list[dict[str, Any]], started: float,
                  final: bool = False) -> None:
    """Write the JSON and table after every cell, so a stopped run keeps what it measured
    (``--merge``: with the earlier file's cells this run did not re-measure)."""
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    here = measured_on(machine, peaks["bf16"], peaks["fp32"])
    for cell in cells:
        cell.setdefault("measured_on", here)
    if getattr(args, "previous", None):
        old = args.previous
        before = measured_on(old["machine"], old["bf16_peak_gflops"], old["fp32_peak_gflops"])
        # cells of a file written before cells were stamped: its own machine measured them
        cells = merged([{"measured_on": before, **c} for c in old["cells"]], cells)
        sizes = sorted({c["size"] for c in cells}, key=list(SHAPES).index)
    earlier = earlier_runs(cells, here)
    peer, why = peer_precision(peaks)  # as main() chose it for the workers
    result = {"machine": machine, "cpu": machine["cpu"], "bf16_peak_gflops": peaks["bf16"],
              "fp32_peak_gflops": peaks["fp32"], "steps": steps, "skip": 1,
              "clock": args.clock, "threads": args.threads,
              "peer_precision": peer, "peer_precision_why": why,
              "tokens_per_step": TOKENS_PER_STEP, "params": {s: n_params(s) for s in sizes},
              "cells": cells, "rows": summarize(cells, 1),
              "seconds": round(time.perf_counter() - started), "complete": final,
              "earlier": earlier or None}
    report = markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "scaling.md").write_text(report + "\n")
    if final:
        print("\n" + report)
        print(f"wrote {args.out / 'scaling.json'} and .md ({result['seconds']} s)")


if __name__ == "__main__":
    sys.exit(main())
