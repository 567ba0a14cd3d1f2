// Declarations of the CPU kernels (registered in cpu/bindings.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace sdsx::cpu {

at::Tensor gram_upper_cpu(at::Tensor& C, const at::Tensor& X);
at::Tensor sq_colsum_cpu(at::Tensor& acc, const at::Tensor& X);
at::Tensor nm_mask_cpu(const at::Tensor& scores, int64_t n, int64_t m);
at::Tensor topk_mask_cpu(const at::Tensor& scores, double sparsity, bool per_row);
std::tuple<at::Tensor, at::Tensor, at::Tensor> obs_sweep_cpu(const at::Tensor& W, const at::Tensor& U, double sparsity,
                                                             int64_t n, int64_t m, int64_t blocksize);
std::tuple<at::Tensor, at::Tensor> prox_step_cpu(const at::Tensor& Y, const at::Tensor& W_prev, const at::Tensor& G,
                                                 double step, double l1, double l2, double momentum,
                                                 const std::optional<at::Tensor>& mask);

}  // namespace sdsx::cpu
