"""Evaluation: exact-match accuracy of greedy answers (overall and per question type) and the mean
teacher-forced loss.

A sample is a raw sample (see `tilevlm.data.collate`): its last message is the reference answer
and everything before it is the prompt. `greedy_answers` decodes with the KV-cached
`tilevlm.inference.generation.generate` (prefill once, then one token per step).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from tilevlm.evaluation.metrics import normalize_answer
from tilevlm.data.batch import TrainBatch
from tilevlm.data.collate import Sample, sample_images, sample_messages
from tilevlm.inference.generation import generate

log = logging.getLogger(__name__)

AnswerFn = Callable[[nn.Module, Any, list[list[dict[str, str]]], list[list[Any]], int], list[str]]


@dataclass
class EvalReport:
    n: int
    accuracy: float  # exact match over all samples
    loss: float  # mean cross-entropy per answer token
    per_qtype: dict[str, dict[str, float]] = field(default_factory=dict)  # qtype: {n, accuracy}
    examples: list[dict[str, str]] = field(default_factory=list)  # the first few predictions

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_prompt(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """(the messages before the final assistant answer, that answer)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("an evaluation sample must end with an assistant message (the reference)")
    return messages[:-1], messages[-1]["content"]


@torch.no_grad()
def greedy_answers(model: nn.Module, processor: Any, conversations: list[list[dict[str, str]]],
                   images: list[list[Any]], max_new_tokens: int) -> list[str]:
    """Greedy answers for prompts that end with a user turn: one left-padded batch, KV-cached
    decoding; each row stops at its own EOS."""
    batch = processor(conversations, images, padding_side="left", add_generation_prompt=True)
    return generate(model, batch, max_new_tokens, tokenizer=processor.tokenizer).texts


@dataclass
class _Scored:
    prompt: str  # the last prompt message
    reference: str
    prediction: str
    qtype: str | None

    @property
    def hit(self) -> bool:
        return normalize_answer(self.prediction) == normalize_answer(self.reference)


@torch.no_grad()
def evaluate(model: nn.Module, processor: Any, samples: Iterable[Sample], batch_size: int = 8,
             max_new_tokens: int = 16, answer_fn: AnswerFn = greedy_answers,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             n_examples: int = 5) -> EvalReport:
    """Exact match of `answer_fn`'s answers against each sample's final assistant message, and
    the token-weighted mean loss of the full conversations. The model's train/eval mode is
    restored afterwards."""
    was_training = model.training
    model.eval()
    scored, loss_sum, tokens = [], 0.0, 0
    try:
        with autocast():
            for chunk in chunks(samples, batch_size):
                scored += _answer(model, processor, chunk, max_new_tokens, answer_fn)
                chunk_loss, n = _loss(model, processor, chunk)
                loss_sum, tokens = loss_sum + chunk_loss * n, tokens + n
    finally:
        model.train(was_training)
    return _report(scored, loss_sum / max(tokens, 1), n_examples)


def chunks(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    """Consecutive lists of `size` samples (the last one shorter)."""
    it = iter(samples)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _answer(model: nn.Module, processor: Any, chunk: list[Sample], max_new_tokens: int,
            answer_fn: AnswerFn) -> list[_Scored]:
    prompts, refs = zip(*(split_prompt(sample_messages(s)) for s in chunk))
    preds = answer_fn(model, processor, list(prompts), [sample_images(s) for s in chunk],
                      max_new_tokens)
    return [_Scored(prompt[-1]["content"], ref, pred, s.get("qtype"))
            for s, prompt, ref, pred in zip(chunk, prompts, refs, preds)]


def _loss(model: nn.Module, processor: Any, chunk: list[Sample]) -> tuple[float, int]:
    """Mean loss over the chunk's answer tokens, and how many there are."""
    batch = TrainBatch.of(processor([sample_messages(s) for s in chunk],
                                    [sample_images(s) for s in chunk]))
    device = next(model.parameters()).device
    return float(model(**batch.inputs_on(device)).loss), batch.label_count()


def _report(scored: list[_Scored], loss: float, n_examples: int) -> EvalReport:
    by_type: dict[str, list[bool]] = defaultdict(list)
    for s in scored:
        if s.qtype is not None:
            by_type[s.qtype].append(s.hit)
    per_qtype = {q: {"n": len(h), "accuracy": sum(h) / len(h)} for q, h in sorted(by_type.items())}
    examples = [{"prompt": s.prompt, "reference": s.reference, "prediction": s.prediction}
                for s in scored[:n_examples]]
    accuracy = sum(s.hit for s in scored) / max(len(scored), 1)
    return EvalReport(len(scored), accuracy, loss, per_qtype, examples)


def write_report(report: Any, path: str | Path) -> Path:
    """`report.to_dict()` as JSON in `path` (an EvalReport or a benchmark TaskReport)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return path
