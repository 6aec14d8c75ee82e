import math

import pytest
import torch

from minimal3d.cameras import intrinsics, look_at
from minimal3d.gaussians import (
    FeatureGaussians,
    GaussianSchedule,
    accumulate_densification_stats,
    build_optimizer,
    densify,
    feature_loss,
    load_scene,
    nearest_neighbor_distances,
    position_lr,
    prune,
    render_features,
    render_rgb,
    reset_opacity,
    rgb_loss,
    save_scene,
    ssim,
)

PER_GAUSSIAN = ("means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest", "features")


def naive_ssim(x, y, size=11, sigma=1.5):
    """Dense loops: windowed means/variances with zero padding, averaged over channels and pixels."""
    channels, height, width = x.shape
    half = size // 2
    g = [math.exp(-((i - half) ** 2) / (2 * sigma**2)) for i in range(size)]
    total = sum(g)
    g = [v / total for v in g]
    c1, c2 = 0.01**2, 0.03**2
    acc = 0.0
    for c in range(channels):
        for i in range(height):
            for j in range(width):
                mx = my = sxx = syy = sxy = 0.0
                for a in range(size):
                    for b in range(size):
                        ii, jj = i + a - half, j + b - half
                        if 0 <= ii < height and 0 <= jj < width:
                            w = g[a] * g[b]
                            xv, yv = float(x[c, ii, jj]), float(y[c, ii, jj])
                            mx += w * xv
                            my += w * yv
                            sxx += w * xv * xv
                            syy += w * yv * yv
                            sxy += w * xv * yv
                vx, vy, cxy = sxx - mx * mx, syy - my * my, sxy - mx * my
                acc += ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return acc / (channels * height * width)


def test_ssim_matches_naive_loops_and_is_one_for_identical_images():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 9, 13, generator=gen, dtype=torch.float64)
    y = (x + 0.2 * torch.rand(3, 9, 13, generator=gen, dtype=torch.float64)).clamp(0, 1)
    torch.testing.assert_close(ssim(x, y), torch.tensor(naive_ssim(x, y), dtype=torch.float64),
                               atol=1e-12, rtol=0)  # measured 2e-16
    assert abs(float(ssim(x, x)) - 1.0) < 1e-12
    assert float(ssim(x, y)) < 0.99
    batched = ssim(torch.stack([x, x]), torch.stack([y, y]))
    torch.testing.assert_close(batched, ssim(x, y))
    with pytest.raises(ValueError, match="same shape"):
        ssim(x, y[:, :5])


def test_ssim_gradcheck():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 6, 7, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: ssim(a, y, window_size=5), (x,))
    assert torch.autograd.gradcheck(lambda a: rgb_loss(a, y), (x,))


def test_nearest_neighbor_distances_match_brute_force_across_chunks():
    gen = torch.Generator().manual_seed(2)
    points = torch.randn(37, 3, generator=gen, dtype=torch.float64)
    dist2 = ((points[:, None] - points[None]) ** 2).sum(-1)
    dist2.fill_diagonal_(float("inf"))
    expected = dist2.sort(dim=1).values[:, :3].mean(1)
    torch.testing.assert_close(nearest_neighbor_distances(points, k=3, chunk_size=8), expected)


def test_from_points_initialisation_follows_3dgs():
    points = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3]])
    rgb = torch.tensor([[0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    model = FeatureGaussians.from_points(points, rgb, vit_width=8, sh_degree=2)
    dist2 = torch.tensor([(1 + 4 + 9) / 3, (1 + 5 + 10) / 3, (4 + 5 + 13) / 3, (9 + 10 + 13) / 3])
    torch.testing.assert_close(model.scales, dist2.sqrt()[:, None].expand(4, 3))
    torch.testing.assert_close(model.opacities, torch.full((4,), 0.1))
    torch.testing.assert_close(model.sh_dc[:, 0] * 0.28209479177387814 + 0.5, rgb)
    assert model.sh_rest.shape == (4, 8, 3) and model.sh_rest.abs().sum() == 0
    assert model.features.shape == (4, 64) and model.features.abs().sum() == 0
    assert model.up_projection.weight.shape == (8, 64, 3, 3) and model.up_projection.bias is None


def _model_with_adam_state(n=3):
    means = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])[:n]
    model = FeatureGaussians(means, torch.full((n, 3), 0.5), torch.zeros(n, 3), vit_width=4, feature_dim=5,
                             sh_degree=1)
    optimizer = build_optimizer(model, GaussianSchedule(), extent=1.0)
    for p in model.parameters():  # one Adam step with distinct gradients fills the moments
        p.grad = torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) + 1.0
    optimizer.step()
    return model, optimizer


def _assert_state_consistent(model, optimizer):
    groups = {g["name"]: g for g in optimizer.param_groups}
    for name in PER_GAUSSIAN:
        param = getattr(model, name)
        assert groups[name]["params"][0] is param
        state = optimizer.state[param]
        assert state["exp_avg"].shape == param.shape and state["exp_avg_sq"].shape == param.shape
        assert param.shape[0] == model.num_gaussians
    for name in ("grad_accum", "grad_count", "max_radii"):
        assert getattr(model, name).shape == (model.num_gaussians,)


def test_densify_clones_small_and_splits_large_gaussians_with_consistent_optimizer_state():
    model, optimizer = _model_with_adam_state()
    with torch.no_grad():
        model.log_scales[1] = math.log(0.5)  # large (> 0.01 * extent): will be split
        model.log_scales[0] = math.log(0.001)  # small: will be cloned
        model.log_scales[2] = math.log(0.5)  # large but low gradient: untouched
    old_avg = {name: optimizer.state[getattr(model, name)]["exp_avg"].clone() for name in PER_GAUSSIAN}
    old_means, old_scales = model.means.detach().clone(), model.scales.detach().clone()
    grads = torch.tensor([[1e-3, 0.0], [0.0, 1e-3], [1e-6, 0.0]])
    accumulate_densification_stats(model, grads, torch.tensor([3, 3, 3]), width=2, height=2)
    events = densify(model, optimizer, grad_threshold=2e-4, extent=1.0, generator=torch.Generator().manual_seed(0))
    assert events == {"cloned": 1, "split": 1}
    assert model.num_gaussians == 5  # 3 + 1 clone + 2 children - 1 split parent
    _assert_state_consistent(model, optimizer)
    # kept Gaussians (0 and 2) come first, with their moments; the clone of 0, then the two children
    torch.testing.assert_close(model.means[:2].detach(), old_means[[0, 2]])
    torch.testing.assert_close(model.means[2].detach(), old_means[0])
    torch.testing.assert_close(model.scales[3:].detach(), old_scales[[1, 1]] / 1.6)
    assert not torch.allclose(model.means[3], model.means[4])
    for name in PER_GAUSSIAN:
        avg = optimizer.state[getattr(model, name)]["exp_avg"]
        torch.testing.assert_close(avg[:2], old_avg[name][[0, 2]])
        assert avg[2:].abs().sum() == 0
    assert model.grad_accum.abs().sum() == 0 and model.grad_count.abs().sum() == 0
    for p in model.parameters():  # the optimizer still steps after the resize
        p.grad = torch.ones_like(p)
    optimizer.step()


def test_densify_respects_the_gaussian_budget_by_largest_gradient():
    model, optimizer = _model_with_adam_state()
    grads = torch.tensor([[1e-3, 0.0], [0.0, 3e-3], [2e-3, 0.0]])
    accumulate_densification_stats(model, grads, torch.tensor([3, 3, 3]), width=2, height=2)
    old_means = model.means.detach().clone()
    events = densify(model, optimizer, grad_threshold=2e-4, extent=100.0, max_gaussians=5)
    assert events == {"cloned": 2, "split": 0} and model.num_gaussians == 5
    torch.testing.assert_close(model.means[3:].detach(), old_means[[1, 2]])  # the two largest gradients
    _assert_state_consistent(model, optimizer)


def test_prune_removes_transparent_and_huge_gaussians():
    model, optimizer = _model_with_adam_state()
    with torch.no_grad():
        model.opacity_logits[0] = -10.0  # opacity 4.5e-5 < 0.005
        model.log_scales[1] = math.log(0.05)
        model.log_scales[2] = math.log(0.5)  # > 0.1 * extent when the size rule is active
    kept_avg = optimizer.state[model.means]["exp_avg"][1].clone()
    kept_mean = model.means[1].detach().clone()
    assert prune(model, optimizer, min_opacity=0.005, extent=10.0) == 1
    assert model.num_gaussians == 2
    _assert_state_consistent(model, optimizer)
    torch.testing.assert_close(optimizer.state[model.means]["exp_avg"][0], kept_avg)
    assert prune(model, optimizer, min_opacity=0.005, extent=1.0, max_screen_size=20.0) == 1
    torch.testing.assert_close(model.means.detach(), kept_mean[None])
    _assert_state_consistent(model, optimizer)


def test_reset_opacity_clamps_and_clears_moments():
    model, optimizer = _model_with_adam_state()
    with torch.no_grad():
        model.opacity_logits[1] = -6.0
    reset_opacity(model, optimizer)
    expected = torch.tensor([0.01, float(torch.sigmoid(torch.tensor(-6.0))), 0.01])
    torch.testing.assert_close(model.opacities.detach(), expected)
    assert optimizer.state[model.opacity_logits]["exp_avg"].abs().sum() == 0


def test_schedule_scaling_and_position_lr():
    schedule = GaussianSchedule().scaled(300)
    assert (schedule.densify_from, schedule.densify_until, schedule.densification_interval) == (5, 150, 10)
    assert (schedule.opacity_reset_interval, schedule.sh_increase_interval) == (100, 10)
    paper = GaussianSchedule().scaled(30_000)
    assert (paper.densification_interval, paper.opacity_reset_interval) == (100, 3000)
    assert math.isclose(position_lr(0, schedule, 2.0), 3.2e-4)
    assert math.isclose(position_lr(300, schedule, 2.0), 3.2e-6)
    assert math.isclose(position_lr(150, schedule, 1.0), math.sqrt(1.6e-4 * 1.6e-6))


def _tiny_scene(n=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    points = torch.rand(n, 3, generator=gen) * 2 - 1
    rgb = torch.rand(n, 3, generator=gen)
    model = FeatureGaussians.from_points(points, rgb, vit_width=6, feature_dim=4, sh_degree=1)
    viewmat = look_at(torch.tensor([0.0, -0.5, -4.0]), torch.zeros(3), torch.tensor([0.0, -1.0, 0.0]))
    K = intrinsics(24.0, 24.0, 12.0, 10.0)
    return model, viewmat, K


def test_feature_loss_gives_zero_gradient_to_geometry():
    model, viewmat, K = _tiny_scene()
    with torch.no_grad():
        model.features.normal_()
        model.log_scales.add_(0.3 * torch.randn(model.log_scales.shape))  # anisotropic: rotations matter
    target = torch.randn(6, 20, 24)
    loss = feature_loss(render_features(model, viewmat, K, 24, 20), target)
    loss.backward()
    for name in ("means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest"):
        grad = getattr(model, name).grad
        assert grad is None or grad.abs().max() == 0, name
    assert model.features.grad.abs().max() > 0
    assert model.up_projection.weight.grad.abs().max() > 0
    out = render_rgb(model, viewmat, K, 24, 20)  # the RGB loss, by contrast, reaches every parameter
    rgb_loss(out["render"].permute(2, 0, 1), torch.rand(3, 20, 24)).backward()
    for name in ("means", "log_scales", "quats", "opacity_logits", "sh_dc"):
        assert getattr(model, name).grad.abs().max() > 0, name
    assert out["means2d"].grad.abs().max() > 0


def test_save_load_round_trip(tmp_path):
    model, viewmat, K = _tiny_scene()
    with torch.no_grad():
        model.features.normal_()
        model.sh_rest.normal_()
    model.active_sh_degree = 1
    save_scene(model, tmp_path / "scene.pt")
    loaded = load_scene(tmp_path / "scene.pt")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, atol=0, rtol=0)
    assert loaded.active_sh_degree == 1 and loaded.max_sh_degree == 1
    torch.testing.assert_close(render_rgb(loaded, viewmat, K, 24, 20)["render"],
                               render_rgb(model, viewmat, K, 24, 20)["render"])


def test_tiny_scene_fit_lowers_rgb_and_feature_losses():
    model, viewmat, K = _tiny_scene(seed=3)
    target_rgb = torch.zeros(3, 20, 24)
    target_rgb[0, :, :12] = 0.9  # left half red, right half blue
    target_rgb[2, :, 12:] = 0.9
    target_features = torch.randn(6, 1, 1).expand(6, 20, 24)
    schedule = GaussianSchedule().scaled(60)
    optimizer = build_optimizer(model, schedule, extent=1.0)
    for group in optimizer.param_groups:  # speed up the feature part for this tiny test
        if group["name"] in ("features", "up_projection"):
            group["lr"] = 0.05
    losses = []
    for _ in range(60):
        rgb = render_rgb(model, viewmat, K, 24, 20)["render"].permute(2, 0, 1)
        features = render_features(model, viewmat, K, 24, 20)
        loss_rgb, loss_features = rgb_loss(rgb, target_rgb), feature_loss(features, target_features)
        losses.append((float(loss_rgb.detach()), float(loss_features.detach())))
        optimizer.zero_grad()
        (loss_rgb + loss_features).backward()
        optimizer.step()
    assert losses[-1][0] < 0.8 * losses[0][0]  # measured 0.50 -> 0.37 with the 3DGS learning rates
    assert losses[-1][1] < 0.6 * losses[0][1]


def test_load_scene_never_suggests_weights_only_false(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x80\x04not a pickle" * 20)
    with pytest.raises(ValueError, match="not a valid checkpoint") as info:
        load_scene(path)
    assert "weights_only" not in str(info.value) and str(path) in str(info.value)


def test_densification_statistics_and_adam_never_absorb_non_finite_values():
    model, optimizer = _model_with_adam_state()
    grad = torch.tensor([[1e-3, 0.0], [float("nan"), 1.0], [float("inf"), 0.0]])
    accumulate_densification_stats(model, grad, torch.tensor([[2, 2], [3, 3], [0, 0]]), 20, 10)
    assert torch.isfinite(model.grad_accum).all() and model.grad_count.tolist() == [1.0, 0.0, 0.0]
    assert model.max_radii.tolist() == [2.0, 3.0, 0.0]  # the radius is still seen
    before = {name: getattr(model, name).detach().clone() for name in PER_GAUSSIAN}
    for param in model.parameters():
        param.grad = torch.full_like(param, float("nan"))
    optimizer.step()  # non-finite gradients are zeroed before the step
    for name in PER_GAUSSIAN:
        param = getattr(model, name)
        assert torch.isfinite(param).all(), name
        assert all(torch.isfinite(moment).all() for moment in optimizer.state[param].values()), name
    assert torch.isfinite(model.means).all() and before["means"].shape == model.means.shape


def test_quaternions_share_the_renderers_normalisation():
    """densify's rotations come from splatting.quaternion_to_rotation (no second copy), robust to tiny q."""
    from minimal3d import gaussians, splatting

    assert gaussians.quaternion_to_rotation is splatting.quaternion_to_rotation
    assert gaussians.SH_C0 is splatting.SH_C0 or gaussians.SH_C0 == splatting.SH_C0
    q = torch.tensor([[0.3, -0.2, 0.5, 0.1]])
    for factor in (1e-30, 1.0, 1e30):
        rotation = splatting.quaternion_to_rotation(q * factor)
        torch.testing.assert_close(rotation, splatting.quaternion_to_rotation(q), atol=1e-6, rtol=0)
        torch.testing.assert_close(rotation @ rotation.mT, torch.eye(3)[None], atol=1e-6, rtol=0)
