// Attention pooling CPU kernels: at::parallel_for over (sample, split of its rows), inner loops over D
// vectorised with at::vec. The flow and the per-element math are in csrc/attention_pool.h.
//
// The op is memory-bound (a few flops per element of x), so each row of x is read from memory once per
// pass and everything done with it (the H scores, the running weighted sums; in backward the scores,
// x . dv, the row of grad_x and the weight gradient) happens while it is in L1.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "attention_pool.h"
#include "cpu/vec.h"

namespace mvfast {
namespace attention_pool {
namespace {

using at::vec::Vectorized;
using cpu::dot;
using cpu::grain_for;
using cpu::hsum;

// x . p and x . q in one sweep over x.
template <typename T>
void dot2(const T* x, const T* p, const T* q, int64_t n, T& xp, T& xq) {
  using Vec = Vectorized<T>;
  Vec a(T(0)), b(T(0));
  int64_t d = 0;
  for (; d + Vec::size() <= n; d += Vec::size()) {
    const Vec vx = Vec::loadu(x + d);
    a = at::vec::fmadd(vx, Vec::loadu(p + d), a);
    b = at::vec::fmadd(vx, Vec::loadu(q + d), b);
  }
  xp = hsum(a);
  xq = hsum(b);
  for (; d < n; ++d) {
    xp += x[d] * p[d];
    xq += x[d] * q[d];
  }
}

// y = beta * y + alpha * x (beta == 1 skips the multiply)
template <typename T>
void scale_axpy(T beta, T alpha, const T* x, T* y, int64_t n) {
  using Vec = Vectorized<T>;
  const Vec va(alpha), vb(beta);
  int64_t d = 0;
  if (beta == T(1)) {
    for (; d + Vec::size() <= n; d += Vec::size()) {
      at::vec::fmadd(va, Vec::loadu(x + d), Vec::loadu(y + d)).store(y + d);
    }
    for (; d < n; ++d) y[d] += alpha * x[d];
  } else {
    for (; d + Vec::size() <= n; d += Vec::size()) {
      at::vec::fmadd(va, Vec::loadu(x + d), Vec::loadu(y + d) * vb).store(y + d);
    }
    for (; d < n; ++d) y[d] = beta * y[d] + alpha * x[d];
  }
}

// y = alpha * p + beta * q
template <typename T>
void lincomb(T alpha, const T* p, T beta, const T* q, T* y, int64_t n) {
  using Vec = Vectorized<T>;
  const Vec va(alpha), vb(beta);
  int64_t d = 0;
  for (; d + Vec::size() <= n; d += Vec::size()) {
    at::vec::fmadd(va, Vec::loadu(p + d), Vec::loadu(q + d) * vb).store(y + d);
  }
  for (; d < n; ++d) y[d] = alpha * p[d] + beta * q[d];
}

// A row of x in the accumulation type: the row itself when it already is (no copy), else converted
// into buf.
template <typename scalar_t, typename acc_t>
const acc_t* load_row(const scalar_t* row, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    for (int64_t d = 0; d < n; ++d) buf[d] = static_cast<acc_t>(row[d]);
    return buf;
  }
}

struct CpuKernels {
  // Enough (sample, split) work items to keep every thread busy when B is small, each at least 64 rows.
  static int64_t splits(int64_t B, int64_t L) {
    const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
    const int64_t per_b = B > 0 ? (want + B - 1) / B : 1;
    return std::max<int64_t>(1, std::min<int64_t>(per_b, L / 64));
  }

  static void partials(const at::Tensor& x, const at::Tensor& w, const at::Tensor& mask, int64_t S,
                       at::Tensor& part_m, at::Tensor& part_s, at::Tensor& part_acc, const at::Tensor& scores) {
    const int64_t B = x.size(0), L = x.size(1), D = x.size(2), H = w.size(0);
    const int64_t sxb = x.stride(0), sxl = x.stride(1);
    const bool* mk = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_pool_fwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const acc_t* wp = w.data_ptr<acc_t>();
      acc_t* pm = part_m.data_ptr<acc_t>();
      acc_t* ps = part_s.data_ptr<acc_t>();
      acc_t* pa = part_acc.data_ptr<acc_t>();
      acc_t* sc = scores.defined() ? scores.data_ptr<acc_t>() : nullptr;
      const int64_t chunk = S > 0 ? (L + S - 1) / S : L;
      at::parallel_for(0, B * S, grain_for(2 * chunk * D * H), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : D);
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / S, l0 = (item % S) * chunk, l1 = std::min(L, l0 + chunk);
          acc_t* m = pm + item * H;
          acc_t* s = ps + item * H;
          acc_t* acc = pa + item * H * D;
          for (int64_t h = 0; h < H; ++h) {
            m[h] = neg_inf<acc_t>();
            s[h] = acc_t(0);
          }
          std::fill(acc, acc + H * D, acc_t(0));
          for (int64_t l = l0; l < l1; ++l) {
            if (mk && !mk[b * L + l]) {
              if (sc) std::fill(sc + (b * L + l) * H, sc + (b * L + l + 1) * H, neg_inf<acc_t>());
              continue;
            }
            const acc_t* row = load_row(xp + b * sxb + l * sxl, buf.data(), D);
            for (int64_t h = 0; h < H; ++h) {
              const acc_t score = dot(row, wp + h * D, D);
              if (sc) sc[(b * L + l) * H + h] = score;
              const acc_t rescale = online_rescale(m[h], score);
              const acc_t p = online_prob(score, m[h]);
              s[h] = s[h] * rescale + p;
              scale_axpy(rescale, p, row, acc + h * D, D);
            }
          }
        }
      });
    });
  }

  static void combine(const at::Tensor& part_m, const at::Tensor& part_s, const at::Tensor& part_acc,
                      at::Tensor& out, at::Tensor& lse) {
    const int64_t B = part_m.size(0), S = part_m.size(1), H = part_m.size(2), D = part_acc.size(3);
    AT_DISPATCH_FLOATING_TYPES(part_m.scalar_type(), "attention_pool_combine_cpu", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "attention_pool_out_cpu", [&] {
        using out_t = scalar_t;
        const acc_t* pm = part_m.data_ptr<acc_t>();
        const acc_t* ps = part_s.data_ptr<acc_t>();
        const acc_t* pa = part_acc.data_ptr<acc_t>();
        acc_t* lp = lse.data_ptr<acc_t>();
        out_t* op = out.data_ptr<out_t>();
        at::parallel_for(0, B * H, grain_for(2 * S * D), [&](int64_t begin, int64_t end) {
          std::vector<acc_t> acc(D);
          for (int64_t bh = begin; bh < end; ++bh) {
            const int64_t b = bh / H, h = bh % H;
            acc_t m = neg_inf<acc_t>(), s = acc_t(0);
            std::fill(acc.begin(), acc.end(), acc_t(0));
            for (int64_t j = 0; j < S; ++j) online_merge(m, s, pm[(b * S + j) * H + h], ps[(b * S + j) * H + h]);
            for (int64_t j = 0; j < S; ++j) {
              const int64_t i = (b * S + j) * H + h;
              const acc_t f = split_factor(pm[i], ps[i], m);
              if (f != acc_t(0)) scale_axpy(acc_t(1), f, pa + i * D, acc.data(), D);
            }
            lp[bh] = finish_lse(m, s);
            const acc_t inv = finish_scale(s);
            out_t* o = op + bh * D;
            for (int64_t d = 0; d < D; ++d) o[d] = static_cast<out_t>(acc[d] * inv);
          }
        });
      });
    });
  }

  static void weights(const at::Tensor& scores, const at::Tensor& lse, const at::Tensor& mask, at::Tensor& out) {
    const int64_t B = scores.size(0), L = scores.size(1), H = scores.size(2);
    const bool* mk = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "attention_pool_weights_cpu", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "attention_pool_w_cpu", [&] {
        const acc_t* sc = scores.data_ptr<acc_t>();
        const acc_t* lp = lse.data_ptr<acc_t>();
        scalar_t* o = out.data_ptr<scalar_t>();
        at::parallel_for(0, B * L, 256, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const bool valid = !mk || mk[r];
            for (int64_t h = 0; h < H; ++h) {
              o[r * H + h] = static_cast<scalar_t>(weight_of(sc[r * H + h], lp[(r / L) * H + h], valid));
            }
          }
        });
      });
    });
  }

  static void backward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& mask, const at::Tensor& lse,
                       const at::Tensor& dv, const at::Tensor& c, const at::Tensor& ga, int64_t S,
                       at::Tensor& grad_x, at::Tensor& part_dw) {
    const int64_t B = x.size(0), L = x.size(1), D = x.size(2), H = w.size(0);
    const int64_t sxb = x.stride(0), sxl = x.stride(1);
    const bool* mk = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_pool_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      constexpr bool same = std::is_same_v<scalar_t, acc_t>;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const acc_t* wp = w.data_ptr<acc_t>();
      const acc_t* lp = lse.data_ptr<acc_t>();
      const acc_t* dvp = dv.data_ptr<acc_t>();
      const acc_t* cp = c.data_ptr<acc_t>();
      const acc_t* gap = ga.defined() ? ga.data_ptr<acc_t>() : nullptr;
      scalar_t* gx = grad_x.data_ptr<scalar_t>();
      acc_t* pdw = part_dw.data_ptr<acc_t>();
      const int64_t chunk = S > 0 ? (L + S - 1) / S : L;
      // grad_x is a fresh allocation (39 MB at the benchmark shape: fresh mmap pages). Zeroing it in a
      // pass of its own before the streaming loop, rather than taking the first-touch page faults inside
      // it, measured faster on the 2-core development machine: minimum 11-13 ms against 19-21 ms for the
      // (32, 300, 1024) backward (noisy; touching one element per page instead did not help).
      grad_x.zero_();
      at::parallel_for(0, B * S, grain_for(4 * chunk * D * H), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buf(same ? 0 : D), dxbuf(same ? 0 : D), a(H), ds(H);
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / S, l0 = (item % S) * chunk, l1 = std::min(L, l0 + chunk);
          acc_t* dw = pdw + item * H * D;
          std::fill(dw, dw + H * D, acc_t(0));
          const acc_t* dvb = dvp + b * H * D;
          for (int64_t l = l0; l < l1; ++l) {
            scalar_t* gxr = gx + (b * L + l) * D;
            if (mk && !mk[b * L + l]) {
              std::fill(gxr, gxr + D, scalar_t(0));
              continue;
            }
            const acc_t* row = load_row(xp + b * sxb + l * sxl, buf.data(), D);
            for (int64_t h = 0; h < H; ++h) {
              acc_t score, da;
              dot2(row, wp + h * D, dvb + h * D, D, score, da);
              a[h] = weight_of(score, lp[b * H + h], true);
              const acc_t g = da + (gap ? gap[(b * L + l) * H + h] : acc_t(0));
              ds[h] = score_grad(a[h], g, cp[b * H + h]);
              scale_axpy(acc_t(1), ds[h], row, dw + h * D, D);  // dw_h += ds_h x_l
            }
            // grad_x_l = sum_h a_h dv_h + ds_h w_h
            acc_t* dx = same ? reinterpret_cast<acc_t*>(gxr) : dxbuf.data();
            lincomb(a[0], dvb, ds[0], wp, dx, D);
            for (int64_t h = 1; h < H; ++h) {
              scale_axpy(acc_t(1), a[h], dvb + h * D, dx, D);
              scale_axpy(acc_t(1), ds[h], wp + h * D, dx, D);
            }
            if constexpr (!same) {
              for (int64_t d = 0; d < D; ++d) gxr[d] = static_cast<scalar_t>(dx[d]);
            }
          }
        }
      });
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_pool_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                      const std::optional<at::Tensor>& mask,
                                                                      bool return_weights) {
  check_forward_args(x, weight, mask);
  return forward<CpuKernels>(x, weight, mask, return_weights);
}

std::tuple<at::Tensor, at::Tensor> attention_pool_bwd_cpu(const at::Tensor& grad_out,
                                                          const std::optional<at::Tensor>& grad_weights,
                                                          const at::Tensor& x, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& mask, const at::Tensor& out,
                                                          const at::Tensor& lse,
                                                          const std::optional<at::Tensor>& weights) {
  check_backward_args(grad_out, grad_weights, x, weight, mask, out, lse, weights);
  return backward<CpuKernels>(grad_out, grad_weights, x, weight, mask, out, lse, weights);
}

}  // namespace
}  // namespace attention_pool
}  // namespace mvfast

TORCH_LIBRARY_IMPL(mvfast, CPU, m) {
  m.impl("attention_pool_fwd", &mvfast::attention_pool::attention_pool_fwd_cpu);
  m.impl("attention_pool_bwd", &mvfast::attention_pool::attention_pool_bwd_cpu);
}
