"""The contrastive decoders (VCD, SID) and the plausibility-cutoff control: VCD's noise and both fusions against hand
computation, SID's contrast selection against a hand attention row, contrast weight 0 token-identical to greedy
`generate`, batch 2 with left padding equal to its rows alone, the two caches, sampling, and bad settings."""

import json

import pytest
import torch
from transformers import GenerationConfig

from rcpp_hf import RCPPGenerationConfig
from rcpp_hf.methods import SID, VCD, FastV, PlausibilityCutoff, load_method
from rcpp_hf.methods.contrastive_decoder import contrastive_fuse
from rcpp_hf.methods.sid import LeastAttended
from rcpp_hf.methods.vcd import diffusion_noise, forward_diffusion, vcd_noise_schedule
from tests.conftest import row_alone
from tests.test_prefill_pruning import hand_context

PEERS = [VCD(), SID(), PlausibilityCutoff()]


def generate(model, inputs, method, **kwargs):
    config = RCPPGenerationConfig(**{"rcpp": False, "methods": [method], "max_new_tokens": 6, "do_sample": False,
                                     **kwargs})
    return model.generate(**inputs, generation_config=config)


# -- VCD's noise ----------------------------------------------------------------------------------------------------
def test_vcd_schedule_and_forward_noising_by_hand():
    alpha_bar = vcd_noise_schedule()
    beta_0 = torch.sigmoid(torch.tensor(-6.0, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    assert alpha_bar.shape == (1000,) and alpha_bar[0] == pytest.approx(1 - float(beta_0))
    assert alpha_bar[1] == pytest.approx((1 - float(beta_0)) * (1 - (float(torch.sigmoid(torch.tensor(-6 + 12 / 999,
                                         dtype=torch.float64))) * (0.5e-2 - 1e-5) + 1e-5)))  # fmt: skip
    assert 0 < alpha_bar[-1] < alpha_bar[500] < alpha_bar[0] < 1
    x0 = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    eps = torch.tensor([[0.3, 1.0], [-1.0, 2.0]])
    # sqrt(0.64) x0 + sqrt(0.36) eps
    torch.testing.assert_close(forward_diffusion(x0, 0.64, eps), torch.tensor([[0.98, -1.0], [-0.2, 1.2]]))


def test_vcd_noise_is_seeded_and_shared_by_the_batch():
    pixels = torch.randn(2, 3, 4, 4)
    noisy = diffusion_noise(pixels, 500, seed=7)
    eps = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(7))
    a = float(vcd_noise_schedule()[500])
    torch.testing.assert_close(noisy, a ** 0.5 * pixels + (1 - a) ** 0.5 * eps[None])
    torch.testing.assert_close(diffusion_noise(pixels, 500, seed=7), noisy)
    assert not torch.equal(diffusion_noise(pixels, 500, seed=8), noisy)
    torch.testing.assert_close(diffusion_noise(pixels, 0, seed=7), pixels, atol=0.02, rtol=0)  # step 0: barely noised


# -- the fusion and the cutoff ------------------------------------------------------------------------------------
def test_fusion_and_cutoff_by_hand():
    main = torch.tensor([[2.0, 1.0, 0.0, -3.0]])
    contrast = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    # (1 + a) main - a contrast, a = 1: [3, 0, 0, -6]
    torch.testing.assert_close(contrastive_fuse(main, contrast, 1.0), torch.tensor([[3.0, 0.0, 0.0, -6.0]]))
    torch.testing.assert_close(contrastive_fuse(main, contrast, 0.0), main)
    # p(main) = [0.662, 0.244, 0.090, 0.004]; beta 0.2 cuts p < 0.132: tokens 2 and 3 (beta 0.1: token 3 only)
    fused = VCD(alpha=1.0, plausibility_beta=0.2).fuse(main, contrast)
    assert fused[0, :2].tolist() == [3.0, 0.0] and fused[0, 2:].isneginf().all()
    sid = SID(alpha=0.5, plausibility_beta=0.3).fuse(main, contrast)  # 1.5 main - 0.5 contrast = [2.5, 0.5, ..]
    assert sid[0, :2].tolist() == [2.5, 0.5] and sid[0, 2:].isneginf().all()
    cutoff = PlausibilityCutoff(plausibility_beta=0.1).fuse(main, None)
    assert cutoff[0, :3].tolist() == [2.0, 1.0, 0.0] and cutoff[0, 3].isneginf()
    torch.testing.assert_close(PlausibilityCutoff(plausibility_beta=0.0).fuse(main, None), main)


# -- SID's selection ----------------------------------------------------------------------------------------------
def test_sid_keeps_the_least_attended_image_tokens():
    # Two heads; the last row's attention over 7 entries. Head mean on the image: [0.15, 0.05, 0.3, 0.1].
    probs = torch.tensor([[[[0.1, 0.1, 0.2, 0.0, 0.4, 0.1, 0.1]], [[0.2, 0.2, 0.1, 0.1, 0.2, 0.1, 0.1]]]])
    ctx = hand_context(probs, keep=2)
    assert sorted(LeastAttended(keep=2, layer=1).select(ctx)[0].tolist()) == [1, 3]
    assert sorted(FastV(keep=2, layer=1).select(ctx)[0].tolist()) == [0, 2]  # its opposite


def test_sid_scales_layer_and_count_to_the_model():
    assert SID().selection(32, 576).resolve_stages(32, 576)[0].layer == 2
    assert SID().selection(32, 576).keep == 100
    tiny = SID().selection(4, 16)
    assert (tiny.layer, tiny.keep) == (1, 3)  # 2 of 32 layers -> 1 of 4; 100 of 576 tokens -> 3 of 16
    with pytest.raises(ValueError, match="SID.keep = 17"):
        SID(keep=17).selection(4, 16)
    with pytest.raises(ValueError, match="SID.layer = 4"):
        SID(layer=4).selection(4, 16)


def test_sid_contrast_cache_holds_only_the_kept_tokens(rcpp_model, batch2):
    config = RCPPGenerationConfig(rcpp=False, methods=[SID(keep=3, layer=2)], max_new_tokens=4, do_sample=False,
                                  return_dict_in_generate=True)  # fmt: skip
    out = rcpp_model.generate(**batch2, generation_config=config)
    main, contrast = out.past_key_values, out.contrast_past_key_values
    assert [layout.num_visual for layout in main.layouts] == [16] * 4
    assert [layout.num_visual for layout in contrast.layouts] == [16, 16, 3, 3]
    prompt = batch2["input_ids"].shape[1]
    assert main.get_seq_length() == prompt + 3  # the last token is never fed back
    assert contrast.layers[3].keys.shape[-2] == prompt + 3 - 13


# -- equivalences in generate ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [VCD(alpha=0.0), SID(alpha=0.0), VCD(alpha=0.0, plausibility_beta=0.0),
                                    PlausibilityCutoff(plausibility_beta=0.0), PlausibilityCutoff()])
def test_zero_contrast_is_greedy(vanilla_model, rcpp_model, batch2, method):
    expected = vanilla_model.generate(**batch2, generation_config=GenerationConfig(max_new_tokens=6, do_sample=False))
    assert torch.equal(generate(rcpp_model, batch2, method), expected)


@pytest.mark.parametrize("method", [VCD(alpha=3.0, plausibility_beta=0.0),
                                    SID(alpha=3.0, keep=2, plausibility_beta=0.0)])
def test_contrast_changes_tokens_and_batch_equals_rows(varied_tiny_path, processor, batch2, method):
    from rcpp_hf import RCPPLlavaForConditionalGeneration

    model = RCPPLlavaForConditionalGeneration.from_pretrained(varied_tiny_path, dtype=torch.float32).eval()
    plain = generate(model, batch2, load_method(method, alpha=0.0))
    batched = generate(model, batch2, method)
    assert not torch.equal(batched, plain)
    prompt = batch2["input_ids"].shape[1]
    for row in range(2):
        real = batch2["attention_mask"][row].bool()
        single = generate(model, row_alone(batch2, row), method)
        assert torch.equal(single[0, int(real.sum()):], batched[row, prompt:]), row


def test_sampling_goes_through_the_cutoff(rcpp_model, batch2):
    """beta = 1 leaves only the main branch's most probable token: sampling then decodes as greedy; beta = 0 samples
    from the whole vocabulary (the tiny model's flat distribution makes that differ), reproducibly under a seed."""
    greedy = generate(rcpp_model, batch2, PlausibilityCutoff(plausibility_beta=0.0))
    for method in (PlausibilityCutoff(plausibility_beta=1.0), VCD(alpha=0.0, plausibility_beta=1.0)):
        assert torch.equal(generate(rcpp_model, batch2, method, do_sample=True, top_k=0), greedy)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(generate(rcpp_model, batch2, VCD(plausibility_beta=0.0), do_sample=True, top_k=0))
    assert torch.equal(*runs) and not torch.equal(runs[0], greedy)


def test_scores_are_the_fused_logits(rcpp_model, batch1):
    config = RCPPGenerationConfig(rcpp=False, methods=[VCD(alpha=1.0, plausibility_beta=0.5)], max_new_tokens=3,
                                  do_sample=False, return_dict_in_generate=True, output_logits=True)  # fmt: skip
    out = rcpp_model.generate(**batch1, generation_config=config)
    assert len(out.logits) == 3 and all(step.isneginf().any() for step in out.logits)
    assert out.contrast_past_key_values is not out.past_key_values


# -- refusals and settings ----------------------------------------------------------------------------------------
def test_contrastive_decoders_refuse_rcpp_and_other_methods(rcpp_model, batch1):
    with pytest.raises(ValueError, match="vcd is a contrastive decoder and does not compose with RCPP"):
        rcpp_model.generate(**batch1, generation_config=RCPPGenerationConfig(methods=["vcd"], max_new_tokens=2))
    with pytest.raises(ValueError, match=r"sid is a contrastive decoder and runs alone; got it with \['fastv'\]"):
        config = RCPPGenerationConfig(rcpp=False, methods=["sid", FastV(keep=4)], max_new_tokens=2)
        rcpp_model.generate(**batch1, generation_config=config)
    with pytest.raises(ValueError, match="cannot be combined"):
        RCPPGenerationConfig(rcpp=False, methods=["vcd", "sid"])


@pytest.mark.parametrize("name, settings, field", [
    ("vcd", {"alpha": -1.0}, "VCD.alpha"),
    ("vcd", {"plausibility_beta": 1.5}, "VCD.plausibility_beta"),
    ("vcd", {"noise_step": 1000}, "VCD.noise_step"),
    ("vcd", {"seed": -1}, "VCD.seed"),
    ("sid", {"layer": 0}, "SID.layer"),
    ("sid", {"keep": 0}, "SID.keep"),
    ("sid", {"alpha": float("inf")}, "SID.alpha"),
    ("plausibility_cutoff", {"plausibility_beta": -0.1}, "PlausibilityCutoff.plausibility_beta"),
])
def test_wrong_settings_name_the_field(name, settings, field):
    with pytest.raises(ValueError, match=field):
        load_method(name, **settings)


def test_round_trip_through_the_generation_config(tmp_path):
    config = RCPPGenerationConfig(rcpp=False, methods=[VCD(alpha=0.5, noise_step=999)])
    config.to_yaml(tmp_path / "vcd.yaml")
    assert RCPPGenerationConfig.from_yaml(tmp_path / "vcd.yaml").methods == (VCD(alpha=0.5, noise_step=999),)


def test_cli_generate_and_bench(tiny_path, tmp_path, capsys):
    from rcpp_hf.cli import main

    assert main(["generate", "--model", str(tiny_path), "--method", "sid", "--max-new-tokens", "3"]) == 0
    assert "== sid()" in (out := capsys.readouterr().out) and "contrast branch's cache" in out
    assert main(["bench", "--shape", "tiny", "--methods", "vanilla,vcd,sid,plausibility_cutoff", "--new-tokens", "5",
                 "--repeats", "1", "--output", str(tmp_path / "bench.json")]) == 0  # fmt: skip
    methods = json.loads((tmp_path / "bench.json").read_text())["methods"]
    assert [methods[m]["contrast_step_fraction"] for m in ("vcd", "sid", "plausibility_cutoff")] == [1.0, 1.0, 0.0]
    assert methods["sid"]["final_cache_bytes"] < methods["vcd"]["final_cache_bytes"] == 2 * methods["vanilla"][
        "final_cache_bytes"]  # fmt: skip
    assert methods["plausibility_cutoff"]["final_cache_bytes"] == methods["vanilla"]["final_cache_bytes"]
