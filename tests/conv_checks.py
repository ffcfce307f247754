"""Checks shared by the fused Conv+BN+ReLU tests (2D and 3D): gradients of a result, a grad_out kept off
the ReLU's kink, and the comparison of a kernel's results against float64 with PyTorch's own error in the
same dtype as the yardstick."""

import contextlib

import torch


def grads(y, leaves, gy=None):
    """Gradients of y (with grad_out gy, random by default) for the leaves that are not None."""
    if gy is None:
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    live = [t for t in leaves if t is not None]
    return list(torch.autograd.grad(y, live, gy.to(y)))


def off_the_kink(pre, dtype):
    """A random float64 grad_out shaped like the float64 pre-activation ``pre``, zero where ``pre`` lies
    within the dtype's rounding of 0: there the ReLU mask of any low-precision computation may go either
    way, and the gradient with it, so the comparison would measure a coin toss rather than the kernel."""
    gy = torch.randn(pre.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype] * pre.abs().max()
    return gy.masked_fill(pre.abs() < tol, 0.0)


def check_close(got, ref64, lowp, dtype, names):
    """Each result's error against float64 at most about twice PyTorch's own in that dtype."""
    floor = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    for name, g, r, l in zip(names, got, ref64, lowp, strict=True):
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}, expected {dtype}"
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        err = (g.double().cpu() - r).abs().max().item()
        base = (l.double().cpu() - r).abs().max().item()
        scale = r.abs().max().item()
        assert err <= 2 * base + floor * max(scale, 1.0), (
            f"{name}: error {err:.3g} vs PyTorch's own {base:.3g} in {dtype} (scale {scale:.3g})"
        )


def names_for(bias):
    """Names of [out, grads...] as run() returns them, with or without the conv bias."""
    return (
        ["out", "grad_x", "grad_weight"]
        + (["grad_bias"] if bias else [])
        + ["grad_bn_weight", "grad_bn_bias"]
    )


@contextlib.contextmanager
def exact_float32():
    """No TF32 in float32 convolutions and matmuls, in eager PyTorch and in the kernels alike (the Triton
    conv follows cudnn.allow_tf32, its products torch's matmul precision): for comparisons with the module
    chain whose tolerances are tighter than TF32's 1e-3. A no-op on the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved[0]
        torch.set_float32_matmul_precision(saved[1])
