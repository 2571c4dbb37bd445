"""The shareable model a run ends with (`OUT/model/`, `weights.run_folder.FINAL_MODEL`), and a
LoRA run's adapters alone (`OUT/adapter/`), each written whole or not at all."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from tilevlm.files import atomic_directory
from tilevlm.training.lora import ADAPTER_DIR, merge_lora, save_adapter
from tilevlm.weights.native import save_pretrained
from tilevlm.weights.run_folder import FINAL_MODEL, TMP_PREFIX


def write_final_model(model: nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """`out_dir/model/`: the model and its tokenizer (no optimizer), replaced atomically; a LoRA
    model with its adapters merged (into a copy: `model` keeps them), a plain model directory."""
    if getattr(model, "lora_spec", None) is not None:
        model = merge_lora(copy.deepcopy(model).cpu())
    final = Path(out_dir) / FINAL_MODEL
    return atomic_directory(final, lambda tmp: save_pretrained(model, tmp, tokenizer),
                            TMP_PREFIX)


def write_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """`out_dir/adapter/`: a LoRA model's adapters alone (`lora.save_adapter`), atomically."""
    final = Path(out_dir) / ADAPTER_DIR
    return atomic_directory(final, lambda tmp: save_adapter(model, tmp), TMP_PREFIX)
