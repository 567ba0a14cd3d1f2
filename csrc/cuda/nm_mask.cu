// n:m mask selection on the GPU: one thread per group of m consecutive scores, ranking each entry by
// counting exactly like cpu/select.h's select_group, so ties keep the lower index and the masks are
// identical to the CPU's. (topk_mask needs an exact count per row or tensor: it is a stable sort in
// the glue, cuda/bindings.cpp.)
#include <algorithm>

#include "cuda/kernels.h"

namespace sdsx::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void nm_mask_kernel(const float* __restrict__ s, int64_t groups, int64_t n, int64_t m,
                               bool* __restrict__ keep) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const float* sg = s + g * m;
    bool* kg = keep + g * m;
    for (int64_t k = 0; k < m; ++k) {
      const float sk = sg[k];
      // The same expression as the CPU's: -0 and +0 tie, the lower index wins.
      int64_t rank = 0;
      for (int64_t j = 0; j < m; ++j) rank += (sg[j] > sk) || (sg[j] == sk && j < k);
      kg[k] = rank < n;
    }
  }
}

}  // namespace

void launch_nm_mask(const float* scores, int64_t groups, int64_t n, int64_t m, bool* keep, cudaStream_t stream) {
  if (groups <= 0) return;
  // Grid-stride loop: cap the grid, far above what fills any GPU.
  const int64_t blocks = std::min<int64_t>((groups + kThreads - 1) / kThreads, int64_t{1} << 16);
  nm_mask_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(scores, groups, n, m, keep);
}

}  // namespace sdsx::cuda
