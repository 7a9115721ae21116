"""oftsurgery.merge.runtime (ranks, shards, failures): the pieces of a multi-rank merge, in-process and under real gloo groups."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dist_helpers import TESTS, error_lines, torchrun
from dist_worker import calibration_rows, shard_hessians, solved_layer
from oftsurgery.merge.runtime.ranks import SingleProcess
from oftsurgery.merge.runtime.shards import (
    SHARDS,
    assign_to_ranks,
    row_batches,
    rows_of_rank,
    shard_rows,
    shards_of_rank,
    subtrees,
    tree_sum,
)

WORKER = TESTS / "dist_worker.py"


# ---- the partition of rows and shards ----------------------------------------------------------

@pytest.mark.parametrize("num_rows", [1, 3, 8, 13, 64])
def test_shards_cover_the_rows_once_in_order_nonempty_first(num_rows):
    rows = shard_rows(num_rows)
    assert len(rows) == SHARDS
    assert [i for r in rows for i in r] == list(range(num_rows))
    sizes = [len(r) for r in rows]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("world_size", range(1, 17))
def test_ranks_own_contiguous_shards_and_their_subtrees_tile_the_tree(world_size):
    owned = [shards_of_rank(r, world_size) for r in range(world_size)]
    assert [s for run in owned for s in run] == list(range(SHARDS))
    assert 0 in owned[0]
    nodes = [n for r in range(world_size) for n in subtrees(owned[r])]
    leaves = sorted(s for lo, hi in nodes for s in range(lo, hi))
    assert leaves == list(range(SHARDS))  # disjoint and complete
    for lo, hi in nodes:  # each a whole subtree of the binary tree over 8 shards
        size = hi - lo
        assert size & (size - 1) == 0 and lo % size == 0
    for r in range(world_size):
        if world_size in (1, 2, 4, 8):
            assert len(subtrees(owned[r])) == 1  # powers of two: one partial sum per rank


def test_rows_of_a_rank_are_those_of_its_shards():
    for world_size in (1, 2, 3, 5, 8, 11):
        for num_rows in (1, 7, 13, 40):
            rows = shard_rows(num_rows)
            for r in range(world_size):
                expected = [i for s in shards_of_rank(r, world_size) for i in rows[s]]
                assert list(rows_of_rank(num_rows, r, world_size)) == expected


def test_batches_stay_inside_their_shard():
    for shard in shard_rows(29):
        batches = row_batches(shard, 3)
        assert [i for b in batches for i in b] == list(shard)
        assert all(len(b) <= 3 for b in batches)


# ---- the tree: the same bits for any world size ------------------------------------------------

def _simulated_ranks_sum(x, world_size, batch):
    """What the ranks compute, without processes: each its subtrees, then the finished tree."""
    rows = shard_rows(x.shape[0])
    known = {}
    for r in range(world_size):
        mine = shards_of_rank(r, world_size)
        leaf = lambda s: shard_hessians(x, rows[s], batch) if rows[s] else None  # noqa: E731
        for node in subtrees(mine):
            known[node] = tree_sum(node, {}, leaf)
    return tree_sum((0, SHARDS), known, lambda s: pytest.fail(f"shard {s} not gathered"))


@pytest.mark.parametrize("num_rows", [3, 13, 40])
def test_tree_sum_has_the_same_bits_for_every_world_size_and_matches_float64(num_rows):
    x = calibration_rows(num_rows)
    single = SingleProcess().sum_over_shards(num_rows, lambda rows: shard_hessians(x, rows, 2))
    for world_size in range(1, 13):
        ranks_sum = _simulated_ranks_sum(x, world_size, 2)
        for key in single:
            assert torch.equal(ranks_sum[key], single[key]), (world_size, key)
    flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
    reference = flat.T @ flat  # independent: one float64 product, no shards
    torch.testing.assert_close(single["h64"], reference, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(single["h32"].double(), reference, rtol=1e-5, atol=1e-2)


def test_the_summation_order_shows_in_these_bits():
    """The data is chosen so that another order (one running sum) gives other bits: the tests above
    would notice a rank adding in its own order."""
    x = calibration_rows(13)
    single = SingleProcess().sum_over_shards(13, lambda rows: shard_hessians(x, rows, 2))
    running = shard_hessians(x, range(13), 2)
    assert not torch.equal(running["h32"], single["h32"])


# ---- dealing layers out ------------------------------------------------------------------------

def test_assignment_balances_costs_and_is_deterministic():
    names = [f"l{i}" for i in range(11)]
    costs = [9, 1, 4, 4, 7, 2, 2, 8, 1, 3, 5]
    for world_size in (1, 2, 3, 4, 8, 16):
        owners = assign_to_ranks(names, costs, world_size)
        assert owners == assign_to_ranks(names, costs, world_size)
        assert set(owners) == set(names) and all(0 <= r < world_size for r in owners.values())
        load = [sum(c for n, c in zip(names, costs) if owners[n] == r) for r in range(world_size)]
        # longest-first greedy: within the largest job of the ideal share
        assert max(load) <= sum(costs) / world_size + max(costs)
        if world_size >= len(names):
            assert len(set(owners.values())) == len(names)  # one job each
    assert SingleProcess().assign(names, costs) == {n: 0 for n in names}


# ---- under torchrun with gloo ------------------------------------------------------------------

ROW_COUNTS = (13, 5)  # 5 rows: with 3 ranks, rank 2's shards are all empty


@pytest.fixture(scope="module")
def pieces_run(tmp_path_factory):
    """One torchrun launch (3 ranks: uneven shards, partial sums padded, a rank without rows) runs
    every piece; the tests below read what each rank got. The 13-row sums travel in chunks of 7
    elements. Other world sizes: simulated above, and 2 ranks in test_merge_distributed."""
    out = tmp_path_factory.mktemp("pieces")
    result = torchrun(3, [WORKER, "pieces", out, *ROW_COUNTS])
    assert result.returncode == 0, result.stderr[-3000:]
    return 3, out


@pytest.mark.parametrize("num_rows", ROW_COUNTS)
def test_hessian_across_ranks_has_the_single_process_bits(pieces_run, num_rows):
    nproc, out = pieces_run
    x = calibration_rows(num_rows)
    single = SingleProcess().sum_over_shards(num_rows, lambda rows: shard_hessians(x, rows, 2))
    carried = []
    for rank in range(nproc):
        got = load_file(str(out / f"hessian-{num_rows}-rank{rank}.safetensors"))
        assert got.keys() == single.keys()
        for key in single:
            assert torch.equal(got[key], single[key]), (rank, key)
        info = json.loads((out / f"rows-{num_rows}-rank{rank}.json").read_text())
        assert info["world_size"] == nproc
        carried.extend(range(*info["rows"]))
    assert carried == list(range(num_rows))  # every row carried by exactly one rank


def test_solved_layers_reach_every_rank_from_their_owner(pieces_run):
    nproc, out = pieces_run
    tables = [json.loads((out / f"owners-rank{r}.json").read_text()) for r in range(nproc)]
    owners = tables[0]["owners"]
    assert all(t["owners"] == owners for t in tables)
    assert len(set(owners.values())) == nproc  # the work was spread
    for rank, table in enumerate(tables):
        assert sorted(table["solved"]) == sorted(n for n in owners if owners[n] == rank)
    for rank in range(nproc):
        got = load_file(str(out / f"shared-rank{rank}.safetensors"))
        for name in owners:
            for key, expected in solved_layer(name).items():
                tensor = got[f"{name}.{key}"]
                assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), (rank, name, key)


@pytest.mark.parametrize("nproc,failing,where", [(2, 0, "compute"), (3, 2, "collective")],
                         ids=["rank0-the-writer-fails", "rank2-fails-while-the-others-compute"])
def test_a_failure_on_one_rank_ends_all_with_one_message_and_nothing_written(nproc, failing, where, tmp_path):
    """The writer failing; and a rank failing while the others compute, so that only torchrun's
    SIGTERM stops them (rank 0 must still remove its temporary folder). A rank failing while the
    writer waits in a collective: test_merge_distributed."""
    result = torchrun(nproc, [WORKER, "fail", tmp_path, failing, where], timeout=300)
    assert result.returncode != 0
    errors = error_lines(result)
    prefix = "" if failing == 0 else f"Rank {failing} of {nproc}: "
    assert errors == [f"Error: {prefix}The merge failed at layer 3 (RuntimeError: injected on rank {failing}); "
                      "nothing was written."], result.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder
