"""``task: simpo``: simple preference optimisation, a length-normalised margin, no reference."""

from peftlab.tasks.simpo.config import SimPOConfig
from peftlab.tasks.simpo.task import SimPOTask, simpo_loss

__all__ = ["SimPOConfig", "SimPOTask", "simpo_loss"]
