"""Which calibration rows, shards and jobs belong to which rank, and the fixed summation tree.

Pure functions of the row count, the rank and the world size (no torch, no process group): rows are
always cut into `SHARDS` shards, ranks own contiguous runs of them, and `tree_sum` adds shard sums in
one fixed binary tree, so every world size adds in the same order (docs/distributed.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SHARDS = 8  # calibration rows are always cut into this many shards (a power of two: a binary tree)

Node = tuple[int, int]  # a whole subtree of the shard tree: shards [lo, hi)
Sums = dict[str, "torch.Tensor"]


def _split_evenly(total: int, parts: int) -> list[range]:
    """`total` items cut into `parts` contiguous runs, the first `total % parts` one longer."""
    base, extra = divmod(total, parts)
    runs, start = [], 0
    for k in range(parts):
        stop = start + base + (1 if k < extra else 0)
        runs.append(range(start, stop))
        start = stop
    return runs


def shard_rows(num_rows: int) -> list[range]:
    """The calibration rows of each of the `SHARDS` shards. Non-empty shards come first, so shard
    0 holds a row whenever there is one."""
    return _split_evenly(num_rows, SHARDS)


def shards_of_rank(rank: int, world_size: int) -> range:
    """The shards rank `rank` owns: a contiguous run; rank 0 always owns shard 0. With more ranks
    than shards the extra ranks own none (they still solve layers)."""
    return _split_evenly(SHARDS, world_size)[rank]


def rows_of_rank(num_rows: int, rank: int, world_size: int) -> range:
    """The calibration rows rank `rank` carries through the model: those of its shards."""
    shards = shards_of_rank(rank, world_size)
    if not shards:
        return range(0, 0)
    rows = shard_rows(num_rows)
    return range(rows[shards.start].start, rows[shards.stop - 1].stop)


def row_batches(rows: range, batch_size: int) -> list[range]:
    """`rows` cut into batches of `batch_size` counted from its start (pass one shard: a batch must
    never span two shards, or the batch shapes, and with them the float results, would depend on
    the number of ranks)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    return [range(s, min(s + batch_size, rows.stop)) for s in range(rows.start, rows.stop, batch_size)]


def subtrees(shards: range, node: Node = (0, SHARDS)) -> list[Node]:
    """The largest whole subtrees of the shard tree made only of `shards`, left to right."""
    lo, hi = node
    if not shards or hi <= shards.start or shards.stop <= lo:
        return []
    if shards.start <= lo and hi <= shards.stop:
        return [node]
    mid = (lo + hi) // 2
    return subtrees(shards, (lo, mid)) + subtrees(shards, (mid, hi))


def _add(left: Sums | None, right: Sums | None) -> Sums | None:
    """One node of the tree: left + right, key by key (None: a subtree without rows), added into
    left's tensors (the same sums as left + right): a partial sum is an in×in Hessian, 3.3 GB at
    in = 28672, and the tree holds one per level plus the shard being summed, not twice that."""
    if left is None:
        return right
    if right is None:
        return left
    if left.keys() != right.keys():
        raise ValueError(f"shards summed different quantities: {sorted(left)} vs {sorted(right)}")
    for k in left:
        left[k].add_(right[k])
    return left


def tree_sum(node: Node, known: dict[Node, Sums | None], leaf: Callable[[int], Sums | None]) -> Sums | None:
    """The value of `node`: taken from `known` if there, else the sum of its two halves (left +
    right), down to `leaf(shard)`. The one order of additions every rank and run uses."""
    if node in known:
        return known[node]
    lo, hi = node
    if hi - lo == 1:
        return leaf(lo)
    mid = (lo + hi) // 2
    return _add(tree_sum((lo, mid), known, leaf), tree_sum((mid, hi), known, leaf))


def assign_to_ranks(names: Sequence[str], costs: Sequence[float], world_size: int) -> dict[str, int]:
    """Deal named jobs out to ranks, the longest first to the least loaded rank (ties: the highest
    rank, since rank 0 also packs and writes). Deterministic: every rank computes the same table."""
    load = [0.0] * world_size
    owner: dict[str, int] = {}
    for i in sorted(range(len(names)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], -r))
        owner[names[i]] = rank
        load[rank] += costs[i]
    return owner


def _no_leaf(shard: int) -> Sums | None:
    raise AssertionError(f"shard {shard} was not gathered")
