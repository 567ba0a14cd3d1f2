// The SparseGPT / OBS column sweep on the CPU. Within a block every row is independent once the
// block's mask is chosen, so rows run in parallel, in tiles; the lazy update of the columns right
// of the block is one GEMM through ATen.
//
// The arithmetic mirrors the PyTorch reference operation by operation (products are rounded before
// they are subtracted: this file is compiled with -ffp-contract=off), so masks agree exactly.
#include <ATen/Parallel.h>

#include <vector>

#include "cpu/ops.h"
#include "cpu/select.h"

namespace sdsx::cpu {
namespace {

constexpr int64_t kTile = 16;

struct Block {
  const float* u;  // U, cols x cols, row-major
  int64_t cols, i1, cnt;
  int64_t n, m;  // m == 0: unstructured (mask already chosen)
};

// Sweeps the columns of one block for a tile of kTile rows stored column-major (tile[k * kTile + rr])
// so that the OBS update of column k is, for every later column t, one broadcast of U[j, t] times a
// contiguous vector of the tile's errors: it vectorizes across rows and reads U once per tile.
// Built for AVX2 and for the baseline, picked at load time; no FMA either way (exactness).
__attribute__((target_clones("avx2", "default"))) void sweep_tile(const Block& blk, float* tile, char* keep,
                                                                   float* err_out, float* loss, int64_t nr) {
  const int64_t cols = blk.cols, cnt = blk.cnt, m = blk.m;
  float err[kTile];
  float sc[64][kTile];  // n:m scores of one group, for every row of the tile
  for (int64_t k = 0; k < cnt; ++k) {
    const int64_t j = blk.i1 + k;
    if (m && j % m == 0) {
      // Rank each entry of the group by counting, across all rows of the tile at once (same rule
      // as select_group: larger score first, lower index first among equal scores).
      for (int64_t t = 0; t < m; ++t) {
        const float d = blk.u[(j + t) * cols + j + t], dd = d * d;
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
        char* kt = keep + (k + t) * kTile;
        for (int64_t rr = 0; rr < kTile; ++rr) kt[rr] = rank[rr] < blk.n;
      }
    }
    const float d = blk.u[j * cols + j];
    float* col = tile + k * kTile;
    for (int64_t rr = 0; rr < kTile; ++rr) {
      const float wk = col[rr];
      const float q = keep[k * kTile + rr] ? wk : 0.f;
      const float diff = wk - q;
      err[rr] = diff / d;
      loss[rr] += (diff * diff) / (d * d);
      col[rr] = q;
    }
    const float* ur = blk.u + j * cols + blk.i1;
    for (int64_t t = k + 1; t < cnt; ++t) {
      const float ut = ur[t];
      float* __restrict ct = tile + t * kTile;
#pragma omp simd
      for (int64_t rr = 0; rr < kTile; ++rr) ct[rr] -= err[rr] * ut;
    }
    for (int64_t rr = 0; rr < nr; ++rr) err_out[rr * cnt + k] = err[rr];
  }
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
  at::Tensor E = at::empty({rows, B}, W.options().dtype(at::kFloat));
  // One buffer for every lazy update's product: a fresh multi-megabyte allocation per block costs
  // page faults that show up in the profile.
  at::Tensor prod = at::empty({rows * std::max<int64_t>(cols - B, 0)}, W.options().dtype(at::kFloat));

  float* w = Wf.mutable_data_ptr<float>();
  const float* u = Uc.const_data_ptr<float>();
  TORCH_CHECK_VALUE(all_finite(w, rows * cols), "obs_sweep: W holds non-finite values (NaN or Inf)");
  TORCH_CHECK_VALUE(all_finite(u, cols * cols), "obs_sweep: U holds non-finite values (NaN or Inf)");
  bool* mk = mask.mutable_data_ptr<bool>();
  float* lp = loss.mutable_data_ptr<float>();
  float* ep = E.mutable_data_ptr<float>();

  std::vector<float> scores;
  std::vector<float> order;
  std::vector<char> blockkeep;
  const int64_t tiles = (rows + kTile - 1) / kTile;

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

    const Block blk{u, cols, i1, cnt, n, m};
    at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) {
      std::vector<float> tile(cnt * kTile);
      std::vector<char> tkeep(cnt * kTile);
      for (int64_t ti = b; ti < e; ++ti) {
        const int64_t r0 = ti * kTile, nr = std::min(kTile, rows - r0);
        // Padding rows are zero and kept: they contribute nothing and are not written back.
        for (int64_t rr = 0; rr < kTile; ++rr)
          for (int64_t k = 0; k < cnt; ++k) {
            const bool real = rr < nr;
            tile[k * kTile + rr] = real ? w[(r0 + rr) * cols + i1 + k] : 0.f;
            tkeep[k * kTile + rr] = real ? mk[(r0 + rr) * cols + i1 + k] : 1;
          }
        float lsum[kTile] = {};
        sweep_tile(blk, tile.data(), tkeep.data(), ep + r0 * cnt, lsum, nr);
        for (int64_t rr = 0; rr < nr; ++rr) {
          lp[r0 + rr] += lsum[rr];
          for (int64_t k = 0; k < cnt; ++k) {
            w[(r0 + rr) * cols + i1 + k] = tile[k * kTile + rr];
            mk[(r0 + rr) * cols + i1 + k] = tkeep[k * kTile + rr];
          }
        }
      }
    });

    if (i2 < cols) {
      // Lazy batch update of everything right of the block: W[:, i2:] -= E @ U[i1:i2, i2:].
      auto Eb = E.view({-1}).narrow(0, 0, rows * cnt).view({rows, cnt});
      auto P = prod.narrow(0, 0, rows * (cols - i2)).view({rows, cols - i2});
      at::mm_out(P, Eb, Uc.narrow(0, i1, cnt).narrow(1, i2, cols - i2));
      Wf.narrow(1, i2, cols - i2).sub_(P);
    }
  }
  return {Wf.to(W.scalar_type()), mask, loss};
}

}  // namespace sdsx::cpu
