"""RCPP + DRCD, stage by stage: each file holds the pure functions of one part of the method."""
