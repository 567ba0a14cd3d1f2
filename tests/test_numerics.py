"""Numerical faults and reproducibility: rank-deficient calibration, NaN/Inf with the layer's
name, fp16/bf16 models (fp32 statistics, weights written back in their dtype), out-of-memory
reports, and bit-identical masks on weights full of exact ties."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_tiny, tiny_calib

import sdsx
from sdsx.model.blocks import get_weight, model_linears
from sdsx.model.driver import BlockDriver
from sdsx.pruners import SparsitySpec


def _valid(model, spec: str) -> None:
    spec = SparsitySpec.parse(spec)
    for name, mod in model_linears(model).items():
        W = get_weight(mod)
        assert torch.isfinite(W).all(), name
        if spec.is_nm:
            assert bool(((W != 0).reshape(W.shape[0], -1, spec.m).sum(-1) <= spec.n).all()), name
        else:
            assert float((W == 0).float().mean()) >= spec.sparsity - 1e-6, name


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("sparsity", ["2:4", 0.5])
def test_rank_deficient_calibration_finishes_with_a_warning(method, sparsity, caplog):
    """4 sequences of 16 tokens = 64 tokens for inputs of 64 and 128 features: every Hessian is
    singular (rank <= 64, the MLP's down projection certainly)."""
    model = make_tiny("llama", layers=2)
    with caplog.at_level(logging.WARNING, logger="sdsx"):
        report = sdsx.prune(model, tiny_calib(nsamples=4, seqlen=16), method, sparsity, progress=False, report_error=True)
    _valid(model, str(sparsity))
    assert all(r.error == r.error for r in report.layers)  # no NaN errors
    assert any("rank-deficient" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_duplicated_features_and_dead_inputs():
    """A Hessian with duplicated and all-zero features (singular even with little damping) is
    damped until Cholesky succeeds."""
    from sdsx.pruners.sparsegpt import inverse_hessian_factor, sparsegpt

    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 64, generator=g)
    X[:, 10] = X[:, 3]  # duplicated feature
    X[:, 20] = 0  # dead input
    H = X.t() @ X / X.shape[0]
    W = torch.randn(32, 64, generator=g)
    U, dead, damp = inverse_hessian_factor(H, percdamp=0.0)
    assert bool(dead[20]) and torch.isfinite(U).all() and damp > 0
    res = sparsegpt(W, H, "2:4", percdamp=0.0)
    assert torch.isfinite(res.weight).all() and bool((res.weight[:, 20] == 0).all())


def test_nan_weight_is_reported_with_the_layer_name():
    model = make_tiny("llama", layers=2)
    name, mod = list(model_linears(model).items())[5]
    with torch.no_grad():
        mod.weight[3, 7] = float("nan")
    with pytest.raises(FloatingPointError, match=name.replace(".", r"\.")):
        sdsx.prune(model, tiny_calib(), "sparsegpt", "2:4", progress=False)


def test_nonfinite_activations_are_reported_with_the_layer_or_block():
    model = make_tiny("llama", layers=3)
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("inf")  # block 0's inputs
    calib = tiny_calib()
    calib[0, 0] = 5
    with pytest.raises(FloatingPointError, match=r"model\.layers\.0\.self_attn\.q_proj.*NaN/Inf"):
        sdsx.prune(model, calib, "wanda", "2:4", progress=False)

    model = make_tiny("llama", layers=3)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("nan")  # inside block 1
    with pytest.raises(FloatingPointError, match=r"model\.layers\.1\.mlp\.gate_proj: non-finite values"):
        sdsx.prune(model, tiny_calib(), "sparsegpt", "2:4", progress=False)


class _Overflowing(torch.nn.Linear):
    """A linear with finite weights whose output overflows (as fp16 activations can)."""

    def forward(self, x):
        return super().forward(x) * 1e38 * 1e38


def test_nonfinite_block_output_names_the_block():
    model = make_tiny("llama", layers=3)
    old = model.model.layers[1].mlp.down_proj
    new = _Overflowing(old.in_features, old.out_features, bias=False)
    new.load_state_dict(old.state_dict())
    model.model.layers[1].mlp.down_proj = new
    with pytest.raises(FloatingPointError, match=r"block 1 \(model\.layers\.1\) produced NaN/Inf outputs"):
        sdsx.prune(model, tiny_calib(), "magnitude", "2:4", progress=False, report_error=True)  # the full H: forward passes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_half_precision_models(dtype, method):
    """Statistics in fp32, weights written back in the model's dtype; the result stays close to
    pruning the fp32 model (the masks agree on almost every entry)."""
    ref = make_tiny("llama", layers=2)
    half = make_tiny("llama", layers=2).to(dtype)
    calib = tiny_calib()
    sdsx.prune(ref, calib, method, "2:4", progress=False)
    report = sdsx.prune(half, calib, method, "2:4", progress=False, report_error=True)
    _valid(half, "2:4")
    agree = []
    for (name, a), b in zip(model_linears(ref).items(), model_linears(half).values()):
        assert b.weight.dtype == dtype, name
        agree.append(float(((get_weight(a) != 0) == (get_weight(b) != 0)).float().mean()))
    assert min(agree) > 0.85 and sum(agree) / len(agree) > 0.95, agree
    assert all(r.error == r.error for r in report.layers)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sds(dtype):
    model = make_tiny("llama", layers=2).to(dtype)
    sdsx.sds_prune(model, tiny_calib(), "2:4", "sparsegpt", progress=False, dense_iters=5, adjust_iters=3)
    _valid(model, "2:4")
    assert all(m.weight.dtype == dtype for m in model_linears(model).values())


def _tied(seed: int = 0) -> torch.nn.Module:
    """A tiny model whose linear weights take only 8 distinct nonzero values: exact ties everywhere."""
    model = make_tiny("llama", layers=2, seed=seed)
    with torch.no_grad():
        for mod in model_linears(model).values():
            mod.weight.copy_((torch.floor(mod.weight / mod.weight.abs().max() * 4).clamp(-4, 3) + 0.5) / 40)
    return model


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude", "sds"])
@pytest.mark.parametrize("sparsity", ["2:4", 0.5])
def test_same_seed_gives_identical_weights_on_tied_weights(method, sparsity):
    results = []
    for _ in range(2):
        model = _tied()
        calib = tiny_calib(seed=3)
        if method == "sds":
            sdsx.sds_prune(model, calib, sparsity, "wanda", progress=False, dense_iters=5, adjust_iters=3)
        else:
            sdsx.prune(model, calib, method, sparsity, progress=False)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_out_of_memory_names_the_block_and_the_fix():
    model = make_tiny("llama", layers=3)
    calls = []

    def layer_fn(name, W, H):
        calls.append(name)
        if name.startswith("model.layers.1."):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return None

    driver = BlockDriver(model, device="cpu", progress=False, batch_size=2)
    with pytest.raises(torch.OutOfMemoryError) as info:
        driver.run(tiny_calib(), layer_fn)
    text = str(info.value)
    assert "block 1 (model.layers.1)" in text and "batch_size (now 2)" in text and "MiB" in text


def test_entry_points_turn_tf32_off_and_restore_it(monkeypatch):
    # TF32 (precision "high") would round the Grams and GEMMs to 10 mantissa bits on a GPU; sdsx's
    # numerics run at "highest" whatever the caller set, and leave the caller's setting as it was.
    from sdsx import ops
    from sdsx.numerics import exact_fp32

    seen = []
    real = ops._native

    def spy(op, t):  # every op wrapper asks this first, native or reference
        seen.append(torch.get_float32_matmul_precision())
        return real(op, t)

    monkeypatch.setattr(ops, "_native", spy)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with exact_fp32():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
        ops.obs_sweep(torch.randn(4, 8), torch.eye(8), 0.5, 0, 0, 8)
        assert seen == ["highest"]
        seen.clear()
        # Wanda's masks (nm_mask, not itself wrapped) run inside the block driver's scope
        sdsx.prune(make_tiny("llama", layers=1), tiny_calib(2, 16), method="wanda", sparsity="2:4", progress=False)
        assert seen and set(seen) == {"highest"}
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(saved)
