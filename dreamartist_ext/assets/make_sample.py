"""Draws the demo reference image `sample.png`: a smiling red-capped mushroom on a plain background.

Deterministic (no randomness, no fonts): `python dreamartist_ext/assets/make_sample.py` rewrites the same file.
Shapes are drawn at 4x and downscaled once, which anti-aliases the edges.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 256
SUPERSAMPLE = 4

BACKGROUND = (222, 238, 230)  # pale mint
SHADOW = (196, 214, 205)
CAP_RED = (214, 58, 52)
CAP_EDGE = (168, 38, 40)
SPOT_WHITE = (250, 244, 232)
STEM_CREAM = (246, 230, 200)
STEM_SHADE = (226, 204, 168)
INK = (52, 36, 36)
BLUSH = (240, 150, 140)
GRASS = (108, 170, 96)


def draw_sample() -> Image.Image:
    scale = SUPERSAMPLE
    canvas = Image.new("RGB", (SIZE * scale, SIZE * scale), BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
        """Coordinates are written for a 256 px image; this scales them to the supersampled canvas."""
        return (round(x0 * scale), round(y0 * scale), round(x1 * scale), round(y1 * scale))

    # Ground shadow and a few tufts of grass.
    draw.ellipse(box(58, 212, 198, 236), fill=SHADOW)
    for x in (70, 176, 190):
        draw.polygon([(x * scale, 226 * scale), ((x + 5) * scale, 208 * scale), ((x + 10) * scale, 226 * scale)], fill=GRASS)

    # Stem: a rounded body with a shaded right side.
    draw.rounded_rectangle(box(86, 96, 170, 224), radius=34 * scale, fill=STEM_SHADE)
    draw.rounded_rectangle(box(86, 96, 160, 222), radius=32 * scale, fill=STEM_CREAM)

    # Face on the stem.
    draw.ellipse(box(105, 158, 117, 174), fill=INK)  # eyes
    draw.ellipse(box(139, 158, 151, 174), fill=INK)
    draw.ellipse(box(108, 161, 112, 165), fill=SPOT_WHITE)  # eye highlights
    draw.ellipse(box(142, 161, 146, 165), fill=SPOT_WHITE)
    draw.ellipse(box(93, 176, 107, 185), fill=BLUSH)  # cheeks
    draw.ellipse(box(149, 176, 163, 185), fill=BLUSH)
    draw.arc(box(118, 168, 138, 186), start=20, end=160, fill=INK, width=3 * scale)  # smile

    # Cap: a dome (upper half of an ellipse) with a darker rim and white spots.
    draw.pieslice(box(34, 40, 222, 176), start=180, end=360, fill=CAP_EDGE)
    draw.pieslice(box(38, 44, 218, 168), start=180, end=360, fill=CAP_RED)
    draw.rounded_rectangle(box(40, 100, 216, 112), radius=6 * scale, fill=CAP_EDGE)
    for x0, y0, diameter in ((70, 72, 26), (116, 52, 30), (166, 70, 24), (98, 86, 14), (150, 92, 12)):
        draw.ellipse(box(x0, y0, x0 + diameter, y0 + diameter * 0.8), fill=SPOT_WHITE)

    return canvas.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def main() -> None:
    target = Path(__file__).resolve().parent / "sample.png"
    draw_sample().save(target, format="PNG", optimize=True)
    print(f"wrote {target} ({target.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
