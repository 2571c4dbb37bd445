"""LoRA: only the adapters train, merged == unmerged, a LoRA run resumes exactly, and the CLI
path train --lora -> OUT/adapter/ + OUT/model/ -> merge."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers import (SMALL, cli, error_lines, interrupt_at_call, make_model, make_photo, quick,
                     step_losses)
from tilevlm import preset
from tilevlm.data.sources import named_dataset, synthetic_tokenizer
from tilevlm.weights.loading import load_for_inference
from tilevlm.preprocessing.processor import Processor
from tilevlm.training.lora import LoRASpec, apply_lora, load_adapter, merge_lora
from tilevlm.training.loop import train
from tilevlm.weights.native import load_pretrained

LORA = dict(lora=2, lora_vision="qkv,fc2", lr_projector=0.0)


@pytest.fixture(scope="module")
def setup():
    tokenizer, config = synthetic_tokenizer(preset("tiny", **SMALL))
    return config, Processor(config, tokenizer), named_dataset("synthetic", "train", 200, config)


def _logits(model, processor, seed: int = 0):
    batch = processor([[{"role": "user", "content": "<image>What colour?"},
                        {"role": "assistant", "content": "red"}]], [[make_photo(70, 40, seed)]])
    with torch.no_grad():
        return model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits


def test_a_lora_run_changes_only_the_adapters(setup, tmp_path):
    config, processor, data = setup
    model = make_model(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, processor, data, None, quick(tmp_path, **LORA))
    after = model.state_dict()
    adapters = [k for k in after if ".lora." in k]
    assert adapters and {k for k in after if k not in adapters} == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(after[k].abs().sum() > 0 for k in adapters if k.endswith(".b"))  # b starts at 0
    assert any(k.startswith("vision_encoder.") for k in adapters)
    saved = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert set(saved) == set(adapters)  # the adapter alone: no base tensor, no optimizer


def test_merged_equals_unmerged(setup):
    config, processor, _ = setup
    model = apply_lora(make_model(config), LoRASpec(rank=4, vision=("qkv", "proj", "fc1")))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith(".lora.b"):
            torch.nn.init.normal_(p, std=0.05)
    unmerged = _logits(model, processor)
    merged = _logits(merge_lora(model), processor)
    assert not any(".lora." in k for k in model.state_dict())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def test_a_lora_run_resumes_exactly(setup, tmp_path):
    config, processor, data = setup
    train(make_model(config), processor, data, None, quick(tmp_path / "full", **LORA))
    model = make_model(config)
    hook = interrupt_at_call(model, 3)  # Ctrl-C during step 3
    part = train(model, processor, data, None, quick(tmp_path / "part", **LORA))
    hook.remove()
    assert part.interrupted and part.step == 3
    resumed = train(make_model(config, seed=5), processor, data, None,
                    quick(tmp_path / "part", **LORA), resume_from=tmp_path / "part")
    assert resumed.step == 6
    expected, got = step_losses(tmp_path / "full"), step_losses(tmp_path / "part")
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


def test_train_lora_then_merge_through_the_cli(model_dir, tmp_path):
    run = tmp_path / "run"
    done = cli("train", "--model", str(model_dir), "--data", "synthetic", "--steps", "2",
               "--batch-size", "2", "--warmup-steps", "1", "--eval-every", "0", "--val-size", "2",
               "--eval-batches", "1", "--lora", "2", "--lora-vision", "qkv", "--lr-decoder",
               "1e-2", "--lr-vision", "1e-2", "--no-progress", "--threads", "1", "--out", str(run))
    assert done.returncode == 0, done.stderr
    merged = tmp_path / "merged"
    done = cli("merge", "--model", str(model_dir), "--adapter", str(run), "--out", str(merged),
               "--threads", "1")
    assert done.returncode == 0, done.stderr
    model, processor = load_for_inference(merged, "cpu")
    base = load_adapter(load_pretrained(model_dir), run / "adapter")  # base + adapter, unmerged
    torch.testing.assert_close(_logits(model, processor), _logits(base, processor), atol=1e-5,
                               rtol=0)
    at_end, _ = load_for_inference(run / "model", "cpu")  # the run's own merged model
    torch.testing.assert_close(_logits(at_end, processor), _logits(model, processor), atol=1e-5,
                               rtol=0)


def test_bad_lora_options_are_one_line(tmp_path):
    done = cli("train", "--preset", "tiny", "--data", "synthetic", "--out", str(tmp_path / "r"),
               "--lora", "2", "--lora-decoder", "qkv,mlp", "--warmup-steps", "0", "--steps", "1")
    assert done.returncode == 2 and len(error_lines(done)) == 1 and "mlp" in done.stderr


def test_a_lora_checkpoint_as_model_says_what_to_use(setup, tmp_path):
    from tilevlm.weights.run_folder import resolve_model

    config, processor, data = setup
    train(make_model(config), processor, data, None, quick(tmp_path, steps=2, save_every=2, **LORA))
    with pytest.raises(ValueError, match="checkpoint of a LoRA run"):
        resolve_model(tmp_path / "checkpoint-2")
    assert resolve_model(tmp_path) == tmp_path / "model"  # the merged model
