"""Bad input and faults, through the CLI: every failure is one `Error: ...` sentence and its own exit
code (docs/errors.md), nothing is written (no output, no `.NAME.tmp-*` left), and the inputs keep
every byte and mtime.

Each test breaks one thing on purpose in a copy of a tiny checkpoint/adapter and runs the commands
that read it. Inputs live under `tmp_path/inputs` (or are the session fixtures, never modified);
outputs would go under `tmp_path/work`.
"""

from __future__ import annotations

import math
import os
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
    edit_quant_config,
    invoke,
    leftovers,
    nothing_written,
    peft_adapter,
    read_only_folder,
    reshard,
    rotations_file,
    small_tmpfs,
    to_pickle_only,
    truncate_file,
    unchanged,
)
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
    message = assert_refused(result, exit_code, *words)
    print(f"[exit {result.exit_code}] Error: {message}")  # the table of messages: pytest -s -k ...
    return message


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
@pytest.mark.parametrize("problem", ["not_orthogonal", "nan"])
def test_bad_rotations_file_is_refused(problem, command, tiny_gptq_dir, inputs, work):
    path = inputs / "rot.safetensors"
    if problem == "not_orthogonal":
        rotations_file(path, {Q_PROJ: (4, 32)}, orthogonal=False)
        words = ("not a rotation",)
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
    import oftsurgery.merge.rtn as rtn

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
    args = ["push", tiny_gptq_dir, "--repo-id", "user/model", "--token", "t", "--endpoint", "http://127.0.0.1:9"]
    refused(args, HubError.exit_code, ("cannot reach the hub",), [tiny_gptq_dir], work)


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
