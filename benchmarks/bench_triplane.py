"""Speed and memory of minimal3d.triplane.render_triplane against EG3D's own renderer algorithm.

Config (3D-Prior's renderer at a training batch): B=2, 3 x 32 x 128 x 128 planes, 64 x 64 rays,
16 + 16 samples, the OSGDecoder MLP (32 -> 64 -> 1 + 3: 3D-Prior decodes rgb; EG3D's GAN decodes 32
features). The baseline is a transcription of EG3D's renderer (NVlabs/eg3d 7cf1fd1,
``training/volumetric_rendering/{renderer,ray_marcher}.py``: ``ImportanceRenderer``, ``MipRayMarcher2``,
``sample_from_planes``; ``OSGDecoder`` and StyleGAN2's equalized-lr ``FullyConnectedLayer``), written
here op for op in EG3D's order, with its fixed ray limits. Both draw their own random jitter and
uniforms in the timed runs; a check with shared draws confirms that they compute the same image.

What is timed is the default call of minimal3d (``render_triplane(planes, decoder, origins,
directions, near, far, 16, 16, plane_axes="eg3d")``: automatic fast path, value checks on; EG3D's axes
so that both read the same planes), next to the readable grid_sample path (``fast=False``). Timings: the passes of the renderers are interleaved
repeat by repeat, so that load on a shared machine hits them alike; the median of --repeats runs after a
warm-up, and the median (min-max) of the per-repeat ratios, in wall-clock and in process CPU time.
Peak memory of one forward+backward above the inputs: CUDA: torch.cuda.max_memory_allocated. CPU: the
peak of live tensor bytes, replayed from torch.profiler's allocation and free events (the allocator's caching is not counted, unlike a resident-set-size measure).

    python benchmarks/bench_triplane.py            # the config above
    python benchmarks/bench_triplane.py --quick    # seconds
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimal3d import cameras  # noqa: E402
from minimal3d.runtime import format_table  # noqa: E402
from minimal3d.triplane import TriplaneDecoder, render_triplane  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# Baseline: EG3D's renderer algorithm (ImportanceRenderer + MipRayMarcher2 + OSGDecoder), transcribed
# ---------------------------------------------------------------------------------------------------


def eg3d_generate_planes() -> torch.Tensor:
    """EG3D's plane axes: (x, y), (x, z), (z, x)."""
    return torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                         [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
                         [[0, 0, 1], [1, 0, 0], [0, 1, 0]]], dtype=torch.float32)


def eg3d_project_onto_planes(planes, coordinates):
    n, m, _ = coordinates.shape
    n_planes = planes.shape[0]
    coordinates = coordinates.unsqueeze(1).expand(-1, n_planes, -1, -1).reshape(n * n_planes, m, 3)
    inv_planes = torch.linalg.inv(planes).unsqueeze(0).expand(n, -1, -1, -1).reshape(n * n_planes, 3, 3)
    projections = torch.bmm(coordinates, inv_planes)
    return projections[..., :2]


def eg3d_sample_from_planes(plane_axes, plane_features, coordinates, box_warp):
    n, n_planes, c, h, w = plane_features.shape
    _, m, _ = coordinates.shape
    plane_features = plane_features.view(n * n_planes, c, h, w)
    coordinates = (2 / box_warp) * coordinates
    projected_coordinates = eg3d_project_onto_planes(plane_axes, coordinates).unsqueeze(1)
    output_features = F.grid_sample(plane_features, projected_coordinates.float(), mode="bilinear",
                                    padding_mode="zeros", align_corners=False)
    return output_features.permute(0, 3, 2, 1).reshape(n, n_planes, m, c)


class EG3DFullyConnectedLayer(torch.nn.Module):
    """StyleGAN2's FullyConnectedLayer with activation 'linear', lr_multiplier 1, bias_init 0."""

    def __init__(self, in_features, out_features, lr_multiplier=1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = torch.nn.Parameter(torch.zeros([out_features]))
        self.weight_gain = lr_multiplier / np.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x):
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype)
        if self.bias_gain != 1:
            b = b * self.bias_gain
        return torch.addmm(b.unsqueeze(0), x, w.t())


class EG3DOSGDecoder(torch.nn.Module):
    def __init__(self, n_features, output_dim=3):
        super().__init__()
        self.net = torch.nn.Sequential(EG3DFullyConnectedLayer(n_features, 64), torch.nn.Softplus(),
                                       EG3DFullyConnectedLayer(64, 1 + output_dim))

    def forward(self, sampled_features, ray_directions):
        sampled_features = sampled_features.mean(1)
        x = sampled_features
        n, m, c = x.shape
        x = x.view(n * m, c)
        x = self.net(x)
        x = x.view(n, m, -1)
        rgb = torch.sigmoid(x[..., 1:]) * (1 + 2 * 0.001) - 0.001
        sigma = x[..., 0:1]
        return {"rgb": rgb, "sigma": sigma}


def eg3d_ray_marcher(colors, densities, depths, rendering_options):
    """MipRayMarcher2.run_forward (clamp_mode 'softplus')."""
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
    densities_mid = (densities[:, :, :-1] + densities[:, :, 1:]) / 2
    depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
    densities_mid = F.softplus(densities_mid - 1)
    density_delta = densities_mid * deltas
    alpha = 1 - torch.exp(-density_delta)
    alpha_shifted = torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], -2)
    weights = alpha * torch.cumprod(alpha_shifted, -2)[:, :, :-1]
    composite_rgb = torch.sum(weights * colors_mid, -2)
    weight_total = weights.sum(2)
    composite_depth = torch.sum(weights * depths_mid, -2) / weight_total
    composite_depth = torch.nan_to_num(composite_depth, float("inf"))
    composite_depth = torch.clamp(composite_depth, torch.min(depths), torch.max(depths))
    if rendering_options.get("white_back", False):
        composite_rgb = composite_rgb + 1 - weight_total
    composite_rgb = composite_rgb * 2 - 1
    return composite_rgb, composite_depth, weights


class EG3DImportanceRenderer(torch.nn.Module):
    """ImportanceRenderer.forward for fixed ray_start / ray_end. ``jitter`` / ``importance_u`` replace
    EG3D's torch.rand_like / torch.rand draws when set (only for the agreement check)."""

    def __init__(self):
        super().__init__()
        self.plane_axes = eg3d_generate_planes()
        self.jitter = self.importance_u = None

    def forward(self, planes, decoder, ray_origins, ray_directions, rendering_options):
        self.plane_axes = self.plane_axes.to(ray_origins.device)
        depths_coarse = self.sample_stratified(ray_origins, rendering_options["ray_start"],
                                               rendering_options["ray_end"], rendering_options["depth_resolution"])
        batch_size, num_rays, samples_per_ray, _ = depths_coarse.shape
        sample_coordinates = (ray_origins.unsqueeze(-2) + depths_coarse * ray_directions.unsqueeze(-2)).reshape(batch_size, -1, 3)
        sample_directions = ray_directions.unsqueeze(-2).expand(-1, -1, samples_per_ray, -1).reshape(batch_size, -1, 3)
        out = self.run_model(planes, decoder, sample_coordinates, sample_directions, rendering_options)
        colors_coarse = out["rgb"].reshape(batch_size, num_rays, samples_per_ray, out["rgb"].shape[-1])
        densities_coarse = out["sigma"].reshape(batch_size, num_rays, samples_per_ray, 1)
        n_importance = rendering_options["depth_resolution_importance"]
        if n_importance > 0:
            _, _, weights = eg3d_ray_marcher(colors_coarse, densities_coarse, depths_coarse, rendering_options)
            depths_fine = self.sample_importance(depths_coarse, weights, n_importance)
            sample_directions = ray_directions.unsqueeze(-2).expand(-1, -1, n_importance, -1).reshape(batch_size, -1, 3)
            sample_coordinates = (ray_origins.unsqueeze(-2) + depths_fine * ray_directions.unsqueeze(-2)).reshape(batch_size, -1, 3)
            out = self.run_model(planes, decoder, sample_coordinates, sample_directions, rendering_options)
            colors_fine = out["rgb"].reshape(batch_size, num_rays, n_importance, out["rgb"].shape[-1])
            densities_fine = out["sigma"].reshape(batch_size, num_rays, n_importance, 1)
            all_depths, all_colors, all_densities = self.unify_samples(
                depths_coarse, colors_coarse, densities_coarse, depths_fine, colors_fine, densities_fine)
            rgb_final, depth_final, weights = eg3d_ray_marcher(all_colors, all_densities, all_depths, rendering_options)
        else:
            rgb_final, depth_final, weights = eg3d_ray_marcher(colors_coarse, densities_coarse, depths_coarse,
                                                               rendering_options)
        return rgb_final, depth_final, weights.sum(2)

    def run_model(self, planes, decoder, sample_coordinates, sample_directions, options):
        sampled_features = eg3d_sample_from_planes(self.plane_axes, planes, sample_coordinates, options["box_warp"])
        return decoder(sampled_features, sample_directions)

    def unify_samples(self, depths1, colors1, densities1, depths2, colors2, densities2):
        all_depths = torch.cat([depths1, depths2], dim=-2)
        all_colors = torch.cat([colors1, colors2], dim=-2)
        all_densities = torch.cat([densities1, densities2], dim=-2)
        _, indices = torch.sort(all_depths, dim=-2)
        all_depths = torch.gather(all_depths, -2, indices)
        all_colors = torch.gather(all_colors, -2, indices.expand(-1, -1, -1, all_colors.shape[-1]))
        all_densities = torch.gather(all_densities, -2, indices.expand(-1, -1, -1, 1))
        return all_depths, all_colors, all_densities

    def sample_stratified(self, ray_origins, ray_start, ray_end, depth_resolution):
        n, m, _ = ray_origins.shape
        depths_coarse = torch.linspace(ray_start, ray_end, depth_resolution, device=ray_origins.device)
        depths_coarse = depths_coarse.reshape(1, 1, depth_resolution, 1).repeat(n, m, 1, 1)
        depth_delta = (ray_end - ray_start) / (depth_resolution - 1)
        jitter = torch.rand_like(depths_coarse) if self.jitter is None else self.jitter.unsqueeze(-1)
        depths_coarse += jitter * depth_delta
        return depths_coarse

    def sample_importance(self, z_vals, weights, n_importance):
        with torch.no_grad():
            batch_size, num_rays, samples_per_ray, _ = z_vals.shape
            z_vals = z_vals.reshape(batch_size * num_rays, samples_per_ray)
            weights = weights.reshape(batch_size * num_rays, -1)
            weights = F.max_pool1d(weights.unsqueeze(1).float(), 2, 1, padding=1)
            weights = F.avg_pool1d(weights, 2, 1).squeeze()
            weights = weights + 0.01
            z_vals_mid = 0.5 * (z_vals[:, :-1] + z_vals[:, 1:])
            importance_z_vals = self.sample_pdf(z_vals_mid, weights[:, 1:-1], n_importance).detach()
            return importance_z_vals.reshape(batch_size, num_rays, n_importance, 1)

    def sample_pdf(self, bins, weights, n_importance, eps=1e-5):
        n_rays, n_samples = weights.shape
        weights = weights + eps
        pdf = weights / torch.sum(weights, -1, keepdim=True)
        cdf = torch.cumsum(pdf, -1)
        cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], -1)
        u = torch.rand(n_rays, n_importance, device=bins.device) if self.importance_u is None else self.importance_u
        u = u.contiguous()
        inds = torch.searchsorted(cdf, u, right=True)
        below = torch.clamp_min(inds - 1, 0)
        above = torch.clamp_max(inds, n_samples)
        inds_sampled = torch.stack([below, above], -1).view(n_rays, 2 * n_importance)
        cdf_g = torch.gather(cdf, 1, inds_sampled).view(n_rays, n_importance, 2)
        bins_g = torch.gather(bins, 1, inds_sampled).view(n_rays, n_importance, 2)
        denom = cdf_g[..., 1] - cdf_g[..., 0]
        denom[denom < eps] = 1
        return bins_g[..., 0] + (u - cdf_g[..., 0]) / denom * (bins_g[..., 1] - bins_g[..., 0])


# ---------------------------------------------------------------------------------------------------
# Setup and measurement
# ---------------------------------------------------------------------------------------------------

OURS, READABLE, EG3D = "minimal3d (default call)", "minimal3d fast=False", "EG3D renderer"


def make_setup(args, device, seed=0):
    """Planes, rays, both decoders holding the same function, and one callable per renderer."""
    gen = torch.Generator().manual_seed(seed)
    planes = (torch.randn(args.batch, 3, args.channels, args.plane_res, args.plane_res, generator=gen) * 0.5).to(device)
    eg3d_decoder = EG3DOSGDecoder(args.channels).to(device)
    decoder = TriplaneDecoder(args.channels).to(device)
    with torch.no_grad():  # the same function: fold EG3D's equalized-lr gain into plain nn.Linear weights
        for ours, theirs in ((decoder.fc1, eg3d_decoder.net[0]), (decoder.fc2, eg3d_decoder.net[2])):
            ours.weight.copy_(theirs.weight * theirs.weight_gain)
            ours.bias.copy_(theirs.bias)
    eye = torch.tensor([[0.0, -0.6, -2.7]]).expand(args.batch, 3)  # FFHQ-like: radius 2.7, looking at the origin
    viewmat = cameras.look_at(eye, torch.zeros(args.batch, 3), torch.tensor([[0.0, -1.0, 0.0]]).expand(args.batch, 3))
    K = cameras.fov_intrinsics(0.23, args.image_res, args.image_res)  # ~13 degrees: the box fills the image
    origins, directions = cameras.pixel_rays(viewmat, K.expand(args.batch, 3, 3), args.image_res, args.image_res)
    origins, directions = origins.to(device), directions.to(device)
    renderer = EG3DImportanceRenderer()
    options = dict(ray_start=args.near, ray_end=args.far, box_warp=1.0, depth_resolution=args.samples,
                   depth_resolution_importance=args.importance, white_back=False)

    def ours(fast=None):
        def run():  # rgb mapped to EG3D's [-1, 1] only for the comparison
            out = render_triplane(planes, decoder, origins, directions, args.near, args.far, args.samples,
                                  args.importance, plane_axes="eg3d", fast=fast)
            return out["rgb"], out["depth"], out["opacity"]
        return run

    def eg3d():
        return renderer(planes, eg3d_decoder, origins, directions, options)

    calls = {OURS: ours(), READABLE: ours(fast=False), EG3D: eg3d}
    return argparse.Namespace(planes=planes, decoder=decoder, eg3d_decoder=eg3d_decoder, renderer=renderer,
                              origins=origins, directions=directions, options=options, calls=calls)


def agreement(args, device) -> float:
    """Max |difference| of rgb (in [-1, 1]), depth and opacity between minimal3d and EG3D's renderer
    given the same random draws."""
    setup = make_setup(args, device)
    gen = torch.Generator().manual_seed(1)
    batch, rays = setup.origins.shape[:2]
    jitter = torch.rand(batch, rays, args.samples, generator=gen).to(device)
    u = torch.rand(batch, rays, args.importance, generator=gen).to(device)
    setup.renderer.jitter, setup.renderer.importance_u = jitter, u.reshape(batch * rays, -1)
    with torch.no_grad():
        theirs = setup.renderer(setup.planes, setup.eg3d_decoder, setup.origins, setup.directions, setup.options)
        out = render_triplane(setup.planes, setup.decoder, setup.origins, setup.directions, args.near, args.far,
                              args.samples, args.importance, plane_axes="eg3d", jitter=jitter, importance_u=u)
    ours = (out["rgb"] * 2 - 1, out["depth"], out["opacity"])
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs))


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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call (CPU time is what a shared machine disturbs least;
    with several threads it includes their spin-waiting)."""
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def peak_memory_mb(fn, planes, device) -> float:
    """Peak memory of one forward+backward above what was allocated before it."""
    run = passes(fn, planes)["forward+backward"]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--plane-res", type=int, default=None, help="default 128 (64 with --quick)")
    parser.add_argument("--image-res", type=int, default=None, help="default 64 (24 with --quick)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--importance", type=int, default=16)
    parser.add_argument("--near", type=float, default=2.25)
    parser.add_argument("--far", type=float, default=3.3)
    parser.add_argument("--repeats", type=int, default=None, help="default 7 (3 with --quick)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    args = parser.parse_args(argv)
    for name, normal, quick in (("plane_res", 128, 64), ("image_res", 64, 24), ("repeats", 7, 3)):
        if getattr(args, name) is None:  # an explicit flag is never overridden by --quick
            setattr(args, name, quick if args.quick else normal)
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    devices = ([torch.device("cpu")] if args.device != "cuda" else []) + ([torch.device("cuda")] if use_cuda else [])
    print(f"B={args.batch}, planes 3x{args.channels}x{args.plane_res}^2, rays {args.image_res}^2, "
          f"{args.samples}+{args.importance} samples, torch {torch.__version__}, threads {torch.get_num_threads()}")

    for device in devices:
        print(f"\n[{device.type}] max |minimal3d - EG3D| over rgb, depth, opacity (same draws): "
              f"{agreement(args, device):.2e}")
        setup = make_setup(args, device)
        planes = setup.planes.requires_grad_(True)
        runs = {name: passes(fn, planes) for name, fn in setup.calls.items()}
        rows = []
        for pass_name in runs[OURS]:
            times = {name: [] for name in runs}
            for name in runs:  # warm-up
                runs[name][pass_name]()
            for _ in range(args.repeats):  # interleaved: contention hits every renderer alike
                for name in runs:
                    times[name].append(timed(runs[name][pass_name], device))
            row = {"pass": pass_name}
            for name, values in times.items():
                wall, cpu = statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)
                row[name] = f"{wall * 1e3:.0f} ms" + (f" ({cpu * 1e3:.0f} ms CPU)" if device.type == "cpu" else "")
            for kind, index in (("wall", 0), ("CPU", 1)) if device.type == "cpu" else (("wall", 0),):
                ratios = [theirs[index] / ours[index] for theirs, ours in zip(times[EG3D], times[OURS])]
                row[f"EG3D / default ({kind})"] = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
            rows.append(row)
        memory = {name: peak_memory_mb(fn, planes, device) for name, fn in setup.calls.items()}
        row = {"pass": "peak memory fwd+bwd"}
        row.update({name: f"{value:.0f} MB" for name, value in memory.items()})
        row["EG3D / default (wall)"] = f"{memory[EG3D] / memory[OURS]:.2f}x less"
        if device.type == "cpu":
            row["EG3D / default (CPU)"] = ""
        rows.append(row)
        print(format_table(rows))


if __name__ == "__main__":
    main()
