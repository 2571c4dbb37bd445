import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tilevlm import PRESETS, preset
from tilevlm.preprocessing.image import (ImageTransform, load_image, resize_to_tiles, tile_grid,
                                         tiles_per_image)

from reference import (nanovlm_resized_size, nanovlm_tiles, reassemble_tiles, split_tiles,
                       to_tensor)

SIZES = [(1, 1), (223, 225), (224, 224), (448, 224), (1000, 10), (5000, 1), (1, 5000)]
# Expected (n_h, n_w) per preset for SIZES (nanoVLM's rule: sides rounded up to whole tiles,
# the long side at most max_img_size, at least one tile).
EXPECTED_GRIDS = {
    "original_small": [(1, 1)] * 7,
    "split_448": [(1, 1), (2, 2), (1, 1), (1, 2), (1, 2), (1, 2), (2, 1)],
    "split_896": [(1, 1), (2, 2), (1, 1), (1, 2), (1, 4), (1, 4), (4, 1)],
    "tiny": [(1, 1), (3, 3), (3, 3), (2, 3), (1, 3), (1, 3), (3, 1)],
}
# The presets that use this rule (smolvlm_256m uses Idefics3's: tests/test_idefics3.py).
TILEVLM_RULE = [name for name in PRESETS if preset(name).image_rule == "tilevlm"]
# Photo-shaped and awkward sizes for the comparison with nanoVLM's rule.
PHOTO_SIZES = [(1280, 720), (1920, 1080), (720, 1280), (4032, 3024), (3024, 4032), (640, 480),
               (1000, 300), (300, 1000), (2000, 1500), (225, 224), (449, 448), (1023, 767),
               (800, 533), (1200, 675), (512, 511), (97, 1), (1, 20000), (333, 332), (6000, 100)]


# ----------------------------------------------------------------------------- grid and resize

@pytest.mark.parametrize("name", TILEVLM_RULE)
def test_tile_grid_for_many_sizes(name):
    cfg = preset(name)
    grids = [tile_grid(w, h, cfg.vit_img_size, cfg.max_img_size) for w, h in SIZES]
    assert grids == EXPECTED_GRIDS[name]


@pytest.mark.parametrize("name", TILEVLM_RULE)
@pytest.mark.parametrize("size", SIZES)
def test_resize_matches_the_grid(name, size):
    cfg = preset(name)
    img = Image.new("RGB", size, (10, 120, 200))
    resized = resize_to_tiles(img, cfg.vit_img_size, cfg.max_img_size)
    n_h, n_w = tile_grid(*size, cfg.vit_img_size, cfg.max_img_size)
    assert resized.size == (n_w * cfg.vit_img_size, n_h * cfg.vit_img_size)
    assert max(resized.size) <= cfg.max_img_size


def test_tile_grid_rounds_up_and_keeps_aspect():
    assert tile_grid(1280, 720, 224, 448) == (2, 2)  # a 16:9 photo at 448: 2x2, as in nanoVLM
    assert tile_grid(1280, 720, 224, 896) == (3, 4)  # 896 x 504 -> 896 x 672
    assert tile_grid(335, 224, 224, 896) == (2, 2)  # 1.5 tiles wide -> 2
    assert tile_grid(225, 224, 224, 896) == (2, 2)  # a pixel over one tile: the next multiple
    assert tile_grid(2000, 1000, 224, 896) == (2, 4)  # long side scaled to 896
    assert tile_grid(100, 60, 224, 896) == (1, 1)  # small images become one whole tile


@pytest.mark.parametrize("size", PHOTO_SIZES)
@pytest.mark.parametrize("tile, max_side", [(224, 448), (224, 896), (512, 2048), (32, 96)])
def test_tile_grid_is_nanovlms_rule(size, tile, max_side):
    width, height = nanovlm_resized_size(*size, tile, max_side)
    assert tile_grid(*size, tile, max_side) == (height // tile, width // tile)
    assert tile_grid(*size, tile, max_side, resize_to_max_side_len=True) == tuple(
        s // tile for s in nanovlm_resized_size(*size, tile, max_side, True)[::-1])


def test_resize_to_max_side_len_scales_up():
    assert tile_grid(224, 112, 224, 896) == (1, 1)
    assert tile_grid(224, 112, 224, 896, resize_to_max_side_len=True) == (2, 4)
    assert tile_grid(10, 10, 224, 896, resize_to_max_side_len=True) == (4, 4)


def test_tile_grid_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        tile_grid(0, 10, 224, 448)
    with pytest.raises(ValueError, match="tile_size"):
        tile_grid(10, 10, 224, 100)


def test_tiles_per_image():
    assert tiles_per_image((1, 1), True) == 1
    assert tiles_per_image((2, 3), True) == 7
    assert tiles_per_image((2, 3), False) == 6


# ----------------------------------------------------------------------------- tensors and tiles

def test_to_tensor_is_float_chw_in_unit_range():
    img = Image.new("RGB", (5, 3), (255, 0, 51))
    x = to_tensor(img)
    assert x.dtype == torch.float32 and x.shape == (3, 3, 5)
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))


def test_split_tiles_is_row_major_and_reassembles_exactly():
    pixels = torch.rand(3, 2 * 4, 3 * 4)
    tiles = split_tiles(pixels, 4)
    assert tiles.shape == (6, 3, 4, 4)
    assert torch.equal(tiles[4], pixels[:, 4:8, 4:8])  # row 2, column 2
    assert torch.equal(tiles[2], pixels[:, 0:4, 8:12])  # row 1, column 3
    assert torch.equal(reassemble_tiles(tiles, (2, 3)), pixels)


def test_split_tiles_rejects_non_multiples():
    with pytest.raises(ValueError, match="multiple"):
        split_tiles(torch.rand(3, 10, 8), 4)
    with pytest.raises(ValueError, match="grid"):
        reassemble_tiles(torch.rand(5, 3, 4, 4), (2, 3))


def test_transform_tiles_reassemble_to_the_resized_image(photo, tiny_config):
    img = photo(300, 170)
    tiles, grid = ImageTransform(tiny_config)(img)
    assert grid == (2, 3) and tiles.shape == (7, 3, 32, 32)
    expected = to_tensor(resize_to_tiles(img, 32, 96)) * 2 - 1  # mean 0.5, std 0.5
    assert torch.allclose(reassemble_tiles(tiles[1:], grid), expected, atol=1e-6)


def test_transform_global_thumbnail_first(photo, tiny_config):
    img = photo(300, 170)
    transform = ImageTransform(tiny_config)
    resized, thumb, grid = transform.resize(img)
    tiles, _ = transform(img)
    assert thumb.size == (32, 32)
    # nanoVLM's global patch: a bilinear, antialiased resize of the float pixels
    reference = nanovlm_tiles(img, 32, 96)[0]
    torch.testing.assert_close(tiles[0], reference * 2 - 1, atol=1e-5, rtol=0)
    assert (to_tensor(thumb) - reference).abs().max() <= 0.5 / 255 + 1e-6  # rounded for display


@pytest.mark.parametrize("size", [(1280, 720), (720, 1280), (1000, 300), (300, 1000),
                                  (2000, 1500), (225, 224), (640, 480), (97, 1), (1, 2000)])
@pytest.mark.parametrize("encoding", ["png", "jpeg"])
def test_pixels_are_nanovlms_from_files(photo, size, encoding):
    """Grid, tile order and pixels of a nanoVLM-configured model equal nanoVLM's pipeline
    (DynamicResize, ToTensor, GlobalAndSplitImages), for files too: the same 8-bit values, the
    float global tile within float32 rounding (tests/test_image_fidelity.py: every scale)."""
    config = preset("split_448", image_mean=(0, 0, 0), image_std=(1, 1, 1))
    img = photo(*size)
    buf = io.BytesIO()
    img.save(buf, encoding.upper(), quality=95)
    tiles, grid = ImageTransform(config).load(buf.getvalue())
    expected = nanovlm_tiles(load_image(buf.getvalue()), 224, 448)
    width, height = nanovlm_resized_size(*size, 224, 448)
    assert grid == (height // 224, width // 224)
    assert tiles.shape == expected.shape
    assert (tiles - expected).abs().max() <= 1e-6


def test_transform_no_global_for_1x1_or_when_disabled(photo, tiny_config):
    tiles, grid = ImageTransform(tiny_config)(photo(30, 30))
    assert grid == (1, 1) and tiles.shape[0] == 1
    tiles, grid = ImageTransform(tiny_config.replace(use_global_tile=False))(photo(96, 96))
    assert grid == (3, 3) and tiles.shape[0] == 9


def test_transform_normalizes_with_config_mean_std(tiny_config):
    cfg = tiny_config.replace(image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))
    tiles, _ = ImageTransform(cfg)(Image.new("RGB", (32, 32), (255, 0, 0)))
    assert torch.allclose(tiles[0, :, 5, 5], torch.tensor([1.0, 0.0, 0.0]))


# ----------------------------------------------------------------------------- loading: bad input

def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (1-bit gray), with a tiny compressed body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1024)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body)
            + _png_chunk(b"IEND", b""))


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ValueError, match=f"{path}: file not found"):
        load_image(path)
    with pytest.raises(ValueError, match="not a file"):
        load_image(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{path}: empty file"):
        load_image(path)
    with pytest.raises(ValueError, match="<bytes>: empty"):
        load_image(b"")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(ValueError, match=f"{path}: not an image"):
        load_image(str(path))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, photo, fmt):
    buf = io.BytesIO()
    photo(120, 90).save(buf, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match=f"{path}: truncated or corrupt"):
        load_image(path)
    with pytest.raises(ValueError, match="<bytes>: truncated or corrupt"):
        load_image(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_truncated_file_is_refused_even_when_pillow_was_told_to_accept_them(tmp_path, photo,
                                                                          monkeypatch):
    """lmms-eval sets Pillow's LOAD_TRUNCATED_IMAGES at import; our loader still refuses."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    buf = io.BytesIO()
    photo(120, 90).save(buf, format="PNG")
    cut = buf.getvalue()[: len(buf.getvalue()) // 2]
    with pytest.raises(ValueError, match="<bytes>: truncated or corrupt"):
        load_image(cut)
    with pytest.raises(ValueError, match="<PIL image>: truncated or corrupt"):
        load_image(Image.open(io.BytesIO(cut)))
    assert load_image(buf.getvalue()).size == (120, 90)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the other library's setting is left as it was


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(30000, 30000))
    assert path.stat().st_size < 5000
    start = time.perf_counter()
    message = f"{path}: 30000x30000 = 900000000 pixels, more than the limit of 89478485"
    with pytest.raises(ValueError, match=message):
        load_image(path)
    assert time.perf_counter() - start < 5  # nothing was decoded


def test_max_pixels_is_checked_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_png_header_only(400, 300))  # the body is too short: decoding would fail
    with pytest.raises(ValueError, match="400x300 = 120000 pixels, more than the limit of 1000"
                       r".*raise the model config's max_image_pixels"):
        load_image(path, max_pixels=1000)


def test_zero_sized_image(tmp_path):
    with pytest.raises(ValueError, match="<PIL image>: zero-sized"):
        load_image(Image.new("RGB", (0, 4)))
    path = tmp_path / "zero.png"
    path.write_bytes(_png_header_only(0, 10))
    with pytest.raises(ValueError, match=f"{path}: "):
        load_image(path)


def test_wrong_source_type():
    with pytest.raises(ValueError, match="int"):
        load_image(42)


# ----------------------------------------------------------------------------- loading: modes

def test_sources_path_bytes_and_pil_agree(tmp_path, photo):
    img = photo(40, 30)
    path = tmp_path / "a.png"
    img.save(path)
    for source in (path, str(path), path.read_bytes(), img):
        out = load_image(source)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(img))


def _rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(load_image(img)).astype(int)


def test_gray_and_bilevel_modes():
    assert _rgb(Image.new("L", (4, 4), 77))[0, 0].tolist() == [77, 77, 77]
    assert _rgb(Image.new("1", (4, 4), 1))[0, 0].tolist() == [255, 255, 255]


def test_alpha_is_composited_on_white():
    assert _rgb(Image.new("RGBA", (4, 4), (255, 0, 0, 0)))[0, 0].tolist() == [255, 255, 255]
    assert _rgb(Image.new("RGBA", (4, 4), (255, 0, 0, 255)))[0, 0].tolist() == [255, 0, 0]
    half = _rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 128)))[0, 0]
    assert np.all(np.abs(half - 127) <= 1)
    assert _rgb(Image.new("LA", (4, 4), (0, 0)))[0, 0].tolist() == [255, 255, 255]
    for premultiplied, straight in (("La", "LA"), ("RGBa", "RGBA")):
        img = Image.new(straight, (4, 4), (90,) * (len(straight) - 1) + (128,)).convert(premultiplied)
        assert img.mode == premultiplied
        assert np.all(np.abs(_rgb(img)[0, 0] - _rgb(img.convert(straight))[0, 0]) <= 1)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0  # index 0 (blue) is transparent
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    out = np.asarray(load_image(path)).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [0, 255, 0]


def test_cmyk():
    out = _rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0)))
    assert out[0, 0].tolist() == [255, 0, 0]


def test_16_bit_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    path = tmp_path / "g16.png"
    img.save(path)
    for source in (img, path):
        assert np.asarray(load_image(source))[0, :, 0].tolist() == [0, 128, 255]


def test_32_bit_int_and_float_modes():
    ints = Image.fromarray(np.array([[0, 1000, 70000]], dtype=np.int32))
    assert ints.mode == "I"
    assert np.asarray(load_image(ints))[0, :, 0].tolist() == [0, 4, 255]  # min-max
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert np.asarray(load_image(unit))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-1.0, 0.0, 1.0, np.nan]], dtype=np.float32))
    assert np.asarray(load_image(wide))[0, :, 0].tolist() == [0, 128, 255, 128]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # a red top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display rotated 90 degrees clockwise
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    assert np.asarray(out)[2, 17].tolist()[0] > 200  # the red corner is now top-right


def test_animated_gif_gives_first_frame_with_warning(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.warns(UserWarning, match="animated image; using the first frame"):
        out = load_image(path)
    assert np.asarray(out)[0, 0].tolist() == [255, 0, 0]


def test_lazily_opened_corrupt_pil_image(photo):
    data = _png_bytes(photo(120, 90))
    lazy = Image.open(io.BytesIO(data[: len(data) // 2]))  # header read, pixels not yet
    with pytest.raises(ValueError, match="<PIL image>: truncated or corrupt"):
        load_image(lazy)
