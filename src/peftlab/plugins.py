"""Where methods and tasks register themselves: one named registry per kind of plug-in.

The config layer looks plug-ins up here by name (their config dataclasses, a task's config
section) without importing them; ``peftlab.methods`` and ``peftlab.tasks`` fill the
registries when they are imported. ``import peftlab`` does not import them (they pull in
torch and transformers, ~10 s on 2 cores, which ``peftlab --help`` should not wait for); it
sets :func:`load_builtins_with`, so the first lookup in any registry imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from peftlab.errors import ConfigError, suggest

T = TypeVar("T")
_load_builtins: list[Callable[[], None]] = []  # the package's loader, until its first call
_load_failure: list[Exception] = []  # what that call raised, if it raised


def load_builtins_with(loader: Callable[[], None]) -> None:
    """Call ``loader`` (it imports the built-in plug-ins) before the first registry lookup."""
    _load_builtins[:] = [loader]


def _ensure_builtins() -> None:
    if _load_failure:
        # not "unknown method 'lora'" on every later lookup: the import error that caused it
        raise ImportError(f"peftlab's built-in methods and tasks failed to import: "
                          f"{_load_failure[0]!r}") from _load_failure[0]
    if _load_builtins:
        loader = _load_builtins.pop()  # popped first: a lookup while it imports does not recurse
        try:
            loader()
        except Exception as error:
            _load_failure.append(error)
            raise


class Registry(Generic[T]):
    """Plug-ins of one kind by name; an unknown name is a ConfigError naming ``key``."""

    def __init__(self, kind: str, key: str) -> None:
        self.kind, self.key = kind, key
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        _ensure_builtins()
        if name not in self._items:
            raise ConfigError(f"{self.key}: unknown {self.kind} {name!r}"
                              f"{suggest(str(name), self.names())}; known {self.kind}s: "
                              f"{', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        _ensure_builtins()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        _ensure_builtins()
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        _ensure_builtins()
        return iter(self._items.values())


METHODS: Registry = Registry("method", "method.name")  # peftlab.methods.registry.Method
TASKS: Registry = Registry("task", "task")  # peftlab.tasks.base.TaskSpec
