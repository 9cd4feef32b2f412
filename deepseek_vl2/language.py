"""DeepSeek-V2 Mixture-of-Experts decoder (``language.*`` in the checkpoint).

One readable module per piece, in the spirit of gpt-fast:

* ``RMSNorm`` in fp32, scaled in the activation dtype (as the official code).
* ``RotaryEmbedding``: default / linear / dynamic-NTK / YaRN tables, computed once per forward and shared
  by every layer. Two conventions: plain multi-head attention (tiny) rotates the two *halves* of each
  head (Llama); MLA rotates *interleaved pairs* (the official code de-interleaves, then rotates halves).
* ``MultiHeadAttention`` (``use_mla: false``) with a preallocated K/V cache.
* ``MultiHeadLatentAttention`` caching only the compressed latent (kv_lora_rank) and the shared rotary
  key (qk_rope_head_dim) per token: 576 values instead of 2*H*128. Prefill expands keys/values and runs
  SDPA; decode multiplies the query into latent space ("weight absorption") and never expands them.
* ``MoE``: fp32 router (softmax or sigmoid scores; greedy, group-limited or ``noaux_tc`` selection),
  routed experts stacked per layer as ``[E, 2*I, D]`` / ``[E, D, I]`` tensors, always-on shared experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import LanguageConfig
from .steps import Steps, piece_ends, run_steps
from .kernels import (
    FORMATS,
    Expert,
    Linear,
    Router,
    attention,
    decode_step,
    expert_table,
    ffn_args,
    ffn_block,
    linear,
    linear_many,
    matrix_format,
    matrix_of,
    mha_args,
    mha_block,
    mla_args,
    mla_block,
    rms_norm,
    rope,
    routed_experts_rows,
    silu_mul,
    takes,
    weighted_sum,
)

# ---------------------------------------------------------------------------------------------------
# Normalisation and rotary embeddings


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the activation dtype, like the official code. The fused kernel
        # computes in fp32 for bf16 input and rounds once: bit-identical to upcasting first.
        fused = rms_norm(x, self.weight, self.eps)  # bf16 on the CPU: one cheap call (a token, or a prompt's rows)
        if fused is not None:
            return fused
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(dim: int, base: float, scaling: dict) -> torch.Tensor:
    """YaRN: blend interpolated and extrapolated frequencies with a linear ramp over the dims."""
    factor = scaling["factor"]
    original_max = scaling.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    extrapolated = 1.0 / (base**exponents)
    interpolated = 1.0 / (factor * base**exponents)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_extrapolated = 1.0 - ramp
    return interpolated * (1 - keep_extrapolated) + extrapolated * keep_extrapolated


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, ``[S, dim]`` in the layout ``cat(freqs, freqs)``."""

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.config = config
        self.dim = config.qk_rope_head_dim if config.use_mla else config.mha_head_dim
        self.base = config.rope_theta
        self.max_positions = config.max_position_embeddings
        self.scaling = dict(config.rope_scaling) if config.rope_scaling else None
        kind = (self.scaling or {}).get("type", (self.scaling or {}).get("rope_type"))
        if kind not in (None, "default", "linear", "dynamic", "yarn"):
            raise NotImplementedError(f"rope_scaling type {kind!r} is not supported")
        if kind == "yarn" and not config.use_mla:
            raise NotImplementedError("rope_scaling 'yarn' is only defined for MLA attention")
        self.kind = kind
        self.mscale = 1.0
        if kind == "yarn":
            factor = self.scaling["factor"]
            self.mscale = yarn_get_mscale(factor, self.scaling.get("mscale", 1)) / yarn_get_mscale(
                factor, self.scaling.get("mscale_all_dim", 0)
            )
            inv_freq = _yarn_inv_freq(self.dim, self.base, self.scaling)
        else:
            inv_freq = self._inv_freq(self.base)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _inv_freq(self, base: float) -> torch.Tensor:
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.numel() == 1 and not positions.is_cuda:
            # CPU decode: look the position up in a table of every position (computed once by the same
            # code, so the same values) instead of ~10 small ops per step.
            return self.lookup(positions, dtype)
        return self._compute(positions, dtype)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, dim] of N positions from the table: each row the same values whatever the other
        positions (a vectorised cos over a batch of positions may round its tail elements differently). The
        dynamic-NTK kind depends on the longest length, read on the host, so it computes instead."""
        if self.kind == "dynamic":
            return self._compute(positions, dtype)
        cos, sin = self.table(dtype, positions.device)
        return cos[positions], sin[positions]

    def table(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of every position [max_positions, dim] (computed once per dtype and device)."""
        key = (dtype, device, self.inv_freq.data_ptr())  # inv_freq is replaced when the model is materialised
        tables = self.__dict__.setdefault("_tables", {})
        if key not in tables:
            tables.clear()
            tables[key] = self._compute(torch.arange(self.max_positions, device=device), dtype)
        return tables[key]

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(positions.device)
        t = positions.to(torch.float32)
        if self.kind == "linear":
            t = t / self.scaling["factor"]
        elif self.kind == "dynamic":
            seq_len = int(positions.max()) + 1
            if seq_len > self.max_positions:
                factor = self.scaling["factor"]
                base = self.base * ((factor * seq_len / self.max_positions) - (factor - 1)) ** (self.dim / (self.dim - 2))
                inv_freq = self._inv_freq(base).to(positions.device)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.mscale).to(dtype), (emb.sin() * self.mscale).to(dtype)


def dense_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer's weight as a float matrix: its own, or a quantized one's dequantized (``quantize.py``)."""
    dequantized = getattr(layer, "dequantized", None)
    return dequantized(dtype) if dequantized is not None else layer.weight.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., S, d]; cos/sin: [S, d]."""
    return x * cos + rotate_half(x) * sin


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): MLA's rotary dims come as interleaved pairs."""
    *lead, d = x.shape
    return x.view(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)


# ---------------------------------------------------------------------------------------------------
# Attention


@dataclass
class AttentionContext:
    """What every layer needs to know about the current forward pass."""

    cos: torch.Tensor  # [S, rope_dim]; decoding rows: [B, rope_dim], one position per row
    sin: torch.Tensor
    start_pos: int  # position of the first token of this chunk
    use_cache: bool  # write to / read from the layer caches
    slot: int = 0  # the cache slot (sequence) a chunk of one sequence belongs to
    # Decoding rows (the batching engine; static shapes for CUDA graphs): row b is one token of the sequence in
    # cache slot ``slots[b]`` at position ``positions[b]``, both on the device (no host sync), and attention
    # covers a fixed window of ``window`` cache positions, masking those after each row's own position.
    positions: Optional[torch.Tensor] = None  # [B] long
    slots: Optional[torch.Tensor] = None  # [B] long
    window: int = 0

    @property
    def rows(self) -> bool:
        return self.positions is not None

    def window_mask(self) -> torch.Tensor:
        """[B, 1, 1, window] bool: each row's cache positions at or before its own position."""
        reach = torch.arange(self.window, device=self.positions.device).view(1, -1) <= self.positions.view(-1, 1)
        return reach.view(-1, 1, 1, self.window)

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        """RoPE on x [B, H, S, d] or [B, S, d]: the chunk's positions, or one position per row."""
        if not self.rows:
            fused = rope(x, self.cos, self.sin)  # a prompt's bf16 rows on the CPU: one pass, the same values
            return fused if fused is not None else apply_rope(x, self.cos, self.sin)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (self.cos.shape[-1],)
        return apply_rope(x, self.cos.view(shape), self.sin.view(shape))


def _causal_mask(q_len: int, kv_len: int, device: torch.device) -> Optional[torch.Tensor]:
    """Boolean [q_len, kv_len] mask for a chunk that starts at kv_len - q_len (None: a single query)."""
    if q_len == 1:
        return None
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)


class KVCache(nn.Module):
    """Preallocated keys and values, [B, kv_heads, max_seq_len, head_dim] (post-RoPE keys), views of
    ``storage`` (a 1-D tensor of ``numel`` values; see ``DeepseekV2ForCausalLM.setup_cache``)."""

    def __init__(self, batch: int, kv_heads: int, max_seq_len: int, head_dim: int, storage: torch.Tensor) -> None:
        super().__init__()
        k, v = storage.view(2, batch, kv_heads, max_seq_len, head_dim).unbind(0)
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)

    @staticmethod
    def numel(batch: int, kv_heads: int, max_seq_len: int, head_dim: int) -> int:
        return 2 * batch * kv_heads * max_seq_len * head_dim

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor, slot: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a chunk k/v [b, kv_heads, S, d] of the sequences in slots slot.. at start..; return their
        keys/values so far [b, kv_heads, start + S, d] (views)."""
        end, slots = start + k.shape[2], slice(slot, slot + k.shape[0])
        self.k[slots, :, start:end] = k
        self.v[slots, :, start:end] = v
        return self.k[slots, :, :end], self.v[slots, :, :end]

    def update_rows(self, ctx: AttentionContext, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoding rows: write k/v [B, kv_heads, 1, d] at each row's slot and position; return each row's
        window of keys/values [B, kv_heads, window, d] (gathered)."""
        self.k[ctx.slots, :, ctx.positions] = k[:, :, 0]
        self.v[ctx.slots, :, ctx.positions] = v[:, :, 0]
        return self.k[ctx.slots, :, : ctx.window], self.v[ctx.slots, :, : ctx.window]


class MLACache(nn.Module):
    """MLA's compressed cache: per token the normalised latent [kv_lora_rank] and the rotated shared key,
    views of ``storage`` (a 1-D tensor of ``numel`` values)."""

    def __init__(self, batch: int, max_seq_len: int, kv_lora_rank: int, rope_dim: int, storage: torch.Tensor) -> None:
        super().__init__()
        latent, k_pe = storage.split([batch * max_seq_len * kv_lora_rank, batch * max_seq_len * rope_dim])
        self.register_buffer("latent", latent.view(batch, max_seq_len, kv_lora_rank), persistent=False)
        self.register_buffer("k_pe", k_pe.view(batch, max_seq_len, rope_dim), persistent=False)

    @staticmethod
    def numel(batch: int, max_seq_len: int, kv_lora_rank: int, rope_dim: int) -> int:
        return batch * max_seq_len * (kv_lora_rank + rope_dim)

    def update(self, start: int, latent: torch.Tensor, k_pe: torch.Tensor, slot: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a chunk latent [b, S, r] / k_pe [b, S, rope] of the sequences in slots slot.. at start..;
        return theirs so far (views)."""
        end, slots = start + latent.shape[1], slice(slot, slot + latent.shape[0])
        self.latent[slots, start:end] = latent
        self.k_pe[slots, start:end] = k_pe
        return self.latent[slots, :end], self.k_pe[slots, :end]

    def update_rows(self, ctx: AttentionContext, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoding rows: write latent [B, 1, r] / k_pe [B, 1, rope] at each row's slot and position; return
        each row's window [B, window, r] / [B, window, rope] (gathered)."""
        self.latent[ctx.slots, ctx.positions] = latent[:, 0]
        self.k_pe[ctx.slots, ctx.positions] = k_pe[:, 0]
        return self.latent[ctx.slots, : ctx.window], self.k_pe[ctx.slots, : ctx.window]


class MultiHeadAttention(nn.Module):
    """deepseek-vl2-tiny's attention: Llama MHA/GQA, half-split RoPE over the full head, scale 1/sqrt(d)."""

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.kv_heads, config.mha_head_dim
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.heads * self.head_dim, config.hidden_size, bias=bias)
        self.cache: Optional[KVCache] = None

    def cache_numel(self, batch: int, max_seq_len: int) -> int:
        return KVCache.numel(batch, self.kv_heads, max_seq_len, self.head_dim)

    def make_cache(self, batch: int, max_seq_len: int, storage: Optional[torch.Tensor]) -> None:
        """A cache over ``storage`` (``cache_numel`` values), or none (None)."""
        self.cache = None if storage is None else KVCache(batch, self.kv_heads, max_seq_len, self.head_dim, storage)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = ctx.rope(q), ctx.rope(k)
        if ctx.rows:
            k, v = self.cache.update_rows(ctx, k, v)
            mask = ctx.window_mask()
        else:
            if ctx.use_cache:
                k, v = self.cache.update(ctx.start_pos, k, v, ctx.slot)
            # A prompt chunk's bf16 heads on AMX tiles: one pass over the keys each query sees.
            fused = attention(q, k, v, self.head_dim**-0.5, causal_offset=k.shape[2] - seq) if seq > 1 else None
            if fused is not None:
                return self.o_proj(fused.view(batch, seq, self.heads * self.head_dim))
            mask = _causal_mask(seq, k.shape[2], x.device)
        if seq == 1 and batch == 1 and not x.is_cuda and not ctx.rows:
            out = self._attend_one_query(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim))

    def residual_block(self, x: torch.Tensor, norm: RMSNorm, ctx: AttentionContext) -> Optional[torch.Tensor]:
        """``x + self(norm(x), ctx)`` for one bf16 token decoding on the CPU, in one kernel call (norm,
        projections, RoPE, cache write, attention, output projection, residual); None elsewhere."""
        if x.shape[:2] != (1, 1) or not ctx.use_cache or ctx.rows or self.cache is None:
            return None
        projections = [self.q_proj, self.k_proj, self.v_proj, self.o_proj]
        return mha_block(x, norm.weight, norm.eps, projections, ctx.cos, ctx.sin, self.cache.k[ctx.slot], self.cache.v[ctx.slot],
                         ctx.start_pos, self.head_dim**-0.5)

    def kernel_args(self, norm: RMSNorm) -> Optional[list]:
        """This sub-layer for the whole-step kernel (``kernels.mha_args``, the caches of every slot); None
        where it does not apply."""
        if self.cache is None:
            return None
        projections = [self.q_proj, self.k_proj, self.v_proj, self.o_proj]
        return mha_args(norm.weight, norm.eps, projections, self.cache.k, self.cache.v, self.head_dim**-0.5)

    def _attend_one_query(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """CPU decode, batch 1, where the attention sub-layer kernel does not apply (no compiled kernels,
        or a dtype other than bf16/fp32; otherwise decoding runs ``residual_block``): two batched matmuls
        in fp32 (3x faster than CPU flash attention for one query in bf16, where the upcast copy of K/V is
        cheaper than bf16 matmuls on strided cache views).

        q: [1, H, 1, d]; k, v: [1, kv_heads, T, d] -> [1, H, 1, d]. Query heads that share a key/value
        head are the rows of one matmul.
        """
        head_dim = q.shape[-1]
        q = q.reshape(self.kv_heads, self.heads // self.kv_heads, head_dim).float()
        scores = torch.bmm(q, k[0].float().mT) * head_dim**-0.5  # [kv_heads, groups, T]
        probs = torch.softmax(scores, dim=-1)
        return torch.bmm(probs, v[0].float()).to(v.dtype).view(1, self.heads, 1, head_dim)


class MultiHeadLatentAttention(nn.Module):
    """MLA (small, base): queries optionally through a LoRA bottleneck, keys/values from a shared latent."""

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank, self.q_lora_rank = config.kv_lora_rank, config.q_lora_rank
        q_out = self.heads * config.q_head_dim
        if self.q_lora_rank is None:
            self.q_proj = Linear(config.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = Linear(config.hidden_size, self.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = Linear(config.hidden_size, self.kv_lora_rank + self.rope_dim, bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = Linear(self.kv_lora_rank, self.heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(self.heads * self.v_dim, config.hidden_size, bias=config.attention_bias)
        self.softmax_scale = config.q_head_dim**-0.5
        scaling = config.rope_scaling or {}
        if scaling.get("mscale_all_dim"):
            self.softmax_scale *= yarn_get_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
        self.cache: Optional[MLACache] = None
        self._absorbed_fp32: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    def cache_numel(self, batch: int, max_seq_len: int) -> int:
        return MLACache.numel(batch, max_seq_len, self.kv_lora_rank, self.rope_dim)

    def make_cache(self, batch: int, max_seq_len: int, storage: Optional[torch.Tensor]) -> None:
        """A cache over ``storage`` (``cache_numel`` values), or none (None)."""
        self.cache = None if storage is None else MLACache(batch, max_seq_len, self.kv_lora_rank, self.rope_dim, storage)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        batch, seq, _ = x.shape
        q_in = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        # One bf16 token on the CPU: both projections of x in one kernel call.
        q, kv_a = linear_many(x, [q_in, self.kv_a_proj_with_mqa]) or (q_in(x), self.kv_a_proj_with_mqa(x))
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(batch, seq, self.heads, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)  # [B, H, S, nope], [B, H, S, rope]
        latent, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, S, r]
        q_pe = ctx.rope(deinterleave(q_pe))
        k_pe = ctx.rope(deinterleave(k_pe))  # [B, S, rope], one key shared by all heads
        if ctx.rows:
            latent, k_pe = self.cache.update_rows(ctx, latent, k_pe)
            out = self._attend_absorbed(q_nope, q_pe, latent, k_pe, ctx.window_mask())
        else:
            if ctx.use_cache:
                latent, k_pe = self.cache.update(ctx.start_pos, latent, k_pe, ctx.slot)
            if seq > 1:
                out = self._attend_expanded(q_nope, q_pe, latent, k_pe)
            elif batch == 1 and not x.is_cuda:
                out = self._attend_absorbed_cpu(q_nope, q_pe, latent, k_pe)
            else:
                out = self._attend_absorbed(q_nope, q_pe, latent, k_pe)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.heads * self.v_dim))

    def residual_block(self, x: torch.Tensor, norm: RMSNorm, ctx: AttentionContext) -> Optional[torch.Tensor]:
        """``x + self(norm(x), ctx)`` for one bf16 or fp32 token decoding on the CPU, in one kernel call
        (norm, projections, latent cache write, absorbed attention, output projection, residual); None
        elsewhere."""
        if x.shape[:2] != (1, 1) or not ctx.use_cache or ctx.rows or self.cache is None:
            return None
        return mla_block(x, ctx.cos, ctx.sin, ctx.start_pos, self.kernel_args(norm, slot=ctx.slot))

    def kernel_args(self, norm: RMSNorm, slot: Optional[int] = None) -> Optional[list]:
        """This sub-layer for the kernels (``kernels.mla_args``): the caches of every slot (the whole-step
        kernel), or of slot ``slot`` (``mla_block``); None where they do not apply."""
        if self.cache is None:
            return None
        latent, k_pe = (self.cache.latent, self.cache.k_pe) if slot is None else (self.cache.latent[slot], self.cache.k_pe[slot])
        return mla_args(norm.weight, norm.eps, self, latent, k_pe)

    def _attend_expanded(self, q_nope, q_pe, latent, k_pe) -> torch.Tensor:
        """Prefill: expand the latent into per-head keys/values once, then one SDPA (fewest FLOPs)."""
        batch, kv_len, _ = latent.shape
        kv = self.kv_b_proj(latent).view(batch, kv_len, self.heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, self.heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        fused = attention(q, k, v, self.softmax_scale, causal_offset=kv_len - q.shape[2])  # (bf16 on AMX tiles)
        if fused is not None:
            return fused.transpose(1, 2)
        mask = _causal_mask(q.shape[2], kv_len, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)

    def _absorbed_weights_fp32(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head into W_UK [H, nope, r] and W_UV^T [H, r, v], contiguous fp32 (made once).

        On the CPU, bf16 batched matmuls on the strided halves of kv_b_proj copied and converted the
        weights on every step (a third of a decode step for small); these copies cost 2 x the bf16 size.
        """
        weight = matrix_of(self.kv_b_proj)[0]  # (the stored tensor identifies the weights, whatever their format)
        if self._absorbed_fp32 is None or self._absorbed_fp32[0] is not weight:
            w = dense_weight(self.kv_b_proj, torch.float32).view(self.heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
            w_k = w[:, : self.nope_dim].contiguous()
            w_v_t = w[:, self.nope_dim :].transpose(1, 2).contiguous()
            self._absorbed_fp32 = (weight, w_k, w_v_t)
        return self._absorbed_fp32[1], self._absorbed_fp32[2]

    def _attend_absorbed_cpu(self, q_nope, q_pe, latent, k_pe) -> torch.Tensor:
        """CPU decode, batch 1: the absorbed attention as fp32 matmuls on contiguous operands.

        q_nope [1, H, 1, nope], q_pe [1, H, 1, rope], latent [1, T, r], k_pe [1, T, rope] -> [1, H, 1, v].
        """
        w_k, w_v_t = self._absorbed_weights_fp32()
        q_latent = torch.bmm(q_nope[0].float(), w_k).squeeze(1)  # [H, r]
        cached = latent[0].float()  # [T, r]
        scores = q_latent @ cached.T + q_pe[0, :, 0].float() @ k_pe[0].float().T  # [H, T]
        probs = torch.softmax(scores * self.softmax_scale, dim=-1)
        out = torch.bmm((probs @ cached).unsqueeze(1), w_v_t)  # [H, 1, v]
        return out.to(latent.dtype).unsqueeze(0)

    def _attend_absorbed(self, q_nope, q_pe, latent, k_pe, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decode: fold kv_b_proj into the query and the output, attend over the latent cache directly."""
        w = dense_weight(self.kv_b_proj, latent.dtype).view(self.heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_k, w_v = w[:, : self.nope_dim], w[:, self.nope_dim :]  # [H, nope, r], [H, v, r]
        q_latent = torch.matmul(q_nope, w_k)  # [B, H, 1, r]
        scores = torch.matmul(q_latent, latent.unsqueeze(1).mT) + torch.matmul(q_pe, k_pe.unsqueeze(1).mT)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores.float() * self.softmax_scale, dim=-1).to(latent.dtype)  # [B, H, 1, T]
        out_latent = torch.matmul(probs, latent.unsqueeze(1))  # [B, H, 1, r]
        return torch.matmul(out_latent, w_v.mT)  # [B, H, 1, v]


# ---------------------------------------------------------------------------------------------------
# Feed-forward: dense MLP, router, stacked experts


class MLP(nn.Module):
    """SwiGLU ``down(silu(gate(x)) * up(x))``: layer 0 (dense) and the shared experts."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def swiglu_weights(self) -> Expert:
        return matrix_of(self.gate_proj), matrix_of(self.up_proj), matrix_of(self.down_proj)

    def residual_block(self, x: torch.Tensor, norm: RMSNorm) -> Optional[torch.Tensor]:
        """``x + self(norm(x))`` for one bf16 token on the CPU in one kernel call; None elsewhere."""
        return ffn_block(x, norm.weight, norm.eps, shared=self.swiglu_weights())

    def kernel_args(self, norm: RMSNorm) -> Optional[list]:
        """This sub-layer for the whole-step kernel (``kernels.ffn_args``); None where it does not apply."""
        if norm.weight.dtype not in (torch.bfloat16, torch.float32) or not all(
                takes(m, norm.weight.dtype) for m in self.swiglu_weights()):
            return None
        return ffn_args(norm.weight, norm.eps, shared=self.swiglu_weights())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        fused = silu_mul(gate, up)  # bf16 rows on the CPU: one pass
        return self.down_proj(fused if fused is not None else F.silu(gate) * up)


class MoEGate(nn.Module):
    """The router. Kept in fp32 whatever the model dtype (the official code routes in fp32)."""

    keep_fp32 = True

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.method, self.scoring = config.topk_method, config.scoring_func
        self.n_group, self.topk_group = config.n_group or 1, config.topk_group or 1
        self.norm_topk_prob, self.scale = config.norm_topk_prob, config.routed_scaling_factor
        if self.method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise NotImplementedError(f"topk_method {self.method!r} is not supported")
        if self.scoring not in ("softmax", "sigmoid"):
            raise NotImplementedError(f"scoring_func {self.scoring!r} is not supported")
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        if self.method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(self.n_experts))

    def tie_free(self) -> bool:
        """Whether the selection can never tie by construction (the CPU decode kernel's routing needs it).

        Dropped groups get a score of 0 (as in the official code), which ties with other dropped experts
        and beats kept ones whenever a kept score is not above 0 (noaux_tc's biased scores can be
        negative) or top_k exceeds the experts kept; torch.topk then decides, so those stay eager.
        """
        if self.n_group == 1 or self.method == "greedy":
            return True
        per_group = self.n_experts // self.n_group
        return self.method == "group_limited_greedy" and self.top_k <= self.topk_group * per_group

    def _group_mask(self, scores: torch.Tensor, group_scores: torch.Tensor) -> torch.Tensor:
        """Zero the scores of every expert outside the ``topk_group`` best groups."""
        n = scores.shape[0]
        top_groups = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        keep = keep.unsqueeze(-1).expand(n, self.n_group, self.n_experts // self.n_group).reshape(n, -1)
        return scores.masked_fill(~keep, 0.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, D] -> (weights [N, k] fp32, expert ids [N, k])."""
        logits = linear(x.float(), self.weight)
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        n = scores.shape[0]
        if self.method == "greedy":
            weights, ids = scores.topk(self.top_k, dim=-1, sorted=False)
        elif self.method == "group_limited_greedy":
            group_scores = scores.view(n, self.n_group, -1).max(dim=-1).values
            weights, ids = self._group_mask(scores, group_scores).topk(self.top_k, dim=-1, sorted=False)
        else:  # noaux_tc: the bias steers which experts are chosen, not how much they weigh
            biased = scores + self.e_score_correction_bias.unsqueeze(0)
            group_scores = biased.view(n, self.n_group, -1).topk(2, dim=-1).values.sum(dim=-1)
            ids = self._group_mask(biased, group_scores).topk(self.top_k, dim=-1, sorted=False).indices
            weights = scores.gather(1, ids)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scale, ids


class Experts(nn.Module):
    """All routed experts of one layer as two stacked tensors (filled from ``experts.{e}.*`` at load).

    ``gate_up_proj[e]`` is ``cat(gate_proj, up_proj)`` of expert e ([2*I, D]); ``down_proj[e]`` is [D, I].
    """

    def __init__(self, n_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.n_experts, self.intermediate = n_experts, intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, intermediate))
        # CPU, weights mapped from the checkpoint: per expert (gate [I, D], up [I, D], down [D, I]) views
        # of the file instead of the stacked tensors (see model.load_state).
        self.views: Optional[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = None

    def use_views(self, views: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Compute from per-expert views and drop the stacked tensors (CPU paths only)."""
        self.views = views
        self.gate_up_proj = nn.Parameter(torch.empty(0, *self.gate_up_proj.shape[1:], dtype=views[0][0].dtype), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(0, *self.down_proj.shape[1:], dtype=views[0][0].dtype), requires_grad=False)

    def swiglu_weights(self) -> list[Expert]:
        """(gate [I, D], up [I, D], down [D, I]) of every expert as kernel matrices: views, nothing copied (made
        once)."""
        stacked = (self.gate_up_proj, self.down_proj, self.views)
        cached = self.__dict__.get("_stacked_views")
        if cached is None or any(a is not b for a, b in zip(cached[0], stacked)):
            if self.views is not None:
                matrices = [tuple([w] for w in expert) for expert in self.views]
            else:
                gate_up, down = stacked[:2]
                matrices = [([gate_up[e, : self.intermediate]], [gate_up[e, self.intermediate :]], [down[e]])
                            for e in range(self.n_experts)]
            cached = self._stacked_views = (stacked, matrices)
        return cached[1]

    def pointer_table(self) -> Optional[torch.Tensor]:
        """``kernels.expert_table`` of every expert (made once; None if the weights are not compact bf16)."""
        weights = self.swiglu_weights()
        cached = self.__dict__.get("_pointer_table")
        if cached is None or cached[0] is not weights:
            cached = self._pointer_table = (weights, expert_table(weights))
        return cached[1]

    def _expert(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """One expert's SwiGLU on the CPU: x [n, D] -> [n, D]."""
        if self.views is not None:
            gate, up, down = self.views[expert]
            return linear(F.silu(linear(x, gate)) * linear(x, up), down)
        return linear(self._swiglu(linear(x, self.gate_up_proj[expert])), self.down_proj[expert])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x: [N, D], weights/ids: [N, k] -> [N, D] = sum_k weights * expert_ids(x)."""
        n_tokens, top_k = ids.shape
        if n_tokens == 1 and not x.is_cuda:
            return self._one_token(x, weights[0].tolist(), ids[0].tolist())
        n_experts = self.n_experts
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)  # (token, slot) pairs grouped by expert
        if x.is_cuda and _grouped_mm_ok(x):
            # Counted with scatter_add (bincount would read its maximum back to the host).
            counts = torch.zeros(n_experts, dtype=torch.int32, device=x.device)
            counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
            grouped_out = self._grouped_mm(x[order // top_k], counts)
        else:
            counts = torch.bincount(flat_ids, minlength=n_experts)
            # A prompt's bf16 rows on the CPU: every expert's SwiGLU in one kernel call, where it applies.
            grouped_out = None if x.is_cuda else routed_experts_rows(x, order, counts, top_k, self.swiglu_weights(),
                                                                      self.pointer_table())
            if grouped_out is None:
                grouped_out = self._loop(x[order // top_k], counts.tolist())
        if not x.is_cuda and top_k < _SEQUENTIAL_SUM_BELOW:
            return self._weighted_sum(grouped_out, order, weights)
        out = torch.empty_like(grouped_out)
        out[order] = grouped_out
        # Weighted sum in fp32, like the official code, then back to the activation dtype.
        return (out.view(n_tokens, top_k, -1).float() * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)

    @staticmethod
    def _weighted_sum(grouped_out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """CPU: ``sum_j weights[:, j] * out[:, j]`` in fp32, choice by choice, each choice's rows gathered
        straight from the expert-grouped outputs [N*k, D] -> [N, D]. The same values as the official
        ``(out.float() * weights).sum(dim=1)``: PyTorch's CPU sum over fewer than 16 rows adds them one by
        one in order (tests/test_model.py checks it), but this never makes the [N, k, D] scatter and fp32
        copies, which took ~13 ms of each MoE layer of a 438-token prefill (tiny)."""
        n_tokens, top_k = weights.shape
        position = torch.empty_like(order)
        position[order] = torch.arange(order.numel(), device=order.device)
        position = position.view(n_tokens, top_k)
        fused = weighted_sum(grouped_out, position, weights)  # bf16: the same sums in one pass
        if fused is not None:
            return fused
        total = grouped_out.index_select(0, position[:, 0]).float() * weights[:, :1]
        for j in range(1, top_k):
            total += grouped_out.index_select(0, position[:, j]).float() * weights[:, j : j + 1]
        return total.to(grouped_out.dtype)

    def _swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return F.silu(gate) * up

    def _one_token(self, x: torch.Tensor, weights: list[float], ids: list[int]) -> torch.Tensor:
        """CPU decode: the k chosen experts straight from the stacked weights, summed in fp32."""
        out = torch.zeros(x.shape, dtype=torch.float32)
        for weight, expert in zip(weights, ids):
            out.add_(self._expert(x, expert), alpha=weight)
        return out.to(x.dtype)

    def _loop(self, grouped_x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """One matmul pair per expert that has tokens. The counts live on the host, so on CPU nothing waits."""
        out = torch.empty_like(grouped_x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            out[rows] = self._expert(grouped_x[rows], expert)
            start += count
        return out

    def _grouped_mm(self, grouped_x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """CUDA: one grouped GEMM per projection, offsets stay on the device (no host sync)."""
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        h = torch._grouped_mm(grouped_x, self.gate_up_proj.transpose(-2, -1), offs=offsets)
        return torch._grouped_mm(self._swiglu(h), self.down_proj.transpose(-2, -1), offs=offsets)


# Below this many choices per token PyTorch's CPU sum over them runs in order (its cascade sum starts its
# levels at 16 rows), so Experts._weighted_sum adds them in the same order.
_SEQUENTIAL_SUM_BELOW = 16


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    return (
        hasattr(torch, "_grouped_mm")
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


class MoE(nn.Module):
    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.gate = MoEGate(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)

    def residual_block(self, x: torch.Tensor, norm: RMSNorm) -> Optional[torch.Tensor]:
        """``x + self(norm(x))`` for one bf16/fp32 token on the CPU in one kernel call (norm, router, the
        chosen and the shared experts); None elsewhere."""
        if x.numel() != x.shape[-1] or x.is_cuda:
            return None
        kernel = self._kernel_inputs(x.dtype)
        return None if kernel is None else ffn_block(x, norm.weight, norm.eps, shared=kernel[1], router=kernel[0])

    def kernel_args(self, norm: RMSNorm) -> Optional[list]:
        """This sub-layer for the whole-step kernel (``kernels.ffn_args``); None where it does not apply."""
        kernel = self._kernel_inputs(norm.weight.dtype)
        return None if kernel is None else ffn_args(norm.weight, norm.eps, shared=kernel[1], router=kernel[0])

    def _kernel_inputs(self, dtype: torch.dtype) -> Optional[tuple[Router, Optional[Expert]]]:
        """The router (with its expert table) and shared-expert weights the CPU kernels take; None where
        the official selection could tie (see ``MoEGate.tie_free``) or the experts are not compact
        ``dtype`` (bf16 or fp32)."""
        gate = self.gate
        if dtype not in (torch.bfloat16, torch.float32) or not gate.tie_free():
            return None
        table = self.experts.pointer_table()
        first = self.experts.swiglu_weights()[0][0]
        if table is None or not takes(first, dtype):
            return None
        shared = self.shared_experts.swiglu_weights() if self.shared_experts is not None else None
        if shared is not None and (not all(takes(m, dtype) for m in shared) or matrix_format(shared[0]) != matrix_format(first)):
            return None
        kind, group = matrix_format(first)
        router = Router(
            weight=gate.weight, correction_bias=getattr(gate, "e_score_correction_bias", None), method=gate.method,
            scoring=gate.scoring, top_k=gate.top_k, n_group=gate.n_group, topk_group=gate.topk_group,
            norm_topk_prob=gate.norm_topk_prob, scale=gate.scale, expert_table=table, intermediate=self.experts.intermediate,
            format=FORMATS[kind], group=group,
        )
        return router, shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = self.gate(flat)
        y = self.experts(flat, weights, ids).view(shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


# ---------------------------------------------------------------------------------------------------
# The decoder


class DecoderLayer(nn.Module):
    def __init__(self, config: LanguageConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(config) if config.use_mla else MultiHeadAttention(config)
        if config.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        fused = self.self_attn.residual_block(x, self.input_layernorm, ctx)  # one kernel call when decoding on the CPU
        x = fused if fused is not None else x + self.self_attn(self.input_layernorm(x), ctx)
        fused = self.mlp.residual_block(x, self.post_attention_layernorm)  # likewise
        return fused if fused is not None else x + self.mlp(self.post_attention_layernorm(x))


class DeepseekV2Model(nn.Module):
    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)


class DeepseekV2ForCausalLM(nn.Module):
    """``language`` in the checkpoint: ``language.model.*`` and ``language.lm_head.weight``."""

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise NotImplementedError(f"hidden_act {config.hidden_act!r} is not supported")
        self.config = config
        self.model = DeepseekV2Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.max_seq_len, self.cache_batch, self.cache_version = 0, 0, 0

    def setup_cache(self, max_seq_len: int, batch: int = 1) -> None:
        """Preallocate every layer's cache for ``max_seq_len`` positions (reused while large enough)."""
        if max_seq_len > self.config.max_position_embeddings:
            raise ValueError(f"{max_seq_len} positions exceed the model's context of {self.config.max_position_embeddings}")
        if self.max_seq_len >= max_seq_len and self.cache_batch == batch:
            return  # stale contents are harmless: finite (zeros at allocation) and masked or overwritten
        param = self.model.embed_tokens.weight  # (the model's dtype and device, whatever the linears' format)
        attentions = [layer.self_attn for layer in self.model.layers]
        for attention in attentions:
            attention.make_cache(batch, max_seq_len, None)  # free the old cache before allocating
        # Every layer's cache in one allocation: on the CPU one of 2 MiB or more gets 2 MiB pages (the package
        # sets THP_MEM_ALLOC_ENABLE), where one layer's cache alone (tiny: 1.3 MB for 500 positions) got 4 KiB
        # pages, whose TLB misses made the decode kernel's cold read of it ~1.5x slower.
        sizes = [attention.cache_numel(batch, max_seq_len) for attention in attentions]
        storage = torch.zeros(sum(sizes), dtype=param.dtype, device=param.device)
        for attention, part in zip(attentions, storage.split(sizes)):
            attention.make_cache(batch, max_seq_len, part)
        self.max_seq_len, self.cache_batch = max_seq_len, batch
        self.cache_version += 1  # captured CUDA graphs point at the old buffers

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        start_pos: int = 0,
        use_cache: bool = False,
        last_only: bool = False,
        slot: int = 0,
    ) -> torch.Tensor:
        """inputs_embeds [B, S, D] at positions start_pos.. -> logits [B, S, V] (or [B, 1, V]) in fp32.

        ``use_cache=False``: a full causal forward over the given tokens (what the parity tests compare).
        ``use_cache=True``: keys/values of these tokens are written to the preallocated caches (slots
        ``slot``..``slot + B - 1``) and attention covers every cached position before them: a whole prompt, or
        one chunk of it after the others.
        """
        return run_steps(self.forward_steps(inputs_embeds, start_pos, use_cache, last_only, slot))

    def forward_steps(self, inputs_embeds: torch.Tensor, start_pos: int = 0, use_cache: bool = False,
                      last_only: bool = False, slot: int = 0, layers_per_step: Optional[int] = None) -> Steps[torch.Tensor]:
        """``forward`` in pieces: yields after every ``layers_per_step`` decoder layers (None: all in one piece),
        returns the logits. The serving engine runs the other requests' decode steps between the pieces of a
        prompt chunk: a pause bounded by a few layers' prefill instead of the whole chunk's, with every weight
        still read once for the chunk (a smaller chunk reads the experts again). The same operations in the
        same order as one call."""
        batch, seq = inputs_embeds.shape[:2]
        if use_cache and start_pos + seq > self.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + seq} exceed the cache ({self.max_seq_len}); call setup_cache")
        if use_cache and not 0 <= slot <= self.cache_batch - batch:
            raise ValueError(f"cache slots {slot}..{slot + batch - 1} do not exist (the cache has {self.cache_batch})")
        positions = torch.arange(start_pos, start_pos + seq, device=inputs_embeds.device)
        cos, sin = self.model.rotary(positions, inputs_embeds.dtype)
        ctx = AttentionContext(cos=cos, sin=sin, start_pos=start_pos, use_cache=use_cache, slot=slot)
        return (yield from self._decoder_steps(inputs_embeds, ctx, last_only, layers_per_step))

    def decode_step_cpu(self, token: int, position: int) -> Optional[torch.Tensor]:
        """Logits [V] (fp32) of one token at ``position`` as one kernel call on a bf16 or fp32 CPU model
        (``kernels.decode_step``: every layer, the final norm and the LM head in one parallel region, the
        same arithmetic as the per-layer kernels); None where it does not apply."""
        step = self._cpu_step()
        if step is None:
            return None
        logits = step.step(token, position)
        # The kernel found the argmax as it wrote the logits: greedy decoding reads it from here instead
        # of going over them again (generation._argmax). A copy or a view does not carry it.
        logits.known_argmax = step.last_argmax()
        return logits

    def decode_rows_cpu(self, tokens: list[int], positions: list[int], slots: list[int]) -> Optional[torch.Tensor]:
        """Logits [B, V] (fp32) of one token in each of B cache slots, as one kernel call on a bf16 or fp32
        CPU model (``DecodeStep.step_rows``: row b decodes ``tokens[b]`` at ``positions[b]`` of cache slot
        ``slots[b]``, slots distinct, every weight streamed once for all the rows). A row's logits are the
        same bit for bit whatever the other rows are, and equal ``decode_step_cpu``'s for slot 0. None where
        the kernel does not apply (as ``decode_step_cpu``); bad arguments raise RuntimeError."""
        step = self._cpu_step()
        if step is None:
            return None
        logits = step.step_rows(tokens, positions, slots)
        # Each row's argmax, found as the logits were written (see decode_step_cpu).
        logits.known_argmaxes = step.last_argmaxes()
        return logits

    def _cpu_step(self) -> Optional[Any]:
        # The kernel holds raw pointers to the weights and caches: made again when the caches are
        # reallocated (cache_version) or the weights were replaced (their storage moved).
        key = (self.cache_version, matrix_of(self.lm_head)[0].data_ptr(), self.model.embed_tokens.weight.data_ptr())
        cached = self.__dict__.get("_cpu_step_cache")
        if cached is None or cached[0] != key:
            cached = self._cpu_step_cache = (key, self._make_cpu_step())
        return cached[1]

    def _make_cpu_step(self) -> Optional[Any]:
        rotary = self.model.rotary
        embedding = self.model.embed_tokens.weight
        if embedding.device.type != "cpu" or self.max_seq_len == 0 or rotary.kind == "dynamic":
            return None
        layers = []
        for layer in self.model.layers:
            attention = layer.self_attn.kernel_args(layer.input_layernorm)
            ffn = layer.mlp.kernel_args(layer.post_attention_layernorm)
            if attention is None or ffn is None:
                return None
            kind = "mla" if isinstance(layer.self_attn, MultiHeadLatentAttention) else "mha"
            layers.append((kind, attention, ffn))
        cos, sin = rotary.table(embedding.dtype, embedding.device)
        return decode_step(embedding, cos, sin, self.model.norm.weight, self.model.norm.eps, matrix_of(self.lm_head), layers)

    def decode_rows(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, window: int) -> torch.Tensor:
        """One decode step of several sequences, with static shapes and no host sync (CUDA-graph capture).

        tokens, positions, slots: [B] long on the device, row b being token ``tokens[b]`` of the sequence in
        cache slot ``slots[b]`` at position ``positions[b]``; attention covers cache positions [0, window),
        masked after each row's position (so ``window`` > every position). Returns logits [B, V] in fp32.
        Every matrix runs once on all B rows; in MoE layers each chosen expert runs once on the rows routed
        to it.
        """
        embeds = self.model.embed_tokens(tokens.view(-1, 1))
        cos, sin = self.model.rotary.lookup(positions, embeds.dtype)
        ctx = AttentionContext(cos=cos, sin=sin, start_pos=0, use_cache=True, positions=positions.view(-1),
                               slots=slots.view(-1), window=window)
        return self._decoder(embeds, ctx, last_only=True)[:, -1]

    def _decoder(self, x: torch.Tensor, ctx: AttentionContext, last_only: bool) -> torch.Tensor:
        return run_steps(self._decoder_steps(x, ctx, last_only))

    def _decoder_steps(self, x: torch.Tensor, ctx: AttentionContext, last_only: bool,
                       layers_per_step: Optional[int] = None) -> Steps[torch.Tensor]:
        layers = self.model.layers
        for index, layer in enumerate(layers):
            x = layer(x, ctx)
            if piece_ends(index + 1, layers_per_step, len(layers)):
                yield
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x)).float()
