"""The frozen reference of preference tasks (DPO, PPO): the model itself with its adapters
switched off in place, through the ``disable`` capability methods declare -- no copy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from torch import nn

from peftlab.errors import ConfigError
from peftlab.methods.registry import get_method, method_names, methods_on


@contextmanager
def reference_policy(model: nn.Module) -> Iterator[None]:
    """The frozen base model: every switchable adapter off, eval mode (no dropout), no copy.

    A model without adapters (e.g. the base evaluated by ``peftlab eval``) is its own
    reference. Training with a method that cannot be switched off is refused earlier, by
    :func:`check_reference_method`, since there the reference would silently be the policy.
    """
    with ExitStack() as stack:
        for method in methods_on(model):
            if method.disable is not None:
                stack.enter_context(method.disable(model))
        was_training = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


def check_reference_method(method_name: str, key: str) -> None:
    """The frozen reference needs a method whose adapter can be switched off."""
    if get_method(method_name).disable is None:
        able = [n for n in method_names() if get_method(n).disable is not None]
        raise ConfigError(f"{key}: the reference is the base model with the adapter switched "
                          f"off, which method {method_name!r} cannot do (it can: "
                          f"{', '.join(able)})")
