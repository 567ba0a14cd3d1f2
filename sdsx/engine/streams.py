"""Activation streams beside the calibration one: the held-out validation windows in the model
pruned so far and in the dense model, and how far a stream is from the dense model
(:func:`hidden_deviation`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from sdsx.pruners.blockfit import relative_error

__all__ = ["BlockChoice", "Streams", "ValidationStream", "hidden_deviation"]


def hidden_deviation(out: list[torch.Tensor], target: list[torch.Tensor], weight: torch.Tensor | None = None) -> float:
    """Mean over tokens of ||w (h - h_d)||^2 / ||w h_d||^2: how far the hidden states ``out`` are
    from the dense model's ``target``. Per token, so that the few tokens with massive activations
    (the attention sink) do not drown the others; ``weight`` balances the channels
    (:func:`sdsx.pruners.blockfit.channel_weights`)."""
    total, count = 0.0, 0
    for h, d in zip(out, target):
        tokens = h[..., 0].numel()
        total += float(relative_error(h, d, weight)) * tokens
        count += tokens
    return total / max(count, 1)


#: ``block_choice(index) -> [(label, {linear name: weight}), ...]``: candidate weight sets for the
#: block just solved (the weights written back are the first candidate). The driver keeps the one
#: whose output on the validation windows is closest to the dense model's hidden state.
BlockChoice = Callable[[int], "list[tuple[str, dict[str, torch.Tensor]]]"]


class ValidationStream:
    """The held-out calibration windows: their hidden states in the model pruned so far
    (``pruned``) and in the dense model (``dense``), one (b, L, hidden) tensor per batch each."""

    def __init__(self, pruned: list[torch.Tensor], calib: int | None = None) -> None:
        self.pruned = pruned
        self.dense = [x.clone() for x in pruned]
        # the first ``calib`` batches are held-out calibration windows, whose Gram joins phase 1's H;
        # the others (another domain's) only validate
        self.calib = len(pruned) if calib is None else calib

    def tensors(self) -> list[torch.Tensor]:
        return self.pruned + self.dense

    def load(self, stored: list[torch.Tensor]) -> None:
        n = len(self.pruned)
        for x, saved in zip(self.pruned + self.dense, stored[-2 * n:]):
            x.copy_(saved)


@dataclass
class Streams:
    """The activation streams of one pass over the blocks, one (b, L, hidden) tensor per batch each.

    buffer: the calibration windows' hidden states in the model pruned so far (the next block's
        inputs, overwritten block by block).
    val: the validation windows' streams (pruned and dense), or None.
    dense: the calibration windows in the dense model (the dense-target variant), or None.
    fit_dense: the dense model's hidden states of the windows the block fit visits, or None.
    """

    buffer: list[torch.Tensor] = field(default_factory=list)
    val: ValidationStream | None = None
    dense: list[torch.Tensor] | None = None
    fit_dense: list[torch.Tensor] | None = None

    def clear(self) -> None:
        """Drop every stream's tensors (the pass is over)."""
        self.buffer.clear()
        if self.val is not None:
            self.val.pruned.clear()
            self.val.dense.clear()
        for stream in (self.dense, self.fit_dense):
            if stream is not None:
                stream.clear()
