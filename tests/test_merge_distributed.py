"""`torchrun … -m oftsurgery merge`: the same bytes as one process, and failures that leave nothing.

Workers run with gloo on the CPU and one thread each (torchrun's default); the single-process
reference runs with one thread too, since the float results of a matrix product may depend on it.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager

import pytest
import torch

from dist_helpers import TESTS, error_lines, torchrun, worker_env
from merge_helpers import all_tensors, assert_bytes_equal, random_rotations
from oftsurgery.merge import MergeOptions, merge_checkpoint


@contextmanager
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _merge_args(ckpt, rot, out, calib_tokens, method="calibrated"):
    return ["-m", "oftsurgery", "merge", ckpt, rot, "--out", out, "--method", method,
            "--calib-tokens", calib_tokens, "--seq-len", 32, "--calib", "builtin:code", "-q"]


def _single(ckpt, rot, out, calib_tokens, method="calibrated"):
    with one_thread():
        return merge_checkpoint(ckpt, rot, out, MergeOptions(method=method, calib="builtin:code",
                                                             calib_tokens=calib_tokens, seq_len=32, progress=False))


def _assert_same_checkpoint(single_dir, dist_dir):
    single, dist = all_tensors(single_dir), all_tensors(dist_dir)
    assert single.keys() == dist.keys()
    for name in single:
        assert_bytes_equal(single[name], dist[name], name)
    for config in ("config.json", "quantize_config.json"):
        if (single_dir / config).exists():
            assert (single_dir / config).read_bytes() == (dist_dir / config).read_bytes(), config


def _assert_same_report(report: dict, single, nproc: int) -> None:
    assert report["world_size"] == nproc and single.world_size == 1
    assert [l["name"] for l in report["layers"]] == [l.name for l in single.layers]
    assert {l["rank"] for l in report["layers"]} == set(range(nproc))  # every rank solved some
    for got, expected in zip(report["layers"], single.layers):
        for key in ("mode", "codes_changed", "scales_changed", "residual_before", "residual_after"):
            assert got[key] == getattr(expected, key), (got["name"], key)


def test_torchrun_merge_writes_the_single_process_bytes(tiny_gptq_dir, tmp_path):
    """`torchrun --standalone --nproc-per-node 2 -m oftsurgery merge …`, calibrated: 16 calibration
    rows, 8 per rank; every layer group dealt out to both ranks."""
    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.05)
    single = _single(tiny_gptq_dir, rot, tmp_path / "single", 512)
    assert single.codes_changed > 0  # the merge did something the ranks must reproduce

    result = torchrun(2, _merge_args(tiny_gptq_dir, rot, tmp_path / "dist", 512), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert error_lines(result) == []
    assert result.stdout.count("wrote ") == 1  # rank 0 alone reports (and writes)
    _assert_same_checkpoint(tmp_path / "single", tmp_path / "dist")
    _assert_same_report(json.loads((tmp_path / "dist" / "merge_report.json").read_text()), single, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "r.safetensors", "single"]


def test_python_api_in_a_process_group_the_caller_initialised(tiny_awq_dir, tiny_gptq_dir, tmp_path):
    """Three ranks call merge_checkpoint inside their own gloo group, three times: a calibrated AWQ
    merge on 5 calibration rows (rank 2 carries none: 8 shards over 3 ranks), a calibrated MoE merge
    (Qwen3-MoE: each rank finds the experts its own rows are routed to, and the experts are dealt
    out) and an rtn GPTQ merge."""
    from oftsurgery.testing.models import tiny_gptq

    jobs = []
    for name, ckpt, method, tokens in (("awq", tiny_awq_dir, "calibrated", 160),
                                       ("moe", tiny_gptq("qwen3_moe"), "calibrated", 384),
                                       ("rtn", tiny_gptq_dir, "rtn", 512)):
        rot = random_rotations(ckpt, tmp_path / f"{name}.safetensors", strength=0.05)
        jobs.append({"name": name, "checkpoint": str(ckpt), "adapter": str(rot), "method": method,
                     "calib_tokens": tokens})
    result = torchrun(3, [TESTS / "dist_worker.py", "api-merges", tmp_path / "dist", json.dumps(jobs)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    for job in jobs:
        single = _single(job["checkpoint"], job["adapter"], tmp_path / f"single-{job['name']}", job["calib_tokens"],
                         job["method"])
        assert single.codes_changed > 0
        _assert_same_checkpoint(tmp_path / f"single-{job['name']}", tmp_path / "dist" / job["name"])
        reports = [json.loads((tmp_path / "dist" / f"{job['name']}-report-rank{r}.json").read_text()) for r in range(3)]
        written = json.loads((tmp_path / "dist" / job["name"] / "merge_report.json").read_text())
        for report in reports:  # every rank returns the report rank 0 wrote
            assert report["layers"] == written["layers"]
            _assert_same_report(report, single, 3)


FAILING_HOOK = '''
import os
if os.environ.get("RANK") is not None and os.environ.get("RANK") == os.environ.get("TEST_FAIL_RANK"):
    import oftsurgery.merge.merger as merger
    real = merger.requantize_layer

    def requantize_layer(plan, *args, **kwargs):
        if plan.prefix.startswith(os.environ["TEST_FAIL_UNDER"]):
            raise RuntimeError("injected failure")
        return real(plan, *args, **kwargs)

    merger.requantize_layer = requantize_layer
'''


def test_a_failure_on_rank_1_ends_every_rank_with_one_message_and_nothing_written(tiny_gptq_dir, tmp_path):
    """Rank 1 raises while solving a layer of decoder layer 1 (rank 0, the writer, has written
    decoder layer 0 to its temporary folder by then): one line, non-zero exit, nothing left."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(FAILING_HOOK)  # test-only: patches the engine in rank 1
    work = tmp_path / "work"
    work.mkdir()
    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.05)
    env = worker_env(TEST_FAIL_RANK="1", TEST_FAIL_UNDER="model.layers.1.")
    env["PYTHONPATH"] = f"{hooks}:{env['PYTHONPATH']}"
    out = work / "merged"
    result = torchrun(2, _merge_args(tiny_gptq_dir, rot, out, 512), env=env, cwd=tmp_path)
    assert result.returncode != 0
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr[-4000:]
    assert re.fullmatch(
        rf"Error: Rank 1 of 2: The merge failed at model\.layers\.1\.\S+ \(RuntimeError: injected failure\); "
        rf"nothing was written to {re.escape(str(out.resolve()))}\.", errors[0]), errors[0]
    assert "Traceback" not in "\n".join(l for l in result.stderr.splitlines() if l.startswith("[rank"))
    assert list(work.iterdir()) == []  # no output and no temporary folder
