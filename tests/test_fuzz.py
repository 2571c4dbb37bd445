"""Property tests (hypothesis) for the image pipeline, the processor and `load_image`.

- any size (1 px to strips), mode and aspect ratio: the grid follows `tile_grid`, the tiles
  reassemble the resized image exactly, and the processor's token count equals the contract,
  `image_prompt_tokens`, and the length the data pipeline measures from headers;
- any byte string, and mutated valid PNG / JPEG / GIF / WebP / TIFF files: `load_image` returns an
  RGB image or raises ValueError, nothing else (no other exception, no hang);
- real JPEG / PNG / WebP / TIFF files with EXIF whose header or EXIF bytes are mutated: the
  header pass and the decoder give a size and an image or the named refusal; `tilevlm inspect`
  on a seeded set of them exits 0 or with one line; a training stream over good and mutated
  images counts exactly the bad ones in an epoch, and a real training run over them completes.

`max_examples` is kept small so the file runs in well under 30 s on two cores.
"""

from __future__ import annotations

import io
import itertools
import json
import struct
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from tilevlm import preset
from tilevlm.special_tokens import IMAGE_TOKEN, grid_token
from tilevlm.data.lengths import SampleMeter, image_size
from tilevlm.data.skips import SkipSample
from tilevlm.preprocessing.decoding import ImageLoadError
from tilevlm.preprocessing.image import ImageTransform, load_image, tile_grid, tiles_per_image
from tilevlm.preprocessing.processor import Processor, count_image_tokens, image_prompt_tokens

from helpers import SMALL, assert_refused, records, run_tilevlm
from reference import normalize, reassemble_tiles, to_tensor

FAST = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
MODES = ("RGB", "RGBA", "L", "LA", "P", "P+alpha", "1", "I;16", "I", "F", "CMYK")
CONFIGS = {
    "tiny": preset("tiny"),  # 32-px tiles, up to 3x3 + global
    "tiny_no_global": preset("tiny", use_global_tile=False),
    "tiny_max_side": preset("tiny", resize_to_max_side_len=True),
}


def synthetic_image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    if mode == "P+alpha":
        img = img.convert("P")
        img.info["transparency"] = 0
        return img
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-5, 100_000, (height, width), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.random((height, width), dtype=np.float32))
    return img.convert(mode)


sizes = st.one_of(
    st.tuples(st.integers(1, 200), st.integers(1, 200)),  # anything small
    st.tuples(st.integers(1, 4), st.integers(200, 3000)),  # tall strips
    st.tuples(st.integers(200, 3000), st.integers(1, 4)),  # wide strips
)


# ----------------------------------------------------------------------------- image pipeline
@FAST
@given(size=sizes, mode=st.sampled_from(MODES), name=st.sampled_from(sorted(CONFIGS)),
       seed=st.integers(0, 2**16))
def test_tiles_follow_the_grid_and_reassemble_the_resized_image(size, mode, name, seed):
    config = CONFIGS[name]
    width, height = size
    img = load_image(synthetic_image(width, height, mode, seed))
    assert img.mode == "RGB" and img.size == (width, height)
    transform = ImageTransform(config)
    tiles, grid = transform(img)
    t = config.vit_img_size
    assert grid == tile_grid(width, height, t, config.max_img_size, config.resize_to_max_side_len)
    n_h, n_w = grid
    assert 1 <= n_h <= config.max_tiles_per_side and 1 <= n_w <= config.max_tiles_per_side
    n_tiles = tiles_per_image(grid, config.use_global_tile)
    assert tiles.shape == (n_tiles, 3, t, t) and tiles.dtype == torch.float32
    resized, thumb, _ = transform.resize(img)
    assert resized.size == (n_w * t, n_h * t)
    expected = normalize(to_tensor(resized), config)  # (3, n_h*T, n_w*T)
    first = n_tiles - n_h * n_w
    torch.testing.assert_close(reassemble_tiles(tiles[first:], grid), expected,
                               atol=1e-6, rtol=0)
    assert (thumb is not None) == (first == 1)
    # The long side keeps its place: a landscape image never gets more rows than columns.
    if width > 2 * height:
        assert n_w >= n_h
    if height > 2 * width:
        assert n_h >= n_w


# ----------------------------------------------------------------------------- processor contract
@pytest.fixture(scope="module")
def processors(tiny_tokenizer):
    return {name: Processor(config, tiny_tokenizer) for name, config in CONFIGS.items()}


@FAST
@given(images=st.lists(st.tuples(sizes, st.sampled_from(MODES)), min_size=0, max_size=3),
       name=st.sampled_from(sorted(CONFIGS)), text=st.text(max_size=40),
       seed=st.integers(0, 2**16))
def test_processor_token_count_is_the_contract(processors, images, name, text, seed):
    assume("<image>" not in text and "<|" not in text and "<row_" not in text)
    processor = processors[name]
    config = processor.config
    pil = [synthetic_image(w, h, mode, seed + i) for i, ((w, h), mode) in enumerate(images)]
    content = "".join("<image>" for _ in pil) + text
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}]
    batch = processor([messages], [pil])
    ids = batch["input_ids"][0].tolist()
    tokens_per_image = [image_prompt_tokens(img.width, img.height, config) for img in pil]
    tiles = batch["n_tiles"][0]
    assert tiles == sum(tiles_per_image(g, config.use_global_tile) for g in batch["grids"][0])
    assert sum(tokens_per_image) == tiles * (1 + config.mp_image_token_length)
    assert ids.count(processor.tokenizer.image_token_id) == tiles * config.mp_image_token_length
    assert ids.count(processor.tokenizer.image_token_id) == sum(
        count_image_tokens(img.width, img.height, config) for img in pil)
    markers = [i for i in ids if i == processor.tokenizer.global_image_token_id
               or processor.tokenizer.grid_token_id(1, 1) <= i
               < processor.tokenizer.grid_token_id(1, 1) + config.grid_side ** 2]
    assert len(markers) == tiles
    sample = {"messages": messages, "images": pil}
    assert SampleMeter(processor).measure(sample) == (len(ids), tiles)
    for grid, img in zip(batch["grids"][0], pil):  # grid tokens name every cell, row-major
        cells = processor.tokenizer.encode("".join(
            grid_token(r, c) for r in range(1, grid[0] + 1) for c in range(1, grid[1] + 1)))
        assert all(cell in ids for cell in cells)
    if pil:
        assert batch["pixel_values"].shape[0] == tiles
    else:
        assert batch["pixel_values"] is None and IMAGE_TOKEN not in processor.decode(ids)


# ----------------------------------------------------------------------------- load_image on bytes
def _only_result_or_value_error(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = load_image(data)
        except ValueError:
            return
    assert img.mode == "RGB" and img.width > 0 and img.height > 0


@settings(FAST, max_examples=200)
@given(data=st.binary(min_size=0, max_size=2048))
def test_random_bytes_are_an_image_or_a_value_error(data):
    _only_result_or_value_error(data)


def _noise_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _encoded(fmt: str) -> bytes:
    img = _noise_image(19, 27, seed=1)
    buf = io.BytesIO()
    if fmt == "GIF":
        img = img.convert("P")
    if fmt == "TIFF16":
        img, fmt = Image.fromarray((np.arange(19 * 27).reshape(19, 27) * 97).astype(np.uint16)), \
            "TIFF"
    if fmt == "EXIF-JPEG":
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(buf, "JPEG", exif=exif)
        return buf.getvalue()
    img.save(buf, fmt)
    return buf.getvalue()


VALID = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "EXIF-JPEG", "GIF", "WEBP", "TIFF",
                                         "TIFF16", "BMP")}


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(("flip", "delete", "insert", "truncate")))
        if kind == "flip":
            data[pos] = draw(st.integers(0, 255))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos:]
    return bytes(data)


@settings(FAST, max_examples=400)
@given(data=mutated())
def test_mutated_image_files_are_an_image_or_a_value_error(data):
    _only_result_or_value_error(data)


# ----------------------------------------------------------------------------- headers and EXIF
def _with_exif(fmt: str) -> bytes:
    """A real file with a full EXIF block (orientation, strings, a date), as phones write."""
    img = _noise_image(21, 33, seed=2)
    exif = Image.Exif()
    for tag, value in ((0x0112, 6), (0x010F, "Maker"), (0x0110, "Model"), (0x0131, "soft"),
                       (0x0132, "2020:01:01 00:00:00")):
        exif[tag] = value
    buf = io.BytesIO()
    if fmt.startswith("TIFF"):  # the EXIF tags are the file's own IFD
        img.save(buf, "TIFF", tiffinfo=dict(exif), compression="tiff_lzw" if fmt == "TIFF-LZW"
                 else None)
    else:
        img.save(buf, fmt, exif=exif)
    return buf.getvalue()


def _exif_block(fmt: str, data: bytes) -> tuple[int, int]:
    """(start, end) of the EXIF bytes (TIFF: the header and first IFD)."""
    if fmt == "JPEG":
        at = data.index(b"Exif\x00\x00")
        return at, at + struct.unpack(">H", data[at - 2:at])[0] - 2
    if fmt == "PNG":
        at = data.index(b"eXIf")
        return at + 4, at + 4 + struct.unpack(">I", data[at - 4:at])[0]
    if fmt == "WEBP":
        at = data.index(b"EXIF")
        return at + 8, at + 8 + struct.unpack("<I", data[at + 4:at + 8])[0]
    return 0, min(len(data), 512)


EXIF_FILES = {fmt: _with_exif(fmt) for fmt in ("JPEG", "PNG", "WEBP", "TIFF", "TIFF-LZW")}
REGIONS = {fmt: [(0, 64), _exif_block(fmt, data)] for fmt, data in EXIF_FILES.items()}


def mutate_header(fmt: str, edits: list[tuple[int, float, int]]) -> bytes:
    """EXIF_FILES[fmt] with bytes in its header or EXIF block replaced: (region, where in it,
    new byte) per edit."""
    data = bytearray(EXIF_FILES[fmt])
    for region, where, value in edits:
        start, end = REGIONS[fmt][region % 2]
        data[start + int(where * (end - start - 1))] = value
    return bytes(data)


header_edits = st.lists(st.tuples(st.integers(0, 1), st.floats(0, 1), st.integers(0, 255)),
                        min_size=1, max_size=6)


def _header_pass_and_decode(data: bytes) -> bool:
    """Whether the header pass and the decoder both take `data`; a refusal is always the named
    kind (SkipSample image_error, ImageLoadError), any other exception fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image_size(data, 10**8)
            img = load_image(data)
        except SkipSample as e:
            assert e.reason == "image_error"
            return False
        except ImageLoadError:
            return False
    assert img.mode == "RGB" and img.width > 0 and img.height > 0
    return True


@settings(FAST, max_examples=300)
@given(fmt=st.sampled_from(sorted(EXIF_FILES)), edits=header_edits)
def test_mutated_headers_and_exif_are_an_image_or_a_bad_image(fmt, edits):
    _header_pass_and_decode(mutate_header(fmt, edits))


def _fixed_mutations(per_format: int) -> dict[str, bytes]:
    """A seeded set of header/EXIF mutations of every format (the same files every run)."""
    rng = np.random.default_rng(14)
    out = {}
    for fmt in sorted(EXIF_FILES):
        for k in range(per_format):
            edits = [(int(rng.integers(2)), float(rng.random()), int(rng.integers(256)))
                     for _ in range(int(rng.integers(1, 5)))]
            out[f"{fmt.lower()}-{k}"] = mutate_header(fmt, edits)
    return out


def test_inspect_on_mutated_files_is_a_result_or_one_line(tmp_path):
    for name, data in _fixed_mutations(1).items():
        path = tmp_path / f"{name}.img"
        path.write_bytes(data)
        done = run_tilevlm("inspect", path, timeout=60)
        if done.returncode == 0:
            assert "grid:" in done.stdout and "Traceback" not in done.stderr
            assert all(": warning: " in line for line in done.stderr.splitlines()), done.stderr
        else:
            assert_refused(done, "inspect", str(path))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on the mutated files
def test_training_over_good_and_mutated_images_counts_the_bad_ones(model_dir, tmp_path):
    """One epoch of the stream counts exactly the undecodable images; a real run completes."""
    from tilevlm.data.readers.dataset import open_dataset
    from tilevlm.data.stream import StreamOptions, TrainStream
    from tilevlm.preprocessing.tokenizer import load_tokenizer

    root = tmp_path / "images"
    root.mkdir()
    files = {f"good-{k}.png": _encoded("PNG") for k in range(4)}
    files.update({f"{name}.img": data for name, data in _fixed_mutations(3).items()})
    for name, data in files.items():
        (root / name).write_bytes(data)
    n_bad = sum(not _header_pass_and_decode(data) for data in files.values())
    assert 0 < n_bad < len(files)
    turns = [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "A photo."}]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"image": n, "conversations": turns}) + "\n"
                            for n in sorted(files)))

    config = preset("tiny", **SMALL)
    processor = Processor(config, load_tokenizer(model_dir, grid_side=config.grid_side))
    stream = TrainStream(lambda rank, world: open_dataset(data, rank=rank, world_size=world),
                         processor, StreamOptions(batch_size=4, block_size=len(files)))
    epoch = itertools.takewhile(lambda b: b.stream.epoch == 0, iter(stream))
    skipped = Counter()
    for batch in epoch:
        skipped.update(batch.skipped)
    assert skipped == {"image_error": n_bad}

    config_file = tmp_path / "small.json"
    config.to_json(config_file)
    out = tmp_path / "run"
    done = run_tilevlm("train", "--config", config_file, "--tokenizer", model_dir, "--data", data,
                       "--out", out, "--steps", 3, "--batch-size", 4, "--eval-batches", 0,
                       "--no-progress", timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert set(records(out)[-1]["skipped"]) == {"image_error"}
