"""Trainer: labels, exact resume, atomic checkpoints under SIGKILL, loss goes down, NaN handling,
frozen parts, bad samples. Models are the tiny preset at very small widths (CPU, seconds)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tilevlm import preset
from tilevlm.data.collate import SkipBadSamples, VLMCollator
from tilevlm.data.sampler import ResumableBatchSampler
from tilevlm.data.sources import named_dataset, synthetic_tokenizer
from tilevlm.data.synthetic import SyntheticSpec, SyntheticVQA
from tilevlm.training.compile import compile_blocks
from tilevlm.training.optim import lr_factor
from tilevlm.config import IGNORE_INDEX
from tilevlm.preprocessing.chat_template import IM_END
from tilevlm.preprocessing.processor import Processor
from tilevlm.training.loop import TrainConfig, train
from tilevlm.training import checkpoints
from tilevlm.weights import run_folder

from helpers import SMALL, interrupt_at_call, make_model, quick, step_losses


@pytest.fixture(scope="module")
def setup():
    """(config, processor, train data, validation data) for the small model."""
    tokenizer, config = synthetic_tokenizer(preset("tiny", **SMALL))
    return (config, Processor(config, tokenizer), named_dataset("synthetic", "train", 200, config),
            named_dataset("synthetic", "validation", 8, config))


def test_labels_only_on_assistant_tokens(setup):
    config, processor, _, _ = setup
    spec = SyntheticSpec(tile_size=config.vit_img_size, max_grid=2, questions_per_image=2)
    samples = [SyntheticVQA("train", 4, spec)[i] for i in range(4)]
    batch = VLMCollator(processor)(samples)
    assert batch.n_skipped == 0
    labels, input_ids = batch.inputs["labels"], batch.inputs["input_ids"]
    for row, sample in enumerate(samples):
        labelled = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert input_ids[row][labels[row] != IGNORE_INDEX].tolist() == labelled
        answers = [m["content"] for m in sample["messages"] if m["role"] == "assistant"]
        assert processor.tokenizer.decode(labelled, skip_special_tokens=False) == \
            "".join(a + IM_END for a in answers)


def test_resume_equals_uninterrupted(setup, tmp_path):
    config, processor, train_data, _ = setup
    full = train(make_model(config), processor, train_data, None, quick(tmp_path / "full"))
    assert not full.interrupted and full.step == 6

    # Ctrl-C during step 3: the step finishes, checkpoint-3 is written, train() returns.
    model = make_model(config)
    hook = interrupt_at_call(model, 3)
    part = train(model, processor, train_data, None, quick(tmp_path / "part"))
    hook.remove()
    assert part.interrupted and part.step == 3
    assert run_folder.find_latest(tmp_path / "part").name == "checkpoint-3"

    other_init = make_model(config, seed=123)  # the weights must come from the checkpoint
    resumed = train(other_init, processor, train_data, None, quick(tmp_path / "part"),
                    resume_from=tmp_path / "part")
    assert resumed.step == 6
    expected, got = step_losses(tmp_path / "full"), step_losses(tmp_path / "part")
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from tilevlm import preset
    from tilevlm.data.sources import named_dataset, synthetic_tokenizer
    from tilevlm.model.vlm import VisionLanguageModel
    from tilevlm.preprocessing.processor import Processor
    from tilevlm.training.loop import TrainConfig, train
    tokenizer, config = synthetic_tokenizer(preset("tiny", **{small}))
    data = named_dataset("synthetic", "train", 100, config)
    cfg = TrainConfig(steps=100000, batch_size=1, save_every=1, eval_every=0, progress=False,
                      out_dir=sys.argv[1])
    train(VisionLanguageModel(config), Processor(config, tokenizer), data, None, cfg)
""")


def test_checkpoint_complete_or_absent_after_sigkill(tmp_path):
    out = tmp_path / "run"
    script = KILL_SCRIPT.format(small=SMALL)
    child = subprocess.Popen([sys.executable, "-c", script, str(out)], cwd=tmp_path,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoint-3").exists() and time.monotonic() < deadline:
            assert child.poll() is None, "the training subprocess died"
            time.sleep(0.02)
        time.sleep(0.137)  # saving every step: the kill lands mid-save most of the time
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    latest = run_folder.find_latest(out)
    assert latest is not None and int(latest.name.split("-")[1]) >= 3
    for ckpt in out.glob("checkpoint-*"):  # every renamed checkpoint is whole
        names = {p.name for p in ckpt.iterdir()}
        assert {"config.json", "model.safetensors", "optimizer.safetensors", "optimizer.json",
                "rng.safetensors", "trainer_state.json", "tokenizer.json"} <= names
    from tilevlm.weights.native import load_pretrained

    load_pretrained(latest)
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["state"]["step"] == int(latest.name.split("-")[1])
    checkpoints.remove_stale_tmp(out)
    assert not list(out.glob(".tmp-ckpt-*"))


def test_atomic_checkpoint_replaces_the_same_step(tmp_path):
    for text in ("first", "second"):
        path = checkpoints.atomic_checkpoint(
            tmp_path, 5, lambda d, text=text: (d / "trainer_state.json").write_text(text))
    assert path == tmp_path / "checkpoint-5"
    assert (path / "trainer_state.json").read_text() == "second"
    assert (tmp_path / "latest").read_text() == "checkpoint-5\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5", "latest"]


def test_smoke_run_reduces_loss(setup, tmp_path):
    config, processor, train_data, val_data = setup
    cfg = quick(tmp_path, steps=30, batch_size=8, warmup_steps=3, lr_projector=3e-3,
                lr_vision=3e-3, lr_decoder=3e-3, eval_every=15, eval_batches=1,
                eval_max_new_tokens=4)
    result = train(make_model(config), processor, train_data, val_data, cfg)
    losses = step_losses(tmp_path)
    first = sum(losses[s] for s in (1, 2, 3)) / 3
    last = sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < first - 1.0, (first, last)
    assert result.val is not None and math.isfinite(result.val["val_loss"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [15, 30]
    assert result.checkpoint == tmp_path / "checkpoint-30"
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-30"


def test_compiled_blocks_train_like_eager(setup, tmp_path):
    """TrainConfig.compile (aot_eager here: the same graph capture as inductor, no C++ build)
    gives the eager losses; validation runs the eval-mode (eager) blocks and still works."""
    config, processor, train_data, val_data = setup
    losses = {}
    for name, backend in (("eager", ""), ("compiled", "aot_eager")):
        cfg = quick(tmp_path / name, steps=3, eval_every=3, eval_batches=1,
                    eval_max_new_tokens=2, compile=backend)
        result = train(make_model(config), processor, train_data, val_data, cfg)
        assert result.val is not None
        losses[name] = step_losses(tmp_path / name)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs >= 2  # a vision block and a decoder block were captured
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4, abs=1e-5)


def test_compiled_blocks_stay_eager_in_eval_mode(setup):
    """compile_blocks' default (training_only): eval-mode calls never reach the compiler."""
    config, processor, train_data, _ = setup
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = compile_blocks(make_model(config), backend=backend)
    inputs = VLMCollator(processor)([train_data[i] for i in range(2)]).inputs
    try:
        with torch.no_grad():
            model.eval()(**inputs)
            assert graphs == []
            model.train()(**inputs)
    finally:
        torch._dynamo.reset()
    assert graphs  # train mode compiles


def _nan_on_call(model, n: int) -> None:
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) == n:
            output.loss = output.loss * float("nan")
        return output

    model.register_forward_hook(hook)


def test_nonfinite_loss_stops_naming_the_step(setup, tmp_path):
    config, processor, train_data, _ = setup
    model = make_model(config)
    _nan_on_call(model, 2)
    with pytest.raises(ValueError, match="non-finite loss.*step 2"):
        train(model, processor, train_data, None, quick(tmp_path, steps=3))


def test_nonfinite_loss_skip_drops_the_update(setup, tmp_path):
    config, processor, train_data, _ = setup
    model = make_model(config)
    _nan_on_call(model, 2)
    result = train(model, processor, train_data, None, quick(tmp_path, steps=3,
                                                             on_nonfinite="skip"))
    assert result.step == 3 and result.nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["nonfinite_steps"] == 1


def test_frozen_parts_do_not_change(setup, tmp_path):
    config, processor, train_data, _ = setup
    model = make_model(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, processor, train_data, None, quick(tmp_path, steps=2, lr_vision=0.0,
                                                    lr_decoder=0.0))
    after = model.state_dict()
    for key, value in before.items():
        frozen = key.startswith(("vision_encoder.", "decoder."))
        assert torch.equal(after[key], value) == frozen, key
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    assert all(p.requires_grad for p in model.projector.parameters())


class _Flaky:
    """Every 4th sample raises on read; every 4th + 1 has a missing image file."""

    def __init__(self, data, missing: Path) -> None:
        self.data, self.missing = data, missing

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        if index % 4 == 0:
            raise OSError(f"sample {index} is unreadable")
        sample = self.data[index]
        return {**sample, "image": self.missing} if index % 4 == 1 else sample


def test_bad_samples_are_skipped_and_counted(setup, tmp_path):
    config, processor, train_data, _ = setup
    flaky = _Flaky(train_data, tmp_path / "missing.png")
    batch = VLMCollator(processor)([SkipBadSamples(flaky)[i] for i in range(8)])
    assert batch.n_skipped == 4 and batch.inputs["input_ids"].shape[0] == 4
    result = train(make_model(config), processor, flaky, None,
                   quick(tmp_path / "run", steps=2, num_workers=1))
    bad, steps = 0, 0
    for indices in ResumableBatchSampler(len(flaky), 4, seed=0):  # an all-bad batch is no step
        bad += sum(i % 4 in (0, 1) for i in indices)
        steps += any(i % 4 in (2, 3) for i in indices)
        if steps == 2:
            break
    assert result.step == 2 and result.skipped_samples == bad


def test_data_order_is_a_function_of_seed_and_position():
    whole = iter(ResumableBatchSampler(10, 4, seed=3))
    first = [next(whole) for _ in range(5)]  # 20 samples: two epochs
    assert sorted(first[0] + first[1] + first[2][:2]) == list(range(10))
    resumed = iter(ResumableBatchSampler(10, 4, seed=3, start=8))
    assert [next(resumed) for _ in range(3)] == first[2:]
    other = iter(ResumableBatchSampler(10, 4, seed=4))
    assert first != [next(other) for _ in range(5)]


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_train_config_validates():
    with pytest.raises(ValueError, match="on_nonfinite"):
        TrainConfig(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


class _Recorded:
    """The indices a run reads, in order."""

    def __init__(self, data) -> None:
        self.data, self.read = data, []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        self.read.append(index)
        return self.data[index]


def test_no_shuffle_reads_the_data_in_index_order(setup, tmp_path):
    """--no-shuffle: a curriculum laid out by index (the demo's later mix) is seen in order."""
    config, processor, train_data, _ = setup
    data = _Recorded(train_data)
    train(make_model(config), processor, data, None,
          quick(tmp_path / "run", steps=3, shuffle=False))
    assert data.read == list(range(12))  # quick(): batch 4
    shuffled = _Recorded(train_data)
    train(make_model(config), processor, shuffled, None, quick(tmp_path / "run2", steps=3))
    assert sorted(shuffled.read) != shuffled.read


def test_resume_with_another_order_warns(setup, tmp_path, caplog):
    """The data order is a knob that makes a resumed run differ: --no-shuffle after a shuffled
    start is said, as a changed --shuffle-block is."""
    config, processor, train_data, _ = setup
    train(make_model(config), processor, train_data, None, quick(tmp_path / "run", steps=2))
    with caplog.at_level("WARNING"):
        train(make_model(config), processor, train_data, None,
              quick(tmp_path / "run", steps=3, shuffle=False), resume_from=tmp_path / "run")
    assert "resuming with shuffle=False (the checkpoint used True)" in caplog.text
