"""RCPP + DRCD as the registry method "rcpp": `RCPPGenerationConfig`'s fields map onto it, both front doors run the
same generate, and it composes with the other kinds as the flat fields do."""

import pytest
import torch

from rcpp_hf import RCPPGenerationConfig
from rcpp_hf.methods import METHODS, RCPP, FastV, load_method
from tests.conftest import active_config

ACTIVE = dict(tau=0.5, lambda_start=0.2, lambda_end=0.8, keep_ratio_end=0.25, schedule="linear", schedule_steps=4)


def test_rcpp_is_registered_with_the_config_defaults():
    assert METHODS["rcpp"] is RCPP and load_method("rcpp") == RCPP()
    assert RCPPGenerationConfig().rcpp_method() == RCPP()
    assert RCPPGenerationConfig(rcpp=False).active_methods() == ()


def test_an_rcpp_method_sets_the_fields():
    config = RCPPGenerationConfig(methods=[load_method("rcpp", **ACTIVE), FastV(keep=4)])
    assert config.rcpp is True and config.tau == 0.5 and config.schedule == "linear"
    assert config.methods == (FastV(keep=4),) and config.active_methods() == (FastV(keep=4), RCPP(**ACTIVE))
    # rcpp=False means "no RCPP from the fields"; a listed rcpp method still runs
    assert RCPPGenerationConfig(rcpp=False, methods=["rcpp"]).rcpp_method() == RCPP()


def test_rcpp_settings_given_twice_are_refused():
    with pytest.raises(ValueError, match=r"given more than once \(as fields \['tau'\]"):
        RCPPGenerationConfig(tau=0.1, methods=[RCPP(tau=0.2)])
    with pytest.raises(ValueError, match="given more than once"):
        RCPPGenerationConfig(methods=[RCPP(), {"method": "rcpp", "gamma": 0.5}])


def test_invalid_rcpp_settings_name_their_front_door():
    with pytest.raises(ValueError, match=r"^RCPP\.gamma = 1\.5: the EMA momentum"):
        RCPP(gamma=1.5)
    with pytest.raises(ValueError, match=r"^RCPPGenerationConfig\.gamma = 1\.5: the EMA momentum"):
        RCPPGenerationConfig(gamma=1.5)


@pytest.mark.parametrize("with_pruner", [False, True], ids=["alone", "with-fastv"])
def test_both_front_doors_run_the_same_generate(rcpp_model, batch2, with_pruner):
    pruner = [FastV(keep=6, layer=2)] if with_pruner else []
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    fields = rcpp_model.generate(**batch2, generation_config=active_config(methods=pruner, **kwargs))
    method = rcpp_model.generate(
        **batch2, generation_config=RCPPGenerationConfig(methods=[*pruner, load_method("rcpp", **ACTIVE)], **kwargs)
    )
    assert torch.equal(fields.sequences, method.sequences)
    assert any(step.contrast for step in method.rcpp.steps) and method.rcpp.steps[-1].evicted.numel() >= 0
    assert len(fields.rcpp.steps) == len(method.rcpp.steps)
    for ours, theirs in zip(fields.rcpp.steps, method.rcpp.steps):
        torch.testing.assert_close(ours.scores, theirs.scores, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(ours.evicted, theirs.evicted) and ours.lambda_t == theirs.lambda_t
    assert [r.layer for r in fields.pruning] == [r.layer for r in method.pruning] == ([2] if with_pruner else [])


def test_the_rcpp_method_round_trips_through_the_generation_config(tmp_path):
    config = RCPPGenerationConfig(methods=[RCPP(scoring_layers=(-2, -1), first_token_action=True)])
    config.save_pretrained(tmp_path)
    loaded = RCPPGenerationConfig.from_pretrained(tmp_path)
    assert loaded.rcpp_method() == RCPP(scoring_layers=(-2, -1), first_token_action=True) and loaded.methods == ()
    config.to_yaml(tmp_path / "preset.yaml")
    assert RCPPGenerationConfig.from_yaml(tmp_path / "preset.yaml").rcpp_method() == config.rcpp_method()
