"""The toy world: one coloured shape on a plain background, 64 px, with its caption.

Rendering is exact and seeded: a scene (shape, colour, background, centre, size, rotation, small colour
jitter) draws the same picture every time. Supersampled 4x and reduced, so edges are smooth like a photo's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 30), "green": (40, 180, 60),
    "blue": (40, 90, 230), "purple": (140, 50, 200), "pink": (250, 130, 200), "cyan": (40, 215, 225),
}
BACKGROUNDS = {
    "white": (238, 238, 238), "gray": (128, 128, 128), "black": (22, 22, 22), "brown": (115, 72, 40),
    "navy": (22, 32, 92), "beige": (215, 196, 152),
}
# Shape/colour pairs never shown in pretraining (on any background): the concepts one image teaches.
# Each shape and each colour is held out at most once, so the model knows every part, never the pair.
HELD_OUT = (("star", "purple"), ("circle", "orange"), ("square", "pink"), ("triangle", "cyan"),
            ("cross", "yellow"), ("ring", "green"))
GENERIC_SHAPE = "shape"  # the caption word when a caption leaves the shape out ("a red shape")
WORDS = (("a", "on", "background", GENERIC_SHAPE) + SHAPES + tuple(COLOURS) + tuple(BACKGROUNDS))


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    cx: float = 0.5  # centre, as a fraction of the side
    cy: float = 0.5
    radius: float = 0.26  # half the shape's extent, as a fraction of the side
    angle: float = 0.0  # degrees
    tint: tuple[int, int, int] = (0, 0, 0)  # small colour jitter of the shape
    shade: int = 0  # small brightness jitter of the background

    @property
    def concept(self) -> tuple[str, str]:
        return (self.shape, self.colour)

    def caption(self, *, shape: bool = True, colour: bool = True, background: bool = True) -> str:
        """'a red star on a gray background'; parts left out read 'a red shape', 'a star', 'a red star'."""
        if not (shape or colour or background):
            return ""
        words = ["a"] + ([self.colour] if colour else []) + [self.shape if shape else GENERIC_SHAPE]
        if background:
            words += ["on", "a", self.background, "background"]
        return " ".join(words)


def random_scene(rng: random.Random, shape: str | None = None, colour: str | None = None,
                 background: str | None = None) -> Scene:
    return Scene(
        shape=shape or rng.choice(SHAPES), colour=colour or rng.choice(list(COLOURS)),
        background=background or rng.choice(list(BACKGROUNDS)),
        cx=rng.uniform(0.36, 0.64), cy=rng.uniform(0.36, 0.64), radius=rng.uniform(0.2, 0.3),
        angle=rng.uniform(-20, 20), tint=tuple(rng.randint(-12, 12) for _ in range(3)), shade=rng.randint(-10, 10))


def training_scene(rng: random.Random) -> Scene:
    """A scene of the pretraining distribution: any shape/colour pair except the held-out ones."""
    while True:
        scene = random_scene(rng)
        if scene.concept not in HELD_OUT:
            return scene


def _clip(rgb) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, v))) for v in rgb)


def _polygon(cx: float, cy: float, points: list[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def render(scene: Scene) -> Image.Image:
    side = SIZE * SUPERSAMPLE
    background = _clip(np.add(BACKGROUNDS[scene.background], scene.shade))
    fill = _clip(np.add(COLOURS[scene.colour], scene.tint))
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    cx, cy, r = scene.cx * side, scene.cy * side, scene.radius * side
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        inner = r * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=background)
    else:
        if scene.shape == "square":
            s = r * 0.82
            points = [(-s, -s), (s, -s), (s, s), (-s, s)]
        elif scene.shape == "triangle":
            points = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
        elif scene.shape == "star":
            points = [((r if k % 2 == 0 else r * 0.42) * math.cos(math.radians(-90 + 36 * k)),
                       (r if k % 2 == 0 else r * 0.42) * math.sin(math.radians(-90 + 36 * k))) for k in range(10)]
        elif scene.shape == "cross":
            w = r * 0.34
            points = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
                      (-r, -w), (-w, -w)]
        else:
            raise ValueError(f"unknown shape {scene.shape!r}")
        draw.polygon(_polygon(cx, cy, points, scene.angle), fill=fill)
    return image.resize((SIZE, SIZE), Image.BOX)


def to_array(images: list[Image.Image]) -> np.ndarray:
    """[N, 3, H, W] float32 in [-1, 1]."""
    return np.stack([np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0 for im in images])
