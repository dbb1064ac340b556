"""benchmarks/sweep_search.py's summary and table on fake study records (no training)."""

from __future__ import annotations

import pytest

from peftlab.config import load_config
from peftlab.lab.search_space import space_from_dict
from tests.bench_scripts import load_bench_script


@pytest.fixture
def bench():
    return load_bench_script("sweep_search.py", "sweep_search")


def _t(state, value, start, complete):
    return {"state": state, "value": value, "start": start, "complete": complete}


def test_summary_budget_time_to_reach_and_medians(bench):
    t0 = 1000.0
    grid = [_t("COMPLETE", 0.80, t0, t0 + 100), _t("COMPLETE", 0.84, t0 + 100, t0 + 200),
            _t("COMPLETE", 0.82, t0 + 200, t0 + 300), _t("RUNNING", None, t0 + 300, None),
            _t("COMPLETE", 0.90, t0 + 300, t0 + 401)]  # after the 400 s budget: not counted
    tpe = [_t("COMPLETE", 0.78, t0, t0 + 90), _t("PRUNED", None, t0 + 90, t0 + 110),
           _t("COMPLETE", 0.85, t0 + 110, t0 + 150), _t("FAIL", None, t0 + 150, t0 + 151),
           _t("COMPLETE", 0.86, t0 + 151, t0 + 250)]
    g, s = bench.summarize(grid, t0, 400.0), bench.summarize(tpe, t0, 400.0)
    assert g == {"finished": 3, "pruned": 0, "failed": 0, "cut_at_budget": 2,
                 "best_accuracy": 0.84, "best_at_s": 200.0,
                 "curve": [[100.0, 0.80], [200.0, 0.84]],
                 "finished_values": [0.80, 0.84, 0.82]}
    assert (s["finished"], s["pruned"], s["failed"], s["cut_at_budget"]) == (3, 1, 1, 0)
    assert s["best_accuracy"] == 0.86 and s["best_at_s"] == 250.0
    assert bench.time_to_reach(s["curve"], 0.84) == 150.0  # 0.85 at 150 s beats the grid's best
    assert bench.time_to_reach(s["curve"], 0.9) is None
    assert bench.time_to_reach(g["curve"], None) is None
    cmp0 = bench.compare({"grid": g, "tpe_asha": s})
    assert cmp0 == {"grid": {"reach_grid_best_s": 200.0, "reach_tpe_best_s": None},
                    "tpe_asha": {"reach_grid_best_s": 150.0, "reach_tpe_best_s": 250.0}}
    # seed 1: TPE never reaches the grid; seed 2: it does at 50 s
    s1 = bench.summarize(tpe[:2], t0, 400.0)
    s2 = bench.summarize([_t("COMPLETE", 0.95, t0, t0 + 50)], t0, 400.0)
    seeds = {str(k): {"arms": {"grid": g, "tpe_asha": t},
                      "compare": bench.compare({"grid": g, "tpe_asha": t})}
             for k, t in enumerate((s, s1, s2))}
    med = bench.medians(seeds)
    assert med["tpe_asha"]["reach_grid_best_s"] == 150.0  # median of 150, never, 50
    assert med["tpe_asha"]["best_accuracy"] == 0.86 and med["grid"]["best_at_s"] == 200.0
    assert med["tpe_asha"]["finished"] == 1 and med["tpe_asha"]["pruned"] == 1
    results = {"meta": {"n_train": 2880, "n_dev": 872, "budget_s": 400.0, "eval_every": 30,
                        "steps": 90, "cpu": "Fake CPU", "cores": 2, "note": "shared"},
               "seeds": seeds, "median": med}
    text = bench.table(results)
    assert "| 0 | grid | 84.0 | 200 | 200 | never | 3 | 0 | 0 | 2 |" in text
    assert "| 0 | tpe_asha | 86.0 | 250 | 150 | 250 | 3 | 1 | 1 | 0 |" in text
    assert "| 1 | tpe_asha | 78.0 | 90 | never | 90 | 1 | 1 | 0 | 0 |" in text
    assert "| median | tpe_asha | 86.0 | 90 | 150 | 90 | 1 | 1 | 0 | 0 |" in text
    assert "Fake CPU (2 cores), shared" in text


def test_arm_spaces_share_one_space_and_the_config_is_valid(bench, tmp_path):
    spaces = bench.spaces(seed=1, eval_every=30, trials=100, margin=0.034)
    grid, tpe = space_from_dict(spaces["grid"]), space_from_dict(spaces["tpe_asha"])
    assert grid.grid_size == 36 and grid.seed == tpe.seed == 1
    assert [p.key for p in grid.params] == [p.key for p in tpe.params]
    for g, t in zip(grid.params, tpe.params, strict=True):  # the grid is a lattice of the ranges
        assert (min(g.choices), max(g.choices)) == (t.low, t.high)
    assert tpe.pruner == "asha" and tpe.pruner_options["min_resource"] == 30
    assert tpe.pruner_options["margin"] == 0.034
    assert tpe.sampler == "tpe" and tpe.sampler_options == {"startup_trials": 5}
    cfg = load_config(base=bench.base_config({"train": "t.jsonl", "validation": "v.jsonl"},
                                             str(tmp_path), 30, 1))
    assert cfg.train.best_metric == "val_accuracy" and cfg.task == "classification"
    for p in grid.params:
        for v in p.choices:
            load_config(overrides=[f"{p.key}={v}"], base=cfg.to_dict())


def test_the_simulated_race_keeps_the_budget_and_prunes_only_with_a_pruner():
    sim = load_bench_script("sweep_search_sim.py", "sweep_search_sim")
    values = [0.80, 0.84, 0.85]
    assert [sim._at(values, s) for s in (0, 15, 30, 60, 90)] == [
        sim.CHANCE, pytest.approx((sim.CHANCE + 0.80) / 2), 0.80, 0.84, 0.85]
    assert sim.reach([(100.0, 0.8), (300.0, 0.85)], 0.85) == 300.0
    assert sim.reach([(100.0, 0.8)], 0.85) == float("inf")
    grid, tpe = sim.run_arm("grid", 0), sim.run_arm("tpe", 0)
    for arm in (grid, tpe):
        times = [t for t, _ in arm["curve"]]
        best = [v for _, v in arm["curve"]]
        assert times == sorted(times) and times[-1] <= sim.BUDGET_S
        assert best == sorted(best)  # a best-so-far curve
    # a full trial costs 18 + 3 x 44 = 150 s: 12 fit in 1,920 s, and the grid prunes none
    assert grid["finished"] == 12 and grid["pruned"] == 0
    assert tpe["pruned"] > 0
