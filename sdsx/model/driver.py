"""Block-sequential driver: owns data movement and hooks; the per-layer math is injected.

For each decoder block in turn: move it to the compute device, run every calibration batch
through it while forward hooks accumulate the Gram statistics of its linear layers' inputs, call
``layer_fn(name, weight, H)`` for every linear and write the result back, then re-run the changed
block to produce the next block's inputs and move it back. Only one block and one activation
buffer (nsamples x seqlen x hidden, optionally kept on CPU) are live at any time, so peak memory
does not grow with depth.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from sdsx.engine.accounting import Memory, module_bytes, nbytes
from sdsx.engine.capture import CaptureTarget, as_batches, capture_inputs
from sdsx.engine.fit import balanced_weights, dense_targets, fit_kept_weights
from sdsx.engine.guard import guard_block
from sdsx.engine.passes import Accumulators, PassOptions, PassState
from sdsx.engine.records import BlockState, DriverResult, LayerRecord  # re-exported (sdsx.model.driver.DriverResult ...)
from sdsx.engine.resume import BlockResume
from sdsx.engine.runner import BlockRunner, BlockView
from sdsx.engine.solve import LayerFn, solve_block
from sdsx.engine.statistics import StatsSettings, block_statistics
from sdsx.engine.streams import BlockChoice, ValidationStream, hidden_deviation
from sdsx.model.blocks import find_blocks, find_linears, in_features, layer_kinds
from sdsx.numerics import all_finite
from sdsx.pruners.blockfit import DEVIATIONS, BlockFitRecord, visited
from sdsx.stats import GramAccumulator

if TYPE_CHECKING:
    pass

log = logging.getLogger("sdsx")

__all__ = [
    "BlockChoice", "BlockDriver", "BlockState", "DriverOptions", "DriverResult", "LayerRecord", "LayerFn", "PassOptions", "STAT_KINDS",
    "as_batches", "hidden_deviation",
]

STAT_KINDS = ("full", "diag", "none")


@dataclass(frozen=True)
class DriverOptions:
    """How a :class:`BlockDriver` runs; each field is described there."""

    device: torch.device | str | None = None
    offload: bool = True
    stats: str = "full"
    batch_size: int = 1
    progress: bool = True
    desc: str = "sdsx"
    accumulator: Callable[[int, torch.device, bool], Any] | None = None
    share_inputs: bool = True
    dense_stream: bool = False
    deviation: str = "balanced"


def with_overrides(cls: type, given: Any, overrides: dict[str, Any], what: str = "options") -> Any:
    """``given`` (an instance of the options dataclass ``cls``, or None for its defaults) with the
    fields in ``overrides`` replaced; an unknown field is refused, naming the known ones, and a
    ``given`` of another type too (``what`` names the argument in that message)."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {unknown[0]!r}; its fields: {', '.join(known)}")
    if given is not None and not isinstance(given, cls):
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        raise TypeError(f"{what} must be {article} {cls.__name__}, got {type(given).__name__}")
    return dataclasses.replace(given or cls(), **overrides)


class BlockDriver:
    """Runs a layer function over every linear of every decoder block, block by block.

    ``BlockDriver(model, DriverOptions(...))``, or its fields by keyword
    (``BlockDriver(model, progress=False)``; keywords replace the fields of ``options``):

    Args:
        model: a causal LM (see :func:`sdsx.model.blocks.find_blocks` for the families known).
        device: where blocks run; default CUDA when available, else the model's device. The model
            itself may stay on CPU: blocks are moved one at a time.
        offload: keep the activation buffer on CPU between blocks (else on ``device``).
        stats: "full" (H = X X^T / T), "diag" (its diagonal, what Wanda needs) or "none" (no
            calibration forward passes at all: the layer function gets H=None).
        accumulator: factory ``(columns, device, diag_only) -> object`` with ``update(x)`` and
            ``finalize()``; default :class:`sdsx.stats.GramAccumulator`. Benchmarks plug the
            published SparseGPT/Wanda accumulation here.
        share_inputs: linears that read the same input tensor share one accumulator (one X X^T
            GEMM per distinct input); False gives every linear its own, as the published code does.
        dense_stream: also carry the dense model's activations block to block (one more forward
            per block, before it is pruned) and give the layer function a fourth argument, the
            cross Gram C = X^T X_d / T of the layer's inputs in the pruned (X) and dense (X_d)
            model. Needs stats="full"; not checkpointable.
        batch_size: calibration sequences per block forward call.
        progress: show a tqdm bar per block.
        desc: the progress bar's label.
        deviation: how a block's distance from the dense model is measured on the validation windows
            and in the block fit's loss (:data:`DEVIATIONS`); "balanced" (default) weighs each hidden
            channel by the inverse of its dense RMS.
    """

    def __init__(self, model: nn.Module, options: DriverOptions | None = None, **overrides: Any) -> None:
        o = self.options = with_overrides(DriverOptions, options, overrides)
        device, offload, stats, batch_size, progress, desc = o.device, o.offload, o.stats, o.batch_size, o.progress, o.desc
        accumulator, share_inputs, dense_stream, deviation = o.accumulator, o.share_inputs, o.dense_stream, o.deviation
        if stats not in STAT_KINDS:
            raise ValueError(f"stats must be one of {STAT_KINDS}, got {stats!r}")
        if deviation not in DEVIATIONS:
            raise ValueError(f"deviation must be one of {DEVIATIONS}, got {deviation!r}")
        self.deviation = deviation
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.blocks, self.path = find_blocks(model)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else next(model.parameters()).device
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.store_device = torch.device("cpu") if offload else self.device
        self.stats = stats
        self.batch_size = batch_size
        self.progress = progress
        self.desc = desc
        self._resume = BlockResume(self.blocks, self.path, desc, progress)
        # sliding-window and full-attention blocks get their own mask (and rotary table) from the
        # model: capture() records the arguments of each kind, _call() hands a block its kind's
        self.kinds = {id(b): kind for b, kind in zip(self.blocks, layer_kinds(model, self.blocks))}
        self.runner = BlockRunner(self.device, self.kinds)
        self.accumulator = accumulator or (lambda columns, device, diag: GramAccumulator(columns, device=device, diag_only=diag))
        self.share_inputs = share_inputs
        self.settings = StatsSettings(self.runner, stats, self.accumulator, share_inputs, self.store_device)
        if dense_stream and stats != "full":
            raise ValueError("dense_stream needs stats='full'")
        self.dense_stream = dense_stream

    # ------------------------------------------------------------------ timing helpers
    def _now(self) -> float:
        return self.runner.now()

    # ------------------------------------------------------------------ capture
    def capture(self, batches: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], dict[tuple, tuple]]:
        """Block 0's inputs and the arguments the model passes its blocks, for every batch
        (:func:`sdsx.engine.capture.capture_inputs`)."""
        return capture_inputs(CaptureTarget(self.model, self.blocks, self.path, self.kinds), batches, self.device, self.store_device)

    # ------------------------------------------------------------------ one block
    def _arguments(self, block: nn.Module, x: torch.Tensor, arguments: dict[tuple, tuple]) -> tuple:
        return self.runner.arguments(block, x, arguments)

    def _call(self, block: nn.Module, x: torch.Tensor, arguments: dict[tuple, tuple]) -> torch.Tensor:
        return self.runner.call(block, x, arguments)

    def _propagate(self, block: nn.Module, buffer: list[torch.Tensor], arguments: dict, result: DriverResult, index: int = -1) -> None:
        """Replace every batch in ``buffer`` with the block's output on it (each batch depends
        only on itself, so the buffer is overwritten in place: no second buffer)."""
        for number, x in enumerate(buffer):
            t0 = self._now()
            out = self._call(block, x.to(self.device), arguments)
            if not all_finite(out):
                raise FloatingPointError(
                    f"block {index} ({self.path}.{index}) produced NaN/Inf outputs on calibration batch {number}; "
                    "its weights or the model's dtype overflowed (try float32 or bfloat16 instead of float16)"
                )
            x.copy_(out)
            result.forward_s += self._now() - t0

    # ------------------------------------------------------------------ the run
    @torch.no_grad()
    def run(
        self,
        calib: torch.Tensor | Sequence[torch.Tensor] | None,
        layer_fn: LayerFn,
        options: PassOptions | None = None,
        **overrides: Any,
    ) -> DriverResult:
        """Apply ``layer_fn`` to every linear of every block, in place.

        ``options`` is a :class:`PassOptions`; its fields may also be given by keyword (they
        replace those of ``options``).

        Args:
            calib: (nsamples, seqlen) token ids, or a list of such tensors; may be None when
                ``stats="none"``.
            layer_fn: see :data:`LayerFn`.
            checkpoint: an open :class:`sdsx.checkpoint.Checkpoint`: blocks it lists as finished
                for ``pass_name`` are restored instead of recomputed, and every block finished
                now is saved to it.
            pass_name: the checkpoint's name for this pass over the blocks.
            state: the layer function's side state to save and restore with each block.
            after_block: called with each block's index once the block is finished (and saved, with a
                checkpoint); for blocks restored from a checkpoint, when they are restored.
            validation: held-out token windows: streamed through the same blocks (pruned and dense),
                their Grams passed to the layer function as ``split=(H_fit, H_val)`` and every block
                scored by :func:`hidden_deviation` against the dense hidden state.
            block_choice: candidate weight sets per block; the one closest to the dense hidden
                state on the validation windows is kept (needs ``validation``).
            block_fit: after the layer function, fit each block's kept weights to a target hidden
                state (:mod:`sdsx.pruners.blockfit`); with validation windows the best iterate on them
                is kept.
            validation_other: more validation windows, from another domain: they validate like
                ``validation`` (after it in every list), but their Gram does not join the H that
                phase 1 (the base pruner) prunes with, which stays that of the calibration windows.
        Returns:
            A :class:`DriverResult` with per-layer records, split timings and peak memory.
        """
        o = with_overrides(PassOptions, options, overrides)
        result = DriverResult(device=str(self.device))
        p = PassState(o, result, Memory(), self._now())
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.dense_stream and o.checkpoint is not None:
            raise ValueError("the dense-target variant (a second activation stream) cannot be checkpointed yet; drop checkpoint_dir")
        if o.validation is not None and self.stats != "full":
            raise ValueError(f"validation windows need stats='full', not {self.stats!r}")
        if o.block_choice is not None and o.validation is None:
            raise ValueError("block_choice needs validation windows")
        if o.block_fit is not None and self.stats != "full":
            raise ValueError(f"block_fit needs stats='full', not {self.stats!r}")
        if o.validation_other is not None and o.validation is None:
            raise ValueError("validation_other needs validation windows")
        training = self.model.training
        self.model.eval()  # dropout would make statistics and outputs random
        p.first = self._resume.restore_finished(o.checkpoint, o.pass_name, o.state, result) if o.checkpoint is not None else 0
        if o.after_block is not None:
            for index in range(p.first):
                o.after_block(index)
        p.prior_total = result.total_s
        try:
            if p.first < len(self.blocks):
                if self.stats != "none":
                    self._open_streams(calib, p)
                self._blocks(p, layer_fn)
            if o.checkpoint is not None:
                o.checkpoint.finish_pass(o.pass_name)
        finally:
            p.streams.clear()
            self.model.train(training)
        result.total_s = p.prior_total + self._now() - p.start
        result.peak_tracked_bytes = p.memory.peak
        if self.device.type == "cuda":
            result.cuda_peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        return result

    def _open_streams(self, calib: torch.Tensor | Sequence[torch.Tensor] | None, p: PassState) -> None:
        """Capture block 0's inputs of the calibration (and validation) windows into ``p.streams``
        and, for a resumed pass, bring them to the first unfinished block."""
        o, result, memory, streams = p.options, p.result, p.memory, p.streams
        if calib is None:
            raise ValueError(f"stats={self.stats!r} needs calibration token ids")
        batches = as_batches(calib, self.batch_size)
        result.nsamples = sum(b.shape[0] for b in batches)
        result.tokens = sum(b.numel() for b in batches)
        t0 = self._now()
        streams.buffer, p.arguments = self.capture(batches)
        buffer = streams.buffer
        if o.validation is not None:
            vbatches = as_batches(o.validation, self.batch_size)
            calib_batches = len(vbatches)
            if o.validation_other is not None:
                vbatches += as_batches(o.validation_other, self.batch_size)
            vbuffer, vargs = self.capture(vbatches)
            for key, value in vargs.items():
                p.arguments.setdefault(key, value)
            streams.val = ValidationStream(vbuffer, calib_batches)
            result.validation_samples = sum(b.shape[0] for b in vbatches)
            memory.add(nbytes(streams.val.tensors()))
        result.forward_s += self._now() - t0
        memory.add(nbytes(buffer) + nbytes(p.arguments))
        if self.dense_stream:
            streams.dense = [x.clone() for x in buffer]
            memory.add(nbytes(streams.dense))
        elif o.block_fit is not None and o.block_fit.target == "dense":
            # only the windows the fit visits need the dense model's hidden states
            streams.fit_dense = [buffer[i].clone() for i in visited(len(buffer), o.block_fit)]
            memory.add(nbytes(streams.fit_dense))
        self._warn_rank(result.tokens)
        if p.first:
            self._resume.resume_inputs(o.checkpoint, o.pass_name, p.first, streams,
                                       lambda i: self._recompute(i, buffer, p.arguments, result))

    def _warn_rank(self, tokens: int) -> None:
        widest = max((in_features(m) for b in self.blocks for m in find_linears(b).values()), default=0)
        if self.stats == "full" and tokens < widest:
            log.warning(
                "%s: %d calibration tokens for layers with up to %d inputs: their Hessians are rank-deficient "
                "(rank <= %d); damping keeps them invertible, but more calibration tokens will prune better",
                self.desc, tokens, widest, tokens,
            )

    def _recompute(self, index: int, buffer: list[torch.Tensor], arguments: dict, result: DriverResult) -> None:
        """Run the (restored) block ``index`` over ``buffer`` in place, on the compute device."""
        block = self.blocks[index]
        home = next(block.parameters()).device
        block.to(self.device)
        self._propagate(block, buffer, arguments, result, index)
        block.to(home)

    def _blocks(self, p: PassState, layer_fn: LayerFn) -> None:
        """The block loop: statistics, solve, guard and fit, propagation, save, for every block
        from ``p.first`` on."""
        from tqdm.auto import tqdm

        o, result, memory, arguments = p.options, p.result, p.memory, p.arguments
        buffer, dense, val, fit_dense = p.streams.buffer, p.streams.dense, p.streams.val, p.streams.fit_dense
        block_fit, first = o.block_fit, p.first
        count = len(self.blocks)
        bar = tqdm(total=count, initial=first, desc=self.desc, unit="block", disable=not self.progress, leave=False)
        try:
            for index in range(first, count):
                block = self.blocks[index]
                f0, s0, p0 = result.forward_s, result.stats_s, result.solver_s
                home = next(block.parameters()).device
                block.to(self.device)
                block_bytes = module_bytes(block)
                memory.add(block_bytes)
                linears = find_linears(block, prefix=f"{self.path}.{index}")
                try:
                    acc = Accumulators()
                    # the block fit's local targets are the statistics pass's own outputs (the fit runs with stats="full")
                    local = [] if (block_fit is not None and block_fit.target == "local") else None
                    if self.stats != "none":
                        acc.calib = block_statistics(self.settings, block, linears, buffer, p, acc.crosses if dense is not None else None, local)
                    if val is not None:
                        acc.val = block_statistics(self.settings, block, linears, val.pruned[: val.calib], p)
                        if val.calib < len(val.pruned):  # another domain's windows: validate, stay out of H
                            acc.other = block_statistics(self.settings, block, linears, val.pruned[val.calib :], p)
                        t0 = self._now()
                        for x in val.dense:  # the dense model's hidden state after this block
                            x.copy_(self._call(block, x.to(self.device), arguments))
                        result.forward_s += self._now() - t0
                    view = BlockView(index, block, linears, arguments, f"{self.path}.{index}.")
                    targets = local if local is not None else dense_targets(self.runner, view, buffer, result, block_fit, dense, fit_dense)
                    weight = balanced_weights(self.deviation, targets, val, self.device)
                    solve_block(self.runner, index, linears, layer_fn, p, acc)
                    for a in acc.all():
                        memory.sub(nbytes(vars(a)))
                    acc.clear()
                    fit = None
                    if block_fit is not None:
                        def fit(v: ValidationStream | None, start: float | None = None, view=view, targets=targets,
                                weight=weight) -> tuple[BlockFitRecord, list[torch.Tensor] | None]:
                            record, outs = fit_kept_weights(self.runner, view, buffer, targets, block_fit, v, start, weight)
                            self._record_fit(view.index, record, result)
                            return record, outs
                    if val is not None:
                        guard_block(self.runner, view, val, result, o.block_choice, fit, weight)
                    elif fit is not None:
                        fit(None)
                    if targets is not None and targets is not dense and targets is not fit_dense:
                        targets.clear()
                    if buffer and index + 1 < count:  # the last block's outputs are never used
                        self._propagate(block, buffer, arguments, result, index)
                except torch.OutOfMemoryError as exc:
                    raise torch.OutOfMemoryError(self._oom_message(index, buffer, block_bytes, linears, exc)) from exc
                block.to(home)
                memory.sub(block_bytes)
                if o.checkpoint is not None:
                    self._resume.save_block(o.checkpoint, o.pass_name, index, p.streams, o.state, result,
                                            p.prior_total + self._now() - p.start)
                if o.after_block is not None:
                    o.after_block(index)
                bar.update(1)
                bar.set_postfix(fwd=f"{result.forward_s:.1f}s", stats=f"{result.stats_s:.1f}s", solve=f"{result.solver_s:.1f}s")
                log.info(
                    "%s: block %d/%d, %d linears: forward %.2fs, statistics %.2fs, solver %.2fs",
                    self.desc,
                    index + 1,
                    count,
                    len(linears),
                    result.forward_s - f0,
                    result.stats_s - s0,
                    result.solver_s - p0,
                )
        finally:
            bar.close()

    def _record_fit(self, index: int, record: BlockFitRecord, result: DriverResult) -> None:
        result.solver_s += record.seconds
        result.fits.append(record.to_dict())
        log.info("%s: block %d fit: %d steps, kept step %d, loss %.4g -> %.4g, validation %s -> %s", self.desc, index,
                 record.steps, record.best_step, record.loss_first, record.loss_last, record.val_before, record.val_after)

    def _oom_message(self, index: int, buffer: list[torch.Tensor], block_bytes: int, linears: dict[str, nn.Module], exc: BaseException) -> str:
        mib = 2**20
        act = nbytes(buffer)
        widest = max((in_features(m) for m in linears.values()), default=0)
        hints = []
        if buffer and buffer[0].device.type == self.device.type and self.device.type != "cpu":
            hints.append("offload=True (--offload) keeps the calibration activations on CPU between blocks")
        if buffer:
            hints.append(f"a smaller batch_size (now {self.batch_size}) or fewer/shorter calibration samples shrink the per-call activations")
        hints.append("device='cpu' runs the blocks on the CPU")
        return (
            f"out of memory on {self.device} in block {index} ({self.path}.{index}): the block takes {block_bytes / mib:.1f} MiB, "
            f"the activations {act / mib:.1f} MiB on {buffer[0].device if buffer else self.store_device} "
            f"({len(buffer)} batches of {tuple(buffer[0].shape) if buffer else ()}), the widest Gram matrix "
            f"{widest * widest * 4 / mib:.1f} MiB; try: " + "; ".join(hints) + f" ({exc})"
        )
