"""The CPU's batch-1 linear paths: every candidate computes F.linear; the chooser picks one of them."""

from __future__ import annotations

import pytest
import torch

from deepseek_vl2 import kernels


def _case(dtype: torch.dtype, rows: int, cols: int, strided: bool, bias: bool):
    generator = torch.Generator().manual_seed(rows * 31 + cols)
    stacked = torch.randn(3, 2 * rows, cols, generator=generator).to(dtype)
    weight = stacked[1, rows:] if strided else stacked[1, :rows].contiguous()  # like one expert's up_proj
    x = torch.randn(1, cols, generator=generator).to(dtype)
    b = torch.randn(rows, generator=generator).to(dtype) if bias else None
    reference = x.double() @ weight.double().T + (b.double() if bias else 0)
    return x, weight, b, reference


def _available(name: str, dtype: torch.dtype) -> bool:
    if name == "avx512bf16":
        return dtype == torch.bfloat16 and kernels.avx512_bf16_extension() is not None
    return True


# The AVX512-BF16 kernel is bf16-only; the other paths take both dtypes.
PATHS = [(name, dtype) for name in sorted(kernels.CANDIDATES) for dtype in (torch.float32, torch.bfloat16)
         if not (name == "avx512bf16" and dtype == torch.float32)]


@pytest.mark.parametrize("name, dtype", PATHS, ids=[f"{n}-{str(d)[6:]}" for n, d in PATHS])
@pytest.mark.parametrize("rows, cols, strided, bias", [(64, 1280, False, False), (96, 1283, True, True), (7, 31, True, False)])
def test_candidates_compute_linear(name: str, dtype: torch.dtype, rows: int, cols: int, strided: bool, bias: bool) -> None:
    if not _available(name, dtype):
        pytest.skip("this CPU has no AVX512-BF16 (or no C++ compiler/ninja), so that path does not exist here")
    x, weight, b, reference = _case(dtype, rows, cols, strided, bias)
    out = kernels.CANDIDATES[name](x, weight, b)
    assert out.shape == (1, rows) and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the result
    error = ((out.double() - reference).abs().max() / reference.abs().max()).item()
    assert error < tolerance, f"{name}: relative error {error:.2e}"


def test_linear_routes_single_rows_and_keeps_batches_on_the_default() -> None:
    weight = torch.randn(512, 1024)  # 2 MiB: above the size below which the default path wins
    for x in (torch.randn(1, 1024), torch.randn(1, 1, 1024), torch.randn(5, 1024)):
        assert torch.allclose(kernels.linear(x, weight), torch.nn.functional.linear(x, weight), atol=1e-4, rtol=1e-4)


def test_chooser_returns_a_candidate_and_honours_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = kernels.cpu_gemv(torch.float32)
    assert chosen in kernels.CANDIDATES.values()
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setenv("DEEPSEEK_VL2_CPU_GEMV", "native")
    assert kernels.cpu_gemv(torch.bfloat16) is kernels.CANDIDATES["native"]


@pytest.mark.parametrize("heads, kv_heads, length", [(10, 10, 480), (8, 2, 37)])
def test_single_query_attention_over_a_bf16_cache(heads: int, kv_heads: int, length: int) -> None:
    if kernels.avx512_bf16_extension() is None:
        pytest.skip("this CPU has no AVX512-BF16 (or no C++ compiler/ninja), so that path does not exist here")
    generator = torch.Generator().manual_seed(heads + length)
    d = 128
    cache_k = torch.randn(kv_heads, length + 50, d, generator=generator).to(torch.bfloat16)  # a longer cache
    cache_v = torch.randn(kv_heads, length + 50, d, generator=generator).to(torch.bfloat16)
    k, v = cache_k[:, :length], cache_v[:, :length]  # strided views, as the decoder passes them
    q = torch.randn(heads, d, generator=generator).to(torch.bfloat16)
    out = kernels.attend_one_query(q, k, v, d**-0.5)
    grouped = q.double().view(kv_heads, heads // kv_heads, d)
    reference = (torch.softmax(grouped @ k.double().mT * d**-0.5, -1) @ v.double()).view(heads, d)
    assert out.dtype == torch.bfloat16 and out.shape == (heads, d)
    assert ((out.double() - reference).abs().max() / reference.abs().max()).item() < 1e-2
    assert kernels.attend_one_query(q.float(), k.float(), v.float(), d**-0.5) is None  # fp32: the caller's path
