"""Scale bench: what a user waits for. `oftsurgery merge` against GPTQModel load + quantize + save, at 7B/70B shapes.

The contract (the columns and the reasons: docs/performance.md, "At real model sizes"):
  1. Inputs: synthetic Llama GPTQ 4-bit g128 checkpoints (oftsurgery.testing.synthetic), random b=32 rotations on
     all 7 linears, fp16 twins; one per --depths (default 2 and --layers), a 32-layer one with --whole, and a
     1-layer one of the same shapes for the warm-ups.
  2. Ours: a fresh `python -m oftsurgery merge CKPT ROTATIONS --out OUT --device D -q --method M` (+ --calib-tokens,
     --seq-len, --calib for the calibrated merge): the CLI, nothing else. The peer: a fresh python running
     GPTQModel.load(fp16 twin) + quantize() + save() on the same tokens (same text, same seq-len rows), batch_size
     = the rows our calibration forward runs at once (both printed).
  3. Warm-up: each side once on the 1-layer checkpoint, in its own process, before anything is timed (the JIT
     caches on disk, Triton's and gptqmodel's, are then warm for both).
  4. Timed: each process's wall time, start to exit. Per side, wall = fixed + per_layer x layers fitted over the
     depths, ratios ours/peer of both; --whole times both at 32 layers beside the fit's prediction.
  5. Memory: each process tree's peak GPU memory as nvidia-smi lists it (polled every 0.2 s), peak host RSS.
  6. --modes loop (on by default): the older in-process table at the deepest depth (one iteration of our layer
     loop vs the peer's quantize() / layers after a 1-layer quantize() in the same process).

    python bench/scale.py --preset tiny --layers 2 --whole 3 --calib-tokens 512 --seq-len 128  # CPU smoke run
    python bench/scale.py --preset 7b --build-only --whole --workdir .cache/bench-scale        # build (CPU)
    python bench/scale.py --preset 7b --device cuda --whole --workdir .cache/bench-scale       # 2, 8, 32 layers
    python bench/scale.py --preset 70b --layers 4 --vocab 4096 --device cuda --methods calibrated
    python bench/scale.py --preset 7b --device cuda --code /tmp/before --no-peer   # this tree and another one

Prints markdown tables and writes everything measured as JSON after each run (--json, default under --workdir).
Nothing is downloaded: the tokenizer is trained locally, calibration text is built in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULT_MARK = "SCALE-BENCH-RESULT "
WHOLE_LAYERS = 32  # --whole: a whole Llama-2-7B
WARM_VOCAB = 1024  # embedding rows of the 1-layer warm-up checkpoint
POLL_SECONDS = 0.2  # how often the parent samples a running child's GPU memory and RSS

# --------------------------------------------------------------------------------------------------
# what the children run
# --------------------------------------------------------------------------------------------------

# the start of every `python -c` child: its own peak RSS, read from /proc at the end (VmHWM). The parent's
# wait4 ru_maxrss would also count the bench's own memory at fork time (Linux keeps the larger across exec).
VMHWM = r"""
def vmhwm():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
def torch_gpu(torch, gpu):
    return {"torch_allocated_bytes": torch.cuda.max_memory_allocated() if gpu else None,
            "torch_reserved_bytes": torch.cuda.max_memory_reserved() if gpu else None}
"""

# The peer's whole job in a fresh process, as a user of GPTQModel runs it: load the fp16 model, quantize it
# on our token rows, save it. Timed by the parent from start to exit; the inner clocks are for the notes.
PEER_PROCESS_CHILD = r"""
import json, sys, time
started = time.perf_counter()
fp_dir, out_dir, device, calib, tokens, seq_len, bits, group_size, batch_size = sys.argv[1:10]
import torch
import gptqmodel
from gptqmodel.utils.backend import BACKEND
from transformers import AutoTokenizer
from oftsurgery.merge.calibration.text import calibration_batches, load_calibration_text

tokenizer = AutoTokenizer.from_pretrained(fp_dir)
text, _ = load_calibration_text(calib)
ids = calibration_batches(text, tokenizer, int(tokens), int(seq_len))  # the merge's own cut into rows
rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
qcfg = gptqmodel.QuantizeConfig(bits=int(bits), group_size=int(group_size), sym=True, desc_act=False,
                                format="gptq", offload_to_disk=False)
gpu = torch.cuda.is_available() and device.startswith("cuda")
prepared = time.perf_counter()
model = gptqmodel.GPTQModel.load(fp_dir, qcfg, device=device)
loaded = time.perf_counter()
# the torch kernel for the quantized model: no Marlin build (minutes on a fresh machine)
log = model.quantize(rows, batch_size=int(batch_size), backend=BACKEND.TORCH, tokenizer=tokenizer)
if gpu:
    torch.cuda.synchronize()
quantized = time.perf_counter()
model.save(out_dir)
saved = time.perf_counter()
print("SCALE-BENCH-RESULT " + json.dumps({
    "import_s": prepared - started, "load_s": loaded - prepared, "quantize_s": quantized - loaded,
    "save_s": saved - quantized, "calib_tokens": int(ids.numel()), "batch_size": int(batch_size),
    "module_seconds": quant_log_seconds(log), **torch_gpu(torch, gpu), "peak_rss_bytes": vmhwm(),
}), flush=True)
"""

QUANT_LOG = r"""
def quant_log_seconds(log):
    # GPTQModel's quant log: {"layer.module": its `time`}
    out = {}
    for entries in (log.values() if isinstance(log, dict) else [log or []]):
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and "layer" in entry and "module" in entry and "time" in entry:
                out[f"{entry['layer']}.{entry['module']}"] = float(entry["time"])
    return out
"""

# loop mode, ours: merge_checkpoint in-process, each iteration of the per-decoder-layer loop timed
LOOP_MERGE_CHILD = r"""
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
    "seconds": seconds, "layer_seconds": [b - a for a, b in zip(marks, marks[1:])] or None,
    **torch_gpu(torch, gpu), "peak_rss_bytes": vmhwm(),
  }), flush=True)
"""

# loop mode, the peer: a 1-layer quantization first in the same process, then the timed quantize()
LOOP_PEER_CHILD = r"""
import gc, json, sys, time
fp_dir, warm_dir, device, calib, tokens, seq_len, bits, group_size, batch_size = sys.argv[1:10]
import torch
from oftsurgery._deps import gptqmodel as import_gptqmodel
gptqmodel = import_gptqmodel()
from gptqmodel.utils.backend import BACKEND
from transformers import AutoTokenizer
from oftsurgery.merge.calibration.text import calibration_batches, load_calibration_text

text, _ = load_calibration_text(calib)

def quantize(path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = calibration_batches(text, tokenizer, int(tokens), int(seq_len))
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    qcfg = gptqmodel.QuantizeConfig(bits=int(bits), group_size=int(group_size), sym=True, desc_act=False,
                                    format="gptq", offload_to_disk=False)
    model = gptqmodel.GPTQModel.load(path, qcfg, device=device)
    started = time.perf_counter()
    log = model.quantize(rows, batch_size=int(batch_size), backend=BACKEND.TORCH, tokenizer=tokenizer)
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
print("SCALE-BENCH-RESULT " + json.dumps({
    "seconds": seconds, "warmup_seconds": warm_seconds, "calib_tokens": used_tokens,
    "module_seconds": quant_log_seconds(log), **torch_gpu(torch, gpu), "peak_rss_bytes": vmhwm(),
}), flush=True)
"""

# --------------------------------------------------------------------------------------------------
# running a child: its wall time, and its peak memory as the machine sees it
# --------------------------------------------------------------------------------------------------


def _nvidia_smi(*query: str) -> list[list[str]] | None:
    """Rows of an `nvidia-smi --query-...` in csv without units; None where nvidia-smi is missing or fails."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        done = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return [[cell.strip() for cell in line.split(",")] for line in done.stdout.splitlines() if line.strip()]


def _mib(cell: str) -> int | None:
    try:
        return int(float(cell)) * 1024 * 1024
    except ValueError:  # "[N/A]"
        return None


def _process_tree(root: int) -> set[int]:
    """`root` and all its descendants (from /proc: torchrun's ranks, anything a child spawns)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {root}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo += children.get(pid, [])
    return tree


def _vmhwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


class Watch:
    """Samples a running child every POLL_SECONDS from the parent: the GPU memory nvidia-smi lists for the
    child's process tree (summed over its pids; the caching allocator's reserve and the CUDA context
    included), the whole device's used memory above what it was before the child started (the fallback where
    nvidia-smi shows no pid of ours, e.g. in a container), and the largest VmHWM in the tree."""

    def __init__(self) -> None:
        used = _nvidia_smi("--query-gpu=memory.used")
        self.smi = used is not None
        self.before = sum(_mib(row[0]) or 0 for row in used) if used else 0
        self.gpu_pids = self.gpu_device = self.rss = 0
        self.pid_seen = False
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, pid: int) -> None:
        self._thread = threading.Thread(target=self._run, args=(pid,), daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.smi:
            gpu, source = None, None
        elif self.pid_seen:
            gpu, source = self.gpu_pids, "process"
        else:
            gpu, source = self.gpu_device, "device"
        return {"smi_gpu_bytes": gpu, "smi_gpu_source": source, "smi_samples": self.samples,
                "polled_rss_bytes": self.rss or None}

    def _run(self, pid: int) -> None:
        while True:
            self._sample(pid)
            if self._stop.wait(POLL_SECONDS):
                return

    def _sample(self, pid: int) -> None:
        tree = _process_tree(pid)
        self.rss = max([self.rss] + [_vmhwm(p) or 0 for p in tree])
        if not self.smi:
            return
        apps = _nvidia_smi("--query-compute-apps=pid,used_memory") or []
        mine = [_mib(row[1]) or 0 for row in apps if len(row) >= 2 and row[0].isdigit() and int(row[0]) in tree]
        if mine:
            self.pid_seen = True
            self.gpu_pids = max(self.gpu_pids, sum(mine))
        used = None if self.pid_seen else _nvidia_smi("--query-gpu=memory.used")  # needed only as the fallback
        if used:
            self.gpu_device = max(self.gpu_device, sum(_mib(row[0]) or 0 for row in used) - self.before)
        self.samples += 1


def _address_space_limit(limit_bytes: int | None):
    """A preexec_fn capping the child's address space, so a run that outgrows a shared machine fails
    alone (MemoryError) instead of waking the kernel's OOM killer."""
    if not limit_bytes:
        return None

    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return apply


def child_env(code_root: Path = REPO) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(code_root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # gptqmodel sizes worker pools from the CPU count at import; on small machines it then refuses
    # to quantize unless told (docs/environment.md). Larger machines keep gptqmodel's own default.
    if (os.cpu_count() or 1) <= 4:
        env.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    return env


def run_process(command: list[str], log_path: Path, label: str, *, code_root: Path = REPO,
                memory_limit: int | None = None, nproc: int | None = None, expect_result: bool = True) -> dict:
    """Run `command` (its output in log_path) and return its wall time from start to exit, its peak memory
    and, with expect_result, its result line (an "error" entry where it failed)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[scale] {label} ... (log: {log_path})", flush=True)
    env = child_env(code_root)
    if nproc is not None:  # the CPU threads of one process, shared out among the ranks (torchrun gives each one)
        env["OMP_NUM_THREADS"] = str(max(1, _threads() // nproc))
    watch = Watch()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + shlex.join(c if len(c) < 200 else "<code>" for c in command) + "\n")
        log.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(code_root),
                                preexec_fn=_address_space_limit(memory_limit))
        watch.start(proc.pid)
        # wait4: this child's own resource usage, so a peak RSS is known even when it fails
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
    memory = watch.stop()
    text = log_path.read_text(encoding="utf-8", errors="replace")
    results = [line[len(RESULT_MARK):] for line in text.splitlines() if line.startswith(RESULT_MARK)]
    result = {"wall_s": wall, "exit": proc.returncode, "log": str(log_path), **memory}
    if proc.returncode != 0 or (expect_result and not results):
        tail = [line for line in text.splitlines() if line.strip()][-3:]
        print(f"[scale] {label} FAILED (exit {proc.returncode}) after {wall:.0f}s: {' | '.join(tail)}", flush=True)
        result["error"] = f"exit {proc.returncode}: {tail[-1] if tail else 'no output'}"
    elif results:
        result.update(json.loads(results[-1]))
    # the child's own VmHWM where it reports one (exact), else the polled one (up to POLL_SECONDS late), else
    # wait4's ru_maxrss (an upper bound: it also counts the bench's memory at fork time); ranks: the largest
    polled = memory["polled_rss_bytes"] or 0
    reported = (result.get("peak_rss_bytes") or 0) if nproc is None else 0
    result["peak_rss_bytes"] = max(polled, reported) or usage.ru_maxrss * 1024
    if "error" not in result:
        print(f"[scale] {label} done in {wall:.1f}s", flush=True)
    return result


def _threads() -> int:
    import torch

    return int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())


# --------------------------------------------------------------------------------------------------
# the two sides' commands
# --------------------------------------------------------------------------------------------------


def split_method(method: str) -> tuple[str, list[str]]:
    """"calibrated+r16+t100" -> ("calibrated", ["--residual-rank", "16", "--tune-steps", "100"])."""
    base, *stages = method.split("+")
    extra = []
    for stage in stages:
        flag = {"r": "--residual-rank", "t": "--tune-steps"}[stage[0]]
        extra += [flag, str(int(stage[1:]))]
    return base, extra


def ours_command(ckpt, out: Path, method: str, args, nproc: int) -> list[str]:
    """The user's command line: the CLI, under torchrun for nproc > 1 (docs/distributed.md)."""
    method, stages = split_method(method)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc-per-node={nproc}"]
    device = "cuda" if nproc > 1 and args.device.startswith("cuda") else args.device
    # rtn reads no text: the CLI refuses the calibration options there
    calibration = [] if method == "rtn" else ["--calib-tokens", str(args.calib_tokens), "--seq-len", str(args.seq_len),
                                              "--calib", args.calib]
    return launcher + ["-m", "oftsurgery", "merge", str(ckpt.gptq), str(ckpt.rotations), "--out", str(out),
                       "--device", device, *calibration, "-q", "--method", method, *stages]


def peer_command(ckpt, out: Path, args, code: str = PEER_PROCESS_CHILD) -> list[str]:
    return [sys.executable, "-c", VMHWM + QUANT_LOG + code, str(ckpt.fp16), str(out), args.device, args.calib,
            str(args.calib_tokens), str(args.seq_len), str(ckpt.spec["bits"]), str(ckpt.spec["group_size"]),
            str(args.peer_batch_size)]


def our_batch_rows(seq_len: int) -> tuple[int, int]:
    """(rows, tokens) our calibration forward runs at once: the fitted rows go through a layer
    DEFAULT_BATCH_TOKENS // seq_len rows at a time (held-out rows one by one)."""
    try:
        from oftsurgery.merge.calibration.runner import DEFAULT_BATCH_TOKENS as tokens
    except ImportError:
        tokens = 4096
        print("[scale] warning: oftsurgery.merge.calibration.runner.DEFAULT_BATCH_TOKENS is gone; assuming 4096 "
              "tokens per calibration forward (pass --peer-batch-size)", flush=True)
    return max(1, tokens // max(1, seq_len)), tokens


def check_code_tree(root: Path, label: str) -> None:
    """Fail now, not after a build, if the CLI cannot start from `root` or would import another tree."""
    done = subprocess.run([sys.executable, "-c", "import oftsurgery, oftsurgery.cli; print(oftsurgery.__file__)"],
                          env=child_env(root), cwd=str(root), capture_output=True, text=True)
    used = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode != 0:
        raise SystemExit(f"the CLI cannot start from {root} ({label}):\n{done.stderr[-2000:]}")
    if not Path(used).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"{label}: `python -m oftsurgery` from {root} imports {used}, not that tree")


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------


def linear_kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def fit_line(points: list[tuple[int, float]]) -> dict | None:
    """wall = fixed + per_layer x layers, least squares over (layers, wall) points at two depths or more."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return {"fixed_s": my - slope * mx, "per_layer_s": slope, "points": points}


def report_figures(out: Path) -> dict:
    """What our merge_report.json says about a run: the merge's own clock, the solves, what changed."""
    from oftsurgery.quant.layout import decoder_layer_index

    path = out / "merge_report.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text(encoding="utf-8"))
    solve_by_layer: dict[int, float] = {}
    solve_by_kind: dict[str, list[float]] = {}
    for entry in report.get("layers", []):
        index = decoder_layer_index(entry["name"])
        if index is None:
            continue
        solve_by_layer[index] = solve_by_layer.get(index, 0.0) + float(entry.get("seconds", 0.0))
        solve_by_kind.setdefault(linear_kind(entry["name"]), []).append(float(entry.get("seconds", 0.0)))
    return {
        "merge_seconds": report.get("seconds"),
        "solve_per_layer_s": (sum(solve_by_layer.values()) / len(solve_by_layer)) if solve_by_layer else None,
        "solve_by_layer_s": solve_by_layer,
        "solve_by_kind_s": {k: sum(v) / len(v) for k, v in solve_by_kind.items()},
        "codes_changed": report.get("summary", {}).get("codes_changed"),
        "kept_fraction": report.get("summary", {}).get("kept_fraction"),
        "calib_tokens": report.get("calib_tokens"),
        "phase_seconds": report.get("phase_seconds") or {},
        "modes": sorted({entry.get("mode") for entry in report.get("layers", [])} - {None}),
    }


def peer_solve_figures(result: dict, layers: int) -> dict:
    by_kind: dict[str, list[float]] = {}
    for name, seconds in (result.get("module_seconds") or {}).items():
        by_kind.setdefault(linear_kind(name), []).append(seconds)
    module = result.get("module_seconds") or {}
    return {"solve_per_layer_s": sum(module.values()) / layers if module else None,
            "solve_by_kind_s": {k: sum(v) / len(v) for k, v in by_kind.items()}}


def loop_merge_figures(result: dict, report: dict, layers: int, layer_bytes: int) -> dict:
    """Loop mode: per-decoder-layer figures of one in-process merge."""
    if "error" in result:
        return result
    loop = result.get("layer_seconds")
    if loop and len(loop) == layers:
        per_layer, source = sum(loop) / layers, "engine loop"
    else:  # the engine no longer exposes its loop: fall back to the whole merge
        per_layer, source = result["seconds"] / layers, "total / layers"
    figures = {**result, **report}
    figures.update({
        "per_layer_s": per_layer,
        "per_layer_source": source,
        "fixed_overhead_s": result["seconds"] - per_layer * layers,
        # bytes of ONE decoder layer over the time of one (layer_bytes counts all of them)
        "gb_per_s": layer_bytes / layers / per_layer / 1e9 if per_layer > 0 else None,
        # the last layer alone: what every layer after the first costs once one-time costs are paid
        "last_layer_gb_per_s": (layer_bytes / layers / loop[-1] / 1e9) if loop and len(loop) == layers and loop[-1] > 0
        else None,
    })
    return figures


def loop_peer_figures(result: dict, layers: int) -> dict:
    if "error" in result:
        return result
    return {**result, **peer_solve_figures(result, layers), "per_layer_s": result["seconds"] / layers,
            "per_layer_source": "quantize() / layers"}


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------


def _gb(value) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def _s(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(ours, peer) -> str:
    """ours / peer; "-" where either is missing or not positive (a fit that noise tipped below zero)."""
    return "-" if ours is None or peer is None or ours <= 0 or peer <= 0 else f"{ours / peer:.2f}x"


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _label(key: str) -> str:
    """"calibrated@4 [before]" -> "merge (calibrated) [before], 4 ranks"."""
    if key == "peer":
        return "GPTQModel (peer)"
    name, _, tree = key.partition(" ")
    method, _, ranks = name.partition("@")
    method, *stages = method.split("+")
    text = {"rtn": "merge --method rtn", "calibrated": "merge (calibrated)"}.get(method, method)
    text += "".join({"r": f" + residual LoRA rank {x[1:]}",
                     "t": " without tune" if x[1:] == "0" else f" + tune {x[1:]} steps"}[x[0]] for x in stages)
    return text + (f" {tree}" if tree else "") + (f", {ranks} ranks" if ranks else "")


def _smi(run: dict) -> str:
    if run.get("smi_gpu_bytes") is None:
        return "-"
    return _gb(run["smi_gpu_bytes"]) + ("" if run.get("smi_gpu_source") == "process" else " †")


def _torch_gpu(run: dict) -> str:
    if run.get("torch_allocated_bytes") is None:
        return "-"
    return f"{_gb(run['torch_allocated_bytes'])} / {_gb(run.get('torch_reserved_bytes'))}"


def _in_process(run: dict) -> str:
    """The child's own clocks: our merge's (merge_report.json), the peer's load + quantize + save."""
    solves = run.get("solve_per_layer_s")
    of_which = "" if solves is None else f" (solves {solves:.2f}/layer)"
    if run.get("merge_seconds") is not None:
        return f"merge {run['merge_seconds']:.1f}{of_which}"
    if run.get("quantize_s") is not None:
        return (f"imports {run['import_s']:.1f}, load {run['load_s']:.1f} + quantize {run['quantize_s']:.1f}"
                f"{of_which} + save {run['save_s']:.1f}")
    return "-"


def render_header(setup: dict) -> list[str]:
    depths = ", ".join(str(d) for d in setup["depths"])
    return [
        f"bench/scale.py: {setup['preset']}-shaped Llama (hidden {setup['hidden_size']}, intermediate "
        f"{setup['intermediate_size']}, heads {setup['num_heads']}/{setup['num_kv_heads']}, "
        f"vocab {setup['vocab_size']}), "
        f"GPTQ 4-bit g128 sym, OFT b={setup['block_size']} on 7 linears; {depths} decoder layers"
        + (f" and {setup['whole_layers']} (whole)" if setup.get("whole_layers") else "")
        + f"; {setup['calib_tokens']} calibration tokens ({setup['calib']}, rows of {setup['seq_len']}); "
        f"device {setup['device']}; {setup['machine']}",
        f"batch: ours {setup['our_batch_rows']} rows per calibration forward ({setup['our_batch_tokens']} tokens), "
        f"peer quantize(batch_size={setup['peer_batch_size']}); decoder layer "
        f"{_size(setup['decoder_layer_bytes_each'])} in GPTQ; {setup['versions_line']}",
    ]


def render_process(results: dict) -> list[str]:
    setup, process = results["setup"], results["process"]
    depths = setup["depths"]
    deepest = str(depths[-1])
    runs, fits = process["runs"], process["fit"]
    peer_runs, peer_fit = runs.get("peer", {}), fits.get("peer")
    warm = results.get("warmup") or {}
    lines = ["", "Whole process, a fresh one per run (wall from start to exit"
             + ("; each side warmed by a 1-layer run first" if warm else "; no warm-up") + "); per side, fitted: "
             "wall = fixed + per layer x layers", "",
             "| run | " + " | ".join(f"wall s, {d} layers" for d in depths) + " | fixed s | per layer s | "
             f"fixed ours/peer | per layer ours/peer | wall ours/peer, {deepest} layers | in-process s, {deepest} "
             "layers | peak GPU GB (nvidia-smi) | torch alloc / reserved GB | peak RSS GB |",
             "|---|" + "---|" * (len(depths) + 9)]
    for key, by_depth in runs.items():
        walls = []
        for d in depths:
            run = by_depth.get(str(d))
            walls.append("-" if run is None else (f"failed ({run['error'][:60]})" if "error" in run
                                                  else f"{run['wall_s']:.1f}"))
        fit = fits.get(key)
        last = by_depth.get(deepest) or {}
        peer_last = peer_runs.get(deepest) or {}
        mine = key != "peer"
        ok = "error" not in last and "error" not in peer_last
        lines.append(
            f"| {_label(key)} | " + " | ".join(walls) + " | "
            f"{_s(fit and fit['fixed_s'])} | {_s(fit and fit['per_layer_s'], 2)} | "
            f"{_ratio(fit and fit['fixed_s'], peer_fit and peer_fit['fixed_s']) if mine else '-'} | "
            f"{_ratio(fit and fit['per_layer_s'], peer_fit and peer_fit['per_layer_s']) if mine else '-'} | "
            f"{_ratio(last.get('wall_s'), peer_last.get('wall_s')) if mine and ok else '-'} | "
            f"{_in_process(last)} | {_smi(last)} | {_torch_gpu(last)} | {_gb(last.get('peak_rss_bytes'))} |")
    whole = process.get("whole") or {}
    if whole:
        layers = setup["whole_layers"]
        peer = whole.get("peer") or {}
        lines += ["", f"Whole model: {layers} decoder layers, vocab {setup['vocab_size']}", "",
                  "| run | wall s | fit predicts s | wall ours/peer | in-process s | peak GPU GB (nvidia-smi) | "
                  "torch alloc / reserved GB | peak RSS GB |", "|---|---|---|---|---|---|---|---|"]
        for key, run in whole.items():
            fit = fits.get(key)
            predicted = fit["fixed_s"] + fit["per_layer_s"] * layers if fit else None
            if "error" in run:
                lines.append(f"| {_label(key)} | failed after {run['wall_s']:.0f} s: {run['error'][:80]} | "
                             f"{_s(predicted)} | | | | | {_gb(run.get('peak_rss_bytes'))} |")
                continue
            ratio = _ratio(run["wall_s"], peer.get("wall_s")) if key != "peer" and "error" not in peer else "-"
            lines.append(f"| {_label(key)} | {run['wall_s']:.1f} | {_s(predicted)} | {ratio} | {_in_process(run)} | "
                         f"{_smi(run)} | {_torch_gpu(run)} | {_gb(run.get('peak_rss_bytes'))} |")
    notes = ["", "in-process s: ours, the merge's own clock (merge_report.json `seconds`); the peer, its clocks "
                 "inside its process (imports and tokenizing, then load, quantize(), save()); solves: the linears' "
                 "solve seconds per decoder layer (ours: merge_report.json, a group's solve split among its linears; "
                 "the peer: its per-module log), the rest of the clock is the loop's own work. torch alloc / reserved: "
                 "max_memory_allocated / max_memory_reserved where the child reports them (the CLI does not)."]
    if any(run.get("smi_gpu_source") == "device" for by_depth in [*runs.values(), whole] for run in
           (by_depth.values() if isinstance(by_depth, dict) else [])):
        notes.append("† nvidia-smi listed no pid of that process (a container's own pid namespace?): the device's "
                     "used memory above what it was before the process started.")
    if warm:
        done = [f"{_label(k)} " + ("failed" if "error" in r else f"{r['wall_s']:.1f} s") for k, r in warm.items()]
        notes.append(f"warm-ups (1 layer, vocab {setup['warm_vocab']}, each in its own process, not in the tables): "
                     + ", ".join(done))
    tokens = {run.get("calib_tokens") for key, by_depth in runs.items() for run in by_depth.values()
              if not key.startswith("rtn")} - {None}  # rtn reads no text
    if len(tokens) > 1:
        notes.append(f"WARNING: the runs saw different numbers of calibration tokens: {sorted(tokens)}")
    return lines + notes


def render_loop(results: dict) -> list[str]:
    setup, rows = results["setup"], results["loop"]
    layers = setup["depths"][-1]
    peer = rows.get("peer")
    peer_layer = peer.get("per_layer_s") if peer and "error" not in peer else None
    lines = ["", f"In-process, per decoder layer ({layers} layers): ours, one iteration of the merge's layer loop "
                 "(merge_checkpoint in a fresh process, imports and CUDA context not timed); the peer, quantize() / "
                 "layers after a 1-layer quantize() in the same process", "",
             "| run | ranks | total s | per decoder layer s | solve s / layer | MB/s | peak RSS GB | "
             "torch alloc / reserved GB | ours / peer |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, run in rows.items():
        ranks = key.partition(" ")[0].partition("@")[2] or "1"
        label = _label(key).split(",")[0] if key != "peer" else "GPTQModel quantize (peer, warm)"
        if "error" in run:
            lines.append(f"| {label} | {ranks} | failed after {run['wall_s']:.0f} s: {run['error'][:100]} | | | | "
                         f"{_gb(run.get('peak_rss_bytes'))} | | |")
            continue
        ratio = "-" if key == "peer" or not peer_layer else f"{run['per_layer_s'] / peer_layer:.2f}x"
        gbps = run.get("gb_per_s")
        lines.append(f"| {label} | {ranks} | {run['seconds']:.1f} | {run['per_layer_s']:.2f} | "
                     f"{_s(run.get('solve_per_layer_s'), 2)} | {'-' if gbps is None else f'{gbps * 1e3:.1f}'} | "
                     f"{_gb(run.get('peak_rss_bytes'))} | {_torch_gpu(run)} | {ratio} |")
    kinds = [k for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
             if any(k in (run.get("solve_by_kind_s") or {}) for run in rows.values())]
    if kinds:
        lines += ["", "seconds per linear (mean over decoder layers; ours: merge_report.json `seconds`, "
                      "peer: GPTQModel's quant log `time`)", "",
                  "| run | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for key, run in rows.items():
            by_kind = run.get("solve_by_kind_s") or {}
            if by_kind:
                lines.append(f"| {_label(key)} | " + " | ".join(
                    f"{by_kind[k]:.2f}" if k in by_kind else "-" for k in kinds) + " |")
    notes = []
    for key, run in rows.items():
        if key != "peer" and "error" not in run:
            each = run.get("layer_seconds") or []
            last = run.get("last_layer_gb_per_s")
            notes.append(f"{key}: per decoder layer from the {run['per_layer_source']}"
                         + (f" ({', '.join(f'{x:.2f}' for x in each)} s; the last at {last * 1e3:.3g} MB/s)"
                            if each and last else "")
                         + f", fixed overhead {run['fixed_overhead_s']:.1f} s, "
                         f"modes {','.join(run.get('modes') or []) or '-'}, "
                         f"codes changed {(run.get('codes_changed') or 0):.2%}")
    if peer and "error" not in peer:
        notes.append(f"peer: warm-up (1 layer, same process) {peer['warmup_seconds']:.1f} s, "
                     f"{peer['calib_tokens']} tokens")
    return lines + ([""] + notes if notes else [])


def render_budget(results: dict) -> list[str]:
    """`--gpu-budget-gb`: whether each of our runs' peak GPU memory, as nvidia-smi listed it for the
    process (CUDA context and the caching allocator's reserve included), stayed within the budget."""
    budget = results["setup"].get("gpu_budget_gb")
    if budget is None:
        return []
    found = [(f"{_label(key)}, {depth} layers", run) for key, by_depth in results["process"]["runs"].items()
             if key != "peer" for depth, run in by_depth.items()]
    found += [(f"{_label(key)}, whole model", run) for key, run in results["process"]["whole"].items() if key != "peer"]
    found += [(f"{_label(key)}, in-process loop", run) for key, run in (results.get("loop") or {}).items()
              if key != "peer"]
    lines = ["", f"GPU budget {budget:g} GB (peak nvidia-smi memory of the process):"]
    for what, run in found:
        used = run.get("smi_gpu_bytes")
        verdict = ("no nvidia-smi figure" if used is None else
                   f"{used / 1e9:.2f} GB: {'within' if used <= budget * 1e9 else 'OVER'} budget"
                   + ("" if run.get("smi_gpu_source") == "process" else " (device-wide figure)"))
        lines.append(f"  {what}: {'failed, ' if 'error' in run else ''}{verdict}")
    mine = [run for what, run in found if " [" not in what]  # --code trees' rows are listed, not judged
    if all(run.get("smi_gpu_bytes") is not None and run["smi_gpu_bytes"] <= budget * 1e9 and "error" not in run
           for run in mine) and mine:
        lines.append(f"GPU-BUDGET OK: every run of this tree stayed within {budget:g} GB")
    else:
        lines.append(f"GPU-BUDGET FAILED: a run went over {budget:g} GB, failed or has no nvidia-smi figure")
    return lines


def render_phases(results: dict) -> list[str]:
    """Where our merges' time went (merge_report.json `phase_seconds`), per decoder layer: the deepest
    run of each method, and the whole model's."""
    deepest = {key: max(by_depth, key=int) for key, by_depth in results["process"]["runs"].items()
               if key != "peer" and by_depth}
    found = [(f"{_label(key)}, {d} layers", results["process"]["runs"][key][d], int(d)) for key, d in deepest.items()]
    found += [(f"{_label(key)}, whole model", run, results["setup"].get("whole_layers") or 0)
              for key, run in results["process"]["whole"].items() if key != "peer"]
    found = [(what, run, layers) for what, run, layers in found if run.get("phase_seconds") and layers]
    if not found:
        return []
    names = sorted({k for _, run, _ in found for k in run["phase_seconds"]}, key=lambda k: (k.split("/")[0], k))
    lines = ["", "Where our merge's time went, seconds per decoder layer (merge_report.json `phase_seconds`; "
                 "\"solve/...\" are parts of \"solve\"; \"pack (writer thread)\" runs beside the loop; the merge's "
                 "clock minus the loop's phases is its fixed work)", "",
             "| phase | " + " | ".join(what for what, _, _ in found) + " |", "|---|" + "---|" * len(found)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            "-" if name not in run["phase_seconds"] else f"{run['phase_seconds'][name] / layers:.3f}"
            for _, run, layers in found) + " |")
    lines.append("| (merge clock) | " + " | ".join(
        f"{(run.get('merge_seconds') or 0) / layers:.3f}" for _, run, layers in found) + " |")
    return lines


def render(results: dict) -> str:
    lines = render_header(results["setup"])
    if results["process"]["runs"] or results["process"]["whole"]:
        lines += render_process(results)
        lines += render_phases(results)
    if results.get("loop"):
        lines += render_loop(results)
    lines += render_budget(results)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def _build_device(device: str) -> str:
    """Where the synthetic weights are quantized: the merge's GPU when it has one (seconds per 7B layer)."""
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return device if device.startswith("cuda") else "cuda"
    return "cpu"


def machine_description(device: str) -> str:
    """CPU cores, and the GPU's name from nvidia-smi (the parent creates no CUDA context: it would hold GPU
    memory through every run)."""
    text = f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}"
    gpus = _nvidia_smi("--query-gpu=name,memory.total") if device.startswith("cuda") else None
    if gpus:
        names = sorted({f"{row[0]} ({(_mib(row[1]) or 0) / 2**30:.0f} GiB)" for row in gpus if len(row) >= 2})
        text = f"{len(gpus)} x {', '.join(names)}, " + text
    return text


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "gptqmodel"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    out["oftsurgery_commit"] = _git_commit(REPO)
    return out


def _git_commit(root: Path) -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "oftsurgery"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return (done.stdout.strip() or "-") + ("+" if dirty else "") if done.returncode == 0 else "-"
    except OSError:
        return "-"


def warm_packer() -> None:
    """Build gptqmodel's JIT-compiled CPU packer now (cached on disk), so no merge pays it."""
    import torch

    from oftsurgery.quant.gptq import pack_gptq
    from oftsurgery.quant.grid import quantize_weight

    pack_gptq(quantize_weight(torch.randn(64, 128) * 0.02, 4, 128, sym=True), "gptq")


def _csv(text: str, parser, name: str, cast=str) -> list:
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error(f"{name} takes a comma-separated list, not {text!r}")


def parse_args(argv=None) -> argparse.Namespace:
    from oftsurgery.testing.models import default_cache_dir
    from oftsurgery.testing.synthetic import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="7b", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=8, help="the deepest depth: --depths defaults to 2,LAYERS "
                                                               "(1,2 for 2); the loop table runs at the deepest depth")
    parser.add_argument("--depths", default=None, help="comma-separated decoder-layer counts to time and fit over "
                                                        "(at least two for the fit), e.g. 2,8")
    parser.add_argument("--whole", type=int, nargs="?", const=WHOLE_LAYERS, default=None, metavar="LAYERS",
                        help=f"also time both sides on a whole model ({WHOLE_LAYERS} decoder layers, a 7B; a number "
                             "picks another depth, e.g. for a CPU check)")
    parser.add_argument("--modes", default="process,loop", help="comma-separated: process (the whole-process table) "
                                                                 "and/or loop (the in-process per-layer table)")
    parser.add_argument("--vocab", type=int, default=None, help="embedding rows (default: the preset's; smaller "
                                                                 "keeps embeddings cheap); the same for every depth")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256, help="calibration row length (the merge's default)")
    parser.add_argument("--calib", default="builtin:english", help="calibration text for merge and peer alike")
    parser.add_argument("--device", default="auto", help="auto (cuda when torch sees one, else cpu), cpu, cuda or "
                                                          "cuda:N, for the merges and the peer alike")
    parser.add_argument("--methods", default="rtn,calibrated",
                        help="comma-separated: rtn, calibrated; calibrated+r16 adds --residual-rank 16, "
                             "calibrated+t100 --tune-steps 100 (both: calibrated+r16+t100; process mode only); calibrated+t0 "
                             "is the merge without the tuning it runs by default on a GPU")
    parser.add_argument("--nproc", default="1", help="comma-separated rank counts, e.g. 1,2,4,8: each merge also "
                                                       "runs under torchrun with that many ranks (1: one plain process)")
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                        help="also time GPTQModel quantizing the fp16 twin")
    parser.add_argument("--peer-batch-size", type=int, default=None,
                        help="GPTQModel's quantize(batch_size=...) (default: the rows our calibration forward runs "
                             "at once, 4096 tokens / --seq-len)")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="run each side once on a 1-layer checkpoint of the same shapes before timing")
    parser.add_argument("--code", type=Path, action="append", default=[], metavar="DIR",
                        help="also run our side from this source tree (a directory holding an oftsurgery package; "
                             "PYTHONPATH=DIR), e.g. the code before a change; repeatable")
    parser.add_argument("--build-only", action="store_true", help="build (or find) the checkpoints and stop")
    parser.add_argument("--rotation-strength", type=float, default=0.002,
                        help="std of the random OFT skew parameters; 0.002 moves weights by ~2%% (rtn then "
                             "changes no code, as with real trained adapters); 0 gives identity rotations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(default_cache_dir() / "bench-scale"))
    parser.add_argument("--json", default=None, help="where to write the results (default: under --workdir)")
    parser.add_argument("--gpu-budget-gb", type=float, default=None, metavar="GB",
                        help="print whether each of our runs' peak nvidia-smi GPU memory stayed within GB "
                             "(1e9 bytes), e.g. 48 for the 70B-layer target of docs/performance.md")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the merged and quantized checkpoints")
    parser.add_argument("--memory-limit", type=float, default=None, metavar="GB",
                        help="cap each child's address space (CPU runs on shared machines: a run that needs more "
                             "fails alone; CUDA maps far more virtual memory than it uses, so not with cuda)")
    args = parser.parse_args(argv)
    args.methods = _csv(args.methods, parser, "--methods")
    stage = re.compile(r"calibrated(\+[rt][0-9]+)*")
    unknown = sorted(m for m in args.methods if m != "rtn" and not stage.fullmatch(m))
    if unknown or not args.methods:
        parser.error(f"--methods takes rtn, calibrated and calibrated+rN/+tN, not {','.join(unknown) or 'nothing'}")
    args.modes = _csv(args.modes, parser, "--modes")
    if not args.modes or set(args.modes) - {"process", "loop"}:
        parser.error("--modes takes process and/or loop")
    if "loop" in args.modes and any("+" in m for m in args.methods):
        parser.error("the stages +rN/+tN are timed in --modes process only (the loop table runs MergeOptions' defaults)")
    if args.layers < 1 or args.calib_tokens < args.seq_len:
        parser.error("--layers must be at least 1 and --calib-tokens at least --seq-len")
    if args.depths is None:
        args.depths = [args.layers] if args.layers == 1 else sorted({min(2, args.layers - 1), args.layers})
    else:
        args.depths = sorted(set(_csv(args.depths, parser, "--depths", int)))
    if not args.depths or args.depths[0] < 1:
        parser.error("--depths takes positive layer counts")
    if args.whole is not None and (args.whole < 1 or args.preset == "70b"):
        parser.error("--whole takes a positive layer count, and not with --preset 70b (80 layers, 140 GB in fp16)")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.memory_limit and args.device.startswith("cuda"):
        parser.error("--memory-limit caps virtual memory, which CUDA reserves in bulk; use it for CPU runs only")
    args.nproc = sorted(set(_csv(args.nproc, parser, "--nproc", int)))
    if not args.nproc or min(args.nproc) < 1:
        parser.error("--nproc takes positive rank counts")
    if max(args.nproc) > 1 and args.device.startswith("cuda:"):
        parser.error("with --nproc above 1 pass --device cuda: each rank uses the GPU of its LOCAL_RANK")
    args.memory_limit = int(args.memory_limit * 1e9) if args.memory_limit else None
    for code in args.code:
        if not (code / "oftsurgery" / "__init__.py").is_file():
            parser.error(f"--code {code}: no oftsurgery package there")
    return args


def code_trees(args) -> list[tuple[str, Path]]:
    """(key suffix, root) of every tree our side runs from: this one, then each --code DIR."""
    trees, seen = [("", REPO)], set()
    for code in args.code:
        name = code.resolve().name or "code"
        while name in seen:
            name += "'"
        seen.add(name)
        trees.append((f" [{name}]", code.resolve()))
    return trees


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from oftsurgery.io import CheckpointReader
    from oftsurgery.testing.synthetic import decoder_layer_bytes, expected_size_bytes, synthetic_checkpoint

    if args.device.startswith("cuda") and not torch.cuda.is_available() and not args.build_only:
        raise SystemExit(f"--device {args.device} was requested but torch sees no CUDA device.")
    trees = code_trees(args)
    for suffix, root in trees:
        check_code_tree(root, suffix.strip(" []") or "this tree")
    if args.peer:  # the peer cuts its tokens with the merge's own functions: fail now if they have moved
        import oftsurgery.merge.calibration.text as text

        if not all(hasattr(text, name) for name in ("calibration_batches", "load_calibration_text")):
            raise SystemExit("oftsurgery.merge.calibration.text lacks calibration_batches / load_calibration_text, "
                             "which the peer cuts its tokens with: update PEER_PROCESS_CHILD")
    work = Path(args.workdir).expanduser().resolve()
    logs = work / "logs"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log = lambda msg: print(f"[scale] {msg}", flush=True)  # noqa: E731

    # the checkpoints: each depth, the whole model, the 1-layer warm-up one
    depths = list(args.depths)
    build = dict(vocab_size=args.vocab, seed=args.seed, rotation_strength=args.rotation_strength,
                 cache_dir=work / "synthetic", device=_build_device(args.device))
    wanted = sorted(set(depths) | ({args.whole} if args.whole else set()))
    need = sum(expected_size_bytes(args.preset, n, args.vocab)["gptq"] * 3 + expected_size_bytes(
        args.preset, n, args.vocab)["fp16"] for n in wanted)  # each build, and two outputs at a time at most
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < 1.2 * need:
        log(f"warning: {free / 1e9:.1f} GB free under {work}; the builds and outputs need up to {need / 1e9:.1f} GB "
            "(less where builds are cached)")
    started = time.perf_counter()
    ckpts = {n: synthetic_checkpoint(args.preset, num_layers=n, log=log, **build) for n in wanted}
    warm = synthetic_checkpoint(args.preset, **{**build, "num_layers": 1,
                                                "vocab_size": min(ckpts[wanted[0]].spec["vocab_size"], WARM_VOCAB)},
                                log=log)
    log(f"checkpoints ready after {time.perf_counter() - started:.0f}s: "
        + ", ".join(str(c.root) for c in [*ckpts.values(), warm]))
    if args.build_only:
        return {}
    warm_packer()

    rows_per_forward, batch_tokens = our_batch_rows(args.seq_len)
    if args.peer_batch_size is None:
        args.peer_batch_size = rows_per_forward
    deepest = ckpts[depths[-1]]
    layer_bytes = decoder_layer_bytes(deepest.gptq)
    vers = versions()
    for suffix, root in trees[1:]:
        vers[f"oftsurgery_commit{suffix}"] = _git_commit(root)
    setup = {**deepest.spec, "depths": depths, "whole_layers": args.whole, "device": args.device,
             "gpu_budget_gb": args.gpu_budget_gb,
             "calib": args.calib, "calib_tokens": args.calib_tokens, "seq_len": args.seq_len, "methods": args.methods,
             "modes": args.modes, "our_batch_rows": rows_per_forward, "our_batch_tokens": batch_tokens,
             "peer_batch_size": args.peer_batch_size, "warm_vocab": warm.spec["vocab_size"],
             "checkpoints": {str(n): str(c.root) for n, c in ckpts.items()},
             "checkpoint_bytes": {str(n): CheckpointReader(c.gptq).total_size for n, c in ckpts.items()},
             "decoder_layer_bytes_each": layer_bytes / depths[-1], "machine": machine_description(args.device),
             "memory_limit_bytes": args.memory_limit, "code_trees": {k.strip(" []") or "this tree": str(r)
                                                                     for k, r in trees},
             "gptqmodel_cpu_workers": child_env().get("GPTQMODEL_CPU_WORKERS", "gptqmodel's default"),
             "versions": vers, "versions_line": ", ".join(f"{k} {v}" for k, v in vers.items()),
             "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))}
    results = {"setup": setup, "warmup": {}, "process": {"runs": {}, "fit": {}, "whole": {}}, "loop": {}}
    json_path = Path(args.json) if args.json else work / "results" / (
        f"scale-{args.preset}-L{'-'.join(map(str, depths))}{f'-W{args.whole}' if args.whole else ''}-"
        f"{args.device.replace(':', '')}-{stamp}.json")

    def save() -> str:
        """Write what is measured so far: a long run that is stopped keeps its finished rows."""
        results["table"] = render(results)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        return results["table"]

    ours = [(f"{method}{'' if nproc == 1 else f'@{nproc}'}{suffix}", method, nproc, root)
            for suffix, root in trees for method in args.methods for nproc in args.nproc]

    def slug(key: str) -> str:
        return key.replace("@", "-np").replace(" [", "-").replace("]", "").replace("'", "_")

    def run_ours(key, method, nproc, root, ckpt, tag) -> dict:
        out = work / f"out-{slug(key)}"
        shutil.rmtree(out, ignore_errors=True)
        result = run_process(ours_command(ckpt, out, method, args, nproc), logs / f"{stamp}-{tag}-{slug(key)}.log",
                             f"{_label(key)}, {tag}", code_root=root, memory_limit=args.memory_limit,
                             nproc=nproc if nproc > 1 else None, expect_result=False)
        if "error" not in result:
            result.update(report_figures(out))
        if not args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)
        return result

    def run_peer(ckpt, tag) -> dict:
        out = work / "out-peer"
        shutil.rmtree(out, ignore_errors=True)
        result = run_process(peer_command(ckpt, out, args), logs / f"{stamp}-{tag}-peer.log",
                             f"GPTQModel load + quantize + save, {tag}", memory_limit=args.memory_limit)
        if "error" not in result:
            result.update(peer_solve_figures(result, ckpt.spec["num_layers"]))
        if not args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)
        return result

    # 1. warm-ups: each side once on the 1-layer checkpoint, in its own process
    if args.warmup:
        for key, method, _, root in ours:
            if "@" not in key:
                results["warmup"][key] = run_ours(key, method, 1, root, warm, "warm-up")
        if args.peer:
            results["warmup"]["peer"] = run_peer(warm, "warm-up")
        save()
    # 2. whole processes at each depth, then the fit
    if "process" in args.modes:
        runs = results["process"]["runs"]
        for depth in depths:
            for key, method, nproc, root in ours:
                runs.setdefault(key, {})[str(depth)] = run_ours(key, method, nproc, root, ckpts[depth], f"L{depth}")
                save()
            if args.peer:
                runs.setdefault("peer", {})[str(depth)] = run_peer(ckpts[depth], f"L{depth}")
                save()
        for key, by_depth in runs.items():
            fit = fit_line([(int(d), r["wall_s"]) for d, r in by_depth.items() if "error" not in r])
            if fit:
                results["process"]["fit"][key] = fit
        save()
        if args.whole:
            for key, method, nproc, root in ours:
                results["process"]["whole"][key] = run_ours(key, method, nproc, root, ckpts[args.whole],
                                                            f"L{args.whole}")
                save()
            if args.peer:
                results["process"]["whole"]["peer"] = run_peer(ckpts[args.whole], f"L{args.whole}")
                save()
    # 3. the in-process per-layer figures at the deepest depth
    if "loop" in args.modes:
        layers = depths[-1]
        for key, method, nproc, root in ours:
            out = work / f"loop-{slug(key)}"
            code = VMHWM + LOOP_MERGE_CHILD
            loop_args = [str(deepest.gptq), str(deepest.rotations), str(out), method, args.device, args.calib,
                         str(args.calib_tokens), str(args.seq_len)]
            if nproc == 1:
                command = [sys.executable, "-c", code, *loop_args]
            else:
                script = logs / f"{stamp}-loop-{slug(key)}.py"
                script.parent.mkdir(parents=True, exist_ok=True)
                script.write_text(code, encoding="utf-8")
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", str(script), *loop_args]
            result = run_process(command, logs / f"{stamp}-loop-{slug(key)}.log", f"{_label(key)}, in-process loop",
                                 code_root=root, memory_limit=args.memory_limit, nproc=nproc if nproc > 1 else None)
            report = report_figures(out) if "error" not in result else {}
            results["loop"][key] = loop_merge_figures(result, report, layers, layer_bytes)
            save()
            if not args.keep_outputs:
                shutil.rmtree(out, ignore_errors=True)
        if args.peer:
            # LOOP_PEER_CHILD takes the warm-up model where PEER_PROCESS_CHILD takes its output directory
            result = run_process(peer_command(deepest, warm.fp16, args, LOOP_PEER_CHILD),
                                 logs / f"{stamp}-loop-peer.log", "GPTQModel quantize, in-process (1-layer warm-up, "
                                 "then timed)",
                                 memory_limit=args.memory_limit)
            results["loop"]["peer"] = loop_peer_figures(result, layers)

    table = save()
    print("\n" + table + f"\n\nJSON: {json_path}", flush=True)
    return results


if __name__ == "__main__":
    main()
