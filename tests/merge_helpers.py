"""Helpers for merge tests: rotations made from the published Cayley formula, tensor comparisons."""

from __future__ import annotations

from pathlib import Path

import torch

from oftsurgery.io import CheckpointReader
from oftsurgery.oft.adapter_io import RotationSet, save_rotations
from oftsurgery.oft.rotation import cayley_exact, skew_from_params
from oftsurgery.quant.codec import find_quantized_layers
from oftsurgery.quant.config import load_quant_config


def layer_in_features(reader: CheckpointReader, prefix: str, method: str) -> int:
    if method == "awq":
        return reader.tensors[f"{prefix}.qweight"].shape[0]
    return reader.tensors[f"{prefix}.g_idx"].shape[0]


def random_rotations(checkpoint, path: Path, *, strength: float, block_size: int = 32, seed: int = 0,
                     select=lambda name: True) -> Path:
    """Write a rotations file with exact-Cayley blocks of the given strength for the selected layers."""
    reader = CheckpointReader(checkpoint)
    method = load_quant_config(checkpoint).method
    g = torch.Generator().manual_seed(seed)
    blocks = {}
    for prefix in find_quantized_layers(reader.tensors):
        if not select(prefix):
            continue
        r = layer_in_features(reader, prefix, method) // block_size
        params = torch.randn(r, block_size * (block_size - 1) // 2, generator=g) * strength
        blocks[prefix] = cayley_exact(skew_from_params(params, block_size)).contiguous()
    save_rotations(RotationSet(blocks, {"parameterization": "cayley"}), path)
    return path


def identity_rotations(checkpoint, path: Path, block_size: int = 32) -> Path:
    return random_rotations(checkpoint, path, strength=0.0, block_size=block_size)


def all_tensors(path) -> dict[str, torch.Tensor]:
    return dict(CheckpointReader(path).iter_tensors())


def assert_bytes_equal(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert torch.equal(a.view(torch.uint8) if a.dtype != torch.bool else a, b.view(torch.uint8) if b.dtype != torch.bool else b), name


def assert_identity_merge(report, source_dir, out_dir) -> None:
    """An identity adapter must come back byte for byte *from the requantizer itself*: every layer in
    the requested mode with no fallback. The engine keeps the source codes whenever a candidate is
    worse, so byte-identity alone would hide a solver that breaks exact fits."""
    assert report.codes_changed == 0.0 and report.scales_changed == 0.0
    assert all(l.fallback is None and l.mode != "kept" for l in report.layers), report.fallbacks[:3]
    src, out = all_tensors(source_dir), all_tensors(out_dir)
    assert src.keys() == out.keys()
    for name in src:
        assert_bytes_equal(src[name], out[name], name)


def heldout_ids(checkpoint, rows: int, length: int) -> torch.Tensor:
    """Token ids [rows, length] of built-in English text the calibration never sees (the "heldout"
    split): what a calibrated merge is judged on, text from the distribution it calibrated on."""
    from transformers import AutoTokenizer

    from oftsurgery.texts import builtin_text

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    ids = tokenizer(builtin_text("english", "heldout", max_chars=20 * rows * length), return_tensors="pt").input_ids
    return ids[0, : rows * length].reshape(rows, length)
