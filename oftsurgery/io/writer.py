"""Write tensors into a Hugging Face checkpoint: shards up to a size, an index, `{"format": "pt"}`.

Tensors are buffered in memory only until a shard is full, so memory stays bounded by the shard size.
Shards are first written as `part-N.safetensors` and renamed to `model-0000k-of-0000N.safetensors`
at `close()`, once N is known. Use it inside `atomic_output` so the directory appears only complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from oftsurgery.io.reader import INDEX_FILE, SINGLE_FILE

if TYPE_CHECKING:
    import torch

DEFAULT_SHARD_SIZE = 5 * 1024**3
SIDE_FILE_SKIP = {"config.json", "quantize_config.json", "README.md", INDEX_FILE}


class CheckpointWriter:
    def __init__(self, out_dir: str | Path, max_shard_size: int = DEFAULT_SHARD_SIZE):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_size = max_shard_size
        self._buffer: dict[str, "torch.Tensor"] = {}
        self._buffer_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self._total = 0
        self._seen: set[str] = set()

    def add(self, name: str, tensor: "torch.Tensor") -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name!r} written twice")
        self._seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_size:
            self._flush()
        self._buffer[name] = tensor.detach().contiguous().cpu()
        self._buffer_bytes += nbytes
        self._total += nbytes

    def _flush(self) -> None:
        if not self._buffer:
            return
        path = self.out_dir / f"part-{len(self._parts)}.safetensors"
        save_shard(self._buffer, path)
        self._parts.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard and the index (when sharded); return the shard file names."""
        self._flush()
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


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def save_shard(tensors: dict[str, "torch.Tensor"], path: Path) -> None:
    """`safetensors.torch.save_file` with `{"format": "pt"}`, its I/O failures raised as `OSError`.

    safetensors reports a failed write (a full disk, a read-only file system) as a `SafetensorError`
    whose text ends in "(os error N)"; turning it back into `OSError(N)` lets `atomic_output` tell a
    full disk from other failures.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        match = _OS_ERROR.search(str(exc))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


def copy_side_files(files: list[Path], out_dir: str | Path, skip: set[str] = SIDE_FILE_SKIP) -> list[str]:
    """Copy tokenizer/generation/chat-template files next to the weights; return what was copied."""
    copied = []
    for path in files:
        if path.name in skip:
            continue
        shutil.copy2(path, Path(out_dir) / path.name)
        copied.append(path.name)
    return copied
