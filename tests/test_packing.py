"""Packing: document masks and positions, best-fit plans under token and tile caps, padding
figures, and per-sample loss parity between a packed batch and the samples run alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tilevlm.config import IGNORE_INDEX
from tilevlm.data.lengths import LengthFilter
from tilevlm.data.packing import (PackedCollator, document_attention_mask, group_packs,
                                  pack_samples, segment_positions)
from tilevlm.data.skips import SkipCounter
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.preprocessing.processor import Processor

from helpers import PackedBatches, png


def sample(question: str, answer: str, images: list[bytes], name: str) -> dict:
    return {"messages": [{"role": "user", "content": "<image>" * len(images) + question},
                         {"role": "assistant", "content": answer}],
            "images": images, "source": name}


def mixed_samples() -> list[dict]:
    """Text only, 1 tile, 1x2 + global, 3x3 + global, two 3x3 + global images (20 tiles)."""
    return [sample("What colour?", "Red.", [png(32, 32)], "a"),
            sample("Hello there, how are you?", "Fine, thanks.", [], "b"),
            sample("Wide?", "Yes, it is wide.", [png(64, 32, 1)], "c"),
            sample("Describe the picture.", "A gradient.", [png(96, 96, 2)], "d"),
            sample("Compare.", "The same.", [png(96, 90, 3), png(90, 96, 4)], "e")]


@pytest.fixture
def processor(tiny_config, tiny_tokenizer) -> Processor:
    return Processor(tiny_config, tiny_tokenizer)


def measured(n_tokens: list[int], n_tiles: list[int]) -> list[dict]:
    return [{"n_tokens": t, "n_tiles": k, "source": str(i)}
            for i, (t, k) in enumerate(zip(n_tokens, n_tiles))]


# ----------------------------------------------------------------------------- masks, positions
def test_document_mask_is_causal_within_each_segment():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    mask = document_attention_mask(seg)
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]], dtype=torch.bool)  # the pad sees only itself
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], expected)


def test_positions_restart_per_segment_and_match_the_mask():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    pos = segment_positions(seg)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7]]
    # What the decoder derives from a 4-D mask when no position_ids are given.
    from_mask = document_attention_mask(seg)[:, 0].sum(-1) - 1
    assert torch.equal(from_mask, pos)


# ----------------------------------------------------------------------------- planning
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 120), st.integers(0, 12)), max_size=40),
       st.integers(1, 8), st.integers(1, 4))
def test_packs_respect_budgets_and_use_every_fitting_sample_once(items, window, rows):
    max_tokens, max_tiles = 100, 10
    samples = measured([t for t, _ in items], [k for _, k in items])
    skips = SkipCounter()
    packs = list(pack_samples(samples, max_tokens, max_tiles, window, skips))
    for pack in packs:
        assert pack and sum(s["n_tokens"] for s in pack) <= max_tokens
        assert sum(s["n_tiles"] for s in pack) <= max_tiles
    used = sorted(int(s["source"]) for pack in packs for s in pack)
    fitting = [i for i, (t, k) in enumerate(items) if t <= max_tokens and k <= max_tiles]
    assert used == fitting and skips.total == len(items) - len(fitting)
    for group in group_packs(packs, rows, max_tiles):
        assert 1 <= len(group) <= rows
        assert sum(s["n_tiles"] for pack in group for s in pack) <= max_tiles
    assert packs == list(pack_samples(samples, max_tokens, max_tiles, window))  # deterministic


def test_best_fit_fills_the_tightest_row():
    samples = measured([60, 70, 30, 40, 25], [0] * 5)
    packs = [[int(s["source"]) for s in p] for p in pack_samples(samples, 100, 10, window=4)]
    # 30 fits both open rows (room 40 and 30): best fit picks the 70 row, which is then full.
    assert packs == [[1, 2], [0, 3], [4]]


def test_oversized_samples_are_counted_not_packed():
    skips = SkipCounter()
    packs = list(pack_samples(measured([10, 500, 10], [20, 1, 1]), 100, 8, skips=skips))
    assert [[s["source"] for s in p] for p in packs] == [["2"]]
    assert skips.as_dict() == {"too_many_tiles": 1, "too_long": 1}


# ----------------------------------------------------------------------------- batches
def test_tile_cap_holds_per_micro_batch(processor):
    samples = list(LengthFilter(mixed_samples() * 3, processor))
    skips = SkipCounter()
    batches = list(PackedBatches(samples, processor, max_tiles=12, rows=4, skips=skips))
    assert skips.as_dict() == {"too_many_tiles": 3}  # "e": two 3x3+global images = 20 tiles
    for batch in batches:
        assert batch.inputs["pixel_values"].shape[0] == sum(batch.info["n_tiles"]) <= 12
        assert batch.inputs["input_ids"].shape[0] <= 4
    assert sum(b.n_samples for b in batches) == 12


def test_padding_fraction_is_reported_per_pass(processor):
    samples = list(LengthFilter(mixed_samples()[:4] * 2, processor))
    real = sum(s["n_tokens"] for s in samples)
    packer = PackedBatches(samples, processor, max_tokens=256, max_tiles=64, rows=2)
    batches = list(packer)
    slots = sum(b.inputs["input_ids"].numel() for b in batches)
    assert sum(b.n_real_tokens for b in batches) == real
    assert sum(int((b.info["segment_ids"] != 0).sum()) for b in batches) == real
    assert packer.stats.padding_fraction == pytest.approx(1 - real / slots)
    assert packer.stats.samples == 8 and packer.stats.batches == len(batches)
    list(packer)  # a second pass (epoch): same figures, recorded separately
    assert len(packer.epoch_stats) == 2 and packer.epoch_stats[1] == packer.epoch_stats[0]

    fixed = PackedBatches(samples, processor, max_tokens=256, max_tiles=64, rows=2,
                          pad_to_budget=True)
    shapes = {tuple(b.inputs["input_ids"].shape[1:]) for b in fixed}
    assert shapes == {(256,)}
    assert fixed.stats.slots == fixed.stats.rows * 256
    assert fixed.stats.padding_fraction == pytest.approx(1 - real / fixed.stats.slots)


def test_images_that_fail_to_decode_are_skipped_and_counted(processor):
    good = png(32, 32)
    broken = sample("Truncated?", "Yes.", [good[: len(good) // 2]], "broken")
    samples = list(LengthFilter([broken, *mixed_samples()[:2]], processor))
    assert len(samples) == 3  # the header is fine: only decoding finds the damage
    batch = PackedCollator(processor)([samples])
    assert batch.skipped == {"image_error": 1} and batch.n_skipped == 1
    assert batch.info["sources"] == [["a", "b"]] and batch.n_samples == 2


def segment_losses(logits: torch.Tensor, labels: torch.Tensor,
                   segment_ids: torch.Tensor) -> list[list[float]]:
    """Per row, the mean next-token cross-entropy of each segment (1, 2, ...), computed as the
    model's loss is (logits[:, t] predicts labels[:, t + 1]); NaN for a segment with no label.
    The reference the packed losses are checked against."""
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                         ignore_index=IGNORE_INDEX, reduction="none")  # (B, T-1)
    counted = (labels[:, 1:] != IGNORE_INDEX).float()  # (B, T-1)
    seg = segment_ids[:, 1:]  # the segment of the predicted token
    out = []
    for b in range(logits.shape[0]):
        n_seg = int(segment_ids[b].max())
        per = [(ce[b] * (seg[b] == s)).sum() / (counted[b] * (seg[b] == s)).sum()
               for s in range(1, n_seg + 1)]
        out.append([float(x) for x in per])
    return out


def test_packed_loss_equals_each_sample_alone(tiny_config, processor):
    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_config).eval()
    samples = list(LengthFilter(mixed_samples(), processor))
    by_name = {s["source"]: s for s in samples}
    batches = list(PackedBatches(samples, processor, max_tokens=400, max_tiles=64, rows=2))
    assert max(len(row) for b in batches for row in b.info["sources"]) > 1  # something packed
    with torch.no_grad():
        for batch in batches:
            inputs, segment_ids = batch.inputs, batch.info["segment_ids"]
            out = model(**inputs)
            packed = segment_losses(out.logits, inputs["labels"], segment_ids)
            # Without position_ids the decoder derives the same ones from the document mask.
            implicit = model(**{**inputs, "position_ids": None}).logits
            torch.testing.assert_close(implicit, out.logits, rtol=0, atol=0)
            # The check can fail: with a padding mask only, later samples see earlier ones.
            leaky = model(inputs["input_ids"], inputs.get("pixel_values"),
                          attention_mask=(segment_ids != 0).long()).logits
            leaky_losses = segment_losses(leaky, inputs["labels"], segment_ids)
            if max(len(row) for row in packed) > 1:
                assert max(abs(a - b) for ra, rb in zip(packed, leaky_losses)
                           for a, b in zip(ra, rb)) > 1e-3
            for row, names in zip(packed, batch.info["sources"]):
                for loss, name in zip(row, names):
                    s = by_name[name]
                    alone = processor([s["messages"]], [s["images"]])
                    ref = model(alone["input_ids"], alone["pixel_values"],
                                labels=alone["labels"]).loss
                    assert abs(loss - ref.item()) < 1e-5, name


def test_decoder_refuses_a_bad_4d_mask(tiny_config):
    model = VisionLanguageModel(tiny_config).eval()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="boolean"):
        model(ids, attention_mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="uncached"):
        model.decoder.setup_cache(1, 8)
        model.decoder(model.decoder.embed(ids), attention_mask=torch.ones(1, 1, 4, 4,
                      dtype=torch.bool), cache_position=torch.arange(4))
