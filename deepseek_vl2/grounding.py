"""Grounding output: ``<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>``.

DeepSeek-VL2 answers grounding prompts with boxes whose coordinates are integers normalised to
0..999 relative to the *original* image width and height (maintainer, upstream issue #100).
Models emit malformed boxes now and then (odd coordinate counts, nested lists, values like 99999),
so parsing is tolerant: a bad box is skipped, never ``eval``'d, and never raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "GroundedRef",
    "parse_grounding",
    "boxes_to_pixels",
    "grounding_boxes",
    "draw_boxes",
    "draw_grounding",
    "BOX_COLORS",
]

REF_OPEN, REF_CLOSE = "<|ref|>", "<|/ref|>"
DET_OPEN, DET_CLOSE = "<|det|>", "<|/det|>"
COORD_MAX = 999  # coordinates are normalised to [0, 999]

# The upstream demo's palette (one colour per referring expression, cycling).
BOX_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 255), (127, 127, 127),
    (255, 255, 127), (255, 127, 255), (127, 255, 255), (127, 127, 255), (127, 255, 127), (255, 127, 127),
)  # fmt: skip

Box = tuple[int, int, int, int]

# A ref span, or a det span. A det may be unterminated when generation stopped early (max tokens):
# then it runs to the next tag or the end of the text.
_SPAN = re.compile(
    re.escape(REF_OPEN) + r"(?P<label>.*?)" + re.escape(REF_CLOSE)
    + r"|" + re.escape(DET_OPEN) + r"(?P<det>.*?)(?:" + re.escape(DET_CLOSE) + r"|(?=<\|)|\Z)",
    re.DOTALL,
)  # fmt: skip
# Innermost bracket groups: "[[1, 2, 3, 4], [5, 6, 7, 8]]" -> "1, 2, 3, 4" and "5, 6, 7, 8".
_INNER_LIST = re.compile(r"\[([^\[\]]*)\]")
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")


@dataclass
class GroundedRef:
    """One referring expression and its boxes, in normalised 0..999 coordinates (x1, y1, x2, y2)."""

    label: str
    boxes: list[Box] = field(default_factory=list)


def _parse_box(inner: str) -> Box | None:
    """``"580, 270, 999, 900"`` -> (580, 270, 999, 900); None for anything that is not 4 numbers in range."""
    parts = [p.strip() for p in inner.split(",")]
    if len(parts) != 4 or not all(_NUMBER.match(p) for p in parts):
        return None
    x1, y1, x2, y2 = (int(round(float(p))) for p in parts)
    if not all(0 <= v <= COORD_MAX for v in (x1, y1, x2, y2)):
        return None  # e.g. [2, 311, 99999, 98]: no sensible reading
    # Corners given in the wrong order still describe a box; draw it the right way round.
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def parse_grounding(text: str) -> list[GroundedRef]:
    """Extract every ``<|ref|>label<|/ref|><|det|>[[...]]<|/det|>`` pair from model output, in order.

    A det block takes the label of the ref right before it (or "" if there is none, as when the
    label was in the prompt). A ref without a det block has no location and is not returned.
    Malformed boxes are skipped; a det block without any valid box gives a ref with ``boxes == []``.
    """
    refs: list[GroundedRef] = []
    label: str | None = None
    for match in _SPAN.finditer(text):
        if match.group("label") is not None:
            label = match.group("label").strip()
            continue
        boxes = [box for inner in _INNER_LIST.findall(match.group("det")) if (box := _parse_box(inner))]
        refs.append(GroundedRef(label=label or "", boxes=boxes))
        label = None
    return refs


def boxes_to_pixels(box: Box, width: int, height: int) -> Box:
    """Normalised (0..999) box -> pixel box of an image of ``width`` x ``height``, as upstream:
    ``(int(x1 / 999 * W), int(y1 / 999 * H), int(x2 / 999 * W), int(y2 / 999 * H))``."""
    x1, y1, x2, y2 = box
    return (
        int(x1 / COORD_MAX * width),
        int(y1 / COORD_MAX * height),
        int(x2 / COORD_MAX * width),
        int(y2 / COORD_MAX * height),
    )


def grounding_boxes(text: str, image_size: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Every box of a model answer, one entry per box, ready for JSON.

    Each entry: ``{"label", "box": [x1, y1, x2, y2]}`` in the model's 0..999 scale, plus ``"pixels"``
    when ``image_size`` (width, height of the original image the answer describes) is given: the box in
    that image's pixels by ``boxes_to_pixels`` (the official demo's mapping; 999 maps to the width or
    height itself, one past the last pixel). A label with several boxes gives several entries.
    """
    entries: list[dict[str, Any]] = []
    for ref in parse_grounding(text):
        for box in ref.boxes:
            entry: dict[str, Any] = {"label": ref.label, "box": list(box)}
            if image_size is not None:
                entry["pixels"] = list(boxes_to_pixels(box, *image_size))
            entries.append(entry)
    return entries


def _fit_label(draw: ImageDraw.ImageDraw, label: str, font: Any, max_width: int) -> str:
    """``label``, cut short with "..." if it is wider than ``max_width`` pixels (so it stays readable)."""
    if draw.textlength(label, font=font) <= max_width:
        return label
    while label and draw.textlength(label + "...", font=font) > max_width:
        label = label[:-1]
    return label.rstrip() + "..." if label else ""


def _load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def draw_boxes(image: Image.Image, refs: list[GroundedRef]) -> Image.Image:
    """Return an RGB copy of ``image`` with each ref's boxes outlined and labelled (one colour per ref)."""
    canvas = image.convert("RGB")  # always a copy; never draw on the caller's image
    width, height = canvas.size
    draw = ImageDraw.Draw(canvas)
    # Upstream uses a 3 px outline and 20 px text; scale up for large images so they stay visible.
    line = max(3, round(max(width, height) / 400))
    font = _load_font(max(14, round(max(width, height) / 40)))
    for i, ref in enumerate(refs):
        color = BOX_COLORS[i % len(BOX_COLORS)]
        for box in ref.boxes:
            x1, y1, x2, y2 = boxes_to_pixels(box, width, height)
            # 999 maps to W (one past the last column); clamp so the right/bottom edge stays visible.
            x1, x2 = min(x1, width - 1), min(x2, width - 1)
            y1, y2 = min(y1, height - 1), min(y2, height - 1)
            draw.rectangle((x1, y1, x2, y2), outline=color, width=line)
            label = _fit_label(draw, ref.label, font, width - 4)
            if not label:
                continue
            left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
            text_w, text_h = right - left, bottom - top
            # Above the box like upstream's (x1, y1 - 20); inside the top edge when there is no room, and
            # never below the image's bottom edge.
            ty = y1 - text_h - 4 if y1 - text_h - 4 >= 0 else y1 + line
            ty = max(0, min(ty, height - text_h - 4))
            tx = max(0, min(x1, width - text_w - 4))
            draw.rectangle((tx, ty, tx + text_w + 4, ty + text_h + 4), fill=color)
            # Dark text on light colours, white on dark ones.
            ink = (0, 0, 0) if sum(color) > 380 else (255, 255, 255)
            draw.text((tx + 2 - left, ty + 2 - top), label, fill=ink, font=font)
    return canvas


def draw_grounding(image: Image.Image, text: str) -> Image.Image:
    """Parse ``text`` (model output) and draw its boxes on a copy of ``image`` (the image it describes)."""
    return draw_boxes(image, parse_grounding(text))
