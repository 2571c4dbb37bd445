"""VisionLanguageModel: tiles -> SigLIP -> pixel-shuffle projector -> scattered into the text
embeddings at the image-token positions -> Llama decoder -> logits / loss.

Special token ids come from the config (no tokenizer needed; the order is
`tilevlm.special_tokens`).

The contract: the input_ids hold exactly `n_tiles * cfg.mp_image_token_length` image tokens, and
the tiles come in the order of their placeholders (sample by sample, in text order); tile k fills
placeholders k*L ... (k+1)*L - 1 of the batch read row-major.

What generation (not part of this module) uses:
    embeds = model.embed_inputs(input_ids, pixel_values)          # [B, T, D], images merged in
    model.decoder.setup_cache(batch_size, max_len)                # static KV cache, see language.py
    hidden = model.decoder(embeds, attention_mask=mask, cache_position=torch.arange(T))
    logits = model.decoder.logits(hidden[:, -1:])                 # [B, 1, V]
    next_embeds = model.decoder.embed(next_ids)                   # [B, 1, D], then decode steps
    model.decoder.clear_cache()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from tilevlm.config import IGNORE_INDEX, VLMConfig
from tilevlm.model.language import LanguageModel
from tilevlm.model.projector import ModalityProjector
from tilevlm.model.vision import VisionEncoder

# One tensor [N, 3, T, T], a list of per-image tensors ([3, T, T] or [n, 3, T, T]), or a list of
# per-sample lists of those.
PixelValues = Union[torch.Tensor, Sequence[Any], None]


@dataclass
class VLMOutput:
    logits: torch.Tensor | None  # [B, T, V]; None with return_logits=False
    loss: torch.Tensor | None = None  # scalar mean cross-entropy over labels != -100


def flatten_tiles(pixel_values: PixelValues) -> torch.Tensor | None:
    """Any accepted pixel_values form -> one [N, 3, T, T] tensor (None when there are no tiles)."""
    if pixel_values is None:
        return None
    if isinstance(pixel_values, torch.Tensor):
        return pixel_values.unsqueeze(0) if pixel_values.dim() == 3 else pixel_values
    parts = [t for t in (flatten_tiles(p) for p in pixel_values) if t is not None and len(t)]
    return torch.cat(parts, dim=0) if parts else None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy where logits[:, t] predicts labels[:, t + 1] (labels aligned with
    input_ids, -100 = ignored); 0 when no label counts."""
    pred = logits[:, :-1].float().flatten(0, 1)  # (B*(T-1), V)
    target = labels[:, 1:].flatten()  # (B*(T-1),)
    total = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp(min=1)


def labelled_loss(decoder: LanguageModel, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`causal_lm_loss` with the LM head applied only at positions whose next label counts."""
    target = labels[:, 1:]  # (B, T-1)
    keep = target != IGNORE_INDEX  # (B, T-1)
    logits = decoder.logits(hidden[:, :-1][keep])  # (n, V)
    total = F.cross_entropy(logits.float(), target[keep], reduction="sum")
    return total / keep.sum().clamp(min=1)


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: VLMConfig, vision_chunk_size: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_chunk_size = vision_chunk_size
        self.vision_encoder = VisionEncoder(cfg)
        self.projector = ModalityProjector(cfg)
        self.decoder = LanguageModel(cfg)
        self.image_token_id = cfg.image_token_id
        self.global_image_token_id = cfg.global_image_token_id

    def grid_token_id(self, row: int, col: int) -> int:
        """Token id of grid cell r{row}c{col} (both 1-based)."""
        return self.cfg.grid_token_id(row, col)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def encode_images(self, tiles: torch.Tensor) -> torch.Tensor:
        """[N, 3, T, T] tiles -> [N, mp_image_token_length, D]; vision in chunks of at most
        `vision_chunk_size` tiles (same result, less peak memory)."""
        chunk = self.vision_chunk_size or tiles.shape[0]
        feats = [self.vision_encoder(c) for c in tiles.split(chunk)]  # each (n, S*S, Dv)
        feats = feats[0] if len(feats) == 1 else torch.cat(feats, dim=0)  # (N, S*S, Dv)
        return self.projector(feats)  # (N, L, D)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: PixelValues = None) -> torch.Tensor:
        """Token embeddings [B, T, D] with the projected tiles in the image-token positions."""
        embeds = self.decoder.embed(input_ids)  # (B, T, D)
        is_image = input_ids == self.image_token_id  # (B, T)
        tiles = flatten_tiles(pixel_values)
        n_tiles = 0 if tiles is None else tiles.shape[0]
        self._check_placeholders(int(is_image.sum()), n_tiles)
        if n_tiles == 0:
            return embeds
        images = self.encode_images(tiles.to(embeds.device)).to(embeds.dtype)  # (N, L, D)
        return embeds.masked_scatter(is_image.unsqueeze(-1), images)  # (B, T, D)

    def _check_placeholders(self, n_placeholders: int, n_tiles: int) -> None:
        per_tile = self.cfg.mp_image_token_length
        if n_placeholders != n_tiles * per_tile:
            raise ValueError(
                f"image tokens do not match the tiles: input_ids hold {n_placeholders} image-token "
                f"placeholders but pixel_values hold {n_tiles} tiles x {per_tile} tokens per tile "
                f"= {n_tiles * per_tile}")

    def forward(self, input_ids: torch.Tensor, pixel_values: PixelValues = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                return_logits: bool = True) -> VLMOutput:
        """input_ids [B, T] (+ tiles, mask [B, T], labels [B, T]) -> logits [B, T, V] and loss.

        `labels` are aligned with `input_ids` (-100 where no loss); the loss is shifted inside:
        logits[:, t] predicts labels[:, t + 1]. `attention_mask` may also be a boolean
        [B, 1, T, T] mask (packed rows: `tilevlm.data.packing.document_attention_mask`), passed
        to the decoder as is, with `position_ids` restarting at 0 for each packed sample.
        `return_logits=False` (training, with labels): the LM head runs only where a label counts
        and `logits` is None; the same loss for a fraction of the head's work."""
        embeds = self.embed_inputs(input_ids, pixel_values)  # (B, T, D)
        hidden = self.decoder(embeds, attention_mask=attention_mask, position_ids=position_ids)
        if labels is not None and not return_logits:
            return VLMOutput(logits=None, loss=labelled_loss(self.decoder, hidden, labels))
        logits = self.decoder.logits(hidden)  # (B, T, V)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return VLMOutput(logits=logits, loss=loss)
