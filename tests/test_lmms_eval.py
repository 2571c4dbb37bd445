"""The lmms-eval adapter, run by the real lmms-eval package (offline) on a task whose data is a
local parquet file written here: `python -m lmms_eval eval --model tilevlm ...` in a subprocess.

lmms-eval is installed by `make test` without its declared dependencies (it declares
torchvision, whose PyPI build does not import beside this project's torch, and GPU/video/API
extras); the tests skip when it is absent."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40)}

UTILS = '''
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return ["red", "green"]


def process_results(doc, results):
    return {"acc": float(results[0].strip().lower().startswith(doc["answer"]))}
'''

TASK = '''
task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: "answer"
{extra}
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
'''


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("lmms_task")
    rows = []
    for i in range(4):
        name = list(COLOURS)[i % 2]
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), COLOURS[name]).save(buf, "PNG")
        rows.append({"question": "Which colour is it?", "answer": name,
                     "image": {"bytes": buf.getvalue(), "path": None}})
    datasets = pytest.importorskip("datasets")  # written as the Hub's copies are: an Image feature
    table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    table.to_parquet(str(root / "data.parquet"))
    (root / "utils.py").write_text(UTILS)
    gen = TASK.format(name="tilevlm_colour_gen", data=root / "data.parquet",
                      output_type="generate_until", extra="generation_kwargs:\n  until: ['\\n']\n"
                      "  max_new_tokens: 4\nprocess_results: !function utils.process_results")
    choice = TASK.format(name="tilevlm_colour_choice", data=root / "data.parquet",
                         output_type="multiple_choice", extra="doc_to_choice: !function "
                         "utils.doc_to_choice").replace("metric: acc", "metric: acc")
    (root / "colour_gen.yaml").write_text(gen)
    (root / "colour_choice.yaml").write_text(choice)
    return root


def _lmms_eval(task_dir: Path, model_dir: Path, out: Path, task: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(out / "hf"), "LMMS_EVAL_USE_CACHE": "False"}
    return subprocess.run(
        [sys.executable, "-m", "lmms_eval", "eval", "--model", "tilevlm", "--model_args",
         f"pretrained={model_dir},device=cpu", "--tasks", task, "--include_path",
         str(task_dir), "--output_path", str(out), "--batch_size", "2"],
        capture_output=True, text=True, timeout=300, env=env, cwd=out)


def test_lmms_eval_runs_a_tilevlm_model(task_dir, model_dir, tmp_path):
    task = "tilevlm_colour_gen"
    run = _lmms_eval(task_dir, model_dir, tmp_path, task)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = list(tmp_path.rglob("*results*.json"))
    assert results, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(results[0].read_text())
    assert task in data["results"] and 0.0 <= data["results"][task]["acc,none"] <= 1.0


def test_loglikelihood_agrees_with_greedy_generation(model_dir):
    """lmms-eval 0.7.3's evaluator turns every loglikelihood answer into a string
    (`unwrap_generation_output`), so its multiple_choice tasks fail for any model; the adapter's
    loglikelihood is driven here with lmms-eval's own request objects instead: the model's greedy
    answer must come out as greedy, with a finite log-probability, and another answer not."""
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from tilevlm.integrations.lmms_eval import TilevlmLMM

    lm = TilevlmLMM(pretrained=str(model_dir), device="cpu", max_new_tokens=3)
    lm.task_dict = {"t": {"test": [{"image": Image.new("RGB", (40, 30), (200, 30, 30))}]}}
    visual = lambda doc: [doc["image"]]  # noqa: E731

    def request(kind: str, args: tuple) -> Instance:
        return Instance(kind, args, 0, {"task": "t", "doc_id": 0, "repeats": 1})

    answer = lm.generate_until([request("generate_until", (
        "Which colour?", {"max_new_tokens": 3, "until": []}, visual, 0, "t", "test"))])[0]
    assert answer  # a random model still says something
    (ll, greedy), (other_ll, other_greedy) = lm.loglikelihood([
        request("loglikelihood", ("Which colour?", answer, visual, 0, "t", "test")),
        request("loglikelihood", ("Which colour?", answer + " zebra", visual, 0, "t", "test"))])
    assert greedy and not other_greedy
    assert -1e4 < other_ll < ll < 0
