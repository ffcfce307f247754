// Vectorised loops shared by the CPU kernels (at::vec: AVX2/AVX-512 where the build enables it).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace mvfast {
namespace cpu {

using at::vec::Vectorized;

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
