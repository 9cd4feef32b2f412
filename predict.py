"""Cog predictor for DeepSeek-VL2: the API of the Replicate model deepseek-ai/deepseek-vl2.

Inputs: image, prompt, top_p, temperature, max_length_tokens, repetition_penalty. Output: the answer.
Weights: ``DEEPSEEK_VL2_WEIGHTS`` = a model directory or a Hugging Face repo id (default
``deepseek-ai/deepseek-vl2``), resolved by ``deepseek_vl2.weights.resolve_weights``.
``DEEPSEEK_VL2_DTYPE`` (bfloat16 / float16 / float32) overrides the automatic dtype; ``DEEPSEEK_VL2_QUANTIZE``
(int8 / int4) quantizes the language model's weights while loading (a quantized checkpoint needs no setting).

Concurrency: ``predict`` is async and serves ``MAX_CONCURRENCY`` clients without a refusal
(``DEEPSEEK_VL2_MAX_CONCURRENCY``, default 16 on a GPU and 8 on a CPU); their predictions share decode steps
in the model's batching engine (``deepseek_vl2/engine.py``). Cog's server admits ``SERVER_CONCURRENCY``, twice
that (``COG_MAX_CONCURRENCY``: ``make serve`` sets it; ``cog.yaml``'s ``concurrency.max`` for an image); the
engine queues what is beyond its slots. See ``server_concurrency`` for why. Cog's server must also run its
request handling on one thread (``TOKIO_WORKER_THREADS=1``: ``make serve`` and ``cog.yaml`` set it), see
``cog_server_warnings``.

Run it without Cog's CLI:  python predict.py --image examples/stages.png --prompt "Describe this image."
"""

import asyncio
import os
import sys
import time
from pathlib import Path as _FsPath

from typing import AsyncIterator, Mapping, Optional

from cog import AsyncConcatenateIterator, BasePredictor, Input, Path, concurrent, streaming

from deepseek_vl2 import download as image_download
from deepseek_vl2.pipeline import InputError, VL2Pipeline
from deepseek_vl2.shutdown import watch_cog_server
from deepseek_vl2.weights import resolve_weights


def _limit(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    try:
        return float(value) if value else default
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {value!r}") from None


# Bounds of an image download (Cog 0.23 fetches URL inputs with `requests.get(timeout=10)` and copies the
# whole body to a temp file: a server that trickles bytes holds it forever, an endless body fills the disk):
# deepseek_vl2/download.py says what each bound stops; the total time and the size can be set here.
DOWNLOAD_SILENCE_S = image_download.SILENCE_S
DOWNLOAD_TIMEOUT_S = _limit("DEEPSEEK_VL2_DOWNLOAD_TIMEOUT_S", image_download.TIMEOUT_S)
MAX_IMAGE_BYTES = int(_limit("DEEPSEEK_VL2_MAX_IMAGE_MB", image_download.MAX_BYTES >> 20) * (1 << 20))
DownloadError = image_download.DownloadError


def download_image(url: str, suffix: str = "", *, silence_s: float = DOWNLOAD_SILENCE_S,
                   timeout_s: float = DOWNLOAD_TIMEOUT_S, max_bytes: int = MAX_IMAGE_BYTES) -> str:
    """Fetch ``url`` into a new temp file (its path is returned) within the bounds above, else raise
    ``DownloadError`` (the partial file removed). Sends ``COG_USER_AGENT`` as Cog's own download does."""
    return image_download.fetch_image(url, suffix, silence_s=silence_s, timeout_s=timeout_s, max_bytes=max_bytes,
                                      user_agent=os.environ.get("COG_USER_AGENT"))


def _bound_downloads() -> None:
    """Make Cog fetch an image URL with ``download_image`` (bounded in time and size), and report a failure
    as "Cannot download the image from URL: reason".

    Cog fetches URL inputs itself, before predict() runs (``URLPath.convert``, called by coglet); this
    replaces that step for http(s) URLs. ``data:`` URIs (already decoded by Cog) keep Cog's own step.
    Guarded: a Cog without that hook is left untouched.
    """
    try:
        from cog.types import URLPath
    except ImportError:  # pragma: no cover - depends on the installed Cog
        return
    original = getattr(URLPath, "convert", None)
    if original is None or getattr(original, "_bounded", False):
        return

    def convert(self):  # type: ignore[no-untyped-def]
        if getattr(self, "_path", None) is None and str(self.source).startswith(("http://", "https://")):
            try:
                self._path = Path(download_image(self.source, suffix=self.filename))
            except DownloadError as exc:
                raise DownloadError(f"Cannot download the image from {self.source}: {exc}") from None
        return original(self)

    convert._bounded = True  # type: ignore[attr-defined]
    URLPath.convert = convert


_bound_downloads()


def max_concurrency() -> int:
    """Clients served without a refusal, each with one prediction in flight: ``DEEPSEEK_VL2_MAX_CONCURRENCY``
    (a whole number >= 1), else 16 on a GPU and 8 on a CPU; the engine's cache slots. Read when this module
    is imported. An operator may set Cog's ``COG_MAX_CONCURRENCY`` alone: it is what Cog's server admits
    (``SERVER_CONCURRENCY``), so half of it (at least 1) is served. Memory may give the engine fewer cache
    slots than this (see ``deepseek_vl2.engine.default_slots``); predictions beyond them wait their turn
    inside the engine instead of being refused."""
    for name in ("DEEPSEEK_VL2_MAX_CONCURRENCY", "COG_MAX_CONCURRENCY"):
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise SystemExit(f"{name} must be a whole number >= 1, got {value!r}")
            return int(value) if name == "DEEPSEEK_VL2_MAX_CONCURRENCY" else max(1, int(value) // 2)
    import torch

    return 16 if torch.cuda.is_available() else 8


def server_concurrency(clients: int) -> int:
    """Predictions Cog's server admits at once (beyond them it answers HTTP 409) so that ``clients`` clients
    never see a 409: twice as many. Cog frees a prediction's slot only after it has sent the answer, so a
    client that sends its next request as soon as it has read an answer can find its previous slot still
    taken: each client holds at most that slot and its new one (a second slot would outlive a whole
    prediction). The predictions beyond the engine's slots wait in its queue, as any beyond its cache do."""
    return 2 * clients


def cog_server_warnings(environ: Mapping[str, str]) -> list[str]:
    """What, in the environment Cog's server passed to this worker, would give clients within
    ``MAX_CONCURRENCY`` an HTTP 409 (printed by ``setup``):

    - Cog's server admitting fewer than ``SERVER_CONCURRENCY`` predictions (``COG_MAX_CONCURRENCY``);
    - its request handling on more than one thread. Cog 0.23's server takes a free slot with a *try*-lock on
      its pool and answers 409 when that lock is busy, free slots or not: two requests arriving at the same
      moment on two threads can collide (8 clients sending instant predictions back to back got 1-4 409s of
      480 with 16 or 32 slots admitted). ``TOKIO_WORKER_THREADS=1`` puts its request handling on one thread,
      where nothing can come between the try-lock and its release (0 of 3,840)."""
    warnings = []
    admitted = environ.get("COG_MAX_CONCURRENCY", "").strip()
    if admitted.isdigit() and int(admitted) < SERVER_CONCURRENCY:
        warnings.append(f"Cog's server admits {admitted} predictions at once (COG_MAX_CONCURRENCY); with "
                        f"{MAX_CONCURRENCY} clients sending one request after another some will get HTTP 409. "
                        f"Set COG_MAX_CONCURRENCY={SERVER_CONCURRENCY} (make serve does).")
    if environ.get("TOKIO_WORKER_THREADS", "").strip() != "1":
        warnings.append("Cog's server handles requests on several threads, and two requests arriving at the same "
                        "moment can get HTTP 409 while slots are free (a race in Cog 0.23's slot pool). Start it "
                        "with TOKIO_WORKER_THREADS=1 (make serve and cog.yaml do).")
    return warnings


MAX_CONCURRENCY = max_concurrency()
SERVER_CONCURRENCY = server_concurrency(MAX_CONCURRENCY)

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
        from deepseek_vl2.hardware import parse_dtype

        started = time.perf_counter()
        model_dir = resolve_weights(os.environ.get("DEEPSEEK_VL2_WEIGHTS"))
        dtype_name = os.environ.get("DEEPSEEK_VL2_DTYPE", "").strip()
        dtype = parse_dtype(dtype_name) if dtype_name else None
        self.pipeline = VL2Pipeline.load(model_dir, dtype=dtype)
        # Asked for: that many slots. Else the engine's default for the device, capped by memory.
        asked = {"DEEPSEEK_VL2_MAX_CONCURRENCY", "COG_MAX_CONCURRENCY"} & set(os.environ)
        engine = self.pipeline.start(MAX_CONCURRENCY if asked else None)
        self.pipeline.warm_up()
        # Under Cog's server: when it is told to stop, stop within a bounded time (deepseek_vl2/shutdown.py).
        under_cog_server = watch_cog_server(
            lambda: engine.in_flight,
            lambda: engine.stop("The server is shutting down: this prediction was stopped before it finished."),
        ) is not None
        print(
            f"DeepSeek-VL2 loaded from {model_dir} on {self.pipeline.device} ({self.pipeline.dtype}"
            f"{f', weights in {self.pipeline.scheme.name}' if self.pipeline.scheme else ''}) "
            f"in {time.perf_counter() - started:.1f} s; {MAX_CONCURRENCY} clients at once without a refusal, "
            f"{self.pipeline.engine.slots} decoding together",
            flush=True,
        )
        for warning in cog_server_warnings(os.environ) if under_cog_server else ():
            print(f"Warning: {warning}", flush=True)

    @concurrent(max=SERVER_CONCURRENCY)
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
        return "".join([piece async for piece in self._answer(image, prompt, top_p, temperature, max_length_tokens,
                                                              repetition_penalty)])

    async def _answer(self, image: Path, prompt: str, top_p: float, temperature: float, max_length_tokens: int,
                      repetition_penalty: float, seed: Optional[int] = None) -> AsyncIterator[str]:
        """The answer's pieces from the engine; its timing goes to the prediction's logs at the end."""
        stats: list = []
        async for piece in self.pipeline.astream(image=str(image), prompt=prompt, temperature=temperature, top_p=top_p,
                                                 max_length_tokens=max_length_tokens,
                                                 repetition_penalty=repetition_penalty, seed=seed, stats=stats):
            yield piece
        if stats:
            print(stats[0], flush=True)


class StreamingPredictor(Predictor):
    """The same model and inputs, plus ``seed``; the answer streams as it is generated (Replicate's token
    streaming: pieces to concatenate, none splitting a character). Deploy it with
    ``predict: "predict.py:StreamingPredictor"`` in cog.yaml; ``make serve-stream`` serves it locally."""

    @streaming  # (Server-Sent Events: `Accept: text/event-stream`)
    @concurrent(max=SERVER_CONCURRENCY)
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
        async for piece in self._answer(image, prompt, top_p, temperature, max_length_tokens, repetition_penalty, seed):
            yield piece


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
