"""The engine's explicit decoder and the physical drop of prefill pruning, checked against transformers and masking."""

import copy

import pytest
import torch
from transformers import DynamicCache, GenerationConfig, LlavaForConditionalGeneration

from rcpp_hf import RCPPGenerationConfig, RCPPLlavaForConditionalGeneration
from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.engine.decoder import DecoderTap, run_decoder
from rcpp_hf.engine.layout import TokenLayout
from rcpp_hf.engine.pruning import (
    PrefillPruningTap,
    PruneContext,
    PruneStage,
    equivalent_keep,
    scale_layer,
)
from rcpp_hf.methods import FastV, load_method

ATOL = 1e-5
NUM_VISUAL = 16  # the tiny model's image tokens


@pytest.fixture(scope="module")
def varied_model(varied_tiny_path):
    return RCPPLlavaForConditionalGeneration.from_pretrained(varied_tiny_path, dtype=torch.float32).eval()


def prompt_layout(model, batch):
    """The prompt's layout as the stock model positions it: 1-D from the attention mask, and for M-RoPE models
    (Qwen2-VL) the 3-D positions and deltas of the stock `get_rope_index`."""
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    image = batch["input_ids"] == model.config.image_token_id
    mrope = delta = None
    if "mm_token_type_ids" in batch:
        mrope, delta = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                  batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    return TokenLayout.prompt(positions, batch["attention_mask"].bool(), image, mrope=mrope, mrope_delta=delta)


def prefill(model, batch, taps=()):
    cache = VisualKVCache(config=model.config)
    with torch.no_grad():
        images = {name: value for name, value in batch.items() if name not in ("input_ids", "attention_mask")}
        embeds = model.family.embed_prompt(batch["input_ids"], images)
        hidden, layout = run_decoder(model.family.language_model, embeds, prompt_layout(model, batch), cache, list(taps))
    return hidden, layout, cache


def decode(model, cache, tokens, positions, taps=()):
    """One decode step of `tokens` (B, 1) at `positions` (B, 1) -> logits (B, vocab); with M-RoPE, at
    `positions` + the prompt's delta in all three rows (as the stock model decodes)."""
    delta = cache.layouts[-1].mrope_delta
    mrope = None if delta is None else (positions + delta).expand(3, -1, -1)
    rows = TokenLayout(positions, torch.ones_like(positions, dtype=torch.bool), torch.full_like(positions, -1),
                       mrope=mrope, mrope_delta=delta)  # fmt: skip
    with torch.no_grad():
        embeds = model.family.language_model.embed_tokens(tokens)
        hidden, _ = run_decoder(model.family.language_model, embeds, rows, cache, list(taps))
    cache.append_entries(positions)
    return model.lm_head(hidden)[:, -1]


class MaskFrom(DecoderTap):
    """Reference for the physical drop: every entry is computed and cached, but from each stage's layer on no query
    attends to the visual tokens that stage dropped (by visual id); a dropped entry still attends to itself (no empty
    rows). `stages`: (layer, dropped (B, V) bool) pairs, layers increasing."""

    def __init__(self, stages):
        self.stages = list(stages)

    @classmethod
    def records(cls, records, num_visual):
        """The stages of a pruner's `PruneRecord`s: each drops what it did not keep (ids of -1 pad a row that kept
        fewer than another)."""
        def dropped(ids):
            ids = torch.where(ids >= 0, ids, num_visual)  # padding lands in a column cut off below
            return torch.ones(ids.shape[0], num_visual + 1, dtype=torch.bool).scatter(1, ids, False)[:, :num_visual]

        return cls((record.layer, dropped(record.kept_visual_ids)) for record in records)

    def layer_mask(self, layer_idx, past, queries):
        full = queries if past is None else TokenLayout(
            torch.cat([past.positions, queries.positions], 1),
            torch.cat([past.valid, queries.valid], 1),
            torch.cat([past.visual_ids, queries.visual_ids], 1),
        )
        ids = full.visual_ids
        hidden_key = torch.zeros_like(ids, dtype=torch.bool)
        for layer, dropped in self.stages:  # the last stage at or before this layer holds
            if layer_idx >= layer:
                hidden_key = (ids >= 0) & dropped.gather(1, ids.clamp_min(0))
        num_keys, num_queries = full.seq_len, queries.seq_len
        causal = torch.ones(num_queries, num_keys, dtype=torch.bool).tril(num_keys - num_queries)
        mask = causal[None] & full.valid[:, None, :] & ~hidden_key[:, None, :]
        mask[:, :, num_keys - num_queries :] |= torch.eye(num_queries, dtype=torch.bool)[None]
        return mask[:, None]


# -- the explicit decoder is transformers' own forward -------------------------------------------------------------
def test_run_decoder_is_bit_identical_to_the_language_model(rcpp_model, batch2):
    hidden, _, cache = prefill(rcpp_model, batch2)
    reference_cache = DynamicCache(config=rcpp_model.config)
    positions = prompt_layout(rcpp_model, batch2).positions
    with torch.no_grad():
        reference = rcpp_model.model(**batch2, position_ids=positions, past_key_values=reference_cache, use_cache=True)
    assert torch.equal(hidden, reference.last_hidden_state)
    token, next_position = torch.tensor([[7], [9]]), positions[:, -1:] + 1
    logits = decode(rcpp_model, cache, token, next_position)
    mask = torch.cat([batch2["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        step = rcpp_model(input_ids=token, attention_mask=mask, position_ids=next_position,
                          past_key_values=reference_cache, use_cache=True)  # fmt: skip
    assert torch.equal(logits, step.logits[:, -1])


# -- FastV's selection on hand-made attention ---------------------------------------------------------------------
class FixedAttention:
    """Stands in for a recorded layer: returns the given probabilities (B, H, q, S) for any rows."""

    def __init__(self, probs):
        self.probs_value = probs

    def probs(self, rows, key_mask):
        return self.probs_value[:, :, : rows.shape[1]]


def hand_context(probs, keep):
    # 2 text entries, 4 visual (ids 0..3), 1 text entry; the last entry is the querying prompt token.
    visual_ids = torch.tensor([[-1, -1, 0, 1, 2, 3, -1]])
    layout = TokenLayout(torch.arange(7)[None], torch.ones(1, 7, dtype=torch.bool), visual_ids)
    return PruneContext(PruneStage(layer=1, keep=keep), torch.zeros(1, 7, 4), layout, FixedAttention(probs), None)


def test_fastv_keeps_the_most_attended_image_tokens():
    # Two heads; the last row's attention over the 7 entries. Head mean on the image: [0.15, 0.05, 0.3, 0.1].
    probs = torch.tensor([[[[0.1, 0.1, 0.2, 0.0, 0.4, 0.1, 0.1]], [[0.2, 0.2, 0.1, 0.1, 0.2, 0.1, 0.1]]]])
    ctx = hand_context(probs, keep=2)
    fastv = FastV(keep=2)
    torch.testing.assert_close(fastv.score(ctx), torch.tensor([[0.15, 0.05, 0.3, 0.1]]))
    assert sorted(fastv.select(ctx)[0].tolist()) == [0, 2]


def test_fastv_budget_is_the_average_over_layers():
    # FinePruner's R_dict for 7B at K = 2: 192 -> 166, 128 -> 98, 64 -> 30.
    assert [equivalent_keep(b, 576, 2, 32) for b in (192, 128, 64)] == [166, 98, 30]
    assert FastV(budget=128).resolve_stages(32, 576) == [PruneStage(layer=2, keep=98)]
    assert scale_layer(2, 32) == 2 and scale_layer(2, 12) == 1 and scale_layer(16, 12) == 6


# -- physical drop against masking, and against vanilla ------------------------------------------------------------
@pytest.mark.parametrize("query", ["last", "all"])
def test_physical_drop_equals_masking(varied_model, batch2, query):
    fastv = FastV(keep=5, layer=2, query=query)
    tap = PrefillPruningTap(fastv, varied_model.model.language_model, NUM_VISUAL)
    hidden, layout, cache = prefill(varied_model, batch2, [tap])
    (record,) = tap.records
    assert record.layer == 2 and record.kept_visual_ids.shape == (2, 5)

    # The layers from 2 on hold only the kept visual tokens, at their original positions.
    full_length = batch2["input_ids"].shape[1]
    assert [layer.keys.shape[2] for layer in cache.layers] == [full_length] * 2 + [full_length - 11] * 2
    prompt = prompt_layout(varied_model, batch2)
    kept_entries = (prompt.visual_ids < 0) | (prompt.visual_ids[:, :, None] == record.kept_visual_ids[:, None]).any(2)
    for row in range(2):
        assert torch.equal(cache.layouts[3].positions[row], prompt.positions[row][kept_entries[row]])

    mask = MaskFrom.records(tap.records, NUM_VISUAL)
    masked_hidden, _, masked_cache = prefill(varied_model, batch2, [mask])
    torch.testing.assert_close(hidden[:, -1], masked_hidden[:, -1], atol=ATOL, rtol=0)
    assert not torch.allclose(hidden[:, -1], prefill(varied_model, batch2)[0][:, -1], atol=1e-3), "pruning must matter"

    # Decoding continues at logical positions and attends per layer to what that layer cached.
    token, position = torch.tensor([[7], [9]]), prompt.positions[:, -1:] + 1
    for _ in range(3):
        pruned_logits = decode(varied_model, cache, token, position)
        masked_logits = decode(varied_model, masked_cache, token, position, [mask])
        torch.testing.assert_close(pruned_logits, masked_logits, atol=ATOL, rtol=0)
        token, position = pruned_logits.argmax(-1, keepdim=True), position + 1


def test_keeping_every_token_is_vanilla(tiny_path, rcpp_model, batch2):
    vanilla = LlavaForConditionalGeneration.from_pretrained(tiny_path, dtype=torch.float32).eval()
    kwargs = dict(max_new_tokens=10, do_sample=False)
    expected = vanilla.generate(**batch2, generation_config=GenerationConfig(**kwargs))
    config = RCPPGenerationConfig(rcpp=False, methods=[FastV(budget=NUM_VISUAL)], **kwargs)
    assert torch.equal(rcpp_model.generate(**batch2, generation_config=config), expected)


def test_fastv_in_generate_shrinks_the_cache_and_reports(varied_model, batch2):
    config = RCPPGenerationConfig(
        rcpp=False, methods=[FastV(budget=6)], max_new_tokens=6, do_sample=False, return_dict_in_generate=True
    )
    out = varied_model.generate(**batch2, generation_config=config)
    (record,) = out.pruning
    keep = equivalent_keep(6, NUM_VISUAL, 1, 4)
    assert (record.layer, record.kept) == (1, keep)
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths[0] - lengths[1] == NUM_VISUAL - keep and len(set(lengths[1:])) == 1
    assert out.rcpp is None


def test_eager_and_sdpa_prune_alike(varied_tiny_path, batch2):
    config = RCPPGenerationConfig(rcpp=False, methods=[FastV(keep=4)], max_new_tokens=8, do_sample=False)
    outputs = []
    for implementation in ("sdpa", "eager"):
        model = RCPPLlavaForConditionalGeneration.from_pretrained(varied_tiny_path, attn_implementation=implementation)
        outputs.append(model.eval().generate(**batch2, generation_config=copy.deepcopy(config)))
    assert torch.equal(outputs[0], outputs[1])


def test_fastv_composes_with_rcpp(varied_model, batch2):
    config = RCPPGenerationConfig(
        methods=[FastV(keep=8)], tau=0.5, lambda_start=0.2, lambda_end=0.8, keep_ratio_end=0.25, schedule_steps=4,
        max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
    )  # fmt: skip
    out = varied_model.generate(**batch2, generation_config=config)
    (record,) = out.pruning
    first = out.rcpp.steps[0].scores  # RCPP scores only FastV's survivors; the pruned ones are NaN from the start
    for row in range(2):
        scored = (~first[row].isnan()).nonzero().flatten()
        assert torch.equal(scored, record.kept_visual_ids[row].sort().values)
    assert out.past_key_values.num_visual_tokens == 4  # RCPP's eviction then works on the survivors (25% of 16)
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths[0] - lengths[1] == NUM_VISUAL - 8  # layer 0 still holds the tokens FastV dropped after it


# -- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(budget=0), "budget"),
        (dict(keep=0), "keep"),
        (dict(layer=0), "layer"),
        (dict(query="first"), "query"),
    ],
)
def test_fastv_rejects_invalid_settings(settings, message):
    with pytest.raises(ValueError, match=f"FastV.{message}"):
        FastV(**settings)


@pytest.mark.parametrize(
    "method, message",
    [
        (FastV(budget=17), "larger than the image's 16"),
        (FastV(keep=17), "larger than the image's 16"),
        (FastV(layer=4, keep=2), "does not fit a decoder with 4 layers"),
        (FastV(budget=2, layer=3),
         r"unreachable: pruning before layer 3 of 4 averages at least 12; reachable: 13\.\.16"),
    ],
)
def test_methods_that_do_not_fit_the_model(rcpp_model, batch2, method, message):
    config = RCPPGenerationConfig(rcpp=False, methods=[method], max_new_tokens=2)
    with pytest.raises(ValueError, match=message):
        rcpp_model.generate(**batch2, generation_config=config)


def test_unknown_method_and_incompatible_methods():
    with pytest.raises(ValueError, match="unknown method 'fastvv'; known methods: .*fastv"):
        load_method("fastvv")
    with pytest.raises(ValueError, match="cannot be combined"):
        RCPPGenerationConfig(methods=[FastV(), FastV(budget=64)])


def test_methods_round_trip_through_the_generation_config(tmp_path):
    config = RCPPGenerationConfig(rcpp=False, methods=["fastv", {"method": "fastv", "budget": 64}][1:])
    config.save_pretrained(tmp_path)
    loaded = RCPPGenerationConfig.from_pretrained(tmp_path)
    assert loaded.methods == (FastV(budget=64),)
    FastV(budget=64, query="all").to_yaml(tmp_path / "fastv.yaml")
    assert load_method(tmp_path / "fastv.yaml") == FastV(budget=64, query="all")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_pruning_in_half_precision(tiny_path, batch2, dtype):
    """Keeping every token is still vanilla in half precision, and a real drop keeps the asked count per layer."""
    vanilla = LlavaForConditionalGeneration.from_pretrained(tiny_path, dtype=dtype).eval()
    model = RCPPLlavaForConditionalGeneration.from_pretrained(tiny_path, dtype=dtype).eval()
    inputs = {**batch2, "pixel_values": batch2["pixel_values"].to(dtype)}
    kwargs = dict(max_new_tokens=8, do_sample=False)
    expected = vanilla.generate(**inputs, generation_config=GenerationConfig(**kwargs))
    keep_all = RCPPGenerationConfig(rcpp=False, methods=[FastV(keep=NUM_VISUAL)], **kwargs)
    assert torch.equal(model.generate(**inputs, generation_config=keep_all), expected)
    pruned = RCPPGenerationConfig(rcpp=False, methods=[FastV(keep=5, layer=2)], return_dict_in_generate=True, **kwargs)
    out = model.generate(**inputs, generation_config=pruned)
    assert out.past_key_values.layers[0].keys.dtype == dtype
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers[1:3]] == [
        out.past_key_values.layers[0].keys.shape[2], out.past_key_values.layers[0].keys.shape[2] - 11
    ]
