"""Checkpoint directories on disk: which safetensors files hold the weights (one file or the
shards of an index), their tensors, and their shapes from the headers alone. Pickles are refused,
never read."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import SafetensorError, safe_open

from tilevlm.files import confined, read_json_object

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors header names


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (one file, or the shards of an index)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory")
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    if (directory / INDEX_FILE).is_file():
        return _shards(directory)
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{directory}: found {', '.join(pickles)} but no {WEIGHTS_FILE}; tilevlm never "
            "unpickles weights. Convert them to safetensors first, e.g. "
            "`safetensors.torch.save_file(torch.load(path, weights_only=True), "
            f"'{directory / WEIGHTS_FILE}')`")
    raise ValueError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}")


def _shards(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no 'weight_map'")
    if not all(isinstance(name, str) for name in weight_map.values()):
        raise ValueError(f"{index}: every 'weight_map' value must be a file name string")
    names = set(weight_map.values())
    try:
        shards = [confined(directory, name, "shard") for name in sorted(names)]
    except ValueError as e:
        raise ValueError(f"{index}: {e}") from None
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise ValueError(f"{directory}: shards listed in {INDEX_FILE} are missing: {missing}")
    return shards


def _each_tensor(directory: str | Path, read: Callable[[Any, str], Any],
                 keep: Callable[[str], bool] = lambda key: True,
                 device: str | torch.device = "cpu",
                 files: Sequence[Path] | None = None) -> dict[str, Any]:
    """`read(file, key)` for every key that passes `keep`, over all files of the directory
    (`files`, when `weight_files` already listed them); a truncated or corrupt file is a
    ValueError naming it."""
    out: dict[str, Any] = {}
    for path in weight_files(directory) if files is None else files:
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if keep(key):
                        _check_dtype(path, key, f.get_slice(key).get_dtype())
                        out[key] = read(f, key)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a complete safetensors file ({e})") from None
    return out


def _check_dtype(path: Path, key: str, dtype: str) -> None:
    """Weights are floating point: an integer or boolean tensor would be cast and silently used."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{path}: tensor {key} has dtype {dtype}; weights must be one of "
                         f"{', '.join(WEIGHT_DTYPES)}")


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """A ValueError naming the tensors that hold NaN or inf: a model with them is never saved
    (it would load, and answer garbage, without a word)."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(
        torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{what}: non-finite values (NaN or inf) in {len(bad)} tensor(s), e.g. "
                         f"{', '.join(bad[:3])}; not saved")


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (header and size only), or None."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        return f"{path.name}: not a complete safetensors file ({e})"
    return None


def read_safetensors(directory: str | Path, keep: Callable[[str], bool] = lambda key: True,
                     device: str | torch.device = "cpu",
                     files: Sequence[Path] | None = None) -> dict[str, torch.Tensor]:
    """All tensors (those whose key passes `keep`) of a checkpoint directory."""
    return _each_tensor(directory, lambda f, key: f.get_tensor(key), keep, device, files)


def read_shapes(directory: str | Path,
                files: Sequence[Path] | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of a checkpoint directory, from the safetensors headers only."""
    return _each_tensor(directory, lambda f, key: tuple(f.get_slice(key).get_shape()),
                        files=files)
