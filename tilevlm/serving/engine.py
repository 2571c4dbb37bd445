"""The engine: one loop owns the model and steps every running request together (continuous
batching).

Each `step()`: rows whose client went away are freed; waiting requests join while rows are free
(their prefill, vision tiles included, runs here, between two decode steps, and gives their
first token; up to `max_prefill_tokens` prompt tokens a step, at least one request, so a burst
of arrivals does not stall the running answers for all its prefills at once); then one decode
step runs on every row (`tilevlm.inference.rows.DecodeRows`,
each row at its own position) and each row's token is sampled with its own settings. A request
leaves the batch as soon as it finishes (end of turn, a stop text, its max_tokens), so one long
answer never holds the others back. End of turn, stop texts and what text is safe to stream are
`generate`'s own (`RowState`), so an answer is the one `generate` gives.

Bounds: `max_batch` rows decode at once and at most `max_queue` more wait; beyond that
`reserve` refuses at once (`QueueFull`), before any work is done for the request.
`start()` runs `step()` in a loop on a thread of its own, each step on the server's
`TorchThread` when one is given (so that one thread does all torch work); tests call `step()`
directly.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from tilevlm.inference.generation import RowState
from tilevlm.inference.rows import DecodeRows
from tilevlm.inference.sampling import StopStrings, sample_next_token
from tilevlm.serving.request import FINISH_REASONS, Event, Request
from tilevlm.serving.torch_thread import TorchThread

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every row is busy and `max_queue` requests already wait."""


@dataclass
class EngineCounts:
    """What /health reports: the engine's load and what it has done."""

    running: int = 0
    waiting: int = 0
    completed: int = 0
    cancelled: int = 0
    refused: int = 0
    failed: int = 0


class _Running:
    """A request in a row: its text state, next token and sampling generator."""

    def __init__(self, request: Request, state: RowState, device: torch.device) -> None:
        self.request = request
        self.state = state
        self.generated = 0
        self.next_token = 0
        seed = request.seed
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)


class Engine:
    """Continuous batching over one model (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, max_batch: int = 8, max_queue: int = 32,
                 max_len: int | None = None, step_fn: Any = None,
                 max_prefill_tokens: int = 512, torch_thread: TorchThread | None = None) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        # Prompt tokens prefilled between two decode steps (at least one request): the running
        # rows wait for those prefills, so a burst of arrivals joins over several steps instead
        # of stalling every running answer for all of their prefills at once.
        self.max_prefill_tokens = max_prefill_tokens
        limit = model.cfg.lm_max_position_embeddings
        self.rows = DecodeRows(model, max_batch, max_len or limit, step_fn)
        self.tokenizer = tokenizer
        self.torch_thread = torch_thread
        self.eos_ids = [tokenizer.eos_token_id]
        self.max_batch, self.max_queue = max_batch, max_queue
        self.counts = EngineCounts()
        self._running: list[_Running] = []  # by row
        self._waiting: deque[Request] = deque()
        self._reserved = 0  # accepted requests not yet submitted (being preprocessed)
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def max_len(self) -> int:
        """The most positions one request may take (prompt + max_tokens)."""
        return self.rows.max_len

    # ------------------------------------------------------------------ the HTTP layer's side
    def reserve(self) -> None:
        """Take a place for a request about to be prepared; `QueueFull` when there is none.
        Every reservation ends in exactly one `submit` or `release`."""
        with self._lock:
            if self._in_flight() >= self.max_batch + self.max_queue:
                self.counts.refused += 1
                raise QueueFull(f"{self.max_batch} requests are running and {self.max_queue} "
                                "are waiting")
            self._reserved += 1

    def release(self) -> None:
        """Give back a reservation that will not be submitted (its request was refused)."""
        with self._lock:
            self._reserved -= 1

    def submit(self, request: Request) -> None:
        """Queue a reserved request; it joins the batch at the next step with a free row."""
        with self._lock:
            self._reserved -= 1
            self._waiting.append(request)
            self.counts.waiting = len(self._waiting)
            self._lock.notify()

    def snapshot(self) -> EngineCounts:
        with self._lock:
            return EngineCounts(**vars(self.counts))

    # ------------------------------------------------------------------ the loop
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tilevlm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop; requests still running or waiting get an error event."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for request in [r.request for r in self._running] + list(self._waiting):
            request.on_event(Event(finish_reason="error", error="the server is shutting down"))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._running:
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                if self.torch_thread is None:
                    self.step()
                else:
                    self.torch_thread.run(self.step)
            except Exception:  # never leave the loop: fail what was running, keep serving
                log.exception("engine step failed; its requests get an error")
                self._fail_running("the model failed on this request's batch")

    @torch.inference_mode()
    def step(self) -> None:
        """Free cancelled rows, let waiting requests join, and run one decode step."""
        self._drop_cancelled()
        self._admit()
        if not self._running:
            return
        tokens = torch.tensor([r.next_token for r in self._running], device=self.rows.device)
        logits = self.rows.step(tokens)  # (n, V)
        self._take(self._sample(logits))

    def idle(self) -> bool:
        with self._lock:
            return not self._running and not self._waiting

    def _in_flight(self) -> int:
        return self._reserved + len(self._waiting) + len(self._running)

    def _drop_cancelled(self) -> None:
        for row in reversed(range(len(self._running))):
            if self._running[row].request.cancelled.is_set():
                log.debug("request %s cancelled in row %d", self._running[row].request.id, row)
                self._finish(row, "cancelled")

    def _admit(self) -> None:
        prefilled = 0
        while self.rows.free():
            with self._lock:
                if not self._waiting:
                    return
                size = self._waiting[0].prompt_tokens
                if prefilled and prefilled + size > self.max_prefill_tokens:
                    return  # the rest join after the next decode step
                request = self._waiting.popleft()
                self.counts.waiting = len(self._waiting)
            if request.cancelled.is_set():
                self._end(request, Event(finish_reason="cancelled"), "cancelled")
                continue
            prefilled += size
            try:
                _, logits = self.rows.add(request.input_ids, request.pixel_values)
            except Exception as e:  # its own failure (its tiles, memory): it alone gets an
                log.warning("request %s failed at prefill: %s", request.id, e)  # error
                self._end(request, Event(finish_reason="error", error=str(e)), "failed")
                continue
            running = _Running(request, RowState(self.eos_ids, StopStrings(list(request.stop)),
                                                 self.tokenizer), self.rows.device)
            with self._lock:
                self._running.append(running)
                self.counts.running = len(self._running)
            self._take(self._sample(logits[None], rows=[running]), rows=[running])

    def _sample(self, logits: torch.Tensor, rows: list[_Running] | None = None) -> list[int]:
        """One token per row, each with its request's sampling (greedy rows in one argmax)."""
        rows = self._running if rows is None else rows
        tokens = logits.argmax(dim=-1).tolist()  # (n,)
        for i, running in enumerate(rows):
            params = running.request.sampling
            if not params.greedy:
                tokens[i] = int(sample_next_token(logits[i:i + 1], params, None,
                                                  running.generator)[0])
        return tokens

    def _take(self, tokens: list[int], rows: list[_Running] | None = None) -> None:
        """Give each row its token; stream the safe text; finished rows leave the batch."""
        rows = list(self._running if rows is None else rows)
        for running, token in zip(rows, tokens):
            running.next_token = token
            running.generated += 1
            state = running.state
            state.add(token)
            if not state.finish and running.generated >= running.request.max_tokens:
                state.finish = "length"
            if state.finish:
                self._finish(self._running.index(running), FINISH_REASONS[state.finish])
                continue
            piece = state.safe_piece()
            if piece:
                running.request.on_event(Event(text=piece, completion_tokens=running.generated))

    def _finish(self, row: int, reason: str) -> None:
        """Take `row` out of the batch and send its request's last event."""
        running = self._running[row]
        self.rows.remove(row)
        with self._lock:
            last = self._running.pop()
            if last is not running:  # the last row moved into `row` (DecodeRows.remove)
                self._running[row] = last
            self.counts.running = len(self._running)
        text = "" if reason == "cancelled" else running.state.last_piece()
        event = Event(text=text, finish_reason=reason, completion_tokens=running.generated)
        self._end(running.request, event, "cancelled" if reason == "cancelled" else "completed")

    def _end(self, request: Request, event: Event, outcome: str) -> None:
        with self._lock:
            setattr(self.counts, outcome, getattr(self.counts, outcome) + 1)
        try:
            request.on_event(event)
        except Exception:  # a listener's fault must not stop the engine
            log.exception("request %s: its listener failed", request.id)

    def _fail_running(self, message: str) -> None:
        with self._lock:
            failed, self._running = self._running, []
            self.counts.running = 0
        self.rows.clear()
        for running in failed:
            self._end(running.request, Event(finish_reason="error", error=message), "failed")
