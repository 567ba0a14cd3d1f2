"""The CUDA sweep kernel of csrc/cuda/obs_sweep.cu, compiled with g++ and run on the CPU (one thread
per CUDA thread, a barrier per __syncthreads: tests/cuda_emu/), driven block by block the way
cuda/bindings.cpp drives it. Checks its indexing, tiling and phase order without a GPU: masks,
weights and losses must equal the CPU kernel's bit for bit where the lazy GEMM subtracts exact zeros.
What it cannot check (real warps, memory, launch limits) is for tests/test_cuda.py on a GPU."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import sdsx
from sdsx import ops

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the emulated kernel")


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> ctypes.CDLL:
    src = (ROOT / "csrc/cuda/obs_sweep.cu").read_text()
    # The three CUDA-only constructs the shim header cannot stand in for.
    src = src.replace("extern __shared__ float smem[];", "float* smem = emu::shared;")
    src = src.replace("constexpr size_t kSharedBytes", "size_t kSharedBytes")
    src, launches = re.subn(r"(\w+)<<<(.*?)>>>\((.*?)\);", r"emu::launch(\1, \2, \3);", src, flags=re.S)
    assert launches == 2 and "emu::shared" in src, "obs_sweep.cu changed shape: update this harness"
    src += """
extern "C" void emu_set_shared_bytes(size_t b) { sdsx::cuda::kSharedBytes = b; }
extern "C" void emu_scores(const float* w, const float* u, int64_t rows, int64_t cols, int64_t i1, int64_t cnt,
                           float* scores) { sdsx::cuda::launch_obs_block_scores(w, u, rows, cols, i1, cnt, scores, nullptr); }
extern "C" void emu_block(float* w, bool* keep, float* err, int64_t ld_err, float* loss, const float* u, int64_t rows,
                          int64_t cols, int64_t i1, int64_t cnt, int64_t n, int64_t m, int sms) {
  sdsx::cuda::launch_obs_block(w, keep, err, ld_err, loss, u, rows, cols, i1, cnt, n, m, sms, nullptr);
}
"""
    d = tmp_path_factory.mktemp("cuda_emu")
    (d / "obs_sweep_emu.cpp").write_text(src)
    so = d / "obs_sweep_emu.so"
    subprocess.run(["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread",
                    f"-I{ROOT / 'tests/cuda_emu'}", f"-I{ROOT / 'csrc'}", str(d / "obs_sweep_emu.cpp"), "-o", str(so)],
                   check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(so))
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.emu_set_shared_bytes.argtypes = [ctypes.c_size_t]
    lib.emu_scores.argtypes = [p, p, i64, i64, i64, i64, p]
    lib.emu_block.argtypes = [p, p, p, i64, p, p, i64, i64, i64, i64, i64, i64, ctypes.c_int]
    return lib


def _sweep(lib, W, U, sparsity, n, m, blocksize, sms):
    """cuda/bindings.cpp's obs_sweep_cuda, with the kernels emulated and ATen on the CPU."""
    rows, cols = W.shape
    Wf, Uc = W.float().clone().contiguous(), U.contiguous()
    mask = torch.ones(rows, cols, dtype=torch.bool)
    loss = torch.zeros(rows)
    B = min(blocksize, cols)
    E = torch.empty(rows, B)
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        cnt = i2 - i1
        if not m and sparsity > 0:
            scores = torch.empty(rows, cnt)
            lib.emu_scores(Wf.data_ptr(), Uc.data_ptr(), rows, cols, i1, cnt, scores.data_ptr())
            flat = scores.view(-1)
            n_keep = flat.numel() - int(sparsity * flat.numel())
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[torch.sort(flat.add(0.0), stable=True, descending=True).indices[:n_keep]] = True
            mask[:, i1:i2] = keep.view(rows, cnt)
        lib.emu_block(Wf.data_ptr(), mask.data_ptr(), E.data_ptr(), B, loss.data_ptr(), Uc.data_ptr(), rows, cols, i1,
                      cnt, n if m else 0, m, sms)
        if i2 < cols:
            Wf[:, i2:] -= E[:, :cnt] @ Uc[i1:i2, i2:]
    return Wf, mask, loss


def _block_diagonal_problem(rows, cols, blocksize, seed=0):
    # U without coupling between blocks: the lazy GEMM subtracts exact zeros, so the whole sweep is
    # the same computation as the CPU kernel's, bit for bit.
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    U = torch.zeros(cols, cols)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        X = torch.randn(2 * (i2 - i1), i2 - i1, generator=g, dtype=torch.float64)
        H = X.t() @ X / X.shape[0] + 0.01 * torch.eye(i2 - i1, dtype=torch.float64)
        U[i1:i2, i1:i2] = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    return W, U


# (sparsity, n, m, rows, cols, blocksize, multiprocessors, shared bytes): partial row tiles (37 rows
# in tiles of 8 or 16), a short last block, n:m groups, and the in-place path for blocks too wide
# for shared memory (a 256-byte limit forces it here).
CASES = [
    (0.5, 0, 0, 37, 80, 32, 132, 48 * 1024),
    (0.3, 0, 0, 37, 80, 32, 1, 48 * 1024),
    (0.0, 2, 4, 37, 80, 32, 1, 48 * 1024),
    (0.0, 4, 8, 20, 48, 48, 132, 48 * 1024),
    (0.0, 1, 4, 20, 48, 16, 132, 48 * 1024),
    (0.5, 0, 0, 20, 48, 16, 132, 256),
    (0.0, 2, 4, 20, 48, 16, 132, 256),
]


@pytest.mark.parametrize("sparsity,n,m,rows,cols,blocksize,sms,shared", CASES)
def test_emulated_cuda_sweep_equals_the_cpu_kernel(lib, sparsity, n, m, rows, cols, blocksize, sms, shared):  # noqa: PLR0913
    if not sdsx.backend_info()["extension_loaded"]:
        pytest.skip("the CPU kernel (the exact reference for this comparison) is not built")
    lib.emu_set_shared_bytes(shared)
    W, U = _block_diagonal_problem(rows, cols, blocksize)
    W_cpu, mask_cpu, loss_cpu = ops.obs_sweep(W, U, sparsity, n, m, blocksize)
    W_emu, mask_emu, loss_emu = _sweep(lib, W, U, sparsity, n, m, blocksize, sms)
    assert torch.equal(mask_emu, mask_cpu)
    assert torch.equal(W_emu, W_cpu)
    assert torch.equal(loss_emu, loss_cpu)
    if m:
        assert (mask_emu.view(rows, -1, m).sum(-1) == n).all()
    assert (W_emu[~mask_emu] == 0).all()
