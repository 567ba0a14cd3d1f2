// The in-block column loop of the SparseGPT / OBS sweep on the GPU. A thread block owns a tile of
// rows x the block's columns, held in shared memory, and walks the columns in order; at each column
// it computes every row's error (one thread a row), then applies the OBS update of all later columns
// in parallel over (row, column): threadIdx.x runs along the columns (a warp reads consecutive U
// entries and shared-memory words) and threadIdx.y along the rows. The lazy GEMM after the block and
// the unstructured top-k selection are ATen calls in cuda/bindings.cpp.
//
// Every element still receives its updates one column at a time in increasing order, each product
// rounded before it is subtracted (explicitly rounded intrinsics, no fused multiply-add), and the
// arithmetic is cpu/obs_sweep.cpp's operation by operation: within a block both devices produce the
// same bits and the same masks.
#include <algorithm>

#include "cuda/kernels.h"

namespace sdsx::cuda {
namespace {

constexpr int kScoreThreads = 256;
constexpr int kColThreads = 32;  // threadIdx.x: columns of the tile
constexpr int kRowThreads = 8;   // threadIdx.y: rows of the tile
constexpr int kThreads = kColThreads * kRowThreads;
constexpr int kMaxTileRows = 32;             // <= kThreads: one thread per row computes the errors
constexpr size_t kSharedBytes = 48 * 1024;   // what every GPU gives a block without opting in

// w^2 / d^2, the OBS saliency of pruning w with d = U_jj, rounded like the CPU's (wk * wk) / (d * d).
__device__ __forceinline__ float saliency(float w, float d) { return __fdiv_rn(__fmul_rn(w, w), __fmul_rn(d, d)); }

__global__ void obs_block_scores_kernel(const float* __restrict__ w, const float* __restrict__ u, int64_t rows,
                                        int64_t cols, int64_t i1, int64_t cnt, float* __restrict__ scores) {
  const int64_t total = rows * cnt;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t r = e / cnt, k = e - r * cnt;
    const int64_t j = i1 + k;
    scores[e] = saliency(w[r * cols + j], u[j * cols + j]);
  }
}

struct Sweep {
  float* w;          // rows x cols weights (row-major), updated in place over the block's columns
  bool* keep;        // rows x cols mask: read (unstructured) or written (n:m) over the block's columns
  float* err;        // rows x ld_err errors (w - q) / d of the block, for the lazy GEMM
  float* loss;       // rows: the block's sum of (w - q)^2 / d^2 is added
  const float* u;    // cols x cols upper factor (row-major), d_j = u[j, j]
  int64_t rows, cols, i1, cnt, ld_err;
  int n, m;          // m == 0: unstructured (mask given)
  int tile_rows;     // rows per thread block
  bool in_shared;    // the tile lives in shared memory; else the kernel works on w and keep in place
};

__global__ void __launch_bounds__(kThreads) obs_block_kernel(const Sweep s) {
  extern __shared__ float smem[];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kColThreads + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * s.tile_rows;
  const int nr = static_cast<int>(s.rows - r0 < s.tile_rows ? s.rows - r0 : s.tile_rows);
  // 32-bit column indices inside the block (a 64-bit modulo is a call that spills registers).
  const int cnt = static_cast<int>(s.cnt);
  const int64_t cols = s.cols;
  float* gw = s.w + r0 * cols + s.i1;  // this tile's part of the block in global memory
  bool* gk = s.keep + r0 * cols + s.i1;
  float* e = smem;  // the errors of the current column, one per row of the tile

  // The tile: in shared memory when it fits (element (r, t) at r * ld + t), else W and the mask themselves.
  float* tw = gw;
  bool* tk = gk;
  int64_t ld = cols;
  if (s.in_shared) {
    tw = smem + kMaxTileRows;
    tk = reinterpret_cast<bool*>(tw + static_cast<int64_t>(s.tile_rows) * cnt);
    ld = cnt;
    for (int r = ty; r < nr; r += kRowThreads)
      for (int t = tx; t < cnt; t += kColThreads) {
        tw[r * ld + t] = gw[r * cols + t];
        tk[r * ld + t] = gk[r * cols + t];
      }
  }
  __syncthreads();

  const float* ub = s.u + s.i1 * cols + s.i1;  // U[i1 + a, i1 + b] = ub[a * cols + b]
  const int64_t dstep = cols + 1;              // from U_jj to U_{j+1,j+1}
  float lrow = 0.f;                            // the loss of row `tid` of the tile (tid < nr)
  // Block starts are multiples of m (blocksize % m == 0), so groups start where k % m == 0.
  for (int k = 0; k < cnt; ++k) {
    if (s.m > 0 && k % s.m == 0) {
      // n:m choice on the already compensated weights of the next m columns, every (row, entry) at
      // once; rank by counting, as select_group does (larger first, lower index first among equals).
      for (int idx = tid; idx < nr * s.m; idx += kThreads) {
        const int r = idx / s.m, a = idx - r * s.m;
        const float* wr = tw + r * ld + k;
        const float sa = saliency(wr[a], ub[(k + a) * dstep]);
        int rank = 0;
        for (int b = 0; b < s.m; ++b) {
          const float sb = saliency(wr[b], ub[(k + b) * dstep]);
          rank += (sb > sa) || (sb == sa && b < a);
        }
        tk[r * ld + k + a] = rank < s.n;
      }
      __syncthreads();
    }
    // Prune column k: its error (w - q) / d and the loss, one thread a row.
    if (tid < nr) {
      const float d = ub[k * dstep];
      const float wk = tw[tid * ld + k];
      const float q = tk[tid * ld + k] ? wk : 0.f;
      const float diff = __fsub_rn(wk, q);
      const float er = __fdiv_rn(diff, d);
      lrow = __fadd_rn(lrow, saliency(diff, d));
      tw[tid * ld + k] = q;
      e[tid] = er;
      s.err[(r0 + tid) * s.ld_err + k] = er;
    }
    __syncthreads();
    // The OBS update of the later columns of the block: W[r, t] -= e_r * U[j, t], every (row, column)
    // in parallel, no column skipped (the CPU does not skip e == 0 either: it decides signs of zero).
    const float* urow = ub + k * cols;
    for (int r = ty; r < nr; r += kRowThreads) {
      const float er = e[r];
      float* wr = tw + r * ld;
      for (int t = k + 1 + tx; t < cnt; t += kColThreads) wr[t] = __fsub_rn(wr[t], __fmul_rn(er, urow[t]));
    }
    __syncthreads();
  }
  if (tid < nr) s.loss[r0 + tid] = __fadd_rn(s.loss[r0 + tid], lrow);
  if (s.in_shared) {
    for (int r = ty; r < nr; r += kRowThreads)
      for (int t = tx; t < cnt; t += kColThreads) {
        gw[r * cols + t] = tw[r * ld + t];
        gk[r * cols + t] = tk[r * ld + t];
      }
  }
}

size_t tile_bytes(int tile_rows, int64_t cnt) {
  return sizeof(float) * kMaxTileRows + (sizeof(float) + sizeof(bool)) * static_cast<size_t>(tile_rows) * cnt;
}

}  // namespace

void launch_obs_block_scores(const float* w, const float* u, int64_t rows, int64_t cols, int64_t i1, int64_t cnt,
                             float* scores, cudaStream_t stream) {
  const int64_t total = rows * cnt;
  if (total <= 0) return;
  const int64_t blocks = std::min<int64_t>((total + kScoreThreads - 1) / kScoreThreads, int64_t{1} << 16);
  obs_block_scores_kernel<<<static_cast<unsigned>(blocks), kScoreThreads, 0, stream>>>(w, u, rows, cols, i1, cnt,
                                                                                       scores);
}

void launch_obs_block(float* w, bool* keep, float* err, int64_t ld_err, float* loss, const float* u, int64_t rows,
                      int64_t cols, int64_t i1, int64_t cnt, int64_t n, int64_t m, int multiprocessors,
                      cudaStream_t stream) {
  if (rows <= 0 || cnt <= 0) return;
  // Rows per tile: enough tiles to give every multiprocessor two, at least kRowThreads rows (each
  // row of threads has one), at most kMaxTileRows, and small enough for shared memory.
  // A block too wide for even one row in shared memory (over 9,000 columns) is swept in place.
  int tile_rows = kRowThreads;
  while (tile_rows < kMaxTileRows && rows / (2 * tile_rows) >= 2 * multiprocessors) tile_rows *= 2;
  int fit = tile_rows;
  while (fit > 1 && tile_bytes(fit, cnt) > kSharedBytes) fit /= 2;
  const bool in_shared = tile_bytes(fit, cnt) <= kSharedBytes;
  if (in_shared) tile_rows = fit;
  const Sweep s{w, keep, err, loss, u, rows, cols, i1, cnt, ld_err, static_cast<int>(n), static_cast<int>(m),
                tile_rows, in_shared};
  const int64_t blocks = (rows + tile_rows - 1) / tile_rows;
  const size_t shared = in_shared ? tile_bytes(tile_rows, cnt) : sizeof(float) * kMaxTileRows;
  obs_block_kernel<<<static_cast<unsigned>(blocks), dim3(kColThreads, kRowThreads), shared, stream>>>(s);
}

}  // namespace sdsx::cuda
