// NetVLAD CPU kernels: parallel over rows, batch items or clusters with at::parallel_for, inner loops
// vectorised with at::vec. The flow and the matrix products are in csrc/netvlad.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "netvlad.h"

namespace mvfast {
namespace netvlad {
namespace {

using at::vec::Vectorized;

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  using Vec = Vectorized<T>;
  Vec acc0(T(0)), acc1(T(0));
  int64_t d = 0;
  for (; d + 2 * Vec::size() <= n; d += 2 * Vec::size()) {
    acc0 = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + d + Vec::size()), Vec::loadu(b + d + Vec::size()), acc1);
  }
  T s = at::vec::vec_reduce_all<T>([](Vec& p, Vec& q) { return p + q; }, acc0 + acc1);
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

// y[d] += alpha * x[d]
template <typename T>
void axpy(T alpha, const T* x, T* y, int64_t n) {
  using Vec = Vectorized<T>;
  const Vec va(alpha);
  int64_t d = 0;
  for (; d + Vec::size() <= n; d += Vec::size()) {
    at::vec::fmadd(va, Vec::loadu(x + d), Vec::loadu(y + d)).store(y + d);
  }
  for (; d < n; ++d) y[d] += alpha * x[d];
}

// Sum over the M rows of assign[b] (M, KG) of its first K columns.
template <typename T>
void assign_sums(const T* a, int64_t M, int64_t K, int64_t KG, T* out) {
  for (int64_t k = 0; k < K; ++k) out[k] = T(0);
  for (int64_t i = 0; i < M; ++i) axpy(T(1), a + i * KG, out, K);
}

struct CpuKernels {
  // The one place where the CPU does not call the shared row function masked_softmax_row: exp is most
  // of the forward's non-GEMM time, so it runs vectorised (at::vec's exp_u20). Same semantics: bias
  // added, max subtracted, masked rows all zero.
  static void softmax(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& mask) {
    const int64_t KG = logits.size(2), rows = logits.size(0) * logits.size(1);
    const bool* m = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "netvlad_softmax_cpu", [&] {
      using Vec = Vectorized<scalar_t>;
      scalar_t* l = logits.data_ptr<scalar_t>();
      const scalar_t* b = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          scalar_t* row = l + r * KG;
          if (m && !m[r]) {
            std::fill(row, row + KG, scalar_t(0));
            continue;
          }
          if (b) axpy(scalar_t(1), b, row, KG);
          scalar_t mx = row[0];
          for (int64_t k = 1; k < KG; ++k) mx = std::max(mx, row[k]);
          const Vec vmx(mx);
          Vec vsum(scalar_t(0));
          int64_t k = 0;
          for (; k + Vec::size() <= KG; k += Vec::size()) {
            const Vec e = (Vec::loadu(row + k) - vmx).exp_u20();
            e.store(row + k);
            vsum = vsum + e;
          }
          scalar_t sum = at::vec::vec_reduce_all<scalar_t>([](Vec& p, Vec& q) { return p + q; }, vsum);
          for (; k < KG; ++k) {
            row[k] = exp_(row[k] - mx);
            sum += row[k];
          }
          const Vec vinv(scalar_t(1) / sum);
          for (k = 0; k + Vec::size() <= KG; k += Vec::size()) (Vec::loadu(row + k) * vinv).store(row + k);
          for (; k < KG; ++k) row[k] *= scalar_t(1) / sum;
        }
      });
    });
  }

  static void epilogue(at::Tensor& vlad, const at::Tensor& assign, const at::Tensor& centroids, bool normalize,
                       at::Tensor& out) {
    const int64_t B = vlad.size(0), K = vlad.size(1), D = vlad.size(2);
    const int64_t M = assign.size(1), KG = assign.size(2);
    AT_DISPATCH_FLOATING_TYPES(vlad.scalar_type(), "netvlad_epilogue_cpu", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "netvlad_out_cpu", [&] {
        using out_t = scalar_t;
        acc_t* v = vlad.data_ptr<acc_t>();
        const acc_t* a = assign.data_ptr<acc_t>();
        const acc_t* c = centroids.data_ptr<acc_t>();
        out_t* o = out.data_ptr<out_t>();
        at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
          std::vector<acc_t> asum(K), inv(K);
          for (int64_t b = begin; b < end; ++b) {
            acc_t* vb = v + b * K * D;
            assign_sums(a + b * M * KG, M, K, KG, asum.data());
            acc_t total = 0;
            for (int64_t k = 0; k < K; ++k) {
              axpy(-asum[k], c + k * D, vb + k * D, D);  // V_k = (a^T x)_k - (sum_i a_ik) c_k
              if (normalize) {
                const acc_t sq = dot(vb + k * D, vb + k * D, D);
                inv[k] = inv_clamped_norm(sq);
                total += sq * inv[k] * inv[k];
              }
            }
            const acc_t inv_total = normalize ? inv_clamped_norm(total) : acc_t(1);
            for (int64_t k = 0; k < K; ++k) {
              const acc_t s = normalize ? inv[k] * inv_total : acc_t(1);
              const acc_t* src = vb + k * D;
              out_t* dst = o + (b * K + k) * D;
              for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<out_t>(src[d] * s);
            }
          }
        });
      });
    });
  }

  static void norm_backward(at::Tensor& dv, const at::Tensor& vlad, const at::Tensor& centroids, bool normalize,
                            at::Tensor& cdv) {
    const int64_t B = dv.size(0), K = dv.size(1), D = dv.size(2);
    AT_DISPATCH_FLOATING_TYPES(dv.scalar_type(), "netvlad_norm_backward_cpu", [&] {
      using acc_t = scalar_t;
      acc_t* g = dv.data_ptr<acc_t>();
      const acc_t* v = normalize ? vlad.data_ptr<acc_t>() : nullptr;
      const acc_t* c = centroids.data_ptr<acc_t>();
      acc_t* cd = cdv.data_ptr<acc_t>();
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> inv(K), y(D);
        std::vector<char> clamped(K);
        for (int64_t b = begin; b < end; ++b) {
          acc_t* gb = g + b * K * D;
          if (normalize) {
            const acc_t* vb = v + b * K * D;
            // Recompute both norms from the saved descriptor: y = (V_k / |V_k|) / |u|, u the flattened
            // intra-normalised descriptor.
            acc_t total = 0;
            for (int64_t k = 0; k < K; ++k) {
              const acc_t sq = dot(vb + k * D, vb + k * D, D);
              inv[k] = inv_clamped_norm(sq);
              clamped[k] = norm_is_clamped(sq);
              total += sq * inv[k] * inv[k];
            }
            const acc_t inv_total = inv_clamped_norm(total);
            const bool total_clamped = norm_is_clamped(total);
            // y . dy over all of u
            acc_t ydy = 0;
            for (int64_t k = 0; k < K; ++k) ydy += dot(vb + k * D, gb + k * D, D) * inv[k] * inv_total;
            for (int64_t k = 0; k < K; ++k) {
              const acc_t* vk = vb + k * D;
              acc_t* gk = gb + k * D;
              // du = d(intra-normalised V_k), then its dot with the intra-normalised V_k
              acc_t udu = 0;
              for (int64_t d = 0; d < D; ++d) {
                const acc_t un = vk[d] * inv[k];
                gk[d] = normalize_backward(gk[d], un * inv_total, ydy, inv_total, total_clamped);
                udu += un * gk[d];
              }
              for (int64_t d = 0; d < D; ++d) {
                gk[d] = normalize_backward(gk[d], vk[d] * inv[k], udu, inv[k], bool(clamped[k]));
              }
            }
          }
          for (int64_t k = 0; k < K; ++k) cd[b * K + k] = dot(c + k * D, gb + k * D, D);
        }
      });
    });
  }

  static void assign_backward(const at::Tensor& assign, const at::Tensor& da, const at::Tensor& cdv,
                              at::Tensor& ds) {
    const int64_t B = assign.size(0), M = assign.size(1), KG = assign.size(2), K = da.size(2);
    AT_DISPATCH_FLOATING_TYPES(assign.scalar_type(), "netvlad_assign_backward_cpu", [&] {
      const scalar_t* a = assign.data_ptr<scalar_t>();
      const scalar_t* g = da.data_ptr<scalar_t>();
      const scalar_t* cd = cdv.data_ptr<scalar_t>();
      scalar_t* s = ds.data_ptr<scalar_t>();
      at::parallel_for(0, B * M, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          assign_backward_row(a + r * KG, g + r * K, cd + (r / M) * K, s + r * KG, K, KG);
        }
      });
    });
  }

  static at::Tensor centroid_grad(const at::Tensor& assign, const at::Tensor& dv) {
    const int64_t B = dv.size(0), K = dv.size(1), D = dv.size(2);
    const int64_t M = assign.size(1), KG = assign.size(2);
    at::Tensor grad = at::zeros({K, D}, dv.options());
    AT_DISPATCH_FLOATING_TYPES(dv.scalar_type(), "netvlad_centroid_grad_cpu", [&] {
      const scalar_t* a = assign.data_ptr<scalar_t>();
      const scalar_t* g = dv.data_ptr<scalar_t>();
      scalar_t* out = grad.data_ptr<scalar_t>();
      std::vector<scalar_t> asum(B * K);
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) assign_sums(a + b * M * KG, M, K, KG, asum.data() + b * K);
      });
      // dC_k = -sum_b (sum_i a_bik) dV_bk, parallel over clusters so that no two threads write one row
      at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          for (int64_t b = 0; b < B; ++b) axpy(-asum[b * K + k], g + (b * K + k) * D, out + k * D, D);
        }
      });
    });
    return grad;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> netvlad_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& bias,
                                                               const at::Tensor& centroids,
                                                               const std::optional<at::Tensor>& mask,
                                                               int64_t ghost_clusters, bool normalize) {
  return forward<CpuKernels>(x, weight, bias, centroids, mask, ghost_clusters, normalize);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> netvlad_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& centroids,
    const at::Tensor& assign, const at::Tensor& vlad, int64_t ghost_clusters, bool normalize) {
  return backward<CpuKernels>(grad_out, x, weight, centroids, assign, vlad, ghost_clusters, normalize);
}

}  // namespace
}  // namespace netvlad
}  // namespace mvfast

TORCH_LIBRARY_IMPL(mvfast, CPU, m) {
  m.impl("netvlad_fwd", &mvfast::netvlad::netvlad_fwd_cpu);
  m.impl("netvlad_bwd", &mvfast::netvlad::netvlad_bwd_cpu);
}
