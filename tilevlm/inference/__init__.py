"""Inference: load a model directory, store its weights for speed, sample, generate."""
