"""Speed and memory of minimal3d.triplane.render_triplane against a straightforward EG3D-style renderer.

Config (issue 4): B=2, 3 x 32 x 128 x 128 planes, 64 x 64 rays, 16 + 16 samples, the OSGDecoder MLP
(32 -> 64 -> 1 + 3). The baseline below is written the way EG3D's ImportanceRenderer does it (plane
projection through inverse axis matrices, per-sample view directions, mean over planes inside the decoder,
equalized-lr layers, a coarse march with a graph, cumprod transmittance, nan_to_num and a global clamp),
with the same decoder sizes, so the ratio measures the renderer. Both get the same planes, rays and random
draws, and the script checks that they agree.

Timings: median of --repeats runs after a warm-up (torch.cuda.synchronize around them on CUDA).
Peak memory of one forward+backward: CUDA: torch.cuda.max_memory_allocated above the inputs. CPU: the
peak of live tensor bytes above the inputs, replayed from torch.profiler's allocation and free events
(the allocator's caching and fragmentation are not counted, unlike a resident-set-size measure).

    python benchmarks/bench_triplane.py            # the issue's config + a 256 x 256 chunked render
    python benchmarks/bench_triplane.py --quick    # seconds
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimal3d import cameras  # noqa: E402
from minimal3d.triplane import TriplaneDecoder, render_triplane  # noqa: E402
from minimal3d.runtime import format_table  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# Baseline: a straightforward renderer in EG3D's style
# ---------------------------------------------------------------------------------------------------

EG3D_PLANE_AXES = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                                [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
                                [[0, 0, 1], [1, 0, 0], [0, 1, 0]]], dtype=torch.float32)
FIXED_PLANE_AXES = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                                 [[0, 1, 0], [0, 0, 1], [1, 0, 0]],
                                 [[0, 0, 1], [1, 0, 0], [0, 1, 0]]], dtype=torch.float32)


def baseline_sample_from_planes(plane_axes, planes, coordinates, box_warp):
    n, n_planes, c, h, w = planes.shape
    _, m, _ = coordinates.shape
    coordinates = (2 / box_warp) * coordinates
    coords = coordinates.unsqueeze(1).expand(-1, n_planes, -1, -1).reshape(n * n_planes, m, 3)
    inv_axes = torch.linalg.inv(plane_axes).unsqueeze(0).expand(n, -1, -1, -1).reshape(n * n_planes, 3, 3)
    projected = torch.bmm(coords, inv_axes)[..., :2].unsqueeze(1)
    features = F.grid_sample(planes.view(n * n_planes, c, h, w), projected.float(), mode="bilinear",
                             padding_mode="zeros", align_corners=False)
    return features.permute(0, 3, 2, 1).reshape(n, n_planes, m, c)


class BaselineFC(torch.nn.Module):
    """EG3D FullyConnectedLayer with equalized learning rate (lr_multiplier 1)."""

    def __init__(self, fan_in, fan_out):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(fan_out, fan_in))
        self.bias = torch.nn.Parameter(torch.zeros(fan_out))
        self.weight_gain = 1 / fan_in ** 0.5

    def forward(self, x):
        return torch.addmm(self.bias.unsqueeze(0), x, (self.weight * self.weight_gain).t())


class BaselineOSGDecoder(torch.nn.Module):
    def __init__(self, channels, hidden=64, out=3):
        super().__init__()
        self.fc1, self.fc2 = BaselineFC(channels, hidden), BaselineFC(hidden, 1 + out)

    def forward(self, sampled_features, ray_directions):
        x = sampled_features.mean(1)
        n, m, c = x.shape
        x = self.fc2(F.softplus(self.fc1(x.view(n * m, c)))).view(n, m, -1)
        rgb = torch.sigmoid(x[..., 1:]) * (1 + 2 * 0.001) - 0.001
        return {"rgb": rgb, "sigma": x[..., 0:1]}


def baseline_march(colors, densities, depths, white_back=False):
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
    densities_mid = (densities[:, :, :-1] + densities[:, :, 1:]) / 2
    depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
    densities_mid = F.softplus(densities_mid - 1)
    alpha = 1 - torch.exp(-densities_mid * deltas)
    alpha_shifted = torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], -2)
    weights = alpha * torch.cumprod(alpha_shifted, -2)[:, :, :-1]
    composite_rgb = torch.sum(weights * colors_mid, -2)
    weight_total = weights.sum(2)
    composite_depth = torch.sum(weights * depths_mid, -2) / weight_total
    composite_depth = torch.nan_to_num(composite_depth, float("inf"))
    composite_depth = torch.clamp(composite_depth, torch.min(depths), torch.max(depths))
    if white_back:
        composite_rgb = composite_rgb + 1 - weight_total
    return composite_rgb * 2 - 1, composite_depth, weights


def baseline_sample_pdf(bins, weights, u, eps=1e-5):
    n_rays, n_samples = weights.shape
    weights = weights + eps
    pdf = weights / torch.sum(weights, -1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)
    inds = torch.searchsorted(cdf, u.contiguous(), right=True)
    below, above = torch.clamp_min(inds - 1, 0), torch.clamp_max(inds, n_samples)
    inds_sampled = torch.stack([below, above], -1).view(n_rays, -1)
    cdf_g = torch.gather(cdf, 1, inds_sampled).view(n_rays, -1, 2)
    bins_g = torch.gather(bins, 1, inds_sampled).view(n_rays, -1, 2)
    denom = cdf_g[..., 1] - cdf_g[..., 0]
    denom[denom < eps] = 1
    return bins_g[..., 0] + (u - cdf_g[..., 0]) / denom * (bins_g[..., 1] - bins_g[..., 0])


def baseline_render(planes, decoder, ray_origins, ray_directions, near, far, num_samples, num_importance,
                    jitter, importance_u, box_warp=1.0, plane_axes=FIXED_PLANE_AXES):
    batch, rays, _ = ray_origins.shape
    depths = torch.linspace(near, far, num_samples).reshape(1, 1, num_samples, 1).repeat(batch, rays, 1, 1)
    depths = depths + jitter.unsqueeze(-1) * ((far - near) / (num_samples - 1))

    def run(depths_k):
        k = depths_k.shape[2]
        coordinates = (ray_origins.unsqueeze(-2) + depths_k * ray_directions.unsqueeze(-2)).reshape(batch, -1, 3)
        directions = ray_directions.unsqueeze(-2).expand(-1, -1, k, -1).reshape(batch, -1, 3)
        out = decoder(baseline_sample_from_planes(plane_axes, planes, coordinates, box_warp), directions)
        return out["rgb"].reshape(batch, rays, k, -1), out["sigma"].reshape(batch, rays, k, 1)

    colors, densities = run(depths)
    _, _, weights = baseline_march(colors, densities, depths)
    with torch.no_grad():
        z = depths.reshape(batch * rays, num_samples)
        w = weights.reshape(batch * rays, -1)
        w = F.max_pool1d(w.unsqueeze(1).float(), 2, 1, padding=1)
        w = F.avg_pool1d(w, 2, 1).squeeze() + 0.01
        z_mid = 0.5 * (z[:, :-1] + z[:, 1:])
        fine = baseline_sample_pdf(z_mid, w[:, 1:-1], importance_u.reshape(batch * rays, -1))
        fine = fine.detach().reshape(batch, rays, num_importance, 1)
    colors_fine, densities_fine = run(fine)
    all_depths = torch.cat([depths, fine], -2)
    all_colors = torch.cat([colors, colors_fine], -2)
    all_densities = torch.cat([densities, densities_fine], -2)
    _, indices = torch.sort(all_depths, dim=-2)
    all_depths = torch.gather(all_depths, -2, indices)
    all_colors = torch.gather(all_colors, -2, indices.expand(-1, -1, -1, all_colors.shape[-1]))
    all_densities = torch.gather(all_densities, -2, indices.expand(-1, -1, -1, 1))
    rgb, depth, weights = baseline_march(all_colors, all_densities, all_depths)
    return rgb, depth, weights.sum(2)


# ---------------------------------------------------------------------------------------------------
# Setup and measurement
# ---------------------------------------------------------------------------------------------------


def make_inputs(batch, channels, plane_res, image_res, num_samples, num_importance, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    planes = (torch.randn(batch, 3, channels, plane_res, plane_res, generator=gen) * 0.5).to(device)
    ours = TriplaneDecoder(channels).to(device)
    baseline = BaselineOSGDecoder(channels).to(device)
    with torch.no_grad():  # the same function: fold the equalized-lr gain into our plain weights
        ours.fc1.weight.copy_(baseline.fc1.weight * baseline.fc1.weight_gain)
        ours.fc2.weight.copy_(baseline.fc2.weight * baseline.fc2.weight_gain)
    eye = torch.tensor([[0.0, -0.6, -2.7]]).expand(batch, 3)  # FFHQ-like: radius 2.7, looking at the origin
    viewmat = cameras.look_at(eye, torch.zeros(batch, 3), torch.tensor([[0.0, -1.0, 0.0]]).expand(batch, 3))
    K = cameras.fov_intrinsics(0.23, image_res, image_res)  # ~13 degrees: the box fills the image
    origins, directions = cameras.pixel_rays(viewmat, K.expand(batch, 3, 3), image_res, image_res)
    rays = image_res * image_res
    jitter = torch.rand(batch, rays, num_samples, generator=gen)
    u = torch.rand(batch, rays, num_importance, generator=gen)
    return [x.to(device) for x in (planes, origins, directions, jitter, u)] + [ours, baseline]


def make_calls(args, device, chunk_rays=None):
    planes, origins, directions, jitter, u, ours, baseline = make_inputs(
        args.batch, args.channels, args.plane_res, args.image_res, args.samples, args.importance, device)
    ours_keep_hidden = TriplaneDecoder(args.channels, recompute=False).to(device)
    ours_keep_hidden.load_state_dict(ours.state_dict())

    def renderer(decoder):
        def run():
            out = render_triplane(planes, decoder, origins, directions, args.near, args.far, args.samples,
                                  args.importance, jitter=jitter, importance_u=u, chunk_rays=chunk_rays)
            return out["rgb"] * 2 - 1, out["depth"], out["opacity"]
        return run

    def run_baseline():
        return baseline_render(planes, baseline, origins, directions, args.near, args.far, args.samples,
                               args.importance, jitter, u)

    return planes, {"minimal3d": renderer(ours), "minimal3d recompute=False": renderer(ours_keep_hidden),
                    "baseline (EG3D-style)": run_baseline}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, repeats):
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def passes(fn, planes):
    def forward():
        with torch.no_grad():
            fn()

    def forward_grad():
        fn()

    def forward_backward():
        planes.grad = None
        rgb, depth, opacity = fn()
        (rgb.square().mean() + depth.mean() + opacity.mean()).backward()

    return {"forward (no_grad)": forward, "forward (grad)": forward_grad, "forward+backward": forward_backward}


def peak_memory_mb(args, device, name, chunk_rays=None):
    """Peak memory of one forward+backward above what was allocated before it.

    CUDA: torch.cuda.max_memory_allocated. CPU: the peak of live tensor bytes, replayed from the
    profiler's allocation / free events (the allocator's caching and fragmentation do not count).
    """
    planes, calls = make_calls(args, device, chunk_rays)
    planes.requires_grad_(True)
    run = passes(calls[name], planes)["forward+backward"]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    live = peak = 0
    for event in sorted(prof.profiler.function_events, key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage  # + allocations, - frees of each op (children counted separately)
        peak = max(peak, live)
    return peak / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--plane-res", type=int, default=128)
    parser.add_argument("--image-res", type=int, default=64)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--importance", type=int, default=16)
    parser.add_argument("--near", type=float, default=2.25)
    parser.add_argument("--far", type=float, default=3.3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--big-res", type=int, default=256, help="side of the chunked single-image render")
    parser.add_argument("--chunk", type=int, default=4096, help="chunk_rays for the big render")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    args = parser.parse_args()
    if args.quick:
        args.plane_res, args.image_res, args.repeats, args.big_res, args.chunk = 64, 24, 3, 64, 1024
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() and args.device != "cpu" else [])
    print(f"B={args.batch}, planes 3x{args.channels}x{args.plane_res}^2, rays {args.image_res}^2, "
          f"{args.samples}+{args.importance} samples, torch {torch.__version__}, threads {torch.get_num_threads()}")

    for device in devices:
        planes, calls = make_calls(args, device)
        with torch.no_grad():
            ours, base = calls["minimal3d"](), calls["baseline (EG3D-style)"]()
        agree = max((a - b).abs().max().item() for a, b in zip(ours, base))
        print(f"\n[{device.type}] max |minimal3d - baseline| over rgb, depth, opacity: {agree:.2e}")
        rows, times = [], {}
        for name, fn in calls.items():
            for pass_name, run in passes(fn, planes.requires_grad_(True)).items():
                times[name, pass_name] = median_time(run, device, args.repeats)
        for pass_name in passes(calls["minimal3d"], planes):
            ours_t, base_t = times["minimal3d", pass_name], times["baseline (EG3D-style)", pass_name]
            recompute_t = times["minimal3d recompute=False", pass_name]
            rows.append({"pass": pass_name, "minimal3d": f"{ours_t * 1e3:.0f} ms",
                         "minimal3d recompute=False": f"{recompute_t * 1e3:.0f} ms",
                         "baseline (EG3D-style)": f"{base_t * 1e3:.0f} ms",
                         "ratio": f"{base_t / ours_t:.2f}x / {base_t / recompute_t:.2f}x faster"})
        memory = {name: peak_memory_mb(args, device, name) for name in calls}
        rows.append({"pass": "peak memory fwd+bwd", "minimal3d": f"{memory['minimal3d']:.0f} MB",
                     "minimal3d recompute=False": f"{memory['minimal3d recompute=False']:.0f} MB",
                     "baseline (EG3D-style)": f"{memory['baseline (EG3D-style)']:.0f} MB",
                     "ratio": f"{memory['baseline (EG3D-style)'] / memory['minimal3d']:.2f}x / "
                              f"{memory['baseline (EG3D-style)'] / memory['minimal3d recompute=False']:.2f}x less"})
        print(format_table(rows))

        # One big image (B=1), 16 + 16 samples: unchunked vs chunk_rays (checkpointed chunks in backward)
        big = argparse.Namespace(**{**vars(args), "batch": 1, "image_res": args.big_res})
        rows = []
        for chunk in (None, args.chunk):
            planes, calls = make_calls(big, device, chunk)
            fwd_bwd = passes(calls["minimal3d"], planes.requires_grad_(True))["forward+backward"]
            seconds = median_time(fwd_bwd, device, max(1, args.repeats // 3))
            mem = peak_memory_mb(big, device, "minimal3d", chunk)
            rows.append({"single image fwd+bwd": f"{args.big_res}^2 rays, chunk_rays={chunk}",
                         "time": f"{seconds * 1e3:.0f} ms", "peak memory": f"{mem:.0f} MB"})
        print(format_table(rows))


if __name__ == "__main__":
    main()
