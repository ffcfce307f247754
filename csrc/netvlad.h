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

#include "checks.h"
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

// What cluster k adds to the squared norm of the intra-normalised descriptor u (all K rows of V_k / max(|V_k|,
// eps), flattened), from |V_k|^2: |V_k|^2 / max(|V_k|, eps)^2.
template <typename acc_t>
MVFAST_HD acc_t intra_normalized_sumsq(acc_t sumsq) {
  const acc_t inv = inv_clamped_norm(sumsq);
  return sumsq * inv * inv;
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
//   assign_backward(assign; dA (B,M,K); cdv; ds (B,M,KG) out, the gradient of the logits)
//   centroid_grad(assign; dV) -> (K, D) = -sum_b (sum_i a_bik) dV_bk
//
// The backends' entry points check their arguments (check_forward_args, check_backward_args) before
// anything else, a CUDA device guard included.
//
// Masked rows: their values never reach a product. 0 * NaN is NaN, so a zero assignment alone does not
// keep a NaN or inf of a padded row out of a^T x or dS^T x; the products read x with those rows zeroed.

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
  // As the public op. With K + G = 0 the CPU softmax would read the first logit of an empty row.
  TORCH_CHECK(centroids.size(0) >= 1, "netvlad: centroids must hold at least one cluster (K >= 1), got ",
              centroids.sizes());
}

inline void check_mask(const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return;
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->sizes() == x.sizes().slice(0, 2),
              "netvlad: mask must be a bool (B, M) = ", x.sizes().slice(0, 2), " tensor, got ", mask->scalar_type(),
              " ", mask->sizes());
}

inline void check_forward_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& centroids, const std::optional<at::Tensor>& mask,
                               int64_t ghost_clusters) {
  check_same_device("netvlad_fwd", {"x", x}, {{"weight", weight}, {"bias", bias}, {"centroids", centroids},
                                              {"mask", mask}});
  check_shapes(x, weight, centroids, ghost_clusters);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "netvlad: bias must be (K+G=", weight.size(0),
                ",), got ", bias->sizes());
  }
  check_mask(x, mask);
}

inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& centroids, const at::Tensor& assign, const at::Tensor& vlad,
                                const std::optional<at::Tensor>& mask, int64_t ghost_clusters, bool normalize) {
  check_same_device("netvlad_bwd", {"x", x}, {{"grad_out", grad_out}, {"weight", weight}, {"centroids", centroids},
                                              {"assign", assign}, {"vlad", vlad}, {"mask", mask}});
  check_shapes(x, weight, centroids, ghost_clusters);
  check_mask(x, mask);
  const int64_t B = x.size(0), M = x.size(1), D = x.size(2), K = centroids.size(0), KG = weight.size(0);
  TORCH_CHECK(assign.scalar_type() == acc_type(x.scalar_type()) && assign.is_contiguous() &&
                  assign.sizes() == at::IntArrayRef({B, M, KG}),
              "netvlad backward: assign must be a contiguous (B, M, K+G) tensor of the accumulation type, got ",
              assign.scalar_type(), " ", assign.sizes());
  TORCH_CHECK(grad_out.numel() == B * K * D, "netvlad backward: grad_out must have B*K*D = ", B * K * D,
              " elements, got ", grad_out.sizes());
  if (normalize) {
    TORCH_CHECK(vlad.scalar_type() == assign.scalar_type() && vlad.is_contiguous() &&
                    vlad.sizes() == at::IntArrayRef({B, K, D}),
                "netvlad backward: vlad must be a contiguous (B, K, D) tensor of the accumulation type, got ",
                vlad.scalar_type(), " ", vlad.sizes());
  }
}

// The inputs in the accumulation type. Low-precision inputs are upcast once so that logits, softmax and
// sums are float32 (a no-op for float32 and float64); ATen's GEMMs read x through its strides.
struct Inputs {
  at::Tensor x, weight, centroids, bias, mask;
  int64_t B, M, D, K, KG;
};

inline Inputs prepare(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& centroids,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask) {
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

// x (in the accumulation type) with its masked rows zeroed, for the batched flow's products. A copy of x
// when there is a mask: where x was upcast, the upcast copy is zeroed in place, so low-precision inputs
// pay nothing more. Without a mask, x itself.
inline at::Tensor masked_rows_zeroed(const Inputs& in, const at::Tensor& x) {
  if (!in.mask.defined()) return in.x;
  const at::Tensor drop = in.mask.logical_not().unsqueeze(-1);  // (B, M, 1)
  return in.x.is_same(x) ? in.x.masked_fill(drop, 0) : in.x.masked_fill_(drop, 0);
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const Inputs& in, const at::Tensor& x, bool normalize) {
  const int64_t B = in.B, D = in.D, K = in.K;
  const at::Tensor xs = masked_rows_zeroed(in, x);
  at::Tensor assign = at::matmul(xs, in.weight.t()).contiguous();  // (B, M, KG) logits
  Kernels::softmax(assign, in.bias, in.mask);                       // now probabilities
  at::Tensor vlad = at::bmm(assign.narrow(2, 0, K).transpose(1, 2), xs).contiguous();  // (B, K, D)
  at::Tensor out = normalize ? at::empty({B, K * D}, x.options()) : at::empty({B, K, D}, x.options());
  Kernels::epilogue(vlad, assign, in.centroids, normalize, out);
  // Without normalisation the backward needs no descriptor: save nothing for it.
  if (!normalize) vlad = at::empty({0}, vlad.options());
  return {out, assign, vlad};
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const Inputs& in, const at::Tensor& grad_out,
                                                                    const at::Tensor& x, const at::Tensor& assign,
                                                                    const at::Tensor& vlad, bool normalize) {
  // Returns (grad_x, grad_weight, grad_bias, grad_centroids) in the accumulation type.
  const int64_t B = in.B, M = in.M, D = in.D, K = in.K, KG = in.KG;
  const at::Tensor xs = masked_rows_zeroed(in, x);
  const at::Tensor grad = grad_out.reshape({B, K, D}).to(in.x.scalar_type()).contiguous();
  at::Tensor dv = at::empty({B, K, D}, grad.options());
  at::Tensor cdv = at::empty({B, K}, grad.options());
  Kernels::norm_backward(grad, vlad, in.centroids, normalize, dv, cdv);
  at::Tensor grad_c = Kernels::centroid_grad(assign, dv);                   // (K, D)
  at::Tensor da = at::bmm(xs, dv.transpose(1, 2)).contiguous();            // (B, M, K)
  at::Tensor ds = at::empty({B, M, KG}, assign.options());
  Kernels::assign_backward(assign, da, cdv, ds);                            // (B, M, KG)
  // dx = dS W + a dV as two products into one (B, M, D) output: the second accumulates into the first.
  at::Tensor grad_x = at::matmul(ds, in.weight);
  grad_x.baddbmm_(assign.narrow(2, 0, K), dv);
  at::Tensor grad_w = at::mm(ds.reshape({B * M, KG}).t(), xs.reshape({B * M, D}));  // (KG, D)
  at::Tensor grad_b = ds.sum(at::IntArrayRef({0, 1}));
  return {grad_x, grad_w, grad_b, grad_c};
}

// The gradients (in the accumulation type) in the dtypes of the inputs they belong to.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> in_input_dtypes(
    const std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>& grads, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& centroids) {
  const auto& [gx, gw, gb, gc] = grads;
  return {gx.to(x.scalar_type()), gw.to(weight.scalar_type()), gb.to(weight.scalar_type()),
          gc.to(centroids.scalar_type())};
}

}  // namespace netvlad
}  // namespace mvfast
