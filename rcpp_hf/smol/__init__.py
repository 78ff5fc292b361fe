"""A ShapesWorld LLaVA on a real pretrained language model (SmolLM2-135M-Instruct), rebuilt from a small delta."""
