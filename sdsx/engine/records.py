"""What the block engine records and returns (per-layer records, timings, memory) and the
protocol of the side state a layer function keeps across a resume."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

__all__ = ["TIMINGS", "BlockState", "DriverResult", "LayerRecord"]

TIMINGS = ("forward_s", "stats_s", "solver_s", "total_s")


class BlockState(Protocol):
    """What a layer function keeps besides the weights (e.g. SDS's per-phase errors), so that a
    resumed run restores it: ``save`` is called after each block with the names of its linears and
    returns (JSON-able dict, tensors); ``restore`` gets them back, with the block's restored
    (out, in) weights, for every finished block in order."""

    def save(self, index: int, names: list[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]: ...

    def restore(self, index: int, data: dict[str, Any], tensors: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None: ...


@dataclass
class LayerRecord:
    """What happened to one linear layer."""

    name: str
    shape: tuple[int, int]  # (out, in)
    pruned: int  # entries the mask removed
    numel: int
    loss: float  # the layer function's reported error (NaN when it had none)
    seconds: float  # wall time of the layer function plus the write-back
    block: int

    @property
    def sparsity(self) -> float:
        return self.pruned / self.numel if self.numel else 0.0


@dataclass
class DriverResult:
    """Per-layer records and where the time and memory went."""

    layers: list[LayerRecord] = field(default_factory=list)
    forward_s: float = 0.0  # block forward passes (capture, statistics pass without hooks, re-run)
    stats_s: float = 0.0  # statistics accumulation inside the hooks plus finalisation
    solver_s: float = 0.0  # layer functions and weight write-back
    total_s: float = 0.0  # wall time of the whole run
    peak_tracked_bytes: int = 0  # activations + kwargs + one block + statistics + one layer's result
    cuda_peak_bytes: int | None = None  # torch.cuda.max_memory_allocated on CUDA runs
    device: str = "cpu"
    nsamples: int = 0
    tokens: int = 0
    validation_samples: int = 0  # calibration sequences held out from fitting (0: no validation)
    blocks: list[dict[str, Any]] = field(default_factory=list)  # per block: validation deviations, choice
    fits: list[dict[str, Any]] = field(default_factory=list)  # per block: the block fit's BlockFitRecord

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = [dict(asdict(r), sparsity=r.sparsity) for r in self.layers]
        return out
