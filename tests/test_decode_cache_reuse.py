"""The KV cache kept between `generate` calls (gpt-fast style): a compiled decode step compiles
once per (batch, length bucket) and sees the same buffers on every call, which is what lets
"reduce-overhead" replay one CUDA graph instead of recording a new one per call; the tokens are
those of a fresh cache of exactly prompt + max_new_tokens (the old path, keep_cache=False).

On CPU, under torch.compile with the aot_eager backend (inductor would only add compile time):
dynamo's frame count is the compilation count, and the buffers' data pointers are what CUDA
graph trees check before replaying a graph.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from tilevlm import preset
from tilevlm.inference.generation import (MIN_CACHE_LEN, cache_length, compiled_decode_step,
                                          generate, generate_ids, kept_caches)
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.bench.workload import synthetic_batch

STEPS = 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = VisionLanguageModel(preset("tiny")).eval()
    with torch.no_grad():  # larger weights: greedy tokens vary from step to step
        for p in model.decoder.parameters():
            p.mul_(4.0)
    return model


def _batch(model, batch_size, prompt_tokens, seed):
    return synthetic_batch(model, batch_size, prompt_tokens=prompt_tokens, answer_tokens=0,
                           device="cpu", seed=seed)


def _tokens(model, batch, **kwargs):
    return generate(model, batch, max_new_tokens=STEPS, eos_token_ids=[], **kwargs).tokens


def _recording(step, seen):
    """`step`, appending (k pointer, v pointer, length) of the first block's attached KV cache
    to `seen` before each decode step (outside the compiled code)."""
    def run(model, *args):
        cache = model.decoder.blocks[0].attn.kv_cache
        seen.append((cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape[2]))
        return step(model, *args)

    return run


def test_second_call_compiles_nothing_and_reuses_the_buffers(model):
    short, longer = _batch(model, 2, 6, seed=1), _batch(model, 2, 9, seed=3)
    t_short, t_longer = short["input_ids"].shape[1], longer["input_ids"].shape[1]
    bucket = cache_length(t_short + STEPS, 10**6)
    assert t_short != t_longer and cache_length(t_longer + STEPS, 10**6) == bucket
    reference = {t: _tokens(model, b, keep_cache=False) for t, b in
                 ((t_short, short), (t_longer, longer))}
    kept_caches(model).clear()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    seen = []
    step = _recording(compiled_decode_step(backend=counter), seen)
    assert _tokens(model, short, step_fn=step) == reference[t_short]
    assert counter.frame_count == 1
    assert _tokens(model, short, step_fn=step) == reference[t_short]  # the same shapes
    assert _tokens(model, longer, step_fn=step) == reference[t_longer]  # the same bucket
    assert counter.frame_count == 1  # no new compilation on either call
    assert len(seen) == 3 * (STEPS - 1) and set(seen) == {seen[0]}  # one set of buffers
    assert seen[0][2] == bucket
    # The old path, for contrast: a fresh cache of the exact length per call, so the longer
    # prompt is a new shape and compiles again.
    seen.clear()
    assert _tokens(model, short, step_fn=step, keep_cache=False) == reference[t_short]
    assert _tokens(model, longer, step_fn=step, keep_cache=False) == reference[t_longer]
    assert counter.frame_count == 3
    assert {length for _, _, length in seen} == {t_short + STEPS, t_longer + STEPS}


def test_kept_cache_is_reset_per_call_and_kept_per_batch_size(model):
    one, two = _batch(model, 1, 5, seed=4), _batch(model, 2, 5, seed=5)
    ref_one, ref_two = _tokens(model, one, keep_cache=False), _tokens(model, two, keep_cache=False)
    kept = kept_caches(model)
    kept.clear()
    assert _tokens(model, two) == ref_two
    assert _tokens(model, one) == ref_one
    assert len(kept) == 2  # batch 1 and batch 2, both kept
    with torch.inference_mode():  # the buffers are inference tensors, as generate makes them
        for caches in kept._entries.values():  # leftovers a fresh cache never has: NaN
            for cache in caches:
                cache.k.fill_(float("nan"))
                cache.v.fill_(float("nan"))
    assert _tokens(model, two) == ref_two  # zeroed on reuse (0 x NaN would poison attention)
    assert _tokens(model, one) == ref_one
    assert len(kept) == 2
    assert all(block.attn.kv_cache is None for block in model.decoder.blocks)  # detached
    assert not list(model.buffers())  # never part of the module tree between calls
    kept.clear()
    assert len(kept) == 0


def test_two_interleaved_generations_on_one_model_keep_their_own_caches(model):
    a, b = _batch(model, 1, 5, seed=6), _batch(model, 1, 7, seed=7)
    ref_a, ref_b = _tokens(model, a, keep_cache=False), _tokens(model, b, keep_cache=False)
    gen_a = generate_ids(model, a, STEPS, eos_token_ids=[])
    gen_b = generate_ids(model, b, STEPS, eos_token_ids=[])
    out_a, out_b = [], []
    for (tok_a, _), (tok_b, _) in zip(gen_a, gen_b):  # one step of each in turn
        out_a.append(tok_a.item())
        out_b.append(tok_b.item())
    assert [out_a] == ref_a and [out_b] == ref_b


def test_cache_length_buckets():
    assert cache_length(1, 8192) == MIN_CACHE_LEN
    assert cache_length(MIN_CACHE_LEN + 1, 8192) == 2 * MIN_CACHE_LEN
    assert cache_length(300, 8192) == 512 and cache_length(512, 8192) == 512
    assert cache_length(300, 400) == 400  # never past the model's positions


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_is_recorded_once_and_replayed_by_later_calls(model):
    """Under "reduce-overhead", the kept buffers mean the later calls of a bucket replay the
    graph the first call recorded (a CUDA graph bakes in its static inputs' addresses)."""
    import copy

    from torch._dynamo.callback import CallbackTrigger, callback_handler

    gpu = copy.deepcopy(model).cuda()
    short = {k: v.cuda() for k, v in _batch(model, 2, 6, seed=1).items()}
    longer = {k: v.cuda() for k, v in _batch(model, 2, 9, seed=3).items()}
    reference = [_tokens(gpu, b, keep_cache=False) for b in (short, longer)]
    recordings = []

    def on_start(args):
        if args.callback_trigger == CallbackTrigger.CUDAGRAPH_RECORDING:
            recordings.append(args.compile_id)

    torch._dynamo.reset()
    step = compiled_decode_step("reduce-overhead")
    callback_handler.register_start_callback(on_start)
    try:
        assert _tokens(gpu, short, step_fn=step) == reference[0]
        first = len(recordings)
        assert first >= 1  # the first call warmed up and recorded
        assert _tokens(gpu, short, step_fn=step) == reference[0]
        assert _tokens(gpu, longer, step_fn=step) == reference[1]  # the same bucket
        assert len(recordings) == first  # replayed, never recorded again
    finally:
        callback_handler.remove_start_callback(on_start)
