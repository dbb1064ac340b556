import math

import pytest

from peftlab.runtime.schedule import lr_multiplier


def test_warmup_then_cosine_to_zero():
    total, warm = 10, 2
    values = [lr_multiplier(s, total, warm, "cosine") for s in range(total)]
    assert values[0] == pytest.approx(0.5) and values[1] == pytest.approx(1.0)
    assert values[2] == pytest.approx(1.0)
    assert values[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a >= b for a, b in zip(values[1:], values[2:], strict=False))


def test_linear_and_constant():
    assert lr_multiplier(5, 10, 0, "linear") == pytest.approx(0.5)
    assert lr_multiplier(7, 10, 0, "constant") == 1.0
    with pytest.raises(ValueError):
        lr_multiplier(0, 10, 0, "step")


# Whole curves, value by value, worked out by hand (step is 0-based, total 10 unless said).
@pytest.mark.parametrize("kind, total, warm, expected", [
    # warm-up (s+1)/warm, then linear decay 1 - (s - warm) / (total - warm)
    ("linear", 10, 2, [1 / 2, 2 / 2, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]),
    ("linear", 4, 0, [1, 3 / 4, 2 / 4, 1 / 4]),
    # cosine: 0.5 (1 + cos(pi * progress))
    ("cosine", 4, 0, [1, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                      0.5 * (1 + math.cos(3 * math.pi / 4))]),
    ("cosine", 5, 1, [1, 1, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                      0.5 * (1 + math.cos(3 * math.pi / 4))]),
    ("constant", 5, 3, [1 / 3, 2 / 3, 1, 1, 1]),
    ("constant", 3, 0, [1, 1, 1]),
    # warm-up longer than the run: the ramp is all there is
    ("cosine", 3, 4, [1 / 4, 2 / 4, 3 / 4]),
    ("linear", 1, 0, [1]),
])
def test_schedule_shapes_by_hand(kind, total, warm, expected):
    kind = "".join(list(kind))  # made at run time, as read from a config file: not interned
    values = [lr_multiplier(s, total, warm, kind) for s in range(total)]
    assert values == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_decay_stays_at_zero_past_the_end(kind):
    # a resumed or early-stopped run can ask for steps beyond total_steps: no rebound
    assert [lr_multiplier(s, 10, 2, kind) for s in (10, 11, 20)] == pytest.approx([0, 0, 0],
                                                                                  abs=1e-15)


def test_unknown_kind_is_an_error_after_warmup():
    assert lr_multiplier(0, 10, 2, "step") == 0.5  # the warm-up ramp does not look at the kind
    with pytest.raises(ValueError, match="unknown scheduler 'step'"):
        lr_multiplier(2, 10, 2, "step")
