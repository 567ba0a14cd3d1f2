"""Validation windows (held-out calibration sequences): the split, the statistics the driver gives
the layer function, the error over depth, and SDS's guards (per layer, per block, early stopping)
that keep phase 1 wherever SDS is worse on them."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny, tiny_calib

import sdsx
from sdsx.api import Plan, split_validation
from sdsx.model.blocks import get_weight, model_linears
from sdsx.model.driver import BlockDriver, hidden_deviation
from sdsx.pruners import SparsitySpec
from sdsx.pruners.base import reconstruction_error
from sdsx.pruners.sds import LayerProblem, SDSOptions, adjust


def _plan(n: int = 8, batch: int = 1) -> Plan:
    calib = tiny_calib(nsamples=n)
    return Plan(SparsitySpec.parse("2:4"), [calib[i : i + batch] for i in range(0, n, batch)])


@pytest.mark.parametrize("validation,count", [(2, 2), (0.25, 2), (0.01, 1), (7, 7)])
def test_split_holds_out_the_last_sequences(validation, count):
    plan = _plan(8, batch=3)
    fit, held = split_validation(plan, validation, batch_size=3)
    seqs = torch.cat(plan.batches)
    assert held.shape[0] == count
    assert torch.equal(held, seqs[8 - count :])
    assert torch.equal(torch.cat(fit.batches), seqs[: 8 - count])
    assert all(b.shape[0] <= 3 for b in fit.batches)


@pytest.mark.parametrize("validation,exc,match", [
    (8, ValueError, "at least one must stay"),
    (1.5, ValueError, "fraction"),
    (-1, ValueError, "holds out"),
    ("half", TypeError, "count"),
])
def test_split_rejects_bad_requests(validation, exc, match):
    with pytest.raises(exc, match=match):
        split_validation(_plan(8), validation)


def test_split_of_nothing_is_nothing():
    plan = _plan(4)
    assert split_validation(plan, None) == (plan, None)
    assert split_validation(plan, 0) == (plan, None)


def _gram(model, ids, name):
    xs = []
    mod = model_linears(model)[name]
    h = mod.register_forward_hook(lambda m, i, o: xs.append(i[0].detach().reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for row in ids:
            model(row.unsqueeze(0))
    h.remove()
    X = torch.cat(xs).double()
    return (X.t() @ X / X.shape[0]).float()


def test_driver_gives_all_fit_and_validation_grams_and_the_deviation():
    """On the first block (nothing pruned before it) H is the Gram of every window, the split the
    Grams of the fitting and of the held-out windows; with nothing pruned the deviation is 0."""
    model = make_tiny("llama", layers=2)
    calib = tiny_calib(nsamples=8)
    seen = {}

    def layer_fn(name, W, H, split=None):
        seen[name] = (H.clone(), split[0].clone(), split[1].clone())
        return None

    res = BlockDriver(model, progress=False).run(calib[:6], layer_fn, validation=calib[6:])
    name = "model.layers.0.self_attn.q_proj"
    H, H_fit, H_val = seen[name]
    torch.testing.assert_close(H, _gram(model, calib, name), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(H_fit, _gram(model, calib[:6], name), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(H_val, _gram(model, calib[6:], name), rtol=1e-4, atol=1e-5)
    assert res.validation_samples == 2
    assert [b["block"] for b in res.blocks] == [0, 1]
    assert all(abs(b["deviation"]["final"]) < 1e-10 for b in res.blocks)


def test_hidden_deviation_is_per_token_relative():
    d = [torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])]
    out = [torch.tensor([[[3.0, 4.0], [0.0, 2.0]]])]
    # token 0 exact, token 1 off by its own norm: mean of 0 and 1
    assert hidden_deviation(out, d) == pytest.approx(0.5)


def test_base_pruner_with_validation_reports_error_over_depth_and_same_masks():
    model = make_tiny("llama", layers=3)
    plain, val = copy.deepcopy(model), copy.deepcopy(model)
    calib = tiny_calib(nsamples=8)
    sdsx.prune(plain, calib, "sparsegpt", "2:4", progress=False)
    rep = sdsx.prune(val, calib, "sparsegpt", "2:4", progress=False, validation=2)
    assert rep.validation_samples == 2 and rep.nsamples == 8
    dev = rep.deviation
    assert len(dev) == 3 and all(d > 0 for d in dev)
    # the pruner saw every window either way: H differs only by summation order
    a, b = model_linears(plain), model_linears(val)
    agree = [float(((get_weight(a[n]) != 0) == (get_weight(b[n]) != 0)).float().mean()) for n in a]
    assert min(agree) > 0.97


def test_adjust_early_stop_returns_the_best_validation_iterate():
    torch.manual_seed(0)
    W_d = torch.randn(16, 32)
    X, Xv = torch.randn(40, 32), torch.randn(40, 32) * torch.linspace(0.2, 3, 32)
    H, Hv = X.t() @ X / 40, Xv.t() @ Xv / 40
    start = W_d * sdsx.ops.nm_mask(W_d.abs(), 2, 4)
    history: list[float] = []
    W, mask = adjust(start, LayerProblem.build(W_d, H, "2:4", SDSOptions(damp=0), H_stop=Hv, history=history), 15)
    assert len(history) == 16
    assert reconstruction_error(W_d, W, Hv) == pytest.approx(min(history), rel=1e-6)
    assert bool((W[~mask] == 0).all())
    last, _ = adjust(start, LayerProblem.build(W_d, H, "2:4", SDSOptions(damp=0)), 15)
    assert reconstruction_error(W_d, W, Hv) <= reconstruction_error(W_d, last, Hv) + 1e-6


def _hurting_options():
    # an l1 so strong that the re-dense step zeroes almost everything, no adjustment to repair it,
    # and no per-layer guard: SDS's weights are then far worse than phase 1's; no block fit, which
    # would repair them on its own
    return dict(l1=50.0, adjust=False, keep_better=False, block_fit=False)


def test_block_guard_keeps_phase1_where_sds_hurts():
    model = make_tiny("llama", layers=3)
    base = copy.deepcopy(model)
    calib = tiny_calib(nsamples=8)
    sdsx.prune(base, calib, "sparsegpt", "2:4", progress=False, validation=2)
    rep = sdsx.sds_prune(model, calib, "2:4", "sparsegpt", progress=False, validation=2, **_hurting_options())
    assert rep.kept_blocks == [0, 1, 2]
    for b in rep.blocks:
        assert b["deviation"]["phase1"] < b["deviation"]["sds"]
    # every block has phase 1's weights: those of the base pruner on the same windows
    a, b = model_linears(base), model_linears(model)
    for name in a:
        torch.testing.assert_close(get_weight(b[name]), get_weight(a[name]), rtol=0, atol=0)
    assert "kept phase 1 on 3 of 3 blocks" in rep.to_markdown(per_layer=False)


def test_without_the_guard_the_hurting_sds_is_worse():
    """The guard test above is not vacuous: unguarded, the same options give a worse model."""
    model = make_tiny("llama", layers=3)
    calib = tiny_calib(nsamples=8)
    guarded = copy.deepcopy(model)
    g = sdsx.sds_prune(guarded, calib, "2:4", "sparsegpt", progress=False, validation=2, **_hurting_options())
    u = sdsx.sds_prune(model, calib, "2:4", "sparsegpt", progress=False, validation=2, block_guard=False, **_hurting_options())
    assert u.kept_blocks == []
    assert u.deviation[-1] > 2 * g.deviation[-1]


def test_default_guard_never_worse_than_phase1_on_validation():
    model = make_tiny("llama", layers=3)
    calib = tiny_calib(nsamples=16)
    rep = sdsx.sds_prune(model, calib, "2:4", "sparsegpt", progress=False, dense_iters=5, adjust_iters=4)
    assert rep.validation_samples == 4  # "auto": 1/8 of 16, and as many generated by the dense model
    assert rep.validation_sources == {"calibration": 2, "generated": 2}
    for b in rep.blocks:
        assert b["deviation"][b["chosen"]] <= b["deviation"]["phase1"]
        assert b["deviation"]["fit"] <= b["deviation"][b["chosen"]]  # the block fit keeps its best iterate, the start included
    assert rep.deviation == [b["deviation"]["fit"] for b in rep.blocks]
    for name, e in rep.phase_errors.items():
        assert {"val_sparse", "val_final", "mask_agreement"} <= set(e)
        if name not in rep.kept_phase1:
            assert e["val_final"] <= e["val_sparse"]


def test_validation_needs_the_interleaved_schedule():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="interleaved"):
        sdsx.sds_prune(model, tiny_calib(nsamples=8), "2:4", schedule="phased", validation=2, progress=False)
    with pytest.raises(ValueError, match="validation must be"):
        sdsx.sds_prune(model, tiny_calib(nsamples=8), "2:4", validation="some", progress=False)
    assert detect_dense(model)


def detect_dense(model) -> bool:
    return all(float((get_weight(m) == 0).float().mean()) < 0.1 for m in model_linears(model).values())


def test_alpha_interpolates_the_dense_target():
    from sdsx.pruners.sds import SDSOptions, sds_layer

    torch.manual_seed(1)
    W_d = torch.randn(8, 16)
    X = torch.randn(64, 16)
    Xd = X + 0.3 * torch.randn(64, 16)
    H, C = X.t() @ X / 64, X.t() @ Xd / 64
    zero = sds_layer(W_d, H, "2:4", SDSOptions(target="dense", alpha=0.0, keep_better=False), C=C)
    same = sds_layer(W_d, H, "2:4", SDSOptions(keep_better=False))
    torch.testing.assert_close(zero.result.weight, same.result.weight)
    half = sds_layer(W_d, H, "2:4", SDSOptions(target="dense", alpha=0.5, keep_better=False), C=C)
    assert not torch.equal(half.result.weight, same.result.weight)
    with pytest.raises(ValueError, match="alpha"):
        SDSOptions(alpha=1.5).validate()


def test_refit_reaches_the_masked_least_squares_solution():
    from sdsx.pruners.sds import refit

    torch.manual_seed(2)
    W_d = torch.randn(6, 24, dtype=torch.float64).float()
    X = torch.randn(100, 24) * torch.linspace(0.1, 4, 24)
    H = X.t() @ X / 100
    mask = sdsx.ops.nm_mask(torch.rand(6, 24), 2, 4)
    W = refit(W_d * mask, W_d, H, mask, 40)
    assert bool((W[~mask] == 0).all())
    for r in range(6):  # per row: H_KK w_K = (H w_d)_K
        k = mask[r]
        exact = torch.linalg.solve(H[k][:, k].double(), (H.double() @ W_d[r].double())[k])
        torch.testing.assert_close(W[r, k].double(), exact, rtol=1e-3, atol=1e-4)


def test_refit_early_stop_keeps_the_better_of_start_and_end():
    """With H_val the CG refit scores its start and its last iterate only, and returns the better."""
    from sdsx.pruners.sds import refit

    torch.manual_seed(3)
    W_d = torch.randn(8, 32)
    X = torch.randn(60, 32) * torch.linspace(0.1, 4, 32)
    H = X.t() @ X / 60
    mask = sdsx.ops.nm_mask(W_d.abs(), 2, 4)
    start = W_d * mask
    end = refit(start, W_d, H, mask, 8)
    for H_val, expect in ((H, end), (torch.eye(32) * 1e-3 + (start - end).t() @ (start - end), start)):
        # validation on the fitted H: the end wins; on inputs along which the refit moved: the start
        history: list[float] = []
        W = refit(start, W_d, H, mask, 8, H_val=H_val, history=history)
        assert len(history) == 2
        assert history == [reconstruction_error(W_d, start, H_val), reconstruction_error(W_d, end, H_val)]
        torch.testing.assert_close(W, expect)
        assert reconstruction_error(W_d, W, H_val) == min(history)


def test_phased_schedule_uses_the_cg_refit_when_the_mask_is_fixed(monkeypatch):
    """reselect=False means the CG refit on the fixed mask in every schedule, not only the interleaved one."""
    import sdsx.pruners.sds as sds_mod

    calls = []
    real = sds_mod.refit

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sds_mod, "refit", counting)
    model = make_tiny("llama")
    rep = sdsx.sds_prune(model, tiny_calib(nsamples=4), "2:4", schedule="phased", validation=None, progress=False,
                         reselect=False, dense_iters=2, adjust_iters=3)
    assert len(calls) == len(rep.phase_errors) == len(model_linears(model))
