// Conv3d + BatchNorm3d + ReLU CUDA kernels. The flow is in csrc/conv3d_bn_relu.h and the math per element
// (Welford combine, BN+ReLU apply, the recomputed ReLU mask, BN backward) is its MVFAST_HD functions, the
// very ones the CPU kernels run. The conv is ATen's (cuDNN). These kernels add the thread mapping and
// the reductions:
//   - statistics and the backward sums: a block per (sample n, span of kSpan positions, tile of 32
//     channels), a lane per channel; each thread folds its values (Welford for the statistics), the block
//     combines its rows of threads in shared memory, and the blocks' partials are combined afterwards
//     (statistics: welford_combine per channel; sums: ATen). Both layouts are read coalesced: channels_last
//     directly (a warp reads 32 adjacent channels of a position), NCDHW through a transposing tile in
//     shared memory (a warp reads 32 adjacent positions of a channel). No index is divided per element;
//   - apply and backward apply: a thread per element, walking z in its own memory order (coalesced). Where
//     the other tensor (output or grad_out) has z's layout and z has fewer than 2^31 elements (the usual
//     case), the element's offset is its index in both and only its channel is computed, in 32 bits with
//     ATen's multiply-shift division; otherwise (n, c, s) are decoded in 64 bits and the other tensor is
//     addressed in its own layout.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "conv3d_bn_relu.h"

namespace mvfast {
namespace conv3d_bn_relu {
namespace {

constexpr int kThreads = 256;

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

// The channel of the i-th element in memory order of a dense tensor of layout L with fewer than 2^31
// elements, by multiplications (ATen's IntDivider) instead of 64-bit divisions, which the GPU emulates.
struct ChannelOf {
  at::cuda::detail::IntDivider<unsigned int> by_c, by_s;
  bool cl;
  explicit ChannelOf(const Layout& L)
      : by_c(static_cast<unsigned int>(L.C)), by_s(static_cast<unsigned int>(L.S)), cl(L.cl) {}
  __device__ __forceinline__ unsigned int operator()(unsigned int i) const {
    return cl ? by_c.mod(i) : by_c.mod(by_s.div(i));
  }
};

// Whether the apply kernels may take the 32-bit path: z and the other tensor in one layout (the same
// offset for every element; with C = 1 or S = 1 both layouts are one), under 2^31 elements.
bool same_layout_32bit(const Layout& a, const Layout& b, int64_t numel) {
  return numel <= std::numeric_limits<int32_t>::max() && (a.cl == b.cl || a.C == 1 || a.S == 1);
}

// The reductions' tiling: a block of (kTileC, kTileRows) threads walks kSpan positions of one sample in
// steps of kTileS positions; thread (x, y) owns channel c0 + x and positions y, y + kTileRows, ... of
// each step.
constexpr int kTileC = 32;
constexpr int kTileRows = 8;
constexpr int kTileS = 32;
constexpr int kPerThread = kTileS / kTileRows;
constexpr int64_t kSpan = 1024;  // a multiple of kTileS

// Thread (x, y)'s values of the (kTileS positions x kTileC channels) tile of t at sample n, positions s0..,
// channels c0..: v[j] = t[n, c0 + x, s0 + y + j * kTileRows], 0 outside the tensor. Every thread of the
// block must call it (it synchronises for an NCDHW tensor).
template <bool kChannelsLast, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tile(const scalar_t* __restrict__ t, int64_t n, int64_t C, int64_t S,
                                          int64_t c0, int64_t s0, acc_t (*tile)[kTileS + 1], acc_t* v) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  if constexpr (kChannelsLast) {
    const int64_t c = c0 + tx;  // adjacent lanes, adjacent channels
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t s = s0 + ty + j * kTileRows;
      v[j] = c < C && s < S ? static_cast<acc_t>(t[(n * S + s) * C + c]) : acc_t(0);
    }
  } else {
    const int64_t s = s0 + tx;  // adjacent lanes, adjacent positions; tile[channel][position]
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t c = c0 + ty + j * kTileRows;
      tile[ty + j * kTileRows][tx] = c < C && s < S ? static_cast<acc_t>(t[(n * C + c) * S + s]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) v[j] = tile[tx][ty + j * kTileRows];
    __syncthreads();  // the next call overwrites the tile
  }
}

// The Welford triples (count, mean, m2) of a block's kRows rows of threads, one channel per lane x, combined
// per lane by a tree over the rows in the shared arrays; row 0 then holds each lane's total. Every thread of
// the block must call it.
template <int kRows, typename acc_t>
__device__ __forceinline__ void combine_rows(acc_t (&sn)[kRows][kTileC], acc_t (&smean)[kRows][kTileC],
                                             acc_t (&sm2)[kRows][kTileC], acc_t n, acc_t mean, acc_t m2) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  sn[ty][tx] = n;
  smean[ty][tx] = mean;
  sm2[ty][tx] = m2;
  __syncthreads();
#pragma unroll
  for (int half = kRows / 2; half > 0; half /= 2) {
    if (ty < half) {
      acc_t a = sn[ty][tx], b = smean[ty][tx], d = sm2[ty][tx];
      welford_combine(a, b, d, sn[ty + half][tx], smean[ty + half][tx], sm2[ty + half][tx]);
      sn[ty][tx] = a;
      smean[ty][tx] = b;
      sm2[ty][tx] = d;
    }
    __syncthreads();
  }
}

// Block (n * spans + span, channel tile): Welford over the span's positions, then a tree combine over the
// block's rows of threads. Partials (blocks, C).
template <bool kChannelsLast, typename scalar_t, typename acc_t>
__global__ void stats_kernel(const scalar_t* __restrict__ z, int64_t C, int64_t S, int64_t spans,
                             acc_t* __restrict__ pn, acc_t* __restrict__ pmean, acc_t* __restrict__ pm2) {
  __shared__ acc_t tile[kTileC][kTileS + 1];
  __shared__ acc_t sn[kTileRows][kTileC], smean[kTileRows][kTileC], sm2[kTileRows][kTileC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t n = blockIdx.x / spans, s_begin = (blockIdx.x % spans) * kSpan;
  const int64_t s_end = std::min(S, s_begin + kSpan);
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTileC;
  acc_t cnt = 0, mean = 0, m2 = 0;
  for (int64_t s0 = s_begin; s0 < s_end; s0 += kTileS) {
    acc_t v[kPerThread];
    load_tile<kChannelsLast>(z, n, C, S, c0, s0, tile, v);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (s0 + ty + j * kTileRows < s_end) welford_combine(cnt, mean, m2, acc_t(1), v[j], acc_t(0));
    }
  }
  combine_rows(sn, smean, sm2, cnt, mean, m2);
  const int64_t c = c0 + tx;
  if (ty == 0 && c < C) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * C + c;
    pn[i] = sn[0][tx];
    pmean[i] = smean[0][tx];
    pm2[i] = sm2[0][tx];
  }
}

// Block per tile of 32 channels, kCombineRows threads per channel: each thread combines every
// kCombineRows-th of the blocks' partials (blocks, C), read coalesced across channels, then the block's rows
// are combined by combine_rows, as in stats_kernel. (A thread per channel walking all partials was one
// dependent chain of N * ceil(S / kSpan) combines: 6272 at a 32 x 64 x 16 x 112 x 112 z.)
constexpr int kCombineRows = 32;

template <typename acc_t>
__global__ void __launch_bounds__(kTileC * kCombineRows)
    stats_combine_kernel(const acc_t* __restrict__ pn, const acc_t* __restrict__ pmean, const acc_t* __restrict__ pm2,
                         int64_t parts, int64_t C, acc_t* __restrict__ mean, acc_t* __restrict__ m2) {
  __shared__ acc_t sn[kCombineRows][kTileC], smean[kCombineRows][kTileC], sm2[kCombineRows][kTileC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileC + tx;
  acc_t n = 0, m = 0, s = 0;
  if (c < C) {
    for (int64_t k = ty; k < parts; k += kCombineRows) {
      welford_combine(n, m, s, pn[k * C + c], pmean[k * C + c], pm2[k * C + c]);
    }
  }
  combine_rows(sn, smean, sm2, n, m, s);
  if (ty == 0 && c < C) {
    mean[c] = smean[0][tx];
    m2[c] = sm2[0][tx];
  }
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

// z and out in one layout, numel < 2^31: out[i] from z[i].
template <typename scalar_t, typename acc_t>
__global__ void apply_same_kernel(const scalar_t* __restrict__ z, scalar_t* __restrict__ out, ChannelOf channel,
                                  const acc_t* __restrict__ scale, const acc_t* __restrict__ shift, bool relu,
                                  unsigned int numel) {
  const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= numel) return;
  const unsigned int c = channel(i);
  out[i] = static_cast<scalar_t>(bn_relu(static_cast<acc_t>(z[i]), scale[c], shift[c], relu));
}

// Block (n * spans + span, channel tile), tiled as stats_kernel: sums of g and g * xhat over the span's
// positions. z and gy may be in different layouts. Partials (blocks, C).
template <bool kZChannelsLast, bool kGChannelsLast, typename scalar_t, typename acc_t>
__global__ void bwd_reduce_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ z, int64_t C,
                                  int64_t S, int64_t spans, const acc_t* __restrict__ scale,
                                  const acc_t* __restrict__ shift, const acc_t* __restrict__ mean,
                                  const acc_t* __restrict__ invstd, bool relu, acc_t* __restrict__ psg,
                                  acc_t* __restrict__ psgx) {
  __shared__ acc_t tile[kTileC][kTileS + 1];
  __shared__ acc_t sa[kTileRows][kTileC], sb[kTileRows][kTileC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t n = blockIdx.x / spans, s_begin = (blockIdx.x % spans) * kSpan;
  const int64_t s_end = std::min(S, s_begin + kSpan);
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTileC, c = c0 + tx;
  const bool live = c < C;
  const acc_t sc = live ? scale[c] : acc_t(0), sh = live ? shift[c] : acc_t(0);
  const acc_t mu = live ? mean[c] : acc_t(0), iv = live ? invstd[c] : acc_t(0);
  acc_t a = 0, b = 0;
  for (int64_t s0 = s_begin; s0 < s_end; s0 += kTileS) {
    acc_t zv[kPerThread], gv[kPerThread];
    load_tile<kZChannelsLast>(z, n, C, S, c0, s0, tile, zv);
    load_tile<kGChannelsLast>(gy, n, C, S, c0, s0, tile, gv);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (live && s0 + ty + j * kTileRows < s_end) {
        const acc_t g = relu_grad(gv[j], zv[j], sc, sh, relu);
        a += g;
        b += g * ((zv[j] - mu) * iv);
      }
    }
  }
  sa[ty][tx] = a;
  sb[ty][tx] = b;
  __syncthreads();
#pragma unroll
  for (int half = kTileRows / 2; half > 0; half /= 2) {
    if (ty < half) {
      sa[ty][tx] += sa[ty + half][tx];
      sb[ty][tx] += sb[ty + half][tx];
    }
    __syncthreads();
  }
  if (ty == 0 && live) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * C + c;
    psg[i] = sa[0][tx];
    psgx[i] = sb[0][tx];
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

// gy and z in one layout, numel < 2^31: gz[i] from gy[i] and z[i].
template <typename scalar_t, typename acc_t>
__global__ void bwd_apply_same_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ z,
                                      ChannelOf channel, scalar_t* __restrict__ gz, const acc_t* __restrict__ scale,
                                      const acc_t* __restrict__ shift, const acc_t* __restrict__ mean,
                                      const acc_t* __restrict__ invstd, const acc_t* __restrict__ mean_g,
                                      const acc_t* __restrict__ mean_gx, bool relu, unsigned int numel) {
  const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= numel) return;
  const unsigned int c = channel(i);
  const acc_t zv = static_cast<acc_t>(z[i]);
  const acc_t g = relu_grad(static_cast<acc_t>(gy[i]), zv, scale[c], shift[c], relu);
  gz[i] = static_cast<scalar_t>(bn_backward(g, (zv - mean[c]) * invstd[c], scale[c], mean_g[c], mean_gx[c]));
}

struct CudaKernels {
  // The grid of the tiled reductions over a 5-D tensor of layout L: (N * spans, channel tiles).
  static dim3 reduce_grid(int64_t N, const Layout& L, int64_t& spans) {
    spans = ceil_div(L.S, kSpan);
    return dim3(static_cast<unsigned>(N * spans), static_cast<unsigned>(ceil_div(L.C, kTileC)));
  }

  static void stats(const at::Tensor& z, at::Tensor& mean, at::Tensor& m2) {
    const Layout L = layout_of(z);
    const int64_t N = z.size(0);
    if (L.C == 0) return;
    if (N * L.S == 0) {
      mean.zero_();
      m2.zero_();
      return;
    }
    int64_t spans;
    const dim3 grid = reduce_grid(N, L, spans);
    const int64_t parts = grid.x;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "conv3d_bn_relu_stats_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto opts = mean.options();
      at::Tensor pn = at::empty({parts, L.C}, opts), pmean = at::empty({parts, L.C}, opts),
                 pm2 = at::empty({parts, L.C}, opts);
      const dim3 block(kTileC, kTileRows);
      auto kernel = L.cl ? stats_kernel<true, scalar_t, acc_t> : stats_kernel<false, scalar_t, acc_t>;
      kernel<<<grid, block, 0, stream>>>(z.data_ptr<scalar_t>(), L.C, L.S, spans, pn.data_ptr<acc_t>(),
                                         pmean.data_ptr<acc_t>(), pm2.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      stats_combine_kernel<acc_t><<<ceil_div(L.C, kTileC), dim3(kTileC, kCombineRows), 0, stream>>>(
          pn.data_ptr<acc_t>(), pmean.data_ptr<acc_t>(), pm2.data_ptr<acc_t>(), parts, L.C, mean.data_ptr<acc_t>(),
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
      const Layout Lz = layout_of(z), Lo = layout_of(out);
      if (same_layout_32bit(Lz, Lo, numel)) {
        apply_same_kernel<scalar_t, acc_t><<<ceil_div(numel, kThreads), kThreads, 0, stream>>>(
            z.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), ChannelOf(Lz), scale.data_ptr<acc_t>(),
            shift.data_ptr<acc_t>(), relu, static_cast<unsigned int>(numel));
      } else {
        apply_kernel<scalar_t, acc_t><<<ceil_div(numel, kThreads), kThreads, 0, stream>>>(
            z.data_ptr<scalar_t>(), Lz, out.data_ptr<scalar_t>(), Lo, scale.data_ptr<acc_t>(), shift.data_ptr<acc_t>(),
            relu, numel);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void bwd_reduce(const at::Tensor& gy, const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                         const at::Tensor& mean, const at::Tensor& invstd, bool relu, at::Tensor& sum_g,
                         at::Tensor& sum_gx) {
    const Layout Lz = layout_of(z);
    const int64_t N = z.size(0);
    if (Lz.C == 0) return;
    if (N * Lz.S == 0) {
      sum_g.zero_();
      sum_gx.zero_();
      return;
    }
    const bool g_cl = layout_of(gy).cl;
    int64_t spans;
    const dim3 grid = reduce_grid(N, Lz, spans);
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "conv3d_bn_relu_bwd_reduce_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      at::Tensor psg = at::empty({static_cast<int64_t>(grid.x), Lz.C}, sum_g.options());
      at::Tensor psgx = at::empty({static_cast<int64_t>(grid.x), Lz.C}, sum_g.options());
      auto kernel = Lz.cl ? (g_cl ? bwd_reduce_kernel<true, true, scalar_t, acc_t>
                                  : bwd_reduce_kernel<true, false, scalar_t, acc_t>)
                          : (g_cl ? bwd_reduce_kernel<false, true, scalar_t, acc_t>
                                  : bwd_reduce_kernel<false, false, scalar_t, acc_t>);
      kernel<<<grid, dim3(kTileC, kTileRows), 0, stream>>>(
          gy.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), Lz.C, Lz.S, spans, scale.data_ptr<acc_t>(),
          shift.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), relu, psg.data_ptr<acc_t>(),
          psgx.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::sum_out(sum_g, psg, {0});
      at::sum_out(sum_gx, psgx, {0});
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
      const Layout Lg = layout_of(gy), Lz = layout_of(z);
      if (same_layout_32bit(Lz, Lg, numel)) {
        bwd_apply_same_kernel<scalar_t, acc_t><<<ceil_div(numel, kThreads), kThreads, 0, stream>>>(
            gy.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), ChannelOf(Lz), gz.data_ptr<scalar_t>(),
            scale.data_ptr<acc_t>(), shift.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(),
            mg.data_ptr<acc_t>(), mgx.data_ptr<acc_t>(), relu, static_cast<unsigned int>(numel));
      } else {
        bwd_apply_kernel<scalar_t, acc_t><<<ceil_div(numel, kThreads), kThreads, 0, stream>>>(
            gy.data_ptr<scalar_t>(), Lg, z.data_ptr<scalar_t>(), Lz, gz.data_ptr<scalar_t>(), scale.data_ptr<acc_t>(),
            shift.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), mg.data_ptr<acc_t>(),
            mgx.data_ptr<acc_t>(), relu, numel);
      }
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
  check_forward_args(x, weight, bias, bn_weight, bn_bias, running_mean, running_var);
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
  check_backward_args(grad_out, x, weight, bn_weight, bn_bias, z, mean, invstd);
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
