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
