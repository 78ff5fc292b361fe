"""How the command line reports a user's mistake: one line on stderr, `rcpp-hf <command>: error: <message>`, exit
status 2 (argparse's own status for a bad command line), and no traceback unless `--debug` or RCPP_HF_DEBUG=1.

Only the exceptions that mean "the input is wrong" are reported this way; any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

EXIT_USAGE = 2  # what argparse exits with, so that every refused command line exits alike


class UsageError(ValueError):
    """A mistake in what the user asked for, found by the command line itself (a ValueError, so that library callers
    that catch ValueError catch it too)."""


# ValueError: the library's refusals of a value (a config field, a method name, a file's contents);
# FileNotFoundError: a named file or folder that is not there.
USER_ERRORS = (ValueError, FileNotFoundError)

# The sub-command levels' argparse dests, outermost first: "eval pope", "shapesworld compare", "gan-pruner train".
COMMAND_DESTS = ("command", "benchmark", "shapesworld_command", "gan_pruner_command")


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
