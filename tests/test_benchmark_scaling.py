"""benchmarks/scaling.py: batches, the 24 GB estimate, summary and table on fake cells."""

from __future__ import annotations

import json

import pytest

from tests.bench_scripts import load_bench_script


@pytest.fixture
def bench():
    return load_bench_script("scaling.py", "scaling")


def _cell(name, size, seq, seconds, peak, model, compiled=False):
    return {"name": name, "size": size, "seq_len": seq, "step_seconds": seconds,
            "peak_rss_mb": peak, "model_mb": model, "compiled": compiled,
            "precision": "bf16", "losses": [11.0, 10.9]}


def test_batches_keep_tokens_per_step_fixed(bench):
    for seq in (256, 2048):
        b = bench.make_batches(vocab=100, seq_len=seq, steps=2)
        assert b["input_ids"].shape == (2, 2048 // seq, seq)
        assert (b["labels"] == b["input_ids"]).all() and int(b["input_ids"].max()) < 100


def test_fits_in_24gb_is_linear_in_the_batch(bench):
    # model 4 GB resident, training adds 2 GB per 2,048 tokens -> (24-4)/2 * 2048 tokens
    cell = _cell("peftlab", "1.7B", 2048, [9.0, 2.0], peak=6 * 1024, model=4 * 1024)
    assert bench.fits_tokens(cell) == 20 * 1024
    assert bench.fits_tokens(dict(cell, peak_rss_mb=4 * 1024)) is None  # no growth measured


def test_summary_and_table(bench):
    cells = [_cell("peftlab", "135M", 256, [30.0, 2.0, 4.0], 3000, 1000, compiled=True),
             _cell("peer", "135M", 256, [5.0, 4.0, 4.0], 6000, 2000),
             _cell("peftlab_ckpt", "135M", 256, [5.0, 8.0], 2000, 1000, compiled=True)]
    (row,) = bench.summarize(cells, skip=1)
    assert row["batch"] == 8
    assert row["peftlab"]["tokens_per_s"] == pytest.approx(2048 / 3.0)  # median of 2.0, 4.0
    assert row["peer"]["tokens_per_s"] == pytest.approx(512.0)
    assert row["ratio"] == pytest.approx((2048 / 3.0) / 512.0)
    assert row["rss_ratio"] == pytest.approx(0.5)
    result = {"machine": {"cpu": "test cpu", "cores": 2, "torch": "x", "loadavg_start": [0.5],
                          "loadavg_end": [0.7]},
              "fp32_peak_gflops": 190.0, "bf16_peak_gflops": 870.0, "steps": 3, "skip": 1,
              "rows": [row], "cells": cells}
    md = bench.markdown(result)
    assert "| 135M | 256 x 8 | 683 | 512 | 1.33x | 2.9 | 5.9 | 256 | 2.0 |" in md
    assert "test cpu" in md and "870" in md
    assert "train.compile auto on for: 135M, 135M + act. ckpt." in md


def test_a_killed_cell_is_a_result_and_merge_keeps_the_rest(bench):
    """The out-of-memory killer's SIGKILL is recorded as "does not fit", not a crash; a
    --merge run replaces only the cells it measured again."""
    cfg = {"name": "peer", "size": "1.7B", "seq_len": 2048}
    dead = bench.failed_cell(cfg, {"returncode": -9, "log_tail": "..."})
    assert dead["error"] == "killed: out of memory"
    assert bench.failed_cell(cfg, {"returncode": 1, "log_tail": ""})["error"] == "failed (exit 1)"
    ours = _cell("peftlab", "1.7B", 2048, [9.0, 2.0], 6000, 4000)
    (row,) = bench.summarize([ours, dead], skip=1)
    assert row["peer"] == {"error": "killed: out of memory"} and "ratio" not in row
    result = {"machine": {"cpu": "c", "cores": 2, "torch": "x", "loadavg_start": [0.5],
                          "loadavg_end": [0.7]},
              "fp32_peak_gflops": 1.0, "bf16_peak_gflops": 1.0, "steps": 2, "skip": 1,
              "rows": [row], "cells": [ours, dead]}
    assert "| 1.7B | 2048 x 1 | 1024 | killed: out of memory | – | 5.9 | – |" in \
        bench.markdown(result)
    old = [_cell("peftlab", "135M", 256, [1.0, 1.0], 3000, 1000),
           _cell("peftlab", "1.7B", 2048, [50.0, 50.0], 9000, 8000)]
    assert bench.merged(old, [ours, dead]) == [old[0], ours, dead]


def test_merge_run_keeps_the_cells_it_did_not_measure(bench, tmp_path, monkeypatch):
    """write_results with --merge: the earlier file's other cells stay, and the table says
    which machine measured them."""
    machine = {"cpu": "old cpu", "cores": 2, "torch": "x", "loadavg_start": [0.1],
               "loadavg_end": [0.1]}
    old = {"machine": machine, "bf16_peak_gflops": 571.0, "fp32_peak_gflops": 137.0,
           "steps": 3, "clock": "cpu", "threads": 1,
           "cells": [_cell("peftlab", "135M", 256, [1.0, 1.0], 3000, 1000),
                     _cell("peftlab", "1.7B", 2048, [50.0, 50.0], 9000, 8000)]}
    monkeypatch.setattr(bench, "n_params", lambda size: 1)
    args = type("Args", (), {"out": tmp_path, "clock": "cpu", "threads": 1,
                             "previous": old})()
    new = _cell("peftlab", "1.7B", 2048, [9.0, 2.0], 6000, 4000)
    bench.write_results(args, dict(machine, cpu="new cpu"), {"bf16": 400.0, "fp32": 150.0}, 3,
                        ["1.7B"], [new], 0.0)
    result = json.loads((tmp_path / "scaling.json").read_text())
    first_run = {"cpu": "old cpu", "bf16_peak_gflops": 571.0, "fp32_peak_gflops": 137.0}
    second_run = {"cpu": "new cpu", "bf16_peak_gflops": 400.0, "fp32_peak_gflops": 150.0}
    assert result["cells"] == [dict(old["cells"][0], measured_on=first_run),
                               dict(new, measured_on=second_run)]
    assert result["earlier"] == [{"measured_on": first_run, "cells": [["peftlab", "135M", 256]]}]
    md = (tmp_path / "scaling.md").read_text()
    assert "the cells peftlab 135M x 256 come from an earlier run on old cpu" in md
    assert "bf16 571 GFLOP/s" in md and "new cpu" in md

    # merging into the merged file again: each kept cell keeps the machine that measured it
    args.previous = result
    third = _cell("peer", "135M", 256, [2.0, 2.0], 5000, 1000)
    bench.write_results(args, dict(machine, cpu="third cpu"), {"bf16": 300.0, "fp32": 90.0}, 3,
                        ["135M"], [third], 0.0)
    again = json.loads((tmp_path / "scaling.json").read_text())
    assert [c["measured_on"]["cpu"] for c in again["cells"]] == ["old cpu", "new cpu",
                                                                 "third cpu"]
    assert again["earlier"] == [
        {"measured_on": first_run, "cells": [["peftlab", "135M", 256]]},
        {"measured_on": second_run, "cells": [["peftlab", "1.7B", 2048]]}]
    md = (tmp_path / "scaling.md").read_text()
    assert "peftlab 1.7B x 2048 come from an earlier run on new cpu" in md


def test_without_bf16_instructions_the_peer_runs_in_fp32(bench, tmp_path, monkeypatch):
    """On a CPU whose bf16 matmuls crawl (an AVX2-only EPYC: 1.3 vs 127 GFLOP/s) the peer's
    bf16-autocast step would take minutes: it runs in fp32, and the table says why."""
    assert bench.peer_precision({"bf16": 870.0, "fp32": 190.0}) == ("bf16-autocast", None)
    assert bench.peer_precision({"bf16": 160.0, "fp32": 300.0})[0] == "bf16-autocast"  # slower, runs
    precision, why = bench.peer_precision({"bf16": 1.3, "fp32": 127.0})
    assert precision == "fp32" and "1.3 GFLOP/s" in why and "127" in why
    monkeypatch.setattr(bench, "n_params", lambda size: 1)
    machine = {"cpu": "avx2 cpu", "cores": 2, "torch": "x", "loadavg_start": [0.1],
               "loadavg_end": [0.1]}
    args = type("Args", (), {"out": tmp_path, "clock": "wall", "threads": None,
                             "peer_precision": precision})()
    cells = [_cell("peftlab", "135M", 256, [3.0, 2.0], 4000, 1000),
             dict(_cell("peer", "135M", 256, [4.0, 4.0], 8000, 1500), precision="fp32")]
    bench.write_results(args, machine, {"bf16": 1.3, "fp32": 127.0}, 2, ["135M"], cells, 0.0)
    result = json.loads((tmp_path / "scaling.json").read_text())
    assert result["peer_precision"] == "fp32" and result["peer_precision_why"] == why
    md = (tmp_path / "scaling.md").read_text()
    assert md.startswith("# How cost grows: peftlab vs transformers + peft (fp32)")
    assert f"Peer: {why}." in md and "| 135M | 256 x 8 | 1024 | 512 | 2.00x |" in md
