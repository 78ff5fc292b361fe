"""Pillow rendering of a ShapesWorld scene: flat shapes on a dark background, pixel-deterministic."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

from rcpp_hf.shapesworld.world import BACKGROUND, COLOURS, Scene, WorldConfig

Point = tuple[float, float]
IMAGE_FOLDER = "images"  # where written test sets keep their images


def _regular(x: float, y: float, r: float, n: int, phase: float = -math.pi / 2) -> list[Point]:
    return [(x + r * math.cos(phase + 2 * math.pi * i / n), y + r * math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]


def _star(x: float, y: float, r: float) -> list[Point]:
    outer, inner = _regular(x, y, r, 5), _regular(x, y, 0.42 * r, 5, phase=-math.pi / 2 + math.pi / 5)
    return [p for pair in zip(outer, inner) for p in pair]


def _heart(x: float, y: float, r: float) -> list[Point]:
    # The classic parametric heart (x in [-16, 16], y in [-17, 12]), centred and scaled into radius r.
    scale = 1.8 * r / 32
    points = []
    for i in range(48):
        t = 2 * math.pi * i / 48
        hx = 16 * math.sin(t) ** 3
        hy = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((x + hx * scale, y - (hy + 2.5) * scale))
    return points


def _cross(x: float, y: float, r: float) -> list[Point]:
    a, w = 0.9 * r, 0.32 * r
    return [(x - w, y - a), (x + w, y - a), (x + w, y - w), (x + a, y - w), (x + a, y + w), (x + w, y + w),
            (x + w, y + a), (x - w, y + a), (x - w, y + w), (x - a, y + w), (x - a, y - w), (x - w, y - w)]  # fmt: skip


def _arrow(x: float, y: float, r: float) -> list[Point]:
    # Pointing right: a shaft and a triangular head.
    w, head = 0.28 * r, 0.1 * r
    return [(x - r, y - w), (x + head, y - w), (x + head, y - 0.8 * r), (x + r, y),
            (x + head, y + 0.8 * r), (x + head, y + w), (x - r, y + w)]  # fmt: skip


def _bolt(x: float, y: float, r: float) -> list[Point]:
    return [(x + 0.25 * r, y - r), (x - 0.55 * r, y + 0.15 * r), (x - 0.05 * r, y + 0.15 * r),
            (x - 0.3 * r, y + r), (x + 0.55 * r, y - 0.2 * r), (x + 0.05 * r, y - 0.2 * r)]  # fmt: skip


def _draw_circle(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, fill, background) -> None:
    draw.ellipse([x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r], fill=fill)


def _draw_ring(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, fill, background) -> None:
    draw.ellipse([x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r], outline=fill, width=max(2, round(0.3 * r)))


def _draw_moon(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, fill, background) -> None:
    # A crescent: a disc with an offset disc of background cut out (all inside the object's cell).
    draw.ellipse([x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r], fill=fill)
    draw.ellipse([x - 0.4 * r, y - 0.95 * r, x + 1.0 * r, y + 0.75 * r], fill=background)


def _polygon(shape: Callable[[float, float, float], list[Point]]):
    def draw_shape(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, fill, background) -> None:
        draw.polygon(shape(x, y, r), fill=fill)

    return draw_shape


DRAWERS = {
    "circle": _draw_circle,
    "square": _polygon(lambda x, y, r: [(x - 0.75 * r, y - 0.75 * r), (x + 0.75 * r, y - 0.75 * r),
                                        (x + 0.75 * r, y + 0.75 * r), (x - 0.75 * r, y + 0.75 * r)]),  # fmt: skip
    "triangle": _polygon(lambda x, y, r: _regular(x, y + 0.2 * r, r, 3)),
    "star": _polygon(_star),
    "heart": _polygon(_heart),
    "cross": _polygon(_cross),
    "diamond": _polygon(lambda x, y, r: [(x, y - r), (x + 0.65 * r, y), (x, y + r), (x - 0.65 * r, y)]),
    "ring": _draw_ring,
    "moon": _draw_moon,
    "arrow": _polygon(_arrow),
    "hexagon": _polygon(lambda x, y, r: _regular(x, y, 0.9 * r, 6, phase=0.0)),
    "bolt": _polygon(_bolt),
}


def render_scene(scene: Scene, config: WorldConfig = WorldConfig()) -> Image.Image:
    """The scene as an RGB image of `config.image_size` pixels square."""
    image = Image.new("RGB", (config.image_size, config.image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        DRAWERS[obj.kind](draw, obj.x, obj.y, config.radius(obj.size), COLOURS[obj.colour], BACKGROUND)
    return image


def render_object_map(scene: Scene, config: WorldConfig = WorldConfig()) -> Image.Image:
    """Which object each pixel shows: a grey-level image, 0 for background and i + 1 for `scene.objects[i]`.

    Drawn with the same shapes as `render_scene`, so it is the pixel-exact segmentation of that image.
    """
    image = Image.new("L", (config.image_size, config.image_size), 0)
    draw = ImageDraw.Draw(image)
    for i, obj in enumerate(scene.objects):
        DRAWERS[obj.kind](draw, obj.x, obj.y, config.radius(obj.size), i + 1, 0)
    return image


def write_images(scenes: list[Scene], folder: str | Path, config: WorldConfig = WorldConfig()) -> Path:
    """Render each scene to `folder/<scene.image_file>`, skipping files already there; returns `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        path = folder / scene.image_file
        if not path.exists():
            render_scene(scene, config).save(path)
    return folder
