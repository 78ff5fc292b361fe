"""`rcpp-hf generate` end to end on a local checkpoint and on the embedded default model."""

from rcpp_hf.cli import main
from rcpp_hf.run_config import build_generation_config
from tests.cli_helpers import user_error
from tests.conftest import make_images

CONFIG = "rcpp_evict"


def test_generate_compare_on_a_local_checkpoint(tiny_path, tmp_path, capsys):
    image = tmp_path / "scene.png"
    make_images(1)[0].save(image)
    assert main(["generate", "--model", str(tiny_path), "--image", str(image), "--prompt", "What is this?",
                 "--config", CONFIG, "--max-new-tokens", "40", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "== original LLaVA" in out and "== RCPP + DRCD" in out
    assert "visual tokens kept all" in out
    assert "visual tokens kept 4/16" in out  # keep ratio falls to 0.25 within 32 of the 40 steps
    assert "ms/token" in out and "KiB" in out


def test_generate_on_the_default_model(capsys):
    assert main(["generate", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "== RCPP + DRCD" in out and "shapesworld/checkpoint" in out


def test_missing_image_file_is_named(tmp_path, capsys):
    user_error(capsys, ["generate", "--image", str(tmp_path / "nope.png")],
               "^rcpp-hf generate: error: image file not found: .*nope.png")


def test_generate_and_eval_take_the_first_token_action_and_relative_tau_from_a_preset(tiny_path, tmp_path, capsys):
    preset = tmp_path / "first_token.yaml"
    preset.write_text("first_token_action: true\ntau_mode: quantile\ntau: 0.5\nlambda_end: 1.0\nkeep_ratio_end: 1.0\n")
    assert main(["generate", "--model", str(tiny_path), "--config", str(preset), "--max-new-tokens", "3"]) == 0
    assert "== RCPP + DRCD (first-token action)" in capsys.readouterr().out
    config = build_generation_config(preset, None, max_new_tokens=5)  # what `rcpp-hf eval --config` decodes with
    assert (config.first_token_action, config.tau_mode, config.tau) == (True, "quantile", 0.5)
