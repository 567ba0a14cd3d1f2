"""SDS phases as pure functions on random layers: the Gram path against the token path, the
fixed point without regularization, valid masks, and the options' validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdsx.pruners import SparsitySpec
from sdsx.pruners.sds import (
    LayerProblem,
    SDSOptions,
    adjust,
    damped,
    lipschitz,
    objective,
    redense,
    redense_tokens,
    regularizer_scale,
    sds_layer,
)


def _layer(rows=24, cols=48, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(tokens, cols, generator=g) * torch.rand(cols, generator=g).add(0.2)
    return W, X, X.t() @ X / tokens


def test_gram_objective_and_gradient_equal_token_formulation():
    W_d, X, H = _layer()
    W = torch.randn_like(W_d, dtype=torch.float64).float()
    l1, l2 = 0.3, 0.2
    T = X.shape[0]
    R = X @ W.t() - X @ W_d.t()
    token_obj = float((R * R).sum() / T + l2 * (W * W).sum() + l1 * W.abs().sum())
    assert objective(W, W_d, H, l1, l2) == pytest.approx(token_obj, rel=1e-4)
    Wg = W.clone().requires_grad_(True)
    R = X @ Wg.t() - X @ W_d.t()
    ((R * R).sum() / T + l2 * (Wg * Wg).sum()).backward()
    gram_grad = 2 * (W - W_d) @ H + 2 * l2 * W
    torch.testing.assert_close(Wg.grad, gram_grad, rtol=1e-4, atol=1e-4)


def test_lipschitz_bounds_the_largest_eigenvalue():
    _, _, H = _layer()
    lam = float(torch.linalg.eigvalsh(H.double()).max())
    L = lipschitz(H, 0.5)
    assert 2 * (lam + 0.5) <= L <= 2 * (lam * 1.05 + 0.5)


def test_redense_without_regularization_returns_dense_weights():
    W_d, _, H = _layer(rows=8, cols=16, tokens=200)
    start = W_d * (torch.rand_like(W_d) > 0.5)
    W = redense(start, W_d, damped(H, 0.5), 0.0, 0.0, iters=600)
    torch.testing.assert_close(W, W_d, rtol=1e-3, atol=1e-3)


def test_redense_l1_makes_weights_sparser_and_decreases_the_objective():
    W_d, _, H = _layer()
    start = W_d * (torch.rand_like(W_d) > 0.5)
    l1_abs, l2_abs = regularizer_scale(W_d, H, 0.5, 0.1)
    W = redense(start, W_d, H, l1_abs, l2_abs, iters=50)
    assert objective(W, W_d, H, l1_abs, l2_abs) < objective(start, W_d, H, l1_abs, l2_abs)
    free = redense(start, W_d, H, 0.0, l2_abs, iters=50)
    assert int((W == 0).sum()) > int((free == 0).sum())


def test_gram_path_reaches_token_path_objective():
    W_d, X, H = _layer(tokens=2000)
    start = W_d * (torch.rand_like(W_d) > 0.5)
    l1_abs, l2_abs = regularizer_scale(W_d, H, 0.1, 0.1)
    tok = redense_tokens(start, W_d, X, l1_abs, l2_abs, iters=300)
    gram = redense(start, W_d, H, l1_abs, l2_abs, iters=100)
    f_tok = objective(tok, W_d, H, l1_abs, l2_abs)
    f_gram = objective(gram, W_d, H, l1_abs, l2_abs)
    assert f_gram <= f_tok * 1.01


@pytest.mark.parametrize("spec", ["2:4", "4:8", 0.5])
@pytest.mark.parametrize("pruner", ["sparsegpt", "wanda"])
def test_sds_layer_masks_valid_and_no_worse_than_phase1(spec, pruner):
    W_d, _, H = _layer()
    res = sds_layer(W_d, H, spec, SDSOptions(pruner=pruner))
    s = SparsitySpec.parse(spec)
    mask = res.result.mask
    assert bool((res.result.weight[~mask] == 0).all())
    if s.is_nm:
        assert (mask.reshape(mask.shape[0], -1, s.m).sum(-1) == s.n).all()
    else:
        assert int((~mask).sum()) == int(s.sparsity * mask.numel()) or abs(float((~mask).float().mean()) - s.sparsity) < 0.02
    assert res.result.loss <= res.errors["sparse"] * (1 + 1e-6)
    assert set(res.errors) >= {"sparse", "dense", "sparse2", "adjust"}


@pytest.mark.parametrize("score", ["magnitude", "activation"])
def test_adjust_keeps_the_pattern_and_lowers_the_error(score):
    W_d, _, H = _layer()
    spec = SparsitySpec.parse("2:4")
    start = W_d * (torch.rand_like(W_d) > 0.5)
    from sdsx.ops import nm_mask

    start = W_d * nm_mask(W_d.abs(), 2, 4)
    W, mask = adjust(start, LayerProblem.build(W_d, H, spec, SDSOptions(damp=0)), iters=30, score=score)
    assert (mask.reshape(24, -1, 4).sum(-1) == 2).all()
    assert objective(W, W_d, H) < objective(start, W_d, H)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(l1=-0.1), "l1"),
        (dict(l2=-1.0), "l2"),
        (dict(pruner="magnitude"), "unknown SDS pruner"),
        (dict(dense_iters=0), "dense_iters"),
        (dict(adjust_iters=0), "adjust_iters"),
        (dict(adjust_score="random"), "adjust_score"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SDSOptions(**kwargs).validate()


# ------------------------------------------------------------------ the dense-target variant
def test_dense_target_gradient_matches_token_formulation():
    from sdsx.pruners.sds import dense_target_shift, target_error

    g = torch.Generator().manual_seed(3)
    T, cin, cout = 300, 24, 10
    X = torch.randn(T, cin, generator=g, dtype=torch.float64)
    Xd = X + 0.3 * torch.randn(T, cin, generator=g, dtype=torch.float64)  # the dense model's inputs differ
    W_d = torch.randn(cout, cin, generator=g, dtype=torch.float64)
    W = torch.randn(cout, cin, generator=g, dtype=torch.float64, requires_grad=True)
    H, C = X.t() @ X / T, X.t() @ Xd / T
    loss = ((X @ W.t() - Xd @ W_d.t()) ** 2).sum() / T
    (grad,) = torch.autograd.grad(loss, W)
    B = dense_target_shift(W_d, H, C)
    torch.testing.assert_close(grad, 2 * ((W.detach() - W_d) @ H + B))
    # target_error is the token loss minus W_d's own loss
    own = float(((X @ W_d.t() - Xd @ W_d.t()) ** 2).sum() / T)
    err = target_error(W_d.float(), W.detach().float(), H.float(), B.float())
    assert err == pytest.approx(float(loss) - own, rel=1e-4)


def test_dense_target_with_identical_streams_equals_same_input():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(256, 32, generator=g)
    H = X.t() @ X / 256
    W_d = torch.randn(16, 32, generator=g)
    opts = SDSOptions(dense_iters=8, adjust_iters=4)
    a = sds_layer(W_d, H, "2:4", opts)
    b = sds_layer(W_d, H, "2:4", dataclasses.replace(opts, target="dense"), C=H.clone())
    torch.testing.assert_close(a.result.weight, b.result.weight, rtol=1e-4, atol=1e-5)


def test_dense_target_on_a_model_and_its_limits(tmp_path):
    from conftest import make_tiny, tiny_calib

    import sdsx

    model = make_tiny("llama", layers=2)
    calib = tiny_calib(nsamples=4, seqlen=24)
    report = sdsx.sds_prune(model, calib, "2:4", target="dense", dense_iters=4, adjust_iters=2, progress=False)
    assert report.forward_s > 0 and len(report.phase_errors) == 14
    for rec in report.layers:
        assert rec.sparsity == pytest.approx(0.5)
    with pytest.raises(ValueError, match="interleaved"):
        sdsx.sds_prune(make_tiny("llama", layers=1), calib, "2:4", target="dense", schedule="phased", progress=False)
    with pytest.raises(ValueError, match="checkpoint"):
        sdsx.sds_prune(make_tiny("llama", layers=1), calib, "2:4", target="dense", checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="target must be one of"):
        sdsx.sds_prune(make_tiny("llama", layers=1), calib, "2:4", target="teacher", progress=False)


def test_driver_dense_stream_cross_gram():
    from conftest import make_tiny, tiny_calib

    from sdsx.model.driver import BlockDriver
    from sdsx.pruners import magnitude

    calib = tiny_calib(nsamples=3, seqlen=16)
    seen = {}

    def untouched(name, W, H, C):
        seen[name] = (H.clone(), C.clone())
        return None  # the "pruned" model stays dense: both streams must agree at every block

    BlockDriver(make_tiny("llama", layers=3), progress=False, dense_stream=True).run(calib, untouched)
    assert len(seen) == 21
    for name, (H, C) in seen.items():
        torch.testing.assert_close(C, H, rtol=1e-4, atol=1e-5, msg=name)

    seen.clear()

    def prune(name, W, H, C):
        seen[name] = (H.clone(), C.clone())
        return magnitude(W, "2:4")

    BlockDriver(make_tiny("llama", layers=2), progress=False, dense_stream=True).run(calib, prune)
    b0 = [n for n in seen if ".0." in n]
    b1 = [n for n in seen if ".1." in n]
    # block 0's statistics pass runs on the embeddings with the block still dense, in both streams
    assert all(torch.allclose(seen[n][1], seen[n][0], atol=1e-5) for n in b0)
    for n in b1:  # block 1 reads the pruned block 0's outputs in one stream, the dense one's in the other
        H, C = seen[n]
        assert float((C - H).norm() / H.norm()) > 1e-3, n
    with pytest.raises(ValueError, match="stats='full'"):
        BlockDriver(make_tiny("llama", layers=1), progress=False, dense_stream=True, stats="diag")
