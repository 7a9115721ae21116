"""Moving packed tensors between the host and a GPU without stalling the merge.

`upload` (the read-ahead thread: file → pinned memory → the GPU, on the thread's own copy stream),
`adopt` (the computing thread takes them over on its stream), `to_host` (the writer thread: into
pinned memory, one wait per linear) and `continue_elsewhere` (the writer packs on a stream of its
own, after the kernels that made the codes). On the CPU every function returns its input unchanged.
Why: docs/performance.md ("Host and GPU transfers").
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_local = threading.local()  # one stream per (thread, device)


def _own_stream(device: "torch.device"):
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
    stream = _own_stream(device)
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


def continue_elsewhere(device: "str | torch.device") -> Callable[[], contextlib.AbstractContextManager]:
    """Hand the work queued so far on this thread's stream to another thread: call this where the
    work was queued, and enter what it returns on the thread that goes on. There the kernels run
    on that thread's own stream, after the handed-over work, and neither thread waits for the
    other's kernels when it synchronises. The receiving thread must keep the tensors it was given
    until its own kernels are done (`to_host` waits for them), so their memory is not reused early."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return contextlib.nullcontext
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(device))

    @contextlib.contextmanager
    def on_own_stream():
        stream = _own_stream(device)
        stream.wait_event(ready)
        with torch.cuda.stream(stream):
            yield

    return on_own_stream


def to_host(tensors: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """Contiguous host copies of `tensors` (pinned for those on a GPU), waiting once for all the copies."""
    import torch

    hosts, last = {}, None
    for name, tensor in tensors.items():
        if not tensor.is_cuda:
            hosts[name] = tensor.detach().contiguous()
            continue
        hosts[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        hosts[name].copy_(tensor.detach(), non_blocking=True)
        last = tensor.device
    if last is not None:
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(last))
        done.synchronize()
    return hosts
