"""Exact match of greedy answers and the teacher-forced loss over conversation samples: the
synthetic quiz of `tilevlm eval`, the demo's test split and the training loop's validation.

A sample is a raw sample (`tilevlm.data.sample`): its last message is the reference answer and
everything before it is the prompt; a `qtype` field, when present, is its category.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from tilevlm.data.batch import TrainBatch
from tilevlm.data.sample import Sample, sample_images, sample_messages
from tilevlm.evaluation.answering import AnswerFn, chunks, greedy_answers, split_prompt
from tilevlm.evaluation.metrics import exact_match
from tilevlm.evaluation.report import EvalReport, by_category


@dataclass
class _Scored:
    prompt: str  # the last prompt message
    reference: str
    prediction: str
    qtype: str | None

    @property
    def hit(self) -> float:
        return exact_match(self.prediction, self.reference)


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
    examples = [{"prompt": s.prompt, "reference": s.reference, "prediction": s.prediction}
                for s in scored[:n_examples]]
    score = sum(s.hit for s in scored) / max(len(scored), 1)
    return EvalReport("exact_match", "exact_match", score, len(scored),
                      by_category((s.qtype, s.hit) for s in scored), loss, examples=examples,
                      mean=score)
