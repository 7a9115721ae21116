"""Shared fixtures: tiny Llama checkpoints (fp16 and GPTQ variants) and, for slow tests, SmolLM2-135M.

Session-scoped so each checkpoint is built once per test run; the tiny ones take seconds on 2 cores.
"""

from __future__ import annotations

import os
import re

import pytest

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(os.cpu_count() or 1, 2))))

# A skip because a package is missing hides untested code behind a green run: peft, autoawq and
# the other test dependencies are required (pyproject.toml's `test` extra), so such a skip fails.
_MISSING_PACKAGE = re.compile(r"could not import|no module named|is not installed|not available", re.IGNORECASE)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_missing_package_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if _MISSING_PACKAGE.search(reason):
            report.outcome = "failed"
            report.longrepr = f"A required test dependency is missing (skips for missing packages fail): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_missing_package_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_missing_package_skip(outcome.get_result())


@pytest.fixture(scope="session")
def tiny_fp_dir(tmp_path_factory):
    """A random fp16 LlamaForCausalLM (hidden 128, 2 layers, GQA 4/2 heads) with a byte-level BPE tokenizer."""
    from oftsurgery.testing.models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_fp"))


@pytest.fixture(scope="session")
def tiny_gptq_dir(tiny_fp_dir, tmp_path_factory):
    """tiny_fp_dir quantized by gptqmodel: 4-bit, group size 32, symmetric, no act-order, format gptq."""
    from oftsurgery.testing.models import quantize_gptq

    return quantize_gptq(tiny_fp_dir, tmp_path_factory.mktemp("tiny_gptq"), bits=4, group_size=32, sym=True)


@pytest.fixture(scope="session")
def tiny_gptq_asym_descact_dir(tiny_fp_dir, tmp_path_factory):
    """tiny_fp_dir quantized 4-bit g32, asymmetric, desc_act=True (permuted g_idx)."""
    from oftsurgery.testing.models import quantize_gptq

    return quantize_gptq(
        tiny_fp_dir, tmp_path_factory.mktemp("tiny_gptq_asym_descact"), bits=4, group_size=32, sym=False, desc_act=True
    )


@pytest.fixture(scope="session")
def tiny_gptq_v2_dir(tiny_fp_dir, tmp_path_factory):
    """tiny_fp_dir quantized 4-bit g32 sym, written in gptqmodel's gptq_v2 format (zeros without the -1 offset)."""
    from oftsurgery.testing.models import quantize_gptq

    return quantize_gptq(tiny_fp_dir, tmp_path_factory.mktemp("tiny_gptq_v2"), bits=4, group_size=32, format="gptq_v2")


@pytest.fixture(scope="session")
def smollm2_gptq_dir():
    """SmolLM2-135M, GPTQ 4-bit g128 sym, cached under ~/.cache/oftsurgery (first run: ~1 min download+convert
    and ~2-3 min quantization on 2 cores). Use only in tests marked `slow`."""
    from oftsurgery.testing.models import smollm2_gptq

    return smollm2_gptq(group_size=128)


@pytest.fixture(scope="session")
def tiny_awq_dir(tiny_fp_dir, tmp_path_factory):
    """tiny_fp_dir packed as AWQ GEMM 4-bit g32 (min/max grids fitted by us, packed by gptqmodel's AWQ packer)."""
    from oftsurgery.testing.models import make_awq_checkpoint

    return make_awq_checkpoint(tiny_fp_dir, tmp_path_factory.mktemp("tiny_awq"), group_size=32)
