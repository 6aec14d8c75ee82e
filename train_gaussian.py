"""FiT3D: improve 2D ViT features by 3D-aware fine-tuning (Yue et al., ECCV 2024, arXiv:2407.20229).

Stage I  (--stage lift):     lift the ViT's features of many views of each scene into feature Gaussians.
Stage II (--stage finetune): fine-tune the ViT so its patch features match rendered 3D-aware features.
Probe    (--stage probe):    linear semantic segmentation and depth probes, original features vs the
                             concatenation [original, fine-tuned]. Default: --stage all.

Data: synthetic multi-view RGB-D rooms (minimal3d.synthetic) by default, or --data DIR with one sub-folder
per scene, either
  * nerfstudio / instant-ngp: DIR/<scene>/transforms.json with `frames[i].file_path`,
    `frames[i].transform_matrix` (camera-to-world, OpenGL axes: x right, y up, z backwards; converted here to
    our OpenCV world-to-camera viewmat), intrinsics `fl_x, fl_y, cx, cy` (or `camera_angle_x`), `w, h`
    (top level or per frame), optional `frames[i].depth_file_path` (16-bit PNG, `depth_scale` metres per unit,
    default 0.001), or
  * ScanNet / ScanNet++ export: DIR/<scene>/{color/*.jpg, depth/*.png (mm), pose/*.txt (camera-to-world,
    OpenCV axes), intrinsic/intrinsic_color.txt}.
Images are resized to --height x --width (intrinsics scaled). Without depth, Gaussians start uniformly in the
box around the cameras.

Defaults are a miniature that runs in a few minutes on CPU; the paper's values are in the help texts.
Example: python train_gaussian.py --out runs/fit3d        (synthetic, a few minutes on CPU)
         python train_gaussian.py --data scannetpp_scenes --weights dinov2_vits14_pretrain.pth --steps 30000 \
             --max-gaussians 0 --finetune-lr 1e-5 --epochs 1
"""

import argparse
import copy
import json
import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from minimal3d import runtime
from minimal3d.cameras import camera_center, intrinsics, opengl_to_opencv_c2w, unproject_depth
from minimal3d.gaussians import (FeatureGaussians, GaussianSchedule, accumulate_densification_stats,
                                 build_optimizer, densification_step, feature_loss, load_scene, psnr,
                                 render_features, render_rgb, rgb_loss, save_scene, scene_extent,
                                 update_position_lr)
from minimal3d.probes import (depth_metrics, fit_linear_classifier, fit_linear_regressor,
                              segmentation_metrics)
from minimal3d.vit import build_backbone, load_dinov2, normalize_image, save_dinov2

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--stage", choices=["lift", "finetune", "probe", "all"], default="all")
parser.add_argument("--data", type=str, default=None, help="folder of scenes (see above); default synthetic")
parser.add_argument("--weights", type=str, default=None, help="official DINOv2 .pth; default a random ViT")
parser.add_argument("--arch", type=str, default="vit_tiny", help="architecture of the random ViT")
parser.add_argument("--device", type=str, default="auto")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", type=str, default="runs/fit3d")
parser.add_argument("--quick", action="store_true", help="a run of seconds with tiny sizes (smoke test)")
parser.add_argument("--resume", action="store_true", help="reuse scenes and backbones already in --out")
# data
parser.add_argument("--num-scenes", type=int, default=2, help="synthetic scenes lifted and used to fine-tune")
parser.add_argument("--probe-scenes", type=int, default=5, help="unseen synthetic rooms for the probes")
parser.add_argument("--frames", type=int, default=24, help="views per scene")
parser.add_argument("--height", type=int, default=84)
parser.add_argument("--width", type=int, default=112)
parser.add_argument("--test-every", type=int, default=8, help="every n-th view is held out (3DGS llffhold)")
parser.add_argument("--depth-scale", type=float, default=0.001, help="metres per depth-PNG unit (real data)")
# Stage I (3DGS / FiT3D schedule, compressed to --steps)
parser.add_argument("--steps", type=int, default=120, help="Stage I iterations per scene (paper: 30000)")
parser.add_argument("--max-points", type=int, default=3000, help="initial Gaussians per scene")
parser.add_argument("--max-gaussians", type=int, default=6000,
                    help="cap on densification (not in 3DGS; 0 = unlimited as in the paper)")
parser.add_argument("--feature-dim", type=int, default=64, help="per-Gaussian feature channels (FiT3D: 64)")
parser.add_argument("--sh-degree", type=int, default=3)
parser.add_argument("--feature-lr", type=float, default=None,
                    help="lr of Gaussian features and conv; default min(FiT3D 6.25e-5 x 30000 / --steps, 0.02)")
# Stage II (FiT3D engine.py / finetune.py; defaults compress its thousands of steps into ~100)
parser.add_argument("--finetune-lr", type=float, default=1e-4, help="paper: 1e-5 (thousands of steps)")
parser.add_argument("--weight-decay", type=float, default=1e-4)
parser.add_argument("--batch-size", type=int, default=2)
parser.add_argument("--epochs", type=int, default=5, help="paper: 1 epoch over ScanNet++")
parser.add_argument("--grad-clip", type=float, default=0.1)
# probes
parser.add_argument("--probe-pixels", type=int, default=20000, help="training pixels for the linear probes")
args = parser.parse_args()

if args.quick:
    args.num_scenes, args.probe_scenes, args.frames = 1, 2, 6
    args.height, args.width, args.steps, args.max_points, args.max_gaussians = 28, 42, 12, 400, 800
    args.probe_pixels = 2000

device = runtime.pick_device(args.device)
dist = runtime.init_distributed(device)
device = dist.device
runtime.seed_everything(args.seed, dist.rank)
out_dir = Path(args.out)
out_dir.mkdir(parents=True, exist_ok=True)
run_lift = args.stage in ("lift", "all")
run_finetune = args.stage in ("finetune", "all")
run_probe = args.stage in ("probe", "all")


# ---------------------------------------------------------------------------------------------------
# Data: every scene becomes a dict of images (V,3,H,W) in [0,1], depths (V,H,W) or None, viewmats
# (V,4,4) world-to-camera (OpenCV), Ks (V,3,3), labels (V,H,W) or None, num_classes
# ---------------------------------------------------------------------------------------------------


def resize_views(images, depths, Ks, height, width):
    """Resize (V,3,h,w) images (bilinear) and depths (nearest) and scale the intrinsics to match."""
    sx, sy = width / images.shape[-1], height / images.shape[-2]
    images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    if depths is not None:
        depths = F.interpolate(depths[:, None], size=(height, width), mode="nearest")[:, 0]
    scale = torch.tensor([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], dtype=Ks.dtype)
    return images.clamp(0, 1), depths, scale @ Ks  # pixel-edge convention: u' = sx u for edges and centres


def read_image(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def read_depth(path, depth_scale: float, size) -> torch.Tensor:
    depth = np.asarray(Image.open(path), dtype=np.float32) * depth_scale
    depth = torch.from_numpy(depth)[None, None]
    return F.interpolate(depth, size=size, mode="nearest")[0, 0]  # depth maps may be smaller than colour


def load_transforms_scene(folder: Path) -> dict:
    """nerfstudio / instant-ngp transforms.json; OpenGL camera-to-world -> OpenCV world-to-camera."""
    meta = json.loads((folder / "transforms.json").read_text())
    images, depths, viewmats, Ks = [], [], [], []
    for frame in meta["frames"]:
        path = folder / frame["file_path"]
        if not path.exists() and path.suffix == "":
            path = path.with_suffix(".png")  # instant-ngp sometimes omits the extension
        image = read_image(path)
        height, width = image.shape[-2:]
        cam = {**meta, **frame}
        if "fl_x" in cam:
            fx, fy = cam["fl_x"], cam.get("fl_y", cam["fl_x"])
        elif "camera_angle_x" in cam:
            fx = fy = 0.5 * width / math.tan(0.5 * cam["camera_angle_x"])
        else:
            raise ValueError(f"{folder / 'transforms.json'}: need fl_x/fl_y or camera_angle_x")
        sx, sy = width / cam.get("w", width), height / cam.get("h", height)  # if images were downscaled
        Ks.append(intrinsics(fx * sx, fy * sy, cam.get("cx", width / 2) * sx, cam.get("cy", height / 2) * sy))
        c2w = torch.tensor(frame["transform_matrix"], dtype=torch.float32)
        viewmats.append(torch.linalg.inv(opengl_to_opencv_c2w(c2w)))
        images.append(image)
        if "depth_file_path" in frame:
            depths.append(read_depth(folder / frame["depth_file_path"], args.depth_scale, (height, width)))
    return {"images": torch.stack(images), "depths": torch.stack(depths) if len(depths) == len(images) else None,
            "viewmats": torch.stack(viewmats), "Ks": torch.stack(Ks).float()}


def load_scannet_scene(folder: Path) -> dict:
    """ScanNet / ScanNet++ export: color/, depth/ (mm), pose/ (camera-to-world, OpenCV), intrinsic/."""
    K = torch.from_numpy(np.loadtxt(folder / "intrinsic" / "intrinsic_color.txt", dtype=np.float32))[:3, :3]
    names = sorted((p.stem for p in (folder / "color").glob("*.jpg")), key=lambda s: (len(s), s))
    images, depths, viewmats = [], [], []
    for name in names:
        c2w = torch.from_numpy(np.loadtxt(folder / "pose" / f"{name}.txt", dtype=np.float32))
        if not bool(torch.isfinite(c2w).all()):
            continue  # ScanNet marks failed tracking with -inf poses
        image = read_image(folder / "color" / f"{name}.jpg")
        images.append(image)
        viewmats.append(torch.linalg.inv(c2w))
        depth_path = folder / "depth" / f"{name}.png"
        if depth_path.exists():
            depths.append(read_depth(depth_path, args.depth_scale, image.shape[-2:]))
    return {"images": torch.stack(images), "depths": torch.stack(depths) if len(depths) == len(images) else None,
            "viewmats": torch.stack(viewmats), "Ks": K.expand(len(images), 3, 3).clone()}


def load_real_scenes(root: Path) -> dict:
    scenes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if (folder / "transforms.json").exists():
            scene = load_transforms_scene(folder)
        elif (folder / "color").is_dir() and (folder / "pose").is_dir():
            scene = load_scannet_scene(folder)
        else:
            continue
        keep = torch.linspace(0, len(scene["images"]) - 1, min(args.frames, len(scene["images"]))).round().long()
        images, depths, Ks = resize_views(scene["images"][keep], None if scene["depths"] is None
                                          else scene["depths"][keep], scene["Ks"][keep], args.height, args.width)
        scenes[folder.name] = {"images": images, "depths": depths, "viewmats": scene["viewmats"][keep],
                               "Ks": Ks, "labels": None, "num_classes": 0}
    if not scenes:
        raise ValueError(f"--data {root}: no sub-folder with transforms.json or color/ + pose/")
    return scenes


def synthetic_scenes(first_seed: int, count: int) -> dict:
    from minimal3d.synthetic import NUM_ROOM_CLASSES, room_sequence

    scenes = {}
    for seed in range(first_seed, first_seed + count):
        room = room_sequence(seed, args.frames, args.height, args.width)
        scenes[f"room{seed:03d}"] = {"images": room["images"], "depths": room["depth"], "viewmats": room["viewmats"],
                                     "Ks": room["K"].expand(args.frames, 3, 3).clone(), "labels": room["labels"],
                                     "num_classes": NUM_ROOM_CLASSES}
    return scenes


def split_views(num_views: int) -> tuple[list[int], list[int]]:
    test = [i for i in range(num_views) if i % args.test_every == args.test_every - 1]
    return [i for i in range(num_views) if i not in test], test


# ---------------------------------------------------------------------------------------------------
# ViT features: last block, final LayerNorm (FiT3D forward_2d_model); images resized to multiples of 14
# ---------------------------------------------------------------------------------------------------


def vit_features(backbone, images: torch.Tensor) -> torch.Tensor:
    """images (B,3,H,W) in [0,1] -> patch features (B, D, H//p, W//p)."""
    p = backbone.patch_size
    height, width = images.shape[-2] // p * p, images.shape[-1] // p * p
    x = normalize_image(images)
    if (height, width) != tuple(images.shape[-2:]):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return backbone.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]


def upsample(features: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B,D,h,w) -> (B,D,H,W) bilinear, as FiT3D upsamples the ViT target to image resolution."""
    return F.interpolate(features, size=(height, width), mode="bilinear", align_corners=False)


def original_backbone():
    """--weights, else the seeded random ViT (saved once, so every stage and rank uses the same one)."""
    if args.weights:
        return build_backbone(args.weights).to(device).eval()
    path = out_dir / "backbone_original.pth"
    if path.exists():
        return load_dinov2(path).to(device).eval()
    torch.manual_seed(args.seed)
    backbone = build_backbone(arch=args.arch)
    if dist.is_main:
        save_dinov2(backbone, path)
    return backbone.to(device).eval()


def check_finite(loss: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(f"non-finite loss in {where}: {float(loss)}")


# ---------------------------------------------------------------------------------------------------
# Stage I: lift 2D features into feature Gaussians (train_feat_gaussian.py)
# ---------------------------------------------------------------------------------------------------


def initial_gaussians(scene: dict, train: list[int], vit_width: int, generator) -> FeatureGaussians:
    if scene["depths"] is not None:  # back-projected RGB-D pixels of the training views
        points = unproject_depth(scene["depths"][train], scene["viewmats"][train], scene["Ks"][train])
        colours = scene["images"][train].permute(0, 2, 3, 1)
        valid = torch.isfinite(scene["depths"][train]) & (scene["depths"][train] > 0)
        points, colours = points[valid], colours[valid]
        pick = torch.randperm(len(points), generator=generator)[: args.max_points]
        return FeatureGaussians.from_points(points[pick].to(device), colours[pick].to(device), vit_width=vit_width,
                                            feature_dim=args.feature_dim, sh_degree=args.sh_degree)
    centres = camera_center(scene["viewmats"][train])
    extent = scene_extent(centres)
    return FeatureGaussians.from_box(args.max_points, (centres.amin(0) - extent).to(device),
                                     (centres.amax(0) + extent).to(device), vit_width=vit_width,
                                     feature_dim=args.feature_dim, sh_degree=args.sh_degree, generator=generator)


def lift_scene(name: str, scene: dict, targets: torch.Tensor) -> FeatureGaussians:
    """Optimise one scene's feature Gaussians on its training views (the 3DGS schedule, FiT3D losses).

    targets: (V, D, h, w) ViT patch features of every view, upsampled to pixels inside the loss (FiT3D
    compares at image resolution).
    """
    train, _ = split_views(len(scene["images"]))
    images = scene["images"].to(device)
    viewmats, Ks = scene["viewmats"].to(device), scene["Ks"].to(device)
    height, width = images.shape[-2:]
    generator = torch.Generator().manual_seed(args.seed)
    model = initial_gaussians(scene, train, targets.shape[1], generator)
    extent = scene_extent(camera_center(scene["viewmats"][train]))
    schedule = GaussianSchedule().scaled(args.steps)
    # compressed runs keep the paper's total feature-lr budget (lr x steps), at most 0.02; geometry lrs stay 3DGS's
    budget_lr = min(schedule.feature_lr * GaussianSchedule().iterations / args.steps, 0.02)
    schedule.feature_lr = args.feature_lr or budget_lr
    schedule.max_gaussians = args.max_gaussians or None
    optimizer = build_optimizer(model, schedule, extent)
    order = []
    progress = tqdm(range(1, args.steps + 1), desc=f"lift {name}", disable=not dist.is_main, leave=False)
    for step in progress:
        update_position_lr(optimizer, step, schedule, extent)
        if step % schedule.sh_increase_interval == 0:
            model.active_sh_degree = min(model.active_sh_degree + 1, model.max_sh_degree)
        if not order:  # every training view once per pass, in random order (3DGS viewpoint stack)
            order = [train[i] for i in torch.randperm(len(train), generator=generator)]
        view = order.pop()
        out = render_rgb(model, viewmats[view], Ks[view], width, height)
        out["means2d"].retain_grad()  # its gradient drives densification
        features = render_features(model, viewmats[view], Ks[view], width, height)
        loss_rgb = rgb_loss(out["render"].permute(2, 0, 1), images[view], schedule.lambda_dssim)
        loss_features = feature_loss(features, upsample(targets[view : view + 1], height, width)[0])
        loss = loss_rgb + loss_features
        check_finite(loss, f"Stage I, scene {name}, step {step}")
        loss.backward()
        accumulate_densification_stats(model, out["means2d"].grad, out["radii"], width, height)
        densification_step(model, optimizer, step, schedule, extent, generator=generator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps:
            progress.set_postfix(rgb=f"{float(loss_rgb.detach()):.4f}", feat=f"{float(loss_features.detach()):.4f}",
                                 n=model.num_gaussians)
    return model


def evaluate_scene(model: FeatureGaussians, scene: dict, targets: torch.Tensor, views: list[int]) -> tuple:
    """Mean PSNR of rendered RGB and mean feature L1 (vs the upsampled ViT features) over `views`."""
    height, width = scene["images"].shape[-2:]
    psnrs, l1s = [], []
    with torch.no_grad():
        for v in views:
            viewmat, K = scene["viewmats"][v].to(device), scene["Ks"][v].to(device)
            rgb = render_rgb(model, viewmat, K, width, height)["render"].permute(2, 0, 1).clamp(0, 1)
            psnrs.append(float(psnr(rgb, scene["images"][v].to(device))))
            rendered = render_features(model, viewmat, K, width, height)
            l1s.append(float(feature_loss(rendered, upsample(targets[v : v + 1], height, width)[0])))
    return sum(psnrs) / len(psnrs), sum(l1s) / len(l1s)


def lift_preview(name: str, model: FeatureGaussians, scene: dict, targets: torch.Tensor, view: int) -> None:
    """PNG: ground truth | rendered RGB | PCA of ViT features | PCA of rendered features (same basis)."""
    height, width = scene["images"].shape[-2:]
    viewmat, K = scene["viewmats"][view].to(device), scene["Ks"][view].to(device)
    with torch.no_grad():
        rgb = render_rgb(model, viewmat, K, width, height)["render"].permute(2, 0, 1)
        rendered = render_features(model, viewmat, K, width, height)
    vit = upsample(targets[view : view + 1], height, width)[0]
    basis = runtime.pca_basis(vit)
    runtime.save_png(out_dir / f"lift_{name}.png", [scene["images"][view], rgb.cpu(), runtime.pca_rgb(vit, basis),
                                                    runtime.pca_rgb(rendered, basis)])


def stage_lift(scenes: dict, backbone) -> list[dict]:
    rows = []
    for name in list(scenes)[dist.rank :: dist.world_size]:  # scenes are shared out over torchrun ranks
        scene = scenes[name]
        train, test = split_views(len(scene["images"]))
        with torch.no_grad():
            targets = torch.cat([vit_features(backbone, scene["images"][i : i + 8].to(device))
                                 for i in range(0, len(scene["images"]), 8)])
        path = out_dir / "scenes" / f"{name}.pt"
        if args.resume and path.exists():
            model = load_scene(path).to(device)
        else:
            model = lift_scene(name, scene, targets)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_scene(model, path)
        views = test or train  # fewer than --test-every views: no held-out view, report training views
        held_out_psnr, held_out_l1 = evaluate_scene(model, scene, targets, views)
        rows.append({"scene": name, "gaussians": model.num_gaussians, "views": "held-out" if test else "train",
                     "PSNR": held_out_psnr, "feature_L1": held_out_l1})
        lift_preview(name, model, scene, targets, views[0])
    if dist.enabled:
        gathered = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, rows)
        rows = sorted((row for part in gathered for row in part), key=lambda row: row["scene"])
    return rows


# ---------------------------------------------------------------------------------------------------
# Stage II: 3D-aware fine-tuning (engine.py train_one_epoch)
# ---------------------------------------------------------------------------------------------------


class PatchFeatures(torch.nn.Module):
    """forward = the ViT's normalised last-block patch features, so DDP can wrap it."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return vit_features(self.backbone, images)


def stage_finetune(scenes: dict, original) -> tuple:
    models = {name: load_scene(out_dir / "scenes" / f"{name}.pt", map_location=device).to(device).eval()
              for name in scenes}  # all scenes pre-loaded; targets are rendered on the fly
    samples = [(name, v) for name in scenes for v in split_views(len(scenes[name]["images"]))[0]]
    finetuned = copy.deepcopy(original).train()
    finetuned.mask_token.requires_grad_(False)  # only used for iBOT masking; DDP needs every param used
    student = runtime.wrap_ddp(PatchFeatures(finetuned), dist)
    optimizer = torch.optim.AdamW(finetuned.parameters(), lr=args.finetune_lr, weight_decay=args.weight_decay)
    losses = []
    for epoch in range(args.epochs):
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed + epoch))
        order = order[dist.rank :: dist.world_size].tolist()  # the same permutation on every rank, sharded
        batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        for batch in tqdm(batches, desc=f"fine-tune epoch {epoch}", disable=not dist.is_main, leave=False):
            images, targets = [], []
            with torch.no_grad():
                for index in batch:
                    name, view = samples[index]
                    scene, model = scenes[name], models[name]
                    height, width = scene["images"].shape[-2:]
                    target = render_features(model, scene["viewmats"][view].to(device),
                                             scene["Ks"][view].to(device), width, height)
                    image = scene["images"][view].to(device)
                    if random.random() < 0.5:  # random horizontal flip of image and target together
                        image, target = image.flip(-1), target.flip(-1)
                    images.append(image)
                    targets.append(target)
            outputs = student(torch.stack(images))  # (B, D, h, w)
            targets = F.interpolate(torch.stack(targets), size=outputs.shape[-2:], mode="bilinear",
                                    align_corners=False)  # rendered targets down to the patch grid
            loss = (outputs - targets).abs().mean()
            check_finite(loss, "Stage II")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(finetuned.parameters(), args.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
    finetuned.eval()
    if dist.is_main:
        save_dinov2(finetuned, out_dir / "backbone_finetuned.pth")
    return finetuned, {"steps": len(losses), "loss_first": losses[0] if losses else float("nan"),
                       "loss_last": losses[-1] if losses else float("nan")}


# ---------------------------------------------------------------------------------------------------
# Probes: linear segmentation and depth on [original] vs [original, fine-tuned] features
# ---------------------------------------------------------------------------------------------------


def dense_features(backbones, images: torch.Tensor) -> torch.Tensor:
    """Concatenated patch features of several backbones, bilinearly upsampled to pixels: (B, sum D, H, W)."""
    with torch.no_grad():
        feats = [vit_features(b, images.to(device)) for b in backbones]
    return upsample(torch.cat(feats, dim=1), *images.shape[-2:]).cpu()


def probe_split(probe_scenes: dict) -> tuple[list, list]:
    """(train frames, test frames) as lists of (scene, view). Synthetic: whole scenes; real: views."""
    names = list(probe_scenes)
    if args.data is None:
        return ([(n, v) for n in names[:-1] for v in range(len(probe_scenes[n]["images"]))],
                [(names[-1], v) for v in range(len(probe_scenes[names[-1]]["images"]))])
    train = [(n, v) for n in names for v in split_views(len(probe_scenes[n]["images"]))[0]]
    test = [(n, v) for n in names for v in split_views(len(probe_scenes[n]["images"]))[1]]
    return train, test or train


def stage_probe(probe_scenes: dict, original, finetuned) -> list[dict]:
    train, test = probe_split(probe_scenes)
    generator = torch.Generator().manual_seed(args.seed)

    def frame_data(frame, backbones):
        """Per-pixel features (H*W, C), labels (H*W,) or None, depths (H*W,) or None of one frame."""
        scene, view = probe_scenes[frame[0]], frame[1]
        feats = dense_features(backbones, scene["images"][view : view + 1])[0].flatten(1).T
        labels = scene["labels"][view].flatten() if scene["labels"] is not None else None
        depths = scene["depths"][view].flatten() if scene["depths"] is not None else None
        return feats, labels, depths

    def training_pixels(backbones, per_frame):
        parts = []
        for frame in train:
            feats, labels, depths = frame_data(frame, backbones)
            pick = torch.randperm(len(feats), generator=generator)[:per_frame]
            parts.append((feats[pick], None if labels is None else labels[pick],
                          None if depths is None else depths[pick]))
        cat = lambda items: None if any(i is None for i in items) else torch.cat(items)  # noqa: E731
        return tuple(cat([part[k] for part in parts]) for k in range(3))

    per_frame = max(1, args.probe_pixels // len(train))
    num_classes = max(scene["num_classes"] for scene in probe_scenes.values())
    rows = []
    for label, backbones in [("original", [original]), ("fine-tuned", [finetuned]),
                             ("[original, fine-tuned]", [original, finetuned])]:
        generator.manual_seed(args.seed)  # the same training pixels for every feature set
        feats, labels, depths = training_pixels(backbones, per_frame)
        classifier = fit_linear_classifier(feats, labels, num_classes) if labels is not None else None
        valid = None if depths is None else torch.isfinite(depths) & (depths > 0)
        regressor = fit_linear_regressor(feats[valid], depths[valid]) if depths is not None else None
        predictions, targets = [], []  # test frames one at a time (features of all pixels never stored)
        for frame in test:
            test_feats, test_labels, test_depths = frame_data(frame, backbones)
            predictions.append((None if classifier is None else classifier(test_feats).argmax(1),
                                None if regressor is None else regressor(test_feats)[:, 0].float()))
            targets.append((test_labels, test_depths))
        row = {"features": label, "dim": feats.shape[1]}
        if classifier is not None:
            row.update(segmentation_metrics(torch.cat([p[0] for p in predictions]),
                                            torch.cat([t[0] for t in targets]), num_classes))
        if regressor is not None:
            pred, target = torch.cat([p[1] for p in predictions]), torch.cat([t[1] for t in targets])
            test_valid = torch.isfinite(target) & (target > 0)
            row.update(depth_metrics(pred.clamp_min(1e-3), target, mask=test_valid))
        rows.append(row)
    # PCA before / after fine-tuning with one basis (fitted on the original features)
    name, view = test[0]
    image = probe_scenes[name]["images"][view : view + 1]
    before, after = dense_features([original], image)[0], dense_features([finetuned], image)[0]
    basis = runtime.pca_basis(before)
    runtime.save_png(out_dir / "finetune_pca.png", [image[0], runtime.pca_rgb(before, basis),
                                                    runtime.pca_rgb(after, basis)])
    return rows


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------

scenes = {}  # the lifted scenes; a probe-only run on synthetic data does not need them
if run_lift or run_finetune or (run_probe and args.data):
    scenes = load_real_scenes(Path(args.data)) if args.data else synthetic_scenes(args.seed * 1000, args.num_scenes)
metrics_path = out_dir / "metrics.json"
metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
metrics["config"] = vars(args)
original = original_backbone()
if run_lift:
    metrics["lift"] = stage_lift(scenes, original)
    if dist.is_main:
        print("Stage I: feature Gaussians per scene\n" + runtime.format_table(metrics["lift"]))
if dist.enabled:
    torch.distributed.barrier()
finetuned_path = out_dir / "backbone_finetuned.pth"
if run_finetune and not (args.resume and finetuned_path.exists()):
    _, metrics["finetune"] = stage_finetune(scenes, original)
    if dist.is_main:
        print(f"Stage II: {metrics['finetune']['steps']} steps, L1 {metrics['finetune']['loss_first']:.4f} -> "
              f"{metrics['finetune']['loss_last']:.4f}")
if run_probe and dist.is_main:
    if not finetuned_path.exists():
        raise FileNotFoundError(f"{finetuned_path} is missing: run --stage finetune first")
    finetuned = load_dinov2(finetuned_path).to(device).eval()
    probe_scenes = scenes if args.data else synthetic_scenes(args.seed * 1000 + 500, args.probe_scenes)
    metrics["probe"] = stage_probe(probe_scenes, original, finetuned)
    print("Linear probes (test frames)\n" + runtime.format_table(metrics["probe"]))
if dist.is_main:
    runtime.write_metrics(out_dir, metrics)
