"""The command's fixed cost: what a process imports for a command, and how it ends (cli/app.py `run`).

Behaviour only, no timings: the data-free merge must not import the libraries only the calibrated
merge, `verify` or the demo need, and the quick exit must still run `atexit` callbacks, flush
stdout and keep the exit code. Each case runs in its own Python process, as a user's command does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from merge_helpers import random_rotations

# what the data-free merge never needs: transformers (the layer runner, tokenizers), gptqmodel,
# PEFT, accelerate, the Hub client, plotting
NOT_FOR_RTN = ("transformers", "gptqmodel", "peft", "accelerate", "huggingface_hub", "matplotlib", "defuser")

# runs the CLI as `python -m oftsurgery` does, and writes the imported modules from an atexit callback
_CHILD = r"""
import atexit, json, sys
record = sys.argv.pop(1)
atexit.register(lambda: open(record, "w", encoding="utf-8").write(json.dumps(sorted(sys.modules))))
sys.argv[0] = "oftsurgery"
from oftsurgery.cli import run
run()
"""


def _run(tmp_path, *args) -> tuple[subprocess.CompletedProcess, list[str]]:
    record = tmp_path / "modules.json"
    record.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(record), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)
    modules = json.loads(record.read_text(encoding="utf-8")) if record.exists() else []
    return done, modules


def _top_level(modules: list[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_rtn_merge_imports_only_what_it_needs_and_exits_cleanly(tiny_gptq_dir, tmp_path):
    rotations = random_rotations(tiny_gptq_dir, tmp_path / "rot.safetensors", strength=0.05)
    out = tmp_path / "merged"
    done, modules = _run(tmp_path, "merge", tiny_gptq_dir, rotations, "--out", out, "--method", "rtn", "-q")
    assert done.returncode == 0, done.stderr
    assert modules, "the atexit callback did not run"
    assert "torch" in _top_level(modules) and "oftsurgery.merge.engine" in modules
    assert not _top_level(modules) & set(NOT_FOR_RTN), sorted(_top_level(modules) & set(NOT_FOR_RTN))
    assert "oftsurgery.merge.calibrated_loop" not in modules  # the calibrated loop is the calibrated merge's
    assert done.stdout.rstrip().endswith(f"wrote {out}")  # flushed before the process ended
    assert (out / "merge_report.json").is_file() and (out / "README.md").is_file()


def test_help_does_not_import_torch(tmp_path):
    done, modules = _run(tmp_path, "--help")  # lists every command: their modules are imported, light
    assert done.returncode == 0 and "merge" in done.stdout, done.stderr
    assert not _top_level(modules) & {"torch", *NOT_FOR_RTN}, sorted(_top_level(modules) & {"torch", *NOT_FOR_RTN})


def test_the_quick_exit_keeps_the_exit_code_and_the_error_line(tmp_path):
    done, modules = _run(tmp_path, "merge", tmp_path / "missing", tmp_path / "rot.safetensors", "--out",
                         tmp_path / "out", "--method", "rtn")
    assert done.returncode not in (0, 1), (done.returncode, done.stderr)  # the library error's own code
    assert done.stderr.startswith("Error: ") and done.stderr.count("\n") == 1, done.stderr
    assert modules, "the atexit callback did not run"
    usage, _ = _run(tmp_path, "merge", "--no-such-option")
    assert usage.returncode == 2 and "No such option" in usage.stderr
