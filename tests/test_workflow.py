"""The everyday workflow through the real CLI: train -> OUT/model/ -> every --model command reads
the run folder, saying which model it picked."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import cli, cli_env, error_lines, make_photo
from tilevlm.weights import run_folder

def train_args(steps: int = 3) -> list[str]:
    return ["train", "--preset", "tiny", "--data", "synthetic", "--steps", str(steps),
            "--batch-size", "2", "--warmup-steps", "1", "--eval-every", "0", "--eval-batches",
            "1", "--val-size", "2", "--train-size", "64", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("workflow") / "run"
    done = cli(*train_args(), "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    make_photo(80, 60).save(path)
    return path


def test_train_writes_a_shareable_model(run_dir):
    model = run_dir / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in model.iterdir()}
    assert not list(model.glob("optimizer*")) and not list(run_dir.glob(".tmp-*"))
    assert (run_dir / "checkpoint-3" / "optimizer.safetensors").is_file()


def test_generate_reads_a_run_folder_and_says_which_model(run_dir, image):
    done = cli("generate", "--model", str(run_dir), "--image", str(image), "--prompt", "colour?",
               "--max-new-tokens", "2", "--device", "cpu", "--threads", "1")
    assert done.returncode == 0, done.stderr
    assert f"using its final model {run_dir / 'model'}" in done.stderr


def test_a_run_folder_without_model_gives_its_latest_checkpoint(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "model")
    done = cli("eval", "--model", str(copy), "--data", "synthetic", "--n", "2", "--batch-size", "2",
               "--max-new-tokens", "2", "--threads", "1")
    assert done.returncode == 0, done.stderr
    assert f"using its latest checkpoint {copy / 'checkpoint-3'}" in done.stderr
    assert json.loads(done.stdout)["n"] == 2  # the report on stdout, nothing in the checkpoint
    assert not list((copy / "checkpoint-3").glob("eval-*"))


def test_train_continues_from_a_run_folder(run_dir, tmp_path):
    done = cli("train", "--model", str(run_dir), "--data", "synthetic", "--steps", "1",
               "--batch-size", "2", "--warmup-steps", "0", "--eval-every", "0", "--val-size", "2",
               "--eval-batches", "1", "--no-progress", "--threads", "1", "--out", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    assert "using its final model" in done.stderr and (tmp_path / "b" / "model").is_dir()


def test_a_missing_model_is_one_line_and_exit_2(tmp_path):
    done = cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert done.returncode == 2 and len(error_lines(done)) == 1
    assert "not found" in done.stderr


@pytest.mark.parametrize("argv", [("demo", "--threads", "-1"),
                                  ("train", "--preset", "tiny", "--data", "synthetic",
                                   "--out", "x", "--threads", "0"),
                                  ("eval", "--model", "x", "--data", "synthetic", "--threads", "0"),
                                  ("bench", "--threads", "0")])
def test_threads_below_one_is_one_line_and_exit_2(argv, tmp_path):
    done = cli(*argv, cwd=tmp_path)
    assert done.returncode == 2 and error_lines(done) == ["tilevlm " + argv[0] + ": error: "
                                                          "--threads must be >= 1, got " + argv[-1]]
    assert not (tmp_path / "x").exists()


def test_ctrl_c_still_writes_the_model(tmp_path):
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-m", "tilevlm.cli", *train_args(100_000), "--out",
                              str(out)],
                             env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while not step_losses_written(out) and time.monotonic() < deadline:
            assert child.poll() is None, child.communicate()[1]
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert (out / "model" / "config.json").is_file() and run_folder.find_latest(out) is not None


def step_losses_written(out: Path) -> bool:
    metrics = out / "metrics.jsonl"
    return metrics.is_file() and '"loss"' in metrics.read_text()


def test_warmup_longer_than_the_run_is_one_line_and_exit_2(tmp_path):
    done = cli("train", "--preset", "tiny", "--data", "synthetic", "--steps", "30", "--out",
               str(tmp_path / "run"), "--threads", "1", "--warmup-steps", "50")
    assert done.returncode == 2 and len(error_lines(done)) == 1
    assert "warmup_steps (50) is larger than steps (30)" in done.stderr
    assert not (tmp_path / "run").exists()


def test_the_default_warmup_fits_a_short_run(tmp_path):
    """Without --warmup-steps a run shorter than ten times the default warms up for a tenth of
    it, so its learning rate still decays."""
    from tilevlm.cli import build_parser
    from tilevlm.commands.train import train_config

    def warmup(*steps: str) -> int:
        args = build_parser().parse_args(["train", "--preset", "tiny", "--data", "synthetic",
                                          "--out", str(tmp_path), *steps])
        return train_config(args).warmup_steps

    assert warmup("--steps", "30") == 3 and warmup("--steps", "5000") == 50
    assert warmup("--steps", "30", "--warmup-steps", "7") == 7


@pytest.mark.parametrize("flags", [["--no-progress"], ["--progress"]])  # stderr is a pipe here
def test_a_log_without_a_drawn_bar_shows_the_loss(flags, tmp_path):
    argv = [a for a in train_args(4) if a != "--no-progress"]
    done = cli(*argv, *flags, "--log-every", "2", "--save-every", "0", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if ": loss " in line]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert "\r" not in done.stderr


def test_inspect_takes_a_model_and_counts_image_tokens_as_generate_does(run_dir, image, tmp_path):
    png = tmp_path / "tiles.png"
    shown = cli("inspect", str(image), "--model", str(run_dir), "--save-png", str(png))
    assert shown.returncode == 0, shown.stderr
    tokens = int(shown.stdout.split("image tokens: ")[1].split()[0])
    assert f"model:        {run_dir}" in shown.stdout and "tiles:        10" in shown.stdout
    done = cli("generate", "--model", str(run_dir), "--image", str(image), "--prompt", "colour?",
               "--max-new-tokens", "1", "--threads", "1")
    assert done.returncode == 0, done.stderr
    assert f"/ {tokens} image), 10 tiles" in done.stderr
    from PIL import Image

    with Image.open(png) as figure:  # the original beside the tiles and the thumbnail
        assert figure.width > 3 * 160


def test_python_m_tilevlm_and_version():
    from tilevlm import __version__

    done = subprocess.run([sys.executable, "-m", "tilevlm", "--version"], env=cli_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"tilevlm {__version__}"


def test_every_option_has_help_and_one_default():
    from tilevlm.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for name, parser in commands.items():
        missing = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
        assert not missing, f"{name}: options without help: {missing}"
        text = parser.format_help()
        assert not any(f"(default: {v})" in text for v in ("None", "False", "")), name
        assert all(chunk.count("(default:") <= 1 for chunk in text.split("\n  -")), name


def test_a_missing_data_file_says_not_found(tmp_path, hf_tokenizer_dir):
    done = cli("train", "--preset", "tiny", "--data", str(tmp_path / "llava.json"), "--tokenizer",
               str(hf_tokenizer_dir), "--out", str(tmp_path / "run"), "--steps", "1", "--warmup-steps", "0")
    assert done.returncode == 2 and len(error_lines(done)) == 1
    assert f"{tmp_path / 'llava.json'}: not found" in done.stderr
