"""mvfast.fuse / mvfast.unfuse: torchvision's r3d_18 and mc3_18, and in 2D vgg11_bn and resnet18 (random
weights, nothing downloaded), give the same eval outputs, the same training step (loss, gradients, running
statistics) and the same state_dict keys fused as unfused; chains inside longer Sequentials and chains of
attributes (fx) fuse too."""

import copy

import pytest
import torch
from conv_checks import check_close, grads, names_for, off_the_kink
from torch import nn

import mvfast
from mvfast.nn import Conv2dBNReLU, Conv3dBNReLU
from mvfast.utils import saved_bytes

video = pytest.importorskip("torchvision.models.video")
vision = pytest.importorskip("torchvision.models")


def _randomised(model):
    """Non-trivial BatchNorm parameters and running statistics, so that folding them is tested."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module", params=["r3d_18", "mc3_18"])
def pair(request):
    torch.manual_seed(0)
    model = _randomised(getattr(video, request.param)(weights=None, num_classes=10))
    fused = copy.deepcopy(model)
    _, n = mvfast.fuse(fused)
    return request.param, model, fused, n


def test_fuse_counts_and_keeps_state_dict_keys(pair):
    name, model, fused, n = pair
    # stem + 8 blocks x (conv1 with ReLU, conv2 without) + 3 downsample branches (Conv3d -> BN)
    assert n == 20
    blocks = [m for m in fused.modules() if isinstance(m, Conv3dBNReLU)]
    assert len(blocks) == 20 and sum(b.relu for b in blocks) == 9
    assert isinstance(fused.layer1[0].conv1, Conv3dBNReLU) and not isinstance(
        fused.layer1[0].conv1, nn.Sequential
    )
    assert list(fused.state_dict()) == list(model.state_dict())
    assert (
        "layer1.0.conv1.0.weight" in fused.state_dict()
        and "layer1.0.conv1.1.running_mean" in fused.state_dict()
    )
    assert mvfast.fuse(fused)[1] == 0  # nothing left to fuse


def _assert_eval_outputs_match(model, runs):
    """Eval outputs of each (fused model, input) in runs: against the plain model in float64 to rounding,
    and in float32 against that float64 result. Two float32 networks are not compared with each other:
    each is close to float64, while their difference adds up both errors through every layer, with the
    summation orders of two implementations on whatever CPU runs it."""
    plain64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        want = plain64(runs[0][1].double())
        for fused, x in runs:
            fused32 = copy.deepcopy(fused).eval()
            fused64 = copy.deepcopy(fused).double().eval()
            torch.testing.assert_close(fused64(x.double()), want, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(fused32(x).double(), want, rtol=1e-4, atol=1e-4)


def test_eval_outputs_match(pair):
    _, model, fused, _ = pair
    x = torch.randn(1, 3, 4, 32, 32)
    _assert_eval_outputs_match(
        model, [(fused, x), (fused, x.contiguous(memory_format=torch.channels_last_3d))]
    )


def _assert_training_step_matches(model, fused, x):
    """One training step of float64 copies of both: loss, every parameter's gradient and the running
    statistics agree to rounding. float64, because in float32 an activation within rounding of 0 may land
    on either side of a ReLU (or a max-pool tie go either way) depending on summation order, which differs
    between the fused kernels, eager PyTorch and one CPU and another; one flipped mask element moves that
    element's gradient by a sizeable fraction, and autograd carries the change into every earlier layer. A
    float32 comparison of two whole networks then measures luck. float32 accuracy is checked per block
    instead (``_assert_blocks_float32_accurate``)."""
    a, b = copy.deepcopy(model).double().train(), copy.deepcopy(fused).double().train()
    x = x.double()
    y = torch.tensor([1, 7])
    la = nn.functional.cross_entropy(a(x), y)
    lb = nn.functional.cross_entropy(b(x), y)
    torch.testing.assert_close(lb, la, rtol=1e-10, atol=1e-12)
    ga = torch.autograd.grad(la, list(a.parameters()))
    gb = torch.autograd.grad(lb, list(b.parameters()))
    names = [n for n, _ in a.named_parameters()]
    for name, u, v in zip(names, ga, gb, strict=True):
        # relative to the largest gradient of the tensor: a conv bias before a BatchNorm has a gradient
        # of exactly zero in the fused block and of rounding noise around zero in the eager chain
        torch.testing.assert_close(
            v,
            u,
            rtol=1e-8,
            atol=1e-10 * max(u.abs().max().item(), 1.0),
            msg=lambda m, name=name: f"{name}: {m}",
        )
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if "running" in k or "num_batches" in k:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")


def _assert_blocks_float32_accurate(fused, x):
    """Each fused block of the model in float32, fed the input it gets at its place in the network, against
    its eager chain in float64: the output and every gradient within about twice the error of the chain
    run by PyTorch in float32 (the rule of the op tests, tests/conv_checks.py). grad_out is zero where the
    float64 pre-activation lies within float32 rounding of 0, where either side of the ReLU is right."""
    model = copy.deepcopy(fused).train()
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, (Conv2dBNReLU, Conv3dBNReLU))]
    inputs = {}
    for n, m in blocks:
        m.register_forward_pre_hook(lambda m, args, n=n: inputs.setdefault(n, args[0].detach()))
    with torch.no_grad():
        model(x)
    for name, block in blocks:
        block._forward_pre_hooks.clear()
        with torch.no_grad():
            pre = _eager_chain(block, relu=False).double()(inputs[name].double())
        gy = off_the_kink(pre, torch.float32) if block.relu else torch.randn(pre.shape, dtype=torch.float64)
        results = []
        for net, inp in (
            (block, inputs[name]),
            (_eager_chain(block).double(), inputs[name].double()),
            (_eager_chain(block), inputs[name]),
        ):
            net = copy.deepcopy(net)
            inp = inp.clone().requires_grad_()
            out = net(inp)
            conv, bn = (
                (net.conv, net.bn) if isinstance(net, (Conv2dBNReLU, Conv3dBNReLU)) else (net[0], net[1])
            )
            params = [conv.weight, conv.bias, bn.weight, bn.bias]
            results.append([out, *grads(out, [inp, *params], gy)])
        names = [f"{name}: {what}" for what in names_for(block.conv.bias is not None)]
        check_close(*results, torch.float32, names)


def _eager_chain(block, relu=None):
    """A copy of the fused block's modules as the eager nn.Sequential(conv, bn[, ReLU]), in training."""
    conv, bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    relu = block.relu if relu is None else relu
    return (nn.Sequential(conv, bn, nn.ReLU()) if relu else nn.Sequential(conv, bn)).train()


def test_training_step_matches(pair):
    _, model, fused, _ = pair
    _assert_training_step_matches(model, fused, torch.randn(2, 3, 4, 32, 32))


def test_blocks_float32_accurate(pair):
    _, _, fused, _ = pair
    _assert_blocks_float32_accurate(fused, torch.randn(2, 3, 4, 32, 32))


def _assert_checkpoints_load_both_ways_and_unfuse(model, fused, blocks, block_type):
    """A plain model's checkpoint loads into the fused model and back; unfuse gives back ``blocks`` blocks,
    the original module types and state_dict keys, and the loaded values."""
    other = _randomised(copy.deepcopy(model))
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    f = copy.deepcopy(fused)
    f.load_state_dict(other.state_dict())  # a plain model's checkpoint into the fused model
    plain = copy.deepcopy(model)
    plain.load_state_dict(f.state_dict())  # and back
    for k, v in other.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[k], v)
    _, n = mvfast.unfuse(f)
    assert n == blocks and not any(isinstance(m, block_type) for m in f.modules())
    assert [type(m) for m in f.modules()] == [type(m) for m in model.modules()]
    assert list(f.state_dict()) == list(model.state_dict())
    for k, v in other.state_dict().items():
        torch.testing.assert_close(f.state_dict()[k], v)


def test_checkpoints_load_both_ways_and_unfuse(pair):
    _, model, fused, _ = pair
    _assert_checkpoints_load_both_ways_and_unfuse(model, fused, 20, Conv3dBNReLU)


def test_chain_inside_a_longer_sequential_fuses_in_place():
    torch.manual_seed(0)
    seq = _randomised(
        nn.Sequential(
            nn.Conv3d(3, 4, 3, padding=1),
            nn.BatchNorm3d(4),
            nn.ReLU(),
            nn.MaxPool3d(2),
            nn.Conv3d(4, 5, 1),
            nn.BatchNorm3d(5),
        )
    )
    fused = copy.deepcopy(seq)
    _, n = mvfast.fuse(fused)
    assert n == 2 and isinstance(fused[0], Conv3dBNReLU) and isinstance(fused[4], Conv3dBNReLU)
    assert not fused[4].relu and isinstance(fused[1], nn.Identity)
    assert list(fused.state_dict()) == list(seq.state_dict())
    seq.eval()
    fused.eval()
    x = torch.randn(2, 3, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), seq(x), rtol=1e-5, atol=1e-5)
    fused.load_state_dict(seq.state_dict())
    mvfast.unfuse(fused)
    assert [type(m) for m in fused] == [type(m) for m in seq]
    assert not fused._state_dict_hooks and not fused._state_dict_pre_hooks


class _Attributes(nn.Module):
    def __init__(self, reuse_relu=False):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm3d(4)
        self.relu = nn.ReLU()
        self.head = nn.Conv3d(4, 2, 1)
        self.reuse_relu = reuse_relu

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)))
        return self.relu(self.head(y)) if self.reuse_relu else self.head(y)


class _Untraceable(_Attributes):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: fx cannot trace it
            x = x * 2
        return self.head(self.relu(self.bn(self.conv(x))))


@pytest.mark.parametrize(
    "cls,kw,expected,relu",
    [
        (_Attributes, {}, 1, True),
        (
            _Attributes,
            {"reuse_relu": True},
            1,
            False,
        ),  # the ReLU is called twice: stays, pair fused without it
        (_Untraceable, {}, 0, None),
    ],
)
def test_attribute_chains_found_by_fx(cls, kw, expected, relu):
    torch.manual_seed(0)
    model = _randomised(cls(**kw))
    fused = copy.deepcopy(model)
    _, n = mvfast.fuse(fused)
    assert n == expected
    if expected:
        assert isinstance(fused.conv, Conv3dBNReLU) and fused.conv.relu is relu
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 3, 5, 5)
    for mode in (True, False):
        model.train(mode)
        fused.train(mode)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    mvfast.unfuse(fused)
    assert type(fused.conv) is nn.Conv3d and type(fused.bn) is nn.BatchNorm3d and type(fused.relu) is nn.ReLU


# ---------------------------------------------------------------------------------------------------
# 2D: torchvision's vgg11_bn and resnet18

# (blocks fused, of which with the ReLU). vgg11_bn: 8 Conv2d -> BatchNorm2d -> ReLU chains in ``features``,
# fused in place. resnet18: the stem (conv1, bn1, relu: its ReLU is called once) + 8 BasicBlocks x 2 pairs +
# 3 downsample Sequential(conv, bn), 20 blocks; a BasicBlock calls its one ``self.relu`` twice (after bn1
# and after the residual add), so its pairs fuse without the ReLU: only the stem keeps it.
EXPECTED_2D = {"vgg11_bn": (8, 8), "resnet18": (20, 1)}
SIZE_2D = {"vgg11_bn": 32, "resnet18": 64}  # resnet18: layer4 at 2x2, more than 2 values per BN channel


def _model_2d(name):
    model = getattr(vision, name)(weights=None, num_classes=10)
    if name == "vgg11_bn":
        # VGG's classifier (120M parameters of Linear layers) has nothing to fuse: a small head keeps the
        # test light; ``features`` is torchvision's.
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Linear(512, 10)
    return _randomised(model)


@pytest.fixture(scope="module", params=list(EXPECTED_2D))
def pair2d(request):
    torch.manual_seed(0)
    model = _model_2d(request.param)
    fused = copy.deepcopy(model)
    _, n = mvfast.fuse(fused)
    return request.param, model, fused, n


def test_fuse_2d_counts_and_keeps_state_dict_keys(pair2d):
    name, model, fused, n = pair2d
    blocks = [m for m in fused.modules() if isinstance(m, Conv2dBNReLU)]
    n_blocks, n_relu = EXPECTED_2D[name]
    assert n == len(blocks) == n_blocks and sum(b.relu for b in blocks) == n_relu
    inside = {id(b.bn) for b in blocks}
    assert all(id(m) in inside for m in fused.modules() if isinstance(m, nn.BatchNorm2d)), "a BN left unfused"
    if name == "vgg11_bn":
        assert isinstance(fused.features[0], Conv2dBNReLU) and isinstance(fused.features[1], nn.Identity)
    else:
        assert (
            isinstance(fused.conv1, Conv2dBNReLU) and fused.conv1.relu and isinstance(fused.relu, nn.Identity)
        )
        block = fused.layer2[0]
        assert isinstance(block.conv1, Conv2dBNReLU) and not block.conv1.relu
        assert type(block.relu) is nn.ReLU  # shared by two call sites: stays
        assert isinstance(block.downsample, Conv2dBNReLU) and not block.downsample.relu
    assert list(fused.state_dict()) == list(model.state_dict())
    assert mvfast.fuse(fused)[1] == 0


def test_eval_outputs_match_2d(pair2d):
    name, model, fused, _ = pair2d
    x = torch.randn(2, 3, SIZE_2D[name], SIZE_2D[name])
    # channels_last end to end: the model's weights and the input
    cl = copy.deepcopy(fused).to(memory_format=torch.channels_last)
    _assert_eval_outputs_match(model, [(fused, x), (cl, x.contiguous(memory_format=torch.channels_last))])
    first = next(m for m in cl.modules() if isinstance(m, Conv2dBNReLU))
    layouts = []
    first.register_forward_hook(
        lambda m, i, o: layouts.append(o.is_contiguous(memory_format=torch.channels_last))
    )
    with torch.no_grad():
        cl.eval()(x.contiguous(memory_format=torch.channels_last))
    assert layouts == [True], "a channels_last input gives a channels_last block output"


def test_training_step_matches_2d(pair2d):
    name, model, fused, _ = pair2d
    _assert_training_step_matches(model, fused, torch.randn(2, 3, SIZE_2D[name], SIZE_2D[name]))


def test_blocks_float32_accurate_2d(pair2d):
    name, _, fused, _ = pair2d
    _assert_blocks_float32_accurate(fused, torch.randn(2, 3, SIZE_2D[name], SIZE_2D[name]))


def test_checkpoints_load_both_ways_and_unfuse_2d(pair2d):
    name, model, fused, _ = pair2d
    _assert_checkpoints_load_both_ways_and_unfuse(model, fused, EXPECTED_2D[name][0], Conv2dBNReLU)


class _Mixed(nn.Module):
    """A 2D chain of attributes (found by fx) beside a 3D one, and a 2D pair without ReLU."""

    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn2d = nn.BatchNorm2d(4)
        self.relu2d = nn.ReLU(inplace=True)
        self.conv3d = nn.Conv3d(3, 4, 3, padding=1, bias=False)
        self.bn3d = nn.BatchNorm3d(4)
        self.relu3d = nn.ReLU()
        self.head = nn.Sequential(nn.Conv2d(8, 2, 1), nn.BatchNorm2d(2))

    def forward(self, frames, clip):
        a = self.relu2d(self.bn2d(self.conv2d(frames)))  # (N, 4, H, W)
        b = self.relu3d(self.bn3d(self.conv3d(clip))).mean(2)  # (N, 4, H, W)
        return self.head(torch.cat([a, b], 1))


def test_2d_and_3d_chains_in_one_model():
    torch.manual_seed(0)
    model = _randomised(_Mixed())
    fused = copy.deepcopy(model)
    _, n = mvfast.fuse(fused)
    assert n == 3
    assert isinstance(fused.conv2d, Conv2dBNReLU) and fused.conv2d.relu
    assert isinstance(fused.conv3d, Conv3dBNReLU) and fused.conv3d.relu
    assert isinstance(fused.head, Conv2dBNReLU) and not fused.head.relu
    assert list(fused.state_dict()) == list(model.state_dict())
    frames, clip = torch.randn(2, 3, 5, 6), torch.randn(2, 3, 3, 5, 6)
    for mode in (True, False):
        model.train(mode)
        fused.train(mode)
        torch.testing.assert_close(fused(frames, clip), model(frames, clip), rtol=1e-5, atol=1e-5)
    assert mvfast.unfuse(fused)[1] == 3
    assert [type(m) for m in fused.modules()] == [type(m) for m in model.modules()]


def _chain_of_blocks(C=8):
    """Two Conv3d -> BatchNorm3d -> ReLU(inplace) chains back to back, as torchvision builds them."""
    torch.manual_seed(0)
    layers = []
    for _ in range(2):
        layers += [nn.Conv3d(C, C, 3, padding=1, bias=False), nn.BatchNorm3d(C), nn.ReLU(inplace=True)]
    return _randomised(nn.Sequential(*layers)).train()


def test_state_dict_keys_of_the_fused_layout_on_request():
    """fused_state_dict_keys: the keys named_parameters() and named_buffers() give (what older torch.export
    looks parameters up by), and the original model's keys again after the block."""
    from mvfast.nn.fuse import fused_state_dict_keys

    model = _chain_of_blocks()
    fused = mvfast.fuse(copy.deepcopy(model))[0]
    own = [n for n, _ in fused.named_parameters()] + [n for n, _ in fused.named_buffers()]
    assert sorted(fused.state_dict()) == sorted(model.state_dict()) != sorted(own)
    with fused_state_dict_keys():
        assert sorted(fused.state_dict()) == sorted(own)
    assert sorted(fused.state_dict()) == sorted(model.state_dict())


@pytest.fixture(params=["query", "probe"])
def hooks_query(request, monkeypatch):
    """How a block learns which saved-tensor hooks are active: torch's query (torch 2.8+), or the probe
    mvfast falls back to where torch has none (forced here by hiding the query)."""
    import mvfast.utils

    if request.param == "query" and mvfast.utils._top_hooks is None:
        pytest.skip(f"torch {torch.__version__} has no query of the active saved-tensor hooks")
    if request.param == "probe":
        monkeypatch.setattr(mvfast.utils, "_top_hooks", None)
    return request.param


def test_saved_tensor_hooks_keep_tensors(hooks_query):
    from torch.autograd.graph import save_on_cpu, saved_tensors_hooks

    from mvfast.utils import saved_tensor_hooks_keep_tensors as keep

    seen = []
    assert keep()
    assert saved_bytes(lambda: seen.append(keep())) == 0  # saved_bytes's hook; the probe is not counted
    with save_on_cpu():
        seen.append(keep())
        saved_bytes(lambda: seen.append(keep()))  # the innermost hooks are the ones that apply
    with saved_tensors_hooks(lambda t: t, lambda t: t):  # not marked as keeping tensors
        seen.append(keep())
    with torch.no_grad():
        seen.append(keep())  # under no_grad too: a custom op's setup_context runs so
    with torch.inference_mode():
        seen.append(keep())
    assert seen == [True, False, True, False, True, True]


@pytest.mark.parametrize("channels_last", [False, True, "auto"])
def test_fused_ncdhw_chain_saves_at_most_70_percent_of_the_eager_chain(channels_last, hooks_query):
    """Fed NCDHW, a chain of fused blocks saves each block's z only (the second block recomputes its input
    from the first's z in backward), where the eager chain with in-place ReLUs saves z and the ReLU's
    output per block: with the input, 3 activations against 5 here."""
    model = _chain_of_blocks()
    fused, n = mvfast.fuse(copy.deepcopy(model), channels_last=channels_last)
    assert n == 2
    x = torch.randn(2, 8, 4, 16, 16, requires_grad=True)
    ours = saved_bytes(lambda: fused(x))
    theirs = saved_bytes(lambda: model(x))
    assert ours <= 0.7 * theirs, (
        f"fused chain saves {ours} bytes, the eager chain with in-place ReLU {theirs}"
    )
    # and the gradients are those of the plain chain (float64, as the training step tests)
    a, b = copy.deepcopy(model).double(), copy.deepcopy(fused).double()
    x64 = torch.randn(2, 8, 4, 16, 16, dtype=torch.float64)
    gy = torch.randn(2, 8, 4, 16, 16, dtype=torch.float64)
    ga = torch.autograd.grad(a(x64.clone().requires_grad_()), list(a.parameters()), gy)
    xb = x64.clone().requires_grad_()
    yb = b(xb)
    gb = torch.autograd.grad(yb, [xb, *b.parameters()], gy)
    xa = x64.clone().requires_grad_()
    gxa = torch.autograd.grad(a(xa), xa, gy)[0]
    for u, v in zip([gxa, *ga], gb, strict=True):
        torch.testing.assert_close(v, u, rtol=1e-8, atol=1e-10)


def _block_output_layouts(model, x):
    """For each fused block of ``model`` run on x: is its output channels-last (and not also NCDHW)?"""
    layouts, hooks = [], []
    for m in model.modules():
        if isinstance(m, (Conv2dBNReLU, Conv3dBNReLU)):
            fmt = torch.channels_last_3d if isinstance(m, Conv3dBNReLU) else torch.channels_last

            def hook(m, i, o, fmt=fmt):
                layouts.append(o.is_contiguous(memory_format=fmt) and not o.is_contiguous())

            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return layouts


def test_fuse_runs_channels_last_where_the_cpu_convs_do_by_default():
    """fuse()'s default ("auto"): on the CPU in float32 and bfloat16, where the kernels' convs run
    channels-last, every block of an NCDHW model outputs channels-last (so no block converts its input in
    backward); in float64 the layout is the input's. channels_last=False keeps the input's layout in every
    block, True makes it channels-last in every dtype. The model's own fuse follows its config instead."""
    chain = mvfast.fuse(_chain_of_blocks())[0].eval()
    assert all(b.channels_last == "auto" for b in chain.modules() if isinstance(b, Conv3dBNReLU))
    x = torch.randn(2, 8, 4, 16, 16)
    assert _block_output_layouts(chain, x) == [True, True]
    assert _block_output_layouts(chain.to(torch.bfloat16), x.bfloat16()) == [True, True]
    assert _block_output_layouts(chain.double(), x.double()) == [False, False]
    assert _block_output_layouts(mvfast.fuse(chain, channels_last=True)[0], x.double()) == [True, True]
    chain = mvfast.fuse(chain.float(), channels_last=False)[0]
    assert _block_output_layouts(chain, x) == [False, False]
    assert _block_output_layouts(chain, x.contiguous(memory_format=torch.channels_last_3d)) == [True, True]
    # 2D blocks too
    vgg = mvfast.fuse(_randomised(vision.vgg11_bn(weights=None, num_classes=10)).eval())[0]
    assert all(_block_output_layouts(vgg.features, torch.randn(1, 3, 32, 32)))
    # the model keeps the layout its config says
    from mvfast.models import create_model

    for cl in (True, False):
        model = create_model("tiny", 3, channels_last=cl)
        assert {b.channels_last for b in model.modules() if isinstance(b, (Conv2dBNReLU, Conv3dBNReLU))} == {
            False
        }
    with pytest.raises(ValueError, match="channels_last must be True, False or 'auto', got 'yes'"):
        mvfast.fuse(chain, channels_last="yes")


def test_channels_last_auto_compiles_without_graph_breaks():
    """fuse()'s channels-last conversion traces under torch.compile(fullgraph=True): the training step's
    gradients and the eval output are the eager ones."""
    fused = mvfast.fuse(_chain_of_blocks())[0]
    ref = copy.deepcopy(fused)
    x = torch.randn(2, 8, 4, 16, 16, requires_grad=True)
    compiled = torch.compile(fused, fullgraph=True, dynamic=False, backend="aot_eager")
    y = compiled(x)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) and not y.is_contiguous()
    got = torch.autograd.grad(y.square().sum(), [x, *fused.parameters()])
    want = torch.autograd.grad(ref(x).square().sum(), [x, *ref.parameters()])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    fused.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)


def _bytes_saved(model, make_input):
    x = make_input()
    return saved_bytes(lambda: model(x), exclude=list(model.parameters()))


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_conversion_costs_no_memory(dims):
    """A fused block converting its NCDHW (NCHW) input to channels-last saves what the same block keeping
    the input's layout saves: the input itself where it is dense (behind an in-place ReLU, which saves it
    too; a data batch that does not require grad), the compact copy where it is a strided slice (saving
    the slice would hold its whole base)."""
    torch.manual_seed(0)
    conv, bn = (nn.Conv3d, nn.BatchNorm3d) if dims == 3 else (nn.Conv2d, nn.BatchNorm2d)
    chain = nn.Sequential(nn.ReLU(inplace=True), conv(8, 8, 3, padding=1, bias=False), bn(8), nn.ReLU())
    auto = mvfast.fuse(copy.deepcopy(chain))[0].train()
    keep = mvfast.fuse(copy.deepcopy(chain), channels_last=False)[0].train()
    shape = (2, 8, 4, 12, 12) if dims == 3 else (2, 8, 12, 12)
    leaf = torch.randn(shape, requires_grad=True)
    big = torch.randn((2, 8, 16, 12, 12) if dims == 3 else (2, 8, 48, 12), requires_grad=True)
    inputs = {
        "behind an in-place ReLU": lambda: leaf * 1,
        "a batch without grad": lambda: torch.randn(shape),
        "a strided slice": lambda: (big * 1)[:, :, :4] if dims == 3 else (big * 1)[:, :, :12],
    }
    for what, make in inputs.items():
        ours, theirs = _bytes_saved(auto, make), _bytes_saved(keep, make)
        assert ours == theirs, f"{what}: {ours} bytes saved converting, {theirs} keeping the layout"


def test_fused_blocks_run_under_vmap():
    """torch.func.vmap over a fused model (no memory format but the contiguous one exists under vmap): the
    default's conversion steps aside, and the outputs are the per-sample ones."""
    block = mvfast.fuse(_chain_of_blocks())[0].eval()
    xs = torch.randn(3, 2, 8, 4, 16, 16)
    with torch.no_grad():
        got = torch.func.vmap(block)(xs)
        want = torch.stack([block(x) for x in xs])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_recomputed_input_leaves_an_input_changed_in_place_alone():
    """A block's output that is changed in place before the next block reads it is saved as it is, not
    recomputed from the first block's z (which would give the values before the change)."""
    fused = mvfast.fuse(_chain_of_blocks())[0].double()
    ref = copy.deepcopy(fused)
    x = torch.randn(2, 8, 4, 16, 16, dtype=torch.float64)

    def run(model, in_place):
        h = model[0](x)
        if in_place:  # an in-place change autograd does not see: the gradient passes as through h + 0.5
            with torch.no_grad():
                h.add_(0.5)
        else:
            h = h + 0.5
        y = model[3](h)
        return torch.autograd.grad(y.square().sum(), list(model.parameters()))

    with mvfast.backend("reference"):
        want = run(ref, False)
    for u, v in zip(want, run(fused, True), strict=True):
        torch.testing.assert_close(v, u, rtol=1e-8, atol=1e-10)


def test_recomputed_input_follows_a_bn_parameter_changed_in_place():
    """The first block's BatchNorm weight changed in place after that block ran: the second block does not
    rebuild its input from the first block's z with the new weight (its input was made with the old
    one), so its gradients are those of the reference backend's, which saves the input itself."""
    fused = mvfast.fuse(_chain_of_blocks())[0].double()
    ref = copy.deepcopy(fused)
    x = torch.randn(2, 8, 4, 16, 16, dtype=torch.float64)

    def run(model):
        h = model[0](x)
        with torch.no_grad():
            model[0].bn.weight.mul_(2)
        y = model[3](h)
        return torch.autograd.grad(y.square().sum(), list(model[3].parameters()))

    with mvfast.backend("reference"):
        want = run(ref)
    for u, v in zip(want, run(fused), strict=True):
        torch.testing.assert_close(v, u, rtol=1e-8, atol=1e-10)


def _offered_inputs(out: torch.Tensor) -> int:
    """How many autograd nodes behind ``out`` hold a block's z for the block it feeds (the recompute)."""
    seen, stack, held = set(), [out.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        held += hasattr(node, "as_source")
        stack += [edge[0] for edge in node.next_functions]
    return held


def test_no_block_holds_z_outside_checkpointing_or_offloading_hooks(hooks_query):
    """Under saved-tensor hooks that move or drop what is saved (activation checkpointing, offloading to
    the CPU), no block keeps its z on its node for the next block, where the hooks would not see it: a
    checkpointed stack of fused blocks would otherwise hold every block's z until backward."""
    from torch.autograd.graph import save_on_cpu
    from torch.utils.checkpoint import checkpoint

    fused = mvfast.fuse(_chain_of_blocks())[0]
    x = torch.randn(2, 8, 4, 16, 16, requires_grad=True)
    # without hooks only the last block offers its z (no block took it), which it saves anyway
    assert _offered_inputs(fused(x)) == 1
    assert _offered_inputs(checkpoint(fused, x, use_reentrant=False)) == 0
    with save_on_cpu():
        y = fused(x)
    assert _offered_inputs(y) == 0
    # and the gradients under checkpointing are those without it
    want = torch.autograd.grad(fused(x).square().sum(), x)[0]
    got = torch.autograd.grad(checkpoint(fused, x, use_reentrant=False).square().sum(), x)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.fixture(scope="module", params=["r3d_18", "mc3_18"])
def pair_cl(request):
    torch.manual_seed(0)
    model = _randomised(getattr(video, request.param)(weights=None, num_classes=10))
    fused = copy.deepcopy(model)
    _, n = mvfast.fuse(fused, channels_last=True)
    return request.param, model, fused, n


def test_channels_last_fuse_matches_and_unfuses(pair_cl):
    """fuse(model, channels_last=True): the blocks output channels_last_3d for NCDHW input, the training
    step and eval outputs equal the plain model's (float64), and unfuse gives back the plain model."""
    _, model, fused, n = pair_cl
    assert n == 20
    assert all(b.channels_last for b in fused.modules() if isinstance(b, Conv3dBNReLU))
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        h = copy.deepcopy(fused).eval().stem(x)
    assert h.is_contiguous(memory_format=torch.channels_last_3d) and not h.is_contiguous()
    _assert_training_step_matches(model, fused, x)
    _assert_eval_outputs_match(model, [(fused, x[:1])])
    _assert_checkpoints_load_both_ways_and_unfuse(model, fused, 20, Conv3dBNReLU)
