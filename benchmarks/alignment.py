"""Alignment on real data: a reward model and DPO on HH-RLHF harmless, PPO against a classifier.

    python benchmarks/alignment.py                      # reward + dpo + ppo (~1 h on 2 cores)
    python benchmarks/alignment.py --parts reward dpo   # any subset
    python benchmarks/alignment.py --quick              # small subsets, minutes

- reward: `minilm-l6` + LoRA with a scalar head, Bradley-Terry loss, on the first 2,000
  pairs of ../shared/data/hh_rlhf_harmless; held-out pairwise accuracy on the remaining 312.
- dpo: `smollm2-135m-instruct` + LoRA, sigmoid DPO, reference = the same model with the
  adapter off (log-probs precomputed once). Held-out reward accuracy, and the policy's
  preference log p(chosen) - log p(rejected) on the held-out pairs before and after.
- ppo: a sentiment classifier (`minilm-l6` + LoRA on SST-2), then PPO on
  `smollm2-135m-instruct` + LoRA: prompts ask to continue the opening words of SST-2
  sentences; reward = P(positive) of the continuation. Mean reward before/after on held-out
  prompts, KL to the reference, reward curve PNG.

Each part runs through `peftlab.train` exactly as `peftlab train CONFIG` would. Results go to
benchmarks/results/alignment.{json,md} (parts not run keep their previous entries).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

from _common import REPO, RESULTS, SHARED, save_part, sst2_rows, write_jsonl

LORA = {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}


def hh_split(work: Path, n_train: int, n_eval: int | None) -> dict:
    """First ``n_train`` pairs train, the rest (or ``n_eval`` of them) evaluate."""
    rows = [json.loads(x) for x in (SHARED / "hh_rlhf_harmless" / "harmless-base_test.jsonl").open()]
    held = rows[2000:] if n_eval is None else rows[2000:2000 + n_eval]
    return {"train": write_jsonl(work / "hh_train.jsonl", rows[:n_train]),
            "validation": write_jsonl(work / "hh_eval.jsonl", held),
            "n_train": n_train, "n_eval": len(held)}


def run_reward(work: Path, quick: bool, threads: int | None) -> dict:
    import peftlab

    data = hh_split(work, 200 if quick else 2000, 64 if quick else None)
    cfg = {
        "model": "minilm-l6", "task": "reward", "method": LORA,
        "data": {"train": data["train"], "validation": data["validation"], "on_error": "skip"},
        "train": {"epochs": 1, "batch_size": 8, "lr": 3e-4, "max_length": 512, "seed": 0,
                  "warmup_ratio": 0.06, "log_every": 25, "num_threads": threads},
        "output_dir": str(work / "reward"),
    }
    t0 = time.perf_counter()
    summary = peftlab.train(cfg, progress=True)
    hist = [r for r in summary.result.history if "val_accuracy" in r]
    report = summary.data_report
    return {
        "model": "minilm-l6", "method": "lora r16 all-linear + scalar head",
        "train_pairs_read": data["n_train"], "eval_pairs_read": data["n_eval"],
        "data_report": report,
        "val_accuracy_first_eval": hist[0]["val_accuracy"] if hist else None,
        "val_accuracy": hist[-1]["val_accuracy"] if hist else None,
        "val_margin": hist[-1].get("val_margin") if hist else None,
        "history": hist, "steps": summary.result.steps,
        "seconds": round(time.perf_counter() - t0, 1), "output_dir": cfg["output_dir"],
    }


def _preference(model, task, examples, batch_size: int) -> dict:
    """log p(chosen) - log p(rejected) of the policy and of the reference, per held-out pair."""
    import torch

    from peftlab.methods.reference import reference_policy
    from peftlab.models.lm import completion_logps

    def logps(batch):
        n = batch["input_ids"].shape[0] // 2
        lp = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return lp[:n], lp[n:]

    pol, ref = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = task.collate(examples[start:start + batch_size])
            c, r = logps(batch)
            pol.append(c - r)
            with reference_policy(model):
                c, r = logps(batch)
            ref.append(c - r)
    pol_t, ref_t = torch.cat(pol), torch.cat(ref)
    return {"before_mean_logp_margin": round(float(ref_t.mean()), 4),
            "after_mean_logp_margin": round(float(pol_t.mean()), 4),
            "before_prefers_chosen": round(float((ref_t > 0).float().mean()), 4),
            "after_prefers_chosen": round(float((pol_t > 0).float().mean()), 4),
            "margin_increased": round(float((pol_t > ref_t).float().mean()), 4)}


def run_dpo(work: Path, quick: bool, threads: int | None) -> dict:
    import peftlab
    from peftlab.config import from_dict
    from peftlab.tasks.dpo.task import build_dpo_task

    data = hh_split(work, 64 if quick else 2000, 32 if quick else None)
    cfg = {
        "model": "smollm2-135m-instruct", "task": "dpo", "method": LORA,
        "data": {"train": data["train"], "validation": data["validation"], "on_error": "skip"},
        "dpo": {"beta": 0.1, "reference": "precomputed"},
        # 100 steps = 800 pairs (~0.56 epoch of the pairs that fit in 256 tokens): one epoch
        # would take ~1 h on one core of this machine. Validation only at the end.
        "train": {"max_steps": 6 if quick else 100, "batch_size": 8, "lr": 1e-4,
                  "max_length": 256, "seed": 0, "warmup_ratio": 0.05, "log_every": 10,
                  "num_threads": threads},
        "output_dir": str(work / "dpo"),
    }
    t0 = time.perf_counter()
    summary = peftlab.train(cfg, progress=True)
    seconds = time.perf_counter() - t0
    hist = [r for r in summary.result.history if "val_reward_accuracy" in r]
    # before/after preference of the policy itself, on the held-out pairs
    run_cfg = from_dict(cfg)
    model, tokenizer = peftlab.load(run_cfg.model, summary.adapter_dir)
    prepared = build_dpo_task(run_cfg, tokenizer)
    pref = _preference(model, prepared.task, prepared.validation, batch_size=8)
    return {
        "model": "smollm2-135m-instruct", "method": "lora r16 all-linear", "beta": 0.1,
        "train_pairs_read": data["n_train"], "eval_pairs_read": data["n_eval"],
        "data_report": summary.data_report,
        "val_reward_accuracy": hist[-1]["val_reward_accuracy"] if hist else None,
        "val_margin": hist[-1].get("val_margin") if hist else None,
        "history": hist, "preference": pref, "steps": summary.result.steps,
        "seconds": round(seconds, 1), "output_dir": cfg["output_dir"],
    }


def sentiment_prompts(n: int, seed: int, words: int = 6) -> list[dict]:
    """Review openings from SST-2 sentences (long ones only, so the opening is not a verdict)."""
    rows = [r["text"] for r in sst2_rows("train.tsv") if len(r["text"].split()) >= 14]
    rows = sorted(set(rows))
    random.Random(seed).shuffle(rows)
    return [{"prompt": "Continue this movie review with one more sentence.\n\n"
                       + " ".join(t.split()[:words]) + " ..."} for t in rows[:n]]


def run_ppo(work: Path, quick: bool, threads: int | None) -> dict:
    import peftlab

    t0 = time.perf_counter()
    train = sst2_rows("train.tsv")
    random.Random(0).shuffle(train)
    clf_cfg = {
        "model": "minilm-l6", "task": "classification",
        "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
        "data": {"train": write_jsonl(work / "sst2_train.jsonl", train[:300 if quick else 4000]),
                 "validation": write_jsonl(work / "sst2_dev.jsonl", sst2_rows("dev.tsv"))},
        "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "max_length": 128, "seed": 0,
                  "warmup_ratio": 0.06, "log_every": 50, "num_threads": threads},
        "output_dir": str(work / "sst2_classifier"),
    }
    peftlab.train(clf_cfg, progress=True)
    clf_report = json.loads((work / "sst2_classifier" / "eval_classification.json").read_text())
    clf_seconds = time.perf_counter() - t0

    prompts = sentiment_prompts(16 if quick else 576, seed=0)
    n_val = 8 if quick else 64
    ppo_cfg = {
        "model": "smollm2-135m-instruct", "task": "ppo", "method": LORA,
        "data": {"train": write_jsonl(work / "ppo_prompts.jsonl", prompts[n_val:]),
                 "validation": write_jsonl(work / "ppo_val_prompts.jsonl", prompts[:n_val])},
        "ppo": {"reward_classifier": str(work / "sst2_classifier"), "reward_label": "1",
                "iterations": 2 if quick else 24, "rollout_batch_size": 8 if quick else 16,
                "minibatch_size": 8, "ppo_epochs": 2, "max_new_tokens": 32,
                "kl_coef": 0.05, "whiten_rewards": False},
        "train": {"lr": 1e-4, "seed": 0, "warmup_ratio": 0.0, "num_threads": threads,
                  "eval_every": 1 if quick else 6},
        "output_dir": str(work / "ppo"),
    }
    t1 = time.perf_counter()
    summary = peftlab.train(ppo_cfg, progress=True)
    ppo_seconds = time.perf_counter() - t1
    lines = [json.loads(x) for x in (work / "ppo" / "metrics.jsonl").read_text().splitlines()]
    vals = [(r["step"], r["val_reward_mean"]) for r in lines if "val_reward_mean" in r]
    hist = summary.result.history
    png = RESULTS / "alignment_ppo_reward.png"
    shutil.copyfile(work / "ppo" / "reward.png", png)
    samples = _ppo_samples(work / "ppo", prompts[:4])
    return {
        "classifier": {"model": "minilm-l6", "train_rows": 300 if quick else 4000,
                       "dev_accuracy": clf_report.get("accuracy"),
            "seconds": round(clf_seconds, 1)},
        "policy": "smollm2-135m-instruct + lora r16 all-linear",
        "iterations": ppo_cfg["ppo"]["iterations"],
        "rollout_batch_size": ppo_cfg["ppo"]["rollout_batch_size"],
        "val_prompts": n_val,
        "val_reward_before": vals[0][1] if vals else None,
        "val_reward_after": vals[-1][1] if vals else None,
        "val_curve": vals,
        "train_reward_first": hist[0]["reward_mean"], "train_reward_last": hist[-1]["reward_mean"],
        "kl_last": hist[-1]["kl"], "kl_max": max(r["kl"] for r in hist),
        "reward_curve_png": str(png.relative_to(REPO)), "samples": samples,
        "ppo_seconds": round(ppo_seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }


def _ppo_samples(run: Path, prompts: list[dict]) -> list[dict]:
    """Greedy continuations of a few held-out prompts by the base model and the tuned policy."""
    import peftlab
    from peftlab.evaluation.generate import generate_replies
    from peftlab.methods.lora import disable_adapters

    model, tokenizer = peftlab.load("smollm2-135m-instruct", run / "adapter")
    convs = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    tuned = generate_replies(model, tokenizer, convs, max_new_tokens=32)
    with disable_adapters(model):
        base = generate_replies(model, tokenizer, convs, max_new_tokens=32)
    return [{"prompt": p["prompt"].split("\n\n")[-1], "base": b, "tuned": t}
            for p, b, t in zip(prompts, base, tuned, strict=True)]


def write_tables(results: dict) -> str:
    out = ["# Alignment on real data", ""]
    def kept(part: dict) -> str:
        tr, va = part["data_report"]["train"], part["data_report"]["validation"]
        return (f"pairs kept after the max-length filter ({tr['max_length']} tokens): "
                f"{tr['kept']} train, {va['kept']} held-out")

    r = results.get("reward")
    if r:
        out += ["## Reward model on HH-RLHF harmless", "",
                f"`{r['model']}` + {r['method']}; first {r['train_pairs_read']} pairs train "
                f"remaining {r['eval_pairs_read']} evaluate ({kept(r)}); {r['steps']} steps, "
                f"{r['seconds']:.0f} s.", "",
                "| held-out pairwise accuracy | mean margin r(chosen) - r(rejected) |",
                "|---|---|",
                f"| {r['val_accuracy']:.3f} | {r['val_margin']:.3f} |", "",
                "Validation runs once, after training (nothing is selected on the held-out "
                "pairs); an untrained head scores 0.5 in expectation.", ""]
    d = results.get("dpo")
    if d:
        p = d["preference"]
        out += ["## DPO on HH-RLHF harmless", "",
                f"`{d['model']}` + {d['method']}, beta {d['beta']}, reference = adapter off "
                f"(precomputed); first {d['train_pairs_read']} pairs train, remaining "
                f"{d['eval_pairs_read']} evaluate ({kept(d)}); {d['steps']} steps, "
                f"{d['seconds']:.0f} s.", "",
                "| held-out | before (base) | after (DPO) |", "|---|---|---|",
                f"| reward accuracy (implicit reward, chosen > rejected) | 0.5 by construction | "
                f"{d['val_reward_accuracy']:.3f} |",
                f"| share of pairs where log p(chosen) > log p(rejected) | "
                f"{p['before_prefers_chosen']:.3f} | {p['after_prefers_chosen']:.3f} |",
                f"| mean log p(chosen) - log p(rejected) | {p['before_mean_logp_margin']:.2f} | "
                f"{p['after_mean_logp_margin']:.2f} |",
                f"| pairs whose margin grew | | {p['margin_increased']:.3f} |", ""]
    q = results.get("ppo")
    if q:
        c = q["classifier"]
        out += ["## PPO: positive movie-review continuations", "",
                f"Reward = P(positive) from a `{c['model']}` + LoRA SST-2 classifier "
                f"({c['train_rows']} rows, dev accuracy {c['dev_accuracy']:.3f}); policy "
                f"{q['policy']}; {q['iterations']} iterations x {q['rollout_batch_size']} "
                f"rollouts; {q['val_prompts']} held-out prompts.", "",
                "| mean reward on held-out prompts | before | after | KL to reference "
                "(last iteration, nats/answer) | PPO time | whole run |", "|---|---|---|---|---|---|",
                f"| | {q['val_reward_before']:.3f} | {q['val_reward_after']:.3f} | "
                f"{q['kl_last']:.2f} | {q['ppo_seconds'] / 60:.1f} min | "
                f"{q['total_seconds'] / 60:.1f} min |", "",
                f"![reward curve]({Path(q['reward_curve_png']).name})", ""]
        for s in q["samples"]:
            out.append(f"- *{s['prompt']}* — base: {s['base']!r} — tuned: {s['tuned']!r}")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["reward", "dpo", "ppo"],
                    choices=["reward", "dpo", "ppo"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default=str(REPO / "runs" / "bench_alignment"))
    ap.add_argument("--results", default=str(RESULTS / "alignment.json"))
    args = ap.parse_args()
    if not (SHARED / "hh_rlhf_harmless").is_dir():
        raise SystemExit(f"needs the shared data sets in {SHARED}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = Path(args.results)
    runners = {"reward": run_reward, "dpo": run_dpo, "ppo": run_ppo}
    for part in args.parts:
        result = runners[part](work, args.quick, args.threads)
        result["quick"] = args.quick
        print(save_part(path, part, result, write_tables))


if __name__ == "__main__":
    main()
