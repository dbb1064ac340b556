"""``task: reward``: a scalar head trained on preference pairs (Bradley-Terry)."""

from peftlab.tasks.reward.config import RewardConfig
from peftlab.tasks.reward.task import RewardTask

__all__ = ["RewardConfig", "RewardTask"]
