"""Device and dtype choice, and what this CPU can run.

CPUs of the same machine kind differ: with AMX or avx512_bf16, bf16 matmuls run 2-4x faster than fp32;
without them PyTorch emulates bf16 and it is hundreds of times slower. So the CPU dtype is chosen by a
short timing probe, never from the CPU name; fp32 is the fallback whenever the probe is not clearly
in favour of bf16. On x86-64 the probe only runs where the CPU has bf16 instructions at all, and an
override that asks for bf16 on a CPU without them is refused (``UnavailableOnThisCPU``).

``DEEPSEEK_VL2_CPU_ISA`` caps what the project sees of the CPU, so that one machine can behave as an older
kind (CI runs the kernel, generation and parity tests that way): ``avx2`` (AVX2 and FMA, no AVX-512: AMD
Zen 1-3, Intel before Skylake-SP), ``avx512`` (AVX-512 without bf16/fp16 or AMX: Skylake-SP to Ice Lake),
``native`` (the default: what the CPU reports). The cap hides flags from ``cpu_flags`` (so from the dtype
probe and the kernels' builds and path choice); PyTorch's own libraries take their own caps
(``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``; see ``LIBRARY_CAPS``).

``release_openmp_workers``: a thread that hands work to another (the engine's) lets its own OpenMP team go.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import time

import torch

CPU_ISA_ENV = "DEEPSEEK_VL2_CPU_ISA"
CPU_ISA_CAPS = ("native", "avx512", "avx2")


def _hidden_by(cap: str, flag: str) -> bool:
    """Whether ``cap`` hides the /proc/cpuinfo ``flag``: what a CPU of that kind does not have."""
    # (bf16/fp16 arithmetic, AMX and the VEX-encoded AVX-VNNI family all came after the first AVX-512 CPUs)
    newer_than_avx512 = flag in ("avx512_bf16", "avx512_fp16") or flag.startswith(("amx", "avx_vnni", "avx_ifma", "avx_ne"))
    if cap == "avx512":
        return newer_than_avx512
    if cap == "avx2":
        return newer_than_avx512 or flag.startswith("avx512")
    return False

# The same cap for the libraries under PyTorch, which read these variables once, at their first use (so
# they belong in the environment the process starts with): oneDNN, ATen's vectorised kernels, MKL.
LIBRARY_CAPS = {
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}


class UnavailableOnThisCPU(ValueError):
    """An override asked for a path (a dtype, a kernel) that this CPU cannot run."""


def cpu_isa_cap() -> str:
    """``DEEPSEEK_VL2_CPU_ISA``: ``native`` (unset), ``avx512`` or ``avx2``."""
    cap = os.environ.get(CPU_ISA_ENV, "").strip().lower() or "native"
    if cap not in CPU_ISA_CAPS:
        raise ValueError(f"{CPU_ISA_ENV}={cap!r} is not one of {', '.join(CPU_ISA_CAPS)}")
    return cap


@functools.lru_cache(maxsize=1)
def _reported_cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), ()))
    except OSError:
        return frozenset()


def cpu_flags() -> set[str]:
    """The x86 feature flags of this CPU (/proc/cpuinfo), less those that ``DEEPSEEK_VL2_CPU_ISA`` hides."""
    cap = cpu_isa_cap()
    return {flag for flag in _reported_cpu_flags() if not _hidden_by(cap, flag)}


def cap_note() -> str:
    """" (capped by DEEPSEEK_VL2_CPU_ISA=...)" where a cap is set, for messages about missing flags."""
    cap = cpu_isa_cap()
    return "" if cap == "native" else f" (capped by {CPU_ISA_ENV}={cap})"


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


# The instructions that make a dtype native on an x86 CPU (elsewhere the timing probe alone decides).
_NATIVE_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def cpu_dtype_unavailable(dtype: torch.dtype) -> str | None:
    """Why this CPU cannot run ``dtype`` natively (PyTorch would emulate it, hundreds of times slower, and
    our kernels do not take it), or None where it can."""
    needs = _NATIVE_FLAGS.get(dtype)
    if needs is None or not is_x86() or set(needs) & cpu_flags():
        return None
    return f"this CPU has no {' or '.join(needs)}{cap_note()}: {str(dtype)[6:]} would be emulated; use float32"


def check_cpu_dtype(device: torch.device | str, dtype: torch.dtype) -> None:
    """Refuse a dtype asked for (``DEEPSEEK_VL2_DTYPE``, ``VL2Pipeline.load(dtype=)``) that this CPU cannot
    run natively; any dtype passes on other devices."""
    if torch.device(device).type == "cpu":
        reason = cpu_dtype_unavailable(dtype)
        if reason is not None:
            raise UnavailableOnThisCPU(f"dtype {str(dtype)[6:]} refused on this CPU: {reason}")

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

    ``DEEPSEEK_VL2_CPU_BF16=0/1`` overrides the probe (useful for benchmarking both); ``1`` on a CPU
    without bf16 instructions is refused.
    """
    forced = os.environ.get("DEEPSEEK_VL2_CPU_BF16", "").strip()
    if forced not in ("", "0", "1"):
        raise ValueError(f"DEEPSEEK_VL2_CPU_BF16={forced!r}: use 0 (float32) or 1 (bfloat16), or leave it unset")
    unavailable = cpu_dtype_unavailable(torch.bfloat16)
    if forced == "1" and unavailable is not None:
        raise UnavailableOnThisCPU(f"DEEPSEEK_VL2_CPU_BF16=1 refused: {unavailable}")
    if forced:
        return forced == "1"
    if unavailable is not None or not torch.backends.mkldnn.is_available():
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


# ------------------------------------------------------------------------------------------------------
# OpenMP worker threads
# ------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _gnu_openmp() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime (libgomp) that PyTorch loaded in this process, else None (another runtime,
    or none: their pause calls do other things)."""
    if platform.system() != "Linux":
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:
        return None
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    for path in sorted(paths, key=lambda p: (not p.startswith(torch_lib), p)):  # (PyTorch's own first)
        try:
            library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
        except OSError:
            continue
        if hasattr(library, "omp_pause_resource") and hasattr(library, "omp_get_initial_device"):
            return library
    return None


def release_openmp_workers() -> bool:
    """Let the OpenMP worker threads of the calling thread exit (they come back at its next parallel op).

    GNU OpenMP keeps a team of workers per thread that ever ran a parallel op, and once the process holds
    more of them than it has CPUs, every team's workers stop spinning between two parallel regions and
    sleep at once, so each op pays a wake-up (~70-90 us on the 2-core VM). The engine's thread runs the
    prefill and vision ops with its own team, while the thread that loaded the model or preprocessed a
    request kept one asleep: tiny's prefill took 0.87 s in the engine's thread against 0.64 s in the main
    thread. A thread that hands its request to the engine calls this (``omp_pause_resource`` on the host:
    it frees only the calling thread's team). True where it did."""
    library = _gnu_openmp()
    if library is None:
        return False
    omp_pause_hard = 2
    return library.omp_pause_resource(omp_pause_hard, library.omp_get_initial_device()) == 0
