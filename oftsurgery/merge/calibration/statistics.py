"""The calibration statistics of one input group, gathered shard by shard: the same bits on any number of ranks.

`collect_group_inputs` builds what the solver needs about the input X of a group of linears
(`solve/hessian.py`): H over the fitted rows, X itself while it has at most `in_features` rows, and
the same for the held-out rows. Each shard is accumulated alone and the shards are added in the fixed
tree of `runtime/shards.py`, so one process and any number of ranks agree bit for bit
(docs/distributed.md). H's products run in TF32 on a GPU when the layer computes in float16 or
bfloat16, whose values TF32 holds exactly (`solve/products.py`): float32's result, faster.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

BATCH_TOKENS = 4096  # calibration tokens per forward pass: few launches, small attention memory

if TYPE_CHECKING:
    import torch

    from oftsurgery.merge.runtime.ranks import SingleProcess
    from oftsurgery.merge.solve.hessian import CalibrationInputs


class _GroupSeen(Exception):
    """Raised by a hook once every linear of the group has read its input: the rest of the pass is skipped."""


def collect_group_inputs(ranks: "SingleProcess", layer_module, names: list[str], hidden: "torch.Tensor",
                         num_rows: int, kwargs: dict[str, Any], *, fitted: bool = True) -> dict[str, "CalibrationInputs"]:
    """One `CalibrationInputs` shared by the linears `names` of `layer_module`, which read one input.

    `fitted=False` runs only the held-out rows (where there are any): the fitted statistics then hold
    no tokens, for a caller that only measures (`CalibrationInputs.measured`), an eighth of the work.

    `hidden` holds this rank's calibration rows (`ranks.local_rows(num_rows)`) entering the layer.
    Linears no calibration token reaches (an MoE expert) get statistics with no tokens. Each forward
    pass stops once the group's linears have read their input (the q/k/v group skips the attention
    and the MLP); a linear that reads two different inputs in one pass was refused before
    (`calibrated_loop._linears_by_input`).
    """
    import torch

    from oftsurgery.merge.solve import products
    from oftsurgery.merge.solve.hessian import CalibrationInputs, InputHessian, holdout_rows

    in_features = layer_module.get_submodule(names[0]).in_features
    first_row = ranks.local_rows(num_rows).start
    held_out = holdout_rows(num_rows)
    fitted = fitted or not held_out
    batch = max(1, BATCH_TOKENS // max(1, hidden.shape[1]))  # fitted rows per forward pass
    device = hidden.device if hidden.shape[0] else torch.device(ranks.device)
    kept_fit: list[torch.Tensor] = []  # this rank's fitted rows of X, while they can still be few enough
    kept_fit_tokens = 0
    holdout_by_shard: dict[int, list[torch.Tensor]] = {}

    seen: list[torch.Tensor] = []
    called: set[str] = set()

    def record(name: str):
        def hook(mod, inputs, output):
            seen.append(inputs[0])
            called.add(name)
            if len(called) == len(names):  # what follows in the layer is not needed here
                raise _GroupSeen
        return hook

    hooks = [layer_module.get_submodule(n).register_forward_hook(record(n)) for n in names]

    def shard_sums(rows: range) -> dict[str, torch.Tensor]:
        nonlocal kept_fit, kept_fit_tokens
        fit = torch.zeros(in_features, in_features, device=device)
        fit_tokens = holdout_tokens = 0
        holdout = holdout_by_shard.setdefault(rows.start, [])
        fitted_rows = [r for r in rows if r not in held_out]
        # fitted and held-out rows never share a forward pass (an MoE expert's input holds only the
        # tokens routed to it and could not be split by row afterwards), and a batch never spans two
        # shards, so every world size runs the very same batches
        batches = [("fit", fitted_rows[i : i + batch]) for i in range(0, len(fitted_rows), batch)] if fitted else []
        batches += [("holdout", [r]) for r in rows if r in held_out]
        with torch.no_grad():
            for part, chunk in batches:
                seen.clear()
                called.clear()
                local = torch.tensor(chunk, device=hidden.device) - first_row
                try:
                    layer_module(hidden.index_select(0, local), **kwargs)
                except _GroupSeen:
                    pass
                if any(x is not seen[0] for x in seen[1:]):
                    raise RuntimeError(f"{', '.join(names)} do not read one input")
                if not seen:  # routed elsewhere (an MoE expert)
                    continue
                exact = seen[0].dtype in (torch.float16, torch.bfloat16)  # TF32 holds these values exactly
                x = seen[0].reshape(-1, in_features).to(device, torch.float32)
                if part == "holdout":
                    holdout.append((x, exact))
                    holdout_tokens += x.shape[0]
                    continue
                products.addmm_(fit, x.T, x, exact=exact)
                fit_tokens += x.shape[0]
                if kept_fit is not None:
                    kept_fit.append(x)
                    kept_fit_tokens += x.shape[0]
                    if kept_fit_tokens > in_features:  # then all ranks together have too many as well
                        kept_fit = None
        seen.clear()
        return {"fit": fit, "fit_tokens": torch.tensor([fit_tokens], dtype=torch.int64, device=device),
                "holdout_tokens": torch.tensor([holdout_tokens], dtype=torch.int64, device=device)}

    try:
        sums = ranks.sum_over_shards(num_rows, shard_sums)
    finally:
        for hook in hooks:
            hook.remove()
    fit_tokens, holdout_tokens = int(sums["fit_tokens"].item()), int(sums["holdout_tokens"].item())
    small = fit_tokens <= in_features
    fit = InputHessian.assembled(in_features, device, tokens=fit_tokens, matrix=sums["fit"],
                                 rows=ranks.gather_rows(_rows(kept_fit, in_features, device)) if small else None)
    holdout = None
    if held_out:
        if holdout_tokens <= in_features:  # X is the cheaper form: H is made from it when asked
            rows = [x for shard in sorted(holdout_by_shard) for x, _ in holdout_by_shard[shard]]
            holdout = InputHessian.assembled(in_features, device, tokens=holdout_tokens,
                                             rows=ranks.gather_rows(_rows(rows, in_features, device)))
        else:
            def holdout_sums(rows: range) -> dict[str, torch.Tensor]:
                matrix = torch.zeros(in_features, in_features, device=device)
                for x, exact in holdout_by_shard.pop(rows.start, []):
                    products.addmm_(matrix, x.T, x, exact=exact)
                return {"holdout": matrix}

            holdout = InputHessian.assembled(in_features, device, tokens=holdout_tokens,
                                             matrix=ranks.sum_over_shards(num_rows, holdout_sums)["holdout"])
    stats = CalibrationInputs(fit, holdout)
    return {name: stats for name in names}


def _rows(pieces: "list[torch.Tensor] | None", in_features: int, device) -> "torch.Tensor":
    import torch

    if not pieces:
        return torch.zeros(0, in_features, device=device)
    return torch.cat(pieces)
