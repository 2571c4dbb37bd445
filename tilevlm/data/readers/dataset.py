"""`open_dataset`: pick the reader for a local dataset path and return its iterable of raw samples.

    parquet   a `.parquet` file, a directory of them (searched recursively when it has none at
              the top), or a glob (`cauldron/*/train-*.parquet`): The Cauldron / FineVision rows
    hf        a directory written by `datasets`' `save_to_disk` (`state.json`, Arrow files)
    llava     a LLaVA `.json` list or `.jsonl` file (or a glob of them) plus an image folder

Every reader yields the raw-sample form of `tilevlm.data.readers.rows`, only this rank's shard, and
counts what it drops in its `skips` (a `SkipCounter`).
"""

from __future__ import annotations

import glob
from pathlib import Path

from tilevlm.data.readers.save_to_disk import HFDiskReader, is_saved_dataset
from tilevlm.data.readers.llava import LlavaReader
from tilevlm.data.readers.parquet import ParquetReader
from tilevlm.data.readers.rows import RowFormat, RowReader
from tilevlm.data.skips import SkipCounter

FORMATS = ("parquet", "hf", "llava")
LLAVA_SUFFIXES = (".json", ".jsonl")
EXPECTED = ("a .parquet file, a directory of .parquet files, a glob of them, a directory saved "
            "by datasets' save_to_disk, or a LLaVA-style .json/.jsonl file")


def open_dataset(path: str | Path, data_format: str | None = None,
                 image_root: str | Path | None = None, rank: int = 0, world_size: int = 1,
                 split: str = "train", skips: SkipCounter | None = None,
                 row_format: RowFormat | None = None) -> RowReader:
    """The reader for `path`; `data_format` (parquet | hf | llava) overrides the detection.

    `image_root`: where image paths in the data are looked up (and confined to); default the
    data file's directory. `split` picks the split of a saved DatasetDict. `row_format` reads
    rows of other columns (a benchmark task's) instead of the built-in layouts. An unknown or
    unreadable path is a ValueError that says what was expected.
    """
    if data_format is not None and data_format not in FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; choose one of {', '.join(FORMATS)}")
    files = _expand(path)
    data_format = data_format or detect_format(path, files)
    kwargs = dict(image_root=image_root, rank=rank, world_size=world_size, skips=skips,
                  row_format=row_format)
    if data_format == "hf":
        if not is_saved_dataset(Path(path)):
            raise ValueError(f"{path}: not a directory saved by datasets' save_to_disk "
                             "(no state.json, dataset_info.json or dataset_dict.json)")
        return HFDiskReader(path, split=split, **kwargs)
    if data_format == "parquet":
        return ParquetReader(_with_suffix(path, files, (".parquet",)), **kwargs)
    return LlavaReader(_with_suffix(path, files, LLAVA_SUFFIXES), **kwargs)


def detect_format(path: str | Path, files: list[Path] | None = None) -> str:
    """parquet | hf | llava from what `path` is; a ValueError naming what was expected."""
    files = _expand(path) if files is None else files
    if len(files) == 1 and is_saved_dataset(files[0]):
        return "hf"
    suffixes = {f.suffix for f in _flatten(files, (".parquet",) + LLAVA_SUFFIXES)}
    if suffixes == {".parquet"}:
        return "parquet"
    if suffixes and suffixes <= set(LLAVA_SUFFIXES):
        return "llava"
    what = "mixed formats" if suffixes else "no known data files"
    raise ValueError(f"{path}: cannot tell the data format ({what}); expected {EXPECTED}, "
                     f"or pass data_format ({', '.join(FORMATS)})")


def _expand(path: str | Path) -> list[Path]:
    """A glob's matches (sorted), or the path itself when it exists; a ValueError when there
    is nothing."""
    text = str(path)
    if any(c in text for c in "*?["):
        found = sorted(glob.glob(text, recursive=True))
    else:
        found = [text] if Path(text).exists() else []
    if not found:
        raise ValueError(f"{path}: not found; expected {EXPECTED}")
    return [Path(p) for p in found]


def _flatten(files: list[Path], suffixes: tuple[str, ...]) -> list[Path]:
    """Files with these suffixes: the files themselves, or those inside directories (top level
    first, recursive when the top level has none), sorted."""
    out: list[Path] = []
    for f in files:
        if f.is_dir():
            found = sorted(p for p in f.iterdir() if p.suffix in suffixes and p.is_file())
            out += found or sorted(p for p in f.rglob("*") if p.suffix in suffixes and p.is_file())
        elif f.suffix in suffixes:
            out.append(f)
    return out


def _with_suffix(path: str | Path, files: list[Path], suffixes: tuple[str, ...]) -> list[Path]:
    found = _flatten(files, suffixes)
    if not found:
        raise ValueError(f"{path}: no {' or '.join(suffixes)} files found; expected {EXPECTED}")
    return found
