"""PointInfoNCE and the auxiliary depth loss of Pri3D.

Paper: Ji Hou, Saining Xie, Benjamin Graham, Angela Dai, Matthias Nießner, "Pri3D: Can 3D Priors Help 2D
Representation Learning?", ICCV 2021, arXiv:2104.11225. Official code: Sekunde/Pri3D
(pretrain/pri3d/model/loss.py: ``ContrastiveLoss``, ``DepthLoss``). The one-directional form is
PointContrast's (Xie et al., ECCV 2020, arXiv:2007.10985; facebookresearch/PointContrast, ``NCESoftmaxLoss``).

The n matched pixels (or pixel/voxel pairs) of one frame pair give q, k (n, D) with row i of q matching row
i of k. With L2-normalised rows and S = q k^T / T (n, n):

    loss = CE(S, arange n) = -1/n sum_i log( exp(S_ii) / sum_j exp(S_ij) )    # Eq. 1 of the paper (q -> k)
    loss = ( CE(S, arange n) + CE(S^T, arange n) ) / 2                        # official code: symmetric

The paper's Eq. 1 (PointContrast's form) contrasts every positive q_i . k_i against the n - 1 other keys
(row softmax): ``symmetric=False``. The official Pri3D code also contrasts it against the n - 1 other
queries (column softmax) and averages the two: ``symmetric=True`` (the default here, because the golden
files and the official training use it; ``train_pri3d.py --loss`` picks the form). Both normalise the rows
(Pri3D inside the loss, PointContrast in the network). Duplicated matches (sampling with replacement when
fewer than 1024 matches exist) are kept, so a duplicate acts as a negative of itself, as in the official
code. n = 0 (no matches) gives a zero loss that is still attached to q and k (the official code skips
such a pair; dividing by the batch size as it does gives the same total).

``chunk_size`` switches to a streaming path that never builds the n x n matrix: one pass over column
blocks of k accumulates the row log-sum-exp (merged with ``logaddexp``) and the column log-sum-exp of each
block; the backward pass recomputes each block. Memory is O(n * chunk_size) and the result equals the dense
path to float64 round-off.
"""

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

NORMALIZE_EPS = 1e-12  # rows are divided by max(||x||, eps) (F.normalize); a zero row stays zero


def _check_pair(q: Tensor, k: Tensor, temperature: float, check_finite: bool) -> None:
    """Shape/dtype/temperature checks (no host sync); the NaN/inf scan (one sync) only with check_finite."""
    if not isinstance(q, Tensor) or not isinstance(k, Tensor):
        raise TypeError("q and k must be torch tensors of shape (n, D)")
    if q.ndim != 2 or k.ndim != 2:
        raise ValueError(f"q and k must have shape (n, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape (n, D) (row i of q matches row i of k), "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    if not q.is_floating_point() or not k.is_floating_point():
        raise TypeError(f"q and k must be floating point, got {q.dtype} and {k.dtype}")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not (temperature > 0 and temperature < float("inf")):  # `not >` also refuses NaN
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if check_finite and not bool(torch.isfinite(q).all() & torch.isfinite(k).all()):  # one host sync
        raise ValueError("q or k contains NaN or inf features")


class _ChunkedLogSumExp(torch.autograd.Function):
    """Row and column log-sum-exp of S = q k^T / T without materialising S (n, n).

    forward: q, k (n, D) -> row_lse (n,) = logsumexp_j S_ij, col_lse (n,) = logsumexp_i S_ij.
    backward: dL/dS_ij = g_row_i softmax_j(S)_ij + g_col_j softmax_i(S)_ij, recomputed block by block.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, temperature: float, chunk_size: int, columns: bool):
        n = q.shape[0]
        row_lse = torch.full((n,), float("-inf"), dtype=q.dtype, device=q.device)
        col_lse = torch.empty(n if columns else 0, dtype=q.dtype, device=q.device)
        for start in range(0, n, chunk_size):
            logits = q @ k[start:start + chunk_size].T / temperature  # (n, c) block of S
            row_lse = torch.logaddexp(row_lse, torch.logsumexp(logits, dim=1))
            if columns:
                col_lse[start:start + chunk_size] = torch.logsumexp(logits, dim=0)
        ctx.save_for_backward(q, k, row_lse, col_lse)
        ctx.temperature, ctx.chunk_size, ctx.columns = temperature, chunk_size, columns
        return row_lse, col_lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_row: Tensor, grad_col: Tensor):
        q, k, row_lse, col_lse = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        grad_q, grad_k = torch.zeros_like(q), torch.zeros_like(k)
        for start in range(0, q.shape[0], chunk_size):
            block = slice(start, start + chunk_size)
            logits = q @ k[block].T / temperature  # (n, c), recomputed
            grad_logits = torch.exp(logits - row_lse[:, None]) * grad_row[:, None]  # row softmax
            if ctx.columns:
                grad_logits += torch.exp(logits - col_lse[None, block]) * grad_col[None, block]
            grad_q += grad_logits @ k[block] / temperature
            grad_k[block] = grad_logits.T @ q / temperature
        return grad_q, grad_k, None, None, None


def point_info_nce(
    q: Tensor,
    k: Tensor,
    temperature: float = 0.4,
    symmetric: bool = True,
    normalize: bool = True,
    chunk_size: int | None = None,
    check: bool = True,
) -> Tensor:
    """PointInfoNCE over the n x n similarities of matched features.

    q, k: (n, D), row i of q matches row i of k (all other rows are negatives).
    temperature: T (Pri3D and its ScanNet script: 0.4; PointContrast's yaml default: 0.07).
    symmetric: average the row (q -> k) and column (k -> q) cross-entropies (Pri3D); False = rows only
        (PointContrast). normalize: L2-normalise rows first (Pri3D; eps NORMALIZE_EPS, so a zero row gives
        similarity 0, never NaN). chunk_size: stream over column blocks of this size (O(n * chunk_size)
        memory) instead of building the (n, n) logits.
    check: scan q and k for NaN/inf (one host sync) and raise ValueError. Training loops pass False: the
        scan would stall every step, and NaN features then flow through to a NaN loss.
    Returns the scalar loss (0 exactly for n = 1; 0, attached to q and k, for n = 0). Raises ValueError on
    mismatched shapes, a non-positive or non-finite temperature and (with check) NaN/inf features.
    """
    _check_pair(q, k, temperature, check)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if q.shape[0] == 0:  # no matches: a defined zero (the official code skips the pair)
        return (q.sum() + k.sum()) * 0.0
    if normalize:
        q = F.normalize(q, dim=1, eps=NORMALIZE_EPS)
        k = F.normalize(k, dim=1, eps=NORMALIZE_EPS)
    if chunk_size is None:
        logits = q @ k.T / temperature  # (n, n), S_ij = q_i . k_j / T
        labels = torch.arange(q.shape[0], device=q.device)
        loss = F.cross_entropy(logits, labels)  # Eq. 1: -mean_i log softmax_j(S_ij)[i], q -> k
        if symmetric:
            loss = (loss + F.cross_entropy(logits.T, labels)) / 2  # official code: symmetric
        return loss
    row_lse, col_lse = _ChunkedLogSumExp.apply(q, k, temperature, chunk_size, symmetric)
    positives = (q * k).sum(dim=1) / temperature  # S_ii
    if symmetric:
        return (row_lse.mean() + col_lse.mean()) / 2 - positives.mean()
    return row_lse.mean() - positives.mean()


# --- auxiliary depth loss (Pri3D pretrain.depth=True, on in the official ScanNet script) -----------------

def _sobel(images: Tensor) -> tuple[Tensor, Tensor]:
    """Sobel x/y responses of (B, 1, H, W), cross-correlation with zero padding 1 (official ``Sobel``)."""
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=images.dtype,
                      device=images.device)
    kernels = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3); kx.T == [[1,2,1],[0,0,0],[-1,-2,-1]]
    grads = F.conv2d(images, kernels, padding=1)
    return grads[:, :1], grads[:, 1:]


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp_min(1)


def depth_loss(pred: Tensor, target: Tensor, invalid_value: float = 0.0) -> Tensor:
    """Pri3D's auxiliary depth loss (after Hu et al., "Revisiting Single Image Depth Estimation", 2019).

    pred: (B, 1, H, W) predicted depth; target: (B, H, W) depth, ``invalid_value`` marks holes (ScanNet: 0;
    ``float("nan")`` works too) and non-finite target values are always holes.
    loss = ( mean log(|t - p| + 0.5) + mean (1 - cos(n_t, n_p))
             + mean log(|dx_t - dx_p| + 0.5) + mean log(|dy_t - dy_p| + 0.5) ) / 3,
    means over valid target pixels, n = (-dx, -dy, 1) from Sobel gradients. Holes enter the target's Sobel
    responses as 0 (as the official code's 0 holes do). A frame without valid pixels contributes 0 (the
    official code returns NaN there). NaN in ``pred`` flows through to a NaN loss.
    """
    if not isinstance(pred, Tensor) or pred.ndim != 4 or pred.shape[1] != 1:
        shape = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
        raise ValueError(f"pred must have shape (B, 1, H, W), got {shape}")
    if not isinstance(target, Tensor) or target.shape != (pred.shape[0],) + pred.shape[2:]:
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"target must have shape (B, H, W) = {(pred.shape[0],) + tuple(pred.shape[2:])}, "
                         f"got {shape}")
    if not pred.is_floating_point():
        raise TypeError(f"pred must be floating point, got {pred.dtype}")
    if not isinstance(invalid_value, numbers.Real) or isinstance(invalid_value, bool):
        raise TypeError(f"invalid_value must be a real number (e.g. 0.0 or float('nan')), got {invalid_value!r}")
    target = target[:, None].to(pred.dtype)  # (B, 1, H, W)
    mask = torch.isfinite(target) & (target != invalid_value)  # NaN != NaN: a NaN invalid_value masks NaN holes
    target = torch.where(mask, target, torch.zeros_like(target))  # holes are 0 (no NaN reaches a gradient)
    dx_t, dy_t = _sobel(target)
    dx_p, dy_p = _sobel(pred)
    normal_t = torch.cat([-dx_t, -dy_t, torch.ones_like(dx_t)], dim=1)  # (B, 3, H, W)
    normal_p = torch.cat([-dx_p, -dy_p, torch.ones_like(dx_p)], dim=1)
    cosine = (normal_t * normal_p).sum(1, keepdim=True) / (normal_t.norm(dim=1, keepdim=True)
                                                          * normal_p.norm(dim=1, keepdim=True))
    loss_depth = _masked_mean(torch.log((target - pred).abs() + 0.5), mask)
    loss_normal = _masked_mean((1 - cosine).abs(), mask)
    loss_gradient = (_masked_mean(torch.log((dx_t - dx_p).abs() + 0.5), mask)
                     + _masked_mean(torch.log((dy_t - dy_p).abs() + 0.5), mask))
    return (loss_depth + loss_normal + loss_gradient) / 3
