"""The Cauldron / FineVision style rows from local parquet files, streamed in row batches.

A row has `images` (a list of images; one `image` is accepted too) and `texts` (a list of
`{"user": ..., "assistant": ...}` turns). An image cell is whatever `rows.image_source` reads (a
`{"bytes", "path"}` struct as `datasets` stores its `Image` feature, raw bytes, or a path string);
paths are read below the image root (the parquet file's directory unless `image_root` is given)
and may not leave it.

Memory: pyarrow decodes one row group at a time and we convert only this shard's rows of each
small batch to Python, so a file is never held whole (a row group is; `datasets` writes image
data in small row groups).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from tilevlm.data.readers.rows import Keep, RowFormat, RowReader, image_source
from tilevlm.data.sample import Sample, conversation_sample
from tilevlm.data.skips import MALFORMED, SkipCounter, SkipSample

TEXT_COLUMN = "texts"
IMAGE_COLUMNS = ("images", "image")
BATCH_ROWS = 64  # rows converted at a time: bounds memory to a few dozen samples' image bytes


def require_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (the submodule is not imported by `pyarrow`)
    except ImportError:
        raise ValueError("reading parquet or arrow datasets needs pyarrow: "
                         "pip install pyarrow") from None
    return pyarrow


def find_columns(names: Sequence[str], where: str) -> tuple[str, str | None]:
    """(text column, image column or None) of a Cauldron-style table, or a ValueError."""
    if TEXT_COLUMN not in names:
        raise ValueError(f"{where}: no '{TEXT_COLUMN}' column (found {', '.join(names)}); "
                         "expected The Cauldron / FineVision columns 'images' and 'texts'")
    image = next((c for c in IMAGE_COLUMNS if c in names), None)
    return TEXT_COLUMN, image


def cauldron_sample(row: dict[str, Any], image_column: str | None, root: Path,
                    where: str) -> Sample:
    """One Cauldron-style row -> a raw sample (SkipSample when it is malformed)."""
    turns = row.get(TEXT_COLUMN)
    if not isinstance(turns, list) or not turns:
        raise SkipSample(MALFORMED, f"'{TEXT_COLUMN}' must be a non-empty list of turns")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("user"), str) \
                or not isinstance(turn.get("assistant"), str):
            raise SkipSample(MALFORMED, f"a turn must have 'user' and 'assistant' strings, "
                                        f"got {turn!r:.120}")
        messages += [{"role": "user", "content": turn["user"]},
                     {"role": "assistant", "content": turn["assistant"]}]
    raw = row.get(image_column) if image_column else None
    raw = [] if raw is None else raw if isinstance(raw, list) else [raw]
    return conversation_sample(messages, [image_source(x, root) for x in raw], where)


def take_rows(batch: Any, first: int, keep: Keep) -> Iterator[tuple[int, dict[str, Any]]]:
    """(global index, row as a dict) for the kept rows of a pyarrow RecordBatch whose first row
    has global index `first`; only those rows are converted to Python."""
    rows = [j for j in range(batch.num_rows) if keep(first + j)]
    if rows:
        yield from zip((first + j for j in rows), batch.take(rows).to_pylist())


class ParquetReader(RowReader):
    """Raw samples from parquet files (sorted paths), this rank's shard only."""

    def __init__(self, files: Sequence[str | Path], image_root: str | Path | None = None,
                 rank: int = 0, world_size: int = 1, skips: SkipCounter | None = None,
                 row_format: RowFormat | None = None) -> None:
        super().__init__(rank, world_size, skips)
        pa = require_pyarrow()
        self.row_format = row_format
        if not files:
            raise ValueError("no parquet files given")
        self.files = sorted(Path(f) for f in files)
        self.image_root = Path(image_root) if image_root is not None else None
        self._columns, self._num_rows = [], []
        for path in self.files:  # footers only: cheap, and a wrong file fails here, not mid-run
            try:
                meta = pa.parquet.ParquetFile(path)
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"{path}: not a readable parquet file ({e})") from None
            names = meta.schema_arrow.names
            self._columns.append(row_format.columns(names, str(path)) if row_format
                                 else find_columns(names, str(path)))
            self._num_rows.append(meta.metadata.num_rows)

    @property
    def num_rows(self) -> int:
        """Rows in all files, before sharding and skipping."""
        return sum(self._num_rows)

    def _rows(self, keep: Keep) -> Iterator[tuple[str, Any]]:
        pa = require_pyarrow()
        offset = 0
        for path, columns, n in zip(self.files, self._columns, self._num_rows):
            root = self.image_root or path.parent
            wanted = [c for c in columns if c is not None]
            file = pa.parquet.ParquetFile(path)
            first = offset
            for group in range(file.num_row_groups):
                size = file.metadata.row_group(group).num_rows
                kept = {i for i in range(first, first + size) if keep(i)}  # `keep` once per row
                if kept:  # a row group with no kept row is never read (other ranks' rows, or
                    # everything before the position a resumed run starts from)
                    for i, row in _group_rows(pa, file, group, first, kept, wanted):
                        yield f"{path}:{i - offset}", (row, columns[1], root)
                first += size
            offset += n

    def _to_sample(self, row: Any, where: str) -> Sample:
        values, image_column, root = row
        if isinstance(values, SkipSample):
            raise values
        if self.row_format is not None:
            return self.row_format.to_sample(values, root, where)
        return cauldron_sample(values, image_column, root, where)


def _group_rows(pa: Any, file: Any, group: int, first: int, kept: set[int],
                wanted: list[str]) -> Iterator[tuple[int, Any]]:
    """(global index, row) for the kept rows of one row group; when its data cannot be decoded
    (a corrupt page behind a valid footer), a SkipSample in place of each row not yet given, so
    every kept row is still accounted for (and counted as skipped)."""
    start = first
    try:
        for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=wanted, row_groups=[group]):
            yield from take_rows(batch, start, kept.__contains__)
            start += batch.num_rows
    except (OSError, pa.ArrowException) as e:
        error = SkipSample(MALFORMED, f"row group {group} cannot be decoded ({e})")
        yield from ((i, error) for i in sorted(kept) if i >= start)
