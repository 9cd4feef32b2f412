"""Token generation: ``prefill``, ``decode_step`` and ``sample`` as plain functions (gpt-fast style); the
batching engine (``engine.py``) drives them for every request.

Semantics follow what the official demo gets from Hugging Face ``generate``:

* repetition penalty over every id seen so far — the whole prompt, image-token ids included, and the
  answer so far: a seen token's logit is divided by the penalty when positive, multiplied when negative;
* sampling: penalty, then temperature, top-k (50, Hugging Face's default, which the official demo never
  overrides) and top-p (smallest set whose probability reaches ``top_p``, renormalised); greedy when
  ``temperature`` or ``top_p`` is 0;
* stop at the end-of-sentence id, which is not returned.

The prompt is prefilled in one pass over text and image embeddings into a preallocated cache; each
step then runs one token. The only host synchronisation per step is reading the sampled id.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .kernels import draw_top_k, first_argmax, sampling_candidates
from .language import DeepseekV2ForCausalLM
from .steps import Steps, run_steps


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 0: greedy
    repetition_penalty: float = 1.0  # 1 (or 0): no penalty
    top_k: int = 50  # Hugging Face generate's default, which the official demo inherits; 0: off
    seed: Optional[int] = None

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0 and self.top_p > 0

    @property
    def penalty(self) -> Optional[float]:
        return None if self.repetition_penalty in (0.0, 1.0) else self.repetition_penalty


def _seen_ids(seen: torch.Tensor) -> torch.Tensor:
    """The ids seen so far (repeats allowed) from ``seen``: those ids, or a [V] bool mask of them."""
    return seen.nonzero().view(-1) if seen.dtype == torch.bool else seen


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [V] fp32; seen: [V] bool, or the ids seen so far (repeats allowed) -> penalised logits
    (Hugging Face's rule). With ids only those logits are touched, not the whole vocabulary."""
    ids = _seen_ids(seen)
    picked = logits.index_select(0, ids)
    out = logits.clone()
    out[ids] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return out


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax()`` for a [V] vector, as a 0-d tensor. Logits straight from the CPU whole-step
    kernel carry it (``known_argmax``, see ``DeepseekV2ForCausalLM.decode_step_cpu``). Else, on the CPU:
    one call into our kernels where they are loaded (``kernels.first_argmax``); else, as PyTorch's argmax
    is a scalar loop there (~110 us for 129k logits) while ``amax`` is vectorised (~7 us), find the first
    row of 1024 that holds the maximum, then the first maximum in it (the same index: the first
    occurrence)."""
    index = getattr(logits, "known_argmax", None)
    if index is None:
        index = first_argmax(logits)  # (one call where our CPU kernels are loaded)
    if index is not None:
        return torch.tensor(index)
    width = 1024
    if logits.is_cuda or logits.numel() < 4 * width or not bool(torch.isfinite(maximum := logits.amax())):
        return logits.argmax()
    rows = logits.numel() // width
    head = logits[: rows * width].view(rows, width)
    in_head = head.amax(dim=1) == maximum
    if bool(in_head.any()):
        row = int(in_head.to(torch.uint8).argmax())
        return head[row].argmax() + row * width
    return logits[rows * width :].argmax() + rows * width


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0) -> torch.Tensor:
    """Next-token distribution after temperature, top-k and top-p; zeros outside the nucleus. [V] -> [V]."""
    logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits)  # ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[-1] = False  # always keep the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def sample(logits: torch.Tensor, seen: torch.Tensor, config: GenerationConfig, generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits [V] fp32, seen: ids seen so far (or a [V] bool mask) -> next token id as a 0-d tensor
    (still on the device)."""
    vocab = logits.shape[-1]
    top_k = config.top_k if config.do_sample else 1  # (greedy: the first of the largest)
    # Only logits at or above the k-th largest can be drawn (ties with it included, as in the full path), so
    # temperature, top-p and the draw run over those alone: the same distribution, without sorting the whole
    # vocabulary (~7 ms per token for 129k logits). On the CPU, with the penalty, in one call into our kernels.
    shortcut = 0 < top_k < vocab and not logits.is_cuda
    if shortcut and (config.do_sample or config.penalty is not None):
        found = sampling_candidates(logits, _seen_ids(seen), config.penalty or 1.0, top_k)
        if found is not None:
            ids, values = found
            return _draw_among(ids, values, config, generator) if config.do_sample else ids[0]
    if config.penalty is not None:
        logits = apply_repetition_penalty(logits, seen, config.penalty)
    if not config.do_sample:
        return _argmax(logits)
    if shortcut and not bool(logits.isnan().any()):  # (the same shortcut in PyTorch)
        ids = (logits >= torch.topk(logits, top_k).values[-1]).nonzero().view(-1)
        return _draw_among(ids, logits[ids], config, generator)
    probs = sampling_probs(logits, config.temperature, config.top_p, top_k)
    return torch.multinomial(probs, 1, generator=generator)[0]


def next_token_id(logits: torch.Tensor, seen: torch.Tensor, config: GenerationConfig, generator: Optional[torch.Generator]) -> int:
    """``int(sample(...))``. Sampling on the CPU with our kernels built: the penalty, the top-k candidates,
    temperature, top-p and the draw in one call (the same distribution; a seed gives other draws than
    PyTorch's path), where the ~10 small PyTorch ops of ``sample`` took ~0.5 ms a token right after a
    decode step, from cold caches."""
    if config.do_sample and 0 < config.top_k < logits.shape[-1] and not logits.is_cuda:
        drawn = draw_top_k(logits, _seen_ids(seen), config.penalty or 1.0, config.top_k, config.temperature, config.top_p,
                           generator)
        if drawn is not None:
            return drawn
    return int(sample(logits, seen, config, generator))


def _draw_among(ids: torch.Tensor, logits: torch.Tensor, config: GenerationConfig, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One of the candidate ``ids`` [N], drawn after temperature and top-p over their ``logits`` [N]."""
    probs = sampling_probs(logits, config.temperature, config.top_p, top_k=0)
    return ids[torch.multinomial(probs, 1, generator=generator)[0]]


def prefill(language: DeepseekV2ForCausalLM, inputs_embeds: torch.Tensor, start_pos: int = 0, slot: int = 0) -> torch.Tensor:
    """Run prompt embeddings [1, S, D] at positions start_pos.. through the decoder, filling cache slot
    ``slot``; logits of the last one [V]. A prompt goes in whole or in chunks, each after the ones before."""
    return run_steps(prefill_steps(language, inputs_embeds, start_pos, slot))


def prefill_steps(language: DeepseekV2ForCausalLM, inputs_embeds: torch.Tensor, start_pos: int = 0, slot: int = 0,
                  layers_per_step: Optional[int] = None) -> Steps[torch.Tensor]:
    """``prefill`` in pieces of ``layers_per_step`` decoder layers (the serving engine's units), returning the
    same logits [V]."""
    logits = yield from language.forward_steps(inputs_embeds, start_pos=start_pos, use_cache=True, last_only=True,
                                               slot=slot, layers_per_step=layers_per_step)
    return logits[0, -1]


def decode_step(language: DeepseekV2ForCausalLM, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
    """One decode step of B sequences: token ``tokens[b]`` at position ``positions[b]`` of cache slot
    ``slots[b]`` -> logits [B, V] fp32. On the CPU one call into our kernels where they apply (the logits
    then carry ``known_argmaxes``, the argmax of each row found as they were written); else
    ``decode_rows`` in PyTorch. (On CUDA the engine replays ``CudaGraphDecoder`` instead.)"""
    device = language.model.embed_tokens.weight.device
    if device.type == "cpu":
        rows_kernel = getattr(language, "decode_rows_cpu", None)
        logits = rows_kernel(tokens, positions, slots) if rows_kernel is not None else None
        if logits is not None:
            return logits
        if len(tokens) == 1:  # one row: the layers one by one, each sub-layer one kernel call where they apply
            embeds = language.model.embed_tokens(torch.tensor([tokens]))
            return language(embeds, start_pos=positions[0], use_cache=True, slot=slots[0])[:, -1]
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return language.decode_rows(as_tensor(tokens), as_tensor(positions), as_tensor(slots), window=max(positions) + 1)


def decode_one_token(language: DeepseekV2ForCausalLM, token: Union[int, torch.Tensor], pos: int, slot: int = 0) -> torch.Tensor:
    """``decode_step`` of one sequence: token id (an int or a 0-d tensor) at position ``pos`` -> logits [V]."""
    return decode_step(language, [int(token)], [pos], [slot])[0]


def _torch_compile(step):
    # dynamic=None: shapes are specialised once, then compiled as symbolic sizes on their first change.
    return torch.compile(step, dynamic=None)


class CudaGraphDecoder:
    """``DeepseekV2ForCausalLM.decode_rows`` as CUDA-graph replays: one launch per step instead of hundreds.

    A graph needs fixed shapes, so a step of B rows runs in the graph of the smallest bucket (a power of two)
    holding B, the extra rows decoding a dummy token into ``spare_slot`` (a cache slot no request owns), and
    attention covers a fixed window of cache positions (a power of two, at least MIN_WINDOW) masked after each
    row's position. One graph per (bucket, window), captured on first use. Graphs are dropped when the cache
    is reallocated.

    ``compile``: torch.compile fuses the step's elementwise work (fewer kernels per graph, ~1.6x faster decode
    on an H200) but takes 30-70 s. So the graphs replay the plain step at once, while a background thread
    compiles the step (its warm-up calls decode into the spare slot only); the next step after it finishes
    drops the graphs, which are then captured again from the compiled step. If compiling fails (no C
    compiler, a Triton error), one log line says why and the plain graphs go on serving.
    """

    MIN_WINDOW = 256

    def __init__(self, language: DeepseekV2ForCausalLM, max_rows: int, spare_slot: int, compile: bool = False,
                 compiler=_torch_compile, log=None) -> None:
        self.language = language
        self.spare_slot = spare_slot
        self.step = language.decode_rows  # what the graphs capture (the compiled step once it is ready)
        self.compiled = False
        self.compile_error: Optional[BaseException] = None
        self.compile_seconds: Optional[float] = None
        self._ready: Optional[object] = None  # a compiled step, waiting for the switch
        self._log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        device = language.model.embed_tokens.weight.device
        self.max_bucket = self.bucket_for(max_rows)
        # Rows' tokens, positions and slots: one host-to-device copy per step into these static buffers.
        self.rows = torch.zeros(3, self.max_bucket, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.cache_version = language.cache_version
        self.compile_thread: Optional[threading.Thread] = None
        if compile:
            self.compile_thread = threading.Thread(target=self._compile, args=(compiler,), name="decode-step-compile",
                                                   daemon=True)
            self.compile_thread.start()

    @staticmethod
    def supported(language: DeepseekV2ForCausalLM) -> bool:
        from .language import _grouped_mm_ok

        # (None for quantized linears: their experts run one by one with counts read on the host)
        weight = getattr(language.lm_head, "weight", None)
        return (
            weight is not None
            and weight.is_cuda
            and _grouped_mm_ok(weight)  # the loop over experts needs host-side counts
            and language.model.rotary.kind != "dynamic"  # its base depends on the length, read on the host
        )

    @staticmethod
    def bucket_for(rows: int) -> int:
        """The power of two that holds ``rows`` rows."""
        bucket = 1
        while bucket < rows:
            bucket *= 2
        return bucket

    @classmethod
    def window_for(cls, pos: int) -> int:
        """The power-of-two attention window (at least MIN_WINDOW) that covers position ``pos``."""
        window = cls.MIN_WINDOW
        while window < pos + 1:
            window *= 2
        return window

    def compile_shapes(self) -> list[tuple[int, int]]:
        """(bucket, window) of the background compile's warm-up calls: the first specialises, the next ones
        make the window and then the batch symbolic, so that later shapes need no recompiling."""
        window = min(self.MIN_WINDOW, self.language.max_seq_len)
        shapes = [(1, window), (1, min(2 * window, self.language.max_seq_len)), (min(2, self.max_bucket), window)]
        return list(dict.fromkeys(shapes))

    def _compile(self, compiler) -> None:
        started = time.perf_counter()
        try:
            step = compiler(self.language.decode_rows)
            device = self.rows.device
            rows = torch.zeros(3, self.max_bucket, dtype=torch.long, device=device)
            rows[2] = self.spare_slot  # (the warm-up decodes into the spare slot: no request's cache changes)
            side = torch.cuda.Stream(device) if device.type == "cuda" else None
            with torch.inference_mode(), (torch.cuda.stream(side) if side is not None else contextlib.nullcontext()):
                for bucket, window in self.compile_shapes():
                    step(rows[0, :bucket], rows[1, :bucket], rows[2, :bucket], window)
                if side is not None:
                    side.synchronize()
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the plain graphs go on serving
            self.compile_error = exc
            self._log(f"decode step: torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); "
                      "serving on with uncompiled CUDA graphs")
            return
        self.compile_seconds = time.perf_counter() - started
        self._ready = step

    def __call__(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """Logits [B, V] of one step of B rows (a view of the graph's output: read it before the next step)."""
        if self._ready is not None:  # the background compile is done: capture from the compiled step from now on
            self.step, self._ready, self.compiled = self._ready, None, True
            self.graphs.clear()
            self._log(f"decode step: compiled in {self.compile_seconds:.1f} s in the background; "
                      "CUDA graphs replay the compiled step from now on")
        if self.cache_version != self.language.cache_version:
            self.graphs.clear()
            self.cache_version = self.language.cache_version
        count = len(tokens)
        bucket = self.bucket_for(count)
        if bucket > self.max_bucket:
            raise ValueError(f"{count} rows exceed the {self.max_bucket} this decoder was made for")
        window = min(self.window_for(max(positions)), self.language.max_seq_len)
        pad = bucket - count
        rows = torch.tensor([tokens + [0] * pad, positions + [0] * pad, slots + [self.spare_slot] * pad], dtype=torch.long)
        self.rows[:, :bucket].copy_(rows, non_blocking=False)
        key = (bucket, window)
        if key not in self.graphs:
            self.graphs[key] = self._capture(bucket, window)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:count]

    def _capture(self, bucket: int, window: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        try:
            return self._capture_with(self.step, bucket, window)
        except Exception as exc:  # noqa: BLE001 - a compiled step that cannot be captured: the plain one
            if not self.compiled:
                raise
            self._log(f"decode step: capturing the compiled step failed ({type(exc).__name__}: {str(exc)[:200]}); "
                      "serving on with uncompiled CUDA graphs")
            self.compile_error = exc
            self.step, self.compiled = self.language.decode_rows, False
            self.graphs.clear()
            return self._capture_with(self.step, bucket, window)

    def _capture_with(self, step, bucket: int, window: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        tokens, positions, slots = self.rows[:, :bucket]
        # Warm-up runs (required before capture) write the rows' own keys/values again: harmless.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step(tokens, positions, slots, window)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the background compile may launch work from its own thread meanwhile.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            logits = step(tokens, positions, slots, window)
        return graph, logits
