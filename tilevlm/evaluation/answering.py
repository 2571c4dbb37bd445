"""Batched greedy answers, the one way every evaluation asks a model: prompts that end with a user
turn, one left-padded batch, the KV-cached `generate` (prefill once, one token per step), each row
stopping at its own EOS."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
from torch import nn

from tilevlm.inference.generation import GenerationOutput, generate

T = TypeVar("T")
# (model, processor, conversations, images per conversation, max_new_tokens) -> answers
AnswerFn = Callable[[nn.Module, Any, list[list[dict[str, str]]], list[list[Any]], int], list[str]]


def split_prompt(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """(the messages before the final assistant answer, that answer)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("an evaluation sample must end with an assistant message (the reference)")
    return messages[:-1], messages[-1]["content"]


@torch.no_grad()
def greedy_outputs(model: nn.Module, processor: Any, conversations: list[list[dict[str, str]]],
                   images: list[list[Any]], max_new_tokens: int) -> GenerationOutput:
    """`generate`'s output (answers and stats: prompt and image tokens) for prompts that end
    with a user turn."""
    batch = processor(conversations, images, padding_side="left", add_generation_prompt=True)
    return generate(model, batch, max_new_tokens, tokenizer=processor.tokenizer)


def greedy_answers(model: nn.Module, processor: Any, conversations: list[list[dict[str, str]]],
                   images: list[list[Any]], max_new_tokens: int) -> list[str]:
    """Greedy answers for prompts that end with a user turn (an AnswerFn)."""
    return greedy_outputs(model, processor, conversations, images, max_new_tokens).texts


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last one shorter)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
