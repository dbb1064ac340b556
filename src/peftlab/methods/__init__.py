"""Fine-tuning methods, each self-contained and registered by name."""

from peftlab.methods import lora as _lora  # noqa: F401  (registers "lora")
from peftlab.methods.registry import (
    Method,
    get_method,
    method_for_adapter_dir,
    method_names,
    register,
)

__all__ = ["Method", "get_method", "method_for_adapter_dir", "method_names", "register"]
