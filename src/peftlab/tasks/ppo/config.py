"""The ``ppo:`` section of a run config (registered with the task, validated by peftlab.config)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.config import ConfigError, choice


@dataclass
class PPOConfig:
    """``task: ppo``: rollouts -> rewards -> GAE -> clipped PPO epochs (peftlab.tasks.ppo.loop).

    Exactly one reward source: ``reward_model`` (a ``task: reward`` run or its adapter dir),
    ``reward_classifier`` + ``reward_label`` (a classifier adapter dir; reward = P(label)),
    or ``reward_function`` ("module:function" taking (prompts, responses) -> list[float]).
    The learning rate, seed, precision and grad clipping come from ``train``.
    """

    reward_model: str | None = None
    reward_classifier: str | None = None
    reward_label: str | None = None
    reward_function: str | None = None
    iterations: int = 100
    rollout_batch_size: int = 16  # prompts per iteration
    minibatch_size: int = 8  # rollouts per optimizer step
    ppo_epochs: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0 = off; top_k/top_p make the sampler differ from the trained policy
    top_p: float = 1.0
    kl_coef: float = 0.05
    kl_estimator: str = "k1"  # k1: log(pi/ref) | k3: (ref/pi - 1) - log(ref/pi)
    adaptive_kl: bool = False
    target_kl: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False  # normalise scores over each rollout batch

    def validate(self, where: str) -> None:
        choice(f"{where}.kl_estimator", self.kl_estimator, ["k1", "k3"])
        for key in ("iterations", "rollout_batch_size", "minibatch_size", "ppo_epochs",
                    "max_new_tokens", "kl_horizon"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("temperature", "target_kl", "clip_range", "clip_range_value"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key} must be > 0, got {getattr(self, key)}")
        for key in ("gamma", "lam", "top_p"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{where}.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.kl_coef < 0 or self.vf_coef < 0 or self.top_k < 0:
            raise ConfigError(f"{where}: kl_coef, vf_coef and top_k must be >= 0")
        if self.reward_label is not None and self.reward_classifier is None:
            raise ConfigError(f"{where}.reward_label needs {where}.reward_classifier")
