"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

Layout of `out_dir/checkpoint-{step}/`:

    config.json, model.safetensors, tokenizer files   the model (checkpoint.save_pretrained)
    optimizer.safetensors                             optimizer state tensors, `state.{i}.{name}`
    optimizer.json                                    param groups + non-tensor state + schedule
    rng.safetensors                                   torch CPU/CUDA generator states, numpy keys
    trainer_state.json                                `TrainState` (step, data position,
                                                      counters), RNG scalars, the TrainConfig

Writes are atomic: everything goes into `out_dir/.tmp-ckpt-XXXX`, every file is fsynced, the
directory is renamed to `checkpoint-{step}` with `os.replace`, and then the `latest` pointer file
(the checkpoint's directory name) is replaced atomically. A kill at any point leaves the previous
checkpoint and pointer intact.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tilevlm.files import check_regular_file, confined, read_json_object

log = logging.getLogger(__name__)

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
RNG_TENSORS = "rng.safetensors"
TMP_PREFIX = ".tmp-ckpt-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------- trainer state
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


# ---------------------------------------------------------------- optimizer state
def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`optimizer.state_dict()` -> (tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    """The inverse of `flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["state"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------- RNG state
def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch (CPU and every CUDA device), numpy and python `random` states."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    scalars = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                         "cached_gaussian": float(cached)},
               "python": {"version": version, "internal": list(internal),
                          "gauss_next": gauss_next}}
    return tensors, scalars


def restore_rng(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    n = scalars["numpy"]
    np.random.set_state((n["kind"], tensors["numpy.keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = scalars["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


# ---------------------------------------------------------------- writing
def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_training_files(directory: Path, optimizer: torch.optim.Optimizer | None,
                        trainer_state: dict[str, Any],
                        optimizer_state: dict[str, Any] | None = None) -> None:
    """Optimizer, RNG and trainer state into `directory` (the model is written by the caller).
    `optimizer_state`: the state dict to write instead of `optimizer.state_dict()` (the full
    state gathered from a sharded optimizer: `fsdp.gather_optimizer_state`)."""
    state_dict = optimizer_state if optimizer_state is not None else optimizer.state_dict()
    opt_tensors, opt_meta = flatten_optimizer_state(state_dict)
    save_file(opt_tensors, str(directory / OPTIMIZER_TENSORS))
    write_json(directory / OPTIMIZER_META, opt_meta)
    rng_tensors, rng_scalars = capture_rng()
    save_file(rng_tensors, str(directory / RNG_TENSORS))
    write_json(directory / TRAINER_STATE, {**trainer_state, "rng": rng_scalars})


def atomic_checkpoint(out_dir: str | Path, step: int,
                      write: Callable[[Path], None]) -> Path:
    """`atomic_directory(out_dir/checkpoint-{step}, write)`, then update `latest`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        final = atomic_directory(out_dir / f"checkpoint-{step}", write)
    except OSError as e:  # disk full, permissions: say which checkpoint failed and which is kept
        kept = find_latest(out_dir)
        raise OSError(e.errno, f"cannot write checkpoint-{step} in {out_dir}: {e.strerror or e}; "
                      + (f"the previous checkpoint {kept.name} is kept" if kept
                         else "there is no earlier checkpoint")) from e
    _atomic_write_text(out_dir / LATEST, final.name + "\n")
    return final


def atomic_directory(final: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)` in a temporary directory beside `final`, fsync, rename to `final`
    (replacing it): a kill leaves the old `final`, or the new one, never half of one."""
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=final.parent))
    try:
        os.chmod(tmp, 0o755)
        write(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, final)
    return final


def _replace_dir(src: Path, dst: Path) -> None:
    """`os.replace` for directories; an existing `dst` (the same step saved again) is moved aside
    first and deleted after."""
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=dst.parent))
        os.replace(dst, old / dst.name)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-written pointer file behind
        raise
    _fsync_dir(path.parent)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [directory, *(p for p in directory.rglob("*") if p.is_dir())]:
        _fsync_dir(path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_pointer(out_dir: Path) -> None:
    """A ValueError when the `latest` pointer exists but is not a regular file (it could not be
    replaced at the first save, after the work of the steps before it)."""
    pointer = out_dir / LATEST
    if (pointer.exists() or pointer.is_symlink()) and not pointer.is_file():
        raise ValueError(f"{pointer}: exists and is not a regular file; remove it (it is the "
                         "pointer to the newest checkpoint)")


def remove_stale_tmp(out_dir: str | Path) -> None:
    """Delete half-written checkpoint directories left by a killed run."""
    for path in Path(out_dir).glob(TMP_PREFIX + "*"):
        log.info("removing an unfinished checkpoint directory %s", path)
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- reading
def is_complete(directory: Path) -> bool:
    return checkpoint_problem(directory) is None


def checkpoint_problem(directory: Path) -> str | None:
    """Why `directory` is not a complete, intact checkpoint (a missing, truncated or malformed
    file), or None. Headers and JSON only: no tensor is read."""
    from tilevlm.weights.safetensors_files import CONFIG_FILE, WEIGHTS_FILE, safetensors_problem

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


def load_model_weights(model: torch.nn.Module, directory: Path) -> None:
    """Copy a checkpoint's `model.safetensors` into `model` (same keys and shapes, checked)."""
    from tilevlm.weights.convert import check_tensors
    from tilevlm.weights.safetensors_files import read_safetensors

    tensors = read_safetensors(directory)
    check_tensors(model, tensors, f"{directory}")
    model.load_state_dict(tensors)


def read_trainer_state(directory: Path) -> dict[str, Any]:
    """`trainer_state.json`, checked: a `state` that makes a TrainState and an `rng` object."""
    path = directory / TRAINER_STATE
    data = read_json_object(path)
    for key in ("state", "rng"):
        if not isinstance(data.get(key), dict):
            raise ValueError(f"{path}: '{key}' must be a JSON object")
    try:
        train_state(data["state"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return data


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
    return TrainState(**data)


_STATE_TYPES = {"int": int, "dict[str, int]": dict, "list[Any]": list, "dict[str, Any]": dict}
_STATE_TYPE_NAMES = {int: "an integer >= 0", dict: "a JSON object", list: "a list"}


def load_training_files(directory: Path, optimizer: torch.optim.Optimizer,
                        place: Callable[[int, str, torch.Tensor], torch.Tensor] | None = None
                        ) -> dict[str, Any]:
    """Restore optimizer and RNG states from a checkpoint; returns the trainer state. A file
    whose contents do not fit (an edited or foreign checkpoint) is a ValueError naming it.
    `place(param index, state name, full tensor)`: what to keep of each optimizer tensor as it
    is read (one at a time: a sharded optimizer keeps its shard, `fsdp.shard_optimizer_tensor`)."""
    state = read_trainer_state(directory)
    meta = read_json_object(directory / OPTIMIZER_META)
    try:
        tensors = _read_optimizer_tensors(directory / OPTIMIZER_TENSORS, place)
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta))
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise ValueError(f"{directory / OPTIMIZER_META}: does not fit this optimizer "
                         f"({type(e).__name__}: {e})") from None
    try:
        restore_rng(load_file(str(directory / RNG_TENSORS)), state["rng"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise ValueError(f"{directory / TRAINER_STATE}: its RNG state cannot be restored "
                         f"({type(e).__name__}: {e})") from None
    return state


def _read_optimizer_tensors(path: Path, place: Callable[[int, str, torch.Tensor], torch.Tensor]
                            | None) -> dict[str, torch.Tensor]:
    if place is None:
        return load_file(str(path))
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # `state.{index}.{name}`
            _, index, name = key.split(".", 2)
            tensors[key] = place(int(index), name, f.get_tensor(key))
    return tensors
