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
