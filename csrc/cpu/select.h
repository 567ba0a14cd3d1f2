// Deterministic top-k selection shared by the CPU kernels: among equal scores the lower index wins.
#pragma once
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace sdsx::cpu {

// Writes keep[i] = true for the n_keep largest of s[0..len), false for the rest. `order` is scratch.
inline void select_top(const float* s, int64_t len, int64_t n_keep, bool* keep, std::vector<int64_t>& order) {
  if (n_keep >= len) {
    std::fill(keep, keep + len, true);
    return;
  }
  if (n_keep <= 0) {
    std::fill(keep, keep + len, false);
    return;
  }
  order.resize(len);
  std::iota(order.begin(), order.end(), int64_t{0});
  auto before = [s](int64_t a, int64_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); };
  std::nth_element(order.begin(), order.begin() + n_keep, order.end(), before);
  std::fill(keep, keep + len, false);
  for (int64_t i = 0; i < n_keep; ++i) keep[order[i]] = true;
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
