"""ShapesWorld v2's reason for a 12-layer decoder: the methods' layer defaults (stated for LLaVA-1.5's 32 layers)
collapse onto each other on the first model's 4 layers and land on distinct layers on 12."""

from rcpp_hf.engine.pruning import scale_layers
from rcpp_hf.methods.budget import published_fraction
from rcpp_hf.methods.rcpp import resolve_scoring_layers
from rcpp_hf.methods.registry import load_method

NUM_VISUAL = 100  # the ShapesWorld image


def default_layers(num_layers: int) -> dict[str, tuple[int, ...]]:
    budget = published_fraction(192)
    layers = {
        name: tuple(stage.layer for stage in load_method(name, **settings).resolve_stages(num_layers, NUM_VISUAL))
        for name, settings in (("fastv", {"budget": budget}), ("sparsevlm", {"budget": budget}), ("pdrop", {}),
                               ("himap", {}))
    }  # fmt: skip
    layers["gan_pruner"] = scale_layers((6, 12, 18), num_layers)  # GanPrunerConfig's default, scaled as its trainer does
    layers["mc_lcbf"] = load_method("mc_lcbf").steered_layers(num_layers)
    layers["rcpp"] = tuple(resolve_scoring_layers(None, num_layers))
    return layers


def test_defaults_collapse_on_4_layers_and_separate_on_12():
    shallow, deep = default_layers(4), default_layers(12)
    assert shallow["pdrop"] == shallow["sparsevlm"] == shallow["mc_lcbf"] == (1, 2, 3)
    assert deep == {"fastv": (1,), "sparsevlm": (1, 3, 6), "pdrop": (3, 6, 9), "himap": (1, 3), "gan_pruner": (2, 4, 7),
                    "mc_lcbf": (4, 5, 6, 7, 8, 9, 10), "rcpp": (8, 9, 10, 11)}  # fmt: skip
    # Every multi-stage method acts at distinct depths; on 4 layers RCPP scores on every layer, on 12 on the last third.
    assert all(len(set(layers)) == len(layers) for layers in deep.values())
    assert shallow["rcpp"] == (0, 1, 2, 3) and min(deep["rcpp"]) > max(deep["gan_pruner"] + deep["himap"])
