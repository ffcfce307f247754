// NetVLAD CPU kernels.
//
// Two flows over the same per-item kernels:
// - per item (B >= 2 x threads): each thread takes whole batch items and runs that item's products
//   (single-threaded GEMMs) and hand-written steps back to back, so x[b] is read from cache, not
//   memory, by its second and third product, and dx[b] is written once;
// - batched (small B): the generic flow of csrc/netvlad.h (the one the CUDA kernels use) with ATen's
//   multi-threaded GEMMs and these kernels parallel over rows, items or clusters.
// Inner loops are vectorised with at::vec.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <vector>

#include "cpu/vec.h"
#include "netvlad.h"

namespace mvfast {
namespace netvlad {
namespace {

using at::vec::Vectorized;
using cpu::axpy;
using cpu::dot;
using cpu::grain_for;
using cpu::hsum;

// Sum over the M rows of one item's assign (M, KG) of its first K columns.
template <typename T>
void assign_sums(const T* a, int64_t M, int64_t K, int64_t KG, T* out) {
  std::fill(out, out + K, T(0));
  for (int64_t i = 0; i < M; ++i) axpy(T(1), a + i * KG, out, K);
}

// Masked softmax of one row with bias. The one place where the CPU does not call the shared row function
// masked_softmax_row: exp is most of the forward's non-GEMM time, so it runs vectorised (at::vec's
// exp_u20). Same semantics: bias added, max subtracted, masked rows all zero.
template <typename T>
void softmax_row(T* row, const T* bias, int64_t KG, bool valid) {
  using Vec = Vectorized<T>;
  if (!valid) {
    std::fill(row, row + KG, T(0));
    return;
  }
  if (bias) axpy(T(1), bias, row, KG);
  T mx = row[0];
  for (int64_t k = 1; k < KG; ++k) mx = std::max(mx, row[k]);
  const Vec vmx(mx);
  Vec vsum(T(0));
  int64_t k = 0;
  for (; k + Vec::size() <= KG; k += Vec::size()) {
    const Vec e = (Vec::loadu(row + k) - vmx).exp_u20();
    e.store(row + k);
    vsum = vsum + e;
  }
  T sum = hsum(vsum);
  for (; k < KG; ++k) {
    row[k] = exp_(row[k] - mx);
    sum += row[k];
  }
  const T inv = T(1) / sum;
  const Vec vinv(inv);
  for (k = 0; k + Vec::size() <= KG; k += Vec::size()) (Vec::loadu(row + k) * vinv).store(row + k);
  for (; k < KG; ++k) row[k] *= inv;
}

// One item: V -= (sum_i a_ik) c_k, then out = V normalised (or V), cast to the output type.
template <typename acc_t, typename out_t>
void epilogue_item(acc_t* v, const acc_t* a, const acc_t* c, out_t* o, int64_t M, int64_t K, int64_t KG,
                   int64_t D, bool normalize) {
  std::vector<acc_t> asum(K), inv(K);
  assign_sums(a, M, K, KG, asum.data());
  acc_t total = 0;
  for (int64_t k = 0; k < K; ++k) {
    axpy(-asum[k], c + k * D, v + k * D, D);  // V_k = (a^T x)_k - (sum_i a_ik) c_k
    if (normalize) {
      const acc_t sq = dot(v + k * D, v + k * D, D);
      inv[k] = inv_clamped_norm(sq);
      total += intra_normalized_sumsq(sq);
    }
  }
  const acc_t inv_total = normalize ? inv_clamped_norm(total) : acc_t(1);
  for (int64_t k = 0; k < K; ++k) {
    const acc_t s = normalize ? inv[k] * inv_total : acc_t(1);
    const acc_t* src = v + k * D;
    out_t* dst = o + k * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<out_t>(src[d] * s);
  }
}

// One item: dV (K, D) from the incoming gradient g through both normalisations; cdv_k = c_k . dV_k.
template <typename acc_t>
void norm_backward_item(const acc_t* g, const acc_t* v, const acc_t* c, acc_t* dv, acc_t* cdv, int64_t K,
                        int64_t D, bool normalize) {
  if (normalize) {
    // Both norms recomputed from the saved descriptor: y = (V_k / |V_k|) / |u|, u the flattened
    // intra-normalised descriptor.
    std::vector<acc_t> inv(K);
    std::vector<char> clamped(K);
    acc_t total = 0, ydy = 0;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t sq = dot(v + k * D, v + k * D, D);
      inv[k] = inv_clamped_norm(sq);
      clamped[k] = norm_is_clamped(sq);
      total += intra_normalized_sumsq(sq);
      ydy += dot(v + k * D, g + k * D, D) * inv[k];
    }
    const acc_t inv_total = inv_clamped_norm(total);
    const bool total_clamped = norm_is_clamped(total);
    ydy *= inv_total;  // y . dy over all of u
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* vk = v + k * D;
      const acc_t* gk = g + k * D;
      acc_t* dk = dv + k * D;
      // du = d(intra-normalised V_k), then its dot with the intra-normalised V_k
      acc_t udu = 0;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t un = vk[d] * inv[k];
        dk[d] = normalize_backward(gk[d], un * inv_total, ydy, inv_total, total_clamped);
        udu += un * dk[d];
      }
      for (int64_t d = 0; d < D; ++d) {
        dk[d] = normalize_backward(dk[d], vk[d] * inv[k], udu, inv[k], bool(clamped[k]));
      }
    }
  } else {
    std::copy(g, g + K * D, dv);
  }
  for (int64_t k = 0; k < K; ++k) cdv[k] = dot(c + k * D, dv + k * D, D);
}

// Rows [r0, r1) of the soft assignment: ds row = the gradient of the row's logits.
template <typename acc_t>
void assign_backward_rows(const acc_t* a, const acc_t* da, const acc_t* cdv, acc_t* ds, int64_t r0, int64_t r1,
                          int64_t M, int64_t K, int64_t KG) {
  for (int64_t r = r0; r < r1; ++r) assign_backward_row(a + r * KG, da + r * K, cdv + (r / M) * K, ds + r * KG, K, KG);
}

// ---- the batched flow's kernels ------------------------------------------------------------------------

struct CpuKernels {
  static void softmax(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& mask) {
    const int64_t KG = logits.size(2), rows = logits.size(0) * logits.size(1);
    const bool* m = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "netvlad_softmax_cpu", [&] {
      scalar_t* l = logits.data_ptr<scalar_t>();
      const scalar_t* b = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, rows, grain_for(8 * KG), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) softmax_row(l + r * KG, b, KG, m ? m[r] : true);
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
        acc_t* v = vlad.data_ptr<acc_t>();
        const acc_t* a = assign.data_ptr<acc_t>();
        const acc_t* c = centroids.data_ptr<acc_t>();
        scalar_t* o = out.data_ptr<scalar_t>();
        at::parallel_for(0, B, grain_for(M * K + 4 * K * D), [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) {
            epilogue_item(v + b * K * D, a + b * M * KG, c, o + b * K * D, M, K, KG, D, normalize);
          }
        });
      });
    });
  }

  static void norm_backward(const at::Tensor& grad, const at::Tensor& vlad, const at::Tensor& centroids,
                            bool normalize, at::Tensor& dv, at::Tensor& cdv) {
    const int64_t B = dv.size(0), K = dv.size(1), D = dv.size(2);
    AT_DISPATCH_FLOATING_TYPES(dv.scalar_type(), "netvlad_norm_backward_cpu", [&] {
      const scalar_t* g = grad.data_ptr<scalar_t>();
      const scalar_t* v = normalize ? vlad.data_ptr<scalar_t>() : nullptr;
      const scalar_t* c = centroids.data_ptr<scalar_t>();
      scalar_t* out = dv.data_ptr<scalar_t>();
      scalar_t* cd = cdv.data_ptr<scalar_t>();
      at::parallel_for(0, B, grain_for(6 * K * D), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          norm_backward_item(g + b * K * D, v ? v + b * K * D : nullptr, c, out + b * K * D, cd + b * K, K, D,
                             normalize);
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
      scalar_t* out = ds.data_ptr<scalar_t>();
      at::parallel_for(0, B * M, grain_for(4 * KG), [&](int64_t begin, int64_t end) {
        assign_backward_rows(a, g, cd, out, begin, end, M, K, KG);
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
      at::parallel_for(0, B, grain_for(M * K), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) assign_sums(a + b * M * KG, M, K, KG, asum.data() + b * K);
      });
      // dC_k = -sum_b (sum_i a_bik) dV_bk, parallel over clusters so that no two threads write one row
      at::parallel_for(0, K, grain_for(B * D), [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          for (int64_t b = 0; b < B; ++b) axpy(-asum[b * K + k], g + (b * K + k) * D, out + k * D, D);
        }
      });
    });
    return grad;
  }
};

// ---- BLAS on tiles -------------------------------------------------------------------------------------------
//
// The per-item flow multiplies small tiles that stay in cache, many thousands per call, so it calls the
// BLAS that torch links (MKL or OpenBLAS, Fortran interface, column-major) directly: an ATen op per tile
// would cost more in dispatch than the tile's arithmetic. Looked up at run time so that the extension
// still loads against a torch without an exported BLAS; then the batched flow runs instead.

using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                         const double*, const int*, const double*, const int*, const double*, double*, const int*);

template <typename T>
struct Blas;
template <>
struct Blas<float> {
  static sgemm_t fn() {
    static const sgemm_t f = reinterpret_cast<sgemm_t>(dlsym(RTLD_DEFAULT, "sgemm_"));
    return f;
  }
};
template <>
struct Blas<double> {
  static dgemm_t fn() {
    static const dgemm_t f = reinterpret_cast<dgemm_t>(dlsym(RTLD_DEFAULT, "dgemm_"));
    return f;
  }
};

// For the lifetime of this object the calling thread's BLAS calls run on that thread alone. torch turns
// MKL's dynamic threading off, so MKL called inside a parallel region would otherwise start a full team
// of its own in every thread. (OpenBLAS built with OpenMP already runs single-threaded there.)
class SequentialBlas {
 public:
  SequentialBlas() {
    if (fn()) previous_ = fn()(1);
  }
  ~SequentialBlas() {
    if (fn()) fn()(previous_);
  }

 private:
  using set_local_t = int (*)(int);
  static set_local_t fn() {
    static const set_local_t f = reinterpret_cast<set_local_t>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
    return f;
  }
  int previous_ = 0;
};

// Row-major C (m x n, ldc) = alpha op(A) op(B) + beta C, with op = transpose when ta / tb. Row-major
// matrices are column-major transposes, so this is C^T = op(B)^T op(A)^T for the Fortran routine.
template <typename T>
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
             int64_t ldb, T beta, T* c, int64_t ldc) {
  const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LA = static_cast<int>(ldb), LB = static_cast<int>(lda), LC = static_cast<int>(ldc);
  Blas<T>::fn()(&tra, &trb, &M, &N, &K, &alpha, b, &LA, a, &LB, &beta, c, &LC);
}

// ---- the per-item flow -------------------------------------------------------------------------------------

constexpr int64_t kTile = 64;  // rows of x per tile: 64 x D floats stay in L2 across the tile's products

bool per_item(const at::Tensor& xa) {
  const bool blas = xa.scalar_type() == at::kDouble ? Blas<double>::fn() != nullptr : Blas<float>::fn() != nullptr;
  return blas && xa.size(0) >= 2 * at::get_num_threads() && xa.stride(2) == 1 && xa.size(1) > 0 &&
         xa.size(2) > 0;
}

// A tile of t rows of x as the tile's products read it. Masked rows must not reach a product (0 * NaN is
// NaN, whatever the assignment): a tile with some masked rows is copied into scratch (t, D) with those
// rows zeroed; a tile without any is read in place. Returns the rows and sets ld to their stride; nullptr
// when every row of the tile is masked, so that the caller skips the tile's products.
template <typename acc_t>
const acc_t* tile_rows(const acc_t* x, int64_t sxm, const bool* mask, int64_t t, int64_t D, acc_t* scratch,
                       int64_t& ld) {
  ld = sxm;
  if (mask == nullptr) return x;
  const int64_t valid = std::count(mask, mask + t, true);
  if (valid == t) return x;
  if (valid == 0) return nullptr;
  for (int64_t i = 0; i < t; ++i) {
    acc_t* dst = scratch + i * D;
    if (mask[i]) {
      std::copy(x + i * sxm, x + i * sxm + D, dst);
    } else {
      std::fill(dst, dst + D, acc_t(0));
    }
  }
  ld = D;
  return scratch;
}

// One item, streaming x in tiles: logits, softmax and a^T x for each tile while it is in cache. scratch:
// (kTile, D), used by tiles with masked rows.
template <typename acc_t, typename out_t>
void forward_item(const acc_t* x, int64_t sxm, const acc_t* w, const acc_t* bias, const bool* mask, const acc_t* c,
                  acc_t* a, acc_t* v, out_t* out, acc_t* scratch, int64_t M, int64_t K, int64_t KG, int64_t D,
                  bool normalize) {
  bool started = false;  // v holds a partial sum
  for (int64_t m0 = 0; m0 < M; m0 += kTile) {
    const int64_t t = std::min(kTile, M - m0);
    const bool* mt = mask ? mask + m0 : nullptr;
    acc_t* at = a + m0 * KG;
    int64_t ld;
    const acc_t* xt = tile_rows(x + m0 * sxm, sxm, mt, t, D, scratch, ld);
    if (xt == nullptr) {
      std::fill(at, at + t * KG, acc_t(0));
      continue;
    }
    gemm_rm<acc_t>(false, true, t, KG, D, 1, xt, ld, w, D, 0, at, KG);  // logits (t, KG) = x_t W^T
    for (int64_t i = 0; i < t; ++i) softmax_row(at + i * KG, bias, KG, mt ? mt[i] : true);
    gemm_rm<acc_t>(true, false, K, D, t, 1, at, KG, xt, ld, started ? 1 : 0, v, D);  // V += a_t^T x_t
    started = true;
  }
  if (!started) std::fill(v, v + K * D, acc_t(0));
  epilogue_item(v, a, c, out, M, K, KG, D, normalize);
}

// One item's input gradients, streaming x in tiles: dA = x dV^T, the softmax backward into [dS | a],
// dx = [dS | a] [W; dV], and dW += dS^T x, dbias += sum dS, each tile read from memory once.
// rhs: (KG + K, D) with W in its first KG rows; lhs: (kTile, KG + K); da: (kTile, K); scratch: (kTile, D),
// used by tiles with masked rows. dw and db are added to.
template <typename acc_t>
void backward_item(const acc_t* x, int64_t sxm, const acc_t* a, const acc_t* dv, const acc_t* cdv, const bool* mask,
                   acc_t* rhs, acc_t* lhs, acc_t* da, acc_t* scratch, acc_t* dx, acc_t* dw, acc_t* db, int64_t M,
                   int64_t K, int64_t KG, int64_t D) {
  std::copy(dv, dv + K * D, rhs + KG * D);
  for (int64_t m0 = 0; m0 < M; m0 += kTile) {
    const int64_t t = std::min(kTile, M - m0);
    int64_t ld;
    const acc_t* xt = tile_rows(x + m0 * sxm, sxm, mask ? mask + m0 : nullptr, t, D, scratch, ld);
    if (xt == nullptr) {  // all masked: no gradient reaches these rows, and nothing of them reaches dW
      std::fill(dx + m0 * D, dx + (m0 + t) * D, acc_t(0));
      continue;
    }
    gemm_rm<acc_t>(false, true, t, K, D, 1, xt, ld, dv, D, 0, da, K);  // dA (t, K) = x_t dV^T
    for (int64_t i = 0; i < t; ++i) {
      acc_t* row = lhs + i * (KG + K);
      const acc_t* ai = a + (m0 + i) * KG;
      assign_backward_row(ai, da + i * K, cdv, row, K, KG);
      std::copy(ai, ai + K, row + KG);
      axpy(acc_t(1), row, db, KG);
    }
    gemm_rm<acc_t>(false, false, t, D, KG + K, 1, lhs, KG + K, rhs, D, 0, dx + m0 * D, D);
    gemm_rm<acc_t>(true, false, KG, D, t, 1, lhs, KG + K, xt, ld, 1, dw, D);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_per_item(const Inputs& in, const at::Tensor& x,
                                                                bool normalize) {
  const int64_t B = in.B, M = in.M, D = in.D, K = in.K, KG = in.KG;
  at::Tensor assign = at::empty({B, M, KG}, in.x.options());
  at::Tensor vlad = at::empty({B, K, D}, in.x.options());
  at::Tensor out = normalize ? at::empty({B, K * D}, x.options()) : at::empty({B, K, D}, x.options());
  const bool* m = in.mask.defined() ? in.mask.data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "netvlad_fwd_cpu", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "netvlad_out_cpu", [&] {
      const acc_t* xp = in.x.data_ptr<acc_t>();
      const acc_t* bias = in.bias.defined() ? in.bias.data_ptr<acc_t>() : nullptr;
      const int64_t sxb = in.x.stride(0), sxm = in.x.stride(1);
      at::parallel_for(0, B, grain_for(2 * M * D * KG), [&](int64_t begin, int64_t end) {
        const SequentialBlas sequential;
        std::vector<acc_t> scratch(m ? kTile * D : 0);
        for (int64_t b = begin; b < end; ++b) {
          forward_item(xp + b * sxb, sxm, in.weight.data_ptr<acc_t>(), bias, m ? m + b * M : nullptr,
                       in.centroids.data_ptr<acc_t>(), assign.data_ptr<acc_t>() + b * M * KG,
                       vlad.data_ptr<acc_t>() + b * K * D, out.data_ptr<scalar_t>() + b * K * D, scratch.data(), M,
                       K, KG, D, normalize);
        }
      });
    });
  });
  if (!normalize) vlad = at::empty({0}, vlad.options());
  return {out, assign, vlad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_per_item(const Inputs& in,
                                                                             const at::Tensor& grad_out,
                                                                             const at::Tensor& assign,
                                                                             const at::Tensor& vlad, bool normalize) {
  const int64_t B = in.B, M = in.M, D = in.D, K = in.K, KG = in.KG;
  const at::Tensor grad = grad_out.reshape({B, K, D}).to(in.x.scalar_type()).contiguous();
  at::Tensor dv = at::empty({B, K, D}, grad.options());
  at::Tensor cdv = at::empty({B, K}, grad.options());
  CpuKernels::norm_backward(grad, vlad, in.centroids, normalize, dv, cdv);
  at::Tensor grad_c = CpuKernels::centroid_grad(assign, dv);
  at::Tensor grad_x = at::empty({B, M, D}, in.x.options());
  // Per thread: [W; dV_b], the tile buffers, and partial dW and dbias, summed at the end.
  const int threads = at::get_num_threads();
  at::Tensor rhs = at::empty({threads, KG + K, D}, in.x.options());
  rhs.narrow(1, 0, KG).copy_(in.weight.unsqueeze(0).expand({threads, KG, D}));
  at::Tensor lhs = at::empty({threads, kTile, KG + K}, in.x.options());
  at::Tensor da = at::empty({threads, kTile, K}, in.x.options());
  at::Tensor dw = at::empty({threads, KG, D}, in.x.options());
  at::Tensor db = at::empty({threads, KG}, in.x.options());
  std::vector<char> used(threads, 0);  // which threads' partial dW and dbias hold anything
  const bool* m = in.mask.defined() ? in.mask.data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "netvlad_bwd_cpu", [&] {
    const scalar_t* xp = in.x.data_ptr<scalar_t>();
    const int64_t sxb = in.x.stride(0), sxm = in.x.stride(1);
    at::parallel_for(0, B, grain_for(6 * M * D * KG), [&](int64_t begin, int64_t end) {
      const SequentialBlas sequential;
      const int64_t t = at::get_thread_num();
      scalar_t* dwt = dw.data_ptr<scalar_t>() + t * KG * D;
      scalar_t* dbt = db.data_ptr<scalar_t>() + t * KG;
      if (!used[t]) {  // zeroed rather than overwritten by the first tile: that tile may be all masked
        std::fill(dwt, dwt + KG * D, scalar_t(0));
        std::fill(dbt, dbt + KG, scalar_t(0));
        used[t] = 1;
      }
      std::vector<scalar_t> scratch(m ? kTile * D : 0);
      for (int64_t b = begin; b < end; ++b) {
        backward_item(xp + b * sxb, sxm, assign.data_ptr<scalar_t>() + b * M * KG,
                      dv.data_ptr<scalar_t>() + b * K * D, cdv.data_ptr<scalar_t>() + b * K,
                      m ? m + b * M : nullptr, rhs.data_ptr<scalar_t>() + t * (KG + K) * D,
                      lhs.data_ptr<scalar_t>() + t * kTile * (KG + K), da.data_ptr<scalar_t>() + t * kTile * K,
                      scratch.data(), grad_x.data_ptr<scalar_t>() + b * M * D, dwt, dbt, M, K, KG, D);
      }
    });
  });
  // Sum the partials of the threads that took items (B > 0 here, so at least one did).
  at::Tensor grad_w, grad_b;
  for (int t = 0; t < threads; ++t) {
    if (!used[t]) continue;
    if (!grad_w.defined()) {
      grad_w = dw.select(0, t);
      grad_b = db.select(0, t);
    } else {
      grad_w.add_(dw.select(0, t));
      grad_b.add_(db.select(0, t));
    }
  }
  return {grad_x, grad_w, grad_b, grad_c};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> netvlad_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& bias,
                                                               const at::Tensor& centroids,
                                                               const std::optional<at::Tensor>& mask,
                                                               int64_t ghost_clusters, bool normalize) {
  check_forward_args(x, weight, bias, centroids, mask, ghost_clusters);
  const Inputs in = prepare(x, weight, centroids, bias, mask);
  if (!per_item(in.x)) return forward<CpuKernels>(in, x, normalize);
  return forward_per_item(in, x, normalize);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> netvlad_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& centroids,
    const at::Tensor& assign, const at::Tensor& vlad, const std::optional<at::Tensor>& mask, int64_t ghost_clusters,
    bool normalize) {
  check_backward_args(grad_out, x, weight, centroids, assign, vlad, mask, ghost_clusters, normalize);
  const Inputs in = prepare(x, weight, centroids, std::nullopt, mask);
  auto grads = per_item(in.x) ? backward_per_item(in, grad_out, assign, vlad, normalize)
                              : backward<CpuKernels>(in, grad_out, x, assign, vlad, normalize);
  return in_input_dtypes(grads, x, weight, centroids);
}

}  // namespace
}  // namespace netvlad
}  // namespace mvfast

TORCH_LIBRARY_IMPL(mvfast, CPU, m) {
  m.impl("netvlad_fwd", &mvfast::netvlad::netvlad_fwd_cpu);
  m.impl("netvlad_bwd", &mvfast::netvlad::netvlad_bwd_cpu);
}
