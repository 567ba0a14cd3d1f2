"""Block-level reconstruction with fixed masks (sdsx.pruners.blockfit and its driver plumbing)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, tiny_calib

import sdsx
from sdsx.model.blocks import get_weight, model_linears
from sdsx.pruners.blockfit import BlockFitOptions, as_block_fit, channel_weights, fit_block, relative_error, visit_order


def _masked_problem(seed: int = 0):
    """A one-linear 'block' y = x W^T whose target comes from a masked W_d: the mask can reach it
    exactly, so the fit should drive the error towards zero."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(6, 8, generator=gen) > 0.5
    W_d = torch.randn(6, 8, generator=gen) * mask
    xs = [torch.randn(4, 5, 8, generator=gen) for _ in range(6)]
    ys = [x @ W_d.t() for x in xs]

    def forward(ws, x):
        return x @ ws["w"].t()

    return W_d, mask, xs, ys, forward


def test_fit_lowers_the_loss_and_keeps_the_mask():
    W_d, mask, xs, ys, forward = _masked_problem()
    W0 = W_d * 0.5  # shrunk: far from the target
    best, rec = fit_block(forward, {"w": W0}, xs, ys, BlockFitOptions(epochs=20, lr=3e-2))
    assert torch.equal(best["w"] != 0, mask)  # zeros stay zeros; the kept entries moved off zero
    before = sum(float(relative_error(forward({"w": W0}, x), y)) for x, y in zip(xs, ys))
    after = sum(float(relative_error(forward(best, x), y)) for x, y in zip(xs, ys))
    assert after < 0.05 * before
    assert rec.steps == 120 and rec.best_step == 120 and rec.loss_last < rec.loss_first
    assert best["w"].dtype == W0.dtype


def test_validation_keeps_the_best_iterate_including_the_start():
    W_d, mask, xs, ys, forward = _masked_problem(1)
    W0 = W_d * mask
    # a validation yardstick that every move makes worse: the starting weights must come back
    calls = []

    def validate(ws):
        calls.append(1)
        return float((ws["w"] - W0).abs().sum())

    best, rec = fit_block(forward, {"w": W0}, xs, ys, BlockFitOptions(epochs=10, lr=1e-2, eval_every=2, patience=2), validate)
    assert torch.equal(best["w"], W0)
    assert rec.best_step == 0 and rec.val_after == rec.val_before == 0.0
    assert rec.steps == 4  # stopped after two checks without improvement
    assert len(calls) == 3  # the start and the two checks
    calls.clear()
    _, rec = fit_block(forward, {"w": W0}, xs, ys, BlockFitOptions(epochs=10, lr=1e-2, eval_every=2, patience=2), validate, start=0.0)
    assert len(calls) == 2 and rec.val_before == 0.0 and rec.best_step == 0  # a known start is not scored again


def test_bf16_weights_fit_through_fp32_masters():
    W_d, mask, xs, ys, forward = _masked_problem(2)
    W0 = (W_d * 0.5).bfloat16()
    xs = [x.bfloat16() for x in xs]
    best, rec = fit_block(lambda ws, x: forward(ws, x).float(), {"w": W0}, xs, ys, BlockFitOptions(epochs=10, lr=1e-2))
    assert best["w"].dtype == torch.bfloat16
    assert torch.equal(best["w"] != 0, mask)
    assert rec.loss_last < 0.8 * rec.loss_first


@pytest.mark.parametrize("value,error", [
    (dict(lr=0), ValueError), (dict(target="nope"), ValueError), (dict(epoch=1), ValueError), ("yes", TypeError),
    (dict(eval_every=0), ValueError),
])
def test_bad_options_are_refused_with_the_fix(value, error):
    with pytest.raises(error):
        as_block_fit(value)


def test_as_block_fit_forms():
    assert as_block_fit(None) is None and as_block_fit(False) is None
    assert as_block_fit(True) == BlockFitOptions()
    assert as_block_fit({"lr": 2e-4}).lr == 2e-4


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_prune_with_block_fit_keeps_pattern_and_never_worsens_a_block_on_validation(family):
    calib = tiny_calib(16, 32)
    base = make_tiny(family)
    rb = sdsx.prune(base, calib, "sparsegpt", "2:4", validation=4, progress=False)
    model = make_tiny(family)
    report = sdsx.prune(model, calib, "sparsegpt", "2:4", validation=4, progress=False, block_fit=dict(lr=1e-3, epochs=3))
    for name, module in model_linears(model).items():
        W = get_weight(module)
        assert ((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), name
    assert len(report.fits) == len(report.blocks) == 2
    for fit, blk in zip(report.fits, report.blocks):
        assert fit["val_after"] <= fit["val_before"]
        assert blk["deviation"]["fit"] == fit["val_after"]
    # the fit helps here (not vacuous): block 0 sees the same input in both runs
    assert report.deviation[0] < rb.deviation[0]
    assert report.options["block_fit"]["lr"] == 1e-3
    # embeddings and the LM head are untouched by the fit
    fresh = make_tiny(family)
    assert torch.equal(model.get_input_embeddings().weight, fresh.get_input_embeddings().weight)


def test_block_fit_holds_out_windows_by_default():
    """validation="auto" (the default, as on the command line): 1/8 of the windows, at least 2."""
    report = sdsx.prune(make_tiny("llama"), tiny_calib(16, 32), "wanda", 0.5, progress=False, block_fit=True)
    assert report.options["validation"] == 2 and report.nsamples == 16
    plain = sdsx.prune(make_tiny("llama"), tiny_calib(16, 32), "wanda", 0.5, progress=False)
    assert "validation" not in plain.options  # without the fit nothing is held out


def test_local_target_and_no_validation():
    calib = tiny_calib(8, 32)
    model = make_tiny("llama")
    report = sdsx.prune(model, calib, "wanda", 0.5, progress=False, block_fit=dict(target="local", epochs=1, lr=1e-3),
                        validation=None)
    assert [f["steps"] for f in report.fits] == [8, 8]
    assert all(f["val_before"] is None and f["best_step"] == 8 for f in report.fits)
    assert all(f["loss_last"] < f["loss_first"] for f in report.fits)
    sparsity = [r.sparsity for r in report.layers]
    assert min(sparsity) >= 0.5


def test_sds_with_block_fit_and_schedule_errors():
    calib = tiny_calib(16, 32)
    report = sdsx.sds_prune(make_tiny("llama"), calib, "2:4", progress=False, block_fit=True, block_lr=1e-3,
                            dense_iters=4, adjust_iters=2)
    assert len(report.fits) == 2 and report.validation_samples == 4
    assert report.validation_sources == {"calibration": 2, "generated": 2}
    assert report.options["block_fit"] is True
    with pytest.raises(ValueError, match="interleaved"):
        sdsx.sds_prune(make_tiny("llama"), calib, "2:4", progress=False, schedule="phased", block_fit=True, validation=None)
    phased = sdsx.sds_prune(make_tiny("llama"), calib, "2:4", progress=False, schedule="phased", validation=None, dense_iters=2, adjust_iters=2)
    assert phased.fits == [] and phased.options["block_fit"] is False  # the default fit is for the interleaved schedule
    with pytest.raises(ValueError, match="block fit target"):
        sdsx.sds_prune(make_tiny("llama"), calib, "2:4", progress=False, block_fit=True, block_target="x")


@pytest.mark.parametrize("target,epochs", [("local", 1.0), ("dense", 1.0), ("dense", 0.5)])
def test_first_block_fit_starts_from_the_dense_block_output(target, epochs):
    """Block 0 sees the embeddings in both models, so its local target (the statistics pass's own
    outputs) and its dense target are both the dense model's first hidden state: the fit's first
    loss is the pruned block's error against it on the first window it visits."""
    calib = tiny_calib(8, 32)
    dense = make_tiny("llama")
    pruned = make_tiny("llama")
    sdsx.prune(pruned, calib, "wanda", 0.5, progress=False)  # the weights the fit starts from
    model = make_tiny("llama")
    report = sdsx.prune(model, calib, "wanda", 0.5, progress=False, block_fit=dict(target=target, epochs=epochs, lr=1e-3),
                        validation=None)
    order = visit_order(8, BlockFitOptions(epochs=epochs))
    assert order[0] == int(torch.randperm(8, generator=torch.Generator().manual_seed(0))[0])
    assert [f["steps"] for f in report.fits] == [len(order)] * 2
    first = order[0]
    x = calib[first : first + 1]
    with torch.no_grad():
        # the loss balances the channels by the dense hidden states of the windows the fit has targets for
        seen = sorted(set(order)) if target == "dense" else range(8)
        weight = channel_weights([dense(calib[i : i + 1], output_hidden_states=True).hidden_states[1] for i in seen])
        want = relative_error(pruned(x, output_hidden_states=True).hidden_states[1],
                              dense(x, output_hidden_states=True).hidden_states[1], weight)
    assert report.fits[0]["loss_first"] == pytest.approx(float(want), rel=1e-4)
    assert float(want) > 1e-3  # the pruned block does differ from the dense one


def test_visit_order_and_missing_targets():
    half = visit_order(8, BlockFitOptions(epochs=0.5, seed=3))
    assert len(half) == 4 and len(set(half)) == 4  # a part of one permutation
    assert visit_order(8, BlockFitOptions(epochs=0.5, seed=3)) == half  # the same for every block
    two = visit_order(5, BlockFitOptions(epochs=2))
    assert len(two) == 10 and sorted(two) == sorted(list(range(5)) * 2)
    assert len(visit_order(5, BlockFitOptions(epochs=0.01))) == 1
    W_d, mask, xs, ys, forward = _masked_problem()
    opts = BlockFitOptions(epochs=0.5)
    order = visit_order(len(xs), opts)
    sparse_targets = [y if i in order else None for i, y in enumerate(ys)]
    _, rec = fit_block(forward, {"w": W_d * 0.5}, xs, sparse_targets, opts)  # unvisited batches need no target
    assert rec.steps == len(order)
    with pytest.raises(ValueError, match="no target"):
        fit_block(forward, {"w": W_d}, xs, [None] * len(xs), opts)


def test_relative_lr_is_the_same_fit_at_any_weight_scale():
    """With lr_mode="relative" each tensor's step is lr times its RMS: a problem scaled by c (weights,
    targets) gives the scaled fit; with an absolute rate it does not (Adam's step ignores scale)."""
    W_d, mask, xs, ys, forward = _masked_problem()
    start = (W_d * 0.5) * mask

    def fit(scale: float, mode: str) -> torch.Tensor:
        opts = BlockFitOptions(epochs=2, lr=0.05 if mode == "relative" else 0.01, lr_mode=mode)
        best, _ = fit_block(forward, {"w": start * scale}, xs, [y * scale for y in ys], opts)
        return best["w"] / scale

    torch.testing.assert_close(fit(1.0, "relative"), fit(0.01, "relative"), rtol=1e-3, atol=1e-5)
    assert not torch.allclose(fit(1.0, "absolute"), fit(0.01, "absolute"), rtol=1e-2, atol=1e-4)
    with pytest.raises(ValueError, match="lr_mode"):
        BlockFitOptions(lr_mode="per-weight")
