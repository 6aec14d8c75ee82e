"""Tile-based 3D Gaussian splatting in pure PyTorch: vectorised forward, autograd backward.

Papers: Kerbl, Kopanas, Leimkühler, Drettakis, "3D Gaussian Splatting for Real-Time Radiance Field
Rendering", SIGGRAPH 2023 (arXiv:2308.04079); Yue, Das, Engelmann, Tang, Lenssen, "Improving 2D Feature
Representations by 3D-Aware Fine-Tuning" (FiT3D), ECCV 2024 (arXiv:2407.20229), which renders 64-dim
feature Gaussians with the same rasterizer. Conventions follow gsplat 1.5.3 (nerfstudio-project/gsplat,
``gsplat/cuda/_torch_impl.py`` and its CUDA kernels; Ye et al., arXiv:2409.06765), see
``tests/data/splatting/README.md``:

* parameters are post-activation: ``scales`` are standard deviations, ``opacities`` lie in [0, 1],
  ``quats`` are (w, x, y, z) and normalised here (gradients are w.r.t. the raw quaternion);
* OpenCV camera: ``viewmat`` is world-to-camera, ``K`` in pixels, pixel (row i, column j) has its
  centre at (j + 0.5, i + 0.5); depth is camera z;
* EWA splatting with gsplat's clamped Jacobian (1.3 x the half field of view) and the ``eps2d`` = 0.3
  low-pass filter (no opacity compensation), per-axis 3.33 sigma boxes for culling and tile binning;
* front-to-back compositing with gsplat's rules: ``alpha = min(alpha_max, o exp(-sigma))``, a pair is
  skipped when ``alpha < 1/255`` (or ``sigma < 0``), a pixel stops *before* the Gaussian that would bring
  its transmittance to ``<= 1e-4``.

The file reads top-down in gsplat's stage order, one function per stage:

1. ``quaternion_to_rotation``, ``gaussian_covariances``: 3D covariances ``R S S^T R^T``;
2. ``project_gaussians``: world -> camera, EWA Jacobian, 2D covariances, radii and conics, culling;
3. ``intersect_tiles``: every (tile, Gaussian) overlap, sorted by tile and depth with one ``torch.sort``;
4. ``find_pixel_pairs`` (which pairs pass the skip rule; no gradient) and ``composite_pairs``
   (transmittance ``T_i = prod_{j<i} (1 - alpha_j)`` as ``exp`` of a ``cumsum`` of ``log(1 - alpha)``
   along each pixel's list, the stop rule as a mask, colours / depth / alpha by one ``index_add``;
   autograd does the backward);
5. ``spherical_harmonics``: view-dependent colour;
6. ``rasterize_gaussians``: the public entry point, and ``compiled_rasterizer`` (``torch.compile`` of
   the differentiable stages with dynamic shapes: the CUDA path);
7. the fast path of the same compositing math (``composite_pairs_fast``: per-pixel scan with a
   hand-written backward, a sparse CSR pixel x Gaussian matrix product instead of ``index_add``),
   selected by ``rasterize_gaussians(..., fast=...)``: ``None`` (default) takes it only on CPU for
   colours with >= 16 channels (FiT3D's 64-dim features, ~2x faster there), ``True``/``False`` force it.
   Tested equal to the readable path in float64 and by gradcheck.

How the per-pixel loop of the CUDA kernel becomes tensor code: for each tile, the block ``tile pixels x
tile's depth-sorted Gaussians`` is evaluated without gradient to find the (pixel, Gaussian) pairs that
pass the skip rule; only those pairs (grouped by pixel, front to back) enter the differentiable part.
Pairs whose transmittance after them is ``<= 1e-4`` get weight 0, which is exactly the stop rule because
the transmittance never increases along a pixel's list. The result does not depend on ``tile_size``
(3.33 sigma boxes make every skipped pair invisible).

Host syncs (per call, none per Gaussian): the input checks (one), the number of tile intersections
(``repeat_interleave``), the tile list lengths (read once to chunk the pair search), the number of pairs
(``nonzero``) and the longest pixel list, as in any sort-based rasterizer without custom kernels.
"""

import functools
import math
import numbers
import warnings
from typing import Callable

import torch
from torch import Tensor

ALPHA_MIN = 1.0 / 255.0  # skip pairs with alpha below this (3DGS / gsplat)
TRANSMITTANCE_STOP = 1e-4  # stop a pixel before its transmittance would drop to this (gsplat)
BOX_SIGMAS = 3.33  # per-axis radius of the screen-space box in standard deviations (gsplat 1.5)
JACOBIAN_FOV_MARGIN = 0.3  # the EWA Jacobian is evaluated inside 1.3 x the half field of view
MAX_RADIUS = 1 << 24  # box radii are capped here (int32 output; such a box covers any image)
PAIR_BLOCK_ELEMENTS = 1 << 20  # (tile pixels x tile Gaussians) evaluated at once in find_pixel_pairs
FAST_PATH_MIN_CHANNELS = 16  # fast=None picks the fast path on CPU from this many colour channels on

# Real spherical harmonics constants of the 3DGS basis, degree 0-3 (Sloan, "Efficient Spherical
# Harmonic Evaluation", JCGT 2013), in the order of 3DGS `features_dc` + `features_rest`.
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960395)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


# ----------------------------------------------------------------------------------------------------
# 1. 3D Gaussians: rotation, covariance
# ----------------------------------------------------------------------------------------------------


def quaternion_to_rotation(quats: Tensor) -> Tensor:
    """Rotation matrices from quaternions ``quats: (..., 4)`` in (w, x, y, z) order, any non-zero norm.

    ``q`` is divided by its largest absolute component before it is normalised: the direction is the
    same, and ``|q|^2`` can neither underflow (q ~ 1e-30) nor overflow (q ~ 1e30) in float32. A zero
    quaternion has no rotation (NaN here; ``rasterize_gaussians`` rejects it). Returns ``(..., 3, 3)``.
    """
    quats = quats / quats.abs().amax(dim=-1, keepdim=True)
    w, x, y, z = torch.unbind(quats / quats.norm(dim=-1, keepdim=True), dim=-1)
    rotation = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    )  # fmt: skip
    return rotation.reshape(quats.shape[:-1] + (3, 3))


def gaussian_covariances(quats: Tensor, scales: Tensor) -> Tensor:
    """World covariances ``Sigma = R S S^T R^T`` (3DGS Eq. 6), ``quats: (N, 4)``, ``scales: (N, 3)``.

    Returns ``(N, 3, 3)``.
    """
    rotation_scale = quaternion_to_rotation(quats) * scales[:, None, :]  # M = R diag(s), (N, 3, 3)
    return rotation_scale @ rotation_scale.transpose(-1, -2)  # 3DGS Eq. 6


# ----------------------------------------------------------------------------------------------------
# 2. Projection: world -> camera, EWA splatting, radii and conics, culling
# ----------------------------------------------------------------------------------------------------


def project_gaussians(
    means: Tensor,
    covars: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.2,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
) -> dict[str, Tensor]:
    """EWA projection of 3D Gaussians to the image (Zwicker et al. 2002; 3DGS Eq. 5) with culling.

    Args:
        means: (N, 3) world positions. covars: (N, 3, 3) world covariances.
        viewmat: (4, 4) world-to-camera. K: (3, 3) intrinsics (skew ignored). width, height: image size.
    Returns a dict:
        ``means2d`` (N, 2) pixel coordinates of the centres, ``depths`` (N,) camera z,
        ``conics`` (N, 3) upper triangle (xx, xy, yy) of the inverse 2D covariance,
        ``radii`` (N, 2) int32 per-axis box half sizes in pixels, 0 for culled Gaussians,
        ``visible`` (N,) bool (radii > 0). Only visible Gaussians have defined means2d / conics.
    """
    rotation_cw, translation_cw = viewmat[:3, :3], viewmat[:3, 3]
    means_cam = means @ rotation_cw.T + translation_cw  # (N, 3)
    covars_cam = rotation_cw @ covars @ rotation_cw.T  # (N, 3, 3), W Sigma W^T
    x, y, depths = means_cam.unbind(-1)
    in_depth_range = (depths > near_plane) & (depths < far_plane)
    # Culled Gaussians (e.g. z = 0, behind the camera) still flow through the arithmetic below; a safe
    # depth keeps their values and gradients finite (they are masked out afterwards).
    z = torch.where(in_depth_range, depths, torch.ones_like(depths))

    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)  # perspective projection

    # EWA Jacobian of the perspective map, evaluated at a point clamped to 1.3 x the field of view
    # (3DGS `computeCov2D`, generalised by gsplat to an off-centre principal point).
    tan_fov_x, tan_fov_y = 0.5 * width / fx, 0.5 * height / fy
    lim_x_neg = cx / fx + JACOBIAN_FOV_MARGIN * tan_fov_x
    lim_x_pos = (width - cx) / fx + JACOBIAN_FOV_MARGIN * tan_fov_x
    lim_y_neg = cy / fy + JACOBIAN_FOV_MARGIN * tan_fov_y
    lim_y_pos = (height - cy) / fy + JACOBIAN_FOV_MARGIN * tan_fov_y
    x_clamped = z * torch.clamp(x / z, min=-lim_x_neg, max=lim_x_pos)
    y_clamped = z * torch.clamp(y / z, min=-lim_y_neg, max=lim_y_pos)
    zeros = torch.zeros_like(z)
    jacobian = torch.stack(
        [fx / z, zeros, -fx * x_clamped / (z * z), zeros, fy / z, -fy * y_clamped / (z * z)], dim=-1
    ).reshape(-1, 2, 3)
    covars2d = jacobian @ covars_cam @ jacobian.transpose(-1, -2)  # 3DGS Eq. 5: J W Sigma W^T J^T
    covars2d = covars2d + eps2d * torch.eye(2, dtype=covars2d.dtype, device=covars2d.device)  # low-pass

    var_x, cov_xy, var_y = covars2d[:, 0, 0], covars2d[:, 0, 1], covars2d[:, 1, 1]
    det = (var_x * var_y - cov_xy * cov_xy).clamp(min=1e-10)
    conics = torch.stack([var_y / det, -cov_xy / det, var_x / det], dim=-1)  # inverse 2D covariance

    # Per-axis screen-space box: outside 3.33 sigma along an axis, alpha < 1/255 for any opacity <= 1.
    with torch.no_grad():
        radii = torch.ceil(BOX_SIGMAS * torch.stack([var_x, var_y], dim=-1).clamp(min=0).sqrt())  # (N, 2)
        radii = radii.clamp(max=MAX_RADIUS)
        centre = means2d.detach()
        on_image = (
            (centre[:, 0] + radii[:, 0] > 0)
            & (centre[:, 0] - radii[:, 0] < width)
            & (centre[:, 1] + radii[:, 1] > 0)
            & (centre[:, 1] - radii[:, 1] < height)
        )  # False for a non-finite centre
        finite = torch.isfinite(conics.detach()).all(dim=-1)
        visible = in_depth_range & on_image & finite & (radii > 0).all(dim=-1)
        radii = torch.where(visible[:, None], radii, torch.zeros_like(radii)).to(torch.int32)
    return {"means2d": means2d, "depths": depths, "conics": conics, "radii": radii, "visible": visible}


# ----------------------------------------------------------------------------------------------------
# 3. Tile intersection and sorting
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def intersect_tiles(
    means2d: Tensor, radii: Tensor, depths: Tensor, width: int, height: int, tile_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """List every (tile, Gaussian) overlap, sorted by tile and front to back within a tile.

    gsplat's ``isect_tiles`` + ``isect_offset_encode``, vectorised.
    Args:
        means2d: (N, 2). radii: (N, 2) int, 0 = culled. depths: (N,).
    Returns:
        ``tile_ids`` (I,) and ``gaussian_ids`` (I,) of the I intersections, sorted by one ``torch.sort``
        on the key ``tile * N + depth_rank``; ``tile_starts`` (num_tiles + 1,) offsets of each tile's run.
    """
    num_gaussians = means2d.shape[0]
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    visible = (radii > 0).all(dim=-1)
    radii = radii.to(means2d.dtype)
    centre = torch.where(visible[:, None], means2d, torch.zeros_like(means2d))  # culled: any finite value
    tile_limits = torch.tensor([tiles_x, tiles_y], device=means2d.device)
    tile_min = torch.minimum(torch.floor((centre - radii) / tile_size).long().clamp(min=0), tile_limits)
    tile_max = torch.minimum(torch.ceil((centre + radii) / tile_size).long().clamp(min=0), tile_limits)
    tile_extent = tile_max - tile_min  # (N, 2) tiles covered along x and y
    tiles_per_gaussian = tile_extent.prod(dim=-1) * visible

    # One row per intersection: which Gaussian, and which tile of its box (row-major inside the box).
    all_ids = torch.arange(num_gaussians, device=means2d.device)
    gaussian_ids = torch.repeat_interleave(all_ids, tiles_per_gaussian)  # host sync: list size
    first_row = torch.cumsum(tiles_per_gaussian, 0) - tiles_per_gaussian
    index_in_box = torch.arange(gaussian_ids.shape[0], device=means2d.device) - first_row[gaussian_ids]
    box_width = tile_extent[gaussian_ids, 0].clamp(min=1)
    tile_x = tile_min[gaussian_ids, 0] + index_in_box % box_width
    tile_y = tile_min[gaussian_ids, 1] + index_in_box // box_width
    tile_ids = tile_y * tiles_x + tile_x

    # The depth order enters the key as a rank, which is exact for any dtype and ties (stable order).
    depth_rank = gaussian_ids.new_empty(num_gaussians)
    depth_rank[torch.argsort(depths, stable=True)] = all_ids
    sort_key = tile_ids * num_gaussians + depth_rank[gaussian_ids]
    order = torch.sort(sort_key).indices  # the one sort: by tile, then front to back
    tile_ids, gaussian_ids = tile_ids[order], gaussian_ids[order]
    tile_counts = torch.bincount(tile_ids, minlength=tiles_x * tiles_y)
    tile_starts = torch.cat([tile_counts.new_zeros(1), torch.cumsum(tile_counts, 0)])
    return tile_ids, gaussian_ids, tile_starts


# ----------------------------------------------------------------------------------------------------
# 4. Per-pixel alpha compositing, front to back
# ----------------------------------------------------------------------------------------------------


def pair_sigma(means2d: Tensor, conics: Tensor, pixel_x: Tensor, pixel_y: Tensor) -> Tensor:
    """Gaussian exponent ``sigma = 1/2 d^T Sigma2D^-1 d`` with ``d = mean - pixel centre`` (broadcasting).

    ``means2d: (..., 2)``, ``conics: (..., 3)`` and pixel centre coordinates broadcast against each other.
    """
    dx, dy = means2d[..., 0] - pixel_x, means2d[..., 1] - pixel_y
    a, b, c = conics.unbind(-1)
    return 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy  # 3DGS Eq. 4 exponent


@torch.no_grad()
def find_pixel_pairs(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    gaussian_ids: Tensor,
    tile_starts: Tensor,
    width: int,
    height: int,
    tile_size: int,
) -> tuple[Tensor, Tensor]:
    """(pixel, Gaussian) pairs that pass the skip rule, grouped by pixel and front to back in each pixel.

    The role of gsplat's ``rasterize_to_indices_in_range``. Each tile's block ``(tile pixels, tile's
    sorted Gaussians)`` is evaluated at once; tiles are taken in chunks of similar list length (longest
    first) so that a block has at most ``PAIR_BLOCK_ELEMENTS`` entries. A pair is kept iff
    ``sigma >= 0`` and ``o exp(-sigma) >= 1/255``, written as ``sigma <= log(255 o)`` (gsplat's skip rule;
    alpha_max > 1/255 does not change it). The stop rule needs the transmittance and is applied in
    ``composite_pairs``. The tile list lengths are read on the host once, to form the chunks.

    Returns ``pixel_ids`` (M,) raster indices ``row * width + column`` and ``pair_gaussian_ids`` (M,).
    """
    device = means2d.device
    tiles_x = math.ceil(width / tile_size)
    tile_counts = tile_starts[1:] - tile_starts[:-1]
    tiles_by_count = torch.argsort(tile_counts, descending=True, stable=True)
    sorted_counts = tile_counts[tiles_by_count].tolist()  # host sync: chunk sizes
    log_threshold = torch.log(opacities / ALPHA_MIN)  # skip iff sigma > log(255 o)
    offsets = torch.arange(tile_size, device=device)
    pixel_ids, pair_gaussian_ids = [], []
    first = 0
    while first < len(sorted_counts) and sorted_counts[first] > 0:
        list_length = sorted_counts[first]
        num_tiles = max(1, PAIR_BLOCK_ELEMENTS // (list_length * tile_size * tile_size))
        tiles = tiles_by_count[first : first + num_tiles]  # (T,)
        first += num_tiles
        slot = torch.arange(list_length, device=device)
        in_list = slot < tile_counts[tiles, None]  # (T, L)
        rows = torch.minimum(tile_starts[tiles, None] + slot, tile_starts[-1:] - 1)
        gaussians = gaussian_ids[rows]  # (T, L), padded slots repeat a valid id and are masked
        threshold = torch.where(in_list, log_threshold[gaussians], -torch.inf)  # (T, L)
        column = (tiles % tiles_x)[:, None] * tile_size + offsets  # (T, S) pixel columns of the tile
        row = (tiles // tiles_x)[:, None] * tile_size + offsets  # (T, S) pixel rows of the tile
        # pair_sigma on the (T, S rows, S columns, L) block, split into per-column and per-row parts so
        # that only three operations run on the full block.
        a, b, c = conics[gaussians].unbind(-1)  # (T, L)
        dx = means2d[gaussians, 0][:, None, :] - (column + 0.5)[:, :, None]  # (T, S, L)
        dy = means2d[gaussians, 1][:, None, :] - (row + 0.5)[:, :, None]  # (T, S, L)
        sigma_x, sigma_y, b_dx = 0.5 * a[:, None] * dx * dx, 0.5 * c[:, None] * dy * dy, b[:, None] * dx
        sigma = (sigma_y[:, :, None] + sigma_x[:, None]) + b_dx[:, None] * dy[:, :, None]  # (T, S, S, L)
        keep = (sigma <= threshold[:, None, None]) & (sigma >= 0)
        tile_index, in_row, in_column, in_slot = keep.nonzero(as_tuple=True)  # pixel-major, front to back
        pair_row, pair_column = row[tile_index, in_row], column[tile_index, in_column]
        pair_gaussians = gaussians[tile_index, in_slot]
        if width % tile_size or height % tile_size:  # drop the parts of edge tiles outside the image
            on_image = (pair_row < height) & (pair_column < width)
            pair_row, pair_column = pair_row[on_image], pair_column[on_image]
            pair_gaussians = pair_gaussians[on_image]
        pixel_ids.append(pair_row * width + pair_column)
        pair_gaussian_ids.append(pair_gaussians)
    if not pixel_ids:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    return torch.cat(pixel_ids), torch.cat(pair_gaussian_ids)


@torch.no_grad()
def position_in_pixel(pixel_ids: Tensor) -> Tensor:
    """Index of each pair in its pixel's front-to-back list (0, 1, 2, ...); pairs grouped by pixel, (M,)."""
    position = torch.arange(pixel_ids.shape[0], device=pixel_ids.device)
    starts_list = torch.ones_like(pixel_ids, dtype=torch.bool)
    starts_list[1:] = pixel_ids[1:] != pixel_ids[:-1]
    list_start = torch.cummax(torch.where(starts_list, position, 0), dim=0).values  # first pair of the list
    return position - list_start


def composite_pairs(
    pixel_ids: Tensor,
    pair_gaussian_ids: Tensor,
    slots: Tensor,
    longest: int,
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    depths: Tensor,
    colors: Tensor,
    width: int,
    height: int,
    alpha_max: float = 0.99,
) -> tuple[Tensor, Tensor, Tensor]:
    """Front-to-back alpha compositing of the kept pairs (3DGS Eq. 3), differentiable by autograd.

    Args:
        pixel_ids, pair_gaussian_ids: (M,) from ``find_pixel_pairs`` (grouped per pixel, front to back).
        slots: (M,) ``position_in_pixel(pixel_ids)``; longest: the longest pixel list (``slots.max() + 1``).
        means2d (N, 2), conics (N, 3), opacities (N,), depths (N,), colors (N, D): per Gaussian.
        alpha_max: clamp of a single alpha (0.99 in 3DGS/FiT3D, 0.999 in gsplat).
    Returns ``color (H*W, D)`` = sum_i c_i alpha_i T_i, ``alpha (H*W,)`` = 1 - final transmittance,
    ``depth_acc (H*W,)`` = sum_i z_i alpha_i T_i, in raster order. Memory: (H*W, longest) for the
    transmittance table, (M, D + 2) for the weighted values.
    """
    pixel_x = (pixel_ids % width).to(means2d.dtype) + 0.5  # pixel centres (column + 0.5, row + 0.5)
    pixel_y = torch.div(pixel_ids, width, rounding_mode="floor").to(means2d.dtype) + 0.5
    pair_means2d = means2d.index_select(0, pair_gaussian_ids)  # (M, 2), i.e. means2d[pair_gaussian_ids]
    pair_conics = conics.index_select(0, pair_gaussian_ids)  # (M, 3)
    sigma = pair_sigma(pair_means2d, pair_conics, pixel_x, pixel_y)  # (M,)
    pair_opacities = opacities.index_select(0, pair_gaussian_ids)
    alpha = torch.clamp(pair_opacities * torch.exp(-sigma), max=alpha_max)  # alpha_i = o_i G_i (3DGS Eq. 4)

    # T_i = prod_{j < i} (1 - alpha_j) along each pixel's list (3DGS Eq. 3), as exp of a sum of logs: the
    # lists become the rows of a (pixels, longest list + 1) table, shifted by one slot so that the
    # cumulative sum along a row is exclusive, and padded with log(1) = 0.
    log_one_minus_alpha = torch.zeros(width * height, longest + 1, dtype=alpha.dtype, device=alpha.device)
    log_one_minus_alpha = log_one_minus_alpha.index_put((pixel_ids, slots + 1), torch.log1p(-alpha))
    transmittance = torch.exp(torch.cumsum(log_one_minus_alpha, dim=1)[pixel_ids, slots])  # T_i, (M,)
    # Stop rule as a mask: a pair counts only while the transmittance after it stays above 1e-4.
    reached = (transmittance * (1 - alpha)).detach() > TRANSMITTANCE_STOP
    weights = torch.where(reached, alpha * transmittance, torch.zeros_like(alpha))  # w_i = alpha_i T_i

    # Colours, depth and alpha (= sum of weights = 1 - final transmittance) in one weighted sum per pixel.
    values = torch.cat([colors, depths[:, None].to(colors), torch.ones_like(colors[:, :1])], dim=-1)  # (N, D+2)
    weighted = weights[:, None].to(colors) * values.index_select(0, pair_gaussian_ids)  # (M, D + 2)
    blended = values.new_zeros(width * height, values.shape[-1]).index_add(0, pixel_ids, weighted)
    color, depth_acc, alpha_image = blended[:, :-2], blended[:, -2], blended[:, -1]
    return color, alpha_image, depth_acc


# ----------------------------------------------------------------------------------------------------
# 5. Spherical harmonics (view-dependent colour)
# ----------------------------------------------------------------------------------------------------


def spherical_harmonics(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Real spherical harmonics of degree 0-3 in the 3DGS basis: ``sum_k Y_k(dir) coeffs_k``.

    Args:
        degree: 0, 1, 2 or 3; the first ``(degree + 1)^2`` coefficients are used.
        dirs: (..., 3) directions (normalised here; a zero direction gives the constant term only).
        coeffs: (..., K, C) with K >= (degree + 1)^2.
    Returns ``(..., C)``, without the +0.5 offset and clamping that the renderer applies.
    """
    if degree not in (0, 1, 2, 3):
        raise ValueError(f"degree must be 0, 1, 2 or 3, got {degree}")
    num_bases = (degree + 1) ** 2
    if coeffs.shape[-2] < num_bases:
        raise ValueError(f"coeffs must be (..., K >= {num_bases}, C), got shape {tuple(coeffs.shape)}")
    x, y, z = torch.unbind(dirs / dirs.norm(dim=-1, keepdim=True).clamp(min=1e-12), dim=-1)
    bases = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        bases += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        bases += [
            SH_C2[0] * x * y,
            SH_C2[1] * y * z,
            SH_C2[2] * (2 * zz - xx - yy),
            SH_C2[3] * x * z,
            SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        bases += [
            SH_C3[0] * y * (3 * xx - yy),
            SH_C3[1] * x * y * z,
            SH_C3[2] * y * (4 * zz - xx - yy),
            SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            SH_C3[4] * x * (4 * zz - xx - yy),
            SH_C3[5] * z * (xx - yy),
            SH_C3[6] * x * (xx - 3 * yy),
        ]
    basis = torch.stack(bases, dim=-1)  # (..., num_bases)
    return (basis[..., None] * coeffs[..., :num_bases, :]).sum(dim=-2)


# ----------------------------------------------------------------------------------------------------
# 6. Public entry point
# ----------------------------------------------------------------------------------------------------


def _check_inputs(
    means, quats, scales, opacities, colors, viewmat, K, width, height, sh_degree, background,
    near_plane, far_plane, eps2d, alpha_max, tile_size,
):  # fmt: skip
    """Validate the arguments of ``rasterize_gaussians`` (ValueError/TypeError naming the argument).

    Shapes, dtypes, devices and options are checked on the host; all value checks on tensors are
    reduced to one tensor of flags, read with a single device sync.
    """
    tensors = {"means": means, "quats": quats, "scales": scales, "opacities": opacities, "colors": colors}
    tensors |= {"viewmat": viewmat, "K": K}
    if background is not None:
        tensors["background"] = background
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in (torch.float32, torch.float64):  # float16 overflows in the projection
            raise TypeError(f"{name} must be a float32 or float64 tensor, got {value.dtype}")
    for name in ("quats", "scales", "opacities", "colors"):
        if tensors[name].dtype != means.dtype or tensors[name].device != means.device:
            raise TypeError(f"{name} must have the dtype and device of means ({means.dtype}, {means.device})")
    for name, size in (("width", width), ("height", height), ("tile_size", tile_size)):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    for name, value in (("near_plane", near_plane), ("far_plane", far_plane), ("eps2d", eps2d)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (math.isfinite(near_plane) and near_plane > 0):  # also rejects NaN
        raise ValueError(f"near_plane must be a finite number > 0 (nothing at or behind the camera), got {near_plane}")
    if not far_plane > near_plane:
        raise ValueError(f"far_plane must be larger than near_plane = {near_plane}, got {far_plane}")
    if not (math.isfinite(eps2d) and eps2d > 0):
        raise ValueError(f"eps2d must be a finite number > 0 (it keeps the 2D covariance invertible), got {eps2d}")
    if not (isinstance(alpha_max, numbers.Real) and 1.0 / 255.0 < alpha_max < 1.0):
        raise ValueError(f"alpha_max must lie in (1/255, 1), got {alpha_max!r}")
    if means.ndim != 2 or means.shape[1] != 3:
        raise ValueError(f"means must have shape (N, 3), got {tuple(means.shape)}")
    num = means.shape[0]
    if quats.shape != (num, 4):
        raise ValueError(f"quats must have shape (N, 4) = ({num}, 4), got {tuple(quats.shape)}")
    if scales.shape != (num, 3):
        raise ValueError(f"scales must have shape (N, 3) = ({num}, 3), got {tuple(scales.shape)}")
    if opacities.shape not in ((num,), (num, 1)):
        raise ValueError(f"opacities must have shape (N,) = ({num},), got {tuple(opacities.shape)}")
    if sh_degree is None:
        if colors.ndim != 2 or colors.shape[0] != num:
            raise ValueError(f"colors must have shape (N, D) = ({num}, D), got {tuple(colors.shape)}")
    else:
        if sh_degree not in (0, 1, 2, 3) or isinstance(sh_degree, bool):
            raise ValueError(f"sh_degree must be None, 0, 1, 2 or 3, got {sh_degree!r}")
        needed = (sh_degree + 1) ** 2
        if colors.ndim != 3 or colors.shape[0] != num or colors.shape[1] < needed or colors.shape[2] != 3:
            raise ValueError(
                f"colors must be SH coefficients of shape (N, K >= {needed}, 3) for sh_degree={sh_degree}, "
                f"got {tuple(colors.shape)}"
            )
    if viewmat.shape != (4, 4):
        raise ValueError(f"viewmat must have shape (4, 4) (world-to-camera), got {tuple(viewmat.shape)}")
    if K.shape != (3, 3):
        raise ValueError(f"K must have shape (3, 3), got {tuple(K.shape)}")
    if background is not None:
        channels = 3 if sh_degree is not None else colors.shape[-1]
        if background.shape != (channels,):
            raise ValueError(f"background must have shape (D,) = ({channels},), got {tuple(background.shape)}")

    problems = [(f"{name} must be finite, got NaN or Inf", ~torch.isfinite(value)) for name, value in tensors.items()]
    rotation = viewmat[:3, :3]
    eye = torch.eye(3, dtype=rotation.dtype, device=rotation.device)
    problems += [
        ("quats must have non-zero norm (they are normalised inside)", (quats == 0).all(dim=-1)),
        ("scales must be > 0 (standard deviations, post-activation)", scales <= 0),
        ("opacities must lie in [0, 1] (post-activation)", (opacities < 0) | (opacities > 1)),
        ("K must have positive focal lengths K[0, 0] and K[1, 1]", K.diagonal()[:2] <= 0),
        (
            "viewmat must be rigid: viewmat[:3, :3] a rotation (orthonormal, det +1), last row (0, 0, 0, 1)",
            ((rotation @ rotation.T - eye).abs().amax() > 1e-3)
            | (torch.dot(torch.linalg.cross(rotation[0], rotation[1]), rotation[2]) < 0)  # det < 0
            | (viewmat[3] != viewmat.new_tensor([0.0, 0.0, 0.0, 1.0])).any(),
        ),
    ]
    flags = torch.stack([violated.any().to(means.device) for _, violated in problems]).tolist()  # one sync
    for (message, _), flag in zip(problems, flags):
        if flag:
            raise ValueError(message)


def largest_scale(K: Tensor, width: int, height: int, near_plane: float, dtype: torch.dtype) -> Tensor:
    """Bound on the standard deviations below which no 2D covariance or determinant overflows ``dtype``.

    A Gaussian at the near plane with scale ``s`` has 2D variances of at most ``3 (J_max s)^2``, with
    ``J_max`` the largest row norm of the EWA Jacobian there. The bound ``J_max s <= 0.1 (dtype max)^(1/4)``
    keeps them below ``0.03 sqrt(dtype max)`` (float32: 2D standard deviations up to ~2e8 px, far larger
    than any image), so ``det`` stays finite. Returns a 0-dim tensor (no host sync).
    """
    focal = K.diagonal()[:2]
    sizes = K.new_tensor([float(width), float(height)])
    extent = (K[:2, 2].abs() + sizes) / focal + JACOBIAN_FOV_MARGIN * 0.5 * sizes / focal  # |x/z| bound
    jacobian_max = (focal / min(near_plane, 1.0) * (1 + extent)).max()  # culled Gaussians use z = 1
    return 0.1 * torch.finfo(dtype).max ** 0.25 / jacobian_max


def rasterize_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    *,
    sh_degree: int | None = None,
    background: Tensor | None = None,
    near_plane: float = 0.2,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    alpha_max: float = 0.99,
    tile_size: int = 8,
    detach_geometry: bool = False,
    fast: bool | None = None,
) -> dict[str, Tensor]:
    """Render 3D Gaussians into one pinhole camera (gsplat semantics, see the module docstring).

    Args:
        means: (N, 3) world centres. quats: (N, 4) rotations (w, x, y, z), any non-zero norm.
        scales: (N, 3) standard deviations (> 0); values beyond ``largest_scale`` (float32: a 2D standard
            deviation of ~1e8 px at the near plane) are clamped there, so nothing overflows (zero gradient above).
        opacities: (N,) in [0, 1]; exactly 0 or 1 (a saturated float32 sigmoid) are accepted: such a
            Gaussian is invisible or clamped to alpha_max.
        colors: (N, D) colours or features (any D), or with ``sh_degree`` SH coefficients (N, K, 3),
            K >= (sh_degree + 1)^2, evaluated along ``normalise(mean - camera centre)`` (world frame) and
            mapped to colour by ``max(SH + 0.5, 0)`` (gsplat / 3DGS).
        viewmat: (4, 4) rigid world-to-camera (OpenCV axes). K: (3, 3) intrinsics in pixels.
        width, height: image size in pixels.
        background: optional (D,) colour added with the final transmittance.
        near_plane, far_plane: Gaussians with camera z outside (near, far) are culled; ``near_plane > 0``.
        eps2d: low-pass variance (> 0) added to the 2D covariance. alpha_max: clamp of a single alpha.
        tile_size: tile edge in pixels; does not change the result, only speed and memory. 8 by default:
            on CPU, 8 x 8 blocks waste fewer pixel x Gaussian evaluations in ``find_pixel_pairs`` than
            gsplat's 16 x 16 (chosen there for CUDA thread blocks); the parity tests use 16.
        detach_geometry: FiT3D's rule for feature Gaussians: composite with weights computed from
            detached means/quats/scales/opacities, so a loss on ``render`` only trains ``colors``.
        fast: composite with ``composite_pairs_fast`` (hand-written scan backward, sparse CSR matrix
            product; the last section of this file) instead of the readable ``composite_pairs``. Same
            numbers (tested in float64 and by gradcheck); memory in proportion to the pairs only (the
            readable table is pixels x longest list). ``None`` (default) picks it on CPU for colours with
            at least ``FAST_PATH_MIN_CHANNELS`` = 16 channels (FiT3D's 64-dim features), where it is
            ~2x faster forward+backward (``benchmarks/bench_splatting.py``); everywhere else (RGB, SH
            colours, CUDA) the readable path runs; ``compiled_rasterizer`` defaults to ``fast=False``.
    Inputs are float32 or float64 (float16 is refused: 2D covariances overflow it). NaN or Inf in any
    input is an error (one host sync for all value checks).
    Returns a dict:
        ``render`` (H, W, D), ``alpha`` (H, W), ``depth_acc`` (H, W) = sum w_i z_i,
        ``depth_exp`` (H, W) = depth_acc / max(alpha, 1e-10), ``radii`` (N, 2) int32 (0 = culled),
        ``means2d`` (N, 2) projected centres (its ``.grad`` is kept after backward for densification
        when it requires grad), ``depths`` (N,) camera z, ``conics`` (N, 3).

    On CUDA, ``compiled_rasterizer()`` returns this function with its differentiable stages compiled.
    """
    _check_inputs(
        means, quats, scales, opacities, colors, viewmat, K, width, height, sh_degree, background,
        near_plane, far_plane, eps2d, alpha_max, tile_size,
    )  # fmt: skip
    return _rasterize(
        _EAGER_STAGES, means, quats, scales, opacities, colors, viewmat, K, int(width), int(height),
        sh_degree, background, near_plane, far_plane, eps2d, alpha_max, int(tile_size), detach_geometry, fast,
    )  # fmt: skip


def _project_and_shade(means, quats, scales, opacities, colors, viewmat, K, width, height, sh_degree,
                       near_plane, far_plane, eps2d, scale_limit):  # fmt: skip
    """Stages 1, 2 and 5 for one camera: covariances, projection, view-dependent colour (differentiable)."""
    covars = gaussian_covariances(quats, torch.minimum(scales, scale_limit))
    projected = project_gaussians(means, covars, viewmat, K, width, height, near_plane, far_plane, eps2d)
    if sh_degree is not None:
        camera_centre = -viewmat[:3, :3].T @ viewmat[:3, 3]  # inverse of the rigid world-to-camera map
        colors = torch.clamp_min(spherical_harmonics(sh_degree, means - camera_centre, colors) + 0.5, 0.0)
    return projected, colors


_EAGER_STAGES = {"project": _project_and_shade, "composite": composite_pairs}


def _rasterize(stages, means, quats, scales, opacities, colors, viewmat, K, width, height, sh_degree,
               background, near_plane, far_plane, eps2d, alpha_max, tile_size, detach_geometry, fast):  # fmt: skip
    """The pipeline of ``rasterize_gaussians`` after its input checks; ``stages`` may be compiled."""
    opacities = opacities.reshape(-1)
    viewmat, K = viewmat.to(means), K.to(means)
    if detach_geometry:  # FiT3D: the feature loss never moves the geometry
        means, quats, scales, opacities = means.detach(), quats.detach(), scales.detach(), opacities.detach()
    scale_limit = largest_scale(K, width, height, near_plane, means.dtype)
    projected, colors = stages["project"](
        means, quats, scales, opacities, colors, viewmat, K, width, height, sh_degree, near_plane, far_plane,
        eps2d, scale_limit,
    )  # fmt: skip
    means2d, depths, conics = projected["means2d"], projected["depths"], projected["conics"]
    if means2d.requires_grad:
        means2d.retain_grad()  # the view-space gradient statistic of 3DGS densification

    _, gaussian_ids, tile_starts = intersect_tiles(
        means2d.detach(), projected["radii"], depths.detach(), width, height, tile_size
    )
    pixel_ids, pair_gaussian_ids = find_pixel_pairs(
        means2d.detach(), conics.detach(), opacities.detach(), gaussian_ids, tile_starts, width, height, tile_size
    )
    if fast is None:
        fast = means.device.type == "cpu" and colors.shape[-1] >= FAST_PATH_MIN_CHANNELS
    if fast:
        color, alpha, depth_acc = composite_pairs_fast(
            pixel_ids, pair_gaussian_ids, means2d, conics, opacities, depths, colors, width, height, alpha_max
        )
    else:
        slots = position_in_pixel(pixel_ids)
        longest = int(slots.max()) + 1 if slots.numel() else 0  # host sync: width of the transmittance table
        color, alpha, depth_acc = stages["composite"](
            pixel_ids, pair_gaussian_ids, slots, longest, means2d, conics, opacities, depths, colors,
            width, height, alpha_max,
        )  # fmt: skip
    if background is not None:
        color = color + (1 - alpha)[:, None] * background.to(color)
    return {
        "render": color.reshape(height, width, -1),
        "alpha": alpha.reshape(height, width),
        "depth_acc": depth_acc.reshape(height, width),
        "depth_exp": (depth_acc / alpha.clamp(min=1e-10)).reshape(height, width),
        "radii": projected["radii"],
        "means2d": means2d,
        "depths": depths,
        "conics": conics,
    }


def compiled_rasterizer(**compile_options) -> Callable[..., dict[str, Tensor]]:
    """``rasterize_gaussians`` with its differentiable stages compiled by ``torch.compile``.

    The stages with data-dependent sizes (``intersect_tiles``, ``find_pixel_pairs``) run eagerly; the
    projection + SH stage and the readable compositing stage are compiled with ``dynamic=True``, so the
    number of Gaussians, of (tile, Gaussian) intersections and of (pixel, Gaussian) pairs may change
    from step to step without recompiling (checked by a slow test). Same signature and results as
    ``rasterize_gaussians``, except that ``fast`` defaults to False (the compiled stages are the readable
    ones; ``fast=True`` runs the fast path eagerly). In your own code::

        rasterize = compiled_rasterizer()           # once
        out = rasterize(means, quats, scales, ...)  # every step

    ``compile_options`` go to ``torch.compile`` (e.g. ``mode="max-autotune"``; ``dynamic`` defaults to True).
    """
    compile_options.setdefault("dynamic", True)
    stages = {name: torch.compile(stage, **compile_options) for name, stage in _EAGER_STAGES.items()}

    @functools.wraps(rasterize_gaussians)
    def rasterize(means, quats, scales, opacities, colors, viewmat, K, width, height, *, sh_degree=None,
                  background=None, near_plane=0.2, far_plane=1e10, eps2d=0.3, alpha_max=0.99, tile_size=8,
                  detach_geometry=False, fast=False):  # fmt: skip
        _check_inputs(
            means, quats, scales, opacities, colors, viewmat, K, width, height, sh_degree, background,
            near_plane, far_plane, eps2d, alpha_max, tile_size,
        )  # fmt: skip
        return _rasterize(
            stages, means, quats, scales, opacities, colors, viewmat, K, int(width), int(height), sh_degree,
            background, near_plane, far_plane, eps2d, alpha_max, int(tile_size), detach_geometry, fast,
        )  # fmt: skip

    return rasterize


# ----------------------------------------------------------------------------------------------------
# 7. Fast path of the same compositing math
#
# ``composite_pairs_fast`` computes exactly what ``composite_pairs`` computes, with two tuned pieces:
# the exclusive per-pixel sum of log(1 - alpha) is one global scan restarted at every pixel (memory in
# proportion to the pairs, not pixels x longest list; a hand-written backward keeps float32 precision),
# and the weighted sums per pixel are a sparse (pixels x Gaussians) matrix product in CSR form (never
# materialises the (pairs x channels) rows: several times faster for 64-dim features on CPU). Selected
# by ``rasterize_gaussians(..., fast=True)``; tested equal to the readable path in float64 and by
# gradcheck (tests/test_splatting.py).
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def _exclusive_cumsum_per_run(values: Tensor, run_of_pair: Tensor) -> Tensor:
    """Sum of the earlier ``values`` of the same run, for runs 0, 1, 2, ... stored contiguously.

    One global ``cumsum`` whose running total is brought back to ~0 at each run start (by subtracting
    the previous run's total), so float32 keeps full precision however many pairs precede a run.
    No autograd; no host sync.
    """
    position = torch.arange(values.shape[0], device=values.device)
    starts_run = torch.ones_like(run_of_pair, dtype=torch.bool)
    starts_run[1:] = run_of_pair[1:] != run_of_pair[:-1]
    run_totals = torch.zeros_like(values).index_add_(0, run_of_pair, values)  # (M,) >= one slot per run
    previous_total = run_totals[(run_of_pair - 1).clamp(min=0)]
    restart = torch.where(starts_run & (run_of_pair > 0), -previous_total, torch.zeros_like(values))
    before = torch.cumsum(values + restart, 0) - values  # running total before each pair, ~0 at a run start
    run_start = torch.cummax(torch.where(starts_run, position, 0), dim=0).values  # first pair of the run
    return before - before[run_start]


class ExclusiveCumsumPerRun(torch.autograd.Function):
    """``out_j = sum of values_i over the earlier pairs i of j's run`` (runs contiguous), ``(M,) -> (M,)``.

    The backward is the same scan in reverse order, again per run: autograd through one global
    ``cumsum`` would accumulate gradients across all runs and lose float32 precision.
    """

    @staticmethod
    def forward(ctx, values: Tensor, run_of_pair: Tensor) -> Tensor:
        ctx.save_for_backward(run_of_pair)
        return _exclusive_cumsum_per_run(values, run_of_pair)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:
        (run_of_pair,) = ctx.saved_tensors
        reversed_runs = run_of_pair.flip(0)
        return _exclusive_cumsum_per_run(grad_out.flip(0), reversed_runs[:1] - reversed_runs).flip(0), None


def _csr(row_offsets: Tensor, columns: Tensor, entries: Tensor, size: tuple[int, int]) -> Tensor:
    """A sparse CSR matrix; torch's beta-state notice for CSR is silenced here only, for this call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(row_offsets, columns, entries, size=size, check_invariants=False)


class SparseWeightedSum(torch.autograd.Function):
    """``W @ values`` for a sparse matrix ``W`` (R x N) in CSR form whose entries ``weights`` need gradients.

    Forward: ``out[r] = sum_j W[r, j] values[j]``. Backward: ``dW = (grad @ values^T)`` sampled at the
    non-zeros (``torch.sparse.sampled_addmm``) and ``dvalues = W^T @ grad``. Autograd through a sparse
    tensor would instead materialise a dense R x N gradient. Equals ``index_add`` of ``w_j values[col_j]``.
    """

    @staticmethod
    def forward(ctx, weights: Tensor, values: Tensor, row_offsets: Tensor, columns: Tensor) -> Tensor:
        ctx.save_for_backward(weights, values, row_offsets, columns)
        return _csr(row_offsets, columns, weights, (row_offsets.shape[0] - 1, values.shape[0])) @ values

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        weights, values, row_offsets, columns = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        num_rows, num_columns = row_offsets.shape[0] - 1, values.shape[0]
        grad_weights = grad_values = None
        if ctx.needs_input_grad[0]:
            pattern = _csr(row_offsets, columns, torch.zeros_like(weights), (num_rows, num_columns))
            grad_weights = torch.sparse.sampled_addmm(pattern, grad_out, values.T.contiguous()).values()
        if ctx.needs_input_grad[1]:  # W^T in CSR form: entries regrouped by column
            rows = torch.repeat_interleave(torch.arange(num_rows, device=columns.device), row_offsets.diff())
            by_column = torch.argsort(columns, stable=True)
            column_counts = torch.bincount(columns, minlength=num_columns)
            column_offsets = torch.cat([column_counts.new_zeros(1), torch.cumsum(column_counts, 0)])
            transposed = _csr(column_offsets, rows[by_column], weights[by_column], (num_columns, num_rows))
            grad_values = transposed @ grad_out
        return grad_weights, grad_values, None, None


def composite_pairs_fast(
    pixel_ids: Tensor,
    pair_gaussian_ids: Tensor,
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    depths: Tensor,
    colors: Tensor,
    width: int,
    height: int,
    alpha_max: float = 0.99,
) -> tuple[Tensor, Tensor, Tensor]:
    """``composite_pairs`` with a per-run scan (custom backward) and a sparse weighted sum; same outputs."""
    pixel_x = (pixel_ids % width).to(means2d.dtype) + 0.5
    pixel_y = torch.div(pixel_ids, width, rounding_mode="floor").to(means2d.dtype) + 0.5
    pair_means2d = means2d.index_select(0, pair_gaussian_ids)  # index_select: fast backward
    pair_conics = conics.index_select(0, pair_gaussian_ids)
    sigma = pair_sigma(pair_means2d, pair_conics, pixel_x, pixel_y)
    alpha = torch.clamp(opacities.index_select(0, pair_gaussian_ids) * torch.exp(-sigma), max=alpha_max)
    starts_run = torch.ones_like(pixel_ids, dtype=torch.bool)
    starts_run[1:] = pixel_ids[1:] != pixel_ids[:-1]
    run_of_pair = torch.cumsum(starts_run, 0) - 1  # (M,) 0, 0, 1, 1, 1, 2, ...: the pixel run of each pair
    transmittance = torch.exp(ExclusiveCumsumPerRun.apply(torch.log1p(-alpha), run_of_pair))  # T_i
    reached = (transmittance * (1 - alpha)).detach() > TRANSMITTANCE_STOP
    weights = torch.where(reached, alpha * transmittance, torch.zeros_like(alpha))

    # Colours, depth and alpha in one product of the sparse (runs x Gaussians) weight matrix.
    values = torch.cat([colors, depths[:, None].to(colors), torch.ones_like(colors[:, :1])], dim=-1)
    first_pairs = starts_run.nonzero().squeeze(-1)  # host sync: number of runs
    run_starts = torch.cat([first_pairs, pixel_ids.new_full((1,), pixel_ids.shape[0])])
    per_run = SparseWeightedSum.apply(weights.to(colors), values, run_starts, pair_gaussian_ids)  # (R, D + 2)
    blended = values.new_zeros(width * height, values.shape[-1]).index_copy(0, pixel_ids[first_pairs], per_run)
    return blended[:, :-2], blended[:, -1], blended[:, -2]
