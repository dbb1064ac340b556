"""Pieces shared by the pairwise preference objectives: the batch shape of every task on
(chosen, rejected) pairs (``PairTask``: reward, DPO, ORPO, SimPO) and, for the objectives
without a reference model (ORPO, SimPO), the answers' log-probs from one forward over a
``pad_pairs`` batch and the reward metrics."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftlab.data.preference import pad_pairs
from peftlab.models.lm import IGNORE_INDEX, token_logps
from peftlab.tasks.base import Task


class PairTask(Task):
    """A task on (chosen, rejected) pairs batched by ``pad_pairs``: an example is as long as
    its longer answer, a batch counts its pairs. Subclasses add the loss."""

    def __init__(self, pad_id: int, cfg: Any):
        self.pad_id, self.cfg = pad_id, cfg

    def length(self, example: dict[str, Any]) -> int:
        return max(len(example["chosen_input_ids"]), len(example["rejected_input_ids"]))

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return pad_pairs(examples, self.pad_id)

    def count(self, batch: dict[str, Any]) -> int:
        return len(batch["ids"])


def answer_logps(model: nn.Module, batch: dict[str, Any], whole_chosen: bool = False,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Summed log-prob and token count of each row's answer (``[2n]``: chosen rows, then
    rejected rows), and with ``whole_chosen`` the per-token log-probs of the chosen rows'
    every real token after the first (``[n, length - 1]``, 0 elsewhere) from the same pass."""
    n = len(batch["ids"])
    answer = batch["labels"][:, 1:] != IGNORE_INDEX
    keep = answer
    whole = None
    if whole_chosen:
        whole = batch["attention_mask"][:, 1:].bool()
        whole[n:] = False
        keep = answer | whole
    tok = token_logps(model, batch["input_ids"], batch["attention_mask"], keep)
    sums = (tok * answer).sum(1)
    counts = answer.sum(1)
    return sums, counts, (tok[:n] * whole[:n]) if whole is not None else None


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Pairwise accuracy of an implicit reward, its mean on both sides and the margin."""
    return {"reward_accuracy": round(float((chosen > rejected).float().mean()), 5),
            "chosen_reward": round(float(chosen.mean()), 5),
            "rejected_reward": round(float(rejected.mean()), 5),
            "margin": round(float((chosen - rejected).mean()), 5)}


REWARD_METRICS = ["reward_accuracy", "chosen_reward", "rejected_reward", "margin"]
