"""ORPO (Hong et al. 2024): supervised fine-tuning on the chosen answers plus a term that
raises the odds of the chosen answer over the rejected one. No reference model: one forward
over the pairs per step, with any method.

    odds(y) = p(y) / (1 - p(y)),  p(y) = exp(average log-prob of the answer's tokens)
    log_odds = log odds(y_c) - log odds(y_r)
             = (avg_c - avg_r) - (log(1 - e^avg_c) - log(1 - e^avg_r))
    loss = NLL(chosen) - beta * log sigmoid(log_odds)

The NLL is a mean over the batch's chosen tokens, the odds-ratio term a mean over pairs
(both as in TRL). The implicit reward logged is ``beta * avg`` (as TRL logs it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.config import RunConfig
from peftlab.data.preference import prepare_preference_data
from peftlab.data.sft import ensure_chat_template
from peftlab.runtime.precision import autocast_for
from peftlab.tasks.base import PreparedTask, TaskSpec, register_task
from peftlab.tasks.orpo.config import ORPOConfig
from peftlab.tasks.pairwise import REWARD_METRICS, PairTask, answer_logps, reward_metrics


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair odds-ratio losses ``-beta log sigmoid(log_odds)`` and the log odds ratios."""
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    return -beta * F.logsigmoid(log_odds), log_odds


class ORPOTask(PairTask):
    """Pairs of (chosen, rejected) answers; loss = NLL(chosen) + the odds-ratio term."""

    cfg: ORPOConfig

    def pair_terms(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        n = len(batch["ids"])
        sums, counts, whole = answer_logps(model, batch, whole_chosen=self.cfg.nll_on_prompt)
        avg = sums / counts.clamp(min=1)
        losses, log_odds = odds_ratio_loss(avg[:n], avg[n:], self.cfg.beta)
        if whole is not None:  # TRL's variant: every real token of the chosen rows
            tokens = batch["attention_mask"][:n, 1:].sum()
            nll = -whole.sum() / tokens.clamp(min=1)
        else:
            nll = -sums[:n].sum() / counts[:n].sum().clamp(min=1)
        beta = self.cfg.beta
        return {"losses": losses, "log_odds": log_odds.detach(), "nll": nll,
                "chosen": beta * avg[:n].detach(), "rejected": beta * avg[n:].detach()}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Summed over pairs; the NLL (a token mean) is counted once per pair so the
        Trainer's division by the pair count leaves it a mean."""
        terms = self.pair_terms(model, batch)
        n = len(batch["ids"])
        return terms["losses"].sum() + terms["nll"] * n, n

    def metric_names(self, examples: list[dict[str, Any]]) -> list[str]:
        return [*REWARD_METRICS, "log_odds_ratio", "log_odds_chosen", "nll"] if examples else []

    @torch.no_grad()
    def metrics(self, model: nn.Module, examples: list[dict[str, Any]], batch_size: int,
                precision: str) -> dict[str, float]:
        """Reward metrics of ``beta * avg log p``, mean log sigmoid(log odds) ("log_odds_ratio"
        in TRL), mean log odds ratio ("log_odds_chosen") and the chosen answers' NLL."""
        if not examples:
            return {}
        was_training = model.training
        model.eval()
        chosen, rejected, log_odds, nll, pairs = [], [], [], 0.0, 0
        with autocast_for(precision):
            for start in range(0, len(examples), batch_size):
                batch = self.collate(examples[start:start + batch_size])
                terms = self.pair_terms(model, batch)
                chosen.append(terms["chosen"])
                rejected.append(terms["rejected"])
                log_odds.append(terms["log_odds"].float())
                nll += float(terms["nll"]) * len(batch["ids"])
                pairs += len(batch["ids"])
        model.train(was_training)
        lo = torch.cat(log_odds)
        return {**reward_metrics(torch.cat(chosen), torch.cat(rejected)),
                "log_odds_ratio": round(float(F.logsigmoid(lo).mean()), 5),
                "log_odds_chosen": round(float(lo.mean()), 5),
                "nll": round(nll / max(pairs, 1), 5)}


def build_orpo_task(cfg: RunConfig, tokenizer: Any) -> PreparedTask:
    """Task builder for ``task: orpo`` (a causal LM on preference pairs; no reference)."""
    ensure_chat_template(tokenizer)
    train, val, report = prepare_preference_data(cfg, tokenizer)
    return PreparedTask(ORPOTask(tokenizer.pad_token_id, cfg.task_config), train, val, report,
                        model_kind="causal_lm")


register_task(TaskSpec("orpo", build_orpo_task, ORPOConfig))
