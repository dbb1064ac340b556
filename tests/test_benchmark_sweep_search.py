"""benchmarks/sweep_search.py's summary and table on fake study records (no training)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from peftlab.config import load_config
from peftlab.lab.search_space import space_from_dict

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports its sibling _common
    spec = importlib.util.spec_from_file_location("sweep_search", BENCH / "sweep_search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _t(state, value, start, complete):
    return {"state": state, "value": value, "start": start, "complete": complete}


def test_summary_table_and_time_to_reach(bench):
    t0 = 1000.0
    grid = [_t("COMPLETE", 0.80, t0, t0 + 100), _t("COMPLETE", 0.84, t0 + 100, t0 + 200),
            _t("COMPLETE", 0.82, t0 + 200, t0 + 300), _t("RUNNING", None, t0 + 300, None)]
    tpe = [_t("COMPLETE", 0.78, t0, t0 + 90), _t("PRUNED", None, t0 + 90, t0 + 110),
           _t("COMPLETE", 0.85, t0 + 110, t0 + 150), _t("FAIL", None, t0 + 150, t0 + 151),
           _t("COMPLETE", 0.86, t0 + 151, t0 + 250)]
    g, s = bench.summarize(grid, t0), bench.summarize(tpe, t0)
    assert g == {"finished": 3, "pruned": 0, "failed": 0, "best_accuracy": 0.84,
                 "best_at_s": 200.0, "curve": [[100.0, 0.80], [200.0, 0.84]], "used_s": 300.0}
    assert (s["finished"], s["pruned"], s["failed"]) == (3, 1, 1)
    assert s["best_accuracy"] == 0.86 and s["best_at_s"] == 250.0
    assert bench.time_to_reach(s["curve"], 0.84) == 150.0  # 0.85 at 150 s beats the grid's best
    assert bench.time_to_reach(s["curve"], 0.9) is None
    assert bench.time_to_reach(g["curve"], None) is None
    results = {"meta": {"n_train": 2000, "n_dev": 500, "budget_s": 480.0, "eval_every": 8,
                        "cpu": "Fake CPU", "cores": 2, "note": "shared"},
               "arms": {"grid": g, "tpe_asha": s}}
    text = bench.table(results)
    assert "| grid | 84.0 | 200 | 200 | 3 | 0 | 0 | 300 |" in text
    assert "| tpe_asha | 86.0 | 250 | 150 | 3 | 1 | 1 | 250 |" in text
    assert "Fake CPU (2 cores), shared with other jobs" in text
    results["arms"]["tpe_asha"] = bench.summarize(tpe[:2], t0)
    assert "| tpe_asha | 78.0 | 90 | never | 1 | 1 | 0 | 110 |" in bench.table(results)


def test_arm_spaces_and_config_are_valid(bench, tmp_path):
    spaces = bench.spaces(trials=16, eval_every=8)
    assert space_from_dict(spaces["grid"]).grid_size == 6
    tpe = space_from_dict(spaces["tpe_asha"])
    assert tpe.pruner == "asha" and tpe.pruner_options["min_resource"] == 8
    cfg = load_config(base=bench.base_config({"train": "t.jsonl", "validation": "v.jsonl"},
                                             str(tmp_path), 8, 1))
    assert cfg.train.best_metric == "val_accuracy" and cfg.task == "classification"
