"""The one report of every evaluation, and its writers: the synthetic quiz, a conversation data
set scored by exact match and a named benchmark task all give an EvalReport (the mean of the
task's metric, per category, skips, the loss where it is measured), written as JSON; a task's
predictions are written as JSON lines beside it."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tilevlm.files import atomic_write_text


@dataclass
class EvalReport:
    task: str  # a named task (`tasks.TASKS`); "exact_match" for conversation data and the quiz
    metric: str  # the metric `score` is the mean of (`tasks.METRICS`)
    score: float  # the mean of the metric over the scored samples
    n: int  # samples scored
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)  # {n, score}
    loss: float | None = None  # mean cross-entropy per answer token, where measured (the quiz)
    skipped: dict[str, int] = field(default_factory=dict)  # samples not scored, by reason
    examples: list[dict[str, Any]] = field(default_factory=list)  # the first few predictions
    model: str = ""
    data: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def by_category(scores: Iterable[tuple[str | None, float]]) -> dict[str, dict[str, float]]:
    """{category: {n, score}} of (category, score) pairs, sorted; no category is left out."""
    grouped: dict[str, list[float]] = defaultdict(list)
    for category, value in scores:
        if category is not None:
            grouped[category].append(value)
    return {c: {"n": len(v), "score": sum(v) / len(v)} for c, v in sorted(grouped.items())}


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
