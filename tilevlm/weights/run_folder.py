"""A run folder, as `tilevlm train --out` writes it, and what a path into one means.

    OUT/model/                 the final model (weights, config, tokenizer; no optimizer)
    OUT/checkpoint-{step}/     a checkpoint: the model + optimizer, RNG and trainer state
    OUT/latest                 the newest checkpoint's directory name
    OUT/metrics.jsonl          the run's log
    OUT/tilevlm.lock           held while a run writes here (`training/run_lock.py`)

The names, the trainer state's form (`TrainState`), which checkpoint is intact (headers and JSON
only, no tensor read), which one to resume from (`checkpoint_to_resume`) and which model a
`--model PATH` stands for (`resolve_model`) are here, below everything that reads or writes a run
(`training/checkpoints.py` writes them).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tilevlm.files import check_regular_file, confined, json_field, read_json_object
from tilevlm.weights.safetensors_files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    safetensors_problem,
)

log = logging.getLogger(__name__)

FINAL_MODEL = "model"  # OUT/model/: weights, config and tokenizer, no optimizer
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
RNG_TENSORS = "rng.safetensors"
TMP_PREFIX = ".tmp-ckpt-"
LOCK_FILE = "tilevlm.lock"
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"  # OUT/adapter/ of a LoRA run
# What a run writes in its folder (besides the lock): a folder holding any of these holds a run.
RUN_NAMES = (FINAL_MODEL, ADAPTER_DIR, LATEST, METRICS_FILE, "tensorboard")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def run_entries(directory: Path) -> list[str]:
    """The names in `directory` that a run wrote there (checkpoints, half-written ones included,
    `latest`, `model/`, `adapter/`, metrics), sorted; [] for a folder that holds no run."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir()
                  if p.name in RUN_NAMES or _CHECKPOINT_RE.match(p.name)
                  or p.name.startswith(TMP_PREFIX))


@dataclass
class TrainState:
    """What a checkpoint must remember besides tensors (`trainer_state.json`, "state")."""

    step: int = 0  # optimizer steps done
    position: int = 0  # samples drawn from the training stream, all ranks (bad ones included)
    skipped_samples: int = 0
    nonfinite_steps: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # by reason, all ranks
    data_positions: list[Any] = field(default_factory=list)  # per rank, at the last save
    epoch: dict[str, Any] = field(default_factory=dict)  # the current epoch's padding figures


def read_trainer_state(directory: Path) -> dict[str, Any]:
    """`trainer_state.json`, checked before anything uses it (it may have been edited): a
    `state` that makes a TrainState, an `rng` object, and the fields of `train_config` and
    `data_layout` that a resumed run reads, each of its type and range."""
    path = directory / TRAINER_STATE
    data = read_json_object(path)
    for key in ("state", "rng"):
        if not isinstance(data.get(key), dict):
            raise ValueError(f"{path}: '{key}' must be a JSON object")
    try:
        train_state(data["state"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    _check_saved_config(data, path)
    _check_layout(data, path)
    return data


# The train_config fields a resumed run reads (`training/loop.py`, `commands/train.py`).
_SAVED_CONFIG = {"lora": ("int", 0), "batch_size": ("int", 1), "grad_accum": ("int", 1),
                 "seed": ("int", None), "steps": ("int", 0), "warmup_steps": ("int", 0),
                 "pack": ("int", 0), "shuffle_block": ("int", 0), "shuffle": ("bool", None)}
_STREAM_LAYOUT = {"world_size": ("int", 1), "batch_size": ("int", 1), "pack": ("int", 0),
                  "block_size": ("int", 1), "shuffle": ("bool", None), "seed": ("int", None)}


def _check_saved_config(data: dict[str, Any], path: Path) -> None:
    config = json_field(data, "train_config", "object", path, {})
    for key, (kind, low) in _SAVED_CONFIG.items():
        json_field(config, key, kind, path, None, low=low, prefix="train_config.")


def _check_layout(data: dict[str, Any], path: Path) -> None:
    """`data_layout` (what the saved data positions mean) and the positions themselves."""
    layout = json_field(data, "data_layout", "object", path, {})
    kind = json_field(layout, "kind", "str", path, "map", prefix="data_layout.")
    if kind not in ("map", "stream"):
        raise ValueError(f"{path}: data_layout.kind must be map or stream, got {kind!r:.40}")
    json_field(layout, "world_size", "int", path, 1, low=1, prefix="data_layout.")
    json_field(layout, "batch_size", "int", path, 1, low=1, prefix="data_layout.")
    if kind == "stream":
        unknown = sorted(set(layout) - set(_STREAM_LAYOUT) - {"kind"})
        if unknown:
            raise ValueError(f"{path}: unknown data_layout fields: {', '.join(unknown)}")
        for key, (field_kind, low) in _STREAM_LAYOUT.items():
            json_field(layout, key, field_kind, path, low=low, prefix="data_layout.")
    for position in data["state"].get("data_positions", []):
        ok = _is_count(position) if kind == "map" else (
            isinstance(position, list) and len(position) == 3 and all(map(_is_count, position)))
        if not ok:
            raise ValueError(f"{path}: state.data_positions must hold "
                             + ("sample counts (integers >= 0)" if kind == "map" else
                                "[epoch, block, batches] lists of integers >= 0")
                             + f", got {position!r:.60}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def train_state(data: dict[str, Any]) -> TrainState:
    """A TrainState from its JSON form; unknown fields and wrong types are a ValueError."""
    known = {f.name: f for f in fields(TrainState)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown TrainState fields: {', '.join(unknown)}")
    for name in ("step", "position"):
        if name not in data:
            raise ValueError(f"TrainState.{name} is missing")
    for name, value in data.items():
        kind = _STATE_TYPES[known[name].type]
        if not isinstance(value, kind) or isinstance(value, bool) or \
                (kind is int and value < 0):
            raise ValueError(f"TrainState.{name} must be {_STATE_TYPE_NAMES[kind]}, "
                             f"got {value!r:.60}")
    for name in ("skipped", "epoch"):  # counts by name
        if not all(isinstance(k, str) and _is_count(v) for k, v in data.get(name, {}).items()):
            raise ValueError(f"TrainState.{name} must map names to integers >= 0, got "
                             f"{data[name]!r:.60}")
    return TrainState(**data)


_STATE_TYPES = {"int": int, "dict[str, int]": dict, "list[Any]": list, "dict[str, Any]": dict}
_STATE_TYPE_NAMES = {int: "an integer >= 0", dict: "a JSON object", list: "a list"}


def checkpoint_problem(directory: Path) -> str | None:
    """Why `directory` is not a complete, intact checkpoint (a missing, truncated or malformed
    file), or None. Headers and JSON only: no tensor is read."""
    names = (CONFIG_FILE, WEIGHTS_FILE, OPTIMIZER_TENSORS, OPTIMIZER_META, RNG_TENSORS,
             TRAINER_STATE)
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    for name in (WEIGHTS_FILE, OPTIMIZER_TENSORS, RNG_TENSORS):
        if (problem := safetensors_problem(directory / name)) is not None:
            return problem
    try:
        for name in (CONFIG_FILE, OPTIMIZER_META):
            read_json_object(directory / name)
        read_trainer_state(directory)
    except ValueError as e:
        return str(e)
    return None


def find_latest(path: str | Path) -> Path | None:
    """The checkpoint to resume from: `path` itself if it is a checkpoint (a ValueError when it
    is not intact), else the one `latest` names in it, else its highest-numbered intact
    `checkpoint-*`, with a warning for each broken one passed over; None if there is none."""
    path = Path(path)
    if (path / TRAINER_STATE).exists():
        if (problem := checkpoint_problem(path)) is not None:
            raise ValueError(f"{path}: not an intact checkpoint ({problem})")
        return path
    steps = sorted(((int(m.group(1)), p) for p in path.glob("checkpoint-*")
                    if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()), reverse=True)
    candidates = [p for p in [_pointed_at(path)] if p is not None] + \
        [p for _, p in steps if _inside(path, p)]
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        log.warning("%s is not an intact checkpoint (%s); trying the previous one", candidate,
                    problem)
    return None


def _inside(run_dir: Path, checkpoint: Path) -> bool:
    """Whether `checkpoint`, symlinks resolved, is in `run_dir` (a warning when it is not)."""
    try:
        confined(run_dir, checkpoint.name, "checkpoint")
    except ValueError as e:
        log.warning("%s; not resuming from it", e)
        return False
    return True


def _pointed_at(run_dir: Path) -> Path | None:
    """The checkpoint the `latest` pointer names, confined to `run_dir`; None (with a warning)
    when the pointer is absent or unusable."""
    pointer = run_dir / LATEST
    if not pointer.exists():
        return None
    try:
        check_regular_file(pointer)
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if not _CHECKPOINT_RE.match(name):
            raise ValueError(f"{pointer}: expected a checkpoint-N name, got {name!r:.80}")
        return confined(run_dir, name, f"{pointer}: the checkpoint")
    except ValueError as e:
        log.warning("%s; looking for the newest intact checkpoint instead", e)
        return None

def checkpoint_to_resume(path: str | Path) -> Path:
    """The checkpoint `--resume PATH` continues from (`find_latest`); a ValueError when there
    is none."""
    checkpoint = find_latest(path)
    if checkpoint is None:
        raise ValueError(f"{path}: no complete checkpoint to resume from")
    return checkpoint


def resolve_model(path: str | Path) -> Path:
    """The model directory `path` stands for; logs which one when it had to choose."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: not found; give a model directory, a checkpoint or a run "
                         "folder (what `tilevlm train --out` wrote)")
    if (path / CONFIG_FILE).is_file():
        return _not_lora(path)
    final = path / FINAL_MODEL
    if (final / CONFIG_FILE).is_file():
        log.info("%s is a run folder: using its final model %s", path, final)
        return final
    latest = find_latest(path)
    if latest is not None:
        log.info("%s is a run folder without a final model: using its latest checkpoint %s",
                 path, latest)
        return _not_lora(latest)
    raise ValueError(f"{path}: no config.json, no {FINAL_MODEL}/ and no checkpoint here; give a "
                     "model directory, a checkpoint or a run folder of `tilevlm train`")


def _not_lora(directory: Path) -> Path:
    """`directory`, unless it is a LoRA run's checkpoint (base weights and adapters side by
    side, which only `train --resume` reads): a ValueError saying what to use."""
    state = read_json_object(directory / TRAINER_STATE, missing_ok=True)
    config = state.get("train_config")
    if isinstance(config, dict) and config.get("lora"):
        raise ValueError(f"{directory} is a checkpoint of a LoRA run: continue it with `tilevlm "
                         "train --resume`, or use the run's model/ (merged) or `tilevlm merge`")
    return directory
