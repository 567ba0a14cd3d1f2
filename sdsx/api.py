"""The public pruning API: ``sdsx.prune`` and the report it returns.

Everything the user passes is validated before the model is touched (bad input changes nothing);
then the block-sequential driver (:mod:`sdsx.model.driver`) runs a method's layer function, one of
the pure pruners in :mod:`sdsx.pruners`, over every linear of every decoder block.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

import torch
from torch import nn

from sdsx.checkpoint import Checkpoint
from sdsx.defaults import auto_validation
from sdsx.fingerprint import fingerprint_calibration, fingerprint_model
from sdsx.model.blocks import find_blocks, find_linears, in_features, max_positions, use_blocks, vocab_size
from sdsx.model.driver import BlockDriver, DriverOptions, DriverResult, LayerFn, PassOptions, as_batches, with_overrides
from sdsx.numerics import exact_fp32
from sdsx.pruners import PruneResult, SparsitySpec, registry
from sdsx.pruners.blockfit import BlockFitOptions, as_block_fit
from sdsx.pruners.sds import SHARED_PRUNER_FIELDS

log = logging.getLogger("sdsx")

__all__ = [
    "METHODS", "EngineOptions", "LayerReport", "Plan", "PruneReport", "layer_function", "open_checkpoint", "prune", "report_from", "run_driver",
    "split_validation", "validate",
]

METHODS = registry.names()  # every registered pruner (sdsx.pruners.registry)


@dataclass(frozen=True)
class EngineOptions:
    """Where and how a pruning run (:func:`prune`, :func:`sdsx.sds_prune`) executes; each field may
    also be given to them as a keyword.

    device: where blocks run (default CUDA when available, else the model's device).
    offload: keep the calibration activations on CPU between blocks.
    progress: show a progress bar per block.
    batch_size: calibration sequences per block forward call.
    checkpoint_dir: save the run's state there after every block, and resume from it: a re-run
        with the same model, calibration and options after an interruption continues at the first
        unfinished block and ends with the same weights (see :mod:`sdsx.checkpoint`). The folder
        is left in place; remove it when done.
    save_activations: whether the checkpoint stores the next block's inputs (default: when they
        take at most 2 GiB; otherwise a resume re-runs the finished blocks).
    blocks: where the decoder blocks are, for a model whose layout sdsx does not know: the dotted
        attribute path from the model to their ``nn.ModuleList`` (e.g. ``"backbone.layers"``; see
        :func:`sdsx.model.blocks.use_blocks`).
    histogram_layer: SDS only: the linear (qualified name) whose weights are histogrammed after each
        phase; default the first block's first linear.
    """

    device: torch.device | str | None = None
    offload: bool = True
    progress: bool = True
    batch_size: int = 1
    checkpoint_dir: str | os.PathLike | None = None
    save_activations: bool | None = None
    blocks: str | None = None
    histogram_layer: str | None = None


def split_keywords(keywords: dict[str, Any], *classes: type) -> list[dict[str, Any]]:
    """``keywords`` split by which of the dataclasses ``classes`` has each as a field (the first
    that has it); a keyword none has is refused, naming every known one."""
    parts: list[dict[str, Any]] = [{} for _ in classes]
    known = [[f.name for f in fields(c)] for c in classes]
    for key, value in keywords.items():
        where = next((i for i, names in enumerate(known) if key in names), None)
        if where is None:
            names = ", ".join(n for names in known for n in names)
            raise TypeError(f"unexpected keyword {key!r}; the keywords: {names}")
        parts[where][key] = value
    return parts


# ---------------------------------------------------------------------------------------- report
@dataclass
class LayerReport:
    """One pruned linear: its (out, in) shape, the fraction pruned, the reconstruction error
    tr(D H D^T) on the calibration inputs (NaN when not computed) and the solver's seconds."""

    name: str
    shape: tuple[int, int]
    sparsity: float
    error: float
    seconds: float


@dataclass
class PruneReport:
    """What :func:`prune` did: per-layer rows, totals, split timings and peak memory.

    Timings: ``forward_s`` the block forward passes (identical work for every method),
    ``stats_s`` the statistics (Gram accumulation and finalisation), ``solver_s`` the layer
    functions with write-back; ``total_s`` the whole run (including validation).
    ``peak_memory_bytes`` is ``torch.cuda.max_memory_allocated`` on CUDA; on CPU it is the peak
    of what the driver holds (activation buffer, block arguments, the block on the device, the
    statistics and one layer's result), which is what grows or not with depth.
    """

    method: str
    sparsity: str
    layers: list[LayerReport] = field(default_factory=list)
    nsamples: int = 0
    tokens: int = 0
    forward_s: float = 0.0
    stats_s: float = 0.0
    solver_s: float = 0.0
    total_s: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = "tracked"
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    validation_samples: int = 0
    blocks: list[dict[str, Any]] = field(default_factory=list)  # per block: validation deviations and choice
    fits: list[dict[str, Any]] = field(default_factory=list)  # per block: what the block fit did (BlockFitRecord)

    @property
    def deviation(self) -> list[float]:
        """The validation hidden-state deviation from the dense model after each block (the error over
        depth; :func:`sdsx.model.driver.hidden_deviation`), for the weights kept."""
        return [b["deviation"].get("fit", b["deviation"][b["chosen"]]) for b in sorted(self.blocks, key=lambda b: b["block"])]

    @property
    def numel(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.layers)

    @property
    def pruned(self) -> int:
        return sum(round(r.sparsity * r.shape[0] * r.shape[1]) for r in self.layers)

    @property
    def overall_sparsity(self) -> float:
        """Pruned fraction of all weights of the pruned linears."""
        return self.pruned / self.numel if self.numel else 0.0

    @property
    def total_error(self) -> float:
        """Sum of the layers' reconstruction errors (NaN when not computed)."""
        return float(sum(r.error for r in self.layers))

    @property
    def pruning_s(self) -> float:
        """Time outside the forward passes: statistics plus solver."""
        return self.stats_s + self.solver_s

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = [dict(asdict(r), shape=list(r.shape)) for r in self.layers]
        out.update(
            numel=self.numel,
            pruned=self.pruned,
            overall_sparsity=self.overall_sparsity,
            total_error=_json_float(self.total_error),
            pruning_s=self.pruning_s,
        )
        for row in out["layers"]:
            row["error"] = _json_float(row["error"])
        return out

    def to_markdown(self, per_layer: bool = True) -> str:
        """A summary line, the timing split and (optionally) one table row per layer."""
        total = self.total_error
        lines = [
            f"**{self.method} {self.sparsity}**: {len(self.layers)} layers, {self.pruned:,} of {self.numel:,} "
            f"weights pruned ({self.overall_sparsity:.2%}), total error "
            f"{'not computed (report_error=True computes it)' if math.isnan(total) else f'{total:.4g}'}, "
            f"calibration {self.nsamples} sequences / {self.tokens:,} tokens on {self.device}",
            "",
            "| forward s | statistics s | solver s | total s | peak memory MiB |",
            "|---:|---:|---:|---:|---:|",
            f"| {self.forward_s:.2f} | {self.stats_s:.2f} | {self.solver_s:.2f} | {self.total_s:.2f} | "
            f"{self.peak_memory_bytes / 2**20:.1f} ({self.peak_memory_kind}) |",
        ]
        if per_layer:
            lines += ["", "| layer | shape | sparsity | error | seconds |", "|---|---|---:|---:|---:|"]
            for r in self.layers:
                error = "-" if math.isnan(r.error) else f"{r.error:.4g}"
                lines.append(f"| {r.name} | {r.shape[0]}x{r.shape[1]} | {r.sparsity:.4f} | {error} | {r.seconds:.3f} |")
        return "\n".join(lines)


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) or math.isinf(x) else x


def report_from(result: DriverResult, method: str, spec: SparsitySpec, options: dict[str, Any] | None = None) -> PruneReport:
    """Turn the driver's records into a :class:`PruneReport`."""
    on_cuda = result.cuda_peak_bytes is not None
    return PruneReport(
        method=method,
        sparsity=str(spec),
        layers=[LayerReport(r.name, r.shape, r.sparsity, r.loss, r.seconds) for r in result.layers],
        nsamples=result.nsamples,
        tokens=result.tokens,
        forward_s=result.forward_s,
        stats_s=result.stats_s,
        solver_s=result.solver_s,
        total_s=result.total_s,
        peak_memory_bytes=int(result.cuda_peak_bytes if on_cuda else result.peak_tracked_bytes),
        peak_memory_kind="cuda" if on_cuda else "tracked",
        device=result.device,
        options=dict(options or {}),
        validation_samples=result.validation_samples,
        blocks=list(result.blocks),
        fits=list(result.fits),
    )


# ------------------------------------------------------------------------------------ validation
@dataclass
class Plan:
    """Validated inputs, ready for the driver."""

    spec: SparsitySpec
    batches: list[torch.Tensor] | None


def validate(
    model: nn.Module,
    calib: torch.Tensor | Sequence[torch.Tensor] | None,
    sparsity: SparsitySpec | str | float,
    *,
    need_calib: bool = True,
    batch_size: int = 1,
) -> Plan:
    """Check a pruning request without touching the model.

    Raises ValueError/TypeError for: an unparsable or out-of-range sparsity, a model without
    decoder blocks or linears, an N:M group size that does not divide a layer's inputs, missing or
    empty calibration, non-integer ids, ids outside the model's vocabulary (the tokenizer does not
    match the model) and sequences longer than the model accepts.
    """
    spec = SparsitySpec.parse(sparsity)
    blocks, path = find_blocks(model)
    count = 0
    for index, block in enumerate(blocks):
        for name, module in find_linears(block, prefix=f"{path}.{index}").items():
            count += 1
            cols = in_features(module)
            if spec.is_nm and cols % spec.m:
                raise ValueError(
                    f"{spec} sparsity needs every layer's input size to be a multiple of {spec.m}, but {name} has "
                    f"{cols} inputs; use unstructured sparsity for this model"
                )
    if count == 0:
        raise ValueError(f"the decoder blocks at {path} contain no nn.Linear or Conv1D layers to prune")
    if calib is None:
        if need_calib:
            raise ValueError(
                "calibration token ids are needed: pass a LongTensor (nsamples, seqlen) from sdsx.calibration "
                "(only magnitude with report_error=False runs without them)"
            )
        return Plan(spec, None)
    if isinstance(calib, (str, bytes)):
        raise TypeError("calib must be token ids (a LongTensor (nsamples, seqlen)); build them with sdsx.calibration(text, tokenizer)")
    batches = as_batches(calib, batch_size)
    if not batches or any(b.numel() == 0 for b in batches):
        raise ValueError("the calibration set is empty: pass at least one sequence of at least one token")
    vocab = vocab_size(model)
    limit = max_positions(model)
    for b in batches:
        if b.dtype.is_floating_point or b.dtype.is_complex or b.dtype == torch.bool:
            raise TypeError(f"calibration must hold integer token ids, got dtype {b.dtype}")
        low, high = int(b.min()), int(b.max())
        if low < 0 or (vocab is not None and high >= vocab):
            raise ValueError(
                f"calibration token ids range over [{low}, {high}] but the model's vocabulary has {vocab} entries: "
                "the tokenizer does not match the model"
            )
        if limit is not None and b.shape[1] > limit:
            raise ValueError(f"calibration sequences of {b.shape[1]} tokens exceed the model's {limit} positions")
    return Plan(spec, [b.long() for b in batches])


def held_count(validation: int | float | None, total: int) -> int:
    """How many of ``total`` calibration sequences ``validation`` holds out: a count (int >= 1), a
    fraction (float in (0, 1), at least one), or None / 0 for none. Raises when it is neither, or
    when no sequence would be left for fitting."""
    if validation is None or validation == 0:
        return 0
    if isinstance(validation, bool) or not isinstance(validation, (int, float)):
        raise TypeError(f"validation must be a count of calibration sequences or a fraction in (0, 1), got {validation!r}")
    if isinstance(validation, float):
        if not 0 < validation < 1:
            raise ValueError(f"a validation fraction must lie in (0, 1), got {validation}; or give a count of sequences")
        count = max(1, round(validation * total))
    else:
        count = validation
    if count < 0 or count >= total:
        raise ValueError(
            f"validation={validation!r} holds out {count} of the {total} calibration sequences; at least one must stay "
            "for fitting: give more calibration sequences or a smaller validation"
        )
    return count


def split_validation(plan: Plan, validation: int | float | None, batch_size: int = 1) -> tuple[Plan, torch.Tensor | None]:
    """Hold out calibration sequences for validation: ``validation`` is a count of sequences (int
    >= 1) or a fraction of them (float in (0, 1)); None or 0 holds out nothing. The last sequences
    are held out (the windows are sampled at random, so the last are as random as any). Returns the
    plan of the fitting sequences and the held-out ids (k, L), or None."""
    if validation is None or validation == 0 or plan.batches is None:
        return plan, None
    seqs = [row for b in plan.batches for row in b]
    total = len(seqs)
    count = held_count(validation, total)
    held = seqs[total - count:]
    if len({s.numel() for s in held}) > 1:
        raise ValueError("the held-out validation sequences must have one length; give calibration windows of one seqlen")
    fit = seqs[: total - count]
    fit_batches: list[torch.Tensor] = []
    for i in range(0, len(fit), batch_size):
        group = fit[i : i + batch_size]
        if len({s.numel() for s in group}) == 1:
            fit_batches.append(torch.stack(group))
        else:
            fit_batches.extend(s.unsqueeze(0) for s in group)
    return Plan(plan.spec, fit_batches), torch.stack(held)


# ------------------------------------------------------------------------------- layer functions
def layer_function(
    method: str,
    spec: SparsitySpec,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    report_error: bool = True,
    options: Any = None,
) -> tuple[LayerFn, str]:
    """The layer function of a registered pruner (:mod:`sdsx.pruners.registry`) and the statistics
    it needs ("full", "diag" or "none"). ``options`` is the pruner's options dataclass (default: its
    defaults, with ``blocksize`` and ``percdamp`` for the pruners that take them); ``report_error``
    asks for every layer's error tr(D H D^T), and so for the full H."""
    entry = registry.get(method)
    if options is None:
        options = registry.make_options(entry, None, blocksize=blocksize, percdamp=percdamp)
    elif not isinstance(options, entry.options):
        raise TypeError(f"options of {entry.name} must be a {entry.options.__name__}, got {type(options).__name__}")
    shared = entry.shared(options) if entry.shared is not None else None

    def fn(name: str, W: torch.Tensor, H: torch.Tensor | None) -> PruneResult:
        return entry.solve(W, H, spec, options, registry.LayerContext(name, shared, report_error))

    return fn, entry.stats_for(report_error)


@dataclass(frozen=True)
class _PruneKeywords:
    """The keywords of :func:`prune` besides :class:`EngineOptions`' fields (see its docstring)."""

    blocksize: int = 128
    percdamp: float = 0.01
    report_error: bool | None = None


def _check_options(method: str, blocksize: Any, percdamp: Any, methods: Sequence[str] = METHODS) -> None:
    if not isinstance(method, str) or method.lower() not in methods:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(methods)}")
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if not isinstance(percdamp, (int, float)) or not math.isfinite(percdamp) or percdamp < 0:
        raise ValueError(f"percdamp must be a finite number >= 0, got {percdamp!r}")


@exact_fp32()
def run_driver(model: nn.Module, plan: Plan, layer_fn: LayerFn, driver: DriverOptions, run: PassOptions | None = None) -> DriverResult:
    """Run the block-sequential driver (``driver``: how; ``driver.stats``: which statistics) over a
    validated plan for one pass (``run``); shared by every pruning entry point."""
    return BlockDriver(model, driver).run(plan.batches if driver.stats != "none" else None, layer_fn, run)


def open_checkpoint(
    checkpoint_dir: str | os.PathLike | None,
    model: nn.Module,
    plan: Plan,
    options: dict[str, Any],
    save_activations: bool | None = None,
) -> Checkpoint | None:
    """Open (or start) the checkpoint of this run in ``checkpoint_dir``; None when not asked for.

    The fingerprint is the model's weights and config, the calibration token ids and ``options``
    (everything that changes the result); a checkpoint of another run is refused with what differs.
    """
    if checkpoint_dir is None:
        return None
    fingerprint = {
        "model": fingerprint_model(model),
        "calibration": fingerprint_calibration(plan.batches),
        "options": dict(options, sparsity=str(plan.spec)),
    }
    return Checkpoint.open(checkpoint_dir, fingerprint, save_activations=save_activations)


# ------------------------------------------------------------------------------------ public API
def prune(
    model: nn.Module,
    calib: torch.Tensor | Sequence[torch.Tensor] | None,
    method: str = "sparsegpt",
    sparsity: SparsitySpec | str | float = 0.5,
    *,
    options: Any = None,
    validation: int | float | str | None = "auto",
    block_fit: BlockFitOptions | dict[str, Any] | bool | None = None,
    engine: EngineOptions | None = None,
    **keywords: Any,
) -> PruneReport:
    """Prune every linear layer of every decoder block of ``model`` in place, in one shot.

    Embeddings and the LM head are never touched. Inputs are validated first: on a ValueError or
    TypeError the model is unchanged.

    Args:
        model: a Hugging Face causal LM (LLaMA/SmolLM2/Mistral/Qwen, OPT, GPT-2 families).
        calib: calibration token ids, a LongTensor (nsamples, seqlen) or a list of them (see
            :func:`sdsx.calibration`); may be None for ``magnitude`` with ``report_error=False``.
        method: a registered pruner (:data:`METHODS`): "sparsegpt", "wanda", "ria" or "magnitude".
        sparsity: a fraction in [0, 1) (unstructured), or "2:4" / "4:8" (N kept of every M inputs).
        options: the pruner's own options, an instance of its registered options dataclass or a
            dict of its fields (e.g. ``{"alpha": 0.5}`` for RIA, ``{"blocksize": 64}`` for
            SparseGPT; see :mod:`sdsx.pruners.registry`).
        report_error (keyword): compute every layer's reconstruction error tr(D H D^T) (``report.layers``'
            ``error``). None (the default): where it costs nothing, i.e. SparseGPT, whose solver
            needs the full H anyway; Wanda then accumulates only the input column norms (H's
            diagonal) and magnitude no statistics at all, and their errors are NaN. True asks for it
            from every method (the full H: one more GEMM per input for Wanda and magnitude).
        validation: also measure, after every block, how far the hidden states of this many held-out
            calibration sequences (a count, or a fraction in (0, 1)) are from the dense model's
            (``report.deviation``, the error over depth). The pruner still sees every calibration
            sequence (its H covers them all), so the weights are those of a run without it, up to
            rounding; needs SparseGPT or Wanda (the full H). "auto" (the default, as on the command
            line): with ``block_fit``, :func:`sdsx.defaults.auto_validation` (1/8 of the windows, at
            least 2, from 8 windows up), else none.
        block_fit: after pruning each block, fit its kept weights (masks fixed) to the dense model's
            hidden state with a few Adam steps over the calibration windows
            (:mod:`sdsx.pruners.blockfit`): True for the defaults, or a dict of
            :class:`~sdsx.pruners.blockfit.BlockFitOptions` fields. With ``validation`` the best
            iterate on the held-out windows is kept (never worse than the pruner's weights there).
        engine: an :class:`EngineOptions` (device, offload, progress, batch_size, checkpoint_dir,
            save_activations, blocks).
        keywords: fields of :class:`EngineOptions` (``progress=False``, ``checkpoint_dir=...``),
            which replace those of ``engine``; ``blocksize`` / ``percdamp`` (SparseGPT's
            lazy-update block in columns, default 128, and damping as a fraction of mean(diag H),
            default 0.01), which fill the pruner's options where ``options`` leaves them out; and
            ``report_error`` (below).
    Returns:
        A :class:`PruneReport`.
    """
    import time

    start = time.perf_counter()
    own, given = split_keywords(keywords, _PruneKeywords, EngineOptions)
    k = _PruneKeywords(**own)
    blocksize, percdamp, report_error = k.blocksize, k.percdamp, k.report_error
    e = with_overrides(EngineOptions, engine, given, "engine")
    device, offload, progress, batch_size = e.device, e.offload, e.progress, e.batch_size
    if e.blocks is not None:
        use_blocks(model, e.blocks)
    _check_options(method, blocksize, percdamp)
    method = method.lower()
    pruner_options = registry.make_options(registry.get(method), options, blocksize=blocksize, percdamp=percdamp)
    spec = SparsitySpec.parse(sparsity)
    fit = as_block_fit(block_fit)
    if fit is not None and method == "magnitude" and calib is None:
        raise ValueError("block_fit needs calibration windows; give calib")
    if report_error is None:
        report_error = method == "sparsegpt"
    if isinstance(validation, str) and validation != "auto":
        raise ValueError(f"validation must be 'auto', a count of sequences, a fraction in (0, 1) or None, got {validation!r}")
    if validation == "auto" and fit is None:
        validation = None  # "auto" holds windows out only for the block fit
    # the validation statistics need the full Gram, which is what report_error asks of every method
    layer_fn, stats = layer_function(method, spec, report_error=report_error or bool(validation) or fit is not None, options=pruner_options)
    plan = validate(model, calib, spec, need_calib=stats != "none", batch_size=batch_size)
    if stats == "none" and plan.batches is not None:
        plan = Plan(plan.spec, None)
    if validation == "auto":  # resolved above to None without the block fit
        validation = auto_validation(0 if plan.batches is None else sum(b.shape[0] for b in plan.batches))
    plan, held = split_validation(plan, validation, batch_size)
    if held is not None:
        inner = layer_fn
        layer_fn = lambda name, W, H, split=None: inner(name, W, H)  # noqa: E731 (the pruner ignores the split)
    run_options = dict(blocksize=getattr(pruner_options, "blocksize", blocksize), percdamp=getattr(pruner_options, "percdamp", percdamp),
                       offload=offload, report_error=report_error, batch_size=batch_size)
    if held is not None:
        run_options["validation"] = int(held.shape[0])
    if fit is not None:
        run_options["block_fit"] = asdict(fit)
    extra = {k: v for k, v in asdict(pruner_options).items() if k not in SHARED_PRUNER_FIELDS}
    if extra:  # the pruner's own options (RIA's alpha); SparseGPT's are recorded above as before
        run_options["pruner_options"] = extra
    fingerprint_options = {k: v for k, v in run_options.items() if k != "offload"}  # offload moves data, changes nothing
    checkpoint = open_checkpoint(e.checkpoint_dir, model, plan, dict(fingerprint_options, method=method), e.save_activations)
    engine = DriverOptions(device=device, offload=offload, stats=stats, batch_size=batch_size, progress=progress, desc=f"{method} {spec}")
    result = run_driver(model, plan, layer_fn, engine, PassOptions(checkpoint=checkpoint, validation=held, block_fit=fit))
    report = report_from(result, method, spec, run_options)
    report.total_s = max(result.total_s, time.perf_counter() - start)  # a resumed run includes its earlier part
    if plan.batches is not None:
        report.nsamples = sum(b.shape[0] for b in plan.batches) + (0 if held is None else int(held.shape[0]))
        report.tokens = sum(b.numel() for b in plan.batches) + (0 if held is None else held.numel())
    log.info(
        "%s %s: %.2f%% of %d weights pruned in %.1fs (forward %.1fs, statistics %.1fs, solver %.1fs)",
        method, spec, 100 * report.overall_sparsity, report.numel, report.total_s,
        report.forward_s, report.stats_s, report.solver_s,
    )
    return report
