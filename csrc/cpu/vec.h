// Vectorised loops shared by the CPU kernels (at::vec: AVX2/AVX-512 where the build enables it).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace mvfast {
namespace cpu {

using at::vec::Vectorized;

// Grain for at::parallel_for over items of about `work` operations each: at least ~32k operations per
// chunk, as ATen's own kernels use. A loop with less work in all runs on the calling thread, because a
// parallel region costs microseconds, and far more when the other threads are descheduled on a loaded
// machine (a small NetVLAD took 8-76 ms instead of 0.2 ms with a grain of one item).
inline int64_t grain_for(int64_t work) {
  constexpr int64_t kMinWork = 32768;
  return work >= kMinWork ? 1 : kMinWork / (work > 0 ? work : 1);
}

// Sum of the lanes of v.
template <typename T>
T hsum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& p, Vectorized<T>& q) { return p + q; }, v);
}

// a . b over n elements (two accumulators to hide the FMA latency).
template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  using Vec = Vectorized<T>;
  Vec acc0(T(0)), acc1(T(0));
  int64_t d = 0;
  for (; d + 2 * Vec::size() <= n; d += 2 * Vec::size()) {
    acc0 = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + d + Vec::size()), Vec::loadu(b + d + Vec::size()), acc1);
  }
  T s = hsum(acc0 + acc1);
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

}  // namespace cpu
}  // namespace mvfast
