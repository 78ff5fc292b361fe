"""`python -m rcpp_hf.cli ...`: the `rcpp-hf` command, for launchers that run a module (accelerate, torchrun)."""

import sys

from rcpp_hf.cli import main

sys.exit(main())
