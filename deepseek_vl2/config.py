"""The official DeepSeek-VL2 ``config.json`` as typed dataclasses.

The file has a top level plus three nested sections (``vision_config``, ``projector_config``,
``language_config``). Keys that a section omits take the defaults of the official classes, which
matters: the base model's config leaves out ``num_hidden_layers`` (30), the head counts (32) and all
MLA dimensions, and relies on those defaults.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# All (w, h) = (m*384, n*384) with m*n <= 9, in the official order (the order breaks ties).
DEFAULT_CANDIDATE_RESOLUTIONS: list[list[int]] = [
    [384, 384], [384, 768], [768, 384], [384, 1152], [1152, 384], [384, 1536], [1536, 384],
    [768, 768], [384, 1920], [1920, 384], [384, 2304], [2304, 384], [768, 1152], [1152, 768],
    [384, 2688], [2688, 384], [384, 3072], [3072, 384], [768, 1536], [1536, 768], [384, 3456],
    [3456, 384], [1152, 1152],
]


def _from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from ``values``, ignoring keys it does not model (e.g. ``model_name``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class VisionConfig:
    """SigLIP ViT, official ``VisionEncoderConfig`` defaults for absent keys.

    Every released config.json sets ``width``/``layers``/``patch_size``/``mlp_ratio`` (SigLIP-SO400M/14:
    1152 / 27 / 14 / 3.7362); ``image_size`` and ``heads`` come from these defaults.
    """

    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    global_pool: str = "map"
    ignore_head: bool = True
    class_token: bool = False

    @property
    def grid_size(self) -> int:
        """Patches per side: 384 // 14 = 27 (the last 6 pixels of a tile are never seen)."""
        return self.image_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass
class ProjectorConfig:
    """Vision-to-language projector, official ``MlpProjectorConfig`` defaults."""

    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2


@dataclass
class LanguageConfig:
    """DeepSeek-V2 MoE decoder, official ``DeepseekV2Config`` defaults for absent keys."""

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = 32
    n_shared_experts: Optional[int] = None
    n_routed_experts: Optional[int] = None
    ep_size: int = 1
    routed_scaling_factor: float = 1.0
    kv_lora_rank: Optional[int] = 512
    q_lora_rank: Optional[int] = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "gready"  # (sic) the official default; only "greedy"/"group_limited_greedy"/"noaux_tc" route
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    num_experts_per_tok: Optional[int] = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    pad_token_id: Optional[int] = None
    bos_token_id: int = 100000
    eos_token_id: int = 100001
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    attention_bias: bool = False
    use_mla: bool = True

    @property
    def q_head_dim(self) -> int:
        """MLA query/key head width: the un-rotated part plus the rotary part (128 + 64 = 192)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def mha_head_dim(self) -> int:
        """Plain multi-head attention (tiny): Llama head width hidden / heads."""
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        """The official rule: routed experts from ``first_k_dense_replace`` on, every ``moe_layer_freq``-th layer."""
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )


@dataclass
class DeepseekVL2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    candidate_resolutions: list[list[int]] = field(
        default_factory=lambda: [list(r) for r in DEFAULT_CANDIDATE_RESOLUTIONS]
    )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DeepseekVL2Config":
        return cls(
            vision=_from_dict(VisionConfig, values.get("vision_config") or {}),
            projector=_from_dict(ProjectorConfig, values.get("projector_config") or {}),
            language=_from_dict(LanguageConfig, values.get("language_config") or {}),
            tile_tag=values.get("tile_tag", "2D"),
            global_view_pos=values.get("global_view_pos", "head"),
            candidate_resolutions=values.get("candidate_resolutions") or [list(r) for r in DEFAULT_CANDIDATE_RESOLUTIONS],
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> "DeepseekVL2Config":
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if values.get("model_type") not in (None, "deepseek_vl_v2"):
            raise ValueError(f"{path}: model_type is {values.get('model_type')!r}, expected 'deepseek_vl_v2'")
        return cls.from_dict(values)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "DeepseekVL2Config":
        return cls.from_json_file(Path(model_dir) / "config.json")
