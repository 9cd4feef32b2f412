"""The DeepSeek-VL2 model and its checkpoint loader.

``DeepseekVL2`` joins the three parts with the checkpoint's own names: ``vision`` (SigLIP tower),
``projector`` (2x2 downsample MLP), ``image_newline`` / ``view_seperator`` (sic, the checkpoint's
spelling) and ``language`` (DeepSeek-V2 MoE decoder). Images become embeddings in the 2-D tile layout
and are scattered into the text embeddings at the ``<image>`` positions.

``load_model`` reads official checkpoints unchanged (single file or sharded safetensors, official key
names): the model is built on the meta device, every parameter is allocated once in the target dtype
on the target device, and each tensor is read from the file straight into it (no second copy of the
weights, no pickles). Missing keys, unexpected keys and wrong shapes are reported by name.

With a quantization scheme (``quantize.py``) the language model's linears are built quantized and a
float checkpoint is quantized while it loads, tensor by tensor (never the whole model in 16 bits); a
checkpoint written by ``python -m deepseek_vl2 quantize`` loads as it is stored.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import torch
from torch import nn

from .config import SHAPE_KEYS, DeepseekVL2Config
from .language import DeepseekV2ForCausalLM, Experts, RotaryEmbedding
from .projector import MlpProjector
from .quantize import (
    QuantizationError,
    QuantizedExperts,
    QuantizedLinear,
    QuantScheme,
    parse_scheme,
    quantize_into,
    quantize_modules,
    scheme_from_config,
    unpack_from_file,
)
from .steps import Steps, run_steps
from .vision import VisionTransformer


class ImageInputs(Protocol):
    """What the model needs from the processor's output (``processor.ProcessedInputs``)."""

    input_ids: torch.Tensor  # [T]
    images_seq_mask: torch.Tensor  # [T] bool
    pixel_values: torch.Tensor  # [n_tiles, 3, H, W]
    images_spatial_crop: torch.Tensor  # [n_images, 2] = (width tiles, height tiles)


def tile_sources(pixel_values: torch.Tensor, images_spatial_crop: torch.Tensor) -> list[int]:
    """For each tile, the tile whose tower output it takes: itself, or (an image tiled 1x1, whose local tile
    equals its global view) the global view. ``len(set(...))`` tiles go through the vision tower."""
    source = list(range(pixel_values.shape[0]))
    tile = 0
    for n_wide, n_high in images_spatial_crop.view(-1, 2).tolist():
        if n_wide == 0 or n_high == 0:
            break
        if n_wide * n_high == 1 and torch.equal(pixel_values[tile], pixel_values[tile + 1]):
            source[tile + 1] = tile
        tile += 1 + n_wide * n_high
    return source


class DeepseekVL2(nn.Module):
    def __init__(self, config: DeepseekVL2Config) -> None:
        super().__init__()
        if config.tile_tag != "2D":
            raise NotImplementedError(f"tile_tag {config.tile_tag!r}: only the released '2D' layout is supported")
        if config.global_view_pos not in ("head", "tail"):
            raise ValueError(f"global_view_pos must be 'head' or 'tail', not {config.global_view_pos!r}")
        self.config = config
        self.vision = VisionTransformer(config.vision)
        self.projector = MlpProjector(config.projector)
        width = config.projector.n_embed
        self.image_newline = nn.Parameter(torch.empty(width))
        self.view_seperator = nn.Parameter(torch.empty(width))
        self.language = DeepseekV2ForCausalLM(config.language)

    @property
    def device(self) -> torch.device:
        return self.image_newline.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_newline.dtype

    # --- images -------------------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor, images_spatial_crop: torch.Tensor) -> torch.Tensor:
        """All tiles of all images -> their image-token embeddings in sequence order, [n_image_tokens, D].

        pixel_values: [n_tiles, 3, 384, 384], per image the global view then its local tiles row by row.
        Per image the layout is: global view as h rows of (w tokens + newline), the view separator, then
        the local tiles stitched into (nh*h) rows of (nw*w tokens + newline) (global last for "tail").
        """
        return run_steps(self.encode_images_steps(pixel_values, images_spatial_crop, self.config.vision.layers))

    def encode_images_steps(self, pixel_values: torch.Tensor, images_spatial_crop: torch.Tensor,
                            blocks_per_step: int) -> Steps[torch.Tensor]:
        """``encode_images`` in pieces of ``blocks_per_step`` vision blocks (see ``VisionTransformer.steps``)."""
        features = yield from self._tile_features_steps(pixel_values.to(self.device, self.dtype), images_spatial_crop,
                                                        blocks_per_step)
        n_tiles, tokens, width = features.shape
        side = int(tokens**0.5)
        grid = features.view(n_tiles, side, side, width)
        pieces: list[torch.Tensor] = []
        tile = 0
        for n_wide, n_high in images_spatial_crop.tolist():
            if n_wide == 0 or n_high == 0:
                break
            global_view = self._with_newlines(grid[tile])
            local = grid[tile + 1 : tile + 1 + n_wide * n_high]  # [(nh nw), h, w, D], row-major tiles
            local = local.view(n_high, n_wide, side, side, width).permute(0, 2, 1, 3, 4)
            local_view = self._with_newlines(local.reshape(n_high * side, n_wide * side, width))
            separator = self.view_seperator[None]
            if self.config.global_view_pos == "head":
                pieces += [global_view, separator, local_view]
            else:
                pieces += [local_view, separator, global_view]
            tile += 1 + n_wide * n_high
        if tile != n_tiles:
            raise ValueError(f"images_spatial_crop describes {tile} tiles but {n_tiles} were given")
        return torch.cat(pieces)

    def _tile_features(self, pixel_values: torch.Tensor, images_spatial_crop: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector over all tiles, [n_tiles, h*w, D] (``_tile_features_steps`` in one go)."""
        return run_steps(self._tile_features_steps(pixel_values, images_spatial_crop, self.config.vision.layers))

    def _tile_features_steps(self, pixel_values: torch.Tensor, images_spatial_crop: torch.Tensor,
                             blocks_per_step: int) -> Steps[torch.Tensor]:
        """Vision tower + projector over all tiles, [n_tiles, h*w, D], each distinct tile computed once.

        An image tiled 1x1 (any image whose best resolution is a single 384 tile, and every image when
        a conversation has more than two) has a local tile identical to its global view: the tower runs
        on one copy, which halves the vision time of such images.
        """
        source = tile_sources(pixel_values, images_spatial_crop)
        unique = sorted(set(source))
        if len(unique) == len(source):
            return self.projector((yield from self.vision.steps(pixel_values, blocks_per_step)))
        features = self.projector((yield from self.vision.steps(pixel_values[unique], blocks_per_step)))
        position = {t: i for i, t in enumerate(unique)}
        return features[[position[s] for s in source]]

    def _with_newlines(self, rows: torch.Tensor) -> torch.Tensor:
        """[rows, cols, D] -> [rows * (cols + 1), D] with ``image_newline`` closing every row."""
        newline = self.image_newline.view(1, 1, -1).expand(rows.shape[0], 1, -1)
        return torch.cat([rows, newline], dim=1).flatten(0, 1)

    def prepare_inputs_embeds(self, inputs: ImageInputs) -> torch.Tensor:
        """Text embeddings with every image position replaced by the image embeddings, [1, T, D]."""
        return run_steps(self.prepare_inputs_embeds_steps(inputs, self.config.vision.layers))

    def prepare_inputs_embeds_steps(self, inputs: ImageInputs, blocks_per_step: int) -> Steps[torch.Tensor]:
        """``prepare_inputs_embeds`` in pieces of ``blocks_per_step`` vision blocks (the serving engine's
        units: the other requests decode between them)."""
        input_ids = inputs.input_ids.to(self.device).view(-1)
        embeds = self.language.model.embed_tokens(input_ids)
        mask = inputs.images_seq_mask.to(self.device).view(-1).bool()
        n_image_positions = int(mask.sum())
        crops = inputs.images_spatial_crop
        has_images = inputs.pixel_values is not None and inputs.pixel_values.shape[0] > 0 and int(crops.sum()) > 0
        if has_images:
            image_embeds = yield from self.encode_images_steps(inputs.pixel_values, crops.view(-1, 2), blocks_per_step)
            if image_embeds.shape[0] != n_image_positions:
                raise ValueError(
                    f"the prompt has {n_image_positions} image-token positions but the images give "
                    f"{image_embeds.shape[0]} embeddings"
                )
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), image_embeds.to(embeds.dtype))
        elif n_image_positions:
            raise ValueError(f"the prompt has {n_image_positions} image-token positions but no image")
        return embeds.unsqueeze(0)

    @torch.inference_mode()
    def forward_logits(self, inputs: ImageInputs) -> torch.Tensor:
        """One full causal forward over the prompt (no cache): logits [T, V] in fp32."""
        return self.language(self.prepare_inputs_embeds(inputs))[0]


# ---------------------------------------------------------------------------------------------------
# Loading


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names every missing / unexpected / misshapen key."""


# Stored by the official checkpoints but never run (ignore_head=True): skipped, no memory, no compute.
IGNORED_KEYS = re.compile(r"^vision\.attn_pool\.")

_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class _Slot:
    """Where one checkpoint tensor goes: a parameter (``owner.<name>``), or one expert's matrix; for a
    quantized matrix (``kind`` other than "tensor"), the float weight to quantize into ``target`` and
    ``scale`` ("weight"), or the stored form's parts ("weight_packed", "weight_scale", "weight_shape")."""

    target: torch.Tensor  # the parameter, or the expert's slice of the stacked parameter (quantized: the packed values)
    shape: tuple[int, ...]
    owner: nn.Module
    name: str  # parameter name in ``owner``; for experts "gate_proj" / "up_proj" / "down_proj"
    expert: Optional[int] = None
    kind: str = "tensor"
    scale: Optional[torch.Tensor] = None  # quantized: the scales (view)
    matrix: str = ""  # quantized: the checkpoint name of the matrix (its key without the part)


def _quantized_slots(key: str, packed: torch.Tensor, scale: torch.Tensor, out_features: int, in_features: int,
                     scheme: QuantScheme, owner: nn.Module, name: str, expert: Optional[int] = None) -> dict[str, _Slot]:
    """The keys a quantized matrix takes: its float ``.weight`` (quantized while loading) or the stored parts."""
    words = -(-in_features * scheme.bits // 32)
    common = dict(owner=owner, name=name, expert=expert, scale=scale, matrix=key)
    return {
        f"{key}.weight": _Slot(packed, (out_features, in_features), kind="weight", **common),
        f"{key}.weight_packed": _Slot(packed, (out_features, words), kind="weight_packed", **common),
        f"{key}.weight_scale": _Slot(packed, tuple(scale.shape), kind="weight_scale", **common),
        f"{key}.weight_shape": _Slot(packed, (2,), kind="weight_shape", **common),
    }


def _checkpoint_slots(model: DeepseekVL2) -> dict[str, _Slot]:
    """Map every official checkpoint key to the (view of the) parameter that holds it."""
    slots: dict[str, _Slot] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, QuantizedLinear):
            slots.update(_quantized_slots(module_name, module.weight_packed.data, module.weight_scale.data,
                                          module.out_features, module.in_features, module.scheme, module, "weight"))
            if module.bias is not None:
                slots[prefix + "bias"] = _Slot(module.bias.data, tuple(module.bias.shape), module, "bias")
            continue
        if isinstance(module, QuantizedExperts):
            for e in range(module.n_experts):
                for name, (packed, scale) in zip(("gate_proj", "up_proj", "down_proj"), module.expert_matrices(e)):
                    rows, cols = (module.hidden, module.intermediate) if name == "down_proj" else (module.intermediate, module.hidden)
                    slots.update(_quantized_slots(f"{prefix}{e}.{name}", packed.data, scale.data, rows, cols, module.scheme,
                                                  module, name, e))
            continue
        if isinstance(module, Experts):
            half = module.intermediate
            for e in range(module.gate_up_proj.shape[0]):
                key = f"{prefix}{e}."
                gate_up, down = module.gate_up_proj.data[e], module.down_proj.data[e]
                slots[key + "gate_proj.weight"] = _Slot(gate_up[:half], tuple(gate_up[:half].shape), module, "gate_proj", e)
                slots[key + "up_proj.weight"] = _Slot(gate_up[half:], tuple(gate_up[half:].shape), module, "up_proj", e)
                slots[key + "down_proj.weight"] = _Slot(down, tuple(down.shape), module, "down_proj", e)
            continue
        for name, param in module.named_parameters(recurse=False):
            slots[prefix + name] = _Slot(param.data, tuple(param.shape), module, name)
    return slots


def _read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > 100 * 2**20:
            raise CheckpointError(f"{path} is not a safetensors file (header length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    return header, 8 + header_len


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: by the index when sharded, else model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise CheckpointError(f"{model_dir} holds pickled weights (.bin/.pt); only safetensors are loaded")
    raise CheckpointError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")


def _read_into(f, offset: int, nbytes: int, stored_dtype: torch.dtype, target: torch.Tensor) -> None:
    """Read one stored tensor into ``target`` (a parameter view), converting dtype/device as needed."""
    f.seek(offset)
    if target.dtype == stored_dtype and target.device.type == "cpu" and target.is_contiguous():
        view = target.view(torch.uint8).numpy()  # only floating-point tensors get here
        if f.readinto(memoryview(view).cast("B")) != nbytes:
            raise CheckpointError(f"{f.name} ends early")
        return
    buffer = bytearray(nbytes)
    if f.readinto(buffer) != nbytes:
        raise CheckpointError(f"{f.name} ends early")
    stored = torch.frombuffer(buffer, dtype=stored_dtype).view(target.shape)
    target.copy_(stored)


def load_state(model: DeepseekVL2, files: Iterable[Path], progress: Optional[Callable[[int, int], None]] = None,
               mmap: bool = False) -> None:
    """Fill every parameter of ``model`` from safetensors ``files``; raise ``CheckpointError`` on mismatch.

    ``mmap``: a CPU tensor stored in the dtype the model wants is not copied at all: the parameter becomes
    a view of the file, mapped copy-on-write. The page cache already holds a freshly read or downloaded
    checkpoint, so loading then costs no second copy and no new memory (on this VM, first-touching fresh
    memory alone runs at ~1.5 GB/s); routed experts stay per-expert views (``Experts.use_views``).

    Quantized matrices (``QuantizedLinear``, ``QuantizedExperts``) take either the float ``<matrix>.weight``,
    read into a buffer of its own (not mapped: the mapped pages would stay resident) and quantized in row
    chunks into the model's packed values, or the stored ``weight_packed`` / ``weight_scale`` /
    ``weight_shape`` of a quantized checkpoint.
    """
    slots = _checkpoint_slots(model)
    files = list(files)
    headers = [(path, *_read_safetensors_header(path)) for path in files]
    total = sum(end - start for _, header, _ in headers for start, end in (h["data_offsets"] for h in header.values()))
    problems: list[str] = []
    seen: set[str] = set()
    quantized_parts: dict[str, set[str]] = {slot.matrix: set() for slot in slots.values() if slot.kind != "tensor"}
    expert_views: dict[Experts, dict[tuple[int, str], tuple[torch.Tensor, _Slot]]] = {}
    done = 0
    for path, header, data_start in headers:
        file_size = path.stat().st_size
        mapped = None
        if mmap:
            mapped = torch.from_file(str(path), shared=False, size=file_size, dtype=torch.uint8)
            _read_ahead(path)
        with open(path, "rb") as f:
            for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, end = info["data_offsets"]
                if IGNORED_KEYS.match(key):
                    continue
                slot = slots.get(key)
                if slot is None:
                    problems.append(f"unexpected key {key} (in {path.name})")
                    continue
                shape = tuple(info["shape"])
                if shape != slot.shape:
                    problems.append(f"shape mismatch for {key}: checkpoint {list(shape)}, model {list(slot.shape)}")
                    continue
                stored_dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
                expected = _STORED_KINDS.get(slot.kind, "a floating-point tensor")
                integer_part = slot.kind in ("weight_packed", "weight_shape")
                if stored_dtype is None or stored_dtype == torch.bool or stored_dtype.is_floating_point == integer_part \
                        or (slot.kind == "weight_packed" and stored_dtype != torch.int32):
                    problems.append(f"{key} has dtype {info['dtype']}, expected {expected}")
                    continue
                offset = data_start + start
                if data_start + end > file_size:
                    problems.append(f"{path.name} ends before the data of {key} (truncated file?)")
                    continue
                if slot.kind != "tensor":
                    problem = _load_quantized_part(f, offset, end - start, stored_dtype, shape, slot, key)
                    if problem:
                        problems.append(problem)
                        continue
                    quantized_parts[slot.matrix].add(slot.kind)
                    seen.add(key)
                    done += end - start
                    if progress:
                        progress(done, total)
                    continue
                view = None
                if mapped is not None and _mappable(slot.target, stored_dtype, offset):
                    view = mapped[offset : data_start + end].view(stored_dtype).view(shape)
                if view is None:
                    _read_into(f, offset, end - start, stored_dtype, slot.target)
                elif slot.expert is None:
                    slot.owner._parameters[slot.name] = nn.Parameter(view, requires_grad=False)
                else:
                    expert_views.setdefault(slot.owner, {})[(slot.expert, slot.name)] = (view, slot)
                seen.add(key)
                done += end - start
                if progress:
                    progress(done, total)
    for experts, views in expert_views.items():
        if len(views) == 3 * experts.n_experts:
            experts.use_views([tuple(views[e, name][0] for name in ("gate_proj", "up_proj", "down_proj")) for e in range(experts.n_experts)])
        else:  # only some were mappable: copy those into the stacked tensors like the rest
            for view, slot in views.values():
                slot.target.copy_(view)
    missing = sorted(key for key, slot in slots.items() if slot.kind == "tensor" and key not in seen)
    for matrix, parts in sorted(quantized_parts.items()):
        if "weight" not in parts and not {"weight_packed", "weight_scale"} <= parts:
            missing.append(f"{matrix}.weight" if not parts else f"{matrix}.{'weight_scale' if 'weight_packed' in parts else 'weight_packed'}")
    problems += [f"missing key {key}" for key in missing]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(shown))


_STORED_KINDS = {"weight_packed": "int32 (packed values)", "weight_shape": "an integer tensor"}


def _read_tensor(f, offset: int, nbytes: int, stored_dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """One stored tensor, read into memory of its own."""
    f.seek(offset)
    buffer = bytearray(nbytes)
    if f.readinto(buffer) != nbytes:
        raise CheckpointError(f"{f.name} ends early")
    return torch.frombuffer(buffer, dtype=stored_dtype).view(shape) if nbytes else torch.empty(shape, dtype=stored_dtype)


def _load_quantized_part(f, offset: int, nbytes: int, stored_dtype: torch.dtype, shape: tuple[int, ...], slot: _Slot,
                         key: str) -> Optional[str]:
    """One tensor of a quantized matrix into the model (see ``load_state``); a problem to report, or None."""
    stored = _read_tensor(f, offset, nbytes, stored_dtype, shape)
    scheme: QuantScheme = slot.owner.scheme
    out_features, in_features = slot.target.shape[0], slot.target.shape[-1] * 8 // scheme.bits
    if slot.kind == "weight":
        quantize_into(stored, slot.target, slot.scale, scheme)
    elif slot.kind == "weight_packed":
        slot.target.copy_(unpack_from_file(stored, scheme, in_features))
    elif slot.kind == "weight_scale":
        slot.scale.copy_(stored)
    else:  # weight_shape: what the stored matrix was
        if [int(v) for v in stored.tolist()] != [out_features, in_features]:
            return f"{key} says {stored.tolist()}, the model's matrix is [{out_features}, {in_features}]"
    return None


def read_tensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of every tensor of safetensors ``files``, in file order, each read into memory of its own
    (never the whole checkpoint at once); ``CheckpointError`` for a file that is not safetensors or ends early."""
    for path in files:
        header, data_start = _read_safetensors_header(path)
        with open(path, "rb") as f:
            for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, end = info["data_offsets"]
                dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise CheckpointError(f"{path.name}: {key} has dtype {info['dtype']}, which this loader does not read")
                yield key, _read_tensor(f, data_start + start, end - start, dtype, tuple(info["shape"]))


def quantization_targets(config: DeepseekVL2Config, scheme: QuantScheme) -> dict[str, tuple[int, int]]:
    """The float checkpoint keys (``<matrix>.weight``) that ``scheme`` quantizes, with their (out, in), from a
    model on the meta device; ``QuantizationError`` names a matrix the scheme cannot hold."""
    with torch.device("meta"):
        model = DeepseekVL2(config)
        quantize_modules(model.language, scheme)
    return {key: slot.shape for key, slot in _checkpoint_slots(model).items() if slot.kind == "weight"}


def _read_ahead(path: Path) -> None:
    """Ask the kernel to pull a mapped file into the page cache in the background, so that the first
    request does not fault weights in from disk one page at a time (no-op where unsupported)."""
    if hasattr(os, "posix_fadvise"):
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)


def _mappable(target: torch.Tensor, stored_dtype: torch.dtype, offset: int) -> bool:
    return target.device.type == "cpu" and target.dtype == stored_dtype and offset % target.element_size() == 0


def _target_dtype(module: nn.Module, name: str, param: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    if name in getattr(module, "keep_dtypes", ()):  # (quantized values and their scales)
        return param.dtype
    return torch.float32 if getattr(module, "keep_fp32", False) and dtype != torch.float64 else dtype


def materialize(model: nn.Module, device: torch.device | str, dtype: torch.dtype, init: Optional[Callable[[torch.Tensor], None]] = None) -> None:
    """Give every meta parameter real (uninitialised, or ``init``-filled) storage, once, in its final dtype.

    On the CPU all parameters are views of one allocation, laid out in module order (layer by layer, as
    decoding reads them). Decoding streams ~1 GB of weights per token in 2-5 MB pieces, and pieces that
    are neighbours in memory stream faster than separate allocations: measured on a 2-core EPYC, 2 MiB
    matrices read back to back at 42-44 GB/s as separate allocations but 53-58 GB/s as slices of one
    buffer (the machine's sequential read rate was 62-65 GB/s at the time).
    """
    device = torch.device(device)
    slots = []  # (module, name, shape, dtype, bytes)
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                target = _target_dtype(module, name, param, dtype)
                slots.append((module, name, param.shape, target, math.prod(param.shape) * target.itemsize))
    arena = None
    if device.type == "cpu":
        arena = torch.empty(sum(_aligned(nbytes) for *_, nbytes in slots), dtype=torch.uint8, device=device)
    offset = 0
    for module, name, shape, target, nbytes in slots:
        if arena is not None:
            data = arena[offset : offset + nbytes].view(target).view(shape)
            offset += _aligned(nbytes)
        else:
            data = torch.empty(shape, dtype=target, device=device)
        if init is not None and name not in getattr(module, "keep_dtypes", ()):
            init(data)
        module._parameters[name] = nn.Parameter(data, requires_grad=False)
    for module in model.modules():
        fill_quantized = getattr(init, "fill_quantized", None)
        if fill_quantized is not None and isinstance(module, (QuantizedLinear, QuantizedExperts)):
            fill_quantized(module)
        if isinstance(module, RotaryEmbedding):  # its buffer was computed on meta: recompute for real
            module.register_buffer("inv_freq", _fresh_inv_freq(module, device), persistent=False)


def _aligned(nbytes: int, alignment: int = 64) -> int:
    return (nbytes + alignment - 1) // alignment * alignment


def _fresh_inv_freq(rotary: RotaryEmbedding, device: torch.device) -> torch.Tensor:
    with torch.device(device):
        return RotaryEmbedding(rotary.config).inv_freq


def build_model(config: DeepseekVL2Config, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                init: Optional[Callable[[torch.Tensor], None]] = None,
                quantize: Optional[QuantScheme | str] = None) -> DeepseekVL2:
    """The model with allocated (uninitialised or ``init``-filled) parameters, no second copy anywhere; with
    ``quantize`` (a scheme or its name) its language linears in that scheme (``quantize.quantize_modules``:
    raises ``QuantizationError`` naming a matrix the scheme cannot hold)."""
    if isinstance(quantize, str):
        quantize = parse_scheme(quantize)
    with torch.device("meta"):
        model = DeepseekVL2(config)
        if quantize is not None:
            quantize_modules(model.language, quantize)
    materialize(model, device, dtype, init)
    return model.eval()


def checkpoint_scheme(config: DeepseekVL2Config, asked: Optional[QuantScheme | str], where: str = "the checkpoint"
                      ) -> Optional[QuantScheme]:
    """The scheme to build the model in: the one asked for, or the checkpoint's own (its config.json's
    ``quantization_config``). A quantized checkpoint asked for another scheme raises ``QuantizationError``."""
    if isinstance(asked, str):
        asked = parse_scheme(asked)
    stored = scheme_from_config(config.quantization_config, f"{where}/config.json")
    if stored is not None and asked is not None and stored != asked:
        raise QuantizationError(f"{where} is quantized as {stored.name} and cannot be loaded as {asked.name}: leave "
                                f"the scheme unset (or set it to {stored.name}), or quantize the original weights to "
                                f"{asked.name}")
    return asked or stored


def load_model(model_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               progress: Optional[Callable[[int, int], None]] = None, mmap: Optional[bool] = None,
               quantize: Optional[QuantScheme | str] = None) -> DeepseekVL2:
    """Load an official DeepSeek-VL2 model directory (config.json + safetensors) for inference.

    ``mmap`` (default: on for the CPU, unless ``DEEPSEEK_VL2_MMAP=0``): weights already in the wanted
    dtype are used in place from the mapped files instead of being copied (see ``load_state``).
    ``quantize`` (a ``QuantScheme`` or its name: int8, int4): the language model's linears in that scheme,
    quantized while loading; a checkpoint written quantized loads in its own scheme (``checkpoint_scheme``).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    config = DeepseekVL2Config.from_pretrained(model_dir)
    scheme = checkpoint_scheme(config, quantize, str(model_dir))
    files = checkpoint_files(model_dir)
    model = build_model(config, device, dtype, quantize=scheme)
    if mmap is None:
        mmap = torch.device(device).type == "cpu" and os.environ.get("DEEPSEEK_VL2_MMAP", "1") != "0"
    try:
        load_state(model, files, progress, mmap=mmap)
    except CheckpointError as exc:
        # A key missing from config.json is the likeliest cause of misshapen weights: say which.
        defaulted = set(getattr(config, "defaulted", ()))
        absent = [key for key in SHAPE_KEYS if key in defaulted and key.split(".")[0] not in defaulted - {key}]
        if absent and "shape mismatch" in str(exc):
            raise CheckpointError(
                f"{model_dir / 'config.json'} lacks {', '.join(absent)}, which every released config sets; "
                f"the official defaults do not match the weights. {exc}") from None
        raise
    return model


class RandomInit:
    """An ``init`` for ``build_model``: matrices ~ N(0, std); vectors (norm weights, biases) ~ N(1, std);
    quantized matrices uniform integers with the scale that gives them the same spread (``fill_random``)."""

    def __init__(self, std: float = 0.02, seed: int = 0) -> None:
        self.std = std
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, t: torch.Tensor) -> None:
        if t.device.type != "cpu":
            t.normal_(1.0 if t.dim() == 1 else 0.0, self.std)
        else:
            t.normal_(1.0 if t.dim() == 1 else 0.0, self.std, generator=self.generator)

    def fill_quantized(self, module: nn.Module) -> None:
        """A quantized module's values and scales (``materialize`` skips them in ``__call__``)."""
        module.fill_random(self.generator, self.std)


def random_init(std: float = 0.02, seed: int = 0) -> RandomInit:
    return RandomInit(std, seed)
