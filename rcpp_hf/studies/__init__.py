"""Studies on the ShapesWorld testbed that `rcpp-hf shapesworld` runs (sweep, head-ablation, condensation): each a
grid of `shapesworld.compare` rows and the tables and plots of its question. Scripts that no command runs live in the
repository's `experiments/`."""
