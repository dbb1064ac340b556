"""benchmarks/alignment.py's held-out pair metrics by hand, and its tables render every part."""

from __future__ import annotations

import pytest
import torch

from tests.bench_scripts import load_bench_script


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("alignment.py", "alignment_bench")


def test_pair_table_by_hand(bench):
    t = torch.tensor
    pol = {"chosen": t([-10.0, -20.0, -5.0]), "rejected": t([-12.0, -19.0, -9.0])}
    ref = {"chosen": t([-11.0, -19.0, -6.0]), "rejected": t([-11.0, -19.0, -6.0])}
    cnt = {"chosen": t([10.0, 10.0, 1.0]), "rejected": t([12.0, 5.0, 10.0])}
    out = bench._pair_table(pol, ref, cnt)
    # log pi/ref chosen vs rejected: (1, -1, 1) vs (-1, 0, -3) -> pairs 1 and 3
    assert out["implicit_reward_accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert out["sum_prefers_chosen_before"] == 0.0  # ties are not preferences
    assert out["sum_prefers_chosen_after"] == pytest.approx(2 / 3, abs=1e-4)
    # averages after: (-1 vs -1), (-2 vs -3.8), (-5 vs -0.9)
    assert out["avg_prefers_chosen_after"] == pytest.approx(1 / 3, abs=1e-4)
    assert out["mean_logp_margin_after"] == pytest.approx((2 - 1 + 4) / 3, abs=1e-3)
    assert out["pairs"] == 3


def test_tables_render_the_new_parts(bench):
    pref = {"task": "simpo", "model": "m", "method": "lora", "options": {"beta": 2.0},
            "steps": 40, "train_pairs_read": 2000, "eval_pairs_read": 312, "pairs": 220,
            "implicit_reward_accuracy": 0.6, "sum_prefers_chosen_before": 0.5,
            "sum_prefers_chosen_after": 0.55, "avg_prefers_chosen_before": 0.5,
            "avg_prefers_chosen_after": 0.6, "train_seconds": 600.0}
    grpo = {"options": {"generation_batch_size": 16, "num_generations": 4, "temperature": 0.8,
                        "beta": 0.04, "loss_type": "dapo", "max_completion_length": 48},
            "policy": "p", "steps": 24, "prompts_seen": 96, "lr": 1e-4, "val_problems": 150,
            "val_accuracy_before": 0.27, "val_accuracy_after": 0.3, "train_reward_first": 0.1,
            "train_reward_last5": 0.2, "completion_length_first": 44,
            "completion_length_last": 30, "kl_last": 0.004,
            "reward_curve_png": "benchmarks/results/alignment_grpo_reward.png", "seconds": 1800,
            "room_check": {"max_new_tokens": 128, "base_accuracy": 0.35, "tuned_accuracy": 0.4,
                           "base_mean_words": 40.0, "tuned_mean_words": 25.0}}
    text = bench.write_tables({"grpo": grpo, "pref-simpo": pref,
                               "pref-kto": dict(pref, task="kto")})
    assert "| 0.270 | 0.300 |" in text and "alignment_grpo_reward.png" in text
    assert "(128 new tokens instead of 48)" in text and "0.350 (base, 40 words" in text
    assert "| simpo | beta 2.0 | 0.600 |" in text and "| kto |" in text
    assert text.index("| simpo |") > text.index("| kto |")  # the table follows PREF_TASKS order
