// Vectorised loops shared by the CPU kernels (at::vec: AVX2/AVX-512 where the build enables it).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// at::empty for a large output that a kernel writes once, on transparent huge pages where the kernel
// offers them on request (THP "madvise", the common default). A fresh allocation of tens of MB is backed
// page by page as it is first written: at 4 KB a page, the faults cost more than the kernel's own pass
// (39 MB, the attention and NetVLAD grad_x at their benchmark shapes: about 8 ms of faults on the
// development machine against 2 ms on 2 MB pages). The advice covers the 2 MB-aligned interior of the
// block before anything touches it; where huge pages are off or unavailable it changes nothing.
inline at::Tensor empty_for_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.nbytes();
  if (bytes >= 4 * kHuge) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + bytes) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice: failure is harmless
  }
#endif
  return t;
}

}  // namespace cpu
}  // namespace mvfast
