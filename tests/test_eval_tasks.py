"""Benchmark metrics against hand-worked cases, task column mappings, and `tilevlm eval` on local
data sets end to end (through the real CLI for the report files and the one-line errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tilevlm import preset
from tilevlm.evaluation import metrics
from tilevlm.evaluation.task_run import run_task, task_samples
from tilevlm.evaluation.tasks import TASKS, get_task
from tilevlm.preprocessing.processor import Processor
from tilevlm.training.loop import train

from helpers import make_model, png, quick

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

COLOURS = ["red", "green", "blue", "yellow"]


# ----------------------------------------------------------------------------- metrics

def test_vqa_normalisation():
    assert metrics.normalize_vqa("Two dogs.") == "2 dogs"  # number word, final period
    assert metrics.normalize_vqa("The cat, sat!") == "cat sat"  # article, punctuation by spaces
    assert metrics.normalize_vqa("black/white") == "black white"  # punctuation between words
    assert metrics.normalize_vqa("3.5") == "3.5"  # a decimal point stays
    assert metrics.normalize_vqa("1,000") == "1000"  # a comma inside a number goes
    assert metrics.normalize_vqa("Dont  know") == "don't know"  # contraction, spaces
    assert metrics.normalize_vqa("an apple\n") == "apple"


def test_vqa_accuracy_over_ten_humans():
    assert metrics.vqa_accuracy("2", ["2"] * 10) == 1.0
    assert metrics.vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert metrics.vqa_accuracy("2", ["2"] * 2 + ["x"] * 8) == pytest.approx(0.6)
    assert metrics.vqa_accuracy("cat", ["dog"] * 10) == 0.0


def test_anls_threshold():
    assert metrics.anls("hello", ["hello"]) == 1.0
    assert metrics.anls("hallo", ["hello"]) == pytest.approx(0.8)  # 1 edit in 5
    assert metrics.anls("abc", ["xbz"]) == 0.0  # distance 2/3 >= 0.5
    assert metrics.anls("ab", ["ax"]) == 0.5  # exactly 0.5 counts (lmms-eval: < 0.5 is 0)
    assert metrics.anls("helo", ["  hello  "]) == pytest.approx(1 - 1 / 9)  # raw lengths divide
    assert metrics.anls("Hello  World", ["x", "hello world"]) == 1.0  # best answer, case, spaces


def test_relaxed_accuracy_five_percent():
    assert metrics.relaxed_accuracy("10.4", "10") == 1.0
    assert metrics.relaxed_accuracy("10.6", "10") == 0.0
    assert metrics.relaxed_accuracy("12%", "12") == 0.0  # lmms-eval: 12% is 0.12
    assert metrics.relaxed_accuracy("12%", "12.5%") == 1.0
    assert metrics.relaxed_accuracy("1,000", "1000") == 0.0  # no thousands separators: text
    assert metrics.relaxed_accuracy("0", "0") == 1.0 and metrics.relaxed_accuracy("0.01", "0") == 0.0
    assert metrics.relaxed_accuracy("0.0", "0") == 0.0  # a zero target is matched as text
    assert metrics.relaxed_accuracy("Yes", "yes") == 1.0 and metrics.relaxed_accuracy("no", "yes") == 0.0


@pytest.mark.parametrize("text, letter", [
    ("The answer is (B).", "B"), ("B", "B"), ("b) red", "B"), ("(C)", "C"), ("D.", "D"),
    ("Answer: c", "C"), ("Option A", "A"), ("C: blue", "C"), ("I think it is red", None),
    ("", None), ("E", None),  # outside the 4 choices
    ("Blue is my answer", None),  # a word that starts with a letter is not a letter
])
def test_choice_letter(text, letter):
    assert metrics.choice_letter(text, 4) == letter


@pytest.mark.parametrize("text, mmstar, ai2d, scienceqa", [
    # the letter MMStar reads, and whether AI2D / ScienceQA score it right when the answer is B
    ("B", "B", 1, 1), ("b", "", 1, 1), ("(B)", "B", 1, 0), ("B.", "B", 1, 1),
    ("**B**", "B", 1, 0), ("The answer is B", "B", 0, 0), ("B. green", "B", 1, 1),
    ("Answer: B) green", "B", 0, 0), ("option b", "", 0, 0), ("A and B", "A", 0, 0),
    ("green", "", 0, 0), ("Definitely", "D", 0, 0), ("<think>A</think> B", "B", 1, 1),
    ("", "", 0, 0),
])
def test_lmms_eval_letter_readers(text, mmstar, ai2d, scienceqa):
    """lmms-eval's own reading per task (tests/test_metrics_lmms_eval.py compares them with
    lmms-eval itself over a generated battery)."""
    assert metrics.mmstar_letter(metrics.lmms_eval_response(text)) == mmstar
    assert metrics.ai2d_correct(text, "B") == ai2d
    assert metrics.scienceqa_correct(text, "B") == scienceqa


def test_lmms_eval_answer_handling():
    assert metrics.strip_reasoning("<think>7</think> 12 ") == "12"
    assert metrics.strip_reasoning("7</think>12") == "12"  # the opening tag was in the prompt
    assert metrics.normalize_textvqa("a,b") == "ab" and metrics.normalize_vqa("a,b") == "b"
    assert metrics.normalize_textvqa("Dog's") == "dog 's"
    assert metrics.normalize_vqa("shed") == "shed"  # not in lmms-eval's contractions
    assert metrics.vqa_accuracy("a,b", ["ab"] * 10, metrics.normalize_textvqa) == 1.0
    assert metrics.lmms_eval_score("chartqa", " 12.5 ", "12") == 1.0  # stripped; within 5 %
    assert metrics.lmms_eval_score("chartqa", "<think>1</think> Yes", "yes") == 1.0
    assert metrics.lmms_eval_score("docvqa", "<think>no</think>Hello", ["hello"]) == 1.0


# ----------------------------------------------------------------------------- data

def mc_rows(n: int) -> list[dict]:
    """Multiple-choice rows: which colour fills the picture? The answer is an option index."""
    from PIL import Image
    import io

    rows = []
    for i in range(n):
        answer = i % 4
        rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
               "yellow": (230, 220, 20)}[COLOURS[answer]]
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), rgb).save(buf, "PNG")
        rows.append({"question": "Which colour is the picture?", "choices": COLOURS,
                     "answer": answer, "image": {"bytes": buf.getvalue(), "path": None},
                     "category": "warm" if COLOURS[answer] in ("red", "yellow") else "cold"})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def processor(tiny_tokenizer):
    config = preset("tiny", lm_base_vocab_size=tiny_tokenizer.base_vocab_size)
    return Processor(config, tiny_tokenizer)


def test_task_rows_build_prompts_and_references(tmp_path, processor):
    samples, skips = task_samples(get_task("multiple_choice"), write_rows(tmp_path / "mc.parquet",
                                  mc_rows(4)), processor)
    first = next(iter(samples))
    prompt = first["messages"][0]["content"]
    assert prompt.startswith("<image>Which colour") and "A. red\nB. green" in prompt
    assert first["reference"] == "A" and first["n_choices"] == 4 and first["category"] == "warm"


def test_bad_rows_are_skipped_and_counted(tmp_path, processor):
    rows = mc_rows(6)
    rows[1]["answer"] = 7  # outside the options
    rows[2]["choices"] = ["only one"]  # too few options
    rows[3]["image"] = {"bytes": b"not an image", "path": None}
    samples, skips = task_samples(get_task("multiple_choice"),
                                  write_rows(tmp_path / "mc.parquet", rows), processor)
    kept = list(samples)
    assert len(kept) == 3 and skips.as_dict() == {"malformed": 2, "image_error": 1}


def test_missing_column_is_an_error_naming_it(tmp_path, processor):
    rows = [{k: v for k, v in r.items() if k != "choices"} for r in mc_rows(2)]
    with pytest.raises(ValueError, match="needs the column.*choices"):
        task_samples(get_task("multiple_choice"), write_rows(tmp_path / "mc.parquet", rows),
                     processor)


def test_vqa_rows_from_jsonl_with_an_image_root(tmp_path, processor):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png(40, 30))
    records = [{"question": "What is it?", "answers": ["a cat"] * 10, "image": "a.png"},
               {"question": "And this?", "answers": ["a dog"] * 10, "image": "../escape.png"}]
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    samples, skips = task_samples(TASKS["textvqa"], tmp_path / "vqa.jsonl", processor,
                                  image_root=tmp_path / "img")
    kept = list(samples)
    assert [s["reference"] for s in kept] == [["a cat"] * 10]
    assert skips.as_dict() == {"path_escape": 1}


def test_a_trained_model_scores_above_chance_and_counts_add_up(tmp_path, tiny_tokenizer, processor):
    """Train a tiny model for a few steps on a multiple-choice file, then score it on those rows:
    above chance (25 %), and scored + skipped = rows."""
    rows = mc_rows(8)
    rows.append({**rows[0], "answer": 9})  # one bad row: no 10th option
    data = write_rows(tmp_path / "mc.parquet", rows)
    task = get_task("multiple_choice")
    train_samples = list(task_samples(task, data, processor)[0])
    model = make_model(processor.config)
    train(model, processor, train_samples, None, quick(tmp_path / "run", steps=60, batch_size=8))
    samples, skips = task_samples(task, data, processor)
    report, predictions = run_task(model, processor, samples, task, skips, batch_size=4,
                                   progress=False)
    assert report.n + sum(report.skipped.values()) == len(rows)
    assert len(predictions) == report.n == 8 and report.skipped == {"malformed": 1}
    assert report.score > 0.25, predictions
    assert set(report.per_category) == {"warm", "cold"}
    assert sum(c["n"] for c in report.per_category.values()) == report.n


def test_mmstar_reports_the_mean_of_its_subcategory_means(tmp_path, processor, monkeypatch):
    """MMStar's number is lmms-eval's: each l2_category weighs the same (mean of the group
    means), per category too; the plain mean over samples stays in the report beside it."""
    from tilevlm.inference.generation import GenerationOutput, GenerationStats

    image = {"bytes": png(32, 32), "path": None}
    # (category, l2_category, answer letter): the model always says "A"
    layout = [("math", "geometry", "A")] * 3 + [("math", "numeric", "B")] + \
        [("perception", "scene", "A"), ("perception", "scene", "C")]
    rows = [{"question": "Which?\nOptions: A: x, B: y, C: z, D: w", "answer": letter,
             "category": category, "l2_category": l2, "image": image, "index": i}
            for i, (category, l2, letter) in enumerate(layout)]
    monkeypatch.setattr("tilevlm.evaluation.task_run.greedy_outputs",
                        lambda model, proc, prompts, images, n: GenerationOutput(
                            [[]] * len(prompts), ["A"] * len(prompts), ["eos"] * len(prompts),
                            GenerationStats(prompt_tokens=10 * len(prompts))))
    task = get_task("mmstar")
    samples, skips = task_samples(task, write_rows(tmp_path / "mmstar.parquet", rows), processor)
    report, predictions = run_task(make_model(processor.config), processor, samples, task, skips,
                                   batch_size=4, progress=False)
    assert report.mean == pytest.approx(4 / 6)  # the plain mean
    assert report.score == pytest.approx((1.0 + 0.0 + 0.5) / 3)  # geometry, numeric, scene
    assert report.per_category["math"] == {"n": 4, "score": pytest.approx(0.5)}
    assert report.per_category["perception"] == {"n": 2, "score": pytest.approx(0.5)}
    assert report.aggregation == "mean_of_group_means" and report.prompt_tokens == 60
    assert [p["group"] for p in predictions] == [row["l2_category"] for row in rows]
    no_group = [{k: v for k, v in r.items() if k != "l2_category"} for r in rows]
    with pytest.raises(ValueError, match="needs the column.*l2_category"):
        task_samples(task, write_rows(tmp_path / "no_l2.parquet", no_group), processor)


# ----------------------------------------------------------------------------- the CLI

def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "tilevlm.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_eval_cli_writes_report_and_predictions(tmp_path, model_dir):
    data = write_rows(tmp_path / "mc.parquet", mc_rows(5))
    run = _cli("eval", "--model", str(model_dir), "--data", str(data), "--task",
               "multiple_choice", "--out", str(tmp_path / "out" / "r.json"), "--device", "cpu",
               "--limit", "4")
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "out" / "r.json").read_text())
    lines = (tmp_path / "out" / "r.predictions.jsonl").read_text().splitlines()
    assert report["n"] == 4 == len(lines) and report["task"] == "multiple_choice"
    assert {"prediction", "reference", "score", "source"} <= set(json.loads(lines[0]))
    assert "report written to" in run.stderr


@pytest.mark.parametrize("rows, message", [
    ([{"question": "q", "image": None, "answer": 0}], "needs the column"),
    ([], "could be scored"),
])
def test_eval_cli_refuses_unusable_data_in_one_line(tmp_path, model_dir, rows, message):
    path = tmp_path / "bad.parquet"
    schema = pa.schema([("question", pa.string()), ("answer", pa.int64()), ("choices",
                        pa.list_(pa.string())), ("image", pa.string()), ("category", pa.string())])
    table = pa.Table.from_pylist(rows) if rows else pa.Table.from_pylist([], schema=schema)
    pq.write_table(table, path)
    run = _cli("eval", "--model", str(model_dir), "--data", str(path), "--task",
               "multiple_choice", "--out", str(tmp_path / "r.json"), "--device", "cpu")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], run.stderr
