"""Helpers for the fault tests: break checkpoints and adapters on purpose, and check that a refused
command said one sentence, wrote nothing and left its inputs exactly as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import torch
from click.testing import CliRunner, Result

from oftsurgery.cli import cli
from oftsurgery.io import CheckpointReader, CheckpointWriter
from oftsurgery.oft.adapter_io import RotationSet, save_rotations, write_peft_adapter
from oftsurgery.oft.config import OFTOptions
from oftsurgery.oft.rotation import cayley_exact, params_per_block, skew_from_params

# -- running the CLI and judging its answer ---------------------------------------------------------


def invoke(args: list, env: dict | None = None) -> Result:
    """Run `oftsurgery ARGS` in-process (the same path as the console script, through click)."""
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def invoke_or_hang(args: list, limit: float = 300) -> Result:
    """`invoke`, failing the test instead of hanging it when the command does not end within `limit`
    seconds (a liveness guard for network waits, far above any expected duration)."""
    box: list[Result] = []
    thread = threading.Thread(target=lambda: box.append(invoke(args)), daemon=True)
    thread.start()
    thread.join(limit)
    assert box, f"`oftsurgery {' '.join(map(str, args))}` still had not ended after {limit} s"
    return box[0]


def assert_refused(result: Result, exit_code: int, *words: str) -> str:
    """The command failed with `exit_code` and said so in exactly one `Error: ...` line, no traceback.

    Returns the message (without the `Error: ` prefix) so a test can check what it names.
    """
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"an exception escaped the CLI: {result.exception!r}\n{result.output}"
    )
    assert result.exit_code == exit_code, f"exit code {result.exit_code}, expected {exit_code}:\n{result.output}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, f"expected one error line, got {errors}:\n{result.stderr}"
    assert "Traceback" not in result.output
    message = errors[0][len("Error: "):]
    assert message.strip() and message.endswith((".", "?")), f"not one sentence: {message!r}"
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    print(f"[exit {result.exit_code}] Error: {message}")  # the table of messages: pytest -s -k ...
    return message


# -- "nothing written, nothing lost" -----------------------------------------------------------------


def snapshot(*roots: Path) -> dict[str, tuple[str, int]]:
    """Every file and directory under `roots`: (sha256 or 'dir', mtime_ns). Directory mtimes catch a
    file created and deleted again inside an input."""
    state: dict[str, tuple[str, int]] = {}
    for root in roots:
        root = Path(root)
        paths = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
        for path in paths:
            stat = path.lstat()
            digest = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            state[str(path)] = (digest, stat.st_mtime_ns)
    return state


def leftovers(out: Path) -> list[str]:
    """The output and any temporary siblings (`.NAME.tmp-*`, `.NAME.old-*`) that exist."""
    out = Path(out)
    found = [out.name] if out.exists() else []
    if out.parent.is_dir():
        found += sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
    return found


# -- broken checkpoints ------------------------------------------------------------------------------


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncate_file(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def corrupt_header(path: Path) -> None:
    """Overwrite the start of the JSON header (the 8-byte length stays) with bytes that are not JSON."""
    data = bytearray(path.read_bytes())
    data[8:24] = b"\xff" * 16
    path.write_bytes(bytes(data))


def reshard(src: Path, dst: Path, max_shard_size: int = 100_000) -> Path:
    """A copy of a checkpoint with its weights in several shards plus model.safetensors.index.json."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    writer = CheckpointWriter(dst, max_shard_size=max_shard_size)
    for name, tensor in CheckpointReader(src).iter_tensors():
        writer.add(name, tensor)
    shards = writer.close()
    assert len(shards) > 1
    return dst


def to_pickle_only(src: Path, dst: Path, shards: int = 1) -> Path:
    """A copy of a checkpoint whose weights are pickles, as transformers wrote them before safetensors:
    one `pytorch_model.bin`, or `pytorch_model-0000k-of-0000N.bin` shards plus their index."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    state = dict(CheckpointReader(src).iter_tensors())
    if shards == 1:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    names = sorted(state)
    weight_map = {}
    for k in range(shards):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = names[k::shards]
        torch.save({n: state[n] for n in part}, dst / file)
        weight_map.update({n: file for n in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def edit_quant_config(src: Path, dst: Path, **changes) -> Path:
    """A copy whose quantization config (config.json and quantize_config.json) has `changes` applied."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"].update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    qc = dst / "quantize_config.json"
    if qc.is_file():
        data = json.loads(qc.read_text())
        data.update(changes)
        qc.write_text(json.dumps(data))
    return dst


# -- adapters and rotations --------------------------------------------------------------------------


def peft_adapter(folder: Path, modules: dict[str, int], *, block_size: int = 32, strength: float = 0.02,
                 seed: int = 0, poison: float | None = None) -> Path:
    """A current-PEFT OFT adapter folder: `modules` maps module path -> number of blocks r.

    `poison` (e.g. float('nan')) is written into one parameter of the first module.
    """
    g = torch.Generator().manual_seed(seed)
    params = {m: torch.randn(r, params_per_block(block_size), generator=g) * strength for m, r in modules.items()}
    if poison is not None:
        params[next(iter(params))][0, 0] = poison
    options = OFTOptions(oft_block_size=block_size, target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}),
                         use_cayley_neumann=False)
    folder.mkdir(parents=True)
    # write_peft_adapter refuses to save NaN/Inf, so a poisoned adapter is written the way a broken
    # training run would have: straight to safetensors
    from safetensors.torch import save_file

    write_peft_adapter(folder, options, {m: torch.zeros_like(p) for m, p in params.items()})
    save_file({f"base_model.model.{m}.oft_R.weight": p for m, p in params.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def rotations_file(path: Path, modules: dict[str, tuple[int, int]], *, orthogonal: bool = True,
                   strength: float = 0.05, seed: int = 0) -> Path:
    """A rotations file: `modules` maps module path -> (r, b). Non-orthogonal blocks are a rotation
    scaled by 1.5 (a file someone edited by hand, or wrote with the wrong tool)."""
    g = torch.Generator().manual_seed(seed)
    blocks = {}
    for module, (r, b) in modules.items():
        params = torch.randn(r, params_per_block(b), generator=g) * strength
        rotation = cayley_exact(skew_from_params(params, b)).contiguous()
        blocks[module] = rotation if orthogonal else rotation * 1.5
    save_rotations(RotationSet(blocks, {"parameterization": "cayley"}), path)
    return path


# -- environments ------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(mount_point: Path, size: str = "256k", read_only: bool = False):
    """Mount a tiny tmpfs (root with mount rights only); yield the mount point or None when impossible."""
    mount_point.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False, capture_output=True)


@contextlib.contextmanager
def unchanged(*roots: Path):
    """Assert that nothing under `roots` (inputs, and the folder an output would go to) changed:
    no file added or removed, every byte and mtime the same."""
    before = snapshot(*roots)
    yield
    after = snapshot(*roots)
    added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    assert not added and not removed, f"added {added}, removed {removed}"
    changed = [p for p in before if before[p] != after[p]]
    assert not changed, f"changed: {changed}"


@contextlib.contextmanager
def nothing_written(folder: Path):
    """Assert that no entry appeared in `folder` (where an output would go): no output, no temporary
    `.NAME.tmp-*` left behind. Its mtime may change: a temporary directory may come and go."""
    folder.mkdir(parents=True, exist_ok=True)
    before = sorted(os.listdir(folder))
    yield
    after = sorted(os.listdir(folder))
    assert after == before, f"left behind in {folder}: {sorted(set(after) - set(before))}"


@contextlib.contextmanager
def read_only_folder(path: Path):
    """A folder nobody may write into: mode 0555 for a normal user; root ignores modes, so for root a
    read-only tmpfs (None when root may not mount)."""
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    with small_tmpfs(path, read_only=True) as mount:
        yield mount


@contextlib.contextmanager
def silent_server():
    """A TCP port on 127.0.0.1 whose connections are accepted (by the kernel's listen queue) and never
    answered: an HTTP client sends its request and waits. Yields the URL."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


def user_folder(path: Path) -> Path:
    """A folder holding a user's own file: what `--overwrite` must never replace."""
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


def edit_json(path: Path, edit) -> Path:
    """Rewrite a JSON file with `edit(data)` (its return value, or `data` edited in place)."""
    data = json.loads(path.read_text())
    result = edit(data)
    path.write_text(json.dumps(data if result is None else result))
    return path


def edit_rotations_metadata(src: Path, dst: Path, edit) -> Path:
    """A copy of a rotations file whose `oftsurgery_metadata` JSON is replaced by `edit(metadata)`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as handle:
        header = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    header["oftsurgery_metadata"] = json.dumps(edit(json.loads(header["oftsurgery_metadata"])))
    save_file(tensors, str(dst), metadata=header)
    return dst


def file_modes(root: Path) -> dict[str, int]:
    """Permission bits of every file and folder under `root` (itself included)."""
    paths = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
    return {str(p.relative_to(root.parent)): p.stat().st_mode & 0o777 for p in paths}
