"""Wanda (Sun et al. 2023): score |W_rj| * ||X_j||_2, compared within each output row; no update."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdsx.pruners.base import PruneResult, apply_mask, reconstruction_error
from sdsx.pruners.magnitude import select_mask
from sdsx.pruners.registry import LayerContext, Pruner, register
from sdsx.pruners.spec import SparsitySpec


def wanda(
    weight: torch.Tensor,
    input_sq_norms: torch.Tensor,
    spec: SparsitySpec | str | float,
    hessian: torch.Tensor | None = None,
) -> PruneResult:
    """Prune by |W| * ||X_j||.

    Args:
        weight: (out, in).
        input_sq_norms: (in,) mean of x_j^2 over calibration tokens (diag of H = X X^T / T); any
            positive scale gives the same mask.
        spec: sparsity pattern.
        hessian: optional full H, only to report the layer error.
    """
    spec = SparsitySpec.parse(spec)
    if input_sq_norms.shape != (weight.shape[1],):
        raise ValueError(f"input_sq_norms must have shape ({weight.shape[1]},), got {tuple(input_sq_norms.shape)}")
    scores = weight.float().abs() * input_sq_norms.to(weight.device, torch.float32).sqrt().unsqueeze(0)
    mask = select_mask(scores, spec, per_row=True)
    new = apply_mask(weight, mask)
    return PruneResult(new, mask, reconstruction_error(weight, new, hessian))


@dataclass(frozen=True)
class WandaOptions:
    """Wanda has no options."""


def _solve(weight: torch.Tensor, stats: torch.Tensor | None, spec: SparsitySpec, options: WandaOptions,
           context: LayerContext) -> PruneResult:
    if stats is None:
        raise ValueError(f"{context.name}: Wanda needs the inputs' squared column norms (statistics 'diag' or 'full')")
    if stats.dim() == 1:
        return wanda(weight, stats, spec)
    return wanda(weight, stats.diagonal(), spec, hessian=stats if context.need_loss else None)


register(Pruner("wanda", _solve, stats="diag", options=WandaOptions,
                summary="|W_ij| * ||X_j||, compared within each output row (Sun et al. 2023)"))
