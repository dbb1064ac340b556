"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022), parameter-efficient.

One iteration:

1. rollouts   sample answers to a batch of prompts (batched ``generate``, KV cache);
2. rewards    score them (reward model, classifier or function; see tasks/ppo_rewards.py)
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

Checkpoints (train/checkpoint.py: atomic, safetensors + JSON, never pickle) are written
to ``checkpoints/step-N`` every ``train.save_every`` iterations, else every
``train.eval_every``, else only after the last one; the newest two are kept. Each holds
the adapter and value head, AdamW state, the torch RNG (rollout sampling), the KL
coefficient, the prompt cursor and the history so far, so a resumed run samples,
scores and updates exactly as an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from peftlab.config import PPOConfig, RunConfig
from peftlab.evaluate.generate import stop_token_ids
from peftlab.evaluate.loss import autocast_for
from peftlab.tasks.dpo import check_reference_method, reference_policy
from peftlab.tasks.ppo_rewards import Scorer, reward_source
from peftlab.tasks.sft import backbone_hidden_states
from peftlab.train import checkpoint as ckpt
from peftlab.train.schedule import lr_multiplier
from peftlab.train.trainer import TrainResult

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
    """Sample one answer per prompt (left-padded batch, KV cache); cut after the stop token."""
    stop_ids = stop_token_ids(tokenizer)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    finally:
        tokenizer.padding_side = old_side
    out = model.generate(**enc, do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k,
                         top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
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
    """Runs ``cfg.ppo.iterations`` PPO iterations on ``model`` (adapter already applied)."""

    def __init__(self, model: nn.Module, tokenizer, prompts: list[dict[str, Any]],
                 val_prompts: list[dict[str, Any]], cfg: RunConfig, output_dir: str | Path,
                 scorer: Scorer, progress: bool = True):
        if not prompts:
            raise ValueError("no training prompts left after data preparation")
        self.model, self.tokenizer, self.cfg, self.ppo = model, tokenizer, cfg, cfg.ppo
        self.prompts, self.val_prompts = prompts, val_prompts
        self.output_dir = Path(output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.scorer, self.progress = scorer, progress
        hidden = model.get_output_embeddings().weight.shape[1]
        self.value_head = ValueHead(hidden)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (did the method apply?)")
        self.params += list(self.value_head.parameters())
        tcfg = cfg.train
        self.optimizer = torch.optim.AdamW(self.params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        self.kl = KLController(self.ppo.kl_coef, self.ppo.adaptive_kl, self.ppo.target_kl,
                               self.ppo.kl_horizon)
        self.warmup = (tcfg.warmup_steps if tcfg.warmup_steps is not None
                       else round(tcfg.warmup_ratio * self.ppo.iterations))
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
            self._rewrite_metrics(initial_val, history)
        else:
            if self.metrics_path.exists():
                self.metrics_path.unlink()
            if self.val_prompts:  # the starting point of the reward curve (policy == reference)
                initial_val = round(self.evaluate(), 5)
                self._log({"step": 0, "val_reward_mean": initial_val}, [])
        t0 = time.perf_counter() - elapsed
        bar = tqdm(total=ppo.iterations, initial=start, disable=not self.progress, desc="ppo",
                   unit="it", dynamic_ncols=True)
        for it in range(start + 1, ppo.iterations + 1):
            lr = cfg.train.lr * lr_multiplier(it - 1, ppo.iterations, self.warmup,
                                              cfg.train.scheduler)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
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
            self._log(rec, history)
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
        ckpt.save_checkpoint(self.ckpt_dir / f"step-{iteration:07d}", self._trainable(),
                             self.optimizer, state)
        ckpt.prune_checkpoints(self.ckpt_dir, keep=2)

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

    def _rewrite_metrics(self, initial_val: float | None,
                         history: list[dict[str, Any]]) -> None:
        """metrics.jsonl as of the checkpoint: drops lines of iterations about to be redone
        (and a line half-written by a killed run), keeps everything before."""
        records = ([{"step": 0, "val_reward_mean": initial_val}] if initial_val is not None
                   else []) + history
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, self.metrics_path)

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

    def _log(self, record: dict[str, Any], history: list[dict[str, Any]]) -> None:
        history.append(record)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def plot_reward_curve(history: list[dict[str, Any]], path: str | Path, title: str = "",
                      initial_val: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.plot(steps, [r["reward_mean"] for r in history], label="mean reward", lw=1.4)
    val = [(r["step"], r["val_reward_mean"]) for r in history if "val_reward_mean" in r]
    if initial_val is not None:
        val.insert(0, (0, initial_val))
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation reward", lw=1.4)
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("reward")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["kl"] for r in history], color="tab:red", lw=1.0, alpha=0.6, label="KL")
    ax2.set_ylabel("KL(policy || reference), nats per answer")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="best")
    ax.set_title(title or "PPO")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- the task


class PPOTask:
    """``task: ppo``: prompts in, its own loop (:meth:`fit`) instead of the Trainer's.

    ``reward`` may be set to any scorer ``(prompt messages, responses) -> Tensor`` before
    training (the Python API's way to pass a function object); otherwise it comes from
    ``cfg.ppo``.
    """

    peft_task_type = "CAUSAL_LM"

    def __init__(self, reward: Scorer | None = None):
        self.reward = reward

    def length(self, example: dict[str, Any]) -> int:
        return len(example["input_ids"])

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        raise TypeError("task: ppo has no supervised batches; it trains with PPOTask.fit")

    def count(self, batch: dict[str, Any]) -> int:
        raise TypeError("task: ppo has no supervised batches; it trains with PPOTask.fit")

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        raise TypeError("task: ppo has no supervised loss; it trains with PPOTask.fit")

    def fit(self, model: nn.Module, tokenizer, train: list[dict], val: list[dict],
            cfg: RunConfig, output_dir: str | Path, resume: bool | str | Path = False,
            progress: bool = True) -> TrainResult:
        """``resume``: True for the newest complete checkpoint in output_dir, or a path."""
        scorer = self.reward if self.reward is not None else reward_source(cfg.ppo)
        trainer = PPOTrainer(model, tokenizer, train, val, cfg, output_dir, scorer, progress)
        return trainer.train(resume)


def prepare_prompts(cfg: RunConfig, tokenizer) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Read, split and encode the prompts; drop those leaving no room for max_new_tokens."""
    from peftlab.data.preference import record_to_prompt
    from peftlab.data.readers import MAX_REPORTED_ERRORS, DataError, read_records
    from peftlab.data.sft import encode_prompt
    from peftlab.data.splits import split_off

    data = cfg.data
    if not data.train:
        raise DataError("data.train: no training file given")
    records, rep = read_records(data.train, on_error=data.on_error, max_rows=data.max_rows)
    report: dict[str, Any] = {"train_file": {"path": data.train, "rows_read": rep.rows_read,
                                             "rows_skipped": rep.rows_skipped,
                                             "skipped": rep.skipped}}
    rows = rep.row_numbers
    if data.validation:
        val_records, val_rep = read_records(data.validation, on_error=data.on_error)
        val_rows = val_rep.row_numbers
        report["validation_file"] = {"path": data.validation, "rows_read": val_rep.rows_read,
                                     "rows_skipped": val_rep.rows_skipped,
                                     "skipped": val_rep.skipped}
    else:
        records, val_records = split_off(records, data.validation_split, cfg.train.seed)
        rows = val_rows = None
    room = cfg.train.max_length - cfg.ppo.max_new_tokens

    def encode(recs: list[dict], source: str, numbers: list[int] | None):
        stats = {"source": source, "rows": len(recs), "kept": 0, "dropped_invalid": 0,
                 "dropped_too_long": 0, "max_len": 0, "errors": []}
        out = []
        for i, record in enumerate(recs):
            where = f"{source}:{numbers[i] if numbers else i + 1}"
            try:
                messages = record_to_prompt(record, data, where)
            except DataError as exc:
                if data.on_error != "skip":
                    raise
                stats["dropped_invalid"] += 1
                if len(stats["errors"]) < MAX_REPORTED_ERRORS:
                    stats["errors"].append(str(exc))
                continue
            ids = encode_prompt(messages, tokenizer)
            if len(ids) > room:
                stats["dropped_too_long"] += 1
                continue
            out.append({"input_ids": ids, "messages": messages})
            stats["max_len"] = max(stats["max_len"], len(ids))
        stats["kept"] = len(out)
        return out, stats

    train, report["train"] = encode(records, data.train, rows)
    val, report["validation"] = encode(val_records, data.validation or data.train, val_rows)
    return train, val, report


def build_ppo_task(cfg: RunConfig, tokenizer):
    """Task builder for ``task: ppo`` (a causal LM policy; prompts only)."""
    from peftlab.config import ConfigError
    from peftlab.data.sft import ensure_chat_template
    from peftlab.tasks import PreparedTask
    from peftlab.tasks.ppo_rewards import check_reward_config

    check_reward_config(cfg.ppo)
    check_reference_method(cfg.method_name, "task: ppo")
    if cfg.train.max_length <= cfg.ppo.max_new_tokens:
        raise ConfigError(f"train.max_length ({cfg.train.max_length}) must exceed "
                          f"ppo.max_new_tokens ({cfg.ppo.max_new_tokens}): prompts need room")
    ensure_chat_template(tokenizer)
    train, val, report = prepare_prompts(cfg, tokenizer)
    return PreparedTask(PPOTask(), train, val, report, model_kind="causal_lm")


def _register() -> None:
    from peftlab.tasks import register_task

    register_task("ppo", build_ppo_task)


_register()

__all__ = ["KLController", "PPOTask", "PPOTrainer", "ValueHead", "gae", "kl_penalty",
           "masked_whiten", "ppo_losses", "response_forward"]
