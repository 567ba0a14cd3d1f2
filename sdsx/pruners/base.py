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


def reconstruction_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor | None) -> float:
    """Mean squared output error over calibration tokens: tr(D H D^T) with D = W - W_new, H = X X^T / T."""
    if H is None:
        return float("nan")
    D = (W.float() - W_new.float()).to(H.device)
    return float(((D @ H) * D).sum())
