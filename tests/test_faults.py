"""Bad input and faults, through the CLI: every failure is one `Error: ...` sentence and its own exit
code (docs/errors.md), nothing is written (no output, no `.NAME.tmp-*` left), and the inputs keep
every byte and mtime.

Each test breaks one thing on purpose in a copy of a tiny checkpoint/adapter and runs the commands
that read it. Inputs live under `tmp_path/inputs` (or are the session fixtures, never modified);
outputs would go under `tmp_path/work`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fault_helpers import (
    assert_refused,
    copy_checkpoint,
    corrupt_header,
    edit_json,
    edit_quant_config,
    edit_rotations_metadata,
    file_modes,
    invoke,
    invoke_or_hang,
    leftovers,
    nothing_written,
    peft_adapter,
    read_only_folder,
    reshard,
    rotations_file,
    silent_server,
    small_tmpfs,
    to_pickle_only,
    truncate_file,
    unchanged,
    user_folder,
)
from hub_server import no_saved_login  # noqa: F401 (fixture)
from merge_helpers import all_tensors, assert_bytes_equal, random_rotations

from oftsurgery.errors import (
    CalibrationError,
    DiskFullError,
    HubError,
    InterruptedError_,
    InvalidAdapterError,
    InvalidCheckpointError,
    MergeError,
    OutputPathError,
    UnsupportedFormatError,
)

Q_PROJ = "model.layers.0.self_attn.q_proj"  # in_features 128 in the tiny Llama
DOWN_PROJ = "model.layers.1.mlp.down_proj"  # in_features 256
CHECKPOINT_COMMANDS = ["inspect", "attach", "merge", "verify", "push"]


@pytest.fixture
def inputs(tmp_path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    return folder


@pytest.fixture
def work(tmp_path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def rotations(tiny_gptq_dir, tmp_path_factory) -> Path:
    """Valid rotations (b=32) for every layer of the tiny checkpoints (GPTQ and AWQ share shapes)."""
    return random_rotations(tiny_gptq_dir, tmp_path_factory.mktemp("rot") / "rot.safetensors", strength=0.05)


def checkpoint_command(command: str, checkpoint: Path, work: Path, rotations: Path, good: Path) -> list:
    """The command line that hands `checkpoint` to `command` as the checkpoint it reads."""
    return {
        "inspect": ["inspect", checkpoint],
        "attach": ["attach", checkpoint, "--out", work / "adapter"],
        "merge": ["merge", checkpoint, rotations, "--out", work / "merged", "--method", "rtn", "-q"],
        "verify": ["verify", good, "--base", checkpoint, "--adapter", rotations],
        # validation comes before any network use: the endpoint is a closed port
        "push": ["push", checkpoint, "--repo-id", "user/model", "--token", "t", "--endpoint", "http://127.0.0.1:9"],
    }[command]


def refused(args: list, exit_code: int, words: tuple[str, ...], inputs: list[Path], work: Path) -> str:
    with unchanged(*inputs), nothing_written(work):
        result = invoke(args)
    return assert_refused(result, exit_code, *words)


# -- broken checkpoint files --------------------------------------------------------------------------

BROKEN_CHECKPOINTS = {
    # name: (how to break a copy of tiny_gptq_dir, error class, words the message must hold)
    "truncated_shard": (lambda d: truncate_file(d / "model.safetensors"), InvalidCheckpointError, ("truncated",)),
    "corrupt_header": (lambda d: corrupt_header(d / "model.safetensors"), InvalidCheckpointError,
                       ("not a valid safetensors",)),
    "missing_config": (lambda d: (d / "config.json").unlink(), InvalidCheckpointError, ("no config.json",)),
}


@pytest.mark.parametrize("command", CHECKPOINT_COMMANDS)
@pytest.mark.parametrize("breakage", sorted(BROKEN_CHECKPOINTS))
def test_broken_checkpoint_is_refused_before_any_work(breakage, command, tiny_gptq_dir, rotations, inputs, work):
    break_it, error, words = BROKEN_CHECKPOINTS[breakage]
    checkpoint = copy_checkpoint(tiny_gptq_dir, inputs / "ckpt")
    break_it(checkpoint)
    args = checkpoint_command(command, checkpoint, work, rotations, tiny_gptq_dir)
    refused(args, error.exit_code, words, [checkpoint, rotations, tiny_gptq_dir], work)


@pytest.fixture(scope="module")
def sharded_missing_shard(tiny_gptq_dir, tmp_path_factory) -> Path:
    checkpoint = reshard(tiny_gptq_dir, tmp_path_factory.mktemp("sharded") / "ckpt")
    (checkpoint / "model-00002-of-00005.safetensors").unlink()
    return checkpoint


@pytest.mark.parametrize("command", CHECKPOINT_COMMANDS)
def test_index_naming_a_missing_shard_is_refused(command, sharded_missing_shard, tiny_gptq_dir, rotations, work):
    args = checkpoint_command(command, sharded_missing_shard, work, rotations, tiny_gptq_dir)
    message = refused(args, InvalidCheckpointError.exit_code, ("missing",),
                      [sharded_missing_shard, rotations, tiny_gptq_dir], work)
    assert "model-00002-of-00005.safetensors" in message


@pytest.mark.parametrize("command", ["merge", "verify"])
def test_broken_merged_or_adapter_file_is_refused(command, tiny_gptq_dir, rotations, inputs, work):
    """The other files a command reads: verify's merged checkpoint, a truncated rotations file."""
    bad_rotations = inputs / "rot.safetensors"
    bad_rotations.write_bytes(rotations.read_bytes())
    truncate_file(bad_rotations)
    if command == "merge":
        args = ["merge", tiny_gptq_dir, bad_rotations, "--out", work / "merged", "-q"]
        error, words = InvalidAdapterError, ("not a readable safetensors file",)
    else:
        merged = copy_checkpoint(tiny_gptq_dir, inputs / "merged")
        truncate_file(merged / "model.safetensors")
        args = ["verify", merged, "--base", tiny_gptq_dir, "--adapter", rotations]
        error, words = InvalidCheckpointError, ("truncated",)
    refused(args, error.exit_code, words, [inputs, rotations, tiny_gptq_dir], work)


# -- pickle-only checkpoints ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pickle_checkpoint(tiny_gptq_dir, tmp_path_factory) -> Path:
    return to_pickle_only(tiny_gptq_dir, tmp_path_factory.mktemp("pickle") / "ckpt")


@pytest.mark.parametrize("command", CHECKPOINT_COMMANDS)
def test_pickle_only_checkpoint_is_refused_without_opt_in(command, pickle_checkpoint, tiny_gptq_dir, rotations, work):
    args = checkpoint_command(command, pickle_checkpoint, work, rotations, tiny_gptq_dir)
    refused(args, UnsupportedFormatError.exit_code, ("pytorch_model.bin", "--allow-pickle"),
            [pickle_checkpoint, rotations, tiny_gptq_dir], work)


@pytest.mark.parametrize("shards", [1, 3])
def test_allow_pickle_merges_like_the_safetensors_checkpoint(shards, tiny_gptq_dir, rotations, inputs, work):
    """The opt-in reads the same tensors: the merge of the pickle copy equals the merge of the original."""
    pickle_checkpoint = to_pickle_only(tiny_gptq_dir, inputs / "ckpt", shards=shards)
    with unchanged(pickle_checkpoint, rotations, tiny_gptq_dir):
        from_pickle = invoke(["merge", pickle_checkpoint, rotations, "--out", work / "a", "--method", "rtn", "-q",
                              "--allow-pickle"])
        from_safetensors = invoke(["merge", tiny_gptq_dir, rotations, "--out", work / "b", "--method", "rtn", "-q"])
    assert from_pickle.exit_code == 0, from_pickle.output
    assert from_safetensors.exit_code == 0, from_safetensors.output
    a, b = all_tensors(work / "a"), all_tensors(work / "b")
    assert sorted(a) == sorted(b)
    for name in a:
        assert_bytes_equal(a[name], b[name], name)
    assert not any(p.suffix == ".bin" for p in (work / "a").iterdir()), "the pickle must not travel as a side file"


class _RunsCodeWhenUnpickled:
    """What a malicious pickle carries: unpickling it would call os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_allow_pickle_still_refuses_code_in_the_pickle(tiny_gptq_dir, rotations, inputs, work):
    checkpoint = copy_checkpoint(tiny_gptq_dir, inputs / "ckpt")
    (checkpoint / "model.safetensors").unlink()
    marker = inputs.parent / "pwned"
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "payload": _RunsCodeWhenUnpickled(marker)},
               checkpoint / "pytorch_model.bin")
    args = ["merge", checkpoint, rotations, "--out", work / "merged", "--allow-pickle", "-q"]
    refused(args, UnsupportedFormatError.exit_code, ("objects other than tensors", "posix.system", "not loaded"), [checkpoint, rotations], work)
    assert not marker.exists(), "the payload ran"


# -- unsupported quantization ----------------------------------------------------------------------------

UNSUPPORTED = {
    # name: (fixture, config changes, words the message must hold)
    "gptq_online_rotation": ("tiny_gptq_dir", {"rotation": "hadamard"}, ("online rotation",)),
    "other_method": ("tiny_gptq_dir", {"quant_method": "paroquant", "method": "paroquant"}, ("paroquant",)),
    "gptq_marlin_format": ("tiny_gptq_dir", {"checkpoint_format": "marlin", "format": "marlin"}, ("marlin",)),
    "gptq_bits_5": ("tiny_gptq_dir", {"bits": 5}, ("bits=5",)),
    "awq_gemv": ("tiny_awq_dir", {"version": "gemv"}, ("gemv", "gemm")),
    "awq_marlin": ("tiny_awq_dir", {"version": "marlin"}, ("marlin", "gemm")),
    "awq_bits_3": ("tiny_awq_dir", {"bits": 3}, ("bits=3",)),
}


@pytest.mark.parametrize("command", CHECKPOINT_COMMANDS)
@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_quantization_is_refused(case, command, request, rotations, inputs, work, tiny_gptq_dir):
    fixture, changes, words = UNSUPPORTED[case]
    checkpoint = edit_quant_config(request.getfixturevalue(fixture), inputs / "ckpt", **changes)
    args = checkpoint_command(command, checkpoint, work, rotations, tiny_gptq_dir)
    refused(args, UnsupportedFormatError.exit_code, words, [checkpoint, rotations, tiny_gptq_dir], work)


@pytest.mark.parametrize("case", ["desc_act", "bits_8"])
def test_requant_awq_refuses_what_awq_cannot_represent(case, tiny_gptq_asym_descact_dir, tiny_gptq_dir, rotations,
                                                       inputs, work):
    if case == "desc_act":  # a real act-order checkpoint: AWQ's contiguous groups cannot hold it
        checkpoint, words = tiny_gptq_asym_descact_dir, ("desc_act",)
    else:  # refused from the config alone, before a single weight is read
        checkpoint, words = edit_quant_config(tiny_gptq_dir, inputs / "ckpt", bits=8), ("4-bit only",)
    args = ["merge", checkpoint, rotations, "--out", work / "merged", "--requant", "awq", "--method", "rtn", "-q"]
    refused(args, UnsupportedFormatError.exit_code, ("--requant awq", *words), [checkpoint, rotations], work)


# -- adapters that do not fit, or are broken ---------------------------------------------------------------

def _mismatched_adapter(kind: str, folder: Path) -> tuple[Path, tuple[str, ...]]:
    """An adapter made for another model, as a PEFT folder or a rotations file."""
    if kind == "missing_module":  # a 3rd decoder layer the tiny model does not have
        return peft_adapter(folder / "adapter", {"model.layers.2.self_attn.q_proj": 4}), ("model.layers.2",)
    if kind == "shape_mismatch":  # 2 blocks of 32 = 64 inputs, the layer has 128
        return rotations_file(folder / "rot.safetensors", {Q_PROJ: (2, 32)}), (Q_PROJ, "2 block(s) of size 32")
    if kind == "block_size_not_dividing":  # b=48 does not divide in_features=128
        return peft_adapter(folder / "adapter", {Q_PROJ: 2}, block_size=48), (Q_PROJ, "size 48")
    raise AssertionError(kind)


@pytest.mark.parametrize("command", ["merge", "verify", "attach"])
@pytest.mark.parametrize("kind", ["missing_module", "shape_mismatch", "block_size_not_dividing"])
def test_adapter_for_another_model_is_refused(kind, command, tiny_gptq_dir, inputs, work):
    adapter, words = _mismatched_adapter(kind, inputs)
    args = {
        "merge": ["merge", tiny_gptq_dir, adapter, "--out", work / "merged", "-q"],
        "verify": ["verify", tiny_gptq_dir, "--base", tiny_gptq_dir, "--adapter", adapter],
        "attach": ["attach", tiny_gptq_dir, "--out", work / "adapter", "--from", adapter],
    }[command]
    message = refused(args, InvalidAdapterError.exit_code, (), [adapter, tiny_gptq_dir], work)
    if command != "attach":  # attach words its own sentence; merge and verify share the plan's checks
        for word in words:
            assert word in message


@pytest.mark.parametrize("problem", ["missing", "not_utf8", "too_short"])
def test_unusable_verify_text_is_refused(problem, tiny_gptq_dir, rotations, inputs, work):
    text = inputs / "heldout.txt"
    if problem == "not_utf8":
        text.write_bytes(b"\xff\xfe\x00 not text " * 64)
    elif problem == "too_short":
        text.write_text("a few words only")
    words = {"missing": ("cannot be read",), "not_utf8": ("cannot be read",), "too_short": ("tokens",)}[problem]
    inputs_kept = [tiny_gptq_dir, rotations] + ([text] if text.exists() else [])
    refused(["verify", tiny_gptq_dir, "--base", tiny_gptq_dir, "--adapter", rotations, "--text", text],
            CalibrationError.exit_code, words, inputs_kept, work)


@pytest.mark.parametrize("command", ["extract", "merge", "verify", "attach"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_or_inf_in_a_peft_adapter_is_refused(value, command, tiny_gptq_dir, inputs, work):
    adapter = peft_adapter(inputs / "adapter", {Q_PROJ: 4, DOWN_PROJ: 8}, poison=value)
    args = {
        "extract": ["extract", adapter, "--out", work / "rot.safetensors"],
        "merge": ["merge", tiny_gptq_dir, adapter, "--out", work / "merged", "-q"],
        "verify": ["verify", tiny_gptq_dir, "--base", tiny_gptq_dir, "--adapter", adapter],
        "attach": ["attach", tiny_gptq_dir, "--out", work / "adapter", "--from", adapter],
    }[command]
    refused(args, InvalidAdapterError.exit_code, ("NaN or Inf",), [adapter, tiny_gptq_dir], work)


@pytest.mark.parametrize("command", ["merge", "verify", "attach"])
@pytest.mark.parametrize("problem", ["not_orthogonal", "nan", "integer"])
def test_bad_rotations_file_is_refused(problem, command, tiny_gptq_dir, inputs, work):
    path = inputs / "rot.safetensors"
    if problem == "not_orthogonal":
        rotations_file(path, {Q_PROJ: (4, 32)}, orthogonal=False)
        words = ("not a rotation",)
    elif problem == "integer":  # identity blocks stored as int32: orthogonal, but not a rotation file's numbers
        from safetensors.torch import load_file, save_file
        from safetensors import safe_open

        rotations_file(path, {Q_PROJ: (4, 32)})
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = {k: torch.eye(v.shape[-1], dtype=torch.int32).expand_as(v).contiguous()
                   for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path), metadata=metadata)
        words = ("int32", "floating point")
    else:
        from safetensors.torch import load_file, save_file
        from safetensors import safe_open

        rotations_file(path, {Q_PROJ: (4, 32)})
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
        tensors[f"{Q_PROJ}.rotation"][1, 2, 3] = math.nan
        save_file(tensors, str(path), metadata=metadata)
        words = ("NaN or Inf",)
    args = {
        "merge": ["merge", tiny_gptq_dir, path, "--out", work / "merged", "-q"],
        "verify": ["verify", tiny_gptq_dir, "--base", tiny_gptq_dir, "--adapter", path],
        "attach": ["attach", tiny_gptq_dir, "--out", work / "adapter", "--from", path],
    }[command]
    refused(args, InvalidAdapterError.exit_code, words, [path, tiny_gptq_dir], work)


def test_pickle_adapter_is_refused(tiny_gptq_dir, inputs, work):
    adapter = peft_adapter(inputs / "adapter", {Q_PROJ: 4})
    tensors = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(adapter / "adapter_model.safetensors"))
    torch.save(tensors, adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    args = ["merge", tiny_gptq_dir, adapter, "--out", work / "merged", "-q"]
    refused(args, UnsupportedFormatError.exit_code, ("adapter_model.bin", "safetensors"), [adapter, tiny_gptq_dir], work)


# -- output paths ------------------------------------------------------------------------------------------

def _writer_command(command: str, checkpoint: Path, rotations: Path, adapter: Path, out: Path) -> list:
    return {
        "merge": ["merge", checkpoint, rotations, "--out", out, "--method", "rtn", "-q"],
        "attach": ["attach", checkpoint, "--out", out],
        "extract": ["extract", adapter, "--out", out],
    }[command]


@pytest.fixture
def small_adapter(inputs) -> Path:
    return peft_adapter(inputs / "adapter", {Q_PROJ: 4})


@pytest.mark.parametrize("command", ["merge", "attach", "extract"])
def test_existing_output_is_kept_without_overwrite(command, tiny_gptq_dir, rotations, small_adapter, work):
    out = work / "existing"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = _writer_command(command, tiny_gptq_dir, rotations, small_adapter, out)
    with unchanged(out):
        message = refused(args, OutputPathError.exit_code, ("already exists", "--overwrite"),
                          [tiny_gptq_dir, rotations, small_adapter], work)
    assert str(out) in message


@pytest.mark.parametrize("command", ["merge", "attach", "extract"])
def test_output_inside_an_input_is_refused(command, tiny_gptq_dir, rotations, small_adapter, work):
    inside = (small_adapter if command == "extract" else tiny_gptq_dir) / "out"
    args = _writer_command(command, tiny_gptq_dir, rotations, small_adapter, inside)
    refused(args, OutputPathError.exit_code, ("inside the input",), [tiny_gptq_dir, rotations, small_adapter], work)


@pytest.mark.parametrize("command", ["merge", "attach", "extract"])
def test_output_under_a_file_is_refused(command, tiny_gptq_dir, rotations, small_adapter, work):
    a_file = work / "a-file"
    a_file.write_text("not a directory")
    args = _writer_command(command, tiny_gptq_dir, rotations, small_adapter, a_file / "out")
    refused(args, OutputPathError.exit_code, ("not a directory",), [tiny_gptq_dir, rotations, small_adapter, a_file],
            work)


@pytest.mark.parametrize("command", ["merge", "attach", "extract"])
def test_unwritable_output_folder_is_refused(command, tiny_gptq_dir, rotations, small_adapter, tmp_path):
    with read_only_folder(tmp_path / "readonly") as folder:
        if folder is None:
            pytest.skip("root without mount rights: no read-only folder to test with")
        args = _writer_command(command, tiny_gptq_dir, rotations, small_adapter, folder / "out")
        refused(args, OutputPathError.exit_code, ("cannot write",), [tiny_gptq_dir, rotations, small_adapter], folder)


# -- faults while writing ------------------------------------------------------------------------------

def _fill_the_disk(monkeypatch) -> None:
    """Writes fail the way they do on a full disk: safetensors' writer (attach, extract) with a partial
    file, then SafetensorError; the checkpoint writer's streamed writes (merge) with ENOSPC after a
    partial write."""
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    import oftsurgery.io.writer as checkpoint_writer

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 64)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def write_all(file, data):
        file.write(data[:64])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(checkpoint_writer, "_write_all", write_all)


@pytest.mark.parametrize("command", ["merge", "attach", "extract"])
def test_full_disk_is_reported_and_cleaned_up(command, monkeypatch, tiny_gptq_dir, rotations, small_adapter, work):
    _fill_the_disk(monkeypatch)
    out = work / "out"
    args = _writer_command(command, tiny_gptq_dir, rotations, small_adapter, out)
    refused(args, DiskFullError.exit_code, ("disk is full", "nothing was written"),
            [tiny_gptq_dir, rotations, small_adapter], work)
    assert leftovers(out) == []


def test_full_disk_on_a_real_tiny_filesystem(tiny_gptq_dir, rotations, tmp_path):
    """A 256 KiB tmpfs cannot hold the ~440 KB checkpoint: the real ENOSPC path, end to end."""
    with small_tmpfs(tmp_path / "tiny") as mount:
        if mount is None:
            pytest.skip("needs root with mount rights for a tiny tmpfs")
        args = ["merge", tiny_gptq_dir, rotations, "--out", mount / "merged", "--method", "rtn", "-q"]
        refused(args, DiskFullError.exit_code, ("disk is full",), [tiny_gptq_dir, rotations], mount)


def _fail_on_third_layer(monkeypatch, error: BaseException) -> None:
    """Make the requantization of the third targeted layer raise `error` (a bug, or Ctrl-C)."""
    import oftsurgery.merge.solve.rtn as rtn

    real = rtn.rtn_merge_layer
    calls = []

    def rtn_merge_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(rtn, "rtn_merge_layer", rtn_merge_layer)


def test_failure_while_packing_in_the_worker_leaves_nothing(monkeypatch, tiny_gptq_dir, rotations, work):
    """A failure on the pack-and-write thread stops the merge the same way, naming its layer."""
    import oftsurgery.quant.codec as codec

    real, calls = codec.pack_layer, []

    def pack_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:
            raise RuntimeError("injected packing failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(codec, "pack_layer", pack_layer)
    args = ["merge", tiny_gptq_dir, rotations, "--out", work / "merged", "--method", "rtn", "-q"]
    message = refused(args, MergeError.exit_code, ("RuntimeError: injected packing failure", "nothing was written"),
                      [tiny_gptq_dir, rotations], work)
    assert "model.layers.1." in message  # the 9th packed layer lies in the second decoder layer


def test_exception_mid_merge_leaves_nothing(monkeypatch, tiny_gptq_dir, rotations, work):
    _fail_on_third_layer(monkeypatch, RuntimeError("injected failure"))
    args = ["merge", tiny_gptq_dir, rotations, "--out", work / "merged", "--method", "rtn", "-q"]
    message = refused(args, MergeError.exit_code, ("RuntimeError: injected failure", "nothing was written"),
                      [tiny_gptq_dir, rotations], work)
    assert "model.layers.0." in message  # names the layer that failed


def test_ctrl_c_mid_merge_leaves_nothing(monkeypatch, tiny_gptq_dir, rotations, work):
    _fail_on_third_layer(monkeypatch, KeyboardInterrupt())
    args = ["merge", tiny_gptq_dir, rotations, "--out", work / "merged", "--method", "rtn", "-q"]
    refused(args, InterruptedError_.exit_code, ("interrupted", "nothing was written"), [tiny_gptq_dir, rotations],
            work)


def _restore_default_signals() -> None:
    # a test runner started in the background may ignore SIGINT, and children inherit that
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_merge_leaves_nothing(signum, tiny_gptq_dir, rotations, work):
    """`python -m oftsurgery merge` killed while it works: exit 130, one line, no output, no temp files."""
    out = work / "merged"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTQMODEL_CPU_WORKERS": "2"}
    args = [sys.executable, "-m", "oftsurgery", "merge", str(tiny_gptq_dir), str(rotations), "--out", str(out),
            "--calib-tokens", "65536", "--seq-len", "256", "-q"]
    with unchanged(tiny_gptq_dir, rotations), nothing_written(work):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=_restore_default_signals)
        try:
            # the temporary directory exists from the first byte written until the rename
            while not any(p.name.startswith(".merged.tmp-") for p in work.iterdir()):
                assert proc.poll() is None, f"merge ended before it could be interrupted:\n{proc.stderr.read()}"
                time.sleep(0.05)
            time.sleep(0.5)  # well inside the work
            proc.send_signal(signum)
            _, stderr = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == InterruptedError_.exit_code, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error")]
    assert errors == [f"Error: Interrupted; nothing was written to {out.resolve()}."], stderr
    assert "Traceback" not in stderr
    assert leftovers(out) == []


# -- push and the CLI's own safety net -----------------------------------------------------------------

def test_push_to_an_unreachable_hub_leaves_the_folder_alone(tiny_gptq_dir, work):
    """The folder has no README.md: a failed push must not have written one."""
    assert not (tiny_gptq_dir / "README.md").exists()
    args = ["push", tiny_gptq_dir, "--repo-id", "user/model", "--token", "t", "--endpoint", "http://127.0.0.1:9",
            "--retry-wait", "0"]
    refused(args, HubError.exit_code, ("cannot reach the hub", "4 attempts"), [tiny_gptq_dir], work)


def test_an_unexpected_error_is_one_line_and_the_traceback_is_opt_in(monkeypatch, tiny_gptq_dir, work):
    import oftsurgery.inspect

    def broken(*args, **kwargs):
        raise ValueError("a bug\nspread over lines")

    monkeypatch.setattr(oftsurgery.inspect, "summarize_checkpoint", broken)
    message = refused(["inspect", tiny_gptq_dir], 1, ("Unexpected ValueError", "OFTSURGERY_DEBUG=1"),
                      [tiny_gptq_dir], work)
    assert "a bug spread over lines" in message
    debug = invoke(["inspect", tiny_gptq_dir], env={"OFTSURGERY_DEBUG": "1"})
    assert isinstance(debug.exception, ValueError)


# =====================================================================================================
# Issue 13: never lose a user's files. One section per case of the issue, in its order.
# =====================================================================================================

def _merge_args(checkpoint: Path, rotations: Path, out, *extra) -> list:
    return ["merge", checkpoint, rotations, "--out", out, "--method", "rtn", "-q", *extra]


@pytest.fixture(scope="module")
def merged_rtn(tiny_gptq_dir, rotations, tmp_path_factory) -> Path:
    """A real merge output (tiny GPTQ + `rotations`, rtn): what `--overwrite` may replace, what verify checks."""
    out = tmp_path_factory.mktemp("merged") / "merged"
    result = invoke(_merge_args(tiny_gptq_dir, rotations, out))
    assert result.exit_code == 0, result.output
    return out


# -- 1. --overwrite replaces only what oftsurgery wrote, or an empty folder ---------------------------

@pytest.mark.parametrize("command", ["merge", "attach", "extract"])
def test_overwrite_refuses_a_folder_oftsurgery_did_not_write(command, tiny_gptq_dir, rotations, small_adapter, work):
    out = user_folder(work / "mine")
    args = _writer_command(command, tiny_gptq_dir, rotations, small_adapter, out) + ["--overwrite"]
    words = ("not replacing", "folder and the output is a file") if command == "extract" else \
        ("not replacing", "neither a merge_report.json nor an adapter written by oftsurgery")
    with unchanged(out):
        refused(args, OutputPathError.exit_code, words, [tiny_gptq_dir, rotations, small_adapter], work)


@pytest.mark.parametrize("command", ["merge", "attach", "extract"])
def test_overwrite_refuses_a_file_oftsurgery_did_not_write(command, tiny_gptq_dir, rotations, small_adapter, work):
    out = work / "notes.safetensors"
    out.write_text("not a rotations file")
    args = _writer_command(command, tiny_gptq_dir, rotations, small_adapter, out) + ["--overwrite"]
    with unchanged(out):
        refused(args, OutputPathError.exit_code, ("not replacing",), [tiny_gptq_dir, rotations, small_adapter], work)


@pytest.mark.parametrize("place", ["cwd", "cwd_parent", "home", "home_parent", "holds_an_input"])
def test_overwrite_refuses_the_working_directory_home_and_folders_holding_an_input(
        place, monkeypatch, tiny_gptq_dir, rotations, merged_rtn, tmp_path):
    """Even an oftsurgery output: replacing the folder one works in (or home) would pull it from under the user."""
    project = copy_checkpoint(merged_rtn, tmp_path / "project")  # an oftsurgery output: the ownership rule allows it
    inputs = [tiny_gptq_dir, rotations]
    if place.startswith("cwd"):
        monkeypatch.chdir(project)
        out, words = (".", ("working directory",)) if place == "cwd" else (tmp_path, ("working directory",))
    elif place.startswith("home"):
        monkeypatch.setenv("HOME", str(project))
        out, words = (project, ("home directory",)) if place == "home" else (tmp_path, ("home directory",))
    else:
        rot_inside = project / "rot.safetensors"
        rot_inside.write_bytes(rotations.read_bytes())
        inputs, out, words = [tiny_gptq_dir, rot_inside], project, ("contains the input",)
    args = ["merge", inputs[0], inputs[1], "--out", out, "--method", "rtn", "-q", "--overwrite"]
    with unchanged(project):
        result = invoke(args)
    assert_refused(result, OutputPathError.exit_code, *words)


def test_overwrite_refuses_an_oftsurgery_output_holding_a_subfolder(merged_rtn, tiny_gptq_dir, rotations, work):
    out = copy_checkpoint(merged_rtn, work / "merged")
    (out / "my-notes").mkdir()
    with unchanged(out):
        refused(_merge_args(tiny_gptq_dir, rotations, out, "--overwrite"), OutputPathError.exit_code,
                ("my-notes", "did not write"), [tiny_gptq_dir, rotations], work)


def test_overwrite_replaces_oftsurgery_outputs_and_empty_folders(tiny_gptq_dir, rotations, merged_rtn, small_adapter,
                                                                  tmp_path, work):
    other = random_rotations(tiny_gptq_dir, tmp_path / "other.safetensors", strength=0.05, seed=1)
    merged = copy_checkpoint(merged_rtn, work / "merged")
    result = invoke(_merge_args(tiny_gptq_dir, other, merged, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert json.loads((merged / "merge_report.json").read_text())["adapter"] == str(other)
    empty = work / "empty"
    empty.mkdir()
    assert invoke(["attach", tiny_gptq_dir, "--out", empty, "--overwrite"]).exit_code == 0
    assert invoke(["attach", tiny_gptq_dir, "--out", empty, "--overwrite", "--block-size", "64"]).exit_code == 0
    assert json.loads((empty / "adapter_config.json").read_text())["oft_block_size"] == 64
    rot = work / "rot.safetensors"
    assert invoke(["extract", small_adapter, "--out", rot]).exit_code == 0
    assert invoke(["extract", small_adapter, "--out", rot, "--overwrite"]).exit_code == 0
    assert sorted(p.name for p in work.iterdir()) == ["empty", "merged", "rot.safetensors"]  # no temporaries


def test_a_failed_overwrite_leaves_the_old_output_as_it_was(monkeypatch, merged_rtn, tiny_gptq_dir, rotations, work):
    out = copy_checkpoint(merged_rtn, work / "merged")
    _fail_on_third_layer(monkeypatch, RuntimeError("injected failure"))
    with unchanged(out):
        refused(_merge_args(tiny_gptq_dir, rotations, out, "--overwrite"), MergeError.exit_code,
                ("injected failure",), [tiny_gptq_dir, rotations], work)
    assert leftovers(out) == ["merged"]


# -- 2. no race at the final rename ----------------------------------------------------------------

def _create_at_out_during_the_merge(monkeypatch, out: Path, with_file: bool) -> None:
    """Someone (a user, another run) creates `out` while the merge works on its layers."""
    import oftsurgery.merge.solve.rtn as rtn

    real = rtn.rtn_merge_layer

    def rtn_merge_layer(*args, **kwargs):
        if not out.exists():
            out.mkdir()
            if with_file:
                (out / "notes.txt").write_text("mine")
        return real(*args, **kwargs)

    monkeypatch.setattr(rtn, "rtn_merge_layer", rtn_merge_layer)


@pytest.mark.parametrize(("with_file", "overwrite", "words"), [
    (False, False, ("appeared while this run was writing it", "left as it is")),
    (True, False, ("appeared while this run was writing it", "left as it is")),
    (True, True, ("not replacing",)),
], ids=["empty_folder", "folder_with_a_file", "folder_with_a_file_and_overwrite"])
def test_a_folder_created_at_out_during_the_run_is_never_replaced(with_file, overwrite, words, monkeypatch,
                                                                 tiny_gptq_dir, rotations, work):
    out = work / "merged"
    _create_at_out_during_the_merge(monkeypatch, out, with_file)
    args = _merge_args(tiny_gptq_dir, rotations, out, *(["--overwrite"] if overwrite else []))
    with unchanged(tiny_gptq_dir, rotations):
        result = invoke(args)
    assert_refused(result, OutputPathError.exit_code, *words)
    assert sorted(os.listdir(out)) == (["notes.txt"] if with_file else [])
    assert leftovers(out) == ["merged"]


def test_two_merges_racing_to_one_output_one_wins_and_the_other_fails(tiny_gptq_dir, rotations, work):
    """Two real processes: exactly one writes the output, the other says so in one line; nothing else remains."""
    out = work / "merged"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTQMODEL_CPU_WORKERS": "2"}
    args = [sys.executable, "-m", "oftsurgery", *map(str, _merge_args(tiny_gptq_dir, rotations, out))]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              preexec_fn=_restore_default_signals) for _ in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    codes = [proc.returncode for proc in procs]
    assert sorted(codes) == [0, OutputPathError.exit_code], outputs
    loser_stderr = outputs[codes.index(OutputPathError.exit_code)][1]
    errors = [line for line in loser_stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and ("already exists" in errors[0] or "appeared while" in errors[0]), loser_stderr
    assert leftovers(out) == ["merged"]
    from oftsurgery.io import CheckpointReader

    assert sorted(all_tensors(out)) == sorted(CheckpointReader(tiny_gptq_dir).tensors)  # the winner is complete


# -- 3. push: bounded waits, bounded retries, one sentence ---------------------------------------------

@pytest.mark.parametrize("stage", ["tcp", "create_repo", "commit"])
def test_push_to_a_hub_that_never_answers_ends_with_one_sentence(stage, tiny_gptq_dir, tmp_path):
    """A server that accepts the connection and never answers (at connect, or mid-push) is given up on."""
    from oftsurgery.testing.hub_server import STALL, LocalHub

    folder = copy_checkpoint(tiny_gptq_dir, tmp_path / "ckpt")
    limits = ["--timeout", "1", "--retries", "1", "--retry-wait", "0"]
    if stage == "tcp":
        with silent_server() as url:
            result = invoke_or_hang(["push", folder, "--repo-id", "alice/m", "--token", "t", "--endpoint", url,
                                     *limits])
        assert_refused(result, HubError.exit_code, "did not answer", "within 1 s", "2 attempts",
                       "creating the repository")
        return
    with LocalHub(tokens={"hf_t": "alice"}) as hub:
        hub.stall(stage)
        result = invoke_or_hang(["push", folder, "--repo-id", "alice/m", "--token", "hf_t", "--endpoint", hub.url,
                                 *limits])
        stalled = [r.status for r in hub.requests_to(stage)]
    assert_refused(result, HubError.exit_code, "did not answer", "2 attempts")
    assert stalled == [STALL, STALL]  # the first attempt and one retry, then it stopped


def test_push_retries_a_transient_failure_then_succeeds(tiny_gptq_dir, tmp_path):
    from oftsurgery.testing.hub_server import LocalHub

    folder = copy_checkpoint(tiny_gptq_dir, tmp_path / "ckpt")
    with LocalHub(tokens={"hf_t": "alice"}) as hub:
        hub.fail("commit", 503, times=1)
        hub.stall("create_repo", times=1)
        result = invoke_or_hang(["push", folder, "--repo-id", "alice/m", "--token", "hf_t", "--endpoint", hub.url,
                                 "--timeout", "1", "--retry-wait", "0"])
        assert result.exit_code == 0, result.output
        assert [r.status for r in hub.requests_to("commit")] == [503, 200]
        assert hub.read("alice/m", "model.safetensors") == (folder / "model.safetensors").read_bytes()


def test_push_restores_huggingface_hubs_client_factory(tiny_gptq_dir, tmp_path):
    from huggingface_hub.utils import _http

    from oftsurgery.push import push_checkpoint

    before = _http._GLOBAL_CLIENT_FACTORY
    with silent_server() as url, pytest.raises(HubError, match="did not answer"):
        push_checkpoint(copy_checkpoint(tiny_gptq_dir, tmp_path / "ckpt"), "alice/m", token="t", endpoint=url,
                        timeout=0.5, retries=0)
    assert _http._GLOBAL_CLIENT_FACTORY is before


# -- 4. verify checks provenance before loading models ---------------------------------------------

@pytest.fixture
def no_model_loading(monkeypatch):
    """verify must refuse before it loads a single model."""
    import oftsurgery.verify

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(oftsurgery.verify, "load_quantized_model", load)


def _requantized_copy(src: Path, dst: Path) -> Path:
    """The same model and quantization settings, other weights: as a second quantization run gives."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    name = next(n for n in sorted(tensors) if n.endswith(".scales"))
    tensors[name] = (tensors[name].float() * 1.01).to(tensors[name].dtype)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Another model (MLP 192 wide, AWQ) merged with rotations of q_proj only, and those rotations."""
    from oftsurgery.testing.models import build_tiny_llama, make_awq_checkpoint

    root = tmp_path_factory.mktemp("other_model")
    checkpoint = make_awq_checkpoint(build_tiny_llama(root / "fp", intermediate_size=192), root / "awq", group_size=32)
    rot = random_rotations(checkpoint, root / "q.safetensors", strength=0.05, select=lambda n: n.endswith("q_proj"))
    merged = root / "merged"
    assert invoke(_merge_args(checkpoint, rot, merged)).exit_code == 0
    return checkpoint, rot, merged


@pytest.mark.parametrize("mismatch", ["other_quantization", "other_weights", "other_model", "other_adapter",
                                      "fewer_modules"])
def test_verify_refuses_a_merge_of_something_else_before_loading_models(
        mismatch, request, no_model_loading, merged_rtn, tiny_gptq_dir, rotations, tmp_path, work):
    base, adapter, merged = tiny_gptq_dir, rotations, merged_rtn
    if mismatch == "other_quantization":  # another real quantization of the same model (asym, act-order)
        base = request.getfixturevalue("tiny_gptq_asym_descact_dir")
        error, words = InvalidCheckpointError, ("was merged from a GPTQ 4-bit g32 sym", "asym desc_act")
    elif mismatch == "other_weights":
        base = _requantized_copy(tiny_gptq_dir, tmp_path / "requantized")
        error, words = InvalidCheckpointError, ("merged from another checkpoint",)
    elif mismatch == "other_model":
        _, adapter, merged = request.getfixturevalue("other_model")
        base = request.getfixturevalue("tiny_awq_dir")
        error, words = InvalidCheckpointError, ("was not merged from", "mlp")
    elif mismatch == "other_adapter":
        adapter = random_rotations(tiny_gptq_dir, tmp_path / "other.safetensors", strength=0.05, seed=3)
        error, words = InvalidAdapterError, ("another adapter", "strength")
    else:
        adapter = random_rotations(tiny_gptq_dir, tmp_path / "q.safetensors", strength=0.05,
                                   select=lambda n: n.endswith("q_proj"))
        error, words = InvalidAdapterError, ("another adapter", "does not target")
    refused(["verify", merged, "--base", base, "--adapter", adapter], error.exit_code, words,
            [merged, base, adapter], work)


def test_verify_without_a_merge_report_says_what_it_could_not_check(no_model_loading, tiny_gptq_dir, rotations,
                                                                      tmp_path):
    merged = copy_checkpoint(tiny_gptq_dir, tmp_path / "merged-elsewhere")
    result = invoke(["verify", merged, "--base", tiny_gptq_dir, "--adapter", rotations, "--tokens", "64",
                     "--seq-len", "32"])
    # it got as far as loading models (refused by the fixture): the checks passed, with a warning
    assert "Unexpected AssertionError: a model was loaded" in result.stderr, result.stderr
    assert "Warning: " in result.stderr and "has no merge_report.json" in result.stderr


# -- 5. stdout holds only results; third parties are quiet unless -v; errors stay one line ---------------

def _run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTQMODEL_CPU_WORKERS": "2"}
    return subprocess.run([sys.executable, "-m", "oftsurgery", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=cwd, preexec_fn=_restore_default_signals)


def test_verify_json_is_pure_json_and_nothing_else_is_said(merged_rtn, tiny_gptq_dir, rotations):
    """gptqmodel prints its banner and INFO lines to stdout when imported and when loading: none of it shows."""
    done = _run_cli("verify", merged_rtn, "--base", tiny_gptq_dir, "--adapter", rotations, "--tokens", "64",
                    "--seq-len", "32", "--json")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)  # nothing but our JSON on stdout
    assert figures["eval_tokens"] == 64
    assert done.stderr == ""


def test_third_party_chatter_goes_to_stderr_and_only_with_v(merged_rtn, tiny_gptq_dir, rotations, tmp_path):
    """verify imports gptqmodel, which prints a banner and INFO lines: on stderr with -v, nowhere without."""
    verify = ("verify", merged_rtn, "--base", tiny_gptq_dir, "--adapter", rotations, "--tokens", "64", "--seq-len", "32")
    quiet = _run_cli(*verify)
    loud = _run_cli("-v", *verify)
    assert quiet.returncode == loud.returncode == 0, (quiet.stderr, loud.stderr)
    assert "GPT-QModel" in loud.stderr and "INFO" in loud.stderr  # the chatter exists
    assert "GPT-QModel" not in quiet.stderr + quiet.stdout + loud.stdout  # and is silent by default, never on stdout
    assert quiet.stdout == loud.stdout  # stdout carries the results alone
    merge = _run_cli(*_merge_args(tiny_gptq_dir, rotations, tmp_path / "quiet"))
    assert merge.returncode == 0 and merge.stderr == "", merge.stderr
    lines = merge.stdout.splitlines()  # our summary and the output path, nothing else
    assert lines[0].startswith("merged 14 layer(s)") and lines[-1].startswith("wrote "), lines
    assert not any("INFO" in line or "GPT-QModel" in line for line in lines), lines


def test_an_error_after_gptqmodel_was_imported_is_one_line(merged_rtn, tiny_gptq_dir, rotations, tmp_path):
    """gptqmodel is imported and prints its banner, then loading the merged checkpoint fails."""
    merged = copy_checkpoint(merged_rtn, tmp_path / "merged")
    edit_json(merged / "config.json", lambda c: c.update(model_type="no_such_architecture"))
    done = _run_cli("verify", merged, "--base", tiny_gptq_dir, "--adapter", rotations, "--tokens", "64",
                    "--seq-len", "32")
    assert done.returncode == InvalidCheckpointError.exit_code, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: gptqmodel could not load"), done.stderr


# -- 6. files get the user's umask, weights included ---------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027])
@pytest.mark.parametrize("command", ["merge", "attach", "extract"])
def test_outputs_have_the_users_umask_modes(command, umask, tiny_gptq_dir, rotations, small_adapter, work):
    out = work / ("rot.safetensors" if command == "extract" else "out")
    previous = os.umask(umask)
    try:
        result = invoke(_writer_command(command, tiny_gptq_dir, rotations, small_adapter, out))
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    modes = file_modes(out)
    expected = {p: (0o777 if (work / p).is_dir() else 0o666) & ~umask for p in modes}
    assert modes == expected
    weights = [p for p in modes if p.endswith(".safetensors")]
    assert weights, "no weights or rotations file checked"


# -- 7. well-formed files with wrong types, and impossible option values: one sentence, own exit code --

def _adapter_config(edit):
    def make(folder: Path) -> Path:
        adapter = peft_adapter(folder / "adapter", {Q_PROJ: 4})
        edit_json(adapter / "adapter_config.json", edit)
        return adapter
    return make


def _rotations_metadata(edit):
    def make(folder: Path, rotations: Path) -> Path:
        return edit_rotations_metadata(rotations, folder / "rot.safetensors", edit)
    return make


WRONG_ADAPTER_TYPES = {
    "config_is_a_list": (_adapter_config(lambda c: []), ("adapter_config.json", "JSON object")),
    "block_size_is_a_string": (_adapter_config(lambda c: c.update(oft_block_size="32")),
                               ("oft_block_size", "'32' (a string)", "integer")),
}


@pytest.mark.parametrize("command", ["merge", "extract", "verify", "attach"])
@pytest.mark.parametrize("case", sorted(WRONG_ADAPTER_TYPES))
def test_adapter_config_with_wrong_types_is_refused(case, command, tiny_gptq_dir, inputs, work):
    make, words = WRONG_ADAPTER_TYPES[case]
    adapter = make(inputs)
    args = {
        "merge": ["merge", tiny_gptq_dir, adapter, "--out", work / "merged", "-q"],
        "extract": ["extract", adapter, "--out", work / "rot.safetensors"],
        "verify": ["verify", tiny_gptq_dir, "--base", tiny_gptq_dir, "--adapter", adapter],
        "attach": ["attach", tiny_gptq_dir, "--out", work / "adapter", "--from", adapter],
    }[command]
    refused(args, InvalidAdapterError.exit_code, words, [adapter, tiny_gptq_dir], work)


WRONG_ROTATIONS_METADATA = {
    "metadata_is_a_list": (lambda m: [], ("metadata of", "JSON object")),
    "output_side_is_a_number": (lambda m: {**m, "output_side": 5}, ("output_side", "list of strings")),
}


@pytest.mark.parametrize("command", ["merge", "verify", "attach", "inspect"])
@pytest.mark.parametrize("case", sorted(WRONG_ROTATIONS_METADATA))
def test_rotations_metadata_with_wrong_types_is_refused(case, command, tiny_gptq_dir, rotations, inputs, work):
    edit, words = WRONG_ROTATIONS_METADATA[case]
    bad = edit_rotations_metadata(rotations, inputs / "rot.safetensors", edit)
    args = {
        "merge": ["merge", tiny_gptq_dir, bad, "--out", work / "merged", "-q"],
        "verify": ["verify", tiny_gptq_dir, "--base", tiny_gptq_dir, "--adapter", bad],
        "attach": ["attach", tiny_gptq_dir, "--out", work / "adapter", "--from", bad],
        "inspect": ["inspect", bad],
    }[command]
    refused(args, InvalidAdapterError.exit_code, words, [bad, tiny_gptq_dir], work)


WRONG_CHECKPOINT_TYPES = {
    "config_json_is_null": (lambda d: (d / "config.json").write_text("null"), ("config.json", "JSON object")),
    "group_size_is_abc": (lambda d: edit_quant_config_in_place(d, group_size="abc"),
                          ("group_size", "'abc' (a string)", "integer")),
}


def edit_quant_config_in_place(folder: Path, **changes) -> None:
    for name in ("config.json", "quantize_config.json"):
        path = folder / name
        if path.is_file():
            edit_json(path, lambda c: (c.get("quantization_config", c) if name == "config.json" else c).update(changes))


@pytest.mark.parametrize("command", CHECKPOINT_COMMANDS)
@pytest.mark.parametrize("case", sorted(WRONG_CHECKPOINT_TYPES))
def test_checkpoint_config_with_wrong_types_is_refused(case, command, tiny_gptq_dir, rotations, inputs, work):
    break_it, words = WRONG_CHECKPOINT_TYPES[case]
    checkpoint = copy_checkpoint(tiny_gptq_dir, inputs / "ckpt")
    break_it(checkpoint)
    args = checkpoint_command(command, checkpoint, work, rotations, tiny_gptq_dir)
    refused(args, InvalidCheckpointError.exit_code, words, [checkpoint, rotations, tiny_gptq_dir], work)


@pytest.mark.parametrize("command", ["merge", "attach", "extract"])
def test_a_symlink_loop_at_out_is_refused(command, tiny_gptq_dir, rotations, small_adapter, work):
    loop = work / "loop"
    os.symlink(loop, loop)
    args = _writer_command(command, tiny_gptq_dir, rotations, small_adapter, loop) + ["--overwrite"]
    refused(args, OutputPathError.exit_code, ("symbolic link loop",), [tiny_gptq_dir, rotations, small_adapter], work)
    assert os.readlink(loop) == str(loop)


@pytest.mark.parametrize(("args", "words"), [
    (["merge", "{ckpt}", "{rot}", "--out", "{out}", "--max-shard-size", "inf"], ("--max-shard-size", "'inf'")),
    (["merge", "{ckpt}", "{rot}", "--out", "{out}", "--max-shard-size", "nan"], ("--max-shard-size", "'nan'")),
    (["attach", "{ckpt}", "--out", "{out}", "--target-regex", "("], ("--target-regex", "not a valid regular expression")),
    (["attach", "{ckpt}", "--out", "{out}", "--coft", "--eps", "nan"], ("--eps", "finite")),
    (["push", "{ckpt}", "--repo-id", "a/b", "--timeout", "inf"], ("--timeout", "finite")),
], ids=["max_shard_size_inf", "max_shard_size_nan", "target_regex", "eps_nan", "timeout_inf"])
def test_impossible_option_values_are_a_bad_command_line(args, words, tiny_gptq_dir, rotations, work):
    values = {"{ckpt}": tiny_gptq_dir, "{rot}": rotations, "{out}": work / "out"}
    refused([values.get(a, a) for a in args], 2, words, [tiny_gptq_dir, rotations], work)


# -- 8. every option is checked before the merge starts ---------------------------------------------------

@pytest.fixture
def merge_must_not_start(monkeypatch):
    import oftsurgery.merge

    def merge_checkpoint(*args, **kwargs):
        raise AssertionError("the merge started although an option was wrong")

    monkeypatch.setattr(oftsurgery.merge, "merge_checkpoint", merge_checkpoint)


@pytest.mark.parametrize(("extra", "code", "words"), [
    (["--push-to-hub", "a/b/c"], HubError.exit_code, ("'a/b/c'", "NAMESPACE/NAME")),
    (["--push-to-hub", "me/model"], HubError.exit_code, ("No Hugging Face token",)),
    (["--push-to-hub", "me/model", "--token", "t", "--endpoint", "ftp://hub"], HubError.exit_code, ("http(s) URL",)),
    (["--calib", "builtin:code"], 2, ("--calib", "--method rtn")),
    (["--calib-tokens", "512"], 2, ("--calib-tokens", "--method rtn")),
    (["--token", "t"], 2, ("--token", "--push-to-hub")),
], ids=["repo_id_a_b_c", "no_token", "endpoint_not_http", "calib_with_rtn", "calib_tokens_with_rtn",
        "token_without_push"])
def test_merge_options_are_checked_before_the_merge_starts(extra, code, words, no_saved_login, merge_must_not_start,
                                                            tiny_gptq_dir, rotations, work):
    refused(_merge_args(tiny_gptq_dir, rotations, work / "merged", *extra), code, words, [tiny_gptq_dir, rotations],
            work)


@pytest.fixture
def no_layer_merged(monkeypatch):
    import oftsurgery.merge.merger as merger

    def requantize_layer(*args, **kwargs):
        raise AssertionError("a layer was merged before the calibration source was checked")

    monkeypatch.setattr(merger, "requantize_layer", requantize_layer)


# -- 9. calibration errors say what is wrong, with exit code 11 ------------------------------------------

@pytest.mark.parametrize("problem", ["missing_absolute_path", "missing_relative_txt", "jsonl_of_numbers",
                                     "jsonl_of_lists", "a_folder", "not_a_dataset_name"])
def test_bad_calibration_source_is_refused_before_any_layer(problem, no_layer_merged, tiny_gptq_dir, rotations,
                                                             inputs, work):
    if problem == "missing_absolute_path":
        calib, words = str(inputs / "nope" / "calib.txt"), ("does not exist", str(inputs / "nope" / "calib.txt"))
    elif problem == "missing_relative_txt":
        calib, words = "no/such/dir/calib.txt", ("does not exist",)
    elif problem == "jsonl_of_numbers":
        (inputs / "calib.jsonl").write_text("1\n2\n3\n")
        calib, words = str(inputs / "calib.jsonl"), ("line 1", "1 (an integer)", '"text" string')
    elif problem == "jsonl_of_lists":
        (inputs / "calib.jsonl").write_text('{"text": "fine"}\n["a", "b"]\n')
        calib, words = str(inputs / "calib.jsonl"), ("line 2",)
    elif problem == "a_folder":
        calib, words = str(inputs), ("is a folder",)
    else:
        calib, words = "wikitext", ("neither an existing file nor a Hub dataset name",)
    args = ["merge", tiny_gptq_dir, rotations, "--out", work / "merged", "--calib", calib, "-q"]
    refused(args, CalibrationError.exit_code, words, [tiny_gptq_dir, rotations, inputs], work)


# -- 10. leftovers: created parents, and temporaries of dead runs ----------------------------------------

def test_a_failed_merge_removes_the_parent_folders_it_created(monkeypatch, tiny_gptq_dir, rotations, work):
    _fail_on_third_layer(monkeypatch, RuntimeError("injected failure"))
    out = work / "a" / "b" / "merged"
    refused(_merge_args(tiny_gptq_dir, rotations, out), MergeError.exit_code, ("injected failure",),
            [tiny_gptq_dir, rotations], work)
    assert not (work / "a").exists()


def test_temporaries_of_a_killed_run_are_removed_by_the_next_run(tiny_gptq_dir, rotations, work):
    """`kill -9` leaves `.merged.tmp-HOST-PID-*`; the next run writing `merged` sees PID is gone and removes it."""
    out = work / "merged"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTQMODEL_CPU_WORKERS": "2"}
    args = [sys.executable, "-m", "oftsurgery", "merge", str(tiny_gptq_dir), str(rotations), "--out", str(out),
            "--calib-tokens", "65536", "--seq-len", "256", "-q"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_restore_default_signals)
    try:
        while not any(p.name.startswith(".merged.tmp-") for p in work.iterdir()):
            assert proc.poll() is None, f"merge ended before it could be killed:\n{proc.stderr.read()}"
            time.sleep(0.05)
        time.sleep(0.5)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stale = [p for p in work.iterdir() if p.name.startswith(".merged.tmp-")]
    assert len(stale) == 1 and f"-{proc.pid}-" in stale[0].name, "kill -9 runs no cleanup: the temporary stays"
    live = work / f"{stale[0].name.split(f'-{proc.pid}-')[0]}-{os.getpid()}-live"  # a running process's: kept
    live.mkdir()
    result = invoke(_merge_args(tiny_gptq_dir, rotations, out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in work.iterdir()) == sorted([live.name, "merged"])


# -- the suite itself: a missing test dependency fails, it is not skipped ----------------------------------

def test_a_skip_for_a_missing_package_fails_the_run(tmp_path):
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (tmp_path / "test_needs_a_package.py").write_text(
        "import pytest\n\n"
        "def test_uses_it():\n"
        "    pytest.importorskip('no_such_package_oftsurgery')\n\n"
        "def test_environment_skip():\n"
        "    pytest.skip('needs root with mount rights')\n"
    )
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1, done.stdout
    assert "1 failed, 1 skipped" in done.stdout and "required test dependency is missing" in done.stdout, done.stdout
