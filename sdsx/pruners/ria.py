"""RIA (relative importance and activations; Zhang et al., ICLR 2024): no update, a better score.

    score_ij = (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ** alpha

The first factor is the weight's relative importance: its share of its output row's and of its
input column's absolute sum, so a weight that matters to a small column is not pruned just because
its row is large. The second is the input's activation norm (Wanda's factor, softened by alpha, 0.5
in the paper). Weights are compared within each output row (unstructured) or within each N:M group
along the input, like Wanda. The paper's channel permutation for N:M is not implemented.

||X_j||_2 is computed as sqrt(H_jj) (H = X X^T / T): the constant factor sqrt(T) scales every
score alike and does not change the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sdsx.pruners.base import PruneResult, apply_mask, reconstruction_error
from sdsx.pruners.magnitude import select_mask
from sdsx.pruners.registry import LayerContext, Pruner, register
from sdsx.pruners.spec import SparsitySpec

__all__ = ["RIAOptions", "ria", "ria_scores"]


@dataclass(frozen=True)
class RIAOptions:
    """alpha: the exponent of the input norm ||X_j||_2 in the score (0.5 in the paper)."""

    alpha: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"RIA's alpha must be a finite number >= 0, got {self.alpha!r}")


def ria_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """The RIA score of every weight (fp32, weight's shape); see the module docstring."""
    A = weight.float().abs()
    tiny = torch.finfo(torch.float32).tiny  # an all-zero row or column: its weights score 0
    relative = A / A.sum(dim=1, keepdim=True).clamp_min(tiny) + A / A.sum(dim=0, keepdim=True).clamp_min(tiny)
    norms = input_sq_norms.to(weight.device, torch.float32).clamp_min(0).pow(alpha / 2)
    return relative * norms.unsqueeze(0)


def ria(
    weight: torch.Tensor,
    input_sq_norms: torch.Tensor,
    spec: SparsitySpec | str | float,
    alpha: float = 0.5,
    hessian: torch.Tensor | None = None,
) -> PruneResult:
    """Prune by the RIA score.

    Args:
        weight: (out, in).
        input_sq_norms: (in,) mean of x_j^2 over calibration tokens (diag of H = X X^T / T).
        spec: sparsity pattern.
        alpha: the exponent of ||X_j||_2.
        hessian: optional full H, only to report the layer error.
    """
    spec = SparsitySpec.parse(spec)
    if input_sq_norms.shape != (weight.shape[1],):
        raise ValueError(f"input_sq_norms must have shape ({weight.shape[1]},), got {tuple(input_sq_norms.shape)}")
    mask = select_mask(ria_scores(weight, input_sq_norms, alpha), spec, per_row=True)
    new = apply_mask(weight, mask)
    return PruneResult(new, mask, reconstruction_error(weight, new, hessian))


def _solve(weight: torch.Tensor, stats: torch.Tensor | None, spec: SparsitySpec, options: RIAOptions,
           context: LayerContext) -> PruneResult:
    if stats is None:
        raise ValueError(f"{context.name}: RIA needs the inputs' squared column norms (statistics 'diag' or 'full')")
    if stats.dim() == 1:
        return ria(weight, stats, spec, options.alpha)
    return ria(weight, stats.diagonal(), spec, options.alpha, hessian=stats if context.need_loss else None)


register(Pruner("ria", _solve, stats="diag", options=RIAOptions,
                summary="relative importance and activations: (|W|/row sum + |W|/column sum) * ||X_j||^alpha (Zhang et al. 2024)"))
