"""Hardware-limit arithmetic for DeepSeek-VL2 inference, and short probes of the machine.

Everything here is analytic from a :class:`~deepseek_vl2.config.DeepseekVL2Config` (no model needed), so
tests and docs can use it on the meta device, and the benchmark can print every measured figure beside
the limit the machine allows:

* **decode bound** (tokens/s) = memory read bandwidth / bytes that *must* be read per generated token:
  the weights a token touches (attention, the dense MLP or the router + top-k routed + shared experts
  of every layer, norms, final norm, ``lm_head`` and one embedding row) plus the KV cache so far. With a
  quantization scheme (``scheme``: ``quantize.QuantScheme``) the language model's linears count their
  quantized bytes, scales included.
* **prefill bound** (seconds) = FLOPs / matmul throughput, per phase (vision tower + projector, then
  the language prefill), each phase at least the time to read the weights it touches once.

The probes (:class:`ReadProbe`, :func:`measure_memory_bandwidth`, :func:`measure_matmul_flops`) use the thread count torch
uses and take a second or two each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # (only its matrix_bytes: bounds stays below the model's modules)
    from .quantize import QuantScheme

from .config import DeepseekVL2Config, LanguageConfig, ProjectorConfig, VisionConfig
from .hardware import best_seconds

# Geometry of the image-token layout (spec §3.2): 14x14 tokens per 384-px view after the 2x2 downsample.
_LAYOUT_SIDE = 14


def dtype_bytes(dtype: torch.dtype | str) -> int:
    if isinstance(dtype, str):
        from .hardware import parse_dtype

        dtype = parse_dtype(dtype)
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------------
# parameter counts
# --------------------------------------------------------------------------------------------------


def _linear(n_in: int, n_out: int, bias: bool = False) -> int:
    return n_in * n_out + (n_out if bias else 0)


def vision_block_parameters(v: VisionConfig) -> int:
    w, hidden = v.width, v.mlp_hidden
    return (
        2 * w  # norm1
        + _linear(w, 3 * w, bias=True)  # qkv
        + _linear(w, w, bias=True)  # proj
        + 2 * w  # norm2
        + _linear(w, hidden, bias=True)
        + _linear(hidden, w, bias=True)
    )


def attn_pool_parameters(v: VisionConfig) -> int:
    """The MAP head (timm ``AttentionPoolLatent``): stored in the checkpoints, never run by DeepSeek-VL2."""
    if v.global_pool != "map":
        return 0
    w, hidden = v.width, v.mlp_hidden
    return (
        w  # latent [1, 1, w]
        + _linear(w, w, bias=True)  # q
        + _linear(w, 2 * w, bias=True)  # kv
        + _linear(w, w, bias=True)  # proj
        + 2 * w  # norm
        + _linear(w, hidden, bias=True)
        + _linear(hidden, w, bias=True)
    )


def vision_parameters(v: VisionConfig, include_attn_pool: bool = False) -> int:
    w = v.width
    n = (
        _linear(3 * v.patch_size * v.patch_size, w, bias=True)  # patch_embed conv
        + v.grid_size**2 * w  # pos_embed
        + v.layers * vision_block_parameters(v)
        + 2 * w  # final norm
    )
    return n + (attn_pool_parameters(v) if include_attn_pool else 0)


def _projector_dims(p: ProjectorConfig) -> list[tuple[int, int]]:
    """(in, out) of each Linear of the projector, in order."""
    hidden = p.n_embed * p.mlp_ratio
    kind = p.projector_type
    if kind == "identity":
        return []
    if kind == "linear":
        return [(p.input_dim, p.n_embed)]
    if kind == "mlp_gelu":
        n_in, depth = p.input_dim, p.depth
    elif kind == "downsample_mlp_gelu":
        n_in, depth = p.input_dim * p.downsample_ratio**2, max(p.depth, 2)
    else:
        raise ValueError(f"unknown projector_type {kind!r}")
    dims = []
    for i in range(depth):
        out = p.n_embed if i == depth - 1 else hidden
        dims.append((n_in, out))
        n_in = out
    return dims


def projector_parameters(p: ProjectorConfig) -> int:
    return sum(_linear(a, b, bias=True) for a, b in _projector_dims(p))


def attention_matrices(lang: LanguageConfig) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's attention projections."""
    h, heads = lang.hidden_size, lang.num_attention_heads
    if not lang.use_mla:
        d, kv = lang.mha_head_dim, lang.kv_heads
        return [(heads * d, h), (kv * d, h), (kv * d, h), (h, heads * d)]
    q_dim = heads * lang.q_head_dim
    q = [(lang.q_lora_rank, h), (q_dim, lang.q_lora_rank)] if lang.q_lora_rank else [(q_dim, h)]
    return q + [(lang.kv_lora_rank + lang.qk_rope_head_dim, h),
                (heads * (lang.qk_nope_head_dim + lang.v_head_dim), lang.kv_lora_rank), (h, heads * lang.v_head_dim)]


def swiglu_matrices(h: int, inter: int) -> list[tuple[int, int]]:
    return [(inter, h), (inter, h), (h, inter)]


def matrices_bytes(matrices: list[tuple[int, int]], dtype: torch.dtype, scheme: Optional["QuantScheme"] = None) -> int:
    """Bytes of weight matrices (out, in): in ``dtype``, or quantized in ``scheme`` (scales included)."""
    if scheme is None:
        return sum(o * i for o, i in matrices) * dtype_bytes(dtype)
    return sum(scheme.matrix_bytes(o, i) for o, i in matrices)


def attention_parameters(lang: LanguageConfig) -> int:
    """One decoder layer's attention projections (no norms except MLA's internal ones)."""
    h, heads = lang.hidden_size, lang.num_attention_heads
    bias = lang.attention_bias
    if not lang.use_mla:
        d = lang.mha_head_dim
        kv = lang.kv_heads
        return (
            _linear(h, heads * d, bias) + 2 * _linear(h, kv * d, bias) + _linear(heads * d, h, bias)
        )
    q_dim = heads * lang.q_head_dim
    if lang.q_lora_rank:
        q = _linear(h, lang.q_lora_rank, bias) + lang.q_lora_rank + _linear(lang.q_lora_rank, q_dim)
    else:
        q = _linear(h, q_dim)
    kv_a = _linear(h, lang.kv_lora_rank + lang.qk_rope_head_dim, bias) + lang.kv_lora_rank  # + kv_a_layernorm
    kv_b = _linear(lang.kv_lora_rank, heads * (lang.qk_nope_head_dim + lang.v_head_dim))
    o = _linear(heads * lang.v_head_dim, h, bias)
    return q + kv_a + kv_b + o


def _swiglu(h: int, inter: int) -> int:
    return 3 * h * inter


def moe_parts(lang: LanguageConfig) -> dict[str, int]:
    """Parameters of one MoE layer's pieces: router, one routed expert, all shared experts."""
    h = lang.hidden_size
    e = lang.n_routed_experts or 0
    router = e * h + (e if lang.topk_method == "noaux_tc" else 0)  # + e_score_correction_bias
    shared = _swiglu(h, lang.moe_intermediate_size * lang.n_shared_experts) if lang.n_shared_experts else 0
    return {"router": router, "expert": _swiglu(h, lang.moe_intermediate_size), "shared": shared}


def language_parameters(lang: LanguageConfig) -> int:
    h = lang.hidden_size
    n = lang.vocab_size * h  # embed_tokens
    parts = moe_parts(lang)
    for i in range(lang.num_hidden_layers):
        n += 2 * h + attention_parameters(lang)
        if lang.is_moe_layer(i):
            n += parts["router"] + lang.n_routed_experts * parts["expert"] + parts["shared"]
        else:
            n += _swiglu(h, lang.intermediate_size)
    n += h  # final norm
    if not lang.tie_word_embeddings:
        n += lang.vocab_size * h
    return n


def count_parameters(config: DeepseekVL2Config, include_attn_pool: bool = True) -> dict[str, int]:
    """Analytic parameter count by part. ``include_attn_pool`` True matches the official model class
    (and the checkpoint files: 3.371 B / 16.148 B / 27.480 B); False is what inference keeps resident."""
    n_embed = config.projector.n_embed
    parts = {
        "vision": vision_parameters(config.vision, include_attn_pool),
        "projector": projector_parameters(config.projector),
        "layout": 2 * n_embed if config.tile_tag == "2D" else 0,  # image_newline + view_seperator
        "language": language_parameters(config.language),
    }
    parts["total"] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------------------------------
# decode: bytes read per generated token
# --------------------------------------------------------------------------------------------------


def kv_cache_values_per_token(lang: LanguageConfig) -> int:
    """Cached values per token per layer: MLA keeps the latent c_kv plus the shared rope key; MHA K and V."""
    if lang.use_mla:
        return lang.kv_lora_rank + lang.qk_rope_head_dim
    return 2 * lang.kv_heads * lang.mha_head_dim


def kv_cache_bytes(config: DeepseekVL2Config, context: int, dtype: torch.dtype) -> int:
    """Bytes of KV cache a decode step reads when ``context`` tokens are cached."""
    lang = config.language
    return context * lang.num_hidden_layers * kv_cache_values_per_token(lang) * dtype_bytes(dtype)


def decode_bytes_per_token(
    config: DeepseekVL2Config, dtype: torch.dtype, context: int = 0, kv_dtype: Optional[torch.dtype] = None,
    scheme: Optional["QuantScheme"] = None,
) -> dict[str, int]:
    """Bytes of weights (and KV cache at ``context`` cached tokens) read to generate one token.

    Only what a batch-1 decode step must touch: per layer both RMSNorms and the attention projections
    (MLA: q or q_a/q_b, kv_a (+norm), kv_b, o; MHA: q/k/v/o), then the dense MLP, or the router, the
    ``num_experts_per_tok`` routed experts and the shared experts; then the final norm, ``lm_head`` and
    one embedding row. The vision tower and projector are not read during decode. ``scheme``: the linears
    quantized (their norms, biases, the router and the embedding stay in ``dtype``).
    """
    lang = config.language
    b = dtype_bytes(dtype)
    h = lang.hidden_size
    parts = moe_parts(lang)
    n_moe = sum(lang.is_moe_layer(i) for i in range(lang.num_hidden_layers))
    n_dense = lang.num_hidden_layers - n_moe
    attention_matrix_params = sum(o * i for o, i in attention_matrices(lang))
    attention_other = (attention_parameters(lang) - attention_matrix_params) * b  # (biases, MLA's inner norms)
    shared = swiglu_matrices(h, lang.moe_intermediate_size * lang.n_shared_experts) if lang.n_shared_experts else []
    out = {
        "embedding_row": h * b,
        "norms": (2 * h * lang.num_hidden_layers + h) * b,
        "attention": lang.num_hidden_layers * (matrices_bytes(attention_matrices(lang), dtype, scheme) + attention_other),
        "dense_mlp": n_dense * matrices_bytes(swiglu_matrices(h, lang.intermediate_size), dtype, scheme),
        "router": n_moe * parts["router"] * 4,  # the router is kept in fp32 at every dtype
        "routed_experts": n_moe * (lang.num_experts_per_tok or 0) * expert_bytes(lang, dtype, scheme),
        "shared_experts": n_moe * matrices_bytes(shared, dtype, scheme),
        "lm_head": matrices_bytes([(lang.vocab_size, h)], dtype, scheme),
    }
    out["weights"] = sum(out.values())
    out["kv_cache"] = kv_cache_bytes(config, context, kv_dtype or dtype)
    out["total"] = out["weights"] + out["kv_cache"]
    return out


def expert_bytes(lang: LanguageConfig, dtype: torch.dtype, scheme: Optional["QuantScheme"] = None) -> int:
    """Bytes of one routed expert's three matrices."""
    return matrices_bytes(swiglu_matrices(lang.hidden_size, lang.moe_intermediate_size), dtype, scheme)


def batch_step_bytes(
    config: DeepseekVL2Config, dtype: torch.dtype, rows: int, context: int = 0, experts: Optional[float] = None,
    scheme: Optional["QuantScheme"] = None,
) -> int:
    """Bytes one decode step of ``rows`` sequences (each ``context`` cached tokens) must read: every weight
    of a batch-1 step once, each distinct routed expert the rows chose once (``experts`` per MoE layer:
    measured, or by default the expectation for independent uniform choices, ``experts_touched``), and each
    row's own KV cache."""
    lang = config.language
    one = decode_bytes_per_token(config, dtype, context, scheme=scheme)
    n_moe = sum(lang.is_moe_layer(i) for i in range(lang.num_hidden_layers))
    if experts is None:
        experts = experts_touched(lang.n_routed_experts or 0, lang.num_experts_per_tok or 0, rows)
    routed = n_moe * experts * expert_bytes(lang, dtype, scheme)
    return int(one["weights"] - one["routed_experts"] - one["embedding_row"] + rows * one["embedding_row"] + routed
               + rows * one["kv_cache"])


def decode_bound_tok_s(
    config: DeepseekVL2Config, dtype: torch.dtype, bandwidth_gbs: float, context: int = 0,
    scheme: Optional["QuantScheme"] = None,
) -> float:
    """Upper limit of batch-1 decode tokens/s: read bandwidth / bytes per token."""
    return bandwidth_gbs * 1e9 / decode_bytes_per_token(config, dtype, context, scheme=scheme)["total"]


def language_matrices(lang: LanguageConfig) -> list[tuple[int, int]]:
    """(out, in) of every matrix a quantization scheme quantizes: each layer's attention projections, the
    dense MLPs, the shared and every routed expert, the LM head."""
    h = lang.hidden_size
    out: list[tuple[int, int]] = []
    for i in range(lang.num_hidden_layers):
        out += attention_matrices(lang)
        if lang.is_moe_layer(i):
            out += swiglu_matrices(h, lang.moe_intermediate_size) * (lang.n_routed_experts or 0)
            if lang.n_shared_experts:
                out += swiglu_matrices(h, lang.moe_intermediate_size * lang.n_shared_experts)
        else:
            out += swiglu_matrices(h, lang.intermediate_size)
    return out + [(lang.vocab_size, h)]


def weight_bytes(config: DeepseekVL2Config, dtype: torch.dtype, include_attn_pool: bool = False,
                 scheme: Optional["QuantScheme"] = None) -> int:
    """Bytes of the model's weights in ``dtype``; with ``scheme`` the language model's linears quantized."""
    total = count_parameters(config, include_attn_pool)["total"] * dtype_bytes(dtype)
    if scheme is None:
        return total
    matrices = language_matrices(config.language)
    return total - matrices_bytes(matrices, dtype) + matrices_bytes(matrices, dtype, scheme)


# --------------------------------------------------------------------------------------------------
# prefill: FLOPs
# --------------------------------------------------------------------------------------------------


def image_tokens(n_wide: int = 1, n_high: int = 1) -> int:
    """``<image>`` positions one image with (n_wide x n_high) local tiles takes (spec §3.2): 421 for 1x1."""
    s = _LAYOUT_SIDE
    return s * (s + 1) + 1 + (n_high * s) * (n_wide * s + 1)


def vision_flops(v: VisionConfig, n_tiles: int) -> int:
    """Multiply-adds x 2 of the ViT over ``n_tiles`` tiles, attention (QK^T and PV) included."""
    n = v.grid_size**2
    w, hidden = v.width, v.mlp_hidden
    per_token = 2 * (3 * v.patch_size**2 * w)  # patch embed
    per_token += v.layers * 2 * (w * 3 * w + w * w + 2 * w * hidden)
    attention = v.layers * 2 * 2 * n * n * w  # scores + weighted sum, all heads, non-causal
    return n_tiles * (n * per_token + attention)


def projector_flops(config: DeepseekVL2Config, n_tiles: int) -> int:
    p, v = config.projector, config.vision
    side = v.grid_size
    if p.projector_type == "downsample_mlp_gelu":
        r = p.downsample_ratio
        tokens = math.ceil(side / r) ** 2
    else:
        tokens = side * side
    return n_tiles * tokens * sum(2 * a * b for a, b in _projector_dims(p))


def language_active_parameters(lang: LanguageConfig) -> int:
    """Weights one token multiplies with (embedding and lm_head excluded): attention, dense or routed
    top-k + shared experts, router."""
    h = lang.hidden_size
    parts = moe_parts(lang)
    n = 0
    for i in range(lang.num_hidden_layers):
        n += attention_parameters(lang)
        if lang.is_moe_layer(i):
            n += parts["router"] + lang.num_experts_per_tok * parts["expert"] + parts["shared"]
        else:
            n += _swiglu(h, lang.intermediate_size)
    return n


def language_attention_flops(lang: LanguageConfig, n_tokens: int, past: int = 0) -> int:
    """QK^T and PV over a causal prompt of ``n_tokens`` after ``past`` cached tokens (all layers)."""
    pairs = n_tokens * past + n_tokens * (n_tokens + 1) // 2
    if lang.use_mla:  # prefill in the expanded form: q/k width 192, v width 128 per head
        width = lang.num_attention_heads * (lang.q_head_dim + lang.v_head_dim)
    else:
        width = lang.num_attention_heads * 2 * lang.mha_head_dim
    return lang.num_hidden_layers * 2 * pairs * width


def prefill_flops(config: DeepseekVL2Config, n_text_tokens: int, n_tiles: int) -> dict[str, int]:
    """FLOPs to the first token's logits. ``n_text_tokens`` is the full prompt length (image-token
    positions included: they run through the decoder like any other), ``n_tiles`` the 384-px views
    (global + local, e.g. 2 for one 384x384 image). ``lm_head`` only for the last position."""
    lang = config.language
    out = {
        "vision": vision_flops(config.vision, n_tiles),
        "projector": projector_flops(config, n_tiles),
        "language_linear": 2 * n_text_tokens * language_active_parameters(lang),
        "language_attention": language_attention_flops(lang, n_text_tokens),
        "lm_head": 2 * lang.vocab_size * lang.hidden_size,
    }
    out["vision_total"] = out["vision"] + out["projector"]
    out["language_total"] = out["language_linear"] + out["language_attention"] + out["lm_head"]
    out["total"] = out["vision_total"] + out["language_total"]
    return out


def experts_touched(n_experts: int, top_k: int, n_tokens: int) -> float:
    """Expected number of distinct routed experts n_tokens tokens use (uniform routing)."""
    if n_experts == 0:
        return 0.0
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** n_tokens)


def prefill_weight_bytes(config: DeepseekVL2Config, dtype: torch.dtype, n_text_tokens: int,
                         scheme: Optional["QuantScheme"] = None) -> dict[str, int]:
    """Weights each prefill phase must read at least once (the memory floor of a phase)."""
    b = dtype_bytes(dtype)
    lang = config.language
    touched = experts_touched(lang.n_routed_experts or 0, lang.num_experts_per_tok or 0, n_text_tokens)
    n_moe = sum(lang.is_moe_layer(i) for i in range(lang.num_hidden_layers))
    language = decode_bytes_per_token(config, dtype, scheme=scheme)["weights"]
    language += int(n_moe * (touched - (lang.num_experts_per_tok or 0)) * expert_bytes(lang, dtype, scheme))
    vision = (vision_parameters(config.vision) + projector_parameters(config.projector)) * b
    return {"vision_total": vision, "language_total": language}


@dataclass
class PrefillBound:
    vision_s: float
    language_s: float
    compute_s: float  # FLOPs / throughput only
    memory_s: float  # weights each phase must read / bandwidth

    @property
    def total_s(self) -> float:
        return self.vision_s + self.language_s


def prefill_bound(
    config: DeepseekVL2Config,
    dtype: torch.dtype,
    n_text_tokens: int,
    n_tiles: int,
    flops_per_s: float,
    bandwidth_gbs: Optional[float] = None,
    scheme: Optional["QuantScheme"] = None,
) -> PrefillBound:
    """Lower limit of the time to first token (preprocessing excluded): per phase
    max(FLOPs / matmul throughput, weights read / bandwidth), phases added."""
    f = prefill_flops(config, n_text_tokens, n_tiles)
    mem = prefill_weight_bytes(config, dtype, n_text_tokens, scheme)
    bw = (bandwidth_gbs or float("inf")) * 1e9
    vis_c = f["vision_total"] / flops_per_s if n_tiles else 0.0
    lang_c = f["language_total"] / flops_per_s
    vis_m = mem["vision_total"] / bw if n_tiles else 0.0
    lang_m = mem["language_total"] / bw
    return PrefillBound(
        vision_s=max(vis_c, vis_m),
        language_s=max(lang_c, lang_m),
        compute_s=vis_c + lang_c,
        memory_s=vis_m + lang_m,
    )


# --------------------------------------------------------------------------------------------------
# probes
# --------------------------------------------------------------------------------------------------


def last_level_cache_bytes() -> int:
    """Largest CPU cache size (L3) from sysfs, or 64 MiB when unknown."""
    best = 0
    try:
        import glob

        for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
            text = open(path).read().strip()
            mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or 64 * 1024**2


class ReadProbe:
    """A buffer far larger than the caches (16x L3 up to 2 GiB, at least 512 MiB on CPU), filled with random values,
    whose repeated ``sum()`` measures the read bandwidth with torch's threads. Kept alive between
    measurements where they bracket other work: allocating and freeing 512 MiB right before a decode
    slowed steps ~2 s later to 2-7x (measured on the 2-core EPYC VM: the kernel's work on the freed
    pages competes for the two cores), while a buffer kept for the whole run left them alone."""

    # At most this much: a VM reports its host's L3 (480 MiB on the Sapphire Rapids VM), and 16x that, 7.7 GB,
    # left no room beside small in int8 or base in int4 on a 24 GB machine (the benchmark was killed for it).
    MAX_CPU_BYTES = 2 * 1024**3

    def __init__(self, size_bytes: Optional[int] = None, device: str = "cpu") -> None:
        self.device = torch.device(device)
        if size_bytes is None:
            size_bytes = (max(512 * 1024**2, min(16 * last_level_cache_bytes(), self.MAX_CPU_BYTES))
                          if self.device.type == "cpu" else 2 * 1024**3)
        self.size_bytes = size_bytes // 4 * 4
        # Random contents, all pages touched: identical (e.g. all-ones or zero) pages could be merged by the
        # hypervisor/KSM into one cached physical page and read impossibly fast.
        self.buffer = torch.empty(self.size_bytes // 4, dtype=torch.float32, device=self.device).uniform_()

    def measure(self, seconds: float) -> float:
        """Read bandwidth in GB/s (1e9 bytes): the best of repeated sums over ``seconds`` (at least 3)."""
        return self.size_bytes / best_seconds(self.buffer.sum, min_runs=3, seconds=seconds, device=self.device) / 1e9


def measure_memory_bandwidth(seconds: float = 1.0, size_bytes: Optional[int] = None, device: str = "cpu") -> float:
    """Read bandwidth in GB/s (1e9 bytes) with torch's threads, from a ``ReadProbe`` made for this one
    measurement (and freed after it)."""
    return ReadProbe(size_bytes, device).measure(seconds)


def measure_gemv_bandwidth(
    dtype: torch.dtype, rows: int = 8192, cols: int = 8192, seconds: float = 0.5, device: str = "cpu"
) -> float:
    """Bandwidth (GB/s) a batch-1 linear achieves on a weight larger than the caches, through the path
    decoding uses (``kernels.linear``: the fastest measured GEMV on a CPU) — diagnostic, not the bound."""
    from .kernels import linear

    dev = torch.device(device)
    w = torch.empty(rows, cols, dtype=dtype, device=dev).uniform_(-0.02, 0.02)
    x = torch.randn(1, cols, dtype=dtype, device=dev)
    best = best_seconds(lambda: linear(x, w), min_runs=3, seconds=seconds, device=dev)
    return w.numel() * w.element_size() / best / 1e9


# GEMM shapes of the prefill (M tokens x K -> N): the ViT's qkv/fc1/fc2 over 2 tiles and a language MLP.
PREFILL_SHAPES: tuple[tuple[int, int, int], ...] = (
    (1458, 1152, 4304),
    (1458, 4304, 1152),
    (1458, 1152, 3456),
    (512, 2048, 2048),
)


def measure_matmul_flops(
    dtype: torch.dtype,
    shapes: tuple[tuple[int, int, int], ...] = PREFILL_SHAPES,
    seconds: float = 1.5,
    device: str = "cpu",
) -> float:
    """GEMM throughput in FLOP/s at prefill-like shapes: for each shape the best of a few runs, then the
    best over shapes (the throughput the prefill could reach). Returns early for emulated dtypes."""
    dev = torch.device(device)
    budget = seconds / len(shapes)
    best_rate = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=dev).to(dtype)
        w = torch.randn(n, k, device=dev).to(dtype)
        best = best_seconds(lambda: torch.nn.functional.linear(a, w), min_runs=2, seconds=budget, give_up_after=budget, device=dev)
        best_rate = max(best_rate, 2 * m * k * n / best)
    return best_rate


def machine_description() -> dict:
    """CPU model, cores and threads (and GPU name) for labelling every number with its machine."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    desc = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": isa,
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        desc["gpu"] = torch.cuda.get_device_name(0)
    return desc
