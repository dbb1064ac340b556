"""``task: kto``: Kahneman-Tversky optimisation on unpaired desirable/undesirable answers."""

from peftlab.tasks.kto.config import KTOConfig
from peftlab.tasks.kto.task import KTOTask, kto_loss

__all__ = ["KTOConfig", "KTOTask", "kto_loss"]
