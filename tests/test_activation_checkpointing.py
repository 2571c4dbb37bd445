"""Per-block activation checkpointing (`--activation-checkpointing`): the same loss and the same
gradients as the plain step (compared exactly: the recomputation runs the same kernels on the
same inputs, so on the CPU every bit agrees), the blocks really recompute in the backward pass,
and nothing else about the model changes (keys, eval mode, copies).
"""

import copy

import pytest
import torch

from tilevlm import preset
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.bench.workload import synthetic_batch
from tilevlm.training.activation_checkpointing import checkpoint_blocks, is_checkpointed
from tilevlm.training.lora import LoRASpec, apply_lora
from tilevlm.training.loop import train

from helpers import SMALL, quick


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VisionLanguageModel(preset("tiny")).train()


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, return_logits=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def _count_mlp_calls(model):
    """calls[0] grows by one per run of any block's MLP (forward or recomputation)."""
    calls = [0]

    def count(*_):
        calls[0] += 1

    for block in (*model.vision_encoder.blocks, *model.decoder.blocks):
        block.mlp.register_forward_pre_hook(count)
    return calls


def _assert_same_step(plain, ckpt, batch):
    loss, grads = _loss_and_grads(plain, batch)
    loss_ckpt, grads_ckpt = _loss_and_grads(ckpt, batch)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == len(list(plain.parameters()))
    for name in grads:
        assert torch.equal(grads[name], grads_ckpt[name]), name


def test_checkpointed_step_equals_the_plain_one_and_recomputes(model):
    batch = synthetic_batch(model, 2, prompt_tokens=5, answer_tokens=7, device="cpu", seed=2)
    ckpt = checkpoint_blocks(copy.deepcopy(model))
    n_blocks = len(model.vision_encoder.blocks) + len(model.decoder.blocks)
    assert all(is_checkpointed(b) for b in (*ckpt.vision_encoder.blocks, *ckpt.decoder.blocks))
    assert list(ckpt.state_dict()) == list(model.state_dict())  # same keys, same order
    calls_plain, calls_ckpt = _count_mlp_calls(model), _count_mlp_calls(ckpt)
    _assert_same_step(model, ckpt, batch)
    assert calls_plain[0] == n_blocks  # one forward each
    assert calls_ckpt[0] == 2 * n_blocks  # the forward, and the recomputation in the backward
    with torch.no_grad():  # evaluation: nothing to recompute, the block runs once
        assert torch.equal(model(**batch).logits, ckpt(**batch).logits)
    assert calls_ckpt[0] == 3 * n_blocks
    again = copy.deepcopy(ckpt)  # a copy recomputes with its own weights, not the original's
    with torch.no_grad():
        for p in again.parameters():
            p.mul_(0.5)
    assert not torch.equal(_loss_and_grads(again, batch)[0], _loss_and_grads(ckpt, batch)[0])


def test_checkpointed_lora_dropout_recomputes_the_same_masks(model):
    """Dropout inside a block (LoRA's) is recomputed with the saved RNG state: the same step."""
    batch = synthetic_batch(model, 2, prompt_tokens=5, answer_tokens=7, device="cpu", seed=3)
    spec = LoRASpec(4, 8.0, 0.3, ("qkv",), ("qkv", "down"))
    plain = apply_lora(copy.deepcopy(model), spec)
    with torch.no_grad():  # B starts at 0, which would hide the adapters' dropout
        for name, p in plain.named_parameters():
            if name.endswith("lora.b"):
                p.normal_(0, 0.1)
    ckpt = checkpoint_blocks(copy.deepcopy(plain))
    torch.manual_seed(7)
    loss, grads = _loss_and_grads(plain, batch)
    torch.manual_seed(7)
    loss_ckpt, grads_ckpt = _loss_and_grads(ckpt, batch)
    assert torch.equal(loss, loss_ckpt)
    for name in grads:
        assert torch.equal(grads[name], grads_ckpt[name]), name


def test_train_with_activation_checkpointing_gives_the_plain_run(tmp_path):
    from tilevlm.data.sources import named_dataset, synthetic_tokenizer
    from tilevlm.preprocessing.processor import Processor

    tokenizer, config = synthetic_tokenizer(preset("tiny", **SMALL))
    data = named_dataset("synthetic", "train", 40, config)
    results = {}
    for flag in (False, True):
        torch.manual_seed(0)
        net = VisionLanguageModel(config)
        train(net, Processor(config, tokenizer), data, None,
              quick(tmp_path / str(flag), steps=2, activation_checkpointing=flag))
        results[flag] = net.state_dict()
        assert is_checkpointed(net.decoder.blocks[0]) == flag
    for key, value in results[False].items():
        assert torch.equal(value, results[True][key]), key
