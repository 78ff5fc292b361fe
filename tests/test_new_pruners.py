"""DART, DivPrune and the downsampling control: their selections on hand-made inputs, the features they read
against the stock model's, the tokens they hand the decoder inside `generate`, and their settings. The registry's
contract (tests/test_method_contract.py) runs them too."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from rcpp_hf import RCPPGenerationConfig, RCPPLlavaForConditionalGeneration
from rcpp_hf.benchmark.suite import (
    BenchmarkSettings,
    format_report,
    run_speed_benchmark,
)
from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.engine.decoder import DecoderTap, run_decoder
from rcpp_hf.engine.pruning import PrefillPruningTap
from rcpp_hf.methods import DART, METHODS, DivPrune, Downsample, load_method
from rcpp_hf.methods.budget import published_fraction
from rcpp_hf.methods.dart import (
    dart_select,
    key_l1_norms,
    least_duplicated,
    pivot_tokens,
    split_picks,
)
from rcpp_hf.methods.divprune import cosine_distance, max_min_diversity
from rcpp_hf.methods.downsample import (
    average_pool,
    grid_side,
    pooled_side,
    pooling_windows,
    window_first_tokens,
)
from tests.conftest import row_alone
from tests.test_prefill_pruning import NUM_VISUAL, prompt_layout

NEW = ("dart", "divprune", "downsample")


@pytest.fixture(scope="module")
def varied_model(varied_tiny_path):
    return RCPPLlavaForConditionalGeneration.from_pretrained(varied_tiny_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def stock(varied_tiny_path):
    return LlavaForConditionalGeneration.from_pretrained(varied_tiny_path, dtype=torch.float32).eval()


def generate(model, batch, method, max_new_tokens=4):
    config = RCPPGenerationConfig(rcpp=False, methods=[method], max_new_tokens=max_new_tokens, do_sample=False,
                                  return_dict_in_generate=True)  # fmt: skip
    return model.generate(**batch, generation_config=config)


class LayerInput(DecoderTap):
    """Keeps the hidden states and layout that layer `layer` runs on (after the pruner's tap)."""

    def __init__(self, layer=0):
        self.layer = layer

    def before_layer(self, layer_idx, hidden, layout):
        if layer_idx == self.layer:
            self.hidden, self.layout = hidden, layout


def text_after_image_rows(batch, image_token_id):
    """Per row, the indices of the real entries after the last image token."""
    rows = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"].bool()):
        last = int((ids == image_token_id).nonzero().max())
        rows.append(torch.tensor([i for i in range(last + 1, ids.shape[0]) if mask[i]]))
    return rows


def image_rows(batch, image_token_id):
    return [(ids == image_token_id).nonzero()[:, 0] for ids in batch["input_ids"]]


# -- DART: pivots and duplicates by hand ----------------------------------------------------------------------------
def test_key_norms_are_l1_over_every_head():
    keys = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]], [[0.0, 3.0], [-1.0, -1.0]]]])  # (B=1, H_kv=2, S=2, d=2)
    assert key_l1_norms(keys).tolist() == [[6.0, 2.5]]


def test_pivots_are_the_largest_norms_in_index_order():
    norms = torch.tensor([1.0, 5.0, 3.0, 5.0, 0.0])
    assert pivot_tokens(norms, 2).tolist() == [1, 3]
    assert pivot_tokens(norms, 3).tolist() == [1, 2, 3]
    assert pivot_tokens(norms, 0).tolist() == []
    with pytest.raises(ValueError, match="count must be in"):
        pivot_tokens(norms, 6)


def test_picks_spread_the_budget_over_the_pivots():
    assert split_picks(10, 4) == [3, 3, 2, 2] and split_picks(0, 3) == [0, 0, 0] and split_picks(2, 4) == [1, 1, 0, 0]
    # LLaVA-1.5 at 128: 4 image pivots and 124 picks over 8 pivots keep exactly 128 (the repository: 4 + 8 * 16 = 132)
    assert 4 + sum(split_picks(128 - 4, 8)) == 128 and 4 + 8 * (128 // 8) == 132


def test_each_pivot_takes_the_least_similar_tokens_left():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7], [0.0, -1.0]])
    pivots = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    taken = torch.tensor([True, False, False, False, False])  # token 0 is an image pivot
    # pivot [1, 0]: cosines 0, -1, 0.707, 0 -> token 2 (-1), then 1 and 4 tie at 0 -> the lower index, 1.
    # pivot [0, 1]: of tokens 3 and 4 left, cosines 0.707 and -1 -> token 4.
    assert least_duplicated(features, pivots, [2, 1], taken).tolist() == [2, 1, 4]
    assert least_duplicated(features, pivots, [0, 0], taken).tolist() == []
    with pytest.raises(ValueError, match="5 picks asked, 4 visual tokens left"):
        least_duplicated(features, pivots, [5, 0], taken)


def test_dart_select_by_hand():
    # 6 visual tokens; keys rank 5 and 0 highest; the text token is the pivot [0, 1].
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.1, 0.9], [0.6, 0.8]])
    norms = torch.tensor([4.0, 1.0, 2.0, 0.5, 0.1, 9.0])
    text, text_norms = torch.tensor([[0.0, 1.0], [1.0, 1.0]]), torch.tensor([3.0, 1.0])
    # keep 5: image pivots 0 and 5; 3 picks over pivots (0, 5, text 0) = 1 each.
    # pivot 0 = [1, 0]: least similar of 1..4 is 3 ([-1, 0]); pivot 5 = [0.6, 0.8]: of 1, 2, 4 -> cos 0.62, 0.8,
    # 0.78 -> 1; text pivot [0, 1]: of 2, 4 -> 4 (0.99 < 1).
    kept, image = dart_select(features, norms, text, text_norms, 5, 2, 1)
    assert kept.tolist() == [0, 5, 3, 1, 4] and image.tolist() == [0, 5]
    # a budget below the image pivots keeps the top-norm pivots alone
    kept, image = dart_select(features, norms, text, text_norms, 1, 2, 1)
    assert kept.tolist() == [5] and image.tolist() == [5]
    # more text pivots than text: every text token is one
    kept, _ = dart_select(features, norms, text, text_norms, 6, 2, 5)
    assert sorted(kept.tolist()) == list(range(6))


@pytest.fixture
def varied_final_norm(varied_model, stock):
    """Both models' final norm weights drawn at random (the saved ones are all 1, which leaves cosines alike with
    or without the norm), restored afterwards."""
    weights = [model.model.language_model.norm.weight for model in (varied_model, stock)]
    saved = weights[0].detach().clone()
    drawn = torch.rand(saved.shape, generator=torch.Generator().manual_seed(1)) * 2 - 0.5
    with torch.no_grad():
        for weight in weights:
            weight.copy_(drawn)
    yield
    with torch.no_grad():
        for weight in weights:
            weight.copy_(saved)


def test_dart_reads_the_stock_models_hidden_states_and_keys(varied_model, stock, batch2, varied_final_norm):
    """The kept tokens are `dart_select` on what stock transformers computes: the hidden states entering layer K
    through the final norm, and layer K - 1's cached keys (after RoPE), row by row."""
    image_token = stock.config.image_token_id
    spans = list(zip(image_rows(batch2, image_token), text_after_image_rows(batch2, image_token)))
    for method in (DART(budget=7, pivot_image_tokens=2, pivot_text_tokens=2), DART(budget=9, layer=2), DART()):
        out = generate(varied_model, batch2, method)
        (record,) = out.pruning
        layer = method.pruning_layer(4)
        assert record.layer == layer and record.kept == method.resolve_stages(4, NUM_VISUAL)[0].keep
        positions = (batch2["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            reference = stock(**batch2, position_ids=positions, output_hidden_states=True, use_cache=True)
            features = stock.model.language_model.norm(reference.hidden_states[layer])
        norms = key_l1_norms(reference.past_key_values.layers[layer - 1].keys)
        for row, (image, text) in enumerate(spans):
            expected, pivots = dart_select(features[row, image], norms[row, image], features[row, text],
                                           norms[row, text], record.kept, method.pivot_image_tokens,
                                           method.pivot_text_tokens)  # fmt: skip
            assert sorted(record.kept_visual_ids[row].tolist()) == sorted(expected.tolist()), (method, row)
            assert record.details["image_pivots"][row] == pivots.tolist()
        assert record.details["text_pivots"] == [method.pivot_text_tokens] * 2


# -- DivPrune: max-min diversity ------------------------------------------------------------------------------------
def brute_force_max_min(distance, count):
    """The greedy max-min on a list of lists, as the repository states it: first the column whose second-smallest
    distance (its smallest is its own, 0) is largest, then the column whose smallest distance to the chosen rows is
    largest; ties to the lower index; chosen columns are skipped."""
    n = len(distance)
    columns = [[distance[i][j] for i in range(n)] for j in range(n)]
    second = [sorted(column)[1] for column in columns]
    chosen = [max(range(n), key=lambda j: (second[j], -j))]
    while len(chosen) < count:
        left = [j for j in range(n) if j not in chosen]
        chosen.append(max(left, key=lambda j: (min(distance[s][j] for s in chosen), -j)))
    return chosen


def test_max_min_diversity_matches_brute_force():
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(3, 7, 4, generator=generator, dtype=torch.float64)
    distance = cosine_distance(features).double()
    distance = distance - torch.diagonal(distance, dim1=1, dim2=2).diag_embed()  # an exact 0 on the diagonal
    for count in (1, 2, 4, 7):
        chosen = max_min_diversity(distance, count)
        for row in range(3):
            assert chosen[row].tolist() == brute_force_max_min(distance[row].tolist(), count), (count, row)


def test_cosine_distance_by_hand():
    features = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]])
    torch.testing.assert_close(cosine_distance(features)[0],
                               torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]]))  # fmt: skip


def test_max_min_diversity_keeps_distinct_tokens_among_duplicates():
    # two directions, three copies each: after one of each, every distance left is 0; still 4 distinct tokens
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    chosen = max_min_diversity(cosine_distance(features), 4)
    assert len(set(chosen[0].tolist())) == 4
    assert {int(features[0, chosen[0, 0], 0]), int(features[0, chosen[0, 1], 0])} == {0, 1}  # one of each first
    with pytest.raises(ValueError, match="count must be in"):
        max_min_diversity(cosine_distance(features), 7)
    assert max_min_diversity(torch.zeros(2, 1, 1), 1).tolist() == [[0], [0]]


def test_divprune_reads_the_stock_image_features(varied_model, stock, batch2, monkeypatch):
    """The features DivPrune selects on are `get_image_features`' projected features, and it keeps the brute-force
    greedy's tokens on them."""
    seen = {}
    features = DivPrune.features

    def record(ctx):
        seen["features"] = features(ctx)
        return seen["features"]

    monkeypatch.setattr(DivPrune, "features", staticmethod(record))
    out = generate(varied_model, batch2, DivPrune(budget=5))
    with torch.no_grad():
        encoded = stock.model.get_image_features(pixel_values=batch2["pixel_values"], return_dict=True)
    expected = torch.stack(list(encoded.pooler_output))
    torch.testing.assert_close(seen["features"], expected, atol=1e-6, rtol=0)
    (record,) = out.pruning
    assert record.layer == 0 and record.kept == 5
    for row in range(2):
        greedy = brute_force_max_min(cosine_distance(expected[row : row + 1])[0].tolist(), 5)
        assert record.kept_visual_ids[row].tolist() == sorted(greedy)


def test_divprune_keeps_its_budget_of_distinct_tokens_on_duplicate_features(varied_model, batch2):
    """Every projected feature replaced by one of two vectors: each row still keeps `budget` distinct tokens, as
    `kept` reports and the cache holds."""

    def two_features(module, inputs, output):
        return output[:, torch.arange(output.shape[1]) % 2]

    hook = varied_model.model.multi_modal_projector.register_forward_hook(two_features)
    try:
        out = generate(varied_model, batch2, DivPrune(budget=5))
    finally:
        hook.remove()
    (record,) = out.pruning
    assert record.kept == 5 and out.past_key_values.num_visual_tokens == 5
    assert [len(set(row.tolist())) for row in record.kept_visual_ids] == [5, 5]


# -- downsample: windows, positions, pooled states ------------------------------------------------------------------
def test_pooled_grid_is_the_largest_square_within_the_budget():
    assert [pooled_side(n, 24) for n in (64, 128, 144, 192, 576, 1)] == [8, 11, 12, 13, 24, 1]
    assert [pooled_side(n, 10) for n in (11, 22, 33, 100)] == [3, 4, 5, 10]
    assert grid_side(576) == 24 and grid_side(16) == 4 and grid_side(15) is None
    kept = {count: load_method(f"downsample_{count}of576").resolve_stages(32, 576)[0].keep for count in (64, 128, 192)}
    assert kept == {64: 64, 128: 121, 192: 169}
    assert Downsample(budget=144).resolve_stages(32, 576)[0].keep == 144  # 2 x 2 windows
    with pytest.raises(ValueError, match="downsample: the image's 15 visual tokens do not form a square grid"):
        Downsample(budget=4).resolve_stages(4, 15)


def test_pooling_windows_and_their_first_tokens():
    assert pooling_windows(4, 2) == [(0, 2), (2, 4)]
    assert pooling_windows(24, 8) == [(3 * i, 3 * i + 3) for i in range(8)]  # 3 x 3 windows
    assert pooling_windows(10, 3) == [(0, 4), (3, 7), (6, 10)]  # overlapping by one token
    assert window_first_tokens(4, 2).tolist() == [0, 2, 8, 10]
    assert window_first_tokens(10, 3).tolist() == [0, 3, 6, 30, 33, 36, 60, 63, 66]
    assert window_first_tokens(24, 12).tolist() == [48 * r + 2 * c for r in range(12) for c in range(12)]
    starts = window_first_tokens(24, 11)
    assert starts.tolist() == sorted(set(starts.tolist())) and len(starts) == 121


@pytest.mark.parametrize("side, pooled", [(4, 2), (10, 3), (24, 11), (4, 4)])
def test_average_pool_is_the_mean_of_each_window(side, pooled):
    generator = torch.Generator().manual_seed(side)
    features = torch.randn(2, side * side, 3, generator=generator)
    pooled_features = average_pool(features, side, pooled)
    windows = pooling_windows(side, pooled)
    grid = features.view(2, side, side, 3)
    expected = torch.stack([grid[:, r0:r1, c0:c1].mean(dim=(1, 2)) for r0, r1 in windows for c0, c1 in windows], 1)
    torch.testing.assert_close(pooled_features, expected)
    with pytest.raises(ValueError, match="do not form a"):
        average_pool(features[:, 1:], side, pooled)


@pytest.mark.parametrize("pool_on", ["vision", "projected"])
def test_downsample_hands_pooled_states_at_the_windows_first_positions(varied_model, batch2, pool_on):
    """2 x 2 windows on the tiny 4 x 4 image: layer 0 gets 4 visual entries at tokens 0, 2, 8, 10, each the window's
    mean (of the vision features, then projected; or of the projected features), at the token's original position."""
    method = Downsample(budget=5, pool_on=pool_on)  # the largest square within 5 is 2 x 2
    with torch.no_grad():
        pixels = {"pixel_values": batch2["pixel_values"]}
        encoded, vision = varied_model.family.encode_images_recorded(batch2["input_ids"], pixels, method)
        embeds = varied_model.family.embed_prompt(batch2["input_ids"], {}, encoded)
    tap, seen = PrefillPruningTap(method, varied_model.model.language_model, NUM_VISUAL, vision), LayerInput()
    layout = prompt_layout(varied_model, batch2)
    with torch.no_grad():
        run_decoder(varied_model.model.language_model, embeds, layout, VisualKVCache(config=varied_model.config),
                    [tap, seen])  # fmt: skip
    (record,) = tap.records
    assert record.kept == 4 and record.details == {"grid": (2, 2), "requested": 5}
    assert record.kept_visual_ids.tolist() == [[0, 2, 8, 10]] * 2
    windows = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    for row, image in enumerate(image_rows(batch2, varied_model.config.image_token_id)):
        visual = seen.layout.visual_ids[row] >= 0
        if pool_on == "vision":
            expected = vision.project(torch.stack([vision.features[row, w].mean(0) for w in windows]))
        else:
            expected = torch.stack([embeds[row, image[w]].mean(0) for w in windows])
        torch.testing.assert_close(seen.hidden[row][visual], expected, atol=1e-5, rtol=0)
        assert seen.layout.positions[row][visual].tolist() == layout.positions[row, image[[0, 2, 8, 10]]].tolist()
        assert seen.layout.visual_ids[row][visual].tolist() == [0, 2, 8, 10]


def test_downsample_in_generate_reports_the_pooled_count(varied_model, batch2):
    out = generate(varied_model, batch2, Downsample(budget=0.6))  # 10 of 16 -> 3 x 3 = 9
    (record,) = out.pruning
    assert record.kept == 9 and out.past_key_values.num_visual_tokens == 9
    assert record.details == {"grid": (3, 3), "requested": 10}
    assert window_first_tokens(4, 3).tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert record.kept_visual_ids.tolist() == [window_first_tokens(4, 3).tolist()] * 2


# -- every new method -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [
    DART(budget=6), DART(budget=7, layer=2, pivot_image_tokens=1, pivot_text_tokens=3), DivPrune(budget=6),
    Downsample(budget=9), Downsample(budget=4, pool_on="projected"),
], ids=lambda m: m.describe())  # fmt: skip
def test_a_batch_row_keeps_what_it_keeps_alone(varied_model, batch2, method):
    batched = generate(varied_model, batch2, method)
    for row in range(2):
        alone = generate(varied_model, row_alone(batch2, row), method)
        assert batched.pruning[0].kept_visual_ids[row].tolist() == alone.pruning[0].kept_visual_ids[0].tolist()
        distinct = len(set(alone.pruning[0].kept_visual_ids[0].tolist()))
        assert batched.pruning[0].kept == alone.pruning[0].kept == distinct


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DART(budget=0), "DART.budget = 0: must be"),
        (lambda: DART(budget=1.0), "DART.budget = 1.0: must be"),
        (lambda: DART(layer=0), "DART.layer = 0: must be None or an integer >= 1"),
        (lambda: DART(layer=True), "DART.layer = True"),
        (lambda: DART(pivot_image_tokens=-1), "DART.pivot_image_tokens = -1: must be an integer >= 0"),
        (lambda: DART(pivot_text_tokens=2.0), "DART.pivot_text_tokens = 2.0"),
        (lambda: DART(pivot_image_tokens=0, pivot_text_tokens=0), "DART.pivot_text_tokens = 0: .*cannot both be 0"),
        (lambda: DivPrune(budget=-2), "DivPrune.budget = -2"),
        (lambda: DivPrune(budget="64"), "DivPrune.budget = '64'"),
        (lambda: Downsample(budget=True), "Downsample.budget = True"),
        (lambda: Downsample(pool_on="pixels"), "Downsample.pool_on = 'pixels': must be one of"),
        (lambda: DART(layer=4).resolve_stages(4, 16), "DART.layer = 4: must lie below this model's 4 decoder layers"),
        (lambda: DART(budget=17).resolve_stages(4, 16), "DART.budget = 17: is larger than the image's 16"),
        (lambda: DivPrune(budget=17).resolve_stages(4, 16), "DivPrune.budget = 17: is larger than the image's 16"),
        (lambda: Downsample(budget=17).resolve_stages(4, 16), "Downsample.budget = 17: is larger than the image's 16"),
    ],
)
def test_bad_settings_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_presets_load_by_name_at_the_published_fractions():
    for name in NEW:
        for count in (64, 128, 192):
            method = load_method(f"{name}_{count}of576")
            assert method == load_method(name, budget=published_fraction(count))


def test_compare_rows_and_bench_flops_include_them():
    from rcpp_hf.shapesworld.compare import (
        BUDGETS,
        comparison_settings,
        runs_with_defaults,
    )

    assert all(runs_with_defaults(name) for name in NEW)
    rows = [setting.name for setting in comparison_settings(list(NEW), BUDGETS)]
    assert rows == [f"{name}-{label}" for name in NEW for label in ("0.1111", "0.2222", "0.3333")]
    settings = BenchmarkSettings(shape="tiny", methods=("vanilla", *NEW), budget=0.25, new_tokens=4, repeats=1,
                                 early_steps=2, late_steps=2)  # fmt: skip
    report = run_speed_benchmark(settings)
    for name in NEW:
        assert 0 < report["methods"][name]["prefill_flops_ratio"] < 1, name
        assert report["methods"][name]["method"]["budget"] == 0.25
    assert all(name in format_report(report) for name in NEW)


def test_they_are_registered_prefill_pruners():
    assert all(METHODS[name].kind == "prefill_pruner" for name in NEW)
    assert not DART.reads_vision and not DivPrune.reads_vision and Downsample.reads_vision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_they_run_in_half_precision(varied_tiny_path, batch2, dtype):
    model = RCPPLlavaForConditionalGeneration.from_pretrained(varied_tiny_path, dtype=dtype).eval()
    inputs = {**batch2, "pixel_values": batch2["pixel_values"].to(dtype)}
    for method, kept in ((DART(budget=7), 7), (DivPrune(budget=5), 5), (Downsample(budget=4), 4),
                         (Downsample(budget=9, pool_on="projected"), 9)):  # fmt: skip
        out = generate(model, inputs, method)
        assert out.pruning[0].kept == kept and out.past_key_values.num_visual_tokens == kept, method
        assert out.past_key_values.layers[-1].keys.dtype == dtype
