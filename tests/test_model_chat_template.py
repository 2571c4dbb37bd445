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


# SmolVLM's template as transformers ships it (processing_smolvlm.DEFAULT_CHAT_TEMPLATE); SmolVLM
# directories keep it in chat_template.json, newer transformers in chat_template.jinja.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if "
    "message['content'] is string %}{{': ' + message['content']}}{% else %}{% if "
    "message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line "
    "in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] "
    "== 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
LIST_ONLY_TEMPLATE = (  # an older multimodal form: content read only as a list of parts
    "{% for message in messages %}{{ message['role'] }}:{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}\n{% endfor %}")


def test_a_template_in_chat_template_json_or_jinja_is_used(hf_tokenizer_dir, tmp_path):
    directory = tmp_path / "tok"
    shutil.copytree(hf_tokenizer_dir, directory)
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": SMOLVLM_TEMPLATE}))
    tokenizer = load_tokenizer(directory)
    text = "".join(t for t, _ in tokenizer.chat_segments(CHAT[:1], add_generation_prompt=True))
    assert text == "<|im_start|>User: What colour?<end_of_utterance>\nAssistant:"
    (directory / "chat_template.jinja").write_text(SMOLLM2_TEMPLATE)  # the .jinja file wins
    assert load_tokenizer(directory).chat_template == SMOLLM2_TEMPLATE


def test_a_template_that_reads_only_list_content_gets_it(hf_tokenizer_dir, tmp_path):
    """Older multimodal templates (SmolVLM's on the Hub among them) read a message's content only
    as a list of parts: the text goes in as one text part instead of being dropped."""
    directory = tmp_path / "tok"
    shutil.copytree(hf_tokenizer_dir, directory)
    (directory / "chat_template.jinja").write_text(LIST_ONLY_TEMPLATE)
    tokenizer = load_tokenizer(directory)
    text = "".join(t for t, _ in tokenizer.chat_segments(CHAT))
    assert text == "user:What colour?assistant:Red."  # transformers' trim_blocks eats the "\n"
    labelled = "".join(t for t, counts in tokenizer.chat_segments(CHAT) if counts)
    # this template writes no generation prompt, so the reply's own header counts with it
    assert labelled == "assistant:Red."


def test_a_template_that_writes_no_text_is_refused(hf_tokenizer_dir, tmp_path):
    directory = tmp_path / "tok"
    shutil.copytree(hf_tokenizer_dir, directory)
    (directory / "chat_template.jinja").write_text("{% for m in messages %}{{ m.role }}{% endfor %}")
    with pytest.raises(ValueError, match="writes no message text"):
        load_tokenizer(directory)
