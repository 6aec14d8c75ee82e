"""Benchmark of minimal3d.splatting.rasterize_gaussians against gsplat's own pure-PyTorch pipeline.

Baseline: a transcription, written here, of the pipeline of gsplat 1.5.3's ``gsplat/cuda/_torch_impl.py``
as ``rasterization()`` chains it: ``_quat_scale_to_covar_preci`` -> ``_fully_fused_projection``
(``_world_to_cam``, ``_persp_proj``) -> ``_isect_tiles`` (a Python loop over Gaussians and their tiles,
as in gsplat) -> ``_isect_offset_encode`` -> ``_rasterize_to_pixels`` (``accumulate`` with nerfacc's
``render_weight_from_alpha`` / ``accumulate_along_rays``). Two helpers it calls exist only as CUDA
kernels (``rasterize_to_indices_in_range`` and nerfacc's packed exclusive product); they are replaced by
CPU code with the same rules (a loop over tiles; a cumprod per pixel list). Every call of the baseline is
checked against ours (same image within float32 rounding) before it is timed.

Scenes: random Gaussians in the view frustum with trained-scene-like sizes (~3-4 px radius), float32,
RGB colours (D = 3) and 64-dim features (D = 64). Default: 20k Gaussians at 128 x 128; ``--full`` adds
200k Gaussians at 512 x 512. Times are medians of ``--repeats`` runs of forward (+ backward of
``render.sum() + alpha.sum()``), all methods alternating in one run. Peak memory (``--memory``): CUDA
``max_memory_allocated``; CPU the peak resident set growth of a fresh subprocess during one call.

    python benchmarks/bench_splatting.py                    # CPU (and CUDA when present)
    python benchmarks/bench_splatting.py --quick            # seconds
    python benchmarks/bench_splatting.py --full --memory    # adds 200k Gaussians at 512 x 512

On CUDA the baseline is gsplat's own CUDA rasterizer (``gsplat.rasterization``, packed, 16-px tiles, as
users call it) when ``import gsplat`` works, else the eager ``rasterize_gaussians``; the transcribed
``_torch_impl`` pipeline is CPU-only here (its per-Gaussian Python loop indexes device tensors element by
element, one host sync each). Methods timed on CUDA: eager, ``fast=True``, ``compiled_rasterizer()`` and
``torch.compile(rasterize_gaussians, dynamic=True)`` (what ``train_gaussian.py --compile on`` uses).
"""

import argparse
import math
import multiprocessing
import statistics
import struct
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimal3d.splatting import compiled_rasterizer, rasterize_gaussians  # noqa: E402


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


# ----------------------------------------------------------------------------------------------------
# Baseline: gsplat 1.5.3's pure-PyTorch pipeline (_torch_impl.py), one camera (C = 1)
# ----------------------------------------------------------------------------------------------------


def gsplat_quat_scale_to_covar(quats, scales):
    w, x, y, z = torch.unbind(F.normalize(quats, p=2, dim=-1), dim=-1)
    rotation = torch.stack([1 - 2 * (y**2 + z**2), 2 * (x * y - w * z), 2 * (x * z + w * y),
                            2 * (x * y + w * z), 1 - 2 * (x**2 + z**2), 2 * (y * z - w * x),
                            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x**2 + y**2)], dim=-1)  # fmt: skip
    matrix = rotation.reshape(-1, 3, 3) * scales[:, None, :]
    return torch.bmm(matrix, matrix.transpose(-1, -2))


def gsplat_projection(means, covars, viewmats, Ks, width, height, eps2d=0.3, near_plane=0.2, far_plane=1e10):
    """``_fully_fused_projection`` (pinhole): ``_world_to_cam``, ``_persp_proj``, conics, 3.33 sigma radii."""
    rotation, translation = viewmats[:, :3, :3], viewmats[:, :3, 3]
    means_c = torch.einsum("cij,nj->cni", rotation, means) + translation[:, None, :]
    covars_c = torch.einsum("cij,njk,clk->cnil", rotation, covars, rotation)
    tx, ty, tz = torch.unbind(means_c, dim=-1)
    fx, fy, cx, cy = Ks[..., 0, 0, None], Ks[..., 1, 1, None], Ks[..., 0, 2, None], Ks[..., 1, 2, None]
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.3 * tan_fovx, cx / fx + 0.3 * tan_fovx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.3 * tan_fovy, cy / fy + 0.3 * tan_fovy
    tx = tz * torch.clamp(tx / tz, min=-lim_x_neg, max=lim_x_pos)
    ty = tz * torch.clamp(ty / tz, min=-lim_y_neg, max=lim_y_pos)
    zeros = torch.zeros_like(tz)
    jacobian = torch.stack([fx / tz, zeros, -fx * tx / tz**2, zeros, fy / tz, -fy * ty / tz**2], dim=-1)
    jacobian = jacobian.reshape(*tz.shape, 2, 3)
    covars2d = torch.einsum("...ij,...jk,...kl->...il", jacobian, covars_c, jacobian.transpose(-1, -2))
    means2d = torch.einsum("cij,cnj->cni", Ks[:, :2, :3], means_c) / means_c[..., 2:3]
    covars2d = covars2d + torch.eye(2, device=means.device, dtype=means.dtype) * eps2d
    det = (covars2d[..., 0, 0] * covars2d[..., 1, 1] - covars2d[..., 0, 1] * covars2d[..., 1, 0]).clamp(min=1e-10)
    conics = torch.stack([covars2d[..., 1, 1] / det, -(covars2d[..., 0, 1] + covars2d[..., 1, 0]) / 2.0 / det,
                          covars2d[..., 0, 0] / det], dim=-1)  # fmt: skip
    depths = means_c[..., 2]
    radius = torch.ceil(3.33 * torch.sqrt(torch.stack([covars2d[..., 0, 0], covars2d[..., 1, 1]], -1)))
    valid = (det > 0) & (depths > near_plane) & (depths < far_plane)
    radius = torch.where(valid[..., None], radius, torch.zeros_like(radius))
    inside = ((means2d[..., 0] + radius[..., 0] > 0) & (means2d[..., 0] - radius[..., 0] < width)
              & (means2d[..., 1] + radius[..., 1] > 0) & (means2d[..., 1] - radius[..., 1] < height))  # fmt: skip
    radius = torch.where(inside[..., None], radius, torch.zeros_like(radius))
    return radius.int(), means2d, depths, conics


@torch.no_grad()
def gsplat_isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height):
    """``_isect_tiles``: gsplat's Python loop over cameras x Gaussians x covered tiles, then one sort."""
    cameras, num = means2d.shape[:2]
    tile_means2d, tile_radii = means2d / tile_size, radii / tile_size
    tile_mins = torch.floor(tile_means2d - tile_radii).int()
    tile_maxs = torch.ceil(tile_means2d + tile_radii).int()
    tile_mins[..., 0] = torch.clamp(tile_mins[..., 0], 0, tile_width)
    tile_mins[..., 1] = torch.clamp(tile_mins[..., 1], 0, tile_height)
    tile_maxs[..., 0] = torch.clamp(tile_maxs[..., 0], 0, tile_width)
    tile_maxs[..., 1] = torch.clamp(tile_maxs[..., 1], 0, tile_height)
    tiles_per_gauss = (tile_maxs - tile_mins).prod(dim=-1) * (radii > 0).all(dim=-1)
    n_isects = tiles_per_gauss.sum().item()
    isect_ids = torch.empty(n_isects, dtype=torch.int64, device=means2d.device)
    flatten_ids = torch.empty(n_isects, dtype=torch.int32, device=means2d.device)
    cum_tiles_per_gauss = torch.cumsum(tiles_per_gauss.flatten(), dim=0)
    tile_n_bits = (tile_width * tile_height).bit_length()

    def kernel(cam_id, gauss_id):
        if (radii[cam_id, gauss_id] <= 0).any():
            return
        index = cam_id * num + gauss_id
        current = cum_tiles_per_gauss[index - 1] if index > 0 else 0
        depth_bits = struct.unpack("i", struct.pack("f", depths[cam_id, gauss_id]))[0]
        tile_min, tile_max = tile_mins[cam_id, gauss_id], tile_maxs[cam_id, gauss_id]
        for y in range(tile_min[1], tile_max[1]):
            for x in range(tile_min[0], tile_max[0]):
                tile_id = y * tile_width + x
                isect_ids[current] = (cam_id << 32 << tile_n_bits) | (tile_id << 32) | depth_bits
                flatten_ids[current] = index
                current += 1

    for cam_id in range(cameras):
        for gauss_id in range(num):
            kernel(cam_id, gauss_id)
    isect_ids, sort_indices = torch.sort(isect_ids)
    return isect_ids, flatten_ids[sort_indices]


@torch.no_grad()
def gsplat_isect_offset_encode(isect_ids, cameras, tile_width, tile_height):
    tile_n_bits = (tile_width * tile_height).bit_length()
    tile_counts = torch.zeros((cameras, tile_height, tile_width), dtype=torch.int64, device=isect_ids.device)
    unique_ids, counts = torch.unique_consecutive(isect_ids >> 32, return_counts=True)
    camera_ids, tile_ids = unique_ids >> tile_n_bits, unique_ids & ((1 << tile_n_bits) - 1)
    tile_counts[camera_ids, tile_ids // tile_width, tile_ids % tile_width] = counts
    cumulative = torch.cumsum(tile_counts.flatten(), dim=0).reshape_as(tile_counts)
    return (cumulative - tile_counts).int()


@torch.no_grad()
def cpu_rasterize_to_indices_in_range(range_start, range_end, transmittances, means2d, conics, opacities,
                                      width, height, tile_size, isect_offsets, flatten_ids):  # fmt: skip
    """CPU stand-in for gsplat's CUDA ``rasterize_to_indices_in_range``: per tile, its Gaussians in the
    batch range, each pixel front to back with the skip (alpha < 1/255) and stop (T <= 1e-4) rules."""
    cameras, tile_height, tile_width = isect_offsets.shape
    num = means2d.shape[1]
    block = tile_size * tile_size
    offsets = torch.cat([isect_offsets.flatten(), torch.tensor([flatten_ids.shape[0]], device=means2d.device)])
    local = torch.arange(block, device=means2d.device)
    gaussian_out, pixel_out, camera_out = [], [], []
    for tile in range(cameras * tile_height * tile_width):
        start, end = int(offsets[tile]), int(offsets[tile + 1])
        start, end = start + range_start * block, min(end, start + range_end * block)
        if end <= start:
            continue
        camera, tile_in_camera = divmod(tile, tile_height * tile_width)
        rows = (tile_in_camera // tile_width) * tile_size + local // tile_size
        columns = (tile_in_camera % tile_width) * tile_size + local % tile_size
        on_image = (rows < height) & (columns < width)
        rows, columns = rows[on_image], columns[on_image]
        ids = flatten_ids[start:end].long() % num  # (L,)
        delta = torch.stack([columns, rows], -1)[:, None, :] + 0.5 - means2d[camera, ids][None]  # (P, L, 2)
        conic = conics[camera, ids]
        sigma = 0.5 * (conic[:, 0] * delta[..., 0] ** 2 + conic[:, 2] * delta[..., 1] ** 2) + conic[:, 1] * delta[..., 0] * delta[..., 1]
        alpha = torch.clamp_max(opacities[camera, ids] * torch.exp(-sigma), 0.999)
        used = (sigma >= 0) & (alpha >= 1.0 / 255.0)
        factors = torch.where(used, 1 - alpha, torch.ones_like(alpha))
        after = transmittances[camera, rows, columns][:, None] * torch.cumprod(factors, dim=1)
        used &= torch.cumsum((used & (after <= 1e-4)).int(), dim=1) == 0  # stop before the first T <= 1e-4
        pixel_index, slot = used.nonzero(as_tuple=True)
        gaussian_out.append(ids[slot])
        pixel_out.append(rows[pixel_index] * width + columns[pixel_index])
        camera_out.append(torch.full_like(slot, camera))
    if not gaussian_out:
        empty = torch.zeros(0, dtype=torch.long, device=means2d.device)
        return empty, empty, empty
    gaussian_ids, pixel_ids, camera_ids = torch.cat(gaussian_out), torch.cat(pixel_out), torch.cat(camera_out)
    order = torch.argsort(camera_ids * height * width + pixel_ids, stable=True)  # packed by pixel, as on CUDA
    return gaussian_ids[order], pixel_ids[order], camera_ids[order]


def cpu_exclusive_prod_packed(values, ray_indices, n_rays):
    """CPU stand-in for nerfacc's CUDA packed ``exclusive_prod`` (samples grouped by ray, in order)."""
    position = torch.arange(values.shape[0], device=values.device)
    counts = torch.bincount(ray_indices, minlength=n_rays)
    slot = position - (torch.cumsum(counts, 0) - counts)[ray_indices]
    table = torch.ones(n_rays, int(counts.max()) + 1, dtype=values.dtype, device=values.device)
    table = table.index_put((ray_indices, slot + 1), values)
    return torch.cumprod(table, dim=1)[ray_indices, slot]


def gsplat_accumulate(means2d, conics, opacities, colors, gaussian_ids, pixel_ids, camera_ids, width, height):
    """``accumulate``: alphas of the pairs, nerfacc ``render_weight_from_alpha`` and ``accumulate_along_rays``."""
    cameras = means2d.shape[0]
    pixel_coords = torch.stack([pixel_ids % width, pixel_ids // width], dim=-1) + 0.5
    deltas = pixel_coords - means2d[camera_ids, gaussian_ids]
    c = conics[camera_ids, gaussian_ids]
    sigmas = 0.5 * (c[:, 0] * deltas[:, 0] ** 2 + c[:, 2] * deltas[:, 1] ** 2) + c[:, 1] * deltas[:, 0] * deltas[:, 1]
    alphas = torch.clamp_max(opacities[camera_ids, gaussian_ids] * torch.exp(-sigmas), 0.999)
    indices = camera_ids * height * width + pixel_ids
    total = cameras * height * width
    weights = alphas * cpu_exclusive_prod_packed(1 - alphas, indices, total)  # render_weight_from_alpha
    src = weights[:, None] * colors[camera_ids, gaussian_ids]  # accumulate_along_rays
    renders = torch.zeros(total, colors.shape[-1], dtype=src.dtype, device=src.device).index_add(0, indices, src)
    alphas_out = torch.zeros(total, 1, dtype=src.dtype, device=src.device).index_add(0, indices, weights[:, None])
    return renders.reshape(cameras, height, width, -1), alphas_out.reshape(cameras, height, width, 1)


def gsplat_rasterize_to_pixels(means2d, conics, colors, opacities, width, height, tile_size, isect_offsets,
                               flatten_ids, batch_per_iter=100):  # fmt: skip
    cameras = means2d.shape[0]
    render_colors = torch.zeros((cameras, height, width, colors.shape[-1]), device=means2d.device)
    render_alphas = torch.zeros((cameras, height, width, 1), device=means2d.device)
    block = tile_size * tile_size
    offsets = torch.cat([isect_offsets.flatten(), torch.tensor([len(flatten_ids)], device=means2d.device)])
    max_range = (offsets[1:] - offsets[:-1]).max().item()
    num_batches = (max_range + block - 1) // block
    for step in range(0, num_batches, batch_per_iter):
        transmittances = 1.0 - render_alphas[..., 0]
        gs_ids, pixel_ids, camera_ids = cpu_rasterize_to_indices_in_range(
            step, step + batch_per_iter, transmittances, means2d, conics, opacities, width, height, tile_size,
            isect_offsets, flatten_ids,
        )  # fmt: skip
        if len(gs_ids) == 0:
            break
        renders, accs = gsplat_accumulate(means2d, conics, opacities, colors, gs_ids, pixel_ids, camera_ids, width, height)
        render_colors = render_colors + renders * transmittances[..., None]
        render_alphas = render_alphas + accs * transmittances[..., None]
    return render_colors, render_alphas


def gsplat_render(means, quats, scales, opacities, colors, viewmat, K, width, height, tile_size=16):
    """gsplat's ``rasterization()`` chain of ``_torch_impl`` functions (packed=False, RGB mode)."""
    covars = gsplat_quat_scale_to_covar(quats, scales)
    radii, means2d, depths, conics = gsplat_projection(means, covars, viewmat[None], K[None], width, height)
    opacities = opacities[None].expand(1, -1)
    tile_width, tile_height = math.ceil(width / tile_size), math.ceil(height / tile_size)
    isect_ids, flatten_ids = gsplat_isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height)
    isect_offsets = gsplat_isect_offset_encode(isect_ids, 1, tile_width, tile_height)
    render, alpha = gsplat_rasterize_to_pixels(means2d, conics, colors[None], opacities, width, height, tile_size,
                                               isect_offsets, flatten_ids)  # fmt: skip
    return {"render": render[0], "alpha": alpha[0, ..., 0]}


def gsplat_cuda_render(means, quats, scales, opacities, colors, viewmat, K, width, height):
    """gsplat's CUDA ``rasterization()`` with its defaults (packed, 16-px tiles), our near plane and eps2d."""
    from gsplat import rasterization

    render, alpha, _ = rasterization(means, quats, scales, opacities, colors, viewmat[None], K[None], width, height,
                                     near_plane=0.2, eps2d=0.3)  # fmt: skip
    return {"render": render[0], "alpha": alpha[0, ..., 0]}


def gsplat_cuda_available():
    """True when gsplat imports and its CUDA extension runs (JIT-built on first use)."""
    if not torch.cuda.is_available():
        return False
    try:
        scene, viewmat, K = make_scene(100, 32, 3, torch.device("cuda"))
        gsplat_cuda_render(*scene.values(), viewmat, K, 32, 32)
        return True
    except Exception as error:  # ImportError, or a failed JIT build of the extension
        print(f"gsplat CUDA rasterizer not available: {type(error).__name__}: {str(error)[:200]}")
        return False


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


def run_once(method, scene, viewmat, K, size, backward):
    params = {key: value.clone().requires_grad_(backward) for key, value in scene.items()}
    out = method(*params.values(), viewmat, K, size, size)
    if backward:
        (out["render"].sum() + out["alpha"].sum()).backward()
    return out


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_times(methods, scene, viewmat, K, size, backward, repeats, clock):
    """Median time of each method; the methods alternate inside every repeat (same machine load)."""
    device = scene["means"].device
    for method in methods.values():  # warm up (and compile)
        run_once(method, scene, viewmat, K, size, backward)
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, method in methods.items():
            synchronize(device)
            start = clock()
            run_once(method, scene, viewmat, K, size, backward)
            synchronize(device)
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _status_bytes(field):
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _cpu_peak_child(queue, method_name, num, size, channels, threads):
    torch.set_num_threads(threads)
    scene, viewmat, K = make_scene(num, size, channels, torch.device("cpu"))
    method = METHODS[method_name]
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak (VmHWM) to the current resident size
    run_once(method, scene, viewmat, K, size, True)
    queue.put(_status_bytes("VmHWM") - before)


def peak_memory_mb(method_name, num, size, channels, device, method=None):
    if device.type == "cuda":
        scene, viewmat, K = make_scene(num, size, channels, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run_once(method or METHODS[method_name], scene, viewmat, K, size, True)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    if not Path("/proc/self/clear_refs").exists():  # Linux only
        return float("nan")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_cpu_peak_child, args=(queue, method_name, num, size, channels, torch.get_num_threads()))
    child.start()
    peak = queue.get(timeout=900)
    child.join()
    return max(peak, 0) / 2**20


def ours_default(*args):
    return rasterize_gaussians(*args)


def ours_fast(*args):
    return rasterize_gaussians(*args, fast=True)


METHODS = {"ours (default)": ours_default, "ours fast=True": ours_fast, "gsplat torch": gsplat_render}


def check_baseline(scene, viewmat, K, size):
    """The baseline renders the same image as ours (float64, where float32 rounding cannot flip a skip or
    stop decision; alpha_max 0.999 as in gsplat)."""
    scene, viewmat, K = {key: value.double() for key, value in scene.items()}, viewmat.double(), K.double()
    ours = rasterize_gaussians(*scene.values(), viewmat, K, size, size, alpha_max=0.999)
    theirs = gsplat_render(*scene.values(), viewmat, K, size, size)
    for key in ("render", "alpha"):
        error = (ours[key] - theirs[key]).abs().max().item()
        assert error < 1e-9, f"baseline differs from ours in {key}: {error}"
    return max((ours[key] - theirs[key]).abs().max().item() for key in ("render", "alpha"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small scenes, 3 repeats")
    parser.add_argument("--full", action="store_true", help="also 200k Gaussians at 512 x 512")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory", action="store_true", help="also peak memory (fresh subprocess per method)")
    parser.add_argument("--compiled", action="store_true", help="also compiled_rasterizer() (default on CUDA)")
    parser.add_argument("--device", default="all", help="cpu, cuda or all (cuda only when present)")
    parser.add_argument("--timer", choices=["wall", "process"], default="wall",
                        help="wall clock, or CPU time of this process (steadier on a loaded machine; CPU only)")
    args = parser.parse_args()

    scenes = [(20_000, 128, 3), (20_000, 128, 64)]
    if args.full:
        scenes += [(200_000, 512, 3), (200_000, 512, 64)]
    repeats = args.repeats
    if args.quick:
        scenes, repeats = [(3_000, 64, 3), (3_000, 64, 64)], 3
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))

    clock = time.process_time if args.timer == "process" else time.perf_counter
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, float32, median of {repeats}, "
          f"{args.timer} time")
    if torch.device("cuda") in devices:
        print(f"GPU: {torch.cuda.get_device_name()}")
    header = ["device", "scene", "method", "fwd s", "fwd+bwd s", "peak MB fwd+bwd", "baseline/this fwd",
              "baseline/this fwd+bwd"]  # fmt: skip
    rows = []
    for device in devices:
        methods, baseline = dict(METHODS), "gsplat torch"
        if args.compiled or device.type == "cuda":
            methods["ours compiled"] = compiled_rasterizer()
        if device.type == "cuda":
            del methods["gsplat torch"]  # CPU-only here (see the module docstring)
            methods["torch.compile(whole)"] = torch.compile(rasterize_gaussians, dynamic=True)
            baseline = "ours (default)"
            if gsplat_cuda_available():
                methods["gsplat CUDA"], baseline = gsplat_cuda_render, "gsplat CUDA"
        print(f"{device.type}: baseline of the ratios = {baseline}")
        for num, size, channels in scenes:
            scene, viewmat, K = make_scene(num, size, channels, device)
            if baseline == "gsplat torch":
                error = check_baseline(scene, viewmat, K, size)
                print(f"  (baseline vs ours, float64, alpha_max 0.999: max abs image difference {error:.1e})")
            elif baseline == "gsplat CUDA":
                ours = rasterize_gaussians(*scene.values(), viewmat, K, size, size, alpha_max=0.999)
                theirs = gsplat_cuda_render(*scene.values(), viewmat, K, size, size)
                error = max((ours[key] - theirs[key]).abs().max().item() for key in ("render", "alpha"))
                print(f"  (gsplat CUDA vs ours, float32, alpha_max 0.999: max abs image difference {error:.1e})")
            times = {bw: median_times(methods, scene, viewmat, K, size, bw, repeats, clock) for bw in (False, True)}
            name = f"{num // 1000}k {size}x{size} D={channels}"
            for method in methods:
                memory = float("nan")
                if args.memory and (method in METHODS or device.type == "cuda"):
                    memory = peak_memory_mb(method, num, size, channels, device, methods[method])
                ratio = [times[bw][baseline] / times[bw][method] for bw in (False, True)]
                rows.append([device.type, name, method, f"{times[False][method]:.4f}", f"{times[True][method]:.4f}",
                             f"{memory:.0f}", f"{ratio[0]:.2f}x", f"{ratio[1]:.2f}x"])  # fmt: skip
                print(" | ".join(rows[-1]), flush=True)
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    print()
    for row in [header, ["-" * w for w in widths]] + rows:
        print(" | ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
    main()
