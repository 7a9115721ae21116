"""Checkpoint I/O: streaming reads, sharded writes, validation of broken inputs, atomic outputs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from oftsurgery.errors import InvalidCheckpointError, OutputPathError, UnsupportedFormatError
from oftsurgery.io import CheckpointReader, CheckpointWriter, atomic_output, check_output_path, copy_side_files


def _tensors(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.w": torch.randn(64, 32 + i, generator=g).to(torch.float16) for i in range(n)
    } | {"model.q.qweight": torch.randint(-(2**31), 2**31 - 1, (8, 64), dtype=torch.int32, generator=g)}


def _write_checkpoint(path, tensors, max_shard_size):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "tokenizer.json").write_text("{}")
    writer = CheckpointWriter(path, max_shard_size=max_shard_size)
    for name, t in tensors.items():
        writer.add(name, t)
    return writer.close()


@pytest.mark.parametrize("max_shard_size", [10**9, 6000])
def test_write_then_read_round_trip(tmp_path, max_shard_size):
    tensors = _tensors()
    files = _write_checkpoint(tmp_path / "ckpt", tensors, max_shard_size)
    reader = CheckpointReader(tmp_path / "ckpt")
    assert sorted(reader.names()) == sorted(tensors)
    for name, t in tensors.items():
        got = reader.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
    if max_shard_size == 6000:
        assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert set(index["weight_map"]) == set(tensors)
    else:
        assert files == ["model.safetensors"]
    for file in files:  # transformers refuses shards without {"format": "pt"}
        with safe_open(str(tmp_path / "ckpt" / file), "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
    assert [p.name for p in reader.side_files()] == ["config.json", "tokenizer.json"]
    assert reader.total_size == sum(t.numel() * t.element_size() for t in tensors.values())


def test_iter_tensors_yields_everything_once(tmp_path):
    tensors = _tensors()
    _write_checkpoint(tmp_path / "ckpt", tensors, 6000)
    seen = dict(CheckpointReader(tmp_path / "ckpt").iter_tensors())
    assert seen.keys() == tensors.keys()


def test_truncated_shard_is_reported_before_reading(tmp_path):
    _write_checkpoint(tmp_path / "ckpt", _tensors(), 10**9)
    f = tmp_path / "ckpt" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(InvalidCheckpointError, match="truncated"):
        CheckpointReader(tmp_path / "ckpt")


def test_garbage_file_is_reported(tmp_path):
    _write_checkpoint(tmp_path / "ckpt", _tensors(), 10**9)
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(InvalidCheckpointError):
        CheckpointReader(tmp_path / "ckpt")


def test_index_naming_a_missing_shard_is_reported(tmp_path):
    files = _write_checkpoint(tmp_path / "ckpt", _tensors(), 6000)
    (tmp_path / "ckpt" / files[-1]).unlink()
    with pytest.raises(InvalidCheckpointError, match="missing"):
        CheckpointReader(tmp_path / "ckpt")


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UnsupportedFormatError, match="pickle"):
        CheckpointReader(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(InvalidCheckpointError, match="config.json"):
        CheckpointReader(tmp_path)
    with pytest.raises(InvalidCheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")


def test_atomic_output_appears_only_on_success(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # temp dir removed too
    with atomic_output(out) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (out / "done.txt").read_text() == "ok"
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_output_refuses_existing_and_overwrites_on_request(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputPathError, match="--overwrite"):
        with atomic_output(out):
            pass
    with pytest.raises(OutputPathError, match="not written by oftsurgery|holds neither"):
        with atomic_output(out, overwrite=True):
            pass
    assert sorted(os.listdir(out)) == ["old.txt"]  # not ours: kept
    (out / "merge_report.json").write_text(json.dumps({"checkpoint": "c", "adapter": "a", "method": "rtn"}))
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(out)) == ["new.txt"]
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_output_single_file(tmp_path):
    with atomic_output(tmp_path / "rot.safetensors", is_file=True) as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp))
    assert (tmp_path / "rot.safetensors").is_file()
    assert os.listdir(tmp_path) == ["rot.safetensors"]


def test_check_output_path(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(OutputPathError, match="inside the input"):
        check_output_path(src / "merged", [src])
    with pytest.raises(OutputPathError, match="contains the input"):
        check_output_path(tmp_path, [src], overwrite=True)
    with pytest.raises(OutputPathError, match="already exists"):
        check_output_path(src, [])
    assert check_output_path(tmp_path / "new", [src]) == (tmp_path / "new").resolve()


def test_copy_side_files_skips_what_the_writer_rewrites(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ["config.json", "tokenizer.json", "generation_config.json", "README.md"]:
        (src / name).write_text(name)
    out = tmp_path / "out"
    out.mkdir()
    copied = copy_side_files(sorted(src.iterdir()), out)
    assert sorted(copied) == ["generation_config.json", "tokenizer.json"]
