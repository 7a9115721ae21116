"""What a merge can be asked for: `MergeOptions` (the library's form of `oftsurgery merge`'s options),
the methods, their defaults, and `parse_size` for `--max-shard-size`."""

from __future__ import annotations

from dataclasses import dataclass

from oftsurgery.device import AUTO

METHODS = ("calibrated", "rtn")
# what the calibrated merge's layer-by-layer forward computes in; auto: float32 on the CPU, the
# checkpoint's own half precision on a GPU (docs/performance.md, "The calibration forward")
FORWARD_DTYPES = ("auto", "float32", "float16", "bfloat16")
DEFAULT_CALIB_TOKENS = 8192
DEFAULT_SEQ_LEN = 256
# --tune-steps when not given: this many for a calibrated merge on a GPU in one process (it paid 1.6–4
# points of retention wherever measured), off on a CPU (where it about doubles the merge) and under
# torchrun (it needs every calibration row in one process); docs/merge-methods.md
DEFAULT_GPU_TUNE_STEPS = 20


@dataclass(frozen=True)
class MergeOptions:
    requant: str | None = None
    method: str = "calibrated"
    calib: str | None = None
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    seq_len: int = DEFAULT_SEQ_LEN
    device: str = AUTO  # auto | cpu | cuda | cuda:N
    overwrite: bool = False
    max_shard_size: int = 5 * 1024**3
    command: str | None = None
    progress: bool = True
    allow_pickle: bool = False  # read a pickle-only checkpoint with torch's weights-only loader
    strict: bool = False  # any per-layer fallback (see LayerReport.fallback) is a MergeError
    # > 0: tune each decoder layer's fp16 scales against its output, this many steps; 0: off;
    # None: `default_tune_steps` (on a GPU, off on a CPU)
    tune_steps: int | None = None
    residual_rank: int = 0  # > 0: also write OUT/residual-lora, a rank-R LoRA of what the grid could not hold
    forward_dtype: str = "auto"  # one of FORWARD_DTYPES: the calibration forward's matmuls (statistics stay float32)


def default_tune_steps(method: str, device: str, distributed: bool) -> int:
    """`tune_steps` when not given: DEFAULT_GPU_TUNE_STEPS for a calibrated merge on a GPU in one
    process, otherwise 0 (off)."""
    on_gpu = device.startswith("cuda")
    return DEFAULT_GPU_TUNE_STEPS if method == "calibrated" and on_gpu and not distributed else 0


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1024' -> bytes."""
    import math

    from oftsurgery.errors import OftSurgeryError

    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4, "B": 1}
    value = text.strip().upper()
    for unit, factor in units.items():
        if value.endswith(unit):
            number = value[: -len(unit)].strip()
            break
    else:
        number, factor = value, 1
    try:
        amount = float(number) * factor
    except ValueError:
        amount = math.nan
    if not math.isfinite(amount):  # "inf" and "nan" parse as floats
        raise OftSurgeryError(f"Cannot read the size {text!r}; write it like 5GB or 500MB.")
    size = int(amount)
    if size <= 0:
        raise OftSurgeryError(f"The size {text!r} must be positive.")
    return size
