"""What every refused command line must look like: `main` returns 2 and stderr is one line, `rcpp-hf <command>:
error: ...`, with no traceback."""

import re

from rcpp_hf.cli import main


def user_error(capsys, argv: list[str], pattern: str) -> str:
    """Run `rcpp-hf argv` in this process; assert it is refused as a user error whose message matches `pattern`
    (re.search); returns the stderr line."""
    capsys.readouterr()  # drop what earlier calls of this test printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rcpp-hf ") and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]
