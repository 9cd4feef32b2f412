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


# The keys that fix the parameters' shapes and that every released config.json sets. One of them absent
# takes the official default (as upstream), and the weights then cannot match: the loader names it.
SHAPE_KEYS = (
    "vision_config", "projector_config", "language_config",
    *(f"vision_config.{k}" for k in ("width", "layers", "patch_size", "mlp_ratio")),
    "projector_config.n_embed",
    *(f"language_config.{k}" for k in (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "n_routed_experts", "n_shared_experts",
        "first_k_dense_replace", "moe_layer_freq", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim",
        "qk_rope_head_dim", "v_head_dim")),
)


class ConfigError(ValueError):
    """config.json cannot describe a model; the message names the file and the key."""


def _type_problem(annotation: Any, value: Any) -> Optional[str]:
    """What is wrong with ``value`` for a field annotated ``annotation`` (None: nothing).

    Why check at all: a wrong type (``"hidden_size": "64"``) otherwise surfaces as a cryptic error deep in
    ``torch.empty``. The check is only as strict as the released configs need: an int is accepted where a
    float is expected (``rope_theta: 10000``), a bool is never taken for a number.
    """
    optional = isinstance(annotation, str) and annotation.startswith("Optional[")
    base = annotation[len("Optional["):-1] if optional else annotation
    if value is None:
        return None if optional else "must not be null"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    checks = {
        "int": (isinstance(value, int) and not isinstance(value, bool), "an integer"),
        "float": (number, "a number"),
        "bool": (isinstance(value, bool), "true or false"),
        "str": (isinstance(value, str), "a string"),
        "dict[str, Any]": (isinstance(value, dict), "an object"),
        "list[list[int]]": (isinstance(value, list) and all(isinstance(r, list) and len(r) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in r) for r in value) and bool(value),
            "a non-empty list of [width, height] pairs"),
    }
    ok, wanted = checks.get(base, (True, ""))
    return None if ok else f"must be {wanted}, got {value!r}"


def _from_dict(cls: type, values: Any, section: str = "") -> Any:
    """Build dataclass ``cls`` from ``values``, ignoring keys it does not model (e.g. ``model_name``).

    Raises ``ConfigError`` naming ``section.key`` for a value of the wrong type; keys that ``values`` lacks
    take the official defaults (listed on the result as ``defaulted``, for error messages)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{section} must be an object, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key in fields and (problem := _type_problem(fields[key].type, value)):
            raise ConfigError(f"{section + '.' if section else ''}{key} {problem}")
    result = cls(**{k: v for k, v in values.items() if k in fields})
    object.__setattr__(result, "defaulted", [f"{section}.{k}" if section else k for k in fields if k not in values])
    return result


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
class _TopLevel:
    """The top-level keys of config.json that the model reads (for their type check and defaults)."""

    tile_tag: str = "2D"
    global_view_pos: str = "head"
    candidate_resolutions: list[list[int]] = field(
        default_factory=lambda: [list(r) for r in DEFAULT_CANDIDATE_RESOLUTIONS]
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
    # A quantized checkpoint's ``quantization_config`` as written (deepseek_vl2/quantize.py reads it); None
    # for the released float checkpoints.
    quantization_config: Optional[dict[str, Any]] = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DeepseekVL2Config":
        """Raises ``ConfigError`` (naming the key) for a value of the wrong type."""
        if not isinstance(values, dict):
            raise ConfigError(f"the top level must be an object, got {type(values).__name__}")
        # (null or an empty list of resolutions: the defaults, as before)
        top = _from_dict(_TopLevel, {k: v for k, v in values.items() if k in _TopLevel.__dataclass_fields__
                                     and v is not None and v != []})
        sections = {name: values.get(name) if values.get(name) is not None else {}
                    for name in ("vision_config", "projector_config", "language_config")}
        config = cls(
            vision=_from_dict(VisionConfig, sections["vision_config"], "vision_config"),
            projector=_from_dict(ProjectorConfig, sections["projector_config"], "projector_config"),
            language=_from_dict(LanguageConfig, sections["language_config"], "language_config"),
            tile_tag=top.tile_tag,
            global_view_pos=top.global_view_pos,
            candidate_resolutions=top.candidate_resolutions,
        )
        quantization = values.get("quantization_config")
        if quantization is not None and not isinstance(quantization, dict):
            raise ConfigError("quantization_config must be an object")
        config.quantization_config = quantization
        # Keys absent from the file that took the official defaults (legitimately so for some released
        # configs): named by the loader when the weights then do not match.
        config.defaulted = [*(name for name in sections if name not in values), *config.vision.defaulted,
                            *config.projector.defaulted, *config.language.defaulted]
        return config

    @classmethod
    def from_json_file(cls, path: str | Path) -> "DeepseekVL2Config":
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be an object, got {type(values).__name__}")
        if values.get("model_type") not in (None, "deepseek_vl_v2"):
            raise ConfigError(f"{path}: model_type is {values.get('model_type')!r}, expected 'deepseek_vl_v2'")
        try:
            return cls.from_dict(values)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "DeepseekVL2Config":
        return cls.from_json_file(Path(model_dir) / "config.json")
