"""SigLIP vision transformer: tiles [N, 3, T, T] -> patch features [N, (T/P)^2, Dv].

Pre-norm blocks (LayerNorm, multi-head attention through SDPA with a fused qkv Linear, GELU-tanh
MLP), learned position embeddings, a final LayerNorm, no CLS token: the same computation as
Hugging Face's `SiglipVisionModel(...).last_hidden_state` (the pooling head is not part of it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tilevlm.config import VLMConfig


class VisionAttention(nn.Module):
    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.n_heads = cfg.vit_n_heads
        self.head_dim = cfg.vit_hidden_dim // cfg.vit_n_heads
        self.qkv = nn.Linear(cfg.vit_hidden_dim, 3 * cfg.vit_hidden_dim)  # rows: q, k, v
        self.proj = nn.Linear(cfg.vit_hidden_dim, cfg.vit_hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.n_heads, self.head_dim)  # (N, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (N, nh, T, hs)
        y = y.transpose(1, 2).reshape(n, t, d)  # (N, T, Dv)
        return self.proj(y)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.vit_hidden_dim, cfg.vit_inter_dim)
        self.fc2 = nn.Linear(cfg.vit_inter_dim, cfg.vit_hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # (N, T, Dv)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.attn = VisionAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))  # (N, T, Dv)
        return x + self.mlp(self.ln2(x))  # (N, T, Dv)


class VisionEncoder(nn.Module):
    """SigLIP encoder for square tiles of `cfg.vit_img_size` pixels."""

    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.tile_size = cfg.vit_img_size
        self.num_patches = cfg.patches_per_side**2
        dim = cfg.vit_hidden_dim
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=cfg.vit_patch_size,
                                     stride=cfg.vit_patch_size)
        self.pos_embed = nn.Parameter(torch.empty(self.num_patches, dim))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.vit_n_blocks))
        self.norm = nn.LayerNorm(dim, eps=cfg.vit_ln_eps)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.pos_embed, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, T, T] tiles -> [N, (T/P)^2, Dv] patch features (row-major patch order)."""
        expected = (3, self.tile_size, self.tile_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"vision encoder expects tiles of shape [N, 3, {self.tile_size}, "
                             f"{self.tile_size}], got {list(pixel_values.shape)}")
        x = self.patch_embed(pixel_values.to(self.pos_embed.dtype))  # (N, Dv, S, S)
        x = x.flatten(2).transpose(1, 2) + self.pos_embed  # (N, S*S, Dv)
        for block in self.blocks:
            x = block(x)  # (N, S*S, Dv)
        return self.norm(x)  # (N, S*S, Dv)
