"""Text + image preprocessing for DeepSeek-VL2.

Turns a chat conversation with images into the tensors the model consumes:

* the ``deepseek`` chat template, tokenised exactly like the official ``format_messages_v2``
  conversation path (one BOS, ``"<|User|>: {q}\\n\\n<|Assistant|>:"``, history answers ``"{a}<eos>"``);
* dynamic tiling of every image into one 384x384 global view plus a grid of 384x384 local tiles
  (only when the whole conversation holds at most two images);
* the expansion of each ``<image>`` tag into the exact number of image-token positions the model fills
  with vision embeddings;
* tolerant image loading (``load_image``) and UTF-8-safe incremental decoding (``StreamDecoder``).

The tokenizer is the Hugging Face ``tokenizer.json`` run by the ``tokenizers`` library, which is what
``LlamaTokenizerFast`` runs underneath, so ``encode``/``decode`` match the official ones token for token.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tokenizers import AddedToken, Tokenizer

__all__ = [
    "InputError",
    "ProcessedInputs",
    "StreamDecoder",
    "DeepseekVL2Processor",
    "load_image",
    "to_rgb",
    "well_formed_text",
    "select_best_resolution",
    "image_token_count",
]


class InputError(ValueError):
    """A request the model cannot run on (bad image, tag/image mismatch, bad conversation).

    The message is meant for the person who sent the request.
    """


# --------------------------------------------------------------------------------------------------
# Special tokens (looked up by their strings; ids differ between checkpoints)
# --------------------------------------------------------------------------------------------------

DEFAULT_BOS = "<｜begin▁of▁sentence｜>"  # full-width bar U+FF5C and U+2581, not ASCII
DEFAULT_EOS = "<｜end▁of▁sentence｜>"
DEFAULT_PAD = "<｜▁pad▁｜>"
DEFAULT_IMAGE_TOKEN = "<image>"
GROUNDING_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
USER_ROLE = "<|User|>"
ASSISTANT_ROLE = "<|Assistant|>"

_USER_ROLES = {USER_ROLE, "user"}
_ASSISTANT_ROLES = {ASSISTANT_ROLE, "assistant"}
_SYSTEM_ROLES = {"system", "deepseekapi-sys"}

# The official candidate list (processor_config.json of all three released models).
DEFAULT_CANDIDATE_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (384, 384), (384, 768), (768, 384), (384, 1152), (1152, 384), (384, 1536), (1536, 384),
    (768, 768), (384, 1920), (1920, 384), (384, 2304), (2304, 384), (768, 1152), (1152, 768),
    (384, 2688), (2688, 384), (384, 3072), (3072, 384), (768, 1536), (1536, 768), (384, 3456),
    (3456, 384), (1152, 1152),
)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


def well_formed_text(text: str) -> str:
    """``text`` with every lone surrogate (a code point U+D800..U+DFFF, which a Python string and JSON's
    ``"\\ud800"`` can hold but UTF-8 cannot) replaced as the official stack replaces it.

    The official processor hands the text to ``LlamaTokenizerFast`` with the ``tokenizers`` 0.15 its
    ``transformers==4.38.2`` pin brings, which takes the string's UTF-8 bytes with the surrogates passed
    through (``ED A0 80`` for U+D800) and decodes them lossily: one U+FFFD for each byte that is not valid
    UTF-8, so three per lone surrogate. Newer ``tokenizers`` (ours) refuse such a string with
    ``TypeError: TextInputSequence must be str``. Python's own ``"replace"`` decoding of the same bytes
    gives the same characters: the token ids equal the official ones (checked on 315 strings, surrogates
    alone, in pairs, next to other text and special tokens, with each test tokenizer). Other text is
    returned unchanged.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


# --------------------------------------------------------------------------------------------------
# Image loading
# --------------------------------------------------------------------------------------------------

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]

# Single-channel integer modes of more than 8 bits: 16-bit in any byte order, and 32-bit "I".
_INTEGER_GREY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "I;16S"}


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """Scale a single-channel image of more than 8 bits (integer or float) to 8-bit ``L``, by its values.

    Integer modes (``I;16`` in any byte order, and ``I``), one rule whatever the container:

    * every value in 0..255: kept as it is. That is what the official conversion gives (Pillow's
      ``convert("RGB")`` clips at 255, which changes nothing here): 8-bit values in a wider container.
    * every value in 0..65535, some above 255: ``round(value / 257)`` (65535 -> 255 exactly), the 16-bit
      range onto 8 bits. The official conversion clips these at 255, which turns almost every 16-bit scan
      or photo into a white sheet; we rescale instead.
    * anything else (negative values, or more than 16 bits, which only ``I`` holds): stretched from its
      minimum..maximum onto 0..255.

    So an ``I;16`` image and an ``I`` image with the same values give the same pixels. The price of deciding
    by the values: a 16-bit image whose values all stay at or below 255 (0.4 % of its range, near black as
    16-bit data) is shown as 8-bit values, as the official code shows it.

    Float ``F``: values in [0, 1] times 255, else minimum..maximum onto 0..255.
    """
    arr = np.asarray(image).astype(np.float64)
    if image.mode in _INTEGER_GREY_MODES:
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0 and hi <= 255:
            out = arr  # 8-bit values stored in a 16- or 32-bit container
        elif lo >= 0 and hi <= 65535:
            out = np.rint(arr / 257.0)  # 16-bit values
        elif hi > lo:
            out = np.rint((arr - lo) / (hi - lo) * 255.0)
        else:  # one value outside 0..65535 everywhere
            out = np.zeros_like(arr)
    else:  # "F"
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0 and hi <= 1:
            out = np.rint(arr * 255.0)  # the usual [0, 1] float convention
        elif hi > lo:
            out = np.rint((arr - lo) / (hi - lo) * 255.0)
        else:
            out = np.zeros_like(arr)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB.

    Ordinary modes (RGB, RGBA, LA, P, L, 1, CMYK, YCbCr) use ``image.convert("RGB")`` exactly as the
    official code does (alpha is dropped, not composited), so results are bit-identical to it.
    High bit-depth single-channel modes are brought to 8 bit first, by one rule for 16- and 32-bit integers
    (``_high_depth_to_8bit``).
    """
    if image.width == 0 or image.height == 0:
        raise InputError(f"The image is empty ({image.width}x{image.height} pixels).")
    if image.mode in _INTEGER_GREY_MODES or image.mode == "F":
        image = _high_depth_to_8bit(image)
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError):
        pass
    try:  # e.g. "PA" or "La": go through RGBA, which Pillow can reach from nearly anywhere
        return image.convert("RGBA").convert("RGB")
    except (ValueError, OSError) as exc:
        raise InputError(f"Unsupported image colour mode {image.mode!r}.") from exc


def load_image(source: ImageSource, *, exif_transpose: bool = True) -> Image.Image:
    """Open an image from a path, raw bytes, a binary file object or a PIL image; return RGB.

    * Animated images (GIF, APNG, WebP) give their first frame.
    * Decompression bombs (more than ``Image.MAX_IMAGE_PIXELS`` pixels), truncated or corrupt
      files, non-images and zero-size images raise ``InputError`` with a readable message.
    * With ``exif_transpose`` the EXIF orientation tag is applied (phone photos come out upright).
      The official code does not do this; for images without an orientation tag it changes nothing.

    For ordinary RGB/RGBA/P/L files the pixels equal ``PIL.Image.open(path).convert("RGB")``.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)

    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise InputError("The image data is empty (0 bytes).")
        fp: Any = io.BytesIO(bytes(source))
        name = "the image data"
    elif isinstance(source, (str, os.PathLike)):
        fp = os.fspath(source)
        name = f"image file {fp!r}"
        if not os.path.exists(fp):
            raise InputError(f"Cannot read {name}: no such file.")
        if os.path.isdir(fp):
            raise InputError(f"Cannot read {name}: it is a directory.")
    elif hasattr(source, "read"):
        fp = source
        name = "the image file"
    else:
        raise InputError(f"Cannot load an image from a {type(source).__name__}.")

    try:
        with warnings.catch_warnings():
            # Pillow only *warns* between MAX_IMAGE_PIXELS and 2x that; a server should refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as image:
                if image.width == 0 or image.height == 0:
                    raise InputError(f"{name.capitalize()} is empty ({image.width}x{image.height} pixels).")
                if getattr(image, "n_frames", 1) > 1:
                    image.seek(0)  # animated: the first frame
                image.load()  # decode now, inside the try: truncation shows up here
                if exif_transpose:
                    try:
                        image = ImageOps.exif_transpose(image) or image
                    except Exception:  # a malformed EXIF block must not reject the image
                        pass
                return to_rgb(image)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(
            f"{name.capitalize()} is too large to process safely (limit: {Image.MAX_IMAGE_PIXELS} pixels)."
        ) from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{name.capitalize()} is not an image in a format we can read.") from exc
    except FileNotFoundError as exc:
        raise InputError(f"Cannot read {name}: no such file.") from exc
    except PermissionError as exc:
        raise InputError(f"Cannot read {name}: permission denied.") from exc
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        # Pillow reports truncated/corrupt data as OSError ("image file is truncated"), and some
        # plugins as SyntaxError / ValueError / EOFError.
        raise InputError(f"{name.capitalize()} is damaged or truncated and cannot be decoded ({exc}).") from exc


# --------------------------------------------------------------------------------------------------
# Dynamic tiling
# --------------------------------------------------------------------------------------------------


def select_best_resolution(
    image_size: tuple[int, int], candidate_resolutions: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """Pick the canvas (width, height) that keeps most of the image's pixels with least padding.

    ``image_size`` is PIL's ``(width, height)``. Same tie-breaking as the official function: the first
    candidate (in list order) with the largest effective resolution, then the least wasted area.
    """
    width, height = image_size
    best: tuple[int, int] | None = None
    max_effective, min_wasted = 0, float("inf")
    for cand_w, cand_h in candidate_resolutions:
        scale = min(cand_w / width, cand_h / height)
        down_w, down_h = int(width * scale), int(height * scale)  # truncation, as upstream
        effective = min(down_w * down_h, width * height)
        wasted = cand_w * cand_h - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            best, max_effective, min_wasted = (int(cand_w), int(cand_h)), effective, wasted
    if best is None:  # only for degenerate sizes (e.g. 0 px); fall back to a single tile
        first = candidate_resolutions[0]
        best = (int(first[0]), int(first[1]))
    return best


def image_token_count(num_width_tiles: int, num_height_tiles: int, tokens_per_side: int = 14) -> int:
    """Number of ``<image>`` positions for one image with a (width x height) tile grid.

    Layout (global view first): ``h`` rows of ``w`` tokens + 1 newline, one view separator, then the
    local grid stitched into ``nh*h`` rows of ``nw*w`` tokens + 1 newline, with ``h = w = tokens_per_side``.
    1x1 -> 421, 2x2 -> 1023, 3x3 -> 2017.
    """
    h = w = tokens_per_side
    return h * (w + 1) + 1 + (num_height_tiles * h) * (num_width_tiles * w + 1)


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


@dataclass
class ProcessedInputs:
    """Model inputs for one conversation (no batch dimension).

    ``images_spatial_crop`` has one ``(width_tiles, height_tiles)`` row per image. A text-only input has
    the single row ``[[0, 0]]`` and 0 tiles, exactly like the official processor; a row of zeros means
    "no image" (``num_images`` counts the real ones).
    """

    input_ids: torch.Tensor  # int64 [T]
    images_seq_mask: torch.Tensor  # bool [T], True at every image-token position
    pixel_values: torch.Tensor  # float32 [n_tiles, 3, S, S] in [-1, 1]; per image: global, then tiles row-major
    images_spatial_crop: torch.Tensor  # int64 [max(n_images, 1), 2] = (width tiles, height tiles)
    sft_format: str  # the templated prompt (display string, without BOS)
    num_image_tokens: list[int] = field(default_factory=list)  # image positions per image, in order

    @property
    def num_images(self) -> int:
        return len(self.num_image_tokens)

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ProcessedInputs":
        """Move all tensors to ``device``; cast only ``pixel_values`` to ``dtype`` (ids stay int64)."""
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            images_seq_mask=self.images_seq_mask.to(device),
            pixel_values=self.pixel_values.to(device=device, dtype=dtype or self.pixel_values.dtype),
            images_spatial_crop=self.images_spatial_crop.to(device),
        )


# --------------------------------------------------------------------------------------------------
# Streaming decode
# --------------------------------------------------------------------------------------------------


class StreamDecoder:
    """Incremental detokenizer: ``"".join(push(i) for i in ids) + flush() == decode(ids)``.

    Byte-level BPE tokens can end in the middle of a multi-byte UTF-8 character, which decodes to
    U+FFFD until the rest of its bytes arrive. We therefore hold text back while the decoded tail ends
    in U+FFFD. A *genuine* U+FFFD (the model produced an invalid byte) is just delayed to the next
    token, and ``flush()`` emits whatever is left.

    Each step decodes only a short window: the ids of the last emitted piece (as left context, so a
    decoder that treats the start of a string specially still sees the same context) plus the new ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # everything before this has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly completed text (possibly "")."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return piece
        return ""

    def flush(self) -> str:
        """Return all text not yet emitted (including held-back U+FFFD) and reset the window."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


# --------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------

Message = dict[str, Any]  # {"role": str, "content": str, "images": [ImageSource, ...]}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_string(value: Any) -> str | None:
    """tokenizer_config stores special tokens either as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class DeepseekVL2Processor:
    """Tokenizer + chat template + image tiling for DeepSeek-VL2.

    ``processor(conversation)`` -> ``ProcessedInputs``; see ``__call__`` for the conversation format.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        candidate_resolutions: Sequence[Sequence[int]] = DEFAULT_CANDIDATE_RESOLUTIONS,
        patch_size: int = 14,
        downsample_ratio: int = 2,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        image_token: str = DEFAULT_IMAGE_TOKEN,
        pad_token: str = DEFAULT_PAD,
        bos_token: str = DEFAULT_BOS,
        eos_token: str = DEFAULT_EOS,
    ) -> None:
        self.tokenizer = tokenizer
        self.candidate_resolutions = [(int(w), int(h)) for w, h in candidate_resolutions]
        # The tile size is the first candidate, as upstream (384 for every released model).
        self.image_size = self.candidate_resolutions[0][0]
        self.patch_size = int(patch_size)
        self.downsample_ratio = int(downsample_ratio)
        # Tokens per tile side after the projector's downsample: ceil((384 // 14) / 2) = 14.
        self.tokens_per_side = math.ceil((self.image_size // self.patch_size) / self.downsample_ratio)
        self.image_mean = torch.tensor([float(x) for x in image_mean], dtype=torch.float32).view(3, 1, 1)
        self.image_std = torch.tensor([float(x) for x in image_std], dtype=torch.float32).view(3, 1, 1)
        # Padding colour of the letterboxed views: int(0.5 * 255) = 127 per channel, as upstream.
        self.pad_color = tuple(int(m * 255) for m in image_mean)
        self.image_token = image_token
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token

        # Upstream adds these if the vocabulary lacks them (new ids go at the end); the released
        # tokenizers already contain all of them, in which case nothing changes.
        missing = [
            t
            for t in (pad_token, image_token, *GROUNDING_TOKENS, USER_ROLE, ASSISTANT_ROLE)
            if tokenizer.token_to_id(t) is None
        ]
        if missing:
            tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

        self.bos_id = self._require_id(bos_token)
        self.eos_id = self._require_id(eos_token)
        self.pad_id = self._require_id(pad_token)
        self.image_token_id = self._require_id(image_token)
        self.special_token_ids: dict[str, int] = {
            t: self._require_id(t) for t in (*GROUNDING_TOKENS, USER_ROLE, ASSISTANT_ROLE)
        }

    def _require_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"Token {token!r} is not in the tokenizer vocabulary.")
        return token_id

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "DeepseekVL2Processor":
        """Build from a model directory (``tokenizer.json`` + the JSON configs of an HF snapshot)."""
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found (DeepSeek-VL2 needs the HF tokenizer.json).")
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        tok_cfg = _read_json(model_dir / "tokenizer_config.json")
        special_map = _read_json(model_dir / "special_tokens_map.json")
        proc_cfg = _read_json(model_dir / "processor_config.json")
        model_cfg = _read_json(model_dir / "config.json")

        def special(name: str, default: str) -> str:
            return _token_string(tok_cfg.get(name)) or _token_string(special_map.get(name)) or default

        candidates = proc_cfg.get("candidate_resolutions") or model_cfg.get("candidate_resolutions")
        return cls(
            tokenizer,
            candidate_resolutions=candidates or DEFAULT_CANDIDATE_RESOLUTIONS,
            patch_size=proc_cfg.get("patch_size", 14),
            downsample_ratio=proc_cfg.get("downsample_ratio", 2),
            image_mean=proc_cfg.get("image_mean", (0.5, 0.5, 0.5)),
            image_std=proc_cfg.get("image_std", (0.5, 0.5, 0.5)),
            image_token=proc_cfg.get("image_token", DEFAULT_IMAGE_TOKEN),
            pad_token=special("pad_token", proc_cfg.get("pad_token") or DEFAULT_PAD),
            bos_token=special("bos_token", DEFAULT_BOS),
            eos_token=special("eos_token", DEFAULT_EOS),
        )

    # ---------------------------------------------------------------- text

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS (special-token strings in the text are still matched; a
        lone surrogate counts as the official stack counts it, see ``well_formed_text``)."""
        if not text:
            return []
        return self.tokenizer.encode(well_formed_text(text), add_special_tokens=False).ids

    def min_tokens(self, text: str) -> int:
        """A lower bound on ``len(encode(text))`` that costs no tokenizing (0 when none can be given).

        Why: encoding a megabyte of text takes about a second, only to learn that it cannot fit the context.
        With a byte-level BPE tokenizer that does not normalise the text (every released DeepSeek-VL2
        tokenizer), each token stands for at most ``longest`` bytes of the text, the longest token in the
        vocabulary, so ``ceil(bytes / longest)`` tokens at least. Any other tokenizer gets no bound.
        """
        longest = self._longest_token_bytes
        return -(-len(text.encode("utf-8", "surrogatepass")) // longest) if longest else 0

    @property
    def _longest_token_bytes(self) -> int:
        """Bytes of text covered by the longest token (0: unknown). Computed once."""
        cached = getattr(self, "_longest_cache", None)
        if cached is None:
            cached = self._measure_longest_token()
            self._longest_cache = cached
        return cached

    def _measure_longest_token(self) -> int:
        tokenizer = self.tokenizer
        byte_level = type(tokenizer.decoder).__name__ == "ByteLevel" and tokenizer.normalizer is None
        added = tokenizer.get_added_tokens_decoder()
        if not byte_level or any(t.lstrip or t.rstrip or t.single_word for t in added.values()):
            return 0  # (a token that swallows neighbouring spaces covers more than its own text)
        # A byte-level token is spelt with one character per byte; an added token is its raw text.
        longest_learned = max((len(tok) for tok, i in tokenizer.get_vocab(with_added_tokens=False).items()
                               if i not in added), default=0)
        longest_added = max((len(t.content.encode("utf-8")) for t in added.values()), default=0)
        return max(longest_learned, longest_added)

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Same string as HF ``tokenizer.decode(ids, skip_special_tokens=...)``.

        Ids beyond the tokenizer (the model's vocab is padded) decode to nothing, as in HF.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh incremental decoder for one generation."""
        return StreamDecoder(self.tokenizer, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- images

    def _to_tensor(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image [H, W] -> normalised float32 [3, H, W] (ToTensor then Normalize)."""
        arr = np.asarray(image, dtype=np.uint8)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div(255)
        return (x - self.image_mean) / self.image_std

    def tile_image(self, image: Image.Image, cropping: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> (views [1 + nw*nh, 3, S, S], (nw, nh)).

        View 0 is the global view (whole image letterboxed into S x S); then the local tiles of the
        image letterboxed into the best candidate canvas, cropped row by row. Without cropping the
        canvas is S x S, so the single local tile equals the global view.
        """
        image = to_rgb(image)
        size = self.image_size
        if cropping:
            best_w, best_h = select_best_resolution(image.size, self.candidate_resolutions)
        else:
            best_w, best_h = size, size
        # ImageOps.pad = BICUBIC resize (with Pillow's antialiasing) to fit, centred on a grey canvas;
        # using Pillow itself is what makes the pixels identical to upstream.
        global_view = self._to_tensor(ImageOps.pad(image, (size, size), color=self.pad_color))
        if (best_w, best_h) == (size, size):
            local = global_view.unsqueeze(0)
        else:
            canvas = self._to_tensor(ImageOps.pad(image, (best_w, best_h), color=self.pad_color))
            nh, nw = best_h // size, best_w // size
            # [3, nh*S, nw*S] -> [nh*nw, 3, S, S], tile index = row * nw + col (row-major crops).
            local = canvas.view(3, nh, size, nw, size).permute(1, 3, 0, 2, 4).reshape(nh * nw, 3, size, size)
        views = torch.cat([global_view.unsqueeze(0), local], dim=0)
        return views, (best_w // size, best_h // size)

    def _tokenize_with_images(
        self, text: str, images: Sequence[Image.Image], cropping: bool
    ) -> tuple[list[int], list[bool], list[torch.Tensor], list[tuple[int, int]], list[int]]:
        """Encode ``text`` with each ``<image>`` replaced by its image-token run.

        Each text piece between tags is encoded separately, so BPE never merges across an image.
        """
        pieces = text.split(self.image_token)
        assert len(pieces) - 1 == len(images)
        ids: list[int] = []
        mask: list[bool] = []
        views: list[torch.Tensor] = []
        crops: list[tuple[int, int]] = []
        counts: list[int] = []
        for piece, image in zip(pieces[:-1], images):
            piece_ids = self.encode(piece)
            ids += piece_ids
            mask += [False] * len(piece_ids)
            image_views, (nw, nh) = self.tile_image(image, cropping)
            n = image_token_count(nw, nh, self.tokens_per_side)
            ids += [self.image_token_id] * n
            mask += [True] * n
            views.append(image_views)
            crops.append((nw, nh))
            counts.append(n)
        last_ids = self.encode(pieces[-1])
        ids += last_ids
        mask += [False] * len(last_ids)
        return ids, mask, views, crops, counts

    # ---------------------------------------------------------------- conversation

    @staticmethod
    def _resolve_images(images: Any) -> list[Image.Image]:
        if images is None:
            return []
        if isinstance(images, (Image.Image, str, bytes, os.PathLike)):
            images = [images]
        return [img if isinstance(img, Image.Image) else load_image(img) for img in images]

    def format_sft(self, conversation: Sequence[Message], system_prompt: str = "") -> str:
        """The ``deepseek`` template string (display only; ``input_ids`` are built separately).

        Matches upstream's ``sft_format``: ``"<|User|>: q\\n\\n<|Assistant|>: a<eos>...<|Assistant|>:"``.
        Note the space after ``<|Assistant|>:`` before a history answer, which the token ids do not
        have. A leading system message is shown as ``"{system}\\n\\n"``, like the template's own system slot.
        """
        out = ""
        system = well_formed_text(system_prompt.strip())
        for i, message in enumerate(conversation):
            role, content = message["role"], well_formed_text(str(message.get("content") or "").strip())
            if role in _SYSTEM_ROLES:
                system = content
            elif role in _USER_ROLES:
                out += f"{USER_ROLE}: {content}\n\n" if content else f"{USER_ROLE}:"
                if i == len(conversation) - 1:
                    out += f"{ASSISTANT_ROLE}:"
            else:
                out += f"{ASSISTANT_ROLE}: {content}{self.eos_token}" if content else f"{ASSISTANT_ROLE}:"
        if conversation and conversation[-1]["role"] in _ASSISTANT_ROLES and out.endswith(self.eos_token):
            out = out[: -len(self.eos_token)]  # a pre-filled answer continues; no eos at the end
        return (system + "\n\n" if system else "") + out

    def __call__(self, conversation: Sequence[Message], system_prompt: str = "") -> ProcessedInputs:
        """Process a conversation.

        ``conversation`` is a list of ``{"role", "content", "images"}`` messages. Roles: ``"<|User|>"`` or
        ``"user"``, ``"<|Assistant|>"`` or ``"assistant"``, and optionally ``"system"`` as the first
        message. ``images`` are PIL images, paths or bytes; they are consumed in order, across messages,
        one per ``<image>`` tag in the text. Normally the last message is an empty assistant turn (the
        answer to generate); a conversation ending with a user turn gets one implicitly, and a
        non-empty last assistant turn is continued (its eos is dropped), as upstream.

        ``system_prompt`` (upstream's argument of that name) only changes ``sft_format``, exactly as
        upstream; to give the model a system prompt use a ``"system"`` first message.
        """
        if not conversation:
            raise InputError("The conversation is empty.")
        all_images: list[Image.Image] = []
        for message in conversation:
            if not isinstance(message, dict) or "role" not in message:
                raise InputError("Every message needs a 'role' and a 'content'.")
            all_images += self._resolve_images(message.get("images"))
        # Tiling is decided for the whole conversation: more than two images -> one tile each.
        cropping = len(all_images) <= 2

        num_tags = sum(str(m.get("content") or "").count(self.image_token) for m in conversation)
        if num_tags > len(all_images):
            raise InputError(
                f"The prompt has {num_tags} {self.image_token} tag(s) but only {len(all_images)} image(s) were given."
            )

        ids: list[int] = [self.bos_id]
        mask: list[bool] = [False]
        views: list[torch.Tensor] = []
        crops: list[tuple[int, int]] = []
        counts: list[int] = []
        image_index = 0
        for i, message in enumerate(conversation):
            role = message["role"]
            content = str(message.get("content") or "").strip()
            if role in _USER_ROLES:
                # The template writes an empty message as just "role:" (no space, no separator).
                text = f"{USER_ROLE}: {content}\n\n{ASSISTANT_ROLE}:" if content else f"{USER_ROLE}:{ASSISTANT_ROLE}:"
                n = text.count(self.image_token)
                piece = self._tokenize_with_images(text, all_images[image_index : image_index + n], cropping)
                image_index += n
                ids += piece[0]
                mask += piece[1]
                views += piece[2]
                crops += piece[3]
                counts += piece[4]
            elif role in _ASSISTANT_ROLES:
                if self.image_token in content:
                    raise InputError(f"Assistant messages cannot contain {self.image_token} tags.")
                answer = self.encode(content) + [self.eos_id]
                ids += answer
                mask += [False] * len(answer)
            elif role in _SYSTEM_ROLES:
                if i != 0:
                    raise InputError("A system message is only allowed as the first message.")
                if self.image_token in content:
                    raise InputError(f"System messages cannot contain {self.image_token} tags.")
                system_ids = self.encode(content)  # upstream: no separator before "<|User|>"
                ids += system_ids
                mask += [False] * len(system_ids)
            else:
                raise InputError(
                    f"Unknown role {role!r}; use '{USER_ROLE}'/'user', '{ASSISTANT_ROLE}'/'assistant' or 'system'."
                )
        # Upstream always ends on the (empty) assistant turn's eos and strips it; the prompt then ends
        # with "<|Assistant|>:" and generation starts right after the colon.
        if conversation[-1]["role"] in _ASSISTANT_ROLES:
            ids, mask = ids[:-1], mask[:-1]

        size = self.image_size
        pixel_values = torch.cat(views, dim=0) if views else torch.zeros(0, 3, size, size)
        spatial = torch.tensor(crops if crops else [(0, 0)], dtype=torch.long)
        return ProcessedInputs(
            input_ids=torch.tensor(ids, dtype=torch.long),
            images_seq_mask=torch.tensor(mask, dtype=torch.bool),
            pixel_values=pixel_values,
            images_spatial_crop=spatial,
            sft_format=self.format_sft(conversation, system_prompt),
            num_image_tokens=counts,
        )

    def process_prompt(
        self,
        prompt: str,
        images: Sequence[ImageSource] | ImageSource | None = None,
        *,
        system_prompt: str | None = None,
        add_missing_image_tags: bool = True,
    ) -> ProcessedInputs:
        """One user turn -> model inputs (user message + empty assistant turn).

        With ``add_missing_image_tags`` (default), images without an ``<image>`` tag get
        ``"<image>\\n"`` prepended to the prompt, as the official web demo does, so they are not
        silently ignored. More tags than images raises ``InputError``.
        """
        image_list = self._resolve_images(images)
        missing = len(image_list) - prompt.count(self.image_token)
        if add_missing_image_tags and missing > 0:
            prompt = f"{self.image_token}\n" * missing + prompt
        conversation: list[Message] = []
        if system_prompt:
            conversation.append({"role": "system", "content": system_prompt})
        conversation += [
            {"role": USER_ROLE, "content": prompt, "images": image_list},
            {"role": ASSISTANT_ROLE, "content": ""},
        ]
        return self(conversation)
