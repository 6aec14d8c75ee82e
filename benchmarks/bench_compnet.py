"""Benchmark: grouped vMF contrast (3D-CompNets) vs full contrast (NOVUM), and pose estimation time.

Loss sizes follow the paper: K = 500 vertices per class, D = 128, N = 32 sampled vertices per other class,
N_b = 2560 background features, B = 8 images with ~400 visible vertices each, Y = 10, 50, 100, 188.
Three implementations run on the same inputs in one process:
  novum    the naive baseline written here as NOVUM's train.py does it: padded memory (Y*K_max + N_b rows),
           logits of every slot against every row (B, K_max, Y*K_max + N_b), a dense (B, K_max, Y*K_max)
           near mask, cross-entropy over the visible slots;
  full     ours, grouped_vmf_contrast(form="novum", num_sampled=None, omega=1) (NOVUM's loss, gathered per class);
  grouped  ours, grouped_vmf_contrast(num_sampled=N, omega=1), the paper's Eq. 5 (L_in over K + N_b columns,
           L_cross over 1 + N (Y - 1) columns per vertex).

Counted loss FLOPs (per visible vertex row, per column): 2D for the logit matmul, 2D for the gradient to the
feature (the memory is not differentiated), ~6 for exp/sum/log/softmax-gradient, i.e. V * columns * (4D + 6).
Not counted (same for all): the near-mask distances (V * K), gathering features, the background regulariser.
Peak memory: CUDA max_memory_allocated; on CPU the rise of the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs before each run), which includes allocator caching.

Usage: python benchmarks/bench_compnet.py [--quick] [--device cpu|cuda] [--ys 10 50 100 188]
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minimal3d.cameras import intrinsics  # noqa: E402
from minimal3d.neural_mesh import cuboid_mesh, estimate_pose  # noqa: E402
from minimal3d.vmf_contrast import VertexMemory, grouped_vmf_contrast  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ys", type=int, nargs="+", default=[10, 50, 100, 188])
parser.add_argument("--vertices", type=int, default=500, help="K per class")
parser.add_argument("--dim", type=int, default=128)
parser.add_argument("--sampled", type=int, default=32, help="N per other class")
parser.add_argument("--visible", type=int, default=400, help="visible vertices per image")
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--background", type=int, default=2560, help="N_b")
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--novum-max-y", type=int, default=100, help="skip the naive baseline above this Y (memory)")
parser.add_argument("--pose-size", type=int, default=64, help="feature map side for the pose benchmark")
parser.add_argument("--device", default="cpu")
parser.add_argument("--quick", action="store_true")
args = parser.parse_args()
if args.quick:
    args.ys, args.vertices, args.visible, args.background, args.repeats, args.pose_size = [10, 20], 100, 80, 256, 1, 24
device = torch.device(args.device)
TEMPERATURE, THRESHOLD, BACKGROUND_WEIGHT = 0.07, 48.0, 0.005


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak():
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    return _status("VmRSS")


def peak_mb(start):
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    return (_status("VmHWM") - start) / 2**20


def _status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def novum_full_contrast(features, keypoints, visible, labels, memory_padded, max_n):
    """NOVUM train.py: logits to every (padded) row, dense near mask over the whole vertex block, CE."""
    B, Y = features.shape[0], (memory_padded.shape[0] - args.background) // max_n
    logits = features @ memory_padded.T / TEMPERATURE  # (B, K_max, Y*K_max + N_b)
    near = torch.cdist(keypoints, keypoints) <= THRESHOLD  # (B, K_max, K_max)
    near &= ~torch.eye(max_n, dtype=torch.bool, device=features.device)
    mask = torch.zeros(B, max_n, Y, max_n, device=features.device)  # the O(B K Y K) tensor
    mask[torch.arange(B), :, labels] = near.float()
    bias = torch.cat([mask.flatten(2) * -1e5, torch.full((B, max_n, args.background), math.log(BACKGROUND_WEIGHT),
                                                         device=features.device)], dim=2)
    target = labels[:, None] * max_n + torch.arange(max_n, device=features.device)
    rows = visible > 0
    return F.cross_entropy((logits + bias)[rows], target[rows])


def make_inputs(Y, generator):
    K = args.vertices
    memory = VertexMemory([K] * Y, dim=args.dim, num_background=args.background, generator=generator).to(device)
    labels = torch.randint(Y, (args.batch,), generator=generator).to(device)
    features = F.normalize(torch.randn(args.batch, K, args.dim, generator=generator), dim=-1).to(device)
    keypoints = (torch.rand(args.batch, K, 2, generator=generator) * 512).to(device)
    order = torch.rand(args.batch, K, generator=generator).argsort(1)
    visible = (order < args.visible).float().to(device)
    return memory, features, keypoints, visible, labels


def flops(columns, rows):
    return rows * columns * (4 * args.dim + 6)


rows_out = []
generator = torch.Generator().manual_seed(0)
V = args.batch * args.visible
for Y in args.ys:
    memory, features, keypoints, visible, labels = make_inputs(Y, generator)
    padded = torch.cat([memory.vertices, memory.background])
    sample_gen = torch.Generator(device=device).manual_seed(1) if device.type == "cuda" else torch.Generator().manual_seed(1)
    variants = {
        "full": lambda f: grouped_vmf_contrast(f, keypoints, visible, labels, memory, num_sampled=None, form="novum",
                                               check=False),
        "grouped": lambda f: grouped_vmf_contrast(f, keypoints, visible, labels, memory, num_sampled=args.sampled,
                                                  generator=sample_gen, check=False),
    }
    if Y <= args.novum_max_y:
        variants["novum"] = lambda f: novum_full_contrast(f, keypoints, visible, labels, padded, args.vertices)
    losses = {}
    for name, loss_fn in variants.items():
        leaf = features.clone().requires_grad_(True)
        with torch.no_grad():
            losses[name] = float(loss_fn(leaf))
        forward = timed(lambda: loss_fn(leaf), args.repeats)
        start = reset_peak()
        both = timed(lambda: loss_fn(leaf).backward(), args.repeats)
        memory_mb = peak_mb(start)
        columns = {"grouped": args.vertices + args.background + 1 + args.sampled * (Y - 1)}.get(
            name, Y * args.vertices + args.background)
        rows_out.append((Y, name, columns, flops(columns, V), forward, both, memory_mb, losses[name]))
    if "novum" in losses:
        assert abs(losses["novum"] - losses["full"]) < 1e-3 * abs(losses["novum"]), losses

print(f"device {device}, K={args.vertices}, D={args.dim}, N={args.sampled}, N_b={args.background}, B={args.batch}, "
      f"V={V} visible rows, median of {args.repeats}")
print(f"{'Y':>4} {'loss':>8} {'columns':>8} {'GFLOP':>8} {'fwd s':>8} {'fwd+bwd s':>10} {'peak MB':>9} {'value':>8}")
for Y, name, columns, flop, forward, both, memory_mb, value in rows_out:
    print(f"{Y:>4} {name:>8} {columns:>8} {flop / 1e9:>8.2f} {forward:>8.3f} {both:>10.3f} {memory_mb:>9.0f} {value:>8.4f}")
print("\nratios (fwd+bwd time):")
for Y in args.ys:
    t = {name: both for y, name, _, _, _, both, _, _ in rows_out if y == Y}
    parts = [f"full/grouped {t['full'] / t['grouped']:.1f}x"]
    if "novum" in t:
        parts.append(f"novum/grouped {t['novum'] / t['grouped']:.1f}x, novum/full {t['novum'] / t['full']:.2f}x")
    print(f"  Y={Y}: " + ", ".join(parts))

print("\ncounted loss-FLOP reduction of grouped vs full at the largest Y, by number of kept classes Y_w (omega > 0):")
Y, K, N, Nb = max(args.ys), args.vertices, args.sampled, args.background
for kept in sorted({Y - 1, Y // 2, Y // 4, Y // 10}, reverse=True):
    grouped_cols = K + Nb + 1 + N * kept
    with_background = 1 - grouped_cols / (Y * K + Nb)
    vertex_only = 1 - (K + N * kept) / (Y * K)
    print(f"  Y_w={kept:>4}: columns {grouped_cols:>6} vs {Y * K + Nb}: {100 * with_background:.1f} % "
          f"(vertex columns only, without N_b: {100 * vertex_only:.1f} %)")
mask_gb = args.batch * K * Y * K * 4 / 2**30
print(f"  NOVUM's dense near mask at Y={Y}: {mask_gb:.2f} GB float32 (avoided by the gathered form)")

# ---------------------------------------------------------------------------------------------------
# Pose estimation: one image, 144-pose scoring (rasterised grid cached per class) + 30 Adam steps
# ---------------------------------------------------------------------------------------------------
size = args.pose_size
meshes = [cuboid_mesh(torch.tensor([[-1.0, 1.0], [-0.5 - 0.1 * c, 0.5 + 0.1 * c], [-0.4, 0.4]]), args.vertices)
          for c in range(3)]
memory = VertexMemory([m.vertices.shape[0] for m in meshes], dim=args.dim, num_background=args.background,
                      generator=generator).to(device)
meshes = [type(m)(m.vertices.to(device), m.faces.to(device)) for m in meshes]
K_map = intrinsics(size * 1.2, size * 1.2, size / 2, size / 2).to(device)
feature_map = F.normalize(torch.randn(args.dim, size, size, generator=generator), dim=0).to(device)
cache = {}
grid_time = timed(lambda: estimate_pose(feature_map, meshes, memory, K_map, candidates=[0], steps=0, grid_cache=cache), 1)
one_class = timed(lambda: estimate_pose(feature_map, meshes, memory, K_map, candidates=[0], steps=30, grid_cache=cache),
                  args.repeats)
estimate_pose(feature_map, meshes, memory, K_map, candidates=[1, 2], steps=0, grid_cache=cache)  # fill the cache
top3 = timed(lambda: estimate_pose(feature_map, meshes, memory, K_map, top_k=3, steps=30, grid_cache=cache), args.repeats)
print(f"\npose estimation, feature map {size}x{size}, mesh {meshes[0].vertices.shape[0]} vertices / "
      f"{meshes[0].faces.shape[0]} faces, D={args.dim}:")
print(f"  rasterising the 144 grid poses of one class (once per class, cached): {grid_time:.3f} s")
print(f"  per image, 1 class (144-pose scoring + 30 refinement steps): {one_class:.3f} s")
print(f"  per image, top-3 classes by S_y (Eq. 7) each scored + refined: {top3:.3f} s")
