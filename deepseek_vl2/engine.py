"""The continuous-batching engine: every request in flight advances in one batched decode step.

One engine per loaded model owns the language model's cache and one background thread. Requests arrive
from any thread (``submit``) and leave as a stream of token ids (``Request``: iterate it, or ``async for``
it on an event loop). The thread loops over:

1. admission: a waiting request takes a free cache slot (first come, first served);
2. prefill units of the joining requests, oldest first: a few blocks of its images through the vision
   tower (+ projector), or a few decoder layers of the next chunk of ``prefill_chunk`` prompt tokens
   written to its slot; its first token is sampled when the last chunk is done. Units run back to back
   up to the request's share of the turn (its predicted remaining prefill spread evenly over the fewest
   turns that fit in ``prefill_budget_s``; at least one unit), so requests already decoding keep decoding
   in between, each waiting at most about one budget, never a whole prompt;
3. one decode step for every decoding request together (``DeepseekV2ForCausalLM.decode_rows``: each matrix
   runs once on all rows, each chosen expert once on the rows routed to it; on the CPU one call into our
   kernels where they are built, on CUDA a CUDA graph per batch-size bucket), then each row samples its
   next token with its own settings, generator and seen ids.

A finished, failed or cancelled request leaves at once and frees its slot. The cache is allocated once,
``slots`` x the whole context, for multi-head and latent attention alike; it never grows.

Company does not change an answer: a row's sampling reads only its own logits, ids and generator, and
the chunks of a prompt are the same whoever else is in flight. On the CPU with our kernels each row's
arithmetic is the same whatever the other rows (bit-identical logits); elsewhere batched matrix products
may round differently with the batch size (fp32: ~1e-6 relative; see docs/performance.md).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import itertools
import math
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Optional, Union

import torch

from .generation import CudaGraphDecoder, GenerationConfig, decode_step, next_token_id, prefill_steps
from .hardware import release_openmp_workers
from .kernels import load_cpu_kernels
from .language import DeepseekV2ForCausalLM
from .memory import cache_bytes_per_request, memory_budget
from .model import DeepseekVL2, ImageInputs
from .steps import Steps, advance

# Prompt tokens per prefill unit. A joining request's prefill runs between the others' decode steps, one
# chunk at a time, so a decoding request waits at most one chunk per step (see docs/performance.md for the
# measured stall); a whole 1-image prompt of tiny (438 tokens) is one chunk.
DEFAULT_PREFILL_CHUNK = 512
# Vision blocks times tiles per unit (DEEPSEEK_VL2_VISION_UNIT): a joining request's images go through the
# tower a few blocks at a time, the others' decode steps between (SigLIP's 27 blocks take ~19 ms a tile each
# on 2 Sapphire Rapids cores: a 384-px image's two tiles, encoded once, are ~40 ms a unit).
DEFAULT_VISION_UNIT = 4
# Milliseconds of prefill work between two decode steps at most (DEEPSEEK_VL2_PREFILL_BUDGET_MS): a joining
# request's remaining prefill is spread evenly over the fewest turns that fit (``_turn_seconds``), then the
# decoding requests take a step. A step after every unit (0) made a joining 1-image request of tiny wait for
# 8 of the others' steps; the budget sets how many turns a prompt takes (tiny's ~0.95 s: three of ~0.32 s).
DEFAULT_PREFILL_BUDGET_MS = 425
# Decoder layers per unit of a prompt chunk (DEEPSEEK_VL2_PREFILL_LAYERS): a chunk's layers in pieces, the
# others decoding between them, while each expert's weights are still read once for the chunk (smaller
# chunks read them again). Small pieces (tiny: ~85 ms) let the turns be evened out; 0: whole chunks. Tiny
# bf16, 8 requests at once on 2 cores, the two schedules in turns: units of 8 blocks and 6 layers filling each
# turn up to the budget, last first token after 8.9-10.6 s and p95 pause 464-507 ms (9 runs); units of 4
# blocks and 2 layers in evened turns, 9.4-9.8 s and 462-500 ms (8 runs; docs/performance.md).
DEFAULT_PREFILL_LAYERS = 2


class RequestCancelled(Exception):
    """The request was cancelled before it finished."""


@dataclass
class RequestStats:
    """Timing of one request (seconds from ``submit``)."""

    prompt_tokens: int
    new_tokens: int = 0
    queued_s: float = 0.0  # until a cache slot was free
    embedded_s: float = 0.0  # image + prompt embedded (vision tower, projector)
    first_token_s: float = 0.0  # the first new token sampled
    total_s: float = 0.0

    def __str__(self) -> str:
        decode_s = self.total_s - self.first_token_s
        rate = (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else 0.0
        return (f"{self.prompt_tokens} prompt tokens, {self.new_tokens} new tokens; first token after "
                f"{self.first_token_s:.2f} s, {rate:.1f} tokens/s after it, {self.total_s:.2f} s in all")


_END = object()  # the last item of a request's stream


class Request:
    """One request in the engine: its settings and state, and the stream of its new token ids.

    Iterating yields the ids (eos not included) and raises the request's error, if it failed;
    ``async for`` does the same on the event loop the request was submitted from. ``cancel()`` stops it
    within one engine step (iterating then raises ``RequestCancelled``). Closing the iteration early
    cancels it too.
    """

    _ids = itertools.count()

    def __init__(self, inputs: ImageInputs, config: GenerationConfig, eos_token_id: int,
                 loop: Optional[asyncio.AbstractEventLoop]) -> None:
        self.id = next(self._ids)
        self.inputs: Optional[ImageInputs] = inputs  # (dropped once embedded)
        self.config, self.eos_token_id = config, eos_token_id
        self.prompt_ids = inputs.input_ids.view(-1)  # [T]
        self.prompt_len = int(self.prompt_ids.shape[0])
        self.stats = RequestStats(prompt_tokens=self.prompt_len)
        self.submitted = time.perf_counter()
        self.cancelled = False
        self.finished = False
        # Engine-side state (touched by the engine thread only).
        self.slot: Optional[int] = None
        self.max_new = 0
        self.embeds: Optional[torch.Tensor] = None  # [1, T, D] until prefilled
        self.embedding: Optional[Steps[torch.Tensor]] = None  # the vision tower's pieces, while it runs
        self.chunk: Optional[Steps[torch.Tensor]] = None  # a prompt chunk's layer pieces, while it runs
        self.prefilled = 0  # prompt tokens written to the cache
        self.units_left: dict[str, int] = {}  # prefill units still to run, by kind (set by the engine on admission)
        self.generated = 0
        self.last_token = -1  # the token the next decode step feeds
        self.generator: Optional[torch.Generator] = None
        self.seen: Optional[torch.Tensor] = None  # ids for the repetition penalty: prompt, then answer
        self.n_seen = 0
        # Delivery: a thread-safe queue, or an asyncio queue fed through the submitting loop.
        self._loop = loop
        self._queue: Union[asyncio.Queue, queue.Queue] = asyncio.Queue() if loop is not None else queue.Queue()
        self._engine: Optional["BatchEngine"] = None

    # ---- consumer side ----------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop generating (within one engine step) and free the cache slot."""
        if not self.finished and not self.cancelled:
            self.cancelled = True
            if self._engine is not None:
                self._engine._wake()

    def __iter__(self) -> Iterator[int]:
        if self._loop is not None:
            raise TypeError("this request was submitted from an event loop: use `async for`")
        try:
            while True:
                item = self._queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if self.cancelled:  # (ids the engine made before it saw the cancel are not delivered)
                    raise RequestCancelled()
                yield item
        finally:
            self.cancel()  # (no-op once finished) a consumer that stops early frees the slot

    async def __aiter__(self) -> AsyncIterator[int]:
        if self._loop is None:
            raise TypeError("this request was not submitted from an event loop: iterate it")
        try:
            while True:
                item = await self._queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if self.cancelled:
                    raise RequestCancelled()
                yield item
        finally:
            self.cancel()

    # ---- engine side ------------------------------------------------------------------------------

    def _deliver(self, item: Any) -> None:
        if self._loop is None:
            self._queue.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            self.cancelled = True

    def _finish(self, error: Optional[BaseException] = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.stats.total_s = time.perf_counter() - self.submitted
        self.embeds = self.embedding = self.chunk = None
        self._deliver(error if error is not None else _END)


def default_slots(device: torch.device, cache_bytes_per_slot: int) -> int:
    """How many requests to serve at once when the deployment does not say (``DEEPSEEK_VL2_MAX_CONCURRENCY``).

    CUDA: 16 (decode is still weight-bound there at 16 rows for every size, and a graph per bucket);
    CPU: 8 (a 2-core CPU already reaches most of the batching gain at 8 rows: union of experts). Both are
    capped so that the cache (``slots`` x whole context) takes at most a quarter of the memory free now.
    """
    wanted = 16 if device.type == "cuda" else 8
    free, _ = memory_budget(device)
    if cache_bytes_per_slot <= 0:
        return wanted
    return max(1, min(wanted, int(free // 4 // cache_bytes_per_slot)))


class BatchEngine:
    """Continuous batching over ``slots`` cache slots of ``model`` (see the module docstring)."""

    def __init__(self, model: DeepseekVL2, slots: int, prefill_chunk: Optional[int] = None,
                 context: Optional[int] = None, prefill_budget_ms: Optional[float] = None) -> None:
        if slots < 1:
            raise ValueError(f"an engine needs at least one slot, got {slots}")
        self.model = model
        self.language: DeepseekV2ForCausalLM = model.language
        self.device = self.language.model.embed_tokens.weight.device
        self.slots = int(slots)
        # Positions per slot: the model's whole context unless told less (a benchmark's short requests).
        self.context = min(int(context or self.language.config.max_position_embeddings),
                           self.language.config.max_position_embeddings)
        self.prefill_chunk = int(prefill_chunk or os.environ.get("DEEPSEEK_VL2_PREFILL_CHUNK", DEFAULT_PREFILL_CHUNK))
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {self.prefill_chunk}")
        # Vision blocks times tiles per unit: the tower of a joining request runs in pieces, the others
        # decoding between them (a whole 2-tile image took ~0.7 s of tiny's decode on 2 cores).
        self.vision_unit = int(os.environ.get("DEEPSEEK_VL2_VISION_UNIT", DEFAULT_VISION_UNIT))
        if self.vision_unit < 1:
            raise ValueError(f"DEEPSEEK_VL2_VISION_UNIT must be at least 1, got {self.vision_unit}")
        # Prefill work between two decode steps (0: one unit, as small as the units go).
        if prefill_budget_ms is None:
            prefill_budget_ms = float(os.environ.get("DEEPSEEK_VL2_PREFILL_BUDGET_MS", DEFAULT_PREFILL_BUDGET_MS))
        if not prefill_budget_ms >= 0:
            raise ValueError(f"DEEPSEEK_VL2_PREFILL_BUDGET_MS must be 0 or more, got {prefill_budget_ms:g}")
        self.prefill_budget_s = prefill_budget_ms / 1000
        # Decoder layers per unit of a prompt chunk (DEEPSEEK_VL2_PREFILL_LAYERS; 0: the whole chunk in one unit).
        self.prefill_layers = int(os.environ.get("DEEPSEEK_VL2_PREFILL_LAYERS", DEFAULT_PREFILL_LAYERS))
        if self.prefill_layers < 0:
            raise ValueError(f"DEEPSEEK_VL2_PREFILL_LAYERS must be 0 or more, got {self.prefill_layers}")
        self._unit_seconds: dict[str, float] = {}  # the last vision / prompt unit's duration, to predict the next
        # CUDA graphs pad a batch to its bucket with rows that write to one spare slot (never a request's).
        self.graphs: Optional[CudaGraphDecoder] = None
        spare = 0
        if CudaGraphDecoder.supported(self.language) and os.environ.get("DEEPSEEK_VL2_CUDA_GRAPHS", "1") != "0":
            spare = 1
        self.cache_batch = self.slots + spare
        self._own_cache()
        if self.device.type == "cpu":
            # The kernels that decode this model's dtype, loaded now (built if need be): sampling takes them
            # from the first token on. Loaded only by the first decode step, they had left a fresh process's
            # first sampled token to PyTorch's sampler, whose draws differ: the same seed gave another text
            # than in a process that had decoded before.
            load_cpu_kernels(self.language.model.embed_tokens.weight.dtype)
        if spare:
            self.graphs = CudaGraphDecoder(self.language, max_rows=self.slots, spare_slot=self.slots,
                                           compile=os.environ.get("DEEPSEEK_VL2_COMPILE", "1") == "1")
        self._free_slots = list(range(self.slots))
        self._waiting: collections.deque[Request] = collections.deque()
        self._joining: list[Request] = []  # holding a slot, prefill under way
        self._decoding: list[Request] = []
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._threads = torch.get_num_threads()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._stop_reason = "the engine was stopped"
        self.steps = 0  # decode steps run (for tests and logs)
        self.max_rows_seen = 0
        # What the loop did, most recent last: ("decode", rows, seconds) or ("prefill", prompt tokens, seconds)
        # (a piece of the vision tower, or of a chunk's layers before its last, counts 0 tokens). For benchmarks.
        self.timeline: collections.deque[tuple[str, int, float]] = collections.deque(maxlen=100_000)

    # ---- public ---------------------------------------------------------------------------------------

    def submit(self, inputs: ImageInputs, config: GenerationConfig, eos_token_id: int,
               loop: Optional[asyncio.AbstractEventLoop] = None) -> Request:
        """Queue a request (``inputs`` on the model's device and dtype). With ``loop``, the ids are delivered
        to that event loop (``async for``); else iterate the request from any thread."""
        if self.device.type == "cpu":
            release_openmp_workers()  # (this thread's idle OpenMP team slowed the engine's: see there)
        request = Request(inputs, config, eos_token_id, loop)
        request._engine = self
        with self._work:
            if self._stopping:
                raise RuntimeError(self._stop_reason)
            self._waiting.append(request)
            self._start_locked()
            self._work.notify()
        return request

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._joining) + len(self._decoding)

    def stop(self, reason: str = "the engine was stopped") -> None:
        """Fail every request still in flight (with ``reason``) and end the thread (a stopped engine takes no
        requests)."""
        with self._work:
            self._stopping = True
            self._stop_reason = reason
            self._work.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    # ---- the loop -------------------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._work:
            self._work.notify()

    def _start_locked(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="deepseek-vl2-engine", daemon=True)
            self._thread.start()
            # At exit, let the thread finish its step first: a daemon thread still inside a kernel while the
            # interpreter tears down the thread pools ended the process with "terminate called" (SIGABRT).
            atexit.register(_stop_at_exit, weakref.ref(self))

    def _run(self) -> None:
        torch.set_num_threads(self._threads)  # (per thread with OpenMP: as the thread that made the engine)
        with torch.inference_mode():
            while True:
                with self._work:
                    while not (self._stopping or self._waiting or self._joining or self._decoding):
                        self._work.wait()
                    if self._stopping:
                        break
                    self._admit_locked()
                try:
                    self.iteration()
                except Exception as exc:  # noqa: BLE001 - never leave a request waiting on a dead loop
                    for request in [*self._joining, *self._decoding]:
                        self._leave(request, exc)
        error = RuntimeError(self._stop_reason)
        for request in [*self._waiting, *self._joining, *self._decoding]:
            request._finish(error)

    def _admit_locked(self) -> None:
        while self._waiting and (self._free_slots or self._waiting[0].cancelled):
            request = self._waiting.popleft()
            if request.cancelled:
                request._finish(RequestCancelled())
                continue
            request.slot = self._free_slots.pop(0)
            request.units_left = self._prefill_units(request)
            request.stats.queued_s = time.perf_counter() - request.submitted
            self._joining.append(request)

    def _own_cache(self) -> None:
        """(Re)allocate the model's cache for this engine: every slot over the whole context."""
        self.language.setup_cache(self.context, batch=self.cache_batch)
        self._cache_version = self.language.cache_version

    def iteration(self) -> None:
        """One turn of the loop: drop cancelled requests, one unit of prefill, one decode step."""
        if self.language.cache_version != self._cache_version:
            # Someone else called setup_cache (a test, a script): the sequences held there are gone.
            for request in [r for r in self._joining if r.prefilled] + self._decoding:
                self._leave(request, RuntimeError("the model's cache was reallocated outside the engine"))
            self._own_cache()
        for request in [r for r in self._joining + self._decoding if r.cancelled]:
            self._leave(request, RequestCancelled())
        if self._joining:
            self._prefill_work()
        if self._decoding:
            self._decode_step()

    def _leave(self, request: Request, error: Optional[BaseException] = None) -> None:
        for group in (self._joining, self._decoding):
            if request in group:
                group.remove(request)
        if request.slot is not None:
            with self._lock:
                self._free_slots.append(request.slot)
                self._free_slots.sort()
            request.slot = None
        request._finish(error)

    # ---- prefill --------------------------------------------------------------------------------------

    def _prefill_work(self) -> None:
        """Prefill units of the oldest joining request: one when nobody is decoding (the loop comes back at once,
        admitting and cancelling in between), else as many of its units as fit in ``prefill_budget_s`` by their
        predicted durations, at least one. One request a turn: requests that join together then start (and
        finish) a step apart, not all in the same step, whose burst of answers brought their clients' next
        requests to Cog's server at the same moment (where its slot pool's try-lock refused some with HTTP
        409 when it ran on several threads: ``predict.cog_server_warnings``)."""
        started = time.perf_counter()
        request = self._joining[0]
        target = self._turn_seconds(request)
        self._prefill_unit(request)
        while self._decoding and self._joining and self._joining[0] is request:
            elapsed, upcoming = time.perf_counter() - started, self._predicted(request)
            if elapsed + upcoming > self.prefill_budget_s:
                return
            # (past the unit boundary nearest the turn's share, unless the rest of the prefill fits in this turn)
            if elapsed + upcoming / 2 > target and elapsed + self._remaining_seconds(request) > self.prefill_budget_s:
                return
            self._prefill_unit(request)

    def _prefill_units(self, request: Request) -> dict[str, int]:
        """How many units the request's prefill takes, by kind: one per ``_vision_blocks_per_unit`` vision blocks (one
        when it has no image), and per chunk of the prompt one per ``prefill_layers`` decoder layers."""
        pixels = request.inputs.pixel_values if request.inputs is not None else None
        has_tiles = pixels is not None and pixels.shape[0] > 0
        vision = math.ceil(self.model.config.vision.layers / self._vision_blocks_per_unit(request)) if has_tiles else 1
        layers = self.language.config.num_hidden_layers
        per_chunk = math.ceil(layers / self.prefill_layers) if self.prefill_layers else 1
        return {"vision": vision, "prompt": math.ceil(request.prompt_len / self.prefill_chunk) * per_chunk}

    def _remaining_seconds(self, request: Request) -> float:
        """The request's prefill still to run, predicted from the last unit of each kind (inf before one ran)."""
        return sum(left * self._unit_seconds.get(kind, float("inf")) for kind, left in request.units_left.items() if left > 0)

    def _turn_seconds(self, request: Request) -> float:
        """The prefill time this turn should take: the request's predicted remaining prefill spread evenly over
        the fewest turns that each fit in the budget. Its pauses are then as short as that many decode steps
        allow: a prompt of 0.95 s under a budget of 0.425 s takes three turns of ~0.32 s, where filling each turn
        up to the budget had made them 0.39, 0.35 and 0.21 s (the longest pause sets the readers' p95).
        The budget itself while a kind of unit the request still has was never timed."""
        remaining = self._remaining_seconds(request)
        if not math.isfinite(remaining) or self.prefill_budget_s <= 0:
            return self.prefill_budget_s
        return remaining / max(1, math.ceil(remaining / self.prefill_budget_s))

    @staticmethod
    def _unit_kind(request: Request) -> str:
        """What the request's next prefill unit is: "vision" (a few blocks of its images) or "prompt"."""
        return "vision" if request.embeds is None and request.prefilled == 0 else "prompt"

    def _predicted(self, request: Request) -> float:
        """How long the request's next prefill unit should take: the last unit of its kind, unknown (inf)
        before one ran."""
        return self._unit_seconds.get(self._unit_kind(request), float("inf"))

    def _prefill_unit(self, request: Request) -> None:
        started = time.perf_counter()
        kind = self._unit_kind(request)
        request.units_left[kind] -= 1  # (both kinds counted on admission)
        try:
            if kind == "vision":  # (the images: a few vision blocks a unit)
                if request.embedding is None:
                    self._start_embedding(request)
                finished, embeds = advance(request.embedding)
                if finished:
                    request.embedding = None
                    self._embedded(request, embeds)
                self._unit_seconds["vision"] = time.perf_counter() - started
                self.timeline.append(("prefill", 0, self._unit_seconds["vision"]))
                return
            if request.max_new == 0:
                self._leave(request)
                return
            start = request.prefilled
            end = min(start + self.prefill_chunk, request.prompt_len)
            if request.chunk is None:
                request.chunk = prefill_steps(self.language, request.embeds[:, start:end], start_pos=start,
                                              slot=request.slot, layers_per_step=self.prefill_layers)
            finished, logits = advance(request.chunk)
            self._unit_seconds["prompt"] = time.perf_counter() - started
            if not finished:  # (a piece of the chunk's layers: its tokens count when the last is done)
                self.timeline.append(("prefill", 0, self._unit_seconds["prompt"]))
                return
            request.chunk = None
            request.prefilled = end
            self.timeline.append(("prefill", end - start, self._unit_seconds["prompt"]))
            if end < request.prompt_len:
                return
            request.embeds = None
            self._joining.remove(request)
            self._decoding.append(request)
            self._take(request, logits)
        except Exception as exc:  # noqa: BLE001 - this request fails alone; the others go on
            self._leave(request, exc)

    def _start_embedding(self, request: Request) -> None:
        config = request.config
        context = min(self.context, self.language.config.max_position_embeddings)  # (the config may say less now)
        if request.prompt_len >= context:
            raise ValueError(f"the prompt is {request.prompt_len} tokens; the model's context is {context}")
        request.max_new = max(0, min(config.max_new_tokens, context - request.prompt_len))
        request.embedding = self.model.prepare_inputs_embeds_steps(request.inputs, self._vision_blocks_per_unit(request))

    def _vision_blocks_per_unit(self, request: Request) -> int:
        """Vision blocks a unit of the request's images runs: ``vision_unit`` blocks times tiles over its tiles (they go
        through the tower together), at least one."""
        pixels = request.inputs.pixel_values
        return max(1, self.vision_unit // max(1, int(pixels.shape[0]) if pixels is not None else 0))

    def _embedded(self, request: Request, embeds: torch.Tensor) -> None:
        config = request.config
        request.embeds = embeds
        request.inputs = None  # (its pixel values are not needed any more)
        request.stats.embedded_s = time.perf_counter() - request.submitted
        if config.do_sample:
            request.generator = torch.Generator(device=self.device)
            if config.seed is not None:
                request.generator.manual_seed(config.seed)
            else:
                request.generator.seed()
        if config.penalty is not None:
            request.seen = torch.empty(request.prompt_len + request.max_new, dtype=torch.long, device=self.device)
            request.seen[: request.prompt_len] = request.prompt_ids
            request.n_seen = request.prompt_len

    # ---- decode ---------------------------------------------------------------------------------------

    def _take(self, request: Request, logits: torch.Tensor) -> None:
        """Sample the request's next token from its logits [V]; deliver it, or finish the request."""
        config = request.config
        token = getattr(logits, "known_argmax", None) if not config.do_sample and config.penalty is None else None
        if token is None:
            seen = request.seen[: request.n_seen] if request.seen is not None else _NO_IDS
            token = next_token_id(logits, seen, config, request.generator)
        if request.generated == 0:
            request.stats.first_token_s = time.perf_counter() - request.submitted
        if token == request.eos_token_id:
            self._leave(request)
            return
        request.generated += 1
        request.stats.new_tokens = request.generated
        request._deliver(token)
        if request.generated >= request.max_new:
            self._leave(request)
            return
        if request.seen is not None:
            request.seen[request.n_seen] = token
            request.n_seen += 1
        request.last_token = token

    def _decode_step(self) -> None:
        rows = list(self._decoding)
        tokens = [r.last_token for r in rows]
        positions = [r.prompt_len + r.generated - 1 for r in rows]
        slots = [r.slot for r in rows]
        started = time.perf_counter()
        try:
            logits = self._decode(tokens, positions, slots)
        except Exception as exc:  # noqa: BLE001 - the step is shared: every row in it fails
            for request in rows:
                self._leave(request, exc)
            return
        self.timeline.append(("decode", len(rows), time.perf_counter() - started))
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(rows))
        known = getattr(logits, "known_argmaxes", None)
        for b, request in enumerate(rows):
            row = logits[b]
            if known is not None:
                row.known_argmax = known[b]
            try:
                self._take(request, row)
            except Exception as exc:  # noqa: BLE001 - sampling failed for this row alone
                self._leave(request, exc)

    def _decode(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """Logits [B, V] of one decode step of these rows."""
        if self.graphs is not None:
            return self.graphs(tokens, positions, slots)
        return decode_step(self.language, tokens, positions, slots)


_NO_IDS = torch.empty(0, dtype=torch.long)


def _stop_at_exit(engine_ref: "weakref.ReferenceType[BatchEngine]") -> None:
    engine = engine_ref()
    if engine is not None:
        engine.stop()


def engine_for(model: DeepseekVL2, slots: Optional[int] = None, context: Optional[int] = None) -> BatchEngine:
    """The model's engine (one per model: it owns the model's cache), made on first use with ``slots``
    slots (default: ``DEEPSEEK_VL2_MAX_CONCURRENCY``, else ``default_slots``) of ``context`` positions (default:
    the model's context). Asking for other slots or context replaces it (requests in flight on the old one
    fail)."""
    engine: Optional[BatchEngine] = model.__dict__.get("_engine")
    if slots is None:
        slots = engine.slots if engine is not None else configured_slots(model)
    if context is None:
        context = engine.context if engine is not None else model.language.config.max_position_embeddings
    if engine is None or engine.slots != slots or engine.context != context:
        if engine is not None:
            engine.stop()
        engine = model._engine = BatchEngine(model, slots, context=context)
    return engine


def configured_slots(model: DeepseekVL2) -> int:
    """``DEEPSEEK_VL2_MAX_CONCURRENCY`` if set (a whole number >= 1), else ``default_slots`` for the model."""
    value = os.environ.get("DEEPSEEK_VL2_MAX_CONCURRENCY", "").strip()
    if value:
        try:
            slots = int(value)
        except ValueError:
            slots = 0
        if slots < 1:
            raise ValueError(f"DEEPSEEK_VL2_MAX_CONCURRENCY must be a whole number >= 1, got {value!r}")
        return slots
    weight = model.language.model.embed_tokens.weight  # (the model's device and dtype, whatever its linears' format)
    return default_slots(weight.device, cache_bytes_per_request(model.config, weight.dtype))


def generate_stream(model: DeepseekVL2, inputs: ImageInputs, config: GenerationConfig, eos_token_id: int) -> Iterator[int]:
    """Yield new token ids one by one until eos (not yielded) or ``max_new_tokens``, through the model's
    batching engine (``engine.engine_for``: requests from other threads share its steps).

    ``max_new_tokens`` is clamped to the context left after the prompt; a prompt that alone fills the
    context raises ``ValueError``.
    """
    limit = model.language.config.max_position_embeddings
    prompt_len = int(inputs.input_ids.shape[-1])
    if prompt_len >= limit:
        raise ValueError(f"the prompt is {prompt_len} tokens; the model's context is {limit}")
    if config.max_new_tokens <= 0:
        return iter(())
    return iter(engine_for(model).submit(inputs, config, eos_token_id))


def generate(model: DeepseekVL2, inputs: ImageInputs, config: GenerationConfig, eos_token_id: int) -> list[int]:
    """All new token ids (without the end-of-sentence id)."""
    return list(generate_stream(model, inputs, config, eos_token_id))
