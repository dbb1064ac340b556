"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022), parameter-efficient.

One iteration:

1. rollouts   sample answers to a batch of prompts (batched ``generate``, KV cache);
2. rewards    score them (reward model, classifier or function; see tasks/ppo/rewards.py)
              and add a per-token KL penalty against the reference policy, which is the
              same model with its adapter switched off (no second copy);
3. GAE        advantages and returns from a value head on the policy's last hidden state;
4. PPO epochs clipped policy and value losses over shuffled minibatches.

The policy is trained in eval mode (no dropout) so the importance ratio is exactly 1
before the first update, as in TRL. Only the LM head's rows at answer positions are ever
computed (as in SFT). Logged per iteration to metrics.jsonl: mean/std reward, ``kl``
(sum over the answer of log pi/ref, averaged over answers, whatever the penalty's
estimator), KL coefficient, entropy, clip fraction, losses, and ``val_reward_mean`` on
validation prompts (every ``train.eval_every`` iterations and at the end); reward.png
plots the curves. The adapter is saved by the recipe, the value head to
value_head.safetensors.

Checkpoints (runtime/checkpoint.py: atomic, safetensors + JSON, never pickle) are written
to ``checkpoints/step-N`` every ``train.save_every`` iterations, else every
``train.eval_every``, else only after the last one; the newest two are kept. Each holds
the adapter and value head, AdamW state, the torch RNG (rollout sampling), the KL
coefficient, the prompt cursor and the history so far, so a resumed run samples,
scores and updates exactly as an uninterrupted one would.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from peftlab.config import RunConfig
from peftlab.evaluation.generate import stop_token_ids
from peftlab.methods import get_method, optimizer_param_groups
from peftlab.methods.reference import reference_policy
from peftlab.models.lm import backbone_hidden_states
from peftlab.runtime import checkpoint as ckpt
from peftlab.runtime.metrics_log import MetricsLog
from peftlab.runtime.optim import make_optimizer, set_lr, warmup_steps
from peftlab.runtime.plots import plot_reward_curve
from peftlab.runtime.precision import autocast_for
from peftlab.runtime.result import TrainResult
from peftlab.tasks.ppo.config import PPOConfig
from peftlab.tasks.ppo.rewards import Scorer

# ----------------------------------------------------------------------------- maths


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from the sampled tokens' log-probs.

    k1 = log pi - log ref (unbiased, can be negative); k3 = (r - 1) - log r with
    r = ref / pi (unbiased, always >= 0, lower variance; Schulman 2020).
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"ppo.kl_estimator: unknown estimator {kind!r} (k1 or k3)")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over ``[batch, steps]`` (Schulman et al. 2016).

    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1}; the episode
    ends at each row's last unmasked step (V after it is 0). Returns (advantages, returns).
    """
    mask = mask.to(rewards.dtype)
    rewards, values = rewards * mask, values * mask
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        alive = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        next_value = values[:, t + 1] * alive if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * alive
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def ppo_losses(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
               values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range: float, clip_range_value: float,
               ) -> dict[str, torch.Tensor]:
    """Clipped surrogate policy loss and clipped value loss, token-averaged over ``mask``."""
    ratio = torch.exp(logp - old_logp)
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    v_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    vf1, vf2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    return {
        "policy_loss": masked_mean(torch.maximum(pg1, pg2), mask),
        "value_loss": 0.5 * masked_mean(torch.maximum(vf1, vf2), mask),
        "clip_fraction": masked_mean((pg2 > pg1).float(), mask).detach(),
        "approx_kl": 0.5 * masked_mean((logp - old_logp) ** 2, mask).detach(),
    }


class KLController:
    """Fixed KL coefficient, or Ziegler et al.'s adaptive one that steers KL to ``target``:
    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)."""

    def __init__(self, coef: float, adaptive: bool = False, target: float = 6.0,
                 horizon: int = 10000):
        self.value, self.adaptive, self.target, self.horizon = coef, adaptive, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.adaptive:
            error = min(max(current_kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon


# ----------------------------------------------------------------------------- model pieces


class ValueHead(nn.Module):
    """V(s) from the backbone's last hidden state; zero-initialised (V = 0 at the start)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1).float()


@dataclass
class Rollouts:
    """Prompt + answer sequences, right-padded; answers also as ``[batch, steps]``."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    prompt_lens: torch.Tensor  # [B]
    responses: torch.Tensor  # [B, T] answer tokens (pad after the end)
    mask: torch.Tensor  # [B, T] 1 on answer tokens

    def select(self, idx: torch.Tensor) -> Rollouts:
        rows = Rollouts(self.input_ids[idx], self.attention_mask[idx], self.prompt_lens[idx],
                        self.responses[idx], self.mask[idx])
        length = int(rows.attention_mask.sum(1).max())
        steps = max(int(rows.mask.sum(1).max()), 1)
        return Rollouts(rows.input_ids[:, :length], rows.attention_mask[:, :length],
                        rows.prompt_lens, rows.responses[:, :steps], rows.mask[:, :steps])


def response_forward(model: nn.Module, batch: Rollouts, temperature: float,
                     value_head: ValueHead | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-probs of the answer tokens, values and entropies, each ``[B, T]`` (0 off-mask).

    The state before answer token t is position ``prompt_len - 1 + t``; the LM head runs
    only there. Logits are divided by the sampling temperature: that is the policy that
    generated the tokens.
    """
    hidden = backbone_hidden_states(model, batch.input_ids, batch.attention_mask)
    steps, device = batch.responses.shape[1], hidden.device
    pos = (batch.prompt_lens[:, None] - 1 + torch.arange(steps, device=device)[None]).clamp(
        max=hidden.shape[1] - 1)
    states = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
    keep = batch.mask.bool()
    logits = model.get_output_embeddings()(states[keep]).float() / temperature
    logp_all = logits.log_softmax(-1)
    logp = torch.zeros(batch.mask.shape, dtype=torch.float32, device=device)
    logp[keep] = logp_all.gather(-1, batch.responses[keep][:, None]).squeeze(-1)
    entropy = torch.zeros(batch.mask.shape, dtype=torch.float32, device=device)
    with torch.no_grad():
        entropy[keep] = -(logp_all.exp() * logp_all).sum(-1)
    values = value_head(states) * batch.mask if value_head is not None else None
    return logp, values, entropy


@torch.no_grad()
def generate_rollouts(model: nn.Module, tokenizer, prompts: list[list[int]], cfg: PPOConfig,
                      ) -> Rollouts:
    """Sample one answer per prompt with the ``ppo`` section's sampling settings."""
    return sample_rollouts(model, tokenizer, prompts, cfg.temperature, cfg.top_k, cfg.top_p,
                           cfg.max_new_tokens)


@torch.no_grad()
def sample_rollouts(model: nn.Module, tokenizer, prompts: list[list[int]], temperature: float,
                    top_k: int, top_p: float, max_new_tokens: int) -> Rollouts:
    """Sample one answer per prompt (left-padded batch, KV cache); cut after the stop token."""
    stop_ids = stop_token_ids(tokenizer)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    finally:
        tokenizer.padding_side = old_side
    out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=top_k,
                         top_p=top_p, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids)
    answers = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        answers.append(row[:end])
    return pack_rollouts(prompts, answers, tokenizer.pad_token_id)


def pack_rollouts(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> Rollouts:
    seqs = [p + a for p, a in zip(prompts, answers, strict=True)]
    length, steps = max(map(len, seqs)), max(max(map(len, answers)), 1)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    responses = torch.full((len(seqs), steps), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), steps), dtype=torch.float32)
    for i, (seq, ans) in enumerate(zip(seqs, answers, strict=True)):
        input_ids[i, :len(seq)] = torch.tensor(seq)
        attention_mask[i, :len(seq)] = 1
        responses[i, :len(ans)] = torch.tensor(ans, dtype=torch.long)
        mask[i, :len(ans)] = 1
    prompt_lens = torch.tensor([len(p) for p in prompts])
    return Rollouts(input_ids, attention_mask, prompt_lens, responses, mask)


# ----------------------------------------------------------------------------- the loop


class PPOTrainer:
    """Runs ``ppo.iterations`` PPO iterations on ``model`` (adapter already applied)."""

    def __init__(self, model: nn.Module, tokenizer, prompts: list[dict[str, Any]],
                 val_prompts: list[dict[str, Any]], cfg: RunConfig, output_dir: str | Path,
                 scorer: Scorer, progress: bool = True):
        if not prompts:
            raise ValueError("no training prompts left after data preparation")
        self.model, self.tokenizer, self.cfg, self.ppo = model, tokenizer, cfg, cfg.task_config
        self.prompts, self.val_prompts = prompts, val_prompts
        self.output_dir = Path(output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl")
        self.scorer, self.progress = scorer, progress
        hidden = model.get_output_embeddings().weight.shape[1]
        self.value_head = ValueHead(hidden)
        groups = optimizer_param_groups(model, get_method(cfg.method_name), cfg.method)
        self.params = [p for group in groups for p in group["params"]]
        if not self.params:
            raise ValueError("the model has no trainable parameters (did the method apply?)")
        head = list(self.value_head.parameters())
        if groups[-1].keys() == {"params"}:  # a plain group (as checkpoints before groups had)
            groups[-1] = {"params": groups[-1]["params"] + head}
        else:
            groups.append({"params": head})
        self.params += head
        tcfg = cfg.train
        self.optimizer = make_optimizer(groups, tcfg)
        self.kl = KLController(self.ppo.kl_coef, self.ppo.adaptive_kl, self.ppo.target_kl,
                               self.ppo.kl_horizon)
        self.warmup = warmup_steps(tcfg, self.ppo.iterations)
        self.save_every = tcfg.save_every or tcfg.eval_every or self.ppo.iterations
        self.rng = random.Random(tcfg.seed)
        self._order: list[int] = []

    def _next_prompts(self) -> list[dict[str, Any]]:
        """Prompts in shuffled passes over the data (an epoch ends, a new shuffle begins)."""
        batch = []
        while len(batch) < self.ppo.rollout_batch_size:
            if not self._order:
                self._order = list(range(len(self.prompts)))
                self.rng.shuffle(self._order)
            batch.append(self.prompts[self._order.pop()])
        return batch

    def _score(self, prompts: list[dict[str, Any]], rollouts: Rollouts) -> torch.Tensor:
        texts = [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True)
                 for r, m in zip(rollouts.responses, rollouts.mask, strict=True)]
        return self.scorer([p["messages"] for p in prompts], texts).float()

    def train(self, resume: bool | str | Path = False) -> TrainResult:
        """Run (or, with ``resume``, continue) the PPO iterations up to ``ppo.iterations``."""
        cfg, ppo, precision = self.cfg, self.ppo, self.cfg.train.precision
        self.output_dir.mkdir(parents=True, exist_ok=True)
        model = self.model
        model.eval()  # no dropout: ratio = 1 before the first update
        history: list[dict[str, Any]] = []
        start, tokens, elapsed, initial_val = 0, 0, 0.0, None
        if resume:  # restores the RNG last: nothing below may draw from it before the loop
            state = self._load(resume)
            start, tokens, elapsed = state["iteration"], state["tokens"], state["seconds"]
            history, initial_val = state["history"], state["initial_val"]
            # as of the checkpoint: lines of iterations about to be redone (and a line
            # half-written by a killed run) go, everything before stays
            self.metrics.trim(start, keep=([{"step": 0, "val_reward_mean": initial_val}]
                                           if initial_val is not None else []) + history)
        else:
            self.metrics.start()
            if self.val_prompts:  # the starting point of the reward curve (policy == reference)
                initial_val = round(self.evaluate(), 5)
                self.metrics.append({"step": 0, "val_reward_mean": initial_val}, [])
        t0 = time.perf_counter() - elapsed
        bar = tqdm(total=ppo.iterations, initial=start, disable=not self.progress, desc="ppo",
                   unit="it", dynamic_ncols=True)
        for it in range(start + 1, ppo.iterations + 1):
            lr = set_lr(self.optimizer, cfg.train, it - 1, ppo.iterations, self.warmup)
            prompts = self._next_prompts()
            rollouts = generate_rollouts(model, self.tokenizer, [p["input_ids"] for p in prompts],
                                         ppo)
            scores = self._score(prompts, rollouts)
            tokens += int(rollouts.attention_mask.sum())
            with torch.no_grad(), autocast_for(precision):
                old_logp, old_values, _ = response_forward(model, rollouts, ppo.temperature,
                                                           self.value_head)
                with reference_policy(model):
                    ref_logp, _, _ = response_forward(model, rollouts, ppo.temperature)
            mask = rollouts.mask
            kl = kl_penalty(old_logp, ref_logp, ppo.kl_estimator) * mask
            used = scores
            if ppo.whiten_rewards and len(scores) > 1:
                used = (scores - scores.mean()) / (scores.std() + 1e-8)
            rewards = -self.kl.value * kl
            last = (mask.sum(1).long() - 1).clamp(min=0)
            rewards[torch.arange(len(last)), last] += used
            advantages, returns = gae(rewards, old_values, mask, ppo.gamma, ppo.lam)
            advantages = masked_whiten(advantages, mask)

            stats = self._ppo_epochs(rollouts, old_logp, old_values, advantages, returns)
            seq_kl = float(((old_logp - ref_logp) * mask).sum(1).mean())  # k1, summed per answer
            kl_coef = self.kl.value
            self.kl.update(seq_kl, len(prompts))
            rec = {"step": it, "reward_mean": round(float(scores.mean()), 5),
                   "reward_std": round(float(scores.std()) if len(scores) > 1 else 0.0, 5),
                   "kl": round(seq_kl, 5), "kl_coef": round(kl_coef, 6),
                   "response_length": round(float(mask.sum(1).mean()), 2),
                   **{k: round(v, 5) for k, v in stats.items()}, "lr": lr,
                   "seconds": round(time.perf_counter() - t0, 2)}
            if self.val_prompts and (it == ppo.iterations or (
                    cfg.train.eval_every and it % cfg.train.eval_every == 0)):
                rec["val_reward_mean"] = round(self.evaluate(), 5)
            self.metrics.append(rec, history)
            bar.update(1)
            bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", kl=f"{seq_kl:.3f}")
            if it % self.save_every == 0 or it == ppo.iterations:
                self._save(it, {"tokens": tokens, "seconds": time.perf_counter() - t0,
                                "initial_val": initial_val, "history": history})
        bar.close()
        save_file({f"value_head.{k}": v.detach().contiguous()
                   for k, v in self.value_head.state_dict().items()},
                  str(self.output_dir / "value_head.safetensors"))
        if history:
            plot_reward_curve(history, self.output_dir / "reward.png",
                              title=f"PPO on {cfg.model}", initial_val=initial_val)
        best = max(history, key=lambda r: r["reward_mean"])
        return TrainResult(steps=ppo.iterations, final_train_loss=history[-1]["loss"],
                           best_value=best["reward_mean"], best_step=best["step"],
                           best_metric="reward_mean", history=history,
                           seconds=time.perf_counter() - t0, tokens=tokens)

    def _ppo_epochs(self, rollouts: Rollouts, old_logp: torch.Tensor, old_values: torch.Tensor,
                    advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
        ppo, tcfg = self.ppo, self.cfg.train
        sums: dict[str, float] = {}
        count = 0
        n = rollouts.input_ids.shape[0]
        for _ in range(ppo.ppo_epochs):
            for idx in torch.randperm(n).split(ppo.minibatch_size):
                mb = rollouts.select(idx)
                steps = mb.mask.shape[1]
                with autocast_for(tcfg.precision):
                    logp, values, entropy = response_forward(self.model, mb, ppo.temperature,
                                                             self.value_head)
                out = ppo_losses(logp, old_logp[idx, :steps], advantages[idx, :steps], values,
                                 old_values[idx, :steps], returns[idx, :steps], mb.mask,
                                 ppo.clip_range, ppo.clip_range_value)
                loss = out["policy_loss"] + ppo.vf_coef * out["value_loss"]
                loss.backward()
                if tcfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.params, tcfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                out["loss"] = loss.detach()
                out["entropy"] = masked_mean(entropy, mb.mask)
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                count += 1
        return {k: v / count for k, v in sums.items()}

    # -- checkpoints ----------------------------------------------------------------
    def _trainable(self) -> nn.Module:
        """What a checkpoint's weights cover: the policy's adapter and the value head."""
        return nn.ModuleDict({"policy": self.model, "value_head": self.value_head})

    def _save(self, iteration: int, state: dict[str, Any]) -> None:
        version, internal, gauss = self.rng.getstate()
        state = dict(state, task="ppo", iteration=iteration, kl_coef=self.kl.value,
                     num_prompts=len(self.prompts), prompt_order=self._order,
                     prompt_rng=[version, list(internal), gauss])
        ckpt.save_step(self.ckpt_dir, iteration, self._trainable(), self.optimizer, state)

    def _load(self, resume: bool | str | Path) -> dict[str, Any]:
        path = ckpt.latest_checkpoint(self.ckpt_dir) if resume is True else Path(resume)
        if path is None:
            raise FileNotFoundError(f"resume: no complete PPO checkpoint under {self.ckpt_dir} "
                                    "(written every train.save_every iterations)")
        state = ckpt.load_checkpoint(path, self._trainable(), self.optimizer)
        if state.get("task") != "ppo":
            raise ValueError(f"{path}: not a task: ppo checkpoint")
        if state["num_prompts"] != len(self.prompts):
            raise ValueError(f"{path}: taken with {state['num_prompts']} training prompts, this "
                             f"run has {len(self.prompts)}; resume needs the same data")
        self.kl.value = state["kl_coef"]
        self._order = list(state["prompt_order"])
        version, internal, gauss = state["prompt_rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        print(f"resumed from {path} at iteration {state['iteration']}")
        return state

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean reward of sampled answers to the validation prompts."""
        scores = []
        size = self.ppo.rollout_batch_size
        for start in range(0, len(self.val_prompts), size):
            prompts = self.val_prompts[start:start + size]
            rollouts = generate_rollouts(self.model, self.tokenizer,
                                         [p["input_ids"] for p in prompts], self.ppo)
            scores.append(self._score(prompts, rollouts))
        return float(torch.cat(scores).mean())
