"""KTO (Ethayarajh et al. 2024): alignment from answers labelled only desirable or undesirable.

With r(y) = log pi(y|x) - log ref(y|x) and the reference point z = KL(pi || ref) estimated
on the batch itself (each prompt paired with *another* example's answer, detached, clamped
at 0):

    desirable:   w_d (1 - sigmoid(beta (r - z)))
    undesirable: w_u (1 - sigmoid(beta (z - r)))

averaged over the batch (as in TRL). ``loss_type: apo_zero_unpaired`` uses z = 0. The
reference is the model with its adapter switched off (no second copy). A step runs the policy
with gradient on the batch and three passes without: the policy on the mismatched pairs and
the reference on both.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.config import RunConfig
from peftlab.data.collate import IGNORE_INDEX
from peftlab.data.sft import ensure_chat_template
from peftlab.methods.reference import check_reference_method, reference_policy
from peftlab.models.lm import completion_logps
from peftlab.runtime.precision import autocast_for
from peftlab.tasks.base import PreparedTask, Task, TaskSpec, register_task
from peftlab.tasks.kto.config import KTOConfig
from peftlab.tasks.kto.data import prepare_kto_data


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor,
             kl: torch.Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, loss_type: str = "kto",
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example weighted losses and implicit rewards ``beta * log(pi/ref)``.

    ``kl`` is the (detached) reference point; ``desirable`` a bool tensor.
    """
    ratio = policy - reference
    if loss_type == "kto":
        good = 1 - F.sigmoid(beta * (ratio - kl))
        bad = 1 - F.sigmoid(beta * (kl - ratio))
    elif loss_type == "apo_zero_unpaired":
        good = 1 - F.sigmoid(beta * ratio)
        bad = F.sigmoid(beta * ratio)
    else:
        raise ValueError(f"kto.loss_type: unknown loss {loss_type!r} (kto or apo_zero_unpaired)")
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return losses, beta * ratio.detach()


def kl_reference_point(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """KTO's z: the batch mean of log pi/ref on the mismatched pairs, clamped at 0 (a KL is
    never negative; the estimate from a few pairs can be)."""
    return (policy - reference).mean().clamp(min=0)


def _pad(prompts: list[list[int]], answers: list[list[int]], pad_id: int,
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt + answer rows with labels on the answers only."""
    seqs = [p + a for p, a in zip(prompts, answers, strict=True)]
    longest = max(map(len, seqs))
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for row, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        input_ids[row, :len(p) + len(a)] = torch.tensor(p + a, dtype=torch.long)
        labels[row, len(p):len(p) + len(a)] = torch.tensor(a, dtype=torch.long)
        attention_mask[row, :len(p) + len(a)] = 1
    return input_ids, attention_mask, labels


class KTOTask(Task):
    """Unpaired answers labelled desirable/undesirable; loss = KTO against the adapter-off base."""

    def __init__(self, pad_id: int, cfg: KTOConfig):
        self.pad_id, self.cfg = pad_id, cfg

    def length(self, example: dict[str, Any]) -> int:
        return len(example["prompt_ids"]) + len(example["completion_ids"])

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """The batch, and the same prompts with the answers rotated by one (x_i, y_{i-1}):
        the mismatched pairs that estimate KL(pi || ref), as in TRL."""
        prompts = [ex["prompt_ids"] for ex in examples]
        answers = [ex["completion_ids"] for ex in examples]
        input_ids, attention_mask, labels = _pad(prompts, answers, self.pad_id)
        kl_ids, kl_mask, kl_labels = _pad(prompts, answers[-1:] + answers[:-1], self.pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "kl_input_ids": kl_ids, "kl_attention_mask": kl_mask, "kl_labels": kl_labels,
                "desirable": torch.tensor([bool(ex["label"]) for ex in examples]),
                "pair": torch.tensor([int(ex.get("pair", -1)) for ex in examples])}

    def count(self, batch: dict[str, Any]) -> int:
        return len(batch["desirable"])

    def terms(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        policy = completion_logps(model, *args)
        kl = torch.zeros((), device=policy.device)
        with torch.no_grad():
            if self.cfg.loss_type == "kto":
                kl_args = (batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])
                kl_policy = completion_logps(model, *kl_args)
            with reference_policy(model):
                reference = completion_logps(model, *args)
                if self.cfg.loss_type == "kto":
                    kl = kl_reference_point(kl_policy, completion_logps(model, *kl_args))
        cfg = self.cfg
        losses, rewards = kto_loss(policy, reference, batch["desirable"], kl, cfg.beta,
                                   cfg.desirable_weight, cfg.undesirable_weight, cfg.loss_type)
        return {"losses": losses, "rewards": rewards, "kl": kl}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        return self.terms(model, batch)["losses"].sum(), len(batch["desirable"])

    def metric_names(self, examples: list[dict[str, Any]]) -> list[str]:
        if not examples:
            return []
        names = ["kl", "desirable_reward", "undesirable_reward", "margin"]
        return names + ["reward_accuracy"] if _pairs(examples) else names

    @torch.no_grad()
    def metrics(self, model: nn.Module, examples: list[dict[str, Any]], batch_size: int,
                precision: str) -> dict[str, float]:
        """Mean implicit reward of desirable and undesirable answers and their margin, the
        batches' mean KL estimate, and where the examples came from pairs, the share of pairs
        whose desirable answer has the higher implicit reward."""
        if not examples:
            return {}
        was_training = model.training
        model.eval()
        rewards, kls = torch.zeros(len(examples)), []
        with autocast_for(precision):
            for start in range(0, len(examples), batch_size):
                batch = self.collate(examples[start:start + batch_size])
                terms = self.terms(model, batch)
                rewards[start:start + len(batch["desirable"])] = terms["rewards"].float().cpu()
                kls.append(float(terms["kl"]))
        model.train(was_training)
        good = torch.tensor([bool(ex["label"]) for ex in examples])
        out = {"kl": round(sum(kls) / len(kls), 5),
               "desirable_reward": round(_mean(rewards[good]), 5),
               "undesirable_reward": round(_mean(rewards[~good]), 5)}
        out["margin"] = round(out["desirable_reward"] - out["undesirable_reward"], 5)
        pairs = _pairs(examples)
        if pairs:
            wins = [float(rewards[g] > rewards[b]) for g, b in pairs]
            out["reward_accuracy"] = round(sum(wins) / len(wins), 5)
        return out


def _mean(x: torch.Tensor) -> float:
    return float(x.mean()) if len(x) else 0.0


def _pairs(examples: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(desirable index, undesirable index) of the pairs present in ``examples``."""
    sides: dict[int, dict[bool, int]] = {}
    for i, ex in enumerate(examples):
        if ex.get("pair", -1) >= 0:
            sides.setdefault(ex["pair"], {})[bool(ex["label"])] = i
    return [(s[True], s[False]) for s in sides.values() if len(s) == 2]


def build_kto_task(cfg: RunConfig, tokenizer: Any) -> PreparedTask:
    """Task builder for ``task: kto`` (a causal LM on labelled answers)."""
    check_reference_method(cfg.method_name, "task: kto")
    ensure_chat_template(tokenizer)
    train, val, report = prepare_kto_data(cfg, tokenizer)
    return PreparedTask(KTOTask(tokenizer.pad_token_id, cfg.task_config), train, val, report,
                        model_kind="causal_lm")


register_task(TaskSpec("kto", build_kto_task, KTOConfig))
