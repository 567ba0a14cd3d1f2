"""SparsitySpec: a sparsity pattern parsed once from "2:4", "50%", 0.5 or "unstructured:0.5"."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SparsitySpec:
    """Either unstructured (``sparsity`` in [0, 1)) or N:M (keep ``n`` of every ``m``)."""

    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @classmethod
    def parse(cls, value: "str | float | SparsitySpec") -> "SparsitySpec":
        """Parse ``0.5``, ``"0.5"``, ``"50%"``, ``"2:4"`` or ``"4:8"`` (n kept of every m)."""
        if isinstance(value, SparsitySpec):
            return value
        if isinstance(value, bool):
            raise ValueError(f"invalid sparsity {value!r}: give a fraction like 0.5 or a pattern like '2:4'")
        if isinstance(value, (int, float)):
            return cls._fraction(float(value), value)
        if not isinstance(value, str):
            raise TypeError(f"sparsity must be a float or a string like '2:4', got {type(value).__name__}")
        text = value.strip().lower()
        match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if m < 1 or n < 1 or n >= m:
                raise ValueError(
                    f"invalid N:M pattern {value!r}: need 1 <= N < M (N kept of every M), e.g. '2:4' or '4:8'"
                )
            return cls(sparsity=1.0 - n / m, n=n, m=m)
        try:
            if text.endswith("%"):
                return cls._fraction(float(text[:-1]) / 100.0, value)
            return cls._fraction(float(text), value)
        except ValueError as exc:
            if "sparsity" in str(exc):
                raise
            raise ValueError(
                f"invalid sparsity {value!r}: give a fraction in [0, 1) like 0.5, a percentage like '50%', "
                "or an N:M pattern like '2:4'"
            ) from None

    @classmethod
    def _fraction(cls, f: float, original: object) -> "SparsitySpec":
        if not (0.0 <= f < 1.0):
            raise ValueError(f"invalid sparsity {original!r}: the pruned fraction must be in [0, 1), e.g. 0.5")
        return cls(sparsity=f)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"


def detect_pattern(weight: torch.Tensor, threshold: float = 0.25) -> str | None:
    """The sparsity pattern a weight already has: "n:m" when every group of m along the inputs holds
    at least m - n zeros (for the common patterns), "unstructured" when at least ``threshold`` of it
    is exactly zero, else None (dense)."""
    zeros = weight == 0
    frac = float(zeros.float().mean())
    if frac < threshold:
        return None
    for n, m in ((1, 4), (2, 4), (4, 8), (2, 8)):
        if weight.shape[1] % m == 0 and bool((zeros.reshape(weight.shape[0], -1, m).sum(-1) >= m - n).all()):
            return f"{n}:{m}"
    return "unstructured"
