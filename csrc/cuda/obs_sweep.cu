// The in-block column loop of the SparseGPT / OBS sweep on the GPU. Once a block's mask rule is
// fixed, every row runs its own sequential loop over the block's columns, so one thread owns one row
// and walks the columns; the block's weights are stored transposed (column k of all rows contiguous)
// so that each step of that walk is a coalesced access for the warp, and the row of U that every
// thread needs at a step is the same address for the whole warp (a broadcast). The lazy GEMM after
// the block and the unstructured top-k selection are ATen calls in cuda/bindings.cpp.
//
// The arithmetic is cpu/obs_sweep.cpp's operation by operation, with explicitly rounded intrinsics
// (no fused multiply-add), so within a block both devices produce the same bits and the same masks.
#include <algorithm>

#include "cuda/kernels.h"

namespace sdsx::cuda {
namespace {

constexpr int kScoreThreads = 256;
// Rows per thread block: small, so that even a few hundred rows spread over many multiprocessors.
constexpr int kRowThreads = 64;

// w^2 / d^2, the OBS saliency of pruning w with d = U_jj, rounded like the CPU's (wk * wk) / (d * d).
__device__ __forceinline__ float saliency(float w, float d) { return __fdiv_rn(__fmul_rn(w, w), __fmul_rn(d, d)); }

__global__ void obs_block_scores_kernel(const float* __restrict__ wt, const float* __restrict__ u, int64_t rows,
                                        int64_t cols, int64_t i1, int64_t cnt, float* __restrict__ scores) {
  const int64_t total = rows * cnt;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t k = e / rows, r = e - k * rows;
    const int64_t j = i1 + k;
    scores[r * cnt + k] = saliency(wt[e], u[j * cols + j]);
  }
}

__global__ void obs_block_kernel(float* __restrict__ wt, bool* __restrict__ keep_t, float* __restrict__ et,
                                 float* __restrict__ loss, const float* __restrict__ u, int64_t rows, int64_t cols,
                                 int64_t i1, int64_t cnt, int64_t n, int64_t m) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  // This row's view of the block: column k at w[k * rows]. U[i1 + a, i1 + b] is ub[a * cols + b].
  float* w = wt + r;
  bool* keep = keep_t + r;
  float* e = et + r;
  const float* ub = u + i1 * cols + i1;
  const int64_t dstep = cols + 1;  // from U_jj to U_{j+1,j+1}

  float lrow = 0.f;
  for (int64_t k = 0; k < cnt; ++k) {
    const int64_t j = i1 + k;
    if (m > 0 && j % m == 0) {
      // n:m choice on the already compensated weights of the next m columns; rank by counting, as
      // select_group does (scores recomputed instead of stored: m is a runtime value).
      for (int64_t a = 0; a < m; ++a) {
        const float sa = saliency(w[(k + a) * rows], ub[(k + a) * dstep]);
        int64_t rank = 0;
        for (int64_t b = 0; b < m; ++b) {
          const float sb = saliency(w[(k + b) * rows], ub[(k + b) * dstep]);
          rank += (sb > sa) || (sb == sa && b < a);
        }
        keep[(k + a) * rows] = rank < n;
      }
    }
    const float wk = w[k * rows];
    const float d = ub[k * dstep];
    const float q = keep[k * rows] ? wk : 0.f;
    const float diff = __fsub_rn(wk, q);
    const float err = __fdiv_rn(diff, d);
    lrow = __fadd_rn(lrow, saliency(diff, d));
    e[k * rows] = err;
    w[k * rows] = q;
    // Skipped at err == 0 like on the CPU (it also keeps the sign of zero weights the same).
    if (err != 0.f) {
      const float* urow = ub + k * dstep;  // U[j, j + (t - k)] = urow[t - k]
      for (int64_t t = k + 1; t < cnt; ++t) w[t * rows] = __fsub_rn(w[t * rows], __fmul_rn(err, urow[t - k]));
    }
  }
  loss[r] = __fadd_rn(loss[r], lrow);
}

}  // namespace

void launch_obs_block_scores(const float* wt, const float* u, int64_t rows, int64_t cols, int64_t i1, int64_t cnt,
                             float* scores, cudaStream_t stream) {
  const int64_t total = rows * cnt;
  if (total <= 0) return;
  const int64_t blocks = std::min<int64_t>((total + kScoreThreads - 1) / kScoreThreads, int64_t{1} << 16);
  obs_block_scores_kernel<<<static_cast<unsigned>(blocks), kScoreThreads, 0, stream>>>(wt, u, rows, cols, i1, cnt,
                                                                                       scores);
}

void launch_obs_block(float* wt, bool* keep_t, float* et, float* loss, const float* u, int64_t rows, int64_t cols,
                      int64_t i1, int64_t cnt, int64_t n, int64_t m, cudaStream_t stream) {
  if (rows <= 0 || cnt <= 0) return;
  const int64_t blocks = (rows + kRowThreads - 1) / kRowThreads;
  obs_block_kernel<<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(wt, keep_t, et, loss, u, rows, cols, i1,
                                                                              cnt, n, m);
}

}  // namespace sdsx::cuda
