"""Preprocessing: image files -> tiles (and the tiles as a figure), text -> tokens (with the chat
template), both -> a batch."""
