// The fused elementwise part of one accelerated proximal-gradient step on the GPU (everything after
// the GEMM G = (Y - Wd) @ H). The arithmetic is cpu/prox_step.cpp's, operation by operation, with
// explicitly rounded intrinsics so that no multiply-add is fused and both devices give the same bits.
#include <algorithm>

#include "cuda/kernels.h"

namespace sdsx::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void prox_step_kernel(const float* __restrict__ y, const float* __restrict__ w_prev,
                                 const float* __restrict__ g, const bool* __restrict__ mask, int64_t numel, float step,
                                 float thr, float two_l2, float momentum, float* __restrict__ w_next,
                                 float* __restrict__ y_next) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const float yi = y[i];
    // Gradient of tr((W - Wd) H (W - Wd)^T) + l2 |W|^2 at Y: 2 G + 2 l2 Y.
    const float grad = __fadd_rn(__fmul_rn(2.f, g[i]), __fmul_rn(two_l2, yi));
    float z = __fsub_rn(yi, __fmul_rn(step, grad));
    if (mask) {
      // Projection onto the mask replaces the soft-threshold.
      z = mask[i] ? z : 0.f;
    } else {
      const float a = __fsub_rn(fabsf(z), thr);
      z = a > 0.f ? copysignf(a, z) : 0.f;
    }
    w_next[i] = z;
    y_next[i] = __fadd_rn(z, __fmul_rn(momentum, __fsub_rn(z, w_prev[i])));
  }
}

}  // namespace

void launch_prox_step(const float* y, const float* w_prev, const float* g, const bool* mask, int64_t numel, float step,
                      float thr, float two_l2, float momentum, float* w_next, float* y_next, cudaStream_t stream) {
  if (numel <= 0) return;
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, int64_t{1} << 16);
  prox_step_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(y, w_prev, g, mask, numel, step, thr, two_l2,
                                                                         momentum, w_next, y_next);
}

}  // namespace sdsx::cuda
