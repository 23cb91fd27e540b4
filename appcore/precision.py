"""Reduced precision for forward passes: float16 on CUDA, bfloat16 on CPUs that compute it natively.

Convolutions dominate infer and scoring. CPUs with AMX or AVX512-BF16 units (Intel Sapphire Rapids
and later, AMD Zen 4 and later) run them in bfloat16 two to three times faster than in float32
through oneDNN; on older CPUs bfloat16 is emulated and slower, so it stays off there. Outputs are
cast back to float32 before softmax, uncertainty measures or argmax.
"""

from __future__ import annotations

import contextlib
from functools import cache

import torch


@cache
def cpu_has_native_bf16() -> bool:
    """True where this CPU has bfloat16 arithmetic units that oneDNN uses (AMX tiles or AVX512-BF16)."""
    if not torch.backends.mkldnn.is_available():
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(probe() for probe in probes if probe is not None)
    except RuntimeError:  # a torch build without the probes' CPU feature detection
        return False


def autocast(device: torch.device | str, *, cpu_bf16: bool = True) -> contextlib.AbstractContextManager:
    """The autocast context for forward passes on ``device``.

    CUDA: float16 (the default autocast type there). CPU: bfloat16 when ``cpu_bf16`` and the CPU
    computes it natively (``cpu_has_native_bf16``), else full float32.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.autocast("cuda")
    if _native_cpu_bf16(kind, cpu_bf16):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_autocast(device: torch.device | str, *, cpu_bf16: bool = True) -> contextlib.AbstractContextManager:
    """The autocast context for training steps without a gradient scaler: bfloat16 on CUDA (float16
    would need a scaler to keep small gradients) and, as ``autocast``, on a CPU that computes it
    natively when ``cpu_bf16``; else full float32."""
    kind = torch.device(device).type
    if kind == "cuda" or _native_cpu_bf16(kind, cpu_bf16):
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _native_cpu_bf16(kind: str, cpu_bf16: bool) -> bool:
    return kind == "cpu" and cpu_bf16 and cpu_has_native_bf16()
