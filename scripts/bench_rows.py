#!/usr/bin/env python
"""Time the CPU whole-step decode kernel with several rows (sequences) per step.

Builds the language model of a config with random weights of its real shape (no checkpoint, no vision
tower), gives it caches of ``max(rows)`` slots, and times ``DecodeStep.step_rows`` with 1, 2, 4, ... rows
at once (row b in slot b, each at its own position). Row counts are timed in turns, round after round,
so that a change of the shared machine's memory speed hits every row count alike; each figure is the
median over all rounds. ``--single`` also times ``step()`` (one row in slot 0, the serial decode path).

    python scripts/bench_rows.py --config /work/shared/fixtures/real-configs/deepseek-vl2-tiny.json
    python scripts/bench_rows.py --config .../deepseek-vl2-small.json --layers 4 --dtype float32

With ``--json`` the last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import deepseek_vl2  # noqa: E402,F401  (first: it sets the allocator's huge-page hint before torch loads)
import torch  # noqa: E402

from deepseek_vl2.bounds import batch_step_bytes, experts_touched  # noqa: E402
from deepseek_vl2.config import DeepseekVL2Config  # noqa: E402
from deepseek_vl2.hardware import parse_dtype  # noqa: E402
from deepseek_vl2.language import DeepseekV2ForCausalLM  # noqa: E402
from deepseek_vl2.model import materialize  # noqa: E402
from deepseek_vl2.quantize import parse_scheme, quantize_modules  # noqa: E402
from scripts.benchmark import CpuContention, fast_random_init, reduced_config  # noqa: E402


def log(message: str) -> None:
    print(f"[bench_rows] {message}", file=sys.stderr, flush=True)


def build_language(config: DeepseekVL2Config, dtype: torch.dtype, scheme: Optional[str] = None) -> DeepseekV2ForCausalLM:
    """The language model of ``config``, random weights, on the CPU (its linears in ``scheme`` if given)."""
    with torch.device("meta"):
        language = DeepseekV2ForCausalLM(config.language)
        if scheme:
            quantize_modules(language, parse_scheme(scheme))
    materialize(language, "cpu", dtype, fast_random_init())
    return language.eval()


def time_steps(run, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="config.json of the model to build")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (same widths)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 or float32")
    p.add_argument("--quantize", default=None, metavar="SCHEME", help="int8 or int4: the linears in that scheme")
    p.add_argument("--rows", default="1,2,4,8,16", help="row counts to time, comma-separated")
    p.add_argument("--position", type=int, default=438, help="cache position of the first step (438: the reference prompt)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per row count and round")
    p.add_argument("--rounds", type=int, default=5, help="rounds (every row count once per round)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--single", action="store_true", help="also time step() (one row in slot 0)")
    p.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    rows = [int(r) for r in args.rows.split(",")]
    log(f"building {args.config.name} ({args.layers or 'all'} layers) at {dtype} ...")
    model_config = reduced_config(DeepseekVL2Config.from_json_file(args.config), args.layers, None)
    language = build_language(model_config, dtype, args.quantize)
    scheme = parse_scheme(args.quantize)
    slots = max(rows)
    context = args.position + (args.rounds + 1) * (args.steps + 1) + 2
    language.setup_cache(context, batch=slots)
    step = language._cpu_step()
    if step is None:
        log("the whole-step kernel does not apply here (no extension for this dtype/CPU)")
        return 1
    has_rows = hasattr(step, "step_rows")
    vocab = language.config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def tokens(count: int) -> list[int]:
        return torch.randint(0, vocab, (count,), generator=generator).tolist()

    position = [args.position]

    def run_rows(count: int):
        def run() -> None:
            p0 = position[0]
            step.step_rows(tokens(count), [p0 + b % 3 for b in range(count)], list(range(count)))
        return run

    def run_single() -> None:
        step.step(tokens(1)[0], position[0])

    kinds: dict[str, Any] = {}
    if args.single or not has_rows:
        kinds["step"] = (1, run_single)
    if has_rows:
        for count in rows:
            kinds[f"rows={count}"] = (count, run_rows(count))
    with torch.inference_mode():
        for _, run in kinds.values():  # warm-up: scratch, page faults, the thread pool
            run()
        times: dict[str, list[float]] = {name: [] for name in kinds}
        routed: dict[str, list[int]] = {name: [0, 0] for name in kinds}  # MoE layers stepped, routed experts streamed
        counts = getattr(step, "take_routed_counts", lambda: (0, 0))
        contention = CpuContention()
        contention.start()
        for r in range(args.rounds):
            for name, (_, run) in kinds.items():
                counts()
                times[name] += time_steps(run, args.steps)
                layers_stepped, experts_run = counts()
                routed[name][0] += layers_stepped
                routed[name][1] += experts_run
            position[0] += args.steps  # (the caches' positions move on as in a decode)
            log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {statistics.median(t) * 1e3:.1f} ms" for n, t in times.items()))
        other_cores = contention.stop()
    results = {}
    single = None
    config = language.config
    # The bound of a step of B rows against one row's: the bytes of B one-row steps over the bytes of the
    # B-row step (shared weights once, the experts independent rows would choose, each row's KV cache) at
    # the run's mean cache position. Reaching it means streaming as fast as one row does.
    mean_context = args.position + args.rounds * args.steps // 2
    one_row_bytes = batch_step_bytes(model_config, dtype, 1, mean_context, scheme=scheme)
    moe = bool(config.n_routed_experts)
    for name, (count, _) in kinds.items():
        median = statistics.median(times[name])
        results[name] = {"rows": count, "step_ms": median * 1e3, "tok_s": count / median,
                         "step_ms_min": min(times[name]) * 1e3, "step_ms_max": max(times[name]) * 1e3,
                         "bound_x_single": count * one_row_bytes / batch_step_bytes(model_config, dtype, count, mean_context,
                                                                                    scheme=scheme)}
        if moe and routed[name][0]:
            # The experts a step streams set its cost; random tokens should choose about as many as
            # independent choices would (more sharing would flatter the rate of several rows).
            results[name]["experts_per_layer"] = routed[name][1] / routed[name][0]
            results[name]["experts_per_layer_independent"] = experts_touched(
                config.n_routed_experts, config.num_experts_per_tok, count)
        if count == 1 and single is None:
            single = results[name]["tok_s"]
    print(f"{args.config.name} layers={args.layers or language.config.num_hidden_layers} dtype={args.dtype} "
          f"weights={args.quantize or args.dtype} "
          f"threads={args.threads} (other processes kept {other_cores or 0:.2f} cores busy)")
    print(f"{'kind':>10} {'step ms':>9} {'min':>7} {'max':>7} {'tok/s':>8} {'x single':>8} {'bound x':>8} {'of bound':>8} "
          f"{'experts/layer (independent)':>28}")
    for name, r in results.items():
        experts = (f"{r['experts_per_layer']:.1f} ({r['experts_per_layer_independent']:.1f})"
                   if "experts_per_layer" in r else "-")
        ratio = r["tok_s"] / single if single else float("nan")
        print(f"{name:>10} {r['step_ms']:9.2f} {r['step_ms_min']:7.2f} {r['step_ms_max']:7.2f} {r['tok_s']:8.2f} "
              f"{ratio:8.2f} {r['bound_x_single']:8.2f} {ratio / r['bound_x_single']:8.0%} {experts:>28}")
    if args.json:
        print(json.dumps({"config": str(args.config), "layers": args.layers, "dtype": args.dtype, "threads": args.threads,
                          "other_cores_busy": other_cores, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
