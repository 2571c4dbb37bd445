"""Hugging Face `datasets` directories written by `save_to_disk`, read with pyarrow alone.

A saved `Dataset` is a directory with `state.json` (its `_data_files` list the Arrow files in
order), `dataset_info.json` and `data-XXXXX-of-YYYYY.arrow` files in Arrow's IPC stream format;
a saved `DatasetDict` has `dataset_dict.json` and one such directory per split. The files are
memory-mapped and read record batch by record batch, so `datasets` is not needed at run time and
nothing is loaded whole. Rows are The Cauldron / FineVision style (see `tilevlm.data.readers.parquet`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from tilevlm.data.readers.parquet import (BATCH_ROWS, cauldron_sample, find_columns, require_pyarrow,
                                  take_rows)
from tilevlm.data.readers.rows import Keep, RowFormat, RowReader
from tilevlm.data.sample import Sample
from tilevlm.data.skips import MALFORMED, SkipCounter
from tilevlm.files import confined, read_json_object


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file()
                              or (path / "dataset_info.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def arrow_files(path: Path, split: str = "train") -> list[Path]:
    """The Arrow files of a saved Dataset (or of `split` of a saved DatasetDict), in order."""
    if (path / "dataset_dict.json").is_file():
        splits = read_json_object(path / "dataset_dict.json").get("splits", [])
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise ValueError(f"{path / 'dataset_dict.json'}: 'splits' must be a list of names")
        if split not in splits:
            raise ValueError(f"{path}: a saved DatasetDict without a {split!r} split "
                             f"(it has {', '.join(splits) or 'none'})")
        path = confined(path, split, "split")
    state_file = path / "state.json"
    if not state_file.is_file():
        raise ValueError(f"{path}: no state.json; expected a directory written by "
                         "datasets' save_to_disk")
    state = read_json_object(state_file)
    if state.get("_indices_data_files"):
        raise ValueError(f"{path}: saved with an indices mapping; re-save it after "
                         "`dataset.flatten_indices()`")
    entries = state.get("_data_files")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{state_file}: '_data_files' must be a non-empty list")
    return [_data_file(path, entry, state_file) for entry in entries]


def _data_file(path: Path, entry: Any, state_file: Path) -> Path:
    """One `_data_files` entry: a `{"filename": ...}` inside the dataset directory."""
    name = entry.get("filename") if isinstance(entry, dict) else None
    try:
        return confined(path, name, "_data_files filename")
    except ValueError as e:
        raise ValueError(f"{state_file}: {e}") from None


def _open_arrow(pa: Any, path: Path) -> tuple[Any, Iterator[Any]]:
    """(schema, record batches) of an Arrow IPC stream (or file) on a memory map."""
    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_stream(source)
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:  # an IPC *file* (random-access format) instead of a stream
        reader = pa.ipc.open_file(source)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


class HFDiskReader(RowReader):
    """Raw samples from a `save_to_disk` directory, this rank's shard only."""

    def __init__(self, path: str | Path, split: str = "train",
                 image_root: str | Path | None = None, rank: int = 0, world_size: int = 1,
                 skips: SkipCounter | None = None, row_format: RowFormat | None = None) -> None:
        super().__init__(rank, world_size, skips)
        pa = require_pyarrow()
        self.row_format = row_format
        self.path = Path(path)
        self.files = arrow_files(self.path, split)
        self.image_root = Path(image_root) if image_root is not None else self.files[0].parent
        try:
            schema, _ = _open_arrow(pa, self.files[0])
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{self.files[0]}: not a readable Arrow stream ({e})") from None
        self.columns = (row_format.columns(schema.names, str(self.path)) if row_format
                        else find_columns(schema.names, str(self.path)))

    def _rows(self, keep: Keep) -> Iterator[tuple[str, Any]]:
        pa = require_pyarrow()
        wanted = [c for c in self.columns if c is not None]
        first = 0
        for path in self.files:
            file_start = first
            for batch in self._batches(pa, path):
                batch = batch.select(wanted)
                for chunk_start in range(0, batch.num_rows, BATCH_ROWS):  # zero-copy slices
                    chunk = batch.slice(chunk_start, BATCH_ROWS)
                    for i, row in take_rows(chunk, first + chunk_start, keep):
                        yield f"{path}:{i - file_start}", row
                first += batch.num_rows

    def _batches(self, pa: Any, path: Path) -> Iterator[Any]:
        """The record batches of one Arrow file, up to the first that cannot be read: a stream
        has no index to skip a broken message by, so the rest of that file is counted as one
        skip and the run goes on with the next file (every rank and every resume stops at the
        same batch, so shards and positions stay consistent)."""
        read = 0
        try:
            for batch in _open_arrow(pa, path)[1]:
                read += batch.num_rows
                yield batch
        except (OSError, pa.ArrowException) as e:
            self.skips.add(MALFORMED, f"{path}:{read}",
                           f"the Arrow data from here on cannot be read ({e}); the rest of this "
                           "file is skipped")

    def _to_sample(self, row: Any, where: str) -> Sample:
        if self.row_format is not None:
            return self.row_format.to_sample(row, self.image_root, where)
        return cauldron_sample(row, self.columns[1], self.image_root, where)
