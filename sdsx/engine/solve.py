"""The solve step of one block: every linear's statistics finalized (once per shared input; with
validation windows split into the H over all windows, the fitting windows' H and the validation
H), the layer function called, its result checked and written back, and each layer recorded."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sdsx.checkpoint import fault_point
from sdsx.engine.accounting import nbytes
from sdsx.engine.passes import Accumulators, PassState
from sdsx.engine.records import LayerRecord
from sdsx.engine.runner import BlockRunner
from sdsx.model.blocks import get_weight, set_weight
from sdsx.numerics import all_finite
from sdsx.pruners.base import PruneResult

__all__ = ["LayerFn", "solve_block"]

#: ``layer_fn(qualified_name, weight (out, in) on the compute device, H or None) -> PruneResult``;
#: H is the (in, in) Gram matrix X X^T / T, or its diagonal (in,) with ``stats="diag"``, or None
#: with ``stats="none"``. Linears that read the same input tensor receive the *same* H object, so
#: a layer function may cache work keyed on it (e.g. a factorization). Returning None leaves the
#: layer unchanged.
LayerFn = Callable[[str, torch.Tensor, "torch.Tensor | None"], "PruneResult | None"]


def solve_block(runner: BlockRunner, index: int, linears: dict[str, nn.Module], layer_fn: LayerFn, p: PassState, acc: Accumulators) -> None:
    """Call ``layer_fn`` on every linear of block ``index`` with its finalized statistics and
    write the results back, recording each layer."""
    result, memory = p.result, p.memory
    accs, crosses, vaccs, oaccs = acc.calib, acc.crosses, acc.val, acc.other
    finalized: dict[int, torch.Tensor] = {}
    cross_final: dict[int, torch.Tensor] = {}
    splits: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    try:
        for name, module in linears.items():
            H = None
            acc = accs.get(name)
            if acc is not None:
                H = finalized.get(id(acc))
                if H is None:
                    t0 = runner.now()
                    try:
                        H = finalized[id(acc)] = acc.finalize()
                    except FloatingPointError as exc:
                        raise FloatingPointError(f"{name}: {exc}; they come from the block's input or its own computation") from exc
                    memory.add(nbytes(H))
                    result.stats_s += runner.now() - t0
            split = None
            if vaccs:
                split_all = splits.get(id(acc))
                if split_all is None:
                    t0 = runner.now()
                    vacc, other = vaccs[name], (oaccs or {}).get(name)
                    Hv = vacc.finalize()
                    # H over all calibration windows, so that phase 1 / a base pruner sees all of it
                    H_all = (H * acc.tokens + Hv * vacc.tokens) / (acc.tokens + vacc.tokens)
                    if other is not None:  # another domain's windows validate, with equal weight per token
                        Hv = (Hv * vacc.tokens + other.finalize() * other.tokens) / (vacc.tokens + other.tokens)
                    split_all = splits[id(acc)] = (H_all, H, Hv)
                    memory.add(nbytes(H_all) + nbytes(Hv))
                    result.stats_s += runner.now() - t0
                H, split = split_all[0], split_all[1:]
            weight = get_weight(module)
            if not all_finite(weight):
                raise FloatingPointError(f"{name}: the weight holds NaN/Inf before pruning; the model is damaged")
            fault_point("layer")
            t0 = runner.now()
            if crosses:
                C = cross_final.get(id(acc))
                if C is None:
                    C = cross_final[id(acc)] = crosses[id(acc)].finalize()
                out = layer_fn(name, weight, H, C) if split is None else layer_fn(name, weight, H, C, split=split)
            elif split is not None:
                out = layer_fn(name, weight, H, split=split)
            else:
                out = layer_fn(name, weight, H)
            if out is not None:
                if not all_finite(out.weight):
                    raise FloatingPointError(f"{name}: the pruned weight holds NaN/Inf; the layer's statistics are degenerate")
                memory.add(nbytes(tuple(out)))
                set_weight(module, out.weight)
                memory.sub(nbytes(tuple(out)))
            seconds = runner.now() - t0
            result.solver_s += seconds
            if out is None:
                pruned, loss = 0, float("nan")
            else:
                pruned, loss = int(out.mask.numel() - out.mask.sum()), float(out.loss)
            rows, cols = weight.shape
            result.layers.append(LayerRecord(name, (int(rows), int(cols)), pruned, weight.numel(), loss, seconds, index))
    finally:
        memory.sub(sum(nbytes(h) for h in finalized.values()))
        memory.sub(sum(nbytes(s[0]) + nbytes(s[2]) for s in splits.values()))
        if crosses:
            memory.sub(sum(nbytes(c.sum) for c in crosses.values()))
            crosses.clear()
