"""The GAN layer pruner: its training forward equals the physical drop, every loss reaches the pruners, the two
players' steps leave each other alone, training is reproducible and resumable, evaluation runs from the registry."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import GenerationConfig, LlavaForConditionalGeneration, LlavaProcessor

from rcpp_hf import RCPPGenerationConfig, RCPPLlavaForConditionalGeneration
from rcpp_hf.cli import main
from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.engine.decoder import run_decoder
from rcpp_hf.engine.layout import TokenLayout
from rcpp_hf.engine.pruning import PrefillPruningTap
from rcpp_hf.gan_training import train as train_module
from rcpp_hf.gan_training.attention import EXPONENT_CAP, policy_attention_forward
from rcpp_hf.gan_training.discriminator import pool_states, ramp
from rcpp_hf.gan_training.forward import pruned_forward
from rcpp_hf.gan_training.losses import (
    binarisation_loss,
    budget_loss,
    distillation_loss,
    dual_ascent,
    sparsity_loss,
    token_count_loss,
)
from rcpp_hf.gan_training.schedules import cosine_schedule
from rcpp_hf.gan_training.train import (
    LOSS_TERMS,
    SEED_TARGET_KEEP,
    GanTrainConfig,
    GanTrainer,
    keep_targets,
    scale_state_layers,
    train,
)
from rcpp_hf.methods import load_method
from rcpp_hf.methods.gan_pruner.config import GanPrunerConfig
from rcpp_hf.methods.gan_pruner.method import GanPruner
from rcpp_hf.methods.gan_pruner.pruner import (
    GanLayerPruners,
    evaluation_keep_mask,
    gumbel_keep_mask,
)
from rcpp_hf.methods.pdrop import average_keep_fraction
from rcpp_hf.shapesworld.conversations import llava_prompt
from rcpp_hf.shapesworld.model import SHAPESWORLD_SPEC, build_shapesworld_llava
from rcpp_hf.shapesworld.render import render_scene
from rcpp_hf.shapesworld.train import batch_scenes
from rcpp_hf.shapesworld.world import sample_scene
from tests.conftest import vary_weights

# A 4-layer ShapesWorld LLaVA small enough to train pruners for a few steps in seconds (16 visual tokens).
SMALL = replace(SHAPESWORLD_SPEC, image_size=32, patch_size=8, vision_hidden=32, vision_layers=1,
                text_hidden=32, text_layers=4, num_heads=4, num_kv_heads=2)  # fmt: skip
SMOKE = GanTrainConfig(steps=4, batch_size=2, pruner_hidden=16, pruner_heads=2, discriminator_width=16, save_every=2)


@pytest.fixture(scope="module")
def small_path(tmp_path_factory):
    """The small model with weights of std 0.3, so that its outputs depend on which tokens it sees."""
    folder = tmp_path_factory.mktemp("shapesworld-small")
    model, processor = build_shapesworld_llava(SMALL)
    vary_weights(model)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trainer(small_path):
    return GanTrainer.build(SMOKE, small_path)


@pytest.fixture(scope="module")
def pruner_path(tmp_path_factory):
    """Untrained pruners for the small model whose logits straddle 0, fewer kept at each stage (12, 6, 1 of 16 on
    `prompt_batch`)."""
    config = GanPrunerConfig(hidden_size=32, num_hidden_layers=4, pruning_layers=[1, 2, 3], pruner_hidden=16,
                             pruner_heads=2)  # fmt: skip
    torch.manual_seed(1)
    pruners = GanLayerPruners(config)
    with torch.no_grad():
        for pruner, bias in zip(pruners.pruners, (1.0, 0.3, -0.3)):
            pruner.mlp[-1].weight.normal_(std=10.0)
            pruner.mlp[-1].bias.fill_(bias)
    folder = tmp_path_factory.mktemp("gan-pruners")
    pruners.save_pretrained(folder)
    return folder


# -- schedules and masks ------------------------------------------------------------------------------------------
def test_cosine_schedules_at_their_ends_and_midpoint():
    assert cosine_schedule(0.99, 0.4, 0, 100) == pytest.approx(0.99)
    assert cosine_schedule(0.99, 0.4, 50, 100) == pytest.approx(0.695)
    assert cosine_schedule(0.99, 0.4, 100, 100) == pytest.approx(0.4)
    assert cosine_schedule(1.0, 10.0, 25, 100) == pytest.approx(10 - 9 * 0.5 * (1 + 2**-0.5))
    weights = train_module.loss_weights(GanTrainConfig(steps=10), 5)
    assert weights["adversarial"] == pytest.approx(5.5) and weights["task"] == pytest.approx(10.0)


def test_straight_through_mask_is_binary_and_carries_the_relaxed_gradient():
    logits = torch.tensor([[2.0, -1.0, 0.3, -0.2]], requires_grad=True)
    mask, soft = gumbel_keep_mask(logits, 0.5, None)
    assert torch.equal(mask, torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(soft, torch.sigmoid(logits / 0.5))
    (mask * torch.arange(4.0)).sum().backward()
    expected = torch.arange(4.0) * soft * (1 - soft) / 0.5  # d sigmoid(l / t) / dl
    torch.testing.assert_close(logits.grad, expected.detach())
    relaxed, same = gumbel_keep_mask(logits, 0.5, torch.Generator().manual_seed(0), straight_through=False)
    assert relaxed is same and ((relaxed > 0) & (relaxed < 1)).all()


def test_gumbel_noise_decides_the_training_masks_and_annealed_to_zero_gives_the_evaluations():
    logits = torch.linspace(-1.0, 1.0, 2001)[None]
    evaluation = (logits > 0).float()
    for temperature in (1.0, 0.4):  # the temperature never changes a straight-through mask
        noisy, _ = gumbel_keep_mask(logits, temperature, torch.Generator().manual_seed(0))
        assert (noisy != evaluation).float().mean() > 0.3  # logistic noise flips about 38% of logits in [-1, 1]
        quiet, _ = gumbel_keep_mask(logits, temperature, torch.Generator().manual_seed(0), noise_scale=0.0)
        assert torch.equal(quiet, evaluation)
    assert GanTrainConfig().gumbel_noise == (1.0, 0.0)


def test_a_dropped_key_far_above_the_kept_ones_leaves_the_forward_exact_and_its_gradient_finite():
    """The case that turned a real run's pruners to NaN: a dropped key 200 nats above every kept one."""
    module = torch.nn.Module()
    module.num_key_value_groups = 1
    query = torch.zeros(1, 1, 3, 2)
    query[..., 0] = 1.0
    key = torch.tensor([[0.0, 0.0], [200.0, 0.0], [1.0, 0.0]])[None, None]
    value = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])[None, None]
    causal = torch.ones(3, 3).tril().bool()[None, None]
    policy = torch.tensor([[1.0, 0.0, 1.0]], requires_grad=True)
    output, probs = policy_attention_forward(module, query, key, value, causal, 1.0, key_policy=policy)
    # Key 1 dropped: row 2 sees keys 0 and 2 only (softmax of logits 0 and 1); row 1 keeps its own diagonal.
    expected = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    torch.testing.assert_close(probs[0, 0, 2, [0, 2]], expected)
    assert probs[0, 0, 2, 1] == 0 and probs[0, 0, 1, 1] == 1
    output[0, 2, 0, 0].backward()  # (batch, query, head, dim): the first component of row 2
    assert torch.isfinite(policy.grad).all()
    assert policy.grad.abs().max() < 1e9  # summed over heads, queries and rows in training: far below 3.4e38
    # Capped: d out / d m_1 = exp(min(200 - 1, cap)) / Z * (v_1 - out), Z = 1 + e^-1.
    z = 1 + torch.exp(torch.tensor(-1.0))
    out = (expected * torch.tensor([1.0, 2.0])).sum()
    torch.testing.assert_close(policy.grad[0, 1], torch.exp(torch.tensor(EXPONENT_CAP)) / z * (0.0 - out))


def test_layers_scale_to_the_backbone_depth():
    assert scale_state_layers((15, 23, 31), 32) == (15, 23, 31)
    assert scale_state_layers((15, 23, 31), 12) == (5, 8, 11)
    assert scale_state_layers((15, 23, 31), 4) == (1, 2, 3)


# -- the training forward is the physical drop ----------------------------------------------------------------------
def prompt_batch(processor, image_token_id, question="Is there a red circle in the image?"):
    inputs = processor(images=render_scene(sample_scene(0, 3)), text=llava_prompt(question), return_tensors="pt")
    length = inputs["input_ids"].shape[1]
    index = torch.arange(length)
    last_visual = torch.where(inputs["input_ids"] == image_token_id, index, -1).max()
    return {
        "input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"],
        "attention_mask": torch.ones(length, length, dtype=torch.bool).tril()[None, None],
        "position_ids": index[None], "question_mask": (index > last_visual)[None],
    }  # fmt: skip


def test_binary_masks_in_training_equal_the_hard_dropped_forward(small_path, pruner_path):
    """The pruners' noise-free masks (logit > 0) applied as the training forward's attention policy give the
    logits of the registry method's physical drop (float32)."""
    model = RCPPLlavaForConditionalGeneration.from_pretrained(small_path, dtype=torch.float32).eval()
    processor = LlavaProcessor.from_pretrained(small_path)
    pruners = GanLayerPruners.from_pretrained(pruner_path).eval()
    batch = prompt_batch(processor, model.config.image_token_id)
    stage_layers = tuple(pruners.config.pruning_layers)

    def noise_free(stage, visual, question, valid, attention):
        return gumbel_keep_mask(pruners(stage, visual, question, valid, attention), 1.0, None)

    with torch.no_grad():
        soft = pruned_forward(model, batch, stage_layers, noise_free)
        unpruned = pruned_forward(model, batch, stage_layers)
        tap = PrefillPruningTap(GanPruner(pruner_path=str(pruner_path)), model.model.language_model, 16)
        layout = TokenLayout.prompt(batch["position_ids"], torch.ones_like(batch["input_ids"], dtype=torch.bool),
                                    batch["input_ids"] == model.config.image_token_id)  # fmt: skip
        embeds = model.family.embed_prompt(batch["input_ids"], {"pixel_values": batch["pixel_values"]})
        hidden, _ = run_decoder(model.model.language_model, embeds, layout, VisualKVCache(config=model.config), [tap])
        hard = model.lm_head(hidden[:, -1]).float()
    kept = [record.kept for record in tap.records]
    assert kept == [int(k.sum()) for k in soft.keep] == [12, 6, 1]
    torch.testing.assert_close(soft.logits[:, -1], hard, atol=1e-5, rtol=0)
    assert not torch.allclose(unpruned.logits[:, -1], hard, atol=1e-3), "pruning must matter"


# -- evaluation through the registry --------------------------------------------------------------------------------
def test_origin_mode_is_token_identical_to_vanilla(tiny_path, rcpp_model, batch2):
    vanilla = LlavaForConditionalGeneration.from_pretrained(tiny_path, dtype=torch.float32).eval()
    expected = vanilla.generate(**batch2, generation_config=GenerationConfig(max_new_tokens=8, do_sample=False))
    config = RCPPGenerationConfig(rcpp=False, methods=[load_method("gan_pruner", mode="origin")], max_new_tokens=8,
                                  do_sample=False)  # fmt: skip
    assert torch.equal(rcpp_model.generate(**batch2, generation_config=config), expected)


def test_hard_mode_drops_tokens_and_shortens_the_cache(small_path, pruner_path):
    model = RCPPLlavaForConditionalGeneration.from_pretrained(small_path, dtype=torch.float32).eval()
    processor = LlavaProcessor.from_pretrained(small_path)
    prompts = [llava_prompt("Is there a red circle in the image?"), llava_prompt("Describe the image.")]
    images = [render_scene(sample_scene(0, i)) for i in range(2)]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    config = RCPPGenerationConfig(rcpp=False, methods=[GanPruner(pruner_path=str(pruner_path))], max_new_tokens=4,
                                  do_sample=False, return_dict_in_generate=True)  # fmt: skip
    out = model.generate(**inputs, generation_config=config)
    assert [record.layer for record in out.pruning] == [1, 2, 3]
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths[0] - lengths[-1] == 16 - out.pruning[-1].kept > 0
    for record in out.pruning:  # rows keep the row maximum of mask > 0.5: some row keeps exactly its masked count
        assert max(record.details["mask_kept"]) == record.kept or record.kept == 1


def test_top_k_mode_keeps_the_trained_share_by_logit(tmp_path, small_path, pruner_path):
    """Every row keeps exactly round(target * 16) tokens per stage, the highest-logit ones; pruners without trained
    targets are refused."""
    with pytest.raises(ValueError, match="target_keep"):
        GanPruner(pruner_path=str(pruner_path), mode="top_k")
    pruners = GanLayerPruners.from_pretrained(pruner_path)
    pruners.config.target_keep = [0.5, 0.25, 0.1]
    pruners.save_pretrained(tmp_path)
    model = RCPPLlavaForConditionalGeneration.from_pretrained(small_path, dtype=torch.float32).eval()
    processor = LlavaProcessor.from_pretrained(small_path)
    prompts = [llava_prompt("Is there a red circle in the image?"), llava_prompt("Describe the image.")]
    inputs = processor(images=[render_scene(sample_scene(0, i)) for i in range(2)], text=prompts, return_tensors="pt",
                       padding=True)  # fmt: skip
    config = RCPPGenerationConfig(rcpp=False, methods=[GanPruner(pruner_path=str(tmp_path), mode="top_k")],
                                  max_new_tokens=1, do_sample=False, return_dict_in_generate=True)  # fmt: skip
    out = model.generate(**inputs, generation_config=config)
    assert [(record.layer, record.kept) for record in out.pruning] == [(1, 8), (2, 4), (3, 2)]
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths[0] - lengths[-1] == 16 - 2


def test_wrong_width_or_depth_is_a_clear_error(tmp_path, small_path, rcpp_model, batch2):
    for name, settings, message in (("wide", dict(hidden_size=48, num_hidden_layers=4), "width 48"),
                                    ("deep", dict(hidden_size=64, num_hidden_layers=6), "6 layers")):  # fmt: skip
        GanLayerPruners(GanPrunerConfig(pruning_layers=[1, 2, 3], pruner_hidden=8, pruner_heads=2, **settings)
                        ).save_pretrained(tmp_path / name)  # fmt: skip
        config = RCPPGenerationConfig(rcpp=False, methods=[GanPruner(pruner_path=str(tmp_path / name))], max_new_tokens=2)
        with pytest.raises(ValueError, match=message):
            rcpp_model.generate(**batch2, generation_config=config)


def test_save_and_load_round_trip(tmp_path):
    config = GanPrunerConfig(hidden_size=32, num_hidden_layers=12, pruning_layers=[2, 4, 7], pruner_hidden=16,
                             pruner_heads=2, gumbel="relaxed")  # fmt: skip
    pruners = GanLayerPruners(config).eval()
    pruners.save_pretrained(tmp_path)
    loaded = GanLayerPruners.from_pretrained(tmp_path).eval()
    assert loaded.config.pruning_layers == [2, 4, 7] and loaded.config.gumbel == "relaxed"
    for key, value in pruners.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    visual, question = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    torch.testing.assert_close(loaded(1, visual, question, valid), pruners(1, visual, question, valid), atol=0, rtol=0)
    assert (pruners(0, visual, question, valid) > 1.5).all(), "training starts near keeping every token"


# -- losses and the two players -------------------------------------------------------------------------------------
def test_every_loss_term_reaches_the_pruners_and_not_the_backbone(trainer):
    batch = trainer.batch(0)
    real, fake, _, fake_pooled, _, evaluation_keep = trainer.forwards(batch, 0, trainer.generator(0))
    terms = train_module.loss_terms(real, fake, fake_pooled, batch, trainer.discriminator, trainer.targets)
    assert set(terms) == set(LOSS_TERMS)
    terms["budget"] = budget_loss(evaluation_keep, trainer.targets, torch.tensor([1.0, -2.0, 3.0]))
    for name in terms:
        grads = torch.autograd.grad(terms[name], list(trainer.pruners.parameters()), retain_graph=True, allow_unused=True)
        assert sum(g.abs().sum() for g in grads if g is not None) > 0, name
    assert not any(p.requires_grad for p in trainer.model.parameters())
    sum(terms.values()).backward()
    assert all(p.grad is None for p in [*trainer.model.parameters(), *trainer.discriminator.parameters()])
    trainer.pruners.zero_grad(set_to_none=True)


def test_each_players_step_leaves_the_other_unchanged(trainer):
    snapshot = lambda module: {k: v.clone() for k, v in module.state_dict().items()}  # noqa: E731
    batch = trainer.batch(1)
    real, fake, real_pooled, fake_pooled, _, evaluation_keep = trainer.forwards(batch, 1, trainer.generator(1))
    assert [p.shape for p in real_pooled] == [p.shape for p in fake_pooled] == [(SMOKE.batch_size, 32)] * 3
    discriminator, pruners = snapshot(trainer.discriminator), snapshot(trainer.pruners)
    trainer.generator_step(batch, real, fake, fake_pooled, evaluation_keep, 1)
    assert all(torch.equal(v, trainer.discriminator.state_dict()[k]) for k, v in discriminator.items())
    assert not all(torch.equal(v, trainer.pruners.state_dict()[k]) for k, v in pruners.items())
    pruners = snapshot(trainer.pruners)
    trainer.discriminator_step(real_pooled, fake_pooled)
    assert all(torch.equal(v, trainer.pruners.state_dict()[k]) for k, v in pruners.items())
    assert not all(torch.equal(v, trainer.discriminator.state_dict()[k]) for k, v in discriminator.items())


def test_real_and_fake_pass_the_same_pooling():
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    torch.testing.assert_close(ramp(valid, 0.3, 1.0), torch.tensor([[0.3, 0.65, 1.0, 0.0], [0.3, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(ramp(valid, 0.05, 0.01), torch.tensor([[0.05, 0.03, 0.01, 0.0], [0.05, 0.01, 0.0, 0.0]]))
    states = torch.arange(8.0).view(2, 4, 1).expand(2, 4, 3)
    expected = torch.tensor([(0 * 0.3 + 1 * 0.65 + 2 * 1.0) / 1.95, (4 * 0.3 + 5 * 1.0) / 1.3])
    torch.testing.assert_close(pool_states(states, valid, None), expected[:, None].expand(2, 3))
    # Noise: the same draw for the same generator state, std falling along the sequence, none on padding.
    big = torch.zeros(2000, 4, 1)
    valid = torch.ones(2000, 4, dtype=torch.bool)
    noisy = pool_states(big, valid, torch.Generator().manual_seed(0), (0.05, 0.01), (1.0, 1.0))
    torch.testing.assert_close(noisy.std(), torch.tensor((0.05**2 + (0.05 * 2 / 3 + 0.01 / 3) ** 2 + (0.05 / 3 + 0.01 * 2 / 3) ** 2 + 0.01**2) ** 0.5 / 4), atol=1e-3, rtol=0)


def test_mask_losses_by_hand():
    keep = [torch.tensor([[1.0, 1.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0, 0.0]])]
    assert sparsity_loss(keep, (0.5, 0.5)).item() == pytest.approx((0 + 0.25**2) / 2)
    assert token_count_loss(keep).item() == pytest.approx(0.375)
    assert binarisation_loss([torch.tensor([[0.5, 1.0, 0.0, 0.1]])]).item() == pytest.approx((0.25 + 0.09) / 4)


def test_distillation_loss_by_hand():
    """KL(real || fake) at the positions that predict a labelled token, weighted like the task loss."""
    real = torch.zeros(1, 3, 2)
    fake = torch.zeros(1, 3, 2)
    fake[0, 1] = torch.tensor([0.0, 1.0])  # predicts label position 2
    fake[0, 0] = torch.tensor([5.0, 0.0])  # predicts position 1, unlabelled: not counted
    labels = torch.tensor([[-100, -100, 1]])
    weights = torch.tensor([[0.0, 0.0, 2.0]])
    q = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    expected = 0.5 * (torch.log(0.5 / q)).sum()
    assert distillation_loss(fake, real, labels, weights).item() == pytest.approx(expected.item())
    assert distillation_loss(real, real, labels, weights).item() == 0.0


def test_budget_term_and_dual_ascent_by_hand():
    keep = [torch.tensor([[1.0, 1.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0, 0.0]])]
    multipliers = torch.tensor([2.0, -1.0])
    assert budget_loss(keep, (0.25, 0.5), multipliers).item() == pytest.approx(2 * 0.25 - 1 * -0.25)
    updated = dual_ascent(multipliers, torch.tensor([0.3, 0.25]), (0.25, 0.5), lr=0.4, bound=10.0)
    torch.testing.assert_close(updated, torch.tensor([2.08, -1.2]))  # too many kept: up; too few: down (relative)
    updated = dual_ascent(multipliers, torch.tensor([1.0, 0.0]), (0.01, 0.5), lr=0.4, bound=2.2)
    torch.testing.assert_close(updated, torch.tensor([2.2, -1.4]))  # relative error clipped to 1, multiplier to 2.2


def test_a_positive_multiplier_pushes_the_evaluation_masks_toward_dropping():
    logits = torch.tensor([[0.3, -0.2, 12.0]], requires_grad=True)
    mask = evaluation_keep_mask(logits)
    assert mask.tolist() == [[1.0, 0.0, 1.0]]
    budget_loss([mask], (0.3,), torch.tensor([6.0])).backward()
    # Gradient descent lowers every logit alike, a saturated one too: fewer tokens kept.
    torch.testing.assert_close(logits.grad, torch.full((1, 3), 2.0))


def test_budget_targets_meet_the_registry_budget_or_refuse():
    assert keep_targets(GanTrainConfig(), (2, 4, 7), 12, 100) == SEED_TARGET_KEEP
    assert keep_targets(GanTrainConfig(target_keep=(0.6, 0.4, 0.2)), (2, 4, 7), 12, 100) == (0.6, 0.4, 0.2)
    for budget in (128, 192):  # of 576: the same targets as the fraction budget / 576 on any image
        targets = keep_targets(GanTrainConfig(budget=budget), (2, 4, 7), 12, 576)
        assert targets[1] == pytest.approx(targets[0] ** 2) and targets[2] == pytest.approx(targets[0] ** 3)
        assert 576 * average_keep_fraction(targets[0], (2, 4, 7), 12) == pytest.approx(budget)
        assert keep_targets(GanTrainConfig(budget=budget / 576), (2, 4, 7), 12, 100) == targets
    assert keep_targets(GanTrainConfig(budget=22), (2, 4, 7), 12, 100) == keep_targets(
        GanTrainConfig(budget=0.22), (2, 4, 7), 12, 100)
    with pytest.raises(ValueError, match=r"budget 0.1111 \(11 of 100 visual tokens\) is unreachable with pruning "
                                         r"layers .*reachable: 17\.\.100"):  # fmt: skip
        keep_targets(GanTrainConfig(budget=64 / 576), (2, 4, 7), 12, 100)
    with pytest.raises(ValueError, match="budget 101 is larger than the image's 100"):
        keep_targets(GanTrainConfig(budget=101), (2, 4, 7), 12, 100)
    with pytest.raises(ValueError, match="budget must be an integer >= 1 .* it is a bool"):
        GanTrainConfig(budget=True)


def test_a_step_moves_the_multipliers_by_the_evaluation_masks_keep_ratio(small_path):
    trainer = GanTrainer.build(replace(SMOKE, budget_lr=0.5), small_path)
    row = trainer.step(0)
    layers = trainer.stage_layers
    assert all(row[f"multiplier_layer_{layer}"] == 0.0 for layer in layers)  # the loss used the initial ones
    expected = [0.5 * min(max((row[f"eval_keep_layer_{layer}"] - t) / t, -1), 1) for layer, t in zip(layers, trainer.targets)]
    torch.testing.assert_close(trainer.multipliers, torch.tensor(expected), atol=1e-5, rtol=0)


# -- training -------------------------------------------------------------------------------------------------------
def test_tiny_run_is_reproducible_and_resumes_after_a_crash(tmp_path, small_path, monkeypatch):
    straight = train(SMOKE, small_path, tmp_path / "straight", progress=False)
    real_batch = train_module.gan_batch

    def crash_at_step_3(processor, scenes, *args):
        if scenes == batch_scenes(SMOKE.world_seed, 3, SMOKE.batch_size):
            raise KeyboardInterrupt("simulated crash")
        return real_batch(processor, scenes, *args)

    monkeypatch.setattr(train_module, "gan_batch", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(SMOKE, small_path, tmp_path / "resumed", progress=False)
    assert (tmp_path / "resumed" / train_module.STATE_FILE).exists()  # saved after step 2
    monkeypatch.setattr(train_module, "gan_batch", real_batch)
    with pytest.raises(ValueError, match="another config"):
        train(replace(SMOKE, lr=1e-4), small_path, tmp_path / "resumed", progress=False)
    resumed = train(SMOKE, small_path, tmp_path / "resumed", progress=False)

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "curves.jsonl").read_text() == (resumed / "curves.jsonl").read_text()
    rows = [json.loads(line) for line in (straight / "curves.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and {"keep_layer_1", "keep_layer_3", "undecided_share",
                                                              "discriminator_accuracy_real"} <= rows[0].keys()  # fmt: skip
    assert (straight / "curves.png").is_file() and not (straight / train_module.STATE_FILE).exists()
    assert GanLayerPruners.from_pretrained(straight).config.pruning_layers == [1, 2, 3]


def test_cli_trains_and_the_result_evaluates(tmp_path, small_path):
    assert main(["gan-pruner", "train", "--model", str(small_path), "--output-dir", str(tmp_path), "--steps", "1",
                 "--batch-size", "1", "--pruner-hidden", "8", "--pruner-heads", "2", "--discriminator-width", "8",
                 "--target-keep", "0.6", "0.4", "0.2", "--spectral-norm", "false", "--no-progress"]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "training.json").read_text())
    assert summary["config"]["target_keep"] == [0.6, 0.4, 0.2] and summary["config"]["spectral_norm"] is False
    assert GanPruner(pruner_path=str(tmp_path)).resolve_stages(4, 16)[0].layer == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: GanPruner(mode="soft"), "GanPruner.mode"),
        (lambda: GanPruner(), "GanPruner.pruner_path"),
        (lambda: GanPruner(pruner_path="/nonexistent"), "GanPruner.pruner_path"),
        (lambda: GanPrunerConfig(num_hidden_layers=4, pruning_layers=[1, 4]), "pruning_layers"),
        (lambda: GanPrunerConfig(gumbel="hard"), "gumbel"),
        (lambda: GanTrainConfig(target_keep=(0.5, 0.3)), "target_keep"),
        (lambda: GanTrainConfig(target_keep=(0.5, 0.3, 0.1), budget=128), "target_keep or budget"),
        (lambda: GanTrainConfig(budget=0), "budget"),
        (lambda: GanTrainConfig(budget_lr=-1.0), "budget_lr"),
        (lambda: GanTrainConfig(budget_bound=0.0), "budget_bound"),
        (lambda: GanTrainConfig(temperature=(0.99, 0.0)), "temperature"),
        (lambda: GanTrainConfig(steps=0), "steps"),
    ],
)
def test_bad_settings_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# -- matched controls -----------------------------------------------------------------------------------------------
def test_matched_controls_take_the_pruners_measured_counts(tmp_path, small_path, pruner_path):
    from rcpp_hf.gan_training.baselines import matched_baselines, write_presets

    counts = write_presets(small_path, pruner_path, tmp_path, seed=1, num_images=2, progress=False)
    assert counts["layers"] == [1, 2, 3] and counts["prompts"] == 2 * 6 + 2
    kept = counts["mean_kept"]
    assert 16 >= kept[0] >= kept[1] >= kept[2] >= 1
    # Average visual tokens per layer of 4: all 16 before layer 1, then each stage's mean count.
    assert counts["visual_tokens_per_layer"] == pytest.approx((16 + sum(kept)) / 4)
    label = pruner_path.resolve().name
    methods = {path.stem.removeprefix(label): load_method(str(path)) for path in tmp_path.glob("*.yaml")}
    assert methods[""].pruner_path == str(pruner_path.resolve())
    assert methods["_random"].layers == (1, 2, 3) and methods["_random"].keep == tuple(round(k) for k in kept)
    assert methods["_fastv"].layer == 1 and methods["_fastv"].budget == round(counts["visual_tokens_per_layer"])
    # In top_k mode the counts are the trained shares exactly, and the files say so.
    pruners = GanLayerPruners.from_pretrained(pruner_path)
    pruners.config.target_keep = [0.5, 0.25, 0.1]
    pruners.save_pretrained(tmp_path / "trained")
    counts = write_presets(small_path, tmp_path / "trained", tmp_path / "top_k", seed=1, num_images=1, progress=False,
                           mode="top_k")  # fmt: skip
    assert counts["mean_kept"] == [8, 4, 2] and (tmp_path / "top_k" / "counts_top_k.json").is_file()
    assert load_method(str(tmp_path / "top_k" / "trained_top_k.yaml")).mode == "top_k"
    assert load_method(str(tmp_path / "top_k" / "trained_top_k_random.yaml")).keep == (8, 4, 2)
    # Rounding never lets a later stage keep more than an earlier one.
    assert matched_baselines({"layers": [1, 2], "mean_kept": [3.4, 3.6], "visual_tokens_per_layer": 5.0})[
        "random"].keep == (3, 3)
