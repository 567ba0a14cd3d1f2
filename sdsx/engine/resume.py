"""Resume: what a checkpointed block loop saves after every block (weights, records, side state,
the next block's inputs and the dense streams) and how a re-run restores the finished blocks and
the inputs of the first unfinished one."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from sdsx.engine.records import TIMINGS, BlockState, DriverResult, LayerRecord
from sdsx.engine.streams import Streams
from sdsx.model.blocks import find_linears, get_weight

if TYPE_CHECKING:
    from sdsx.checkpoint import Checkpoint

log = logging.getLogger("sdsx")

__all__ = ["BlockResume"]


class BlockResume:
    """Checkpoint save and restore for the block loop over ``blocks`` (the model's decoder blocks at
    the dotted ``path``); ``desc`` and ``progress`` for messages and the progress bar."""

    def __init__(self, blocks: nn.ModuleList, path: str, desc: str, progress: bool) -> None:
        self.blocks, self.path, self.desc, self.progress = blocks, path, desc, progress

    def restore_finished(self, checkpoint: Checkpoint, pass_name: str, state: BlockState | None, result: DriverResult) -> int:
        """Load the weights (and records, and side state) of the blocks the checkpoint lists as
        finished for this pass; returns how many."""
        done = checkpoint.finished(pass_name)
        if done > len(self.blocks):
            raise ValueError(f"the checkpoint lists {done} finished blocks but the model has {len(self.blocks)}")
        for index in range(done):
            block = self.blocks[index]
            tensors, record = checkpoint.load_block(pass_name, index)
            block.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("w.")}, strict=True)
            result.layers.extend(LayerRecord(**dict(r, shape=tuple(r["shape"]))) for r in record.get("layers", []))
            if record.get("validation"):
                result.blocks.append(record["validation"])
            if record.get("fit"):
                result.fits.append(record["fit"])
            if state is not None:
                linears = find_linears(block, prefix=f"{self.path}.{index}")
                weights = {n: get_weight(m) for n, m in linears.items()}
                state.restore(index, record.get("state", {}), {k[2:]: v for k, v in tensors.items() if k.startswith("s.")}, weights)
        for key, value in checkpoint.timings(pass_name).items():
            if key in TIMINGS:
                setattr(result, key, float(value))
        if done:
            log.info("%s: %d of %d blocks restored from the checkpoint", self.desc, done, len(self.blocks))
        return done

    def resume_inputs(
        self, checkpoint: Checkpoint, pass_name: str, first: int, streams: Streams, recompute: Callable[[int], None],
    ) -> None:
        """Make ``streams.buffer`` the inputs of block ``first``: the stored activations when the checkpoint
        has them, else block 0's inputs re-run through the restored blocks 0 .. first-1. The dense
        streams (always stored with a checkpoint: they cannot be recomputed once their blocks are
        pruned) come last in the stored list: the validation streams, then the block fit's.
        ``recompute(index)`` runs the restored block ``index`` over the buffer in place."""
        buffer, val, fit_dense = streams.buffer, streams.val, streams.fit_dense
        stored = checkpoint.load_activations(pass_name) or []
        if fit_dense is not None:
            tail = stored[-len(fit_dense):] if len(stored) >= len(fit_dense) else []
            if not tail or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(tail, fit_dense)):
                raise ValueError(
                    "the checkpoint has no dense hidden states for the block fit (it was made without block_fit, "
                    "or by an older sdsx); start the run afresh in a new folder"
                )
            for x, saved in zip(fit_dense, tail):
                x.copy_(saved)
            stored = stored[: -len(fit_dense)]
        if val is not None:
            want = val.tensors()
            tail = stored[-len(want):] if len(stored) >= len(want) else []
            if not tail or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(tail, want)):
                raise ValueError(
                    "the checkpoint has no validation hidden states for this run (it was made without validation windows, "
                    "or by an older sdsx); start the run afresh in a new folder"
                )
            val.load(stored)
            stored = stored[: -len(want)]
        if len(stored) == len(buffer) and stored and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(stored, buffer)):
            for x, saved in zip(buffer, stored):
                x.copy_(saved)
            return
        from tqdm.auto import tqdm

        for index in tqdm(range(first), desc=f"{self.desc} (recomputing inputs)", unit="block", disable=not self.progress, leave=False):
            recompute(index)

    def save_block(
        self, checkpoint: Checkpoint, pass_name: str, index: int, streams: Streams, state: BlockState | None,
        result: DriverResult, total_s: float,
    ) -> None:
        """Save finished block ``index`` for this pass: its weights and records, the side
        ``state`` of its linears, the timings so far (``total_s``), and unless it is the last
        block the streams' next inputs (the calibration buffer only when the checkpoint wants it)."""
        block = self.blocks[index]
        names = list(find_linears(block, prefix=f"{self.path}.{index}"))
        buffer, val, fit_dense = streams.buffer, streams.val, streams.fit_dense
        tensors = {f"w.{k}": v for k, v in block.state_dict().items()}
        data: dict[str, Any] = {}
        if state is not None:
            data, extra = state.save(index, names)
            tensors.update({f"s.{k}": v for k, v in extra.items()})
        layers = [dict(asdict(r), shape=list(r.shape)) for r in result.layers if r.block == index]
        timings = {k: getattr(result, k) for k in TIMINGS[:3]}
        timings["total_s"] = total_s
        last = index + 1 == len(self.blocks)
        acts = list(buffer) if buffer and not last and checkpoint.wants_activations(buffer) else []
        if val is not None and not last:
            acts += val.tensors()
        if fit_dense is not None and not last:
            acts += fit_dense
        record: dict[str, Any] = {"layers": layers, "state": data}
        blocks = [b for b in result.blocks if b.get("block") == index]
        if blocks:
            record["validation"] = blocks[-1]
        fits = [f for f in result.fits if f.get("block") == index]
        if fits:
            record["fit"] = fits[-1]
        checkpoint.save_block(pass_name, index, tensors, record, timings, acts or None)
