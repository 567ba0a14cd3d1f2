"""SDS (Sparse-Dense-Sparse; Li et al. 2024) for one layer, as pure tensor functions.

All phases work through H = X X^T / T, X the layer's calibration inputs (in the pruned model), so
an iteration costs one GEMM of the weight's size whatever the number of tokens:

    f(W) = tr((W - W_d) H_damp (W - W_d)^T) + l2_abs |W|^2 + l1_abs |W|_1

with H_damp = H + damp * mean(diag H) * I. Damping is a ridge towards the dense weights: it holds
the fit in the directions the calibration inputs barely see, where the re-dense step otherwise
fits the calibration text instead of the language.

Scaling of the regularizers (the paper gives l1 = l2 = 0.1 on an MSE over the layer outputs, but
not its normalisation): ours are relative, so one setting means the same on every layer:
    l2_abs = l2 * mean(diag H),   l1_abs = l1 * mean(diag H) * rms(W_d).
Dividing f by rc * mean(diag H) shows what that means: l2 weighs mean(W^2) and l1 weighs
rms(W_d) * mean|W| against the mean squared output error per weight, in units of the input
energy per feature. With inputs of unit energy and per-element means in the paper's losses, the
paper's l1 = l2 = 0.1 are our l1 = l2 = 0.1 (with rms(W_d) folded into l1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from sdsx import ops
from sdsx.flags import flag
from sdsx.numerics import exact_fp32
from sdsx.pruners import registry
from sdsx.pruners.base import PruneResult, apply_mask, reconstruction_error
from sdsx.pruners.blockfit import DEVIATIONS, BlockFitOptions
from sdsx.pruners.blockfit import TARGETS as FIT_TARGETS
from sdsx.pruners.magnitude import select_mask
from sdsx.pruners.sparsegpt import FactorCache
from sdsx.pruners.spec import SparsitySpec

ADJUST_SCORES = ("magnitude", "activation")
SHARED_PRUNER_FIELDS = ("blocksize", "percdamp")  # SDSOptions fields passed on to the pruner's options
TARGETS = ("pruned", "dense")


@dataclass(frozen=True)
class SDSOptions:
    """Every phase and regularizer of SDS; the defaults are the ones our ablations chose.

    pruner: one-shot pruner of phases 1 and 3 ("sparsegpt", "wanda", "ria": a registered pruner,
        :func:`sdsx.pruners.registry.sds_names`); its options are taken from the fields here of the
        same name (SparseGPT's ``blocksize`` and ``percdamp``), the rest are its defaults.
    redense: run phase 2 (False gives S-S: prune, then adjust).
    l1, l2: relative regularizer weights of phase 2 (see the module docstring). Default 0: on
        SmolLM2-135M 2:4 the paper's 0.1 / 0.1 gave validation perplexity 74.24 against 68.08 without
        them (base SparseGPT 69.61; held-out calibration text, docs/sds.md): the pull towards zero
        shrinks every layer's output, and the shrinkage compounds over depth.
    dense_iters: FISTA iterations of phase 2. Default 8: with the block fit after them, 20 and 8
        gave the same validation perplexity on SmolLM2 2:4 (46.18 and 46.50, within the noise) and
        8 saves a third of SDS's time.
    damp: relative damping of H in phases 2 and 3 (a ridge towards the dense weights); 1.0
        beat 0.01 on held-out perplexity on SmolLM2 2:4 (163.9 vs 174.7, docs/sds.md).
    adjust: run the weight adjustment after the second pruning.
    adjust_iters: iterations of the adjustment (CG steps with ``reselect=False``, projected-gradient
        steps with ``reselect=True``).
    reselect: re-select the mask at every adjustment iteration (the paper); False (default) keeps
        the second pruning's mask fixed and solves the kept weights by conjugate gradients
        (:func:`refit`), which converges where the gradient steps of the paper's adjustment crawl.
        The mask hardly moves either way (99.9% of positions equal phase 1's); on validation the
        CG refit was equal for SparseGPT 2:4 (46.18 vs 46.28 with the block fit) and far better
        for Wanda 2:4 (85.66 vs Wanda's 164.16 without the block fit; docs/sds.md).
    adjust_score: what the re-selection ranks: "magnitude" |W| (the paper), or "activation"
        |W_ij| * sqrt(H_jj) (Wanda's score: the diagonal of the H metric the gradient step uses).
    keep_better: keep phase 1's weights for a layer whose final error is higher: on the
        validation windows when the run holds some out, else on the calibration it fitted.
    block_guard: with validation windows, keep phase 1's weights for a whole block where its
        output on them is closer to the dense model's hidden state than SDS's (the block sees the
        composition of its layers, and the residual stream carries the error on).
    model_guard: with validation windows, compare the whole model's validation loss (next-token
        NLL) on each validation source (the held-out calibration windows, and text of another
        domain: ``sds_prune``'s ``other_validation``) with SDS's weights and with phase 1's, and
        return phase 1's unless SDS's are better on every source (:mod:`sdsx.guard`).
    early_stop: with validation windows, return the adjustment iterate with the lowest validation
        error rather than the last. The CG refit (the default) scores only its start (the second
        pruning's result) and its last iterate: over 210 SmolLM2 layers an intermediate iterate
        was best once, by 2e-7 relative; the paper's re-selecting adjustment scores every one.
    target: what phases 2 and 3 fit. "pruned" (the paper): W_d X with X the layer's inputs in the
        pruned model, both sides on the same inputs. "dense": the dense model's own outputs
        W_d X_d (X_d the inputs in the dense model), which needs a second activation stream and
        the cross Gram X X_d^T / T (interleaved schedule only).
    alpha: with target="dense", how much of the correction towards the dense model's outputs
        to take: the target is W_d (alpha X_d + (1 - alpha) X); 1 is the full dense target, 0 the
        paper's same-input target (GPTAQ's partial correction).
    block_fit: after the layer phases, fit each block's kept weights (masks fixed) to the dense
        model's hidden state (:mod:`sdsx.pruners.blockfit`; interleaved schedule only); with
        validation windows its best iterate on them is kept. On by default: on SmolLM2-135M 2:4 it
        took SparseGPT's validation perplexity from 70.87 to 46.79 (docs/sds.md). The other
        schedules run without it.
    block_lr, block_lr_mode, block_epochs, block_target: the block fit's Adam learning rate (absolute,
        or relative to each weight tensor's RMS), passes over the
        calibration windows and target ("dense" or "local"), see
        :class:`~sdsx.pruners.blockfit.BlockFitOptions`. 3e-4 beat 1e-4 on validation (46.79 vs
        49.71); half an epoch keeps SDS within 3x its base pruner's time (one epoch: 50.43
        against 53.75 for Wanda 2:4, at about 3.3x the default Wanda's time); the dense target
        beat the local one (50.43 against 56.12).
    deviation: how a block's distance from the dense model is measured, for the block guard, the
        block fit's loss and its choice of iterate: "balanced" (default) weighs every hidden
        channel by the inverse of its dense RMS, "plain" by its own size (the earlier default).
        Gemma-3-270M keeps 85-98% of a token's hidden-state norm in 4 of its 640 channels, so the
        plain deviation measured those channels alone (docs/sds.md, "A guard that sees the domain").
    blocksize, percdamp: SparseGPT's settings.
    pruner_options: the other options of ``pruner`` (a dict of its registered options' fields, e.g.
        ``{"alpha": 0.5}`` for RIA); None for its defaults.
    """

    pruner: str = "sparsegpt"
    redense: bool = field(default=True, metadata=flag("run the re-dense phase (--no-redense: sparse, then adjust)"))
    l1: float = field(default=0.0, metadata=flag("relative L1 weight of the re-dense phase (the paper uses 0.1)"))
    l2: float = field(default=0.0, metadata=flag("relative L2 weight of the re-dense phase (the paper uses 0.1)"))
    dense_iters: int = field(default=8, metadata=flag("FISTA iterations of the re-dense phase"))
    damp: float = field(default=1.0, metadata=flag("relative damping of H in the re-dense and adjust phases"))
    adjust: bool = field(default=True, metadata=flag("run the weight adjustment after the second pruning"))
    adjust_iters: int = field(default=8, metadata=flag("iterations of the weight adjustment"))
    reselect: bool = field(default=False, metadata=flag(
        "re-select the mask at every adjustment step (the paper's); else keep the second pruning's mask and refit by CG"))
    adjust_score: str = field(default="magnitude", metadata=flag(
        "what the adjustment's mask re-selection ranks: |W| (magnitude, the paper's) or |W| * sqrt(diag H) (activation)",
        choices=ADJUST_SCORES))
    keep_better: bool = field(default=True, metadata=flag("keep phase 1's weights for a layer whose error they beat"))
    block_guard: bool = field(default=True, metadata=flag(
        "keep phase 1's weights for a block whose validation output they bring closer to the dense model's"))
    model_guard: bool = field(default=True, metadata=flag(
        "return phase 1's weights unless SDS's whole-model validation loss is lower on every validation source"))
    early_stop: bool = field(default=True, metadata=flag("return the adjustment iterate with the lowest validation error"))
    target: str = field(default="pruned", metadata=flag(
        "what phases 2 and 3 fit: the dense weights on the pruned model's inputs (pruned, the paper's) or the dense "
        "model's outputs (dense: a second activation stream, interleaved schedule only)", choices=TARGETS))
    alpha: float = field(default=1.0, metadata=flag("with --target dense: the share of the correction towards the dense outputs, in [0, 1]"))
    block_fit: bool = True
    block_lr: float = field(default=3e-4, metadata=flag("the block fit's Adam learning rate", group="fit"))
    block_lr_mode: str = "absolute"
    block_epochs: float = field(default=0.5, metadata=flag("the block fit's passes over the calibration windows", group="fit"))
    block_target: str = field(default="dense", metadata=flag(
        "what the block fit approaches: the dense model's hidden state (dense) or the dense block on the pruned input (local)",
        group="fit", choices=FIT_TARGETS))
    deviation: str = field(default="balanced", metadata=flag(
        "how a block's distance from the dense model is measured for the guards and the block fit: every hidden channel "
        "weighed by its dense RMS (balanced) or by its own size (plain)", choices=DEVIATIONS))
    blocksize: int = field(default=128, metadata=flag("SparseGPT's lazy-update block in columns", group="pruner"))
    percdamp: float = field(default=0.01, metadata=flag("SparseGPT's damping, a fraction of mean(diag H)", group="pruner"))
    pruner_options: dict | None = None

    def validate(self) -> "SDSOptions":
        if self.pruner not in registry.sds_names():
            raise ValueError(f"unknown SDS pruner {self.pruner!r}; choose one of {registry.sds_names()}")
        if not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        for name in ("l1", "l2", "damp", "percdamp"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.redense and self.dense_iters < 1:
            raise ValueError(f"dense_iters must be >= 1 when redense is on, got {self.dense_iters} (or set redense=False)")
        if self.adjust and self.adjust_iters < 1:
            raise ValueError(f"adjust_iters must be >= 1 when adjust is on, got {self.adjust_iters} (or set adjust=False)")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.adjust_score not in ADJUST_SCORES:
            raise ValueError(f"adjust_score must be one of {ADJUST_SCORES}, got {self.adjust_score!r}")
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be >= 1, got {self.blocksize}")
        if self.deviation not in DEVIATIONS:
            raise ValueError(f"deviation must be one of {DEVIATIONS}, got {self.deviation!r}")
        self.block_fit_options()  # checks the block fit's settings
        self.pruner_settings()  # checks the pruner's options
        return self

    def pruner_settings(self, pruner: str | None = None) -> Any:
        """The options dataclass of ``pruner`` (default: this run's): ``pruner_options`` (for this
        run's pruner) over SparseGPT's ``blocksize`` and ``percdamp`` here, where the pruner has such
        fields, over its defaults. No other field here is passed on by name (``alpha`` here is the
        dense target's share, RIA's ``alpha`` another thing)."""
        entry = registry.get(pruner or self.pruner)
        given = self.pruner_options if entry.name == self.pruner else None
        return registry.make_options(entry, given, **{k: getattr(self, k) for k in SHARED_PRUNER_FIELDS})

    def block_fit_options(self) -> "BlockFitOptions | None":
        """The block fit's settings, or None when it is off."""
        if not self.block_fit:
            return None
        return BlockFitOptions(epochs=self.block_epochs, lr=self.block_lr, lr_mode=self.block_lr_mode, target=self.block_target)

    def to_dict(self) -> dict:
        return asdict(self)


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I."""
    if damp == 0:
        return H
    Hd = H.clone()
    Hd.diagonal().add_(damp * float(H.diagonal().mean()))
    return Hd


def lambda_max(H: torch.Tensor, iters: int = 30) -> float:
    """Largest eigenvalue of the PSD matrix H by power iteration (a few matrix-vector products
    instead of an eigendecomposition)."""
    v = torch.ones(H.shape[0], dtype=H.dtype, device=H.device) / math.sqrt(H.shape[0])
    lam = 0.0
    for _ in range(iters):
        w = H @ v
        lam = float(w.norm())
        if lam == 0:
            break
        v = w / lam
    return lam


def lipschitz(H: torch.Tensor, l2_abs: float = 0.0, lam: float | None = None) -> float:
    """Upper estimate of the gradient's Lipschitz constant 2 (lambda_max(H) + l2_abs), with a 2%
    margin on the power iteration's estimate (which approaches lambda_max from below)."""
    lam = lambda_max(H) if lam is None else lam
    return 2.0 * (lam * 1.02 + l2_abs)


class SharedH:
    """What the linears that read one input (q/k/v, gate/up) share in SDS, computed once per H:
    SparseGPT's inverse-Hessian factor, the damped H and its largest eigenvalue."""

    def __init__(self, opts: "SDSOptions") -> None:
        self.opts = opts
        self.factor = FactorCache(opts.percdamp)
        self._H: torch.Tensor | None = None
        self.Hd: torch.Tensor | None = None
        self.lam = 0.0

    def __call__(self, H: torch.Tensor) -> "SharedH":
        if self._H is not H:
            self._H = H
            self.Hd = damped(H, self.opts.damp)
            self.lam = lambda_max(self.Hd)
        return self


def objective(W: torch.Tensor, W_d: torch.Tensor, H: torch.Tensor, l1_abs: float = 0.0, l2_abs: float = 0.0) -> float:
    """f(W) = tr((W - W_d) H (W - W_d)^T) + l2_abs |W|^2 + l1_abs |W|_1."""
    D = W - W_d
    return float(((D @ H) * D).sum() + l2_abs * (W * W).sum() + l1_abs * W.abs().sum())


def regularizer_scale(W_d: torch.Tensor, H: torch.Tensor, l1: float, l2: float) -> tuple[float, float]:
    """(l1_abs, l2_abs) from the relative l1, l2 (module docstring)."""
    h = float(H.diagonal().mean())
    rms = float(W_d.float().pow(2).mean().sqrt())
    return l1 * h * rms, l2 * h


def redense(
    W_start: torch.Tensor,
    W_d: torch.Tensor,
    H: torch.Tensor,
    l1_abs: float,
    l2_abs: float,
    iters: int,
    lam: float | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Phase 2: FISTA on f(W) from W_start; every weight is trainable again.

    Each iteration is one GEMM (Y - W_d) @ H and one fused :func:`sdsx.ops.prox_step`. ``shift``
    (see :func:`dense_target_shift`) adds a constant to the gradient: the dense-target variant.
    """
    if iters < 1:
        raise ValueError("iters must be >= 1")
    W_d = W_d.float()
    step = 1.0 / lipschitz(H, l2_abs, lam)
    W = W_start.float().clone()
    Y = W.clone()
    t = 1.0
    for _ in range(iters):
        G = (Y - W_d) @ H if shift is None else torch.addmm(shift, Y - W_d, H)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        W, Y = ops.prox_step(Y, W, G, step, l1_abs, l2_abs, (t - 1.0) / t_next)
        t = t_next
    return W


def dense_target_shift(W_d: torch.Tensor, H: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The gradient offset of the dense-target objective.

    With X (T, in) the layer's inputs in the pruned model, X_d the dense model's, H = X^T X / T and
    C = X^T X_d / T: ||X W^T - X_d W_d^T||^2 / T = tr(W H W^T) - 2 tr(W C W_d^T) + const, whose
    gradient 2 (W H - W_d C^T) is 2 ((W - W_d) H + B) with B = W_d (H - C^T). So the same-input
    solvers handle it by adding B to every gradient; B = 0 when X_d = X.
    """
    return W_d.to(H.dtype) @ (H - C.t())


def target_error(W_d: torch.Tensor, W: torch.Tensor, H: torch.Tensor, shift: torch.Tensor | None) -> float:
    """The calibration error phases 2/3 minimise: tr(D H D^T), D = W - W_d, plus, for the dense
    target, 2 tr(D B^T) (the dense-target error minus W_d's own, so it can be negative)."""
    err = reconstruction_error(W_d, W, H)
    if shift is not None:
        err += 2.0 * float(((W.to(shift.dtype) - W_d.to(shift.dtype)) * shift).sum())
    return err


class _BestIterate:
    """Early stopping on validation: remembers the offered iterate with the lowest
    tr(D H_val D^T); without ``H_val`` it keeps nothing and :meth:`result` returns the last."""

    def __init__(self, W_d: torch.Tensor, H_val: torch.Tensor | None, history: list[float] | None = None) -> None:
        self.W_d, self.H_val, self.history = W_d, H_val, history
        self.best: tuple[float, tuple] | None = None

    def offer(self, *iterate: torch.Tensor) -> None:
        if self.H_val is None:
            return
        err = reconstruction_error(self.W_d, iterate[0], self.H_val)
        if self.history is not None:
            self.history.append(err)
        if self.best is None or err < self.best[0]:
            self.best = (err, iterate)

    def result(self, *last: torch.Tensor) -> tuple:
        return self.best[1] if self.best is not None else last


def adjust(
    W_start: torch.Tensor,
    p: LayerProblem,
    iters: int,
    reselect: bool = True,
    score: str = "magnitude",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 3's weight adjustment: projected gradient on tr((W - W_d) H (W - W_d)^T) over W with
    the pattern ``p.spec``, H the damped ``p.shared.Hd`` (plus the dense-target ``p.shift``), the
    mask re-selected by magnitude at every iteration (through nm_mask / topk_mask) or kept fixed.
    ``score`` "activation" ranks |W_ij| sqrt(H_jj) instead of |W_ij|.

    With ``p.H_stop`` (the Gram of held-out inputs) it returns the iterate, the start included,
    whose error tr(D H_stop D^T) is lowest (early stopping on validation); ``p.history`` then
    receives every iterate's validation error. Returns (weights, mask)."""
    W_d, H, spec, shift = p.W_d.float(), p.shared.Hd, p.spec, p.shift
    step = 1.0 / lipschitz(H, 0.0, p.shared.lam)
    W = W_start.float().clone()
    mask = W != 0
    scale = H.diagonal().clamp_min(0).sqrt().unsqueeze(0) if score == "activation" else None
    best = _BestIterate(W_d, p.H_stop, p.history)
    best.offer(W, mask)
    for _ in range(iters):
        G = (W - W_d) @ H if shift is None else torch.addmm(shift, W - W_d, H)
        Z, _ = ops.prox_step(W, W, G, step, 0.0, 0.0, 0.0, None if reselect else mask)
        if reselect:
            mask = select_mask(Z.abs() if scale is None else Z.abs() * scale, spec, per_row=False)
            W = apply_mask(Z, mask)
        else:
            W = Z  # prox_step projected onto the fixed mask: the pruned entries are already zero
        best.offer(W, mask)
    return best.result(W, mask)


def final_adjust(W: torch.Tensor, mask: torch.Tensor, p: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 3's weight adjustment of ``W`` (with ``mask``) as ``p.opts`` asks: projected gradient
    with the mask re-selected every iteration (``reselect``, the paper's), else the CG refit on the
    fixed ``mask``; on the damped H, early-stopped on ``p.H_stop`` (``p.history`` receives the
    validation errors of the iterates scored; the returned weights' is its minimum)."""
    o = p.opts
    if o.reselect:
        return adjust(W, p, o.adjust_iters, True, o.adjust_score)
    return refit(W, p.W_d, p.shared.Hd, mask, o.adjust_iters, p.shift, p.H_stop, p.history), mask


def refit(
    W_start: torch.Tensor,
    W_d: torch.Tensor,
    H: torch.Tensor,
    mask: torch.Tensor,
    iters: int,
    shift: torch.Tensor | None = None,
    H_val: torch.Tensor | None = None,
    history: list[float] | None = None,
) -> torch.Tensor:
    """The adjustment with the mask fixed, run towards convergence: conjugate gradients on
    tr((W - W_d) H (W - W_d)^T) (+ 2 tr(W B^T) with a dense-target ``shift`` B) over the kept
    entries of every row. Rows are independent problems, so each row has its own step sizes; one
    (rows x in x in) GEMM per iteration, like a projected-gradient step, but CG needs about
    sqrt(condition number) iterations where the gradient step needs the condition number.

    With ``H_val``, returns whichever of the start and the last iterate has the lower validation
    error (``history`` receives both). Only those two are scored: each score costs a GEMM like a
    CG step, and CG lowers the (damped) fit error monotonically, so the intermediate iterates are
    rarely the best on validation (SmolLM2-135M, docs/sds.md)."""
    W_d = W_d.float()
    keep = mask.to(torch.float32)
    W = W_start.float() * keep
    G = (W - W_d) @ H if shift is None else torch.addmm(shift, W - W_d, H)
    R = -G * keep
    P = R.clone()
    rr = (R * R).sum(1)
    best = _BestIterate(W_d, H_val, history)
    if H_val is not None:
        best.offer(W.clone())  # W is updated in place below
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(iters):
        Q = (P @ H) * keep
        pq = (P * Q).sum(1)
        a = torch.where(pq > tiny, rr / pq.clamp_min(tiny), torch.zeros_like(rr))
        W.add_(a.unsqueeze(1) * P)
        R.sub_(a.unsqueeze(1) * Q)
        rr_new = (R * R).sum(1)
        beta = torch.where(rr > tiny, rr_new / rr.clamp_min(tiny), torch.zeros_like(rr))
        P = R + beta.unsqueeze(1) * P
        rr = rr_new
    best.offer(W)
    return best.result(W)[0]


def prune_once(
    pruner: str,
    W: torch.Tensor,
    H: torch.Tensor,
    spec: SparsitySpec,
    opts: SDSOptions,
    name: str,
    factor: FactorCache | None = None,
    need_loss: bool = True,
) -> PruneResult:
    """One pruning of ``W`` by the registered ``pruner`` with SDS's settings for it
    (:meth:`SDSOptions.pruner_settings`); ``factor`` is the run's shared SparseGPT factor cache;
    ``need_loss=False`` skips the error tr(D H D^T) (NaN), a GEMM the caller would not use."""
    entry = registry.get(pruner)
    return entry.solve(W, H, spec, opts.pruner_settings(pruner), registry.LayerContext(name, factor, need_loss))


# ------------------------------------------------------------------------------------ phases
@dataclass(frozen=True)
class LayerProblem:
    """What an SDS phase reads for one linear: its dense weights and the statistics it fits on.

    W_d: the dense weights (fp32). H: the Gram X X^T / T the phase fits on (fp32, on W_d's device).
    shared: the :class:`SharedH` of ``H`` (damped H, its largest eigenvalue, SparseGPT's factor).
    shift: the dense-target gradient offset (:func:`dense_target_shift`), or None.
    H_stop: the Gram of held-out windows the adjustment's early stop scores iterates on, or None.
    history: receives the validation errors the early stop measured (an output channel), or None.
    need_loss: whether a pruning phase reports its error tr(D H D^T) (else NaN).
    """

    W_d: torch.Tensor
    H: torch.Tensor
    spec: SparsitySpec
    opts: SDSOptions
    shared: SharedH
    name: str = "layer"
    shift: torch.Tensor | None = None
    H_stop: torch.Tensor | None = None
    history: list[float] | None = None
    need_loss: bool = False

    @classmethod
    def build(cls, W_d: torch.Tensor, H: torch.Tensor, spec: SparsitySpec | str | float, opts: SDSOptions | None = None,
              **fields: Any) -> LayerProblem:
        """A problem from plain tensors: ``spec`` parsed, ``shared`` computed from ``H`` with
        ``opts``' damping (``SDSOptions(damp=0)`` fits on H itself), other fields by keyword."""
        opts = opts or SDSOptions()
        return cls(W_d.float(), H, SparsitySpec.parse(spec), opts, SharedH(opts)(H), **fields)


PhaseFn = Callable[[LayerProblem, torch.Tensor, torch.Tensor], PruneResult]


@dataclass(frozen=True)
class Phase:
    """A registered SDS phase: ``run(problem, weight, mask) -> PruneResult`` from the weights the
    previous phase left (and their mask), without modifying them.

    name: its error's key in :attr:`SDSLayerResult.errors` and in the reports.
    enabled: whether the options run it (a phase that does not run passes its input on).
    sparse: whether its output holds the sparsity pattern (the re-dense phase's does not).
    summary: one line for the docs.
    """

    name: str
    run: PhaseFn
    enabled: Callable[[SDSOptions], bool]
    sparse: bool
    summary: str


PHASES: dict[str, Phase] = {}


def register_phase(phase: Phase) -> Phase:
    """Add ``phase`` to :data:`PHASES` (run in registration order; a name is registered once)."""
    if phase.name in PHASES and PHASES[phase.name] is not phase:
        raise ValueError(f"an SDS phase named {phase.name!r} is already registered")
    PHASES[phase.name] = phase
    return phase


def _prune_phase(p: LayerProblem, W: torch.Tensor, mask: torch.Tensor | None) -> PruneResult:
    """Phases 1 and 3's pruning: the registered pruner on ``W`` with SDS's settings for it."""
    return prune_once(p.opts.pruner, W, p.H, p.spec, p.opts, p.name, p.shared.factor, need_loss=p.need_loss)


def _redense_phase(p: LayerProblem, W: torch.Tensor, mask: torch.Tensor | None) -> PruneResult:
    """Phase 2: FISTA from the pruned weights on the damped fit with the relative regularizers."""
    l1_abs, l2_abs = regularizer_scale(p.W_d, p.H, p.opts.l1, p.opts.l2)
    new = redense(W, p.W_d, p.shared.Hd, l1_abs, l2_abs, p.opts.dense_iters, p.shared.lam, p.shift)
    return PruneResult(new, torch.ones_like(new, dtype=torch.bool), float("nan"))


def _adjust_phase(p: LayerProblem, W: torch.Tensor, mask: torch.Tensor) -> PruneResult:
    """Phase 3's weight adjustment (:func:`final_adjust`), early-stopped on ``H_stop`` if given."""
    new, new_mask = final_adjust(W.float(), mask.to(p.W_d.device), p)
    return PruneResult(new, new_mask, float("nan"))


register_phase(Phase("sparse", _prune_phase, lambda o: True, True, "phase 1: the one-shot pruner on the dense weights"))
register_phase(Phase("dense", _redense_phase, lambda o: o.redense, False, "phase 2: re-dense (FISTA towards the dense outputs)"))
register_phase(Phase("sparse2", _prune_phase, lambda o: o.redense, True, "phase 3: the pruner again on the re-dense weights"))
register_phase(Phase("adjust", _adjust_phase, lambda o: o.adjust, True, "phase 3: adjust the kept weights"))


def tail_phases(opts: SDSOptions) -> list[Phase]:
    """The phases after phase 1 that ``opts`` run, in order."""
    return [p for name, p in PHASES.items() if name != "sparse" and p.enabled(opts)]


def run_phases(
    p: LayerProblem, phases: list[Phase], W: torch.Tensor, mask: torch.Tensor | None, errors: dict[str, float],
    snaps: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``phases`` in order from ``W`` (and its ``mask``); ``errors[phase.name]`` receives each
    phase's error to the dense weights (:func:`target_error` on ``p.H``: a pruning phase
    compensates towards the re-dense weights, the error is measured to the dense ones), and
    ``snaps["redense"]``, when given, a copy of the weights a dense phase left. Returns the last
    phase's (fp32 weights, mask)."""
    for phase in phases:
        out = phase.run(p, W, mask)
        W, mask = out.weight.float(), out.mask
        errors[phase.name] = target_error(p.W_d, W, p.H, p.shift)
        if snaps is not None and not phase.sparse:
            snaps["redense"] = W.cpu().clone()
    return W, mask


@dataclass(frozen=True)
class LayerCall:
    """How one :func:`sds_layer` / :func:`sds_tail` call runs, beside its tensors.

    name: the linear's qualified name (for messages and the pruner's context).
    keep_weights: also return a copy of the weights after each phase (the histograms).
    shared: what the linears with the same H share (pass one :class:`SharedH` for a whole run);
        None computes everything for this layer alone.
    shared_fit: the same for the H_fit matrices of a ``split``.
    """

    name: str = "layer"
    keep_weights: bool = False
    shared: SharedH | None = None
    shared_fit: SharedH | None = None


@dataclass
class SDSLayerResult:
    """The final result plus what each phase did to the layer (errors are tr(D H D^T))."""

    result: PruneResult
    errors: dict  # phase -> calibration error
    kept_phase1: bool
    weights: dict | None = None  # phase -> weight copy, only when asked (histograms)
    phase1: torch.Tensor | None = None  # phase 1's weights (what a block guard may fall back to)


@exact_fp32()
def sds_layer(
    W_d: torch.Tensor,
    H: torch.Tensor,
    spec: SparsitySpec | str | float,
    opts: SDSOptions = SDSOptions(),
    call: LayerCall = LayerCall(),
    C: torch.Tensor | None = None,
    split: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SDSLayerResult:
    """Sparse -> dense -> sparse for one linear layer (weight (out, in), H = X X^T / T).

    ``call`` names the layer and carries what linears with the same H share (:class:`LayerCall`).
    ``C`` (the cross Gram X^T X_d / T) switches phases 2/3 to the dense model's outputs as targets.
    ``split`` = (H_fit, H_val): phase 1 prunes on H (all calibration windows, so it equals the base
    pruner), phases 2/3 fit on H_fit alone and the guard compares on H_val (windows they never saw).
    """
    spec = SparsitySpec.parse(spec)
    opts.validate()
    Wd = W_d.float()
    H = H.to(Wd.device).float()
    sh = (call.shared or SharedH(opts))(H)
    # with held-out windows or a dense target, sds_tail measures phase 1's error itself
    first = LayerProblem(Wd, H, spec, opts, sh, call.name, need_loss=split is None and C is None)
    s1 = PHASES["sparse"].run(first, Wd, None)
    if split is not None:
        H_fit, H_val = (h.to(Wd.device).float() for h in split)
        fit_call = LayerCall(call.name, call.keep_weights, (call.shared_fit or SharedH(opts))(H_fit))
        return sds_tail(W_d, s1, H_fit, spec, opts, fit_call, C, H_val)
    return sds_tail(W_d, s1, H, spec, opts, LayerCall(call.name, call.keep_weights, sh), C)


@exact_fp32()
def sds_tail(
    W_d: torch.Tensor,
    s1: PruneResult,
    H: torch.Tensor,
    spec: SparsitySpec | str | float,
    opts: SDSOptions = SDSOptions(),
    call: LayerCall = LayerCall(),
    C: torch.Tensor | None = None,
    H_val: torch.Tensor | None = None,
) -> SDSLayerResult:
    """The phases after phase 1 (:func:`tail_phases`) of one layer, given phase 1's result ``s1``:
    re-dense, prune again, adjust, and keep phase 1's weights where they were better
    (``opts.keep_better``): on ``H_val`` (the Gram of held-out windows) when given, else on the H
    the phases fitted. ``errors`` holds each phase's calibration error and, with ``H_val``,
    "val_sparse" / "val_final" (phase 1's and the final weights' validation errors).

    A pure function of its arguments, so layers can be spread over processes
    (:mod:`sdsx.parallel`) and give the same weights wherever they run.
    """
    spec = SparsitySpec.parse(spec)
    dtype = W_d.dtype
    Wd = W_d.float()
    H = H.to(Wd.device).float()
    sh = (call.shared or SharedH(opts))(H)
    name, keep_weights = call.name, call.keep_weights
    s1w = s1.weight.to(Wd.device).float()
    Hv = H_val.to(Wd.device).float() if H_val is not None else None
    shift = dense_target_shift(Wd, H, C.to(Wd.device).float()) if C is not None else None
    if shift is not None and opts.alpha != 1.0:
        shift = shift * opts.alpha
    s1_loss = target_error(Wd, s1w, H, shift) if (shift is not None or H_val is not None) else float(s1.loss)
    errors: dict[str, float] = {"sparse": s1_loss}
    snaps: dict[str, torch.Tensor] = {}
    if keep_weights:
        snaps["dense"] = Wd.cpu().clone()
        snaps["sparse"] = s1w.cpu().clone()
    scored: list[float] = []  # validation errors the early stop measured
    problem = LayerProblem(Wd, H, spec, opts, sh, name, shift, Hv if opts.early_stop else None, scored)
    phases = tail_phases(opts)
    final_w, final_mask = run_phases(problem, phases, s1w, s1.mask.to(Wd.device), errors, snaps if keep_weights else None)
    final_err = errors[phases[-1].name] if phases else s1_loss
    kept = False
    if Hv is not None:
        errors["val_sparse"] = reconstruction_error(Wd, s1w, Hv)
        # the early stop has scored the weights it returned
        errors["val_final"] = min(scored) if scored else reconstruction_error(Wd, final_w, Hv)
        worse = errors["val_final"] > errors["val_sparse"]
    else:
        worse = final_err > s1_loss
    errors["mask_agreement"] = float((final_mask.to(Wd.device) == s1.mask.to(Wd.device)).float().mean())
    if opts.keep_better and worse:
        final_w, final_mask, final_err, kept = s1w, s1.mask.to(Wd.device), s1_loss, True
    if keep_weights:
        snaps["final"] = final_w.cpu().clone()
    result = PruneResult(final_w.to(dtype), final_mask, final_err)
    return SDSLayerResult(result, errors, kept, snaps if keep_weights else None, s1w.to(dtype))


def redense_tokens(
    W_start: torch.Tensor,
    W_d: torch.Tensor,
    X: torch.Tensor,
    l1_abs: float,
    l2_abs: float,
    iters: int,
    lr: float | None = None,
) -> torch.Tensor:
    """The paper's formulation of phase 2 as plain (sub)gradient descent over the calibration
    tokens X (T, in): every step forms W_d X - W X over all T tokens. It minimises the same f as
    :func:`redense` (H = X^T X / T) and is kept as the reference that the Gram path is measured
    against; it costs O(T) per step instead of O(in)."""
    X = X.float()
    W_d = W_d.float()
    T = X.shape[0]
    Yd = X @ W_d.t()
    if lr is None:
        H = X.t() @ X / T
        lr = 1.0 / lipschitz(H, l2_abs)
    W = W_start.float().clone().requires_grad_(True)
    for _ in range(iters):
        R = X @ W.t() - Yd
        loss = (R * R).sum() / T + l2_abs * (W * W).sum()
        (grad,) = torch.autograd.grad(loss, W)
        with torch.no_grad():
            Z = W - lr * grad
            W.copy_(torch.sign(Z) * torch.clamp(Z.abs() - lr * l1_abs, min=0))
    return W.detach()
