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

// Writes keep[i] = true for the n_keep largest of s[0..len), false for the rest; among equal
// scores the lower index is kept. A direct nth_element on the values finds the boundary value;
// ties at the boundary are then resolved by index in one pass (an index sort with a comparator
// is several times slower). `buf` is scratch.
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
  buf.assign(s, s + len);
  // the n_prune-th smallest value (0-based n_prune - 1) is the largest pruned score
  std::nth_element(buf.begin(), buf.begin() + (n_prune - 1), buf.end());
  const float v = buf[n_prune - 1];
  int64_t below = 0;
  for (int64_t i = 0; i < len; ++i) below += s[i] < v;
  // prune everything below v, and the (n_prune - below) highest-index entries equal to v
  int64_t ties_to_prune = n_prune - below;
  for (int64_t i = len - 1; i >= 0; --i) {
    const bool tie = s[i] == v;
    const bool prune = s[i] < v || (tie && ties_to_prune > 0);
    ties_to_prune -= tie && prune;
    keep[i] = !prune;
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
