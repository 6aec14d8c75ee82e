"""Tests of minimal3d/neural_mesh.py: mesh construction, z-buffer, renderer, pose estimation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minimal3d.cameras import intrinsics, pose_from_angles, project, rotation_error
from minimal3d.neural_mesh import (
    Mesh,
    _object_score,
    cuboid_mesh,
    cuboid_ranges,
    estimate_pose,
    pose_grid,
    rasterize,
    render_compare_loss,
    render_features,
    vertex_visibility,
)
from minimal3d.vmf_contrast import VertexMemory

RANGES = torch.tensor([[-1.0, 1.0], [-0.6, 0.6], [-0.4, 0.5]], dtype=torch.float64)


def naive_cuboid(ranges, number_vertices):
    """NOVUM's meshelize written as explicit loops over the six planes."""
    (x0, x1), (y0, y1), (z0, z1) = ranges.tolist()
    w, h, d = x1 - x0, y1 - y0, z1 - z0
    edge = (2 * (w * h + h * d + w * d) / number_vertices) ** 0.5
    xs, ys, zs = (lo + np.linspace(0, e, int(e / edge + 1)) for lo, e in ((x0, w), (y0, h), (z0, d)))
    vertices, faces, base = [], [], 0
    planes = [(ys, xs, lambda o, i: (i, o, zs[0])), (ys, xs, lambda o, i: (i, o, zs[-1])),
              (zs, xs, lambda o, i: (i, ys[0], o)), (zs, xs, lambda o, i: (i, ys[-1], o)),
              (zs, ys, lambda o, i: (xs[0], i, o)), (zs, ys, lambda o, i: (xs[-1], i, o))]
    for outer, inner, point in planes:
        for o in outer:
            for i in inner:
                vertices.append(point(o, i))
        n = len(inner)
        for m in range(len(outer) - 1):
            for k in range(n - 1):
                i = base + m * n + k
                faces += [(i, i + 1, i + n), (i + n + 1, i + 1, i + n)]
        base += len(outer) * n
    return torch.tensor(vertices), torch.tensor(faces)


def small_scene(dtype=torch.float64):
    mesh = cuboid_mesh(RANGES, 40)
    K = intrinsics(30.0, 30.0, 12.0, 10.0).to(dtype)  # a 24 x 20 map
    viewmat = pose_from_angles(torch.tensor(0.7, dtype=dtype), 0.4, 0.2, 4.0)
    return Mesh(mesh.vertices.to(dtype), mesh.faces), viewmat, K


def test_cuboid_mesh_matches_loops():
    for n in (40, 120):
        mesh = cuboid_mesh(RANGES, n)
        vertices, faces = naive_cuboid(RANGES, n)
        torch.testing.assert_close(mesh.vertices, vertices, rtol=0, atol=1e-15)
        assert torch.equal(mesh.faces, faces)


def test_cuboid_ranges_shortest_interval():
    points = torch.tensor([[0.0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3], [100, -50, 3.5]])
    ranges = cuboid_ranges(points, coverage=0.6)  # span = 3 of 5 points
    torch.testing.assert_close(ranges, torch.tensor([[0.0, 3.0], [0.0, 3.0], [1.0, 3.5]]))


def naive_barycentric(p, a, b, c):
    """Screen barycentrics of point p in triangle (a, b, c) (python floats), None if degenerate."""
    area = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
    if abs(area) < 1e-12:
        return None
    la = ((b[0] - p[0]) * (c[1] - p[1]) - (b[1] - p[1]) * (c[0] - p[0])) / area
    lb = ((c[0] - p[0]) * (a[1] - p[1]) - (c[1] - p[1]) * (a[0] - p[0])) / area
    return [la, lb, 1 - la - lb]


def test_rasterize_matches_per_pixel_loops():
    mesh, viewmat, K = small_scene()
    face_index, weights = rasterize(mesh, viewmat, K, 20, 24, chunk=5000)
    uv, depth = project(mesh.vertices, viewmat[None], K)
    uv, depth, faces = uv[0].tolist(), depth[0].tolist(), mesh.faces.tolist()
    for v in range(20):
        for u in range(24):
            best, best_inverse, best_weights = -1, 0.0, None
            for f, corners in enumerate(faces):
                bary = naive_barycentric((u + 0.5, v + 0.5), *(uv[i] for i in corners))
                if bary is None or min(bary) < -1e-6:
                    continue
                inverse = sum(l / depth[i] for l, i in zip(bary, corners))  # 1 / perspective-correct depth
                if inverse > best_inverse:
                    best, best_inverse = f, inverse
                    best_weights = [l / depth[i] / inverse for l, i in zip(bary, corners)]
            assert int(face_index[0, v, u]) == best
            if best >= 0:
                torch.testing.assert_close(weights[0, v, u], torch.tensor(best_weights, dtype=torch.float64),
                                           rtol=0, atol=1e-10)
    assert int((face_index >= 0).sum()) > 50


def test_visibility_matches_loops():
    mesh, viewmat, K = small_scene()
    visible = vertex_visibility(mesh, viewmat, K)[0]
    uv, depth = project(mesh.vertices, viewmat[None], K)
    uv, depth, faces = uv[0].tolist(), depth[0].tolist(), mesh.faces.tolist()
    for j in range(len(uv)):
        hidden = False
        for corners in faces:
            bary = naive_barycentric(uv[j], *(uv[i] for i in corners))
            if bary is None or min(bary) < -1e-9:
                continue
            surface = 1 / sum(l / depth[i] for l, i in zip(bary, corners))
            hidden = hidden or surface < depth[j] * (1 - 1e-5)
        assert bool(visible[j]) == (not hidden)
    assert 0 < int(visible.sum()) < len(uv)


def test_render_features_and_object_score_agree():
    mesh, viewmat, K = small_scene()
    g = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(mesh.vertices.shape[0], 5, generator=g, dtype=torch.float64), dim=-1)
    feature_map = F.normalize(torch.randn(5, 20, 24, generator=g, dtype=torch.float64), dim=0)
    face_index, weights = rasterize(mesh, viewmat, K, 20, 24)
    rendered = render_features(mesh, features, face_index, weights)  # (1, 5, 20, 24)
    similarity = (features @ feature_map.flatten(1)).reshape(-1, 20, 24)
    torch.testing.assert_close(_object_score(similarity, mesh, face_index, weights), (rendered * feature_map).sum(1),
                               rtol=0, atol=1e-13)
    corner = mesh.faces[face_index[0, 10, 12]]
    torch.testing.assert_close(rendered[0, :, 10, 12], weights[0, 10, 12] @ features[corner], rtol=0, atol=1e-14)
    assert torch.equal(rendered[face_index[:, None].expand_as(rendered) < 0], torch.zeros(0, dtype=torch.float64).new_zeros(
        int((face_index < 0).sum()) * 5))


def test_gradcheck_render_and_compare_float64():
    mesh, _, K = small_scene()
    g = torch.Generator().manual_seed(1)
    features = F.normalize(torch.randn(mesh.vertices.shape[0], 5, generator=g, dtype=torch.float64), dim=-1)
    feature_map = F.normalize(torch.randn(5, 20, 24, generator=g, dtype=torch.float64), dim=0)
    clutter = torch.full((20, 24), -1.0, dtype=torch.float64)  # below every score: the loss is smooth

    def loss_of(pose, vertex_features):
        face_index, weights = rasterize(mesh, pose_from_angles(pose[0], pose[1], pose[2], pose[3]), K, 20, 24)
        rendered = render_features(mesh, vertex_features, face_index, weights)
        return render_compare_loss((rendered * feature_map).sum(1), clutter)

    pose = torch.tensor([0.7, 0.4, 0.2, 4.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss_of, (pose, features.requires_grad_(True)), eps=1e-7, atol=1e-6, fast_mode=True)


def test_pose_grid():
    azimuth, elevation, theta = pose_grid(dtype=torch.float64)
    assert azimuth.shape == (144,)
    torch.testing.assert_close(azimuth.unique(), torch.arange(12, dtype=torch.float64) * math.pi / 6)
    torch.testing.assert_close(elevation.unique(), torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=torch.float64) * math.pi / 6)
    torch.testing.assert_close(theta.unique(), torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) * math.pi / 6)


def test_estimate_pose_recovers_a_rendered_pose():
    """A feature map rendered from class 1's memory at a known pose (background = clutter features)."""
    torch.manual_seed(0)
    meshes = [cuboid_mesh(RANGES.float(), 60), cuboid_mesh(torch.tensor([[-0.5, 0.5], [-1.2, 1.2], [-0.3, 0.3]]), 60)]
    memory = VertexMemory([m.vertices.shape[0] for m in meshes], dim=16, num_background=8)
    K = intrinsics(30.0, 30.0, 12.0, 12.0)
    truth = torch.tensor([2.0, 0.3, 0.1, 5.0])
    face_index, weights = rasterize(meshes[1], pose_from_angles(*truth), K, 24, 24)
    rendered = render_features(meshes[1], memory.class_vertices(1), face_index, weights)[0]
    feature_map = torch.where(face_index[0] >= 0, rendered, memory.background[0][:, None, None])
    feature_map = F.normalize(feature_map + 0.05 * torch.randn_like(feature_map), dim=0)
    estimate = estimate_pose(feature_map, meshes, memory, K, top_k=2, steps=15)
    assert estimate.label == 1
    error = rotation_error(pose_from_angles(estimate.azimuth, estimate.elevation, estimate.theta, 5.0)[:3, :3],
                           pose_from_angles(*truth)[:3, :3])
    assert float(error) < math.pi / 18


def test_bad_inputs_raise():
    mesh, viewmat, K = small_scene()
    with pytest.raises(ValueError, match="viewmat"):
        rasterize(mesh, viewmat[:, :3], K, 4, 4)
    with pytest.raises(ValueError, match="K"):
        vertex_visibility(mesh, viewmat, K[:2])
    with pytest.raises(ValueError, match="ranges"):
        cuboid_mesh(RANGES.flip(1), 40)
    with pytest.raises(ValueError, match="cad_vertices"):
        cuboid_ranges(torch.zeros(5, 2))
    memory = VertexMemory([mesh.vertices.shape[0]], dim=5, num_background=2)
    with pytest.raises(ValueError, match="feature_map"):
        estimate_pose(torch.zeros(4, 8, 8), [mesh], memory, K.float())
    with pytest.raises(ValueError, match="meshes"):
        estimate_pose(torch.zeros(5, 8, 8), [mesh, mesh], memory, K.float())
