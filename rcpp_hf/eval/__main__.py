import sys

from rcpp_hf.cli.eval import main

sys.exit(main())
