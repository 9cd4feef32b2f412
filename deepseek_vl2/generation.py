"""Token generation: ``prefill``, ``decode_one_token`` and ``sample`` as plain functions (gpt-fast style).

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

import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch

from .kernels import draw_top_k, first_argmax, sampling_candidates
from .language import DeepseekV2ForCausalLM
from .model import DeepseekVL2, ImageInputs


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


def prefill(language: DeepseekV2ForCausalLM, inputs_embeds: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
    """Run the whole prompt [1, T, D] through the decoder, filling the cache; logits of its last token [V]."""
    return language(inputs_embeds, start_pos=start_pos, use_cache=True, last_only=True)[0, -1]


def decode_one_token(language: DeepseekV2ForCausalLM, token: Union[int, torch.Tensor], pos: int) -> torch.Tensor:
    """One step: token id (an int or a 0-d tensor) at position ``pos`` -> logits [V]."""
    if isinstance(token, int) or not token.is_cuda:  # on the CPU: the whole step in one kernel call where it applies
        logits = language.decode_step_cpu(int(token), pos)
        if logits is not None:
            return logits
    if isinstance(token, int):
        token = torch.tensor(token, device=language.lm_head.weight.device)
    embeds = language.model.embed_tokens(token.view(1, 1))
    return language(embeds, start_pos=pos, use_cache=True)[0, -1]


class CudaGraphDecoder:
    """``decode_one_token`` as CUDA-graph replays: one launch per step instead of hundreds.

    A graph needs fixed shapes, so attention covers a fixed window of cache slots (masked after the
    current position); one graph is captured per power-of-two window, on first use. Graphs are dropped
    when the cache is reallocated.
    """

    MIN_WINDOW = 256

    def __init__(self, language: DeepseekV2ForCausalLM, compile: bool = False) -> None:
        self.language = language
        # Optionally let torch.compile fuse the step's elementwise work first (fewer kernels per graph).
        self.compiled = self.wants_compile = compile
        # dynamic=None: the window is specialised once, then compiled as a symbolic size on its first change.
        self.step = torch.compile(language.decode_static, dynamic=None) if compile else language.decode_static
        device = language.lm_head.weight.device
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.cache_version = language.cache_version

    @staticmethod
    def supported(language: DeepseekV2ForCausalLM) -> bool:
        from .language import _grouped_mm_ok

        weight = language.lm_head.weight
        return (
            weight.is_cuda
            and _grouped_mm_ok(weight)  # the loop over experts needs host-side counts
            and language.model.rotary.kind != "dynamic"  # its base depends on the length, read on the host
        )

    @classmethod
    def window_for(cls, pos: int) -> int:
        """The power-of-two attention window (at least MIN_WINDOW) that covers position ``pos``."""
        window = cls.MIN_WINDOW
        while window < pos + 1:
            window *= 2
        return window

    def __call__(self, token: Union[int, torch.Tensor], pos: int) -> torch.Tensor:
        if self.cache_version != self.language.cache_version:
            self.graphs.clear()
            self.cache_version = self.language.cache_version
        window = min(self.window_for(pos), self.language.max_seq_len)
        if isinstance(token, int):
            self.token.fill_(token)
        else:
            self.token.copy_(token.view(1))
        self.position.fill_(pos)
        if window not in self.graphs:
            self.graphs[window] = self._capture(window)
        graph, logits = self.graphs[window]
        graph.replay()
        return logits

    def _capture(self, window: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        try:
            return self._capture_with(self.step, window)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back to the plain step
            if not self.compiled:
                raise
            warnings.warn(f"torch.compile of the decode step failed ({exc!r:.200}); using uncompiled CUDA graphs")
            self.step, self.compiled = self.language.decode_static, False
            return self._capture_with(self.step, window)

    def _capture_with(self, step, window: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up runs (required before capture) write this step's own keys/values: harmless.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step(self.token, self.position, window)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step(self.token, self.position, window)
        return graph, logits


def _step_function(language: DeepseekV2ForCausalLM, cuda_graphs: Optional[bool]):
    """decode_one_token, or its CUDA-graph version where supported.

    ``DEEPSEEK_VL2_CUDA_GRAPHS=0`` disables the graphs; ``DEEPSEEK_VL2_COMPILE=0`` skips torch.compile of
    the step (which fuses its elementwise work: ~1.6x faster decode on an H200, ~30-45 s once per process).
    """
    if cuda_graphs is None:
        cuda_graphs = os.environ.get("DEEPSEEK_VL2_CUDA_GRAPHS", "1") != "0"
    if not (cuda_graphs and CudaGraphDecoder.supported(language)):
        return lambda token, pos: decode_one_token(language, token, pos)
    compile = os.environ.get("DEEPSEEK_VL2_COMPILE", "1") == "1"
    decoder = getattr(language, "graph_decoder", None)
    if decoder is None or decoder.wants_compile != compile:
        decoder = language.graph_decoder = CudaGraphDecoder(language, compile)
    return decoder


@torch.inference_mode()
def generate_stream(
    model: DeepseekVL2, inputs: ImageInputs, config: GenerationConfig, eos_token_id: int, cuda_graphs: Optional[bool] = None
) -> Iterator[int]:
    """Yield new token ids one by one until eos (not yielded) or ``max_new_tokens``.

    ``max_new_tokens`` is clamped to the context left after the prompt; a prompt that alone fills the
    context raises ``ValueError``.
    """
    embeds = model.prepare_inputs_embeds(inputs)
    yield from generate_from_embeds(model.language, embeds, inputs.input_ids, config, eos_token_id, cuda_graphs)


@torch.inference_mode()
def generate_from_embeds(
    language: DeepseekV2ForCausalLM,
    embeds: torch.Tensor,
    prompt_ids: torch.Tensor,
    config: GenerationConfig,
    eos_token_id: int,
    cuda_graphs: Optional[bool] = None,
) -> Iterator[int]:
    """Generation once the prompt is embedded: embeds [1, T, D], prompt_ids [T] (for the penalty)."""
    prompt_len = embeds.shape[1]
    limit = language.config.max_position_embeddings
    if prompt_len >= limit:
        raise ValueError(f"the prompt is {prompt_len} tokens; the model's context is {limit}")
    max_new = min(config.max_new_tokens, limit - prompt_len)
    if max_new <= 0:
        return
    device = embeds.device
    # On CUDA the cache always spans the whole context: its shape then never changes, so the compiled
    # decode step is never recompiled for a new cache size (and nothing is reallocated between requests).
    language.setup_cache(limit if device.type == "cuda" else prompt_len + max_new)
    generator = None
    if config.do_sample:
        generator = torch.Generator(device=device)
        if config.seed is not None:
            generator.manual_seed(config.seed)
        else:
            generator.seed()
    # Every id seen so far, repeats included (the penalty touches only these logits).
    seen = torch.empty(prompt_len + max_new, dtype=torch.long, device=device)
    seen[:prompt_len] = prompt_ids.to(device).view(-1)
    n_seen = prompt_len
    # Greedy without a penalty takes the argmax that the CPU step kernel found (``known_argmax``) as a plain
    # int: each step streams the weights through every cache, so every tensor op between two steps runs
    # from cold caches (tiny, bf16: the loop's time between two steps 260 -> 140 us; 30 us in a bare loop of steps).
    plain_greedy = not config.do_sample and config.penalty is None

    step_fn = _step_function(language, cuda_graphs)
    logits = prefill(language, embeds)
    for step in range(max_new):
        token_id = getattr(logits, "known_argmax", None) if plain_greedy else None
        if token_id is None:
            token_id = next_token_id(logits, seen[:n_seen], config, generator)  # the one host sync per step
        if token_id == eos_token_id:
            return
        yield token_id
        if step == max_new - 1:
            return
        if config.penalty is not None:
            seen[n_seen] = token_id
            n_seen += 1
        logits = step_fn(token_id, prompt_len + step)


def generate(
    model: DeepseekVL2, inputs: ImageInputs, config: GenerationConfig, eos_token_id: int, cuda_graphs: Optional[bool] = None
) -> list[int]:
    """All new token ids (without the end-of-sentence id)."""
    return list(generate_stream(model, inputs, config, eos_token_id, cuda_graphs))
