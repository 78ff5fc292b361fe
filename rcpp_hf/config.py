"""`RCPPGenerationConfig`: a `GenerationConfig` that also carries the settings of RCPP + DRCD and the methods of the
registry to run in `generate`."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

import yaml
from transformers import GenerationConfig

from rcpp_hf.methods import RCPP, MethodConfig, check_compatible, load_method
from rcpp_hf.methods.rcpp import check_rcpp_settings
from rcpp_hf.presets import GENERATION, read_preset

# Field -> default, in one table so that __init__, validation, YAML and docs agree: `rcpp`, the `rcpp` method's
# settings (its defaults: `methods/rcpp.py`), and `methods`.
RCPP_SETTINGS = tuple(f.name for f in dataclasses.fields(RCPP))
RCPP_DEFAULTS: dict[str, object] = {
    "rcpp": True,
    **{f.name: f.default for f in dataclasses.fields(RCPP)},
    "methods": (),
}


class RCPPGenerationConfig(GenerationConfig):
    """Generation settings plus the knobs of RCPP + DRCD (every other `GenerationConfig` field works as usual).

    Args:
        rcpp: turn the method on. `False` gives exactly `LlavaForConditionalGeneration.generate`.
        gamma: EMA momentum of the consistency score S, in [0, 1) (stage 4).
        tau: grouping threshold (stage 5): C = {S >= threshold}, N = {S < threshold}, the threshold read from tau
            per `tau_mode`.
        tau_mode: how tau sets each row's threshold from the current S of its cached visual tokens
            (`rcpp.stages.grouping_threshold`), every decoding step:
            "absolute" (the default, and the presets'): tau itself, a cosine in [-1, 1]; tau = -1 puts every token
                in C. Its scale depends on the model.
            "quantile": the tau-quantile of the row's S, tau in [0, 1] (the k-th smallest score, k = floor(tau *
                (n - 1)), 0-based): N holds at most k of the n tokens, fewer with ties; tau = 0 leaves N empty.
            "std": mean(S) - tau * std(S) over the row (population std); tau any finite number, larger = fewer in N.
        lambda_start, lambda_end: contrast coefficient lambda_t of `logits_C - lambda_t * logits_N` at the first and
            last scheduled step (stage 6-7), >= 0.
        keep_ratio_start, keep_ratio_end: fraction of the image's visual tokens kept in the KV cache, in (0, 1], not
            increasing (stage 7). Tokens beyond the budget are evicted physically.
        schedule: "linear", "cosine" or "step" (start value until `schedule_steps`, end value from then on).
        schedule_steps: number of decoding steps over which lambda and keep ratio move from start to end, >= 1.
        scoring_layers: decoder layers whose attention and visual hidden states drive the reconstruction (stage 2);
            negative indices count from the last layer. Checked against the model at `generate` time: a layer out of
            range raises, naming it. `None` (the default): the last min(4, L) layers of an L-layer decoder.
        plausibility_beta: adaptive plausibility constraint (VCD): keep only tokens with p_C >= beta * max p_C.
            `None` turns it off; else in (0, 1].
        first_token_action: also decode the first generated token with DRCD (off by default). Once the prefill has
            given S, the last prompt token is run again as DRCD's two rows (main -> C, contrast -> N) in one
            decode-sized forward, the first token comes from the fused logits with lambda = `lambda_end`, and the
            cache keeps the main row's entry for that token. Costs one extra single-token forward per `generate`
            call, none when N is empty or lambda_end is 0 (then tokens are vanilla's). It acts where a short answer
            (POPE's yes / no) is decided; see `methods.rcpp.RCPPState.first_token_action`. lambda_end,
            not the schedule's start: the ramp eases the contrast in over a caption's first steps, while a short
            answer has this step alone (and at lambda_start's default 0 the action would do nothing). S is not
            updated by the extra forward.
        evidence_gating: consumed-evidence gating, this library's extension (off by default; `rcpp/gating.py`). A
            visual token may join N or be evicted only once it is "consumed": its cumulative attention (the mean over
            the scoring layers of alpha, summed over the steps so far, the prompt's included) is above the median of
            the cached tokens', or its S has once been >= the grouping threshold (from step 0, the prefill's S, on).
            The others are protected: they stay in C, and eviction takes them (lowest S first) only when the budget
            needs more tokens than are eligible; `out.rcpp` counts them (`RCPPStep.num_protected`,
            `.protected_evicted`).
        methods: other inference-time methods of the registry (`rcpp_hf.methods`) to run in the same `generate`:
            config objects (`FastV(budget=128)`), dicts with a "method" key, registered names, or YAML preset paths.
            A prefill pruner composes with RCPP + DRCD (RCPP then scores only the visual tokens that survived it);
            `rcpp=False` with methods runs the methods alone.

    Neutral settings (`lambda_start = lambda_end = 0`, keep ratios 1, `tau = -1`, or `tau = 0` with "quantile")
    reproduce vanilla decoding token for token while still recording the scores.

    The RCPP fields are the settings of the registry method "rcpp" (`methods.RCPP`): an `RCPP` config in `methods`
    sets them (and turns `rcpp` on), so `RCPPGenerationConfig(methods=[load_method("rcpp", tau=0.1)])` is
    `RCPPGenerationConfig(tau=0.1)`; giving RCPP's settings both ways raises. `active_methods()` lists what
    `generate` runs.
    """

    def __init__(self, **kwargs):
        methods = tuple(load_method(spec) for spec in kwargs.pop("methods", ()))
        settings = {name: kwargs.pop(name) for name in RCPP_SETTINGS if name in kwargs}
        rcpp = kwargs.pop("rcpp", RCPP_DEFAULTS["rcpp"])
        listed = [method for method in methods if isinstance(method, RCPP)]
        if listed:
            if settings or len(listed) > 1:
                raise ValueError(
                    "RCPPGenerationConfig: RCPP + DRCD's settings are given more than once (as fields "
                    f"{sorted(settings)} and as {len(listed)} 'rcpp' method(s)); give them once"
                )
            settings, rcpp = listed[0].settings(), True
            methods = tuple(method for method in methods if not isinstance(method, RCPP))
        self.rcpp = rcpp
        for name in RCPP_SETTINGS:
            value = settings.get(name, RCPP_DEFAULTS[name])
            setattr(self, name, tuple(value) if name == "scoring_layers" and value is not None else value)
        self.methods = methods
        super().__init__(**kwargs)  # ends with self.validate()

    def rcpp_method(self) -> RCPP | None:
        """The `rcpp` method these fields describe, or None when `rcpp` is off."""
        return RCPP(**{name: getattr(self, name) for name in RCPP_SETTINGS}) if self.rcpp else None

    def active_methods(self) -> tuple[MethodConfig, ...]:
        """What `generate` runs: `methods`, and RCPP + DRCD from the fields when `rcpp` is on."""
        rcpp = self.rcpp_method()
        return self.methods if rcpp is None else (*self.methods, rcpp)

    # -- validation --------------------------------------------------------------------------------------------
    def validate(self, strict: bool = False, user_set_attributes: set[str] | None = None):
        super().validate(strict=strict, user_set_attributes=user_set_attributes)
        if not isinstance(self.rcpp, bool):
            raise ValueError(f"RCPPGenerationConfig.rcpp = {self.rcpp!r}: must be True or False")
        check_rcpp_settings(self, "RCPPGenerationConfig")
        if any(isinstance(method, RCPP) for method in self.methods):
            raise ValueError(
                "RCPPGenerationConfig.methods holds an 'rcpp' method: RCPP + DRCD's settings are the config's fields; "
                "pass it to RCPPGenerationConfig(methods=[...]), which sets them, or set the fields"
            )
        check_compatible(self.methods)

    # -- (de)serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        output = super().to_dict()
        if self.scoring_layers is not None:
            output["scoring_layers"] = list(self.scoring_layers)  # JSON/YAML have no tuples
        output["methods"] = [method.to_dict() for method in self.methods]
        return output

    @classmethod
    def from_yaml(cls, preset: str | Path, **overrides) -> "RCPPGenerationConfig":
        """Load a generation preset, a flat mapping of field -> value: a shipped preset's name (`rcpp_evict`, see
        `rcpp_hf.presets`) or a path to a YAML file; kwargs override it. A key that is no field is refused."""
        return cls(**{**cls.preset_values(preset), **overrides})

    @classmethod
    def preset_values(cls, preset: str | Path) -> dict:
        """The checked mapping of a generation preset: every key a field of this config (RCPP's, `methods`, or
        `GenerationConfig`'s), else a ValueError naming the closest field."""
        values = read_preset(preset, GENERATION)
        fields = set(RCPP_DEFAULTS) | set(GenerationConfig().to_dict())
        for key in values:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f"did you mean {close[0]!r}?" if close else "see RCPPGenerationConfig's fields"
                raise ValueError(f"{preset}: {key!r} is not a field of RCPPGenerationConfig; {hint}")
        return values

    def to_yaml(self, path: str | Path) -> None:
        """Write the RCPP fields and every generation field that differs from the defaults."""
        values = {**self.to_diff_dict(), **{name: self.to_dict()[name] for name in RCPP_DEFAULTS}}
        values.pop("transformers_version", None)
        Path(path).write_text(yaml.safe_dump(values, sort_keys=False))
