"""gradient_dtype "auto": bf16 only where the device computes it natively."""

import pytest
import torch

from moonshot_plugins.core import precision
from moonshot_plugins.core import bfloat16_is_native, resolve_gradient_dtype, validate_gradient_dtype


@pytest.fixture
def fresh_measurements(monkeypatch):
    monkeypatch.setattr(precision, "_measured", {})


@pytest.mark.parametrize("bf16_seconds, expected", [(0.001, torch.bfloat16), (1.0, None)])
def test_auto_follows_the_measured_speed(fresh_measurements, monkeypatch, bf16_seconds, expected):
    speed = {torch.bfloat16: bf16_seconds, torch.float32: 0.01}
    monkeypatch.setattr(precision, "_matmul_seconds", lambda dtype, device: speed[dtype])
    assert resolve_gradient_dtype("auto", "cpu") is expected


def test_the_measurement_runs_once_per_device_type(fresh_measurements, monkeypatch):
    calls = []

    def timed(dtype, device):
        calls.append(dtype)
        return 0.01

    monkeypatch.setattr(precision, "_matmul_seconds", timed)
    first = bfloat16_is_native("cpu")
    assert bfloat16_is_native(torch.device("cpu")) == first
    assert len(calls) == 2  # bf16 and fp32, once


def test_real_measurement_agrees_with_a_direct_timing(fresh_measurements):
    # the probe's answer must match a larger timing of the same kernels
    import time

    a = torch.randn(512, 512)

    def seconds(dtype):
        x = a.to(dtype)
        x @ x
        start = time.perf_counter()
        x @ x
        return time.perf_counter() - start

    # the fastest of 5 interleaved timings each: one timing can land on a
    # preempted slice when anything else runs (it once read fp32 2x slower)
    timings = {torch.bfloat16: [], torch.float32: []}
    for _ in range(5):
        for dtype, seen in timings.items():
            seen.append(seconds(dtype))
    bf16, fp32 = min(timings[torch.bfloat16]), min(timings[torch.float32])
    if 0.5 < bf16 / fp32 < 2.0:
        pytest.skip(f"bf16 and fp32 too close to call on this CPU ({bf16:.4f} s vs {fp32:.4f} s)")
    assert bfloat16_is_native("cpu") == (bf16 < fp32)


def test_fixed_names_and_bad_values():
    assert resolve_gradient_dtype("float32", "cpu") is None
    assert resolve_gradient_dtype("bfloat16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match=r"gradient_dtype must be one of \['auto', 'bfloat16', 'float32'\], got 'fp16'"):
        validate_gradient_dtype("fp16")
