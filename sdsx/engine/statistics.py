"""The statistics pass of one block: the calibration batches run through it while forward hooks
feed one Gram accumulator per distinct linear input (q/k/v and gate/up share one), optionally the
cross Gram with the dense stream, and the block's outputs for the block fit's local targets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from sdsx.engine.accounting import nbytes
from sdsx.engine.passes import PassState
from sdsx.engine.runner import BlockRunner
from sdsx.model.blocks import in_features
from sdsx.stats import CrossGram

__all__ = ["StatsSettings", "block_statistics"]


@dataclass(frozen=True)
class StatsSettings:
    """How statistics are gathered: ``runner`` runs the block (and keeps the clock); ``kind`` is
    "full" (X X^T) or "diag" (its diagonal); ``accumulator(columns, device, diag_only)`` makes an
    accumulator; ``share_inputs``: linears that read one input tensor share it; block outputs kept
    for the block fit go to ``store_device``."""

    runner: BlockRunner
    kind: str
    accumulator: Callable[[int, torch.device, bool], Any]
    share_inputs: bool
    store_device: torch.device


def block_statistics(
settings: StatsSettings,
block: nn.Module,
    linears: dict[str, nn.Module],
    buffer: list[torch.Tensor],
    p: PassState,
    crosses: dict[int, Any] | None = None,
    outputs: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """One pass of the calibration batches through ``block`` with hooks on its linears.

    Linears that read the same input tensor share one accumulator, so the X X^T GEMM is done
    once per distinct input (q/k/v, gate/up). With ``crosses`` (keyed by the accumulator's id),
    each batch first runs through the (still dense) block on the pass's dense stream, which
    records every linear's dense input and advances the stream, and ``crosses`` gets the cross
    Gram of each distinct input. ``outputs``, when given, receives the (dense) block's
    output on every batch: the block fit's local targets, at no extra forward pass.
    """
    now = settings.runner.now
    arguments, result, memory = p.arguments, p.result, p.memory
    dense = p.streams.dense if crosses is not None else None
    dense_inputs: dict[str, torch.Tensor] = {}
    acc_of: dict[str, Any] = {}
    seen: dict[tuple, tuple[torch.Tensor, Any]] = {}
    updated: set[int] = set()
    hook_time = [0.0]
    diag = settings.kind == "diag"

    def make_hook(name: str, module: nn.Module) -> Callable:
        columns = in_features(module)

        def hook(mod: nn.Module, inputs: tuple, output: Any) -> None:
            if dense_pass[0]:
                return
            t0 = now()
            x = inputs[0]
            # The tensor itself is kept in `seen` until the call ends, so its address cannot
            # be reused by another tensor of the same shape within the call.
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x._version)
            if not settings.share_inputs:
                key = key + (name,)
            hit = seen.get(key)
            if hit is not None:
                shared = hit[1]
                mine = acc_of.setdefault(name, shared)
                if mine is not shared:
                    raise RuntimeError(
                        f"{name}: the linear layers of this block share inputs differently from "
                        "one calibration batch to the next; sdsx cannot group their statistics"
                    )
            else:
                acc = acc_of.get(name)
                if acc is None:
                    acc = settings.accumulator(columns, settings.runner.device, diag)
                    acc_of[name] = acc
                    memory.add(nbytes(vars(acc)))
                elif id(acc) in updated:
                    raise RuntimeError(
                        f"{name}: the linear layers of this block share inputs differently from "
                        "one calibration batch to the next; sdsx cannot group their statistics"
                    )
                acc.update(x)
                if dense is not None:
                    cross = crosses.get(id(acc))
                    if cross is None:
                        cross = crosses[id(acc)] = CrossGram(columns, settings.runner.device)
                        memory.add(nbytes(cross.sum))
                    cross.update(x, dense_inputs[name])
                updated.add(id(acc))
                seen[key] = (x, acc)
            hook_time[0] += now() - t0

        return hook

    dense_pass = [False]  # True while a batch runs through the block on the dense stream

    def make_recorder(name: str) -> Callable:
        def record(mod: nn.Module, inputs: tuple, output: Any) -> None:
            if dense_pass[0]:
                dense_inputs[name] = inputs[0].detach().clone()

        return record

    handles = [m.register_forward_hook(make_hook(n, m)) for n, m in linears.items()]
    if dense is not None:
        handles += [m.register_forward_hook(make_recorder(n)) for n, m in linears.items()]
    try:
        for number, x in enumerate(buffer):
            if dense is not None:
                t0 = now()
                dense_pass[0] = True
                try:
                    dense[number].copy_(settings.runner.call(block, dense[number].to(settings.runner.device), arguments))
                finally:
                    dense_pass[0] = False
                result.forward_s += now() - t0
            t0 = now()
            hook_before = hook_time[0]
            out = settings.runner.call(block, x.to(settings.runner.device), arguments)
            if outputs is not None:
                outputs.append(out.to(settings.store_device))
            del out
            seen.clear()
            updated.clear()
            wall = now() - t0
            hooks = hook_time[0] - hook_before
            result.forward_s += wall - hooks
            result.stats_s += hooks
            dense_inputs.clear()
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    missing = [n for n in linears if n not in acc_of]
    if missing:
        raise RuntimeError(
            f"linear layers {missing} were never called during the block's forward pass, so they "
            "have no calibration statistics"
        )
    return acc_of
