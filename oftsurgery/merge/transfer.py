"""Moving packed tensors between the host and a GPU without stalling the merge.

On a GPU the data-free merge of a 7B decoder layer is a few milliseconds of kernels next to ~100 MB
read from disk, copied to the GPU, copied back and written. Copies from ordinary (pageable) host
memory go through a driver staging buffer at a few GB/s and, on the default stream, queue behind
and in front of every kernel. So the two transfers here use page-locked (pinned) host memory,
which the GPU reads and writes directly, and the upload runs on a stream of its own:

- `upload` (the read-ahead thread): the tensors are read from the file straight into pinned
  memory (`CheckpointReader.get(pin_memory=True)`), copied on this thread's copy stream, and the
  thread waits for that copy only. The consumer calls `adopt` before using them.
- `adopt` (the thread that computes): tells torch's caching allocator that the tensors are now used
  on the consumer's stream, so their memory is not handed back to the copy stream while kernels
  queued there may still read it.
- `to_host` (the writer thread): one copy into pinned memory, waiting for it alone.

Pinned blocks come from torch's caching host allocator, which reuses them once the copies that
used them are done, so pinned memory stays at a few linears' worth. On the CPU every function here
returns its input unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_local = threading.local()  # one copy stream per (thread, device)


def _copy_stream(device: "torch.device"):
    import torch

    streams = getattr(_local, "streams", None)
    if streams is None:
        streams = _local.streams = {}
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


def upload(read: Callable[[bool], Mapping[str, "torch.Tensor"]], device: "str | torch.device") -> dict[str, "torch.Tensor"]:
    """`read(pin_memory)`'s tensors on `device`, the copies finished; call `adopt` where they are used."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return {k: v.to(device) for k, v in read(False).items()}
    host = read(True)
    stream = _copy_stream(device)
    with torch.cuda.stream(stream):
        moved = {k: v.to(device, non_blocking=True) for k, v in host.items()}
    stream.synchronize()
    return moved


def adopt(tensors: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """Mark tensors from `upload` as used on this thread's current stream (no copy, no wait)."""
    import torch

    for tensor in tensors.values():
        if tensor.is_cuda:
            tensor.record_stream(torch.cuda.current_stream(tensor.device))
    return dict(tensors)


def to_host(tensor: "torch.Tensor") -> "torch.Tensor":
    """A contiguous host copy of `tensor` (pinned when it comes from a GPU)."""
    import torch

    if not tensor.is_cuda:
        return tensor.detach().contiguous()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor.detach(), non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(tensor.device))
    done.synchronize()
    return host
