"""FSDP2 for `tilevlm train --fsdp`: torch's `fully_shard`, applied from outside the model per
block (every vision block, every decoder block, then the root for the rest: embeddings,
projector, norms, head), as torchtitan does; and the gathering that keeps the checkpoint format.

    shard_model(model, device, bf16)          # after the weights are final, before the optimizer
    full = gather_model(model)                # rank 0: a plain model with the full weights
    opt_state = gather_optimizer_state(opt)   # rank 0: optimizer.state_dict() of a plain run

Each process holds 1/N of every parameter, gradient and AdamW moment; a block's parameters are
all-gathered just before its forward (and again for its backward) and its gradients
reduce-scattered right after. Checkpoints stay the one-process format (`checkpoints.py`): the
full state is gathered to rank 0 and written there as safetensors + JSON (atomic, no pickle),
so a checkpoint saved by N processes resumes with any number, with or without --fsdp; on
resume every rank reads the full tensors one at a time and keeps its shard.

Every function here is a collective where it says so: all ranks call it, in the same order.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.training import distributed


def _fsdp() -> Any:
    from torch.distributed import fsdp  # torch >= 2.6 exports fully_shard here

    return fsdp


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, _fsdp().FSDPModule)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The units sharded on their own, in forward order."""
    return [*model.vision_encoder.blocks, *model.decoder.blocks]


def shard_model(model: nn.Module, device: torch.device, bf16: bool) -> nn.Module:
    """`fully_shard` every block, then the root, over all processes; in place.

    The model may still be on the CPU: each unit's parameters move to `device` as it is
    sharded, so no rank ever holds the whole model there. Every rank must hold the same weights
    (the same seed or the same checkpoint): fully_shard keeps each rank's own slice of its own
    copy and broadcasts nothing. bf16: parameters are cast to bf16 for the forward and backward
    (fp32 master weights and optimizer state, gradients reduced in fp32)."""
    from torch.distributed.device_mesh import init_device_mesh

    fsdp = _fsdp()
    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    policy = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if bf16 else fsdp.MixedPrecisionPolicy()
    units = blocks(model)
    for i, block in enumerate(units):
        # The last block's backward comes first: resharding it after the forward would only
        # gather it again at once.
        fsdp.fully_shard(block, mesh=mesh, mp_policy=policy,
                         reshard_after_forward=i < len(units) - 1)
    fsdp.fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


# ---------------------------------------------------------------- a step without images
@contextlib.contextmanager
def vision_run(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """For a micro-batch without images: the vision tower runs on one blank tile where a batch
    with images runs it (just before the decoder), and the list receives its projected output,
    for the caller to add `0 x sum` of it to the loss.

    Every rank must all-gather (and in the backward reduce-scatter) the same units in the same
    order, so a rank whose batch has no image cannot simply skip the vision blocks while another
    runs them (DDP's `image_parts_touch` is not enough: it touches the sharded parameters, not
    the units). The blank tile's gradients are zero, so the step is unchanged."""
    out: list[torch.Tensor] = []

    def run_vision(module: nn.Module, args: Any) -> None:
        cfg = model.cfg
        patch = model.vision_encoder.patch_embed.weight  # the root's, unsharded at this point
        tile = torch.zeros(1, 3, cfg.vit_img_size, cfg.vit_img_size, dtype=patch.dtype,
                           device=patch.device)
        out.append(model.encode_images(tile))

    handle = model.decoder.register_forward_pre_hook(run_vision)
    try:
        yield out
    finally:
        handle.remove()


def grad_norm_value(norm: torch.Tensor) -> torch.Tensor:
    """`clip_grad_norm_`'s total norm as a plain tensor (over sharded gradients it is a DTensor
    holding the norm over all ranks)."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ---------------------------------------------------------------- gathering (collectives)
def _gather(state: dict[str, Any], keep: bool) -> dict[str, Any]:
    """Every DTensor in `state` gathered in full, in key order (a collective); the result on the
    CPU when `keep`, else dropped tensor by tensor (ranks other than 0)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for key, value in state.items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if keep:
            out[key] = value.detach().cpu() if torch.is_tensor(value) else value
    return out


def gather_model(model: nn.Module) -> nn.Module | None:
    """On rank 0, a plain (unsharded) model of the same config with the full weights, on the
    CPU; None on the other ranks. A collective."""
    main = distributed.is_main()
    tensors = _gather(model.state_dict(), keep=main)
    if not main:
        return None
    with torch.device("meta"):  # no memory until the gathered tensors are assigned
        plain = VisionLanguageModel(model.cfg, model.vision_chunk_size)
    plain.load_state_dict(tensors, assign=True)  # the model has no buffers to leave on meta
    return plain.train(model.training)


def gather_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """On rank 0, `optimizer.state_dict()` with every sharded state tensor gathered in full on
    the CPU: exactly what the same optimizer of a one-process run holds; None elsewhere.
    A collective."""
    main = distributed.is_main()
    sd = optimizer.state_dict()
    state = {index: _gather(values, keep=main) for index, values in sorted(sd["state"].items())}
    return {"state": state, "param_groups": sd["param_groups"]} if main else None


def shard_optimizer_tensor(optimizer: torch.optim.Optimizer) -> Any:
    """A function (index, name, full tensor) -> what `optimizer.load_state_dict` needs for the
    sharded parameter of that index: this rank's shard, as a DTensor like the parameter (every
    rank holds the full tensor from the checkpoint, so no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]

    def place(index: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        param = params[index]
        if not isinstance(param, DTensor) or tensor.shape != param.shape:
            return tensor  # scalars (AdamW's step) and unsharded parameters
        return distribute_tensor(tensor.to(param.device, param.dtype), param.device_mesh,
                                 param.placements, src_data_rank=None)

    return place
