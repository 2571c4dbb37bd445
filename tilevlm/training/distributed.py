"""Multi-process training helpers: the process group from torchrun's environment, collectives
for metrics, and DistributedDataParallel applied from outside the model.

    with distributed.process_group(device):          # no-op without torchrun (WORLD_SIZE unset/1)
        model = distributed.parallelize(model, device)  # DDP when world_size > 1, else the model
        loss_mean = distributed.all_reduce_sum([loss_sum, tokens])  # ...

gloo on CPU, NCCL on CUDA. Every helper works (as the identity) in a single process, so the
trainer has one code path. With `--fsdp` the trainer shards the model instead of `parallelize`
(`tilevlm.training.fsdp`); the process group and the collectives here are the same.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

TIMEOUT = datetime.timedelta(minutes=30)  # a rank stuck longer than this is an error


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs metrics and saves."""
    return rank() == 0


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: `cuda:LOCAL_RANK` for CUDA under torchrun, else `device`."""
    if device.type == "cuda" and env_rank_world()[1] > 1 and device.index is None:
        return torch.device("cuda", env_rank_world()[2])
    return device


def setup(device: torch.device) -> bool:
    """Join the process group torchrun describes; True when this call created it (the caller
    then owns `teardown`). A no-op in a single process or when a group already exists."""
    _, world, local_rank = env_rank_world()
    if world <= 1 or is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend_for(device), timeout=TIMEOUT)
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend_for(device))
    return True


def teardown() -> None:
    if is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """`setup` on entry and, when it created the group, `teardown` on exit."""
    created = setup(device)
    try:
        yield
    finally:
        if created:
            teardown()


def parallelize(model: nn.Module, device: torch.device) -> nn.Module:
    """The module to train: DDP around `model` when there are several processes, else `model`.

    Every trainable parameter takes part in every backward pass (a micro-batch without images
    adds `image_parts_touch`), so DDP need not search the graph for unused ones each step."""
    if world_size() <= 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                               find_unused_parameters=False)


def image_parts_touch(model: nn.Module) -> torch.Tensor | float:
    """0 * (sum of the trainable vision-encoder and projector weights): added to the loss of a
    micro-batch without images, it gives those weights zero gradients, so each rank's backward
    reduces the same parameters as a rank whose batch had images (DDP requires it)."""
    params = [p for part in (model.vision_encoder, model.projector)
              for p in part.parameters() if p.requires_grad]
    return sum(p.sum() for p in params) * 0.0 if params else 0.0


def no_sync(module: nn.Module) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce (for all but the last micro-batch of an accumulation)."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(values: Sequence[float], device: torch.device | None = None) -> list[float]:
    """Element-wise sum over ranks (float64 on the wire; the values themselves in one process)."""
    if world_size() <= 1:
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_wire_device(device))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (`[obj]` in one process)."""
    if world_size() <= 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _wire_device(device: torch.device | None) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return device if device is not None and device.type == "cuda" else \
            torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
