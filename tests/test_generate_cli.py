"""`tilevlm generate` and `tilevlm chat` on a tiny saved model and generated images."""

import io

import numpy as np
import pytest
from PIL import Image

from tilevlm.cli import main

from helpers import make_photo


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    make_photo(120, 80).save(d / "photo.png")
    make_photo(64, 64).convert("L").save(d / "gray.png")
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(d / "deep16.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(d / "one.png")
    make_photo(6000, 100).save(d / "panorama.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return d


@pytest.mark.parametrize("name", ["photo.png", "gray.png", "deep16.png", "one.png", "panorama.png"])
def test_generate_cli_streams_an_answer_and_stats(model_dir, images, name, capsys):
    code = main(["generate", "--model", str(model_dir), "--image", str(images / name),
                 "--prompt", "What colour is the shape in row 1, column 1?",
                 "--max-new-tokens", "6", "--device", "cpu"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.endswith("\n")
    assert "tokens/s" in out.err and "time to first token" in out.err
    assert "image)" in out.err and "tiles" in out.err


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_generate_cli_low_precision_weights(model_dir, images, weights, monkeypatch, capsys):
    from tilevlm.inference import quantize

    stored = []
    original = quantize.inference_weights
    monkeypatch.setattr(quantize, "inference_weights",
                        lambda model, w: stored.append(w) or original(model, w))
    code = main(["generate", "--model", str(model_dir), "--image", str(images / "photo.png"),
                 "--prompt", "What colour?", "--max-new-tokens", "4", "--device", "cpu",
                 "--weights", weights])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert stored == [weights] and "tokens/s" in out.err


def test_generate_cli_two_images_and_sampling(model_dir, images, capsys):
    code = main(["generate", "--model", str(model_dir), "--image", str(images / "photo.png"),
                 "--image", str(images / "one.png"), "--prompt", "Compare <image> with <image>.",
                 "--max-new-tokens", "4", "--temperature", "0.8", "--top-p", "0.9", "--seed", "1"])
    assert code == 0


def test_generate_cli_refuses_a_corrupt_image_with_one_line(model_dir, images, capsys):
    code = main(["generate", "--model", str(model_dir), "--image", str(images / "corrupt.png"),
                 "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "corrupt.png" in err


def test_generate_cli_bad_model_dir_and_options(tmp_path, images, model_dir, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "hi", "--top-p", "0"]) == 2


def test_chat_keeps_turns_and_images(model_dir, images, monkeypatch, capsys):
    script = "\n".join([f"/image {images / 'photo.png'}", "What is in row 1, column 1?",
                        "And the colour?", "/image /no/such/file.png", "/reset", "hello", "/quit"])
    monkeypatch.setattr("sys.stdin", io.StringIO(script + "\n"))
    monkeypatch.setattr("sys.argv", ["tilevlm"])
    code = main(["chat", "--model", str(model_dir), "--max-new-tokens", "4"])
    out = capsys.readouterr()
    assert code == 0
    assert out.out.count("model> ") == 3
    assert "attached" in out.out and "conversation cleared" in out.out
    assert "error:" in out.out  # the missing image was refused, the chat went on


def test_chat_system_prompt_opens_every_conversation(model_dir, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr("tilevlm.commands.chat.stream_answer",
                        lambda model, processor, messages, images, args: seen.append(
                            [dict(m) for m in messages]) or "ok")
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/reset\nagain\n"))
    assert main(["chat", "--model", str(model_dir), "--system", "Be brief."]) == 0
    system = {"role": "system", "content": "Be brief."}
    assert seen == [[system, {"role": "user", "content": "hi"}],
                    [system, {"role": "user", "content": "again"}]]
