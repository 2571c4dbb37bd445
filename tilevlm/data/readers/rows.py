"""What every dataset reader shares: the raw-sample form, sharding, skip counting, safe paths.

Every reader yields raw samples (`tilevlm.data.sample`), made by `conversation_sample`, with a
`source` ("file:row") for error messages.

Sharding: global row i (counted over all files, in sorted order) belongs to rank
`i % world_size`; inside a rank, DataLoader worker w of n takes the rank's k-th row when
`k % n == w`. Every rank reads the same order, so the split is deterministic and disjoint.

Training streams (`RowReader.blocks`) shard a shuffled order instead: epoch e's stream is the
rows cut into blocks of `block_size` rows (file order), each block permuted by a generator seeded
with (seed, epoch, block); stream position j goes to rank `j % world_size`. The stream does not
depend on the number of ranks, and a run resumes at any position by skipping rows before it
without converting them.
"""

from __future__ import annotations

from pathlib import Path
from collections import deque
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

from tilevlm.data.sample import Sample
from tilevlm.data.skips import MALFORMED, PATH_ESCAPE, SkipCounter, SkipSample
from tilevlm.files import confined

Keep = Callable[[int], bool]  # global row index -> whether this process reads the row
RowBlock = dict[int, "Sample | SkipSample"]  # stream position -> sample (or why it was dropped)


class RowFormat(Protocol):
    """How a table's rows become raw samples, when they are not the readers' built-in layouts
    (The Cauldron's `images` + `texts`, LLaVA records): e.g. a benchmark task's columns."""

    def columns(self, names: Sequence[str], where: str) -> list[str]:
        """The columns to read, given the table's; a ValueError naming a missing one."""

    def to_sample(self, row: dict[str, Any], root: Path, where: str) -> Sample:
        """One row (its `columns`) -> a raw sample; SkipSample for a row it cannot use."""


class RowReader:
    """An iterable of raw samples from one shard of a dataset, dropping (and counting) bad rows.

    Subclasses implement `_rows(keep)`, yielding `(where, row)` for the kept global row indices
    in a fixed order (and may skip the others without decoding them), and `_to_sample`, which
    raises `SkipSample` for a row it cannot use.
    """

    def __init__(self, rank: int = 0, world_size: int = 1,
                 skips: SkipCounter | None = None) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        self.rank, self.world_size = rank, world_size
        self.skips = skips if skips is not None else SkipCounter()

    def __iter__(self) -> Iterator[Sample]:
        for where, row in self._rows(self._keep()):
            try:
                yield self._to_sample(row, where)
            except SkipSample as e:
                self.skips.skip(e, where)

    def _keep(self) -> Keep:
        rank, world = self.rank, self.world_size
        worker, n_workers = _worker_split()
        return lambda i: i % world == rank and (i // world) % n_workers == worker

    def blocks(self, block_size: int, seed: int, epoch: int, start: int = 0,
               shuffle: bool = True) -> Iterator[tuple[int, RowBlock]]:
        """One epoch of this rank's stream, block by block: `(block, {position: sample or
        SkipSample})` for every block of the data, including blocks where this rank has no row.

        Positions count from the epoch's start (block b holds positions b*block_size ...);
        rows at positions before `start` are passed over without conversion. No DataLoader
        worker split here (the caller splits work by batch)."""
        order = _BlockOrder(block_size, seed, epoch, shuffle)
        pending: deque[int] = deque()  # kept rows whose (where, row) has not arrived yet
        seen = [-1]  # the last row index offered to `keep`

        def keep(i: int) -> bool:
            seen[0] = i
            j = order.position(i)
            if j < start or j % self.world_size != self.rank:
                return False
            pending.append(i)
            return True

        current, block = start // block_size, {}
        for where, row in self._rows(keep):
            i = pending.popleft()  # `_rows` yields kept rows in the order `keep` saw them
            while i // block_size > current:
                yield current, block
                current, block = current + 1, {}
            block[order.position(i)] = self._convert(row, where)
        for b in range(current, seen[0] // block_size + 1):
            yield b, block if b == current else {}

    def _convert(self, row: Any, where: str) -> "Sample | SkipSample":
        try:
            return self._to_sample(row, where)
        except SkipSample as e:
            e.where = where
            return e

    def _rows(self, keep: Keep) -> Iterator[tuple[str, Any]]:
        raise NotImplementedError

    def _to_sample(self, row: Any, where: str) -> Sample:
        raise NotImplementedError


class _BlockOrder:
    """Row index <-> stream position within one epoch: blocks of `block_size` rows, each
    permuted by its own seeded generator (the identity when not shuffling)."""

    def __init__(self, block_size: int, seed: int, epoch: int, shuffle: bool) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size, self.seed, self.epoch, self.shuffle = block_size, seed, epoch, shuffle
        self._block, self._slot_of = -1, []

    def position(self, i: int) -> int:
        """The stream position of global row `i`."""
        block, offset = divmod(i, self.block_size)
        if not self.shuffle:
            return i
        if block != self._block:
            self._block, self._slot_of = block, self._inverse(block)
        return block * self.block_size + self._slot_of[offset]

    def _inverse(self, block: int) -> list[int]:
        """slot_of[row offset] = the slot (position offset) of that row in the block."""
        mixed = ((self.seed * 1_000_003 + self.epoch) * 1_000_033 + block) % (1 << 63)
        g = torch.Generator().manual_seed(mixed)
        perm = torch.randperm(self.block_size, generator=g)  # slot -> row offset
        return torch.argsort(perm).tolist()


def _worker_split() -> tuple[int, int]:
    """(worker id, number of workers) inside a DataLoader worker, else (0, 1)."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def safe_image_path(root: str | Path, name: str) -> Path:
    """`root / name`, refused (SkipSample) when, symlinks resolved, it leaves `root`: `..`
    parts, an absolute path elsewhere, or a link inside the root that points out of it
    (`tilevlm.files.confined`). Links that stay inside the root work."""
    if not isinstance(name, str) or not name:
        raise SkipSample(MALFORMED, f"image path must be a non-empty string, got {name!r:.80}")
    try:
        return confined(root, name, "image path", "the image root")
    except ValueError as e:
        raise SkipSample(PATH_ESCAPE, str(e)) from None


def image_source(cell: Any, root: str | Path) -> bytes | Path:
    """What `load_image` gets for one image cell of a data set, whatever form the cell takes:
    encoded bytes, a path string, or a `{"bytes", "path"}` struct as `datasets` stores its
    `Image` feature (bytes when it has them, else its path). Every path is confined to `root`
    (`safe_image_path`). Anything else (a number, a list, a string or a number where the bytes
    belong) is a SkipSample (malformed) naming what it got: nothing but bytes is read as bytes
    and nothing but a confined path is ever opened."""
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
        if data is not None and data != b"":
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise SkipSample(MALFORMED, f"an image struct's 'bytes' must hold bytes, got a "
                                            f"{type(data).__name__} ({data!r:.60})")
            return bytes(data)
        if path is not None:
            return safe_image_path(root, path)
    elif isinstance(cell, (bytes, bytearray, memoryview)) and len(cell):
        return bytes(cell)
    elif isinstance(cell, str) and cell:
        return safe_image_path(root, cell)
    raise SkipSample(MALFORMED, f"an image must be bytes, a path or a {{bytes, path}} struct, "
                                f"got {cell!r:.80}")
