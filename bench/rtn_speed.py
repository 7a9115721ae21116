"""`merge --method rtn` throughput: MB/s of checkpoint and peak RSS, this tree vs another git revision.

Builds (once, cached in --workdir) a synthetic Llama-7B-shaped GPTQ checkpoint: hidden 4096,
intermediate 11008, 4-bit g128 sym, `--layers` decoder layers, a small vocabulary so that the
decoder layers dominate the bytes; random fp16 weights quantized and packed by our codec. A random
exact-Cayley OFT rotation (b=32) targets all 7 linears of every layer. Each merge runs in its own
Python process (fresh peak RSS), once per revision, and the table reports:

    MB/s = checkpoint bytes (all tensors) / merge wall time, peak RSS = the merging process's maximum.

    OMP_NUM_THREADS=2 python bench/rtn_speed.py --layers 2                # this tree vs main
    python bench/rtn_speed.py --layers 2 --compare none --device cuda     # this tree only, on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINEARS = {  # module -> (in_features, out_features) in a Llama-7B decoder layer
    "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (4096, 11008), "mlp.up_proj": (4096, 11008),
    "mlp.down_proj": (11008, 4096),
}


def build_checkpoint(path: Path, layers: int, vocab: int, hidden: int = 4096, intermediate: int = 11008) -> None:
    """A GPTQ 4-bit g128 sym checkpoint of `layers` 7B-shaped decoder layers (random weights)."""
    import torch
    from safetensors.torch import save_file

    from oftsurgery.quant.gptq import pack_gptq
    from oftsurgery.quant.grid import quantize_weight

    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shapes = {k: (hidden if i == 4096 else intermediate, hidden if o == 4096 else intermediate)
              for k, (i, o) in LINEARS.items()}
    tensors = {"model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=gen) * 0.02).half(),
               "model.norm.weight": torch.ones(hidden, dtype=torch.float16),
               "lm_head.weight": (torch.randn(vocab, hidden, generator=gen) * 0.02).half()}
    for index in range(layers):
        prefix = f"model.layers.{index}"
        tensors[f"{prefix}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
        for name, (in_f, out_f) in shapes.items():
            weight = (torch.randn(out_f, in_f, generator=gen) * 0.02).half().float()
            packed = pack_gptq(quantize_weight(weight, bits=4, group_size=128, sym=True), "gptq")
            tensors.update({f"{prefix}.{name}.{k}": v for k, v in packed.items()})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    qcfg = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False,
            "checkpoint_format": "gptq", "pack_dtype": "int32"}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "torch_dtype": "float16", "quantization_config": qcfg}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))


def build_rotations(path: Path, layers: int, block_size: int = 32, strength: float = 0.02) -> None:
    import torch

    from oftsurgery.oft.adapter_io import RotationSet, save_rotations
    from oftsurgery.oft.rotation import cayley_exact, skew_from_params

    gen = torch.Generator().manual_seed(1)
    blocks = {}
    for index in range(layers):
        for name, (in_f, _) in LINEARS.items():
            params = torch.randn(in_f // block_size, block_size * (block_size - 1) // 2, generator=gen) * strength
            blocks[f"model.layers.{index}.{name}"] = cayley_exact(skew_from_params(params, block_size)).contiguous()
    save_rotations(RotationSet(blocks, {"parameterization": "cayley"}), path)


# one merge in a fresh process: prints {"seconds", "cpu_seconds", "layer_seconds", "max_rss_bytes"}
_CHILD = r"""
import json, resource, sys, time
import torch  # imported before the clock starts: the merge is timed, not the interpreter's start-up
import oftsurgery.merge.engine as engine
from oftsurgery.merge import MergeOptions, merge_checkpoint
marks = []  # the end of each iteration of the engine's per-decoder-layer loop (its progress iterator)
original = engine._progress
def timed(iterable, *args, **kwargs):
    marks.append(time.perf_counter())
    for item in original(iterable, *args, **kwargs):
        yield item
        marks.append(time.perf_counter())
engine._progress = timed
kwargs = dict(method="rtn", overwrite=True, progress=False)
if sys.argv[4] != "default":
    kwargs["device"] = sys.argv[4]
import oftsurgery
print("code:", oftsurgery.__file__, file=sys.stderr)
start, cpu = time.perf_counter(), time.process_time()
merge_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], MergeOptions(**kwargs))
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "layer_seconds": [b - a for a, b in zip(marks, marks[1:])],
                  "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_merge(code_root: Path, checkpoint: Path, rotations: Path, out: Path, device: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code_root), GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))
    # run from the code root: `python -c` puts the working directory first on sys.path
    result = subprocess.run([sys.executable, "-c", _CHILD, str(checkpoint), str(rotations), str(out), device],
                            env=env, capture_output=True, text=True, cwd=str(code_root))
    if result.returncode:
        raise SystemExit(f"merge with {code_root} failed:\n{result.stderr[-3000:]}")
    used = [line for line in result.stderr.splitlines() if line.startswith("code: ")]
    if not used or not used[-1][6:].startswith(str(code_root)):
        raise SystemExit(f"the merge imported {used[-1][6:] if used else 'an unknown oftsurgery'}, not {code_root}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def export_revision(revision: str, into: Path) -> Path:
    """The `oftsurgery` package as it is at `revision` (git archive), importable from the returned root."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "oftsurgery"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1, help="7B-shaped decoder layers in the checkpoint")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary (embedding and lm_head rows)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "oftsurgery-rtn-speed")
    parser.add_argument("--compare", default="main", help="git revision to compare with, or 'none'")
    parser.add_argument("--device", default="default", help="--device for this tree's merge (default: its default)")
    args = parser.parse_args()

    checkpoint = args.workdir / f"gptq-7b-shaped-{args.layers}L-v{args.vocab}"
    rotations = args.workdir / f"rotations-{args.layers}L.safetensors"
    if not (checkpoint / "model.safetensors").is_file():
        print(f"building {checkpoint} ...", file=sys.stderr)
        build_checkpoint(checkpoint, args.layers, args.vocab)
    if not rotations.is_file():
        build_rotations(rotations, args.layers)
    size = (checkpoint / "model.safetensors").stat().st_size
    from oftsurgery.io import CheckpointReader

    layer_bytes = sum(i.nbytes for n, i in CheckpointReader(checkpoint).tensors.items() if n.startswith("model.layers.0."))
    load = os.getloadavg()[0]

    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if args.compare != "none":
            old_root = export_revision(args.compare, Path(tmp))
            rows.append((args.compare, run_merge(old_root, checkpoint, rotations, args.workdir / "out-old", "default")))
        rows.append(("this tree", run_merge(ROOT, checkpoint, rotations, args.workdir / "out-new", args.device)))

    print(f"checkpoint: {args.layers} decoder layer(s) 4096/11008 GPTQ 4-bit g128 sym, vocab {args.vocab}, "
          f"{size / 1e6:.0f} MB; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"load average before: {load:.1f} (cores: {os.cpu_count()}); CPU seconds: all threads of the merging "
          f"process; last layer: the last decoder layer's loop iteration ({layer_bytes / 1e6:.0f} MB per layer), "
          "after the one-time costs of the first")
    print("| code | seconds | MB/s of checkpoint | CPU seconds | last layer s | its MB/s | peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        last = r["layer_seconds"][-1] if r["layer_seconds"] else float("nan")
        print(f"| {name} | {r['seconds']:.1f} | {size / 1e6 / r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {last:.2f} | "
              f"{layer_bytes / 1e6 / last:.1f} | {r['max_rss_bytes'] / 1e9:.2f} |")


if __name__ == "__main__":
    main()
