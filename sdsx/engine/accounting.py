"""Memory accounting: the bytes the engine itself holds (tensors it owns or keeps alive), with the
running peak, which is what grows or not with depth."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["Memory", "module_bytes", "nbytes"]


class Memory:
    """Bytes the driver itself holds (tensors it owns or keeps alive), with the running peak."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def add(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def sub(self, nbytes: int) -> None:
        self.current -= nbytes


def nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(nbytes(o) for o in obj.values())
    return 0


def module_bytes(module: nn.Module) -> int:
    return sum(nbytes(t) for t in module.parameters()) + sum(nbytes(t) for t in module.buffers())
