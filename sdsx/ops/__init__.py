"""The sdsx ops: argument checks, then the native kernel (torch.ops.sdsx.*) or the reference.

Each wrapper validates its inputs with errors that say what to change, never mutates its
arguments, and runs the extension's kernel for the tensor's device when there is one; otherwise the
pure-PyTorch reference in :mod:`sdsx.ops.reference` runs (the extension loader warns once).
"""

from __future__ import annotations

import torch

from sdsx import _ext
from sdsx.numerics import all_finite, exact_fp32
from sdsx.ops import reference

__all__ = ["gram_upper_", "sq_colsum_", "nm_mask", "topk_mask", "obs_sweep", "prox_step", "reference"]

_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_float(name: str, t: torch.Tensor, dtypes=_FLOAT_TYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} holds {bad} non-finite value(s) (NaN or Inf); fix the input before pruning")


def _check_nm(n: int, m: int, cols: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)):
        raise TypeError(f"n and m must be ints, got n={n!r}, m={m!r}")
    if m <= 0 or n < 0 or n > m:
        raise ValueError(f"N:M needs 0 <= n <= m and m >= 1, got {n}:{m} (n is the number kept per group of m)")
    if cols % m != 0:
        raise ValueError(f"N:M with m={m} needs the number of columns to be a multiple of m, got {cols} columns")


def _check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be a fraction in [0, 1), got {sparsity!r} (e.g. 0.5 for 50%)")


def _native(op: str, t: torch.Tensor) -> bool:
    return _ext.has_kernel(op, t.device.type)


def _call_native(op: str, *args):
    # The kernels check finiteness in the pass that reads their inputs (a separate torch.isfinite
    # pass costs more than the sweep's own bookkeeping) and raise ValueError like the wrappers.
    return getattr(torch.ops.sdsx, op)(*args)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask of the ``n`` largest scores in every group of ``m`` consecutive entries.

    Groups run along the last dimension (the input dimension of an (out, in) weight). Among equal
    scores the lower index is kept, so the result is deterministic on tied weights.

    Args:
        scores: float tensor (..., cols); cols must be a multiple of ``m``.
        n: entries kept per group (2 for 2:4).
        m: group size.
    Returns:
        bool tensor of ``scores``' shape, True = keep; exactly ``n`` True per group.
    """
    _check_float("scores", scores)
    if scores.dim() < 1:
        raise ValueError("scores must have at least one dimension")
    _check_nm(n, m, scores.shape[-1])
    if _native("nm_mask", scores):
        return _call_native("nm_mask", scores, n, m)
    _check_finite("scores", scores)
    return reference.nm_mask(scores, n, m)


def topk_mask(scores: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Keep-mask pruning exactly ``int(sparsity * len)`` lowest scores per row or per tensor.

    Args:
        scores: float tensor.
        sparsity: fraction pruned, in [0, 1).
        per_row: select within each row of the last dimension (Wanda) or over the whole tensor.
    Returns:
        bool tensor, True = keep. Among equal scores the lower (flat) index is kept.
    """
    _check_float("scores", scores)
    _check_sparsity(sparsity)
    if scores.dim() < 1:
        raise ValueError("scores must have at least one dimension")
    if _native("topk_mask", scores):
        return _call_native("topk_mask", scores, float(sparsity), bool(per_row))
    _check_finite("scores", scores)
    return reference.topk_mask(scores, float(sparsity), bool(per_row))


@exact_fp32()
def obs_sweep(
    W: torch.Tensor,
    U: torch.Tensor,
    sparsity: float = 0.0,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SparseGPT column sweep: prune W and compensate with the OBS update.

    Args:
        W: weight (rows, cols) in fp32/fp16/bf16; not modified.
        U: upper Cholesky factor of the damped inverse Hessian (cols, cols), fp32
            (see :func:`sdsx.pruners.sparsegpt.inverse_hessian_factor`).
        sparsity: unstructured fraction pruned in every block of ``blocksize`` columns
            (ignored when ``m`` > 0).
        n, m: N:M pattern (keep n of every m along cols), chosen every m columns from the
            compensated weights; 0, 0 for unstructured.
        blocksize: columns per lazy batch update; a multiple of m for N:M.
    Returns:
        (new weight in W's dtype with exact zeros, keep-mask, per-row loss (rows,) fp32 equal to
        diag((W - W_new) H (W - W_new)^T) for the H that U factors).
    """
    _check_float("W", W)
    _check_float("U", U, (torch.float32,))
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (out, in), got shape {tuple(W.shape)}")
    cols = W.shape[1]
    if U.shape != (cols, cols):
        raise ValueError(f"U must be ({cols}, {cols}) to match W's {cols} columns, got {tuple(U.shape)}")
    if U.device != W.device:
        raise ValueError(f"W is on {W.device} but U is on {U.device}; move both to one device")
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if m:
        _check_nm(n, m, cols)
        if m > 64:
            raise ValueError(f"obs_sweep supports groups of up to m=64 columns, got m={m}")
        if blocksize % m:
            raise ValueError(f"blocksize ({blocksize}) must be a multiple of m ({m}) so that no group straddles two blocks")
    else:
        _check_sparsity(sparsity)
    if _native("obs_sweep", W):
        return _call_native("obs_sweep", W, U, float(sparsity), int(n), int(m), int(blocksize))
    _check_finite("W", W)
    _check_finite("U", U)
    return reference.obs_sweep(W, U, float(sparsity), int(n), int(m), int(blocksize))


def prox_step(
    Y: torch.Tensor,
    W_prev: torch.Tensor,
    G: torch.Tensor,
    step: float,
    l1: float,
    l2: float,
    momentum: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused elementwise tail of one FISTA step after the GEMM ``G = (Y - Wd) @ H``.

    Computes ``Z = Y - step * (2 G + 2 l2 Y)``, then ``W_next = soft_threshold(Z, step * l1)``
    (or ``Z`` projected onto ``mask`` when given) and ``Y_next = W_next + momentum (W_next - W_prev)``.
    All tensors fp32 and of one shape and device.
    """
    for name, t in (("Y", Y), ("W_prev", W_prev), ("G", G)):
        _check_float(name, t, (torch.float32,))
        if t.shape != Y.shape or t.device != Y.device:
            raise ValueError(f"{name} must match Y's shape {tuple(Y.shape)} and device {Y.device}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != Y.shape or mask.device != Y.device):
        raise ValueError("mask must be a bool tensor of Y's shape on Y's device")
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    if l1 < 0 or l2 < 0:
        raise ValueError(f"l1 and l2 must be >= 0, got l1={l1}, l2={l2}")
    if _native("prox_step", Y):
        return _call_native("prox_step", Y, W_prev, G, float(step), float(l1), float(l2), float(momentum), mask)
    return reference.prox_step(Y, W_prev, G, float(step), float(l1), float(l2), float(momentum), mask)


def gram_upper_(C: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """In place ``C += X^T X`` on (at least) the upper triangle of ``C``; returns ``C``.

    The statistics' hot loop: H = X^T X is symmetric, so only its upper triangle is worth
    computing. On the CPU the native kernel skips every register tile below the diagonal (half the
    flops of a GEMM; 1.02x and 1.11x the speed of the reference's row-blocked GEMMs at 576 and 1536
    features in bench/results/kernels.md, and the whole pipeline's statistics took 8% less time);
    elsewhere, and without the extension, the reference does row-blocked GEMMs. Entries
    below the diagonal are partly updated either way: read only the upper triangle.

    Args:
        C: (features, features) float32 with unit column stride, updated in place.
        X: (tokens, features) float32.
    """
    if X.dim() != 2 or C.dim() != 2 or C.shape != (X.shape[1], X.shape[1]):
        raise ValueError(f"need X (tokens, features) and C (features, features), got {tuple(X.shape)} and {tuple(C.shape)}")
    if X.dtype != torch.float32 or C.dtype != torch.float32:
        raise TypeError(f"X and C must be float32, got {X.dtype} and {C.dtype}")
    if X.device != C.device:
        raise ValueError(f"X is on {X.device} but C is on {C.device}")
    if C.stride(1) != 1:
        raise ValueError("C must have unit column stride (a row-major matrix or a row slice of one)")
    # CPU only: on a GPU the library GEMM is the right tool, and the reference is exactly that.
    if X.device.type == "cpu" and _native("gram_upper_", X):
        return _call_native("gram_upper_", C, X)
    return reference.gram_upper_(C, X)


def sq_colsum_(acc: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """In place ``acc += (X * X).sum(0)``, the diagonal of ``X^T X``; returns ``acc``.

    The statistics of Wanda and activation-scored magnitude need only the Gram's diagonal (the
    squared input column norms). On the CPU the native kernel streams X once (float sums over 64
    tokens, added up in doubles) instead of writing and rereading the squares; elsewhere, and
    without the extension, the reference does exactly the expression above.

    Args:
        acc: (features,) float32, contiguous, updated in place.
        X: (tokens, features) float32.
    """
    if X.dim() != 2 or acc.dim() != 1 or acc.shape[0] != X.shape[1]:
        raise ValueError(f"need X (tokens, features) and acc (features,), got {tuple(X.shape)} and {tuple(acc.shape)}")
    if X.dtype != torch.float32 or acc.dtype != torch.float32:
        raise TypeError(f"X and acc must be float32, got {X.dtype} and {acc.dtype}")
    if X.device != acc.device:
        raise ValueError(f"X is on {X.device} but acc is on {acc.device}")
    if not acc.is_contiguous():
        raise ValueError("acc must be contiguous")
    if X.device.type == "cpu" and _native("sq_colsum_", X):
        return _call_native("sq_colsum_", acc, X)
    return reference.sq_colsum_(acc, X)
