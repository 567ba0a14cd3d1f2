// Upper-triangle Gram update on the CPU: C += X^T X restricted to the micro-tiles that touch the
// upper triangle (j >= i), for X (tokens x features) row-major. A BLAS GEMM cannot skip the lower
// triangle; row-blocked GEMMs get within 1/(2 * blocks) of it at the price of thinner GEMMs, and
// MKL's own ssyrk ran slower than either here (173 ms against 133 ms for 4096 x 1536 on one core).
// This is a small BLIS-style kernel: pack a KC-token slab of X into 16-column panels (the B side)
// and 6-column panels (the A side), then 6 x 16 register tiles with fused multiply-adds. Entries
// below the diagonal inside the diagonal tiles are computed too (callers keep the upper triangle).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SDSX_GRAM_X86 1
#endif

#include "cpu/ops.h"

namespace sdsx::cpu {
namespace {

constexpr int64_t kMR = 6;    // rows of C per register tile (features i)
constexpr int64_t kNR = 16;   // columns of C per register tile (features j)
constexpr int64_t kKC = 256;  // tokens per packed slab (a 16-column panel is 16 KiB: L1)
constexpr int64_t kMC = 96;   // rows of C per packed A block (96 KiB: L2)

// dst[k * width + t] = X[k0 + k, c0 + t] for t < valid, zero beyond (panel padding).
void pack(const float* X, int64_t ldx, int64_t k0, int64_t kc, int64_t c0, int64_t valid, int64_t width, float* dst) {
  for (int64_t k = 0; k < kc; ++k) {
    const float* src = X + (k0 + k) * ldx + c0;
    float* out = dst + k * width;
    int64_t t = 0;
    for (; t < valid; ++t) out[t] = src[t];
    for (; t < width; ++t) out[t] = 0.f;
  }
}

// Portable tile: C[0:mr, 0:nr] += A^T B over kc packed tokens.
void tile_generic(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int64_t mr, int64_t nr) {
  float acc[kMR][kNR] = {};
  for (int64_t k = 0; k < kc; ++k)
    for (int64_t r = 0; r < kMR; ++r) {
      const float av = a[k * kMR + r];
      for (int64_t t = 0; t < kNR; ++t) acc[r][t] += av * b[k * kNR + t];
    }
  for (int64_t r = 0; r < mr; ++r)
    for (int64_t t = 0; t < nr; ++t) c[r * ldc + t] += acc[r][t];
}

#ifdef SDSX_GRAM_X86
// 6 x 16 tile in twelve 8-float accumulators: per token two panel loads, six broadcasts and twelve
// FMAs, so the FMA units, not the loads, set the pace.
__attribute__((target("avx2,fma"))) void tile_avx2(int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                                                   int64_t mr, int64_t nr) {
  __m256 acc0[kMR], acc1[kMR];  // columns 0-7 and 8-15 of each row: twelve registers once unrolled
#pragma GCC unroll 6
  for (int64_t r = 0; r < kMR; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(b + k * kNR), b1 = _mm256_load_ps(b + k * kNR + 8);
#pragma GCC unroll 6
    for (int64_t r = 0; r < kMR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + k * kMR + r);
      acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
    }
  }
  alignas(32) float acc[kMR][kNR];
#pragma GCC unroll 6
  for (int64_t r = 0; r < kMR; ++r) {
    _mm256_store_ps(acc[r], acc0[r]);
    _mm256_store_ps(acc[r] + 8, acc1[r]);
  }
  if (nr == kNR) {
    for (int64_t r = 0; r < mr; ++r) {
      float* cr = c + r * ldc;
      _mm256_storeu_ps(cr, _mm256_add_ps(_mm256_loadu_ps(cr), _mm256_load_ps(acc[r])));
      _mm256_storeu_ps(cr + 8, _mm256_add_ps(_mm256_loadu_ps(cr + 8), _mm256_load_ps(acc[r] + 8)));
    }
  } else {
    for (int64_t r = 0; r < mr; ++r)
      for (int64_t t = 0; t < nr; ++t) c[r * ldc + t] += acc[r][t];
  }
}

bool has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

using TileFn = void (*)(int64_t, const float*, const float*, float*, int64_t, int64_t, int64_t);

TileFn pick_tile() {
#ifdef SDSX_GRAM_X86
  if (has_avx2_fma()) return &tile_avx2;
#endif
  return &tile_generic;
}

}  // namespace

at::Tensor gram_upper_cpu(at::Tensor& C, const at::Tensor& X) {
  TORCH_CHECK(X.dim() == 2 && C.dim() == 2, "gram_upper_: X must be (tokens, features) and C (features, features)");
  const int64_t K = X.size(0), c = X.size(1);
  TORCH_CHECK(C.size(0) == c && C.size(1) == c, "gram_upper_: C must be ", c, "x", c, " to match X's features");
  TORCH_CHECK(X.scalar_type() == at::kFloat && C.scalar_type() == at::kFloat, "gram_upper_: X and C must be float32");
  TORCH_CHECK(C.stride(1) == 1, "gram_upper_: C must have unit column stride");
  const at::Tensor Xc = X.contiguous();
  const float* x = Xc.const_data_ptr<float>();
  float* cp = C.mutable_data_ptr<float>();
  const int64_t ldc = C.stride(0);
  const TileFn tile = pick_tile();
  const int64_t panels = (c + kNR - 1) / kNR;
  // The tile loads B panels aligned: ATen's CPU allocator aligns to 64 bytes, and every panel
  // starts a multiple of 16 floats in.
  at::Tensor Bp = at::empty({panels * kNR * kKC}, X.options());
  TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(Bp.const_data_ptr<float>()) % 32 == 0);
  const int64_t row_blocks = (c + kMC - 1) / kMC;

  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    float* bp = Bp.mutable_data_ptr<float>();
    for (int64_t p = 0; p < panels; ++p)
      pack(x, c, k0, kc, p * kNR, std::min(kNR, c - p * kNR), kNR, bp + p * kNR * kc);

    // Row blocks hold different amounts of the triangle; grain 1 lets threads take them one by one.
    at::parallel_for(0, row_blocks, 1, [&](int64_t rb0, int64_t rb1) {
      std::vector<float> ap(kMC * kKC);
      for (int64_t rb = rb0; rb < rb1; ++rb) {
        const int64_t i0 = rb * kMC, mc = std::min(kMC, c - i0);
        const int64_t tiles = (mc + kMR - 1) / kMR;
        for (int64_t t = 0; t < tiles; ++t)
          pack(x, c, k0, kc, i0 + t * kMR, std::min(kMR, mc - t * kMR), kMR, ap.data() + t * kMR * kc);
        // only the panels that reach the upper triangle of this row block
        for (int64_t p = i0 / kNR; p < panels; ++p) {
          const int64_t j0 = p * kNR, nr = std::min(kNR, c - j0);
          const float* bpanel = bp + p * kNR * kc;
          for (int64_t t = 0; t < tiles; ++t) {
            const int64_t i = i0 + t * kMR;
            if (j0 + nr <= i) continue;  // the whole tile lies below the diagonal
            tile(kc, ap.data() + t * kMR * kc, bpanel, cp + i * ldc + j0, ldc, std::min(kMR, c - i), nr);
          }
        }
      }
    });
  }
  return C;
}

// The Gram's diagonal: acc[j] += sum_t X[t, j]^2, in one streaming pass over X (torch's
// (X * X).sum(0) writes and rereads a tokens x features temporary). Each column block's sums run in
// floats over 64 tokens at a time, which vectorize, and those partial sums add up in doubles, so a
// call's thousands of tokens round about as little as a pairwise sum.
namespace {

constexpr int64_t kSqCols = 512;  // columns per block: the float and double sums (6 KiB) stay in L1
constexpr int64_t kSqRows = 64;   // tokens per float partial sum

inline __attribute__((always_inline)) void sq_block_body(const float* x, int64_t T, int64_t ldx, int64_t width, float* acc) {
  double total[kSqCols];
  float part[kSqCols];
  std::fill(total, total + width, 0.0);
  for (int64_t t0 = 0; t0 < T; t0 += kSqRows) {
    const int64_t t1 = std::min(T, t0 + kSqRows);
    std::fill(part, part + width, 0.f);
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = x + t * ldx;
      for (int64_t j = 0; j < width; ++j) part[j] += row[j] * row[j];
    }
    for (int64_t j = 0; j < width; ++j) total[j] += part[j];
  }
  for (int64_t j = 0; j < width; ++j) acc[j] += static_cast<float>(total[j]);
}

void sq_block_generic(const float* x, int64_t T, int64_t ldx, int64_t width, float* acc) {
  sq_block_body(x, T, ldx, width, acc);
}

#ifdef SDSX_GRAM_X86
// The same loops compiled for AVX2 (8 floats a step): 2x the SSE2 build's speed on one core.
__attribute__((target("avx2,fma"))) void sq_block_avx2(const float* x, int64_t T, int64_t ldx, int64_t width, float* acc) {
  sq_block_body(x, T, ldx, width, acc);
}
#endif

}  // namespace

at::Tensor sq_colsum_cpu(at::Tensor& acc, const at::Tensor& X) {
  TORCH_CHECK(X.dim() == 2 && acc.dim() == 1, "sq_colsum_: X must be (tokens, features) and acc (features,)");
  const int64_t T = X.size(0), c = X.size(1);
  TORCH_CHECK(acc.size(0) == c, "sq_colsum_: acc must have ", c, " entries to match X's features");
  TORCH_CHECK(X.scalar_type() == at::kFloat && acc.scalar_type() == at::kFloat, "sq_colsum_: X and acc must be float32");
  TORCH_CHECK(acc.is_contiguous(), "sq_colsum_: acc must be contiguous");
  const at::Tensor Xc = X.contiguous();
  const float* x = Xc.const_data_ptr<float>();
  float* a = acc.mutable_data_ptr<float>();
  auto block = &sq_block_generic;
#ifdef SDSX_GRAM_X86
  if (has_avx2_fma()) block = &sq_block_avx2;
#endif
  at::parallel_for(0, (c + kSqCols - 1) / kSqCols, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * kSqCols;
      block(x + j0, T, c, std::min(kSqCols, c - j0), a + j0);
    }
  });
  return acc;
}

}  // namespace sdsx::cpu
