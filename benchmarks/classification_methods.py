"""Every fine-tuning method on real classification data, one table.

SST-2 (binary sentiment) and CLAUDETTE unfair-ToS (imbalanced legal clause detection) with the
embedded `minilm-l6` encoder. Each method runs in its own subprocess (so peak RSS is its own)
under the same budget: same training rows, epochs, batch size, max length and seed; only the
learning rate is per method (the usual ones for each family).

    python benchmarks/classification_methods.py                 # SST-2 + CLAUDETTE
    python benchmarks/classification_methods.py --quick         # small subsets, minutes
    python benchmarks/classification_methods.py --only sst2 --methods lora full

The first row of each table is the classical baseline (`peftlab baseline`: TF-IDF + a linear
model, C by cross-validation on the training rows): the bar every method has to beat.

Writes benchmarks/results/classification_methods.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"

METHOD_LR = {
    "full": 5e-5, "feature_extraction": 2e-3, "freeze": 2e-4, "lora": 1e-3,
    "adapter_houlsby": 1e-3, "adapter_pfeiffer": 1e-3, "ia3": 5e-3,
    "prompt_tuning": 1e-2, "p_tuning": 3e-3, "prefix_tuning": 5e-3,
}
METHOD_CFG = {
    "full": {"name": "full"},
    "feature_extraction": {"name": "feature_extraction"},
    "freeze": {"name": "freeze", "trainable_layers": 2},
    "lora": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
    "adapter_houlsby": {"name": "adapter", "variant": "houlsby", "reduction_factor": 16},
    "adapter_pfeiffer": {"name": "adapter", "variant": "pfeiffer", "reduction_factor": 16},
    "ia3": {"name": "ia3"},
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 20},
    "p_tuning": {"name": "p_tuning", "num_virtual_tokens": 20},
    "prefix_tuning": {"name": "prefix_tuning", "num_virtual_tokens": 20},
}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepare_sst2(work: Path, n_train: int, n_dev: int | None, seed: int) -> dict:
    src = SHARED / "sst2"
    with (src / "train.tsv").open() as f:
        train = [{"text": r["sentence"].strip(), "label": int(r["label"])}
                 for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    with (src / "dev.tsv").open() as f:
        dev = [{"text": r["sentence"].strip(), "label": int(r["label"])}
               for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    rng = random.Random(seed)
    rng.shuffle(train)
    if n_dev:
        rng.shuffle(dev)
        dev = dev[:n_dev]
    return {"train": str(_write_jsonl(work / "sst2_train.jsonl", train[:n_train])),
            "validation": str(_write_jsonl(work / "sst2_dev.jsonl", dev)),
            "n_train": n_train, "n_dev": len(dev)}


def prepare_claudette(work: Path, n_val_docs: int, seed: int, max_train: int | None) -> dict:
    rows = [json.loads(x) for x in (SHARED / "claudette_unfair_tos" / "train.jsonl").open()]
    docs = sorted({r["doc"] for r in rows})
    random.Random(seed).shuffle(docs)
    val_docs = set(docs[:n_val_docs])
    train = [{"text": r["text"], "label": r["unfair"], "doc": r["doc"]} for r in rows
             if r["doc"] not in val_docs]
    val = [{"text": r["text"], "label": r["unfair"]} for r in rows if r["doc"] in val_docs]
    if max_train:
        random.Random(seed).shuffle(train)
        train = train[:max_train]
    return {"train": str(_write_jsonl(work / "claudette_train.jsonl", train)),
            "validation": str(_write_jsonl(work / "claudette_val.jsonl", val)),
            "n_train": len(train), "n_dev": len(val), "val_docs": sorted(val_docs)}


def worker(args: argparse.Namespace) -> None:
    """One method on one data set, in this process; prints one JSON line."""
    import torch

    import peftlab

    torch.manual_seed(0)
    data = json.loads(args.data)
    cfg = {
        "model": "minilm-l6",
        "task": "classification",
        "method": METHOD_CFG[args.method],
        "data": {"train": data["train"], "validation": data["validation"]},
        "classification": {"class_weights": args.class_weights},
        "train": {"epochs": args.epochs, "batch_size": 32, "lr": METHOD_LR[args.method],
                  "max_length": 128, "seed": 0, "warmup_ratio": 0.06, "log_every": 50,
                  "num_threads": args.threads},
        "output_dir": args.out,
    }
    t0 = time.perf_counter()
    summary = peftlab.train(cfg, progress=False)
    seconds = time.perf_counter() - t0
    report = json.loads((Path(args.out) / "eval_classification.json").read_text())
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    adapter_bytes = sum(p.stat().st_size for p in Path(summary.adapter_dir).rglob("*.safetensors"))
    print("RESULT " + json.dumps({
        "method": args.method, "report": report, "wall_s": seconds,
        "train_s": summary.result.seconds, "peak_rss_mb": rss_mb,
        "trainable": summary.trainable_params, "total": summary.total_params,
        "adapter_mb": adapter_bytes / 2**20, "steps": summary.result.steps,
    }))


def run_baseline(data: dict, out: Path, grouped: bool) -> dict:
    """The TF-IDF + linear model row (in this process: seconds, no torch), on the same files;
    its C and model are chosen by cross-validation on the training rows (grouped by document
    where the rows carry one)."""
    from peftlab.api import baseline  # here, not at the top: the parent process stays light

    cfg = {"model": "unused", "task": "classification",
           "data": {"train": data["train"], "validation": data["validation"],
                    "group_field": "doc" if grouped else None},
           "output_dir": str(out)}
    t0 = time.perf_counter()
    result = baseline(cfg, write=False)
    return {"method": f"baseline ({result.name}, C={result.params['C']}, "
                      f"class weights {result.params['class_weight'] or 'none'})",
            "report": result.validation, "wall_s": time.perf_counter() - t0,
            "train_s": result.seconds, "peak_rss_mb": None, "trainable": None, "total": None,
            "adapter_mb": None, "cv": {k: result.cv[k] for k in ("folds", "grouped_by_field",
                                                                 "score")}}


def run_one(method: str, data: dict, out: Path, epochs: float, class_weights: str,
            threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--data", json.dumps(data),
           "--out", str(out), "--epochs", str(epochs), "--class-weights", class_weights]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout)[-2000:]
    return {"method": method, "error": tail}


def _f1(report: dict, label: str) -> float | None:
    per = report.get("per_class") or {}
    entry = per.get(label) or per.get(str(label))
    return None if entry is None else entry.get("f1")


def table(title: str, results: list[dict], positive: str | None) -> str:
    head = ["method", "accuracy", "macro-F1"] + ([f"F1({positive})"] if positive else []) + [
        "trainable %", "adapter MB", "train s", "peak RSS MB"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: see JSON |" + " |" * (len(head) - 2))
            continue
        rep = r["report"]
        cells = [r["method"], f"{100 * rep['accuracy']:.1f}", f"{100 * rep['macro_f1']:.1f}"]
        if positive:
            f1 = _f1(rep, positive)
            cells.append("-" if f1 is None else f"{100 * f1:.1f}")
        if r["trainable"] is None:  # the classical baseline: no network
            cells += ["-", "-", f"{r['train_s']:.0f}", "-"]
        else:
            cells += [f"{100 * r['trainable'] / r['total']:.3f}", f"{r['adapter_mb']:.2f}",
                      f"{r['train_s']:.0f}", f"{r['peak_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method")
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--class-weights", default="none")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (1 avoids OpenMP oversubscription on a busy machine)")
    p.add_argument("--only", choices=["sst2", "claudette"])
    p.add_argument("--methods", nargs="*", default=list(METHOD_CFG))
    p.add_argument("--sst2-train", type=int, default=8000)
    p.add_argument("--claudette-train", type=int, default=4000,
                   help="training sentences sampled from the non-validation documents")
    p.add_argument("--claudette-methods", nargs="*", default=["full", "lora", "adapter_pfeiffer"])
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not SHARED.exists():
        sys.exit(f"real data not found at {SHARED} (expected ../shared/data beside the repo)")

    work = REPO / "runs" / "bench_classification"
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"machine": {"cores": os.cpu_count()},
                 "settings": {"quick": args.quick, "threads": args.threads}}
    md = ["# Classification: every method on real data (minilm-l6)", ""]
    if args.only in (None, "sst2"):
        n_train = 1000 if args.quick else args.sst2_train
        data = prepare_sst2(work, n_train, 400 if args.quick else None, seed=0)
        results = [run_baseline(data, work / "sst2_baseline", grouped=False)]
        for m in args.methods:
            print(f"sst2: {m} ...", flush=True)
            results.append(run_one(m, data, work / f"sst2_{m}", 1.0, "none", args.threads))
            print("   ", {k: v for k, v in results[-1].items() if k != "report"}, flush=True)
        out["sst2"] = {"data": {k: v for k, v in data.items() if k.startswith("n_")},
                       "results": results}
        md += [table(f"SST-2: {data['n_train']} train rows, 1 epoch, evaluated on "
                     f"{data['n_dev']} dev rows", results, None), ""]
    if args.only in (None, "claudette"):
        data = prepare_claudette(work, n_val_docs=5, seed=0,
                                 max_train=2000 if args.quick else args.claudette_train)
        results = [run_baseline(data, work / "claudette_baseline", grouped=True)]
        for m in args.claudette_methods:
            print(f"claudette: {m} ...", flush=True)
            results.append(run_one(m, data, work / f"claudette_{m}", 1.0, "balanced",
                                   args.threads))
            print("   ", {k: v for k, v in results[-1].items() if k != "report"}, flush=True)
        out["claudette"] = {"data": {k: v for k, v in data.items() if k != "train"
                                     and k != "validation"}, "results": results}
        md += [table(f"CLAUDETTE unfair-ToS: {data['n_train']} train sentences, validation = "
                     f"{data['n_dev']} sentences of 5 held-out documents, class weights balanced",
                     results, "1"), ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = (f"_{args.only}" if args.only else "") + ("_quick" if args.quick else "")
    (RESULTS / f"classification_methods{suffix}.json").write_text(json.dumps(out, indent=2))
    (RESULTS / f"classification_methods{suffix}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
