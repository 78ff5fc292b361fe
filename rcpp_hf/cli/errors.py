"""How the command line reports a user's mistake: one line on stderr, `rcpp-hf <command>: error: <message>`, exit
status 2 (argparse's own status for a bad command line), and no traceback unless `--debug` or RCPP_HF_DEBUG=1.

Only the exceptions that mean "the input is wrong" are reported this way; any other exception is a bug and keeps its
traceback. So is a file the hub could not give (transformers' OSError over huggingface_hub's error: an id that does
not exist, no network, offline mode without a cached copy), wherever it is fetched: `--model`'s hub id is checked
before anything loads (`options.check_hub_model`), and a later fetch that fails (e.g. the weights) still ends in one
line (`hub_error`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import httpx  # huggingface_hub's HTTP client, as transformers imports it

EXIT_USAGE = 2  # what argparse exits with, so that every refused command line exits alike


class UsageError(ValueError):
    """A mistake in what the user asked for, found by the command line itself (a ValueError, so that library callers
    that catch ValueError catch it too)."""


# ValueError: the library's refusals of a value (a config field, a method name, a file's contents);
# FileNotFoundError: a named file or folder that is not there.
USER_ERRORS = (ValueError, FileNotFoundError)

# The sub-command levels' argparse dests, outermost first: "eval pope", "shapesworld compare", "gan-pruner train".
COMMAND_DESTS = ("command", "benchmark", "shapesworld_command", "gan_pruner_command")

# What huggingface_hub raises when the hub cannot give a file; transformers wraps them in an OSError.
HUB_ERRORS = (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, httpx.HTTPError)


def hub_fix() -> str:
    """What to do when the hub cannot give a model: the advice of every hub error's line."""
    return ("check the id and the network, pass a local checkpoint folder, or set HF_HUB_OFFLINE=1 to use a copy "
            "already in the local hub cache")


def hub_error(error: BaseException) -> bool:
    """Whether `error` is a file the hub could not give: a huggingface_hub error, or an error raised from one."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, HUB_ERRORS):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def debug_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("RCPP_HF_DEBUG", "").lower() in ("1", "true", "yes")


def command_name(args: argparse.Namespace, prog: str = "rcpp-hf") -> str:
    return " ".join([prog, *(getattr(args, dest) for dest in COMMAND_DESTS if getattr(args, dest, None))])


def one_line(error: BaseException) -> str:
    """The error's message on one line: its first line (transformers' and the library's long messages put the
    point first)."""
    if isinstance(error, FileNotFoundError) and error.filename is not None and error.strerror:
        return f"{error.strerror}: {error.filename}"  # open()'s "[Errno 2] ..." without the errno
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace,
                prog: str = "rcpp-hf") -> int:  # fmt: skip
    """`func(args)`'s exit status, or 2 after printing a user error's one line."""
    try:
        return int(func(args) or 0)
    except USER_ERRORS as error:
        if debug_requested(args):
            raise
        print(f"{command_name(args, prog)}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        if debug_requested(args) or not hub_error(error):
            raise
        print(f"{command_name(args, prog)}: error: could not be loaded from the hub or a local folder: "
              f"{one_line(error)}; {hub_fix()}", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE


def run_script(main: Callable[[], int | None], prog: str) -> int:
    """A script's `main()` (it parses sys.argv itself) with its user errors reported as a command's are, under
    `prog` (e.g. "python experiments/head_ablation.py"); RCPP_HF_DEBUG=1 shows the traceback."""
    return run_command(lambda args: main(), argparse.Namespace(), prog)
