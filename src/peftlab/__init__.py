"""peftlab: CPU-first, parameter-efficient fine-tuning of language models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftlab import plugins
from peftlab.config import ConfigError, RunConfig, load_config

if TYPE_CHECKING:
    from peftlab.api import (  # for type checkers
        baseline,
        evaluate,
        export,
        load,
        merge,
        merge_adapters,
        predict,
        sweep,
        train,
    )

__version__ = "0.1.0"
__all__ = ["ConfigError", "RunConfig", "baseline", "evaluate", "export", "load", "load_config",
           "merge", "merge_adapters", "predict", "sweep", "train"]


def _register_builtins() -> None:
    import peftlab.methods  # noqa: F401  (on the first registry lookup: see plugins.py)
    import peftlab.tasks  # noqa: F401


plugins.load_builtins_with(_register_builtins)


def __getattr__(name: str) -> Any:
    """The API's functions, imported on first use rather than with the package, so that
    ``import peftlab.training.trainer`` (a recipe, the benchmarks) or ``peftlab serve`` does
    not pay for every command's imports (optuna, the report and export code, ...)."""
    if name not in __all__:
        raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
    from peftlab import api  # on first use: see the docstring

    return getattr(api, name)
