"""MC-LCBF, examined on the embedded ShapesWorld model (test world, seed 2).

(a) the original wrapper (`dual_phase_decoder_wrapper`, the code MC-LCBF's author shared with the report that the
    method left POPE unchanged; "the note" in the output's keys), run on transformers 5.23 with one line ported (its
    decode-phase key lookup, which raises there), counting which of its steps act;
(b) the author's three questions, with rcpp_hf's `MCLCBF` at prefill: gradient with / without the RMSNorm, probe keys
    against cached keys, ||delta|| / ||x|| at the steered layers, what is left at the last layer and in the
    yes-minus-no logit gap.
    python experiments/mc_lcbf_study.py [NUM_QUESTIONS]     (prints JSON)
"""

import json
import math
import sys
import tempfile
import types
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from rcpp_hf.default_model import default_model_path
from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.engine.decoder import DecoderTap, run_decoder
from rcpp_hf.engine.layout import TokenLayout
from rcpp_hf.methods import MCLCBF
from rcpp_hf.methods.mc_lcbf import image_attention_mass
from rcpp_hf.engine.attention import attention_probs, project_heads, prompt_keys
from rcpp_hf.modeling import RCPPLlavaForConditionalGeneration
from rcpp_hf.shapesworld.conversations import chat_prompt
from rcpp_hf.shapesworld.evaluate import EvalSettings, split_items
from rcpp_hf.shapesworld.render import IMAGE_FOLDER
from rcpp_hf.shapesworld.world import TEST_SEED

PATH = default_model_path()
# The original code's global settings, at its defaults ("note" below: the original code).
NOTE = {"is_active": True, "prefill_tau": 0.2, "prefill_alpha": 1.0, "decode_tau": 0.2, "decode_alpha": 0.5,
        "steer_layers": list(range(10, 28)), "img_start": 1, "img_end": 577}
COUNT = Counter()
REL_DELTA = []


def note_wrapper(original_forward, layer_idx):
    """The original `dual_phase_decoder_wrapper`, its logic verbatim except: counters (COUNT, REL_DELTA), and the
    decode key lookup `past_key_values[layer_idx][0]` -> `past_key_values.layers[layer_idx].keys` (5.23's Cache is
    not subscriptable; the original raises TypeError there)."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None, output_attentions=False,
                use_cache=False, cache_position=None, position_embeddings=None, **kwargs):
        bsz, seq_len, hidden_size = hidden_states.size()
        COUNT["calls"] += 1
        COUNT.update(f"kwarg:{k}" for k in kwargs)
        COUNT["past_key_value is None"] += past_key_value is None
        COUNT["cache_position is None"] += cache_position is None
        if NOTE["is_active"] and layer_idx in NOTE["steer_layers"]:
            phase = "prefill" if seq_len > 1 else "decode"
            COUNT[f"{phase}:steer_layer"] += 1
            target_slice = slice(-1, None) if seq_len > 1 else slice(None)
            tau = NOTE[f"{phase}_tau"]
            alpha = NOTE[f"{phase}_alpha"]
            with torch.enable_grad():
                x_full_resid = hidden_states
                x_t_resid = x_full_resid[:, target_slice, :].clone().detach().requires_grad_(True)
                COUNT[f"{phase}:x requires grad"] += x_t_resid.requires_grad
                x_t_norm = self.input_layernorm(x_t_resid)
                num_heads = self.self_attn.config.num_attention_heads
                num_kv_heads = getattr(self.self_attn.config, "num_key_value_heads", num_heads)
                head_dim = hidden_size // num_heads
                q_probe = self.self_attn.q_proj(x_t_norm).view(bsz, x_t_resid.shape[1], num_heads, head_dim).transpose(1, 2)
                cos, sin = position_embeddings
                q_probe, _ = apply_rotary_pos_emb(q_probe, q_probe, cos[:, target_slice], sin[:, target_slice])
                img_start, img_end = NOTE["img_start"], NOTE["img_end"]
                all_keys = None
                if seq_len > 1:
                    with torch.no_grad():
                        x_full_norm = self.input_layernorm(x_full_resid.detach())
                        k_full = self.self_attn.k_proj(x_full_norm).view(bsz, seq_len, num_kv_heads, head_dim).transpose(1, 2)
                        k_full, _ = apply_rotary_pos_emb(k_full, k_full, cos, sin)
                    all_keys = k_full
                else:
                    if past_key_value is not None:
                        all_keys = past_key_value[0]
                    elif kwargs.get("past_key_values") is not None and len(kwargs.get("past_key_values")) > layer_idx:
                        all_keys = kwargs.get("past_key_values").layers[layer_idx].keys  # PORTED (was [layer_idx][0])
                if all_keys is not None:
                    COUNT[f"{phase}:keys found"] += 1
                    if num_heads != num_kv_heads:
                        all_keys = repeat_kv(all_keys, num_heads // num_kv_heads)
                    attn_probs = F.softmax(torch.matmul(q_probe, all_keys.transpose(-1, -2)) / math.sqrt(head_dim), dim=-1)
                    valid_end = min(img_end, attn_probs.shape[-1])
                    valid_start = min(img_start, valid_end)
                    COUNT[f"{phase}:span covers keys"] += valid_end - valid_start
                    COUNT[f"{phase}:keys"] += attn_probs.shape[-1]
                    if valid_end > valid_start:
                        h_val = attn_probs[:, :, :, valid_start:valid_end].sum(dim=-1).mean()
                        COUNT[f"{phase}:h sum"] += float(h_val)
                        if h_val < tau:
                            COUNT[f"{phase}:h < tau"] += 1
                            grads = torch.autograd.grad(h_val, x_t_resid, retain_graph=False)[0]
                            scale = (tau - h_val) / (torch.sum(grads * grads) + 1e-6)
                            COUNT[f"{phase}:clamped"] += bool(scale > 0.5)
                            if scale > 0.5:
                                scale = 0.5
                            theta = scale * grads
                            before = hidden_states[:, target_slice, :].clone()
                            hidden_states[:, target_slice, :] += alpha * theta.detach()
                            COUNT[f"{phase}:stepped"] += 1
                            COUNT[f"{phase}:residual changed"] += bool((hidden_states[:, target_slice] != before).any())
                            REL_DELTA.append(float((alpha * theta).norm() / before.float().norm()))
        return original_forward(hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_value=past_key_value, output_attentions=output_attentions, use_cache=use_cache,
                                cache_position=cache_position, position_embeddings=position_embeddings, **kwargs)

    return forward


def questions(num: int):
    folder = Path(tempfile.mkdtemp())
    items = split_items(EvalSettings(model=str(PATH), split="adversarial", seed=TEST_SEED, num_images=max(1, num // 6)), folder)
    return [(Image.open(folder / IMAGE_FOLDER / item["image"]).convert("RGB"), item) for item in items[:num]]


def part_a(items, dtype) -> dict:
    """The original generator on one row at a time, steering off then on (its main loop), 5 new tokens."""
    COUNT.clear(), REL_DELTA.clear()
    processor = AutoProcessor.from_pretrained(PATH)
    model = LlavaForConditionalGeneration.from_pretrained(PATH, dtype=dtype).eval()
    # PORTED: the original's `model.language_model.layers if hasattr(model, "language_model") else model.model.layers`
    # raises AttributeError on 5.23 (no `language_model` attribute; LlavaModel has no `layers`).
    layers = model.model.language_model.layers
    NOTE["steer_layers"] = list(MCLCBF().steered_layers(len(layers)))  # 10-27 of 32, scaled to this decoder
    for i, layer in enumerate(layers):
        layer.forward = types.MethodType(note_wrapper(layer.forward, i), layer)
    flips, errors = 0, Counter()
    for image, item in items:
        inputs = processor(images=image, text=chat_prompt(processor, item["prompt"]), return_tensors="pt")
        answers = []
        for steering in (False, True):
            NOTE["is_active"] = steering
            with torch.no_grad():
                out = model.generate(**{**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}, max_new_tokens=5,
                                     do_sample=False)  # fmt: skip
            answers.append(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        flips += answers[0] != answers[1]
    NOTE["is_active"] = True
    image, item = items[0]
    inputs = processor(images=image, text=chat_prompt(processor, item["prompt"]), return_tensors="pt")
    try:  # what evaluation harnesses do: inference_mode
        with torch.inference_mode():
            model.generate(**{**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}, max_new_tokens=2)
    except RuntimeError as error:
        errors[str(error).splitlines()[0]] += 1
    ids = inputs["input_ids"][0]
    image_at = (ids == model.config.image_token_id).nonzero()[:, 0]
    return {"dtype": str(dtype), "questions": len(items), "answers changed": flips, "counts": dict(COUNT),
            "rel_delta max": max(REL_DELTA, default=0.0), "inference_mode error": dict(errors),
            "image span of the prompt": [int(image_at[0]), int(image_at[-1]) + 1], "prompt length": len(ids)}


class Inputs(DecoderTap):
    def __init__(self):
        self.hidden = {}

    def before_layer(self, layer_idx, hidden, layout):
        self.hidden[layer_idx] = hidden.clone()


def prefill(model, inputs, taps):
    cache = VisualKVCache(config=model.config)
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    layout = TokenLayout.prompt(positions, inputs["attention_mask"].bool(), inputs["input_ids"] == model.config.image_token_id)
    lm = model.model.language_model
    with torch.no_grad():
        embeds = model.family.embed_prompt(inputs["input_ids"], {"pixel_values": inputs["pixel_values"]})
        hidden, _ = run_decoder(lm, embeds, layout, cache, [tap if not callable(tap) else tap(lm, cache) for tap in taps])
    return hidden[:, -1], cache, layout


def part_b(items, settings: dict) -> dict:
    processor = AutoProcessor.from_pretrained(PATH)
    model = RCPPLlavaForConditionalGeneration.from_pretrained(PATH).eval()
    lm = model.model.language_model
    yes, no = (processor.tokenizer(w, add_special_tokens=False).input_ids[0] for w in (" Yes", " No"))
    texts = [chat_prompt(processor, item["prompt"]) for _, item in items]
    inputs = processor(images=[image for image, _ in items], text=texts, return_tensors="pt", padding=True)
    seen = Inputs()
    final, cache, layout = prefill(model, inputs, [seen])
    gap = model.lm_head(final)[:, yes] - model.lm_head(final)[:, no]
    result = {"layers": {}}
    for l in (1, 2, 3):
        layer, hidden = lm.layers[l], seen.hidden[l]
        cos, sin = lm.rotary_emb(hidden, position_ids=layout.positions)
        probe = prompt_keys(layer, hidden, cos, sin)
        x = hidden[:, -1:].clone().requires_grad_(True)
        with torch.enable_grad():
            norm = layer.input_layernorm
            u = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)  # RMSNorm before its weight
            u.retain_grad()
            mask = layout.valid[:, None, :]
            query = project_heads(layer.self_attn.q_proj, u * norm.weight, layer.self_attn.head_dim)
            query = apply_rotary_pos_emb(query, query, cos[:, -1:], sin[:, -1:])[0]
            h = image_attention_mass(attention_probs(query, probe, layer.self_attn.scaling, mask), layout.visual_ids >= 0)
            note_span = torch.zeros_like(layout.valid)
            note_span[:, 1:577] = True
            h_note = image_attention_mass(attention_probs(query, probe, layer.self_attn.scaling, mask), note_span & layout.valid)
            h.sum().backward()
        result["layers"][l] = {
            "h (image mass, last prompt token) mean": float(h.mean()), "h min": float(h.min()), "h max": float(h.max()),
            "h with the note's span [1, 577) mean": float(h_note.mean()),
            "||x|| mean": float(x.norm(dim=-1).mean()), "rms(x) mean": float((x.norm(dim=-1) / math.sqrt(x.shape[-1])).mean()),
            "||grad_x h|| (through RMSNorm) mean": float(x.grad.norm(dim=-1).mean()),
            "||grad_u h|| (u = x / rms(x), no RMSNorm) mean": float(u.grad.norm(dim=-1).mean()),
            "probe keys vs cached keys max |diff|": float((probe - cache.layers[l].keys).abs().max()),
            "cached keys max |k|": float(cache.layers[l].keys.abs().max()),
        }
    for name, method in settings.items():
        tap_holder = {}

        def build(lm_, cache_, method=method):
            tap_holder["tap"] = method.tap(lm_, cache_)
            return tap_holder["tap"]

        steered, _, _ = prefill(model, inputs, [build])
        tap = tap_holder["tap"]
        steered_gap = model.lm_head(steered)[:, yes] - model.lm_head(steered)[:, no]
        per_layer = {}
        for record in tap.records:
            rel = (record.delta_norm / record.x_norm)[:, 0]
            x_last = seen.hidden[record.layer][:, -1]
            spacing = torch.finfo(torch.float16).eps * 2.0 ** torch.floor(torch.log2(x_last.abs().clamp_min(6e-5)))
            per_layer[record.layer] = {"steered rows": int(record.steered.sum()), "||delta||/||x|| mean": float(rel.mean()),
                                       "||delta||/||x|| max": float(rel.max()),
                                       "||delta|| mean": float(record.delta_norm.mean()),
                                       "fp16 spacing of x, median": float(spacing.median())}  # fmt: skip
        result[name] = {
            "per layer (alone, each step from the unsteered-so-far stream)": per_layer,
            "last layer ||final - vanilla|| / ||vanilla|| mean": float(((steered - final).norm(dim=-1) / final.norm(dim=-1)).mean()),
            "yes-no gap vanilla mean |gap|": float(gap.abs().mean()),
            "gap change mean |steered - vanilla|": float((steered_gap - gap).abs().mean()),
            "gap change max": float((steered_gap - gap).abs().max()),
            "answers flipped (sign of gap)": int(((steered_gap > 0) != (gap > 0)).sum()),
        }
    return result


def main(num: int) -> None:
    items = questions(num)
    report = {"a: the note's wrapper, float16": part_a(items, torch.float16),
              "a: the note's wrapper, float32": part_a(items, torch.float32)}
    report["b"] = part_b(items, {
        "note default (tau 0.2, alpha 1, clamp 0.5)": MCLCBF(decode=False),
        "note strong (tau 0.5, alpha 4, clamp 0.5)": MCLCBF(decode=False, prefill_tau=0.5, prefill_alpha=4.0),
        "tau 0.5, alpha 1, unclamped": MCLCBF(decode=False, prefill_tau=0.5, max_scale=1e4),
        "tau 0.9, alpha 1, unclamped": MCLCBF(decode=False, prefill_tau=0.9, max_scale=1e4),
    })
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 48)
