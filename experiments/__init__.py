"""The studies behind the library's defaults and the README's measured tables, kept outside the package.

Each file is a script, run from the repository root after `pip install -e .`:

    python experiments/defaults_sweep.py --output-dir runs/sweep        # RCPP + DRCD's defaults, chosen by a rule
    python experiments/head_ablation.py --output-dir runs/heads         # FastV + FinePruner head strategies
    python experiments/condensation.py --output-dir runs/condensation   # hard pruning vs token condensation
    python experiments/mc_lcbf_study.py 12                               # why MC-LCBF changed nothing
    python experiments/mc_lcbf_grid.py OUTPUT_DIR                        # MC-LCBF's results grid
    python experiments/eviction_study.py 40                              # eviction before an object is named
    python experiments/pdrop_positions.py                                # PDrop: original vs renumbered positions
    python experiments/fastv_variants.py                                 # FastV: KV-cache vs re-pruning variant
    python experiments/newline_tokens.py                                 # LLaVA-NeXT newlines: pruned or kept

A script imports only the installed `rcpp_hf` (never a sibling in this folder), so it runs as a plain file; without
the install, `PYTHONPATH=. python experiments/NAME.py ...` from the root does the same. This file makes the folder
a package for the tests (`import experiments.defaults_sweep`, the root being on `sys.path` under
`python -m pytest`); nothing in `rcpp_hf` imports it.
"""
