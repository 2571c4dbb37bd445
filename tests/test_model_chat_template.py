"""A tokenizer's own chat_template (here SmolLM2-Instruct's shape, with its default system prompt)
is what the processor writes, for generation and for training labels, and it survives a save."""

from __future__ import annotations

import json
import shutil

import pytest

from tilevlm.config import IGNORE_INDEX, preset
from tilevlm.preprocessing.processor import Processor
from tilevlm.preprocessing.tokenizer import load_tokenizer

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT = [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "Red."}]


@pytest.fixture
def templated_dir(hf_tokenizer_dir, tmp_path):
    directory = tmp_path / "tok"
    shutil.copytree(hf_tokenizer_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": SMOLLM2_TEMPLATE}))
    return directory


def _processor(tokenizer):
    return Processor(preset("tiny", lm_base_vocab_size=tokenizer.base_vocab_size), tokenizer)


def test_the_model_template_writes_the_prompt(templated_dir):
    processor = _processor(load_tokenizer(templated_dir))
    batch = processor([CHAT[:1]], add_generation_prompt=True)
    text = processor.tokenizer.decode(batch["input_ids"][0].tolist(), skip_special_tokens=False)
    assert text == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nWhat colour?"
                    "<|im_end|>\n<|im_start|>assistant\n")


def test_the_model_template_matches_transformers(templated_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = load_tokenizer(templated_dir)
    ours.save(tmp_path)  # what a model directory holds
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    text = "".join(t for t, _ in ours.chat_segments(CHAT[:1], add_generation_prompt=True))
    assert text == hf.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)


def test_labels_keep_only_the_reply_under_the_model_template(templated_dir):
    processor = _processor(load_tokenizer(templated_dir))
    batch = processor([CHAT])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    kept = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(kept, skip_special_tokens=False) == "Red.<|im_end|>\n"


def test_the_template_survives_a_save(templated_dir, tmp_path):
    load_tokenizer(templated_dir).save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").chat_template == SMOLLM2_TEMPLATE


def test_a_template_that_rewrites_history_is_refused(templated_dir):
    tokenizer = load_tokenizer(templated_dir)
    tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(ValueError, match="cannot be told apart"):
        _processor(tokenizer)([CHAT])
