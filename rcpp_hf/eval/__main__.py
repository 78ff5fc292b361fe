import sys

from rcpp_hf.eval.cli import main

sys.exit(main())
