"""`RCPPLlavaForConditionalGeneration`: LLaVA whose greedy / sampling loop runs RCPP + DRCD.

The loop in `_sample` reads like the method: per decoding step t,
  7. schedule lambda_t and the visual-token budget; evict the lowest-scoring visual tokens beyond it,
  5. group the cached visual tokens into C (S >= tau) and N,
  6. one forward with two query rows for the same token (main row -> C, contrast row -> N), then
     final = logits_C - lambda_t * logits_N, optional plausibility constraint, logits processors, token choice,
  1-4. from the main row of that same forward: h_t, alpha, recon_i, s_i_t, and the EMA update of S.
With a plain `GenerationConfig` (or `rcpp=False`) `_sample` is transformers' own.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LlavaForConditionalGeneration
from transformers.generation.utils import GenerationMode, StopCheck

from rcpp_hf.engine.attention import RCPP_ATTENTION, AttentionRecorder, register_rcpp_attention
from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.config import DEFAULT_NUM_SCORING_LAYERS, RCPPGenerationConfig
from rcpp_hf.rcpp.masks import drcd_attention_mask
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
from rcpp_hf.rcpp.trace import RCPPGenerateOutput, RCPPStep, RCPPTrace
from rcpp_hf.rcpp.visual_states import VisualStates, capture_visual_states


def rcpp_enabled(generation_config: GenerationConfig) -> bool:
    return isinstance(generation_config, RCPPGenerationConfig) and generation_config.rcpp


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
    """`LlavaForConditionalGeneration` with RCPP + DRCD decoding; load it with `from_pretrained` as usual.

    The language model runs `rcpp_sdpa` attention: SDPA, plus attention probabilities recorded on the scoring layers
    for the main query row when RCPP is on. The vision tower keeps SDPA.
    """

    def __init__(self, config):
        super().__init__(config)
        register_rcpp_attention()
        self.set_attn_implementation({"text_config": RCPP_ATTENTION, "vision_config": "sdpa"})

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

    # -- refusing what the method cannot do ---------------------------------------------------------------------
    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)
        if not rcpp_enabled(generation_config):
            return
        if generation_mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            raise ValueError(
                f"RCPP + DRCD supports greedy decoding and sampling (num_beams=1, no assistant model); got generation "
                f"mode '{generation_mode.value}'. Use num_beams=1, or RCPPGenerationConfig(rcpp=False)."
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
                    f"RCPP + DRCD does not support {name}: it owns the KV cache (VisualKVCache) and records only "
                    "what the method needs (see out.rcpp). Use RCPPGenerationConfig(rcpp=False) for it."
                )

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
        if not rcpp_enabled(generation_config):
            return super()._sample(
                input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer, **model_kwargs
            )
        if synced_gpus:
            raise ValueError("RCPP + DRCD does not support synced_gpus (DeepSpeed ZeRO-3 / FSDP generation)")
        if input_ids.device != self.device:
            raise ValueError(
                f"RCPP + DRCD keeps its per-token state beside the model: move the inputs to {self.device} "
                f"(they are on {input_ids.device}), e.g. processor(...).to(model.device)"
            )
        cfg: RCPPGenerationConfig = generation_config
        batch_size = input_ids.shape[0]
        pad_token_id = cfg._pad_token_tensor.to(input_ids.device) if cfg._pad_token_tensor is not None else None
        has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        return_dict = cfg.return_dict_in_generate
        scores_out = () if (return_dict and cfg.output_scores) else None
        logits_out = () if (return_dict and cfg.output_logits) else None
        trace = None
        decoder_layers = self.model.language_model.layers
        scoring_layers = resolve_scoring_layers(cfg.scoring_layers, len(decoder_layers))

        # The prompt: which entries are image tokens, which are padding, and their logical positions.
        image_token_mask = input_ids == self.config.image_token_id
        num_visual = self._check_image_tokens(image_token_mask)
        prompt_attention_mask = model_kwargs.get("attention_mask")  # None: no padding anywhere
        valid = torch.ones_like(input_ids, dtype=torch.bool) if prompt_attention_mask is None else prompt_attention_mask.bool()
        position_ids = model_kwargs["position_ids"]
        cache = model_kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("RCPP + DRCD starts from an empty cache; continuing from past_key_values is not supported")
        cache = VisualKVCache(config=self.config)
        model_kwargs["past_key_values"] = cache
        model_kwargs["use_cache"] = True
        visual_slots = torch.sort((~image_token_mask).to(torch.int8), dim=1, stable=True).indices[:, :num_visual]

        # Prefill: the prompt's forward. It also captures v_i[l] (stage 2 input) and scores the first step; its token
        # is decoded from the plain logits, since C and N only exist once S does.
        model_inputs = self.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **model_kwargs)
        model_inputs.pop("logits_to_keep", None)
        recorder = AttentionRecorder(frozenset(scoring_layers), query_row=-1, key_mask=valid)
        with capture_visual_states([decoder_layers[i] for i in scoring_layers], visual_slots) as captured:
            hidden = self.model(**model_inputs, rcpp_recorder=recorder).last_hidden_state[:, -1:]
        cache.register_prompt(position_ids, valid, image_token_mask)
        visual = VisualStates.from_layers(captured)
        logits = self.lm_head(hidden).float()  # (B, 1, vocab)
        scores = None  # S, (B, Vc), aligned with cache.visual_token_ids
        all_core = torch.full((batch_size, num_visual), True, device=input_ids.device)
        core, num_rows, evicted, lambda_t, keep_ratio = all_core, 1, input_ids.new_zeros(batch_size, 0), 0.0, 1.0
        if return_dict:
            trace = RCPPTrace(num_visual_tokens=num_visual)

        unfinished_sequences = torch.ones(batch_size, dtype=torch.long, device=input_ids.device)
        stop_check = StopCheck(streamer)
        step = 0
        while True:
            # Stages 1-4, from the main row (row 0) of the forward just made.
            h_t = reasoning_state(hidden, row=0)
            alpha = recorder.visual_alpha(cache.visual_slots)
            projection, recon_norm = reconstruct_visual_tokens(alpha, visual.states, visual.gram, h_t)
            instant = instant_consistency(projection, recon_norm, h_t)
            scores = accumulate_consistency(scores, instant, cfg.gamma)

            # Stage 6: DRCD fusion, then the usual processors and token choice.
            logits_core = logits[:, 0]
            if num_rows == 2:
                has_noise = (~core).any(dim=1)
                lambda_rows = torch.where(has_noise, lambda_t, 0.0).to(logits_core.dtype)
                next_token_logits = drcd_fuse(logits_core, logits[:, 1], lambda_rows)
            else:
                next_token_logits = logits_core
            if cfg.plausibility_beta is not None:
                next_token_logits = adaptive_plausibility(next_token_logits, logits_core, cfg.plausibility_beta)
            next_token_scores = logits_processor(input_ids, next_token_logits)
            if scores_out is not None:
                scores_out += (next_token_scores,)
            if logits_out is not None:
                logits_out += (next_token_logits,)
            if cfg.do_sample:
                next_tokens = torch.multinomial(next_token_scores.softmax(dim=-1), num_samples=1).squeeze(1)
            else:
                next_tokens = torch.argmax(next_token_scores, dim=-1)
            if has_eos_stopping_criteria:
                next_tokens = next_tokens * unfinished_sequences + pad_token_id * (1 - unfinished_sequences)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            if trace is not None:
                trace.steps.append(self._trace_step(step, cache, scores, core, evicted, lambda_t, keep_ratio, num_visual))

            unfinished_sequences = unfinished_sequences & ~stopping_criteria(input_ids, scores_out)
            if stop_check(unfinished_sequences, next_tokens, input_ids.shape[1]):
                break
            step += 1

            # Stage 7: the schedule, and physical eviction of the lowest-scoring tokens beyond the budget.
            lambda_t = scheduled_value(cfg.lambda_start, cfg.lambda_end, step, cfg.schedule_steps, cfg.schedule)
            keep_ratio = scheduled_value(cfg.keep_ratio_start, cfg.keep_ratio_end, step, cfg.schedule_steps, cfg.schedule)
            num_evict = cache.num_visual_tokens - visual_token_budget(keep_ratio, num_visual)
            evicted = input_ids.new_zeros(batch_size, 0)
            if num_evict > 0:
                columns = select_evictions(scores, num_evict)
                evicted = cache.visual_token_ids.gather(1, columns)
                kept = cache.evict_visual(columns)
                scores = scores.gather(1, kept)
                visual = visual.keep(kept)

            # Stage 5: grouping; it decides this step's masks. One host sync covers both decisions.
            core = group_visual_tokens(scores, cfg.tau)
            any_noise = bool((~core).any())
            num_rows = 2 if (any_noise and lambda_t > 0) else 1

            # Stage 6: one forward, main row -> text + history + C, contrast row -> text + history + N.
            position_ids = position_ids[:, -1:] + 1
            step_valid = torch.ones(batch_size, 1, dtype=torch.bool, device=input_ids.device)
            if any_noise:
                attention_mask = drcd_attention_mask(cache.valid, cache.visual_slots, core, num_rows)
            elif prompt_attention_mask is None:
                attention_mask = None  # exactly what vanilla passes, so neutral settings stay bit-identical
            else:
                attention_mask = torch.cat([cache.valid, step_valid], dim=1).long()
            recorder = AttentionRecorder(
                frozenset(scoring_layers),
                query_row=0,
                key_mask=torch.cat([cache.valid, step_valid, step_valid.new_zeros(batch_size, num_rows - 1)], dim=1),
            )
            hidden = self.model(
                input_ids=next_tokens[:, None].expand(-1, num_rows),
                attention_mask=attention_mask,
                position_ids=position_ids.expand(-1, num_rows),
                past_key_values=cache,
                use_cache=True,
                rcpp_recorder=recorder,
            ).last_hidden_state
            logits = self.lm_head(hidden).float()  # (B, rows, vocab)
            cache.drop_last_entries(num_rows - 1)  # the contrast row's entry: history is the main branch's
            cache.append_entries(position_ids)

        if streamer is not None:
            streamer.end()
        if not return_dict:
            return input_ids
        return RCPPGenerateOutput(
            sequences=input_ids, scores=scores_out, logits=logits_out, past_key_values=cache, rcpp=trace
        )

    def _check_image_tokens(self, image_token_mask: torch.Tensor) -> int:
        """Every row must carry the same, non-zero number of image tokens; returns that number (V)."""
        per_row = image_token_mask.sum(dim=1).tolist()
        if max(per_row) == 0:
            raise ValueError(
                f"RCPP + DRCD needs image tokens (id {self.config.image_token_id}) in the prompt, found none; "
                "include '<image>' in the text, or use RCPPGenerationConfig(rcpp=False) for text-only prompts"
            )
        if len(set(per_row)) != 1:
            raise ValueError(
                f"RCPP + DRCD needs the same number of images (image tokens) in every batch row, got image-token "
                f"counts {per_row}; batch rows with equal numbers of images, or generate them separately"
            )
        return per_row[0]

    @staticmethod
    def _trace_step(step, cache, scores, core, evicted, lambda_t, keep_ratio, num_visual) -> RCPPStep:
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
        )

