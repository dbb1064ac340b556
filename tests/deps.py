"""Optional test dependencies: skipped where absent, but an error where CI requires them.

``pytest.importorskip("peft")`` would turn ~150 peft-parity tests into skips if peft failed
to install, and a green run would hide it. CI (``.ci/run``) sets PEFTLAB_REQUIRE_TEST_DEPS=1,
under which a missing test dependency fails the run instead.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRE_ENV = "PEFTLAB_REQUIRE_TEST_DEPS"


def deps_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes")


def import_test_dep(name: str) -> ModuleType:
    """Import ``name``; if it is missing, skip the calling module (or test), or fail when
    PEFTLAB_REQUIRE_TEST_DEPS=1."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        if deps_required():
            raise ImportError(f"test dependency {name!r} is missing and {REQUIRE_ENV}=1 "
                              f"(install requirements/lock-test.txt): {err}") from err
        pytest.skip(f"could not import {name!r}: {err}", allow_module_level=True)
