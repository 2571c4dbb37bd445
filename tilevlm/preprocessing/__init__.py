"""Preprocessing: image files -> tiles, text -> tokens (with the chat template), both -> a batch."""
