"""Comparing decoding settings: the sweep's presets, the table files, and the choice rule."""

import json
from dataclasses import replace

import pytest

from rcpp_hf.config import RCPPGenerationConfig
from rcpp_hf.shapesworld.compare import VANILLA, choose, compare, sweep_configs
from rcpp_hf.shapesworld.model import SHAPESWORLD_SPEC, build_shapesworld_llava

SMALL = replace(SHAPESWORLD_SPEC, image_size=32, patch_size=8, vision_hidden=32, vision_layers=1,
                text_hidden=32, text_layers=4, num_heads=4, num_kv_heads=2)  # fmt: skip


def test_sweep_presets_are_valid_and_vary_one_knob(tmp_path):
    configs = sweep_configs(tmp_path)
    assert configs[0] == VANILLA
    loaded = {path: RCPPGenerationConfig.from_yaml(path) for path in configs[1:]}
    default = loaded[str(tmp_path / "default.yaml")]
    for path, config in loaded.items():
        differing = [k for k in ("gamma", "tau", "lambda_end", "keep_ratio_end") if getattr(config, k) != getattr(default, k)]
        assert len(differing) == (0 if path.endswith("default.yaml") else 1)


def row(name, chair_i, recall):
    return {"setting": name, "captions.chair_i": chair_i, "captions.recall": recall}


def test_choose_takes_the_lowest_chair_i_that_keeps_recall():
    rows = [row(VANILLA, 0.30, 0.90), row("a", 0.10, 0.87), row("b", 0.20, 0.885), row("d", 0.25, 0.91)]  # a: recall lost
    assert choose(rows)["setting"] == "b"
    assert choose([row(VANILLA, 0.3, 0.9), row("e", 0.3, 0.9)])["setting"] == VANILLA  # a tie keeps vanilla


def test_compare_writes_the_table(tmp_path):
    folder = tmp_path / "model"
    model, processor = build_shapesworld_llava(SMALL)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    configs = [VANILLA, sweep_configs(tmp_path / "configs", max_new_tokens=6)[1]]
    rows = compare(str(folder), configs, ["adversarial", "captions"], seed=1, num_images=1, output_dir=tmp_path / "runs",
                   progress=False)  # fmt: skip
    assert [r["setting"] for r in rows] == [VANILLA, "default"]
    assert "visual_kept" not in json.dumps(rows[0]) and "captions.visual_kept" in rows[1]
    table = (tmp_path / "runs" / "table.md").read_text().splitlines()
    assert len(table) == 4 and table[0].startswith("| setting | adv acc")
    assert (tmp_path / "runs" / "table.png").stat().st_size > 0
