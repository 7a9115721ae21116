"""A short OFT fine-tune on a quantized checkpoint, with oftsurgery's wrappers (no PEFT needed).

`train_oft_adapter` loads the GPTQ/AWQ model with gptqmodel, attaches an adapter (e.g. the identity
adapter `attach` wrote) with `load_oft_adapter`, trains only the OFT parameters (AdamW, linear
warm-up) on built-in text, and saves the adapter in PEFT's format; on CPU the model computes in
float32 (`evaluation.cpu_float`). What the demo uses; real fine-tunes will want their own trainer
(docs/getting-started.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from oftsurgery.oft.config import OFTOptions


@dataclass
class TrainResult:
    out: Path
    losses: list[float] = field(default_factory=list)
    train_tokens: int = 0
    trainable_params: int = 0


def training_windows(text: str, tokenizer, seq_len: int) -> "torch.Tensor":
    """The tokenized text cut into non-overlapping rows of `seq_len` ids."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    rows = ids.numel() // seq_len
    if rows == 0:
        raise ValueError(f"The training text has only {ids.numel()} tokens; {seq_len} are needed.")
    return ids[: rows * seq_len].view(rows, seq_len)


def train_oft_adapter(
    checkpoint: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    options: "OFTOptions | None" = None,
    text: str | None = None,
    text_kind: str = "english",
    steps: int = 20,
    batch_size: int = 2,
    seq_len: int = 256,
    lr: float = 3e-4,
    warmup_steps: int = 5,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = True,
    float32_on_cpu: bool = True,
    device: str = "cpu",
) -> TrainResult:
    """Train the OFT adapter folder `adapter` on `checkpoint` and save the result to `out`.

    text: training text; default the "train" split of the built-in `text_kind` text (disjoint from
    the calibration and held-out splits that merge and verify use). Returns the per-step losses.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from oftsurgery.evaluation.cpu_float import compute_in_float32
    from oftsurgery.evaluation.evaluate import load_quantized_model
    from oftsurgery.texts import builtin_text
    from oftsurgery.oft.adapter_io import read_peft_adapter
    from oftsurgery.oft.model import load_oft_adapter, save_oft_adapter

    torch.manual_seed(seed)
    options = options or read_peft_adapter(adapter).options
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    # enough text for every step, without tokenizing all of it
    needed_chars = max(200_000, steps * batch_size * seq_len * 6)
    content = text if text is not None else builtin_text(text_kind, "train", max_chars=needed_chars)
    windows = training_windows(content, tokenizer, seq_len)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))

    wrapper = load_quantized_model(checkpoint, device=device, backend="torch")
    model = getattr(wrapper, "model", wrapper)
    report = load_oft_adapter(model, adapter, freeze_base=True)
    if float32_on_cpu and all(p.device.type == "cpu" for p in model.parameters()):
        compute_in_float32(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()

    result = TrainResult(Path(out), trainable_params=report.trainable_params)
    bar = tqdm(range(steps), desc="training OFT", unit="step", disable=not progress)
    for step in bar:
        picks = order[[(step * batch_size + i) % windows.shape[0] for i in range(batch_size)]]
        batch = windows[picks].to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup_steps))
        logits = model(input_ids=batch).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 batch[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(float(loss))
        result.train_tokens += int(batch.numel())
        bar.set_postfix(loss=f"{float(loss):.3f}")
    bar.close()
    model.eval()
    save_oft_adapter(model, out, options, overwrite=overwrite)
    return result

