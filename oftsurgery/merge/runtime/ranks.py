"""The ranks of one merge: `SingleProcess` outside torchrun, `DistributedRanks` inside it.

`open_ranks` gives a `SingleProcess` outside torchrun and a `DistributedRanks` inside it (or inside a
process group the caller initialised); both have the same interface: which rows and shards this
process carries, shard sums added in the fixed tree (`shards.py`), results shared by their owner, a
barrier, and `guard` around the merge (`failures.py`). Rank 0 writes. Why the bytes do not depend on
the number of ranks: docs/distributed.md.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oftsurgery.errors import MergeError, OftSurgeryError, PeerFailedError
from oftsurgery.merge.runtime.failures import CollectiveError, RankFailures, _group_state
from oftsurgery.merge.runtime.shards import (
    SHARDS,
    Node,
    Sums,
    _no_leaf,
    assign_to_ranks,
    rows_of_rank,
    shard_rows,
    shards_of_rank,
    subtrees,
    tree_sum,
)

if TYPE_CHECKING:
    import torch

# How long a rank may wait in one collective: another rank may be solving a large layer or rank 0
# writing a decoder layer meanwhile. A peer that died is noticed long before (store poll, torchrun).
COLLECTIVE_TIMEOUT = timedelta(hours=2)
GATHER_BUDGET = 1 << 26  # elements received per all-gather of partial sums (bounds transient memory)
_POLL_STORE_EVERY = 0.2  # seconds between looks at the store for a failed peer while waiting


# ------------------------------------------------------------------------------------------------
# the two implementations
# ------------------------------------------------------------------------------------------------

class SingleProcess:
    """The whole merge in this process: the same interface as `DistributedRanks`, nothing to send."""

    rank = 0
    world_size = 1
    distributed = False

    def __init__(self, device: str = "cpu", device_error: OftSurgeryError | None = None):
        self.device = device
        self._device_error = device_error

    def check_device(self) -> None:
        """Raise the reason the requested device cannot be used (raised inside `guard`, so that in a
        distributed merge one rank says it, not every rank)."""
        if self._device_error is not None:
            raise self._device_error

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the output (rank 0)."""
        return self.rank == 0

    def local_rows(self, num_rows: int) -> range:
        """The calibration rows this process carries through the model."""
        return rows_of_rank(num_rows, self.rank, self.world_size)

    def local_shards(self, num_rows: int) -> list[range]:
        """The row ranges of this process's non-empty shards (global row numbers), in order."""
        rows = shard_rows(num_rows)
        return [rows[s] for s in shards_of_rank(self.rank, self.world_size) if rows[s]]

    def sum_over_shards(self, num_rows: int, shard_sums: Callable[[range], Sums]) -> Sums:
        """Σ over all calibration rows of per-row quantities, the same bits for any world size.

        `shard_sums(rows)` returns the sums over one shard's rows (global numbers, never empty),
        accumulated in batches within it; this adds the shards in the fixed tree order.
        """
        if num_rows < 1:
            raise ValueError("no calibration rows")
        rows = shard_rows(num_rows)
        mine = shards_of_rank(self.rank, self.world_size)

        def leaf(shard: int) -> Sums | None:
            if shard not in mine:
                raise AssertionError(f"shard {shard} is not on rank {self.rank}")
            return shard_sums(rows[shard]) if rows[shard] else None

        own = {node: tree_sum(node, {}, leaf) for node in subtrees(mine)}
        known = self._gather_subtrees(own, num_rows)
        total = tree_sum((0, SHARDS), known, leaf)
        assert total is not None  # shard 0 holds a row
        return total

    def _gather_subtrees(self, own: dict[Node, Sums | None], num_rows: int) -> dict[Node, Sums | None]:
        return own

    def gather_rows(self, rows: "torch.Tensor") -> "torch.Tensor":
        """Every rank's `rows` [n_rank, ...] stacked in rank order, which is calibration-row order."""
        return rows

    def gather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON-able `obj`, in rank order."""
        return [obj]

    def assign(self, names: Sequence[str], costs: Sequence[float] | None = None) -> dict[str, int]:
        """Which rank solves each named layer (all of them here)."""
        return assign_to_ranks(names, costs or [1.0] * len(names), self.world_size)

    def share(self, owner: int, tensors: dict[str, "torch.Tensor"] | None, info: dict[str, Any] | None,
              ) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
        """The owner's solved tensors and their JSON-able description, on every rank."""
        assert tensors is not None and info is not None
        return tensors, info

    def sync(self) -> None:
        """Wait until every rank got here (raises if one failed instead)."""

    def progress(self, enabled: bool) -> bool:
        """Whether this process shows progress bars."""
        return enabled and self.is_writer

    def track_temporary(self, path: Path) -> None:
        """The temporary output being written (removed again on failure): only atomic_output's job here."""

    @contextmanager
    def guard(self, out: Path) -> Iterator[None]:  # noqa: ARG002
        """Failure handling around one merge: in one process, errors pass through unchanged."""
        yield


class DistributedRanks(RankFailures, SingleProcess):
    """This process as one rank of a torch.distributed process group (gloo or NCCL)."""

    distributed = True
    _merges = 0  # merges started in this process: keys of the store are per merge

    def __init__(self, device: str, device_error: OftSurgeryError | None = None):
        import torch.distributed as dist

        super().__init__(device, device_error)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        backend = str(dist.get_backend()).lower()
        # tensors travel on the device the backend carries: NCCL needs CUDA, gloo prefers the CPU
        self.cpu_capable = "gloo" in backend
        if self.cpu_capable and not ("nccl" in backend and device.startswith("cuda")):
            self.comm_device = "cpu"
        elif "nccl" in backend:
            import torch

            self.comm_device = device if device.startswith("cuda") else f"cuda:{torch.cuda.current_device()}"
        else:
            self.comm_device = device
        DistributedRanks._merges += 1
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self._key_prefix = f"oftsurgery/{restart}/{DistributedRanks._merges}/"
        self._temporary: Path | None = None

    # ---- collectives, each waited for by polling so a failed peer stops us ----------------------

    def _wait(self, work) -> None:
        delay, last_look = 0.0002, time.monotonic()
        try:
            while not work.is_completed():
                time.sleep(delay)
                delay = min(delay * 2, 0.01)
                if time.monotonic() - last_look > _POLL_STORE_EVERY:
                    last_look = time.monotonic()
                    peer = self._posted()
                    if peer is not None and peer["rank"] != self.rank:
                        raise PeerFailedError(peer["rank"], peer["message"], peer["exit_code"])
            work.wait()
        except (PeerFailedError, KeyboardInterrupt):
            raise
        except Exception as exc:  # the transport failed: a peer closed its connections (or died)
            raise CollectiveError(" ".join(str(exc).split())[:200] or type(exc).__name__) from exc

    def _broadcast(self, tensor: "torch.Tensor", src: int) -> None:
        import torch.distributed as dist

        self._wait(dist.broadcast(tensor, src, async_op=True))

    def _all_gather(self, tensor: "torch.Tensor") -> list["torch.Tensor"]:
        import torch
        import torch.distributed as dist

        received = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._wait(dist.all_gather(received, tensor, async_op=True))
        return received

    def sync(self) -> None:
        import torch
        import torch.distributed as dist

        # through gloo where there is one: NCCL would block in C++ until every rank has joined its
        # (lazily made) communicator, where a rank that failed meanwhile could not be noticed
        flag = torch.ones(1, device="cpu" if self.cpu_capable else self.comm_device)
        self._wait(dist.all_reduce(flag, async_op=True))

    def broadcast_json(self, obj: Any, src: int) -> Any:
        """A JSON-able value from rank `src` to every rank (no pickle)."""
        import torch

        data = json.dumps(obj).encode() if self.rank == src else b""
        length = torch.tensor([len(data)], dtype=torch.int64, device=self.comm_device)
        self._broadcast(length, src)
        size = int(length.item())
        buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.comm_device) if self.rank == src
                  else torch.empty(size, dtype=torch.uint8, device=self.comm_device))
        self._broadcast(buffer, src)
        return json.loads(bytes(buffer.cpu().tolist()).decode()) if self.rank != src else obj

    # ---- the pieces of the merge -----------------------------------------------------------------

    def _gather_subtrees(self, own: dict[Node, Sums | None], num_rows: int) -> dict[Node, Sums | None]:
        """Every rank's subtree sums, and then the finished tree's root under the key (0, SHARDS).

        The partial sums travel in chunks of `GATHER_BUDGET` elements and the tree is finished chunk
        by chunk: addition is elementwise, so the bits are those of adding the whole tensors.
        """
        import torch

        rows = shard_rows(num_rows)
        covers = [subtrees(shards_of_rank(r, self.world_size)) for r in range(self.world_size)]
        width = max(len(c) for c in covers)
        has_rows = {node: bool(rows[node[0]]) for cover in covers for node in cover}  # non-empty first
        first = own[covers[0][0]] if self.rank == 0 else None
        layout = self.broadcast_json(
            {k: [str(v.dtype).removeprefix("torch."), list(v.shape), v.device.type] for k, v in first.items()}
            if first is not None else None, src=0)
        root: Sums = {}
        for key, (dtype_name, shape, _) in layout.items():
            dtype = getattr(torch, dtype_name)
            numel = int(torch.Size(shape).numel())
            total = torch.empty(numel, dtype=dtype, device=self.device)
            chunk = max(1, GATHER_BUDGET // (self.world_size * width))
            for start in range(0, numel, chunk):
                stop = min(start + chunk, numel)
                outgoing = torch.zeros(width, stop - start, dtype=dtype, device=self.comm_device)
                for i, node in enumerate(covers[self.rank]):
                    if own[node] is not None:
                        outgoing[i] = own[node][key].reshape(-1)[start:stop].to(self.comm_device)
                received = self._all_gather(outgoing)
                known = {node: ({key: received[r][i].to(self.device)} if has_rows[node] else None)
                         for r, cover in enumerate(covers) for i, node in enumerate(cover)}
                total[start:stop] = tree_sum((0, SHARDS), known, _no_leaf)[key]
            root[key] = total.view(shape)
        return {(0, SHARDS): root}

    def gather_json(self, obj: Any) -> list[Any]:
        import torch

        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        return [json.loads(bytes(part.cpu().tolist()).decode()) for part in self._gather_ragged(data)]

    def _gather_ragged(self, part: "torch.Tensor") -> list["torch.Tensor"]:
        """Every rank's `part` [n_rank, ...] (n may differ per rank), in rank order, on the comm device."""
        import torch

        counts = [int(c.item()) for c in self._all_gather(torch.tensor([part.shape[0]], dtype=torch.int64,
                                                                          device=self.comm_device))]
        width = max(counts)
        padded = torch.zeros((max(width, 1), *part.shape[1:]), dtype=part.dtype, device=self.comm_device)
        padded[: part.shape[0]] = part.to(self.comm_device)
        received = self._all_gather(padded)
        return [received[r][: counts[r]] for r in range(self.world_size)]

    def gather_rows(self, rows: "torch.Tensor") -> "torch.Tensor":
        import torch

        return torch.cat(self._gather_ragged(rows)).to(rows.device)

    def share(self, owner: int, tensors: dict[str, "torch.Tensor"] | None, info: dict[str, Any] | None,
              ) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
        import torch

        mine = self.rank == owner
        if mine:  # a transposed view (codes are often kept input-major) travels as its contiguous base
            flipped = {k: v.dim() == 2 and not v.is_contiguous() and v.T.is_contiguous() for k, v in tensors.items()}
            sent = {k: (v.T if flipped[k] else v).contiguous() for k, v in tensors.items()}
        header = self.broadcast_json(
            {"info": info, "tensors": {k: [str(v.dtype).removeprefix("torch."), list(v.shape), v.device.type, flipped[k]]
                                       for k, v in sent.items()}} if mine else None, src=owner)
        out: dict[str, torch.Tensor] = {}
        for key, (dtype_name, shape, device_type, transposed) in header["tensors"].items():
            buffer = (sent[key].to(self.comm_device) if mine
                      else torch.empty(shape, dtype=getattr(torch, dtype_name), device=self.comm_device))
            self._broadcast(buffer, owner)
            if not mine:  # where the owner kept it (the CPU or this rank's GPU), in its layout
                buffer = buffer.to("cpu" if device_type == "cpu" else self.device)
                out[key] = buffer.T if transposed else buffer
        return (tensors, info) if mine else (out, header["info"])


# ------------------------------------------------------------------------------------------------
# setting up
# ------------------------------------------------------------------------------------------------

def launched_by_torchrun() -> bool:
    """Whether the environment describes a process group to join (torchrun sets these)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def primary_process() -> bool:
    """Whether this process should print results: not a rank other than 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:
        pass
    return os.environ.get("RANK", "0") == "0"


def rank_device(requested: str, local_rank: int = 0, local_world_size: int = 1, *, distributed: bool = False) -> str:
    """The device a rank computes on (`--device auto|cpu|cuda|cuda:N`, resolved by oftsurgery.device).
    In a distributed merge `cuda`, and `auto` on a machine with GPUs, mean this rank's own GPU,
    `cuda:LOCAL_RANK`."""
    import torch

    from oftsurgery.device import AUTO, resolve_device

    if not distributed:
        return str(resolve_device(requested, MergeError))
    text = str(requested or AUTO).strip().lower()
    if text == AUTO:
        text = resolve_device(AUTO, MergeError).type
    if text == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count and local_rank >= count:
            raise MergeError(f"This rank (LOCAL_RANK {local_rank}) computes on cuda:{local_rank}, but this machine has "
                             f"{count} GPU(s); start at most {count} processes per machine.")
        text = f"cuda:{local_rank}" if count else text
    elif text.startswith("cuda:") and local_world_size > 1:
        raise MergeError(f"With {local_world_size} processes per machine pass --device cuda (or auto), not "
                         f"{requested}: each rank uses the GPU numbered by its LOCAL_RANK.")
    return str(resolve_device(text, MergeError))


def _resolve(requested: str, distributed: bool) -> tuple[str, OftSurgeryError | None]:
    """The rank's device, or the CPU and the reason the request fails (raised later, inside `guard`)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        return rank_device(requested, local_rank, local_world, distributed=distributed), None
    except OftSurgeryError as exc:
        return "cpu", exc


@contextmanager
def open_ranks(device: str) -> Iterator[SingleProcess]:
    """The ranks of this merge: the caller's process group if one is initialised, else one set up
    from torchrun's environment (NCCL for CUDA, gloo for the CPU), else a single process."""
    try:
        import torch.distributed as dist
    except ImportError:  # a torch built without distributed support
        dist = None
    if dist is None or not dist.is_available() or not (dist.is_initialized() or launched_by_torchrun()):
        yield SingleProcess(*_resolve(device, distributed=False))
        return
    resolved, error = _resolve(device, distributed=True)
    if not dist.is_initialized():
        _join_group(device, resolved)
    yield DistributedRanks(resolved, error)


def _join_group(requested: str, device: str) -> None:
    """Initialise the default process group from torchrun's environment, for the rest of the process.

    The backend depends only on what was asked and what the machine has, so every rank picks the
    same: gloo for CPU tensors plus NCCL for CUDA tensors when CUDA was asked for and is there
    (NCCL's communicator is made at its first use; a rank whose GPU is missing has failed by then,
    inside `guard`), else gloo alone. Kept, not torn down after the merge: a group initialised again
    in the same process would meet the first one's keys in torchrun's store and hang. It is
    destroyed at exit unless a merge failed (tearing down a group whose peers are gone can block).
    """
    import atexit

    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    gpus = torch.cuda.is_available() and torch.cuda.device_count() > 0
    wants_cuda = str(requested).strip().lower().startswith("cuda") or str(requested).strip().lower() == "auto"
    if wants_cuda and gpus and dist.is_nccl_available():
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=COLLECTIVE_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    _group_state["ours"] = True
    atexit.register(_leave_group)


def _leave_group() -> None:
    import torch.distributed as dist

    if _group_state["ours"] and not _group_state["failed"] and dist.is_initialized():
        dist.destroy_process_group()
