"""The memory tracker of bench/solve_memory.py counts what it should, and agrees with the peak formula's
terms on small measured cases (docs/performance.md, "Peak memory"). No thresholds: agreement only."""

from __future__ import annotations

import pytest
import torch

from oftsurgery.merge.solve import factor, requant
from oftsurgery.merge.solve.hessian import InputHessian
from oftsurgery.testing.memory import LiveBytes, instrument, predict_peak


def test_live_bytes_counts_storages_once_and_forgets_freed_ones():
    tracker = LiveBytes()
    with tracker:
        a = torch.empty(1000)  # 4000 bytes
        view = a[10:]  # the same storage: not counted again
        b = torch.zeros(500, dtype=torch.float64)  # 4000 bytes
        assert tracker.live == 8000
        del a, b
        assert tracker.live == 4000  # the view keeps a's storage alive
        del view
        assert tracker.live == 0
    assert tracker.peak == 8000


def test_labels_record_the_peak_of_the_work_they_name():
    tracker = LiveBytes()

    def work():
        torch.empty(250)  # 1000 bytes, freed at once
        return torch.empty(100)

    undo = instrument(tracker, __import__(__name__, fromlist=["_"]), "_inner", "inner")
    try:
        with tracker:
            kept = _inner(work)
            with tracker.label("outer"):
                torch.empty(2000)
    finally:
        undo()
    assert tracker.stage_peak["inner"] == 1000 and kept.numel() == 100  # the 1000 bytes are gone before the 400
    assert tracker.stage_peak["outer"] == 400 + 8000
    assert tracker.peak_stack == ("outer",)


def _inner(fn):
    return fn()


@pytest.mark.parametrize("blocks", [False, True])
def test_the_gptq_factor_holds_two_float64_copies_of_h_as_the_formula_says(monkeypatch, blocks):
    n = 384
    chunk = 0
    if blocks:  # the triangular inverse by blocks, as at real widths: its corner products add two chunks
        monkeypatch.setattr(factor, "TRIANGLE_BASE", 64)
        monkeypatch.setattr(factor, "TRIANGLE_CHUNK", chunk := 64 * 48)
    x = torch.randn(2 * n, n, generator=torch.Generator().manual_seed(0))
    hessian = InputHessian.from_matrix(x.T @ x)
    tracker = LiveBytes()
    with tracker:
        before = tracker.live
        requant._gptq_factor(hessian, requant.DAMP, True, torch.float32)
    extra = tracker.peak - before
    # the formula's factor term is 16·n² above the group's problem (two float64 in×in matrices);
    # the rest is O(n) (the permutation, the diagonal, the info flags) and the triangular inverse's
    # temporaries: one diagonal block's solve and two chunks of its corner products
    block = min(n, factor.TRIANGLE_BASE)
    assert 16 * n * n <= extra <= 16 * n * n + 64 * n + 8 * block * block + 2 * 8 * chunk


def test_the_formula_is_the_base_plus_the_largest_group_stage():
    detail = predict_peak(1024, 3584, 896, 128, kv=128, detail=True)
    assert detail["peak"] == max(v for k, v in detail.items() if k not in ("peak", "base"))
    assert predict_peak(1024, 3584, 896, 128, kv=128) == detail["peak"]


def test_the_cli_defaults_the_cuda_allocator_to_expandable_segments_but_keeps_a_users_setting():
    from oftsurgery.cli.app import default_cuda_allocator

    for environ, expected in (({}, "expandable_segments:True"),
                              ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, "max_split_size_mb:128"),
                              ({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}, None)):
        default_cuda_allocator(environ)
        assert environ.get("PYTORCH_CUDA_ALLOC_CONF") == expected
