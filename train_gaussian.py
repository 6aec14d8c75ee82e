"""FiT3D: improve 2D ViT features by 3D-aware fine-tuning.

Paper: Yuanwen Yue, Anurag Das, Francis Engelmann, Siyu Tang, Jan Eric Lenssen, "Improving 2D Feature
Representations by 3D-Aware Fine-Tuning", ECCV 2024, arXiv:2407.20229. Official code: ywyue/FiT3D.

Stage 0  (synthetic default): the original ViT is 2D-pretrained here on clean single images of other
                             synthetic rooms (per-pixel class through a linear head; no depth supervision, as
                             DINOv2 has none), a stand-in for DINOv2; --weights loads the real DINOv2 instead,
                             --original random skips it. The lifted and probe rooms are "captured": per-frame
                             exposure, white balance and sensor noise (--camera-jitter) that Stage 0 never saw.
Stage I  (--stage lift):     lift the ViT's features of many views of each scene into feature Gaussians
                             (3DGS with a 64-channel feature per Gaussian and a 3x3 up-projection conv).
Stage II (--stage finetune): fine-tune the ViT so its patch features match the rendered 3D-aware features.
Probes   (--stage probe):    the paper's linear probes on frozen features, original vs [original, fine-tuned]
                             (patch features concatenated, the original's [CLS] token, as the official model):
                             semantic segmentation (linear head on patch features, logits upsampled) and
                             depth (DINOv2 protocol: [CLS] concatenated, 256 bins, classification loss).
The default run (synthetic rooms, a 2D-pretrained vit_tiny, a few minutes on 2 CPU cores) writes the claims
table of metrics.json: `miou` and `depth_rmse` of [original, fine-tuned] vs original on 8 held-out rooms (probe
heads trained on 128 other rooms, 3 views each),
plus the control [original, random ViT] and diagnostics (cross-view consistency of each feature set).
Details, every choice the paper leaves open and every deviation (with its flag): docs/gaussian.md.

--data DIR: one sub-folder per scene, either nerfstudio / instant-ngp (<scene>/transforms.json, OpenGL
camera-to-world, optional depth_file_path) or a ScanNet / ScanNet++ export (<scene>/color/*.jpg,
depth/*.png (mm), pose/*.txt (camera-to-world, OpenCV), intrinsic/intrinsic_color.txt). Segmentation
labels: ScanNet <scene>/label-filt/<frame>.png (ScanNet label ids, mapped to the 20 ScanNet benchmark
classes through scannetv2-labels.combined.tsv in DIR or --label-map), or for any other labelled set
<scene>/label/<frame>.png holding class indices (255 = ignore) with DIR/classes.txt (one name per line).
--weights loads an official DINOv2 .pth (e.g. dinov2_vits14_pretrain.pth, vit.load_dinov2) as the
original backbone; without it the original backbone is a seeded ViT of --arch, 2D-pretrained in Stage 0.

Compiling the rasterizer (on by default on CUDA, --compile): in your own code,
    rasterize = torch.compile(splatting.rasterize_gaussians, dynamic=True)
and call `rasterize` in place of `rasterize_gaussians`; `dynamic=True` marks sizes symbolic, so the
changing number of Gaussians and (tile, Gaussian) pairs does not trigger a recompilation every step.
"""

import argparse
import copy
import csv
import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from minimal3d import runtime
from minimal3d.cameras import camera_center, intrinsics, opengl_to_opencv_c2w, project, unproject_depth
from minimal3d.gaussians import (FeatureGaussians, GaussianSchedule, accumulate_densification_stats,
                                 build_optimizer, densification_step, feature_loss, load_scene, psnr, rgb_loss,
                                 save_scene, scene_extent, update_position_lr)
from minimal3d.probes import (bilinear_taps, depth_metrics, fit_depth_head, fit_linear_classifier,
                              fit_linear_regressor, fit_segmentation_head, segmentation_metrics, with_class_token)
from minimal3d.splatting import rasterize_gaussians
from minimal3d.synthetic import NUM_ROOM_CLASSES, ROOM_CLASS_NAMES, room_sequence
from minimal3d.vit import build_backbone, load_dinov2, normalize_image, save_dinov2

# The 20 classes of the ScanNet benchmark as NYU40 ids (label index = position in this list).
SCANNET20_NYU40_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
SCANNET20_NAMES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
                   "picture", "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink",
                   "bathtub", "otherfurniture")
IGNORE = -1  # label of pixels left out of the segmentation probe
# Synthetic room seeds of one run: seed * 1000 + offset + [0, count); the three sets never overlap.
LIFT_ROOM_OFFSET, PRETRAIN_ROOM_OFFSET, PROBE_ROOM_OFFSET = 0, 200, 500

# Flags whose default depends on --quick: (normal, quick). Explicit flags are never overridden.
PROFILES = {
    "num_scenes": (2, 1), "frames": (24, 6), "height": (84, 28), "width": (112, 42), "steps": (120, 12),
    "max_points": (3000, 400), "max_gaussians": (6000, 800), "epochs": (30, 1),
    "probe_train_scenes": (128, 1), "probe_test_scenes": (8, 1), "probe_frames": (12, 3), "probe_train_frames": (3, 3),
    "probe_pixels": (150, 100), "control": (True, False),
    "pretrain_rooms": (32, 2), "pretrain_frames": (8, 4), "pretrain_steps": (300, 4),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["lift", "finetune", "probe", "all"], default="all")
    parser.add_argument("--data", default=None, help="folder of scenes (layout above); default synthetic rooms")
    parser.add_argument("--weights", default=None,
                        help="an official DINOv2 .pth (vit.load_dinov2, e.g. dinov2_vits14_pretrain.pth) used as "
                             "the original backbone; default: a random ViT of --arch, seeded by --seed")
    parser.add_argument("--arch", default="vit_tiny", choices=["vit_tiny", "vit_small", "vit_base"],
                        help="architecture of the original ViT without --weights; paper: DINOv2 ViT-S")
    parser.add_argument("--original", choices=["pretrained", "random"], default="pretrained",
                        help="without --weights: the original ViT is 2D-pretrained here on other synthetic rooms "
                             "(Stage 0, default; a stand-in for DINOv2) or left random")
    parser.add_argument("--out", default="runs/gaussian")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a run of seconds with tiny sizes (smoke test)")
    parser.add_argument("--resume", action="store_true", help="reuse lifted scenes and backbones found in --out")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="torch.compile the rasterizer (dynamic shapes); auto = on for CUDA, off on CPU")
    # data
    parser.add_argument("--num-scenes", type=int, default=None, help="synthetic rooms lifted for fine-tuning (2)")
    parser.add_argument("--frames", type=int, default=None, help="views per lifted scene (24)")
    parser.add_argument("--view-step", type=float, default=6.0,
                        help="degrees the camera turns between consecutive views of a synthetic lifted room (6)")
    parser.add_argument("--height", type=int, default=None, help="image height (84; multiples of 14 avoid resizing)")
    parser.add_argument("--width", type=int, default=None, help="image width (112)")
    parser.add_argument("--camera-jitter", type=float, default=1.0,
                        help="strength of a per-frame exposure, white-balance and sensor-noise nuisance on the "
                             "synthetic images of the lifted and probe rooms (1.0, default: captures like ScanNet++; "
                             "0 = clean renders)")
    parser.add_argument("--pretrain-camera-jitter", type=float, default=0.0,
                        help="the same nuisance on the Stage 0 images (0, default: the original never sees the "
                             "capture's nuisance, as DINOv2 never saw ScanNet++'s camera)")
    parser.add_argument("--test-every", type=int, default=8, help="every n-th view is held out (3DGS llffhold)")
    parser.add_argument("--depth-scale", type=float, default=0.001, help="metres per depth-PNG unit (real data)")
    parser.add_argument("--label-map", default=None,
                        help="scannetv2-labels.combined.tsv for ScanNet label-filt/ (default: DIR/<that name>)")
    # Stage 0: 2D pretraining of the original ViT (not in the paper, whose original is DINOv2)
    parser.add_argument("--pretrain-rooms", type=int, default=None, help="rooms of the 2D pretraining (32)")
    parser.add_argument("--pretrain-frames", type=int, default=None, help="images per pretraining room (8)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="AdamW steps of the 2D pretraining (300)")
    parser.add_argument("--pretrain-batch", type=int, default=16, help="images per pretraining step")
    parser.add_argument("--pretrain-lr", type=float, default=1e-3, help="peak lr of the 2D pretraining")
    parser.add_argument("--pretrain-task", choices=["semantic", "semantic+depth"], default="semantic",
                        help="what Stage 0 supervises per pixel: the class only (default: like DINOv2, no depth "
                             "supervision) or the class and the log depth")
    # Stage I (3DGS / FiT3D schedule, compressed to --steps)
    parser.add_argument("--steps", type=int, default=None, help="Stage I iterations per scene (120; paper 30000)")
    parser.add_argument("--max-points", type=int, default=None, help="initial Gaussians per scene (3000)")
    parser.add_argument("--max-gaussians", type=int, default=None,
                        help="cap on densification (6000; 0 = unlimited as in the paper)")
    parser.add_argument("--feature-dim", type=int, default=64, help="per-Gaussian feature channels (FiT3D: 64)")
    parser.add_argument("--feature-init", choices=["random", "zero"], default="random",
                        help="Gaussian features start as N(0, std^2) samples (paper 4.2, default) or zeros "
                             "(official code)")
    parser.add_argument("--feature-init-std", type=float, default=0.1,
                        help="std of the random feature init (not given in the paper)")
    parser.add_argument("--sh-degree", type=int, default=3)
    parser.add_argument("--feature-lr", type=float, default=None,
                        help="lr of Gaussian features and conv; default min(FiT3D 6.25e-5 x 30000 / --steps, 0.02)")
    # Stage II (FiT3D engine.py / finetune.py)
    parser.add_argument("--finetune-lr", type=float, default=1e-4,
                        help="AdamW lr (1e-4 for a short CPU run, default; paper 1e-5 over all of ScanNet++)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None,
                        help="Stage II epochs (30, default: 630 steps over the 42 training views of 2 rooms, so the ViT "
                             "reaches its targets; paper 1 epoch over ScanNet++)")
    parser.add_argument("--target-resize", choices=["bilinear", "area"], default="bilinear",
                        help="how rendered features are resized to the patch grid for Stage II: bilinear (official "
                             "code, default) or area (mean over each patch's pixels)")
    parser.add_argument("--finetune-targets", choices=["rendered", "smoothed-original"], default="rendered",
                        help="Stage II targets: the rendered 3D-aware features (FiT3D, default) or, as a diagnostic "
                             "control, the original's own patch features of the same view smoothed in 2D (Gaussian, "
                             "sigma = half a patch): a change toward smoother features without 3D fusion")
    parser.add_argument("--grad-clip", type=float, default=0.1,
                        help="gradient-norm clip of Stage II (official code 0.1, not in the paper; 0 = off)")
    # probes
    parser.add_argument("--probe", choices=["paper", "fast"], default="paper",
                        help="paper: linear heads on patch features with upsampled logits, depth as 256-bin "
                             "classification with [CLS]; fast: L-BFGS pixel classifier and ridge depth")
    parser.add_argument("--assembly", choices=["concat", "add", "linear"], default="concat",
                        help="how original and fine-tuned features are combined (paper: concat)")
    parser.add_argument("--class-token", choices=["original", "assembled"], default="original",
                        help="[CLS] token given to the depth head with assembled features: the original's (default, "
                             "official FiT3D model, which assembles patch features only) or assembled like the patches")
    parser.add_argument("--depth-bins", type=int, default=256, help="bins of the depth probe (DINOv2: 256)")
    parser.add_argument("--probe-weight-decay", type=float, default=1e-4,
                        help="L2 weight of the paper probes' heads (1e-4; the paper's SGD protocol has no such term)")
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=None,
                        help="also probe [original, untrained random ViT]: what the doubled width alone gives "
                             "(default on; off with --quick)")
    parser.add_argument("--probe-train-scenes", type=int, default=None, help="synthetic rooms the probes train on (128: rooms, not views, are the independent samples; the "
                             "[CLS] half of the depth head sees one sample per frame)")
    parser.add_argument("--probe-test-scenes", type=int, default=None,
                        help="other synthetic rooms they are tested on (8)")
    parser.add_argument("--probe-frames", type=int, default=None, help="frames per probe test room (12)")
    parser.add_argument("--probe-train-frames", type=int, default=None,
                        help="frames per probe-training room (3)")
    parser.add_argument("--probe-pixels", type=int, default=None,
                        help="training pixels per frame in the probes' loss (150)")
    args = parser.parse_args(argv)

    for name, (normal, quick) in PROFILES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else normal)
    positive = ["pretrain_rooms", "pretrain_frames", "pretrain_steps", "pretrain_batch", "num_scenes", "frames", "steps", "max_points", "feature_dim", "batch_size", "epochs", "test_every",
                "probe_train_scenes", "probe_test_scenes", "probe_frames", "probe_train_frames", "probe_pixels"]
    for name in positive:
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("height", "width"):
        if not getattr(args, name) >= 14:
            parser.error(f"--{name} must be at least 14 pixels (one ViT patch), got {getattr(args, name)}")
    if not 0 <= args.view_step <= 45:
        parser.error(f"--view-step must be in [0, 45] degrees, got {args.view_step}")
    if args.max_gaussians < 0:
        parser.error(f"--max-gaussians must be >= 0 (0 = unlimited), got {args.max_gaussians}")
    if not 0 <= args.sh_degree <= 3:
        parser.error(f"--sh-degree must be in 0..3, got {args.sh_degree}")
    if args.depth_bins < 2:
        parser.error(f"--depth-bins must be >= 2, got {args.depth_bins}")
    if args.num_scenes > PRETRAIN_ROOM_OFFSET or args.pretrain_rooms > PROBE_ROOM_OFFSET - PRETRAIN_ROOM_OFFSET:
        parser.error(f"--num-scenes must be <= {PRETRAIN_ROOM_OFFSET} and --pretrain-rooms <= "
                     f"{PROBE_ROOM_OFFSET - PRETRAIN_ROOM_OFFSET} (synthetic room seeds of the stages must not overlap)")
    if args.probe_train_scenes + args.probe_test_scenes > 1000 - PROBE_ROOM_OFFSET:
        parser.error(f"--probe-train-scenes + --probe-test-scenes must be <= {1000 - PROBE_ROOM_OFFSET} (synthetic room "
                     "seeds of one run must not reach the next seed's rooms)")
    for name in ("finetune_lr", "depth_scale", "pretrain_lr"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not args.probe_weight_decay >= 0:
        parser.error(f"--probe-weight-decay must be >= 0, got {args.probe_weight_decay}")
    if args.feature_lr is not None and not args.feature_lr > 0:
        parser.error(f"--feature-lr must be > 0, got {args.feature_lr}")
    for name in ("weight_decay", "grad_clip", "feature_init_std", "camera_jitter", "pretrain_camera_jitter"):
        if not getattr(args, name) >= 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("data", "weights", "label_map"):
        path = getattr(args, name)
        if path is not None and not Path(path).exists():
            parser.error(f"--{name.replace('_', '-')} {path}: no such file or folder")
    if args.data is not None and not Path(args.data).is_dir():
        parser.error(f"--data {args.data} must be a folder of scenes")
    if args.weights is not None and Path(args.weights).suffix not in (".pth", ".pt"):
        parser.error(f"--weights must be an official DINOv2 .pth state dict, got {args.weights}")
    return args


# ---------------------------------------------------------------------------------------------------
# Data: a scene is a dict of images (V, 3, H, W) in [0, 1], depths (V, H, W) or None, viewmats (V, 4, 4)
# world-to-camera (OpenCV), Ks (V, 3, 3), labels (V, H, W) int64 (IGNORE = unlabelled) or None
# ---------------------------------------------------------------------------------------------------


def resize_views(images: Tensor, depths: Tensor | None, labels: Tensor | None, Ks: Tensor, height: int,
                 width: int) -> tuple:
    """Resize (V, 3, h, w) images (bilinear), depths and labels (nearest) and scale the intrinsics to match."""
    sx, sy = width / images.shape[-1], height / images.shape[-2]
    images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    if depths is not None:
        depths = F.interpolate(depths[:, None], size=(height, width), mode="nearest")[:, 0]
    if labels is not None:
        labels = F.interpolate(labels[:, None].double(), size=(height, width), mode="nearest")[:, 0].long()
    scale = torch.tensor([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], dtype=Ks.dtype)
    return images.clamp(0, 1), depths, labels, scale @ Ks  # pixel edges scale with the image: u' = sx u


def read_image(path: Path) -> Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def read_depth(path: Path, depth_scale: float, size: tuple[int, int]) -> Tensor:
    depth = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) * depth_scale)[None, None]
    return F.interpolate(depth, size=size, mode="nearest")[0, 0]  # depth maps may be smaller than colour


def read_label_png(path: Path, lookup: Tensor, size: tuple[int, int]) -> Tensor:
    """A label PNG (8 or 16 bit ids) -> (H, W) int64 class indices through ``lookup`` (id -> index or IGNORE)."""
    ids = torch.from_numpy(np.asarray(Image.open(path), dtype=np.int64))
    ids = F.interpolate(ids[None, None].double(), size=size, mode="nearest")[0, 0].long()
    return torch.where(ids < len(lookup), lookup[ids.clamp(max=len(lookup) - 1)], IGNORE)


def scannet_label_lookup(tsv_path: Path) -> Tensor:
    """ScanNet label id -> ScanNet-20 class index (IGNORE for the other classes), from the official
    scannetv2-labels.combined.tsv (columns `id` and `nyu40id`)."""
    with open(tsv_path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows or "id" not in rows[0] or "nyu40id" not in rows[0]:
        raise ValueError(f"{tsv_path}: expected a tab-separated file with columns 'id' and 'nyu40id'")
    lookup = torch.full((max(int(row["id"]) for row in rows) + 1,), IGNORE, dtype=torch.long)
    for row in rows:
        nyu40 = int(row["nyu40id"]) if row["nyu40id"].strip() else 0
        if nyu40 in SCANNET20_NYU40_IDS:
            lookup[int(row["id"])] = SCANNET20_NYU40_IDS.index(nyu40)
    return lookup


def index_label_lookup(num_classes: int) -> Tensor:
    """Identity map for PNGs that already hold class indices; 255 and any id >= num_classes are ignored."""
    lookup = torch.full((65536,), IGNORE, dtype=torch.long)
    lookup[:num_classes] = torch.arange(num_classes)
    return lookup


def label_source(root: Path, label_map: str | None) -> tuple[str | None, Tensor | None, list[str]]:
    """Which label folder a dataset uses, its id -> class lookup and the class names."""
    scannet_tsv = Path(label_map) if label_map else root / "scannetv2-labels.combined.tsv"
    if any(root.glob("*/label-filt")):
        if not scannet_tsv.exists():
            raise ValueError(f"--data {root} has label-filt/ folders (ScanNet label ids): pass --label-map "
                             "scannetv2-labels.combined.tsv or place that file in the data folder")
        return "label-filt", scannet_label_lookup(scannet_tsv), list(SCANNET20_NAMES)
    if any(root.glob("*/label")):
        if not (root / "classes.txt").exists():
            raise ValueError(f"--data {root} has label/ folders: add {root / 'classes.txt'} (one class per line)")
        names = [line.strip() for line in (root / "classes.txt").read_text().splitlines() if line.strip()]
        return "label", index_label_lookup(len(names)), names
    return None, None, []


def load_transforms_scene(folder: Path, depth_scale: float) -> dict:
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
        viewmats.append(torch.linalg.inv(opengl_to_opencv_c2w(torch.tensor(frame["transform_matrix"]).float())))
        images.append(image)
        if "depth_file_path" in frame:
            depths.append(read_depth(folder / frame["depth_file_path"], depth_scale, (height, width)))
    return {"images": torch.stack(images), "depths": torch.stack(depths) if len(depths) == len(images) else None,
            "viewmats": torch.stack(viewmats), "Ks": torch.stack(Ks).float(), "labels": None}


def load_scannet_scene(folder: Path, depth_scale: float, label_folder: str | None, lookup: Tensor | None) -> dict:
    """ScanNet / ScanNet++ export: color/, depth/ (mm), pose/ (camera-to-world, OpenCV), intrinsic/,
    optional label-filt/ or label/ PNGs with the colour frame's name."""
    K = torch.from_numpy(np.loadtxt(folder / "intrinsic" / "intrinsic_color.txt", dtype=np.float32))[:3, :3]
    names = sorted((p.stem for p in (folder / "color").glob("*.jpg")), key=lambda s: (len(s), s))
    images, depths, viewmats, labels = [], [], [], []
    for name in names:
        c2w = torch.from_numpy(np.loadtxt(folder / "pose" / f"{name}.txt", dtype=np.float32))
        if not bool(torch.isfinite(c2w).all()):
            continue  # ScanNet marks failed tracking with -inf poses
        image = read_image(folder / "color" / f"{name}.jpg")
        images.append(image)
        viewmats.append(torch.linalg.inv(c2w))
        if (folder / "depth" / f"{name}.png").exists():
            depths.append(read_depth(folder / "depth" / f"{name}.png", depth_scale, image.shape[-2:]))
        if label_folder and (folder / label_folder / f"{name}.png").exists():
            labels.append(read_label_png(folder / label_folder / f"{name}.png", lookup, image.shape[-2:]))
    if not images:
        raise ValueError(f"{folder}: no colour frame with a finite pose")
    return {"images": torch.stack(images), "depths": torch.stack(depths) if len(depths) == len(images) else None,
            "viewmats": torch.stack(viewmats), "Ks": K.expand(len(images), 3, 3).clone(),
            "labels": torch.stack(labels) if labels and len(labels) == len(images) else None}


def load_real_scenes(root: Path, cfg: argparse.Namespace) -> tuple[dict, list[str]]:
    """Every scene folder under ``root``, ``cfg.frames`` views spread over each sequence, resized."""
    label_folder, lookup, class_names = label_source(root, cfg.label_map)
    scenes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if (folder / "transforms.json").exists():
            scene = load_transforms_scene(folder, cfg.depth_scale)
        elif (folder / "color").is_dir() and (folder / "pose").is_dir():
            scene = load_scannet_scene(folder, cfg.depth_scale, label_folder, lookup)
        else:
            continue
        keep = torch.linspace(0, len(scene["images"]) - 1, min(cfg.frames, len(scene["images"]))).round().long()
        pick = lambda x: None if x is None else x[keep]  # noqa: E731
        images, depths, labels, Ks = resize_views(scene["images"][keep], pick(scene["depths"]), pick(scene["labels"]),
                                                  scene["Ks"][keep], cfg.height, cfg.width)
        scenes[folder.name] = {"images": images, "depths": depths, "labels": labels, "Ks": Ks,
                               "viewmats": scene["viewmats"][keep]}
    if not scenes:
        raise ValueError(f"--data {root}: no sub-folder with transforms.json or color/ + pose/")
    return scenes, class_names


def camera_response(images: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """A per-frame camera nuisance on (V, 3, H, W) images in [0, 1]: exposure gain exp(U(-0.4, 0.4) s),
    white balance exp(U(-0.15, 0.15) s) per channel and sensor noise N(0, (0.04 s)^2) per pixel, s = strength
    (auto exposure and white balance change from frame to frame in ScanNet-like captures)."""
    views = len(images)
    gain = (strength * 0.4 * (2 * torch.rand(views, 1, 1, 1, generator=generator) - 1)).exp()
    balance = (strength * 0.15 * (2 * torch.rand(views, 3, 1, 1, generator=generator) - 1)).exp()
    noise = strength * 0.04 * torch.randn(images.shape, generator=generator)
    return (images * gain * balance + noise).clamp(0, 1)


def synthetic_scenes(seeds: range, frames: int, height: int, width: int, step_degrees: float = 6.0,
                     jitter: float = 0.0) -> dict:
    """Synthetic RGB-D rooms with labels (minimal3d.synthetic.room_sequence), one per seed; ``jitter`` > 0
    applies camera_response of that strength to every frame."""
    scenes = {}
    for seed in seeds:
        room = room_sequence(seed, frames, height, width, step_degrees=step_degrees)
        images = room["images"]
        if jitter > 0:
            images = camera_response(images, jitter, torch.Generator().manual_seed(seed))
        scenes[f"room{seed:05d}"] = {"images": images, "depths": room["depth"], "labels": room["labels"],
                                     "viewmats": room["viewmats"], "Ks": room["K"].expand(frames, 3, 3).clone()}
    return scenes


def split_views(num_views: int, test_every: int) -> tuple[list[int], list[int]]:
    """(training views, held-out views): every test_every-th view is held out (3DGS llffhold)."""
    test = [i for i in range(num_views) if i % test_every == test_every - 1]
    return [i for i in range(num_views) if i not in test], test


# ---------------------------------------------------------------------------------------------------
# ViT features: last block, final LayerNorm (FiT3D forward_2d_model); images resized to multiples of 14
# ---------------------------------------------------------------------------------------------------


def vit_features(backbone, images: Tensor, class_token: bool = False):
    """images (B, 3, H, W) in [0, 1] -> patch features (B, D, H // p, W // p) [and the class token (B, D)]."""
    p = backbone.patch_size
    height, width = images.shape[-2] // p * p, images.shape[-1] // p * p
    x = normalize_image(images, check=False)  # in [0, 1] by construction (loader / synthetic rooms): no per-step sync
    if (height, width) != tuple(images.shape[-2:]):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    patches, cls = backbone.get_intermediate_layers(x, n=1, reshape=True, return_class_token=True, norm=True)[0]
    return (patches, cls) if class_token else patches


def upsample(features: Tensor, height: int, width: int) -> Tensor:
    """(B, D, h, w) -> (B, D, H, W) bilinear, as FiT3D upsamples the ViT target to image resolution."""
    return F.interpolate(features, size=(height, width), mode="bilinear", align_corners=False)


def original_backbone(cfg: argparse.Namespace, out_dir: Path, dist, device: torch.device) -> tuple:
    """--weights, else a seeded ViT of --arch, 2D-pretrained here (--original pretrained, Stage 0) or left
    random; saved once, so every stage and rank uses the same one. Returns (backbone, Stage 0 metrics)."""
    if cfg.weights:
        return build_backbone(cfg.weights).to(device).eval(), None
    path = out_dir / "backbone_original.pth"
    if cfg.resume and path.exists():
        return load_dinov2(path).to(device).eval(), None
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(arch=cfg.arch).to(device)
    report = None
    if cfg.original == "pretrained" and dist.is_main:
        report = pretrain_original(backbone, cfg, device, show_progress=True)
    if dist.is_main:
        save_dinov2(backbone, path)
    if dist.enabled and cfg.original == "pretrained":  # the other ranks read the pretrained one
        torch.distributed.barrier()
        backbone = load_dinov2(path).to(device)
    return backbone.eval(), report


def control_backbone(original, seed: int, device: torch.device):
    """An untrained ViT of the original's architecture (another seed): the doubled-width control."""
    torch.manual_seed(seed + 7919)
    return type(original)(original.config).to(device).eval()


# ---------------------------------------------------------------------------------------------------
# Stage 0 (the miniature's stand-in for DINOv2): 2D pretraining of the original ViT on other rooms
# ---------------------------------------------------------------------------------------------------


def pretrain_original(backbone, cfg: argparse.Namespace, device: torch.device, show_progress: bool) -> dict:
    """Train the ViT in place, from single images of --pretrain-rooms synthetic rooms that no other stage
    sees (with --pretrain-camera-jitter), to predict per pixel the semantic class (and, with --pretrain-task
    semantic+depth, the log depth) through linear heads on its patch features (logits upsampled bilinearly);
    the heads are then dropped. A stand-in for DINOv2: a 2D backbone learnt from images one at a time,
    without depth supervision by default."""
    first = cfg.seed * 1000 + PRETRAIN_ROOM_OFFSET
    rooms = synthetic_scenes(range(first, first + cfg.pretrain_rooms), cfg.pretrain_frames, cfg.height, cfg.width,
                             step_degrees=min(360.0 / cfg.pretrain_frames, 45.0), jitter=cfg.pretrain_camera_jitter)
    images = torch.cat([room["images"] for room in rooms.values()])
    labels = torch.cat([room["labels"] for room in rooms.values()])
    log_depths = torch.cat([room["depths"] for room in rooms.values()]).clamp_min(1e-3).log()
    heads = torch.nn.Conv2d(backbone.embed_dim, NUM_ROOM_CLASSES + 1, 1).to(device)  # classes, log depth
    parameters = list(backbone.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=cfg.pretrain_lr, weight_decay=0.05)
    warmup = max(1, cfg.pretrain_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, cosine decay
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.pretrain_steps)))
    generator = torch.Generator().manual_seed(cfg.seed)
    backbone.train()
    losses = []
    for _ in tqdm(range(cfg.pretrain_steps), desc="2D pretraining", disable=not show_progress, leave=False):
        batch = torch.randint(len(images), (cfg.pretrain_batch,), generator=generator)
        flip = torch.rand(len(batch), generator=generator) < 0.5
        x, y, z = (torch.where(flip.view(-1, *[1] * (t.ndim - 1)), t[batch].flip(-1), t[batch])
                   for t in (images, labels, log_depths))
        outputs = upsample(heads(vit_features(backbone, x.to(device))), *x.shape[-2:])
        loss = F.cross_entropy(outputs[:, :-1], y.to(device))
        if cfg.pretrain_task == "semantic+depth":
            loss = loss + (outputs[:, -1] - z.to(device)).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())
    backbone.eval()
    losses = torch.stack(losses).tolist()  # one host sync
    if not all(math.isfinite(value) for value in losses):
        raise FloatingPointError("non-finite loss in the 2D pretraining")
    tail = max(1, len(losses) // 10)
    return {"rooms": cfg.pretrain_rooms, "images": len(images), "steps": cfg.pretrain_steps,
            "loss_first": sum(losses[:tail]) / tail, "loss_last": sum(losses[-tail:]) / tail}


# ---------------------------------------------------------------------------------------------------
# The rasterizer, eager or compiled, and rendering through it (gaussians.render_rgb / render_features)
# ---------------------------------------------------------------------------------------------------


def make_rasterizer(mode: str, device: torch.device) -> Callable:
    """splatting.rasterize_gaussians, compiled with dynamic shapes when mode is on (or auto on CUDA)."""
    if mode == "on" or (mode == "auto" and device.type == "cuda"):
        return torch.compile(rasterize_gaussians, dynamic=True)
    return rasterize_gaussians


def render_rgb(rasterize: Callable, model: FeatureGaussians, viewmat: Tensor, K: Tensor, width: int,
               height: int) -> dict:
    """Colour through the SH of the active degree (gaussians.render_rgb with the rasterizer passed in)."""
    num_coeffs = (model.active_sh_degree + 1) ** 2
    return rasterize(model.means, model.quats, model.scales, model.opacities, model.sh_coeffs[:, :num_coeffs],
                     viewmat, K, width, height, sh_degree=model.active_sh_degree)


def render_features(rasterize: Callable, model: FeatureGaussians, viewmat: Tensor, K: Tensor, width: int,
                    height: int) -> Tensor:
    """Features composited with detached geometry (FiT3D), up-projected by the scene's conv: (D, H, W)."""
    out = rasterize(model.means, model.quats, model.scales, model.opacities, model.features, viewmat, K, width,
                    height, detach_geometry=True)
    return model.up_projection(out["render"].permute(2, 0, 1)[None])[0]


def check_finite(loss: Tensor, where: str) -> None:
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(f"non-finite loss in {where}: {float(loss)}")


# ---------------------------------------------------------------------------------------------------
# Stage I: lift 2D features into feature Gaussians (train_feat_gaussian.py)
# ---------------------------------------------------------------------------------------------------


def initial_gaussians(scene: dict, train: list[int], vit_width: int, cfg: argparse.Namespace,
                      generator: torch.Generator, device: torch.device) -> FeatureGaussians:
    """Back-projected RGB-D pixels of the training views (or a box around the cameras without depth);
    features N(0, std^2) (paper 4.2: "initialized with a random feature vector") or zeros (official code)."""
    if scene["depths"] is not None:
        depths = scene["depths"][train]
        points = unproject_depth(depths, scene["viewmats"][train], scene["Ks"][train])
        valid = torch.isfinite(depths) & (depths > 0)
        points, colours = points[valid], scene["images"][train].permute(0, 2, 3, 1)[valid]
        pick = torch.randperm(len(points), generator=generator)[: cfg.max_points]
        model = FeatureGaussians.from_points(points[pick].to(device), colours[pick].to(device), vit_width=vit_width,
                                             feature_dim=cfg.feature_dim, sh_degree=cfg.sh_degree)
    else:
        centres = camera_center(scene["viewmats"][train])
        extent = scene_extent(centres)
        model = FeatureGaussians.from_box(cfg.max_points, (centres.amin(0) - extent).to(device),
                                          (centres.amax(0) + extent).to(device), vit_width=vit_width,
                                          feature_dim=cfg.feature_dim, sh_degree=cfg.sh_degree, generator=generator)
    if cfg.feature_init == "random":
        with torch.no_grad():
            model.features.copy_(cfg.feature_init_std * torch.randn(model.features.shape, generator=generator))
    return model


def lift_scene(name: str, scene: dict, targets: Tensor, cfg: argparse.Namespace, rasterize: Callable,
               device: torch.device, show_progress: bool) -> FeatureGaussians:
    """Optimise one scene's feature Gaussians on its training views (3DGS schedule, FiT3D losses).

    targets: (V, D, h, w) ViT patch features of every view, upsampled to pixels inside the loss (FiT3D
    compares at image resolution).
    """
    train, _ = split_views(len(scene["images"]), cfg.test_every)
    images = scene["images"].to(device)
    viewmats, Ks = scene["viewmats"].to(device), scene["Ks"].to(device)
    height, width = images.shape[-2:]
    generator = torch.Generator().manual_seed(cfg.seed)
    model = initial_gaussians(scene, train, targets.shape[1], cfg, generator, device)
    extent = scene_extent(camera_center(scene["viewmats"][train]))
    schedule = GaussianSchedule().scaled(cfg.steps)
    # a compressed run keeps the paper's feature-lr budget (lr x steps), at most 0.02; geometry lrs stay 3DGS's
    budget_lr = min(schedule.feature_lr * GaussianSchedule().iterations / cfg.steps, 0.02)
    schedule.feature_lr = cfg.feature_lr or budget_lr
    schedule.max_gaussians = cfg.max_gaussians or None
    optimizer = build_optimizer(model, schedule, extent)
    order = []
    progress = tqdm(range(1, cfg.steps + 1), desc=f"lift {name}", disable=not show_progress, leave=False)
    for step in progress:
        update_position_lr(optimizer, step, schedule, extent)
        if step % schedule.sh_increase_interval == 0:
            model.active_sh_degree = min(model.active_sh_degree + 1, model.max_sh_degree)
        if not order:  # every training view once per pass, in random order (3DGS viewpoint stack)
            order = [train[i] for i in torch.randperm(len(train), generator=generator)]
        view = order.pop()
        out = render_rgb(rasterize, model, viewmats[view], Ks[view], width, height)
        out["means2d"].retain_grad()  # its gradient drives densification
        features = render_features(rasterize, model, viewmats[view], Ks[view], width, height)
        loss_rgb = rgb_loss(out["render"].permute(2, 0, 1), images[view], schedule.lambda_dssim)
        loss_features = feature_loss(features, upsample(targets[view : view + 1], height, width)[0])
        loss = loss_rgb + loss_features
        loss.backward()
        accumulate_densification_stats(model, out["means2d"].grad, out["radii"], width, height)
        densification_step(model, optimizer, step, schedule, extent, generator=generator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == cfg.steps:  # the only host syncs of the loop
            check_finite(loss.detach(), f"Stage I, scene {name}, step {step}")
            progress.set_postfix(rgb=f"{float(loss_rgb.detach()):.4f}", feat=f"{float(loss_features.detach()):.4f}",
                                 n=model.num_gaussians)
    return model


def evaluate_scene(model: FeatureGaussians, scene: dict, targets: Tensor, views: list[int], rasterize: Callable,
                   device: torch.device) -> tuple[float, float]:
    """Mean PSNR of rendered RGB and mean feature L1 (vs the upsampled ViT features) over ``views``."""
    height, width = scene["images"].shape[-2:]
    psnrs, l1s = [], []
    with torch.no_grad():
        for v in views:
            viewmat, K = scene["viewmats"][v].to(device), scene["Ks"][v].to(device)
            rgb = render_rgb(rasterize, model, viewmat, K, width, height)["render"].permute(2, 0, 1).clamp(0, 1)
            psnrs.append(float(psnr(rgb, scene["images"][v].to(device))))
            rendered = render_features(rasterize, model, viewmat, K, width, height)
            l1s.append(float(feature_loss(rendered, upsample(targets[v : v + 1], height, width)[0])))
    return sum(psnrs) / len(psnrs), sum(l1s) / len(l1s)


def stage_lift(scenes: dict, backbone, cfg: argparse.Namespace, out_dir: Path, rasterize: Callable, dist,
               device: torch.device) -> list[dict]:
    """Lift every scene (shared out over torchrun ranks), save it, report held-out PSNR and feature L1."""
    rows = []
    for name in list(scenes)[dist.rank :: dist.world_size]:
        scene = scenes[name]
        train, test = split_views(len(scene["images"]), cfg.test_every)
        with torch.no_grad():
            targets = torch.cat([vit_features(backbone, scene["images"][i : i + 8].to(device))
                                 for i in range(0, len(scene["images"]), 8)])
        path = out_dir / "scenes" / f"{name}.pt"
        if cfg.resume and path.exists():
            model = load_scene(path, map_location=device).to(device)
        else:
            model = lift_scene(name, scene, targets, cfg, rasterize, device, dist.is_main)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_scene(model, path)
        views = test or train  # fewer than --test-every views: no held-out view, report training views
        held_out_psnr, held_out_l1 = evaluate_scene(model, scene, targets, views, rasterize, device)
        rows.append({"scene": name, "gaussians": model.num_gaussians, "views": "held-out" if test else "train",
                     "PSNR": held_out_psnr, "feature_L1": held_out_l1})
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

    def forward(self, images: Tensor) -> Tensor:
        return vit_features(self.backbone, images)


def to_patch_grid(rendered: Tensor, grid: tuple[int, int], mode: str) -> Tensor:
    """Rendered features (B, D, H, W) -> the patch grid (B, D, h, w): "bilinear" (FiT3D; at 14x it reads about
    one pixel per patch) or "area" (the mean over each patch's pixels)."""
    if mode == "area":
        return F.adaptive_avg_pool2d(rendered, grid)
    return F.interpolate(rendered, size=grid, mode="bilinear", align_corners=False)


def rendered_targets(scenes: dict, models: dict, samples: list, grid: tuple[int, int], rasterize: Callable,
                     device: torch.device, resize: str = "bilinear") -> Tensor:
    """Rendered 3D-aware features of every training view, resized to the patch grid (S, D, h, w) by
    ``to_patch_grid``.

    The Gaussians are frozen in Stage II, so rendering each view once equals FiT3D's rendering under
    no_grad in every step; a horizontal flip commutes with the resize (both are symmetric).
    """
    targets = []
    with torch.no_grad():
        for name, view in samples:
            scene = scenes[name]
            height, width = scene["images"].shape[-2:]
            rendered = render_features(rasterize, models[name], scene["viewmats"][view].to(device),
                                       scene["Ks"][view].to(device), width, height)
            targets.append(to_patch_grid(rendered[None], grid, resize)[0])
    return torch.stack(targets)


def smoothed_original_targets(scenes: dict, original, samples: list, device: torch.device) -> Tensor:
    """The control targets of --finetune-targets smoothed-original: the original ViT's patch features of every
    training view (S, D, h, w), each patch averaged with its neighbours in the same image by a 3 x 3 Gaussian
    of sigma = half a patch (replicate padding). Smooth like the renders, but without fusing views in 3D."""
    offsets = torch.tensor([-1.0, 0.0, 1.0])
    kernel = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 0.5**2))
    kernel = (kernel / kernel.sum()).to(device)
    with torch.no_grad():
        patches = torch.stack([vit_features(original, scenes[name]["images"][view : view + 1].to(device))[0]
                               for name, view in samples])
        channels = patches.shape[1]
        padded = F.pad(patches, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(padded, kernel.expand(channels, 1, 3, 3), groups=channels)


def stage_finetune(scenes: dict, original, cfg: argparse.Namespace, out_dir: Path, rasterize: Callable, dist,
                   device: torch.device) -> tuple:
    """AdamW on the L1 between the ViT's patch features and the rendered features (random hflip), or the control
    targets of --finetune-targets smoothed-original. Returns the fine-tuned ViT and a report: steps, the mean L1
    of the targets to the original's own features of the same views, the loss of the first and last step and
    per epoch."""
    models = {name: load_scene(out_dir / "scenes" / f"{name}.pt", map_location=device).to(device).eval()
              for name in scenes}
    samples = [(name, v) for name in scenes for v in split_views(len(scenes[name]["images"]), cfg.test_every)[0]]
    first = scenes[samples[0][0]]["images"]
    grid = (first.shape[-2] // original.patch_size, first.shape[-1] // original.patch_size)
    if cfg.finetune_targets == "smoothed-original":  # diagnostic control: no 3D fusion in the targets
        targets = smoothed_original_targets(scenes, original, samples, device)
    else:
        targets = rendered_targets(scenes, models, samples, grid, rasterize, device, cfg.target_resize)
    with torch.no_grad():  # how far the targets are from the original's own features of the same views
        distances = [(vit_features(original, scenes[name]["images"][view : view + 1].to(device))[0] - targets[index])
                     .abs().mean() for index, (name, view) in enumerate(samples)]
        targets_l1 = float(torch.stack(distances).mean())
    finetuned = copy.deepcopy(original).train()
    finetuned.mask_token.requires_grad_(False)  # only used for iBOT masking; DDP needs every param used
    student = runtime.wrap_ddp(PatchFeatures(finetuned), dist)
    optimizer = torch.optim.AdamW(finetuned.parameters(), lr=cfg.finetune_lr, weight_decay=cfg.weight_decay)
    losses = []
    flip_rng = random.Random(cfg.seed)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        order = order[dist.rank :: dist.world_size].tolist()  # the same permutation on every rank, sharded
        batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        for batch in tqdm(batches, desc=f"fine-tune epoch {epoch}", disable=not dist.is_main, leave=False):
            images, batch_targets = [], []
            for index in batch:
                name, view = samples[index]
                image, target = scenes[name]["images"][view].to(device), targets[index]
                if flip_rng.random() < 0.5:  # random horizontal flip of image and target together
                    image, target = image.flip(-1), target.flip(-1)
                images.append(image)
                batch_targets.append(target)
            loss = (student(torch.stack(images)) - torch.stack(batch_targets)).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(finetuned.parameters(), cfg.grad_clip)
            optimizer.step()
            losses.append(loss.detach())
    losses = torch.stack(losses).tolist()  # one host sync
    if not all(math.isfinite(value) for value in losses):
        raise FloatingPointError("non-finite loss in Stage II")
    finetuned.eval()
    per_epoch = [sum(part) / len(part) for part in np.array_split(np.array(losses), cfg.epochs) if len(part)]
    return finetuned, {"steps": len(losses), "targets_L1_to_original": targets_l1, "loss_first": losses[0],
                       "loss_last": losses[-1], "loss_per_epoch": [float(value) for value in per_epoch]}


# ---------------------------------------------------------------------------------------------------
# Probes: linear segmentation and depth on frozen features of held-out frames
# ---------------------------------------------------------------------------------------------------


def cross_view_consistency(features: Tensor, depths: Tensor, viewmats: Tensor, Ks: Tensor, stride: int = 3) -> float:
    """How much more alike the features of one surface point are in two views than those of two random points.

    features (V, D, H, W) of V consecutive views of a scene (at pixel resolution), depths (V, H, W), viewmats
    (V, 4, 4), Ks (V, 3, 3). Every ``stride``-th pixel of view v is moved through its depth into view v + 1;
    where it lands inside the image on the visible surface (depth within 5 %), the cosine similarity of the
    two features is taken. Returns mean cosine of these matches minus mean cosine of shuffled pairs.
    """
    if len(features) < 2:
        raise ValueError(f"features must hold at least 2 views, got {len(features)}")
    matched, shuffled = [], []
    height, width = depths.shape[-2:]
    generator = torch.Generator().manual_seed(0)
    for a in range(len(features) - 1):
        b = a + 1
        points = unproject_depth(depths[a], viewmats[a], Ks[a])[::stride, ::stride].reshape(-1, 3)
        source = F.normalize(features[a][:, ::stride, ::stride].reshape(features.shape[1], -1).float(), dim=0)
        uv, z = project(points, viewmats[b], Ks[b])
        u, v = uv[:, 0].floor().long(), uv[:, 1].floor().long()
        inside = (z > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
        u, v = u.clamp(0, width - 1), v.clamp(0, height - 1)
        visible = inside & ((depths[b][v, u] - z).abs() < 0.05 * z)
        target = F.normalize(features[b][:, v, u].float(), dim=0)  # only the compared pixels are normalised
        matched.append((source * target).sum(0)[visible])
        shuffle = torch.randperm(len(u), generator=generator)
        shuffled.append((source * target[:, shuffle]).sum(0)[visible])
    return float(torch.cat(matched).mean() - torch.cat(shuffled).mean())


def frame_features(backbone, frames: list[tuple[dict, int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Patch features (F, D, h, w) and class tokens (F, D) of the frames, in batches of 16."""
    patches, tokens = [], []
    with torch.no_grad():
        for start in range(0, len(frames), 16):
            images = torch.stack([scene["images"][view] for scene, view in frames[start : start + 16]])
            p, c = vit_features(backbone, images.to(device), class_token=True)
            patches.append(p.cpu())
            tokens.append(c.cpu())
    return torch.cat(patches), torch.cat(tokens)


def assemble(original: tuple[Tensor, Tensor], other: tuple[Tensor, Tensor], assembly: str,
             fusion: Tensor | None = None, class_token: str = "original") -> tuple[Tensor, Tensor]:
    """Combine two backbones' (patch features (B, D, h, w), class tokens (B, D)): patches by concat (paper),
    add, or linear (a fixed 2D -> D map ``fusion``, see ``fit_linear_fusion``); the class token is the
    original's (official FiT3D model: only patch features are assembled) or, with class_token="assembled",
    combined the same way as the patches."""
    if assembly == "add":
        patches, tokens = original[0] + other[0], original[1] + other[1]
    else:
        patches, tokens = torch.cat([original[0], other[0]], 1), torch.cat([original[1], other[1]], 1)
        if assembly == "linear":
            patches, tokens = torch.einsum("bchw,cd->bdhw", patches, fusion), tokens @ fusion
    return patches, (original[1] if class_token == "original" else tokens)


def fit_linear_fusion(original: Tensor, other: Tensor) -> Tensor:
    """The linear fusion of --assembly linear: the projection of standardised [original, other] patch
    features (B, 2D, h, w) onto their first D principal directions, fitted on the probe's training frames.
    Returns (2D, D). (A fusion layer trained jointly with a linear head would span the same functions as
    concatenation, so the fusion is fixed here and keeps the original width.)"""
    patches = torch.cat([original, other], 1)
    flat = patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1]).double()
    flat = flat - flat.mean(0)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    return vh[: original.shape[1]].T.float()


def pixel_features(features: Tensor, image_size: tuple[int, int], pixels: Tensor) -> Tensor:
    """Bilinearly upsampled features (B, C, h, w) read at pixels (B, P): (B * P, C)."""
    batch, channels, h, w = features.shape
    indices, weights = bilinear_taps((h, w), image_size, pixels.reshape(-1))
    flat = features.permute(0, 2, 3, 1).reshape(-1, channels)
    indices = indices + (torch.arange(batch).repeat_interleave(pixels.shape[1]) * h * w)[:, None]
    return (flat[indices] * weights.to(flat)[..., None]).sum(1)


def fit_probes(train_features: tuple[Tensor, Tensor], labels: Tensor | None, depths: Tensor | None,
               num_classes: int, cfg: argparse.Namespace) -> dict:
    """Segmentation and depth heads on one feature set. Returns predictors: (patches, cls, size) -> maps."""
    patches, tokens = train_features
    generator = torch.Generator().manual_seed(cfg.seed)
    predictors = {}
    if cfg.probe == "paper":
        if labels is not None:
            head = fit_segmentation_head(patches, labels, num_classes, ignore_index=IGNORE,
                                         pixels_per_image=cfg.probe_pixels, weight_decay=cfg.probe_weight_decay,
                                         generator=generator)
            predictors["segmentation"] = lambda p, c, size: head.predict(p, size)
        if depths is not None:
            depth_head, _ = fit_depth_head(patches, depths, tokens, num_bins=cfg.depth_bins,
                                           pixels_per_image=cfg.probe_pixels, weight_decay=cfg.probe_weight_decay,
                                           generator=generator)
            predictors["depth"] = lambda p, c, size: depth_head.predict(with_class_token(p, c), size)
        return predictors
    # fast probes: L-BFGS pixel classifier and closed-form ridge on upsampled patch features (no [CLS])
    size = tuple((labels if labels is not None else depths).shape[-2:])
    pixels = torch.stack([torch.randperm(size[0] * size[1], generator=generator)[: cfg.probe_pixels]
                          for _ in range(len(patches))])
    features = pixel_features(patches, size, pixels)

    def dense(probe, p, s):
        flat = upsample(p, *s).permute(0, 2, 3, 1).reshape(-1, p.shape[1])
        return probe(flat).reshape(p.shape[0], *s, -1)
    if labels is not None:
        target = labels.flatten(1).gather(1, pixels).reshape(-1)
        classifier = fit_linear_classifier(features, target, num_classes, ignore_index=IGNORE)
        predictors["segmentation"] = lambda p, c, s: dense(classifier, p, s).argmax(-1)
    if depths is not None:
        target = depths.flatten(1).gather(1, pixels).reshape(-1)
        valid = torch.isfinite(target) & (target > 0)
        regressor = fit_linear_regressor(features[valid], target[valid])
        predictors["depth"] = lambda p, c, s: dense(regressor, p, s)[..., 0].float().clamp_min(1e-3)
    return predictors


def evaluate_probes(predictors: dict, features: tuple[Tensor, Tensor], labels: Tensor | None,
                    depths: Tensor | None, num_classes: int) -> tuple[dict, dict]:
    """mIoU / mAcc / aAcc and RMSE / AbsRel over all test pixels; also the predicted maps.

    Two frames at a time: the depth head's (frames, 256, H, W) logits then stay about 20 MB, which the allocator
    reuses, instead of a fresh large buffer page-faulted in every batch (the maps are the same)."""
    patches, tokens = features
    size = tuple((labels if labels is not None else depths).shape[-2:])
    metrics, maps = {}, {}
    with torch.no_grad():
        if "segmentation" in predictors:
            maps["segmentation"] = torch.cat([predictors["segmentation"](patches[i : i + 2], tokens[i : i + 2], size)
                                              for i in range(0, len(patches), 2)])
            metrics.update(segmentation_metrics(maps["segmentation"], labels, num_classes, ignore_index=IGNORE))
        if "depth" in predictors:
            maps["depth"] = torch.cat([predictors["depth"](patches[i : i + 2], tokens[i : i + 2], size)
                                       for i in range(0, len(patches), 2)])
            metrics.update(depth_metrics(maps["depth"], depths))
    return metrics, maps


def probe_frames(scenes: dict, names: list[str], views: Callable) -> list[tuple[dict, int]]:
    return [(scenes[name], v) for name in names for v in views(name)]


def stacked(frames: list[tuple[dict, int]], key: str) -> Tensor | None:
    if any(scene[key] is None for scene, _ in frames):
        return None
    return torch.stack([scene[key][view] for scene, view in frames])


def synthetic_probe_frames(cfg: argparse.Namespace) -> tuple[list, list]:
    """(training frames, test frames) of the probes on synthetic rooms that no other stage sees.

    The --probe-test-scenes test rooms come first, so the number of training rooms never changes the test
    set; each test room gives --probe-frames views, each training room --probe-train-frames views, spread
    around the room. Rooms, not views, are the independent samples of the probes' training set.
    """
    first_test = cfg.seed * 1000 + PROBE_ROOM_OFFSET
    first_train = first_test + cfg.probe_test_scenes

    def rooms(first: int, count: int, frames: int) -> list[tuple[dict, int]]:
        scenes = synthetic_scenes(range(first, first + count), frames, cfg.height, cfg.width,
                                  step_degrees=360.0 / max(frames, 8), jitter=cfg.camera_jitter)
        return probe_frames(scenes, list(scenes), lambda name: range(frames))
    return (rooms(first_train, cfg.probe_train_scenes, cfg.probe_train_frames),
            rooms(first_test, cfg.probe_test_scenes, cfg.probe_frames))


def stage_probe(train_frames: list, test_frames: list, backbones: dict, num_classes: int,
                cfg: argparse.Namespace, device: torch.device) -> tuple[list[dict], dict, dict]:
    """Fit the probes on the training frames of each feature set, evaluate them on the test frames.

    backbones: {"original": ViT, "fine-tuned": ViT, optional "random": ViT}. Rows: original, fine-tuned,
    [original, fine-tuned] (as --assembly says) and the control [original, random]. Returns the rows, the
    predicted test maps and the fitted predictors of each feature set.
    """
    labels, depths = stacked(train_frames, "labels"), stacked(train_frames, "depths")
    test_labels, test_depths = stacked(test_frames, "labels"), stacked(test_frames, "depths")
    if labels is None or test_labels is None:
        labels = test_labels = None
    if depths is None or test_depths is None:
        depths = test_depths = None
    if labels is None and depths is None:
        raise ValueError("the probe frames have neither labels nor depth: nothing to probe")
    train = {name: frame_features(b, train_frames, device) for name, b in backbones.items()}
    test = {name: frame_features(b, test_frames, device) for name, b in backbones.items()}
    symbol = {"concat": "[original, {}]", "add": "original + {}", "linear": "linear[original, {}]"}[cfg.assembly]
    sets = {"original": (train["original"], test["original"]), "fine-tuned": (train["fine-tuned"], test["fine-tuned"])}
    for other in [name for name in ("fine-tuned", "random") if name in backbones]:
        fusion = fit_linear_fusion(train["original"][0], train[other][0]) if cfg.assembly == "linear" else None
        sets[symbol.format(other)] = (assemble(train["original"], train[other], cfg.assembly, fusion, cfg.class_token),
                                      assemble(test["original"], test[other], cfg.assembly, fusion, cfg.class_token))
    rows, maps, heads = [], {}, {}
    change = (test["fine-tuned"][0] - test["original"][0]).abs().mean() / test["original"][0].abs().mean()
    print(f"fine-tuning changed the test frames' patch features by {float(change):.1%} (mean |after - before| / "
          "mean |before|)")
    for name, (train_set, test_set) in sets.items():
        heads[name] = fit_probes(train_set, labels, depths, num_classes, cfg)
        metrics, maps[name] = evaluate_probes(heads[name], test_set, test_labels, test_depths, num_classes)
        rows.append({"features": name, "dim": train_set[0].shape[1], **metrics})
        consistency = frames_consistency(test_set[0], test_frames)
        if consistency is not None:
            rows[-1]["consistency"] = consistency
    return rows, maps, heads


def image_free_prior(labels: Tensor | None, depths: Tensor | None, test_labels: Tensor | None,
                     test_depths: Tensor | None, num_classes: int) -> dict:
    """The floor every probe has to clear: predictions that never look at the image.

    Each test pixel gets the most frequent class and the mean depth of its pixel position over the probe's
    training frames (labels, depths: (F, H, W); IGNORE labels and depths <= 0 or not finite left out; a
    position never observed falls back to the overall mode / mean). A probe at this level reads the camera
    path's layout, not the features. Returns mIoU / mAcc / aAcc and RMSE / AbsRel of these predictions.
    """
    metrics = {}
    if labels is not None and test_labels is not None:
        valid = labels != IGNORE
        positions = torch.arange(labels[0].numel()).expand(len(labels), -1).reshape(labels.shape)
        counts = torch.bincount(positions[valid] * num_classes + labels[valid].long(),
                                minlength=labels[0].numel() * num_classes).reshape(*labels.shape[1:], num_classes)
        counts[counts.sum(-1) == 0] = counts.sum((0, 1))
        prediction = counts.argmax(-1).expand(len(test_labels), -1, -1)
        metrics.update(segmentation_metrics(prediction, test_labels, num_classes, ignore_index=IGNORE))
    if depths is not None and test_depths is not None:
        valid = torch.isfinite(depths) & (depths > 0)
        summed, seen = torch.where(valid, depths, 0.0).double().sum(0), valid.sum(0)
        mean_depth = torch.where(seen > 0, summed / seen.clamp_min(1), summed.sum() / seen.sum())
        metrics.update(depth_metrics(mean_depth.float().expand(len(test_depths), -1, -1), test_depths))
    return metrics


def frames_consistency(patches: Tensor, frames: list[tuple[dict, int]]) -> float | None:
    """cross_view_consistency of patch features (F, D, h, w), upsampled to pixels, over consecutive frames of
    the same scene, averaged over scenes; None without depth or without two frames of one scene."""
    values, start = [], 0
    while start < len(frames):
        scene = frames[start][0]
        end = start
        while end < len(frames) and frames[end][0] is scene:
            end += 1
        views = [view for _, view in frames[start:end]]
        if scene["depths"] is None:
            return None
        height, width = scene["images"].shape[-2:]
        if len(views) > 1:
            values.append(cross_view_consistency(upsample(patches[start:end], height, width), scene["depths"][views],
                                                 scene["viewmats"][views], scene["Ks"][views]))
        start = end
    values = [value for value in values if math.isfinite(value)]
    return sum(values) / len(values) if values else None


def lifted_diagnostics(scenes: dict, models: dict, backbones: dict, segmentation_head: Callable | None,
                       test_every: int, target_resize: str, rasterize: Callable, device: torch.device) -> list[dict]:
    """What lifting and fine-tuning do to the features of the lifted scenes' views, per feature set
    (original, rendered from the Gaussians, fine-tuned): cross-view consistency (all views) at pixel
    resolution and read on the patch grid (`consistency_patch_grid`: the rendered features resized to the
    grid as Stage II reads them, then upsampled like the ViT's; equal to `consistency` for the ViT's
    features), and on the held-out views the mean L1 to the rendered features (patch grid) and the mIoU
    of the original features' segmentation probe applied to them (the probe heads are fitted on other rooms)."""
    sums: dict = {}
    for name, scene in scenes.items():
        images = scene["images"].to(device)
        height, width = images.shape[-2:]
        viewmats, Ks = scene["viewmats"].to(device), scene["Ks"].to(device)
        with torch.no_grad():
            patches = {key: torch.cat([vit_features(b, images[i : i + 8]) for i in range(0, len(images), 8)])
                       for key, b in backbones.items()}
            rendered = torch.stack([render_features(rasterize, models[name], viewmats[v], Ks[v], width, height)
                                    for v in range(len(images))])
        grid = patches["original"].shape[-2:]
        patches["rendered"] = to_patch_grid(rendered, grid, target_resize)
        pixels = {key: upsample(p, height, width) for key, p in patches.items()}
        pixels["rendered"] = rendered
        train, held_out = split_views(len(images), test_every)
        held_out = held_out or train  # fewer than test_every views: no held-out view, use the training views
        for key in ("original", "rendered", "fine-tuned"):
            row = sums.setdefault(key, {"consistency": [], "consistency_patch_grid": [], "L1_to_rendered": [],
                                        "predictions": [], "labels": []})
            row["consistency"].append(cross_view_consistency(pixels[key].cpu(), scene["depths"], scene["viewmats"],
                                                             scene["Ks"]))
            if key == "rendered":  # the ViT's pixel features already are their patch grid upsampled
                row["consistency_patch_grid"].append(cross_view_consistency(
                    upsample(patches[key], height, width).cpu(), scene["depths"], scene["viewmats"], scene["Ks"]))
            else:
                row["consistency_patch_grid"].append(row["consistency"][-1])
            row["L1_to_rendered"].append(float((patches[key] - patches["rendered"])[held_out].abs().mean()))
            if segmentation_head is not None:
                row["predictions"].append(segmentation_head(patches[key][held_out].cpu(), None, (height, width)))
                row["labels"].append(scene["labels"][held_out])
    rows = []
    for key, row in sums.items():
        result = {"features": key, "consistency": sum(row["consistency"]) / len(row["consistency"]),
                  "consistency_patch_grid": sum(row["consistency_patch_grid"]) / len(row["consistency_patch_grid"]),
                  "L1_to_rendered": sum(row["L1_to_rendered"]) / len(row["L1_to_rendered"])}
        if row["predictions"]:
            result["mIoU_original_probe"] = segmentation_metrics(torch.cat(row["predictions"]), torch.cat(row["labels"]),
                                                                 NUM_ROOM_CLASSES, ignore_index=IGNORE)["mIoU"]
        rows.append(result)
    return rows


# ---------------------------------------------------------------------------------------------------
# Previews
# ---------------------------------------------------------------------------------------------------


def label_colours(labels: Tensor, num_classes: int) -> Tensor:
    """(H, W) class indices -> (3, H, W) colours of a fixed palette; ignored pixels black."""
    palette = torch.rand(max(num_classes, 1), 3, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.2
    colours = palette[labels.clamp(0, num_classes - 1)]
    return (colours * (labels >= 0)[..., None]).permute(2, 0, 1)


def save_lift_preview(path: Path, scene: dict, view: int, model: FeatureGaussians, original, finetuned,
                      rasterize: Callable, device: torch.device) -> None:
    """Input, RGB render, rendered features, original and fine-tuned ViT features (one PCA basis), depth."""
    height, width = scene["images"].shape[-2:]
    viewmat, K = scene["viewmats"][view].to(device), scene["Ks"][view].to(device)
    image = scene["images"][view : view + 1].to(device)
    with torch.no_grad():
        out = render_rgb(rasterize, model, viewmat, K, width, height)
        rendered = render_features(rasterize, model, viewmat, K, width, height)
        before = upsample(vit_features(original, image), height, width)[0]
        after = upsample(vit_features(finetuned, image), height, width)[0]
    basis = runtime.pca_basis(before)
    rgb = out["render"].permute(2, 0, 1).clamp(0, 1).cpu()
    runtime.save_panels(path, [("input", image[0].cpu()), ("RGB render", rgb),
                               ("rendered features", runtime.pca_rgb(rendered, basis)),
                               ("original features", runtime.pca_rgb(before, basis)),
                               ("fine-tuned features", runtime.pca_rgb(after, basis)),
                               ("rendered depth", runtime.colorize_depth(out["depth_exp"], out["alpha"] > 0.5))],
                        columns=3)


def save_probe_preview(path: Path, frame: tuple[dict, int], index: int, maps: dict, num_classes: int,
                       method: str) -> None:
    """One test frame: input, labels and depth, and the probes' predictions from original and method features."""
    scene, view = frame
    panels = [("input", scene["images"][view])]
    if scene["labels"] is not None and "segmentation" in maps["original"]:
        panels += [("labels", label_colours(scene["labels"][view], num_classes))]
        panels += [(f"{name} seg.", label_colours(maps[name]["segmentation"][index], num_classes))
                   for name in ("original", method)]
    if scene["depths"] is not None and "depth" in maps["original"]:
        depths = [scene["depths"][view]] + [maps[name]["depth"][index] for name in ("original", method)]
        coloured = runtime.colorize_depth(torch.cat(depths, 1)).split(depths[0].shape[1], dim=2)  # one colour scale
        panels += list(zip(["depth", "original depth", f"{method} depth"], coloured))
    runtime.save_panels(path, panels, columns=4)


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started, cpu_started = time.perf_counter(), time.process_time()
    device = runtime.pick_device(args.device)
    dist = runtime.init_distributed(device)
    device = dist.device
    runtime.seed_everything(args.seed, dist.rank)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rasterize = make_rasterizer(args.compile, device)
    run_lift, run_finetune, run_probe = (args.stage in (s, "all") for s in ("lift", "finetune", "probe"))

    class_names = list(ROOM_CLASS_NAMES)
    if args.data:
        scenes, class_names = load_real_scenes(Path(args.data), args)
        short = [name for name, scene in scenes.items() if len(scene["images"]) < args.test_every]
        if run_probe and short:
            raise ValueError(f"--data: scenes {short} have fewer than --test-every={args.test_every} views, so "
                             "none is held out for the probes; lower --test-every or raise --frames")
    else:  # lifted, pretraining and probe rooms never overlap (the *_ROOM_OFFSET constants)
        first_lifted = args.seed * 1000 + LIFT_ROOM_OFFSET
        scenes = synthetic_scenes(range(first_lifted, first_lifted + args.num_scenes), args.frames,
                                  args.height, args.width, step_degrees=args.view_step, jitter=args.camera_jitter)
    metrics_path = out_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if (args.resume and metrics_path.exists()) else {}
    metrics["config"] = vars(args)
    original, pretrain_report = original_backbone(args, out_dir, dist, device)
    if pretrain_report is not None:
        metrics["pretrain"] = pretrain_report
        if dist.is_main:
            print(f"Stage 0: 2D pretraining on {pretrain_report['images']} images of {pretrain_report['rooms']} rooms, "
                  f"loss {pretrain_report['loss_first']:.4f} -> {pretrain_report['loss_last']:.4f}")

    if run_lift:
        metrics["lift"] = stage_lift(scenes, original, args, out_dir, rasterize, dist, device)
        if dist.is_main:
            print("Stage I: feature Gaussians per scene\n" + runtime.format_table(metrics["lift"]))
    if dist.enabled:
        torch.distributed.barrier()
    finetuned_path = out_dir / "backbone_finetuned.pth"
    if run_finetune and not (args.resume and finetuned_path.exists()):
        finetuned, metrics["finetune"] = stage_finetune(scenes, original, args, out_dir, rasterize, dist, device)
        if dist.is_main:
            save_dinov2(finetuned, finetuned_path)
            print(f"Stage II: {metrics['finetune']['steps']} steps toward targets at L1 "
                  f"{metrics['finetune']['targets_L1_to_original']:.4f} from the original's features, L1 "
                  f"{metrics['finetune']['loss_first']:.4f} -> {metrics['finetune']['loss_last']:.4f}")
    if not dist.is_main:
        return metrics
    if not finetuned_path.exists():
        raise FileNotFoundError(f"{finetuned_path} is missing: run --stage finetune first")
    finetuned = load_dinov2(finetuned_path).to(device).eval()

    first = next(iter(scenes))
    lifted_path = out_dir / "scenes" / f"{first}.pt"
    if lifted_path.exists():
        views = split_views(len(scenes[first]["images"]), args.test_every)
        save_lift_preview(out_dir / "preview.png", scenes[first], (views[1] or views[0])[0],
                          load_scene(lifted_path, map_location=device).to(device), original, finetuned, rasterize,
                          device)

    claims = []
    if run_probe:
        if args.data:  # real data: training views of every scene vs their held-out views
            train_frames = probe_frames(scenes, list(scenes), lambda n: split_views(len(scenes[n]["images"]),
                                                                                   args.test_every)[0])
            test_frames = probe_frames(scenes, list(scenes), lambda n: split_views(len(scenes[n]["images"]),
                                                                                  args.test_every)[1])
            num_classes = len(class_names)
        else:  # synthetic: probes train on some unseen rooms and are tested on other unseen rooms
            train_frames, test_frames = synthetic_probe_frames(args)
            num_classes = NUM_ROOM_CLASSES
        backbones = {"original": original, "fine-tuned": finetuned}
        if args.control:
            backbones["random"] = control_backbone(original, args.seed, device)
        rows, maps, heads = stage_probe(train_frames, test_frames, backbones, num_classes, args, device)
        metrics["probe"] = rows
        print("Linear probes (test frames)\n" + runtime.format_table(rows))
        metrics["probe_image_free_prior"] = image_free_prior(
            stacked(train_frames, "labels"), stacked(train_frames, "depths"), stacked(test_frames, "labels"),
            stacked(test_frames, "depths"), num_classes)
        print("Without the image (per-pixel mode / mean of the probe's training frames): "
              + ", ".join(f"{key} {value:.4f}" for key, value in metrics["probe_image_free_prior"].items()))
        if not args.data and all((out_dir / "scenes" / f"{name}.pt").exists() for name in scenes):
            models = {name: load_scene(out_dir / "scenes" / f"{name}.pt", map_location=device).to(device)
                      for name in scenes}
            metrics["lifted_features"] = lifted_diagnostics(
                scenes, models, {"original": original, "fine-tuned": finetuned},
                heads["original"].get("segmentation"), args.test_every, args.target_resize, rasterize, device)
            print("Features of the lifted rooms' views (consistency: all views; the rest: held-out views)\n"
                  + runtime.format_table(metrics["lifted_features"]))
        base, method = rows[0], rows[2]
        if "mIoU" in base:
            claims.append(runtime.claim("FiT3D Table 1: [original, fine-tuned] features segment better than the "
                                        "original ones (linear probe, held-out scenes)", "miou", True,
                                        (base["features"], base["mIoU"]), (method["features"], method["mIoU"])))
        if "RMSE" in base:
            claims.append(runtime.claim("FiT3D Table 2: [original, fine-tuned] features predict depth better than "
                                        "the original ones (linear probe, held-out scenes)", "depth_rmse", False,
                                        (base["features"], base["RMSE"]), (method["features"], method["RMSE"])))
        save_probe_preview(out_dir / "probes.png", test_frames[0], 0, maps, num_classes, method["features"])
        print("Claims\n" + runtime.format_claims(claims))
    metrics["claims"] = claims
    metrics["time"] = {"wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu_started}
    runtime.write_metrics(out_dir, metrics)
    torch.save({"config": vars(args), "model": finetuned.state_dict(), "finetune": metrics.get("finetune")},
               out_dir / "gaussian.pt")
    return metrics


if __name__ == "__main__":
    main()
