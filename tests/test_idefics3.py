"""Idefics3 / SmolVLM directories run in place, against transformers' own code.

Tiny random Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration models are built
and saved here with transformers (vision patch 16 and 14, pixel-shuffle factors 2, 3 and 4, tied
and untied heads, sharded and single files), with a tokenizer that holds the Idefics3 tokens;
transformers' Idefics3Processor (Pillow image processor) is the reference for the ids and pixels.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import (as_tilevlm_chat, idefics3_processor, make_idefics3, make_photo, text_part,
                     write_idefics3_tokenizer)
from tilevlm.inference.generation import generate
from tilevlm.weights.loading import load_for_inference, load_processor
from tilevlm.preprocessing.processor import image_prompt_tokens

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]

# name: (patch, tile, scale, tied, sharded, model_type, splitting)
VARIANTS = {
    "p16_s2_untied_sharded": (16, 64, 2, False, True, "idefics3", True),
    "p14_s3_tied": (14, 84, 3, True, False, "idefics3", True),
    "p16_s4_smolvlm_tied": (16, 64, 4, True, False, "smolvlm", True),
    "p14_s2_global_only": (14, 84, 2, False, False, "idefics3", False),
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_idefics3_tokenizer(tmp_path_factory.mktemp("idefics3_tok"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok_dir):
    """Factory: saved(name) -> (directory, the transformers model), made once per variant."""
    made: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(name: str) -> tuple[Path, torch.nn.Module]:
        if name not in made:
            patch, tile, scale, tie, sharded, kind, split = VARIANTS[name]
            directory = tmp_path_factory.mktemp(name)
            model = make_idefics3(directory, tok_dir, patch, tile, scale, tie, sharded, kind, split)
            made[name] = directory, model
        return made[name]

    return get


def reference(directory: Path, tok_dir: Path):
    """transformers' Idefics3Processor with the directory's settings."""
    from transformers import AutoTokenizer

    settings = json.loads((directory / "processor_config.json").read_text())
    images = settings["image_processor"]
    return idefics3_processor(AutoTokenizer.from_pretrained(tok_dir),
                              images["max_image_size"]["longest_edge"], settings["image_seq_len"],
                              images["do_image_splitting"])


def real_frames(pixel_values: torch.Tensor) -> torch.Tensor:
    """transformers' [B, max_images, 3, H, W] without its all-zero padding frames."""
    flat = pixel_values.flatten(0, 1)
    return flat[(flat != 0).flatten(1).any(1)]


def _rgba() -> Image.Image:
    img = make_photo(400, 300, 3).convert("RGBA")
    img.putalpha(Image.linear_gradient("L").resize((400, 300)))
    return img


IMAGES = {
    "1x1": lambda: make_photo(1, 1),
    "1000x300": lambda: make_photo(1000, 300, 1),
    "300x1000": lambda: make_photo(300, 1000, 2),
    "2000x1500": lambda: make_photo(2000, 1500, 4),
    "grayscale": lambda: make_photo(500, 400, 5).convert("L"),
    "rgba": _rgba,
    "1x20000": lambda: make_photo(1, 20000, 6),
}
CASES = [  # (texts, image names per text)
    *[(["User:<image>What is this?\nAssistant:"], [[name]]) for name in IMAGES],
    (["<image>A", "User: two <image> and <image>!\n\nAssistant:"],
     [["2000x1500"], ["1x20000", "rgba"]]),
    (["<image><image><image>", "No image here."], [["1x1", "grayscale", "300x1000"], []]),
]


def compare_processors(directory: Path, tok_dir: Path, texts, names) -> None:
    images = [[IMAGES[n]() for n in sample] for sample in names]
    ref = reference(directory, tok_dir)(text=texts, images=images if any(images) else None,
                                        return_tensors="pt", padding=True)
    ours = load_processor(directory).encode_texts(texts, images)
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    frames = real_frames(ref["pixel_values"])
    assert sum(ours["n_tiles"]) == frames.shape[0]  # the same tiles, in the same order:
    assert (ours["pixel_values"] - frames).abs().max() <= 1e-5


@pytest.mark.parametrize("texts,names", CASES)
def test_processor_matches_transformers(saved, tok_dir, texts, names):
    compare_processors(saved("p16_s2_untied_sharded")[0], tok_dir, texts, names)


@pytest.mark.parametrize("name", ["p14_s3_tied", "p14_s2_global_only"])
def test_processor_matches_transformers_other_sizes(saved, tok_dir, name):
    texts, names = CASES[-2]
    compare_processors(saved(name)[0], tok_dir, texts, names)


BATCH_TEXTS = ["User:<image>Describe the picture.\nAssistant:", "<image>Hi"]


def _images() -> list[list[Image.Image]]:
    return [[make_photo(1000, 600, 7)], [make_photo(300, 1000, 8)]]


def _batch(directory: Path, tok_dir: Path):
    ref = reference(directory, tok_dir)(text=BATCH_TEXTS, images=_images(), return_tensors="pt",
                                        padding=True)
    return ref, load_processor(directory).encode_texts(BATCH_TEXTS, _images())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(saved, tok_dir, name):
    directory, hf = saved(name)
    model, _ = load_for_inference(directory, device="cpu")
    ref, ours = _batch(directory, tok_dir)
    expected_grid = (1, 1) if name.endswith("global_only") else (2, 3)
    assert ours["grids"][0] == [expected_grid]
    with torch.no_grad():
        theirs = hf(**ref).logits
        mine = model(ours["input_ids"], ours["pixel_values"],
                     attention_mask=ours["attention_mask"]).logits
    real = ours["attention_mask"].bool()  # right padding: the padded row's pad positions differ
    assert (mine[real] - theirs[real]).abs().max() <= 1e-4


def test_greedy_tokens_match_transformers(saved, tok_dir):
    directory, hf = saved("p16_s2_untied_sharded")
    model, processor = load_for_inference(directory, device="cpu")
    text, image = ["User:<image>Describe.\nAssistant:"], [[make_photo(1000, 600, 9)]]
    ref = reference(directory, tok_dir)(text=text, images=image, return_tensors="pt")
    hf.generation_config.eos_token_id = None  # 20 tokens, whatever they are
    with torch.no_grad():
        theirs = hf.generate(**ref, max_new_tokens=20, do_sample=False)[0, ref["input_ids"].shape[1]:]
    ours = generate(model, processor.encode_texts(text, image), max_new_tokens=20,
                    eos_token_ids=[])
    assert ours.tokens[0] == theirs.tolist() and len(ours.tokens[0]) == 20


def test_loading_a_sharded_smolvlm_directory_reads_each_json_file_once(saved, monkeypatch):
    from test_model_source import count_json_reads

    directory = saved("p16_s2_untied_sharded")[0]
    reads = count_json_reads(monkeypatch)
    load_for_inference(directory, device="cpu")
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= set(reads)
    assert {"preprocessor_config.json", "processor_config.json"} & set(reads)
    assert set(reads.values()) == {1}, reads


def test_length_meter_counts_the_layouts_text(saved, tok_dir):
    from tilevlm.data.lengths import SampleMeter

    processor = load_processor(saved("p16_s2_untied_sharded")[0])
    img = make_photo(1000, 600, 7)
    assert image_prompt_tokens(1000, 600, processor.config, processor.tokenizer) == len(
        processor.encode_texts(["<image>"], [[img]])["input_ids"][0])
    sample = {"messages": [{"role": "user", "content": "<image>Look.\n\n"},
                           {"role": "assistant", "content": "A photo."}], "images": [img]}
    batch = processor([sample["messages"]], [sample["images"]])
    assert SampleMeter(processor).measure(sample) == (batch["input_ids"].shape[1], 7)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tilevlm.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_build_writes_our_format_that_reloads_identically(saved, tok_dir, tmp_path):
    directory, _ = saved("p14_s3_tied")
    built = cli("build", "--idefics3", str(directory), "--out", str(tmp_path / "ours"))
    assert built.returncode == 0, built.stderr
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (config["image_token_layout"], config["image_rule"]) == ("idefics3", "idefics3")
    batch = load_processor(directory).encode_texts(BATCH_TEXTS, _images())
    again = load_processor(tmp_path / "ours").encode_texts(BATCH_TEXTS, _images())
    assert torch.equal(again["input_ids"], batch["input_ids"])
    assert torch.equal(again["pixel_values"], batch["pixel_values"])
    logits = []
    for source in (directory, tmp_path / "ours"):
        model, _ = load_for_inference(source, device="cpu")
        with torch.no_grad():
            logits.append(model(batch["input_ids"], batch["pixel_values"],
                                attention_mask=batch["attention_mask"]).logits)
    assert torch.equal(logits[0], logits[1])


def test_generate_and_train_in_place_through_the_cli(saved, tmp_path):
    directory, _ = saved("p16_s4_smolvlm_tied")
    make_photo(640, 480).save(tmp_path / "photo.png")
    answer = cli("generate", "--model", str(directory), "--image", str(tmp_path / "photo.png"),
                 "--prompt", "What is this?", "--max-new-tokens", "4")
    assert answer.returncode == 0, answer.stderr
    shown = cli("inspect", str(tmp_path / "photo.png"), "--model", str(directory))
    assert "grid:         3x3" in shown.stdout and "tiles:        10" in shown.stdout, shown.stderr
    (tmp_path / "images").mkdir()
    make_photo(200, 120).save(tmp_path / "images" / "0.png")
    rows = [{"image": "0.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                 {"from": "gpt", "value": "A photo."}]}]
    (tmp_path / "data.json").write_text(json.dumps(rows * 4))
    trained = cli("train", "--model", str(directory), "--data", str(tmp_path / "data.json"),
                  "--image-root", str(tmp_path / "images"), "--out", str(tmp_path / "run"),
                  "--steps", "2", "--batch-size", "2")
    assert trained.returncode == 0, trained.stderr
    tuned = tmp_path / "run" / "checkpoint-2"
    exported = cli("export", "--format", "idefics3", str(tuned), str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    _same_logits_in_transformers(tuned, tmp_path / "hf")


def _same_logits_in_transformers(ours_dir: Path, hf_dir: Path) -> None:
    from transformers import AutoProcessor, AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
    ref = AutoProcessor.from_pretrained(hf_dir)(text=BATCH_TEXTS, images=_images(),
                                                 return_tensors="pt", padding=True)
    model, processor = load_for_inference(ours_dir, device="cpu")
    ours = processor.encode_texts(BATCH_TEXTS, _images())
    with torch.no_grad():
        theirs = hf(**ref).logits
        mine = model(ours["input_ids"], ours["pixel_values"],
                     attention_mask=ours["attention_mask"]).logits
    real = ours["attention_mask"].bool()
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert (mine[real] - theirs[real]).abs().max() <= 1e-4


def _broken_copy(directory: Path, target: Path) -> Path:
    """A copy whose weights are garbage: an error about anything else came before reading them."""
    shutil.copytree(directory, target)
    for path in target.glob("*.safetensors"):
        path.write_bytes(b"not a safetensors file")
    return target


def _one_line_error(directory: Path, tmp_path: Path) -> str:
    make_photo(64, 64).save(tmp_path / "img.png")
    run = cli("generate", "--model", str(directory), "--image", str(tmp_path / "img.png"),
              "--prompt", "Hi", "--max-new-tokens", "2")
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    return lines[0]


def test_contradicting_tile_size_is_one_line_before_the_weights(saved, tmp_path):
    copy = _broken_copy(saved("p16_s2_untied_sharded")[0], tmp_path / "m")
    settings = json.loads((copy / "processor_config.json").read_text())
    settings["image_processor"]["max_image_size"] = {"longest_edge": 32}
    (copy / "processor_config.json").write_text(json.dumps(settings))
    assert "max_image_size.longest_edge 32 contradicts" in _one_line_error(copy, tmp_path)


def test_missing_tokenizer_token_is_one_line_before_the_weights(saved, tmp_path):
    from helpers import IDEFICS3_TOKENS

    copy = _broken_copy(saved("p16_s2_untied_sharded")[0], tmp_path / "m")
    write_idefics3_tokenizer(copy, [t for t in IDEFICS3_TOKENS if t != "<global-img>"])
    assert "lacks the idefics3 layout's tokens <global-img>" in _one_line_error(copy, tmp_path)


def test_unknown_layout_is_one_line_before_the_weights(saved, tmp_path):
    built = cli("build", "--idefics3", str(saved("p14_s3_tied")[0]), "--out",
                str(tmp_path / "ours"))
    assert built.returncode == 0, built.stderr
    copy = _broken_copy(tmp_path / "ours", tmp_path / "m")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "image_token_layout": "llava"}))
    assert "image_token_layout must be one of tilevlm, nanovlm, idefics3, got 'llava'" in \
        _one_line_error(copy, tmp_path)


def test_export_loads_in_transformers_with_the_same_answers(saved, tmp_path):
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    directory, _ = saved("p14_s3_tied")
    built = cli("build", "--idefics3", str(directory), "--out", str(tmp_path / "ours"))
    assert built.returncode == 0, built.stderr
    exported = cli("export", "--format", "idefics3", str(tmp_path / "ours"), str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    _same_logits_in_transformers(tmp_path / "ours", tmp_path / "hf")
    hf, info = Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "hf",
                                                                output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    one = AutoProcessor.from_pretrained(tmp_path / "hf")(text=BATCH_TEXTS[:1],
                                                          images=_images()[:1], return_tensors="pt")
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        tokens = hf.eval().generate(**one, max_new_tokens=20, do_sample=False)
    model, processor = load_for_inference(tmp_path / "ours", device="cpu")
    again = generate(model, processor.encode_texts(BATCH_TEXTS[:1], _images()[:1]),
                     max_new_tokens=20, eos_token_ids=[])
    assert again.tokens[0] == tokens[0, one["input_ids"].shape[1]:].tolist()


def test_export_of_a_nanovlm_layout_model_is_refused(tmp_path, tiny_tokenizer):
    from tilevlm import preset
    from tilevlm.model.vlm import VisionLanguageModel
    from tilevlm.weights.native import save_pretrained

    cfg = preset("tiny", lm_base_vocab_size=tiny_tokenizer.base_vocab_size,
                 image_token_layout="nanovlm")
    save_pretrained(VisionLanguageModel(cfg), tmp_path / "nano", tokenizer=tiny_tokenizer)
    run = cli("export", "--format", "idefics3", str(tmp_path / "nano"), str(tmp_path / "out"))
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "cannot export as idefics3: this model writes images in the 'nanovlm'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_head_absent_from_the_files_is_tied_whatever_the_flag(saved, tok_dir, tmp_path):
    directory, hf = saved("p14_s3_tied")
    copy = Path(shutil.copytree(directory, tmp_path / "m"))
    config = json.loads((copy / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = False
    (copy / "config.json").write_text(json.dumps(config))
    model, _ = load_for_inference(copy, device="cpu")
    ref, ours = _batch(directory, tok_dir)
    with torch.no_grad():
        theirs = hf(**ref).logits
        mine = model(ours["input_ids"], ours["pixel_values"],
                     attention_mask=ours["attention_mask"]).logits
    real = ours["attention_mask"].bool()
    assert model.cfg.lm_tie_weights and (mine[real] - theirs[real]).abs().max() <= 1e-4


# ----------------------------------------------------------------------------- chat template

# SmolVLM's chat template as its Hub directories ship it (chat_template.json of
# HuggingFaceTB/SmolVLM-256M-Instruct and its siblings): a message's content is read only as a
# list of parts, and an image-first message gets "User:" with no space after it.
SMOLVLM_HUB_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if "
    "message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line "
    "in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] "
    "== 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if "
    "add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def _smolvlm_default_template() -> str:
    """transformers' own SmolVLM default (a string branch, a video branch, else the same)."""
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    return DEFAULT_CHAT_TEMPLATE


def _image(seed: int) -> dict:
    return {"type": "image", "image": make_photo(300 + 70 * seed, 200 + 40 * seed, 20 + seed)}


# Conversations as transformers' processors take them (parts); tilevlm gets the same text with
# "<image>" where each image part stands (`as_tilevlm_chat`), and the images in order.
TEMPLATE_CASES = {
    "image_then_text": [{"role": "user", "content": [_image(0), text_part("What is in the picture?")]}],
    "text_then_image": [{"role": "user", "content": [text_part("Look at this: "), _image(1)]}],
    "two_images": [{"role": "user", "content": [_image(2), text_part(" and "), _image(3),
                                                text_part(" - which is brighter?")]}],
    "two_images_first": [{"role": "user", "content": [_image(0), _image(4), text_part("Compare.")]}],
    "multi_turn": [{"role": "user", "content": [_image(1), text_part("What is it?")]},
                   {"role": "assistant", "content": [text_part("A photo of blobs.")]},
                   {"role": "user", "content": [text_part("And its colours?")]},
                   {"role": "assistant", "content": [text_part("Red and blue.")]}],
    "system": [{"role": "system", "content": [text_part("Answer in one word.")]},
               {"role": "user", "content": [_image(2), text_part("Colour?")]}],
}


@pytest.fixture(scope="module")
def templated(saved, tok_dir, tmp_path_factory):
    """Factory: templated(which) -> (a SmolVLM directory with that chat template in
    chat_template.jinja, transformers' processor for it)."""
    made: dict[str, tuple[Path, object]] = {}

    def get(which: str):
        if which not in made:
            template = SMOLVLM_HUB_TEMPLATE if which == "hub" else _smolvlm_default_template()
            directory = tmp_path_factory.mktemp(f"templated_{which}")
            source = saved("p16_s4_smolvlm_tied")[0]
            for path in source.iterdir():
                if path.is_file():
                    shutil.copy(path, directory / path.name)
            (directory / "chat_template.jinja").write_text(template)
            (directory / "chat_template.json").unlink(missing_ok=True)
            ref = reference(directory, tok_dir)
            ref.chat_template = template
            made[which] = directory, ref
        return made[which]

    return get


@pytest.mark.parametrize("which", ["hub", "transformers_default"])
@pytest.mark.parametrize("case", list(TEMPLATE_CASES))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_prompt_and_ids_match_transformers(templated, which, case,
                                                         generation_prompt):
    directory, ref = templated(which)
    conversation = TEMPLATE_CASES[case]
    messages, images = as_tilevlm_chat(conversation)
    processor = load_processor(directory)
    theirs_text = ref.apply_chat_template(conversation, tokenize=False,
                                          add_generation_prompt=generation_prompt)
    ours_text = "".join(t for t, _ in processor.tokenizer.chat_segments(messages,
                                                                         generation_prompt))
    assert ours_text == theirs_text
    if case == "image_then_text":  # the gap this closes: no space after "User:"
        assert theirs_text.startswith("<|im_start|>User:<image>What")
    theirs = ref.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                     return_tensors="pt",
                                     add_generation_prompt=generation_prompt)
    ours = processor([messages], [images], add_generation_prompt=generation_prompt)
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert sum(ours["n_tiles"]) == real_frames(theirs["pixel_values"]).shape[0]


def test_template_labels_keep_the_replies_with_image_parts(templated):
    directory, _ = templated("hub")
    messages, images = as_tilevlm_chat(TEMPLATE_CASES["multi_turn"])
    processor = load_processor(directory)
    batch = processor([messages], [images])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    kept = [i for i, label in zip(ids, labels) if label != -100]
    text = processor.tokenizer.decode(kept, skip_special_tokens=False)
    # the generation prompt is "Assistant:" with no space, so each reply starts with one
    assert text == " A photo of blobs.<end_of_utterance>\n Red and blue.<end_of_utterance>\n"
