"""Benchmark of the Pri3D pieces: PointInfoNCE, RGB-D correspondences, sparse vs dense 3D convolution.

    python benchmarks/bench_pri3d.py            # full table (n up to 65536; takes minutes on 2 CPU cores)
    python benchmarks/bench_pri3d.py --quick    # seconds

1. Loss forward and forward+backward at n = 1024 ... 65536 matches (D = 64, float32): ``point_info_nce``
   dense, ``point_info_nce(chunk_size=...)`` streaming, and a naive reference written here the way the
   official ContrastiveLoss does it (x / ||x||, q k^T / T, two cross-entropies). Dense paths are skipped
   when their n x n logits would not fit --max-dense-gib.
2. Correspondences of a 240 x 320 frame pair: ``pixel_correspondences`` vs a per-pixel Python loop.
3. Submanifold ``sparse_conv3d`` (k=3) on a surface-like occupancy vs ``F.conv3d`` on the dense grid.

Memory: CUDA ``torch.cuda.max_memory_allocated`` above the inputs; CPU the peak resident set size above the
level before the call (Linux /proc/self/status VmHWM after resetting it through /proc/self/clear_refs),
"n/a" where that is unavailable. Times are medians over --repeats runs.
"""

import argparse
import ctypes
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimal3d.correspondences import pixel_correspondences  # noqa: E402
from minimal3d.point_info_nce import point_info_nce  # noqa: E402
from minimal3d.sparse_conv import SparseTensor, sparse_conv3d  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _read_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them), so RSS deltas see fresh allocations."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def peak_memory(fn, device: torch.device) -> tuple[str, float]:
    """Peak memory of one fn() call above the level before it, in MiB (a string; "n/a" if unknown), and
    the call's duration."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds = timed(fn, device)
        return f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f}", seconds
    _release_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        return "n/a", timed(fn, device)
    base = _read_kib("VmRSS")
    seconds = timed(fn, device)
    peak = _read_kib("VmHWM")
    return ("n/a" if base is None or peak is None else f"{max(peak - base, 0) / 1024:.0f}"), seconds


def measure(fn, device: torch.device, repeats: int) -> tuple[float, str]:
    """Median seconds of fn() over repeats (after a warm-up when repeats > 1) and its peak memory (MiB)."""
    if repeats > 1:
        fn()  # warm-up
    memory, first = peak_memory(fn, device)
    times = [first] + [timed(fn, device) for _ in range(repeats - 1)]
    return statistics.median(times), memory


def naive_contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """The official ContrastiveLoss, written out (no eps, full n x n logits, two cross-entropies)."""
    q = q / torch.norm(q, p=2, dim=1, keepdim=True)
    k = k / torch.norm(k, p=2, dim=1, keepdim=True)
    logits = torch.mm(q, k.transpose(1, 0)) / temperature
    labels = torch.arange(q.shape[0], device=q.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.transpose(1, 0), labels)) / 2


def bench_loss(args, device: torch.device) -> list[list[str]]:
    rows = []
    sizes = [1024, 4096] if args.quick else [int(n) for n in args.sizes.split(",")]
    for n in sizes:
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(n, 64, generator=generator).to(device).requires_grad_(True)
        k = torch.randn(n, 64, generator=generator).to(device).requires_grad_(True)
        dense_gib = 4 * n * n * 4 / 2**30  # ~4 live float32 copies of the logits
        variants = {"naive (official form)": lambda: naive_contrastive_loss(q, k, 0.4),
                    "dense": lambda: point_info_nce(q, k, 0.4),
                    f"chunked ({args.chunk_size})": lambda: point_info_nce(q, k, 0.4, chunk_size=args.chunk_size)}
        baseline = None
        for name, loss_fn in variants.items():
            if not name.startswith("chunked") and dense_gib > args.max_dense_gib:
                rows.append([str(n), name, "skipped", f"logits ~{dense_gib:.0f} GiB", "", ""])
                continue
            repeats = 1 if n >= 16384 else args.repeats
            forward, _ = measure(lambda: loss_fn().detach(), device, repeats)
            both, memory = measure(lambda: loss_fn().backward(), device, repeats)
            baseline = baseline or both
            rows.append([str(n), name, f"{forward * 1e3:.1f}", f"{both * 1e3:.1f}", memory,
                         f"{baseline / both:.2f}x"])
    return rows


def naive_pixel_correspondences(depth1, depth2, K, viewmat1, viewmat2, max_distance):
    """One pixel at a time (minimal3d convention: centres at +0.5, floor)."""
    relative = (viewmat2 @ torch.linalg.inv(viewmat1)).tolist()
    fx, fy, cx, cy = K[0, 0].item(), K[1, 1].item(), K[0, 2].item(), K[1, 2].item()
    depth1_rows, depth2_rows = depth1.tolist(), depth2.tolist()
    height, width = depth1.shape
    matches = []
    for r in range(height):
        for c in range(width):
            z = depth1_rows[r][c]
            if z <= 0:
                continue
            point = ((c + 0.5 - cx) * z / fx, (r + 0.5 - cy) * z / fy, z)
            x2, y2, z2 = (sum(relative[i][j] * point[j] for j in range(3)) + relative[i][3] for i in range(3))
            if z2 <= 0:
                continue
            c2, r2 = math.floor(fx * x2 / z2 + cx), math.floor(fy * y2 / z2 + cy)
            if 0 <= r2 < height and 0 <= c2 < width and depth2_rows[r2][c2] > 0 \
                    and abs(z2 - depth2_rows[r2][c2]) < max_distance:
                matches.append((r, c, r2, c2))
    return matches


def bench_correspondences(args) -> list[list[str]]:
    """A 240 x 320 pair looking at a tilted plane (CPU, float32 like the training loop)."""
    height, width = (60, 80) if args.quick else (240, 320)
    K = torch.tensor([[288.9 * width / 320, 0, width / 2], [0, 288.9 * height / 240, height / 2], [0, 0, 1]])
    rows_, cols_ = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    depth1 = 2.0 + 0.002 * cols_ + 0.001 * rows_
    depth2 = 2.0 + 0.002 * (cols_ + 12) + 0.001 * rows_
    viewmat1 = torch.eye(4)
    viewmat2 = torch.eye(4)
    viewmat2[0, 3] = -0.02
    ours, _ = measure(lambda: pixel_correspondences(depth1, depth2, K, viewmat1, viewmat2), torch.device("cpu"),
                      args.repeats)
    start = time.perf_counter()
    naive = naive_pixel_correspondences(depth1, depth2, K, viewmat1, viewmat2, 0.05)
    naive_time = time.perf_counter() - start
    matches = len(pixel_correspondences(depth1, depth2, K, viewmat1, viewmat2)[0])
    return [[f"{height}x{width}", "pixel_correspondences", f"{ours * 1e3:.2f}", str(matches)],
            [f"{height}x{width}", "naive per-pixel loop", f"{naive_time * 1e3:.0f}", str(len(naive))],
            ["", "speed-up", f"{naive_time / ours:.0f}x", ""]]


def surface_coords(grid: int, device: torch.device) -> torch.Tensor:
    """Voxels of a sphere shell and a floor plane in a grid^3 box (a scan-like ~5 % occupancy)."""
    axis = torch.arange(grid, device=device)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    radius = ((x - grid / 2) ** 2 + (y - grid / 2) ** 2 + (z - grid / 2) ** 2).float().sqrt()
    occupied = ((radius - grid / 3).abs() < 1.0) | (z == 2)
    return torch.nonzero(occupied)


def bench_sparse_conv(args, device: torch.device) -> list[list[str]]:
    rows, channels = [], 32
    grids = [16, 32] if args.quick else [32, 64, 96]
    for grid in grids:
        coords = surface_coords(grid, device)
        batch_coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long, device=device), coords], 1)
        feats = torch.randn(len(coords), channels, device=device, requires_grad=True)
        weight = torch.randn(27, channels, channels, device=device, requires_grad=True)
        dense = torch.zeros(1, channels, grid, grid, grid, device=device)
        dense[0, :, coords[:, 0], coords[:, 1], coords[:, 2]] = feats.detach().T
        dense.requires_grad_(True)
        dense_weight = weight.detach().reshape(3, 3, 3, channels, channels).permute(4, 3, 0, 1, 2).contiguous()
        dense_weight.requires_grad_(True)

        def sparse_step(backward: bool):
            out = sparse_conv3d(SparseTensor(batch_coords, feats), weight).feats  # fresh kernel map each call
            if backward:
                out.sum().backward()
            return out

        def dense_step(backward: bool):
            out = F.conv3d(dense, dense_weight, padding=1)
            if backward:
                out.sum().backward()
            return out

        sparse_forward, _ = measure(lambda: sparse_step(False), device, args.repeats)
        sparse_both, sparse_memory = measure(lambda: sparse_step(True), device, args.repeats)
        dense_forward, _ = measure(lambda: dense_step(False), device, args.repeats)
        dense_both, dense_memory = measure(lambda: dense_step(True), device, args.repeats)
        occupancy = f"{len(coords)} ({100 * len(coords) / grid ** 3:.1f}%)"
        rows.append([f"{grid}^3", occupancy, "sparse_conv3d", f"{sparse_forward * 1e3:.1f}",
                     f"{sparse_both * 1e3:.1f}", sparse_memory, f"{dense_both / sparse_both:.1f}x"])
        rows.append([f"{grid}^3", "", "F.conv3d dense", f"{dense_forward * 1e3:.1f}", f"{dense_both * 1e3:.1f}",
                     dense_memory, "1.0x"])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="1024,4096,16384,65536", help="loss sizes n (comma separated)")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--max-dense-gib", type=float, default=8.0, help="skip dense losses above this")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; memory = peak MiB above start "
          "(CPU: VmHWM - VmRSS, CUDA: max_memory_allocated)")
    for device in devices:
        print(f"\n== PointInfoNCE, D=64, float32, {device} (ratio = naive fwd+bwd / this fwd+bwd)")
        print(table(["n", "variant", "fwd ms", "fwd+bwd ms", "peak MiB", "vs naive"], bench_loss(args, device)))
    print("\n== pixel correspondences, CPU float32")
    print(table(["size", "variant", "ms", "matches"], bench_correspondences(args)))
    for device in devices:
        print(f"\n== submanifold sparse conv k=3, 32->32 channels, {device} (ratio = dense fwd+bwd / sparse)")
        print(table(["grid", "voxels", "variant", "fwd ms", "fwd+bwd ms", "peak MiB", "speed-up"],
                    bench_sparse_conv(args, device)))


if __name__ == "__main__":
    main()
