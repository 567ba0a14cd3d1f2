// Launchers of the sdsx CUDA kernels: raw device pointers and a stream, no torch, so the .cu files
// compile with nvcc alone. The torch glue that checks arguments and calls these is cuda/bindings.cpp.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace sdsx::cuda {

// keep[g*m + k] = the score s[g*m + k] is among the n largest of its group of m (ties: lower k wins).
void launch_nm_mask(const float* scores, int64_t groups, int64_t n, int64_t m, bool* keep, cudaStream_t stream);

// OBS sweep, one block of `cnt` columns starting at column i1 of a rows x cols weight w (row-major,
// updated in place); u is the cols x cols upper factor (row-major), d_j = u[j, j].

// scores[r * cnt + k] = w[r, i1+k]^2 / d_{i1+k}^2 (row-major over the block, the order whose flat
// index breaks ties in the unstructured selection).
void launch_obs_block_scores(const float* w, const float* u, int64_t rows, int64_t cols, int64_t i1, int64_t cnt,
                             float* scores, cudaStream_t stream);

// The sequential column loop of the block (see obs_sweep.cu). keep is the rows x cols mask: with
// m > 0 the n:m keep-mask is chosen (and written) at every column j with j % m == 0; with m == 0 it
// is read as given. On return w holds the pruned (and compensated) block, err[r * ld_err + k] the
// errors (w - q) / d, and loss[r] has the block's sum of (w - q)^2 / d^2 added. `multiprocessors`
// (of the device) sizes the row tiles.
void launch_obs_block(float* w, bool* keep, float* err, int64_t ld_err, float* loss, const float* u, int64_t rows,
                      int64_t cols, int64_t i1, int64_t cnt, int64_t n, int64_t m, int multiprocessors,
                      cudaStream_t stream);

// One fused proximal-gradient step over `numel` elements (see prox_step.cu); mask may be null.
void launch_prox_step(const float* y, const float* w_prev, const float* g, const bool* mask, int64_t numel, float step,
                      float thr, float two_l2, float momentum, float* w_next, float* y_next, cudaStream_t stream);

}  // namespace sdsx::cuda
