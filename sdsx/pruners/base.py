"""What every pruner returns, and the layer error every report uses."""

from __future__ import annotations

from typing import NamedTuple

import torch


class PruneResult(NamedTuple):
    """weight: pruned weight in the input's dtype (exact zeros where mask is False);
    mask: bool keep-mask; loss: tr((W - W_new) H (W - W_new)^T), the layer's output error per
    calibration token, or NaN when no Hessian was given."""

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight`` with the entries where ``mask`` is False set to +0.0, in weight's dtype.

    A multiply by the bool mask, then ``+ 0.0`` so that pruned negative weights are +0.0 and not
    -0.0 (the bytes a saved checkpoint holds). ``torch.where(mask, weight, 0)`` gives the same
    values but ran 4-5x slower on one CPU core (1.2 ms against 0.23 ms at 576 x 576): its bool
    path does not vectorize. The weight must be finite (a pruned Inf would become NaN); the
    pruners' scores are checked for that before a mask is made.
    """
    return (weight * mask).add_(0.0)


def reconstruction_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor | None) -> float:
    """Mean squared output error over calibration tokens: tr(D H D^T) with D = W - W_new, H = X X^T / T."""
    if H is None:
        return float("nan")
    D = (W.float() - W_new.float()).to(H.device)
    return float(((D @ H) * D).sum())
