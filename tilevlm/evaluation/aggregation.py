"""How a task turns its per-sample scores into the one number it reports (`Task.aggregation`),
as the lmms-eval task of the same name does (its yaml's `aggregation`):

- "mean": the mean over the samples (AI2D, ScienceQA, TextVQA, VQAv2, DocVQA, ChartQA:
  `aggregation: mean` in lmms-eval 0.7.3).
- "mean_of_group_means": the mean over the groups (`Task.group`'s column) of each group's mean
  (MMStar: `mmstar_aggregate_results` averages the means of its `l2_category` values, so each
  subcategory weighs the same whatever its size).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

AGGREGATIONS = ("mean", "mean_of_group_means")


def aggregate(name: str, scores: Sequence[float], groups: Sequence[str | None]) -> float:
    """The aggregate `name` of the scores (`groups[i]`: the group of `scores[i]`); 0.0 for none."""
    if name not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {name!r}; choose one of {', '.join(AGGREGATIONS)}")
    if not scores:
        return 0.0
    if name == "mean":
        return mean(scores)
    by_group: dict[str | None, list[float]] = defaultdict(list)
    for group, score in zip(groups, scores, strict=True):
        by_group[group].append(score)
    return mean([mean(values) for values in by_group.values()])


def mean(values: Sequence[float]) -> float:
    """sum / count, summed in order as lmms-eval's `mean` and its aggregation functions do."""
    return sum(values) / len(values)
