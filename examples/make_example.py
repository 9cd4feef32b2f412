#!/usr/bin/env python3
"""Draw examples/stages.png: a small three-stage flow diagram (made with Pillow, no external assets)."""
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def draw(path: Path) -> None:
    img = Image.new("RGB", (640, 360), (250, 250, 245))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=20)
    small = ImageFont.load_default(size=14)
    d.text((320, 28), "From seed to tree", fill=(30, 30, 30), font=font, anchor="mm")
    stages = [("1. Seed", (150, 110, 60)), ("2. Sprout", (90, 170, 70)), ("3. Tree", (40, 120, 50))]
    for i, (label, colour) in enumerate(stages):
        x0 = 30 + i * 210
        d.rounded_rectangle((x0, 80, x0 + 160, 280), radius=14, outline=(60, 60, 60), width=3, fill=(255, 255, 255))
        cx = x0 + 80
        if i == 0:
            d.ellipse((cx - 22, 170, cx + 22, 200), fill=colour)
        elif i == 1:
            d.line((cx, 240, cx, 170), fill=colour, width=6)
            d.ellipse((cx - 30, 150, cx, 175), fill=colour)
            d.ellipse((cx, 150, cx + 30, 175), fill=colour)
        else:
            d.rectangle((cx - 10, 190, cx + 10, 260), fill=(110, 80, 50))
            d.ellipse((cx - 55, 100, cx + 55, 205), fill=colour)
        d.line((x0 + 10, 250, x0 + 150, 250), fill=(120, 90, 60), width=2)
        d.text((cx, 300), label, fill=(30, 30, 30), font=small, anchor="mm")
        if i < 2:
            ax = x0 + 165
            d.line((ax, 180, ax + 40, 180), fill=(60, 60, 60), width=4)
            d.polygon([(ax + 40, 170), (ax + 52, 180), (ax + 40, 190)], fill=(60, 60, 60))
    img.save(path, optimize=True)


if __name__ == "__main__":
    draw(Path(__file__).resolve().parent / "stages.png")
