"""Score a model on a task over a local data set: batched KV-cached greedy answers, the task's
metric per answer, a report (the task's aggregate and the plain mean, per category, skips,
timings, the prompt and image tokens read) and every prediction.

    samples, skips = task_samples(get_task("ai2d"), "ai2d/test.parquet", processor)
    report, predictions = run_task(model, processor, samples, task, skips=skips, limit=500)
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from tilevlm.data.lengths import LengthFilter
from tilevlm.data.readers.dataset import open_dataset
from tilevlm.data.sample import Sample
from tilevlm.data.skips import IMAGE_ERROR, MALFORMED, TOO_LONG, SkipCounter, SkipSample
from tilevlm.evaluation.aggregation import aggregate, mean
from tilevlm.evaluation.answering import chunks, greedy_outputs, split_prompt
from tilevlm.evaluation.report import EvalReport, by_category
from tilevlm.evaluation.tasks import Task, TaskRows, score
from tilevlm.inference.generation import GenerationStats

log = logging.getLogger(__name__)

OTHER_ERROR = "answer_error"  # generation refused a sample for another reason


def task_samples(task: Task, data: str | Path, processor: Any, data_format: str | None = None,
                 image_root: str | Path | None = None, split: str = "train"
                 ) -> tuple[Iterable[Sample], SkipCounter]:
    """The task's samples of a local data set, header-checked and within `lm_max_length` (what
    fails is counted in the returned SkipCounter). `exact_match` reads the conversation formats
    `train` reads; the other tasks read their columns (parquet, save_to_disk, JSON / JSONL)."""
    skips = SkipCounter()
    row_format = None if task.metric == "exact_match" else TaskRows(task)
    reader = open_dataset(data, data_format, image_root, split=split, skips=skips,
                          row_format=row_format)
    samples = reader if row_format is not None else _as_references(reader, skips)
    return LengthFilter(samples, processor, skips=skips), skips


def _as_references(samples: Iterable[Sample], skips: SkipCounter) -> Iterator[Sample]:
    """Conversation samples with their final assistant message as the reference; one that
    ends with another turn (nothing to compare with) is skipped and counted."""
    for sample in samples:
        try:
            _, reference = split_prompt(sample["messages"])
        except ValueError as e:
            skips.add(MALFORMED, sample.get("source", ""), str(e))
            continue
        yield {**sample, "reference": reference, "n_choices": 0,
               "category": sample.get("qtype")}


@torch.no_grad()
def run_task(model: nn.Module, processor: Any, samples: Iterable[Sample], task: Task,
             skips: SkipCounter | None = None, batch_size: int = 8,
             max_new_tokens: int | None = None, limit: int | None = None,
             progress: bool = True) -> tuple[EvalReport, list[dict[str, Any]]]:
    """(report, one prediction record per scored sample). A sample the processor refuses (an
    image that does not decode) is counted as skipped, never a crash."""
    skips = skips if skips is not None else SkipCounter()
    max_new_tokens = max_new_tokens or task.max_new_tokens
    start, predictions, read = time.perf_counter(), [], GenerationStats()
    stream = itertools.islice(samples, limit) if limit else iter(samples)
    drawn = progress and sys.stderr.isatty()  # a log file gets no \r frames
    bar = tqdm(total=limit, desc=f"eval {task.name}", unit="sample", disable=not drawn,
               dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        for chunk in chunks(stream, batch_size):
            for sample, answer in _answer_chunk(model, processor, chunk, max_new_tokens, skips,
                                                read):
                predictions.append(_record(task, sample, answer))
            bar.update(len(chunk))
    finally:
        model.train(was_training)
        bar.close()
    report = _report(task, predictions, skips, time.perf_counter() - start, read)
    if report.n == 0:
        raise ValueError(f"no sample of the data could be scored with task {task.name} "
                         f"(skipped: {skips.as_dict() or 'none; the data set is empty'})")
    return report, predictions


def _answer_chunk(model: nn.Module, processor: Any, chunk: list[Sample], max_new_tokens: int,
                  skips: SkipCounter, read: GenerationStats) -> list[tuple[Sample, str]]:
    """Greedy answers for a chunk; when the batch fails, one by one, counting the bad ones.
    The prompt and image tokens of what was answered are added to `read`."""
    try:
        return list(zip(chunk, _answers(model, processor, chunk, max_new_tokens, read)))
    except ValueError:
        good = []
        for sample in chunk:
            reason = _unanswerable(processor, sample, max_new_tokens)
            if reason is not None:
                skips.skip(reason, sample.get("source", ""))
                continue
            try:
                good += zip([sample], _answers(model, processor, [sample], max_new_tokens, read))
            except ValueError as e:
                skips.add(OTHER_ERROR, sample.get("source", ""), str(e))
        return good


def _unanswerable(processor: Any, sample: Sample, max_new_tokens: int) -> SkipSample | None:
    """Why one sample cannot be answered: its pixels do not decode (image_error), or its prompt
    leaves fewer than `max_new_tokens` of the model's positions (too_long); else None."""
    try:
        batch = processor([split_prompt(sample["messages"])[0]], [sample["images"]],
                          padding_side="left", add_generation_prompt=True)
    except ValueError as e:
        return SkipSample(IMAGE_ERROR, str(e))
    prompt, limit = batch["input_ids"].shape[1], processor.config.lm_max_position_embeddings
    if prompt + max_new_tokens > limit:
        return SkipSample(TOO_LONG, f"the prompt ({prompt} tokens) + max_new_tokens "
                                    f"({max_new_tokens}) exceed the model's {limit} positions")
    return None


def _answers(model: nn.Module, processor: Any, chunk: list[Sample], max_new_tokens: int,
             read: GenerationStats) -> list[str]:
    prompts = [split_prompt(s["messages"])[0] for s in chunk]
    out = greedy_outputs(model, processor, prompts, [s["images"] for s in chunk], max_new_tokens)
    read.prompt_tokens += out.stats.prompt_tokens
    read.image_tokens += out.stats.image_tokens
    return out.texts


def _record(task: Task, sample: Sample, prediction: str) -> dict[str, Any]:
    record = {"source": sample.get("source", ""), "prompt": sample["messages"][-2]["content"],
              "prediction": prediction, "reference": sample["reference"],
              "score": score(task, prediction, sample), "category": sample.get("category")}
    if task.group is not None:
        record["group"] = sample.get("group")
    return record


def _report(task: Task, predictions: list[dict[str, Any]], skips: SkipCounter,
            seconds: float, read: GenerationStats) -> EvalReport:
    """The task's aggregate of the scores (lmms-eval's), with the plain mean beside it."""
    scores = [p["score"] for p in predictions]
    groups = [p.get("group") for p in predictions]
    return EvalReport(task.name, task.metric, aggregate(task.aggregation, scores, groups),
                      len(predictions),
                      by_category(((p["category"], p["score"]) for p in predictions),
                                  task.aggregation, groups),
                      skipped=skips.as_dict(), seconds=seconds, aggregation=task.aggregation,
                      mean=mean(scores) if scores else 0.0, prompt_tokens=read.prompt_tokens,
                      image_tokens=read.image_tokens)
