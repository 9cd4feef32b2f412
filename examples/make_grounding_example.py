#!/usr/bin/env python3
"""Draw examples/stages_grounding.png: what `--draw` makes of a grounded answer about examples/stages.png.

The answer below is written by hand in the model's grounding format (boxes on the 0-999 scale of the
image's width and height): the random-weight checkpoints this repository can make offline practically
never emit boxes. The drawing is the command line's own, ``deepseek_vl2.grounding.draw_grounding``.
"""
import json
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepseek_vl2.grounding import draw_grounding, grounding_boxes  # noqa: E402

# Several labels, and one label ("a stage") with several boxes.
ANSWER = (
    "The diagram shows <|ref|>a stage<|/ref|><|det|>[[47, 222, 297, 777], [375, 222, 624, 777], "
    "[702, 222, 952, 777]]<|/det|> each: <|ref|>a seed<|/ref|><|det|>[[133, 466, 211, 563]]<|/det|> "
    "becomes <|ref|>a sprout<|/ref|><|det|>[[446, 411, 552, 672]]<|/det|> and then "
    "<|ref|>a tree<|/ref|><|det|>[[737, 272, 918, 727]]<|/det|>."
)


def main() -> None:
    folder = Path(__file__).resolve().parent
    image = Image.open(folder / "stages.png").convert("RGB")
    draw_grounding(image, ANSWER).save(folder / "stages_grounding.png", optimize=True)
    for box in grounding_boxes(ANSWER, image.size):
        print(json.dumps(box))


if __name__ == "__main__":
    main()
