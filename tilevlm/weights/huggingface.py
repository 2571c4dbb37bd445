"""Hugging Face SigLIP + Llama / SmolLM2 directories -> a tilevlm model (explicit key maps)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from tilevlm.config import VLMConfig, preset
from tilevlm.files import json_field, json_numbers, read_json_object
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.weights.convert import assemble, convert, expand, grow_rows
from tilevlm.weights.safetensors_files import CONFIG_FILE, read_safetensors

log = logging.getLogger(__name__)

# Key maps: our key <- their key, or a tuple of their keys concatenated along dim 0.

# HF SigLIP vision tower, keys relative to `vision_model.` (or to the root for a transformers-5
# `SiglipVisionModel` file). Ours are relative to `vision_encoder.`.
SIGLIP_KEYS = {
    "patch_embed.weight": "embeddings.patch_embedding.weight",
    "patch_embed.bias": "embeddings.patch_embedding.bias",
    "pos_embed": "embeddings.position_embedding.weight",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
SIGLIP_BLOCK_KEYS = {  # ours `blocks.{i}.` <- theirs `encoder.layers.{i}.`
    "ln1.weight": "layer_norm1.weight",
    "ln1.bias": "layer_norm1.bias",
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                        "self_attn.v_proj.weight"),
    "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.proj.weight": "self_attn.out_proj.weight",
    "attn.proj.bias": "self_attn.out_proj.bias",
    "ln2.weight": "layer_norm2.weight",
    "ln2.bias": "layer_norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}

# HF Llama / SmolLM2. Ours are relative to `decoder.`.
LLAMA_KEYS = {
    "token_embedding.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
}
LLAMA_HEAD_KEYS = {"lm_head.weight": "lm_head.weight"}  # untied only
LLAMA_BLOCK_KEYS = {  # ours `blocks.{i}.` <- theirs `model.layers.{i}.`
    "norm1.weight": "input_layernorm.weight",
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                        "self_attn.v_proj.weight"),
    "attn.out.weight": "self_attn.o_proj.weight",
    "norm2.weight": "post_attention_layernorm.weight",
    "mlp.gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.down.weight": "mlp.down_proj.weight",
}

# Config fields: ours <- theirs, with the transformers defaults for fields a config.json omits
# (e.g. google/siglip-base-patch16-224 stores an almost empty vision_config).
SIGLIP_CONFIG = {
    "vit_hidden_dim": ("hidden_size", 768),
    "vit_inter_dim": ("intermediate_size", 3072),
    "vit_n_heads": ("num_attention_heads", 12),
    "vit_n_blocks": ("num_hidden_layers", 12),
    "vit_ln_eps": ("layer_norm_eps", 1e-6),
    "vit_img_size": ("image_size", 224),
    "vit_patch_size": ("patch_size", 16),
}
LLAMA_CONFIG = {
    "lm_hidden_dim": ("hidden_size", 4096),
    "lm_inter_dim": ("intermediate_size", 11008),
    "lm_n_heads": ("num_attention_heads", 32),
    "lm_n_kv_heads": ("num_key_value_heads", None),  # None: = num_attention_heads
    "lm_n_blocks": ("num_hidden_layers", 32),
    "lm_rms_eps": ("rms_norm_eps", 1e-6),
    "lm_base_vocab_size": ("vocab_size", 32000),
    "lm_tie_weights": ("tie_word_embeddings", False),
    "lm_max_position_embeddings": ("max_position_embeddings", 2048),
}


def _fields(src: dict[str, Any], table: dict[str, tuple[str, Any]], where: str | Path,
            prefix: str = "") -> dict[str, Any]:
    """Our fields from `src` (a config we did not write), each checked: a positive integer, or
    a positive finite number for the epsilons and a boolean for flags (`json_field`)."""
    out = {}
    for ours, (theirs, default) in table.items():
        kind = "bool" if isinstance(default, bool) else "number" if isinstance(
            default, float) else "int"
        out[ours] = json_field(src, theirs, kind, where, default, low=None if kind == "bool" else
                               (1 if kind == "int" else 0), nullable=default is None,
                               prefix=prefix)
        if kind == "number" and out[ours] <= 0:
            raise ValueError(f"{where}: {prefix}{theirs} must be > 0, got {out[ours]}")
    return out


def siglip_fields(vision: dict[str, Any], where: str | Path,
                  defaults: dict[str, Any] | None = None, prefix: str = "") -> dict[str, Any]:
    """VLMConfig vision fields from a SigLIP vision config dict (`defaults`: ours -> value for
    fields it omits, when they differ from SigLIP's), each checked for type and range."""
    act = json_field(vision, "hidden_act", "str", where, "gelu_pytorch_tanh", prefix=prefix)
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"{where}: unsupported SigLIP activation {act!r} (need GELU-tanh)")
    table = {ours: (theirs, (defaults or {}).get(ours, default))
             for ours, (theirs, default) in SIGLIP_CONFIG.items()}
    return _fields(vision, table, where, prefix)


def siglip_config(siglip_dir: str | Path) -> dict[str, Any]:
    """VLMConfig vision fields (and image mean/std when a preprocessor config is present)."""
    siglip_dir = Path(siglip_dir)
    where = siglip_dir / CONFIG_FILE
    data = read_json_object(where)
    nested = "vision_config" in data
    vision = json_field(data, "vision_config", "object", where) if nested else data
    fields = siglip_fields(vision, where, prefix="vision_config." if nested else "")
    pre = siglip_dir / "preprocessor_config.json"
    if pre.is_file():
        pre_data = read_json_object(pre)
        for name in ("image_mean", "image_std"):
            values = json_numbers(pre_data, name, pre, 3, None,
                                  low=1e-12 if name == "image_std" else None)
            if values is not None:
                fields[name] = values
    return fields


def llama_config(llama_dir: str | Path) -> dict[str, Any]:
    """VLMConfig decoder fields from a Llama/SmolLM2 config.json; unsupported variants refused."""
    llama_dir = Path(llama_dir)
    return llama_fields(read_json_object(llama_dir / CONFIG_FILE), llama_dir / CONFIG_FILE)


def llama_fields(data: dict[str, Any], where: str | Path, prefix: str = "") -> dict[str, Any]:
    """VLMConfig decoder fields from a Llama config dict, each checked for type and range;
    unsupported variants refused."""
    fields = _fields(data, LLAMA_CONFIG, where, prefix)
    if fields["lm_n_kv_heads"] is None:
        fields["lm_n_kv_heads"] = fields["lm_n_heads"]
    rope = _rope(data, where, prefix)
    theta = json_field(data, "rope_theta", "number", where, None, prefix=prefix, nullable=True)
    if theta is None:
        theta = json_field(rope, "rope_theta", "number", where, 10000.0,
                           prefix=f"{prefix}rope_parameters.")
    if theta <= 0:
        raise ValueError(f"{where}: {prefix}rope_theta must be > 0, got {theta}")
    fields["lm_re_base"] = float(theta)
    problems = []
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        problems.append(f"RoPE scaling {kind!r:.40}")
    head_dim = json_field(data, "head_dim", "int", where, None, low=1, nullable=True,
                          prefix=prefix)
    if head_dim is not None and head_dim * fields["lm_n_heads"] != fields["lm_hidden_dim"]:
        problems.append(f"head_dim {head_dim} != hidden_size / num_attention_heads")
    if any(json_field(data, k, "bool", where, False, nullable=True, prefix=prefix)
           for k in ("attention_bias", "mlp_bias")):
        problems.append("attention or MLP biases")
    act = json_field(data, "hidden_act", "str", where, "silu", prefix=prefix)
    if act != "silu":
        problems.append(f"activation {act!r:.40}")
    if problems:
        raise ValueError(f"{where}: unsupported Llama variant: {'; '.join(problems)}")
    return fields


def _rope(data: dict[str, Any], where: str | Path, prefix: str) -> dict[str, Any]:
    """The RoPE parameters object (transformers 5's rope_parameters, or rope_scaling), or {}."""
    found = [json_field(data, key, "object", where, None, nullable=True, prefix=prefix)
             for key in ("rope_parameters", "rope_scaling")]  # both checked
    return next((value for value in found if value), {})


def _siglip_ignored(key: str) -> bool:
    """Not part of the vision encoder: pooling head, text tower, contrastive scale/bias."""
    return key.startswith(("head.", "text_model.", "logit_scale", "logit_bias"))


def convert_siglip(tensors: dict[str, torch.Tensor], cfg: VLMConfig,
                   what: str = "SigLIP weights") -> dict[str, torch.Tensor]:
    """HF SigLIP tensors (full model or vision model) -> ours under `vision_encoder.`."""
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""
    src = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    key_map = expand(SIGLIP_KEYS, SIGLIP_BLOCK_KEYS, cfg.vit_n_blocks, "blocks.",
                      "encoder.layers.")
    out = convert(src, key_map, _siglip_ignored, what)
    return {f"vision_encoder.{k}": v for k, v in out.items()}


def convert_llama(tensors: dict[str, torch.Tensor], cfg: VLMConfig,
                  what: str = "Llama weights", hf_vocab: int | None = None) -> dict[str, torch.Tensor]:
    """HF Llama tensors -> ours under `decoder.`, vocabulary grown to cfg.lm_vocab_size.

    `hf_vocab`: rows in the HF embedding when the tokenizer's base vocabulary is larger (it
    gained ChatML markers); default cfg.lm_base_vocab_size."""
    tied = cfg.lm_tie_weights
    flat = LLAMA_KEYS if tied else {**LLAMA_KEYS, **LLAMA_HEAD_KEYS}
    key_map = expand(flat, LLAMA_BLOCK_KEYS, cfg.lm_n_blocks, "blocks.", "model.layers.")
    out = convert(tensors, key_map,
                  lambda k: k.endswith("rotary_emb.inv_freq") or (tied and k == "lm_head.weight"),
                  what)
    for key in ("token_embedding.weight", "lm_head.weight"):
        if key in out:
            out[key] = grow_rows(out[key], cfg.lm_vocab_size, hf_vocab or cfg.lm_base_vocab_size,
                                 f"{what}: {key}")
    return {f"decoder.{k}": v for k, v in out.items()}


def hf_config(siglip_dir: str | Path, llama_dir: str | Path, base_config: VLMConfig | None = None,
              grid_side: int = 8) -> VLMConfig:
    """A new config: vision/decoder sizes from the HF directories, the rest from base_config."""
    base = base_config if base_config is not None else preset("original_small")
    vision, decoder = siglip_config(siglip_dir), llama_config(llama_dir)
    side = vision["vit_img_size"] // vision["vit_patch_size"] // base.mp_pixel_shuffle_factor
    try:  # VLMConfig checks the sizes against each other and their bounds
        return base.replace(
            **vision, **decoder, grid_side=grid_side, mp_image_token_length=side * side,
            max_img_size=_max_img_size(base, vision["vit_img_size"]),
            lm_max_length=min(base.lm_max_length, decoder["lm_max_position_embeddings"]))
    except ValueError as e:
        raise ValueError(f"{Path(siglip_dir) / CONFIG_FILE} + {Path(llama_dir) / CONFIG_FILE}: "
                         f"{e}") from None


def _max_img_size(base: VLMConfig, tile: int) -> int:
    """The base config's tiles per side, in the vision tower's tile size (the preset names a
    grid, not a pixel count: `tiny`'s 3 tiles of 32 px are 3 tiles of 224 px for SigLIP-224)."""
    tiles = max(1, base.max_img_size // base.vit_img_size)
    if tile != base.vit_img_size:
        log.info("preset %s: up to %d tiles per side of %d px: max_img_size %d -> %d", base.name,
                 tiles, tile, base.max_img_size, tiles * tile)
    return tiles * tile


def build_from_hf(siglip_dir: str | Path, llama_dir: str | Path,
                  base_config: VLMConfig | None = None, grid_side: int = 8,
                  dtype: torch.dtype = torch.float32,
                  tokenizer_base_vocab: int | None = None) -> VisionLanguageModel:
    """A VLM from a local HF SigLIP directory and a local HF Llama/SmolLM2 directory.

    The projector is freshly initialised; the embedding (and an untied lm_head) gains
    2 + grid_side^2 rows for our special tokens, initialised to the mean of the existing rows.
    `tokenizer_base_vocab`: the base vocabulary of the tokenizer that goes with the model, when it
    is larger than the HF embedding (a base tokenizer that gained the ChatML markers); those rows
    are added too, so our special tokens keep the ids the tokenizer gives them.
    """
    cfg = hf_config(siglip_dir, llama_dir, base_config, grid_side)
    hf_vocab = cfg.lm_base_vocab_size
    if tokenizer_base_vocab is not None and tokenizer_base_vocab != hf_vocab:
        if tokenizer_base_vocab < hf_vocab:
            raise ValueError(f"the tokenizer has {tokenizer_base_vocab} base tokens but {llama_dir} "
                             f"has {hf_vocab} embedding rows; give the tokenizer that belongs to it")
        cfg = cfg.replace(lm_base_vocab_size=tokenizer_base_vocab)
    siglip = read_safetensors(siglip_dir, keep=lambda k: not k.startswith(("text_model.", "logit_")))
    vision = convert_siglip(siglip, cfg, f"SigLIP weights in {siglip_dir}")
    decoder = convert_llama(read_safetensors(llama_dir), cfg, f"Llama weights in {llama_dir}",
                            hf_vocab=hf_vocab)
    model = assemble(cfg, {**vision, **decoder}, f"{siglip_dir} + {llama_dir}", dtype,
                      fresh=("projector",))
    log.info("built a %s-parameter VLM from %s and %s", f"{model.num_parameters():,}",
             siglip_dir, llama_dir)
    return model

