"""Scenarios run under `torchrun` by tests/test_distributed.py: `dist_worker.py SCENARIO OUTDIR [ARGS]`.

Every rank builds the same inputs from fixed seeds, runs one piece of oftsurgery.merge.runtime
through `open_ranks` (so the process group comes from torchrun's environment), and writes what it
got to OUTDIR for the test to compare with a single-process run and with independent references.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from oftsurgery.errors import MergeError, OftSurgeryError
from oftsurgery.io import atomic_output
from oftsurgery.merge.runtime.ranks import open_ranks
from oftsurgery.merge.runtime.shards import row_batches


def calibration_rows(num_rows: int, seq: int = 5, width: int = 24) -> torch.Tensor:
    """Activations for `num_rows` rows, with magnitudes spread so that summation order shows in the bits."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(num_rows, seq, width, generator=g) * torch.logspace(-3, 3, width)
    return x


def shard_hessians(x: torch.Tensor, rows: range, batch: int) -> dict[str, torch.Tensor]:
    """Σ xᵀx over `rows`, accumulated batch by batch within the shard (as the engine does)."""
    sums: dict[str, torch.Tensor] = {}
    for b in row_batches(rows, batch):
        flat = x[b.start:b.stop].reshape(-1, x.shape[-1])
        for name, dtype in (("h64", torch.float64), ("h32", torch.float32)):
            part = flat.to(dtype).T @ flat.to(dtype)
            sums[name] = sums[name] + part if name in sums else part
    return sums


def hessian(out: Path, num_rows: int, batch: int, gather_budget: int | None = None) -> None:
    from oftsurgery.merge.runtime import ranks as runtime_ranks

    x = calibration_rows(num_rows)
    if gather_budget is not None:  # partial sums then travel in many small chunks
        runtime_ranks.GATHER_BUDGET = gather_budget
    with open_ranks("cpu") as ranks:
        mine = ranks.local_rows(num_rows)
        local = x[mine.start:mine.stop]  # each rank holds only its own rows, as in a merge
        result = ranks.sum_over_shards(
            num_rows, lambda rows: shard_hessians(local, range(rows.start - mine.start, rows.stop - mine.start), batch))
        save_file(result, str(out / f"hessian-{num_rows}-rank{ranks.rank}.safetensors"))
        (out / f"rows-{num_rows}-rank{ranks.rank}.json").write_text(json.dumps(
            {"rows": [mine.start, mine.stop], "shards": [[r.start, r.stop] for r in ranks.local_shards(num_rows)],
             "world_size": ranks.world_size}))


def solved_layer(name: str) -> dict[str, torch.Tensor]:
    """What "solving" layer `name` yields: tensors of the dtypes a requantized layer has."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return {"codes": torch.randint(0, 16, (6, 8), generator=g, dtype=torch.int32),
            "scales": torch.rand(2, 6, generator=g).to(torch.float16),
            "zeros": torch.randint(0, 16, (2, 6), generator=g, dtype=torch.int32)}


def share(out: Path) -> None:
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "experts.0.up", "experts.1.up", "experts.2.up"]
    costs = [4.0, 1.0, 1.0, 4.0, 2.0, 2.0, 2.0]
    with open_ranks("cpu") as ranks:
        owners = ranks.assign(names, costs)
        received, solved_here = {}, []
        for name in names:
            mine = owners[name] == ranks.rank
            if mine:
                solved_here.append(name)
            tensors, info = ranks.share(owners[name], solved_layer(name) if mine else None,
                                        {"name": name, "by": ranks.rank, "figure": 0.1 + 1e-17} if mine else None)
            assert info["name"] == name and info["by"] == owners[name], info
            received[name] = tensors
        save_file({f"{n}.{k}": v for n, t in received.items() for k, v in t.items()},
                  str(out / f"shared-rank{ranks.rank}.safetensors"))
        (out / f"owners-rank{ranks.rank}.json").write_text(json.dumps({"owners": owners, "solved": solved_here}))


def fail(out: Path, failing_rank: int, where: str) -> None:
    """Rank 0 writes `out/result` through atomic_output; `failing_rank` raises at `where`: 'compute'
    (while the others wait in a collective) or 'collective' (the others are busy)."""
    target = out / "result"
    with open_ranks("cpu") as ranks, ranks.guard(target):
        ranks.sync()
        if ranks.is_writer:
            with atomic_output(target) as tmp:
                ranks.track_temporary(tmp)
                (tmp / "part.txt").write_text("half written")
                _step(ranks, failing_rank, where)
        else:
            _step(ranks, failing_rank, where)


def _step(ranks, failing_rank: int, where: str) -> None:
    import time

    if ranks.rank == failing_rank:
        if where == "collective":
            time.sleep(1.0)  # the others are computing (sleeping) when this fails
        raise MergeError(f"The merge failed at layer 3 (RuntimeError: injected on rank {ranks.rank}); "
                         "nothing was written.")
    if where == "collective":
        time.sleep(60)  # torchrun's SIGTERM ends this
    ranks.sync()  # waits for the failing rank, which never comes
    time.sleep(60)


def api_merges(out: Path, jobs: list[dict]) -> None:
    """The Python API inside a process group the caller initialised: every rank calls merge_checkpoint."""
    import torch.distributed as dist

    from oftsurgery.merge import MergeOptions, merge_checkpoint

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for job in jobs:
        options = MergeOptions(method=job["method"], calib="builtin:code", calib_tokens=job["calib_tokens"],
                               seq_len=32, progress=False)
        report = merge_checkpoint(job["checkpoint"], job["adapter"], out / job["name"], options)
        (out / f"{job['name']}-report-rank{rank}.json").write_text(json.dumps(report.to_dict()))
    dist.destroy_process_group()


def _terminate(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt  # as the CLI does: torchrun's SIGTERM runs the cleanup


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    scenario, out = sys.argv[1], Path(sys.argv[2])
    args = sys.argv[3:]
    try:
        if scenario == "pieces":  # one launch for several checks: starting workers is the slow part
            for num_rows in map(int, args):
                hessian(out, num_rows, batch=2, gather_budget=7 if num_rows == int(args[0]) else None)
            share(out)
        elif scenario == "api-merges":
            api_merges(out, json.loads(args[0]))
        elif scenario == "fail":
            fail(out, int(args[0]), args[1])
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    except OftSurgeryError as exc:  # what the CLI does with it
        if not getattr(exc, "quiet", False):
            print(f"Error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
