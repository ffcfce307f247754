"""mvfast.fuse / mvfast.unfuse: torchvision's r3d_18 and mc3_18 (random weights, nothing downloaded) give
the same eval outputs, the same training step (loss, gradients, running statistics) and the same
state_dict keys fused as unfused; chains inside longer Sequentials and chains of attributes (fx) fuse too."""

import copy

import pytest
import torch
from torch import nn

import mvfast
from mvfast.nn import Conv3dBNReLU

video = pytest.importorskip("torchvision.models.video")


def _randomised(model):
    """Non-trivial BatchNorm parameters and running statistics, so that folding them is tested."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
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


def test_eval_outputs_match(pair):
    _, model, fused, _ = pair
    x = torch.randn(1, 3, 4, 32, 32)
    model.eval()
    fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
        xc = x.contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(fused(xc), model(x), rtol=1e-4, atol=1e-4)


def test_training_step_matches(pair):
    _, model, fused, _ = pair
    a, b = copy.deepcopy(model).train(), copy.deepcopy(fused).train()
    x = torch.randn(2, 3, 4, 32, 32)
    y = torch.tensor([1, 7])
    la = nn.functional.cross_entropy(a(x), y)
    lb = nn.functional.cross_entropy(b(x), y)
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-5)
    ga = torch.autograd.grad(la, list(a.parameters()))
    gb = torch.autograd.grad(lb, list(b.parameters()))
    names = [n for n, _ in a.named_parameters()]
    for name, u, v in zip(names, ga, gb, strict=True):
        torch.testing.assert_close(v, u, rtol=1e-3, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if "running" in k or "num_batches" in k:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_checkpoints_load_both_ways_and_unfuse(pair):
    _, model, fused, _ = pair
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
    assert n == 20 and not any(isinstance(m, Conv3dBNReLU) for m in f.modules())
    assert [type(m) for m in f.modules()] == [type(m) for m in model.modules()]
    assert list(f.state_dict()) == list(model.state_dict())
    for k, v in other.state_dict().items():
        torch.testing.assert_close(f.state_dict()[k], v)


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
