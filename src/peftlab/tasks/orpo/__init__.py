"""``task: orpo``: odds-ratio preference optimisation, an odds-ratio term added to SFT, no reference."""

from peftlab.tasks.orpo.config import ORPOConfig
from peftlab.tasks.orpo.task import ORPOTask, log1mexp, odds_ratio_loss

__all__ = ["ORPOConfig", "ORPOTask", "log1mexp", "odds_ratio_loss"]
