"""Fake (meta) implementations of the sdsx ops, so torch.compile and FakeTensor can trace them."""

from __future__ import annotations

import torch


def register() -> None:
    """Register the fakes; called once after the extension has loaded."""

    @torch.library.register_fake("sdsx::nm_mask")
    def _nm_mask(scores, n, m):
        torch._check(m > 0 and 0 <= n <= m, lambda: f"nm_mask: need 0 <= n <= m, got {n}:{m}")
        torch._check(scores.shape[-1] % m == 0, lambda: "nm_mask: last dimension must be a multiple of m")
        return torch.empty_like(scores, dtype=torch.bool)

    @torch.library.register_fake("sdsx::topk_mask")
    def _topk_mask(scores, sparsity, per_row):
        torch._check(0.0 <= sparsity < 1.0, lambda: "topk_mask: sparsity must be in [0, 1)")
        return torch.empty_like(scores, dtype=torch.bool)

    @torch.library.register_fake("sdsx::obs_sweep")
    def _obs_sweep(W, U, sparsity, n, m, blocksize):
        torch._check(W.dim() == 2, lambda: "obs_sweep: W must be 2-D")
        torch._check(U.shape == (W.shape[1], W.shape[1]), lambda: "obs_sweep: U must be cols x cols")
        return (
            torch.empty_like(W),
            torch.empty_like(W, dtype=torch.bool),
            W.new_empty((W.shape[0],), dtype=torch.float32),
        )

    @torch.library.register_fake("sdsx::prox_step")
    def _prox_step(Y, W_prev, G, step, l1, l2, momentum, mask):
        torch._check(Y.shape == W_prev.shape and Y.shape == G.shape, lambda: "prox_step: shapes differ")
        return torch.empty_like(Y), torch.empty_like(Y)

    @torch.library.register_fake("sdsx::gram_upper_")
    def _gram_upper_(C, X):
        torch._check(X.dim() == 2 and C.shape == (X.shape[1], X.shape[1]), lambda: "gram_upper_: C must be features x features")
        return C

    @torch.library.register_fake("sdsx::sq_colsum_")
    def _sq_colsum_(acc, X):
        torch._check(X.dim() == 2 and acc.shape == (X.shape[1],), lambda: "sq_colsum_: acc must have X's features")
        return acc
