"""Weight-only quantization of the language model: int8 per output channel, int4 in groups along the input.

One format, two schemes, in the layout of compressed-tensors' ``pack-quantized`` (what llm-compressor
writes and vLLM reads): symmetric integers, scales in bf16, no zero points.

* ``int8``: one scale per output channel, ``scale = max|w_row| / 127.5``, ``q = clamp(round(w / scale),
  -128, 127)``.
* ``int4``: one scale per ``group_size`` (default 64) consecutive inputs of a row, ``scale = max|w_group| /
  7.5``, ``q = clamp(round(w / scale), -8, 7)``. 64 divides every quantized input width of the three
  released models (tiny's dense MLP has 6848 = 107 x 64 inputs, small's 10944 = 171 x 64; 128 divides
  neither), and finer groups are more accurate; the scales cost 0.25 bits per weight.

What is quantized: every linear of the language model (attention projections, dense MLP, shared and
routed experts, ``lm_head``). The router, the norms, the embedding, the vision tower and the projector
keep the model's dtype (the router fp32).

In memory (``QuantizedLinear``, ``QuantizedExperts``) a matrix ``[out, in]`` is ``weight_packed`` plus
``weight_scale`` (bf16 ``[out, 1]`` for int8, ``[out, in / group_size]`` for int4):

* int8: ``weight_packed`` int8 ``[out, in]``, the signed values (gpt-fast's ``WeightOnlyInt8Linear``
  layout, which PyTorch's ``_weight_int8pack_mm`` takes as it is);
* int4: ``weight_packed`` uint8 ``[out, in / 2]``, byte ``i`` holding inputs ``2i`` (low nibble) and
  ``2i + 1`` (high nibble), each ``q + 8``: exactly the bytes of pack-quantized's int32 words.

On disk (``save_quantized``): safetensors with ``<linear>.weight_packed`` (int32 ``[out, ceil(in * bits /
32)]``: values ``q + 2**(bits - 1)``, value ``j`` of a word at bits ``bits * j``), ``<linear>.weight_scale``
and ``<linear>.weight_shape`` (int32 ``[out, in]``), and ``config.json`` with a ``quantization_config``
(``quant_method: compressed-tensors``, ``format: pack-quantized``) recording the scheme.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .language import Experts, MoEGate

__all__ = [
    "QuantScheme", "QuantizationError", "parse_scheme", "scheme_from_config", "quantization_config",
    "quantize_weight", "dequantize", "QuantizedLinear", "QuantizedExperts", "quantize_modules",
    "pack_for_file", "unpack_from_file", "SCHEME_ENV", "DEFAULT_INT4_GROUP",
]

SCHEME_ENV = "DEEPSEEK_VL2_QUANTIZE"
DEFAULT_INT4_GROUP = 64
SCALE_DTYPE = torch.bfloat16


class QuantizationError(ValueError):
    """A quantization setting or checkpoint that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class QuantScheme:
    """``bits`` 8 or 4; ``group_size`` None for one scale per output channel (int8), else the inputs
    that share a scale (int4)."""

    bits: int
    group_size: Optional[int] = None

    @property
    def name(self) -> str:
        if self.bits == 8:
            return "int8"
        return "int4" if self.group_size == DEFAULT_INT4_GROUP else f"int4:{self.group_size}"

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def groups(self, in_features: int) -> int:
        """Scales per row."""
        return 1 if self.group_size is None else in_features // self.group_size

    def packed_width(self, in_features: int) -> int:
        """Bytes per row in memory."""
        return in_features if self.bits == 8 else in_features // 2

    def packed_dtype(self) -> torch.dtype:
        return torch.int8 if self.bits == 8 else torch.uint8

    def bytes_per_weight(self) -> float:
        """Bytes read per weight, scales included (what decoding streams)."""
        scale = SCALE_DTYPE.itemsize
        if self.group_size is None:
            return 1.0  # (+ one scale per row: negligible, counted by ``matrix_bytes``)
        return self.bits / 8 + scale / self.group_size

    def matrix_bytes(self, out_features: int, in_features: int) -> int:
        return out_features * (self.packed_width(in_features) + self.groups(in_features) * SCALE_DTYPE.itemsize)

    def check_shape(self, what: str, out_features: int, in_features: int) -> None:
        """Refuse a matrix this scheme cannot hold, naming it."""
        if self.group_size is not None and in_features % self.group_size:
            raise QuantizationError(
                f"{self.name} cannot quantize {what}: its {in_features} inputs are not a multiple of the group size "
                f"{self.group_size}; use int8, or int4:N with a group size N that divides {in_features}")


def parse_scheme(text: Optional[str]) -> Optional[QuantScheme]:
    """``int8``, ``int4`` (groups of 64) or ``int4:N`` (groups of N, an even number); empty/None/``none``:
    no quantization. Anything else raises ``QuantizationError`` naming the choices."""
    value = (text or "").strip().lower()
    if value in ("", "none", "bf16", "off"):
        return None
    if value == "int8":
        return QuantScheme(8)
    match = re.fullmatch(r"int4(?::(\d+))?", value)
    if match:
        group = int(match.group(1)) if match.group(1) else DEFAULT_INT4_GROUP
        if group < 2 or group % 2:
            raise QuantizationError(f"int4's group size must be an even number >= 2, got {group}")
        return QuantScheme(4, group)
    raise QuantizationError(f"unknown quantization scheme {text!r}: use int8, int4 (groups of {DEFAULT_INT4_GROUP}) "
                            "or int4:N (groups of N inputs)")


def env_scheme() -> Optional[QuantScheme]:
    """``DEEPSEEK_VL2_QUANTIZE`` (int8 / int4 / int4:N; unset: none)."""
    import os

    try:
        return parse_scheme(os.environ.get(SCHEME_ENV))
    except QuantizationError as exc:
        raise QuantizationError(f"{SCHEME_ENV}: {exc}") from None


# ---------------------------------------------------------------------------------------------------
# config.json: compressed-tensors' quantization_config

# Modules of the whole model that stay in the model's dtype: the vision tower and the projector (their
# linears are nn.Linear too), and the router (not a Linear in the official code either).
_IGNORED = ["re:^vision\\..*", "re:^projector\\..*"]


def quantization_config(scheme: QuantScheme) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json for a checkpoint written in ``scheme``."""
    weights = {
        "num_bits": scheme.bits, "type": "int", "symmetric": True, "dynamic": False, "observer": "minmax",
        "strategy": "channel" if scheme.group_size is None else "group", "group_size": scheme.group_size,
        "actorder": None, "block_structure": None,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": list(_IGNORED),
        "kv_cache_scheme": None,
    }


def scheme_from_config(values: Any, where: str = "config.json") -> Optional[QuantScheme]:
    """The scheme a ``quantization_config`` records (None when absent); ``QuantizationError`` for one this
    project cannot load, naming what differs."""
    if values is None:
        return None
    if not isinstance(values, dict):
        raise QuantizationError(f"{where}: quantization_config must be an object")
    method, fmt = values.get("quant_method"), values.get("format")
    if method != "compressed-tensors" or fmt != "pack-quantized":
        raise QuantizationError(f"{where}: quantization {method!r} / format {fmt!r} is not supported: only "
                                "compressed-tensors' pack-quantized (int8 per channel, int4 in groups), as "
                                "`python -m deepseek_vl2 quantize` writes")
    groups = values.get("config_groups") or {}
    if not isinstance(groups, dict) or len(groups) != 1:
        raise QuantizationError(f"{where}: exactly one quantization config group is supported")
    group = next(iter(groups.values()))
    weights = (group or {}).get("weights") or {}
    bits, strategy = weights.get("num_bits"), weights.get("strategy")
    if weights.get("type", "int") != "int" or not weights.get("symmetric", False) or group.get("input_activations"):
        raise QuantizationError(f"{where}: only symmetric integer weight-only quantization is supported")
    if bits == 8 and strategy == "channel":
        return QuantScheme(8)
    if bits == 4 and strategy == "group" and isinstance(weights.get("group_size"), int):
        return parse_scheme(f"int4:{weights['group_size']}")
    raise QuantizationError(f"{where}: {bits}-bit weights by {strategy!r} are not supported: int8 by channel or "
                            "int4 by group")


# ---------------------------------------------------------------------------------------------------
# The arithmetic

def quantize_weight(weight: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """A float matrix ``[out, in]`` -> (``weight_packed``, ``weight_scale``) in memory layout (module docstring).

    The scale is computed in fp32, rounded to bf16, and the values are rounded with that bf16 scale, so
    that ``q * scale`` is exactly what any reader of the file dequantizes to."""
    out_features, in_features = weight.shape
    scheme.check_shape("a weight", out_features, in_features)
    group = in_features if scheme.group_size is None else scheme.group_size
    w = weight.float().reshape(out_features, in_features // group, group)
    bound = (scheme.qmax - scheme.qmin) / 2  # 127.5 / 7.5: compressed-tensors' symmetric min-max observer
    scale = (w.abs().amax(dim=-1, keepdim=True) / bound).clamp(min=torch.finfo(torch.float32).eps).to(SCALE_DTYPE)
    q = torch.round(w / scale.float()).clamp_(scheme.qmin, scheme.qmax).to(torch.int8).reshape(out_features, in_features)
    return pack_values(q, scheme), scale.reshape(out_features, -1)


def pack_values(q: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Signed values int8 ``[out, in]`` -> ``weight_packed`` in memory."""
    if scheme.bits == 8:
        return q.contiguous()
    biased = (q.to(torch.int16) + 8).to(torch.uint8)
    return (biased[:, 0::2] | (biased[:, 1::2] << 4)).contiguous()


def unpack_values(packed: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``weight_packed`` in memory -> signed values int8 ``[out, in]``."""
    if scheme.bits == 8:
        return packed
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` as ``dtype`` (computed in fp32): ``[..., out, in]``."""
    q = unpack_values(packed, scheme)
    groups = scale.shape[-1]
    shape = q.shape
    w = q.reshape(*shape[:-1], groups, shape[-1] // groups).float() * scale.float().unsqueeze(-1)
    return w.reshape(shape).to(dtype)


def pack_for_file(packed: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Memory layout -> pack-quantized's int32 ``[out, ceil(in * bits / 32)]`` (values ``q + 2**(bits-1)``)."""
    raw = (packed.view(torch.uint8) ^ 0x80) if scheme.bits == 8 else packed  # int8: q + 128 as a byte
    pad = (-raw.shape[-1]) % 4
    if pad:
        raw = F.pad(raw, (0, pad))  # (zero nibbles/bytes; the readers cut them off by weight_shape)
    return raw.contiguous().view(torch.int32)


def unpack_from_file(words: torch.Tensor, scheme: QuantScheme, in_features: int) -> torch.Tensor:
    """pack-quantized's int32 words -> memory layout (the inverse of ``pack_for_file``)."""
    raw = words.contiguous().view(torch.uint8)[..., : scheme.packed_width(in_features)]
    return (raw ^ 0x80).view(torch.int8) if scheme.bits == 8 else raw


# ---------------------------------------------------------------------------------------------------
# Modules

class QuantizedLinear(nn.Module):
    """``y = x @ (q * scale).T + bias`` with ``weight_packed`` / ``weight_scale`` (module docstring).

    On the CPU one row (a decode step outside the whole-step kernel) goes through ``kernels.quantized_gemv``
    (our integer products where the extension is built, PyTorch's ``_weight_int8pack_mm`` for int8
    elsewhere), 2 to 64 rows (a prompt's tokens routed to one expert) through ``kernels.quantized_rows``, and
    more rows multiply the matrix dequantized per call. On CUDA int8 multiplies the int8 matrix converted to
    the activations' dtype and scales the output (gpt-fast's form, which ``torch.compile`` fuses); int4
    dequantizes per call.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme) -> None:
        super().__init__()
        scheme.check_shape(f"a {out_features}x{in_features} linear", out_features, in_features)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.weight_packed = nn.Parameter(torch.empty(out_features, scheme.packed_width(in_features),
                                                      dtype=scheme.packed_dtype()), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, scheme.groups(in_features), dtype=SCALE_DTYPE),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    keep_dtypes = ("weight_packed", "weight_scale")  # (model.materialize: these keep their own dtypes)

    def matrix(self) -> list[torch.Tensor]:
        """This weight as the kernels take it (``kernels.Matrix``): [packed, scale]."""
        return [self.weight_packed, self.weight_scale]

    def fill_random(self, generator: Optional[torch.Generator], std: float) -> None:
        fill_random(self.weight_packed, self.weight_scale, self.scheme, std, generator)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.weight_packed, self.weight_scale, self.scheme, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.matrix(), self.scheme, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"


def quantized_linear(x: torch.Tensor, matrix: list[torch.Tensor], scheme: QuantScheme,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear`` with a quantized matrix ([packed, scale]) on any device (see ``QuantizedLinear``)."""
    packed, scale = matrix
    if x.device.type == "cpu":
        few = kernels.quantized_gemv(x, packed, scale, bias) if x.numel() == x.shape[-1] else \
            kernels.quantized_rows(x, packed, scale, bias)
        if few is not None:
            return few
    if scheme.bits == 8 and x.is_cuda:  # (gpt-fast's WeightOnlyInt8Linear: fused into the matmul when compiled)
        y = F.linear(x, packed.to(x.dtype)) * scale.view(-1).to(x.dtype)
        return y if bias is None else y + bias
    weight = kernels.dequantized(packed, scale, x.dtype) if x.device.type == "cpu" else None
    return F.linear(x, weight if weight is not None else dequantize(packed, scale, scheme, x.dtype), bias)


class QuantizedExperts(Experts):
    """The routed experts of one layer, stacked and quantized: ``gate_up_packed`` / ``gate_up_scale``
    ([E, 2I, ...]: each expert's gate rows then its up rows) and ``down_packed`` / ``down_scale`` ([E, D, ...]).

    Expert e's matrices are views of the stacks; the CPU kernels take them through ``pointer_table`` (six
    pointers per expert: gate, up, down and their scales), the PyTorch paths dequantize the experts that
    received tokens, per call."""

    keep_dtypes = ("gate_up_packed", "gate_up_scale", "down_packed", "down_scale")

    def __init__(self, n_experts: int, hidden: int, intermediate: int, scheme: QuantScheme) -> None:
        nn.Module.__init__(self)
        scheme.check_shape(f"the experts' gate/up ({intermediate}x{hidden})", intermediate, hidden)
        scheme.check_shape(f"the experts' down ({hidden}x{intermediate})", hidden, intermediate)
        self.n_experts, self.intermediate, self.hidden, self.scheme = n_experts, intermediate, hidden, scheme
        self.views = None

        def stack(rows: int, cols: int) -> tuple[nn.Parameter, nn.Parameter]:
            packed = torch.empty(n_experts, rows, scheme.packed_width(cols), dtype=scheme.packed_dtype())
            scale = torch.empty(n_experts, rows, scheme.groups(cols), dtype=SCALE_DTYPE)
            return nn.Parameter(packed, requires_grad=False), nn.Parameter(scale, requires_grad=False)

        self.gate_up_packed, self.gate_up_scale = stack(2 * intermediate, hidden)
        self.down_packed, self.down_scale = stack(hidden, intermediate)

    def expert_matrices(self, expert: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """(gate, up, down) of one expert as [packed, scale] views."""
        i = self.intermediate
        return ([self.gate_up_packed[expert, :i], self.gate_up_scale[expert, :i]],
                [self.gate_up_packed[expert, i:], self.gate_up_scale[expert, i:]],
                [self.down_packed[expert], self.down_scale[expert]])

    def fill_random(self, generator: Optional[torch.Generator], std: float) -> None:
        fill_random(self.gate_up_packed, self.gate_up_scale, self.scheme, std, generator)
        fill_random(self.down_packed, self.down_scale, self.scheme, std, generator)

    def swiglu_weights(self) -> list:
        stacks = (self.gate_up_packed, self.down_packed)
        cached = self.__dict__.get("_matrix_views")
        if cached is None or cached[0][0] is not stacks[0] or cached[0][1] is not stacks[1]:
            cached = self._matrix_views = (stacks, [self.expert_matrices(e) for e in range(self.n_experts)])
        return cached[1]

    def pointer_table(self) -> Optional[torch.Tensor]:
        weights = self.swiglu_weights()
        cached = self.__dict__.get("_pointer_table")
        if cached is None or cached[0] is not weights:
            cached = self._pointer_table = (weights, kernels.expert_table(weights))
        return cached[1]

    def _expert(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        gate, up, down = self.expert_matrices(expert)
        linear = lambda x, m: quantized_linear(x, m, self.scheme)  # noqa: E731
        return linear(F.silu(linear(x, gate)) * linear(x, up), down)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # (no grouped GEMM on quantized stacks: the experts with tokens, one by one)
            n_tokens, top_k = ids.shape
            flat_ids = ids.flatten()
            order = flat_ids.argsort(stable=True)
            counts = torch.bincount(flat_ids, minlength=self.n_experts)
            grouped_out = self._loop(x[order // top_k], counts.tolist())
            out = torch.empty_like(grouped_out)
            out[order] = grouped_out
            return (out.view(n_tokens, top_k, -1).float() * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)
        return super().forward(x, weights, ids)


def quantize_modules(language: nn.Module, scheme: QuantScheme) -> None:
    """Replace, in place, every ``Linear`` of the language model with a ``QuantizedLinear`` and every
    ``Experts`` with ``QuantizedExperts`` (on the meta device, before the parameters are allocated: the
    router, norms and embedding are left as they are). Raises ``QuantizationError`` naming a matrix whose
    shape the scheme cannot hold."""
    for name, module in list(language.named_modules()):
        for child_name, child in list(module.named_children()):
            where = f"language.{name}.{child_name}".replace("..", ".")
            if isinstance(child, Experts) and not isinstance(child, QuantizedExperts):
                try:
                    replacement: nn.Module = QuantizedExperts(child.n_experts, child.gate_up_proj.shape[-1],
                                                              child.intermediate, scheme)
                except QuantizationError as exc:
                    raise QuantizationError(f"{where}: {exc}") from None
            elif isinstance(child, nn.Linear) and not isinstance(child, MoEGate):
                try:
                    replacement = QuantizedLinear(child.in_features, child.out_features, child.bias is not None, scheme)
                except QuantizationError as exc:
                    raise QuantizationError(f"{where}: {exc}") from None
            else:
                continue
            setattr(module, child_name, replacement)


def quantized_targets(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every quantized module of a model."""
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedExperts)):
            yield name, module


def model_scheme(model: nn.Module) -> Optional[QuantScheme]:
    """The scheme a loaded model's language weights are in (None: not quantized)."""
    for _, module in quantized_targets(model):
        return module.scheme
    return None


def row_chunks(rows: int, cols: int, budget_bytes: int = 64 << 20) -> Iterator[slice]:
    """Row ranges of a matrix whose fp32 copies stay within ``budget_bytes`` (quantizing a 129k-row LM head
    whole took 1.3 GB of temporaries for base)."""
    step = max(1, budget_bytes // max(1, 4 * cols))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def quantize_into(weight: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme) -> None:
    """Quantize a float matrix into existing ``packed`` / ``scale`` tensors (views of the model's), a bounded
    number of rows at a time."""
    rows, cols = weight.shape
    for part in row_chunks(rows, cols):
        q, s = quantize_weight(weight[part], scheme)
        packed[part].copy_(q)
        scale[part].copy_(s)


def fill_random(packed: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme, std: float,
                generator: Optional[torch.Generator]) -> None:
    """Random quantized weights whose values spread like N(0, std) weights: uniform integers over the whole
    range (int8: bytes of -128..127; int4: nibbles, i.e. -8..7) and one scale for all, std / their spread.
    A random model is then built directly in the quantized format, without a float copy (base in int4 is
    14 GB where its bf16 weights are 55 GB)."""
    levels = 1 << scheme.bits
    spread = math.sqrt((levels * levels - 1) / 12)  # of uniform integers over `levels` values
    # Copied from one block of random bytes at random offsets: drawing every byte afresh takes ~3.7 s per GB
    # here, longer than a benchmark of base's 14 GB.
    block = _random_bytes(generator)
    flat = packed.reshape(-1).view(torch.uint8)
    half = block.numel() // 2
    done = 0
    while done < flat.numel():
        n = min(half, flat.numel() - done)
        offset = int(torch.randint(0, block.numel() - n + 1, (1,), generator=generator))
        flat[done : done + n].copy_(block[offset : offset + n])
        done += n
    scale.fill_(std / spread)


_BLOCKS: dict[int, torch.Tensor] = {}


def _random_bytes(generator: Optional[torch.Generator], size: int = 1 << 24) -> torch.Tensor:
    key = id(generator)
    if key not in _BLOCKS:
        _BLOCKS.clear()
        _BLOCKS[key] = torch.empty(size, dtype=torch.uint8).random_(0, 256, generator=generator)
    return _BLOCKS[key]
