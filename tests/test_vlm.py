"""VisionLanguageModel: image input forms, chunked vision, the placeholder contract, loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tilevlm.config import preset
from tilevlm.model import VisionLanguageModel, flatten_tiles


@pytest.fixture(scope="module")
def model() -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel(preset("tiny")).eval()


def _batch(model: VisionLanguageModel, tiles_per_sample: list[int], length: int = 60):
    """input_ids [B, length] with a grid token + L image tokens per tile, after some text."""
    per_tile = model.cfg.mp_image_token_length
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.lm_base_vocab_size, (len(tiles_per_sample), length), generator=gen)
    for row, n in enumerate(tiles_per_sample):
        start = 3
        for k in range(n):
            ids[row, start] = model.grid_token_id(1, k + 1)
            ids[row, start + 1: start + 1 + per_tile] = model.image_token_id
            start += 1 + per_tile
    return ids


def test_token_ids_follow_the_base_vocab(model):
    base = model.cfg.lm_base_vocab_size
    assert model.image_token_id == base
    assert model.global_image_token_id == base + 1
    assert model.grid_token_id(1, 1) == base + 2
    assert model.grid_token_id(8, 8) == base + 2 + 63 == model.cfg.lm_vocab_size - 1
    with pytest.raises(ValueError):
        model.grid_token_id(9, 1)


def test_all_pixel_value_forms_give_identical_logits(model):
    ids = _batch(model, [2, 1])
    tiles = torch.randn(3, 3, 32, 32)
    forms = [
        tiles,                                              # one tensor [N, 3, T, T]
        [tiles[:2], tiles[2:]],                             # per-image tile tensors
        [[tiles[0], tiles[1]], [tiles[2]]],                 # per-sample lists of tiles
        [[tiles[:2]], [tiles[2:3]]],                        # per-sample lists of per-image tensors
    ]
    with torch.no_grad():
        logits = [model(ids, pixel_values=form).logits for form in forms]
    for other in logits[1:]:
        assert torch.equal(logits[0], other)
    assert logits[0].shape == (2, 60, model.cfg.lm_vocab_size)


def test_flatten_tiles_handles_empty_forms():
    assert flatten_tiles(None) is None
    assert flatten_tiles([]) is None
    assert flatten_tiles([[], []]) is None
    assert flatten_tiles([torch.zeros(3, 8, 8)]).shape == (1, 3, 8, 8)


def test_chunked_vision_equals_unchunked(model):
    ids = _batch(model, [2, 3], length=120)
    tiles = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        whole = model(ids, pixel_values=tiles).logits
        model.vision_chunk_size = 2
        try:
            chunked = model(ids, pixel_values=tiles).logits
        finally:
            model.vision_chunk_size = None
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


def test_images_land_on_their_placeholders(model):
    """Changing tile k changes only the positions after tile k's first placeholder."""
    ids = _batch(model, [2])
    tiles = torch.randn(2, 3, 32, 32)
    changed = tiles.clone()
    changed[1] += 1.0
    with torch.no_grad():
        a = model.embed_inputs(ids, tiles)
        b = model.embed_inputs(ids, changed)
    differs = (a != b).any(-1)[0]
    positions = differs.nonzero().flatten()
    per_tile = model.cfg.mp_image_token_length
    second = (ids[0] == model.image_token_id).nonzero().flatten()[per_tile:]
    assert torch.equal(positions, second)


def test_placeholder_contract_error_names_both_numbers(model):
    ids = _batch(model, [2])
    with pytest.raises(ValueError, match=r"8 image-token placeholders.*1 tiles x 4 .* = 4"):
        model(ids, pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"8 image-token placeholders.*0 tiles"):
        model(ids)


def test_text_only_batch(model):
    ids = torch.randint(0, model.cfg.lm_base_vocab_size, (2, 10))
    with torch.no_grad():
        out = model(ids, attention_mask=torch.ones(2, 10), labels=ids)
        same = model(ids, pixel_values=[], labels=ids)
    assert out.logits.shape == (2, 10, model.cfg.lm_vocab_size)
    assert torch.isfinite(out.loss)
    assert torch.equal(out.logits, same.logits)


def test_loss_is_shifted_and_ignores_minus_100(model):
    ids = _batch(model, [1, 1], length=30)
    tiles = torch.randn(2, 3, 32, 32)
    labels = ids.clone()
    labels[:, :20] = -100  # prompt and image tokens carry no loss
    with torch.no_grad():
        out = model(ids, pixel_values=tiles, labels=labels)
        logits = out.logits
        manual = F.cross_entropy(logits[:, 19:-1].reshape(-1, logits.shape[-1]),
                                 ids[:, 20:].reshape(-1))
        # What the ignored labels hold must not matter.
        labels_other = labels.clone()
        labels_other[:, :20] = -100
        labels_other[0, 5] = -100
        again = model(ids, pixel_values=tiles, labels=labels_other).loss
    torch.testing.assert_close(out.loss, manual)
    torch.testing.assert_close(again, manual)
    nothing = model(ids, pixel_values=tiles, labels=torch.full_like(ids, -100)).loss
    assert nothing.item() == 0.0


def test_gradients_reach_every_part():
    torch.manual_seed(0)
    model = VisionLanguageModel(preset("tiny"))
    ids = _batch(model, [1], length=24)
    out = model(ids, pixel_values=torch.randn(1, 3, 32, 32), labels=ids)
    out.loss.backward()
    for name in ("vision_encoder.patch_embed.weight", "projector.proj.weight",
                 "decoder.blocks.0.attn.qkv.weight", "decoder.token_embedding.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_left_padded_batch_matches_unpadded_rows(model):
    ids = _batch(model, [1], length=30)
    tiles = torch.randn(1, 3, 32, 32)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 30)], dim=1).long()
    with torch.no_grad():
        alone = model(ids, pixel_values=tiles).logits
        batched = model(padded, pixel_values=tiles, attention_mask=mask).logits[:, 5:]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_num_parameters_original_small():
    with torch.device("meta"):
        model = VisionLanguageModel(preset("original_small"))
    vision = sum(p.numel() for p in model.vision_encoder.parameters())
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert vision == 85_797_120  # SigLIP-B/16-224 vision tower without the pooling head
    assert decoder == 134_515_008 + 66 * 576  # SmolLM2-135M + our 66 special-token rows
    assert model.num_parameters() == vision + decoder + 768 * 4 * 576 == 222_119_616
