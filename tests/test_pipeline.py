"""The merge's pack-and-write worker: the same bytes as a sequential run, failures raised in order."""

from __future__ import annotations

import threading

import pytest
import torch

from merge_helpers import random_rotations
from oftsurgery.io import CheckpointReader, CheckpointWriter
from oftsurgery.merge import MergeOptions, merge_checkpoint
from oftsurgery.merge.runtime.writer import BackgroundWriter, WorkerFailed


@pytest.mark.parametrize("method", ["rtn", "calibrated"])
def test_background_worker_writes_the_bytes_of_a_sequential_run(method, monkeypatch, tiny_gptq_dir, tmp_path):
    import oftsurgery.merge.engine as engine

    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.03)
    options = MergeOptions(method=method, calib_tokens=512, seq_len=64, progress=False, max_shard_size=150_000)
    merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "pipelined", options)
    monkeypatch.setattr(engine, "PIPELINE_DEPTH", 0)
    merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "sequential", options)
    files = sorted(p.name for p in (tmp_path / "sequential").iterdir() if p.name.endswith((".safetensors", ".json")))
    assert len([f for f in files if f.startswith("model-")]) > 1  # sharded: the order of writes matters
    for name in files:
        if name != "merge_report.json":  # holds timings
            assert (tmp_path / "pipelined" / name).read_bytes() == (tmp_path / "sequential" / name).read_bytes(), name


def test_rtn_merge_of_a_checkpoint_rounds_every_layer_on_its_grid(tiny_gptq_asym_descact_dir, tmp_path):
    """End to end (unpack, rotate, round, pack, write): each merged layer's codes are W·Rᵀ rounded on
    the source grid, computed independently here in float64 with the dense rotation."""
    from oftsurgery.oft.adapter_io import load_rotations
    from oftsurgery.quant.codec import layer_tensors, unpack_layer
    from oftsurgery.quant.config import load_quant_config

    ckpt = tiny_gptq_asym_descact_dir
    rot = random_rotations(ckpt, tmp_path / "r.safetensors", strength=0.05)
    merge_checkpoint(ckpt, rot, tmp_path / "out", MergeOptions(method="rtn", progress=False))
    rotations, qcfg = load_rotations(rot), load_quant_config(ckpt)
    src, out = CheckpointReader(ckpt), CheckpointReader(tmp_path / "out")
    changed = 0
    for prefix, blocks in rotations.blocks.items():
        before = unpack_layer({k: src.get(f"{prefix}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}, qcfg)
        after = unpack_layer({k: out.get(f"{prefix}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}, qcfg)
        dense = torch.block_diag(*blocks.double().unbind(0))
        g = before.g_idx.long()
        s, z = before.scales.double()[g].T, before.zeros.double()[g].T
        exact = (s * (before.codes.double() - z)) @ dense.T / s
        expected = torch.clamp(torch.round(exact) + z, 0, before.maxq)
        tie = (exact - exact.floor() - 0.5).abs() < 1e-4
        assert torch.equal(after.codes.double()[~tie], expected[~tie]), prefix
        assert torch.equal(after.scales, before.scales) and torch.equal(after.zeros, before.zeros), prefix
        changed += int((after.codes != before.codes).sum())
    assert changed > 0


def test_a_failed_job_is_raised_at_the_next_submit_and_later_jobs_do_not_run(tmp_path):
    writer = CheckpointWriter(tmp_path / "out")
    sink = BackgroundWriter(writer)
    ran = []
    done = threading.Event()

    def bad():
        done.set()
        raise ValueError("boom")
        yield  # noqa: unreachable - a generator, like the merge's jobs

    sink.submit("first", lambda: iter([("a", torch.zeros(2))]))
    sink.submit("second", bad)
    done.wait(5)
    with pytest.raises(WorkerFailed) as failed:
        for _ in range(3):
            sink.submit("third", lambda: ran.append(1) or iter(()))
        sink.close()
    assert failed.value.label == "second" and isinstance(failed.value.error, ValueError)
    sink.abort()
    assert ran == []  # jobs after a failure are dropped, not run
    writer.abort()


def test_rtn_reads_each_linear_on_the_read_ahead_thread(monkeypatch, tiny_gptq_dir, tmp_path):
    """In one process the data-free merge reads the next linear's packed tensors and rotation while
    the current one is merged: every targeted linear is read on the read-ahead thread, none on the
    main thread, and the rounding is handed the rotation read there."""
    import oftsurgery.merge.merger as merger
    from oftsurgery.merge.solve import rtn

    reads: list[tuple[str, str]] = []
    original = merger._layer_tensors_on

    def recording(reader, prefix, device):
        reads.append((prefix, threading.current_thread().name))
        return original(reader, prefix, device)

    handed: dict[str, bool] = {}
    real_rtn = rtn.rtn_merge_layer

    def rtn_recording(plan, qw, rotation=None):
        handed[plan.prefix] = rotation is not None and torch.equal(rotation["blocks"], plan.blocks)
        return real_rtn(plan, qw, rotation)

    monkeypatch.setattr(merger, "_layer_tensors_on", recording)
    monkeypatch.setattr(rtn, "rtn_merge_layer", rtn_recording)
    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.03)
    merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "out", MergeOptions(method="rtn", progress=False))
    targeted = {p for p in CheckpointReader(tiny_gptq_dir).tensors if p.endswith(".qweight")}
    assert {f"{prefix}.qweight" for prefix, _ in reads} == targeted
    assert all(thread.startswith("oftsurgery-read") for _, thread in reads), reads
    assert {f"{prefix}.qweight" for prefix in handed} == targeted and all(handed.values()), handed


def test_calibrated_reads_the_next_decoder_layer_ahead_and_queues_a_whole_layer(monkeypatch, tiny_gptq_dir, tmp_path):
    """The calibrated merge reads decoder layer i+1's packed tensors on the read-ahead thread while
    layer i is solved (layer 0's on the main thread: nothing runs before it), and queues a whole
    decoder layer for the writer, so the main thread goes on at once."""
    import oftsurgery.merge.engine as engine
    import oftsurgery.merge.merger as merger

    reads: list[tuple[str, str]] = []
    checks: list[tuple[str, str]] = []  # the runner's self-check reads every layer once more, before the loop
    original, original_float = merger._layer_tensors_on, merger.Merger.source_weight_float
    checking = threading.local()

    def recording(reader, prefix, device):
        (checks if getattr(checking, "on", False) else reads).append((prefix, threading.current_thread().name))
        return original(reader, prefix, device)

    def checked(self, prefix):
        checking.on = True
        try:
            return original_float(self, prefix)
        finally:
            checking.on = False

    depths: list[int] = []
    real_writer = engine.BackgroundWriter

    def writer(sink, depth=1):
        depths.append(depth)
        return real_writer(sink, depth)

    monkeypatch.setattr(merger, "_layer_tensors_on", recording)
    monkeypatch.setattr(merger.Merger, "source_weight_float", checked)
    monkeypatch.setattr(engine, "BackgroundWriter", writer)
    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.03)
    merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "out", MergeOptions(calib_tokens=512, seq_len=64, progress=False))
    assert depths == [engine.CALIBRATED_PIPELINE_DEPTH]
    assert sorted(prefix for prefix, _ in reads) == sorted({p for p, _ in reads}) and len(reads) == 14  # each once
    assert sorted(checks) == sorted((p, threading.main_thread().name) for p, _ in reads)
    for prefix, thread in reads:
        assert thread.startswith("oftsurgery-read") == prefix.startswith("model.layers.1."), (prefix, thread)


def test_close_returns_when_the_worker_thread_is_gone(monkeypatch, tmp_path):
    """A worker that died without a recorded failure must not leave `close` waiting on a full queue."""
    monkeypatch.setattr(BackgroundWriter, "_run", lambda self: None)  # the thread exits at once
    sink = BackgroundWriter(CheckpointWriter(tmp_path / "out"))
    sink._thread.join()
    sink._jobs.put(("stuck", lambda: iter(())))  # the queue (depth 1) is now full
    closer = threading.Thread(target=sink.close, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive()
