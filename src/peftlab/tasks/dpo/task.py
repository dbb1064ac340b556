"""Direct Preference Optimisation (Rafailov et al. 2023), with cDPO and IPO variants.

The policy is the model with its adapter; the reference is the *same* model with the
adapter switched off (:func:`reference_policy`), so no second copy is held in memory.
Alternatively (``dpo.reference: precomputed``) the reference log-probs of every pair are
computed once, at the first training step, and cached in
``OUTPUT_DIR/reference_logps.safetensors`` so later steps (and resumed runs) skip the
reference forward entirely.

Log-probs are summed over the final answer's tokens only, and the LM head runs only at
those positions (as in SFT): prompt positions never materialise vocabulary logits.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from peftlab.config import RunConfig
from peftlab.data.preference import prepare_preference_data
from peftlab.data.sft import ensure_chat_template
from peftlab.evaluation.loss import score_pairs
from peftlab.methods.reference import check_reference_method, reference_policy
from peftlab.models.lm import completion_logps
from peftlab.tasks.base import PreparedTask, TaskSpec, register_task
from peftlab.tasks.dpo.config import DPOConfig
from peftlab.tasks.pairwise import PairTask

# ----------------------------------------------------------------------------- maths


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid",
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards ``beta * log(pi/ref)`` of both answers.

    h = log pi(y_c)/ref(y_c) - log pi(y_r)/ref(y_r)
    sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps > 0: cDPO)
    ipo:     (h - 1 / (2 beta))^2                                        (Azar et al. 2023)
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * h) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * h) * label_smoothing)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss_type: unknown loss {loss_type!r} (sigmoid or ipo)")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------- the task


class DPOTask(PairTask):
    """Pairs of (chosen, rejected) completions; loss = DPO against the frozen reference."""

    def __init__(self, pad_id: int, cfg: DPOConfig, cache_path: str | Path | None = None,
                 examples: list[dict[str, Any]] | None = None, batch_size: int = 8,
                 model_name: str = ""):
        if cfg.reference == "precomputed" and (cache_path is None or examples is None):
            raise ValueError("dpo.reference 'precomputed' needs a cache path and the examples")
        self.pad_id = pad_id
        self.cfg = cfg
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.examples = examples or []
        self.batch_size = batch_size
        self.model_name = model_name
        self.ref: torch.Tensor | None = None  # [num_examples, 2] (chosen, rejected) when cached

    def pair_terms(self, model: nn.Module, batch: dict[str, Any],
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = len(batch["ids"])
        logps = completion_logps(model, batch["input_ids"], batch["attention_mask"],
                                 batch["labels"])
        ref = self.reference_logps(model, batch)
        return dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.cfg.beta,
                        self.cfg.label_smoothing, self.cfg.loss_type)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        losses, _, _ = self.pair_terms(model, batch)
        return losses.sum(), len(batch["ids"])

    @torch.no_grad()
    def reference_logps(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Reference log-probs of the batch's rows (chosen rows, then rejected rows)."""
        if self.cfg.reference == "precomputed":
            ref = self._cached(model)[batch["ids"]]
            return torch.cat([ref[:, 0], ref[:, 1]])
        with reference_policy(model):
            return completion_logps(model, batch["input_ids"], batch["attention_mask"],
                                    batch["labels"])

    def metric_names(self, examples: list[dict[str, Any]]) -> list[str]:
        """What :meth:`metrics` returns for ``examples``, known before any model runs."""
        return ["reward_accuracy", "chosen_reward", "rejected_reward", "margin"] if examples else []

    @torch.no_grad()
    def metrics(self, model: nn.Module, examples: list[dict[str, Any]], batch_size: int,
                precision: str) -> dict[str, float]:
        """Reward accuracy, mean implicit rewards of chosen/rejected answers and their margin."""
        if not examples:
            return {}
        c, r = score_pairs(model, examples, self.collate,
                           lambda m, batch: self.pair_terms(m, batch)[1:], batch_size, precision)
        return {"reward_accuracy": round(float((c > r).float().mean()), 5),
                "chosen_reward": round(float(c.mean()), 5),
                "rejected_reward": round(float(r.mean()), 5),
                "margin": round(float((c - r).mean()), 5)}

    # -- the precomputed reference ----------------------------------------------------
    def fingerprint(self) -> str:
        """Changes when the model name, the pairs' tokens or the loss's inputs change."""
        h = hashlib.sha256(self.model_name.encode())
        for ex in self.examples:
            h.update(json.dumps([ex["id"], ex["chosen_input_ids"], ex["chosen_labels"],
                                 ex["rejected_input_ids"], ex["rejected_labels"]]).encode())
        return h.hexdigest()

    def _cached(self, model: nn.Module) -> torch.Tensor:
        if self.ref is None:
            self.ref = self._load_cache() if self.cache_path.is_file() else None
            if self.ref is None:
                self.ref = self._compute_reference(model)
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                # per process: torchrun ranks may write the same cache at once
                tmp = self.cache_path.with_name(f"{self.cache_path.name}.{os.getpid()}.tmp")
                save_file({"reference_logps": self.ref}, str(tmp),
                          metadata={"fingerprint": self.fingerprint(), "columns": "chosen,rejected"})
                tmp.replace(self.cache_path)
        return self.ref

    def _load_cache(self) -> torch.Tensor | None:
        try:
            with safe_open(str(self.cache_path), framework="pt") as f:
                meta = f.metadata() or {}
                if (meta.get("fingerprint") != self.fingerprint()
                        or "reference_logps" not in f.keys()):
                    print(f"{self.cache_path}: made for other data or another model; "
                          "recomputing")
                    return None
                ref = f.get_tensor("reference_logps")
        except (SafetensorError, OSError) as exc:  # a cache: recomputing it loses nothing
            print(f"{self.cache_path}: unreadable ({exc}); recomputing")
            return None
        if tuple(ref.shape) != (len(self.examples), 2):
            raise ValueError(f"{self.cache_path}: key 'reference_logps' has shape "
                             f"{tuple(ref.shape)}, expected ({len(self.examples)}, 2)")
        return ref

    def _compute_reference(self, model: nn.Module) -> torch.Tensor:
        """Log-probs of every pair under the base (adapters off), or under the untrained
        policy (this runs before the first update) for methods that cannot be switched off."""
        print(f"computing reference log-probs of {len(self.examples)} pairs "
              f"-> {self.cache_path}")
        ref = torch.zeros(len(self.examples), 2)
        with reference_policy(model):  # without switchable adapters: the policy, in eval mode
            for start in range(0, len(self.examples), self.batch_size):
                chunk = self.examples[start:start + self.batch_size]
                batch = self.collate(chunk)
                logps = completion_logps(model, batch["input_ids"], batch["attention_mask"],
                                         batch["labels"])
                n = len(chunk)
                ref[batch["ids"]] = torch.stack([logps[:n], logps[n:]], dim=1).float().cpu()
        return ref


def build_dpo_task(cfg: RunConfig, tokenizer: Any) -> PreparedTask:
    """Task builder for ``task: dpo`` (a causal LM on preference pairs)."""
    if cfg.task_config.reference == "disabled_adapter":
        check_reference_method(cfg.method_name, "dpo.reference 'disabled_adapter'")
    ensure_chat_template(tokenizer)
    train, val, report = prepare_preference_data(cfg, tokenizer)
    cache = Path(cfg.output_dir) / "reference_logps.safetensors"
    task = DPOTask(tokenizer.pad_token_id, cfg.task_config, cache_path=cache, examples=train + val,
                   batch_size=cfg.train.batch_size, model_name=cfg.model)
    return PreparedTask(task, train, val, report, model_kind="causal_lm")


register_task(TaskSpec("dpo", build_dpo_task, DPOConfig))
