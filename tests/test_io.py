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


# ---- the streaming shard writer ------------------------------------------------------------------


def _mixed_tensors(seed=0):
    """Every dtype a checkpoint holds, odd byte sizes (they test alignment), a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    return {
        "a.qweight": torch.randint(-(2**31), 2**31 - 1, (16, 64), dtype=torch.int32, generator=g),
        "a.odd_f16": torch.randn(7, generator=g).half(),  # 14 bytes
        "a.scales": torch.randn(3, 64, generator=g).half(),
        "b.byte": torch.randint(0, 255, (5,), dtype=torch.uint8, generator=g),  # 5 bytes
        "b.bf16": torch.randn(33, 8, generator=g).bfloat16(),
        "b.f64": torch.randn(3, generator=g).double(),
        "b.f32_odd": torch.randn(3, generator=g),  # 12 bytes
        "b.i64": torch.arange(5, dtype=torch.int64),
        "b.mask": torch.tensor([True, False, True]),
        "c.scalar": torch.tensor(3.5),
        "c.empty": torch.zeros(0, 4),
        "c.g_idx": torch.arange(64, dtype=torch.int32) // 32,
    }


def _raw_layout(path):
    """(header length, header) of a safetensors file, read by hand."""
    import struct

    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return n, json.loads(fh.read(n))


@pytest.mark.parametrize("max_shard_size", [10**9, 600, 5 * 1024**3])
def test_streamed_shards_read_back_byte_identical_in_safetensors(tmp_path, max_shard_size):
    from safetensors.torch import load_file

    tensors = _mixed_tensors()
    files = _write_checkpoint(tmp_path / "ckpt", tensors, max_shard_size)
    found = {}
    for file in files:
        path = tmp_path / "ckpt" / file
        n, header = _raw_layout(path)
        assert header.pop("__metadata__") == {"format": "pt"}
        assert n % 8 == 0  # the data starts on an 8-byte boundary...
        spans = sorted(tuple(e["data_offsets"]) for e in header.values())
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # ...no holes...
        assert spans[-1][1] == path.stat().st_size - 8 - n
        for name, entry in header.items():  # ...and every tensor is aligned to its element size
            size = {"F64": 8, "I64": 8, "I32": 4, "F32": 4, "F16": 2, "BF16": 2}.get(entry["dtype"], 1)
            assert (8 + n + entry["data_offsets"][0]) % size == 0, name
        with safe_open(str(path), "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            for name in fh.keys():
                found[name] = fh.get_tensor(name)
        assert load_file(str(path)).keys() == {k for k in header}
    assert found.keys() == tensors.keys()
    for name, t in tensors.items():
        assert found[name].dtype == t.dtype and found[name].shape == t.shape, name
        assert found[name].reshape(-1).view(torch.uint8).tolist() == t.reshape(-1).view(torch.uint8).tolist(), name
    if max_shard_size == 600:
        assert len(files) > 2
        index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert {index["weight_map"][n] for n in tensors} == set(files)
    # our reader agrees, through its own byte ranges
    reader = CheckpointReader(tmp_path / "ckpt")
    for name, t in tensors.items():
        assert torch.equal(reader.get(name).view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_header_room_overflow_and_padding(tmp_path):
    """More tensors than the reserved header room holds (the data is moved once behind an exact
    header), and a big shard whose unused room stays as trailing spaces in the header."""
    from oftsurgery.io.writer import header_room

    many = {f"model.layers.{i}.mlp.gate_proj.qweight": torch.full((2,), i, dtype=torch.int32) for i in range(900)}
    writer = CheckpointWriter(tmp_path / "many", max_shard_size=10**6)
    assert header_room(10**6) == 64 * 1024
    for name, t in many.items():
        writer.add(name, t)
    assert writer.close() == ["model.safetensors"]
    n, header = _raw_layout(tmp_path / "many" / "model.safetensors")
    assert n > 64 * 1024 and len(header) == 901
    with safe_open(str(tmp_path / "many" / "model.safetensors"), "pt") as fh:
        assert all(torch.equal(fh.get_tensor(k), t) for k, t in many.items())

    big = torch.randint(-(2**31), 2**31 - 1, (1024, 1024), dtype=torch.int32)  # 4 MiB: the room stays
    writer = CheckpointWriter(tmp_path / "big", max_shard_size=256 * 1024**2)
    writer.add("w", big)
    writer.close()
    n, header = _raw_layout(tmp_path / "big" / "model.safetensors")
    assert n == header_room(256 * 1024**2) and (tmp_path / "big" / "model.safetensors").read_bytes()[8 + n - 1] == 32
    with safe_open(str(tmp_path / "big" / "model.safetensors"), "pt") as fh:
        assert torch.equal(fh.get_tensor("w"), big)


def test_file_ranges_are_copied_without_loading(tmp_path):
    """add_file_range + CheckpointReader.locate: a tensor's stored bytes copied file to file."""
    tensors = _mixed_tensors(seed=1)
    _write_checkpoint(tmp_path / "src", tensors, 10**9)
    reader = CheckpointReader(tmp_path / "src")
    writer = CheckpointWriter(tmp_path / "copy", max_shard_size=700)
    for name in tensors:
        path, offset, nbytes = reader.locate(name)
        info = reader.tensors[name]
        writer.add_file_range(name, info.dtype, info.shape, path, offset, nbytes)
    writer.close()
    (tmp_path / "copy" / "config.json").write_text("{}")
    copy = CheckpointReader(tmp_path / "copy")
    for name, t in tensors.items():
        got = copy.get(name)
        assert got.dtype == t.dtype and torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_a_tensor_is_written_when_added_not_at_close(tmp_path):
    """Streaming: the shard file grows as tensors arrive (nothing is buffered up to the shard size)."""
    writer = CheckpointWriter(tmp_path / "out", max_shard_size=10**9)
    writer.add("a", torch.zeros(1024, 1024, dtype=torch.int32))
    part = tmp_path / "out" / "part-0.safetensors"
    assert part.stat().st_size >= 4 * 1024**2
    writer.add("b", torch.ones(1024, 1024, dtype=torch.int32))
    assert part.stat().st_size >= 8 * 1024**2
    writer.close()


def test_reader_is_safe_to_share_between_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    tensors = _tensors(n=12)
    _write_checkpoint(tmp_path / "ckpt", tensors, 5000)
    reader = CheckpointReader(tmp_path / "ckpt")
    names = list(tensors) * 8
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(reader.get, names))
    assert all(torch.equal(g, tensors[n]) for g, n in zip(got, names))


# -- the final move: never clobber, swap on --overwrite, clean up after dead runs -----------------------

@pytest.fixture(params=["kernel", "fallback"])
def rename_mode(request, monkeypatch):
    """Run a test with the kernel's no-replace / exchange renames, and with the portable fallbacks."""
    if request.param == "fallback":
        import oftsurgery.io.rename as rename

        def unsupported(*args, **kwargs):
            raise rename.RenameUnsupported

        monkeypatch.setattr(rename, "_kernel_rename", unsupported)
    return request.param


def _ours(folder, text="old"):
    folder.mkdir()
    (folder / "merge_report.json").write_text(json.dumps({"checkpoint": "c", "adapter": "a", "method": "rtn"}))
    (folder / "data.txt").write_text(text)
    return folder


@pytest.mark.parametrize("appeared", ["empty_folder", "file", "folder_with_a_file"])
def test_what_appears_at_the_output_meanwhile_is_never_replaced(appeared, rename_mode, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputPathError, match="appeared while this run was writing it"):
        with atomic_output(out) as tmp:
            (tmp / "new.txt").write_text("new")
            if appeared == "file":
                out.write_text("theirs")
            else:
                out.mkdir()
                if appeared == "folder_with_a_file":
                    (out / "theirs.txt").write_text("theirs")
    if appeared == "file":
        assert out.read_text() == "theirs"
    else:
        assert os.listdir(out) == ([] if appeared == "empty_folder" else ["theirs.txt"])
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("is_file", [False, True], ids=["folder", "file"])
def test_overwrite_removes_the_old_output_only_after_the_new_one_is_in_place(is_file, rename_mode, monkeypatch,
                                                                                tmp_path):
    import shutil

    out = tmp_path / ("rot.safetensors" if is_file else "out")
    if is_file:
        save_file({"a": torch.zeros(2)}, str(out), metadata={"oftsurgery_format": "oftsurgery-rotations"})
    else:
        _ours(out)
    real_rmtree = shutil.rmtree
    seen = []

    def rmtree(path, *args, **kwargs):  # when anything is deleted, the new output must already be at `out`
        if is_file:
            with safe_open(str(out), "pt") as handle:
                seen.append(list(handle.keys()) == ["b"])
        else:
            seen.append((out / "data.txt").read_text() == "new")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with atomic_output(out, overwrite=True, is_file=is_file) as tmp:
        if is_file:
            save_file({"b": torch.ones(2)}, str(tmp), metadata={"oftsurgery_format": "oftsurgery-rotations"})
        else:
            (tmp / "merge_report.json").write_text(json.dumps({"checkpoint": "c", "adapter": "a", "method": "rtn"}))
            (tmp / "data.txt").write_text("new")
    assert seen and all(seen)
    assert os.listdir(tmp_path) == [out.name]


def test_overwrite_checks_the_old_output_again_right_before_the_swap(rename_mode, tmp_path):
    out = _ours(tmp_path / "out")
    with pytest.raises(OutputPathError, match="not replacing|holds neither"):
        with atomic_output(out, overwrite=True) as tmp:
            (tmp / "data.txt").write_text("new")
            (out / "merge_report.json").unlink()  # no longer recognisably ours: a user's folder now
    assert sorted(os.listdir(out)) == ["data.txt"] and (out / "data.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]


def test_stale_temporaries_of_dead_runs_on_this_host_are_removed(tmp_path):
    import subprocess
    import sys

    from oftsurgery.io.atomic import _host_tag

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited: no process has this pid now (pids are not reused this fast)
    host = _host_tag()
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    names = {
        f".out.tmp-{host}-{dead_pid}-abc": False,  # dead run here: removed
        f".out.old-{host}-{dead_pid}-abc": False,
        f".out.tmp-{host}-{os.getpid()}-abc": True,  # a live process: kept
        f".out.tmp-{other_host}-{dead_pid}-abc": True,  # another host's pid means nothing here: kept
        ".out.tmp-legacy": True,  # not ours to judge
        f".other.tmp-{host}-{dead_pid}-abc": True,  # another output's
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard.safetensors").write_bytes(b"x" * 10)
    with atomic_output(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("a")
    kept = {name for name, keep in names.items() if keep}
    assert set(os.listdir(tmp_path)) == kept | {"out"}


def test_symbolic_link_loop_is_an_output_path_error(tmp_path):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    with pytest.raises(OutputPathError, match="symbolic link loop"):
        check_output_path(loop, overwrite=True)
    with pytest.raises(OutputPathError, match="symbolic link loop"):
        with atomic_output(loop / "out"):
            pass
