"""Generic weight conversion: key maps (`our key <- their key(s)`; several of theirs are
concatenated along rows, for fused q/k/v and gate/up weights), checks that name every missing,
unexpected or mis-shaped tensor, vocabulary growth, and assembling the model from tensors.

Growing a vocabulary: the new rows of the embedding (and of an untied lm_head) start as the mean
of the existing rows, which keeps the new tokens' initial logits and embeddings in the
distribution the model already knows.
"""

from __future__ import annotations

from typing import Callable

import torch

from tilevlm.config import VLMConfig
from tilevlm.model.vlm import VisionLanguageModel

KeyMap = dict[str, tuple[str, ...]]


def expand(flat: dict, block: dict, n_blocks: int, ours: str, theirs: str) -> KeyMap:
    """Flat + per-block maps -> one map; block keys get `{ours}{i}.` / `{theirs}{i}.` prefixes."""
    out = {k: (v,) if isinstance(v, str) else tuple(v) for k, v in flat.items()}
    for i in range(n_blocks):
        for k, v in block.items():
            srcs = (v,) if isinstance(v, str) else v
            out[f"{ours}{i}.{k}"] = tuple(f"{theirs}{i}.{s}" for s in srcs)
    return out


def listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def convert(src: dict[str, torch.Tensor], key_map: KeyMap, ignore: Callable[[str], bool],
            what: str) -> dict[str, torch.Tensor]:
    """Apply a key map; every source tensor must be used or explicitly ignored."""
    used = {s for srcs in key_map.values() for s in srcs}
    missing = sorted(used - set(src))
    unexpected = sorted(k for k in src if k not in used and not ignore(k))
    problems = []
    if missing:
        problems.append(f"missing tensors: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {listing(unexpected)}")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))
    return {ours: _concat(src, srcs, what) for ours, srcs in key_map.items()}


def _concat(src: dict[str, torch.Tensor], keys: tuple[str, ...], what: str) -> torch.Tensor:
    if len(keys) == 1:
        return src[keys[0]]
    try:
        return torch.cat([src[k] for k in keys], dim=0)
    except RuntimeError:
        shapes = ", ".join(f"{k} {list(src[k].shape)}" for k in keys)
        raise ValueError(f"{what}: tensors to fuse have mismatched shapes: {shapes}") from None


def check_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str,
                  skip: tuple[str, ...] = ()) -> None:
    """Keys and shapes of `tensors` must be exactly the model's (minus `skip` prefixes)."""
    check_shapes(model, {k: tuple(t.shape) for k, t in tensors.items()}, what, skip)


def check_shapes(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], what: str,
                 skip: tuple[str, ...] = ()) -> None:
    """`check_tensors` on shapes alone (e.g. from safetensors headers, before any tensor is read)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(skip)}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(f"{k} (checkpoint {list(s)}, model {list(expected[k])})"
                   for k, s in shapes.items() if k in expected and tuple(s) != expected[k])
    problems = [f"{name}: {listing(keys)}" for name, keys in
                (("missing tensors", missing), ("unexpected tensors", unexpected),
                 ("wrong shapes", wrong)) if keys]
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def grow_rows(weight: torch.Tensor, rows: int, base_rows: int, what: str) -> torch.Tensor:
    """[base_rows, D] -> [rows, D]; the new rows are the mean of the existing ones."""
    if weight.dim() != 2 or weight.shape[0] != base_rows:
        raise ValueError(f"{what}: expected {base_rows} rows (the base vocabulary), "
                         f"got shape {list(weight.shape)}")
    if rows < base_rows:
        raise ValueError(f"{what}: {base_rows} rows do not fit a vocabulary of {rows}")
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # (1, D)
    return torch.cat([weight, mean.expand(rows - base_rows, -1)], dim=0)  # (rows, D)


def assemble(cfg: VLMConfig, tensors: dict[str, torch.Tensor], what: str,
              dtype: torch.dtype | None, fresh: tuple[str, ...] = ()) -> VisionLanguageModel:
    """Build the model on the meta device and assign the tensors; `fresh` submodules get a
    random init instead (they must have an `init_weights()`)."""
    with torch.device("meta"):
        model = VisionLanguageModel(cfg)
    check_tensors(model, tensors, what, skip=tuple(f"{name}." for name in fresh))
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    for name in fresh:
        module = model.get_submodule(name).to_empty(device=device)
        module.init_weights()
        if dtype is not None:
            module.to(dtype)
    model.load_state_dict(tensors, strict=not fresh, assign=True)
    return model.eval()

