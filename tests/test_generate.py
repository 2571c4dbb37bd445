"""Generation: cached decoding == full forward, batch == single, EOS, stop strings, seeds, streaming."""

import pytest
import torch

from tilevlm import preset
from tilevlm.inference.generation import generate, stream_generate
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.preprocessing.processor import Processor
from tilevlm.inference.sampling import SamplingParams

from helpers import make_photo


@pytest.fixture(scope="module")
def setup(tiny_tokenizer):
    torch.manual_seed(0)
    cfg = preset("tiny", lm_base_vocab_size=tiny_tokenizer.base_vocab_size)
    model = VisionLanguageModel(cfg).eval()
    # Larger weights than the default init, so greedy outputs vary from step to step.
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.mul_(4.0)
    return model, Processor(cfg, tiny_tokenizer), tiny_tokenizer


def _prompts():
    images = [[make_photo(96, 64, seed=1)], [], [make_photo(40, 40, seed=2), make_photo(90, 30, seed=3)]]
    convs = [
        [{"role": "user", "content": "<image>What colour is the shape in row 1, column 2?"}],
        [{"role": "user", "content": "Say hello."}],
        [{"role": "user", "content": "Compare <image> and <image> please, in detail."}],
    ]
    return convs, images


def _full_forward_greedy(model, batch, n):
    """Reference: greedy decoding by re-running the whole sequence each step (no cache)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids, batch["pixel_values"], attention_mask=mask).logits
            nxt = logits[:, -1].argmax(-1)
            out.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(nxt[:, None])], 1)
    return torch.stack(out, 1).tolist()


def test_cached_greedy_equals_argmax_of_full_forward_at_every_step(setup):
    model, processor, _ = setup
    convs, images = _prompts()
    batch = processor(convs[:1], images[:1], padding_side="left", add_generation_prompt=True)
    out = generate(model, batch, max_new_tokens=12, eos_token_ids=[])
    assert out.tokens == _full_forward_greedy(model, batch, 12)
    assert out.finish_reasons == ["length"]
    assert len(set(out.tokens[0])) > 1  # a real test: the tokens change


def test_batch_equals_single_for_mixed_prompts_images_and_tiles(setup):
    model, processor, _ = setup
    convs, images = _prompts()
    batch = processor(convs, images, padding_side="left", add_generation_prompt=True)
    assert (batch["attention_mask"] == 0).any()  # the prompts really have different lengths
    together = generate(model, batch, max_new_tokens=10, eos_token_ids=[]).tokens
    for i in range(len(convs)):
        alone = processor(convs[i:i + 1], images[i:i + 1], padding_side="left",
                          add_generation_prompt=True)
        assert generate(model, alone, max_new_tokens=10, eos_token_ids=[]).tokens[0] == together[i]
    # And the cached batch agrees with the uncached reference on the padded batch too.
    assert together == _full_forward_greedy(model, batch, 10)


def test_eos_stops_each_row_and_the_loop(setup):
    model, processor, tok = setup
    convs, images = _prompts()
    batch = processor(convs, images, padding_side="left", add_generation_prompt=True)
    free = generate(model, batch, max_new_tokens=8, eos_token_ids=[]).tokens
    eos = free[0][3]  # the token row 0 produces at step 4 becomes EOS
    out = generate(model, batch, max_new_tokens=8, eos_token_ids=[eos])
    assert out.tokens[0] == free[0][:free[0].index(eos)]
    assert out.finish_reasons[0] == "eos"
    for row, reason in zip(out.tokens, out.finish_reasons):
        assert eos not in row
        assert reason in ("eos", "length")
    # When every row finishes, the loop ends early.
    firsts = list({r[0] for r in free})
    early = generate(model, batch, max_new_tokens=8, eos_token_ids=firsts)
    assert early.tokens == [[], [], []] and early.stats.steps == 1


def test_stop_strings_cut_the_text(setup):
    model, processor, tok = setup
    convs, images = _prompts()
    batch = processor(convs[1:2], images[1:2], padding_side="left", add_generation_prompt=True)
    full = generate(model, batch, max_new_tokens=10, eos_token_ids=[], tokenizer=tok)
    text = full.texts[0]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert len(stop) == 2
    out = generate(model, batch, max_new_tokens=10, eos_token_ids=[], tokenizer=tok,
                   stop_strings=[stop])
    assert out.texts[0] == text[:text.find(stop)]
    assert out.finish_reasons == ["stop_string"]


def test_sampling_is_reproducible_with_a_seed(setup):
    model, processor, tok = setup
    convs, images = _prompts()
    batch = processor(convs, images, padding_side="left", add_generation_prompt=True)
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.2)
    a = generate(model, batch, max_new_tokens=8, sampling=params, seed=123, eos_token_ids=[])
    b = generate(model, batch, max_new_tokens=8, sampling=params, seed=123, eos_token_ids=[])
    c = generate(model, batch, max_new_tokens=8, sampling=params, seed=124, eos_token_ids=[])
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_streaming_yields_exactly_the_final_text(setup):
    model, processor, tok = setup
    convs, images = _prompts()
    batch = processor(convs[:1], images[:1], padding_side="left", add_generation_prompt=True)
    pieces = list(stream_generate(model, batch, tok, max_new_tokens=12))
    final = generate(model, batch, max_new_tokens=12, tokenizer=tok).texts[0]
    assert "".join(pieces) == final
    assert len(pieces) > 1
    stop = final[3:5]
    pieces = list(stream_generate(model, batch, tok, max_new_tokens=12, stop_strings=[stop]))
    assert "".join(pieces) == final[:final.find(stop)]


class _ByteTokenizer:
    """Decodes n tokens as the first n bytes of TEXT, whatever the tokens: each multi-byte
    character arrives one byte at a time (an incomplete one decodes as "\ufffd")."""

    TEXT = "héllo ✓ wörld"
    eos_token_id = -1  # never sampled

    def decode(self, ids):
        return self.TEXT.encode()[:len(ids)].decode("utf-8", errors="replace")


def test_streaming_holds_back_half_characters_and_stop_string_starts(setup):
    model, processor, _ = setup
    convs, images = _prompts()
    batch = processor(convs[1:2], images[1:2], padding_side="left", add_generation_prompt=True)
    tok = _ByteTokenizer()
    n = len(tok.TEXT.encode())
    pieces = list(stream_generate(model, batch, tok, max_new_tokens=n))
    assert "".join(pieces) == tok.TEXT == generate(model, batch, n, tokenizer=tok).texts[0]
    assert len(pieces) > 1 and not any("\ufffd" in p for p in pieces)
    # "✓ " might start the stop string "✓ x" until "w" arrives; then it is streamed after all.
    pieces = list(stream_generate(model, batch, tok, max_new_tokens=n, stop_strings=["✓ x"]))
    assert "".join(pieces) == tok.TEXT and "✓ w" in pieces
    pieces = list(stream_generate(model, batch, tok, max_new_tokens=n, stop_strings=["✓ w"]))
    assert "".join(pieces) == "héllo "


def test_right_padding_and_overlong_requests_are_clear_errors(setup):
    model, processor, _ = setup
    convs, images = _prompts()
    batch = processor(convs, images, padding_side="right", add_generation_prompt=True)
    with pytest.raises(ValueError, match="LEFT padding"):
        generate(model, batch, max_new_tokens=4)
    batch = processor(convs[:1], images[:1], padding_side="left", add_generation_prompt=True)
    with pytest.raises(ValueError, match="exceeds"):
        generate(model, batch, max_new_tokens=10**6)
