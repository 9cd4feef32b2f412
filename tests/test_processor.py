"""Processor: golden vectors of the official implementation, plus unit tests of tiling, image loading,
the chat template and (streaming) decoding."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import FIXTURES_DIR as FIXTURES  # ($DEEPSEEK_VL2_FIXTURES, else tests/fixtures)
from deepseek_vl2.processor import (
    DEFAULT_CANDIDATE_RESOLUTIONS,
    DeepseekVL2Processor,
    InputError,
    ProcessedInputs,
    image_token_count,
    load_image,
    select_best_resolution,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _discover_cases() -> list:
    cases = sorted(p.parent for p in FIXTURES.glob("cases/*/*/case.json"))
    if not cases:
        # Fail loudly rather than silently skipping the golden tests.
        return [pytest.param(None, id="no-fixture-cases-found")]
    return [pytest.param(c, id=f"{c.parent.name}/{c.name}") for c in cases]


@lru_cache(maxsize=None)
def processor_for(checkpoint: str) -> DeepseekVL2Processor:
    return DeepseekVL2Processor.from_pretrained(FIXTURES / checkpoint)


@lru_cache(maxsize=None)
def fixture_image(name: str) -> Image.Image:
    return load_image(FIXTURES / "images" / name)


def tile_sha256(tile: torch.Tensor) -> str:
    """sha256 of a normalised [3, S, S] tile as uint8, the fixtures' convention."""
    u8 = torch.round((tile * 0.5 + 0.5) * 255).to(torch.uint8).numpy()
    return hashlib.sha256(np.ascontiguousarray(u8).tobytes()).hexdigest()


def user(content: str, images=()) -> dict:
    return {"role": "<|User|>", "content": content, "images": list(images)}


def assistant(content: str = "") -> dict:
    return {"role": "<|Assistant|>", "content": content, "images": []}


@pytest.fixture(scope="module")
def proc() -> DeepseekVL2Processor:
    return processor_for("checkpoints/mha")


# ------------------------------------------------------------------------------------------------
# Golden cases
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_dir", _discover_cases())
def test_golden_case(case_dir):
    assert case_dir is not None, f"no fixture cases under {FIXTURES}/cases (set DEEPSEEK_VL2_FIXTURES)"
    case = json.loads((case_dir / "case.json").read_text(encoding="utf-8"))
    gold = load_file(str(case_dir / "tensors.safetensors"))
    processor = processor_for(case["checkpoint"])
    conversation = [
        {"role": m["role"], "content": m["content"], "images": [fixture_image(n) for n in m["images"]]}
        for m in case["conversation"]
    ]

    out = processor(conversation, system_prompt=case.get("system_prompt", ""))

    assert out.input_ids.dtype == torch.long and out.input_ids.ndim == 1
    assert out.input_ids.tolist() == gold["input_ids"].tolist()
    assert out.images_seq_mask.dtype == torch.bool
    assert torch.equal(out.images_seq_mask, gold["images_seq_mask"].bool())
    assert out.images_seq_mask.sum().item() == sum(out.num_image_tokens)
    assert out.images_spatial_crop.dtype == torch.long
    assert out.images_spatial_crop.tolist() == gold["images_spatial_crop"].tolist()
    assert out.sft_format == case["sft_format"]

    assert out.pixel_values.dtype == torch.float32
    assert tuple(out.pixel_values.shape) == (case["num_tiles"], 3, 384, 384)
    assert [tile_sha256(t) for t in out.pixel_values] == case["tile_sha256_uint8"]

    ids = case["generated_ids"]
    assert ids == gold["generated_ids"].tolist()
    assert processor.decode(ids) == case["generated_text"]
    assert processor.decode(torch.tensor(ids)) == case["generated_text"]
    assert processor.decode(ids, skip_special_tokens=True) == case["generated_text_skip_special"]
    for skip in (False, True):
        stream = processor.stream_decoder(skip_special_tokens=skip)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == processor.decode(ids, skip_special_tokens=skip)


def test_fixture_images_load_like_official():
    for path in sorted((FIXTURES / "images").glob("*.png")):
        with Image.open(path) as im:
            official = im.convert("RGB")
        ours = load_image(path)
        assert ours.mode == "RGB" and ours.size == official.size
        assert ours.tobytes() == official.tobytes(), path.name


# ------------------------------------------------------------------------------------------------
# Construction
# ------------------------------------------------------------------------------------------------


def test_special_ids_are_looked_up_by_string():
    for variant in ("mha", "mla"):
        p = processor_for(f"checkpoints/{variant}")
        tok = p.tokenizer
        assert p.bos_id == tok.token_to_id("<｜begin▁of▁sentence｜>")
        assert p.eos_id == tok.token_to_id("<｜end▁of▁sentence｜>")
        assert p.pad_id == tok.token_to_id("<｜▁pad▁｜>")
        assert p.image_token_id == tok.token_to_id("<image>")
        for t in ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>"):
            assert p.special_token_ids[t] == tok.token_to_id(t)
    # The two vocab layouts really differ (bos first vs. after the learned vocab).
    assert processor_for("checkpoints/mha").bos_id == 0
    assert processor_for("checkpoints/mla").bos_id > 2


def test_geometry_from_config(proc):
    assert proc.image_size == 384 and proc.patch_size == 14 and proc.downsample_ratio == 2
    assert proc.tokens_per_side == 14
    assert proc.candidate_resolutions == list(DEFAULT_CANDIDATE_RESOLUTIONS)


def test_candidate_resolutions_fall_back_to_config_json(tmp_path):
    src = FIXTURES / "checkpoints" / "mha"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, tmp_path / name)
    proc_cfg = json.loads((src / "processor_config.json").read_text(encoding="utf-8"))
    del proc_cfg["candidate_resolutions"]
    (tmp_path / "processor_config.json").write_text(json.dumps(proc_cfg), encoding="utf-8")
    (tmp_path / "config.json").write_text(json.dumps({"candidate_resolutions": [[384, 384], [768, 384]]}))
    p = DeepseekVL2Processor.from_pretrained(tmp_path)
    assert p.candidate_resolutions == [(384, 384), (768, 384)]
    out = p.process_prompt("<image>\nhi", [Image.new("RGB", (1000, 400), (9, 9, 9))])
    assert out.images_spatial_crop.tolist() == [[2, 1]]


# ------------------------------------------------------------------------------------------------
# Tiling
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, best",
    [
        ((640, 480), (768, 768)),
        ((800, 600), (1152, 768)),
        ((1024, 768), (1152, 768)),
        ((1280, 720), (1536, 768)),
        ((1920, 1080), (1536, 768)),
        ((1080, 1920), (768, 1536)),
        ((3000, 4000), (1152, 1152)),
        ((500, 2000), (384, 1536)),
        ((100, 100), (384, 384)),
        ((4000, 300), (3456, 384)),
    ],
)
def test_select_best_resolution_spec_examples(size, best):
    assert select_best_resolution(size, DEFAULT_CANDIDATE_RESOLUTIONS) == best


def test_select_best_resolution_tie_break_prefers_less_waste_then_list_order():
    # 384x384 image: every candidate keeps all pixels; least waste wins.
    assert select_best_resolution((384, 384), DEFAULT_CANDIDATE_RESOLUTIONS) == (384, 384)
    # Equal effective resolution and equal waste: the first candidate in list order wins.
    assert select_best_resolution((10, 10), [(384, 768), (768, 384)]) == (384, 768)
    assert select_best_resolution((10, 10), [(768, 384), (384, 768)]) == (768, 384)


@pytest.mark.parametrize(
    "grid, n", [((1, 1), 421), ((2, 2), 1023), ((3, 2), 1415), ((4, 2), 1807), ((2, 4), 1835), ((3, 3), 2017), ((1, 9), 2101)]
)
def test_image_token_count(grid, n):
    assert image_token_count(*grid) == n


def test_image_token_count_matches_processor_output(proc):
    image = Image.new("RGB", (1280, 720), (200, 10, 10))
    out = proc.process_prompt("<image>\nWhat?", [image])
    assert out.images_spatial_crop.tolist() == [[4, 2]]
    assert out.num_image_tokens == [1807]
    assert int(out.images_seq_mask.sum()) == 1807
    assert (out.input_ids[out.images_seq_mask] == proc.image_token_id).all()
    assert out.num_tiles == 1 + 8


def test_tiles_are_row_major_crops_of_the_padded_canvas(proc):
    # Four flat quadrants of a 768x768 image -> 2x2 tiles equal to those colours, in row-major order.
    arr = np.zeros((768, 768, 3), np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    arr[:384, :384], arr[:384, 384:], arr[384:, :384], arr[384:, 384:] = colours
    views, grid = proc.tile_image(Image.fromarray(arr))
    assert grid == (2, 2) and views.shape == (5, 3, 384, 384)
    for tile, colour in zip(views[1:], colours):
        centre = torch.round((tile[:, 192, 192] * 0.5 + 0.5) * 255).to(torch.int64).tolist()
        assert centre == list(colour)


def test_padding_is_grey_127(proc):
    views, grid = proc.tile_image(Image.new("RGB", (768, 100), (0, 0, 0)))
    assert grid == (2, 1)
    top_left = views[0, :, 0, 0]
    assert torch.allclose(top_left, torch.full((3,), 127 / 255 * 2 - 1))


def test_more_than_two_images_disables_tiling_across_messages(proc):
    big = Image.new("RGB", (1200, 1200), (50, 60, 70))
    two = proc([user("<image>\nA", [big]), assistant("ok"), user("<image>\nB", [big]), assistant()])
    assert two.images_spatial_crop.tolist() == [[3, 3], [3, 3]]
    three = proc(
        [user("<image>\nA", [big]), assistant("ok"), user("<image><image>\nB", [big, big]), assistant()]
    )
    assert three.images_spatial_crop.tolist() == [[1, 1]] * 3
    assert three.num_image_tokens == [421] * 3
    assert three.num_tiles == 6
    # Without cropping the single local tile is the global view.
    assert torch.equal(three.pixel_values[0], three.pixel_values[1])


def test_text_only(proc):
    out = proc.process_prompt("Hello there")
    assert out.num_tiles == 0 and tuple(out.pixel_values.shape) == (0, 3, 384, 384)
    assert out.images_spatial_crop.tolist() == [[0, 0]]  # as upstream
    assert out.num_images == 0 and not out.images_seq_mask.any()
    assert out.input_ids[0].item() == proc.bos_id


# ------------------------------------------------------------------------------------------------
# Chat template
# ------------------------------------------------------------------------------------------------


def test_template_token_layout(proc):
    out = proc([user("  Q1  "), assistant(" A1 "), user("Q2"), assistant()])
    enc = proc.encode
    expected = (
        [proc.bos_id]
        + enc("<|User|>: Q1\n\n<|Assistant|>:")
        + enc("A1")
        + [proc.eos_id]
        + enc("<|User|>: Q2\n\n<|Assistant|>:")
    )
    assert out.input_ids.tolist() == expected
    assert out.sft_format == "<|User|>: Q1\n\n<|Assistant|>: A1<｜end▁of▁sentence｜><|User|>: Q2\n\n<|Assistant|>:"


def test_lowercase_roles_and_system_message(proc):
    a = proc([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}])
    expected = [proc.bos_id] + proc.encode("Be brief.") + proc.encode("<|User|>: Hi\n\n<|Assistant|>:")
    assert a.input_ids.tolist() == expected
    assert a.sft_format.startswith("Be brief.\n\n<|User|>: Hi")
    # A conversation ending on the user turn gets the assistant turn implicitly.
    b = proc([{"role": "user", "content": "Hi"}])
    assert b.input_ids.tolist() == [proc.bos_id] + proc.encode("<|User|>: Hi\n\n<|Assistant|>:")


def test_bad_roles_and_messages(proc):
    with pytest.raises(InputError, match="role"):
        proc([{"role": "robot", "content": "x"}])
    with pytest.raises(InputError, match="first"):
        proc([user("a"), {"role": "system", "content": "x"}])
    with pytest.raises(InputError, match="Assistant"):
        proc([user("a"), assistant("<image> no"), user("b", [Image.new("RGB", (8, 8))]), assistant()])
    with pytest.raises(InputError):
        proc([])


def test_fewer_images_than_tags_is_a_clear_error(proc):
    with pytest.raises(InputError, match=r"2 <image> tag\(s\) but only 1 image"):
        proc([user("<image><image>", [Image.new("RGB", (8, 8))]), assistant()])
    with pytest.raises(InputError):
        proc.process_prompt("<image> what?", [])


def test_images_are_consumed_in_order_across_messages(proc):
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    # Both images attached to the first message; the second tag is in the later message.
    out = proc([user("<image> first", [red, blue]), assistant("ok"), user("<image> second"), assistant()])
    assert out.num_image_tokens == [421, 421]  # 1x1 each (64x64 -> 384x384)
    red_px = torch.round((out.pixel_values[0, :, 192, 192] * 0.5 + 0.5) * 255).tolist()
    blue_px = torch.round((out.pixel_values[2, :, 192, 192] * 0.5 + 0.5) * 255).tolist()
    assert red_px == [255, 0, 0] and blue_px == [0, 0, 255]


def test_process_prompt(proc):
    image = Image.new("RGB", (500, 300), (10, 200, 30))
    direct = proc([user("<image>\nDescribe.", [image]), assistant()])
    via = proc.process_prompt("<image>\nDescribe.", [image])
    assert torch.equal(direct.input_ids, via.input_ids)
    assert torch.equal(direct.pixel_values, via.pixel_values)
    # Missing tags are prepended (web demo behaviour) so no image is silently dropped.
    auto = proc.process_prompt("Describe.", image)
    assert torch.equal(auto.input_ids, via.input_ids)


def test_to_moves_and_casts_only_pixel_values(proc):
    out = proc.process_prompt("<image>\nx", [Image.new("RGB", (20, 20))]).to("cpu", torch.bfloat16)
    assert isinstance(out, ProcessedInputs)
    assert out.pixel_values.dtype == torch.bfloat16
    assert out.input_ids.dtype == torch.long and out.images_spatial_crop.dtype == torch.long
    assert out.images_seq_mask.dtype == torch.bool


# ------------------------------------------------------------------------------------------------
# Lone surrogates (JSON "\\ud800", which json.load accepts)
# ------------------------------------------------------------------------------------------------

# Token ids the official stack gives: LlamaTokenizerFast.encode(text, add_special_tokens=False) of
# transformers 4.38.2 with its tokenizers 0.15.2, on each fixture tokenizer (run here in a separate venv).
SURROGATE_TEXTS = ["<|User|>: hello \ud800 world\n\n<|Assistant|>:", "\ud83d\ude00 and \U0001F600", "中\udfff文",
                   "<|ref|>\udc00<|/ref|>"]
OFFICIAL_SURROGATE_IDS = {
    "mha": [[1406, 28, 223, 322, 78, 386, 223, 174, 126, 124, 174, 126, 124, 174, 126, 124, 288, 270, 474, 201, 201,
             1407, 28],
            [174, 126, 124, 174, 126, 124, 174, 126, 124, 174, 126, 124, 174, 126, 124, 174, 126, 124, 320, 223, 175,
             256, 249, 225],
            [938, 258, 174, 126, 124, 174, 126, 124, 174, 126, 124, 165, 247, 232],
            [1401, 174, 126, 124, 174, 126, 124, 174, 126, 124, 1402]],
    "mla": [[1509, 25, 220, 319, 75, 383, 220, 171, 123, 121, 171, 123, 121, 171, 123, 121, 285, 267, 471, 198, 198,
             1510, 25],
            [171, 123, 121, 171, 123, 121, 171, 123, 121, 171, 123, 121, 171, 123, 121, 171, 123, 121, 317, 220, 172,
             253, 246, 222],
            [935, 255, 171, 123, 121, 171, 123, 121, 171, 123, 121, 162, 244, 229],
            [1504, 171, 123, 121, 171, 123, 121, 171, 123, 121, 1505]],
}


@pytest.mark.parametrize("variant", ["mha", "mla"])
def test_lone_surrogates_are_tokenized_as_the_official_stack(variant):
    """Each lone surrogate is taken as the official stack takes it: three U+FFFD (one per byte of its UTF-8
    form), never a TypeError from the tokenizers library."""
    processor = processor_for(f"checkpoints/{variant}")
    assert [processor.encode(text) for text in SURROGATE_TEXTS] == OFFICIAL_SURROGATE_IDS[variant]
    assert processor.encode("a\ud800b") == processor.encode("a\ufffd\ufffd\ufffdb")
    for text in SURROGATE_TEXTS:
        assert processor.min_tokens(text) <= len(processor.encode(text))  # (the cheap bound stays a bound)


def test_well_formed_text_replaces_only_lone_surrogates():
    from deepseek_vl2.processor import well_formed_text

    text = "plain, 中文, \U0001F600 <|ref|>"
    assert well_formed_text(text) is text
    assert well_formed_text("x\ud800y\udfff") == "x\ufffd\ufffd\ufffdy\ufffd\ufffd\ufffd"
    assert well_formed_text(json.loads('"\\ud83d\\ude00"')) == "\U0001F600"  # (JSON joins a real pair itself)


def test_a_conversation_with_a_lone_surrogate_is_processed(proc):
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    conversation = json.loads('[{"role": "system", "content": "Be \\udfff brief."}, '
                              '{"role": "<|User|>", "content": "<image>\\nWhat is \\ud800 this?"}, '
                              '{"role": "<|Assistant|>", "content": "A \\udc00 square."}, '
                              '{"role": "<|User|>", "content": "Sure?"}, {"role": "<|Assistant|>", "content": ""}]')
    conversation[1]["images"] = [image]
    out = proc(conversation)
    expected = [{**m, "content": m["content"].encode("utf-8", "surrogatepass").decode("utf-8", "replace")}
                for m in conversation]
    assert torch.equal(out.input_ids, proc(expected).input_ids)
    assert out.sft_format == proc(expected).sft_format
    out.sft_format.encode("utf-8")  # printable: no lone surrogate left
    via_prompt = proc.process_prompt("What is \ud800 this?", image)
    assert torch.equal(via_prompt.input_ids, proc.process_prompt("What is \ufffd\ufffd\ufffd this?", image).input_ids)


# ------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------


def test_decode_ignores_ids_beyond_tokenizer(proc):
    n = proc.tokenizer.get_vocab_size()
    assert proc.decode([n, n + 5]) == ""


@pytest.mark.parametrize("variant", ["mha", "mla"])
def test_stream_decoder_never_splits_characters_and_matches_decode(variant):
    p = processor_for(f"checkpoints/{variant}")
    text = "这是一个测试。 数字 12345 和 3.14159 ünïcödé 😀🎉 <|ref|>box<|/ref|>"
    ids = p.encode(text)
    stream = p.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)

    # Random id soups (genuine U+FFFD, special tokens, ids beyond the tokenizer) still concatenate
    # exactly to decode(), and flush() emits everything.
    rng = random.Random(1234)
    vocab = p.tokenizer.get_vocab_size()
    for _ in range(150):
        soup = [rng.choice(ids) if rng.random() < 0.5 else rng.randrange(vocab + 20) for _ in range(rng.randrange(1, 30))]
        for skip in (False, True):
            stream = p.stream_decoder(skip_special_tokens=skip)
            got = "".join(stream.push(i) for i in soup) + stream.flush()
            assert got == p.decode(soup, skip_special_tokens=skip)


# ------------------------------------------------------------------------------------------------
# Image loading
# ------------------------------------------------------------------------------------------------


def _png_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _noise(mode: str, size=(48, 32), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode="L" if channels == 1 else None).convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "LA", "1"])
def test_ordinary_pngs_load_exactly_like_official(tmp_path, mode):
    path = tmp_path / f"x_{mode}.png"
    _noise("RGBA" if mode in ("RGBA", "LA") else "RGB").convert(mode).save(path)
    with Image.open(path) as im:
        official = im.convert("RGB")
    for source in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes())):
        ours = load_image(source)
        assert ours.mode == "RGB" and ours.tobytes() == official.tobytes()


def test_cmyk(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)
    r, g, b = image.getpixel((20, 15))
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_grey_is_rescaled_not_saturated(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 16).astype(np.uint16).reshape(16, 64)
    path = tmp_path / "g16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # really a high-bit-depth image
    image = load_image(path)
    arr = np.asarray(image)
    assert image.mode == "RGB"
    expected = np.rint(ramp / 257).astype(np.uint8)
    assert np.array_equal(arr[..., 0], expected)
    assert arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255 and 100 < arr.mean() < 155


def _grey16(values: np.ndarray, mode: str) -> Image.Image:
    """A 16-bit grey image of ``mode`` (I;16, I;16B) or a 32-bit ``I`` image holding ``values``."""
    if mode == "I":
        return Image.fromarray(values.astype(np.int32))
    dtype = ">u2" if mode == "I;16B" else "<u2"
    return Image.frombytes(mode, (values.shape[1], values.shape[0]), values.astype(dtype).tobytes())


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_grey_with_8_bit_values_is_kept_as_the_official_conversion(tmp_path, mode):
    """Values 0..255 in a 16- or 32-bit image: the pixels are those values, the same in every container, and
    the official conversion's (Pillow's convert("RGB"), which clips at 255 and so changes nothing)."""
    ramp = np.arange(256, dtype=np.uint16).reshape(16, 16)
    image = _grey16(ramp, mode)
    assert image.mode == mode and np.array_equal(np.asarray(image), ramp)
    ours = np.asarray(load_image(image))
    assert np.array_equal(ours, np.asarray(image.convert("RGB")))
    assert np.array_equal(ours[..., 0], ramp) and np.array_equal(ours[..., 2], ramp)
    path = tmp_path / "g.png"  # a 16-bit PNG file with those values reads the same
    _grey16(ramp, "I;16").save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    assert np.array_equal(np.asarray(load_image(path)), ours)


@pytest.mark.parametrize("top", [256, 1000, 65535])
def test_sixteen_bit_values_give_the_same_pixels_in_i16_and_i(top):
    """Values above 255 are 16-bit data in every container: value / 257, rounded."""
    values = np.linspace(0, top, 64).astype(np.uint16).reshape(8, 8)
    expected = np.rint(values / 257).astype(np.uint8)
    for mode in ("I;16", "I;16B", "I"):
        assert np.array_equal(np.asarray(load_image(_grey16(values, mode)))[..., 1], expected), mode


@pytest.mark.parametrize(
    "arr, expect",
    [
        (np.array([[0, 1000, 65535]], np.int32), [0, 4, 255]),  # 16-bit values in a 32-bit "I" image
        (np.array([[0, 128, 255]], np.int32), [0, 128, 255]),  # 8-bit values in an "I" image
        (np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),  # float in [0, 1]
        (np.array([[-1.0, 0.0, 3.0]], np.float32), [0, 64, 255]),  # other float range: min-max
    ],
)
def test_int32_and_float_modes(arr, expect):
    image = load_image(Image.fromarray(arr))
    assert np.asarray(image)[0, :, 0].tolist() == expect


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as im:
        assert im.n_frames == 3
    image = load_image(path)
    assert image.mode == "RGB" and image.getpixel((5, 5)) == (255, 0, 0)


def test_exif_orientation_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 40)
    assert load_image(path, exif_transpose=False).size == (40, 20)


def test_truncated_png(tmp_path):
    data = _png_bytes(_noise("RGB", (128, 128)))
    with pytest.raises(InputError, match="truncated|damaged"):
        load_image(data[: len(data) // 2])


def test_garbage_and_empty_bytes(tmp_path):
    with pytest.raises(InputError, match="not an image"):
        load_image(b"this is certainly not an image" * 10)
    with pytest.raises(InputError, match="empty"):
        load_image(b"")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="not an image"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InputError):
        load_image(12345)


def _zero_width_png() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)  # width 0, height 10, 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_zero_size_images():
    with pytest.raises(InputError):
        load_image(_zero_width_png())
    with pytest.raises(InputError, match="empty"):
        load_image(Image.new("RGB", (0, 5)))


def test_decompression_bomb(monkeypatch):
    data = _png_bytes(Image.new("RGB", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match="too large"):
        load_image(data)  # > 2x limit: Pillow's error
    with pytest.raises(InputError, match="too large"):
        load_image(_png_bytes(Image.new("RGB", (40, 40))))  # between 1x and 2x: Pillow only warns


def test_processor_accepts_paths_and_non_rgb_images(proc, tmp_path):
    path = tmp_path / "p.png"
    _noise("RGB", (90, 60)).convert("P").save(path)
    by_path = proc.process_prompt("<image>", [path])
    by_image = proc.process_prompt("<image>", [Image.open(path)])
    assert torch.equal(by_path.pixel_values, by_image.pixel_values)
