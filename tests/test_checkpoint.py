"""Weights: own-format round trip, HF build, nanoVLM directories, bad checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tilevlm.weights.huggingface import build_from_hf
from tilevlm.weights.nanovlm import load_nanovlm
from tilevlm.weights.native import load_pretrained, save_pretrained
from tilevlm.config import preset
from tilevlm.special_tokens import IMAGE_TOKEN
from tilevlm.model import VisionLanguageModel

from helpers import (LLAMA_VOCAB, base_config, make_llama, make_siglip, write_base_tokenizer,
                     write_nanovlm)


def _tiny(tie: bool = True) -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel(preset("tiny", lm_tie_weights=tie))


def _assert_same_weights(a: VisionLanguageModel, b: VisionLanguageModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _tiny_input(model: VisionLanguageModel):
    ids = torch.randint(0, model.cfg.lm_base_vocab_size, (1, 24))
    ids[0, 2:2 + model.cfg.mp_image_token_length] = model.image_token_id
    return ids, torch.rand(1, 3, 32, 32)


class _FakeTokenizer:
    def save(self, directory) -> None:
        (Path(directory) / "tokenizer.json").write_text("{}")


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_is_bit_exact(tmp_path, tie):
    model = _tiny(tie)
    save_pretrained(model, tmp_path, tokenizer=_FakeTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    stored = load_file(tmp_path / "model.safetensors")
    assert ("decoder.lm_head.weight" in stored) is (not tie)  # a tied head is never stored twice
    loaded = load_pretrained(tmp_path)
    assert loaded.cfg == model.cfg
    _assert_same_weights(model, loaded)
    ids, pixels = _tiny_input(model)
    with torch.no_grad():
        assert torch.equal(model(ids, pixels).logits, loaded(ids, pixels).logits)


def test_load_pretrained_in_bf16(tmp_path):
    model = _tiny()
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert not any(p.is_meta for p in loaded.parameters())
    expected = model.decoder.token_embedding.weight.to(torch.bfloat16)
    assert torch.equal(loaded.decoder.token_embedding.weight, expected)


def test_build_from_hf_keeps_base_weights_and_adds_special_rows(tmp_path):
    hf_llama = make_llama(tmp_path / "llama", tie=False, sharded=True)
    make_siglip(tmp_path / "siglip")
    model = build_from_hf(tmp_path / "siglip", tmp_path / "llama", base_config(), grid_side=8)
    cfg = model.cfg
    assert (cfg.lm_base_vocab_size, cfg.lm_vocab_size) == (LLAMA_VOCAB, LLAMA_VOCAB + 66)
    assert (cfg.vit_hidden_dim, cfg.vit_img_size, cfg.mp_image_token_length) == (32, 32, 16)
    assert (cfg.lm_re_base, cfg.lm_n_kv_heads, cfg.lm_tie_weights) == (50000.0, 2, False)
    for ours, theirs in ((model.decoder.token_embedding.weight, hf_llama.model.embed_tokens.weight),
                         (model.decoder.lm_head.weight, hf_llama.lm_head.weight)):
        assert torch.equal(ours[:LLAMA_VOCAB], theirs)
        new_rows = ours[LLAMA_VOCAB:]
        assert new_rows.shape[0] == 66
        torch.testing.assert_close(new_rows, theirs.mean(0).expand_as(new_rows))
    q = hf_llama.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(model.decoder.blocks[1].attn.qkv.weight[: q.shape[0]], q)
    ids, pixels = _tiny_input(model)
    assert torch.isfinite(model(ids, pixels).logits).all()


def test_nanovlm_directory_loads_and_runs(tmp_path):
    source = _tiny()
    write_nanovlm(tmp_path / "nano", source)
    # the plain base tokenizer nanoVLM starts from: it gains our tokens on loading, as in nanoVLM
    write_base_tokenizer(tmp_path / "tok", source.cfg.lm_base_vocab_size)
    model = load_nanovlm(tmp_path / "nano", tokenizer_dir=tmp_path / "tok")
    assert (model.cfg.image_mean, model.cfg.image_std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert model.cfg.image_token_layout == "nanovlm"
    _assert_same_weights(source, model)
    ids, pixels = _tiny_input(model)
    with torch.no_grad():
        assert torch.equal(model(ids, pixels).logits, source(ids, pixels).logits)
    write_base_tokenizer(tmp_path / "other", source.cfg.lm_base_vocab_size - 1)
    with pytest.raises(ValueError, match="special token ids"):
        load_nanovlm(tmp_path / "nano", tokenizer_dir=tmp_path / "other")
    with pytest.raises(ValueError, match="load_nanovlm"):
        load_pretrained(tmp_path / "nano")


def test_older_nanovlm_with_one_extra_token_is_grown(tmp_path):
    source = _tiny()
    base = source.cfg.lm_base_vocab_size
    write_nanovlm(tmp_path, source)
    data = json.loads((tmp_path / "config.json").read_text())
    data.update(vlm_extra_tokens={"image_token": IMAGE_TOKEN}, extra_token_amount=1,
                lm_vocab_size=base + 1)
    (tmp_path / "config.json").write_text(json.dumps(data))

    def shrink(t):
        t["decoder.head.weight"] = t["decoder.head.weight"][: base + 1].contiguous()
    _rewrite(tmp_path, shrink)
    model = load_nanovlm(tmp_path)
    emb = model.decoder.token_embedding.weight
    kept = source.decoder.token_embedding.weight[: base + 1]
    assert emb.shape[0] == base + 66 and torch.equal(emb[: base + 1], kept)
    torch.testing.assert_close(emb[base + 1:], kept.mean(0).expand(65, -1))


@pytest.fixture
def saved(tmp_path) -> Path:
    save_pretrained(_tiny(), tmp_path)
    return tmp_path


def _rewrite(directory: Path, change) -> None:
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors")


def test_missing_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.pop("decoder.blocks.1.mlp.down.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: decoder\.blocks\.1\.mlp\.down\.weight"):
        load_pretrained(saved)


def test_wrong_shape_is_named(saved):
    def shrink(t):
        t["projector.proj.weight"] = t["projector.proj.weight"][:, :10].contiguous()
    _rewrite(saved, shrink)
    with pytest.raises(ValueError, match=r"wrong shapes: projector\.proj\.weight \(checkpoint"):
        load_pretrained(saved)


def test_truncated_safetensors(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        load_pretrained(saved)


def test_pickle_only_is_refused_without_unpickling(tmp_path):
    (tmp_path / "config.json").write_text(preset("tiny").to_json())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ValueError, match="convert them to safetensors|Convert them to safetensors"):
        load_pretrained(tmp_path)


def test_hf_missing_layer_is_listed(tmp_path):
    make_siglip(tmp_path / "siglip")
    make_llama(tmp_path / "llama")
    _rewrite(tmp_path / "llama", lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.0\.self_attn\.k_proj"):
        build_from_hf(tmp_path / "siglip", tmp_path / "llama", base_config())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        build_from_hf(tmp_path / "empty", tmp_path / "llama", base_config())


def test_saved_model_files_get_the_users_umask_not_0600(tmp_path):
    """atomic_write's temporary file is 0600; the finished file must be as readable as any file
    the user creates (a model directory shared with a group, a served export)."""
    import tilevlm.files as files
    from tilevlm.config import preset
    from tilevlm.model.vlm import VisionLanguageModel
    from tilevlm.weights.native import save_pretrained

    save_pretrained(VisionLanguageModel(preset("tiny")), tmp_path / "m")
    expected = 0o666 & ~files._UMASK
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert modes and all(mode == expected for mode in modes.values()), modes
