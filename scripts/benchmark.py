#!/usr/bin/env python
"""Benchmark DeepSeek-VL2 inference against the limits of the machine it runs on.

Measures, separately: load (or random build) time; time to first token split into preprocessing,
vision tower + projector (``model.prepare_inputs_embeds``) and the language prefill; steady-state decode
tokens/s; peak RSS (and peak GPU memory on CUDA). Beside every figure it prints the bound measured in
the same run (see ``deepseek_vl2/bounds.py``):

* decode bound = memory read bandwidth / bytes read per generated token at the run's dtype, the bandwidth
  probed right before and right after each run's decode steps (the higher of the two): the read bandwidth
  of a shared VM drifts with its neighbours (the 2-core machine this was written on reads at ~35 or
  ~65 GB/s for minutes at a time), so a probe taken minutes earlier bounds a different machine. The best
  bandwidth seen at any time in the run is reported too, with decode as a share of it;
* time-to-first-token bound = FLOPs / matmul throughput at the run's dtype (per phase at least the
  time to read that phase's weights once);
* load bound = the time to read the checkpoint files; RSS bound = the weights at the run's dtype.

Examples::

    python scripts/benchmark.py --config tests/fixtures/real-configs/deepseek-vl2-tiny.json --json
    python scripts/benchmark.py --checkpoint weights/deepseek-vl2-tiny --dtype float32 --repeat 3
    python scripts/benchmark.py --config tiny.json --layers 4     # same widths, fewer decoder layers
    python scripts/benchmark.py --config tiny.json --quantize int8   # the language weights in int8 (or int4)
    python scripts/benchmark.py --config tiny.json --concurrency 1,8,poisson:0.4   # 8 at once; 16 arriving at 0.4/s

``--config`` builds a random-weight model of exactly that shape directly at the target dtype (no
checkpoint file), with synthetic prompt ids: for one 384x384 image the reference workload is 438 prompt
tokens (421 image tokens + 17 text tokens). With ``--quantize`` the language model's linears are built
directly in that scheme (random integers, no float copy: base in int4 without its 55 GB of bf16), or a
checkpoint is quantized while it loads; the decode bound then counts the quantized bytes. With ``--json``
the last line of stdout is one JSON object.

``--concurrency`` levels, after the single-stream runs: a whole number N submits N requests at once; a level
``poisson:R`` offers ``--arrival-requests`` requests (default 16) one by one at R requests/s on average, at
the gaps of a Poisson process drawn from ``--arrival-seed`` (default 0: every run offers the same schedule),
as real traffic arrives: there a stream that is already decoding stalls while a newcomer's prompt is
prefilled. Every level reports decode tok/s, ttft p50/p95 (from each request's arrival) and itl p50/p95/max
(every gap between two tokens of every request, others' prefill included).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import random
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Union

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import deepseek_vl2  # noqa: E402,F401  (first: it sets the allocator's huge-page hint before torch loads)
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from deepseek_vl2 import bounds  # noqa: E402
from deepseek_vl2.config import DeepseekVL2Config  # noqa: E402
from deepseek_vl2.hardware import UnavailableOnThisCPU, check_cpu_dtype, default_device, default_dtype, parse_dtype  # noqa: E402
from deepseek_vl2.model import tile_sources  # noqa: E402

# Text tokens of the reference workload around one image ("<bos><|User|>: <image>\n<prompt>\n\n<|Assistant|>:").
REFERENCE_TEXT_TOKENS = 17
DEFAULT_PROMPT = "Describe this image in detail."


def log(message: str) -> None:
    print(f"[benchmark] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# memory accounting
# --------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def tune_malloc() -> bool:
    """glibc: serve big temporaries from the heap and never trim it (``mallopt``), so per-call buffers
    (e.g. inside bf16 batch-1 matmuls) reuse resident pages instead of mmap/munmap + fresh page faults,
    which are slow in VMs. Same as MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ in the environment."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1  # the largest glibc accepts is 32 MiB on some builds
        ok = (libc.mallopt(m_mmap_threshold, 32 << 20) == 1) if not ok else ok
        return ok and libc.mallopt(m_trim_threshold, 1 << 62) == 1
    except (OSError, AttributeError):
        return False


class CpuContention:
    """How many cores *other* processes kept busy between ``start()`` and ``stop()`` (from /proc/stat
    minus this process's own CPU time): the machine is shared, so every figure says how quiet it was."""

    def _read(self) -> Optional[tuple[float, float, float]]:
        try:
            with open("/proc/stat") as f:
                fields = [float(x) for x in f.readline().split()[1:]]
            busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)  # minus idle, iowait
            t = os.times()
            return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system, time.perf_counter()
        except (OSError, ValueError, IndexError):
            return None

    def start(self) -> None:
        self.begin = self._read()

    def stop(self) -> Optional[float]:
        end = self._read()
        if self.begin is None or end is None or end[2] <= self.begin[2]:
            return None
        busy, own = end[0] - self.begin[0], end[1] - self.begin[1]
        return max(0.0, (busy - own) / (end[2] - self.begin[2]))


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def huge_page_bytes() -> Optional[dict[str, int]]:
    """Bytes of this process mapped with 2 MiB pages: ``anonymous`` (memory the model allocated) and
    ``file`` (mapped weight files whose page cache is in 2 MiB folios).
    The rest is mapped in 4 KiB pages, which cost decode up to ~10 points of the bound. None where
    /proc/self/smaps_rollup is missing."""
    try:
        return parse_huge_pages(Path("/proc/self/smaps_rollup").read_text())
    except OSError:
        return None


def parse_huge_pages(smaps_rollup: str) -> dict[str, int]:
    kb = {key: int(value) for key, value in re.findall(r"^(AnonHugePages|FilePmdMapped):\s+(\d+) kB", smaps_rollup, re.M)}
    return {"anonymous": kb.get("AnonHugePages", 0) * 1024, "file": kb.get("FilePmdMapped", 0) * 1024}


# --------------------------------------------------------------------------------------------------
# model and inputs
# --------------------------------------------------------------------------------------------------


def fast_random_init(seed: int = 0, block_elems: int = 1 << 24):
    """``init`` for ``build_model``: matrices get uniform(±0.02·√3) values (std 0.02) copied from one random
    block at random offsets (generating billions of fresh random numbers would take longer than the
    benchmark); vectors (norm scales, biases) get 1.0. Values never change the speed of one request (only
    NaN/denormals could, and these have none); several at once share their routed experts as their hidden
    states allow, which random image tokens distort (see decorrelate_image_tokens)."""
    gen = torch.Generator().manual_seed(seed)
    block = torch.empty(block_elems).uniform_(-0.0346, 0.0346, generator=gen)
    cache: dict[torch.dtype, torch.Tensor] = {}

    def init(t: torch.Tensor) -> None:
        if t.dim() <= 1:
            t.fill_(1.0)
            return
        src = cache.get(t.dtype)
        if src is None:
            src = cache[t.dtype] = block.to(t.dtype)
        flat = t.view(-1)
        half = block_elems // 2
        done = 0
        while done < flat.numel():
            n = min(half, flat.numel() - done)
            offset = int(torch.randint(0, block_elems - n + 1, (1,), generator=gen))
            flat[done : done + n].copy_(src[offset : offset + n])
            done += n

    # Quantized matrices: random integers with the same spread (quantize.fill_random), straight into their format.
    init.fill_quantized = lambda module: module.fill_random(gen, 0.02)
    return init


def decorrelate_image_tokens(model, inputs, device: torch.device) -> None:
    """Give a random model's image tokens what a trained model's have: no large part shared by all of them.

    With fast_random_init every image token carries the same large vector: biases of 1.0 through the
    vision tower and projector, the projector's GELU (positive mean) through its random last layer, and
    all-ones ``image_newline`` / ``view_seperator``. Attention with random weights averages its context
    nearly evenly, so that shared part then dominates every decoding token's hidden state, and all requests
    with an image route to the same few experts (tiny, 8 requests in flight: 7.3 routed experts per MoE
    layer and step, where independent choices give 34.9): batching would look far cheaper than it is for
    real requests. Here biases become 0, the two separators random like embedding rows, and the projector's
    last bias is shifted so that the image's tokens average to zero (each step alone still left 7-9 experts
    for 8 requests; together 24-34). Only for ``--config`` (random) models."""
    last = model.projector.layers[-1] if isinstance(model.projector.layers, torch.nn.Sequential) else model.projector.layers
    with torch.no_grad():
        generator = torch.Generator().manual_seed(2)
        for vector in (model.image_newline, model.view_seperator):
            vector.copy_(torch.randn(vector.shape, generator=generator) * 0.02)
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
        if isinstance(last, torch.nn.Linear) and last.bias is not None:
            pixels = inputs.pixel_values.to(device, model.dtype)
            features = model._tile_features(pixels, inputs.images_spatial_crop)
            last.bias.sub_(features.flatten(0, -2).float().mean(0).to(last.bias.dtype))


def reduced_config(config: DeepseekVL2Config, layers: Optional[int], vision_layers: Optional[int]) -> DeepseekVL2Config:
    """The same widths with fewer decoder / vision layers (to measure per-layer cost of models that do
    not fit in memory)."""
    lang, vis = config.language, config.vision
    if layers is not None:
        lang = dataclasses.replace(lang, num_hidden_layers=layers)
    if vision_layers is not None:
        vis = dataclasses.replace(vis, layers=vision_layers)
    return dataclasses.replace(config, language=lang, vision=vis)


def default_image(size: int = 384) -> Image.Image:
    """A deterministic RGB test image (gradients plus noise), ``size`` x ``size``."""
    g = torch.Generator().manual_seed(1)
    y = torch.linspace(0, 1, size).view(-1, 1).expand(size, size)
    x = torch.linspace(0, 1, size).view(1, -1).expand(size, size)
    rgb = torch.stack([x, y, (x + y) / 2], dim=-1) * 200 + torch.rand(size, size, 3, generator=g) * 55
    return Image.fromarray(rgb.clamp(0, 255).to(torch.uint8).numpy(), "RGB")


def image_only_processor(config: DeepseekVL2Config):
    """The real processor (real tiling) over a minimal tokenizer that only knows the special tokens,
    for ``--config`` runs that have no tokenizer.json."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from deepseek_vl2.processor import DEFAULT_BOS, DEFAULT_EOS, DeepseekVL2Processor

    tokenizer = Tokenizer(WordLevel({"<unk>": 0, DEFAULT_BOS: 1, DEFAULT_EOS: 2}, unk_token="<unk>"))
    return DeepseekVL2Processor(tokenizer, candidate_resolutions=config.candidate_resolutions)


@dataclasses.dataclass
class SyntheticInputs:
    """Same fields as ``processor.ProcessedInputs`` (what the model reads)."""

    input_ids: torch.Tensor
    images_seq_mask: torch.Tensor
    pixel_values: torch.Tensor
    images_spatial_crop: torch.Tensor


def synthetic_inputs(processor, config: DeepseekVL2Config, image: Optional[Image.Image], text_tokens: int, seed: int = 0):
    """Tile the image with the real processor and lay out prompt ids like the chat template:
    [bos, 3 text ids, image tokens, the remaining text ids]; text ids are random non-special ids."""
    vocab = config.language.vocab_size
    g = torch.Generator().manual_seed(seed)
    if image is not None:
        views, (nw, nh) = processor.tile_image(image, cropping=True)
        n_image = bounds.image_tokens(nw, nh)
        crop = torch.tensor([[nw, nh]], dtype=torch.long)
    else:
        views, n_image, crop = torch.zeros(0, 3, 384, 384), 0, torch.zeros(1, 2, dtype=torch.long)
    head = min(4, text_tokens)
    ids = torch.randint(3, max(4, min(vocab, 100000)), (text_tokens + n_image,), generator=g)
    ids[0] = config.language.bos_token_id if config.language.bos_token_id < vocab else 0
    mask = torch.zeros(text_tokens + n_image, dtype=torch.bool)
    mask[head : head + n_image] = True
    ids[mask] = vocab - 1  # stands for <image>; the embeddings at these positions are replaced
    return SyntheticInputs(ids, mask, views, crop)


def file_read_seconds(files: list[Path], chunk: int = 64 << 20) -> float:
    """Seconds to read the files sequentially into one reused buffer (the load's lower limit)."""
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# one measured request
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(model, make_inputs, new_tokens: int, device: torch.device,
             probe_bandwidth: Optional[Any] = None) -> dict[str, Any]:
    """One request through the production path: preprocess -> the model's batching engine (vision tower,
    prefill, decode steps; eos disabled so every run makes ``new_tokens``). ``probe_bandwidth()`` (GB/s),
    when given, runs right before the request and right after it (the engine decodes in its own thread, so
    a probe between its steps would compete with them)."""
    from deepseek_vl2.engine import engine_for
    from deepseek_vl2.generation import GenerationConfig

    window = [probe_bandwidth()] if probe_bandwidth else []
    t0 = time.perf_counter()
    inputs = make_inputs()
    t1 = time.perf_counter()
    request = engine_for(model).submit(inputs, GenerationConfig(max_new_tokens=new_tokens), eos_token_id=-1)
    stream = iter(request)
    next(stream)
    t3 = time.perf_counter()
    stamps = [t3]
    for _ in stream:
        stamps.append(time.perf_counter())
    if probe_bandwidth:
        window.append(probe_bandwidth())
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    decode_s = stamps[-1] - stamps[0]
    vision_s = request.stats.embedded_s  # (from submit: the hand-over to the engine's thread counts here)
    return {
        "prompt_tokens": int(inputs.input_ids.numel()),
        "n_tiles": int(inputs.pixel_values.shape[0]),
        "tower_tiles": len(set(tile_sources(inputs.pixel_values, inputs.images_spatial_crop))),
        "generated": len(stamps),
        "preprocess_s": t1 - t0,
        "vision_s": vision_s,
        "prefill_s": t3 - t1 - request.stats.embedded_s,
        "ttft_s": t3 - t0,
        "decode_s": decode_s,
        "decode_tok_s": len(steps) / decode_s if steps and decode_s > 0 else float("nan"),
        "decode_step_ms_median": 1e3 * statistics.median(steps) if steps else float("nan"),
        "window_bandwidth_gbs": max(window) if window else None,
        "window_bandwidth_samples_gbs": window,
    }


def _percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of values, linearly interpolated (nan when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclasses.dataclass(frozen=True)
class PoissonLevel:
    """A ``--concurrency`` level ``poisson:RATE``: requests arrive one by one, ``rate`` per second on average,
    at exponentially distributed gaps (a Poisson process), instead of all at once."""

    rate: float  # requests offered per second

    @property
    def name(self) -> str:
        """The level as written on the command line and keyed in the JSON (``poisson:0.4``)."""
        return f"poisson:{self.rate:g}"


Level = Union[int, PoissonLevel]


def level_name(level: Level) -> str:
    return level.name if isinstance(level, PoissonLevel) else str(level)


def poisson_arrivals(rate: float, count: int, seed: int = 0) -> list[float]:
    """Arrival times (seconds after the first arrival) of ``count`` requests of a Poisson process of ``rate``
    requests per second: the first at 0, each next one an Exp(rate) gap later (mean 1/rate). The gaps come from
    ``random.Random(seed)``, so a seed gives the same schedule on every machine and run."""
    if not rate > 0 or rate == float("inf"):
        raise ValueError(f"the arrival rate must be a positive number of requests per second, got {rate!r}")
    if count < 1:
        raise ValueError(f"a Poisson level needs at least one request, got {count}")
    draw = random.Random(seed)
    times = [0.0]
    for _ in range(count - 1):
        times.append(times[-1] + draw.expovariate(rate))
    return times


def latency_summary(arrivals: list[float], stamps: list[list[float]]) -> dict[str, float]:
    """Latency figures of requests that arrived at ``arrivals`` (clock times) and whose tokens came at ``stamps``
    (one list of clock times per request, in the same order). ttft: from a request's arrival to its first token
    (queueing and the others' prefill included). itl: every gap between two consecutive tokens of one request,
    pooled over all the requests; ``itl_ms_max`` is the longest of them all, the worst freeze a reader saw."""
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:])]
    ttfts = [s[0] - arrived for arrived, s in zip(arrivals, stamps) if s]
    return {
        "ttft_s_p50": _percentile(ttfts, 50),
        "ttft_s_p95": _percentile(ttfts, 95),
        "itl_ms_p50": 1e3 * _percentile(gaps, 50),
        "itl_ms_p95": 1e3 * _percentile(gaps, 95),
        "itl_ms_max": 1e3 * max(gaps) if gaps else float("nan"),
    }


def run_concurrent(model, make_inputs, in_flight: int, new_tokens: int, device: torch.device) -> dict[str, Any]:
    """``in_flight`` requests of the workload submitted at once to the engine (see run_requests).

    decode_tok_s_total: tokens per second of the engine's decode steps that carried all ``in_flight`` rows
    (the steady state, between the joins and the first finish), from the engine's own timeline. ttft: from
    submit to the first token, queueing behind the others' prefill included."""
    return run_requests(model, make_inputs, [0.0] * in_flight, new_tokens, device, steady_rows=in_flight)


def run_poisson(model, make_inputs, level: PoissonLevel, count: int, seed: int, new_tokens: int,
                device: torch.device) -> dict[str, Any]:
    """``count`` requests offered at ``level.rate`` per second (``poisson_arrivals(rate, count, seed)``), each
    submitted at its arrival time (see run_requests). decode_tok_s_total: tokens per second of all the engine's
    decode steps, whatever rows they carried (``decode_rows_mean`` of them on average); ttft from each
    request's arrival."""
    arrivals = poisson_arrivals(level.rate, count, seed)
    result = run_requests(model, make_inputs, arrivals, new_tokens, device)
    return {"arrival_rate": level.rate, "arrival_seed": seed, "arrival_span_s": arrivals[-1], **result}


def run_requests(model, make_inputs, arrivals: list[float], new_tokens: int, device: torch.device,
                 steady_rows: Optional[int] = None) -> dict[str, Any]:
    """One request of the workload per entry of ``arrivals`` (seconds after the start), each submitted to the
    engine at that time (eos disabled) and read by its own thread that stamps every token as it arrives. Their
    prompts differ (other text ids, or a number after the prompt) and each samples (temperature 1, top-k 50,
    its own seed), so that their tokens, and the experts those choose, differ as real requests' do: identical
    requests choose the same experts, and greedy decoding of random weights falls into the same few tokens
    whatever the prompt (measured: 8 greedy rows ran 3.9x one row, above the union-of-experts bound), both of
    which overstate what batching gains.

    decode_tok_s_total: tokens per second of the engine's decode steps that carried ``steady_rows`` rows (all
    of them when None or none did), from the engine's own timeline. ttft and itl: ``latency_summary`` from
    each request's scheduled arrival (``itl_ms_max``: the longest decode stall, which another request's
    prefill causes). experts_per_layer (bf16/fp32 CPU kernels only): the routed experts a MoE layer's decode
    step streamed on average, next to what independent uniform choices of as many rows would
    (experts_per_layer_independent): fewer means the rows shared experts more than real requests would, and
    the total rate flatters batching."""
    from concurrent.futures import ThreadPoolExecutor

    from deepseek_vl2.engine import engine_for
    from deepseek_vl2.generation import GenerationConfig

    engine = engine_for(model)
    inputs = [make_inputs(i) for i in range(len(arrivals))]
    engine.timeline.clear()
    step = model.language._cpu_step()
    routed_counts = getattr(step, "take_routed_counts", None)
    if routed_counts:
        routed_counts()  # (starts the count)
    rss_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def consume(request) -> list[float]:
        return [time.perf_counter() for _ in request]

    started = time.perf_counter()
    with ThreadPoolExecutor(len(arrivals)) as pool:
        readers = []
        for i, (offset, x) in enumerate(zip(arrivals, inputs)):
            wait = started + offset - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            request = engine.submit(x, GenerationConfig(max_new_tokens=new_tokens, temperature=1.0, seed=i), eos_token_id=-1)
            readers.append(pool.submit(consume, request))
        stamps = [reader.result() for reader in readers]
    wall_s = time.perf_counter() - started
    steps = [(rows, seconds) for kind, rows, seconds in engine.timeline if kind == "decode"]
    full = [(rows, seconds) for rows, seconds in steps if rows == steady_rows] or steps
    prefill_units = [seconds for kind, _, seconds in engine.timeline if kind == "prefill"]
    routing: dict[str, float] = {}
    if routed_counts:
        layers_stepped, experts_run = routed_counts()
        lang = model.config.language
        if layers_stepped and steps:
            routing["experts_per_layer"] = experts_run / layers_stepped
            routing["experts_per_layer_independent"] = statistics.mean(
                bounds.experts_touched(lang.n_routed_experts, lang.num_experts_per_tok, rows) for rows, _ in steps)
    return {
        "decode_tok_s_total": sum(r for r, _ in full) / sum(t for _, t in full) if full else float("nan"),
        "steady_steps": len(full),
        "decode_rows_mean": statistics.mean(r for r, _ in steps) if steps else float("nan"),
        **latency_summary([started + offset for offset in arrivals], stamps),
        "prefill_unit_s_max": max(prefill_units) if prefill_units else float("nan"),
        "requests": len(arrivals),
        "tokens": sum(len(s) for s in stamps),
        "wall_s": wall_s,
        "peak_memory_gb": (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()) / 1e9,
        "peak_memory_is_since_level_start": device.type == "cuda" or rss_reset,
        **routing,
    }


def profile_request(model, make_inputs, new_tokens: int, device: torch.device, top: int = 20) -> dict[str, str]:
    """torch.profiler tables (self time, top ops) of one whole request through the engine (vision tower,
    prefill and decode steps run in the engine's thread; the profiler follows it)."""
    from torch.profiler import ProfilerActivity, profile

    from deepseek_vl2.engine import engine_for
    from deepseek_vl2.generation import GenerationConfig

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    inputs = make_inputs()
    with profile(activities=activities) as prof:
        for _ in engine_for(model).submit(inputs, GenerationConfig(max_new_tokens=new_tokens), eos_token_id=-1):
            pass
    return {f"one request ({new_tokens} new tokens)": prof.key_averages().table(sort_by=sort, row_limit=top)}


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="config.json: random weights of exactly that shape, no file")
    src.add_argument("--checkpoint", type=Path, help="model directory (config.json + safetensors [+ tokenizer])")
    p.add_argument("--image", type=Path, help="image file (default: a generated 384x384 image = 1 global view + 1 tile)")
    p.add_argument("--no-image", action="store_true", help="text-only prompt")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (with a tokenizer; --config uses synthetic ids)")
    p.add_argument("--text-tokens", type=int, default=REFERENCE_TEXT_TOKENS,
                   help="--config: text tokens around the image (default 17: 438 tokens with one 384x384 image)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="auto", help="auto (fastest native: probed), float32, bfloat16, float16")
    p.add_argument("--quantize", default=None, metavar="SCHEME",
                   help="int8 or int4 (int4:N for groups of N): the language weights in that scheme (default: none)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeat", type=int, default=3, help="measured runs (default 3); figures are their median")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (kernel selection, allocations)")
    p.add_argument("--layers", type=int, default=None, help="--config: override num_hidden_layers (per-layer cost)")
    p.add_argument("--vision-layers", type=int, default=None, help="--config: override vision layers")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of the decode steps")
    p.add_argument("--probe-seconds", type=float, default=1.0, help="time per bandwidth probe")
    p.add_argument("--probe-mb", type=int, default=None, help="bandwidth probe buffer (default: 16x L3, at least 512 MiB, at most 2 GiB)")
    p.add_argument("--mallopt", action="store_true",
                   help="glibc: no mmap/trim for big temporaries (see tune_malloc); to measure its effect")
    p.add_argument("--json", action="store_true", help="last stdout line: one JSON object with every figure")
    p.add_argument("--concurrency", type=_levels, default=[],
                   help="e.g. 1,2,4,8,16: after the single-stream runs, that many requests submitted at once at each "
                        "level (the engine gets as many slots as the largest level); a level poisson:R (e.g. "
                        "1,8,poisson:0.4) offers --arrival-requests requests one by one, R per second on average "
                        "(Poisson arrivals: exponential gaps from --arrival-seed), as real traffic comes")
    p.add_argument("--arrival-requests", type=int, default=16,
                   help="requests of each poisson:R level (default 16)")
    p.add_argument("--arrival-seed", type=int, default=0,
                   help="seed of the poisson:R levels' arrival gaps (default 0: the same schedule every run)")
    p.add_argument("--slots", type=int, default=None,
                   help="engine slots (default: the largest whole-number --concurrency level, else what the server "
                        "would use; a poisson:R level's requests beyond the slots queue, as in the server)")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (one to time the prefill, one decode step)")
    if (args.layers is not None or args.vision_layers is not None) and args.config is None:
        p.error("--layers/--vision-layers need --config")
    if args.arrival_requests < 1:
        p.error(f"--arrival-requests must be at least 1, got {args.arrival_requests}")
    return args


def _levels(text: str) -> list[Level]:
    """``1,8,poisson:0.4`` -> [1, 8, PoissonLevel(0.4)]."""
    levels: list[Level] = []
    for part in (part.strip() for part in text.split(",")):
        if not part:
            continue
        if part.lower().startswith("poisson:"):
            try:
                rate = float(part.split(":", 1)[1])
            except ValueError:
                rate = float("nan")
            if not 0 < rate < float("inf"):
                raise argparse.ArgumentTypeError(
                    f"a Poisson level is poisson:RATE with RATE > 0 requests per second (e.g. poisson:0.4), got {part!r}")
            levels.append(PoissonLevel(rate))
            continue
        try:
            level = int(part)
        except ValueError:
            level = 0
        if level < 1:
            raise argparse.ArgumentTypeError(
                f"levels are whole numbers >= 1 or poisson:RATE, separated by commas; got {part!r} in {text!r}")
        levels.append(level)
    if not levels:
        raise argparse.ArgumentTypeError(f"no level in {text!r}")
    return levels


def _fmt_pct(measured: float, bound: float, higher_is_better: bool) -> str:
    if not bound or measured != measured:
        return "   n/a"
    ratio = measured / bound if higher_is_better else bound / measured
    return f"{100 * ratio:5.0f} %"


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    malloc_tuned = tune_malloc() if args.mallopt else False
    probe_bytes = args.probe_mb << 20 if args.probe_mb else None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    from deepseek_vl2.quantize import QuantizationError, parse_scheme

    try:
        scheme = parse_scheme(args.quantize)
    except QuantizationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dtype == "auto":
        log("probing the fastest native dtype ...")
        dtype = default_dtype(device)
    else:
        dtype = parse_dtype(args.dtype)
        try:
            check_cpu_dtype(device, dtype)  # (a dtype this CPU would only emulate measures nothing of use)
        except UnavailableOnThisCPU as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    machine = bounds.machine_description()
    log(f"machine: {machine['cpu']}, {machine['cpu_count']} cores, torch threads {machine['torch_threads']}"
        + (f", {machine['gpu']}" if "gpu" in machine else "") + f"; device {device}, dtype {dtype}")

    # --- machine limits (before the model takes memory) ---
    log("measuring memory read bandwidth ...")
    bw_samples = [bounds.measure_memory_bandwidth(args.probe_seconds, probe_bytes, device=str(device))]
    log(f"  {bw_samples[0]:.1f} GB/s; measuring matmul throughput at {dtype} ...")
    flops = bounds.measure_matmul_flops(dtype, seconds=1.5 * args.probe_seconds, device=str(device))
    gemv_bw = bounds.measure_gemv_bandwidth(dtype, seconds=0.5 * args.probe_seconds, device=str(device))
    log(f"  {flops / 1e9:.0f} GFLOP/s; batch-1 linear reaches {gemv_bw:.1f} GB/s")

    # --- load / build ---
    from deepseek_vl2.model import build_model, checkpoint_files, checkpoint_scheme, load_model

    load_before = os.getloadavg()[0]
    rss_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    files: list[Path] = []
    file_bytes = 0
    if args.checkpoint:
        config = DeepseekVL2Config.from_pretrained(args.checkpoint)
        try:
            scheme = checkpoint_scheme(config, scheme, str(args.checkpoint))
        except QuantizationError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        files = checkpoint_files(args.checkpoint)
        file_bytes = sum(f.stat().st_size for f in files)
        log(f"loading {args.checkpoint} ({file_bytes / 1e9:.2f} GB in {len(files)} file(s)) ...")
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            if now - last[0] > 2.0 or done == total:
                last[0] = now
                log(f"  loaded {done / 1e9:.2f} / {total / 1e9:.2f} GB")

        t = time.perf_counter()
        model = load_model(args.checkpoint, device=device, dtype=dtype, progress=progress, quantize=scheme)
        _sync(device)
        load_s = time.perf_counter() - t
        load_kind = "load"
    else:
        config = reduced_config(DeepseekVL2Config.from_json_file(args.config), args.layers, args.vision_layers)
        n = bounds.count_parameters(config, include_attn_pool=False)["total"]
        log(f"building {args.config.name} with random weights: {n / 1e9:.3f} B parameters at {dtype}"
            + (f", the language linears in {scheme.name}" if scheme else "") + " ...")
        t = time.perf_counter()
        try:
            model = build_model(config, device=device, dtype=dtype, init=fast_random_init(), quantize=scheme)
        except QuantizationError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        _sync(device)
        load_s = time.perf_counter() - t
        load_kind = "random build"
    log(f"  {load_kind} took {load_s:.2f} s")
    # Routed experts loaded from a mapped checkpoint are per-expert views, not parameters: count them too.
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        t.numel() * t.element_size()
        for module in model.modules() if getattr(module, "views", None)
        for triple in module.views for t in triple
    )

    # --- inputs ---
    image = None
    if not args.no_image:
        image = Image.open(args.image).convert("RGB") if args.image else default_image()
    tokenizer_dir = args.checkpoint if args.checkpoint and (args.checkpoint / "tokenizer.json").is_file() else None
    if tokenizer_dir is not None:
        from deepseek_vl2.processor import DeepseekVL2Processor

        processor = DeepseekVL2Processor.from_pretrained(tokenizer_dir)
        images = [image] if image is not None else []
        make_inputs = lambda i=0: processor.process_prompt(args.prompt + (f" ({i})" if i else ""), images)  # noqa: E731
        workload = f"prompt {args.prompt!r}"
    else:
        processor = image_only_processor(config)
        make_inputs = lambda i=0: synthetic_inputs(processor, config, image, args.text_tokens, seed=i)  # noqa: E731
        workload = f"synthetic prompt ids ({args.text_tokens} text tokens)"
        if image is not None:
            decorrelate_image_tokens(model, make_inputs(), device)

    # --- the engine: as the server makes it, with slots for the largest level, each slot as long as a request ---
    from deepseek_vl2.engine import configured_slots, engine_for

    at_once = [level for level in args.concurrency if isinstance(level, int)]
    slots = args.slots or (max(at_once) if at_once else configured_slots(model))
    sample = make_inputs()
    engine = engine_for(model, slots, context=int(sample.input_ids.numel()) + args.new_tokens + 1)
    log(f"engine: {engine.slots} slots of {engine.context} positions, prefill chunks of {engine.prefill_chunk} tokens")

    # --- runs ---
    contention = CpuContention()
    contention.start()
    cold = None
    for i in range(args.warmup):
        log(f"warm-up run {i + 1}/{args.warmup} ...")
        # On CUDA the warm-up decodes as far as the measured runs: each attention window they reach has
        # its own graph (and compiled step) to make first; a short warm-up left that inside run 1.
        warm_tokens = args.new_tokens if device.type == "cuda" else min(args.new_tokens, 8)
        r = run_once(model, make_inputs, warm_tokens, device)
        cold = cold or r
    # The decode window's probe: the same probe as at the start and the end, on one buffer kept for all
    # the runs (allocating and freeing it around each decode disturbed the decode steps that followed;
    # see bounds.ReadProbe). That buffer is not part of inference: the peak RSS is read before it is
    # allocated, and its (fully touched) size is taken off the high-water mark of the runs.
    probe_peaks: list[int] = [peak_rss_bytes()]
    window_probe = bounds.ReadProbe(probe_bytes, device=str(device))
    probe_resident = window_probe.size_bytes if device.type == "cpu" else 0

    def probe_window() -> float:
        return window_probe.measure(0.25)

    runs = []
    for i in range(args.repeat):
        log(f"run {i + 1}/{args.repeat}: {args.new_tokens} new tokens ...")
        runs.append(run_once(model, make_inputs, args.new_tokens, device, probe_window))
        log(f"  ttft {runs[-1]['ttft_s']:.3f} s, decode {runs[-1]['decode_tok_s']:.2f} tok/s "
            f"(read bandwidth around it: {' / '.join(f'{b:.1f}' for b in runs[-1]['window_bandwidth_samples_gbs'])} GB/s)")
    peak_rss = max([peak_rss_bytes() - probe_resident] + probe_peaks)
    huge = huge_page_bytes()
    if huge is not None:
        huge["anonymous"] = max(0, huge["anonymous"] - probe_resident)  # (the probe's buffer is not the model's)
    other_cores = contention.stop()
    peak_gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    concurrency: dict[str, dict[str, Any]] = {}
    for level in args.concurrency:
        if isinstance(level, PoissonLevel):
            run_level = functools.partial(run_poisson, model, make_inputs, level, args.arrival_requests,
                                          args.arrival_seed, args.new_tokens, device)
            log(f"{args.arrival_requests} requests arriving at {level.rate:g}/s (Poisson, seed {args.arrival_seed}), "
                f"{args.new_tokens} new tokens each ...")
        else:
            run_level = functools.partial(run_concurrent, model, make_inputs, level, args.new_tokens, device)
            log(f"{level} request(s) in flight, {args.new_tokens} new tokens each ...")
        if device.type == "cuda":  # (each batch bucket's graph is captured on first use: not in the timing)
            run_level()
        concurrency[level_name(level)] = c = run_level()
        if c["peak_memory_is_since_level_start"]:
            c["peak_memory_gb"] -= probe_resident / 1e9  # (the probe's buffer, resident since, is not the engine's)
        log(f"  decode {c['decode_tok_s_total']:.1f} tok/s in all; ttft p50 {c['ttft_s_p50']:.2f} s; "
            f"itl p50 {c['itl_ms_p50']:.1f} ms, p95 {c['itl_ms_p95']:.1f} ms, max {c['itl_ms_max']:.0f} ms")

    # Freed only now: freeing it before the levels slowed the first level's steps (24.0 tok/s at 1 in flight
    # against 25.2 in the single-stream runs just before; see ReadProbe).
    del window_probe
    profile_tables = {}
    if args.profile:
        log("profiling one request ...")
        profile_tables = profile_request(model, make_inputs, args.new_tokens, device)

    # --- limits after the runs too (the machine is shared; the bound is the best the probes saw) ---
    bw_samples.append(bounds.measure_memory_bandwidth(args.probe_seconds, probe_bytes, device=str(device)))
    window_samples = [b for r in runs for b in r["window_bandwidth_samples_gbs"]]
    bandwidth = max(bw_samples + window_samples)  # the best the machine read at any time in this run
    flops_samples = [flops, bounds.measure_matmul_flops(dtype, seconds=1.5 * args.probe_seconds, device=str(device))]
    flops = max(flops_samples)
    file_read_s = None
    if files:
        log("timing a plain read of the checkpoint files ...")
        file_read_s = file_read_seconds(files)

    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
    prompt_tokens, n_tiles, generated = runs[0]["prompt_tokens"], runs[0]["n_tiles"], runs[0]["generated"]
    tower_tiles = runs[0]["tower_tiles"]  # (the vision bound counts the tiles the tower computes)
    avg_context = prompt_tokens + generated // 2
    per_token = bounds.decode_bytes_per_token(config, dtype, context=avg_context, scheme=scheme)
    # Decode against the bandwidth of its own window, run by run (median), and against the best ever seen.
    window_bounds = [r["window_bandwidth_gbs"] * 1e9 / per_token["total"] for r in runs]
    decode_bound = statistics.median(window_bounds)
    decode_pct = statistics.median(100 * r["decode_tok_s"] / b for r, b in zip(runs, window_bounds))
    best_bound = bandwidth * 1e9 / per_token["total"]
    pb = bounds.prefill_bound(config, dtype, prompt_tokens, tower_tiles, flops, bandwidth, scheme=scheme)
    pf = bounds.prefill_flops(config, prompt_tokens, tower_tiles)

    # Whether this run measured our CPU kernels or fell back to PyTorch's ops (a failed build only warns).
    cpu_kernels = None
    if device.type == "cpu":
        from deepseek_vl2 import kernels

        kind, why = "bf16" if dtype == torch.bfloat16 else "f32", kernels.layer_kernels_unavailable(dtype)
        cpu_kernels = f"{kind}: in use" if why is None else f"{kind}: unavailable ({why}), PyTorch's ops measured"

    result: dict[str, Any] = {
        "machine": machine,
        "device": str(device),
        "cpu_kernels": cpu_kernels,
        "dtype": str(dtype).replace("torch.", ""),
        "quantize": scheme.name if scheme else None,
        "source": str(args.checkpoint or args.config),
        "random_weights": args.config is not None,
        "layers": config.language.num_hidden_layers,
        "vision_layers": config.vision.layers,
        "workload": workload,
        "prompt_tokens": prompt_tokens,
        "n_tiles": n_tiles,
        "tower_tiles": tower_tiles,
        "new_tokens": generated,
        "repeat": args.repeat,
        "load_kind": load_kind,
        "load_s": load_s,
        "file_bytes": file_bytes,
        "file_read_s": file_read_s,
        "preprocess_s": med["preprocess_s"],
        "vision_s": med["vision_s"],
        "prefill_s": med["prefill_s"],
        "ttft_s": med["ttft_s"],
        "cold_ttft_s": cold["ttft_s"] if cold else None,
        "decode_tok_s": med["decode_tok_s"],
        "decode_step_ms_median": med["decode_step_ms_median"],
        "peak_rss_gb": peak_rss / 1e9,
        "peak_rss_is_since_load": rss_reset,
        "peak_gpu_gb": peak_gpu / 1e9 if peak_gpu is not None else None,
        "weights_gb": weights / 1e9,
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
        "other_processes_cores_busy": other_cores,
        "malloc_tuned": malloc_tuned,
        "bandwidth_gbs": bandwidth,
        "bandwidth_samples_gbs": bw_samples,
        "gemv_bandwidth_gbs": gemv_bw,
        "matmul_gflops": flops / 1e9,
        "matmul_gflops_samples": [f / 1e9 for f in flops_samples],
        "decode_bytes_per_token": per_token["total"],
        "decode_bytes_breakdown": per_token,
        "decode_bound_tok_s": decode_bound,
        "decode_pct_of_bound": decode_pct,
        "decode_window_bandwidth_gbs": [r["window_bandwidth_gbs"] for r in runs],
        "decode_bound_best_tok_s": best_bound,
        "decode_pct_of_best_bound": 100 * med["decode_tok_s"] / best_bound,
        "prefill_flops": pf["total"],
        "vision_bound_s": pb.vision_s,
        "prefill_bound_s": pb.language_s,
        "ttft_bound_s": pb.total_s,
        "ttft_compute_bound_s": pb.compute_s,
        "ttft_over_bound": med["ttft_s"] / pb.total_s,
        "load_over_read": (load_s / file_read_s) if file_read_s else None,
        "rss_over_weights": peak_rss / weights,
        "huge_pages_gb": {k: v / 1e9 for k, v in huge.items()} if huge is not None else None,
        "engine_slots": engine.slots,
        "prefill_chunk": engine.prefill_chunk,
        "concurrency": concurrency,
    }

    # --- report ---
    m = machine
    where = f"{m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} threads)" + (f", {m['gpu']}" if "gpu" in m else "")
    lines = [
        f"DeepSeek-VL2 benchmark: {result['source']} ({'random weights' if result['random_weights'] else 'checkpoint'}), "
        f"{config.language.num_hidden_layers} decoder layers",
        f"machine: {where}; device {device}; dtype {result['dtype']}"
        + (f"; language weights in {scheme.name}" if scheme else "") + ("; mallopt tuned" if malloc_tuned else ""),
        f"workload: {prompt_tokens} prompt tokens ({n_tiles} tiles, {tower_tiles} through the tower), {generated} new tokens, {workload}; "
        f"median of {args.repeat}"
        + (f"; other processes kept {other_cores:.2f} of {m['cpu_count']} cores busy meanwhile" if other_cores is not None else ""),
        f"limits measured: read bandwidth {bandwidth:.1f} GB/s at best (start/end {', '.join(f'{b:.1f}' for b in bw_samples)}; "
        f"around each decode {', '.join(f'{b:.1f}' for b in window_samples)}; "
        f"batch-1 linear {gemv_bw:.1f}), matmul {flops / 1e9:.0f} GFLOP/s (samples {', '.join(f'{f / 1e9:.0f}' for f in flops_samples)})",
        "",
        f"{'figure':<22}{'measured':>14}{'bound':>14}{'of bound':>10}",
        f"{load_kind:<22}{load_s:>12.2f} s"
        + (f"{file_read_s:>12.2f} s{_fmt_pct(load_s, file_read_s, False):>10}" if file_read_s else f"{'(no file)':>14}"),
        f"{'preprocess':<22}{med['preprocess_s']:>12.3f} s{'':>14}",
        f"{'vision + projector':<22}{med['vision_s']:>12.3f} s{pb.vision_s:>12.3f} s{_fmt_pct(med['vision_s'], pb.vision_s, False):>10}",
        f"{'language prefill':<22}{med['prefill_s']:>12.3f} s{pb.language_s:>12.3f} s{_fmt_pct(med['prefill_s'], pb.language_s, False):>10}",
        f"{'time to first token':<22}{med['ttft_s']:>12.3f} s{pb.total_s:>12.3f} s{_fmt_pct(med['ttft_s'], pb.total_s, False):>10}"
        f"   ({med['ttft_s'] / pb.total_s:.2f}x bound)",
        f"{'decode':<22}{med['decode_tok_s']:>8.2f} tok/s{decode_bound:>8.2f} tok/s{decode_pct:>8.0f} %"
        f"   ({per_token['total'] / 1e9:.3f} GB/token; bound at the bandwidth read around the decode steps)",
        f"{'decode vs best':<22}{med['decode_tok_s']:>8.2f} tok/s{best_bound:>8.2f} tok/s"
        f"{_fmt_pct(med['decode_tok_s'], best_bound, True):>10}   (bound at the best bandwidth of the whole run)",
        f"{'peak RSS':<22}{peak_rss / 1e9:>11.2f} GB{weights / 1e9:>11.2f} GB{_fmt_pct(peak_rss, weights, False):>10}"
        f"   ({peak_rss / weights:.2f}x weights)",
    ]
    if peak_gpu is not None:
        lines.append(f"{'peak GPU memory':<22}{peak_gpu / 1e9:>11.2f} GB{weights / 1e9:>11.2f} GB")
    if huge is not None and device.type == "cpu":
        lines.append(f"(in 2 MiB pages: {huge['file'] / 1e9:.2f} GB of mapped weight files, {huge['anonymous'] / 1e9:.2f} GB "
                     "of allocated memory; the rest in 4 KiB pages)")
    if cold:
        lines.append(f"(first, cold request: time to first token {cold['ttft_s']:.3f} s)")
    if cpu_kernels is not None and "in use" not in cpu_kernels:
        lines.append(f"NOTE: our CPU kernels were not used: {cpu_kernels}")
    if concurrency:
        single = concurrency.get("1", {}).get("decode_tok_s_total")
        lines += ["", f"{'in flight':>13}{'decode tok/s':>14}{'x one':>7}{'ttft p50':>10}{'ttft p95':>10}{'itl p50':>10}"
                      f"{'itl p95':>10}{'itl max':>10}{'peak mem':>10}{'experts/layer (indep.)':>24}"]
        for level, c in concurrency.items():
            ratio = f"{c['decode_tok_s_total'] / single:.2f}" if single else "-"
            experts = (f"{c['experts_per_layer']:.1f} ({c['experts_per_layer_independent']:.1f})"
                       if "experts_per_layer" in c else "-")
            lines.append(f"{level:>13}{c['decode_tok_s_total']:>14.1f}{ratio:>7}{c['ttft_s_p50']:>9.2f}s{c['ttft_s_p95']:>9.2f}s"
                         f"{c['itl_ms_p50']:>8.1f}ms{c['itl_ms_p95']:>8.1f}ms{c['itl_ms_max']:>8.0f}ms{c['peak_memory_gb']:>8.2f}GB"
                         f"{experts:>24}")
        lines.append("(decode tok/s: the engine's steps that carried every request in flight; itl: time between two "
                     "tokens of one request, others' prefill included; ttft from submit; experts/layer: routed experts a "
                     "MoE layer's step streamed, and in brackets what independent choices would)")
        for level, c in concurrency.items():
            if "arrival_rate" in c:
                lines.append(f"({level}: {c['requests']} requests arriving at {c['arrival_rate']:g}/s on average (Poisson, "
                             f"seed {c['arrival_seed']}, the last {c['arrival_span_s']:.1f} s after the first), "
                             f"{c['decode_rows_mean']:.1f} rows per decode step on average; its decode tok/s: every "
                             "decode step, whatever rows it carried)")
    print("\n".join(lines), flush=True)
    for phase, table in profile_tables.items():
        print(f"\nprofile of {phase} (self time, top ops):\n{table}", flush=True)
    if args.json:
        print(json.dumps(result, default=float), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
