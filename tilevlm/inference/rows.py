"""Rows that decode together but join and leave on their own: the batched decode under
continuous batching (`tilevlm serve`'s engine), with no notion of requests or threads.

One KV cache of `max_rows` rows x `max_len` slots is allocated once. A row's prompt is prefilled
straight into its row (vision tiles included), starting at slot 0, so each row has its own
length: a decode step writes every row's new token at that row's own length (the model's
per-row `cache_position` [B, 1]) and attends over the slots in use only (a `KVCache.window`
of the first `count` rows and a power-of-two bucket of slots, as `generate` buckets its cache).
The rows in use are always 0 .. count-1: when a row leaves, the last row moves into its place
(one copy of that row's filled slots), so a step runs on exactly the rows that decode.

    rows = DecodeRows(model, max_rows=8, max_len=2048)
    row, logits = rows.add(input_ids, pixel_values)   # [1, T] prompt -> its row, logits [V]
    logits = rows.step(tokens)                        # tokens [count] -> logits [count, V]
    moved = rows.remove(row)                          # the row that now sits at `row`, or None

A row's answer is the one `generate` gives that prompt alone (tests/test_serve_engine.py):
the same prefill, positions and masks; only the batch around it changes.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from tilevlm.inference.generation import cache_length, decode_step
from tilevlm.model.language import KVCache


class DecodeRows:
    """A model's rows of a continuously batched decode (see the module docstring)."""

    def __init__(self, model: Any, max_rows: int, max_len: int,
                 step_fn: Callable[..., torch.Tensor] | None = None) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        limit = model.cfg.lm_max_position_embeddings
        if not 1 <= max_len <= limit:
            raise ValueError(f"max_len must be in [1, {limit}] (the model's positions), "
                             f"got {max_len}")
        self.model = model
        self.max_rows, self.max_len = max_rows, max_len
        self.step_fn = step_fn or decode_step
        ref = model.decoder.token_embedding.weight  # the dtype and device `generate` uses
        self.device = ref.device
        self.caches = [KVCache(max_rows, b.attn.n_kv_heads, max_len, b.attn.head_dim, ref.dtype,
                               ref.device) for b in model.decoder.blocks]
        self.lengths: list[int] = []  # filled slots of rows 0 .. count-1
        self._windows: dict[tuple[int, int, int], list[KVCache]] = {}

    @property
    def count(self) -> int:
        return len(self.lengths)

    def free(self) -> int:
        return self.max_rows - self.count

    def add(self, input_ids: torch.Tensor, pixel_values: Any = None) -> tuple[int, torch.Tensor]:
        """Prefill a [1, T] prompt (no padding) into the next row -> (row, last logits [V])."""
        if self.count == self.max_rows:
            raise ValueError(f"all {self.max_rows} rows are in use")
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            raise ValueError(f"a row's prompt must be [1, T] with T > 0, "
                             f"got {list(input_ids.shape)}")
        t = input_ids.shape[1]
        if t >= self.max_len:
            raise ValueError(f"a prompt of {t} tokens leaves no slot to decode into "
                             f"(max_len {self.max_len})")
        row = self.count
        input_ids = input_ids.to(self.device)
        decoder = self.model.decoder
        self._attach(row, 1, cache_length(t, self.max_len))
        try:
            embeds = self.model.embed_inputs(input_ids, pixel_values)  # (1, T, D)
            hidden = decoder(embeds, cache_position=torch.arange(t, device=self.device))
            logits = decoder.logits(hidden[:, -1])[0]  # (V,)
        finally:
            decoder.clear_cache()
        self.lengths.append(t)
        return row, logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each row's next token [count] at its own length -> logits [count, V]."""
        n = self.count
        if n == 0 or tokens.shape != (n,):
            raise ValueError(f"one token per row in use ({n}), got {list(tokens.shape)}")
        if max(self.lengths) >= self.max_len:
            raise ValueError(f"a row is full: its {self.max_len} slots are in use")
        positions = torch.tensor(self.lengths, device=self.device)  # (n,) each row's slot
        self._attach(0, n, cache_length(max(self.lengths) + 1, self.max_len))
        try:
            logits = self.step_fn(self.model, tokens.to(self.device), positions,
                                  positions.unsqueeze(1), None)  # (n, V)
        finally:
            self.model.decoder.clear_cache()
        self.lengths = [length + 1 for length in self.lengths]
        return logits

    def remove(self, row: int) -> int | None:
        """Free `row`; the last row moves into it. Returns the row that moved (its old index),
        or None when `row` was the last."""
        if not 0 <= row < self.count:
            raise ValueError(f"row {row} is not in use ({self.count} rows are)")
        last = self.count - 1
        if row == last:
            self.lengths.pop()
            return None
        filled = self.lengths[last]
        for cache in self.caches:  # one row's filled slots, in every block
            cache.k[row, :, :filled].copy_(cache.k[last, :, :filled])
            cache.v[row, :, :filled].copy_(cache.v[last, :, :filled])
        self.lengths[row] = self.lengths.pop()
        return last

    def clear(self) -> None:
        """Free every row (their slots are written again before they are read)."""
        self.lengths = []

    def _attach(self, first_row: int, rows: int, slots: int) -> None:
        """Give every decoder block its window of the cache (kept: the same views each time)."""
        key = (first_row, rows, slots)
        windows = self._windows.get(key)
        if windows is None:
            windows = self._windows[key] = [c.window(first_row, rows, slots) for c in self.caches]
        decoder = self.model.decoder
        for block, window in zip(decoder.blocks, windows):
            block.attn.kv_cache = window
        decoder.cache_max_len = slots
