"""Named evaluation tasks: which columns hold the question, image, options, answer and category,
how the prompt is written, and which metric scores an answer. A new benchmark is a few lines in
TASKS; `tilevlm eval --task NAME` picks one.

    task = TASKS["ai2d"]
    reader = open_dataset("ai2d/test.parquet", row_format=TaskRows(task))  # raw samples
    # each sample: messages (prompt + reference), images, reference, n_choices, category

The column names and prompts follow the Hugging Face copies of the benchmarks (lmms-lab/*) and
lmms-eval's prompts, and a task named after an lmms-eval task scores an answer the way that task
does (`Task.scorer`: its filters, answer parser and metric), so scores are comparable with what
people report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tilevlm.evaluation import metrics
from tilevlm.data.readers.rows import image_source
from tilevlm.evaluation.aggregation import AGGREGATIONS
from tilevlm.data.sample import Sample, conversation_sample
from tilevlm.data.skips import MALFORMED, SkipSample
from tilevlm.preprocessing.chat_template import IMAGE_PLACEHOLDER

METRICS = ("multiple_choice", "vqa_accuracy", "anls", "relaxed_accuracy", "exact_match")
LETTER_PROMPT = "Answer with the option's letter from the given choices directly."
SHORT_PROMPT = "Answer the question using a single word or phrase."
MMSTAR_PROMPT = "Answer with the option's letter from the given choices directly"  # mmstar's yaml
CHARTQA_PROMPT = "Answer the question with a single word."  # chartqa.yaml's post_prompt


@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # one of METRICS
    question: str = "question"  # column names
    answer: str = "answer"  # a letter / option index (multiple choice), a list of answers, a string
    image: str | None = "image"  # None: text only
    choices: str | None = None  # a list column of option texts; None: options are in the question
    n_choices: int = 4  # with choices=None: how many letters the question offers
    category: str | None = None  # results per value of this column too
    instruction: str = SHORT_PROMPT  # the line after the question (and the options)
    max_new_tokens: int = 16
    # which lmms-eval task's chain from raw answer to score applies (a key of
    # metrics.LMMS_EVAL: its filters, answer parser and metric variant); None: tilevlm's own
    # rule for `metric`
    scorer: str | None = None
    # how the scores become the task's one number (`aggregation.AGGREGATIONS`: lmms-eval's
    # aggregation for the task); "mean_of_group_means" averages per value of the `group` column
    aggregation: str = "mean"
    group: str | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name}: unknown metric {self.metric!r}; "
                             f"choose one of {', '.join(METRICS)}")
        if self.scorer is not None and self.scorer not in metrics.LMMS_EVAL:
            raise ValueError(f"task {self.name}: unknown scorer {self.scorer!r}; "
                             f"choose one of {', '.join(metrics.LMMS_EVAL)}")
        if self.scorer is not None and metrics.LMMS_EVAL[self.scorer][0] != self.metric:
            raise ValueError(f"task {self.name}: scorer {self.scorer!r} scores "
                             f"{metrics.LMMS_EVAL[self.scorer][0]}, not {self.metric}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"task {self.name}: unknown aggregation {self.aggregation!r}; "
                             f"choose one of {', '.join(AGGREGATIONS)}")
        if (self.aggregation == "mean_of_group_means") != (self.group is not None):
            raise ValueError(f"task {self.name}: a group column goes with, and only with, "
                             "aggregation mean_of_group_means")

    def columns(self) -> list[str]:
        named = (self.question, self.answer, self.image, self.choices, self.category, self.group)
        return [c for c in named if c is not None]


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("multiple_choice", "multiple_choice", choices="choices", category="category",
         instruction=LETTER_PROMPT, max_new_tokens=8),
    Task("mmstar", "multiple_choice", category="category", instruction=MMSTAR_PROMPT,
         max_new_tokens=8, scorer="mmstar",  # options are written in the question
         aggregation="mean_of_group_means", group="l2_category"),
    Task("ai2d", "multiple_choice", choices="options", instruction=LETTER_PROMPT,
         max_new_tokens=8, scorer="ai2d"),
    Task("scienceqa", "multiple_choice", choices="choices", category="subject",
         instruction=LETTER_PROMPT, max_new_tokens=8, scorer="scienceqa"),
    Task("vqa", "vqa_accuracy", answer="answers", scorer="vqav2"),
    Task("textvqa", "vqa_accuracy", answer="answers", scorer="textvqa"),
    Task("vqav2", "vqa_accuracy", answer="answers", category="question_type", scorer="vqav2"),
    Task("docvqa", "anls", answer="answers", max_new_tokens=32, scorer="docvqa"),
    Task("chartqa", "relaxed_accuracy", question="query", answer="label", category="type",
         instruction=CHARTQA_PROMPT, scorer="chartqa"),
    Task("exact_match", "exact_match"),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def letters(n: int) -> str:
    if not 2 <= n <= len(metrics.LETTERS):
        raise SkipSample(MALFORMED, f"a multiple-choice question needs 2 to "
                                    f"{len(metrics.LETTERS)} options, got {n}")
    return metrics.LETTERS[:n]


class TaskRows:
    """A `RowFormat` for the data readers: a task's columns -> raw evaluation samples."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def columns(self, names: Sequence[str], where: str) -> list[str]:
        missing = [c for c in self.task.columns() if c not in names]
        if missing:
            raise ValueError(f"{where}: task {self.task.name} needs the column(s) "
                             f"{', '.join(missing)} (found {', '.join(names)}); pick another "
                             "--task or rename the columns")
        return self.task.columns()

    def to_sample(self, row: dict[str, Any], root: Path, where: str) -> Sample:
        task = self.task
        for column in task.columns():
            if column not in row:
                raise SkipSample(MALFORMED, f"no '{column}' (task {task.name})")
        question = row[task.question]
        if not isinstance(question, str) or not question.strip():
            raise SkipSample(MALFORMED, f"'{task.question}' must be a non-empty string")
        prompt, reference, n_choices = self._prompt_and_reference(row, question)
        images = self._images(row, root)
        user = IMAGE_PLACEHOLDER * len(images) + prompt
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _first(reference)}]
        sample = conversation_sample(messages, images, where)
        category = row.get(task.category) if task.category else None
        group = row.get(task.group) if task.group else None
        sample.update(reference=reference, n_choices=n_choices,
                      category=None if category is None else str(category),
                      group=None if group is None else str(group))
        return sample

    def _prompt_and_reference(self, row: dict[str, Any], question: str
                              ) -> tuple[str, str | list[str], int]:
        task, answer = self.task, row[self.task.answer]
        if task.metric != "multiple_choice":
            return f"{question}\n{task.instruction}", _answers(answer, task), 0
        if task.choices is None:
            return f"{question}\n{task.instruction}", _letter(answer, [], task), task.n_choices
        options = row[task.choices]
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise SkipSample(MALFORMED, f"'{task.choices}' must be a list of strings, "
                                        f"got {options!r:.80}")
        listed = "\n".join(f"{letter}. {text}" for letter, text in zip(letters(len(options)), options))
        return f"{question}\n{listed}\n{task.instruction}", _letter(answer, options, task), len(options)

    def _images(self, row: dict[str, Any], root: Path) -> list[Any]:
        if self.task.image is None or row.get(self.task.image) is None:
            return []
        value = row[self.task.image]
        return [image_source(v, root) for v in (value if isinstance(value, list) else [value])]


def _letter(answer: Any, options: list[str], task: Task) -> str:
    """The answer as an option letter: a letter, an option index, or an option's text."""
    n = len(options) or task.n_choices
    valid = letters(n)
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        index = int(answer)
        if 0 <= index < n:
            return valid[index]
    elif isinstance(answer, str) and answer.strip().upper() in valid and len(answer.strip()) == 1:
        return answer.strip().upper()
    elif isinstance(answer, str) and answer in options:
        return valid[options.index(answer)]
    raise SkipSample(MALFORMED, f"answer {answer!r:.40} in '{task.answer}' is not one of the "
                                f"{n} options ({', '.join(valid)})")


def _answers(answer: Any, task: Task) -> str | list[str]:
    """A string (relaxed accuracy, exact match) or a non-empty list of strings (VQA, ANLS);
    VQAv2's `[{"answer": ...}]` records are read too."""
    if task.metric in ("vqa_accuracy", "anls"):
        items = answer if isinstance(answer, list) else [answer]
        items = [a.get("answer") if isinstance(a, dict) else a for a in items]
        if not items or not all(isinstance(a, str) for a in items):
            raise SkipSample(MALFORMED, f"'{task.answer}' must be a list of answer strings, "
                                        f"got {answer!r:.80}")
        return items
    if isinstance(answer, list) and answer and isinstance(answer[0], str):
        answer = answer[0]  # ChartQA stores its label as a one-element list
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise SkipSample(MALFORMED, f"'{task.answer}' must be a string, got {answer!r:.80}")
    return str(answer)


def _first(reference: str | list[str]) -> str:
    return reference if isinstance(reference, str) else reference[0]


def score(task: Task, prediction: str, sample: Sample) -> float:
    """The task's metric for one prediction against a sample's reference: the lmms-eval task's
    own chain where the task names one (`scorer`), else tilevlm's rule for the metric."""
    reference = sample["reference"]
    if task.scorer is not None:
        return metrics.lmms_eval_score(task.scorer, prediction, reference)
    if task.metric == "multiple_choice":
        return metrics.multiple_choice(prediction, reference, sample["n_choices"])
    if task.metric == "vqa_accuracy":
        return metrics.vqa_accuracy(prediction, reference)
    if task.metric == "anls":
        return metrics.anls(prediction, reference)
    if task.metric == "relaxed_accuracy":
        return metrics.relaxed_accuracy(prediction, reference)
    return metrics.exact_match(prediction, reference)
