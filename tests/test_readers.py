"""Dataset readers: parquet (The Cauldron / FineVision rows), `save_to_disk` directories, LLaVA
JSON / JSONL; sharding; skip counting; token counts read from image headers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from tilevlm import preset
from tilevlm.data.readers import rows as rowreader
from tilevlm.data.lengths import LengthFilter, SampleMeter
from tilevlm.data.readers.dataset import detect_format, open_dataset
from tilevlm.data.skips import SkipCounter
from tilevlm.preprocessing.processor import Processor

from helpers import make_photo, png

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def image(data: bytes | None = None, path: str | None = None) -> dict:
    return {"bytes": data, "path": path}  # how `datasets` stores an Image feature


def turn(user: str, assistant: str) -> dict:
    return {"user": user, "assistant": assistant}


def cauldron_rows() -> list[dict]:
    """Six rows: plain, two images with placeholders, corrupt bytes, truncated PNG (header ok),
    a path image below the file's directory, and text only."""
    good = png(40, 30)
    return [
        {"images": [image(good)], "texts": [turn("What is it?", "A photo.")]},
        {"images": [image(png(100, 90, 1)), image(png(33, 70, 2))],
         "texts": [turn("Left <image> and", "ok"), turn("right <image>?", "Both.")]},
        {"images": [image(b"not an image")], "texts": [turn("Broken?", "Yes.")]},
        {"images": [image(good[: len(good) // 2])], "texts": [turn("Truncated?", "Yes.")]},
        {"images": [image(None, "pics/a.png")], "texts": [turn("From a path?", "Yes.")]},
        {"images": [], "texts": [turn("No image?", "None.")]},
    ]


@pytest.fixture
def parquet_file(tmp_path: Path) -> Path:
    (tmp_path / "pics").mkdir()
    make_photo(50, 50).save(tmp_path / "pics" / "a.png")
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(cauldron_rows()), path, row_group_size=4)
    return path


@pytest.fixture
def processor(tiny_config, tiny_tokenizer) -> Processor:
    return Processor(tiny_config, tiny_tokenizer)


# ----------------------------------------------------------------------------- parquet
def test_parquet_rows_become_raw_samples(parquet_file):
    samples = list(open_dataset(parquet_file))
    assert [s["source"] for s in samples] == [f"{parquet_file}:{i}" for i in range(6)]
    first = samples[0]
    assert first["messages"] == [{"role": "user", "content": "<image>What is it?"},
                                 {"role": "assistant", "content": "A photo."}]
    assert isinstance(first["images"][0], bytes)
    # Placeholders in the text are kept where they are; one per image.
    assert samples[1]["messages"][0]["content"] == "Left <image> and"
    assert len(samples[1]["images"]) == 2 and len(samples[1]["messages"]) == 4
    assert samples[4]["images"] == [parquet_file.parent / "pics" / "a.png"]
    assert samples[5]["images"] == [] and samples[5]["messages"][0]["content"] == "No image?"


def test_corrupt_image_is_skipped_and_counted_before_decoding(parquet_file, processor):
    reader = open_dataset(parquet_file)
    kept = list(LengthFilter(reader, processor))
    assert reader.skips.as_dict() == {"image_error": 1}  # the header-less one, row 2
    assert f"{parquet_file}:2" not in [s["source"] for s in kept]
    # The truncated PNG has a valid header: it passes here and fails at decode (test_packing).
    assert f"{parquet_file}:3" in [s["source"] for s in kept]


def test_measured_length_equals_the_processor(parquet_file, processor):
    for s in LengthFilter(open_dataset(parquet_file), processor):
        if s["source"].endswith(":3"):
            continue  # truncated pixels: the processor cannot decode it
        batch = processor([s["messages"]], [s["images"]])
        assert s["n_tokens"] == batch["input_ids"].shape[1]
        assert s["n_tiles"] == batch["n_tiles"][0]


def test_exif_rotation_is_counted_like_the_loaded_image(tmp_path, processor):
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a 96x32 stored image is shown as 32x96
    make_photo(96, 32).save(buf, "JPEG", exif=exif)
    sample = {"messages": [{"role": "user", "content": "<image>Tall?"},
                           {"role": "assistant", "content": "Yes."}], "images": [buf.getvalue()]}
    n_tokens, n_tiles = SampleMeter(processor).measure(sample)
    batch = processor([sample["messages"]], [sample["images"]])
    assert (n_tokens, n_tiles) == (batch["input_ids"].shape[1], batch["n_tiles"][0])
    assert batch["grids"][0] == [(3, 1)]


def test_too_long_samples_are_skipped_not_truncated(parquet_file, tiny_tokenizer):
    processor = Processor(preset("tiny", lm_max_length=60), tiny_tokenizer)
    reader = open_dataset(parquet_file)
    kept = list(LengthFilter(reader, processor))
    assert all(s["n_tokens"] <= 60 for s in kept) and kept
    assert reader.skips.counts["too_long"] >= 1


def test_malformed_rows_and_placeholder_mismatch_are_counted(tmp_path):
    rows = [{"images": [image(png(8, 8))], "texts": [turn("a", "b")]},
            {"images": [image(png(8, 8))], "texts": [turn("<image><image>", "b")]},
            {"images": [image(png(8, 8))], "texts": []},
            {"images": [image(None, None)], "texts": [turn("a", "b")]}]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    reader = open_dataset(path)
    assert len(list(reader)) == 1
    assert reader.skips.as_dict() == {"placeholder_mismatch": 1, "malformed": 2}


def test_path_images_in_parquet_may_not_escape(tmp_path):
    rows = [{"images": [image(None, "../secret.png")], "texts": [turn("a", "b")]},
            {"images": [image(None, "/etc/passwd")], "texts": [turn("a", "b")]}]
    (tmp_path / "d").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d" / "x.parquet")
    reader = open_dataset(tmp_path / "d" / "x.parquet")
    assert list(reader) == [] and reader.skips.as_dict() == {"path_escape": 2}


def test_directory_and_glob_of_parquet_files(tmp_path):
    for name in ("b", "a"):
        rows = [{"images": [], "texts": [turn(f"{name}{i}", "x")]} for i in range(3)]
        (tmp_path / name).mkdir()
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / name / "train-0.parquet")
    by_dir = [s["messages"][0]["content"] for s in open_dataset(tmp_path)]  # recursive, sorted
    by_glob = [s["messages"][0]["content"] for s in open_dataset(f"{tmp_path}/*/train-*.parquet")]
    assert by_dir == by_glob == ["a0", "a1", "a2", "b0", "b1", "b2"]


def test_sharding_is_disjoint_complete_and_round_robin(tmp_path):
    rows = [{"images": [], "texts": [turn(f"q{i}", "a")]} for i in range(23)]
    path = tmp_path / "s.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    shards = [[s["messages"][0]["content"] for s in open_dataset(path, rank=r, world_size=3)]
              for r in range(3)]
    for rank, shard in enumerate(shards):
        assert shard == [f"q{i}" for i in range(rank, 23, 3)]
    again = [s["messages"][0]["content"] for s in open_dataset(path, rank=1, world_size=3)]
    assert again == shards[1]
    with pytest.raises(ValueError, match="rank"):
        open_dataset(path, rank=3, world_size=3)


def test_resumed_stream_reads_only_the_row_groups_it_needs(tmp_path, monkeypatch):
    rows = [{"images": [], "texts": [turn(f"q{i}", "a")]} for i in range(24)]
    path = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=8)
    read = []
    original = pq.ParquetFile.iter_batches
    monkeypatch.setattr(pq.ParquetFile, "iter_batches",
                        lambda self, *a, **k: read.extend(k["row_groups"]) or original(self, *a, **k))
    reader = open_dataset(path)
    stream = {pos: s for _, block in reader.blocks(8, seed=0, epoch=0, start=18, shuffle=False)
              for pos, s in block.items()}
    assert sorted(stream) == list(range(18, 24))
    assert [stream[p]["messages"][0]["content"] for p in range(18, 24)] == \
        [f"q{i}" for i in range(18, 24)]
    assert read == [2]  # row groups 0 and 1 hold only rows before position 18: never read


def test_dataloader_workers_split_a_rank_further(tmp_path, monkeypatch):
    rows = [{"images": [], "texts": [turn(f"q{i}", "a")]} for i in range(20)]
    path = tmp_path / "w.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    seen = []
    for worker in range(2):
        monkeypatch.setattr(rowreader, "_worker_split", lambda w=worker: (w, 2))
        seen.append([s["messages"][0]["content"] for s in open_dataset(path, rank=1,
                                                                      world_size=2)])
    assert seen == [["q1", "q5", "q9", "q13", "q17"], ["q3", "q7", "q11", "q15", "q19"]]


def test_unknown_or_wrong_paths_say_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="expected a .parquet file"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="cannot tell the data format"):
        open_dataset(tmp_path)
    pq.write_table(pa.Table.from_pylist([{"question": "a"}]), tmp_path / "q.parquet")
    with pytest.raises(ValueError, match="no 'texts' column"):
        open_dataset(tmp_path / "q.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(ValueError, match="not a readable parquet"):
        open_dataset(tmp_path / "bad.parquet", data_format="parquet")
    with pytest.raises(ValueError, match="unknown data format"):
        open_dataset(tmp_path, data_format="csv")
    with pytest.raises(ValueError, match="save_to_disk"):
        open_dataset(tmp_path, data_format="hf")


# ----------------------------------------------------------------------------- save_to_disk
def test_saved_datasets_directory_is_read_without_datasets(tmp_path, processor):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string")}]})
    rows = cauldron_rows()[:3]
    data = {"images": [[{"bytes": i["bytes"], "path": None} for i in r["images"]] for r in rows],
            "texts": [r["texts"] for r in rows]}
    ds = datasets.Dataset.from_dict(data, features=features)
    ds.save_to_disk(tmp_path / "one")
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(tmp_path / "dict")

    assert detect_format(tmp_path / "one") == "hf"
    reader = open_dataset(tmp_path / "one")
    kept = list(LengthFilter(reader, processor))
    assert [len(s["images"]) for s in kept] == [1, 2]
    assert reader.skips.as_dict() == {"image_error": 1}
    assert len(list(open_dataset(tmp_path / "dict", split="test"))) == 1
    assert [s["source"].rsplit(":", 1)[1] for s in open_dataset(tmp_path / "dict", rank=1,
                                                                world_size=2)] == ["1"]
    with pytest.raises(ValueError, match="split"):
        open_dataset(tmp_path / "dict", split="validation")


# ----------------------------------------------------------------------------- LLaVA
@pytest.fixture
def llava_dir(tmp_path: Path) -> Path:
    (tmp_path / "images" / "coco").mkdir(parents=True)
    make_photo(64, 48).save(tmp_path / "images" / "coco" / "1.jpg")
    make_photo(30, 90, 1).save(tmp_path / "images" / "2.png")
    (tmp_path / "images" / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    conv = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "Art."}]
    records = [
        {"id": "1", "image": "coco/1.jpg", "conversations": conv},
        {"id": "2", "image": ["coco/1.jpg", "2.png"], "conversations": [
            {"from": "human", "value": "<image> vs <image>"}, {"from": "gpt", "value": "Same."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "3", "image": "../../etc/passwd", "conversations": conv},
        {"id": "4", "image": "/etc/passwd", "conversations": conv},
        {"id": "5", "image": "bad.jpg", "conversations": conv},
        {"id": "6", "image": "missing.jpg", "conversations": conv},
        {"id": "7", "conversations": [{"from": "human", "value": "Hi"},
                                      {"from": "gpt", "value": "Hello."}]},
        {"id": "8", "image": "coco/1.jpg", "conversations": [{"from": "robot", "value": "?"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path


def test_llava_json_with_an_image_root(llava_dir, processor):
    reader = open_dataset(llava_dir / "data.json", image_root=llava_dir / "images")
    kept = list(LengthFilter(reader, processor))
    assert [s["source"].rsplit(":", 1)[1] for s in kept] == ["0", "1", "6"]
    assert kept[0]["messages"] == [{"role": "user", "content": "<image>\nWhat is this?"},
                                   {"role": "assistant", "content": "Art."}]
    assert kept[1]["images"] == [llava_dir / "images" / "coco" / "1.jpg",
                                 llava_dir / "images" / "2.png"]
    assert reader.skips.as_dict() == {"path_escape": 2, "image_error": 2, "malformed": 1}
    for s in kept:
        assert s["n_tokens"] == processor([s["messages"]], [s["images"]])["input_ids"].shape[1]


def test_llava_default_root_is_the_json_directory(llava_dir):
    samples = list(open_dataset(llava_dir / "data.json"))
    assert samples[0]["images"] == [llava_dir / "coco" / "1.jpg"]  # missing there: fails later


def test_safe_image_path_refuses_escapes(tmp_path):
    root = tmp_path / "root"
    assert rowreader.safe_image_path(root, "a/../b.png") == root / "b.png"
    assert rowreader.safe_image_path(root, str(root / "c.png")) == root / "c.png"
    for bad in ("../x.png", "a/../../x.png", "/etc/passwd", str(tmp_path / "rootx" / "y.png")):
        with pytest.raises(ValueError, match="outside the image root") as info:
            rowreader.safe_image_path(root, bad)
        assert info.value.reason == "path_escape"


def test_llava_jsonl_streams_and_counts_bad_lines(llava_dir):
    lines = [json.dumps({"image": "2.png", "conversations": [
        {"from": "human", "value": f"<image>q{i}"}, {"from": "gpt", "value": "a"}]})
        for i in range(4)]
    lines.insert(2, "{not json")
    (llava_dir / "data.jsonl").write_text("\n".join(lines) + "\n\n")
    skips = SkipCounter()
    reader = open_dataset(llava_dir / "data.jsonl", image_root=llava_dir / "images", skips=skips)
    assert [s["messages"][0]["content"] for s in reader] == ["<image>q0", "<image>q1",
                                                             "<image>q2", "<image>q3"]
    assert skips.as_dict() == {"malformed": 1}
    odd = open_dataset(llava_dir / "data.jsonl", image_root=llava_dir / "images", rank=1,
                       world_size=2)
    assert [s["source"].rsplit(":", 1)[1] for s in odd] == ["1", "3"]


def test_llava_json_must_be_a_list(tmp_path):
    (tmp_path / "d.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="JSON list"):
        list(open_dataset(tmp_path / "d.json"))


def test_raw_samples_fit_the_trainers_collator(parquet_file, processor):
    from tilevlm.data.collate import VLMCollator

    samples = list(LengthFilter(open_dataset(parquet_file), processor))
    batch = VLMCollator(processor)(samples)
    assert batch.n_skipped == 1  # the truncated PNG, found when decoding
    assert batch.inputs["input_ids"].shape[0] == len(samples) - 1


def test_a_broken_record_batch_skips_the_rest_of_its_file_not_the_run(tmp_path, processor):
    """A save_to_disk shard whose record-batch message is damaged (a bad length after the
    schema) is counted as skipped and named; the other shard's rows still arrive, on every rank
    split alike."""
    datasets = pytest.importorskip("datasets")
    rows = cauldron_rows()[:1] * 4
    ds = datasets.Dataset.from_dict(
        {"images": [[{"bytes": i["bytes"], "path": None} for i in r["images"]] for r in rows],
         "texts": [r["texts"] for r in rows]},
        features=datasets.Features({
            "images": datasets.Sequence(datasets.Image()),
            "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string")}]}))
    ds.save_to_disk(tmp_path / "two", num_shards=2)
    first = sorted((tmp_path / "two").glob("data-*.arrow"))[0]
    data = bytearray(first.read_bytes())
    marker = data.index(b"\xff\xff\xff\xff", 4)  # the first record batch's message
    data[marker + 4:marker + 8] = (0x7FFFFFF0).to_bytes(4, "little")
    first.write_bytes(bytes(data))

    reader = open_dataset(tmp_path / "two")
    assert len(list(reader)) == 2  # the second shard's two rows
    assert reader.skips.as_dict() == {"malformed": 1}
    assert sum(len(list(open_dataset(tmp_path / "two", rank=r, world_size=2)))
               for r in (0, 1)) == 2
