"""Grouped vMF contrast of 3D-CompNets: vertex memory, the contrastive loss (Eq. 2, 4, 5), classification (Eq. 7).

Paper: X. Yuan, G. Zhang, P. Kaushik, L. Jesslen, A. Kortylewski, A. Yuille, "Scaling 3D Compositional
Models for Robust Classification and Pose Estimation" (ICCV 2025). No public code exists; the
conventions the paper does not restate follow NOVUM (L. Jesslen et al., ECCV 2024,
github.com/GenIntel/NOVUM: `FeatureBank.py`, the loss block of `train.py`, `inference.py`).

Every class y is a cuboid mesh with K_y vertices carrying unit features C^y_k (the vertex memory); a
bank of N_b unit background features beta_n is shared by all classes. A feature f_k read at the
projection of a visible vertex k of an image of class y is scored by vMF log-likelihoods kappa f.C with
kappa = 1 / T (T = 0.07). The loss of 3D-CompNets (form="paper", the default) has two terms per vertex:

    L_in(k)    = -log e^{kappa f.C^y_k} / (sum_{j in y} e^{kappa f.C^y_j} + w_b sum_n e^{kappa f.beta_n})   (Eq. 2)
    L_cross(k) = -log e^{kappa f.C^y_k} / (e^{kappa f.C^y_k}
                      + sum_{y' != y} omega[y, y'] sum_{j in S_y'} e^{kappa f.C^y'_j})                        (Eq. 4)
    L          = -sum_k o_k (log softmax_in + log softmax_cross) = sum_k o_k (L_in(k) + L_cross(k))         (Eq. 5)

o_k is the visibility, S_y' are N vertices sampled uniformly from class y' (one draw per step, shared by
the batch) and omega (Y, Y) are confusion weights (`confusion_weights` of an argmax confusion matrix
or of `pairwise_confusion`); classes with omega = 0 are not gathered at all. From NOVUM, carried over to
L_in: own-class vertices projecting within `distance_threshold` pixels of k (k itself kept) are dropped,
and the background weight w_b = 0.005.
The sum is averaged over the visible vertices of the batch (NOVUM's convention).

form="novum" is NOVUM's full contrast, the paper's baseline: ONE softmax per vertex over its own class
(near-masked), w_b * background and every vertex of every other class (with num_sampled=None, omega=None).
The golden files of tests/data/compnet test this form. The memory is not differentiated; it follows a
momentum update (`VertexMemory.update`).
"""

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MASKED_LOGIT = -1e5  # NOVUM's additive mask: exp(logit - 1e5) underflows to exactly 0 for |logit| <= 1/T
FORMS = ("paper", "novum")

# ---------------------------------------------------------------------------------------------------
# Vertex memory: the features of the neural meshes and the background bank (NOVUM FeatureBank)
# ---------------------------------------------------------------------------------------------------


class VertexMemory(torch.nn.Module):
    """Per-class vertex features (ragged, no padding) and a FIFO bank of background features.

    vertices:      (sum_y K_y, D) unit rows; class y owns rows class_offsets[y] : class_offsets[y+1].
    background:    (N_b, D) unit rows, a FIFO ring buffer written by `update`.
    class_offsets: (Y + 1,) int64; vertex_class: (sum_y K_y,) class of every row.
    pointer:       next FIFO row to write (a Python int, stored in the state dict as extra state).
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
        if isinstance(num_vertices, Tensor):
            num_vertices = num_vertices.tolist()
        if (len(num_vertices) == 0 or any(isinstance(k, bool) or not isinstance(k, int) or k < 1
                                          for k in num_vertices)):
            raise ValueError(f"num_vertices must list an int >= 1 per class, got {list(num_vertices)}")
        for name, value in (("dim", dim), ("num_background", num_background)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0.0 <= momentum <= 1.0:  # also rejects NaN
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        num_vertices = list(num_vertices)
        total = sum(num_vertices)
        if vertices is None:
            vertices = torch.randn(total, dim, generator=generator)
        if background is None:
            background = torch.randn(num_background, dim, generator=generator)
        for name, rows, shape in (("vertices", vertices, (total, dim)), ("background", background, (num_background, dim))):
            if not isinstance(rows, Tensor) or tuple(rows.shape) != shape or not rows.is_floating_point():
                raise ValueError(f"{name} must be a float tensor of shape {shape}, got "
                                 f"{getattr(rows, 'dtype', type(rows))} {tuple(getattr(rows, 'shape', ()))}")
            if not bool(torch.isfinite(rows).all()) or not bool((rows.norm(dim=-1) > 0).all()):
                raise ValueError(f"{name} must be finite with non-zero rows (they are normalised)")
        self.momentum = momentum
        self.num_vertices = num_vertices
        self.register_buffer("class_offsets", torch.tensor([0] + num_vertices).cumsum(0))
        self.register_buffer("vertices", F.normalize(vertices.clone(), dim=-1))
        self.register_buffer("background", F.normalize(background.to(vertices).clone(), dim=-1))
        counts = torch.tensor(num_vertices)
        self.register_buffer("vertex_class", torch.repeat_interleave(torch.arange(len(num_vertices)), counts),
                             persistent=False)
        self.pointer = 0

    def get_extra_state(self) -> dict:
        return {"pointer": self.pointer}

    def set_extra_state(self, state: dict) -> None:
        self.pointer = int(state["pointer"])

    @property
    def num_classes(self) -> int:
        return len(self.num_vertices)

    def class_vertices(self, y: int) -> Tensor:
        """(K_y, D) vertex features of class y."""
        start = sum(self.num_vertices[:y])
        return self.vertices[start:start + self.num_vertices[y]]

    @torch.no_grad()
    def update(self, vertex_features: Tensor, visible: Tensor, labels: Tensor, background_features: Tensor,
               check: bool = True) -> None:
        """Momentum update of the vertex rows and FIFO write of the background features (NOVUM `FeatureBank`).

        vertex_features: (B, K_max, D) features at the projected vertices, slot k = vertex k of the image's class.
        visible: (B, K_max), > 0 where visible. labels: (B,) int. background_features: (B, T, D).
        1. For every class c in the batch with n_c images: mean_c = (1/n_c) sum_{b: y_b = c} o_b * f_b
           (divided by the number of images of class c); rows_c <- m rows_c + (1 - m) mean_c.
        2. The B*T background features (image-major) overwrite the FIFO rows starting at `pointer`; a write
           that would run past N_b starts again at row 0 (NOVUM's slots: rows past the last full slot stay).
        3. Every written row is L2-normalised.
        Non-finite features never enter the memory: a vertex feature with NaN/inf counts as invisible and a
        non-finite or zero background feature leaves its FIFO row unchanged. check=False skips the label
        range check (a host sync); use it inside a training loop after checking the labels once.
        """
        index, valid = _vertex_rows(self, vertex_features, visible, labels, "update", check)
        if (background_features.ndim != 3 or background_features.shape[0] != labels.shape[0]
                or background_features.shape[-1] != self.vertices.shape[-1]):
            raise ValueError(f"update: background_features must be ({labels.shape[0]}, T, {self.vertices.shape[-1]}), "
                             f"got {tuple(background_features.shape)}")
        finite = torch.isfinite(vertex_features).all(-1)  # (B, K_max)
        use = (visible > 0) & valid & finite
        features = torch.where(use.unsqueeze(-1), vertex_features, torch.zeros_like(vertex_features))
        images_per_class = torch.zeros(self.num_classes, dtype=self.vertices.dtype, device=labels.device)
        images_per_class.index_add_(0, labels, torch.ones_like(labels, dtype=self.vertices.dtype))
        summed = torch.zeros_like(self.vertices).index_add_(
            0, torch.where(valid, index, 0).flatten(), features.flatten(0, 1).to(self.vertices.dtype))
        row_count = images_per_class[self.vertex_class].unsqueeze(-1)  # (R, 1)
        mean = summed / row_count.clamp_min(1)
        updated = self.momentum * self.vertices + (1 - self.momentum) * mean
        keep = (row_count > 0) & (updated.norm(dim=-1, keepdim=True) > 0)
        self.vertices.copy_(torch.where(keep, F.normalize(updated, dim=-1), self.vertices))

        new_rows = background_features.reshape(-1, background_features.shape[-1]).to(self.background.dtype)
        n = min(new_rows.shape[0], self.background.shape[0])
        start = self.pointer if self.pointer + n <= self.background.shape[0] else 0
        new_rows = new_rows[:n]
        usable = (torch.isfinite(new_rows).all(-1) & (new_rows.norm(dim=-1) > 0)).unsqueeze(-1)
        old = self.background[start:start + n]
        self.background[start:start + n] = torch.where(usable, F.normalize(torch.where(usable, new_rows, old), dim=-1), old)
        self.pointer = (start + n) % self.background.shape[0]


def _vertex_rows(memory: VertexMemory, vertex_features: Tensor, visible: Tensor, labels: Tensor, name: str,
                 check: bool) -> tuple[Tensor, Tensor]:
    """Memory row of every slot (B, K_max) and whether the slot is a real vertex of the image's class."""
    if not isinstance(vertex_features, Tensor) or not vertex_features.is_floating_point():
        raise TypeError(f"{name}: vertex_features must be a float tensor, got {type(vertex_features).__name__}")
    D = memory.vertices.shape[-1]
    if vertex_features.ndim != 3 or vertex_features.shape[-1] != D:
        raise ValueError(f"{name}: vertex_features must be (B, K_max, {D}), got {tuple(vertex_features.shape)}")
    B, K_max = vertex_features.shape[:2]
    if not isinstance(visible, Tensor) or visible.shape != (B, K_max):
        raise ValueError(f"{name}: visible must be ({B}, {K_max}), got {tuple(getattr(visible, 'shape', ()))}")
    if not isinstance(labels, Tensor) or labels.shape != (B,) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: labels must be an integer tensor of shape ({B},), "
                         f"got {getattr(labels, 'dtype', type(labels))} {tuple(getattr(labels, 'shape', ()))}")
    labels = labels.long()
    if check and B and (int(labels.min()) < 0 or int(labels.max()) >= memory.num_classes):  # host sync
        raise ValueError(f"{name}: labels must lie in [0, {memory.num_classes}), got {labels.tolist()}")
    sizes = torch.tensor(memory.num_vertices, device=labels.device)[labels]  # (B,)
    if B and K_max < max(memory.num_vertices) and int(sizes.max()) > K_max:  # a sync only in this rare case
        raise ValueError(f"{name}: vertex_features has {K_max} slots but class {int(labels[sizes.argmax()])} "
                         f"has {int(sizes.max())} vertices")
    slot = torch.arange(K_max, device=labels.device)
    valid = slot < sizes[:, None]  # (B, K_max)
    index = memory.class_offsets.to(labels.device)[labels][:, None] + slot  # (B, K_max)
    return index, valid


# ---------------------------------------------------------------------------------------------------
# Confusion weights omega (Sec. 3.3)
# ---------------------------------------------------------------------------------------------------


def pairwise_confusion(scores: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Pairwise confusion counts (Y, Y) of class scores (N, Y) on calibration images of classes labels (N,).

    counts[y, y'] = number of images of class y on which y' scores at least as high as y (y' != y; the
    diagonal is 0). Unlike the argmax confusion matrix, every class that outranks the true class counts,
    not only the winner, so a class that wins everywhere while the model is weak does not hide the others.
    """
    if not isinstance(scores, Tensor) or scores.ndim != 2 or scores.shape[1] != num_classes:
        raise ValueError(f"scores must be (N, {num_classes}), got {tuple(getattr(scores, 'shape', ()))}")
    if not isinstance(labels, Tensor) or labels.shape != scores.shape[:1]:
        raise ValueError(f"labels must be ({scores.shape[0]},), got {tuple(getattr(labels, 'shape', ()))}")
    labels = labels.long().to(scores.device)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):  # once per calibration
        raise ValueError(f"labels must lie in [0, {num_classes}), got {sorted(set(labels.tolist()))}")
    outranks = (scores >= scores.gather(1, labels[:, None])).double()  # (N, Y)
    outranks[torch.arange(len(labels), device=scores.device), labels] = 0.0
    counts = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=scores.device)
    return counts.index_add_(0, labels, outranks)


def confusion_weights(confusion: Tensor, threshold: float = 0.05, normalize: str = "none",
                      symmetric: bool = False, images_per_class: Tensor | None = None) -> Tensor:
    """Cross-class weights omega (Y, Y) from a calibration confusion matrix (rows: true, cols: predicted).

    omega[y, y'] = fraction of class-y calibration images predicted as y'; 0 below `threshold` and on the
    diagonal (the own class is always fully contrasted by Eq. 2). Classes without calibration images get
    omega = 0. The paper does not say how omega is scaled: normalize="none" keeps the rates, "mean"
    rescales each row so its kept (non-zero) entries average 1 (the cross-class mass of omega = 1 on the
    kept classes), "max" so the most confused class gets 1, "binary" sets every kept entry to 1.
    symmetric=True treats confusion as a property of the pair: rates[y, y'] <- max(rates[y, y'], rates[y', y])
    before the threshold.
    images_per_class (Y,): the denominators of the rates (default: the row sums, right for an argmax
    confusion matrix; pass the image counts with `pairwise_confusion`, whose rows may sum to more).
    """
    if normalize not in ("none", "mean", "max", "binary"):
        raise ValueError(f"normalize must be 'none', 'mean', 'max' or 'binary', got {normalize!r}")
    if not isinstance(confusion, Tensor) or confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be (Y, Y), got {tuple(getattr(confusion, 'shape', ()))}")
    if not bool(torch.isfinite(confusion.double()).all()) or bool((confusion < 0).any()):
        raise ValueError("confusion must hold finite non-negative counts")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    totals = confusion.double().sum(1) if images_per_class is None else images_per_class.double().to(confusion.device)
    if totals.shape != confusion.shape[:1]:
        raise ValueError(f"images_per_class must be ({confusion.shape[0]},), got {tuple(totals.shape)}")
    rates = confusion.double() / totals[:, None].clamp_min(1e-12)
    if symmetric:
        rates = torch.maximum(rates, rates.T)
    eye = torch.eye(confusion.shape[0], dtype=torch.bool, device=confusion.device)
    omega = torch.where((rates >= threshold) & ~eye, rates, torch.zeros_like(rates))
    if normalize == "mean":
        kept = (omega > 0).sum(1, keepdim=True).clamp_min(1)
        omega = omega / (omega.sum(1, keepdim=True) / kept).clamp_min(1e-12)
    elif normalize == "max":
        omega = omega / omega.amax(1, keepdim=True).clamp_min(1e-12)
    elif normalize == "binary":
        omega = (omega > 0).to(omega.dtype)
    return omega.to(confusion.dtype if confusion.is_floating_point() else torch.float32)


# ---------------------------------------------------------------------------------------------------
# The contrastive loss (Eq. 2, 4, 5) and NOVUM's full contrast
# ---------------------------------------------------------------------------------------------------


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
    form: str = "paper",
    check: bool = True,
) -> Tensor | tuple[Tensor, list[dict]]:
    """Grouped vMF contrastive loss, averaged over all visible vertices of the batch.

    form="paper" (default): Eq. 5, L_in (Eq. 2) + L_cross (Eq. 4) per visible vertex.
    form="novum": NOVUM's single softmax over own class, background and the gathered other-class columns
    (the full contrast with num_sampled=None, omega=None).

    vertex_features: (B, K_max, D) unit features at the projected vertices (slot k = vertex k of class y_b).
    keypoints: (B, K_max, 2) pixel coordinates of ALL vertices (visible or not) for the near mask.
    visible: (B, K_max), > 0 where visible; labels: (B,) int in [0, Y).
    omega: (Y, Y) non-negative cross-class weights (diagonal ignored); None means all ones.
    num_sampled: N vertices sampled (without replacement) per other class; None = all vertices.
    cross_class_scale: "none" or "k_over_n" (adds log(K_y' / N) so the sample estimates the full sum).
    check: value checks that need a host sync (label range, unit norms, finite omega); pass False inside a
    training loop once the inputs were checked at its boundary. Shapes and parameters are always checked.
    Invisible and padded slots never enter the loss (NaN there is harmless); images without visible
    vertices contribute nothing; a batch without any visible vertex gives a zero loss attached to the graph.
    Returns the scalar loss, or (loss, groups) with return_logits: one dict per class in the batch with
    image (V_y,), slot (V_y,), logits (V_y, C_y) = the gathered logits with their additive biases in column
    order [own class | background | other classes], columns (C_y,) rows of cat([memory.vertices,
    memory.background]) and num_in = K_y + N_b, the columns of Eq. 2 (paper form).
    """
    _, valid = _vertex_rows(memory, vertex_features, visible, labels, "grouped_vmf_contrast", check)
    B, K_max = vertex_features.shape[:2]
    Y = memory.num_classes
    if not isinstance(keypoints, Tensor) or keypoints.shape != (B, K_max, 2):
        raise ValueError(f"keypoints must be ({B}, {K_max}, 2), got {tuple(getattr(keypoints, 'shape', ()))}")
    if omega is not None and (not isinstance(omega, Tensor) or omega.shape != (Y, Y)):
        raise ValueError(f"omega must be ({Y}, {Y}), got {tuple(getattr(omega, 'shape', ()))}")
    if check and omega is not None and (not bool(torch.isfinite(omega).all()) or bool((omega < 0).any())):
        raise ValueError("omega must be finite and non-negative")
    if num_sampled is not None and (isinstance(num_sampled, bool) or not isinstance(num_sampled, int) or num_sampled < 1):
        raise ValueError(f"num_sampled must be an int >= 1 or None, got {num_sampled!r}")
    if cross_class_scale not in ("none", "k_over_n"):
        raise ValueError(f"cross_class_scale must be 'none' or 'k_over_n', got {cross_class_scale!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    for name, value in (("temperature", temperature), ("background_weight", background_weight)):
        if not (value > 0 and math.isfinite(value)):  # `not > 0` also rejects NaN
            raise ValueError(f"{name} must be finite and > 0, got {value}")
    if not distance_threshold >= 0:
        raise ValueError(f"distance_threshold must be >= 0, got {distance_threshold}")
    labels = labels.long()
    is_visible = (visible > 0) & valid  # (B, K_max)
    if check:
        _check_unit(vertex_features[is_visible], "vertex_features")

    sampled_rows, sampled_count = _sample_vertices(memory, num_sampled, generator)  # (Y, N), (Y,)
    sizes = torch.tensor(memory.num_vertices, device=labels.device)
    background_bias = math.log(background_weight)
    total = vertex_features.new_zeros(())
    groups = []
    # one group per class in the batch (the class list is needed on the host to gather its columns)
    for y in torch.unique(labels[is_visible.any(1)]).tolist():
        image, slot = torch.nonzero(is_visible & (labels[:, None] == y), as_tuple=True)  # (V_y,)
        f_scaled = vertex_features[image, slot] / temperature  # (V_y, D): kappa f
        K_y = memory.num_vertices[y]
        own_rows = torch.arange(K_y, device=labels.device) + int(sum(memory.num_vertices[:y]))
        weight = torch.ones(Y, device=labels.device) if omega is None else omega[y].to(labels.device)
        others = torch.nonzero((weight > 0) & (torch.arange(Y, device=labels.device) != y)).flatten()
        is_sample = torch.arange(sampled_rows.shape[1], device=labels.device) < sampled_count[others, None]
        cross_rows = sampled_rows[others][is_sample]  # (sum_y' min(N, K_y'),) ragged, no padding
        cross_bias = torch.log(weight[others].double())  # log omega[y, y'] (Eq. 4)
        if cross_class_scale == "k_over_n":
            cross_bias = cross_bias + torch.log(sizes[others].double() / sampled_count[others].double())
        cross_bias = cross_bias[:, None].expand_as(is_sample)[is_sample]
        kp = keypoints[image].to(f_scaled.dtype)  # (V_y, K_max, 2)
        dist = (kp[:, :K_y] - kp[torch.arange(len(slot), device=slot.device), slot][:, None]).norm(dim=-1)
        near = (dist <= distance_threshold) & (torch.arange(K_y, device=labels.device) != slot[:, None])

        own = f_scaled @ memory.vertices[own_rows].to(f_scaled.dtype).T  # (V_y, K_y) kappa f.C^y_j
        positive = own.gather(1, slot[:, None])  # (V_y, 1) kappa f.C^y_k
        own_masked = own + near.to(own.dtype) * MASKED_LOGIT  # NOVUM's near mask
        background = torch.addmm(f_scaled.new_full((1, memory.background.shape[0]), background_bias), f_scaled,
                                  memory.background.to(f_scaled.dtype).T)  # (V_y, N_b) kappa f.beta + log w_b
        cross = torch.addmm(cross_bias.to(f_scaled.dtype)[None], f_scaled,
                            memory.vertices[cross_rows].to(f_scaled.dtype).T)  # (V_y, C) kappa f.C^y' + log omega
        if form == "paper":
            loss_in = _logsumexp_blocks([own_masked, background]) - positive[:, 0]  # Eq. 2
            loss_cross = _logsumexp_blocks([positive, cross]) - positive[:, 0]  # Eq. 4
            total = total + (loss_in + loss_cross).sum()  # Eq. 5
        else:
            total = total + (_logsumexp_blocks([own_masked, background, cross]) - positive[:, 0]).sum()  # NOVUM
        if return_logits:
            columns = torch.cat([own_rows, memory.vertices.shape[0] +
                                 torch.arange(memory.background.shape[0], device=labels.device), cross_rows])
            groups.append(dict(image=image, slot=slot, logits=torch.cat([own_masked, background, cross], dim=1),
                               columns=columns, num_in=K_y + memory.background.shape[0]))
    # an empty slice keeps the loss attached to the graph without touching (possibly NaN) unused slots
    loss = total / is_visible.sum().clamp_min(1) + vertex_features[:, :0].sum()
    return (loss, groups) if return_logits else loss


def _logsumexp_blocks(blocks: list[Tensor]) -> Tensor:
    """logsumexp over the columns of several (V, C_i) blocks without concatenating them: (V,)."""
    return torch.logsumexp(torch.stack([torch.logsumexp(b, dim=1) for b in blocks if b.shape[1]]), dim=0)


def _sample_vertices(memory: VertexMemory, num_sampled: int | None,
                     generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Rows (Y, N) of N vertices per class drawn uniformly without replacement, and the count per class.

    Classes with K_y < N fill the tail with row 0 (only the first `count` are real). num_sampled=None or
    N >= max K takes every vertex in order (deterministic full contrast).
    """
    device = memory.vertices.device
    sizes = torch.tensor(memory.num_vertices, device=device)
    K_max = max(memory.num_vertices)
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


def _check_unit(x: Tensor, name: str, tol: float = 1e-3) -> None:
    """x (..., D) must be unit vectors (a host sync: call once per public call, never per step)."""
    if x.numel() and not float((x.detach().norm(dim=-1) - 1).abs().max()) <= tol:  # NaN fails too
        raise ValueError(f"{name} must be finite unit vectors along the last dim (normalise them first)")


def background_repulsion(background_features: Tensor, vertex_rows: Tensor, weight: float = 0.1) -> Tensor:
    """NOVUM's regulariser weight * mean_{b,n,j} beta_{b,n} . C_j (not divided by T).

    background_features: (..., D) features sampled off the object; vertex_rows: (R, D) memory rows.
    Computed as weight * mean(beta) . mean(C) (identical value, O((n + R) D) instead of O(n R D)).
    """
    if (background_features.ndim < 1 or vertex_rows.ndim != 2
            or background_features.shape[-1] != vertex_rows.shape[-1]):
        raise ValueError(f"background_features (..., D) and vertex_rows (R, D) must share D, got "
                         f"{tuple(background_features.shape)} and {tuple(vertex_rows.shape)}")
    if not math.isfinite(weight):
        raise ValueError(f"weight must be finite, got {weight}")
    mean_background = background_features.reshape(-1, background_features.shape[-1]).mean(0)
    return weight * (mean_background * vertex_rows.to(mean_background).mean(0)).sum()


# ---------------------------------------------------------------------------------------------------
# Classification (Eq. 7) and NOVUM's classifier
# ---------------------------------------------------------------------------------------------------


def cell_class_scores(features: Tensor, vertices: Tensor, vertex_class: Tensor, num_classes: int,
                      background: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The two terms of Eq. 7 for every feature cell: class_max (P, Y), the best f.C^y_k over the vertices of
    class y (-2 for a class without rows), and background_max (P,), the best f.beta_n (None without a bank).

    features: (P, D) unit rows; vertices: (R, D); vertex_class: (R,) (-1: a row of no class); background (N_b, D).
    """
    if features.ndim != 2 or vertices.ndim != 2 or features.shape[1] != vertices.shape[1]:
        raise ValueError(f"features (P, D) and vertices (R, D) must share D, got {tuple(features.shape)}, "
                         f"{tuple(vertices.shape)}")
    if vertex_class.shape != vertices.shape[:1]:
        raise ValueError(f"vertex_class must be ({vertices.shape[0]},), got {tuple(vertex_class.shape)}")
    similarity = features @ vertices.to(features).T  # (P, R)
    owner = vertex_class.to(features.device)
    class_max = features.new_full((features.shape[0], num_classes + 1), -2.0).scatter_reduce(
        1, torch.where(owner >= 0, owner, num_classes).expand_as(similarity), similarity, "amax")  # class -1 -> dropped
    background_max = None if background is None else (features @ background.to(features).T).max(dim=1).values
    return class_max[:, :num_classes], background_max


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

    rule="compnet" (Eq. 7): S_y = sum_i max(max_k f_i.C^y_k, max_n f_i.beta_n) over pixels i; the
    prediction is y_hat = argmax_y S_y.
    rule="novum" (NOVUM inference.py): s = f.C/2 + 1/2; every pixel keeps its best row j*(i) over all
    rows; score_y = sum of s over pixels whose best row is of class y, divided by `normalizer` (default R).
    Rows with vertex_class = -1 compete in the argmax but count for no class (NOVUM's padded rows).
    """
    if not isinstance(vertices, Tensor) or vertices.ndim != 2:
        raise ValueError(f"vertices must be (R, D), got {tuple(getattr(vertices, 'shape', ()))}")
    if not isinstance(feature_map, Tensor) or feature_map.ndim != 4 or feature_map.shape[1] != vertices.shape[-1]:
        raise ValueError(f"feature_map must be (B, {vertices.shape[-1]}, H, W), got "
                         f"{tuple(getattr(feature_map, 'shape', ()))}")
    if not isinstance(vertex_class, Tensor) or vertex_class.shape != vertices.shape[:1]:
        raise ValueError(f"vertex_class must be ({vertices.shape[0]},), got {tuple(getattr(vertex_class, 'shape', ()))}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if background is not None and (background.ndim != 2 or background.shape[-1] != vertices.shape[-1]):
        raise ValueError(f"background must be (N_b, {vertices.shape[-1]}), got {tuple(background.shape)}")
    if rule not in ("compnet", "novum"):
        raise ValueError(f"rule must be 'compnet' or 'novum', got {rule!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    if normalizer is not None and not (normalizer > 0 and math.isfinite(normalizer)):
        raise ValueError(f"normalizer must be finite and > 0, got {normalizer}")
    B, D = feature_map.shape[:2]
    pixels = feature_map.flatten(2).transpose(1, 2).reshape(-1, D)  # (B*H*W, D)
    image = torch.arange(B, device=pixels.device).repeat_interleave(feature_map.shape[2] * feature_map.shape[3])
    scores = pixels.new_zeros(B, num_classes)
    owner = vertex_class.to(pixels.device)
    for start in range(0, pixels.shape[0], chunk):
        f, img = pixels[start:start + chunk], image[start:start + chunk]
        if rule == "novum":
            best, row = ((f @ vertices.to(f).T / 2 + 0.5)).max(dim=1)
            cls = owner[row]
            keep = cls >= 0
            scores.index_put_((img[keep], cls[keep]), best[keep], accumulate=True)
        else:
            class_max, background_max = cell_class_scores(f, vertices, owner, num_classes, background)
            if background_max is not None:
                class_max = torch.maximum(class_max, background_max[:, None])
            scores.index_add_(0, img, class_max)  # Eq. 7
    if rule == "novum":
        scores = scores / (vertices.shape[0] if normalizer is None else normalizer)
    return scores
