"""Helpers shared by several test files (tests never import each other's modules)."""

import torch
from torch import nn

from tilevlm.inference.generation import decode_step


def decode_step_graph_breaks(model: nn.Module, batch_size: int = 1, max_len: int = 16) -> int:
    """How many graph breaks `torch._dynamo.explain` finds in one decode step of `model`."""
    device = next(model.parameters()).device
    model.decoder.setup_cache(batch_size, max_len)
    try:
        tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        positions = torch.full((batch_size,), 3, dtype=torch.long, device=device)
        mask = torch.ones(batch_size, max_len, dtype=torch.long, device=device)
        cache_position = torch.tensor([3], device=device)
        with torch.inference_mode():
            explanation = torch._dynamo.explain(decode_step)(model, tokens, positions,
                                                             cache_position, mask)
    finally:
        model.decoder.clear_cache()
    return explanation.graph_break_count
