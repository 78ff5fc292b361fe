"""The contract every registered method keeps, one test per method, check and model family, from the declarations in
its own class (`CONTRACT_*` on `MethodConfig`, rcpp_hf/methods/base.py): its settings round trip through a dict and
YAML, neutral settings decode as vanilla, a left-padded batch decodes as its rows alone, a prefill pruner keeps the
tokens it reports and its physical drop equals masking the same tokens, and a bad setting raises naming the field.
The model checks run on the tiny LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision (anyres images of 52 tokens each,
newlines included), Qwen2.5-VL and Qwen2-VL (15 tokens each, at 3-D M-RoPE positions); a method that a family cannot
run refuses there in one line naming why. Registering a method
is all it takes to get these checks; a method without the declarations fails them."""

import dataclasses
import re
from dataclasses import dataclass

import pytest
import torch
from transformers import GenerationConfig

from rcpp_hf import RCPPGenerationConfig
from rcpp_hf.auto import RCPP_CLASSES
from rcpp_hf.methods import METHODS, load_method, method_from_dict
from tests.conftest import (
    EQUAL_SIZES,
    QWEN_EQUAL_SIZES,
    QWEN_TYPES,
    RAGGED_SIZES,
    anyres_batch,
    qwen_batch,
    row_alone,
)
from tests.test_prefill_pruning import (
    MaskFrom,
    decode,
    prefill,
    prompt_layout,
)

NAMES = sorted(METHODS)
PRUNERS = [name for name in NAMES if getattr(METHODS[name], "kind", None) == "prefill_pruner"]
FAMILIES = ["llava", "llava_next", "llava_onevision", *QWEN_TYPES]
NEW_TOKENS = 6
DECODE_STEPS = 3  # decode steps compared with masking, after the prefill
# Logits of the physical drop and of masking differ by float32 summation order only: the varied model's lm_head
# (weights of std 0.3) turns the hidden states' 1e-5 into about 2e-5.
LOGIT_ATOL = 1e-4
# Contract settings count visual tokens of the tiny LLaVA-1.5's 16-token image. On another family's image of V tokens
# they mean the same share (the library's budget convention): all 16 is V, any other count c the fraction c / 16.
CONTRACT_IMAGE = 16
COUNT_FIELDS = ("budget", "keep", "txt_rank", "img_rank")


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


@dataclass
class Subject:
    """One family's tiny model with varied weights, its two-row left-padded batch, V, and stock transformers'
    output on that batch (sequences, per-step logits)."""

    family: str
    model: torch.nn.Module
    batch: dict
    num_visual: int
    vanilla: tuple
    ragged_batch: dict | None = None  # rows whose images differ in size (anyres: 52 and 56 tokens; Qwen: 15 and 20)

    def refusal(self, cls) -> str | None:
        """The refusal a method must give on this family (a vision-side pruner on anyres or Qwen images, VCD on
        Qwen's flattened patches), else None."""
        if self.family != "llava" and getattr(cls, "reads_vision", False):
            return "reads the vision tower"
        if self.family in QWEN_TYPES and cls.name == "vcd":
            return r"vcd adds one noise image to images given as \(\.\.\., C, H, W\) pixel values"
        return None


@pytest.fixture(scope="module", params=FAMILIES)
def subject(request, varied_tiny_path, batch2, anyres_paths, qwen_paths) -> Subject:
    family = request.param
    if family in QWEN_TYPES:
        path = qwen_paths[family]
        batch, ragged = qwen_batch(path, family, QWEN_EQUAL_SIZES), qwen_batch(path, family)
    else:
        path = varied_tiny_path if family == "llava" else anyres_paths[family]
        batch = batch2 if family == "llava" else anyres_batch(path, EQUAL_SIZES)
        ragged = None if family == "llava" else anyres_batch(path, RAGGED_SIZES)
    ours_class = RCPP_CLASSES[family]
    model = ours_class.from_pretrained(path, dtype=torch.float32).eval()
    reference = ours_class.family_class.stock_class.from_pretrained(path, dtype=torch.float32).eval()
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
                              output_logits=True)  # fmt: skip
    out = reference.generate(**batch, generation_config=config)
    num_visual = int((batch["input_ids"][0] == model.config.image_token_id).sum())
    return Subject(family, model, batch, num_visual, (out.sequences, out.logits), ragged)


@pytest.fixture(scope="module")
def make(tmp_path_factory, varied_tiny_path):
    """make(name, settings) -> the method with `settings` over its defaults and the files it needs (written for the
    tiny LLaVA-1.5, the one family whose vision tower such methods read)."""
    from transformers import AutoConfig

    files, llava_config = {}, AutoConfig.from_pretrained(varied_tiny_path)

    def build(name, settings):
        cls = METHODS[name]
        if name not in files:
            files[name] = cls.contract_files(tmp_path_factory.mktemp(f"contract-{name}"), llava_config)
        return load_method(name, **{**files[name], **settings})

    return build


def on_image(settings: dict, num_visual: int) -> dict:
    """Contract `settings` for an image of `num_visual` tokens: counts as the same share of it (CONTRACT_IMAGE)."""
    def share(value):
        if isinstance(value, tuple):
            return tuple(share(item) for item in value)
        if num_visual == CONTRACT_IMAGE or isinstance(value, bool) or not isinstance(value, int):
            return value
        return num_visual if value == CONTRACT_IMAGE else value / CONTRACT_IMAGE

    return {field: share(value) if field in COUNT_FIELDS else value for field, value in settings.items()}


def ragged_counts(subject: Subject) -> list[int]:
    """The visual tokens of each row of the subject's rows with images of different sizes."""
    return (subject.ragged_batch["input_ids"] == subject.model.config.image_token_id).sum(dim=1).tolist()


def generate(model, inputs, method, **kwargs):
    config = RCPPGenerationConfig(rcpp=False, methods=[method], max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)
    return model.generate(**inputs, generation_config=config)


def runnable(subject: Subject, make, name):
    """Skip, once its refusal is checked, a method this family cannot run."""
    reason = subject.refusal(METHODS[name])
    if reason is None:
        return
    method = make(name, declared(METHODS[name], "CONTRACT_ACTING", {}))
    with pytest.raises(ValueError, match=reason):
        generate(subject.model, subject.batch, method)
    pytest.skip(f"{name} refuses {subject.family} ({reason})")


def generate_acting(make, name, subject: Subject):
    """The method with its acting settings, and its `generate` output on the subject's batch (with the logits)."""
    runnable(subject, make, name)
    method = make(name, on_image(declared(METHODS[name], "CONTRACT_ACTING", {}), subject.num_visual))
    try:
        return method, generate(subject.model, subject.batch, method, return_dict_in_generate=True, output_logits=True)
    except ValueError as error:
        pytest.fail(f"{method.describe()} does not fit the tiny {subject.family} model ({error}): declare "
                    f"CONTRACT_ACTING settings that do")  # fmt: skip


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
def test_neutral_settings_are_vanilla(name, make, subject):
    """Token for token, and logits alike: a setting that changes little (e.g. drops one token) can keep the tokens."""
    cls = METHODS[name]
    if reason := not_neutral(cls):
        pytest.skip(f"{name} has no neutral setting: {reason}")
    runnable(subject, make, name)
    method = make(name, on_image(declared(cls, "CONTRACT_NEUTRAL"), subject.num_visual))
    out = generate(subject.model, subject.batch, method, return_dict_in_generate=True, output_logits=True)
    assert out.sequences.tolist() == subject.vanilla[0].tolist(), f"{method.describe()} does not decode as vanilla"
    for step, (got, expected) in enumerate(zip(out.logits, subject.vanilla[1])):
        torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=0, msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_batch_equals_each_row_alone(name, make, subject):
    """With its acting settings the method changes the logits, and each left-padded row decodes as it does alone."""
    method, out = generate_acting(make, name, subject)
    assert not all(torch.allclose(got, expected, atol=LOGIT_ATOL)
                   for got, expected in zip(out.logits, subject.vanilla[1])), (
        f"{method.describe()} does not act on the tiny model: declare CONTRACT_ACTING settings that do")  # fmt: skip
    prompt = subject.batch["input_ids"].shape[1]
    for row in range(2):
        alone = row_alone(subject.batch, row)
        generated = generate(subject.model, alone, method)[0, alone["input_ids"].shape[1]:]  # it may stop at eos
        assert out.sequences[row, prompt : prompt + len(generated)].tolist() == generated.tolist(), f"row {row}"


@pytest.mark.parametrize("name", PRUNERS)
def test_reported_counts_are_the_kept_tokens(name, make, subject):
    """With its acting settings, each stage's `kept` is the number of distinct visual tokens every row kept (merged
    tokens included: a merge keeps its target's id), and the last stage's is what the cache's deepest layer holds."""
    method, out = generate_acting(make, name, subject)
    assert out.pruning, f"{method.describe()} reports no pruning stage"
    for record in out.pruning:
        ids = record.kept_visual_ids
        assert ids.shape == (2, record.kept), f"stage before layer {record.layer}: ids {tuple(ids.shape)}"
        distinct = [len(set(row.tolist())) for row in ids]
        assert distinct == [record.kept] * 2, (
            f"{method.describe()}, stage before layer {record.layer}: reports {record.kept} kept, the rows keep "
            f"{distinct} distinct visual tokens")
        assert 0 <= int(ids.min()) and int(ids.max()) < subject.num_visual
    assert out.past_key_values.num_visual_tokens == out.pruning[-1].kept, (
        f"{method.describe()}: the last stage reports {out.pruning[-1].kept} kept, the cache holds "
        f"{out.past_key_values.num_visual_tokens}")


@pytest.mark.parametrize("name", PRUNERS)
def test_physical_drop_equals_masking(name, make, subject):
    """The logits of the acting settings' generate equal a forward that computes every token and masks, from each
    stage's layer on, the ones that stage dropped: at the prefill and the next decode steps, in float32. A pruner
    declared not maskable must indeed differ from masking."""
    maskable = declared(METHODS[name], "CONTRACT_MASKABLE")
    method, out = generate_acting(make, name, subject)
    model, batch = subject.model, subject.batch
    assert out.pruning and min(record.kept for record in out.pruning) < subject.num_visual, "the settings must prune"
    mask = MaskFrom.records(out.pruning, subject.num_visual)
    hidden, _, cache = prefill(model, batch, [mask])
    masked = [model.family.logits(hidden[:, -1:])[:, 0]]
    prompt = batch["input_ids"].shape[1]
    position = prompt_layout(model, batch).positions[:, -1:]
    for step in range(DECODE_STEPS):  # the tokens generate chose, fed back at the next positions
        position = position + 1
        token = out.sequences[:, prompt + step : prompt + step + 1]
        masked.append(decode(model, cache, token, position, [mask]))
    pairs = list(zip(out.logits, masked))
    if maskable is True:
        for step, (got, expected) in enumerate(pairs):
            torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=0, msg=lambda m: f"step {step}: {m}")
    else:
        assert not all(torch.allclose(got, expected, atol=LOGIT_ATOL) for got, expected in pairs), (
            f"masking reproduces {method.describe()}: CONTRACT_MASKABLE = {maskable!r} is wrong")


@pytest.mark.parametrize("name", NAMES)
def test_rows_with_different_image_sizes(name, make, subject):
    """On rows whose images differ in size (52 and 56 visual tokens on the anyres families, 15 and 20 on Qwen's), a
    method that takes them (`ragged_rows`) decodes each row as it does alone, and a pruner reports what each row kept
    (the last stage's counts are what the cache's deepest layer holds); any other method refuses them naming why."""
    if subject.ragged_batch is None:
        pytest.skip("LLaVA-1.5's rows hold one 16-token image each")
    runnable(subject, make, name)
    cls, batch = METHODS[name], subject.ragged_batch
    method = make(name, on_image(declared(cls, "CONTRACT_ACTING", {}), subject.num_visual))
    if not cls.ragged_rows:
        counts = ", ".join(str(count) for count in ragged_counts(subject))
        refusal = rf"{name} need the same number of image tokens in every batch row, got \[{counts}\]"
        with pytest.raises(ValueError, match=refusal):
            generate(subject.model, batch, method)
        return
    out = generate(subject.model, batch, method, return_dict_in_generate=True)
    prompt = batch["input_ids"].shape[1]
    for row in range(2):
        alone = row_alone(batch, row)
        generated = generate(subject.model, alone, method)[0, alone["input_ids"].shape[1]:]
        assert out.sequences[row, prompt : prompt + len(generated)].tolist() == generated.tolist(), f"row {row}"
    for record in out.pruning:
        per_row = record.kept_per_row or (record.kept,) * 2
        distinct = [len(set(ids.tolist()) - {-1}) for ids in record.kept_visual_ids]
        assert distinct == list(per_row) and record.kept == max(per_row), f"stage before layer {record.layer}"
    if out.pruning:
        last = out.pruning[-1]
        assert out.past_key_values.layouts[-1].visual_counts == (last.kept_per_row or (last.kept,) * 2)


@pytest.mark.parametrize("name", PRUNERS)
def test_physical_drop_equals_masking_on_rows_with_different_image_sizes(name, make, subject):
    """The check above on rows of different counts (52 and 56, Qwen's 15 and 20): each row keeps its own count,
    left-padded."""
    if subject.ragged_batch is None or not METHODS[name].ragged_rows:
        pytest.skip("rows with different image sizes: anyres families, methods that take them")
    runnable(subject, make, name)
    maskable = declared(METHODS[name], "CONTRACT_MASKABLE")
    model, batch, num_visual = subject.model, subject.ragged_batch, max(ragged_counts(subject))
    method = make(name, on_image(declared(METHODS[name], "CONTRACT_ACTING", {}), subject.num_visual))
    out = generate(model, batch, method, return_dict_in_generate=True, output_logits=True)
    mask = MaskFrom.records(out.pruning, num_visual)
    hidden, _, cache = prefill(model, batch, [mask])
    masked = [model.family.logits(hidden[:, -1:])[:, 0]]
    prompt = batch["input_ids"].shape[1]
    position = prompt_layout(model, batch).positions[:, -1:]
    for step in range(DECODE_STEPS):
        position = position + 1
        masked.append(decode(model, cache, out.sequences[:, prompt + step : prompt + step + 1], position, [mask]))
    pairs = list(zip(out.logits, masked))
    if maskable is True:
        for step, (got, expected) in enumerate(pairs):
            torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=0, msg=lambda m: f"step {step}: {m}")
    else:
        assert not all(torch.allclose(got, expected, atol=LOGIT_ATOL) for got, expected in pairs)


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
