"""Import a script of benchmarks/ as a module in a test (they are scripts, not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_bench_script(filename: str, module_name: str) -> ModuleType:
    """``benchmarks/<filename>`` executed as ``module_name``. benchmarks/ stays on sys.path:
    the scripts import their siblings (_common, train_throughput), some inside functions."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(module_name, BENCH / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
