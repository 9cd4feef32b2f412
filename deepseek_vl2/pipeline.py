"""One call from (image, prompt, sampling settings) to the answer text.

This is the single-image chat turn behind ``predict.py`` (the Replicate API):

* the prompt may place the image with an ``<image>`` tag ("Describe each stage of this <image> in
  detail"); without a tag the image goes first (``"<image>\\n" + prompt``); more than one tag for the
  one image is an error;
* ``temperature`` 0 or ``top_p`` 0 means greedy decoding; ``repetition_penalty`` 0 or 1 means none (a
  penalty other than 1 also applies to greedy decoding, as in Hugging Face ``generate``);
* ``max_length_tokens`` 0 returns "" at once; otherwise new tokens are clamped to what is left of the
  model's context (``language_config.max_position_embeddings``, 4096); a prompt that alone fills the
  context is an error;
* the answer keeps special tokens such as the grounding markup and drops the end-of-sentence marker.

Every problem with the request raises ``InputError`` (from the processor) with a message for the
person who sent it.

Requests go through the model's batching engine (``engine.py``): ``stream``/``run`` from any thread and
``astream`` from an event loop may overlap, and then share decode steps.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Optional, Union

import torch
from PIL import Image

from .config import DeepseekVL2Config
from .engine import BatchEngine, Request, RequestStats, engine_for
from .generation import GenerationConfig
from .hardware import release_openmp_workers
from .memory import WORKING_BYTES, cache_bytes_per_request, check_fits, check_model_fits
from .processor import _USER_ROLES, DeepseekVL2Processor, InputError, ProcessedInputs, load_image

__all__ = ["VL2Pipeline", "InputError", "GenerationSettings"]

ImageArg = Union[str, os.PathLike, bytes, Image.Image]


class GenerationSettings:
    """The API's four knobs, normalised (0 meaning "off" where the API says so)."""

    def __init__(self, temperature: float, top_p: float, max_length_tokens: int, repetition_penalty: float,
                 seed: Optional[int] = None) -> None:
        for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
            if not isinstance(value, (int, float)) or value != value or value < 0:
                raise InputError(f"{name} must be a number >= 0, got {value!r}.")
        if isinstance(max_length_tokens, bool) or not isinstance(max_length_tokens, int) or max_length_tokens < 0:
            raise InputError(f"max_length_tokens must be a whole number >= 0, got {max_length_tokens!r}.")
        if top_p > 1:
            raise InputError(f"top_p must be between 0 and 1, got {top_p!r}.")
        self.greedy = temperature == 0 or top_p == 0
        self.temperature = 0.0 if self.greedy else float(temperature)
        self.top_p = 1.0 if self.greedy else float(top_p)
        self.repetition_penalty = 1.0 if repetition_penalty in (0, 1) else float(repetition_penalty)
        self.max_length_tokens = max_length_tokens
        self.seed = seed

    def generation_config(self, max_new_tokens: int) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
        )


# A checkpoint below this size (the test fixtures, the demo model) runs in float32 on any device: its
# steps are dominated by per-op overhead, so bf16 gains nothing, while float32 reproduces reference
# outputs exactly (bf16 rounding can flip a close greedy choice). Every released DeepSeek-VL2 model is
# far above it and gets the hardware's default (bf16 on a GPU).
SMALL_MODEL_BYTES = 256 * 1024 * 1024


def _is_small_model(model_dir: Path) -> bool:
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return 0 < size < SMALL_MODEL_BYTES


class VL2Pipeline:
    """A loaded model + processor answering single-image prompts."""

    def __init__(self, model: Any, processor: DeepseekVL2Processor, *, device: torch.device, dtype: torch.dtype,
                 context_length: int, model_dir: Optional[Path] = None) -> None:
        from .quantize import model_scheme

        self.model = model
        self.processor = processor
        self.device = torch.device(device)
        self.dtype = dtype
        self.scheme = model_scheme(model)  # the language weights' quantization (None: the model's dtype)
        self.context_length = int(context_length)
        self.model_dir = model_dir
        self.last_stats: Optional[RequestStats] = None  # of the last ``stream``/``run`` of this thread's caller

    @property
    def engine(self) -> BatchEngine:
        """The model's batching engine (made on first use: ``engine.engine_for``)."""
        return engine_for(self.model)

    def start(self, slots: Optional[int] = None) -> BatchEngine:
        """Make the engine with ``slots`` cache slots now (default: ``DEEPSEEK_VL2_MAX_CONCURRENCY``, else
        per device and memory): its cache is allocated here, once. Raises ``DoesNotFitError`` when that
        cache does not fit in the memory left."""
        from .engine import configured_slots

        slots = slots or configured_slots(self.model)
        name = self.model_dir.name if self.model_dir is not None else "the model"
        check_fits(name, {f"cache for {slots} requests at {self.context_length} tokens":
                          slots * cache_bytes_per_request(self.model.config, self.dtype),
                          "working memory": WORKING_BYTES.get(self.device.type, WORKING_BYTES["cpu"])}, self.device)
        return engine_for(self.model, slots)

    @classmethod
    def load(cls, model_dir: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None,
             dtype: Optional[torch.dtype] = None, quantize: Optional[str] = None) -> "VL2Pipeline":
        """Load the model once; device and dtype default to the fastest the hardware handles natively.

        ``quantize`` (``int8``, ``int4`` or ``int4:N``; default ``DEEPSEEK_VL2_QUANTIZE``, else none): the
        language model's weights in that scheme, quantized while loading (``quantize.py``); a checkpoint
        written quantized loads in its own scheme. A bad scheme raises ``QuantizationError``."""
        from .hardware import check_cpu_dtype, default_device, default_dtype
        from .model import checkpoint_scheme, load_model
        from .quantize import env_scheme, parse_scheme

        model_dir = Path(model_dir)
        device = torch.device(device) if device is not None else default_device()
        if dtype is None:
            dtype = torch.float32 if _is_small_model(model_dir) else default_dtype(device)
        else:
            check_cpu_dtype(device, dtype)  # (a dtype asked for that this CPU would only emulate: refused)
        config = DeepseekVL2Config.from_pretrained(model_dir)
        scheme = checkpoint_scheme(config, parse_scheme(quantize) if quantize else env_scheme(), str(model_dir))
        check_model_fits(model_dir.name, config, device, dtype, scheme)  # (before any memory is taken)
        processor = DeepseekVL2Processor.from_pretrained(model_dir)
        model = load_model(model_dir, device=device, dtype=dtype, quantize=scheme)
        return cls(model, processor, device=device, dtype=dtype,
                   context_length=config.language.max_position_embeddings, model_dir=model_dir)

    def warm_up(self) -> None:
        """Two short requests at once on a blank image through the engine, so that one-time costs are paid
        here and not by the first users: the CPU's GEMV-path probe and oneDNN kernel setup, the decode step
        of one row and of several; on a GPU the CUDA-graph captures of the first windows (torch.compile of the
        step runs in the background meanwhile, and the graphs switch to it when it is done: READY does not
        wait for it). Later windows and batch buckets are captured on first use (~1 s each).
        """
        from .generation import CudaGraphDecoder

        image = Image.new("RGB", (384, 384), (127, 127, 127))
        inputs = self.processor.process_prompt(f"{self.processor.image_token}\nDescribe.", [image])
        prompt_len = int(inputs.input_ids.shape[-1])
        steps = 3
        if self.device.type == "cuda":
            steps = CudaGraphDecoder.window_for(prompt_len) - prompt_len + 2
        steps = min(steps, self.context_length - prompt_len)
        inputs = inputs.to(self.device, dtype=self.dtype)
        config = GenerationConfig(max_new_tokens=steps)
        requests = [self.engine.submit(inputs, config, eos_token_id=-1) for _ in range(min(2, self.engine.slots))]
        for request in requests:
            for _ in request:
                pass

    # ------------------------------------------------------------------------------------------

    def build_prompt(self, prompt: Any) -> str:
        """Validate the prompt and place the image: ``<image>`` tag where the user put it, else first."""
        if not isinstance(prompt, str):
            raise InputError("The prompt must be text.")
        if not prompt.strip():
            raise InputError("The prompt is empty. Please ask something about the image.")
        tag = self.processor.image_token
        tags = prompt.count(tag)
        if tags > 1:
            raise InputError(
                f"The prompt contains {tags} {tag} tags, but there is only one image. "
                f"Use at most one {tag} tag to mark where the image goes (or none: the image then comes first)."
            )
        return prompt if tags == 1 else f"{tag}\n{prompt}"

    def prepare(self, image: ImageArg, prompt: str) -> ProcessedInputs:
        """Image + prompt -> model inputs (raises ``InputError`` for a bad image or prompt)."""
        return self._process(image, self.build_prompt(prompt))

    def _process(self, image: ImageArg, text: str) -> ProcessedInputs:
        if isinstance(image, (str, os.PathLike)):
            # Read the bytes here so that messages speak of "the image", not of a server temp path.
            try:
                image = Path(image).read_bytes()
            except FileNotFoundError:
                raise InputError("The image file does not exist.") from None
            except OSError as exc:
                raise InputError(f"The image file cannot be read ({exc.strerror or exc}).") from None
        return self.processor.process_prompt(text, [load_image(image)])

    def refuse_overlong(self, text: str) -> None:
        """Refuse a prompt that certainly cannot fit the context before tokenizing it or decoding the image
        (a megabyte of text is refused in milliseconds instead of a second's tokenizing); shorter prompts
        go on to the exact count in ``max_new_tokens``."""
        at_least = self.processor.min_tokens(text)
        if at_least >= self.context_length:
            raise InputError(
                f"The prompt is too long: its {len(text)} characters are at least {at_least} tokens, and the "
                f"model's context holds {self.context_length}. Please shorten the prompt."
            )

    def max_new_tokens(self, inputs: ProcessedInputs, requested: int) -> int:
        """``requested`` clamped to the context left after the prompt; error if the prompt fills it."""
        prompt_len = int(inputs.input_ids.shape[-1])
        room = self.context_length - prompt_len
        if room <= 0:
            raise InputError(
                f"The prompt is too long: with the image it takes {prompt_len} tokens, and the model's "
                f"context holds {self.context_length}. Please shorten the prompt."
            )
        return min(requested, room)

    def request(self, image: ImageArg, prompt: str, temperature: float = 0.1, top_p: float = 0.9,
                max_length_tokens: int = 2048, repetition_penalty: float = 1.1,
                seed: Optional[int] = None) -> Optional[tuple[ProcessedInputs, GenerationConfig]]:
        """Validate and process one request: (model inputs on the device, generation settings), or None when
        there is nothing to generate (``max_length_tokens`` 0). Raises ``InputError`` for bad input."""
        settings = GenerationSettings(temperature, top_p, max_length_tokens, repetition_penalty, seed)
        text = self.build_prompt(prompt)
        if settings.max_length_tokens == 0:
            return None
        self.refuse_overlong(text)
        try:
            inputs = self._process(image, text)
            config = settings.generation_config(self.max_new_tokens(inputs, settings.max_length_tokens))
            return inputs.to(self.device, dtype=self.dtype), config
        finally:
            if self.device.type == "cpu":
                # The rest runs in the engine's thread: this thread's OpenMP team would slow that one's
                # (``hardware.release_openmp_workers``). Here too, as this may be a worker thread of the
                # event loop, not the thread that submits.
                release_openmp_workers()

    def run(self, image: ImageArg, prompt: str, temperature: float = 0.1, top_p: float = 0.9,
            max_length_tokens: int = 2048, repetition_penalty: float = 1.1, seed: Optional[int] = None) -> str:
        """The whole answer as one string."""
        return "".join(self.stream(image, prompt, temperature, top_p, max_length_tokens, repetition_penalty, seed))

    def stream(self, image: ImageArg, prompt: str, temperature: float = 0.1, top_p: float = 0.9,
               max_length_tokens: int = 2048, repetition_penalty: float = 1.1,
               seed: Optional[int] = None) -> Iterator[str]:
        """The answer in pieces as it is generated. Bad input raises here, before the first piece."""
        self.last_stats = None
        prepared = self.request(image, prompt, temperature, top_p, max_length_tokens, repetition_penalty, seed)
        if prepared is None:
            return iter(())
        request = self.engine.submit(*prepared, eos_token_id=self.processor.eos_id)
        self.last_stats = request.stats
        return self._pieces(request)

    def stream_conversation(self, conversation: Any, temperature: float = 0.1, top_p: float = 0.9,
                            max_new_tokens: int = 2048, repetition_penalty: float = 1.1,
                            seed: Optional[int] = None) -> Iterator[str]:
        """The next assistant answer of a whole conversation, in pieces as it is generated.

        ``conversation`` is a list of ``{"role", "content", "images"}`` messages in the processor's
        format (roles ``<|User|>`` / ``<|Assistant|>``, optionally a first ``system`` message; the last
        message is the empty assistant turn to generate). ``images`` are paths, bytes or PIL images,
        placed by the ``<image>`` tags of their message; a user message with fewer tags than images gets
        the missing ones at its start (the images then come first). Up to two images in the whole
        conversation are tiled dynamically, three or more get one tile each, as the official processor.
        Settings as in ``stream``; the same ``seed`` and settings give the same text on the same device.
        Bad input raises ``InputError`` here, before the first piece.
        """
        self.last_stats = None
        settings = GenerationSettings(temperature, top_p, max_new_tokens, repetition_penalty, seed)
        inputs = self.processor(self._tag_images(conversation))
        if settings.max_length_tokens == 0:
            return iter(())
        cfg = settings.generation_config(self.max_new_tokens(inputs, settings.max_length_tokens))
        request = self.engine.submit(inputs.to(self.device, dtype=self.dtype), cfg, eos_token_id=self.processor.eos_id)
        self.last_stats = request.stats
        return self._pieces(request)

    def _tag_images(self, conversation: Any) -> list[dict[str, Any]]:
        """Check the conversation's shape; put images without an ``<image>`` tag first in their message."""
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise InputError("The conversation must be a non-empty list of messages.")
        tag = self.processor.image_token
        tagged = []
        for number, message in enumerate(conversation, start=1):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InputError(f"Message {number} of the conversation needs a 'role' (and a 'content').")
            content = message.get("content", "")
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise InputError(f"The content of message {number} must be text.")
            images = message.get("images") or []
            if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
                images = [images]
            if not isinstance(images, (list, tuple)):
                raise InputError(f"The images of message {number} must be a list.")
            if images and message["role"] not in _USER_ROLES:
                raise InputError(f"Message {number} carries images, but only user messages can.")
            missing = len(images) - content.count(tag)
            if missing > 0:
                content = f"{tag}\n" * missing + content
            tagged.append({**message, "content": content, "images": list(images)})
        return tagged

    async def astream(self, image: ImageArg, prompt: str, temperature: float = 0.1, top_p: float = 0.9,
                      max_length_tokens: int = 2048, repetition_penalty: float = 1.1,
                      seed: Optional[int] = None, stats: Optional[list[RequestStats]] = None) -> AsyncIterator[str]:
        """``stream`` on an event loop: the image and prompt are processed in a worker thread, the pieces
        arrive from the engine without blocking the loop, and cancelling the task (or closing the iterator)
        cancels the request within one engine step. ``stats``: a list that receives the request's timing."""
        prepared = await asyncio.to_thread(self.request, image, prompt, temperature, top_p, max_length_tokens,
                                           repetition_penalty, seed)
        if prepared is None:
            return
        request = self.engine.submit(*prepared, eos_token_id=self.processor.eos_id, loop=asyncio.get_running_loop())
        if stats is not None:
            stats.append(request.stats)
        decoder = self.processor.stream_decoder()
        async for token_id in request:
            piece = decoder.push(token_id)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    def _pieces(self, request: Request) -> Iterator[str]:
        decoder = self.processor.stream_decoder()
        for token_id in request:
            piece = decoder.push(token_id)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail
