"""Which torch device a command computes on: `--device auto|cpu|cuda|cuda:N`, resolved once, up front.

"auto" (the default) is the first CUDA GPU when torch can use one, else the CPU. Anything else must
name a device torch can use on this machine *now*; a device that is misspelt, of a kind we do not
compute on, or absent (`cuda` without CUDA, `cuda:7` on a one-GPU machine) is refused with one
sentence before any work starts, rather than failing half-way through a merge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from oftsurgery.errors import OftSurgeryError

if TYPE_CHECKING:
    import torch

AUTO = "auto"
SUPPORTED_TYPES = ("cpu", "cuda")


def resolve_device(spec: "str | torch.device | None", error: type[OftSurgeryError] = OftSurgeryError) -> "torch.device":
    """The torch.device for `spec` ("auto", "cpu", "cuda", "cuda:N", or a torch.device); raises
    `error` with one sentence when this machine cannot compute there."""
    import torch

    text = AUTO if spec is None else str(spec).strip()
    if text.lower() == AUTO:
        return torch.device("cuda", torch.cuda.current_device()) if _cuda_usable() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise error(f"--device {text!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type not in SUPPORTED_TYPES:
        raise error(f"--device {text!r} is not supported; use auto, cpu, cuda or cuda:N.")
    if device.type == "cpu":
        return torch.device("cpu")
    if not _cuda_usable():
        raise error(f"--device {text} was requested but torch sees no usable CUDA GPU here; use --device cpu or auto.")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise error(f"--device {text} names GPU {index}, but this machine has {count} (cuda:0 to cuda:{count - 1}).")
    device = torch.device("cuda", index)
    try:
        torch.empty(1, device=device)  # a GPU that is listed but cannot allocate (busy, broken) fails here, not mid-merge
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"--device {text} cannot be used ({first}).") from None
    return device


def _cuda_usable() -> bool:
    import torch

    try:
        return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0
    except Exception:  # noqa: BLE001 - a broken driver install raises from inside torch
        return False
