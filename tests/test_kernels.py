"""The CPU's batch-1 linear paths: every candidate computes F.linear; the chooser picks one of them."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

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


# The AVX512-BF16 kernel is bf16-only, our fp32 loop fp32-only; the other paths take both dtypes.
PATHS = [(name, dtype) for name in sorted(kernels.CANDIDATES) for dtype in (torch.float32, torch.bfloat16)
         if not (name == "avx512bf16" and dtype == torch.float32) and not (name == "simdf32" and dtype == torch.bfloat16)]


@pytest.mark.parametrize("name, dtype", PATHS, ids=[f"{n}-{str(d)[6:]}" for n, d in PATHS])
@pytest.mark.parametrize("rows, cols, strided, bias", [(64, 1280, False, False), (96, 1283, True, True), (7, 31, True, False)])
def test_candidates_compute_linear(name: str, dtype: torch.dtype, rows: int, cols: int, strided: bool, bias: bool) -> None:
    unavailable = kernels.gemv_path_unavailable(name, dtype)
    if unavailable is not None:  # (test_the_paths_a_cpu_of_this_kind_has_are_there: only where it must be)
        pytest.skip(f"{name} does not exist here: {unavailable}")
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


def test_extension_names_are_per_checkout_module_names(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Each checkout builds its kernels under a name of its own (a shared build folder made two checkouts
    rebuild each other's), and the name is a valid module name (pybind's TORCH_EXTENSION_NAME)."""
    name = kernels._extension_name("deepseek_vl2_decode_f32")
    assert name.isidentifier() and name.startswith("deepseek_vl2_decode_f32_")
    assert kernels._extension_name("deepseek_vl2_decode_f32") == name  # stable within a checkout
    monkeypatch.setattr(kernels, "_CSRC", tmp_path / "csrc")
    assert kernels._extension_name("deepseek_vl2_decode_f32") != name


def test_builds_use_the_ninja_of_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever PATH says, the extensions are built by one ninja (that of the `ninja` package): two ninja
    versions keep incompatible build logs, and each made the other rebuild everything."""
    import os
    import shutil

    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with kernels._one_ninja():
        found = shutil.which("ninja")
        assert found is not None and os.path.dirname(found) == ninja.BIN_DIR
    assert os.environ["PATH"] == "/usr/bin:/bin"


# --------------------------------------------------------------------------------------------------
# Layer-level decode kernels (one bf16 token on the CPU). Each is compared with the eager PyTorch
# computation it replaces, in bf16: the sums run in another order, so results may differ by a rounding.

needs_extension = pytest.mark.skipif(
    kernels.avx512_bf16_extension() is None,
    reason=f"the bf16 kernels do not exist here: {kernels.unavailable_reason('bf16')}",
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


@needs_extension
def test_a_few_bf16_rows_take_the_row_products_where_those_are_faster() -> None:
    """kernels.linear of 2..48 bf16 rows without bias: the step kernels' row products (up to 4 rows on
    vectors, up to 48 where the rows run on tiles); else oneDNN (F.linear) as before."""
    extension = kernels.avx512_bf16_extension()
    weight = _bf16(96, 160, seed=1)
    before = extension.tiles_min_rows()
    try:
        for tiles in (0, 3):
            if extension.set_tiles(tiles) != tiles:
                continue  # (no AMX here: only the vector case)
            for rows in (2, 3, 4, 5, 16, 48, 49):
                x = _bf16(rows, 160, seed=rows)
                out = kernels.linear(x.view(1, rows, 160), weight)
                assert out.shape == (1, rows, 96)
                ours = rows <= 4 or (tiles and rows <= 48)
                expected = extension.rows_linear_bf16(x, weight) if ours else torch.nn.functional.linear(x, weight)
                assert torch.equal(out.view(rows, 96), expected), (tiles, rows)
                _close(out.view(rows, 96).float(), torch.nn.functional.linear(x.float(), weight.float()), ulps=4.0)
        bias = _bf16(96, seed=9)
        x = _bf16(3, 160, seed=3)
        assert torch.equal(kernels.linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias))
    finally:
        extension.set_tiles(before)


def _language_config(**overrides):
    """A small MoE language config (the mla-noaux fixture's) with overrides."""
    import json

    from conftest import FIXTURES_DIR
    from deepseek_vl2.config import DeepseekVL2Config

    values = json.loads((FIXTURES_DIR / "checkpoints" / "mla-noaux" / "config.json").read_text())
    values["language_config"].update(overrides)
    return DeepseekVL2Config.from_dict(values)


ROUTINGS = {
    "greedy-softmax": {"topk_method": "greedy", "scoring_func": "softmax", "n_group": 1, "topk_group": 1, "norm_topk_prob": False},
    # One kept group of two experts and top-2: the group choice decides the experts.
    "group-limited": {"topk_method": "group_limited_greedy", "scoring_func": "softmax", "n_group": 3, "topk_group": 1, "norm_topk_prob": False},
    "noaux_tc": {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5},
}


@needs_extension
@pytest.mark.parametrize("routing", sorted(ROUTINGS))
def test_ffn_block_is_the_moe_sub_layer(routing: str) -> None:
    """x + MoE(RMSNorm(x)) in one call (router, chosen experts, shared experts) equals the eager layers,
    for every routing method of the official code."""
    from deepseek_vl2.model import build_model, random_init

    config = _language_config(**ROUTINGS[routing])
    model = build_model(config, "cpu", BF16, random_init(std=0.3, seed=3))
    layer = next(layer for layer in model.language.model.layers if hasattr(layer.mlp, "experts"))
    if routing == "noaux_tc":  # a bias that changes the choice
        generator = torch.Generator().manual_seed(4)
        layer.mlp.gate.e_score_correction_bias.data = torch.randn(config.language.n_routed_experts, generator=generator) * 0.3
    norm, gate = layer.post_attention_layernorm, layer.mlp.gate
    group_decided = 0
    for seed in range(16):
        x = _bf16(1, 1, config.language.hidden_size, seed=20 + seed)
        fused = layer.mlp.residual_block(x, norm)
        assert fused is not None
        _close(fused, x + layer.mlp(norm(x)), ulps=4)
        flat = norm(x).view(1, -1)
        chosen = set(gate(flat)[1][0].tolist())
        plain = set(torch.nn.functional.linear(flat.float(), gate.weight).topk(gate.top_k).indices[0].tolist())
        group_decided += chosen != plain
    assert routing == "greedy-softmax" or group_decided > 0  # the groups (or the bias) changed the choice somewhere


def test_routing_that_can_tie_stays_eager() -> None:
    """noaux_tc with several groups (and group-limited routing with more experts than the kept groups
    hold) can tie on the zeroed scores of dropped groups; torch.topk settles those, so no kernel."""
    from deepseek_vl2.language import RMSNorm
    from deepseek_vl2.model import build_model, random_init

    for overrides, tie_free in [
        ({"topk_method": "noaux_tc", "n_group": 3, "topk_group": 1}, False),
        ({"topk_method": "group_limited_greedy", "scoring_func": "softmax", "n_group": 3, "topk_group": 1,
          "num_experts_per_tok": 3}, False),
        (ROUTINGS["group-limited"], True),
        (ROUTINGS["noaux_tc"], True),
    ]:
        config = _language_config(**overrides)
        model = build_model(config, "cpu", BF16, random_init(std=0.3, seed=3))
        moe = next(layer for layer in model.language.model.layers if hasattr(layer.mlp, "experts")).mlp
        assert moe.gate.tie_free() == tie_free
        if not tie_free:
            norm = RMSNorm(config.language.hidden_size).to(BF16)
            assert moe.residual_block(_bf16(1, 1, config.language.hidden_size, seed=1), norm) is None


@needs_extension
def test_ffn_block_is_the_dense_mlp_sub_layer() -> None:
    from deepseek_vl2.language import MLP, RMSNorm

    mlp, norm = MLP(640, 1792).to(BF16), RMSNorm(640).to(BF16)
    for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        linear.weight.data = _bf16(*linear.weight.shape, seed=linear.weight.shape[0], scale=0.05)
    x = _bf16(1, 1, 640, seed=30)
    _close(mlp.residual_block(x, norm), x + mlp(norm(x)), ulps=4)
    assert mlp.residual_block(x.float(), norm.float()) is None  # fp32: the eager path


@needs_extension
@pytest.mark.parametrize(
    "heads, kv_heads, d, position, bias",
    # head sizes with a vector form in the bf16 kernel (64, 128, 192, 256) and one without (80)
    [(10, 10, 128, 0, False), (10, 10, 128, 300, False), (8, 2, 128, 41, True), (6, 1, 128, 17, False),
     (4, 2, 64, 77, False), (3, 3, 192, 16, False), (2, 1, 256, 33, False), (4, 4, 80, 20, False)],
)
def test_mha_block_is_the_attention_sub_layer(heads: int, kv_heads: int, d: int, position: int, bias: bool) -> None:
    """x + o(attention(rope(q(n)), rope(k(n)), v(n))), n = RMSNorm(x), with k/v written to the caches."""
    from deepseek_vl2.language import RMSNorm, apply_rope

    F = torch.nn.functional
    hidden, length = 640, 350
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


# Settings of the bf16 kernels' AMX tiles: the fewest rows of a step that they carry (0: never).
VECTORS, ALL_TILES, AUTO_TILES = 0, 1, 3


@pytest.fixture
def tiles(request: pytest.FixtureRequest) -> Iterator[int]:
    """The bf16 kernels with AMX tiles for steps of at least `param` rows (skipped where the CPU or OS has
    none) or never (0, whatever DEEPSEEK_VL2_CPU_TILES asked for), as they were afterwards."""
    extension = kernels.avx512_bf16_extension()
    if extension is None:
        yield VECTORS  # (the tests skip without the bf16 kernels)
        return
    before = extension.tiles_min_rows()
    try:
        if extension.set_tiles(request.param) != request.param:
            pytest.skip("this CPU has no AMX-BF16 (or Linux refused the tile registers)")
        yield request.param
    finally:
        extension.set_tiles(before)


MLA_CASES = {  # overrides of the mla-noaux fixture's language config, decode position
    "plain-first-position": ({}, 0),
    "plain": ({}, 300),
    "q_lora-bias": ({"q_lora_rank": 48, "attention_bias": True}, 41),
    # On tiles: whole 32-value pieces of latent and rotated key (loaded from the caches in place, where the
    # fixture's 32 + 8 are copied), 20 heads (two claims of 10), 301 positions (a partial last block of 16).
    "wide": ({"kv_lora_rank": 64, "qk_rope_head_dim": 32, "num_attention_heads": 20}, 300),
}


@pytest.mark.parametrize("dtype,tiles", [(BF16, VECTORS), (BF16, ALL_TILES), (torch.float32, VECTORS)],
                         ids=["bf16", "bf16-tiles", "fp32"], indirect=["tiles"])
@pytest.mark.parametrize("case", sorted(MLA_CASES))
def test_mla_block_is_the_latent_attention_sub_layer(case: str, dtype: torch.dtype, tiles: int) -> None:
    """x + o(MLA(RMSNorm(x))) in one call, against the official (expanded) formulation in float64: keys and
    values from kv_b applied to every cached latent, RoPE on de-interleaved pairs. The latent and the
    rotated key are written to the caches at the position and nothing else changes. With tiles on, the
    attention runs on them (latent_attention.h: queries and probabilities in bf16) within the same bound."""
    from deepseek_vl2.language import AttentionContext, MultiHeadLatentAttention, RMSNorm, apply_rope, deinterleave

    if (kernels.avx512_bf16_extension() if dtype == BF16 else kernels.fp32_extension()) is None:
        pytest.skip(f"the kernels for this dtype do not exist here: {kernels.unavailable_reason('bf16' if dtype == BF16 else 'f32')}")
    F = torch.nn.functional
    overrides, position = MLA_CASES[case]
    config = _language_config(**overrides).language
    attention = MultiHeadLatentAttention(config)
    generator = torch.Generator().manual_seed(7)
    for name, parameter in attention.named_parameters():
        scale = 1.0 if name.endswith("layernorm.weight") else parameter.shape[-1] ** -0.5
        parameter.data = torch.randn(parameter.shape, generator=generator) * scale + (1.0 if "layernorm" in name else 0.0)
    attention.to(dtype)
    norm = RMSNorm(config.hidden_size).to(dtype)
    norm.weight.data = (1 + 0.2 * torch.randn(config.hidden_size, generator=generator)).to(dtype)
    length, rank, rope = 350, config.kv_lora_rank, config.qk_rope_head_dim
    attention.make_cache(1, length, torch.zeros(attention.cache_numel(1, length), dtype=dtype))
    attention.cache.latent.copy_(torch.randn(1, length, rank, generator=generator))
    attention.cache.k_pe.copy_(torch.randn(1, length, rope, generator=generator))
    before_latent, before_k_pe = attention.cache.latent.clone(), attention.cache.k_pe.clone()
    angles = torch.linspace(0, 6, rope // 2) * (position + 1)
    cos = torch.cat([angles.cos(), angles.cos()]).view(1, rope).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()]).view(1, rope).to(dtype)
    x = (torch.randn(1, 1, config.hidden_size, generator=generator) * 2).to(dtype)
    ctx = AttentionContext(cos=cos, sin=sin, start_pos=position, use_cache=True)
    out = attention.residual_block(x, norm, ctx)
    assert out is not None

    ulps = 4 if dtype == BF16 else 2**-12  # (fp32: a few fp32 roundings)
    n = norm(x)
    if attention.q_lora_rank is None:
        q = attention.q_proj(n)
    else:
        q = attention.q_b_proj(attention.q_a_layernorm(attention.q_a_proj(n)))
    kv_a = attention.kv_a_proj_with_mqa(n)
    latent = attention.kv_a_layernorm(kv_a[..., :rank])
    k_pe = apply_rope(deinterleave(kv_a[..., rank:]).view(1, rope), cos, sin)
    cache = attention.cache
    _close(cache.latent[0, position], latent.view(rank), ulps)
    _close(cache.k_pe[0, position], k_pe.view(rope), ulps)
    others = torch.arange(length) != position
    assert torch.equal(cache.latent[:, others], before_latent[:, others]) and torch.equal(cache.k_pe[:, others], before_k_pe[:, others])

    heads, nope, v_dim = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    q = q.view(heads, nope + rope).double()
    q_pe = apply_rope(deinterleave(q[:, nope:].to(dtype)).view(heads, 1, rope), cos, sin)[:, 0].double()
    latents, keys_pe = cache.latent[0, : position + 1].double(), cache.k_pe[0, : position + 1].double()
    kv = (latents @ attention.kv_b_proj.weight.double().T).view(-1, heads, nope + v_dim)  # [T, H, nope + v]
    k_nope, values = kv[..., :nope], kv[..., nope:]
    scores = torch.einsum("hd,thd->ht", q[:, :nope], k_nope) + q_pe @ keys_pe.T
    attended = torch.einsum("ht,thd->hd", torch.softmax(scores * attention.softmax_scale, -1), values)
    reference = x + F.linear(attended.reshape(1, 1, heads * v_dim).to(dtype), attention.o_proj.weight, attention.o_proj.bias)
    _close(out, reference, ulps)


@needs_extension
@pytest.mark.parametrize("ours, expected", [(1.05, "avx512bf16"), (1.5, "native")])
def test_chooser_keeps_our_bf16_kernel_unless_clearly_beaten(monkeypatch: pytest.MonkeyPatch, ours: float, expected: str) -> None:
    timings = {"aten": 2.0, "native": 1.0, "onednn": 3.0, "avx512bf16": ours}  # (simdf32: fp32 only, not timed)
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.delenv("DEEPSEEK_VL2_CPU_GEMV", raising=False)
    monkeypatch.setattr(kernels, "_best_times", lambda runs, rounds: {name: timings[name] for name in runs})
    assert kernels.cpu_gemv(torch.bfloat16) is kernels.CANDIDATES[expected]


def test_candidate_timing_takes_turns_so_a_bandwidth_change_ranks_paths_not_phases() -> None:
    # A fake machine that reads memory twice as fast after its 6th call (a VM's bandwidth changing).
    # Path "a" costs 1.0 unit per call and "b" 1.5: timed one after the other, "b" would get only fast
    # calls (0.75) and beat "a" (1.0); taken in turns, each gets fast calls and "a" wins.
    now, calls = [0.0], [0]

    def path(cost: float) -> Callable[[], None]:
        def run() -> None:
            calls[0] += 1
            now[0] += cost if calls[0] <= 6 else cost / 2

        return run

    timings = kernels._best_times({"a": path(1.0), "b": path(1.5)}, rounds=6, clock=lambda: now[0])
    assert timings == {"a": 0.5, "b": 0.75}
    assert min(timings, key=timings.get) == "a"


@needs_extension
def test_row_claims_cover_every_row_once_and_rebalance_a_slow_thread() -> None:
    """The decode kernels' streaming phases are claimed in chunks (RowClaims): every row exactly once;
    with a slow thread, the others take chunks from the back of its share."""
    extension = kernels.avx512_bf16_extension()
    threads = torch.get_num_threads()
    for n, chunk in [(1000, 7), (5, 64), (1, 1), (0, 4)]:
        owners = extension.row_claims_trace(n, chunk, 0)
        assert (owners >= 0).all() and owners.numel() == n
    if threads < 2:
        pytest.skip("one thread: nobody to take over a share")
    owners = extension.row_claims_trace(4000, 10, 2000)  # thread 0 sleeps 2 ms per chunk of 10 rows
    assert (owners >= 0).all()
    first_share = owners[: 4000 // threads]
    assert (first_share != 0).sum() > 0.5 * first_share.numel()  # most of thread 0's share done by others
    # It takes its own share from the front, the others from the back: what it did itself is a prefix of
    # its share (possibly empty: on a loaded machine the scheduler may not run it before the others are done).
    done_by_it = int((first_share == 0).sum())
    assert (first_share[:done_by_it] == 0).all()


def test_kernel_error_messages_are_joined_without_iostreams() -> None:
    """TORCH_CHECK formats a message of several parts with std::ostringstream inside the extension, which
    crashed the process on the GPU image (csrc/check.h); the kernels check arguments with DECODE_CHECK."""
    csrc = Path(kernels.__file__).parent / "csrc"
    for source in sorted(csrc.glob("*.[ch]*")):
        if source.name != "check.h":
            assert "TORCH_CHECK" not in source.read_text(), f"{source.name}: use DECODE_CHECK (see check.h)"
    if kernels.fp32_extension() is None:
        pytest.skip(f"no fp32 kernels: {kernels.unavailable_reason('f32')}")
    with pytest.raises(RuntimeError, match=r"gemv_f32: x has 3 values, weight rows have 5"):
        kernels.fp32_extension().gemv_f32(torch.zeros(3), torch.zeros(4, 5), None)
    with pytest.raises(RuntimeError, match=r"gemv_f32: Float tensors only"):
        kernels.fp32_extension().gemv_f32(torch.zeros(5, dtype=torch.float64), torch.zeros(4, 5, dtype=torch.float64), None)


def _candidates_reference(logits: torch.Tensor, seen: torch.Tensor, penalty: float, k: int):
    from deepseek_vl2.generation import apply_repetition_penalty

    penalised = apply_repetition_penalty(logits, seen, penalty)
    ids = (penalised >= torch.topk(penalised, k).values[-1]).nonzero().view(-1)
    return ids, penalised[ids]


@pytest.mark.parametrize("build", ["fp32_extension", "avx512_bf16_extension"])
def test_sampling_candidates_are_the_top_k_after_the_penalty_with_ties(build: str) -> None:
    """Ids (ascending) and penalised values of every logit >= the k-th largest, as PyTorch selects them."""
    extension = getattr(kernels, build)()
    if extension is None:
        pytest.skip(f"{build}: not available here: {kernels.unavailable_reason('f32' if build == 'fp32_extension' else 'bf16')}")
    generator = torch.Generator().manual_seed(5)
    vocab = 3000
    for trial in range(40):
        # bf16-rounded logits: ties everywhere, as the decode step's logits
        logits = (torch.randn(vocab, generator=generator) * 3).bfloat16().float()
        if trial % 5 == 0:
            logits[torch.randint(0, vocab, (20,), generator=generator)] = float("-inf")
        seen = torch.randint(0, vocab, (int(torch.randint(0, 60, (1,), generator=generator)),), generator=generator)
        seen = torch.cat([seen, seen[:5]])  # repeats count once
        penalty = [1.0, 1.1, 1.7, 0.6][trial % 4]  # below 1 the penalty raises positive logits
        k = [1, 2, 7, 50, vocab][trial % 5]
        ids, values = extension.sampling_candidates(logits, seen, penalty, k)
        expected_ids, expected_values = _candidates_reference(logits, seen, penalty, k)
        assert torch.equal(ids, expected_ids) and torch.equal(values, expected_values), (trial, penalty, k)
    nan = torch.zeros(300)
    nan[123] = float("nan")
    assert extension.sampling_candidates(nan, torch.tensor([1]), 1.1, 5) is None  # NaN: left to PyTorch
    assert extension.sampling_candidates(torch.zeros(300, dtype=torch.float64), torch.tensor([1]), 1.1, 5) is None  # other tensors
    assert extension.sampling_candidates(torch.zeros(600)[::2], torch.tensor([1]), 1.1, 5) is None
    assert extension.sampling_candidates(torch.zeros(300), torch.tensor([1], dtype=torch.int32), 1.1, 5) is None
    with pytest.raises(RuntimeError, match="seen id 300 outside the vocabulary of 300"):
        extension.sampling_candidates(torch.zeros(300), torch.tensor([300]), 1.1, 5)
    with pytest.raises(RuntimeError, match=r"k must be in \[1, 300\]"):
        extension.sampling_candidates(torch.zeros(300), torch.tensor([1]), 1.1, 0)


# --------------------------------------------------------------------------------------------------
# The whole-step kernel with several rows (DecodeStep.step_rows, the serving engine's batched decode):
# row b decodes one token at its own position of its own cache slot. A row's logits must be the same bit
# for bit whatever the other rows are (a greedy request answers the same alone as in company), so every
# comparison between row counts below is torch.equal.

ROW_MODELS = {  # fixture, language overrides (None: the checkpoint itself)
    "mha": ("mha", None),
    "mla": ("mla", None),
    "mla-noaux": ("mla-noaux", None),  # noaux_tc routing (sigmoid, correction bias), latent attention
    # Widths that are not multiples of the kernels' blocks (hidden 112 = 64 + 32 + 16 values, head size 28,
    # experts of 48), grouped-query attention with biases: every tail of the row loops.
    "mha-odd-sizes": ("mha", {"hidden_size": 112, "intermediate_size": 100, "moe_intermediate_size": 48,
                              "num_key_value_heads": 2, "attention_bias": True}),
}
SLOTS = 16


def _skip_without_step_kernels(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and kernels.avx512_bf16_extension() is None:
        pytest.skip("this CPU has no AVX512-BF16 (or no C++ compiler/ninja): bf16 decoding uses the eager layers")
    if dtype == torch.float32 and kernels.fp32_extension() is None:
        pytest.skip("no C++ compiler/ninja: fp32 decoding uses the eager layers")


def _row_model(name: str, dtype: torch.dtype, overrides: dict | None = None):
    """The language model of ROW_MODELS[name] at ``dtype`` (with ``overrides`` of its language config too),
    with caches of SLOTS slots of 40 positions."""
    import json

    from conftest import FIXTURES_DIR
    from deepseek_vl2.config import DeepseekVL2Config
    from deepseek_vl2.model import build_model, load_model, random_init

    fixture, model_overrides = ROW_MODELS[name]
    if overrides:
        model_overrides = {**(model_overrides or {}), **overrides}
    path = FIXTURES_DIR / "checkpoints" / fixture
    if model_overrides is None:
        language = load_model(path, dtype=dtype).language
    else:
        values = json.loads((path / "config.json").read_text())
        values["language_config"].update(model_overrides)
        language = build_model(DeepseekVL2Config.from_dict(values), "cpu", dtype, random_init(std=0.2, seed=1)).language
    language.setup_cache(40, batch=SLOTS)
    return language


def _caches(language) -> list[torch.Tensor]:
    """Every layer's cache tensors (MHA: k, v [S, kv_heads, T, d]; MLA: latent [S, T, r], k_pe [S, T, rope])."""
    return [t for layer in language.model.layers for t in layer.self_attn.cache.buffers()]


def _fill_histories(language, lengths: list[int], seed: int) -> list[torch.Tensor]:
    """Decode random tokens into slot s for positions 0..lengths[s]-1 (slots advancing together, as in
    the engine); returns a copy of the caches."""
    generator = torch.Generator().manual_seed(seed)
    vocab = language.config.vocab_size
    with torch.inference_mode():
        for position in range(max(lengths)):
            slots = [s for s, length in enumerate(lengths) if position < length]
            tokens = torch.randint(0, vocab, (len(slots),), generator=generator).tolist()
            assert language.decode_rows_cpu(tokens, [position] * len(slots), slots) is not None
    return [t.clone() for t in _caches(language)]


def _restore(language, snapshot: list[torch.Tensor]) -> None:
    for t, saved in zip(_caches(language), snapshot):
        t.copy_(saved)


@pytest.mark.parametrize("tiles", [VECTORS, ALL_TILES], ids=["vectors", "tiles"], indirect=True)
@pytest.mark.parametrize("n,k", [(64, 1280), (37, 100), (16, 31), (5, 7), (130, 64)])
def test_row_products_are_the_sums_and_do_not_depend_on_the_other_rows(n: int, k: int, tiles: int) -> None:
    """w @ x for 1..40 inputs at once through the step kernels' row products (AMX tiles: 16 weight rows by
    16 inputs a tile; tails of rows, of columns (odd ones too) and inputs past 16 included).

    Tolerance: the fp32 sum of k products, however ordered, is within k * 2^-24 * sum|w x| of the exact
    one, and the result is then rounded to bf16 (half an ulp: at most 2^-8 of it). And each input's result is the
    same bit for bit alone as among 4, 17 or 40 others."""
    extension = kernels.avx512_bf16_extension()
    if extension is None:
        pytest.skip("no bf16 kernels here (no AVX512-BF16, or no C++ compiler/ninja)")
    assert extension.tiles_min_rows() == tiles
    generator = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=generator).to(torch.bfloat16)
    xs = torch.randn(40, k, generator=generator).to(torch.bfloat16)
    exact = xs.double() @ w.double().T
    bound = k * 2.0**-24 * (xs.double().abs() @ w.double().abs().T) + 2.0**-8 * exact.abs() + 1e-30
    got = extension.rows_linear_bf16(xs, w)
    assert got.shape == (40, n) and got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= bound).all()
    for count in (1, 5, 17):
        assert torch.equal(extension.rows_linear_bf16(xs[:count], w), got[:count]), f"{count} inputs"
    assert torch.equal(extension.rows_linear_bf16(xs[7:8], w), got[7:8])


def test_tiles_carry_steps_of_three_rows_by_default_and_never_where_the_cpu_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """DEEPSEEK_VL2_CPU_TILES: auto (the default) puts steps of 3 rows or more on AMX tiles, all (or 1)
    every step, 0 none; under a cap that hides AMX (DEEPSEEK_VL2_CPU_ISA=avx512) never; a setting that is
    none of these is refused by name."""
    amx = {"amx_bf16", "amx_tile"} <= kernels.hardware.cpu_flags()
    monkeypatch.delenv(kernels.TILES_SWITCH, raising=False)
    assert kernels.tiles_min_rows() == (AUTO_TILES if amx else VECTORS)
    for setting, min_rows in (("auto", AUTO_TILES), ("all", ALL_TILES), ("1", ALL_TILES), ("0", VECTORS)):
        monkeypatch.setenv(kernels.TILES_SWITCH, setting)
        assert kernels.tiles_min_rows() == (min_rows if amx else VECTORS)
    monkeypatch.setenv(kernels.TILES_SWITCH, "yes")
    with pytest.raises(ValueError, match="DEEPSEEK_VL2_CPU_TILES='yes' is not a setting"):
        kernels.tiles_min_rows()
    monkeypatch.setenv(kernels.TILES_SWITCH, "all")
    monkeypatch.setenv("DEEPSEEK_VL2_CPU_ISA", "avx512")
    assert kernels.tiles_min_rows() == VECTORS


# The row paths on which every row count takes the same path: (dtype, AMX tiles)
ROW_PATHS = {"bf16": (torch.bfloat16, VECTORS), "bf16-tiles": (torch.bfloat16, ALL_TILES), "fp32": (torch.float32, VECTORS)}


@pytest.mark.parametrize("dtype,tiles", ROW_PATHS.values(), ids=ROW_PATHS.keys(), indirect=["tiles"])
@pytest.mark.parametrize("name", sorted(ROW_MODELS))
def test_step_rows_are_batch_invariant(name: str, dtype: torch.dtype, tiles: int) -> None:
    """Each row's logits (and the cache entries it writes) are bit-identical whatever the other rows of
    its step are, however many (1..16) and in whichever order, and one row in slot 0 is step()."""
    _skip_without_step_kernels(dtype)
    language = _row_model(name, dtype)
    lengths = [3 + (7 * s) % 23 for s in range(SLOTS)]  # histories of different lengths: rows at different positions
    snapshot = _fill_histories(language, lengths, seed=5)
    vocab = language.config.vocab_size
    generator = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, vocab, (SLOTS,), generator=generator).tolist()
    # row of slot s: token tokens[s] at position lengths[s] (the next one of its history)

    def run(slots: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        _restore(language, snapshot)
        with torch.inference_mode():
            logits = language.decode_rows_cpu([tokens[s] for s in slots], [lengths[s] for s in slots], slots)
        assert logits.shape == (len(slots), vocab) and logits.dtype == torch.float32
        assert logits.known_argmaxes == logits.argmax(-1).tolist()
        return logits, [t.clone() for t in _caches(language)]

    alone = {s: run([s]) for s in range(SLOTS)}
    assert all(torch.isfinite(logits).all() for logits, _ in alone.values())
    assert len({logits.argmax().item() for logits, _ in alone.values()}) > 1  # (the rows differ)
    order = torch.randperm(SLOTS, generator=generator).tolist()
    batches = [order[:2], order[2:5], order[5:13], order, list(range(SLOTS)), [0, 15, 7]]
    for slots in batches:
        logits, caches = run(slots)
        for b, s in enumerate(slots):
            assert torch.equal(logits[b], alone[s][0][0]), f"slot {s} as row {b} of {len(slots)}"
        for i, cache in enumerate(caches):  # a row's slot holds what the row writes alone; other slots are untouched
            for s in range(SLOTS):
                expected = alone[s][1][i][s] if s in slots else snapshot[i][s]
                assert torch.equal(cache[s], expected), f"cache {i}, slot {s}"
    _restore(language, snapshot)
    with torch.inference_mode():
        single = language.decode_step_cpu(tokens[0], lengths[0])  # step(): one row in slot 0
    assert single.shape == (vocab,) and torch.equal(single, alone[0][0][0])
    assert single.known_argmax == int(single.argmax())


@pytest.mark.parametrize("tiles", [AUTO_TILES], ids=["auto"], indirect=True)
def test_tiles_carry_the_steps_of_three_rows_or_more(tiles: int) -> None:
    """With tiles (auto: steps of 3 rows or more) a step of several rows takes another path (other fp32
    sum orders, so some logits differ in their last bits from the vector path's), the same as with tiles
    for every step; steps of one or two rows stay on the vector path. So a row's logits are bit-identical
    whatever its company of 2 or more others, and alone or with one other the same as without tiles."""
    _skip_without_step_kernels(torch.bfloat16)
    # (wide enough that fp32 sums of bf16 products are not exact: the fixtures' 64 values mostly are, in any order)
    language = _row_model("mha", torch.bfloat16, {"hidden_size": 1024, "moe_intermediate_size": 256})
    snapshot = _fill_histories(language, [4, 6, 9, 5], seed=3)
    extension = kernels.avx512_bf16_extension()

    def logits(min_rows: int, rows: list[int]) -> torch.Tensor:
        extension.set_tiles(min_rows)
        _restore(language, snapshot)
        tokens, positions = [5, 7, 11, 13], [4, 6, 9, 5]
        with torch.inference_mode():
            return language.decode_rows_cpu([tokens[b] for b in rows], [positions[b] for b in rows], rows).clone()

    company = logits(AUTO_TILES, [0, 1, 2, 3])
    assert not torch.equal(company, logits(VECTORS, [0, 1, 2, 3]))
    assert torch.equal(company, logits(ALL_TILES, [0, 1, 2, 3]))
    assert torch.equal(company[1:], logits(AUTO_TILES, [1, 2, 3]))
    alone, pair = logits(AUTO_TILES, [2]), logits(AUTO_TILES, [1, 2])
    assert torch.equal(alone, logits(VECTORS, [2])) and torch.equal(pair, logits(VECTORS, [1, 2]))
    # (rows whose logits the two paths give differently, alone and as a pair: the checks above can fail)
    assert not torch.equal(alone, logits(ALL_TILES, [2])) and not torch.equal(pair, logits(ALL_TILES, [1, 2]))
    assert (alone - company[2:3]).abs().max() <= 2e-2 * alone.abs().max()  # (the bf16 bound of the eager comparison)


@pytest.mark.parametrize("dtype,tiles", ROW_PATHS.values(), ids=ROW_PATHS.keys(), indirect=["tiles"])
@pytest.mark.parametrize("name", sorted(ROW_MODELS))
def test_step_rows_compute_what_the_eager_model_computes(name: str, dtype: torch.dtype, tiles: int) -> None:
    """Rows at different positions of different slots give the logits of the eager PyTorch model run over
    each row's own sequence (a full causal forward, no cache, no kernels).

    Tolerance: both sides compute the same function with the same roundings to the storage type; they
    differ in the order of the fp32 sums (dot products, softmax) and, in bf16, in which values land on the
    other side of a bf16 rounding because of it (2^-8 relative each, carried through the layers). So fp32
    agrees to 1e-4 of the largest logit (rounding differences are ~1e-7 relative per operation) and bf16
    to 2e-2 of it, the bounds the single-row kernel tests use. A row attending over another slot's history
    misses its reference by more than that: checked against each row's token after another history."""
    _skip_without_step_kernels(dtype)
    language = _row_model(name, dtype)
    vocab = language.config.vocab_size
    generator = torch.Generator().manual_seed(8)
    slots = [5, 0, 11, 3]
    lengths = [9, 4, 14, 6]
    histories = [torch.randint(0, vocab, (length,), generator=generator).tolist() for length in lengths]
    tokens = torch.randint(0, vocab, (len(slots),), generator=generator).tolist()
    with torch.inference_mode():
        for position in range(max(lengths)):  # the histories, decoded by the kernel into their slots
            rows = [b for b in range(len(slots)) if position < lengths[b]]
            language.decode_rows_cpu([histories[b][position] for b in rows], [position] * len(rows), [slots[b] for b in rows])
        logits = language.decode_rows_cpu(tokens, lengths, slots)

        def eager(history: list[int], token: int) -> torch.Tensor:
            ids = torch.tensor([history + [token]])
            return language(language.model.embed_tokens(ids))[0, -1]

        references = [eager(histories[b], tokens[b]) for b in range(len(slots))]
        elsewhere = [eager(histories[(b + 1) % len(slots)], tokens[b]) for b in range(len(slots))]
    bound = 1e-4 if dtype == torch.float32 else 2e-2
    for b, reference in enumerate(references):
        scale = reference.abs().max().item()
        assert (logits[b] - reference).abs().max().item() <= bound * scale, f"row {b}"
        assert (logits[b] - elsewhere[b]).abs().max().item() > bound * scale, f"row {b}: the test cannot tell slots apart"
        if dtype == torch.float32:
            assert int(logits[b].argmax()) == int(reference.argmax())


@pytest.mark.parametrize("name", ["mha", "mla-noaux"])
def test_the_step_counts_the_routed_experts_it_streams(name: str) -> None:
    """take_routed_counts: the MoE layers stepped and the distinct routed experts they streamed (what a
    step of several rows costs), as many as the eager routers choose for the same rows; taking starts the
    count anew."""
    _skip_without_step_kernels(torch.float32)
    language = _row_model(name, torch.float32)
    step = language._cpu_step()
    moe = [layer.mlp for layer in language.model.layers if hasattr(layer.mlp, "gate")]
    assert moe, "the fixture has no MoE layer"
    tokens = torch.randint(0, language.config.vocab_size, (SLOTS,), generator=torch.Generator().manual_seed(4)).tolist()
    chosen: list[set[int]] = [set() for _ in moe]
    hooks = [mlp.gate.register_forward_hook(lambda _m, _i, out, c=c: c.update(out[1][0].tolist()))
             for mlp, c in zip(moe, chosen)]
    try:
        with torch.inference_mode():
            for token in tokens:  # each row at position 0 (the first of two tokens: a single one would take the kernels)
                language(language.model.embed_tokens(torch.tensor([[token, token]])))
    finally:
        for hook in hooks:
            hook.remove()
    top_k = language.config.num_experts_per_tok
    step.take_routed_counts()
    with torch.inference_mode():
        language.decode_rows_cpu(tokens[:1], [0], [0])
        assert step.take_routed_counts() == (len(moe), len(moe) * top_k)
        assert step.take_routed_counts() == (0, 0)
        language.decode_rows_cpu(tokens, [0] * SLOTS, list(range(SLOTS)))
        language.decode_rows_cpu(tokens[:1] * 2, [0, 0], [0, 1])  # the same token twice shares its experts
    expected = sum(len(c) for c in chosen)
    assert len(moe) * top_k < expected < len(moe) * top_k * SLOTS  # (rows that share some experts)
    assert step.take_routed_counts() == (2 * len(moe), expected + len(moe) * top_k)


@pytest.mark.parametrize("name", ["mha", "mla"])
def test_step_rows_write_each_row_at_its_position_of_its_slot(name: str) -> None:
    """A row's key/value (MHA) or latent and rotated key (MLA) land at its position of its slot, in every
    layer; nothing else in the caches changes."""
    _skip_without_step_kernels(torch.float32)
    language = _row_model(name, torch.float32)
    snapshot = _fill_histories(language, [4] * SLOTS, seed=2)  # positions 0..3 of every slot
    rows = {9: 4, 2: 7, 14: 0}  # slot: position (7: past the history; 0: overwrites the first entry)
    with torch.inference_mode():
        language.decode_rows_cpu([10, 11, 12], list(rows.values()), list(rows.keys()))
    for cache, before in zip(_caches(language), snapshot):
        # MHA: [S, kv_heads, T, d] -> changed [S, T]; MLA: [S, T, r] -> changed [S, T]
        changed = (cache != before).flatten(2).any(-1) if cache.dim() == 3 else (cache != before).any(-1).any(1)
        expected = torch.zeros(SLOTS, cache.shape[-2], dtype=torch.bool)
        for slot, position in rows.items():
            expected[slot, position] = True
        assert torch.equal(changed, expected)


def test_step_rows_refuse_bad_arguments_with_clear_messages() -> None:
    _skip_without_step_kernels(torch.float32)
    language = _row_model("mha", torch.float32)
    snapshot = _fill_histories(language, [2] * SLOTS, seed=3)
    vocab = language.config.vocab_size
    step = language._cpu_step()
    assert step is not None and step.slots == SLOTS
    cases = [
        (([1, 2], [0, 0], [0, SLOTS]), f"slot {SLOTS} outside the cache's {SLOTS} slots"),
        (([1, 2], [0, 0], [0, -1]), "slot -1 outside"),
        (([1, 2, 3], [2, 2, 2], [4, 1, 4]), "slot 4 given twice"),
        (([1], [40], [0]), "position 40 outside the cache of 40 positions"),
        (([1], [-1], [0]), "position -1 outside"),
        (([vocab], [0], [0]), f"token id {vocab} outside the vocabulary of {vocab}"),
        (([1, 2], [0], [0, 1]), r"tokens, positions and slots must have the same length \(got 2, 1, 2\)"),
        (([], [], []), r"1 to 16 rows per step"),
        ((list(range(SLOTS + 1)), [0] * (SLOTS + 1), list(range(SLOTS + 1))), r"1 to 16 rows per step .* got 17"),
    ]
    for (tokens, positions, slots), message in cases:
        with pytest.raises(RuntimeError, match=message):
            language.decode_rows_cpu(tokens, positions, slots)
    with pytest.raises(RuntimeError, match="slots must be a 1-D int64 CPU tensor"):
        step.step_rows(torch.tensor([1]), torch.tensor([0]), torch.tensor([0], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        language.decode_step_cpu(vocab, 0)
    assert all(torch.equal(t, saved) for t, saved in zip(_caches(language), snapshot))  # refused before any write
    # int64 tensors and lists are the same call
    with torch.inference_mode():
        from_lists = language.decode_rows_cpu([3, 4], [2, 2], [1, 6]).clone()
        _restore(language, snapshot)
        from_tensors = step.step_rows(torch.tensor([3, 4]), torch.tensor([2, 2]), torch.tensor([1, 6]))
    assert torch.equal(from_lists, from_tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_a_step_lets_the_other_python_threads_run(dtype: torch.dtype) -> None:
    """The step gives up the GIL while it runs: the server's event loop and a stream's reader are Python
    threads of the same process, and a step that held it (40-200 ms at full size) stalled them all. A
    thread that only reads the clock, on a core of its own, must never wait as long as a step lasts (with
    the GIL held it waits out every step whole). The steps are made long (tens of ms on one thread) by a large vocabulary."""
    import threading
    import time

    _skip_without_step_kernels(dtype)
    language = _row_model("mha", dtype, {"hidden_size": 512, "vocab_size": 131072})
    step = language._cpu_step()
    tokens, positions, slots = list(range(1, SLOTS + 1)), [0] * SLOTS, list(range(SLOTS))
    stepping = threading.Event()
    samples: list[float] = []

    def read_the_clock() -> None:
        stepping.wait()
        while stepping.is_set():
            samples.append(time.perf_counter())

    reader = threading.Thread(target=read_the_clock)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (the reader gets the other core)
    reader.start()
    calls: list[float] = []
    try:
        with torch.inference_mode():
            step.step_rows(tokens, positions, slots)  # (warm)
            stepping.set()
            for _ in range(8):
                started = time.perf_counter()
                step.step_rows(tokens, positions, slots)
                calls.append(time.perf_counter() - started)
    finally:
        stepping.clear()
        reader.join()
        torch.set_num_threads(threads)
    longest_wait = max(b - a for a, b in zip(samples, samples[1:]))
    assert min(calls) > 0.004, f"the steps are too short to tell ({1e3 * min(calls):.1f} ms)"
    assert longest_wait < 0.5 * min(calls), (
        f"the clock reader waited {1e3 * longest_wait:.1f} ms at once; a step lasts {1e3 * min(calls):.1f} ms")


def test_step_rows_do_not_apply_where_the_step_kernel_does_not() -> None:
    from conftest import FIXTURES_DIR
    from deepseek_vl2.model import load_model

    language = load_model(FIXTURES_DIR / "checkpoints" / "mha", dtype=torch.float64).language
    language.setup_cache(8, batch=4)
    assert language.decode_rows_cpu([3, 4], [0, 0], [0, 1]) is None


# --------------------------------------------------------------------------------------------------
# Every CPU kind: a path this CPU cannot run is never chosen nor forced; the builds follow the CPU (and
# DEEPSEEK_VL2_CPU_ISA, which makes this CPU behave as an older kind); no compiler or the switch: PyTorch.


def _avx2_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepseek_vl2 import hardware

    monkeypatch.setenv("DEEPSEEK_VL2_CPU_ISA", "avx2")
    monkeypatch.delenv("DEEPSEEK_VL2_CPU_KERNEL", raising=False)  # (the CPU's reasons, not the switch's)
    monkeypatch.setattr(hardware, "is_x86", lambda: True)
    monkeypatch.setattr(kernels, "_chosen", {})


@pytest.mark.parametrize("forced, dtype, why", [
    ("avx512bf16", torch.bfloat16, r"this CPU has no avx512_bf16, avx512_vnni, avx512bw, avx512f, avx512vl \(capped by DEEPSEEK_VL2_CPU_ISA=avx2\)"),
    ("onednn", torch.bfloat16, r"oneDNN has no bf16 primitives on this CPU \(capped by DEEPSEEK_VL2_CPU_ISA=avx2\)"),
    ("simdf32", torch.bfloat16, "simdf32 takes float32 weights only"),
    ("avx512bf16", torch.float32, "avx512bf16 takes bfloat16 weights only"),
    ("fastest", torch.float32, "there is no path 'fastest'"),
])
def test_an_override_asking_for_a_path_this_cpu_cannot_run_is_refused(forced: str, dtype: torch.dtype, why: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from deepseek_vl2.hardware import UnavailableOnThisCPU

    _avx2_only(monkeypatch)
    monkeypatch.setenv("DEEPSEEK_VL2_CPU_GEMV", forced)
    with pytest.raises(UnavailableOnThisCPU, match=f"DEEPSEEK_VL2_CPU_GEMV={forced} refused for {str(dtype)[6:]}: {why}"):
        kernels.cpu_gemv(dtype)
    monkeypatch.setenv("DEEPSEEK_VL2_CPU_GEMV", "native")  # one it can run: taken as asked
    assert kernels.cpu_gemv(dtype) is kernels.CANDIDATES["native"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_the_probe_times_only_the_paths_this_cpu_can_run(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    _avx2_only(monkeypatch)
    monkeypatch.delenv("DEEPSEEK_VL2_CPU_GEMV", raising=False)
    timed: list[str] = []

    def best_times(runs, rounds):
        timed.extend(runs)
        return {name: 1.0 for name in runs}

    monkeypatch.setattr(kernels, "_best_times", best_times)
    chosen = kernels.cpu_gemv(dtype)
    if dtype == torch.bfloat16:  # (PyTorch's own paths emulate bf16 there: slow, but they run)
        assert sorted(timed) == ["aten", "native"]
    else:
        assert {"aten", "native", "onednn"} <= set(timed) and "avx512bf16" not in timed
    assert chosen in [kernels.CANDIDATES[name] for name in timed]


def test_the_fp32_build_under_a_cap_targets_that_cpu_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPSEEK_VL2_CPU_ISA", raising=False)
    native_name, native_flags = kernels.fp32_build()
    assert "-march=native" in native_flags
    for cap, level in (("avx2", "-march=x86-64-v3"), ("avx512", "-march=x86-64-v4")):
        monkeypatch.setenv("DEEPSEEK_VL2_CPU_ISA", cap)
        name, flags = kernels.fp32_build()
        assert level in flags and "-march=native" not in flags
        assert name != native_name and f"_{cap}_" in name and name.isidentifier()  # (its own build folder)


def _evex_instructions(library: str) -> list[str]:
    """The AVX-512 (EVEX-encoded: first byte 0x62, never a valid opcode otherwise in 64-bit code) instructions
    of a shared library, as objdump disassembles them."""
    import shutil
    import subprocess

    if shutil.which("objdump") is None:
        pytest.skip("no objdump (binutils) to read the kernels' instructions")
    listing = subprocess.run(["objdump", "-d", "--no-addresses", library], capture_output=True, text=True, check=True).stdout
    return [line for line in listing.splitlines() if line.count("\t") >= 2 and line.split("\t")[1].startswith("62 ")]


def test_under_the_avx2_cap_our_kernels_hold_no_avx512_instruction(tmp_path: Path) -> None:
    """What runs as "an AVX2 CPU" must not use AVX-512: the fp32 extension built under the cap (in another
    process, as CI's capped run builds it) has no EVEX-encoded instruction, while the checker does find
    them in an AVX-512 build."""
    import json
    import os
    import subprocess
    import sys

    if kernels.kernel_unavailable("f32") is not None:
        pytest.skip(f"no fp32 kernels to read: {kernels.kernel_unavailable('f32')}")
    script = ("import json; from deepseek_vl2 import kernels, hardware; e = kernels.fp32_extension(); "
              "print(json.dumps([e.__file__ if e else None, kernels.unavailable_reason('f32'), "
              "kernels.avx512_bf16_extension() is None, hardware.default_dtype('cpu') == hardware.torch.float32]))")
    env = {**os.environ, "DEEPSEEK_VL2_CPU_ISA": "avx2"}
    env.pop("DEEPSEEK_VL2_CPU_KERNEL", None)
    out = subprocess.run([sys.executable, "-c", script], cwd=Path(kernels.__file__).parent.parent, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    library, reason, no_bf16_kernels, fp32_default = json.loads(out.stdout.strip().splitlines()[-1])
    assert library is not None, reason
    assert no_bf16_kernels and fp32_default  # nor bf16, as on a real AVX2 CPU
    evex = _evex_instructions(library)
    assert not evex, f"{len(evex)} AVX-512 instructions in the AVX2 build, e.g. {evex[:3]}"
    positive = kernels.avx512_bf16_extension()
    if positive is not None:  # (the checker is not blind: the bf16 kernels are AVX-512 through and through)
        assert len(_evex_instructions(positive.__file__)) > 100


@pytest.mark.parametrize("variable, value, why", [
    ("CXX", "/nonexistent/c++", "no C++ compiler to build our kernels ('/nonexistent/c++' not found"),
    ("DEEPSEEK_VL2_CPU_KERNEL", "0", "our CPU kernels are switched off (DEEPSEEK_VL2_CPU_KERNEL=0)"),
])
def test_without_a_compiler_or_with_the_switch_off_pytorch_decodes_alike(variable: str, value: str, why: str,
                                                                         tmp_path: Path) -> None:
    """No kernels (no compiler, or switched off): nothing is built, each path says why it is missing, the
    chooser picks one of PyTorch's, forcing ours is refused, and greedy decoding gives the tokens it gives
    with the kernels (those of this process)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import FIXTURES_DIR
    from deepseek_vl2.engine import generate
    from deepseek_vl2.generation import GenerationConfig
    from test_generation import _inputs, _load

    processor, model = _load("mla")
    expected = generate(model, _inputs(processor), GenerationConfig(max_new_tokens=8), processor.eos_id)
    script = f"""
import json, sys, warnings
sys.path.insert(0, "tests")
warnings.simplefilter("error")  # (nothing to warn about: the reason is known before any build is tried)
from deepseek_vl2 import kernels
from deepseek_vl2.engine import generate
from deepseek_vl2.generation import GenerationConfig
from test_generation import _inputs, _load
import torch
processor, model = _load("mla")
tokens = generate(model, _inputs(processor), GenerationConfig(max_new_tokens=8), processor.eos_id)
paths = [kernels.cpu_gemv(torch.float32), kernels.cpu_gemv(torch.bfloat16)]
chosen = [name for name, gemv in kernels.CANDIDATES.items() if gemv in paths]
import os
os.environ["DEEPSEEK_VL2_CPU_GEMV"] = "simdf32"; kernels._chosen.clear()
try:
    kernels.cpu_gemv(torch.float32); refused = None
except ValueError as exc:
    refused = str(exc)
print(json.dumps([kernels.fp32_extension() is None, kernels.avx512_bf16_extension() is None,
                  kernels.unavailable_reason("f32"), chosen, refused, tokens]))
"""
    env = {**os.environ, variable: value, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),
           "DEEPSEEK_VL2_FIXTURES": str(FIXTURES_DIR)}
    for other in ("DEEPSEEK_VL2_CPU_GEMV", "DEEPSEEK_VL2_CPU_KERNEL"):
        if other != variable:
            env.pop(other, None)
    out = subprocess.run([sys.executable, "-c", script], cwd=Path(kernels.__file__).parent.parent, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    no_f32, no_bf16, reason, chosen, refused, tokens = json.loads(out.stdout.strip().splitlines()[-1])
    assert no_f32 and no_bf16 and reason.startswith(why)
    assert chosen and set(chosen) <= {"aten", "native", "onednn"}
    assert refused is not None and why in refused
    assert not (tmp_path / "extensions").exists() or not any((tmp_path / "extensions").rglob("*.so"))
    assert tokens == expected


def test_the_paths_a_cpu_of_this_kind_has_are_there() -> None:
    """The skips above are only where this CPU kind really lacks a path: with a compiler, the fp32 kernels
    build; with AVX512-BF16 the bf16 ones too; with AVX-512 (uncapped) oneDNN runs bf16."""
    import os

    from deepseek_vl2 import hardware

    flags = hardware.cpu_flags()
    if kernels.kernel_unavailable("f32") is None:
        assert kernels.fp32_extension() is not None, kernels.unavailable_reason("f32")
        assert kernels.gemv_path_unavailable("simdf32", torch.float32) is None
    if kernels.kernel_unavailable("bf16") is None:
        assert {"avx512f", "avx512bw", "avx512_bf16"} <= flags
        assert kernels.avx512_bf16_extension() is not None, kernels.unavailable_reason("bf16")
    elif os.environ.get("DEEPSEEK_VL2_CPU_KERNEL") != "0" and kernels.kernel_unavailable("f32") is None:
        assert not {"avx512f", "avx512bw", "avx512_bf16"} <= flags  # missing only for the CPU's sake
    assert kernels.gemv_path_unavailable("onednn", torch.float32) is None
    if {"avx512bw", "avx512vl", "avx512dq"} <= flags and not os.environ.get("ONEDNN_MAX_CPU_ISA"):
        assert kernels.gemv_path_unavailable("onednn", torch.bfloat16) is None


class _NeverBuild:
    """A stand-in for an extension builder that has built nothing and must not be called."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cache_info(self):
        from functools import _CacheInfo

        return _CacheInfo(0, 0, 1, 0)

    def __call__(self):
        pytest.fail(f"{self.name}() was called for tensors off the CPU")


def test_a_model_off_the_cpu_never_builds_cpu_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU machine the setup must not compile CPU kernels (~30 s each): every entry point into them
    declines tensors that are not on the CPU before asking for an extension. The meta device stands in
    for CUDA (no GPU here); the builders are replaced by ones that fail if called."""
    import torch.nn.functional as F

    from deepseek_vl2 import hardware
    from deepseek_vl2.model import build_model
    from test_generation import _fixture_config

    monkeypatch.setattr(kernels, "avx512_bf16_extension", _NeverBuild("avx512_bf16_extension"))
    monkeypatch.setattr(kernels, "fp32_extension", _NeverBuild("fp32_extension"))
    monkeypatch.setattr(kernels, "_BUILT", [])
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setattr(hardware, "cpu_bf16_is_fast", _NeverBuild("cpu_bf16_is_fast"))
    for dtype in (torch.bfloat16, torch.float32):
        assert hardware.default_dtype("cuda") in (torch.bfloat16, torch.float16)  # (no CPU probe for a GPU)
        model = build_model(_fixture_config("mla-noaux", q_lora_rank=48), "meta", dtype)
        language = model.language
        language.setup_cache(8)
        hidden = language.config.hidden_size
        x = torch.empty(1, 1, hidden, device="meta", dtype=dtype)
        big = torch.empty(4096, 1024, device="meta", dtype=dtype)  # (above the size that goes to cpu_gemv)
        assert kernels.linear(torch.empty(1, 1024, device="meta", dtype=dtype), big).device.type == "meta"
        assert language.decode_step_cpu(5, 3) is None  # the whole-step kernel
        cos = sin = torch.empty(1, 8, device="meta", dtype=dtype)
        from deepseek_vl2.language import AttentionContext

        ctx = AttentionContext(cos=cos, sin=sin, start_pos=3, use_cache=True)
        for layer in language.model.layers:  # the per-layer kernels
            assert layer.self_attn.residual_block(x, layer.input_layernorm, ctx) is None
            assert layer.mlp.residual_block(x, layer.post_attention_layernorm) is None
            assert layer.input_layernorm(x).device.type == "meta"  # (rms_norm kernel declined)
        assert kernels.linear_many(x, [torch.nn.Linear(hidden, 8, device="meta", dtype=dtype)]) is None
        logits = torch.empty(3000, device="meta")
        assert kernels.first_argmax(logits) is None
        assert kernels.sampling_candidates(logits, torch.empty(2, dtype=torch.long, device="meta"), 1.1, 5) is None
        assert F.linear(x, big[:, :hidden]).device.type == "meta"


def _eager_experts(x: torch.Tensor, order: torch.Tensor, counts: torch.Tensor, top_k: int,
                   weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager path's grouped outputs (PyTorch's bf16 ops: gate, up, silu, product, down) and, for the
    tolerance, sum |down| |h| of every output value in fp64."""
    grouped_x = x[order // top_k]
    out, spread, start = torch.empty_like(grouped_x), torch.empty(grouped_x.shape, dtype=torch.float64), 0
    for expert, count in enumerate(counts.tolist()):
        gate, up, down = weights[expert]
        rows = slice(start, start + count)
        h = torch.nn.functional.silu(grouped_x[rows] @ gate.T) * (grouped_x[rows] @ up.T)
        out[rows] = h @ down.T
        spread[rows] = h.double().abs() @ down.double().abs().T
        start += count
    return out, spread


@pytest.mark.parametrize("tiles", [ALL_TILES], ids=["tiles"], indirect=True)
@pytest.mark.parametrize("tokens,hidden,inter,experts,top_k", [(438, 128, 96, 16, 6), (40, 80, 24, 6, 2), (9, 64, 40, 8, 2),
                                                               (150, 96, 48, 3, 2), (2, 33, 17, 4, 1)])
def test_a_prompts_rows_through_the_routed_experts_in_one_call(tokens: int, hidden: int, inter: int, experts: int,
                                                               top_k: int, tiles: int) -> None:
    """``experts_prefill_bf16`` (every expert's SwiGLU for all its rows at once, on AMX tiles) against the eager
    ops it replaces: odd widths, experts without tokens, experts with more than 64 rows (several groups of
    input tiles). Each product's fp32 sum may be ordered otherwise, so a rounded gate or up value may move by
    one bf16 step (2^-8 of it), which moves an output by at most ~2^-7 of sum |down| |h|; a final rounding
    adds half a step. Most values must be bit-identical. And a token's outputs are the same bits whatever
    the other tokens of the call."""
    extension = kernels.avx512_bf16_extension()
    if extension is None:
        pytest.skip("no bf16 kernels here (no AVX512-BF16, or no C++ compiler/ninja)")
    generator = torch.Generator().manual_seed(tokens + 7 * hidden + inter)
    weights = [tuple((torch.randn(shape, generator=generator) * scale).to(torch.bfloat16)
                     for shape, scale in (((inter, hidden), hidden**-0.5), ((inter, hidden), hidden**-0.5), ((hidden, inter), inter**-0.5)))
               for _ in range(experts)]
    table = kernels.expert_table([tuple([m] for m in expert) for expert in weights])
    x = torch.randn(tokens, hidden, generator=generator).to(torch.bfloat16)
    chosen_from = experts - 1 if experts > top_k else experts  # (the last expert gets no token where it can)
    ids = torch.stack([torch.randperm(chosen_from, generator=generator)[:top_k] for _ in range(tokens)])
    flat = ids.flatten()
    order, counts = flat.argsort(stable=True), torch.bincount(flat, minlength=experts)
    got = extension.experts_prefill_bf16(x, order, counts, top_k, table, inter)
    want, spread = _eager_experts(x, order, counts, top_k, weights)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    error = (got.double() - want.double()).abs()
    assert (error <= 2.0**-7 * spread + 2.0**-8 * want.double().abs()).all()
    assert (error == 0).double().mean() > 0.95
    # The first half of the tokens alone: their outputs bit for bit.
    half = max(1, tokens // 2)
    flat_half = ids[:half].flatten()
    order_half, counts_half = flat_half.argsort(stable=True), torch.bincount(flat_half, minlength=experts)
    alone = extension.experts_prefill_bf16(x[:half], order_half, counts_half, top_k, table, inter)
    by_pair = {int(p): got[i] for i, p in enumerate(order.tolist())}
    for i, p in enumerate(order_half.tolist()):
        assert torch.equal(alone[i], by_pair[int(p)]), f"token {p // top_k}, choice {p % top_k}"


@pytest.mark.parametrize("tiles", [ALL_TILES, VECTORS], ids=["tiles", "vectors"], indirect=True)
def test_the_moe_layer_takes_the_one_call_path_where_tiles_are_on(tiles: int) -> None:
    """Experts.forward on a prompt's bf16 rows: the one-call kernel where tiles are on, the eager loop where not,
    the same values within the tolerance above."""
    if kernels.avx512_bf16_extension() is None:
        pytest.skip("no bf16 kernels here (no AVX512-BF16, or no C++ compiler/ninja)")
    from deepseek_vl2.language import Experts

    generator = torch.Generator().manual_seed(3)
    layer = Experts(8, 64, 32).to(torch.bfloat16)
    with torch.no_grad():
        layer.gate_up_proj.copy_(torch.randn(layer.gate_up_proj.shape, generator=generator) * 0.125)
        layer.down_proj.copy_(torch.randn(layer.down_proj.shape, generator=generator) * 0.18)
    x = torch.randn(20, 64, generator=generator).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(8, generator=generator)[:2] for _ in range(20)])
    weights = torch.rand(20, 2, generator=generator)
    flat = ids.flatten()
    order, counts = flat.argsort(stable=True), torch.bincount(flat, minlength=8)
    one_call = kernels.routed_experts_rows(x, order, counts, 2, layer.swiglu_weights(), layer.pointer_table())
    assert (one_call is not None) == (tiles == ALL_TILES)
    with torch.inference_mode():
        got = layer(x, weights, ids)
        eager = layer._weighted_sum(layer._loop(x[order // 2], counts.tolist()), order, weights)
    assert torch.allclose(got.float(), eager.float(), rtol=2**-6, atol=2**-6 * eager.float().abs().max().item())
    if one_call is None:
        assert torch.equal(got, eager)


@pytest.mark.parametrize("tiles", [ALL_TILES], ids=["tiles"], indirect=True)
@pytest.mark.parametrize("batch,tokens,heads,head_dim", [(1, 729, 2, 72), (2, 37, 3, 24), (1, 16, 1, 32), (3, 5, 2, 16), (1, 100, 4, 40)])
def test_vision_attention_on_tiles_is_as_close_to_exact_as_pytorchs(batch: int, tokens: int, heads: int, head_dim: int,
                                                                    tiles: int) -> None:
    """``vision_attention`` (``attention_bf16``: one pass over all keys on AMX tiles) against fp64 attention: no further from it
    than PyTorch's bf16 attention (twice its error, plus a quarter of a bf16 step of the largest output),
    over odd token counts (a last query block and key tile partly filled) and head sizes that do not fill a
    32-value piece."""
    extension = kernels.avx512_bf16_extension()
    if extension is None:
        pytest.skip("no bf16 kernels here (no AVX512-BF16, or no C++ compiler/ninja)")
    generator = torch.Generator().manual_seed(tokens * heads + head_dim)
    width = heads * head_dim
    qkv = (torch.randn(batch, tokens, 3 * width, generator=generator) * 1.5).to(torch.bfloat16)

    def attention(values: torch.Tensor) -> torch.Tensor:
        q, k, v = values.view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width)

    exact, theirs = attention(qkv.double()), attention(qkv).double()
    ours = kernels.vision_attention(qkv, heads)
    assert ours.shape == (batch, tokens, width) and ours.dtype == torch.bfloat16
    allowed = 2 * (theirs - exact).abs().max().item() + 2.0**-10 * exact.abs().max().item()
    assert (ours.double() - exact).abs().max().item() <= allowed


@pytest.mark.parametrize("tiles", [ALL_TILES], ids=["tiles"], indirect=True)
@pytest.mark.parametrize("batch,heads,kv_heads,queries,keys,dk,dv", [
    (1, 10, 10, 438, 438, 128, 128),  # tiny's prompt in one chunk
    (1, 4, 4, 37, 101, 64, 64),  # a later chunk: its queries start at key 64
    (2, 6, 2, 17, 17, 40, 24),  # grouped key heads, dk != dv, odd sizes
    (1, 3, 1, 1, 9, 192, 128),  # one query (MLA's head sizes)
])
def test_causal_attention_on_tiles_is_as_close_to_exact_as_pytorchs(batch: int, heads: int, kv_heads: int, queries: int, keys: int,
                                                                    dk: int, dv: int, tiles: int) -> None:
    """The decoder's prompt attention (``attention`` with a causal offset: a chunk whose queries sit at the last
    positions of the cached keys) against fp64 attention with the causal mask: no further from it than
    PyTorch's bf16 SDPA (twice its error, plus a quarter of a bf16 step of the largest output), on strided views
    as the attention layers pass them."""
    if kernels.avx512_bf16_extension() is None:
        pytest.skip("no bf16 kernels here (no AVX512-BF16, or no C++ compiler/ninja)")
    generator = torch.Generator().manual_seed(queries * keys + dk)
    q = (torch.randn(batch, queries, heads, dk, generator=generator) * 1.5).to(torch.bfloat16).transpose(1, 2)
    cache = (torch.randn(batch, kv_heads, keys + 5, dk + dv, generator=generator) * 1.5).to(torch.bfloat16)
    k, v = cache[:, :, :keys, :dk], cache[:, :, :keys, dk:]  # (strided views, as a cache's)
    offset, scale = keys - queries, dk**-0.5
    mask = torch.ones(queries, keys, dtype=torch.bool).tril(diagonal=offset)

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                                enable_gqa=heads != kv_heads).transpose(1, 2)

    exact, theirs = sdpa(q.double(), k.double(), v.double()), sdpa(q, k, v).double()
    ours = kernels.attention(q, k, v, scale, causal_offset=offset)
    assert ours.shape == (batch, queries, heads, dv) and ours.dtype == torch.bfloat16
    allowed = 2 * (theirs - exact).abs().max().item() + 2.0**-10 * exact.abs().max().item()
    assert (ours.double() - exact).abs().max().item() <= allowed
    with pytest.raises(RuntimeError, match="reach past the keys"):
        kernels.attention(q, k, v, scale, causal_offset=offset + 1)


@pytest.mark.parametrize("tiles", [ALL_TILES], ids=["tiles"], indirect=True)
@pytest.mark.parametrize("causal", [False, True], ids=["all keys", "causal"])
def test_each_querys_attention_is_the_same_whatever_block_it_is_computed_in(causal: bool, tiles: int) -> None:
    """``attention_bf16`` takes a head's queries 32 at a time (two row tiles against two key or value tiles):
    every query's output is the same bit for bit computed alone, or in a block as its first, 16th, 17th or 32nd
    row, or in a last block partly filled; a wrong tile address or stride would give another query's keys."""
    extension = kernels.avx512_bf16_extension()
    if extension is None:
        pytest.skip("no bf16 kernels here (no AVX512-BF16, or no C++ compiler/ninja)")
    generator = torch.Generator().manual_seed(7)
    heads, queries, keys, dk, dv = 3, 45, 70, 72, 40
    q = torch.randn(1, heads, queries, dk, generator=generator).to(torch.bfloat16)
    k = torch.randn(1, heads, keys, dk, generator=generator).to(torch.bfloat16)
    v = torch.randn(1, heads, keys, dv, generator=generator).to(torch.bfloat16)
    offset = keys - queries if causal else -1
    whole = extension.attention_bf16(q, k, v, offset, dk**-0.5)  # [1, queries, heads, dv]
    for first, last in [(0, 1), (15, 17), (31, 32), (31, 45), (40, 45), (0, 45)]:
        part = extension.attention_bf16(q[:, :, first:last], k, v, offset + first if causal else -1, dk**-0.5)
        assert torch.equal(part, whole[:, first:last]), (first, last)
    assert not torch.equal(whole[:, 16], whole[:, 0])  # (the rows differ: the check above can fail)


def test_gelu_in_place_is_the_tanh_gelu_within_a_bf16_step() -> None:
    """``gelu_tanh_bf16_`` (x * sigmoid(2y), no cancellation) against the fp64 tanh GELU rounded to bf16: within
    one bf16 step everywhere, equal on at least as many values as PyTorch's bf16 gelu, and the extremes
    (-0 far below zero, x far above, inf) as fp32 gives them. Odd lengths leave the values past them alone."""
    extension = kernels.avx512_bf16_extension()
    if extension is None:
        pytest.skip("no bf16 kernels here (no AVX512-BF16, or no C++ compiler/ninja)")
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(100_003, generator=generator) * 3).to(torch.bfloat16)
    x[:6] = torch.tensor([-200.0, 200.0, 0.0, -1e30, 1e30, float("inf")])
    wide = x.double()
    # 0.5 x (1 + tanh y) = x sigmoid(2y): the latter without fp64's own cancellation where tanh y is near -1
    exact = (wide * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (wide + 0.044715 * wide**3))).to(torch.bfloat16)
    exact[4:6] = x[4:6]  # (inf * sigmoid(inf): the limit is x)
    theirs = torch.nn.functional.gelu(x, approximate="tanh")
    ours = x.clone()
    extension.gelu_tanh_bf16_(ours[:-1])  # (a view: the last value must stay)
    assert ours[-1] == x[-1]
    ours, exact, theirs = ours[:-1], exact[:-1], theirs[:-1]
    step = 2.0 ** (torch.frexp(exact.float().abs().clamp_min(1e-30))[1].double() - 8)
    error = torch.where(ours == exact, 0.0, (ours.double() - exact.double()).abs())  # (inf == inf: no inf - inf)
    assert (error <= step).all()
    assert (ours == exact).sum() >= (theirs == exact).sum()
    assert ours[0] == 0 and torch.signbit(ours[0]) and ours[1] == 200 and ours[4] == x[4] and torch.isinf(ours[5])


# --------------------------------------------------------------------------------------------------
# A prompt's elementwise steps in one pass each (csrc/prefill_rows.h)


@needs_extension
@pytest.mark.parametrize("shape", [(1, 10, 438, 128), (2, 3, 5, 40), (1, 1, 7, 64)])
def test_rope_kernel_is_the_eager_rope_bit_for_bit(shape: tuple[int, ...]) -> None:
    """RoPE on q/k as the attention lays them out (a transposed view of the projection's output) and on a
    [B, S, d] tensor (MLA's shared key): the same bits as ``apply_rope``, the output laid out like the input."""
    from deepseek_vl2.language import apply_rope

    batch, heads, seq, d = shape
    projected = _bf16(batch, seq, heads * d, seed=seq + d, scale=2.0)
    x = projected.view(batch, seq, heads, d).transpose(1, 2)
    cos, sin = _bf16(seq, d, seed=1).clamp(-1, 1), _bf16(seq, d, seed=2).clamp(-1, 1)
    got = kernels.rope(x, cos, sin)
    assert got is not None and got.shape == x.shape and got.stride() == x.stride()
    assert torch.equal(got, apply_rope(x, cos, sin))
    flat = x[:, 0]  # [B, S, d]
    assert torch.equal(kernels.rope(flat.contiguous(), cos, sin), apply_rope(flat.contiguous(), cos, sin))
    gapped = torch.cat([x, x], dim=-1)[..., :d]  # (not dense: every row followed by a gap)
    assert torch.equal(kernels.rope(gapped, cos, sin), apply_rope(gapped, cos, sin))
    assert kernels.rope(x.float(), cos.float(), sin.float()) is None  # fp32: the eager ops
    assert kernels.rope(x[..., :-1], cos[:, :-1], sin[:, :-1]) is None  # an odd size: the eager ops


@needs_extension
@pytest.mark.parametrize("tokens, top_k, d", [(438, 6, 1280), (5, 1, 40), (17, 8, 33)])
def test_weighted_sum_kernel_is_the_eager_sum_bit_for_bit(tokens: int, top_k: int, d: int) -> None:
    """The routed experts' combination per token: the same bits as ``Experts._weighted_sum``'s eager ops
    (products and partial sums each rounded in fp32, choice by choice), with rows of odd widths."""
    from deepseek_vl2.language import Experts

    generator = torch.Generator().manual_seed(tokens + d)
    grouped = _bf16(tokens * top_k, d, seed=tokens, scale=3.0)
    order = torch.randperm(tokens * top_k, generator=generator)
    weights = torch.rand(tokens, top_k, generator=generator)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    position = position.view(tokens, top_k)
    total = grouped.index_select(0, position[:, 0]).float() * weights[:, :1]
    for j in range(1, top_k):
        total += grouped.index_select(0, position[:, j]).float() * weights[:, j : j + 1]
    want = total.to(torch.bfloat16)
    assert torch.equal(kernels.weighted_sum(grouped, position, weights), want)
    assert torch.equal(Experts._weighted_sum(grouped, order, weights), want)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.weighted_sum(grouped, position + tokens * top_k, weights)


@needs_extension
@pytest.mark.parametrize("shape", [(1, 1, 1280), (3, 57, 1283)], ids=["one-token", "prompt-rows"])
def test_rms_norm_kernels_are_the_module_within_a_bf16_step(shape: tuple[int, ...]) -> None:
    """``rms_norm`` for one decoding token and for a prompt's rows (odd widths): within one bf16 step
    of the eager module's value everywhere, nearly all equal, and what the module itself returns."""
    from deepseek_vl2.language import RMSNorm

    width = shape[-1]
    norm = RMSNorm(width, eps=1e-6).to(BF16)
    norm.weight.data = _bf16(width, seed=9)
    x = _bf16(*shape, seed=10, scale=3.0)
    got = kernels.rms_norm(x, norm.weight, 1e-6)
    want = norm.weight * torch.nn.functional.rms_norm(x, (width,), eps=1e-6)
    assert got.shape == want.shape
    step = 2.0 ** (torch.frexp(want.float().abs().clamp_min(1e-30))[1].double() - 8)
    assert ((got.double() - want.double()).abs() <= step).all()
    assert (got == want).double().mean() > 0.99
    assert torch.equal(norm(x), got)


@needs_extension
def test_silu_mul_kernel_is_the_eager_swiglu_within_a_bf16_step() -> None:
    gate, up = _bf16(37, 1795, seed=3, scale=4.0), _bf16(37, 1795, seed=4, scale=2.0)
    gate[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -90.0])
    got = kernels.silu_mul(gate, up)
    want = torch.nn.functional.silu(gate) * up
    step = 2.0 ** (torch.frexp(want.float().abs().clamp_min(1e-30))[1].double() - 8)
    assert ((got.double() - want.double()).abs() <= step).all()
    assert (got == want).double().mean() > 0.99
    assert kernels.silu_mul(gate.float(), up.float()) is None


@pytest.mark.parametrize("tiles", [ALL_TILES], ids=["tiles"], indirect=True)
@pytest.mark.parametrize("name", ["mha", "mla", "mla-noaux"])
def test_a_bf16_prompt_through_the_prompt_kernels_is_the_eager_computation(name: str, tiles: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring of the prompt kernels into the model (attention of both kinds, in a first chunk and a later one
    against cached keys; RoPE, RMSNorm, SwiGLU, the experts' sum; the tower's attention and biased products):
    the same logits and vision features as with every kernel declined, within bf16's rounding."""
    if kernels.avx512_bf16_extension() is None:
        pytest.skip("no bf16 kernels here (no AVX512-BF16, or no C++ compiler/ninja)")
    from conftest import FIXTURES_DIR
    from deepseek_vl2 import language, vision
    from deepseek_vl2.generation import prefill
    from deepseek_vl2.model import load_model

    model = load_model(FIXTURES_DIR / "checkpoints" / name, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(5)
    embeds = torch.randn(1, 45, model.language.config.hidden_size, generator=generator).to(torch.bfloat16)
    pixels = torch.randn(2, 3, model.config.vision.image_size, model.config.vision.image_size, generator=generator).to(torch.bfloat16)

    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model.language.setup_cache(64, batch=1)
        with torch.inference_mode():
            first = prefill(model.language, embeds[:, :30])
            later = prefill(model.language, embeds[:, 30:], start_pos=30)  # (causal against the 30 cached keys)
            return first, later, model.vision(pixels)

    for module, names in ((language, ("attention", "rope", "rms_norm", "silu_mul", "weighted_sum")),
                          (vision, ("vision_attention", "prepack_linear_weight"))):
        for attribute in names:
            monkeypatch.setattr(module, attribute, lambda *args, **kwargs: None)
    monkeypatch.setattr(vision, "biased_linear", torch.nn.functional.linear)
    eager = run()  # (first: the kernels' run packs the tower's weights for oneDNN, which F.linear cannot take)
    monkeypatch.undo()
    fused = run()
    assert all(block.mlp.fc1.weight.is_mkldnn for block in model.vision.blocks)
    for got, want in zip(fused, eager):
        assert got.shape == want.shape
        scale = want.float().abs().max().item()
        assert (got.float() - want.float()).abs().max().item() <= 0.03 * scale, name


def test_a_prepacked_linear_gives_the_same_bits_and_keeps_no_second_copy() -> None:
    """kernels.prepack_linear_weight: a bf16 weight laid out for oneDNN gives biased_linear the bits of the
    plain one, and the plain one's pages go back to the system (the memory is not held twice), while the bytes
    around it in the same allocation (the parameter arena's neighbours) keep their values."""
    if not kernels._onednn_has_bf16() or getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) is None:
        pytest.skip("oneDNN has no bf16 linear here")
    import os

    from conftest import process_memory

    generator = torch.Generator().manual_seed(3)
    rows, width, hidden = 729, 1024, 8192  # (a 16 MiB matrix: its pages are what the RSS shows)
    arena = torch.empty(hidden * width * 2 + 2 * 4096 + 64, dtype=torch.uint8)
    arena.random_(generator=generator)
    weight = arena[4096 + 64 : 4096 + 64 + hidden * width * 2].view(torch.bfloat16).view(hidden, width)
    weight.copy_(torch.randn(hidden, width, generator=generator) * 0.02)
    bias = torch.randn(hidden, generator=generator).to(torch.bfloat16)
    x = torch.randn(rows, width, generator=generator).to(torch.bfloat16)
    want = kernels.biased_linear(x, weight, bias)
    head, tail = arena[: 4096 + 64].clone(), arena[4096 + 64 + hidden * width * 2 :].clone()
    before = process_memory(os.getpid())["VmRSS"]
    packed = kernels.prepack_linear_weight(weight, rows)
    grown = process_memory(os.getpid())["VmRSS"] - before
    assert packed is not None and packed.is_mkldnn and packed.shape == weight.shape
    assert grown < 0.25 * weight.numel() * 2, f"RSS grew by {grown / 2**20:.1f} MiB packing a 16 MiB matrix"
    assert torch.equal(kernels.biased_linear(x, packed, bias), want)
    assert torch.equal(arena[: 4096 + 64], head) and torch.equal(arena[4096 + 64 + hidden * width * 2 :], tail)
    assert kernels.prepack_linear_weight(weight.float(), rows) is None  # (fp32: oneDNN's plain path stays)
