// Schemas of every compiled mvfast op, in one place. The CPU kernels (csrc/cpu/) and the CUDA kernels
// (csrc/cuda/) each add their implementations with TORCH_LIBRARY_IMPL; autograd and fake (meta)
// kernels are registered from Python (mvfast/ops/), as in pytorch/extension-cpp.
//
// These are the raw kernels without autograd. The public ops (mvfast::netvlad, ...) are Python custom
// ops that pick a backend and call these.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mvfast, m) {
  // netvlad (see mvfast/ops/netvlad.py). Returns (out, assign, vlad):
  //   out    (B, K*D) normalised or (B, K, D), in x's dtype
  //   assign (B, M, K+G) float32 soft assignment (0 on masked rows), saved for backward
  //   vlad   (B, K, D) float32 aggregated residuals before normalisation, saved for backward
  m.def(
      "netvlad_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor centroids, Tensor? mask, "
      "int ghost_clusters, bool normalize) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_bias, grad_centroids); grad_bias has shape (K+G,). mask is the
  // forward's: the products of the backward read x too, and must not read its masked rows.
  m.def(
      "netvlad_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor centroids, Tensor assign, "
      "Tensor vlad, Tensor? mask, int ghost_clusters, bool normalize) -> (Tensor, Tensor, Tensor, Tensor)");

  // attention_pool (see mvfast/ops/attention_pool.py). Returns (out, weights, lse):
  //   out     (B, H, D) in x's dtype
  //   weights (B, L, H) in x's dtype when return_weights, else an empty tensor
  //   lse     (B, H) float32 log-sum-exp of the valid scores (+inf where none is), saved for backward
  m.def("attention_pool_fwd(Tensor x, Tensor weight, Tensor? mask, bool return_weights) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight). grad_weights and weights are given when the weights were an output.
  m.def(
      "attention_pool_bwd(Tensor grad_out, Tensor? grad_weights, Tensor x, Tensor weight, Tensor? mask, "
      "Tensor out, Tensor lse, Tensor? weights) -> (Tensor, Tensor)");

  // conv3d_bn_relu (see mvfast/ops/conv3d_bn_relu.py). Returns (out, z, mean, invstd, var, x_conv):
  //   out     relu(batch_norm(conv3d(x))) in x's dtype and memory format
  //   z       training: conv3d(x, weight) without the bias, in the conv's layout (channels_last_3d when
  //           conv_channels_last, else NCDHW), saved for backward; eval: empty
  //   mean, invstd, var  training: (C,) float32 (float64 for float64 x) batch mean, 1/sqrt(biased var + eps)
  //           and unbiased variance (for the running update); eval: empty
  //   x_conv  training: x converted to the conv's layout when it was not in it (saved for backward instead
  //           of x); empty otherwise
  // The running statistics are inputs only: their in-place update is done by the caller from mean and var.
  m.def(
      "conv3d_bn_relu_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor bn_weight, Tensor bn_bias, "
      "Tensor? running_mean, Tensor? running_var, int[] stride, int[] padding, int[] dilation, int groups, "
      "bool training, float eps, bool relu, bool conv_channels_last) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Training backward. Returns (grad_x, grad_weight, grad_bn_weight, grad_bn_bias); grad_x and grad_weight
  // are empty unless asked for. x is what the conv read (x_conv when the forward made one).
  m.def(
      "conv3d_bn_relu_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
      "Tensor z, Tensor mean, Tensor invstd, int[] stride, int[] padding, int[] dilation, int groups, "
      "bool relu, bool need_grad_x, bool need_grad_weight) -> (Tensor, Tensor, Tensor, Tensor)");
}

#ifndef MVFAST_CUDA_VERSION
#define MVFAST_CUDA_VERSION ""
#endif
#ifndef MVFAST_CUDA_ARCHS
#define MVFAST_CUDA_ARCHS ""
#endif

// `import mvfast._C` loads this library, which runs the registrations above. No Python bindings: the
// module only carries what the build compiled.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "CUDA_VERSION", MVFAST_CUDA_VERSION);
  PyModule_AddStringConstant(m, "CUDA_ARCHS", MVFAST_CUDA_ARCHS);
  return m;
}
