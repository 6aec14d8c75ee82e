"""One camera convention for the whole library.

OpenCV pinhole camera: x right, y down, z forward. A pose is a world-to-camera 4x4 matrix ``viewmat``
(camera-to-world is its inverse). Intrinsics ``K`` are 3x3 in pixels. Pixel (u, v) (u = column,
v = row) covers [u, u + 1) x [v, v + 1), so its centre is at (u + 0.5, v + 0.5) in the continuous image
coordinates that ``project`` returns; a K centred on a W x H image has cx = W / 2, cy = H / 2.
Depth is the camera z coordinate, not the distance along the ray.

Datasets and references that use another convention (OpenGL camera-to-world in nerfstudio
``transforms.json``, PASCAL3D+ object poses, integer pixel centres in Pri3D) are converted at the boundary,
in the module that reads them, with a comment saying so.

Every function is batched over leading dimensions and differentiable.
"""

import math

import torch
from torch import Tensor


def _check_last_dims(name: str, tensor: Tensor, dims: tuple[int, ...]) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim < len(dims) or tuple(tensor.shape[-len(dims):]) != dims:
        expected = "(..., " + ", ".join(map(str, dims)) + ")"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")


def _as_tensors(*values) -> list[Tensor]:
    """Floats and tensors as tensors of one floating dtype and device (promoted from the tensors given)."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    dtype = torch.get_default_dtype()
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    device = tensors[0].device if tensors else None
    return [torch.as_tensor(v, dtype=dtype, device=device) for v in values]


def _normalize(vectors: Tensor) -> Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------------
# Intrinsics
# ---------------------------------------------------------------------------------------------------


def intrinsics(fx, fy, cx, cy) -> Tensor:
    """K (..., 3, 3) from focal lengths and principal point (floats or broadcastable tensors), in pixels."""
    fx, fy, cx, cy = torch.broadcast_tensors(*_as_tensors(fx, fy, cx, cy))
    zeros, ones = torch.zeros_like(fx), torch.ones_like(fx)
    rows = [torch.stack([fx, zeros, cx], -1), torch.stack([zeros, fy, cy], -1), torch.stack([zeros, zeros, ones], -1)]
    return torch.stack(rows, -2)


def fov_intrinsics(fov_x: float, width: int, height: int) -> Tensor:
    """K (3, 3) with a horizontal field of view ``fov_x`` (radians), square pixels, centred principal point."""
    if not 0.0 < fov_x < math.pi:
        raise ValueError(f"fov_x must be in (0, pi) radians, got {fov_x}")
    focal = 0.5 * width / math.tan(0.5 * fov_x)
    return intrinsics(focal, focal, width / 2.0, height / 2.0)


# ---------------------------------------------------------------------------------------------------
# Poses
# ---------------------------------------------------------------------------------------------------


def make_viewmat(rotation: Tensor, translation: Tensor) -> Tensor:
    """viewmat (..., 4, 4) = [[R, t], [0, 1]] from rotation (..., 3, 3) and translation (..., 3)."""
    top = torch.cat([rotation, translation.unsqueeze(-1)], dim=-1)  # (..., 3, 4)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def look_at(eye: Tensor, target: Tensor, up: Tensor) -> Tensor:
    """World-to-camera viewmat (..., 4, 4) of a camera at ``eye`` (..., 3) looking at ``target`` (..., 3).

    ``up`` (..., 3) is the world direction that appears upwards in the image (so the camera's +y, which
    points down in the image, is roughly -up). Rows of R are the camera axes in world coordinates:
    z = forward, x = forward x up (right), y = z x x (down).
    """
    for name, value in (("eye", eye), ("target", target), ("up", up)):
        _check_last_dims(name, value, (3,))
    eye, target, up = torch.broadcast_tensors(eye, target, up)
    forward = _normalize(target - eye)
    right = torch.linalg.cross(forward, up, dim=-1)
    if bool((right.norm(dim=-1) < 1e-8).any()):
        raise ValueError("up must not be parallel to the viewing direction target - eye")
    right = _normalize(right)
    down = torch.linalg.cross(forward, right, dim=-1)
    rotation = torch.stack([right, down, forward], dim=-2)  # (..., 3, 3), rows are camera axes
    translation = -(rotation @ eye.unsqueeze(-1)).squeeze(-1)
    return make_viewmat(rotation, translation)


def _rot_z(angle: Tensor) -> Tensor:
    c, s, z, o = angle.cos(), angle.sin(), torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([torch.stack([c, -s, z], -1), torch.stack([s, c, z], -1), torch.stack([z, z, o], -1)], -2)


def _rot_x(angle: Tensor) -> Tensor:
    c, s, z, o = angle.cos(), angle.sin(), torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([torch.stack([o, z, z], -1), torch.stack([z, c, -s], -1), torch.stack([z, s, c], -1)], -2)


def pose_from_angles(azimuth, elevation, theta, distance) -> Tensor:
    """World-to-camera viewmat (..., 4, 4) of the PASCAL3D+/ImageNet3D object-pose annotation.

    The object frame is z-up. The camera centre is C = d (cos e sin a, -cos e cos a, sin e) and the
    annotation's rotation is R = Rz(theta) Rx(e - pi/2) Rz(-a), a camera that looks down -z with y up.
    We convert it to OpenCV by flipping y and z: R_cv = diag(1, -1, -1) R, t = -R_cv C. With
    K = [[f, 0, px], [0, f, py], [0, 0, 1]] this reproduces the PASCAL projection: col = px + f x'/(-z),
    row = py - f y'/(-z), where (x', y') are the in-plane-rotated camera coordinates.
    Inputs are broadcastable floats or tensors (radians; distance in object units).
    """
    azimuth, elevation, theta, distance = torch.broadcast_tensors(*_as_tensors(azimuth, elevation, theta, distance))
    if not bool(torch.isfinite(distance).all()) or bool((distance <= 0).any()):
        raise ValueError("distance must be finite and > 0")
    centre = distance.unsqueeze(-1) * torch.stack(
        [elevation.cos() * azimuth.sin(), -elevation.cos() * azimuth.cos(), elevation.sin()], dim=-1)
    rotation_pascal = _rot_z(theta) @ _rot_x(elevation - math.pi / 2) @ _rot_z(-azimuth)
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=rotation_pascal.dtype, device=rotation_pascal.device))
    rotation = flip @ rotation_pascal
    translation = -(rotation @ centre.unsqueeze(-1)).squeeze(-1)
    return make_viewmat(rotation, translation)


def camera_center(viewmat: Tensor) -> Tensor:
    """Camera centre (..., 3) in world coordinates of a world-to-camera viewmat (..., 4, 4): -R^T t."""
    _check_last_dims("viewmat", viewmat, (4, 4))
    rotation, translation = viewmat[..., :3, :3], viewmat[..., :3, 3]
    return -(rotation.transpose(-1, -2) @ translation.unsqueeze(-1)).squeeze(-1)


def rotation_error(R_pred: Tensor, R_gt: Tensor) -> Tensor:
    """Geodesic angle (...) in radians between rotations (..., 3, 3): arccos((tr(R_pred^T R_gt) - 1) / 2).

    Equal to ||logm(R_pred^T R_gt)||_F / sqrt(2), the pose error of PASCAL3D+ / NOVUM.
    """
    _check_last_dims("R_pred", R_pred, (3, 3))
    _check_last_dims("R_gt", R_gt, (3, 3))
    relative = R_pred.transpose(-1, -2) @ R_gt  # (..., 3, 3)
    cosine = (relative.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0
    # sin(angle) = |axis vector of the skew part|; atan2 is exact near 0 and pi, unlike a clamped arccos.
    skew = relative - relative.transpose(-1, -2)
    sine = torch.stack([skew[..., 2, 1], skew[..., 0, 2], skew[..., 1, 0]], dim=-1).norm(dim=-1) / 2.0
    return torch.atan2(sine, cosine)


# ---------------------------------------------------------------------------------------------------
# Points, pixels and rays
# ---------------------------------------------------------------------------------------------------


def transform_points(points: Tensor, matrix: Tensor) -> Tensor:
    """Apply a rigid 4x4 transform: points (..., N, 3), matrix (..., 4, 4) -> (..., N, 3)."""
    _check_last_dims("points", points, (3,))
    _check_last_dims("matrix", matrix, (4, 4))
    return points @ matrix[..., :3, :3].transpose(-1, -2) + matrix[..., None, :3, 3]


def project(points: Tensor, viewmat: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
    """Project world points (..., N, 3) to continuous pixel coordinates uv (..., N, 2) and depth (..., N).

    uv = (fx x / z + cx, fy y / z + cy) in camera coordinates; pixel (u, v) is hit when
    floor(uv) = (u, v), since its centre is at (u + 0.5, v + 0.5). Depth is camera z; points with
    z <= 0 get a finite but meaningless uv (z is clamped away from 0) and must be masked by depth > 0.
    """
    _check_last_dims("K", K, (3, 3))
    camera_points = transform_points(points, viewmat)  # (..., N, 3)
    depth = camera_points[..., 2]
    safe_depth = torch.where(depth.abs() < 1e-10, torch.full_like(depth, 1e-10), depth)
    normalized = torch.cat([camera_points[..., :2] / safe_depth.unsqueeze(-1), torch.ones_like(depth).unsqueeze(-1)], -1)
    uv = (normalized @ K.transpose(-1, -2))[..., :2]  # K (x/z, y/z, 1)
    return uv, depth


def pixel_centers(width: int, height: int, device=None, dtype=None) -> Tensor:
    """Continuous coordinates (H * W, 2) of all pixel centres (u + 0.5, v + 0.5), raster order v * W + u."""
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    dtype = dtype or torch.get_default_dtype()
    u = torch.arange(width, device=device, dtype=dtype) + 0.5
    v = torch.arange(height, device=device, dtype=dtype) + 0.5
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return torch.stack([uu, vv], dim=-1).reshape(-1, 2)


def _camera_directions(uv: Tensor, K: Tensor) -> Tensor:
    """Camera-frame directions (..., P, 3) with z = 1 through continuous pixel coordinates uv (..., P, 2)."""
    fx, fy = K[..., 0, 0, None], K[..., 1, 1, None]
    cx, cy, skew = K[..., 0, 2, None], K[..., 1, 2, None], K[..., 0, 1, None]
    y = (uv[..., 1] - cy) / fy
    x = (uv[..., 0] - cx - skew * y) / fx
    return torch.stack([x, y, torch.ones_like(x)], dim=-1)


def pixel_rays(viewmat: Tensor, K: Tensor, width: int, height: int) -> tuple[Tensor, Tensor]:
    """World-space rays through every pixel centre.

    viewmat: (..., 4, 4) world-to-camera; K: (..., 3, 3).
    Returns origins (..., H * W, 3) (the camera centre, repeated) and unit directions (..., H * W, 3),
    in raster order (index v * W + u).
    """
    _check_last_dims("viewmat", viewmat, (4, 4))
    _check_last_dims("K", K, (3, 3))
    uv = pixel_centers(width, height, device=viewmat.device, dtype=viewmat.dtype)  # (P, 2)
    directions_cam = _camera_directions(uv, K)  # (..., P, 3)
    rotation = viewmat[..., :3, :3]
    directions = _normalize(directions_cam @ rotation)  # R^T d, as row vectors
    origins = camera_center(viewmat).unsqueeze(-2).expand_as(directions)
    return origins, directions


def unproject_depth(depth: Tensor, viewmat: Tensor, K: Tensor) -> Tensor:
    """World points (..., H, W, 3) of every pixel centre at its z-depth.

    depth: (..., H, W) camera z; viewmat: (..., 4, 4) world-to-camera; K: (..., 3, 3).
    Inverse of ``project`` at pixel centres: project(unproject_depth(d)) = (u + 0.5, v + 0.5), d.
    """
    if depth.ndim < 2:
        raise ValueError(f"depth must have shape (..., H, W), got {tuple(depth.shape)}")
    _check_last_dims("viewmat", viewmat, (4, 4))
    _check_last_dims("K", K, (3, 3))
    height, width = depth.shape[-2:]
    uv = pixel_centers(width, height, device=depth.device, dtype=depth.dtype)
    directions_cam = _camera_directions(uv, K)  # (..., P, 3), z = 1
    camera_points = directions_cam * depth.flatten(-2).unsqueeze(-1)  # (..., P, 3)
    rotation, translation = viewmat[..., :3, :3], viewmat[..., :3, 3]
    # x_world = R^T (x_cam - t)
    world = (camera_points - translation.unsqueeze(-2)) @ rotation
    return world.unflatten(-2, (height, width))


def opengl_to_opencv_c2w(c2w: Tensor) -> Tensor:
    """Convert camera-to-world (..., 4, 4) from OpenGL/nerfstudio axes (x right, y up, z back) to OpenCV.

    The camera's y and z axes flip: c2w_cv = c2w_gl @ diag(1, -1, -1, 1). Invert the result for a viewmat.
    """
    _check_last_dims("c2w", c2w, (4, 4))
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=c2w.dtype, device=c2w.device))
    return c2w @ flip
