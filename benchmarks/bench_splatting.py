"""Benchmark of minimal3d.splatting.rasterize_gaussians against a naive dense renderer.

Scenes: random Gaussians in the view frustum with trained-scene-like sizes (~3-4 px radius), float32.
Default: 20k Gaussians at 128 x 128 with RGB colours and with 64-dim features; ``--full`` adds 200k
Gaussians at 512 x 512. The dense baseline evaluates every Gaussian at every pixel (N x H x W tensors,
sequential rules by cumprod over the depth-sorted Gaussians); it runs on the first ``--dense-gaussians``
Gaussians of each scene, fewer if N x H x W would exceed ``--dense-elements`` (the full scene would not fit),
and ours is timed on that same subset for the ratio. Times are medians of ``--repeats`` runs. Peak memory: CUDA ``max_memory_allocated``; CPU the peak
resident set size of a fresh subprocess during one call minus its size just before (Linux VmHWM, reset
through /proc/self/clear_refs).

    python benchmarks/bench_splatting.py            # CPU (and CUDA when present)
    python benchmarks/bench_splatting.py --quick   # seconds
    python benchmarks/bench_splatting.py --full    # adds 200k Gaussians at 512 x 512
"""

import argparse
import math
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimal3d.splatting import rasterize_gaussians  # noqa: E402


def make_scene(num, size, channels, device, seed=0):
    """Gaussians in front of an identity camera with a 60 degree field of view; radii ~3-4 px."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(num, 3, generator=generator) * torch.tensor([1.0, 1.0, 0.5]) + torch.tensor([0.0, 0.0, 4.0])
    log_scale = math.log(0.022 * 128 / size)  # similar pixel sizes at every resolution
    scene = {
        "means": means,
        "quats": torch.randn(num, 4, generator=generator),
        "scales": torch.exp(log_scale + 0.5 * torch.randn(num, 3, generator=generator)),
        "opacities": 0.05 + 0.9 * torch.rand(num, generator=generator),
        "colors": torch.rand(num, channels, generator=generator),
    }
    focal = size / (2 * math.tan(math.radians(30)))
    K = torch.tensor([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1.0]])
    scene = {key: value.to(device) for key, value in scene.items()}
    return scene, torch.eye(4, device=device), K.to(device)


def dense_render(means, quats, scales, opacities, colors, viewmat, K, width, height, alpha_max=0.99):
    """Naive baseline: every Gaussian at every pixel, (N, H*W) tensors, same rules as the tile renderer."""
    w, x, y, z = torch.unbind(quats / quats.norm(dim=-1, keepdim=True), dim=-1)
    rotation = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(-1, 3, 3)  # fmt: skip
    covariance = rotation @ torch.diag_embed(scales**2) @ rotation.transpose(1, 2)
    points = means @ viewmat[:3, :3].T + viewmat[:3, 3]
    covariance = viewmat[:3, :3] @ covariance @ viewmat[:3, :3].T
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    px, py, pz = points.unbind(-1)
    tx = pz * torch.clamp(px / pz, -(cx / fx + 0.15 * width / fx), (width - cx) / fx + 0.15 * width / fx)
    ty = pz * torch.clamp(py / pz, -(cy / fy + 0.15 * height / fy), (height - cy) / fy + 0.15 * height / fy)
    zeros = torch.zeros_like(pz)
    jacobian = torch.stack([fx / pz, zeros, -fx * tx / pz**2, zeros, fy / pz, -fy * ty / pz**2], -1).reshape(-1, 2, 3)
    covariance2d = jacobian @ covariance @ jacobian.transpose(1, 2) + 0.3 * torch.eye(2, device=means.device)
    conic = torch.linalg.inv(covariance2d)  # (N, 2, 2)
    means2d = torch.stack([fx * px / pz + cx, fy * py / pz + cy], -1)
    order = torch.argsort(pz)
    visible = (pz[order] > 0.2)[:, None]
    rows, columns = torch.meshgrid(torch.arange(height, device=means.device), torch.arange(width, device=means.device), indexing="ij")
    centres = torch.stack([columns, rows], -1).reshape(-1, 2).to(means.dtype) + 0.5
    d = means2d[order][:, None, :] - centres[None]  # (N, H*W, 2)
    sigma = 0.5 * torch.einsum("npi,nij,npj->np", d, conic[order], d)
    alpha = torch.clamp(opacities[order][:, None] * torch.exp(-sigma), max=alpha_max)
    alpha = torch.where(visible & (sigma >= 0) & (alpha >= 1 / 255), alpha, torch.zeros_like(alpha))
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:1]), 1 - alpha[:-1]]), dim=0)
    weights = torch.where((transmittance * (1 - alpha)).detach() > 1e-4, alpha * transmittance, torch.zeros_like(alpha))
    render = weights.T @ colors[order]  # (H*W, D)
    return {"render": render.reshape(height, width, -1), "alpha": weights.sum(0).reshape(height, width)}


def ours_render(*args):
    return rasterize_gaussians(*args)


def run_once(method, scene, viewmat, K, size, backward):
    params = {key: value.clone().requires_grad_(backward) for key, value in scene.items()}
    out = method(*params.values(), viewmat, K, size, size)
    if backward:
        (out["render"].sum() + out["alpha"].sum()).backward()
    return out


def median_time(method, scene, viewmat, K, size, backward, repeats, clock=time.perf_counter):
    device = scene["means"].device
    run_once(method, scene, viewmat, K, size, backward)  # warm up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        run_once(method, scene, viewmat, K, size, backward)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    return statistics.median(times)


def _status_bytes(field):
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc/self/status."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _cpu_peak_child(queue, method_name, num, size, channels, backward, threads):
    torch.set_num_threads(threads)
    scene, viewmat, K = make_scene(num, size, channels, torch.device("cpu"))
    method = {"ours": ours_render, "dense": dense_render}[method_name]
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak (VmHWM) to the current resident size
    run_once(method, scene, viewmat, K, size, backward)
    queue.put(_status_bytes("VmHWM") - before)


def peak_memory_mb(method_name, num, size, channels, backward, device):
    if device.type == "cuda":
        scene, viewmat, K = make_scene(num, size, channels, device)
        method = {"ours": ours_render, "dense": dense_render}[method_name]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run_once(method, scene, viewmat, K, size, backward)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    if not Path("/proc/self/clear_refs").exists():  # Linux only
        return float("nan")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_cpu_peak_child, args=(queue, method_name, num, size, channels, backward, torch.get_num_threads()))
    child.start()
    peak = queue.get(timeout=900)  # raises if the child failed
    child.join()
    return max(peak, 0) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small scenes, 3 repeats, no memory subprocesses")
    parser.add_argument("--full", action="store_true", help="also 200k Gaussians at 512 x 512")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dense-gaussians", type=int, default=1000, help="at most this many Gaussians in the dense baseline")
    parser.add_argument("--dense-elements", type=int, default=1 << 24,
                        help="and at most this many Gaussian x pixel entries (about 1 GB peak at 2^24)")
    parser.add_argument("--device", default="all", help="cpu, cuda or all (cuda only when present)")
    parser.add_argument("--timer", choices=["wall", "process"], default="wall",
                        help="wall clock, or CPU time of this process (steadier on a loaded machine; CPU only)")
    args = parser.parse_args()

    scenes = [(20_000, 128, 3), (20_000, 128, 64)]
    if args.full:
        scenes += [(200_000, 512, 3), (200_000, 512, 64)]
    repeats, dense_num = args.repeats, args.dense_gaussians
    if args.quick:
        scenes, repeats, dense_num = [(5_000, 64, 3), (5_000, 64, 64)], 3, 300
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))

    clock = time.process_time if args.timer == "process" else time.perf_counter
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, float32, median of {repeats}, "
          f"{args.timer} time")
    header = ["device", "scene", "method", "fwd s", "fwd+bwd s", "peak MB fwd+bwd", "dense/ours fwd", "dense/ours fwd+bwd"]
    rows = []
    for device in devices:
        for num, size, channels in scenes:
            scene, viewmat, K = make_scene(num, size, channels, device)
            times = {bw: median_time(ours_render, scene, viewmat, K, size, bw, repeats, clock) for bw in (False, True)}
            memory = float("nan") if args.quick else peak_memory_mb("ours", num, size, channels, True, device)
            name = f"{num // 1000}k {size}x{size} D={channels}"
            rows.append([device.type, name, "ours", f"{times[False]:.3f}", f"{times[True]:.3f}", f"{memory:.0f}", "", ""])
            subset_num = max(1, min(dense_num, args.dense_elements // (size * size)))
            subset = {key: value[:subset_num] for key, value in scene.items()}
            ours_small = {bw: median_time(ours_render, subset, viewmat, K, size, bw, repeats, clock) for bw in (False, True)}
            dense_small = {
                bw: median_time(dense_render, subset, viewmat, K, size, bw, max(1, repeats // 2), clock) for bw in (False, True)
            }
            memory_ours = memory_dense = float("nan")
            if not args.quick:
                memory_ours = peak_memory_mb("ours", subset_num, size, channels, True, device)
                memory_dense = peak_memory_mb("dense", subset_num, size, channels, True, device)
            small = f"{subset_num} {size}x{size} D={channels}"
            rows.append([device.type, small, "ours", f"{ours_small[False]:.3f}", f"{ours_small[True]:.3f}", f"{memory_ours:.0f}", "", ""])
            ratio_fwd, ratio_bwd = dense_small[False] / ours_small[False], dense_small[True] / ours_small[True]
            rows.append([device.type, small, "dense", f"{dense_small[False]:.3f}", f"{dense_small[True]:.3f}", f"{memory_dense:.0f}", f"{ratio_fwd:.1f}x", f"{ratio_bwd:.1f}x"])
            for row in rows[-3:]:
                print(" | ".join(row), flush=True)
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    print()
    for row in [header, ["-" * w for w in widths]] + rows:
        print(" | ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
    main()
