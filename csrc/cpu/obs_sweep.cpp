// The SparseGPT / OBS column sweep on the CPU. Within a block every row is independent once the
// block's mask is chosen, so rows run in parallel, in tiles; the lazy update of the columns right
// of the block is one GEMM through ATen.
//
// The arithmetic mirrors the PyTorch reference operation by operation (products are rounded before
// they are subtracted: this file is compiled with -ffp-contract=off), so masks agree exactly.
#include <ATen/Parallel.h>

#include <bit>
#include <cstdint>
#include <vector>

#include "cpu/ops.h"
#include "cpu/select.h"

namespace sdsx::cpu {
namespace {

constexpr int64_t kTile = 16;
// Columns whose OBS updates are applied together to each later column of the block. Every element
// still receives its updates one column at a time in increasing order, each product rounded before
// it is subtracted, so the result is bit-identical to the column-by-column reference; the element
// just stays in registers across the panel's updates instead of being reloaded and stored per column.
constexpr int64_t kPanel = 4;

struct Block {
  const float* u;  // U, cols x cols, row-major
  int64_t cols, i1, cnt;
  int64_t n, m;   // m == 0: unstructured (mask already chosen)
  int64_t panel;  // columns per panel (divides m, so every N:M group starts a panel)
  int64_t err_ld;  // row stride of the transposed error matrix the tile writes into
};

// Panel width for a pattern: an N:M group's scores must see every earlier column's update, so group
// starts must be panel starts.
int64_t panel_width(int64_t m) {
  if (m == 0 || m % kPanel == 0) return kPanel;
  return m % 2 == 0 ? 2 : 1;
}

// Sweeps the columns of one block for a tile of kTile rows stored column-major (tile[k * kTile + rr])
// so that the OBS update of column k is, for every later column t, one broadcast of U[j, t] times a
// contiguous vector of the tile's errors: it vectorizes across rows and reads U once per tile.
// On x86 built for AVX2 and for the baseline, picked at load time; no FMA either way (exactness).
// target_clones is x86-only in GCC's sense of these names: elsewhere (aarch64 GPU hosts) one build.
#if defined(__x86_64__) || defined(_M_X64)
#define SDSX_SWEEP_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SDSX_SWEEP_CLONES
#endif
SDSX_SWEEP_CLONES void sweep_tile(const Block& blk, float* __restrict tile, int32_t* __restrict keep,
                                 float* __restrict err_out, float* __restrict loss) {
  const int64_t cols = blk.cols, cnt = blk.cnt, m = blk.m, i1 = blk.i1, P = blk.panel, ld = blk.err_ld;
  const int32_t n = static_cast<int32_t>(blk.n);
  const float* __restrict u = blk.u;
  alignas(32) float err[kPanel][kTile];
  alignas(32) float lsum[kTile] = {};
  alignas(32) float sc[64][kTile];  // n:m scores of one group, for every row of the tile
  for (int64_t p0 = 0; p0 < cnt; p0 += P) {
    const int64_t pe = std::min(p0 + P, cnt);
    for (int64_t k = p0; k < pe; ++k) {
      const int64_t j = i1 + k;
      if (m && j % m == 0) {
        // Rank each entry of the group by counting, across all rows of the tile at once (same rule
        // as select_group: larger score first, lower index first among equal scores).
        for (int64_t t = 0; t < m; ++t) {
          const float d = u[(j + t) * cols + j + t], dd = d * d;
          const float* wt = tile + (k + t) * kTile;
#pragma omp simd
          for (int64_t rr = 0; rr < kTile; ++rr) sc[t][rr] = (wt[rr] * wt[rr]) / dd;
        }
        for (int64_t t = 0; t < m; ++t) {
          int32_t rank[kTile] = {};
          for (int64_t g = 0; g < m; ++g) {
            const bool before = g < t;
#pragma omp simd
            for (int64_t rr = 0; rr < kTile; ++rr)
              rank[rr] += (sc[g][rr] > sc[t][rr]) | ((sc[g][rr] == sc[t][rr]) & before);
          }
          int32_t* kt = keep + (k + t) * kTile;
#pragma omp simd
          for (int64_t rr = 0; rr < kTile; ++rr) kt[rr] = rank[rr] < n;
        }
      }
      // Prune column k: its error (w - q) / d, the loss, and the OBS update of the panel's later
      // columns (the rest of the block is updated once the panel is done).
      const float d = u[j * cols + j], dd = d * d;
      float* __restrict col = tile + k * kTile;
      const int32_t* __restrict kp = keep + k * kTile;
      float* __restrict e = err[k - p0];
#pragma omp simd
      for (int64_t rr = 0; rr < kTile; ++rr) {
        const float wk = col[rr];
        // q = keep ? w : +0, as a bit mask: a branch here mispredicts on every other 2:4 entry
        const uint32_t keep_bits = 0u - static_cast<uint32_t>(kp[rr] != 0);
        const float q = std::bit_cast<float>(std::bit_cast<uint32_t>(wk) & keep_bits);
        const float diff = wk - q;
        e[rr] = diff / d;
        lsum[rr] += (diff * diff) / dd;
        col[rr] = q;
      }
      const float* ur = u + j * cols + i1;
      for (int64_t t = k + 1; t < pe; ++t) {
        const float ut = ur[t];
        float* __restrict ct = tile + t * kTile;
#pragma omp simd
        for (int64_t rr = 0; rr < kTile; ++rr) ct[rr] -= e[rr] * ut;
      }
      float* __restrict eo = err_out + k * ld;  // E^T: the tile's errors are contiguous
#pragma omp simd
      for (int64_t rr = 0; rr < kTile; ++rr) eo[rr] = e[rr];
    }
    // The panel's updates of the rest of the block, in column order for every element.
    const float* ub = u + (i1 + p0) * cols + i1;
    if (pe - p0 == kPanel) {
      const float* __restrict u0 = ub;
      const float* __restrict u1 = ub + cols;
      const float* __restrict u2 = ub + 2 * cols;
      const float* __restrict u3 = ub + 3 * cols;
      const float* __restrict e0 = err[0];
      const float* __restrict e1 = err[1];
      const float* __restrict e2 = err[2];
      const float* __restrict e3 = err[3];
      for (int64_t t = pe; t < cnt; ++t) {
        const float a = u0[t], b = u1[t], c = u2[t], g = u3[t];
        float* __restrict ct = tile + t * kTile;
#pragma omp simd
        for (int64_t rr = 0; rr < kTile; ++rr) {
          float v = ct[rr];
          v -= e0[rr] * a;
          v -= e1[rr] * b;
          v -= e2[rr] * c;
          v -= e3[rr] * g;
          ct[rr] = v;
        }
      }
    } else {
      for (int64_t t = pe; t < cnt; ++t) {
        float* __restrict ct = tile + t * kTile;
        for (int64_t p = 0; p < pe - p0; ++p) {
          const float ut = ub[p * cols + t];
          const float* __restrict e = err[p];
#pragma omp simd
          for (int64_t rr = 0; rr < kTile; ++rr) ct[rr] -= e[rr] * ut;
        }
      }
    }
  }
  for (int64_t rr = 0; rr < kTile; ++rr) loss[rr] += lsum[rr];
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> obs_sweep_cpu(const at::Tensor& W, const at::Tensor& U, double sparsity,
                                                             int64_t n, int64_t m, int64_t blocksize) {
  TORCH_CHECK(W.dim() == 2 && U.dim() == 2, "obs_sweep: W and U must be 2-D");
  const int64_t rows = W.size(0), cols = W.size(1);
  TORCH_CHECK(U.size(0) == cols && U.size(1) == cols, "obs_sweep: U must be ", cols, "x", cols);
  TORCH_CHECK(U.scalar_type() == at::kFloat, "obs_sweep: U must be float32");
  TORCH_CHECK(blocksize > 0, "obs_sweep: blocksize must be positive");
  const bool nm = m > 0;
  if (nm) {
    TORCH_CHECK(n >= 0 && n <= m && m <= 64, "obs_sweep: need 0 <= n <= m <= 64");
    TORCH_CHECK(cols % m == 0 && blocksize % m == 0, "obs_sweep: m must divide the columns and the block size");
  } else {
    TORCH_CHECK(sparsity >= 0.0 && sparsity < 1.0, "obs_sweep: sparsity must be in [0, 1)");
  }

  at::Tensor Wf = W.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor Uc = U.contiguous();
  at::Tensor mask = at::ones({rows, cols}, W.options().dtype(at::kBool));
  at::Tensor loss = at::zeros({rows}, W.options().dtype(at::kFloat));
  const int64_t B = std::min(blocksize, cols);
  // The errors of a block, transposed (E^T, cnt x rows padded to whole tiles) so that a tile stores
  // each column's errors as one contiguous vector; the lazy update takes E as a transposed operand.
  const int64_t tiles = (rows + kTile - 1) / kTile, rows_pad = tiles * kTile;
  at::Tensor Et = at::empty({B, rows_pad}, W.options().dtype(at::kFloat));
  // One buffer for every lazy update's product: a fresh multi-megabyte allocation per block costs
  // page faults that show up in the profile.
  at::Tensor prod = at::empty({rows * std::max<int64_t>(cols - B, 0)}, W.options().dtype(at::kFloat));

  float* w = Wf.mutable_data_ptr<float>();
  const float* u = Uc.const_data_ptr<float>();
  TORCH_CHECK_VALUE(all_finite(w, rows * cols), "obs_sweep: W holds non-finite values (NaN or Inf)");
  TORCH_CHECK_VALUE(all_finite(u, cols * cols), "obs_sweep: U holds non-finite values (NaN or Inf)");
  bool* mk = mask.mutable_data_ptr<bool>();
  float* lp = loss.mutable_data_ptr<float>();
  float* ep = Et.mutable_data_ptr<float>();

  std::vector<float> scores;
  std::vector<float> order;
  std::vector<char> blockkeep;

  for (int64_t i1 = 0; i1 < cols; i1 += B) {
    const int64_t i2 = std::min(i1 + B, cols), cnt = i2 - i1;

    if (!nm && sparsity > 0.0) {
      // Adaptive mask of the block: prune the lowest w^2 / d^2 over all rows of the block.
      scores.resize(rows * cnt);
      at::parallel_for(0, rows, 64, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r)
          for (int64_t k = 0; k < cnt; ++k) {
            const float wk = w[r * cols + i1 + k], d = u[(i1 + k) * cols + i1 + k];
            scores[r * cnt + k] = (wk * wk) / (d * d);
          }
      });
      const int64_t len = rows * cnt;
      const int64_t n_keep = len - static_cast<int64_t>(sparsity * static_cast<double>(len));
      blockkeep.resize(len);
      select_top(scores.data(), len, n_keep, reinterpret_cast<bool*>(blockkeep.data()), order);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < cnt; ++k) mk[r * cols + i1 + k] = blockkeep[r * cnt + k];
    }

    const Block blk{u, cols, i1, cnt, n, m, panel_width(m), rows_pad};
    at::parallel_for(0, tiles, 1, [&, w, mk, cols, i1, cnt, nm](int64_t b, int64_t e) {
      // The lambda's own copies of the pointers and sizes: the mask's bool stores may alias
      // anything reached through a reference, which would reload them on every element.
      std::vector<float> tile_buf(cnt * kTile);
      std::vector<int32_t> keep_buf(cnt * kTile, 1);
      float* __restrict tile = tile_buf.data();
      int32_t* __restrict tkeep = keep_buf.data();
      for (int64_t ti = b; ti < e; ++ti) {
        const int64_t r0 = ti * kTile, nr = std::min(kTile, rows - r0);
        // Padding rows are zero and kept: they contribute nothing and are not written back.
        for (int64_t rr = 0; rr < kTile; ++rr) {
          if (rr >= nr) {
            for (int64_t k = 0; k < cnt; ++k) tile[k * kTile + rr] = 0.f;
            for (int64_t k = 0; k < cnt; ++k) tkeep[k * kTile + rr] = 1;
            continue;
          }
          const float* src = w + (r0 + rr) * cols + i1;
          for (int64_t k = 0; k < cnt; ++k) tile[k * kTile + rr] = src[k];
          // N:M masks are chosen inside the sweep; an unstructured one was chosen above
          if (!nm) {
            const bool* msrc = mk + (r0 + rr) * cols + i1;
            for (int64_t k = 0; k < cnt; ++k) tkeep[k * kTile + rr] = msrc[k];
          }
        }
        float lsum[kTile] = {};
        sweep_tile(blk, tile, tkeep, ep + r0, lsum);
        for (int64_t rr = 0; rr < nr; ++rr) {
          lp[r0 + rr] += lsum[rr];
          float* dst = w + (r0 + rr) * cols + i1;
          bool* mdst = mk + (r0 + rr) * cols + i1;
          for (int64_t k = 0; k < cnt; ++k) dst[k] = tile[k * kTile + rr];
          for (int64_t k = 0; k < cnt; ++k) mdst[k] = tkeep[k * kTile + rr] != 0;
        }
      }
    });

    if (i2 < cols) {
      // Lazy batch update of everything right of the block: W[:, i2:] -= E @ U[i1:i2, i2:].
      auto Eb = Et.narrow(0, 0, cnt).narrow(1, 0, rows).t();
      auto P = prod.narrow(0, 0, rows * (cols - i2)).view({rows, cols - i2});
      at::mm_out(P, Eb, Uc.narrow(0, i1, cnt).narrow(1, i2, cols - i2));
      Wf.narrow(1, i2, cols - i2).sub_(P);
    }
  }
  return {Wf.to(W.scalar_type()), mask, loss};
}

}  // namespace sdsx::cpu
