"""One definition of "image tokens" for every layout (README): the placeholders the tiles'
features replace, tiles x tokens per tile; the markers a layout writes around them (global and
grid tokens, Idefics3's wrappers and row breaks, nanoVLM's `<image: i>` labels) are text.

The processor's count (`count_image_tokens`), generate's and stream_generate's stats, the report
of `eval` and the lines of `inspect`, `generate` and `chat` give the same number, for the
tilevlm, nanovlm and idefics3 layouts.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch

from helpers import make_idefics3, make_photo, run_tilevlm, write_idefics3_tokenizer
from tilevlm import preset
from tilevlm.cli import main
from tilevlm.evaluation.task_run import run_task, task_samples
from tilevlm.evaluation.tasks import get_task
from tilevlm.inference.generation import GenerationStats, generate, stream_generate
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.preprocessing.processor import count_image_tokens, image_prompt_tokens
from tilevlm.weights.loading import load_for_inference
from tilevlm.weights.native import save_pretrained

LAYOUTS = ["tilevlm", "nanovlm", "idefics3"]
SIZES = [(300, 170), (40, 30)]  # a grid with a global tile, and a single tile
STATS = re.compile(r"prompt (\d+) tokens \((\d+) text / (\d+) image\)")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    """Factory: models(layout) -> a saved model directory writing images in that layout."""
    made: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in made:
            directory = tmp_path_factory.mktemp(layout)
            if layout == "idefics3":
                pytest.importorskip("transformers")
                tok = write_idefics3_tokenizer(tmp_path_factory.mktemp("idefics3_tok"))
                make_idefics3(directory, tok, patch=16, tile=64, scale=2)
            else:
                torch.manual_seed(0)
                config = preset("tiny", lm_base_vocab_size=tiny_tokenizer.base_vocab_size,
                                image_token_layout=layout)
                save_pretrained(VisionLanguageModel(config), directory, tokenizer=tiny_tokenizer)
            made[layout] = directory
        return made[layout]

    return get


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("token_images")
    paths = []
    for i, size in enumerate(SIZES):
        paths.append(root / f"img{i}.png")
        make_photo(*size, seed=i).save(paths[-1])
    return paths


def _expected(config, sizes=SIZES) -> int:
    return sum(count_image_tokens(w, h, config) for w, h in sizes)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_processor_generate_and_stream_count_the_placeholders(models, layout):
    model, processor = load_for_inference(models(layout), device="cpu")
    cfg = processor.config
    pictures = [make_photo(*size, seed=i) for i, size in enumerate(SIZES)]
    expected = _expected(cfg)
    assert expected == sum(processor.transform(p)[0].shape[0] for p in pictures) * \
        cfg.mp_image_token_length
    conversations = [[{"role": "user", "content": "<image><image>Compare them."}],
                     [{"role": "user", "content": "<image>What is it?"}]]
    batch = processor(conversations, [pictures, pictures[:1]], padding_side="left",
                      add_generation_prompt=True)
    both = expected + count_image_tokens(*SIZES[0], cfg)
    assert int((batch["input_ids"] == cfg.image_token_id).sum()) == both
    out = generate(model, batch, max_new_tokens=2, tokenizer=processor.tokenizer)
    assert out.stats.image_tokens == both
    assert out.stats.prompt_tokens == int(batch["attention_mask"].sum())
    # the markers are text: more prompt tokens than image tokens, the difference is theirs
    markers = sum(image_prompt_tokens(w, h, cfg, processor.tokenizer) for w, h in SIZES) - expected
    assert markers > 0
    one = processor(conversations[:1], [pictures], padding_side="left", add_generation_prompt=True)
    stats = GenerationStats()
    list(stream_generate(model, one, processor.tokenizer, max_new_tokens=2, stats=stats))
    assert stats.image_tokens == expected and stats.text_tokens == stats.prompt_tokens - expected


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inspect_generate_chat_and_eval_report_the_same_count(models, images, layout, tmp_path,
                                                             monkeypatch, capsys):
    model_dir = models(layout)
    processor = load_for_inference(model_dir, device="cpu")[1]
    one = count_image_tokens(*SIZES[0], processor.config)

    assert main(["inspect", str(images[0]), "--model", str(model_dir)]) == 0
    assert f"image tokens: {one} (" in capsys.readouterr().out

    assert main(["generate", "--model", str(model_dir), "--image", str(images[0]),
                 "--image", str(images[1]), "--prompt", "<image><image>Compare.",
                 "--max-new-tokens", "2"]) == 0
    assert int(STATS.search(capsys.readouterr().err).group(3)) == _expected(processor.config)

    script = f"/image {images[0]}\nWhat is it?\nAnd now?\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", "--model", str(model_dir), "--max-new-tokens", "2"]) == 0
    turns = [int(m.group(3)) for m in STATS.finditer(capsys.readouterr().err)]
    assert turns == [one, one]  # the image stays in the conversation

    rows = [{"question": "What is it?", "answers": ["a photo"], "image": images[0].name}] * 3
    data = tmp_path / "vqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--image-root",
                 str(images[0].parent), "--task", "textvqa", "--out",
                 str(tmp_path / "report.json"), "--batch-size", "2"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["image_tokens"] == 3 * one and report["prompt_tokens"] > 3 * one


def test_eval_library_report_counts_what_generate_read(models, images, tmp_path):
    model, processor = load_for_inference(models("tilevlm"), device="cpu")
    rows = [{"question": f"Question {i}?", "answers": ["x"], "image": images[i % 2].name}
            for i in range(5)]
    data = tmp_path / "vqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("textvqa")
    samples, skips = task_samples(task, data, processor, image_root=images[0].parent)
    report, _ = run_task(model, processor, samples, task, skips, batch_size=2, progress=False)
    sizes = [SIZES[i % 2] for i in range(5)]
    assert report.image_tokens == _expected(processor.config, sizes)


def test_a_smolvlm_model_reports_its_image_tokens_through_the_real_cli(models, images):
    """The issue's case: a SmolVLM model said `0 image` for a prompt that is mostly image."""
    model_dir = models("idefics3")
    done = run_tilevlm("generate", "--model", model_dir, "--image", images[0], "--prompt",
                       "What is in the picture?", "--max-new-tokens", "2", "--threads", "1")
    assert done.returncode == 0, done.stderr
    prompt, text, image = map(int, STATS.search(done.stderr).groups())
    config = load_for_inference(model_dir, device="cpu")[1].config
    assert image == count_image_tokens(*SIZES[0], config) > 0
    assert prompt == text + image
