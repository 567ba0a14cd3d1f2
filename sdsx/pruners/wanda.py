"""Wanda (Sun et al. 2023): score |W_rj| * ||X_j||_2, compared within each output row; no update."""

from __future__ import annotations

import torch

from sdsx.pruners.base import PruneResult, apply_mask, reconstruction_error
from sdsx.pruners.magnitude import select_mask
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
