// Fused Conv3d + BatchNorm3d + ReLU, shared by csrc/cpu/conv3d_bn_relu.cpp and csrc/cuda/conv3d_bn_relu.cu.
//
// Part 1: the per-element and per-channel math, MVFAST_HD, called by both backends: the Welford/Chan
//         combine of partial statistics, BN+ReLU apply, the recomputed ReLU mask and BN+ReLU backward.
// Part 2: the host-side flow of training forward, training backward and eval, a template over the
//         backend's kernels. The convolution itself is ATen's (oneDNN on the CPU, cuDNN on the GPU).
//
// Shapes: x (N, Cin, D, H, W); weight (C, Cin/groups, kD, kH, kW); z = conv3d(x, weight) (N, C, Do, Ho, Wo)
// without the conv bias; per channel c over the R = N*Do*Ho*Wo values of z:
//   mean, var (biased, to normalise), invstd = 1/sqrt(var + eps)
//   y = relu(z * scale + shift),  scale = bn_weight * invstd,  shift = bn_bias - mean * scale
// In training the conv bias cancels in y (z + b - mean(z + b) = z - mean(z)), so the kernels leave it out;
// the Python wrapper adds it to the batch mean for the running-mean update. z keeps the layout the conv
// produced it in (channels_last_3d where the backend chose it); y takes the layout of x.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "common.h"

namespace mvfast {
namespace conv3d_bn_relu {

// ---- Part 1: math ------------------------------------------------------------------------------------

// Chan et al.'s combine of two partial statistics (count n, mean, M2 = sum of squared deviations):
// (n, mean, m2) becomes the statistics of both parts. Stable in float32 because it never forms
// E[x^2] - E[x]^2; each part's M2 is itself computed around the part's own mean.
template <typename acc_t>
MVFAST_HD void welford_combine(acc_t& n, acc_t& mean, acc_t& m2, acc_t n_b, acc_t mean_b, acc_t m2_b) {
  if (!(n_b > acc_t(0))) return;
  const acc_t n_ab = n + n_b;
  const acc_t delta = mean_b - mean;
  const acc_t f = n_b / n_ab;
  mean += delta * f;
  m2 += m2_b + delta * delta * n * f;
  n = n_ab;
}

// 1 / sqrt(biased variance + eps), as batch_norm normalises.
template <typename acc_t>
MVFAST_HD acc_t invstd_of(acc_t m2, acc_t n, acc_t eps) {
  return acc_t(1) / sqrt_(m2 / n + eps);
}

// The per-channel affine that BN reduces to: y = z * scale + shift.
template <typename acc_t>
MVFAST_HD void bn_affine(acc_t gamma, acc_t beta, acc_t mean, acc_t invstd, acc_t& scale, acc_t& shift) {
  scale = gamma * invstd;
  shift = beta - mean * scale;
}

// BN + ReLU of one value. `y < 0 ? 0 : y` keeps a NaN a NaN, as torch.relu does.
template <typename acc_t>
MVFAST_HD acc_t bn_relu(acc_t z, acc_t scale, acc_t shift, bool relu) {
  const acc_t y = z * scale + shift;
  return relu && y < acc_t(0) ? acc_t(0) : y;
}

// The gradient that reaches BN's output: the ReLU mask is recomputed from z (y > 0, as relu's backward
// tests its result), so neither y nor the mask is saved.
template <typename acc_t>
MVFAST_HD acc_t relu_grad(acc_t gy, acc_t z, acc_t scale, acc_t shift, bool relu) {
  return relu && !(z * scale + shift > acc_t(0)) ? acc_t(0) : gy;
}

// Training-mode BN backward of one value, given g = relu_grad(...), xhat = (z - mean) * invstd and the
// channel's mean_g = sum(g) / R and mean_gx = sum(g * xhat) / R:
//   dz = gamma * invstd * (g - mean_g - xhat * mean_gx)
template <typename acc_t>
MVFAST_HD acc_t bn_backward(acc_t g, acc_t xhat, acc_t scale, acc_t mean_g, acc_t mean_gx) {
  return scale * (g - mean_g - xhat * mean_gx);
}

// ---- Part 2: the flow, over a backend's kernels ------------------------------------------------------
//
// Kernels provides:
//   stats(z, mean (C) acc, m2 (C) acc): per-channel mean and sum of squared deviations of z
//   apply(z, scale (C) acc, shift (C) acc, relu, out): out = relu(z * scale + shift), out in any of the
//        two layouts (NCDHW or channels_last_3d) and z's dtype
//   bwd_reduce(gy, z, scale, shift, mean, invstd, relu, sum_g (C) acc, sum_gx (C) acc)
//   bwd_apply(gy, z, scale, shift, mean, invstd, mean_g, mean_gx, relu, gz): gz in z's layout
//   fold(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, fmt, w, b): BN folded into the
//        conv's weight (in layout fmt) and bias (see fold_bn)
//   eval_conv(x, w, b, stride, padding, dilation, groups, relu) -> relu(conv3d(x, w, b)) in x's layout
// gy is given in one of the two layouts (the flow makes it so); z is dense in one of them.

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Called by the backends' entry points before anything else, a CUDA device guard included.
inline void check_forward_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var) {
  check_same_device("conv3d_bn_relu_fwd", {"x", x},
                    {{"weight", weight}, {"bias", bias}, {"bn_weight", bn_weight}, {"bn_bias", bn_bias},
                     {"running_mean", running_mean}, {"running_var", running_var}});
}

inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& z,
                                const at::Tensor& mean, const at::Tensor& invstd) {
  check_same_device("conv3d_bn_relu_bwd", {"z", z},
                    {{"grad_out", grad_out}, {"x", x}, {"weight", weight}, {"bn_weight", bn_weight},
                     {"bn_bias", bn_bias}, {"mean", mean}, {"invstd", invstd}});
}

inline bool is_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast3d) && !t.is_contiguous();
}

inline at::MemoryFormat format_of(const at::Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
}

// True when t is dense in NCDHW or in channels_last_3d order, the two layouts the kernels address.
inline bool in_kernel_layout(const at::Tensor& t) {
  return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

inline at::Tensor in_layout(const at::Tensor& t, at::MemoryFormat fmt) {
  return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
}

struct ConvArgs {
  at::IntArrayRef stride, padding, dilation;
  int64_t groups;
};

inline at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                       const ConvArgs& a) {
  return at::convolution(x, w, b, a.stride, a.padding, a.dilation, false, {0, 0, 0}, a.groups);
}

// Training forward. conv_channels_last: the layout the conv runs in, channels_last_3d (true) or NCDHW
// (false), chosen by the caller (mvfast/ops/conv3d_bn_relu.py); x is converted when it is not in it, and
// the converted copy returned. Returns (out, z, mean, invstd, var_unbiased, x_conv), x_conv empty when x
// itself is what the conv read.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_train(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const ConvArgs& args, double eps, bool relu, bool conv_channels_last) {
  const auto acc = acc_type(x.scalar_type());
  const auto conv_fmt = conv_channels_last ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
  const at::Tensor xc = in_layout(x, conv_fmt);
  const at::Tensor wc = in_layout(weight, conv_fmt);
  // z in conv_fmt always (ATen's float16 CPU conv answers a channels_last input in NCDHW), so that the
  // layout of every output is a function of the arguments, as the fake kernels state it.
  const at::Tensor z = in_layout(conv(xc, wc, std::nullopt, args), conv_fmt);
  const int64_t C = z.size(1);
  const int64_t R = z.numel() / (C > 0 ? C : 1);
  TORCH_CHECK(R > 1, "conv3d_bn_relu: training needs more than one value per channel, got conv output ",
              z.sizes());

  at::Tensor mean = at::empty({C}, z.options().dtype(acc));
  at::Tensor m2 = at::empty({C}, z.options().dtype(acc));
  Kernels::stats(z, mean, m2);
  const at::Tensor invstd = (m2 / static_cast<double>(R) + eps).rsqrt();
  const at::Tensor var = m2 / static_cast<double>(R - 1);
  const at::Tensor scale = bn_weight.to(acc) * invstd;
  const at::Tensor shift = bn_bias.to(acc) - mean * scale;

  at::Tensor out = at::empty(z.sizes(), z.options().memory_format(format_of(x)));
  Kernels::apply(z, scale.contiguous(), shift.contiguous(), relu, out);
  at::Tensor x_conv = xc.is_same(x) ? at::empty({0}, x.options()) : xc;
  return {out, z, mean, invstd, var, x_conv};
}

// Training backward: BN+ReLU backward by the kernels into dz (z's layout), then ATen's conv backward.
// Returns (grad_x, grad_weight, grad_bn_weight, grad_bn_bias). grad_x and grad_weight are empty (0,)
// tensors when not asked for; grad_x has z's layout (the conv's, as ATen's own conv backward answers),
// grad_weight weight's.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_train(
    const at::Tensor& grad_out, const at::Tensor& x_conv, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd,
    const ConvArgs& args, bool relu, bool need_grad_x, bool need_grad_weight) {
  const auto acc = acc_type(z.scalar_type());
  TORCH_CHECK(grad_out.sizes() == z.sizes(), "conv3d_bn_relu backward: grad_out must have shape ", z.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(in_kernel_layout(z), "conv3d_bn_relu backward: z must be dense NCDHW or channels_last_3d");
  const int64_t C = z.size(1);
  const int64_t R = z.numel() / (C > 0 ? C : 1);
  const at::Tensor gy = in_kernel_layout(grad_out) ? grad_out : grad_out.contiguous(format_of(z));
  const at::Tensor scale = (bn_weight.to(acc) * invstd).contiguous();
  const at::Tensor shift = (bn_bias.to(acc) - mean * scale).contiguous();
  at::Tensor sum_g = at::empty({C}, z.options().dtype(acc));
  at::Tensor sum_gx = at::empty({C}, z.options().dtype(acc));
  Kernels::bwd_reduce(gy, z, scale, shift, mean.contiguous(), invstd.contiguous(), relu, sum_g, sum_gx);
  const at::Tensor mean_g = sum_g / static_cast<double>(R);
  const at::Tensor mean_gx = sum_gx / static_cast<double>(R);
  at::Tensor gz = at::empty(z.sizes(), z.options().memory_format(format_of(z)));
  Kernels::bwd_apply(gy, z, scale, shift, mean.contiguous(), invstd.contiguous(), mean_g, mean_gx, relu, gz);

  at::Tensor grad_x = at::empty({0}, z.options()), grad_w = at::empty({0}, weight.options());
  if (need_grad_x || need_grad_weight) {
    const at::Tensor wc = in_layout(weight, format_of(z));
    auto grads = at::convolution_backward(gz, in_layout(x_conv, format_of(z)), wc, std::nullopt, args.stride,
                                          args.padding, args.dilation, false, {0, 0, 0}, args.groups,
                                          {need_grad_x, need_grad_weight, false});
    if (need_grad_x) grad_x = in_layout(std::get<0>(grads), format_of(z));
    if (need_grad_weight) grad_w = in_layout(std::get<1>(grads), format_of(weight));
  }
  return {grad_x, grad_w, sum_gx.to(bn_weight.scalar_type()), sum_g.to(bn_bias.scalar_type())};
}

// Eval: BN folded into the conv, w' = w * scale (per output channel), b' = (b - running_mean) * scale +
// bn_bias, scale = bn_weight / sqrt(running_var + eps), computed in the accumulation type: in ATen ops here
// (what the CUDA kernels use), in one loop by the CPU kernels. w' is in layout fmt, both in weight's dtype.
inline void fold_bn(const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& bn_weight,
                    const at::Tensor& bn_bias, const at::Tensor& running_mean, const at::Tensor& running_var,
                    double eps, at::MemoryFormat fmt, at::Tensor& w, at::Tensor& b) {
  const auto acc = acc_type(weight.scalar_type());
  const at::Tensor scale = bn_weight.to(acc) * (running_var.to(acc) + eps).rsqrt();
  b = bn_bias.to(acc) - running_mean.to(acc) * scale;
  if (bias.has_value() && bias->defined()) b = b + bias->to(acc) * scale;
  b = b.to(weight.scalar_type());
  w = in_layout((weight.to(acc) * scale.view({-1, 1, 1, 1, 1})).to(weight.scalar_type()), fmt);
}

// bias and ReLU in the conv's epilogue.
template <class Kernels>
at::Tensor forward_eval(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& running_mean,
                        const at::Tensor& running_var, const ConvArgs& args, double eps, bool relu) {
  at::Tensor w, b;
  Kernels::fold(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, format_of(x), w, b);
  return in_layout(Kernels::eval_conv(x, w, b, args, relu), format_of(x));
}

}  // namespace conv3d_bn_relu
}  // namespace mvfast
