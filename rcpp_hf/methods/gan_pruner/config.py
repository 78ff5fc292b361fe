"""`GanPrunerConfig`: the architecture of the pruners and the backbone they belong to, saved beside their weights."""

from __future__ import annotations

from transformers import PretrainedConfig

GUMBEL_MODES = ("straight_through", "relaxed")


class GanPrunerConfig(PretrainedConfig):
    """Args:
        hidden_size: width of the LLaVA decoder the pruners read (its `text_config.hidden_size`).
        num_hidden_layers: depth of that decoder; `pruning_layers` are indices into it.
        pruning_layers: before which decoder layers the pruners act, increasing, in [1, num_hidden_layers - 1].
        pruner_hidden: width of a pruner's projection and cross-attention (512 in
            zjw131f1fc/domain-adaptation-token-pruning).
        pruner_heads: heads of its cross-attention (4 in that repository).
        initial_keep_logit: bias of the keep logit at initialisation (sigmoid(2) = 0.88: training starts near
            keeping everything and learns what to drop).
        gumbel: "straight_through" (forward binary, gradient of the relaxed sample) or "relaxed" (the relaxed sample
            itself in the forward).
        attention_residual: the keep logit also gets a learned scalar (0 at initialisation) times the log of the
            question's attention to the token at the pruning layer, relative to uniform (`attention_residual.py`).
        token_merger: M > 0: a token merger (that repository's V3, `merger.py`) replaces the image's visual tokens by M
            merged ones before the first decoder layer, and the pruners act on those; 0: off.
        target_keep: per pruning layer, the cumulative keep ratio the pruners were trained toward (written by
            training; the evaluation's "top_k" mode keeps exactly that share); None: unknown.
    """

    model_type = "rcpp_gan_pruner"

    def __init__(
        self,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        pruning_layers: list[int] | tuple[int, ...] = (6, 12, 18),
        pruner_hidden: int = 512,
        pruner_heads: int = 4,
        initial_keep_logit: float = 2.0,
        gumbel: str = "straight_through",
        attention_residual: bool = False,
        token_merger: int = 0,
        target_keep: list[float] | tuple[float, ...] | None = None,
        **kwargs,
    ):
        pruning_layers = [int(layer) for layer in pruning_layers]
        if not (isinstance(hidden_size, int) and hidden_size >= 1):
            raise ValueError(f"GanPrunerConfig.hidden_size = {hidden_size!r}: must be an integer >= 1")
        if not (isinstance(num_hidden_layers, int) and num_hidden_layers >= 2):
            raise ValueError(f"GanPrunerConfig.num_hidden_layers = {num_hidden_layers!r}: must be an integer >= 2")
        if not pruning_layers or any(b <= a for a, b in zip(pruning_layers, pruning_layers[1:])) or not (
            1 <= pruning_layers[0] and pruning_layers[-1] <= num_hidden_layers - 1
        ):
            raise ValueError(
                f"GanPrunerConfig.pruning_layers = {pruning_layers!r}: must be increasing, in [1, {num_hidden_layers - 1}]"
            )
        if not (isinstance(pruner_hidden, int) and pruner_hidden >= 1 and pruner_hidden % pruner_heads == 0):
            raise ValueError(
                f"GanPrunerConfig.pruner_hidden = {pruner_hidden!r}: must be a positive multiple of pruner_heads ({pruner_heads})"
            )
        if gumbel not in GUMBEL_MODES:
            raise ValueError(f"GanPrunerConfig.gumbel = {gumbel!r}: must be one of {GUMBEL_MODES}")
        if not isinstance(attention_residual, bool):
            raise ValueError(f"GanPrunerConfig.attention_residual = {attention_residual!r}: must be a bool")
        if not (isinstance(token_merger, int) and token_merger >= 0):
            raise ValueError(f"GanPrunerConfig.token_merger = {token_merger!r}: must be an integer >= 0 (0: no merger)")
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.pruning_layers = pruning_layers
        self.pruner_hidden = pruner_hidden
        self.pruner_heads = pruner_heads
        self.initial_keep_logit = float(initial_keep_logit)
        self.gumbel = gumbel
        self.attention_residual = attention_residual
        if target_keep is not None:
            target_keep = [float(t) for t in target_keep]
            if len(target_keep) != len(pruning_layers) or not all(0 < t <= 1 for t in target_keep):
                raise ValueError(
                    f"GanPrunerConfig.target_keep = {target_keep!r}: must be None or one ratio in (0, 1] per pruning layer"
                )
        self.token_merger = token_merger
        self.target_keep = target_keep
        super().__init__(**kwargs)
