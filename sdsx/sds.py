"""``sdsx.sds_prune``: Sparse-Dense-Sparse on a whole model, on top of the block-sequential driver.

Schedules:
  "interleaved" (default): S, D, S and the adjustment for one block, then the finished block is
      re-run to make the next block's inputs: one calibration pass, like the base pruner.
  "phased": the paper's order, a full calibration pass per phase: prune every block; re-dense every
      block (inputs from the pruned model); prune again and adjust (inputs from the re-dense model).
  "parallel": phase 1 block by block (propagating phase 1's outputs), phases 2 and 3 of every layer
      on H from that pass, independently of each other: in one process right after the layer's
      phase 1, or spread over the ranks of a torch.distributed group (:mod:`sdsx.parallel`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from sdsx.api import (
    EngineOptions,
    PruneReport,
    open_checkpoint,
    report_from,
    run_driver,
    split_keywords,
    split_validation,
    validate,
)
from sdsx.defaults import auto_validation  # re-exported: sdsx.sds.auto_validation
from sdsx.model.blocks import find_blocks, get_weight, model_linears, use_blocks
from sdsx.model.driver import DriverOptions, PassOptions, with_overrides
from sdsx.pruners import PruneResult, SparsitySpec, reconstruction_error, registry
from sdsx.pruners.sds import (
    PHASES,
    LayerCall,
    LayerProblem,
    SDSOptions,
    SharedH,
    run_phases,
    sds_layer,
    sds_tail,
    tail_phases,
)
from sdsx.pruners.spec import detect_pattern  # noqa: F401  (re-exported: sdsx.sds.detect_pattern)

log = logging.getLogger("sdsx")

SCHEDULES = ("interleaved", "phased", "parallel")
SNAPSHOTS = ("dense", "sparse", "redense", "final")  # the histogrammed weight sets


@dataclass
class SDSReport(PruneReport):
    """A :class:`PruneReport` plus, per layer, the calibration error after each phase and whether
    phase 1's weights were kept; the number of calibration passes; and histograms (counts over
    shared bin edges) of one layer's weights after each phase."""

    schedule: str = "interleaved"
    passes: int = 1
    parallel: dict[str, Any] = field(default_factory=dict)  # "parallel" schedule: world size, per-rank timings
    phase_errors: dict[str, dict[str, float]] = field(default_factory=dict)
    kept_phase1: list[str] = field(default_factory=list)
    kept_blocks: list[int] = field(default_factory=list)  # blocks the validation guard gave phase 1's weights
    model_guard: dict[str, Any] = field(default_factory=dict)  # validation loss per source for both weight sets, the choice
    validation_sources: dict[str, int] = field(default_factory=dict)  # validation windows per source
    histogram_layer: str | None = None
    histograms: dict[str, Any] = field(default_factory=dict)

    @property
    def improved_layers(self) -> int:
        """Layers whose final error is below phase 1's."""
        return sum(1 for e in self.phase_errors.values() if e.get("final", float("inf")) < e.get("sparse", float("-inf")))

    def to_markdown(self, per_layer: bool = True) -> str:
        head = super().to_markdown(per_layer=False)
        lines = [
            head,
            "",
            f"schedule {self.schedule}, {self.passes} calibration pass(es); final error below phase 1's on "
            f"{self.improved_layers} of {len(self.phase_errors)} layers; phase 1 kept on {len(self.kept_phase1)}",
        ]
        if self.model_guard:
            from sdsx.guard import describe

            lines += ["", describe(self.model_guard)]
        if self.blocks:
            lines += [
                "",
                f"validation: {self.validation_samples} windows ({_sources(self.validation_sources)}); the block guard kept phase 1 on "
                f"{len(self.kept_blocks)} of {len(self.blocks)} blocks",
                "",
                "| block | deviation, phase 1 weights | deviation, SDS weights | kept | after the block fit |",
                "|---:|---:|---:|---|---:|",
            ]
            for b in sorted(self.blocks, key=lambda b: b["block"]):
                d = b["deviation"]
                cells = " | ".join(f"{d[k]:.4g}" if k in d else "" for k in ("phase1", "sds"))
                fit = f"{d['fit']:.4g}" if "fit" in d else ""
                lines.append(f"| {b['block']} | {cells} | {b['chosen']} | {fit} |")
        if per_layer and self.phase_errors:
            phases = [p for p in ("sparse", "dense", "sparse2", "adjust", "final") if any(p in e for e in self.phase_errors.values())]
            lines += ["", "| layer | " + " | ".join(phases) + " | kept phase 1 |", "|---|" + "---:|" * len(phases) + "---|"]
            for name, errs in self.phase_errors.items():
                cells = " | ".join(f"{errs[p]:.4g}" if p in errs else "" for p in phases)
                lines.append(f"| {name} | {cells} | {'yes' if name in self.kept_phase1 else ''} |")
        return "\n".join(lines)


def _sources(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "held-out calibration"


def _histograms(snaps: dict[str, torch.Tensor], bins: int = 201) -> dict[str, Any]:
    lim = float(max(s.abs().max() for s in snaps.values())) or 1.0
    edges = torch.linspace(-lim, lim, bins + 1)
    return {
        "edges": edges.tolist(),
        "counts": {k: torch.histc(v.float().flatten(), bins=bins, min=-lim, max=lim).long().tolist() for k, v in snaps.items()},
    }


def _check_not_sparse(model: nn.Module, spec: SparsitySpec) -> None:
    for name, module in model_linears(model).items():
        W = get_weight(module)
        found = detect_pattern(W)
        if found is None:
            continue
        wanted = str(spec) if spec.is_nm else "unstructured"
        same = found == wanted or (wanted == "unstructured" and abs(float((W == 0).float().mean()) - spec.sparsity) < 0.02)
        if not same:
            raise ValueError(
                f"the model is already sparse: {name} is {found} ({float((W == 0).float().mean()):.1%} zeros), "
                f"but {spec} was requested; SDS needs the dense model (its weights are the targets): load it again"
            )


class _SDSState:
    """SDS's side state (per-layer phase errors, layers that kept phase 1, the histogram layer's
    weights after each phase), saved and restored with each block by a checkpointed run."""

    def __init__(self, histogram_layer: str, on_restore: Callable[[str, torch.Tensor, dict[str, float]], None] | None = None) -> None:
        self.histogram_layer = histogram_layer
        self.phase_errors: dict[str, dict[str, float]] = {}
        self.kept: list[str] = []
        self.snaps: dict[str, torch.Tensor] = {}
        self.phase1: dict[str, torch.Tensor] = {}  # phase 1's weights (CPU), for the model guard
        self.on_restore = on_restore

    def save(self, index: int, names: list[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        data = {"errors": {n: self.phase_errors[n] for n in names if n in self.phase_errors}, "kept": [n for n in self.kept if n in names]}
        tensors = {f"snap.{k}": v for k, v in self.snaps.items()} if self.histogram_layer in names else {}
        tensors.update({f"phase1.{n}": self.phase1[n] for n in names if n in self.phase1})
        return data, tensors

    def restore(self, index: int, data: dict[str, Any], tensors: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
        for name, errors in data.get("errors", {}).items():
            self.phase_errors.setdefault(name, {}).update(errors)
        self.kept.extend(n for n in data.get("kept", []) if n not in self.kept)
        self.snaps.update({k[len("snap."):]: v for k, v in tensors.items() if k.startswith("snap.")})
        self.phase1.update({k[len("phase1."):]: v for k, v in tensors.items() if k.startswith("phase1.")})
        if self.on_restore is not None:
            for name, W in weights.items():
                self.on_restore(name, W, self.phase_errors.get(name, {}))


@dataclass(frozen=True)
class _SDSKeywords:
    """The keywords of :func:`sds_prune` besides the fields of SDSOptions and EngineOptions."""

    early_exit_params: float = 3e9
    other_validation: str | torch.Tensor | None = "self"


def sds_prune(
    model: nn.Module,
    calib: torch.Tensor | Sequence[torch.Tensor],
    sparsity: SparsitySpec | str | float = "2:4",
    pruner: str = "sparsegpt",
    *,
    schedule: str = "interleaved",
    options: SDSOptions | None = None,
    validation: int | float | str | None = "auto",
    engine: EngineOptions | None = None,
    **keywords: Any,
) -> SDSReport:
    """Prune ``model`` in place with Sparse-Dense-Sparse.

    Args:
        model: a Hugging Face causal LM (see :func:`sdsx.prune`).
        calib: calibration token ids (nsamples, seqlen), see :func:`sdsx.calibration`.
        sparsity: "2:4", "4:8", or a fraction in [0, 1).
        pruner: the one-shot pruner of phases 1 and 3: "sparsegpt", "wanda" or "ria" (any registered
            pruner that SDS may use, :func:`sdsx.pruners.registry.sds_names`).
        schedule: "interleaved" (one calibration pass), "phased" (the paper's, one pass a phase) or
            "parallel" (phases 2/3 of all layers independent, spread over the ranks of an initialised
            torch.distributed group; needs ``checkpoint_dir`` with more than one rank, see
            :mod:`sdsx.parallel`). Under a process group of N > 1, ranks 1..N-1 ignore the model,
            work for rank 0 and return None.
        options: an :class:`~sdsx.pruners.sds.SDSOptions`; keywords that name its fields replace
            them (e.g. ``l1=0.05, dense_iters=40, adjust=False``).
        engine: an :class:`~sdsx.api.EngineOptions` (device, offload, progress, batch_size,
            checkpoint_dir, save_activations, blocks, histogram_layer); keywords that name its
            fields replace them. A checkpointed run saves after every block of every pass (the
            phased schedule's three passes each) and resumes at the first unfinished one.
        keywords: fields of SDSOptions or EngineOptions (above), and ``early_exit_params`` and
            ``other_validation`` (below).
        early_exit_params (keyword): skip the weight adjustment for models with more parameters
            than this (the paper's early exit above ~3B); ``float("inf")`` never skips.
        validation: calibration sequences held out from phases 2/3 (a count, or a fraction in
            (0, 1)); "auto" (default) holds out 1/8 of them (at least 2) with the interleaved
            schedule when there are at least 8, else none; None or 0 none. Phase 1 still prunes on
            all sequences (it equals the base pruner); phases 2/3 fit on the rest; the held-out ones
            decide, per layer (``keep_better``) and per block (``block_guard``), whether SDS's
            weights or phase 1's are kept, and when the adjustment stops (``early_stop``). The
            report's ``blocks`` give the validation hidden-state deviation from the dense model
            after every block for both weight sets (the error over depth).
        other_validation (keyword): validation windows from another domain, added to the held-out ones (for
            the layer, block and model guards and the block fit's choice of iterate): "self"
            (default) samples as many windows as are held out from the dense model itself (seeded,
            cached); a (n, seqlen) tensor of token ids gives them (e.g. windows of another corpus);
            None adds none. Used only when calibration sequences are held out.
    Returns:
        An :class:`SDSReport` (None on ranks 1..N-1 of a distributed "parallel" run).
    """
    start = time.perf_counter()
    overrides, given, own = split_keywords(keywords, SDSOptions, EngineOptions, _SDSKeywords)
    e, k = with_overrides(EngineOptions, engine, given, "engine"), _SDSKeywords(**own)
    checkpoint_dir, histogram_layer, other_validation = e.checkpoint_dir, e.histogram_layer, k.other_validation
    if e.blocks is not None:
        use_blocks(model, e.blocks)
    if schedule == "parallel":
        from sdsx.parallel import dist_info, worker

        rank, world = dist_info()
        if world > 1 and checkpoint_dir is None:
            raise ValueError(
                f"a distributed SDS run ({world} ranks) exchanges layers through a folder: pass checkpoint_dir= "
                "(the CLI's --out) on every rank"
            )
        if rank > 0:
            return worker(checkpoint_dir)
    if not isinstance(pruner, str) or pruner.lower() not in registry.sds_names():
        raise ValueError(f"unknown SDS pruner {pruner!r}; choose one of {', '.join(registry.sds_names())}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    base = options or SDSOptions()
    opts = dataclasses.replace(base, pruner=pruner.lower(), **overrides).validate()
    nparams = sum(p.numel() for p in model.parameters())
    if opts.adjust and nparams > k.early_exit_params:
        log.info("SDS: %.2fB parameters > early exit threshold: weight adjustment skipped", nparams / 1e9)
        opts = dataclasses.replace(opts, adjust=False)
    if opts.target == "dense" and schedule != "interleaved":
        raise ValueError(f"target='dense' (the dense model's activations as targets) runs with schedule='interleaved', not {schedule!r}")
    if opts.block_fit and schedule != "interleaved":
        if overrides.get("block_fit") or (options is not None and options.block_fit):
            raise ValueError(f"block_fit runs with schedule='interleaved', not {schedule!r}; pass block_fit=False")
        log.info("SDS: the block fit runs with the interleaved schedule only; schedule %r runs without it", schedule)
        opts = dataclasses.replace(opts, block_fit=False)
    if opts.target == "dense" and checkpoint_dir is not None:
        raise ValueError("target='dense' cannot be checkpointed yet (its second activation stream is not saved); drop checkpoint_dir")
    spec = SparsitySpec.parse(sparsity)
    plan = validate(model, calib, spec, need_calib=True, batch_size=e.batch_size)
    _check_not_sparse(model, spec)
    if validation == "auto":
        validation = auto_validation(sum(b.shape[0] for b in plan.batches), schedule)
    elif isinstance(validation, str):
        raise ValueError(f"validation must be 'auto', a count of calibration sequences, a fraction in (0, 1) or None, got {validation!r}")
    if validation and schedule != "interleaved":
        raise ValueError(f"validation windows run with schedule='interleaved', not {schedule!r}; pass validation=None")
    plan, held = split_validation(plan, validation, e.batch_size)
    sources = _validation_sources(model, held, other_validation)
    others = [v for k, v in sources.items() if k != "calibration"]
    held_other = torch.cat(others) if others else None
    counts = {k: int(v.shape[0]) for k, v in sources.items()}
    if histogram_layer is None:
        histogram_layer = next(iter(model_linears(model)))

    run_options = dict(opts.to_dict(), schedule=schedule, batch_size=e.batch_size)
    if held is not None:
        run_options["validation"] = int(held.shape[0])
        if held_other is not None:
            run_options["validation_sources"] = counts
    checkpoint = open_checkpoint(checkpoint_dir, model, plan, run_options, e.save_activations)
    driver_engine = DriverOptions(device=e.device, offload=e.offload, progress=e.progress, batch_size=e.batch_size)

    if schedule == "interleaved":
        shared, shared_fit = SharedH(opts), SharedH(opts)
        state = _SDSState(histogram_layer)
        phase_errors, kept, snaps = state.phase_errors, state.kept, state.snaps
        candidates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # this block's (SDS, phase 1) weights

        def layer_fn(name: str, W: torch.Tensor, H: torch.Tensor | None, C: torch.Tensor | None = None, split=None) -> PruneResult:
            res = sds_layer(W, H, spec, opts, LayerCall(name, name == histogram_layer, shared, shared_fit), C=C, split=split)
            res.errors["final"] = res.result.loss
            phase_errors[name] = res.errors
            if res.kept_phase1:
                kept.append(name)
            if res.weights:
                snaps.update({k: v for k, v in res.weights.items() if k in SNAPSHOTS})
            if held is not None and opts.block_guard:
                candidates[name] = (res.result.weight, res.phase1)
            if held is not None and opts.model_guard:
                state.phase1[name] = res.phase1.detach().to("cpu", copy=True)
            return res.result

        def block_choice(index: int) -> list[tuple[str, dict[str, torch.Tensor]]]:
            sds_w = {n: c[0] for n, c in candidates.items()}
            p1_w = {n: c[1] for n, c in candidates.items()}
            candidates.clear()
            return [("sds", sds_w), ("phase1", p1_w)]

        driver = dataclasses.replace(driver_engine, desc=f"sds-{opts.pruner} {spec}", dense_stream=opts.target == "dense",
                                     deviation=opts.deviation)
        run = PassOptions(checkpoint=checkpoint, pass_name="sds", state=state, validation=held, validation_other=held_other,
                          block_choice=block_choice if (held is not None and opts.block_guard) else None,
                          block_fit=opts.block_fit_options())
        result = run_driver(model, plan, layer_fn, driver, run)
        passes = 1
    elif schedule == "phased":
        result, passes, state = _phased(model, plan, spec, opts, histogram_layer, driver_engine, checkpoint)
        phase_errors, kept, snaps = state.phase_errors, state.kept, state.snaps
    else:
        result, state, par = _parallel(model, plan, spec, opts, histogram_layer, driver_engine, checkpoint)
        phase_errors, kept, snaps, passes = state.phase_errors, state.kept, state.snaps, 1

    guard = None
    if schedule == "interleaved" and held is not None and opts.model_guard:
        guard = _model_guard(model, state.phase1, sources, e.device)
    report = report_from(result, f"sds-{opts.pruner}", spec, run_options)
    if held is not None:
        report.nsamples += int(held.shape[0])
        report.tokens += held.numel()
    kept_blocks = [b["block"] for b in result.blocks if b.get("chosen") == "phase1"]
    report = SDSReport(**vars(report), schedule=schedule, passes=passes, phase_errors=phase_errors, kept_phase1=kept,
                       kept_blocks=kept_blocks)
    report.histogram_layer = histogram_layer
    if guard is not None:
        report.model_guard = guard
    report.validation_sources = counts
    if schedule == "parallel":
        report.parallel = par.to_dict()
    if snaps:
        report.histograms = _histograms(snaps)
    report.total_s = max(result.total_s, time.perf_counter() - start)  # a resumed run includes its earlier part
    log.info(
        "sds-%s %s: %.1fs, final error below phase 1's on %d of %d layers",
        opts.pruner, spec, report.total_s, report.improved_layers, len(phase_errors),
    )
    return report


def _validation_sources(model: nn.Module, held: torch.Tensor | None, other: str | torch.Tensor | None, seed: int = 0) -> dict[str, torch.Tensor]:
    """The validation windows by source: the held-out calibration windows, and ``other`` (see
    :func:`sds_prune`) when there are held-out windows at all."""
    from sdsx.guard import OTHER_SOURCES, generated_windows

    if held is None:
        return {}
    sources = {"calibration": held}
    if other is None:
        return sources
    if isinstance(other, str):
        if other not in OTHER_SOURCES:
            raise ValueError(f"other_validation must be one of {OTHER_SOURCES}, token windows or None, got {other!r}")
        sources["generated"] = generated_windows(model, held, int(held.shape[0]), seed=seed)
    elif isinstance(other, torch.Tensor):
        if other.dim() != 2 or other.shape[1] != held.shape[1] or other.shape[0] < 1 or other.is_floating_point():
            raise ValueError(
                f"other_validation must be token ids of shape (n, {held.shape[1]}) like the calibration windows, "
                f"got {tuple(other.shape)} {other.dtype}"
            )
        sources["other"] = other.long()
    else:
        raise TypeError(f"other_validation must be 'self', a tensor of token ids or None, got {type(other).__name__}")
    return sources


def _model_guard(model: nn.Module, phase1: dict[str, torch.Tensor], sources: dict[str, torch.Tensor],
                 device: torch.device | str | None) -> dict[str, Any] | None:
    """Compare the whole model's validation loss per source with SDS's weights and with phase 1's;
    leave the model with the better (:func:`sdsx.guard.choose`) and return what was measured."""
    from sdsx.guard import choose, describe, window_losses
    from sdsx.model.blocks import set_weight

    linears = model_linears(model)
    missing = [n for n in linears if n not in phase1]
    if missing:
        log.warning("SDS: the model guard is skipped: phase 1's weights of %d layers are unknown (%s ...)", len(missing), missing[0])
        return None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    sds_w = {n: get_weight(m).detach().to("cpu", copy=True) for n, m in linears.items()}
    with torch.no_grad():
        loss_sds = window_losses(model, sources, device)
        for n, m in linears.items():
            set_weight(m, phase1[n])
        loss_p1 = window_losses(model, sources, device)
        chosen = choose(loss_sds, loss_p1)
        if chosen == "sds":
            for n, m in linears.items():
                set_weight(m, sds_w[n])
    entry = {"sds": loss_sds, "phase1": loss_p1, "chosen": chosen, "seconds": time.perf_counter() - t0}
    log.info("SDS: %s", describe(entry))
    return entry


def _phased(model, plan, spec, opts, histogram_layer, engine, checkpoint):
    """The paper's schedule: three calibration passes; the dense weights are kept on CPU meanwhile
    (taken up front, so that a resumed run has them for blocks it restores rather than prunes)."""
    dense = {name: get_weight(m).detach().to("cpu", copy=True) for name, m in model_linears(model).items()}
    first: dict[str, PruneResult] = {}
    shared = SharedH(opts)

    def remember_first(name: str, W: torch.Tensor, errors: dict[str, float]) -> None:
        W = W.detach().to("cpu", copy=True)
        first[name] = PruneResult(W, W != 0, errors.get("sparse", float("nan")))

    state = _SDSState(histogram_layer, on_restore=remember_first)
    phase_errors, kept, snaps = state.phase_errors, state.kept, state.snaps

    def problem(name: str, W: torch.Tensor, H: torch.Tensor, need_loss: bool = False) -> LayerProblem:
        return LayerProblem(dense[name].to(W.device).float(), H, spec, opts, shared(H), name, need_loss=need_loss)

    def sparse_fn(name, W, H):
        res = PHASES["sparse"].run(problem(name, W, H, need_loss=True), W, None)
        first[name] = PruneResult(res.weight.to("cpu", copy=True), res.mask.cpu(), res.loss)
        phase_errors[name] = {"sparse": res.loss}
        if name == histogram_layer:
            snaps.update(dense=dense[name].float(), sparse=res.weight.float().cpu())
        return res

    def one_pass(layer_fn, desc: str, pass_name: str):
        return run_driver(model, plan, layer_fn, dataclasses.replace(engine, desc=desc),
                          PassOptions(checkpoint=checkpoint, pass_name=pass_name, state=state))

    r1 = one_pass(sparse_fn, f"sds 1/3 sparse {spec}", "sds-sparse")
    state.on_restore = None  # later passes restore their own weights, not phase 1's
    tail = tail_phases(opts)
    dense_phases, final_phases = [p for p in tail if not p.sparse], [p for p in tail if p.sparse]
    if dense_phases:

        def dense_fn(name, W, H):
            new, _ = run_phases(problem(name, W, H), dense_phases, W, None, phase_errors[name],
                                snaps if name == histogram_layer else None)
            return PruneResult(new.to(W.dtype), torch.ones_like(new, dtype=torch.bool), phase_errors[name]["dense"])

        r2 = one_pass(dense_fn, f"sds 2/3 dense {spec}", "sds-dense")

    def final_fn(name, W, H):
        p = problem(name, W, H)
        Wd = p.W_d
        new, mask = run_phases(p, final_phases, W.float(), W != 0, phase_errors[name])
        err = reconstruction_error(Wd, new, H)
        # phase 1's error was measured on other inputs; compare both on this pass's H
        err1 = reconstruction_error(Wd, first[name].weight.to(W.device), H)
        phase_errors[name]["sparse_same_inputs"] = err1
        if opts.keep_better and err > err1:
            kept.append(name)
            new, mask, err = first[name].weight.to(W.device), first[name].mask.to(W.device), err1
        phase_errors[name]["final"] = err
        if name == histogram_layer:
            snaps["final"] = new.float().cpu().clone()
        return PruneResult(new.to(W.dtype), mask, err)

    r3 = one_pass(final_fn, f"sds 3/3 sparse {spec}", "sds-final")
    passes = 3 if dense_phases else 2
    # one record per layer (the last pass's), timings summed over the passes
    for earlier in (r1, r2) if dense_phases else (r1,):
        r3.forward_s += earlier.forward_s
        r3.stats_s += earlier.stats_s
        r3.solver_s += earlier.solver_s
    return r3, passes, state


def _parallel(model, plan, spec, opts, histogram_layer, engine, checkpoint):
    """The "parallel" schedule on rank 0 (see :mod:`sdsx.parallel`): phase 1 through the driver,
    whose pass propagates phase 1's outputs; phases 2/3 per layer, here or on the other ranks."""
    from sdsx.model.blocks import set_weight
    from sdsx.parallel import Clock, Coordinator, LayerStore, ParallelStats, run_task

    linears = model_linears(model)
    shapes = {n: tuple(get_weight(m).shape) for n, m in linears.items()}
    _, path = find_blocks(model)
    blocks = {n: int(n[len(path) + 1 :].split(".", 1)[0]) for n in linears}
    store = LayerStore(checkpoint.directory) if checkpoint is not None else None
    coord = Coordinator(store.root.parent if store else None, spec, opts, shapes, blocks, histogram_layer)
    owners = coord.owners
    shared = SharedH(opts)
    state = _SDSState(histogram_layer)
    finals: dict[str, Any] = {}  # in-memory results of a run without a folder
    clock = Clock(0)

    def layer_fn(name: str, W: torch.Tensor, H: torch.Tensor) -> PruneResult:
        sh = shared(H)
        s1 = PHASES["sparse"].run(LayerProblem(W, H, spec, opts, sh, name, need_loss=True), W, None)
        if owners[name] == 0:
            t0 = time.time()
            res = sds_tail(W, s1, H, spec, opts, LayerCall(name, name == histogram_layer, sh))
            t1 = time.time()
            clock.add(t0, t1)
            if store is not None:
                store.write_result(name, res, t1 - t0)
            else:
                finals[name] = _to_cpu(res)
        else:
            store.write_task(name, W, s1, H)
        return s1  # the pass propagates phase 1's outputs

    def after_block(index: int) -> None:
        coord.announce(index)

    result = run_driver(model, plan, layer_fn, dataclasses.replace(engine, desc=f"sds-parallel 1/2 sparse {spec}"),
                        PassOptions(checkpoint=checkpoint, pass_name="sds-parallel", after_block=after_block))
    # layers of blocks restored from the checkpoint whose phases 2/3 rank 0 owns but never finished
    # (e.g. the earlier run had more ranks)
    if store is not None:
        todo = [n for n in linears if owners[n] == 0 and not store.has_result(n)]
        for name in todo:
            clock.add(*run_task(store, name, spec, opts, name == histogram_layer))
    ranks = [clock.as_dict()] + coord.finish()

    # merge: the final weights replace phase 1's
    records = {r.name: r for r in result.layers}
    for name, module in linears.items():
        if name in finals:
            res = finals.pop(name)
        else:
            if not store.has_result(name):
                raise RuntimeError(f"{name}: no phase-2/3 result in {store.results} although every rank finished")
            res = store.read_result(name)
        set_weight(module, res.result.weight)
        state.phase_errors[name] = dict(res.errors, final=float(res.result.loss))
        if res.kept_phase1:
            state.kept.append(name)
        if res.weights:
            state.snaps.update({k: v for k, v in res.weights.items() if k in SNAPSHOTS})
        rec = records.get(name)
        if rec is not None:
            rec.pruned = int(res.result.mask.numel() - res.result.mask.sum())
            rec.loss = float(res.result.loss)
    if store is not None:
        store.clear()
    return result, state, ParallelStats(coord.world, ranks)


def _to_cpu(res):
    from sdsx.pruners.sds import SDSLayerResult

    r = res.result
    return SDSLayerResult(PruneResult(r.weight.cpu(), r.mask.cpu(), r.loss), res.errors, res.kept_phase1, res.weights)

