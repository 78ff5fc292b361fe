"""`RCPPLlavaForConditionalGeneration`: LLaVA whose greedy / sampling loop runs RCPP + DRCD.

The loop in `_sample` reads like the method: per decoding step t,
  7. schedule lambda_t and the visual-token budget; evict the lowest-scoring visual tokens beyond it,
  5. group the cached visual tokens into C (S >= tau, or a threshold relative to S) and N,
  6. one forward with two query rows for the same token (main row -> C, contrast row -> N), then
     final = logits_C - lambda_t * logits_N, optional plausibility constraint, logits processors, token choice,
  1-4. from the main row of that same forward: h_t, alpha, recon_i, s_i_t, and the EMA update of S.
Step 0's token comes from the prefill's logits, or with `first_token_action` from one extra two-row forward of the
last prompt token (`_first_token_action`).
With a plain `GenerationConfig` (or `rcpp=False`) `_sample` is transformers' own.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LlavaForConditionalGeneration
from transformers.generation.utils import GenerationMode

from rcpp_hf.config import DEFAULT_NUM_SCORING_LAYERS, RCPPGenerationConfig
from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.engine.contrastive import check_contrastive, contrastive_sample
from rcpp_hf.engine.decoder import DENSE_MASK_IMPLEMENTATIONS, decode_token, run_decoder
from rcpp_hf.engine.layout import TokenLayout
from rcpp_hf.engine.pruning import PrefillPruningTap
from rcpp_hf.engine.token_choice import TokenChoice
from rcpp_hf.engine.vision import VisionRecord, record_vision_attention, vision_encoder_layers
from rcpp_hf.rcpp.schedule import scheduled_value, visual_token_budget
from rcpp_hf.rcpp.stages import (
    accumulate_consistency,
    adaptive_plausibility,
    drcd_fuse,
    group_visual_tokens,
    instant_consistency,
    reasoning_state,
    reconstruct_visual_tokens,
    select_evictions,
)
from rcpp_hf.rcpp.tap import RCPPTap
from rcpp_hf.rcpp.trace import RCPPGenerateOutput, RCPPStep, RCPPTrace
from rcpp_hf.rcpp.visual_states import VisualStates


def methods_active(generation_config: GenerationConfig) -> bool:
    """Whether `generate` runs rcpp_hf's loop: RCPP on, or another method of the registry asked for."""
    return isinstance(generation_config, RCPPGenerationConfig) and (
        generation_config.rcpp or bool(generation_config.methods)
    )


def resolve_scoring_layers(scoring_layers: tuple[int, ...] | None, num_layers: int) -> list[int]:
    """Absolute, sorted layer indices; negative ones count from the end.  Raises on an index out of range.

    `None` is the default: the last min(DEFAULT_NUM_SCORING_LAYERS, num_layers) layers, so that it fits any decoder.
    """
    if scoring_layers is None:
        return list(range(max(num_layers - DEFAULT_NUM_SCORING_LAYERS, 0), num_layers))
    resolved = []
    for index in scoring_layers:
        if not -num_layers <= index < num_layers:
            raise ValueError(
                f"RCPPGenerationConfig.scoring_layers: layer {index} is out of range for a decoder with "
                f"{num_layers} layers (valid: {-num_layers}..{num_layers - 1})"
            )
        resolved.append(index % num_layers)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"RCPPGenerationConfig.scoring_layers {scoring_layers} name the same layer twice")
    return sorted(resolved)


class RCPPLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """`LlavaForConditionalGeneration` with RCPP + DRCD decoding and the registry's methods; load it with
    `from_pretrained` as usual.

    It runs the attention implementation the user asked for. With no method on, `generate` is transformers' own.
    With a method on, the language model runs layer by layer (`engine.decoder.run_decoder`), recording the attention
    rows the methods need from the layers' own query projections; DRCD's two-row masks and pruning need a dense
    mask, so `sdpa` (the default) and `eager` are supported there.
    """

    @classmethod
    def is_custom_code(cls) -> bool:
        """False: every module, parameter and `_init_weights` of this class is transformers' own LLaVA.

        transformers calls any class whose `__module__` is outside its package "custom code" and, for it alone,
        (1) initialises missing weights differently: a module whose own parameters look initialised is skipped,
        so CLIPAttention / CLIPMLP never get CLIP's initialisation (their Linear children's plain N(0, 0.02)
        stays); (2) withholds llava's checkpoint key renaming. Both guard modeling code it does not know; this
        class adds only a decoding loop, so saying so is the one switch that puts `from_pretrained` on the stock
        class's path (`PreTrainedModel.is_custom_code`, `_initialize_weights` and
        `get_model_conversion_mapping` in transformers 5.23).
        """
        return False

    # -- refusing what the methods cannot do ---------------------------------------------------------------------
    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)
        if not methods_active(generation_config):
            return
        if generation_mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            raise ValueError(
                f"rcpp_hf's methods support greedy decoding and sampling (num_beams=1, no assistant model); got "
                f"generation mode '{generation_mode.value}'. Use num_beams=1, or a plain GenerationConfig."
            )
        unsupported = {
            "use_cache=False": generation_config.use_cache is False,
            "a cache_implementation": generation_config.cache_implementation is not None,
            "prefill_chunk_size": generation_config.prefill_chunk_size is not None,
            "output_attentions": bool(generation_config.output_attentions),
            "output_hidden_states": bool(generation_config.output_hidden_states),
        }
        for name, requested in unsupported.items():
            if requested:
                raise ValueError(
                    f"rcpp_hf's methods do not support {name}: they own the KV cache (VisualKVCache) and record only "
                    "what they need (see out.rcpp, out.pruning). Use a plain GenerationConfig for it."
                )
        implementation = self.config.text_config._attn_implementation
        if implementation not in DENSE_MASK_IMPLEMENTATIONS:
            raise ValueError(
                f"rcpp_hf's methods run the language model with attn_implementation in {DENSE_MASK_IMPLEMENTATIONS}; "
                f"this model uses {implementation!r}. Load it with from_pretrained(..., attn_implementation='sdpa')."
            )

    # -- the prompt's embeddings ----------------------------------------------------------------------------------
    def _maybe_prepare_encoder_kwargs_for_generation(
        self, inputs_tensor, model_kwargs, model_input_name, generation_config
    ):
        """generate encodes images before `_sample`; a pruner that reads the vision tower needs that forward
        recorded, so with one the images are encoded in `_sample` instead (`_record_vision`), once either way. A
        contrastive decoder that distorts the image (VCD) needs the pixel values, so it too encodes in `_sample`."""
        if methods_active(generation_config) and any(
            m.reads_vision if m.kind == "prefill_pruner" else getattr(m, "distorts_image", False)
            for m in generation_config.methods
        ):
            return model_kwargs
        return super()._maybe_prepare_encoder_kwargs_for_generation(
            inputs_tensor, model_kwargs, model_input_name, generation_config
        )

    def _record_vision(self, pruner, input_ids: torch.LongTensor, model_kwargs: dict):
        """Encode the images while recording the vision layer `pruner` reads -> (the `get_image_features` output,
        `VisionRecord`). One image per batch row."""
        pixel_values, batch_size = model_kwargs.get("pixel_values"), input_ids.shape[0]
        if pixel_values is None or pixel_values.shape[0] != batch_size:
            raise ValueError(
                f"{pruner.name} reads the vision tower and takes one image per batch row; got "
                f"{None if pixel_values is None else pixel_values.shape[0]} images for {batch_size} rows"
            )
        feature_layer = model_kwargs.get("vision_feature_layer") or self.config.vision_feature_layer
        strategy = model_kwargs.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        if not isinstance(feature_layer, int):
            raise ValueError(f"{pruner.name} needs one vision_feature_layer, got {feature_layer!r}")
        tower = self.model.vision_tower
        layers = vision_encoder_layers(tower)
        layer = pruner.resolve_vision_layer(len(layers), feature_layer)
        with record_vision_attention(tower, layer) as recorded:
            encoded = self.model.get_image_features(
                pixel_values=pixel_values, vision_feature_layer=feature_layer,
                vision_feature_select_strategy=strategy, return_dict=True,
            )  # fmt: skip
        first_visual = 1 if strategy == "default" else 0  # "default" drops CLS from the features
        attention = layers[layer].self_attn
        return encoded, VisionRecord(
            queries=recorded["queries"],
            keys=recorded["keys"],
            features=encoded.hidden_states[feature_layer][:, first_visual:],
            num_heads=attention.num_heads,
            scale=attention.scale,
            first_visual=first_visual,
            projector=self.model.multi_modal_projector,
            post_layernorm=getattr(getattr(tower, "vision_model", tower), "post_layernorm", None),
            input_ids=input_ids,
            name_or_path=self.config._name_or_path,
        )

    def _embed_prompt(self, input_ids: torch.LongTensor, model_kwargs: dict, encoded=None) -> torch.Tensor:
        """Token embeddings with the image features in place of the image tokens, (B, S, D): the first half of
        `LlavaModel.forward` (transformers 5.23, models/llava/modeling_llava.py). `encoded`: the images, already
        encoded by `get_image_features`."""
        inputs_embeds = self.model.get_input_embeddings()(input_ids)
        if encoded is None:
            encoded = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")  # generate encodes images up front
        if encoded is None and model_kwargs.get("pixel_values") is not None:
            encoded = self.model.get_image_features(
                pixel_values=model_kwargs["pixel_values"],
                vision_feature_layer=model_kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=model_kwargs.get("vision_feature_select_strategy"),
                image_sizes=model_kwargs.get("image_sizes"),
                return_dict=True,
            )
        if encoded is None:
            return inputs_embeds
        features = encoded.pooler_output
        features = torch.cat(features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        image_mask = self.model.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=features)
        return inputs_embeds.masked_scatter(image_mask, features)

    # -- the decoding loop --------------------------------------------------------------------------------------
    def _sample(
        self,
        input_ids: torch.LongTensor,
        logits_processor,
        stopping_criteria,
        generation_config: GenerationConfig,
        synced_gpus: bool = False,
        streamer=None,
        **model_kwargs,
    ):
        if not methods_active(generation_config):
            return super()._sample(
                input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer, **model_kwargs
            )
        if synced_gpus:
            raise ValueError("rcpp_hf's methods do not support synced_gpus (DeepSpeed ZeRO-3 / FSDP generation)")
        if input_ids.device != self.device:
            raise ValueError(
                f"rcpp_hf's methods keep their per-token state beside the model: move the inputs to {self.device} "
                f"(they are on {input_ids.device}), e.g. processor(...).to(model.device)"
            )
        cfg: RCPPGenerationConfig = generation_config
        batch_size = input_ids.shape[0]
        return_dict = cfg.return_dict_in_generate
        language_model = self.model.language_model

        # The prompt: which entries are image tokens, which are padding, and their logical positions.
        image_token_mask = input_ids == self.config.image_token_id
        num_visual = self._check_image_tokens(image_token_mask)
        contrastive = check_contrastive(cfg)
        if contrastive is not None:  # VCD, SID, the plausibility cutoff: their own loop (engine/contrastive.py)
            return contrastive_sample(self, contrastive, input_ids, logits_processor, stopping_criteria, cfg, streamer,
                                      model_kwargs, num_visual)  # fmt: skip
        valid = model_kwargs.get("attention_mask")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.bool()
        position_ids = model_kwargs["position_ids"]
        cache = model_kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("rcpp_hf's methods start from an empty cache; continuing from past_key_values is not supported")
        cache = VisualKVCache(config=self.config)
        encoded, pruners = None, []
        for method in cfg.methods:
            if method.kind == "prefill_pruner":
                vision = None
                if method.reads_vision:
                    encoded, vision = self._record_vision(method, input_ids, model_kwargs)
                pruners.append(PrefillPruningTap(method, language_model, num_visual, vision))
        rcpp = RCPPTap(resolve_scoring_layers(cfg.scoring_layers, language_model.config.num_hidden_layers)) if cfg.rcpp else None
        # Steering methods act in both phases: one tap per method, in the prompt's forward and every decoding one.
        steering = [method.tap(language_model, cache) for method in cfg.methods if method.kind == "steering"]
        decode_taps = [*steering, rcpp] if rcpp else steering

        # Prefill: the prompt's forward; prefill pruners drop visual tokens inside it. RCPP also captures v_i[l]
        # (stage 2 input) and scores the first step; its token is decoded from the plain logits, since C and N only
        # exist once S does (with `first_token_action`, from a re-run of the last prompt token once they do).
        hidden, _ = run_decoder(
            language_model,
            self._embed_prompt(input_ids, model_kwargs, encoded),
            TokenLayout.prompt(position_ids, valid, image_token_mask),
            cache,
            taps=[*pruners, *decode_taps],
        )
        hidden = hidden[:, -1:]
        logits = self.lm_head(hidden).float()  # (B, 1, vocab)
        trace = RCPPTrace(num_visual_tokens=num_visual) if (return_dict and rcpp) else None
        if rcpp:
            rcpp.locate(cache.layouts, cache.visual_token_ids)
            visual = VisualStates.from_layers(rcpp.captured_states(cache.visual_token_ids))
            scores = None  # S, (B, Vc), aligned with cache.visual_token_ids
            core = torch.full((batch_size, cache.num_visual_tokens), True, device=input_ids.device)
        num_rows, evicted, lambda_t, keep_ratio = 1, input_ids.new_zeros(batch_size, 0), 0.0, 1.0

        choice = TokenChoice(cfg, logits_processor, stopping_criteria, streamer, input_ids)
        step = 0
        while True:
            next_token_logits = logits[:, 0]
            if rcpp:
                # Stages 1-4, from the main row (row 0) of the forward just made.
                h_t = reasoning_state(hidden, row=0)
                projection, recon_norm = reconstruct_visual_tokens(rcpp.visual_alpha(), visual.states, visual.gram, h_t)
                instant = instant_consistency(projection, recon_norm, h_t)
                scores = accumulate_consistency(scores, instant, cfg.gamma)
                if step == 0 and cfg.first_token_action:
                    lambda_t = cfg.lambda_end
                    core, num_rows = self._group_and_mask(cfg, rcpp, cache, scores, lambda_t, num_visual)
                    if num_rows == 2:
                        logits = self._first_token_action(language_model, cache, decode_taps, input_ids, position_ids)

                # Stage 6: DRCD fusion.
                if num_rows == 2:
                    has_noise = (~core).any(dim=1)
                    lambda_rows = torch.where(has_noise, lambda_t, 0.0).to(next_token_logits.dtype)
                    next_token_logits = drcd_fuse(logits[:, 0], logits[:, 1], lambda_rows)
                if cfg.plausibility_beta is not None:
                    next_token_logits = adaptive_plausibility(next_token_logits, logits[:, 0], cfg.plausibility_beta)

            # The usual processors and token choice, as transformers' `_sample`.
            next_tokens = choice.next_tokens(input_ids, next_token_logits)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            if trace is not None:
                trace.steps.append(
                    self._trace_step(step, cache, scores, core, evicted, lambda_t, keep_ratio, num_visual, num_rows)
                )

            if choice.done(input_ids, next_tokens):
                break
            step += 1

            if rcpp:
                # Stage 7: the schedule, and physical eviction of the lowest-scoring tokens beyond the budget.
                lambda_t = scheduled_value(cfg.lambda_start, cfg.lambda_end, step, cfg.schedule_steps, cfg.schedule)
                keep_ratio = scheduled_value(
                    cfg.keep_ratio_start, cfg.keep_ratio_end, step, cfg.schedule_steps, cfg.schedule
                )
                num_evict = cache.num_visual_tokens - visual_token_budget(keep_ratio, num_visual)
                evicted = input_ids.new_zeros(batch_size, 0)
                if num_evict > 0:
                    columns = select_evictions(scores, num_evict)
                    evicted = cache.visual_token_ids.gather(1, columns)
                    kept = cache.evict_visual(columns)
                    scores = scores.gather(1, kept)
                    visual = visual.keep(kept)
                    rcpp.locate(cache.layouts, cache.visual_token_ids)

                core, num_rows = self._group_and_mask(cfg, rcpp, cache, scores, lambda_t, num_visual)

            # Stage 6: one forward; with DRCD, main row -> text + history + C, contrast row -> text + history + N.
            position_ids = position_ids[:, -1:] + 1
            hidden = decode_token(language_model, next_tokens[:, None], position_ids, cache, num_rows, decode_taps)
            logits = self.lm_head(hidden).float()  # (B, rows, vocab)

        if streamer is not None:
            streamer.end()
        if not return_dict:
            return input_ids
        return RCPPGenerateOutput(
            sequences=input_ids,
            scores=choice.scores,
            logits=choice.logits,
            past_key_values=cache,
            rcpp=trace,
            pruning=[record for tap in pruners for record in tap.records],
        )

    @staticmethod
    def _group_and_mask(cfg, rcpp: RCPPTap, cache: VisualKVCache, scores, lambda_t: float, num_visual: int):
        """Stage 5: C / N from S (B, Vc), and the masks of the next forward's rows -> (core (B, Vc) bool, number of
        query rows: 2 when some row has a non-empty N and lambda_t > 0). One host sync covers both decisions."""
        core = group_visual_tokens(scores, cfg.tau, cfg.tau_mode)
        any_noise = bool((~core).any())
        num_rows = 2 if (any_noise and lambda_t > 0) else 1
        if any_noise:
            ids = cache.visual_token_ids
            by_id = torch.zeros(ids.shape[0], num_visual, dtype=torch.bool, device=ids.device)
            rcpp.set_rows(num_rows, by_id.scatter(1, ids, core), by_id.scatter(1, ids, ~core))
        else:
            rcpp.set_rows(1, None, None)  # the causal masks vanilla uses, so neutral settings stay bit-identical
        return core, num_rows

    def _first_token_action(self, language_model, cache: VisualKVCache, taps, input_ids, position_ids):
        """`first_token_action` (issue #12): the last prompt token again, as DRCD's two rows (main -> text + history +
        C, contrast -> text + history + N, masks already set) in one decode-sized forward at that token's position,
        so that the first generated token, which decides a short answer, is decoded from fused logits like every
        later one -> logits (B, 2, vocab).

        The prefill's cache entry of that token is dropped first and the main row's entry replaces it: later steps
        attend to the token as the main branch saw it. S is not updated from this forward: it already holds the
        prefill's measurement of this same token, made with every visual token in view, while the main row cannot
        see N (its alpha on N is 0), which would drive N's scores down by construction.
        """
        last = input_ids[:, -1:]
        if bool((last == self.config.image_token_id).any()):
            raise ValueError("RCPPGenerationConfig.first_token_action re-runs the last prompt token, which must be "
                             "text; this prompt ends with an image token")
        cache.forget_last_entries(1)
        hidden = decode_token(language_model, last, position_ids[:, -1:], cache, num_rows=2, taps=taps)
        return self.lm_head(hidden).float()

    def _check_image_tokens(self, image_token_mask: torch.Tensor) -> int:
        """Every row must carry the same, non-zero number of image tokens; returns that number (V)."""
        per_row = image_token_mask.sum(dim=1).tolist()
        if max(per_row) == 0:
            raise ValueError(
                f"rcpp_hf's methods need image tokens (id {self.config.image_token_id}) in the prompt, found none; "
                "include '<image>' in the text, or use a plain GenerationConfig for text-only prompts"
            )
        if len(set(per_row)) != 1:
            raise ValueError(
                f"rcpp_hf's methods need the same number of images (image tokens) in every batch row, got image-token "
                f"counts {per_row}; batch rows with equal numbers of images, or generate them separately"
            )
        return per_row[0]

    @staticmethod
    def _trace_step(step, cache, scores, core, evicted, lambda_t, keep_ratio, num_visual, num_rows) -> RCPPStep:
        full_scores = scores.new_full((scores.shape[0], num_visual), float("nan"))
        full_scores.scatter_(1, cache.visual_token_ids, scores)
        return RCPPStep(
            step=step,
            scores=full_scores,
            num_core=core.sum(dim=1),
            num_noise=(~core).sum(dim=1),
            evicted=evicted,
            lambda_t=lambda_t,
            keep_ratio=keep_ratio,
            cache_bytes=cache.nbytes(),
            visual_cache_bytes=cache.visual_nbytes(),
            contrast=num_rows == 2,
        )

