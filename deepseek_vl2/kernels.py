"""Batch-1 matrix-vector products on the CPU, through whichever PyTorch path streams weights fastest.

Decoding reads every active weight once per token, so its speed is the speed of ``x @ W.T`` with one
row of ``x``. PyTorch has several CPU paths for that and which one is fast depends on the CPU and the
dtype (measured on a 2-core EPYC with avx512_bf16: fp32 through MKL 15 GB/s but through oneDNN 35 GB/s;
bf16 through oneDNN 17-22 GB/s, through PyTorch's own kernel 35-47 GB/s, through our AVX512-BF16 kernel
(``csrc/decode_bf16.cpp``, compiled where the CPU has the instructions and a C++ compiler is present: by
``scripts/build_kernels.py`` at ``make venv``, else on first use) 35-62 GB/s, the higher figures when the
memory itself reads faster). So the path is chosen per dtype, among those this CPU can run, by timing the
candidates in turns on decode-sized weights, never from the CPU's name. An fp32 loop of ours
(``csrc/decode_f32.cpp``, vectorised for the CPU it is compiled on) reaches 32-33 GB/s there on an
expert-sized matrix where oneDNN reaches 22-24: the path for CPUs without bf16.
``DEEPSEEK_VL2_CPU_GEMV`` (``aten`` / ``native`` / ``onednn`` / ``avx512bf16`` / ``simdf32``) forces one,
unless this CPU cannot run it (``gemv_path_unavailable``): then it is refused, saying why.

With the extensions, a decode step also runs layer-level kernels (``csrc/step.h`` and the files it
includes, built for bf16 and for fp32): a whole attention sub-layer in one call (``mha_block`` for plain attention, ``mla_block``
for latent attention: RMSNorm, projections, RoPE, cache write, attention, output projection, residual),
the whole feed-forward sub-layer in one call (``ffn_block``: RMSNorm, the router, the chosen and the
shared experts, the residual), several linears of one input in one call (``linear_many``; bf16 only) and
RMSNorm (bf16 only). One expert is only 2-5 MB, so per-call costs (Python, waking the threads,
prefetchers ramping up on a new matrix) are a large share of streaming it. So the whole step, every layer
and the LM head, runs as one call (``decode_step``; ``DEEPSEEK_VL2_CPU_STEP=0`` falls back to the
per-layer calls): no Python between the layers and one parallel region (tiny: 95-98 % of the bandwidth
bound in the slow memory phase of the 2-core EPYC, 86-91 % in its fast one). The step takes several
sequences at once (``step_rows``: one token in each of B cache slots), streaming each weight once for all of
them; each row's logits are bit-identical to decoding it alone.

A weight matrix goes to the kernels as a ``Matrix``: ``[weight]`` in the model's dtype, or
``[weight_packed, weight_scale]`` for int8 and int4 weights (``quantize.py``), whose products run on the
integers (``csrc/int8.h``, ``csrc/int4.h``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shlex
import shutil
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import hardware


Gemv = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def _aten(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _native(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """PyTorch's own vectorised kernel: oneDNN switched off for this one call."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(x, weight, bias)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _cpu_flags() -> set[str]:
    """This CPU's x86 flags as our probes see them (``hardware.cpu_flags``: ``DEEPSEEK_VL2_CPU_ISA`` caps them)."""
    return hardware.cpu_flags()


_CSRC = Path(__file__).with_name("csrc")


def _extension_name(base: str) -> str:
    """``base`` plus a tag of this checkout's source folder. PyTorch builds an extension in
    ``~/.cache/torch_extensions/<name>`` and its build file names the sources by absolute path, so two
    checkouts sharing a name rebuilt each other's extension (~30 s) every time the other one ran."""
    return f"{base}_{hashlib.sha1(str(_CSRC.resolve()).encode()).hexdigest()[:8]}"


@contextlib.contextmanager
def _one_ninja() -> Iterator[None]:
    """Builds run the `ninja` of the Python package when it is installed (else whichever is on PATH).
    PyTorch runs the first `ninja` on PATH, and ninja versions keep incompatible build logs: with the
    system's 1.11 in some processes and the venv's 1.13 in others (a server whose PATH starts with the
    venv), each discarded the other's log and rebuilt the extensions (~30 s each)."""
    try:
        import ninja

        bin_dir = ninja.BIN_DIR
    except (ImportError, AttributeError):
        yield
        return
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = bin_dir + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


# What each extension needs of the CPU: the bf16 kernels are written with AVX-512 (BF16) intrinsics; the fp32
# ones are plain C++ that the compiler vectorises for whatever the CPU has (any x86-64, or any CPU at all).
_BF16_KERNEL_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"}
KERNEL_SWITCH = "DEEPSEEK_VL2_CPU_KERNEL"


def _compiler() -> str:
    """The C++ compiler PyTorch's builds run: ``$CXX``, else ``c++``."""
    command = os.environ.get("CXX", "").strip()
    return shlex.split(command)[0] if command else "c++"


def kernel_unavailable(kind: str) -> Optional[str]:
    """Why the extension ``kind`` (``"bf16"`` or ``"f32"``) cannot be built or loaded here, known before
    trying (switched off, the CPU lacks its instructions, no compiler); None where it may be."""
    if os.environ.get(KERNEL_SWITCH, "1") == "0":
        return f"our CPU kernels are switched off ({KERNEL_SWITCH}=0)"
    if kind == "bf16":
        missing = _BF16_KERNEL_FLAGS - _cpu_flags()
        if missing:
            return f"this CPU has no {', '.join(sorted(missing))}{hardware.cap_note()}, which the bf16 kernels need"
    if shutil.which(_compiler()) is None:
        return f"no C++ compiler to build our kernels ({_compiler()!r} not found; CXX names another)"
    return None


_BUILD_ERRORS: dict[str, str] = {}  # kind -> why its build failed in this process


def unavailable_reason(kind: str) -> Optional[str]:
    """Why the extension ``kind`` is None here (after ``avx512_bf16_extension()``/``fp32_extension()`` ran), or None."""
    return kernel_unavailable(kind) or _BUILD_ERRORS.get(kind)


def fp32_build() -> tuple[str, list[str]]:
    """The fp32 extension's module name and compiler flags for the CPU our probes see. Uncapped it is built
    for this very CPU (``-march=native``); under ``DEEPSEEK_VL2_CPU_ISA`` for the instruction set of that
    kind only (x86-64-v3: AVX2, FMA, F16C, BMI; x86-64-v4: plus AVX-512 F/BW/CD/DQ/VL), so that no
    instruction the capped kind lacks can run, and under a name of its own, so that a capped and a native
    build do not replace each other."""
    cap = hardware.cpu_isa_cap()
    if cap == "native":
        return _extension_name("deepseek_vl2_decode_f32"), ["-O3", "-march=native", "-fopenmp"]
    level = {"avx2": "x86-64-v3", "avx512": "x86-64-v4"}[cap]
    return _extension_name(f"deepseek_vl2_decode_f32_{cap}"), ["-O3", f"-march={level}", "-mtune=generic", "-fopenmp"]


def _build(kind: str, name: str, source: str, cflags: list[str]) -> Optional[Any]:
    """``csrc/<source>`` compiled (or found built) by PyTorch under ``~/.cache/torch_extensions/<name>``; None,
    with the reason kept for ``unavailable_reason``, where it cannot be."""
    if kernel_unavailable(kind) is not None:
        return None
    try:
        from torch.utils.cpp_extension import load

        with _one_ninja():
            return load(name=name, sources=[str(_CSRC / source)], extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                        verbose=False)
    except Exception as exc:  # noqa: BLE001 - no ninja, a broken toolchain, ...: the PyTorch paths remain
        _BUILD_ERRORS[kind] = f"its build failed ({type(exc).__name__}: {str(exc)[:200]})"
        warnings.warn(f"{kind} decode kernels unavailable: {_BUILD_ERRORS[kind]}; using PyTorch's")
        return None


@functools.lru_cache(maxsize=1)
def avx512_bf16_extension() -> Optional[Any]:
    """The compiled ``csrc/decode_bf16.cpp`` (cached by PyTorch under ``~/.cache/torch_extensions``), or None
    where the CPU lacks AVX512-BF16, no compiler/ninja is available or ``DEEPSEEK_VL2_CPU_KERNEL=0``
    (``unavailable_reason("bf16")`` says which)."""
    extension = _build("bf16", _extension_name("deepseek_vl2_decode_bf16"), "decode_bf16.cpp",
                       ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mamx-tile", "-mamx-bf16", "-mamx-int8",
                        "-fopenmp"])
    if extension is not None:
        extension.set_tiles(tiles_min_rows())
    return extension


TILES_SWITCH = "DEEPSEEK_VL2_CPU_TILES"
TILES_SETTINGS = {"auto": 3, "0": 0, "1": 1, "all": 1}  # -> the fewest rows of a step that tiles carry (0: never)


def tiles_min_rows() -> int:
    """The fewest rows (sequences) of a bf16 decode step whose shared matrices (attention, shared experts,
    LM head) run on AMX tiles; 0: never. ``DEEPSEEK_VL2_CPU_TILES``: ``auto`` (the default) 3, so one or
    two requests stay on ``vdpbf16ps``; ``all`` (or ``1``) every step; ``0`` none. 0 wherever the CPU (as
    our probes see it: ``DEEPSEEK_VL2_CPU_ISA`` caps hide AMX) has no AMX-BF16. On the 2-core Sapphire
    Rapids VM we measured (tiny, bf16 steps alone), tiles made 3 rows 3-5 % faster, 4 rows 2-4 %, 8 rows
    9-12 %, 16 rows 20 %, and 1 row 3-9 % slower, 2 rows 0-8 % slower (docs/performance.md). Under ``auto``
    a bf16 row's logits with 2 or more companions differ from its logits alone (or with one other) in the
    order of some fp32 sums; ``0`` and ``all`` keep every row bit-identical whatever the others are. The
    extension's ``set_tiles`` checks the CPU again and asks Linux for the tile registers."""
    setting = os.environ.get(TILES_SWITCH, "auto").strip().lower() or "auto"
    if setting not in TILES_SETTINGS:
        raise ValueError(f"{TILES_SWITCH}={setting!r} is not a setting: use auto (the default), all or 0")
    return TILES_SETTINGS[setting] if {"amx_bf16", "amx_tile"} <= _cpu_flags() else 0


@functools.lru_cache(maxsize=1)
def fp32_extension() -> Optional[Any]:
    """The compiled ``csrc/decode_f32.cpp`` (fp32 GEMV and layer kernels, built for this CPU: ``fp32_build``),
    or None where no compiler/ninja is available or ``DEEPSEEK_VL2_CPU_KERNEL=0`` (``unavailable_reason("f32")``)."""
    name, cflags = fp32_build()
    return _build("f32", name, "decode_f32.cpp", cflags)


def _simd_f32(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    extension = fp32_extension()
    if extension is None or weight.dtype != torch.float32 or x.dtype != torch.float32 or weight.stride(-1) != 1:
        return _native(x, weight, bias)
    return extension.gemv_f32(x, weight, bias).view(*x.shape[:-1], weight.shape[0])


def _avx512bf16(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    extension = avx512_bf16_extension()
    if extension is None or weight.dtype != torch.bfloat16 or weight.stride(-1) != 1:
        return _native(x, weight, bias)
    return extension.gemv_bf16(x, weight, bias).view(*x.shape[:-1], weight.shape[0])


# The layer kernels' names end in the storage type they were built for.
_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}


def _layer_extension(dtype: torch.dtype, build: bool = True) -> Optional[Any]:
    """The extension with the layer kernels for CPU weights of ``dtype``: bf16 (AVX512-BF16 CPUs) or fp32;
    with ``build=False`` only one already built (or found missing), never building it now."""
    extension = {torch.bfloat16: avx512_bf16_extension, torch.float32: fp32_extension}.get(dtype)
    if extension is None or (not build and not extension.cache_info().currsize):
        return None
    return extension()


def layer_kernels_unavailable(dtype: torch.dtype) -> Optional[str]:
    """Why our layer kernels for CPU weights of ``dtype`` are not in use in this process (building them now if
    they may be), or None where they are."""
    kind = _SUFFIX.get(dtype)
    if kind is None:
        return f"we have no CPU kernels for {str(dtype).replace('torch.', '')}"
    if (capped := kernel_unavailable(kind)) is not None:  # (asked first: a cap set since the build still counts)
        return capped
    if _layer_extension(dtype) is None:  # (a process that started with the kernels switched off keeps them off)
        return unavailable_reason(kind) or "its kernels were not loaded in this process"
    return None


def load_cpu_kernels(dtype: torch.dtype) -> Optional[Any]:
    """The extension with the layer kernels for ``dtype``, else the fp32 one (both carry the sampling kernels),
    loaded (or built) now, so that sampling takes the same path from a process's first token on; None where
    there is none (switched off, no compiler, ...)."""
    return _layer_extension(dtype) or fp32_extension()


_BUILT: list[Any] = []  # the extension that argmax and sampling call, once one is found built


def _built_extension() -> Optional[Any]:
    """A kernel extension that is already built (or None: this never builds one)."""
    if _BUILT:
        return _BUILT[0]
    for build in (avx512_bf16_extension, fp32_extension):
        if build.cache_info().currsize:  # (built or found missing already)
            extension = build()
            if extension is not None:
                _BUILT.append(extension)
                return extension
    return None


def first_argmax(values: torch.Tensor) -> Optional[int]:
    """``int(values.argmax())`` for a contiguous fp32 CPU vector in one call into a kernel extension that
    is already built (never builds one: None then, and elsewhere)."""
    if values.device.type != "cpu" or values.dtype != torch.float32 or values.dim() != 1 or not values.is_contiguous():
        return None
    extension = _built_extension()
    return None if extension is None else extension.first_argmax(values)


def sampling_candidates(logits: torch.Tensor, seen: torch.Tensor, penalty: float, k: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(ids ascending, penalised logits) of every logit at or above the k-th largest after the repetition
    penalty on the ids ``seen``, ties included: one call into a kernel extension that is already built
    (never builds one). None where none is, for tensors other than contiguous fp32 logits [V] and int64
    ids on the CPU, or where a logit is NaN."""
    extension = _built_extension()
    return None if extension is None else extension.sampling_candidates(logits, seen, penalty, k)


def draw_top_k(logits: torch.Tensor, seen: torch.Tensor, penalty: float, k: int, temperature: float, top_p: float,
               generator: Optional[torch.Generator]) -> Optional[int]:
    """One token id drawn from the logits at or above the k-th largest after the penalty (as
    ``sampling_candidates``), after temperature and top-p, with a uniform from ``generator`` (the default
    CPU generator when None): one call into a kernel extension that is already built. None where none is,
    for other tensors (as ``sampling_candidates``) or a generator off the CPU, or where a logit is NaN."""
    if generator is not None and generator.device.type != "cpu":
        return None
    extension = _built_extension()
    return None if extension is None else extension.draw_top_k(logits, seen, penalty, k, temperature, top_p, generator)


def _fused_extension(x: torch.Tensor) -> Optional[Any]:
    """The extension, when ``x`` is one bf16 or fp32 token on the CPU (the layer-level decode kernels apply)."""
    if x.device.type != "cpu" or x.numel() != x.shape[-1]:
        return None
    return _layer_extension(x.dtype)


def linear_many(x: torch.Tensor, layers: list[nn.Linear]) -> Optional[list[torch.Tensor]]:
    """``[layer(x) for layer in layers]`` for one bf16 token on the CPU in one kernel call; None where
    the extension does not apply (the caller then runs the layers one by one)."""
    if x.dtype != torch.bfloat16 or any(len(matrix_of(layer)) != 1 or layer.weight.dtype != torch.bfloat16 for layer in layers):
        return None  # (checked first: an fp32 token must not build the fp32 extension for nothing)
    extension = _fused_extension(x)
    if extension is None:
        return None
    outs = extension.gemv_bf16_many([x] * len(layers), [layer.weight for layer in layers], [layer.bias for layer in layers])
    return [out.view(*x.shape[:-1], -1) for out in outs]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Optional[torch.Tensor]:
    """``weight * F.rms_norm(x)`` for bf16 on the CPU: one token (PyTorch's fused op costs ~11 us there, more
    than streaming a small weight), or a prompt's rows in one parallel pass (``csrc/prefill_rows.h``); within one
    bf16 step of the eager module. None where the extension does not apply."""
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return None  # (checked first: an fp32 token must not build the fp32 extension for nothing)
    extension = _fused_extension(x)
    if extension is not None:
        return extension.rms_norm_bf16(x, weight, eps)
    extension = _rows_extension(x, weight)
    return None if extension is None else extension.rms_norm_rows_bf16(x, weight, eps)


Matrix = list[torch.Tensor]  # [weight] in the model's dtype, or [weight_packed, weight_scale] (quantize.py)
Expert = tuple[Matrix, Matrix, Matrix]  # SwiGLU weights (gate [I, D], up [I, D], down [D, I])

# How the kernels name a matrix's format (csrc/matrix.h: Format).
FORMATS = {"dense": 0, "int8": 1, "int4": 2}


def matrix_of(layer: Any) -> Matrix:
    """A linear layer's (or a bare weight's) matrix as the kernels take it."""
    if isinstance(layer, torch.Tensor):
        return [layer]
    matrix = getattr(layer, "matrix", None)
    return matrix() if matrix is not None else [layer.weight]


def matrix_format(matrix: Matrix) -> tuple[str, int]:
    """(format name, int4 group size or 0) of a matrix."""
    if len(matrix) == 1:
        return "dense", 0
    packed, scale = matrix
    if packed.dtype == torch.int8:
        return "int8", 0
    return "int4", 2 * packed.shape[-1] // scale.shape[-1]


def takes(matrix: Matrix, dtype: torch.dtype) -> bool:
    """Whether the kernels for activations of ``dtype`` take this matrix: one in that dtype, or a quantized one
    (int4 with a group size the kernels take: a multiple of 8)."""
    kind, group = matrix_format(matrix)
    if kind == "dense":
        return matrix[0].dtype == dtype
    return kind == "int8" or (group >= 8 and group % 8 == 0)


def quantized_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``F.linear`` of one CPU row with a quantized matrix: our integer products (``gemv_q_*``) where the
    extension for ``x.dtype`` is built, else PyTorch's ``_weight_int8pack_mm`` for int8 (which reads int8
    weights at the memory's rate for one row); None where neither applies (the caller dequantizes)."""
    matrix = [packed, scale]
    if x.device.type != "cpu" or x.dtype not in _SUFFIX:
        return None
    extension = _layer_extension(x.dtype) if takes(matrix, x.dtype) else None
    if extension is not None:
        return extension.__getattribute__(f"gemv_q_{_SUFFIX[x.dtype]}")(x, matrix, bias).view(*x.shape[:-1], -1)
    if packed.dtype == torch.int8 and x.dtype in (torch.bfloat16, torch.float16, torch.float32):
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(1, -1), packed, scale.view(-1).to(x.dtype))
        y = y.view(*x.shape[:-1], -1)
        return y if bias is None else y + bias
    return None


QUANTIZED_ROWS_MAX = 64  # (the kernels' most rows at once: csrc/common.h kMaxRows)


def quantized_rows(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``F.linear`` of 2 to 64 CPU rows (a prompt's tokens routed to one expert, a short chunk) with a quantized
    matrix, through the step's integer products, in an extension already built (never builds one); None
    elsewhere. Dequantizing an expert's matrix for a few rows cost more than multiplying them."""
    rows = x.numel() // max(1, x.shape[-1])
    matrix = [packed, scale]
    if x.device.type != "cpu" or x.dtype not in _SUFFIX or not 2 <= rows <= QUANTIZED_ROWS_MAX or not takes(matrix, x.dtype):
        return None
    extension = _layer_extension(x.dtype, build=False)
    if extension is None:
        return None
    out = getattr(extension, f"rows_q_{_SUFFIX[x.dtype]}")(x.reshape(rows, x.shape[-1]), matrix, bias)
    return out.view(*x.shape[:-1], packed.shape[0])


def _tiles_extension(x: torch.Tensor) -> Optional[Any]:
    """The bf16 extension with AMX tiles on, for a bf16 CPU tensor (loaded, or built, on first use, as the
    row products of ``linear`` load it: so a process's first forward takes the same kernels as its later
    ones); else None."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16:
        return None
    extension = _layer_extension(torch.bfloat16)
    return extension if extension is not None and extension.tiles_min_rows() > 0 else None


def routed_experts_rows(x: torch.Tensor, order: torch.Tensor, counts: torch.Tensor, top_k: int,
                        experts: list[Expert], table: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A prompt's bf16 rows ``x`` [N, D] through the routed experts of one MoE layer in one call, on AMX tiles
    (``csrc/experts_prefill.h``): [N * top_k, D], position p holding expert(x[order[p] // top_k]) in the
    expert-grouped order (``counts[e]`` positions per expert, in expert order). None where it does not apply:
    not bf16 on the CPU, experts not compact dense bf16 (``table`` None, or quantized), or no tiles."""
    extension = _tiles_extension(x)
    if extension is None or table is None or x.shape[0] < 2:
        return None
    if matrix_format(experts[0][0]) != ("dense", 0) or experts[0][0][0].dtype != torch.bfloat16:
        return None
    intermediate = experts[0][0][0].shape[0]
    return extension.experts_prefill_bf16(x, order, counts, top_k, table, intermediate)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_offset: int = -1) -> Optional[torch.Tensor]:
    """``softmax(scale q k^T) v`` of every head on AMX tiles (``csrc/prefill_attention.h``): q [B, H, S, dk], k [B, Hk,
    T, dk], v [B, Hk, T, dv] bf16 (query head h reads key head h // (H // Hk)) -> [B, S, H, dv], the heads side by
    side. With ``causal_offset`` >= 0, query s sees the keys up to position causal_offset + s. None where it does
    not apply (no tiles, not bf16 on the CPU)."""
    extension = _tiles_extension(q)
    if extension is None or any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or t.stride(-1) != 1 for t in (q, k, v)):
        return None
    return extension.attention_bf16(q, k, v, causal_offset, scale)


def vision_attention(qkv: torch.Tensor, heads: int) -> Optional[torch.Tensor]:
    """``scaled_dot_product_attention`` of the vision tower's heads from its qkv projection [B, N, 3W] (q | k |
    v, heads side by side) -> [B, N, W] (``attention``); None where that does not apply."""
    batch, tokens, width3 = qkv.shape
    head_dim = width3 // (3 * heads)
    q, k, v = qkv.view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = attention(q, k, v, head_dim**-0.5)
    return None if out is None else out.view(batch, tokens, heads * head_dim)


def gelu_tanh_(x: torch.Tensor) -> Optional[torch.Tensor]:
    """``F.gelu(x, approximate="tanh")`` written into ``x`` (a fresh bf16 CPU activation); None (x untouched)
    where the kernel does not apply."""
    extension = _tiles_extension(x)
    if extension is None or not x.is_contiguous():
        return None
    extension.gelu_tanh_bf16_(x)
    return x


def _rows_extension(*tensors: torch.Tensor) -> Optional[Any]:
    """The bf16 extension (AVX512-BF16 CPUs), for bf16 CPU tensors with more than one row of work (one token
    decoding has its own kernels); else None."""
    if any(t.device.type != "cpu" or t.dtype != torch.bfloat16 for t in tensors) or tensors[0].numel() == tensors[0].shape[-1]:
        return None
    return _layer_extension(torch.bfloat16)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Optional[torch.Tensor]:
    """``x * cos + rotate_half(x) * sin`` for bf16 x [B, H, S, d] or [B, S, d] (any dense layout) and cos, sin
    [S, d], in one pass with the eager ops' roundings (bit-identical); None where it does not apply."""
    if x.dim() not in (3, 4) or cos.dim() != 2 or x.stride(-1) != 1 or x.shape[-1] % 2:
        return None  # (an odd size: rotate_half's uneven halves stay with the eager ops)
    extension = _rows_extension(x, cos, sin)
    if extension is None:
        return None
    return extension.rope_bf16(x.unsqueeze(1), cos, sin).squeeze(1) if x.dim() == 3 else extension.rope_bf16(x, cos, sin)


def weighted_sum(grouped: torch.Tensor, position: torch.Tensor, weights: torch.Tensor) -> Optional[torch.Tensor]:
    """``sum_j weights[:, j] * grouped[position[:, j]]`` in fp32, choice by choice, rounded to bf16 at the end:
    the routed experts' outputs [P, D] bf16 combined per token [N, D] in one pass (bit-identical to
    ``Experts._weighted_sum``'s eager ops); None where it does not apply."""
    extension = _rows_extension(grouped)
    if extension is None or weights.dtype != torch.float32:
        return None
    return extension.weighted_sum_bf16(grouped, position, weights)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> Optional[torch.Tensor]:
    """``F.silu(gate) * up`` for bf16 rows in one pass (within one bf16 step of the eager ops); None where it
    does not apply."""
    extension = _rows_extension(gate, up)
    return None if extension is None or gate.shape != up.shape else extension.silu_mul_bf16(gate, up)


def dequantized(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A quantized CPU matrix's values ``q * scale`` as ``dtype`` (bf16 or fp32), in one parallel call into an
    extension already built (never builds one); None elsewhere (the caller unpacks in PyTorch)."""
    matrix = [packed, scale]
    if packed.device.type != "cpu" or dtype not in _SUFFIX or not takes(matrix, dtype):
        return None
    extension = _layer_extension(dtype, build=False)
    return None if extension is None else getattr(extension, f"dequantized_{_SUFFIX[dtype]}")(matrix)


@dataclass(frozen=True)
class Router:
    """What the feed-forward kernel needs of a MoE layer: the router and a table of its experts."""

    weight: torch.Tensor  # fp32 [E, D]
    correction_bias: Optional[torch.Tensor]  # fp32 [E] (noaux_tc) or None
    method: str  # greedy | group_limited_greedy | noaux_tc
    scoring: str  # softmax | sigmoid
    top_k: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    scale: float
    expert_table: torch.Tensor  # int64 [E, 6]: data pointers of each expert's gate, up, down and their scales
    intermediate: int
    format: int  # FORMATS of the experts' matrices
    group: int  # int4's group size (else 0)


def expert_table(experts: list[Expert]) -> Optional[torch.Tensor]:
    """[E, 6] int64 data pointers of compact expert matrices, one format for all (bf16 or fp32 weights, or
    int8 / int4 ones): gate, up, down, then their scales (0 for weights in the model's dtype); None if any
    is not compact or the formats differ (the caller keeps the tensors alive)."""
    if not experts:
        return None
    kind = matrix_format(experts[0][0])
    first = [t.dtype for t in experts[0][0]]
    if kind[0] == "dense" and first[0] not in _SUFFIX:
        return None
    for expert in experts:
        for matrix in expert:
            if matrix_format(matrix) != kind or [t.dtype for t in matrix] != first or not all(t.is_contiguous() for t in matrix):
                return None
    return torch.tensor([[m[0].data_ptr() for m in expert] + [m[1].data_ptr() if len(m) == 2 else 0 for m in expert]
                         for expert in experts], dtype=torch.int64)


def ffn_args(norm_weight: torch.Tensor, eps: float, shared: Optional[Expert] = None,
             router: Optional[Router] = None) -> list[Any]:
    """The arguments of a feed-forward sub-layer for ``ffn_block_bf16`` / ``DecodeStep.add_layer``."""
    # The kernel takes the router's fields in their declared order (a dense MLP: an inert stand-in).
    routing = [getattr(router, f.name) for f in fields(Router)] if router is not None else _NO_ROUTER
    return [norm_weight, eps, *routing, list(shared) if shared is not None else []]


_NO_ROUTER = [None, None, "greedy", "softmax", 0, 1, 1, False, 1.0, None, 0, 0, 0]


def ffn_block(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, shared: Optional[Expert] = None,
              router: Optional[Router] = None) -> Optional[torch.Tensor]:
    """A whole feed-forward sub-layer for one bf16 token in one call: ``x + ffn(RMSNorm(x))``, ffn being a
    dense SwiGLU MLP (``shared`` only) or a MoE layer (``router``: routing and the chosen experts, plus the
    ``shared`` experts if any), rounded like the eager modules. None where the extension does not apply."""
    extension = _fused_extension(x)
    if extension is None or norm_weight.dtype != x.dtype or (shared is not None and not all(takes(m, x.dtype) for m in shared)):
        return None
    return getattr(extension, f"ffn_block_{_SUFFIX[x.dtype]}")(x, *ffn_args(norm_weight, eps, shared, router))


def mha_args(norm_weight: torch.Tensor, eps: float, projections: list[nn.Linear], k_cache: torch.Tensor,
             v_cache: torch.Tensor, scale: float) -> Optional[list[Any]]:
    """The arguments of a plain-attention sub-layer for ``DecodeStep.add_layer`` (caches [S, kv_heads, T, d]
    of every slot); None where the kernels do not apply (they take bf16 or fp32 activations, and weights in
    that dtype or quantized)."""
    dtype = norm_weight.dtype
    matrices = [matrix_of(p) for p in projections]
    if dtype not in _SUFFIX or k_cache.dtype != dtype or not all(takes(m, dtype) for m in matrices):
        return None
    return [norm_weight, eps, matrices, [p.bias for p in projections], k_cache, v_cache, scale]


def mha_block(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, projections: list[nn.Linear], cos: torch.Tensor,
              sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, position: int, scale: float) -> Optional[torch.Tensor]:
    """A whole plain-attention sub-layer for one bf16 token in one call:
    ``x + o(attention(rope(q(n)), rope(k(n)), v(n)))`` with ``n = RMSNorm(x)``, k/v written to the caches
    ([kv_heads, T, d]) at ``position``. projections: q, k, v, o. None where the extension does not apply."""
    extension = _fused_extension(x)
    args = mha_args(norm_weight, eps, projections, k_cache, v_cache, scale)
    if extension is None or args is None or cos.dtype != x.dtype or norm_weight.dtype != x.dtype:
        return None
    norm_weight, eps, weights, biases, k_cache, v_cache, scale = args
    return getattr(extension, f"mha_block_{_SUFFIX[x.dtype]}")(x, norm_weight, eps, weights, biases, cos, sin, k_cache,
                                                               v_cache, position, scale)


def mla_args(norm_weight: torch.Tensor, eps: float, attention: nn.Module, latent_cache: torch.Tensor,
             k_pe_cache: torch.Tensor) -> Optional[list[Any]]:
    """The arguments of a multi-head latent attention sub-layer (``language.MultiHeadLatentAttention``) for
    ``mla_block_*`` / ``DecodeStep.add_mla_layer``; caches of every slot ([S, T, rank], [S, T, rope]; one
    slot for ``mla_block``). None where the kernels do not apply (they take bf16 or fp32 activations, and
    weights in that dtype or quantized)."""
    dtype = norm_weight.dtype
    lora = attention.q_lora_rank is not None
    layers = [attention.q_a_proj if lora else attention.q_proj, attention.kv_a_proj_with_mqa, attention.kv_b_proj, attention.o_proj]
    if lora:
        layers.append(attention.q_b_proj)
    matrices = [matrix_of(layer) for layer in layers]
    if dtype not in _SUFFIX or latent_cache.dtype != dtype or not all(takes(m, dtype) for m in matrices):
        return None
    q_norm = attention.q_a_layernorm if lora else None
    return [norm_weight, eps, matrices, [layer.bias for layer in layers],
            attention.kv_a_layernorm.weight, attention.kv_a_layernorm.eps, q_norm.weight if lora else None,
            q_norm.eps if lora else 0.0, latent_cache, k_pe_cache, attention.heads, attention.nope_dim, attention.rope_dim,
            attention.v_dim, attention.softmax_scale]


def mla_block(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: int, args: Optional[list[Any]]) -> Optional[torch.Tensor]:
    """A whole multi-head latent attention sub-layer for one bf16 or fp32 token in one call: RMSNorm, the
    query and latent projections, the latent and rotated key written to the caches at ``position``,
    attention over the cached latents with kv_b folded into the query and the output, o_proj, residual.
    args: ``mla_args``. None where the extension does not apply."""
    extension = _fused_extension(x)
    if extension is None or args is None or cos.dtype != x.dtype or args[0].dtype != x.dtype:
        return None
    return getattr(extension, f"mla_block_{_SUFFIX[x.dtype]}")(x, cos, sin, position, *args)


def decode_step(embedding: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, final_norm: torch.Tensor,
                eps: float, lm_head: Matrix, layers: list[tuple[str, list[Any], list[Any]]]) -> Optional[Any]:
    """A whole bf16 or fp32 CPU decode step as one kernel call (``DecodeStep``): ``step(token, position)`` ->
    fp32 logits [V] (cache slot 0), ``step_rows(tokens, positions, slots)`` -> [B, V] (one token in each of B
    distinct cache slots, every weight streamed once for all of them). layers: (``"mha"``, ``mha_args``, ``ffn_args``) or (``"mla"``, ``mla_args``, ``ffn_args``)
    of each decoder layer, one kind for all; cos/sin tables: [positions, rotary dims]. None where the
    extension does not apply."""
    tensors = [embedding, cos_table, sin_table, final_norm]
    dtype = embedding.dtype
    if (any(t.dtype != dtype for t in tensors) or any(t.device.type != "cpu" for t in tensors + lm_head)
            or not takes(lm_head, dtype) or os.environ.get("DEEPSEEK_VL2_CPU_STEP") == "0"):
        return None
    extension = _layer_extension(dtype)
    if extension is None:
        return None
    step = extension.DecodeStep(embedding, cos_table, sin_table, final_norm, eps, lm_head)
    for kind, attention, ffn in layers:
        (step.add_mla_layer if kind == "mla" else step.add_layer)(*attention, *ffn)
    return step


CANDIDATES: dict[str, Gemv] = {
    "aten": _aten, "native": _native, "onednn": _onednn, "avx512bf16": _avx512bf16, "simdf32": _simd_f32,
}
_chosen: dict[torch.dtype, Gemv] = {}
_SELECTION_ROUNDS = 6


def _onednn_has_bf16() -> bool:
    """oneDNN's own answer (it honours ``ONEDNN_MAX_CPU_ISA``)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else True  # (without the check, the warm-up run decides)


def gemv_path_unavailable(name: str, dtype: torch.dtype) -> Optional[str]:
    """Why the batch-1 linear path ``name`` cannot run ``dtype`` on this CPU, or None where it can."""
    if name not in CANDIDATES:
        return f"there is no path {name!r} (the paths: {', '.join(CANDIDATES)})"
    if name in ("avx512bf16", "simdf32"):
        takes = torch.bfloat16 if name == "avx512bf16" else torch.float32
        if dtype != takes:
            return f"{name} takes {str(takes)[6:]} weights only"
        if (why := layer_kernels_unavailable(takes)) is not None:
            return why
    if name == "onednn":
        if not torch.backends.mkldnn.is_available():
            return "this PyTorch has no oneDNN"
        # oneDNN runs bf16 on AVX-512 (emulated without avx512_bf16) and on AMX, and refuses it below
        # (``ONEDNN_MAX_CPU_ISA`` caps it too): asked directly, and our cap counts as the CPU's.
        if dtype == torch.bfloat16 and (not _onednn_has_bf16()
                                        or (hardware.is_x86() and "avx512bw" not in _cpu_flags())):
            return f"oneDNN has no bf16 primitives on this CPU{hardware.cap_note()}"
    return None


def cpu_gemv(dtype: torch.dtype) -> Gemv:
    """The fastest batch-1 linear for ``dtype`` on this CPU (measured once per process, ~0.3 s), among the
    paths it can run. ``DEEPSEEK_VL2_CPU_GEMV`` forces one; a path this CPU cannot run is refused."""
    if dtype in _chosen:
        return _chosen[dtype]
    forced = os.environ.get("DEEPSEEK_VL2_CPU_GEMV", "").strip()
    if forced:
        reason = gemv_path_unavailable(forced, dtype)
        if reason is not None:
            raise hardware.UnavailableOnThisCPU(f"DEEPSEEK_VL2_CPU_GEMV={forced} refused for {str(dtype)[6:]}: {reason}")
        _chosen[dtype] = CANDIDATES[forced]
        return _chosen[dtype]
    # What decoding does: 4 MiB matrices (an expert's is 2-5 MB) back to back, 64 MiB in all (well past
    # the last-level cache, so the timing is a memory-streaming one). A single large matrix would rank the
    # paths differently: per-call costs and stream start-up matter at this size (fp32 on a 2-core EPYC:
    # oneDNN 41 GB/s on one 64 MiB matrix but 24 GB/s on these, our loop 38 and 37 GB/s).
    cols = 1024
    rows = 4 * 2**20 // (cols * torch.finfo(dtype).bits // 8)
    weights = [torch.empty(rows, cols, dtype=dtype).uniform_(-0.02, 0.02) for _ in range(16)]
    x = torch.randn(1, cols, dtype=dtype)
    runs: dict[str, Callable[[], Any]] = {}
    for name, gemv in CANDIDATES.items():
        if gemv_path_unavailable(name, dtype) is not None:
            continue
        run = functools.partial(lambda g: [g(x, weight, None) for weight in weights], gemv)
        try:
            run()  # warm-up (kernel choice, thread pool); a path that still fails here is left out too
        except (RuntimeError, AttributeError, NotImplementedError):
            continue
        runs[name] = run
    timings = _best_times(runs, _SELECTION_ROUNDS)
    best = min(timings, key=timings.get) if timings else "aten"
    # Our kernels keep the choice unless another path is clearly faster: in a memory-bound phase all paths
    # time alike (a coin toss), while in this VM's faster phase ours streamed 43-49 GB/s against 27-38.
    for ours in ("avx512bf16", "simdf32"):
        if ours in timings and timings[ours] <= 1.1 * timings[best]:
            best = ours
    _chosen[dtype] = CANDIDATES[best]
    return _chosen[dtype]


def _best_times(runs: dict[str, Callable[[], Any]], rounds: int,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """The fastest of ``rounds`` timed calls of each run, taken in turns (one call of each per round).

    A VM's memory bandwidth can change by 2x from one second to the next; timing the candidates one
    after the other would then rank the phases, not the paths (on the 2-core EPYC it picked PyTorch's
    bf16 kernel in half of the processes: 41 GB/s on the LM head where ours streams 59)."""
    timings = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = clock()
            run()
            timings[name] = min(timings[name], clock() - start)
    return timings


# Below this many weight bytes (e.g. a router) the fixed cost of a call dominates: the default path wins.
_MIN_GEMV_BYTES = 2**20


# A few bf16 rows (a prompt's tokens routed to one expert, a short last chunk) go through the decode
# step's row products, which stream the weight once for all of them: on the 2-core Sapphire Rapids VM
# (896x1280 and 1280x896 weights, 2 threads) 90-111 us against 148-180 us for oneDNN at 2-16 rows, and
# 168-179 against 201-208 us at 41-48 rows on AMX tiles; without tiles only up to 4 rows win (8 rows: 139
# against 148 us; 16: 256 against 148). oneDNN also generates a kernel for every new row count, ~1.2 ms the
# first time: a cold server's first prompts met hundreds of them (a first prefill of 1.6-1.8 s, 0.75 s
# once warm).
_FEW_ROWS_ON_VECTORS = 4
_FEW_ROWS_ON_TILES = 48


def _few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``F.linear`` of 2 to 48 bf16 CPU rows through ``rows_linear_bf16`` where that is faster; None elsewhere
    (``linear`` calls it for CPU tensors only)."""
    if bias is not None or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return None
    rows = x.numel() // max(1, x.shape[-1])
    if not 2 <= rows <= _FEW_ROWS_ON_TILES or weight.dim() != 2 or weight.stride(-1) != 1:
        return None
    extension = avx512_bf16_extension()
    if extension is None:
        return None
    on_tiles = 0 < extension.tiles_min_rows() <= rows
    if rows > _FEW_ROWS_ON_VECTORS and not on_tiles:
        return None
    return extension.rows_linear_bf16(x.reshape(rows, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear``, except on the CPU: a single row goes through the fastest GEMV path, a few bf16 rows
    through our row products (``_few_rows_linear``)."""
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    if (
        x.numel() == x.shape[-1]
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.numel() * weight.element_size() >= _MIN_GEMV_BYTES
    ):
        return cpu_gemv(x.dtype)(x, weight, bias)
    few = _few_rows_linear(x, weight, bias)
    return F.linear(x, weight, bias) if few is None else few


def biased_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear`` (the same bits); for bf16 CPU rows with a bias, through oneDNN's linear with the bias added
    in its kernel (``mkldnn._linear_pointwise``): F.linear's addmm first copies the bias into every output
    row (~0.5 ms of a vision tile's [729, 4304] fc1, 25 ms of a 2-tile image). ``weight`` may be one that
    ``prepack_linear_weight`` laid out for oneDNN."""
    fused = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if weight.is_mkldnn:
        return fused(x, weight, bias, "none", [], "")
    if (bias is None or fused is None or x.device.type != "cpu" or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16
            or bias.dtype != torch.bfloat16 or x.numel() == x.shape[-1] or not _onednn_has_bf16()):
        return F.linear(x, weight, bias)
    return fused(x, weight, bias, "none", [], "")


def prepack_linear_weight(weight: torch.Tensor, rows: int) -> Optional[torch.Tensor]:
    """``weight`` [out, in] (bf16, CPU) in oneDNN's blocked layout for inputs of about ``rows`` rows, for
    ``biased_linear``; None where oneDNN has no bf16 linear here (another dtype or device, an AVX2 cap). The
    plain matrix's pages go back to the system (``release_pages``): the caller must drop it, and no one may
    read it again.

    Packed, oneDNN skips reordering the weight on every call. Measured on the tower's matrices (729 rows, 27
    cold layers in turn, 2-core Sapphire Rapids, torch 2.13): qkv [3456, 1152] 3.39 -> 2.50 ms a call, fc1
    [4304, 1152] 4.49 -> 3.09 ms, fc2 [1152, 4304] 3.65 -> 3.33 ms, with the same bits; the square proj
    [1152, 1152] got slower (0.99 -> 1.61 ms) and other bits, so the tower packs only the matrices that change
    the width. The gain is for an image of a few tiles: the whole tower of 1-3 tiles ran 5-12 % faster, of 7
    about the same, of 10 (3,645 + rows a call) 2-4 % slower, where oneDNN's plain path blocks better (and
    rounds differently from the packed one: bit-identical at 729 and 1,458 rows, not at 3,645)."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() != 2:
        return None
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    if reorder is None or getattr(torch.ops.mkldnn, "_linear_pointwise", None) is None or not _onednn_has_bf16():
        return None
    packed = reorder(weight.detach(), rows)
    release_pages(weight)
    return packed


def release_pages(tensor: torch.Tensor) -> int:
    """Give the whole pages inside ``tensor``'s bytes back to the system (``madvise(MADV_DONTNEED)``); return the
    bytes released. For a tensor no one will read again: its bytes read as zeros afterwards where the memory
    is anonymous (the arena ``model.materialize`` allocates), or as the file's where it maps a checkpoint.
    The partial pages at either end are kept (a neighbour's bytes may share them)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or os.name != "posix":
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end <= start:
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return end - start if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4) == 0 else 0  # 4: MADV_DONTNEED


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same checkpoint names) using ``linear`` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
