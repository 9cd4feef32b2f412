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


# --------------------------------------------------------------------------------------------------
# Layer-level decode kernels (one bf16 token on the CPU). Each is compared with the eager PyTorch
# computation it replaces, in bf16: the sums run in another order, so results may differ by a rounding.

needs_extension = pytest.mark.skipif(
    kernels.avx512_bf16_extension() is None,
    reason="this CPU has no AVX512-BF16 (or no C++ compiler/ninja), so these kernels do not exist here",
)
BF16 = torch.bfloat16


def _bf16(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(BF16)


def _close(out: torch.Tensor, reference: torch.Tensor, ulps: float = 2.0) -> None:
    """Within a few bf16 roundings of the reference's largest magnitude."""
    assert out.shape == reference.shape and out.dtype == reference.dtype
    error = (out.double() - reference.double()).abs().max().item()
    assert error <= ulps * 2**-8 * reference.double().abs().max().item(), f"max error {error:.3e}"


@needs_extension
def test_linear_many_equals_each_linear() -> None:
    x = _bf16(1, 1, 1280, seed=1)
    layers = [torch.nn.Linear(1280, n, bias=bias).to(BF16) for n, bias in ((1280, True), (256, False), (72, True))]
    outs = kernels.linear_many(x, layers)
    assert outs is not None and len(outs) == 3
    for out, layer in zip(outs, layers):
        _close(out, torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert kernels.linear_many(x.float(), [layer.float() for layer in layers]) is None  # fp32: the caller's path
    assert kernels.linear_many(_bf16(2, 1280, seed=2), layers) is None  # more than one token


def _swiglu_eager(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    F = torch.nn.functional
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


@needs_extension
@pytest.mark.parametrize("routed, shared", [(6, True), (2, False), (0, True)], ids=["routed+shared", "routed", "shared-only"])
def test_swiglu_experts_equal_the_moe_layer(routed: int, shared: bool) -> None:
    hidden, inter = 640, 224
    x = _bf16(1, 1, hidden, seed=3)
    stacked = _bf16(8, 2 * inter, hidden, seed=4, scale=0.05)  # strided gate/up views, as Experts keeps them
    downs = _bf16(8, hidden, inter, seed=5, scale=0.05)
    experts = [(stacked[e, :inter], stacked[e, inter:], downs[e]) for e in (5, 1, 7, 0, 3, 6)[:routed]]
    weights = [0.31, 0.22, 0.17, 0.12, 0.1, 0.08][:routed]
    shared_expert = (_bf16(2 * inter, hidden, seed=6, scale=0.05), _bf16(2 * inter, hidden, seed=7, scale=0.05),
                     _bf16(hidden, 2 * inter, seed=8, scale=0.05)) if shared else None
    out = kernels.swiglu_experts(x, experts, weights, shared_expert)
    # The eager MoE: expert outputs in bf16, weighted sum in fp32, rounded, then + shared in bf16.
    reference = torch.zeros(1, 1, hidden, dtype=BF16)
    if routed:
        reference = sum(w * _swiglu_eager(x, *e).float() for w, e in zip(weights, experts)).to(BF16)
    if shared:
        reference = reference + _swiglu_eager(x, *shared_expert) if routed else _swiglu_eager(x, *shared_expert)
    _close(out, reference, ulps=4)
    residual = _bf16(1, 1, hidden, seed=9)  # the decoder layer's sum, done in the same call
    _close(kernels.swiglu_experts(x, experts, weights, shared_expert, residual), residual + reference, ulps=4)


@needs_extension
def test_rms_norm_equals_the_module() -> None:
    from deepseek_vl2.language import RMSNorm

    norm = RMSNorm(1280, eps=1e-6).to(BF16)
    norm.weight.data = _bf16(1280, seed=9)
    x = _bf16(1, 1, 1280, seed=10, scale=3.0)
    out = kernels.rms_norm(x, norm.weight, 1e-6)
    _close(out, norm.weight * torch.nn.functional.rms_norm(x, (1280,), eps=1e-6), ulps=1)


@needs_extension
def test_router_logits_equal_fp32_linear() -> None:
    x, weight = _bf16(1, 1280, seed=11), torch.randn(64, 1280, generator=torch.Generator().manual_seed(12))
    out = kernels.router_logits(x, weight)
    assert torch.allclose(out, torch.nn.functional.linear(x.float(), weight), atol=1e-4, rtol=1e-5)
    assert kernels.router_logits(x, weight.to(BF16)) is None


@needs_extension
@pytest.mark.parametrize("heads, kv_heads, position, bias", [(10, 10, 0, False), (10, 10, 300, False), (8, 2, 41, True)])
def test_mha_block_is_the_attention_sub_layer(heads: int, kv_heads: int, position: int, bias: bool) -> None:
    """x + o(attention(rope(q(n)), rope(k(n)), v(n))), n = RMSNorm(x), with k/v written to the caches."""
    from deepseek_vl2.language import RMSNorm, apply_rope

    F = torch.nn.functional
    d, hidden, length = 128, 640, 350
    x = _bf16(1, 1, hidden, seed=13)
    norm = RMSNorm(hidden).to(BF16)
    norm.weight.data = _bf16(hidden, seed=14)
    projections = [torch.nn.Linear(hidden, n, bias=bias).to(BF16) for n in (heads * d, kv_heads * d, kv_heads * d)]
    projections.append(torch.nn.Linear(heads * d, hidden, bias=bias).to(BF16))
    angles = torch.linspace(0, 6, d // 2) * (position + 1)
    cos = torch.cat([angles.cos(), angles.cos()]).view(1, d).to(BF16)
    sin = torch.cat([angles.sin(), angles.sin()]).view(1, d).to(BF16)
    k_cache, v_cache = _bf16(kv_heads, length, d, seed=16), _bf16(kv_heads, length, d, seed=17)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    out = kernels.mha_block(x, norm.weight, norm.eps, projections, cos, sin, k_cache, v_cache, position, d**-0.5)

    n = norm(x)
    q, k, v = (F.linear(n, p.weight, p.bias) for p in projections[:3])
    k_row = apply_rope(k.view(kv_heads, 1, d), cos, sin)[:, 0]
    _close(k_cache[:, position], k_row)
    _close(v_cache[:, position], v.view(kv_heads, d))
    others = torch.arange(length) != position  # nothing else in the caches changes
    assert torch.equal(k_cache[:, others], before_k[:, others]) and torch.equal(v_cache[:, others], before_v[:, others])
    q_rot = apply_rope(q.view(heads, 1, d), cos, sin).view(kv_heads, heads // kv_heads, d).double()
    keys, values = k_cache[:, : position + 1].double(), v_cache[:, : position + 1].double()
    attended = (torch.softmax(q_rot @ keys.mT * d**-0.5, -1) @ values).reshape(1, 1, heads * d).to(BF16)
    reference = x + F.linear(attended, projections[3].weight, projections[3].bias)
    _close(out, reference, ulps=4)
