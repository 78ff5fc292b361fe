"""`RCPPLlavaForConditionalGeneration`, `RCPPLlavaNextForConditionalGeneration`,
`RCPPLlavaOnevisionForConditionalGeneration`, `RCPPQwen2VLForConditionalGeneration` and
`RCPPQwen2_5_VLForConditionalGeneration`: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL whose
greedy / sampling loop runs rcpp_hf's methods (RCPP + DRCD and the registry's), through `MethodsGenerationMixin`.

The mixin's `_sample` is transformers' loop written over the active methods (`methods/protocol.py`): the prompt's
forward with every method's taps, then per token the logits the methods make of the last forward, the logits
processors and the token choice (`engine.token_choice.TokenChoice`), and the next forward. Everything model-specific
comes from the model's family adapter (`families/`). With a plain `GenerationConfig` (or `rcpp=False` and no
method) `_sample` is transformers' own.
"""

from __future__ import annotations

import torch
from transformers import (
    GenerationConfig,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.generation.utils import GenerationMode

from rcpp_hf.config import RCPPGenerationConfig
from rcpp_hf.engine.decoder import DENSE_MASK_IMPLEMENTATIONS
from rcpp_hf.engine.token_choice import TokenChoice
from rcpp_hf.families import (
    LlavaFamily,
    LlavaNextFamily,
    LlavaOnevisionFamily,
    ModelFamily,
    Qwen2_5_VLFamily,
    Qwen2VLFamily,
)
from rcpp_hf.methods.protocol import ActiveMethods, encodes_images_in_loop
from rcpp_hf.rcpp.trace import RCPPGenerateOutput


def methods_active(generation_config: GenerationConfig) -> bool:
    """Whether `generate` runs rcpp_hf's loop: RCPP on, or another method of the registry asked for."""
    return isinstance(generation_config, RCPPGenerationConfig) and bool(generation_config.active_methods())


class MethodsGenerationMixin:
    """`generate` with rcpp_hf's methods, for a transformers model class of the family `family_class`.

    It runs the attention implementation the user asked for. With no method on, `generate` is transformers' own.
    With a method on, the language model runs layer by layer (`engine.decoder.run_decoder`), recording the attention
    rows the methods need from the layers' own query projections; DRCD's two-row masks and pruning need a dense
    mask, so `sdpa` (the default) and `eager` are supported there.
    """

    family_class: type[ModelFamily]

    def __init_subclass__(cls, **kwargs):
        """Gives the subclass its stock class's checkpoint key renaming. transformers looks the renaming up by the
        class's name first (then by model_type): Qwen2-VL's and Qwen2.5-VL's are registered under their class names
        only, so under another name the legacy `model.layers.*` keys `save_pretrained` writes would match nothing
        and the text decoder would be drawn at random (`get_model_conversion_mapping` in transformers 5.23). A stock
        class with no mapping of its own (the LLaVA classes) leaves the subclass on the model_type lookup."""
        super().__init_subclass__(**kwargs)
        stock_name = cls.family_class.stock_class.__name__
        mapping = get_checkpoint_conversion_mapping(stock_name)
        if mapping is not None and cls.__name__ != stock_name:
            register_checkpoint_conversion_mapping(cls.__name__, mapping, overwrite=True)

    @property
    def family(self) -> ModelFamily:
        """The model-family adapter: everything model-specific the methods need."""
        return self.family_class(self)

    @classmethod
    def is_custom_code(cls) -> bool:
        """False: every module, parameter and `_init_weights` of this class is transformers' own.

        transformers calls any class whose `__module__` is outside its package "custom code" and, for it alone,
        (1) initialises missing weights differently: a module whose own parameters look initialised is skipped,
        so CLIPAttention / CLIPMLP never get CLIP's initialisation (their Linear children's plain N(0, 0.02)
        stays); (2) withholds the checkpoint key renaming of the model type. Both guard modeling code it does not
        know; this class adds only a decoding loop, so saying so is the one switch that puts `from_pretrained` on
        the stock class's path (`PreTrainedModel.is_custom_code`, `_initialize_weights` and
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

    def _maybe_prepare_encoder_kwargs_for_generation(
        self, inputs_tensor, model_kwargs, model_input_name, generation_config
    ):
        """generate encodes images before `_sample`; a method that records the vision tower while they are encoded,
        or distorts the image (VCD), has them encoded in `_sample` instead, once either way."""
        if methods_active(generation_config) and encodes_images_in_loop(generation_config.active_methods()):
            return model_kwargs
        return super()._maybe_prepare_encoder_kwargs_for_generation(
            inputs_tensor, model_kwargs, model_input_name, generation_config
        )

    def _check_loop_inputs(self, input_ids: torch.LongTensor, synced_gpus: bool) -> None:
        if synced_gpus:
            raise ValueError("rcpp_hf's methods do not support synced_gpus (DeepSpeed ZeRO-3 / FSDP generation)")
        if input_ids.device != self.device:
            raise ValueError(
                f"rcpp_hf's methods keep their per-token state beside the model: move the inputs to {self.device} "
                f"(they are on {input_ids.device}), e.g. processor(...).to(model.device)"
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
        if not methods_active(generation_config):
            return super()._sample(
                input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer, **model_kwargs
            )
        self._check_loop_inputs(input_ids, synced_gpus)
        family = self.family
        methods = ActiveMethods(family, generation_config, generation_config.active_methods(), input_ids, model_kwargs)
        hidden = methods.prefill()  # (B, 1, D): the last prompt entry
        choice = TokenChoice(generation_config, logits_processor, stopping_criteria, streamer, input_ids)
        position_ids, step = model_kwargs["position_ids"], 0
        while True:
            logits = family.logits(hidden)  # (B, rows, vocab): row 0 the main one, row 1 DRCD's contrast row
            next_tokens = choice.next_tokens(input_ids, methods.next_token_logits(step, logits, hidden))
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            methods.record_step(step)
            if choice.done(input_ids, next_tokens):
                break
            step += 1
            position_ids = family.next_positions(position_ids)
            hidden = methods.decode(step, next_tokens, position_ids)

        if streamer is not None:
            streamer.end()
        if not generation_config.return_dict_in_generate:
            return input_ids
        return RCPPGenerateOutput(
            sequences=input_ids,
            scores=choice.scores,
            logits=choice.logits,
            past_key_values=methods.cache,
            **methods.outputs(),
        )


class RCPPLlavaForConditionalGeneration(MethodsGenerationMixin, LlavaForConditionalGeneration):
    """`LlavaForConditionalGeneration` with RCPP + DRCD decoding and the registry's methods; load it with
    `from_pretrained` as usual."""

    family_class = LlavaFamily


class RCPPLlavaNextForConditionalGeneration(MethodsGenerationMixin, LlavaNextForConditionalGeneration):
    """`LlavaNextForConditionalGeneration` (LLaVA-1.6) with RCPP + DRCD decoding and the registry's methods."""

    family_class = LlavaNextFamily


class RCPPLlavaOnevisionForConditionalGeneration(MethodsGenerationMixin, LlavaOnevisionForConditionalGeneration):
    """`LlavaOnevisionForConditionalGeneration` with RCPP + DRCD decoding and the registry's methods."""

    family_class = LlavaOnevisionFamily


class RCPPQwen2VLForConditionalGeneration(MethodsGenerationMixin, Qwen2VLForConditionalGeneration):
    """`Qwen2VLForConditionalGeneration` with rcpp_hf's loop; the methods refuse it until they keep M-RoPE
    positions (`families/qwen2_vl.py`)."""

    family_class = Qwen2VLFamily


class RCPPQwen2_5_VLForConditionalGeneration(MethodsGenerationMixin, Qwen2_5_VLForConditionalGeneration):
    """`Qwen2_5_VLForConditionalGeneration` with rcpp_hf's loop; the methods refuse it until they keep M-RoPE
    positions (`families/qwen2_vl.py`)."""

    family_class = Qwen2_5_VLFamily
