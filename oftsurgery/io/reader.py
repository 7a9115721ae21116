"""Stream tensors by name out of a Hugging Face checkpoint directory.

`CheckpointReader` reads `config.json` and one `model.safetensors` or the shards of its index. Shard
headers are checked up front; tensors are then read one at a time from their byte range (thread-safe
`pread`), and `locate` hands that range to a writer that copies a tensor unread. Pickle checkpoints are
refused unless `allow_pickle=True` (torch's weights-only loader). Why: docs/architecture.md ("io/").
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oftsurgery.errors import InvalidCheckpointError, UnsupportedFormatError

if TYPE_CHECKING:
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"
PICKLE_FILES = ("pytorch_model.bin", PICKLE_INDEX_FILE, "model.pt", "model.bin")
# weight files that never travel as side files: a stale copy of the unmerged weights must not be
# copied next to the merged ones
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's place in a checkpoint, read from its shard's header (no data loaded)."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int = -1  # where its bytes start in `file` (safetensors); -1 inside a pickle


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """Parse and sanity-check a safetensors header; return (metadata, tensors).

    Checks the file is long enough for every tensor it declares, which catches truncated downloads.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise InvalidCheckpointError(f"{path} is truncated (shorter than a safetensors header).")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, 100_000_000):
                raise InvalidCheckpointError(f"{path} is not a valid safetensors file (header length {header_len}).")
            header = json.loads(fh.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidCheckpointError(f"{path} is not a valid safetensors file (unreadable header).") from None
    except OSError as exc:
        raise InvalidCheckpointError(f"{path} cannot be read ({exc.strerror or exc}).") from None
    if not isinstance(header, dict):
        raise InvalidCheckpointError(f"{path} is not a valid safetensors file (header is not an object).")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_start = 8 + header_len
    data_len = size - data_start
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InvalidCheckpointError(f"{path} has a malformed entry for tensor {name!r}.") from None
        if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start <= end:
            raise InvalidCheckpointError(f"{path} has a malformed entry for tensor {name!r}.")
        if end > data_len:
            raise InvalidCheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {end} but the file holds {data_len} data bytes."
            )
        n = 1
        for dim in shape:
            n *= dim
        if dtype in _DTYPE_BYTES and end - start != n * _DTYPE_BYTES[dtype]:
            raise InvalidCheckpointError(f"{path} is corrupt: tensor {name!r} has the wrong byte length.")
        tensors[name] = TensorInfo(name, path.name, dtype, shape, end - start, data_start + start)
    return metadata, tensors


def _torch_dtype_names() -> dict[Any, str]:
    """torch dtype -> the safetensors name `TensorInfo.dtype` uses."""
    import torch

    names = {
        torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
        torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
    }
    for attr, name in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                       ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
        if hasattr(torch, attr):  # newer torch releases only
            names[getattr(torch, attr)] = name
    return names


def read_exactly(fd: int, buffer: memoryview, offset: int) -> int:
    """Fill `buffer` from file descriptor `fd` at `offset` (thread-safe: no file position); return
    the bytes read, fewer only at the end of the file."""
    done = 0
    while done < len(buffer):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [buffer[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            chunk = os.pread(fd, len(buffer) - done, offset + done)
            buffer[done : done + len(chunk)] = chunk
            n = len(chunk)
        if n == 0:
            break
        done += n
    return done


def _safetensors_dtypes() -> dict[str, Any]:
    """safetensors dtype name -> torch dtype (the inverse of `_torch_dtype_names`)."""
    return {name: dtype for dtype, name in _torch_dtype_names().items()}


class CheckpointReader:
    """Read-only view of a checkpoint directory: config, tensor names, shapes, and tensors by name.

    >>> reader = CheckpointReader("path/to/model")     # doctest: +SKIP
    >>> w = reader.get("model.layers.0.self_attn.q_proj.qweight")
    """

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            raise InvalidCheckpointError(f"{self.path} does not exist.")
        if not self.path.is_dir():
            raise InvalidCheckpointError(f"{self.path} is not a directory; a checkpoint is a directory with config.json.")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise InvalidCheckpointError(f"{self.path} has no config.json; it is not a Hugging Face checkpoint directory.")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidCheckpointError(f"{config_path} is not valid JSON ({exc}).") from None
        if not isinstance(self.config, dict):
            from oftsurgery.schema import describe

            raise InvalidCheckpointError(f"{config_path} must hold a JSON object, not {describe(self.config)}.")
        self.shard_metadata: dict[str, dict[str, Any]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._index_metadata: dict[str, Any] = {}
        self._fds: dict[str, int] = {}  # shard -> read-only descriptor, opened on first use
        self._fds_lock = threading.Lock()
        self._pickled: dict[str, dict[str, Any]] = {}  # pickle file -> its state dict (memory-mapped)
        self._scan(allow_pickle)

    def _scan(self, allow_pickle: bool) -> None:
        index = self.path / INDEX_FILE
        single = self.path / SINGLE_FILE
        if index.is_file():
            files, weight_map = self._read_index(index)
        elif single.is_file():
            files, weight_map = [SINGLE_FILE], None
        else:
            pickles = [p for p in PICKLE_FILES if (self.path / p).is_file()]
            if not pickles:
                raise InvalidCheckpointError(f"{self.path} has no model.safetensors and no {INDEX_FILE}.")
            if not allow_pickle:
                raise UnsupportedFormatError(
                    f"{self.path} holds only pickle weights ({pickles[0]}), and loading a pickle can run code hidden "
                    "in it; convert it to safetensors, or, if you trust its source, let `oftsurgery merge "
                    "--allow-pickle` read it."
                )
            if PICKLE_INDEX_FILE in pickles:
                files, weight_map = self._read_index(self.path / PICKLE_INDEX_FILE)
            else:
                files, weight_map = [pickles[0]], None
        for file in files:
            if file.endswith(".safetensors"):
                metadata, tensors = read_safetensors_header(self.path / file)
            else:
                metadata, tensors = {}, self._load_pickle(self.path / file)
            self.shard_metadata[file] = metadata
            for name, info in tensors.items():
                if name in self.tensors:
                    raise InvalidCheckpointError(f"Tensor {name!r} appears in two shards of {self.path}.")
                self.tensors[name] = info
        if weight_map is not None:
            missing = [n for n, f in weight_map.items() if n not in self.tensors or self.tensors[n].file != f]
            if missing:
                raise InvalidCheckpointError(
                    f"{self.path / INDEX_FILE} lists {len(missing)} tensor(s) not found in their shard "
                    f"(first: {missing[0]!r})."
                )

    def _read_index(self, index: Path) -> tuple[list[str], dict[str, str]]:
        """The shard files an index names (all present) and its weight map."""
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map: dict[str, str] = dict(data["weight_map"])
            self._index_metadata = data.get("metadata") or {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise InvalidCheckpointError(f"{index} is not a valid checkpoint index (needs a weight_map).") from None
        files = sorted(set(weight_map.values()))
        for file in files:
            if not isinstance(file, str) or not (self.path / file).is_file() or Path(file).name != file:
                raise InvalidCheckpointError(f"{index} names the shard {file}, which is missing.")
        return files, weight_map

    def _load_pickle(self, path: Path) -> dict[str, TensorInfo]:
        """Open a pickle shard with torch's weights-only unpickler (memory-mapped); describe its tensors."""
        import pickle

        import torch

        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # the pre-1.6 (non-zip) format cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch's text is a paragraph; the line naming the refused global is what the user needs
            found = re.search(r"GLOBAL (\S+)", str(exc))
            what = f" (it references {found.group(1)})" if found else ""
            raise UnsupportedFormatError(
                f"{path} holds objects other than tensors{what}, which the weights-only loader refuses; "
                "it was not loaded."
            ) from None
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a truncated or corrupt zip
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InvalidCheckpointError(f"{path} cannot be read as a PyTorch weights file ({first}).") from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise InvalidCheckpointError(f"{path} is not a state dict of named tensors.")
        self._pickled[path.name] = state
        dtype_names = _torch_dtype_names()
        return {
            name: TensorInfo(name, path.name, dtype_names.get(t.dtype, str(t.dtype)), tuple(t.shape),
                             t.numel() * t.element_size())
            for name, t in state.items()
        }

    # -- queries -------------------------------------------------------------------------------
    @property
    def files(self) -> list[str]:
        return sorted(self.shard_metadata)

    @property
    def total_size(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def get(self, name: str, pin_memory: bool = False) -> "torch.Tensor":
        """Load one tensor (a copy, safe to keep; safe to call from several threads); `pin_memory`
        reads it straight into page-locked memory, for a fast copy to a GPU."""
        import torch

        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{name!r} is not in {self.path}")
        if info.file in self._pickled:
            tensor = self._pickled[info.file][name].clone().contiguous()
            return tensor.pin_memory() if pin_memory else tensor
        dtype = _safetensors_dtypes().get(info.dtype)
        if dtype is None:
            raise UnsupportedFormatError(f"Tensor {name!r} in {info.file} has dtype {info.dtype}, which this torch cannot hold.")
        tensor = torch.empty(info.shape, dtype=dtype, pin_memory=pin_memory)
        if info.nbytes:
            buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy()).cast("B")
            try:
                complete = read_exactly(self._fd(info.file), buffer, info.offset) == info.nbytes
            except OSError as exc:
                raise InvalidCheckpointError(f"Tensor {name!r} in {info.file} cannot be read ({exc.strerror or exc}).") from None
            if not complete:
                raise InvalidCheckpointError(f"Tensor {name!r} in {info.file} cannot be read (the file is truncated).")
        return tensor

    def locate(self, name: str) -> tuple[Path, int, int] | None:
        """(file, offset, length) of a tensor's bytes, for copying them unchanged; None inside a pickle."""
        info = self.tensors[name]
        if info.file in self._pickled or info.offset < 0:
            return None
        return self.path / info.file, info.offset, info.nbytes

    def _fd(self, file: str) -> int:
        with self._fds_lock:
            if file not in self._fds:
                self._fds[file] = os.open(self.path / file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            return self._fds[file]

    def close(self) -> None:
        """Close the shard files (reopened on the next read)."""
        with self._fds_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def get_many(self, names: list[str]) -> dict[str, "torch.Tensor"]:
        return {n: self.get(n) for n in names}

    def iter_tensors(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        """All tensors, shard by shard in file order (each shard opened once)."""
        for file in self.files:
            for name in [n for n, info in self.tensors.items() if info.file == file]:
                yield name, self.get(name)

    def side_files(self) -> list[Path]:
        """Files that travel with the weights (tokenizer, generation config, chat template…)."""
        return [
            p
            for p in sorted(self.path.iterdir())
            if p.is_file()
            and not p.name.startswith(".")
            and p.name not in self.shard_metadata
            and p.name not in (INDEX_FILE, PICKLE_INDEX_FILE)
            and not p.name.endswith(WEIGHT_SUFFIXES)
        ]
