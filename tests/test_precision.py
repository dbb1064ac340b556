"""Precision auto-selection: best-of-repeats measurement, the decision rule, caching."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from peftlab.runtime import precision
from peftlab.runtime.precision import (
    choose_precision,
    matmul_gflops,
    measured_matmul_gflops,
    prepare_inference,
    resolve_precision,
)

M, K, N = precision._SHAPE
FLOP = 2 * M * K * N


def scripted_clock(seconds: list[float]):
    """A fake clock: one call to start, then a (start, end) pair per sample, in the order
    matmul_gflops measures them (fp32, bf16, fp32, bf16, ...)."""
    times, now = [0.0], 0.0
    for s in seconds:
        times += [now, now + s]
        now += s
    it = iter(times)
    return lambda: next(it)


def interleave(fp32: list[float], bf16: list[float]) -> list[float]:
    return [t for pair in zip(fp32, bf16, strict=True) for t in pair]


def test_one_slow_sample_cannot_flip_the_choice_to_bf16():
    # fp32 takes 10 ms, bf16 15 ms; the first fp32 sample hit a load burst (100 ms). A single
    # sample would say bf16 is 6.7x faster; the best of five says fp32 is 1.5x faster.
    fp32 = [0.100, 0.010, 0.010, 0.010, 0.010]
    rates = matmul_gflops(clock=scripted_clock(interleave(fp32, [0.015] * 5)))
    assert rates["fp32"] == pytest.approx(FLOP / 0.010 / 1e9)
    assert rates["bf16"] == pytest.approx(FLOP / 0.015 / 1e9)
    assert choose_precision(rates) == "fp32"


def test_one_slow_sample_cannot_flip_the_choice_to_fp32():
    bf16 = [0.005, 0.005, 0.200, 0.005, 0.005]
    rates = matmul_gflops(clock=scripted_clock(interleave([0.020] * 5, bf16)))
    assert rates["bf16"] == pytest.approx(FLOP / 0.005 / 1e9)
    assert choose_precision(rates) == "bf16"


def test_stops_after_the_time_budget():
    # 0.6 s per sample: after the first fp32+bf16 round the 1 s budget is spent; the clock
    # holds only that round, so a further sample would raise StopIteration.
    rates = matmul_gflops(clock=scripted_clock([0.6, 0.6]))
    assert rates == pytest.approx({"fp32": FLOP / 0.6 / 1e9, "bf16": FLOP / 0.6 / 1e9})


def test_bf16_must_be_clearly_faster():
    assert choose_precision({"fp32": 100.0, "bf16": 119.0}) == "fp32"
    assert choose_precision({"fp32": 100.0, "bf16": 121.0}) == "bf16"


def test_explicit_precision_passes_through_and_auto_is_measured_once():
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto") in ("fp32", "bf16")
    rates = measured_matmul_gflops()
    assert set(rates) == {"fp32", "bf16"} and all(r > 0 for r in rates.values())
    assert measured_matmul_gflops() is rates  # cached per process


def test_bf16_kernels_are_detected_from_the_cpus_instructions():
    """oneDNN's bf16 kernels need AVX512-BW/VL/DQ or AVX-NE-CONVERT (AMX CPUs have both)."""
    flags = set(open("/proc/cpuinfo").read().split()) if sys.platform == "linux" else set()
    if not flags or torch.cuda.is_available():
        pytest.skip("reads /proc/cpuinfo; on a CPU-only Linux machine")
    isa = {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags
    assert precision.cpu_has_bf16_kernels() == isa


def test_without_bf16_kernels_auto_takes_fp32_untimed_and_bf16_is_warned(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_bf16_kernels", lambda: False)
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)

    def no_timing():
        raise AssertionError("auto timed matmuls on a CPU without bf16 kernels")
    monkeypatch.setattr(precision, "measured_matmul_gflops", no_timing)
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        assert resolve_precision("auto") == "fp32" and resolve_precision("fp32") == "fp32"
        assert not caplog.records
        assert resolve_precision("bf16") == "bf16"  # as asked, with a warning
    assert len(caplog.records) == 1 and "~100x slower than fp32" in caplog.text
    monkeypatch.setattr(precision, "cpu_has_bf16_kernels", lambda: True)
    monkeypatch.setattr(precision, "measured_matmul_gflops",
                        lambda: {"fp32": 100.0, "bf16": 300.0})
    caplog.clear()
    assert resolve_precision("auto") == "bf16" and resolve_precision("bf16") == "bf16"
    assert not caplog.records


def _tied_lm() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11, bias=False))
    model[1].weight = model[0].weight  # tied, as in SmolLM2
    model.register_buffer("inv_freq", torch.rand(4))  # a non-weight buffer (RoPE)
    return model


def test_prepare_inference_stores_weights_in_bf16_only_when_asked_or_measured(monkeypatch):
    model = _tied_lm()
    before = model[0].weight.detach().clone()
    assert prepare_inference(model, "fp32") == "fp32"
    assert model[0].weight.dtype == torch.float32
    assert prepare_inference(model, "bf16") == "bf16"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model[1].weight is model[0].weight  # still tied: one cast, one tensor
    assert model.inv_freq.dtype == torch.float32  # buffers keep their precision
    torch.testing.assert_close(model[0].weight.float(), before, atol=0.01, rtol=0.01)
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.dtype == torch.bfloat16
    # auto follows the measured matmul rates (on a CPU with bf16 kernels)
    monkeypatch.setattr(precision, "cpu_has_bf16_kernels", lambda: True)
    monkeypatch.setattr(precision, "measured_matmul_gflops",
                        lambda: {"fp32": 100.0, "bf16": 90.0})
    other = _tied_lm()
    assert prepare_inference(other, "auto") == "fp32" and other[0].weight.dtype == torch.float32
    monkeypatch.setattr(precision, "measured_matmul_gflops",
                        lambda: {"fp32": 100.0, "bf16": 400.0})
    assert prepare_inference(other, "auto") == "bf16" and other[0].weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"precision must be one of .*'bf-16'"):
        prepare_inference(other, "bf-16")
