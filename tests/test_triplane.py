"""minimal3d.triplane against naive per-ray loop references, the fast path against the readable one,
gradcheck and analytic cases (bad inputs: tests/test_bad_inputs.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from minimal3d import triplane
from minimal3d.triplane import (PLANE_AXES, TriplaneDecoder, TriplaneGenerator, composite, ray_box_intersection,
                                render_triplane, sample_importance, sample_pdf, sample_triplane)

D = torch.float64


# ---------------------------------------------------------------------------------------------------
# Naive references: Python loops over points, samples and rays, straight from the README conventions
# ---------------------------------------------------------------------------------------------------


def naive_bilinear(plane, u, v):
    """plane (C, H, W); u along W, v along H in [-1, 1]; align_corners=False; zero outside."""
    channels, height, width = plane.shape
    x = ((u + 1) * width - 1) / 2
    y = ((v + 1) * height - 1) / 2
    x0, y0 = math.floor(x), math.floor(y)
    out = plane.new_zeros(channels)
    for xi, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
        for yi, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
            if 0 <= xi < width and 0 <= yi < height:
                out = out + wx * wy * plane[:, yi, xi]
    return out


def naive_sample_triplane(planes, points, box_size, plane_axes):
    batch, _, channels = planes.shape[:3]
    out = planes.new_zeros(batch, 3, points.shape[1], channels)
    for b in range(batch):
        for k, (a0, a1) in enumerate(PLANE_AXES[plane_axes]):
            for m in range(points.shape[1]):
                q = points[b, m] * 2 / box_size
                out[b, k, m] = naive_bilinear(planes[b, k], float(q[a0]), float(q[a1]))
    return out


def naive_composite(colors, raw_sigma, t, shift=-1.0, white=False, far=None):
    """One ray at a time: colors (R, S, 3), raw_sigma (R, S), t (R, S). Product transmittance."""
    rgbs, depths, opacities = [], [], []
    for r in range(t.shape[0]):
        transmittance, rgb, depth_sum, opacity = 1.0, 0.0, 0.0, 0.0
        for i in range(t.shape[1] - 1):
            sigma = F.softplus((raw_sigma[r, i] + raw_sigma[r, i + 1]) / 2 + shift)
            alpha = 1 - torch.exp(-sigma * (t[r, i + 1] - t[r, i]))
            weight = alpha * transmittance
            rgb = rgb + weight * (colors[r, i] + colors[r, i + 1]) / 2
            depth_sum = depth_sum + weight * (t[r, i] + t[r, i + 1]) / 2
            opacity = opacity + weight
            transmittance = transmittance * (1 - alpha)
        depth = depth_sum / opacity if opacity > 0 else (t[r, -1] if far is None else torch.as_tensor(far, dtype=t.dtype))
        rgbs.append(rgb + (1 - opacity) if white else rgb)
        depths.append(depth)
        opacities.append(opacity)
    return torch.stack(rgbs), torch.stack(depths).reshape(-1, 1), torch.stack(opacities).reshape(-1, 1)


def naive_sample_pdf(bins, weights, u):
    """One row at a time, linear search instead of searchsorted."""
    out = torch.empty_like(u)
    for r in range(u.shape[0]):
        w = weights[r] + 1e-5
        cdf = [0.0]
        for value in w / w.sum():
            cdf.append(cdf[-1] + float(value))
        n = len(w)
        for j, uj in enumerate(u[r].tolist()):
            k = sum(1 for c in cdf if c <= uj)  # searchsorted(right=True)
            lo, hi = max(k - 1, 0), min(k, n)
            denom = cdf[hi] - cdf[lo]
            denom = 1.0 if denom < 1e-5 else denom
            out[r, j] = bins[r, lo] + (uj - cdf[lo]) / denom * (bins[r, hi] - bins[r, lo])
    return out


def naive_importance(depths, weights, u):
    rows = []
    for r in range(depths.shape[0]):
        w = weights[r].tolist()
        m = [max(w[max(i - 1, 0)], w[min(i, len(w) - 1)]) for i in range(len(w) + 1)]  # max_pool1d(2, 1, pad=1)
        a = [(m[i] + m[i + 1]) / 2 + 0.01 for i in range(len(w))]  # avg_pool1d(2, 1) + 0.01
        mids = [(depths[r, i] + depths[r, i + 1]) / 2 for i in range(depths.shape[1] - 1)]
        rows.append((torch.stack(mids[:-1]), torch.tensor(a[1:-1], dtype=depths.dtype)))
    return naive_sample_pdf(torch.stack([b for b, _ in rows]), torch.stack([w for _, w in rows]), u)


def tiny_decoder(features):
    """A smooth fixed decoder for float64 checks: (…, C) -> raw_sigma (…, 1), rgb (…, 3)."""
    raw_sigma = 4 * features[..., :1] + features[..., 1:2] ** 2
    rgb = torch.sigmoid(features[..., :3] * torch.tensor([1.0, -2.0, 0.5], dtype=features.dtype))
    return raw_sigma, rgb


def naive_render(planes, decoder, origins, directions, near, far, t_samples, box, axes):
    """Sample positions given (R, K, sorted): loops over rays and samples, naive lookup and march."""
    batch, rays = origins.shape[:2]
    rgb, depth, opacity = [], [], []
    for b in range(batch):
        colors = torch.zeros(rays, t_samples.shape[-1], 3, dtype=planes.dtype)
        raw = torch.zeros(rays, t_samples.shape[-1], dtype=planes.dtype)
        for r in range(rays):
            for k in range(t_samples.shape[-1]):
                point = origins[b, r] + t_samples[b, r, k] * directions[b, r]
                features = naive_sample_triplane(planes[b:b + 1], point.reshape(1, 1, 3), box, axes).mean(1)[0, 0]
                raw_k, rgb_k = decoder(features)
                raw[r, k], colors[r, k] = raw_k[0], rgb_k
        out = naive_composite(colors, raw, t_samples[b], far=far)
        rgb.append(out[0]), depth.append(out[1]), opacity.append(out[2])
    return torch.stack(rgb), torch.stack(depth), torch.stack(opacity)


def random_rays(batch, rays, dtype=D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    origins = torch.tensor([0.0, 0.0, -1.5], dtype=dtype).expand(batch, rays, 3).clone()
    directions = torch.randn(batch, rays, 3, generator=gen, dtype=dtype) * 0.3 + torch.tensor([0, 0, 1.0], dtype=dtype)
    return origins, F.normalize(directions, dim=-1)


# ---------------------------------------------------------------------------------------------------
# Naive-reference comparisons
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plane_axes", ["xy_yz_zx", "eg3d"])
def test_sample_triplane_matches_naive(plane_axes):
    gen = torch.Generator().manual_seed(1)
    planes = torch.randn(2, 3, 4, 5, 7, generator=gen, dtype=D)  # non-square: u must run along W
    points = (torch.rand(2, 20, 3, generator=gen, dtype=D) - 0.5) * 1.6  # some points outside the 1.2 box
    got = sample_triplane(planes, points, 1.2, plane_axes)
    assert_close(got, naive_sample_triplane(planes, points, 1.2, plane_axes), rtol=1e-12, atol=1e-12)


def test_sample_triplane_outside_the_cube_is_eg3ds():
    """EG3D's zero padding: a plane reads 0 only beyond half a texel outside its edge; a point outside the
    cube still reads the planes its projection falls on."""
    planes = torch.ones(1, 3, 2, 4, 4, dtype=D)  # texel size 0.5 in q, so half a texel is 0.25
    points = torch.tensor([[[0.1, 0.2, 5.0],  # far outside along z: only the (x, y) plane sees it
                            [0.55, 0.0, 0.0],  # q_x = 1.1: inside the outer half texel of x, fading
                            [0.65, 0.0, 0.0],  # q_x = 1.3: beyond it on every plane that reads x
                            [0.0, 0.0, 0.0]]], dtype=D)
    got = sample_triplane(planes, points, 1.0, "xy_yz_zx")[0, :, :, 0]  # (3 planes, 4 points)
    assert_close(got[:, 0], torch.tensor([1.0, 0.0, 0.0], dtype=D))
    assert_close(got[:, 1], torch.tensor([0.3, 1.0, 0.3], dtype=D))  # x = (1.1 + 1) * 2 - 0.5 = 3.7: 0.3 of texel 3
    assert_close(got[:, 2], torch.tensor([0.0, 1.0, 0.0], dtype=D))
    assert_close(got[:, 3], torch.ones(3, dtype=D))


def test_composite_matches_naive():
    gen = torch.Generator().manual_seed(2)
    rays, samples = 6, 7
    t = torch.sort(torch.rand(rays, samples, generator=gen, dtype=D) * 2 + 1, -1).values
    raw_sigma = torch.randn(rays, samples, generator=gen, dtype=D) * 3
    raw_sigma[0] = -1e4  # an empty ray: zero weight, depth = far
    colors = torch.rand(rays, samples, 3, generator=gen, dtype=D)
    for white in (False, True):
        rgb, depth, opacity, weights = composite(colors, raw_sigma, t, white_background=white, far=5.0)
        expected = naive_composite(colors, raw_sigma, t, white=white, far=5.0)
        for got, want in zip((rgb, depth, opacity), expected):
            assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert depth[0, 0] == 5.0 and opacity[0, 0] == 0
        assert_close(weights.sum(-1, keepdim=True), opacity)


def test_sample_pdf_and_importance_match_naive():
    gen = torch.Generator().manual_seed(3)
    rows, n, count = 9, 6, 11
    bins = torch.sort(torch.rand(rows, n + 1, generator=gen, dtype=D), -1).values
    weights = torch.rand(rows, n, generator=gen, dtype=D)
    weights[0] = 0  # an all-zero pdf is uniform after + 1e-5
    weights[1] = torch.tensor([0, 0, 1.0, 0, 0, 0], dtype=D)  # one-hot: every sample lands in bin 2
    u = torch.rand(rows, count, generator=gen, dtype=D)
    u[:, 0], u[:, -1] = 0.0, 1.0
    got = sample_pdf(bins, weights, u)
    assert_close(got, naive_sample_pdf(bins, weights, u), rtol=1e-12, atol=1e-12)
    inner = (u[1] > 1e-4) & (u[1] < 1 - 1e-4)
    assert ((got[1][inner] >= bins[1, 2]) & (got[1][inner] <= bins[1, 3])).all()
    depths = torch.sort(torch.rand(rows, 8, generator=gen, dtype=D), -1).values
    march_weights = torch.rand(rows, 7, generator=gen, dtype=D)
    fine = sample_importance(depths, march_weights, u)
    assert_close(fine, naive_importance(depths, march_weights, u), rtol=1e-12, atol=1e-12)
    mids = (depths[:, 1:] + depths[:, :-1]) / 2  # EG3D's slice: samples stay in [tm_0, tm_{S-3}]
    assert ((fine >= mids[:, :1] - 1e-12) & (fine <= mids[:, -2:-1] + 1e-12)).all()


@pytest.mark.parametrize("num_importance", [0, 4])
def test_render_matches_naive(num_importance):
    gen = torch.Generator().manual_seed(4)
    planes = torch.randn(2, 3, 4, 6, 6, generator=gen, dtype=D)
    origins, directions = random_rays(2, 5, seed=4)
    jitter = torch.rand(2, 5, 6, generator=gen, dtype=D)
    u = torch.rand(2, 5, num_importance, generator=gen, dtype=D) if num_importance else None
    out = render_triplane(planes, tiny_decoder, origins, directions, 0.8, 2.2, num_samples=6,
                          num_importance=num_importance, box_size=1.5, jitter=jitter, importance_u=u)
    # the naive renderer gets the sample positions: coarse from the EG3D formula, fine from the naive sampler
    t = 0.8 + (torch.arange(6, dtype=D) + jitter) * (1.4 / 5)
    if num_importance:
        raw, rgb = [], []
        for b in range(2):
            features = naive_sample_triplane(planes[b:b + 1], (origins[b, :, None] + t[b, ..., None] * directions[b, :, None]).reshape(1, -1, 3), 1.5, "xy_yz_zx").mean(1)
            raw_b, rgb_b = tiny_decoder(features[0])
            raw.append(raw_b.reshape(5, 6)), rgb.append(rgb_b.reshape(5, 6, 3))
        weights = [naive_composite_weights(rgb[b], raw[b], t[b]) for b in range(2)]
        fine = torch.stack([naive_importance(t[b], weights[b], u[b]) for b in range(2)])
        t = torch.sort(torch.cat([t, fine], -1), -1).values
    rgb, depth, opacity = naive_render(planes, tiny_decoder, origins, directions, 0.8, 2.2, t, 1.5, "xy_yz_zx")
    assert_close(out["rgb"], rgb, rtol=1e-10, atol=1e-12)
    assert_close(out["depth"], depth, rtol=1e-10, atol=1e-12)
    assert_close(out["opacity"], opacity, rtol=1e-10, atol=1e-12)


def naive_composite_weights(colors, raw_sigma, t):
    weights = torch.zeros(t.shape[0], t.shape[1] - 1, dtype=t.dtype)
    for r in range(t.shape[0]):
        transmittance = 1.0
        for i in range(t.shape[1] - 1):
            sigma = F.softplus((raw_sigma[r, i] + raw_sigma[r, i + 1]) / 2 - 1)
            alpha = 1 - torch.exp(-sigma * (t[r, i + 1] - t[r, i]))
            weights[r, i] = alpha * transmittance
            transmittance = transmittance * (1 - alpha)
    return weights


@pytest.mark.parametrize("plane_axes", ["xy_yz_zx", "eg3d"])
@pytest.mark.parametrize("sorted_scatter", [True, False])
def test_fast_lookup_matches_grid_sample(plane_axes, sorted_scatter, monkeypatch):
    """The fast lookup (bordered table, embedding_bag forward, in blocks of points; the backward as sorted
    sparse products (CPU) or index_add_ (other devices)) equals grid_sample + mean over planes, forward
    and backward, also on and beyond the edges."""
    monkeypatch.setattr(triplane, "CPU_LOOKUP_ROWS", 7)  # several blocks per batch element, a short last one
    monkeypatch.setattr(triplane, "CPU_SCATTER_ROWS", 6)
    monkeypatch.setattr(triplane, "SORTED_SCATTER_DEVICES", ("cpu",) if sorted_scatter else ())
    gen = torch.Generator().manual_seed(11)
    planes = torch.randn(2, 3, 4, 5, 6, generator=gen, dtype=D, requires_grad=True)  # H != W
    edges = torch.tensor([-1.0, -1 + 1 / 6, 1 - 1 / 6, 1.0, -1.2, 1.2, 7.0, -30.0, 0.0], dtype=D)
    points = torch.cat([(torch.rand(2, 20, 3, generator=gen, dtype=D) - 0.5) * 1.3,  # inside and just outside
                        edges.view(1, 9, 1).expand(2, 9, 3) * 0.5,  # on the plane edges, texel centres, far away
                        torch.stack([edges * 0.5, edges.flip(0) * 0.5, edges.roll(3) * 0.5], -1).expand(2, 9, 3)], 1)
    uv = triplane._project(points, 1.0, PLANE_AXES[plane_axes])
    table = triplane._plane_table(planes)
    ours = triplane._MeanPlaneFeatures.apply(table, uv, 5, 6)  # (B*M, C)
    expected = sample_triplane(planes, points, 1.0, plane_axes).mean(1).reshape(-1, 4)
    assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(expected.shape, generator=gen, dtype=D)
    grad_ours = torch.autograd.grad((ours * weights).sum(), planes)[0]
    grad_expected = torch.autograd.grad((expected * weights).sum(), planes)[0]
    assert_close(grad_ours, grad_expected, rtol=1e-12, atol=1e-12)
    nan_uv = uv.clone()
    nan_uv[0, 0, 0, 0] = float("nan")  # no index error: the point reads the zero border of its planes
    assert torch.isfinite(triplane._MeanPlaneFeatures.apply(table, nan_uv, 5, 6)).all()


@pytest.mark.parametrize("num_importance, white, chunk", [(0, False, None), (5, True, None), (5, False, 3)])
def test_fast_path_equals_readable_path(num_importance, white, chunk, monkeypatch):
    """render_triplane(fast=True) against fast=False in float64: outputs and every gradient."""
    monkeypatch.setattr(triplane, "CPU_DECODER_ROWS", 50)  # several decoder and lookup blocks
    monkeypatch.setattr(triplane, "CPU_LOOKUP_ROWS", 40)
    monkeypatch.setattr(triplane, "CPU_SCATTER_ROWS", 90)
    gen = torch.Generator().manual_seed(12)
    planes = torch.randn(2, 3, 5, 7, 6, generator=gen, dtype=D, requires_grad=True)
    decoder = TriplaneDecoder(feature_dim=5, hidden_dim=9).double()
    origins, directions = random_rays(2, 70, seed=12)  # 70 rays: padded to 128 on the fast path
    kwargs = dict(num_samples=7, num_importance=num_importance, box_size=1.3, plane_axes="eg3d",
                  jitter=torch.rand(2, 70, 7, generator=gen, dtype=D), white_background=white, chunk_rays=chunk,
                  importance_u=torch.rand(2, 70, num_importance, generator=gen, dtype=D) if num_importance else None)
    outputs, grads = [], []
    for fast in (False, True):
        out = render_triplane(planes, decoder, origins, directions, 0.6, 2.4, fast=fast, **kwargs)
        loss = (out["rgb"] * torch.linspace(-1, 1, 3, dtype=D)).sum() + out["depth"].sum() + out["opacity"].sum()
        outputs.append(out), grads.append(torch.autograd.grad(loss, [planes, *decoder.parameters()]))
    for key in outputs[0]:
        assert_close(outputs[1][key], outputs[0][key], rtol=1e-12, atol=1e-12)
    for fast_grad, readable_grad in zip(grads[1], grads[0]):
        assert_close(fast_grad, readable_grad, rtol=1e-10, atol=1e-12)


def test_fast_is_the_automatic_choice_without_position_gradients(monkeypatch):
    calls = []
    monkeypatch.setattr(triplane, "_fast_query", lambda *args: calls.append("fast") or triplane._query(*args))
    planes = torch.randn(1, 3, 3, 4, 4, dtype=D)
    origins, directions = random_rays(1, 3)
    render_triplane(planes, tiny_decoder, origins, directions, 1.0, 2.0, num_samples=4, num_importance=0)
    assert calls == ["fast"]
    render_triplane(planes, tiny_decoder, origins, directions.requires_grad_(), 1.0, 2.0, num_samples=4,
                    num_importance=0)  # a gradient to the sample positions: the grid_sample path
    render_triplane(planes, tiny_decoder, origins, directions.detach(), 1.0, 2.0, num_samples=4, num_importance=0,
                    fast=False)  # the readable path on request, whatever requires grad
    assert calls == ["fast"]
    with pytest.raises(ValueError, match="fast=True"):
        render_triplane(planes, tiny_decoder, origins, directions.requires_grad_(), 1.0, 2.0, fast=True)


# ---------------------------------------------------------------------------------------------------
# Gradients in float64
# ---------------------------------------------------------------------------------------------------


def test_gradcheck_sample_triplane():
    gen = torch.Generator().manual_seed(5)
    planes = torch.randn(1, 3, 2, 3, 4, generator=gen, dtype=D, requires_grad=True)
    points = ((torch.rand(1, 4, 3, generator=gen, dtype=D) - 0.5) * 0.9).requires_grad_(True)
    for axes in ("xy_yz_zx", "eg3d"):
        assert torch.autograd.gradcheck(lambda p, x: sample_triplane(p, x, 1.0, axes), (planes, points))


def test_gradcheck_composite():
    gen = torch.Generator().manual_seed(6)
    colors = torch.rand(3, 5, 3, generator=gen, dtype=D, requires_grad=True)
    raw_sigma = torch.randn(3, 5, generator=gen, dtype=D, requires_grad=True)
    t = torch.sort(torch.rand(3, 5, generator=gen, dtype=D), -1).values.add(1).requires_grad_(True)
    for white in (False, True):
        assert torch.autograd.gradcheck(lambda c, s, z: composite(c, s, z, white_background=white)[:3],
                                        (colors, raw_sigma, t))


@pytest.mark.parametrize("fast", [False, True])
def test_gradcheck_render_triplane(fast):
    """Through the public wrapper: planes and every decoder weight (the fast path's own MLP backward)
    and, on the grid_sample path, the ray directions too."""
    gen = torch.Generator().manual_seed(7)
    planes = torch.randn(1, 3, 3, 4, 4, generator=gen, dtype=D, requires_grad=True)
    decoder = TriplaneDecoder(feature_dim=3, hidden_dim=4).double()
    origins, directions = random_rays(1, 3, seed=7)
    directions.requires_grad_(not fast)
    jitter, u = torch.rand(1, 3, 4, generator=gen, dtype=D), torch.rand(1, 3, 2, generator=gen, dtype=D)
    params = {name: p.detach().clone().requires_grad_() for name, p in decoder.named_parameters()}

    class Render(torch.nn.Module):  # functional_call swaps the gradcheck inputs in as the decoder's weights
        def __init__(self):
            super().__init__()
            self.decoder = decoder

        def forward(self, p, d):
            out = render_triplane(p, self.decoder, origins, d, 1.0, 2.0, num_samples=4, num_importance=2,
                                  jitter=jitter, importance_u=u, fast=fast)
            return out["rgb"], out["depth"], out["opacity"]

    module = Render()

    def render(p, d, *weights):
        return torch.func.functional_call(module, {f"decoder.{n}": w for n, w in zip(params, weights)}, (p, d))

    assert torch.autograd.gradcheck(render, (planes, directions, *params.values()))


# ---------------------------------------------------------------------------------------------------
# Chunking, analytic cases, robustness
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cpu_block_rows", [None, (96, 80)])
def test_chunked_is_bit_identical(cpu_block_rows, monkeypatch):
    if cpu_block_rows:  # decoder and lookup blocks that cut through the rays at other places than the chunks
        monkeypatch.setattr(triplane, "CPU_DECODER_ROWS", cpu_block_rows[0])
        monkeypatch.setattr(triplane, "CPU_LOOKUP_ROWS", cpu_block_rows[1])
    gen = torch.Generator().manual_seed(8)
    planes = torch.randn(2, 3, 8, 16, 16, generator=gen, requires_grad=True)
    decoder = TriplaneDecoder(feature_dim=8)
    origins, directions = random_rays(2, 150, dtype=torch.float32, seed=8)
    kwargs = dict(num_samples=8, num_importance=8, jitter=torch.rand(2, 150, 8, generator=gen),
                  importance_u=torch.rand(2, 150, 8, generator=gen))
    full = render_triplane(planes, decoder, origins, directions, 0.5, 2.5, **kwargs)
    for chunk in (7, 16, 64):
        with torch.no_grad():
            chunked = render_triplane(planes, decoder, origins, directions, 0.5, 2.5, chunk_rays=chunk, **kwargs)
        for key in full:
            assert torch.equal(full[key], chunked[key]), key
    # with gradients: checkpointed chunks, the same forward and the same gradients (summed in another order)
    grad_full = torch.autograd.grad(full["rgb"].sum() + full["depth"].sum(), planes)[0]
    chunked = render_triplane(planes, decoder, origins, directions, 0.5, 2.5, chunk_rays=64, **kwargs)
    assert torch.equal(full["rgb"], chunked["rgb"])
    grad_chunked = torch.autograd.grad(chunked["rgb"].sum() + chunked["depth"].sum(), planes)[0]
    assert_close(grad_chunked, grad_full, rtol=1e-5, atol=1e-6)


def test_constant_density_and_colour():
    """Constant raw density s over [near, far]: opacity = 1 - exp(-softplus(s - 1) (far - near)); rgb = c * opacity."""
    planes = torch.zeros(1, 3, 2, 4, 4, dtype=D)
    colour = torch.tensor([0.2, 0.5, 0.9], dtype=D)

    def decoder(features):
        return torch.full_like(features[..., :1], 0.7), colour.expand(*features.shape[:-1], 3)

    origins, directions = random_rays(1, 4, seed=9)
    out = render_triplane(planes, decoder, origins, directions, 1.0, 3.0, num_samples=9, num_importance=5)
    assert_close(out["rgb"], colour * out["opacity"], rtol=1e-12, atol=1e-12)
    zero_jitter = render_triplane(planes, decoder, origins, directions, 1.0, 3.0, num_samples=9, num_importance=0,
                                  jitter=torch.zeros((), dtype=D))
    opacity = 1 - torch.exp(-F.softplus(torch.tensor(0.7 - 1.0, dtype=D)) * 2.0)  # marched length far - near
    assert_close(zero_jitter["opacity"], opacity.expand(1, 4, 1), rtol=1e-12, atol=1e-12)
    assert_close(zero_jitter["depth"].min(), zero_jitter["depth"].max())  # same on every ray


def test_empty_missing_and_huge_density_rays_are_finite():
    planes = torch.randn(1, 3, 4, 8, 8, requires_grad=True)
    decoder = TriplaneDecoder(feature_dim=4)
    origins, directions = random_rays(1, 6, dtype=torch.float32)
    origins = origins + torch.tensor([0.0, 0, 0, 5, 5, 5]).reshape(1, 6, 1) * torch.tensor([1.0, 0, 0])
    start, end = ray_box_intersection(origins, directions, 1.0)  # the last 3 rays pass beside the box
    assert (end[:, 3:] < start[:, 3:]).all() and (end[:, :3] > start[:, :3]).all()
    for scale in (-1e4, 0.0, 1e6, 1e30):  # zero density, the decoder as is, huge densities
        def dec(features, scale=scale):
            raw, rgb = decoder(features)
            return (raw * 0 + scale) if scale else raw, rgb
        out = render_triplane(planes, dec, origins, directions, 0.1, 4.0, num_samples=8, num_importance=8)
        loss = sum(value.sum() for value in out.values() if value.dtype.is_floating_point)
        grads = torch.autograd.grad(loss, [planes, *decoder.parameters()], allow_unused=True)
        assert all(torch.isfinite(value).all() for value in out.values())
        assert all(g is None or torch.isfinite(g).all() for g in grads)
        if scale == -1e4:
            assert (out["opacity"] == 0).all() and (out["depth"] == 4.0).all()
        if scale >= 1e6:
            assert_close(out["opacity"], torch.ones_like(out["opacity"]))


def test_stratified_depths():
    """EG3D's linspace (both ends) + jitter * step; one sample has the single step far - near."""
    jitter = torch.tensor([0.0, 0.5, 0.25, 0.0], dtype=D)
    assert_close(triplane.stratified_depths(1.0, 4.0, 4, jitter), torch.tensor([1.0, 2.5, 3.25, 4.0], dtype=D))
    near, far = torch.tensor([[1.0]], dtype=D), torch.tensor([[4.0]], dtype=D)
    assert_close(triplane.stratified_depths(near, far, 4, jitter), torch.tensor([[1.0, 2.5, 3.25, 4.0]], dtype=D))
    assert_close(triplane.stratified_depths(1.0, 4.0, 1, torch.tensor([0.5], dtype=D)), torch.tensor([2.5], dtype=D))
    assert_close(triplane.stratified_depths(near, far, 1, torch.zeros(1, 1, dtype=D)), near)


def test_check_false_skips_only_the_value_checks():
    planes = torch.zeros(1, 3, 4, 8, 8)
    origins, directions = random_rays(1, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="directions"):
        render_triplane(planes, TriplaneDecoder(4), origins, directions * 2, 1.0, 2.0)
    out = render_triplane(planes, TriplaneDecoder(4), origins, directions * 2, 1.0, 2.0, check=False)
    assert all(torch.isfinite(value).all() for value in out.values())
    with pytest.raises(ValueError, match="origins"):  # shape checks stay on
        render_triplane(planes, TriplaneDecoder(4), origins[..., :2], directions, 1.0, 2.0, check=False)


def test_decoder_matches_formula():
    decoder = TriplaneDecoder(feature_dim=5, hidden_dim=7)
    features = torch.randn(4, 5)
    raw_sigma, rgb = decoder(features)
    hidden = F.softplus(features @ decoder.fc1.weight.T + decoder.fc1.bias)
    out = hidden @ decoder.fc2.weight.T + decoder.fc2.bias
    assert_close(raw_sigma, out[:, :1])
    assert_close(rgb, torch.sigmoid(out[:, 1:]) * 1.002 - 0.001)
    assert (rgb > -0.001).all() and (rgb < 1.001).all()


@pytest.mark.parametrize("cpu_block_rows", [8192, 4])
def test_fast_decoder_mlp_matches_autograd_and_gradcheck(cpu_block_rows, monkeypatch):
    # The fast path's decoder MLP has its own backward (keeps only the input), block by block of rows
    # (4: three blocks, the last one short): against autograd through TriplaneDecoder's nn.Linear
    # layers, and numerically with gradcheck.
    monkeypatch.setattr(triplane, "CPU_DECODER_ROWS", cpu_block_rows)
    decoder = TriplaneDecoder(feature_dim=5, hidden_dim=7).double()
    features = torch.randn(10, 5, dtype=D, requires_grad=True)
    weights = [decoder.fc1.weight, decoder.fc1.bias, decoder.fc2.weight, decoder.fc2.bias]
    grad_out = torch.randn(10, 4, dtype=D)
    ours = triplane._DecoderMLP.apply(features, *weights)
    expected = decoder.fc2(F.softplus(decoder.fc1(features)))
    assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(ours, [features, *weights], grad_out),
                         torch.autograd.grad(expected, [features, *weights], grad_out)):
        assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(triplane._DecoderMLP.apply, (features, *weights))


def test_generator_shapes_and_token_order_invariance():
    torch.manual_seed(0)
    generator = TriplaneGenerator(input_dim=12, plane_channels=4, plane_resolution=16, embed_resolution=4,
                                  dim=16, num_heads=2, num_layers=1)
    tokens = torch.randn(2, 10, 12)
    planes = generator(tokens)
    assert planes.shape == (2, 3, 4, 16, 16)
    # cross-attention without positions on the memory: permuting h's tokens changes nothing
    assert_close(generator(tokens[:, torch.randperm(10)]), planes, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(generator(tokens[:1]), generator(tokens[1:]))
    planes.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in generator.parameters())


def _naive_attention(q, k, v, heads):
    """Multi-head softmax attention written out: q (B, N, W), k, v (B, M, W) -> (B, N, W)."""
    batch, n, width = q.shape
    q, k, v = (t.reshape(batch, -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(batch, n, width)


@pytest.mark.parametrize("self_attention", [True, False])
def test_generator_block_against_written_out_attention(self_attention):
    torch.manual_seed(0)
    block = triplane._AttentionBlock(dim=8, num_heads=2, self_attention=self_attention).double()
    x, memory = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    expected = x
    if self_attention:  # x += SelfAttn(x) (§3.4), then the cross-attention of the triplane tokens to h
        q, k, v = block.qkv(block.norm_self(expected)).chunk(3, dim=-1)
        expected = expected + block.proj_self(_naive_attention(q, k, v, 2))
    else:
        assert not any(name.startswith(("qkv", "proj_self", "norm_self")) for name, _ in block.named_parameters())
    k, v = block.to_kv(block.norm_kv(memory)).chunk(2, dim=-1)
    expected = expected + block.proj(_naive_attention(block.to_q(block.norm_q(expected)), k, v, 2))
    expected = expected + block.mlp(block.norm_mlp(expected))
    assert_close(block(x, memory), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# torch.compile gives the same numbers (slow)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_matches_eager():
    gen = torch.Generator().manual_seed(10)
    planes = torch.randn(1, 3, 8, 16, 16, generator=gen)
    decoder = TriplaneDecoder(feature_dim=8)
    origins, directions = random_rays(1, 64, dtype=torch.float32, seed=10)
    kwargs = dict(num_samples=8, num_importance=8, jitter=torch.rand(1, 64, 8, generator=gen),
                  importance_u=torch.rand(1, 64, 8, generator=gen))

    def render(p):
        return render_triplane(p, decoder, origins, directions, 1.0, 2.0, **kwargs)

    eager = render(planes)
    compiled = torch.compile(render)(planes)
    for key in eager:
        assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-5)


def test_generator_patch_grid_adds_each_patch_to_its_place_on_the_xy_plane():
    """patch_grid (a CPU deviation, not the paper's Φ): with no attention blocks and an embedding grid the size
    of the patch grid, plane 0 is norm(embedding + proj(patch)) at the patch's own row and column, planes 1, 2
    do not see the patches."""
    torch.manual_seed(0)
    grid, dim = 3, 8
    generator = TriplaneGenerator(input_dim=5, plane_channels=2, plane_resolution=grid, embed_resolution=grid,
                                  dim=dim, num_heads=2, num_layers=0, patch_grid=grid).double()
    tokens = torch.randn(2, 1 + grid * grid, 5, dtype=torch.float64)  # [class; patches row-major]
    planes = generator(tokens)
    conv = generator.upsample[-1]  # no upsampling: only the 1x1 projection to the plane channels
    for b in range(2):
        for k in range(3):
            for row in range(grid):
                for col in range(grid):
                    x = generator.embeddings[k * grid * grid + row * grid + col]
                    if k == 0:
                        x = x + generator.patch_proj(tokens[b, 1 + row * grid + col])
                    expected = conv.weight[:, :, 0, 0] @ generator.norm(x) + conv.bias
                    assert_close(planes[b, k, :, row, col], expected, rtol=1e-10, atol=1e-12)
    other = tokens.clone()
    other[:, 1:] = torch.randn_like(other[:, 1:])
    assert_close(generator(other)[:, 1:], planes[:, 1:])
    assert not torch.allclose(generator(other)[:, 0], planes[:, 0])
    with pytest.raises(ValueError, match="patch_grid"):
        TriplaneGenerator(5, 2, 4, 4, 8, 2, 1, patch_grid=0)
    with pytest.raises(ValueError, match="patch grid"):
        generator(tokens[:, :4])
