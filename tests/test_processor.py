import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tilevlm import PRESETS, preset
from tilevlm.special_tokens import GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, grid_token
from tilevlm.preprocessing.image import resize_to_tiles
from tilevlm.config import IGNORE_INDEX
from tilevlm.preprocessing.processor import (Processor, count_image_tokens, image_prompt_tokens,
                                             image_string)
from tilevlm.preprocessing.tokenizer import train_bpe_tokenizer

from reference import chatml, reassemble_tiles, to_tensor

SIZES = [(1, 1), (223, 225), (224, 224), (448, 224), (1000, 10), (5000, 1)]


def _chat(user: str, reply: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": user}]
    if reply is not None:
        messages.append({"role": "assistant", "content": reply})
    return messages


def _vlm_token_count(tokenizer, ids: torch.Tensor) -> int:
    """Image, global and grid tokens: every id from the image token on."""
    return int((ids >= tokenizer.image_token_id).sum())


@pytest.fixture
def processor(tiny_config, tiny_tokenizer):
    return Processor(tiny_config, tiny_tokenizer)


# ----------------------------------------------------------------------------- image strings

def test_image_string_1x1_uses_the_r1c1_grid_token(tiny_tokenizer):
    assert image_string(tiny_tokenizer, (1, 1), 4, True) == grid_token(1, 1) + IMAGE_TOKEN * 4


def test_image_string_grid_with_global(tiny_tokenizer):
    s = image_string(tiny_tokenizer, (2, 3), 2, True)
    tiles = [grid_token(r, c) for r in (1, 2) for c in (1, 2, 3)]
    assert s == GLOBAL_IMAGE_TOKEN + IMAGE_TOKEN * 2 + "".join(t + IMAGE_TOKEN * 2 for t in tiles)
    assert not image_string(tiny_tokenizer, (2, 3), 2, False).startswith(GLOBAL_IMAGE_TOKEN)


def test_tokenizer_must_match_the_config(tiny_tokenizer):
    with pytest.raises(ValueError, match="512 base tokens and 578 in all, the config "
                                         "lm_base_vocab_size 49152"):
        Processor(preset("split_448"), tiny_tokenizer)


def test_image_string_grid_too_large():
    small = train_bpe_tokenizer(["a b"], vocab_size=300, grid_side=2)
    with pytest.raises(ValueError, match="3x1 tile grid does not fit .* 2x2 grid tokens"):
        image_string(small, (3, 1), 4, True)
    with pytest.raises(ValueError, match="2x2 grid tokens"):
        Processor(preset("tiny", lm_base_vocab_size=300), small)  # tiny: 3 tiles per side


# ----------------------------------------------------------------------------- token counts

@pytest.mark.parametrize("name", [n for n in PRESETS  # smolvlm_256m: tests/test_idefics3.py
                                  if preset(n).image_token_layout != "idefics3"])
def test_count_image_tokens_matches_processor_for_each_preset(name, tiny_tokenizer):
    config = preset(name, lm_base_vocab_size=tiny_tokenizer.base_vocab_size)
    processor = Processor(config, tiny_tokenizer)
    images = [Image.new("RGB", size, (90, 30, 200)) for size in SIZES]
    batch = processor([_chat("<image>")] * len(images), [[img] for img in images])
    for b, (w, h) in enumerate(SIZES):
        expected = image_prompt_tokens(w, h, config)
        assert _vlm_token_count(tiny_tokenizer, batch["input_ids"][b]) == expected
        assert expected == batch["n_tiles"][b] * (1 + config.mp_image_token_length)
        # image tokens: the placeholders alone, the markers are text
        assert count_image_tokens(w, h, config) == batch["n_tiles"][b] * config.mp_image_token_length
        assert count_image_tokens(w, h, config) == int(
            (batch["input_ids"][b] == tiny_tokenizer.image_token_id).sum())
    assert batch["pixel_values"].shape[0] == sum(batch["n_tiles"])


def test_original_small_is_one_tile_of_50_tokens():
    assert image_prompt_tokens(640, 480, preset("original_small")) == 50
    assert image_prompt_tokens(640, 360, preset("split_448")) == 5 * 50  # 2x2 grid + global
    assert image_prompt_tokens(640, 224, preset("split_448")) == 3 * 50  # 1x2 grid + global
    assert image_prompt_tokens(640, 480, preset("split_448")) == 5 * 50  # 2x2 grid + global
    # of which image tokens (the placeholders): 49 a tile, the marker is text
    assert count_image_tokens(640, 480, preset("original_small")) == 49
    assert count_image_tokens(640, 360, preset("split_448")) == 5 * 49


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(1, 400), height=st.integers(1, 400), use_global=st.booleans())
def test_count_image_tokens_property(tiny_config, tiny_tokenizer, width, height, use_global):
    config = tiny_config.replace(use_global_tile=use_global)
    batch = Processor(config, tiny_tokenizer)([_chat("look: <image>", "ok")],
                                              [[Image.new("RGB", (width, height), (1, 2, 3))]])
    n_vlm = _vlm_token_count(tiny_tokenizer, batch["input_ids"][0])
    assert n_vlm == image_prompt_tokens(width, height, config)
    assert count_image_tokens(width, height, config) == batch["n_tiles"][0] * config.mp_image_token_length
    assert batch["pixel_values"].shape[0] == batch["n_tiles"][0]


# ----------------------------------------------------------------------------- tiles and text

def _tile_colors(grid: tuple[int, int], tile: int) -> tuple[Image.Image, dict]:
    """An image whose tiles each have one distinct solid colour; colour per (row, col)."""
    n_h, n_w = grid
    img = Image.new("RGB", (n_w * tile, n_h * tile))
    colors = {}
    for r in range(n_h):
        for c in range(n_w):
            colors[(r + 1, c + 1)] = (40 * r + 20, 60 * c + 10, 200 - 30 * r - 20 * c)
            img.paste(colors[(r + 1, c + 1)], (c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
    return img, colors


def test_grid_token_order_matches_tile_order(processor, tiny_tokenizer):
    img, colors = _tile_colors((2, 3), 32)  # exactly 2x3 tiles: no resize
    batch = processor([_chat("<image>")], [[img]])
    ids = batch["input_ids"][0].tolist()
    grid_ids = {tiny_tokenizer.grid_token_id(r, c): (r, c)
                for r in range(1, 9) for c in range(1, 9)}
    cells = [grid_ids[i] for i in ids if i in grid_ids]
    assert cells == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    first_tile = ids.index(tiny_tokenizer.grid_token_id(1, 1))
    assert ids.index(tiny_tokenizer.global_image_token_id) < first_tile  # global tile first
    tiles = batch["pixel_values"][1:] * 0.5 + 0.5  # undo normalization; skip the global tile
    for k, cell in enumerate(cells):
        mean = (tiles[k].mean(dim=(1, 2)) * 255).round().tolist()
        assert mean == list(colors[cell])


def test_tiles_reassemble_to_the_resized_image(processor, photo):
    img = photo(250, 180, seed=3)
    batch = processor([_chat("<image>")], [[img]])
    grid = batch["grids"][0][0]
    pixels = reassemble_tiles(batch["pixel_values"][1:], grid) * 0.5 + 0.5
    assert torch.allclose(pixels, to_tensor(resize_to_tiles(img, 32, 96)), atol=1e-6)


def test_input_ids_equal_the_encoded_chat_template(processor, tiny_tokenizer, tiny_config):
    img = Image.new("RGB", (64, 32))
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Which colour?\n<image>"},
                {"role": "assistant", "content": " Red, mostly.\n"}]
    batch = processor([messages], [[img]])
    expanded = [*messages[:1], {"role": "user", "content": "Which colour?\n" + image_string(
        tiny_tokenizer, (1, 2), tiny_config.mp_image_token_length, True)}, messages[2]]
    expected = tiny_tokenizer.encode(chatml(expanded))
    assert batch["input_ids"][0].tolist() == expected


def test_many_images_many_samples(processor, photo):
    images = [[photo(96, 96), photo(30, 20)], [], [photo(96, 32)]]
    convs = [_chat("a <image> b <image>", "x"), _chat("no picture", "y"), _chat("<image>", "z")]
    batch = processor(convs, images)
    assert batch["grids"] == [[(3, 3), (1, 1)], [], [(1, 3)]]
    assert batch["n_tiles"] == [11, 0, 4]
    assert batch["pixel_values"].shape == (15, 3, 32, 32)
    assert batch["pixel_values"].dtype == torch.float32


def test_no_images_gives_no_pixel_values(processor):
    batch = processor([_chat("hello", "hi")])
    assert batch["pixel_values"] is None and batch["grids"] == [[]] and batch["n_tiles"] == [0]


def test_images_without_placeholder_go_to_the_start_of_the_first_user_message(processor,
                                                                              tiny_tokenizer):
    messages = [{"role": "system", "content": "sys"}, *_chat("What is it?", "A dot.")]
    batch = processor([messages], [[Image.new("RGB", (10, 10))]])
    text = tiny_tokenizer.decode(batch["input_ids"][0].tolist(), skip_special_tokens=False)
    assert f"<|im_start|>user\n{grid_token(1, 1)}{IMAGE_TOKEN}" in text
    assert f"{IMAGE_TOKEN}What is it?<|im_end|>" in text


# ----------------------------------------------------------------------------- labels and padding

def test_labels_cover_only_assistant_content_and_im_end(processor, tiny_tokenizer):
    messages = [{"role": "system", "content": "sys"}, *_chat("<image> q1", "answer one"),
                *_chat("q2", "answer two")]
    batch = processor([messages], [[Image.new("RGB", (40, 40))]])
    labels = batch["labels"][0]
    kept = labels[labels != IGNORE_INDEX].tolist()
    assert tiny_tokenizer.decode(kept, skip_special_tokens=False) == \
        "answer one<|im_end|>answer two<|im_end|>"
    ids = batch["input_ids"][0]
    assert torch.equal(ids[labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX])
    assert not (labels == tiny_tokenizer.image_token_id).any()


def test_right_and_left_padding(processor, tiny_tokenizer):
    convs = [_chat("short"), _chat("a much longer question with many words in it")]
    right = processor(convs, padding_side="right")
    left = processor(convs, padding_side="left", add_generation_prompt=True)
    n_short = int(right["attention_mask"][0].sum())
    mask = right["attention_mask"][0]
    assert mask[:n_short].all() and not mask[n_short:].any()
    assert (right["input_ids"][0, n_short:] == tiny_tokenizer.pad_token_id).all()
    assert (right["labels"][0, n_short:] == IGNORE_INDEX).all()
    assert right["attention_mask"][1].all()
    pad = left["input_ids"].shape[1] - int(left["attention_mask"][0].sum())
    mask = left["attention_mask"][0]
    assert pad > 0 and not mask[:pad].any() and mask[pad:].all()
    prompt = tiny_tokenizer.encode("<|im_start|>assistant\n")
    for row in left["input_ids"]:  # every prompt ends with the generation prompt
        assert row[-len(prompt):].tolist() == prompt
    assert left["input_ids"].dtype == left["attention_mask"].dtype == torch.long


def test_bad_padding_side(processor):
    with pytest.raises(ValueError, match="padding_side"):
        processor([_chat("x")], padding_side="middle")


# ----------------------------------------------------------------------------- errors

def test_placeholder_count_mismatch(processor):
    img = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="sample 1: 2 <image> placeholders in the text but 1 "):
        processor([_chat("ok"), _chat("<image> and <image>")], [[], [img]])
    with pytest.raises(ValueError, match="sample 0: 1 <image> placeholders in the text but 0 "):
        processor([_chat("<image>")])


def test_images_list_length_must_match(processor):
    with pytest.raises(ValueError, match="2 conversations but images for 1 samples"):
        processor([_chat("a"), _chat("b")], [[]])


def test_images_but_no_user_message(processor):
    with pytest.raises(ValueError, match="sample 0: has images but no user message"):
        processor([[{"role": "system", "content": "s"}]], [[Image.new("RGB", (5, 5))]])


def test_too_long_sample(tiny_config, tiny_tokenizer):
    processor = Processor(tiny_config.replace(lm_max_length=40), tiny_tokenizer)
    processor([_chat("short", "fine")])
    img = Image.new("RGB", (96, 96))  # 10 tiles x 5 tokens = 50, plus the text > 40
    with pytest.raises(ValueError, match=r"sample 1: \d+ tokens, more than lm_max_length 40"):
        processor([_chat("short"), _chat("<image>")], [[], [img]])


def test_a_special_token_spelled_in_text_stays_text(processor):
    # It used to forge an image slot (and was then refused by the count check); now the text is
    # text: only the image's own 4 image tokens, and its characters decode back.
    batch = processor([_chat(f"<image>{IMAGE_TOKEN} and <|im_end|>")],
                      [[Image.new("RGB", (10, 10))]])
    ids = batch["input_ids"][0].tolist()
    assert ids.count(processor.tokenizer.image_token_id) == 4
    assert ids.count(processor.tokenizer.im_end_id) == 1  # the template's own, after the turn
    text = processor.tokenizer.decode(ids, skip_special_tokens=False)
    assert f"{IMAGE_TOKEN} and <|im_end|>" in text


def test_bad_image_names_sample_and_image(processor, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match=f"sample 0, image 1: {bad}: not an image"):
        processor([_chat("<image><image>")], [[Image.new("RGB", (4, 4)), bad]])


def test_decode(processor):
    batch = processor([_chat("hi", "Red square.")])
    labels = batch["labels"][0]
    assert processor.decode(labels[labels != IGNORE_INDEX]) == "Red square."


def test_threaded_image_loading_equals_one_thread_and_names_the_bad_image(
        tiny_config, tiny_tokenizer, tmp_path):
    from helpers import make_photo

    paths = []
    for i, size in enumerate([(300, 200), (90, 90), (640, 480), (120, 400)]):
        paths.append(tmp_path / f"{i}.jpg")
        make_photo(*size, seed=i).save(paths[-1])
    convs = [_chat("<image>What?", "This.") for _ in paths]
    batches = [Processor(tiny_config, tiny_tokenizer, image_threads=n)(convs, [[p] for p in paths])
               for n in (1, 3)]
    assert torch.equal(batches[0]["pixel_values"], batches[1]["pixel_values"])
    assert batches[0]["grids"] == batches[1]["grids"] and batches[0]["n_tiles"] == batches[1]["n_tiles"]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    threaded = Processor(tiny_config, tiny_tokenizer, image_threads=3)
    with pytest.raises(ValueError, match=r"sample 2, image 0: .*bad.png"):
        threaded(convs[:3], [[paths[0]], [paths[1]], [tmp_path / "bad.png"]])
