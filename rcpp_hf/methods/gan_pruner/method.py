"""The registry method "gan_pruner": trained GAN pruners evaluated as a prefill pruner.

Each pruning layer is a stage of `engine/pruning.py`: the pruner of that layer scores the visual tokens still
present (from the hidden states entering the layer and the prompt's text after the image, the question), and the
tokens whose keep logit is > 0 (mask > 0.5 without noise) stay; the others are physically dropped, the kept ones at
their original positions, and the KV cache of the later layers holds only them.

Rows of a batch keep one count (the engine keeps rows rectangular): each row keeps its tokens with mask > 0.5 and,
when another row keeps more, its next-best tokens by logit up to the row maximum (at least one token). With one row
per batch, the selection is exactly mask > 0.5.

With a token merger (`GanPrunerConfig.token_merger` = M), a first stage before layer 0 replaces the image's
visual tokens by the M merged ones (the engine's recycled tokens, as VisionZip's contextual tokens: merged token m
takes the place and original position of visual token m * V // M), and the pruning layers act on those. With the
attention residual, `score` recomputes the question's attention at the pruning layer from its hidden states, as the
training forward does (`attention_residual.py`).

Modes: "hard" (the above), "top_k" and "origin" (no stage: the unpruned model, token-identical to vanilla decoding).
"top_k" keeps, at each pruning layer, exactly the share of the image the pruners were trained toward
(`GanPrunerConfig.target_keep`, cumulative; round(share * V), at least 1) by keep logit: the pruners as a scorer at the
training budget. It is ours, not zjw131f1fc/domain-adaptation-token-pruning's: the learned threshold (logit > 0) does
not hold the trained count on the 12-layer ShapesWorld model (see the README), so "hard" measures the pruners at
whatever count they keep and "top_k" compares their ranking with FastV's and random pruning's at exactly the budget.
`pruner_path` is a folder written by `GanLayerPruners.save_pretrained` (`rcpp-hf gan-pruner train`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import torch

from rcpp_hf.engine.layout import text_after_image
from rcpp_hf.engine.pruning import PruneContext, PruneStage
from rcpp_hf.engine.vision import gather_tokens
from rcpp_hf.methods.budget import share_count
from rcpp_hf.methods.gan_pruner.attention_residual import question_attention_feature
from rcpp_hf.methods.gan_pruner.config import GanPrunerConfig
from rcpp_hf.methods.gan_pruner.merger import merge_columns
from rcpp_hf.methods.gan_pruner.pruner import GanLayerPruners
from rcpp_hf.methods.prefill_pruner import PrefillPruner
from rcpp_hf.methods.registry import register_method

GAN_PRUNER_MODES = ("hard", "top_k", "origin")


@lru_cache(maxsize=4)
def load_pruners(path: str, modified: float) -> GanLayerPruners:
    """The pruners saved in `path` (`modified`: the weights' mtime, so a retrained folder is read again)."""
    return GanLayerPruners.from_pretrained(path, dtype=torch.float32).eval()


@register_method
@dataclass
class GanPruner(PrefillPruner):
    """Args:
        pruner_path: folder of the trained pruners (config.json + model.safetensors); required in "hard" mode.
        mode: "hard" (drop the tokens with mask <= 0.5 at each pruning layer), "top_k" (keep the trained share by
            logit) or "origin" (no pruning).
    """

    name = "gan_pruner"
    selects_count: ClassVar[bool] = True
    pruner_path: str | None = None
    mode: str = "hard"

    CONTRACT_NEUTRAL = {"mode": "origin"}
    # "top_k": each row keeps the trained share; in "hard" mode a batched row keeps the batch's maximum count.
    CONTRACT_ACTING = {"mode": "top_k"}
    CONTRACT_INVALID = {"mode": "soft", "pruner_path": "no-such-folder"}
    CONTRACT_MASKABLE = True  # without a token merger, which `contract_files` does not configure

    @classmethod
    def contract_files(cls, folder: Path, model_config) -> dict:
        """Untrained pruners for the decoder of `model_config`, before every layer but the first, trained toward
        keeping 3/4, 1/2, 1/4 ... of the image; their last layer redrawn (seeded) so that keep logits differ."""
        text = model_config.text_config
        layers = list(range(1, text.num_hidden_layers))
        config = GanPrunerConfig(hidden_size=text.hidden_size, num_hidden_layers=text.num_hidden_layers,
                                 pruning_layers=layers, pruner_hidden=16, pruner_heads=2,
                                 target_keep=[1 - layer / text.num_hidden_layers for layer in layers])  # fmt: skip
        with torch.random.fork_rng():
            torch.manual_seed(0)
            pruners = GanLayerPruners(config)
            with torch.no_grad():
                for pruner in pruners.pruners:
                    pruner.mlp[-1].weight.normal_(std=10.0)
        pruners.save_pretrained(folder)
        return {"pruner_path": str(folder)}

    def __post_init__(self):
        if self.mode not in GAN_PRUNER_MODES:
            self.fail("mode", f"must be one of {GAN_PRUNER_MODES}")
        if self.mode != "origin" and self.pruner_path is None:
            self.fail("pruner_path", f"is required in mode {self.mode!r} (a folder written by `rcpp-hf gan-pruner train`)")
        if self.pruner_path is not None and not (Path(self.pruner_path) / "config.json").is_file():
            self.fail("pruner_path", "holds no config.json (a folder written by `rcpp-hf gan-pruner train`)")
        if self.mode == "top_k" and self.pruners().config.target_keep is None:
            self.fail("mode", "'top_k' needs the trained keep ratios (target_keep), which these pruners' config lacks")

    def pruners(self) -> GanLayerPruners:
        path = Path(self.pruner_path).resolve()
        weights = path / "model.safetensors"
        return load_pruners(str(path), weights.stat().st_mtime if weights.exists() else 0.0)

    def resolve_stages(self, num_layers: int, num_visual: int) -> list[PruneStage]:
        if self.mode == "origin":
            return []
        config = self.pruners().config
        if num_layers != config.num_hidden_layers:
            self.fail("pruner_path", f"holds pruners trained for a decoder of {config.num_hidden_layers} layers; this "
                                     f"model's has {num_layers}")  # fmt: skip
        merged = config.token_merger
        if merged > num_visual:
            self.fail("pruner_path", f"holds a token merger to {merged} tokens; this model's image has {num_visual}")
        if self.mode == "top_k":
            stages = [PruneStage(layer=layer, keep=share_count(share, merged or num_visual))
                      for layer, share in zip(config.pruning_layers, config.target_keep)]  # fmt: skip
        else:  # keep is an upper bound (`selects_count`): how many stay is decided per batch by the masks.
            stages = [PruneStage(layer=layer, keep=merged or num_visual) for layer in config.pruning_layers]
        return [PruneStage(layer=0, keep=merged), *stages] if merged else stages

    def attention_layer(self, stage: PruneStage) -> int | None:
        return None

    def checked_pruners(self, ctx: PruneContext) -> GanLayerPruners:
        """The pruners, checked against the decoder of `ctx` and moved to its device."""
        pruners = self.pruners()
        pruners.check_backbone(ctx.hidden.shape[-1], ctx.language_model.config.num_hidden_layers)
        return pruners.to(ctx.hidden.device)

    def score(self, ctx: PruneContext) -> torch.Tensor:
        """Keep logits (B, Vl) of the visual entries present, from the pruner of `ctx.stage.layer`."""
        pruners = self.checked_pruners(ctx)
        question, question_valid = text_after_image(ctx.layout)
        stage = pruners.config.pruning_layers.index(ctx.stage.layer)
        attention = None
        if pruners.config.attention_residual:
            attention = question_attention_feature(
                ctx.language_model.layers[ctx.stage.layer], ctx.hidden, ctx.position_embeddings(), question,
                question_valid, ctx.causal_key_mask(question), ctx.layout.visual_slots,
            )  # fmt: skip
        with torch.no_grad():
            return pruners(stage, gather_tokens(ctx.hidden, ctx.layout.visual_slots), gather_tokens(ctx.hidden, question),
                           question_valid, attention)  # fmt: skip

    def select(self, ctx: PruneContext) -> torch.Tensor:
        """Visual columns (B, k): in "hard" mode those with logit > 0, topped up per row with the next-best ones to
        the rows' maximum; in "top_k" mode the stage's count by logit; none at the merger's stage (layer 0), where
        `recycle` replaces every visual token."""
        if ctx.stage.layer == 0:
            return ctx.layout.visual_slots[:, :0]
        ctx.scores = self.score(ctx).float()
        kept = ctx.scores > 0
        ctx.details["mask_kept"] = kept.sum(dim=1).tolist()  # per row, before the top-up
        count = ctx.stage.keep if self.mode == "top_k" else max(1, int(kept.sum(dim=1).max()))
        return torch.topk(ctx.scores, count, dim=-1, sorted=False).indices

    def recycle(self, ctx: PruneContext, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """At the merger's stage: the merged tokens (B, M, D) from the decoder's input and the visual columns (B, M)
        whose places they take (`merge_columns`)."""
        if ctx.stage.layer != 0:
            return None
        pruners = self.checked_pruners(ctx)
        question, question_valid = text_after_image(ctx.layout)
        with torch.no_grad():
            merged = pruners.merger(gather_tokens(ctx.hidden, ctx.layout.visual_slots), gather_tokens(ctx.hidden, question),
                                    question_valid)  # fmt: skip
        columns = merge_columns(ctx.layout.num_visual, merged.shape[1], ctx.hidden.device)
        ctx.details["merged"] = merged.shape[1]
        return columns.expand(merged.shape[0], -1), merged
