// The SparseGPT / OBS column sweep on the CPU. Within a block every row is independent once the
// block's mask is chosen, so rows run in parallel and each row's column loop is a short, contiguous
// axpy; the lazy update of the columns right of the block is one GEMM through ATen.
//
// The arithmetic mirrors the PyTorch reference operation by operation (products are rounded before
// they are subtracted: this file is compiled with -ffp-contract=off), so masks agree exactly.
#include <ATen/Parallel.h>

#include <vector>

#include "cpu/ops.h"
#include "cpu/select.h"

namespace sdsx::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> obs_sweep_cpu(const at::Tensor& W, const at::Tensor& U, double sparsity,
                                                             int64_t n, int64_t m, int64_t blocksize) {
  TORCH_CHECK(W.dim() == 2 && U.dim() == 2, "obs_sweep: W and U must be 2-D");
  const int64_t rows = W.size(0), cols = W.size(1);
  TORCH_CHECK(U.size(0) == cols && U.size(1) == cols, "obs_sweep: U must be ", cols, "x", cols);
  TORCH_CHECK(U.scalar_type() == at::kFloat, "obs_sweep: U must be float32");
  TORCH_CHECK(blocksize > 0, "obs_sweep: blocksize must be positive");
  const bool nm = m > 0;
  if (nm) {
    TORCH_CHECK(n >= 0 && n <= m, "obs_sweep: need 0 <= n <= m");
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

  float* w = Wf.mutable_data_ptr<float>();
  const float* u = Uc.const_data_ptr<float>();
  bool* mk = mask.mutable_data_ptr<bool>();
  float* lp = loss.mutable_data_ptr<float>();
  float* ep = E.mutable_data_ptr<float>();

  std::vector<float> scores;
  std::vector<int64_t> order;
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

    at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
      float gs[64];
      bool gk[64];
      std::vector<float> gsv;
      std::vector<char> gkv;
      if (nm && m > 64) {
        gsv.resize(m);
        gkv.resize(m);
      }
      float* gscore = (nm && m > 64) ? gsv.data() : gs;
      bool* gkeep = (nm && m > 64) ? reinterpret_cast<bool*>(gkv.data()) : gk;
      for (int64_t r = b; r < e; ++r) {
        float* wr = w + r * cols + i1;
        bool* mr = mk + r * cols + i1;
        float* er = ep + r * cnt;
        float lrow = 0.f;
        for (int64_t k = 0; k < cnt; ++k) {
          const int64_t j = i1 + k;
          if (nm && j % m == 0) {
            for (int64_t t = 0; t < m; ++t) {
              const float wt = wr[k + t], d = u[(j + t) * cols + j + t];
              gscore[t] = (wt * wt) / (d * d);
            }
            select_group(gscore, m, n, gkeep);
            for (int64_t t = 0; t < m; ++t) mr[k + t] = gkeep[t];
          }
          const float wk = wr[k];
          const float d = u[j * cols + j];
          const float q = mr[k] ? wk : 0.f;
          const float diff = wk - q;
          const float err = diff / d;
          lrow += (diff * diff) / (d * d);
          er[k] = err;
          wr[k] = q;
          if (err != 0.f) {
            const float* ur = u + j * cols + j;
            for (int64_t t = k + 1; t < cnt; ++t) wr[t] -= err * ur[t - k];
          }
        }
        lp[r] += lrow;
      }
    });

    if (i2 < cols) {
      // Lazy batch update of everything right of the block: W[:, i2:] -= E @ U[i1:i2, i2:].
      auto Eb = E.view({-1}).narrow(0, 0, rows * cnt).view({rows, cnt});
      Wf.narrow(1, i2, cols - i2).sub_(at::mm(Eb, Uc.narrow(0, i1, cnt).narrow(1, i2, cols - i2)));
    }
  }
  return {Wf.to(W.scalar_type()), mask, loss};
}

}  // namespace sdsx::cpu
