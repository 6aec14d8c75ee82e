"""Grouped vMF contrast of 3D-CompNets: vertex memory, grouped/full contrastive loss, classification.

Paper: X. Yuan, G. Zhang, P. Kaushik, L. Jesslen, A. Kortylewski, A. Yuille, "Scaling 3D Compositional
Models for Robust Classification and Pose Estimation" (ICCV 2025). No public code exists; the
conventions follow NOVUM (L. Jesslen et al., ECCV 2024, github.com/GenIntel/NOVUM: `FeatureBank.py`,
the loss block of `train.py`, the classification block of `inference.py`), which is the special case
N = K, omega = 1 of the loss below.

Every class y is a cuboid mesh with K_y vertices carrying unit features C^y_k (the vertex memory); a
bank of N_b unit background features beta_n is shared by all classes. For a visible vertex k of an
image of class y with feature f (unit, read at the vertex's projection) the loss is ONE cross-entropy
(Eq. 5, vMF likelihoods exp(f.C / T), T = 0.07) over the gathered columns

    own class:      C^y_j,  j not within `distance_threshold` pixels of k (k itself kept)   bias 0
    background:     beta_n, n < N_b                                                         bias log 0.005
    other classes:  N vertices sampled uniformly from every class y' != y with omega > 0    bias log omega[y, y']

With N = K (all vertices) and omega = 1 this is exactly NOVUM's full contrast. The memory is not
differentiated; it follows a momentum update (`VertexMemory.update`).
"""

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MASKED_LOGIT = -1e5  # NOVUM's additive mask: exp(logit - 1e5) underflows to exactly 0 for |logit| <= 1/T


class VertexMemory(torch.nn.Module):
    """Per-class vertex features (ragged, no padding) and a FIFO bank of background features.

    vertices:      (sum_y K_y, D) unit rows; class y owns rows class_offsets[y] : class_offsets[y+1].
    background:    (N_b, D) unit rows, a FIFO ring buffer written by `update`.
    class_offsets: (Y + 1,) int64.
    """

    def __init__(
        self,
        num_vertices: Sequence[int],
        dim: int = 128,
        num_background: int = 2560,
        momentum: float = 0.9,
        vertices: Tensor | None = None,
        background: Tensor | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        num_vertices = [int(k) for k in num_vertices]
        if len(num_vertices) == 0 or min(num_vertices) < 1:
            raise ValueError(f"num_vertices must list >= 1 vertex per class, got {num_vertices}")
        if num_background < 1:
            raise ValueError(f"num_background must be >= 1, got {num_background}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        total = sum(num_vertices)
        if vertices is None:
            vertices = torch.randn(total, dim, generator=generator)
        if background is None:
            background = torch.randn(num_background, dim, generator=generator)
        if vertices.shape != (total, dim) or background.shape != (num_background, dim):
            raise ValueError(
                f"vertices must be ({total}, {dim}) and background ({num_background}, {dim}), "
                f"got {tuple(vertices.shape)} and {tuple(background.shape)}"
            )
        self.momentum = momentum
        self.num_vertices = num_vertices
        offsets = torch.tensor([0] + num_vertices).cumsum(0)
        self.register_buffer("class_offsets", offsets)
        self.register_buffer("vertices", F.normalize(vertices.clone(), dim=-1))
        self.register_buffer("background", F.normalize(background.to(vertices).clone(), dim=-1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))  # next FIFO row to write

    @property
    def num_classes(self) -> int:
        return len(self.num_vertices)

    @property
    def vertex_class(self) -> Tensor:
        """(sum_y K_y,) class of every vertex row."""
        counts = torch.tensor(self.num_vertices, device=self.vertices.device)
        return torch.repeat_interleave(torch.arange(self.num_classes, device=counts.device), counts)

    def class_vertices(self, y: int) -> Tensor:
        """(K_y, D) vertex features of class y."""
        return self.vertices[int(self.class_offsets[y]) : int(self.class_offsets[y + 1])]

    @torch.no_grad()
    def update(self, vertex_features: Tensor, visible: Tensor, labels: Tensor, background_features: Tensor) -> None:
        """Momentum update of the vertex rows and FIFO write of the background features (NOVUM `FeatureBank`).

        vertex_features: (B, K_max, D) features at the projected vertices, slot k = vertex k of the image's class.
        visible: (B, K_max) 0/1. labels: (B,). background_features: (B, T, D).
        1. For every class c in the batch with n_c images: mean_c = (1/n_c) sum_{b: y_b = c} visible_b * f_b
           (divided by the number of images of class c); rows_c <- m rows_c + (1 - m) mean_c.
        2. The B*T background features (image-major) overwrite the FIFO rows starting at `pointer`; a write
           that would run past N_b starts again at row 0 (NOVUM's slots: rows past the last full slot stay).
        3. Every row is L2-normalised.
        """
        index, valid = _vertex_rows(self, vertex_features, visible, labels, "update")
        if background_features.ndim != 3 or background_features.shape[0] != labels.shape[0]:
            raise ValueError(f"background_features must be (B, T, D), got {tuple(background_features.shape)}")
        weights = (visible.to(vertex_features.dtype) * valid).unsqueeze(-1)  # (B, K_max, 1)
        images_per_class = torch.bincount(labels, minlength=self.num_classes).to(vertex_features.dtype)
        summed = torch.zeros_like(self.vertices).index_add_(
            0, index[valid], (weights * vertex_features)[valid].to(self.vertices.dtype)
        )
        row_count = images_per_class[self.vertex_class].unsqueeze(-1)  # (R, 1)
        present = row_count > 0
        mean = summed / row_count.clamp_min(1)
        updated = self.momentum * self.vertices + (1 - self.momentum) * mean
        self.vertices.copy_(F.normalize(torch.where(present, updated, self.vertices), dim=-1))

        new_rows = background_features.reshape(-1, background_features.shape[-1]).to(self.background.dtype)
        n = min(new_rows.shape[0], self.background.shape[0])
        start = int(self.pointer) if int(self.pointer) + n <= self.background.shape[0] else 0
        self.background[start : start + n] = F.normalize(new_rows[:n], dim=-1)
        self.pointer.fill_((start + n) % self.background.shape[0])


def _vertex_rows(memory: VertexMemory, vertex_features: Tensor, visible: Tensor, labels: Tensor, name: str):
    """Memory row of every slot (B, K_max) and whether the slot is a real vertex of the image's class."""
    if vertex_features.ndim != 3 or vertex_features.shape[-1] != memory.vertices.shape[-1]:
        raise ValueError(f"{name}: vertex_features must be (B, K_max, {memory.vertices.shape[-1]}), "
                         f"got {tuple(vertex_features.shape)}")
    B, K_max = vertex_features.shape[:2]
    if visible.shape != (B, K_max):
        raise ValueError(f"{name}: visible must be ({B}, {K_max}), got {tuple(visible.shape)}")
    _check_labels(labels, B, memory.num_classes, name)
    sizes = torch.tensor(memory.num_vertices, device=labels.device)[labels]  # (B,)
    if B and K_max < int(sizes.max()):
        raise ValueError(f"{name}: vertex_features has {K_max} slots but class {int(labels[sizes.argmax()])} "
                         f"has {int(sizes.max())} vertices")
    slot = torch.arange(K_max, device=labels.device)
    valid = slot < sizes[:, None]  # (B, K_max)
    index = memory.class_offsets.to(labels.device)[labels][:, None] + slot  # (B, K_max)
    return index, valid


def _check_labels(labels: Tensor, batch: int, num_classes: int, name: str) -> None:
    if labels.shape != (batch,) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: labels must be an integer tensor of shape ({batch},), "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if batch and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name}: labels must lie in [0, {num_classes}), got {labels.tolist()}")


def _check_unit(x: Tensor, name: str, tol: float = 1e-3) -> None:
    if x.numel() and float((x.detach().norm(dim=-1) - 1).abs().max()) > tol:
        raise ValueError(f"{name} must be unit vectors along the last dim (normalise them first)")


def confusion_weights(confusion: Tensor, threshold: float = 0.05) -> Tensor:
    """Cross-class weights omega (Y, Y) from a calibration confusion matrix (rows: true, cols: predicted).

    omega[y, y'] = fraction of class-y calibration images predicted as y'; 0 below `threshold` and on the
    diagonal (the own class is always fully contrasted). Classes without calibration images get omega = 0.
    """
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be (Y, Y), got {tuple(confusion.shape)}")
    if bool((confusion < 0).any()):
        raise ValueError("confusion must be non-negative counts")
    rates = confusion.double() / confusion.double().sum(1, keepdim=True).clamp_min(1e-12)
    eye = torch.eye(confusion.shape[0], dtype=torch.bool, device=confusion.device)
    omega = torch.where((rates >= threshold) & ~eye, rates, torch.zeros_like(rates))
    return omega.to(confusion.dtype if confusion.is_floating_point() else torch.float32)


def grouped_vmf_contrast(
    vertex_features: Tensor,
    keypoints: Tensor,
    visible: Tensor,
    labels: Tensor,
    memory: VertexMemory,
    omega: Tensor | None = None,
    num_sampled: int | None = 32,
    temperature: float = 0.07,
    distance_threshold: float = 48.0,
    background_weight: float = 0.005,
    cross_class_scale: str = "none",
    generator: torch.Generator | None = None,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, list[dict]]:
    """Grouped vMF contrastive loss (Eq. 5), averaged over all visible vertices of the batch.

    vertex_features: (B, K_max, D) unit features at the projected vertices (slot k = vertex k of class y_b).
    keypoints: (B, K_max, 2) pixel coordinates of ALL vertices (visible or not) for the near mask.
    visible: (B, K_max) 0/1; labels: (B,) int64 in [0, Y).
    omega: (Y, Y) non-negative cross-class weights (diagonal ignored); None means all ones.
    num_sampled: N vertices sampled (without replacement) per other class; None = all (full contrast).
    cross_class_scale: "none" or "k_over_n" (adds log(K_y' / N) so the sample estimates the full sum).
    Columns of omega = 0 classes are not gathered at all. Images without visible vertices contribute
    nothing; a batch without any visible vertex gives a zero loss (still attached to the graph).
    Returns the scalar loss, or (loss, groups) with return_logits, groups = list of dicts per class in
    the batch: image (V_y,), slot (V_y,), logits (V_y, C_y) masked logits, columns (C_y,) rows of
    cat([memory.vertices, memory.background]).
    """
    B = vertex_features.shape[0]
    _, valid = _vertex_rows(memory, vertex_features, visible, labels, "grouped_vmf_contrast")
    if keypoints.shape != vertex_features.shape[:2] + (2,):
        raise ValueError(f"keypoints must be ({B}, {vertex_features.shape[1]}, 2), got {tuple(keypoints.shape)}")
    Y = memory.num_classes
    if omega is not None:
        if omega.shape != (Y, Y):
            raise ValueError(f"omega must be ({Y}, {Y}), got {tuple(omega.shape)}")
        if not bool(torch.isfinite(omega).all()) or bool((omega < 0).any()):
            raise ValueError("omega must be finite and non-negative")
    if num_sampled is not None and num_sampled < 1:
        raise ValueError(f"num_sampled must be >= 1 or None, got {num_sampled}")
    if cross_class_scale not in ("none", "k_over_n"):
        raise ValueError(f"cross_class_scale must be 'none' or 'k_over_n', got {cross_class_scale!r}")
    if temperature <= 0 or background_weight <= 0:
        raise ValueError("temperature and background_weight must be > 0")
    is_visible = (visible > 0) & valid  # (B, K_max)
    _check_unit(vertex_features[is_visible], "vertex_features")

    sizes = torch.tensor(memory.num_vertices, device=labels.device)
    sampled_rows, sampled_count = _sample_vertices(memory, num_sampled, generator)  # (Y, N), (Y,)
    background_bias = math.log(background_weight)
    total = vertex_features.new_zeros(())
    groups = []
    num_visible = is_visible.sum()
    for y in torch.unique(labels[is_visible.any(1)]).tolist():  # one group per class in the batch
        image, slot = torch.nonzero(is_visible & (labels[:, None] == y), as_tuple=True)  # (V_y,)
        f = vertex_features[image, slot]  # (V_y, D)
        K_y = int(sizes[y])
        own_rows = torch.arange(K_y, device=labels.device) + memory.class_offsets[y]
        weight = torch.ones(Y, device=labels.device) if omega is None else omega[y].to(labels.device)
        others = torch.nonzero((weight > 0) & (torch.arange(Y, device=labels.device) != y)).flatten()
        is_sample = torch.arange(sampled_rows.shape[1], device=labels.device) < sampled_count[others, None]
        cross_rows = sampled_rows[others][is_sample]  # (sum_y' min(N, K_y'),) ragged, no padding
        cross_bias = torch.log(weight[others].double())  # log omega, Eq. 5
        if cross_class_scale == "k_over_n":
            cross_bias = cross_bias + torch.log(sizes[others].double() / sampled_count[others].double())
        cross_bias = cross_bias[:, None].expand_as(is_sample)[is_sample]
        kp = keypoints[image].to(f.dtype)  # (V_y, K_max, 2)
        dist = (kp[:, :K_y] - kp[torch.arange(len(slot), device=slot.device), slot][:, None]).norm(dim=-1)
        near = (dist <= distance_threshold) & (torch.arange(K_y, device=labels.device) != slot[:, None])

        # vMF log-likelihoods f.C / T of the three column blocks, each with its additive bias (fused addmm)
        f_scaled = f / temperature
        own = f_scaled @ memory.vertices[own_rows].to(f.dtype).T  # (V_y, K_y)
        blocks = [own + near.to(f.dtype) * MASKED_LOGIT,
                  torch.addmm(f.new_full((1, memory.background.shape[0]), background_bias), f_scaled,
                              memory.background.to(f.dtype).T)]  # (V_y, N_b)
        if len(cross_rows):
            blocks.append(torch.addmm(cross_bias.to(f.dtype)[None], f_scaled, memory.vertices[cross_rows].to(f.dtype).T))
        # one softmax denominator over all columns: logsumexp of the per-block logsumexps (no concatenation)
        log_denominator = torch.logsumexp(torch.stack([torch.logsumexp(b, dim=1) for b in blocks]), dim=0)
        positive = own.gather(1, slot[:, None]).squeeze(1)
        total = total + (log_denominator - positive).sum()  # Eq. 5
        if return_logits:
            column_rows = torch.cat([own_rows, memory.vertices.shape[0] +
                                     torch.arange(memory.background.shape[0], device=labels.device), cross_rows])
            groups.append(dict(image=image, slot=slot, logits=torch.cat(blocks, dim=1), columns=column_rows))
    loss = total / num_visible.clamp_min(1) + 0.0 * vertex_features.sum()  # keeps the graph when V = 0
    return (loss, groups) if return_logits else loss


def _sample_vertices(memory: VertexMemory, num_sampled: int | None, generator: torch.Generator | None):
    """Rows (Y, N) of N vertices per class drawn uniformly without replacement, and the count per class.

    Classes with K_y < N fill the tail with row 0 (only the first `count` are real). num_sampled=None or
    N >= max K takes every vertex in order (deterministic full contrast).
    """
    device = memory.vertices.device
    sizes = torch.tensor(memory.num_vertices, device=device)
    K_max = int(sizes.max())
    N = K_max if num_sampled is None else min(num_sampled, K_max)
    slot = torch.arange(K_max, device=device).expand(memory.num_classes, K_max)
    if N < K_max:
        keys = torch.rand(memory.num_classes, K_max, generator=generator, device=generator.device
                          if generator is not None else device).to(device)
        keys = keys.masked_fill(slot >= sizes[:, None], 2.0)  # padding sorts last
        slot = keys.argsort(dim=1)[:, :N]
    count = sizes.clamp_max(N)
    rows = memory.class_offsets[:-1, None] + slot
    rows = torch.where(slot < sizes[:, None], rows, torch.zeros_like(rows))
    return rows, count


def background_repulsion(background_features: Tensor, vertex_rows: Tensor, weight: float = 0.1) -> Tensor:
    """NOVUM's regulariser weight * mean_{b,n,j} beta_{b,n} . C_j (not divided by T).

    background_features: (..., D) features sampled off the object; vertex_rows: (R, D) memory rows.
    Computed as weight * mean(beta) . mean(C) (identical value, O((n + R) D) instead of O(n R D)).
    """
    if background_features.shape[-1] != vertex_rows.shape[-1] or vertex_rows.ndim != 2:
        raise ValueError(f"background_features (..., D) and vertex_rows (R, D) must share D, got "
                         f"{tuple(background_features.shape)} and {tuple(vertex_rows.shape)}")
    mean_background = background_features.reshape(-1, background_features.shape[-1]).mean(0)
    return weight * (mean_background * vertex_rows.to(mean_background).mean(0)).sum()


def classification_scores(
    feature_map: Tensor,
    vertices: Tensor,
    vertex_class: Tensor,
    num_classes: int,
    background: Tensor | None = None,
    rule: str = "compnet",
    normalizer: float | None = None,
    chunk: int = 4096,
) -> Tensor:
    """Class scores (B, Y) from a unit feature map (B, D, H, W) and vertex rows (R, D) of classes (R,).

    rule="compnet" (Eq. 7): S_y = sum_i max(max_k f_i.C^y_k, max_n f_i.beta_n) over pixels i.
    rule="novum" (NOVUM inference.py): s = f.C/2 + 1/2; every pixel keeps its best row j*(i) over all
    rows; score_y = sum of s over pixels whose best row is of class y, divided by `normalizer` (default R).
    Rows with vertex_class = -1 compete in the argmax but count for no class (NOVUM's padded rows).
    """
    if feature_map.ndim != 4 or feature_map.shape[1] != vertices.shape[-1]:
        raise ValueError(f"feature_map must be (B, {vertices.shape[-1]}, H, W), got {tuple(feature_map.shape)}")
    if vertex_class.shape != vertices.shape[:1]:
        raise ValueError(f"vertex_class must be ({vertices.shape[0]},), got {tuple(vertex_class.shape)}")
    if rule not in ("compnet", "novum"):
        raise ValueError(f"rule must be 'compnet' or 'novum', got {rule!r}")
    B, D = feature_map.shape[:2]
    pixels = feature_map.flatten(2).transpose(1, 2).reshape(-1, D)  # (B*H*W, D)
    image = torch.arange(B, device=pixels.device).repeat_interleave(feature_map.shape[2] * feature_map.shape[3])
    scores = pixels.new_zeros(B, num_classes)
    owner = vertex_class.to(pixels.device)
    for start in range(0, pixels.shape[0], chunk):
        f, img = pixels[start:start + chunk], image[start:start + chunk]
        similarity = f @ vertices.to(f).T  # (P, R)
        if rule == "novum":
            best, row = ((similarity / 2 + 0.5)).max(dim=1)
            cls = owner[row]
            keep = cls >= 0
            scores.index_put_((img[keep], cls[keep]), best[keep], accumulate=True)
        else:
            class_max = pixels.new_full((f.shape[0], num_classes + 1), -2.0)
            class_max = class_max.scatter_reduce(  # per-class max over rows, row class -1 -> dropped slot
                1, torch.where(owner >= 0, owner, num_classes).expand_as(similarity), similarity, "amax")
            class_max = class_max[:, :num_classes]
            if background is not None:
                class_max = torch.maximum(class_max, (f @ background.to(f).T).max(dim=1, keepdim=True).values)
            scores.index_add_(0, img, class_max)  # Eq. 7
    if rule == "novum":
        scores = scores / (vertices.shape[0] if normalizer is None else normalizer)
    return scores
