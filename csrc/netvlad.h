// NetVLAD (paper eq. 7-9), shared by csrc/cpu/netvlad.cpp and csrc/cuda/netvlad.cu.
//
// Part 1: the per-element / per-row math, MVFAST_HD, called by both backends.
// Part 2: the host-side flow of forward and backward, a template over the backend's kernels. The matrix
//         products go to ATen (MKL/oneDNN on CPU, cuBLAS on CUDA); everything around them (masked
//         softmax, the aggregation epilogue, both normalisations and their backward, the centroid
//         gradient) is hand-written in the backend's Kernels struct.
//
// Shapes: x (B, M, D), weight (KG, D) with KG = K + G ghost clusters, centroids (K, D), mask (B, M).
// Accumulation is float32 (float64 for float64 inputs); the saved soft assignment (B, M, KG) and the
// unnormalised descriptor (B, K, D) are in the accumulation type.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common.h"

namespace mvfast {
namespace netvlad {

// ---- Part 1: math ------------------------------------------------------------------------------------

// Probability of one logit of a row with maximum row_max and 1 / sum(exp(l - row_max)) = inv_sum.
template <typename acc_t>
MVFAST_HD acc_t softmax_prob(acc_t logit, acc_t row_max, acc_t inv_sum) {
  return exp_(logit - row_max) * inv_sum;
}

// Masked softmax of one row of n logits in place, bias added first. A masked row gets all zeros, so that
// a padded frame contributes nothing to any cluster.
template <typename acc_t>
MVFAST_HD void masked_softmax_row(acc_t* row, const acc_t* bias, int64_t n, bool valid) {
  if (!valid) {
    for (int64_t k = 0; k < n; ++k) row[k] = acc_t(0);
    return;
  }
  acc_t m = row[0] + (bias ? bias[0] : acc_t(0));
  for (int64_t k = 0; k < n; ++k) {
    const acc_t v = row[k] + (bias ? bias[k] : acc_t(0));
    row[k] = v;
    m = v > m ? v : m;
  }
  acc_t s = 0;
  for (int64_t k = 0; k < n; ++k) s += exp_(row[k] - m);
  const acc_t inv = acc_t(1) / s;
  for (int64_t k = 0; k < n; ++k) row[k] = softmax_prob(row[k], m, inv);
}

// What flows into the softmax backward for column k of a row: dL/da_k = dA_k - (c_k . dV_k) for a real
// cluster, 0 for a ghost (ghosts are dropped after the softmax). da: (K) row of x dV^T, cdv: (K).
template <typename acc_t>
MVFAST_HD acc_t assign_grad(const acc_t* da, const acc_t* cdv, int64_t k, int64_t K) {
  return k < K ? da[k] - cdv[k] : acc_t(0);
}

// Gradient of the logits of one row: the softmax backward of assign_grad. a: (KG), ds: (KG).
template <typename acc_t>
MVFAST_HD void assign_backward_row(const acc_t* a, const acc_t* da, const acc_t* cdv, acc_t* ds, int64_t K,
                                   int64_t KG) {
  acc_t dot = 0;
  for (int64_t k = 0; k < K; ++k) dot += a[k] * assign_grad(da, cdv, k, K);
  for (int64_t k = 0; k < KG; ++k) ds[k] = softmax_backward(a[k], assign_grad(da, cdv, k, K), dot);
}

// ---- Part 2: the flow, over a backend's kernels ------------------------------------------------------
//
// Kernels provides, each on contiguous tensors of the accumulation type:
//   softmax(logits (B,M,KG) in place, bias or undefined, mask (B,M) bool or undefined)
//   epilogue(vlad (B,K,D) in place: V -= (sum_i a_ik) c_k; assign; centroids; normalize; out)
//   norm_backward(grad (B,K,D); vlad; centroids; normalize; dv (B,K,D) out; cdv (B,K) = c_k . dV_k out)
//   assign_backward(assign; dA (B,M,K); cdv; lhs (B,M,KG+K) out = [dS | a[:, :, :K]])
//   centroid_grad(assign; dV) -> (K, D) = -sum_b (sum_i a_bik) dV_bk

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_shapes(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& centroids,
                         int64_t ghost_clusters) {
  TORCH_CHECK(x.dim() == 3, "netvlad: x must be (B, M, D), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(2), "netvlad: weight must be (K+G, D=",
              x.size(2), "), got ", weight.sizes());
  TORCH_CHECK(centroids.dim() == 2 && centroids.size(1) == x.size(2), "netvlad: centroids must be (K, D=",
              x.size(2), "), got ", centroids.sizes());
  TORCH_CHECK(weight.size(0) == centroids.size(0) + ghost_clusters, "netvlad: weight must have K+G=",
              centroids.size(0) + ghost_clusters, " rows, got ", weight.size(0));
}

// The inputs in the accumulation type. Low-precision inputs are upcast once so that logits, softmax and
// sums are float32 (a no-op for float32 and float64); ATen's GEMMs read x through its strides.
struct Inputs {
  at::Tensor x, weight, centroids, bias, mask;
  int64_t B, M, D, K, KG;
};

inline Inputs prepare(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& centroids,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                      int64_t ghost_clusters) {
  check_shapes(x, weight, centroids, ghost_clusters);
  const auto acc = acc_type(x.scalar_type());
  Inputs in;
  in.x = x.to(acc);
  in.weight = weight.to(acc).contiguous();
  in.centroids = centroids.to(acc).contiguous();
  in.bias = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  in.mask = mask.has_value() ? mask->contiguous() : at::Tensor();
  in.B = x.size(0), in.M = x.size(1), in.D = x.size(2), in.K = centroids.size(0), in.KG = weight.size(0);
  return in;
}

inline void check_saved(const Inputs& in, const at::Tensor& assign) {
  TORCH_CHECK(assign.scalar_type() == in.x.scalar_type() && assign.is_contiguous() &&
                  assign.sizes() == at::IntArrayRef({in.B, in.M, in.KG}),
              "netvlad backward: assign must be a contiguous (B, M, K+G) tensor of the accumulation type");
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& centroids,
                                                       const std::optional<at::Tensor>& mask,
                                                       int64_t ghost_clusters, bool normalize) {
  const Inputs in = prepare(x, weight, centroids, bias, mask, ghost_clusters);
  const int64_t B = in.B, D = in.D, K = in.K;
  at::Tensor assign = at::matmul(in.x, in.weight.t()).contiguous();  // (B, M, KG) logits
  Kernels::softmax(assign, in.bias, in.mask);                         // now probabilities
  at::Tensor vlad = at::bmm(assign.narrow(2, 0, K).transpose(1, 2), in.x).contiguous();  // (B, K, D)
  at::Tensor out = normalize ? at::empty({B, K * D}, x.options()) : at::empty({B, K, D}, x.options());
  Kernels::epilogue(vlad, assign, in.centroids, normalize, out);
  // Without normalisation the backward needs no descriptor: save nothing for it.
  if (!normalize) vlad = at::empty({0}, vlad.options());
  return {out, assign, vlad};
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& centroids,
    const at::Tensor& assign, const at::Tensor& vlad, int64_t ghost_clusters, bool normalize) {
  const Inputs in = prepare(x, weight, centroids, std::nullopt, std::nullopt, ghost_clusters);
  check_saved(in, assign);
  const int64_t B = in.B, M = in.M, D = in.D, K = in.K, KG = in.KG;
  const at::Tensor grad = grad_out.reshape({B, K, D}).to(in.x.scalar_type()).contiguous();
  at::Tensor dv = at::empty({B, K, D}, grad.options());
  at::Tensor cdv = at::empty({B, K}, grad.options());
  Kernels::norm_backward(grad, vlad, in.centroids, normalize, dv, cdv);
  at::Tensor grad_c = Kernels::centroid_grad(assign, dv);                  // (K, D)
  at::Tensor da = at::bmm(in.x, dv.transpose(1, 2)).contiguous();          // (B, M, K)
  at::Tensor lhs = at::empty({B, M, KG + K}, assign.options());
  Kernels::assign_backward(assign, da, cdv, lhs);                          // [dS | a]
  // dx = dS W + a dV as one product over KG + K: the (B, M, D) output is written once.
  const at::Tensor rhs = at::cat({in.weight.unsqueeze(0).expand({B, KG, D}), dv}, 1);  // (B, KG+K, D)
  at::Tensor grad_x = at::bmm(lhs, rhs);
  const at::Tensor ds = lhs.narrow(2, 0, KG);
  at::Tensor grad_w = at::mm(ds.reshape({B * M, KG}).t(), in.x.reshape({B * M, D}));  // (KG, D)
  at::Tensor grad_b = ds.sum(at::IntArrayRef({0, 1}));
  return {grad_x.to(x.scalar_type()), grad_w.to(weight.scalar_type()), grad_b.to(weight.scalar_type()),
          grad_c.to(centroids.scalar_type())};
}

}  // namespace netvlad
}  // namespace mvfast
