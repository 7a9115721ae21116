"""The layer runner: a quantized model's own forward, one decoder layer at a time, in float.

`LayerwiseModel` builds the model on the meta device (`skeleton.py`), reads what layer 0 receives and
what every layer is called with (masks, rotary tables, positions) from the model's own forward
through hooks, and materialises each decoder layer from the checkpoint only when it runs
(`build_layer`, `forward_layer`). `verify` checks it against the stock transformers model before any
merge work, else the architecture is refused. How: docs/architecture.md ("The layer runner").
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import TYPE_CHECKING, Any, Callable, Iterable

from oftsurgery.errors import OftSurgeryError, UnsupportedFormatError
from oftsurgery.merge.calibration.skeleton import (
    CheckpointTensors,
    build_skeleton,
    decoder_layers,
    release,
    set_tensor,
    stock_tensor,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

SELF_CHECK_TOLERANCE = 1e-4  # relative L2 error of a decoder layer's output, runner vs the model's own forward
DEFAULT_BATCH_TOKENS = 4096  # calibration tokens per layer call: bounds the attention scores' memory
_NOT_FORWARDED = ("past_key_values", "past_key_value", "use_cache", "output_attentions")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has seen what it needed."""


class _Mismatch(Exception):
    def __init__(self, index: int, error: float, what: str):
        super().__init__(index, error, what)
        self.index, self.error, self.what = index, error, what


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _passthrough(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _in_dtype(value, dtype):
    """`value` (a tensor, or tuples/lists/dicts of them) with its floating-point tensors in `dtype`,
    clamped to its range (an additive mask's float32 minimum becomes the dtype's, not -inf)."""
    import torch

    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            return value
        info = torch.finfo(dtype)
        return value.clamp(info.min, info.max).to(dtype)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_in_dtype(v, dtype) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_in_dtype(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _in_dtype(v, dtype) for k, v in value.items()}
    return value


def relative_error(ours: "torch.Tensor", theirs: "torch.Tensor") -> float:
    import torch

    ref = float(torch.linalg.vector_norm(theirs.double()))
    diff = float(torch.linalg.vector_norm((ours - theirs).double()))
    return diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)


class LayerwiseModel:
    """Run a decoder-only transformers model layer by layer with weights supplied by the caller.

    `tensor(name)` returns any tensor of the checkpoint by name (non-quantized tensors as stored);
    `tensor_names` are all the checkpoint's tensor names (default: `tensor.__self__.tensors`, a
    `CheckpointReader`'s). Weights of quantized linears come from the `linear_weight(prefix)`
    callable given to `build_layer`/`verify` (the float weight [out, in]).
    """

    def __init__(self, config: dict[str, Any], tensor: Callable[[str], "torch.Tensor"], device: str = "cpu",
                 tensor_names: Iterable[str] | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS):
        import torch

        if tensor_names is None:
            tensor_names = getattr(getattr(tensor, "__self__", None), "tensors", None)
            if tensor_names is None:
                raise TypeError("LayerwiseModel needs tensor_names (the checkpoint's tensor names).")
        self.device = torch.device(device)
        self._config = dict(config)
        self._tensor = tensor
        self._names = set(tensor_names)
        self.batch_tokens = batch_tokens
        self.model = build_skeleton(self._config, checkpoint_layout=True)
        self.config = self.model.config
        self.architecture = type(self.model).__name__
        self.base, self.layers, self.layers_path = decoder_layers(self.model)
        self.num_layers = len(self.layers)
        self._outside: dict[str, torch.Tensor] = {}  # embeddings, norms: read once, shared with verify's model
        self._materialize_outside_layers(self.model, self.base, self.layers)
        self._kwargs: list[dict[str, Any]] | None = None
        self._kwargs_seq_len: int | None = None
        self._cast_kwargs: dict[tuple, dict[str, Any]] = {}  # (index, dtype) -> layer_kwargs in that dtype

    # ---- naming ----------------------------------------------------------------------------------
    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}"

    @staticmethod
    def linear_names(layer: "nn.Module") -> list[str]:
        import torch

        return [name for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]

    def module_linears(self) -> set[str]:
        """Full names of every linear in the decoder layers, in the checkpoint layout."""
        return {f"{self.layer_prefix(i)}.{name}" for i, layer in enumerate(self.layers) for name in self.linear_names(layer)}

    def _tensors(self, linear_weight: Callable[[str], "torch.Tensor"]) -> CheckpointTensors:
        return CheckpointTensors(self._names, self._tensor, linear_weight)

    # ---- materialising ---------------------------------------------------------------------------
    def _materialize_outside_layers(self, model: "nn.Module", base: "nn.Module", layers: "nn.ModuleList") -> None:
        """Embeddings, norms and buffers of the base model (everything but the decoder layers) on the device.

        Parameters are read from the checkpoint once: `verify`'s stock model gets the very tensors the
        runner holds (nothing modifies them), not a second copy of the embeddings."""
        base_path = next(name for name, module in model.named_modules() if module is base)
        layers_rel = next(name for name, module in base.named_modules() if module is layers)
        tensors = self._tensors(lambda prefix: self._unexpected_quantized(prefix))
        inside = layers_rel + "."
        for name, _ in list(base.named_parameters()):
            full = f"{base_path}.{name}" if base_path else name
            if name.startswith(inside) or not tensors.has(full):
                continue  # decoder layers come later; a parameter the checkpoint lacks stays meta, unused
            if full not in self._outside:
                self._outside[full] = tensors.get(full, device=self.device)
            set_tensor(base, name, self._outside[full])
        for name, buffer in list(base.named_buffers()):
            if not name.startswith(inside):
                set_tensor(base, name, buffer.to(self.device))

    def _unexpected_quantized(self, prefix: str):
        raise UnsupportedFormatError(
            f"{prefix} outside the decoder layers is quantized; the layer runner handles quantized "
            "decoder-layer linears only (use --method rtn)."
        )

    def _set_checked(self, module: "nn.Module", name: str, param: "torch.Tensor", value: "torch.Tensor",
                     where: str) -> None:
        """Put `value` in place of the parameter `name`, on the run device, if its shape is the model's."""
        if tuple(value.shape) != tuple(param.shape):
            raise UnsupportedFormatError(f"{where} has shape {tuple(value.shape)}, but {self.architecture} expects "
                                         f"{tuple(param.shape)} (use --method rtn).")
        set_tensor(module, name, value.to(self.device))

    def build_layer(self, index: int, linear_weight: Callable[[str], "torch.Tensor"],
                    dtype: "torch.dtype | None" = None) -> "nn.Module":
        """Decoder layer `index` on the device, in the checkpoint's layout: quantized linears from
        `linear_weight(prefix)`, every other parameter as stored; floating-point parameters in `dtype`
        (default float32; buffers such as rotary tables stay as the model makes them)."""
        import torch

        layer = copy.deepcopy(self.layers[index])
        prefix = self.layer_prefix(index)
        tensors = self._tensors(linear_weight)
        for name, param in list(layer.named_parameters()):
            full = f"{prefix}.{name}"
            if not tensors.has(full):
                raise UnsupportedFormatError(
                    f"{self.architecture} decoder layer {index} has a parameter {name} that the checkpoint does not "
                    f"hold ({full}); its tensors do not match this model class's layout (use --method rtn)."
                )
            value = tensors.get(full)
            if dtype not in (None, torch.float32) and value.is_floating_point():
                value = value.to(self.device, dtype)
            self._set_checked(layer, name, param, value, f"{full} in the checkpoint")
        for name, buffer in list(layer.named_buffers()):
            full = f"{prefix}.{name}"
            set_tensor(layer, name, (tensors.get(full) if full in self._names else buffer).to(self.device))
        return layer.eval()

    def set_linear_weight(self, layer: "nn.Module", name: str, weight: "torch.Tensor") -> None:
        """Put `weight` [out, in] in place of linear `name`'s weight in a layer from `build_layer`, as
        `build_layer` would have put it there (a layer is built once and updated as it is merged)."""
        import torch

        param = layer.get_submodule(name).weight  # float32, or the dtype the layer was built in
        self._set_checked(layer, f"{name}.weight", param, weight.to(torch.float32).to(self.device, param.dtype),
                          f"the new weight of {name}")

    # ---- what the layers receive -----------------------------------------------------------------
    def _run_to_layers(self, input_ids: "torch.Tensor", last: int) -> dict[int, tuple["torch.Tensor", dict]]:
        """Run the model's own forward on `input_ids` until decoder layer `last` is called; return what
        layers 0..last were called with. Layers before `last` pass hidden states through unchanged,
        so only the arguments (not the hidden states) of layers after 0 are meaningful."""
        import torch

        records: dict[int, tuple[torch.Tensor, dict]] = {}

        def pre_hook(index: int):
            def hook(module, args, kwargs):
                records[index] = self._call_arguments(module, args, kwargs)
                if index == last:
                    raise _Stop
            return hook

        hooks = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
                 for i, layer in enumerate(self.layers) if i <= last]
        shadowed = list(self.layers)[:last]
        for layer in shadowed:  # an instance attribute shadows the class's forward; hooks still run
            layer.forward = _passthrough
        try:
            with torch.no_grad():
                self.base(input_ids=input_ids.to(self.device), use_cache=False)
        except _Stop:
            pass
        except Exception as exc:
            raise UnsupportedFormatError(
                f"{self.architecture}'s own forward could not be run up to its decoder layers "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}); use --method rtn."
            ) from None
        finally:
            for hook in hooks:
                hook.remove()
            for layer in shadowed:
                del layer.forward
        if len(records) != last + 1:
            raise UnsupportedFormatError(
                f"{self.architecture}'s forward did not call its decoder layers in order; use --method rtn."
            )
        return records

    @staticmethod
    def _call_arguments(module, args, kwargs) -> tuple["torch.Tensor", dict]:
        """(hidden states, every other argument by name) of one decoder-layer call."""
        kwargs = dict(kwargs)
        if args:
            hidden, extra = args[0], args[1:]
            if extra:  # name positional extras so they can be passed as keywords
                params = [p for p in inspect.signature(module.forward).parameters][1:]
                kwargs.update(zip(params, extra))
        else:
            hidden = kwargs.pop("hidden_states")
        return hidden, {k: v for k, v in kwargs.items() if k not in _NOT_FORWARDED}

    def first_layer_inputs(self, input_ids: "torch.Tensor") -> tuple["torch.Tensor", dict[str, Any]]:
        """Hidden states entering decoder layer 0 for every row of `input_ids` [rows, seq_len], and the
        keyword arguments of layer 0 (see `layer_kwargs`)."""
        import torch

        self._capture_kwargs(input_ids[:1])
        rows = self.batch_rows(input_ids.shape[1])
        hidden = [self._run_to_layers(input_ids[r : r + rows], last=0)[0][0] for r in range(0, input_ids.shape[0], rows)]
        return torch.cat(hidden), self.layer_kwargs(0)

    def _capture_kwargs(self, one_row: "torch.Tensor") -> None:
        seq_len = int(one_row.shape[1])
        if self._kwargs is not None and self._kwargs_seq_len == seq_len:
            return
        records = self._run_to_layers(one_row, last=self.num_layers - 1)
        self._kwargs = [records[i][1] for i in range(self.num_layers)]
        self._kwargs_seq_len = seq_len
        self._cast_kwargs = {}

    def layer_kwargs(self, index: int, dtype: "torch.dtype | None" = None) -> dict[str, Any]:
        """Keyword arguments the model's own forward passes decoder layer `index` (its layer type's
        mask and rotary tables), for batch size 1: they broadcast over any number of rows.

        They are captured in float32; for a layer computing in another `dtype` their floating-point
        tensors are given in that dtype, as the model in that dtype makes them (rotary tables cast
        from float32, additive masks clamped to the dtype's range)."""
        import torch

        if self._kwargs is None:
            raise RuntimeError("call first_layer_inputs before layer_kwargs")
        if dtype in (None, torch.float32):
            return self._kwargs[index]
        key = (index, dtype)
        if key not in self._cast_kwargs:
            self._cast_kwargs[key] = {k: _in_dtype(v, dtype) for k, v in self._kwargs[index].items()}
        return self._cast_kwargs[key]

    def batch_rows(self, seq_len: int) -> int:
        return max(1, self.batch_tokens // max(1, seq_len))

    def forward_layer(self, layer_module: "nn.Module", index: int, hidden: "torch.Tensor") -> "torch.Tensor":
        """Decoder layer `index` (a module from `build_layer`) applied to hidden states [rows, seq, hidden]
        (in the dtype the layer was built in)."""
        import torch

        kwargs = self.layer_kwargs(index, hidden.dtype)
        rows = self.batch_rows(hidden.shape[1])
        with torch.no_grad():
            return torch.cat([_first(layer_module(hidden[r : r + rows], **kwargs)) for r in range(0, hidden.shape[0], rows)])

    # ---- the self-check --------------------------------------------------------------------------
    def verify(self, input_ids: "torch.Tensor", linear_weight: Callable[[str], "torch.Tensor"],
               tolerance: float = SELF_CHECK_TOLERANCE) -> list[float]:
        """Check that the runner reproduces the model's own forward; return each layer's relative error.

        The reference is the stock transformers model (its own classes and fused modules, every
        layer materialised in turn from the same weights) run on `input_ids` in one call. The runner
        goes its own way: its captured embeddings (compared with what the reference's layer 0
        receives) and per-layer arguments, its split layout, rows in batches; each of its layers is
        run on the input the reference's layer received. Raises UnsupportedFormatError naming the architecture and the first layer whose
        output differs by more than `tolerance` (relative L2).
        """
        import torch

        reference = build_skeleton(self._config, checkpoint_layout=False)
        ref_base, ref_layers, _ = decoder_layers(reference)
        self._materialize_outside_layers(reference, ref_base, ref_layers)
        weights: dict[str, torch.Tensor] = {}

        def cached_weight(prefix: str) -> "torch.Tensor":  # one dequantization per linear for both sides
            if prefix not in weights:
                weights[prefix] = linear_weight(prefix)
            return weights[prefix]

        tensors = self._tensors(cached_weight)
        embedded = self.first_layer_inputs(input_ids)[0]
        state: dict[str, torch.Tensor] = {}
        errors: list[float] = []

        def pre_hook(index: int):
            def hook(module, args, kwargs):
                theirs, _ = self._call_arguments(module, args, kwargs)
                if index == 0:
                    err = relative_error(embedded, theirs)
                    if not err <= tolerance:
                        raise _Mismatch(0, err, "the input of decoder layer 0 (the embeddings)")
                # each layer is compared on the reference's own input: rounding differences cannot pile
                # up across layers (or flip an MoE router's choice), so any mismatch is this layer's
                state["input"] = theirs
                prefix = self.layer_prefix(index)
                for name, param in list(module.named_parameters()):
                    self._set_checked(module, name, param, stock_tensor(module, prefix, name, tensors),
                                      f"{prefix}.{name} assembled from the checkpoint")
                for name, buffer in list(module.named_buffers()):
                    set_tensor(module, name, buffer.to(self.device))
            return hook

        def post_hook(index: int):
            def hook(module, args, kwargs, output):
                theirs = _first(output)
                layer = self.build_layer(index, cached_weight)
                ours = self.forward_layer(layer, index, state.pop("input"))
                release(module)
                weights.clear()
                err = relative_error(ours, theirs)
                errors.append(err)
                if not err <= tolerance:
                    raise _Mismatch(index, err, f"decoder layer {index}")
            return hook

        hooks = []
        for i, layer in enumerate(ref_layers):
            hooks.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            hooks.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
        try:
            with torch.no_grad():
                ref_base(input_ids=input_ids.to(self.device), use_cache=False)
        except _Mismatch as bad:
            raise UnsupportedFormatError(
                f"The layer runner does not reproduce {self.architecture}'s own forward at {bad.what} "
                f"(relative error {bad.error:.1e} > {tolerance:.0e}), so calibrating would use wrong "
                "activations; use --method rtn."
            ) from None
        except OftSurgeryError:
            raise
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
            raise UnsupportedFormatError(
                f"The layer runner could not be checked against {self.architecture}'s own forward "
                f"({type(exc).__name__}: {detail}); use --method rtn."
            ) from None
        finally:
            for hook in hooks:
                hook.remove()
        if len(errors) != self.num_layers:
            raise UnsupportedFormatError(
                f"{self.architecture}'s own forward ran {len(errors)} of its {self.num_layers} decoder layers, so the "
                "layer runner cannot be checked against it; use --method rtn."
            )
        return errors
