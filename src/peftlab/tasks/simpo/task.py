"""SimPO (Meng et al. 2024): a Bradley-Terry margin between the *average* log-probs of the
chosen and rejected answers, minus a target margin. No reference model: one forward over
the pairs per step, with any method.

    loss = -(1 - eps) log sigmoid(beta (avg_c - avg_r) - gamma)
           - eps log sigmoid(-(beta (avg_c - avg_r) - gamma))      [+ cpo_alpha * NLL(chosen)]

avg = the answer's summed log-prob / its token count (the length normalisation that keeps
SimPO from favouring long answers). The implicit reward is ``beta * avg``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.config import RunConfig
from peftlab.data.preference import prepare_preference_data
from peftlab.data.sft import ensure_chat_template
from peftlab.evaluation.loss import score_pairs
from peftlab.tasks.base import PreparedTask, TaskSpec, register_task
from peftlab.tasks.pairwise import REWARD_METRICS, PairTask, answer_logps, reward_metrics
from peftlab.tasks.simpo.config import SimPOConfig


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards ``beta * avg`` of both answers."""
    h = beta * (chosen_avg - rejected_avg) - gamma
    losses = -F.logsigmoid(h) * (1 - label_smoothing) - F.logsigmoid(-h) * label_smoothing
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


class SimPOTask(PairTask):
    """Pairs of (chosen, rejected) answers; loss = SimPO's margin loss (+ optional NLL)."""

    cfg: SimPOConfig

    def pair_terms(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        n = len(batch["ids"])
        sums, counts, _ = answer_logps(model, batch)
        avg = sums / counts.clamp(min=1)
        losses, chosen, rejected = simpo_loss(avg[:n], avg[n:], self.cfg.beta,
                                              self.cfg.simpo_gamma, self.cfg.label_smoothing)
        nll = -sums[:n].sum() / counts[:n].sum().clamp(min=1)
        return {"losses": losses, "chosen": chosen, "rejected": rejected, "nll": nll}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Summed over pairs; the NLL (a mean over the batch's chosen tokens, as in TRL) is
        counted once per pair so the Trainer's division by the pair count leaves it a mean."""
        terms = self.pair_terms(model, batch)
        n = len(batch["ids"])
        total = terms["losses"].sum()
        if self.cfg.cpo_alpha:
            total = total + self.cfg.cpo_alpha * terms["nll"] * n
        return total, n

    def metric_names(self, examples: list[dict[str, Any]]) -> list[str]:
        return list(REWARD_METRICS) if examples else []

    @torch.no_grad()
    def metrics(self, model: nn.Module, examples: list[dict[str, Any]], batch_size: int,
                precision: str) -> dict[str, float]:
        """Pairwise accuracy of the implicit reward ``beta * avg log p``, rewards, margin."""
        if not examples:
            return {}

        def score(m: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
            terms = self.pair_terms(m, batch)
            return terms["chosen"], terms["rejected"]

        c, r = score_pairs(model, examples, self.collate, score, batch_size, precision)
        return reward_metrics(c, r)


def build_simpo_task(cfg: RunConfig, tokenizer: Any) -> PreparedTask:
    """Task builder for ``task: simpo`` (a causal LM on preference pairs; no reference)."""
    ensure_chat_template(tokenizer)
    train, val, report = prepare_preference_data(cfg, tokenizer)
    return PreparedTask(SimPOTask(tokenizer.pad_token_id, cfg.task_config), train, val, report,
                        model_kind="causal_lm")


register_task(TaskSpec("simpo", build_simpo_task, SimPOConfig))
