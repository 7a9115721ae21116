"""Write tensors into a Hugging Face checkpoint: shards up to a size, an index, `{"format": "pt"}`.

`CheckpointWriter` streams: each tensor's bytes go to its shard as soon as it is added, into room
reserved for the header, which is written when the shard is complete; tensors stay 8-byte aligned.
Shards are renamed to `model-0000k-of-0000N.safetensors` at `close()`. Use it inside `atomic_output`.
The byte layout and its rules: docs/formats.md ("How the shards are written").
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oftsurgery.io.reader import INDEX_FILE, SINGLE_FILE, _torch_dtype_names, read_exactly

if TYPE_CHECKING:
    import torch

DEFAULT_SHARD_SIZE = 5 * 1024**3
SIDE_FILE_SKIP = {"config.json", "quantize_config.json", "README.md", INDEX_FILE}
ALIGN = 8
# a shard up to this size is rewritten once behind an exact header rather than carry the unused room
# (copying it is cheap); a bigger one keeps the room as spaces (at most 1/4096 of --max-shard-size)
SMALL_SHARD = 64 * 1024**2
COPY_CHUNK = 64 * 1024**2
_DTYPE_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def header_room(max_shard_size: int) -> int:
    """Bytes reserved for a shard's header: ~1/4096 of the shard (a header entry is ~120 bytes, so a
    full shard's header fits unless its tensors average under ~0.5 MB), between 64 KiB and 16 MiB."""
    room = min(max(max_shard_size // 4096, 64 * 1024), 16 * 1024**2)
    return room - room % ALIGN


@dataclass
class _Pending:
    """A tensor whose size is not a multiple of 8 bytes, written at the shard's end."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    data: Any = None  # a host tensor, or (path, offset) of its bytes in a source file


class _Shard:
    def __init__(self, path: Path, room: int):
        self.path = path
        self.room = room
        self.file = open(path, "wb", buffering=0)  # raw: writes go straight to the file, no copy in a buffer
        self.file.seek(8 + room)
        self.entries: dict[str, dict[str, Any]] = {}
        self.pending: list[_Pending] = []
        self.end = 0  # data bytes written so far
        self.nbytes = 0  # data bytes written or pending

    def _entry(self, name: str, dtype: str, shape, nbytes: int) -> None:
        self.entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [self.end, self.end + nbytes]}
        self.end += nbytes

    def write_bytes(self, name: str, dtype: str, shape, data: memoryview) -> None:
        _write_all(self.file, data)
        self._entry(name, dtype, shape, len(data))

    def copy_range(self, name: str, dtype: str, shape, source: Path, offset: int, nbytes: int) -> None:
        _copy_file_range(source, offset, nbytes, self.file)
        self._entry(name, dtype, shape, nbytes)

    def finish(self) -> None:
        """Write the kept-aside tensors, then the header; close the file."""
        try:
            for item in sorted(self.pending, key=lambda p: -_DTYPE_SIZE.get(p.dtype, 1)):
                if isinstance(item.data, tuple):
                    self.copy_range(item.name, item.dtype, item.shape, item.data[0], item.data[1], item.nbytes)
                else:
                    self.write_bytes(item.name, item.dtype, item.shape, _host_bytes(item.data))
            self.pending.clear()
            header = json.dumps({**self.entries, "__metadata__": {"format": "pt"}}, separators=(",", ":")).encode()
            exact = len(header) + (-len(header)) % ALIGN
            if exact <= self.room and (self.room - exact <= 64 * 1024 or self.end > SMALL_SHARD):
                self.file.seek(0)
                _write_all(self.file, memoryview(struct.pack("<Q", self.room) + header.ljust(self.room, b" ")))
                self.file.truncate(8 + self.room + self.end)
                self.file.close()
                return
            self.file.close()
            self._rewrite(header.ljust(exact, b" "))
        finally:
            if not self.file.closed:
                self.file.close()

    def _rewrite(self, header: bytes) -> None:
        """Move the data once, right behind a header of the exact size (a header larger than the room
        reserved, or a small file that should not carry the unused room)."""
        moved = self.path.with_name(self.path.name + ".tmp")
        with open(moved, "wb", buffering=0) as out:
            _write_all(out, memoryview(struct.pack("<Q", len(header)) + header))
            _copy_file_range(self.path, 8 + self.room, self.end, out)
        os.replace(moved, self.path)


class CheckpointWriter:
    def __init__(self, out_dir: str | Path, max_shard_size: int = DEFAULT_SHARD_SIZE):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_size = max_shard_size
        self._room = header_room(max_shard_size)
        self._shard: _Shard | None = None
        self._parts: list[tuple[Path, list[str]]] = []
        self._total = 0
        self._seen: set[str] = set()

    def _shard_for(self, name: str, nbytes: int) -> _Shard:
        if name in self._seen:
            raise ValueError(f"tensor {name!r} written twice")
        self._seen.add(name)
        if self._shard is not None and self._shard.nbytes and self._shard.nbytes + nbytes > self.max_shard_size:
            self._finish_shard()
        if self._shard is None:
            self._shard = _Shard(self.out_dir / f"part-{len(self._parts)}.safetensors", self._room)
        self._shard.nbytes += nbytes
        self._total += nbytes
        return self._shard

    def add(self, name: str, tensor: "torch.Tensor") -> None:
        """Write one tensor now (copied to the host first if it lives on a GPU)."""
        dtype = _torch_dtype_names().get(tensor.dtype)
        if dtype is None:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        host = tensor.detach().to("cpu").contiguous()
        nbytes = host.numel() * host.element_size()
        shard = self._shard_for(name, nbytes)
        if nbytes % ALIGN:
            shard.pending.append(_Pending(name, dtype, tuple(host.shape), nbytes, host))
        else:
            shard.write_bytes(name, dtype, tuple(host.shape), _host_bytes(host))

    def add_file_range(self, name: str, dtype: str, shape: tuple[int, ...], source: str | Path, offset: int,
                       nbytes: int) -> None:
        """Copy a tensor's stored bytes from `source` (e.g. `CheckpointReader.locate`) without loading it."""
        shard = self._shard_for(name, nbytes)
        if nbytes % ALIGN:
            shard.pending.append(_Pending(name, dtype, tuple(shape), nbytes, (Path(source), offset)))
        else:
            shard.copy_range(name, dtype, tuple(shape), Path(source), offset, nbytes)

    def _finish_shard(self) -> None:
        shard, self._shard = self._shard, None
        shard.finish()
        self._parts.append((shard.path, list(shard.entries)))

    def abort(self) -> None:
        """Close an unfinished shard's file (the caller removes the directory)."""
        if self._shard is not None and not self._shard.file.closed:
            self._shard.file.close()
        self._shard = None

    def close(self) -> list[str]:
        """Finish the last shard and write the index (when sharded); return the shard file names."""
        if self._shard is not None or not self._parts:
            if self._shard is None:  # nothing was added: still a valid, empty checkpoint file
                self._shard = _Shard(self.out_dir / f"part-{len(self._parts)}.safetensors", self._room)
            self._finish_shard()
        if len(self._parts) == 1:
            self._parts[0][0].rename(self.out_dir / SINGLE_FILE)
            return [SINGLE_FILE]
        n = len(self._parts)
        weight_map: dict[str, str] = {}
        names = []
        for k, (path, tensor_names) in enumerate(self._parts, start=1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / final)
            names.append(final)
            weight_map.update({t: final for t in tensor_names})
        index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return names


def _host_bytes(tensor: "torch.Tensor") -> memoryview:
    """The bytes of a contiguous host tensor, without a copy."""
    import torch

    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _write_all(file, data: memoryview) -> None:
    """Write every byte (a raw file may write fewer than asked)."""
    done = 0
    while done < len(data):
        written = file.write(data[done:])
        if written is None or written <= 0:  # pragma: no cover - a non-blocking file cannot occur here
            raise OSError(errno.EIO, "short write")
        done += written


def _copy_file_range(source: Path, offset: int, nbytes: int, out) -> None:
    """Append `nbytes` of `source` from `offset` to the raw file `out`: in the kernel where the
    system can (copy_file_range), else through a bounded buffer."""
    with open(source, "rb", buffering=0) as src:
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < nbytes:
                    n = os.copy_file_range(src.fileno(), out.fileno(), min(nbytes - done, 1 << 30), offset + done)
                    if n == 0:
                        break
                    done += n
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                    raise
        buffer = bytearray(min(COPY_CHUNK, max(nbytes - done, 1)))
        view = memoryview(buffer)
        while done < nbytes:
            n = read_exactly(src.fileno(), view[: min(len(buffer), nbytes - done)], offset + done)
            if n == 0:
                raise OSError(errno.EIO, f"{source} ended before its tensor did")
            _write_all(out, view[:n])
            done += n


def copy_side_files(files: list[Path], out_dir: str | Path, skip: set[str] = SIDE_FILE_SKIP) -> list[str]:
    """Copy tokenizer/generation/chat-template files next to the weights; return what was copied."""
    copied = []
    for path in files:
        if path.name in skip:
            continue
        shutil.copy2(path, Path(out_dir) / path.name)
        copied.append(path.name)
    return copied
