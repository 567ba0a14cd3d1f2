"""The CUDA kernels against the CPU kernels (torch.ops.sdsx.* on CPU tensors): identical masks, the
same weights (bit for bit where the computation is the same), the same losses; the pipelines on a
GPU; streams and devices. Every test skips on a machine without a GPU. On a machine with one, a
build without CUDA kernels fails here instead of skipping: this file cannot pass on a GPU machine
without running the CUDA kernels."""

from __future__ import annotations

import pytest
import torch

from sdsx import _ext, ops

pytestmark = pytest.mark.cuda

NM = [(2, 4), (4, 8), (1, 4)]
SPARSITIES = [0.3, 0.5, 0.7]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Weight tolerance relative to max |W| when the two lazy GEMMs (cuBLAS and the CPU's BLAS) round
# differently: the fp32 drift they accumulate, or one rounding step of a half-precision output.
DENSE_FACTOR_ATOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _require(op: str) -> None:
    """Skip without a GPU; with one, fail unless the build registered a CUDA kernel for ``op``."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    missing = _ext.missing_cuda_kernels()  # a broken install raises ImportError here: an error, not a skip
    if op in missing:
        pytest.fail(f"a GPU is visible but this sdsx build has no CUDA kernel for {op} (missing: {missing}); "
                    "rebuild with `SDSX_CUDA=ON pip install --no-build-isolation .`", pytrace=False)


def test_require_fails_on_a_gpu_machine_whose_build_lacks_cuda_kernels(monkeypatch):
    # Runs everywhere: what _require does where a GPU is visible and the build dropped CUDA.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "missing_cuda_kernels", lambda: list(_ext.CUDA_OP_NAMES))
    with pytest.raises(pytest.fail.Exception, match="no CUDA kernel for obs_sweep"):
        _require("obs_sweep")
    monkeypatch.setattr(_ext, "missing_cuda_kernels", lambda: [])
    _require("obs_sweep")  # no skip, no failure


def test_every_cuda_op_has_a_kernel_and_runs_it():
    _require("nm_mask")
    assert not _ext.missing_cuda_kernels()
    info = _ext.backend_info()
    assert info["cuda_kernels"] and info["cuda_available"], info
    # The wrappers route CUDA tensors to the extension's CUDA kernels (not the references).
    for op in _ext.CUDA_OP_NAMES:
        assert _ext.has_kernel(op, "cuda"), op
    s = torch.randn(8, 16, device="cuda")
    assert torch.equal(ops.nm_mask(s, 2, 4).cpu(), torch.ops.sdsx.nm_mask(s.cpu(), 2, 4))


def _scores(shape, ties: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if not ties:
        return torch.randn(shape, generator=g)
    # Few distinct values, and zeros of both signs: -0 must tie with +0 as on the CPU.
    s = torch.randint(0, 3, shape, generator=g).float()
    neg = torch.rand(shape, generator=g) < 0.5
    return torch.where((s == 0) & neg, torch.tensor(-0.0), s)


# ---------------------------------------------------------------- nm_mask / topk_mask


@pytest.mark.parametrize("n,m", NM + [(0, 4), (4, 4)])
@pytest.mark.parametrize("shape", [(7, 16), (33, 64), (3, 5, 24)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_nm_mask_cuda_matches_cpu(n, m, shape, dtype, ties):
    _require("nm_mask")
    scores = _scores(shape, ties).to(dtype)
    want = torch.ops.sdsx.nm_mask(scores, n, m)
    got = torch.ops.sdsx.nm_mask(scores.cuda(), n, m)
    assert got.is_cuda and got.dtype == torch.bool and got.shape == scores.shape
    assert torch.equal(got.cpu(), want)


def test_nm_mask_cuda_ties_and_strided_input():
    _require("nm_mask")
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0]], device="cuda")
    assert torch.ops.sdsx.nm_mask(scores, 2, 4).tolist() == [[True, True, False, False, False, True, True, False]]
    base = _scores((24, 10), ties=True)
    got = torch.ops.sdsx.nm_mask(base.cuda().t(), 2, 4)  # a transposed (non-contiguous) view
    assert torch.equal(got.cpu(), torch.ops.sdsx.nm_mask(base.t(), 2, 4))


@pytest.mark.parametrize("sparsity", SPARSITIES + [0.0])
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("shape", [(9, 37), (64, 128), (2, 3, 50), (1000,)])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_mask_cuda_matches_cpu(sparsity, per_row, shape, ties):
    _require("topk_mask")
    scores = _scores(shape, ties, seed=1)
    want = torch.ops.sdsx.topk_mask(scores, sparsity, per_row)
    got = torch.ops.sdsx.topk_mask(scores.cuda(), sparsity, per_row)
    assert got.is_cuda and got.dtype == torch.bool and got.shape == scores.shape
    assert torch.equal(got.cpu(), want)


def test_topk_mask_cuda_empty_and_low_precision():
    _require("topk_mask")
    assert torch.ops.sdsx.topk_mask(torch.empty(0, 5, device="cuda"), 0.5, True).shape == (0, 5)
    scores = _scores((16, 40), ties=False, seed=2).to(torch.bfloat16)  # bf16 rounding makes ties
    for per_row in (True, False):
        want = torch.ops.sdsx.topk_mask(scores, 0.5, per_row)
        assert torch.equal(torch.ops.sdsx.topk_mask(scores.cuda(), 0.5, per_row).cpu(), want)


# ---------------------------------------------------------------- obs_sweep


def _upper_factor(H: torch.Tensor) -> torch.Tensor:
    """U with U^T U = (H + 1% mean-diagonal damping)^-1, U upper triangular, as SparseGPT uses it."""
    H = H.double()
    H = H + 0.01 * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(Hinv, upper=True).float()


def _sweep_problem(rows: int, cols: int, blocksize: int, block_diagonal: bool, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g).to(dtype)
    X = torch.randn(2 * cols, cols, generator=g) * torch.rand(cols, generator=g).add(0.1)
    H = X.t() @ X / X.shape[0]
    if not block_diagonal:
        return W, _upper_factor(H)
    # U without coupling between blocks: the lazy GEMM then subtracts exact zeros, so the whole sweep
    # is bit-for-bit the same computation on both devices (all block offsets are still exercised).
    U = torch.zeros(cols, cols)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        U[i1:i2, i1:i2] = _upper_factor(H[i1:i2, i1:i2])
    return W, U


# (sparsity, n, m): unstructured at each sparsity, then n:m
PATTERNS = [(s, 0, 0) for s in SPARSITIES] + [(0.0, n, m) for n, m in NM]
# (rows, cols, blocksize): several blocks with a short last one; a single block wider than W; rows
# that are not a multiple of a warp. cols and blocksize are multiples of 8 so every n:m pattern fits.
SHAPES = [(64, 104, 32), (37, 96, 128), (48, 200, 64)]


def _pattern_id(p):
    s, n, m = p
    return f"{n}:{m}" if m else f"p{s}"


def _check_valid(W_out, mask, n, m):
    assert (W_out[~mask] == 0).all()  # pruned weights are exact zeros
    if m:
        assert (mask.reshape(-1, m).sum(-1) == n).all()


@pytest.mark.parametrize("pattern", PATTERNS, ids=_pattern_id)
@pytest.mark.parametrize("rows,cols,blocksize", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_obs_sweep_cuda_matches_cpu_exactly(pattern, rows, cols, blocksize, dtype):
    _require("obs_sweep")
    sparsity, n, m = pattern
    W, U = _sweep_problem(rows, cols, blocksize, block_diagonal=True, dtype=dtype)
    W_cpu, mask_cpu, loss_cpu = torch.ops.sdsx.obs_sweep(W, U, sparsity, n, m, blocksize)
    W_gpu, mask_gpu, loss_gpu = torch.ops.sdsx.obs_sweep(W.cuda(), U.cuda(), sparsity, n, m, blocksize)
    assert W_gpu.is_cuda and W_gpu.dtype == dtype and mask_gpu.dtype == torch.bool and loss_gpu.dtype == torch.float32
    _assert_same_bits((W_gpu, mask_gpu, loss_gpu), (W_cpu, mask_cpu, loss_cpu))
    _check_valid(W_gpu.cpu(), mask_gpu.cpu(), n, m)


def _assert_same_bits(got, want):
    """The sweep's three outputs equal bit for bit (signs of zero aside, which torch.equal ignores)."""
    for name, g, w in zip(("weights", "mask", "loss"), got, want):
        g = g.cpu()
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if not torch.equal(g, w):
            bad = int((g != w).sum())
            pytest.fail(f"{name}: {bad} of {w.numel()} entries differ from the CPU kernel's", pytrace=False)


# Several thread blocks of rows, with tiles of 8, 16 and 32 rows on a 132-multiprocessor H200 (4,224
# and 8,448 rows switch the tile size) and a last tile that is not full.
BIG = [(4096, 256, 128), (4231, 192, 64), (8500, 128, 128)]


@pytest.mark.parametrize("pattern", [(0.5, 0, 0), (0.0, 2, 4), (0.0, 4, 8)], ids=_pattern_id)
@pytest.mark.parametrize("rows,cols,blocksize", BIG)
def test_obs_sweep_cuda_many_row_tiles_exactly(pattern, rows, cols, blocksize):
    _require("obs_sweep")
    sparsity, n, m = pattern
    W, U = _sweep_problem(rows, cols, blocksize, block_diagonal=True, dtype=torch.float32, seed=5)
    want = torch.ops.sdsx.obs_sweep(W, U, sparsity, n, m, blocksize)
    got = torch.ops.sdsx.obs_sweep(W.cuda(), U.cuda(), sparsity, n, m, blocksize)
    _assert_same_bits(got, want)


def test_obs_sweep_cuda_block_wider_than_shared_memory():
    # A 9,856-column block does not fit one row in 48 KiB of shared memory: the kernel sweeps W in
    # place. Any upper-triangular U with a positive diagonal is a valid input for this comparison.
    _require("obs_sweep")
    rows, cols = 5, 9856
    g = torch.Generator().manual_seed(6)
    W = torch.randn(rows, cols, generator=g)
    U = torch.triu(torch.randn(cols, cols, generator=g) * 0.01, 1) + torch.diag(torch.rand(cols, generator=g) + 0.5)
    for sparsity, n, m in [(0.5, 0, 0), (0.0, 2, 4)]:
        want = torch.ops.sdsx.obs_sweep(W, U, sparsity, n, m, cols)
        _assert_same_bits(torch.ops.sdsx.obs_sweep(W.cuda(), U.cuda(), sparsity, n, m, cols), want)


@pytest.mark.parametrize("pattern", PATTERNS, ids=_pattern_id)
@pytest.mark.parametrize("rows,cols,blocksize", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_obs_sweep_cuda_matches_cpu_dense_factor(pattern, rows, cols, blocksize, dtype):
    _require("obs_sweep")
    sparsity, n, m = pattern
    W, U = _sweep_problem(rows, cols, blocksize, block_diagonal=False, dtype=dtype, seed=3)
    W_cpu, mask_cpu, loss_cpu = torch.ops.sdsx.obs_sweep(W, U, sparsity, n, m, blocksize)
    got = torch.ops.sdsx.obs_sweep(W.cuda(), U.cuda(), sparsity, n, m, blocksize)
    W_gpu, mask_gpu, loss_gpu = (t.cpu() for t in got)
    _check_valid(W_gpu, mask_gpu, n, m)
    assert int(mask_gpu.sum()) == int(mask_cpu.sum())  # the same count per block (or per group)
    # The first block sees no GEMM: identical on both devices.
    B = min(blocksize, cols)
    assert torch.equal(mask_gpu[:, :B], mask_cpu[:, :B])
    assert torch.equal(W_gpu[:, :B], W_cpu[:, :B])
    # Later blocks start from weights the two GEMMs rounded differently. An exact near-tie can then
    # flip, and a flip changes the rest of that row; with these seeds none is expected, but the test
    # allows a few rows rather than depend on BLAS summation orders, and compares the rest.
    same = (mask_gpu == mask_cpu).all(1)
    assert float(same.float().mean()) >= 0.9, f"{int((~same).sum())} of {rows} rows chose different masks"
    scale = float(W.float().abs().max())
    atol = DENSE_FACTOR_ATOL[dtype] * scale
    torch.testing.assert_close(W_gpu[same].float(), W_cpu[same].float(), rtol=0, atol=atol)
    torch.testing.assert_close(loss_gpu[same], loss_cpu[same], rtol=1e-4, atol=1e-6 * float(loss_cpu.abs().max()))


def test_obs_sweep_cuda_rejects_mixed_devices_and_non_finite():
    _require("obs_sweep")
    W, U = _sweep_problem(8, 16, 8, block_diagonal=False, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="one CUDA device"):
        torch.ops.sdsx.obs_sweep(W.cuda(), U, 0.5, 0, 0, 8)
    W[3, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):  # like the CPU kernel
        torch.ops.sdsx.obs_sweep(W.cuda(), U.cuda(), 0.5, 0, 0, 8)


@pytest.mark.parametrize("op,args", [("nm_mask", (2, 4)), ("topk_mask", (0.5, True))])
def test_masks_cuda_reject_non_finite(op, args):
    _require(op)
    scores = torch.randn(4, 8, device="cuda")
    scores[1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):  # like the CPU kernel
        getattr(torch.ops.sdsx, op)(scores, *args)


# ---------------------------------------------------------------- prox_step


@pytest.mark.parametrize("shape", [(33, 70), (128, 256)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_prox_step_cuda_matches_cpu(shape, masked, transposed):
    _require("prox_step")
    g = torch.Generator().manual_seed(4)
    Y, W_prev, G = (torch.randn(shape, generator=g) for _ in range(3))
    if transposed:  # non-contiguous inputs
        Y, W_prev, G = (t.t().contiguous().t() for t in (Y, W_prev, G))
    mask = (torch.rand(shape, generator=g) < 0.5) if masked else None
    args = (0.1, 0.05, 0.1, 0.3)
    want = torch.ops.sdsx.prox_step(Y, W_prev, G, *args, mask)
    got = torch.ops.sdsx.prox_step(Y.cuda(), W_prev.cuda(), G.cuda(), *args, None if mask is None else mask.cuda())
    for w, h in zip(want, got):
        assert h.is_cuda and h.shape == w.shape
        torch.testing.assert_close(h.cpu(), w, rtol=0, atol=1e-6 * float(w.abs().max()))
    if masked:
        assert (got[0].cpu()[~mask] == 0).all()


def test_obs_sweep_cuda_ignores_global_tf32():
    # The lazy GEMM runs in full fp32 whatever the caller's setting, which the op leaves as it was.
    _require("obs_sweep")
    W, U = _sweep_problem(256, 512, 128, block_diagonal=False, dtype=torch.float32, seed=7)
    W, U = W.cuda(), U.cuda()
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        want = torch.ops.sdsx.obs_sweep(W, U, 0.0, 2, 4, 128)
        torch.set_float32_matmul_precision("high")  # TF32 on
        got = torch.ops.sdsx.obs_sweep(W, U, 0.0, 2, 4, 128)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(saved)
    _assert_same_bits(got, tuple(t.cpu() for t in want))


# ---------------------------------------------------------------- large inputs, streams, devices


def test_elementwise_ops_past_2_to_the_24_elements():
    # 4,097 x 4,096 = 16.78M elements: more than 2^24 (float-exact integers) and than one grid pass.
    _require("prox_step")
    g = torch.Generator().manual_seed(8)
    s = torch.randn(4097, 4096, generator=g)
    sc = s.cuda()
    assert torch.equal(torch.ops.sdsx.nm_mask(sc, 2, 4).cpu(), torch.ops.sdsx.nm_mask(s, 2, 4))
    assert torch.equal(torch.ops.sdsx.topk_mask(sc, 0.5, True).cpu(), torch.ops.sdsx.topk_mask(s, 0.5, True))
    want = torch.ops.sdsx.prox_step(s, s * 0.5, s * 0.1, 0.1, 0.01, 0.1, 0.3, None)
    got = torch.ops.sdsx.prox_step(sc, sc * 0.5, sc * 0.1, 0.1, 0.01, 0.1, 0.3, None)
    for w, h in zip(want, got):  # equal bits where the CPU build does not contract to FMA (x86)
        torch.testing.assert_close(h.cpu(), w, rtol=0, atol=1e-6 * float(w.abs().max()))


def test_kernels_run_on_the_current_stream():
    # Inputs written on a side stream after a long sleep: a kernel launched on another stream would
    # read them before they are written. prox_step has no host sync that would hide that.
    _require("prox_step")
    g = torch.Generator().manual_seed(9)
    Y, Wp, G = (torch.randn(512, 1024, generator=g) for _ in range(3))
    want = torch.ops.sdsx.prox_step(Y, Wp, G, 0.1, 0.05, 0.1, 0.3, None)
    src = [t.cuda() for t in (Y, Wp, G)]
    dst = [torch.zeros_like(t) for t in src]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # a few tens of milliseconds of GPU time
        for d, t in zip(dst, src):
            d.copy_(t)
        got = torch.ops.sdsx.prox_step(*dst, 0.1, 0.05, 0.1, 0.3, None)
        sweep_W, sweep_U = _sweep_problem(64, 256, 64, block_diagonal=True, dtype=torch.float32)
        sweep = torch.ops.sdsx.obs_sweep(sweep_W.cuda(), sweep_U.cuda(), 0.0, 2, 4, 64)
    side.synchronize()
    for w, h in zip(want, got):  # zeros (the inputs not yet written) would be far off
        torch.testing.assert_close(h.cpu(), w, rtol=0, atol=1e-6 * float(w.abs().max()))
    _assert_same_bits(sweep, torch.ops.sdsx.obs_sweep(sweep_W, sweep_U, 0.0, 2, 4, 64))


def test_ops_on_a_second_device():
    _require("obs_sweep")
    if torch.cuda.device_count() < 2:
        pytest.skip("one CUDA device")
    W, U = _sweep_problem(40, 96, 32, block_diagonal=True, dtype=torch.float32)
    with torch.cuda.device(0):  # the current device is not the tensors' one: the ops must switch
        got = torch.ops.sdsx.obs_sweep(W.to("cuda:1"), U.to("cuda:1"), 0.5, 0, 0, 32)
        s = torch.randn(8, 16)
        mask = torch.ops.sdsx.nm_mask(s.to("cuda:1"), 2, 4)
    assert all(t.device == torch.device("cuda:1") for t in (*got, mask))
    _assert_same_bits(got, torch.ops.sdsx.obs_sweep(W, U, 0.5, 0, 0, 32))
    assert torch.equal(mask.cpu(), torch.ops.sdsx.nm_mask(s, 2, 4))


# ---------------------------------------------------------------- pipelines on the GPU


@pytest.fixture
def cuda_calls(monkeypatch):
    """The (op, device) of every native call the op wrappers make."""
    calls = []
    real = ops._call_native

    def spy(op, *args):
        calls.append((op, args[0].device.type))
        return real(op, *args)

    monkeypatch.setattr(ops, "_call_native", spy)
    return calls


def _layer_problem(rows=192, cols=256, tokens=1024, seed=10):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(tokens, cols, generator=g) * torch.rand(cols, generator=g).add(0.1)
    return W, X.t() @ X / tokens


@pytest.mark.parametrize("spec", ["2:4", 0.5])
def test_sparsegpt_on_cuda_matches_cpu(spec, cuda_calls):
    _require("obs_sweep")
    from sdsx.pruners import sparsegpt

    W, H = _layer_problem()
    want = sparsegpt(W, H, spec, blocksize=128)
    got = sparsegpt(W.cuda(), H.cuda(), spec, blocksize=128)
    assert ("obs_sweep", "cuda") in cuda_calls
    assert got.weight.is_cuda
    mask_cpu, mask_gpu = want.mask, got.mask.cpu()
    # The factor (cuSOLVER vs LAPACK) and the GEMMs round differently: a near-tie may flip, and a
    # flip changes the rest of its row. (Thresholds not yet calibrated on a GPU run.)
    assert float((mask_gpu == mask_cpu).float().mean()) > 0.97
    assert abs(got.loss - want.loss) <= 1e-3 * abs(want.loss)


def test_sds_layer_on_cuda_matches_cpu(cuda_calls):
    _require("prox_step")
    from sdsx.pruners.sds import SDSOptions, sds_layer

    W, H = _layer_problem(seed=11)
    opts = SDSOptions(dense_iters=20, adjust_iters=10)
    want = sds_layer(W, H, "2:4", opts)
    got = sds_layer(W.cuda(), H.cuda(), "2:4", opts)
    assert {("obs_sweep", "cuda"), ("prox_step", "cuda")} <= set(cuda_calls)
    assert got.result.weight.is_cuda
    mask = got.result.mask.cpu()
    assert (mask.view(W.shape[0], -1, 4).sum(-1) <= 2).all()
    assert float((mask == want.result.mask).float().mean()) > 0.98
    err_cpu, err_gpu = want.errors, got.errors
    for phase in err_cpu:
        assert abs(err_gpu[phase] - err_cpu[phase]) <= 2e-2 * abs(err_cpu[phase]) + 1e-6, phase


def test_prune_on_cuda_matches_cpu(cuda_calls):
    _require("obs_sweep")
    import copy

    from conftest import make_tiny, tiny_calib

    import sdsx

    model = make_tiny("llama", layers=2)
    calib = tiny_calib(8, 32)
    on_cpu, on_gpu = copy.deepcopy(model), copy.deepcopy(model)
    rep_cpu = sdsx.prune(on_cpu, calib, method="sparsegpt", sparsity="2:4", device="cpu", progress=False)
    rep_gpu = sdsx.prune(on_gpu, calib, method="sparsegpt", sparsity="2:4", device="cuda", progress=False)
    assert ("obs_sweep", "cuda") in cuda_calls
    agree = [float(((a != 0) == (b != 0)).float().mean()) for a, b in
             zip(on_cpu.state_dict().values(), on_gpu.state_dict().values()) if a.dim() == 2]
    assert min(agree) > 0.97, agree
    assert abs(rep_gpu.total_error - rep_cpu.total_error) <= 0.05 * abs(rep_cpu.total_error)
