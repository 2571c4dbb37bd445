"""Loading a model and its processor for inference, whatever the checkpoint's format.

One place for what `generate`, `chat`, `eval` and `train --model` need: pick the device, read
our own directory, a nanoVLM one or an Idefics3 / SmolVLM one (in place), load the tokenizer that
goes with it, and check that the two agree before any heavy work starts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tilevlm.config import VLMConfig
from tilevlm.files import read_json_object
from tilevlm.device import default_dtype, resolve_device
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.preprocessing.processor import Processor

log = logging.getLogger(__name__)


def _is_nanovlm(model_dir: Path) -> bool:
    from tilevlm.weights.nanovlm import is_nanovlm_config

    return is_nanovlm_config(read_json_object(model_dir / "config.json"))


def load_model_config(model_dir: str | Path) -> VLMConfig:
    """The VLMConfig of a model directory, whatever its format (JSON only, validated)."""
    from tilevlm.weights.idefics3 import idefics3_config, is_idefics3
    from tilevlm.weights.native import load_config
    from tilevlm.weights.nanovlm import nanovlm_config

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: no config.json here; give a directory written by "
                         "`tilevlm train`/`tilevlm demo` (or save_pretrained), a nanoVLM "
                         "checkpoint or an Idefics3 / SmolVLM directory")
    if is_idefics3(model_dir):
        return idefics3_config(model_dir)
    return nanovlm_config(model_dir) if _is_nanovlm(model_dir) else load_config(model_dir)


def load_processor(model_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Processor:
    """The processor of a model directory: its config and tokenizer, checked against each other.

    Light (JSON and the tokenizer only, no weights): a contradictory config, a missing weights
    file (or a pickle in its place), a tokenizer that does not fit the model's vocabulary, all
    fail here, before any heavy work.
    """
    from tilevlm.weights.safetensors_files import weight_files
    from tilevlm.preprocessing.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    if _is_nanovlm(model_dir) and tokenizer_dir is None:
        raise ValueError(f"{model_dir} is a nanoVLM checkpoint: give its tokenizer directory "
                         "with --tokenizer DIR")
    config = load_model_config(model_dir)
    weight_files(model_dir)  # safetensors present (a pickle is refused, never read)
    tokenizer = load_tokenizer(tokenizer_dir or model_dir, grid_side=config.grid_side,
                               layout=config.image_token_layout)
    try:
        return Processor(config, tokenizer)
    except ValueError as e:
        raise ValueError(f"{model_dir}: {e}") from None


def load_model(model_dir: str | Path, processor: Processor, device: str | None = "auto",
               tokenizer_dir: str | Path | None = None,
               dtype: torch.dtype | None = None) -> VisionLanguageModel:
    """The weights of a model directory whose `processor` (`load_processor`) is already checked;
    in eval mode on the device."""
    from tilevlm.weights.idefics3 import is_idefics3, load_idefics3
    from tilevlm.weights.nanovlm import load_nanovlm
    from tilevlm.weights.native import load_pretrained

    model_dir = Path(model_dir)
    target = resolve_device(device)
    dtype = dtype or default_dtype(target)
    if is_idefics3(model_dir):
        model = load_idefics3(model_dir, dtype=dtype)
    elif _is_nanovlm(model_dir):
        model = load_nanovlm(model_dir, tokenizer_dir, dtype=dtype, tokenizer=processor.tokenizer)
    else:
        model = load_pretrained(model_dir, dtype=dtype)
    model = model.to(target).eval()
    log.debug("loaded %s (%s parameters) on %s in %s", model_dir,
              f"{model.num_parameters():,}", target, dtype)
    return model


def load_for_inference(model_dir: str | Path, device: str | None = "auto",
                       tokenizer_dir: str | Path | None = None,
                       dtype: torch.dtype | None = None) -> tuple[VisionLanguageModel, Processor]:
    """(model in eval mode on the device, its processor) from a model directory.

    Our directories and Idefics3 ones hold their tokenizer; a nanoVLM checkpoint needs
    `tokenizer_dir`. Everything
    light (config, tokenizer, their agreement, the device) is checked before the weights load.
    """
    processor = load_processor(model_dir, tokenizer_dir)
    resolve_device(device)
    return load_model(model_dir, processor, device, tokenizer_dir, dtype), processor
