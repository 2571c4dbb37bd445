"""What a `--model PATH` is, decided in one place (`weights.loading.model_source`): a model
directory, a run folder, a checkpoint; and a load reads each JSON file once."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from tilevlm.weights.loading import load_for_inference, model_source

JSON_READERS = ("read_bytes", "read_text")


def count_json_reads(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """file name -> times a .json file was read through pathlib from now on."""
    reads: Counter = Counter()
    for name in JSON_READERS:
        real = getattr(Path, name)

        def counted(self: Path, *args, _real=real, **kwargs):
            if self.suffix == ".json":
                reads[self.name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(Path, name, counted)
    return reads


def test_a_load_reads_each_json_file_once(model_dir, monkeypatch):
    reads = count_json_reads(monkeypatch)
    model, processor = load_for_inference(model_dir, "cpu")
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(reads)
    assert set(reads.values()) == {1}, reads
    assert processor.config == model.cfg


def test_a_run_folder_means_its_final_model(model_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "model")
    reads = count_json_reads(monkeypatch)
    source = model_source(run)
    assert (source.directory, source.format) == (run / "model", "tilevlm")
    assert source.files == (run / "model" / "model.safetensors",)
    load_for_inference(source, "cpu")
    assert set(reads.values()) == {1}, reads


def test_nothing_to_load_is_one_message(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        model_source(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json, no model/ and no checkpoint"):
        model_source(tmp_path)
