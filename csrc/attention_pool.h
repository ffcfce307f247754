// Attention pooling (paper eq. 10-13), shared by csrc/cpu/attention_pool.cpp and
// csrc/cuda/attention_pool.cu.
//
// Part 1: the per-element math of the online softmax, MVFAST_HD, called by both backends.
// Part 2: the host-side flow of forward and backward, a template over the backend's kernels.
//
// Shapes: x (B, L, D), weight (H, D), mask (B, L) bool (True = valid), out (B, H, D), lse (B, H).
// Scores s[b,l,h] = x[b,l] . weight[h]; a = softmax over the valid l; out[b,h] = sum_l a[b,l,h] x[b,l].
//
// The bias of the public op is not passed to these kernels: it is constant over l for each head, so it
// cancels in the softmax exactly. Leaving it out changes no result and avoids rounding the scores to the
// bias's magnitude. The saved log-sum-exp is therefore that of x . weight alone.
//
// Both passes stream x once. The L rows of a sample may be cut into S splits that run in parallel; each
// split keeps a running (max, sum, weighted sum) per head, and the splits are merged afterwards, as in
// flash-decoding.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <tuple>

#include "checks.h"
#include "common.h"

namespace mvfast {
namespace attention_pool {

// ---- Part 1: math ------------------------------------------------------------------------------------

MVFAST_HD float log_(float x) { return ::logf(x); }
MVFAST_HD double log_(double x) { return ::log(x); }

template <typename acc_t>
MVFAST_HD acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// Running state of an online softmax over a stream of scores: m is the largest score seen (-inf before
// the first valid one) and s = sum exp(score - m). A block of scores (one row on the CPU, a tile of rows
// on the GPU) with maximum block_max is added in three steps:
//   rescale = online_rescale(m, block_max)   m becomes the new maximum
//   p_i     = online_prob(score_i, m)        for each score of the block (-inf for a masked one)
//   s       = s * rescale + sum_i p_i        and the running weighted sum: acc * rescale + sum_i p_i x_i
template <typename acc_t>
MVFAST_HD acc_t online_rescale(acc_t& m, acc_t block_max) {
  const acc_t mn = block_max > m ? block_max : m;
  // Nothing valid seen yet (both -inf): the running sums are 0, keep them so instead of exp(NaN).
  const acc_t r = mn == neg_inf<acc_t>() ? acc_t(1) : exp_(m - mn);
  m = mn;
  return r;
}

template <typename acc_t>
MVFAST_HD acc_t online_prob(acc_t score, acc_t m) {
  return score == neg_inf<acc_t>() ? acc_t(0) : exp_(score - m);
}

// Merges a finished split (m_part, s_part) into the running (m, s). An empty split (s_part = 0,
// m_part = -inf) changes nothing.
template <typename acc_t>
MVFAST_HD void online_merge(acc_t& m, acc_t& s, acc_t m_part, acc_t s_part) {
  if (!(s_part > acc_t(0))) return;
  if (!(s > acc_t(0))) {
    m = m_part;
    s = s_part;
    return;
  }
  const acc_t mn = m > m_part ? m : m_part;
  s = s * exp_(m - mn) + s_part * exp_(m_part - mn);
  m = mn;
}

// The factor of a split's weighted sum in the merged one, once every split is merged into the maximum m:
// exp(m_part - m), 0 for an empty split.
template <typename acc_t>
MVFAST_HD acc_t split_factor(acc_t m_part, acc_t s_part, acc_t m) {
  return s_part > acc_t(0) ? exp_(m_part - m) : acc_t(0);
}

// Log-sum-exp of a finished softmax. A sample with no valid position gets +inf, so that every weight
// recomputed from it, exp(score - lse), is 0 rather than NaN.
template <typename acc_t>
MVFAST_HD acc_t finish_lse(acc_t m, acc_t s) {
  return s > acc_t(0) ? m + log_(s) : std::numeric_limits<acc_t>::infinity();
}

// 1 / sum for the output, 0 for a sample with no valid position (its output is 0, not NaN).
template <typename acc_t>
MVFAST_HD acc_t finish_scale(acc_t s) {
  return s > acc_t(0) ? acc_t(1) / s : acc_t(0);
}

// The attention weight of one position from its score and the saved log-sum-exp.
template <typename acc_t>
MVFAST_HD acc_t weight_of(acc_t score, acc_t lse, bool valid) {
  return valid ? exp_(score - lse) : acc_t(0);
}

// Gradient of one score: ds = a (g - c), g = x . dv (+ the gradient of the weight itself when the
// weights are an output) and c = sum_l a_l g_l = out . dv (+ sum_l a_l grad_weight_l), per (b, h).
template <typename acc_t>
MVFAST_HD acc_t score_grad(acc_t a, acc_t g, acc_t c) {
  return softmax_backward(a, g, c);
}

// ---- Part 2: the flow, over a backend's kernels ------------------------------------------------------
//
// The backends' entry points check their arguments (check_forward_args, check_backward_args) before
// anything else, a CUDA device guard included.
//
// Kernels provides:
//   splits(B, L) -> S, how many parts the L rows of a sample are cut into (capped here: capped_splits)
//   partials(x, w (H,D) acc, mask or undefined, S, part_m (B,S,H), part_s (B,S,H), part_acc (B,S,H,D),
//            scores (B,L,H) acc or undefined): one streaming pass over x; writes the raw scores when
//            `scores` is defined (for the weights output)
//   combine(part_m, part_s, part_acc, out (B,H,D) in x's dtype, lse (B,H) acc)
//   weights(scores, lse, mask, weights (B,L,H) in x's dtype)
//   backward(x, w, mask, lse, dv (B,H,D) acc, c (B,H) acc, grad_weights (B,L,H) acc or undefined, S,
//            grad_x (B,L,D) in x's dtype, part_dw (B*S,H,D) acc)
// x may have any strides for b and l; its last dimension is contiguous.

// A backend's split count, capped so that the (B, S, H, D) partial sums (and the backward's weight-gradient
// parts) hold at most about as many values as x: S * H <= L + H - 1. Without it many heads and many
// threads or SMs at a small batch made them many times x (B = 1, H = 512, 264 splits on an H200).
inline int64_t capped_splits(int64_t S, int64_t L, int64_t H) {
  return std::max<int64_t>(1, std::min<int64_t>(S, H > 0 ? (L + H - 1) / H : S));
}

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_shapes(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.dim() == 3, "attention_pool: x must be (B, L, D), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(2), "attention_pool: weight must be (H, D=",
              x.size(2), "), got ", weight.sizes());
  // As the public op: with no head the CPU backward would index an empty row of weights and the CUDA
  // launchers divide by H to size their tile.
  TORCH_CHECK(weight.size(0) >= 1, "attention_pool: weight must hold at least one head (H >= 1), got ",
              weight.sizes());
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->sizes() == x.sizes().slice(0, 2),
                "attention_pool: mask must be a bool (B, L) tensor, got ", mask->scalar_type(), " ",
                mask->sizes());
  }
}

inline void check_forward_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& mask) {
  check_same_device("attention_pool_fwd", {"x", x}, {{"weight", weight}, {"mask", mask}});
  check_shapes(x, weight, mask);
}

inline void check_backward_args(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_weights,
                                const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse,
                                const std::optional<at::Tensor>& weights) {
  check_same_device("attention_pool_bwd", {"x", x},
                    {{"grad_out", grad_out}, {"grad_weights", grad_weights}, {"weight", weight}, {"mask", mask},
                     {"out", out}, {"lse", lse}, {"weights", weights}});
  check_shapes(x, weight, mask);
}

// x with a contiguous last dimension: the kernels read rows of D through the b and l strides. Only a
// view whose last dimension is strided (a transpose) is copied.
inline at::Tensor rows_contiguous(const at::Tensor& x) {
  return x.size(2) <= 1 || x.stride(2) == 1 ? x : x.contiguous();
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x_in, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& mask, bool return_weights) {
  const at::Tensor x = rows_contiguous(x_in);
  const auto acc = acc_type(x.scalar_type());
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), H = weight.size(0);
  const at::Tensor wa = weight.to(acc).contiguous();
  const at::Tensor ma = mask.has_value() ? mask->contiguous() : at::Tensor();
  const auto acc_opts = x.options().dtype(acc);

  const int64_t S = capped_splits(Kernels::splits(B, L), L, H);
  at::Tensor part_m = at::empty({B, S, H}, acc_opts);
  at::Tensor part_s = at::empty({B, S, H}, acc_opts);
  at::Tensor part_acc = at::empty({B, S, H, D}, acc_opts);
  at::Tensor scores = return_weights ? at::empty({B, L, H}, acc_opts) : at::Tensor();
  Kernels::partials(x, wa, ma, S, part_m, part_s, part_acc, scores);

  at::Tensor out = at::empty({B, H, D}, x.options());
  at::Tensor lse = at::empty({B, H}, acc_opts);
  Kernels::combine(part_m, part_s, part_acc, out, lse);
  at::Tensor weights = at::empty({0}, x.options());
  if (return_weights) {
    weights = at::empty({B, L, H}, x.options());
    Kernels::weights(scores, lse, ma, weights);
  }
  return {out, weights, lse};
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_weights,
                                            const at::Tensor& x_in, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& mask, const at::Tensor& out,
                                            const at::Tensor& lse, const std::optional<at::Tensor>& weights) {
  const at::Tensor x = rows_contiguous(x_in);
  const auto acc = acc_type(x.scalar_type());
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), H = weight.size(0);
  TORCH_CHECK(lse.scalar_type() == acc && lse.sizes() == at::IntArrayRef({B, H}),
              "attention_pool backward: lse must be a (B, H) tensor of the accumulation type");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, H, D}) && out.sizes() == grad_out.sizes(),
              "attention_pool backward: grad_out and out must be (B, H, D)");
  const at::Tensor wa = weight.to(acc).contiguous();
  const at::Tensor ma = mask.has_value() ? mask->contiguous() : at::Tensor();
  const at::Tensor la = lse.contiguous();
  const at::Tensor dv = grad_out.to(acc).contiguous();
  // c[b,h] = sum_l a g = out . dv (+ sum_l a grad_weight): small (B, H, D) and (B, L, H) products.
  at::Tensor c = (out.to(acc) * dv).sum(-1);
  at::Tensor ga;
  if (grad_weights.has_value() && grad_weights->numel() > 0) {
    TORCH_CHECK(weights.has_value() && weights->sizes() == at::IntArrayRef({B, L, H}) &&
                    grad_weights->sizes() == weights->sizes(),
                "attention_pool backward: grad_weights needs the (B, L, H) weights");
    ga = grad_weights->to(acc).contiguous();
    c = c + (weights->to(acc) * ga).sum(1);
  }
  c = c.contiguous();

  const int64_t S = capped_splits(Kernels::splits(B, L), L, H);
  at::Tensor grad_x = at::empty({B, L, D}, x.options());
  at::Tensor part_dw = at::empty({B * S, H, D}, x.options().dtype(acc));
  Kernels::backward(x, wa, ma, la, dv, c, ga, S, grad_x, part_dw);
  at::Tensor grad_w = part_dw.sum(0);
  return {grad_x, grad_w.to(weight.scalar_type())};
}

}  // namespace attention_pool
}  // namespace mvfast
