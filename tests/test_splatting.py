"""Tests of minimal3d.splatting against a naive dense renderer written here, plus gradchecks and guards."""

import math

import pytest
import torch

from minimal3d.splatting import (
    ExclusiveCumsumPerRun,
    SparseWeightedSum,
    rasterize_gaussians,
    spherical_harmonics,
)

PARAMS = ("means", "quats", "scales", "opacities", "colors")


# ----------------------------------------------------------------------------------------------------
# Naive reference: one Gaussian at a time for the projection, a front-to-back loop over Gaussians for
# the compositing (all pixels at once, no tiles, no sorting tricks), exactly the CUDA kernel's rules.
# ----------------------------------------------------------------------------------------------------


def naive_project(mean, quat, scale, viewmat, K, width, height, eps2d):
    w, x, y, z = quat / torch.sqrt((quat * quat).sum())
    rotation = torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)]),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)]),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]),
    ])  # fmt: skip
    covariance = rotation @ torch.diag(scale * scale) @ rotation.T
    point = viewmat[:3, :3] @ mean + viewmat[:3, 3]
    covariance = viewmat[:3, :3] @ covariance @ viewmat[:3, :3].T
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    u, v, depth = fx * point[0] / point[2] + cx, fy * point[1] / point[2] + cy, point[2]
    # Jacobian point clamped to 1.3 x the half field of view (gsplat)
    tx = depth * torch.clamp(point[0] / depth, -(cx / fx + 0.15 * width / fx), (width - cx) / fx + 0.15 * width / fx)
    ty = depth * torch.clamp(point[1] / depth, -(cy / fy + 0.15 * height / fy), (height - cy) / fy + 0.15 * height / fy)
    zero = torch.zeros_like(depth)
    jacobian = torch.stack([
        torch.stack([fx / depth, zero, -fx * tx / depth**2]),
        torch.stack([zero, fy / depth, -fy * ty / depth**2]),
    ])  # fmt: skip
    covariance2d = jacobian @ covariance @ jacobian.T + eps2d * torch.eye(2, dtype=mean.dtype)
    radius = torch.ceil(3.33 * torch.sqrt(torch.diagonal(covariance2d))).detach()
    return torch.stack([u, v]), depth, torch.linalg.inv(covariance2d), radius


def naive_render(means, quats, scales, opacities, colors, viewmat, K, width, height, *, background=None,
                 near_plane=0.2, far_plane=1e10, eps2d=0.3, alpha_max=0.99):  # fmt: skip
    projected = []
    for i in range(means.shape[0]):
        mean2d, depth, inverse, radius = naive_project(means[i], quats[i], scales[i], viewmat, K, width, height, eps2d)
        visible = near_plane < depth.item() < far_plane
        visible &= bool((mean2d + radius > 0).all() and mean2d[0] - radius[0] < width and mean2d[1] - radius[1] < height)
        projected.append((i, mean2d, depth, inverse, radius if visible else torch.zeros_like(radius), visible))
    rows, columns = torch.meshgrid(
        torch.arange(height, dtype=means.dtype), torch.arange(width, dtype=means.dtype), indexing="ij"
    )
    centres = torch.stack([columns + 0.5, rows + 0.5], dim=-1).reshape(-1, 2)  # (H*W, 2)
    means2d = torch.stack([p[1] for p in projected])  # (N, 2), used below so that means2d.grad exists
    transmittance = torch.ones(height * width, dtype=means.dtype)
    color = torch.zeros(height * width, colors.shape[1], dtype=means.dtype)
    depth_acc = torch.zeros(height * width, dtype=means.dtype)
    done = torch.zeros(height * width, dtype=torch.bool)
    stops = clamps = 0
    for i, _, depth, inverse, _, visible in sorted(projected, key=lambda p: p[2].item()):
        if not visible:
            continue
        d = means2d[i] - centres  # (H*W, 2)
        sigma = 0.5 * (d @ inverse * d).sum(-1)
        raw_alpha = opacities[i] * torch.exp(-sigma)
        alpha = torch.where(raw_alpha > alpha_max, torch.full_like(raw_alpha, alpha_max), raw_alpha)
        use = (sigma >= 0) & (alpha >= 1 / 255) & ~done
        clamps += int((use & (raw_alpha > alpha_max)).sum())
        next_transmittance = transmittance * (1 - alpha)
        stop = use & (next_transmittance <= 1e-4)
        stops += int(stop.sum())
        done |= stop
        use &= ~stop
        weight = torch.where(use, alpha * transmittance, torch.zeros_like(alpha))
        color = color + weight[:, None] * colors[i]
        depth_acc = depth_acc + weight * depth
        transmittance = torch.where(use, next_transmittance, transmittance)
    alpha_image = 1 - transmittance
    if background is not None:
        color = color + transmittance[:, None] * background
    return {
        "render": color.reshape(height, width, -1),
        "alpha": alpha_image.reshape(height, width),
        "depth_acc": depth_acc.reshape(height, width),
        "depth_exp": (depth_acc / alpha_image.clamp(min=1e-10)).reshape(height, width),
        "radii": torch.stack([p[4] for p in projected]).to(torch.int32),
        "means2d": means2d,
        "stops": stops,
        "clamps": clamps,
    }


# ----------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------


def camera(width, height, fov_degrees=60.0, dtype=torch.float64):
    focal = 0.5 * width / math.tan(math.radians(fov_degrees) / 2)
    K = torch.tensor([[focal, 0, 0.47 * width], [0, 1.1 * focal, 0.52 * height], [0, 0, 1]], dtype=dtype)
    angle = 0.2
    viewmat = torch.eye(4, dtype=dtype)  # a small rotation about y plus a translation
    viewmat[:3, :3] = torch.tensor(
        [[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]], dtype=dtype
    )
    viewmat[:3, 3] = torch.tensor([0.1, -0.2, 0.5], dtype=dtype)
    return viewmat, K


def random_scene(num, channels=3, seed=0, dtype=torch.float64, opacity_range=(0.2, 0.97), scale_log=-2.0):
    """Gaussians in front of ``camera``: means in a box around the optical axis at depth ~3-6."""
    generator = torch.Generator().manual_seed(seed)
    viewmat, _ = camera(8, 8, dtype=dtype)
    points_cam = torch.rand(num, 3, generator=generator, dtype=dtype) * torch.tensor([3.0, 2.4, 3.0], dtype=dtype)
    points_cam += torch.tensor([-1.5, -1.2, 3.0], dtype=dtype)
    means = (points_cam - viewmat[:3, 3]) @ viewmat[:3, :3]  # camera -> world
    low, high = opacity_range
    return {
        "means": means,
        "quats": torch.randn(num, 4, generator=generator, dtype=dtype),
        "scales": torch.exp(scale_log + 0.6 * torch.randn(num, 3, generator=generator, dtype=dtype)),
        "opacities": low + (high - low) * torch.rand(num, generator=generator, dtype=dtype),
        "colors": torch.rand(num, channels, generator=generator, dtype=dtype),
    }


def small_scene():
    """24 random Gaussians + a stack of opaque ones (stop rule), one above alpha_max (clamp), one behind
    the camera and one far outside the image (culled); meant for a 20 x 14 image of ``camera``."""
    scene = random_scene(24, seed=3)
    viewmat, _ = camera(8, 8)
    stack = torch.tensor([[0.1 * k - 0.3, 0.05 * k - 0.2, 3.0 + 0.1 * k] for k in range(8)], dtype=torch.float64)
    _, K = camera(20, 14)
    depth = 2.5  # one Gaussian centred exactly on pixel (14, 4): alpha = opacity > alpha_max there
    on_pixel = [(14.5 - K[0, 2]) * depth / K[0, 0], (4.5 - K[1, 2]) * depth / K[1, 1], depth]
    extra = torch.tensor([on_pixel, [0.0, 0.0, -1.0], [40.0, 0.0, 4.0]], dtype=torch.float64)
    points_cam = torch.cat([stack, extra])
    generator = torch.Generator().manual_seed(7)
    scene["means"] = torch.cat([scene["means"], (points_cam - viewmat[:3, 3]) @ viewmat[:3, :3]])
    scene["quats"] = torch.cat([scene["quats"], torch.randn(11, 4, generator=generator, dtype=torch.float64)])
    scene["scales"] = torch.cat([scene["scales"], torch.full((11, 3), 0.35, dtype=torch.float64)])
    opacities = torch.tensor([0.91, 0.93, 0.95, 0.9, 0.92, 0.94, 0.96, 0.93, 0.9995, 0.9, 0.9], dtype=torch.float64)
    scene["opacities"] = torch.cat([scene["opacities"], opacities])
    scene["colors"] = torch.cat([scene["colors"], torch.rand(11, 3, generator=generator, dtype=torch.float64)])
    return scene


def leaves(scene):
    return {key: value.clone().requires_grad_() for key, value in scene.items()}


def grads_of(outputs, params, weights):
    loss = sum((outputs[key] * weights[key]).sum() for key in weights)
    grads = torch.autograd.grad(loss, [params[key] for key in PARAMS], allow_unused=True)
    return {key: torch.zeros_like(params[key]) if g is None else g for key, g in zip(PARAMS, grads)}


def loss_weights(height, width, channels, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {
        "render": torch.randn(height, width, channels, generator=generator, dtype=torch.float64),
        "alpha": torch.randn(height, width, generator=generator, dtype=torch.float64),
        "depth_acc": torch.randn(height, width, generator=generator, dtype=torch.float64),
    }


# ----------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha_max", [0.99, 0.999])
def test_matches_naive_reference(alpha_max):
    width, height = 20, 14  # partial tiles for tile sizes 8 and 16
    viewmat, K = camera(width, height)
    background = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64)
    params = leaves(small_scene())
    ours = rasterize_gaussians(
        *params.values(), viewmat, K, width, height, background=background, alpha_max=alpha_max, tile_size=8
    )
    naive = naive_render(*params.values(), viewmat, K, width, height, background=background, alpha_max=alpha_max)
    assert naive["stops"] > 0 and naive["clamps"] > 0  # the scene exercises both rules
    assert (naive["radii"] == 0).all(-1).sum() == 2  # behind the camera and outside the image
    for key in ("render", "alpha", "depth_acc", "depth_exp", "means2d"):
        torch.testing.assert_close(ours[key], naive[key], atol=1e-12, rtol=1e-12, msg=key)
    assert torch.equal(ours["radii"], naive["radii"])
    weights = loss_weights(height, width, 3)
    ours_grads, naive_grads = grads_of(ours, params, weights), grads_of(naive, params, weights)
    for key in PARAMS:
        torch.testing.assert_close(ours_grads[key], naive_grads[key], atol=1e-10, rtol=1e-9, msg=key)


def test_feature_channels_match_naive_reference():
    width, height = 17, 12
    viewmat, K = camera(width, height)
    params = leaves(random_scene(30, channels=7, seed=5))
    ours = rasterize_gaussians(*params.values(), viewmat, K, width, height)
    naive = naive_render(*params.values(), viewmat, K, width, height)
    torch.testing.assert_close(ours["render"], naive["render"], atol=1e-12, rtol=1e-12)
    weights = {"render": loss_weights(height, width, 7)["render"]}
    ours_grads, naive_grads = grads_of(ours, params, weights), grads_of(naive, params, weights)
    for key in PARAMS:
        torch.testing.assert_close(ours_grads[key], naive_grads[key], atol=1e-10, rtol=1e-9, msg=key)


def test_gaussian_covering_whole_image():
    width, height = 16, 12
    viewmat, K = camera(width, height)
    centre = torch.tensor([[0.0, 0.0, 4.0]], dtype=torch.float64)
    params = leaves({
        "means": (centre - viewmat[:3, 3]) @ viewmat[:3, :3],
        "quats": torch.tensor([[0.9, 0.1, -0.2, 0.3]], dtype=torch.float64),
        "scales": torch.tensor([[30.0, 20.0, 10.0]], dtype=torch.float64),
        "opacities": torch.tensor([0.8], dtype=torch.float64),
        "colors": torch.tensor([[0.2, 0.6, 1.0]], dtype=torch.float64),
    })  # fmt: skip
    ours = rasterize_gaussians(*params.values(), viewmat, K, width, height, tile_size=4)
    assert ours["radii"].min() > 10 * width  # the box is far larger than the image
    naive = naive_render(*params.values(), viewmat, K, width, height)
    torch.testing.assert_close(ours["render"], naive["render"], atol=1e-12, rtol=0)
    assert (ours["alpha"] > 0.7).all()  # every pixel is covered, almost at full opacity
    torch.testing.assert_close(ours["render"], ours["alpha"][..., None] * params["colors"][0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("tile_size", [8, 32, 5])
def test_tile_size_does_not_change_result(tile_size):
    width, height = 50, 37
    viewmat, K = camera(width, height)
    params = leaves(random_scene(300, channels=4, seed=11))
    reference = rasterize_gaussians(*params.values(), viewmat, K, width, height, tile_size=16)
    other = rasterize_gaussians(*params.values(), viewmat, K, width, height, tile_size=tile_size)
    for key in ("render", "alpha", "depth_acc", "depth_exp"):  # same pairs, same order per pixel
        torch.testing.assert_close(other[key], reference[key], atol=1e-13, rtol=0, msg=key)
    weights = loss_weights(height, width, 4)
    reference_grads, other_grads = grads_of(reference, params, weights), grads_of(other, params, weights)
    for key in PARAMS:
        torch.testing.assert_close(other_grads[key], reference_grads[key], atol=1e-11, rtol=1e-11, msg=key)


@pytest.mark.parametrize("fast", [False, True])
def test_gradcheck_rasterizer(fast):
    width, height = 8, 6
    viewmat, K = camera(width, height)
    scene = random_scene(5, seed=2, opacity_range=(0.3, 0.8), scale_log=-1.5)
    scene["means"] = scene["means"] * 0.5 + 1.5 * viewmat[:3, :3][2]  # pull them into the small view

    projections = torch.randn(6, height * width * 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def render(*params):  # 6 random linear functionals of (render, alpha, depth_acc) keep gradcheck cheap
        background = torch.full((3,), 0.3, dtype=torch.float64)
        out = rasterize_gaussians(*params, viewmat, K, width, height, background=background, fast=fast)
        return projections @ torch.cat([out["render"], out["alpha"][..., None], out["depth_acc"][..., None]], -1).reshape(-1)

    inputs = tuple(value.requires_grad_() for value in scene.values())
    visible = rasterize_gaussians(*inputs, viewmat, K, width, height)["alpha"] > 0.05
    assert visible.sum() > 10  # the Gaussians are visible
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_spherical_harmonics_colour():
    width, height = 8, 6
    viewmat, K = camera(width, height)
    scene = random_scene(4, seed=4, opacity_range=(0.3, 0.8), scale_log=-1.5)
    scene["means"] = scene["means"] * 0.5 + 1.5 * viewmat[:3, :3][2]
    scene["colors"] = 0.3 * torch.randn(4, 9, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    projections = torch.randn(4, height * width * 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def render(means):  # the view direction makes the colour depend on the means (coeffs: parity tests)
        geometry = (means, scene["quats"], scene["scales"], scene["opacities"])
        out = rasterize_gaussians(*geometry, scene["colors"], viewmat, K, width, height, sh_degree=2)
        return projections @ out["render"].reshape(-1)

    assert torch.autograd.gradcheck(render, (scene["means"].requires_grad_(),), eps=1e-6, atol=1e-6)


def test_gradcheck_kernels():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(12, dtype=torch.float64, generator=generator, requires_grad=True)
    run_of_pair = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 4])
    assert torch.autograd.gradcheck(lambda v: ExclusiveCumsumPerRun.apply(v, run_of_pair), (values,))
    row_offsets, columns = torch.tensor([0, 2, 3, 6]), torch.tensor([0, 3, 1, 0, 2, 3])
    weights = torch.rand(6, dtype=torch.float64, generator=generator, requires_grad=True)
    matrix_values = torch.randn(4, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    product = lambda w, v: SparseWeightedSum.apply(w, v, row_offsets, columns)  # noqa: E731
    assert torch.autograd.gradcheck(product, (weights, matrix_values))
    dirs = torch.randn(6, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    coeffs = torch.randn(6, 16, 2, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d, c: spherical_harmonics(3, d, c), (dirs, coeffs))


def test_kernels_match_naive_sums():
    run_of_pair = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 4])
    values = torch.randn(12, dtype=torch.float64)
    expected = torch.stack([values[:i][run_of_pair[:i] == run_of_pair[i]].sum() for i in range(12)])
    torch.testing.assert_close(ExclusiveCumsumPerRun.apply(values, run_of_pair), expected, atol=1e-15, rtol=0)
    row_offsets, columns = torch.tensor([0, 2, 3, 6]), torch.tensor([0, 3, 1, 0, 2, 3])
    weights, matrix_values = torch.rand(6, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    expected = torch.zeros(3, 5, dtype=torch.float64)
    for row in range(3):
        for j in range(row_offsets[row], row_offsets[row + 1]):
            expected[row] += weights[j] * matrix_values[columns[j]]
    torch.testing.assert_close(SparseWeightedSum.apply(weights, matrix_values, row_offsets, columns), expected)


def test_scan_keeps_float32_precision_over_many_runs():
    """A pixel's transmittance must not depend on how many pairs of other pixels precede it."""
    generator = torch.Generator().manual_seed(0)
    run_of_pair = torch.repeat_interleave(torch.arange(20000), torch.randint(1, 60, (20000,), generator=generator))
    values = -6.0 * torch.rand(run_of_pair.shape[0], dtype=torch.float64, generator=generator)
    exact = ExclusiveCumsumPerRun.apply(values, run_of_pair)
    values32 = values.float().requires_grad_()
    approx = ExclusiveCumsumPerRun.apply(values32, run_of_pair)
    assert (approx.double() - exact).abs().max() < 1e-4  # local sums of <= 60 terms, not the global total
    grad = torch.randn(values.shape[0], dtype=torch.float64, generator=generator)
    approx.backward(grad.float())
    exact_grad = ExclusiveCumsumPerRun.apply(grad.flip(0), run_of_pair.flip(0).neg() + run_of_pair[-1]).flip(0)
    assert (values32.grad.double() - exact_grad).abs().max() < 1e-4


@pytest.mark.parametrize("channels", [3, 20])
def test_fast_path_equals_readable_path(channels):
    """The fast path (scan with custom backward, sparse CSR product) gives the readable path's numbers."""
    width, height = 24, 20
    viewmat, K = camera(width, height)
    params = leaves(random_scene(80, channels=channels, seed=9))
    background = torch.linspace(0.1, 0.9, channels, dtype=torch.float64)
    outputs = {
        fast: rasterize_gaussians(*params.values(), viewmat, K, width, height, background=background, fast=fast)
        for fast in (False, True)
    }
    for key in ("render", "alpha", "depth_acc", "depth_exp"):
        torch.testing.assert_close(outputs[True][key], outputs[False][key], atol=1e-14, rtol=1e-13, msg=key)
    assert outputs[False]["alpha"].gt(0.5).sum() > 100  # a well covered image
    weights = loss_weights(height, width, channels)
    grads = {fast: grads_of(outputs[fast], params, weights) for fast in (False, True)}
    for key in PARAMS:
        torch.testing.assert_close(grads[True][key], grads[False][key], atol=1e-12, rtol=1e-11, msg=key)


def test_fast_path_is_picked_for_wide_features_on_cpu():
    """``fast=None`` runs the sparse path for >= 16 channels on CPU, the readable one otherwise."""
    from unittest import mock

    from minimal3d import splatting

    width, height = 16, 12
    viewmat, K = camera(width, height)
    for channels, expected in ((3, False), (splatting.FAST_PATH_MIN_CHANNELS, True)):
        scene = random_scene(10, channels=channels, seed=2)
        with mock.patch.object(splatting, "composite_pairs_fast", wraps=splatting.composite_pairs_fast) as spy:
            rasterize_gaussians(*scene.values(), viewmat, K, width, height)
        assert spy.called == expected, channels


def test_detach_geometry_trains_only_features():
    width, height = 24, 20
    viewmat, K = camera(width, height)
    params = leaves(random_scene(60, channels=6, seed=12))
    full = rasterize_gaussians(*params.values(), viewmat, K, width, height)
    detached = rasterize_gaussians(*params.values(), viewmat, K, width, height, detach_geometry=True)
    torch.testing.assert_close(detached["render"], full["render"], atol=0, rtol=0)
    weights = {"render": loss_weights(height, width, 6)["render"]}
    full_grads, detached_grads = grads_of(full, params, weights), grads_of(detached, params, weights)
    torch.testing.assert_close(detached_grads["colors"], full_grads["colors"], atol=0, rtol=0)
    assert full_grads["means"].abs().sum() > 0
    for key in ("means", "quats", "scales", "opacities"):
        assert torch.count_nonzero(detached_grads[key]) == 0, key


def test_means2d_gradient_for_densification():
    """``means2d.grad`` (3DGS's view-space gradient) is kept after backward and matches the naive one."""
    width, height = 24, 20
    viewmat, K = camera(width, height)
    params = leaves(random_scene(40, seed=13))
    out = rasterize_gaussians(*params.values(), viewmat, K, width, height)
    naive = naive_render(*params.values(), viewmat, K, width, height)
    naive["means2d"].retain_grad()
    weights = loss_weights(height, width, 3)["render"]
    (out["render"] * weights).sum().backward()
    (naive["render"] * weights).sum().backward()
    visible = out["radii"][:, 0] > 0
    assert visible.sum() > 20 and out["means2d"].grad[~visible].abs().sum() == 0
    torch.testing.assert_close(out["means2d"].grad, naive["means2d"].grad, atol=1e-10, rtol=1e-9)


def test_all_gaussians_behind_camera_give_background():
    width, height = 16, 12
    viewmat, K = camera(width, height)
    scene = random_scene(20, seed=14)
    behind = torch.tensor([0.0, 0.0, -3.0], dtype=torch.float64) + 0.5 * torch.randn(20, 3, dtype=torch.float64)
    scene["means"] = (behind - viewmat[:3, 3]) @ viewmat[:3, :3]  # camera -> world
    scene["means"][0] = -viewmat[:3, :3].T @ viewmat[:3, 3]  # one exactly at the camera centre (z = 0)
    params = leaves(scene)
    background = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    out = rasterize_gaussians(*params.values(), viewmat, K, width, height, background=background)
    assert (out["radii"] == 0).all()
    torch.testing.assert_close(out["render"], background.expand(height, width, 3), atol=0, rtol=0)
    assert (out["alpha"] == 0).all() and (out["depth_acc"] == 0).all() and (out["depth_exp"] == 0).all()
    (out["render"].sum() + out["alpha"].sum() + out["depth_exp"].sum()).backward()
    for key in PARAMS:
        assert params[key].grad is not None and torch.count_nonzero(params[key].grad) == 0, key
    assert torch.isfinite(out["means2d"]).all()


def test_lower_sh_degree_uses_leading_coefficients():
    width, height = 16, 12
    viewmat, K = camera(width, height)
    scene = random_scene(30, seed=15)
    coeffs = 0.3 * torch.randn(30, 16, 3, dtype=torch.float64)
    geometry = [scene[k] for k in PARAMS[:4]]
    full = rasterize_gaussians(*geometry, coeffs, viewmat, K, width, height, sh_degree=1)
    prefix = rasterize_gaussians(*geometry, coeffs[:, :4].clone(), viewmat, K, width, height, sh_degree=1)
    torch.testing.assert_close(full["render"], prefix["render"], atol=0, rtol=0)
    degree0 = rasterize_gaussians(*geometry, coeffs, viewmat, K, width, height, sh_degree=0)
    colour = (0.28209479177387814 * coeffs[:, 0] + 0.5).clamp_min(0)  # Y_0 c_0 + 0.5, clamped
    plain = rasterize_gaussians(*geometry, colour, viewmat, K, width, height)
    torch.testing.assert_close(degree0["render"], plain["render"], atol=1e-14, rtol=0)


def bad_inputs():
    width, height = 16, 12
    viewmat, K = camera(width, height)
    scene = random_scene(6, seed=16)
    base = dict(scene, viewmat=viewmat, K=K, width=width, height=height)

    def edit(key, value):
        return dict(base, **{key: value})

    def set_value(key, index, value):
        tensor = base[key].clone()
        tensor[index] = value
        return edit(key, tensor)

    return [
        ("means", edit("means", base["means"][:, :2])),
        ("means", set_value("means", (0, 0), float("nan"))),
        ("quats", edit("quats", base["quats"][:4])),
        ("quats", set_value("quats", 2, 0.0)),
        ("quats", set_value("quats", (1, 1), float("inf"))),
        ("scales", set_value("scales", (1, 2), -0.1)),
        ("scales", set_value("scales", (1, 2), 0.0)),
        ("scales", edit("scales", base["scales"][:, :2])),
        ("opacities", set_value("opacities", 3, 1.5)),
        ("opacities", set_value("opacities", 3, -0.1)),
        ("opacities", edit("opacities", base["opacities"][:, None, None])),
        ("colors", edit("colors", base["colors"][:3])),
        ("colors", set_value("colors", (0, 0), float("nan"))),
        ("viewmat", edit("viewmat", viewmat[:3])),
        ("viewmat", set_value("viewmat", (0, 3), float("nan"))),
        ("K", edit("K", K[:2])),
        ("K", set_value("K", (0, 0), -5.0)),
        ("width", edit("width", 0)),
        ("height", edit("height", 7.5)),
    ]


@pytest.mark.parametrize("name,kwargs", bad_inputs(), ids=[f"{n}-{i}" for i, (n, _) in enumerate(bad_inputs())])
def test_bad_inputs_raise(name, kwargs):
    args = [kwargs[key] for key in (*PARAMS, "viewmat", "K", "width", "height")]
    with pytest.raises((ValueError, TypeError), match=name):
        rasterize_gaussians(*args)


def test_saturated_opacities_are_accepted():
    """A float32 sigmoid saturates to exactly 0 or 1; both render like the limit (invisible / clamped)."""
    width, height = 24, 20
    viewmat, K = camera(width, height)
    params = leaves(random_scene(30, seed=19))
    with torch.no_grad():
        params["opacities"][:5] = 1.0
        params["opacities"][5:10] = 0.0
    out = rasterize_gaussians(*params.values(), viewmat, K, width, height)
    naive = naive_render(*params.values(), viewmat, K, width, height)
    torch.testing.assert_close(out["render"], naive["render"], atol=1e-12, rtol=0)
    out["render"].sum().backward()
    assert all(torch.isfinite(params[key].grad).all() for key in PARAMS)


def test_bad_options_raise():
    width, height = 16, 12
    viewmat, K = camera(width, height)
    scene = random_scene(6, seed=17)
    args = (*scene.values(), viewmat, K, width, height)
    with pytest.raises(ValueError, match="background"):
        rasterize_gaussians(*args, background=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="sh_degree"):
        rasterize_gaussians(*args, sh_degree=4)
    with pytest.raises(ValueError, match="colors"):
        rasterize_gaussians(*args, sh_degree=1)  # (N, 3) colours are not SH coefficients
    with pytest.raises(ValueError, match="tile_size"):
        rasterize_gaussians(*args, tile_size=0)
    with pytest.raises(ValueError, match="alpha_max"):
        rasterize_gaussians(*args, alpha_max=1.0)


# ----------------------------------------------------------------------------------------------------
# torch.compile (slow on CPU) and CUDA (skipped without a GPU)
# ----------------------------------------------------------------------------------------------------


def _compile_scene(n, seed, device="cpu", channels=8):
    scene = {k: v.float().to(device) for k, v in random_scene(n, channels=channels, seed=seed).items()}
    return scene


def _assert_compiled_equals_eager(rasterize, scene, viewmat, K, width, height, **options):
    eager_params, compiled_params = leaves(scene), leaves(scene)
    eager = rasterize_gaussians(*eager_params.values(), viewmat, K, width, height, **options)
    other = rasterize(*compiled_params.values(), viewmat, K, width, height, **options)
    channels = scene["colors"].shape[-1]
    weights = {k: v.float().to(scene["means"].device) for k, v in loss_weights(height, width, channels).items()}
    for key in ("render", "alpha", "depth_acc", "depth_exp"):  # measured <= 2e-7: float32 rounding only
        torch.testing.assert_close(other[key], eager[key], atol=1e-6, rtol=1e-5, msg=key)
    for out in (eager, other):  # one backward each (compiled backward graphs free their buffers)
        sum((out[key] * weights[key]).sum() for key in weights).backward()
    for key in PARAMS:  # float32 rounding: measured <= 8e-7 of the largest gradient
        expected, actual = eager_params[key].grad, compiled_params[key].grad
        error = (actual - expected).abs().max() / expected.abs().max()
        assert error <= 1e-5, f"{key}: max abs diff {error:.2e} x max abs"
    # the view-space gradient of densification is kept on the compiled output too
    error = (other["means2d"].grad - eager["means2d"].grad).abs().max() / eager["means2d"].grad.abs().max()
    assert error <= 1e-5, f"means2d.grad: max abs diff {error:.2e} x max abs"


@pytest.mark.slow
def test_compiled_rasterizer_gives_same_numbers_without_recompiling():
    """compiled_rasterizer(): eager numbers, and one compilation although N and the numbers of tile
    intersections and pixel pairs change from call to call (dynamic shapes)."""
    from torch._dynamo.utils import counters

    from minimal3d.splatting import compiled_rasterizer

    width, height = 40, 30
    viewmat, K = camera(width, height, dtype=torch.float32)
    rasterize = compiled_rasterizer()
    counters.clear()
    _assert_compiled_equals_eager(rasterize, _compile_scene(400, 18), viewmat, K, width, height)
    frames_after_first_call = counters["frames"]["total"]
    assert frames_after_first_call > 0
    pair_counts = set()
    for n, seed in ((250, 30), (600, 31), (333, 32)):
        scene = _compile_scene(n, seed)
        _assert_compiled_equals_eager(rasterize, scene, viewmat, K, width, height)
        pair_counts.add(int(rasterize_gaussians(*scene.values(), viewmat, K, width, height)["alpha"].gt(0).sum()))
    assert len(pair_counts) == 3  # the scenes differ in size
    assert counters["frames"]["total"] == frames_after_first_call, dict(counters["frames"])  # no recompile
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.slow
def test_torch_compile_of_the_whole_function_gives_same_numbers():
    """``torch.compile(rasterize_gaussians)`` (graph breaks at the data-dependent sizes) also matches."""
    width, height = 40, 30
    viewmat, K = camera(width, height, dtype=torch.float32)
    compiled = torch.compile(rasterize_gaussians)
    _assert_compiled_equals_eager(compiled, _compile_scene(400, 18), viewmat, K, width, height)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_matches_cpu_float64_and_gradcheck():
    """On CUDA (readable path, index_add): the CPU float64 numbers and a float64 gradcheck."""
    width, height = 20, 14
    viewmat, K = camera(width, height)
    params = leaves(small_scene())
    background = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64)
    cpu = rasterize_gaussians(*params.values(), viewmat, K, width, height, background=background)
    gpu_params = {k: v.detach().cuda().requires_grad_() for k, v in params.items()}
    gpu = rasterize_gaussians(*gpu_params.values(), viewmat.cuda(), K.cuda(), width, height, background=background.cuda())
    for key in ("render", "alpha", "depth_acc", "depth_exp"):
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], atol=1e-12, rtol=1e-12, msg=key)
    weights = loss_weights(height, width, 3)
    cpu_grads = grads_of(cpu, params, weights)
    gpu_grads = grads_of(gpu, gpu_params, {k: v.cuda() for k, v in weights.items()})
    for key in PARAMS:
        torch.testing.assert_close(gpu_grads[key].cpu(), cpu_grads[key], atol=1e-10, rtol=1e-9, msg=key)
    scene = random_scene(5, seed=2, opacity_range=(0.3, 0.8), scale_log=-1.5)
    viewmat, K = camera(8, 6)
    scene["means"] = scene["means"] * 0.5 + 1.5 * viewmat[:3, :3][2]
    inputs = tuple(value.cuda().requires_grad_() for value in scene.values())
    projections = torch.randn(4, 8 * 6 * 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).cuda()

    def render(*values):
        return projections @ rasterize_gaussians(*values, viewmat.cuda(), K.cuda(), 8, 6)["render"].reshape(-1)

    # CUDA index_add sums with atomics, so two backward passes may differ in the last float64 bits (seen
    # on an H100: "Backward is not reentrant"); nondet_tol admits that rounding, the accuracy tolerances
    # are the CPU test's.
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, nondet_tol=1e-10)


@cuda
@pytest.mark.parametrize("channels", [3, 64])
def test_cuda_compiled_equals_eager(channels):
    """compiled_rasterizer() on CUDA gives the eager numbers (RGB and 64-channel features)."""
    from minimal3d.splatting import compiled_rasterizer

    width, height = 64, 48
    viewmat, K = (t.float().cuda() for t in camera(width, height))
    rasterize = compiled_rasterizer()
    for index, n in enumerate((2000, 1500)):
        _assert_compiled_equals_eager(rasterize, _compile_scene(n, 40 + index, device="cuda", channels=channels),
                                      viewmat, K, width, height)


@cuda
def test_cuda_compiled_rasterizer_does_not_recompile_when_sizes_change():
    """After one call per channel count, new numbers of Gaussians (and of tile / pixel pairs) reuse the
    compiled graphs (the numbers themselves are checked by test_cuda_compiled_equals_eager)."""
    from torch._dynamo.utils import counters

    from minimal3d.splatting import compiled_rasterizer

    width, height = 64, 48
    viewmat, K = (t.float().cuda() for t in camera(width, height))
    rasterize = compiled_rasterizer()
    counters.clear()
    for index, n in enumerate((2000, 1500, 3000)):
        for channels in (3, 64):
            params = leaves(_compile_scene(n, 40 + index, device="cuda", channels=channels))
            rasterize(*params.values(), viewmat, K, width, height)["render"].sum().backward()
        if index == 0:
            frames_after_first_sizes = counters["frames"]["total"]
    assert counters["frames"]["total"] == frames_after_first_sizes, dict(counters["frames"])


@cuda
def test_cuda_parity_files():
    """The golden files on CUDA in float64 (images and gradients), as tests/test_parity_splatting.py on CPU."""
    from refdata import load_reference, reference_dir

    cases = sorted(path.name for path in reference_dir("splatting").glob("case_*.npz"))
    assert cases
    for name in cases:
        ref = load_reference("splatting", name)
        colour = next(key for key in ("colors", "sh_coeffs", "features") if key in ref)
        keys = ("means", "quats", "scales", "opacities", colour)
        params = {key: torch.tensor(ref[key], dtype=torch.float64, device="cuda", requires_grad=True) for key in keys}
        background = torch.tensor(ref["background"], dtype=torch.float64, device="cuda") if "background" in ref else None
        out = rasterize_gaussians(
            *params.values(), torch.tensor(ref["viewmat"]).cuda(), torch.tensor(ref["K"]).cuda(), int(ref["width"]),
            int(ref["height"]), sh_degree=int(ref["sh_degree"]) if "sh_degree" in ref else None, background=background,
            near_plane=float(ref["near_plane"]), far_plane=float(ref["far_plane"]), eps2d=float(ref["eps2d"]),
            alpha_max=float(ref["alpha_max"]) if "alpha_max" in ref else 0.999, tile_size=int(ref["tile_size"]),
        )  # fmt: skip
        for key in ("render", "alpha", "depth_acc"):  # tests/data/splatting/README.md tolerances
            torch.testing.assert_close(out[key].cpu(), torch.from_numpy(ref[key]), atol=1e-9, rtol=0, msg=f"{name} {key}")
        loss = (out["render"] * torch.from_numpy(ref["w_render"]).cuda()).sum()
        grads = torch.autograd.grad(loss, list(params.values()))
        for key, grad in zip(keys, grads):
            expected = torch.from_numpy(ref[f"grad_render_{key}"])
            assert (grad.cpu() - expected).abs().max() <= 1e-8 * expected.abs().max(), f"{name} {key}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_scales_and_quaternions_stay_finite(dtype):
    """Scales of 1e30 / 1e-30 and quaternions of norm 1e-30 / 1e30 give finite images and gradients; a
    rescaled quaternion renders exactly like the unit one (no silent wrong rotation)."""
    width, height = 16, 12
    viewmat, K = (t.to(dtype) for t in camera(width, height))
    scene = {key: value.to(dtype) for key, value in random_scene(12, seed=21).items()}
    with torch.no_grad():
        scene["scales"][0] = 1e30
        scene["scales"][1] = 1e-30
        scene["scales"][2, 0] = 1e30
        scene["quats"][3] *= 1e-30
        scene["quats"][4] *= 1e30
    params = leaves(scene)
    out = rasterize_gaussians(*params.values(), viewmat, K, width, height, background=torch.ones(3, dtype=dtype))
    for key in ("render", "alpha", "depth_exp", "means2d", "conics"):
        assert torch.isfinite(out[key]).all(), key
    assert out["radii"][0].min() > 100 * width  # the huge Gaussian covers the image (a flat haze)
    (out["render"].sum() + out["depth_acc"].sum()).backward()
    for key in PARAMS:
        assert torch.isfinite(params[key].grad).all(), key
    quats64 = scene["quats"].double()
    unit = dict(scene, quats=(quats64 / (quats64 / quats64.abs().amax(-1, keepdim=True)).norm(dim=-1, keepdim=True)
                              / quats64.abs().amax(-1, keepdim=True)).to(dtype))
    reference = rasterize_gaussians(*unit.values(), viewmat, K, width, height, background=torch.ones(3, dtype=dtype))
    torch.testing.assert_close(out["render"].detach(), reference["render"], atol=1e-5, rtol=0)
