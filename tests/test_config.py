"""RCPPGenerationConfig: validation, serialisation, YAML presets."""

from pathlib import Path

import pytest
import yaml

from rcpp_hf import RCPPGenerationConfig
from rcpp_hf.config import RCPP_DEFAULTS
from rcpp_hf.methods import load_method

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize(
    "field, value",
    [
        ("gamma", 1.0), ("gamma", -0.1), ("tau", float("nan")), ("lambda_start", -1.0), ("lambda_end", float("inf")),
        ("keep_ratio_start", 0.0), ("keep_ratio_end", 1.5), ("keep_ratio_end", -0.2), ("schedule", "exponential"),
        ("schedule_steps", 0), ("scoring_layers", ()), ("scoring_layers", (1, 1)), ("plausibility_beta", 0.0),
        ("plausibility_beta", 2.0), ("rcpp", "yes"), ("tau_mode", "relative"), ("first_token_action", 1),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"RCPPGenerationConfig.{field}"):
        RCPPGenerationConfig(**{field: value})


@pytest.mark.parametrize("tau", [-0.1, 1.5])
def test_quantile_tau_must_be_a_fraction(tau):
    with pytest.raises(ValueError, match="RCPPGenerationConfig.tau = .*quantile"):
        RCPPGenerationConfig(tau_mode="quantile", tau=tau)
    assert RCPPGenerationConfig(tau_mode="std", tau=tau).tau == tau  # std's tau is any finite number


def test_keep_ratio_cannot_grow():
    with pytest.raises(ValueError, match="keep_ratio_end"):
        RCPPGenerationConfig(keep_ratio_start=0.5, keep_ratio_end=0.8)


def test_updates_are_validated_too():
    config = RCPPGenerationConfig()
    with pytest.raises(ValueError, match="gamma"):
        config.update(gamma=1.0)


def test_save_pretrained_round_trip(tmp_path):
    config = RCPPGenerationConfig(gamma=0.8, tau=0.1, schedule="cosine", scoring_layers=(-2, -1), max_new_tokens=7,
                                  plausibility_beta=0.1, tau_mode="quantile", first_token_action=True)
    config.save_pretrained(tmp_path)
    loaded = RCPPGenerationConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RCPPGenerationConfig)
    for name in RCPP_DEFAULTS:
        assert getattr(loaded, name) == getattr(config, name), name
    assert loaded.max_new_tokens == 7


def test_yaml_round_trip(tmp_path):
    config = RCPPGenerationConfig(gamma=0.7, keep_ratio_end=0.3, max_new_tokens=9, do_sample=True, temperature=0.5,
                                  tau=1.5, tau_mode="std", first_token_action=True)
    config.to_yaml(tmp_path / "preset.yaml")
    loaded = RCPPGenerationConfig.from_yaml(tmp_path / "preset.yaml")
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize("preset", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_presets_load(preset):
    """configs/ holds decoding presets and method presets (a "method" key, loaded by `load_method`)."""
    if "method" in yaml.safe_load(preset.read_text()):
        assert load_method(preset).to_dict() == yaml.safe_load(preset.read_text())
        return
    config = RCPPGenerationConfig.from_yaml(preset)
    assert config.max_new_tokens is not None


def test_neutral_preset_is_neutral():
    config = RCPPGenerationConfig.from_yaml(CONFIGS / "neutral.yaml")
    assert (config.lambda_start, config.lambda_end, config.keep_ratio_start, config.keep_ratio_end, config.tau) == (
        0.0, 0.0, 1.0, 1.0, -1.0)


def test_yaml_overrides_and_errors(tmp_path):
    config = RCPPGenerationConfig.from_yaml(CONFIGS / "rcpp_default.yaml", max_new_tokens=3)
    assert config.max_new_tokens == 3
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        RCPPGenerationConfig.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        RCPPGenerationConfig.from_yaml(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("gamma: 1.5\n")
    with pytest.raises(ValueError, match="gamma"):
        RCPPGenerationConfig.from_yaml(tmp_path / "bad.yaml")
