"""Which kernels will serve a checkpoint, and why: vLLM, and transformers (through gptqmodel).

Decided from the quantization config and the quantized layers' shapes alone (no torch, no vLLM), so
`inspect` answers from headers and the merge can compare its input with its output
(`serving_contract`, `marlin_lost_warnings`). The rules restate what the engines' own source decides;
docs/formats.md ("Serving contract") gives them and cites where.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from oftsurgery.quant.config import QuantConfig

MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MARLIN_MIN_THREAD_N = 64  # output features per shard (vLLM GPTQ_MARLIN_MIN_THREAD_N)
MARLIN_MIN_THREAD_K = 128  # input features per shard (vLLM GPTQ_MARLIN_MIN_THREAD_K)
VLLM_GPTQ_MARLIN_TYPES = {(4, True), (8, True)}  # (bits, sym)
VLLM_AWQ_MARLIN_BITS = (4,)  # with zero points; vLLM's Marlin has no 8-bit zero-point type
GPTQMODEL_MARLIN_BITS = (4, 8)
GPTQMODEL_MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
VLLM_GPTQ_V2_NOTE = ("checkpoint_format gptq_v2 is read correctly only by vLLM releases with GPTQ v2 support "
                     "(PR #26092, late 2025); older vLLM reads its zero points as v1 and produces garbage")
# Linear layers vLLM splits along the input (RowParallelLinear); the others split their outputs.
ROW_PARALLEL = ("o_proj", "down_proj", "out_proj", "dense", "w2", "fc2", "c_proj", "dense_4h_to_h", "wo")


@dataclass
class KernelChoice:
    """What one engine will run a checkpoint's quantized layers with."""

    engine: str  # "vllm" or "transformers"
    kernel: str  # e.g. "gptq_marlin", "gptq", "awq_marlin", "awq", "gptqmodel Marlin (CUDA)"
    marlin: bool  # every quantized layer runs on a Marlin kernel
    reasons: list[str] = field(default_factory=list)  # why (not) Marlin, in words
    slower_layers: list[str] = field(default_factory=list)  # layers that fall back on their own (first few)
    slower_count: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def fully_marlin(self) -> bool:
        return self.marlin and not self.slower_count

    def describe(self) -> str:
        text = self.kernel + (" (Marlin)" if self.marlin else " (not Marlin)")
        if self.slower_count:
            text += (f" except {self.slower_count} layer(s) that fall back to a slower kernel "
                     f"(first: {self.slower_layers[0]})")
        if self.reasons:
            text += ": " + "; ".join(self.reasons)
        for note in self.notes:
            text += f"; {note}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shard(prefix: str, in_features: int, out_features: int, tp: int) -> tuple[int, int]:
    leaf = prefix.rsplit(".", 1)[-1]
    if leaf in ROW_PARALLEL:
        return in_features // tp, out_features
    return in_features, out_features // tp


def _marlin_shape_problem(in_pp: int, out_pp: int, in_full: int, group_size: int) -> str | None:
    if out_pp % MARLIN_MIN_THREAD_N:
        return f"output features {out_pp} per shard not divisible by {MARLIN_MIN_THREAD_N}"
    if in_pp % MARLIN_MIN_THREAD_K:
        return f"input features {in_pp} per shard not divisible by {MARLIN_MIN_THREAD_K}"
    if 0 < group_size < in_full and in_pp % group_size:
        return f"input features {in_pp} per shard not divisible by the group size {group_size}"
    return None


def _moe_marlin_problem(layers: Mapping[str, tuple[int, int]], group_size: int, tp: int) -> str | None:
    hidden = {i for p, (i, o) in layers.items() if ".experts." in p and not p.endswith(("down_proj", "w2"))}
    inter = {i // tp for p, (i, o) in layers.items() if ".experts." in p and p.endswith(("down_proj", "w2"))}
    if any(h % 128 for h in hidden):
        return f"expert hidden size {min(hidden)} not divisible by 128"
    step = max(64, group_size)
    if any(n % step for n in inter):
        return f"expert intermediate size {min(inter)} per shard not divisible by {step}"
    return None


def vllm_kernel(qcfg: QuantConfig, layers: Mapping[str, tuple[int, int]], tensor_parallel: int = 1) -> KernelChoice:
    """The vLLM kernel family for a checkpoint: `layers` maps module -> (in_features, out_features)."""
    reasons: list[str] = []
    notes: list[str] = []
    if qcfg.is_gptq:
        marlin_config = (qcfg.bits, qcfg.sym) in VLLM_GPTQ_MARLIN_TYPES and qcfg.group_size in MARLIN_GROUP_SIZES
        marlin_name, plain_name = "gptq_marlin", "gptq"
        if (qcfg.bits, qcfg.sym) not in VLLM_GPTQ_MARLIN_TYPES:
            reasons.append("gptq_marlin needs symmetric 4- or 8-bit weights, this is "
                           f"{'symmetric' if qcfg.sym else 'asymmetric'} {qcfg.bits}-bit")
        if qcfg.format == "gptq_v2" and not (marlin_config and qcfg.sym):
            notes.append(VLLM_GPTQ_V2_NOTE)
    else:
        marlin_config = qcfg.bits in VLLM_AWQ_MARLIN_BITS and qcfg.group_size in MARLIN_GROUP_SIZES
        marlin_name, plain_name = "awq_marlin", "awq"
        if qcfg.bits not in VLLM_AWQ_MARLIN_BITS:
            reasons.append(f"awq_marlin needs 4-bit zero-point AWQ, this is {qcfg.bits}-bit")
    if qcfg.group_size not in MARLIN_GROUP_SIZES:
        reasons.append(f"Marlin takes group sizes -1/32/64/128, this has {qcfg.group_size}")
    if not marlin_config:
        return KernelChoice("vllm", plain_name, False, reasons, notes=notes)
    slower = []
    for prefix, (in_f, out_f) in sorted(layers.items()):
        if ".experts." in prefix:
            continue
        in_pp, out_pp = _shard(prefix, in_f, out_f, tensor_parallel)
        problem = _marlin_shape_problem(in_pp, out_pp, in_f, qcfg.group_size)
        if problem:
            slower.append(f"{prefix} ({problem})")
    experts = [p for p in layers if ".experts." in p]
    if experts:
        problem = _moe_marlin_problem(layers, qcfg.group_size, tensor_parallel)
        if problem:
            slower.append(f"the MoE experts ({problem}: vLLM's generic WNA16 MoE kernel)")
    reasons.append(f"{'symmetric ' if qcfg.is_gptq else 'zero-point '}{qcfg.bits}-bit, group size {qcfg.group_size}"
                   + (", every layer's shape fits" if not slower else ""))
    if tensor_parallel > 1:
        reasons.append(f"shapes checked per shard at tensor parallel {tensor_parallel}")
    return KernelChoice("vllm", marlin_name, True, reasons, slower[:3], len(slower), notes)


def transformers_kernel(qcfg: QuantConfig, layers: Mapping[str, tuple[int, int]]) -> KernelChoice:
    """What transformers (through gptqmodel) runs the checkpoint with."""
    pack = 32 // qcfg.bits if 32 % qcfg.bits == 0 else None
    reasons: list[str] = []
    if qcfg.is_gptq and not qcfg.sym:
        reasons.append("gptqmodel's GPTQ Marlin needs symmetric weights")
    if qcfg.bits not in GPTQMODEL_MARLIN_BITS:
        reasons.append(f"gptqmodel's Marlin takes 4/8-bit, this is {qcfg.bits}-bit")
    if qcfg.group_size not in GPTQMODEL_MARLIN_GROUP_SIZES:
        reasons.append(f"gptqmodel's Marlin takes group sizes -1/32/64/128, this has {qcfg.group_size}")
    odd = [p for p, (i, o) in sorted(layers.items()) if pack is None or i % pack or o % pack]
    if odd and not reasons:
        reasons.append(f"{len(odd)} layer(s) have features not divisible by {pack}")
    if reasons:
        return KernelChoice("transformers", "gptqmodel's Exllama/Triton/torch kernels on CUDA, torch on CPU", False, reasons)
    return KernelChoice("transformers", "gptqmodel's Marlin kernel on CUDA, torch on CPU", True,
                        ["gptqmodel picks Marlin on CUDA for this config"])


def serving_contract(qcfg: QuantConfig, layers: Mapping[str, tuple[int, int]], tensor_parallel: int = 1) -> dict[str, KernelChoice]:
    return {"vllm": vllm_kernel(qcfg, layers, tensor_parallel), "transformers": transformers_kernel(qcfg, layers)}


def marlin_lost_warnings(source: dict[str, KernelChoice], output: dict[str, KernelChoice]) -> list[str]:
    """Warnings for a merge whose output serves on slower kernels than its input did."""
    out = []
    for engine, before in source.items():
        after = output[engine]
        name = "vLLM" if engine == "vllm" else "transformers"
        if before.marlin and not after.marlin:
            why = "; ".join(after.reasons) or after.describe()
            out.append(
                f"WARNING: the input checkpoint runs on Marlin in {name} ({before.kernel}) but the output will not "
                f"({after.kernel}: {why}); merge without --requant to keep the input's format."
            )
        elif before.fully_marlin and after.marlin and after.slower_count:
            out.append(
                f"WARNING: in {name} every layer of the input runs on Marlin but {after.slower_count} layer(s) of the "
                f"output will not (first: {after.slower_layers[0]})."
            )
    vllm_note = [n for n in output["vllm"].notes if n not in source["vllm"].notes]
    for note in vllm_note:
        out.append(f"WARNING: {note}.")
    return out
