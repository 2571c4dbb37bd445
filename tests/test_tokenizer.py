import json
import logging

import pytest
from tokenizers import AddedToken, Tokenizer

from tilevlm.config import preset
from tilevlm.special_tokens import GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, grid_token, special_tokens
from tilevlm.preprocessing.chat_template import IM_END, IM_START
from tilevlm.preprocessing.tokenizer import ENDOFTEXT, load_tokenizer, train_bpe_tokenizer

from reference import chatml

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What color is r1c2?"},
    {"role": "assistant", "content": "Red."},
]


def _check_vlm_token_layout(tok, base: int, grid_side: int) -> None:
    """image, global, then grid tokens row-major, right after the base vocabulary."""
    assert tok.base_vocab_size == base
    assert tok.image_token_id == base
    assert tok.global_image_token_id == base + 1
    assert tok.grid_token_id(1, 1) == base + 2
    assert tok.grid_token_id(1, 2) == base + 3
    assert tok.grid_token_id(2, 1) == base + 2 + grid_side
    assert tok.grid_token_id(grid_side, grid_side) == base + 1 + grid_side**2
    assert len(tok) == tok.vocab_size == base + 2 + grid_side**2
    for index, content in enumerate(special_tokens(grid_side)):
        assert tok.tokenizer.token_to_id(content) == base + index


# ----------------------------------------------------------------------------- trained BPE

def test_trained_bpe_layout(tiny_tokenizer):
    tok = tiny_tokenizer
    _check_vlm_token_layout(tok, 512, 8)
    assert [tok.tokenizer.token_to_id(t) for t in (ENDOFTEXT, IM_START, IM_END)] == [0, 1, 2]
    assert tok.eos_token_id == tok.im_end_id == 2
    assert tok.pad_token_id == 0
    assert tok.bos_token_id is None
    assert len(tok) == preset("tiny").lm_vocab_size  # base 512 + 2 + 64


def test_trained_bpe_pads_a_small_corpus_to_exactly_vocab_size():
    tok = train_bpe_tokenizer(["ab ab ab"], vocab_size=300, grid_side=2)
    _check_vlm_token_layout(tok, 300, 2)
    assert tok.tokenizer.token_to_id("<|unused_0|>") is not None


def test_trained_bpe_rejects_too_small_vocab():
    with pytest.raises(ValueError, match="at least 259"):
        train_bpe_tokenizer(["a b c"], vocab_size=100)


def test_special_tokens_are_never_split_and_no_bos_is_added(tiny_tokenizer):
    tok = tiny_tokenizer
    text = IMAGE_TOKEN * 3 + grid_token(2, 3) + GLOBAL_IMAGE_TOKEN + "red" + IM_END
    ids = tok.encode(text)
    assert ids[:5] == [tok.image_token_id] * 3 + [tok.grid_token_id(2, 3),
                                                  tok.global_image_token_id]
    assert ids[-1] == tok.im_end_id
    assert tok.encode("red")[0] != tok.bos_token_id


def test_encode_decode_round_trip(tiny_tokenizer):
    text = "What color is the tile in row 2? Ünïcödé ✓"
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    with_special = tiny_tokenizer.encode(IMAGE_TOKEN + "hi")
    assert tiny_tokenizer.decode(with_special) == "hi"
    assert tiny_tokenizer.decode(with_special, skip_special_tokens=False) == IMAGE_TOKEN + "hi"


def test_grid_token_id_out_of_range(tiny_tokenizer):
    with pytest.raises(ValueError, match="r9c1"):
        tiny_tokenizer.grid_token_id(9, 1)


# ----------------------------------------------------------------------------- chat template

def test_chat_template_is_chatml():
    text = chatml(MESSAGES)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nWhat color is r1c2?<|im_end|>\n"
                    "<|im_start|>assistant\nRed.<|im_end|>\n")
    prompt = chatml(MESSAGES[:2], add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("bad", [{"role": "robot", "content": "x"}, {"role": "user"},
                                 {"role": "user", "content": 3}, "hello"])
def test_chat_template_rejects_bad_messages(bad):
    with pytest.raises(ValueError, match="message 1"):
        chatml([MESSAGES[0], bad])


# ----------------------------------------------------------------------------- save / load

def test_save_and_load_round_trip(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
    again = load_tokenizer(tmp_path)
    _check_vlm_token_layout(again, 512, 8)
    text = chatml(MESSAGES) + IMAGE_TOKEN + grid_token(3, 3)
    assert again.encode(text) == tiny_tokenizer.encode(text)
    assert (again.eos_token_id, again.pad_token_id, again.bos_token_id) == (2, 0, None)
    assert again.tokenizer.get_vocab(True) == tiny_tokenizer.tokenizer.get_vocab(True)


def test_saved_tokenizer_loads_in_transformers(tiny_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tiny_tokenizer.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    text = chatml(MESSAGES) + IMAGE_TOKEN
    assert hf(text, add_special_tokens=False)["input_ids"] == tiny_tokenizer.encode(text)
    assert hf.apply_chat_template(MESSAGES, tokenize=False) == chatml(MESSAGES)


def test_load_hf_directory_adds_chat_markers_and_vlm_tokens(hf_tokenizer_dir, caplog):
    base = Tokenizer.from_file(str(hf_tokenizer_dir / "tokenizer.json")).get_vocab_size(True)
    with caplog.at_level(logging.DEBUG, logger="tilevlm.preprocessing.tokenizer"):
        tok = load_tokenizer(hf_tokenizer_dir, grid_side=4)
    assert "added ChatML markers" in caplog.text and "base vocabulary" in caplog.text
    assert tok.im_start_id == base and tok.im_end_id == base + 1
    _check_vlm_token_layout(tok, base + 2, 4)
    assert tok.eos_token_id == tok.tokenizer.token_to_id(ENDOFTEXT)
    assert tok.pad_token_id == tok.eos_token_id  # no pad token: falls back to eos
    chat = chatml(MESSAGES)
    assert tok.encode(chat).count(tok.im_start_id) == 3
    assert tok.decode(tok.encode(chat), skip_special_tokens=False) == chat


def test_special_tokens_map_is_read(hf_tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": {"content": "<|im_end|>"}}))
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token_id == tok.im_end_id
    assert tok.eos_token_id == tok.tokenizer.token_to_id(ENDOFTEXT)


def test_load_errors_name_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)


def test_unknown_eos_token_is_an_error(hf_tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="'</s>' is not in the tokenizer's vocabulary"):
        load_tokenizer(tmp_path)


def test_vlm_tokens_at_unexpected_ids_are_an_error(hf_tokenizer_dir, tmp_path):
    tok = Tokenizer.from_file(str(hf_tokenizer_dir / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True) for t in (IMAGE_TOKEN, "<x>",
                                                                  GLOBAL_IMAGE_TOKEN)])
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=f"{GLOBAL_IMAGE_TOKEN} has id .*, expected"):
        load_tokenizer(tmp_path)
