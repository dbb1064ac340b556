"""The seed applications on real data: summarisation, instruction tuning + forgetting,
multi-task, few-shot. `smollm2-135m-instruct` + LoRA throughout.

    python benchmarks/applications.py                          # every part (~1.5 h, 2 cores)
    python benchmarks/applications.py --parts fewshot chat     # any subset
    python benchmarks/applications.py --quick                  # tiny subsets, minutes

- summarization: DialogSum, train subset -> ROUGE-1/2/L on dev rows, base (zero-shot prompt)
  vs tuned (`eval.generate` + `eval.compare_base` of the run itself).
- chat: Alpaca subset; held-out validation loss / perplexity base vs tuned, and forgetting
  = perplexity on WikiText-2 (test split) before vs after (`eval.forgetting_corpus`).
- multitask: one run over a mixture (SST-2 as instructions + DialogSum + Alpaca, equal
  weights) with per-task validation loss, against three single-task runs on the same rows.
- fewshot: SST-2, k = 8/16/64 training rows per class (verbaliser classification, LoRA)
  vs the base model's in-context k-shot prompting, on the same dev rows.

Every run goes through `peftlab.train` / `peftlab.evaluate` as the CLI would. Results:
benchmarks/results/applications.{json,md} (parts not run keep their previous entries).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

from _common import REPO, RESULTS, SHARED, read_jsonl, save_part, sst2_rows, write_jsonl

MODEL = "smollm2-135m-instruct"
LORA = {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}
SUMMARIZE = "Summarize the following dialogue in one or two sentences."
SENTIMENT = "Is the sentiment of this movie review positive or negative? Answer with one word."


# ------------------------------------------------------------------------------- data


def dialogsum(work: Path, n_train: int, n_dev: int) -> dict:
    train = read_jsonl(SHARED / "dialogsum" / "train-00000-of-00004.jsonl")
    random.Random(0).shuffle(train)
    dev = read_jsonl(SHARED / "dialogsum" / "dev.jsonl")[:n_dev]

    def row(r):
        return {"instruction": SUMMARIZE, "input": r["dialogue"], "output": r["summary"]}
    return {"train": write_jsonl(work / "dialogsum_train.jsonl", [row(r) for r in train[:n_train]]),
            "validation": write_jsonl(work / "dialogsum_dev.jsonl", [row(r) for r in dev])}


def alpaca(work: Path, n_train: int, n_dev: int) -> dict:
    rows = read_jsonl(SHARED / "alpaca" / "alpaca_5000.jsonl")
    random.Random(0).shuffle(rows)
    return {"train": write_jsonl(work / "alpaca_train.jsonl", rows[:n_train]),
            "validation": write_jsonl(work / "alpaca_dev.jsonl", rows[n_train:n_train + n_dev])}


def sst2_instructions(work: Path, n_train: int, n_dev: int) -> dict:
    word = {0: "negative", 1: "positive"}
    train = [r for r in sst2_rows("train.tsv") if len(r["text"].split()) >= 6]
    random.Random(0).shuffle(train)
    dev = sst2_rows("dev.tsv")
    random.Random(1).shuffle(dev)

    def row(r):
        return {"instruction": SENTIMENT, "input": r["text"], "output": word[r["label"]]}
    return {"train": write_jsonl(work / "sst2i_train.jsonl", [row(r) for r in train[:n_train]]),
            "validation": write_jsonl(work / "sst2i_dev.jsonl", [row(r) for r in dev[:n_dev]])}


def sft_config(name: str, data: dict, work: Path, threads: int | None, **eval_cfg) -> dict:
    return {
        "model": MODEL, "task": "sft", "method": LORA,
        "data": {**data, "format": "alpaca"},
        "train": {"epochs": 1, "batch_size": 8, "lr": 3e-4, "max_length": 512, "seed": 0,
                  "warmup_ratio": 0.05, "log_every": 10, "num_threads": threads},
        "eval": {"batch_size": 8, **eval_cfg},
        "output_dir": str(work / name),
    }


def train_and_losses(cfg: dict) -> dict:
    """Train, then validation loss / perplexity of base and tuned on the held-out rows."""
    import peftlab

    t0 = time.perf_counter()
    summary = peftlab.train(cfg, progress=True)
    seconds = time.perf_counter() - t0
    plain = copy.deepcopy(cfg)
    plain["eval"] = {"batch_size": cfg["eval"]["batch_size"]}
    losses = peftlab.evaluate(plain)
    return {"seconds": round(seconds, 1), "steps": summary.result.steps,
            "train_examples": summary.data_report.get("train", {}).get("kept"),
            "base_val_loss": losses["base"]["val_loss"], "base_ppl": losses["base"]["perplexity"],
            "tuned_val_loss": losses["adapter"]["val_loss"],
            "tuned_ppl": losses["adapter"]["perplexity"], "val_examples": losses["examples"],
            "evaluation": summary.evaluation, "history": summary.result.history}


# ------------------------------------------------------------------------------ parts


def run_summarization(work: Path, quick: bool, threads: int | None) -> dict:
    data = dialogsum(work, 24 if quick else 300, 8 if quick else 200)  # as in multitask
    cfg = sft_config("summarization", data, work, threads, generate=True, compare_base=True,
                     generate_max_rows=None, max_new_tokens=64)
    out = train_and_losses(cfg)
    gen = out["evaluation"]["generation"]
    out.update(rouge={run: {k: gen[run][k] for k in ("rouge1", "rouge2", "rougeL")}
                      for run in ("base", "tuned")}, generated=gen["examples"])
    return out


def run_chat(work: Path, quick: bool, threads: int | None) -> dict:
    data = alpaca(work, 24 if quick else 300, 8 if quick else 200)
    cfg = sft_config("chat", data, work, threads,
                     forgetting_corpus=str(SHARED / "wikitext2_raw" / "wiki.test.raw"),
                     forgetting_max_tokens=2000 if quick else 20000)
    out = train_and_losses(cfg)
    out["forgetting"] = out["evaluation"]["forgetting"]
    return out


def run_multitask(work: Path, quick: bool, threads: int | None, results_path: Path) -> dict:
    """The mixture run; the single-task DialogSum and Alpaca runs are the `summarization` and
    `chat` parts (same rows, same budget) when their results exist, else trained here."""
    import peftlab

    n, n_dev = (24, 8) if quick else (300, 200)
    sources = {"sst2": sst2_instructions(work, n, n_dev), "dialogsum": dialogsum(work, n, n_dev),
               "alpaca": alpaca(work, n, n_dev)}
    mixture = [{"name": name, **data, "weight": 1.0} for name, data in sources.items()]
    cfg = sft_config("multitask", {}, work, threads)
    cfg["data"] = {"mixture": mixture, "format": "alpaca"}
    t0 = time.perf_counter()
    summary = peftlab.train(cfg, progress=True)
    last = next(r for r in reversed(summary.result.history) if "val_loss/sst2" in r)
    seconds = round(time.perf_counter() - t0, 1)
    singles = {"sst2": train_and_losses(sft_config("single_sst2", sources["sst2"], work, threads))}
    reuse = {"dialogsum": "summarization", "alpaca": "chat"}
    for name, part_name in reuse.items():  # read now: those parts may run in parallel
        done = json.loads(results_path.read_text()) if results_path.exists() else {}
        part = done.get(part_name)
        if part and part.get("quick") == quick:
            singles[name] = part
        else:
            singles[name] = train_and_losses(sft_config(f"single_{name}", sources[name], work,
                                                        threads))
    return {
        "rows_per_task": n, "val_rows_per_task": n_dev,
        "single": {k: {"val_loss": v["tuned_val_loss"], "base_val_loss": v["base_val_loss"],
                       "steps": v["steps"], "seconds": v["seconds"]} for k, v in singles.items()},
        "mixture": {"val_loss": {k: last[f"val_loss/{k}"] for k in sources},
                    "steps": summary.result.steps, "seconds": seconds},
    }


def run_fewshot(work: Path, quick: bool, threads: int | None) -> dict:
    import torch

    import peftlab
    from peftlab.api import predict
    from peftlab.config import from_dict
    from peftlab.evaluation.metrics import classification_report
    from peftlab.tasks.classification.in_context import in_context_baseline

    labels = ["0", "1"]

    train = sst2_rows("train.tsv")
    train = [r for r in train if len(r["text"].split()) >= 6]  # sentences, not bare phrases
    dev = sst2_rows("dev.tsv")
    random.Random(1).shuffle(dev)
    n_dev = 40 if quick else 300
    files = {"train": write_jsonl(work / "fewshot_pool.jsonl", train),
             "validation": write_jsonl(work / "fewshot_dev.jsonl", dev[:n_dev])}
    ks = [8] if quick else [8, 16, 64]
    rows = []
    for k in [0, *ks]:
        cfg = {
            "model": MODEL, "task": "classification",
            "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
            "data": {**files, "k_shot": k or 1},
            "classification": {"mode": "verbalizer",
                               "verbalizer": {"0": "negative", "1": "positive"},
                               "prompt_template": "Review: {text}\nSentiment:"},
            # a few-shot budget: enough passes for ~32-64 optimizer steps
            "train": {"epochs": {8: 16, 16: 8, 64: 4}.get(k, 1), "batch_size": 4,
                      "lr": 5e-4, "max_length": 128, "seed": 0, "warmup_ratio": 0.1,
                      "log_every": 10, "num_threads": threads},
            "eval": {"batch_size": 16},
            "output_dir": str(work / f"fewshot_k{k}"),
        }
        entry: dict = {"k": k}
        if threads:
            torch.set_num_threads(threads)
        model, tokenizer = peftlab.load(MODEL)
        t0 = time.perf_counter()
        icl = in_context_baseline(from_dict(copy.deepcopy(cfg)), model, tokenizer, k=k,
                                  batch_size=4)
        entry["in_context"] = {"accuracy": icl["accuracy"], "macro_f1": icl["macro_f1"],
                               "prompt_tokens": icl["prefix_tokens"],
                               "seconds": round(time.perf_counter() - t0, 1)}
        del model
        if k:
            # No validation data during training: nothing is selected on the dev rows.
            train_cfg = copy.deepcopy(cfg)
            train_cfg["data"].pop("validation")
            t0 = time.perf_counter()
            summary = peftlab.train(train_cfg, progress=True)
            pred = predict(summary.adapter_dir, files["validation"])
            gold = [str(p["gold"]) for p in pred["predictions"]]
            guess = [str(p["prediction"]) for p in pred["predictions"]]
            report = classification_report([labels.index(g) for g in gold],
                                           [labels.index(g) for g in guess], labels)
            entry["trained"] = {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
                                "steps": summary.result.steps,
                                "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(entry)
        print(json.dumps(entry))
    return {"dev_rows": n_dev, "rows": rows}


# ------------------------------------------------------------------------------ tables


def write_tables(results: dict) -> str:
    out = ["# Applications on real data", "",
           f"`{MODEL}` + LoRA r16 all-linear (few-shot: r8), 1 epoch, batch 8, lr 3e-4, seed 0.", ""]
    s = results.get("summarization")
    if s:
        out += ["## Summarisation: DialogSum", "",
                f"{s['train_examples']} training dialogues ({s['steps']} steps, "
                f"{s['seconds'] / 60:.1f} min); greedy summaries of {s['generated']} dev "
                "dialogues (max 64 new tokens).", "",
                "| | ROUGE-1 | ROUGE-2 | ROUGE-L | val loss |", "|---|---|---|---|---|"]
        for run, loss in (("base", s["base_val_loss"]), ("tuned", s["tuned_val_loss"])):
            r = s["rouge"][run]
            out.append(f"| {run} | {100 * r['rouge1']:.1f} | {100 * r['rouge2']:.1f} | "
                       f"{100 * r['rougeL']:.1f} | {loss:.3f} |")
        out.append("")
    c = results.get("chat")
    if c:
        f = c["forgetting"]
        out += ["## Instruction tuning: Alpaca, with forgetting on WikiText-2", "",
                f"{c['train_examples']} training rows ({c['steps']} steps, "
                f"{c['seconds'] / 60:.1f} min); {c['val_examples']} held-out rows; forgetting = "
                f"perplexity on the first {f['tokens']} tokens of WikiText-2 test "
                f"(window {f['window']}, stride {f['stride']}).", "",
                "| | held-out val loss | held-out perplexity | WikiText-2 perplexity |",
                "|---|---|---|---|",
                f"| base | {c['base_val_loss']:.3f} | {c['base_ppl']:.2f} | "
                f"{f['perplexity_before']:.2f} |",
                f"| tuned | {c['tuned_val_loss']:.3f} | {c['tuned_ppl']:.2f} | "
                f"{f['perplexity_after']:.2f} ({100 * f['relative_change']:+.1f}%) |", ""]
    m = results.get("multitask")
    if m:
        out += ["## Multi-task: one adapter over SST-2 (as instructions) + DialogSum + Alpaca", "",
                f"{m['rows_per_task']} training rows per task, equal weights "
                f"({m['mixture']['steps']} steps) vs three single-task runs on the same rows; "
                f"validation loss on {m['val_rows_per_task']} held-out rows per task.", "",
                "| task | base | single-task | multi-task |", "|---|---|---|---|"]
        for name, single in m["single"].items():
            out.append(f"| {name} | {single['base_val_loss']:.3f} | {single['val_loss']:.3f} | "
                       f"{m['mixture']['val_loss'][name]:.3f} |")
        out.append("")
    fs = results.get("fewshot")
    if fs:
        out += ["## Few-shot: SST-2, k examples per class", "",
                f"Accuracy on {fs['dev_rows']} SST-2 dev sentences. *In-context*: the base model "
                "with k demonstrations per class in the prompt (verbaliser words compared). "
                "*Trained*: LoRA on the same 2k rows (verbaliser classification).", "",
                "| k per class | in-context accuracy | prompt tokens | trained accuracy | "
                "trained macro-F1 |", "|---|---|---|---|---|"]
        for r in fs["rows"]:
            t = r.get("trained")
            out.append(f"| {r['k']} | {100 * r['in_context']['accuracy']:.1f} | "
                       f"{r['in_context']['prompt_tokens']} | "
                       + (f"{100 * t['accuracy']:.1f} | {100 * t['macro_f1']:.1f} |" if t
                          else "(zero-shot) | |"))
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ["summarization", "chat", "multitask", "fewshot"]
    ap.add_argument("--parts", nargs="+", default=parts, choices=parts)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default=str(REPO / "runs" / "bench_applications"))
    ap.add_argument("--results", default=str(RESULTS / "applications.json"))
    args = ap.parse_args()
    if not (SHARED / "dialogsum").is_dir():
        raise SystemExit(f"needs the shared data sets in {SHARED}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = Path(args.results)
    runners = {"summarization": run_summarization, "chat": run_chat,
               "multitask": run_multitask, "fewshot": run_fewshot}
    for part in args.parts:
        if part == "multitask":
            result = run_multitask(work, args.quick, args.threads, path)
        else:
            result = runners[part](work, args.quick, args.threads)
        result["quick"] = args.quick
        print(save_part(path, part, result, write_tables))


if __name__ == "__main__":
    main()
