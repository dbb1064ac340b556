"""``task: grpo``: group-relative policy optimisation, no value head, adapter-off reference."""

from peftlab.tasks.grpo.config import GRPOConfig
from peftlab.tasks.grpo.loop import GRPOTrainer, aggregate, group_advantages, grpo_token_losses
from peftlab.tasks.grpo.task import GRPOTask

__all__ = ["GRPOConfig", "GRPOTask", "GRPOTrainer", "aggregate", "group_advantages",
           "grpo_token_losses"]
