import json

import pytest

import tilevlm
from tilevlm.config import PRESETS, VLMConfig, preset
from tilevlm.special_tokens import grid_token


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_and_round_trip_through_json(name, tmp_path):
    cfg = preset(name)
    assert cfg.name == name
    cfg.to_json(tmp_path / "config.json")
    again = VLMConfig.from_json(tmp_path / "config.json")
    assert again == cfg


def test_preset_returns_a_fresh_config_each_time():
    a = tilevlm.preset("tiny")
    a.lm_n_blocks = 99
    assert tilevlm.preset("tiny").lm_n_blocks != 99


def test_original_small_is_the_seed_configuration():
    cfg = preset("original_small")
    assert (cfg.vit_img_size, cfg.vit_patch_size, cfg.mp_pixel_shuffle_factor) == (224, 16, 2)
    assert cfg.mp_image_token_length == 49
    assert cfg.max_img_size == 224 and cfg.max_tiles_per_side == 1
    assert (cfg.vit_hidden_dim, cfg.vit_inter_dim, cfg.vit_n_blocks) == (768, 3072, 12)
    assert (cfg.lm_hidden_dim, cfg.lm_n_blocks, cfg.lm_n_heads, cfg.lm_n_kv_heads) == (576, 30, 9, 3)
    # 49152 base tokens + image + global + 8x8 grid tokens, as in nanoVLM.
    assert cfg.lm_vocab_size == 49152 + 2 + 64


def test_split_presets_grow_the_grid():
    assert preset("split_448").max_tiles_per_side == 2
    assert preset("split_896").max_tiles_per_side == 4
    assert preset("split_896").grid_side == 8


def test_grid_tokens_follow_the_largest_grid():
    cfg = preset("original_small", max_img_size=224 * 10)
    assert cfg.grid_side == 10
    assert cfg.lm_vocab_size == 49152 + 2 + 100


def test_derived_fields_follow_overrides():
    cfg = preset("tiny").replace(vit_hidden_dim=96)
    assert cfg.vit_inter_dim == 4 * 96
    cfg = preset("tiny").replace(lm_base_vocab_size=1000)
    assert cfg.lm_vocab_size == 1000 + 2 + 64


@pytest.mark.parametrize(
    "override, field, words",
    [
        (dict(vit_patch_size=15), "vit_img_size", "multiple of vit_patch_size"),
        (dict(mp_pixel_shuffle_factor=3), "mp_pixel_shuffle_factor", "divide the patches"),
        (dict(mp_image_token_length=50), "mp_image_token_length", "must equal"),
        (dict(vit_n_heads=5), "vit_n_heads", "divide vit_hidden_dim"),
        (dict(lm_n_heads=7), "lm_n_heads", "divide lm_hidden_dim"),
        (dict(lm_n_kv_heads=2), "lm_n_kv_heads", "divide lm_n_heads"),
        (dict(max_img_size=100), "max_img_size", "at least one tile"),
        (dict(grid_side=1, max_img_size=448), "grid_side", "cover the largest grid"),
        (dict(lm_vocab_size=100), "lm_vocab_size", "special tokens"),
        (dict(lm_max_length=10_000), "lm_max_length", "lm_max_position_embeddings"),
        (dict(vit_n_blocks=0), "vit_n_blocks", "> 0"),
        (dict(image_std=(0.5, 0.0, 0.5)), "image_std", "> 0"),
    ],
)
def test_bad_fields_raise_value_error_naming_field_and_rule(override, field, words):
    with pytest.raises(ValueError) as err:
        preset("original_small", **override)
    assert f"VLMConfig.{field}" in str(err.value)
    assert words in str(err.value)


def test_unknown_preset_and_unknown_json_fields_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**preset("tiny").to_dict(), "vit_colour": 3}))
    with pytest.raises(ValueError, match="vit_colour"):
        VLMConfig.from_json(path)
    assert VLMConfig.from_json(path, strict=False) == preset("tiny")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        VLMConfig.from_json(path)


def test_grid_token_strings_are_nanovlm_compatible():
    assert grid_token(1, 1) == "<row_1_col_1>"
    assert grid_token(8, 3) == "<row_8_col_3>"
