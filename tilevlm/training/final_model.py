"""Which model a `--model PATH` means, and the shareable model a run folder ends with.

Every command that takes `--model` calls `resolve_model`: a model directory (or a checkpoint, or a
nanoVLM checkpoint: anything with a config.json) is used as it is; a run folder that `tilevlm
train --out` wrote gives its final model (`OUT/model/`), else its latest checkpoint.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from torch import nn

from tilevlm.training import checkpoints
from tilevlm.weights.safetensors_files import CONFIG_FILE

log = logging.getLogger(__name__)

FINAL_MODEL = "model"  # OUT/model/: weights, config and tokenizer, no optimizer


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
    latest = checkpoints.find_latest(path)
    if latest is not None:
        log.info("%s is a run folder without a final model: using its latest checkpoint %s",
                 path, latest)
        return _not_lora(latest)
    raise ValueError(f"{path}: no config.json, no {FINAL_MODEL}/ and no checkpoint here; give a "
                     "model directory, a checkpoint or a run folder of `tilevlm train`")


def _not_lora(directory: Path) -> Path:
    """`directory`, unless it is a LoRA run's checkpoint (base weights and adapters side by
    side, which only `train --resume` reads): a ValueError saying what to use."""
    from tilevlm.files import read_json_object

    state = read_json_object(directory / checkpoints.TRAINER_STATE, missing_ok=True)
    if state.get("train_config", {}).get("lora"):
        raise ValueError(f"{directory} is a checkpoint of a LoRA run: continue it with `tilevlm "
                         "train --resume`, or use the run's model/ (merged) or `tilevlm merge`")
    return directory


def write_final_model(model: nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """`out_dir/model/`: the model and its tokenizer (no optimizer), replaced atomically; a LoRA
    model with its adapters merged (into a copy: `model` keeps them), a plain model directory."""
    from tilevlm.training.lora import merge_lora
    from tilevlm.weights.native import save_pretrained

    if getattr(model, "lora_spec", None) is not None:
        model = merge_lora(copy.deepcopy(model).cpu())
    final = Path(out_dir) / FINAL_MODEL
    return checkpoints.atomic_directory(final, lambda tmp: save_pretrained(model, tmp, tokenizer))


def write_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """`out_dir/adapter/`: a LoRA model's adapters alone (`lora.save_adapter`), atomically."""
    from tilevlm.training.lora import ADAPTER_DIR, save_adapter

    final = Path(out_dir) / ADAPTER_DIR
    return checkpoints.atomic_directory(final, lambda tmp: save_adapter(model, tmp))
