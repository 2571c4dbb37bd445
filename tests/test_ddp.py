"""Two processes under torchrun (gloo, CPU) train exactly as one process with the same global
batch, and a one-process run resumes under two processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import png, step_records, torchrun, train_cli, write_parquet

COMMON = ("--warmup-steps", "1", "--lr-decoder", "2e-3", "--lr-vision", "2e-3",
          "--lr-projector", "2e-3", "--shuffle-block", "8", "--steps", "4", "--grad-accum", "2")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=0, msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, hf_tokenizer_dir):
    """(data, one-process run dir): batch 4 x 1 process, checkpoints at steps 2 and 4."""
    from helpers import SMALL
    from tilevlm import preset

    root = tmp_path_factory.mktemp("ddp")
    config = root / "config.json"
    preset("tiny", **SMALL).to_json(config)
    data = write_parquet(root / "data")
    train_cli(config, hf_tokenizer_dir, data, root / "one", *COMMON, "--batch-size", "4",
              "--save-every", "2")
    return config, data, root / "one"


def test_two_processes_equal_one_with_the_same_global_batch(reference, hf_tokenizer_dir,
                                                            tmp_path):
    config, data, one = reference
    two = tmp_path / "two"
    torchrun(2, "--config", str(config), "--tokenizer", str(hf_tokenizer_dir), "--data",
             str(data), "--out", str(two), "--no-progress", "--batch-size", "2", *COMMON)
    assert_same_weights(one / "checkpoint-4", two / "checkpoint-4")
    expected, got = step_records(one), step_records(two)
    for step in range(1, 5):  # metrics are global: same loss, same skip counts
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-5)
        assert got[step]["skipped"] == expected[step]["skipped"]
    assert got[4]["skipped"]["too_long"] >= 1 and got[4]["skipped"]["image_error"] >= 1


def test_one_process_run_resumes_under_two(reference, hf_tokenizer_dir, tmp_path):
    config, data, one = reference
    resumed = tmp_path / "resumed"
    torchrun(2, "--resume", str(one / "checkpoint-2"), "--tokenizer", str(hf_tokenizer_dir),
             "--data", str(data), "--out", str(resumed), "--no-progress", "--batch-size", "2",
             *COMMON)
    assert sorted(step_records(resumed)) == [3, 4]
    assert_same_weights(one / "checkpoint-4", resumed / "checkpoint-4")


def test_a_rank_whose_batch_has_no_image_still_steps(reference, hf_tokenizer_dir, tmp_path):
    """Rank 0 always gets an image, rank 1 never: DDP (which expects every trainable weight in
    every backward) must still reduce the vision encoder's and projector's gradients."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    config, _, _ = reference
    rows = [{"images": [{"bytes": png(32, 32, i), "path": None}] if i % 2 == 0 else [],
             "texts": [{"user": f"Question {i}?", "assistant": f"Answer {i}."}]}
            for i in range(8)]
    data = tmp_path / "alternating.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    out = tmp_path / "run"
    torchrun(2, "--config", str(config), "--tokenizer", str(hf_tokenizer_dir), "--data",
             str(data), "--out", str(out), "--no-progress", "--batch-size", "1",
             "--shuffle-block", "0", "--steps", "3", "--warmup-steps", "1", "--save-every", "0")
    losses = [r["loss"] for r in step_records(out).values()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert (out / "checkpoint-3" / "model.safetensors").is_file()
