// The fused elementwise part of one accelerated proximal-gradient step (everything after the GEMM).
#include <ATen/Parallel.h>

#include <cmath>

#include "cpu/ops.h"

namespace sdsx::cpu {

std::tuple<at::Tensor, at::Tensor> prox_step_cpu(const at::Tensor& Y, const at::Tensor& W_prev, const at::Tensor& G,
                                                 double step, double l1, double l2, double momentum,
                                                 const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(Y.sizes() == W_prev.sizes() && Y.sizes() == G.sizes(), "prox_step: Y, W_prev and G must have one shape");
  TORCH_CHECK(Y.scalar_type() == at::kFloat && W_prev.scalar_type() == at::kFloat && G.scalar_type() == at::kFloat,
              "prox_step: Y, W_prev and G must be float32");
  auto y = Y.contiguous(), wp = W_prev.contiguous(), g = G.contiguous();
  at::Tensor mk;
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == Y.sizes() && mask->scalar_type() == at::kBool, "prox_step: mask must be bool of Y's shape");
    mk = mask->contiguous();
  }
  auto W_next = at::empty_like(y);
  auto Y_next = at::empty_like(y);
  const float* yp = y.const_data_ptr<float>();
  const float* wpp = wp.const_data_ptr<float>();
  const float* gp = g.const_data_ptr<float>();
  const bool* mp = mask.has_value() ? mk.const_data_ptr<bool>() : nullptr;
  float* wn = W_next.mutable_data_ptr<float>();
  float* yn = Y_next.mutable_data_ptr<float>();
  const float st = static_cast<float>(step), thr = static_cast<float>(step * l1), two_l2 = static_cast<float>(2.0 * l2),
              mom = static_cast<float>(momentum);
  at::parallel_for(0, y.numel(), 16384, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float grad = 2.f * gp[i] + two_l2 * yp[i];
      float z = yp[i] - st * grad;
      if (mp) {
        z = mp[i] ? z : 0.f;
      } else {
        const float a = std::fabs(z) - thr;
        z = a > 0.f ? std::copysign(a, z) : 0.f;
      }
      wn[i] = z;
      yn[i] = z + mom * (z - wpp[i]);
    }
  });
  return {W_next, Y_next};
}

}  // namespace sdsx::cpu
