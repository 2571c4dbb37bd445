"""A nanoVLM-born model gets nanoVLM's inputs in tilevlm, end to end.

The references are written here from nanoVLM's code (4e0c096), independent of tilevlm's: its
prompt recipe (`get_image_string`, the chat template, a transformers tokenizer given the extra
tokens, as `get_tokenizer` does) for the token ids; its DynamicResize rule for the grids
(tests/reference.py; the pixels are compared in test_image.py). And the plain base tokenizer
nanoVLM starts from works through the real CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tilevlm import preset
from tilevlm.weights.loading import load_processor
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.special_tokens import GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, grid_token

from helpers import make_photo, write_base_tokenizer, write_nanovlm
from reference import nanovlm_resized_size

TILE, MAX_SIDE, TOKENS_PER_TILE = 32, 96, 4  # the tiny preset
EXTRA_TOKENS = {"image_token": IMAGE_TOKEN, "global_image_token": GLOBAL_IMAGE_TOKEN,
                **{f"r{r}c{c}": grid_token(r, c) for r in range(1, 9) for c in range(1, 9)}}


def nanovlm_image_string(grids: list[tuple[int, int]], tokens_per_tile: int) -> str:
    """nanoVLM's get_image_string for a tokenizer with a global image token."""
    out = ""
    for index, (n_h, n_w) in enumerate(grids):
        if len(grids) > 1:
            out += f"<image: {index}>"
        out += GLOBAL_IMAGE_TOKEN + IMAGE_TOKEN * tokens_per_tile
        if (n_h, n_w) == (1, 1):
            continue
        for i in range(n_h):
            for j in range(n_w):
                out += EXTRA_TOKENS[f"r{i + 1}c{j + 1}"] + IMAGE_TOKEN * tokens_per_tile
    return out


@pytest.fixture(scope="module")
def nano(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nanovlm")
    torch.manual_seed(0)
    write_nanovlm(root / "ckpt", VisionLanguageModel(preset("tiny")))
    write_base_tokenizer(root / "tok", preset("tiny").lm_base_vocab_size)
    make_photo(300, 170).save(root / "photo.png")
    return root


@pytest.mark.parametrize("sizes", [[(30, 20)], [(96, 60)], [(1280, 720)], [(96, 96), (40, 30)]])
def test_prompt_ids_are_nanovlms(nano, sizes):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(nano / "tok", extra_special_tokens=EXTRA_TOKENS)
    grids = [tuple(s // TILE for s in nanovlm_resized_size(w, h, TILE, MAX_SIDE)[::-1])
             for w, h in sizes]
    prompt = "What colour is the shape?"
    messages = [{"role": "user", "content": nanovlm_image_string(grids, TOKENS_PER_TILE) + prompt}]
    encoded = hf.apply_chat_template([messages], tokenize=True, add_generation_prompt=True)
    expected = encoded["input_ids"][0] if isinstance(encoded, dict) or hasattr(encoded, "keys") \
        else encoded[0]

    processor = load_processor(nano / "ckpt", nano / "tok")
    batch = processor([[{"role": "user", "content": prompt}]], [[make_photo(w, h) for w, h in sizes]],
                      add_generation_prompt=True)
    assert batch["grids"][0] == grids
    assert batch["input_ids"][0].tolist() == list(expected)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "tilevlm.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_build_and_generate_with_the_plain_base_tokenizer(nano, tmp_path):
    built = _cli("build", "--nanovlm", str(nano / "ckpt"), "--tokenizer", str(nano / "tok"),
                 "--out", str(tmp_path / "model"))
    assert built.returncode == 0, built.stderr
    for model in (nano / "ckpt", tmp_path / "model"):
        extra = ["--tokenizer", str(nano / "tok")] if model == nano / "ckpt" else []
        run = _cli("generate", "--model", str(model), *extra, "--image", str(nano / "photo.png"),
                   "--prompt", "What is it?", "--max-new-tokens", "3", "--device", "cpu")
        assert run.returncode == 0, run.stderr
        assert "time to first token" in run.stderr


def test_loading_for_inference_reads_the_tokenizer_once(nano, monkeypatch):
    """load_for_inference checks a nanoVLM model's special-token ids on the Processor's tokenizer
    instead of loading the tokenizer directory a second time."""
    import tilevlm.preprocessing.tokenizer as tokenizer_module
    import tilevlm.weights.loading as loading_module
    import tilevlm.weights.nanovlm as nanovlm_module
    from tilevlm.weights.loading import load_for_inference

    loads = []
    real = tokenizer_module.load_tokenizer

    def counting(*args, **kwargs):
        loads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenizer_module, "load_tokenizer", counting)
    monkeypatch.setattr(nanovlm_module, "load_tokenizer", counting)
    monkeypatch.setattr(loading_module, "load_tokenizer", counting)
    model, processor = load_for_inference(nano / "ckpt", device="cpu", tokenizer_dir=nano / "tok")
    assert len(loads) == 1 and processor.tokenizer.image_token_id == model.cfg.image_token_id
