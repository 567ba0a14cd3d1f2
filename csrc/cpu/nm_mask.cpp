// Mask selection on the CPU: n:m groups along the last dimension, and exact-count top-k per row or
// per tensor. Ties keep the lower index (flat index for the whole-tensor case).
#include <ATen/Parallel.h>

#include "cpu/ops.h"
#include "cpu/select.h"

namespace sdsx::cpu {

at::Tensor nm_mask_cpu(const at::Tensor& scores, int64_t n, int64_t m) {
  TORCH_CHECK(m > 0 && n >= 0 && n <= m, "nm_mask: need 0 <= n <= m and m > 0, got n=", n, " m=", m);
  TORCH_CHECK(scores.dim() >= 1, "nm_mask: scores must have at least one dimension");
  const int64_t cols = scores.size(-1);
  TORCH_CHECK(cols % m == 0, "nm_mask: the last dimension (", cols, ") must be a multiple of m=", m);
  auto s = scores.to(at::kFloat).contiguous();
  auto keep = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  const int64_t groups = s.numel() / m;
  const float* sp = s.const_data_ptr<float>();
  TORCH_CHECK_VALUE(all_finite(sp, s.numel()), "nm_mask: scores hold non-finite values (NaN or Inf)");
  bool* kp = keep.mutable_data_ptr<bool>();
  at::parallel_for(0, groups, 4096, [&](int64_t b, int64_t e) {
    if (m == 4) {
      for (int64_t g = b; g < e; ++g) select_group_fixed<4>(sp + g * 4, n, kp + g * 4);
    } else if (m == 8) {
      for (int64_t g = b; g < e; ++g) select_group_fixed<8>(sp + g * 8, n, kp + g * 8);
    } else {
      for (int64_t g = b; g < e; ++g) select_group(sp + g * m, m, n, kp + g * m);
    }
  });
  return keep;
}

at::Tensor topk_mask_cpu(const at::Tensor& scores, double sparsity, bool per_row) {
  TORCH_CHECK(sparsity >= 0.0 && sparsity < 1.0, "topk_mask: sparsity must be in [0, 1), got ", sparsity);
  auto s = scores.to(at::kFloat).contiguous();
  auto keep = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  const float* sp = s.const_data_ptr<float>();
  bool* kp = keep.mutable_data_ptr<bool>();
  if (s.numel() == 0) return keep;
  TORCH_CHECK_VALUE(all_finite(sp, s.numel()), "topk_mask: scores hold non-finite values (NaN or Inf)");
  const int64_t len = per_row ? s.size(-1) : s.numel();
  const int64_t rows = s.numel() / len;
  // Same arithmetic as the Python reference: int(sparsity * len) entries are pruned.
  const int64_t n_keep = len - static_cast<int64_t>(sparsity * static_cast<double>(len));
  at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
    std::vector<float> order;
    for (int64_t r = b; r < e; ++r) select_top(sp + r * len, len, n_keep, kp + r * len, order);
  });
  return keep;
}

}  // namespace sdsx::cpu
