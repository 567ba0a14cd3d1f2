"""sdsx.prune on tiny random LLaMA, OPT and GPT-2 models: every method x pattern, reports, errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import make_tiny, tiny_calib
from torch import nn

import sdsx
from sdsx.api import METHODS, PruneReport
from sdsx.model import find_blocks, find_linears, get_weight

PATTERNS = (0.5, "2:4", "4:8")


def _linears(model):
    blocks = find_blocks(model)
    out = {}
    for i, block in enumerate(blocks.layers):
        out.update(find_linears(block, prefix=f"{blocks.path}.{i}"))
    return out


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def _check_pattern(W: torch.Tensor, pattern, method: str) -> None:
    keep = W != 0
    rows, cols = W.shape
    if isinstance(pattern, str):
        n, m = map(int, pattern.split(":"))
        per_group = keep.reshape(rows, cols // m, m).sum(-1)
        assert bool((per_group == n).all()), "every group keeps exactly n"
    elif method == "wanda":
        assert bool((keep.sum(1) == cols - int(pattern * cols)).all()), "exact per-row sparsity"
    else:
        assert int(keep.sum()) == W.numel() - int(pattern * W.numel()), "exact whole-matrix sparsity"


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_pattern(family, method, pattern):
    model = make_tiny(family)
    calib = tiny_calib()
    emb = model.get_input_embeddings().weight.detach().clone()
    report = sdsx.prune(model, calib, method, pattern, progress=False)
    assert isinstance(report, PruneReport)
    linears = _linears(model)
    assert [r.name for r in report.layers] == list(linears)
    for row in report.layers:
        assert row.sparsity == 0.5
        if method == "sparsegpt":  # by default only where it costs nothing (report_error=None)
            assert math.isfinite(row.error) and row.error >= 0
        else:
            assert math.isnan(row.error)
        W = get_weight(linears[row.name])
        assert tuple(W.shape) == row.shape
        _check_pattern(W, pattern, method)
    assert report.overall_sparsity == 0.5
    assert torch.equal(model.get_input_embeddings().weight, emb), "embeddings (and the tied head) are never pruned"
    with torch.no_grad():
        assert bool(torch.isfinite(model(calib).logits).all())


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_sparsegpt_error_below_magnitude(family, pattern):
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        model = make_tiny(family)
        errors[method] = sdsx.prune(model, tiny_calib(), method, pattern, progress=False, report_error=True).total_error
    assert errors["sparsegpt"] < errors["magnitude"]


def test_sparsegpt_factors_each_distinct_input_once(monkeypatch):
    import importlib

    sg = importlib.import_module("sdsx.pruners.sparsegpt")  # the package re-exports a function of that name

    calls = []
    real = sg.inverse_hessian_factor

    def counting(H, *args, **kwargs):
        calls.append(H.shape[0])
        return real(H, *args, **kwargs)

    monkeypatch.setattr(sg, "inverse_hessian_factor", counting)
    sdsx.prune(make_tiny("llama"), tiny_calib(), "sparsegpt", "2:4", progress=False)
    assert len(calls) == 2 * 4  # q/k/v and gate/up share their factor


def test_shared_factor_matches_the_pure_pruner():
    """The api's factor-sharing SparseGPT gives what sdsx.pruners.sparsegpt gives per layer."""
    from sdsx.model import BlockDriver
    from sdsx.pruners import sparsegpt

    model = make_tiny("llama")
    expected = {}

    def fn(name, W, H):
        expected[name] = sparsegpt(W, H, "2:4")
        return expected[name]

    BlockDriver(copy.deepcopy(model), progress=False).run(tiny_calib(), fn)
    sdsx.prune(model, tiny_calib(), "sparsegpt", "2:4", progress=False)
    for name, lin in _linears(model).items():
        torch.testing.assert_close(get_weight(lin), expected[name].weight)


def test_wanda_without_error_uses_diagonal_and_same_mask():
    a, b = make_tiny("llama"), make_tiny("llama")
    ra = sdsx.prune(a, tiny_calib(), "wanda", 0.5, progress=False, report_error=True)
    rb = sdsx.prune(b, tiny_calib(), "wanda", 0.5, progress=False, report_error=False)
    assert math.isfinite(ra.total_error) and math.isnan(rb.total_error)
    for (n, la), lb in zip(_linears(a).items(), _linears(b).values()):
        assert torch.equal(la.weight, lb.weight), n
    c = make_tiny("llama")
    rc = sdsx.prune(c, tiny_calib(), "wanda", 0.5, progress=False)  # the default: column norms only
    assert math.isnan(rc.total_error) and rc.options["report_error"] is False
    for (n, la), lc in zip(_linears(a).items(), _linears(c).values()):
        assert torch.equal(la.weight, lc.weight), n
    assert "| - |" in rc.to_markdown() and "not computed" in rc.to_markdown()


def test_apply_mask_zeroes_with_positive_zeros_in_the_weight_dtype():
    from sdsx.pruners.base import apply_mask

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = torch.randn(16, 32).to(dtype)
        mask = torch.rand(16, 32) < 0.5
        got = apply_mask(w, mask)
        assert got.dtype == dtype and torch.equal(got, torch.where(mask, w, torch.zeros_like(w)))
        assert not bool(torch.signbit(got[~mask]).any())  # -0.0 would differ in the saved bytes
        assert got.data_ptr() != w.data_ptr()


def test_magnitude_needs_no_calibration():
    model = make_tiny("gpt2")
    report = sdsx.prune(model, None, "magnitude", "2:4", progress=False, report_error=False)
    assert report.overall_sparsity == 0.5 and report.forward_s == 0.0 and math.isnan(report.total_error)
    assert sdsx.prune(make_tiny("gpt2"), None, "magnitude", "2:4", progress=False).overall_sparsity == 0.5  # the default
    with pytest.raises(ValueError, match="calibration"):
        sdsx.prune(make_tiny("gpt2"), None, "magnitude", "2:4", progress=False, report_error=True)


def test_report_serialises():
    report = sdsx.prune(make_tiny("opt"), tiny_calib(), "sparsegpt", "4:8", progress=False)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["method"] == "sparsegpt" and data["sparsity"] == "4:8"
    assert len(data["layers"]) == 12 and data["overall_sparsity"] == 0.5
    assert data["forward_s"] > 0 and data["solver_s"] > 0 and data["peak_memory_bytes"] > 0
    md = report.to_markdown()
    assert "model.decoder.layers.1.fc2" in md and "| forward s |" in md
    assert report.pruning_s == pytest.approx(report.stats_s + report.solver_s)


def test_batch_size_and_offload_do_not_change_the_result():
    a, b = make_tiny("llama"), make_tiny("llama")
    sdsx.prune(a, tiny_calib(), "sparsegpt", 0.5, progress=False, batch_size=1, offload=True)
    sdsx.prune(b, tiny_calib(), "sparsegpt", 0.5, progress=False, batch_size=3, offload=False)
    for la, lb in zip(_linears(a).values(), _linears(b).values()):
        torch.testing.assert_close(la.weight, lb.weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_model_keeps_its_dtype(dtype):
    model = make_tiny("llama").to(dtype)
    sdsx.prune(model, tiny_calib(), "sparsegpt", "2:4", progress=False)
    for lin in _linears(model).values():
        assert lin.weight.dtype == dtype
        _check_pattern(get_weight(lin).float(), "2:4", "sparsegpt")


def test_peak_memory_does_not_grow_with_depth():
    peaks, weights = {}, {}
    for layers in (2, 4):
        model = make_tiny("llama", layers=layers)
        peaks[layers] = sdsx.prune(model, tiny_calib(), "sparsegpt", 0.5, progress=False).peak_memory_bytes
        weights[layers] = sum(p.numel() * p.element_size() for p in model.parameters())
    assert peaks[4] - peaks[2] <= weights[4] - weights[2]


# --------------------------------------------------------------------------- bad input changes nothing
def _no_blocks_model():
    model = make_tiny("llama")
    model.model.layers = nn.ModuleList()
    return model


BAD = [
    ("unknown method", dict(method="obs"), ValueError, "magnitude, wanda, sparsegpt"),
    ("bad pattern", dict(sparsity="4:2"), ValueError, "N:M"),
    ("sparsity 1", dict(sparsity=1.0), ValueError, "sparsity"),
    ("negative sparsity", dict(sparsity=-0.1), ValueError, "sparsity"),
    ("garbage sparsity", dict(sparsity="half"), ValueError, "sparsity"),
    ("empty calibration", dict(calib=torch.empty(0, 16, dtype=torch.long)), ValueError, "empty"),
    ("empty sequences", dict(calib=torch.empty(4, 0, dtype=torch.long)), ValueError, "empty"),
    ("float calibration", dict(calib=torch.rand(4, 16)), TypeError, "integer"),
    ("text calibration", dict(calib="some text"), TypeError, "token ids"),
    ("ids beyond vocab", dict(calib=torch.full((2, 16), 500)), ValueError, "tokenizer does not match"),
    ("too long", dict(calib=torch.zeros(1, 300, dtype=torch.long)), ValueError, "positions"),
    ("blocksize", dict(blocksize=0), ValueError, "blocksize"),
    ("percdamp", dict(percdamp=-1.0), ValueError, "percdamp"),
]


@pytest.mark.parametrize("what,kwargs,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_changes_nothing(what, kwargs, exc, match):
    model = make_tiny("llama")
    before = _state(model)
    args = dict(calib=tiny_calib(), method="sparsegpt", sparsity=0.5)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        sdsx.prune(model, args.pop("calib"), progress=False, **args)
    _assert_unchanged(model, before)


def test_model_without_blocks():
    with pytest.raises(ValueError, match="no decoder blocks"):
        sdsx.prune(_no_blocks_model(), tiny_calib(), "sparsegpt", 0.5, progress=False)


def test_nm_that_does_not_divide_the_inputs_changes_nothing():
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=128, n_embd=60, n_layer=2, n_head=4, n_positions=64))
    before = _state(model)
    with pytest.raises(ValueError, match="multiple of 8"):
        sdsx.prune(model, tiny_calib(), "wanda", "4:8", progress=False)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "0.5"])
@pytest.mark.parametrize("tokens", [40, 2000])  # rank-deficient and full-rank H
def test_sparsegpt_error_from_sweep_equals_true_error(pattern, tokens):
    """The reported loss comes from the sweep's per-row losses minus the damping term; it must be
    the true tr(D H D^T) on the undamped H, dead inputs included."""
    from sdsx.pruners import sparsegpt
    from sdsx.pruners.base import reconstruction_error

    g = torch.Generator().manual_seed(tokens)
    X = torch.randn(tokens, 96, generator=g) * torch.rand(96, generator=g) * 3
    X[:, 5:8] = 0  # dead inputs
    H = X.t() @ X / tokens
    W = torch.randn(40, 96, generator=g)
    res = sparsegpt(W, H, pattern, percdamp=0.05)
    assert res.loss == pytest.approx(reconstruction_error(W, res.weight, H), rel=1e-5)
    assert math.isnan(sparsegpt(W, H, pattern, report_error=False).loss)


def test_engine_options_as_a_dataclass_or_keywords():
    """sdsx.prune(engine=EngineOptions(...)) and the same fields as keywords give the same weights;
    an unknown keyword is refused by name before the model is touched."""
    from sdsx.api import EngineOptions

    a, b = make_tiny("llama"), make_tiny("llama")
    sdsx.prune(a, tiny_calib(8), "sparsegpt", "2:4", engine=EngineOptions(progress=False, batch_size=2), blocksize=16)
    sdsx.prune(b, tiny_calib(8), "sparsegpt", "2:4", progress=False, batch_size=2, blocksize=16)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = make_tiny("llama")
    before = [p.clone() for p in c.parameters()]
    with pytest.raises(TypeError, match="unexpected keyword 'ofload'; the keywords: blocksize, percdamp, report_error, device, offload"):
        sdsx.prune(c, tiny_calib(8), "wanda", "2:4", ofload=False)
    assert all(torch.equal(p, q) for p, q in zip(before, c.parameters()))
