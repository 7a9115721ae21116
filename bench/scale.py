"""Scale bench: merge cost per decoder layer on real model shapes, next to GPTQModel quantizing the same layers.

Builds (or reuses, from --workdir) a synthetic GPTQ checkpoint of real shapes with
`oftsurgery.testing.synthetic` (Llama-2-7B or a 70B: 4-bit g128 sym, random weights with outliers,
packed by our codec; random exact-Cayley rotations b=32 on all 7 linears; its fp16 twin), then in
one run, each in its own child process (so peak memory is that run's alone):

  - `merge --method rtn` and the calibrated merge: total seconds, seconds per decoder layer (the
    engine's per-decoder-layer loop, timed around each iteration: calibration forward, Hessians,
    solve, packing and writing of that layer), the per-linear solve seconds of merge_report.json
    summed per decoder layer, GB/s of decoder-layer checkpoint bytes, peak host RSS and peak GPU
    memory (torch.cuda.max_memory_allocated);
  - the peer: GPTQModel quantizing the fp16 twin (same tokens: same text, same cut into seq-len
    rows) after a 1-layer warm-up quantization in the same process (kernel compilation paid there),
    seconds per decoder layer = quantize() wall / layers; `ours / peer` is per decoder layer.

    python bench/scale.py --preset tiny                                  # seconds, smoke test
    python bench/scale.py --preset 7b --layers 1 --calib-tokens 512      # 2-core CPU machine
    python bench/scale.py --preset 7b --layers 2 --device cuda           # GPU machine, 8192 tokens
    python bench/scale.py --preset 70b --layers 1 --device cuda --vocab 4096 --methods calibrated
    python bench/scale.py --preset 7b --layers 2 --device cuda --methods calibrated --nproc 1,2,4,8 --no-peer

`--nproc` adds runs of the same merges under `torchrun --standalone --nproc-per-node N` (each rank
its own GPU with --device cuda; on the CPU each rank gets OMP_NUM_THREADS = this process's threads / N),
one row per rank count (docs/distributed.md).

Prints a markdown table and writes everything measured as JSON (--json, default under --workdir).
Nothing is downloaded: the tokenizer is trained locally, calibration text is built in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULT_MARK = "SCALE-BENCH-RESULT "
# what every child runs first: its own peak RSS, read from /proc at the end (VmHWM). The parent's
# wait4 ru_maxrss would also count the bench's own memory at fork time (Linux keeps the larger
# across exec), e.g. right after it has built a checkpoint.
VMHWM = r"""
def vmhwm():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
"""

MERGE_CHILD = r"""
import json, os, sys, time
ckpt, rotations, out, method, device, calib, tokens, seq_len = sys.argv[1:9]
import torch
import oftsurgery.merge.engine as engine
from oftsurgery.merge import MergeOptions, merge_checkpoint

# time each iteration of the engine's per-decoder-layer loop (its progress-bar iterator; the calibrated
# loop's own module where the tree has one)
loops = []
try:
    import oftsurgery.merge.calibrated_loop as calibrated_loop
except ImportError:  # an older tree: both loops in engine.py
    calibrated_loop = None
def timing(original):
    def timed(iterable, *args, **kwargs):
        marks = [time.perf_counter()]
        loops.append(marks)
        for item in original(iterable, *args, **kwargs):
            marks[-1] = time.perf_counter()
            yield item
            marks.append(time.perf_counter())
    return timed
for module in (engine, calibrated_loop):
    if module is not None and hasattr(module, "_progress"):
        module._progress = timing(module._progress)
# one-time process costs stay out of the timing: gptqmodel's import (its packer packs every layer)
# and, on a GPU, creating the CUDA context
from oftsurgery._deps import gptqmodel
gptqmodel()
gpu = torch.cuda.is_available() and (device.startswith("cuda") or device == "auto")
if gpu:
    torch.zeros(1, device=device if device.startswith("cuda") else "cuda")
    torch.cuda.reset_peak_memory_stats()
started = time.perf_counter()
merge_checkpoint(ckpt, rotations, out, MergeOptions(method=method, device=device, calib=calib,
    calib_tokens=int(tokens), seq_len=int(seq_len), overwrite=True, progress=False))
seconds = time.perf_counter() - started
marks = max(loops, key=len) if loops else []
if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 reports (its loop waits for the others)
  print("SCALE-BENCH-RESULT " + json.dumps({
    "seconds": seconds,
    "layer_seconds": [b - a for a, b in zip(marks, marks[1:])] or None,
    "peak_gpu_bytes": torch.cuda.max_memory_allocated() if gpu else None,
    "peak_rss_bytes": vmhwm(),
  }), flush=True)
"""

PEER_CHILD = r"""
import gc, json, sys, time
fp_dir, warm_dir, device, calib, tokens, seq_len, bits, group_size = sys.argv[1:9]
import torch
from oftsurgery._deps import gptqmodel as import_gptqmodel
gptqmodel = import_gptqmodel()
from gptqmodel.utils.backend import BACKEND
from transformers import AutoTokenizer
from oftsurgery.merge.calibration.text import calibration_batches, load_calibration_text

text, _ = load_calibration_text(calib)

def quantize(path):
    # the merge's own token cut (same text, same seq-len rows), in gptqmodel's input format
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = calibration_batches(text, tokenizer, int(tokens), int(seq_len))
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    qcfg = gptqmodel.QuantizeConfig(bits=int(bits), group_size=int(group_size), sym=True, desc_act=False,
                                    format="gptq", offload_to_disk=False)
    model = gptqmodel.GPTQModel.load(path, qcfg, device=device)
    started = time.perf_counter()
    # the torch kernel for the quantized model: no Marlin build (minutes) inside the timing
    log = model.quantize(rows, batch_size=1, backend=BACKEND.TORCH, tokenizer=tokenizer)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return model, time.perf_counter() - started, int(ids.numel()), log

warm_model, warm_seconds, _, _ = quantize(warm_dir)
del warm_model
gc.collect()
gpu = torch.cuda.is_available() and device.startswith("cuda")
if gpu:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
model, seconds, used_tokens, log = quantize(fp_dir)
per_module = {}
for entries in (log.values() if isinstance(log, dict) else [log or []]):
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and "layer" in entry and "module" in entry and "time" in entry:
            per_module[f"{entry['layer']}.{entry['module']}"] = float(entry["time"])
print("SCALE-BENCH-RESULT " + json.dumps({
    "seconds": seconds, "warmup_seconds": warm_seconds, "calib_tokens": used_tokens, "module_seconds": per_module,
    "peak_gpu_bytes": torch.cuda.max_memory_allocated() if gpu else None,
    "peak_rss_bytes": vmhwm(),
}), flush=True)
"""


# --------------------------------------------------------------------------------------------------
# children
# --------------------------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # gptqmodel sizes worker pools from the CPU count at import; on small machines it then refuses
    # to quantize unless told (docs/environment.md). Larger machines keep gptqmodel's own default.
    if (os.cpu_count() or 1) <= 4:
        env.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    return env


def _address_space_limit(limit_bytes: int | None):
    """A preexec_fn capping the child's address space, so a run that outgrows a shared machine fails
    alone (MemoryError) instead of waking the kernel's OOM killer."""
    if not limit_bytes:
        return None

    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return apply


def run_child(code: str, args: list[str], log_path: Path, label: str, memory_limit: int | None = None,
              nproc: int | None = None) -> dict:
    """Run a snippet in a fresh Python with its output in log_path; return its result line, or an error.

    With `nproc`, the snippet runs on that many ranks under `torchrun --standalone` (the peak RSS is
    then that of the largest rank, as wait4 reports the maximum over the waited-for processes)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[scale] {label} ... (log: {log_path})", flush=True)
    started = time.perf_counter()
    env = child_env()
    code = VMHWM + code
    if nproc is None:
        command = [sys.executable, "-c", code, *args]
    else:
        script = log_path.with_suffix(".py")
        script.write_text(code, encoding="utf-8")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   str(script), *args]
        # the CPU threads of one process, shared out among the ranks (torchrun would give each one)
        env["OMP_NUM_THREADS"] = str(max(1, _threads() // nproc))
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=str(REPO), preexec_fn=_address_space_limit(memory_limit))
        # wait4: this child's own resource usage, so its peak RSS is known even when it fails
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    peak_rss = usage.ru_maxrss * 1024  # kilobytes on Linux; an upper bound, used when the child reports none
    text = log_path.read_text(encoding="utf-8", errors="replace")
    results = [line[len(RESULT_MARK):] for line in text.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not results:
        tail = [line for line in text.splitlines() if line.strip()][-3:]
        print(f"[scale] {label} FAILED (exit {proc.returncode}) after {wall:.0f}s: {' | '.join(tail)}", flush=True)
        return {"error": f"exit {proc.returncode}: {tail[-1] if tail else 'no output'}", "wall_s": wall,
                "peak_rss_bytes": peak_rss, "log": str(log_path)}
    result = json.loads(results[-1])
    if nproc is not None or not result.get("peak_rss_bytes"):  # ranks: the largest, as wait4 reports it
        result["peak_rss_bytes"] = peak_rss
    result.update({"wall_s": wall, "log": str(log_path)})
    print(f"[scale] {label} done in {wall:.1f}s", flush=True)
    return result


def _threads() -> int:
    import torch

    return int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------


def linear_kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def merge_figures(result: dict, report: dict | None, layers: int, layer_bytes: int) -> dict:
    """Per-decoder-layer figures of one merge run (result of MERGE_CHILD + its merge_report.json)."""
    from oftsurgery.quant.layout import decoder_layer_index

    if "error" in result:
        return result
    loop = result.get("layer_seconds")
    if loop and len(loop) == layers:
        per_layer, source = sum(loop) / layers, "engine loop"
    else:  # the engine no longer exposes its loop: fall back to the whole merge
        per_layer, source = result["seconds"] / layers, "total / layers"
    solve_by_layer: dict[int, float] = {}
    solve_by_kind: dict[str, list[float]] = {}
    for entry in (report or {}).get("layers", []):
        index = decoder_layer_index(entry["name"])
        if index is None:
            continue
        solve_by_layer[index] = solve_by_layer.get(index, 0.0) + float(entry.get("seconds", 0.0))
        solve_by_kind.setdefault(linear_kind(entry["name"]), []).append(float(entry.get("seconds", 0.0)))
    figures = dict(result)
    figures.update({
        "per_layer_s": per_layer,
        "per_layer_source": source,
        "fixed_overhead_s": result["seconds"] - per_layer * layers,
        "solve_per_layer_s": (sum(solve_by_layer.values()) / len(solve_by_layer)) if solve_by_layer else None,
        "solve_by_layer_s": solve_by_layer,
        "solve_by_kind_s": {k: sum(v) / len(v) for k, v in solve_by_kind.items()},
        # bytes of ONE decoder layer over the time of one (layer_bytes counts all of them)
        "gb_per_s": layer_bytes / layers / per_layer / 1e9 if per_layer > 0 else None,
        # the last layer alone: what every layer after the first costs once one-time costs are paid
        "last_layer_gb_per_s": (layer_bytes / layers / loop[-1] / 1e9) if loop and len(loop) == layers and loop[-1] > 0
        else None,
        "codes_changed": (report or {}).get("summary", {}).get("codes_changed"),
        "kept_fraction": (report or {}).get("summary", {}).get("kept_fraction"),
        "calib_tokens": (report or {}).get("calib_tokens"),
        "modes": sorted({entry.get("mode") for entry in (report or {}).get("layers", [])} - {None}),
    })
    return figures


def peer_figures(result: dict, layers: int) -> dict:
    if "error" in result:
        return result
    figures = dict(result)
    by_kind: dict[str, list[float]] = {}
    for name, seconds in result.get("module_seconds", {}).items():
        by_kind.setdefault(linear_kind(name), []).append(seconds)
    figures.update({"per_layer_s": result["seconds"] / layers, "per_layer_source": "quantize() / layers",
                    "solve_by_kind_s": {k: sum(v) / len(v) for k, v in by_kind.items()}})
    return figures


def _gb(value) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def render(results: dict) -> str:
    setup = results["setup"]
    rows = results["runs"]
    peer = rows.get("peer")
    peer_layer = peer.get("per_layer_s") if peer and "error" not in peer else None
    lines = [
        f"bench/scale.py: {setup['preset']} x {setup['layers']} decoder layer(s) (hidden {setup['hidden_size']}, "
        f"intermediate {setup['intermediate_size']}, heads {setup['num_heads']}/{setup['num_kv_heads']}, vocab "
        f"{setup['vocab_size']}), GPTQ 4-bit g128 sym, OFT b={setup['block_size']} on 7 linears; "
        f"{setup['calib_tokens']} calibration tokens ({setup['calib']}, seq {setup['seq_len']}); device "
        f"{setup['device']}; {setup['machine']}",
        f"checkpoint {_size(setup['checkpoint_bytes'])}, decoder layers {_size(setup['decoder_layer_bytes'])} "
        f"({_size(setup['decoder_layer_bytes'] / setup['layers'])} per layer)",
        "",
        "| run | ranks | total s | per decoder layer s | solve s / layer | MB/s | peak RSS GB | peak GPU GB | ours / peer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    labels = {"rtn": "merge --method rtn", "calibrated": "merge (calibrated)",
              "peer": "GPTQModel quantize (peer, warm)"}
    for key, run in rows.items():
        method, _, ranks = key.partition("@")  # "calibrated@4": the calibrated merge on 4 ranks
        label = labels.get(method, method)
        ranks = ranks or "1"
        if "error" in run:
            lines.append(f"| {label} | {ranks} | failed after {run['wall_s']:.0f} s: {run['error'][:100]} | | | | "
                         f"{_gb(run.get('peak_rss_bytes'))} | | |")
            continue
        ratio = "-" if key == "peer" or not peer_layer else f"{run['per_layer_s'] / peer_layer:.2f}x"
        solve = run.get("solve_per_layer_s")
        if key == "peer":
            module = run.get("module_seconds") or {}
            solve = sum(module.values()) / setup["layers"] if module else None
        gbps = run.get("gb_per_s")
        lines.append(
            f"| {label} | {ranks} | {run['seconds']:.1f} | {run['per_layer_s']:.2f} | "
            f"{'-' if solve is None else f'{solve:.2f}'} | {'-' if gbps is None else f'{gbps * 1e3:.1f}'} | "
            f"{_gb(run.get('peak_rss_bytes'))} | {_gb(run.get('peak_gpu_bytes'))} | {ratio} |"
        )
    kinds = [k for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
             if any(k in (run.get("solve_by_kind_s") or {}) for run in rows.values())]
    if kinds:
        lines += ["", "seconds per linear (mean over decoder layers; ours: merge_report.json `seconds`, "
                      "peer: GPTQModel's quant log `time`)", "",
                  "| run | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for key, run in rows.items():
            by_kind = run.get("solve_by_kind_s") or {}
            if by_kind:
                method, _, ranks = key.partition("@")
                name = labels.get(method, method) + (f" ({ranks} ranks)" if ranks else "")
                lines.append(f"| {name} | " + " | ".join(
                    f"{by_kind[k]:.2f}" if k in by_kind else "-" for k in kinds) + " |")
    notes = []
    for key in rows:
        run = rows[key]
        if key != "peer" and "error" not in run and run:
            each = run.get("layer_seconds") or []
            last = run.get("last_layer_gb_per_s")
            notes.append(f"{key}: per decoder layer from the {run['per_layer_source']}"
                         + (f" ({', '.join(f'{x:.2f}' for x in each)} s; the last at {last * 1e3:.3g} MB/s)"
                            if each and last else "")
                         + f", fixed overhead {run['fixed_overhead_s']:.1f} s, modes {','.join(run['modes']) or '-'}, "
                         f"codes changed {(run['codes_changed'] or 0):.2%}")
    if peer and "error" not in peer:
        notes.append(f"peer: warm-up (1 layer, same process) {peer['warmup_seconds']:.1f} s, "
                     f"{peer['calib_tokens']} tokens")
    return "\n".join(lines + [""] + notes)


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def machine_description(device: str) -> str:
    import torch

    text = f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}"
    if device.startswith("cuda") and torch.cuda.is_available():
        text = f"{torch.cuda.get_device_name(0)}, " + text
    return text


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "gptqmodel"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    try:
        out["oftsurgery_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                                  capture_output=True, text=True).stdout.strip() or "-"
    except OSError:
        out["oftsurgery_commit"] = "-"
    return out


def warm_packer() -> None:
    """Build gptqmodel's JIT-compiled CPU packer now (cached on disk), so no merge pays it."""
    import torch

    from oftsurgery.quant.gptq import pack_gptq
    from oftsurgery.quant.grid import quantize_weight

    pack_gptq(quantize_weight(torch.randn(64, 128) * 0.02, 4, 128, sym=True), "gptq")


def parse_args(argv=None) -> argparse.Namespace:
    from oftsurgery.testing.models import default_cache_dir
    from oftsurgery.testing.synthetic import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="7b", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=2, help="decoder layers in the synthetic checkpoint")
    parser.add_argument("--vocab", type=int, default=None, help="embedding rows (default: the preset's; smaller "
                                                                 "keeps embeddings cheap)")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256, help="calibration row length (the merge's default)")
    parser.add_argument("--calib", default="builtin:english", help="calibration text for merge and peer alike")
    parser.add_argument("--device", default="auto", help="auto (cuda when torch sees one, else cpu), cpu, cuda or "
                                                          "cuda:N, for the merges and the peer alike")
    parser.add_argument("--methods", default="rtn,calibrated", help="comma-separated: rtn, calibrated")
    parser.add_argument("--nproc", default="1", help="comma-separated rank counts, e.g. 1,2,4,8: each merge also "
                                                       "runs under torchrun with that many ranks (1: one plain process)")
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                        help="also time GPTQModel quantizing the fp16 twin")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                        help="merge a 1-layer checkpoint of the same shapes once before timing (default: on for "
                             "cuda, where kernels compile on first use; off for cpu)")
    parser.add_argument("--rotation-strength", type=float, default=0.002,
                        help="std of the random OFT skew parameters; 0.002 moves weights by ~2%% (rtn then "
                             "changes no code, as with real trained adapters); 0 gives identity rotations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(default_cache_dir() / "bench-scale"))
    parser.add_argument("--json", default=None, help="where to write the results (default: under --workdir)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the merged checkpoints")
    parser.add_argument("--memory-limit", type=float, default=None, metavar="GB",
                        help="cap each child's address space (CPU runs on shared machines: a run that needs more "
                             "fails alone; CUDA maps far more virtual memory than it uses, so not with cuda)")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {"rtn", "calibrated"})
    if unknown or not methods:
        parser.error(f"--methods takes rtn and/or calibrated, not {','.join(unknown) or 'nothing'}")
    if args.layers < 1 or args.calib_tokens < args.seq_len:
        parser.error("--layers must be at least 1 and --calib-tokens at least --seq-len")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.memory_limit and args.device.startswith("cuda"):
        parser.error("--memory-limit caps virtual memory, which CUDA reserves in bulk; use it for CPU runs only")
    args.methods = methods
    try:
        args.nproc = sorted({int(n) for n in args.nproc.split(",") if n.strip()})
    except ValueError:
        parser.error(f"--nproc takes rank counts like 1,2,4,8, not {args.nproc!r}")
    if not args.nproc or min(args.nproc) < 1:
        parser.error("--nproc takes positive rank counts")
    if max(args.nproc) > 1 and args.device.startswith("cuda:"):
        parser.error("with --nproc above 1 pass --device cuda: each rank uses the GPU of its LOCAL_RANK")
    args.memory_limit = int(args.memory_limit * 1e9) if args.memory_limit else None
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from oftsurgery.io import CheckpointReader
    from oftsurgery.testing.synthetic import decoder_layer_bytes, expected_size_bytes, synthetic_checkpoint

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device} was requested but torch sees no CUDA device.")
    work = Path(args.workdir).expanduser()
    logs = work / "logs"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    build = dict(num_layers=args.layers, vocab_size=args.vocab, seed=args.seed,
                 rotation_strength=args.rotation_strength, cache_dir=work / "synthetic")
    log = lambda msg: print(f"[scale] {msg}", flush=True)  # noqa: E731
    need = expected_size_bytes(args.preset, args.layers, args.vocab)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < 1.2 * (need["gptq"] * 2 + need["fp16"]):  # checkpoint, its fp16 twin, one merged output at a time
        log(f"warning: {free / 1e9:.1f} GB free under {work}; a build and a merge need about "
            f"{(need['gptq'] * 2 + need['fp16']) / 1e9:.1f} GB (less if the build is cached)")
    started = time.perf_counter()
    ckpt = synthetic_checkpoint(args.preset, log=log, **build)
    log(f"checkpoint {ckpt.root} ready after {time.perf_counter() - started:.0f}s")
    warmup = args.warmup if args.warmup is not None else args.device.startswith("cuda")
    warm = None
    if args.peer or warmup:  # the same layer shapes, 1 layer, a small vocabulary: what warm-ups run on
        warm = synthetic_checkpoint(args.preset, **{**build, "num_layers": 1,
                                                    "vocab_size": min(ckpt.spec["vocab_size"], 1024)}, log=log)
    warm_packer()
    reader = CheckpointReader(ckpt.gptq)
    layer_bytes = decoder_layer_bytes(ckpt.gptq)
    setup = {**ckpt.spec, "layers": args.layers, "device": args.device, "calib": args.calib,
             "calib_tokens": args.calib_tokens, "seq_len": args.seq_len, "methods": args.methods,
             "checkpoint": str(ckpt.gptq), "checkpoint_bytes": sum(i.nbytes for i in reader.tensors.values()),
             "decoder_layer_bytes": layer_bytes, "machine": machine_description(args.device),
             "memory_limit_bytes": args.memory_limit,
             "versions": versions(), "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:]))}
    results = {"setup": setup, "runs": {}}
    json_path = Path(args.json) if args.json else work / "results" / (
        f"scale-{args.preset}-L{args.layers}-{args.device.replace(':', '')}-{stamp}.json")

    def save() -> str:
        """Write what is measured so far: a long run that is stopped keeps its finished rows."""
        results["table"] = render(results)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        return results["table"]

    merge_args = lambda src, out, method: [str(src.gptq), str(src.rotations), str(out), method,  # noqa: E731
                                           args.device, args.calib, str(args.calib_tokens), str(args.seq_len)]
    if warmup:
        for method in args.methods:
            run_child(MERGE_CHILD, merge_args(warm, work / "merged-warmup", method),
                      logs / f"{stamp}-warmup-{method}.log", f"warm-up merge ({method}, 1 layer)")
        shutil.rmtree(work / "merged-warmup", ignore_errors=True)
    for method in args.methods:
        for nproc in args.nproc:
            key = method if nproc == 1 else f"{method}@{nproc}"
            out = work / f"merged-{key.replace('@', '-np')}"
            result = run_child(MERGE_CHILD, merge_args(ckpt, out, method), logs / f"{stamp}-{key.replace('@', '-np')}.log",
                               f"merge --method {method}" + (f" on {nproc} ranks" if nproc > 1 else ""),
                               args.memory_limit, nproc=nproc if nproc > 1 else None)
            report_path = out / "merge_report.json"
            report = json.loads(report_path.read_text()) if "error" not in result and report_path.is_file() else None
            results["runs"][key] = merge_figures(result, report, args.layers, layer_bytes)
            save()
            if not args.keep_outputs:
                shutil.rmtree(out, ignore_errors=True)
    if args.peer:
        result = run_child(PEER_CHILD, [str(ckpt.fp16), str(warm.fp16), args.device, args.calib,
                                        str(args.calib_tokens), str(args.seq_len), str(ckpt.spec["bits"]),
                                        str(ckpt.spec["group_size"])],
                           logs / f"{stamp}-peer.log", "GPTQModel quantize (peer: warm-up 1 layer, then timed)",
                           args.memory_limit)
        results["runs"]["peer"] = peer_figures(result, args.layers)

    table = save()
    print("\n" + table + f"\n\nJSON: {json_path}", flush=True)
    return results


if __name__ == "__main__":
    main()
