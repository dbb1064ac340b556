"""``task: sft``: supervised fine-tuning with completion-only loss (and its data pipeline)."""

from peftlab.tasks.sft.data import prepare_sft_data
from peftlab.tasks.sft.task import SFTTask, build_sft_task

__all__ = ["SFTTask", "build_sft_task", "prepare_sft_data"]
