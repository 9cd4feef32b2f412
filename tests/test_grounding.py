"""Grounding output parsing and drawing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deepseek_vl2.grounding import (
    BOX_COLORS,
    GroundedRef,
    boxes_to_pixels,
    draw_boxes,
    draw_grounding,
    grounding_boxes,
    parse_grounding,
)

README_ANSWER = "<|ref|>The giraffe at the back.<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|><｜end▁of▁sentence｜>"


def test_parse_readme_example():
    assert parse_grounding(README_ANSWER) == [GroundedRef("The giraffe at the back.", [(580, 270, 999, 900)])]


def test_parse_several_refs_and_boxes_in_grounded_conversation():
    text = (
        "In the picture <|ref|>a cat<|/ref|><|det|>[[10, 20, 30, 40], [50, 60, 70, 80]]<|/det|> sits next to "
        "<|ref|> a dog <|/ref|><|det|>[[0,0,999,999]]<|/det|>."
    )
    assert parse_grounding(text) == [
        GroundedRef("a cat", [(10, 20, 30, 40), (50, 60, 70, 80)]),
        GroundedRef("a dog", [(0, 0, 999, 999)]),
    ]


def test_parse_no_grounding():
    assert parse_grounding("Just a caption.") == []
    assert parse_grounding("") == []


def test_malformed_boxes_are_skipped_not_evaluated():
    text = (
        "<|ref|>x<|/ref|><|det|>[[1, 2, 3], [2, 311, 99999, 98], [__import__('os'), 1, 2, 3], "
        "[-5, 1, 2, 3], [[4, 5, 6, 7]], [1.6, 2, 3, 4]]<|/det|>"
    )
    # Nested list tolerated, float rounded, everything else dropped.
    assert parse_grounding(text) == [GroundedRef("x", [(4, 5, 6, 7), (2, 2, 3, 4)])]


def test_det_without_valid_box_and_reversed_corners():
    assert parse_grounding("<|ref|>a<|/ref|><|det|>[[nonsense]]<|/det|>") == [GroundedRef("a", [])]
    assert parse_grounding("<|ref|>a<|/ref|><|det|>[[300, 400, 100, 200]]<|/det|>") == [
        GroundedRef("a", [(100, 200, 300, 400)])
    ]


def test_det_without_ref_and_ref_without_det():
    text = "<|det|>[[1, 2, 3, 4]]<|/det|> then <|ref|>orphan<|/ref|> and nothing"
    assert parse_grounding(text) == [GroundedRef("", [(1, 2, 3, 4)])]


def test_unterminated_det_at_end_of_truncated_generation():
    text = "<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|><|ref|>b<|/ref|><|det|>[[5, 6, 7, 8], [9, 10"
    assert parse_grounding(text) == [GroundedRef("a", [(1, 2, 3, 4)]), GroundedRef("b", [(5, 6, 7, 8)])]


def test_boxes_to_pixels_matches_upstream_formula():
    assert boxes_to_pixels((580, 270, 999, 900), 640, 480) == (371, 129, 640, 432)
    assert boxes_to_pixels((0, 0, 999, 999), 100, 50) == (0, 0, 100, 50)
    W, H = 1234, 567
    box = (123, 456, 789, 998)
    assert boxes_to_pixels(box, W, H) == (
        int(123 / 999 * W),
        int(456 / 999 * H),
        int(789 / 999 * W),
        int(998 / 999 * H),
    )


def test_draw_grounding_draws_on_a_copy():
    image = Image.new("RGB", (640, 480), (255, 255, 255))
    out = draw_grounding(image, README_ANSWER)
    assert out is not image and out.size == image.size and out.mode == "RGB"
    assert image.getpixel((371, 300)) == (255, 255, 255)  # caller's image untouched
    x1, y1, x2, y2 = boxes_to_pixels((580, 270, 999, 900), 640, 480)
    assert out.getpixel((x1, (y1 + y2) // 2)) == BOX_COLORS[0]  # left edge
    assert out.getpixel((639, (y1 + y2) // 2)) == BOX_COLORS[0]  # right edge clamped into the image
    assert out.getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == (255, 255, 255)  # inside untouched
    # The label is drawn above the box.
    above = np.asarray(out.crop((x1, 0, x2, y1)))
    assert (above != 255).any()


def test_draw_boxes_colours_cycle_per_ref():
    refs = [GroundedRef(f"r{i}", [(60 * i, 100, 60 * i + 40, 900)]) for i in range(14)]
    out = draw_boxes(Image.new("L", (999, 999), 0), refs)
    assert out.mode == "RGB"
    for i in range(14):
        x1, _, _, _ = boxes_to_pixels(refs[i].boxes[0], 999, 999)
        assert out.getpixel((x1, 700)) == BOX_COLORS[i % len(BOX_COLORS)]  # 14th ref wraps to colour 0


def test_label_of_box_at_top_edge_goes_inside():
    out = draw_grounding(Image.new("RGB", (400, 400), (0, 0, 0)), "<|ref|>top<|/ref|><|det|>[[100, 0, 900, 500]]<|/det|>")
    inside = np.asarray(out.crop((45, 5, 355, 60)))
    assert (inside == BOX_COLORS[0]).all(axis=-1).any()  # label background drawn inside the box


@pytest.mark.parametrize("text", ["", "no boxes", "<|ref|>a<|/ref|><|det|>[[bad]]<|/det|>"])
def test_draw_without_boxes_returns_unchanged_copy(text):
    image = Image.new("RGB", (32, 16), (1, 2, 3))
    out = draw_grounding(image, text)
    assert out.tobytes() == image.tobytes()


def test_grounding_boxes_one_entry_per_box_with_pixels():
    text = ("<|ref|>cats<|/ref|><|det|>[[0, 0, 499, 999], [500, 10, 999, 20]]<|/det|> and "
            "<|ref|>a dog<|/ref|><|det|>[[100, 200, 300, 400]]<|/det|><|det|>[[7, 7, 9]]<|/det|>")
    assert grounding_boxes(text) == [
        {"label": "cats", "box": [0, 0, 499, 999]},
        {"label": "cats", "box": [500, 10, 999, 20]},
        {"label": "a dog", "box": [100, 200, 300, 400]},
    ]  # the det without a valid box gives no entry
    with_pixels = grounding_boxes(text, (640, 480))
    assert [entry["pixels"] for entry in with_pixels] == [
        list(boxes_to_pixels(tuple(entry["box"]), 640, 480)) for entry in with_pixels
    ]
    assert with_pixels[0]["pixels"] == [0, 0, 319, 480]
    assert grounding_boxes("no boxes here", (10, 10)) == []


def test_long_labels_are_cut_to_the_image_and_stay_inside_it():
    label = "a very long referring expression that is much wider than the image it describes"
    out = draw_grounding(Image.new("RGB", (200, 100), (0, 0, 0)), f"<|ref|>{label}<|/ref|><|det|>[[500, 990, 999, 999]]<|/det|>")
    pixels = np.asarray(out)
    background = (pixels == BOX_COLORS[0]).all(axis=-1)
    rows, cols = background.nonzero()
    # The label's background (the box's outline starts at x = 100) moved left to fit, most of the image
    # wide, and sits inside the image above the box although the box is at the image's bottom.
    label_rows = rows < 95
    assert cols[label_rows].min() < 100 and cols[label_rows].max() - cols[label_rows].min() > 150
    assert rows.min() >= 0 and rows[label_rows].max() < 95
    # Cut short to fit: the text (white on red) ends inside its background, which ends at the right edge.
    ink = (pixels == (255, 255, 255)).all(axis=-1)
    assert ink[:95].any() and not ink[:95, 197:].any()


def test_readme_picture_is_the_drawing_of_its_hand_written_answer(project_dir):
    """examples/stages_grounding.png (in the README) is what examples/make_grounding_example.py draws."""
    import importlib.util

    script = project_dir / "examples" / "make_grounding_example.py"
    spec = importlib.util.spec_from_file_location("make_grounding_example", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    stages = Image.open(project_dir / "examples" / "stages.png").convert("RGB")
    committed = Image.open(project_dir / "examples" / "stages_grounding.png").convert("RGB")
    assert committed.size == stages.size
    refs = parse_grounding(example.ANSWER)
    assert len(refs) == 4 and len(refs[0].boxes) == 3  # several labels, one with several boxes
    drawn = np.asarray(draw_grounding(stages, example.ANSWER)).astype(int)
    # Font rasterisation may differ by a few levels across builds; boxes and labels may not move.
    assert np.abs(drawn - np.asarray(committed).astype(int)).max() <= 48
    assert (np.abs(drawn - np.asarray(committed).astype(int)) > 0).mean() < 0.002
    assert "examples/stages_grounding.png" in (project_dir / "README.md").read_text()
