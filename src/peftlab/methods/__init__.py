"""Fine-tuning methods, each self-contained and registered by name."""

from peftlab.methods import adapter as _adapter  # noqa: F401  (registers "adapter")
from peftlab.methods import freeze as _freeze  # noqa: F401  (registers "freeze", "feature_extraction")
from peftlab.methods import full as _full  # noqa: F401  (registers "full")
from peftlab.methods import ia3 as _ia3  # noqa: F401  (registers "ia3")
from peftlab.methods import lora as _lora  # noqa: F401  (registers "lora")
from peftlab.methods import p_tuning as _p_tuning  # noqa: F401  (registers "p_tuning")
from peftlab.methods import prefix_tuning as _prefix  # noqa: F401  (registers "prefix_tuning")
from peftlab.methods import prompt_tuning as _prompt_tuning  # noqa: F401  (registers "prompt_tuning")
from peftlab.methods.registry import (
    Method,
    get_method,
    has_virtual_tokens,
    method_for_adapter_dir,
    method_names,
    methods_on,
    optimizer_param_groups,
    register,
)

__all__ = ["Method", "get_method", "has_virtual_tokens", "method_for_adapter_dir", "method_names",
           "methods_on", "optimizer_param_groups", "register"]
