"""Tasks: what a batch is, how its loss and metrics are computed, how its data is prepared.

Each built-in task is a subpackage that registers a :class:`TaskSpec` when imported.
"""

from peftlab.tasks import (  # noqa: F401  (register)
    classification,
    dpo,
    grpo,
    kto,
    orpo,
    ppo,
    pretrain,
    reward,
    sft,
    simpo,
)
from peftlab.tasks.base import PreparedTask, Task, TaskSpec, build_task, register_task, task_names

__all__ = ["PreparedTask", "Task", "TaskSpec", "build_task", "register_task", "task_names"]
