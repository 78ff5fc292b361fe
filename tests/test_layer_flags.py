"""Every layer or head flag of every command line (rcpp-hf's commands, the studies in experiments/, the centroid
timing) says in its help which rule it follows: layer indices of this model's own decoder, or of a 32-layer decoder
scaled to this model's depth; head counts of this model's own heads, or heads that are not the model's. The
examples the help gives are the code's."""

import argparse

from experiments import condensation, defaults_sweep, head_ablation
from rcpp_hf.benchmark import centroid_timing
from rcpp_hf.cli import build_parser
from rcpp_hf.engine.pruning import NOT_THE_MODELS_HEADS, OWN_HEADS, OWN_LAYERS, SCALED_LAYERS, scale_layers
from rcpp_hf.gan_training.train import GanTrainConfig, scale_state_layers

LAYER_RULES = (OWN_LAYERS, SCALED_LAYERS)
HEAD_RULES = (OWN_HEADS, NOT_THE_MODELS_HEADS)
PARSERS = {
    "rcpp-hf": build_parser,
    "experiments/condensation.py": condensation.build_parser,
    "experiments/defaults_sweep.py": defaults_sweep.build_parser,
    "experiments/head_ablation.py": head_ablation.build_parser,
    "rcpp_hf.benchmark.centroid_timing": centroid_timing.build_parser,
}


def commands(parser: argparse.ArgumentParser, name: str):
    """(command name, its parser) for `parser` and every sub-command under it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from commands(sub, f"{name} {sub_name}")


def flag_help(parser: argparse.ArgumentParser, flag: str) -> str:
    """The flag's entry in the parser's --help, on one line: from the flag's line to the next flag's."""
    entries, current = {}, None
    for line in parser.format_help().splitlines():
        stripped = line.strip()
        if line.startswith("  -") and stripped.startswith("--"):
            current = stripped.split()[0].rstrip(",")
            entries[current] = [stripped]
        elif current is not None and line.startswith("      ") and stripped:
            entries[current].append(stripped)
        else:
            current = None
    return " ".join(" ".join(entries.get(flag, [])).split())


def layer_and_head_flags():
    for program, build in PARSERS.items():
        for name, parser in commands(build(), program):
            for action in parser._actions:
                if action.option_strings and ("layer" in action.dest or "head" in action.dest):
                    yield name, parser, action


def test_every_layer_and_head_flag_states_its_rule():
    found = set()
    for name, parser, action in layer_and_head_flags():
        flag = action.option_strings[0]
        found.add(f"{name} {flag}")
        text = flag_help(parser, flag).replace("- ", "-")  # argparse may wrap "32-layer" at its hyphen
        rules = LAYER_RULES if "layer" in action.dest else HEAD_RULES
        stated = [rule for rule in rules if rule in text]
        assert len(stated) == 1, f"{name} {flag}: its help must state one of {rules}; it says {text!r}"
    assert {"rcpp-hf gan-pruner train --pruning-layers", "rcpp-hf gan-pruner train --discriminator-layers",
            "rcpp-hf gan-pruner train --pruner-heads", "experiments/condensation.py --layers",
            "experiments/head_ablation.py --heads", "rcpp_hf.benchmark.centroid_timing --heads"} <= found  # fmt: skip


def test_the_gan_trainers_layer_help_gives_the_codes_scaling_and_defaults():
    parser = dict(commands(build_parser(), "rcpp-hf"))["rcpp-hf gan-pruner train"]
    pruning, discriminator = flag_help(parser, "--pruning-layers"), flag_help(parser, "--discriminator-layers")
    defaults = GanTrainConfig()
    assert (defaults.pruning_layers, scale_layers(defaults.pruning_layers, 12)) == ((6, 12, 18), (2, 4, 7))
    assert "(6 12 18 -> 2 4 7 on 12 layers)" in pruning and "(default: 6 12 18)" in pruning
    assert (defaults.discriminator_layers, scale_state_layers(defaults.discriminator_layers, 12)) == ((15, 23, 31),
                                                                                                     (5, 8, 11))
    assert "(15 23 31 -> 5 8 11 on 12 layers)" in discriminator and "(default: 15 23 31)" in discriminator
    assert scale_state_layers((31,), 4) == (3,)  # "31 stays the last layer"
