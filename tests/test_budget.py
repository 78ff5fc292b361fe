"""The budget rule (`rcpp_hf/methods/budget.py`): a budget is a count of the model's own image or a fraction of it,
the same in every method, preset and command-line flag."""

import argparse
import dataclasses

import pytest
import torch
from transformers import AutoProcessor

from rcpp_hf import RCPPGenerationConfig, RCPPLlavaForConditionalGeneration
from rcpp_hf.benchmark.suite import BenchmarkSettings, format_report, run_speed_benchmark
from rcpp_hf.cli import build_parser, main
from rcpp_hf.cli.options import budget_argument
from rcpp_hf.engine.pruning import visual_tokens_per_layer
from rcpp_hf.methods import METHODS, FastV, PDrop, RandomPruning, SparseVLM, VisionZip, load_method
from rcpp_hf.methods.budget import budget_label, published_fraction, resolve_budget
from rcpp_hf.methods.fastv_finepruner import FastVFinePruner
from rcpp_hf.methods.prefill_pruner import PrefillPruner
from rcpp_hf.methods.sparsevlm import SPARSEVLM_KEEP, sparsevlm_keep_counts
from tests.cli_helpers import user_error
from tests.conftest import PROMPTS, make_images

SIZES = (16, 100, 576)  # the tiny model's image, ShapesWorld's, LLaVA-1.5's
# Every setting of a registered method that counts visual tokens to keep (RandomPruning's `keep` is a list of them).
BUDGET_FIELDS = {
    "cdpruner": ("budget",),
    "dart": ("budget",),
    "divprune": ("budget",),
    "downsample": ("budget",),
    "fastv": ("budget", "keep"),
    "fastv_finepruner": ("budget", "keep"),
    "himap": ("txt_rank", "img_rank"),
    "pdrop": ("budget",),
    "random": ("budget",),
    "sid": ("keep",),
    "sparsevlm": ("budget",),
    "visionzip": ("budget", "contextual"),
    "vispruner": ("budget",),
}
# FastV's budget is an average over layers: on the tests' 4-layer decoder its stage is layer 1, and layer 0 alone
# holds a quarter of the image, more than the default 128 / 576.
UNREACHABLE_ON_4_LAYERS = {"fastv", "fastv_finepruner", "random"}


# -- the rule -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_visual", SIZES)
def test_counts_and_fractions_resolve_on_each_image_size(num_visual):
    assert resolve_budget(1, num_visual) == 1 and resolve_budget(num_visual, num_visual) == num_visual
    assert resolve_budget(0.25, num_visual) == round(0.25 * num_visual)
    assert resolve_budget(0.001, num_visual) == 1  # at least one token
    assert resolve_budget(0.999, num_visual) == round(0.999 * num_visual)
    with pytest.raises(ValueError, match=f"larger than the image's {num_visual} visual tokens"):
        resolve_budget(num_visual + 1, num_visual)
    assert FastV(keep=0.25).resolve_stages(32, num_visual)[0].keep == round(0.25 * num_visual)
    assert FastV(keep=num_visual).resolve_stages(32, num_visual)[0].keep == num_visual


def test_rounding_is_pythons_round():
    assert resolve_budget(0.5, 5) == 2 and resolve_budget(0.5, 7) == 4  # exact halves go to the even count
    assert resolve_budget(0.3, 5) == 2 and resolve_budget(0.7, 5) == 4


def test_published_counts_resolve_exactly_on_576():
    for count in range(1, 576):  # the whole image is the count 576, not the fraction 1.0
        fraction = published_fraction(count)
        assert resolve_budget(fraction, 576) == count
        assert resolve_budget(float(repr(fraction)), 576) == count  # as a YAML preset writes it
    assert published_fraction(128) == 128 / 576 and resolve_budget(128 / 576, 576) == 128
    # the 4-digit labels of rows read back as the same budgets on LLaVA-1.5's and ShapesWorld's images
    for count in (64, 128, 192):
        label = budget_label(published_fraction(count))
        assert resolve_budget(float(label), 576) == count
        assert resolve_budget(float(label), 100) == resolve_budget(published_fraction(count), 100)
    assert budget_label(128 / 576) == "0.2222" and budget_label(22) == "22"


@pytest.mark.parametrize("name", sorted(BUDGET_FIELDS))
@pytest.mark.parametrize("value, problem", [
    (True, "is a bool"), (False, "is a bool"), (0, "is an integer below"), (-3, "is an integer below"),
    (1.0, "is a fraction outside"), (1.5, "is a fraction outside"), (0.0, "is a fraction outside"),
    ("64", "is not a number"),
])  # fmt: skip
def test_bools_and_out_of_range_values_are_refused_naming_the_field(name, value, problem):
    cls = METHODS[name]
    for field in BUDGET_FIELDS[name]:
        if field == "contextual" and value == 0:
            continue  # no contextual token is a valid choice
        with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{field} = {value!r}: must be .*it {problem}"):
            load_method(name, **{field: value})


def test_ints_and_reals_of_other_types_read_as_the_two_kinds():
    import numpy as np

    assert FastV(budget=np.int64(22)).budget == 22 and type(FastV(budget=np.int64(22)).budget) is int
    assert type(FastV(budget=np.float32(0.25)).budget) is float
    with pytest.raises(ValueError, match="RandomPruning.keep"):
        RandomPruning(layers=(1,), keep=(True,))


def test_every_method_with_a_visual_token_setting_is_covered():
    names = {"budget", "keep", "txt_rank", "img_rank", "contextual"}
    has_budget = {name for name, cls in METHODS.items() if names & {f.name for f in dataclasses.fields(cls)}}
    assert has_budget == set(BUDGET_FIELDS)


def test_budgets_that_must_be_ordered_are_checked_once_resolved():
    with pytest.raises(ValueError, match="HiMAP.img_rank"):
        load_method("himap", txt_rank=4, img_rank=8)  # both counts: refused at once
    mixed = load_method("himap", txt_rank=10, img_rank=0.5)  # a count and a fraction: refused on the image
    assert [s.keep for s in mixed.resolve_stages(4, 16)] == [10, 8]
    with pytest.raises(ValueError, match="HiMAP.img_rank = 0.5: resolves to 50 of 100 visual tokens, more than"):
        mixed.resolve_stages(4, 100)
    with pytest.raises(ValueError, match="VisionZip.contextual"):
        VisionZip(budget=0.25, contextual=0.5)
    with pytest.raises(ValueError, match="VisionZip.contextual = 8: resolves to 8 of 16 visual tokens, not below"):
        VisionZip(budget=0.25, contextual=8).resolve_stages(4, 16)
    with pytest.raises(ValueError, match=r"RandomPruning.keep .* must not increase once resolved: \[4, 8\]"):
        RandomPruning(layers=(1, 2), keep=(4, 0.5)).resolve_stages(4, 16)


# -- what the methods resolve --------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_visual", SIZES)
def test_fastv_budget_is_an_average_over_layers_at_the_resolved_count(num_visual):
    (stage,) = FastV(budget=0.25).resolve_stages(32, num_visual)
    average = sum(visual_tokens_per_layer({stage.layer: stage.keep}, 32, num_visual)) / 32
    assert abs(average - round(0.25 * num_visual)) < 0.5


def test_finepruner_equivalences_are_exact_on_576_tokens():
    # LLaVA-FinePruner-Head's R_dict for LLaVA-1.5-7B (32 layers, K = 2): budget -> R
    for count, keep in ((192, 166), (128, 98), (64, 30)):
        assert FastV(budget=published_fraction(count)).resolve_stages(32, 576)[0].keep == keep
        assert FastVFinePruner(budget=count).resolve_stages(32, 576)[0].keep == keep


def test_sparsevlm_published_budgets_give_the_published_lists_on_576():
    for count, keeps in SPARSEVLM_KEEP.items():
        assert sparsevlm_keep_counts(published_fraction(count), 576) == keeps
        assert [s.keep for s in SparseVLM(budget=count).resolve_stages(32, 576)] == list(keeps)
        assert [s.keep for s in SparseVLM(budget=published_fraction(count)).resolve_stages(32, 576)] == list(keeps)


def test_sparsevlm_interpolates_any_budget_between_the_published_lists():
    # halfway between 96 and 128 of 576: each stage halfway between the two lists
    halfway = sparsevlm_keep_counts(112 / 576, 576)
    assert all(abs(k - (a + b) / 2) <= 0.5 for k, a, b in zip(halfway, SPARSEVLM_KEEP[96], SPARSEVLM_KEEP[128]))
    assert sparsevlm_keep_counts(32 / 576, 576) == (33, 15, 8)  # half the 64 list (8.5 to even)
    assert sparsevlm_keep_counts(1.0, 100) == (100, 100, 100)  # the whole image keeps every token
    for share in (0.01, 0.05, 0.15, 0.3, 0.5, 0.9):
        keeps = sparsevlm_keep_counts(share, 100)
        assert list(keeps) == sorted(keeps, reverse=True) and 1 <= keeps[-1] and keeps[0] <= 100
    # a count is read as its share of the image: 40 of 100 as 0.4
    assert SparseVLM(budget=40).resolve_stages(4, 100) == SparseVLM(budget=0.4).resolve_stages(4, 100)


def test_an_unreachable_budget_names_the_reachable_range():
    message = ("FastV.budget = 0.1111111111111111: budget 0.1111 (11 of 100 visual tokens) is unreachable: pruning "
               "before layer 1 of 4 averages at least 25; reachable: 26..100")  # fmt: skip
    with pytest.raises(ValueError) as error:
        FastV(budget=64 / 576).resolve_stages(4, 100)
    assert str(error.value) == message
    assert FastV(budget=26).resolve_stages(4, 100)[0].keep == 1  # the lower end: R = 1 from layer 1
    with pytest.raises(ValueError, match=r"FastV.budget = 25: budget 25 \(of 100 visual tokens\) is unreachable"):
        FastV(budget=25).resolve_stages(4, 100)
    with pytest.raises(ValueError, match=r"^RandomPruning.budget = .*reachable: 26\.\.100$"):
        RandomPruning().resolve_stages(4, 100)
    with pytest.raises(ValueError, match=r"^PDrop.budget = 0.25: budget 0.25 \(25 of 100 .*reachable: 26\.\.100$"):
        PDrop(budget=0.25).resolve_stages(4, 100)
    assert len(PDrop(budget=26).resolve_stages(4, 100)) == 3


def test_bench_skips_an_unreachable_row_with_its_reason():
    settings = BenchmarkSettings(shape="tiny", methods=("vanilla", "fastv", "vispruner"), budget=64 / 576,
                                 new_tokens=4, repeats=1, early_steps=2, late_steps=2)  # fmt: skip
    report = run_speed_benchmark(settings)
    assert report["methods"]["fastv"]["skipped"].endswith("reachable: 5..16")
    vispruner = report["methods"]["vispruner"]
    assert "prefill_s" in vispruner and vispruner["method"]["budget"] == 64 / 576
    assert "fastv: skipped: FastV.budget = 0.1111111111111111: budget 0.1111 (2 of 16" in format_report(report)


# -- generate with every method's defaults -------------------------------------------------------------------------
def generate_defaults(model, batch, name):
    config = RCPPGenerationConfig(rcpp=False, methods=[load_method(name)], max_new_tokens=2, do_sample=False,
                                  return_dict_in_generate=True)  # fmt: skip
    return model.generate(**batch, generation_config=config)


def check_kept_as_resolved(model, out, name, num_visual):
    method = load_method(name)
    if isinstance(method, PrefillPruner):
        stages = method.resolve_stages(model.config.text_config.num_hidden_layers, num_visual)
        assert [record.kept for record in out.pruning] == [stage.keep for stage in stages], name


@pytest.mark.parametrize("name", sorted(BUDGET_FIELDS))
def test_defaults_run_on_the_tiny_model(rcpp_model, batch1, name):
    if name in UNREACHABLE_ON_4_LAYERS:
        with pytest.raises(ValueError, match=r"budget 0.2222 \(4 of 16 visual tokens\) is unreachable: .*5\.\.16"):
            generate_defaults(rcpp_model, batch1, name)
        return
    out = generate_defaults(rcpp_model, batch1, name)
    check_kept_as_resolved(rcpp_model, out, name, 16)


@pytest.fixture(scope="module")
def model_100(tiny_100_path):
    model = RCPPLlavaForConditionalGeneration.from_pretrained(tiny_100_path, dtype=torch.float32).eval()
    batch = AutoProcessor.from_pretrained(tiny_100_path)(images=make_images(1), text=PROMPTS[:1], return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 100
    return model, batch


@pytest.mark.parametrize("name", sorted(BUDGET_FIELDS))
def test_defaults_run_on_a_100_token_model(model_100, name):
    model, batch = model_100
    out = generate_defaults(model, batch, name)
    check_kept_as_resolved(model, out, name, 100)


def test_a_fraction_keeps_its_share_of_each_image(rcpp_model, batch1, model_100):
    for model, batch, num_visual in ((rcpp_model, batch1, 16), (*model_100, 100)):
        config = RCPPGenerationConfig(rcpp=False, methods=[FastV(keep=0.25)], max_new_tokens=2, do_sample=False,
                                      return_dict_in_generate=True)  # fmt: skip
        out = model.generate(**batch, generation_config=config)
        assert out.pruning[0].kept == round(0.25 * num_visual)


def test_generate_on_the_embedded_model_runs_every_method_with_its_defaults(capsys):
    """`rcpp-hf generate --method NAME` with no --model: the default runs, or the command refuses in one line (a
    method that needs a trained artifact)."""
    for name in METHODS:
        if name == "gan_pruner":
            user_error(capsys, ["generate", "--method", name, "--max-new-tokens", "2"], "pruner_path .*is required")
        else:
            capsys.readouterr()
            assert main(["generate", "--method", name, "--max-new-tokens", "2"]) == 0, name
            assert "new tokens" in capsys.readouterr().out, name


# -- the command line ----------------------------------------------------------------------------------------------
def test_budget_flags_take_counts_and_fractions():
    assert budget_argument("22") == 22 and isinstance(budget_argument("22"), int)
    assert budget_argument("0.2222") == 0.2222
    for text in ("0", "1.0", "1.5", "-0.5", "many"):
        with pytest.raises(argparse.ArgumentTypeError, match="integer >= 1 .* or a fraction in \\(0, 1\\)"):
            budget_argument(text)


def budget_actions():
    """Every budget flag's argparse action: bench, compare and the studies in experiments/."""
    from experiments.condensation import build_parser as condensation_parser
    from experiments.head_ablation import build_parser as ablation_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    compare = commands["shapesworld"]._subparsers._group_actions[0].choices["compare"]
    parsers = {"bench": (commands["bench"], "--budget"), "compare": (compare, "--budgets"),
               "head_ablation": (ablation_parser(), "--budgets"),
               "condensation": (condensation_parser(), "--target-tokens")}  # fmt: skip
    return {name: next(a for a in parser._actions if flag in a.option_strings) for name, (parser, flag) in
            parsers.items()}  # fmt: skip


def test_every_budget_flag_states_the_rule():
    for name, action in budget_actions().items():
        assert action.type is budget_argument, name
        assert "integer counts visual tokens of the model's own image" in action.help, name
        assert "fraction in (0, 1)" in action.help, name


def test_layer_and_head_flags_say_what_they_take():
    from experiments.condensation import build_parser as condensation_parser
    from experiments.head_ablation import build_parser as ablation_parser

    heads = next(a for a in ablation_parser()._actions if "--heads" in a.option_strings)
    layers = next(a for a in condensation_parser()._actions if "--layers" in a.option_strings)
    assert "head counts of this model's own attention heads" in heads.help and heads.default is None
    assert "layer indices of this model's own decoder" in layers.help


def test_a_budget_flag_refuses_a_bad_value(capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["shapesworld", "compare", "--budgets", "1.5", "--output-dir", "x"])
    assert exit.value.code == 2 and "fraction in (0, 1)" in capsys.readouterr().err
