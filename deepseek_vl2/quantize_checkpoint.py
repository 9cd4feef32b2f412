"""``python -m deepseek_vl2 quantize``: write a quantized checkpoint that loads at disk speed.

    python -m deepseek_vl2 quantize --model deepseek-ai/deepseek-vl2 --to int4 weights/deepseek-vl2-int4

Reads the source (a model directory or Hugging Face repo id, resolved as ``--model`` everywhere) tensor by
tensor, quantizes the language model's linears (``quantize.py``: int8 per channel, int4 in groups of 64,
or ``int4:N``) and writes compressed-tensors' pack-quantized safetensors shards (at most ``--shard-gb``
each, default 4) with an index, the other tensors as they are, and ``config.json`` with a
``quantization_config`` that records the scheme; the tokenizer and processor files are copied. Memory:
one shard being written plus the tensor being quantized, never the whole model.

The output goes to ``OUT_DIR.partial`` and is renamed to ``OUT_DIR`` at the end, so an interrupted run
leaves nothing that looks like a checkpoint. ``--model OUT_DIR`` / ``DEEPSEEK_VL2_WEIGHTS=OUT_DIR`` load it
(in its scheme, with no other setting), and ``cog build`` bakes it into the image like any model directory
under ``weights/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO

import torch

from .config import ConfigError, DeepseekVL2Config
from .model import CheckpointError, checkpoint_files, quantization_targets, read_tensors
from .quantize import (
    QuantizationError,
    QuantScheme,
    pack_for_file,
    parse_scheme,
    quantization_config,
    quantize_weight,
    row_chunks,
    scheme_from_config,
)

PROG = "python -m deepseek_vl2 quantize"
EXIT_BAD_INPUT = 2
# Files of a model directory besides the weights that a loader reads (tokenizer, processor, generation).
_COPIED = ("*.json", "*.model", "*.txt", "*.jinja")
_WEIGHT_FILES = ("model.safetensors.index.json",)


class QuantizeError(Exception):
    """What stops a quantization; the message is the one line shown."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Write a quantized copy of a DeepSeek-VL2 checkpoint "
                                     "(compressed-tensors pack-quantized safetensors).")
    parser.add_argument("--model", help="model directory or Hugging Face repo id (default: $DEEPSEEK_VL2_WEIGHTS, "
                        "else deepseek-ai/deepseek-vl2)")
    parser.add_argument("--to", required=True, metavar="SCHEME",
                        help="int8 (one scale per output channel), int4 (groups of 64 inputs) or int4:N")
    parser.add_argument("--shard-gb", type=float, default=4.0, help="largest safetensors file, in GB (default 4)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the new model directory (must not exist, or be empty)")
    return parser


def quantize_checkpoint(model_dir: Path, scheme: QuantScheme, out_dir: Path, shard_bytes: int = 4 * 10**9,
                        log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Write ``model_dir``'s weights quantized in ``scheme`` into ``out_dir`` (see the module docstring);
    returns {"tensors", "quantized", "bytes", "seconds"}. Raises ``QuantizeError``."""
    started = time.perf_counter()
    try:
        config_values = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        config = DeepseekVL2Config.from_dict(config_values)
        stored = scheme_from_config(config.quantization_config, str(model_dir / "config.json"))
        if stored is not None:
            raise QuantizeError(f"{model_dir} is already quantized ({stored.name}): quantize the original weights instead")
        targets = quantization_targets(config, scheme)
        files = checkpoint_files(model_dir)
    except (OSError, ValueError, ConfigError, CheckpointError, QuantizationError) as exc:
        raise QuantizeError(str(exc)) from None
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise QuantizeError(f"{out_dir} already exists and is not empty: choose a new directory")
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
    except OSError as exc:
        raise QuantizeError(f"cannot create {partial}: {exc.strerror or exc}") from None

    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    written: list[str] = []
    weight_map: dict[str, str] = {}
    total = quantized = 0
    seen: set[str] = set()

    def flush(last: bool) -> None:
        tensors = shards[-1]
        if not tensors:
            return
        from safetensors.torch import save_file

        name = f"model-{len(written) + 1:05d}.safetensors"  # (renamed to -of-N once N is known)
        save_file(tensors, str(partial / name), metadata={"format": "pt"})
        written.append(name)
        for key in tensors:
            weight_map[key] = name
        log(f"wrote {name} ({sizes[-1] / 1e9:.2f} GB)")
        if not last:
            shards.append({})
            sizes.append(0)

    def add(key: str, tensor: torch.Tensor) -> None:
        nonlocal total
        nbytes = tensor.numel() * tensor.element_size()
        if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
            flush(last=False)
        shards[-1][key] = tensor.contiguous()
        sizes[-1] += nbytes
        total += nbytes

    try:
        for key, tensor in read_tensors(files):
            seen.add(key)
            if key not in targets:
                add(key, tensor)
                continue
            if tuple(tensor.shape) != targets[key] or not tensor.is_floating_point():
                raise QuantizeError(f"{key} is {tensor.dtype} {list(tensor.shape)}, expected a float matrix {list(targets[key])}")
            matrix = key[: -len(".weight")]
            rows, cols = tensor.shape
            packed = torch.empty(rows, scheme.packed_width(cols), dtype=scheme.packed_dtype())
            scale = torch.empty(rows, scheme.groups(cols), dtype=torch.bfloat16)
            for part in row_chunks(rows, cols):
                packed[part], scale[part] = quantize_weight(tensor[part], scheme)
            add(f"{matrix}.weight_packed", pack_for_file(packed, scheme))
            add(f"{matrix}.weight_scale", scale)
            add(f"{matrix}.weight_shape", torch.tensor([rows, cols], dtype=torch.int32))
            quantized += 1
            if quantized % 200 == 0:
                log(f"quantized {quantized} of {len(targets)} matrices")
        missing = sorted(set(targets) - seen)
        if missing:
            raise QuantizeError(f"the checkpoint lacks {len(missing)} weight(s) the model needs, e.g. {missing[0]}")
        flush(last=True)
        _finish(partial, written, weight_map, total, config_values, scheme, model_dir)
        if out_dir.exists():
            _move_into(partial, out_dir)
        else:
            partial.rename(out_dir)
    except (CheckpointError, OSError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise QuantizeError(f"{exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"tensors": len(seen), "quantized": quantized, "bytes": total, "seconds": time.perf_counter() - started}


def _finish(partial: Path, written: list[str], weight_map: dict[str, str], total: int, config_values: dict[str, Any],
            scheme: QuantScheme, model_dir: Path) -> None:
    """Shard names with their count, the index, config.json with the scheme, the tokenizer/processor files."""
    renamed = {}
    for i, name in enumerate(written, start=1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        (partial / name).rename(partial / final)
        renamed[name] = final
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for pattern in _COPIED:
        for source in model_dir.glob(pattern):
            if source.name not in ("config.json", *_WEIGHT_FILES) and source.is_file():
                shutil.copy2(source, partial / source.name)
    values = dict(config_values)
    values["quantization_config"] = quantization_config(scheme)
    (partial / "config.json").write_text(json.dumps(values, indent=2) + "\n")


def _move_into(partial: Path, out_dir: Path) -> None:
    """OUT_DIR exists and is empty: move the files in, drop the partial directory."""
    for item in partial.iterdir():
        item.rename(out_dir / item.name)
    partial.rmdir()


def main(argv: Optional[Sequence[str]] = None, *, stderr: Optional[TextIO] = None) -> int:
    """Run the command; 0, or 2 with one ``error:`` line for anything that stops it."""
    stderr = stderr if stderr is not None else sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # (argparse printed its usage and the problem)
        return EXIT_BAD_INPUT if exc.code else 0

    def log(message: str) -> None:
        if not args.quiet:
            stderr.write(message + "\n")
            stderr.flush()

    from .weights import WeightsError, resolve_weights

    try:
        scheme = parse_scheme(args.to)
        if scheme is None:
            raise QuantizeError(f"--to {args.to}: choose int8 or int4")
        if not args.shard_gb > 0:
            raise QuantizeError(f"--shard-gb must be > 0, got {args.shard_gb}")
        model_dir = resolve_weights(args.model, log=log)
        out_dir = Path(args.out_dir).expanduser()
        log(f"quantizing {model_dir} to {scheme.name} into {out_dir} ...")
        result = quantize_checkpoint(Path(model_dir), scheme, out_dir, int(args.shard_gb * 1e9), log)
    except (QuantizeError, QuantizationError, WeightsError, FileNotFoundError) as exc:
        stderr.write(f"error: {' '.join(str(exc).split())}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        stderr.write("\n")
        return 130
    log(f"done: {result['quantized']} matrices quantized, {result['bytes'] / 1e9:.2f} GB in {result['seconds']:.1f} s; "
        f"load it with --model {out_dir} (or DEEPSEEK_VL2_WEIGHTS={out_dir})")
    return 0
