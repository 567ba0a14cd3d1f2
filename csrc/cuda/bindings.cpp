// CUDA implementations of the sdsx ops (schemas in registration.cpp): argument checks, device guard
// and stream, then the torch-free kernels of cuda/*.cu. Exact-count top-k selection and the lazy
// GEMM of the OBS sweep go through ATen (stable sort, mm).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "cuda/kernels.h"

namespace sdsx::cuda {
namespace {

// The CPU kernels reject NaN / Inf with a ValueError; so do these, so that the op's contract does not
// depend on the device (the price is one reduction and one host sync per op call).
at::Tensor finite_flag(const at::Tensor& t) { return at::isfinite(t).all(); }
bool all_finite(const at::Tensor& t) { return finite_flag(t).item<bool>(); }

// torch's fp32 matmul precision set to "highest" (no TF32) for the scope: the sweep's masks must not
// depend on a global speed setting. The setting is process-wide, so a matmul on another thread in
// this window runs without TF32 too; the previous value is restored.
class FullFp32Matmul {
 public:
  FullFp32Matmul() : saved_(at::globalContext().float32MatmulPrecision()) {
    if (saved_ != at::Float32MatmulPrecision::HIGHEST) at::globalContext().setFloat32MatmulPrecision("highest");
  }
  ~FullFp32Matmul() {
    if (saved_ == at::Float32MatmulPrecision::HIGH) at::globalContext().setFloat32MatmulPrecision("high");
    if (saved_ == at::Float32MatmulPrecision::MEDIUM) at::globalContext().setFloat32MatmulPrecision("medium");
  }
  FullFp32Matmul(const FullFp32Matmul&) = delete;
  FullFp32Matmul& operator=(const FullFp32Matmul&) = delete;

 private:
  at::Float32MatmulPrecision saved_;
};

// Keep-mask (bool, same shape) of the n_keep largest entries of every row of s (rows x len, float,
// contiguous). A stable descending sort leaves equal scores in index order, so its first n_keep
// indices are exactly the CPU's selection: among equal scores the lower index is kept.
at::Tensor keep_top_per_row(const at::Tensor& s, int64_t n_keep) {
  const int64_t len = s.size(1);
  if (n_keep >= len) return at::ones(s.sizes(), s.options().dtype(at::kBool));
  at::Tensor keep = at::zeros(s.sizes(), s.options().dtype(at::kBool));
  if (n_keep <= 0) return keep;
  // Adding +0 turns -0 into +0: the CPU compares -0 == +0, a sort on the bit pattern might not.
  at::Tensor order = std::get<1>(at::sort(s.add(0.0), /*stable=*/true, /*dim=*/1, /*descending=*/true));
  keep.scatter_(1, order.narrow(1, 0, n_keep), true);
  return keep;
}

}  // namespace

at::Tensor nm_mask_cuda(const at::Tensor& scores, int64_t n, int64_t m) {
  TORCH_CHECK(m > 0 && n >= 0 && n <= m, "nm_mask: need 0 <= n <= m and m > 0, got n=", n, " m=", m);
  TORCH_CHECK(scores.dim() >= 1, "nm_mask: scores must have at least one dimension");
  TORCH_CHECK(scores.is_cuda(), "nm_mask: scores must be a CUDA tensor");
  const int64_t cols = scores.size(-1);
  TORCH_CHECK(cols % m == 0, "nm_mask: the last dimension (", cols, ") must be a multiple of m=", m);
  c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor s = scores.to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(all_finite(s), "nm_mask: scores hold non-finite values (NaN or Inf)");
  at::Tensor keep = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  launch_nm_mask(s.const_data_ptr<float>(), s.numel() / m, n, m, keep.mutable_data_ptr<bool>(),
                 c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keep;
}

at::Tensor topk_mask_cuda(const at::Tensor& scores, double sparsity, bool per_row) {
  TORCH_CHECK(sparsity >= 0.0 && sparsity < 1.0, "topk_mask: sparsity must be in [0, 1), got ", sparsity);
  TORCH_CHECK(scores.is_cuda(), "topk_mask: scores must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(scores.device());
  if (scores.numel() == 0) return at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  at::Tensor s = scores.to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(all_finite(s), "topk_mask: scores hold non-finite values (NaN or Inf)");
  const int64_t len = per_row ? s.size(-1) : s.numel();
  const int64_t rows = s.numel() / len;
  // Same arithmetic as the CPU op and the Python reference: int(sparsity * len) entries are pruned.
  const int64_t n_keep = len - static_cast<int64_t>(sparsity * static_cast<double>(len));
  return keep_top_per_row(s.view({rows, len}), n_keep).view(scores.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> obs_sweep_cuda(const at::Tensor& W, const at::Tensor& U, double sparsity,
                                                              int64_t n, int64_t m, int64_t blocksize) {
  TORCH_CHECK(W.dim() == 2 && U.dim() == 2, "obs_sweep: W and U must be 2-D");
  const int64_t rows = W.size(0), cols = W.size(1);
  TORCH_CHECK(U.size(0) == cols && U.size(1) == cols, "obs_sweep: U must be ", cols, "x", cols);
  TORCH_CHECK(U.scalar_type() == at::kFloat, "obs_sweep: U must be float32");
  TORCH_CHECK(W.is_cuda() && U.device() == W.device(), "obs_sweep: W and U must be on one CUDA device");
  TORCH_CHECK(blocksize > 0, "obs_sweep: blocksize must be positive");
  const bool nm = m > 0;
  if (nm) {
    TORCH_CHECK(n >= 0 && n <= m && m <= 64, "obs_sweep: need 0 <= n <= m <= 64");
    TORCH_CHECK(cols % m == 0 && blocksize % m == 0, "obs_sweep: m must divide the columns and the block size");
  } else {
    TORCH_CHECK(sparsity >= 0.0 && sparsity < 1.0, "obs_sweep: sparsity must be in [0, 1)");
  }
  c10::cuda::CUDAGuard guard(W.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  at::Tensor Wf = W.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor Uc = U.contiguous();
  // One host sync for both inputs; which one is bad is worked out only when one is.
  if (!finite_flag(Wf).logical_and(finite_flag(Uc)).item<bool>()) {
    TORCH_CHECK_VALUE(all_finite(Wf), "obs_sweep: W holds non-finite values (NaN or Inf)");
    TORCH_CHECK_VALUE(false, "obs_sweep: U holds non-finite values (NaN or Inf)");
  }
  at::Tensor mask = at::ones({rows, cols}, W.options().dtype(at::kBool));
  at::Tensor loss = at::zeros({rows}, W.options().dtype(at::kFloat));
  if (rows == 0 || cols == 0) return {Wf.to(W.scalar_type()), mask, loss};

  const int64_t B = std::min(blocksize, cols);
  const auto f32 = W.options().dtype(at::kFloat);
  at::Tensor E = at::empty({rows, B}, f32);  // the block's errors, for the lazy update
  float* w = Wf.mutable_data_ptr<float>();
  bool* keep = mask.mutable_data_ptr<bool>();
  const float* u = Uc.const_data_ptr<float>();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, W.device().index()));
  const FullFp32Matmul full_fp32;

  for (int64_t i1 = 0; i1 < cols; i1 += B) {
    const int64_t i2 = std::min(i1 + B, cols), cnt = i2 - i1;
    if (!nm && sparsity > 0.0) {
      // Adaptive mask of the block: prune the lowest w^2 / d^2 over all rows of the block, ties
      // broken by the row-major flat index of the block like the CPU. (Unstructured at sparsity 0
      // keeps everything: the CPU never selects.)
      at::Tensor scores = at::empty({rows, cnt}, f32);
      launch_obs_block_scores(w, u, rows, cols, i1, cnt, scores.mutable_data_ptr<float>(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t len = rows * cnt;
      const int64_t n_keep = len - static_cast<int64_t>(sparsity * static_cast<double>(len));
      mask.narrow(1, i1, cnt).copy_(keep_top_per_row(scores.view({1, len}), n_keep).view({rows, cnt}));
    }
    launch_obs_block(w, keep, E.mutable_data_ptr<float>(), B, loss.mutable_data_ptr<float>(), u, rows, cols, i1, cnt,
                     nm ? n : 0, nm ? m : 0, sms, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (i2 < cols) {
      // Lazy batch update of everything right of the block: W[:, i2:] -= E @ U[i1:i2, i2:], in full
      // fp32 (full_fp32 above). This GEMM still rounds differently from the CPU's BLAS.
      Wf.narrow(1, i2, cols - i2).sub_(at::mm(E.narrow(1, 0, cnt), Uc.narrow(0, i1, cnt).narrow(1, i2, cols - i2)));
    }
  }
  return {Wf.to(W.scalar_type()), mask, loss};
}

std::tuple<at::Tensor, at::Tensor> prox_step_cuda(const at::Tensor& Y, const at::Tensor& W_prev, const at::Tensor& G,
                                                  double step, double l1, double l2, double momentum,
                                                  const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(Y.sizes() == W_prev.sizes() && Y.sizes() == G.sizes(), "prox_step: Y, W_prev and G must have one shape");
  TORCH_CHECK(Y.scalar_type() == at::kFloat && W_prev.scalar_type() == at::kFloat && G.scalar_type() == at::kFloat,
              "prox_step: Y, W_prev and G must be float32");
  TORCH_CHECK(Y.is_cuda() && W_prev.device() == Y.device() && G.device() == Y.device(),
              "prox_step: Y, W_prev and G must be on one CUDA device");
  c10::cuda::CUDAGuard guard(Y.device());
  at::Tensor y = Y.contiguous(), wp = W_prev.contiguous(), g = G.contiguous();
  at::Tensor mk;
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == Y.sizes() && mask->scalar_type() == at::kBool,
                "prox_step: mask must be bool of Y's shape");
    TORCH_CHECK(mask->device() == Y.device(), "prox_step: mask must be on Y's device");
    mk = mask->contiguous();
  }
  at::Tensor W_next = at::empty_like(y);
  at::Tensor Y_next = at::empty_like(y);
  // The scalars are rounded to float from the same double expressions as on the CPU.
  const float st = static_cast<float>(step), thr = static_cast<float>(step * l1), two_l2 = static_cast<float>(2.0 * l2),
              mom = static_cast<float>(momentum);
  launch_prox_step(y.const_data_ptr<float>(), wp.const_data_ptr<float>(), g.const_data_ptr<float>(),
                   mask.has_value() ? mk.const_data_ptr<bool>() : nullptr, y.numel(), st, thr, two_l2, mom,
                   W_next.mutable_data_ptr<float>(), Y_next.mutable_data_ptr<float>(),
                   c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {W_next, Y_next};
}

}  // namespace sdsx::cuda

TORCH_LIBRARY_IMPL(sdsx, CUDA, m) {
  m.impl("nm_mask", &sdsx::cuda::nm_mask_cuda);
  m.impl("topk_mask", &sdsx::cuda::topk_mask_cuda);
  m.impl("obs_sweep", &sdsx::cuda::obs_sweep_cuda);
  m.impl("prox_step", &sdsx::cuda::prox_step_cuda);
}
