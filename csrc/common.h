// Helpers shared by the CPU (.cpp) and CUDA (.cu) kernels.
//
// The per-element and per-row math of every op is written once, as MVFAST_HD functions, in the op's
// header (netvlad.h, ...). The CPU kernels call them directly and the CUDA kernels call them per thread,
// adding only the launch, the thread mapping and the reductions; so the CPU tests exercise the very
// formulas the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MVFAST_HD __host__ __device__ __forceinline__
#else
#define MVFAST_HD inline
#endif

namespace mvfast {

// exp and sqrt by overload, so templates over the accumulation type (float, or double for float64
// inputs) call the right one on the host and on the device.
MVFAST_HD float exp_(float x) { return ::expf(x); }
MVFAST_HD double exp_(double x) { return ::exp(x); }
MVFAST_HD float sqrt_(float x) { return ::sqrtf(x); }
MVFAST_HD double sqrt_(double x) { return ::sqrt(x); }

// F.normalize's eps: v / max(||v||, eps).
constexpr double kNormEps = 1e-12;

// 1 / max(||v||, eps) from the squared norm, as F.normalize computes it.
template <typename acc_t>
MVFAST_HD acc_t inv_clamped_norm(acc_t sumsq) {
  const acc_t n = sqrt_(sumsq);
  const acc_t eps = static_cast<acc_t>(kNormEps);
  return acc_t(1) / (n > eps ? n : eps);
}

// True when ||v|| is below eps, where F.normalize divides by the constant eps instead of the norm.
template <typename acc_t>
MVFAST_HD bool norm_is_clamped(acc_t sumsq) {
  return !(sqrt_(sumsq) > static_cast<acc_t>(kNormEps));
}

// Backward of y = v / max(||v||, eps) for one element, given dy, y, (y . dy) over the normalised vector
// and inv = 1 / max(||v||, eps): (dy - y (y . dy)) / ||v||, or dy / eps where the norm was clamped.
template <typename acc_t>
MVFAST_HD acc_t normalize_backward(acc_t dy, acc_t y, acc_t y_dot_dy, acc_t inv, bool clamped) {
  return clamped ? dy * inv : (dy - y * y_dot_dy) * inv;
}

// Softmax backward for one element: a (g - sum_j a_j g_j).
template <typename acc_t>
MVFAST_HD acc_t softmax_backward(acc_t a, acc_t g, acc_t a_dot_g) {
  return a * (g - a_dot_g);
}

}  // namespace mvfast
