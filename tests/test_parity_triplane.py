"""Parity of minimal3d.triplane with EG3D's own renderer outputs (tests/data/triplane/README.md).

Every file found in the reference folder is checked; sizes and options (S, N, ray limits, box_warp,
white background, jitter, uniforms, plane axes where stored) come from the file. Each render is checked
stage by stage, every stage fed the reference's own stored inputs (rays, coarse depths, decoder outputs at
the stored depths, coarse weights, fine depths from the stored weights, decoder outputs at the stored fine
depths, final march from the stored merged samples), and end to end (final outputs and gradients only)
through render_triplane on both the readable and the fast path.
EG3D maps rgb to [-1, 1]; minimal3d returns [0, 1], so rgb is compared as 2 * rgb - 1.
"""

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from minimal3d import cameras
from minimal3d.triplane import (PLANE_AXES, TriplaneDecoder, composite, project_onto_planes, ray_box_intersection,
                                render_triplane, sample_importance, sample_pdf, sample_triplane,
                                stratified_depths)
from refdata import load_reference, reference_dir

FILES = sorted(path.name for path in reference_dir("triplane").glob("*.npz"))
# README tolerances. Measured max abs errors on this machine are in the comments at each use.
DETERMINISTIC = dict(rtol=1e-4, atol=1e-4)
END_TO_END = dict(rtol=1e-3, atol=5e-4)
EXACT = dict(rtol=0.0, atol=0.0)
EXACT_FILES = {"render_empty.npz"}  # README: "render_empty: exact"


def files_with(*keys):
    return [name for name in FILES if set(keys) <= set(load_reference("triplane", name))]


def tensors(ref: dict) -> dict:
    return {key: torch.from_numpy(np.asarray(value)) for key, value in ref.items()}


def assert_grad_close(actual, expected):
    # README: rtol 1e-3, atol 1e-3 * max|reference| (measured: <= 1.1e-5 * max, grad_planes, both paths)
    assert_close(actual, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def eg3d_decoder(ref: dict) -> TriplaneDecoder:
    """OSGDecoder with the stored weights (EG3D's equalized-lr gain is already folded in)."""
    w1, w2 = ref["mlp_w1"], ref["mlp_w2"]
    decoder = TriplaneDecoder(feature_dim=w1.shape[1], hidden_dim=w1.shape[0], rgb_dim=w2.shape[0] - 1)
    with torch.no_grad():
        decoder.fc1.weight.copy_(w1), decoder.fc1.bias.copy_(ref["mlp_b1"])
        decoder.fc2.weight.copy_(w2), decoder.fc2.bias.copy_(ref["mlp_b2"])
    return decoder


def eg3d_rays(ref: dict, origins_key: str = "ray_origins"):
    """Rays from cam2world + EG3D's size-normalized intrinsics through cameras.pixel_rays."""
    res = int(ref["resolution"])
    K = ref["intrinsics"].clone()
    K[:, :2] *= res  # normalized -> pixels
    return cameras.pixel_rays(torch.linalg.inv(ref["cam2world"]), K, res, res)


def ray_limits(ref: dict):
    """Fixed limits, or EG3D's box intersection with misses filled in as EG3D does (README 8)."""
    if not bool(ref["opt_auto_ray_limits"]):
        return float(ref["opt_ray_start"]), float(ref["opt_ray_end"])
    start, end = ray_box_intersection(ref["ray_origins"], ref["ray_directions"], float(ref["opt_box_warp"]))
    hit = end > start
    start = torch.where(hit, start, start[hit].min())
    end = torch.where(hit, end, start[hit].max())  # sic: EG3D uses the largest *start*
    return start, end


def query(ref: dict, decoder, planes, t):
    """Decoder outputs at o + t d through the public sample_triplane: t (B, R, K)."""
    origins, directions = ref["ray_origins"], ref["ray_directions"]
    batch, rays, samples = t.shape
    points = (origins.unsqueeze(-2) + t.unsqueeze(-1) * directions.unsqueeze(-2)).reshape(batch, -1, 3)
    features = sample_triplane(planes, points, float(ref["opt_box_warp"]), "eg3d").mean(1)  # README 5
    raw_sigma, rgb = decoder(features)
    return raw_sigma.reshape(batch, rays, samples), rgb.reshape(batch, rays, samples, -1)


def axes_name(axes: torch.Tensor) -> str:
    """Our name of EG3D-style plane axes (3, 3, 3): plane k keeps components 0, 1 of q @ inverse(axes[k]),
    i.e. the world axes that the first two columns of the inverse pick."""
    inverse = torch.linalg.inv(axes.double())
    picked = tuple(tuple(int(inverse[k, :, column].abs().argmax()) for column in range(2)) for k in range(3))
    names = [name for name, value in PLANE_AXES.items() if value == picked]
    assert names, f"plane axes {picked} are neither of {PLANE_AXES}"
    return names[0]


@pytest.mark.parametrize("name", files_with("coordinates", "planes"))
def test_sample_planes(name):
    ref = tensors(load_reference("triplane", name))
    box = float(ref["box_warp"])
    q = ref["coordinates"] * (2 / box)
    for axes_key, features_keys in (("plane_axes_eg3d", ("features_eg3d", "features_odd_eg3d")),
                                    ("plane_axes_fixed", ("features_fixed",))):
        plane_axes = axes_name(ref[axes_key])
        # EG3D projects q @ inverse(axes[k]) and keeps 2 components; our index tables must agree
        expected = torch.stack([(q @ torch.linalg.inv(ref[axes_key][k]))[..., :2] for k in range(3)], 1)
        assert_close(project_onto_planes(ref["coordinates"], box, plane_axes), expected, **DETERMINISTIC)
        if axes_key == "plane_axes_eg3d":  # measured: 0 (bitwise)
            assert_close(project_onto_planes(ref["coordinates"], box, plane_axes), ref["projected_eg3d"],
                         **DETERMINISTIC)
        for key in features_keys:  # measured: 0 (bitwise)
            planes = ref["planes_odd" if "odd" in key else "planes"]
            assert_close(sample_triplane(planes, ref["coordinates"], box, plane_axes), ref[key], **DETERMINISTIC)


@pytest.mark.parametrize("name", files_with("box_t_start", "box_t_end"))
def test_rays_and_box_limits(name):
    ref = tensors(load_reference("triplane", name))
    origins, directions = eg3d_rays(ref)
    # measured: 2.4e-7 (origins), 1.2e-7 (directions)
    assert_close(origins, ref["ray_origins"], **DETERMINISTIC)
    assert_close(directions, ref["ray_directions"], **DETERMINISTIC)
    box = float(ref["box_warp"])
    for prefix, o_key, d_key in (("", "ray_origins", "ray_directions"), ("extra_", "extra_origins", "extra_directions")):
        start, end = ray_box_intersection(ref[o_key], ref[d_key], box)
        # measured: 0 (misses give EG3D's -1 / -2 markers)
        assert_close(start, ref[prefix + "box_t_start"], **DETERMINISTIC)
        assert_close(end, ref[prefix + "box_t_end"], **DETERMINISTIC)


@pytest.mark.parametrize("name", files_with("bins", "pdf_weights", "u"))
def test_sample_pdf(name):
    ref = tensors(load_reference("triplane", name))
    rows, count = ref["u"].shape
    det_u = torch.linspace(0, 1, int(ref["n_importance"])).expand(rows, -1)  # EG3D det=True
    # measured: 0 for all three
    assert_close(sample_pdf(ref["bins"], ref["pdf_weights"], det_u), ref["samples_det"], **DETERMINISTIC)
    assert_close(sample_pdf(ref["bins"], ref["pdf_weights"], ref["u"]), ref["samples_u"], **DETERMINISTIC)
    assert_close(sample_importance(ref["z_vals"], ref["march_weights"], ref["u"]), ref["importance_depths"],
                 **DETERMINISTIC)


RENDER_INPUTS = {"planes", "mlp_w1", "mlp_b1", "mlp_w2", "mlp_b2", "cam2world", "intrinsics", "resolution",
                 "ray_origins", "ray_directions", "loss_weight_rgb", "loss_weight_depth", "opt_ray_start",
                 "opt_ray_end", "opt_auto_ray_limits", "opt_box_warp", "opt_depth_resolution",
                 "opt_depth_resolution_importance", "opt_white_back", "stratified_jitter", "importance_u"}
RENDER_PLANE_AXES = "eg3d"  # README convention 3: every render_* file uses EG3D's axes (stored nowhere else)


@pytest.mark.parametrize("name", files_with("planes", "mlp_w1", "rgb", "depth", "weight_sum"))
def test_render(name):
    """Stage by stage, each stage fed the reference's own stored inputs where the file has them; then
    end to end (the final outputs and gradients only) through render_triplane, readable and fast path."""
    ref = tensors(load_reference("triplane", name))
    checked = set()

    def check(key, actual, tol):
        if key not in ref:  # not every file stores every stage (render_empty keeps only the outputs)
            return
        assert_close(actual, ref[key].to(actual.dtype), **(EXACT if name in EXACT_FILES else tol),
                     msg=lambda m: f"{key}: {m}")
        checked.add(key)

    def stored(key, ours):
        """The reference's value of an intermediate (a later stage's input) if stored, else ours."""
        return ref[key][..., 0] if key in ref and ref[key].shape[-1] == 1 else ref.get(key, ours)

    decoder = eg3d_decoder(ref)
    batch, rays = ref["ray_origins"].shape[:2]
    num_samples = int(ref["opt_depth_resolution"])
    num_importance = int(ref["opt_depth_resolution_importance"])
    box, white = float(ref["opt_box_warp"]), bool(ref["opt_white_back"])
    jitter = ref["stratified_jitter"][..., 0] if "stratified_jitter" in ref else torch.zeros(batch, rays, num_samples)
    importance_u = ref["importance_u"].reshape(batch, rays, num_importance) if num_importance else None
    tol_final = END_TO_END if num_importance else DETERMINISTIC

    # Stage 1: rays from cam2world + intrinsics (measured <= 2.4e-7)
    for actual, key in zip(eg3d_rays(ref), ("ray_origins", "ray_directions")):
        assert_close(actual, ref[key], **DETERMINISTIC)
    # Stage 2: coarse depths from the ray limits and stored jitter (measured: 0)
    near, far = ray_limits(ref)
    check("depths_coarse", stratified_depths(near, far, num_samples, jitter).unsqueeze(-1), DETERMINISTIC)
    t_coarse = stored("depths_coarse", stratified_depths(near, far, num_samples, jitter))
    with torch.no_grad():
        # Stage 3: decoder outputs at the stored coarse depths (measured <= 2.4e-7 colours, 1.5e-5 raw sigma)
        raw_coarse, rgb_coarse = query(ref, decoder, ref["planes"], t_coarse)
        check("colors_coarse", rgb_coarse, DETERMINISTIC)
        check("sigma_coarse", raw_coarse.unsqueeze(-1), DETERMINISTIC)
        # Stage 4: the coarse march from the stored coarse samples (measured <= 6e-8)
        weights_coarse = composite(stored("colors_coarse", rgb_coarse), stored("sigma_coarse", raw_coarse),
                                   t_coarse, white_background=white)[3]
        check("weights_coarse", weights_coarse.unsqueeze(-1), DETERMINISTIC)
    if num_importance:
        # Stage 5: fine depths from the stored coarse depths and weights (measured: 0)
        t_fine = sample_importance(t_coarse, stored("weights_coarse", weights_coarse), importance_u)
        check("depths_fine", t_fine.unsqueeze(-1), DETERMINISTIC)
        # Stage 6: decoder at the stored fine depths, merged with the stored coarse samples
        # (measured: depths 0, colours <= 1.8e-7, raw sigma <= 1.5e-5)
        with torch.no_grad():
            raw_fine, rgb_fine = query(ref, decoder, ref["planes"], stored("depths_fine", t_fine))
        t_all, order = torch.sort(torch.cat([t_coarse, stored("depths_fine", t_fine)], -1), -1)
        rgb_all = torch.cat([stored("colors_coarse", rgb_coarse), rgb_fine], -2).gather(
            -2, order.unsqueeze(-1).expand(-1, -1, -1, rgb_fine.shape[-1]))
        raw_all = torch.cat([stored("sigma_coarse", raw_coarse), raw_fine], -1).gather(-1, order)
        check("depths_all", t_all.unsqueeze(-1), DETERMINISTIC)
        check("colors_all", rgb_all, DETERMINISTIC)
        check("sigma_all", raw_all.unsqueeze(-1), DETERMINISTIC)
        # Stage 7: the final march from the stored merged samples (measured <= 1.2e-6)
        rgb_ref, depth_ref, opacity_ref, weights_ref = composite(
            stored("colors_all", rgb_all), stored("sigma_all", raw_all), stored("depths_all", t_all),
            white_background=white)
        check("weights_all", weights_ref.unsqueeze(-1), DETERMINISTIC)
        assert_close(rgb_ref * 2 - 1, ref["rgb"], **DETERMINISTIC)
        assert_close(depth_ref, ref["depth"], **DETERMINISTIC)
        assert_close(opacity_ref, ref["weight_sum"], **DETERMINISTIC)

    # End to end through render_triplane, final outputs and gradients only, on both paths.
    # measured (both paths): rgb, depth, weight_sum <= 3.6e-6, render_empty 0
    for fast in (False, True):
        decoder.zero_grad()
        planes = ref["planes"].clone().requires_grad_(True)
        options = dict(num_samples=num_samples, num_importance=num_importance, box_size=box,
                       plane_axes=RENDER_PLANE_AXES, jitter=jitter, importance_u=importance_u, fast=fast)
        out = render_triplane(planes, decoder, ref["ray_origins"], ref["ray_directions"], near, far,
                              white_background=white, **options)
        check("rgb", out["rgb"] * 2 - 1, tol_final)
        check("depth", out["depth"], tol_final)
        check("weight_sum", out["opacity"], tol_final)
        if "rgb_white_back" in ref:
            with torch.no_grad():
                white_out = render_triplane(planes, decoder, ref["ray_origins"], ref["ray_directions"], near, far,
                                            white_background=True, **options)
            check("rgb_white_back", white_out["rgb"] * 2 - 1, tol_final)
        if "loss" in ref:
            loss = (((out["rgb"] * 2 - 1) * ref["loss_weight_rgb"]).sum()
                    + (out["depth"] * ref["loss_weight_depth"]).sum())
            check("loss", loss.double(), tol_final)  # measured: <= 2.7e-5 on |loss| = 45
            loss.backward()
            grads = {"grad_planes": planes.grad, "grad_mlp_w1": decoder.fc1.weight.grad,
                     "grad_mlp_b1": decoder.fc1.bias.grad, "grad_mlp_w2": decoder.fc2.weight.grad,
                     "grad_mlp_b2": decoder.fc2.bias.grad}
            for key, grad in grads.items():
                assert_grad_close(grad, ref[key])
                checked.add(key)
    assert set(ref) - RENDER_INPUTS - checked == set(), "stored outputs without a check"
