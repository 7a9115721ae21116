"""What the CPU test suite cannot run: the GPU code paths against the CPU's, on a machine with CUDA.

- The bit packer: on a GPU 2/4/8-bit codes go through a byte view of the words (quant/bitpack.py),
  on a CPU through int32 field passes. Random codes of 7B shapes, both directions, both packing
  dimensions and the AWQ order: words and codes must be the same.
- Tiny synthetic merges (rotations of strength 0.05) on `cuda` and on `cpu`: rtn must write the same
  bytes (GPTQ and AWQ output); calibrated merges are listed (the GPU solve accumulates in another
  order, so near-ties may round differently).

    python bench/gpu_check.py        # needs CUDA; exits 1 if the packer or an rtn merge differs
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch


def check_bit_packer() -> int:
    """How many (bits, order, shape) cases differ between the GPU's and the CPU's bit packer."""
    from oftsurgery.quant.bitpack import AWQ_PACK_ORDER, pack_codes, unpack_codes

    generator = torch.Generator().manual_seed(0)
    cases = [(bits, None) for bits in (2, 3, 4, 8)] + [(4, AWQ_PACK_ORDER)]
    shapes = [((4096, 11008), 0), ((11008, 4096), -1), ((3, 96, 5), 1), ((7, 256), -1)]
    bad = 0
    for bits, order in cases:
        for shape, dim in shapes:
            codes = torch.randint(0, 2**bits, shape, generator=generator, dtype=torch.uint8)
            cpu = pack_codes(codes, bits, dim=dim, order=order)
            gpu = pack_codes(codes.cuda(), bits, dim=dim, order=order).cpu()
            back = unpack_codes(cpu.cuda(), bits, shape[dim], dim=dim, order=order).cpu()
            same = torch.equal(cpu, gpu) and torch.equal(back, codes)
            bad += not same
            print(f"bits {bits} order {'awq' if order else '-'} shape {shape} dim {dim}: {'same' if same else 'DIFFERENT'}")
    return bad


def check_merges() -> int:
    """How many rtn merges differ between cuda and cpu (calibrated ones are only reported)."""
    from oftsurgery.io import CheckpointReader
    from oftsurgery.merge import MergeOptions, merge_checkpoint
    from oftsurgery.testing.synthetic import synthetic_checkpoint

    built = synthetic_checkpoint("tiny", num_layers=2, rotation_strength=0.05,
                                 cache_dir=Path(tempfile.gettempdir()) / "oftsurgery-gpu-check")
    runs = [("rtn", dict(method="rtn")), ("rtn-awq", dict(method="rtn", requant="awq")),
            ("calibrated", dict(method="calibrated", calib_tokens=1024)),
            ("calibrated-awq", dict(method="calibrated", calib_tokens=1024, requant="awq"))]
    bad = 0
    for name, options in runs:
        with tempfile.TemporaryDirectory() as tmp:
            outs = {}
            for device in ("cpu", "cuda"):
                out = Path(tmp) / device
                merge_checkpoint(built.gptq, built.rotations, out, MergeOptions(progress=False, device=device, **options))
                outs[device] = CheckpointReader(out)
            a, b = outs["cpu"], outs["cuda"]
            differ = [n for n in a.tensors if not torch.equal(a.get(n), b.get(n))]
            elements = sum(int((a.get(n) != b.get(n)).sum()) for n in differ)
            print(f"{name}: cuda vs cpu: {len(differ)} of {len(a.tensors)} tensors differ ({elements} elements)", differ[:4])
            bad += bool(differ) and name.startswith("rtn")
    return bad


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_check.py compares GPU and CPU code paths: it needs CUDA.")
    bad = check_bit_packer()
    print("bit packer: all same" if not bad else f"bit packer: {bad} case(s) DIFFERENT")
    bad += check_merges()
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
