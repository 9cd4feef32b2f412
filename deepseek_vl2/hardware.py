"""Device and dtype choice.

CPUs of the same machine kind differ: with AMX or avx512_bf16, bf16 matmuls run 2-4x faster than fp32;
without them PyTorch emulates bf16 and it is hundreds of times slower. So the CPU dtype is chosen by a
short timing probe, never from the CPU name; fp32 is the fallback whenever the probe is not clearly
in favour of bf16.
"""

from __future__ import annotations

import functools
import os
import time

import torch

# bf16 must beat fp32 by this factor to be chosen (a margin against timing noise).
_BF16_MIN_SPEEDUP = 1.2


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def best_seconds(fn, min_runs: int, seconds: float = 0.0, give_up_after: float = float("inf"),
                 device: torch.device | str = "cpu") -> float:
    """Fastest of repeated timed calls of ``fn`` (after one warm-up call: kernel choice, thread pool):
    at least ``min_runs``, then until ``seconds`` have passed (50 at most); stops early once one call
    took ``give_up_after`` (an emulated dtype needs no measuring of how slow it is)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    runs = 0
    while runs < min_runs or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
        runs += 1
        if runs >= 50 or best > give_up_after:
            break
    return best


def _matmul_seconds(dtype: torch.dtype, size: int = 256) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    return best_seconds(lambda: a @ b, min_runs=3, give_up_after=0.5)


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_fast() -> bool:
    """True when this CPU multiplies bf16 matrices natively (clearly faster than fp32).

    ``DEEPSEEK_VL2_CPU_BF16=0/1`` overrides the probe (useful for benchmarking both).
    """
    forced = os.environ.get("DEEPSEEK_VL2_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if not torch.backends.mkldnn.is_available():
        return False
    fp32 = _matmul_seconds(torch.float32)
    bf16 = _matmul_seconds(torch.bfloat16)
    return bf16 * _BF16_MIN_SPEEDUP < fp32


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA (what the checkpoints store); on CPU bf16 only where it is native, else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_is_fast() else torch.float32
    return torch.float32


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``, ``"fp16"``/``"float16"``, ``"fp32"``/``"float32"`` -> torch dtype."""
    aliases = {
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
        "fp64": torch.float64, "float64": torch.float64,
    }
    try:
        return aliases[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of bfloat16, float16, float32") from None
