"""Continuous batching's promise: a request's answer does not depend on the batch around it.
Requests that join the running batch at different steps, wait for a row, and leave it at
different times get exactly the greedy answer `generate()` gives each prompt alone; rows keep
their own positions in the KV cache (the model's per-row cache_position)."""

from __future__ import annotations

import threading

import pytest
import torch

from tilevlm import preset
from tilevlm.inference.generation import generate
from tilevlm.inference.rows import DecodeRows
from tilevlm.inference.sampling import SamplingParams
from tilevlm.model.language import KVCache
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.preprocessing.processor import Processor
from tilevlm.serving.engine import Engine, QueueFull
from tilevlm.serving.request import Request
from tilevlm.serving.torch_thread import TorchThread

from helpers import make_photo

NEW_TOKENS = 12
# (question, image size or None): different grids, tiles and prompt lengths.
PROMPTS = [("What is in the picture?", (96, 64)), ("Describe the image.", (32, 32)),
           ("How many circles are in the picture? Answer briefly.", None),
           ("Is the yellow star left of the purple circle?", (64, 96)),
           ("What color is the tile in row 2, column 3?", (96, 96))]


@pytest.fixture(scope="module")
def setup(tiny_tokenizer):
    torch.manual_seed(0)
    cfg = preset("tiny", lm_base_vocab_size=tiny_tokenizer.base_vocab_size)
    model = VisionLanguageModel(cfg).eval()
    with torch.no_grad():  # larger weights: greedy tokens vary from step to step
        for p in model.decoder.parameters():
            p.mul_(4.0)
    processor = Processor(cfg, tiny_tokenizer)
    batches = []
    for k, (question, size) in enumerate(PROMPTS):
        images = [[make_photo(*size, seed=k)]] if size else [[]]
        batches.append(processor([[{"role": "user", "content": question}]], images,
                                 padding_side="left", add_generation_prompt=True))
    alone = [generate(model, b, max_new_tokens=NEW_TOKENS, tokenizer=tiny_tokenizer)
             for b in batches]
    return model, tiny_tokenizer, batches, alone


def test_per_row_cache_positions_write_and_mask_each_row_on_its_own():
    """A [B, T] cache_position writes each row at its own slots, the same as writing the rows
    one by one; a window writes through to the cache it views."""
    gen = torch.Generator().manual_seed(0)
    cache = KVCache(3, 2, 8, 4, torch.float32, "cpu")
    k, v = (torch.randn(3, 2, 1, 4, generator=gen) for _ in range(2))
    slots = torch.tensor([[5], [0], [2]])
    cache.update(slots, k, v)
    for row, slot in enumerate([5, 0, 2]):
        assert torch.equal(cache.k[row, :, slot], k[row, :, 0])
        assert torch.equal(cache.v[row, :, slot], v[row, :, 0])
    window = cache.window(1, 2, 4)
    window.update(torch.tensor([3]), k[:2], v[:2])
    assert torch.equal(cache.k[1:3, :, 3], k[:2, :, 0])
    from tilevlm.model.language import attention_mask_4d

    mask = attention_mask_4d(None, slots, 8)  # (3, 1, 1, 8)
    assert mask.shape == (3, 1, 1, 8)
    assert mask[:, 0, 0].sum(-1).tolist() == [6, 1, 3]


def test_rows_joining_at_different_steps_give_generates_tokens(setup):
    model, _, batches, alone = setup
    rows = DecodeRows(model, max_rows=3, max_len=256)
    joins = {0: [0], 2: [1], 3: [2], 7: [3, 4]}  # step -> prompts that join before it
    tokens: dict[int, list[int]] = {}
    in_row: list[int] = []  # prompt of each row
    with torch.inference_mode():
        for step in range(60):
            for k in joins.get(step, []):
                if rows.free():
                    _, logits = rows.add(batches[k]["input_ids"], batches[k]["pixel_values"])
                    in_row.append(k)
                    tokens[k] = [int(logits.argmax())]
                else:  # no row free: it waits and joins at a later step
                    joins.setdefault(step + 1, []).append(k)
            for row in reversed(range(rows.count)):  # leave after NEW_TOKENS
                if len(tokens[in_row[row]]) == NEW_TOKENS:
                    moved = rows.remove(row)
                    in_row[row] = in_row[-1]
                    in_row.pop()
                    assert (moved is None) == (row == len(in_row))
            if rows.count:
                logits = rows.step(torch.tensor([tokens[k][-1] for k in in_row]))
                for k, token in zip(in_row, logits.argmax(-1).tolist()):
                    tokens[k].append(token)
    assert sorted(tokens) == [0, 1, 2, 3, 4]
    for k, out in enumerate(alone):
        # generate stops a row at EOS (not kept); the rows here run on past it
        n = len(out.tokens[0])
        assert tokens[k][:n] == out.tokens[0], k


def _collect(request_log: dict[str, list], name: str):
    def on_event(event) -> None:
        request_log[name].append(event)
    return on_event


def test_engine_answers_equal_generate_when_requests_join_at_different_steps(setup):
    model, tokenizer, batches, alone = setup
    engine = Engine(model, tokenizer, max_batch=2, max_queue=8)
    events: dict[str, list] = {str(k): [] for k in range(len(batches))}
    joins = {0: [0], 1: [1], 4: [2, 3], 6: [4]}
    for step in range(200):
        for k in joins.get(step, []):
            engine.reserve()
            engine.submit(Request(str(k), batches[k]["input_ids"], batches[k]["pixel_values"],
                                  max_tokens=NEW_TOKENS, on_event=_collect(events, str(k))))
        engine.step()
        if step > 6 and engine.idle():
            break
    assert engine.idle()
    for k, out in enumerate(alone):
        got = events[str(k)]
        assert [e.finish_reason for e in got[:-1]] == [None] * (len(got) - 1)
        assert "".join(e.text for e in got) == out.texts[0], k
        expected = {"eos": "stop", "length": "length"}[out.finish_reasons[0]]
        assert got[-1].finish_reason == expected
        assert got[-1].completion_tokens == len(out.tokens[0]) + (expected == "stop")
    counts = engine.snapshot()
    assert (counts.completed, counts.running, counts.waiting) == (len(batches), 0, 0)


def test_engine_bounds_cancellation_and_sampling(setup):
    model, tokenizer, batches, alone = setup
    engine = Engine(model, tokenizer, max_batch=1, max_queue=1)
    events: dict[str, list] = {"a": [], "b": [], "c": []}
    for name in ("a", "b"):
        engine.reserve()
    with pytest.raises(QueueFull):
        engine.reserve()  # one running + one waiting: the third is refused at once
    a = Request("a", batches[0]["input_ids"], batches[0]["pixel_values"], max_tokens=200,
                on_event=_collect(events, "a"))
    b = Request("b", batches[1]["input_ids"], batches[1]["pixel_values"], max_tokens=5,
                sampling=SamplingParams(temperature=1.0, top_p=0.9), seed=3,
                on_event=_collect(events, "b"))
    engine.submit(a)
    engine.submit(b)
    engine.step()
    engine.step()
    a.cancel()  # the client went away: its row is free at the next step, b joins
    engine.step()
    assert events["a"][-1].finish_reason == "cancelled"
    assert events["a"][-1].completion_tokens == 3
    while not engine.idle():
        engine.step()
    assert events["b"][-1].finish_reason in ("stop", "length")
    # the same seed samples the same answer again
    again: dict[str, list] = {"c": []}
    engine.reserve()
    engine.submit(Request("c", b.input_ids, b.pixel_values, max_tokens=5, sampling=b.sampling,
                          seed=3, on_event=_collect(again, "c")))
    while not engine.idle():
        engine.step()
    assert [e.text for e in again["c"]] == [e.text for e in events["b"]]
    counts = engine.snapshot()
    assert (counts.cancelled, counts.completed, counts.refused) == (1, 2, 1)


def test_the_per_row_decode_step_has_no_graph_breaks(setup):
    """The engine's decode step (per-row cache positions over a window of the cache) stays
    compile-friendly: `torch._dynamo.explain` finds no graph break."""
    from tilevlm.inference.generation import decode_step

    model, _, batches, _ = setup
    rows = DecodeRows(model, max_rows=2, max_len=128)
    with torch.inference_mode():
        for k in (0, 2):
            rows.add(batches[k]["input_ids"], batches[k]["pixel_values"])
        positions = torch.tensor(rows.lengths)
        rows._attach(0, 2, 128)
        try:
            explanation = torch._dynamo.explain(decode_step)(
                model, torch.tensor([3, 4]), positions, positions.unsqueeze(1), None)
        finally:
            model.decoder.clear_cache()
    assert explanation.graph_break_count == 0


def test_a_burst_joins_over_several_steps_within_the_prefill_budget(setup):
    """Prompt tokens prefilled between two decode steps are bounded (at least one request a
    step), so a burst of arrivals does not stall the running rows for all its prefills."""
    model, tokenizer, batches, alone = setup
    sizes = [b["input_ids"].shape[1] for b in batches[:3]]  # 58, 26, 29 tokens
    engine = Engine(model, tokenizer, max_batch=4, max_queue=4,
                    max_prefill_tokens=sizes[1] + sizes[2])
    events: dict[str, list] = {str(k): [] for k in range(3)}
    for k in range(3):
        engine.reserve()
        engine.submit(Request(str(k), batches[k]["input_ids"], batches[k]["pixel_values"],
                              max_tokens=NEW_TOKENS, on_event=_collect(events, str(k))))
    engine.step()  # the first request alone: it is over the budget with any other
    assert (engine.snapshot().running, engine.snapshot().waiting) == (1, 2)
    engine.step()  # the other two fit the budget together
    assert (engine.snapshot().running, engine.snapshot().waiting) == (3, 0)
    while not engine.idle():
        engine.step()
    for k in range(3):
        assert "".join(e.text for e in events[str(k)]) == alone[k].texts[0]


def test_started_engine_does_its_torch_work_on_the_torch_thread_only(setup):
    """`serve`'s wiring: the engine's loop runs each step (prefill, decode, sampling) on the
    server's one torch thread, never on its own loop thread, and answers as `generate` does."""
    model, tokenizer, batches, alone = setup
    engine = Engine(model, tokenizer, max_batch=2, max_queue=4, torch_thread=TorchThread())
    threads: set[str] = set()
    step = engine.rows.step

    def recording_step(tokens):
        threads.add(threading.current_thread().name)
        return step(tokens)

    engine.rows.step = recording_step
    done = threading.Event()
    events: list = []

    def on_event(event) -> None:
        events.append(event)
        if event.finish_reason:
            done.set()

    engine.start()
    try:
        engine.reserve()
        engine.submit(Request("0", batches[0]["input_ids"], batches[0]["pixel_values"],
                              max_tokens=NEW_TOKENS, on_event=on_event))
        assert done.wait(60)
    finally:
        engine.stop()
    assert threads == {"tilevlm-torch"}
    assert "".join(e.text for e in events) == alone[0].texts[0]
