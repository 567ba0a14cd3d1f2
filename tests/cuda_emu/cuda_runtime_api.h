// Just enough of CUDA to run sdsx's sweep kernels on the CPU (tests/test_cuda_emulated.py): every
// thread of a thread block is a std::thread, __syncthreads() a std::barrier, shared memory a buffer
// of the block. Stands in for the real header when tests compile csrc/cuda/obs_sweep.cu with g++.
#pragma once
#include <barrier>
#include <cstddef>
#include <functional>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(n)

using cudaStream_t = void*;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline thread_local std::barrier<>* barrier = nullptr;
inline thread_local float* shared = nullptr;

// Runs kernel(args...) for every block of the grid in turn, all threads of a block at once.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, std::size_t shared_bytes, cudaStream_t, Args... args) {
  grid_dim = grid;
  block_dim = block;
  const unsigned threads = block.x * block.y * block.z;
  for (unsigned b = 0; b < grid.x; ++b) {
    std::vector<float> smem(shared_bytes / sizeof(float) + 1, -12345.f);  // garbage, like the GPU's
    std::barrier<> bar(threads);
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        block_idx = dim3(b);
        thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        barrier = &bar;
        shared = smem.data();
        kernel(args...);
      });
    for (auto& th : pool) th.join();
  }
}
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
inline void __syncthreads() { emu::barrier->arrive_and_wait(); }
// Compiled with -ffp-contract=off, so these round exactly like the intrinsics.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
