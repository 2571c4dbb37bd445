"""Hostile inputs through the real command line (docs/reliability.md; issue 14's cases).

Each case runs `python -m tilevlm.cli` in a child process with a timeout, so nothing can hang
the suite, and stderr is exactly what a user sees (log lines included): a refusal is exit 2 and
one line, a bad sample inside a dataset is a counted skip and the run completes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_refused, png, records, run_tilevlm, train_args

DEEP = "[" * 100_000 + "]" * 100_000  # far deeper than any JSON parser's recursion
QUESTION = [{"from": "human", "value": "<image>What is it?"}, {"from": "gpt", "value": "A photo."}]


# ----------------------------------------------------------------------------- helpers
def _resume(run: Path, *extra: object) -> list[object]:
    return ["train", "--resume", run, "--data", "synthetic", "--out", run, "--steps", 3,
            "--batch-size", 2, "--train-size", 20, "--eval-batches", 0, "--no-progress", *extra]


def _generate(model: Path, image: Path, *extra: object) -> list[object]:
    return ["generate", "--model", model, "--image", image, "--prompt", "<image>What?",
            "--max-new-tokens", 2, "--device", "cpu", *extra]


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ----------------------------------------------------------------------------- train: refused
@pytest.mark.parametrize("config_text, message", [
    (DEEP, "nested more than 64 levels deep"),
    (b"\xff\xfe{}", "not UTF-8"),
    ('{"lm_n_blocks": 200000}', "lm_n_blocks must be <= 512"),
])
def test_bad_config_files_are_one_line(tmp_path, config_text, message):
    config = tmp_path / "config.json"
    if isinstance(config_text, bytes):
        config.write_bytes(config_text)
    else:
        config.write_text(config_text)
    done = run_tilevlm(*train_args(config, tmp_path / "out"), timeout=60)
    assert_refused(done, "train", str(config), message)


def test_config_missing_or_a_directory_is_an_input_error(tmp_path):
    assert_refused(run_tilevlm(*train_args(tmp_path / "none.json", tmp_path / "o")), "train",
                   "file not found")
    assert_refused(run_tilevlm(*train_args(tmp_path, tmp_path / "o")), "train",
                   "not a regular file")


@pytest.mark.parametrize("extra, message", [
    (("--device", "tpu"), "--device 'tpu' is not a device"),
    (("--compile", "nosuchbackend"), "not a torch.compile backend"),
    (("--lr-decoder", "nan"), "lr_decoder must be a finite number"),
    (("--eval-max-new-tokens", "0"), "eval_max_new_tokens must be >= 1"),
    (("--eval-max-new-tokens", "100000"), "leaves no room for a prompt"),
])
def test_bad_training_options_are_refused_before_step_1(small_config, tmp_path, extra,
                                                         message):
    out = tmp_path / "out"
    assert_refused(run_tilevlm(*train_args(small_config, out, *extra)), "train", message)
    assert not list(out.glob("checkpoint-*"))


def test_out_an_existing_file_is_an_input_error(small_config, tmp_path):
    out = tmp_path / "taken"
    out.write_text("a file")
    assert_refused(run_tilevlm(*train_args(small_config, out)), "train", "is not a directory")


def test_val_data_nested_too_deep_is_one_line(small_config, model_dir, image, tmp_path):
    val = tmp_path / "val.json"
    val.write_text(DEEP)
    done = run_tilevlm(*train_args(small_config, tmp_path / "out", "--val-data", val,
                                    "--eval-batches", 1))
    assert_refused(done, "train", str(val), "nested more than 64 levels deep")


@pytest.mark.parametrize("state, dataset_dict, message", [
    ({"_data_files": [{"filename": "../../etc/passwd"}]}, None, "is outside the directory"),
    (None, {"splits": {"train": 1}}, "'splits' must be a list of names"),
])
def test_save_to_disk_files_of_the_wrong_shape(small_config, model_dir, tmp_path, state,
                                               dataset_dict, message):
    data = tmp_path / "saved"
    data.mkdir()
    (data / "dataset_info.json").write_text("{}")
    if state is not None:
        (data / "state.json").write_text(json.dumps(state))
    if dataset_dict is not None:
        (data / "dataset_dict.json").write_text(json.dumps(dataset_dict))
    done = run_tilevlm("train", "--config", small_config, "--tokenizer", model_dir, "--data", data,
                       "--out", tmp_path / "out", "--steps", 1, "--no-progress")
    assert_refused(done, "train", message)


# ----------------------------------------------------------------------------- train: bad samples
def _llava(root: Path, lines: list[str]) -> Path:
    data = root / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


def _record(image: str, text: str = "<image>What is it?", **extra: object) -> str:
    turns = [{"from": "human", "value": text}, {"from": "gpt", "value": "A photo."}]
    return json.dumps({"image": image, "conversations": turns, **extra})


def test_bad_samples_are_counted_and_the_run_completes(small_config, model_dir, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "good.png").write_bytes(png(40, 30))
    os.mkfifo(root / "fifo.png")  # would block the header pass forever if it were opened
    (root / "cut.png").write_bytes(png(40, 30)[:120])  # a valid header, truncated pixels
    outside = tmp_path / "outside.png"
    outside.write_bytes(png(40, 30, seed=5))
    (root / "link.png").symlink_to(outside)  # a link out of the image root
    lines = [_record("good.png")] * 6 + [
        _record("fifo.png"), _record("cut.png"), _record("link.png"),
        json.dumps({"image": "good.png", "conversations": [{"from": ["human"], "value": "x"}]}),
        DEEP,
        _record("good.png", "<image>" + "word " * 600_000),  # 3 MB: refused by its length
        _record("good.png", "<image><image>"),  # two placeholders, one image
        _record("good.png", "<image><|image|> is text"),  # used: a token's spelling stays text
    ]
    data = _llava(root, lines)
    out = tmp_path / "out"
    done = run_tilevlm("train", "--config", small_config, "--tokenizer", model_dir, "--data",
                       data, "--out", out, "--steps", 4, "--batch-size", 4, "--shuffle-block", 16,
                       "--eval-batches", 0, "--no-progress", timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    skipped = records(out)[-1]["skipped"]
    expected = {"image_error": 2, "path_escape": 1, "malformed": 2, "too_long": 1,
                "placeholder_mismatch": 1}
    assert all(skipped.get(k, 0) >= n for k, n in expected.items()), skipped
    assert (out / "checkpoint-4").is_dir()


def test_data_no_sample_of_which_can_be_used_is_refused_not_spun(small_config, model_dir,
                                                                  tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "cut.png").write_bytes(png(40, 30)[:120])
    (root / "good.png").write_bytes(png(40, 30))
    data = _llava(root, [_record("cut.png")] * 3 + [_record("good.png", "<image><image>")] * 3)
    done = run_tilevlm("train", "--config", small_config, "--tokenizer", model_dir, "--data",
                       data, "--out", tmp_path / "out", "--steps", 2, "--batch-size", 2,
                       "--eval-batches", 0, "--no-progress", timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("tilevlm train: error: rank 0: no sample of a whole pass")
    assert "Traceback" not in done.stderr
    assert all("skipping" in line or "training" in line or "lm_base_vocab_size" in line
               for line in lines[:-1]), lines


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("damage", ["truncate optimizer", "remove rng"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(run_copy, damage):
    last = run_copy / "checkpoint-2"
    if damage.startswith("truncate"):
        path = last / f"{damage.split()[1]}.safetensors"
        path.write_bytes(path.read_bytes()[:-7])
    else:
        (last / "rng.safetensors").unlink()
    done = run_tilevlm(*_resume(run_copy))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checkpoint-2 is not an intact checkpoint" in done.stderr
    assert f"resumed from {run_copy / 'checkpoint-1'} at step 1" in done.stderr


def test_latest_a_directory_is_an_input_error(run_copy):
    (run_copy / "latest").unlink()
    (run_copy / "latest").mkdir()
    done = run_tilevlm(*_resume(run_copy))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("tilevlm train: error: ")
    assert "latest: exists and is not a regular file" in done.stderr
    assert "Traceback" not in done.stderr


def test_latest_pointing_into_another_run_is_not_followed(finished_run, run_copy, tmp_path):
    other = Path(shutil.copytree(finished_run, tmp_path / "other-run"))
    shutil.rmtree(run_copy / "checkpoint-2")
    (run_copy / "latest").write_text("../other-run/checkpoint-2\n")
    done = run_tilevlm(*_resume(run_copy))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "expected a checkpoint-N name" in done.stderr
    assert f"resumed from {run_copy / 'checkpoint-1'}" in done.stderr
    assert str(other) not in done.stderr


@pytest.mark.parametrize("edit, message", [
    (lambda s: {**s, "state": {**s["state"], "colour": 1}}, "unknown TrainState fields: colour"),
    (lambda s: {**s, "state": {k: v for k, v in s["state"].items() if k != "step"}},
     "TrainState.step is missing"),
])
def test_an_edited_trainer_state_is_one_line(run_copy, edit, message):
    path = run_copy / "checkpoint-2" / "trainer_state.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    assert_refused(run_tilevlm(*_resume(run_copy / "checkpoint-2")), "train",
                   "trainer_state.json", message)


# ----------------------------------------------------------------------------- generate, chat, eval
@pytest.mark.parametrize("change, message", [
    ({"image_mean": float("nan")}, "image_mean must be a list of 3 finite numbers"),
    ({"grid_side": 10000}, "grid_side must be <= 64"),
])
def test_bad_model_config_values_are_one_line(model_copy, image, change, message):
    _edit_json(model_copy / "config.json", **change)
    assert_refused(run_tilevlm(*_generate(model_copy, image)), "generate", message)


def test_generate_errors_are_one_line_without_log_lines(model_copy, image, tmp_path):
    # The tokenizer used to log an INFO line before the error.
    done = run_tilevlm(*_generate(model_copy, tmp_path / "missing.png"))
    assert_refused(done, "generate", "file not found")
    (model_copy / "tokenizer_config.json").write_text(DEEP)
    done = run_tilevlm(*_generate(model_copy, image))
    assert_refused(done, "generate", "tokenizer_config.json", "nested more than 64")


def test_nan_temperature_is_one_line(model_dir, image):
    assert_refused(run_tilevlm(*_generate(model_dir, image, "--temperature", "nan")), "generate",
                   "temperature must be a finite number")


@pytest.mark.parametrize("extra, message", [
    (("--temperature", "nan"), "temperature must be a finite number"),
    (("--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
])
def test_bad_chat_options_are_refused_at_the_start(model_dir, extra, message):
    done = run_tilevlm("chat", "--model", model_dir, "--device", "cpu", *extra, timeout=60)
    assert_refused(done, "chat", message)


def test_eval_errors_are_one_line(model_copy):
    (model_copy / "tokenizer_config.json").write_bytes(b"\xff\xfe")
    done = run_tilevlm("eval", "--model", model_copy, "--data", "synthetic", "--n", 2,
                       "--device", "cpu")
    assert_refused(done, "eval", "tokenizer_config.json: not UTF-8")


def test_weights_of_a_non_float_dtype_are_refused(model_copy, image):
    path = model_copy / "model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].to(torch.int64)
    save_file(tensors, path)
    assert_refused(run_tilevlm(*_generate(model_copy, image)), "generate", key, "dtype I64")


def test_a_sharded_index_must_name_files_inside_its_directory(model_copy, image):
    (model_copy / "model.safetensors").unlink()
    index = model_copy / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "../elsewhere/model.safetensors"}}))
    assert_refused(run_tilevlm(*_generate(model_copy, image)), "generate",
                   "shard '../elsewhere/model.safetensors' is outside")


# ----------------------------------------------------------------------------- inspect
def test_inspect_save_png_under_a_file_and_a_fifo_image(image, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    done = run_tilevlm("inspect", image, "--save-png", blocker / "tiles.png", timeout=60)
    assert_refused(done, "inspect", "is not a directory")
    os.mkfifo(tmp_path / "pipe.png")
    assert_refused(run_tilevlm("inspect", tmp_path / "pipe.png", timeout=60), "inspect",
                   "not a file")
