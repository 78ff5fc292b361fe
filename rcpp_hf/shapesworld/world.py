"""ShapesWorld scenes: what is in an image, sampled deterministically from (seed, index).

A scene holds 1 to 6 objects on a 3 x 3 grid, one object per cell, so objects never overlap. An
object has a kind, a colour and a size. The world has language priors on purpose, like COCO:

- kinds are not equally frequent (`KIND_WEIGHTS`), so a "popular" absent kind exists;
- the kinds of each pair in `CO_OCCURRING_PAIRS` appear together: when a scene holds one of them,
  the other is added with probability `WorldConfig.pair_strength` (0.75 by default, which gives
  P(partner | kind) of about 0.87 once the partner's own draws are counted, see
  `co_occurrence_rate`);
- captions mention kinds in a fixed salience order (`MENTION_ORDER`, partners next to each other)
  most of the time (see `captions.py`).

A model trained on these scenes learns that "star" is followed by "moon", and is tempted to say
"moon" when a star stands alone: the hallucination that the testbed measures.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

# (singular, plural): the grammar's whole object vocabulary.
KINDS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "heart": "hearts",
    "cross": "crosses",
    "diamond": "diamonds",
    "ring": "rings",
    "moon": "moons",
    "arrow": "arrows",
    "hexagon": "hexagons",
    "bolt": "bolts",
}

# Relative frequency of a kind when an object is drawn (before partners are added).
KIND_WEIGHTS: dict[str, float] = {
    "circle": 12,
    "star": 7,
    "moon": 7,
    "square": 6,
    "triangle": 6,
    "cross": 6,
    "heart": 5,
    "arrow": 5,
    "diamond": 5,
    "ring": 4,
    "hexagon": 3,
    "bolt": 2,
}

# Kinds that appear together in most scenes holding either of them (symmetric pairs).
CO_OCCURRING_PAIRS: tuple[tuple[str, str], ...] = (("star", "moon"), ("heart", "arrow"), ("square", "triangle"))

PARTNER: dict[str, str] = {a: b for a, b in CO_OCCURRING_PAIRS} | {b: a for a, b in CO_OCCURRING_PAIRS}

# The order in which captions usually mention kinds (like "person" first in COCO captions).
MENTION_ORDER: tuple[str, ...] = (
    "star", "moon", "heart", "arrow", "square", "triangle",
    "circle", "cross", "diamond", "ring", "hexagon", "bolt",
)  # fmt: skip

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (45, 175, 70),
    "blue": (60, 100, 235),
    "yellow": (240, 210, 40),
    "purple": (160, 70, 210),
    "white": (240, 240, 240),
}

SIZES: tuple[str, ...] = ("small", "normal")  # "normal" is left unsaid in captions

BACKGROUND: tuple[int, int, int] = (30, 32, 40)

# World seeds of the standard splits: training scenes, validation (choosing settings), test (reporting).
TRAIN_SEED, VALIDATION_SEED, TEST_SEED = 0, 1, 2
# The world every ShapesWorld evaluation command (eval shapesworld, export, compare and the studies run on it) draws
# its scenes from unless --seed says otherwise: the test world, which the README's results report on. The sweep,
# which chooses settings, defaults to the validation world instead, so that a choice is never made on the test world.
DEFAULT_WORLD_SEED = TEST_SEED


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn. The defaults define the world the shipped model was trained on."""

    image_size: int = 160
    grid: int = 3
    max_objects: int = 6
    pair_strength: float = 0.75  # P(partner added | a pair kind was drawn without it)
    duplicate_prob: float = 0.15  # P(a new object copies an earlier one's kind, colour and size)

    def __post_init__(self):
        if self.grid < 2:
            raise ValueError(f"grid must be >= 2, got {self.grid}")
        if not 1 <= self.max_objects <= self.grid**2:
            raise ValueError(f"max_objects must be in [1, grid**2 = {self.grid**2}], got {self.max_objects}")
        if self.image_size < 8 * self.grid:
            raise ValueError(f"image_size must be >= 8 * grid, got {self.image_size}")
        for name in ("pair_strength", "duplicate_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")

    @property
    def cell_size(self) -> float:
        return self.image_size / self.grid

    def radius(self, size: str) -> float:
        """Circumradius in pixels of an object of `size` ("small" or "normal")."""
        return self.cell_size * (0.3 if size == "small" else 0.45)


@dataclass(frozen=True)
class ShapeObject:
    kind: str
    colour: str
    size: str
    row: int
    col: int
    x: float  # centre, pixels
    y: float

    @property
    def attributes(self) -> tuple[str, str, str]:
        return (self.kind, self.colour, self.size)


@dataclass(frozen=True)
class Scene:
    """One image's ground truth. `seed` and `index` identify it: `sample_scene(seed, index)` rebuilds it."""

    seed: int
    index: int
    objects: tuple[ShapeObject, ...]

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(o.kind for o in self.objects)

    @property
    def name(self) -> str:
        return f"shapesworld_s{self.seed}_{self.index:06d}"

    @property
    def image_file(self) -> str:
        """File name of the scene's rendered image."""
        return f"{self.name}.png"

    def rng(self, purpose: str) -> random.Random:
        """A random stream owned by this scene, one per purpose (caption wording, questions...)."""
        return random.Random(f"shapesworld:{self.seed}:{self.index}:{purpose}")

    def lone_kinds(self) -> frozenset[str]:
        """Kinds present whose co-occurrence partner is absent: where the prior misleads."""
        return frozenset(k for k in self.kinds if k in PARTNER and PARTNER[k] not in self.kinds)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "index": self.index, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        return cls(data["seed"], data["index"], tuple(ShapeObject(**o) for o in data["objects"]))


def sample_scene(seed: int, index: int, config: WorldConfig = WorldConfig()) -> Scene:
    """The `index`-th scene of the world drawn with `seed` (independent of any other index)."""
    rng = random.Random(f"shapesworld:{seed}:{index}:scene")
    target = rng.randint(1, config.max_objects)
    kinds_by_weight = list(KIND_WEIGHTS)
    weights = [KIND_WEIGHTS[k] for k in kinds_by_weight]

    drawn: list[tuple[str, str, str]] = []
    while len(drawn) < target:
        if drawn and rng.random() < config.duplicate_prob:
            drawn.append(rng.choice(drawn))
            continue
        kind = rng.choices(kinds_by_weight, weights)[0]
        drawn.append((kind, rng.choice(list(COLOURS)), rng.choice(SIZES)))
        partner = PARTNER.get(kind)
        present = {k for k, _, _ in drawn}
        # A partner may push the scene one past its drawn size: pairs hold in 1-object scenes too.
        if partner and partner not in present and len(drawn) < config.max_objects and rng.random() < config.pair_strength:
            drawn.append((partner, rng.choice(list(COLOURS)), rng.choice(SIZES)))

    cells = rng.sample([(r, c) for r in range(config.grid) for c in range(config.grid)], len(drawn))
    objects = []
    for (kind, colour, size), (row, col) in zip(drawn, cells):
        # Jitter inside the cell, keeping the whole shape inside it: no occlusion by construction.
        slack = config.cell_size / 2 - config.radius(size) - 1
        x = (col + 0.5) * config.cell_size + rng.uniform(-slack, slack)
        y = (row + 0.5) * config.cell_size + rng.uniform(-slack, slack)
        objects.append(ShapeObject(kind, colour, size, row, col, round(x, 2), round(y, 2)))
    objects.sort(key=lambda o: (o.row, o.col))  # reading order
    return Scene(seed, index, tuple(objects))


def iter_scenes(seed: int, config: WorldConfig = WorldConfig(), start: int = 0) -> Iterator[Scene]:
    """Scenes `start`, `start + 1`, ... of the world drawn with `seed`, without end."""
    index = start
    while True:
        yield sample_scene(seed, index, config)
        index += 1


def co_occurrence_rate(scenes: Iterable[Scene], kind: str) -> float:
    """P(partner of `kind` present | `kind` present) over `scenes`."""
    with_kind = [s for s in scenes if kind in s.kinds]
    if not with_kind:
        raise ValueError(f"no scene holds a {kind}")
    return sum(PARTNER[kind] in s.kinds for s in with_kind) / len(with_kind)
