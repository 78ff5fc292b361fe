"""The world: determinism from a seed, the documented priors, occlusion-free layouts, rendering, and the world seed
every command defaults to."""

import argparse

import pytest

from rcpp_hf.shapesworld.evaluate import EvalSettings
from rcpp_hf.shapesworld.render import render_scene
from rcpp_hf.shapesworld.world import (
    BACKGROUND,
    CO_OCCURRING_PAIRS,
    DEFAULT_WORLD_SEED,
    KIND_WEIGHTS,
    KINDS,
    MENTION_ORDER,
    PARTNER,
    TEST_SEED,
    VALIDATION_SEED,
    Scene,
    ShapeObject,
    WorldConfig,
    co_occurrence_rate,
    sample_scene,
)

CONFIG = WorldConfig()


@pytest.fixture(scope="module")
def scenes():
    return [sample_scene(0, i) for i in range(6000)]


def test_same_seed_and_index_give_the_same_scene_and_pixels():
    a, b = sample_scene(7, 42), sample_scene(7, 42)
    assert a == b
    assert render_scene(a).tobytes() == render_scene(b).tobytes()
    assert sample_scene(8, 42) != a and sample_scene(7, 43) != a


def test_scene_round_trips_through_its_dict():
    scene = sample_scene(3, 5)
    assert Scene.from_dict(scene.to_dict()) == scene


def test_vocabulary_is_consistent():
    assert len(KINDS) >= 10
    assert set(KIND_WEIGHTS) == set(KINDS) == set(MENTION_ORDER)
    for a, b in CO_OCCURRING_PAIRS:
        assert PARTNER[a] == b and PARTNER[b] == a


def test_scene_sizes_and_grid_cells(scenes):
    sizes = {len(s.objects) for s in scenes}
    assert sizes == set(range(1, CONFIG.max_objects + 1))
    for scene in scenes[:500]:
        cells = [(o.row, o.col) for o in scene.objects]
        assert len(set(cells)) == len(cells)  # one object per cell


def test_objects_stay_inside_their_cells(scenes):
    # Every object's bounding circle lies inside its own grid cell: no two objects can overlap.
    cell = CONFIG.cell_size
    for scene in scenes[:500]:
        for o in scene.objects:
            r = CONFIG.radius(o.size)
            assert o.col * cell <= o.x - r and o.x + r <= (o.col + 1) * cell
            assert o.row * cell <= o.y - r and o.y + r <= (o.row + 1) * cell


def test_rendered_pixels_stay_inside_the_cells_of_objects():
    # Drawn pixels (not background) only occur in cells that hold an object.
    for index in range(40):
        scene = sample_scene(1, index)
        image = render_scene(scene)
        occupied = {(o.row, o.col) for o in scene.objects}
        pixels = image.load()
        for y in range(0, CONFIG.image_size, 2):
            for x in range(0, CONFIG.image_size, 2):
                if pixels[x, y] != BACKGROUND:
                    assert (int(y // CONFIG.cell_size), int(x // CONFIG.cell_size)) in occupied


@pytest.mark.parametrize("kind", [k for pair in CO_OCCURRING_PAIRS for k in pair])
def test_documented_pairs_co_occur_85_to_90_percent(scenes, kind):
    assert 0.85 <= co_occurrence_rate(scenes, kind) <= 0.90


def test_unpaired_kinds_do_not_co_occur_strongly(scenes):
    for kind in set(KINDS) - set(PARTNER):
        for other in KINDS:
            with_kind = [s for s in scenes if kind in s.kinds]
            if other != kind:
                assert sum(other in s.kinds for s in with_kind) / len(with_kind) < 0.6


def test_kind_frequencies_are_skewed(scenes):
    from collections import Counter

    counts = Counter(k for s in scenes for k in s.kinds)
    assert counts.most_common()[0][1] > 3 * counts.most_common()[-1][1]


def test_every_kind_renders_distinct_pixels():
    images = set()
    for kind in KINDS:
        scene = Scene(0, 0, (ShapeObject(kind, "white", "normal", 1, 1, 80.0, 80.0),))
        images.add(render_scene(scene).tobytes())
    assert len(images) == len(KINDS)


@pytest.mark.parametrize(
    "field, value",
    [("grid", 1), ("max_objects", 0), ("max_objects", 10), ("pair_strength", 1.5), ("duplicate_prob", -0.1)],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        WorldConfig(**{field: value})


def shapesworld_seed_flags() -> dict[str, argparse.Action]:
    """The `--seed` flag of every command that draws held-out ShapesWorld scenes: `rcpp-hf shapesworld <command>`,
    `rcpp-hf eval shapesworld` and the studies in `experiments/`. The training commands (train, train-smol) are left
    out: their `--seed` seeds the initial weights, and their world is `--world-seed`, the training world."""
    from experiments import condensation, defaults_sweep, head_ablation
    from rcpp_hf.cli import build_parser

    def subcommands(parser):
        (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return action.choices

    root = subcommands(build_parser())
    commands = {f"shapesworld {name}": parser for name, parser in subcommands(root["shapesworld"]).items()}
    commands["eval shapesworld"] = subcommands(root["eval"])["shapesworld"]
    for study in (condensation, defaults_sweep, head_ablation):
        commands[f"experiments/{study.__name__.split('.')[-1]}.py"] = study.build_parser()
    flags = {}
    for name, parser in commands.items():
        options = {option: action for action in parser._actions for option in action.option_strings}
        if "--seed" in options and "--world-seed" not in options:
            flags[name] = options["--seed"]
    return flags


def test_every_shapesworld_command_defaults_to_one_world():
    flags = shapesworld_seed_flags()
    evaluating = {"eval shapesworld", "shapesworld export", "shapesworld compare", "experiments/head_ablation.py",
                  "experiments/condensation.py"}  # fmt: skip
    sweep = "experiments/defaults_sweep.py"
    assert set(flags) == evaluating | {sweep}
    assert DEFAULT_WORLD_SEED == TEST_SEED and EvalSettings(model="m", split="random").seed == DEFAULT_WORLD_SEED
    for name in evaluating:
        assert flags[name].default == DEFAULT_WORLD_SEED, name
        assert f"default: {DEFAULT_WORLD_SEED}, the test world" in flags[name].help, name
    # The sweep chooses settings, so by default it never sees the test world.
    assert flags[sweep].default == VALIDATION_SEED
    assert f"default: {VALIDATION_SEED}, the validation world" in flags[sweep].help
