"""Idefics3 / SmolVLM directories (transformers' `Idefics3ForConditionalGeneration`,
`SmolVLMForConditionalGeneration`) -> a tilevlm model, read in place (explicit key maps).

The directory holds `config.json` (`model_type` idefics3 or smolvlm, a `vision_config` and a
Llama `text_config`), single or sharded safetensors, the image processor's settings
(`preprocessor_config.json`, or the `image_processor` entry of transformers 5's
`processor_config.json`) and the tokenizer files (taken as they are). Every size comes from those
files; the config, the image settings and the tensor names and shapes (from the safetensors
headers) are checked before any tensor is read.

Keys: `model.vision_model.*` is SigLIP (`SIGLIP_KEYS`), `model.text_model.*` is a Llama model
(`LLAMA_KEYS`, under `model.` in a plain Llama file), `model.connector.modality_projection.proj.
weight` the projector (its pixel shuffle has our channel order), `lm_head.weight` the untied head (its absence means a tied one).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from tilevlm.config import VLMConfig
from tilevlm.files import json_field, json_numbers, read_json_object
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.weights.convert import assemble, check_tensors, listing
from tilevlm.weights.huggingface import convert_llama, convert_siglip, llama_fields, siglip_fields
from tilevlm.weights.safetensors_files import CONFIG_FILE, read_safetensors, read_shapes

MODEL_TYPES = ("idefics3", "smolvlm")
PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
VISION_PREFIX = "model.vision_model."
TEXT_PREFIX = "model.text_model."
PROJECTOR_KEYS = {"projector.proj.weight": "model.connector.modality_projection.proj.weight"}
# transformers' Idefics3VisionConfig defaults, where they differ from SigLIP's.
VISION_DEFAULTS = {"vit_hidden_dim": 1152, "vit_n_heads": 16, "vit_patch_size": 32}
LANCZOS = 1  # PIL's resample code, the only one the Idefics3 image rule uses


def is_idefics3_config(data: dict[str, Any]) -> bool:
    """Whether a config.json's contents name an Idefics3 or SmolVLM model."""
    return data.get("model_type") in MODEL_TYPES


def image_settings(model_dir: str | Path) -> tuple[dict[str, Any], Path, str]:
    """The image processor's settings: `preprocessor_config.json`, else the `image_processor`
    entry of `processor_config.json`; with the file they are in and their prefix there."""
    model_dir = Path(model_dir)
    if (model_dir / PREPROCESSOR_FILE).is_file():
        return read_json_object(model_dir / PREPROCESSOR_FILE), model_dir / PREPROCESSOR_FILE, ""
    where = model_dir / PROCESSOR_FILE
    nested = read_json_object(where, missing_ok=True).get("image_processor")
    if not isinstance(nested, dict):
        raise ValueError(f"{model_dir}: no {PREPROCESSOR_FILE} (nor an image_processor entry in "
                         f"{PROCESSOR_FILE}); the image settings of an Idefics3 model are needed")
    return nested, where, "image_processor."


def _edge(settings: dict[str, Any], key: str, where: Path, prefix: str) -> int:
    value = json_field(settings, key, "object", where, prefix=prefix)
    return json_field(value, "longest_edge", "int", where, low=1, prefix=f"{prefix}{key}.")


def image_fields(model_dir: Path, tile: int) -> dict[str, Any]:
    """VLMConfig image fields from the image processor's settings, each checked for type and
    range, and against the tile."""
    settings, where, prefix = image_settings(model_dir)

    def get(key: str, kind: str, default: Any, **bounds: Any) -> Any:
        return json_field(settings, key, kind, where, default, prefix=prefix, **bounds)

    edge = _edge(settings, "max_image_size", where, prefix)
    if edge != tile:
        raise ValueError(f"{where}: {prefix}max_image_size.longest_edge {edge} contradicts the "
                         f"vision config's image_size {tile} (each tile is one vision input)")
    problems = [name for name, ok in (
        ("resample must be 1 (Lanczos)", get("resample", "int", LANCZOS) == LANCZOS),
        ("do_resize, do_rescale and do_normalize must be true",
         all(get(k, "bool", True) for k in ("do_resize", "do_rescale", "do_normalize"))),
        ("rescale_factor must be 1/255",
         math.isclose(get("rescale_factor", "number", 1 / 255), 1 / 255, rel_tol=1e-6)))
        if not ok]
    if problems:
        raise ValueError(f"{where}: unsupported image settings: {'; '.join(problems)}")
    longest = _edge(settings, "size", where, prefix)
    if longest < tile:
        raise ValueError(f"{where}: {prefix}size.longest_edge {longest} is smaller than one tile "
                         f"({tile}); not supported")
    return dict(max_img_size=longest, image_splitting=get("do_image_splitting", "bool", True),
                image_mean=json_numbers(settings, "image_mean", where, 3, (0.5,) * 3,
                                        prefix=prefix),
                image_std=json_numbers(settings, "image_std", where, 3, (0.5,) * 3, low=1e-12,
                                       prefix=prefix),
                image_rule="idefics3")


def check_position_ids(side: int, where: Path) -> None:
    """transformers numbers the patches of a full tile through `torch.bucketize` of float32
    fractions, which for some sides is not 0..side-1; such a model is refused, not misread."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    coords = torch.clamp(torch.arange(side, dtype=torch.float32) * (1.0 / torch.tensor(side)),
                         max=1.0 - 1e-6)
    if not torch.equal(torch.bucketize(coords, boundaries, right=True), torch.arange(side)):
        raise ValueError(f"{where}: {side} patches per side number their positions unevenly in "
                         "transformers (float rounding); tilevlm does not reproduce that")


def idefics3_config(model_dir: str | Path, data: dict[str, Any] | None = None) -> VLMConfig:
    """A VLMConfig with every size from the directory's files (no weight is read); `data`: its
    config.json, when already read."""
    model_dir = Path(model_dir)
    where = model_dir / CONFIG_FILE
    data = read_json_object(where) if data is None else data
    if data.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"{where}: model_type {data.get('model_type')!r:.60} is not one of "
                         f"{', '.join(MODEL_TYPES)}")
    vision = siglip_fields(json_field(data, "vision_config", "object", where, {}, nullable=True),
                           where, VISION_DEFAULTS, prefix="vision_config.")
    text = json_field(data, "text_config", "object", where, {}, nullable=True)
    decoder = llama_fields(text, where, prefix="text_config.")
    decoder["lm_tie_weights"] = json_field(data, "tie_word_embeddings", "bool", where,
                                           decoder["lm_tie_weights"], nullable=True)
    factor = json_field(data, "scale_factor", "int", where, 2, low=1, high=64)
    side = vision["vit_img_size"] // vision["vit_patch_size"]
    check_position_ids(side, where)
    images = image_fields(model_dir, vision["vit_img_size"])
    vocab = decoder.pop("lm_base_vocab_size")
    image_token = json_field(data, "image_token_id", "int", where, 128257, low=0)
    try:
        return VLMConfig(
            **vision, **decoder, **images, mp_pixel_shuffle_factor=factor,
            mp_image_token_length=(side // factor) ** 2, lm_base_vocab_size=vocab,
            lm_vocab_size=vocab, lm_image_token_id=image_token,
            lm_max_length=decoder["lm_max_position_embeddings"], use_global_tile=True,
            image_token_layout="idefics3", grid_side=-(-images["max_img_size"] // vision[
                "vit_img_size"]), name=f"{data['model_type']}:{model_dir.name}")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def convert_idefics3(tensors: dict[str, torch.Tensor], cfg: VLMConfig,
                     what: str = "Idefics3 weights") -> dict[str, torch.Tensor]:
    """Idefics3 tensors -> ours (vision_encoder., projector., decoder.)."""
    vision = {k[len("model."):]: v for k, v in tensors.items() if k.startswith(VISION_PREFIX)}
    text = {"model." + k[len(TEXT_PREFIX):]: v for k, v in tensors.items()
            if k.startswith(TEXT_PREFIX)}
    if "lm_head.weight" in tensors:
        text["lm_head.weight"] = tensors["lm_head.weight"]
    known = (VISION_PREFIX, TEXT_PREFIX, "lm_head.weight", *PROJECTOR_KEYS.values())
    unexpected = sorted(k for k in tensors if not k.startswith(known))
    missing = sorted(v for v in PROJECTOR_KEYS.values() if v not in tensors)
    if unexpected or missing:
        raise ValueError(f"{what}: " + "; ".join(f"{name}: {listing(keys)}" for name, keys in (
            ("missing tensors", missing), ("unexpected tensors", unexpected)) if keys))
    projector = {ours: tensors[theirs] for ours, theirs in PROJECTOR_KEYS.items()}
    return {**convert_siglip(vision, cfg, what), **projector,
            **convert_llama(text, cfg, what)}


def head_from_files(cfg: VLMConfig, shapes: dict[str, tuple[int, ...]]) -> VLMConfig:
    """The config with the head tied exactly when the files hold no `lm_head.weight`: where the
    config's flag says otherwise, transformers either finds the two equal or leaves the head
    random, so the files are what count."""
    tied = "lm_head.weight" not in shapes
    if tied == cfg.lm_tie_weights:
        return cfg
    return cfg.replace(lm_tie_weights=tied, grid_side=cfg.grid_side,
                       lm_vocab_size=cfg.lm_vocab_size)


def check_idefics3_shapes(model_dir: Path, cfg: VLMConfig, what: str,
                          files: Sequence[Path] | None = None) -> VLMConfig:
    """The key map applied to the header shapes alone (meta tensors): every tensor named and
    shaped as the model needs, before any is read. Returns the config with the files' head."""
    shapes = read_shapes(model_dir, files)
    cfg = head_from_files(cfg, shapes)
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    with torch.device("meta"):
        check_tensors(VisionLanguageModel(cfg), convert_idefics3(meta, cfg, what), what)
    return cfg


def load_idefics3(model_dir: str | Path, dtype: torch.dtype | None = None,
                  cfg: VLMConfig | None = None,
                  files: Sequence[Path] | None = None) -> VisionLanguageModel:
    """An Idefics3 / SmolVLM directory as our model (dtype None: as stored); `cfg` and `files`:
    its config and weight files, when already read (`weights.loading`)."""
    model_dir = Path(model_dir)
    cfg = idefics3_config(model_dir) if cfg is None else cfg
    what = f"Idefics3 weights in {model_dir}"
    cfg = check_idefics3_shapes(model_dir, cfg, what, files)
    tensors = read_safetensors(model_dir, files=files)
    return assemble(cfg, convert_idefics3(tensors, cfg, what), what, dtype)
