"""Running one decoder block on the compute device with the arguments the model passes it (captured
once per attention kind and input shape), eagerly or with substituted weights, and the clock the
engine's timings read (synchronised on CUDA)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["BlockRunner", "BlockView"]


@dataclass
class BlockRunner:
    """device: where blocks run; kinds: id(block) -> its attention kind (sdsx.model.blocks.layer_kinds)."""

    device: torch.device
    kinds: dict[int, Any]

    def now(self) -> float:
        """time.perf_counter() after the device has finished its queued work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def arguments(self, block: nn.Module, x: torch.Tensor, arguments: dict[tuple, tuple]) -> tuple:
        """The (positional, keyword) arguments the model passes ``block`` with input ``x``: those of
        the block's attention kind, else block 0's."""
        key = tuple(x.shape)
        return arguments.get((self.kinds.get(id(block)), key)) or arguments[key]

    def call(self, block: nn.Module, x: torch.Tensor, arguments: dict[tuple, tuple]) -> torch.Tensor:
        """The block's hidden-state output for input ``x`` (already on the device)."""
        args, kwargs = self.arguments(block, x, arguments)
        out = block(x, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def functional(self, block: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, arguments: dict[tuple, tuple]) -> torch.Tensor:
        """As :meth:`call`, with the block's parameters named in ``weights`` replaced (differentiable)."""
        x = x.to(self.device)
        args, kwargs = self.arguments(block, x, arguments)
        out = torch.func.functional_call(block, weights, (x, *args), kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockView:
    """The block being worked on: its index, the module, its linears by qualified name, the captured
    arguments, and the prefix of its linears' qualified names (``<path>.<index>.``)."""

    index: int
    block: nn.Module
    linears: dict[str, nn.Module]
    arguments: dict[tuple, tuple]
    prefix: str
