"""The layer pruners: one small network per pruning layer giving one keep logit per visual token, and the
Gumbel-softmax that turns logits into training masks.

Source: zjw131f1fc/domain-adaptation-token-pruning, `docs/model_summary.md` and `method/models/layer_pruner.py`
(LayerNorm -> projection -> cross-attention with the visual tokens as queries and the question as keys / values ->
residual + LayerNorm -> MLP -> keep logit). A token's logit depends only on its own hidden state and the question,
not on the other visual tokens, so the pruner scores the survivors of an earlier stage at inference exactly as it
scored them in training.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from rcpp_hf.methods.gan_pruner.config import GanPrunerConfig
from rcpp_hf.methods.gan_pruner.merger import TokenMerger


class LayerPruner(nn.Module):
    """Keep logits of the visual tokens entering one decoder layer."""

    def __init__(self, config: GanPrunerConfig):
        super().__init__()
        self.norm_in = nn.LayerNorm(config.hidden_size)
        self.project = nn.Linear(config.hidden_size, config.pruner_hidden)
        self.cross_attention = nn.MultiheadAttention(config.pruner_hidden, config.pruner_heads, batch_first=True)
        self.norm_mid = nn.LayerNorm(config.pruner_hidden)
        self.mlp = nn.Sequential(
            nn.Linear(config.pruner_hidden, config.pruner_hidden), nn.GELU(), nn.Linear(config.pruner_hidden, 1)
        )
        self.mlp[-1].initial_bias = config.initial_keep_logit  # read by `GanLayerPruners._init_weights`
        # The attention residual's scale, 0 at initialisation (`GanLayerPruners._init_weights`): training starts
        # from the pruner without it.
        self.attention_scale = nn.Parameter(torch.empty(())) if config.attention_residual else None

    def forward(
        self,
        visual: torch.Tensor,
        question: torch.Tensor,
        question_valid: torch.Tensor,
        attention: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """visual (B, V, D), question (B, T, D), question_valid (B, T) bool (False: padding), attention (B, V) the
        residual's feature (`attention_residual.py`), required iff it is configured -> logits (B, V) float32.

        Runs in float32 whatever the backbone's dtype."""
        if (attention is None) != (self.attention_scale is None):
            raise ValueError("the attention feature must be given exactly when the pruner has an attention residual")
        visual = self.project(self.norm_in(visual.float()))
        question = self.project(self.norm_in(question.float()))
        attended, _ = self.cross_attention(visual, question, question, key_padding_mask=~question_valid, need_weights=False)
        logits = self.mlp(self.norm_mid(visual + attended)).squeeze(-1)
        return logits if attention is None else logits + self.attention_scale * attention


class GanLayerPruners(PreTrainedModel):
    """The pruners of every pruning layer of one backbone, saved with `save_pretrained` (config.json +
    model.safetensors) and loaded with `from_pretrained` beside any LLaVA of the same width and depth."""

    config_class = GanPrunerConfig
    base_model_prefix = "gan_pruner"
    main_input_name = "visual"

    def __init__(self, config: GanPrunerConfig):
        super().__init__(config)
        self.pruners = nn.ModuleList(LayerPruner(config) for _ in config.pruning_layers)
        self.merger = TokenMerger(config) if config.token_merger else None
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.constant_(module.bias, getattr(module, "initial_bias", 0.0))
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.normal_(module.in_proj_weight, std=0.02)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, LayerPruner) and module.attention_scale is not None:
            nn.init.zeros_(module.attention_scale)
        elif isinstance(module, TokenMerger):
            nn.init.normal_(module.queries)  # distinct queries; with small keys the pooling starts near the mean

    def check_backbone(self, hidden_size: int, num_hidden_layers: int) -> None:
        """Raise ValueError unless the pruners were trained for a decoder of this width and depth."""
        if (hidden_size, num_hidden_layers) != (self.config.hidden_size, self.config.num_hidden_layers):
            raise ValueError(
                f"the GAN pruners were trained for a decoder of width {self.config.hidden_size} and "
                f"{self.config.num_hidden_layers} layers; this model's decoder has width {hidden_size} and "
                f"{num_hidden_layers} layers"
            )

    def forward(
        self,
        stage: int,
        visual: torch.Tensor,
        question: torch.Tensor,
        question_valid: torch.Tensor,
        attention: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Keep logits (B, V) of pruning stage `stage` (index into `config.pruning_layers`); `attention` (B, V): the
        residual's feature, with `config.attention_residual` only."""
        return self.pruners[stage](visual, question, question_valid, attention)


class StraightThrough(torch.autograd.Function):
    """Forward: `hard`, exactly; backward: the gradient goes to `soft` (Bengio et al. 2013's estimator)."""

    @staticmethod
    def forward(ctx, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


def gumbel_keep_mask(
    logits: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None,
    straight_through: bool = True,
    noise_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary Gumbel-softmax over (drop, keep) with logits (0, l) (Jang et al. 2017): the difference of the two
    Gumbel noises is logistic, so the relaxed keep sample is sigmoid((l + logistic noise) / temperature).

    Args:
        logits: (B, V) keep logits.
        generator: the noise's random stream (on the logits' device), or None for no noise (the mask of the mean).
        noise_scale: factor on the noise. With straight-through masks the temperature does not change the forward
            (soft > 0.5 iff logit + noise > 0), so the noise alone decides how far training's masks are from the
            evaluation's (logit > 0); annealing it to 0 makes them equal at the end of training.
    Returns:
        (mask, soft), each (B, V): soft is the relaxed sample; mask is soft itself, or with `straight_through` the
        binary soft > 0.5 whose gradient is soft's.
    """
    if generator is None:
        noise = torch.zeros_like(logits)
    else:
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(1e-6, 1 - 1e-6)
        noise = (uniform.log() - (-uniform).log1p()) * noise_scale
    soft = torch.sigmoid((logits + noise) / temperature)
    if not straight_through:
        return soft, soft
    return StraightThrough.apply((soft > 0.5).to(soft.dtype), soft), soft


def evaluation_keep_mask(logits: torch.Tensor) -> torch.Tensor:
    """The evaluation's mask (logit > 0, no noise), binary (B, V), with the identity as its gradient to the logits.
    It is the budget term's handle on the hard count: a sigmoid's gradient vanishes on the large logits the task term
    builds (a run on the 12-layer model held its last two stages at 2-7x their targets for 200 steps while their
    multipliers grew to 17), the identity moves every token's logit alike, and the least useful ones cross 0 first."""
    return StraightThrough.apply((logits > 0).to(logits.dtype), logits)
