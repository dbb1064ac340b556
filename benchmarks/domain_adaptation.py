"""Does continued pre-training on unlabelled domain text pay off? ("Don't stop pretraining")

CLAUDETTE unfair-ToS (../shared/data/claudette_unfair_tos/train.jsonl: 40 Terms-of-Service
documents, one sentence per row). The documents are split once (seeded, as in
classification_methods.py): the first ``--val-docs`` of a seeded shuffle are held out; every
classifier is validated on all their sentences (document-grouped validation), and the domain
perplexity is measured on the first ``--domain-val-sentences`` sentences of each of them.
Nothing of the held-out documents is ever trained on.

Per model, two arms with the same classifier budget (same training sentences, epochs, batch,
learning rate, seeds):

* original: ``task: classification`` from the original model;
* adapted: first ``task: pretrain`` on the text of the training documents (unlabelled; rows
  grouped into documents by ``doc``), then the same classifier with ``init_from`` that run.

``minilm-l6``: masked LM (its MLM head is new; see README), LoRA. ``smollm2-135m-instruct``:
causal LM, LoRA, then a classification head; its pre-training also runs once more with
WikiText-2 replay, and both report perplexity on the held-out ToS documents and on WikiText-2
test (forgetting; the replay text is WikiText-2 *validation*, so the two never overlap).

Unfair-class F1 (and macro-F1, accuracy) on the held-out documents, mean and 95% t-interval
over seeds, and the paired difference adapted - original per seed.

    python benchmarks/domain_adaptation.py --parts minilm smollm --threads 1   # ~45 min
    python benchmarks/domain_adaptation.py --quick --parts minilm smollm     # smoke run

Writes benchmarks/results/domain_adaptation.{json,md} (each part fills its own entry; parts
may run in parallel). Finished runs under --work are reused when the script is re-run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from _common import RESULTS, SHARED, read_jsonl, save_part, write_jsonl

RESULT = RESULTS / "domain_adaptation.json"
CLAUDETTE = SHARED / "claudette_unfair_tos" / "train.jsonl"
WIKI_TEST = SHARED / "wikitext2_raw" / "wiki.test.raw"
WIKI_VALID = SHARED / "wikitext2_tokens" / "wiki.valid.tokens"

# t quantiles (two-sided 95%) by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}

MODELS = {
    "minilm": {
        "model": "minilm-l6",
        "pretrain": {"objective": "mlm", "method": {"name": "lora", "r": 16, "alpha": 32},
                     "lr": 1e-3, "max_length": 128, "batch_size": 16, "epochs": 1.0,
                     "max_steps": 60},
        "classifier": {"method": {"name": "lora", "r": 8, "alpha": 16}, "lr": 1e-3,
                       "batch_size": 32, "epochs": 2.0, "max_length": 128},
        "seeds": [0, 1, 2],
        "forgetting_max_tokens": 8000,
        "replay": False,
    },
    "smollm": {
        "model": "smollm2-135m-instruct",
        "pretrain": {"objective": "clm", "method": {"name": "lora", "r": 16, "alpha": 32},
                     "lr": 3e-4, "max_length": 256, "batch_size": 4, "epochs": 1.0,
                     "max_steps": 20},
        "classifier": {"method": {"name": "lora", "r": 8, "alpha": 16}, "lr": 5e-4,
                       "batch_size": 16, "epochs": 1.0, "max_length": 128},
        # The classifier arms (~10 min per run at 1 thread here) did not fit the budget:
        # SmolLM2 reports domain and forgetting perplexity only (pass --seeds to run them).
        "seeds": [],
        "forgetting_max_tokens": 8000,
        "replay": True,
    },
}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_start": os.getloadavg()[0],
            "note": "shared machine: other engineers' jobs ran at the same time"}


def prepare(work: Path, val_docs: int, n_train: int, domain_val_sentences: int,
            max_val: int | None = None, seed: int = 0) -> dict:
    """Split the documents and write every file the runs read; returns their paths + counts."""
    rows = read_jsonl(CLAUDETTE)
    docs = sorted({r["doc"] for r in rows})
    random.Random(seed).shuffle(docs)
    held = set(docs[:val_docs])
    train_rows = [r for r in rows if r["doc"] not in held]
    val_rows = [r for r in rows if r["doc"] in held][:max_val]
    seen: dict[str, int] = {}
    domain_val = []
    for r in val_rows:  # the first sentences of every held-out document, in order
        seen[r["doc"]] = seen.get(r["doc"], 0) + 1
        if seen[r["doc"]] <= domain_val_sentences:
            domain_val.append({"doc": r["doc"], "text": r["text"]})
    sample = list(train_rows)
    random.Random(seed).shuffle(sample)
    sample = sample[:n_train]
    wiki = [line.strip() for line in WIKI_VALID.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    replay = work / "wikitext2_valid.txt"
    replay.write_text("\n".join(wiki) + "\n", encoding="utf-8")
    files = {
        "dapt_train": write_jsonl(work / "dapt_train.jsonl",
                                  [{"doc": r["doc"], "text": r["text"]} for r in train_rows]),
        "dapt_val": write_jsonl(work / "dapt_val.jsonl", domain_val),
        "cls_train": write_jsonl(work / "cls_train.jsonl",
                                 [{"text": r["text"], "label": r["unfair"]} for r in sample]),
        "cls_val": write_jsonl(work / "cls_val.jsonl",
                               [{"text": r["text"], "label": r["unfair"]} for r in val_rows]),
        "replay": str(replay),
    }
    counts = {"train_docs": len(docs) - len(held), "held_out_docs": sorted(held),
              "dapt_sentences": len(train_rows), "domain_val_sentences": len(domain_val),
              "cls_train": len(sample), "cls_train_unfair": sum(r["unfair"] for r in sample),
              "cls_val": len(val_rows), "cls_val_unfair": sum(r["unfair"] for r in val_rows),
              "replay_lines": len(wiki)}
    return {"files": files, "counts": counts}


def train(cfg: dict, out: Path) -> dict:
    """One peftlab run (reused if it finished before); returns its summary numbers."""
    import peftlab

    done = out / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    s = peftlab.train(dict(cfg, output_dir=str(out)), progress=False, overwrite=True)
    summary = {"train_s": s.result.seconds, "wall_s": time.perf_counter() - t0,
               "steps": s.result.steps, "tokens": s.result.tokens,
               "trainable": s.trainable_params, "total": s.total_params,
               "final_train_loss": s.result.final_train_loss}
    done.write_text(json.dumps(summary, indent=2))
    return summary


def scores(adapter: Path, val_file: str) -> dict:
    """Accuracy, macro-F1 and per-class F1 of a saved classifier on ``val_file``."""
    import peftlab.api

    t0 = time.perf_counter()
    preds = peftlab.api.predict(adapter, val_file, batch_size=16)["predictions"]
    gold = [str(p["gold"]) for p in preds]
    pred = [p["prediction"] for p in preds]
    f1 = {}
    for c in ("0", "1"):
        tp = sum(g == c and p == c for g, p in zip(gold, pred, strict=True))
        fp = sum(g != c and p == c for g, p in zip(gold, pred, strict=True))
        fn = sum(g == c and p != c for g, p in zip(gold, pred, strict=True))
        f1[c] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"accuracy": sum(g == p for g, p in zip(gold, pred, strict=True)) / len(gold),
            "macro_f1": (f1["0"] + f1["1"]) / 2, "f1_unfair": f1["1"], "f1_fair": f1["0"],
            "predicted_unfair": pred.count("1"), "eval_s": time.perf_counter() - t0}


def pretrain_cfg(spec: dict, files: dict, threads: int | None, replay: bool,
                 quick: bool) -> dict:
    p = spec["pretrain"]
    cfg = {
        "model": spec["model"], "task": "pretrain", "method": p["method"],
        "pretrain": {"objective": p["objective"], "document_field": "doc"},
        "data": {"train": files["dapt_train"], "validation": files["dapt_val"]},
        "train": {"epochs": p["epochs"], "max_steps": 3 if quick else p["max_steps"],
                  "batch_size": p["batch_size"], "lr": p["lr"], "max_length": p["max_length"],
                  "warmup_ratio": 0.06, "log_every": 10, "seed": 0, "num_threads": threads,
                  "precision": "fp32"},
        "eval": {"forgetting_corpus": str(WIKI_TEST), "batch_size": 8,
                 "forgetting_max_tokens": 2000 if quick else spec["forgetting_max_tokens"],
                 "forgetting_window": 128 if p["objective"] == "mlm" else 512},
    }
    if replay:
        cfg["data"].update(replay=files["replay"], replay_ratio=0.2)
    return cfg


def classifier_cfg(spec: dict, files: dict, seed: int, threads: int | None,
                   init_from: Path | None, quick: bool) -> dict:
    c = spec["classifier"]
    cfg = {
        "model": spec["model"], "task": "classification", "method": c["method"],
        "classification": {"class_weights": "balanced"},
        "data": {"train": files["cls_train"]},
        "train": {"epochs": c["epochs"], "max_steps": 3 if quick else None,
                  "batch_size": c["batch_size"], "lr": c["lr"], "max_length": c["max_length"],
                  "warmup_ratio": 0.06, "log_every": 20, "seed": seed, "num_threads": threads,
                  "precision": "fp32"},
    }
    if init_from is not None:
        cfg["init_from"] = str(init_from)
    return cfg


def pretrain_numbers(run: Path) -> dict:
    report = json.loads((run / "eval_pretrain.json").read_text())
    out = {}
    for name in ("domain", "forgetting"):
        e = report.get(name)
        if e:
            out[name] = {"loss_before": e["before"]["loss"], "loss_after": e["after"]["loss"],
                         "ppl_before": e["before"]["perplexity"],
                         "ppl_after": e["after"]["perplexity"],
                         "relative_change": e["relative_change"]}
    return out


def interval(values: list[float]) -> dict:
    """Mean and 95% t-interval half-width over seeds."""
    n = len(values)
    mean = statistics.fmean(values)
    half = T95.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": half, "n": n, "values": values}


def run_part(name: str, args: argparse.Namespace, data: dict, work: Path) -> dict:
    spec = MODELS[name]
    files = data["files"]
    seeds = args.seeds or spec["seeds"]
    result: dict = {"model": spec["model"], "settings": {k: spec[k] for k in
                                                         ("pretrain", "classifier")},
                    "seeds": seeds, "data": data["counts"], "machine": machine(),
                    "threads": args.threads, "quick": args.quick}
    dapt = work / f"{name}_dapt"
    result["pretrain"] = train(pretrain_cfg(spec, files, args.threads, False, args.quick), dapt)
    result["pretrain"].update(pretrain_numbers(dapt))
    print(f"{name} pretrain: {result['pretrain']}", flush=True)
    if spec["replay"] and not args.no_replay:
        run = work / f"{name}_dapt_replay"
        result["pretrain_replay"] = train(pretrain_cfg(spec, files, args.threads, True,
                                                       args.quick), run)
        result["pretrain_replay"].update(pretrain_numbers(run))
        print(f"{name} pretrain + replay: {result['pretrain_replay']}", flush=True)
    runs: dict[str, list[dict]] = {"original": [], "adapted": []}
    for seed in seeds:
        for arm, init in (("original", None), ("adapted", dapt)):
            out = work / f"{name}_cls_{arm}_s{seed}"
            summary = train(classifier_cfg(spec, files, seed, args.threads, init, args.quick),
                            out)
            cached = out / "scores.json"
            if not cached.is_file():
                cached.write_text(json.dumps(scores(out / "adapter", files["cls_val"])))
            s = json.loads(cached.read_text())
            runs[arm].append({"seed": seed, **summary, **s})
            print(f"{name} {arm} seed {seed}: F1(unfair) {s['f1_unfair']:.4f} macro-F1 "
                  f"{s['macro_f1']:.4f} acc {s['accuracy']:.4f}", flush=True)
    result["classifier"] = runs
    if not seeds:
        result["summary"] = None
        result["machine"]["load_avg_end"] = os.getloadavg()[0]
        return result
    summary = {}
    for metric in ("f1_unfair", "macro_f1", "accuracy"):
        orig = [r[metric] for r in runs["original"]]
        adap = [r[metric] for r in runs["adapted"]]
        summary[metric] = {"original": interval(orig), "adapted": interval(adap),
                           "paired_difference": interval([a - o for a, o in
                                                          zip(adap, orig, strict=True)])}
    result["summary"] = summary
    result["machine"]["load_avg_end"] = os.getloadavg()[0]
    return result


def _pm(x: dict, scale: float = 100.0) -> str:
    if x["n"] < 2:
        return f"{scale * x['mean']:.1f}"
    return f"{scale * x['mean']:.1f} ± {scale * x['ci95']:.1f}"


def tables(results: dict) -> str:
    lines = ["# Domain adaptation by continued pre-training (CLAUDETTE unfair-ToS)", ""]
    for name in ("minilm", "smollm"):
        r = results.get(name)
        if not r:
            continue
        c, s = r["data"], r["summary"]
        lines += [f"## {r['model']}" + (" (quick smoke run)" if r.get("quick") else ""), ""]
        if s is None:
            lines += ["Classifier arms not run (budget); pre-training perplexities only.", ""]
        else:
            lines += [
                f"{c['train_docs']} training documents ({c['dapt_sentences']} sentences, "
                f"unlabelled) for pre-training; classifier: {c['cls_train']} training "
                f"sentences ({c['cls_train_unfair']} unfair) from them, validated on all "
                f"{c['cls_val']} sentences ({c['cls_val_unfair']} unfair) of "
                f"{len(c['held_out_docs'])} held-out documents; seeds {r['seeds']}; "
                "mean ± 95% t-interval over seeds.", "",
                "| classifier from | F1 unfair | macro-F1 | accuracy |", "|---|---|---|---|"]
            for arm in ("original", "adapted"):
                lines.append(f"| {arm} model | {_pm(s['f1_unfair'][arm])} | "
                             f"{_pm(s['macro_f1'][arm])} | {_pm(s['accuracy'][arm])} |")
            d = s["f1_unfair"]["paired_difference"]
            lines.append(f"| adapted - original (paired) | {_pm(d)} | "
                         f"{_pm(s['macro_f1']['paired_difference'])} | "
                         f"{_pm(s['accuracy']['paired_difference'])} |")
        lines += ["", "| pre-training run | steps | train s | held-out ToS "
                  f"{'perplexity' if name == 'smollm' else 'exp(MLM loss)'} before → after | "
                  "WikiText-2 before → after |", "|---|---|---|---|---|"]
        for key, label in (("pretrain", "domain text"), ("pretrain_replay",
                                                          "domain text + 20% WikiText replay")):
            p = r.get(key)
            if not p:
                continue
            d, f = p.get("domain", {}), p.get("forgetting", {})
            lines.append(f"| {label} | {p['steps']} | {p['train_s']:.0f} | "
                         f"{d.get('ppl_before', float('nan')):.2f} → "
                         f"{d.get('ppl_after', float('nan')):.2f} "
                         f"({100 * d.get('relative_change', float('nan')):+.1f}%) | "
                         f"{f.get('ppl_before', float('nan')):.2f} → "
                         f"{f.get('ppl_after', float('nan')):.2f} "
                         f"({100 * f.get('relative_change', float('nan')):+.1f}%) |")
        m = r["machine"]
        lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, {r['threads']} torch thread(s) "
                  f"per run; load average {m['load_avg_start']:.1f} at start, "
                  f"{m.get('load_avg_end', float('nan')):.1f} at end ({m['note']}).", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="*", default=None)
    p.add_argument("--val-docs", type=int, default=8)
    p.add_argument("--train-sentences", type=int, default=1000)
    p.add_argument("--domain-val-sentences", type=int, default=50)
    p.add_argument("--work", default=None, help="run directory (default: runs/bench_domain)")
    p.add_argument("--quick", action="store_true", help="3 steps per run: a smoke test")
    p.add_argument("--no-replay", action="store_true",
                   help="skip the SmolLM2 pre-training run with WikiText-2 replay")
    args = p.parse_args()
    if not CLAUDETTE.is_file() or not WIKI_TEST.is_file() or not WIKI_VALID.is_file():
        sys.exit(f"real data not found under {SHARED} (claudette_unfair_tos, wikitext2_raw, "
                 "wikitext2_tokens)")
    work = Path(args.work or Path(__file__).resolve().parents[1] / "runs" / "bench_domain")
    if args.quick:
        work = work.with_name(work.name + "_quick")
        args.seeds = args.seeds or [0, 1]
    work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        data = prepare(work, args.val_docs, 200, 10, max_val=200)
    else:
        data = prepare(work, args.val_docs, args.train_sentences, args.domain_val_sentences)
    result_file = RESULT.with_name("domain_adaptation_quick.json") if args.quick else RESULT
    for name in args.parts:
        result = run_part(name, args, data, work)
        print(save_part(result_file, name, result, tables))


if __name__ == "__main__":
    main()
