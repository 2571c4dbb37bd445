"""nanoVLM checkpoint directories (`config.json` + `model.safetensors`) -> a tilevlm model."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from tilevlm.config import VLMConfig
from tilevlm.files import json_field, read_json_object
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.preprocessing.tokenizer import VLMTokenizer, load_tokenizer
from tilevlm.special_tokens import special_tokens
from tilevlm.weights.convert import assemble, convert, expand, grow_rows, listing
from tilevlm.weights.safetensors_files import CONFIG_FILE, read_safetensors

log = logging.getLogger(__name__)

# Key maps: full keys on both sides; our key <- their key(s).
NANOVLM_KEYS = {
    "vision_encoder.patch_embed.weight": "vision_encoder.patch_embedding.conv.weight",
    "vision_encoder.patch_embed.bias": "vision_encoder.patch_embedding.conv.bias",
    "vision_encoder.pos_embed": "vision_encoder.patch_embedding.position_embedding",  # [1, N, D]
    "vision_encoder.norm.weight": "vision_encoder.layer_norm.weight",
    "vision_encoder.norm.bias": "vision_encoder.layer_norm.bias",
    "projector.proj.weight": "MP.proj.weight",
    "decoder.token_embedding.weight": "decoder.token_embedding.weight",
    "decoder.norm.weight": "decoder.norm.weight",
}
NANOVLM_HEAD_KEYS = {"decoder.lm_head.weight": "decoder.head.weight"}  # untied only
NANOVLM_VISION_BLOCK_KEYS = {  # ours `vision_encoder.blocks.{i}.` <- theirs, same prefix
    "ln1.weight": "ln1.weight",
    "ln1.bias": "ln1.bias",
    "attn.qkv.weight": "attn.qkv_proj.weight",
    "attn.qkv.bias": "attn.qkv_proj.bias",
    "attn.proj.weight": "attn.out_proj.weight",
    "attn.proj.bias": "attn.out_proj.bias",
    "ln2.weight": "ln2.weight",
    "ln2.bias": "ln2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
NANOVLM_DECODER_BLOCK_KEYS = {  # ours `decoder.blocks.{i}.` <- theirs, same prefix
    "norm1.weight": "norm1.weight",
    "attn.qkv.weight": ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"),
    "attn.out.weight": "attn.out_proj.weight",
    "norm2.weight": "norm2.weight",
    "mlp.gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.down.weight": "mlp.down_proj.weight",
}

NANOVLM_CONFIG_FIELDS = (
    "vit_hidden_dim", "vit_inter_dim", "vit_patch_size", "vit_img_size", "vit_n_heads",
    "vit_n_blocks", "vit_ln_eps", "lm_hidden_dim", "lm_inter_dim", "lm_rms_eps", "lm_re_base",
    "lm_max_position_embeddings", "lm_base_vocab_size", "lm_n_heads", "lm_n_kv_heads",
    "lm_n_blocks", "lm_max_length", "lm_tie_weights", "mp_pixel_shuffle_factor",
    "mp_image_token_length", "max_img_size", "resize_to_max_side_len",
)


def is_nanovlm_config(data: dict[str, Any]) -> bool:
    """Whether a config.json's contents are nanoVLM's (its extra-token fields), not ours."""
    return "vlm_extra_tokens" in data or "extra_token_amount" in data


def _nanovlm_grid_side(data: dict[str, Any], where: Path) -> int | None:
    """Grid side from `vlm_extra_tokens`, whose order must be ours (image, global, grid...)."""
    tokens = data.get("vlm_extra_tokens")
    if not isinstance(tokens, dict):
        return None
    values = list(tokens.values())
    n_grid = len(values) - 2
    side = math.isqrt(max(n_grid, 0))
    ours = special_tokens(side)
    if values != ours[:len(values)] or (len(values) > 2 and side * side != n_grid):
        raise ValueError(f"{where}: vlm_extra_tokens are not in tilevlm's order "
                         "(<|image|>, <|global_image|>, <row_1_col_1>, ... row-major)")
    return side if n_grid > 0 else None


def nanovlm_config(checkpoint_dir: str | Path, data: dict[str, Any] | None = None) -> VLMConfig:
    """A VLMConfig for a nanoVLM checkpoint (fields it does not share are ignored); `data`: its
    config.json, when already read."""
    where = Path(checkpoint_dir) / CONFIG_FILE
    data = read_json_object(where) if data is None else data
    if json_field(data, "vit_cls_flag", "bool", where, False, nullable=True):
        raise ValueError(f"{where}: vit_cls_flag=true (a CLS token) is not supported")
    if json_field(data, "lm_attn_scaling", "number", where, 1.0, nullable=True) != 1.0:
        raise ValueError(f"{where}: lm_attn_scaling != 1.0 is not supported")
    fields = {k: data[k] for k in NANOVLM_CONFIG_FIELDS if k in data}
    grid_side = _nanovlm_grid_side(data, where)
    base = json_field(data, "lm_base_vocab_size", "int", where, 49152, low=1)
    derived_vocab = base + len(special_tokens(grid_side or 8))
    vocab = max(json_field(data, "lm_vocab_size", "int", where, 0, low=0), derived_vocab)
    try:  # VLMConfig checks every other field's type and range
        return VLMConfig(**fields, grid_side=grid_side, lm_vocab_size=vocab,
                         image_mean=(0, 0, 0), image_std=(1, 1, 1), image_token_layout="nanovlm",
                         name=f"nanovlm:{Path(checkpoint_dir).name}")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def convert_nanovlm(tensors: dict[str, torch.Tensor], cfg: VLMConfig,
                    what: str = "nanoVLM weights") -> dict[str, torch.Tensor]:
    """nanoVLM tensors -> ours; an older, smaller vocabulary is grown (new rows = mean)."""
    tensors = dict(tensors)
    tied = cfg.lm_tie_weights
    embed_key, head_key = "decoder.token_embedding.weight", "decoder.head.weight"
    if tied and embed_key not in tensors and head_key in tensors:
        # safetensors' save_model keeps one name of a tied pair: nanoVLM files may hold only `head`.
        tensors[embed_key] = tensors.pop(head_key)
    flat = NANOVLM_KEYS if tied else {**NANOVLM_KEYS, **NANOVLM_HEAD_KEYS}
    key_map = {
        **expand(flat, {}, 0, "", ""),
        **expand({}, NANOVLM_VISION_BLOCK_KEYS, cfg.vit_n_blocks, "vision_encoder.blocks.",
                  "vision_encoder.blocks."),
        **expand({}, NANOVLM_DECODER_BLOCK_KEYS, cfg.lm_n_blocks, "decoder.blocks.",
                  "decoder.blocks."),
    }
    out = convert(tensors, key_map,
                  lambda k: k.endswith("inv_freq") or (tied and k == head_key), what)
    pos = out["vision_encoder.pos_embed"]
    if pos.dim() == 3 and pos.shape[0] == 1:
        out["vision_encoder.pos_embed"] = pos[0]  # (N, D)
    for key in ("decoder.token_embedding.weight", "decoder.lm_head.weight"):
        if key in out and out[key].shape[0] < cfg.lm_vocab_size:
            log.info("%s: growing %s from %d to %d rows", what, key, out[key].shape[0],
                     cfg.lm_vocab_size)
            out[key] = grow_rows(out[key], cfg.lm_vocab_size, out[key].shape[0], f"{what}: {key}")
    return out


def check_tokenizer_ids(tokenizer: VLMTokenizer, cfg: VLMConfig, where: str | Path) -> None:
    """The tokenizer's special tokens must have the ids the model expects."""
    ids = {token: tokenizer.tokenizer.token_to_id(token) for token in cfg.special_token_ids()}
    wrong = [f"{tok} is {ids[tok]}, model expects {want}"
             for tok, want in cfg.special_token_ids().items() if ids[tok] != want]
    if wrong:
        raise ValueError(f"{where}: special token ids do not match the model: {listing(wrong, 4)} "
                         f"(the tokenizer has {tokenizer.base_vocab_size} base tokens, the model "
                         f"{cfg.lm_base_vocab_size}: give the tokenizer the model was trained with)")


def load_nanovlm(checkpoint_dir: str | Path, tokenizer_dir: str | Path | None = None,
                 dtype: torch.dtype | None = None, tokenizer: VLMTokenizer | None = None,
                 cfg: VLMConfig | None = None,
                 files: Sequence[Path] | None = None) -> VisionLanguageModel:
    """A nanoVLM checkpoint directory (`config.json` + `model.safetensors`) as our model.

    The config is mapped field by field with image_mean=(0,0,0), image_std=(1,1,1) (nanoVLM
    feeds [0, 1] pixels) and nanoVLM's image token layout. With `tokenizer_dir` (the base
    tokenizer nanoVLM starts from, e.g. SmolLM2's, which gains our tokens when it lacks them, as
    nanoVLM adds them at run time), the special tokens must get the ids the model uses; a
    `tokenizer` already loaded from it (a Processor's) is checked the same way without reading
    the directory again. `cfg` and `files`: its config and weight files, when already read.
    """
    checkpoint_dir = Path(checkpoint_dir)
    cfg = nanovlm_config(checkpoint_dir) if cfg is None else cfg
    what = f"nanoVLM weights in {checkpoint_dir}"
    if tokenizer is None and tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir, grid_side=cfg.grid_side)
    if tokenizer is not None:  # before any weight is read
        check_tokenizer_ids(tokenizer, cfg, tokenizer_dir or "the tokenizer")
    tensors = convert_nanovlm(read_safetensors(checkpoint_dir, files=files), cfg, what)
    return assemble(cfg, tensors, what, dtype)
