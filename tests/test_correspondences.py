import math

import pytest
import torch

from minimal3d.correspondences import (
    _has_neighbour,
    depth_to_world,
    frame_chunk_voxels,
    frame_overlap,
    pixel_correspondences,
    pixel_overlap,
    sample_matches,
    voxel_pixel_correspondences,
    voxelize_points,
)


def look_at(eye, target):
    """World-to-camera (4, 4), OpenCV axes, world z up."""
    eye, target = torch.tensor(eye, dtype=torch.float64), torch.tensor(target, dtype=torch.float64)
    forward = (target - eye) / (target - eye).norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    viewmat = torch.eye(4, dtype=torch.float64)
    viewmat[:3, :3] = torch.stack([right, down, forward])
    viewmat[:3, 3] = -viewmat[:3, :3] @ eye
    return viewmat


def render_planes(K, viewmat, height, width, centre_offset):
    """z-depth of the scene {floor z = 0} + {wall y = 3}, seen through the pixel centres."""
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                                torch.arange(width, dtype=torch.float64), indexing="ij")
    rays = torch.stack([(cols + centre_offset - K[0, 2]) / K[0, 0], (rows + centre_offset - K[1, 2]) / K[1, 1],
                        torch.ones_like(rows)], dim=-1)  # camera rays with z = 1
    rotation_t = viewmat[:3, :3].T
    centre = -rotation_t @ viewmat[:3, 3]
    directions = rays @ viewmat[:3, :3]  # world directions (R^T d)
    depth = torch.full((height, width), float("inf"), dtype=torch.float64)
    for axis, level in ((2, 0.0), (1, 3.0)):
        t = (level - centre[axis]) / directions[..., axis]
        depth = torch.where((t > 0) & (t < depth), t, depth)
    depth = torch.where(torch.isfinite(depth), depth, torch.zeros_like(depth))
    return torch.round(depth * 1000) / 1000  # mm quantised like a depth sensor


def naive_pixel_correspondences(depth1, depth2, K, viewmat1, viewmat2, max_distance, convention):
    """One pixel at a time, plain Python arithmetic."""
    offset = 0.5 if convention == "minimal3d" else 0.0
    to_index = math.floor if convention == "minimal3d" else math.trunc
    relative = (viewmat2 @ torch.linalg.inv(viewmat1)).tolist()
    fx, fy, cx, cy = K[0, 0].item(), K[1, 1].item(), K[0, 2].item(), K[1, 2].item()
    height, width = depth1.shape
    pos1, pos2 = [], []
    for r in range(height):
        for c in range(width):
            z = depth1[r, c].item()
            if z <= 0:
                continue
            point = [(c + offset - cx) * z / fx, (r + offset - cy) * z / fy, z, 1.0]
            x2, y2, z2 = [sum(relative[i][j] * point[j] for j in range(4)) for i in range(3)]
            if z2 <= 0:
                continue
            c2, r2 = to_index(fx * x2 / z2 + cx), to_index(fy * y2 / z2 + cy)
            if not (0 <= r2 < height and 0 <= c2 < width):
                continue
            observed = depth2[r2, c2].item()
            if observed > 0 and abs(z2 - observed) < max_distance:
                pos1.append((r, c))
                pos2.append((r2, c2))
    return (torch.tensor(pos1, dtype=torch.long).reshape(-1, 2), torch.tensor(pos2, dtype=torch.long).reshape(-1, 2))


@pytest.fixture
def frame_pair():
    height, width = 12, 16
    K = torch.tensor([[14.0, 0, 8.0], [0, 14.0, 6.0], [0, 0, 1]], dtype=torch.float64)
    viewmat1 = look_at([0.2, 0.0, 1.2], [0.4, 3.0, 0.6])
    viewmat2 = look_at([0.6, 0.3, 1.1], [0.2, 3.0, 0.7])
    depth1 = render_planes(K, viewmat1, height, width, 0.5)
    depth2 = render_planes(K, viewmat2, height, width, 0.5)
    depth1[3, 4] = 0  # a hole
    return depth1, depth2, K, viewmat1, viewmat2


@pytest.mark.parametrize("convention", ["minimal3d", "pri3d"])
@pytest.mark.parametrize("max_distance", [0.05, 0.02])
def test_pixel_matches_equal_naive_loop(frame_pair, convention, max_distance):
    depth1, depth2, K, viewmat1, viewmat2 = frame_pair
    pos1, pos2 = pixel_correspondences(depth1, depth2, K, viewmat1, viewmat2, max_distance, convention)
    naive1, naive2 = naive_pixel_correspondences(depth1, depth2, K, viewmat1, viewmat2, max_distance, convention)
    assert len(naive1) > 40
    assert pos1.dtype == torch.long and torch.equal(pos1, naive1) and torch.equal(pos2, naive2)
    raster = pos1[:, 0] * depth1.shape[1] + pos1[:, 1]
    assert (raster[1:] > raster[:-1]).all()


def test_translation_round_trip():
    """Fronto-parallel wall at 2 m, camera moved along x: disparity f * b / Z pixels exactly."""
    height, width, f = 6, 10, 10.0
    depth = torch.full((height, width), 2.0, dtype=torch.float64)
    viewmat1 = torch.eye(4, dtype=torch.float64)
    for convention, centre, disparity in (("minimal3d", 0.5, 3.0), ("pri3d", 0.0, 2.5)):
        K = torch.tensor([[f, 0, width / 2 - centre], [0, f, height / 2 - centre], [0, 0, 1]], dtype=torch.float64)
        viewmat2 = torch.eye(4, dtype=torch.float64)
        viewmat2[0, 3] = -disparity * 2.0 / f  # camera 2 sits at x = +b
        pos1, pos2 = pixel_correspondences(depth, depth, K, viewmat1, viewmat2, convention=convention)
        first = 3 if convention == "minimal3d" else 2  # pri3d: u = -0.5 truncates to column 0
        assert torch.equal(pos1[:, 1].unique(), torch.arange(first, width))
        assert torch.equal(pos1[:, 0], pos2[:, 0])
        assert torch.equal(pos2[:, 1], (pos1[:, 1] - 3).clamp_min(0))


def test_bad_and_empty_inputs(frame_pair):
    depth1, depth2, K, viewmat1, viewmat2 = frame_pair
    pos1, pos2 = pixel_correspondences(torch.zeros_like(depth1), depth2, K, viewmat1, viewmat2)
    assert pos1.shape == (0, 2) and pos2.shape == (0, 2) and pos1.dtype == torch.long
    with pytest.raises(ValueError, match="K2"):
        pixel_correspondences(depth1, depth2[:-1], K, viewmat1, viewmat2)
    pos1, pos2 = pixel_correspondences(depth1, depth2[:-1], K, viewmat1, viewmat2, K2=K)
    assert len(pos1) > 0 and pos2[:, 0].max() < depth2.shape[0] - 1
    singular = viewmat2.clone()
    singular[:3, 0] = 0
    with pytest.raises(ValueError, match="singular"):
        pixel_correspondences(depth1, depth2, K, viewmat1, singular)
    with pytest.raises(ValueError, match="finite"):
        pixel_correspondences(depth1, depth2, K, torch.full((4, 4), -float("inf")), viewmat2)
    with pytest.raises(ValueError, match="depth1"):
        pixel_correspondences(depth1[None], depth2, K, viewmat1, viewmat2)
    with pytest.raises(ValueError, match="convention"):
        pixel_correspondences(depth1, depth2, K, viewmat1, viewmat2, convention="opengl")


def naive_voxel_pixel(voxels, depth, K, viewmat, voxel_size, max_depth_diff, convention):
    offset = 0.5 if convention == "minimal3d" else 0.0
    to_index = math.floor if convention == "minimal3d" else math.trunc
    height, width = depth.shape
    pixels, indices = [], []
    for index, voxel in enumerate(voxels.tolist()):
        world = [(x + offset) * voxel_size for x in voxel] + [1.0]
        cam = [sum(viewmat[i, j].item() * world[j] for j in range(4)) for i in range(3)]
        if cam[2] <= 0:
            continue
        u = K[0, 0].item() * cam[0] / cam[2] + K[0, 2].item()
        v = K[1, 1].item() * cam[1] / cam[2] + K[1, 2].item()
        if not (0 <= u < width and 0 <= v < height):
            continue
        observed = depth[to_index(v), to_index(u)].item()
        if observed > 0 and abs(cam[2] - observed) < max_depth_diff:
            pixels.append((to_index(v), to_index(u)))
            indices.append(index)
    return torch.tensor(pixels, dtype=torch.long).reshape(-1, 2), torch.tensor(indices, dtype=torch.long)


@pytest.mark.parametrize("convention", ["minimal3d", "pri3d"])
def test_voxel_pixel_equal_naive_loop(frame_pair, convention):
    depth1, _, K, viewmat1, _ = frame_pair
    points = depth_to_world(depth1, K, viewmat1, convention)
    voxels, _ = frame_chunk_voxels(points, depth1, K, viewmat1, 0.05, convention=convention)
    voxels = torch.cat([voxels, torch.tensor([[0, -40, 0], [0, 200, 10]])])  # behind / outside the camera
    pixels, index = voxel_pixel_correspondences(voxels, depth1, K, viewmat1, 0.05, 0.2, convention)
    naive_pixels, naive_index = naive_voxel_pixel(voxels, depth1, K, viewmat1, 0.05, 0.2, convention)
    assert len(index) > 20
    assert torch.equal(pixels, naive_pixels) and torch.equal(index, naive_index)


def test_voxelize_floor_vs_trunc_and_mean_features():
    points = torch.tensor([[-0.01, 0.0, 0.0], [0.01, 0.0, 0.0], [0.03, 0.0, 0.0], [0.035, 0.0, 0.0]])
    features = torch.tensor([[1.0], [2.0], [3.0], [5.0]])
    voxels, mean, inverse = voxelize_points(points, 0.02, features)
    assert voxels[:, 0].tolist() == [-1, 0, 1] and mean[:, 0].tolist() == [1.0, 2.0, 4.0]
    assert inverse.tolist() == [0, 1, 2, 2]
    voxels, mean, _ = voxelize_points(points, 0.02, features, convention="pri3d")
    assert voxels[:, 0].tolist() == [0, 1] and mean[:, 0].tolist() == [1.5, 4.0]


def test_frame_chunk_crops_to_metre_box(frame_pair):
    depth1, _, K, viewmat1, _ = frame_pair
    frame_points = depth_to_world(depth1, K, viewmat1)
    far = torch.tensor([[50.0, 50.0, 50.0]], dtype=torch.float64)
    voxels, features = frame_chunk_voxels(torch.cat([frame_points, far]), depth1, K, viewmat1, 0.02,
                                          scene_features=torch.ones(len(frame_points) + 1, 3))
    assert len(voxels) > 0 and voxels.abs().max() < 50 / 0.02 and torch.equal(features, torch.ones_like(features))


def test_neighbour_search_equals_brute_force():
    generator = torch.Generator().manual_seed(0)
    query = torch.rand(300, 3, generator=generator, dtype=torch.float64) * 2 - 1
    reference = torch.rand(200, 3, generator=generator, dtype=torch.float64) * 2 - 1
    expected = (torch.cdist(query, reference) <= 0.15).any(dim=1)
    found = _has_neighbour(query, reference, 0.15)
    assert 0 < expected.sum() < len(query) and torch.equal(found, expected)


def test_frame_overlap(frame_pair):
    depth1, depth2, K, viewmat1, viewmat2 = frame_pair
    assert frame_overlap(depth1, depth1, K, viewmat1, viewmat1).item() == 1.0
    overlap = frame_overlap(depth1, depth2, K, viewmat1, viewmat2).item()
    assert 0.3 < overlap < 1.0
    away = viewmat2.clone()
    away[:3, 3] += 100.0
    assert frame_overlap(depth1, depth2, K, viewmat1, away).item() == 0.0
    assert frame_overlap(torch.zeros_like(depth1), depth2, K, viewmat1, viewmat2).item() == 0.0


def test_pixel_overlap_is_the_papers_ratio(frame_pair):
    depth1, depth2, K, viewmat1, viewmat2 = frame_pair
    assert pixel_overlap(depth1, depth1, K, viewmat1, viewmat1).item() == 1.0
    overlap = pixel_overlap(depth1, depth2, K, viewmat1, viewmat2, 0.05).item()
    forward = len(naive_pixel_correspondences(depth1, depth2, K, viewmat1, viewmat2, 0.05, "minimal3d")[0])
    backward = len(naive_pixel_correspondences(depth2, depth1, K, viewmat2, viewmat1, 0.05, "minimal3d")[0])
    valid = int((depth1 > 0).sum() + (depth2 > 0).sum())
    assert abs(overlap - (forward + backward) / valid) < 1e-12 and 0 < overlap < 1
    away = viewmat2.clone()
    away[:3, 3] += 100.0
    assert pixel_overlap(depth1, depth2, K, viewmat1, away).item() == 0.0
    assert pixel_overlap(torch.zeros_like(depth1), torch.zeros_like(depth2), K, viewmat1, viewmat2).item() == 0.0


def test_sample_matches_replacement_rule():
    generator = torch.Generator().manual_seed(0)
    without = sample_matches(5000, 1024, generator)
    assert len(without) == 1024 and len(without.unique()) == 1024 and without.max() < 5000
    assert torch.equal(sample_matches(10, 10, generator).sort().values, torch.arange(10))
    with_replacement = sample_matches(10, 1024, generator)
    assert len(with_replacement) == 1024 and with_replacement.max() < 10 and len(with_replacement.unique()) == 10
    with pytest.raises(ValueError):
        sample_matches(0, 1024)
