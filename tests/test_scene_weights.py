"""Scene weights files as users have them: torchvision's VGG state_dicts (made here by torchvision with
random weights; nothing is downloaded) give the very features torchvision's own model gives, compared in
float64; a file in another format or of another VGG is a one-line error."""

import pytest
import torch
import torchvision

import mvfast
from mvfast.models import VGG, create_model


def torchvision_features(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fc7 (after its ReLU and dropout) of a torchvision VGG, from its own modules."""
    return net.classifier[:-1](torch.flatten(net.avgpool(net.features(x)), 1))


@pytest.mark.slow
def test_torchvision_vgg16_file_through_the_model_config(tmp_path):
    # frame2d at torchvision's scale: the user's path, scene_weights -> create_model (which fuses) -> logits
    torch.manual_seed(0)
    ref = torchvision.models.vgg16(weights=None).eval()
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(ref.state_dict(), path)
    model = create_model(
        "frame2d", 1000, scene_width=1.0, scene_pool=7, scene_fc=4096, scene_batch_norm=False,
        scene_frames=2, scene_size=32, scene_weights=(str(path),),
    ).eval()  # fmt: skip
    x = torch.randn(2, 2, 3, 32, 32)
    ref, model = ref.double(), model.double()
    with torch.no_grad():
        want = ref(x.flatten(0, 1).double()).view(2, 2, -1).mean(1)
        feats, _ = model.frame2d(x.flatten(0, 1).double())
        torch.testing.assert_close(feats, torchvision_features(ref, x.flatten(0, 1).double()), rtol=0, atol=0)
        torch.testing.assert_close(model({"frames": x.double()})["logits"], want, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_torchvision_vgg19_bn_file_into_a_fused_scene_net(tmp_path):
    torch.manual_seed(1)
    ref = torchvision.models.vgg19_bn(weights=None)
    # running statistics other than 0 and 1, as a trained file has
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    ref.eval()
    path = tmp_path / "vgg19_bn-c79401a0.pth"
    torch.save(ref.state_dict(), path)
    net = VGG("vgg19", 1000, batch_norm=True)
    net.load_weights(path)
    net, blocks = mvfast.fuse(net)
    assert blocks == 16
    net.eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = torchvision_features(ref.double(), x)
        feats, logits = net.double()(x)
    torch.testing.assert_close(feats, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits, ref.classifier[-1](want), rtol=1e-10, atol=1e-12)


def small_vgg_state(name="vgg16", batch_norm=False, classes=16):
    return VGG(name, classes, width=1 / 16, pool=1, hidden=64, batch_norm=batch_norm).state_dict()


def test_wrapped_prefixed_and_safetensors_files_load(tmp_path):
    from safetensors.torch import save_file

    state = small_vgg_state()
    files = {
        "wrapped.pt": {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
        "model.pt": {"model": state},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "vgg.safetensors")
    for name in (*files, "vgg.safetensors"):
        net = VGG("vgg16", 16, width=1 / 16, pool=1, hidden=64)
        net.load_weights(tmp_path / name)
        for k, v in state.items():
            assert torch.equal(net.state_dict()[k], v), (name, k)


@pytest.mark.parametrize(
    "make, needles",
    [
        (lambda p: p.write_bytes(b"GIF89a not weights at all" * 10), ["not a torch or safetensors file"]),
        (lambda p: torch.save(torch.nn.Linear(2, 2), p), ["pickled object", "state_dict()"]),
        (lambda p: torch.save([torch.zeros(2)], p), ["holds list"]),
        (lambda p: torch.save(small_vgg_state("vgg19"), p), ["VGG19 without BatchNorm", "VGG16 without"]),
        (
            lambda p: torch.save(small_vgg_state(batch_norm=True), p),
            ["VGG16 with BatchNorm", "VGG16 without"],
        ),
        (lambda p: torch.save(small_vgg_state(classes=7), p), ["num_scenes", "classifier.6.weight"]),
    ],
)
def test_a_file_in_the_wrong_format_says_so_in_one_line(tmp_path, make, needles):
    path = tmp_path / "weights.pth"
    make(path)
    with pytest.raises(ValueError) as info:
        create_model("tiny", 3, scene_batch_norm=False, scene_weights=(str(path), None))
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for needle in needles:
        assert needle in message, message


def test_a_bad_safetensors_file(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        VGG("vgg16", 16, width=1 / 16, pool=1, hidden=64).load_weights(path)
