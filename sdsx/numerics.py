"""Small numerical helpers shared by the ops wrappers, statistics, pruners and the driver."""

from __future__ import annotations

import math

import torch

__all__ = ["all_finite"]


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN or Inf.

    One ``aminmax`` reduction (NaN propagates into both results, +-Inf shows in one of them): on
    CPU it is 15-30x faster than ``torch.isfinite(t).all()``, which builds a bool tensor first
    (measured at 576 x 1536: 0.12 ms against 3.4 ms), and the driver checks every weight it writes.
    """
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return True
    if t.is_complex():
        return all_finite(torch.view_as_real(t))
    low, high = torch.aminmax(t.detach())
    return math.isfinite(float(low)) and math.isfinite(float(high))
