"""tilevlm's task scores against lmms-eval 0.7.3's own, over a generated battery of answers.

The lmms-eval side is its real chain from a model's raw text to the number: each task is built
by lmms-eval's `ConfigurableTask` from the yaml it installs (so its `filter_list`, its
`process_results` or `metric_list` with their options), fed in-memory documents; an answer goes
through the task's filters, the reasoning-tag stripping of lmms-eval's CLI default
`--reasoning_tags` (evaluator._process_document_results), and `task.process_results`.
The tilevlm side reads the same row with `TaskRows` (the reference as `tilevlm eval` reads it)
and scores the answer with `tasks.score`. Scores must be equal, not close.

lmms-eval is installed by `make test` without its declared dependencies; the tests skip when it
(or `datasets`, which its tasks are built on) is absent.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("lmms_eval")
datasets = pytest.importorskip("datasets")

import lmms_eval.api.metrics  # registers anls and exact_match
import lmms_eval.filters  # registers take_first
import lmms_eval.tasks
from lmms_eval.api.reasoning import parse_reasoning_tags_config, strip_reasoning_tags
from lmms_eval.api.task import ConfigurableTask
from lmms_eval.utils import load_yaml_config
from PIL import ImageFile

# lmms_eval.api.task turns Pillow's check for truncated files off at import (for a data set of
# its own); collected first, this module would hand that to every other test of the session.
ImageFile.LOAD_TRUNCATED_IMAGES = False

from tilevlm.evaluation import metrics
from tilevlm.evaluation.aggregation import aggregate
from tilevlm.evaluation.report import by_category
from tilevlm.evaluation.tasks import TASKS, TaskRows, score

TASK_DIR = Path(lmms_eval.tasks.__file__).parent
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# tilevlm task -> (lmms-eval yaml, the process_results key that holds its score); the key is
# also the metric whose `aggregation` (the yaml's) makes the task's reported number
LMMS_TASKS = {
    "textvqa": ("textvqa/textvqa_val.yaml", lambda out: out["exact_match"]),
    "vqav2": ("vqav2/vqav2_val.yaml", lambda out: out["exact_match"]),
    "docvqa": ("docvqa/docvqa_val.yaml", lambda out: out["anls"]),
    "chartqa": ("chartqa/chartqa.yaml", lambda out: out["relaxed_overall"]),
    "mmstar": ("mmstar/mmstar.yaml", lambda out: out["average"]["score"]),
    "ai2d": ("ai2d/ai2d.yaml", lambda out: out["exact_match"]),
    "scienceqa": ("scienceqa/scienceqa.yaml", lambda out: out["exact_match"]),
}


# ----------------------------------------------------------------------------- documents
# One dict per case serves as tilevlm's row and lmms-eval's document (each reads its columns).

def vqa_doc(answers: list[str]) -> dict:
    """TextVQA's and DocVQA's columns: the answers as strings."""
    return {"question": "What is written here?", "image": None, "question_id": 0,
            "questionId": "0", "question_type": "what", "answers": list(answers)}


def vqav2_doc(answers: list[str]) -> dict:
    """VQAv2's: the answers as lmms-lab/VQAv2's records, each with its own answer_id."""
    records = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
               for i, a in enumerate(answers)]
    return {**vqa_doc(answers), "answers": records}


def chartqa_doc(target: str) -> dict:
    """lmms-lab/ChartQA's columns (question, answer) and HuggingFaceM4/ChartQA's (query, label),
    which tilevlm's task reads."""
    return {"question": "How much?", "query": "How much?", "answer": target, "label": [target],
            "type": "human_test", "image": None}


def mc_doc(task: str, options: list[str], answer: int) -> dict:
    question = "Which one is shown?"
    if task == "mmstar":  # options written in the question, the answer a letter
        listed = "\n".join(f"{metrics.LETTERS[i]}: {o}" for i, o in enumerate(options))
        return {"question": f"{question}\nOptions: {listed}", "answer": metrics.LETTERS[answer],
                "category": "math", "l2_category": "geometry", "index": 0, "image": None}
    if task == "ai2d":  # lmms-lab/ai2d: the answer is an index as a string
        return {"question": question, "options": options, "answer": str(answer), "image": None}
    return {"question": question, "choices": options, "answer": answer, "hint": "",
            "subject": "natural science", "image": None}


# ----------------------------------------------------------------------------- both sides

class _LocalTask(ConfigurableTask):
    """lmms-eval's task from its yaml, its one test document in memory instead of the Hub."""

    DOC: ClassVar[dict] = {}

    def download(self, dataset_kwargs=None) -> None:
        split = datasets.Dataset.from_list([self.DOC])
        self.dataset = self.dataset_no_image = datasets.DatasetDict({self.config.test_split: split})


def _reasoning_tags():
    """The `--reasoning_tags` lmms-eval's CLI passes when none is given."""
    from lmms_eval.__main__ import parse_eval_args

    with mock.patch.object(sys, "argv", ["lmms-eval"]):
        return parse_reasoning_tags_config(cli_value=parse_eval_args()[1].reasoning_tags)


class LmmsEval:
    def __init__(self) -> None:
        self.tags = _reasoning_tags()
        self.tasks: dict[str, ConfigurableTask] = {}

    def task(self, name: str, doc: dict) -> ConfigurableTask:
        if name not in self.tasks:
            config = load_yaml_config(str(TASK_DIR / LMMS_TASKS[name][0]), mode="full")
            self.tasks[name] = type("Local", (_LocalTask,), {"DOC": doc})(config=config)
        return self.tasks[name]

    def results(self, name: str, prediction: str, doc: dict) -> dict:
        """What the task's process_results makes of the answer after its filters."""
        task = self.task(name, doc)
        (ensemble,) = task._filters
        request = SimpleNamespace(resps=[prediction], filtered_resps={})
        ensemble.apply([request], [doc])
        response = request.filtered_resps[ensemble.name]
        if self.tags is not None:
            response = strip_reasoning_tags(response, self.tags)
        return task.process_results(_fresh(doc), [response])

    def score(self, name: str, prediction: str, doc: dict) -> float:
        return float(LMMS_TASKS[name][1](self.results(name, prediction, doc)))


def _fresh(doc: dict) -> dict:
    """A copy for process_results, which rewrites the answers in place (TextVQA, VQAv2)."""
    answers = [dict(a) if isinstance(a, dict) else a for a in doc.get("answers", [])]
    return {**doc, "answers": answers} if "answers" in doc else dict(doc)


@pytest.fixture(scope="module")
def lmms() -> LmmsEval:
    return LmmsEval()


_SAMPLES: dict[tuple[str, int], tuple[dict, dict]] = {}  # (task, id(doc)) -> (doc, sample)


def tilevlm_score(name: str, prediction: str, doc: dict) -> float:
    key = (name, id(doc))
    if key not in _SAMPLES or _SAMPLES[key][0] is not doc:
        _SAMPLES[key] = doc, TaskRows(TASKS[name]).to_sample(doc, Path("."), "battery")
    return score(TASKS[name], prediction, _SAMPLES[key][1])


def compare(lmms: LmmsEval, name: str, cases) -> int:
    """Every (prediction, doc) scored both ways; the number of cases (all must agree)."""
    differ, n = [], 0
    for prediction, doc in cases:
        ours, theirs = tilevlm_score(name, prediction, doc), lmms.score(name, prediction, doc)
        n += 1
        if ours != theirs:
            differ.append((prediction, _reference(doc), ours, theirs))
    assert not differ, (f"{name}: {len(differ)} of {n} differ (prediction, reference, tilevlm, "
                        f"lmms-eval): {differ[:8]}")
    return n


def _reference(doc: dict):
    return doc.get("answers", doc.get("answer"))


# ----------------------------------------------------------------------------- the battery

NUMBERS = ["0", "0.0", "-0", "0%", "0.00%", "12", "12.0", "-12", "12%", "12 %", "12.5", "11.5",
           "12.6", "12.7", "-12.5%", "0.12", "0.125", "1,000", "1000", "1000.0", "1,234.5",
           "1234.5", "1 000", "1_000", "1e3", "95", "100", "100%", "1", "1%", "10", "10.5",
           "10.6", "9.5", "9.4", ".5", "+3", "$12", "12$", "nan", "inf", "12%%"]
TEXTS = ["", " ", "\n", "Yes", "yes", "YES", "yes.", "no", "dog", "The dog", "the dog", "a dog",
         "Dog.", "dog!", "dogs", "dog's", "Dog 's", "two dogs", "2 dogs", "Two", "black/white",
         "black white", "black and white", "red, blue", "red,blue", "redblue", "don't know",
         "dont know", "dont", "shed", "she'd", "somebody'd", "somebodyd", "1,000 m", "a,b", "ab",
         "ax", "abc", "xbz", "b", "3.5", "3. 5", "hello world", "Hello  World", "hallo",
         "  padded  ", "\tTab\n", "what?", "what", "e.g.", "eg", "U.S.A.", "usa",
         "<think>12</think> 13", "<think>x", "x</think>y", "<analysis>no</analysis>yes",
         "İstanbul", "straße", "STRASSE", "ΣΑΣ", "σας", "." * 40 + "x", "x" + ". " * 20]
ANSWERS = NUMBERS + TEXTS
PADDINGS = ["{}", " {} ", "{}\n", "<think>maybe 7</think>{}"]


def answer_sets(rng_seed: int = 0) -> list[list[str]]:
    """Ten human answers: one answer, a 3/7 or 2/8 split, padded and cased variants, a mix."""
    import random

    rng = random.Random(rng_seed)
    sets = [[a] * 10 for a in ["dog", "2", "yes", "black and white", "1,000", "12", "ab", " a "]]
    for _ in range(10):
        main, other = rng.sample(ANSWERS, 2)
        k = rng.choice([1, 2, 3, 4, 9])
        sets.append([main] * k + [other] * (10 - k))
    sets += [[rng.choice(ANSWERS) for _ in range(10)] for _ in range(2)]
    return sets


def reference_lists() -> list[list[str]]:
    """DocVQA's references: one to three answers, with raw spaces and case."""
    import random

    rng = random.Random(1)
    lists = [["hello"], ["ax"], ["hello world"], [" Hello  World "], ["ab", "xbz"], ["12"],
             [""], ["  "], ["straße"], ["İstanbul"], ["1,000", "1000"], ["dog", "the dog"]]
    lists += [rng.sample(ANSWERS, rng.choice([1, 2, 3])) for _ in range(20)]
    return lists


def predictions() -> list[str]:
    return [pad.format(a) for a, pad in itertools.product(ANSWERS, PADDINGS)
            if pad == "{}" or a in NUMBERS[:20] or a in TEXTS[:16]]


OPTION_SETS = [["red", "green", "blue", "yellow", "black"],
               ["Apple", "Banana", "Cherry", "Date", "Elderberry"]]
SHAPES = ["{L}", "{l}", "({L})", "({l})", "{L}.", "{l}.", "{L})", "{l})", "{L}:", "{L}: {T}",
          "**{L}**", "**{l}**", "**{L}.** {T}", "**Answer: {L}**", "The answer is {L}",
          "The answer is {L}.", "the answer is ({l})", "The answer is: {L}",
          "The correct answer is {L}. {T}", "Answer: {L}", "Answer: {L}) {T}", "answer: {l}",
          "Answer:{L}", "option {l}", "Option {L}", "Option ({L})", "{L}. {T}", "{l}. {T}",
          "{l}) {T}", "{L} {T}", "{T}", "{T}.", "{L} and {M}", "{L}, {M}", "{L} or {M}",
          "{M}. Actually {L}", "Not {M}, {L}", "I think {L}", "I choose {L}", "My answer is {L}.",
          "{L} is correct", "{L}\n", " {L} ", "\n{L}.", "[{L}]", "{L}!", "'{L}'", "\"{L}\"",
          "{L}.{T}", "{L}\x00", "<think>{M}</think>{L}", "<think>{M}</think> The answer is {L}.",
          "<think>{M}", "答案是{L}", "{L}{M}", "{L}{T}", "None", "none of the above", "",
          "  ", "I don't know", "Definitely", "It is {T}", "The {T} one", "{T} ({L})"]


def mc_cases(task: str) -> list[tuple[str, dict]]:
    """Every shape with every letter A-E (E is outside four options) named, and every answer."""
    counts = [4] if task != "scienceqa" else [2, 3, 4, 5]
    cases = []
    for options, n in itertools.product(OPTION_SETS, counts):
        docs = [mc_doc(task, options[:n], answer) for answer in range(n)]
        for shape, letter in itertools.product(SHAPES, "ABCDE"):
            i = metrics.LETTERS.index(letter)
            other = metrics.LETTERS[(i + 1) % 5]
            text = shape.format(L=letter, l=letter.lower(), M=other, T=options[i])
            cases += [(text, doc) for doc in docs]
    return cases


# ----------------------------------------------------------------------------- the comparisons

def test_vqa_accuracy_matches_lmms_eval(lmms):
    sets = answer_sets()
    for name, make in (("textvqa", vqa_doc), ("vqav2", vqav2_doc)):
        docs = [make(s) for s in sets]
        assert compare(lmms, name, itertools.product(predictions(), docs)) >= 4000


def test_vqa_normalisation_matches_lmms_eval():
    """Each answer string of the battery, padded and fuzzed ones too, normalised as TextVQA
    (EvalAIAnswerProcessor's call) and as VQAv2 (its process_results' steps) do."""
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    processor, texts = EvalAIAnswerProcessor(), set(predictions())
    texts |= {" ".join(pair) for pair in itertools.product(ANSWERS, ["dog", "1,000", "n't", "a"])}
    for text in sorted(texts):
        vqav2 = processor.process_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
        assert metrics.normalize_vqa(text) == processor.process_digit_article(vqav2), text
        assert metrics.normalize_textvqa(text) == processor(text), text


def test_anls_matches_lmms_eval(lmms):
    docs = [vqa_doc(r) for r in reference_lists()]
    assert compare(lmms, "docvqa", itertools.product(predictions(), docs)) >= 5000


def test_relaxed_accuracy_matches_lmms_eval(lmms):
    docs = [chartqa_doc(t) for t in NUMBERS + TEXTS[:24] + [" 12", "12 ", "Yes "]]
    assert compare(lmms, "chartqa", itertools.product(predictions(), docs)) >= 10000


@pytest.mark.parametrize("task", ["mmstar", "ai2d", "scienceqa"])
def test_multiple_choice_matches_lmms_eval(lmms, task):
    assert compare(lmms, task, mc_cases(task)) >= 2500


# Random text from the characters the rules look at.
ALPHABET = "ABCDEabcde ().:*,!?'\"\n%-0123456789/<>"
WORDS = ["answer is", "The answer is", "option", "Answer:", "<think>", "</think>", "the", "a",
         "two", "dont", "1,000", "12%", "**", "İ", "ß"]
fuzz_text = st.lists(st.one_of(st.text(ALPHABET, max_size=4), st.sampled_from(WORDS)),
                     max_size=6).map("".join)


@FUZZ
@given(prediction=fuzz_text, answers=st.lists(fuzz_text, min_size=1, max_size=10),
       task=st.sampled_from(["textvqa", "vqav2", "docvqa"]))
def test_fuzzed_answer_lists_match_lmms_eval(lmms, prediction, answers, task):
    doc = vqav2_doc(answers) if task == "vqav2" else vqa_doc(answers)
    compare(lmms, task, [(prediction, doc)])


@FUZZ
@given(prediction=fuzz_text, target=fuzz_text)
def test_fuzzed_chartqa_matches_lmms_eval(lmms, prediction, target):
    compare(lmms, "chartqa", [(prediction, chartqa_doc(target))])


@FUZZ
@given(prediction=fuzz_text, answer=st.integers(0, 3),
       task=st.sampled_from(["mmstar", "ai2d", "scienceqa"]))
def test_fuzzed_letters_match_lmms_eval(lmms, prediction, answer, task):
    compare(lmms, task, [(prediction, mc_doc(task, OPTION_SETS[0][:4], answer))])


# ----------------------------------------------------------------------------- aggregation
# The task's one number: lmms-eval's own aggregation (the task's yaml: "mean", or MMStar's
# mmstar_aggregate_results) over its own process_results, against tilevlm's `Task.aggregation`
# over tilevlm's scores, on batteries of samples in uneven groups.

METRIC_KEYS = {"textvqa": "exact_match", "vqav2": "exact_match", "docvqa": "anls",
               "chartqa": "relaxed_overall", "mmstar": "average", "ai2d": "exact_match",
               "scienceqa": "exact_match"}
MMSTAR_GROUPS = {"coarse perception": ["image scene and topic", "image style & quality"],
                 "math": ["geometry", "numeric commonsense", "statistical reasoning"],
                 "instance reasoning": ["single-instance reasoning"]}


def battery_docs(name: str, n: int, seed: int) -> list[tuple[str, dict]]:
    """(prediction, doc) pairs: uneven group sizes, right and wrong answers."""
    import random

    rng = random.Random(seed)
    cases = []
    for i in range(n):
        if name in ("mmstar", "ai2d", "scienceqa"):
            doc = mc_doc(name, OPTION_SETS[0][:4], rng.randrange(4))
            if name == "mmstar":  # skewed: the first group of each category is the largest
                category = rng.choice(list(MMSTAR_GROUPS))
                groups = MMSTAR_GROUPS[category]
                l2 = groups[min(int(rng.expovariate(1.5)), len(groups) - 1)]
                doc = {**doc, "category": category, "l2_category": l2, "index": i}
            prediction = rng.choice(["A", "B", "C", "D", "The answer is C", "x"])
        elif name == "chartqa":
            doc = chartqa_doc(rng.choice(NUMBERS[:20]))
            prediction = rng.choice(NUMBERS[:20])
        else:
            answers = rng.choice(answer_sets())
            doc = vqav2_doc(answers) if name == "vqav2" else vqa_doc(answers)
            prediction = rng.choice(ANSWERS)
        cases.append((prediction, doc))
    return cases


def lmms_aggregate(lmms: LmmsEval, name: str, cases) -> tuple[float, list]:
    """lmms-eval's reported number (its aggregation over its process_results), and the raw
    process_results outputs."""
    task = lmms.task(name, cases[0][1])
    outs = [lmms.results(name, prediction, doc) for prediction, doc in cases]
    key = METRIC_KEYS[name]
    return task.aggregation()[key]([out[key] for out in outs]), outs


@pytest.mark.parametrize("name", list(LMMS_TASKS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_task_score_is_lmms_eval_s_aggregate(lmms, name, seed):
    cases = battery_docs(name, 120, seed)
    theirs, _ = lmms_aggregate(lmms, name, cases)
    samples = [TaskRows(TASKS[name]).to_sample(doc, Path("."), "agg") for _, doc in cases]
    scores = [score(TASKS[name], p, s) for (p, _), s in zip(cases, samples)]
    ours = aggregate(TASKS[name].aggregation, scores, [s.get("group") for s in samples])
    assert ours == theirs


def test_mmstar_categories_are_lmms_eval_s_per_category_metrics(lmms):
    """MMStar reports each category as mmstar_aggregate_results over that category's samples:
    the mean of its subcategories' means; so does the report's per_category."""
    cases = battery_docs("mmstar", 200, 7)
    task = lmms.task("mmstar", cases[0][1])
    _, outs = lmms_aggregate(lmms, "mmstar", cases)
    samples = [TaskRows(TASKS["mmstar"]).to_sample(doc, Path("."), "agg") for _, doc in cases]
    scores = [score(TASKS["mmstar"], p, s) for (p, _), s in zip(cases, samples)]
    ours = by_category(((s["category"], v) for s, v in zip(samples, scores)),
                       TASKS["mmstar"].aggregation, [s["group"] for s in samples])
    for category in MMSTAR_GROUPS:
        theirs = task.aggregation()[category]([o[category] for o in outs if category in o])
        assert ours[category]["score"] == theirs, category
    plain = sum(scores) / len(scores)
    assert aggregate("mean_of_group_means", scores, [s["group"] for s in samples]) != plain


# ----------------------------------------------------------------------------- prompts

@pytest.mark.parametrize("name, doc", [
    ("textvqa", vqa_doc(["x"])), ("vqav2", vqav2_doc(["x"])), ("docvqa", vqa_doc(["x"])),
    ("chartqa", chartqa_doc("1")), ("mmstar", mc_doc("mmstar", OPTION_SETS[0][:4], 0)),
    ("ai2d", mc_doc("ai2d", OPTION_SETS[0][:4], 0)),
    ("scienceqa", mc_doc("scienceqa", OPTION_SETS[0][:3], 0)),
])
def test_prompts_are_lmms_eval_s(lmms, name, doc):
    """The prompt tilevlm writes is lmms-eval's default one (a question already capitalised, no
    ScienceQA hint: see docs/evaluation.md for those two)."""
    sample = TaskRows(TASKS[name]).to_sample(doc, Path("."), "prompt")
    assert sample["messages"][0]["content"] == lmms.task(name, doc).doc_to_text(doc)


def test_a_scorer_must_fit_its_metric():
    from tilevlm.evaluation.tasks import Task

    with pytest.raises(ValueError, match="scores multiple_choice, not anls"):
        Task("x", "anls", scorer="ai2d")
    with pytest.raises(ValueError, match="unknown scorer"):
        Task("x", "anls", scorer="nope")
