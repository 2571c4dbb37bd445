"""Where the trainer's micro-batches come from, and how their position is saved and resumed.

- `MapFeed`: a map-style dataset (the synthetic set): `ResumableBatchSampler` order; position =
  global samples drawn (one int per rank).
- `StreamFeed`: a dataset path (`DatasetSpec`): a `TrainStream`; position = (epoch, block,
  plans) per rank.

Both are a `Feed`. Each rank has its own position (ranks can drift apart: an all-bad
micro-batch makes a rank draw one more). A checkpoint holds every rank's position; resuming with
the same number of processes restores each exactly, with another number see `MapFeed.resume` /
`stream.resume_position`.
"""

from __future__ import annotations

import logging
import signal
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import torch

from tilevlm.data.batch import StreamPosition, TrainBatch
from tilevlm.data.collate import SkipBadSamples, VLMCollator
from tilevlm.data.sampler import ResumableBatchSampler
from tilevlm.data.sources import DatasetSpec
from tilevlm.data.stream import (StreamLayout, StreamOptions, TrainStream, resume_position,
                                 stream_loader)
from tilevlm.training.train_config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SavedFeed:
    """What a checkpoint's trainer state says about the data."""

    positions: list[Any]  # every rank's `Feed.position()` at the save
    layout: dict[str, Any]  # the saving run's `Feed.layout()`
    drawn: int  # samples drawn from the training data, all ranks

    @classmethod
    def from_trainer_state(cls, trainer_state: dict[str, Any]) -> "SavedFeed":
        state = trainer_state["state"]
        return cls(state.get("data_positions") or [], trainer_state.get("data_layout", {}),
                   state.get("position", 0))


class Feed(Protocol):
    """One rank's micro-batches and its position in the data."""

    world_size: int

    def layout(self) -> dict[str, Any]:
        """What a saved position means (saved beside it)."""

    def resume(self, saved: SavedFeed) -> None:
        """Start where a checkpoint stopped."""

    def batches(self, pin_memory: bool) -> Iterator[TrainBatch]:
        """Endless micro-batches from the current position."""

    def consumed(self, batch: TrainBatch) -> None:
        """Advance the position past `batch`."""

    def position(self) -> Any:
        """This rank's position, JSON-able, as checkpoints save it."""

    def epoch(self) -> int:
        """The epoch the position is in."""


def ignore_sigint(worker_id: int) -> None:
    """Workers leave Ctrl-C to the main process, which finishes its step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class MapFeed:
    """Micro-batches of a map-style dataset; `batch_size` samples per rank."""

    def __init__(self, data: Sequence[dict[str, Any]], processor: Any, cfg: TrainConfig,
                 rank: int, world_size: int) -> None:
        if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise ValueError("train_data must be a map-style dataset (len() and [index]) or a "
                             f"DatasetSpec, so its order can be resumed; got {type(data).__name__}")
        self.data, self.processor, self.cfg = data, processor, cfg
        self.rank, self.world_size = rank, world_size
        self.pos = 0

    def layout(self) -> dict[str, Any]:
        return {"kind": "map", "world_size": self.world_size, "batch_size": self.cfg.batch_size}

    def resume(self, saved: SavedFeed) -> None:
        """This rank's own saved position, or with another number of ranks the earliest one."""
        ints = [p for p in saved.positions if isinstance(p, int)]
        self.pos = ints[self.rank] if len(ints) == self.world_size else \
            min(ints, default=saved.drawn)

    def batches(self, pin_memory: bool) -> Iterator[TrainBatch]:
        cfg = self.cfg
        sampler = ResumableBatchSampler(len(self.data), cfg.batch_size, cfg.seed, start=self.pos,
                                        shuffle=cfg.shuffle, rank=self.rank,
                                        world_size=self.world_size)
        return iter(torch.utils.data.DataLoader(
            SkipBadSamples(self.data), batch_sampler=sampler,
            collate_fn=VLMCollator(self.processor), num_workers=cfg.num_workers,
            pin_memory=pin_memory, generator=torch.Generator().manual_seed(cfg.seed),
            worker_init_fn=ignore_sigint))

    def consumed(self, batch: TrainBatch) -> None:
        self.pos += self.cfg.batch_size * self.world_size

    def position(self) -> int:
        return self.pos

    def epoch(self) -> int:
        return max(0, self.pos - 1) // len(self.data)


class StreamFeed:
    """Micro-batches streamed from a dataset path (see `tilevlm.data.stream`)."""

    def __init__(self, spec: DatasetSpec, processor: Any, cfg: TrainConfig, rank: int,
                 world_size: int) -> None:
        self.spec, self.processor, self.cfg = spec, processor, cfg
        self.rank, self.world_size = rank, world_size
        self.options = StreamOptions(batch_size=cfg.batch_size, pack=cfg.pack,
                                     max_tiles=cfg.max_tiles,
                                     block_size=cfg.shuffle_block or 1024,
                                     shuffle=cfg.shuffle_block > 0, seed=cfg.seed)
        self.pos = StreamPosition()

    def _layout(self) -> StreamLayout:
        o = self.options
        return StreamLayout(self.world_size, o.batch_size, o.pack, o.block_size, o.shuffle,
                            o.seed)

    def layout(self) -> dict[str, Any]:
        return {"kind": "stream", **self._layout().__dict__}

    def resume(self, saved: SavedFeed) -> None:
        if saved.layout.get("kind") != "stream":
            log.warning("the checkpoint was not trained on a dataset stream: starting the data "
                        "from the beginning")
            return
        old = StreamLayout(**{k: v for k, v in saved.layout.items() if k != "kind"})
        self.pos = resume_position(saved.positions, old, self._layout(), self.rank)

    def batches(self, pin_memory: bool) -> Iterator[TrainBatch]:
        stream = TrainStream(self.spec.open, self.processor, self.options, self.rank,
                             self.world_size, start=self.pos)
        loader = stream_loader(stream, self.cfg.num_workers, pin_memory, ignore_sigint)
        return require_usable(iter(loader), self.pos, self.rank)

    def consumed(self, batch: TrainBatch) -> None:
        self.pos = batch.stream

    def position(self) -> list[int]:
        return self.pos.to_list()

    def epoch(self) -> int:
        return self.pos.epoch


def require_usable(batches: Iterator[TrainBatch], start: StreamPosition,
                   rank: int) -> Iterator[TrainBatch]:
    """The stream's batches, until a whole epoch passes in which the collator accepted no
    sample (every image undecodable, every text refused): then a ValueError with the skip
    counts, instead of drawing empty batches forever."""
    epoch, whole, usable = start.epoch, start == StreamPosition(start.epoch), False
    skipped: Counter[str] = Counter()
    for batch in batches:
        if batch.stream.epoch != epoch:
            if whole and not usable:
                raise ValueError(f"rank {rank}: no sample of a whole pass over the data could "
                                 f"be used (skipped: {dict(skipped)})")
            epoch, whole, usable, skipped = batch.stream.epoch, True, False, Counter()
        usable = usable or not batch.empty
        skipped.update(batch.skipped)
        yield batch


def make_feed(data: Any, processor: Any, cfg: TrainConfig, rank: int, world_size: int) -> Feed:
    if isinstance(data, DatasetSpec):
        return StreamFeed(data, processor, cfg, rank, world_size)
    return MapFeed(data, processor, cfg, rank, world_size)


def resume_feed(feed: Feed, trainer_state: dict[str, Any]) -> None:
    """Set the feed's start from a checkpoint's trainer state."""
    saved = SavedFeed.from_trainer_state(trainer_state)
    feed.resume(saved)
    saved_world = saved.layout.get("world_size", feed.world_size)
    if saved_world != feed.world_size:
        log.info("resuming a %d-process run with %d processes", saved_world, feed.world_size)
