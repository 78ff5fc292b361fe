"""MC-LCBF steering: the barrier and its step against hand computation and finite differences, the correction in the
layer's cache, neutral settings equal to vanilla, half precision inside generate, per-row image spans, bad input."""

import math

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from rcpp_hf import RCPPGenerationConfig, RCPPLlavaForConditionalGeneration
from rcpp_hf.engine.attention import (
    attention_probs,
    normed_states,
    probe_query,
    project_heads,
    prompt_keys,
)
from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.engine.decoder import DecoderTap, run_decoder
from rcpp_hf.engine.layout import TokenLayout
from rcpp_hf.methods import MCLCBF, FastV, check_compatible, load_method
from rcpp_hf.methods.mc_lcbf import barrier_step, image_attention_mass
from tests.conftest import row_alone
from tests.test_prefill_pruning import decode, prefill, prompt_layout

STEER_ALL = dict(prefill_tau=1.0, decode_tau=1.0, max_scale=1e4)  # every row below the barrier, unclamped


class Inputs(DecoderTap):
    """Records the hidden states entering each layer (as the taps before it left them)."""

    def __init__(self):
        self.hidden = {}

    def before_layer(self, layer_idx, hidden, layout):
        self.hidden[layer_idx] = hidden.clone()


def generate(model, inputs, method=None, **kwargs):
    config = RCPPGenerationConfig(rcpp=False, methods=[method] if method else [], max_new_tokens=6, do_sample=False,
                                  **kwargs)  # fmt: skip
    return model.generate(**inputs, generation_config=config)


# -- the barrier and the step, by hand ----------------------------------------------------------------------------
def test_barrier_and_step_equal_hand_computation():
    """One head of dimension 2, identity projections, position 0 (RoPE is the identity): for x = (3, 4),
    q = x / rms(x); keys (1, 0) (image) and (0, 1) (text); h = sigmoid(s q.(k_img - k_txt)), and grad_x h by the
    RMSNorm Jacobian (I - x x^T / (n r^2)) / r."""
    config = LlamaConfig(hidden_size=2, intermediate_size=4, num_attention_heads=1, num_key_value_heads=1, head_dim=2,
                         rms_norm_eps=0.0)  # fmt: skip
    layer = LlamaDecoderLayer(config, layer_idx=0)
    with torch.no_grad():
        layer.self_attn.q_proj.weight.copy_(torch.eye(2))
    x = torch.tensor([[[3.0, 4.0]]], requires_grad=True)
    cos, sin = torch.ones(1, 1, 2), torch.zeros(1, 1, 2)
    keys = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    image = torch.tensor([[True, False]])
    query = probe_query(layer, x, cos, sin)
    h = image_attention_mass(attention_probs(query, keys, layer.self_attn.scaling, torch.ones(1, 1, 2, dtype=torch.bool)),
                             image)  # fmt: skip
    (grad,) = torch.autograd.grad(h.sum(), x)

    r = math.sqrt((9 + 16) / 2)
    s = 1 / math.sqrt(2)
    q = (3 / r, 4 / r)
    expected_h = 1 / (1 + math.exp(-s * (q[0] - q[1])))
    dh_dq = (expected_h * (1 - expected_h) * s, -expected_h * (1 - expected_h) * s)
    jac = [[(1.0 if i == j else 0.0) - (3, 4)[i] * (3, 4)[j] / (2 * r * r) for j in range(2)] for i in range(2)]
    expected_grad = [sum(jac[j][i] * dh_dq[j] for j in range(2)) / r for i in range(2)]
    assert h.item() == pytest.approx(expected_h, abs=1e-6)  # 0.450166
    assert grad[0, 0].tolist() == pytest.approx(expected_grad, abs=1e-6)
    assert (grad[0, 0] @ x[0, 0]).item() == pytest.approx(0.0, abs=1e-6)  # RMSNorm: the gradient is orthogonal to x

    norm_sq = sum(g * g for g in expected_grad)
    unclamped = (0.6 - expected_h) / (norm_sq + 1e-6)  # about 31.2
    theta = barrier_step(h.detach(), grad, tau=0.6, max_scale=100.0, eps=1e-6)
    assert theta[0, 0].tolist() == pytest.approx([unclamped * g for g in expected_grad], rel=1e-5)
    clamped = barrier_step(h.detach(), grad, tau=0.6, max_scale=0.5, eps=1e-6)  # the reference code's clamp
    assert clamped[0, 0].tolist() == pytest.approx([0.5 * g for g in expected_grad], rel=1e-5)
    assert torch.equal(barrier_step(h.detach(), grad, tau=0.4, max_scale=0.5, eps=1e-6), torch.zeros_like(grad))


# -- the gradient ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("barrier", ["softmax", "energy"])
def test_gradient_matches_finite_differences(rcpp_model, batch2, barrier):
    """grad_x h of the last prompt row at layer 2 (keys held fixed) against central differences along random
    directions, in float32."""
    inputs = Inputs()
    _, _, cache = prefill(rcpp_model, batch2, [inputs])
    language_model = rcpp_model.model.language_model
    layer, layout = language_model.layers[2], prompt_layout(rcpp_model, batch2)
    hidden = inputs.hidden[2]
    cos, sin = language_model.rotary_emb(hidden, position_ids=layout.positions)
    keys = prompt_keys(layer, hidden, cos, sin)
    tap = MCLCBF(decode_barrier=barrier).tap(language_model, cache)
    phase = "decode" if barrier == "energy" else "prefill"  # the energy barrier is the decode phase's option

    def h(x):
        return tap.barrier(layer, x, cos[:, -1:], sin[:, -1:], keys, layout, phase)

    x = hidden[:, -1:].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(h(x).sum(), x)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        direction = torch.randn(x.shape, generator=generator)
        direction /= direction.norm(dim=-1, keepdim=True)
        step = 1e-2 * x.detach().norm(dim=-1, keepdim=True)
        with torch.no_grad():
            numeric = (h(x + step * direction) - h(x - step * direction)) / (2 * step[..., 0])
        analytic = (grad * direction).sum(-1)
        torch.testing.assert_close(numeric, analytic, rtol=3e-2, atol=1e-5)


# -- the correction enters the layer ------------------------------------------------------------------------------
def test_correction_is_in_the_layers_cached_keys_and_values(rcpp_model, batch2):
    """At prefill (last prompt row) and at a decode step, the steered layer caches k / v of x + alpha * theta; the
    other rows and the unsteered layers are untouched."""
    language_model = rcpp_model.model.language_model
    before, after = Inputs(), Inputs()
    cache = VisualKVCache(config=rcpp_model.config)
    tap = MCLCBF(layers=(2,), **STEER_ALL).tap(language_model, cache)
    layout = prompt_layout(rcpp_model, batch2)
    with torch.no_grad():
        embeds = rcpp_model.family.embed_prompt(batch2["input_ids"], {"pixel_values": batch2["pixel_values"]})
        run_decoder(language_model, embeds, layout, cache, [before, tap, after])
    layer = language_model.layers[2]

    def check_last_entry(layout_positions):
        delta = after.hidden[2] - before.hidden[2]
        assert torch.equal(delta[:, :-1], torch.zeros_like(delta[:, :-1]))  # only the target row moves
        assert (delta[:, -1].norm(dim=-1) > 1e-3 * before.hidden[2][:, -1].norm(dim=-1)).all()
        torch.testing.assert_close(delta[:, -1].norm(dim=-1), tap.records[-1].delta_norm[:, -1])
        cos, sin = language_model.rotary_emb(after.hidden[2], position_ids=layout_positions)
        keys = prompt_keys(layer, after.hidden[2], cos, sin)[:, :, -1]
        values = project_heads(layer.self_attn.v_proj, normed_states(layer.input_layernorm, after.hidden[2]),
                               layer.self_attn.head_dim)[:, :, -1]  # fmt: skip
        torch.testing.assert_close(cache.layers[2].keys[:, :, -1], keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.layers[2].values[:, :, -1], values, atol=1e-5, rtol=1e-5)
        unsteered = prompt_keys(layer, before.hidden[2], cos, sin)[:, :, -1]
        assert not torch.allclose(cache.layers[2].keys[:, :, -1], unsteered, atol=1e-4)
        assert torch.equal(after.hidden[1], before.hidden[1]) and torch.equal(after.hidden[3], before.hidden[3])

    check_last_entry(layout.positions)
    assert [r.phase for r in tap.records] == ["prefill"]
    positions = layout.positions[:, -1:] + 1
    decode(rcpp_model, cache, torch.tensor([[7], [9]]), positions, [before, tap, after])
    check_last_entry(positions)
    assert [r.phase for r in tap.records] == ["prefill", "decode"]


def steered_prefill(model, batch, method):
    """The prompt's forward with `method`'s tap (built on the forward's own cache) -> the tap."""
    language_model = model.model.language_model
    cache = VisualKVCache(config=model.config)
    tap = method.tap(language_model, cache)
    with torch.no_grad():
        embeds = model.family.embed_prompt(batch["input_ids"], {"pixel_values": batch["pixel_values"]})
        run_decoder(language_model, embeds, prompt_layout(model, batch), cache, [tap])
    return tap


def test_per_row_image_spans_with_left_padding(rcpp_model, batch2):
    """Batched with a left-padded row, each row's barrier and step equal those of the row run alone."""
    method = MCLCBF(**STEER_ALL)
    batched = steered_prefill(rcpp_model, batch2, method)
    assert [r.layer for r in batched.records] == [1, 2, 3]
    for row in range(2):
        tap = steered_prefill(rcpp_model, row_alone(batch2, row), method)
        for batched_record, record in zip(batched.records, tap.records):
            torch.testing.assert_close(batched_record.h[row], record.h[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched_record.delta_norm[row], record.delta_norm[0], atol=1e-5, rtol=1e-4)


# -- inside generate ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("neutral", [dict(prefill_alpha=0.0, decode_alpha=0.0), dict(prefill_tau=0.0, decode_tau=0.0)],
                         ids=["alpha=0", "tau=0"])  # fmt: skip
def test_neutral_settings_are_vanilla(vanilla_model, rcpp_model, batch2, neutral):
    expected = vanilla_model.generate(**batch2, generation_config=GenerationConfig(max_new_tokens=6, do_sample=False))
    assert torch.equal(generate(rcpp_model, batch2, MCLCBF(**neutral)), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_steers_inside_generate_in_half_precision(tiny_path, batch2, dtype):
    """Under inference_mode (as the evaluations call generate), in half precision: neutral is vanilla, a strong
    barrier changes the logits at the first token (prefill) and later (decode alone)."""
    model = RCPPLlavaForConditionalGeneration.from_pretrained(tiny_path, dtype=dtype).eval()
    inputs = {**batch2, "pixel_values": batch2["pixel_values"].to(dtype)}
    kwargs = dict(return_dict_in_generate=True, output_logits=True)
    with torch.inference_mode():
        vanilla = generate(model, inputs, MCLCBF(prefill_alpha=0.0, decode_alpha=0.0), **kwargs)
        reference = model.generate(**inputs, generation_config=GenerationConfig(max_new_tokens=6, do_sample=False))
        steered = generate(model, inputs, MCLCBF(prefill_alpha=50.0, decode_alpha=50.0, **STEER_ALL), **kwargs)
        decode_only = generate(model, inputs, MCLCBF(prefill=False, decode_alpha=50.0, **STEER_ALL), **kwargs)
    assert torch.equal(vanilla.sequences, reference)
    assert not torch.equal(steered.logits[0], vanilla.logits[0])
    assert torch.equal(decode_only.logits[0], vanilla.logits[0])  # decode steering cannot move the prefill's answer
    assert not torch.equal(decode_only.logits[1], vanilla.logits[1]) or not torch.equal(
        decode_only.sequences, vanilla.sequences
    )


# -- the registry and bad input -----------------------------------------------------------------------------------
def test_registry_defaults_and_composition(tmp_path):
    assert MCLCBF().steered_layers(32) == tuple(range(10, 28))
    assert MCLCBF().steered_layers(4) == (1, 2, 3)
    check_compatible((FastV(budget=64), MCLCBF()))  # a pruner and a steering method act in different places
    MCLCBF(prefill_tau=0.5, decode_barrier="energy", decode_tau=3.0).to_yaml(tmp_path / "m.yaml")
    assert load_method(tmp_path / "m.yaml") == MCLCBF(prefill_tau=0.5, decode_barrier="energy", decode_tau=3.0)
    with pytest.raises(ValueError, match="cannot be combined"):
        check_compatible((MCLCBF(), MCLCBF()))


@pytest.mark.parametrize("settings, field", [
    (dict(prefill_tau=1.5), "prefill_tau"), (dict(decode_tau=-0.1), "decode_tau"),
    (dict(prefill_alpha=-1.0), "prefill_alpha"), (dict(decode_alpha=-0.5), "decode_alpha"),
    (dict(layers=()), "layers"), (dict(layers=(-1,)), "layers"), (dict(decode_barrier="dot"), "decode_barrier"),
    (dict(max_scale=0.0), "max_scale"), (dict(eps=0.0), "eps"), (dict(decode="yes"), "decode"),
])  # fmt: skip
def test_invalid_settings_name_the_field(settings, field):
    with pytest.raises(ValueError, match=f"MCLCBF.{field} ="):
        MCLCBF(**settings)


def test_layers_out_of_range_and_prompts_without_image(rcpp_model, batch2, processor):
    with pytest.raises(ValueError, match="MCLCBF.layers = .*out of range for a decoder with 4 layers"):
        generate(rcpp_model, batch2, MCLCBF(layers=(1, 4)))
    text_only = processor(text=["USER: hello there ASSISTANT:"], return_tensors="pt")
    with pytest.raises(ValueError, match="need image tokens"):
        generate(rcpp_model, text_only, MCLCBF())
    # the tap itself refuses a prompt without image tokens (e.g. driven by run_decoder directly)
    language_model = rcpp_model.model.language_model
    ids = text_only["input_ids"]
    layout = TokenLayout.prompt(torch.arange(ids.shape[1])[None], torch.ones_like(ids, dtype=torch.bool), ids < 0)
    cache = VisualKVCache(config=rcpp_model.config)
    with torch.no_grad(), pytest.raises(ValueError, match="mc_lcbf needs image tokens"):
        run_decoder(language_model, language_model.embed_tokens(ids), layout, cache, [MCLCBF().tap(language_model, cache)])
