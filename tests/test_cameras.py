import math

import pytest
import torch

from minimal3d import cameras


def random_viewmat(generator, dtype=torch.float64):
    eye = torch.randn(3, generator=generator, dtype=dtype) * 3
    target = torch.randn(3, generator=generator, dtype=dtype) * 0.3
    return cameras.look_at(eye, target, torch.tensor([0.0, 0.0, 1.0], dtype=dtype))


def test_look_at_axes_follow_opencv():
    # Camera at -z looking along +z with world +y up: right (camera x) = forward x up = world -x, down = -y.
    viewmat = cameras.look_at(torch.tensor([0.0, 0.0, -5.0]), torch.zeros(3), torch.tensor([0.0, 1.0, 0.0]))
    expected = torch.tensor([[-1.0, 0, 0, 0], [0, -1, 0, 0], [0, 0, 1, 5], [0, 0, 0, 1]])
    torch.testing.assert_close(viewmat, expected)
    rotation = viewmat[:3, :3]
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(3))
    assert torch.det(rotation) > 0


def test_project_unproject_round_trip():
    generator = torch.Generator().manual_seed(0)
    viewmat = random_viewmat(generator)
    K = cameras.intrinsics(50.0, 55.0, 16.0, 12.0).double()
    depth = 1.0 + torch.rand(24, 32, generator=generator, dtype=torch.float64)
    points = cameras.unproject_depth(depth, viewmat, K)  # (H, W, 3)
    uv, z = cameras.project(points.reshape(-1, 3), viewmat, K)
    torch.testing.assert_close(z, depth.reshape(-1))
    torch.testing.assert_close(uv, cameras.pixel_centers(32, 24, dtype=torch.float64))


def test_pixel_rays_hit_unprojected_points():
    generator = torch.Generator().manual_seed(1)
    viewmat = random_viewmat(generator)
    K = cameras.fov_intrinsics(math.radians(60), 8, 6).double()
    origins, directions = cameras.pixel_rays(viewmat, K, 8, 6)
    torch.testing.assert_close(directions.norm(dim=-1), torch.ones(48, dtype=torch.float64))
    depth = torch.full((6, 8), 2.0, dtype=torch.float64)
    points = cameras.unproject_depth(depth, viewmat, K).reshape(-1, 3)
    offsets = points - origins
    # Each point lies on its pixel's ray: the offset is parallel to the direction.
    torch.testing.assert_close(torch.linalg.cross(offsets, directions, dim=-1), torch.zeros(48, 3, dtype=torch.float64))
    assert bool(((offsets * directions).sum(-1) > 0).all())


def test_batched_shapes():
    viewmats = cameras.look_at(torch.randn(5, 3) * 4, torch.zeros(5, 3), torch.tensor([0.0, 0.0, 1.0]).expand(5, 3))
    K = cameras.fov_intrinsics(1.0, 10, 8).expand(5, 3, 3)
    origins, directions = cameras.pixel_rays(viewmats, K, 10, 8)
    assert origins.shape == directions.shape == (5, 80, 3)
    uv, depth = cameras.project(torch.randn(5, 7, 3), viewmats, K)
    assert uv.shape == (5, 7, 2) and depth.shape == (5, 7)
    assert cameras.unproject_depth(torch.ones(5, 8, 10), viewmats, K).shape == (5, 8, 10, 3)


def naive_pascal_projection(vertex, azimuth, elevation, theta, distance, focal, principal):
    """PASCAL3D+ / NOVUM projection written out step by step (camera looks down -z, y up)."""
    a, e, t, d = azimuth, elevation, theta, distance
    centre = [d * math.cos(e) * math.sin(a), -d * math.cos(e) * math.cos(a), d * math.sin(e)]
    rz = lambda x: [[math.cos(x), -math.sin(x), 0], [math.sin(x), math.cos(x), 0], [0, 0, 1]]
    rx = lambda x: [[1, 0, 0], [0, math.cos(x), -math.sin(x)], [0, math.sin(x), math.cos(x)]]
    matmul = lambda A, B: [[sum(A[i][k] * B[k][j] for k in range(3)) for j in range(3)] for i in range(3)]
    rotation = matmul(rx(e - math.pi / 2), rz(-a))
    p = [sum(rotation[i][k] * (vertex[k] - centre[k]) for k in range(3)) for i in range(3)]
    x, y = focal * p[0] / -p[2], focal * p[1] / -p[2]
    x, y = math.cos(t) * x - math.sin(t) * y, math.sin(t) * x + math.cos(t) * y
    return principal[0] + x, principal[1] - y


def test_pose_from_angles_matches_pascal_projection():
    generator = torch.Generator().manual_seed(2)
    vertices = torch.rand(6, 3, generator=generator, dtype=torch.float64) - 0.5
    for azimuth, elevation, theta, distance in [(0.3, 0.2, 0.1, 5.0), (2.5, -0.4, -0.5, 4.0), (5.9, 1.0, 0.0, 6.0)]:
        viewmat = cameras.pose_from_angles(torch.tensor(azimuth, dtype=torch.float64), elevation, theta, distance)
        K = cameras.intrinsics(3000.0, 3000.0, 400.0, 320.0).double()
        uv, depth = cameras.project(vertices, viewmat, K)
        assert bool((depth > 0).all())
        expected = torch.tensor([naive_pascal_projection(v.tolist(), azimuth, elevation, theta, distance,
                                                         3000.0, (400.0, 320.0)) for v in vertices], dtype=torch.float64)
        torch.testing.assert_close(uv, expected)


def test_look_at_agrees_with_pose_from_angles():
    # With theta = 0 the PASCAL camera looks at the object origin with the object's z axis up.
    for azimuth, elevation, distance in [(0.3, 0.2, 5.0), (2.5, -0.4, 4.0), (4.0, 1.2, 3.0)]:
        viewmat = cameras.pose_from_angles(torch.tensor(azimuth, dtype=torch.float64), elevation, 0.0, distance)
        eye = cameras.camera_center(viewmat)
        expected = cameras.look_at(eye, torch.zeros(3, dtype=torch.float64), torch.tensor([0, 0, 1.0], dtype=torch.float64))
        torch.testing.assert_close(viewmat, expected)
        torch.testing.assert_close(eye.norm(), torch.tensor(distance, dtype=torch.float64))


def test_rotation_error_is_geodesic_angle():
    axis = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    axis = axis / axis.norm()
    skew = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=torch.float64)
    base = cameras.pose_from_angles(torch.tensor(1.0, dtype=torch.float64), 0.3, 0.2, 5.0)[:3, :3]
    angles = torch.tensor([0.0, 1e-4, 0.5, math.pi / 6, 3.0, math.pi - 1e-5], dtype=torch.float64)
    rotations = torch.linalg.matrix_exp(angles[:, None, None] * skew)
    errors = cameras.rotation_error(base @ rotations, base.expand(6, 3, 3))
    torch.testing.assert_close(errors, angles, atol=1e-9, rtol=0)


def test_gradcheck_project():
    generator = torch.Generator().manual_seed(3)
    points = (torch.randn(5, 3, generator=generator, dtype=torch.float64) * 0.5).requires_grad_()
    viewmat = random_viewmat(generator).requires_grad_()
    K = cameras.intrinsics(20.0, 22.0, 8.0, 6.0).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda p, v, k: cameras.project(p, v, k), (points, viewmat, K))


def test_gradcheck_unproject_and_rays():
    generator = torch.Generator().manual_seed(4)
    viewmat = random_viewmat(generator).requires_grad_()
    K = cameras.intrinsics(5.0, 6.0, 2.0, 1.5).double().requires_grad_()
    depth = (1 + torch.rand(3, 4, generator=generator, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(cameras.unproject_depth, (depth, viewmat, K))
    assert torch.autograd.gradcheck(lambda v, k: cameras.pixel_rays(v, k, 4, 3), (viewmat, K))


def test_opengl_conversion():
    # An OpenGL camera at the origin looks down -z with y up; in OpenCV it looks down +z... of the flipped frame.
    c2w_gl = torch.eye(4)
    c2w_cv = cameras.opengl_to_opencv_c2w(c2w_gl)
    viewmat = torch.linalg.inv(c2w_cv)
    uv, depth = cameras.project(torch.tensor([[0.0, 1.0, -2.0]]), viewmat, cameras.intrinsics(10.0, 10.0, 5.0, 5.0))
    assert depth.item() == pytest.approx(2.0)
    assert uv[0, 1].item() < 5.0  # world +y (up in OpenGL) appears above the image centre


def test_bad_inputs():
    with pytest.raises(ValueError, match="viewmat"):
        cameras.pixel_rays(torch.eye(3), torch.eye(3), 4, 4)
    with pytest.raises(ValueError, match="K"):
        cameras.project(torch.zeros(2, 3), torch.eye(4), torch.eye(4))
    with pytest.raises(ValueError, match="points"):
        cameras.project(torch.zeros(2, 2), torch.eye(4), torch.eye(3))
    with pytest.raises(ValueError, match="up"):
        cameras.look_at(torch.tensor([0.0, 0, 1]), torch.zeros(3), torch.tensor([0.0, 0, 1]))
    with pytest.raises(ValueError, match="distance"):
        cameras.pose_from_angles(0.0, 0.0, 0.0, 0.0)
    with pytest.raises(TypeError, match="eye"):
        cameras.look_at([0.0, 0, 1], torch.zeros(3), torch.tensor([0.0, 0, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_look_at_with_huge_eye_and_tiny_up(dtype):
    # Squaring 1e20 overflows float32: the directions are normalised at any scale, so the camera looks along
    # -eye as for a unit eye, and a tiny up is as good as a unit one.
    direction = torch.tensor([1.0, 2.0, -3.0], dtype=dtype)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=dtype)
    reference = cameras.look_at(direction, torch.zeros(3, dtype=dtype), up)
    for scale in (1e20, 1e30):
        viewmat = cameras.look_at(direction * scale, torch.zeros(3, dtype=dtype), up)
        torch.testing.assert_close(viewmat[:3, :3], reference[:3, :3])
        assert bool(torch.isfinite(viewmat).all())
        torch.testing.assert_close(viewmat[2, 3], torch.tensor(scale * direction.norm().item(), dtype=dtype))
    tiny_up = cameras.look_at(direction, torch.zeros(3, dtype=dtype), up * 1e-30)
    torch.testing.assert_close(tiny_up, reference)


def test_value_checks_are_skipped_with_check_false():
    sheared = torch.eye(4)
    sheared[0, 1] = 0.5
    K = cameras.intrinsics(10.0, 10.0, 4.0, 4.0)
    points = torch.tensor([[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="viewmat must be rigid"):
        cameras.project(points, sheared, K)
    uv, depth = cameras.project(points, sheared, K, check=False)  # the plain formula, unchecked
    torch.testing.assert_close(uv, torch.tensor([[(1.0 + 0.5 * 2.0) / 3.0 * 10.0 + 4.0, 2.0 / 3.0 * 10.0 + 4.0]]))
    torch.testing.assert_close(depth, torch.tensor([3.0]))


def test_rigid_tolerance_accepts_float32_round_off():
    # A float32 pose inverted by torch.linalg.inv, with a large translation, is rigid up to round-off.
    viewmat = cameras.look_at(torch.tensor([300.0, -200.0, 50.0]), torch.zeros(3), torch.tensor([0.0, 0.0, 1.0]))
    back = torch.linalg.inv(torch.linalg.inv(viewmat))
    cameras.camera_center(back)
    reflected = viewmat.clone()
    reflected[0, :3] *= -1
    with pytest.raises(ValueError, match="det R = \\+1"):
        cameras.camera_center(reflected)


def test_empty_batches_and_nan_points_flow_through():
    K = cameras.intrinsics(10.0, 10.0, 4.0, 4.0)
    uv, depth = cameras.project(torch.zeros(0, 5, 3), torch.eye(4).expand(0, 4, 4), K)
    assert uv.shape == (0, 5, 2) and depth.shape == (0, 5)
    points = torch.tensor([[0.0, 0.0, 2.0], [float("nan"), 0.0, 2.0]])
    uv, depth = cameras.project(points, torch.eye(4), K)
    assert bool(torch.isfinite(uv[0]).all()) and bool(torch.isnan(uv[1, 0]))
