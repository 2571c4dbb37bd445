"""Generation with a static KV cache: one prefill over text + image embeddings, then one token
per step, never recomputing the prefix.

The loop keeps every shape static (the cache holds at least prompt + max_new_tokens slots, the
attention mask is [B, max_len] from the start), so `decode_step` can be captured by
`torch.compile(mode="reduce-overhead")` on CUDA. The only host-device synchronisation per step is
the stop decision ("are all rows finished?"), and with stop strings the text check.
Finished rows keep running inside the batch (static shapes) but stop growing in the output.

The KV cache is kept between calls (gpt-fast style, `KeptCaches`): one per (batch, length
bucket, dtype, device) and model, zeroed instead of reallocated. A compiled decode step therefore
sees the same buffers and the same shapes on every call of a bucket: it compiles (and under
"reduce-overhead" records its CUDA graph) once per bucket, not once per call or prompt length.
`keep_cache=False` is the old way: a cache of exactly prompt + max_new_tokens, freed at the end.
"""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from tilevlm.inference.sampling import SamplingParams, StopStrings, sample_next_token
from tilevlm.model.language import KVCache


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # real (non-pad) prompt tokens over the batch
    image_tokens: int = 0  # of which image tokens: the placeholders (count_image_tokens)
    tiles: int = 0
    new_tokens: int = 0  # generated tokens kept in the outputs, over the batch
    steps: int = 0  # decode steps run
    time_to_first_token: float = 0.0  # seconds: prefill + first sample
    decode_seconds: float = 0.0  # seconds after the first token
    batch_rows: int = 1

    @property
    def text_tokens(self) -> int:
        return self.prompt_tokens - self.image_tokens

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput of the batch: rows x decode steps after the first token, per second."""
        later = (self.steps - 1) * self.batch_rows
        return later / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"prompt {self.prompt_tokens} tokens ({self.text_tokens} text / {self.image_tokens} "
                f"image), {self.tiles} tiles, {self.new_tokens} new tokens, time to first token "
                f"{self.time_to_first_token:.3f} s, {self.tokens_per_second:.1f} tokens/s")


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated ids per row, without EOS and without padding
    texts: list[str] | None  # decoded (and cut at a stop string) when a tokenizer was given
    finish_reasons: list[str]  # "eos" | "stop_string" | "length"
    stats: GenerationStats = field(default_factory=GenerationStats)


def _check_batch(model: Any, batch: dict[str, Any], max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, seq] with seq > 0, got {list(input_ids.shape)}")
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("generation needs LEFT padding (the last prompt token of every row must be "
                         "real): build the batch with padding_side='left'")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = model.cfg.lm_max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's {limit} positions")
    return input_ids, mask


def decode_step(model: Any, tokens: torch.Tensor, positions: torch.Tensor,
                cache_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One cached step: tokens [B] at positions [B] into slot cache_position [1] -> logits [B, V]."""
    embeds = model.decoder.embed(tokens.unsqueeze(1))  # (B, 1, D)
    hidden = model.decoder(embeds, attention_mask=mask, position_ids=positions.unsqueeze(1),
                           cache_position=cache_position)  # (B, 1, D)
    return model.decoder.logits(hidden[:, -1])  # (B, V)


def compiled_decode_step(mode: str | None = "reduce-overhead", fullgraph: bool = True,
                         backend: str = "inductor", freeze_weights: bool = False
                         ) -> Callable[..., torch.Tensor]:
    """`decode_step` under `torch.compile`, for `generate(..., step_fn=...)`.

    fullgraph=True makes a graph break an error instead of a silent slowdown. dynamic=False: the
    shapes of a decode step are fixed for a whole generation (batch, max_len), so each new
    (batch, max_len) compiles once; "reduce-overhead" then replays a CUDA graph per step (on a CPU
    it is plain inductor). The first call of each shape pays the compile time.

    freeze_weights: inductor's freezing, the weights taken as constants of the compiled step. On
    a CPU it lets inductor lay bf16 weights out once for oneDNN's kernels (instead of at every
    call) and fold constant work; the step keeps those copies (memory) and never sees a later
    change of the weights: build a new step after training or reloading the model. (Freezing is
    read when a shape compiles, which happens at a call, so the option is set around each call:
    `torch.compile(options=...)` does not reach it.)
    """
    if backend != "inductor":
        return torch.compile(decode_step, fullgraph=fullgraph, dynamic=False, backend=backend)
    compiled = torch.compile(decode_step, fullgraph=fullgraph, dynamic=False, mode=mode)
    if not freeze_weights:
        return compiled

    def frozen_step(*args: Any) -> torch.Tensor:
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args)

    return frozen_step


# ----------------------------------------------------------------------------- kept KV caches

MIN_CACHE_LEN = 64  # the smallest length bucket (slots)
KEPT_PER_MODEL = 4  # caches kept per model (least recently used dropped): e.g. batch 1 and 8


def cache_length(needed: int, limit: int) -> int:
    """The length bucket of a generation needing `needed` slots: the next power of two (at
    least MIN_CACHE_LEN), never over the model's `limit` positions. Powers of two keep the number
    of compiled shapes (and CUDA graphs) logarithmic in the prompt lengths seen, for at most 2x
    the attention work of the exact length (masked slots)."""
    return min(limit, max(MIN_CACHE_LEN, 1 << (needed - 1).bit_length()))


class KeptCaches:
    """A model's KV caches kept between `generate` calls, by (batch, length, dtype, device).

    Each entry is one `KVCache` per decoder block. `lease` zeroes a kept entry (so a call starts
    from the same state as with a fresh cache) or allocates a new one, and marks it in use: a
    second generation running on the same model at the same time (two interleaved streams) gets
    a fresh cache of its own instead of sharing one. Held outside the module tree, so the kept
    buffers never show up in `model.buffers()`, `state_dict`, DDP or `model.to()`; they are
    attached to the decoder only while a generation runs."""

    def __init__(self, keep: int = KEPT_PER_MODEL) -> None:
        self.keep = keep
        self._entries: OrderedDict[tuple, list[KVCache]] = OrderedDict()
        self._in_use: set[tuple] = set()

    def lease(self, decoder: Any, batch_size: int, max_len: int, dtype: torch.dtype,
              device: torch.device) -> tuple[tuple | None, list[KVCache]]:
        """(key to `release`, or None for a one-off cache; the blocks' caches)."""
        key = (batch_size, max_len, dtype, torch.device(device))
        if key in self._in_use:
            return None, _new_caches(decoder, batch_size, max_len, dtype, device)
        caches = self._entries.pop(key, None)
        if caches is None:
            caches = _new_caches(decoder, batch_size, max_len, dtype, device)
        else:
            for cache in caches:  # reset, do not reallocate: same buffers, same addresses
                cache.k.zero_()
                cache.v.zero_()
        self._entries[key] = caches  # most recently used last
        self._in_use.add(key)
        while len(self._entries) > self.keep:
            oldest = next((k for k in self._entries if k not in self._in_use), None)
            if oldest is None:
                break
            del self._entries[oldest]
        return key, caches

    def release(self, key: tuple | None) -> None:
        self._in_use.discard(key)

    def clear(self) -> None:
        """Free every kept cache not in use."""
        for key in [k for k in self._entries if k not in self._in_use]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


_KEPT: "weakref.WeakKeyDictionary[Any, KeptCaches]" = weakref.WeakKeyDictionary()


def kept_caches(model: Any) -> KeptCaches:
    """The KV caches kept for `model` (created empty on first use; they go with the model).
    `kept_caches(model).clear()` frees them, e.g. before training the model again."""
    caches = _KEPT.get(model)
    if caches is None:
        caches = _KEPT[model] = KeptCaches()
    return caches


def _new_caches(decoder: Any, batch_size: int, max_len: int, dtype: torch.dtype,
                device: torch.device) -> list[KVCache]:
    return [KVCache(batch_size, block.attn.n_kv_heads, max_len, block.attn.head_dim, dtype,
                    device) for block in decoder.blocks]


def _attach(decoder: Any, caches: list[KVCache], max_len: int) -> None:
    """What `LanguageModel.setup_cache` does, with given buffers (`clear_cache` detaches)."""
    for block, cache in zip(decoder.blocks, caches):
        block.attn.kv_cache = cache
    decoder.cache_max_len = max_len


def _prefill(model: Any, input_ids: torch.Tensor, prompt_mask: torch.Tensor, pixel_values: Any,
             full_mask: torch.Tensor) -> torch.Tensor:
    """Run the prompt through the decoder, filling cache slots [0, T) -> last logits [B, V]."""
    t = input_ids.shape[1]
    embeds = model.embed_inputs(input_ids, pixel_values)  # (B, T, D)
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    cache_position = torch.arange(t, device=input_ids.device)
    hidden = model.decoder(embeds, attention_mask=full_mask, position_ids=positions,
                           cache_position=cache_position)  # (B, T, D)
    return model.decoder.logits(hidden[:, -1])  # (B, V)


def _seen_tokens(input_ids: torch.Tensor, mask: torch.Tensor, vocab: int) -> torch.Tensor:
    counts = torch.zeros(input_ids.shape[0], vocab, device=input_ids.device)
    return counts.scatter_add_(1, input_ids, mask.float()) > 0  # (B, V), pads not counted


@torch.inference_mode()
def generate_ids(
    model: Any,
    batch: dict[str, Any],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    eos_token_ids: Sequence[int] = (),
    seed: int | None = None,
    step_fn: Callable[..., torch.Tensor] | None = None,
    keep_cache: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens [B], finished-before-this-step [B]) once per generated position.

    The caller decides when to stop (it may break out early). keep_cache: the KV cache of this
    (batch, length bucket) is `kept_caches(model)`'s, kept for the next call; else one of exactly
    prompt + max_new_tokens slots, freed at the end.
    """
    input_ids, prompt_mask = _check_batch(model, batch, max_new_tokens)
    device = next(model.parameters()).device
    input_ids, prompt_mask = input_ids.to(device), prompt_mask.to(device)
    b, t = input_ids.shape
    max_len = t + max_new_tokens
    if keep_cache:  # slots past t + max_new_tokens are never written and are masked causally
        max_len = cache_length(max_len, model.cfg.lm_max_position_embeddings)
    full_mask = torch.ones(b, max_len, dtype=torch.long, device=device)
    full_mask[:, :t] = prompt_mask
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    eos = torch.tensor(list(eos_token_ids) or [-1], device=device)
    seen = (_seen_tokens(input_ids, prompt_mask, model.cfg.lm_vocab_size)
            if sampling.repetition_penalty != 1.0 else None)
    step_fn = step_fn or decode_step
    ref = model.decoder.token_embedding.weight  # setup_cache's dtype and device
    kept = kept_caches(model) if keep_cache else None
    if kept is not None:
        lease, caches = kept.lease(model.decoder, b, max_len, ref.dtype, ref.device)
    else:
        lease, caches = None, _new_caches(model.decoder, b, max_len, ref.dtype, ref.device)
    first_attn = model.decoder.blocks[0].attn
    try:
        _attach(model.decoder, caches, max_len)
        logits = _prefill(model, input_ids, prompt_mask, batch.get("pixel_values"), full_mask)
        positions = prompt_mask.long().sum(-1)  # (B,) next position of each row
        done = torch.zeros(b, dtype=torch.bool, device=device)
        # Advanced on the device: building it with torch.tensor([t + i]) each step would be a
        # host-to-device copy, which on CUDA waits for the queued work (a sync per step).
        cache_position = torch.full((1,), t - 1, dtype=torch.long, device=device)
        for i in range(max_new_tokens):
            tokens = sample_next_token(logits, sampling, seen, generator)  # (B,)
            yield tokens, done
            done = done | torch.isin(tokens, eos)
            if seen is not None:
                seen.scatter_(1, tokens.unsqueeze(1), True)
            if i + 1 == max_new_tokens:
                break
            cache_position = cache_position + 1  # (1,) slot t + i
            if first_attn.kv_cache is not caches[0]:  # another generation ran since the yield
                _attach(model.decoder, caches, max_len)
            logits = step_fn(model, tokens, positions, cache_position, full_mask)
            positions = positions + 1
    finally:
        model.decoder.clear_cache()  # detaches; a kept cache stays in kept_caches(model)
        if kept is not None:
            kept.release(lease)


def _batch_stats(model: Any, batch: dict[str, Any]) -> GenerationStats:
    """Prompt tokens and, of them, image tokens: the placeholders the tiles' features replace
    (the model's image token id), whatever the layout; its markers count as text."""
    mask = batch.get("attention_mask")
    ids = batch["input_ids"]
    real = int(mask.sum()) if mask is not None else ids.numel()
    placeholders = ids == model.image_token_id  # (B, T)
    if mask is not None:
        placeholders &= mask.bool()
    image = int(placeholders.sum())
    pixels = batch.get("pixel_values")
    tiles = 0 if pixels is None else image // model.cfg.mp_image_token_length
    return GenerationStats(prompt_tokens=real, image_tokens=image, tiles=tiles,
                           batch_rows=ids.shape[0])


class RowState:
    """One batch row's generation: its tokens, why it finished, and its text.

    The one place for end of sequence (the EOS token is not kept), stop strings (found in the
    decoded text, which is cut there) and what of the text is safe to stream. The serving
    engine keeps one per request (tilevlm/serving/engine.py).
    """

    def __init__(self, eos_ids: Sequence[int], stops: StopStrings, tokenizer: Any) -> None:
        self.tokens: list[int] = []
        self.finish: str | None = None  # "eos" | "stop_string" | "length"
        self._eos_ids = eos_ids
        self._stops = stops
        self._tokenizer = tokenizer
        self._text, self._text_tokens = "", 0  # the decoded text, of that many tokens
        self._sent = 0  # chars of the text already streamed

    def add(self, token: int) -> None:
        """Take the next sampled token; a finished row ignores it."""
        if self.finish:
            return
        if token in self._eos_ids:
            self.finish = "eos"
            return
        self.tokens.append(token)
        if self._stops and self._stops.find(self.text()) >= 0:
            self.finish = "stop_string"

    def text(self) -> str:
        """The decoded tokens (decoded once per new token, and only when asked)."""
        if self._text_tokens != len(self.tokens):
            self._text, self._text_tokens = self._tokenizer.decode(self.tokens), len(self.tokens)
        return self._text

    def final_text(self) -> str:
        """The text, cut where a stop string starts."""
        text = self.text()
        cut = self._stops.find(text)
        return text if cut < 0 else text[:cut]

    def safe_piece(self) -> str:
        """The new text that is safe to stream: not what might start a stop string, nor an
        incomplete UTF-8 sequence (decoded as "\ufffd" until its last byte arrives)."""
        text = self.text()
        safe = len(text) - self._stops.holdback(text)
        while safe > self._sent and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._take(text, safe)

    def last_piece(self) -> str:
        """What is left to stream once the row has finished (held back until now)."""
        text = self.final_text()
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        piece = text[self._sent:end]
        self._sent = max(self._sent, end)
        return piece


class _StepTimer:
    """Fills the timing fields of GenerationStats: time to first token, steps, decode seconds."""

    def __init__(self, stats: GenerationStats) -> None:
        self.stats = stats
        self.start = time.perf_counter()

    def step(self, index: int) -> None:
        if index == 0:
            self.stats.time_to_first_token = time.perf_counter() - self.start
        self.stats.steps = index + 1

    def stop(self) -> None:
        elapsed = time.perf_counter() - self.start
        self.stats.decode_seconds = elapsed - self.stats.time_to_first_token


def _run_rows(model: Any, batch: dict[str, Any], rows: list[RowState], stats: GenerationStats,
              max_new_tokens: int, sampling: SamplingParams, eos_ids: list[int], seed: int | None,
              step_fn: Callable[..., torch.Tensor] | None = None,
              keep_cache: bool = True) -> Iterator[None]:
    """Feed each step's tokens to `rows` until all have finished; yields after every step that
    leaves one unfinished. Fills the stats' steps, timing and new tokens; unfinished rows end
    with "length". One host sync per step: the tokens' `tolist()`."""
    timer = _StepTimer(stats)
    steps = generate_ids(model, batch, max_new_tokens, sampling, eos_ids, seed, step_fn,
                         keep_cache)
    with closing(steps):  # releases the KV cache at once, also when we stop early
        for step, (tokens, _) in enumerate(steps):
            timer.step(step)
            for row, token in zip(rows, tokens.tolist()):
                row.add(token)
            if all(r.finish for r in rows):
                break
            yield
    timer.stop()
    for r in rows:
        r.finish = r.finish or "length"
    stats.new_tokens = sum(len(r.tokens) for r in rows)


def generate(
    model: Any,
    batch: dict[str, Any],
    max_new_tokens: int = 64,
    sampling: SamplingParams = SamplingParams(),
    eos_token_ids: Sequence[int] | int | None = None,
    tokenizer: Any = None,
    stop_strings: Sequence[str] | None = None,
    seed: int | None = None,
    step_fn: Callable[..., torch.Tensor] | None = None,
    keep_cache: bool = True,
) -> GenerationOutput:
    """Generate for every row of a left-padded batch; finished rows stop growing.

    EOS defaults to the tokenizer's `eos_token_id`. Stop strings need the tokenizer (text level).
    keep_cache: see `generate_ids` (the default keeps the KV cache for the next call).
    """
    eos_ids = _eos_ids(eos_token_ids, tokenizer)
    stops = StopStrings(stop_strings)
    if stops and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the text")
    rows = [RowState(eos_ids, stops, tokenizer) for _ in range(batch["input_ids"].shape[0])]
    stats = _batch_stats(model, batch)
    for _ in _run_rows(model, batch, rows, stats, max_new_tokens, sampling, eos_ids, seed, step_fn,
                       keep_cache):
        pass
    texts = None if tokenizer is None else [r.final_text() for r in rows]
    return GenerationOutput([r.tokens for r in rows], texts, [r.finish for r in rows], stats)


def _eos_ids(eos_token_ids: Sequence[int] | int | None, tokenizer: Any) -> list[int]:
    if eos_token_ids is None:
        return [] if tokenizer is None else [tokenizer.eos_token_id]
    return [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)


def stream_generate(
    model: Any,
    batch: dict[str, Any],
    tokenizer: Any,
    max_new_tokens: int = 64,
    sampling: SamplingParams = SamplingParams(),
    stop_strings: Sequence[str] | None = None,
    seed: int | None = None,
    stats: GenerationStats | None = None,
    keep_cache: bool = True,
) -> Iterator[str]:
    """Yield text pieces for a batch of one as tokens arrive; their concatenation equals
    `generate(...).texts[0]`. Pieces that might be the start of a stop string, or half of a
    multi-byte character, are held back until they are safe."""
    if batch["input_ids"].shape[0] != 1:
        raise ValueError(f"streaming works on one sequence, got a batch of {batch['input_ids'].shape[0]}")
    eos_ids = _eos_ids(None, tokenizer)
    row = RowState(eos_ids, StopStrings(stop_strings), tokenizer)
    own = stats if stats is not None else GenerationStats()
    own.__dict__.update(_batch_stats(model, batch).__dict__)
    run = _run_rows(model, batch, [row], own, max_new_tokens, sampling, eos_ids, seed,
                    keep_cache=keep_cache)
    with closing(run):  # a consumer that stops early releases the KV cache at once
        for _ in run:
            piece = row.safe_piece()
            if piece:
                yield piece
    piece = row.last_piece()
    if piece:
        yield piece
