"""Cog predictor for DeepSeek-VL2: the API of the Replicate model deepseek-ai/deepseek-vl2.

Inputs: image, prompt, top_p, temperature, max_length_tokens, repetition_penalty. Output: the answer.
Weights: ``DEEPSEEK_VL2_WEIGHTS`` = a model directory or a Hugging Face repo id (default
``deepseek-ai/deepseek-vl2``), resolved by ``deepseek_vl2.weights.resolve_weights``.
``DEEPSEEK_VL2_DTYPE`` (bfloat16 / float16 / float32) overrides the automatic dtype.

Concurrency: ``predict`` is async and serves up to ``MAX_CONCURRENCY`` predictions at once
(``DEEPSEEK_VL2_MAX_CONCURRENCY``, default 16 on a GPU and 8 on a CPU); they share decode steps in the
model's batching engine (``deepseek_vl2/engine.py``). Cog's server must be told the same number
(``COG_MAX_CONCURRENCY``: ``make serve`` sets it; ``cog.yaml``'s ``concurrency.max`` for an image).

Run it without Cog's CLI:  python predict.py --image examples/stages.png --prompt "Describe this image."
"""

import asyncio
import os
import sys
import time
from pathlib import Path as _FsPath

from typing import Optional

from cog import AsyncConcatenateIterator, BasePredictor, Input, Path, concurrent, streaming

from deepseek_vl2.pipeline import InputError, VL2Pipeline
from deepseek_vl2.weights import resolve_weights


def _explain_download_errors() -> None:
    """Make a failed image download read "Cannot download the image from URL: reason".

    Cog fetches URL inputs itself, before predict() runs, and reports a failure with the raw
    ``requests`` exception text. This wraps Cog's download step (``URLPath.convert``) so that the
    prediction still fails the same way, with a shorter message. Guarded: a Cog without that hook
    is left untouched.
    """
    try:
        import requests
        from cog.types import URLPath
    except ImportError:  # pragma: no cover - depends on the installed Cog
        return
    original = getattr(URLPath, "convert", None)
    if original is None or getattr(original, "_explains_errors", False):
        return

    def convert(self):  # type: ignore[no-untyped-def]
        try:
            return original(self)
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "error"
            reason = exc.response.reason if exc.response is not None else ""
            raise ValueError(f"Cannot download the image from {self.source}: HTTP {code} {reason}".rstrip()) from None
        except requests.Timeout:
            raise ValueError(f"Cannot download the image from {self.source}: the server did not answer in time") from None
        except requests.ConnectionError:
            raise ValueError(f"Cannot download the image from {self.source}: the server cannot be reached") from None

    convert._explains_errors = True  # type: ignore[attr-defined]
    URLPath.convert = convert


_explain_download_errors()


def max_concurrency() -> int:
    """Predictions served at once: ``DEEPSEEK_VL2_MAX_CONCURRENCY`` (a whole number >= 1), else 16 on a GPU
    and 8 on a CPU. Read when this module is imported: Cog takes it from ``@concurrent`` (and the server
    from ``COG_MAX_CONCURRENCY``, which it follows when only that is set). Memory may give the engine fewer cache slots than this (see
    ``deepseek_vl2.engine.default_slots``); predictions beyond them wait their turn inside the engine
    instead of being refused."""
    for name in ("DEEPSEEK_VL2_MAX_CONCURRENCY", "COG_MAX_CONCURRENCY"):  # (an operator may set Cog's alone)
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise SystemExit(f"{name} must be a whole number >= 1, got {value!r}")
            return int(value)
    import torch

    return 16 if torch.cuda.is_available() else 8


MAX_CONCURRENCY = max_concurrency()

# The documented inputs (the Replicate API), shared by both predictors.
IMAGE = Input(description="Input image file")
PROMPT = Input(description="Text prompt to guide the model")
TOP_P = Input(default=0.9, ge=0, le=1, description="Top-p sampling parameter")
TEMPERATURE = Input(default=0.1, ge=0, le=1, description="Temperature for sampling")
MAX_LENGTH_TOKENS = Input(default=2048, ge=0, le=4096, description="Maximum number of tokens to generate")
REPETITION_PENALTY = Input(default=1.1, ge=0, le=2, description="Repetition penalty")


class Predictor(BasePredictor):
    def setup(self) -> None:
        """Find (or download) the weights, load the model once (GPU in bf16, else the CPU in its fastest
        dtype), allocate the engine's cache and run a short warm-up."""
        from deepseek_vl2.engine import cache_bytes_per_slot, default_slots
        from deepseek_vl2.hardware import parse_dtype

        started = time.perf_counter()
        model_dir = resolve_weights(os.environ.get("DEEPSEEK_VL2_WEIGHTS"))
        dtype_name = os.environ.get("DEEPSEEK_VL2_DTYPE", "").strip()
        dtype = parse_dtype(dtype_name) if dtype_name else None
        self.pipeline = VL2Pipeline.load(model_dir, dtype=dtype)
        language = self.pipeline.model.language
        slots = MAX_CONCURRENCY
        if not {"DEEPSEEK_VL2_MAX_CONCURRENCY", "COG_MAX_CONCURRENCY"} & set(os.environ):  # the default: what memory allows
            slots = min(slots, default_slots(self.pipeline.device, cache_bytes_per_slot(language)))
        self.pipeline.start(slots)
        self.pipeline.warm_up()
        print(
            f"DeepSeek-VL2 loaded from {model_dir} on {self.pipeline.device} ({self.pipeline.dtype}) "
            f"in {time.perf_counter() - started:.1f} s; {MAX_CONCURRENCY} predictions at once, "
            f"{self.pipeline.engine.slots} decoding together",
            flush=True,
        )

    @concurrent(max=MAX_CONCURRENCY)
    async def predict(
        self,
        image: Path = IMAGE,
        prompt: str = PROMPT,
        top_p: float = TOP_P,
        temperature: float = TEMPERATURE,
        max_length_tokens: int = MAX_LENGTH_TOKENS,
        repetition_penalty: float = REPETITION_PENALTY,
    ) -> str:
        """Answer ``prompt`` about ``image``. Bad input raises ``InputError`` with a readable message (this
        prediction fails alone); cancelling the prediction frees its place in the engine within one step."""
        stats: list = []
        pieces = [piece async for piece in self.pipeline.astream(
            image=str(image),
            prompt=prompt,
            temperature=temperature,
            top_p=top_p,
            max_length_tokens=max_length_tokens,
            repetition_penalty=repetition_penalty,
            stats=stats,
        )]
        if stats:
            print(stats[0], flush=True)  # shows up in the prediction's logs
        return "".join(pieces)


class StreamingPredictor(Predictor):
    """The same model and inputs, plus ``seed``; the answer streams as it is generated (Replicate's token
    streaming: pieces to concatenate, none splitting a character). Deploy it with
    ``predict: "predict.py:StreamingPredictor"`` in cog.yaml; ``make serve-stream`` serves it locally."""

    @streaming  # (Server-Sent Events: `Accept: text/event-stream`)
    @concurrent(max=MAX_CONCURRENCY)
    async def predict(  # type: ignore[override]
        self,
        image: Path = IMAGE,
        prompt: str = PROMPT,
        top_p: float = TOP_P,
        temperature: float = TEMPERATURE,
        max_length_tokens: int = MAX_LENGTH_TOKENS,
        repetition_penalty: float = REPETITION_PENALTY,
        seed: Optional[int] = Input(default=None, description="Random seed: the same seed and settings give the same "
                                    "text on the same device. Leave empty for a random one"),
    ) -> AsyncConcatenateIterator[str]:
        """Stream the answer to ``prompt`` about ``image``. Bad input fails before the first piece."""
        stats: list = []
        async for piece in self.pipeline.astream(
            image=str(image),
            prompt=prompt,
            temperature=temperature,
            top_p=top_p,
            max_length_tokens=max_length_tokens,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stats=stats,
        ):
            yield piece
        if stats:
            print(stats[0], flush=True)


def _main(argv: list[str] | None = None) -> int:
    """One prediction through the real Predictor (what `make predict` and `make demo` run)."""
    import argparse

    parser = argparse.ArgumentParser(description="Run one DeepSeek-VL2 prediction through the Cog Predictor.")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--max-length-tokens", type=int, default=2048)
    parser.add_argument("--repetition-penalty", type=float, default=1.1)
    parser.add_argument("--random-weights-note", action="store_true",
                        help="say that the answer is gibberish (the demo's random checkpoint)")
    args = parser.parse_args(argv)

    predictor = Predictor()
    t0 = time.perf_counter()
    predictor.setup()
    t1 = time.perf_counter()
    try:
        # Called directly, predict() gets no Input() defaults resolved: pass every input.
        answer = asyncio.run(predictor.predict(
            image=Path(_FsPath(args.image)),
            prompt=args.prompt,
            top_p=args.top_p,
            temperature=args.temperature,
            max_length_tokens=args.max_length_tokens,
            repetition_penalty=args.repetition_penalty,
        ))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t2 = time.perf_counter()
    print("answer:", answer)
    if args.random_weights_note:
        print("(the demo model has random weights, so the answer is gibberish; "
              "see README for real weights)")
    print(f"setup {t1 - t0:.2f} s, prediction {t2 - t1:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
