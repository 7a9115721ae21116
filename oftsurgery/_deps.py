"""Lazy, environment-aware imports of the heavy optional libraries.

gptqmodel starts worker pools sized from the CPU count when imported; on 2-core machines it then
fails to quantize unless GPTQMODEL_CPU_WORKERS is set first. Import it only through `gptqmodel()`.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from oftsurgery.errors import MissingDependencyError


def prepare_gptqmodel_env() -> None:
    """Set the environment gptqmodel reads at import time (only where the user has not)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(os.cpu_count() or 1, 2))))
    os.environ.setdefault("PYTHON_GIL", "1")


def gptqmodel() -> ModuleType:
    """Import gptqmodel with the environment it needs."""
    prepare_gptqmodel_env()
    try:
        return importlib.import_module("gptqmodel")
    except ImportError as exc:  # pragma: no cover - gptqmodel is a hard dependency
        raise MissingDependencyError(f"gptqmodel could not be imported ({exc}).") from exc


def import_optional(module: str, extra: str) -> ModuleType:
    """Import an optional module or fail with the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is needed for this; install it with `pip install 'oftsurgery[{extra}]'`."
        ) from exc
