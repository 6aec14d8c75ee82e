"""Sparse vs dense 3D convolution: time and peak memory at growing grid sizes.

The voxels are a sphere shell (radius 0.4 n, about two voxels thick) inside an n^3 grid, the occupancy
of a scanned surface. Rows per grid size:
  sparse conv      one submanifold 3x3x3 conv (minimal3d.sparse_conv), kernel map cached (warm)
  sparse conv+map  the same conv on a fresh SparseTensor: coordinate sort + kernel map included
  dense conv3d     F.conv3d on the dense n^3 volume (padding 1), the baseline the sparse conv replaces
  sparse U-Net     minkunet14 (the CPU default of train_pri3d.py) on the same voxels, fresh input
  naive conv       (smallest size only) kernel map by a per-voxel Python dict lookup per offset, then
                   per-offset gather/matmul/index_add with plain autograd
Times are medians over --repeats runs (forward, forward+backward). Memory: on CUDA the peak of
torch.cuda.max_memory_allocated above the memory held before the call; on CPU the peak resident set size
above the one before the call (VmHWM after resetting it through /proc/self/clear_refs), i.e. the memory
the process really touched, including allocator overhead; "n/a" where /proc is missing. On glibc the
mmap threshold is pinned to 64 KiB (mallopt) so that large freed tensors leave the resident set and the
delta is not hidden by memory the allocator kept from an earlier run.

    python benchmarks/bench_sparse_conv.py --quick
    python benchmarks/bench_sparse_conv.py --sizes 32 64 128 --channels 32
"""

import argparse
import ctypes
import ctypes.util
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minimal3d.sparse_conv import SparseTensor, kernel_offsets, minkunet14, sparse_conv3d


def sphere_shell(n: int) -> torch.Tensor:
    """(N, 4) voxels (batch 0) with |r - 0.4 n| < 1, built slice by slice to avoid an n^3 x 3 tensor."""
    axis = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
    coords = []
    for x in range(n):
        radius = (axis[x] ** 2 + axis[:, None] ** 2 + axis[None, :] ** 2).sqrt()
        y, z = torch.nonzero((radius - 0.4 * n).abs() < 1.0, as_tuple=True)
        coords.append(torch.stack([torch.zeros_like(y), torch.full_like(y, x), y, z], dim=1))
    return torch.cat(coords)


def naive_sparse_conv(coords: torch.Tensor, feats: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Baseline: kernel map by a Python dict lookup per voxel and offset, then gather/matmul/index_add."""
    rows = {tuple(c): i for i, c in enumerate(coords.tolist())}
    out = feats.new_zeros(len(coords), weight.shape[2])
    for k, (dx, dy, dz) in enumerate(kernel_offsets(3).tolist()):
        pairs = [(rows[(b, x + dx, y + dy, z + dz)], o) for o, (b, x, y, z) in enumerate(coords.tolist())
                 if (b, x + dx, y + dy, z + dz) in rows]
        if pairs:
            in_rows, out_rows = torch.tensor(pairs, device=feats.device).T
            out = out.index_add(0, out_rows, feats[in_rows] @ weight[k])
    return out


def _pin_mmap_threshold() -> None:
    """glibc raises its mmap threshold after big frees and then recycles heap pages invisibly to RSS."""
    libc_name = ctypes.util.find_library("c")
    if libc_name and "libc.so" in libc_name:
        ctypes.CDLL(libc_name).mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB


def _current_rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


def _peak_rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))


def measure(fn, device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Median seconds of ``fn()`` over ``repeats`` runs (after one warm-up) and peak extra MiB of one run."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    elif Path("/proc/self/clear_refs").exists():
        before = _current_rss()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        fn()
        peak = max(_peak_rss() - before, 0) / 2**20
    else:
        peak = None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="grid sizes n (n^3 cells)")
    parser.add_argument("--channels", type=int, default=32, help="C_in = C_out of the single conv")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-dense", type=int, default=128, help="skip dense conv3d above this grid size")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--quick", action="store_true", help="sizes 24 32, 2 repeats, 16 channels")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats, args.channels = [24, 32], 2, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    _pin_mmap_threshold()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    torch.manual_seed(0)
    channels = args.channels
    weight = torch.randn(27, channels, channels, device=device) / (27 * channels) ** 0.5
    dense_weight = weight.reshape(3, 3, 3, channels, channels).permute(4, 3, 0, 1, 2).contiguous()
    unet = minkunet14().to(device)
    print(f"device {device}, threads {torch.get_num_threads()}, C={channels}, median of {args.repeats}")
    header = f"{'n':>4} {'voxels':>8} {'occup.':>7} {'method':<16} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))

    for size in args.sizes:
        coords = sphere_shell(size).to(device)
        feats = torch.randn(len(coords), channels, device=device)
        results = {}

        def row(name, forward, backward_input):
            fwd, _ = measure(lambda: forward().sum(), device, args.repeats)

            def forward_backward():
                backward_input.grad = None
                forward().sum().backward()

            fwd_bwd, peak = measure(forward_backward, device, args.repeats)
            results[name] = (fwd, fwd_bwd)
            peak_text = f"{peak:9.1f}" if peak is not None else f"{'n/a':>9}"
            print(f"{size:>4} {len(coords):>8} {len(coords) / size**3:>7.3%} {name:<16} "
                  f"{fwd * 1e3:>9.2f} {fwd_bwd * 1e3:>11.2f} {peak_text}")

        leaf = feats.clone().requires_grad_()
        warm = SparseTensor(coords, leaf)
        row("sparse conv", lambda: sparse_conv3d(warm, weight).feats, leaf)
        row("sparse conv+map", lambda: sparse_conv3d(SparseTensor(coords, leaf), weight).feats, leaf)
        if size <= args.max_dense:
            volume = torch.zeros(1, channels, size, size, size, device=device)
            volume[0, :, coords[:, 1], coords[:, 2], coords[:, 3]] = feats.T
            volume.requires_grad_()
            row("dense conv3d", lambda: F.conv3d(volume, dense_weight, padding=1), volume)
            del volume
        colors = torch.rand(len(coords), 3, device=device, requires_grad=True)
        row("sparse U-Net", lambda: unet(SparseTensor(coords, colors)).feats, colors)
        if size == min(args.sizes):
            row("naive conv", lambda: naive_sparse_conv(coords, leaf, weight), leaf)
        if "dense conv3d" in results:
            ratio = [results["dense conv3d"][i] / results["sparse conv"][i] for i in range(2)]
            print(f"{'':>22} dense / sparse conv: fwd x{ratio[0]:.1f}, fwd+bwd x{ratio[1]:.1f}")
        if "naive conv" in results:
            ratio = [results["naive conv"][i] / results["sparse conv+map"][i] for i in range(2)]
            print(f"{'':>22} naive / sparse conv+map: fwd x{ratio[0]:.1f}, fwd+bwd x{ratio[1]:.1f}")


if __name__ == "__main__":
    main()
