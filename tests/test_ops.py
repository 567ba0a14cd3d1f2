"""The native ops against their pure-PyTorch references, the theory, and torch.library's checks."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import sdsx
from sdsx import ops
from sdsx.ops import reference as ref
from sdsx.pruners import inverse_hessian_factor

NM = [(2, 4), (4, 8), (1, 4)]
SPARSITIES = [0.3, 0.5, 0.7]


def _native() -> bool:
    return sdsx.backend_info()["extension_loaded"]


def _problem(rows: int, cols: int, tokens: int | None = None, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g).to(dtype)
    X = torch.randn(tokens or 2 * cols, cols, generator=g) * torch.rand(cols, generator=g).add(0.1)
    H = X.t() @ X / X.shape[0]
    return W, X, H


def test_extension_loaded_when_required():
    # CI sets SDSX_REQUIRE_EXTENSION: then the ops must come from the extension, never the fallback.
    info = sdsx.backend_info()
    if os.environ.get("SDSX_REQUIRE_EXTENSION"):
        assert info["extension_loaded"], info["extension_error"]
        assert set(info["ops"]) >= {"nm_mask", "topk_mask", "obs_sweep", "prox_step", "gram_upper_"}
        assert info["openmp"]


# ---------------------------------------------------------------- nm_mask / topk_mask


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("shape", [(7, 16), (33, 64), (3, 5, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nm_mask_matches_reference_and_is_valid(n, m, shape, dtype):
    scores = torch.randn(shape).to(dtype)
    got = ops.nm_mask(scores, n, m)
    assert got.dtype == torch.bool and got.shape == scores.shape
    assert torch.equal(got, ref.nm_mask(scores, n, m))
    assert (got.reshape(-1, m).sum(-1) == n).all()
    # the kept entries are the largest of their group
    s = scores.float().reshape(-1, m)
    k = got.reshape(-1, m)
    kept_min = torch.where(k, s, torch.full_like(s, float("inf"))).min(-1).values
    pruned_max = torch.where(~k, s, torch.full_like(s, float("-inf"))).max(-1).values
    assert (kept_min >= pruned_max).all()


def test_nm_mask_ties_keep_lower_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0]])
    assert ops.nm_mask(scores, 2, 4).tolist() == [[True, True, False, False, False, True, True, False]]
    assert ref.nm_mask(scores, 2, 4).tolist() == [[True, True, False, False, False, True, True, False]]
    assert ops.nm_mask(torch.zeros(2, 8), 1, 4).tolist() == [[True, False, False, False] * 2] * 2


@pytest.mark.parametrize("sparsity", SPARSITIES + [0.0])
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("shape", [(9, 37), (64, 128)])
def test_topk_mask_matches_reference_and_count(sparsity, per_row, shape):
    scores = torch.randn(shape)
    got = ops.topk_mask(scores, sparsity, per_row)
    assert torch.equal(got, ref.topk_mask(scores, sparsity, per_row))
    if per_row:
        assert (got.sum(-1) == shape[1] - int(sparsity * shape[1])).all()
    else:
        assert int(got.sum()) == got.numel() - int(sparsity * got.numel())


def test_topk_mask_ties_keep_lower_index():
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert ops.topk_mask(scores, 0.5, per_row=True).tolist() == [[True, True, False, False], [True, True, False, False]]
    assert ops.topk_mask(scores, 0.5, per_row=False).tolist() == [[True, True, True, True], [False, False, False, False]]
    # quantized weights with many exact ties (like SmolLM2's 4-bit blocks) give identical masks
    q = torch.randint(-3, 4, (48, 96)).float()
    assert torch.equal(ops.topk_mask(q.abs(), 0.5, False), ref.topk_mask(q.abs(), 0.5, False))
    assert torch.equal(ops.nm_mask(q.abs(), 2, 4), ref.nm_mask(q.abs(), 2, 4))



def _hard_rows(length: int) -> dict[str, torch.Tensor]:
    """Rows that trouble a quickselect: sorted either way, organ pipe, few values, constant, +-0."""
    i = torch.arange(length, dtype=torch.float32)
    g = torch.Generator().manual_seed(length)
    return {
        "ascending": i,
        "descending": i.flip(0),
        "organ_pipe": torch.minimum(i, length - 1 - i),
        "few_values": torch.randint(0, 3, (length,), generator=g).float(),
        "constant": torch.full((length,), 2.5),
        "signed_zeros": torch.where(torch.rand(length, generator=g) < 0.5, -0.0, 0.0) + (i % 4 == 0) * 1.0,
        "negative": -torch.rand(length, generator=g),
        "heavy_tail": torch.rand(length, generator=g) ** 8,
    }


@pytest.mark.parametrize("length", [49, 577, 1536, 8193])
def test_topk_mask_on_hard_rows_matches_reference(length):
    """The native selection partitions rows longer than 48 entries (shorter ones go straight to
    nth_element); every adversarial order and tie pattern must give the reference's exact mask."""
    rows = _hard_rows(length)
    batch = torch.stack(list(rows.values()))
    for sparsity in (0.01, 0.5, 0.77, 0.99):
        for name, row in rows.items():
            assert torch.equal(ops.topk_mask(row, sparsity, True), ref.topk_mask(row, sparsity, True)), (name, sparsity)
        assert torch.equal(ops.topk_mask(batch, sparsity, True), ref.topk_mask(batch, sparsity, True)), sparsity
        assert torch.equal(ops.topk_mask(batch, sparsity, False), ref.topk_mask(batch, sparsity, False)), sparsity


# ---------------------------------------------------------------- obs_sweep

SWEEP_CASES = [
    # rows, cols, blocksize, (sparsity, n, m)
    *[(40, 96, 32, (s, 0, 0)) for s in SPARSITIES],
    *[(40, 96, 32, (0.0, n, m)) for n, m in NM],
    (24, 100, 32, (0.5, 0, 0)),  # columns not a multiple of the block size
    (24, 72, 32, (0.0, 2, 4)),  # 72 = 2 blocks of 32 + 8
    (17, 128, 128, (0.5, 0, 0)),
]


@pytest.mark.parametrize("rows,cols,blocksize,pattern", SWEEP_CASES)
def test_obs_sweep_matches_reference(rows, cols, blocksize, pattern):
    sparsity, n, m = pattern
    W, _, H = _problem(rows, cols)
    U, _, _ = inverse_hessian_factor(H, 0.01)
    got = ops.obs_sweep(W, U, sparsity, n, m, blocksize)
    want = ref.obs_sweep(W, U, sparsity, n, m, blocksize)
    assert torch.equal(got[1], want[1]), "masks differ"
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-6)
    new, mask, _ = got
    assert torch.equal(new == 0, ~mask | (W == 0)) or bool((new[~mask] == 0).all())
    assert bool((new[~mask] == 0).all()), "pruned entries must be exact zeros"
    if m:
        assert (mask.reshape(rows, -1, m).sum(-1) == n).all()
    else:
        # every block prunes exactly int(sparsity * rows * block) entries
        for i1 in range(0, cols, blocksize):
            blk = mask[:, i1 : i1 + blocksize]
            assert int((~blk).sum()) == int(sparsity * blk.numel())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", [(0.5, 0, 0), (0.0, 2, 4)])
def test_obs_sweep_low_precision_weights(dtype, pattern):
    W, _, H = _problem(32, 64, dtype=dtype)
    U, _, _ = inverse_hessian_factor(H, 0.01)
    new, mask, loss = ops.obs_sweep(W, U, *pattern, 32)
    want = ref.obs_sweep(W, U, *pattern, 32)
    assert new.dtype == dtype
    assert torch.equal(mask, want[1])
    torch.testing.assert_close(new, want[0])
    assert bool((new[~mask] == 0).all())
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("pattern", [(0.5, 0, 0), (0.7, 0, 0), (0.0, 2, 4), (0.0, 1, 4)])
def test_obs_loss_equals_true_reconstruction_error(pattern):
    # With U factoring exactly H = X X^T / T (no damping), the OBS estimate sum (w-q)^2 / U_jj^2 is
    # the exact error ||(W - W_new) X||^2 / T of the sequential sweep: E = e U and H = (U^T U)^-1.
    W, X, H = _problem(16, 64, tokens=512)
    U, _, _ = inverse_hessian_factor(H.double().float(), percdamp=0.0)
    new, _, loss = ops.obs_sweep(W, U, *pattern, 32)
    true = ((W - new) @ X.t()).pow(2).sum(1) / X.shape[0]
    torch.testing.assert_close(loss, true, rtol=2e-3, atol=1e-5)
    # with damping the estimate is an upper bound of the true error
    Ud, _, _ = inverse_hessian_factor(H, percdamp=0.1)
    new_d, _, loss_d = ops.obs_sweep(W, Ud, *pattern, 32)
    true_d = ((W - new_d) @ X.t()).pow(2).sum(1) / X.shape[0]
    assert bool((loss_d >= true_d * (1 - 1e-4)).all())


def test_obs_sweep_beats_magnitude_on_the_layer_error():
    W, X, H = _problem(64, 128, tokens=1024)
    U, _, _ = inverse_hessian_factor(H, 0.01)
    new, mask, _ = ops.obs_sweep(W, U, 0.5, 0, 0, 128)
    mag = W * ops.topk_mask(W.abs(), 0.5, per_row=False)
    err = lambda V: float(((W - V) @ X.t()).pow(2).sum())  # noqa: E731
    assert err(new) < 0.7 * err(mag)


def test_obs_sweep_does_not_mutate_inputs():
    W, _, H = _problem(8, 32)
    U, _, _ = inverse_hessian_factor(H)
    W0, U0 = W.clone(), U.clone()
    ops.obs_sweep(W, U, 0.5, 0, 0, 16)
    assert torch.equal(W, W0) and torch.equal(U, U0)


# ---------------------------------------------------------------- prox_step


@pytest.mark.parametrize("masked", [False, True])
def test_prox_step_matches_reference(masked):
    g = torch.Generator().manual_seed(3)
    Y, Wp, G = (torch.randn(31, 45, generator=g) for _ in range(3))
    mask = torch.rand(31, 45, generator=g) > 0.5 if masked else None
    got = ops.prox_step(Y, Wp, G, 0.1, 0.5, 0.1, 0.7, mask)
    want = ref.prox_step(Y, Wp, G, 0.1, 0.5, 0.1, 0.7, mask)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if masked:
        assert bool((got[0][~mask] == 0).all())
    else:
        # the soft-threshold zeroes exactly the entries whose gradient step lands within step * l1 of 0
        Z = Y - 0.1 * (2 * G + 0.2 * Y)
        assert torch.equal(got[0] == 0, Z.abs() <= 0.05)


# ---------------------------------------------------------------- contracts


def test_bad_inputs_raise_clear_errors():
    W, _, H = _problem(8, 16)
    U, _, _ = inverse_hessian_factor(H)
    with pytest.raises(ValueError, match="0 <= n <= m"):
        ops.nm_mask(torch.randn(4, 8), 5, 4)
    with pytest.raises(ValueError, match="multiple of m"):
        ops.nm_mask(torch.randn(4, 10), 2, 4)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ops.topk_mask(torch.randn(4, 8), 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ops.obs_sweep(W, U, -0.1)
    with pytest.raises(ValueError, match="non-finite"):
        ops.obs_sweep(W.masked_fill(torch.eye(8, 16, dtype=torch.bool), float("nan")), U, 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        ops.obs_sweep(W, U.masked_fill(torch.eye(16, dtype=torch.bool), float("inf")), 0.5)
    with pytest.raises(ValueError, match="U must be"):
        ops.obs_sweep(W, U[:8, :8], 0.5)
    with pytest.raises(TypeError, match="dtype"):
        ops.obs_sweep(W, U.double(), 0.5)
    with pytest.raises(TypeError, match="dtype"):
        ops.nm_mask(torch.randint(0, 3, (4, 8)), 2, 4)
    with pytest.raises(ValueError, match="multiple of m"):
        ops.obs_sweep(W, U, 0.0, 2, 4, blocksize=6)
    with pytest.raises(ValueError, match="shape"):
        ops.prox_step(torch.randn(3, 4), torch.randn(3, 4), torch.randn(4, 3), 0.1, 0.1, 0.1, 0.5)
    with pytest.raises(ValueError, match="l1 and l2"):
        ops.prox_step(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4), 0.1, -0.1, 0.1, 0.5)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            ops.obs_sweep(W.cuda(), U, 0.5)


def test_inverse_hessian_factor_survives_singular_hessian(caplog):
    X = torch.randn(4, 32)  # 4 tokens, 32 features: rank 4
    H = X.t() @ X / 4
    H[5, :] = 0
    H[:, 5] = 0  # a dead input
    U, dead, damp = inverse_hessian_factor(H, percdamp=0.0)
    assert bool(dead[5]) and int(dead.sum()) == 1
    assert torch.isfinite(U).all() and damp > 0
    assert "damping raised" in caplog.text
    with pytest.raises(ValueError, match="NaN"):
        inverse_hessian_factor(H.masked_fill(torch.eye(32, dtype=torch.bool), float("nan")))


@pytest.mark.skipif(not _native(), reason="extension not built")
def test_opcheck_all_ops():
    W, _, H = _problem(8, 32)
    U, _, _ = inverse_hessian_factor(H)
    Y = torch.randn(8, 32)
    cases = [
        (torch.ops.sdsx.nm_mask.default, (torch.randn(4, 8), 2, 4)),
        (torch.ops.sdsx.topk_mask.default, (torch.randn(4, 8), 0.5, True)),
        (torch.ops.sdsx.obs_sweep.default, (W, U, 0.5, 0, 0, 16)),
        (torch.ops.sdsx.obs_sweep.default, (W, U, 0.0, 2, 4, 16)),
        (torch.ops.sdsx.prox_step.default, (Y, Y.clone(), torch.randn(8, 32), 0.1, 0.1, 0.1, 0.5, None)),
        (torch.ops.sdsx.prox_step.default, (Y, Y.clone(), torch.randn(8, 32), 0.1, 0.1, 0.1, 0.5, Y > 0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.skipif(not _native(), reason="extension not built")
def test_ops_compile_fullgraph():
    f = torch.compile(lambda s: torch.ops.sdsx.nm_mask(s, 2, 4) & torch.ops.sdsx.topk_mask(s, 0.5, True), fullgraph=True, backend="eager")
    s = torch.randn(6, 16)
    assert torch.equal(f(s), ref.nm_mask(s, 2, 4) & ref.topk_mask(s, 0.5, True))


def test_reference_fallback_runs_when_forced(monkeypatch):
    monkeypatch.setenv("SDSX_FORCE_REFERENCE", "1")
    from sdsx import _ext

    assert not _ext.use_extension()
    W, _, H = _problem(8, 32)
    U, _, _ = inverse_hessian_factor(H)
    new, mask, _ = ops.obs_sweep(W, U, 0.0, 2, 4, 16)
    assert (mask.reshape(8, -1, 4).sum(-1) == 2).all()


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, sdsx; sdsx.SparsitySpec; print('transformers' in sys.modules, 'torch.cuda' in sys.modules and __import__('torch').cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_all_ops_have_reference_wrapper_fake_and_tests():
    # Every registered op comes with a reference, a wrapper with a docstring, and a fake.
    from sdsx import _ext

    for name in _ext.OP_NAMES:
        assert callable(getattr(ref, name)), name
        assert getattr(ops, name).__doc__, name
        if _native():
            assert hasattr(torch.ops.sdsx, name)
            assert torch._library.simple_registry.singleton.find(f"sdsx::{name}").fake_impl.kernel is not None, name
    for (n, m), s in itertools.product(NM, SPARSITIES):
        assert 0 <= n < m and 0 < s < 1


# ------------------------------------------------------------------------------- gram_upper_
@pytest.mark.parametrize("tokens,features", [(1, 1), (5, 7), (300, 100), (257, 261), (1000, 577), (513, 1536)])
def test_gram_upper_matches_xtx_on_the_upper_triangle(tokens, features):
    """Odd sizes exercise every edge: partial register tiles, partial token slabs, partial row blocks."""
    g = torch.Generator().manual_seed(tokens + features)
    X = torch.randn(tokens, features, generator=g) * torch.rand(features, generator=g).add(0.1)
    C0 = torch.randn(features, features, generator=g)
    want = (C0.double() + X.double().t() @ X.double()).triu()
    for fn in (ops.gram_upper_, ref.gram_upper_):
        C = C0.clone()
        assert fn(C, X) is C
        torch.testing.assert_close(C.double().triu(), want, rtol=1e-5, atol=1e-4)


def test_gram_upper_on_a_row_slice_and_non_contiguous_input():
    X = torch.randn(64, 300)
    big = torch.zeros(300, 310)
    C = big[:, :300]  # unit column stride, row stride 310
    ops.gram_upper_(C, X.t().contiguous().t())  # X as a transposed view
    torch.testing.assert_close(C.triu(), (X.t() @ X).triu(), rtol=1e-5, atol=1e-4)
    assert bool((big[:, 300:] == 0).all())


def test_gram_upper_errors():
    with pytest.raises(ValueError, match="features"):
        ops.gram_upper_(torch.zeros(3, 3), torch.zeros(5, 4))
    with pytest.raises(TypeError, match="float32"):
        ops.gram_upper_(torch.zeros(4, 4), torch.zeros(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="unit column stride"):
        ops.gram_upper_(torch.zeros(4, 4).t(), torch.zeros(5, 4))


# ------------------------------------------------------------------------------- sq_colsum_
@pytest.mark.parametrize("tokens,features", [(1, 1), (5, 7), (63, 100), (65, 511), (300, 513), (4097, 1536)])
def test_sq_colsum_matches_the_gram_diagonal(tokens, features):
    """Odd sizes cross the kernel's 64-token partial sums and 512-column blocks."""
    g = torch.Generator().manual_seed(tokens * features)
    X = torch.randn(tokens, features, generator=g) * torch.rand(features, generator=g).add(0.1) * 10
    acc0 = torch.rand(features, generator=g)
    want = acc0.double() + (X.double() ** 2).sum(0)
    for fn in (ops.sq_colsum_, ref.sq_colsum_):
        acc = acc0.clone()
        assert fn(acc, X) is acc
        torch.testing.assert_close(acc.double(), want, rtol=1e-6, atol=0)


def test_sq_colsum_on_a_non_contiguous_input_and_errors():
    X = torch.randn(300, 64)
    acc = torch.zeros(300)
    ops.sq_colsum_(acc, X.t())  # a transposed view: (64 tokens, 300 features)
    torch.testing.assert_close(acc, (X.t() ** 2).sum(0), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="features"):
        ops.sq_colsum_(torch.zeros(3), torch.zeros(5, 4))
    with pytest.raises(TypeError, match="float32"):
        ops.sq_colsum_(torch.zeros(4), torch.zeros(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        ops.sq_colsum_(torch.zeros(4, 2)[:, 0], torch.zeros(5, 4))

