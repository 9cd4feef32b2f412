"""Shared test fixtures: where the golden fixtures live, and the project root.

The fixtures root is ``$DEEPSEEK_VL2_FIXTURES``, else the project's own copy, ``tests/fixtures`` (the golden
vectors of the official implementation, byte for byte as the team's ``../shared/fixtures``; see its README), so a
clone with nothing beside it runs the whole suite.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parent.parent
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

IN_PROJECT_FIXTURES = PROJECT_DIR / "tests" / "fixtures"
FIXTURES_DIR = Path(os.environ.get("DEEPSEEK_VL2_FIXTURES") or IN_PROJECT_FIXTURES).resolve()


def process_memory(pid: int) -> dict[str, int]:
    """VmRSS and its anonymous part RssAnon of process ``pid``, in bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon"):
            found[name] = int(value.split()[0]) * 1024
    return found


@pytest.fixture(scope="session")
def project_dir() -> Path:
    return PROJECT_DIR


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES_DIR.is_dir():
        pytest.fail(f"golden fixtures not found at {FIXTURES_DIR} (set DEEPSEEK_VL2_FIXTURES)")
    return FIXTURES_DIR


# --------------------------------------------------------------------------------------------
# Images that a request may carry: ones the model must refuse with a clear message, and unusual
# ones it must accept. Built in memory (no files in the repo).


def _png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (tiny body): a bomb or a zero-size image."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def _encode(image, fmt: str, **kwargs) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def bad_images() -> dict[str, tuple[str, bytes]]:
    """name -> (file suffix, bytes) of inputs that must fail with a readable message."""
    import numpy as np
    from PIL import Image

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    whole = _encode(noise, "PNG")
    return {
        "not_an_image": (".png", b"This is a text file, not an image.\n" * 20),
        "truncated": (".png", whole[: len(whole) // 2]),
        "zero_bytes": (".png", b""),
        "zero_width": (".png", _png_with_header(0, 16)),
        "decompression_bomb": (".png", _png_with_header(30000, 30000)),
    }


@pytest.fixture(scope="session")
def unusual_images() -> dict[str, tuple[str, bytes]]:
    """name -> (file suffix, bytes) of valid but unusual images that must simply work."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    frames = [Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)) for _ in range(3)]
    gif = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    cmyk = _encode(Image.fromarray(rng.integers(0, 255, (200, 300, 4), dtype=np.uint8), mode="CMYK"), "JPEG")
    deep = _encode(Image.fromarray(rng.integers(0, 65535, (150, 220), dtype=np.uint16)), "PNG")
    return {"animated_gif": (".gif", gif), "cmyk_jpeg": (".jpg", cmyk), "sixteen_bit_png": (".png", deep)}
