"""A wider *trained* Llama for fidelity at real widths: build it, pretrain it for minutes, save fp16.

Synthetic random weights have near-isotropic activations and say nothing about fidelity, and
SmolLM2's layers are 576 wide. This trains a Llama of hidden ≥ 2048 on text the machine has offline,
so its activations have the structure training gives them (a few loud channels), and saves it as
an fp16 checkpoint that bench/fidelity.py quantizes, fine-tunes and merges (`--fp-model`):

- pretraining text: the built-in English train split and the Python sources of the installed
  transformers package (library code: another style than the standard library's);
- the OFT fine-tune that fidelity.py runs uses the standard library's code (train split) and is
  evaluated on its held-out split, a shift the adapter has something to learn from.

    python bench/wide_model.py --out /tmp/wide --device cuda --minutes 3
    python bench/fidelity.py --fp-model /tmp/wide --device cuda --formats gptq --calib-tokens 2048 4096 8192

Prints one JSON line: the shape, tokens seen, the loss curve's ends and the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path


def library_code(max_chars: int) -> str:
    """Python sources of the installed transformers package, in path order, up to max_chars."""
    import transformers

    parts, total = [], 0
    for path in sorted(Path(transformers.__file__).parent.rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--minutes", type=float, default=3.0, help="wall-clock training budget")
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--code-chars", type=int, default=30_000_000, help="characters of library code to train on "
                        "(30M: about 7.6M tokens, under 3 epochs in 2 minutes on an H100; 2.5M was memorised)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    # the recipe a cached model was built from: another recipe rebuilds it (the output path and device aside)
    recipe = {k: v for k, v in sorted(vars(args).items()) if k not in ("out", "device")}

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from oftsurgery.testing.models import is_complete, mark_complete
    from oftsurgery.texts import builtin_text

    out = Path(args.out)
    recipe_file = out / "wide_model_recipe.json"
    if is_complete(out) and recipe_file.is_file() and json.loads(recipe_file.read_text()) == recipe:
        print(json.dumps({"out": str(out), "cached": True}))
        return
    if out.exists():  # unfinished, or built from another recipe: rebuilt; anything else is not ours to delete
        if not (is_complete(out) or recipe_file.is_file()) and any(out.iterdir()):
            raise SystemExit(f"{out} holds files this script did not write; choose another --out.")
        shutil.rmtree(out)
    started = time.perf_counter()
    english = builtin_text("english", "train", max_chars=None)
    code = library_code(args.code_chars)
    tokenizer = build_tokenizer([english, code], args.vocab)
    ids = torch.tensor(tokenizer(english + "\n\n" + code, add_special_tokens=False)["input_ids"], dtype=torch.long)
    windows = ids[: ids.numel() // args.seq_len * args.seq_len].view(-1, args.seq_len)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    budget = args.minutes * 60
    warmup, losses, step = 100, [], 0
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(0))
    train_start = time.perf_counter()
    while step < args.max_steps and time.perf_counter() - train_start < budget:
        picks = order[[(step * args.batch + i) % windows.shape[0] for i in range(args.batch)]]
        batch = windows[picks].to(args.device, non_blocking=True)
        progress = min(1.0, (time.perf_counter() - train_start) / budget)  # cosine over the time budget
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16):
            logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0:
            losses.append(round(float(loss), 4))
        step += 1
    model = model.to(torch.float16).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    recipe_file.write_text(json.dumps(recipe, indent=1) + "\n")
    mark_complete(out)
    print(json.dumps({"out": str(out), "hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
                      "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "steps": step,
                      "tokens_m": step * args.batch * args.seq_len / 1e6, "dataset_tokens_m": ids.numel() / 1e6,
                      "loss_first": losses[:3], "loss_last": losses[-3:], "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
