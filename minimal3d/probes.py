"""Evaluation shared by the scripts: segmentation and depth metrics, and linear probes on frozen features.

The probes are deliberately simple and deterministic so that two backbones are compared on equal terms:
features are standardised with statistics of the training set, a classifier is a linear layer trained with
full-batch L-BFGS on the cross-entropy (plus a small L2 penalty), a regressor is closed-form ridge regression.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def segmentation_metrics(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = -1) -> dict:
    """mIoU, mAcc (mean class accuracy) and aAcc (pixel accuracy) of integer label maps of equal shape.

    Classes absent from both prediction and target are left out of the means (as mmsegmentation does for
    IoU when the union is empty); mAcc averages over classes present in the target.
    """
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"pred and target must be tensors, got {type(pred).__name__} and {type(target).__name__}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    for name, labels in (("pred", pred), ("target", target)):
        if labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer labels, got {labels.dtype}")
        if labels.is_floating_point() and not bool((labels == labels.round()).all()):
            raise ValueError(f"{name} must hold integer labels, got non-integer (or NaN) values in {labels.dtype}")
    if isinstance(num_classes, bool) or not hasattr(num_classes, "__index__") or num_classes.__index__() < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = num_classes.__index__()
    valid = target != ignore_index
    if not bool(valid.any()):
        raise ValueError(f"target has no pixel to evaluate (empty, or all equal to ignore_index={ignore_index})")
    pred, target = pred[valid].long(), target[valid].long()
    if bool(((target < 0) | (target >= num_classes)).any()) or bool(((pred < 0) | (pred >= num_classes)).any()):
        raise ValueError(f"labels must be in [0, {num_classes}) or ignore_index={ignore_index}")
    confusion = torch.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    true_positive = confusion.diagonal().double()
    in_target, in_pred = confusion.sum(1).double(), confusion.sum(0).double()
    union = in_target + in_pred - true_positive
    iou = true_positive[union > 0] / union[union > 0]
    accuracy = true_positive[in_target > 0] / in_target[in_target > 0]
    total = max(int(valid.sum()), 1)
    return {"mIoU": float(iou.mean()) if len(iou) else 0.0,
            "mAcc": float(accuracy.mean()) if len(accuracy) else 0.0,
            "aAcc": float(true_positive.sum()) / total}


def depth_metrics(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> dict:
    """RMSE and AbsRel = mean |pred - target| / target over valid pixels (target > 0 and ``mask``).

    Pixels where pred or target is not finite are left out (holes); no valid pixel raises ValueError."""
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"pred and target must be tensors, got {type(pred).__name__} and {type(target).__name__}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if not pred.is_floating_point() or not target.is_floating_point():
        raise TypeError(f"pred and target must be floating-point depths, got {pred.dtype} and {target.dtype}")
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != pred.shape):
        raise ValueError(f"mask must have the shape of pred {tuple(pred.shape)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
    valid = (target > 0) & torch.isfinite(target) & torch.isfinite(pred)
    if mask is not None:
        valid &= mask.bool()
    if not bool(valid.any()):
        raise ValueError("target has no valid pixel: depth_metrics needs at least one finite target > 0 "
                         "(inside mask, with a finite pred)")
    pred, target = pred[valid].double(), target[valid].double()
    return {"RMSE": float(((pred - target) ** 2).mean().sqrt()),
            "AbsRel": float(((pred - target).abs() / target).mean())}



# ---------------------------------------------------------------------------------------------------
# 3D-Prior: cue-conflict shape bias (Geirhos et al., ICLR 2019)
# ---------------------------------------------------------------------------------------------------


def shape_bias(predictions: Tensor, shape_labels: Tensor, texture_labels: Tensor) -> dict:
    """Shape bias of class predictions (N,) on cue-conflict images with shape and texture labels (N,).

    Geirhos et al.: images whose shape and texture class agree are left out; among the remaining images
    whose prediction is the shape or the texture class, shape bias = (# shape) / (# shape + # texture).
    Returns shape_bias (nan when no prediction matches either cue), shape_fraction and texture_fraction
    (of the conflicting images) and the counts.
    """
    for name, tensor in (("predictions", predictions), ("shape_labels", shape_labels),
                         ("texture_labels", texture_labels)):
        if not isinstance(tensor, Tensor) or tensor.ndim != 1 or tensor.is_floating_point() or tensor.is_complex():
            raise ValueError(f"{name} must be an integer tensor (N,), got "
                             f"{tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__}")
    if not predictions.shape == shape_labels.shape == texture_labels.shape:
        raise ValueError(f"predictions, shape_labels and texture_labels must have the same length, got "
                         f"{len(predictions)}, {len(shape_labels)}, {len(texture_labels)}")
    conflict = shape_labels != texture_labels
    predictions, shape_labels, texture_labels = predictions[conflict], shape_labels[conflict], texture_labels[conflict]
    shape_hits = int((predictions == shape_labels).sum())
    texture_hits = int((predictions == texture_labels).sum())
    count = int(conflict.sum())
    decided = shape_hits + texture_hits
    return {"shape_bias": shape_hits / decided if decided else float("nan"),
            "shape_fraction": shape_hits / count if count else float("nan"),
            "texture_fraction": texture_hits / count if count else float("nan"),
            "conflicting_images": count, "shape_decisions": shape_hits, "texture_decisions": texture_hits}

@dataclass
class LinearProbe:
    """A standardise-then-linear map fitted by ``fit_linear_classifier`` / ``fit_linear_regressor``."""

    mean: Tensor  # (C,)
    std: Tensor  # (C,)
    weight: Tensor  # (C, outputs)
    bias: Tensor  # (outputs,)

    def __call__(self, features: Tensor) -> Tensor:
        """features (N, C) -> outputs (N, outputs): logits for a classifier, values for a regressor."""
        if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features must be (N, {self.mean.shape[0]}) (the channels the probe was fitted on), "
                             f"got {getattr(features, 'shape', type(features).__name__)}")
        features = features.to(self.weight.device, self.weight.dtype)
        return ((features - self.mean) / self.std) @ self.weight + self.bias


def _standardise(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"features must be (N, C) with N > 0 and C > 0, got "
                         f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point, got {features.dtype}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features must be finite")
    features = features.detach().double()
    mean, std = features.mean(0), features.std(0, unbiased=False).clamp_min(1e-6)
    return (features - mean) / std, mean, std


def fit_linear_classifier(features: Tensor, labels: Tensor, num_classes: int, weight_decay: float = 1e-4,
                          max_iter: int = 200, ignore_index: int = -1) -> LinearProbe:
    """Multinomial logistic regression on standardised features (N, C) and integer labels (N,).

    Full-batch L-BFGS from zero weights, so the result is deterministic. Pixels (rows) labelled
    ``ignore_index`` are dropped.
    """
    if not isinstance(features, Tensor) or features.ndim != 2:
        raise ValueError(f"features must be (N, C), got {getattr(features, 'shape', type(features).__name__)}")
    if not isinstance(labels, Tensor) or labels.shape != features.shape[:1]:
        raise ValueError(f"labels must be (N,) = ({features.shape[0]},), got {getattr(labels, 'shape', labels)}")
    if labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    if labels.is_floating_point() and not bool((labels == labels.round()).all()):
        raise ValueError(f"labels must be integers, got non-integer (or NaN) values in {labels.dtype}")
    if isinstance(num_classes, bool) or not hasattr(num_classes, "__index__") or num_classes.__index__() < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = num_classes.__index__()
    if not 0 <= weight_decay < float("inf"):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    if isinstance(max_iter, bool) or not hasattr(max_iter, "__index__") or max_iter.__index__() < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    keep = labels != ignore_index
    if not bool(keep.any()):
        raise ValueError(f"labels has no sample to fit (empty, or all equal to ignore_index={ignore_index})")
    features, labels = features[keep], labels[keep].long()
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"labels must be in [0, {num_classes})")
    standardised, mean, std = _standardise(features)
    labels = labels.to(standardised.device)
    weight = torch.zeros(standardised.shape[1], num_classes, dtype=torch.float64, device=standardised.device,
                         requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=standardised.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(standardised @ weight + bias, labels) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


# ---------------------------------------------------------------------------------------------------
# FiT3D / DINOv2 probe protocol: linear heads on patch features, logits upsampled to pixels
# ---------------------------------------------------------------------------------------------------


def bilinear_taps(grid_size: tuple[int, int], image_size: tuple[int, int], pixels: Tensor) -> tuple[Tensor, Tensor]:
    """Where bilinear upsampling of an (h, w) grid to (H, W) reads pixel ``pixels`` (P,) (flat y * W + x).

    Returns indices (P, 4) into the flattened grid and weights (P, 4) such that
    ``(grid.flatten(-2)[..., indices] * weights).sum(-1)`` equals
    ``F.interpolate(grid, (H, W), mode="bilinear", align_corners=False).flatten(-2)[..., pixels]``.
    """
    (h, w), (height, width) = grid_size, image_size
    y = (pixels // width).double()
    x = (pixels % width).double()

    def axis(coord: Tensor, size_in: int, size_out: int) -> tuple[Tensor, Tensor, Tensor]:
        source = ((coord + 0.5) * (size_in / size_out) - 0.5).clamp_min(0.0)  # align_corners=False
        low = source.floor().long().clamp(max=size_in - 1)
        high = (low + 1).clamp(max=size_in - 1)
        return low, high, source - low
    y0, y1, fy = axis(y, h, height)
    x0, x1, fx = axis(x, w, width)
    indices = torch.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1], -1)
    weights = torch.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], -1)
    return indices, weights


@dataclass
class PatchHead:
    """A linear head on standardised patch features whose logits are upsampled bilinearly to pixels.

    ``mean``/``std`` (C,) play the role of the BatchNorm in DINOv2's linear heads (statistics of the
    training set), ``weight`` (C, K) and ``bias`` (K,) the 1x1 convolution. ``bin_centres`` (K,) is set
    for a depth head: the prediction is the softmax-weighted mean of the bin centres.
    """

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor
    bin_centres: Tensor | None = None

    def patch_logits(self, features: Tensor) -> Tensor:
        """features (B, C, h, w) -> logits (B, K, h, w)."""
        standardised = (features.to(self.weight) - self.mean[:, None, None]) / self.std[:, None, None]
        return torch.einsum("bchw,ck->bkhw", standardised, self.weight) + self.bias[:, None, None]

    def logits(self, features: Tensor, image_size: tuple[int, int]) -> Tensor:
        """features (B, C, h, w) -> logits upsampled to (B, K, H, W) (bilinear, align_corners=False)."""
        return F.interpolate(self.patch_logits(features), size=image_size, mode="bilinear", align_corners=False)

    def predict(self, features: Tensor, image_size: tuple[int, int]) -> Tensor:
        """(B, H, W): class indices (segmentation head) or depths (depth head)."""
        logits = self.logits(features, image_size)
        if self.bin_centres is None:
            return logits.argmax(1)
        return torch.einsum("bkhw,k->bhw", logits.softmax(1), self.bin_centres)


def _check_patch_inputs(features: Tensor, targets: Tensor, name: str) -> None:
    if features.ndim != 4 or features.shape[0] == 0:
        raise ValueError(f"features must be (B, C, h, w) with B > 0, got {tuple(features.shape)}")
    if targets.ndim != 3 or targets.shape[0] != features.shape[0]:
        raise ValueError(f"{name} must be (B, H, W) with B = {features.shape[0]}, got {tuple(targets.shape)}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features must be finite")


def _fit_patch_head(features: Tensor, image_size: tuple[int, int], pixels: Tensor, classes: Tensor,
                    num_classes: int, weight_decay: float, max_iter: int, dtype: torch.dtype,
                    class_tokens: Tensor | None = None, pixels_per_chunk: int = 4096) -> tuple:
    """Cross-entropy of upsampled logits at the chosen pixels (B, P) of every image, full-batch L-BFGS.

    With ``class_tokens`` (B, C') the head sees every patch feature with its image's class token appended
    (``with_class_token``), computed without repeating the token: its half of the logits is one (B, K)
    product, constant over an image's patches, so upsampling (weights summing to 1) passes it unchanged to
    every pixel, and its standardisation statistics over the B * h * w repeated rows are those over the B
    tokens. The loss is a sum over images, so every L-BFGS evaluation computes and differentiates it one
    chunk of images (about ``pixels_per_chunk`` pixels) at a time: the same loss and gradient up to float
    rounding, without allocating the (pixels, K) logits of the whole batch afresh in every evaluation.
    Returns mean, std, weight of the appended features (C + C').
    """
    batch, channels, h, w = features.shape
    flat = features.detach().to(dtype).permute(0, 2, 3, 1).reshape(-1, channels)  # (B*h*w, C)
    mean, std = flat.mean(0), flat.std(0, unbiased=False).clamp_min(1e-6)
    standardised = (flat - mean) / std
    indices, weights = bilinear_taps((h, w), image_size, pixels.reshape(-1))  # into one image's h*w grid
    image_of_pixel = torch.arange(batch).repeat_interleave(pixels.shape[1])
    classes = classes.reshape(-1)
    keep = classes >= 0
    indices, weights, classes, image_of_pixel = indices[keep], weights[keep], classes[keep], image_of_pixel[keep]
    width = channels
    standardised_tokens = None
    if class_tokens is not None:
        tokens = class_tokens.detach().to(dtype)
        token_mean, token_std = tokens.mean(0), tokens.std(0, unbiased=False).clamp_min(1e-6)
        standardised_tokens = (tokens - token_mean) / token_std  # (B, C')
        mean, std, width = torch.cat([mean, token_mean]), torch.cat([std, token_std]), channels + tokens.shape[1]
    images_per_chunk = max(1, pixels_per_chunk // pixels.shape[1])
    chunks = []  # (first image, last image, upsampling, image of each pixel in the chunk, classes)
    for first in range(0, batch, images_per_chunk):
        last = min(first + images_per_chunk, batch)
        inside = (image_of_pixel >= first) & (image_of_pixel < last)
        local_image = image_of_pixel[inside] - first
        columns = indices[inside] + (local_image * h * w)[:, None]  # into the chunk's (last - first)*h*w rows
        rows = torch.arange(len(columns)).repeat_interleave(4)
        upsampling = torch.sparse_coo_tensor(torch.stack([rows, columns.reshape(-1)]),
                                             weights[inside].reshape(-1).to(dtype),
                                             (len(columns), (last - first) * h * w), check_invariants=True)
        # (P_chunk, chunk's h*w rows) with the 4 bilinear taps of each pixel in its row
        chunks.append((first, last, upsampling.coalesce(), local_image, classes[inside]))
    count = len(classes)
    weight = torch.zeros(width, num_classes, dtype=dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = weight_decay * weight.square().sum()
        loss.backward()
        for first, last, upsampling, local_image, chunk_classes in chunks:
            # the 1x1 convolution on the chunk's patch grid (chunk*h*w, K), bilinearly upsampled to its pixels
            patch_logits = standardised[first * h * w : last * h * w] @ weight[:channels] + bias
            pixel_logits = torch.sparse.mm(upsampling, patch_logits)
            if standardised_tokens is not None:  # the class token's half, the same for every pixel of an image
                pixel_logits = pixel_logits + (standardised_tokens[first:last] @ weight[channels:])[local_image]
            part = F.cross_entropy(pixel_logits, chunk_classes, reduction="sum") / count
            part.backward()
            loss = loss + part.detach()
        return loss

    optimizer.step(closure)
    return mean, std, weight.detach(), bias.detach()


def _pixel_sample(batch: int, image_size: tuple[int, int], per_image: int | None,
                  generator: torch.Generator | None) -> Tensor:
    count = image_size[0] * image_size[1]
    if per_image is None or per_image >= count:
        return torch.arange(count).expand(batch, count)
    return torch.stack([torch.randperm(count, generator=generator)[:per_image] for _ in range(batch)])


def fit_segmentation_head(features: Tensor, labels: Tensor, num_classes: int, ignore_index: int = -1,
                          pixels_per_image: int | None = None, weight_decay: float = 1e-4, max_iter: int = 200,
                          generator: torch.Generator | None = None) -> PatchHead:
    """The linear segmentation probe of DINOv2 / FiT3D: a linear layer on patch features (B, C, h, w), its
    logits upsampled bilinearly to the label maps (B, H, W) and trained with cross-entropy per pixel.

    Labels equal to ``ignore_index`` are left out. ``pixels_per_image`` random pixels per image enter the
    loss (None = all). Full-batch L-BFGS from zero weights (deterministic) with an L2 penalty replaces the
    paper's SGD schedule. Since upsampling is linear, this head equals a linear classifier on bilinearly
    upsampled features (``fit_linear_classifier``); here the logits are upsampled, as in the paper.
    """
    _check_patch_inputs(features, labels, "labels")
    labels = labels.long()
    if bool(((labels != ignore_index) & ((labels < 0) | (labels >= num_classes))).any()):
        raise ValueError(f"labels must be in [0, {num_classes}) or ignore_index={ignore_index}")
    image_size = tuple(labels.shape[-2:])
    pixels = _pixel_sample(len(labels), image_size, pixels_per_image, generator)
    classes = labels.flatten(1).gather(1, pixels)
    classes = torch.where(classes == ignore_index, -1, classes)
    mean, std, weight, bias = _fit_patch_head(features, image_size, pixels, classes, num_classes, weight_decay,
                                              max_iter, torch.float64)
    return PatchHead(mean, std, weight, bias)


def fit_depth_head(features: Tensor, depths: Tensor, class_tokens: Tensor | None = None, num_bins: int = 256,
                   max_depth: float | None = None, min_depth: float = 1e-3, pixels_per_image: int | None = 1000,
                   weight_decay: float = 1e-4, max_iter: int = 100,
                   generator: torch.Generator | None = None) -> tuple[PatchHead, Tensor | None]:
    """The DINOv2 linear depth probe ("lin. 1"): the [CLS] token (B, C) is concatenated to every patch
    feature (B, C, h, w), a linear layer predicts ``num_bins`` logits per patch (uniform bins on
    [min_depth, max_depth]), the logits are upsampled bilinearly to the depth maps (B, H, W) and trained
    with cross-entropy against the bin of the true depth; the prediction is the softmax-weighted mean of
    the bin centres. Pixels with depth <= 0 or non-finite are ignored; ``max_depth`` defaults to the
    largest training depth. Returns the head and the features it expects (patches with the class token
    appended, use ``with_class_token`` for new images).
    """
    _check_patch_inputs(features, depths, "depths")
    if not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
    valid = torch.isfinite(depths) & (depths > 0)
    if not bool(valid.any()):
        raise ValueError("depths must have at least one pixel with depth > 0")
    max_depth = float(depths[valid].max()) if max_depth is None else float(max_depth)
    if not max_depth > min_depth:
        raise ValueError(f"max_depth must exceed min_depth={min_depth}, got {max_depth}")
    appended = with_class_token(features, class_tokens)
    centres = torch.linspace(min_depth, max_depth, num_bins, dtype=torch.float64)  # DINOv2 "UD" bins
    image_size = tuple(depths.shape[-2:])
    pixels = _pixel_sample(len(depths), image_size, pixels_per_image, generator)
    sampled = depths.flatten(1).gather(1, pixels).double()
    bins = ((sampled - min_depth) / (max_depth - min_depth) * (num_bins - 1)).round().clamp(0, num_bins - 1)
    bins = torch.where(torch.isfinite(sampled) & (sampled > 0), bins.nan_to_num(0.0).long(), -1)
    mean, std, weight, bias = _fit_patch_head(features, image_size, pixels, bins, num_bins, weight_decay,
                                              max_iter, torch.float32, class_tokens)
    return PatchHead(mean, std, weight, bias, bin_centres=centres.float()), appended


def with_class_token(features: Tensor, class_tokens: Tensor | None) -> Tensor:
    """Patch features (B, C, h, w) with the class token (B, C') appended to each patch: (B, C + C', h, w)."""
    if class_tokens is None:
        return features
    if class_tokens.ndim != 2 or class_tokens.shape[0] != features.shape[0]:
        raise ValueError(f"class_tokens must be (B, C') with B = {features.shape[0]}, got {tuple(class_tokens.shape)}")
    grid = class_tokens[:, :, None, None].expand(-1, -1, *features.shape[-2:])
    return torch.cat([features, grid.to(features)], 1)


def fit_linear_regressor(features: Tensor, targets: Tensor, ridge: float = 1e-3) -> LinearProbe:
    """Closed-form ridge regression of targets (N,) or (N, outputs) on standardised features (N, C).

    ridge > 0 keeps the normal equations well posed (constant or duplicated features); targets must be finite."""
    if not isinstance(features, Tensor) or features.ndim != 2:
        raise ValueError(f"features must be (N, C), got {getattr(features, 'shape', type(features).__name__)}")
    if not isinstance(targets, Tensor) or targets.ndim not in (1, 2) or targets.shape[0] != features.shape[0]:
        raise ValueError(f"targets must be (N,) or (N, outputs) with N = {features.shape[0]}, got "
                         f"{getattr(targets, 'shape', type(targets).__name__)}")
    if not 0 < ridge < float("inf"):
        raise ValueError(f"ridge must be a finite number > 0, got {ridge}")
    if not bool(torch.isfinite(targets).all()):
        raise ValueError("targets must be finite")
    standardised, mean, std = _standardise(features)
    targets = targets.detach().double().to(standardised.device).reshape(standardised.shape[0], -1)
    target_mean = targets.mean(0)
    count, channels = standardised.shape
    gram = standardised.T @ standardised / count + ridge * torch.eye(channels, dtype=torch.float64,
                                                                    device=standardised.device)
    weight = torch.linalg.solve(gram, standardised.T @ (targets - target_mean) / count)
    return LinearProbe(mean, std, weight, target_mean)
