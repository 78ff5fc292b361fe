"""Consumed-evidence gating (`evidence_gating`): each part by hand, then in `generate`: off is today's method,
protected tokens never join N, eviction takes them only when the budget forces it (and counts them), a left-padded
batch decodes as its rows alone, and the setting travels through YAML."""

import pytest
import torch

from rcpp_hf import RCPPGenerationConfig, RCPPLlavaForConditionalGeneration
from rcpp_hf.methods import RCPP, load_method
from rcpp_hf.methods import rcpp as rcpp_module
from rcpp_hf.rcpp.gating import (
    PROTECTED_OFFSET,
    accumulate_attention,
    count_protected,
    eviction_key,
    protected_tokens,
    update_once_consistent,
)
from rcpp_hf.rcpp.stages import select_evictions
from tests.conftest import active_config, row_alone

# -- each part by hand ----------------------------------------------------------------------------------------------


def test_cumulative_attention_sums_the_layer_mean_over_steps():
    first = torch.tensor([[[0.2, 0.0, 0.4], [0.0, 0.2, 0.2]]])  # (B=1, Ls=2, Vc=3): layer means 0.1 0.1 0.3
    second = torch.tensor([[[0.1, 0.3, 0.0], [0.3, 0.1, 0.0]]])  # layer means 0.2 0.2 0.0
    started = accumulate_attention(None, first)
    torch.testing.assert_close(started, torch.tensor([[0.1, 0.1, 0.3]]))
    torch.testing.assert_close(accumulate_attention(started, second), torch.tensor([[0.3, 0.3, 0.3]]))
    assert started.dtype == torch.float32 and accumulate_attention(None, first.half()).dtype == torch.float32


def test_once_consistent_stays_set_after_s_falls():
    flag = update_once_consistent(None, torch.tensor([[0.1, -0.2, 0.0]]), 0.0)  # inclusive, as grouping is
    assert flag.tolist() == [[True, False, True]]
    flag = update_once_consistent(flag, torch.tensor([[-0.5, 0.3, -0.1]]), 0.0)  # token 0 fell: still set
    assert flag.tolist() == [[True, True, True]]
    per_row = update_once_consistent(None, torch.tensor([[0.1, 0.2], [0.1, 0.2]]), torch.tensor([[0.15], [0.3]]))
    assert per_row.tolist() == [[False, True], [False, False]]  # a relative tau_mode's per-row threshold


def test_protected_set_uses_the_lower_median_of_the_cached_tokens():
    attention = torch.tensor([[0.4, 0.1, 0.3, 0.2], [0.5, 0.5, 0.1, 0.9]])  # row 0: median 0.2; row 1: 0.5 (ties)
    never = torch.zeros(2, 4, dtype=torch.bool)
    # row 0: above 0.2 are 0.4, 0.3 (two of four); row 1: only 0.9 is above, the tied 0.5s are not
    assert protected_tokens(attention, never).tolist() == [[False, True, False, True], [True, True, True, False]]
    once = torch.tensor([[False, True, False, False], [False, False, True, False]])
    assert protected_tokens(attention, once).tolist() == [[False, False, False, True], [True, True, False, False]]
    odd = torch.tensor([[0.3, 0.1, 0.2]])  # median 0.2: one of three above
    assert protected_tokens(odd, torch.zeros(1, 3, dtype=torch.bool)).tolist() == [[False, True, True]]
    assert protected_tokens(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool)).shape == (2, 0)


def test_eviction_takes_eligible_tokens_first_and_counts_the_forced_ones():
    scores = torch.tensor([[0.9, -0.8, 0.1, -0.3, 0.5], [-1.0, 1.0, 0.0, 0.2, -0.4]])
    protected = torch.tensor([[False, True, False, True, True], [True, True, False, False, True]])
    key = eviction_key(scores, protected)
    torch.testing.assert_close(key, scores + PROTECTED_OFFSET * protected.float())
    # Within each group by S; every protected key above every eligible one, even at S = 1 against S = -1.
    assert bool(key[~protected].max() < key[protected].min())
    expected_order = [[2, 0, 1, 3, 4], [2, 3, 0, 4, 1]]  # eligible by S, then protected by S
    for k in range(1, 6):
        columns = select_evictions(key, k)
        assert [set(row) for row in columns.tolist()] == [set(row[:k]) for row in expected_order], k
        forced = count_protected(protected, columns)
        assert forced.tolist() == [max(0, k - 2), max(0, k - 2)], k  # two eligible tokens per row


# -- in generate ----------------------------------------------------------------------------------------------------

# The tiny model's S sits near 0.5. tau 0.9: every S is below it, so without gating all of N is S's; one step to a
# quarter of the image: 12 of 16 evicted at step 1, more than the 8 above the median, so the budget forces 4 out.
FORCED = dict(tau=0.9, schedule="step", schedule_steps=1)
# tau 0.5 splits the scores: the once-at-threshold flag decides too; evictions spread over 4 steps.
SPLIT = dict(tau=0.5)


def traced(model, inputs, config):
    return model.generate(**inputs, generation_config=config, return_dict_in_generate=True)


def test_gating_off_is_the_default_method(rcpp_model, batch2):
    default = traced(rcpp_model, batch2, active_config(max_new_tokens=8))
    off = traced(rcpp_model, batch2, active_config(max_new_tokens=8, evidence_gating=False))
    assert torch.equal(default.sequences, off.sequences)
    assert default.rcpp.summary() == off.rcpp.summary() and "protected" not in off.rcpp.summary()[1]
    for ours, theirs in zip(default.rcpp.steps, off.rcpp.steps, strict=True):
        torch.testing.assert_close(ours.scores, theirs.scores, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(ours.evicted, theirs.evicted) and torch.equal(ours.num_noise, theirs.num_noise)
        assert ours.num_protected is theirs.num_protected is None and theirs.protected_evicted is None
    assert off.rcpp.protected_evictions() is None


def record_gating(monkeypatch):
    """Wraps RCPP's grouping and eviction: each gated grouping's (S, C, protected), each eviction's (key, columns)
    (read them before another generate)."""
    groupings, evictions = [], []
    group = rcpp_module.RCPPState.group

    def recording_group(self):
        group(self)
        if self.protected is not None:  # gating on
            groupings.append((self.scores.clone(), self.core.clone(), self.protected.clone()))

    def recording_select(key, num_evict):
        columns = select_evictions(key, num_evict)
        evictions.append((key.clone(), columns))
        return columns

    monkeypatch.setattr(rcpp_module.RCPPState, "group", recording_group)
    monkeypatch.setattr(rcpp_module, "select_evictions", recording_select)
    return groupings, evictions


@pytest.mark.parametrize("settings", [FORCED, SPLIT], ids=["forced", "split"])
def test_protected_tokens_stay_in_c_and_leave_only_when_forced(rcpp_model, batch2, monkeypatch, settings):
    groupings, evictions = record_gating(monkeypatch)
    out = traced(rcpp_model, batch2, active_config(max_new_tokens=8, evidence_gating=True, **settings))
    steps = out.rcpp.steps
    assert len(groupings) == len(steps) - 1  # one grouping per decoding step
    held = 0
    for step, (scores, core, protected) in zip(steps[1:], groupings, strict=True):
        assert not bool((protected & ~core).any()), f"step {step.step}: a protected token is in N"
        held += int((protected & (scores < settings["tau"])).sum())  # in C by the gate alone
        assert torch.equal(step.num_protected, protected.sum(dim=1))
        assert torch.equal(step.num_noise, (~core).sum(dim=1))
    assert held > 0, "the gate must have held some token in C that S would have put in N"
    forced = 0
    for key, columns in evictions:
        protected = key > 2.0  # eligible keys are S in [-1, 1], protected ones S + 4
        eligible = (~protected).sum(dim=1)
        count = count_protected(protected, columns)
        assert torch.equal(count, (columns.shape[1] - eligible).clamp_min(0)), "a protected token went unforced"
        forced += int(count.sum())
    assert out.rcpp.protected_evictions() == forced
    assert sum(int(step.protected_evicted.sum()) for step in steps) == forced
    assert all(row["protected_evicted"] == int(step.protected_evicted[0])
               for row, step in zip(out.rcpp.summary(), steps))  # fmt: skip
    if settings is FORCED:
        assert forced > 0 and int(steps[1].protected_evicted.sum()) == forced
        plain = traced(rcpp_model, batch2, active_config(max_new_tokens=8, **settings))
        assert int(plain.rcpp.steps[1].num_noise[0]) == 4 > int(steps[1].num_noise[0])  # every S below tau


def test_first_token_action_groups_step_zero_with_the_prefills_evidence(rcpp_model, batch2):
    out = traced(rcpp_model, batch2, active_config(max_new_tokens=3, evidence_gating=True, first_token_action=True,
                                                   **FORCED))  # fmt: skip
    first = out.rcpp.steps[0]
    # No S reaches 0.9, so only the prefill's attention above the median makes a token eligible: at most 8 of 16.
    assert (first.num_protected >= 8).all() and torch.equal(first.num_noise, 16 - first.num_protected)
    assert first.contrast


@pytest.fixture(scope="module")
def varied_model(varied_tiny_path):
    return RCPPLlavaForConditionalGeneration.from_pretrained(varied_tiny_path, dtype=torch.float32).eval()


@pytest.mark.parametrize("settings", [FORCED, SPLIT], ids=["forced", "split"])
def test_a_left_padded_batch_decodes_as_its_rows_alone(varied_model, batch2, settings):
    config = active_config(max_new_tokens=6, evidence_gating=True, do_sample=False, **settings)
    batch = traced(varied_model, batch2, config)
    assert any(int(step.num_protected.sum()) for step in batch.rcpp.steps), "the gate must act"
    prompt = batch2["input_ids"].shape[1]
    for row in range(2):
        inputs = row_alone(batch2, row)
        alone = traced(varied_model, inputs, config)
        generated = alone.sequences[0, inputs["input_ids"].shape[1]:]
        assert batch.sequences[row, prompt : prompt + len(generated)].tolist() == generated.tolist(), f"row {row}"
        for ours, theirs in zip(batch.rcpp.steps, alone.rcpp.steps):
            assert int(ours.num_protected[row]) == int(theirs.num_protected[0]), f"row {row}, step {ours.step}"
            assert int(ours.protected_evicted[row]) == int(theirs.protected_evicted[0]), f"row {row}, step {ours.step}"
            assert set(ours.evicted[row].tolist()) == set(theirs.evicted[0].tolist()), f"row {row}, step {ours.step}"


# -- the setting ----------------------------------------------------------------------------------------------------


def test_the_setting_round_trips_and_is_off_by_default(tmp_path):
    assert RCPP().evidence_gating is False and RCPPGenerationConfig().evidence_gating is False
    config = RCPPGenerationConfig(evidence_gating=True, tau=0.1, max_new_tokens=5)
    assert config.rcpp_method() == RCPP(evidence_gating=True, tau=0.1)
    assert RCPPGenerationConfig(methods=[RCPP(evidence_gating=True)]).evidence_gating is True
    config.to_yaml(tmp_path / "gated.yaml")
    assert "evidence_gating: true" in (tmp_path / "gated.yaml").read_text()
    loaded = RCPPGenerationConfig.from_yaml(tmp_path / "gated.yaml")
    assert loaded.to_dict() == config.to_dict() and loaded.evidence_gating is True
    config.save_pretrained(tmp_path)
    assert RCPPGenerationConfig.from_pretrained(tmp_path).rcpp_method() == config.rcpp_method()
    RCPP(evidence_gating=True).to_yaml(tmp_path / "method.yaml")
    assert load_method(tmp_path / "method.yaml") == RCPP(evidence_gating=True)


def test_a_bad_value_names_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"^RCPPGenerationConfig\.evidence_gating = 'yes': must be True or False"):
        RCPPGenerationConfig(evidence_gating="yes")
    with pytest.raises(ValueError, match=r"^RCPP\.evidence_gating = 1: must be True or False"):
        RCPP(evidence_gating=1)
    (tmp_path / "bad.yaml").write_text("evidence_gating: 2\n")
    with pytest.raises(ValueError, match=r"RCPPGenerationConfig\.evidence_gating = 2"):
        RCPPGenerationConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("evidence_gateing: true\n")
    with pytest.raises(ValueError, match="did you mean 'evidence_gating'"):
        RCPPGenerationConfig.from_yaml(tmp_path / "typo.yaml")


def test_the_gated_preset_is_the_described_values_with_gating_on():
    config = RCPPGenerationConfig.from_yaml("rcpp_gated")
    described = dict(gamma=0.9, tau=0.0, tau_mode="absolute", lambda_start=0.0, lambda_end=0.5, keep_ratio_start=1.0,
                     keep_ratio_end=0.5, schedule="linear", schedule_steps=32, evidence_gating=True)  # fmt: skip
    assert {name: getattr(config, name) for name in described} == described
    assert config.rcpp_method() == RCPP(**described)
