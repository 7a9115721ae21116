"""Synthetic GPTQ checkpoints of real model shapes, made offline in seconds to minutes.

`synthetic_checkpoint` builds, and caches under a directory named by its parameters, a Llama GPTQ
checkpoint of real layer shapes (Llama-2-7B, a 70B) with random, realistically drawn weights packed by
our codec, the same model in float16, and random exact-Cayley OFT rotations, all deterministic in
`seed`. For the scale bench and the tests; what it builds: docs/performance.md ("What it builds").
"""

from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

# Bump when what a build writes changes, so cached builds of the old recipe are not reused.
BUILDER_VERSION = 1
TOKENIZER_VOCAB = 4096
WEIGHT_STD = 0.02  # the usual init std of Llama linears and embeddings
OUTLIER_CHANNELS = 0.005  # fraction of input channels scaled up (real LLM outliers sit on input channels)
OUTLIER_CHANNEL_GAIN = 4.0
OUTLIER_ENTRIES = 1e-4  # fraction of single weights replaced by 6-10 std spikes
SHARD_SIZE = 2 * 1024**3  # bounds what the writers buffer: a 70B decoder layer in fp16 is 1.7 GB
# std of the random skew parameters: W·Rᵀ then differs from W by ~2% (relative Frobenius norm) and
# round-to-nearest changes (almost) no code, as with the trained adapters measured in bench/fidelity.py
DEFAULT_ROTATION_STRENGTH = 0.002
SPEC_FILE = "synthetic.json"

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions that fix a Llama decoder layer's linears (and the embedding)."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of the 7 linears of one decoder layer, in execution order."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        return {
            "self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i),
        }


PRESETS: dict[str, LlamaShape] = {
    # multiples of 128 everywhere, so g128 groups and b=32 rotation blocks fit every linear
    "tiny": LlamaShape(hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2, vocab_size=512),
    "7b": LlamaShape(hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32, vocab_size=32000),
    "70b": LlamaShape(hidden_size=8192, intermediate_size=28672, num_heads=64, num_kv_heads=8, vocab_size=32000),
}


@dataclass(frozen=True)
class SyntheticCheckpoint:
    """Paths of one build, and the parameters it was built with."""

    root: Path
    gptq: Path
    fp16: Path
    rotations: Path
    spec: dict


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def _generator(seed: int, name: str):
    """A generator per tensor name, so each tensor is the same whatever else a build contains."""
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def synthetic_linear_weight(out_features: int, in_features: int, generator, std: float = WEIGHT_STD):
    """A float32 [out, in] weight drawn like a trained layer's: normal, with outliers.

    A few input channels are scaled up (the channel outliers of real LLM activations end up in
    the weights' groups too, widening their grid) and a few single weights become 6-10 std spikes,
    so group ranges are set by outliers as in real checkpoints, not by the Gaussian bulk.
    """
    import torch

    weight = torch.randn(out_features, in_features, generator=generator) * std
    n_channels = max(1, round(in_features * OUTLIER_CHANNELS))
    channels = torch.randperm(in_features, generator=generator)[:n_channels]
    weight[:, channels] *= OUTLIER_CHANNEL_GAIN
    n_spikes = max(1, round(weight.numel() * OUTLIER_ENTRIES))
    where = torch.randint(0, weight.numel(), (n_spikes,), generator=generator)
    magnitude = (6 + 4 * torch.rand(n_spikes, generator=generator)) * std
    sign = torch.randint(0, 2, (n_spikes,), generator=generator) * 2 - 1
    weight.view(-1)[where] = magnitude * sign
    return weight


def _norm_weight(size: int, generator):
    import torch

    return (1 + 0.05 * torch.randn(size, generator=generator)).to(torch.float16)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def gptq_quantization_config(bits: int = 4, group_size: int = 128) -> dict:
    """The quantization_config gptqmodel 7 writes for a GPTQ sym, no act-order, v1-format model.

    Both key spellings (`quant_method`/`method`, `checkpoint_format`/`format`) are present, as in
    gptqmodel's own output; `meta.quantizer` names the tool that actually produced the codes.
    """
    from oftsurgery import __version__

    return {
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": True,
        "lm_head": False,
        "method": "gptq",
        "quant_method": "gptq",
        "format": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "meta": {
            "quantizer": [f"oftsurgery:{__version__}"],
            "uri": "https://github.com/oftsurgery/oftsurgery (oftsurgery.testing.synthetic)",
            "static_groups": False,
            "true_sequential": True,
            "mse": 0.0,
        },
    }


def llama_config_dict(shape: LlamaShape, num_layers: int, vocab_size: int, tokenizer) -> dict:
    """A config.json (as a dict) that transformers' LlamaConfig accepts, Llama-2 style."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    data = config.to_diff_dict()  # what save_pretrained writes: non-default keys and model_type
    data["dtype"] = "float16"
    data.pop("torch_dtype", None)
    return data


# --------------------------------------------------------------------------------------------------
# Rotations
# --------------------------------------------------------------------------------------------------


def random_rotations(checkpoint, path, *, strength: float, block_size: int = 32, seed: int = 0,
                     select: Callable[[str], bool] | None = None) -> Path:
    """Write a rotations file of random exact-Cayley blocks for every quantized linear of `checkpoint`.

    Each block is `cayley_exact(Q)` with Q skew-symmetric and its free parameters drawn N(0,
    strength²); strength 0 gives exact identities. `select(prefix)` restricts the modules.
    Works on any GPTQ or AWQ checkpoint (in_features from `g_idx` or the AWQ `qweight`).
    """
    import torch

    from oftsurgery.io import CheckpointReader
    from oftsurgery.oft.adapter_io import RotationSet, save_rotations
    from oftsurgery.oft.rotation import cayley_exact, params_per_block, skew_from_params
    from oftsurgery.quant.config import load_quant_config
    from oftsurgery.quant.layout import find_quantized_layers

    reader = CheckpointReader(checkpoint)
    method = load_quant_config(checkpoint).method
    generator = torch.Generator().manual_seed(seed)
    blocks = {}
    for prefix in find_quantized_layers(reader.names()):
        if select is not None and not select(prefix):
            continue
        if method == "awq":
            in_features = reader.shape(f"{prefix}.qweight")[0]
        else:
            in_features = reader.shape(f"{prefix}.g_idx")[0]
        if in_features % block_size:
            raise ValueError(f"{prefix} has {in_features} inputs, not a multiple of the block size {block_size}.")
        params = torch.randn(in_features // block_size, params_per_block(block_size), generator=generator) * strength
        blocks[prefix] = cayley_exact(skew_from_params(params, block_size)).contiguous()
    save_rotations(RotationSet(blocks, {"parameterization": "cayley"}), path)
    return Path(path)


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def _resolve(preset: str, vocab_size: int | None) -> tuple[LlamaShape, int]:
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    shape = PRESETS[preset]
    vocab = shape.vocab_size if vocab_size is None else int(vocab_size)
    if vocab < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab}.")
    return shape, vocab


def synthetic_spec(preset: str = "tiny", *, num_layers: int = 2, vocab_size: int | None = None, seed: int = 0,
                   bits: int = 4, group_size: int = 128) -> dict:
    """Every parameter that decides the weights' bytes; also their cache key (`cache_name`)."""
    shape, vocab = _resolve(preset, vocab_size)
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}.")
    return {
        "preset": preset, **asdict(shape), "vocab_size": vocab, "num_layers": int(num_layers), "seed": int(seed),
        "bits": int(bits), "group_size": int(group_size), "sym": True, "desc_act": False, "format": "gptq",
        "builder_version": BUILDER_VERSION,
    }


def cache_name(spec: dict) -> str:
    return (f"{spec['preset']}-L{spec['num_layers']}-V{spec['vocab_size']}-b{spec['bits']}g{spec['group_size']}"
            f"-seed{spec['seed']}-v{spec['builder_version']}")


def rotations_name(strength: float, block_size: int, seed: int) -> str:
    return f"rotations-b{block_size}-s{strength:g}-seed{seed}.safetensors"


def build_synthetic_checkpoint(out_dir, preset: str = "tiny", *, num_layers: int = 2, vocab_size: int | None = None,
                               seed: int = 0, bits: int = 4, group_size: int = 128,
                               rotation_strength: float = DEFAULT_ROTATION_STRENGTH, block_size: int = 32,
                               overwrite: bool = False, log=None, device: str = "cpu") -> SyntheticCheckpoint:
    """Build gptq/, fp16/ and a rotations file under `out_dir` (which appears only complete).

    `log(msg)`, if given, receives one line per decoder layer (a 7B layer takes about a minute on
    2 shared cores). `device` is where the weights are quantized and packed (they are drawn on the
    CPU either way); a GPU builds a 7B layer in seconds, and its float rounding may move a near-tie
    code, which a speed benchmark does not mind.
    """
    import torch

    from oftsurgery.io import CheckpointWriter, atomic_output
    from oftsurgery.testing.models import build_tiny_tokenizer
    from oftsurgery.quant.gptq import pack_gptq
    from oftsurgery.quant.grid import quantize_weight

    spec = synthetic_spec(preset, num_layers=num_layers, vocab_size=vocab_size, seed=seed, bits=bits,
                          group_size=group_size)
    shape, vocab = _resolve(preset, vocab_size)
    tokenizer = build_tiny_tokenizer(min(vocab, TOKENIZER_VOCAB))
    if len(tokenizer) > vocab:
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens.")
    started = time.perf_counter()
    with atomic_output(out_dir, overwrite=overwrite) as tmp:
        gptq_dir, fp_dir = tmp / "gptq", tmp / "fp16"
        qwriter = CheckpointWriter(gptq_dir, max_shard_size=SHARD_SIZE)
        fwriter = CheckpointWriter(fp_dir, max_shard_size=SHARD_SIZE)

        def both(name: str, tensor) -> None:
            qwriter.add(name, tensor)
            fwriter.add(name, tensor)

        def embedding(name: str):
            return (torch.randn(vocab, shape.hidden_size, generator=_generator(seed, name)) * WEIGHT_STD).half()

        both("model.embed_tokens.weight", embedding("model.embed_tokens.weight"))
        for layer in range(num_layers):
            layer_started = time.perf_counter()
            prefix = f"model.layers.{layer}"
            for norm in ("input_layernorm", "post_attention_layernorm"):
                name = f"{prefix}.{norm}.weight"
                both(name, _norm_weight(shape.hidden_size, _generator(seed, name)))
            for linear, (out_f, in_f) in shape.linear_shapes().items():
                name = f"{prefix}.{linear}"
                weight = synthetic_linear_weight(out_f, in_f, _generator(seed, name)).to(device)
                qw = quantize_weight(weight, bits, group_size, sym=True)
                del weight
                for key, value in pack_gptq(qw, "gptq").items():
                    qwriter.add(f"{name}.{key}", value.cpu())
                fwriter.add(f"{name}.weight", qw.dequantize(torch.float16).cpu())
                del qw
            if log is not None:
                log(f"synthetic {preset}: decoder layer {layer + 1}/{num_layers} in "
                    f"{time.perf_counter() - layer_started:.1f}s")
        both("model.norm.weight", _norm_weight(shape.hidden_size, _generator(seed, "model.norm.weight")))
        both("lm_head.weight", embedding("lm_head.weight"))
        qwriter.close()
        fwriter.close()

        config = llama_config_dict(shape, num_layers, vocab, tokenizer)
        (fp_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        quant = gptq_quantization_config(bits, group_size)
        (gptq_dir / "config.json").write_text(json.dumps({**config, "quantization_config": quant}, indent=2) + "\n",
                                              encoding="utf-8")
        (gptq_dir / "quantize_config.json").write_text(json.dumps(quant, indent=2) + "\n", encoding="utf-8")
        tokenizer.save_pretrained(gptq_dir)
        tokenizer.save_pretrained(fp_dir)
        random_rotations(gptq_dir, tmp / rotations_name(rotation_strength, block_size, seed),
                         strength=rotation_strength, block_size=block_size, seed=seed)
        spec["build_seconds"] = round(time.perf_counter() - started, 3)
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return _checkpoint(Path(out_dir), spec, rotation_strength, block_size)


def _checkpoint(root: Path, spec: dict, strength: float, block_size: int) -> SyntheticCheckpoint:
    root = root.expanduser().resolve()
    spec = {**spec, "rotation_strength": float(strength), "block_size": int(block_size)}
    return SyntheticCheckpoint(root=root, gptq=root / "gptq", fp16=root / "fp16",
                               rotations=root / rotations_name(strength, block_size, spec["seed"]), spec=spec)


def synthetic_checkpoint(preset: str = "tiny", *, num_layers: int = 2, vocab_size: int | None = None, seed: int = 0,
                         bits: int = 4, group_size: int = 128, rotation_strength: float = DEFAULT_ROTATION_STRENGTH,
                         block_size: int = 32, cache_dir=None, log=None, device: str = "cpu") -> SyntheticCheckpoint:
    """The cached build for these parameters under `cache_dir` (default: ~/.cache/oftsurgery/synthetic),
    built first if missing.

    The weights are cached by everything that decides them (`cache_name`); rotations files of other
    strengths or block sizes are added next to them on demand (they take well under a second).
    Builds are atomic, so a directory or file that exists is complete.
    """
    from oftsurgery.io import atomic_output
    from oftsurgery.testing.models import default_cache_dir

    spec = synthetic_spec(preset, num_layers=num_layers, vocab_size=vocab_size, seed=seed, bits=bits,
                          group_size=group_size)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "synthetic"
    target = root / cache_name(spec)
    if not (target / SPEC_FILE).is_file():
        return build_synthetic_checkpoint(target, preset, num_layers=num_layers, vocab_size=vocab_size, seed=seed,
                                          bits=bits, group_size=group_size, rotation_strength=rotation_strength,
                                          block_size=block_size, log=log, device=device)
    built = _checkpoint(target, json.loads((target / SPEC_FILE).read_text(encoding="utf-8")), rotation_strength,
                        block_size)
    if not built.rotations.is_file():
        with atomic_output(built.rotations, is_file=True) as tmp:
            random_rotations(built.gptq, tmp, strength=rotation_strength, block_size=block_size, seed=seed)
    return built


def decoder_layer_bytes(checkpoint) -> int:
    """Bytes of a checkpoint's decoder-layer tensors (`model.layers.*`), from the safetensors headers."""
    from oftsurgery.io.reader import CheckpointReader

    reader = CheckpointReader(checkpoint)
    return sum(info.nbytes for name, info in reader.tensors.items() if ".layers." in name)


def expected_size_bytes(preset: str, num_layers: int, vocab_size: int | None = None, bits: int = 4,
                        group_size: int = 128) -> dict[str, int]:
    """Bytes the GPTQ and fp16 checkpoints of a build will hold (to check disk space before a build)."""
    shape, vocab = _resolve(preset, vocab_size)
    quant = full = 0
    for out_f, in_f in shape.linear_shapes().values():
        groups = math.ceil(in_f / group_size)
        quant += in_f * out_f * bits // 8 + groups * out_f * bits // 8 + groups * out_f * 2 + in_f * 4
        full += in_f * out_f * 2
    norms = 2 * shape.hidden_size * 2
    outside = 2 * vocab * shape.hidden_size * 2 + shape.hidden_size * 2
    return {"gptq": num_layers * (quant + norms) + outside, "fp16": num_layers * (full + norms) + outside}
