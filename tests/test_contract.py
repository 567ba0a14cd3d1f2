"""The contract every registered pruner keeps (sdsx.pruners.registry), and SDS's layer phases with
each pruner SDS may use. New registrations are picked up by themselves: the parameters below are
read from the registry.

A solve takes (weight, statistics, spec, options, context) and returns a PruneResult whose mask is
bool with the pattern exactly (N of every M along the input, or the exact count), whose weight has
exact zeros where the mask is False and the input's dtype, without touching the caller's tensors,
deterministically; sparsity 0 changes nothing; dead and duplicated inputs are handled; bad input is
refused with an error that names it; the native ops and the pure-PyTorch references agree.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdsx.pruners import SparsitySpec, registry
from sdsx.pruners.registry import LayerContext
from sdsx.pruners.sds import PHASES

PRUNERS = registry.names()
SDS_PRUNERS = registry.sds_names()
PHASE_NAMES = tuple(PHASES)
PATTERNS = ["2:4", "4:8", "0.5", "0.7"]
OUT, IN = 24, 64


def _problem(seed: int = 0, tokens: int = 256, dead: int = 0, duplicate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(OUT, IN, generator=g)
    X = torch.randn(tokens, IN, generator=g) * torch.linspace(0.2, 3.0, IN)
    if dead:
        X[:, :dead] = 0
    if duplicate:
        X[:, -1] = X[:, -2]
    return W, X.T @ X / tokens


def _stats(pruner: registry.Pruner, H: torch.Tensor, full: bool) -> torch.Tensor | None:
    if full:
        return H
    return {"none": None, "diag": H.diagonal().clone(), "full": H}[pruner.stats]


def _solve(name: str, W: torch.Tensor, H: torch.Tensor, pattern: str, full: bool = True, **options):
    p = registry.get(name)
    opts = registry.make_options(p, options)
    shared = p.shared(opts) if p.shared is not None else None
    return p.solve(W, _stats(p, H, full), SparsitySpec.parse(pattern), opts, LayerContext(name, shared, full))


def _assert_pattern(mask: torch.Tensor, pattern: str, name: str) -> None:
    spec = SparsitySpec.parse(pattern)
    if spec.is_nm:
        groups = mask.reshape(mask.shape[0], -1, spec.m).sum(-1)
        assert bool((groups == spec.n).all()), f"{name}: not {pattern} in every group"
    else:
        # int(sparsity * n) pruned: per row for the pruners that compare within a row, else in the matrix
        expected = mask.numel() - int(spec.sparsity * mask.numel())
        per_row = mask.shape[1] - int(spec.sparsity * mask.shape[1])
        kept = int(mask.sum())
        assert kept == expected or bool((mask.sum(1) == per_row).all()), (
            f"{name}: kept {kept} of {mask.numel()}, expected {expected} (or {per_row} in every row) at {pattern}"
        )


# ------------------------------------------------------------------------------------ registry
def test_registry_lists_the_builtin_pruners():
    assert {"magnitude", "wanda", "sparsegpt", "ria"} <= set(PRUNERS)
    assert "magnitude" not in SDS_PRUNERS and {"wanda", "sparsegpt", "ria"} <= set(SDS_PRUNERS)


def test_unknown_pruner_names_the_choices():
    with pytest.raises(ValueError, match="unknown pruner 'obs'.*sparsegpt"):
        registry.get("obs")


def test_a_second_registration_of_a_name_is_refused():
    p = registry.get("wanda")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(dataclasses.replace(p, summary="another"))


@pytest.mark.parametrize("name", PRUNERS)
def test_registration_is_complete(name):
    p = registry.get(name)
    assert p.stats in registry.STATS and p.summary
    assert dataclasses.is_dataclass(p.options)
    p.options()  # every option has a default


# ------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("name", PRUNERS)
def test_pattern_mask_and_zeros(name, pattern):
    W, H = _problem()
    res = _solve(name, W, H, pattern)
    assert res.mask.dtype == torch.bool and res.mask.shape == W.shape
    _assert_pattern(res.mask, pattern, name)
    assert bool((res.weight[~res.mask] == 0).all())
    assert not bool(torch.signbit(res.weight[~res.mask]).any()), "pruned weights must be +0.0"
    assert res.loss >= 0 and torch.isfinite(res.weight).all()


@pytest.mark.parametrize("name", PRUNERS)
def test_diag_statistics_give_the_full_statistics_mask(name):
    """A pruner that registered "diag" takes either the diagonal or the full H, with one mask."""
    W, H = _problem(1)
    full = _solve(name, W, H, "2:4", full=True)
    least = _solve(name, W, H, "2:4", full=False)
    assert torch.equal(full.mask, least.mask) and torch.equal(full.weight, least.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", PRUNERS)
def test_dtype_kept_and_inputs_untouched(name, dtype):
    W, H = _problem(2)
    W = W.to(dtype)
    W0, H0 = W.clone(), H.clone()
    res = _solve(name, W, H, "2:4")
    assert res.weight.dtype == dtype
    assert torch.equal(W, W0) and torch.equal(H, H0), f"{name} changed the caller's tensors"


@pytest.mark.parametrize("name", PRUNERS)
def test_deterministic(name):
    W, H = _problem(3)
    a, b = _solve(name, W, H, "0.5"), _solve(name, W, H, "0.5")
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("name", PRUNERS)
def test_sparsity_zero_changes_nothing(name):
    W, H = _problem(4)
    res = _solve(name, W, H, "0")
    assert bool(res.mask.all()) and torch.equal(res.weight, W)


@pytest.mark.parametrize("name", PRUNERS)
@pytest.mark.parametrize("pattern", ["2:4", "0.5"])
def test_dead_and_duplicated_inputs(name, pattern):
    """Inputs that are always zero (H's row and column zero) and two identical inputs (H singular)."""
    W, H = _problem(5, dead=3, duplicate=True)
    res = _solve(name, W, H, pattern)
    assert torch.isfinite(res.weight).all()
    _assert_pattern(res.mask, pattern, name)
    assert bool((res.weight[~res.mask] == 0).all())


@pytest.mark.parametrize("name", PRUNERS)
def test_bad_statistics_are_refused_by_name(name):
    p = registry.get(name)
    W, H = _problem(6)
    if p.stats == "none":
        pytest.skip(f"{name} needs no statistics")
    with pytest.raises(ValueError, match=r"must have shape|must be \(|needs"):
        p.solve(W, H[:-1, :-1], SparsitySpec.parse("2:4"), p.options(), LayerContext(name))
    with pytest.raises(ValueError, match="needs"):
        p.solve(W, None, SparsitySpec.parse("2:4"), p.options(), LayerContext(name))


@pytest.mark.parametrize("name", PRUNERS)
def test_bad_pattern_is_refused(name):
    W, H = _problem(7)
    with pytest.raises(ValueError):
        _solve(name, W, H, "5:4")


@pytest.mark.parametrize("name", PRUNERS)
@pytest.mark.parametrize("pattern", ["2:4", "0.5"])
def test_native_ops_agree_with_the_references(name, pattern, monkeypatch):
    """The same solve on the pure-PyTorch references (SDSX_FORCE_REFERENCE=1) gives the same mask and
    weights within rounding."""
    W, H = _problem(8)
    native = _solve(name, W, H, pattern)
    monkeypatch.setenv("SDSX_FORCE_REFERENCE", "1")
    ref = _solve(name, W, H, pattern)
    assert torch.equal(native.mask, ref.mask)
    torch.testing.assert_close(native.weight, ref.weight, rtol=1e-4, atol=1e-5)


def test_ria_score_by_hand():
    """RIA keeps, per 2:4 group, the two largest (|W|/row sum + |W|/column sum) * ||X_j||^0.5."""
    W, H = _problem(9)
    A = W.abs()
    score = (A / A.sum(1, keepdim=True) + A / A.sum(0, keepdim=True)) * H.diagonal().sqrt().pow(0.5)
    top = score.reshape(OUT, -1, 4).topk(2, dim=-1).indices
    expected = torch.zeros(OUT, IN // 4, 4, dtype=torch.bool).scatter_(-1, top, True).reshape(OUT, IN)
    assert torch.equal(_solve("ria", W, H, "2:4").mask, expected)
    # alpha = 0: no activation factor
    score0 = A / A.sum(1, keepdim=True) + A / A.sum(0, keepdim=True)
    top0 = score0.reshape(OUT, -1, 4).topk(2, dim=-1).indices
    expected0 = torch.zeros(OUT, IN // 4, 4, dtype=torch.bool).scatter_(-1, top0, True).reshape(OUT, IN)
    assert torch.equal(_solve("ria", W, H, "2:4", alpha=0.0).mask, expected0)


def test_ria_refuses_a_bad_alpha():
    from sdsx.pruners.ria import RIAOptions

    with pytest.raises(ValueError, match="alpha"):
        RIAOptions(alpha=-1.0)


# ------------------------------------------------------------------------- SDS's layer phases
@pytest.mark.parametrize("pattern", ["2:4", "0.5"])
@pytest.mark.parametrize("name", SDS_PRUNERS)
def test_sds_layer_with_every_sds_pruner(name, pattern):
    """Sparse-dense-sparse on one layer with each pruner SDS may use: the pattern, exact zeros,
    the input untouched, deterministic, and never a higher calibration error than phase 1's."""
    from sdsx.pruners.sds import SDSOptions, sds_layer

    W, H = _problem(10, dead=2, duplicate=True)
    W0, H0 = W.clone(), H.clone()
    opts = SDSOptions(pruner=name, block_fit=False)
    a = sds_layer(W, H, pattern, opts)
    b = sds_layer(W, H, pattern, opts)
    assert torch.equal(W, W0) and torch.equal(H, H0)
    assert torch.equal(a.result.weight, b.result.weight)
    _assert_pattern(a.result.mask, pattern, f"sds-{name}")
    assert bool((a.result.weight[~a.result.mask] == 0).all())
    assert a.result.loss <= a.errors["sparse"] * (1 + 1e-6)


def _phase_inputs(phase_name: str, pruner: str, pattern: str, seed: int = 12):
    """A phase's problem and the weights the phases before it leave (what it runs on in SDS)."""
    from sdsx.pruners.sds import LayerProblem, SDSOptions, SharedH

    W, H = _problem(seed, dead=2, duplicate=True)
    opts = SDSOptions(pruner=pruner, block_fit=False)
    problem = LayerProblem(W, H, SparsitySpec.parse(pattern), opts, SharedH(opts)(H), "layer", H_stop=H)
    weight, mask = W, None
    for name, phase in PHASES.items():
        if name == phase_name:
            return phase, problem, weight, mask
        out = phase.run(problem, weight, mask)
        weight, mask = out.weight, out.mask
    raise AssertionError(f"no phase {phase_name!r}")


def test_phase_registry_order_and_options():
    from sdsx.pruners.sds import SDSOptions, tail_phases

    assert list(PHASES)[:4] == ["sparse", "dense", "sparse2", "adjust"]
    assert [p.name for p in tail_phases(SDSOptions())] == ["dense", "sparse2", "adjust"]
    assert [p.name for p in tail_phases(SDSOptions(redense=False))] == ["adjust"]
    assert [p.name for p in tail_phases(SDSOptions(adjust=False))] == ["dense", "sparse2"]


def test_a_second_phase_of_a_name_is_refused():
    from sdsx.pruners.sds import Phase, register_phase

    clash = Phase("adjust", PHASES["adjust"].run, lambda o: True, True, "a second adjustment")
    with pytest.raises(ValueError, match="already registered"):
        register_phase(clash)


@pytest.mark.parametrize("pattern", ["2:4", "0.5"])
@pytest.mark.parametrize("pruner", SDS_PRUNERS)
@pytest.mark.parametrize("phase_name", PHASE_NAMES)
def test_phase_contract(phase_name, pruner, pattern):
    """Every registered SDS phase with every SDS pruner: a bool mask of the weight's shape, the
    pattern and exact zeros where the phase is sparse, finite fp32 weights, its inputs untouched,
    deterministic."""
    phase, problem, weight, mask = _phase_inputs(phase_name, pruner, pattern)
    before = [t.clone() for t in (weight, problem.W_d, problem.H) + ((mask,) if mask is not None else ())]
    a = phase.run(problem, weight, mask)
    b = phase.run(problem, weight, mask)
    after = [weight, problem.W_d, problem.H] + ([mask] if mask is not None else [])
    assert all(torch.equal(x, y) for x, y in zip(before, after)), f"{phase_name} modified its inputs"
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask), f"{phase_name} is not deterministic"
    assert a.weight.shape == weight.shape and a.mask.dtype == torch.bool and a.mask.shape == weight.shape
    assert a.weight.dtype == torch.float32 and bool(torch.isfinite(a.weight).all())
    if phase.sparse:
        _assert_pattern(a.mask, pattern, f"{phase_name} ({pruner})")
        assert bool((a.weight[~a.mask] == 0).all()), f"{phase_name}: a pruned weight is not zero"


@pytest.mark.parametrize("pattern", ["2:4", "0.5"])
def test_fitting_phases_do_not_raise_their_objective(pattern):
    """Re-dense lowers its regularised fit from the pruned start; the adjustment, early-stopped on
    H_stop, never returns weights worse on it than its start."""
    from sdsx.pruners import reconstruction_error
    from sdsx.pruners.sds import objective, regularizer_scale

    phase, p, W, mask = _phase_inputs("dense", "sparsegpt", pattern)
    l1_abs, l2_abs = regularizer_scale(p.W_d, p.H, p.opts.l1, p.opts.l2)
    new = phase.run(p, W, mask).weight
    assert objective(new, p.W_d, p.shared.Hd, l1_abs, l2_abs) < objective(W, p.W_d, p.shared.Hd, l1_abs, l2_abs)
    phase, p, W, mask = _phase_inputs("adjust", "sparsegpt", pattern)
    out = phase.run(p, W, mask)
    assert reconstruction_error(p.W_d, out.weight, p.H_stop) <= reconstruction_error(p.W_d, W, p.H_stop) * (1 + 1e-6)


def test_a_registered_phase_runs_in_sds():
    """A new phase is its function and one registration: sds_tail runs it after the others."""
    from sdsx.pruners import PruneResult
    from sdsx.pruners.sds import LayerCall, Phase, SDSOptions, register_phase, sds_layer

    calls = []

    def halve_largest(problem, W, mask):  # a toy phase: zero the largest kept weight of each row
        calls.append(problem.name)
        out = W.float().clone()
        out[torch.arange(out.shape[0]), out.abs().argmax(1)] = 0
        return PruneResult(out, mask & (out != 0), float("nan"))

    W, H = _problem(13)
    register_phase(Phase("toy", halve_largest, lambda o: True, True, "a test phase"))
    try:
        res = sds_layer(W, H, "2:4", SDSOptions(block_fit=False, keep_better=False), LayerCall("q"))
    finally:
        del PHASES["toy"]
    assert calls == ["q"] and "toy" in res.errors
    assert list(res.errors)[:5] == ["sparse", "dense", "sparse2", "adjust", "toy"]
    assert int((~res.result.mask).sum(1).min()) > W.shape[1] // 2  # one more zero per row than 2:4


@pytest.mark.parametrize("name", SDS_PRUNERS)
def test_sds_runs_on_a_tiny_model_with_every_sds_pruner(name):
    from conftest import make_tiny, tiny_calib

    import sdsx

    model = make_tiny("llama")
    report = sdsx.sds_prune(model, tiny_calib(16), "2:4", name, progress=False, other_validation=None)
    assert report.method == f"sds-{name}"
    for layer in report.layers:
        assert abs(layer.sparsity - 0.5) < 1e-9


# ------------------------------------------------------------------------- options end to end
def test_prune_takes_a_pruners_own_options():
    from conftest import make_tiny, tiny_calib

    import sdsx

    calib = tiny_calib(8)
    a, b, c = make_tiny("llama"), make_tiny("llama"), make_tiny("llama")
    ra = sdsx.prune(a, calib, "ria", "2:4", progress=False)
    rb = sdsx.prune(b, calib, "ria", "2:4", progress=False, options={"alpha": 0.0})
    sdsx.prune(c, calib, "ria", "2:4", progress=False, options={"alpha": 0.5})
    weights = lambda m: torch.cat([p.flatten() for n, p in sorted(m.named_parameters()) if "layers" in n])  # noqa: E731
    assert not torch.equal(weights(a), weights(b)), "alpha=0 must change RIA's masks"
    assert torch.equal(weights(a), weights(c)), "the default alpha is 0.5"
    assert ra.options["pruner_options"] == {"alpha": 0.5} and rb.options["pruner_options"] == {"alpha": 0.0}


def test_prune_refuses_an_unknown_option_before_touching_the_model():
    from conftest import make_tiny, tiny_calib

    import sdsx

    model = make_tiny("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="ria has no option 'beta'; its options: alpha"):
        sdsx.prune(model, tiny_calib(8), "ria", "2:4", progress=False, options={"beta": 1})
    with pytest.raises(ValueError, match="alpha"):
        sdsx.prune(model, tiny_calib(8), "ria", "2:4", progress=False, options={"alpha": -1})
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_sds_passes_its_pruners_options_on():
    from sdsx.pruners.sds import SDSOptions, prune_once

    W, H = _problem(11)
    spec = SparsitySpec.parse("2:4")
    default = prune_once("ria", W, H, spec, SDSOptions(pruner="ria"), "layer")
    no_act = prune_once("ria", W, H, spec, SDSOptions(pruner="ria", pruner_options={"alpha": 0.0}), "layer")
    assert torch.equal(default.mask, _solve("ria", W, H, "2:4").mask)
    assert torch.equal(no_act.mask, _solve("ria", W, H, "2:4", alpha=0.0).mask)
    assert not torch.equal(default.mask, no_act.mask)
    with pytest.raises(ValueError, match="no option"):
        SDSOptions(pruner="ria", pruner_options={"blocksize": 3}).validate()
    # SDSOptions.alpha (the dense target's share) is not RIA's alpha
    assert SDSOptions(pruner="ria", alpha=0.25).pruner_settings().alpha == 0.5
