"""One pass of the block loop: its options (:class:`PassOptions`, what the caller asks for), its live
state (:class:`PassState`: the result so far, the memory account, the activation streams, the
captured block arguments) and a block's statistics accumulators (:class:`Accumulators`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from sdsx.engine.accounting import Memory
from sdsx.engine.records import BlockState, DriverResult
from sdsx.engine.streams import BlockChoice, Streams
from sdsx.pruners.blockfit import BlockFitOptions

if TYPE_CHECKING:
    from sdsx.checkpoint import Checkpoint

__all__ = ["Accumulators", "PassOptions", "PassState"]


@dataclass(frozen=True, eq=False)
class PassOptions:
    """One pass of :meth:`BlockDriver.run` over the blocks; each field is described there."""

    checkpoint: "Checkpoint | None" = None
    pass_name: str = "prune"
    state: BlockState | None = None
    after_block: Callable[[int], None] | None = None
    validation: torch.Tensor | Sequence[torch.Tensor] | None = None
    block_choice: BlockChoice | None = None
    block_fit: BlockFitOptions | None = None
    validation_other: torch.Tensor | Sequence[torch.Tensor] | None = None


@dataclass
class PassState:
    """One pass's live state, shared by the steps of the block loop (``first``: the first block
    not restored from a checkpoint; ``prior_total``: the seconds a resumed run had already spent)."""

    options: PassOptions
    result: DriverResult
    memory: Memory
    start: float
    streams: Streams = field(default_factory=Streams)
    arguments: dict[tuple, tuple] = field(default_factory=dict)
    first: int = 0
    prior_total: float = 0.0


@dataclass
class Accumulators:
    """One block's statistics accumulators, keyed by linear name (the cross Grams by the
    accumulator's id): calibration, held-out calibration and other-domain validation windows."""

    calib: dict[str, Any] = field(default_factory=dict)
    crosses: dict[int, Any] = field(default_factory=dict)
    val: dict[str, Any] = field(default_factory=dict)
    other: dict[str, Any] = field(default_factory=dict)

    def all(self) -> list[Any]:
        """Every distinct accumulator (linears that share an input share one)."""
        return list({id(a): a for d in (self.calib, self.val, self.other) for a in d.values()}.values())

    def clear(self) -> None:
        """Forget the accumulators (the block is solved)."""
        self.calib.clear()
        self.val.clear()
        self.other.clear()
