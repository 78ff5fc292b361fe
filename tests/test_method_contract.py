"""The contract every registered method keeps, one test per method and check, from the declarations in its own class
(`CONTRACT_*` on `MethodConfig`, rcpp_hf/methods/base.py): its settings round trip through a dict and YAML, neutral
settings decode as vanilla, a left-padded batch decodes as its rows alone, a prefill pruner keeps the tokens it reports and its physical drop
equals masking the same tokens, and a bad setting raises naming the field. Registering a method is all it takes to get
these checks; a method without the declarations fails them."""

import dataclasses
import re

import pytest
import torch
from transformers import GenerationConfig, LlavaForConditionalGeneration

from rcpp_hf import RCPPGenerationConfig, RCPPLlavaForConditionalGeneration
from rcpp_hf.methods import METHODS, load_method, method_from_dict
from tests.conftest import row_alone
from tests.test_prefill_pruning import (
    NUM_VISUAL,
    MaskFrom,
    decode,
    prefill,
    prompt_layout,
)

NAMES = sorted(METHODS)
PRUNERS = [name for name in NAMES if getattr(METHODS[name], "kind", None) == "prefill_pruner"]
NEW_TOKENS = 6
DECODE_STEPS = 3  # decode steps compared with masking, after the prefill
# Logits of the physical drop and of masking differ by float32 summation order only: the varied model's lm_head
# (weights of std 0.3) turns the hidden states' 1e-5 into about 2e-5.
LOGIT_ATOL = 1e-4


def declared(cls, attribute, default=dataclasses.MISSING):
    """`cls`'s own declaration of `attribute` (a parent's is not inherited: its settings differ)."""
    if attribute in vars(cls):
        return vars(cls)[attribute]
    if default is not dataclasses.MISSING:
        return default
    pytest.fail(f"method {cls.name!r} ({cls.__name__}) declares no {attribute}: add it to its class body "
                f"(MethodConfig in rcpp_hf/methods/base.py says what it means)")  # fmt: skip


def not_neutral(cls) -> str | None:
    """Why `cls` has no neutral setting (its CONTRACT_NEUTRAL is None), else None."""
    if declared(cls, "CONTRACT_NEUTRAL") is not None:
        return None
    reason = declared(cls, "CONTRACT_NOT_NEUTRAL")
    assert isinstance(reason, str) and reason, f"{cls.__name__}.CONTRACT_NOT_NEUTRAL must say why it has none"
    return reason


@pytest.fixture(scope="module")
def varied_model(varied_tiny_path):
    """The varied tiny model: its answers depend on what it sees, so a method that changes it shows."""
    return RCPPLlavaForConditionalGeneration.from_pretrained(varied_tiny_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def vanilla(varied_tiny_path, batch2):
    """Stock transformers on the same folder: (sequences, per-step logits)."""
    reference = LlavaForConditionalGeneration.from_pretrained(varied_tiny_path, dtype=torch.float32).eval()
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
                              output_logits=True)  # fmt: skip
    out = reference.generate(**batch2, generation_config=config)
    return out.sequences, out.logits


@pytest.fixture(scope="module")
def make(tmp_path_factory, varied_model):
    """make(name, settings) -> the method with `settings` over its defaults and the files it needs."""
    files = {}

    def build(name, settings):
        cls = METHODS[name]
        if name not in files:
            files[name] = cls.contract_files(tmp_path_factory.mktemp(f"contract-{name}"), varied_model.config)
        return load_method(name, **{**files[name], **settings})

    return build


def generate(model, inputs, method, **kwargs):
    config = RCPPGenerationConfig(rcpp=False, methods=[method], max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)
    return model.generate(**inputs, generation_config=config)


def generate_acting(make, name, model, inputs):
    """The method with its acting settings, and its `generate` output on `inputs` (with the logits)."""
    method = make(name, declared(METHODS[name], "CONTRACT_ACTING", {}))
    try:
        return method, generate(model, inputs, method, return_dict_in_generate=True, output_logits=True)
    except ValueError as error:
        pytest.fail(f"{method.describe()} does not fit the tiny model ({error}): declare CONTRACT_ACTING settings "
                    f"that do")  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_declarations_are_well_formed(name):
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    invalid = declared(cls, "CONTRACT_INVALID")
    assert isinstance(invalid, dict) and invalid, f"{cls.__name__}.CONTRACT_INVALID needs a {{field: bad value}}"
    settings = {"CONTRACT_INVALID": invalid, "CONTRACT_ACTING": declared(cls, "CONTRACT_ACTING", {}),
                "CONTRACT_NEUTRAL": declared(cls, "CONTRACT_NEUTRAL") or {}}  # fmt: skip
    for attribute, values in settings.items():
        assert set(values) <= fields, f"{cls.__name__}.{attribute} names no setting {sorted(set(values) - fields)}"
    not_neutral(cls)
    if name in PRUNERS:
        maskable = declared(cls, "CONTRACT_MASKABLE")
        assert maskable is True or (isinstance(maskable, str) and maskable), (
            f"{cls.__name__}.CONTRACT_MASKABLE must be True or say why masking cannot reproduce it")


@pytest.mark.parametrize("name", NAMES)
def test_settings_round_trip(name, make, tmp_path):
    cls = METHODS[name]
    cases = {"defaults": {}, "acting": declared(cls, "CONTRACT_ACTING", {}),
             "neutral": declared(cls, "CONTRACT_NEUTRAL") or {}}  # fmt: skip
    for case, settings in cases.items():
        method = make(name, settings)
        assert method_from_dict(method.to_dict()) == method, case
        method.to_yaml(tmp_path / f"{case}.yaml")
        assert load_method(tmp_path / f"{case}.yaml") == method, case


@pytest.mark.parametrize("name", NAMES)
def test_neutral_settings_are_vanilla(name, make, varied_model, batch2, vanilla):
    """Token for token, and logits alike: a setting that changes little (e.g. drops one token) can keep the tokens."""
    cls = METHODS[name]
    if reason := not_neutral(cls):
        pytest.skip(f"{name} has no neutral setting: {reason}")
    method = make(name, declared(cls, "CONTRACT_NEUTRAL"))
    out = generate(varied_model, batch2, method, return_dict_in_generate=True, output_logits=True)
    assert out.sequences.tolist() == vanilla[0].tolist(), f"{method.describe()} does not decode as vanilla"
    for step, (got, expected) in enumerate(zip(out.logits, vanilla[1])):
        torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=0, msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_batch_equals_each_row_alone(name, make, varied_model, batch2, vanilla):
    """With its acting settings the method changes the logits, and each left-padded row decodes as it does alone."""
    method, out = generate_acting(make, name, varied_model, batch2)
    assert not all(torch.allclose(got, expected, atol=LOGIT_ATOL) for got, expected in zip(out.logits, vanilla[1])), (
        f"{method.describe()} does not act on the tiny model: declare CONTRACT_ACTING settings that do")
    prompt = batch2["input_ids"].shape[1]
    for row in range(2):
        alone = row_alone(batch2, row)
        generated = generate(varied_model, alone, method)[0, alone["input_ids"].shape[1]:]  # it may stop early at eos
        assert out.sequences[row, prompt : prompt + len(generated)].tolist() == generated.tolist(), f"row {row}"


@pytest.mark.parametrize("name", PRUNERS)
def test_reported_counts_are_the_kept_tokens(name, make, varied_model, batch2):
    """With its acting settings, each stage's `kept` is the number of distinct visual tokens every row kept (merged
    tokens included: a merge keeps its target's id), and the last stage's is what the cache's deepest layer holds."""
    method, out = generate_acting(make, name, varied_model, batch2)
    assert out.pruning, f"{method.describe()} reports no pruning stage"
    for record in out.pruning:
        ids = record.kept_visual_ids
        assert ids.shape == (2, record.kept), f"stage before layer {record.layer}: ids {tuple(ids.shape)}"
        distinct = [len(set(row.tolist())) for row in ids]
        assert distinct == [record.kept] * 2, (
            f"{method.describe()}, stage before layer {record.layer}: reports {record.kept} kept, the rows keep "
            f"{distinct} distinct visual tokens")
        assert 0 <= int(ids.min()) and int(ids.max()) < NUM_VISUAL
    assert out.past_key_values.num_visual_tokens == out.pruning[-1].kept, (
        f"{method.describe()}: the last stage reports {out.pruning[-1].kept} kept, the cache holds "
        f"{out.past_key_values.num_visual_tokens}")


@pytest.mark.parametrize("name", PRUNERS)
def test_physical_drop_equals_masking(name, make, varied_model, batch2):
    """The logits of the acting settings' generate equal a forward that computes every token and masks, from each
    stage's layer on, the ones that stage dropped: at the prefill and the next decode steps, in float32. A pruner
    declared not maskable must indeed differ from masking."""
    maskable = declared(METHODS[name], "CONTRACT_MASKABLE")
    method, out = generate_acting(make, name, varied_model, batch2)
    assert out.pruning and min(record.kept for record in out.pruning) < NUM_VISUAL, "the acting settings must prune"
    mask = MaskFrom.records(out.pruning, NUM_VISUAL)
    hidden, _, cache = prefill(varied_model, batch2, [mask])
    masked = [varied_model.lm_head(hidden[:, -1])]
    prompt = batch2["input_ids"].shape[1]
    position = prompt_layout(varied_model, batch2).positions[:, -1:]
    for step in range(DECODE_STEPS):  # the tokens generate chose, fed back at the next positions
        position = position + 1
        token = out.sequences[:, prompt + step : prompt + step + 1]
        masked.append(decode(varied_model, cache, token, position, [mask]))
    pairs = list(zip(out.logits, masked))
    if maskable is True:
        for step, (got, expected) in enumerate(pairs):
            torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=0, msg=lambda m: f"step {step}: {m}")
    else:
        assert not all(torch.allclose(got, expected, atol=LOGIT_ATOL) for got, expected in pairs), (
            f"masking reproduces {method.describe()}: CONTRACT_MASKABLE = {maskable!r} is wrong")


@pytest.mark.parametrize("name", NAMES)
def test_invalid_settings_name_the_field(name, make):
    cls = METHODS[name]
    for field, value in declared(cls, "CONTRACT_INVALID").items():
        with pytest.raises(ValueError, match=rf"\b{re.escape(field)} = "):  # "Owner.field = value: why"
            make(name, {field: value})


def test_declarations_are_not_inherited():
    """A subclass's settings differ from its parent's, so it must declare its own contract."""

    class Derived(METHODS["fastv"]):
        name = "derived"

    with pytest.raises(pytest.fail.Exception, match="'derived' .* declares no CONTRACT_NEUTRAL"):
        declared(Derived, "CONTRACT_NEUTRAL")
