"""The block guard: after a block is solved, run the validation windows through each candidate
weight set (e.g. SDS's against phase 1's), keep the one whose output is closest to the dense
model's hidden state, then let the block fit improve the kept weights; the validation stream
advances with the kept block."""

from __future__ import annotations

from typing import Any, Callable

import torch

from sdsx.engine.records import DriverResult
from sdsx.engine.runner import BlockRunner, BlockView
from sdsx.engine.streams import BlockChoice, ValidationStream, hidden_deviation
from sdsx.model.blocks import set_weight
from sdsx.pruners.blockfit import BlockFitRecord

__all__ = ["FitFn", "guard_block"]

#: ``fit(val, start_deviation) -> (record, outputs of the kept iterate on val, or None)``
FitFn = Callable[[ValidationStream, float], "tuple[BlockFitRecord, list[torch.Tensor] | None]"]


def guard_block(
    runner: BlockRunner, view: BlockView, val: ValidationStream, result: DriverResult, block_choice: BlockChoice | None,
    fit: FitFn | None = None, weight: torch.Tensor | None = None,
) -> None:
    """Run the validation windows through the finished block; with ``block_choice``, through each
    candidate weight set, keeping the one closest to the dense hidden state; then ``fit`` the
    chosen weights (keeping its best iterate on the validation windows). Advances ``val.pruned``
    and records the deviations in ``result.blocks``; ``weight`` balances the channels."""
    t0 = runner.now()
    candidates = block_choice(view.index) if block_choice is not None else []
    if not candidates:
        candidates = [("final", {})]
    scored: list[tuple[float, str, dict[str, torch.Tensor], list[torch.Tensor]]] = []
    for label, weights in candidates:
        for name, W in weights.items():
            set_weight(view.linears[name], W)
        outs = [runner.call(view.block, x.to(runner.device), view.arguments) for x in val.pruned]
        scored.append((hidden_deviation(outs, val.dense, weight), label, weights, outs))
    best = min(scored, key=lambda s: s[0])  # ties keep the earlier candidate
    for name, W in best[2].items():
        set_weight(view.linears[name], W)
    entry: dict[str, Any] = {"block": view.index, "deviation": {label: dev for dev, label, _, _ in scored}, "chosen": best[1]}
    outs = best[3]
    result.forward_s += runner.now() - t0
    if fit is not None:
        record, fitted = fit(val, best[0])
        entry["deviation"]["fit"] = record.val_after
        if fitted is not None:  # the validation outputs of the kept iterate
            outs = fitted
    for x, out in zip(val.pruned, outs):
        x.copy_(out)
    result.blocks.append(entry)
