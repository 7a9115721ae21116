"""Live tensor bytes measured without a GPU: what the calibrated merge holds at its peak, and where.

`LiveBytes` is a torch dispatch mode: every tensor an operator returns inside it has its storage
counted once (views share it) until the storage is freed, so `peak` is the high-water mark of the
bytes that tensors made on this thread hold — what torch's `max_memory_allocated` counts on a GPU,
less the allocator's rounding. `labels` names the work under way (a stack of stage names pushed by
`label` or by functions wrapped with `instrument`), and each label keeps the highest value seen while
it was on the stack, with the stack at the overall peak. Tensors made before the mode started, on
other threads, or inside one operator (its workspace) are not counted. bench/solve_memory.py uses it;
docs/performance.md ("Peak memory") has what it measured.
"""

from __future__ import annotations

import functools
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from oftsurgery.merge.solve.factor import TRIANGLE_BASE, TRIANGLE_CHUNK
from oftsurgery.merge.solve.products import CHUNK_ELEMENTS


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages made by operators while it is active (see module doc)."""

    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self.peak_stack: tuple[str, ...] = ()
        self.stage_peak: dict[str, int] = {}
        self._stack: list[str] = []
        self._tracked: dict[int, str] = {}  # storage -> what first held it ("float32[4096, 11008]")
        self.peak_tensors: list[tuple[int, str]] = []  # the largest live storages at the peak: (bytes, what)
        self._snapshot_at = 0
        self._lock = threading.Lock()

    # -- labels ----------------------------------------------------------------------------------
    @contextmanager
    def label(self, name: str):
        """Name the work inside the block (nested labels stack up)."""
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()

    def reset_peak(self) -> None:
        self.peak, self.peak_stack = self.live, tuple(self._stack)

    # -- counting --------------------------------------------------------------------------------
    def _freed(self, key: int, nbytes: int) -> None:
        with self._lock:
            self._tracked.pop(key, None)
            self.live -= nbytes

    def _count(self, tensor) -> None:
        if tensor.device.type != self.device_type:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._tracked:
            return
        nbytes = storage.nbytes()
        with self._lock:
            self._tracked[key] = f"{nbytes}|{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}"
            self.live += nbytes
        weakref.finalize(storage, self._freed, key, nbytes)

    def _note(self) -> None:
        live = self.live
        for name in self._stack:
            if live > self.stage_peak.get(name, 0):
                self.stage_peak[name] = live
        if live > self.peak:
            self.peak, self.peak_stack = live, tuple(self._stack)
            if live > 1.01 * self._snapshot_at:  # what is alive there (not at every small step up)
                self._snapshot_at = live
                found = sorted((int(v.split("|")[0]), v.split("|")[1]) for v in list(self._tracked.values()))
                self.peak_tensors = found[::-1][:16]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        import torch

        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._count(value)
        self._note()
        return out


def instrument(tracker: LiveBytes, owner: Any, name: str, label: str | None = None) -> Callable[[], None]:
    """Replace `owner.name` (a function or method) by one that runs under `tracker.label(label)`;
    returns what undoes it."""
    original = getattr(owner, name)
    is_static = isinstance(owner, type) and isinstance(owner.__dict__.get(name), staticmethod)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        with tracker.label(label or name):
            return original(*args, **kwargs)

    setattr(owner, name, staticmethod(wrapped) if is_static else wrapped)
    return lambda: setattr(owner, name, owner.__dict__.get(name) and (staticmethod(original) if is_static
                                                                       else original))



def _group_stages(n: int, m: int, parts: list[int], t: int, s: int) -> dict[str, int]:
    """Bytes one input group holds above the layer's base, per solver stage (n inputs, m outputs in
    all, `parts` each linear's outputs, t fitted and s held-out tokens); docs/performance.md."""
    rows = 4 * n * ((t if t <= n else 0) + (s if s <= n else n))  # X while t ≤ n, else H alone; held-out alike
    h = 4 * n * n  # H, float32
    targets = 8 * m * n  # W·Rᵀ [out, in] and the solver's transposed copy, float32
    widest = max(parts)
    return {
        # the fixed tree of shard sums: one partial H per level (3) and the shard being summed
        "statistics": 4 * h + 4 * n * min(t, n) + 4 * n * min(s, n),
        "solve: problem": h + rows + targets,
        # two float64 in×in matrices (the reversed, permuted H and its factor; the factor and its
        # inverse), and the triangular inverse's temporaries (one diagonal block, two chunks)
        "solve: factor": h + rows + targets + 16 * n * n + 8 * min(n, TRIANGLE_BASE) ** 2
                         + 16 * min(TRIANGLE_CHUNK, n * n // 4),
        "solve: gptq pass": 2 * h + rows + targets + 8 * m * n,
        # codes in and out, the gradient, and the error's temporaries (scales, zeros, differences); on a
        # GPU the first gradient's split products add the error's two halves and two chunks of H's rows
        "solve: refine": h + rows + targets + 24 * m * n + 8 * min(n * n, CHUNK_ELEMENTS),
        # the current codes and, in turn: float64 H for H·T with T and H·T in float64; H·T, D and the
        # zeros gathered in float64; D, the group products P and the G×G systems A
        "solve: refit": h + rows + targets + max(8 * n * n + 20 * m * n, 28 * m * n,
                                                  20 * m * n + 8 * m * (n // 128) ** 2),
        # codes and a candidate; one part's error in float64 and X (or H) in float64 with it
        "solve: errors": h + rows + targets + 8 * m * n + 24 * widest * n + 8 * n * min(t, n),
    }


def layer_groups(hidden: int, intermediate: int, kv: int) -> list[tuple[int, list[int]]]:
    """A Llama decoder layer's input groups: (in, each linear's out) for q/k/v, o, gate/up, down."""
    return [(hidden, [hidden, kv, kv]), (hidden, [hidden]), (hidden, [intermediate, intermediate]),
            (intermediate, [hidden])]


def predict_peak(hidden: int, intermediate: int, fit_tokens: int, heldout_tokens: int, *, kv: int,
                 detail: bool = False):
    """The calibrated merge's peak tensor bytes for one Llama decoder layer on a GPU (half-precision
    forward): the layer's base plus the largest group stage. With `detail`, every stage's figure
    (the largest over the groups), the base and "peak"; else the peak alone.

    Base: the layer in half precision (2P), its source codes and its requantized codes (uint8, P
    each) and the calibration stream (T·h·2), P the layer's parameters and T all tokens."""
    params = sum(n * sum(parts) for n, parts in layer_groups(hidden, intermediate, kv))
    base = 4 * params + 2 * (fit_tokens + heldout_tokens) * hidden
    stages: dict[str, int] = {}
    for n, parts in layer_groups(hidden, intermediate, kv):
        for stage, nbytes in _group_stages(n, sum(parts), parts, fit_tokens, heldout_tokens).items():
            stages[stage] = max(stages.get(stage, 0), base + nbytes)
    peak = max(stages.values())
    return {**stages, "base": base, "peak": peak} if detail else peak
