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
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tilevlm.files import atomic_directory, atomic_write_text, read_json_object
from tilevlm.weights.convert import check_tensors
from tilevlm.weights.run_folder import (
    LATEST,
    OPTIMIZER_META,
    OPTIMIZER_TENSORS,
    RNG_TENSORS,
    TMP_PREFIX,
    TRAINER_STATE,
    find_latest,
    read_trainer_state,
)
from tilevlm.weights.safetensors_files import read_safetensors

log = logging.getLogger(__name__)



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
        final = atomic_directory(out_dir / f"checkpoint-{step}", write, TMP_PREFIX)
    except OSError as e:  # disk full, permissions: say which checkpoint failed and which is kept
        kept = find_latest(out_dir)
        raise OSError(e.errno, f"cannot write checkpoint-{step} in {out_dir}: {e.strerror or e}; "
                      + (f"the previous checkpoint {kept.name} is kept" if kept
                         else "there is no earlier checkpoint")) from e
    atomic_write_text(out_dir / LATEST, final.name + "\n")
    return final


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
def load_model_weights(model: torch.nn.Module, directory: Path) -> None:
    """Copy a checkpoint's `model.safetensors` into `model` (same keys and shapes, checked)."""
    tensors = read_safetensors(directory)
    check_tensors(model, tensors, f"{directory}")
    model.load_state_dict(tensors)


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
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # `state.{index}.{name}`
            _, index, name = key.split(".", 2)
            tensors[key] = place(int(index), name, f.get_tensor(key))
    return tensors
