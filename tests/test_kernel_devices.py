"""The raw kernel ops (torch.ops.mvfast.*_fwd / *_bwd) check that every tensor argument is on x's device,
and name the argument, the device expected and the device given (issue 12, section 2).

The dispatcher picks a kernel from the devices of all the arguments together, so without the check a CPU
mask reaches a CUDA kernel as a host pointer. Here, without a GPU, the CPU kernels are called directly
(redispatched to the CPU key) with one argument moved to the meta device; the CUDA kernels run the same
check, from the same header (csrc/checks.h), before their device guard.
"""

import pytest
import torch

from mvfast import _ext

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="mvfast._C is not built")

CPU_KERNEL = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def _netvlad_args():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g)
    w, b, c = torch.randn(4, 8, generator=g), torch.randn(4, generator=g), torch.randn(3, 8, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    fwd = [x, w, b, c, mask, 1, True]
    out, assign, vlad = torch.ops.mvfast.netvlad_fwd(*fwd)
    bwd = [torch.randn_like(out), x, w, c, assign, vlad, mask, 1, True]
    return fwd, bwd


def _attention_args():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 8, generator=g), torch.randn(2, 8, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    fwd = [x, w, mask, True]
    out, weights, lse = torch.ops.mvfast.attention_pool_fwd(*fwd)
    bwd = [torch.randn_like(out), torch.randn_like(weights), x, w, mask, out, lse, weights]
    return fwd, bwd


def _conv_args():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 4, 5, 5, generator=g), torch.randn(4, 3, 3, 3, 3, generator=g)
    bn = [torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g), torch.zeros(4), torch.ones(4)]
    conv = [[1, 1, 1], [1, 1, 1], [1, 1, 1], 1]
    fwd = [x, w, torch.randn(4, generator=g), *bn, *conv, True, 1e-5, True, False]
    out, z, mean, invstd, _var, _x_conv = torch.ops.mvfast.conv3d_bn_relu_fwd(*fwd)
    bwd = [torch.randn_like(out), x, w, bn[0], bn[1], z, mean, invstd, *conv, True, True, True]
    return fwd, bwd


# (op, which arguments (forward or backward), reference argument, [(position, name), ...])
CASES = [
    ("netvlad_fwd", _netvlad_args, 0, "x", [(1, "weight"), (2, "bias"), (3, "centroids"), (4, "mask")]),
    (
        "netvlad_bwd",
        _netvlad_args,
        1,
        "x",
        [(0, "grad_out"), (2, "weight"), (3, "centroids"), (4, "assign"), (5, "vlad"), (6, "mask")],
    ),
    ("attention_pool_fwd", _attention_args, 0, "x", [(1, "weight"), (2, "mask")]),
    (
        "attention_pool_bwd",
        _attention_args,
        1,
        "x",
        [
            (0, "grad_out"),
            (1, "grad_weights"),
            (3, "weight"),
            (4, "mask"),
            (5, "out"),
            (6, "lse"),
            (7, "weights"),
        ],
    ),
    (
        "conv3d_bn_relu_fwd",
        _conv_args,
        0,
        "x",
        [
            (1, "weight"),
            (2, "bias"),
            (3, "bn_weight"),
            (4, "bn_bias"),
            (5, "running_mean"),
            (6, "running_var"),
        ],
    ),
    (
        "conv3d_bn_relu_bwd",
        _conv_args,
        1,
        "z",
        [
            (0, "grad_out"),
            (1, "x"),
            (2, "weight"),
            (3, "bn_weight"),
            (4, "bn_bias"),
            (6, "mean"),
            (7, "invstd"),
        ],
    ),
]
PARAMS = [
    pytest.param(op, make, which, ref, pos, name, id=f"{op}-{name}")
    for op, make, which, ref, args in CASES
    for pos, name in args
]


@pytest.mark.parametrize("op, make, which, ref, pos, name", PARAMS)
def test_cpu_kernel_rejects_an_argument_on_another_device(op, make, which, ref, pos, name):
    args = make()[which]
    kernel = getattr(torch.ops.mvfast, op).default
    kernel.redispatch(CPU_KERNEL, *args)  # the arguments as given are fine
    args[pos] = args[pos].to("meta")
    with pytest.raises(
        RuntimeError, match=rf"{op}: {name} must be on {ref}'s device cpu, got a tensor on meta"
    ):
        kernel.redispatch(CPU_KERNEL, *args)


@pytest.mark.parametrize(
    "op, make, mask_at",
    [("netvlad_fwd", _netvlad_args, 4), ("attention_pool_fwd", _attention_args, 2)],
    ids=["netvlad", "attention"],
)
def test_a_cpu_mask_is_named_when_x_is_elsewhere(op, make, mask_at):
    """The case of a CPU mask given to a CUDA kernel, with meta in the role of the GPU: x and the rest on
    meta, the mask on the CPU, the CPU kernel called."""
    args = [
        a.to("meta") if isinstance(a, torch.Tensor) and i != mask_at else a for i, a in enumerate(make()[0])
    ]
    kernel = getattr(torch.ops.mvfast, op).default
    with pytest.raises(RuntimeError, match=rf"{op}: mask must be on x's device meta, got a tensor on cpu"):
        kernel.redispatch(CPU_KERNEL, *args)
