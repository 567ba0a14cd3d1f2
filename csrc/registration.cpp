// The one schema registry of sdsx: every op's signature, with what it computes. Device kernels
// register against these names in cpu/bindings.cpp and cuda/bindings.cpp.
#include <torch/library.h>

TORCH_LIBRARY(sdsx, m) {
  // Keep-mask (bool, True = keep) holding the n largest of every m consecutive entries along the
  // last dimension; among equal scores the lower index is kept.
  m.def("nm_mask(Tensor scores, int n, int m) -> Tensor");
  // Keep-mask holding the top (1 - sparsity) of the scores, pruning exactly floor(sparsity * count)
  // entries per row (per_row) or over the whole tensor; among equal scores the lower (flat) index is kept.
  m.def("topk_mask(Tensor scores, float sparsity, bool per_row) -> Tensor");
  // SparseGPT / OBS column sweep of W (rows x cols) on U, the upper Cholesky factor of the damped
  // inverse Hessian (H^-1 = U^T U). n = m = 0: unstructured, `sparsity` of every block of
  // `blocksize` columns chosen at the block start; else n:m chosen every m columns. Returns
  // (new weight in W's dtype with exact zeros, keep-mask, per-row loss sum_j (w - q)^2 / U_jj^2).
  m.def("obs_sweep(Tensor W, Tensor U, float sparsity, int n, int m, int blocksize) -> (Tensor, Tensor, Tensor)");
  // One fused step of (accelerated) proximal gradient on f(W) = tr((W - Wd) H (W - Wd)^T) + l2 |W|^2
  // + l1 |W|_1, after the GEMM G = (Y - Wd) @ H has been done by the caller. Y is the extrapolated
  // point, W_prev the previous iterate; returns (W_next, Y_next). With a mask, the iterate is
  // projected onto it (masked entries are zero) instead of (after) the soft-threshold.
  // In-place C += X^T X on (at least) the upper triangle of C, X (tokens x features) float32: the
  // entries below the diagonal are partly updated and must be ignored (CPU only; on other devices
  // the caller does blocked GEMMs).
  m.def("gram_upper_(Tensor(a!) C, Tensor X) -> Tensor(a!)");
  // In-place acc += sum over tokens of X^2, X (tokens x features) and acc (features) float32: the
  // Gram's diagonal alone, what Wanda and magnitude-with-activations need (CPU only, like gram_upper_).
  m.def("sq_colsum_(Tensor(a!) acc, Tensor X) -> Tensor(a!)");
  m.def("prox_step(Tensor Y, Tensor W_prev, Tensor G, float step, float l1, float l2, float momentum, Tensor? mask) -> (Tensor, Tensor)");
}
