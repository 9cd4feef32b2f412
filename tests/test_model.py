"""Model construction and checkpoint loading: sizes, key mapping, errors that name the problem."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES_DIR, PROJECT_DIR
from deepseek_vl2.config import DeepseekVL2Config
from deepseek_vl2.model import CheckpointError, DeepseekVL2, load_model

REAL_CONFIGS = FIXTURES_DIR / "real-configs"


@pytest.mark.parametrize(
    "name, expected_millions",
    [("deepseek-vl2-tiny", 3_371), ("deepseek-vl2-small", 16_148), ("deepseek-vl2", 27_480)],
)
def test_real_configs_build_on_meta_with_exact_parameter_count(name: str, expected_millions: int) -> None:
    config = DeepseekVL2Config.from_json_file(REAL_CONFIGS / f"{name}.json")
    with torch.device("meta"):
        model = DeepseekVL2(config)
    params = sum(p.numel() for p in model.parameters())
    # The checkpoints also store the unused vision.attn_pool head: width*(1 + 4*width + 4 + 2*mlp) + ... ;
    # count it from its official shapes so the total is the checkpoint's.
    v = config.vision
    attn_pool = v.width + (v.width * v.width + v.width) + (2 * v.width * v.width + 2 * v.width) + (v.width * v.width + v.width) \
        + 2 * v.width + (v.mlp_hidden * v.width + v.mlp_hidden) + (v.width * v.mlp_hidden + v.width)
    assert round((params + attn_pool) / 1e6) == expected_millions


def test_layer_kinds_follow_config() -> None:
    config = DeepseekVL2Config.from_json_file(REAL_CONFIGS / "deepseek-vl2.json")
    with torch.device("meta"):
        model = DeepseekVL2(config)
    layers = model.language.model.layers
    assert type(layers[0].mlp).__name__ == "MLP" and type(layers[1].mlp).__name__ == "MoE"
    assert type(layers[0].self_attn).__name__ == "MultiHeadLatentAttention"
    assert layers[1].mlp.experts.gate_up_proj.shape == (72, 2 * 1536, 2560)
    assert layers[1].mlp.gate.e_score_correction_bias.shape == (72,)
    tiny = DeepseekVL2Config.from_json_file(REAL_CONFIGS / "deepseek-vl2-tiny.json")
    with torch.device("meta"):
        assert type(DeepseekVL2(tiny).language.model.layers[0].self_attn).__name__ == "MultiHeadAttention"


def _copy_checkpoint(tmp_path: Path, variant: str = "mha") -> Path:
    target = tmp_path / variant
    shutil.copytree(FIXTURES_DIR / "checkpoints" / variant, target)
    return target


def _rewrite(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_key_is_named(tmp_path: Path) -> None:
    model_dir = _copy_checkpoint(tmp_path)
    _rewrite(model_dir, lambda t: t.pop("language.model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing key language\.model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        load_model(model_dir)


def test_unexpected_key_is_named(tmp_path: Path) -> None:
    model_dir = _copy_checkpoint(tmp_path)
    _rewrite(model_dir, lambda t: t.__setitem__("language.model.layers.0.mlp.bogus.weight", torch.zeros(2, 2, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=r"unexpected key language\.model\.layers\.0\.mlp\.bogus\.weight"):
        load_model(model_dir)


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    model_dir = _copy_checkpoint(tmp_path)

    def shrink(t: dict) -> None:
        t["projector.layers.2.weight"] = t["projector.layers.2.weight"][:, :-1].contiguous()

    _rewrite(model_dir, shrink)
    with pytest.raises(CheckpointError, match=r"shape mismatch for projector\.layers\.2\.weight: checkpoint \[64, 63\], model \[64, 64\]"):
        load_model(model_dir)


def test_missing_files_are_named(tmp_path: Path) -> None:
    sharded = _copy_checkpoint(tmp_path, "mla-noaux")
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_model(sharded)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(FIXTURES_DIR / "checkpoints" / "mha" / "config.json", empty)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_attn_pool_weights_are_not_kept() -> None:
    model = load_model(FIXTURES_DIR / "checkpoints" / "mha")
    assert not [name for name, _ in model.named_parameters() if "attn_pool" in name]


@pytest.mark.parametrize("mmap", [False, True], ids=["copied", "mapped"])
@pytest.mark.parametrize("variant", ["mha", "mla", "mla-noaux"])
def test_experts_hold_the_checkpoint_tensors(variant: str, mmap: bool) -> None:
    model_dir = FIXTURES_DIR / "checkpoints" / variant
    model = load_model(model_dir, dtype=torch.bfloat16, mmap=mmap)
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    stored = {k: v for f in files for k, v in load_file(model_dir / f).items()}
    layer = next(i for i, l in enumerate(model.language.model.layers) if hasattr(l.mlp, "experts"))
    experts = model.language.model.layers[layer].mlp.experts
    prefix = f"language.model.layers.{layer}.mlp.experts"
    half = experts.intermediate
    assert experts.n_experts == model.config.language.n_routed_experts
    for e in range(experts.n_experts):
        if mmap:  # per-expert views of the mapped file, no stacked copy
            gate, up, down = experts.views[e]
        else:
            assert experts.views is None
            gate, up, down = experts.gate_up_proj[e, :half], experts.gate_up_proj[e, half:], experts.down_proj[e]
        assert torch.equal(gate, stored[f"{prefix}.{e}.gate_proj.weight"])
        assert torch.equal(up, stored[f"{prefix}.{e}.up_proj.weight"])
        assert torch.equal(down, stored[f"{prefix}.{e}.down_proj.weight"])
    embed = model.language.model.embed_tokens.weight
    assert torch.equal(embed, stored["language.model.embed_tokens.weight"])
    # Mapped: the embedding is a view into its file's storage; copied: a slice of the one parameter buffer.
    file_sizes = {(model_dir / f).stat().st_size for f in files}
    assert (embed.untyped_storage().nbytes() in file_sizes) == mmap
    # The router stays fp32 whatever the model dtype (the official code routes in fp32).
    assert model.language.model.layers[layer].mlp.gate.weight.dtype == torch.float32
    assert model.image_newline.dtype == torch.bfloat16


def test_mapped_and_copied_weights_give_the_same_logits() -> None:
    from PIL import Image

    from deepseek_vl2.processor import DeepseekVL2Processor

    model_dir = FIXTURES_DIR / "checkpoints" / "mla-noaux"
    processor = DeepseekVL2Processor.from_pretrained(model_dir)
    inputs = processor.process_prompt("<image>\nWhat is this?", [Image.new("RGB", (640, 480), (10, 200, 30))])
    mapped = load_model(model_dir, dtype=torch.bfloat16, mmap=True)
    copied = load_model(model_dir, dtype=torch.bfloat16, mmap=False)
    assert torch.equal(mapped.forward_logits(inputs), copied.forward_logits(inputs))


FORBIDDEN_IMPORTS = {"xformers", "timm", "torchvision", "transformers", "deepseek_vl"}


def test_package_imports_nothing_official_or_heavy() -> None:
    for path in (PROJECT_DIR / "deepseek_vl2").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN_IMPORTS, f"{path.name} imports {name}"
        assert "trust_remote_code" not in path.read_text(), path.name


def test_identical_global_and_local_tile_run_the_tower_once() -> None:
    """A 1x1-tiled image's local tile equals its global view: one tower pass, same embeddings."""
    from PIL import Image

    from deepseek_vl2.processor import DeepseekVL2Processor

    path = FIXTURES_DIR / "checkpoints" / "mha"
    processor, model = DeepseekVL2Processor.from_pretrained(path), load_model(path)
    inputs = processor.process_prompt("<image>\nWhat is this?", [Image.new("RGB", (384, 384), (10, 200, 30))])
    assert inputs.images_spatial_crop.tolist() == [[1, 1]] and inputs.pixel_values.shape[0] == 2
    seen: list[int] = []
    hook = model.vision.patch_embed.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        with torch.inference_mode():
            deduplicated = model.encode_images(inputs.pixel_values, inputs.images_spatial_crop)
    finally:
        hook.remove()
    assert seen == [1]
    with torch.inference_mode():
        full = model.projector(model.vision(inputs.pixel_values))
    side = 14
    assert torch.allclose(deduplicated[: side * (side + 1)].view(side, side + 1, -1)[:, :side].reshape(-1, full.shape[-1]), full[0], atol=1e-5)


@pytest.mark.parametrize("blocks_per_step", [1, 2, 5])
def test_the_tower_in_pieces_gives_the_same_embeddings(blocks_per_step: int) -> None:
    """prepare_inputs_embeds_steps yields between pieces of the vision tower (the serving engine's units)
    and returns exactly what prepare_inputs_embeds returns in one call."""
    from PIL import Image

    from deepseek_vl2.processor import DeepseekVL2Processor

    path = FIXTURES_DIR / "checkpoints" / "mla"
    processor, model = DeepseekVL2Processor.from_pretrained(path), load_model(path)
    inputs = processor.process_prompt("<image> and <image>", [Image.new("RGB", (700, 300), (10, 200, 30)),
                                                              Image.new("RGB", (300, 300), (200, 10, 30))])
    with torch.inference_mode():
        whole = model.prepare_inputs_embeds(inputs)
        steps = model.prepare_inputs_embeds_steps(inputs, blocks_per_step)
        pauses = 0
        while True:
            try:
                next(steps)
                pauses += 1
            except StopIteration as done:
                pieces = done.value
                break
    assert pauses == -(-model.config.vision.layers // blocks_per_step) - 1
    assert torch.equal(pieces, whole)


@pytest.mark.parametrize("mmap", [False, True], ids=["copied", "mapped"])
def test_truncated_file_is_named(tmp_path: Path, mmap: bool) -> None:
    model_dir = _copy_checkpoint(tmp_path)
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors ends before the data of"):
        load_model(model_dir, dtype=torch.bfloat16, mmap=mmap)


def test_global_view_tail_puts_the_local_tiles_first() -> None:
    """global_view_pos "tail": local tiles, separator, global view (the same pieces as "head", reordered)."""
    from PIL import Image

    from deepseek_vl2.processor import DeepseekVL2Processor

    path = FIXTURES_DIR / "checkpoints" / "mha"
    processor, model = DeepseekVL2Processor.from_pretrained(path), load_model(path)
    inputs = processor.process_prompt("<image>\nWhat is this?", [Image.new("RGB", (640, 480), (10, 200, 30))])
    with torch.inference_mode():
        head = model.encode_images(inputs.pixel_values, inputs.images_spatial_crop)
        model.config.global_view_pos = "tail"
        try:
            tail = model.encode_images(inputs.pixel_values, inputs.images_spatial_crop)
        finally:
            model.config.global_view_pos = "head"
    global_len = 14 * 15  # 14 rows of 14 tokens + newline
    assert torch.equal(tail[-global_len:], head[:global_len])
    assert torch.equal(tail[-global_len - 1], model.view_seperator)
    assert torch.equal(tail[: -global_len - 1], head[global_len + 1 :])


@pytest.mark.parametrize("kind, depth", [("identity", 1), ("linear", 1), ("mlp_gelu", 2), ("downsample_mlp_gelu", 1), ("downsample_mlp_gelu", 3)])
def test_projector_types_have_the_official_layers(kind: str, depth: int) -> None:
    from deepseek_vl2.config import ProjectorConfig
    from deepseek_vl2.projector import MlpProjector

    config = ProjectorConfig(projector_type=kind, input_dim=48, n_embed=64, depth=depth)
    projector = MlpProjector(config)
    tokens = torch.randn(2, 729, 48)
    out = projector(tokens)
    expected_tokens = 196 if kind == "downsample_mlp_gelu" else 729
    assert out.shape == (2, expected_tokens, 48 if kind == "identity" else 64)
    linears = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)]
    # The official builder: downsample_mlp_gelu always ends with GELU + Linear (2 Linears even at depth 1).
    expected = {"identity": 0, "linear": 1, "mlp_gelu": depth, "downsample_mlp_gelu": max(depth, 2)}[kind]
    assert len(linears) == expected


def test_cpu_parameters_share_one_buffer_in_module_order() -> None:
    """On the CPU every parameter is a slice of one allocation, laid out in module (decode) order."""
    from deepseek_vl2.config import DeepseekVL2Config
    from deepseek_vl2.model import build_model

    config = DeepseekVL2Config.from_pretrained(FIXTURES_DIR / "checkpoints" / "mha")
    model = build_model(config, "cpu", torch.bfloat16)
    params = list(model.parameters())
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1
    starts = [p.data_ptr() for p in params]
    assert starts == sorted(starts) and all(start % 64 == 0 for start in starts)
    ends = [p.data_ptr() + p.numel() * p.element_size() for p in params]
    assert all(end <= nxt for end, nxt in zip(ends, starts[1:]))  # no overlaps
    assert model.language.model.layers[1].mlp.gate.weight.dtype == torch.float32  # router kept fp32 in it


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("top_k", [1, 2, 6, 8, 15])
def test_the_cpu_weighted_sum_over_experts_is_the_official_sum(dtype: torch.dtype, top_k: int) -> None:
    """Experts._weighted_sum (choice by choice, gathered from the expert-grouped outputs) gives the same
    values, bit for bit, as the official scatter + ``(out.float() * weights).sum(dim=1)``."""
    from deepseek_vl2.language import Experts

    generator = torch.Generator().manual_seed(top_k)
    for n_tokens in (1, 3, 17, 438):
        ids = torch.stack([torch.randperm(64, generator=generator)[:top_k] for _ in range(n_tokens)])
        weights = torch.rand(n_tokens, top_k, generator=generator)
        order = ids.flatten().argsort(stable=True)
        grouped_out = (torch.randn(n_tokens * top_k, 96, generator=generator) * 3).to(dtype)
        out = torch.empty_like(grouped_out)
        out[order] = grouped_out
        official = (out.view(n_tokens, top_k, -1).float() * weights.unsqueeze(-1)).sum(dim=1).to(dtype)
        assert torch.equal(Experts._weighted_sum(grouped_out, order, weights), official), n_tokens
