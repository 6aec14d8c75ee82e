"""One camera convention for the whole library.

OpenCV pinhole camera: x right, y down, z forward. A pose is a world-to-camera 4x4 matrix ``viewmat``
(camera-to-world is its inverse). Intrinsics ``K`` are 3x3 in pixels. Pixel (u, v) (u = column,
v = row) covers [u, u + 1) x [v, v + 1), so its centre is at (u + 0.5, v + 0.5) in the continuous image
coordinates that ``project`` returns; a K centred on a W x H image has cx = W / 2, cy = H / 2.
Depth is the camera z coordinate, not the distance along the ray.

Datasets and references that use another convention (OpenGL camera-to-world in nerfstudio
``transforms.json``, PASCAL3D+ object poses, integer pixel centres in Pri3D) are converted at the boundary,
in the module that reads them, with a comment saying so.

Every function is batched over leading dimensions (which broadcast) and differentiable. Inputs are float32
or float64 tensors of one dtype. Each public function checks shapes, dtypes and sizes, and (one host sync
per call) that poses are rigid, focal lengths positive and parameters finite, raising ValueError/TypeError
that names the argument; ``check=False`` skips the value checks inside optimisation loops. NaN in data
(points, depth) flows through. The checks live in the last section of this file.
"""

import math
import operator

import torch
from torch import Tensor


def _normalize(vectors: Tensor) -> Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _rescale_extreme(vectors: Tensor) -> Tensor:
    """Vectors whose squares would overflow or underflow (largest entry > 1e15 or < 1e-15) divided by their
    largest entry; others returned unchanged, so the result is bit-identical for everyday magnitudes."""
    largest = vectors.abs().amax(dim=-1, keepdim=True)
    extreme = (largest > 1e15) | (largest < 1e-15)
    return vectors / torch.where(extreme, largest.clamp_min(torch.finfo(vectors.dtype).tiny), torch.ones_like(largest))


# ---------------------------------------------------------------------------------------------------
# Intrinsics
# ---------------------------------------------------------------------------------------------------


def intrinsics(fx, fy, cx, cy) -> Tensor:
    """K (..., 3, 3) from focal lengths and principal point (floats or broadcastable tensors), in pixels.

    fx, fy must be finite and > 0, cx, cy finite (ValueError otherwise); floating tensors must share a dtype.
    """
    fx, fy, cx, cy = _as_tensors(("fx", "fy", "cx", "cy"), fx, fy, cx, cy)
    _require([(((fx > 0) & torch.isfinite(fx)).all(), "fx must be a finite focal length > 0"),
              (((fy > 0) & torch.isfinite(fy)).all(), "fy must be a finite focal length > 0"),
              ((torch.isfinite(cx) & torch.isfinite(cy)).all(), "cx and cy must be finite")])
    zeros, ones = torch.zeros_like(fx), torch.ones_like(fx)
    rows = [torch.stack([fx, zeros, cx], -1), torch.stack([zeros, fy, cy], -1), torch.stack([zeros, zeros, ones], -1)]
    return torch.stack(rows, -2)


def fov_intrinsics(fov_x: float, width: int, height: int) -> Tensor:
    """K (3, 3) with a horizontal field of view ``fov_x`` (radians), square pixels, centred principal point."""
    width, height = _positive_int("width", width), _positive_int("height", height)
    try:
        fov_x = float(fov_x)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"fov_x must be a float in (0, pi) radians, got {type(fov_x).__name__}") from None
    if not 0.0 < fov_x < math.pi:
        raise ValueError(f"fov_x must be in (0, pi) radians, got {fov_x}")
    focal = 0.5 * width / math.tan(0.5 * fov_x)
    return intrinsics(focal, focal, width / 2.0, height / 2.0)


# ---------------------------------------------------------------------------------------------------
# Poses
# ---------------------------------------------------------------------------------------------------


def _viewmat(rotation: Tensor, translation: Tensor) -> Tensor:
    top = torch.cat([rotation, translation.unsqueeze(-1)], dim=-1)  # (..., 3, 4)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def make_viewmat(rotation: Tensor, translation: Tensor, check: bool = True) -> Tensor:
    """viewmat (..., 4, 4) = [[R, t], [0, 1]] from rotation (..., 3, 3) and translation (..., 3).

    Batch dimensions broadcast. ``check``: R must be a finite rotation and t finite (one host sync).
    """
    _check_tensor("rotation", rotation, (3, 3))
    _check_tensor("translation", translation, (3,))
    _check_same_dtype(rotation=rotation, translation=translation)
    batch = _broadcast_batch(rotation=rotation.shape[:-2], translation=translation.shape[:-1])
    if check:
        _require(_rigid_conditions("rotation", rotation) +
                 [(torch.isfinite(translation.detach()).all(), "translation must be finite")])
    return _viewmat(rotation.expand(*batch, 3, 3), translation.expand(*batch, 3))


def look_at(eye: Tensor, target: Tensor, up: Tensor) -> Tensor:
    """World-to-camera viewmat (..., 4, 4) of a camera at ``eye`` (..., 3) looking at ``target`` (..., 3).

    ``up`` (..., 3) is the world direction that appears upwards in the image (so the camera's +y, which
    points down in the image, is roughly -up). Rows of R are the camera axes in world coordinates:
    z = forward, x = forward x up (right), y = z x x (down). Finite inputs of any magnitude; ValueError when
    eye == target, up == 0, or up is parallel to target - eye (sine of the angle below 1e-6).
    """
    for name, value in (("eye", eye), ("target", target), ("up", up)):
        _check_tensor(name, value, (3,))
    _check_same_dtype(eye=eye, target=target, up=up)
    _broadcast_batch(eye=eye.shape[:-1], target=target.shape[:-1], up=up.shape[:-1])
    eye, target, up = torch.broadcast_tensors(eye, target, up)
    offset = target - eye
    forward = _normalize(_rescale_extreme(offset))  # any magnitude: 1e20 squared overflows float32
    scaled_up = _rescale_extreme(up)
    right = torch.linalg.cross(forward, scaled_up, dim=-1)
    sine = right.detach().norm(dim=-1) / scaled_up.detach().norm(dim=-1)  # angle between up and forward
    right = _normalize(right)
    down = torch.linalg.cross(forward, right, dim=-1)
    rotation = torch.stack([right, down, forward], dim=-2)  # (..., 3, 3), rows are camera axes
    translation = -(rotation @ eye.unsqueeze(-1)).squeeze(-1)
    finite = torch.stack([torch.isfinite(t.detach()).all() for t in (eye, target, up, offset)]).all()
    _require([(finite, "eye, target and up must be finite"),
              ((offset.detach() != 0).any(-1).all(), "target must differ from eye"),
              ((up.detach() != 0).any(-1).all(), "up must be a non-zero vector"),
              ((sine >= 1e-6).all(), "up must not be parallel to the viewing direction target - eye"),
              (torch.isfinite(translation.detach()).all(), f"eye is too far from the origin for {eye.dtype} "
                                                           "(the translation -R eye overflows)")])
    return _viewmat(rotation, translation)


def _rot_z(angle: Tensor) -> Tensor:
    c, s, z, o = angle.cos(), angle.sin(), torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([torch.stack([c, -s, z], -1), torch.stack([s, c, z], -1), torch.stack([z, z, o], -1)], -2)


def _rot_x(angle: Tensor) -> Tensor:
    c, s, z, o = angle.cos(), angle.sin(), torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([torch.stack([o, z, z], -1), torch.stack([z, c, -s], -1), torch.stack([z, s, c], -1)], -2)


def pose_from_angles(azimuth, elevation, theta, distance, check: bool = True) -> Tensor:
    """World-to-camera viewmat (..., 4, 4) of the PASCAL3D+/ImageNet3D object-pose annotation.

    The object frame is z-up. The camera centre is C = d (cos e sin a, -cos e cos a, sin e) and the
    annotation's rotation is R = Rz(theta) Rx(e - pi/2) Rz(-a), a camera that looks down -z with y up.
    We convert it to OpenCV by flipping y and z: R_cv = diag(1, -1, -1) R, t = -R_cv C. With
    K = [[f, 0, px], [0, f, py], [0, 0, 1]] this reproduces the PASCAL projection: col = px + f x'/(-z),
    row = py - f y'/(-z), where (x', y') are the in-plane-rotated camera coordinates.
    Inputs are broadcastable floats or tensors (radians; distance in object units). ``check``: angles
    finite, distance finite and > 0 (one host sync; pass False inside an optimisation loop).
    """
    names = ("azimuth", "elevation", "theta", "distance")
    azimuth, elevation, theta, distance = _as_tensors(names, azimuth, elevation, theta, distance)
    if check:
        angles = torch.stack([azimuth.detach(), elevation.detach(), theta.detach()])
        _require([(torch.isfinite(angles).all(), "azimuth, elevation and theta must be finite"),
                  (((distance > 0) & torch.isfinite(distance)).all(), "distance must be finite and > 0")])
    centre = distance.unsqueeze(-1) * torch.stack(
        [elevation.cos() * azimuth.sin(), -elevation.cos() * azimuth.cos(), elevation.sin()], dim=-1)
    rotation_pascal = _rot_z(theta) @ _rot_x(elevation - math.pi / 2) @ _rot_z(-azimuth)
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=rotation_pascal.dtype, device=rotation_pascal.device))
    rotation = flip @ rotation_pascal
    translation = -(rotation @ centre.unsqueeze(-1)).squeeze(-1)
    return _viewmat(rotation, translation)


def camera_center(viewmat: Tensor, check: bool = True) -> Tensor:
    """Camera centre (..., 3) in world coordinates of a world-to-camera viewmat (..., 4, 4): -R^T t.

    ``check``: viewmat must be finite and rigid (one host sync).
    """
    _check_tensor("viewmat", viewmat, (4, 4))
    if check:
        _require(_rigid_conditions("viewmat", viewmat))
    rotation, translation = viewmat[..., :3, :3], viewmat[..., :3, 3]
    return -(rotation.transpose(-1, -2) @ translation.unsqueeze(-1)).squeeze(-1)


def rotation_error(R_pred: Tensor, R_gt: Tensor, check: bool = True) -> Tensor:
    """Geodesic angle (...) in radians between rotations (..., 3, 3): arccos((tr(R_pred^T R_gt) - 1) / 2).

    Equal to ||logm(R_pred^T R_gt)||_F / sqrt(2), the pose error of PASCAL3D+ / NOVUM. Batch dimensions
    broadcast. ``check``: both must be finite proper rotations (one host sync).
    """
    _check_tensor("R_pred", R_pred, (3, 3))
    _check_tensor("R_gt", R_gt, (3, 3))
    _check_same_dtype(R_pred=R_pred, R_gt=R_gt)
    _broadcast_batch(R_pred=R_pred.shape[:-2], R_gt=R_gt.shape[:-2])
    if check:
        _require(_rigid_conditions("R_pred", R_pred) + _rigid_conditions("R_gt", R_gt))
    relative = R_pred.transpose(-1, -2) @ R_gt  # (..., 3, 3)
    cosine = (relative.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0
    # sin(angle) = |axis vector of the skew part|; atan2 is exact near 0 and pi, unlike a clamped arccos.
    skew = relative - relative.transpose(-1, -2)
    sine = torch.stack([skew[..., 2, 1], skew[..., 0, 2], skew[..., 1, 0]], dim=-1).norm(dim=-1) / 2.0
    return torch.atan2(sine, cosine)


# ---------------------------------------------------------------------------------------------------
# Points, pixels and rays
# ---------------------------------------------------------------------------------------------------


def _transform(points: Tensor, matrix: Tensor) -> Tensor:
    return points @ matrix[..., :3, :3].transpose(-1, -2) + matrix[..., None, :3, 3]


def transform_points(points: Tensor, matrix: Tensor, check: bool = True) -> Tensor:
    """Apply a rigid 4x4 transform: points (..., N, 3), matrix (..., 4, 4) -> (..., N, 3).

    Batch dimensions of points (before N) and matrix broadcast. NaN in points flows through. ``check``:
    matrix must be finite and rigid (one host sync).
    """
    _check_tensor("points", points, (3,), "(..., N, 3)")
    _check_tensor("matrix", matrix, (4, 4))
    if points.ndim < 2:
        raise ValueError(f"points must have shape (..., N, 3), got {tuple(points.shape)}")
    _check_same_dtype(points=points, matrix=matrix)
    _broadcast_batch(points=points.shape[:-2], matrix=matrix.shape[:-2])
    if check:
        _require(_rigid_conditions("matrix", matrix))
    return _transform(points, matrix)


def project(points: Tensor, viewmat: Tensor, K: Tensor, check: bool = True) -> tuple[Tensor, Tensor]:
    """Project world points (..., N, 3) to continuous pixel coordinates uv (..., N, 2) and depth (..., N).

    uv = (fx x / z + cx, fy y / z + cy) in camera coordinates; pixel (u, v) is hit when
    floor(uv) = (u, v), since its centre is at (u + 0.5, v + 0.5). Depth is camera z; points with
    z <= 0 get a finite but meaningless uv (z is clamped away from 0) and must be masked by depth > 0.
    viewmat (..., 4, 4), K (..., 3, 3); batch dimensions broadcast; NaN in points flows through.
    ``check``: viewmat finite and rigid, K finite pinhole intrinsics with fx, fy > 0 (one host sync; pass
    False inside an optimisation loop).
    """
    _check_tensor("points", points, (3,), "(..., N, 3)")
    _check_tensor("viewmat", viewmat, (4, 4))
    _check_tensor("K", K, (3, 3))
    if points.ndim < 2:
        raise ValueError(f"points must have shape (..., N, 3), got {tuple(points.shape)}")
    _check_same_dtype(points=points, viewmat=viewmat, K=K)
    _broadcast_batch(points=points.shape[:-2], viewmat=viewmat.shape[:-2], K=K.shape[:-2])
    if check:
        _require(_rigid_conditions("viewmat", viewmat) + _intrinsics_conditions("K", K))
    camera_points = _transform(points, viewmat)  # (..., N, 3)
    depth = camera_points[..., 2]
    safe_depth = torch.where(depth.abs() < 1e-10, torch.full_like(depth, 1e-10), depth)
    normalized = torch.cat([camera_points[..., :2] / safe_depth.unsqueeze(-1), torch.ones_like(depth).unsqueeze(-1)], -1)
    uv = (normalized @ K.transpose(-1, -2))[..., :2]  # K (x/z, y/z, 1)
    return uv, depth


def pixel_centers(width: int, height: int, device=None, dtype=None) -> Tensor:
    """Continuous coordinates (H * W, 2) of all pixel centres (u + 0.5, v + 0.5), raster order v * W + u."""
    width, height = _positive_int("width", width), _positive_int("height", height)
    dtype = dtype or torch.get_default_dtype()
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
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


def pixel_rays(viewmat: Tensor, K: Tensor, width: int, height: int, check: bool = True) -> tuple[Tensor, Tensor]:
    """World-space rays through every pixel centre.

    viewmat: (..., 4, 4) world-to-camera; K: (..., 3, 3) (batch dimensions broadcast); width, height:
    positive integers. Returns origins (..., H * W, 3) (the camera centre, repeated) and unit directions
    (..., H * W, 3), in raster order (index v * W + u). ``check``: viewmat finite and rigid, K finite
    pinhole intrinsics with fx, fy > 0 (one host sync).
    """
    _check_tensor("viewmat", viewmat, (4, 4))
    _check_tensor("K", K, (3, 3))
    _check_same_dtype(viewmat=viewmat, K=K)
    _broadcast_batch(viewmat=viewmat.shape[:-2], K=K.shape[:-2])
    uv = pixel_centers(width, height, device=viewmat.device, dtype=viewmat.dtype)  # (P, 2)
    if check:
        _require(_rigid_conditions("viewmat", viewmat) + _intrinsics_conditions("K", K))
    directions_cam = _camera_directions(uv, K)  # (..., P, 3)
    rotation = viewmat[..., :3, :3]
    directions = _normalize(directions_cam @ rotation)  # R^T d, as row vectors
    origins = camera_center(viewmat, check=False).unsqueeze(-2).expand_as(directions)
    return origins, directions


def unproject_depth(depth: Tensor, viewmat: Tensor, K: Tensor, check: bool = True) -> Tensor:
    """World points (..., H, W, 3) of every pixel centre at its z-depth.

    depth: (..., H, W) camera z (NaN flows through); viewmat: (..., 4, 4) world-to-camera; K: (..., 3, 3);
    batch dimensions broadcast. Inverse of ``project`` at pixel centres:
    project(unproject_depth(d)) = (u + 0.5, v + 0.5), d. ``check``: viewmat finite and rigid, K finite
    pinhole intrinsics with fx, fy > 0 (one host sync).
    """
    if not isinstance(depth, Tensor) or depth.ndim < 2:
        shape = tuple(depth.shape) if isinstance(depth, Tensor) else type(depth).__name__
        raise ValueError(f"depth must be a tensor of shape (..., H, W), got {shape}")
    if depth.dtype not in DTYPES:
        raise TypeError(f"depth must be float32 or float64, got {depth.dtype}")
    _check_tensor("viewmat", viewmat, (4, 4))
    _check_tensor("K", K, (3, 3))
    _check_same_dtype(depth=depth, viewmat=viewmat, K=K)
    _broadcast_batch(depth=depth.shape[:-2], viewmat=viewmat.shape[:-2], K=K.shape[:-2])
    if check:
        _require(_rigid_conditions("viewmat", viewmat) + _intrinsics_conditions("K", K))
    height, width = depth.shape[-2:]
    if height == 0 or width == 0:
        return depth.new_zeros(*torch.broadcast_shapes(depth.shape[:-2], viewmat.shape[:-2], K.shape[:-2]),
                               height, width, 3)
    uv = pixel_centers(width, height, device=depth.device, dtype=depth.dtype)
    directions_cam = _camera_directions(uv, K)  # (..., P, 3), z = 1
    camera_points = directions_cam * depth.flatten(-2).unsqueeze(-1)  # (..., P, 3)
    rotation, translation = viewmat[..., :3, :3], viewmat[..., :3, 3]
    # x_world = R^T (x_cam - t)
    world = (camera_points - translation.unsqueeze(-2)) @ rotation
    return world.unflatten(-2, (height, width))


def opengl_to_opencv_c2w(c2w: Tensor, check: bool = True) -> Tensor:
    """Convert camera-to-world (..., 4, 4) from OpenGL/nerfstudio axes (x right, y up, z back) to OpenCV.

    The camera's y and z axes flip: c2w_cv = c2w_gl @ diag(1, -1, -1, 1). Invert the result for a viewmat.
    ``check``: c2w must be finite and rigid (one host sync).
    """
    _check_tensor("c2w", c2w, (4, 4))
    if check:
        _require(_rigid_conditions("c2w", c2w))
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=c2w.dtype, device=c2w.device))
    return c2w @ flip


# ---------------------------------------------------------------------------------------------------
# Checks at the public boundary. Shapes and dtypes cost nothing; the value checks (positive focal, rigid
# poses, finite parameters) read one boolean per condition back to the host, all in ONE transfer per call.
# Functions that may run inside an optimisation loop take ``check=False`` to skip the value checks there.
# ---------------------------------------------------------------------------------------------------

DTYPES = (torch.float32, torch.float64)
RIGID_TOLERANCE = 1e-3  # max |R^T R - I|, |det R - 1| and |last row - (0, 0, 0, 1)| accepted as rigid


def _check_tensor(name: str, tensor: Tensor, trailing: tuple[int, ...], what: str | None = None) -> None:
    """A float32/float64 tensor of shape (..., *trailing) (``what`` names the shape in the message)."""
    what = what or "(..., " + ", ".join(map(str, trailing)) + ")"
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {what}, got {type(tensor).__name__}")
    if tensor.ndim < len(trailing) or tuple(tensor.shape[tensor.ndim - len(trailing):]) != trailing:
        raise ValueError(f"{name} must have shape {what}, got {tuple(tensor.shape)}")
    if tensor.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {tensor.dtype}")


def _check_same_dtype(**tensors: Tensor) -> None:
    dtypes = {name: tensor.dtype for name, tensor in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name} {str(dtype).removeprefix('torch.')}" for name, dtype in dtypes.items())
        raise TypeError(f"{', '.join(dtypes)} must have the same dtype, got {listed}")


def _broadcast_batch(**batch_shapes: tuple[int, ...]) -> torch.Size:
    """The common batch shape of the arguments' leading dimensions, or a ValueError naming them."""
    try:
        return torch.broadcast_shapes(*batch_shapes.values())
    except RuntimeError:
        listed = ", ".join(f"{name} {tuple(shape)}" for name, shape in batch_shapes.items())
        raise ValueError(f"batch dimensions of {', '.join(batch_shapes)} must broadcast, got {listed}") from None


def _positive_int(name: str, value) -> int:
    """A positive integer size (python or numpy integer, or an integer 0-d tensor); floats are refused."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.is_floating_point()):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive integer, got {value!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


def _rigid_conditions(name: str, matrix: Tensor) -> list[tuple[Tensor, str]]:
    """Conditions for a rigid transform (..., 4, 4) or a rotation (..., 3, 3), as (all-true tensor, message)."""
    matrix = matrix.detach()
    rotation = matrix[..., :3, :3]
    identity = torch.eye(3, dtype=matrix.dtype, device=matrix.device)
    orthogonal = ((rotation.transpose(-1, -2) @ rotation - identity).abs() <= RIGID_TOLERANCE).all()
    proper = ((torch.linalg.det(rotation) - 1.0).abs() <= RIGID_TOLERANCE).all()
    part = "its rotation R" if matrix.shape[-1] == 4 else "it"
    conditions = [(torch.isfinite(matrix).all(), f"{name} must be finite"),
                  (orthogonal, f"{name} must be rigid: {part} must satisfy R^T R = I (no scale, shear or singular "
                               f"matrix; tolerance {RIGID_TOLERANCE})"),
                  (proper, f"{name} must be a proper rotation: det R = +1 (a reflection has -1)")]
    if matrix.shape[-1] == 4:
        last_row = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=matrix.dtype, device=matrix.device)
        conditions.append((((matrix[..., 3, :] - last_row).abs() <= RIGID_TOLERANCE).all(),
                           f"{name} must have the last row (0, 0, 0, 1)"))
    return conditions


def _intrinsics_conditions(name: str, K: Tensor) -> list[tuple[Tensor, str]]:
    """Conditions for pinhole intrinsics (..., 3, 3): finite, fx > 0, fy > 0, rows [fx s cx; 0 fy cy; 0 0 1]."""
    K = K.detach()
    lower = torch.stack([K[..., 1, 0], K[..., 2, 0], K[..., 2, 1], K[..., 2, 2] - 1.0], dim=-1)
    return [(torch.isfinite(K).all(), f"{name} must be finite"),
            (((K[..., 0, 0] > 0) & (K[..., 1, 1] > 0)).all(), f"{name} must have positive focal lengths K[0, 0], K[1, 1]"),
            ((lower.abs() <= RIGID_TOLERANCE).all(), f"{name} must be pinhole intrinsics [[fx, s, cx], [0, fy, cy], "
                                                     f"[0, 0, 1]]")]


def _require(conditions: list[tuple[Tensor, str]]) -> None:
    """Raise ValueError with the first failed condition's message; one host transfer for all of them."""
    if not conditions:
        return
    with torch.no_grad():
        passed = torch.stack([condition.to(torch.bool).cpu() for condition, _ in conditions]).tolist()
    for ok, (_, message) in zip(passed, conditions):
        if not ok:
            raise ValueError(message)


def _as_tensors(names: tuple[str, ...], *values) -> list[Tensor]:
    """Floats and tensors as broadcast tensors of one floating dtype and device (that of the tensors given)."""
    tensors = {name: v for name, v in zip(names, values) if isinstance(v, Tensor)}
    floating = {name: v for name, v in tensors.items() if v.is_floating_point()}
    if floating:
        _check_same_dtype(**floating)
    dtype = torch.get_default_dtype()
    for tensor in floating.values():
        dtype = torch.promote_types(dtype, tensor.dtype)
    device = next(iter(tensors.values())).device if tensors else None
    converted = []
    for name, value in zip(names, values):
        try:
            converted.append(torch.as_tensor(value, dtype=dtype, device=device))
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}") from None
    _broadcast_batch(**{name: tuple(t.shape) for name, t in zip(names, converted)})
    return list(torch.broadcast_tensors(*converted))
