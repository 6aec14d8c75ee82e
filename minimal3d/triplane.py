"""Triplanes rendered by volume ray marching, and the triplane decoder of 3D-Prior.

Paper: Aygün, Dhar, Yan, Mac Aodha, Ranjan, "Enhancing 2D Representation Learning with a 3D Prior",
2024, arXiv:2406.02535. A ViT representation h is decoded into a triplane (``TriplaneGenerator``, the
decoder Φ), a two-layer MLP turns bilinearly sampled triplane features into density and colour
(``TriplaneDecoder``), and the triplane is rendered from one fixed camera (``render_triplane``).

The renderer follows EG3D (Chan et al., "Efficient Geometry-aware 3D Generative Adversarial Networks",
CVPR 2022, arXiv:2112.07945), official code github.com/NVlabs/eg3d (7cf1fd1,
``training/volumetric_rendering/{renderer,ray_marcher,math_utils}.py``, ``OSGDecoder``), number for number:

- a world point p is scaled to q = 2 p / box_size, so the planes span the cube [-box_size/2, box_size/2]^3;
  plane coordinates (u, v) address a (C, H, W) plane as ``grid_sample`` does (u along W, v along H,
  ``align_corners=False``, zeros outside). ``plane_axes="eg3d"`` reproduces EG3D's planes (x,y), (x,z),
  (z,x), which never see the y-z plane (eg3d issues #30, #53, #67); the default "xy_yz_zx" fixes that.
- features are averaged over the three planes before the decoder.
- coarse depths are ``linspace(near, far, S)`` (both ends) plus jitter * (far - near) / (S - 1).
- the ray marcher uses the midpoint rule over the S - 1 intervals: colours and *raw* densities are
  averaged between neighbours, then sigma = softplus(raw - 1). Transmittance is computed in log space
  (EG3D multiplies 1 - alpha + 1e-10; the difference is below 1e-9).
- importance sampling blurs the interval weights (max over neighbours, then average, then + 0.01) and draws
  from the pdf ``weights[1:-1]`` over the midpoints ``t_mid[:-1]``: EG3D's slice, a leftover of NeRF code,
  leaves the last interval unreachable. Fine depths are detached.

Where this file differs from EG3D on purpose: rgb is returned in EG3D's colour range (about [0, 1]),
not mapped to [-1, 1]; a ray with zero total weight gets depth = far of that ray instead of a clamp to the
largest sample depth of the whole batch (the two agree for fixed near/far without jitter); fine depths
are only computed under ``torch.no_grad`` together with the coarse weights they come from (EG3D builds
and drops that graph); features are never expanded per view direction (OSGDecoder ignores it).

Speed (benchmarks/bench_triplane.py): inside the renderer the three bilinear lookups and the plane mean
are one weighted ``embedding_bag`` sum of 12 texel rows of a channels-last copy of the planes with a
border of zero texels (grid_sample's zero padding without masks), with an index_add_ backward
(grid_sampler_2d_backward dominates EG3D's CPU time). On CPU the lookup and the decoder MLP go through the
samples block by block, so that their temporaries stay small and in cache (a fresh 32 MiB tensor costs
more in page faults than the arithmetic done on it). Rays are padded to a multiple of RAY_BLOCK so that
``chunk_rays`` gives bit-identical numbers. ``TriplaneDecoder`` keeps only its input features for
backward and recomputes the 64-wide hidden layer there (``recompute=False`` keeps the softplus
activations instead: more memory; on CPU no faster, the first touch of that buffer costs what it saves).
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

RAY_BLOCK = 64  # rays are processed in multiples of this (see render_triplane)
CPU_LOOKUP_ROWS = 32768  # points per block of the plane lookup on CPU (see _row_blocks)
CPU_DECODER_ROWS = 8192  # samples per block of the decoder MLP on CPU

# Which two world axes (of q = 2 p / box_size) give (u, v) on each of the three planes.
PLANE_AXES = {
    "xy_yz_zx": ((0, 1), (1, 2), (2, 0)),
    "eg3d": ((0, 1), (0, 2), (2, 0)),  # EG3D's generate_planes(): no y-z plane
}


# ---------------------------------------------------------------------------------------------------
# Input checks (public boundary only)
# ---------------------------------------------------------------------------------------------------


def _check_tensor(name: str, tensor, ndim: int | None = None, last_dims: tuple = (), min_ndim: int = 1) -> None:
    """A floating tensor with ``ndim`` dims (at least ``min_ndim`` if None) ending in ``last_dims``."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    bad_ndim = tensor.ndim != ndim if ndim is not None else tensor.ndim < max(len(last_dims), min_ndim)
    if bad_ndim or (last_dims and tuple(tensor.shape[-len(last_dims):]) != tuple(last_dims)):
        lead = ["..."] if ndim is None else ["?"] * (ndim - len(last_dims))
        dims = ", ".join(lead + [str(d) for d in last_dims])
        raise ValueError(f"{name} must have shape ({dims}), got {tuple(tensor.shape)}")


def _check_box_size(box_size) -> float:
    if isinstance(box_size, Tensor) or not isinstance(box_size, (int, float)):
        raise TypeError(f"box_size must be a Python float, got {type(box_size).__name__}")
    if not math.isfinite(box_size) or box_size <= 0:
        raise ValueError(f"box_size must be finite and > 0, got {box_size}")
    return float(box_size)


def _check_plane_axes(plane_axes: str) -> tuple:
    if plane_axes not in PLANE_AXES:
        raise ValueError(f"plane_axes must be one of {sorted(PLANE_AXES)}, got {plane_axes!r}")
    return PLANE_AXES[plane_axes]


def _check_planes_points(planes, points) -> None:
    _check_tensor("planes", planes, 5)
    if planes.shape[1] != 3:
        raise ValueError(f"planes must have shape (B, 3, C, H, W) with 3 planes, got {tuple(planes.shape)}")
    _check_tensor("points", points, 3, (3,))
    if points.shape[0] != planes.shape[0]:
        raise ValueError(f"points batch {points.shape[0]} does not match planes batch {planes.shape[0]}")
    if points.dtype != planes.dtype or points.device != planes.device:
        raise TypeError(f"points ({points.dtype}, {points.device}) must match planes ({planes.dtype}, {planes.device})")


# ---------------------------------------------------------------------------------------------------
# 1. Triplane lookup
# ---------------------------------------------------------------------------------------------------


def project_onto_planes(points: Tensor, box_size: float, plane_axes: str = "xy_yz_zx") -> Tensor:
    """Plane coordinates (B, 3, M, 2) in [-1, 1] of points (B, M, 3) inside the cube of side box_size."""
    _check_tensor("points", points, 3, (3,))
    box_size = _check_box_size(box_size)
    axes = _check_plane_axes(plane_axes)
    return _project(points, box_size, axes).transpose(1, 2)


def _project(points: Tensor, box_size: float, axes: tuple) -> Tensor:
    """Plane coordinates (B, M, 3, 2) of points (B, M, 3): plane k reads the world axes axes[k]."""
    q = points * (2.0 / box_size)  # the cube [-box/2, box/2]^3 becomes [-1, 1]^3
    index = torch.tensor(axes, device=points.device).flatten()  # (6,)
    return q.index_select(-1, index).unflatten(-1, (3, 2))


def _grid_sample_planes(planes: Tensor, uv: Tensor) -> Tensor:
    """All three planes in one grid_sample call: planes (B, 3, C, H, W), uv (B, 3, M, 2) -> (B, 3, C, M)."""
    batch, _, channels, height, width = planes.shape
    grid = uv.reshape(batch * 3, 1, -1, 2)  # (B*3, 1, M, 2)
    features = F.grid_sample(planes.reshape(batch * 3, channels, height, width), grid,
                             mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*3, C, 1, M)
    return features.view(batch, 3, channels, -1)


def sample_triplane(planes: Tensor, points: Tensor, box_size: float, plane_axes: str = "xy_yz_zx") -> Tensor:
    """Bilinear features of each plane at each point.

    planes: (B, 3, C, H, W); points: (B, M, 3) world points, the planes span [-box_size/2, box_size/2]^3.
    Returns (B, 3, M, C), per plane (not yet averaged); exactly 0 outside the cube.
    """
    _check_planes_points(planes, points)
    box_size = _check_box_size(box_size)
    axes = _check_plane_axes(plane_axes)
    features = _grid_sample_planes(planes, _project(points, box_size, axes).transpose(1, 2))  # (B, 3, C, M)
    return features.transpose(2, 3)  # (B, 3, M, C)


def _plane_table(planes: Tensor) -> Tensor:
    """(B, 3, C, H, W) -> (B*3*(H+2)*(W+2), C): one contiguous row of C features per texel, with a border
    of zero texels around each plane (grid_sample's zero padding, so that no corner needs a mask)."""
    batch, _, channels, height, width = planes.shape
    table = planes.new_zeros(batch * 3, height + 2, width + 2, channels)
    table[:, 1:-1, 1:-1] = rearrange(planes, "b k c h w -> (b k) h w c")
    return table.view(-1, channels)


def _row_blocks(num_rows: int, device: torch.device, cpu_rows_per_block: int) -> list[slice]:
    """Ranges of rows worked through one at a time: cpu_rows_per_block on CPU, all at once elsewhere.

    On CPU a fresh temporary of tens of MB costs more in page faults than its arithmetic (the decoder's
    (M, 64) float32 hidden layer: 32 MiB), and a block of a few thousand rows stays in cache between ops.
    """
    step = cpu_rows_per_block if device.type == "cpu" else max(num_rows, 1)
    return [slice(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


def _bilinear_rows(uv: Tensor, first_row: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """The 12 texels (4 corners x 3 planes) behind each point and their weights / 3.

    uv: (n, 3, 2) plane coordinates; first_row: (3,) the table row of texel (0, 0) of each of the
    point's planes. Returns rows (12, n) into the bordered table of ``_plane_table`` and weights (12, n)
    (/ 3: the mean over the planes), corner-major. A coordinate beyond the plane (or NaN) is moved onto
    the zero border, where it reads exactly 0, as grid_sample's zero padding does.
    """
    size = uv.new_tensor([width, height]).view(2, 1, 1)
    uv = uv.permute(2, 1, 0).contiguous()  # (2 axes, 3, n): the points contiguous in every op below
    x = ((uv + 1) * size - 1) / 2  # align_corners=False: texel centres at integers
    x = torch.minimum(torch.where(x > -1, x, -1.0), size)  # [-1, size]: the border texels -1 and size
    low = torch.minimum(x.floor(), size - 1)  # lower corner in [-1, size - 1]
    fraction = x - low  # in [0, 1]
    padded_width = width + 2
    low = low.long()  # row arithmetic in int64: exact for any plane size and dtype
    lower = low[0] + low[1] * padded_width + first_row.unsqueeze(1)  # (3, n)
    corner_offsets = torch.tensor([0, 1, padded_width, padded_width + 1], device=uv.device)  # (x, y): 00 10 01 11
    rows = lower + corner_offsets.view(4, 1, 1)  # (4, 3, n)
    weight_x = torch.stack([1 - fraction[0], fraction[0]])  # (2, 3, n): lower and upper corner
    weight_y = torch.stack([1 - fraction[1], fraction[1]]) / 3
    weights = weight_y.unsqueeze(1) * weight_x  # (2 (y), 2 (x), 3, n)
    return rows.view(12, -1), weights.view(12, -1)


def _lookup_blocks(uv: Tensor, height: int, width: int):
    """(batch index, slice of points, first table row (3,) of its planes) for each block of points."""
    plane_rows = (height + 2) * (width + 2)
    for batch_index in range(uv.shape[0]):  # texel (0, 0) sits one row and one column inside the border
        first_row = (torch.arange(3, device=uv.device) + 3 * batch_index) * plane_rows + (width + 2 + 1)
        for block in _row_blocks(uv.shape[1], uv.device, CPU_LOOKUP_ROWS):
            yield batch_index, block, first_row


class _MeanPlaneFeatures(torch.autograd.Function):
    """Features averaged over the 3 planes: a weighted sum of 12 rows of the bordered plane table.

    The same numbers as grid_sample (bilinear, zeros, align_corners=False) followed by the mean, block
    by block of points of one batch element. The forward is one ``embedding_bag`` per block (mode "sum"
    with per-sample weights), the backward an index_add_ of 128-byte rows per corner, several times faster
    on CPU than grid_sampler_2d_backward (which scatters channel by channel); nothing but uv is kept for
    it. The sample positions get no gradient (EG3D detaches them too); ``sample_triplane`` is the
    differentiable-in-points reference.
    """

    @staticmethod
    def forward(ctx, table: Tensor, uv: Tensor, height: int, width: int) -> Tensor:
        features = table.new_empty(uv.shape[0], uv.shape[1], table.shape[1])  # (B, M, C)
        for batch_index, block, first_row in _lookup_blocks(uv, height, width):
            rows, weights = _bilinear_rows(uv[batch_index, block], first_row, height, width)
            features[batch_index, block] = F.embedding_bag(  # one bag of 12 texel rows per point
                rows.t().contiguous(), table, per_sample_weights=weights.t().contiguous(), mode="sum")
        ctx.save_for_backward(uv)
        ctx.sizes = (table.shape[0], height, width)
        return features.view(-1, table.shape[1])  # (B*M, C)

    @staticmethod
    def backward(ctx, grad_features: Tensor):
        (uv,) = ctx.saved_tensors
        num_rows, height, width = ctx.sizes
        grad_features = grad_features.reshape(uv.shape[0], uv.shape[1], -1)
        grad_table = grad_features.new_zeros(num_rows, grad_features.shape[-1])
        for batch_index, block, first_row in _lookup_blocks(uv, height, width):
            rows, weights = _bilinear_rows(uv[batch_index, block], first_row, height, width)  # recomputed
            grad_block = grad_features[batch_index, block]
            weighted = torch.empty_like(grad_block)  # one buffer for the 12 corners
            for corner in range(12):
                torch.mul(grad_block, weights[corner].unsqueeze(-1), out=weighted)
                grad_table.index_add_(0, rows[corner], weighted)
        return grad_table, None, None, None


def _mean_plane_features(planes: Tensor, table: Tensor, points: Tensor, box_size: float, axes: tuple) -> Tensor:
    """Features averaged over the planes, (B*M, C) (EG3D's OSGDecoder starts with this mean)."""
    uv = _project(points, box_size, axes)  # (B, M, 3, 2)
    if uv.requires_grad:  # gradients to the sample positions: take the grid_sample path
        return rearrange(_grid_sample_planes(planes, uv.transpose(1, 2)).mean(1), "b c m -> (b m) c")
    return _MeanPlaneFeatures.apply(table, uv, planes.shape[-2], planes.shape[-1])


# ---------------------------------------------------------------------------------------------------
# 2. Samples along the rays
# ---------------------------------------------------------------------------------------------------


def ray_box_intersection(origins: Tensor, directions: Tensor, box_size: float) -> tuple[Tensor, Tensor]:
    """Slab test of rays against the cube [-box_size/2, box_size/2]^3 (EG3D ``get_ray_limits_box``).

    origins, directions: (..., 3). Returns t_start, t_end (..., 1) along the rays; a ray that misses
    the cube gets EG3D's markers t_start = -1, t_end = -2 (so t_end < t_start marks a miss).
    """
    _check_tensor("origins", origins, None, (3,))
    _check_tensor("directions", directions, origins.ndim, (3,))
    half = _check_box_size(box_size) / 2
    inverse = 1.0 / directions  # +-inf for axis-parallel rays, as in EG3D
    t_low = (-half - origins) * inverse
    t_high = (half - origins) * inverse
    t_start = torch.minimum(t_low, t_high).amax(-1, keepdim=True)
    t_end = torch.maximum(t_low, t_high).amin(-1, keepdim=True)
    hit = ~(t_start > t_end)
    return torch.where(hit, t_start, -1.0), torch.where(hit, t_end, -2.0)


def stratified_depths(near: Tensor | float, far: Tensor | float, num_samples: int, jitter: Tensor) -> Tensor:
    """EG3D's coarse depths (..., S): linspace(near, far, S) + jitter * (far - near) / (S - 1).

    near, far: floats or (..., 1) tensors; jitter: broadcastable to (..., S), uniform in [0, 1) for
    training, 0 for a deterministic render. The last sample can pass ``far`` (EG3D jitters a whole step,
    not inside a bin). Rounding follows EG3D (torch.linspace for floats, near + k/(S-1) (far - near) for
    tensors): the random test planes amplify one-ulp position changes 1000-fold.
    """
    step_size = (far - near) / (num_samples - 1)
    if isinstance(near, Tensor) or isinstance(far, Tensor):
        steps = torch.arange(num_samples, device=jitter.device, dtype=jitter.dtype) / (num_samples - 1)
        return near + steps * (far - near) + jitter * step_size
    return torch.linspace(near, far, num_samples, device=jitter.device, dtype=jitter.dtype) + jitter * step_size


# ---------------------------------------------------------------------------------------------------
# 3. Volume rendering (EG3D MipRayMarcher2)
# ---------------------------------------------------------------------------------------------------


def _interval_weights(raw_sigma: Tensor, t: Tensor, density_shift: float) -> Tensor:
    """Midpoint-rule weights (..., S-1) from raw densities and depths (..., S)."""
    sigma = F.softplus((raw_sigma[..., 1:] + raw_sigma[..., :-1]) / 2 + density_shift)  # raw averaged first
    optical_depth = sigma * (t[..., 1:] - t[..., :-1])  # sigma_i * delta_i
    alpha = -torch.expm1(-optical_depth)  # 1 - exp(-sigma delta)
    # T_i = exp(-sum_{j<i} sigma_j delta_j): an exclusive cumsum, exact at alpha = 1 (no cumprod of 0s)
    transmittance = torch.exp(-F.pad(torch.cumsum(optical_depth, -1)[..., :-1], (1, 0)))
    return alpha * transmittance


def composite(colors: Tensor, raw_sigma: Tensor, t: Tensor, density_shift: float = -1.0,
              white_background: bool = False, far: Tensor | float | None = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EG3D's midpoint ray marcher.

    colors: (..., S, 3); raw_sigma: (..., S) raw densities (before softplus); t: (..., S) sorted depths
    along unit rays; far: depth given to a ray with zero total weight, (..., 1) or float
    (default: its last sample t[..., -1]).
    Returns rgb (..., 3) = sum w c (+ 1 - opacity on a white background), depth (..., 1) = sum w t_mid
    / opacity, opacity (..., 1) = sum w, weights (..., S-1). Never NaN, also in backward.
    """
    _check_tensor("colors", colors)
    if colors.ndim < 2 or colors.shape[-2] < 2:
        raise ValueError(f"colors must have shape (..., S, 3) with S >= 2, got {tuple(colors.shape)}")
    _check_tensor("raw_sigma", raw_sigma, colors.ndim - 1)
    _check_tensor("t", t, colors.ndim - 1)
    if raw_sigma.shape != colors.shape[:-1] or t.shape != colors.shape[:-1]:
        raise ValueError(f"raw_sigma {tuple(raw_sigma.shape)} and t {tuple(t.shape)} must have shape "
                         f"colors.shape[:-1] = {tuple(colors.shape[:-1])}")
    weights = _interval_weights(raw_sigma, t, density_shift)  # (..., S-1)
    colors_mid = (colors[..., 1:, :] + colors[..., :-1, :]) / 2
    t_mid = (t[..., 1:] + t[..., :-1]) / 2
    opacity = weights.sum(-1, keepdim=True)
    rgb = (weights.unsqueeze(-1) * colors_mid).sum(-2)
    has_weight = opacity > 0
    # Divide by a safe denominator so that no 0/0 reaches forward or backward, then give empty rays far.
    depth = (weights * t_mid).sum(-1, keepdim=True) / torch.where(has_weight, opacity, 1.0)
    depth = torch.clamp(depth, t_mid[..., :1], t_mid[..., -1:])
    depth = torch.where(has_weight, depth, t[..., -1:] if far is None else far)
    if white_background:
        rgb = rgb + (1 - opacity)
    return rgb, depth, opacity, weights


# ---------------------------------------------------------------------------------------------------
# 4. Importance sampling (EG3D sample_importance + sample_pdf)
# ---------------------------------------------------------------------------------------------------


def sample_pdf(bins: Tensor, weights: Tensor, u: Tensor) -> Tensor:
    """Inverse-transform sampling of a piecewise-constant pdf (NeRF/EG3D ``sample_pdf``).

    bins: (..., n+1) bin edges; weights: (..., n) >= 0; u: (..., N) uniforms in [0, 1].
    Returns samples (..., N). EG3D's details: weights + 1e-5, a cdf with a leading 0,
    searchsorted(right=True), and a cdf step below 1e-5 treated as 1.
    """
    _check_tensor("bins", bins)
    _check_tensor("weights", weights, bins.ndim)
    _check_tensor("u", u, bins.ndim)
    if (bins.shape[:-1] != weights.shape[:-1] or u.shape[:-1] != weights.shape[:-1]
            or bins.shape[-1] != weights.shape[-1] + 1):
        raise ValueError(f"bins (..., n+1), weights (..., n) and u (..., N) must share leading dims, got "
                         f"{tuple(bins.shape)}, {tuple(weights.shape)}, {tuple(u.shape)}")
    eps = 1e-5
    num_bins = weights.shape[-1]
    weights = weights + eps
    pdf = weights / weights.sum(-1, keepdim=True)
    cdf = F.pad(torch.cumsum(pdf, -1), (1, 0))  # (..., n+1), cdf[0] = 0
    index = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True)
    below = (index - 1).clamp(min=0)
    above = index.clamp(max=num_bins)
    cdf_below, cdf_above = cdf.gather(-1, below), cdf.gather(-1, above)
    bins_below, bins_above = bins.gather(-1, below), bins.gather(-1, above)
    denom = cdf_above - cdf_below
    denom = torch.where(denom < eps, 1.0, denom)
    return bins_below + (u - cdf_below) / denom * (bins_above - bins_below)


def sample_importance(depths: Tensor, weights: Tensor, u: Tensor) -> Tensor:
    """EG3D's fine depths (..., N) from coarse depths (..., S) and their interval weights (..., S-1).

    The weights are blurred (max_pool1d(2, 1, pad=1), avg_pool1d(2, 1), + 0.01); the pdf uses
    ``blurred[1:-1]`` over the midpoints ``t_mid[:-1]`` (EG3D's slice: the last interval is never drawn).
    u: (..., N) uniforms. Computed without gradient; the result is detached.
    """
    _check_tensor("depths", depths)
    _check_tensor("weights", weights, depths.ndim)
    if depths.shape[-1] < 3 or weights.shape != depths.shape[:-1] + (depths.shape[-1] - 1,):
        raise ValueError(f"depths (..., S) with S >= 3 and weights (..., S-1) expected, got "
                         f"{tuple(depths.shape)} and {tuple(weights.shape)}")
    with torch.no_grad():
        pad = float("-inf")  # max_pool1d's padding: missing neighbours are ignored
        blurred = torch.maximum(F.pad(weights, (1, 0), value=pad), F.pad(weights, (0, 1), value=pad))  # (..., S)
        blurred = (blurred[..., :-1] + blurred[..., 1:]) / 2 + 0.01  # (..., S-1)
        t_mid = (depths[..., 1:] + depths[..., :-1]) / 2
        return sample_pdf(t_mid[..., :-1], blurred[..., 1:-1], u).detach()


# ---------------------------------------------------------------------------------------------------
# 5. The renderer
# ---------------------------------------------------------------------------------------------------


def _query(planes, table, decoder, origins, directions, t, box_size, axes):
    """Decoder outputs at o + t d: t (B, R, S) -> raw_sigma (B, R, S), rgb (B, R, S, 3)."""
    batch, rays, samples = t.shape
    points = origins.unsqueeze(-2) + t.unsqueeze(-1) * directions.unsqueeze(-2)  # (B, R, S, 3)
    features = _mean_plane_features(planes, table, points.view(batch, rays * samples, 3), box_size, axes)
    raw_sigma, rgb = decoder(features)  # (B*R*S, 1), (B*R*S, 3): 2-D, so linear layers run as one addmm
    return raw_sigma.view(batch, rays, samples), rgb.view(batch, rays, samples, -1)


def _render_rays(planes, decoder, origins, directions, near, far, jitter, importance_u,
                 num_samples, box_size, axes, white_background):
    t_coarse = stratified_depths(near, far, num_samples, jitter)  # (B, R, S)
    table = _plane_table(planes)  # channels-last copy shared by both passes
    raw_sigma, rgb = _query(planes, table, decoder, origins, directions, t_coarse, box_size, axes)
    t = t_coarse
    if importance_u is not None:
        with torch.no_grad():  # only the fine depths come out of the coarse march, and they are detached
            coarse_weights = _interval_weights(raw_sigma, t_coarse, -1.0)
            t_fine = sample_importance(t_coarse, coarse_weights, importance_u)  # (B, R, N)
        raw_fine, rgb_fine = _query(planes, table, decoder, origins, directions, t_fine, box_size, axes)
        t, order = torch.sort(torch.cat([t_coarse, t_fine], -1), -1)  # (B, R, S+N)
        raw_sigma = torch.cat([raw_sigma, raw_fine], -1).gather(-1, order)
        rgb = torch.cat([rgb, rgb_fine], -2).gather(-2, order.unsqueeze(-1).expand(-1, -1, -1, rgb.shape[-1]))
    rgb, depth, opacity, _ = composite(rgb, raw_sigma, t, white_background=white_background, far=far)
    return rgb, depth, opacity, raw_sigma


def _as_ray_limit(name: str, value, like: Tensor) -> Tensor | float:
    """near/far as a finite float, or a tensor broadcastable to (B, R) or (B, R, 1) -> (B, R, 1)."""
    batch, rays = like.shape[:2]
    if not isinstance(value, Tensor):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite float or a tensor, got {value!r}")
        return float(value)
    if value.dtype != like.dtype or value.device != like.device:
        raise TypeError(f"{name} must have the dtype and device of origins, got {value.dtype}, {value.device}")
    try:
        return (value.unsqueeze(-1) if value.ndim == 2 else value).expand(batch, rays, 1)
    except RuntimeError:
        raise ValueError(f"{name} must be a float or broadcastable to (B, R, 1) = ({batch}, {rays}, 1), "
                         f"got {tuple(value.shape)}") from None


def render_triplane(planes: Tensor, decoder, origins: Tensor, directions: Tensor, near, far,
                    num_samples: int = 16, num_importance: int = 16, box_size: float = 1.0,
                    plane_axes: str = "xy_yz_zx", jitter: Tensor | None = None,
                    importance_u: Tensor | None = None, white_background: bool = False,
                    chunk_rays: int | None = None) -> dict[str, Tensor]:
    """Render triplanes along rays: S stratified samples, N importance samples, one march over S + N.

    planes: (B, 3, C, H, W); decoder: callable features (..., C) -> (raw_sigma (..., 1), rgb (..., 3));
    origins, directions: (B, R, 3), unit directions (``cameras.pixel_rays``); near, far: floats or
    tensors broadcastable to (B, R, 1) with near < far; jitter: (B, R, S) in [0, 1) (drawn with
    torch.rand if None; pass zeros for a deterministic render); importance_u: (B, R, N) in [0, 1]
    (drawn if None); chunk_rays: render that many rays at a time, rounded up to a multiple of
    RAY_BLOCK (bit-identical numbers, bounded memory; with gradients each chunk is checkpointed and
    recomputed in backward).
    Returns rgb (B, R, 3) (EG3D range, about [0, 1]), depth (B, R, 1) (distance along the ray; far for
    empty rays), opacity (B, R, 1), raw_sigma (B, R, S+N) (raw densities of every sample, sorted by depth).
    """
    _check_tensor("planes", planes, 5)
    if planes.shape[1] != 3:
        raise ValueError(f"planes must have shape (B, 3, C, H, W) with 3 planes, got {tuple(planes.shape)}")
    _check_tensor("origins", origins, 3, (3,))
    _check_tensor("directions", directions, 3, (3,))
    if origins.shape != directions.shape or origins.shape[0] != planes.shape[0] or origins.shape[1] == 0:
        raise ValueError(f"origins {tuple(origins.shape)} and directions {tuple(directions.shape)} must both "
                         f"be (B, R, 3) with B = {planes.shape[0]} (planes) and R >= 1")
    for name, tensor in (("origins", origins), ("directions", directions)):
        if tensor.dtype != planes.dtype or tensor.device != planes.device:
            raise TypeError(f"{name} ({tensor.dtype}, {tensor.device}) must match planes "
                            f"({planes.dtype}, {planes.device})")
    box_size = _check_box_size(box_size)
    axes = _check_plane_axes(plane_axes)
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    if not isinstance(num_importance, int) or num_importance < 0:
        raise ValueError(f"num_importance must be an int >= 0, got {num_importance!r}")
    if num_importance > 0 and num_samples < 3:
        raise ValueError(f"importance sampling needs num_samples >= 3, got {num_samples}")
    near = _as_ray_limit("near", near, origins)
    far = _as_ray_limit("far", far, origins)
    if isinstance(near, float) and isinstance(far, float):
        if not near < far:
            raise ValueError(f"near must be < far, got near={near}, far={far}")
    elif not bool((near < far).all()):  # a host sync, only for per-ray limits
        raise ValueError("near must be < far for every ray")
    batch, rays = origins.shape[:2]
    if jitter is None:
        jitter = torch.rand(batch, rays, num_samples, dtype=origins.dtype, device=origins.device)
    _check_tensor("jitter", jitter, min_ndim=0)
    try:
        jitter = jitter.expand(batch, rays, num_samples)
    except RuntimeError:
        raise ValueError(f"jitter must broadcast to (B, R, S) = ({batch}, {rays}, {num_samples}), "
                         f"got {tuple(jitter.shape)}") from None
    if num_importance > 0:
        if importance_u is None:
            importance_u = torch.rand(batch, rays, num_importance, dtype=origins.dtype, device=origins.device)
        _check_tensor("importance_u", importance_u, 3)
        if importance_u.shape != (batch, rays, num_importance):
            raise ValueError(f"importance_u must have shape (B, R, N) = ({batch}, {rays}, {num_importance}), "
                             f"got {tuple(importance_u.shape)}")
    else:
        importance_u = None
    if chunk_rays is not None and (not isinstance(chunk_rays, int) or chunk_rays < 1):
        raise ValueError(f"chunk_rays must be a positive int or None, got {chunk_rays!r}")

    # Vectorised CPU kernels (softplus, sigmoid, log1p, ...) run the last numel % 16 elements of a tensor
    # through a scalar path that can differ in the last bit. Padding the rays to a multiple of RAY_BLOCK
    # (repeating the last ray) and cutting chunks at multiples of it puts every element on the same code
    # path whatever the chunking: chunk_rays changes the memory, never the numbers.
    padded = -(-rays // RAY_BLOCK) * RAY_BLOCK
    chunk = padded if chunk_rays is None else min(padded, -(-chunk_rays // RAY_BLOCK) * RAY_BLOCK)
    index = torch.arange(padded, device=origins.device).clamp(max=rays - 1)
    per_ray = [x if x is None or isinstance(x, float) else x.index_select(1, index)
               for x in (origins, directions, near, far, jitter, importance_u)]
    options = dict(num_samples=num_samples, box_size=box_size, axes=axes, white_background=white_background)
    chunks = []
    for start in range(0, padded, chunk):
        part = [x if x is None or isinstance(x, float) else x[:, start:start + chunk] for x in per_ray]
        if chunk < padded and torch.is_grad_enabled():  # keep only the chunk inputs, recompute in backward
            chunks.append(checkpoint(_render_rays, planes, decoder, *part, **options, use_reentrant=False))
        else:
            chunks.append(_render_rays(planes, decoder, *part, **options))
    outputs = [torch.cat(parts, 1)[:, :rays] for parts in zip(*chunks)]
    rgb, depth, opacity, raw_sigma = outputs
    return {"rgb": rgb, "depth": depth, "opacity": opacity, "raw_sigma": raw_sigma}


# ---------------------------------------------------------------------------------------------------
# 6. Networks: the point decoder (EG3D OSGDecoder) and the triplane decoder Φ of 3D-Prior
# ---------------------------------------------------------------------------------------------------


class _DecoderMLP(torch.autograd.Function):
    """fc2(softplus(fc1(x))) on (M, C) features, block by block of rows.

    Keeps only x for backward (and the (M, hidden) activations softplus(fc1(x)) unless ``recompute``),
    instead of autograd's three (M, hidden)-sized tensors; the backward recomputes the hidden layer block
    by block, or gets softplus' = sigmoid from the kept activations: sigmoid(h) = 1 - exp(-softplus(h)).
    """

    @staticmethod
    def forward(ctx, features: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor,
                recompute: bool) -> Tensor:
        out = features.new_empty(features.shape[0], weight2.shape[0])  # (M, 1 + rgb)
        activations = None if recompute else features.new_empty(features.shape[0], weight1.shape[0])
        for rows in _row_blocks(features.shape[0], features.device, CPU_DECODER_ROWS):
            hidden = torch.addmm(bias1, features[rows], weight1.t())  # (rows, hidden)
            activation = F.softplus(hidden)
            if activations is not None:
                activations[rows] = activation
            torch.addmm(bias2, activation, weight2.t(), out=out[rows])
        ctx.save_for_backward(features, weight1, bias1, weight2, activations)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        features, weight1, bias1, weight2, activations = ctx.saved_tensors
        grad_features = torch.empty_like(features) if ctx.needs_input_grad[0] else None
        grad_weight1, grad_bias1 = torch.zeros_like(weight1), torch.zeros_like(bias1)
        grad_weight2 = torch.zeros_like(weight2)
        for rows in _row_blocks(features.shape[0], features.device, CPU_DECODER_ROWS):
            if activations is None:
                hidden = torch.addmm(bias1, features[rows], weight1.t())  # recomputed
                activation, slope = F.softplus(hidden), hidden.sigmoid_()  # softplus' = sigmoid
            else:
                activation = activations[rows]
                slope = torch.expm1(-activation).neg_()  # 1 - exp(-softplus(h)) = sigmoid(h)
            grad_weight2.addmm_(grad_out[rows].t(), activation)
            grad_hidden = (grad_out[rows] @ weight2).mul_(slope)
            if grad_features is not None:
                torch.mm(grad_hidden, weight1, out=grad_features[rows])
            grad_weight1.addmm_(grad_hidden.t(), features[rows])
            grad_bias1 += grad_hidden.sum(0)
        return grad_features, grad_weight1, grad_bias1, grad_weight2, grad_out.sum(0), None


class TriplaneDecoder(nn.Module):
    """EG3D's OSGDecoder: FC(C -> 64) -> softplus -> FC(64 -> 1 + 3), rgb = sigmoid * 1.002 - 0.001.

    The mean over the three planes that OSGDecoder starts with is done by ``render_triplane`` (fused
    with the plane lookup), so this module maps averaged features (..., C) to
    (raw_sigma (..., 1), rgb (..., 3)). The view direction is not used. Plain linear layers with EG3D's
    initialisation (weights N(0, 1/fan_in), zero bias) replace its equalized-lr layers (same function).
    With gradients the MLP keeps only its input features for backward and recomputes the 64-wide hidden
    layer there (one more (M, C) x (C, 64) matmul; the smallest peak memory); recompute=False keeps the
    64-wide softplus activations instead (autograd would keep three 64-wide tensors). On CPU both go
    through the rows in blocks of CPU_DECODER_ROWS.
    """

    def __init__(self, feature_dim: int = 32, hidden_dim: int = 64, rgb_dim: int = 3, recompute: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(feature_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, 1 + rgb_dim)
        self.recompute = recompute
        for layer in (self.fc1, self.fc2):
            nn.init.normal_(layer.weight, std=1 / math.sqrt(layer.in_features))
            nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        out = _DecoderMLP.apply(features.reshape(-1, features.shape[-1]), self.fc1.weight, self.fc1.bias,
                                self.fc2.weight, self.fc2.bias, self.recompute)
        out = out.view(*features.shape[:-1], -1)
        rgb = torch.sigmoid(out[..., 1:]) * (1 + 2 * 0.001) - 0.001  # EG3D's colour clamp
        return out[..., :1], rgb


class _CrossAttentionBlock(nn.Module):
    """Pre-norm transformer block whose queries attend to a memory: x += attn(x, h); x += mlp(x)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q, self.to_kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        q = rearrange(self.to_q(self.norm_q(x)), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = rearrange(self.to_kv(self.norm_kv(memory)), "b m (two h d) -> two b h m d", two=2, h=self.num_heads)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, dim / heads)
        x = x + self.proj(rearrange(attended, "b h n d -> b n (h d)"))
        return x + self.mlp(self.norm_mlp(x))


class TriplaneGenerator(nn.Module):
    """The decoder Φ of 3D-Prior: representation tokens h -> triplanes (B, 3, C, 128, 128).

    Learnable triplane embeddings (3 x 16 x 16 tokens of width ``dim``) cross-attend to h
    (``num_layers`` blocks), then each plane is upsampled by bilinear x2 + 3x3 conv + GELU blocks from
    ``embed_resolution`` to ``plane_resolution`` and projected to ``plane_channels``. The three planes share
    the conv weights. Paper sizes are the defaults; smaller ones are selectable for quick runs.
    """

    def __init__(self, input_dim: int, plane_channels: int = 32, plane_resolution: int = 128,
                 embed_resolution: int = 16, dim: int = 256, num_heads: int = 8, num_layers: int = 2):
        super().__init__()
        num_upsamples = round(math.log2(plane_resolution / embed_resolution))
        if embed_resolution * 2 ** num_upsamples != plane_resolution:
            raise ValueError(f"plane_resolution must be embed_resolution * 2^k, got {plane_resolution}, "
                             f"{embed_resolution}")
        if dim % num_heads != 0:
            raise ValueError(f"dim must be divisible by num_heads, got {dim}, {num_heads}")
        self.embed_resolution = embed_resolution
        self.embeddings = nn.Parameter(torch.randn(3 * embed_resolution ** 2, dim) * 0.02)
        self.input_proj = nn.Linear(input_dim, dim)
        self.blocks = nn.ModuleList(_CrossAttentionBlock(dim, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        layers, channels = [], dim
        for _ in range(num_upsamples):
            out_channels = max(channels // 2, plane_channels)
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(channels, out_channels, 3, padding=1), nn.GELU()]
            channels = out_channels
        layers.append(nn.Conv2d(channels, plane_channels, 1))
        self.upsample = nn.Sequential(*layers)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: (B, T, input_dim), e.g. class + patch tokens of the last 4 ViT layers -> (B, 3, C, H, W)."""
        _check_tensor("tokens", tokens, 3, (self.input_proj.in_features,))
        memory = self.input_proj(tokens)  # (B, T, dim)
        x = self.embeddings.expand(tokens.shape[0], -1, -1)  # (B, 3*16*16, dim)
        for block in self.blocks:
            x = block(x, memory)
        x = rearrange(self.norm(x), "b (k h w) c -> (b k) c h w", k=3, h=self.embed_resolution)
        return rearrange(self.upsample(x), "(b k) c h w -> b k c h w", k=3)
