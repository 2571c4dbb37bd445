"""`tilevlm train --fsdp`: FSDP2 over two processes (torchrun, gloo, CPU) trains exactly as one
unsharded process with the same global batch, and its checkpoints (gathered into the one-process
format) resume across world sizes: 2 -> 1 and 1 -> 2.

The data alternates image and text-only rows in file order, so rank 1's micro-batches never hold
an image: every FSDP step also runs the blank-tile path (`fsdp.vision_run`) that keeps both
ranks' all-gathers in step. The sharded run also checkpoints its activations, validates (on a
gathered copy) and writes OUT/model/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (SMALL, assert_refused, png, records, run_tilevlm,
                     step_records, torchrun, train_cli)

COMMON = ("--warmup-steps", "1", "--lr-decoder", "2e-3", "--lr-vision", "2e-3",
          "--lr-projector", "2e-3", "--shuffle-block", "0", "--steps", "4", "--grad-accum", "2",
          "--save-every", "2")


def tensors(directory: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(directory / name))


def assert_close_tensors(a: dict, b: dict, atol: float = 1e-5, rtol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=rtol, msg=key)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, hf_tokenizer_dir):
    """(config, data, one-process reference run: batch 4, checkpoints at steps 2 and 4)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tilevlm import preset

    root = tmp_path_factory.mktemp("fsdp")
    config = root / "config.json"
    preset("tiny", **{**SMALL, "vit_n_blocks": 2, "lm_n_blocks": 2}).to_json(config)
    rows = [{"images": [{"bytes": png(24 + 8 * (i % 3), 32, i), "path": None}] if i % 2 == 0
             else [], "texts": [{"user": f"What is in picture {i}?",
                                 "assistant": f"Picture {i} is red."}]} for i in range(16)]
    data = root / "alternating.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    train_cli(config, hf_tokenizer_dir, data, root / "one", *COMMON, "--batch-size", "4")
    return config, data, root / "one"


@pytest.fixture(scope="module")
def sharded(setup, hf_tokenizer_dir):
    """The same run over two processes with --fsdp (and activation checkpointing, validation)."""
    config, data, one = setup
    out = one.parent / "two"
    done = torchrun(2, "--config", str(config), "--tokenizer", str(hf_tokenizer_dir), "--data",
                    str(data), "--val-data", str(data), "--eval-every", "2", "--eval-batches",
                    "1", "--eval-max-new-tokens", "3", "--out", str(out), "--no-progress",
                    "--batch-size", "2", "--fsdp", "--activation-checkpointing", *COMMON)
    assert "2 processes, global batch 8, FSDP" in done.stderr
    return out


def test_two_sharded_processes_equal_one(setup, sharded):
    _, _, one = setup
    for step in (2, 4):
        assert_close_tensors(tensors(one / f"checkpoint-{step}"),
                             tensors(sharded / f"checkpoint-{step}"))
    # The gathered optimizer state is the one-process optimizer's, tensor by tensor (relative
    # to each tensor's norm: the second moments are ~1e-6, below any absolute tolerance).
    ref_opt = tensors(one / "checkpoint-2", "optimizer.safetensors")
    got_opt = tensors(sharded / "checkpoint-2", "optimizer.safetensors")
    assert ref_opt.keys() == got_opt.keys() and any(k.endswith("exp_avg_sq") for k in ref_opt)
    for key in ref_opt:
        error = (ref_opt[key] - got_opt[key]).norm() / ref_opt[key].norm().clamp(min=1e-30)
        assert error < 1e-5, (key, error)
    expected, got = step_records(one), step_records(sharded)
    for step in range(1, 5):
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-5)
    assert_close_tensors(tensors(sharded / "model"), tensors(sharded / "checkpoint-4"), atol=0)
    validations = [r["step"] for r in records(sharded) if "val_loss" in r]
    assert validations == [2, 4]  # mid-run and final, on rank 0, on gathered weights


def test_sharded_checkpoint_resumes_in_one_process(setup, sharded, hf_tokenizer_dir, tmp_path):
    """2 -> 1: the gathered checkpoint of step 2, continued by one process (--fsdp in one
    process trains unsharded), ends where the uninterrupted run does."""
    config, data, one = setup
    out = tmp_path / "resumed"
    train_cli(config, hf_tokenizer_dir, data, out, *COMMON, "--batch-size", "4", "--fsdp",
              "--resume", str(sharded / "checkpoint-2"))
    assert sorted(step_records(out)) == [3, 4]
    assert_close_tensors(tensors(one / "checkpoint-4"), tensors(out / "checkpoint-4"))


def test_one_process_checkpoint_resumes_sharded_over_two(setup, hf_tokenizer_dir, tmp_path):
    """1 -> 2: each rank reads the full step-2 checkpoint, keeps its shards of the weights and
    of the AdamW moments, and the run ends where the uninterrupted one does."""
    _, data, one = setup
    out = tmp_path / "resumed"
    torchrun(2, "--resume", str(one / "checkpoint-2"), "--tokenizer", str(hf_tokenizer_dir),
             "--data", str(data), "--out", str(out), "--no-progress", "--batch-size", "2",
             "--fsdp", *COMMON)
    assert sorted(step_records(out)) == [3, 4]
    assert_close_tensors(tensors(one / "checkpoint-4"), tensors(out / "checkpoint-4"))


def test_fsdp_with_lora_is_refused(tmp_path):
    done = run_tilevlm("train", "--preset", "tiny", "--data", "synthetic", "--out",
                       tmp_path / "run", "--fsdp", "--lora", "4", timeout=60)
    assert_refused(done, "train", "--fsdp does not support --lora")
    assert not (tmp_path / "run").exists()


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group in this process (what fully_shard needs to run at all)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_bf16_policy_computes_in_bf16_and_keeps_fp32_master_weights(one_rank_group):
    import copy

    from tilevlm import preset
    from tilevlm.model.vlm import VisionLanguageModel
    from tilevlm.bench.workload import synthetic_batch
    from tilevlm.training.fsdp import gather_model, is_sharded, shard_model

    torch.manual_seed(0)
    model = VisionLanguageModel(preset("tiny", **SMALL))
    original = copy.deepcopy(model).state_dict()
    shard_model(model, torch.device("cpu"), bf16=True)
    assert is_sharded(model) and is_sharded(model.decoder.blocks[0])
    seen = []
    for unit in (model.vision_encoder.blocks[0], model.decoder.blocks[0]):
        unit.register_forward_pre_hook(lambda m, args: seen.append(
            (next(m.parameters()).dtype, args[0].dtype)))
    batch = synthetic_batch(model, 2, prompt_tokens=5, answer_tokens=7, device="cpu", seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch, return_logits=False).loss.backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2  # parameters and inputs cast
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in model.parameters())  # fp32 masters, gradients reduced in fp32
    plain = gather_model(model)
    assert not is_sharded(plain) and plain.state_dict().keys() == original.keys()
    for key, value in plain.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, original[key]), key
