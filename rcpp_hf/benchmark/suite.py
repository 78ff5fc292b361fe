"""Run the methods side by side in one process, interleaved, and report per-method speed, cache size and memory,
each also as a ratio to vanilla measured in the same run.

Rows (`METHODS`): vanilla and four settings of the registry method "rcpp" (`rcpp_row`: scores only, contrast,
contrast with the first-token action, contrast and eviction), any other registry method by name (alone: RCPP off,
greedy), or "<registry name>+rcpp" (composed with the "rcpp" row). The default adds VCD, the two-pass contrastive
reference (two forwards and two caches per token, `methods/contrastive_decoder.py`), to show what DRCD's one
forward saves. A registry method with a `budget` setting runs at `BenchmarkSettings.budget` unless its preset
(`method_presets`) sets one; both follow the budget rule (`methods/budget.py`: a count of the model's image or a
fraction of it). A method that does not fit the model (e.g. an unreachable budget) or that refuses it (e.g. a
vision-side pruner on LLaVA-NeXT's anyres images) is a skipped row with its reason.

The image is random noise, square: 336 pixels for LLaVA-1.5 (the processor resizes it to the tower's tile), or for
an anyres model the largest square grid of its `image_grid_pinpoints` (672 for llava-v1.6's: a 2 x 2 grid, no
padding), so that the prompt holds the most visual tokens that grid gives (576 + 48 x 48 + 48 newlines = 2,928),
or for a dynamic-resolution model (Qwen2.5-VL) 24 x 24 merged patches (672 pixels: 576 visual tokens).
"""

from __future__ import annotations

import platform
import statistics
from dataclasses import asdict, dataclass

import torch
import transformers
from PIL import Image
from tqdm import tqdm

from rcpp_hf.benchmark.flops import (
    counting_stage_flops,
    flops_per_weight_byte,
    prefill_cost,
    prefill_flops,
    weight_bytes,
)
from rcpp_hf.benchmark.measure import PeakMemory, StepTimer, resident_bytes
from rcpp_hf.benchmark.model_sizes import load_benchmark_model
from rcpp_hf.config import RCPPGenerationConfig
from rcpp_hf.engine.cache import VisualKVCache, cache_nbytes
from rcpp_hf.methods import METHODS as REGISTRY
from rcpp_hf.methods import MethodConfig, load_method
from rcpp_hf.methods.budget import budget_problem, budget_rule, published_fraction
from rcpp_hf.methods.contrastive_decoder import ContrastiveDecoder
from rcpp_hf.methods.prefill_pruner import PrefillPruner
from rcpp_hf.run_config import build_generation_config

METHODS = ("vanilla", "rcpp-score-only", "rcpp", "rcpp-first", "rcpp-evict")  # vanilla and the "rcpp" rows
DEFAULT_METHODS = (*METHODS, "vcd")  # VCD: the two-pass contrastive reference
WITH_RCPP = "+rcpp"  # "fastv+rcpp": a registry method composed with the "rcpp" setting
PROMPT = "USER: <image>\nDescribe the image in detail. ASSISTANT:"

# (method, metric, "<=" or ">=", threshold): the speed targets, checked on every run and reported with it.
TARGETS = [
    ("rcpp-score-only", "prefill_ratio", "<=", 1.05),
    ("rcpp-score-only", "decode_median_ratio", "<=", 1.05),
    ("rcpp", "decode_median_ratio", "<=", 1.15),
    ("rcpp-first", "decode_median_ratio", "<=", 1.15),  # its cost is in prefill_s: one extra two-row forward
    ("vcd", "decode_median_ratio", ">=", 1.8),
    ("rcpp-evict", "final_visual_cache_ratio", "<=", 0.26),
    ("rcpp-evict", "decode_late_median_ratio", "<=", 1.0),
]
PREFILL_FLOPS_SLACK = 1.10  # a prefill pruner's prefill ratio over its FLOPs and cost ratios (`pruner_flops`)


@dataclass
class BenchmarkSettings:
    """What to measure. `early_steps` / `late_steps` are the decode-step windows reported separately."""

    shape: str = "tiny"
    model: str | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    new_tokens: int = 256
    repeats: int = 5
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    lambda_t: float = 0.5
    keep_ratio_end: float = 0.25
    evict_steps: int = 32
    early_steps: int = 32
    late_steps: int = 128
    seed: int = 0
    budget: int | float = published_fraction(128)  # registry methods' budget: a count of the image or a fraction
    method_presets: tuple[dict, ...] = ()  # registry method settings {"method": name, ...} (e.g. --method-config)

    def __post_init__(self):
        self.methods = tuple(self.methods)
        self.method_presets = tuple(self.method_presets)
        unknown = sorted(set(self.methods) - set(known_methods()))
        if unknown:
            raise ValueError(f"BenchmarkSettings.methods: unknown {unknown}; known: {', '.join(known_methods())}")
        if (problem := budget_problem(self.budget)) is not None:
            raise ValueError(f"BenchmarkSettings.budget = {self.budget!r}: must be {budget_rule()}; it {problem}")
        for preset in self.method_presets:
            load_method(preset)  # validated now, before any model work
        if "vanilla" not in self.methods:
            raise ValueError("BenchmarkSettings.methods must include 'vanilla': every ratio is to vanilla")
        if self.new_tokens < 4:
            raise ValueError(f"BenchmarkSettings.new_tokens = {self.new_tokens}: need at least 4")
        if self.repeats < 1 or self.batch_size < 1:
            raise ValueError("BenchmarkSettings.repeats and batch_size must be >= 1")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"BenchmarkSettings.dtype = {self.dtype!r}: expected float32, float16 or bfloat16")


def known_methods() -> list[str]:
    """The benchmark's own rows, then every other registry method alone and composed with RCPP, except a
    contrastive decoder with RCPP: it runs alone (`protocol.check_combination`), so that row could never run."""
    others = [name for name in REGISTRY if name != "rcpp"]
    composable = [name for name in others if not issubclass(REGISTRY[name], ContrastiveDecoder)]
    return [*METHODS, *others, *(name + WITH_RCPP for name in composable)]


def registry_method(method: str, settings: BenchmarkSettings) -> MethodConfig | None:
    """The registry method that `method` runs ("fastv" or "fastv+rcpp"), or None for the benchmark's own."""
    name = method.removesuffix(WITH_RCPP)
    if method in METHODS or name not in REGISTRY:
        return None
    preset = next((preset for preset in settings.method_presets if preset["method"] == name), {"method": name})
    if "budget" in load_method(name).to_dict() and "budget" not in preset:
        return load_method(preset, budget=settings.budget)
    return load_method(preset)


def skip_reason(method: str, settings: BenchmarkSettings, num_layers: int, num_visual: int) -> str | None:
    """Why row `method` cannot run on this model (its registry method's `check_fits` ValueError), or None."""
    registered = registry_method(method, settings)
    if registered is None:
        return None
    try:
        registered.check_fits(num_layers, num_visual)
    except ValueError as error:
        return str(error)
    return None


def rcpp_row(method: str, settings: BenchmarkSettings, tau: float) -> MethodConfig:
    """The registry method "rcpp" at the settings of one of the benchmark's RCPP rows: scores alone; contrast at
    `lambda_t` (with the first-token action for "rcpp-first"); contrast and eviction to `keep_ratio_end`."""
    contrast = dict(tau=tau, lambda_start=settings.lambda_t, lambda_end=settings.lambda_t)
    every_token = dict(keep_ratio_start=1.0, keep_ratio_end=1.0)
    rows = {
        "rcpp-score-only": dict(tau=-1.0, lambda_start=0.0, lambda_end=0.0, **every_token),
        "rcpp": dict(**contrast, **every_token),
        "rcpp-first": dict(**contrast, **every_token, first_token_action=True),
        "rcpp-evict": dict(**contrast, keep_ratio_start=1.0, keep_ratio_end=settings.keep_ratio_end, schedule="linear",
                           schedule_steps=settings.evict_steps),  # fmt: skip
    }
    return load_method("rcpp", **rows[method])


def method_generation_config(method: str, settings: BenchmarkSettings, tau: float) -> RCPPGenerationConfig:
    """Every row decodes exactly `new_tokens` greedy tokens (min = max, so an early EOS cannot shorten a run) with
    its registry methods: none (vanilla), "rcpp" at the row's settings, or a registry method alone or with the
    "rcpp" row."""
    length = dict(max_new_tokens=settings.new_tokens, min_new_tokens=settings.new_tokens, do_sample=False)
    if method == "vanilla":
        return build_generation_config(None, **length)
    if method in METHODS:
        return build_generation_config(None, rcpp_row(method, settings, tau), **length)
    registered = registry_method(method, settings)
    if registered is None:
        raise ValueError(f"no generation config for {method!r}; known: {', '.join(known_methods())}")
    methods = [registered]
    if method.endswith(WITH_RCPP):
        methods.append(rcpp_row("rcpp", settings, tau))
    return build_generation_config(None, methods, **length)


def run_method(model, inputs, method: str, settings: BenchmarkSettings, tau: float, streamer=None, trace=False):
    """One generation; returns (sequences, caches, RCPPTrace or None): caches is [the cache] or, for a contrastive
    decoder, [main branch's, contrast branch's]."""
    config = method_generation_config(method, settings, tau)
    config.return_dict_in_generate = trace
    if streamer is not None:
        streamer.start()
    out = model.generate(**inputs, generation_config=config, streamer=streamer)
    if not trace:
        return out, None, None
    caches = [out.past_key_values] + [c for c in [getattr(out, "contrast_past_key_values", None)] if c is not None]
    return out.sequences, caches, getattr(out, "rcpp", None)


def calibrate_tau(model, inputs, settings: BenchmarkSettings) -> float:
    """tau = the median first-step consistency score, so that C and N each start with about half the tokens (the
    random-weight shapes have no meaningful scale of their own)."""
    config = method_generation_config("rcpp-score-only", settings, tau=-1.0)
    config.max_new_tokens = config.min_new_tokens = 1
    config.return_dict_in_generate = True
    out = model.generate(**inputs, generation_config=config)
    return float(out.rcpp.steps[0].scores.median())


def cache_profile(model, inputs, method, settings, tau, prompt_length, num_visual) -> dict:
    """Total and visual KV bytes after every step, from an untimed run: RCPP's trace measures them; for the methods
    whose cache only grows by one token in every layer per step, the final cache gives every step exactly (a
    prefill pruner's layers differ in length, so a token's bytes are summed over layers). A contrastive decoder's
    two caches are summed."""
    _, caches, trace = run_method(model, inputs, method, settings, tau, trace=True)
    if trace is not None:
        noisy_steps = [int(step.num_noise.min()) > 0 for step in trace.steps[1:]]
        return {
            "cache_bytes": [step.cache_bytes for step in trace.steps],
            "visual_cache_bytes": [step.visual_cache_bytes for step in trace.steps],
            "contrast_step_fraction": (sum(noisy_steps) / len(noisy_steps))
            if method in ("rcpp", "rcpp-first", "rcpp-evict") or method.endswith(WITH_RCPP) else 0.0,
        }
    layers = [layer for cache in caches for layer in cache.layers if layer.is_initialized]
    token_bytes = sum((layer.keys.nbytes + layer.values.nbytes) // layer.keys.shape[-2] for layer in layers)
    final_bytes, last = sum(cache_nbytes(cache) for cache in caches), settings.new_tokens - 1  # last: never cached
    visual_bytes = (sum(cache.visual_nbytes() for cache in caches) if isinstance(caches[0], VisualKVCache)
                    else token_bytes * num_visual)  # fmt: skip
    steps = range(settings.new_tokens)
    registered = registry_method(method, settings)
    two_pass = isinstance(registered, ContrastiveDecoder) and registered.has_contrast
    return {
        "cache_bytes": [final_bytes - token_bytes * (last - step) for step in steps],
        "visual_cache_bytes": [visual_bytes for _ in steps],
        "contrast_step_fraction": 1.0 if two_pass else 0.0,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarise(timers: list[StepTimer], peak: int, profile: dict, settings: BenchmarkSettings) -> dict:
    decode_runs = [timer.decode_seconds for timer in timers]  # each: new_tokens - 1 values
    steps = len(decode_runs[0])
    early = [run[i] for run in decode_runs for i in range(min(settings.early_steps, steps // 2))]
    late = [run[i] for run in decode_runs for i in range(steps - min(settings.late_steps, steps // 2), steps)]
    every = [value for run in decode_runs for value in run]
    per_step = [statistics.median(run[i] for run in decode_runs) for i in range(steps)]
    totals = [timer.total_seconds for timer in timers]
    # Memory that grows with the steps beyond the cache: RSS minus cache bytes, slope over the late window.
    growth = []
    for timer in timers:
        cache = profile["cache_bytes"]
        extra = [rss - cache[min(i, len(cache) - 1)] for i, rss in enumerate(timer.rss[1:])]
        window = extra[-min(settings.late_steps, len(extra) // 2):]
        growth.append((window[-1] - window[0]) / max(len(window) - 1, 1))
    return {
        "prefill_s": statistics.median(timer.prefill_seconds for timer in timers),
        "decode_median_s": statistics.median(every),
        "decode_p90_s": percentile(every, 0.9),
        "decode_early_median_s": statistics.median(early),
        "decode_early_p90_s": percentile(early, 0.9),
        "decode_late_median_s": statistics.median(late),
        "decode_late_p90_s": percentile(late, 0.9),
        "tokens_per_s": settings.batch_size * settings.new_tokens / statistics.median(totals),
        "peak_memory_bytes": peak,
        "memory_growth_beyond_cache_bytes_per_step": statistics.median(growth),
        "final_cache_bytes": profile["cache_bytes"][-1],
        "final_visual_cache_bytes": profile["visual_cache_bytes"][-1],
        "contrast_step_fraction": profile["contrast_step_fraction"],
        "decode_s_per_step": per_step,
        "cache_bytes_per_step": profile["cache_bytes"],
        "visual_cache_bytes_per_step": profile["visual_cache_bytes"],
    }


RATIO_METRICS = {
    "prefill_ratio": "prefill_s",
    "decode_median_ratio": "decode_median_s",
    "decode_early_median_ratio": "decode_early_median_s",
    "decode_late_median_ratio": "decode_late_median_s",
    "tokens_per_s_ratio": "tokens_per_s",
    "peak_memory_ratio": "peak_memory_bytes",
    "peak_above_model_ratio": "peak_above_model_bytes",
    "final_cache_ratio": "final_cache_bytes",
    "final_visual_cache_ratio": "final_visual_cache_bytes",
}


def add_ratios(results: dict) -> None:
    vanilla = results["vanilla"]
    for metrics in measured(results).values():
        for ratio, metric in RATIO_METRICS.items():
            metrics[ratio] = metrics[metric] / vanilla[metric] if vanilla[metric] else float("nan")
        if "prefill_flops_ratio" in metrics:
            metrics["prefill_over_flops"] = metrics["prefill_ratio"] / metrics["prefill_flops_ratio"]
            metrics["prefill_over_cost"] = metrics["prefill_ratio"] / metrics["prefill_cost_ratio"]


def measured(results: dict) -> dict:
    """The rows that ran (not skipped)."""
    return {method: metrics for method, metrics in results.items() if "skipped" not in metrics}


def pruner_flops(model, inputs, method: str, settings: BenchmarkSettings, pruner: PrefillPruner, num_visual: int,
                 balance: float, tiles: int) -> dict:  # fmt: skip
    """What a pruner's measured prefill ratio is compared with (`benchmark/flops.py`), each over the unpruned
    prefill's: FLOPs (the model's with the tokens its stages keep, plus its stages' own, counted in one untimed
    prefill), the two parts, and the cost (those FLOPs plus the weight reads at `balance` FLOPs per byte)."""
    num_layers = model.config.text_config.num_hidden_layers
    num_text = inputs["input_ids"].shape[1] - num_visual
    config = method_generation_config(method, settings, tau=-1.0)
    config.max_new_tokens = config.min_new_tokens = 1
    with counting_stage_flops() as counted:
        model.generate(**inputs, generation_config=config)
    scoring = counted[0] / settings.batch_size
    stages = pruner.resolve_stages(num_layers, num_visual)
    unpruned = prefill_flops(model, [], num_visual, num_text, tiles)
    full_cost = prefill_cost(model, [], num_visual, num_text, settings.batch_size, balance, tiles)
    model_ratio = prefill_flops(model, stages, num_visual, num_text, tiles) / unpruned
    return {
        "prefill_flops_ratio": model_ratio + scoring / unpruned,
        "prefill_model_flops_ratio": model_ratio,
        "prefill_scoring_flops_ratio": scoring / unpruned,
        "prefill_cost_ratio": (prefill_cost(model, stages, num_visual, num_text, settings.batch_size, balance, tiles)
                               + scoring) / full_cost,  # fmt: skip
    }


def targets_for(results: dict) -> list[tuple[str, str, str, float]]:
    """`TARGETS`, and for every prefill pruner row: prefill within `PREFILL_FLOPS_SLACK` of its FLOPs ratio and of
    its cost ratio (FLOPs and weight reads), and, alone (not composed with RCPP), decode no slower than vanilla."""
    pruners = [method for method, metrics in measured(results).items() if "prefill_flops_ratio" in metrics]
    return (TARGETS + [(method, over, "<=", PREFILL_FLOPS_SLACK) for over in ("prefill_over_flops", "prefill_over_cost")
                       for method in pruners]  # fmt: skip
            + [(method, "decode_median_ratio", "<=", 1.0) for method in pruners if not method.endswith(WITH_RCPP)])


def check_targets(results: dict) -> list[dict]:
    checks = []
    for method, metric, op, threshold in targets_for(results):
        if method not in measured(results):
            continue
        value = results[method][metric]
        met = value <= threshold if op == "<=" else value >= threshold
        checks.append({"method": method, "metric": metric, "target": f"{op} {threshold}", "value": value, "met": met})
    return checks


# A dynamic-resolution image's side in merged tokens: 672 pixels on Qwen2.5-VL (14-pixel patches merged 2 x 2), 576
# visual tokens as LLaVA-1.5's image
DYNAMIC_SIDE_TOKENS = 24


def image_side(config) -> int:
    """The side of the benchmark's square image (module docstring): 336, an anyres model's largest square grid, or
    24 merged patches for a dynamic-resolution model (672 pixels on Qwen2.5-VL)."""
    merge = getattr(getattr(config, "vision_config", None), "spatial_merge_size", None)
    if merge is not None:
        return DYNAMIC_SIDE_TOKENS * merge * config.vision_config.patch_size
    squares = [height for height, width in getattr(config, "image_grid_pinpoints", None) or [] if height == width]
    return max(squares, default=336)


def benchmark_inputs(processor, settings: BenchmarkSettings, device, dtype, side: int = 336) -> dict:
    generator = torch.Generator().manual_seed(settings.seed)
    pixels = torch.randint(0, 256, (side, side, 3), generator=generator, dtype=torch.uint8).numpy()
    images = [Image.fromarray(pixels)] * settings.batch_size
    inputs = processor(images=images, text=[PROMPT] * settings.batch_size, return_tensors="pt")
    return inputs.to(device, dtype=dtype)


def run_speed_benchmark(settings: BenchmarkSettings) -> dict:
    """Measure every method of `settings` in this process; returns the JSON-ready report."""
    dtype = getattr(torch, settings.dtype)
    model, processor = load_benchmark_model(settings.shape, settings.model, settings.device, dtype)
    inputs = benchmark_inputs(processor, settings, settings.device, dtype, image_side(model.config))
    resident = resident_bytes(settings.device)  # the model and inputs, before any run
    prompt_length = inputs["input_ids"].shape[1]
    num_visual = int(model.family.image_token_mask(inputs["input_ids"])[0].sum())
    tiles = inputs["pixel_values"].shape[1] if inputs["pixel_values"].dim() == 5 else 1  # anyres: (B, tiles, C, H, W)
    num_layers = model.config.text_config.num_hidden_layers
    skipped = {m: reason for m in settings.methods if (reason := skip_reason(m, settings, num_layers, num_visual))}
    tau = calibrate_tau(model, inputs, settings)
    balance = flops_per_weight_byte([module.weight for module in model.family.language_model.layers.modules()
                                     if isinstance(module, torch.nn.Linear)])  # fmt: skip

    profiles = {}
    for method in [method for method in settings.methods if method not in skipped]:
        try:
            profiles[method] = cache_profile(model, inputs, method, settings, tau, prompt_length, num_visual)
        except ValueError as refusal:  # a registry method that refuses this model, in its one line
            if registry_method(method, settings) is None:
                raise
            skipped[method] = str(refusal)
    runs = [method for method in settings.methods if method not in skipped]
    timers = {method: [] for method in runs}
    rounds = [(r, m) for r in range(settings.repeats + 1) for m in runs]  # round 0 is the warm-up
    for repeat, method in tqdm(rounds, desc=f"bench {settings.model or settings.shape}", unit="run"):
        timer = StepTimer()
        run_method(model, inputs, method, settings, tau, streamer=timer)
        if repeat > 0:
            timers[method].append(timer)
    # Peak memory in one more run of each row, untimed: on a CPU, sampling the RSS competes with torch's threads
    peaks = {}
    for method in runs:
        with PeakMemory(settings.device) as memory:
            run_method(model, inputs, method, settings, tau)
        peaks[method] = memory.peak_bytes

    results = {m: {"skipped": skipped[m]} if m in skipped else summarise(timers[m], peaks[m], profiles[m], settings)
               for m in settings.methods}  # fmt: skip
    for metrics in measured(results).values():
        metrics["peak_above_model_bytes"] = metrics["peak_memory_bytes"] - resident
    for method in settings.methods:
        registered = registry_method(method, settings)
        if registered is not None:
            results[method]["method"] = registered.to_dict()
        if isinstance(registered, PrefillPruner) and method not in skipped:
            results[method].update(pruner_flops(model, inputs, method, settings, registered, num_visual, balance,
                                                tiles))
    add_ratios(results)
    return {
        "settings": asdict(settings),
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name() if settings.device.startswith("cuda") else platform.processor()
            or platform.machine(),
            "threads": torch.get_num_threads(),
            "prompt_tokens": prompt_length,
            "visual_tokens": num_visual,
            "tau": tau,
            "flops_per_weight_byte": balance,
            "weight_bytes": weight_bytes(model),
        },
        "methods": results,
        "targets": check_targets(results),
    }


TABLE_COLUMNS = [
    ("prefill ms", "prefill_s", 1e3, "prefill_ratio"),
    ("decode ms (med)", "decode_median_s", 1e3, "decode_median_ratio"),
    ("early ms", "decode_early_median_s", 1e3, "decode_early_median_ratio"),
    ("late ms", "decode_late_median_s", 1e3, "decode_late_median_ratio"),
    ("late p90 ms", "decode_late_p90_s", 1e3, None),
    ("tok/s", "tokens_per_s", 1, "tokens_per_s_ratio"),
    ("visual KV MiB", "final_visual_cache_bytes", 2 ** -20, "final_visual_cache_ratio"),
    ("cache MiB", "final_cache_bytes", 2 ** -20, "final_cache_ratio"),
    ("peak MiB", "peak_memory_bytes", 2 ** -20, "peak_memory_ratio"),
    ("peak - model MiB", "peak_above_model_bytes", 2 ** -20, "peak_above_model_ratio"),
]


def format_report(report: dict) -> str:
    """A plain-text table (value and ratio to vanilla per cell) followed by the targets."""
    header = ["method"] + [name for name, *_ in TABLE_COLUMNS] + ["contrast steps", "prefill FLOPs (scoring)",
                                                                 "prefill cost"]
    rows = [header]
    skipped = []
    for method, metrics in report["methods"].items():
        if "skipped" in metrics:
            skipped.append(f"{method}: skipped: {metrics['skipped']}")
            continue
        row = [method]
        for _, metric, scale, ratio in TABLE_COLUMNS:
            cell = f"{metrics[metric] * scale:.2f}"
            if ratio is not None:
                cell += f" ({metrics[ratio]:.2f}x)"
            row.append(cell)
        row.append(f"{metrics['contrast_step_fraction']:.0%}")
        if "prefill_flops_ratio" in metrics:
            row += [f"{metrics['prefill_flops_ratio']:.3f}x ({metrics['prefill_scoring_flops_ratio']:.3f}x)",
                    f"{metrics['prefill_cost_ratio']:.3f}x"]  # fmt: skip
        else:
            row += ["-", "-"]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    env = report["environment"]
    settings = report["settings"]
    lines.insert(0, f"shape {settings['model'] or settings['shape']}, {settings['dtype']}, {settings['device']} "
                    f"({env['device']}, {env['threads']} threads), batch {settings['batch_size']}, "
                    f"{settings['new_tokens']} new tokens, {settings['repeats']} repeats, {env['visual_tokens']} "
                    f"visual tokens, tau {env['tau']:.4f}; ratios are to vanilla in this run; "
                    f"{env['flops_per_weight_byte']:.1f} FLOPs per weight byte read")
    lines += skipped
    lines.append("")
    for check in report["targets"]:
        lines.append(f"target {check['method']:<16} {check['metric']:<26} {check['target']:<8} "
                     f"measured {check['value']:.3f}  {'met' if check['met'] else 'MISSED'}")
    return "\n".join(lines)


def plot_report(report: dict, path) -> None:
    """Per-token decode time and cache bytes against the step, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, cache_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, metrics in measured(report["methods"]).items():
        steps = range(1, len(metrics["decode_s_per_step"]) + 1)
        time_ax.plot(steps, [s * 1e3 for s in metrics["decode_s_per_step"]], label=method, linewidth=1)
        line, = cache_ax.plot([b / 2 ** 20 for b in metrics["cache_bytes_per_step"]], label=f"{method} total")
        cache_ax.plot([b / 2 ** 20 for b in metrics["visual_cache_bytes_per_step"]], linestyle="--",
                      color=line.get_color(), label=f"{method} visual")
    time_ax.set(xlabel="decode step", ylabel="ms per token (median over repeats)", title="per-token decode time")
    cache_ax.set(xlabel="step", ylabel="MiB", title="KV cache (solid: total, dashed: visual)")
    time_ax.legend(fontsize=8)
    cache_ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"rcpp_hf benchmark: {report['settings']['model'] or report['settings']['shape']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
