"""The roots of issue 14's fixes, in process (the command-line view is tests/test_hostile_cli.py):
the JSON reader, confinement, the decoding boundary, config and option bounds, whole-checkpoint
checks with fallback, weight dtypes, the stream's usable check, the character bound, parquet
pages and the order of the final save."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import SMALL, make_model, png, quick, write_parquet
from tilevlm import preset
from tilevlm.data.batch import TrainBatch
from tilevlm.data.readers.save_to_disk import arrow_files
from tilevlm.data.lengths import SampleMeter
from tilevlm.data.readers.llava import llava_sample
from tilevlm.data.readers.parquet import ParquetReader
from tilevlm.data.readers.rows import safe_image_path
from tilevlm.data.skips import SkipSample
from tilevlm.data.sources import named_dataset, synthetic_tokenizer
from tilevlm.data.batch import StreamPosition
from tilevlm.device import resolve_device
from tilevlm.files import check_regular_file, confined, parse_json, read_json
from tilevlm.preprocessing import image as image_module
from tilevlm.preprocessing.image import load_image
from tilevlm.preprocessing.processor import Processor
from tilevlm.weights import run_folder
from tilevlm.training.feed import require_usable
from tilevlm.training.loop import train
from tilevlm.training.train_config import TrainConfig
from tilevlm.weights.safetensors_files import read_shapes, weight_files


# ----------------------------------------------------------------------------- JSON, files
@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "JSON nested more than 64 levels deep"),
    ("[" * 900 + "]" * 900, "JSON nested more than 64 levels deep"),  # parses, still refused
    (b"\xff{}", "not UTF-8"),
    ('{"a": [1, 2,', "not valid JSON"),
])
def test_json_problems_name_the_file(tmp_path, text, message):
    path = tmp_path / "x.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        read_json(path)


def test_json_of_the_wrong_type_and_a_fifo(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1]")
    with pytest.raises(ValueError, match="expected a JSON object, got a list"):
        read_json(path)
    assert read_json(path, list, "a list") == [1]
    assert parse_json('{"a": ' * 60 + "1" + "}" * 60, "s")  # deep but within the limit
    os.mkfifo(tmp_path / "pipe.json")
    with pytest.raises(ValueError, match="not a regular file"):  # never opened: no hang
        check_regular_file(tmp_path / "pipe.json")


def test_confined_resolves_symlinks(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside.png"
    root.mkdir()
    outside.write_bytes(png(8, 8))
    (root / "inner.png").write_bytes(png(8, 8))
    (root / "out.png").symlink_to(outside)
    (root / "in.png").symlink_to(root / "inner.png")
    assert confined(root, "in.png") == root / "inner.png"
    for name in ("out.png", "../outside.png", str(outside), "a\x00b", 3):
        with pytest.raises(ValueError):
            confined(root, name)
    with pytest.raises(SkipSample, match="outside the image root") as info:
        safe_image_path(root, "out.png")
    assert info.value.reason == "path_escape"


# ----------------------------------------------------------------------------- decoding boundary
def _raiser_inside_pillow(error: Exception):
    """A function whose code says it lives in PIL/Image.py: it stands for a decoder failure."""
    namespace = {"error": error}
    exec(compile("def getexif(self):\n    raise error\n", Image.__file__, "exec"), namespace)
    return namespace["getexif"]


@pytest.mark.parametrize("error", [struct.error("unpack requires a buffer of 4 bytes"),
                                   OverflowError("Python int too large"), KeyError(7),
                                   RecursionError(), MemoryError()])
def test_any_failure_inside_pillow_is_a_bad_image(monkeypatch, error):
    monkeypatch.setattr(Image.Image, "getexif", _raiser_inside_pillow(error))
    with pytest.raises(ValueError, match=f"^<bytes>: .*{type(error).__name__}"):
        load_image(png(20, 10))


def test_a_bug_in_our_own_code_is_not_called_a_bad_image(monkeypatch):
    def bug(img):
        raise TypeError("a bug in tilevlm")

    monkeypatch.setattr(image_module, "_to_rgb", bug)
    with pytest.raises(TypeError, match="a bug in tilevlm"):
        load_image(png(20, 10))


# ----------------------------------------------------------------------------- configs, options
@pytest.mark.parametrize("change, message", [
    (dict(max_img_size=640000), "max_img_size must be <= 16384"),
    (dict(grid_side=10000), "grid_side must be <= 64"),
    (dict(vit_n_blocks=10**6), "vit_n_blocks must be <= 256"),
    (dict(image_std=[1.0, float("inf"), 1.0]), "image_std must be a list of 3 finite numbers"),
    (dict(image_mean="555"), "image_mean must be a list of 3 finite numbers"),
])
def test_config_upper_bounds_and_pixel_statistics(change, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny", **change)


@pytest.mark.parametrize("change", [dict(lr_vision=float("nan")), dict(grad_clip=float("inf")),
                                    dict(eval_max_new_tokens=-3), dict(adam_beta2=1.0),
                                    dict(min_lr_ratio=float("nan"))])
def test_train_config_refuses_nan_and_out_of_range(change):
    with pytest.raises(ValueError, match="TrainConfig"):
        TrainConfig(**change)


@pytest.mark.parametrize("name", ["meta", "tpu", "cuda:x", ""])
def test_devices_tilevlm_does_not_run_on(name):
    with pytest.raises(ValueError, match="device"):
        resolve_device(name)


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def small(tiny_tokenizer):
    tokenizer, config = synthetic_tokenizer(preset("tiny", **SMALL))
    return config, Processor(config, tokenizer)


@pytest.fixture(scope="module")
def saved_run(small, tmp_path_factory) -> Path:
    config, processor = small
    out = tmp_path_factory.mktemp("run") / "run"
    data = named_dataset("synthetic", "train", 16, config)
    train(make_model(config), processor, data, None, quick(out, steps=2, save_every=1,
                                                           batch_size=2))
    return out


def test_a_truncated_rng_file_falls_back_to_the_previous_checkpoint(saved_run, tmp_path, caplog):
    run = Path(shutil.copytree(saved_run, tmp_path / "run"))
    rng = run / "checkpoint-2" / "rng.safetensors"
    rng.write_bytes(rng.read_bytes()[:-3])
    assert run_folder.find_latest(run) == run / "checkpoint-1"
    assert "checkpoint-2 is not an intact checkpoint (rng.safetensors" in caplog.text
    with pytest.raises(ValueError, match="not an intact checkpoint"):
        run_folder.find_latest(run / "checkpoint-2")  # named directly: no silent fallback


def test_a_checkpoint_linked_from_outside_the_run_is_not_used(saved_run, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-1").parent.mkdir()
    shutil.copytree(saved_run / "checkpoint-1", run / "checkpoint-1")
    (run / "checkpoint-7").symlink_to(saved_run / "checkpoint-2")
    assert run_folder.find_latest(run) == run / "checkpoint-1"


@pytest.mark.parametrize("edit, message", [
    (lambda s: {**s, "state": {**s["state"], "step": "2"}}, "TrainState.step must be an integer"),
    (lambda s: {**s, "state": {**s["state"], "skipped": [1]}}, "TrainState.skipped must be"),
    (lambda s: {k: v for k, v in s.items() if k != "rng"}, "'rng' must be a JSON object"),
])
def test_trainer_state_problems_are_named(saved_run, tmp_path, edit, message):
    ckpt = Path(shutil.copytree(saved_run / "checkpoint-2", tmp_path / "checkpoint-2"))
    path = ckpt / "trainer_state.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    assert message in run_folder.checkpoint_problem(ckpt)


def test_the_final_checkpoint_is_written_before_validation_can_fail(small, tmp_path,
                                                                    monkeypatch):
    config, processor = small

    def failing(*args, **kwargs):
        raise ValueError("validation failed")

    monkeypatch.setattr("tilevlm.training.loop.evaluate", failing)
    out = tmp_path / "run"
    data = named_dataset("synthetic", "train", 8, config)
    val = named_dataset("synthetic", "validation", 4, config)
    with pytest.raises(ValueError, match="validation failed"):
        train(make_model(config), processor, data, val, quick(out, steps=2, batch_size=2,
                                                              eval_batches=1))
    assert run_folder.find_latest(out) == out / "checkpoint-2"


# ----------------------------------------------------------------------------- weights
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.int32])
def test_weight_dtypes_are_checked_from_the_header(tmp_path, dtype):
    save_file({"w": torch.zeros(2, 2, dtype=dtype)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="tensor w has dtype"):
        read_shapes(tmp_path)


def test_weight_map_values_must_be_names(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": [1]}}))
    with pytest.raises(ValueError, match="must be a file name string"):
        weight_files(tmp_path)


# ----------------------------------------------------------------------------- data
@pytest.mark.parametrize("state, message", [
    ({"_data_files": "data.arrow"}, "'_data_files' must be a non-empty list"),
    ({"_data_files": [["data.arrow"]]}, "must be a non-empty string"),
    ([1], "expected a JSON object"),
])
def test_state_json_of_the_wrong_shape(tmp_path, state, message):
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=message):
        arrow_files(tmp_path)


def test_a_turn_whose_role_is_not_a_string_is_malformed(tmp_path):
    record = {"conversations": [{"from": ["human"], "value": "hi"},
                                {"from": "gpt", "value": "ok"}]}
    with pytest.raises(SkipSample) as info:
        llava_sample(record, tmp_path, "x")
    assert info.value.reason == "malformed"


def test_huge_text_is_refused_before_it_is_tokenized(small, monkeypatch):
    _, processor = small
    meter = SampleMeter(processor)
    monkeypatch.setattr(processor.tokenizer, "encode_batch", None)  # must not be called
    messages = [{"role": "user", "content": "x" * (meter.max_chars + 1)},
                {"role": "assistant", "content": "ok"}]
    with pytest.raises(SkipSample, match="characters of text") as info:
        meter.text_tokens(messages)
    assert info.value.reason == "too_long"


def _batch(epoch: int, usable: bool) -> TrainBatch:
    inputs = {"input_ids": torch.zeros(1, 2, dtype=torch.long)} if usable else None
    return TrainBatch(inputs=inputs, skipped={} if usable else {"image_error": 1},
                      stream=StreamPosition(epoch, 0, 1))


def test_a_whole_pass_without_a_usable_batch_is_refused():
    good = list(require_usable(iter([_batch(0, False), _batch(0, True), _batch(1, False)]),
                               StreamPosition(), 0))
    assert len(good) == 3
    with pytest.raises(ValueError, match=r"no sample of a whole pass.*image_error': 2"):
        list(require_usable(iter([_batch(0, False), _batch(0, False), _batch(1, False)]),
                            StreamPosition(), 0))
    # Started mid-epoch: that epoch was not seen whole, the next one decides.
    late = [_batch(0, False), _batch(1, False), _batch(1, False)]
    assert len(list(require_usable(iter(late), StreamPosition(0, 0, 3), 0))) == 3


def test_a_corrupt_parquet_page_behind_a_valid_footer_is_a_counted_skip(tmp_path):
    path = write_parquet(tmp_path, 24)
    group = pq.ParquetFile(path).metadata.row_group(1)
    start = min(group.column(i).data_page_offset for i in range(group.num_columns))
    data = bytearray(path.read_bytes())
    data[start:start + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    reader = ParquetReader([path])
    rows = list(reader)
    assert len(rows) + reader.skips.counts["malformed"] == 24 and reader.skips.total > 0
