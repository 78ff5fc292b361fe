"""VisPruner, CDPruner and VisionZip: their selections on hand-made inputs, the recorded vision attention, and the
tokens they hand the language model inside `generate`."""

import itertools

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    GenerationConfig,
    LlavaForConditionalGeneration,
)

from rcpp_hf import RCPPGenerationConfig, RCPPLlavaForConditionalGeneration
from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.engine.decoder import DecoderTap, run_decoder
from rcpp_hf.engine.pruning import PrefillPruningTap, PruneStage, check_stages
from rcpp_hf.engine.vision import feature_attention_layer
from rcpp_hf.methods import CDPruner, VisionZip, VisPruner, load_method
from rcpp_hf.methods.cdpruner import (
    conditional_kernel,
    dpp_greedy_map,
    fill_by_relevance,
    instruction_relevance,
)
from rcpp_hf.methods.visionzip import merge_contextual, visionzip_split
from rcpp_hf.methods.vispruner import important_tokens, remove_duplicates
from rcpp_hf.tiny import build_tokenizer
from tests.test_prefill_pruning import NUM_VISUAL, prompt_layout

METHODS = [VisPruner(budget=5), VisPruner(budget=6, important_ratio=0.0), CDPruner(budget=5), VisionZip(budget=7)]


@pytest.fixture(scope="module")
def varied_model(varied_tiny_path):
    return RCPPLlavaForConditionalGeneration.from_pretrained(varied_tiny_path, dtype=torch.float32).eval()


def generate(model, batch, method, max_new_tokens=6):
    config = RCPPGenerationConfig(rcpp=False, methods=[method], max_new_tokens=max_new_tokens, do_sample=False,
                                  return_dict_in_generate=True)  # fmt: skip
    return model.generate(**batch, generation_config=config)


# -- selections on hand-made inputs ---------------------------------------------------------------------------------
def test_cls_top_k_keeps_the_most_attended_tokens_in_rank_order():
    attention = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]])
    important, rest = important_tokens(attention, 2)
    assert important.tolist() == [[1, 3]] and rest.tolist() == [[4, 0, 2]]


def test_bipartite_deduplication_drops_the_most_duplicated_tokens():
    # Residual order 0..5 -> A = tokens 0, 2, 4 and B = 1, 3, 5. Token 0 duplicates 1, token 2 nearly duplicates 3,
    # token 4 is orthogonal to every B token. Keeping 4 drops the 2 A tokens most similar to B: 0 and 2.
    features = torch.tensor([
        [1.0, 0.0, 0.0], [1.0, 0.0, 0.0],   # 0, 1
        [0.0, 1.0, 0.1], [0.0, 1.0, 0.0],   # 2, 3
        [0.0, 0.0, 1.0], [0.0, 1.0, 0.0],   # 4, 5 (5 duplicates 3, but B tokens are never dropped this round)
    ])[None]  # fmt: skip
    kept = remove_duplicates(features, torch.arange(6)[None], keep=4)
    assert kept.tolist() == [[4, 1, 3, 5]]
    # Keeping 3: one round removes min(8, excess) = 3, i.e. all of A, however distinct token 4 is.
    assert remove_duplicates(features, torch.arange(6)[None], keep=3).tolist() == [[1, 3, 5]]


def brute_force_greedy(kernel, count):
    chosen = []
    for _ in range(count):
        gains = {j: torch.logdet(kernel[chosen + [j]][:, chosen + [j]]) for j in range(len(kernel)) if j not in chosen}
        chosen.append(max(gains, key=gains.get))
    return chosen


def test_dpp_greedy_map_matches_brute_force_on_a_6_token_kernel():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, 6, 4, generator=generator, dtype=torch.float64)
    relevance = torch.rand(2, 6, generator=generator, dtype=torch.float64) + 0.1
    kernel = conditional_kernel(features, relevance).double() + 1e-3 * torch.eye(6, dtype=torch.float64)
    for count in (1, 3, 4):
        chosen = dpp_greedy_map(kernel, count)
        for row in range(2):
            assert chosen[row].tolist() == brute_force_greedy(kernel[row], count)
    # On this kernel greedy also finds the exact MAP subset of 3 (the best of all 20).
    best = max(itertools.combinations(range(6), 3), key=lambda s: torch.logdet(kernel[0][list(s)][:, list(s)]))
    assert sorted(dpp_greedy_map(kernel, 3)[0].tolist()) == sorted(best)


def test_a_kernel_of_lower_rank_than_the_budget_keeps_exactly_the_budget():
    """Rank 2 (tokens 0, 1, 3 share one direction, 2, 4, 5 the other), 4 or 5 kept. Dyadic relevances keep every
    gain exact: greedy takes 1 (r = 1) and 4 (r = 0.875), then every gain is 0 and it stops; the free slots go to
    the unchosen tokens in decreasing relevance, 3 (0.75), 5 (0.625), 0 (0.5). A second, full-rank row runs all its
    steps as greedy does, and the batch keeps one count."""
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    relevance = torch.tensor([[0.5, 1.0, 0.25, 0.75, 0.875, 0.625]])
    generator = torch.Generator().manual_seed(3)
    full_rank = torch.randn(1, 6, 6, generator=generator)
    features = torch.stack([torch.nn.functional.pad(features, (0, 4)), full_rank[0]])
    relevance = torch.cat([relevance, torch.rand(1, 6, generator=generator) + 0.1])
    kernel = conditional_kernel(features, relevance)
    for keep, expected in ((4, [1, 4, 3, 5]), (5, [1, 4, 3, 5, 0])):
        greedy = dpp_greedy_map(kernel, keep)
        assert greedy[0].tolist() == [1, 4] + [-1] * (keep - 2)
        assert greedy[1].tolist() == brute_force_greedy(kernel[1].double(), keep)
        kept = fill_by_relevance(greedy, relevance)
        assert kept[0].tolist() == expected and kept[1].tolist() == greedy[1].tolist()
        assert all(len(set(row.tolist())) == keep for row in kept)
    # Every token of one feature: the first pick spends the rank; the rest are the most relevant others.
    flat = conditional_kernel(torch.ones(1, 6, 1), relevance[:1])
    assert fill_by_relevance(dpp_greedy_map(flat, 3), relevance[:1]).tolist() == [[1, 4, 3]]


def test_cdpruner_keeps_its_budget_when_the_image_features_have_low_rank(varied_model, batch2):
    """The projected features of every visual token replaced by one of two vectors (a flat image's case): each row
    keeps `budget` distinct tokens, as `kept` reports and the cache holds, 3 of them chosen by relevance."""

    def two_features(module, inputs, output):
        return output[:, torch.arange(output.shape[1]) % 2]

    hook = varied_model.model.multi_modal_projector.register_forward_hook(two_features)
    try:
        out = generate(varied_model, batch2, CDPruner(budget=5))
    finally:
        hook.remove()
    (record,) = out.pruning
    assert record.kept == 5 and out.past_key_values.num_visual_tokens == 5
    assert [len(set(row.tolist())) for row in record.kept_visual_ids] == [5, 5]
    assert record.details["relevance_filled"] == [3, 3]


def test_conditional_kernel_and_relevance_by_hand():
    features = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
    kernel = conditional_kernel(features, torch.tensor([[1.0, 0.5, 2.0]]))
    s = 2**-0.5
    torch.testing.assert_close(kernel[0], torch.tensor([[1.0, 0.0, 2 * s], [0.0, 0.25, s], [2 * s, s, 4.0]]))
    # Text = the first axis: cosines 1, 0, s -> minus -> min-max; the padded text token is ignored.
    relevance = instruction_relevance(features, torch.tensor([[[3.0, 0.0], [0.0, 5.0]]]), torch.tensor([[True, False]]))
    torch.testing.assert_close(relevance, torch.tensor([[1e-6, 1.0 + 1e-6, 1 - s + 1e-6]]))


def test_visionzip_merges_into_strided_targets_by_key_cosine():
    # 6 non-dominant tokens, 2 contextual: targets at places 0 and 3. Keys send 1, 2 to target 0 and 4, 5 to 3.
    keys = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [1.0, 0.2], [0.0, 1.0], [0.1, 1.0], [0.2, 0.9]]])
    features = torch.arange(6.0)[None, :, None].expand(1, 6, 2)
    targets, merged = merge_contextual(features, keys, 2)
    assert targets.tolist() == [0, 3]
    torch.testing.assert_close(merged[0, :, 0], torch.tensor([0.0 + (1 + 2) / 2, 3.0 + (4 + 5) / 2]))
    assert [visionzip_split(b) for b in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]


# -- the recorded vision attention ----------------------------------------------------------------------------------
def test_recorded_cls_attention_equals_eager(varied_tiny_path, varied_model, batch2):
    pixels = {"pixel_values": batch2["pixel_values"]}
    eager = LlavaForConditionalGeneration.from_pretrained(varied_tiny_path, attn_implementation="eager").eval()
    layer = feature_attention_layer(-2, 2)
    assert layer == 0 and feature_attention_layer(-2, 24) == 22
    with torch.no_grad():
        reference = eager.model.vision_tower(batch2["pixel_values"], output_attentions=True).attentions[layer]
        _, record = varied_model.family.encode_images_recorded(batch2["input_ids"], pixels, VisPruner())
    assert varied_model.model.vision_tower.config._attn_implementation == "sdpa"
    torch.testing.assert_close(record.cls_attention(), reference[:, :, 0, 1:], atol=1e-6, rtol=0)
    assert record.features.shape == (2, NUM_VISUAL, 32) and record.visual_keys().shape == (2, NUM_VISUAL, 8)


# -- inside generate ------------------------------------------------------------------------------------------------
class LayerZeroInput(DecoderTap):
    """Keeps the hidden states and layout that layer 0 runs on (after the pruner's tap)."""

    def before_layer(self, layer_idx, hidden, layout):
        if layer_idx == 0:
            self.hidden, self.layout = hidden, layout


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.describe())
def test_shapes_and_positions_handed_to_the_language_model(varied_model, batch2, method):
    out = generate(varied_model, batch2, method)
    (record,) = out.pruning
    assert record.layer == 0 and record.kept_visual_ids.shape == (2, method.budget)
    full_length = batch2["input_ids"].shape[1]
    cache = out.past_key_values
    assert [layer.keys.shape[2] for layer in cache.layers] == [full_length - NUM_VISUAL + method.budget + 5] * 4
    prompt = prompt_layout(varied_model, batch2)
    kept = (prompt.visual_ids < 0) | (prompt.visual_ids[:, :, None] == record.kept_visual_ids[:, None]).any(2)
    for row in range(2):  # original positions, image order, padding kept as padding
        assert torch.equal(cache.layouts[0].positions[row, :full_length - NUM_VISUAL + method.budget],
                           prompt.positions[row][kept[row]])  # fmt: skip


def test_visionzip_hands_projected_merged_features_at_the_targets(varied_model, batch1):
    method = VisionZip(budget=6, contextual=2)
    with torch.no_grad():
        pixels = {"pixel_values": batch1["pixel_values"]}
        encoded, vision = varied_model.family.encode_images_recorded(batch1["input_ids"], pixels, method)
        embeds = varied_model.family.embed_prompt(batch1["input_ids"], {}, encoded)

    tap, seen = PrefillPruningTap(method, varied_model.model.language_model, NUM_VISUAL, vision), LayerZeroInput()
    with torch.no_grad():
        run_decoder(varied_model.model.language_model, embeds, prompt_layout(varied_model, batch1),
                    VisualKVCache(config=varied_model.config), [tap, seen])  # fmt: skip
    scores = vision.cls_attention().sum(1)[0]
    dominant = scores.topk(4).indices
    others = torch.tensor([i for i in range(NUM_VISUAL) if i not in dominant.tolist()])
    targets, merged = merge_contextual(vision.features[:, others], vision.visual_keys()[:, others], 2)
    expected_ids = sorted(dominant.tolist() + others[targets].tolist())
    visual = seen.layout.visual_ids[0] >= 0
    assert seen.layout.visual_ids[0][visual].tolist() == expected_ids
    states = seen.hidden[0][visual]
    image_start = int((batch1["input_ids"][0] == varied_model.config.image_token_id).nonzero()[0])
    for place, token in enumerate(expected_ids):
        if token in dominant.tolist():  # a dominant token enters with its own projected features
            torch.testing.assert_close(states[place], embeds[0, image_start + token])
        else:
            which = others[targets].tolist().index(token)
            torch.testing.assert_close(states[place], vision.project(merged)[0, which], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["vispruner", "cdpruner", "visionzip"])
def test_budget_keeping_every_token_equals_vanilla(varied_tiny_path, varied_model, batch2, name):
    vanilla = LlavaForConditionalGeneration.from_pretrained(varied_tiny_path, dtype=torch.float32).eval()
    expected = vanilla.generate(**batch2, generation_config=GenerationConfig(max_new_tokens=6, do_sample=False))
    out = generate(varied_model, batch2, load_method(name, budget=NUM_VISUAL))
    assert torch.equal(out.sequences, expected) and out.pruning == []


def test_cdpruner_with_a_clip_model(tmp_path, monkeypatch, varied_model, batch2):
    tokenizer = build_tokenizer(320)
    clip_config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(tokenizer), max_position_embeddings=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(clip_config).save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    monkeypatch.setattr(varied_model.config, "_name_or_path", str(tmp_path / "clip"))  # LLaVA's tokenizer: the same
    out = generate(varied_model, batch2, CDPruner(budget=5, clip_model=str(tmp_path / "clip")))
    assert out.pruning[0].kept_visual_ids.shape == (2, 5)
    plain = generate(varied_model, batch2, CDPruner(budget=5))
    assert not torch.equal(out.pruning[0].kept_visual_ids, plain.pruning[0].kept_visual_ids)

    clip_config.vision_config.hidden_size = 48
    CLIPModel(clip_config).save_pretrained(tmp_path / "wide")
    tokenizer.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="CDPruner.clip_model: .* width 48"):
        generate(varied_model, batch2, CDPruner(budget=5, clip_model=str(tmp_path / "wide")))


# -- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: VisPruner(budget=0), "VisPruner.budget"),
        (lambda: VisPruner(important_ratio=1.5), "VisPruner.important_ratio"),
        (lambda: VisionZip(budget=8, contextual=8), "VisionZip.contextual"),
        (lambda: CDPruner(clip_model=""), "CDPruner.clip_model"),
    ],
)
def test_invalid_settings(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "method, message",
    [
        (VisPruner(budget=17), "VisPruner.budget = 17: is larger than the image's 16"),
        (VisionZip(vision_layer=2), "VisionZip.vision_layer = 2: is out of range for a vision tower of 2 layers"),
        (CDPruner(vision_layer=-3), "out of range"),
    ],
)
def test_methods_that_do_not_fit_the_model(varied_model, batch2, method, message):
    with pytest.raises(ValueError, match=message):
        generate(varied_model, batch2, method, max_new_tokens=2)


def test_only_stages_that_read_no_attention_act_before_layer_0():
    check_stages([PruneStage(0, 4)], 4, 16, "m", {0: None})
    with pytest.raises(ValueError, match="reads the attention of layer -1"):
        check_stages([PruneStage(0, 4)], 4, 16, "m", {0: -1})
    with pytest.raises(ValueError, match="vision feature layer 0 is the embeddings"):
        feature_attention_layer(0, 24)
