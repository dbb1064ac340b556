"""The ``grpo:`` section of a run config (option names as in TRL's GRPOConfig)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.config import ConfigError, choice


@dataclass
class GRPOConfig:
    """``task: grpo`` (Shao et al. 2024): per prompt, ``num_generations`` sampled answers; each
    answer's advantage is its reward relative to its group's; clipped objective plus
    ``beta`` x KL to the model with its adapter switched off.

    Rewards: any number of ``reward_function`` ("module:function", or a list of them; called
    as ``f(prompts, completions, **columns)`` with the data rows' other fields as lists, as in
    TRL), plus optionally ``reward_model`` (a ``task: reward`` run) or ``reward_classifier`` +
    ``reward_label`` (reward = P(label)). ``reward_weights``: one per source, in that order
    (functions, then the reward model, then the classifier); default all 1.

    One generation round samples ``generation_batch_size`` answers
    (``generation_batch_size / num_generations`` prompts), then takes ``steps_per_generation``
    optimizer steps on it, ``num_iterations`` times over. The run lasts ``train.max_steps``
    optimizer steps, or ``train.epochs`` passes over the prompts. ``train.batch_size`` is the
    number of answers per forward (gradients accumulate up to an optimizer step).
    """

    reward_function: str | list[str] | None = None
    reward_model: str | None = None
    reward_classifier: str | None = None
    reward_label: str | None = None
    reward_weights: list[float] | None = None
    num_generations: int = 8
    generation_batch_size: int = 32  # answers per generation round
    steps_per_generation: int = 1
    num_iterations: int = 1  # passes over each generation round (TRL's mu)
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    beta: float = 0.04  # KL coefficient (0: no reference forward at all)
    epsilon: float = 0.2
    epsilon_high: float | None = None  # default: epsilon (DAPO suggests 0.28)
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo
    scale_rewards: str = "group"  # group | batch | none
    mask_truncated_completions: bool = False
    use_bias_correction_kl: bool = True  # KL term x the importance ratio (TRL's default)

    def validate(self, where: str) -> None:
        choice(f"{where}.loss_type", self.loss_type, ["grpo", "bnpo", "dr_grpo", "dapo"])
        choice(f"{where}.scale_rewards", self.scale_rewards, ["group", "batch", "none"])
        for key in ("num_generations", "generation_batch_size", "steps_per_generation",
                    "num_iterations", "max_completion_length"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_generations < 2:
            raise ConfigError(f"{where}.num_generations must be >= 2 (advantages compare the "
                              f"answers of one prompt), got {self.num_generations}")
        if self.generation_batch_size % self.num_generations:
            raise ConfigError(f"{where}.generation_batch_size ({self.generation_batch_size}) "
                              f"must be a multiple of num_generations ({self.num_generations})")
        if self.generation_batch_size % self.steps_per_generation:
            raise ConfigError(f"{where}.generation_batch_size ({self.generation_batch_size}) "
                              "must be a multiple of steps_per_generation "
                              f"({self.steps_per_generation})")
        if self.temperature <= 0 or not 0.0 < self.top_p <= 1.0 or self.top_k < 0:
            raise ConfigError(f"{where}: temperature must be > 0, top_p in (0, 1], top_k >= 0")
        if self.beta < 0 or self.epsilon <= 0 or (self.epsilon_high is not None
                                                  and self.epsilon_high <= 0):
            raise ConfigError(f"{where}: beta must be >= 0, epsilon and epsilon_high > 0")
        if self.reward_label is not None and self.reward_classifier is None:
            raise ConfigError(f"{where}.reward_label needs {where}.reward_classifier")
        if self.reward_weights is not None and any(w != w for w in self.reward_weights):
            raise ConfigError(f"{where}.reward_weights must be numbers")

    @property
    def reward_functions(self) -> list[str]:
        f = self.reward_function
        return [] if f is None else [f] if isinstance(f, str) else list(f)
