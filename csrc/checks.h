// Argument checks shared by every kernel op, CPU and CUDA (host code only).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>

namespace mvfast {

// A tensor argument and its name in the op's schema. An absent optional or an undefined tensor is
// skipped by the checks.
struct NamedTensor {
  const char* name;
  const at::Tensor* tensor;
  NamedTensor(const char* n, const at::Tensor& t) : name(n), tensor(&t) {}
  NamedTensor(const char* n, const std::optional<at::Tensor>& t) : name(n), tensor(t.has_value() ? &*t : nullptr) {}
};

// Every tensor argument of op on x's device. The dispatcher picks the kernel from the devices of all the
// arguments together, so without this a CPU mask reaches a CUDA kernel as a host pointer, a tensor on
// cuda:1 is read by a launch on cuda:0, and a meta tensor reaches a CPU kernel without storage.
inline void check_same_device(const char* op, const NamedTensor& x, std::initializer_list<NamedTensor> args) {
  const at::Device device = x.tensor->device();
  for (const NamedTensor& a : args) {
    if (a.tensor == nullptr || !a.tensor->defined()) continue;
    TORCH_CHECK(a.tensor->device() == device, op, ": ", a.name, " must be on ", x.name, "'s device ", device,
                ", got a tensor on ", a.tensor->device());
  }
}

}  // namespace mvfast
