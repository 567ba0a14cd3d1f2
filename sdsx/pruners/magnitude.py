"""Magnitude pruning: score |W|, one threshold per matrix (unstructured) or per n:m group."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdsx import ops
from sdsx.pruners.base import PruneResult, apply_mask, reconstruction_error
from sdsx.pruners.registry import LayerContext, Pruner, register
from sdsx.pruners.spec import SparsitySpec


def select_mask(scores: torch.Tensor, spec: SparsitySpec, per_row: bool) -> torch.Tensor:
    """Keep-mask for a score matrix under a pattern (N:M groups, else exact-count top-k)."""
    if spec.is_nm:
        return ops.nm_mask(scores, spec.n, spec.m)
    return ops.topk_mask(scores, spec.sparsity, per_row=per_row)


def magnitude(weight: torch.Tensor, spec: SparsitySpec | str | float, hessian: torch.Tensor | None = None) -> PruneResult:
    """Prune the smallest |W| (whole-matrix threshold, or n:m groups along the input dim)."""
    spec = SparsitySpec.parse(spec)
    mask = select_mask(weight.abs(), spec, per_row=False)
    new = apply_mask(weight, mask)
    return PruneResult(new, mask, reconstruction_error(weight, new, hessian))


@dataclass(frozen=True)
class MagnitudeOptions:
    """Magnitude pruning has no options."""


def _solve(weight: torch.Tensor, stats: torch.Tensor | None, spec: SparsitySpec, options: MagnitudeOptions,
           context: LayerContext) -> PruneResult:
    full = stats is not None and stats.dim() == 2
    return magnitude(weight, spec, stats if full and context.need_loss else None)


register(Pruner("magnitude", _solve, stats="none", options=MagnitudeOptions,
                summary="the smallest |W|, one threshold per matrix (or per N:M group)", sds=False))
