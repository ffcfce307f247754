// Conv3d + BatchNorm3d + ReLU CUDA kernels. The flow is in csrc/conv3d_bn_relu.h and the math per element
// (Welford combine, BN+ReLU apply, the recomputed ReLU mask, BN backward) is its MVFAST_HD functions, the
// very ones the CPU kernels run. The conv is ATen's (cuDNN). These kernels add the thread mapping and
// the reductions:
//   - statistics and the backward sums: a block per (chunk of the R = N*S positions, channel); each
//     thread folds its values (Welford for the statistics), the block combines its threads in shared
//     memory, and the chunks are combined afterwards (statistics: welford_combine per channel; sums: ATen);
//   - apply and backward apply: a thread per element, walking z in its own memory order (coalesced), the
//     other tensor (output or grad_out) addressed in its layout.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "conv3d_bn_relu.h"
#include "reduce.cuh"

namespace mvfast {
namespace conv3d_bn_relu {
namespace {

using cuda::block_sum;

constexpr int kThreads = 256;
constexpr int64_t kChunk = 8192;  // positions per statistics block

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// (N, C, S) addressing of a 5-D tensor dense in NCDHW (cl = false) or channels_last_3d (cl = true).
struct Layout {
  int64_t C, S;
  bool cl;
  __device__ __forceinline__ int64_t offset(int64_t n, int64_t c, int64_t s) const {
    return cl ? (n * S + s) * C + c : (n * C + c) * S + s;
  }
  // (n, c, s) of the i-th element in memory order
  __device__ __forceinline__ void coords(int64_t i, int64_t& n, int64_t& c, int64_t& s) const {
    if (cl) {
      c = i % C;
      s = (i / C) % S;
      n = i / (C * S);
    } else {
      s = i % S;
      c = (i / S) % C;
      n = i / (C * S);
    }
  }
};

Layout layout_of(const at::Tensor& t) {
  const int64_t N = t.size(0), C = t.size(1);
  return {C, t.numel() / std::max<int64_t>(1, N * C), is_channels_last(t)};
}

// Block (chunk, c): Welford over positions r in the chunk, then a tree combine in shared memory.
template <typename scalar_t, typename acc_t>
__global__ void stats_kernel(const scalar_t* __restrict__ z, Layout L, int64_t R, acc_t* __restrict__ pn,
                             acc_t* __restrict__ pmean, acc_t* __restrict__ pm2) {
  __shared__ acc_t sn[kThreads], smean[kThreads], sm2[kThreads];
  const int64_t chunk = blockIdx.x, c = blockIdx.y;
  const int64_t r0 = chunk * kChunk, r1 = std::min(R, r0 + kChunk);
  acc_t n = 0, mean = 0, m2 = 0;
  for (int64_t r = r0 + threadIdx.x; r < r1; r += blockDim.x) {
    const acc_t v = static_cast<acc_t>(z[L.offset(r / L.S, c, r % L.S)]);
    welford_combine(n, mean, m2, acc_t(1), v, acc_t(0));
  }
  sn[threadIdx.x] = n;
  smean[threadIdx.x] = mean;
  sm2[threadIdx.x] = m2;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      acc_t a = sn[threadIdx.x], b = smean[threadIdx.x], d = sm2[threadIdx.x];
      welford_combine(a, b, d, sn[threadIdx.x + half], smean[threadIdx.x + half], sm2[threadIdx.x + half]);
      sn[threadIdx.x] = a;
      smean[threadIdx.x] = b;
      sm2[threadIdx.x] = d;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const int64_t i = c * gridDim.x + chunk;
    pn[i] = sn[0];
    pmean[i] = smean[0];
    pm2[i] = sm2[0];
  }
}

// Thread per channel: combines its chunks.
template <typename acc_t>
__global__ void stats_combine_kernel(const acc_t* __restrict__ pn, const acc_t* __restrict__ pmean,
                                     const acc_t* __restrict__ pm2, int64_t chunks, int64_t C,
                                     acc_t* __restrict__ mean, acc_t* __restrict__ m2) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc_t n = 0, m = 0, s = 0;
  for (int64_t k = 0; k < chunks; ++k) welford_combine(n, m, s, pn[c * chunks + k], pmean[c * chunks + k], pm2[c * chunks + k]);
  mean[c] = m;
  m2[c] = s;
}

template <typename scalar_t, typename acc_t>
__global__ void apply_kernel(const scalar_t* __restrict__ z, Layout Lz, scalar_t* __restrict__ out, Layout Lo,
                             const acc_t* __restrict__ scale, const acc_t* __restrict__ shift, bool relu,
                             int64_t numel) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= numel) return;
  int64_t n, c, s;
  Lz.coords(i, n, c, s);
  out[Lo.offset(n, c, s)] = static_cast<scalar_t>(bn_relu(static_cast<acc_t>(z[i]), scale[c], shift[c], relu));
}

// Block (chunk, c): sums of g and g * xhat over the chunk's positions.
template <typename scalar_t, typename acc_t>
__global__ void bwd_reduce_kernel(const scalar_t* __restrict__ gy, Layout Lg, const scalar_t* __restrict__ z,
                                  Layout Lz, int64_t R, const acc_t* __restrict__ scale,
                                  const acc_t* __restrict__ shift, const acc_t* __restrict__ mean,
                                  const acc_t* __restrict__ invstd, bool relu, acc_t* __restrict__ psg,
                                  acc_t* __restrict__ psgx) {
  const int64_t chunk = blockIdx.x, c = blockIdx.y;
  const int64_t r0 = chunk * kChunk, r1 = std::min(R, r0 + kChunk);
  const acc_t sc = scale[c], sh = shift[c], mu = mean[c], iv = invstd[c];
  acc_t a = 0, b = 0;
  for (int64_t r = r0 + threadIdx.x; r < r1; r += blockDim.x) {
    const int64_t n = r / Lz.S, s = r % Lz.S;
    const acc_t zv = static_cast<acc_t>(z[Lz.offset(n, c, s)]);
    const acc_t g = relu_grad(static_cast<acc_t>(gy[Lg.offset(n, c, s)]), zv, sc, sh, relu);
    a += g;
    b += g * ((zv - mu) * iv);
  }
  a = block_sum(a);
  b = block_sum(b);
  if (threadIdx.x == 0) {
    psg[c * gridDim.x + chunk] = a;
    psgx[c * gridDim.x + chunk] = b;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bwd_apply_kernel(const scalar_t* __restrict__ gy, Layout Lg, const scalar_t* __restrict__ z,
                                 Layout Lz, scalar_t* __restrict__ gz, const acc_t* __restrict__ scale,
                                 const acc_t* __restrict__ shift, const acc_t* __restrict__ mean,
                                 const acc_t* __restrict__ invstd, const acc_t* __restrict__ mean_g,
                                 const acc_t* __restrict__ mean_gx, bool relu, int64_t numel) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= numel) return;
  int64_t n, c, s;
  Lz.coords(i, n, c, s);
  const acc_t zv = static_cast<acc_t>(z[i]);
  const acc_t g = relu_grad(static_cast<acc_t>(gy[Lg.offset(n, c, s)]), zv, scale[c], shift[c], relu);
  gz[i] = static_cast<scalar_t>(bn_backward(g, (zv - mean[c]) * invstd[c], scale[c], mean_g[c], mean_gx[c]));
}

struct CudaKernels {
  static void stats(const at::Tensor& z, at::Tensor& mean, at::Tensor& m2) {
    const Layout L = layout_of(z);
    const int64_t R = z.numel() / std::max<int64_t>(1, L.C);
    if (L.C == 0) return;
    const int64_t chunks = std::max<int64_t>(1, ceil_div(R, kChunk));
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "conv3d_bn_relu_stats_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto opts = mean.options();
      at::Tensor pn = at::empty({L.C, chunks}, opts), pmean = at::empty({L.C, chunks}, opts),
                 pm2 = at::empty({L.C, chunks}, opts);
      stats_kernel<scalar_t, acc_t><<<dim3(chunks, L.C), kThreads, 0, stream>>>(
          z.data_ptr<scalar_t>(), L, R, pn.data_ptr<acc_t>(), pmean.data_ptr<acc_t>(), pm2.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      stats_combine_kernel<acc_t><<<ceil_div(L.C, kThreads), kThreads, 0, stream>>>(
          pn.data_ptr<acc_t>(), pmean.data_ptr<acc_t>(), pm2.data_ptr<acc_t>(), chunks, L.C, mean.data_ptr<acc_t>(),
          m2.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void apply(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift, bool relu,
                    at::Tensor& out) {
    const int64_t numel = z.numel();
    if (numel == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "conv3d_bn_relu_apply_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      apply_kernel<scalar_t, acc_t><<<ceil_div(numel, kThreads), kThreads, 0, stream>>>(
          z.data_ptr<scalar_t>(), layout_of(z), out.data_ptr<scalar_t>(), layout_of(out), scale.data_ptr<acc_t>(),
          shift.data_ptr<acc_t>(), relu, numel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void bwd_reduce(const at::Tensor& gy, const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                         const at::Tensor& mean, const at::Tensor& invstd, bool relu, at::Tensor& sum_g,
                         at::Tensor& sum_gx) {
    const Layout Lz = layout_of(z);
    const int64_t R = z.numel() / std::max<int64_t>(1, Lz.C);
    if (Lz.C == 0) return;
    const int64_t chunks = std::max<int64_t>(1, ceil_div(R, kChunk));
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "conv3d_bn_relu_bwd_reduce_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      at::Tensor psg = at::empty({Lz.C, chunks}, sum_g.options()), psgx = at::empty({Lz.C, chunks}, sum_g.options());
      bwd_reduce_kernel<scalar_t, acc_t><<<dim3(chunks, Lz.C), kThreads, 0, stream>>>(
          gy.data_ptr<scalar_t>(), layout_of(gy), z.data_ptr<scalar_t>(), Lz, R, scale.data_ptr<acc_t>(),
          shift.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), relu, psg.data_ptr<acc_t>(),
          psgx.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::sum_out(sum_g, psg, {1});
      at::sum_out(sum_gx, psgx, {1});
    });
  }

  static void bwd_apply(const at::Tensor& gy, const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                        const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& mean_g,
                        const at::Tensor& mean_gx, bool relu, at::Tensor& gz) {
    const int64_t numel = z.numel();
    if (numel == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "conv3d_bn_relu_bwd_apply_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const at::Tensor mg = mean_g.contiguous(), mgx = mean_gx.contiguous();
      bwd_apply_kernel<scalar_t, acc_t><<<ceil_div(numel, kThreads), kThreads, 0, stream>>>(
          gy.data_ptr<scalar_t>(), layout_of(gy), z.data_ptr<scalar_t>(), layout_of(z), gz.data_ptr<scalar_t>(),
          scale.data_ptr<acc_t>(), shift.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(),
          mg.data_ptr<acc_t>(), mgx.data_ptr<acc_t>(), relu, numel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void fold(const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& bn_weight,
                   const at::Tensor& bn_bias, const at::Tensor& running_mean, const at::Tensor& running_var,
                   double eps, at::MemoryFormat fmt, at::Tensor& w, at::Tensor& b) {
    fold_bn(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, fmt, w, b);
  }

  // cuDNN's convolution with the folded bias, then ReLU in place.
  static at::Tensor eval_conv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const ConvArgs& a,
                              bool relu) {
    at::Tensor y = conv(x, w, b, a);
    return relu ? y.clamp_min_(0) : y;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool training, double eps, bool relu, bool conv_channels_last) {
  const c10::cuda::CUDAGuard guard(x.device());
  const ConvArgs a{stride, padding, dilation, groups};
  if (training) {
    return forward_train<CudaKernels>(x, weight, bn_weight, bn_bias, a, eps, relu, conv_channels_last);
  }
  TORCH_CHECK(running_mean.has_value() && running_var.has_value(),
              "conv3d_bn_relu: eval (training=False) needs running_mean and running_var");
  at::Tensor out = forward_eval<CudaKernels>(x, weight, bias, bn_weight, bn_bias, *running_mean, *running_var, a,
                                             eps, relu);
  const at::Tensor none = at::empty({0}, x.options());
  const at::Tensor none_acc = at::empty({0}, x.options().dtype(acc_type(x.scalar_type())));
  return {out, none, none_acc, none_acc.clone(), none_acc.clone(), none.clone()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
    bool need_grad_x, bool need_grad_weight) {
  const c10::cuda::CUDAGuard guard(z.device());
  return backward_train<CudaKernels>(grad_out, x, weight, bn_weight, bn_bias, z, mean, invstd,
                                     ConvArgs{stride, padding, dilation, groups}, relu, need_grad_x,
                                     need_grad_weight);
}

}  // namespace
}  // namespace conv3d_bn_relu
}  // namespace mvfast

TORCH_LIBRARY_IMPL(mvfast, CUDA, m) {
  m.impl("conv3d_bn_relu_fwd", &mvfast::conv3d_bn_relu::fwd_cuda);
  m.impl("conv3d_bn_relu_bwd", &mvfast::conv3d_bn_relu::bwd_cuda);
}
