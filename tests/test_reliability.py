"""Reliability: bad input, faults, and nothing lost (docs/reliability.md).

Every bad input gives a correct result or a clear error (a ValueError naming the input and the
reason; on the command line exit code 2 and ONE line on stderr), found before any heavy work.
Training survives SIGKILL, Ctrl-C and a full disk with the previous checkpoint intact and resumes
with the same data order. Only safetensors and JSON are ever read.

Covered elsewhere, not repeated here:
- SIGKILL during a checkpoint write: tests/test_train.py::test_checkpoint_complete_or_absent_after_sigkill
- in-process Ctrl-C then exact resume: tests/test_train.py::test_resume_equals_uninterrupted
- dataset paths escaping the image root (`../../etc/passwd`, absolute paths):
  tests/test_readers.py::test_safe_image_path_refuses_escapes,
  ::test_llava_json_with_an_image_root, ::test_path_images_in_parquet_may_not_escape
- every image mode's pixel rule: tests/test_image.py
Property tests (fuzzing) are in tests/test_fuzz.py.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tilevlm import preset
from tilevlm.training import checkpoints
from tilevlm.weights import run_folder
from tilevlm.weights.native import load_pretrained
from tilevlm.cli import main
from tilevlm.config import VLMConfig
from tilevlm.data.collate import VLMCollator
from tilevlm.data.lengths import LengthFilter
from tilevlm.data.readers.dataset import open_dataset as open_files
from tilevlm.data.sources import named_dataset, synthetic_tokenizer
from tilevlm.preprocessing.image import load_image
from tilevlm.weights.loading import load_for_inference
from tilevlm.model.vision import VisionEncoder
from tilevlm.preprocessing.processor import Processor, image_string
from tilevlm.preprocessing.tokenizer import train_bpe_tokenizer
from tilevlm.training.loop import TrainConfig, train

from helpers import (SMALL, assert_one_line_error, make_model as _model, make_photo, quick,
                     step_losses as _losses)

PROMPT = "What colour is the shape in row 1, column 1?"


# ============================================================================ helpers, images
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (RGB) and whose pixel data is a few bytes: a
    decompression bomb when the header is large (a 30000x30000 'image' in under 200 bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + _chunk(b"IEND", b""))


def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (40, 24), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0,
                   **extra)


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)  # 0 blue (transparent), 1 green
    img.putpixel((1, 1), 1)
    return encoded(img, "PNG", transparency=0)


def _exif_rotated() -> bytes:
    img = Image.new("RGB", (60, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # a red top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 20 wide, 60 tall
    return encoded(img, "JPEG", exif=exif, quality=95)


def _truncated(fmt: str) -> bytes:
    data = encoded(make_photo(120, 90), fmt)
    return data[: len(data) // 2]


BAD_IMAGES = {  # name -> (bytes, the reason the error must give)
    "empty.jpg": (b"", "empty"),
    "notes.jpg": (b"this is a text file, not a picture\n", "not an image"),
    "cut.jpg": (_truncated("JPEG"), "truncated or corrupt"),
    "cut.png": (_truncated("PNG"), "truncated or corrupt"),
    "bomb.png": (png_header_only(30000, 30000), "30000x30000 = 900000000 pixels, more than the "
                 "limit of 89478485"),
    "zero.png": (png_header_only(0, 0), "not an image"),
}

GOOD_IMAGES = {  # name -> bytes; pixels are checked in test_unusual_images_load_correctly
    "one.png": encoded(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
    "tall_strip.png": encoded(Image.new("RGB", (1, 20000), (10, 200, 10)), "PNG"),
    "wide_strip.png": encoded(Image.new("RGB", (20000, 1), (10, 10, 200)), "PNG"),
    "anim.gif": _animated("GIF"),
    "anim.webp": _animated("WEBP"),
    "gradient16.tif": encoded(Image.fromarray(
        (np.arange(256, dtype=np.uint16)[None].repeat(4, 0) * 257)), "TIFF"),
    "float.tif": encoded(Image.fromarray(
        np.linspace(0, 1, 256, dtype=np.float32)[None].repeat(4, 0)), "TIFF"),
    "cmyk.jpg": encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95),
    "palette_alpha.png": _palette_with_transparency(),
    "rotated.jpg": _exif_rotated(),
}
ANIMATED = {"anim.gif", "anim.webp"}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("reliability_images")
    for name, (data, _) in BAD_IMAGES.items():
        (d / name).write_bytes(data)
    for name, data in GOOD_IMAGES.items():
        (d / name).write_bytes(data)
    make_photo(90, 60).save(d / "photo.png")
    return d


@pytest.fixture
def copy_of(model_dir, tmp_path):
    """A fresh copy of the tiny model directory to damage."""
    def make() -> Path:
        target = tmp_path / "model_copy"
        shutil.copytree(model_dir, target)
        return target
    return make


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if weights are read or the vision encoder runs."""
    def forbidden(*args, **kwargs):
        raise AssertionError("heavy work started before the input was checked")

    monkeypatch.setattr("tilevlm.weights.native.read_safetensors", forbidden)
    monkeypatch.setattr(VisionEncoder, "forward", forbidden)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def generate_args(model: Path, *images: Path, prompt: str = PROMPT, new: int = 2) -> list[str]:
    args = ["generate", "--model", str(model), "--prompt", prompt, "--max-new-tokens", str(new),
            "--device", "cpu"]
    for image in images:
        args += ["--image", str(image)]
    return args


# ============================================================================ 1. bad images
@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images_are_refused_everywhere_with_the_file_and_the_reason(
        name, image_dir, model_dir, capsys, no_heavy_work):
    path = image_dir / name
    reason = BAD_IMAGES[name][1]
    with pytest.raises(ValueError) as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: ") and reason in str(info.value)
    with pytest.raises(ValueError, match="<bytes>: "):
        load_image(path.read_bytes())

    code, out, err = run_cli(capsys, "inspect", str(path))
    assert code == 2 and out == ""
    assert_one_line_error(err, "inspect", str(path), reason)

    code, out, err = run_cli(capsys, *generate_args(model_dir, path))  # before any weight
    assert code == 2 and out == ""
    assert_one_line_error(err, "generate", str(path), reason)


def test_decompression_bomb_is_small_on_disk_and_refused_without_decoding(image_dir):
    path = image_dir / "bomb.png"
    assert path.stat().st_size < 1000
    start = time.perf_counter()
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(path)
    assert time.perf_counter() - start < 2  # 900 M pixels were never allocated


def _pixels(name: str, image_dir: Path) -> np.ndarray:
    return np.asarray(load_image(image_dir / name)).astype(int)


def test_unusual_images_load_correctly(image_dir):
    assert _pixels("one.png", image_dir).tolist() == [[[200, 10, 10]]]
    assert _pixels("tall_strip.png", image_dir).shape == (20000, 1, 3)
    assert _pixels("wide_strip.png", image_dir).shape == (1, 20000, 3)
    for name in ANIMATED:  # the first frame, and a warning that says so
        with pytest.warns(UserWarning, match="animated image; using the first frame"):
            assert _pixels(name, image_dir)[0, 0].tolist() == [255, 0, 0]
    gradient = _pixels("gradient16.tif", image_dir)[0, :, 0]  # 16-bit: rescaled, not clipped
    assert gradient.tolist() == list(range(256))
    ramp = _pixels("float.tif", image_dir)[0, :, 0]  # float in [0, 1]: times 255
    assert ramp[0] == 0 and ramp[-1] == 255 and np.all(np.diff(ramp) >= 0)
    assert np.all(np.abs(_pixels("cmyk.jpg", image_dir)[4, 4] - [255, 0, 0]) <= 3)
    palette = _pixels("palette_alpha.png", image_dir)  # transparent index on white
    assert palette[0, 0].tolist() == [255, 255, 255] and palette[1, 1].tolist() == [0, 255, 0]
    rotated = _pixels("rotated.jpg", image_dir)  # EXIF 6: the red corner is now top-right
    assert rotated.shape == (60, 20, 3)
    assert rotated[3, 16, 0] > 200 and rotated[3, 3, 2] > 200


@pytest.mark.parametrize("name", sorted(GOOD_IMAGES))
def test_unusual_images_through_inspect_and_generate(name, image_dir, model_dir, capsys):
    path = image_dir / name
    code, out, err = run_cli(capsys, "inspect", str(path), "--preset", "tiny")
    assert code == 0, err
    warnings_expected = 1 if name in ANIMATED else 0
    assert len(err.strip().splitlines()) == warnings_expected, err
    if warnings_expected:
        assert err.startswith(f"tilevlm inspect: warning: {path}: animated image")
    if name == "rotated.jpg":
        assert "original:     20x60" in out
    if name == "tall_strip.png":
        assert "grid:         3x1" in out  # the long side fills the grid, the short one 1 tile

    code, out, err = run_cli(capsys, *generate_args(model_dir, path))
    assert code == 0, err
    assert "tokens/s" in err and "Traceback" not in err


def test_bad_images_in_training_data_are_skipped_and_counted(image_dir, tiny_config,
                                                             tiny_tokenizer):
    processor = Processor(tiny_config, tiny_tokenizer)
    turn = [{"role": "user", "content": "<image>What is it?"},
            {"role": "assistant", "content": "A picture."}]
    good = [n for n in sorted(GOOD_IMAGES) if n not in ANIMATED] + ["photo.png"]
    names = sorted(BAD_IMAGES) + good
    samples = [{"messages": turn, "images": [(image_dir / n).read_bytes()]} for n in names]
    batch = VLMCollator(processor)(samples)
    assert batch.n_skipped == len(BAD_IMAGES)
    assert batch.inputs["input_ids"].shape[0] == len(good)
    assert len(batch.info["grids"]) == len(good)


def test_bad_images_in_a_dataset_file_are_skipped_and_counted(image_dir, tmp_path, tiny_config,
                                                              tiny_tokenizer):
    """A LLaVA file: headers that do not parse (or bombs) are counted by the length filter before
    any decoding; images with a valid header but bad pixels by the collator."""
    for name in list(BAD_IMAGES) + ["photo.png"]:
        shutil.copy(image_dir / name, tmp_path / name)
    conv = [{"from": "human", "value": "<image>What is it?"}, {"from": "gpt", "value": "A photo."}]
    records = [{"image": name, "conversations": conv} for name in sorted(BAD_IMAGES)]
    records.append({"image": "photo.png", "conversations": conv})
    (tmp_path / "data.json").write_text(json.dumps(records))
    processor = Processor(tiny_config, tiny_tokenizer)
    reader = open_files(tmp_path / "data.json")
    kept = list(LengthFilter(reader, processor))
    header_bad = reader.skips.counts["image_error"]
    batch = VLMCollator(processor)(kept)
    assert header_bad + batch.n_skipped == len(BAD_IMAGES)
    assert header_bad >= 3  # empty, text, bomb, 0x0: refused from the header
    assert batch.inputs["input_ids"].shape[0] == 1


# ============================================================================ 2. text and shapes
@pytest.mark.parametrize("prompt, n_images, words", [
    ("<image> and <image>?", 1, "2 <image> placeholders in the text but 1 images"),
    ("<image> only", 2, "1 <image> placeholders in the text but 2 images"),
])
def test_placeholder_count_mismatch_fails_before_the_model_loads(
        prompt, n_images, words, image_dir, model_dir, capsys, no_heavy_work):
    images = [image_dir / "photo.png"] * n_images
    code, _, err = run_cli(capsys, *generate_args(model_dir, *images, prompt=prompt))
    assert code == 2
    assert_one_line_error(err, "generate", words)


def test_prompt_longer_than_lm_max_length_fails_before_the_model_loads(model_dir, capsys,
                                                                        no_heavy_work):
    code, _, err = run_cli(capsys, *generate_args(model_dir, prompt="row column " * 400))
    assert code == 2
    assert_one_line_error(err, "generate", "more than lm_max_length 512", "never truncated")


def test_prompt_plus_new_tokens_beyond_positions_fails_before_the_model_loads(
        model_dir, capsys, no_heavy_work):
    code, _, err = run_cli(capsys, *generate_args(model_dir, new=1020))
    assert code == 2
    assert_one_line_error(err, "generate", "--max-new-tokens (1020)",
                          "lm_max_position_embeddings (1024)")


def test_grid_larger_than_the_tokenizers_grid_tokens():
    tokenizer = train_bpe_tokenizer(["a b c"] * 5, vocab_size=300, grid_side=2)
    config = preset("tiny", lm_base_vocab_size=300)  # up to 3x3 tiles
    with pytest.raises(ValueError, match="2x2 grid tokens cannot name the 3-tile sides"):
        Processor(config, tokenizer)
    with pytest.raises(ValueError, match="a 3x1 tile grid does not fit the tokenizer's 2x2"):
        image_string(tokenizer, (3, 1), 16, True)


def test_tokenizer_without_our_special_tokens_is_refused_before_the_weights(
        copy_of, hf_tokenizer_dir, capsys, no_heavy_work):
    model = copy_of()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_tokenizer_dir / name, model / name)
    code, _, err = run_cli(capsys, *generate_args(model))
    assert code == 2
    assert_one_line_error(err, "generate", str(model), "tokenizer and config disagree",
                          "lm_base_vocab_size 512")
    (model / "tokenizer.json").unlink()
    code, _, err = run_cli(capsys, *generate_args(model))
    assert code == 2
    assert_one_line_error(err, "generate", "no tokenizer.json")


@pytest.mark.parametrize("change, words", [
    ({"mp_image_token_length": 50}, "mp_image_token_length must equal"),
    ({"lm_n_heads": 3}, "lm_n_heads must divide lm_hidden_dim"),
    ({"max_img_size": 16}, "max_img_size must be at least one tile"),
    ({"lm_max_length": 4096}, "lm_max_length must be <= lm_max_position_embeddings"),
    ({"grid_side": 2}, "grid_side must cover the largest grid"),
    ({"vit_img_size": "32"}, "vit_img_size must be an integer, got '32'"),
    ({"lm_rms_eps": None}, "lm_rms_eps must be a finite number, got None"),
    ({"vit_inter_dim": -5}, "vit_inter_dim must be > 0"),
    ({"use_global_tile": "yes"}, "use_global_tile must be true or false"),
    ({"image_mean": "gray"}, "image_mean must be a list of 3 finite numbers"),
    ({"colour": 3}, "unknown VLMConfig fields: colour"),
])
def test_contradictory_config_is_refused_before_the_weights(change, words, copy_of, capsys,
                                                            no_heavy_work):
    model = copy_of()
    data = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**data, **change}))
    code, _, err = run_cli(capsys, *generate_args(model))
    assert code == 2
    assert_one_line_error(err, "generate", str(model / "config.json"), words)


def test_checkpoint_vocabulary_that_does_not_match_its_tokenizer(copy_of, capsys, no_heavy_work):
    model = copy_of()
    data = json.loads((model / "config.json").read_text())
    data["lm_base_vocab_size"] = 600  # the weights and the tokenizer have 512
    data["lm_vocab_size"] = 600 + 2 + 64  # consistent in itself
    (model / "config.json").write_text(json.dumps(data))
    code, _, err = run_cli(capsys, *generate_args(model))
    assert code == 2
    assert_one_line_error(err, "generate", "tokenizer and config disagree", "512", "600")


def test_weights_that_do_not_match_the_config_fail_from_the_header(copy_of, capsys,
                                                                   no_heavy_work):
    from safetensors.torch import load_file, save_file

    model = copy_of()
    tensors = load_file(str(model / "model.safetensors"))
    tensors["decoder.token_embedding.weight"] = tensors["decoder.token_embedding.weight"][:-10]
    save_file(tensors, str(model / "model.safetensors"))
    code, _, err = run_cli(capsys, *generate_args(model))  # read_safetensors is never reached
    assert code == 2
    assert_one_line_error(err, "generate", "wrong shapes: decoder.token_embedding.weight "
                          "(checkpoint [568, 128], model [578, 128])")


# ============================================================================ 3. training faults
@pytest.fixture(scope="module")
def small_setup():
    tokenizer, config = synthetic_tokenizer(preset("tiny", **SMALL))
    return config, Processor(config, tokenizer), named_dataset("synthetic", "train", 200, config)


def _quick(out_dir: Path, **overrides) -> TrainConfig:
    """test_train's quick run, saving every 2 steps so a fault has a checkpoint to keep."""
    return quick(out_dir, **{"save_every": 2, **overrides})


@pytest.mark.parametrize("target", ["tilevlm.training.checkpoints.save_file", "tilevlm.weights.native.save_file"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_resumes_exactly(
        target, small_setup, tmp_path, monkeypatch):
    config, processor, data = small_setup
    full = train(_model(config), processor, data, None, _quick(tmp_path / "full"))
    assert full.step == 6

    import importlib

    module_name, attr = target.rsplit(".", 1)
    real = getattr(importlib.import_module(module_name), attr)
    calls = []

    def disk_full(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # the first checkpoint (2 files or 1) goes through, then ENOSPC
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(target, disk_full)
    if target.endswith("native.save_file"):
        calls.append(1)  # one weights file per checkpoint: fail on the second checkpoint
    with pytest.raises(OSError) as info:
        train(_model(config), processor, data, None, _quick(run))
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert run_folder.find_latest(run) == run / "checkpoint-2"
    assert (run / "latest").read_text() == "checkpoint-2\n"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint", ".tmp"))) \
        == ["checkpoint-2"]  # the half-written one is gone
    load_pretrained(run / "checkpoint-2")
    state = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["state"]
    assert state["step"] == 2 and state["position"] == 8

    resumed = train(_model(config, seed=9), processor, data, None, _quick(run), resume_from=run)
    assert resumed.step == 6
    expected, got = _losses(tmp_path / "full"), _losses(run)
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


def test_disk_full_on_the_command_line_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    config_file = tmp_path / "small.json"
    preset("tiny", **SMALL).to_json(config_file)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run"))

    monkeypatch.setattr("tilevlm.training.checkpoints.save_file", disk_full)
    code, _, err = run_cli(capsys, "train", "--config", str(config_file), "--data", "synthetic",
                           "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2",
                           "--warmup-steps", "1", "--train-size", "20", "--eval-batches", "0", "--no-progress")
    assert code == 1
    assert_one_line_error(err, "train", "No space left on device")
    assert run_folder.find_latest(tmp_path / "run") is None
    assert not list((tmp_path / "run").glob(".tmp-ckpt-*"))


def test_disk_full_message_names_the_checkpoint_and_the_one_kept(small_setup, tmp_path,
                                                                 monkeypatch):
    config, processor, data = small_setup
    real, calls = checkpoints.save_file, []

    def disk_full(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr("tilevlm.training.checkpoints.save_file", disk_full)
    with pytest.raises(OSError) as info:
        train(_model(config), processor, data, None, _quick(tmp_path))
    assert "checkpoint-4" in str(info.value) and "checkpoint-2" in str(info.value)


def test_failed_pointer_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == run_folder.LATEST:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        checkpoints.atomic_checkpoint(tmp_path, 1, lambda d: (d / "x").write_text("x"))
    monkeypatch.undo()
    assert not (tmp_path / ".latest.tmp").exists()


SIGINT_CHILD = textwrap.dedent("""
    import sys, time
    from tilevlm.model.vlm import VisionLanguageModel
    delay = float(sys.argv[1])
    forward = VisionLanguageModel.forward
    def slow(self, *args, **kwargs):  # slow steps, so the signal lands mid-run
        time.sleep(delay)
        return forward(self, *args, **kwargs)
    VisionLanguageModel.forward = slow
    from tilevlm.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _train_child(delay: float, *argv: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SIGINT_CHILD, str(delay), "train", *argv],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1",
                                 "PYTHONPATH": str(Path(__file__).parents[1])})


def test_sigint_in_a_real_process_saves_exits_130_and_resumes_with_the_same_data(tmp_path):
    config_file = tmp_path / "small.json"
    preset("tiny", **SMALL).to_json(config_file)
    flags = ["--data", "synthetic", "--train-size", "200", "--steps", "12", "--batch-size", "2",
             "--warmup-steps", "2", "--eval-batches", "0", "--save-every", "0", "--no-progress"]
    run = tmp_path / "run"
    child = _train_child(0.25, "--config", str(config_file), "--out", str(run), *flags,
                         cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            metrics = run / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                break
            assert child.poll() is None, child.communicate()
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    ckpt = run_folder.find_latest(run)
    stopped = int(ckpt.name.split("-")[1])
    assert 2 <= stopped < 12
    state = json.loads((ckpt / "trainer_state.json").read_text())["state"]
    assert state["step"] == stopped and state["position"] == 2 * stopped

    resume = _train_child(0, "--resume", str(run), "--out", str(run), *flags, cwd=tmp_path)
    full = _train_child(0, "--config", str(config_file), "--out", str(tmp_path / "full"), *flags,
                        cwd=tmp_path)
    for proc in (resume, full):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    expected, got = _losses(tmp_path / "full"), _losses(run)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step


# ============================================================================ 5. security
class _CreatesAFile:
    """Unpickling this object creates `path`: proof that a pickle was (not) loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickled_weights_are_refused_and_never_unpickled(name, model_dir, tmp_path, capsys):
    marker = tmp_path / "unpickled"
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    (target / "model.safetensors").unlink()
    (target / name).write_bytes(pickle.dumps(_CreatesAFile(marker)))
    for load in (lambda: load_pretrained(target), lambda: load_for_inference(target, "cpu")):
        with pytest.raises(ValueError, match=f"found {name} but no model.safetensors.*never "
                           "unpickles.*Convert them to safetensors"):
            load()
    code, _, err = run_cli(capsys, *generate_args(target))
    assert code == 2
    assert_one_line_error(err, "generate", name, "safetensors.torch.save_file")
    assert not marker.exists()


def test_a_pickle_named_safetensors_is_not_unpickled(model_dir, tmp_path):
    marker = tmp_path / "unpickled"
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    torch.save({"x": _CreatesAFile(marker)}, target / "model.safetensors")
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        load_pretrained(target)
    assert not marker.exists()


def test_image_size_limits_are_on_by_default(image_dir, tiny_tokenizer):
    limit = 89_478_485
    assert VLMConfig().max_image_pixels == limit
    assert all(preset(name).max_image_pixels == limit for name in
               ("original_small", "split_448", "split_896", "tiny"))
    assert load_image.__defaults__[0] == limit
    bomb = (image_dir / "bomb.png").read_bytes()
    processor = Processor(preset("tiny"), tiny_tokenizer)
    messages = [[{"role": "user", "content": "<image>?"}]]
    with pytest.raises(ValueError, match="sample 0, image 0: <bytes>: 30000x30000"):
        processor(messages, [[bomb]])
    saved = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValueError):
        load_image(bomb)
    assert Image.MAX_IMAGE_PIXELS == saved  # Pillow's own guard is restored after loading
