"""Running things under `torchrun` from a test: the real launcher, gloo on the CPU, one thread per worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import oftsurgery

REPO = Path(oftsurgery.__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def worker_env(**extra: str) -> dict[str, str]:
    """The environment for workers: this checkout first on the path, one thread (torchrun's default
    for workers, and what the single-process reference must use for equal bits)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("GPTQMODEL_CPU_WORKERS", "1")
    env.update(extra)
    return env


def torchrun(nproc: int, args: list, *, timeout: float = 600, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node NPROC ARGS` (torch's launcher run as a module, so no PATH
    lookup), its output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               *[str(a) for a in args]]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env or worker_env(),
                          cwd=cwd)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """Our one-line errors in a torchrun run's output (torchrun's own report never starts with 'Error:')."""
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error:")]
