"""Endless, resumable training batches from a dataset reader, for one rank: shuffled blocks ->
lengths from headers -> (packed) micro-batch plans -> images decoded in DataLoader workers.

    stream = TrainStream(open_reader, processor, StreamOptions(batch_size=4, pack=1024), rank,
                         world_size, start=StreamPosition())
    loader = DataLoader(stream, batch_size=None, num_workers=4)   # each batch: a TrainBatch
                                                                   # with `stream` and `skipped`

The global sample order (`RowReader.blocks`) is blocks of `block_size` rows, each shuffled with
a generator seeded by (seed, epoch, block); stream position j goes to rank `j % world_size`.

Plans, per block (never across a block boundary, so a position is exact and cheap to replay):
- unpacked: each micro-batch is the next `batch_size` of this rank's positions; a position whose
  row was dropped (skipped, counted) just makes the batch smaller. With `block_size` a multiple
  of `batch_size * world_size`, a global micro-batch is the stream positions [k*B*W, (k+1)*B*W)
  and rank r takes positions r, r+W, ... of it, so any number of ranks sees the same data.
- packed: the rank's measured samples of the block are packed (best fit, `pack` tokens and
  `max_tiles` tiles per row) and grouped into micro-batches of up to `batch_size` rows; open rows
  are flushed at the end of the block.

Position = (epoch, block, plans done in that block). Resuming re-plans that block from image
headers (no pixel is decoded) and skips the plans already done. DataLoader workers split the
work by plan: every worker reads and plans the rank's rows (cheap: text and headers), and worker
w decodes plans w, w+n, ...; the DataLoader returns them in order, so the batches do not depend
on the number of workers.

Skipped samples travel with the batches (`TrainBatch.skipped`, by reason): what the reader, the
length check and the packer dropped is reported with a block's first plan (unpacked: with the
plan of its position), what collation dropped with its own plan. A plan with nothing left gives
an `empty` batch so the counts (and the worker order) are kept.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from tilevlm.data.batch import StreamPosition, TrainBatch
from tilevlm.data.lengths import SampleMeter
from tilevlm.data.packing import Pack, PackedCollator, group_packs, pack_samples
from tilevlm.data.readers.rows import RowBlock, RowReader
from tilevlm.data.sample import Sample
from tilevlm.data.skips import TOO_LONG, SkipCounter, SkipSample

log = logging.getLogger(__name__)

Plan = list[Pack]  # the packed rows of one micro-batch (unpacked: one sample per row)
OpenReader = Callable[[int, int], RowReader]  # (rank, world_size) -> this rank's reader


@dataclass(frozen=True)
class StreamOptions:
    batch_size: int  # positions (unpacked) or packed rows per micro-batch
    pack: int = 0  # tokens per packed row; 0: no packing
    max_tiles: int = 64  # tiles per packed row and per packed micro-batch
    block_size: int = 1024  # the shuffle block, in rows
    shuffle: bool = True
    seed: int = 0
    window: int = 64  # open rows of the best-fit packer


@dataclass(frozen=True)
class _Planned:
    after: StreamPosition  # the position once this plan is consumed
    plan: Plan
    skipped: dict[str, int]


class TrainStream(IterableDataset):
    """Endless micro-batches of one rank's share of a dataset (see the module docstring)."""

    def __init__(self, open_reader: OpenReader, processor: Any, options: StreamOptions,
                 rank: int = 0, world_size: int = 1,
                 start: StreamPosition = StreamPosition()) -> None:
        if options.pack and options.pack < 1 or options.batch_size < 1:
            raise ValueError("batch_size and pack must be >= 1 (pack 0: no packing)")
        self.open_reader, self.processor, self.options = open_reader, processor, options
        self.rank, self.world_size, self.start = rank, world_size, start
        self.max_tokens = processor.config.lm_max_length

    def __iter__(self) -> Iterator[TrainBatch]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        collate = PackedCollator(self.processor, skips=SkipCounter())
        pre_skips = SkipCounter(log_first=5 if worker == 0 else 0)  # every worker plans
        for k, planned in enumerate(self._plans(pre_skips)):
            if k % n_workers == worker:
                yield self._batch(planned, collate)

    # ------------------------------------------------------------------ planning
    def _plans(self, skips: SkipCounter) -> Iterator[_Planned]:
        reader = self.open_reader(self.rank, self.world_size)
        meter = SampleMeter(self.processor)
        o, epoch = self.options, self.start.epoch
        while True:
            resuming = epoch == self.start.epoch
            first = self.start.block if resuming else 0
            usable = False
            for block, items in reader.blocks(o.block_size, o.seed, epoch,
                                              start=first * o.block_size, shuffle=o.shuffle):
                done = self.start.plans if resuming and block == self.start.block else 0
                for index, (plan, skipped) in enumerate(self._block_plans(block, items, meter,
                                                                          skips)):
                    usable = usable or bool(plan)
                    if index >= done:
                        yield _Planned(StreamPosition(epoch, block, index + 1), plan, skipped)
            if not usable and not (resuming and self.start != StreamPosition()):
                raise ValueError(f"rank {self.rank}: no usable sample in a whole pass over this "
                                 f"rank's share of the data (skipped: {dict(skips.counts)})")
            log.debug("rank %d: end of epoch %d", self.rank, epoch)
            epoch += 1

    def _positions(self, block: int) -> range:
        """This rank's stream positions in `block`."""
        size = self.options.block_size
        first = block * size + (self.rank - block * size) % self.world_size
        return range(first, (block + 1) * size, self.world_size)

    def _measured(self, items: RowBlock, j: int, meter: SampleMeter,
                  skips: SkipCounter) -> Sample | None:
        """The sample at position j with `n_tokens` / `n_tiles`, or None (a hole, or counted)."""
        item = items.get(j)
        if item is None:
            return None  # past the end of the data (the last block's holes)
        if isinstance(item, SkipSample):
            skips.skip(item, getattr(item, "where", ""))
            return None
        where = item.get("source", "")
        try:
            n_tokens, n_tiles = meter.measure(item)
        except SkipSample as e:
            skips.skip(e, where)
            return None
        if n_tokens > self.max_tokens:
            skips.add(TOO_LONG, where, f"{n_tokens} tokens, more than lm_max_length "
                                       f"{self.max_tokens} (never truncated)")
            return None
        return {**item, "n_tokens": n_tokens, "n_tiles": n_tiles}

    def _block_plans(self, block: int, items: RowBlock, meter: SampleMeter,
                     skips: SkipCounter) -> list[tuple[Plan, dict[str, int]]]:
        positions = self._positions(block)
        o = self.options
        if not o.pack:
            plans = []
            for i in range(0, len(positions), o.batch_size):
                chunk = [self._measured(items, j, meter, skips) for j in
                         positions[i:i + o.batch_size]]
                plans.append(([[s] for s in chunk if s is not None], skips.drain()))
            return plans
        samples = [s for j in positions if (s := self._measured(items, j, meter, skips))]
        packs = pack_samples(samples, o.pack, o.max_tiles, o.window, skips)
        plans = [(plan, {}) for plan in group_packs(packs, o.batch_size, o.max_tiles)]
        if not plans:
            plans = [([], {})]
        plans[0] = (plans[0][0], skips.drain())
        return plans

    # ------------------------------------------------------------------ collation
    def _batch(self, planned: _Planned, collate: PackedCollator) -> TrainBatch:
        batch = collate(planned.plan)  # its `skipped`: what collation dropped
        if not self.options.pack and not batch.empty:
            batch = as_padded_batch(batch)
        skipped = Counter(planned.skipped) + Counter(batch.skipped)
        return replace(batch, skipped=dict(skipped), stream=planned.after)


def as_padded_batch(batch: TrainBatch) -> TrainBatch:
    """A packed batch with one sample per row -> an ordinary right-padded one (2-D attention
    mask, positions derived from it), so attention can use the plain causal path."""
    inputs = {k: v for k, v in batch.inputs.items() if k != "position_ids"}
    inputs["attention_mask"] = (batch.info["segment_ids"] != 0).long()  # (B, T)
    return replace(batch, inputs=inputs)


@dataclass(frozen=True)
class StreamLayout:
    """What a saved stream position means: positions of different layouts do not map 1:1."""

    world_size: int
    batch_size: int
    pack: int
    block_size: int
    shuffle: bool
    seed: int


def resume_position(saved: list[list[int]], old: StreamLayout, new: StreamLayout,
                    rank: int) -> StreamPosition:
    """This rank's start position from the per-rank positions of a checkpoint.

    Same layout: each rank continues exactly where it stopped. Unpacked, same shuffle and all
    ranks at the same plan (always the case when `block_size` is a multiple of the global
    micro-batch): the global offset in the block is kept, exact when it is a multiple of the new
    global micro-batch. Otherwise every rank restarts at the start of the earliest block any rank
    was in: samples of the blocks that ranks had started are seen again."""
    positions = [StreamPosition(*p) for p in saved]
    if not positions:
        return StreamPosition()
    if old == new:
        return positions[rank]
    same_order = (old.block_size, old.shuffle, old.seed) == (new.block_size, new.shuffle,
                                                              new.seed)
    if same_order and not old.pack and not new.pack and len(set(positions)) == 1:
        p = positions[0]
        offset = p.plans * old.batch_size * old.world_size  # global positions done in the block
        step = new.batch_size * new.world_size
        if offset % step:
            log.warning("resuming at block offset %d, not a multiple of the new global "
                        "micro-batch %d: %d samples are seen again", offset, step, offset % step)
        return StreamPosition(p.epoch, p.block, offset // step)
    first = min(positions)
    log.warning("resuming with a different data layout (%s -> %s): every rank restarts at "
                "epoch %d block %d; samples of the blocks that ranks had started are seen again",
                old, new, first.epoch, first.block)
    if not same_order:
        log.warning("the shuffle order changed (block size or seed): the resumed epoch is not "
                    "the one that was interrupted")
    return StreamPosition(first.epoch, first.block, 0)


def stream_loader(stream: TrainStream, num_workers: int, pin_memory: bool,
                  worker_init_fn: Callable[[int], None] | None = None
                  ) -> torch.utils.data.DataLoader:
    """The DataLoader around a stream: batches are made in the stream itself."""
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                       pin_memory=pin_memory, worker_init_fn=worker_init_fn)
