"""End to end: VLMs assembled from tiny HF SigLIP + Llama directories and from a nanoVLM directory
run on a generated photo through the processor, via `tilevlm build` and `tilevlm generate`."""

import shutil

import pytest
import torch

from tilevlm.cli import main
from tilevlm.weights.loading import load_for_inference

from helpers import LLAMA_VOCAB, cli, error_lines, make_llama, make_photo, make_siglip, write_nanovlm


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, hf_tokenizer_dir):
    root = tmp_path_factory.mktemp("hf")
    make_siglip(root / "siglip")
    make_llama(root / "llama", tie=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_tokenizer_dir / name, root / "llama" / name)
    make_photo(200, 130).save(root / "photo.jpg")
    return root


def _forward_on_photo(model_dir, photo):
    model, processor = load_for_inference(model_dir, "cpu")
    conv = [[{"role": "user", "content": "<image>What is in row 1, column 2?"},
             {"role": "assistant", "content": "a red circle"}]]
    batch = processor(conv, [[photo]])
    assert batch["pixel_values"].shape[0] == 1 + 3 * 2  # tiny preset: 200x130 -> 2x3 + global
    with torch.no_grad():
        out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"])
    assert torch.isfinite(out.loss)
    return model, processor


def test_build_from_hf_dirs_then_forward_and_generate(hf_dirs, tmp_path, capsys):
    out = tmp_path / "vlm"
    code = main(["build", "--siglip", str(hf_dirs / "siglip"), "--llm", str(hf_dirs / "llama"),
                 "--preset", "tiny", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    model, processor = _forward_on_photo(out, hf_dirs / "photo.jpg")
    # The base tokenizer had no ChatML markers: they were added to the base vocabulary and the
    # embedding grew with them, so every special token keeps the id the tokenizer gives it.
    assert processor.tokenizer.base_vocab_size == LLAMA_VOCAB + 2
    assert model.image_token_id == processor.tokenizer.image_token_id
    code = main(["generate", "--model", str(out), "--image", str(hf_dirs / "photo.jpg"),
                 "--prompt", "Describe.", "--max-new-tokens", "3"])
    assert code == 0


def test_build_from_nanovlm_then_forward(hf_dirs, tmp_path, tiny_tokenizer, capsys):
    from tilevlm import preset
    from tilevlm.model.vlm import VisionLanguageModel

    source = VisionLanguageModel(preset("tiny", lm_base_vocab_size=tiny_tokenizer.base_vocab_size))
    write_nanovlm(tmp_path / "nano", source)
    tiny_tokenizer.save(tmp_path / "tok")
    code = main(["build", "--nanovlm", str(tmp_path / "nano"), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "vlm")])
    assert code == 0, capsys.readouterr().err
    model, _ = _forward_on_photo(tmp_path / "vlm", hf_dirs / "photo.jpg")
    assert model.cfg.image_mean == (0.0, 0.0, 0.0)  # nanoVLM feeds [0, 1] pixels


def test_build_errors_are_one_line(tmp_path, hf_dirs, capsys):
    assert main(["build", "--out", str(tmp_path / "x")]) == 2
    assert main(["build", "--nanovlm", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert main(["build", "--siglip", str(tmp_path / "none"), "--llm", str(hf_dirs / "llama"),
                 "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_build_keeps_the_presets_grid_in_the_siglip_tile(hf_dirs):
    from tilevlm.config import preset
    from tilevlm.weights.huggingface import hf_config

    cfg = hf_config(hf_dirs / "siglip", hf_dirs / "llama", preset("split_896"))  # 4 x 224 px
    assert (cfg.vit_img_size, cfg.max_img_size, cfg.max_tiles_per_side) == (32, 128, 4)


def test_build_never_overwrites_unasked(hf_dirs, tmp_path):
    out = tmp_path / "vlm"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["build", "--siglip", str(hf_dirs / "siglip"), "--llm", str(hf_dirs / "llama"),
            "--preset", "tiny", "--out", str(out)]
    done = cli(*argv)
    assert done.returncode == 2 and len(error_lines(done)) == 1 and "--force" in done.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert cli(*argv, "--force").returncode == 0 and (out / "config.json").is_file()
