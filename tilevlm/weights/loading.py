"""What a `--model PATH` is, decided once, and loading it with its processor.

Every command and `train --model` calls `model_source`: the path is resolved (a run folder gives
its final model, else its latest checkpoint: `run_folder.resolve_model`), its config.json is read
once and its format told from it (tilevlm's own directory, a nanoVLM checkpoint, or an Idefics3 /
SmolVLM directory read in place), and its weight files are listed. `load_processor` adds the
tokenizer and checks the two agree; `load_model` reads the weights. Everything light fails before
the weights are read.

    source = model_source("runs/demo")
    processor = load_processor(source)
    model = load_model(source, processor, device="auto")
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tilevlm.config import VLMConfig
from tilevlm.device import default_dtype, resolve_device
from tilevlm.files import read_json_object
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.preprocessing.processor import Processor
from tilevlm.preprocessing.tokenizer import load_tokenizer
from tilevlm.weights.idefics3 import idefics3_config, is_idefics3_config, load_idefics3
from tilevlm.weights.nanovlm import is_nanovlm_config, load_nanovlm, nanovlm_config
from tilevlm.weights.native import load_config, load_pretrained
from tilevlm.weights.run_folder import resolve_model
from tilevlm.weights.safetensors_files import CONFIG_FILE, weight_files

log = logging.getLogger(__name__)

MODEL_FORMATS = ("tilevlm", "nanovlm", "idefics3")


@dataclass(frozen=True)
class ModelSource:
    """A model directory, its format (one of MODEL_FORMATS), config and weight files."""

    directory: Path
    format: str
    config: VLMConfig
    files: tuple[Path, ...]  # the safetensors files (one, or an index's shards)


def model_source(path: str | Path | ModelSource) -> ModelSource:
    """The model `path` stands for, with its config (JSON only, validated); no weight is read.
    A ModelSource is returned as it is."""
    if isinstance(path, ModelSource):
        return path
    directory = resolve_model(path)
    where = directory / CONFIG_FILE
    if not where.is_file():
        raise ValueError(f"{directory}: no {CONFIG_FILE} here; give a directory written by "
                         "`tilevlm train`/`tilevlm demo` (or save_pretrained), a nanoVLM "
                         "checkpoint or an Idefics3 / SmolVLM directory")
    data = read_json_object(where)
    if is_idefics3_config(data):
        kind, config = "idefics3", idefics3_config(directory, data)
    elif is_nanovlm_config(data):
        kind, config = "nanovlm", nanovlm_config(directory, data)
    else:
        kind, config = "tilevlm", load_config(directory, data)
    files = tuple(weight_files(directory))  # safetensors present (a pickle is refused, never read)
    return ModelSource(directory, kind, config, files)


def load_processor(source: str | Path | ModelSource,
                   tokenizer_dir: str | Path | None = None) -> Processor:
    """The processor of a model: its config and tokenizer, checked against each other.

    Light (JSON and the tokenizer only, no weights): a contradictory config, a missing weights
    file (or a pickle in its place), a tokenizer that does not fit the model's vocabulary, all
    fail here, before any heavy work.
    """
    source = model_source(source)
    if source.format == "nanovlm" and tokenizer_dir is None:
        raise ValueError(f"{source.directory} is a nanoVLM checkpoint: give its tokenizer "
                         "directory with --tokenizer DIR")
    config = source.config
    tokenizer = load_tokenizer(tokenizer_dir or source.directory, grid_side=config.grid_side,
                               layout=config.image_token_layout)
    try:
        return Processor(config, tokenizer)
    except ValueError as e:
        raise ValueError(f"{source.directory}: {e}") from None


def load_model(source: str | Path | ModelSource, processor: Processor,
               device: str | None = "auto",
               dtype: torch.dtype | None = None) -> VisionLanguageModel:
    """The weights of a model whose `processor` (`load_processor`) is already checked; in eval
    mode on the device."""
    source = model_source(source)
    target = resolve_device(device)
    dtype = dtype or default_dtype(target)
    directory, config, files = source.directory, source.config, source.files
    if source.format == "idefics3":
        model = load_idefics3(directory, dtype=dtype, cfg=config, files=files)
    elif source.format == "nanovlm":
        model = load_nanovlm(directory, dtype=dtype, tokenizer=processor.tokenizer, cfg=config,
                             files=files)
    else:
        model = load_pretrained(directory, dtype=dtype, cfg=config, files=files)
    model = model.to(target).eval()
    log.debug("loaded %s (%s parameters) on %s in %s", directory,
              f"{model.num_parameters():,}", target, dtype)
    return model


def load_for_inference(path: str | Path | ModelSource, device: str | None = "auto",
                       tokenizer_dir: str | Path | None = None,
                       dtype: torch.dtype | None = None) -> tuple[VisionLanguageModel, Processor]:
    """(model in eval mode on the device, its processor) from anything `--model` takes.

    Our directories and Idefics3 ones hold their tokenizer; a nanoVLM checkpoint needs
    `tokenizer_dir`. Everything light (config, tokenizer, their agreement, the device) is
    checked before the weights load.
    """
    source = model_source(path)
    processor = load_processor(source, tokenizer_dir)
    resolve_device(device)
    return load_model(source, processor, device, dtype), processor
