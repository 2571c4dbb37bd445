"""`tilevlm bench --peer transformers`: tilevlm against transformers' Idefics3 generate on the same
weights and inputs (bench/peer_transformers.py), on a tiny Idefics3-shaped config (no timing asserts),
and the smolvlm_256m preset's facts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from helpers import assert_refused, run_tilevlm
from tilevlm.cli import main
from tilevlm.config import PRESETS, preset
from tilevlm.inference.generation import GenerationStats, generate
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.special_tokens import image_tokens
from tilevlm.bench import peer_transformers as peer_bench
from tilevlm.bench.bench_config import BenchConfig
from tilevlm.bench.speed import format_table, run_bench
from tilevlm.bench.workload import idefics3_token_ids, image_token_ids, synthetic_batch

# smolvlm_256m's mechanism at tiny widths: 32-px tiles of 8-px patches, factor 2 (4 tokens per
# tile), SmolVLM's token layout after a 300-token base vocabulary (<image> at 300 + 38).
TINY = dict(vit_img_size=32, vit_patch_size=8, vit_hidden_dim=32, vit_inter_dim=64, vit_n_heads=2,
            vit_n_blocks=1, lm_hidden_dim=32, lm_inter_dim=64, lm_n_heads=4, lm_n_kv_heads=2,
            lm_n_blocks=2, lm_base_vocab_size=300, lm_vocab_size=340, lm_image_token_id=338,
            mp_pixel_shuffle_factor=2, mp_image_token_length=4, max_img_size=128,
            lm_max_position_embeddings=1024, lm_max_length=1024)


def test_the_preset_is_smolvlm_256m():
    cfg = preset("smolvlm_256m")
    with torch.device("meta"):
        assert VisionLanguageModel(cfg).num_parameters() == 256_484_928  # "256M", untied head
    assert (cfg.vit_img_size, cfg.vit_patch_size, cfg.mp_image_token_length) == (512, 16, 64)
    decoder = (cfg.lm_hidden_dim, cfg.lm_n_blocks, cfg.lm_n_heads, cfg.lm_n_kv_heads)
    assert decoder == (576, 30, 9, 3)
    assert (cfg.lm_vocab_size, cfg.image_token_id) == (49280, 49190)
    ids = idefics3_token_ids(cfg)
    assert (ids["<global-img>"], ids["<row_1_col_1>"], ids["<row_6_col_6>"],
            ids["<fake_token_around_image>"], ids["<image>"]) == (49152, 49153, 49188, 49189, 49190)
    # the real rule: every image to 2048 px, 4x4 + global = 17 tiles, 1088 <image> tokens
    assert image_tokens((4, 4), 64, True, "idefics3").count("<image>") == 1088
    bench = BenchConfig(preset="smolvlm_256m").model_config()  # the bench's: 2x2 + global
    assert (bench.max_img_size, bench.lm_vocab_size) == (1024, 49280)
    # 5 tiles x 64, a wrapper + grid token per tile, the global's 3 markers, 3 "\n"
    assert len(image_token_ids(SimpleNamespace(cfg=bench), (2, 2))) == 5 * 64 + 4 * 2 + 3 + 3


def test_both_models_give_the_same_greedy_tokens_on_the_bench_inputs():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = VisionLanguageModel(BenchConfig(preset="smolvlm_256m", overrides=TINY)
                                .model_config()).eval()
    peer = peer_bench.transformers_model(model)
    batch = synthetic_batch(model, 2, 12, 0, "cpu", 0)  # two rows, each with its own image
    assert batch["pixel_values"].shape[0] == 2 * 5
    ours = generate(model, batch, max_new_tokens=12, eos_token_ids=[]).tokens
    theirs, first, total = peer_bench.transformers_generate(
        peer, peer_bench.transformers_inputs(batch, torch.float32), 12)
    assert theirs.tolist() == ours and 0 < first < total
    with torch.no_grad():  # and the same logits over the prompt: the same weights, not luck
        mine = model(batch["input_ids"], batch["pixel_values"]).logits
        hf = peer(**peer_bench.transformers_inputs(batch, torch.float32)).logits
    assert (mine - hf).abs().max() <= 1e-4


def test_the_peer_figures_use_tilevlms_definitions(monkeypatch):
    """Time to first token is the first token's time; decode is rows x (new - 1) tokens over the
    time after it, as GenerationStats.tokens_per_second counts them."""
    calls = iter([(None, 0.5, 2.5), (None, 0.4, 2.0), (None, 0.3, 2.3)])
    monkeypatch.setattr(peer_bench, "transformers_generate", lambda *a: next(calls))
    bc = BenchConfig(repeats=2, warmup=1, decode_tokens=9)
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long),
             "attention_mask": torch.ones(4, 3, dtype=torch.long),
             "pixel_values": torch.zeros(4, 3, 2, 2)}
    rates = peer_bench.peer_decode(None, batch, torch.float32, bc)
    expected = [GenerationStats(steps=9, batch_rows=4, decode_seconds=t - f).tokens_per_second
                for f, t in ((0.4, 2.0), (0.3, 2.3))]  # the warm-up run is left out
    assert rates["tokens_per_s_total"] == pytest.approx(sum(expected) / 2)
    assert expected[0] == pytest.approx(4 * 8 / 1.6)
    calls = iter([(None, 9.0, 9.1), (None, 0.2, 0.3), (None, 0.4, 0.5), (None, 0.3, 0.4)])
    bc = BenchConfig(repeats=3, warmup=1)
    assert peer_bench.peer_prefill(None, batch, torch.float32, bc)["time_to_first_token_s"] == 0.3


def test_the_bench_prints_both_and_the_ratio(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setitem(PRESETS, "tiny_idefics3", {**PRESETS["smolvlm_256m"], **TINY})
    out = tmp_path / "peer.json"
    code = main(["bench", "--preset", "tiny_idefics3", "--peer", "transformers", "--parts",
                 "prefill", "decode", "--repeats", "1", "--warmup", "1", "--decode-tokens", "6",
                 "--decode-batches", "1", "2", "--threads", "1", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "tilevlm vs transformers" in table and "a 2x2 grid + the global tile" in table
    assert "greedy tokens at fp32, batch 1: the same of 6" in table
    data = json.loads(out.read_text())["peer"]
    assert set(data["tilevlm"]) == {"fp32", "bf16", "int8"}
    assert set(data["transformers"]) == {"fp32", "bf16"}
    rows = data["comparisons"]
    pairings = {(r["workload"], r["pairing"]) for r in rows}
    for workload in ("prefill", "decode_b1", "decode_b2"):
        for pairing in ("fp32", "bf16", "int8 vs their best", "best vs best"):
            assert (workload, pairing) in pairings
    for row in rows:  # the printed ratio is the figures' ratio: times faster tilevlm is
        ours = data["tilevlm"][row["tilevlm"]][row["workload"]]
        theirs = data["transformers"][row["transformers"]][row["workload"]]
        if row["workload"] == "prefill":
            assert ours["time_to_first_token_s"] == row["tilevlm_value"]
            expected = theirs["time_to_first_token_s"] / ours["time_to_first_token_s"]
        else:
            assert ours["tokens_per_s_total"] == row["tilevlm_value"] > 0
            expected = ours["tokens_per_s_total"] / theirs["tokens_per_s_total"]
        assert row["ratio"] == pytest.approx(expected)
        assert f"{row['ratio']:.2f}x" in table
    best = [r for r in rows
            if r["pairing"] == "int8 vs their best" and r["workload"] == "decode_b1"]
    faster = max(data["transformers"].values(), key=lambda v: v["decode_b1"]["tokens_per_s_total"])
    assert best[0]["transformers_value"] == faster["decode_b1"]["tokens_per_s_total"]
    assert ">= 2x" in table and ">= 1.5x" in table  # issue 13's targets, on their rows


def test_one_weight_format_and_the_plain_parts_on_the_idefics3_preset():
    pytest.importorskip("transformers")
    results = run_bench(BenchConfig(preset="smolvlm_256m", overrides=TINY, peer="transformers",
                                    weights="int8", parts=("decode",), repeats=1, warmup=0,
                                    decode_tokens=3, decode_batches=(1,), threads=1),
                        progress=lambda m: None)
    assert set(results["peer"]["tilevlm"]) == {"int8"}
    assert set(results["peer"]["transformers"]) == {"fp32", "bf16"}  # its best is looked for
    assert [r["pairing"] for r in results["peer"]["comparisons"]] == ["int8 vs their best"]
    plain = run_bench(BenchConfig(preset="smolvlm_256m", overrides=TINY, repeats=1, warmup=0,
                                  parts=("train", "prefill", "decode"), decode_tokens=3,
                                  decode_batches=(2,), threads=1), progress=lambda m: None)
    assert "peer" not in plain and plain["decode_b2"]["tokens_per_s_total"] > 0
    assert "training step" in format_table(plain)


def test_peer_options_are_checked():
    bad = [(dict(preset="original_small"), "needs an Idefics3-shaped preset"),
           (dict(preset="smolvlm_256m", parts=("train",)), "add them to --parts"),
           (dict(preset="smolvlm_256m", baseline=True), "drop --baseline"),
           (dict(preset="smolvlm_256m", max_img_size=4096), "grids up to 6x6")]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            BenchConfig(peer="transformers", **fields).validate()
    with pytest.raises(ValueError, match="--peer must be one of transformers"):
        BenchConfig(preset="smolvlm_256m", peer="vllm").validate()


def test_a_wrong_preset_is_one_line_and_exit_2():
    done = run_tilevlm("bench", "--preset", "original_small", "--peer", "transformers",
                       timeout=120)
    assert_refused(done, "bench", "--peer transformers", "--preset smolvlm_256m")


def test_without_transformers_it_says_what_to_install(tmp_path, monkeypatch):
    fake = tmp_path / "hidden" / "transformers"  # shadows the installed package
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named transformers')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "hidden"))
    done = run_tilevlm("bench", "--preset", "smolvlm_256m", "--peer", "transformers", "--parts",
                       "prefill", "decode", timeout=120)
    assert_refused(done, "bench", "--peer transformers", "pip install transformers")
