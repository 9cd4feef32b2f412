"""SigLIP vision tower (SigLIP-SO400M/14 at 384 px in the released models).

A plain pre-norm ViT without class token: 14-px patches (27x27 = 729 per 384-px tile), learned absolute
position embeddings, ``scaled_dot_product_attention`` (the official code needs xformers here, which has no
CPU kernel), tanh-GELU MLP and a final LayerNorm applied to every token. The checkpoint also stores a
MAP attention-pool head (``vision.attn_pool.*``); DeepSeek-VL2 never runs it (``ignore_head``), so the
loader drops those weights and they cost neither memory nor compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .kernels import biased_linear, gelu_tanh_, prepack_linear_weight, vision_attention
from .steps import Steps, piece_ends, run_steps

LAYER_NORM_EPS = 1e-6


class PatchEmbed(nn.Module):
    """A stride-p, kernel-p convolution, computed as one matmul over flattened patches.

    Same result as ``Conv2d`` (weights keep its [width, 3, p, p] shape and checkpoint name), but it runs as
    a plain GEMM on every backend: no cuDNN algorithm choice, and no silent TF32 in fp32 on CUDA.
    """

    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, (H//p)*(W//p), width], tokens in row-major patch order."""
        batch, channels, height, width = pixels.shape
        p = self.patch_size
        rows, cols = height // p, width // p  # trailing pixels that fill no whole patch are ignored
        patches = pixels[:, :, : rows * p, : cols * p].reshape(batch, channels, rows, p, cols, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, channels * p * p)
        return F.linear(patches, self.proj.weight.view(self.proj.out_channels, -1), self.proj.bias)


class BiasedLinear(nn.Linear):
    """``nn.Linear`` (same parameters and checkpoint names) through ``kernels.biased_linear``.

    ``prepack_rows``: at its first call where oneDNN can take the weight (bf16, on the CPU), it is laid out once
    (``kernels.prepack_linear_weight``, for inputs of that many rows) in place of the plain one, whose memory
    goes back to the system. The parameter then holds oneDNN's tensor (same shape and dtype)."""

    def __init__(self, in_features: int, out_features: int, prepack_rows: int = 0) -> None:
        super().__init__(in_features, out_features)
        self.prepack_rows = prepack_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepack_rows and not self.weight.is_mkldnn:
            packed = prepack_linear_weight(self.weight, self.prepack_rows)
            if packed is not None:
                self.weight = nn.Parameter(packed, requires_grad=False)
        return biased_linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, tokens: int = 0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = BiasedLinear(width, 3 * width, prepack_rows=tokens)  # rows: q | k | v
        self.proj = BiasedLinear(width, width)  # (square: slower packed, see kernels.prepack_linear_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x)
        out = vision_attention(qkv, self.heads)  # (bf16 on AMX: our kernel, ~1.6x PyTorch's flash attention)
        if out is None:
            q, k, v = qkv.view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim]; non-causal, scale 1/sqrt(head_dim)
            out = out.transpose(1, 2).reshape(batch, tokens, width)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, tokens: int = 0) -> None:
        super().__init__()
        self.fc1 = BiasedLinear(width, hidden, prepack_rows=tokens)
        self.fc2 = BiasedLinear(hidden, width, prepack_rows=tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        activated = gelu_tanh_(hidden)  # (bf16 on the CPU: in place, ~3x PyTorch's)
        return self.fc2(F.gelu(hidden, approximate="tanh") if activated is None else activated)


class Block(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)
        tile_tokens = config.grid_size**2  # (the rows of one tile: the weights are packed for them)
        self.attn = Attention(config.width, config.heads, tile_tokens)
        self.norm2 = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(config.width, config.mlp_hidden, tile_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """``vision.*`` in the checkpoint. Input: [n_tiles, 3, 384, 384]; output: [n_tiles, 729, width]."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.class_token:
            raise NotImplementedError("vision_config.class_token=true is not used by any DeepSeek-VL2 model")
        self.config = config
        self.patch_embed = PatchEmbed(config.patch_size, config.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid_size**2, config.width))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return run_steps(self.steps(pixels, len(self.blocks)))

    def steps(self, pixels: torch.Tensor, blocks_per_step: int) -> Steps[torch.Tensor]:
        """``forward`` in pieces: yields after every ``blocks_per_step`` blocks (the serving engine runs a
        decode step of the other requests there), returns [n_tiles, 729, width]. The same operations in
        the same order as one call."""
        x = self.patch_embed(pixels) + self.pos_embed
        for index, block in enumerate(self.blocks):
            x = block(x)
            if piece_ends(index + 1, blocks_per_step, len(self.blocks)):
                yield
        return self.norm(x)
