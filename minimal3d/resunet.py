"""ResNet-encoder U-Net: the 2D backbone of Pri3D (and a 1/8-resolution variant for 3D-CompNets).

Paper: J. Hou, S. Xie, B. Graham, A. Dai, M. Niessner, "Pri3D: Can 3D Priors Help 2D Representation
Learning?", ICCV 2021, arXiv:2104.11225. Encoder: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning
for Image Recognition", 2015, arXiv:1512.03385. Up-projection blocks: I. Laina et al., "Deeper Depth
Prediction with Fully Convolutional Residual Networks", 2016, arXiv:1606.00373 (as used by J. Hu et al.,
"Revisiting Single Image Depth Estimation", 2018, arXiv:1803.08673).

Official code followed: Sekunde/Pri3D ``pretrain/pri3d/model/backbone/resunet.py`` (``Res18UNet`` /
``Res50UNet``) and ``resnet.py``. Module names are the official ones (``encoder.*``, ``decoder.up1..up4``,
``decoder.conv0``), and the encoder's are torchvision's (``conv1``, ``bn1``, ``layer1..layer4`` with
``conv1/bn1/conv2/bn2[/conv3/bn3]/downsample.0/downsample.1``), so a torchvision ResNet state dict loads
into ``model.encoder`` with :func:`load_torchvision_resnet`.

Architecture (ResNet18: channels 64, 128, 256, 512 at strides 4, 8, 16, 32):
  x4 = layer4 (1/32) -> up1 to layer3's size, + layer3 -> up2 to layer2's size, + layer2
  -> up3 to layer1's size, + layer1 -> up4 to half the input size -> 1x1 conv0 -> out_channels.
Each up block halves the channels (512 -> 256 -> 128 -> 64 -> 32; ResNet50: 2048 -> ... -> 128).
``output_stride`` 4, 8, 16 or 32 stops the decoder after the skip at that stride (3D-CompNets use 8).
"""

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# blocks per stage, block type (BasicBlock: expansion 1, Bottleneck: expansion 4)
RESNET_LAYERS = {18: ((2, 2, 2, 2), "basic"), 34: ((3, 4, 6, 3), "basic"), 50: ((3, 4, 6, 3), "bottleneck")}
OUTPUT_STRIDES = (2, 4, 8, 16, 32)


# ----------------------------------------------------------------------------------------------------
# Encoder: torchvision's ResNet without avgpool / fc
# ----------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet18/34 block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), 3x3 convs."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _shortcut(in_channels, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """ResNet50 block (v1.5: stride on the 3x3): 1x1 -> 3x3 -> 1x1 (4x planes) + shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = _shortcut(in_channels, planes * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """Projection shortcut (1x1 conv + BN, keys downsample.0 / downsample.1) when the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


class ResNetEncoder(nn.Module):
    """ResNet trunk: images (B, 3, H, W) -> features of layer1..layer4 at strides 4, 8, 16, 32."""

    def __init__(self, depth: int = 18):
        super().__init__()
        if depth not in RESNET_LAYERS or isinstance(depth, bool):
            raise ValueError(f"depth must be one of {sorted(RESNET_LAYERS)}, got {depth}")
        blocks, kind = RESNET_LAYERS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        channels, in_channels = [], 64
        for stage, (num_blocks, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
            stride = 1 if stage == 1 else 2
            layer = [block(in_channels, planes, stride)]
            in_channels = planes * block.expansion
            layer += [block(in_channels, planes) for _ in range(num_blocks - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*layer))
            channels.append(in_channels)
        self.out_channels = tuple(channels)  # (64, 128, 256, 512) or (256, 512, 1024, 2048)
        for module in self.modules():  # torchvision / Pri3D init
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: Tensor) -> list[Tensor]:
        x = F.relu(self.bn1(self.conv1(images)))  # stride 2
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)  # stride 4
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features


def _load_failure_reason(error: Exception) -> str:
    """Why ``torch.load`` failed, in one line, without torch's advice to retry with weights_only=False."""
    message = str(error)
    if "WeightsUnpickler error:" in message:  # not a zip archive: torch fell back to plain unpickling
        detail = message.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
        return f"corrupt or not written by torch.save: {detail[0][:120] if detail else 'unpickling failed'}"
    lines = [line for line in message.strip().splitlines() if line.strip() and "weights_only" not in line]
    first = lines[0].split(". ")[0] if lines else "unreadable"
    return f"{type(error).__name__}: {first[:160]}"


def read_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A flat state dict (name -> tensor) from a ``torch.save`` file, read with ``weights_only=True``.

    Raises ``ValueError("not a valid checkpoint: PATH (reason)")`` for a missing, empty, truncated or corrupt
    file and for one that does not hold a dict of tensors (torch's own message would suggest
    ``weights_only=False``, wrong and unsafe advice for a bad file).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"not a valid checkpoint: {path} (no such file)")
    if path.stat().st_size == 0:
        raise ValueError(f"not a valid checkpoint: {path} (empty file)")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, or not written by torch.save
        raise ValueError(f"not a valid checkpoint: {path} ({_load_failure_reason(error)})") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise ValueError(f"not a valid checkpoint: {path} (expected a flat dict of name -> tensor, "
                         f"got {type(state_dict).__name__})")
    return state_dict


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, Tensor], description: str) -> None:
    """Compare key sets and shapes with ``module``, name every missing / unexpected / mis-shaped key in one
    ``ValueError``, then load with ``strict=True``. ``description`` says what was expected (for the message)."""
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {shape}"
                   for key, shape in expected.items() if key in state_dict and tuple(state_dict[key].shape) != shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(f"state_dict does not match {description}: missing keys {missing}, "
                         f"unexpected keys {unexpected}, shape mismatches {wrong_shape}")
    module.load_state_dict(state_dict, strict=True)


def load_torchvision_resnet(encoder: ResNetEncoder, state_dict: dict | str | os.PathLike) -> None:
    """Load a torchvision ``resnet18``/``resnet50`` state dict (or a path to one) into ``encoder``.

    ``fc.*`` (the classifier) is ignored; any other missing or unexpected key, or a shape mismatch, raises
    ``ValueError`` naming the keys; an unreadable file raises ``ValueError("not a valid checkpoint: PATH
    (reason)")``. BatchNorm running statistics are loaded too.
    """
    if not isinstance(encoder, ResNetEncoder):
        raise TypeError(f"encoder must be a ResNetEncoder (e.g. model.encoder), got {type(encoder).__name__}")
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = read_state_dict_file(state_dict)
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict or a path, got {type(state_dict).__name__}")
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    load_state_dict_strict(encoder, state_dict, f"a torchvision ResNet{encoder.depth}")


# ----------------------------------------------------------------------------------------------------
# Decoder: up-projection blocks with additive skips
# ----------------------------------------------------------------------------------------------------


class UpProjection(nn.Module):
    """Laina et al.'s up-projection: bilinear resize (align_corners=True) to ``size``, then
    relu(bn1_2(conv1_2(relu(bn1(conv1(x))))) + bn2(conv2(x))) with 5x5, 3x3 and 5x5 (shortcut) convs."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 5, 1, 2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv1_2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn1_2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 5, 1, 2, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        branch = self.bn1_2(self.conv1_2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(branch + self.bn2(self.conv2(x)))


class Decoder(nn.Module):
    """Up blocks up1..up{K} (K = log2(32 / output_stride)) and a 1x1 ``conv0`` to ``out_channels``."""

    def __init__(self, encoder_channels: tuple[int, ...], out_channels: int, output_stride: int = 2):
        super().__init__()
        num_up = {2: 4, 4: 3, 8: 2, 16: 1, 32: 0}[output_stride]
        channels = encoder_channels[-1]
        for index in range(1, num_up + 1):
            setattr(self, f"up{index}", UpProjection(channels, channels // 2))
            channels //= 2
        self.num_up = num_up
        self.conv0 = nn.Conv2d(channels, out_channels, 1)

    def forward(self, features: list[Tensor], half_size: tuple[int, int]) -> Tensor:
        """features: layer1..layer4 outputs; half_size: the (H/2, W/2) target of the 4th up block."""
        x = features[3]
        skips = [features[2], features[1], features[0], None]  # added after up1, up2, up3; none after up4
        for index in range(self.num_up):
            skip = skips[index]
            x = getattr(self, f"up{index + 1}")(x, tuple(skip.shape[-2:]) if skip is not None else half_size)
            if skip is not None:
                x = x + skip
        return self.conv0(x)


class ResUNet(nn.Module):
    """ResNet encoder + up-projection decoder: images (B, 3, H, W) -> features (B, C, H/s, W/s), s = output_stride.

    Any H, W >= 32 work: each up block resizes to its skip's size. The stride-2 output has size
    (ceil(H/2), ceil(W/2)) (the stem conv's size); the official code uses 2x layer1's size, the same
    whenever H and W are multiples of 4 (e.g. Pri3D's 240 x 320 -> 120 x 160).
    """

    def __init__(self, depth: int = 18, out_channels: int = 32, output_stride: int = 2):
        super().__init__()
        if output_stride not in OUTPUT_STRIDES or isinstance(output_stride, bool):
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive integer, got {out_channels!r}")
        self.output_stride = output_stride
        self.out_channels = out_channels
        self.encoder = ResNetEncoder(depth)
        self.decoder = Decoder(self.encoder.out_channels, out_channels, output_stride)

    def forward(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) normalised RGB -> (B, out_channels, h, w) with h = ceil(H / output_stride)
        for stride 2 and the encoder's own size (layer1..layer4) for strides 4..32."""
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must have shape (B, 3, H, W), got {shape}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point, got {images.dtype}")
        if images.dtype != self.encoder.conv1.weight.dtype:
            raise TypeError(f"images must have the model's dtype {self.encoder.conv1.weight.dtype}, got {images.dtype}")
        height, width = images.shape[-2:]
        if height < 32 or width < 32:
            raise ValueError(f"images must be at least 32 x 32 pixels (stride-32 encoder), got {height} x {width}")
        coarsest = images.shape[0] * -(-height // 32) * -(-width // 32)  # values per channel at stride 32
        if self.training and coarsest < 2:  # BatchNorm's batch statistics need two values per channel
            raise ValueError(f"images: a training-mode forward needs more than one value per channel at stride 32 "
                             f"(BatchNorm), got a batch of {images.shape[0]} at {height} x {width}: use a batch of "
                             f"at least 2, images larger than 32 x 32, or model.eval()")
        half_size = (-(-height // 2), -(-width // 2))  # ceil: the stem's stride-2 grid
        return self.decoder(self.encoder(images), half_size)


def resunet18(out_channels: int = 32, output_stride: int = 2, encoder_weights=None) -> ResUNet:
    """Pri3D's Res18UNet (32 output channels by default). ``encoder_weights``: a torchvision resnet18
    state dict or path (ImageNet initialisation), else random init."""
    model = ResUNet(18, out_channels, output_stride)
    if encoder_weights is not None:
        load_torchvision_resnet(model.encoder, encoder_weights)
    return model


def resunet50(out_channels: int = 128, output_stride: int = 2, encoder_weights=None) -> ResUNet:
    """Pri3D's Res50UNet (128 output channels by default). ``encoder_weights``: a torchvision resnet50
    state dict or path, else random init."""
    model = ResUNet(50, out_channels, output_stride)
    if encoder_weights is not None:
        load_torchvision_resnet(model.encoder, encoder_weights)
    return model
