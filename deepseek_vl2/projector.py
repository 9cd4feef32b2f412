"""Vision-to-language projector (``projector.*``).

The released models use ``downsample_mlp_gelu``: the 27x27 grid of vision tokens is zero-padded to
28x28 (bottom row, right column) and every 2x2 block is flattened *channel-major* (feature index
``c*4 + di*2 + dj``, which is what ``F.unfold`` produces), giving 14x14 = 196 tokens of 4*1152 features,
then ``Linear -> GELU(erf) -> Linear`` into the language model's width. The other projector types of the
official config space are supported too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ProjectorConfig


def _mlp(in_features: int, hidden: int, out_features: int, depth: int) -> nn.Sequential:
    """Linear, then (depth-1) x [GELU, Linear]: indices 0, 2, 4, ... match the checkpoint's ``layers.N``."""
    modules: list[nn.Module] = [nn.Linear(in_features, hidden if depth > 1 else out_features)]
    for i in range(1, depth):
        modules += [nn.GELU(), nn.Linear(hidden, out_features if i == depth - 1 else hidden)]
    return nn.Sequential(*modules)


class MlpProjector(nn.Module):
    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        kind = config.projector_type
        hidden = config.n_embed * config.mlp_ratio
        if kind == "identity":
            self.layers = nn.Identity()
        elif kind == "linear":
            self.layers = nn.Linear(config.input_dim, config.n_embed)
        elif kind == "mlp_gelu":
            self.layers = _mlp(config.input_dim, config.n_embed, config.n_embed, config.depth)
        elif kind == "downsample_mlp_gelu":
            ratio = config.downsample_ratio
            # The official builder always ends with GELU + Linear, so depth 1 also has two Linears.
            depth = max(config.depth, 2)
            self.layers = _mlp(config.input_dim * ratio * ratio, hidden, config.n_embed, depth)
        else:
            raise NotImplementedError(f"projector_type {kind!r} is not a DeepSeek-VL2 projector")

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """[B, h*w, C] -> [B, ceil(h/r)*ceil(w/r), C*r*r] (2x2 blocks, channel-major features)."""
        batch, tokens, channels = x.shape
        side = math.isqrt(tokens)
        ratio = self.config.downsample_ratio
        pad = (ratio - side % ratio) % ratio
        x = x.view(batch, side, side, channels)
        if pad:
            x = F.pad(x, (0, 0, 0, pad, 0, pad))
        x = F.unfold(x.permute(0, 3, 1, 2), kernel_size=ratio, stride=ratio)  # [B, C*r*r, blocks]
        return x.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.projector_type == "downsample_mlp_gelu":
            x = self.downsample(x)
        return self.layers(x)
