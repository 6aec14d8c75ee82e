"""Cuboid neural meshes and render-and-compare pose estimation of 3D-CompNets.

Paper: X. Yuan, G. Zhang, P. Kaushik, L. Jesslen, A. Kortylewski, A. Yuille, "Scaling 3D Compositional
Models for Robust Classification and Pose Estimation" (ICCV 2025). Conventions follow NOVUM
(github.com/GenIntel/NOVUM: `lib/createCuboidMesh.py`, `lib/losses.py`, `inference.py`) and NeMo
(Wang et al., ICLR 2021, wufeim/NeMo `solve_pose.py`): the cuboid mesh of a class, the PASCAL3D+ /
ImageNet3D object pose (`cameras.pose_from_angles`), the 144-pose initial grid and Adam refinement.

A class is a cuboid mesh (vertices (V, 3), faces (F, 3)) whose vertices carry the unit features of a
`vmf_contrast.VertexMemory`. Rendering is a pure-torch z-buffer: every pixel centre is tested against
every face (in chunks), the front-most face is kept and the vertex features are interpolated with
perspective-correct barycentrics. The face selection is not differentiated; the barycentrics of the
selected face are, so gradients reach the pose through the vertex projections (a hard rasteriser,
like pytorch3d with blur 0 in NOVUM).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from minimal3d.cameras import pose_from_angles, project
from minimal3d.vmf_contrast import VertexMemory, classification_scores

# ---------------------------------------------------------------------------------------------------
# Cuboid mesh (NOVUM createCuboidMesh.py)
# ---------------------------------------------------------------------------------------------------


@dataclass
class Mesh:
    """A triangle mesh: vertices (V, 3) in the object frame (z up), faces (F, 3) int64 vertex ids."""

    vertices: Tensor
    faces: Tensor


def cuboid_ranges(cad_vertices: Tensor, coverage: float = 0.99) -> Tensor:
    """Per axis the shortest interval holding `coverage` of the CAD vertices: (3, 2) [lo, hi].

    cad_vertices: (P, 3), all CAD models of a class pooled. NOVUM: with s = int(coverage * P) and the
    sorted coordinates v, the interval [v[j], v[j + s]] with the smallest width.
    """
    if cad_vertices.ndim != 2 or cad_vertices.shape[-1] != 3 or cad_vertices.shape[0] < 2:
        raise ValueError(f"cad_vertices must be (P >= 2, 3), got {tuple(cad_vertices.shape)}")
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    span = int(cad_vertices.shape[0] * coverage)
    if span < 1:
        raise ValueError("coverage * number of CAD vertices must be >= 1")
    ordered = cad_vertices.sort(dim=0).values  # (P, 3)
    start = (ordered[span:] - ordered[:-span]).argmin(dim=0)  # (3,)
    axis = torch.arange(3, device=cad_vertices.device)
    return torch.stack([ordered[start, axis], ordered[start + span, axis]], dim=-1)


def _grid_face(rows: int, cols: int, base: int) -> Tensor:
    """Faces (2 (rows-1)(cols-1), 3) of a rows x cols vertex grid, NOVUM order: per cell (i, i+1, i+c), (i+c+1, i+1, i+c)."""
    r, c = torch.meshgrid(torch.arange(rows - 1), torch.arange(cols - 1), indexing="ij")
    i = (base + r * cols + c).flatten()
    first = torch.stack([i, i + 1, i + cols], dim=-1)
    second = torch.stack([i + cols + 1, i + 1, i + cols], dim=-1)
    return torch.stack([first, second], dim=1).reshape(-1, 3)  # interleaved per cell


def cuboid_mesh(ranges: Tensor, number_vertices: int) -> Mesh:
    """NOVUM's cuboid mesh of the box `ranges` (3, 2) with about `number_vertices` vertices.

    edge = sqrt(2 (wh + hd + wd) / number_vertices); per axis lo + linspace(0, extent, int(extent/edge + 1)).
    Vertex order: plane z = z0 then z = z1 (y outer, x inner), y = y0 then y1 (z outer, x inner),
    x = x0 then x1 (z outer, y inner); vertices on cube edges are duplicated, not merged.
    """
    if ranges.shape != (3, 2) or not bool((ranges[:, 1] > ranges[:, 0]).all()):
        raise ValueError(f"ranges must be (3, 2) with hi > lo, got {ranges.tolist()}")
    if number_vertices < 8:
        raise ValueError(f"number_vertices must be >= 8, got {number_vertices}")
    lo = ranges[:, 0].double()
    w, h, d = (ranges[:, 1].double() - lo).tolist()
    edge = math.sqrt(2 * (w * h + h * d + w * d) / number_vertices)
    xs, ys, zs = (lo[a] + torch.linspace(0, e, max(int(e / edge + 1), 2), dtype=torch.float64)
                  for a, e in enumerate((w, h, d)))

    def plane(outer: Tensor, inner: Tensor, fixed: float, axes: tuple[int, int, int]) -> Tensor:
        o, i = torch.meshgrid(outer, inner, indexing="ij")
        coords = [None, None, None]
        coords[axes[0]], coords[axes[1]], coords[axes[2]] = i.flatten(), o.flatten(), torch.full_like(i.flatten(), fixed)
        return torch.stack(coords, dim=-1)

    planes = [(ys, xs, zs[0], (0, 1, 2)), (ys, xs, zs[-1], (0, 1, 2)),  # x inner, y outer
              (zs, xs, ys[0], (0, 2, 1)), (zs, xs, ys[-1], (0, 2, 1)),  # x inner, z outer
              (zs, ys, xs[0], (1, 2, 0)), (zs, ys, xs[-1], (1, 2, 0))]  # y inner, z outer
    vertices, faces, base = [], [], 0
    for outer, inner, fixed, axes in planes:
        vertices.append(plane(outer, inner, float(fixed), axes))
        faces.append(_grid_face(len(outer), len(inner), base))
        base += len(outer) * len(inner)
    return Mesh(torch.cat(vertices).to(ranges.dtype if ranges.is_floating_point() else torch.float32).to(ranges.device),
                torch.cat(faces).to(ranges.device))


# ---------------------------------------------------------------------------------------------------
# Projection, visibility and rendering
# ---------------------------------------------------------------------------------------------------


def _face_planes(triangles: Tensor, depths: Tensor) -> Tensor:
    """Affine maps (..., F, 4, 3) from (u, v, 1) to the 3 screen barycentrics and 1/z of every face.

    triangles: (..., F, 3, 2), depths (..., F, 3). Screen-space barycentrics and the inverse depth of a
    planar triangle are affine in the pixel coordinates, so a pixel-face test is one small matmul.
    Degenerate faces and faces crossing the camera plane get all-(-1) barycentrics (never inside).
    """
    x, y = triangles[..., 0], triangles[..., 1]  # (..., F, 3)
    nxt, prv = [1, 2, 0], [2, 0, 1]
    area = (x[..., 1] - x[..., 0]) * (y[..., 2] - y[..., 0]) - (y[..., 1] - y[..., 0]) * (x[..., 2] - x[..., 0])
    valid = (area.abs() > 1e-12) & (depths > 0).all(-1)
    safe = torch.where(valid, area, torch.ones_like(area)).unsqueeze(-1)
    # lambda_i(p) = cross(v_next - p, v_prev - p) / area, affine in p = (u, v)
    coef_u = (y[..., nxt] - y[..., prv]) / safe
    coef_v = (x[..., prv] - x[..., nxt]) / safe
    coef_1 = (x[..., nxt] * y[..., prv] - y[..., nxt] * x[..., prv]) / safe
    bary = torch.stack([coef_u, coef_v, coef_1], dim=-1)  # (..., F, 3, 3)
    bary = torch.where(valid[..., None, None], bary, torch.tensor([0.0, 0.0, -1.0]).to(bary))
    inverse_depth = (bary / depths.clamp_min(1e-12).unsqueeze(-1)).sum(-2, keepdim=True)  # (..., F, 1, 3)
    return torch.cat([bary, inverse_depth], dim=-2)


def vertex_visibility(mesh: Mesh, viewmat: Tensor, K: Tensor, depth_tolerance: float = 1e-5,
                      chunk: int = 2**22) -> Tensor:
    """Exact self-occlusion visibility (P, V) of the mesh vertices for poses viewmat (P, 4, 4), K (3, 3).

    A z-buffer evaluated at the vertex projections: vertex j is hidden when some face covers its
    projection with a depth smaller than z_j (1 - depth_tolerance); vertices behind the camera are hidden.
    Does not test the image bounds (see `inside_image`).
    """
    viewmat = _check_pose(viewmat, K)
    uv, depth = project(mesh.vertices.to(viewmat), viewmat, K.to(viewmat))  # (P, V, 2), (P, V)
    planes = _face_planes(uv[:, mesh.faces], depth[:, mesh.faces])  # (P, F, 4, 3)
    points = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1).transpose(1, 2)  # (P, 3, V)
    P, V = depth.shape
    hidden = torch.zeros(P, V, dtype=torch.bool, device=viewmat.device)
    step = max(1, chunk // max(1, 4 * P * mesh.faces.shape[0]))
    for start in range(0, V, step):  # chunks of vertices bound the (P, F, 4, V_c) tests
        values = planes @ points[:, None, :, start:start + step]  # (P, F, 4, V_c)
        inside = (values[:, :, :3] >= -1e-9).all(2)
        in_front = values[:, :, 3] * depth[:, None, start:start + step] * (1 - depth_tolerance) > 1  # z_f < z_j (1 - tol)
        hidden[:, start:start + step] = (inside & in_front).any(1)
    return ~hidden & (depth > 0)


def inside_image(uv: Tensor, height: int, width: int) -> Tensor:
    """(...) bool: continuous pixel coordinates uv (..., 2) fall on a pixel of an height x width image."""
    return (uv[..., 0] >= 0) & (uv[..., 0] < width) & (uv[..., 1] >= 0) & (uv[..., 1] < height)


def rasterize(mesh: Mesh, viewmat: Tensor, K: Tensor, height: int, width: int,
              chunk: int = 2**22) -> tuple[Tensor, Tensor]:
    """Front-most face per pixel centre and its perspective-correct barycentrics.

    viewmat: (P, 4, 4), K: (3, 3) at the render resolution. Returns face_index (P, H, W) int64 (-1 where
    no face) and weights (P, H, W, 3) (zero where no face). The face choice is a no-grad z-buffer; the
    weights are differentiable with respect to the mesh vertices and the pose.
    """
    viewmat = _check_pose(viewmat, K)
    uv, depth = project(mesh.vertices.to(viewmat), viewmat, K.to(viewmat))
    u, v = torch.meshgrid(torch.arange(width, device=uv.device), torch.arange(height, device=uv.device), indexing="xy")
    centres = torch.stack([u, v], dim=-1).reshape(-1, 2).to(uv) + 0.5  # (HW, 2), pixel centres at +0.5
    P, Fn = viewmat.shape[0], mesh.faces.shape[0]
    with torch.no_grad():
        planes = _face_planes(uv[:, mesh.faces], depth[:, mesh.faces])  # (P, F, 4, 3)
        homogeneous = torch.cat([centres, torch.ones_like(centres[:, :1])], dim=1).T  # (3, HW)
        best_inverse = uv.new_zeros((P, height * width))  # 1 / depth, 0 = nothing hit
        best_face = torch.full((P, height * width), -1, dtype=torch.long, device=uv.device)
        step = max(1, chunk // max(1, 4 * P * height * width))
        for start in range(0, Fn, step):  # chunks of faces bound the (P, F_c, 4, HW) tests
            values = planes[:, start:start + step] @ homogeneous  # (P, F_c, 4, HW): 3 barycentrics, 1/z
            inside = (values[:, :, :3] >= -1e-6).all(2)  # tiny slack: no cracks on shared edges
            inverse = torch.where(inside, values[:, :, 3], torch.zeros_like(values[:, :, 3]))
            chunk_inverse, chunk_face = inverse.max(dim=1)  # front-most = largest 1/z
            closer = chunk_inverse > best_inverse
            best_inverse = torch.where(closer, chunk_inverse, best_inverse)
            best_face = torch.where(closer, chunk_face + start, best_face)
    covered = best_face >= 0
    corners = mesh.faces[best_face.clamp_min(0)]  # (P, HW, 3)
    pose = torch.arange(P, device=uv.device)[:, None, None]
    planes = _face_planes(uv[pose, corners], depth[pose, corners])  # (P, HW, 4, 3) of the chosen faces
    values = (planes @ homogeneous.T[None, :, :, None]).squeeze(-1)  # (P, HW, 4) differentiable
    corrected = values[..., :3] / depth[pose, corners].clamp_min(1e-12)  # perspective-correct weights
    weights = corrected / corrected.sum(-1, keepdim=True).clamp_min(1e-12)
    weights = torch.where(covered[..., None], weights, torch.zeros_like(weights))
    return best_face.reshape(P, height, width), weights.reshape(P, height, width, 3)


def render_features(mesh: Mesh, vertex_features: Tensor, face_index: Tensor, weights: Tensor) -> Tensor:
    """Rendered feature maps (P, D, H, W): sum_i weights_i * vertex_features[face corner i]; zero off the mesh.

    vertex_features: (V, D); face_index (P, H, W) and weights (P, H, W, 3) from `rasterize`.
    """
    if vertex_features.shape[0] != mesh.vertices.shape[0]:
        raise ValueError(f"vertex_features must be ({mesh.vertices.shape[0]}, D), got {tuple(vertex_features.shape)}")
    corners = mesh.faces[face_index.clamp_min(0)]  # (P, H, W, 3)
    rendered = (weights.unsqueeze(-1) * vertex_features[corners]).sum(-2)  # (P, H, W, D)
    return rendered.permute(0, 3, 1, 2)


def _check_pose(viewmat: Tensor, K: Tensor) -> Tensor:
    if viewmat.ndim == 2:
        viewmat = viewmat[None]
    if viewmat.ndim != 3 or viewmat.shape[-2:] != (4, 4):
        raise ValueError(f"viewmat must be (P, 4, 4), got {tuple(viewmat.shape)}")
    if K.shape != (3, 3):
        raise ValueError(f"K must be (3, 3), got {tuple(K.shape)}")
    return viewmat


# ---------------------------------------------------------------------------------------------------
# Render-and-compare pose estimation (Eq. 8; NOVUM inference.py, NeMo solve_pose.py)
# ---------------------------------------------------------------------------------------------------


def pose_grid(device=None, dtype=torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """The 144 initial poses: azimuth 12 x [0, 2pi) x elevation 4 x [-pi/6, pi/3] x theta 3 x [-pi/6, pi/6].

    Returns azimuth, elevation, theta, each (144,), azimuth outermost (NeMo `get_param_samples`).
    """
    azimuth = torch.arange(12, device=device, dtype=dtype) * (2 * math.pi / 12)
    elevation = torch.linspace(-math.pi / 6, math.pi / 3, 4, device=device, dtype=dtype)
    theta = torch.linspace(-math.pi / 6, math.pi / 6, 3, device=device, dtype=dtype)
    a, e, t = torch.meshgrid(azimuth, elevation, theta, indexing="ij")
    return a.flatten(), e.flatten(), t.flatten()


def render_compare_loss(object_score: Tensor, clutter_score: Tensor) -> Tensor:
    """NOVUM's loss (...,) = 1 - (mean max(obj, clutter) - mean clutter) over pixels (Eq. 8).

    object_score: (..., H, W) = rendered features . feature map (0 off the mesh); clutter_score (H, W).
    """
    best = torch.maximum(object_score, clutter_score.expand_as(object_score))
    return 1 - (best.flatten(-2).mean(-1) - clutter_score.mean())


def _object_score(similarity: Tensor, mesh: Mesh, face_index: Tensor, weights: Tensor) -> Tensor:
    """Rendered-feature . feature-map (P, H, W) from the vertex-pixel similarity (V, H, W).

    sum_c (sum_i w_i C_i)_c F_c = sum_i w_i (C_i . F): interpolating similarities equals rendering the
    features and taking the dot product, without the (P, D, H, W) maps.
    """
    corners = mesh.faces[face_index.clamp_min(0)]  # (P, H, W, 3)
    H, W = face_index.shape[-2:]
    pixel = (torch.arange(H, device=corners.device)[:, None] * W + torch.arange(W, device=corners.device))
    values = similarity.flatten(1)[corners, pixel[None, :, :, None].expand_as(corners)]  # (P, H, W, 3)
    return (weights * values).sum(-1)


@dataclass
class PoseEstimate:
    """Result of `estimate_pose` for one image; angles in radians, per-candidate tensors are (k,)."""

    label: int
    azimuth: float
    elevation: float
    theta: float
    distance: float
    loss: float
    candidates: Tensor
    candidate_losses: Tensor


def estimate_pose(
    feature_map: Tensor,
    meshes: list[Mesh],
    memory: VertexMemory,
    K: Tensor,
    candidates: list[int] | None = None,
    top_k: int = 3,
    distance: float = 5.0,
    steps: int = 30,
    lr: float = 0.05,
    betas: tuple[float, float] = (0.4, 0.6),
    grid_cache: dict | None = None,
) -> PoseEstimate:
    """Class and pose of one image by render-and-compare against the neural meshes (Eq. 8).

    feature_map: (D, H, W) unit features; meshes: one Mesh per class; memory: vmf_contrast.VertexMemory;
    K: (3, 3) intrinsics at feature-map resolution. Candidates: the given classes, else the top_k by the
    paper's S_y (Eq. 7). For every candidate: score the 144 grid poses at `distance` (rasterised once per
    class and kept in `grid_cache`), then refine (azimuth, elevation, theta, distance) of the best one
    with Adam(lr, betas) for `steps` steps. The candidate with the lowest final loss wins.
    """
    if feature_map.ndim != 3 or feature_map.shape[0] != memory.vertices.shape[1]:
        raise ValueError(f"feature_map must be ({memory.vertices.shape[1]}, H, W), got {tuple(feature_map.shape)}")
    if len(meshes) != memory.num_classes:
        raise ValueError(f"meshes must hold one mesh per class ({memory.num_classes}), got {len(meshes)}")
    if not isinstance(K, Tensor) or K.shape != (3, 3):
        raise ValueError(f"K must be (3, 3), got {tuple(getattr(K, 'shape', ()))}")
    if candidates is not None and (len(candidates) == 0 or any(not 0 <= int(y) < memory.num_classes for y in candidates)):
        raise ValueError(f"candidates must list classes in [0, {memory.num_classes}), got {candidates}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    for name, value in (("lr", lr), ("distance", distance)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be finite and > 0, got {value}")
    D, H, W = feature_map.shape
    feature_map = feature_map.detach()
    if candidates is None:
        scores = classification_scores(feature_map[None], memory.vertices, memory.vertex_class,
                                       memory.num_classes, memory.background)[0]
        candidates = scores.topk(min(top_k, memory.num_classes)).indices.tolist()
    clutter = F.normalize(memory.background.mean(0), dim=0).to(feature_map) @ feature_map.flatten(1)
    clutter = clutter.reshape(H, W)
    grid = pose_grid(feature_map.device, feature_map.dtype)
    grid_cache = {} if grid_cache is None else grid_cache
    results = []
    for y in candidates:
        mesh = Mesh(meshes[y].vertices.to(feature_map), meshes[y].faces.to(feature_map.device))
        similarity = (memory.class_vertices(y).to(feature_map) @ feature_map.flatten(1)).reshape(-1, H, W)
        key = (y, H, W, distance, tuple(K.flatten().tolist()))  # the grid renders depend on the intrinsics
        if key not in grid_cache:
            with torch.no_grad():
                grid_cache[key] = rasterize(mesh, pose_from_angles(*grid, distance), K.to(feature_map), H, W)
        face_index, weights = grid_cache[key]
        with torch.no_grad():
            init_loss = render_compare_loss(_object_score(similarity, mesh, face_index, weights), clutter)  # (144,)
        best = int(init_loss.argmin())
        params = torch.stack([grid[0][best], grid[1][best], grid[2][best],
                              torch.tensor(distance).to(feature_map)]).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([params], lr=lr, betas=betas)
        for _ in range(steps):
            face_index, weights = rasterize(mesh, pose_from_angles(params[0], params[1], params[2],
                                                                   params[3].clamp_min(0.1)), K.to(feature_map), H, W)
            loss = render_compare_loss(_object_score(similarity, mesh, face_index, weights), clutter)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():  # the loss at the final parameters
            final = params.detach()
            face_index, weights = rasterize(mesh, pose_from_angles(final[0], final[1], final[2], final[3].clamp_min(0.1)),
                                            K.to(feature_map), H, W)
            loss = render_compare_loss(_object_score(similarity, mesh, face_index, weights), clutter)[0]
        results.append((float(loss), final))
    losses = torch.tensor([r[0] for r in results])
    winner = int(losses.argmin())
    a, e, t, d = results[winner][1].tolist()
    return PoseEstimate(candidates[winner], a, e, t, max(d, 0.1), float(losses[winner]),
                        torch.tensor(candidates), losses)
