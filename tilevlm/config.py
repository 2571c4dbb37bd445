"""VLMConfig: every size and switch of a tilevlm model, validated at construction.

Field names follow the seed document (and nanoVLM, so its config.json files load).
Derived fields (`vit_inter_dim` when unset, `lm_vocab_size`, `grid_side`) are computed in
`__post_init__`, so overriding one field never leaves another stale.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilevlm.files import read_json
from tilevlm.special_tokens import (GLOBAL_IMAGE_TOKEN, IDEFICS3_IMAGE_TOKEN, IMAGE_TOKEN,
                                    SMOLVLM_ADDED_TOKENS, appended_tokens, check_layout,
                                    get_layout, grid_token, smolvlm_token_ids, special_tokens)

# Labels with this value count for no loss (PyTorch's cross-entropy default ignore_index).
IGNORE_INDEX = -100

# How an image is resized and cut into tiles (`VLMConfig.image_rule`): "tilevlm" (nanoVLM's
# DynamicResize, preprocessing/image.py) or "idefics3" (transformers' Idefics3 image processor,
# preprocessing/idefics3_image.py).
IMAGE_RULES = ("tilevlm", "idefics3")


@dataclass
class VLMConfig:
    # Vision encoder (SigLIP-B/16-224 by default).
    vit_img_size: int = 224  # the tile size: every tile is vit_img_size x vit_img_size pixels
    vit_patch_size: int = 16
    vit_hidden_dim: int = 768
    vit_inter_dim: int | None = None  # None: 4 * vit_hidden_dim
    vit_n_heads: int = 12
    vit_n_blocks: int = 12
    vit_ln_eps: float = 1e-6

    # Language decoder (SmolLM2-135M by default).
    lm_hidden_dim: int = 576
    lm_inter_dim: int = 1536
    lm_n_heads: int = 9
    lm_n_kv_heads: int = 3
    lm_n_blocks: int = 30
    lm_base_vocab_size: int = 49152  # the base tokenizer's vocabulary, before our special tokens
    lm_vocab_size: int | None = None  # derived: base + image + global + grid_side^2 grid tokens
    lm_re_base: float = 100000.0  # RoPE theta
    lm_rms_eps: float = 1e-5
    lm_max_position_embeddings: int = 8192
    lm_max_length: int = 1024  # longest sequence (text + image tokens) a sample may have
    lm_tie_weights: bool = True
    lm_image_token_id: int | None = None  # None: the first id after the base vocabulary (our
    # appended tokens); a checkpoint whose tokenizer holds its own image token gives its id

    # Modality projector.
    mp_pixel_shuffle_factor: int = 2
    mp_image_token_length: int = 49

    # Images.
    max_img_size: int = 224  # the long side of a resized image is at most this
    resize_to_max_side_len: bool = False  # True: always scale the long side to max_img_size
    use_global_tile: bool = True  # a thumbnail tile before the grid (never for a 1x1 grid)
    image_token_layout: str = "tilevlm"  # how an image is written in tokens: special_tokens.py
    image_rule: str = "tilevlm"  # how an image is resized and tiled: IMAGE_RULES
    image_splitting: bool = True  # idefics3 rule: False = the global image alone (1x1 grid)
    grid_side: int | None = None  # derived: grid tokens cover grid_side x grid_side tiles
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # SigLIP; (0,0,0) for nanoVLM
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # SigLIP; (1,1,1) for nanoVLM
    max_image_pixels: int = 89_478_485  # larger images are refused (decompression bombs)

    name: str = "custom"

    def __post_init__(self) -> None:
        self._check_types()
        self.image_mean = _floats(self.image_mean, "image_mean")
        self.image_std = _floats(self.image_std, "image_std")
        if self.vit_inter_dim is None:
            self.vit_inter_dim = 4 * self.vit_hidden_dim
        self._check_ranges()
        max_tiles_per_side = max(1, self.max_img_size // max(self.vit_img_size, 1))
        needed_side = max(8, max_tiles_per_side)  # 8x8 as in nanoVLM, more when asked for
        if self.grid_side is None:
            self.grid_side = needed_side
        _check(self.grid_side <= MAXIMA["grid_side"], "grid_side",
               f"must be <= {MAXIMA['grid_side']}, got {self.grid_side} (max_img_size "
               f"{self.max_img_size} / vit_img_size {self.vit_img_size} tiles per side)")
        get_layout(self.image_token_layout)  # a known layout, before it is used
        vocab = self.lm_base_vocab_size + len(appended_tokens(self.image_token_layout,
                                                              self.grid_side))
        if self.lm_vocab_size is None:
            self.lm_vocab_size = vocab
        self._validate(max_tiles_per_side, vocab)

    def _check_types(self) -> None:
        """Each field has its declared type (a config.json may hold "224", 4.5 or null); ints
        are accepted for floats. Runs first, so the rules below compare numbers only."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if value is None and kind.endswith("| None"):
                continue
            base = kind.split(" |")[0]
            if base == "float" and _is_int(value):
                setattr(self, f.name, float(value))
            elif base in _TYPES and not _TYPES[base](value):
                _fail(f.name, f"must be {_TYPE_NAMES[base]}, got {value!r:.60}")

    def _check_ranges(self) -> None:
        """Every number > 0 and at most its MAXIMA bound (before anything is derived from it)."""
        numbers = [f.name for f in dataclasses.fields(self)
                   if str(f.type).split(" |")[0] in ("int", "float")]
        for name in numbers:
            value = getattr(self, name)
            if value is None:
                continue
            if value <= 0:
                _fail(name, f"must be > 0, got {value}")
            if value > MAXIMA.get(name, math.inf):
                _fail(name, f"must be <= {MAXIMA[name]}, got {value}")

    def _validate(self, max_tiles_per_side: int, vocab: int) -> None:
        _check(self.vit_img_size % self.vit_patch_size == 0, "vit_img_size",
               f"must be a multiple of vit_patch_size ({self.vit_img_size} % {self.vit_patch_size} != 0)")
        side = self.vit_img_size // self.vit_patch_size
        factor = self.mp_pixel_shuffle_factor
        _check(side % factor == 0, "mp_pixel_shuffle_factor",
               f"must divide the patches per side ({side} patches per side, factor {factor})")
        expected = (side // factor) ** 2
        _check(self.mp_image_token_length == expected, "mp_image_token_length",
               f"must equal (vit_img_size / vit_patch_size / mp_pixel_shuffle_factor)^2 = "
               f"({self.vit_img_size}/{self.vit_patch_size}/{factor})^2 = {expected}, "
               f"got {self.mp_image_token_length}")
        _check(self.vit_hidden_dim % self.vit_n_heads == 0, "vit_n_heads",
               f"must divide vit_hidden_dim ({self.vit_hidden_dim} % {self.vit_n_heads} != 0)")
        _check(self.lm_hidden_dim % self.lm_n_heads == 0, "lm_n_heads",
               f"must divide lm_hidden_dim ({self.lm_hidden_dim} % {self.lm_n_heads} != 0)")
        _check(self.lm_n_heads % self.lm_n_kv_heads == 0, "lm_n_kv_heads",
               f"must divide lm_n_heads ({self.lm_n_heads} % {self.lm_n_kv_heads} != 0)")
        _check((self.lm_hidden_dim // self.lm_n_heads) % 2 == 0, "lm_n_heads",
               f"head dim lm_hidden_dim / lm_n_heads = {self.lm_hidden_dim / self.lm_n_heads} "
               "must be even for rotary embeddings")
        _check(self.max_img_size >= self.vit_img_size, "max_img_size",
               f"must be at least one tile (vit_img_size = {self.vit_img_size}), got {self.max_img_size}")
        _check(self.grid_side >= max_tiles_per_side, "grid_side",
               f"must cover the largest grid, max_img_size // vit_img_size = {max_tiles_per_side}, "
               f"got {self.grid_side}")
        _check(self.lm_vocab_size >= vocab, "lm_vocab_size",
               f"must hold the base vocabulary plus the layout's appended special tokens = "
               f"{vocab}, got {self.lm_vocab_size}")
        _check(self.lm_max_length <= self.lm_max_position_embeddings, "lm_max_length",
               f"must be <= lm_max_position_embeddings ({self.lm_max_position_embeddings})")
        for name in ("image_mean", "image_std"):
            _check(len(getattr(self, name)) == 3, name, "must have 3 values (R, G, B)")
        _check(all(s > 0 for s in self.image_std), "image_std", "values must be > 0")
        check_layout(self.image_token_layout, self.use_global_tile)
        _check(self.image_rule in IMAGE_RULES, "image_rule",
               f"must be one of {', '.join(IMAGE_RULES)}, got {self.image_rule!r:.60}")
        _check(self.image_splitting or self.image_rule == "idefics3", "image_splitting",
               "false (the global image alone) needs image_rule 'idefics3'")
        self._validate_image_token_id()

    def _validate_image_token_id(self) -> None:
        token_id = self.lm_image_token_id
        if token_id is None:
            _check(get_layout(self.image_token_layout).appended, "lm_image_token_id",
                   f"must be given for the {self.image_token_layout!r} layout (its tokens are "
                   "the tokenizer's own, at ids of its own)")
            return
        _check(0 <= token_id < self.lm_vocab_size, "lm_image_token_id",
               f"must be a token id below lm_vocab_size {self.lm_vocab_size}, got {token_id}")

    # Derived sizes, read-only.
    @property
    def patches_per_side(self) -> int:
        return self.vit_img_size // self.vit_patch_size

    @property
    def max_tiles_per_side(self) -> int:
        return self.max_img_size // self.vit_img_size

    @property
    def lm_head_dim(self) -> int:
        return self.lm_hidden_dim // self.lm_n_heads

    @property
    def n_special_tokens(self) -> int:
        """Special tokens appended after the base vocabulary (none when the tokenizer holds the
        layout's tokens itself)."""
        return len(appended_tokens(self.image_token_layout, self.grid_side))

    # Appended special token ids: the base vocabulary, then `special_tokens(grid_side)` in its
    # order (empty for a layout whose tokens are the tokenizer's own).
    def special_token_ids(self) -> dict[str, int]:
        base = self.lm_base_vocab_size
        tokens = appended_tokens(self.image_token_layout, self.grid_side)
        return {token: base + i for i, token in enumerate(tokens)}

    @property
    def image_token_id(self) -> int:
        """The id the model finds image features by."""
        if self.lm_image_token_id is not None:
            return self.lm_image_token_id
        return self.lm_base_vocab_size + special_tokens(0).index(IMAGE_TOKEN)

    @property
    def global_image_token_id(self) -> int | None:
        """Our appended global token's id (None when the tokenizer holds the layout's tokens)."""
        if not get_layout(self.image_token_layout).appended:
            return None
        return self.lm_base_vocab_size + special_tokens(0).index(GLOBAL_IMAGE_TOKEN)

    def grid_token_id(self, row: int, col: int) -> int:
        """Token id of grid cell r{row}c{col} (both 1-based)."""
        side = self.grid_side
        if not (1 <= row <= side and 1 <= col <= side):
            raise ValueError(f"grid cell r{row}c{col} is outside the {side}x{side} grid tokens")
        ids = self.special_token_ids()
        if not ids:
            raise ValueError(f"the {self.image_token_layout!r} layout's grid token ids are the "
                             "tokenizer's: ask the tokenizer")
        return ids[grid_token(row, col)]

    # Serialisation.
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image_mean"] = list(self.image_mean)
        data["image_std"] = list(self.image_std)
        return data

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = True) -> "VLMConfig":
        """Build a config from a dict; unknown keys are an error unless strict=False."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown and strict:
            raise ValueError(f"unknown VLMConfig fields: {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path, strict: bool = True) -> "VLMConfig":
        data = read_json(Path(path), dict, "a JSON object of VLMConfig fields")
        try:
            return cls.from_dict(data, strict=strict)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def replace(self, **changes: Any) -> "VLMConfig":
        """A new config with some fields changed; derived fields are recomputed unless given."""
        data = dataclasses.asdict(self)
        for derived in ("lm_vocab_size", "grid_side"):
            if derived not in changes:
                data[derived] = None
        if "vit_hidden_dim" in changes and "vit_inter_dim" not in changes:
            data["vit_inter_dim"] = None
        data.update(changes)
        return VLMConfig(**data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_TYPES = {"int": _is_int, "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
          "float": lambda v: isinstance(v, float) and math.isfinite(v)}
_TYPE_NAMES = {"int": "an integer", "bool": "true or false", "str": "a string",
               "float": "a finite number"}


def _floats(values: Any, name: str) -> tuple[float, ...]:
    """Three finite numbers (a list or tuple; not a string, not booleans, not NaN/inf)."""
    if not isinstance(values, (list, tuple)) or not all(
            (_is_int(v) or isinstance(v, float)) and math.isfinite(v) for v in values):
        _fail(name, f"must be a list of 3 finite numbers (R, G, B), got {values!r:.60}")
    return tuple(float(v) for v in values)


def _check(ok: bool, name: str, rule: str) -> None:
    if not ok:
        _fail(name, rule)


def _fail(name: str, rule: str) -> None:
    raise ValueError(f"VLMConfig.{name} {rule}")


# Upper bounds, far above any real model: a config.json with lm_n_blocks 200000 or grid_side
# 10000 is refused at once instead of taking minutes or all memory to build.
MAXIMA = {"vit_img_size": 4096, "vit_patch_size": 4096, "vit_hidden_dim": 16384,
          "vit_inter_dim": 65536, "vit_n_heads": 256, "vit_n_blocks": 256,
          "lm_hidden_dim": 32768, "lm_inter_dim": 131072, "lm_n_heads": 256,
          "lm_n_kv_heads": 256, "lm_n_blocks": 512, "lm_base_vocab_size": 1 << 21,
          "lm_vocab_size": (1 << 21) + 8192, "lm_max_position_embeddings": 1 << 20,
          "lm_max_length": 1 << 20, "mp_pixel_shuffle_factor": 64,
          "mp_image_token_length": 1 << 16, "max_img_size": 16384, "grid_side": 64,
          "max_image_pixels": 1 << 32}


_SIGLIP_B16 = dict(vit_patch_size=16, vit_hidden_dim=768, vit_inter_dim=3072, vit_n_heads=12,
                   vit_n_blocks=12, vit_ln_eps=1e-6)
_SIGLIP_B16_224 = dict(**_SIGLIP_B16, vit_img_size=224)
_SMOLLM2_BASE_VOCAB = 49152
_SMOLLM2_135M = dict(lm_hidden_dim=576, lm_inter_dim=1536, lm_n_heads=9, lm_n_kv_heads=3,
                     lm_n_blocks=30, lm_base_vocab_size=_SMOLLM2_BASE_VOCAB, lm_re_base=100000.0,
                     lm_rms_eps=1e-5, lm_tie_weights=True)

PRESETS: dict[str, dict[str, Any]] = {
    # The seed's working configuration: one 224 tile, 49 image tokens.
    "original_small": dict(**_SIGLIP_B16_224, **_SMOLLM2_135M, max_img_size=224, lm_max_length=1024),
    # Split presets: up to 2x2 / 4x4 tiles plus a global thumbnail tile.
    "split_448": dict(**_SIGLIP_B16_224, **_SMOLLM2_135M, max_img_size=448, lm_max_length=1024),
    "split_896": dict(**_SIGLIP_B16_224, **_SMOLLM2_135M, max_img_size=896, lm_max_length=2048),
    # SmolVLM-256M-Instruct's architecture, for `tilevlm bench --preset smolvlm_256m` (random
    # weights; a downloaded folder is a --model as it is). From its config.json (as quoted in
    # public SmolVLM configs and loaders) and transformers' Idefics3 / SmolVLM code: SigLIP
    # base-patch16-512 (hidden 768, 12 layers, 12 heads, intermediate 3072, LayerNorm eps
    # 1e-6), pixel shuffle scale_factor 4 ((512/16/4)^2 = 64 tokens per tile), a SmolLM2-135M
    # decoder (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, rope_theta 100000,
    # rms_norm_eps 1e-5, 8192 positions) over SmolVLM's 49,280-token vocabulary (SmolLM2's
    # 49,152 + the Idefics3 tokens, <image> = image_token_id 49190), with an untied LM head
    # (tie_word_embeddings false: 256.5M parameters; a tied head would make it 228M); images as
    # its preprocessor_config.json: longest edge 2048 (4x4 tiles + global), 512-px tiles.
    "smolvlm_256m": {
        **_SIGLIP_B16, "vit_img_size": 512, **_SMOLLM2_135M, "lm_tie_weights": False,
        "lm_vocab_size": _SMOLLM2_BASE_VOCAB + SMOLVLM_ADDED_TOKENS,
        "lm_image_token_id": smolvlm_token_ids(_SMOLLM2_BASE_VOCAB)[IDEFICS3_IMAGE_TOKEN],
        "lm_max_position_embeddings": 8192, "lm_max_length": 8192,
        "mp_pixel_shuffle_factor": 4, "mp_image_token_length": 64, "max_img_size": 2048,
        "image_token_layout": "idefics3", "image_rule": "idefics3", "use_global_tile": True},
    # Small widths, same mechanism: tests and `tilevlm demo` (up to 3x3 grids of 32-px tiles,
    # 8-px patches, 4 image tokens per tile; see docs/demo_recipe.md for why these sizes).
    "tiny": dict(vit_img_size=32, vit_patch_size=8, vit_hidden_dim=64, vit_inter_dim=256,
                 vit_n_heads=4, vit_n_blocks=2, lm_hidden_dim=128, lm_inter_dim=384, lm_n_heads=4,
                 lm_n_kv_heads=2, lm_n_blocks=2, lm_base_vocab_size=512, lm_re_base=10000.0,
                 lm_max_length=512, lm_max_position_embeddings=1024, mp_pixel_shuffle_factor=2,
                 mp_image_token_length=4, max_img_size=96, lm_tie_weights=True),
}


def preset(name: str, **overrides: Any) -> VLMConfig:
    """A fresh config for a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return VLMConfig(**{**PRESETS[name], **overrides, "name": overrides.get("name", name)})
