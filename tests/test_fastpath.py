"""Fast paths give the eager fp32 answers: compiled decode step, bf16 / int8 / int4 weights,
label loss.

bf16, int8 and int4 weights change the numbers (bf16 keeps 8 bits of mantissa; int8 rows carry
an error of up to max|w| / 254 per weight, int4 groups (max - min) / 30), so exact token
equality is only a fair demand where the
fp32 model is sure of its choice. The tests therefore (1) teacher-force the fp32 greedy sequence
through the low-precision model and bound the logit error, (2) require the same argmax at every
step whose fp32 top-1 margin exceeds twice that bound, and (3) check that the seeded test model
has such margins at every step, so its whole greedy generation must agree token for token.
No timing asserts: speed is `tilevlm bench`'s job.
"""

import copy

import pytest
import torch

from tilevlm import preset
from tilevlm.inference.generation import compiled_decode_step
from tilevlm.inference.int4 import Int4Linear, quantize_int4, unpack_cpu_int4
from tilevlm.inference.quantize import Int8Linear, inference_weights, weight_bytes
from tilevlm.training.compile import compile_blocks
from tilevlm.training.optim import adamw
from tilevlm.bench.workload import synthetic_batch
from tilevlm.inference.generation import generate
from tilevlm.model.vlm import VisionLanguageModel

from helpers import decode_step_graph_breaks

STEPS = 8


def label_loss(model, batch):
    """The training loss with the LM head only at labelled positions."""
    return model(**batch, return_logits=False).loss


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = VisionLanguageModel(preset("tiny")).eval()
    with torch.no_grad():  # larger weights: greedy tokens vary and top-1 margins are wide
        for p in model.decoder.parameters():
            p.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def prompt(tiny_model):
    return synthetic_batch(tiny_model, 2, prompt_tokens=6, answer_tokens=0, device="cpu", seed=1)


@pytest.fixture(scope="module")
def confident():
    """A tiny model trained to recite a random answer after its prompt (image + text), and that
    prompt: a trained model is sure of its next token, as a random one never is."""
    torch.manual_seed(0)
    model = VisionLanguageModel(preset("tiny"))
    batch = synthetic_batch(model, 2, prompt_tokens=6, answer_tokens=STEPS, device="cpu", seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        label_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    t = batch["input_ids"].shape[1] - STEPS
    prompt = {"input_ids": batch["input_ids"][:, :t], "attention_mask": batch["attention_mask"][:, :t],
              "pixel_values": batch["pixel_values"]}
    return model.eval(), prompt


def _greedy(model, batch, **kwargs):
    return generate(model, batch, max_new_tokens=STEPS, eos_token_ids=[], **kwargs).tokens


def _teacher_forced_logits(model, batch, tokens):
    """Logits [B, STEPS, V] predicting each generated token, given the fp32 sequence so far."""
    ids = torch.cat([batch["input_ids"], torch.tensor(tokens)], dim=1)  # (B, T + STEPS)
    with torch.no_grad():
        logits = model(ids, batch["pixel_values"].to(_dtype(model))).logits.float()
    t = batch["input_ids"].shape[1]
    return logits[:, t - 1:t - 1 + STEPS]  # (B, STEPS, V)


def _dtype(model):
    return model.vision_encoder.pos_embed.dtype


def _top1_margin(logits):
    top2 = logits.topk(2, dim=-1).values  # (..., 2)
    return top2[..., 0] - top2[..., 1]


# ----------------------------------------------------------------------------- weights

@pytest.mark.parametrize("lead", [(1, 3), (5, 7)])  # 3 rows: the int8 kernel; 35: dequantised
def test_int8_linear_matches_fp32_within_the_quantisation_bound(lead):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=False)
    x = torch.randn(*lead, 64)
    q = Int8Linear(linear.weight, act_dtype=torch.float32)
    bound = linear.weight.abs().amax(1) / 254 * 64 * x.abs().max()  # (48,) per output row
    err = (q(x) - linear(x)).abs()  # (*lead, 48)
    assert q.weight_int8.dtype == torch.int8 and q(x).shape == (*lead, 48)
    assert (err <= bound + 1e-5).all()


@pytest.mark.parametrize("lead", [(1, 3), (5, 7)])  # 3 rows: the int4 kernel; 35: dequantised
@pytest.mark.parametrize("group", [32, 64])
def test_int4_linear_computes_with_its_group_wise_weight(lead, group):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=False)  # 96 rows: one whole block of 64 + a partial one
    q = Int4Linear(linear.weight, group)
    w = q.dequantized(torch.float32)  # (96, 128)
    groups = linear.weight.detach().view(96, -1, group)
    low, high = groups.amin(-1), groups.amax(-1)
    step = (high - low) / 15  # (96, 128/g): one level
    # half a level, plus the rounding (2^-8 relative) of the bf16 scale (times up to 8 levels)
    # and of the bf16 offset (min + 8 levels)
    bound = step / 2 + (8 * step + (low + 8 * step).abs()) * 2**-8
    err = (w - linear.weight).abs().view(96, -1, group).amax(-1)
    assert (err <= bound + 1e-7).all()
    x = torch.randn(*lead, 128).bfloat16()
    exact = (x.float() @ w.T).view(*lead, 96)
    assert q(x).shape == (*lead, 96) and q(x).dtype == torch.bfloat16
    assert (q(x).float() - exact).abs().max() <= 0.02 * exact.abs().max()  # bf16 accumulation


@pytest.mark.parametrize("rows", [16, 48, 64, 96, 3072])
def test_unpack_reads_the_cpu_kernels_layout(rows):
    levels, _, _ = quantize_int4(torch.randn(rows, 64), 32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 8)
    assert torch.equal(unpack_cpu_int4(packed, rows, 64).int(), levels)


def test_int4_refuses_shapes_its_kernel_does_not_take():
    with pytest.raises(ValueError, match="int4 needs"):
        Int4Linear(torch.randn(40, 64), 32)  # 40 rows: not a multiple of 16
    with pytest.raises(ValueError, match="int4 needs"):
        Int4Linear(torch.randn(64, 48), 32)  # 48 inputs: not whole groups


@pytest.mark.parametrize("weights, tol", [("bf16", 0.25), ("int8", 0.25), ("int4", 0.25)])
def test_low_precision_weights_give_the_fp32_greedy_tokens(confident, weights, tol):
    model, prompt = confident
    reference = _greedy(model, prompt)
    ref_logits = _teacher_forced_logits(model, prompt, reference)
    fast = inference_weights(copy.deepcopy(model), weights)
    logits = _teacher_forced_logits(fast, prompt, reference)
    err = (logits - ref_logits).abs().amax(-1)  # (B, STEPS)
    assert err.max() < tol, f"{weights}: logit error {err.max():.3f}"
    sure = _top1_margin(ref_logits) > 2 * tol  # where a wrong argmax would be a real bug
    assert torch.equal(logits.argmax(-1)[sure], ref_logits.argmax(-1)[sure])
    assert sure.all(), "the test model should be sure at every step (train it longer)"
    assert _greedy(fast, prompt) == reference
    assert len(set(reference[0])) > 1  # the tokens change from step to step


def test_int4_logits_stay_near_bf16s(confident):
    """The int4 cost against bf16, the precision it is read beside: logits within 0.25 (about
    0.09 measured, on logits up to 9.4) and the same greedy tokens."""
    model, prompt = confident
    reference = _greedy(model, prompt)
    bf16 = inference_weights(copy.deepcopy(model), "bf16")
    int4 = inference_weights(copy.deepcopy(model), "int4")
    err = (_teacher_forced_logits(int4, prompt, reference)
           - _teacher_forced_logits(bf16, prompt, reference)).abs().max()
    assert 0 < err < 0.25
    assert _greedy(int4, prompt) == _greedy(bf16, prompt) == reference


# What eager fp32 and bf16 generation gave on the `confident` model before issue 28's changes
# (main at 43361b3): the answer it was trained to recite.
GREEDY_BEFORE = [[144, 129, 460, 71, 237, 508, 390, 281], [413, 398, 50, 68, 215, 471, 489, 241]]


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_fp32_and_bf16_give_the_greedy_tokens_they_gave_before(confident, weights):
    model, prompt = confident
    fast = inference_weights(copy.deepcopy(model), weights)
    assert _greedy(fast, prompt) == GREEDY_BEFORE
    if weights == "bf16":  # the frozen compiled step: bf16 weights in oneDNN's own layout
        torch._dynamo.reset()
        step = compiled_decode_step(freeze_weights=True)
        assert _greedy(fast, prompt, step_fn=step) == GREEDY_BEFORE


def test_inference_weights_store_what_they_say(tiny_model):
    fp32 = weight_bytes(tiny_model)
    bf16 = inference_weights(copy.deepcopy(tiny_model), "bf16")
    int8 = inference_weights(copy.deepcopy(tiny_model), "int8")
    int4 = inference_weights(copy.deepcopy(tiny_model), "int4")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert weight_bytes(bf16) == fp32 // 2
    assert isinstance(int8.decoder.blocks[0].attn.qkv, Int8Linear)
    assert isinstance(int8.decoder.lm_head, Int8Linear)  # the tied head, quantised
    blocks = [m for m in int4.decoder.blocks.modules() if isinstance(m, (Int4Linear, Int8Linear))]
    assert blocks and all(isinstance(m, Int4Linear) for m in blocks)  # every width fits here
    assert isinstance(int4.decoder.lm_head, Int8Linear)  # the head one step higher, as q4_0's
    assert weight_bytes(int4) < weight_bytes(int8)
    with pytest.raises(ValueError, match="weights must be"):
        inference_weights(copy.deepcopy(tiny_model), "fp8")


# ----------------------------------------------------------------------------- compiled decode

def test_decode_step_has_no_graph_breaks(tiny_model):
    assert decode_step_graph_breaks(tiny_model, batch_size=2, max_len=24) == 0


def test_compiled_decode_step_gives_the_eager_tokens(tiny_model, prompt):
    torch._dynamo.reset()
    step = compiled_decode_step()  # inductor; "reduce-overhead" is plain inductor on CPU
    reference = _greedy(tiny_model, prompt)
    assert _greedy(tiny_model, prompt, step_fn=step) == reference
    assert _greedy(tiny_model, prompt, step_fn=step) == reference  # a second run, new cache


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_eager_and_never_syncs(tiny_model, prompt):
    from tilevlm.inference.generation import generate_ids

    model = copy.deepcopy(tiny_model).cuda()
    batch = {k: v.cuda() for k, v in prompt.items()}
    reference = _greedy(model, batch)
    step = compiled_decode_step("reduce-overhead")
    assert _greedy(model, batch, step_fn=step) == reference
    steps = generate_ids(model, batch, STEPS, eos_token_ids=[], step_fn=step)
    first, _ = next(steps)  # the checks and the prefill may synchronise
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = [tokens for tokens, _ in steps]  # the decode loop must not
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.stack([first] + rest, 1).tolist() == reference


# ----------------------------------------------------------------------------- training

def _train_batch(model):
    return synthetic_batch(model, 2, prompt_tokens=5, answer_tokens=7, device="cpu", seed=2)


def test_label_loss_equals_the_full_loss_and_its_gradients(tiny_model):
    model = copy.deepcopy(tiny_model).train()
    batch = _train_batch(model)
    full = model(**batch).loss
    full.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fast = label_loss(model, batch)
    fast.backward()
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_compile_blocks_keeps_keys_and_loss(tiny_model):
    model = copy.deepcopy(tiny_model).train()
    batch = _train_batch(model)
    keys = list(model.state_dict())
    expected = label_loss(model, batch)
    compile_blocks(model, backend="aot_eager")  # inductor is covered by the decode test
    assert list(model.state_dict()) == keys
    got = label_loss(model, batch)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fused_adamw_on_cpu_gives_the_default_update():
    torch.manual_seed(0)
    start = [torch.randn(7, 5), torch.randn(5)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    results = []
    for opt_fn in (lambda ps: adamw(ps, lr=1e-2, device="cpu", weight_decay=0.1),
                   lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False)):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = opt_fn(params)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        results.append(params)
    assert adamw(start, lr=1e-3, device="cpu").defaults["fused"]
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- preprocessing

def _jpeg(path, size, orientation=1):
    from PIL import Image

    w, h = size
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rgb = torch.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb.to(torch.uint8).numpy()).save(path, quality=95, exif=exif)
    return path


@pytest.mark.parametrize("size, orientation", [((2000, 1500), 1), ((1500, 2000), 6)])
def test_jpeg_draft_keeps_the_grid_and_the_picture(tmp_path, size, orientation):
    from tilevlm.bench.bench_config import BenchConfig
    from tilevlm.preprocessing.image import ImageTransform, load_image

    transform = ImageTransform(BenchConfig().model_config(), jpeg_draft=True)  # 224 tiles, 448 max
    path = _jpeg(tmp_path / "big.jpg", size, orientation)
    full, grid = transform(load_image(path))
    fast, fast_grid = transform.load(path)  # decoded at 1/2 scale
    assert fast_grid == grid and fast.shape == full.shape
    assert (fast - full).abs().mean() < 0.02  # normalized values span [-1, 1]


def test_draft_scale_never_changes_the_grid():
    from tilevlm.preprocessing.image import ImageTransform, tile_grid

    cfg = preset("split_896")
    transform = ImageTransform(cfg)
    g = torch.Generator().manual_seed(0)
    for w, h in torch.randint(1, 5000, (300, 2), generator=g).tolist():
        s = transform.draft_scale(w, h)
        grid = tile_grid(w, h, cfg.vit_img_size, cfg.max_img_size)
        small = (-(-w // s), -(-h // s))
        assert tile_grid(*small, cfg.vit_img_size, cfg.max_img_size) == grid
        if s > 1:  # a reduced decode still leaves a downscale to do
            assert small[0] >= grid[1] * cfg.vit_img_size and small[1] >= grid[0] * cfg.vit_img_size
