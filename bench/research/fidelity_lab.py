"""Merge-fidelity lab: float simulation of base / attached / merged GPTQ models, pluggable requant methods.

Usage: python lab.py QDIR ADAPTER METHOD [key=value ...]
The float model holds dequantized GPTQ weights (exactly s*(q-z)); attached = W·Rᵀ in fp32.
"""
import os, sys, time, json, math
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
from dataclasses import replace
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, AutoConfig

from oftsurgery.texts import builtin_text
from oftsurgery.quant.config import load_quant_config
from oftsurgery.quant.codec import find_quantized_layers, layer_tensors, unpack_layer
from oftsurgery.oft.rotation import rotation_blocks, rotate_weight

torch.set_grad_enabled(False)
DEV = torch.device(os.environ.get("LAB_DEVICE", "cpu"))
KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESID = ("self_attn.o_proj", "mlp.down_proj")
GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def load_all(qdir, adapter):
    qcfg = load_quant_config(qdir)
    tensors = {}
    for f in sorted(os.listdir(qdir)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(qdir, f)))
    cfg = AutoConfig.from_pretrained(qdir)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    prefixes = find_quantized_layers(tensors)
    sd = {k: v.float() for k, v in tensors.items() if not any(k.startswith(p + ".") for p in prefixes)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    QW = {p: unpack_layer(layer_tensors(tensors, p), qcfg) for p in prefixes}
    model.to(DEV)
    QW = {p: replace(qw, codes=qw.codes.to(DEV), scales=qw.scales.to(DEV), zeros=qw.zeros.to(DEV), g_idx=qw.g_idx.to(DEV)) for p, qw in QW.items()}
    W = {p: qw.dequantize(torch.float32) for p, qw in QW.items()}
    if adapter is None:
        return model, QW, W, None, None, qcfg
    ad = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    acfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    R = {}
    for k, v in ad.items():
        # base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight
        p = k.replace("base_model.model.", "", 1).replace(".oft_R.weight", "")
        R[p] = rotation_blocks(v.float().to(DEV), acfg["oft_block_size"], use_cayley_neumann=acfg.get("use_cayley_neumann", False))
    W = {p: qw.dequantize(torch.float32) for p, qw in QW.items()}
    T = {p: (rotate_weight(W[p].double(), R[p].double()).float() if p in R else W[p]) for p in prefixes}
    return model, QW, W, T, R, qcfg


def module(model, prefix):
    return model.get_submodule(prefix)


def set_weights(model, weights):
    for p, w in weights.items():
        module(model, p).weight.data = w


def windows(tok, text, n, seq):
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = min(n, ids.numel() // seq)
    return ids[: n * seq].view(n, seq)


def mean_nll(model, wins, bs=4):
    tot, cnt = 0.0, 0
    for i in range(0, wins.shape[0], bs):
        b = wins[i:i + bs].to(DEV)
        logits = model(input_ids=b).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum")
        tot += float(loss); cnt += b[:, 1:].numel()
    return tot / cnt


# ------------------------------------------------------------------------------------------------
# Per-linear solvers. All minimise tr((Ŵ−T*) H (Ŵ−T*)ᵀ) on the source grid.
# ------------------------------------------------------------------------------------------------

def grid_of(qw):
    g = qw.g_idx.long()
    return qw.scales.float()[g].T.contiguous(), qw.zeros.float()[g].T.contiguous()


def damp_h(H, damp):
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += torch.eye(H.shape[0], dtype=H.dtype, device=H.device) * damp * torch.mean(torch.diag(H))
    return H


def gptq_codes(qw, target, H, damp=0.01, act_order=True, blocksize=128, S=None, Z=None):
    """GPTQ on a fixed grid (per-element scale S / zero Z, defaulting to qw's grid)."""
    if S is None:
        S, Z = grid_of(qw)
    maxq = float(2 ** qw.bits - 1)
    w = target.float().clone()
    in_f = w.shape[1]
    Hd = damp_h(H, damp)
    perm = torch.argsort(torch.diag(Hd), descending=True) if act_order else torch.arange(in_f, device=w.device)
    inv = torch.argsort(perm)
    w, S_, Z_ = w[:, perm], S[:, perm], Z[:, perm]
    Hd = Hd[perm][:, perm]
    L = torch.linalg.cholesky(Hd)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
    codes = torch.empty_like(w)
    for a in range(0, in_f, blocksize):
        b = min(a + blocksize, in_f)
        wb = w[:, a:b].clone(); eb = torch.zeros_like(wb); hb = Hinv[a:b, a:b]
        for j in range(b - a):
            col = wb[:, j]; s = S_[:, a + j]; z = Z_[:, a + j]
            q = torch.clamp(torch.round(col / s) + z, 0, maxq)
            codes[:, a + j] = q
            e = (col - s * (q - z)) / hb[j, j]
            wb[:, j:] -= e.unsqueeze(1) * hb[j, j:].unsqueeze(0)
            eb[:, j] = e
        w[:, b:] -= eb @ Hinv[a:b, b:]
    return codes[:, inv]


def cd_sweeps(codes, S, Z, target, H, maxq, sweeps=2, order=None):
    """Cyclic coordinate descent on integer codes for f = tr((Ŵ−T) H (Ŵ−T)ᵀ); never increases f."""
    H = H.float()
    codes = codes.clone()
    E = S * (codes - Z) - target  # [out, in]
    G = E @ H  # gradient/2
    in_f = codes.shape[1]
    order = torch.argsort(torch.diag(H), descending=True) if order is None else order
    diagH = torch.diag(H).clamp_min(1e-12)
    for _ in range(sweeps):
        before = codes.clone()
        for j in order.tolist():
            hjj = diagH[j]
            s, z = S[:, j], Z[:, j]
            cur = codes[:, j]
            w_opt = s * (cur - z) - G[:, j] / hjj  # continuous minimiser for column j
            q = torch.clamp(torch.round(w_opt / s) + z, 0, maxq)
            dw = s * (q - cur)
            codes[:, j] = q
            E[:, j] += dw
            G.addr_(dw, H[j])
        if torch.equal(before, codes):
            break
    return codes


def refit_scales(qw, codes, target, H, Z=None):
    """Least-squares fp16 scales with codes (and zeros) fixed: per row, G×G normal equations."""
    g = qw.g_idx.long()
    G_ = qw.num_groups
    if Z is None:
        Z = qw.zeros.float()[g].T
    A = codes - Z  # [out, in]
    H = H.double(); A = A.double(); t = target.double()
    out_f, in_f = A.shape
    onehot = torch.nn.functional.one_hot(g, G_).double()  # [in, G]
    # M[o,g,h] = sum_{i in g, j in h} A[o,i] H[i,j] A[o,j]
    M = torch.empty(out_f, G_, G_, dtype=torch.float64, device=A.device)
    for hgrp in range(G_):
        mask = (g == hgrp)
        P = A[:, mask] @ H[mask]  # [out, in]: sum_{j in h} A[o,j] H[j,i]
        M[:, :, hgrp] = (A * P) @ onehot
    rhs = (A * (t @ H)) @ onehot  # [out, G]
    M += torch.eye(G_, dtype=torch.float64, device=A.device) * 1e-9 * M.diagonal(dim1=1, dim2=2).mean()
    s = torch.linalg.solve(M, rhs.unsqueeze(-1)).squeeze(-1)  # [out, G]
    s = s.T.to(torch.float16)
    bad = ~torch.isfinite(s) | (s <= 0)
    s = torch.where(bad, qw.scales, s)
    return s


def obj(W_hat, T, H):
    E = (W_hat - T).double()
    return float(torch.einsum("oi,ij,oj->", E, H.double(), E))


# ------------------------------------------------------------------------------------------------
# Sequential driver
# ------------------------------------------------------------------------------------------------

class Stop(Exception):
    pass


def capture_inputs(layer, h, pos, names, mask=None):
    """Run the decoder layer on h, return {name: flattened input [N, in]} of the given linears (stops early)."""
    got = {}
    hooks = []
    for n in names:
        def hook(mod, args, n=n):
            got[n] = args[0].reshape(-1, args[0].shape[-1]).clone()
            if len(got) == len(names):
                raise Stop
        hooks.append(layer.get_submodule(n).register_forward_pre_hook(hook))
    try:
        layer(h, position_embeddings=pos, attention_mask=mask)
    except Stop:
        pass
    finally:
        for hk in hooks:
            hk.remove()
    return got


def layer_forward(layer, h, pos, mask=None, bs=4):
    outs = []
    for i in range(0, h.shape[0], bs):
        o = layer(h[i:i + bs], position_embeddings=(pos[0][i:i + bs], pos[1][i:i + bs]), attention_mask=mask)
        outs.append(o[0] if isinstance(o, tuple) else o)
    return torch.cat(outs)


def run_merge(model, QW, W, T, R, calib, method, opts):
    """Sequentially merge all targeted layers; returns {prefix: (codes, scales)} and stats."""
    from transformers.masking_utils import create_causal_mask
    base = model.model
    calib = calib.to(DEV)
    h0 = base.embed_tokens(calib)
    pos_ids = torch.arange(calib.shape[1], device=DEV).unsqueeze(0).expand(calib.shape[0], -1)
    pos = base.rotary_emb(h0, pos_ids)
    mask = None  # sdpa with is_causal when mask None
    h_a = h0.clone(); h_m = h0.clone()
    result = {}
    stats = {}
    escaped = {}
    seq = opts.get("seq", 1)  # 1: merged-model inputs (sequential); 0: attached inputs
    for li, layer in enumerate(base.layers):
        pre = f"model.layers.{li}."
        names_all = [n for grp in GROUPS for n in grp]
        # attached inputs and output
        set_weights(model, {pre + n: T[pre + n] for n in names_all})
        Xa = {}
        for grp in GROUPS:
            Xa.update(capture_inputs(layer, h_a, pos, grp, mask))
        out_a = layer_forward(layer, h_a, pos, mask)
        if opts.get("resid", 0):
            RA = {"self_attn.o_proj": h_a.reshape(-1, h_a.shape[-1])}
            RA["mlp.down_proj"] = capture_inputs(layer, h_a, pos, ["post_attention_layernorm"], mask)["post_attention_layernorm"]
        for grp in GROUPS:
            if opts.get("resid", 0) and grp[0] in RESID:
                RM = {"self_attn.o_proj": h_m.reshape(-1, h_m.shape[-1])}
                if grp[0] == "mlp.down_proj":
                    RM["mlp.down_proj"] = capture_inputs(layer, h_m, pos, ["post_attention_layernorm"], mask)["post_attention_layernorm"]
            if seq:
                Xm = capture_inputs(layer, h_m, pos, grp, mask)  # earlier groups already merged in `layer`
            else:
                Xm = {n: Xa[n] for n in grp}
            for n in grp:
                p = pre + n
                qw = QW[p]
                if p not in R:
                    result[p] = (qw.codes, qw.scales); set_weights(model, {p: W[p]}); continue
                X = Xm[n].double()
                H = X.T @ X
                if p in opts.get("_escape", ()):
                    # kept in fp16 (a module the quantization config leaves unquantized)
                    Wn = T[p].to(torch.float16).float()
                    escaped[p] = True
                    set_weights(model, {p: Wn})
                    continue
                tgt = T[p]
                if opts.get("asym", 0) > 0:
                    # target mapping merged-model inputs to the attached model's outputs (plus, for the
                    # residual writers, the residual-stream drift), shrunk towards T by alpha
                    Ystar = Xa[n].double() @ tgt.double().T  # [N, out]
                    if opts.get("resid", 0) and n in RESID:
                        Ystar = Ystar + (RA[n] - RM[n]).double()
                    # ridge regression of the correction towards T (zero when inputs and residuals agree)
                    C = (Ystar - X @ tgt.double().T).T @ X  # [out, in]
                    Hd = damp_h(H, opts.get("asym_damp", 0.01))
                    corr = torch.linalg.solve(Hd, C.T).T
                    tgt = (tgt.double() + opts["asym"] * corr).float()
                codes, scales = method(qw, tgt, H, opts)
                Wn = replace(qw, codes=codes.to(torch.int32), scales=scales).dequantize(torch.float32)
                # stats: output residual relative to the unmerged base, on these inputs
                Hf = H.float()
                r_new = obj(Wn, T[p], Hf); r_base = obj(W[p], T[p], Hf)
                chg = float((codes.to(torch.int32) != qw.codes).float().mean())
                if opts.get("fallback", 0) and r_new > r_base:
                    codes, scales, Wn, r_new, chg = qw.codes, qw.scales, W[p], r_base, 0.0
                out_e = float(torch.einsum("oi,ij,oj->", T[p].double(), H, T[p].double()))
                stats[p] = dict(res=math.sqrt(r_new / max(r_base, 1e-30)), changed=chg, abs=r_new, rel=r_new / max(out_e, 1e-30),
                                delta=r_base, numel=qw.codes.numel(), layer=li,
                                scale_changed=float((scales != qw.scales).float().mean()))
                result[p] = (codes.to(torch.int32), scales)
                set_weights(model, {p: Wn})
        if opts.get("br", 0):
            block_reconstruct(layer, pre, QW, result, h_m, out_a, pos, opts, stats)
        h_m = layer_forward(layer, h_m, pos, mask)
        h_a = out_a
        if opts.get("verbose", 1):
            rs = [stats[pre + n]["res"] for n in names_all if pre + n in stats]
            print(f"layer {li}: mean res {sum(rs)/len(rs):.3f} hidden drift {float((h_m-h_a).norm()/ (h_a - h0).norm()):.4f}", flush=True)
    return result, stats


def block_reconstruct(layer, pre, QW, result, h_in, out_target, pos, opts, stats):
    """Jointly tune fp16 scales (and optionally rounding, sign-SGD) of the layer's linears against the
    attached layer output, starting from the per-linear solution. Accept only if the block loss drops."""
    from torch.func import functional_call
    names = [n for grp in GROUPS for n in grp if pre + n in stats]
    if not names:
        return
    steps = opts.get("br", 0); lr = opts.get("br_lr", 2e-3); learn_round = opts.get("br_round", 0)
    nb = opts.get("br_bs", 4)
    P = {}
    for n in names:
        qw = QW[pre + n]; codes, scales = result[pre + n]
        P[n] = dict(logs=torch.zeros_like(scales, dtype=torch.float32, requires_grad=True),
                    v=torch.zeros(codes.shape, dtype=torch.float32, device=codes.device, requires_grad=bool(learn_round)),
                    s0=scales.float(), c0=codes.float(), z=qw.zeros.float()[qw.g_idx.long()].T, g=qw.g_idx.long(), maxq=qw.maxq)

    def weights(hard=False):
        out = {}
        for n, d in P.items():
            s = (d["s0"] * torch.exp(d["logs"]))
            if hard:
                s = s.to(torch.float16).float()
            c = d["c0"] + d["v"]
            c = c + (c.round() - c).detach()
            c = torch.clamp(c, 0, d["maxq"])
            out[n + ".weight"] = s[d["g"]].T * (c - d["z"])
        return out

    def loss_on(idx, w):
        o = functional_call(layer, w, (h_in[idx],), dict(position_embeddings=(pos[0][idx], pos[1][idx]), attention_mask=None))
        o = o[0] if isinstance(o, tuple) else o
        return ((o - out_target[idx]) ** 2).mean()

    allidx = torch.arange(h_in.shape[0], device=h_in.device)
    with torch.no_grad():
        l0 = float(loss_on(allidx, weights(hard=True)))
    params = [d["logs"] for d in P.values()]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for it in range(steps):
            idx = torch.randperm(h_in.shape[0], generator=gen)[:nb].to(h_in.device)
            loss = loss_on(idx, weights())
            opt.zero_grad()
            for d in P.values():
                if d["v"].grad is not None:
                    d["v"].grad = None
            loss.backward()
            opt.step()
            if learn_round:
                with torch.no_grad():
                    for d in P.values():
                        d["v"] -= opts.get("br_rlr", 0.05) * torch.sign(d["v"].grad)
                        d["v"].clamp_(-1.0, 1.0)
    with torch.no_grad():
        w = weights(hard=True)
        l1 = float(loss_on(allidx, w))
    if opts.get("verbose", 1):
        print(f"   block recon {pre}: {l0:.4e} -> {l1:.4e}", flush=True)
    if l1 < l0:
        for n, d in P.items():
            s = (d["s0"] * torch.exp(d["logs"].detach())).to(torch.float16)
            c = torch.clamp((d["c0"] + d["v"].detach()).round(), 0, d["maxq"]).to(torch.int32)
            result[pre + n] = (c, s)
            layer.get_submodule(n).weight.data = w[n + ".weight"].detach()


def e2e_tune(model, QW, T, W, R, result, cal, opts):
    """Tune every merged layer's fp16 scales (log multipliers) and, optionally, the RMSNorm weights
    against the attached model's next-token distribution (KL) on the calibration windows."""
    from torch.func import functional_call
    steps, lr, nb = opts.get("e2e", 0), opts.get("e2e_lr", 1e-3), opts.get("e2e_bs", 4)
    prefixes = [p for p in result if p in R]
    cal = cal.to(DEV)
    set_weights(model, T)
    with torch.no_grad():
        ref = torch.cat([torch.log_softmax(model(input_ids=cal[i:i + 4]).logits.float(), -1).to(torch.bfloat16)
                         for i in range(0, cal.shape[0], 4)])
    P = {}
    for p in prefixes:
        qw = QW[p]; codes, scales = result[p]
        P[p] = dict(logs=torch.zeros(scales.shape, dtype=torch.float32, device=DEV, requires_grad=True), s0=scales.float(),
                    a=(codes.float() - qw.zeros.float()[qw.g_idx.long()].T), g=qw.g_idx.long())
    norms = {}
    if opts.get("e2e_norm", 0):
        for n, prm in model.named_parameters():
            if n.endswith("layernorm.weight") or n == "model.norm.weight":
                norms[n] = torch.zeros_like(prm, requires_grad=True)
    base_norm = {n: dict(model.named_parameters())[n].detach().clone() for n in norms}

    def weights(hard=False):
        out = {}
        for p, d in P.items():
            sc = d["s0"] * torch.exp(d["logs"])
            if hard:
                sc = sc.to(torch.float16).float()
            out[p + ".weight"] = sc[d["g"]].T * d["a"]
        for n, v in norms.items():
            w = base_norm[n] * torch.exp(v)
            out[n] = w.to(torch.float16).float() if hard else w
        return out

    def kl(idx, w):
        logits = functional_call(model, w, (), dict(input_ids=cal[idx])).logits.float()
        lp = torch.log_softmax(logits, -1)
        r = ref[idx].float()
        return (r.exp() * (r - lp)).sum(-1).mean()

    allidx = torch.arange(cal.shape[0], device=DEV)
    def full_kl(w):
        with torch.no_grad():
            return sum(float(kl(allidx[i:i + 4], w)) * len(allidx[i:i + 4]) for i in range(0, len(allidx), 4)) / len(allidx)
    k0 = full_kl(weights(hard=True))
    opt = torch.optim.Adam([d["logs"] for d in P.values()] + list(norms.values()), lr=lr)
    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for it in range(steps):
            idx = torch.randperm(cal.shape[0], generator=gen)[:nb].to(DEV)
            loss = kl(idx, weights())
            opt.zero_grad(); loss.backward(); opt.step()
    w = weights(hard=True)
    k1 = full_kl(w)
    print(f"e2e KL {k0:.5f} -> {k1:.5f}", flush=True)
    if k1 >= k0:
        w = {p + ".weight": P[p]["s0"][P[p]["g"]].T * P[p]["a"] for p in P}
    with torch.no_grad():
        for n, v in w.items():
            model.get_parameter(n).data = v.detach().clone()
    for p in W:
        if p not in R:
            model.get_submodule(p).weight.data = W[p]


# ------------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------------

def m_rtn(qw, tgt, H, o):
    S, Z = grid_of(qw)
    return torch.clamp(torch.round(tgt / S) + Z, 0, qw.maxq), qw.scales


def m_gptq(qw, tgt, H, o):
    return gptq_codes(qw, tgt, H, damp=o.get("damp", 0.01), act_order=bool(o.get("act", 1))), qw.scales


def m_gptq_cd(qw, tgt, H, o):
    S, Z = grid_of(qw)
    codes = gptq_codes(qw, tgt, H, damp=o.get("damp", 0.01), act_order=bool(o.get("act", 1)))
    Hd = damp_h(H, o.get("cd_damp", 0.0)).float() if o.get("cd_damp", 0.0) else H.float()
    scales = qw.scales
    for it in range(o.get("rounds", 1)):
        codes = cd_sweeps(codes, S, Z, tgt, Hd, qw.maxq, sweeps=o.get("sweeps", 2))
        if o.get("refit", 0):
            new_s = refit_scales(qw, codes, tgt, Hd)
            cand = replace(qw, codes=codes.to(torch.int32), scales=new_s).dequantize()
            cur = replace(qw, codes=codes.to(torch.int32), scales=scales).dequantize()
            if obj(cand, tgt, Hd) < obj(cur, tgt, Hd):
                scales = new_s
                S = scales.float()[qw.g_idx.long()].T.contiguous()
    return codes, scales


METHODS = {"rtn": m_rtn, "gptq": m_gptq, "gptq_cd": m_gptq_cd}


def parse_opts(tokens):
    opts = {}
    for kv in tokens:
        k, v = kv.split("=")
        for cast in (int, float, str):
            try:
                opts[k] = cast(v); break
            except ValueError:
                pass
    return opts


def main():
    """python lab.py QDIR ADAPTER "METHOD k=v ..." ["METHOD k=v ..." ...]  (common options via env LAB_COMMON)"""
    qdir, adapter = sys.argv[1], sys.argv[2]
    specs = sys.argv[3:]
    common = parse_opts(os.environ.get("LAB_COMMON", "").split())
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    t0 = time.time()
    model, QW, W, T, R, qcfg = load_all(qdir, adapter)
    tok = AutoTokenizer.from_pretrained(qdir)
    n_eval, seq = common.get("n_eval", 16), common.get("seq_len", 256)
    ev = windows(tok, builtin_text(common.get("eval", "code"), "heldout", max_chars=400_000), n_eval, seq)
    cache = os.path.join(adapter, f"ref_nll_{common.get('eval','code')}_{n_eval}x{seq}.json")
    if os.path.exists(cache):
        ref = json.load(open(cache))
    else:
        set_weights(model, W); nb = mean_nll(model, ev)
        set_weights(model, T); na = mean_nll(model, ev)
        ref = {"base": nb, "attached": na}
        json.dump(ref, open(cache, "w"))
    print(f"base nll {ref['base']:.4f} ppl {math.exp(ref['base']):.2f} | attached nll {ref['attached']:.4f} ppl {math.exp(ref['attached']):.2f} | load {time.time()-t0:.0f}s", flush=True)
    norms0 = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    for spec in specs:
        for n, v in norms0.items():
            model.get_parameter(n).data = v.clone()
        method, *rest = spec.split()
        opts = dict(common); opts.update(parse_opts(rest))
        cal = windows(tok, builtin_text(opts.get("calib", "code"), "calib", max_chars=400_000), opts.get("n_calib", 16), seq)
        set_weights(model, W)
        t1 = time.time()
        res, stats = run_merge(model, QW, W, T, R, cal, METHODS[method], opts)
        if opts.get("e2e"):
            nm0 = mean_nll(model, ev)
            print(f"before e2e retention {(ref['base'] - nm0) / (ref['base'] - ref['attached'])*100:.1f}", flush=True)
            e2e_tune(model, QW, T, W, R, res, cal, opts)
        tm = time.time() - t1
        if opts.get("escape_ks"):
            nm0 = mean_nll(model, ev)
            ret0 = (ref["base"] - nm0) / (ref["base"] - ref["attached"])
            print(f"ESCAPE k=0 retention {ret0*100:.1f}", flush=True)
            by = opts.get("escape_by", "abs")
            if by == "abspp":  # error per parameter byte
                key = lambda p: stats[p]["abs"] / stats[p]["numel"]
            else:
                key = lambda p: stats[p][by]
            ranking = sorted(stats, key=key, reverse=True)
            print("top:", [(p.replace("model.layers.", ""), round(key(p), 5)) for p in ranking[:12]], flush=True)
            total = sum(QW[p].codes.numel() for p in QW)
            for k in [int(x) for x in str(opts["escape_ks"]).split(",")]:
                o2 = dict(opts); o2["_escape"] = set(ranking[:k]); o2["verbose"] = 0
                set_weights(model, W)
                run_merge(model, QW, W, T, R, cal, METHODS[method], o2)
                nmk = mean_nll(model, ev)
                retk = (ref["base"] - nmk) / (ref["base"] - ref["attached"])
                frac = sum(QW[p].codes.numel() for p in ranking[:k]) / total
                line = dict(method=method, opts={kk: vv for kk, vv in opts.items()}, escape_k=k, escape_by=by,
                            escaped_param_frac=frac, retention=retk, ppl=math.exp(nmk))
                print("ESCAPE", json.dumps(line), flush=True)
                with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl"), "a") as f:
                    f.write(json.dumps(line) + "\n")
            continue
        nm = mean_nll(model, ev)  # model now holds merged weights
        ret = (ref["base"] - nm) / (ref["base"] - ref["attached"]) if ref["base"] != ref["attached"] else float("nan")
        chg = sum(int((res[p][0] != QW[p].codes).sum()) for p in stats) / sum(QW[p].codes.numel() for p in stats)
        sch = sum(int((res[p][1] != QW[p].scales).sum()) for p in stats) / sum(QW[p].scales.numel() for p in stats)
        mres = sum(s["res"] for s in stats.values()) / len(stats)
        line = dict(method=method, opts=opts, ppl=math.exp(nm), nll=nm, retention=ret, codes_changed=chg,
                    scales_changed=sch, mean_res=mres, merge_s=tm, base_ppl=math.exp(ref["base"]), attached_ppl=math.exp(ref["attached"]))
        print("RESULT", json.dumps(line), flush=True)
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")
        if opts.get("save"):
            torch.save({p: {"codes": c, "scales": s} for p, (c, s) in res.items()}, opts["save"])


if __name__ == "__main__":
    main()
