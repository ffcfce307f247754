"""The Triton kernels' own concerns, on the interpreter (CPU) or a GPU: launches under the tensors' device,
launch plans that follow the precision flags, the plans' less common branches (the rows of dW split
across programs, the two-level BN statistics, K+G up to 512, the conv's row tiles), a strided NetVLAD
bias, and a grad_out whose spatial dimensions do not flatten. Every result is checked against the
float64 reference, without TF32 on a GPU."""

import collections
import contextlib
import dataclasses
import importlib

import pytest
import torch
from backend_params import kernel_backends
from conv_checks import check_close as conv_check_close
from conv_checks import exact_float32, grads, names_for

import mvfast
from mvfast.ops import _triton

# the modules (mvfast.ops' attributes of these names are the functions)
nv_module = importlib.import_module("mvfast.ops.netvlad")
ap_module = importlib.import_module("mvfast.ops.attention_pool")
cbr_module = importlib.import_module("mvfast.ops.conv3d_bn_relu")

TRITON = [p for p in kernel_backends() if p.id == "triton"]
CL = torch.channels_last_3d


@pytest.fixture(autouse=True)
def _exact_float32():
    """These tests check tiling and indexing to float32's precision against float64: no TF32 on a GPU."""
    with exact_float32():
        yield


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in ts]


def _up(ts):
    return [t.detach().double().cpu().requires_grad_() if t is not None else None for t in ts]


def _netvlad_grads(backend, x, w, b, c, mask, G, normalize=True, seed=1):
    with mvfast.backend(backend):
        y = mvfast.ops.netvlad(x, w, b, c, mask, ghost_clusters=G, normalize=normalize)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    live = [t for t in (x, w, b, c) if t is not None]
    return [y, *torch.autograd.grad(y, live, gy.to(y))]


def _assert_matches_float64(got, want, what, rtol=1e-4, atol=1e-5):
    for name, g, r in zip(what, got, want, strict=True):
        torch.testing.assert_close(
            g.double().cpu(), r, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


@contextlib.contextmanager
def _gpu_like(monkeypatch, sms):
    """Plan for a GPU of ``sms`` SMs on the interpreter too, so that the branches a big GPU takes (more
    programs than the tiles give) run on the CPU."""
    monkeypatch.setattr(_triton, "INTERPRETER", _triton.Target(80, sms))
    yield


# ---------------------------------------------------------------------------------------------------
# Device


def test_device_guard_makes_the_tensors_gpu_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    with _triton.device_guard(torch.device("cuda", 1)):
        pass
    with _triton.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


def _run_all_ops(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 12, generator=g).to(device).requires_grad_()
    w = torch.randn(5, 12, generator=g).to(device).requires_grad_()
    c = torch.randn(4, 12, generator=g).to(device).requires_grad_()
    y = mvfast.ops.netvlad(x, w, None, c, ghost_clusters=1)
    out, a = mvfast.ops.attention_pool(x, w[:2], return_weights=True)
    (y.sum() + out.sum() + a.sum()).backward()
    xc = torch.randn(2, 3, 2, 4, 5, generator=g).to(device).requires_grad_()
    wc = torch.randn(4, 3, 3, 3, 3, generator=g).to(device).requires_grad_()
    gamma, beta = torch.ones(4, device=device), torch.zeros(4, device=device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    mvfast.ops.conv3d_bn_relu(xc, wc, None, gamma, beta, rm, rv, padding=1, training=True).sum().backward()
    with torch.no_grad():
        mvfast.ops.conv3d_bn_relu(xc, wc, None, gamma, beta, rm, rv, padding=1)


@pytest.mark.parametrize("backend", TRITON)
def test_every_launch_runs_under_the_tensors_device(backend, monkeypatch):
    """Each launch of every op, forward and backward, train and eval, enters device_guard with the
    tensors' device and runs its kernel inside it."""
    _, device = backend
    current, seen = [], []

    @contextlib.contextmanager
    def guard(dev):
        current.append(dev)
        try:
            yield
        finally:
            current.pop()

    def watch(kernel):
        class Watched:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    seen.append((_triton._fn(kernel).__name__, current[-1] if current else None))
                    return kernel[grid](*args, **kwargs)

                return run

        return Watched()

    monkeypatch.setattr(_triton, "device_guard", guard)
    launch_call = _triton.Launch.__call__

    def call(self, dev, *args):
        return launch_call(dataclasses.replace(self, kernel=watch(self.kernel)), dev, *args)

    monkeypatch.setattr(_triton.Launch, "__call__", call)
    with mvfast.backend("triton"):
        _run_all_ops(device)
    kernels = {name for name, _ in seen}
    assert {"_nv_assign_kernel", "_nv_dw_kernel", "_ap_forward_kernel", "_ap_backward_kernel"} <= kernels
    assert {"_cbr_conv_kernel", "_cbr_stats_kernel", "_cbr_backward_kernel"} <= kernels
    want = torch.device(device) if device == "cpu" else torch.device("cuda", torch.cuda.current_device())
    assert all(d == want for _, d in seen), seen


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_kernels_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    x, w, c = (
        torch.randn(3, 9, 16, generator=g),
        torch.randn(6, 16, generator=g),
        torch.randn(5, 16, generator=g),
    )
    want = nv_module.netvlad_reference(x.double(), w.double(), None, c.double(), None, 1)
    with mvfast.backend("triton"):
        got = mvfast.ops.netvlad(x.to("cuda:1"), w.to("cuda:1"), None, c.to("cuda:1"), ghost_clusters=1)
        torch.cuda.synchronize(1)
    assert got.device == torch.device("cuda", 1)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Precision follows PyTorch's flags


def _recorded_prec(fn, *args):
    with _triton.recording(_triton.Target(90, 132)) as rec:
        fn(*args)
    return {launch.constexprs["PREC"] for launch, _ in rec if "PREC" in launch.constexprs}


@pytest.fixture
def _restore_precision():
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


@pytest.mark.usefixtures("_restore_precision")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_products_follow_matmul_precision_and_conv_follows_cudnn(dtype):
    meta = dict(device="meta", dtype=dtype)
    x, w, c = torch.empty(2, 300, 64, **meta), torch.empty(8, 64, **meta), torch.empty(8, 64, **meta)
    xc, wc = torch.empty(2, 16, 4, 8, 8, **meta), torch.empty(16, 16, 3, 3, 3, **meta)
    bn = [torch.empty(16, device="meta") for _ in range(4)]
    conv = ([1] * 3, [1] * 3, [1] * 3, 1, False, 1e-5, True)
    for matmul, cudnn in (("highest", True), ("high", False), ("medium", True), ("highest", False)):
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn
        exact_mm = dtype == torch.float32 and matmul == "highest"
        exact_conv = dtype == torch.float32 and not cudnn
        mm = {"ieee"} if exact_mm else {"tf32"}
        assert _recorded_prec(nv_module._triton_forward, x, w, None, c, None, 0, True) == mm
        assert _recorded_prec(ap_module._triton_forward, x, w, None, False) == mm
        got = _recorded_prec(cbr_module._triton_forward, xc, wc, None, *bn, *conv)
        assert got == ({"ieee"} if exact_conv else {"tf32"})


def test_precision_helpers_name_what_tl_dot_takes(_restore_precision):
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = True
    assert _triton.matmul_precision(torch.float32) == "ieee"
    assert _triton.conv_precision(torch.float32) == "tf32"
    assert _triton.matmul_precision(torch.bfloat16) == _triton.conv_precision(torch.float16) == "tf32"


# ---------------------------------------------------------------------------------------------------
# NetVLAD


@pytest.mark.parametrize("backend", TRITON)
def test_netvlad_strided_bias(backend):
    """A bias that is a strided view (every other element of a buffer) gives the logits of its values."""
    _, device = backend
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 16, generator=g).to(device)
    w = (torch.randn(7, 16, generator=g) * 0.3).to(device)
    b = (torch.randn(14, generator=g) * 2).to(device)[::2]
    c = torch.randn(5, 16, generator=g).to(device)
    assert b.stride() == (2,)
    leaves = _leaves(x, w, b, c)
    got = _netvlad_grads("triton", *leaves, None, 2)
    want = _netvlad_grads("reference", *_up(leaves), None, 2)
    _assert_matches_float64(got, want, ["out", "grad_x", "grad_weight", "grad_bias", "grad_centroids"])


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("normalize", [True, False])
def test_netvlad_dw_rows_split_across_programs(backend, normalize, monkeypatch):
    """On a GPU of many SMs the B*M rows of dW = dS^T x are cut into splits whose partial sums are added:
    the result is the same, masks and all."""
    _, device = backend
    g = torch.Generator().manual_seed(1)
    B, M, D, K, G = 3, 70, 20, 5, 2
    x = torch.randn(B, M, D, generator=g).to(device)
    x[0, 60:] = float("nan")  # masked below
    w, b, c = (
        torch.randn(K + G, D, generator=g) * 0.3,
        torch.randn(K + G, generator=g),
        torch.randn(K, D, generator=g),
    )
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[0, 60:] = False
    mask[2, 1::3] = False
    with _gpu_like(monkeypatch, 64):
        plan = nv_module.triton_plan(B, M, D, K, G, torch.float32, normalize, _triton.INTERPRETER, "ieee")
        assert plan["dw"].grid[2] > 1, "the test needs a plan that splits the rows"
        leaves = _leaves(x, *(t.to(device) for t in (w, b, c)))
        got = _netvlad_grads("triton", *leaves, mask.to(device), G, normalize)
    clean = x.masked_fill(~mask.to(device).unsqueeze(-1), 0.0)
    want = _netvlad_grads("reference", *_up([clean, w, b, c]), mask, G, normalize)
    _assert_matches_float64(got, want, ["out", "grad_x", "grad_weight", "grad_bias", "grad_centroids"])


@pytest.mark.parametrize("backend", TRITON)
def test_netvlad_512_clusters(backend):
    """K+G = 512, the most the row kernels hold: forward and gradients against float64; 513 goes to
    another backend under auto and is refused by triton."""
    _, device = backend
    g = torch.Generator().manual_seed(2)
    B, M, D, K, G = 2, 18, 16, 500, 12
    x = torch.randn(B, M, D, generator=g).to(device)
    w = (torch.randn(K + G, D, generator=g) * 0.3).to(device)
    b = torch.randn(K + G, generator=g).to(device)
    c = torch.randn(K, D, generator=g).to(device)
    leaves = _leaves(x, w, b, c)
    got = _netvlad_grads("triton", *leaves, None, G)
    want = _netvlad_grads("reference", *_up(leaves), None, G)
    _assert_matches_float64(got, want, ["out", "grad_x", "grad_weight", "grad_bias", "grad_centroids"])
    w513, b513 = torch.randn(K + G + 1, D).to(device), torch.randn(K + G + 1).to(device)
    with mvfast.backend("triton"), pytest.raises(RuntimeError, match=r"K\+G <= 512 .* 513"):
        mvfast.ops.netvlad(x, w513, b513, c, ghost_clusters=G + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_netvlad_row_tiles_shrink_to_the_arch(dtype):
    """The row kernels pick their D chunk and pipeline depth for the arch: at K+G = 512 the 99 KB parts
    get smaller ones than sm_90 (the compile check measures that both fit)."""
    tiles = {}
    for arch in (86, 90):
        plan = nv_module.triton_plan(32, 300, 1024, 500, 12, dtype, True, _triton.Target(arch, 100), "tf32")
        tiles[arch] = [
            (plan[k].constexprs["BLOCK_D"], plan[k].num_stages) for k in ("assign", "assign_backward")
        ]
    for (d86, s86), (d90, s90) in zip(tiles[86], tiles[90], strict=True):
        assert d86 * s86 < d90 * s90, tiles


# ---------------------------------------------------------------------------------------------------
# Grid limits: CUDA launches at most 2**31 - 1 programs along grid axis 0 and 65535 along axes 1 and 2;
# the interpreter has no limit. The plans are made without tensors, so the largest shapes cost nothing.

_BIG_TARGETS = (_triton.Target(80, 108), _triton.Target(90, 132))


def _oversized(plan) -> list:
    return [(name, launch.grid) for name, launch in plan.items() if not _triton.grid_fits(launch.grid)]


@pytest.mark.parametrize("target", _BIG_TARGETS, ids=lambda t: f"sm_{t.arch}")
def test_grids_fit_at_the_largest_shapes(target):
    """Every launch of every plan fits CUDA's grid at the largest shapes the models meet and beyond:
    NetVLAD up to the batch its reasons let through (B = 65535), M 1024, D 4096, K+G 512; attention B and
    L up to 2**20 (B is axis 0), D 2048, H 4; conv batch 64-128 of 64 channels at 16x112x112, the stem,
    and the batch-statistics kernels' 65535 samples."""
    for dtype, prec in ((torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, "tf32")):
        for B in (1, 256, nv_module.MAX_B):
            for M, D, K, G in (
                (1, 4096, 64, 0),
                (1024, 4096, 64, 0),
                (1024, 4096, 500, 12),
                (300, 128, 16, 0),
            ):
                for normalize in (True, False):
                    plan = nv_module.triton_plan(B, M, D, K, G, dtype, normalize, target, prec)
                    assert not _oversized(plan), (B, M, D, K, G, _oversized(plan))
        for B in (1, 4096, 2**20):
            for L in (1, 300, 4096, 2**20):
                for D, H in ((2048, 4), (96, 1)):
                    plan = ap_module.triton_plan(B, L, D, H, dtype, target, prec)
                    assert not _oversized(plan), (B, L, D, H, _oversized(plan))
        for N, cin, C, size in ((64, 64, 64, (16, 112, 112)), (128, 64, 64, (16, 112, 112)),
                                (64, 3, 64, (16, 112, 112)), (65535, 64, 64, (1, 7, 7))):  # fmt: skip
            out = (N, C, *size)  # padding 1 keeps the size
            for training in (True, False):
                plan = cbr_module.triton_plan(
                    (N, cin, *size), (C, cin, 3, 3, 3), out, 1, dtype, training, target, prec
                )
                assert not _oversized(plan), (N, cin, C, size, training, _oversized(plan))


def test_netvlad_batch_limit_is_the_grid_limit():
    """One sample more than NetVLAD's reasons allow would not fit the grid: the limit is the plan's."""
    plan = nv_module.triton_plan(
        nv_module.MAX_B + 1, 300, 1024, 64, 0, torch.float32, True, _BIG_TARGETS[1], "ieee"
    )
    assert _oversized(plan)


@pytest.mark.parametrize("backend", TRITON)
def test_batches_beyond_the_grid_go_to_another_backend(backend):
    """A NetVLAD batch of 65536 samples, a training conv of 65536 samples and a conv of 65536 groups are
    refused by triton with the reason (CUDA cannot launch their grids; auto takes the next backend), one
    fewer is not."""
    _, device = backend
    x = torch.randn(65536, 1, 16, device=device)
    w, c = torch.randn(3, 16, device=device), torch.randn(3, 16, device=device)
    with mvfast.backend("triton"), pytest.raises(RuntimeError, match="at most 65535 programs .* B is 65536"):
        mvfast.ops.netvlad(x, w, None, c)
    assert nv_module._op_reasons("triton", x[1:], w) == []

    xc, wc = torch.randn(65536, 1, 1, 1, 1, device=device), torch.randn(1, 1, 1, 1, 1, device=device)
    ones, zeros = torch.ones(1, device=device), torch.zeros(1, device=device)
    with mvfast.backend("triton"), pytest.raises(RuntimeError, match="at most 65535 samples .* N is 65536"):
        mvfast.ops.conv3d_bn_relu(xc, wc, None, ones, zeros, zeros.clone(), ones.clone(), training=True)
    xg = torch.randn(1, 65536, 1, 1, 1, device=device)
    wg = torch.randn(65536, 1, 1, 1, 1, device=device)
    g1, g0 = torch.ones(65536, device=device), torch.zeros(65536, device=device)
    with (
        mvfast.backend("triton"),
        pytest.raises(RuntimeError, match="at most 65535 groups .* groups is 65536"),
    ):
        mvfast.ops.conv3d_bn_relu(xg, wg, None, g1, g0, g0.clone(), g1.clone(), groups=65536)
    conv_bn = importlib.import_module("mvfast.ops._conv_bn")
    bn = conv_bn.BN(ones, zeros, None, None, True, 0.1, 1e-5, None)
    assert conv_bn.op_reasons("triton", xc[1:], wc, conv_bn.Conv([1] * 3, [0] * 3, [1] * 3, 65535), bn) == []


@pytest.mark.parametrize("backend", TRITON)
def test_features_and_channels_beyond_the_grid_go_to_another_backend(backend):
    """The grid axis of D's tiles (NetVLAD's aggregate, dx and dw kernels) and of the output channels'
    tiles (every conv kernel) holds at most 65535 programs: D or out_channels past 65535 tiles are refused
    by triton with the reason; one fewer is not."""
    _, device = backend
    most = 65535 * nv_module.D_TILE
    x, w = torch.randn(1, 1, most + 1, device=device), torch.randn(1, most + 1, device=device)
    with mvfast.backend("triton"), pytest.raises(RuntimeError, match=f"D <= {most}; D is {most + 1}"):
        mvfast.ops.netvlad(x, w, None, w)
    assert nv_module._op_reasons("triton", _meta(1, 1, most), _meta(1, most)) == []
    sm90 = _BIG_TARGETS[1]
    assert not _oversized(nv_module.triton_plan(1, 1, most, 1, 0, torch.float32, True, sm90, "ieee"))
    assert _oversized(nv_module.triton_plan(1, 1, most + 1, 1, 0, torch.float32, True, sm90, "ieee"))
    assert nv_module.MAX_KG * most < 2**31  # so the kernels' 32-bit offsets into weight stay in range

    conv_bn = importlib.import_module("mvfast.ops._conv_bn")
    most = 65535 * conv_bn.CHANNEL_TILE
    conv = conv_bn.Conv([1] * 3, [0] * 3, [1] * 3, 1)
    bn = conv_bn.BN(None, None, None, None, True, 0.1, 1e-5, None)
    x = _meta(2, 1, 1, 1, 1)
    reasons = conv_bn.op_reasons("triton", x, _meta(most + 1, 1, 1, 1, 1), conv, bn)
    assert reasons and f"out_channels <= {most}; it is {most + 1}" in reasons[0], reasons
    assert conv_bn.op_reasons("triton", x, _meta(most, 1, 1, 1, 1), conv, bn) == []
    for training in (True, False):
        args = ((2, 1, 1, 1, 1), (most, 1, 1, 1, 1), (2, most, 1, 1, 1), 1, torch.float32, training)
        assert not _oversized(cbr_module.triton_plan(*args, sm90, "ieee"))
        args = ((2, 1, 1, 1, 1), (most + 1, 1, 1, 1, 1), (2, most + 1, 1, 1, 1), 1, torch.float32, training)
        assert _oversized(cbr_module.triton_plan(*args, sm90, "ieee"))


# ---------------------------------------------------------------------------------------------------
# Specialisation: how many kernels the JIT compiles as the batch and the lengths change


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def test_kernels_compile_a_few_variants_over_batch_and_length():
    """The launches of forward and backward over B in 1..256 and M (L) in 1..1024, as Triton's JIT
    specialises them (integers equal to 1 and multiples of 16 included): a handful of compiled kernels
    each, not one per shape. NetVLAD's dW kernel made 31 while its split arguments were specialised."""
    variants = collections.defaultdict(set)
    target = _triton.Target(90, 132)
    for B in (1, 2, 3, 16, 33, 100, 256):
        for M in (1, 5, 16, 17, 32, 33, 64, 100, 300, 301, 1024):
            x, mask = _meta(B, M, 256), _meta(B, M, dtype=torch.bool)
            w, c = _meta(64, 256), _meta(64, 256)
            with _triton.recording(target) as recorded:
                out, assign, vlad = nv_module._triton_forward(x, w, _meta(64), c, mask, 0, True)
                nv_module._triton_backward(torch.empty_like(out), x, w, c, assign, vlad, 0, True)
                out, a, lse = ap_module._triton_forward(x, w[:1], mask, True)
                ap_module._triton_backward(
                    torch.empty_like(out), torch.empty_like(a), x, w[:1], mask, out, lse, a
                )
            for launch, args in recorded:
                sig, constexprs, attrs = _triton.specialization(launch, args)
                variants[launch.name].add(
                    (
                        tuple(sig.items()),
                        tuple(sorted((k, str(v)) for k, v in constexprs.items())),
                        str(attrs),
                    )
                )
    counts = {name: len(v) for name, v in variants.items()}
    assert {"_nv_dw_kernel", "_ap_combine_kernel"} <= counts.keys()
    assert max(counts.values()) <= 5, counts


# ---------------------------------------------------------------------------------------------------
# Offsets past int32: x as a view whose elements lie more than 2**31 apart

# (shape, strides) of x (B, M, D): a transposed (M, B, D) batch whose third row starts past 2**31, and a
# (D, B, M) one whose last features do
_FAR_APART = {
    "rows": ((2, 3, 16), (16, 2**30 + 32, 1)),
    "features": ((2, 3, 33), (3, 1, 2**26 + 8)),
}


def _far_apart(device, shape, strides, seed):
    """A float32 view of ``shape`` and ``strides`` into a buffer of more than 2**31 elements (8 GB, a
    GPU's memory; on the CPU only the view's pages are ever written, the rest is never committed),
    holding random values."""
    size = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    assert size > 2**31
    try:
        buf = torch.empty(size, device=device)
    except RuntimeError as e:  # out of memory (torch.OutOfMemoryError is one)
        pytest.skip(f"no room for a buffer of {size} float32 elements: {e}")
    x = buf.as_strided(shape, strides)
    x.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(x))
    return x.requires_grad_()


def _small(*shape, seed, scale=1.0, device="cpu"):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(device)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("far", list(_FAR_APART))
def test_netvlad_offsets_past_int32(backend, far):
    """x's rows (or features) more than 2**31 elements apart, as a sequence-first batch of a few GB
    gives: every kernel that reads x through its strides (the logits, the aggregation, x dV^T, dW)
    addresses it in int64; an int32 row * stride wraps and reads outside x (a crash or garbage)."""
    _, device = backend
    x = _far_apart(device, *_FAR_APART[far], seed=3)
    B, M, D = x.shape
    K, G = 4, 1
    w, b = _small(K + G, D, seed=4, scale=0.3, device=device), _small(K + G, seed=5, device=device)
    c = _small(K, D, seed=6, device=device)
    mask = torch.tensor([[True, True, True], [True, False, True]], device=device)
    leaves = [x, *(t.requires_grad_() for t in (w, b, c))]
    got = _netvlad_grads("triton", *leaves, mask, G)
    want = _netvlad_grads("reference", *_up(leaves), mask.cpu(), G)
    _assert_matches_float64(got, want, ["out", "grad_x", "grad_weight", "grad_bias", "grad_centroids"])


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("far", list(_FAR_APART))
def test_attention_offsets_past_int32(backend, far):
    """As for NetVLAD: the forward's two reads of x and the backward's, past 2**31 elements."""
    _, device = backend
    x = _far_apart(device, *_FAR_APART[far], seed=7)
    B, L, D = x.shape
    w = _small(2, D, seed=8, scale=0.5, device=device).requires_grad_()
    mask = torch.tensor([[True, False, True], [True, True, True]], device=device)
    gy = torch.randn(B, 2, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ga = torch.randn(B, L, 2, generator=torch.Generator().manual_seed(10), dtype=torch.float64)

    def run(backend, x, w, mask):
        with mvfast.backend(backend):
            out, a = mvfast.ops.attention_pool(x, w, mask=mask, return_weights=True)
        return [out, a, *torch.autograd.grad((out, a), (x, w), (gy.to(out), ga.to(a)))]

    got = run("triton", x, w, mask)
    want = run("reference", *_up([x, w]), mask.cpu())
    _assert_matches_float64(got, want, ["out", "weights", "grad_x", "grad_weight"])


# ---------------------------------------------------------------------------------------------------
# Conv3d + BN + ReLU


def _conv_case(device, *, N=2, Cin=3, C=4, size=(2, 3, 12), channels_last=False, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, Cin, *size, generator=g) + shift
    w = torch.randn(C, Cin, 3, 3, 3, generator=g) * (Cin * 27) ** -0.5
    gamma, beta = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g) * 0.3
    rm, rv = torch.randn(C, generator=g) * 0.2, torch.rand(C, generator=g) + 0.5
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    return [t.to(device) for t in (x, w, gamma, beta)], rm.to(device), rv.to(device)


def _conv_run(backend, leaves, rm, rv, training, gy, **kw):
    x, w, gamma, beta = leaves
    with mvfast.backend(backend):
        y = mvfast.ops.conv3d_bn_relu(x, w, None, gamma, beta, rm, rv, padding=1, training=training, **kw)
    return [y, *grads(y, [x, w, gamma, beta], gy)]


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("W", [5, 12, 33], ids=["W5", "W12", "W33"])
@pytest.mark.parametrize("layout", ["ncdhw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_row_tiles(backend, W, layout, training):
    """Output rows are tiles of (BLOCK_H, BLOCK_W) positions of a plane, BLOCK_W 8, 16 or 32 by the
    width, with ragged edges in both directions: every output and gradient against float64."""
    _, device = backend
    leaves, rm, rv = _conv_case(device, size=(2, 3, W), channels_last=layout == "channels_last", seed=W)
    cx = cbr_module.triton_plan(
        tuple(leaves[0].shape), (4, 3, 3, 3, 3), (2, 4, 2, 3, W), 1, torch.float32, training,
        _triton.INTERPRETER, "ieee",
    )["conv"].constexprs  # fmt: skip
    assert cx["BLOCK_W"] == {5: 8, 12: 16, 33: 32}[W]
    leaves = _leaves(*leaves)
    gy = torch.randn(2, 4, 2, 3, W, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = _conv_run("triton", leaves, rm.clone(), rv.clone(), training, gy)
    want = _conv_run("reference", _up(leaves), rm.double().cpu(), rv.double().cpu(), training, gy)
    _assert_matches_float64(got, want, names_for(False), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", TRITON)
def test_conv_statistics_in_two_levels(backend, monkeypatch):
    """With more tiles than one program should walk, the per-tile statistics are combined into partials
    and the partials into one (Chan's formula): the batch mean and variance as float64 computes them, for
    z around 1e3 (where E[z^2] - E[z]^2 would lose them)."""
    _, device = backend
    leaves, rm, rv = _conv_case(device, N=3, Cin=2, C=3, size=(6, 16, 24), shift=1e3)
    x, w, gamma, beta = leaves
    w = torch.eye(3, 2, device=device).view(3, 2, 1, 1, 1)  # z = x on two channels, 0 on the third
    with _gpu_like(monkeypatch, 64):
        plan = cbr_module.triton_plan(
            tuple(x.shape),
            tuple(w.shape),
            (3, 3, 6, 16, 24),
            1,
            torch.float32,
            True,
            _triton.INTERPRETER,
            "ieee",
        )
        assert "stats_partial" in plan and plan["stats_partial"].grid[1] > 1
        with mvfast.backend("triton"):
            mvfast.ops.conv3d_bn_relu(x, w, None, gamma, beta, rm, rv, training=True, momentum=1.0)
    z = torch.nn.functional.conv3d(x.double().cpu(), w.double().cpu())
    torch.testing.assert_close(rm.double().cpu(), z.mean((0, 2, 3, 4)), rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(rv.double().cpu(), z.var((0, 2, 3, 4)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", TRITON)
def test_conv_grad_out_that_does_not_flatten(backend):
    """A grad_out whose spatial dimensions have no single stride (a transposed view) is read correctly."""
    _, device = backend
    leaves, rm, rv = _conv_case(device, size=(2, 4, 6))
    leaves = _leaves(*leaves)
    gy = torch.randn(2, 4, 2, 6, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    gy = gy.transpose(3, 4)  # (2, 4, 2, 4, 6), strides that do not flatten
    assert cbr_module._spatial_stride(gy) is None
    got = _conv_run("triton", leaves, rm.clone(), rv.clone(), True, gy)
    want = _conv_run("reference", _up(leaves), rm.double().cpu(), rv.double().cpu(), True, gy)
    _assert_matches_float64(got, want, names_for(False))


@pytest.mark.parametrize("backend", TRITON)
def test_conv2d_on_the_triton_conv(backend):
    """conv2d_bn_relu is the 3D kernels over a depth of 1: its row tiles and statistics."""
    _, device = backend
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 9, 20, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(6, 4, 3, 3, generator=g) * 0.2).to(device)
    gamma, beta = (torch.rand(6, generator=g) + 0.5).to(device), torch.zeros(6, device=device)
    leaves = _leaves(x, w, gamma, beta)

    def run(backend, leaves):
        x, w, gamma, beta = leaves
        with mvfast.backend(backend):
            y = mvfast.ops.conv2d_bn_relu(x, w, None, gamma, beta, None, None, padding=1, training=True)
        return [y, *grads(y, leaves)]

    got = run("triton", leaves)
    want = run("reference", _up(leaves))
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    lowp = run("reference", leaves)
    conv_check_close(
        got, want, lowp, torch.float32, ["out", "grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias"]
    )
