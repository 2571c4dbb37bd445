"""`tilevlm train` on real dataset files (parquet, save_to_disk, LLaVA JSON): bad samples skipped
and counted in metrics.jsonl, packing with padding figures, exact resume of the stream, the
stream's order independent of DataLoader workers and of the number of ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tilevlm import preset
from tilevlm.cli import main
from tilevlm.data.sources import DatasetSpec
from tilevlm.data.stream import StreamOptions, TrainStream, stream_loader
from tilevlm.preprocessing.processor import Processor
from tilevlm.preprocessing.tokenizer import load_tokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from helpers import (SMALL, cauldron_rows, make_photo, records, step_records,  # noqa: E402
                     train_cli, write_parquet)


def write_llava(directory: Path, n: int = 16) -> Path:
    """A LLaVA JSON list and an image folder (`images/`) where image 3 is corrupt."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        make_photo(32, 16 + i, i).save(directory / "images" / f"{i}.png")  # one tile each
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nWhat is {i}?"},
            {"from": "gpt", "value": f"It is {i}."}]})
    (directory / "images" / "3.png").write_bytes(b"\x89PNG but broken")
    (directory / "data.json").write_text(json.dumps(records))
    return directory / "data.json"


@pytest.fixture(scope="module")
def model_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "config.json"
    preset("tiny", **SMALL).to_json(path)
    return path


def test_parquet_run_skips_and_counts_bad_samples(tmp_path, model_config, hf_tokenizer_dir):
    data = write_parquet(tmp_path / "data")
    out = tmp_path / "run"
    # 6 steps x 4 positions = the 24 rows once: every bad row has been met.
    train_cli(model_config, hf_tokenizer_dir, data, out, "--steps", "6", "--batch-size", "4")
    last = step_records(out)[6]
    assert last["skipped"] == {"image_error": 1, "too_long": 1}
    assert last["skipped_samples"] == 2 and last["epoch"] == 0
    assert 0 < last["epoch_padding_fraction"] < 1
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in step_records(out).values())
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["state"]["position"] == 24 and state["state"]["data_positions"] == [[0, 2, 2]]


def test_llava_packed_run_with_workers_reports_padding(tmp_path, model_config,
                                                       hf_tokenizer_dir):
    data = write_llava(tmp_path / "data")
    out = tmp_path / "run"
    train_cli(model_config, hf_tokenizer_dir, data, out, "--image-root",
              str(tmp_path / "data" / "images"), "--steps", "5", "--batch-size", "2",
              "--pack", "256", "--max-tiles", "16", "--num-workers", "2")
    epochs = [r for r in records(out) if "epoch_samples" in r]
    assert epochs and epochs[0]["epoch"] == 0 and epochs[0]["epoch_samples"] == 15
    assert 0 <= epochs[0]["epoch_padding_fraction"] < 0.5
    steps = step_records(out)
    assert steps[5]["skipped"]["image_error"] >= 1
    assert all(r["tokens"] > 0 for r in steps.values())


def test_packed_resume_equals_uninterrupted(tmp_path, model_config, hf_tokenizer_dir):
    data = write_parquet(tmp_path / "data")
    flags = ("--steps", "6", "--batch-size", "2", "--pack", "200", "--max-tiles", "16")
    train_cli(model_config, hf_tokenizer_dir, data, tmp_path / "full", *flags)
    train_cli(model_config, hf_tokenizer_dir, data, tmp_path / "part", *flags[2:],
              "--steps", "6", "--save-every", "3")  # the later --save-every wins
    part = tmp_path / "part"
    (part / "metrics.jsonl").unlink()
    assert main(["train", "--resume", str(part / "checkpoint-3"), "--tokenizer",
                 str(hf_tokenizer_dir), "--data", str(data), "--out", str(tmp_path / "resumed"),
                 "--no-progress", "--warmup-steps", "1", "--lr-decoder", "2e-3", "--lr-vision",
                 "2e-3", "--lr-projector", "2e-3", "--shuffle-block", "8", "--save-every", "0",
                 *flags]) == 0
    full, resumed = step_records(tmp_path / "full"), step_records(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], abs=1e-6)
        assert resumed[step]["skipped"] == full[step]["skipped"]


def test_saved_dataset_directory_trains(tmp_path, model_config, hf_tokenizer_dir):
    datasets = pytest.importorskip("datasets")
    rows = cauldron_rows(8)
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string")}]})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(tmp_path / "saved")
    out = tmp_path / "run"
    train_cli(model_config, hf_tokenizer_dir, tmp_path / "saved", out, "--steps", "2",
              "--batch-size", "4", "--data-format", "hf")
    assert step_records(out)[2]["skipped"] == {"image_error": 1}


# ----------------------------------------------------------------------------- the stream
@pytest.fixture(scope="module")
def processor(hf_tokenizer_dir) -> Processor:
    tokenizer = load_tokenizer(hf_tokenizer_dir)
    config = preset("tiny", **SMALL, lm_base_vocab_size=tokenizer.base_vocab_size)
    return Processor(config, tokenizer)


def sources(stream: TrainStream, n: int, workers: int = 0) -> list[list[str]]:
    """The `source` of every sample of the first `n` batches."""
    out = []
    for batch in stream_loader(stream, workers, False):
        rows = batch.info.get("sources", [])
        out.append([s.rsplit(":", 1)[1] for row in rows for s in row])
        if len(out) == n:
            return out
    raise AssertionError("the stream ended")


def test_stream_order_does_not_depend_on_workers_or_resume(tmp_path, processor):
    spec = DatasetSpec(str(write_parquet(tmp_path)))
    options = StreamOptions(batch_size=3, pack=120, max_tiles=16, block_size=8, seed=1)
    whole = sources(TrainStream(spec.open, processor, options), 12)
    assert sources(TrainStream(spec.open, processor, options), 12, workers=2) == whole
    rows = [int(r) for batch in whole[:6] for r in batch]
    assert len(set(rows)) == len(rows)  # no repeats within an epoch
    loader = iter(stream_loader(TrainStream(spec.open, processor, options), 0, False))
    positions = [next(loader).stream for _ in range(7)]
    start = positions[4]  # resume after the 5th batch
    assert sources(TrainStream(spec.open, processor, options, start=start), 7) == whole[5:12]


def test_stream_splits_global_batches_by_rank(tmp_path, processor):
    """Unpacked: rank r of W takes positions r, r+W, ... of each global micro-batch."""
    spec = DatasetSpec(str(write_parquet(tmp_path)))
    one = sources(TrainStream(spec.open, processor, StreamOptions(batch_size=4, block_size=8)), 6)
    two = [sources(TrainStream(spec.open, processor,
                               StreamOptions(batch_size=2, block_size=8), rank, 2), 6)
           for rank in (0, 1)]
    for step in range(6):
        assert sorted(two[0][step] + two[1][step]) == sorted(one[step])
    epoch0 = [int(r) for batch in one for r in batch]
    assert epoch0 != sorted(epoch0)  # shuffled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_stream_batches_from_workers_come_pinned(tmp_path, processor):
    """A TrainBatch is no dict the DataLoader pins by itself: it pins its inputs."""
    spec = DatasetSpec(str(write_parquet(tmp_path)))
    stream = TrainStream(spec.open, processor, StreamOptions(batch_size=2, block_size=8))
    batch = next(iter(stream_loader(stream, 1, True)))
    assert batch.inputs and all(t.is_pinned() for t in batch.inputs.values())
