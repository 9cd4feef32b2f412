"""Will it fit: the memory a model needs on a device (weights, cache, working memory) against what is free.

Loading a model that does not fit used to end in a CUDA out-of-memory traceback (or, on the CPU, the
kernel's OOM killer) half-way through the weights. ``check_fits`` says so before anything is loaded, in
one sentence: the model, the memory it needs and what for, the memory there is.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import torch

from . import bounds
from .config import DeepseekVL2Config

if TYPE_CHECKING:
    from .quantize import QuantScheme

GB = 1e9

# Memory beyond weights and cache: activations of a prefill chunk and of the vision tower on a 3x3-tiled
# image, the logits, allocator slack; on a GPU also cuBLAS/Triton workspaces and CUDA graphs' pools.
WORKING_BYTES = {"cuda": 2 * 2**30, "cpu": 1 * 2**30}


class DoesNotFitError(RuntimeError):
    """The model needs more memory than the device has free."""


def memory_budget(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes on ``device``: the GPU's free memory, or the CPU's available memory (page cache
    that can be dropped included). ``DEEPSEEK_VL2_MEMORY_BUDGET_GB`` caps the free figure (leave memory to
    other processes; try the fit check)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
    else:
        free, total = _meminfo("MemAvailable"), _meminfo("MemTotal")
        if free is None or total is None:  # (not Linux: no figure, no check)
            free = total = 2**62
    budget = os.environ.get("DEEPSEEK_VL2_MEMORY_BUDGET_GB", "").strip()
    if budget:
        try:
            free = min(free, int(float(budget) * GB))
        except ValueError:
            raise ValueError(f"DEEPSEEK_VL2_MEMORY_BUDGET_GB must be a number of gigabytes, got {budget!r}") from None
    return int(free), int(total)


def _meminfo(field: str) -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cache_bytes_per_request(config: DeepseekVL2Config, dtype: torch.dtype, context: Optional[int] = None) -> int:
    """One request's cache over the whole context (every layer): the engine's slot."""
    context = context or config.language.max_position_embeddings
    return bounds.kv_cache_bytes(config, context, dtype)


def check_fits(name: str, parts: dict[str, int], device: torch.device) -> None:
    """Raise ``DoesNotFitError`` when the ``parts`` (what -> bytes) together exceed the free memory."""
    device = torch.device(device)
    free, total = memory_budget(device)
    needed = sum(parts.values())
    if needed <= free:
        return
    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    detail = " + ".join(f"{what} {size / GB:.1f} GB" for what, size in parts.items())
    advice = ("a GPU with more memory (see the README's GPU table), a smaller model, or fewer requests at once "
              "(DEEPSEEK_VL2_MAX_CONCURRENCY)" if device.type == "cuda" else
              "a machine with more memory, a smaller model, or fewer requests at once (DEEPSEEK_VL2_MAX_CONCURRENCY)")
    raise DoesNotFitError(
        f"{name} does not fit on {where}: it needs about {needed / GB:.1f} GB ({detail}), and {free / GB:.1f} GB of "
        f"{total / GB:.1f} GB is free. Use {advice}."
    )


def check_model_fits(name: str, config: DeepseekVL2Config, device: torch.device, dtype: torch.dtype,
                     scheme: Optional["QuantScheme"] = None) -> None:
    """Before loading: the weights in ``dtype`` (the language model's linears in ``scheme``), one request's
    cache and working memory must fit."""
    device = torch.device(device)
    check_fits(name, {
        f"weights{f' in {scheme.name}' if scheme is not None else ''}": bounds.weight_bytes(config, dtype, scheme=scheme),
        "cache for one request": cache_bytes_per_request(config, dtype),
        "working memory": WORKING_BYTES.get(device.type, WORKING_BYTES["cpu"]),
    }, device)
