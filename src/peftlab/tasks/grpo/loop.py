"""GRPO for language models (Shao et al. 2024, DeepSeekMath), parameter-efficient.

One generation round:

1. sample     ``num_generations`` answers to each of ``generation_batch_size /
              num_generations`` prompts (batched ``generate``, KV cache);
2. reward     score every answer with the reward sources (tasks/grpo/rewards.py), weighted sum;
3. advantage  each answer's reward minus its group's mean, divided by the group's standard
              deviation (``scale_rewards: group``), the batch's (``batch``) or not at all;
              one value for all of an answer's tokens -- no value head, no GAE;
4. update     ``steps_per_generation`` optimizer steps over the round's answers,
              ``num_iterations`` times: clipped surrogate ``-min(r A, clip(r) A)`` per token
              plus ``beta`` x the k3 estimate of KL(pi || ref) per token (times the ratio, as
              TRL does by default), where ref is the same model with its adapter switched off.

The token losses are aggregated as TRL's ``loss_type`` says: ``grpo`` (mean per answer, then
over answers), ``bnpo`` (token mean per forward), ``dr_grpo`` (sum / (answers x
max_completion_length)), ``dapo`` (token mean over the optimizer step). The policy runs in eval
mode (no dropout), so the ratio is exactly 1 on a round's first pass, as in PPO here.

Logged per round to metrics.jsonl: reward mean/std, each source's mean, the share of groups
whose rewards are all equal (no signal), KL, entropy, clip ratio, answer length and the
share cut at max_completion_length, loss; ``val_reward_mean`` is the mean reward of *greedy*
answers to the validation prompts (for a verifiable reward: the held-out accuracy), at the
start, every ``train.eval_every`` optimizer steps and at the end; reward.png plots it.

Checkpoints (runtime/checkpoint.py) are taken at the end of a round, every
``train.save_every`` optimizer steps (else ``eval_every``, else only at the end); each holds
the adapter, AdamW state, the torch RNG (sampling), the prompt cursor and the history, so a
resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from peftlab.config import RunConfig
from peftlab.evaluation.generate import generate_tokens, stop_token_ids
from peftlab.methods.reference import reference_policy
from peftlab.runtime import checkpoint as ckpt
from peftlab.runtime.metrics_log import MetricsLog
from peftlab.runtime.optim import make_optimizer, set_lr, warmup_steps
from peftlab.runtime.plots import plot_reward_curve
from peftlab.runtime.precision import autocast_for
from peftlab.runtime.result import TrainResult
from peftlab.tasks.grpo.config import GRPOConfig
from peftlab.tasks.grpo.rewards import source_names
from peftlab.tasks.ppo.loop import Rollouts, response_forward, sample_rollouts

# ----------------------------------------------------------------------------- maths


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages of answers laid out group by group (``[prompts * G]``), and each answer's
    group standard deviation (0: every answer of the prompt scored the same -- no signal).

    A = r - mean(group); divided by std(group) + 1e-4 (``group``), by the batch's std
    (``batch``) or not at all (``none``, Dr. GRPO). std is Bessel-corrected, as in TRL.
    """
    groups = rewards.view(-1, num_generations)
    mean = groups.mean(1).repeat_interleave(num_generations)
    group_std = groups.std(1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards == "group":
        advantages = advantages / (group_std + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / ((rewards.std() if rewards.numel() > 1 else 0.0) + 1e-4)
    elif scale_rewards != "none":
        raise ValueError(f"grpo.scale_rewards: unknown scaling {scale_rewards!r}")
    return advantages, group_std


def grpo_token_losses(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      ref_logp: torch.Tensor | None, beta: float, epsilon: float,
                      epsilon_high: float | None = None, bias_correction_kl: bool = True,
                      ) -> dict[str, torch.Tensor]:
    """Per-token loss ``[B, T]``: clipped surrogate + beta * KL; also the KL, ratio, clips.

    ratio = exp(logp - old_logp); surrogate = -min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A)
    KL (k3, unbiased, >= 0) = exp(ref - logp) - (ref - logp) - 1, multiplied by the ratio with
    ``bias_correction_kl`` (DeepSeek-V3.2; TRL's default): the ratio is 1 on-policy but carries
    a gradient, which makes the KL gradient the unbiased reverse-KL gradient.
    """
    high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - epsilon, 1 + high)
    loss = -torch.min(ratio * adv, clipped * adv)
    out = {"ratio": ratio.detach(),
           "clipped": (((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0)))}
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        out["kl"] = kl.detach()
        if beta:
            loss = loss + beta * (kl * ratio if bias_correction_kl else kl)
    out["loss"] = loss
    return out


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, step_answers: int,
              step_tokens: float, forwards: int, max_completion_length: int) -> torch.Tensor:
    """This forward's share of its optimizer step's loss under ``loss_type`` (see the module
    docstring); with one forward per step each equals TRL's."""
    summed = token_loss * mask
    if loss_type == "grpo":
        return (summed.sum(1) / mask.sum(1).clamp(min=1)).sum() / step_answers
    if loss_type == "bnpo":
        return summed.sum() / mask.sum().clamp(min=1) / forwards
    if loss_type == "dr_grpo":
        return summed.sum() / (step_answers * max_completion_length)
    if loss_type == "dapo":
        return summed.sum() / max(step_tokens, 1.0)
    raise ValueError(f"grpo.loss_type: unknown loss {loss_type!r}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1))


# ----------------------------------------------------------------------------- the loop


RewardSource = Callable[[list, list[str], dict[str, list[Any]]], torch.Tensor]


class GRPOTrainer:
    """Runs GRPO generation rounds on ``model`` (adapter already applied) until
    ``train.max_steps`` optimizer steps (or ``train.epochs`` passes over the prompts)."""

    def __init__(self, model: nn.Module, tokenizer, prompts: list[dict[str, Any]],
                 val_prompts: list[dict[str, Any]], cfg: RunConfig, output_dir: str | Path,
                 sources: list[RewardSource], progress: bool = True):
        if not prompts:
            raise ValueError("no training prompts left after data preparation")
        g: GRPOConfig = cfg.task_config
        self.model, self.tokenizer, self.cfg, self.g = model, tokenizer, cfg, g
        self.prompts, self.val_prompts = prompts, val_prompts
        self.output_dir = Path(output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl")
        self.sources, self.progress = sources, progress
        self.source_names = source_names(g) if len(sources) == len(source_names(g)) else [
            getattr(s, "name", f"source{i}") for i, s in enumerate(sources)]
        self.weights = torch.tensor(g.reward_weights or [1.0] * len(sources))
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (did the method apply?)")
        tcfg = cfg.train
        self.optimizer = make_optimizer(self.params, tcfg)
        self.prompts_per_round = g.generation_batch_size // g.num_generations
        self.steps_per_round = g.steps_per_generation * g.num_iterations
        if tcfg.max_steps:
            self.total_steps = tcfg.max_steps
        else:
            rounds = math.ceil(tcfg.epochs * len(prompts) / self.prompts_per_round)
            self.total_steps = max(1, rounds) * self.steps_per_round
        self.rounds = math.ceil(self.total_steps / self.steps_per_round)
        self.warmup = warmup_steps(tcfg, self.total_steps)
        self.save_every = tcfg.save_every or tcfg.eval_every or self.total_steps
        self.stop_ids = set(stop_token_ids(tokenizer))
        self.rng = random.Random(tcfg.seed)
        self._order: list[int] = []

    # -- one round ----------------------------------------------------------------
    def _next_prompts(self) -> list[dict[str, Any]]:
        """Prompts in shuffled passes over the data (an epoch ends, a new shuffle begins)."""
        batch = []
        while len(batch) < self.prompts_per_round:
            if not self._order:
                self._order = list(range(len(self.prompts)))
                self.rng.shuffle(self._order)
            batch.append(self.prompts[self._order.pop()])
        return batch

    def _rewards(self, prompts: list[dict[str, Any]], answers: list[str],
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each source's rewards ``[N, sources]`` and their weighted sum ``[N]``."""
        prompt_field = self.cfg.data.prompt_field
        columns: dict[str, list[Any]] = {}
        for p in prompts:
            for key in p.get("row", {}):
                if key != prompt_field:
                    columns.setdefault(key, [])
        for key, values in columns.items():
            values.extend(p.get("row", {}).get(key) for p in prompts)
        messages = [p["messages"] for p in prompts]
        per_source = torch.stack([src(messages, answers, columns).float().cpu()
                                  for src in self.sources], dim=1)
        return per_source, (per_source * self.weights).sum(1)

    def _decode(self, rollouts: Rollouts) -> list[str]:
        return [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True)
                for r, m in zip(rollouts.responses, rollouts.mask, strict=True)]

    @torch.no_grad()
    def _logps(self, rollouts: Rollouts, reference: bool) -> torch.Tensor:
        """Answer-token log-probs ``[N, T]`` of the policy (or the reference), no gradient."""
        out = torch.zeros(rollouts.mask.shape)
        size = self.cfg.train.batch_size
        with autocast_for(self.cfg.train.precision):
            for idx in torch.arange(len(out)).split(size):
                mb = rollouts.select(idx)
                if reference:
                    with reference_policy(self.model):
                        logp, _, _ = response_forward(self.model, mb, self.g.temperature)
                else:
                    logp, _, _ = response_forward(self.model, mb, self.g.temperature)
                out[idx, :logp.shape[1]] = logp.float().cpu()
        return out

    def _optimise(self, rollouts: Rollouts, mask: torch.Tensor, advantages: torch.Tensor,
                  old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                  step: int) -> tuple[int, dict[str, float]]:
        g, tcfg = self.g, self.cfg.train
        n = len(advantages)
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}

        def add(key: str, value: float, weight: float = 1.0) -> None:
            sums[key] = sums.get(key, 0.0) + value * weight
            weights[key] = weights.get(key, 0.0) + weight

        for _ in range(g.num_iterations):
            order = torch.randperm(n)
            for chunk in order.split(n // g.steps_per_generation):
                lr = set_lr(self.optimizer, tcfg, step, self.total_steps, self.warmup)
                forwards = chunk.split(tcfg.batch_size)
                step_tokens = float(mask[chunk].sum())
                step_loss = 0.0
                for idx in forwards:
                    mb = rollouts.select(idx)
                    steps = mb.mask.shape[1]
                    m = mask[idx, :steps]
                    with autocast_for(tcfg.precision):
                        logp, _, entropy = response_forward(self.model, mb, g.temperature)
                    old = old_logp[idx, :steps] if old_logp is not None else logp.detach()
                    ref = ref_logp[idx, :steps] if ref_logp is not None else None
                    out = grpo_token_losses(logp, old, advantages[idx], ref, g.beta, g.epsilon,
                                            g.epsilon_high, g.use_bias_correction_kl)
                    loss = aggregate(out["loss"], m, g.loss_type, len(chunk), step_tokens,
                                     len(forwards), g.max_completion_length)
                    loss.backward()
                    step_loss += float(loss.detach())
                    tokens = float(m.sum())
                    add("entropy", masked_mean(entropy, m), tokens)
                    add("clip_ratio", masked_mean(out["clipped"].float(), m), tokens)
                    if "kl" in out:
                        add("kl", masked_mean(out["kl"], m), tokens)
                if tcfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.params, tcfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                add("loss", step_loss)
                sums["lr"], weights["lr"] = lr, 1.0
                step += 1
        return step, {k: v / max(weights[k], 1e-12) for k, v in sums.items()}

    # -- the run ------------------------------------------------------------------
    def train(self, resume: bool | str | Path = False) -> TrainResult:
        """Run (or, with ``resume``, continue) the rounds up to the run's optimizer steps."""
        g = self.g
        self.output_dir.mkdir(parents=True, exist_ok=True)
        model = self.model
        model.eval()  # no dropout: ratio = 1 on a round's first pass
        history: list[dict[str, Any]] = []
        start, step, tokens, elapsed, initial_val = 0, 0, 0, 0.0, None
        if resume:  # restores the RNG last: nothing below may draw from it before the loop
            state = self._load(resume)
            start, step, tokens = state["round"], state["step"], state["tokens"]
            elapsed, history, initial_val = state["seconds"], state["history"], state["initial_val"]
            self.metrics.trim(step, keep=([{"step": 0, "val_reward_mean": initial_val}]
                                          if initial_val is not None else []) + history)
        else:
            self.metrics.start()
            if self.val_prompts:  # the starting point of the curve (policy == reference)
                initial_val = self.evaluate()["val_reward_mean"]
                self.metrics.append({"step": 0, "val_reward_mean": initial_val}, [])
        t0 = time.perf_counter() - elapsed
        need_old = g.num_iterations > 1 or g.steps_per_generation > 1
        bar = tqdm(total=self.total_steps, initial=step, disable=not self.progress, desc="grpo",
                   unit="step", dynamic_ncols=True)
        for rnd in range(start + 1, self.rounds + 1):
            prompts = [p for p in self._next_prompts() for _ in range(g.num_generations)]
            rollouts = sample_rollouts(model, self.tokenizer, [p["input_ids"] for p in prompts],
                                       g.temperature, g.top_k, g.top_p, g.max_completion_length)
            tokens += int(rollouts.attention_mask.sum())
            lengths = rollouts.mask.sum(1).long()
            last = rollouts.responses[torch.arange(len(lengths)), (lengths - 1).clamp(min=0)]
            truncated = torch.tensor([int(t) not in self.stop_ids for t in last.tolist()])
            mask = rollouts.mask.clone()
            if g.mask_truncated_completions:
                mask[truncated] = 0
            per_source, rewards = self._rewards(prompts, self._decode(rollouts))
            advantages, group_std = group_advantages(rewards, g.num_generations, g.scale_rewards)
            ref_logp = self._logps(rollouts, reference=True) if g.beta else None
            old_logp = self._logps(rollouts, reference=False) if need_old else None
            step, stats = self._optimise(rollouts, mask, advantages, old_logp, ref_logp, step)
            rec = {"step": step, "round": rnd,
                   "reward_mean": round(float(rewards.mean()), 5),
                   "reward_std": round(float(group_std.mean()), 5),
                   **{f"reward/{name}": round(float(per_source[:, i].mean()), 5)
                      for i, name in enumerate(self.source_names)},
                   "frac_reward_zero_std": round(float((group_std < 1e-6).float().mean()), 4),
                   "completion_length": round(float(lengths.float().mean()), 2),
                   "clipped_ratio": round(float(truncated.float().mean()), 4),
                   **{k: (v if k == "lr" else round(v, 5)) for k, v in stats.items()},
                   "seconds": round(time.perf_counter() - t0, 2)}
            done = rnd == self.rounds
            eval_every = self.cfg.train.eval_every
            if self.val_prompts and (done or (eval_every and _crossed(step, self.steps_per_round,
                                                                       eval_every))):
                rec.update(self.evaluate())
            self.metrics.append(rec, history)
            bar.update(self.steps_per_round)
            bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", kl=f"{rec.get('kl', 0.0):.4f}")
            if done or _crossed(step, self.steps_per_round, self.save_every):
                self._save(rnd, step, {"tokens": tokens, "seconds": time.perf_counter() - t0,
                                       "initial_val": initial_val, "history": history})
        bar.close()
        if history:
            plot_reward_curve(history, self.output_dir / "reward.png",
                              title=f"GRPO on {self.cfg.model}", initial_val=initial_val,
                              xlabel="optimizer step",
                              kl_label="KL(policy || reference), nats per token (k3)")
        best = max(history, key=lambda r: r["reward_mean"])
        return TrainResult(steps=step, final_train_loss=history[-1]["loss"],
                           best_value=best["reward_mean"], best_step=best["step"],
                           best_metric="reward_mean", history=history,
                           seconds=time.perf_counter() - t0, tokens=tokens)

    # -- checkpoints ----------------------------------------------------------------
    def _save(self, rnd: int, step: int, state: dict[str, Any]) -> None:
        version, internal, gauss = self.rng.getstate()
        state = dict(state, task="grpo", round=rnd, step=step, num_prompts=len(self.prompts),
                     prompt_order=self._order, prompt_rng=[version, list(internal), gauss])
        ckpt.save_step(self.ckpt_dir, step, self.model, self.optimizer, state)

    def _load(self, resume: bool | str | Path) -> dict[str, Any]:
        path = ckpt.latest_checkpoint(self.ckpt_dir) if resume is True else Path(resume)
        if path is None:
            raise FileNotFoundError(f"resume: no complete GRPO checkpoint under {self.ckpt_dir} "
                                    "(written every train.save_every optimizer steps)")
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        if state.get("task") != "grpo":
            raise ValueError(f"{path}: not a task: grpo checkpoint")
        if state["num_prompts"] != len(self.prompts):
            raise ValueError(f"{path}: taken with {state['num_prompts']} training prompts, this "
                             f"run has {len(self.prompts)}; resume needs the same data")
        self._order = list(state["prompt_order"])
        version, internal, gauss = state["prompt_rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        print(f"resumed from {path} at optimizer step {state['step']}")
        return state

    # -- validation -----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward (and each source's, if several) of greedy answers to the validation
        prompts; greedy, so the number does not move with sampling noise."""
        rows = generate_tokens(self.model, self.tokenizer,
                               [p["input_ids"] for p in self.val_prompts],
                               self.g.max_completion_length,
                               batch_size=max(self.cfg.train.batch_size, 1))
        answers = [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        per_source, total = self._rewards(self.val_prompts, answers)
        out = {"val_reward_mean": round(float(total.mean()), 5)}
        if len(self.sources) > 1:
            out.update({f"val_reward/{name}": round(float(per_source[:, i].mean()), 5)
                        for i, name in enumerate(self.source_names)})
        return out


def _crossed(step: int, steps_per_round: int, every: int) -> bool:
    """Whether a multiple of ``every`` lies in this round's steps (step - steps_per_round, step]."""
    return step // every > (step - steps_per_round) // every
