"""Let ``peftlab.train(...)`` and ``peftlab.evaluate(...)`` stay callable.

The packages ``peftlab/train`` and ``peftlab/evaluate`` share their names with the public
API functions. Importing a submodule (``peftlab.train.trainer``) rebinds the attribute
``peftlab.train`` to the package, so the package itself must be callable. Setting a
module's ``__class__`` to a ModuleType subclass is the documented way to do that.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any


def make_callable(module_name: str, target: Callable[[], Callable[..., Any]]) -> None:
    """Calling module ``module_name`` calls ``target()(...)`` (resolved lazily)."""

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return target()(*args, **kwargs)

    sys.modules[module_name].__class__ = CallableModule
