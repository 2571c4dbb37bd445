"""Tiny random Hugging Face SigLIP / Llama models, saved to a directory for the converters.

Every parameter is perturbed away from its init (biases non-zero, norms not exactly one), so a
parity test cannot pass by accident on a zero bias or a unit norm.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tilevlm.config import preset

LLAMA_VOCAB = 300
SIGLIP_KW = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=32, patch_size=4)
LLAMA_KW = dict(vocab_size=LLAMA_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                max_position_embeddings=256, rope_theta=50000.0, bos_token_id=1, eos_token_id=2)


def base_config():
    """Non-backbone fields for HF builds in tests: the `tiny` preset (3x3 tiles of 32 px)."""
    return preset("tiny")


def _perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def make_siglip(directory: Path, full: bool = False, seed: int = 0):
    """A saved SigLIP: `SiglipVisionModel`, or a full `SiglipModel` (text tower + vision_model.)."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    if full:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, vocab_size=100, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0)
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=SIGLIP_KW))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_KW, attn_implementation="sdpa"))
    _perturb(model, seed)
    model.eval().save_pretrained(directory)
    return model


def make_llama(directory: Path, tie: bool = True, sharded: bool = False, seed: int = 0):
    """A saved `LlamaForCausalLM` (GQA: 4 heads, 2 KV heads); sharded = two files + index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**LLAMA_KW, tie_word_embeddings=tie, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    _perturb(model, seed)
    model.eval().save_pretrained(directory)
    if sharded:
        _reshard(Path(directory))
    return model


def _reshard(directory: Path) -> None:
    """Rewrite model.safetensors as two shards with a model.safetensors.index.json."""
    from safetensors.torch import load_file

    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    keys = sorted(tensors)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for name, part in zip(names, halves):
        save_file({k: tensors[k].contiguous() for k in part}, directory / name)
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
