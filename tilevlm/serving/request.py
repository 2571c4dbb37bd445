"""A request inside the serving engine: what was asked (a prompt already encoded by the
Processor, its tiles, the sampling), and where it stands. A small state object, not a thread:
the engine steps every running request together; the HTTP layer only reads the events it is
sent and sets `cancelled` when its client goes away."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from tilevlm.inference.sampling import SamplingParams

# Why a request ended, as OpenAI's `finish_reason` says it ("cancelled" and "error" are ours:
# no client reads them, or they come with an error instead).
FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "length": "length"}


@dataclass(frozen=True)
class Event:
    """What the engine sends a request: new text, and at the end its finish reason and counts."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    completion_tokens: int = 0  # tokens generated so far (an EOS included)
    error: str | None = None  # set with finish_reason "error": why the engine dropped it


@dataclass
class Request:
    """One chat completion in the engine."""

    id: str
    input_ids: torch.Tensor  # [1, T] prompt ids, no padding
    pixel_values: torch.Tensor | None  # [N_tiles, 3, S, S] or None
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Called on the engine's thread with every Event; must not block (the HTTP layer hands it
    # to its event loop).
    on_event: Callable[[Event], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_tokens(self) -> int:
        return self.input_ids.shape[1]

    def cancel(self) -> None:
        """The client is gone: the engine frees the row before its next step."""
        self.cancelled.set()
