"""The GAN layer pruner's optional parts, the text-to-vision attention residual and the token merger: the training
forward with them equals the evaluation prefill (float32, binary masks), their parameters are trained, they are saved
and loaded, and off (the default) changes nothing."""

import copy
import json
from dataclasses import replace

import pytest
import torch
from transformers import LlavaProcessor
from transformers.models.llama.modeling_llama import (
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from rcpp_hf import RCPPGenerationConfig, RCPPLlavaForConditionalGeneration
from rcpp_hf.cli import main
from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.engine.decoder import run_decoder
from rcpp_hf.engine.layout import TokenLayout
from rcpp_hf.engine.pruning import PrefillPruningTap
from rcpp_hf.gan_training import train as train_module
from rcpp_hf.gan_training.forward import pruned_forward
from rcpp_hf.gan_training.train import LOSS_TERMS, GanTrainConfig, GanTrainer
from rcpp_hf.methods.gan_pruner import method as method_module
from rcpp_hf.methods.gan_pruner.attention_residual import question_attention_feature
from rcpp_hf.methods.gan_pruner.config import GanPrunerConfig
from rcpp_hf.methods.gan_pruner.merger import merge_columns
from rcpp_hf.methods.gan_pruner.method import GanPruner
from rcpp_hf.methods.gan_pruner.pruner import GanLayerPruners, gumbel_keep_mask
from rcpp_hf.shapesworld.conversations import llava_prompt
from rcpp_hf.shapesworld.render import render_scene
from rcpp_hf.shapesworld.world import sample_scene
from tests.test_gan_pruner import SMOKE, prompt_batch, small_path  # noqa: F401 (small_path: a fixture)

BIASES = (1.5, 1.0, 1.0)
OPTIONS = {"residual": dict(attention_residual=True), "merger": dict(token_merger=8),
           "both": dict(attention_residual=True, token_merger=8)}  # fmt: skip


def save_pruners(folder, **options):
    """Untrained pruners for the small model (16 visual tokens) whose logits straddle 0, a residual scale of 1 and a
    sharply pooling merger, saved into `folder`; returns them."""
    config = GanPrunerConfig(hidden_size=32, num_hidden_layers=4, pruning_layers=[1, 2, 3], pruner_hidden=16,
                             pruner_heads=2, **options)  # fmt: skip
    torch.manual_seed(1)
    pruners = GanLayerPruners(config)
    with torch.no_grad():
        for pruner, bias in zip(pruners.pruners, BIASES):
            pruner.mlp[-1].weight.normal_(std=10.0)
            pruner.mlp[-1].bias.fill_(bias)
            if pruner.attention_scale is not None:
                pruner.attention_scale.fill_(1.0)
        if pruners.merger is not None:
            pruners.merger.project_keys.weight.normal_(std=1.0)
            pruners.merger.film.weight.normal_(std=0.1)
    pruners.save_pretrained(folder)
    return pruners.eval()


# -- the merger and the feature by hand ------------------------------------------------------------------------------
def test_merge_columns_are_the_first_of_equal_runs():
    assert merge_columns(16, 8).tolist() == list(range(0, 16, 2))
    assert merge_columns(10, 4).tolist() == [0, 2, 5, 7]
    assert merge_columns(5, 5).tolist() == [0, 1, 2, 3, 4]
    for count in (0, 6):
        with pytest.raises(ValueError, match="merged tokens"):
            merge_columns(5, count)


def test_merger_shapes_convex_pooling_and_question_modulation():
    config = GanPrunerConfig(hidden_size=32, num_hidden_layers=4, pruning_layers=[1], pruner_hidden=16, pruner_heads=2,
                             token_merger=3)  # fmt: skip
    torch.manual_seed(0)
    merger = GanLayerPruners(config).merger
    with torch.no_grad():
        merger.film.weight.normal_(std=1.0)
        merger.project_keys.weight.normal_(std=1.0)
    visual, question = torch.randn(2, 7, 32), torch.randn(2, 4, 32)
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    merged = merger(visual, question, valid)
    assert merged.shape == (2, 3, 32) and merged.dtype == torch.float32
    # Convex combinations of the visual tokens: identical tokens merge to themselves.
    same = torch.randn(32).expand(2, 7, 32)
    torch.testing.assert_close(merger(same, question, valid), same[:, :3])
    # The question modulates the queries; its padding does not.
    other = question.clone()
    other[0, 0] += 1.0
    assert not torch.allclose(merger(visual, other, valid)[0], merged[0])
    other = question.clone()
    other[1, 3] += 1.0
    torch.testing.assert_close(merger(visual, other, valid)[1], merged[1], atol=0, rtol=0)


def test_attention_feature_equals_the_layers_eager_attention(small_path):
    """The feature is log(V * mean over heads and question rows of softmax(q k^T / sqrt(d))) of the layer's own
    projections: brute force with transformers' eager attention on the layer's q / k."""
    model = RCPPLlavaForConditionalGeneration.from_pretrained(small_path, dtype=torch.float32).eval()
    layer = model.model.language_model.layers[2]
    torch.manual_seed(0)
    hidden = torch.randn(2, 10, 32)
    cos, sin = model.model.language_model.rotary_emb(hidden, position_ids=torch.arange(10)[None].expand(2, -1))
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden)
    heads = lambda x: x.view(2, 10, -1, attention.head_dim).transpose(1, 2)  # noqa: E731
    query, key = apply_rotary_pos_emb(heads(attention.q_proj(normed)), heads(attention.k_proj(normed)), cos, sin)
    causal = torch.full((10, 10), float("-inf")).triu(1)[None, None]
    _, probs = eager_attention_forward(attention, query, key, key, causal, attention.scaling)  # (2, H, 10, 10)
    rows, slots = torch.tensor([[6, 7, 8, 9], [6, 7, 8, 9]]), torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    valid = torch.tensor([[True] * 4, [True, True, True, False]])
    key_mask = torch.ones(10, 10, dtype=torch.bool).tril()[rows]
    feature = question_attention_feature(layer, hidden, (cos, sin), rows, valid, key_mask, slots)
    mean = probs.mean(1)[:, 6:, 1:5]  # (2, 4 rows, 4 visual)
    expected = torch.stack([mean[0].mean(0), mean[1, :3].mean(0)]) * 4
    torch.testing.assert_close(feature, expected.log(), atol=1e-5, rtol=1e-5)
    # A key policy of 0 on visual token 2: the attention of the others renormalised, over 3 present tokens.
    weight = torch.ones(2, 10).index_fill(1, torch.tensor([3]), 0.0)
    masked = question_attention_feature(layer, hidden, (cos, sin), rows, valid, key_mask, slots, weight)
    drop = probs.index_fill(-1, torch.tensor([3]), 0.0)
    mean = (drop / drop.sum(-1, keepdim=True)).mean(1)[:, 6:, 1:5]
    expected = torch.stack([mean[0].mean(0), mean[1, :3].mean(0)]) * 3
    torch.testing.assert_close(masked[:, [0, 1, 3]], expected[:, [0, 1, 3]].log(), atol=1e-5, rtol=1e-5)


def test_attention_feature_is_finite_beside_a_dominant_dropped_key(small_path):  # noqa: F811
    """The case that turned a smoke run's pruners to NaN: every question row's attention far (> 100 nats) on one
    visual key dropped by an earlier stage; the kept keys' share must not underflow to 0 / 0."""
    model = RCPPLlavaForConditionalGeneration.from_pretrained(small_path, dtype=torch.float32).eval()
    layer = copy.deepcopy(model.model.language_model.layers[2])
    with torch.no_grad():  # logits 400 times larger
        layer.self_attn.q_proj.weight.mul_(20.0)
        layer.self_attn.k_proj.weight.mul_(20.0)
    torch.manual_seed(0)
    hidden = torch.randn(1, 10, 32)
    cos, sin = model.model.language_model.rotary_emb(hidden, position_ids=torch.arange(10)[None])
    rows, slots, valid = torch.tensor([[6, 7, 8, 9]]), torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.bool)
    key_mask = torch.ones(10, 10, dtype=torch.bool).tril()[rows]
    full = question_attention_feature(layer, hidden, (cos, sin), rows, valid, key_mask, slots)
    top = int(full.argmax()) + 1  # the most attended visual entry
    weight = torch.ones(1, 10).index_fill(1, torch.tensor([top]), 0.0)
    masked = question_attention_feature(layer, hidden, (cos, sin), rows, valid, key_mask, slots, weight)
    assert torch.isfinite(masked).all()
    removed = [i for i in range(10) if i != top]  # the same as the sequence without that entry (positions kept)
    alone = question_attention_feature(layer, hidden[:, removed], (cos[:, removed], sin[:, removed]), rows - 1, valid,
                                       key_mask[:, :, removed], torch.tensor([[1, 2, 3]]))  # fmt: skip
    torch.testing.assert_close(masked[:, [i for i in range(4) if i != top - 1]], alone)


# -- training forward == evaluation prefill --------------------------------------------------------------------------
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_training_forward_with_options_equals_the_prefill(tmp_path, small_path, monkeypatch, options):  # noqa: F811
    """Binary (noise-free) masks: the training forward's logits equal the registry method's physical drop, and the
    attention feature the training forward gives each stage equals the one evaluation computes, at the tokens
    present (float32)."""
    folder = tmp_path
    save_pruners(folder, **options)
    model = RCPPLlavaForConditionalGeneration.from_pretrained(small_path, dtype=torch.float32).eval()
    processor = LlavaProcessor.from_pretrained(small_path)
    pruners = GanLayerPruners.from_pretrained(folder).eval()
    batch = prompt_batch(processor, model.config.image_token_id)
    stage_layers = tuple(pruners.config.pruning_layers)
    features = {"train": [], "eval": []}

    def noise_free(stage, visual, question, valid, attention):
        features["train"].append(attention)
        return gumbel_keep_mask(pruners(stage, visual, question, valid, attention), 1.0, None)

    def recorded(*args):
        features["eval"].append(question_attention_feature(*args))
        return features["eval"][-1]

    monkeypatch.setattr(method_module, "question_attention_feature", recorded)
    with torch.no_grad():
        soft = pruned_forward(model, batch, stage_layers, noise_free, merge=pruners.merger,
                              attention_residual=pruners.config.attention_residual)  # fmt: skip
        unpruned = pruned_forward(model, batch, stage_layers)
        tap = PrefillPruningTap(GanPruner(pruner_path=str(folder)), model.model.language_model, 16)
        layout = TokenLayout.prompt(batch["position_ids"], torch.ones_like(batch["input_ids"], dtype=torch.bool),
                                    batch["input_ids"] == model.config.image_token_id)  # fmt: skip
        embeds = model.family.embed_prompt(batch["input_ids"], {"pixel_values": batch["pixel_values"]})
        hidden, _ = run_decoder(model.model.language_model, embeds, layout, VisualKVCache(config=model.config), [tap])
        hard = model.lm_head(hidden[:, -1]).float()
    merged = options.get("token_merger")
    kept = [record.kept for record in tap.records]
    assert kept == ([merged] if merged else []) + [int(k.sum()) for k in soft.keep]
    assert 1 <= kept[-1] < (merged or 16), f"the pruners must drop some tokens: {kept}"
    torch.testing.assert_close(soft.logits[:, -1], hard, atol=1e-5, rtol=0)
    assert not torch.allclose(unpruned.logits[:, -1], hard, atol=1e-3), "pruning must matter"
    if merged:
        assert tap.records[0].layer == 0 and tap.records[0].kept_visual_ids[0].tolist() == list(range(0, 16, 2))
    if options.get("attention_residual"):
        assert len(features["train"]) == len(features["eval"]) == 3
        present = [torch.ones_like(soft.keep[0], dtype=torch.bool), *(k.bool() for k in soft.keep[:2])]
        for train_feature, eval_feature, where in zip(features["train"], features["eval"], present):
            torch.testing.assert_close(train_feature[where], eval_feature.flatten(), atol=1e-5, rtol=1e-5)
        assert features["eval"][0].std() > 0.1, "the feature must vary over the tokens"
    else:
        assert features["train"] == [None] * 3 and features["eval"] == []


# -- training -----------------------------------------------------------------------------------------------------
def test_the_options_parameters_get_gradients_from_every_loss(small_path):  # noqa: F811
    trainer = GanTrainer.build(replace(SMOKE, attention_residual=True, token_merger=8), small_path)
    batch = trainer.batch(0)
    real, fake, _, fake_pooled, _, _ = trainer.forwards(batch, 0, trainer.generator(0))
    assert [k.shape for k in fake.keep] == [(SMOKE.batch_size, 8)] * 3  # the stages act on the merged tokens
    terms = train_module.loss_terms(real, fake, fake_pooled, batch, trainer.discriminator, trainer.targets)
    new = {name: p for name, p in trainer.pruners.named_parameters() if "merger" in name or "attention_scale" in name}
    assert len(new) == 3 + 2 + 3 + 2  # scales of 3 stages; queries, keys (w, b), FiLM (w, b), norm (w, b)
    for term in LOSS_TERMS:
        if term == "distillation":  # weight 0 by default, and reaches them like the task term
            continue
        grads = torch.autograd.grad(terms[term], list(new.values()), retain_graph=True, allow_unused=True)
        assert sum(g.abs().sum() for g in grads if g is not None) > 0, term
    grads = torch.autograd.grad(terms["task"], list(new.values()), allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads), [n for n, g in zip(new, grads) if g is None]


def test_cli_trains_with_both_options_and_the_result_evaluates(tmp_path, small_path):  # noqa: F811
    assert main(["gan-pruner", "train", "--model", str(small_path), "--output-dir", str(tmp_path), "--steps", "2",
                 "--batch-size", "2", "--pruner-hidden", "8", "--pruner-heads", "2", "--discriminator-width", "8",
                 "--token-merger", "4", "--attention-residual", "true", "--no-progress"]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "training.json").read_text())
    assert summary["config"]["token_merger"] == 4 and summary["config"]["attention_residual"] is True
    pruners = GanLayerPruners.from_pretrained(tmp_path)
    assert pruners.config.token_merger == 4 and pruners.pruners[0].attention_scale.item() != 0.0  # it trained
    model = RCPPLlavaForConditionalGeneration.from_pretrained(small_path, dtype=torch.float32).eval()
    processor = LlavaProcessor.from_pretrained(small_path)
    inputs = processor(images=[render_scene(sample_scene(0, i)) for i in range(2)], return_tensors="pt", padding=True,
                       text=[llava_prompt("Is there a red circle in the image?"), llava_prompt("Describe the image.")])  # fmt: skip
    config = RCPPGenerationConfig(rcpp=False, methods=[GanPruner(pruner_path=str(tmp_path))], max_new_tokens=3,
                                  do_sample=False, return_dict_in_generate=True)  # fmt: skip
    out = model.generate(**inputs, generation_config=config)
    assert [record.layer for record in out.pruning] == [0, 1, 2, 3] and out.pruning[0].kept == 4
    assert out.pruning[0].details["merged"] == 4 and all(record.kept <= 4 for record in out.pruning)
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths[0] == inputs["input_ids"].shape[1] - 16 + 4 + 2  # the image as 4 tokens, plus 2 decoded


# -- saved and loaded; off by default ----------------------------------------------------------------------------
def test_save_and_load_round_trip_with_both_options(tmp_path):
    pruners = save_pruners(tmp_path, attention_residual=True, token_merger=8)
    loaded = GanLayerPruners.from_pretrained(tmp_path).eval()
    assert loaded.config.token_merger == 8 and loaded.config.attention_residual is True
    for key, value in pruners.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    visual, question, attention = torch.randn(2, 16, 32), torch.randn(2, 3, 32), torch.randn(2, 16)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    torch.testing.assert_close(loaded.merger(visual, question, valid), pruners.merger(visual, question, valid), atol=0, rtol=0)
    torch.testing.assert_close(loaded(1, visual, question, valid, attention), pruners(1, visual, question, valid, attention),
                               atol=0, rtol=0)  # fmt: skip
    torch.testing.assert_close(loaded(1, visual, question, valid, attention) - loaded(1, visual, question, valid, 0 * attention),
                               attention)  # fmt: skip  # the residual: scale (1) times the feature
    with pytest.raises(ValueError, match="attention feature"):
        loaded(1, visual, question, valid)


def test_off_by_default_leaves_the_pruners_and_old_configs_unchanged(tmp_path):
    config = GanPrunerConfig(hidden_size=32, num_hidden_layers=4, pruning_layers=[1, 2], pruner_hidden=16, pruner_heads=2)
    pruners = GanLayerPruners(config)
    assert pruners.merger is None and all(p.attention_scale is None for p in pruners.pruners)
    assert not any("merger" in key or "attention_scale" in key for key in pruners.state_dict())
    assert GanTrainConfig().token_merger == 0 and GanTrainConfig().attention_residual is False
    # A config.json saved before the options existed loads with both off.
    pruners.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("attention_residual", "token_merger"):
        saved.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = GanLayerPruners.from_pretrained(tmp_path)
    assert loaded.config.token_merger == 0 and loaded.config.attention_residual is False and loaded.merger is None
    assert GanPruner(pruner_path=str(tmp_path)).resolve_stages(4, 16)[0].layer == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: GanPrunerConfig(token_merger=-1), "GanPrunerConfig.token_merger"),
        (lambda: GanPrunerConfig(attention_residual="yes"), "GanPrunerConfig.attention_residual"),
        (lambda: GanTrainConfig(token_merger=-2), "token_merger"),
    ],
)
def test_bad_option_settings_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_merger_larger_than_the_image_is_a_clear_error(tmp_path):
    save_pruners(tmp_path, token_merger=8)
    with pytest.raises(ValueError, match="GanPruner.pruner_path.*8 tokens"):
        GanPruner(pruner_path=str(tmp_path)).resolve_stages(4, 6)
