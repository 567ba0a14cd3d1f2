// Deterministic top-k selection shared by the CPU kernels: among equal scores the lower index wins.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace sdsx::cpu {

// True when every value is finite; one pass, no temporaries (a torch.isfinite(t).all() costs a
// bool tensor and a reduction: several times this on the sweep's c x c factor).
inline bool all_finite(const float* p, int64_t len) {
  // A float is NaN or Inf exactly when its exponent bits are all ones; an integer OR-reduction
  // vectorizes, unlike a floating-point one under strict IEEE semantics.
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(p);
  uint32_t bad = 0;
  for (int64_t i = 0; i < len; ++i) bad |= static_cast<uint32_t>((bits[i] & 0x7f800000u) == 0x7f800000u);
  return bad == 0;
}

inline float median3(float a, float b, float c) { return std::max(std::min(a, b), std::min(std::max(a, b), c)); }

// The k-th smallest (0-based) of s[0..len), and in `below` how many entries are strictly smaller.
// A quickselect whose partition has no branches: every entry is written to both the "less" and the
// "greater" buffer and only the two counters move on the comparisons, so there are no mispredicted
// branches (std::nth_element mispredicts about every other compare on random scores: 10-11 ns an
// entry against 3-4 here at 576 to 73728 entries, measured in a standalone loop). Equal entries
// stay behind in each round (a three-way split), so ties cost nothing; the pivot is a ninther.
// Rounds are capped, then std::nth_element finishes what is left. `buf` is scratch (3 len).
inline float kth_smallest(const float* s, int64_t len, int64_t k, std::vector<float>& buf, int64_t& below) {
  buf.resize(static_cast<size_t>(3 * len));
  float* slot[3] = {buf.data(), buf.data() + len, buf.data() + 2 * len};
  const float* src = s;
  int cur = -1;  // the slot src lives in (-1: the caller's scores, read only)
  int64_t n = len;
  below = 0;
  for (int round = 0; n > 48 && round < 64; ++round) {
    const int64_t q = n / 4;
    const float p = median3(median3(src[0], src[q / 2], src[q]), median3(src[2 * q - q / 2], src[2 * q], src[2 * q + q / 2]),
                            median3(src[3 * q], src[3 * q + q / 2], src[n - 1]));
    // the two slots src does not occupy
    const int a = cur == 0 ? 1 : 0;
    const int b = (cur == 2 || cur < 0) ? 1 : 2;
    float* lt = slot[a];
    float* gt = slot[b];
    int64_t nl = 0, ng = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float x = src[i];
      lt[nl] = x;
      gt[ng] = x;
      nl += x < p;
      ng += x > p;
    }
    if (k < nl) {
      src = lt, cur = a, n = nl;
    } else if (k < n - ng) {
      below += nl;
      return p;
    } else {
      below += n - ng, k -= n - ng;
      src = gt, cur = b, n = ng;
    }
  }
  float* w = slot[cur < 0 ? 0 : cur];
  if (cur < 0) std::copy(src, src + n, w);
  std::nth_element(w, w + k, w + n);
  const float v = w[k];
  for (int64_t i = 0; i < n; ++i) below += w[i] < v;
  return v;
}

// Writes keep[i] = true for the n_keep largest of s[0..len), false for the rest; among equal
// scores the lower index is kept: the boundary value comes from kth_smallest, and the ties at
// the boundary are resolved by index in one pass (an index sort with a comparator is several
// times slower). `buf` is scratch.
inline void select_top(const float* s, int64_t len, int64_t n_keep, bool* keep, std::vector<float>& buf) {
  if (n_keep >= len) {
    std::fill(keep, keep + len, true);
    return;
  }
  if (n_keep <= 0) {
    std::fill(keep, keep + len, false);
    return;
  }
  const int64_t n_prune = len - n_keep;
  int64_t below = 0;
  // the n_prune-th smallest value (0-based n_prune - 1) is the largest pruned score
  const float v = kth_smallest(s, len, n_prune - 1, buf, below);
  // Keep everything above v, then the lowest-index entries equal to v that are not pruned:
  // n_prune - below of the ties are pruned (v itself among them). The first pass has no branches
  // (a backward pass deciding each entry with the tie counter cost 6 ns an entry, twice the
  // selection); the second touches only the ties and stops once they are placed.
  int64_t eq = 0;
  for (int64_t i = 0; i < len; ++i) {
    const float x = s[i];
    keep[i] = x > v;
    eq += x == v;
  }
  int64_t ties_to_keep = eq - (n_prune - below);
  for (int64_t i = 0; ties_to_keep > 0 && i < len; ++i) {
    if (s[i] == v) {
      keep[i] = true;
      --ties_to_keep;
    }
  }
}

// n largest of M entries for a compile-time M (the common 4 and 8): the same rank-by-counting rule
// as select_group, with fully unrolled loops the compiler turns into branch-free compares (the
// runtime-m loop was 2x slower per entry at m = 8 than at m = 4, and slower than torch.topk).
template <int M>
inline void select_group_fixed(const float* s, int64_t n, bool* keep) {
  float v[M];
  for (int k = 0; k < M; ++k) v[k] = s[k];
  for (int k = 0; k < M; ++k) {
    int rank = 0;
    for (int j = 0; j < M; ++j) rank += (v[j] > v[k]) | ((v[j] == v[k]) & (j < k));
    keep[k] = rank < n;
  }
}

// n largest of m entries (small m): rank by counting, no allocation.
inline void select_group(const float* s, int64_t m, int64_t n, bool* keep) {
  for (int64_t k = 0; k < m; ++k) {
    int64_t rank = 0;
    for (int64_t j = 0; j < m; ++j) rank += (s[j] > s[k]) || (s[j] == s[k] && j < k);
    keep[k] = rank < n;
  }
}

}  // namespace sdsx::cpu
