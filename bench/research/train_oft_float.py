"""Train the PEFT OFT adapter on an fp32 copy of the GPTQ base (weights = exact dequantized s*(q-z)).

Same math as training on gptqmodel's TorchLinear, but that kernel only runs in bf16/fp16, which this
CPU (no avx512-bf16) executes ~50x slower. The adapter's module names match the GPTQ model's.
"""
import os, sys, time, math
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
import torch
from peft import OFTConfig, get_peft_model
from transformers import AutoTokenizer
from oftsurgery.texts import builtin_text
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fidelity_lab import load_all, set_weights, DEV

QDIR, OUT = sys.argv[1], sys.argv[2]
STEPS = int(os.environ.get("STEPS", 40)); LR = float(os.environ.get("LR", 3e-3))
BS, SEQ = int(os.environ.get("BS", 4)), int(os.environ.get("SEQ", 256))
torch.manual_seed(0)
torch.set_grad_enabled(True)
model, QW, W, T, R, qcfg = load_all(QDIR, None)
set_weights(model, W)
tok = AutoTokenizer.from_pretrained(QDIR)
cfg = OFTConfig(r=0, oft_block_size=32, target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"],
                use_cayley_neumann=False, module_dropout=0.0, init_weights=True)
model = get_peft_model(model, cfg)
model.print_trainable_parameters()
ids = tok(builtin_text("code", "train", max_chars=2_000_000), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
n = ids.numel() // SEQ
windows = ids[: n * SEQ].view(n, SEQ)
order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
model.train()
t0 = time.time()
for step in range(STEPS):
    batch = windows[order[(step * BS) % n: (step * BS) % n + BS]]
    for pg in opt.param_groups:
        pg["lr"] = LR * min(1.0, (step + 1) / 5)
    batch = batch.to(DEV)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward(); opt.step(); opt.zero_grad()
    print(f"step {step} loss {loss.item():.4f} t={time.time()-t0:.0f}s", flush=True)
model.save_pretrained(OUT)
print("saved", OUT)
model.eval()
with torch.no_grad():
    ev = tok(builtin_text("code", "heldout", max_chars=400_000), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    ev = ev[: 16 * 256].view(16, 256).to(DEV)
    tot = 0.0
    for i in range(0, 16, 4):
        tot += float(model(input_ids=ev[i:i+4], labels=ev[i:i+4]).loss) / 4
    print(f"HELDOUT attached nll {tot:.4f} ppl {math.exp(tot):.2f}")
