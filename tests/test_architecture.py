"""The layering stays as docs/ARCHITECTURE.md draws it: import-linter's contracts (pyproject)
hold, imports sit at the top of modules unless a comment says why, and nothing probes a
task or a model for optional behaviour -- tasks and methods declare it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "peftlab"


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports (import-linter, a test dependency) is not installed")
    done = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_function_level_imports_say_why():
    """A function-level import is the exception (a heavy optional dependency, an API not in
    every release); it carries a comment saying why."""
    unexplained = []
    for path in _sources():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^\s+(from \S+ )?import \S", line) and "#" not in line:
                previous = lines[i - 1] if i else ""
                if not re.match(r"^\s+(from \S+ )?import \S.*#", previous):  # a continued block
                    unexplained.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()}")
    assert not unexplained, "\n".join(unexplained)


def test_no_probing_for_optional_behaviour():
    pattern = re.compile(r"getattr\(task\b|hasattr\(task\b|hasattr\(\w+, \"(prompt_encoder|"
                         r"prefix_encoder)\"\)|importlib\.import_module\(\"peftlab")
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in _sources()
             for n, line in enumerate(p.read_text().splitlines(), start=1) if pattern.search(line)]
    assert not found, "\n".join(found)


def test_imports_stay_lazy_where_start_up_matters():
    """``peftlab --help`` or a mistyped flag does not import torch or transformers (~10 s on
    2 cores: each command imports what it runs), yet the first registry lookup finds the
    built-in methods and tasks; and importing the Trainer and the task registry does not import
    scikit-learn, matplotlib or the HTTP stack (~3 s more of every training start-up): the
    modules that need them import them on first use."""
    heavy = ["sklearn", "matplotlib", "fastapi", "uvicorn"]
    code = ("import sys, peftlab.cli\n"
            "print(sorted(m for m in ['torch', 'transformers'] if m in sys.modules))\n"
            "from peftlab.plugins import METHODS, TASKS\n"
            "print('lora' in METHODS and 'sft' in TASKS)\n"
            "import peftlab.training.trainer, peftlab.tasks\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["[]", "True", "[]"], done.stdout + done.stderr


def test_a_failed_import_of_the_built_ins_is_named_at_every_lookup(monkeypatch):
    """The first registry lookup imports the built-in plug-ins; if that import fails (a broken
    torch, say), later lookups must say so, not "unknown method 'lora'"."""
    from peftlab import plugins

    def broken() -> None:
        raise ImportError("libtorch_cpu.so: cannot open shared object file")

    monkeypatch.setattr(plugins, "_load_builtins", [broken])
    monkeypatch.setattr(plugins, "_load_failure", [])
    registry = plugins.Registry("method", "method.name")
    with pytest.raises(ImportError, match="libtorch_cpu.so"):
        registry.get("lora")
    for lookup in (lambda: registry.get("lora"), registry.names, lambda: "lora" in registry):
        with pytest.raises(ImportError, match="built-in methods and tasks failed to import: "
                                              ".*libtorch_cpu.so"):
            lookup()
