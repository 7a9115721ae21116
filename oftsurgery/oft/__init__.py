"""OFT (orthogonal fine-tuning) for quantized layers: the math, the wrappers, PEFT-format adapters.

Importing this package imports torch (the wrappers are `torch.nn.Module`s) but not gptqmodel, PEFT
or autoawq; those are imported when a dispatcher or loader needs them.
"""

from oftsurgery.oft.awq import AwqOFTLinear, dispatch_awq
from oftsurgery.oft.gptq import GPTQOFTLinear, dispatch_gptq
from oftsurgery.oft.layer import OFTQuantLinear, OFTRotation
from oftsurgery.oft.rotation import (
    apply_rotation_to_input,
    block_diagonal,
    block_size_from_params,
    cayley_exact,
    cayley_inverse,
    cayley_neumann,
    coft_project,
    legacy_cayley,
    multiplicative_dropout,
    params_from_skew,
    resolve_block_layout,
    rotate_weight,
    rotation_blocks,
    skew_from_params,
)

__all__ = [
    "AwqOFTLinear",
    "GPTQOFTLinear",
    "OFTQuantLinear",
    "OFTRotation",
    "apply_rotation_to_input",
    "block_diagonal",
    "block_size_from_params",
    "cayley_exact",
    "cayley_inverse",
    "cayley_neumann",
    "coft_project",
    "dispatch_awq",
    "dispatch_gptq",
    "legacy_cayley",
    "multiplicative_dropout",
    "params_from_skew",
    "resolve_block_layout",
    "rotate_weight",
    "rotation_blocks",
    "skew_from_params",
]
