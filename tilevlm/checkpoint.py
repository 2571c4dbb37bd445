"""Weights in and out: our own directory format, Hugging Face SigLIP + Llama/SmolLM2, nanoVLM.

Only safetensors and JSON are ever read (never a pickle). Every conversion is an explicit key map
below, `our key <- their key(s)`; several of theirs are concatenated along rows (fused q/k/v and
gate/up weights). A missing, unexpected or mis-shaped tensor is a ValueError that lists the keys.

Our format: `config.json` (VLMConfig fields), `model.safetensors` (a tied lm_head is not stored at
all: the decoder has no separate head then) and, when given, the tokenizer's files. Files are
written to a temporary name in the same directory and renamed, so a kill never leaves half a file.

Growing a vocabulary (HF Llama -> ours, or an older nanoVLM with fewer extra tokens): the new rows
of the embedding (and of an untied lm_head) start as the mean of the existing rows, which keeps
the new tokens' initial logits and embeddings in the distribution the model already knows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tilevlm.config import GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, VLMConfig, grid_token, preset
from tilevlm.model.vlm import VisionLanguageModel

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

KeyMap = dict[str, tuple[str, ...]]

# ---------------------------------------------------------------------------------------------
# Key maps: our key <- their key, or a tuple of their keys concatenated along dim 0.
# ---------------------------------------------------------------------------------------------

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

# nanoVLM: full keys on both sides.
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
NANOVLM_CONFIG_FIELDS = (
    "vit_hidden_dim", "vit_inter_dim", "vit_patch_size", "vit_img_size", "vit_n_heads",
    "vit_n_blocks", "vit_ln_eps", "lm_hidden_dim", "lm_inter_dim", "lm_rms_eps", "lm_re_base",
    "lm_max_position_embeddings", "lm_base_vocab_size", "lm_n_heads", "lm_n_kv_heads",
    "lm_n_blocks", "lm_max_length", "lm_tie_weights", "mp_pixel_shuffle_factor",
    "mp_image_token_length", "max_img_size", "resize_to_max_side_len",
)


# ---------------------------------------------------------------------------------------------
# Files: JSON, safetensors, atomic writes.
# ---------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (one file, or the shards of an index)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory")
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    if (directory / INDEX_FILE).is_file():
        return _shards(directory)
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{directory}: found {', '.join(pickles)} but no {WEIGHTS_FILE}; tilevlm never "
            "unpickles weights. Convert them to safetensors first, e.g. "
            "`safetensors.torch.save_file(torch.load(path, weights_only=True), "
            f"'{directory / WEIGHTS_FILE}')`")
    raise ValueError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}")


def _shards(directory: Path) -> list[Path]:
    weight_map = _read_json(directory / INDEX_FILE).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{directory / INDEX_FILE}: no 'weight_map'")
    shards = [directory / name for name in sorted(set(weight_map.values()))]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise ValueError(f"{directory}: shards listed in {INDEX_FILE} are missing: {missing}")
    return shards


def read_safetensors(directory: str | Path, keep: Callable[[str], bool] = lambda key: True,
                     device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors (those whose key passes `keep`) of a checkpoint directory."""
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if keep(key):
                        tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a complete safetensors file ({e})") from None
    return tensors


def read_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of a checkpoint directory, from the safetensors headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(directory):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a complete safetensors file ({e})") from None
    return shapes


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Generic conversion and checks.
# ---------------------------------------------------------------------------------------------

def _expand(flat: dict, block: dict, n_blocks: int, ours: str, theirs: str) -> KeyMap:
    """Flat + per-block maps -> one map; block keys get `{ours}{i}.` / `{theirs}{i}.` prefixes."""
    out = {k: (v,) if isinstance(v, str) else tuple(v) for k, v in flat.items()}
    for i in range(n_blocks):
        for k, v in block.items():
            srcs = (v,) if isinstance(v, str) else v
            out[f"{ours}{i}.{k}"] = tuple(f"{theirs}{i}.{s}" for s in srcs)
    return out


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def convert(src: dict[str, torch.Tensor], key_map: KeyMap, ignore: Callable[[str], bool],
            what: str) -> dict[str, torch.Tensor]:
    """Apply a key map; every source tensor must be used or explicitly ignored."""
    used = {s for srcs in key_map.values() for s in srcs}
    missing = sorted(used - set(src))
    unexpected = sorted(k for k in src if k not in used and not ignore(k))
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))
    return {ours: _concat(src, srcs, what) for ours, srcs in key_map.items()}


def _concat(src: dict[str, torch.Tensor], keys: tuple[str, ...], what: str) -> torch.Tensor:
    if len(keys) == 1:
        return src[keys[0]]
    try:
        return torch.cat([src[k] for k in keys], dim=0)
    except RuntimeError:
        shapes = ", ".join(f"{k} {list(src[k].shape)}" for k in keys)
        raise ValueError(f"{what}: tensors to fuse have mismatched shapes: {shapes}") from None


def check_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str,
                  skip: tuple[str, ...] = ()) -> None:
    """Keys and shapes of `tensors` must be exactly the model's (minus `skip` prefixes)."""
    check_shapes(model, {k: tuple(t.shape) for k, t in tensors.items()}, what, skip)


def check_shapes(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], what: str,
                 skip: tuple[str, ...] = ()) -> None:
    """`check_tensors` on shapes alone (e.g. from safetensors headers, before any tensor is read)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(skip)}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(f"{k} (checkpoint {list(s)}, model {list(expected[k])})"
                   for k, s in shapes.items() if k in expected and tuple(s) != expected[k])
    problems = [f"{name}: {_listing(keys)}" for name, keys in
                (("missing tensors", missing), ("unexpected tensors", unexpected),
                 ("wrong shapes", wrong)) if keys]
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def grow_rows(weight: torch.Tensor, rows: int, base_rows: int, what: str) -> torch.Tensor:
    """[base_rows, D] -> [rows, D]; the new rows are the mean of the existing ones."""
    if weight.dim() != 2 or weight.shape[0] != base_rows:
        raise ValueError(f"{what}: expected {base_rows} rows (the base vocabulary), "
                         f"got shape {list(weight.shape)}")
    if rows < base_rows:
        raise ValueError(f"{what}: {base_rows} rows do not fit a vocabulary of {rows}")
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # (1, D)
    return torch.cat([weight, mean.expand(rows - base_rows, -1)], dim=0)  # (rows, D)


def _assemble(cfg: VLMConfig, tensors: dict[str, torch.Tensor], what: str,
              dtype: torch.dtype | None, fresh: tuple[str, ...] = ()) -> VisionLanguageModel:
    """Build the model on the meta device and assign the tensors; `fresh` submodules get a
    random init instead (they must have an `init_weights()`)."""
    with torch.device("meta"):
        model = VisionLanguageModel(cfg)
    check_tensors(model, tensors, what, skip=tuple(f"{name}." for name in fresh))
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    for name in fresh:
        module = model.get_submodule(name).to_empty(device=device)
        module.init_weights()
        if dtype is not None:
            module.to(dtype)
    model.load_state_dict(tensors, strict=not fresh, assign=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Our own format.
# ---------------------------------------------------------------------------------------------

def save_pretrained(model: VisionLanguageModel, directory: str | Path,
                    tokenizer: Any = None) -> Path:
    """Write `model.safetensors`, the tokenizer (via its `save(directory)`) and `config.json`
    (last, so a directory with a config is complete)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(directory / WEIGHTS_FILE,
                  lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    if tokenizer is not None:
        tokenizer.save(directory)
    text = model.cfg.to_json() + "\n"
    _atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    log.info("saved %s parameters to %s", f"{model.num_parameters():,}", directory)
    return directory


def load_config(directory: str | Path) -> VLMConfig:
    """The VLMConfig of a directory written by `save_pretrained` (validated; no weights read)."""
    directory = Path(directory)
    data = _read_json(directory / CONFIG_FILE)
    if "vlm_extra_tokens" in data or "extra_token_amount" in data:
        raise ValueError(f"{directory}: this is a nanoVLM checkpoint; load it with load_nanovlm()")
    try:
        return VLMConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{directory / CONFIG_FILE}: {e}") from None


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> VisionLanguageModel:
    """Load a directory written by `save_pretrained` (dtype None: as stored).

    The config, and the tensor names and shapes in the safetensors headers, are checked before
    any tensor is read."""
    directory = Path(directory)
    cfg = load_config(directory)
    with torch.device("meta"):
        check_shapes(VisionLanguageModel(cfg), read_shapes(directory), f"{directory / WEIGHTS_FILE}")
    tensors = read_safetensors(directory, device=device)
    return _assemble(cfg, tensors, f"{directory / WEIGHTS_FILE}", dtype)


# ---------------------------------------------------------------------------------------------
# Hugging Face SigLIP + Llama / SmolLM2.
# ---------------------------------------------------------------------------------------------

def _fields(src: dict[str, Any], table: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    return {ours: src.get(theirs, default) for ours, (theirs, default) in table.items()}


def siglip_config(siglip_dir: str | Path) -> dict[str, Any]:
    """VLMConfig vision fields (and image mean/std when a preprocessor config is present)."""
    siglip_dir = Path(siglip_dir)
    data = _read_json(siglip_dir / CONFIG_FILE)
    vision = data.get("vision_config", data)
    act = vision.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"{siglip_dir}: unsupported SigLIP activation {act!r} (need GELU-tanh)")
    fields = _fields(vision, SIGLIP_CONFIG)
    pre = siglip_dir / "preprocessor_config.json"
    if pre.is_file():
        pre_data = _read_json(pre)
        for ours, theirs in (("image_mean", "image_mean"), ("image_std", "image_std")):
            if theirs in pre_data:
                fields[ours] = tuple(pre_data[theirs])
    return fields


def llama_config(llama_dir: str | Path) -> dict[str, Any]:
    """VLMConfig decoder fields from a Llama/SmolLM2 config.json; unsupported variants refused."""
    llama_dir = Path(llama_dir)
    data = _read_json(llama_dir / CONFIG_FILE)
    fields = _fields(data, LLAMA_CONFIG)
    if fields["lm_n_kv_heads"] is None:
        fields["lm_n_kv_heads"] = fields["lm_n_heads"]
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    fields["lm_re_base"] = float(data.get("rope_theta", rope.get("rope_theta", 10000.0)))
    problems = []
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}")
    head_dim = data.get("head_dim")
    if head_dim is not None and head_dim * fields["lm_n_heads"] != fields["lm_hidden_dim"]:
        problems.append(f"head_dim {head_dim} != hidden_size / num_attention_heads")
    if data.get("attention_bias") or data.get("mlp_bias"):
        problems.append("attention or MLP biases")
    if data.get("hidden_act", "silu") != "silu":
        problems.append(f"activation {data.get('hidden_act')!r}")
    if problems:
        raise ValueError(f"{llama_dir}: unsupported Llama variant: {'; '.join(problems)}")
    return fields


def _siglip_ignored(key: str) -> bool:
    """Not part of the vision encoder: pooling head, text tower, contrastive scale/bias."""
    return key.startswith(("head.", "text_model.", "logit_scale", "logit_bias"))


def convert_siglip(tensors: dict[str, torch.Tensor], cfg: VLMConfig,
                   what: str = "SigLIP weights") -> dict[str, torch.Tensor]:
    """HF SigLIP tensors (full model or vision model) -> ours under `vision_encoder.`."""
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""
    src = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    key_map = _expand(SIGLIP_KEYS, SIGLIP_BLOCK_KEYS, cfg.vit_n_blocks, "blocks.",
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
    key_map = _expand(flat, LLAMA_BLOCK_KEYS, cfg.lm_n_blocks, "blocks.", "model.layers.")
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
    return base.replace(
        **vision, **decoder, grid_side=grid_side, mp_image_token_length=side * side,
        max_img_size=max(base.max_img_size, vision["vit_img_size"]),
        lm_max_length=min(base.lm_max_length, decoder["lm_max_position_embeddings"]))


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
    model = _assemble(cfg, {**vision, **decoder}, f"{siglip_dir} + {llama_dir}", dtype,
                      fresh=("projector",))
    log.info("built a %s-parameter VLM from %s and %s", f"{model.num_parameters():,}",
             siglip_dir, llama_dir)
    return model


# ---------------------------------------------------------------------------------------------
# nanoVLM.
# ---------------------------------------------------------------------------------------------

def _nanovlm_grid_side(data: dict[str, Any], where: Path) -> int | None:
    """Grid side from `vlm_extra_tokens`, whose order must be ours (image, global, grid...)."""
    tokens = data.get("vlm_extra_tokens")
    if not isinstance(tokens, dict):
        return None
    values = list(tokens.values())
    n_grid = len(values) - 2
    side = math.isqrt(max(n_grid, 0))
    ours = [IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN]
    ours += [grid_token(r, c) for r in range(1, side + 1) for c in range(1, side + 1)]
    if values != ours[:len(values)] or (len(values) > 2 and side * side != n_grid):
        raise ValueError(f"{where}: vlm_extra_tokens are not in tilevlm's order "
                         "(<|image|>, <|global_image|>, <row_1_col_1>, ... row-major)")
    return side if n_grid > 0 else None


def nanovlm_config(checkpoint_dir: str | Path) -> VLMConfig:
    """A VLMConfig for a nanoVLM checkpoint (fields it does not share are ignored)."""
    where = Path(checkpoint_dir) / CONFIG_FILE
    data = _read_json(where)
    if data.get("vit_cls_flag"):
        raise ValueError(f"{where}: vit_cls_flag=true (a CLS token) is not supported")
    if float(data.get("lm_attn_scaling", 1.0)) != 1.0:
        raise ValueError(f"{where}: lm_attn_scaling != 1.0 is not supported")
    fields = {k: data[k] for k in NANOVLM_CONFIG_FIELDS if k in data}
    grid_side = _nanovlm_grid_side(data, where)
    derived_vocab = fields.get("lm_base_vocab_size", 49152) + 2 + (grid_side or 8) ** 2
    vocab = max(int(data.get("lm_vocab_size", 0)), derived_vocab)
    return VLMConfig(**fields, grid_side=grid_side, lm_vocab_size=vocab, image_mean=(0, 0, 0),
                     image_std=(1, 1, 1), name=f"nanovlm:{Path(checkpoint_dir).name}")


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
        **_expand(flat, {}, 0, "", ""),
        **_expand({}, NANOVLM_VISION_BLOCK_KEYS, cfg.vit_n_blocks, "vision_encoder.blocks.",
                  "vision_encoder.blocks."),
        **_expand({}, NANOVLM_DECODER_BLOCK_KEYS, cfg.lm_n_blocks, "decoder.blocks.",
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


def check_tokenizer_ids(tokenizer_dir: str | Path, model: VisionLanguageModel) -> None:
    """The tokenizer's special tokens must have the ids the model expects (reads tokenizer.json)."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    data = _read_json(path)
    ids = {t.get("content"): t.get("id") for t in data.get("added_tokens", [])}
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        ids = {**vocab, **ids}
    side = model.cfg.grid_side
    expected = {IMAGE_TOKEN: model.image_token_id, GLOBAL_IMAGE_TOKEN: model.global_image_token_id}
    expected.update({grid_token(r, c): model.grid_token_id(r, c)
                     for r in range(1, side + 1) for c in range(1, side + 1)})
    wrong = [f"{tok} is {ids.get(tok)}, model expects {want}"
             for tok, want in expected.items() if tok in ids and ids[tok] != want]
    if IMAGE_TOKEN not in ids or wrong:
        raise ValueError(f"{path}: special token ids do not match the model: "
                         + (_listing(wrong, 4) if wrong else f"{IMAGE_TOKEN} is missing"))


def load_nanovlm(checkpoint_dir: str | Path, tokenizer_dir: str | Path | None = None,
                 dtype: torch.dtype | None = None) -> VisionLanguageModel:
    """A nanoVLM checkpoint directory (`config.json` + `model.safetensors`) as our model.

    The config is mapped field by field with image_mean=(0,0,0), image_std=(1,1,1) (nanoVLM
    feeds [0, 1] pixels). With `tokenizer_dir`, its tokenizer.json is checked to give the special
    tokens the ids the model uses.
    """
    checkpoint_dir = Path(checkpoint_dir)
    cfg = nanovlm_config(checkpoint_dir)
    what = f"nanoVLM weights in {checkpoint_dir}"
    tensors = convert_nanovlm(read_safetensors(checkpoint_dir), cfg, what)
    model = _assemble(cfg, tensors, what, dtype)
    if tokenizer_dir is not None:
        check_tokenizer_ids(tokenizer_dir, model)
    return model
