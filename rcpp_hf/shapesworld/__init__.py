"""ShapesWorld: a synthetic hallucination testbed small enough for a CPU, and the LLaVA trained on it."""
