"""Streaming layer statistics: the Gram matrix H = X X^T / T (SparseGPT's Hessian up to a factor 2)."""

from __future__ import annotations

import torch

from sdsx import ops
from sdsx.numerics import all_finite

__all__ = ["CrossGram", "GramAccumulator"]

#: Inputs are gathered into chunks of up to this many bytes before one X X^T GEMM. Measured on one
#: CPU core (576 and 1536 features, 16384 tokens): 512-token updates ran at 50-60% of the GEMM's
#: speed with 2048-4096 tokens; the chunk costs one copy of the inputs, which is noise next to it.
CHUNK_BYTES = 32 << 20
MAX_CHUNK_TOKENS = 4096
#: Below this many features the full X^T X is one GEMM; from here on only the upper triangle is
#: accumulated (:func:`sdsx.ops.gram_upper_`) and ``finalize()`` mirrors it.
UPPER_FROM = 256


class GramAccumulator:
    """Running sum of x x^T over calibration tokens, in fp32; ``finalize()`` divides by the count.

    ``diag_only=True`` keeps only the diagonal (all Wanda needs: ||X_j||^2 / T). Full Gram updates
    are buffered into chunks of up to ``chunk_tokens`` rows (default: what fits in 32 MiB, at most
    4096) so that the GEMM runs at full speed whatever batch size the caller feeds.
    """

    def __init__(
        self, columns: int, device: torch.device | str = "cpu", diag_only: bool = False, chunk_tokens: int | None = None
    ) -> None:
        if columns < 1:
            raise ValueError(f"columns must be positive, got {columns}")
        self.columns = columns
        self.diag_only = diag_only
        shape = (columns,) if diag_only else (columns, columns)
        self.sum = torch.zeros(shape, dtype=torch.float32, device=device)
        self.tokens = 0
        if chunk_tokens is None:
            chunk_tokens = min(MAX_CHUNK_TOKENS, max(1, CHUNK_BYTES // (4 * columns)))
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens
        self._buf: torch.Tensor | None = None  # (chunk_tokens, columns), allocated on first use
        self._filled = 0
        self._result: torch.Tensor | None = None  # set by finalize()

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs x (..., columns) of any float dtype."""
        if x.shape[-1] != self.columns:
            raise ValueError(f"expected inputs with {self.columns} features, got {x.shape[-1]}")
        if self._result is not None:
            raise RuntimeError("this accumulator was finalized; start a new one for more inputs")
        # No finiteness check here (it cost 15% of the accumulation): a NaN/Inf input makes its
        # diagonal entry of H non-finite, which finalize() checks.
        x = x.reshape(-1, self.columns)
        self.tokens += x.shape[0]
        if self.diag_only:
            ops.sq_colsum_(self.sum, x.to(device=self.sum.device, dtype=torch.float32))
            return
        if x.shape[0] >= self.chunk_tokens and self._filled == 0:
            self._add_gram(x.to(device=self.sum.device, dtype=torch.float32))
            return
        if self._buf is None:
            self._buf = torch.empty(self.chunk_tokens, self.columns, dtype=torch.float32, device=self.sum.device)
        start = 0
        while start < x.shape[0]:
            take = min(x.shape[0] - start, self.chunk_tokens - self._filled)
            # copy_ converts dtype and device, and decouples the buffer from the caller's tensor
            self._buf[self._filled : self._filled + take].copy_(x[start : start + take])
            self._filled += take
            start += take
            if self._filled == self.chunk_tokens:
                self._flush()

    def _flush(self) -> None:
        if self._filled:
            self._add_gram(self._buf[: self._filled])
            self._filled = 0

    def _add_gram(self, x: torch.Tensor) -> None:
        # H is symmetric: from UPPER_FROM features on, accumulate only its upper triangle (the
        # native kernel on the CPU); finalize() mirrors it.
        if self.columns < UPPER_FROM:
            self.sum.addmm_(x.t(), x)
        else:
            ops.gram_upper_(self.sum, x)

    def finalize(self) -> torch.Tensor:
        """H = sum x x^T / T (or its diagonal). Releases the chunk buffer; the running sum becomes H
        in place (no copy of a c x c matrix), so the accumulator takes no more updates and a second
        call returns the same tensor."""
        if self._result is not None:
            return self._result
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens were seen by this layer")
        if not self.diag_only:
            self._flush()
            self._buf = None
        diag = self.sum if self.diag_only else torch.diagonal(self.sum)
        if not all_finite(diag):
            bad = int((~torch.isfinite(diag)).sum())
            raise FloatingPointError(f"non-finite values (NaN/Inf, or overflow of x^2) in {bad} of the layer's {self.columns} input features")
        S = self.sum
        if not self.diag_only and self.columns >= UPPER_FROM:
            # only the upper triangle was accumulated: mirror it (the transposed strict upper part
            # is materialised before it is added, so S is never read and written at once)
            S.triu_()
            S.add_(S.mT.tril(-1))
        self._result = S.div_(self.tokens)
        return self._result


class CrossGram:
    """Running mean of x x_d^T over paired tokens: C = X^T X_d / T, with X the layer's inputs in the
    pruned model and X_d the same tokens' inputs in the dense model (the dense-target variant)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.columns = columns
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor, x_dense: torch.Tensor) -> None:
        """Add a batch of paired inputs (..., columns) each."""
        if x.shape != x_dense.shape or x.shape[-1] != self.columns:
            raise ValueError(f"paired inputs must both be (..., {self.columns}), got {tuple(x.shape)} and {tuple(x_dense.shape)}")
        x = x.reshape(-1, self.columns).to(device=self.sum.device, dtype=torch.float32)
        xd = x_dense.reshape(-1, self.columns).to(device=self.sum.device, dtype=torch.float32)
        self.sum.addmm_(x.t(), xd)
        self.tokens += x.shape[0]

    def finalize(self) -> torch.Tensor:
        if self.tokens == 0:
            raise RuntimeError("no paired calibration tokens were seen by this layer")
        if not all_finite(self.sum):
            raise FloatingPointError("non-finite values in the cross Gram matrix of the pruned and dense inputs")
        return self.sum / self.tokens
