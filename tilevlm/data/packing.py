"""Sequence packing: several short samples in one row, attention kept inside each sample.

    samples = LengthFilter(open_dataset(path), processor)        # n_tokens, n_tiles from headers
    collate = PackedCollator(processor, skips=skips)
    for plan in group_packs(pack_samples(samples, 2048, 64, 64, skips), rows=4, max_tiles=64):
        batch = collate(plan)                                     # a TrainBatch
    # (what `data.stream.TrainStream` does, block by block, when training with --pack)

1. `pack_samples`: best-fit over a window of open rows, using the token and tile counts known
   before pixels are decoded: each sample goes into the open row with the least room that still
   holds it; a row is closed when full, or (the fullest one) when the window overflows.
2. `group_packs`: rows into micro-batches of at most `rows` rows and `max_tiles` tiles, so the
   vision encoder, which sees every tile of a micro-batch at once, has bounded memory.
3. `PackedCollator`: decodes the images and tokenizes, concatenates each row's samples, and
   returns (a `TrainBatch`) `position_ids` that restart at 0 for every sample, `segment_ids`
   (1, 2, ... per sample, 0 for padding) and `attention_mask`, the 4-D document mask (causal
   within a sample).

The label of each sample's first token is always ignored, so no sample learns to predict the
next one's start; with that, a packed row's per-sample losses equal the samples run alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F

from tilevlm.data.batch import TrainBatch
from tilevlm.data.sample import Sample
from tilevlm.data.skips import IMAGE_ERROR, TOO_LONG, TOO_MANY_TILES, SkipCounter, SkipSample
from tilevlm.preprocessing.image import load_image
from tilevlm.config import IGNORE_INDEX

log = logging.getLogger(__name__)

Pack = list[Sample]  # the samples of one packed row
INVALID = "invalid"  # the processor refused a sample the reader accepted


# ----------------------------------------------------------------------------- masks
def document_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] segment ids (0 = padding) -> bool [B, 1, T, T], True where query t may attend to
    key s: same segment and s <= t. A padding query sees only itself (no empty softmax row)."""
    t = segment_ids.shape[1]
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)  # (B, T, T)
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()  # (T, T)
    real_key = (segment_ids != 0).unsqueeze(1)  # (B, 1, T)
    own = torch.eye(t, dtype=torch.bool, device=segment_ids.device)  # (T, T)
    return ((same & causal & real_key) | own).unsqueeze(1)  # (B, 1, T, T)


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] segment ids -> [B, T] positions restarting at 0 at each segment (pads: 0)."""
    t = segment_ids.shape[1]
    idx = torch.arange(t, device=segment_ids.device).expand_as(segment_ids)  # (B, T)
    starts = F.pad(segment_ids[:, 1:] != segment_ids[:, :-1], (1, 0), value=True)  # (B, T)
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T)
    return torch.where(segment_ids != 0, idx - start_idx, torch.zeros_like(idx))


# ----------------------------------------------------------------------------- planning
def pack_samples(samples: Iterable[Sample], max_tokens: int, max_tiles: int, window: int = 64,
                 skips: SkipCounter | None = None) -> Iterator[Pack]:
    """Best-fit packing of measured samples (`n_tokens`, `n_tiles`) into rows of at most
    `max_tokens` tokens and `max_tiles` tiles, with at most `window` rows open at once.

    Deterministic for a given input order. A sample that cannot fit even an empty row is
    counted in `skips` (too_long / too_many_tiles) and dropped.
    """
    skips = skips if skips is not None else SkipCounter()
    open_rows: list[_Row] = []
    for sample in samples:
        reason = _misfit(sample, max_tokens, max_tiles)
        if reason:
            skips.add(reason, sample.get("source", ""), f"{sample['n_tokens']} tokens, "
                      f"{sample['n_tiles']} tiles; a row holds {max_tokens} and {max_tiles}")
            continue
        row = _best_fit(open_rows, sample, max_tokens, max_tiles)
        if row is None:
            row = _Row()
            open_rows.append(row)
        row.add(sample)
        # A full token budget closes a row; a full tile budget does not (text-only samples fit).
        if row.tokens == max_tokens:
            open_rows.remove(row)
            yield row.samples
        elif len(open_rows) > window:
            fullest = max(open_rows, key=lambda r: r.tokens)  # first of equals: the oldest
            open_rows.remove(fullest)
            yield fullest.samples
    yield from (row.samples for row in open_rows)


@dataclass(eq=False)  # rows are compared by identity (list.remove), never by content
class _Row:
    tokens: int = 0
    tiles: int = 0
    samples: Pack = field(default_factory=list)

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)
        self.tokens += sample["n_tokens"]
        self.tiles += sample["n_tiles"]


def _misfit(sample: Sample, max_tokens: int, max_tiles: int) -> str | None:
    if sample["n_tokens"] > max_tokens:
        return TOO_LONG
    return TOO_MANY_TILES if sample["n_tiles"] > max_tiles else None


def _best_fit(rows: list[_Row], sample: Sample, max_tokens: int, max_tiles: int) -> _Row | None:
    """The open row with the least token room left that still holds the sample, or None."""
    fits = [r for r in rows if r.tokens + sample["n_tokens"] <= max_tokens
            and r.tiles + sample["n_tiles"] <= max_tiles]
    return min(fits, key=lambda r: max_tokens - r.tokens, default=None)


def group_packs(packs: Iterable[Pack], rows: int, max_tiles: int) -> Iterator[list[Pack]]:
    """Consecutive packed rows into micro-batches of at most `rows` rows and `max_tiles` tiles."""
    group: list[Pack] = []
    tiles = 0
    for pack in packs:
        n = sum(s["n_tiles"] for s in pack)
        if group and (len(group) == rows or tiles + n > max_tiles):
            yield group
            group, tiles = [], 0
        group.append(pack)
        tiles += n
    if group:
        yield group


# ----------------------------------------------------------------------------- collation
class PackedCollator:
    """Micro-batch plan (a list of packed rows) -> `TrainBatch`. Images are decoded here; a
    sample whose image fails, or that the processor refuses, is dropped and counted.

    inputs: input_ids, labels, position_ids [B, T]; attention_mask bool [B, 1, T, T] (the
    document mask); pixel_values [N, 3, S, S] (row-major, sample order) unless no image.
    info: segment_ids [B, T], n_tiles (per row), sources (per row, the samples' `source`).
    `skipped`: reason -> count, since the previous batch (`empty` when no sample is left).
    `pad_to`: a fixed T (static shapes); default the longest row.
    """

    def __init__(self, processor: Any, pad_to: int | None = None,
                 skips: SkipCounter | None = None) -> None:
        self.processor = processor
        self.pad_to = pad_to
        self.skips = skips if skips is not None else SkipCounter()
        self._warned_length = False

    def __call__(self, packs: list[Pack]) -> TrainBatch:
        rows = [[(s.get("source", ""), out) for s in pack
                 if (out := self._process(s)) is not None] for pack in packs]
        rows = [r for r in rows if r]
        skipped = self.skips.drain()
        if not rows:
            return TrainBatch(skipped=skipped)
        batch = self._assemble([[out for _, out in row] for row in rows])
        batch.info["sources"] = [[where for where, _ in row] for row in rows]
        batch.skipped = skipped
        return batch

    def _process(self, sample: Sample) -> dict[str, Any] | None:
        """The processor's batch of this one sample; None (counted) when it cannot be made."""
        where = sample.get("source", "")
        max_pixels = self.processor.config.max_image_pixels
        try:
            images = [_load(img, max_pixels) for img in sample["images"]]
            out = self.processor([sample["messages"]], [images])
        except SkipSample as e:
            self.skips.skip(e, where)
            return None
        except ValueError as e:  # e.g. too long after all, or `<|image|>` written in the text
            self.skips.add(INVALID, where, str(e))
            return None
        self._check_length(sample, out["input_ids"].shape[1], where)
        return out

    def _check_length(self, sample: Sample, n: int, where: str) -> None:
        """The plan used the pre-pixel count; a mismatch means rows may exceed their budget."""
        expected = sample.get("n_tokens")
        if expected is not None and expected != n and not self._warned_length:
            self._warned_length = True
            log.warning("%s: %d tokens after processing, %d measured before; packed rows may "
                        "exceed their budget", where, n, expected)

    def _assemble(self, rows: list[list[dict[str, Any]]]) -> TrainBatch:
        lengths = [sum(s["input_ids"].shape[1] for s in row) for row in rows]
        t = max(max(lengths), self.pad_to or 0)
        b = len(rows)
        input_ids = torch.full((b, t), self.processor.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
        segment_ids = torch.zeros((b, t), dtype=torch.long)
        tiles: list[torch.Tensor] = []
        for r, row in enumerate(rows):
            start = 0
            for k, s in enumerate(row, start=1):
                n = s["input_ids"].shape[1]
                input_ids[r, start:start + n] = s["input_ids"][0]
                labels[r, start:start + n] = s["labels"][0]
                labels[r, start] = IGNORE_INDEX  # never predict a sample from the one before
                segment_ids[r, start:start + n] = k
                if s["pixel_values"] is not None:
                    tiles.append(s["pixel_values"])
                start += n
        tensors = {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids,
                   "position_ids": segment_positions(segment_ids),
                   "attention_mask": document_attention_mask(segment_ids),
                   "pixel_values": torch.cat(tiles) if tiles else None,  # (N, 3, S, S)
                   "n_tiles": [sum(s["n_tiles"][0] for s in row) for row in rows]}
        return TrainBatch.of(tensors, n_samples=sum(len(row) for row in rows),
                             n_real_tokens=sum(lengths))


def _load(source: Any, max_pixels: int) -> Any:
    try:
        return load_image(source, max_pixels=max_pixels)
    except ValueError as e:  # ImageLoadError: corrupt, truncated, missing, too large
        raise SkipSample(IMAGE_ERROR, str(e)) from None
