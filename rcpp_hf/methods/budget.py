"""Visual-token budgets: the one convention of every setting that counts visual tokens to keep (FastV's `budget` and
`keep`, the vision pruners' `budget`, HiMAP's ranks, SID's `keep`, the command line's `--budget(s)`, ...).

A budget is either
  - an int >= 1: that many visual tokens of the model's own image (LLaVA-1.5: 576; the ShapesWorld models: 100), or
  - a float in (0, 1): that fraction of them. On an image of V visual tokens it resolves to
    `max(1, round(fraction * V))`, with Python's `round` (an exact half goes to the even count: 0.5 of 5 -> 2, 0.5 of 7
    -> 4). A published count c of LLaVA-1.5's 576 tokens is written `c / 576` (`published_fraction`), which resolves to
    exactly c on 576 tokens and to the same share of any other image.
bools are not budgets (True is not a count), nor is 1.0 (a float meaning "all" and the int 1 meaning "one token"
would read alike: all tokens is the count V). A count larger than the image is refused when it is resolved.

Settings validate with `check_budget` in `__post_init__` and resolve with `budget_count` (or, for a method that
reads the share itself, `budget_fraction`) once the image is known; both fail naming the field.
"""

from __future__ import annotations

import argparse
import math
from numbers import Integral, Real

from rcpp_hf.engine.pruning import REFERENCE_VISUAL_TOKENS


def budget_rule(minimum: int = 1) -> str:
    """The rule in words, for messages and help."""
    return f"an integer >= {minimum} (visual tokens of the model's image) or a fraction in (0, 1) of them"


def published_fraction(count: int, reference: int = REFERENCE_VISUAL_TOKENS) -> float:
    """A count published for LLaVA-1.5's 576 visual tokens as the budget fraction that means the same share on every
    image, e.g. 128 -> 0.2222222222222222 (`resolve_budget` gives back 128 on 576 tokens)."""
    return count / reference


def is_fraction(value) -> bool:
    """Whether a valid budget is a fraction (else a count): any real that is not integral (numpy's floats too)."""
    return isinstance(value, Real) and not isinstance(value, Integral)


def comparable(first, second) -> bool:
    """Whether two budgets compare before the image is known (both counts, or both fractions: resolution keeps their
    order). Settings whose budgets must be ordered check comparable ones in `__post_init__`, the others once
    resolved."""
    return is_fraction(first) == is_fraction(second)


def budget_problem(value, minimum: int = 1) -> str | None:
    """Why `value` is not a budget, or None. `minimum` is the smallest count allowed (0 for a setting where none is a
    meaningful choice, e.g. VisionZip's contextual tokens)."""
    if isinstance(value, bool):
        return "is a bool"
    if isinstance(value, Integral):
        return None if value >= minimum else f"is an integer below {minimum}"
    if isinstance(value, Real):
        return None if 0.0 < value < 1.0 else "is a fraction outside (0, 1)"
    return "is not a number"


def check_budget(method, field: str, optional: bool = False, minimum: int = 1) -> None:
    """Validate `method.<field>` (None allowed when `optional`); fails naming the field. Integral values are stored
    as int and other reals as float, so that YAML and numpy values read as the rule's two kinds."""
    value = getattr(method, field)
    if value is None and optional:
        return
    problem = budget_problem(value, minimum)
    if problem is not None:
        method.fail(field, f"must be {'None or ' if optional else ''}{budget_rule(minimum)}; it {problem}")
    setattr(method, field, int(value) if isinstance(value, Integral) else float(value))


def share_count(share: float, num_visual: int) -> int:
    """A share of the image in (0, 1] as a count of `num_visual` tokens: max(1, round(share * V)) (also the count of a
    share that is not a setting, e.g. the GAN pruner's trained keep ratios)."""
    return max(1, round(share * num_visual))


def resolve_budget(value: int | float, num_visual: int) -> int:
    """A budget -> a count of `num_visual` visual tokens: a count as it is, a fraction as max(1, round(f * V)).
    Raises ValueError for a value outside the rule or a count larger than the image."""
    problem = budget_problem(value, minimum=0)
    if problem is not None:
        raise ValueError(f"must be {budget_rule()}; it {problem}")
    if is_fraction(value):
        return share_count(value, num_visual)
    if value > num_visual:
        raise ValueError(f"is larger than the image's {num_visual} visual tokens")
    return int(value)


def budget_count(method, field: str, num_visual: int, value=None) -> int:
    """`method.<field>` (or `value`, a budget of that field, e.g. one element of a list) resolved on an image of
    `num_visual` visual tokens; fails naming the field."""
    try:
        return resolve_budget(getattr(method, field) if value is None else value, num_visual)
    except ValueError as error:
        method.fail(field, str(error))


def budget_fraction(method, field: str, num_visual: int) -> float:
    """`method.<field>` as a share of the image, in (0, 1]: a fraction as it is, a count c as c / V (for methods whose
    setting is a share, e.g. SparseVLM's interpolated keep lists); fails naming the field."""
    value = getattr(method, field)
    return value if is_fraction(value) else budget_count(method, field, num_visual) / num_visual


def describe_budget(value: int | float, num_visual: int) -> str:
    """E.g. "0.1111 (11 of 100 visual tokens)" or "22 (of 100 visual tokens)", for messages."""
    if is_fraction(value):
        return f"{budget_label(value)} ({resolve_budget(value, num_visual)} of {num_visual} visual tokens)"
    return f"{value} (of {num_visual} visual tokens)"


def budget_label(value: int | float) -> str:
    """The budget as rows and folders are labelled: a count as it is ("22"), a fraction to 4 significant digits
    ("0.2222"), so that a label reads back as a budget that resolves alike on images of up to a few thousand
    tokens."""
    return f"{value:.4g}" if is_fraction(value) else str(value)


def unreachable(value: int | float, num_visual: int, first_layer: int, num_layers: int, lowest: int) -> str:
    """The refusal of a budget averaged over layers (FastV's, PDrop's) that the unpruned layers before the first stage
    already exceed: what it resolved to, why, and the reachable counts `lowest..num_visual`."""
    return (f"budget {describe_budget(value, num_visual)} is unreachable: pruning before layer {first_layer} of "
            f"{num_layers} averages at least {first_layer * num_visual / num_layers:g}; reachable: "
            f"{lowest}..{num_visual}")  # fmt: skip


def lowest_average(num_visual: int, first_layer: int, num_layers: int, least_kept: int = 1) -> int:
    """The smallest whole average of visual tokens per layer when the `first_layer` layers before the first stage
    hold all `num_visual` and every later layer at least `least_kept`."""
    return math.ceil((first_layer * num_visual + (num_layers - first_layer) * least_kept) / num_layers)


def budget_argument(text: str) -> int | float:
    """A budget read from the command line (argparse `type` of every budget flag): an integer is a count, anything
    else a fraction in (0, 1)."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {budget_rule()}") from None
    problem = budget_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text!r}: must be {budget_rule()}; it {problem}")
    return value
