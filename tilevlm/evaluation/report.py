"""The one report of every evaluation, and its writers: the synthetic quiz, a conversation data
set scored by exact match and a named benchmark task all give an EvalReport (the task's score:
its metric aggregated as the task says, lmms-eval's way; the plain mean; per category, skips,
the loss where it is measured, the prompt and image tokens read), written as JSON; a task's
predictions are written as JSON lines beside it."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tilevlm.evaluation.aggregation import aggregate
from tilevlm.files import atomic_write_text


@dataclass
class EvalReport:
    task: str  # a named task (`tasks.TASKS`); "exact_match" for conversation data and the quiz
    metric: str  # the metric `score` aggregates (`tasks.METRICS`)
    score: float  # the task's aggregate of the metric (`aggregation`), as lmms-eval reports it
    n: int  # samples scored
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)  # {n, score}
    loss: float | None = None  # mean cross-entropy per answer token, where measured (the quiz)
    skipped: dict[str, int] = field(default_factory=dict)  # samples not scored, by reason
    examples: list[dict[str, Any]] = field(default_factory=list)  # the first few predictions
    model: str = ""
    data: str = ""
    seconds: float = 0.0
    aggregation: str = "mean"  # how `score` is made (`aggregation.AGGREGATIONS`)
    mean: float | None = None  # the plain mean over the scored samples (= score for "mean")
    prompt_tokens: int | None = None  # over the scored prompts, where counted (generate's stats)
    image_tokens: int | None = None  # of which image tokens (README: "image tokens")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def by_category(scores: Iterable[tuple[str | None, float]], aggregation: str = "mean",
                groups: Iterable[str | None] | None = None) -> dict[str, dict[str, float]]:
    """{category: {n, score}} of (category, score) pairs, sorted; no category is left out.
    A category's score is the aggregate its task reports (`groups`: each score's group, for
    "mean_of_group_means")."""
    grouped: dict[str, tuple[list[float], list[str | None]]] = defaultdict(lambda: ([], []))
    paired = zip(scores, groups) if groups is not None else ((s, None) for s in scores)
    for (category, value), group in paired:
        if category is not None:
            grouped[category][0].append(value)
            grouped[category][1].append(group)
    return {c: {"n": len(v), "score": aggregate(aggregation, v, g)}
            for c, (v, g) in sorted(grouped.items())}


def write_report(report: EvalReport, path: str | Path) -> Path:
    """The report as JSON in `path`, written whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
    return path


def write_predictions(predictions: list[dict[str, Any]], path: str | Path) -> Path:
    """Every prediction, one JSON object a line, written whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(p) + "\n" for p in predictions))
    return path
