"""The OFT wrappers on real gptqmodel GPTQ/AWQ layers, against PEFT's OFT layer and the dequantized weight."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from oft_helpers import autoawq_layer, awq_layer, dequantized_weight, gptq_layer
from oftsurgery.oft import AwqOFTLinear, GPTQOFTLinear, dispatch_awq, dispatch_gptq, rotate_weight
from oftsurgery.oft import awq as awq_module

import peft.tuners.oft.layer as peft_layer  # a required test dependency: a missing one must fail, not skip
from peft import OFTConfig

IN, OUT = 96, 64


@pytest.fixture
def layers():
    # fresh per test: gptqmodel's AWQ kernel converts its scales in place to the last input's dtype
    return {"gptq": gptq_layer(IN, OUT, group_size=32), "awq": awq_layer(IN, OUT, group_size=32)}


LAYOUTS = [(4, 0), (0, 16), (0, 20)]  # (r, oft_block_size); 20 does not divide 96: PEFT adjusts it to 16... per layer
PARAMETERIZATIONS = [(False, 5), (True, 5), (True, 3)]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]


def _wrapper_cls(kind):
    return GPTQOFTLinear if kind == "gptq" else AwqOFTLinear


def _pair(base, kind, r, block, neumann, terms, coft, share, param_dtype, seed=0):
    """Our wrapper and PEFT's OFT Linear on the same quantized layer with identical parameters."""
    options = dict(module_dropout=0.0, coft=coft, eps=0.05, block_share=share, use_cayley_neumann=neumann,
                   num_cayley_neumann_terms=terms, init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = _wrapper_cls(kind)(base, "default", r=r, oft_block_size=block, dtype=param_dtype, **options)
        cfg = OFTConfig(r=r, oft_block_size=block, target_modules=["x"], **options)
        theirs = peft_layer.Linear(base, "default", config=cfg, r=r)
    theirs.oft_R["default"].to(param_dtype)
    torch.manual_seed(seed)
    with torch.no_grad():
        ours.oft_R["default"].weight.normal_(0, 0.1)
        theirs.oft_R["default"].weight.copy_(ours.oft_R["default"].weight)
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("kind", ["gptq", "awq"])
@pytest.mark.parametrize("param_dtype,x_dtype", DTYPES)
def test_forward_equals_peft_and_dequantized_reference(layers, kind, param_dtype, x_dtype):
    base = layers[kind]
    weight = dequantized_weight(base)
    bias = base.bias.double()
    torch.manual_seed(1)
    x = torch.randn(2, 5, IN).to(x_dtype)
    for (r, block), (neumann, terms), coft, share in itertools.product(
        LAYOUTS, PARAMETERIZATIONS, [False, True], [False, True]
    ):
        case = f"r={r} b={block} neumann={neumann}/{terms} coft={coft} share={share}"
        ours, theirs = _pair(base, kind, r, block, neumann, terms, coft, share, param_dtype)
        with torch.no_grad():
            expected = theirs(x)  # PEFT projects its coft parameters in place; so do we
            got = ours(x)
        assert got.dtype == x_dtype
        assert torch.equal(ours.oft_R["default"].weight, theirs.oft_R["default"].weight), case
        # same kernels, same operation order: the outputs agree bit for bit (in every dtype)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=case)
        # independent reference: x @ (W Rᵀ)ᵀ + b with W from the library's own dequantizer, float64
        blocks = ours.rotation_blocks("default").double()
        if param_dtype != torch.float32:  # the wrapper rotates with blocks in the parameters' dtype
            blocks = ours.oft_R["default"].blocks(training=False).double()
            blocks = blocks.expand(IN // blocks.shape[-1], -1, -1) if share else blocks
        reference = x.double() @ rotate_weight(weight, blocks).T + bias
        tol = 2e-6 if (kind == "gptq" and x_dtype == param_dtype == torch.float32) else 6e-2
        torch.testing.assert_close(got.double(), reference, rtol=tol, atol=tol, msg=case)


def test_per_layer_block_size_adjustment_matches_peft(layers):
    with pytest.warns(UserWarning, match="nearest divisor"):
        ours = GPTQOFTLinear(layers["gptq"], "default", r=0, oft_block_size=20)
    assert ours.oft_block_size["default"] == 16 and ours.r["default"] == 6
    assert tuple(ours.oft_R["default"].weight.shape) == (6, 120)


class CountingLayer(torch.nn.Module):
    """Counts how often the quantized layer runs."""

    def __init__(self, layer):
        super().__init__()
        self.layer, self.calls = layer, 0
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.qweight = layer.qweight

    def forward(self, x):
        self.calls += 1
        return self.layer(x)


@pytest.mark.parametrize("kind", ["gptq", "awq"])
def test_base_layer_runs_once_per_forward(layers, kind):
    counting = CountingLayer(layers[kind])
    wrapper = _wrapper_cls(kind)(counting, "a", r=0, oft_block_size=16, init_weights=False)
    wrapper.update_layer("b", r=0, oft_block_size=32, init_weights=False)
    wrapper.set_adapter(["a", "b"])
    x = torch.randn(3, IN)
    wrapper.train()
    wrapper(x).sum().backward()
    assert counting.calls == 1
    wrapper.eval()
    with torch.no_grad():
        wrapper(x)
    assert counting.calls == 2
    wrapper.enable_adapters(False)
    wrapper(x)
    assert counting.calls == 3


def test_named_adapters_add_activate_disable(layers):
    base = layers["gptq"]
    wrapper = GPTQOFTLinear(base, "a", r=0, oft_block_size=16, init_weights=False)
    wrapper.update_layer("b", r=0, oft_block_size=32, init_weights=False, use_cayley_neumann=True)
    x = torch.randn(4, IN)
    weight = dequantized_weight(base)
    blocks_a = wrapper.rotation_blocks("a").double()
    blocks_b = wrapper.rotation_blocks("b").double()
    with torch.no_grad():
        only_a = wrapper(x).double()
        wrapper.set_adapter("b")
        only_b = wrapper(x).double()
        wrapper.set_adapter(["a", "b"])
        both = wrapper(x).double()
        wrapper.enable_adapters(False)
        off = wrapper(x)
        bare = base(x)
    b = base.bias.double()
    torch.testing.assert_close(only_a, x.double() @ rotate_weight(weight, blocks_a).T + b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(only_b, x.double() @ rotate_weight(weight, blocks_b).T + b, rtol=1e-5, atol=1e-5)
    # x → x·R_a → (x·R_a)·R_b: the dense weight is W·R_bᵀ·R_aᵀ
    both_ref = x.double() @ rotate_weight(rotate_weight(weight, blocks_b), blocks_a).T + b
    torch.testing.assert_close(both, both_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(off, bare)
    assert wrapper.oft_R["a"].weight.requires_grad and wrapper.oft_R["b"].weight.requires_grad
    wrapper.set_adapter("a")
    assert not wrapper.oft_R["b"].weight.requires_grad
    wrapper.delete_adapter("b")
    assert list(wrapper.oft_R) == ["a"]
    with pytest.raises(KeyError):
        wrapper.set_adapter("b")


def test_identity_init_is_the_bare_layer(layers):
    for kind, base in layers.items():
        wrapper = _wrapper_cls(kind)(base, "default")
        x = torch.randn(2, IN)
        torch.testing.assert_close(wrapper(x), base(x), rtol=0, atol=0)


def test_eval_cache_recomputed_only_when_parameters_change(layers, monkeypatch):
    from oftsurgery.oft import layer as layer_module

    calls = []
    real = layer_module.rot.rotation_blocks
    monkeypatch.setattr(layer_module.rot, "rotation_blocks", lambda *a, **k: calls.append(1) or real(*a, **k))
    wrapper = GPTQOFTLinear(layers["gptq"], "default", r=0, oft_block_size=16, init_weights=False).eval()
    x = torch.randn(2, IN)
    with torch.no_grad():
        first = wrapper(x)
        wrapper(x)
        assert len(calls) == 1
        wrapper.oft_R["default"].weight.mul_(0.5)
        second = wrapper(x)
    assert len(calls) == 2 and not torch.equal(first, second)
    with torch.inference_mode():
        wrapper(x)
        wrapper(x)
    assert len(calls) == 3  # inference tensors are cached separately
    wrapper.train()
    with torch.no_grad():
        wrapper(x)
        wrapper(x)
    assert len(calls) == 5  # training mode never caches


def test_eval_cache_survives_coft_projection(layers):
    wrapper = GPTQOFTLinear(layers["gptq"], "default", r=0, oft_block_size=16, coft=True, eps=1e-3,
                            init_weights=False).eval()
    x = torch.randn(2, IN)
    with torch.no_grad():
        wrapper(x)
        cached = wrapper.oft_R["default"]._cache
        wrapper(x)
    assert wrapper.oft_R["default"]._cache is cached


@pytest.mark.parametrize("kind", ["gptq", "awq"])
def test_gradients_reach_rotation_through_quantized_kernel(layers, kind):
    """Training through gptqmodel's CPU torch kernels matches a dense float64 computation's gradient."""
    base = layers[kind]
    wrapper = _wrapper_cls(kind)(base, "default", r=0, oft_block_size=16, init_weights=False,
                                 use_cayley_neumann=True).train()
    x = torch.randn(8, IN)
    target = torch.randn(8, OUT)
    loss = ((wrapper(x) - target) ** 2).mean()
    loss.backward()
    grad = wrapper.oft_R["default"].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0

    from oftsurgery.oft import rotation as rot

    params = wrapper.oft_R["default"].weight.detach().double().requires_grad_(True)
    blocks = rot.rotation_blocks(params, 16, use_cayley_neumann=True)
    weight = dequantized_weight(base)
    ref_loss = ((rot.apply_rotation_to_input(x.double(), blocks) @ weight.T + base.bias.double()
                 - target.double()) ** 2).mean()
    ref_loss.backward()
    tol = 1e-4 if kind == "gptq" else 3e-2  # gptqmodel's AWQ kernel computes in float16
    torch.testing.assert_close(grad.double(), params.grad, rtol=tol, atol=tol * grad.abs().max().item())


def test_module_dropout_only_in_training(layers):
    wrapper = GPTQOFTLinear(layers["gptq"], "default", r=0, oft_block_size=8, module_dropout=0.5,
                            init_weights=False)
    x = torch.randn(2, IN)
    with torch.no_grad():
        wrapper.eval()
        a, b = wrapper(x), wrapper(x)
        assert torch.equal(a, b)
        wrapper.train()
        torch.manual_seed(0)
        c = wrapper(x)
    assert not torch.allclose(a, c)
    blocks = wrapper.oft_R["default"].blocks(training=True)
    eye = torch.eye(8)
    assert sum(bool((blk == eye).all()) for blk in blocks) == 6  # int(0.5 * 12)


def test_repr_and_aliases(layers):
    wrapper = dispatch_gptq(layers["gptq"], "default")
    assert repr(wrapper).startswith("oft.GPTQOFTLinear(")
    assert wrapper.quant_linear_module is wrapper.base_layer is layers["gptq"]
    assert wrapper.qweight is layers["gptq"].qweight
    assert list(wrapper.state_dict()).count("base_layer.qweight") == 1
    assert "oft_R.default.weight" in wrapper.state_dict()
    awq = dispatch_awq(layers["awq"], "default")
    assert repr(awq).startswith("oft.AwqOFTLinear(") and awq.qweight is layers["awq"].qweight


def test_seed_constructor_defaults(layers):
    g = GPTQOFTLinear(layers["gptq"], "default")
    assert (g.r["default"], g.oft_block_size["default"]) == (8, IN // 8)
    a = AwqOFTLinear(layers["awq"], "default")
    assert (a.r["default"], a.oft_block_size["default"]) == (IN // 32, 32)
    assert g.oft_R["default"].use_cayley_neumann is False and g.oft_R["default"].num_cayley_neumann_terms == 5
    assert torch.count_nonzero(g.oft_R["default"].weight) == 0


def test_dispatch_returns_none_for_other_layers(layers):
    dense = torch.nn.Linear(IN, OUT)
    assert dispatch_gptq(dense, "x") is None and dispatch_awq(dense, "x") is None
    assert dispatch_gptq(layers["awq"], "x") is None
    assert dispatch_awq(layers["gptq"], "x") is None
    wrapped = dispatch_gptq(layers["gptq"], "x")
    rewrapped = dispatch_gptq(wrapped, "y")  # a wrapper is unwrapped, never rotated twice
    assert rewrapped.base_layer is layers["gptq"]
    assert dispatch_gptq(layers["gptq"], "x", gptq_quantization_config={"bits": 4}) is not None


# ---- autoawq WQLinear_GEMM ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def autoawq():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import awq.modules.linear  # autoawq is a required test dependency

        return awq.modules.linear


def test_autoawq_gemm_wrapper_equals_peft_on_gptqmodel_awq(layers, autoawq):
    """autoawq's layer (its own forward has no CPU path) gives the numbers of PEFT on AwqTorchLinear."""
    packed = autoawq_layer(IN, OUT, group_size=32)
    assert torch.equal(packed.qweight, layers["awq"].qweight)
    assert torch.equal(packed.scales, layers["awq"].scales) and torch.equal(packed.qzeros, layers["awq"].qzeros)  # same codes, byte-identical buffers
    wrapper = dispatch_awq(packed, "default", r=0, oft_block_size=16, init_weights=False)
    assert isinstance(wrapper, AwqOFTLinear) and wrapper.qweight is packed.qweight
    ours_on_gptqmodel, theirs = _pair(layers["awq"], "awq", 0, 16, False, 5, False, False, torch.float32)
    with torch.no_grad():
        wrapper.oft_R["default"].weight.copy_(ours_on_gptqmodel.oft_R["default"].weight)
    x = torch.randn(3, IN)
    torch.testing.assert_close(wrapper(x), theirs(x), rtol=0, atol=1e-6)
    # and it trains: the input gradient is a plain matmul's
    wrapper.train()
    wrapper(x).sum().backward()
    assert wrapper.oft_R["default"].weight.grad.abs().sum() > 0


def test_autoawq_version_check(autoawq, monkeypatch):
    packed = autoawq_layer(IN, OUT, group_size=32)
    monkeypatch.setattr(awq_module, "autoawq_version", lambda: "0.1.8")
    with pytest.raises(ImportError, match=r"found 0\.1\.8.*minimum supported version is 0\.2\.0"):
        dispatch_awq(packed, "default")
    # only AWQ layers trigger the check
    assert dispatch_awq(torch.nn.Linear(4, 4), "default") is None
    monkeypatch.setattr(awq_module, "autoawq_version", lambda: "0.2.0")
    assert dispatch_awq(packed, "default") is not None
