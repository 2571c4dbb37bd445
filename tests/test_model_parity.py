"""Parity with `transformers` on tiny random models (weights copied by the real converter),
cached vs uncached decoding, and pixel shuffle against an explicit-loop reference."""

from __future__ import annotations

import pytest
import torch

from helpers import LLAMA_VOCAB, base_config, make_llama, make_siglip
from tilevlm.weights.huggingface import build_from_hf
from tilevlm.model import pixel_shuffle

pytest.importorskip("transformers")

TOL = dict(atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dirs = {name: root / name for name in ("siglip", "siglip_full", "llama_tied", "llama_untied")}
    models = {
        "siglip": make_siglip(dirs["siglip"]),
        "siglip_full": make_siglip(dirs["siglip_full"], full=True, seed=1),
        "llama_tied": make_llama(dirs["llama_tied"], tie=True),
        "llama_untied": make_llama(dirs["llama_untied"], tie=False, seed=1),
    }
    return dirs, models


@pytest.fixture(scope="module")
def built(hf_dirs):
    dirs, _ = hf_dirs
    return {tie: build_from_hf(dirs["siglip"], dirs[f"llama_{tie}"], base_config())
            for tie in ("tied", "untied")}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("which", ["siglip", "siglip_full"])
def test_vision_encoder_matches_siglip(hf_dirs, which):
    dirs, models = hf_dirs
    model = build_from_hf(dirs[which], dirs["llama_tied"], base_config())
    pixels = torch.randn(3, 3, 32, 32)
    hf = models[which]
    hf_vision = hf.vision_model if which == "siglip_full" else hf
    with torch.no_grad():
        ref = hf_vision(pixel_values=pixels).last_hidden_state
        ours = model.vision_encoder(pixels)
    assert ours.shape == ref.shape == (3, 64, 32)
    torch.testing.assert_close(ours, ref, **TOL)


def _left_padded_batch(gen: torch.Generator, lengths: list[int], total: int):
    ids = torch.randint(3, LLAMA_VOCAB, (len(lengths), total), generator=gen)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n:] = 1
        ids[row, : total - n] = 0
    return ids, mask


@pytest.mark.parametrize("tie", ["tied", "untied"])
@pytest.mark.parametrize("padded", [False, True])
def test_decoder_matches_llama(hf_dirs, built, tie, padded):
    _, models = hf_dirs
    hf, decoder = models[f"llama_{tie}"], built[tie].decoder
    gen = torch.Generator().manual_seed(0)
    ids, mask = _left_padded_batch(gen, [12, 7, 3] if padded else [12, 12, 12], 12)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        ours = decoder.logits(decoder(decoder.embed(ids), attention_mask=mask))
    assert ours.shape[-1] == LLAMA_VOCAB + 2 + 64
    real = mask.bool()
    diff = _max_diff(ours[..., :LLAMA_VOCAB][real], ref[real])
    assert diff <= 1e-4, diff


def _cached_hidden(decoder, embeds, mask, prompt_len, max_len):
    """Prefill `prompt_len` tokens, then decode the rest one token at a time."""
    decoder.setup_cache(embeds.shape[0], max_len)
    try:
        steps = [decoder(embeds[:, :prompt_len], attention_mask=mask[:, :prompt_len],
                         cache_position=torch.arange(prompt_len))]
        for t in range(prompt_len, embeds.shape[1]):
            steps.append(decoder(embeds[:, t:t + 1], attention_mask=mask[:, : t + 1],
                                 cache_position=torch.tensor([t])))
    finally:
        decoder.clear_cache()
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_matches_full_forward(built, hf_dirs, padded):
    _, models = hf_dirs
    decoder = built["tied"].decoder
    gen = torch.Generator().manual_seed(1)
    ids, mask = _left_padded_batch(gen, [14, 9] if padded else [14, 14], 14)
    with torch.no_grad():
        embeds = decoder.embed(ids)
        full = decoder(embeds, attention_mask=mask)
        cached = _cached_hidden(decoder, embeds, mask, prompt_len=6, max_len=32)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = models["llama_tied"](input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert _max_diff(cached[real], full[real]) <= 1e-5
    assert _max_diff(decoder.logits(cached)[..., :LLAMA_VOCAB][real], ref[real]) <= 1e-4


@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 1), (4, 4)])
def test_decode_attention_matches_repeated_kv(heads, kv_heads):
    """One query per row (a decode step) against a padded cache: GQA with K/V repeated per head."""
    from tilevlm.model.language import _sdpa

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, heads, 1, 16, generator=gen)
    k, v = (torch.randn(3, kv_heads, 11, 16, generator=gen) for _ in range(2))
    mask = torch.ones(3, 1, 1, 11, dtype=torch.bool)
    mask[1, ..., :4] = False  # a left-padded row
    mask[2, ..., 9:] = False  # slots not written yet
    groups = heads // kv_heads
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=mask)
    assert _max_diff(_sdpa(q, k, v, mask), ref) <= 1e-6


def test_cache_needs_setup_and_mask_fits(built):
    decoder = built["tied"].decoder
    embeds = torch.zeros(1, 2, 64)
    with pytest.raises(ValueError, match="setup_cache"):
        decoder(embeds, cache_position=torch.arange(2))
    decoder.setup_cache(1, 4)
    try:
        with pytest.raises(ValueError, match="max_len"):
            decoder(embeds, attention_mask=torch.ones(1, 5), cache_position=torch.arange(2))
    finally:
        decoder.clear_cache()


def test_decode_step_has_no_graph_breaks(built):
    decoder = built["tied"].decoder
    decoder.setup_cache(2, 16)
    try:
        step = (torch.zeros(2, 1, 64), torch.ones(2, 16, dtype=torch.long), None, torch.tensor([5]))
        explanation = torch._dynamo.explain(decoder)(*step)
    finally:
        decoder.clear_cache()
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons


def _pixel_shuffle_reference(x: torch.Tensor, f: int) -> torch.Tensor:
    """Explicit loops: token (i, j) = concat over (a, b), a outer, of patch (i*f + a, j*f + b)."""
    n, seq, d = x.shape
    side = int(round(seq ** 0.5))
    out = torch.empty(n, (side // f) ** 2, d * f * f)
    for img in range(n):
        for i in range(side // f):
            for j in range(side // f):
                chunks = [x[img, (i * f + a) * side + (j * f + b)] for a in range(f) for b in range(f)]
                out[img, i * (side // f) + j] = torch.cat(chunks)
    return out


@pytest.mark.parametrize("side,factor", [(4, 2), (6, 3), (8, 2), (4, 1)])
def test_pixel_shuffle_matches_loops(side, factor):
    x = torch.randn(2, side * side, 5)
    assert torch.equal(pixel_shuffle(x, factor), _pixel_shuffle_reference(x, factor))


def test_pixel_shuffle_errors():
    with pytest.raises(ValueError, match="square"):
        pixel_shuffle(torch.zeros(1, 15, 4), 2)
    with pytest.raises(ValueError, match="divide"):
        pixel_shuffle(torch.zeros(1, 36, 4), 4)
