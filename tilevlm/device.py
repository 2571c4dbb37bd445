"""Which device and which compute precision: one home for the "auto" rules."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported inside the functions: the CLI's option tables stay light
    import torch

DTYPE_NAMES = ("auto", "fp32", "bf16")
DEVICE_HELP = ("auto: cuda when available, else mps (Apple GPUs), else cpu; or a torch device "
               "name (cpu, cuda, cuda:1, mps)")


def resolve_device(name: str | None) -> torch.device:
    """'auto' / None: CUDA when present, else Apple's MPS when torch reports it, else CPU.
    'cuda' or 'mps' that this torch cannot use is a clear error.

    MPS runs in fp32 (the "auto" precision below) with the plain AdamW; it is untested here (no
    Apple GPU in the test machines): this function and `_mps_available` are its whole code path.
    """
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else
                            "mps" if _mps_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r} is not a device tilevlm runs on; use auto, cpu, "
                         "cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but this PyTorch sees no CUDA GPU; "
                         "use --device cpu")
    if device.index is not None and device.type == "cuda" and \
            device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPUs")
    if device.type == "mps" and not _mps_available():
        raise ValueError("--device mps was asked for, but this PyTorch reports no usable Apple "
                         "MPS device; use --device cpu")
    return device


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def auto_uses_bf16(device: torch.device) -> bool:
    """The "auto" precision: bf16 on a CUDA GPU that supports it, fp32 elsewhere (on a CPU fp32
    weights decode fastest unless bf16 storage is asked for explicitly)."""
    import torch

    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' | 'fp32' | 'bf16' -> the torch dtype on `device`."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    import torch

    if name == "auto":
        return torch.bfloat16 if auto_uses_bf16(device) else torch.float32
    return torch.bfloat16 if name == "bf16" else torch.float32


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype weights load in when none is asked for: the "auto" rule."""
    return resolve_dtype("auto", device)
