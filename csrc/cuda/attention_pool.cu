// Attention pooling CUDA kernels. The flow is in csrc/attention_pool.h and the math per element (the
// online-softmax steps, the merge of splits, the weights and the score gradient) is its MVFAST_HD
// functions, the very ones the CPU kernels run. These kernels add the thread mapping and the reductions.
//
// A block per (sample, split of its rows) walks its rows in tiles of kTile:
//   1. a warp per row computes the row's H scores (and in backward x . dv) with warp reductions, into
//      shared memory;
//   2. forward: a thread per head updates the running (max, sum) and turns the tile's scores into
//      probabilities; backward: the weights and score gradients of the tile;
//   3. a thread per d folds the tile's rows into the running weighted sum (forward) or writes the
//      tile's rows of grad_x and folds ds x into the weight gradient (backward). The tile's rows are
//      re-read from L1/L2 here, so x comes from memory once.
// Each thread owns its d of the split's partial sums, so no atomics; the splits are merged afterwards.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "attention_pool.h"
#include "reduce.cuh"

namespace mvfast {
namespace attention_pool {
namespace {

using cuda::block_sum;
using cuda::kWarp;
using cuda::warp_max;
using cuda::warp_sum;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int kMaxTile = 32;  // rows per tile, fewer when H is large (shared memory is kTile x H)
// Heads the shared-memory tile takes (mvfast/ops/attention_pool.py sends larger H elsewhere).
constexpr int64_t kMaxHeads = 512;
// Values per (rows x H) array of the tile; tile_rows keeps rows * H at most this.
constexpr int64_t kTileValues = 2048;
// The dynamic shared memory of the launches below at its largest (float64, H = kMaxHeads for the forward's
// per-head arrays) within the 48 KB a launch gets without cudaFuncSetAttribute.
static_assert((kTileValues + 3 * kMaxHeads) * sizeof(double) + kMaxTile * sizeof(bool) <= 48 * 1024,
              "forward_kernel's shared memory exceeds 48 KB");
static_assert(2 * kTileValues * sizeof(double) + kMaxTile * sizeof(bool) <= 48 * 1024,
              "backward_kernel's shared memory exceeds 48 KB");
static_assert(kThreads % kWarp == 0 && kThreads <= 1024, "a warp per row needs whole warps");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows per tile for H heads: the tile's (rows x H) scores and weights hold at most kTileValues per array,
// so that shared memory stays under the 48 KB a launch gets without opting in, float64 included. H >= 1
// (check_shapes).
int tile_rows(int64_t H) {
  TORCH_CHECK(H <= kMaxHeads, "attention_pool: the cuda kernels take at most ", kMaxHeads, " heads, got ", H);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxTile, kTileValues / H)));
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ w,
                               const bool* __restrict__ mask, acc_t* __restrict__ scores,
                               acc_t* __restrict__ part_m, acc_t* __restrict__ part_s,
                               acc_t* __restrict__ part_acc, int64_t L, int64_t D, int64_t H, int64_t S,
                               int64_t chunk, int64_t sxb, int64_t sxl, int tile) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* sp = reinterpret_cast<acc_t*>(smem_raw);  // (tile, H) scores, then probabilities
  acc_t* sm = sp + tile * H;                         // (H) running max
  acc_t* ss = sm + H;                                // (H) running sum
  acc_t* sr = ss + H;                                // (H) rescale of the tile
  bool* sv = reinterpret_cast<bool*>(sr + H);        // (tile) row is valid

  const int64_t item = blockIdx.x;
  const int64_t b = item / S;
  const int64_t l0 = (item % S) * chunk;
  const int64_t l1 = std::min(L, l0 + chunk);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const scalar_t* xb = x + b * sxb;
  acc_t* acc = part_acc + item * H * D;

  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    sm[h] = neg_inf<acc_t>();
    ss[h] = acc_t(0);
  }
  for (int64_t i = threadIdx.x; i < H * D; i += blockDim.x) acc[i] = acc_t(0);
  __syncthreads();

  for (int64_t t0 = l0; t0 < l1; t0 += tile) {
    const int rows = static_cast<int>(std::min<int64_t>(tile, l1 - t0));
    // 1. scores, a warp per row
    for (int r = warp; r < rows; r += kWarps) {
      const int64_t l = t0 + r;
      const bool valid = mask == nullptr || mask[b * L + l];
      if (lane == 0) sv[r] = valid;
      const scalar_t* xr = xb + l * sxl;
      for (int64_t h = 0; h < H; ++h) {
        acc_t dot = 0;
        if (valid) {
          for (int64_t d = lane; d < D; d += kWarp) dot += static_cast<acc_t>(xr[d]) * w[h * D + d];
        }
        dot = warp_sum(dot);
        if (lane == 0) sp[r * H + h] = valid ? dot : neg_inf<acc_t>();
      }
    }
    __syncthreads();
    // 2. online softmax, a thread per head
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
      acc_t mx = neg_inf<acc_t>();
      for (int r = 0; r < rows; ++r) mx = sp[r * H + h] > mx ? sp[r * H + h] : mx;
      acc_t m = sm[h];
      const acc_t rescale = online_rescale(m, mx);
      acc_t psum = 0;
      for (int r = 0; r < rows; ++r) {
        const acc_t score = sp[r * H + h];
        if (scores != nullptr) scores[(b * L + t0 + r) * H + h] = score;
        const acc_t p = online_prob(score, m);
        sp[r * H + h] = p;
        psum += p;
      }
      sm[h] = m;
      ss[h] = ss[h] * rescale + psum;
      sr[h] = rescale;
    }
    __syncthreads();
    // 3. running weighted sum, a thread per d
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      for (int64_t h = 0; h < H; ++h) {
        acc_t a = acc[h * D + d] * sr[h];
        for (int r = 0; r < rows; ++r) {
          if (sv[r]) a += sp[r * H + h] * static_cast<acc_t>(xb[(t0 + r) * sxl + d]);
        }
        acc[h * D + d] = a;
      }
    }
    __syncthreads();
  }
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    part_m[item * H + h] = sm[h];
    part_s[item * H + h] = ss[h];
  }
}

// Block per (b, h): merges the S splits into out[b,h,:] and lse[b,h].
template <typename acc_t, typename out_t>
__global__ void combine_kernel(const acc_t* __restrict__ part_m, const acc_t* __restrict__ part_s,
                               const acc_t* __restrict__ part_acc, out_t* __restrict__ out,
                               acc_t* __restrict__ lse, int64_t S, int64_t H, int64_t D) {
  const int64_t b = blockIdx.x / H, h = blockIdx.x % H;
  // Every thread merges the S (max, sum) pairs itself (S is small) so that no broadcast is needed.
  acc_t m = neg_inf<acc_t>(), s = 0;
  for (int64_t j = 0; j < S; ++j) online_merge(m, s, part_m[(b * S + j) * H + h], part_s[(b * S + j) * H + h]);
  if (threadIdx.x == 0) lse[b * H + h] = finish_lse(m, s);
  const acc_t inv = finish_scale(s);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t a = 0;
    for (int64_t j = 0; j < S; ++j) {
      const int64_t i = (b * S + j) * H + h;
      const acc_t f = split_factor(part_m[i], part_s[i], m);
      if (f != acc_t(0)) a += f * part_acc[i * D + d];
    }
    out[(b * H + h) * D + d] = static_cast<out_t>(a * inv);
  }
}

template <typename acc_t, typename out_t>
__global__ void weights_kernel(const acc_t* __restrict__ scores, const acc_t* __restrict__ lse,
                               const bool* __restrict__ mask, out_t* __restrict__ out, int64_t L, int64_t H,
                               int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t row = i / H, h = i % H, b = row / L;
  const bool valid = mask == nullptr || mask[row];
  out[i] = static_cast<out_t>(weight_of(scores[i], lse[b * H + h], valid));
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ w,
                                const bool* __restrict__ mask, const acc_t* __restrict__ lse,
                                const acc_t* __restrict__ dv, const acc_t* __restrict__ c,
                                const acc_t* __restrict__ ga, scalar_t* __restrict__ grad_x,
                                acc_t* __restrict__ part_dw, int64_t L, int64_t D, int64_t H, int64_t S,
                                int64_t chunk, int64_t sxb, int64_t sxl, int tile) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* sa = reinterpret_cast<acc_t*>(smem_raw);  // (tile, H) weights
  acc_t* sd = sa + tile * H;                         // (tile, H) score gradients
  bool* sv = reinterpret_cast<bool*>(sd + tile * H);  // (tile) row is valid

  const int64_t item = blockIdx.x;
  const int64_t b = item / S;
  const int64_t l0 = (item % S) * chunk;
  const int64_t l1 = std::min(L, l0 + chunk);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const scalar_t* xb = x + b * sxb;
  const acc_t* dvb = dv + b * H * D;
  acc_t* dw = part_dw + item * H * D;

  for (int64_t i = threadIdx.x; i < H * D; i += blockDim.x) dw[i] = acc_t(0);

  for (int64_t t0 = l0; t0 < l1; t0 += tile) {
    const int rows = static_cast<int>(std::min<int64_t>(tile, l1 - t0));
    // 1. scores and x . dv, a warp per row; then a and ds
    for (int r = warp; r < rows; r += kWarps) {
      const int64_t l = t0 + r;
      const bool valid = mask == nullptr || mask[b * L + l];
      if (lane == 0) sv[r] = valid;
      const scalar_t* xr = xb + l * sxl;
      for (int64_t h = 0; h < H; ++h) {
        acc_t score = 0, da = 0;
        if (valid) {
          for (int64_t d = lane; d < D; d += kWarp) {
            const acc_t xv = static_cast<acc_t>(xr[d]);
            score += xv * w[h * D + d];
            da += xv * dvb[h * D + d];
          }
        }
        score = warp_sum(score);
        da = warp_sum(da);
        if (lane == 0) {
          const acc_t a = weight_of(score, lse[b * H + h], valid);
          const acc_t g = da + (ga != nullptr ? ga[(b * L + l) * H + h] : acc_t(0));
          sa[r * H + h] = a;
          sd[r * H + h] = valid ? score_grad(a, g, c[b * H + h]) : acc_t(0);
        }
      }
    }
    __syncthreads();
    // 2. grad_x rows and the weight gradient, a thread per d
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      for (int r = 0; r < rows; ++r) {
        acc_t g = 0;
        if (sv[r]) {
          for (int64_t h = 0; h < H; ++h) g += sa[r * H + h] * dvb[h * D + d] + sd[r * H + h] * w[h * D + d];
        }
        grad_x[(b * L + t0 + r) * D + d] = static_cast<scalar_t>(g);
      }
      for (int64_t h = 0; h < H; ++h) {
        acc_t g = dw[h * D + d];
        for (int r = 0; r < rows; ++r) {
          if (sv[r]) g += sd[r * H + h] * static_cast<acc_t>(xb[(t0 + r) * sxl + d]);
        }
        dw[h * D + d] = g;
      }
    }
    __syncthreads();
  }
}

struct CudaKernels {
  // Enough (sample, split) blocks for two waves over the SMs when B is small, each at least a tile.
  static int64_t splits(int64_t B, int64_t L) {
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t per_b = B > 0 ? ceil_div(2 * sms, B) : 1;
    return std::max<int64_t>(1, std::min<int64_t>(per_b, ceil_div(L, 4 * kMaxTile)));
  }

  static void partials(const at::Tensor& x, const at::Tensor& w, const at::Tensor& mask, int64_t S,
                       at::Tensor& part_m, at::Tensor& part_s, at::Tensor& part_acc, const at::Tensor& scores) {
    const int64_t B = x.size(0), L = x.size(1), D = x.size(2), H = w.size(0);
    if (B == 0) return;
    const int64_t chunk = ceil_div(L, S);
    const int tile = tile_rows(H);
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_pool_fwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const size_t smem = (tile * H + 3 * H) * sizeof(acc_t) + tile * sizeof(bool);
      forward_kernel<scalar_t, acc_t><<<B * S, kThreads, smem, stream>>>(
          x.data_ptr<scalar_t>(), w.data_ptr<acc_t>(), mask.defined() ? mask.data_ptr<bool>() : nullptr,
          scores.defined() ? scores.data_ptr<acc_t>() : nullptr, part_m.data_ptr<acc_t>(),
          part_s.data_ptr<acc_t>(), part_acc.data_ptr<acc_t>(), L, D, H, S, chunk, x.stride(0), x.stride(1), tile);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void combine(const at::Tensor& part_m, const at::Tensor& part_s, const at::Tensor& part_acc,
                      at::Tensor& out, at::Tensor& lse) {
    const int64_t B = part_m.size(0), S = part_m.size(1), H = part_m.size(2), D = part_acc.size(3);
    if (B * H == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(part_m.scalar_type(), "attention_pool_combine_cuda", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "attention_pool_out_cuda", [&] {
        combine_kernel<acc_t, scalar_t><<<B * H, kThreads, 0, stream>>>(
            part_m.data_ptr<acc_t>(), part_s.data_ptr<acc_t>(), part_acc.data_ptr<acc_t>(),
            out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), S, H, D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void weights(const at::Tensor& scores, const at::Tensor& lse, const at::Tensor& mask, at::Tensor& out) {
    const int64_t n = scores.numel(), L = scores.size(1), H = scores.size(2);
    if (n == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "attention_pool_weights_cuda", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "attention_pool_w_cuda", [&] {
        weights_kernel<acc_t, scalar_t><<<ceil_div(n, kThreads), kThreads, 0, stream>>>(
            scores.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), mask.defined() ? mask.data_ptr<bool>() : nullptr,
            out.data_ptr<scalar_t>(), L, H, n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void backward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& mask, const at::Tensor& lse,
                       const at::Tensor& dv, const at::Tensor& c, const at::Tensor& ga, int64_t S,
                       at::Tensor& grad_x, at::Tensor& part_dw) {
    const int64_t B = x.size(0), L = x.size(1), D = x.size(2), H = w.size(0);
    if (B == 0) return;
    const int64_t chunk = ceil_div(L, S);
    const int tile = tile_rows(H);
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_pool_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const size_t smem = 2 * tile * H * sizeof(acc_t) + tile * sizeof(bool);
      backward_kernel<scalar_t, acc_t><<<B * S, kThreads, smem, stream>>>(
          x.data_ptr<scalar_t>(), w.data_ptr<acc_t>(), mask.defined() ? mask.data_ptr<bool>() : nullptr,
          lse.data_ptr<acc_t>(), dv.data_ptr<acc_t>(), c.data_ptr<acc_t>(),
          ga.defined() ? ga.data_ptr<acc_t>() : nullptr, grad_x.data_ptr<scalar_t>(), part_dw.data_ptr<acc_t>(), L,
          D, H, S, chunk, x.stride(0), x.stride(1), tile);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_pool_fwd_cuda(const at::Tensor& x,
                                                                       const at::Tensor& weight,
                                                                       const std::optional<at::Tensor>& mask,
                                                                       bool return_weights) {
  check_forward_args(x, weight, mask);
  const c10::cuda::CUDAGuard guard(x.device());
  return forward<CudaKernels>(x, weight, mask, return_weights);
}

std::tuple<at::Tensor, at::Tensor> attention_pool_bwd_cuda(const at::Tensor& grad_out,
                                                           const std::optional<at::Tensor>& grad_weights,
                                                           const at::Tensor& x, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& mask,
                                                           const at::Tensor& out, const at::Tensor& lse,
                                                           const std::optional<at::Tensor>& weights) {
  check_backward_args(grad_out, grad_weights, x, weight, mask, out, lse, weights);
  const c10::cuda::CUDAGuard guard(x.device());
  return backward<CudaKernels>(grad_out, grad_weights, x, weight, mask, out, lse, weights);
}

}  // namespace
}  // namespace attention_pool
}  // namespace mvfast

TORCH_LIBRARY_IMPL(mvfast, CUDA, m) {
  m.impl("attention_pool_fwd", &mvfast::attention_pool::attention_pool_fwd_cuda);
  m.impl("attention_pool_bwd", &mvfast::attention_pool::attention_pool_bwd_cuda);
}
