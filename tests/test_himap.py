"""HiMAP, hard and with token condensation, inside `generate` on the engine's prefill pruning."""


import pytest
import torch
from transformers import GenerationConfig, LlavaForConditionalGeneration

from rcpp_hf import RCPPGenerationConfig, RCPPLlavaForConditionalGeneration
from rcpp_hf.engine.attention import prompt_keys
from rcpp_hf.engine.condensation import condense
from rcpp_hf.engine.decoder import DecoderTap
from rcpp_hf.engine.layout import text_after_image
from rcpp_hf.engine.pruning import PrefillPruningTap
from rcpp_hf.methods import HiMAP, load_method
from rcpp_hf.methods.himap import image_to_image_scores, text_to_image_scores
from tests.test_prefill_pruning import NUM_VISUAL, prefill, prompt_layout

VARIANTS = [
    HiMAP(),
    HiMAP(use_token_condensation=True, condensation_strategy="fps"),
    HiMAP(use_token_condensation=True, condensation_strategy="connectivity", condensation_num_heads=4),
]


@pytest.fixture(scope="module")
def varied_model(varied_tiny_path):
    return RCPPLlavaForConditionalGeneration.from_pretrained(varied_tiny_path, dtype=torch.float32).eval()


def generate(model, batch, method, **kwargs):
    config = RCPPGenerationConfig(rcpp=False, methods=[method], do_sample=False, return_dict_in_generate=True,
                                  **{"max_new_tokens": 6, **kwargs})  # fmt: skip
    return model.generate(**batch, generation_config=config)


def test_defaults_scale_with_depth_and_tokens():
    assert [(s.layer, s.keep) for s in HiMAP().resolve_stages(32, 576)] == [(2, 288), (8, 72)]
    assert [(s.layer, s.keep) for s in HiMAP().resolve_stages(12, 576)] == [(1, 288), (3, 72)]
    assert [(s.layer, s.keep) for s in HiMAP().resolve_stages(4, NUM_VISUAL)] == [(1, 8), (2, 2)]
    assert [(s.layer, s.keep) for s in HiMAP(txt_layer=3, txt_rank=5, image_stage=False).resolve_stages(4, 16)] == [
        (3, 5)
    ]


class RecordingHiMAP(HiMAP):
    """HiMAP that keeps each stage's scores (in the class: `generate` works on a copy of its config)."""

    scores: list = []

    def select(self, ctx):
        columns = super().select(ctx)
        RecordingHiMAP.scores.append(ctx.scores)
        return columns


@pytest.mark.parametrize("stage", ["text", "image"])
def test_scores_equal_eager_attention(varied_tiny_path, batch2, stage):
    """Stage 1: the text-after-image rows of layer K1 - 1; stage 2 (stage 1 keeping all, so that it sees the prompt
    unpruned): the image block of layer K2 - 1; both against the eager attentions transformers reports."""
    model = RCPPLlavaForConditionalGeneration.from_pretrained(varied_tiny_path).eval()
    method = RecordingHiMAP() if stage == "text" else RecordingHiMAP(txt_rank=NUM_VISUAL, img_rank=4)
    RecordingHiMAP.scores = []
    generate(model, batch2, method)
    read = method.resolve_stages(4, NUM_VISUAL)[0 if stage == "text" else 1].layer - 1

    eager = LlavaForConditionalGeneration.from_pretrained(varied_tiny_path, attn_implementation="eager").eval()
    with torch.no_grad():
        attention = eager(**batch2, output_attentions=True).attentions[read]  # (B, H, S, S)
    layout = prompt_layout(model, batch2)
    rows, real = text_after_image(layout) if stage == "text" else (layout.visual_slots, None)
    heads = attention.shape[1]
    picked = attention.gather(2, rows[:, None, :, None].expand(-1, heads, -1, attention.shape[3]))
    picked = picked.gather(3, layout.visual_slots[:, None, None, :].expand(-1, heads, rows.shape[1], -1))
    expected = text_to_image_scores(picked, real) if stage == "text" else image_to_image_scores(picked)
    assert len(RecordingHiMAP.scores) == (2 if stage == "text" else 1)  # stage 1 keeping all is skipped
    torch.testing.assert_close(RecordingHiMAP.scores[0], expected, atol=1e-5, rtol=0)  # sums of up to 20 rows


def test_text_score_by_hand():
    # 2 heads, 2 text rows (the second is padding), 3 image tokens.
    attention = torch.tensor([[[[0.1, 0.2, 0.3], [9.0, 9.0, 9.0]], [[0.3, 0.0, 0.1], [9.0, 9.0, 9.0]]]])
    real = torch.tensor([[True, False]])
    torch.testing.assert_close(text_to_image_scores(attention, real), torch.tensor([[0.2, 0.1, 0.2]]))
    image = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]], [[1.0, 0.0], [0.1, 0.9]]]])
    torch.testing.assert_close(image_to_image_scores(image), torch.tensor([[1.3, 0.7]]))


@pytest.mark.parametrize("method", VARIANTS, ids=lambda m: m.describe())
def test_both_stages_shrink_the_cache_and_keep_original_positions(varied_model, batch2, method):
    out = generate(varied_model, batch2, method)
    stages = method.resolve_stages(4, NUM_VISUAL)
    assert [(r.layer, r.kept) for r in out.pruning] == [(s.layer, s.keep) for s in stages]
    first, second = out.pruning
    assert set(second.kept_visual_ids[0].tolist()) <= set(first.kept_visual_ids[0].tolist())
    cache = out.past_key_values
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths[0] - lengths[1] == NUM_VISUAL - 8 and lengths[1] - lengths[2] == 8 - 2 and lengths[3] == lengths[2]
    prompt = prompt_layout(varied_model, batch2)
    for layer, record in ((1, first), (2, second), (3, second)):
        layout = cache.layouts[layer]
        for row in range(2):
            slots = layout.visual_slots[row]
            ids = layout.visual_ids[row, slots]
            assert torch.equal(ids, record.kept_visual_ids[row])  # output order follows the positions
            assert torch.equal(layout.positions[row, slots], prompt.positions[row, prompt.visual_slots[row, ids]])
            text = (layout.visual_ids[row] < 0) & layout.valid[row]
            prompt_text = (prompt.visual_ids[row] < 0) & prompt.valid[row]
            text_positions = layout.positions[row][text][: int(prompt_text.sum())]  # the prompt's, then generated
            assert torch.equal(text_positions, prompt.positions[row][prompt_text])


class Entering(DecoderTap):
    """Records the hidden states entering one layer (placed before the pruning tap: the unpruned entries)."""

    def __init__(self, layer):
        self.layer, self.hidden = layer, None

    def before_layer(self, layer_idx, hidden, layout):
        if layer_idx == self.layer:
            self.hidden = hidden


@pytest.mark.parametrize("strategy", ["fps", "connectivity"])
def test_condensed_state_is_written_at_the_centroid(varied_model, batch2, strategy):
    """The keys layer K1 caches at a centroid's entry are those of the condensed state at the centroid's original
    position; every other visual token is gone."""
    method = HiMAP(use_token_condensation=True, condensation_strategy=strategy, image_stage=False)
    language_model = varied_model.model.language_model
    (stage,) = method.resolve_stages(4, NUM_VISUAL)
    entering = Entering(stage.layer)
    tap = PrefillPruningTap(method, language_model, NUM_VISUAL)
    _, _, cache = prefill(varied_model, batch2, [entering, tap])

    prompt = prompt_layout(varied_model, batch2)
    layer = language_model.layers[stage.layer]
    visual = entering.hidden.gather(1, prompt.visual_slots[:, :, None].expand(-1, -1, entering.hidden.shape[-1]))
    with torch.no_grad():
        keys = layer.self_attn.k_proj(layer.input_layernorm(visual))
    centroids, condensed = condense(keys, visual, stage.keep, strategy, num_heads=2, temperature=0.1)
    assert torch.equal(tap.records[0].kept_visual_ids, centroids)
    positions = prompt.positions.gather(1, prompt.visual_slots.gather(1, centroids))
    cos, sin = language_model.rotary_emb(condensed, position_ids=positions)
    with torch.no_grad():
        expected = prompt_keys(layer, condensed, cos, sin)
    layout = cache.layouts[stage.layer]
    cached = cache.layers[stage.layer].keys
    got = cached.gather(2, layout.visual_slots[:, None, :, None].expand(-1, cached.shape[1], -1, cached.shape[3]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(condensed, visual.gather(1, centroids[:, :, None].expand_as(condensed)), atol=1e-3)


@pytest.mark.parametrize("method", VARIANTS, ids=lambda m: m.describe())
def test_left_padded_batch_decodes_as_each_row_alone(varied_model, processor, method):
    """Decoding with the shrunk cache: each row of the left-padded batch of 2 generates what it generates alone."""
    from tests.conftest import PROMPTS, make_images

    images = make_images(2)
    batch = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    out = generate(varied_model, batch, method, max_new_tokens=8, output_scores=True)
    for row in range(2):
        alone = processor(images=images[row : row + 1], text=PROMPTS[row : row + 1], return_tensors="pt")
        single = generate(varied_model, alone, method, max_new_tokens=8, output_scores=True)
        generated = single.sequences[0, alone["input_ids"].shape[1] :]  # it may stop early at eos
        start = batch["input_ids"].shape[1]
        assert torch.equal(out.sequences[row, start : start + len(generated)], generated)
        for step, scores in enumerate(single.scores):
            torch.testing.assert_close(out.scores[step][row], scores[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "method",
    [HiMAP(txt_rank=NUM_VISUAL, img_rank=NUM_VISUAL),
     HiMAP(txt_rank=NUM_VISUAL, img_rank=NUM_VISUAL, use_token_condensation=True)],  # fmt: skip
    ids=["hard", "condensation"],
)
def test_keeping_everything_is_vanilla(tiny_path, rcpp_model, batch2, method):
    vanilla = LlavaForConditionalGeneration.from_pretrained(tiny_path, dtype=torch.float32).eval()
    expected = vanilla.generate(**batch2, generation_config=GenerationConfig(max_new_tokens=8, do_sample=False))
    config = RCPPGenerationConfig(rcpp=False, methods=[method], max_new_tokens=8, do_sample=False)
    assert torch.equal(rcpp_model.generate(**batch2, generation_config=config), expected)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: HiMAP(txt_rank=4, img_rank=8), "img_rank"),
        (lambda: HiMAP(txt_layer=3, img_layer=2), "img_layer"),
        (lambda: HiMAP(txt_layer=0), "txt_layer"),
        (lambda: HiMAP(condensation_strategy="kmeans"), "condensation_strategy"),
        (lambda: HiMAP(fps_start="first"), "fps_start"),
        (lambda: HiMAP(condensation_temperature=0), "condensation_temperature"),
        (lambda: HiMAP(use_token_condensation="yes"), "use_token_condensation"),
        (lambda: load_method({"method": "himap", "hmap_v_attn_txt_rank": 4, "txt_rank": 5}), "another name"),
    ],
)
def test_invalid_settings_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


@pytest.mark.parametrize(
    "method, message",
    [
        (HiMAP(txt_rank=17), "larger than the image's 16"),
        (HiMAP(img_rank=10), "more than txt_rank's 8"),  # the default R1 is 8 of 16 here
        (HiMAP(txt_layer=1, img_layer=4), "does not fit a decoder with 4 layers"),
        (HiMAP(img_layer=1), "stage layers must increase"),  # the default K1 is 1 here
        (HiMAP(use_token_condensation=True, condensation_num_heads=3), "divide the feature width"),
    ],
)
def test_settings_that_do_not_fit_the_model(rcpp_model, batch2, method, message):
    with pytest.raises(ValueError, match=message):
        generate(rcpp_model, batch2, method)


def test_seed_names_and_presets():
    seed = {"method": "himap", "hmap_v_sys_length": 35, "hmap_v_img_length": 576, "hmap_v_attn_txt_layer": 5,
            "hmap_v_attn_txt_rank": 100, "hmap_v_attn_img_layer": 10, "hmap_v_attn_img_rank": 50,
            "use_token_condensation": True}  # fmt: skip
    assert load_method(seed) == HiMAP(txt_layer=5, txt_rank=100, img_layer=10, img_rank=50, use_token_condensation=True)
    assert load_method("himap") == HiMAP()
    assert load_method("himap_fps") == HiMAP(use_token_condensation=True, condensation_strategy="fps")
    assert load_method("himap_connectivity") == HiMAP(use_token_condensation=True)


def test_presets_round_trip(tmp_path):
    for method in VARIANTS:
        method.to_yaml(tmp_path / "m.yaml")
        assert load_method(tmp_path / "m.yaml") == method
