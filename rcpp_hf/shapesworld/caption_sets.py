"""Caption test sets: scenes where the language prior misleads, and their ground truth on disk.

Every scene of a caption set holds at least one "lone" kind, a kind whose co-occurrence partner is
absent (a star without a moon): the scenes where a model that leans on the prior names an object
that is not there. The set is written as JSON lines, one scene per line
({"id", "image", "kinds", "scene"}), beside the rendered images.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

from rcpp_hf.shapesworld.render import IMAGE_FOLDER, write_images
from rcpp_hf.shapesworld.world import Scene, WorldConfig, iter_scenes


def caption_scenes(seed: int, num_images: int, config: WorldConfig = WorldConfig()) -> list[Scene]:
    """The first `num_images` scenes of world `seed` holding a kind whose partner is absent."""
    return list(islice((s for s in iter_scenes(seed, config) if s.lone_kinds()), num_images))


def caption_rows(scenes: list[Scene]) -> list[dict]:
    return [{"id": s.name, "image": s.image_file, "kinds": sorted(s.kinds), "scene": s.to_dict()} for s in scenes]


def write_caption_split(scenes: list[Scene], output_dir: str | Path, config: WorldConfig = WorldConfig()) -> Path:
    """Write `shapesworld_captions.jsonl` and the images under `output_dir/images`; returns the file."""
    output_dir = Path(output_dir)
    write_images(scenes, output_dir / IMAGE_FOLDER, config)
    path = output_dir / "shapesworld_captions.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for row in caption_rows(scenes):
            handle.write(json.dumps(row) + "\n")
    return path
