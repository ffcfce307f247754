// Conv3d + BatchNorm3d + ReLU CPU kernels: the conv is ATen's (oneDNN); the BN statistics, the BN+ReLU
// apply and their backward are fused here, at::parallel_for over tiles of (sample, block of positions).
// The flow and the per-element math are in csrc/conv3d_bn_relu.h.
//
// A tile is read in z's layout: in channels_last_3d it is one flat run of rows of C values (positions),
// walked in whole vectors against per-channel parameters repeated along the vector lanes (see "lanes"
// below), in NCDHW its rows are channels (a block of contiguous positions). A tensor in the other layout
// (grad_out, or the output when the user's layout is not the conv's) is transposed through a small buffer
// while the tile is in cache, so the switch of layout costs no pass over memory of its own.
//
// Statistics: each tile's mean and M2 are computed in two passes over the tile while it is in L1 (never
// E[x^2] - E[x]^2), then folded into the chunk's running statistics with the Chan/Welford combine; the
// chunks are combined the same way at the end. The chunking depends only on the sizes and the thread
// count, not on scheduling, so results are reproducible.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

#include "conv3d_bn_relu.h"

namespace mvfast {
namespace conv3d_bn_relu {
namespace {

using at::vec::Vectorized;

// (N, C, S) geometry of a 5-D tensor, tiled into blocks of `ts` positions per sample.
struct Geom {
  int64_t N, C, S, ts, tiles;
  bool cl;  // tile rows are positions (z is channels_last_3d)

  explicit Geom(const at::Tensor& z) {
    N = z.size(0);
    C = z.size(1);
    S = z.numel() / std::max<int64_t>(1, N * C);
    cl = is_channels_last(z);
    // About 4096 values per tile (16 KB in float32): it and its transposed partner stay in L1.
    ts = std::max<int64_t>(8, std::min<int64_t>(512, 4096 / std::max<int64_t>(1, C)));
    tiles = S > 0 ? (S + ts - 1) / ts : 0;
  }
  int64_t items() const { return N * tiles; }
};

// Chunks of consecutive tiles, one partial result each: a fixed split that depends only on the sizes and
// the thread count, not on which thread runs what. At least 32k values a chunk: below that, opening a
// parallel region costs more than the work (the narrow layers of a small model are a few thousand values).
int64_t num_chunks(const Geom& g) {
  const int64_t values = g.N * g.S * g.C;
  const int64_t most = std::min<int64_t>(g.items(), 4 * static_cast<int64_t>(at::get_num_threads()));
  return std::max<int64_t>(1, std::min<int64_t>(most, values / 32768));
}

template <typename F>
void for_chunks(const Geom& g, int64_t chunks, F f) {
  const int64_t items = g.items();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t i0 = items * k / chunks, i1 = items * (k + 1) / chunks;
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t n = item / g.tiles, s0 = (item % g.tiles) * g.ts;
        f(k, n, s0, std::min(g.ts, g.S - s0));
      }
    }
  });
}

template <typename F>
void for_tiles(const Geom& g, F f) {
  for_chunks(g, num_chunks(g), [&](int64_t, int64_t n, int64_t s0, int64_t len) { f(n, s0, len); });
}

// The tile (n, s0..s0+len) of src, in the tile layout of g, as acc_t rows with stride ld: a pointer into
// src itself when the layout and dtype already match, else a converted or transposed copy in buf.
template <typename acc_t, typename scalar_t>
const acc_t* load_tile(const scalar_t* src, bool src_cl, const Geom& g, int64_t n, int64_t s0, int64_t len,
                       acc_t* buf, int64_t& ld) {
  const int64_t C = g.C, S = g.S;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (src_cl == g.cl) {
      ld = g.cl ? C : S;
      return g.cl ? src + (n * S + s0) * C : src + n * C * S + s0;
    }
  }
  if (g.cl) {  // buf[t * C + c]
    ld = C;
    if (src_cl) {
      const scalar_t* p = src + (n * S + s0) * C;
      for (int64_t i = 0; i < len * C; ++i) buf[i] = static_cast<acc_t>(p[i]);
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* p = src + (n * C + c) * S + s0;
        for (int64_t t = 0; t < len; ++t) buf[t * C + c] = static_cast<acc_t>(p[t]);
      }
    }
  } else {  // buf[c * len + t]
    ld = len;
    if (!src_cl) {
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* p = src + (n * C + c) * S + s0;
        for (int64_t t = 0; t < len; ++t) buf[c * len + t] = static_cast<acc_t>(p[t]);
      }
    } else {
      for (int64_t t = 0; t < len; ++t) {
        const scalar_t* p = src + (n * S + s0 + t) * C;
        for (int64_t c = 0; c < C; ++c) buf[c * len + t] = static_cast<acc_t>(p[c]);
      }
    }
  }
  return buf;
}

// Writes a tile held in the tile layout of g (rows of stride ld) into dst, converting or transposing.
template <typename acc_t, typename scalar_t>
void store_tile(const acc_t* buf, int64_t ld, scalar_t* dst, bool dst_cl, const Geom& g, int64_t n, int64_t s0,
                int64_t len) {
  const int64_t C = g.C, S = g.S;
  if (g.cl) {
    if (dst_cl) {
      scalar_t* p = dst + (n * S + s0) * C;
      for (int64_t t = 0; t < len; ++t) {
        for (int64_t c = 0; c < C; ++c) p[t * C + c] = static_cast<scalar_t>(buf[t * ld + c]);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        scalar_t* p = dst + (n * C + c) * S + s0;
        for (int64_t t = 0; t < len; ++t) p[t] = static_cast<scalar_t>(buf[t * ld + c]);
      }
    }
  } else {
    if (!dst_cl) {
      for (int64_t c = 0; c < C; ++c) {
        scalar_t* p = dst + (n * C + c) * S + s0;
        for (int64_t t = 0; t < len; ++t) p[t] = static_cast<scalar_t>(buf[c * ld + t]);
      }
    } else {
      for (int64_t t = 0; t < len; ++t) {
        scalar_t* p = dst + (n * S + s0 + t) * C;
        for (int64_t c = 0; c < C; ++c) p[c] = static_cast<scalar_t>(buf[c * ld + t]);
      }
    }
  }
}

template <typename T>
T vsum(const T* a, int64_t n) {
  using Vec = Vectorized<T>;
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = acc + Vec::loadu(a + i);
  T s = at::vec::vec_reduce_all<T>([](Vec& p, Vec& q) { return p + q; }, acc);
  for (; i < n; ++i) s += a[i];
  return s;
}

// sum (a_i - m)^2
template <typename T>
T vsumsq_dev(const T* a, T m, int64_t n) {
  using Vec = Vectorized<T>;
  const Vec vm(m);
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec d = Vec::loadu(a + i) - vm;
    acc = at::vec::fmadd(d, d, acc);
  }
  T s = at::vec::vec_reduce_all<T>([](Vec& p, Vec& q) { return p + q; }, acc);
  for (; i < n; ++i) s += (a[i] - m) * (a[i] - m);
  return s;
}

// ---- channels-last tiles: flat runs of rows of C values ----------------------------------------------
//
// In channels_last_3d a tile is len rows of C contiguous values, one flat run of len * C values where the
// value at flat index i belongs to channel i % C. Looping over rows and then over the C channels leaves
// most of each vector empty when C is small (the narrow layers of a small model have 4 to 32 channels).
// Instead the per-channel parameters are repeated along a period of P = lcm(C, V) values (V: values per
// vector), and the run is walked period by period with whole vectors whose lanes line up with the
// repeated parameters; the tail (fewer than P values, whole rows) is scalar. Per-lane sums are folded
// back into channels (lane j is channel j % C) at the end.

int64_t lane_period(int64_t C, int64_t V) {
  return C / std::gcd(C, V) * V;
}

// dst[j] = src[j % C] for j < P
template <typename T>
void repeat_lanes(const T* src, int64_t C, int64_t P, T* dst) {
  for (int64_t j = 0; j < P; ++j) dst[j] = src[j % C];
}

// out[c] = sum of lanes[j] over the j < P with j % C == c
template <typename T>
void fold_lanes(const T* lanes, int64_t C, int64_t P, T* out) {
  for (int64_t c = 0; c < C; ++c) out[c] = T(0);
  for (int64_t j = 0; j < P; ++j) out[j % C] += lanes[j];
}

// out[j] (j < P) = the sum of a's values in lane j over the n values of a (n a multiple of C).
template <typename T>
void lane_sums(const T* a, int64_t n, int64_t P, T* out) {
  using Vec = Vectorized<T>;
  const int64_t full = n / P * P;
  for (int64_t j = 0; j < P; j += Vec::size()) {
    Vec s(T(0));
    for (int64_t b = j; b < full; b += P) s = s + Vec::loadu(a + b);
    s.store(out + j);
  }
  for (int64_t i = full; i < n; ++i) out[i - full] += a[i];
}

// out[j] = sum of (a - m[j])^2 over lane j, m repeated along the period.
template <typename T>
void lane_sq_devs(const T* a, int64_t n, int64_t P, const T* m, T* out) {
  using Vec = Vectorized<T>;
  const int64_t full = n / P * P;
  for (int64_t j = 0; j < P; j += Vec::size()) {
    const Vec vm = Vec::loadu(m + j);
    Vec s(T(0));
    for (int64_t b = j; b < full; b += P) {
      const Vec d = Vec::loadu(a + b) - vm;
      s = at::vec::fmadd(d, d, s);
    }
    s.store(out + j);
  }
  for (int64_t i = full; i < n; ++i) out[i - full] += (a[i] - m[i - full]) * (a[i] - m[i - full]);
}

// y = relu(z * sc + sh) lane by lane. An element lands in the same lane (vector or scalar tail) here as in
// the backward's recomputed mask (lane_bwd_*), because the tiles of forward and backward are the same.
template <bool kRelu, typename T>
void lane_apply(const T* z, int64_t n, int64_t P, const T* sc, const T* sh, T* y) {
  using Vec = Vectorized<T>;
  const int64_t full = n / P * P;
  const Vec zero(T(0));
  for (int64_t j = 0; j < P; j += Vec::size()) {
    const Vec vs = Vec::loadu(sc + j), vh = Vec::loadu(sh + j);
    for (int64_t b = j; b < full; b += P) {
      Vec v = Vec::loadu(z + b) * vs + vh;
      if constexpr (kRelu) v = Vec::blendv(v, zero, v < zero);  // y < 0 ? 0 : y keeps a NaN
      v.store(y + b);
    }
  }
  for (int64_t i = full; i < n; ++i) y[i] = bn_relu(z[i], sc[i - full], sh[i - full], kRelu);
}

// Per lane: sum of g and of g * xhat, g = relu_grad(gy, z), xhat = (z - mu) * iv.
template <bool kRelu, typename T>
void lane_bwd_sums(const T* z, const T* gy, int64_t n, int64_t P, const T* sc, const T* sh, const T* mu,
                   const T* iv, T* sum_g, T* sum_gx) {
  using Vec = Vectorized<T>;
  const int64_t full = n / P * P;
  const Vec zero(T(0));
  for (int64_t j = 0; j < P; j += Vec::size()) {
    const Vec vs = Vec::loadu(sc + j), vh = Vec::loadu(sh + j), vm = Vec::loadu(mu + j),
              vi = Vec::loadu(iv + j);
    Vec a(T(0)), c(T(0));
    for (int64_t b = j; b < full; b += P) {
      const Vec vz = Vec::loadu(z + b);
      Vec g = Vec::loadu(gy + b);
      if constexpr (kRelu) g = Vec::blendv(zero, g, (vz * vs + vh) > zero);
      a = a + g;
      c = at::vec::fmadd(g, (vz - vm) * vi, c);
    }
    a.store(sum_g + j);
    c.store(sum_gx + j);
  }
  for (int64_t i = full; i < n; ++i) {
    const int64_t j = i - full;
    const T g = relu_grad(gy[i], z[i], sc[j], sh[j], kRelu);
    sum_g[j] += g;
    sum_gx[j] += g * ((z[i] - mu[j]) * iv[j]);
  }
}

// dz = bn_backward(relu_grad(gy, z), xhat) lane by lane.
template <bool kRelu, typename T>
void lane_bwd_apply(const T* z, const T* gy, int64_t n, int64_t P, const T* sc, const T* sh, const T* mu,
                    const T* iv, const T* mg, const T* mgx, T* dz) {
  using Vec = Vectorized<T>;
  const int64_t full = n / P * P;
  const Vec zero(T(0));
  for (int64_t j = 0; j < P; j += Vec::size()) {
    const Vec vs = Vec::loadu(sc + j), vh = Vec::loadu(sh + j), vm = Vec::loadu(mu + j),
              vi = Vec::loadu(iv + j), va = Vec::loadu(mg + j), vb = Vec::loadu(mgx + j);
    for (int64_t b = j; b < full; b += P) {
      const Vec vz = Vec::loadu(z + b);
      Vec g = Vec::loadu(gy + b);
      if constexpr (kRelu) g = Vec::blendv(zero, g, (vz * vs + vh) > zero);
      (vs * (g - va - (vz - vm) * vi * vb)).store(dz + b);
    }
  }
  for (int64_t i = full; i < n; ++i) {
    const int64_t j = i - full;
    dz[i] = bn_backward(relu_grad(gy[i], z[i], sc[j], sh[j], kRelu), (z[i] - mu[j]) * iv[j], sc[j], mg[j], mgx[j]);
  }
}

struct CpuKernels {
  static void stats(const at::Tensor& z, at::Tensor& mean, at::Tensor& m2) {
    const Geom g(z);
    const int64_t C = g.C, chunks = num_chunks(g);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "conv3d_bn_relu_stats_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* zp = z.data_ptr<scalar_t>();
      std::vector<acc_t> cnt(chunks, acc_t(0)), pmean(chunks * C, acc_t(0)), pm2(chunks * C, acc_t(0));
      for_chunks(g, chunks, [&](int64_t k, int64_t n, int64_t s0, int64_t len) {
        thread_local std::vector<acc_t> buf, tmean, tm2;
        buf.resize(g.ts * C);
        tmean.assign(C, acc_t(0));
        tm2.assign(C, acc_t(0));
        int64_t ld;
        const acc_t* zt = load_tile(zp, g.cl, g, n, s0, len, buf.data(), ld);
        if (g.cl) {  // one flat run of len rows of C values, walked in whole vectors
          const int64_t P = lane_period(C, Vectorized<acc_t>::size()), nv = len * C;
          thread_local std::vector<acc_t> lanes, lmean;
          lanes.resize(P);
          lmean.resize(P);
          lane_sums(zt, nv, P, lanes.data());
          fold_lanes(lanes.data(), C, P, tmean.data());
          for (int64_t c = 0; c < C; ++c) tmean[c] /= static_cast<acc_t>(len);
          repeat_lanes(tmean.data(), C, P, lmean.data());
          lane_sq_devs(zt, nv, P, lmean.data(), lanes.data());
          fold_lanes(lanes.data(), C, P, tm2.data());
        } else {
          for (int64_t c = 0; c < C; ++c) {
            tmean[c] = vsum(zt + c * ld, len) / static_cast<acc_t>(len);
            tm2[c] = vsumsq_dev(zt + c * ld, tmean[c], len);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          acc_t nk = cnt[k];
          welford_combine(nk, pmean[k * C + c], pm2[k * C + c], static_cast<acc_t>(len), tmean[c], tm2[c]);
        }
        cnt[k] += static_cast<acc_t>(len);
      });
      acc_t* mp = mean.data_ptr<acc_t>();
      acc_t* vp = m2.data_ptr<acc_t>();
      for (int64_t c = 0; c < C; ++c) {
        acc_t n = 0, m = 0, s = 0;
        for (int64_t k = 0; k < chunks; ++k) welford_combine(n, m, s, cnt[k], pmean[k * C + c], pm2[k * C + c]);
        mp[c] = m;
        vp[c] = s;
      }
    });
  }

  static void apply(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift, bool relu,
                    at::Tensor& out) {
    const Geom g(z);
    const bool out_cl = is_channels_last(out);
    const int64_t C = g.C;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "conv3d_bn_relu_apply_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* zp = z.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      const acc_t* sc = scale.data_ptr<acc_t>();
      const acc_t* sh = shift.data_ptr<acc_t>();
      const int64_t P = lane_period(C, Vectorized<acc_t>::size());
      std::vector<acc_t> lsc(P), lsh(P);
      repeat_lanes(sc, C, P, lsc.data());
      repeat_lanes(sh, C, P, lsh.data());
      for_tiles(g, [&](int64_t n, int64_t s0, int64_t len) {
        thread_local std::vector<acc_t> zbuf, ybuf;
        zbuf.resize(g.ts * C);
        ybuf.resize(g.ts * C);
        int64_t ld;
        const acc_t* zt = load_tile(zp, g.cl, g, n, s0, len, zbuf.data(), ld);
        if (g.cl) {
          // written in place when the output is channels-last in the accumulation type, else staged
          constexpr bool same = std::is_same_v<scalar_t, acc_t>;
          acc_t* yt = ybuf.data();
          if constexpr (same) {
            if (out_cl) yt = reinterpret_cast<acc_t*>(op) + (n * g.S + s0) * C;
          }
          if (relu) {
            lane_apply<true>(zt, len * C, P, lsc.data(), lsh.data(), yt);
          } else {
            lane_apply<false>(zt, len * C, P, lsc.data(), lsh.data(), yt);
          }
          if (yt == ybuf.data()) store_tile(yt, C, op, out_cl, g, n, s0, len);
          return;
        }
        for (int64_t c = 0; c < C; ++c) {
          const acc_t* zr = zt + c * ld;
          acc_t* yr = ybuf.data() + c * len;
          const acc_t s = sc[c], h = sh[c];
          for (int64_t t = 0; t < len; ++t) yr[t] = bn_relu(zr[t], s, h, relu);
        }
        store_tile(ybuf.data(), len, op, out_cl, g, n, s0, len);
      });
    });
  }

  static void bwd_reduce(const at::Tensor& gy, const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                         const at::Tensor& mean, const at::Tensor& invstd, bool relu, at::Tensor& sum_g,
                         at::Tensor& sum_gx) {
    const Geom g(z);
    const bool gy_cl = is_channels_last(gy);
    const int64_t C = g.C, chunks = num_chunks(g);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "conv3d_bn_relu_bwd_reduce_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* zp = z.data_ptr<scalar_t>();
      const scalar_t* gp = gy.data_ptr<scalar_t>();
      const acc_t* sc = scale.data_ptr<acc_t>();
      const acc_t* sh = shift.data_ptr<acc_t>();
      const acc_t* mu = mean.data_ptr<acc_t>();
      const acc_t* iv = invstd.data_ptr<acc_t>();
      const int64_t P = lane_period(C, Vectorized<acc_t>::size());
      std::vector<acc_t> lsc(P), lsh(P), lmu(P), liv(P);
      repeat_lanes(sc, C, P, lsc.data());
      repeat_lanes(sh, C, P, lsh.data());
      repeat_lanes(mu, C, P, lmu.data());
      repeat_lanes(iv, C, P, liv.data());
      std::vector<acc_t> psg(chunks * C, acc_t(0)), psgx(chunks * C, acc_t(0));
      for_chunks(g, chunks, [&](int64_t k, int64_t n, int64_t s0, int64_t len) {
        thread_local std::vector<acc_t> zbuf, gbuf, tg, tgx, lg, lgx;
        zbuf.resize(g.ts * C);
        gbuf.resize(g.ts * C);
        tg.assign(C, acc_t(0));
        tgx.assign(C, acc_t(0));
        int64_t zld, gld;
        const acc_t* zt = load_tile(zp, g.cl, g, n, s0, len, zbuf.data(), zld);
        const acc_t* gt = load_tile(gp, gy_cl, g, n, s0, len, gbuf.data(), gld);
        if (g.cl) {
          lg.resize(P);
          lgx.resize(P);
          if (relu) {
            lane_bwd_sums<true>(zt, gt, len * C, P, lsc.data(), lsh.data(), lmu.data(), liv.data(), lg.data(),
                                lgx.data());
          } else {
            lane_bwd_sums<false>(zt, gt, len * C, P, lsc.data(), lsh.data(), lmu.data(), liv.data(), lg.data(),
                                 lgx.data());
          }
          fold_lanes(lg.data(), C, P, tg.data());
          fold_lanes(lgx.data(), C, P, tgx.data());
        } else {
          for (int64_t c = 0; c < C; ++c) {
            const acc_t* zr = zt + c * zld;
            const acc_t* gr = gt + c * gld;
            const acc_t s = sc[c], h = sh[c], m = mu[c], v = iv[c];
            acc_t a = 0, b = 0;
            for (int64_t t = 0; t < len; ++t) {
              const acc_t gg = relu_grad(gr[t], zr[t], s, h, relu);
              a += gg;
              b += gg * ((zr[t] - m) * v);
            }
            tg[c] = a;
            tgx[c] = b;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          psg[k * C + c] += tg[c];
          psgx[k * C + c] += tgx[c];
        }
      });
      acc_t* sg = sum_g.data_ptr<acc_t>();
      acc_t* sgx = sum_gx.data_ptr<acc_t>();
      for (int64_t c = 0; c < C; ++c) {
        acc_t a = 0, b = 0;
        for (int64_t k = 0; k < chunks; ++k) {
          a += psg[k * C + c];
          b += psgx[k * C + c];
        }
        sg[c] = a;
        sgx[c] = b;
      }
    });
  }

  static void bwd_apply(const at::Tensor& gy, const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                        const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& mean_g,
                        const at::Tensor& mean_gx, bool relu, at::Tensor& gz) {
    const Geom g(z);
    const bool gy_cl = is_channels_last(gy);
    const int64_t C = g.C;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "conv3d_bn_relu_bwd_apply_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* zp = z.data_ptr<scalar_t>();
      const scalar_t* gp = gy.data_ptr<scalar_t>();
      scalar_t* dp = gz.data_ptr<scalar_t>();
      const acc_t* sc = scale.data_ptr<acc_t>();
      const acc_t* sh = shift.data_ptr<acc_t>();
      const acc_t* mu = mean.data_ptr<acc_t>();
      const acc_t* iv = invstd.data_ptr<acc_t>();
      const acc_t* mg = mean_g.data_ptr<acc_t>();
      const acc_t* mgx = mean_gx.data_ptr<acc_t>();
      const int64_t P = lane_period(C, Vectorized<acc_t>::size());
      std::vector<acc_t> lanes(6 * P);
      const acc_t* per_channel[6] = {sc, sh, mu, iv, mg, mgx};
      for (int i = 0; i < 6; ++i) repeat_lanes(per_channel[i], C, P, lanes.data() + i * P);
      const acc_t* L = lanes.data();
      for_tiles(g, [&](int64_t n, int64_t s0, int64_t len) {
        thread_local std::vector<acc_t> zbuf, gbuf, dbuf;
        zbuf.resize(g.ts * C);
        gbuf.resize(g.ts * C);
        dbuf.resize(g.ts * C);
        int64_t zld, gld;
        const acc_t* zt = load_tile(zp, g.cl, g, n, s0, len, zbuf.data(), zld);
        const acc_t* gt = load_tile(gp, gy_cl, g, n, s0, len, gbuf.data(), gld);
        if (g.cl) {  // gz is in z's layout: written in place in the accumulation type, else staged
          acc_t* dt = dbuf.data();
          if constexpr (std::is_same_v<scalar_t, acc_t>) dt = reinterpret_cast<acc_t*>(dp) + (n * g.S + s0) * C;
          if (relu) {
            lane_bwd_apply<true>(zt, gt, len * C, P, L, L + P, L + 2 * P, L + 3 * P, L + 4 * P, L + 5 * P, dt);
          } else {
            lane_bwd_apply<false>(zt, gt, len * C, P, L, L + P, L + 2 * P, L + 3 * P, L + 4 * P, L + 5 * P, dt);
          }
          if (dt == dbuf.data()) store_tile(dt, C, dp, true, g, n, s0, len);
          return;
        }
        for (int64_t c = 0; c < C; ++c) {
          const acc_t* zr = zt + c * zld;
          const acc_t* gr = gt + c * gld;
          acc_t* dr = dbuf.data() + c * len;
          const acc_t s = sc[c], h = sh[c], m = mu[c], v = iv[c], a = mg[c], b = mgx[c];
          for (int64_t t = 0; t < len; ++t) {
            dr[t] = bn_backward(relu_grad(gr[t], zr[t], s, h, relu), (zr[t] - m) * v, s, a, b);
          }
        }
        store_tile(dbuf.data(), len, dp, false, g, n, s0, len);
      });
    });
  }

  // The fold of fold_bn in one pass: a small model's eval spent more in the eight ATen ops of the fold
  // than in its narrowest convolutions. An output channel's weights are one contiguous block in NCDHW and
  // in channels_last_3d alike (dim 0 is outermost in both), so each block is scaled as it is stored when
  // weight is already in layout fmt, and transposed from (Cin, taps) to (taps, Cin) on the way when it is
  // NCDHW and fmt is channels_last_3d (a model's parameters are NCDHW, its activations channels-last).
  static void fold(const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& bn_weight,
                   const at::Tensor& bn_bias, const at::Tensor& running_mean, const at::Tensor& running_var,
                   double eps, at::MemoryFormat fmt, at::Tensor& w, at::Tensor& b) {
    const auto acc = acc_type(weight.scalar_type());
    const bool transpose = !weight.is_contiguous(fmt) && fmt == at::MemoryFormat::ChannelsLast3d &&
                           weight.is_contiguous();
    const at::Tensor src = transpose ? weight : in_layout(weight, fmt);
    const at::Tensor g = bn_weight.to(acc).contiguous(), beta = bn_bias.to(acc).contiguous();
    const at::Tensor rm = running_mean.to(acc).contiguous(), rv = running_var.to(acc).contiguous();
    const bool has_bias = bias.has_value() && bias->defined();
    const at::Tensor cb = has_bias ? bias->to(acc).contiguous() : at::Tensor();
    const int64_t C = weight.size(0), per = C > 0 ? weight.numel() / C : 0;
    const int64_t cin = weight.size(1), taps = cin > 0 ? per / cin : 0;
    w = at::empty(weight.sizes(), weight.options().memory_format(fmt));
    b = at::empty({C}, weight.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "conv3d_bn_relu_fold_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* ws = src.data_ptr<scalar_t>();
      scalar_t* wd = w.data_ptr<scalar_t>();
      scalar_t* bd = b.data_ptr<scalar_t>();
      const acc_t *gp = g.data_ptr<acc_t>(), *bp = beta.data_ptr<acc_t>();
      const acc_t *mp = rm.data_ptr<acc_t>(), *vp = rv.data_ptr<acc_t>();
      const acc_t* cp = has_bias ? cb.data_ptr<acc_t>() : nullptr;
      // Parallel over output channels, each block written in order (the transposed read is strided, the
      // store contiguous): a serial, store-strided loop took 18-30 ms of every eval call on one 512x512x3x3x3
      // weight on a 2-core CPU, two to three times the 2x7x7 convolution itself; this one 4-9 ms.
      const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(per, 1));
      at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const acc_t scale = gp[c] / std::sqrt(vp[c] + static_cast<acc_t>(eps));
          const acc_t centred = (cp ? cp[c] : acc_t(0)) - mp[c];
          bd[c] = static_cast<scalar_t>(centred * scale + bp[c]);
          const scalar_t* sb = ws + c * per;
          scalar_t* db = wd + c * per;
          if (transpose) {  // sb[i * taps + t] -> db[t * cin + i]
            for (int64_t t = 0; t < taps; ++t) {
              const scalar_t* st = sb + t;
              scalar_t* dt = db + t * cin;
              for (int64_t i = 0; i < cin; ++i) {
                dt[i] = static_cast<scalar_t>(static_cast<acc_t>(st[i * taps]) * scale);
              }
            }
          } else {
            for (int64_t j = 0; j < per; ++j) db[j] = static_cast<scalar_t>(static_cast<acc_t>(sb[j]) * scale);
          }
        }
      });
    });
  }

  // relu(conv3d(x, w, b)). float32: oneDNN's convolution with the bias and ReLU as its post-op
  // (mkldnn::_convolution_pointwise, what inductor itself calls), so the output is written once.
  static at::Tensor eval_conv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const ConvArgs& a,
                              bool relu) {
    if (relu && x.scalar_type() == at::kFloat && at::hasMKLDNN()) {
      static const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_convolution_pointwise", ""});
      if (op.has_value()) {
        std::vector<c10::IValue> stack{x, w, b, a.padding.vec(), a.stride.vec(), a.dilation.vec(), a.groups,
                                       std::string("relu"), c10::List<std::optional<c10::Scalar>>(),
                                       c10::IValue()};
        op->callBoxed(&stack);
        return stack[0].toTensor();
      }
    }
    at::Tensor y = conv(x, w, b, a);
    return relu ? y.clamp_min_(0) : y;
  }
};

ConvArgs conv_args(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return {stride, padding, dilation, groups};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool training, double eps, bool relu,
    bool conv_channels_last) {
  check_forward_args(x, weight, bias, bn_weight, bn_bias, running_mean, running_var);
  const ConvArgs a = conv_args(stride, padding, dilation, groups);
  if (training) {
    return forward_train<CpuKernels>(x, weight, bn_weight, bn_bias, a, eps, relu, conv_channels_last);
  }
  TORCH_CHECK(running_mean.has_value() && running_var.has_value(),
              "conv3d_bn_relu: eval (training=False) needs running_mean and running_var");
  at::Tensor out = forward_eval<CpuKernels>(x, weight, bias, bn_weight, bn_bias, *running_mean, *running_var, a, eps,
                                            relu);
  const at::Tensor none = at::empty({0}, x.options());
  const at::Tensor none_acc = at::empty({0}, x.options().dtype(acc_type(x.scalar_type())));
  return {out, none, none_acc, none_acc.clone(), none_acc.clone(), none.clone()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
    bool need_grad_x, bool need_grad_weight) {
  check_backward_args(grad_out, x, weight, bn_weight, bn_bias, z, mean, invstd);
  return backward_train<CpuKernels>(grad_out, x, weight, bn_weight, bn_bias, z, mean, invstd,
                                    conv_args(stride, padding, dilation, groups), relu, need_grad_x,
                                    need_grad_weight);
}

}  // namespace
}  // namespace conv3d_bn_relu
}  // namespace mvfast

TORCH_LIBRARY_IMPL(mvfast, CPU, m) {
  m.impl("conv3d_bn_relu_fwd", &mvfast::conv3d_bn_relu::fwd_cpu);
  m.impl("conv3d_bn_relu_bwd", &mvfast::conv3d_bn_relu::bwd_cpu);
}
