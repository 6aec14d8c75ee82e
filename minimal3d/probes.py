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
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    valid = target != ignore_index
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
    """RMSE and AbsRel = mean |pred - target| / target over valid pixels (target > 0 and ``mask``)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    valid = (target > 0) & torch.isfinite(target) & torch.isfinite(pred)
    if mask is not None:
        valid &= mask.bool()
    if not bool(valid.any()):
        raise ValueError("depth_metrics needs at least one pixel with target > 0")
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
        features = features.to(self.weight.device, self.weight.dtype)
        return ((features - self.mean) / self.std) @ self.weight + self.bias


def _standardise(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be (N, C) with N > 0, got {tuple(features.shape)}")
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
    if labels.shape != features.shape[:1]:
        raise ValueError(f"labels must be (N,) = ({features.shape[0]},), got {tuple(labels.shape)}")
    keep = labels != ignore_index
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


def fit_linear_regressor(features: Tensor, targets: Tensor, ridge: float = 1e-3) -> LinearProbe:
    """Closed-form ridge regression of targets (N,) or (N, outputs) on standardised features (N, C)."""
    if targets.shape[0] != features.shape[0]:
        raise ValueError(f"targets must have N = {features.shape[0]} rows, got {tuple(targets.shape)}")
    standardised, mean, std = _standardise(features)
    targets = targets.detach().double().to(standardised.device).reshape(standardised.shape[0], -1)
    target_mean = targets.mean(0)
    count, channels = standardised.shape
    gram = standardised.T @ standardised / count + ridge * torch.eye(channels, dtype=torch.float64,
                                                                    device=standardised.device)
    weight = torch.linalg.solve(gram, standardised.T @ (targets - target_mean) / count)
    return LinearProbe(mean, std, weight, target_mean)
