"""The training step's counted FLOPs and the GEMM peak the bench divides them by."""

import json

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
