"""Modality projector: pixel shuffle (fewer, wider tokens) then one bias-free Linear to Dlm."""

from __future__ import annotations

import math

import torch
from torch import nn

from tilevlm.config import VLMConfig


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[N, S*S, D] -> [N, (S/f)^2, D*f*f]: each f x f neighbourhood of patches becomes one token.

    The input is a row-major S x S grid of patches. Output token (i, j), taken row-major over the
    (S/f) x (S/f) grid, holds the patches (i*f + a, j*f + b) for a, b in [0, f), concatenated with
    `a` outer and `b` inner: channel `(a*f + b)*D + d` is feature d of patch (i*f + a, j*f + b).
    This is nanoVLM's order (view [N, S/f, f, S/f, f, D], permute (0, 1, 3, 2, 4, 5)), so its
    projector weights apply unchanged.
    """
    n, seq, dim = x.shape
    side = math.isqrt(seq)
    if side * side != seq:
        raise ValueError(f"pixel_shuffle needs a square number of patches, got {seq}")
    if side % factor != 0:
        raise ValueError(f"pixel_shuffle factor {factor} must divide the patches per side ({side})")
    out = side // factor
    x = x.reshape(n, out, factor, out, factor, dim)  # (N, i, a, j, b, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, i, j, a, b, D)
    return x.reshape(n, out * out, dim * factor * factor)  # (N, (S/f)^2, D*f*f)


class ModalityProjector(nn.Module):
    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.factor = cfg.mp_pixel_shuffle_factor
        in_dim = cfg.vit_hidden_dim * self.factor**2
        self.proj = nn.Linear(in_dim, cfg.lm_hidden_dim, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, S*S, Dv] patch features -> [N, (S/f)^2, Dlm] language embeddings."""
        return self.proj(pixel_shuffle(x, self.factor))  # (N, (S/f)^2, Dlm)
