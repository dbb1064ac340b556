"""``task: dpo``: direct preference optimisation against the frozen (or precomputed) reference."""

from peftlab.tasks.dpo.config import DPOConfig
from peftlab.tasks.dpo.task import DPOTask, dpo_loss

__all__ = ["DPOConfig", "DPOTask", "dpo_loss"]
