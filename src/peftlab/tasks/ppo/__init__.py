"""``task: ppo``: RLHF with PPO, a value head and the adapter-off reference policy."""

from peftlab.tasks.ppo.config import PPOConfig
from peftlab.tasks.ppo.loop import KLController, PPOTrainer, ValueHead, gae, kl_penalty, ppo_losses
from peftlab.tasks.ppo.task import PPOTask

__all__ = ["KLController", "PPOConfig", "PPOTask", "PPOTrainer", "ValueHead", "gae",
           "kl_penalty", "ppo_losses"]
