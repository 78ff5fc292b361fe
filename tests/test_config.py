"""RCPPGenerationConfig: validation, serialisation, YAML presets."""


import pytest
import yaml

from rcpp_hf import RCPPGenerationConfig
from rcpp_hf.config import RCPP_DEFAULTS
from rcpp_hf.methods import METHODS, FastV, load_method, method_from_dict
from rcpp_hf.presets import GENERATION, preset_names, shipped
from rcpp_hf.presets import METHODS as METHOD_PRESETS


@pytest.mark.parametrize(
    "field, value",
    [
        ("gamma", 1.0), ("gamma", -0.1), ("tau", float("nan")), ("lambda_start", -1.0), ("lambda_end", float("inf")),
        ("keep_ratio_start", 0.0), ("keep_ratio_end", 1.5), ("keep_ratio_end", -0.2), ("schedule", "exponential"),
        ("schedule_steps", 0), ("scoring_layers", ()), ("scoring_layers", (1, 1)), ("plausibility_beta", 0.0),
        ("plausibility_beta", 2.0), ("rcpp", "yes"), ("tau_mode", "relative"), ("first_token_action", 1),
        ("evidence_gating", "no"),
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


SHIPPED = [(kind, name) for kind in (GENERATION, METHOD_PRESETS) for name in preset_names(kind)]


@pytest.mark.parametrize("kind, name", SHIPPED, ids=[f"{kind}/{name}" for kind, name in SHIPPED])
def test_every_shipped_preset_loads_by_name_and_is_refused_by_the_other_loader(kind, name):
    values = yaml.safe_load((shipped(kind) / f"{name}.yaml").read_text())
    if kind == METHOD_PRESETS:
        assert load_method(name).to_dict() == values or name in METHODS  # a registered name is its defaults
        with pytest.raises(ValueError, match=f"'{name}' is a method preset, not a generation \\(RCPP\\) preset: load it with"):
            RCPPGenerationConfig.from_yaml(name)
        if name in METHODS:  # a preset named like its method holds the method's defaults: one meaning per name
            assert method_from_dict(values) == METHODS[name]()
        return
    assert RCPPGenerationConfig.from_yaml(name).max_new_tokens is not None
    with pytest.raises(ValueError, match=f"'{name}' is a generation \\(RCPP\\) preset, not a method preset"):
        load_method(name)


def test_presets_are_found_from_any_folder_and_by_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert RCPPGenerationConfig.from_yaml("rcpp_evict").keep_ratio_end < 1.0
    assert load_method("fastv_64of576") == FastV(budget=64 / 576)
    (tmp_path / "mine.yaml").write_text("method: fastv\nkeep: 3\n")
    assert load_method("mine.yaml") == FastV(keep=3)
    with pytest.raises(ValueError, match="no generation \\(RCPP\\) preset named 'rcpp_evcit'; shipped: .*rcpp_evict"):
        RCPPGenerationConfig.from_yaml("rcpp_evcit")
    with pytest.raises(ValueError, match="unknown method 'fastv_65'; known methods: .*; shipped method presets: .*fastv_64of576"):
        load_method("fastv_65")
    with pytest.raises(ValueError, match="has no 'method' key"):
        (tmp_path / "plain.yaml").write_text("tau: 0.1\n")
        load_method("plain.yaml")


def test_values_are_range_checked_as_the_fields_are(tmp_path):
    (tmp_path / "tau.yaml").write_text("tau: 2.0\n")
    with pytest.raises(ValueError, match=r"RCPPGenerationConfig.tau = 2.0: with tau_mode 'absolute' .* \[-1, 1\]"):
        RCPPGenerationConfig.from_yaml(tmp_path / "tau.yaml")
    assert RCPPGenerationConfig(tau=2.0, tau_mode="std").tau == 2.0  # std: any finite number of deviations


def test_a_typo_in_a_preset_is_refused_naming_the_closest_field(tmp_path):
    (tmp_path / "typo.yaml").write_text("tua: 0.3\n")
    with pytest.raises(ValueError, match="'tua' is not a field of RCPPGenerationConfig; did you mean 'tau'"):
        RCPPGenerationConfig.from_yaml(tmp_path / "typo.yaml")
    (tmp_path / "method_typo.yaml").write_text("method: fastv\nbugdet: 64\n")
    with pytest.raises(ValueError, match=r"has no setting\(s\) \['bugdet'\] \(did you mean 'budget'\?\)"):
        load_method(tmp_path / "method_typo.yaml")


def test_neutral_preset_is_neutral():
    config = RCPPGenerationConfig.from_yaml("rcpp_neutral")
    assert (config.lambda_start, config.lambda_end, config.keep_ratio_start, config.keep_ratio_end, config.tau) == (
        0.0, 0.0, 1.0, 1.0, -1.0)


def test_yaml_overrides_and_errors(tmp_path):
    config = RCPPGenerationConfig.from_yaml("rcpp_default", max_new_tokens=3)
    assert config.max_new_tokens == 3
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        RCPPGenerationConfig.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        RCPPGenerationConfig.from_yaml(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("gamma: 1.5\n")
    with pytest.raises(ValueError, match="gamma"):
        RCPPGenerationConfig.from_yaml(tmp_path / "bad.yaml")
