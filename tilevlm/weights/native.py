"""tilevlm's own model directory: `config.json` (VLMConfig fields), `model.safetensors` (a tied
lm_head is not stored at all: the decoder has no separate head then) and, when given, the
tokenizer's files. Files are written to a temporary name and renamed, so a kill never leaves half
a file; the config is written last, so a directory with a config is complete."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file

from tilevlm.config import VLMConfig
from tilevlm.files import atomic_write, read_json_object
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.weights.convert import assemble, check_shapes
from tilevlm.weights.nanovlm import is_nanovlm_config
from tilevlm.weights.safetensors_files import (CONFIG_FILE, WEIGHTS_FILE, check_finite,
                                               read_safetensors, read_shapes)

log = logging.getLogger(__name__)


def save_pretrained(model: VisionLanguageModel, directory: str | Path,
                    tokenizer: Any = None) -> Path:
    """Write `model.safetensors`, the tokenizer (via its `save(directory)`) and `config.json`
    (last, so a directory with a config is complete)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    check_finite(tensors, f"the model to save in {directory}")
    atomic_write(directory / WEIGHTS_FILE,
                  lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    if tokenizer is not None:
        tokenizer.save(directory)
    text = model.cfg.to_json() + "\n"
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    log.debug("saved %s parameters to %s", f"{model.num_parameters():,}", directory)
    return directory


def load_config(directory: str | Path, data: dict[str, Any] | None = None) -> VLMConfig:
    """The VLMConfig of a directory written by `save_pretrained` (validated; no weights read);
    `data`: its config.json, when already read."""
    directory = Path(directory)
    data = read_json_object(directory / CONFIG_FILE) if data is None else data
    if is_nanovlm_config(data):
        raise ValueError(f"{directory}: this is a nanoVLM checkpoint; load it with load_nanovlm()")
    try:
        return VLMConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{directory / CONFIG_FILE}: {e}") from None


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, cfg: VLMConfig | None = None,
                    files: Sequence[Path] | None = None) -> VisionLanguageModel:
    """Load a directory written by `save_pretrained` (dtype None: as stored); `cfg` and `files`:
    its config and weight files, when already read (`weights.loading`).

    The config, and the tensor names and shapes in the safetensors headers, are checked before
    any tensor is read."""
    directory = Path(directory)
    cfg = load_config(directory) if cfg is None else cfg
    with torch.device("meta"):
        check_shapes(VisionLanguageModel(cfg), read_shapes(directory, files),
                     f"{directory / WEIGHTS_FILE}")
    tensors = read_safetensors(directory, device=device, files=files)
    return assemble(cfg, tensors, f"{directory / WEIGHTS_FILE}", dtype)
