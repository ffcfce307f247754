// NetVLAD CUDA kernels. The flow and the matrix products (cuBLAS through ATen) are in csrc/netvlad.h;
// the math per element is the MVFAST_HD functions of csrc/netvlad.h and csrc/common.h. These kernels add
// the thread mapping and the reductions: a warp per row of logits, a block per (b, k) descriptor row.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "netvlad.h"
#include "reduce.cuh"

namespace mvfast {
namespace netvlad {
namespace {

using cuda::block_sum;
using cuda::kWarp;
using cuda::warp_max;
using cuda::warp_sum;

constexpr int kRowThreads = 256;  // 8 rows of logits per block, a warp each
constexpr int kVecThreads = 256;  // threads per (b, k) descriptor row

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename acc_t>
__global__ void softmax_kernel(acc_t* __restrict__ logits, const acc_t* __restrict__ bias,
                               const bool* __restrict__ mask, int64_t rows, int64_t KG) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // uniform per warp
  acc_t* l = logits + row * KG;
  if (mask != nullptr && !mask[row]) {
    for (int64_t k = lane; k < KG; k += kWarp) l[k] = acc_t(0);
    return;
  }
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t k = lane; k < KG; k += kWarp) {
    const acc_t v = l[k] + (bias != nullptr ? bias[k] : acc_t(0));
    l[k] = v;
    m = v > m ? v : m;
  }
  m = warp_max(m);
  acc_t s = 0;
  for (int64_t k = lane; k < KG; k += kWarp) s += exp_(l[k] - m);
  const acc_t inv = acc_t(1) / warp_sum(s);
  for (int64_t k = lane; k < KG; k += kWarp) l[k] = softmax_prob(l[k], m, inv);
}

// Block per (b, k): V[b,k,:] -= asum[b,k] c[k,:]; sumsq[b,k] = |V[b,k,:]|^2. asum (B, K) is sum_i a[b,i,k].
template <typename acc_t>
__global__ void residual_kernel(acc_t* __restrict__ vlad, const acc_t* __restrict__ asum,
                                const acc_t* __restrict__ centroids, acc_t* __restrict__ sumsq, int64_t K,
                                int64_t D) {
  const int64_t bk = blockIdx.x, k = bk % K;
  const acc_t s = asum[bk];
  acc_t* v = vlad + bk * D;
  const acc_t* c = centroids + k * D;
  acc_t sq = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const acc_t r = v[d] - s * c[d];
    v[d] = r;
    sq += r * r;
  }
  sq = block_sum(sq);
  if (threadIdx.x == 0) sumsq[bk] = sq;
}

// Warp per sample b, once per sample: total[b] = |u|^2, u the flattened intra-normalised descriptor, and,
// when vdy is given, ydy[b] = y . dy over all of u (y = u / max(|u|, eps)), for the normalisation backward.
template <typename acc_t>
__global__ void sample_norm_kernel(const acc_t* __restrict__ sumsq, const acc_t* __restrict__ vdy,
                                   acc_t* __restrict__ total, acc_t* __restrict__ ydy, int64_t B, int64_t K) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (b >= B) return;  // uniform per warp
  const acc_t* sq = sumsq + b * K;
  acc_t t = 0, vg = 0;
  for (int64_t k = lane; k < K; k += kWarp) {
    t += intra_normalized_sumsq(sq[k]);
    if (vdy != nullptr) vg += vdy[b * K + k] * inv_clamped_norm(sq[k]);
  }
  t = warp_sum(t);
  if (vdy != nullptr) vg = warp_sum(vg);
  if (lane == 0) {
    total[b] = t;
    if (vdy != nullptr) ydy[b] = vg * inv_clamped_norm(t);
  }
}

// Block per (b, k): out[b,k,:] = V[b,k,:] / max(|V_k|, eps) / max(|u|, eps), or V when not normalising.
template <typename acc_t, typename out_t>
__global__ void normalize_kernel(const acc_t* __restrict__ vlad, const acc_t* __restrict__ sumsq,
                                 const acc_t* __restrict__ total, out_t* __restrict__ out, int64_t K, int64_t D,
                                 bool normalize) {
  const int64_t bk = blockIdx.x, b = bk / K;
  const acc_t scale = normalize ? inv_clamped_norm(sumsq[bk]) * inv_clamped_norm(total[b]) : acc_t(1);
  const acc_t* v = vlad + bk * D;
  out_t* o = out + bk * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) o[d] = static_cast<out_t>(v[d] * scale);
}

// Block per (b, k): sumsq[b,k] = |V_k|^2 and vdy[b,k] = V_k . dy_k, for the normalisation backward.
template <typename acc_t>
__global__ void norm_stats_kernel(const acc_t* __restrict__ vlad, const acc_t* __restrict__ grad,
                                  acc_t* __restrict__ sumsq, acc_t* __restrict__ vdy, int64_t D) {
  const acc_t* v = vlad + blockIdx.x * D;
  const acc_t* g = grad + blockIdx.x * D;
  acc_t sq = 0, vg = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    sq += v[d] * v[d];
    vg += v[d] * g[d];
  }
  sq = block_sum(sq);
  vg = block_sum(vg);
  if (threadIdx.x == 0) {
    sumsq[blockIdx.x] = sq;
    vdy[blockIdx.x] = vg;
  }
}

// Block per (b, k): dV from dy through both normalisations, then cdv[b,k] = c_k . dV_k. total and ydy are
// the per-sample values of sample_norm_kernel.
template <typename acc_t>
__global__ void norm_backward_kernel(const acc_t* __restrict__ grad, const acc_t* __restrict__ vlad,
                                     const acc_t* __restrict__ centroids, const acc_t* __restrict__ sumsq,
                                     const acc_t* __restrict__ total, const acc_t* __restrict__ ydy,
                                     acc_t* __restrict__ dv, acc_t* __restrict__ cdv, int64_t K, int64_t D,
                                     bool normalize) {
  const int64_t bk = blockIdx.x, b = bk / K, k = bk % K;
  const acc_t* gin = grad + bk * D;
  acc_t* g = dv + bk * D;
  const acc_t* c = centroids + k * D;
  if (!normalize) {
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) g[d] = gin[d];
  } else {
    const acc_t* v = vlad + bk * D;
    const acc_t inv_total = inv_clamped_norm(total[b]);
    const bool total_clamped = norm_is_clamped(total[b]);
    const acc_t y_dy = ydy[b];
    const acc_t inv = inv_clamped_norm(sumsq[bk]);
    const bool clamped = norm_is_clamped(sumsq[bk]);
    acc_t udu = 0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const acc_t un = v[d] * inv;
      const acc_t du = normalize_backward(gin[d], un * inv_total, y_dy, inv_total, total_clamped);
      g[d] = du;
      udu += un * du;
    }
    udu = block_sum(udu);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      g[d] = normalize_backward(g[d], v[d] * inv, udu, inv, clamped);
    }
  }
  acc_t cd = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) cd += c[d] * g[d];
  cd = block_sum(cd);
  if (threadIdx.x == 0) cdv[bk] = cd;
}

// Warp per row of the soft assignment: ds row = the softmax backward of assign_grad.
template <typename acc_t>
__global__ void assign_backward_kernel(const acc_t* __restrict__ assign, const acc_t* __restrict__ da,
                                       const acc_t* __restrict__ cdv, acc_t* __restrict__ ds, int64_t rows,
                                       int64_t M, int64_t K, int64_t KG) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;
  const acc_t* a = assign + row * KG;
  const acc_t* g = da + row * K;
  const acc_t* cd = cdv + (row / M) * K;
  acc_t dot = 0;
  for (int64_t k = lane; k < K; k += kWarp) dot += a[k] * assign_grad(g, cd, k, K);
  dot = warp_sum(dot);
  acc_t* out = ds + row * KG;
  for (int64_t k = lane; k < KG; k += kWarp) out[k] = softmax_backward(a[k], assign_grad(g, cd, k, K), dot);
}

// Thread per (k, d): grad_c[k,d] = -sum_b asum[b,k] dV[b,k,d].
template <typename acc_t>
__global__ void centroid_grad_kernel(const acc_t* __restrict__ asum, const acc_t* __restrict__ dv,
                                     acc_t* __restrict__ out, int64_t B, int64_t K, int64_t D) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= K * D) return;
  const int64_t k = idx / D;
  acc_t s = 0;
  for (int64_t b = 0; b < B; ++b) s += asum[b * K + k] * dv[b * K * D + idx];
  out[idx] = -s;
}

struct CudaKernels {
  static void softmax(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& mask) {
    const int64_t rows = logits.size(0) * logits.size(1), KG = logits.size(2);
    if (rows == 0) return;
    const int rows_per_block = kRowThreads / kWarp;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "netvlad_softmax_cuda", [&] {
      softmax_kernel<scalar_t><<<ceil_div(rows, rows_per_block), kRowThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
          mask.defined() ? mask.data_ptr<bool>() : nullptr, rows, KG);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void epilogue(at::Tensor& vlad, const at::Tensor& assign, const at::Tensor& centroids, bool normalize,
                       at::Tensor& out) {
    const int64_t B = vlad.size(0), K = vlad.size(1), D = vlad.size(2);
    if (B * K == 0) return;
    // sum_i a[b,i,k] by ATen's reduction, which reads the rows of assign coalesced along k.
    const at::Tensor asum = assign.narrow(2, 0, K).sum(1).contiguous();  // (B, K)
    at::Tensor sumsq = at::empty({B, K}, vlad.options());
    at::Tensor total = at::empty({B}, vlad.options());
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(vlad.scalar_type(), "netvlad_epilogue_cuda", [&] {
      using acc_t = scalar_t;
      residual_kernel<acc_t><<<B * K, kVecThreads, 0, stream>>>(vlad.data_ptr<acc_t>(), asum.data_ptr<acc_t>(),
                                                               centroids.data_ptr<acc_t>(),
                                                               sumsq.data_ptr<acc_t>(), K, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (normalize) {
        sample_norm_kernel<acc_t><<<ceil_div(B, kRowThreads / kWarp), kRowThreads, 0, stream>>>(
            sumsq.data_ptr<acc_t>(), nullptr, total.data_ptr<acc_t>(), nullptr, B, K);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "netvlad_out_cuda", [&] {
        normalize_kernel<acc_t, scalar_t><<<B * K, kVecThreads, 0, stream>>>(
            vlad.data_ptr<acc_t>(), sumsq.data_ptr<acc_t>(), total.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), K, D,
            normalize);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void norm_backward(const at::Tensor& grad, const at::Tensor& vlad, const at::Tensor& centroids,
                            bool normalize, at::Tensor& dv, at::Tensor& cdv) {
    const int64_t B = dv.size(0), K = dv.size(1), D = dv.size(2);
    if (B * K == 0) return;
    at::Tensor sumsq = at::empty({B, K}, dv.options()), vdy = at::empty({B, K}, dv.options());
    at::Tensor total = at::empty({B}, dv.options()), ydy = at::empty({B}, dv.options());
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(dv.scalar_type(), "netvlad_norm_backward_cuda", [&] {
      if (normalize) {
        norm_stats_kernel<scalar_t><<<B * K, kVecThreads, 0, stream>>>(
            vlad.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), sumsq.data_ptr<scalar_t>(),
            vdy.data_ptr<scalar_t>(), D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        sample_norm_kernel<scalar_t><<<ceil_div(B, kRowThreads / kWarp), kRowThreads, 0, stream>>>(
            sumsq.data_ptr<scalar_t>(), vdy.data_ptr<scalar_t>(), total.data_ptr<scalar_t>(),
            ydy.data_ptr<scalar_t>(), B, K);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      norm_backward_kernel<scalar_t><<<B * K, kVecThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), normalize ? vlad.data_ptr<scalar_t>() : nullptr,
          centroids.data_ptr<scalar_t>(), sumsq.data_ptr<scalar_t>(), total.data_ptr<scalar_t>(),
          ydy.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), cdv.data_ptr<scalar_t>(), K, D, normalize);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void assign_backward(const at::Tensor& assign, const at::Tensor& da, const at::Tensor& cdv,
                              at::Tensor& ds) {
    const int64_t B = assign.size(0), M = assign.size(1), KG = assign.size(2), K = da.size(2);
    const int64_t rows = B * M;
    if (rows == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(assign.scalar_type(), "netvlad_assign_backward_cuda", [&] {
      assign_backward_kernel<scalar_t><<<ceil_div(rows, kRowThreads / kWarp), kRowThreads, 0, stream>>>(
          assign.data_ptr<scalar_t>(), da.data_ptr<scalar_t>(), cdv.data_ptr<scalar_t>(),
          ds.data_ptr<scalar_t>(), rows, M, K, KG);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static at::Tensor centroid_grad(const at::Tensor& assign, const at::Tensor& dv) {
    const int64_t B = dv.size(0), K = dv.size(1), D = dv.size(2);
    at::Tensor grad = at::empty({K, D}, dv.options());
    if (K * D == 0) return grad;
    const at::Tensor asum = assign.narrow(2, 0, K).sum(1).contiguous();  // (B, K)
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(dv.scalar_type(), "netvlad_centroid_grad_cuda", [&] {
      centroid_grad_kernel<scalar_t><<<ceil_div(K * D, 256), 256, 0, stream>>>(
          asum.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), B, K, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return grad;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> netvlad_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                const std::optional<at::Tensor>& bias,
                                                                const at::Tensor& centroids,
                                                                const std::optional<at::Tensor>& mask,
                                                                int64_t ghost_clusters, bool normalize) {
  check_forward_args(x, weight, bias, centroids, mask, ghost_clusters);
  const c10::cuda::CUDAGuard guard(x.device());
  return forward<CudaKernels>(prepare(x, weight, centroids, bias, mask), x, normalize);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> netvlad_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& centroids,
    const at::Tensor& assign, const at::Tensor& vlad, const std::optional<at::Tensor>& mask, int64_t ghost_clusters,
    bool normalize) {
  check_backward_args(grad_out, x, weight, centroids, assign, vlad, mask, ghost_clusters, normalize);
  const c10::cuda::CUDAGuard guard(x.device());
  const Inputs in = prepare(x, weight, centroids, std::nullopt, mask);
  return in_input_dtypes(backward<CudaKernels>(in, grad_out, x, assign, vlad, normalize), x, weight, centroids);
}

}  // namespace
}  // namespace netvlad
}  // namespace mvfast

TORCH_LIBRARY_IMPL(mvfast, CUDA, m) {
  m.impl("netvlad_fwd", &mvfast::netvlad::netvlad_fwd_cuda);
  m.impl("netvlad_bwd", &mvfast::netvlad::netvlad_bwd_cuda);
}
