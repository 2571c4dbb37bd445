"""The training step's counted FLOPs and the GEMM peak the bench divides them by; a decode step's
weight bytes and the memory bandwidth (the decode bound)."""

import json

import pytest
import torch
import torch.nn.functional as F

from tilevlm.bench.roofline import count_flops, gemm_peak
from helpers import run_tilevlm


def test_linear_forward_and_backward_flops_are_three_matmuls():
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(10, 64, requires_grad=True)
    flops = count_flops(lambda: lin(x).sum().backward())
    # forward x @ W^T, backward dL/dx and dL/dW: three 10x64x32 products of 2 FLOPs a term
    assert flops.matmul == 3 * 2 * 10 * 64 * 32 and flops.attention == 0


def test_cpu_attention_is_counted_and_causal_counts_half():
    q, k, v = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))
    forward_only = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert forward_only.attention == 2 * (2 * 2 * 4 * 16 * 16 * 8)  # scores and values
    full = count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    causal = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
                         .sum().backward())
    assert full.attention > forward_only.attention and causal.attention * 2 == full.attention


def test_gemm_peak_is_a_positive_rate():
    assert gemm_peak(torch.float32, torch.device("cpu"), seconds=0.05) > 0


def test_bench_train_prints_the_roofline(tmp_path):
    out = tmp_path / "b.json"
    result = run_tilevlm("bench", "--preset", "tiny", "--parts", "train", "--repeats", "1",
                         "--warmup", "1", "--threads", "1", "--json", str(out), timeout=240)
    assert result.returncode == 0, result.stderr
    assert "training roofline" in result.stdout and "GFLOP counted per step" in result.stdout
    train = json.loads(out.read_text())["train"]
    assert train["gflop"] == train["gflop_matmul"] + train["gflop_attention"] > 0
    assert train["gflop_attention"] > 0 and train["gemm_peak_gflops"] > 0
    assert abs(train["peak_fraction"] - train["gemm_bound_s"] / train["seconds_per_step"]) < 1e-9


def test_bench_times_the_bf16_weights_step(tmp_path):
    out = tmp_path / "b.json"
    result = run_tilevlm("bench", "--preset", "tiny", "--parts", "train", "prefill", "--repeats",
                         "1", "--warmup", "0", "--dtype", "bf16", "--bf16-mode", "weights",
                         "--threads", "1", "--json", str(out), timeout=240)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["train"]["precision"] == "bf16 weights + fp32 masters"
    assert "bf16 weights + fp32 masters" in result.stdout and data["prefill"]["time_to_first_token_s"] > 0


# ----------------------------------------------------------------------------- the decode bound

def test_a_decode_step_reads_the_blocks_the_norm_and_the_head():
    import copy

    from tilevlm.bench.bandwidth import decode_weight_bytes
    from tilevlm.config import preset
    from tilevlm.inference.quantize import inference_weights
    from tilevlm.model.vlm import VisionLanguageModel

    model = VisionLanguageModel(preset("tiny")).eval()
    d = model.decoder
    blocks = sum(p.numel() for p in d.blocks.parameters()) + d.norm.weight.numel()
    tied_head = d.token_embedding.weight.numel()  # tiny ties its head to the embedding
    assert decode_weight_bytes(model) == 4 * (blocks + tied_head)
    d.setup_cache(1, 16)  # an attached KV cache is not weights
    assert decode_weight_bytes(model) == 4 * (blocks + tied_head)
    d.clear_cache()
    int8 = inference_weights(copy.deepcopy(model), "int8")
    head = int8.decoder.lm_head  # its own int8 copy: one byte a weight and a scale a row
    assert decode_weight_bytes(int8) < decode_weight_bytes(model) / 3
    assert head.weight_int8.numel() == tied_head
    int4 = inference_weights(copy.deepcopy(model), "int4")
    assert decode_weight_bytes(int4) < decode_weight_bytes(int8)


def test_the_bound_is_the_bandwidth_over_the_bytes():
    from tilevlm.bench.bandwidth import decode_roofline, memory_bandwidth

    assert memory_bandwidth(torch.device("cpu"), mib=8, copies=2) > 0
    row = decode_roofline(tokens_per_s=40.0, batch=8, step_bytes=10**8, gbps=20.0)
    assert row["bound_tokens_per_s"] == 8 * 200.0  # 20 GB/s over 100 MB: 200 steps of 8 rows
    assert row["bound_fraction"] == 40.0 / 1600.0 and row["weight_mb_per_step"] == 100.0


def test_bench_decode_prints_its_share_of_the_bound(tmp_path):
    from tilevlm.bench.bench_config import BenchConfig
    from tilevlm.bench.speed import format_table, run_bench

    bc = BenchConfig(preset="tiny", parts=("decode",), repeats=1, warmup=0, decode_tokens=3,
                     decode_batches=(1, 2), bandwidth_mib=16, threads=1)
    results = run_bench(bc)
    table = format_table(results)
    assert "memory bandwidth" in table and "of the bandwidth bound" in table
    gbps = results["bandwidth"]["gbps"]
    for b in (1, 2):
        d = results[f"decode_b{b}"]
        assert d["bound_tokens_per_s"] == pytest.approx(gbps * 1e9 / (d["weight_mb_per_step"] * 1e6) * b)
        assert d["bound_fraction"] == pytest.approx(d["tokens_per_s_total"] / d["bound_tokens_per_s"])
