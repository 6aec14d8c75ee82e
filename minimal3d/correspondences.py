"""RGB-D correspondences for Pri3D: pixel-pixel matches (View prior), voxel-pixel matches (Geo prior),
frame overlap for pair selection and voxelisation of a frame's geometry chunk.

Paper: Ji Hou, Saining Xie, Benjamin Graham, Angela Dai, Matthias Nießner, "Pri3D: Can 3D Priors Help 2D
Representation Learning?", ICCV 2021, arXiv:2104.11225. Official code: Sekunde/Pri3D
(pretrain/pri3d/model/model.py ``Pri3D.warp`` / ``Pri3D.voxel_pixel``, data_preprocess/scannet/chunk.py,
dataset/voxelizer.py; the overlap rule of PointContrast's compute_full_overlapping.py).

Cameras follow minimal3d/cameras.py: OpenCV axes (x right, y down, z forward), ``viewmat`` = world-to-camera
4x4, ``K`` 3x3 in pixels, depth = camera z in metres with 0 (or less) marking a hole. Pixels are returned
as int64 (row, col). Two pixel conventions:

- ``convention="minimal3d"`` (default): pixel (row, col) covers [col, col+1) x [row, row+1) and its centre
  is (col + 0.5, row + 0.5), so a projected point belongs to pixel floor(u), floor(v) (nearest centre);
  voxel index i covers [i, i+1) * voxel_size (floor) and is represented by its centre.
- ``convention="pri3d"`` reproduces the official integer matches bit for bit: the centre of pixel
  (row, col) is (col, row) (its ``bbox = -0.5`` cancels the ``+ .5``, the ScanNet K has cx = 159.5 at
  width 320), projections are truncated toward zero (``.long()``; so -1 < u < 0 lands in column 0 and a
  point is assigned half a pixel off its nearest centre), voxels are ``trunc(xyz / voxel_size)`` and
  represented by their corner ``voxel_size * index``.

Both conventions reject depth <= 0 in either frame and points at or behind a camera (the official code
tests ``depth != -1``, a MegaDepth leftover; with ScanNet's 0 holes the results are identical).
Computations run in the promoted floating dtype of the inputs; pass float64 for exact parity (float32 can
move a projection that lands within ~1e-5 px of a pixel border to the neighbouring pixel).
"""

import torch
from torch import Tensor

from minimal3d.cameras import transform_points

CONVENTIONS = ("minimal3d", "pri3d")


# --- input checks -------------------------------------------------------------------------------------

def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def _check_depth(depth: Tensor, name: str) -> None:
    if not isinstance(depth, Tensor) or depth.ndim != 2 or not depth.is_floating_point():
        shape = tuple(depth.shape) if isinstance(depth, Tensor) else type(depth).__name__
        raise ValueError(f"{name} must be a floating (H, W) depth map in metres, got {shape}")


def _check_intrinsics(K: Tensor, name: str = "K") -> None:
    if not isinstance(K, Tensor) or K.shape != (3, 3):
        raise ValueError(f"{name} must be a (3, 3) intrinsics matrix")
    if not bool(torch.isfinite(K).all()) or not bool((K[0, 0] * K[1, 1]) != 0):
        raise ValueError(f"{name} must be finite with non-zero focal lengths fx, fy")


def _check_viewmat(viewmat: Tensor, name: str) -> None:
    if not isinstance(viewmat, Tensor) or viewmat.shape != (4, 4):
        raise ValueError(f"{name} must be a (4, 4) world-to-camera matrix")
    if not bool(torch.isfinite(viewmat).all()):
        raise ValueError(f"{name} is not finite (ScanNet marks frames with lost tracking by -inf poses)")
    if not bool(torch.linalg.det(viewmat[:3, :3].float()).abs() > 1e-6):
        raise ValueError(f"{name} is singular: its 3x3 rotation part has determinant ~0")


def _working_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _pixel_index(coordinate: Tensor, size: int, convention: str) -> Tensor:
    """Continuous image coordinate (N,) -> int64 pixel index (may be out of [0, size))."""
    coordinate = torch.nan_to_num(coordinate, nan=-2.0).clamp(-2.0, size + 1.0)  # safe to cast
    return (coordinate.floor() if convention == "minimal3d" else coordinate.trunc()).long()


def _project(points: Tensor, K: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Camera points (N, 3) -> continuous u, v (N,) and depth z (N,); z <= 0 gives u = v = NaN."""
    uvw = points @ K.T  # (N, 3) = (K X)^T
    z = uvw[:, 2]
    in_front = z > 0
    safe_z = torch.where(in_front, z, torch.ones_like(z))
    nan = torch.full_like(z, float("nan"))
    return (torch.where(in_front, uvw[:, 0] / safe_z, nan), torch.where(in_front, uvw[:, 1] / safe_z, nan),
            points[:, 2])


# --- back-projection ----------------------------------------------------------------------------------

def backproject_depth(depth: Tensor, K: Tensor, convention: str = "minimal3d") -> Tensor:
    """Camera-space points of every pixel. depth: (H, W) -> (H*W, 3), raster order (index = row*W + col).

    X = (u - cx) z / fx, Y = (v - cy) z / fy, Z = z with (u, v) the pixel centre of the convention.
    """
    height, width = depth.shape
    offset = 0.5 if convention == "minimal3d" else 0.0
    pixel = torch.arange(height * width, device=depth.device)
    u = (pixel % width).to(depth.dtype) + offset
    v = torch.div(pixel, width, rounding_mode="floor").to(depth.dtype) + offset
    z = depth.reshape(-1)
    x = (u - K[0, 2]) * (z / K[0, 0])
    y = (v - K[1, 2]) * (z / K[1, 1])
    return torch.stack([x, y, z], dim=-1)


def depth_to_world(depth: Tensor, K: Tensor, viewmat: Tensor, convention: str = "minimal3d") -> Tensor:
    """World points of the valid (depth > 0) pixels. depth: (H, W), K: (3, 3), viewmat: (4, 4) -> (N, 3)."""
    _check_convention(convention)
    _check_depth(depth, "depth")
    _check_intrinsics(K)
    _check_viewmat(viewmat, "viewmat")
    dtype = _working_dtype(depth, K, viewmat)
    device = depth.device  # K and viewmat follow the depth map
    depth, K, viewmat = depth.to(dtype), K.to(device, dtype), viewmat.to(device, dtype)
    points = backproject_depth(depth, K, convention)[depth.reshape(-1) > 0]
    return transform_points(points, torch.linalg.inv(viewmat))  # camera -> world


# --- View prior: pixel-pixel matches --------------------------------------------------------------------

def pixel_correspondences(
    depth1: Tensor,
    depth2: Tensor,
    K: Tensor,
    viewmat1: Tensor,
    viewmat2: Tensor,
    max_distance: float = 0.05,
    convention: str = "minimal3d",
    K2: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pixels of two RGB-D frames that see the same 3D point (official ``Pri3D.warp``).

    depth1: (H1, W1), depth2: (H2, W2) metres (<= 0 = hole); K: (3, 3) intrinsics of frame 1 (and of frame 2
    unless K2 is given; frames of different size need K2); viewmat1/2: (4, 4) world-to-camera.
    Every frame-1 pixel with depth is back-projected, moved into camera 2 and projected; it matches the
    frame-2 pixel it falls into when |z_2 - depth2| < max_distance (official code 0.05 m, paper 0.02 m).
    Returns pos1, pos2: int64 (M, 2) as (row, col), in frame-1 raster order; M = 0 when nothing matches.
    """
    _check_convention(convention)
    _check_depth(depth1, "depth1")
    _check_depth(depth2, "depth2")
    if K2 is None:
        if depth1.shape != depth2.shape:
            raise ValueError(f"depth1 {tuple(depth1.shape)} and depth2 {tuple(depth2.shape)} differ in size: "
                             "pass K2, the intrinsics of frame 2")
        K2 = K
    _check_intrinsics(K, "K")
    _check_intrinsics(K2, "K2")
    _check_viewmat(viewmat1, "viewmat1")
    _check_viewmat(viewmat2, "viewmat2")
    if not (max_distance > 0 and max_distance < float("inf")):
        raise ValueError(f"max_distance must be finite and > 0 metres, got {max_distance}")
    dtype = _working_dtype(depth1, depth2, K, K2, viewmat1, viewmat2)
    device = depth1.device  # everything follows frame 1's depth map
    depth1, depth2, K, K2 = depth1.to(dtype), depth2.to(device, dtype), K.to(device, dtype), K2.to(device, dtype)
    height1, width1 = depth1.shape
    height2, width2 = depth2.shape

    points1 = backproject_depth(depth1, K, convention)  # (H1*W1, 3) in camera 1
    camera1_to_camera2 = viewmat2.to(device, dtype) @ torch.linalg.inv(viewmat1.to(device, dtype))
    points2 = transform_points(points1, camera1_to_camera2)  # (H1*W1, 3) in camera 2
    u2, v2, z2 = _project(points2, K2)
    col2, row2 = _pixel_index(u2, width2, convention), _pixel_index(v2, height2, convention)
    inside = (row2 >= 0) & (row2 < height2) & (col2 >= 0) & (col2 < width2)
    observed = depth2[row2.clamp(0, height2 - 1), col2.clamp(0, width2 - 1)]  # depth2 at the projection
    keep = (points1[:, 2] > 0) & (z2 > 0) & inside & (observed > 0) & ((z2 - observed).abs() < max_distance)

    index1 = torch.nonzero(keep)[:, 0]  # ascending = frame-1 raster order
    pos1 = torch.stack([torch.div(index1, width1, rounding_mode="floor"), index1 % width1], dim=1)
    pos2 = torch.stack([row2[index1], col2[index1]], dim=1)
    return pos1, pos2


def sample_matches(num_matches: int, num_samples: int = 1024, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> Tensor:
    """Indices (num_samples,) into num_matches matches: without replacement, with replacement only when
    fewer than num_samples exist (official rule; duplicates then act as false negatives in the loss)."""
    if num_matches < 1 or num_samples < 1:
        raise ValueError(f"num_matches and num_samples must be >= 1, got {num_matches}, {num_samples}")
    if num_matches >= num_samples:
        return torch.randperm(num_matches, generator=generator, device=device)[:num_samples]
    return torch.randint(num_matches, (num_samples,), generator=generator, device=device)


# --- Geo prior: voxel-pixel matches ---------------------------------------------------------------------

def voxel_pixel_correspondences(
    voxels: Tensor,
    depth: Tensor,
    K: Tensor,
    viewmat: Tensor,
    voxel_size: float = 0.02,
    max_depth_diff: float = 0.2,
    convention: str = "minimal3d",
) -> tuple[Tensor, Tensor]:
    """Voxels of a frame's geometry chunk that the frame sees (official ``Pri3D.voxel_pixel``).

    voxels: (V, 3) integer voxel indices (world point = voxel_size * index, + 0.5 in minimal3d), depth:
    (H, W), K: (3, 3), viewmat: (4, 4) world-to-camera. A voxel is kept when it projects inside the image and
    its camera depth is within max_depth_diff of the observed depth there.
    Returns pixels: int64 (M, 2) as (row, col) (the official code returns (col, row)), voxel_index: int64
    (M,) rows of ``voxels``, ascending.
    """
    _check_convention(convention)
    if not isinstance(voxels, Tensor) or voxels.ndim != 2 or voxels.shape[1] != 3 or voxels.is_floating_point():
        raise ValueError("voxels must be a (V, 3) tensor of integer voxel indices")
    _check_depth(depth, "depth")
    _check_intrinsics(K)
    _check_viewmat(viewmat, "viewmat")
    if not (0 < voxel_size < float("inf") and 0 < max_depth_diff < float("inf")):
        raise ValueError(f"voxel_size and max_depth_diff must be finite and > 0, got {voxel_size}, {max_depth_diff}")
    dtype = _working_dtype(depth, K, viewmat)
    device = depth.device
    depth, K, viewmat = depth.to(dtype), K.to(device, dtype), viewmat.to(device, dtype)
    height, width = depth.shape

    offset = 0.5 if convention == "minimal3d" else 0.0  # voxel centre vs corner
    world = (voxels.to(device, dtype) + offset) * voxel_size  # (V, 3)
    u, v, z = _project(transform_points(world, viewmat), K)
    inside = (u >= 0) & (u < width) & (v >= 0) & (v < height)  # NaN (behind the camera) compares False
    col, row = _pixel_index(u, width, convention), _pixel_index(v, height, convention)
    observed = depth[row.clamp(0, height - 1), col.clamp(0, width - 1)]
    keep = inside & (observed > 0) & ((z - observed).abs() < max_depth_diff)
    voxel_index = torch.nonzero(keep)[:, 0]
    return torch.stack([row[voxel_index], col[voxel_index]], dim=1), voxel_index


# --- voxelisation of a frame's chunk --------------------------------------------------------------------

def voxelize_points(points: Tensor, voxel_size: float = 0.02, features: Tensor | None = None,
                    convention: str = "minimal3d") -> tuple[Tensor, Tensor | None, Tensor]:
    """Unique voxels of a point cloud. points: (N, 3), features: (N, C) or None.

    Voxel index = floor(xyz / voxel_size) (minimal3d) or trunc(xyz / voxel_size) (pri3d, dataset/voxelizer.py:
    the cell around 0 is then twice as wide). Returns voxels: int64 (V, 3) sorted lexicographically,
    voxel_features: (V, C) mean of the points' features (None without features), inverse: (N,) voxel of each
    point.
    """
    _check_convention(convention)
    if not isinstance(points, Tensor) or points.ndim != 2 or points.shape[1] != 3:
        raise ValueError("points must have shape (N, 3)")
    if features is not None and (features.ndim != 2 or features.shape[0] != points.shape[0]):
        raise ValueError(f"features must have shape (N, C) with N = {points.shape[0]}")
    if not 0 < voxel_size < float("inf"):
        raise ValueError(f"voxel_size must be finite and > 0, got {voxel_size}")
    scaled = points * (1.0 / voxel_size)  # official: xyz * 50 for 2 cm
    cells = (scaled.floor() if convention == "minimal3d" else scaled.trunc()).long()
    voxels, inverse = torch.unique(cells, dim=0, return_inverse=True)
    if features is None:
        return voxels, None, inverse
    counts = torch.zeros(len(voxels), dtype=features.dtype, device=features.device)
    counts.index_add_(0, inverse, torch.ones_like(inverse, dtype=features.dtype))
    sums = torch.zeros(len(voxels), features.shape[1], dtype=features.dtype, device=features.device)
    return voxels, sums.index_add_(0, inverse, features) / counts[:, None], inverse


def frame_chunk_voxels(scene_points: Tensor, depth: Tensor, K: Tensor, viewmat: Tensor,
                       voxel_size: float = 0.02, scene_features: Tensor | None = None,
                       convention: str = "minimal3d") -> tuple[Tensor, Tensor | None]:
    """The geometry chunk of one frame, voxelised (data_preprocess/scannet/chunk.py).

    scene_points: (N, 3) world points of the reconstruction (ScanNet mesh vertices), scene_features: (N, C)
    (e.g. RGB / 255) or None. The chunk is the scene cropped to the axis-aligned box of the frame's
    back-projected depth, floored/ceiled to whole metres. Returns voxels (V, 3) int64, features (V, C) or None.
    """
    frame_points = depth_to_world(depth, K, viewmat, convention)
    if len(frame_points) == 0:
        empty = scene_points.new_zeros(0, 3, dtype=torch.long)
        return empty, None if scene_features is None else scene_features[:0]
    low = frame_points.min(dim=0).values.floor().to(scene_points.dtype)
    high = frame_points.max(dim=0).values.ceil().to(scene_points.dtype)
    crop = ((scene_points >= low) & (scene_points <= high)).all(dim=1)
    voxels, features, _ = voxelize_points(scene_points[crop], voxel_size,
                                          None if scene_features is None else scene_features[crop], convention)
    return voxels, features


# --- pair selection -----------------------------------------------------------------------------------

_HASH_OFFSET, _HASH_SPAN = 1 << 19, 1 << 20  # cells with |index| < 2^19 hash without collision


def _cell_keys(cells: Tensor) -> Tensor:
    cells = cells + _HASH_OFFSET
    return (cells[:, 0] * _HASH_SPAN + cells[:, 1]) * _HASH_SPAN + cells[:, 2]


def _has_neighbour(query: Tensor, reference: Tensor, radius: float) -> Tensor:
    """(Nq,) bool: query point has a reference point within radius (grid hashing with cell = radius, so
    candidates lie in the 27 cells around the query's cell; all cells are looked up in one batch)."""
    keys, order = torch.sort(_cell_keys(torch.floor(reference / radius).long()))
    shifts = torch.tensor([-1, 0, 1], device=query.device)
    offsets = torch.cartesian_prod(shifts, shifts, shifts)  # (27, 3)
    query_cells = (torch.floor(query / radius).long()[:, None] + offsets).reshape(-1, 3)  # (Nq*27, 3)
    cell_keys = _cell_keys(query_cells)
    start = torch.searchsorted(keys, cell_keys)
    count = torch.searchsorted(keys, cell_keys, right=True) - start
    query_index = torch.repeat_interleave(torch.arange(len(query), device=query.device).repeat_interleave(27), count)
    first = torch.repeat_interleave(start - (torch.cumsum(count, 0) - count), count)  # candidate run starts
    reference_index = order[first + torch.arange(len(query_index), device=query.device)]
    close = ((query[query_index] - reference[reference_index]) ** 2).sum(dim=1) <= radius ** 2
    found = torch.zeros(len(query), dtype=torch.bool, device=query.device)
    found[query_index[close]] = True
    return found


def _voxel_downsample(points: Tensor, voxel_size: float) -> Tensor:
    """Centroid of the points in each voxel (open3d ``voxel_down_sample``). (N, 3) -> (V, 3)."""
    _, centroids, _ = voxelize_points(points, voxel_size, features=points)
    return centroids


def overlap_points(depth: Tensor, K: Tensor, viewmat: Tensor, voxel_size: float = 0.05,
                   convention: str = "minimal3d") -> Tensor:
    """World points of one frame for ``point_overlap``: valid depth back-projected and voxel-downsampled
    (centroid per voxel_size voxel). depth: (H, W) -> (V, 3). Compute once per frame for a pair list."""
    return _voxel_downsample(depth_to_world(depth, K, viewmat, convention), voxel_size)


def point_overlap(points1: Tensor, points2: Tensor, radius: float) -> Tensor:
    """max over both directions of the fraction of points with a point of the other set within radius.
    points1: (N1, 3), points2: (N2, 3) -> 0-d tensor in [0, 1] (0 when a set is empty)."""
    if len(points1) == 0 or len(points2) == 0:
        return points1.new_zeros(())
    return torch.maximum(_has_neighbour(points1, points2, radius).to(points1.dtype).mean(),
                         _has_neighbour(points2, points1, radius).to(points1.dtype).mean())


def pixel_overlap(depth1: Tensor, depth2: Tensor, K: Tensor, viewmat1: Tensor, viewmat2: Tensor,
                  max_distance: float = 0.02, convention: str = "minimal3d") -> Tensor:
    """Overlap of two RGB-D frames as the paper defines it (Sec. 4.1: pairs with >= 30 % overlap): the
    pixels of either frame that have a correspondence in the other, divided by the valid pixels of both.

    depth1, depth2: (H, W) metres (<= 0 = hole), K: (3, 3), viewmat1/2: (4, 4) world-to-camera.
    overlap = (M_12 + M_21) / (N_1 + N_2), M_ab = matches of ``pixel_correspondences`` from frame a to b,
    N_a = valid depth pixels of frame a. Returns a 0-d tensor in [0, 1]; 0 when no pixel has depth.
    (``frame_overlap`` is the official code's point-cloud rule.)
    """
    matches12 = len(pixel_correspondences(depth1, depth2, K, viewmat1, viewmat2, max_distance, convention)[0])
    matches21 = len(pixel_correspondences(depth2, depth1, K, viewmat2, viewmat1, max_distance, convention)[0])
    valid = (depth1 > 0).sum() + (depth2 > 0).sum()
    dtype = depth1.dtype if depth1.is_floating_point() else torch.float32
    return (torch.as_tensor(matches12 + matches21, dtype=dtype) / valid.clamp_min(1).to(dtype)).to(depth1.device)


def frame_overlap(depth1: Tensor, depth2: Tensor, K: Tensor, viewmat1: Tensor, viewmat2: Tensor,
                  voxel_size: float = 0.05, radius_factor: float = 1.5, convention: str = "minimal3d",
                  K2: Tensor | None = None) -> Tensor:
    """Overlap of two RGB-D frames in [0, 1] (PointContrast compute_full_overlapping.py; Pri3D keeps pairs
    with overlap >= 0.3). Both depth maps are back-projected to world points and voxel-downsampled (5 cm);
    overlap = max over the two directions of the fraction of points with a point of the other frame within
    radius_factor * voxel_size (7.5 cm). Returns a 0-d tensor; 0 when a frame has no valid depth.
    """
    points1 = overlap_points(depth1, K, viewmat1, voxel_size, convention)
    points2 = overlap_points(depth2, K if K2 is None else K2, viewmat2, voxel_size, convention)
    return point_overlap(points1, points2, radius_factor * voxel_size)
