"""FastV + FinePruner, SparseVLM and PDrop inside `generate`, on the engine's prefill pruning."""

import pytest
import torch
from transformers import GenerationConfig, LlavaForConditionalGeneration

from rcpp_hf import RCPPGenerationConfig, RCPPLlavaForConditionalGeneration
from rcpp_hf.engine.layout import text_after_image
from rcpp_hf.methods import (
    FastVFinePruner,
    PDrop,
    RandomPruning,
    SparseVLM,
    load_method,
)
from rcpp_hf.methods.sparsevlm import rater_scores, select_text_raters
from tests.conftest import row_alone
from tests.test_prefill_pruning import NUM_VISUAL, prompt_layout

METHODS = [
    FastVFinePruner(keep=6, head_strategy="entropy", num_heads=2),
    FastVFinePruner(keep=6, head_strategy="consensus_diversity"),
    SparseVLM(budget=4),
    SparseVLM(budget=5, token_recycling=True),
    PDrop(),
    PDrop(budget=6),
    RandomPruning(budget=6),
    RandomPruning(layers=(1, 3), keep=(10, 3), seed=4),
]


@pytest.fixture(scope="module")
def varied_model(varied_tiny_path):
    return RCPPLlavaForConditionalGeneration.from_pretrained(varied_tiny_path, dtype=torch.float32).eval()


def generate(model, batch, method, **kwargs):
    config = RCPPGenerationConfig(
        rcpp=False, methods=[method], max_new_tokens=6, do_sample=False, return_dict_in_generate=True, **kwargs
    )
    return model.generate(**batch, generation_config=config)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.describe())
def test_stages_shrink_the_layers_as_resolved(varied_model, batch2, method):
    out = generate(varied_model, batch2, method)
    stages = method.resolve_stages(4, NUM_VISUAL)
    assert [record.layer for record in out.pruning] == [s.layer for s in stages if s.keep < NUM_VISUAL]
    recycled = isinstance(method, SparseVLM) and method.token_recycling
    cached = NUM_VISUAL
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    for record in out.pruning:
        stage = next(s for s in stages if s.layer == record.layer)
        assert record.kept == stage.keep or (recycled and record.kept > stage.keep)
        assert record.kept_visual_ids.shape == (2, record.kept)
        assert lengths[record.layer - 1] - lengths[record.layer] == cached - record.kept
        cached = record.kept
    if isinstance(method, FastVFinePruner):
        heads = out.pruning[0].details["num_heads"]
        assert len(heads) == 2 and all(1 <= h <= 4 for h in heads)
        if method.head_strategy != "consensus_diversity":
            assert heads == [2, 2]


@pytest.mark.parametrize(
    "method",
    [FastVFinePruner(keep=NUM_VISUAL, num_heads=2), PDrop(ratios=(1.0, 1.0, 1.0)),
     RandomPruning(layers=(1, 2), keep=(NUM_VISUAL, NUM_VISUAL))],
    ids=["finepruner", "pdrop", "random"],
)
def test_keeping_everything_is_vanilla(tiny_path, rcpp_model, batch2, method):
    vanilla = LlavaForConditionalGeneration.from_pretrained(tiny_path, dtype=torch.float32).eval()
    expected = vanilla.generate(**batch2, generation_config=GenerationConfig(max_new_tokens=8, do_sample=False))
    config = RCPPGenerationConfig(rcpp=False, methods=[method], max_new_tokens=8, do_sample=False)
    assert torch.equal(rcpp_model.generate(**batch2, generation_config=config), expected)


def test_random_pruning_is_seeded_shared_by_the_rows_and_batch_independent(varied_model, batch2):
    method = RandomPruning(layers=(1, 3), keep=(10, 3), seed=4)
    out = generate(varied_model, batch2, method)
    first = [record.kept_visual_ids for record in out.pruning]
    again = [record.kept_visual_ids for record in generate(varied_model, batch2, method).pruning]
    other = [record.kept_visual_ids for record in generate(varied_model, batch2, RandomPruning(layers=(1, 3), keep=(10, 3), seed=5)).pruning]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert all(torch.equal(ids[0], ids[1]) for ids in first)  # one draw shared by the rows (left padding aside)
    for row in range(2):
        alone = generate(varied_model, row_alone(batch2, row), method)
        real = batch2["attention_mask"][row].bool()
        assert torch.equal(alone.sequences[0, real.sum():], out.sequences[row, batch2["input_ids"].shape[1]:])


@pytest.mark.parametrize(
    "settings, message",
    [(dict(layers=(1, 2)), "go together"), (dict(layers=(2, 1), keep=(4, 2)), "increasing"),
     (dict(layers=(1, 2), keep=(2, 4)), "non-increasing"), (dict(layers=(1,), keep=(2, 1)), "one count per layer"),
     (dict(budget=0), "budget")],
)
def test_random_pruning_bad_settings_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        RandomPruning(**settings)


class RecordingSparseVLM(SparseVLM):
    """SparseVLM that keeps the scores of each stage (in the class: `generate` works on a copy of its config)."""

    scores: list = []

    def select(self, ctx):
        columns = super().select(ctx)
        RecordingSparseVLM.scores.append(ctx.scores)
        return columns


def test_sparsevlm_scores_equal_eager_attention(varied_tiny_path, batch2):
    """Rater rows' attention recomputed on SDPA layers == the eager attentions transformers reports."""
    model = RCPPLlavaForConditionalGeneration.from_pretrained(varied_tiny_path).eval()
    method = RecordingSparseVLM(budget=4)
    generate(model, batch2, method)
    stage = method.resolve_stages(4, NUM_VISUAL)[0]

    eager = LlavaForConditionalGeneration.from_pretrained(varied_tiny_path, attn_implementation="eager").eval()
    with torch.no_grad():
        reference = eager(**batch2, output_attentions=True)
        embeds = model.family.embed_prompt(batch2["input_ids"], {"pixel_values": batch2["pixel_values"]})
    layout = prompt_layout(model, batch2)
    rows, real = text_after_image(layout)
    dim = embeds.shape[-1]
    visual = embeds.gather(1, layout.visual_slots[:, :, None].expand(-1, -1, dim))
    raters = select_text_raters(visual, embeds.gather(1, rows[:, :, None].expand(-1, -1, dim)), real)
    attention = reference.attentions[stage.layer - 1]  # (B, H, S, S)
    rows_attention = attention.gather(2, rows[:, None, :, None].expand(-1, attention.shape[1], -1, attention.shape[3]))
    slots = layout.visual_slots[:, None, None, :].expand(-1, attention.shape[1], rows.shape[1], -1)
    expected = rater_scores(rows_attention.gather(3, slots), raters)
    torch.testing.assert_close(RecordingSparseVLM.scores[0], expected, atol=1e-6, rtol=0)


def test_sparsevlm_recycling_keeps_merged_tokens_at_original_positions(varied_model, batch2):
    out = generate(varied_model, batch2, SparseVLM(budget=5, token_recycling=True))
    first = out.pruning[0]
    assert first.kept > 8  # 8 kept by score, plus the merged representatives
    layout = out.past_key_values.layouts[1]
    prompt = prompt_layout(varied_model, batch2)
    for row in range(2):
        slots = layout.visual_slots[row]
        ids = layout.visual_ids[row, slots]
        expected = prompt.positions[row, prompt.visual_slots[row, ids]]
        assert torch.equal(layout.positions[row, slots], expected)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SparseVLM(budget=17), "larger than the image's 16"),
        (lambda: PDrop(budget=3), r"unreachable: pruning before layer 1 of 4 averages at least 4; reachable: 5\.\.16"),
        (lambda: PDrop(layers=(1, 2, 9)), "does not fit a decoder with 4 layers"),
        (lambda: FastVFinePruner(keep=4, num_heads=5), "exceeds the model's 4 attention heads"),
    ],
)
def test_settings_that_do_not_fit_the_model(rcpp_model, batch2, make, message):
    with pytest.raises(ValueError, match=message):
        generate(rcpp_model, batch2, make())


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: FastVFinePruner(head_strategy="loudest"), "head_strategy"),
        (lambda: FastVFinePruner(num_heads=0), "num_heads"),
        (lambda: SparseVLM(layers=(6, 2, 15)), "layers"),
        (lambda: SparseVLM(recycle_ratio=0.0), "recycle_ratio"),
        (lambda: PDrop(ratios=(0.25, 0.5, 0.125)), "ratios"),
        (lambda: PDrop(budget=0), "budget"),
    ],
)
def test_invalid_settings_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_presets_round_trip(tmp_path):
    for method in METHODS:
        method.to_yaml(tmp_path / "m.yaml")
        assert load_method(tmp_path / "m.yaml") == method
