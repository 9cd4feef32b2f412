#!/usr/bin/env python3
"""One row through one matrix, every way this project could run it on the CPU: GB/s of weights read.

    python scripts/bench_linears.py [--rounds 7] [--threads N] [--json]

For decode-sized matrices (an expert's gate or down of tiny, tiny's LM head, a large square), in bf16
activations: PyTorch's ``F.linear`` on bf16 weights, our bf16 row product (``gemv_bf16``), PyTorch's
``_weight_int8pack_mm`` on int8 weights, our int8 products (``gemv_q_bf16``), PyTorch's
``_weight_int4pack_mm_for_cpu`` on int4 weights in its own packing, and our int4 products. Each is timed
as the fastest of ``--rounds`` calls, the ways taken in turns (a VM's memory speed drifts from one second to
the next); the read probe of the same run says what the memory allows. The figures say where PyTorch's own
ops reach the memory and where ours were needed (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepseek_vl2 import bounds, kernels  # noqa: E402
from deepseek_vl2.quantize import dequantize, parse_scheme, quantize_weight, unpack_values  # noqa: E402

SHAPES = {"expert gate 896x1280": (896, 1280), "expert down 1280x896": (1280, 896),
          "LM head 129280x1280": (129280, 1280), "square 8192x8192": (8192, 8192)}


def int4pack_for_cpu(packed: torch.Tensor, scale: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our int4 matrix in the layout of PyTorch's CPU int4 op: values 0..15 (q + 8) packed by
    ``_convert_weight_to_int4pack_for_cpu``, and [groups, out, 2] scales and zeros (w = (q - 8) * scale)."""
    q = unpack_values(packed, parse_scheme(f"int4:{group}")).to(torch.int32) + 8
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales_zeros = torch.stack([scale.float().T, torch.zeros_like(scale.float().T)], dim=-1).to(torch.bfloat16).contiguous()
    return weight, scales_zeros


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    extension = kernels.avx512_bf16_extension()
    if extension is None:
        raise SystemExit(f"needs our bf16 kernels: {kernels.unavailable_reason('bf16')}")
    torch.manual_seed(0)
    results: dict[str, dict[str, float]] = {}
    probe = bounds.measure_memory_bandwidth(1.0)
    for label, (rows, cols) in SHAPES.items():
        weight = torch.randn(rows, cols) * 0.02
        x = torch.randn(1, cols).bfloat16()
        dense = weight.bfloat16()
        int8 = list(quantize_weight(weight, parse_scheme("int8")))
        int4 = list(quantize_weight(weight, parse_scheme("int4")))
        int4_torch = int4pack_for_cpu(*int4, 64)
        reference = F.linear(x.float(), dequantize(*int4, parse_scheme("int4")))
        check = torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4_torch[0], 64, int4_torch[1]).float()
        assert torch.allclose(check, reference, rtol=0.05, atol=0.05 * reference.abs().max().item()), label
        ways = {
            "torch F.linear bf16": (lambda: F.linear(x, dense), rows * cols * 2),
            "ours bf16": (lambda: extension.gemv_bf16(x, dense, None), rows * cols * 2),
            "torch _weight_int8pack_mm": (lambda: torch.ops.aten._weight_int8pack_mm(x, int8[0], int8[1].view(-1)),
                                          rows * cols + rows * 2),
            "ours int8": (lambda: extension.gemv_q_bf16(x, int8, None), rows * cols + rows * 2),
            "torch _weight_int4pack_mm_for_cpu": (
                lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4_torch[0], 64, int4_torch[1]),
                rows * cols // 2 + rows * cols // 64 * 4),
            "ours int4": (lambda: extension.gemv_q_bf16(x, int4, None), rows * cols // 2 + rows * cols // 64 * 2),
        }
        best = {name: float("inf") for name in ways}
        for name, (run, _) in ways.items():
            run()  # (warm-up)
        for _ in range(args.rounds):
            for name, (run, _) in ways.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
        results[label] = {name: ways[name][1] / best[name] / 1e9 for name in ways}
        if not args.json:
            print(f"{label}:", ", ".join(f"{name} {gbs:.1f}" for name, gbs in results[label].items()), "GB/s", flush=True)
    summary = {"read_probe_gbs": probe, "threads": torch.get_num_threads(), "gbs": results}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"(read probe {probe:.1f} GB/s, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
