#!/usr/bin/env python3
"""Create a small DeepSeek-VL2 model directory with random weights, in the official layout.

Everything is made here, offline: ``config.json`` (official keys: top level + ``vision_config`` +
``projector_config`` + ``language_config``), bf16 ``model.safetensors`` with the official state-dict
key names (or shards plus ``model.safetensors.index.json``), ``processor_config.json``, and a
byte-level BPE ``tokenizer.json`` trained with the ``tokenizers`` library, with the DeepSeek-VL2
special tokens, plus ``tokenizer_config.json`` and ``special_tokens_map.json``.

The geometry that the processor and the vision tower depend on is the real one (384 px tiles,
14 px patches, 2x2 projector downsample); only widths and depths are small, so the model runs in
a second on a CPU. Its answers are gibberish: the weights are random.

    python scripts/make_random_checkpoint.py demo-model                 # MHA (like -tiny)
    python scripts/make_random_checkpoint.py out --attention mla --shards 2
    python scripts/make_random_checkpoint.py out --config some/config.json   # any official config
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepseek_vl2.config import DEFAULT_CANDIDATE_RESOLUTIONS as CANDIDATE_RESOLUTIONS  # noqa: E402
from deepseek_vl2.config import DeepseekVL2Config  # noqa: E402
from deepseek_vl2.processor import (  # noqa: E402
    ASSISTANT_ROLE,
    DEFAULT_BOS as BOS,
    DEFAULT_EOS as EOS,
    DEFAULT_IMAGE_TOKEN as IMAGE,
    DEFAULT_PAD as PAD,
    GROUNDING_TOKENS,
    USER_ROLE,
)

ROLE_TOKENS = [USER_ROLE, ASSISTANT_ROLE]


# --------------------------------------------------------------------------------------------
# config.json


def demo_config(vocab_size: int, bos_id: int, eos_id: int, attention: str = "mha") -> dict[str, Any]:
    """A tiny config in the official key layout (tiny-like MHA, or small-like MLA)."""
    language: dict[str, Any] = {
        "model_type": "deepseek_v2",
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 2,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "max_position_embeddings": 4096,
        "vocab_size": vocab_size,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-06,
        "torch_dtype": "bfloat16",
        "lm_head": True,
        "rm_head": False,
        "q_lora_rank": None,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
    }
    if attention == "mha":
        language.update(use_mla=False, kv_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0)
    elif attention == "mla":
        language.update(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    else:
        raise ValueError(f"attention must be 'mha' or 'mla', not {attention!r}")
    return {
        "model_type": "deepseek_vl_v2",
        "tile_tag": "2D",
        "global_view_pos": "head",
        "candidate_resolutions": CANDIDATE_RESOLUTIONS,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.38.2",
        "vision_config": {
            "layers": 2,
            "mlp_ratio": 3.7362,
            "model_name": "siglip_so400m_patch14_384",
            "model_type": "vision",
            "patch_size": 14,
            "width": 48,
            "heads": 4,
        },
        "projector_config": {"model_type": "mlp_projector", "n_embed": 64, "input_dim": 48},
        "language_config": language,
    }


def processor_config() -> dict[str, Any]:
    return {
        "add_special_token": False,
        "candidate_resolutions": CANDIDATE_RESOLUTIONS,
        "downsample_ratio": 2,
        "ignore_id": -100,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_token": IMAGE,
        "mask_prompt": False,
        "normalize": True,
        "pad_token": PAD,
        "patch_size": 14,
        "processor_class": "DeepseekVLV2Processor",
        "sft_format": "deepseek",
    }


# --------------------------------------------------------------------------------------------
# State dict layout


def param_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Official state-dict key -> shape for an official ``config.json`` dict (absent keys: official defaults)."""
    cfg = DeepseekVL2Config.from_dict(config)
    vis, proj, lang = cfg.vision, cfg.projector, cfg.language
    shapes: dict[str, tuple[int, ...]] = {}
    d_model = lang.hidden_size
    n_embed = proj.n_embed
    width, hidden = vis.width, vis.mlp_hidden
    grid = vis.image_size // vis.patch_size

    shapes["image_newline"] = (n_embed,)
    shapes["view_seperator"] = (n_embed,)  # (sic) the official spelling

    # SigLIP vision tower; the attention-pool head is stored although inference never runs it.
    shapes["vision.pos_embed"] = (1, grid * grid, width)
    shapes["vision.patch_embed.proj.weight"] = (width, 3, vis.patch_size, vis.patch_size)
    shapes["vision.patch_embed.proj.bias"] = (width,)
    for i in range(vis.layers):
        p = f"vision.blocks.{i}."
        for norm in ("norm1", "norm2"):
            shapes[p + norm + ".weight"] = (width,)
            shapes[p + norm + ".bias"] = (width,)
        shapes[p + "attn.qkv.weight"] = (3 * width, width)
        shapes[p + "attn.qkv.bias"] = (3 * width,)
        shapes[p + "attn.proj.weight"] = (width, width)
        shapes[p + "attn.proj.bias"] = (width,)
        shapes[p + "mlp.fc1.weight"] = (hidden, width)
        shapes[p + "mlp.fc1.bias"] = (hidden,)
        shapes[p + "mlp.fc2.weight"] = (width, hidden)
        shapes[p + "mlp.fc2.bias"] = (width,)
    shapes["vision.norm.weight"] = (width,)
    shapes["vision.norm.bias"] = (width,)
    if vis.global_pool == "map":
        p = "vision.attn_pool."
        shapes[p + "latent"] = (1, 1, width)
        shapes[p + "q.weight"] = (width, width)
        shapes[p + "q.bias"] = (width,)
        shapes[p + "kv.weight"] = (2 * width, width)
        shapes[p + "kv.bias"] = (2 * width,)
        shapes[p + "proj.weight"] = (width, width)
        shapes[p + "proj.bias"] = (width,)
        shapes[p + "norm.weight"] = (width,)
        shapes[p + "norm.bias"] = (width,)
        shapes[p + "mlp.fc1.weight"] = (hidden, width)
        shapes[p + "mlp.fc1.bias"] = (hidden,)
        shapes[p + "mlp.fc2.weight"] = (width, hidden)
        shapes[p + "mlp.fc2.bias"] = (width,)

    # Projector: Linear(input_dim * r * r -> n_embed), GELU, then (depth - 1) x Linear(n_embed -> n_embed).
    r = proj.downsample_ratio
    shapes["projector.layers.0.weight"] = (n_embed, proj.input_dim * r * r)
    shapes["projector.layers.0.bias"] = (n_embed,)
    for k in range(1, proj.depth):
        shapes[f"projector.layers.{2 * k}.weight"] = (n_embed, n_embed)
        shapes[f"projector.layers.{2 * k}.bias"] = (n_embed,)

    # Language model.
    vocab = lang.vocab_size
    shapes["language.model.embed_tokens.weight"] = (vocab, d_model)
    heads = lang.num_attention_heads
    for i in range(lang.num_hidden_layers):
        p = f"language.model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d_model,)
        shapes[p + "post_attention_layernorm.weight"] = (d_model,)
        a = p + "self_attn."
        if lang.use_mla:
            q_dim = heads * lang.q_head_dim
            if lang.q_lora_rank is None:
                shapes[a + "q_proj.weight"] = (q_dim, d_model)
            else:
                shapes[a + "q_a_proj.weight"] = (lang.q_lora_rank, d_model)
                shapes[a + "q_a_layernorm.weight"] = (lang.q_lora_rank,)
                shapes[a + "q_b_proj.weight"] = (q_dim, lang.q_lora_rank)
            shapes[a + "kv_a_proj_with_mqa.weight"] = (lang.kv_lora_rank + lang.qk_rope_head_dim, d_model)
            shapes[a + "kv_a_layernorm.weight"] = (lang.kv_lora_rank,)
            shapes[a + "kv_b_proj.weight"] = (heads * (lang.qk_nope_head_dim + lang.v_head_dim), lang.kv_lora_rank)
            shapes[a + "o_proj.weight"] = (d_model, heads * lang.v_head_dim)
        else:
            head_dim = d_model // heads
            kv_dim = lang.kv_heads * head_dim
            shapes[a + "q_proj.weight"] = (heads * head_dim, d_model)
            shapes[a + "k_proj.weight"] = (kv_dim, d_model)
            shapes[a + "v_proj.weight"] = (kv_dim, d_model)
            shapes[a + "o_proj.weight"] = (d_model, heads * head_dim)
        m = p + "mlp."
        if lang.is_moe_layer(i):
            inter = lang.moe_intermediate_size
            shapes[m + "gate.weight"] = (lang.n_routed_experts, d_model)
            if lang.topk_method == "noaux_tc":
                shapes[m + "gate.e_score_correction_bias"] = (lang.n_routed_experts,)
            for e in range(lang.n_routed_experts):
                _swiglu(shapes, f"{m}experts.{e}.", d_model, inter)
            if lang.n_shared_experts:
                _swiglu(shapes, m + "shared_experts.", d_model, inter * lang.n_shared_experts)
        else:
            _swiglu(shapes, m, d_model, lang.intermediate_size)
    shapes["language.model.norm.weight"] = (d_model,)
    shapes["language.lm_head.weight"] = (vocab, d_model)
    return shapes


def _swiglu(shapes: dict[str, tuple[int, ...]], prefix: str, d_model: int, inter: int) -> None:
    shapes[prefix + "gate_proj.weight"] = (inter, d_model)
    shapes[prefix + "up_proj.weight"] = (inter, d_model)
    shapes[prefix + "down_proj.weight"] = (d_model, inter)


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, Any]:
    """bf16 tensors: ones for norm scales, zeros for biases, N(0, 0.02) elsewhere (pos-embed, routers included)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        module, _, leaf = name.rpartition(".")
        if leaf in ("bias", "e_score_correction_bias"):
            t = torch.zeros(shape)
        elif leaf == "weight" and "norm" in module.rpartition(".")[2]:
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=gen) * 0.02
        out[name] = t.to(torch.bfloat16).contiguous()
    return out


def save_weights(state: dict[str, Any], out_dir: Path, shards: int = 1) -> list[str]:
    """Write ``model.safetensors``, or ``shards`` files plus the index, as Hugging Face does."""
    from safetensors.torch import save_file

    names = list(state)
    if shards <= 1:
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    per = -(-len(names) // shards)
    files, weight_map = [], {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[k * per:(k + 1) * per]}
        save_file(part, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        files.append(fname)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


# --------------------------------------------------------------------------------------------
# Tokenizer

_WORDS = (
    "a an the this that these those image picture photo scene view of in on at with and or but "
    "is are was were be has have shows show showing contains describe describes detail details "
    "left right top bottom middle center front back behind above below near far next to between "
    "red green blue yellow black white gray orange purple brown pink dark light bright "
    "cat dog bird horse giraffe person people man woman child car bus tree house sky cloud road "
    "water river mountain table chair book cup phone screen sign text chart graph line bar "
    "one two three four five many some several small large big tall short wide long round square "
    "standing sitting walking running looking holding wearing parked flying growing "
    "what where who how why which count color colour object objects box boxes stage stages "
    "answer question please find locate ground grounding the giraffe at the back"
).split()


def _corpus(seed: int, n_lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        words[0] = words[0].capitalize()
        line = " ".join(words) + rng.choice([".", "?", "!", ",", ":", ";"])
        if rng.random() < 0.2:
            line += f" [[{rng.randint(0, 999)}, {rng.randint(0, 999)}, {rng.randint(0, 999)}, {rng.randint(0, 999)}]]"
        if rng.random() < 0.1:
            line = line + "\n\n" + line.lower()
        lines.append(line)
    lines.append("0123456789 ()[]{}<>-_=+*/\\|'\"`~@#$%^&  \t\n")
    return lines


def build_tokenizer(vocab_size: int = 1200, seed: int = 0):
    """Byte-level BPE with the DeepSeek pre-tokenizer; bos/eos/pad at 0/1/2, other specials appended."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.Split(Regex("[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"), behavior="isolated"),
        pre_tokenizers.Split(
            Regex(r"[\r\n]|\s?\p{L}+|\s?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"), behavior="isolated"
        ),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    tok.add_special_tokens([IMAGE, *GROUNDING_TOKENS, *ROLE_TOKENS])
    return tok


def tokenizer_config(tok) -> dict[str, Any]:
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in (BOS, EOS, PAD, IMAGE, *GROUNDING_TOKENS, *ROLE_TOKENS)
    }
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ROLE_TOKENS,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 16384,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizerFast",
        "use_default_system_prompt": False,
    }


def special_tokens_map() -> dict[str, Any]:
    return {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": ROLE_TOKENS}


# --------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_checkpoint(
    out_dir: Path,
    *,
    attention: str = "mha",
    config: dict[str, Any] | None = None,
    shards: int = 1,
    seed: int = 0,
) -> Path:
    """Write a complete random model directory into ``out_dir`` and return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(seed=seed)
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    if config is None:
        padded = -(-(n_tok + 40) // 64) * 64  # the model's vocabulary is padded, as in the real checkpoints
        config = demo_config(padded, tok.token_to_id(BOS), tok.token_to_id(EOS), attention)
    elif config["language_config"].get("vocab_size", 102400) < n_tok:
        raise SystemExit(f"config vocab_size is smaller than the tokenizer ({n_tok})")
    tok.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(tok))
    _write_json(out_dir / "special_tokens_map.json", special_tokens_map())
    _write_json(out_dir / "processor_config.json", processor_config())
    _write_json(out_dir / "config.json", config)
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    save_weights(random_state_dict(param_shapes(config), seed), out_dir, shards)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, nargs="?", default=ROOT / "demo-model")
    parser.add_argument("--attention", choices=["mha", "mla"], default="mha",
                        help="mha: plain multi-head attention like -tiny; mla: latent attention like -small")
    parser.add_argument("--config", type=Path, help="use this official config.json instead of the built-in tiny one")
    parser.add_argument("--shards", type=int, default=1, help="number of safetensors shards (>1 writes an index)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = json.loads(args.config.read_text()) if args.config else None
    out = make_checkpoint(args.out_dir, attention=args.attention, config=config, shards=args.shards, seed=args.seed)
    print(f"wrote random checkpoint to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
