"""Which precision the gradient pass computes in.

bfloat16 autocast is about 4x faster than fp32 where the device has bf16
units (GPUs since Ampere, CPUs with AVX512-BF16 or AMX) and many times slower
where bf16 is emulated: on a 2-core AMD EPYC without AVX512 a 2048 x 2048
bf16 matmul took 127 s against 0.24 s in fp32 (2026-12-01), and on an Intel
Xeon with AVX512 but no BF16 0.54 s against 0.17 s. ``"auto"`` therefore
measures once per device type and process, and picks bf16 only where it wins.
"""

from __future__ import annotations

import time

import torch

__all__ = ["GRADIENT_DTYPES", "AUTO_DTYPE", "bfloat16_is_native", "resolve_gradient_dtype", "validate_gradient_dtype"]

AUTO_DTYPE = "auto"
# name -> autocast dtype of the gradient pass (None: no autocast, fp32)
GRADIENT_DTYPES: dict[str, torch.dtype | None] = {"bfloat16": torch.bfloat16, "float32": None}
_PROBE_SIZE = 256  # small enough that an emulated bf16 matmul costs well under a second
_measured: dict[str, bool] = {}


def validate_gradient_dtype(value: object) -> str:
    """``value`` if it is "auto", "bfloat16" or "float32"; else a ValueError naming the field."""
    allowed = [AUTO_DTYPE, *sorted(GRADIENT_DTYPES)]
    if value not in allowed:
        raise ValueError(f"gradient_dtype must be one of {allowed}, got {value!r}")
    return value  # type: ignore[return-value]


def _matmul_seconds(dtype: torch.dtype, device: torch.device) -> float:
    """Best of three timings of one _PROBE_SIZE^2 matmul (after a warm-up)."""
    a = torch.randn(_PROBE_SIZE, _PROBE_SIZE, device=device).to(dtype)
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def bfloat16_is_native(device: torch.device | str) -> bool:
    """Whether bf16 matmuls beat fp32 on ``device``'s type: CUDA asks the
    driver; other devices are timed once per process and the answer cached."""
    device = torch.device(device)
    if device.type not in _measured:
        if device.type == "cuda":
            _measured["cuda"] = torch.cuda.is_bf16_supported()
        else:
            bf16 = _matmul_seconds(torch.bfloat16, device)
            _measured[device.type] = bf16 < _matmul_seconds(torch.float32, device)
    return _measured[device.type]


def resolve_gradient_dtype(name: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``gradient_dtype`` ``name`` on ``device`` (None = fp32)."""
    if name == AUTO_DTYPE:
        return torch.bfloat16 if bfloat16_is_native(device) else None
    return GRADIENT_DTYPES[validate_gradient_dtype(name)]
