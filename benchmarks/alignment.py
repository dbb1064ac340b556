"""Alignment on real data: reward model, DPO, PPO, GRPO, and DPO/KTO/ORPO/SimPO at one budget.

    python benchmarks/alignment.py                      # every part (~4 h on 2 shared cores)
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
- grpo: arithmetic word problems generated in code (peftlab.lab.arithmetic), reward 1 for
  the exact answer; `smollm2-135m-instruct` + LoRA; held-out accuracy of greedy answers
  before -> after, reward curve PNG.
- pref-dpo, pref-kto, pref-orpo, pref-simpo: the four preference objectives on the same HH-RLHF
  pairs with the same budget (steps, pairs per step, lr, LoRA, max length); KTO sees each
  pair as two unpaired examples. Held-out metrics computed the same way for all four: the
  implicit-reward accuracy against the base model (adapter off), and the share of pairs the
  policy itself prefers the chosen answer (summed and length-normalised log-probs).

Each part runs through `peftlab.train` exactly as `peftlab train CONFIG` would. Results go to
benchmarks/results/alignment.{json,md} (parts not run keep their previous entries).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from functools import partial
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


# 40 steps: on this machine shared by several people's jobs a step of 8 pairs took 60-100 s
# (load average 10-14 on 2 cores); 100 steps x 4 objectives would have taken a day.
PREF_STEPS, PREF_PAIRS_PER_STEP = 40, 8
PREF_TASKS = {
    "dpo": {"dpo": {"beta": 0.1}},  # reference: adapter off at every step
    "kto": {"kto": {"beta": 0.1}},
    "orpo": {"orpo": {"beta": 0.1}},
    "simpo": {"simpo": {"beta": 2.0, "simpo_gamma": 1.0}},
}


def _pair_table(pol, ref, cnt) -> dict:
    c, r = pol["chosen"], pol["rejected"]
    bc, br = ref["chosen"], ref["rejected"]
    nc, nr = cnt["chosen"], cnt["rejected"]

    def share(x) -> float:
        return round(float(x.float().mean()), 4)

    return {"implicit_reward_accuracy": share((c - bc) > (r - br)),
            "sum_prefers_chosen_before": share(bc > br), "sum_prefers_chosen_after": share(c > r),
            "avg_prefers_chosen_before": share(bc / nc > br / nr),
            "avg_prefers_chosen_after": share(c / nc > r / nr),
            "mean_logp_margin_before": round(float((bc - br).mean()), 3),
            "mean_logp_margin_after": round(float((c - r).mean()), 3),
            "pairs": int(len(c))}


def held_out_pairs(model, task, examples, batch_size: int = 8) -> dict:
    """Per-pair chosen/rejected log-probs of policy and base, then :func:`_pair_table`."""
    import torch

    from peftlab.methods.reference import reference_policy
    from peftlab.models.lm import IGNORE_INDEX, completion_logps

    sides = {k: {"chosen": [], "rejected": []} for k in ("pol", "ref", "cnt")}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = task.collate(examples[start:start + batch_size])
            n = len(batch["ids"])
            args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
            values = {"pol": completion_logps(model, *args)}
            with reference_policy(model):
                values["ref"] = completion_logps(model, *args)
            values["cnt"] = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).float()
            for key, v in values.items():
                sides[key]["chosen"].append(v[:n])
                sides[key]["rejected"].append(v[n:])
    cat = {k: {s: torch.cat(v) for s, v in d.items()} for k, d in sides.items()}
    return _pair_table(cat["pol"], cat["ref"], cat["cnt"])


def run_pref(name: str, work: Path, quick: bool, threads: int | None) -> dict:
    """One preference objective at the shared budget; held-out pairs scored after training."""
    import peftlab
    from peftlab.config import from_dict
    from peftlab.tasks.dpo.task import build_dpo_task

    data = hh_split(work, 64 if quick else 2000, 32 if quick else None)
    steps = 4 if quick else PREF_STEPS
    # KTO's examples are single answers: 2 x 8 of them hold the answers of 8 pairs
    batch = PREF_PAIRS_PER_STEP * (2 if name == "kto" else 1)
    cfg = {
        "model": "smollm2-135m-instruct", "task": name, "method": LORA,
        "data": {"train": data["train"], "on_error": "skip"},
        **PREF_TASKS[name],
        "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-4, "max_length": 256,
                  "seed": 0, "warmup_ratio": 0.05, "log_every": 10, "num_threads": threads},
        "output_dir": str(work / f"pref_{name}"),
    }
    t0 = time.perf_counter()
    summary = peftlab.train(cfg, progress=True, overwrite=True)
    train_seconds = summary.result.seconds
    # the held-out pairs, tokenized once the same way for every objective
    eval_cfg = from_dict({**cfg, "task": "dpo", "data": {"train": data["train"],
                          "validation": data["validation"], "on_error": "skip"}})
    model, tokenizer = peftlab.load(eval_cfg.model, summary.adapter_dir)
    prepared = build_dpo_task(eval_cfg, tokenizer)
    scores = held_out_pairs(model, prepared.task, prepared.validation)
    return {"task": name, "model": "smollm2-135m-instruct", "method": "lora r16 all-linear",
            "options": PREF_TASKS[name][name], "steps": summary.result.steps,
            "batch_size": batch, "train_pairs_read": data["n_train"],
            "eval_pairs_read": data["n_eval"], "data_report": summary.data_report,
            "train_examples": summary.data_report["train"]["kept"],
            "final_train_loss": summary.result.final_train_loss, **scores,
            "train_seconds": round(train_seconds, 1),
            "seconds": round(time.perf_counter() - t0, 1), "output_dir": cfg["output_dir"]}


def run_grpo(work: Path, quick: bool, threads: int | None) -> dict:
    import peftlab
    from peftlab.lab.arithmetic import write_arithmetic_data

    paths = write_arithmetic_data(work / "arithmetic", n_train=2000,
                                  n_validation=16 if quick else GRPO_VAL, seed=0)
    steps = 2 if quick else GRPO_STEPS
    cfg = {
        "model": "smollm2-135m-instruct", "task": "grpo", "method": LORA,
        "data": {"train": str(paths["train"]), "validation": str(paths["validation"])},
        "grpo": {"reward_function": "peftlab.lab.arithmetic:exact_answer",
                 "num_generations": 4, "generation_batch_size": 16,
                 "max_completion_length": 48, "temperature": 0.8, "beta": 0.04,
                 "loss_type": "dapo"},
        # validation (greedy answers to the held-out problems) at the start and the end only
        "train": {"max_steps": steps, "batch_size": 16, "lr": 1e-4, "warmup_ratio": 0.0,
                  "scheduler": "constant", "max_length": 256, "seed": 0,
                  "eval_every": steps, "num_threads": threads},
        "output_dir": str(work / "grpo"),
    }
    t0 = time.perf_counter()
    summary = peftlab.train(cfg, progress=True, overwrite=True)
    seconds = time.perf_counter() - t0
    room = grpo_room_check(work / "grpo", paths["validation"])
    lines = [json.loads(x) for x in (work / "grpo" / "metrics.jsonl").read_text().splitlines()]
    vals = [(r["step"], r["val_reward_mean"]) for r in lines if "val_reward_mean" in r]
    hist = summary.result.history
    png = RESULTS / "alignment_grpo_reward.png"
    shutil.copyfile(work / "grpo" / "reward.png", png)
    return {
        "policy": "smollm2-135m-instruct + lora r16 all-linear", "options": cfg["grpo"],
        "lr": cfg["train"]["lr"], "steps": summary.result.steps,
        "prompts_seen": summary.result.steps * cfg["grpo"]["generation_batch_size"]
        // cfg["grpo"]["num_generations"],
        "val_problems": sum(1 for _ in paths["validation"].open()),
        "val_accuracy_before": vals[0][1] if vals else None,
        "val_accuracy_after": vals[-1][1] if vals else None, "val_curve": vals,
        "train_reward_first": hist[0]["reward_mean"],
        "train_reward_last5": round(sum(r["reward_mean"] for r in hist[-5:]) / len(hist[-5:]), 4),
        "completion_length_first": hist[0]["completion_length"],
        "completion_length_last": hist[-1]["completion_length"],
        "kl_last": hist[-1].get("kl"), "reward_curve_png": str(png.relative_to(REPO)),
        "seconds": round(seconds, 1), "train_seconds": round(summary.result.seconds, 1),
        "room_check": room,
    }


def grpo_room_check(run: Path, validation: Path, max_new_tokens: int = 128) -> dict:
    """Greedy held-out accuracy of the base (adapter off) and the tuned policy with room to
    finish (``max_new_tokens``, vs the 48 of training): how much of the gain is shorter answers
    that now fit, and how much is answers that are right."""
    import peftlab
    from peftlab.evaluation.generate import generate_replies
    from peftlab.lab.arithmetic import exact_answer
    from peftlab.methods.lora import disable_adapters

    rows = [json.loads(x) for x in validation.open()]
    convs = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    answers = [r["answer"] for r in rows]
    model, tokenizer = peftlab.load("smollm2-135m-instruct", run / "adapter")
    out = {"max_new_tokens": max_new_tokens, "problems": len(rows)}
    tuned = generate_replies(model, tokenizer, convs, max_new_tokens=max_new_tokens,
                             batch_size=16)
    with disable_adapters(model):
        base = generate_replies(model, tokenizer, convs, max_new_tokens=max_new_tokens,
                                batch_size=16)
    for name, replies in (("base", base), ("tuned", tuned)):
        right = exact_answer([""] * len(rows), replies, answer=answers)
        out[f"{name}_accuracy"] = round(sum(right) / len(rows), 4)
        out[f"{name}_mean_words"] = round(sum(len(r.split()) for r in replies) / len(rows), 1)
    out["samples"] = [{"prompt": r["prompt"], "answer": r["answer"], "base": b, "tuned": t}
                      for r, b, t in list(zip(rows, base, tuned, strict=True))[:3]]
    return out


# One round of 16 answers (4 problems x 4) took 1-2 min here under load; 24 rounds and two
# validations of 150 problems fit the ~30 min budget when the machine is not overloaded.
GRPO_STEPS, GRPO_VAL = 24, 150


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
    gr = results.get("grpo")
    if gr:
        o = gr["options"]
        out += ["## GRPO: arithmetic word problems with exact answers", "",
                f"Policy {gr['policy']}; reward 1 for the exact answer (last number of the "
                f"reply); {gr['steps']} optimizer steps x {o['generation_batch_size']} answers "
                f"({o['num_generations']} per prompt, {gr['prompts_seen']} prompts), "
                f"temperature {o['temperature']}, beta {o['beta']}, loss {o['loss_type']}, "
                f"lr {gr['lr']}; {gr['val_problems']} held-out problems, greedy answers.", "",
                "| held-out accuracy before | after | train reward first round | last 5 rounds "
                "| answer tokens first -> last round | KL (k3, per token) | time |",
                "|---|---|---|---|---|---|---|",
                f"| {gr['val_accuracy_before']:.3f} | {gr['val_accuracy_after']:.3f} | "
                f"{gr['train_reward_first']:.3f} | {gr['train_reward_last5']:.3f} | "
                f"{gr['completion_length_first']:.0f} -> {gr['completion_length_last']:.0f} | "
                f"{gr['kl_last'] or 0:.4f} | {gr['seconds'] / 60:.1f} min |", "",
                f"![GRPO reward curve]({Path(gr['reward_curve_png']).name})", ""]
        rc = gr.get("room_check")
        if rc:
            out += [f"With room to finish ({rc['max_new_tokens']} new tokens instead of "
                    f"{o['max_completion_length']}), greedy held-out accuracy is "
                    f"{rc['base_accuracy']:.3f} (base, {rc['base_mean_words']:.0f} words per "
                    f"answer) -> {rc['tuned_accuracy']:.3f} (tuned, "
                    f"{rc['tuned_mean_words']:.0f} words).", ""]
    prefs = [results[f"pref-{t}"] for t in PREF_TASKS if f"pref-{t}" in results]
    if prefs:
        p0 = prefs[0]
        out += ["## DPO, KTO, ORPO and SimPO on HH-RLHF harmless at one budget", "",
                f"`{p0['model']}` + {p0['method']}; first {p0['train_pairs_read']} pairs "
                f"train, the remaining {p0['eval_pairs_read']} evaluate ({p0['pairs']} fit in "
                f"256 tokens); {p0['steps']} steps x {PREF_PAIRS_PER_STEP} pairs (KTO: the "
                "same answers as 16 unpaired examples), lr 1e-4. Held-out metrics are computed "
                "the same way for every objective, after training.", "",
                "| objective | options | implicit-reward accuracy vs base | policy prefers "
                "chosen (summed log p) before -> after | (length-normalised) before -> after "
                "| train time |", "|---|---|---|---|---|---|"]
        for p in prefs:
            opts = ", ".join(f"{k} {v}" for k, v in p["options"].items())
            out.append(f"| {p['task']} | {opts} | {p['implicit_reward_accuracy']:.3f} | "
                       f"{p['sum_prefers_chosen_before']:.3f} -> "
                       f"{p['sum_prefers_chosen_after']:.3f} | "
                       f"{p['avg_prefers_chosen_before']:.3f} -> "
                       f"{p['avg_prefers_chosen_after']:.3f} | "
                       f"{p['train_seconds'] / 60:.1f} min |")
        out += ["", "Implicit-reward accuracy: the share of held-out pairs where "
                "log pi/base of the chosen answer exceeds that of the rejected one (DPO's reward "
                "accuracy, chance level 0.5; computed for every objective against the "
                "adapter-off base).", ""]
    return "\n".join(out)


def machine_note(threads: int | None) -> dict:
    """The CPU and how busy it was: the 2 cores are shared with other people's jobs, so times
    are what this run got, not what the machine can do."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()], "shared": True}


PARTS = ["reward", "dpo", "ppo", "grpo", *(f"pref-{t}" for t in PREF_TASKS)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
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
    runners = {"reward": run_reward, "dpo": run_dpo, "ppo": run_ppo, "grpo": run_grpo,
               **{f"pref-{t}": partial(run_pref, t) for t in PREF_TASKS}}
    for part in args.parts:
        result = runners[part](work, args.quick, args.threads)
        result["quick"] = args.quick
        result["machine"] = machine_note(args.threads)
        print(save_part(path, part, result, write_tables))


if __name__ == "__main__":
    main()
