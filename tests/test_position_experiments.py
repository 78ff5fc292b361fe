"""The PDrop positions and FastV variants experiments (`experiments/pdrop_positions.py`, `experiments/fastv_variants.py`)
end to end on a small random ShapesWorld model, and the re-pruning reference against the library's FastV."""

import json

import torch
from transformers import AutoProcessor

from experiments import fastv_variants, pdrop_positions
from rcpp_hf.cli.caption_study import token_differences, until_end
from rcpp_hf.methods import FastV
from rcpp_hf.modeling import RCPPLlavaForConditionalGeneration
from rcpp_hf.shapesworld.caption_sets import caption_scenes
from rcpp_hf.shapesworld.conversations import CAPTION_PROMPT, chat_prompt
from rcpp_hf.shapesworld.render import render_scene
from tests.test_shapesworld_evaluate import small_model  # noqa: F401 (fixture)


def test_token_differences_and_captions_cut_at_their_end():
    assert token_differences([1, 2, 3], [1, 2, 3]) == (0, None)
    assert token_differences([1, 2, 3], [1, 5, 3]) == (1, 1)
    assert token_differences([1, 2], [1, 2, 3, 4]) == (2, 2)
    assert until_end([5, 2, 7, 2], 2) == [5, 2] and until_end([5, 7], [2, 3]) == [5, 7] and until_end([5], None) == [5]


def test_re_pruning_reference_is_the_cache_variant_when_nothing_is_pruned_and_shares_its_prompt_forward(
    small_model,  # noqa: F811
):
    model = RCPPLlavaForConditionalGeneration.from_pretrained(small_model).eval()
    processor = AutoProcessor.from_pretrained(small_model)
    scene = caption_scenes(2, 1)[0]
    inputs = processor(images=render_scene(scene), text=chat_prompt(processor, CAPTION_PROMPT), return_tensors="pt")
    every = FastV(keep=model.config.image_seq_length)
    with torch.inference_mode():
        cached, _ = fastv_variants.kv_cache_caption(model, inputs, every, 5)
        repruned, kept = fastv_variants.re_pruning_caption(model, inputs, every, 5)
        plain = model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert cached == repruned == plain.tolist()[: len(cached)] and kept == [None] * len(repruned)
        acting = FastV(keep=4)
        cached, prompt_kept = fastv_variants.kv_cache_caption(model, inputs, acting, 5)
        repruned, kept = fastv_variants.re_pruning_caption(model, inputs, acting, 5)
    assert cached[0] == repruned[0] and kept[0] == prompt_kept and len(prompt_kept) == 4


def test_pdrop_positions_runs_end_to_end(small_model, tmp_path, capsys):  # noqa: F811
    args = ["--model", small_model, "--num-scenes", "2", "--max-new-tokens", "4", "--output-dir", str(tmp_path)]
    assert pdrop_positions.main(args) == 0
    rows = json.loads((tmp_path / "pdrop_positions.json").read_text())
    assert rows[0]["setting"] == "ratios 0.5/0.25/0.125"
    first = rows[0]
    assert [s["layer"] for s in first["stages"]] == [1, 2, 3] and first["stages"][0]["kept_differing"] == 0
    assert first["scenes"] == 2 and first["generated_tokens"] == 8
    assert "| ratios 0.5/0.25/0.125 |" in capsys.readouterr().out


def test_fastv_variants_runs_end_to_end(small_model, tmp_path, capsys):  # noqa: F811
    args = ["--model", small_model, "--num-scenes", "2", "--max-new-tokens", "4", "--output-dir", str(tmp_path)]
    assert fastv_variants.main(args) == 0
    rows = json.loads((tmp_path / "fastv_variants.json").read_text())
    paper = rows[0]
    assert paper["setting"] == "keep 0.5 (paper)" and paper["layer"] == 1 and paper["keep"] == 8
    assert paper["scenes"] == 2 and 0 <= paper["kept_moved_share"] <= 1
    assert all("skipped" in row or row["keep"] >= 1 for row in rows)
    assert "| keep 0.5 (paper) |" in capsys.readouterr().out
