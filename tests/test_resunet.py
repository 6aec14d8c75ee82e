"""Tests of minimal3d.resunet: torchvision key names, output sizes per depth and stride, odd sizes,
the up-projection block against a naive reference, gradcheck and finite gradients."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from minimal3d.resunet import (
    Bottleneck,
    ResNetEncoder,
    ResUNet,
    UpProjection,
    load_torchvision_resnet,
    resunet18,
    resunet50,
)

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@functools.cache
def eval_resunet18(output_stride: int) -> ResUNet:
    """Shared read-only models (building one takes ~0.5 s); used under no_grad only."""
    torch.manual_seed(0)
    return resunet18(output_stride=output_stride).eval()


def torchvision_resnet18_keys() -> list[str]:
    """The state-dict keys of torchvision.models.resnet18() without fc, written out by hand."""
    keys = ["conv1.weight"] + [f"bn1.{k}" for k in BN]
    for stage in (1, 2, 3, 4):
        for block in (0, 1):
            prefix = f"layer{stage}.{block}"
            keys += [f"{prefix}.conv1.weight"] + [f"{prefix}.bn1.{k}" for k in BN]
            keys += [f"{prefix}.conv2.weight"] + [f"{prefix}.bn2.{k}" for k in BN]
            if stage > 1 and block == 0:  # stride-2 stages project the shortcut
                keys += [f"{prefix}.downsample.0.weight"] + [f"{prefix}.downsample.1.{k}" for k in BN]
    return keys


def test_encoder_keys_are_torchvision_resnet18():
    encoder = eval_resunet18(2).encoder
    assert list(encoder.state_dict()) == torchvision_resnet18_keys()
    assert encoder.state_dict()["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    # torchvision resnet18 has 11,689,512 parameters, 513,000 of them in fc
    assert sum(p.numel() for p in encoder.parameters()) == 11_689_512 - 513_000


def test_resnet50_keys_and_shapes():
    with torch.device("meta"):  # keys and shapes only: the ResNet50 U-Net has 175M parameters
        model = resunet50()
        out2 = model.eval()(torch.empty(1, 3, 64, 96))
        out8 = resunet50(output_stride=8).eval()(torch.empty(1, 3, 64, 96))
    assert out2.shape == (1, 128, 32, 48) and out8.shape == (1, 128, 8, 12)
    keys = model.encoder.state_dict()
    assert keys["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert keys["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)  # expansion 4: projection at stage 1
    assert keys["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # v1.5: stride on the 3x3
    assert "layer4.2.bn3.running_var" in keys and "layer4.3.conv1.weight" not in keys
    assert len(keys) == 320 - 2  # torchvision resnet50 state dict: 320 entries with fc.weight, fc.bias
    # torchvision resnet50 has 25,557,032 parameters, 2,049,000 of them in fc
    assert sum(p.numel() for p in model.encoder.parameters()) == 25_557_032 - 2_049_000
    assert model.decoder.up4.conv1.weight.shape == (128, 256, 5, 5)  # 2048 -> 1024 -> 512 -> 256 -> 128


def test_bottleneck_matches_naive():
    torch.manual_seed(0)
    block = Bottleneck(8, 2, stride=2).double().eval()
    x = torch.randn(1, 8, 7, 6, dtype=torch.float64)

    def conv_bn(t, conv, norm, stride=1, padding=0):
        t = F.conv2d(t, conv.weight, stride=stride, padding=padding)
        return (t - norm.running_mean[:, None, None]) / torch.sqrt(norm.running_var[:, None, None] + norm.eps)

    out = torch.relu(conv_bn(x, block.conv1, block.bn1))
    out = torch.relu(conv_bn(out, block.conv2, block.bn2, stride=2, padding=1))
    out = conv_bn(out, block.conv3, block.bn3)
    expected = torch.relu(out + conv_bn(x, block.downsample[0], block.downsample[1], stride=2))
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected)
    assert expected.shape == (1, 8, 4, 3)


def test_load_torchvision_resnet_round_trip_and_errors():
    source = eval_resunet18(2).encoder
    state_dict = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in source.state_dict().items()}
    state_dict["fc.weight"], state_dict["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)  # ignored
    model = resunet18(encoder_weights=state_dict)
    for key in ("layer3.1.bn2.running_var", "layer4.0.downsample.0.weight", "conv1.weight"):
        torch.testing.assert_close(model.encoder.state_dict()[key], state_dict[key], rtol=0, atol=0)
    broken = dict(state_dict)
    del broken["layer1.0.conv1.weight"]
    broken["layer5.0.conv1.weight"] = torch.zeros(1)
    broken["bn1.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as error:
        load_torchvision_resnet(model.encoder, broken)
    message = str(error.value)
    assert "layer1.0.conv1.weight" in message and "layer5.0.conv1.weight" in message and "bn1.weight" in message
    with torch.device("meta"), pytest.raises(ValueError, match="missing keys"):
        load_torchvision_resnet(ResNetEncoder(50), state_dict)  # resnet18 weights into a resnet50


@pytest.mark.parametrize(
    "size, stride, expected",
    [
        ((240, 320), 2, (32, 120, 160)),  # Pri3D: half resolution
        ((120, 160), 8, (32, 15, 20)),  # 3D-CompNets: 1/8
        ((66, 99), 2, (32, 33, 50)),  # odd sizes: ceil(H/2), ceil(W/2)
        ((100, 70), 8, (32, 13, 9)),  # strides 4..32 follow the encoder's (ceil) sizes
        ((64, 64), 32, (32, 2, 2)),
    ],
)
def test_output_shapes(size, stride, expected):
    with torch.no_grad():
        out = eval_resunet18(stride)(torch.randn(1, 3, *size))
    assert out.shape == (1, *expected)
    assert torch.isfinite(out).all() and out.std() > 0


def test_bad_inputs_raise():
    model = eval_resunet18(2)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="at least 32"):
        model(torch.randn(1, 3, 16, 64))
    with pytest.raises(TypeError, match="floating point"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="output_stride"):
        ResUNet(output_stride=3)
    with pytest.raises(ValueError, match="depth"):
        ResUNet(depth=20)


def naive_bilinear_align_corners(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Bilinear resize with align_corners=True, one output pixel at a time."""
    _, _, in_h, in_w = x.shape
    out = torch.zeros(x.shape[0], x.shape[1], out_h, out_w, dtype=x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            y = i * (in_h - 1) / (out_h - 1) if out_h > 1 else 0.0
            z = j * (in_w - 1) / (out_w - 1) if out_w > 1 else 0.0
            y0, z0 = math.floor(y), math.floor(z)
            y1, z1 = min(y0 + 1, in_h - 1), min(z0 + 1, in_w - 1)
            dy, dz = y - y0, z - z0
            out[:, :, i, j] = (
                (1 - dy) * (1 - dz) * x[:, :, y0, z0]
                + (1 - dy) * dz * x[:, :, y0, z1]
                + dy * (1 - dz) * x[:, :, y1, z0]
                + dy * dz * x[:, :, y1, z1]
            )
    return out


def naive_up_projection(block: UpProjection, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    def bn(t, norm):  # eval-mode BatchNorm written out
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        return (t - norm.running_mean[:, None, None]) * scale[:, None, None] + norm.bias[:, None, None]

    x = naive_bilinear_align_corners(x, *size)
    hidden = torch.relu(bn(F.conv2d(x, block.conv1.weight, padding=2), block.bn1))
    branch = bn(F.conv2d(hidden, block.conv1_2.weight, padding=1), block.bn1_2)
    return torch.relu(branch + bn(F.conv2d(x, block.conv2.weight, padding=2), block.bn2))


def random_up_projection() -> UpProjection:
    torch.manual_seed(0)
    block = UpProjection(4, 2).double().eval()
    with torch.no_grad():
        for norm in (block.bn1, block.bn1_2, block.bn2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    return block


def test_up_projection_matches_naive():
    block = random_up_projection()
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x, (7, 9)), naive_up_projection(block, x, (7, 9)))


def test_gradcheck_up_projection_float64():
    block = random_up_projection()
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: block(t, (5, 6)), (x,), eps=1e-6, atol=1e-6)


def test_gradients_finite_in_training_mode():
    torch.manual_seed(0)
    model = resunet18(out_channels=8, output_stride=2).train()
    images = torch.randn(2, 3, 32, 64, requires_grad=True)
    model(images).square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_skip_additions_reach_the_output():
    """Zeroing layer1's output changes the stride-2 features (additive skip), not the stride-8 ones."""
    torch.manual_seed(0)
    images = torch.randn(1, 3, 64, 64)
    for stride, changes in ((2, True), (8, False)):
        model = eval_resunet18(stride)
        with torch.no_grad():
            features = model.encoder(images)
            base = model.decoder(features, (32, 32))
            zeroed = model.decoder([torch.zeros_like(features[0])] + features[1:], (32, 32))
        assert (not torch.allclose(base, zeroed)) == changes


def test_load_torchvision_resnet_bad_files_say_not_a_valid_checkpoint(tmp_path):
    encoder = ResNetEncoder(18)
    good = tmp_path / "resnet18.pth"
    torch.save(encoder.state_dict(), good)
    load_torchvision_resnet(encoder, good)
    empty, truncated = tmp_path / "empty.pth", tmp_path / "truncated.pth"
    empty.write_bytes(b"")
    truncated.write_bytes(good.read_bytes()[:300])
    for path, reason in [(tmp_path / "missing.pth", "no such file"), (empty, "empty"), (truncated, "(")]:
        with pytest.raises(ValueError, match="not a valid checkpoint") as info:
            load_torchvision_resnet(encoder, path)
        assert str(path) in str(info.value) and reason in str(info.value)
        assert "weights_only" not in str(info.value)
