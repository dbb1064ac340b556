"""Mutation testing of peftlab's core modules with cosmic-ray: can the tests fail?

Each module is mutated in a throw-away copy of the tree (cosmic-ray edits the file in place),
and only the tests that exercise it run against each mutant (pytest -x: the first failure
kills it). A mutant that no test notices *survives*; the report lists them.

cosmic-ray writes many mutants per operator (``a + b`` becomes ``a - b``, ``a * b``, ...
``a ^ b``). The bitwise/shift/power/modulo replacements of arithmetic are left out (on
floats and tensors they crash at once, which says nothing about the tests), and a seeded
sample of the rest is run: the full set takes hours on two cores. The same seed on the same
source picks the same mutants, so scores of two test suites compare like with like.

    make mutation                                   # every module, 20 mutants each
    .venv-mut/bin/python tools/mutation.py --modules schedule --sample 0   # all of one module

Run by ``make mutation`` with cosmic-ray in .venv-mut and the tests on .venv's python.
Not part of ``make test`` or CI: it is slow.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTEST = "-m pytest -x -q -p no:cacheprovider -W ignore::DeprecationWarning"
# minutes-long end-to-end tests whose checks the faster ones cover for these modules
SLOW = ("--deselect tests/test_train.py::test_compiled_blocks_train_like_eager "
        "--deselect tests/test_train.py::test_training_reduces_loss_and_writes_outputs")
# replacing + - * / by these only crashes (on floats/tensors): no information about the tests
USELESS_TARGETS = ("FloorDiv", "Mod", "Pow", "RShift", "LShift", "BitOr", "BitAnd", "BitXor")


@dataclass(frozen=True)
class Target:
    path: str  # the module, relative to the repo root
    tests: str  # pytest arguments selecting the tests that exercise it (in every version)
    definitions: tuple[str, ...] = ()  # only mutate inside these top-level defs/classes


TARGETS = {
    "lora": Target("src/peftlab/methods/lora.py",
                   "tests/test_lora.py tests/test_lora_fused.py tests/test_api_merge.py "
                   "tests/test_lora_peft_parity.py"),
    "trainer": Target("src/peftlab/training/trainer.py",
                      f"tests/test_train.py tests/test_distributed.py {SLOW}"),
    "schedule": Target("src/peftlab/runtime/schedule.py",
                       f"tests/test_schedule.py tests/test_train.py {SLOW}"),
    "checkpoint": Target("src/peftlab/runtime/checkpoint.py",
                         "tests/test_train.py tests/test_ppo.py -k resume"),
    "loss": Target("src/peftlab/models/lm.py",  # the SFT loss: label-only head, chunked CE
                   "tests/test_sft_head_ce.py "
                   "tests/test_train.py::test_label_only_head_equals_full_forward_loss "
                   "tests/test_train.py::test_gradient_accumulation_equals_large_batch "
                   "tests/test_train.py::test_bf16_path_tracks_fp32",
                   ("head_cross_entropy", "_FrozenHeadCrossEntropy", "backbone_hidden_states")),
}


def definition_lines(source: str, names: tuple[str, ...]) -> list[tuple[int, int]]:
    """Line ranges of top-level defs/classes named in ``names``, or of methods as
    ``Class.method``."""
    spans = []
    for node in ast.parse(source).body:
        name = getattr(node, "name", None)
        if name in names:
            spans.append((node.lineno, node.end_lineno))
        elif isinstance(node, ast.ClassDef):
            spans += [(m.lineno, m.end_lineno) for m in node.body
                      if f"{name}.{getattr(m, 'name', '')}" in names]
    return spans


def write_config(work: Path, target: Target, python: str, timeout: float) -> Path:
    config = work / "mutation.toml"
    command = f"{python} {PYTEST} {target.tests}"
    config.write_text(
        "[cosmic-ray]\n"
        f"module-path = {json.dumps(target.path)}\n"
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(command)}\n\n"
        "[cosmic-ray.distributor]\n"
        'name = "local"\n')
    return config


def select(session: Path, target: Target, source: str, sample: int, seed: int) -> tuple[int, int]:
    """Mark every mutant outside the sample SKIPPED. Returns (eligible, sampled)."""
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    ranges = definition_lines(source, target.definitions) if target.definitions else None
    with use_db(str(session)) as db:
        items = list(db.work_items)
        eligible, skipped = [], []
        for item in items:
            m = item.mutations[0]
            line = m.start_pos[0]
            target_op = m.operator_name.rsplit("_", 1)[-1]
            useless = "BinaryOperator" in m.operator_name and target_op in USELESS_TARGETS
            outside = ranges is not None and not any(a <= line <= b for a, b in ranges)
            (skipped if useless or outside else eligible).append(item)
        eligible.sort(key=lambda i: (i.mutations[0].start_pos, i.mutations[0].operator_name,
                                     i.mutations[0].occurrence))
        chosen = eligible
        if sample and len(eligible) > sample:
            chosen = random.Random(seed).sample(eligible, sample)
        keep = {i.job_id for i in chosen}
        skip_ids = [i.job_id for i in items if i.job_id not in keep]
        if skip_ids:
            db.set_multiple_results(skip_ids, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
    return len(eligible), len(chosen)


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Where the type annotations are: with ``from __future__ import annotations`` they are
    never evaluated, so a mutant there (``Tensor | None`` -> ``Tensor / None``) is equivalent."""
    spans = []
    for node in ast.walk(ast.parse(source)):
        for ann in (getattr(node, "annotation", None), getattr(node, "returns", None)):
            if isinstance(ann, ast.expr):
                spans.append(((ann.lineno, ann.col_offset), (ann.end_lineno, ann.end_col_offset)))
    return spans


def summarize(session: Path, source: str | None = None) -> dict:
    """Killed/survived counts; ``score`` = killed / (killed + survived), and ``score_real``
    the same without survivors inside annotations (equivalent mutants, see above)."""
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    spans = annotation_spans(source) if source else []
    killed, survived, incompetent = 0, [], 0
    with use_db(str(session)) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            if result.test_outcome == TestOutcome.SURVIVED:
                m = item.mutations[0]
                pos = tuple(m.start_pos)
                survived.append({"line": m.start_pos[0], "operator": m.operator_name,
                                 "annotation": any(a <= pos <= b for a, b in spans),
                                 "diff": "\n".join(ln for ln in (result.diff or "").splitlines()
                                                   if re.match(r"^[-+][^-+]", ln))})
            elif result.test_outcome == TestOutcome.INCOMPETENT:
                incompetent += 1
            else:
                killed += 1
    ran = killed + len(survived)
    real = ran - sum(s["annotation"] for s in survived)
    return {"killed": killed, "survived": sorted(survived, key=lambda s: s["line"]),
            "incompetent": incompetent, "score": round(100 * killed / ran, 1) if ran else None,
            "score_real": round(100 * killed / real, 1) if real else None}


def run_module(name: str, args: argparse.Namespace) -> dict:
    target = TARGETS[name]
    if args.only:  # e.g. --only LoraLinear.merge LoraLinear.unmerge: a closer look at a part
        target = Target(target.path, target.tests, tuple(args.only))
    work = Path(args.workdir) / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    root = Path(args.root)
    for part in ("src", "tests", "benchmarks"):
        shutil.copytree(root / part, work / part,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(root / "pyproject.toml", work / "pyproject.toml")
    config = write_config(work, target, args.python, args.timeout)
    session = work / "session.sqlite"
    cosmic = str(Path(sys.executable).with_name("cosmic-ray"))
    env = dict(os.environ, PYTHONPATH=str(work / "src"), PYTHONDONTWRITEBYTECODE="1")
    subprocess.run([cosmic, "init", str(config), str(session)], cwd=work, env=env, check=True)
    eligible, sampled = select(session, target, (work / target.path).read_text(), args.sample,
                               args.seed)
    print(f"[{name}] {sampled} of {eligible} eligible mutants of {target.path}", flush=True)
    t0 = time.time()
    subprocess.run([cosmic, "exec", str(config), str(session)], cwd=work, env=env, check=True)
    out = summarize(session, (work / target.path).read_text())
    out.update(module=target.path, eligible=eligible, sampled=sampled,
               minutes=round((time.time() - t0) / 60, 1))
    print(f"[{name}] score {out['score']}% ({out['killed']} killed, {len(out['survived'])} "
          f"survived) in {out['minutes']} min", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", choices=sorted(TARGETS), default=list(TARGETS))
    parser.add_argument("--sample", type=int, default=20, help="mutants per module (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", default=None,
                        help="mutate only these defs (NAME or Class.method) of the module")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"),
                        help="interpreter that runs the tests (has torch, peft, pytest)")
    parser.add_argument("--root", default=str(ROOT), help="tree whose src/ and tests/ are used")
    parser.add_argument("--workdir", default=str(ROOT / ".mutation"))
    parser.add_argument("--report", default=None, help="JSON report (default WORKDIR/report.json)")
    args = parser.parse_args(argv)
    results = [run_module(name, args) for name in args.modules]
    report = Path(args.report or Path(args.workdir) / "report.json")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(results, indent=1))
    print("\n| module | sampled / eligible | killed | survived | score | without "
          "annotation mutants |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['module']} | {r['sampled']} / {r['eligible']} | {r['killed']} | "
              f"{len(r['survived'])} | {r['score']}% | {r['score_real']}% |")
    for r in results:
        for s in r["survived"]:
            where = " (annotation: equivalent)" if s["annotation"] else ""
            print(f"SURVIVED {r['module']}:{s['line']} {s['operator']}{where}\n{s['diff']}")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
