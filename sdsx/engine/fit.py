"""The block fit's plumbing in the engine: its dense targets (computed while the block is still
dense), the channel weights of the balanced deviation, and the fit of a block's kept weights
(:func:`sdsx.pruners.blockfit.fit_block`) with its choice of iterate on the validation windows."""

from __future__ import annotations

from typing import Any

import torch

from sdsx.engine.records import DriverResult
from sdsx.engine.runner import BlockRunner, BlockView
from sdsx.engine.streams import ValidationStream, hidden_deviation
from sdsx.pruners.blockfit import BlockFitOptions, BlockFitRecord, channel_weights, fit_block, visited

__all__ = ["balanced_weights", "dense_targets", "fit_kept_weights"]


def balanced_weights(deviation: str, targets: list[torch.Tensor | None] | None, val: ValidationStream | None,
                     device: torch.device) -> torch.Tensor | None:
    """The block's channel weights for the "balanced" deviation, from the dense hidden states after
    it: the block fit's targets where there are any (more windows), else the validation windows';
    None for "plain" or with neither."""
    if deviation != "balanced":
        return None
    dense = [t for t in targets or [] if t is not None] or (val.dense if val is not None else [])
    return channel_weights(dense).to(device) if dense else None


def dense_targets(
    runner: BlockRunner, view: BlockView, buffer: list[torch.Tensor], result: DriverResult,
    options: BlockFitOptions | None, dense: list[torch.Tensor] | None, fit_dense: list[torch.Tensor] | None,
) -> list[torch.Tensor] | None:
    """The block fit's dense targets, computed while the block is still dense: the dense stream
    (of the windows the fit visits; None for the others) advanced through it. The local target
    is the statistics pass's own outputs and does not come here."""
    if options is None:
        return None
    assert options.target == "dense", options.target
    if dense is not None:
        return dense  # the dense-target variant's stream, already advanced by the statistics pass
    assert fit_dense is not None
    t0 = runner.now()
    for x in fit_dense:
        x.copy_(runner.call(view.block, x.to(runner.device), view.arguments))
    targets: list[torch.Tensor | None] = [None] * len(buffer)
    for i, x in zip(visited(len(buffer), options), fit_dense):
        targets[i] = x
    result.forward_s += runner.now() - t0
    return targets


def fit_kept_weights(
    runner: BlockRunner, view: BlockView, inputs: list[torch.Tensor], targets: list[torch.Tensor], options: BlockFitOptions,
    val: ValidationStream | None = None, start: float | None = None, weight: torch.Tensor | None = None,
) -> tuple[BlockFitRecord, list[torch.Tensor] | None]:
    """Fit the block's kept weights to ``targets`` (see :func:`sdsx.pruners.blockfit.fit_block`)
    and write the kept iterate back; with ``val``, scored on its windows (``start``: the starting
    weights' deviation there, when known). Returns the record (its ``seconds`` set) and, when the
    kept iterate is not the start, its outputs on the validation windows (None otherwise)."""
    t0 = runner.now()
    names = {name: name[len(view.prefix):] + ".weight" for name in view.linears}
    weights = {names[n]: m.weight.detach() for n, m in view.linears.items()}

    def forward(ws: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return runner.functional(view.block, ws, x, view.arguments)

    validate = None
    kept: dict[str, Any] = {"dev": start, "outs": None}  # the best validation outputs so far
    if val is not None:
        def validate(ws: dict[str, torch.Tensor]) -> float:
            outs = [forward(ws, x) for x in val.pruned]
            dev = hidden_deviation(outs, val.dense, weight)
            if kept["dev"] is None or dev < kept["dev"]:  # the same rule as fit_block's choice
                kept["dev"], kept["outs"] = dev, outs
            return dev

    frozen = [(p, p.requires_grad) for p in view.block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)  # gradients only for the fitted copies, never the block's own
    try:
        best, record = fit_block(forward, weights, inputs, targets, options, validate, block=view.index, start=start, weight=weight)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    for name, module in view.linears.items():
        module.weight.copy_(best[names[name]])
    record.seconds = runner.now() - t0
    return record, (kept["outs"] if record.best_step > 0 else None)
