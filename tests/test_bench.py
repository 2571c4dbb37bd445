"""`tilevlm bench` runs end to end on the tiny preset and writes valid JSON (no timing asserts)."""

import json

import pytest

from tilevlm.bench.bench_config import BenchConfig
from tilevlm.bench.speed import format_table, run_bench
from tilevlm.bench.workload import synthetic_batch
from tilevlm.cli import main
from tilevlm.model.vlm import VisionLanguageModel


def test_bench_cli_tiny_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--preset", "tiny", "--repeats", "1", "--warmup", "0",
                 "--decode-tokens", "4", "--decode-batches", "1", "2", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    for label in ("preprocessing", "vision encoder", "training step", "prefill", "decode, batch 2"):
        assert label in table
    data = json.loads(out.read_text())
    assert data["env"]["torch"] and data["env"]["threads"] >= 1
    assert data["train"]["samples_per_s"] > 0 and data["decode_b2"]["tokens_per_s_total"] > 0
    assert data["preprocess"]["images"] == 40


def test_bench_workload_matches_the_contract():
    bc = BenchConfig(preset="tiny")
    cfg = bc.model_config()
    model = VisionLanguageModel(cfg)
    batch = synthetic_batch(model, 2, bc.prompt_tokens, bc.answer_tokens, "cpu", 0)
    n_image = int((batch["input_ids"] == model.image_token_id).sum())
    assert batch["pixel_values"].shape[0] == 2 * 5  # 2x2 grid + global tile per sample
    assert n_image == batch["pixel_values"].shape[0] * cfg.mp_image_token_length
    assert (batch["labels"] != -100).sum() == 2 * bc.answer_tokens
    loss = model(**batch).loss
    assert loss.isfinite()


def test_original_small_bench_workload_is_245_image_tokens():
    cfg = BenchConfig().model_config()
    assert cfg.max_img_size == 448
    assert 5 * cfg.mp_image_token_length == 245


def test_format_table_lists_only_what_ran():
    bc = BenchConfig(preset="tiny", parts=("vision",), repeats=1, warmup=0)
    table = format_table(run_bench(bc))
    assert "vision encoder" in table and "training step" not in table


def test_bench_fast_path_options_run_and_are_recorded(tmp_path, capsys):
    out = tmp_path / "fast.json"
    code = main(["bench", "--preset", "tiny", "--repeats", "1", "--warmup", "0", "--parts",
                 "train", "prefill", "decode", "--decode-tokens", "3", "--decode-batches", "2",
                 "--weights", "int8", "--train-loss", "full", "--threads", "1", "--baseline",
                 "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "int8 weights" in table and "full loss" in table and "load" in table
    assert table.count("baseline fp32 eager") == 2  # prefill and the one decode batch
    data = json.loads(out.read_text())
    assert data["model"]["inference_weights"] == "int8" and data["env"]["threads"] == 1
    assert data["bench"]["train_loss"] == "full" and data["decode_b2"]["tokens_per_s_total"] > 0
    assert data["decode_b2"]["load_avg_before"] >= 0
    assert data["baseline_prefill"]["time_to_first_token_s"] > 0
    assert data["baseline_decode_b2"]["tokens_per_s_total"] > 0


def test_bench_rejects_bad_options():
    for bad in (dict(weights="fp8"), dict(train_loss="some"), dict(threads=0), dict(repeats=0)):
        with pytest.raises(ValueError):
            run_bench(BenchConfig(preset="tiny", parts=("vision",), **bad))
