"""Pri3D: pretrain a 2D U-Net with 3D priors from unlabelled RGB-D sequences, fine-tune it for segmentation.

Paper: Ji Hou, Saining Xie, Benjamin Graham, Angela Dai, Matthias Nießner, "Pri3D: Can 3D Priors Help 2D
Representation Learning?", ICCV 2021, arXiv:2104.11225. Official code: Sekunde/Pri3D. Every choice where
the paper and the official code differ is a flag; the default is the paper's (see --help, docs/pri3d.md).

    python train_pri3d.py                                  # synthetic rooms: pretrain, fine-tune, claims table
    python train_pri3d.py --weights resnet18.pth           # + the ImageNet rows (torchvision state dict)
    python train_pri3d.py --data /path/scannet_export      # ScanNet SensReader export (layout below)
    python train_pri3d.py --finetune --checkpoint runs/pri3d/pri3d.pt   # downstream only
    torchrun --nproc_per_node=2 train_pri3d.py ...          # data-parallel pretraining (gradient all-reduce)

Data (default): 12 unlabelled synthetic rooms give the pretraining pairs (frames with >= 30 % overlap),
2 other rooms the labelled fine-tuning frames, 3 more rooms the held-out evaluation frames.
Pretraining (per pair of overlapping frames, batch of B pairs):
  View: pixels of both frames that see the same 3D point (depth re-projection within --max-distance) are
        positives, the other matched pixels negatives: PointInfoNCE (Eq. 1) on 1024 sampled matches of the
        half-resolution feature maps (p // 2), loss / B.
  Geo:  each frame's chunk of the scene geometry (voxels: occupancy, or colour with --geo-input colour) goes
        through a sparse 3D U-Net; voxels seen by a pixel are positives of that pixel: PointInfoNCE after
        linear heads w2d, w3d, loss / (2B) per frame.
  Depth: an auxiliary 1x1-conv depth head with Pri3D's depth loss (official default; --no-depth-loss).
  Run for View+Geo and, with --ablations (off by default: CPU budget), View only and Geo only.
Fine-tuning: each initialisation (scratch = random; ImageNet with --weights; each Pri3D checkpoint) gets the
same frames, steps and lr: the U-Net (all but its last 1x1 conv) + 1x1 conv to classes, cross-entropy, at
--label-fraction (the small budget) and 100 % of the labelled frames; mIoU on the held-out rooms.
Claims (metrics.json): miou_low_labels and miou, scratch vs Pri3D View+Geo.
Outputs in --out: metrics.json, pri3d.pt (config + 2D backbone; pri3d_view.pt, pri3d_geo.pt for the
ablations), *_last.pt (--resume), pretrain_*.png and segmentation_*.png (labelled panels).

ScanNet layout (``reader.py`` export, one folder per scene): <scene>/color/<id>.jpg|png,
<scene>/depth/<id>.png (uint16 mm, 0 = hole), <scene>/pose/<id>.txt (4x4 camera-to-world),
<scene>/intrinsic/intrinsic_depth.txt (4x4), optional <scene>/label/<id>.png (NYU40 ids; mapped to the 20
ScanNet benchmark classes, others ignored). The last ~20 % of scene folders are held out. Pretraining uses
frames with id % --frame-skip == 0, fine-tuning id % --finetune-frame-skip == 0, all with finite poses,
resized to --height x --width (depth/labels nearest). The pair list is cached in <data>/pri3d_pairs/.
"""

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from minimal3d import runtime
from minimal3d.correspondences import (depth_to_world, frame_chunk_voxels, overlap_points, pixel_correspondences,
                                       pixel_overlap, point_overlap, sample_matches, voxel_pixel_correspondences,
                                       voxelize_points)
from minimal3d.point_info_nce import depth_loss, point_info_nce
from minimal3d.probes import segmentation_metrics
from minimal3d.resunet import ResUNet, load_torchvision_resnet
from minimal3d.sparse_conv import SparseTensor, batch_coordinates, minkunet14, minkunet34c
from minimal3d.synthetic import ROOM_CLASS_NAMES, room_sequence
from minimal3d.vit import normalize_image


SYNTHETIC = dict(height=64, width=80, steps=150, voxel_size=0.1, finetune_steps=100, finetune_batch_size=4)
SCANNET = dict(height=240, width=320, steps=60000, voxel_size=0.02, finetune_steps=20000, finetune_batch_size=8)
QUICK = dict(height=32, width=48, steps=3, voxel_size=0.2, finetune_steps=3, finetune_batch_size=2, rooms=1,
             label_rooms=1, val_rooms=1, frames=5, num_matches=128)
THRESHOLDS = dict(paper=(0.02, 0.02), official=(0.05, 0.2))  # (pixel-pixel, voxel-pixel) depth tolerance, metres


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=None, help="ScanNet export folder (layout above); synthetic rooms when omitted")
    parser.add_argument("--weights", default=None,
                        help="a torchvision ResNet state dict (.pth of resnet18/resnet50 matching --backbone) loaded "
                             "into the 2D encoder: ImageNet initialisation as in the paper. Adds the rows "
                             "'ImageNet init' and 'Pri3D (from ImageNet)'; 'scratch' stays random init")
    parser.add_argument("--out", default="runs/pri3d")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a run of seconds (smoke test); explicit flags win")
    parser.add_argument("--resume", action="store_true", help="continue pretraining from <out>/pri3d_last.pt")
    # data
    parser.add_argument("--height", type=int, default=None, help="240 for ScanNet (paper); synthetic 64")
    parser.add_argument("--width", type=int, default=None, help="320 for ScanNet (paper); synthetic 80")
    parser.add_argument("--frame-skip", type=int, default=25, help="ScanNet: pretraining frames (official export)")
    parser.add_argument("--finetune-frame-skip", type=int, default=100,
                        help="ScanNet: labelled frames for fine-tuning, every 100th (paper, scannet_frames_25k); "
                             "25 = every pretraining frame")
    parser.add_argument("--overlap", default="paper", choices=["paper", "official"],
                        help="pair overlap: paper = matched pixels of both frames / valid pixels of both; "
                             "official = max over both directions of 5 cm points with a neighbour within 7.5 cm")
    parser.add_argument("--min-overlap", type=float, default=0.3, help="pairs with overlap >= 30%% (paper and code)")
    parser.add_argument("--rooms", type=int, default=None, help="synthetic: unlabelled pretraining rooms (default 12)")
    parser.add_argument("--label-rooms", type=int, default=None,
                        help="synthetic: labelled fine-tuning rooms, disjoint from the pretraining rooms (default 2)")
    parser.add_argument("--val-rooms", type=int, default=None, help="synthetic: held-out evaluation rooms (default 3)")
    parser.add_argument("--frames", type=int, default=None, help="synthetic: frames per room (default 16)")
    parser.add_argument("--convention", default="minimal3d", choices=["minimal3d", "pri3d"],
                        help="pixel convention; pri3d also uses the official fixed ScanNet intrinsics")
    # pretraining
    parser.add_argument("--mode", default="view+geo", choices=["view", "geo", "view+geo"],
                        help="the prior(s) of the main Pri3D row")
    parser.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=False,
                        help="also pretrain View-only and Geo-only (the paper's ablation rows; fine-tuned at the "
                             "small label budget). Off by default: on 2 CPU cores the two extra pretrainings take "
                             "the default run from about 3.5 to 6.5 minutes")
    parser.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet50"])
    parser.add_argument("--backbone3d", default="minkunet14", choices=["minkunet14", "minkunet34c"],
                        help="official: minkunet34c; minkunet14 = half width, one block per stage (CPU)")
    parser.add_argument("--geo-input", default="occupancy", choices=["occupancy", "colour"],
                        help="3D network input: occupancy of the reconstruction (paper) or voxel colours (official)")
    parser.add_argument("--loss", default="paper", choices=["paper", "official"],
                        help="PointInfoNCE form: paper Eq. 1 (one direction, q -> k) or official symmetric "
                             "(average of both directions); both L2-normalise the features")
    parser.add_argument("--thresholds", default="paper", choices=list(THRESHOLDS),
                        help="match depth tolerances: paper 2 cm for pixel-pixel and voxel-pixel; official 5 cm "
                             "and 0.2 m (--max-distance / --max-depth-diff override each)")
    parser.add_argument("--max-distance", type=float, default=None, help="pixel-pixel depth tolerance (m)")
    parser.add_argument("--max-depth-diff", type=float, default=None, help="voxel-pixel depth tolerance (m)")
    parser.add_argument("--depth-loss", action=argparse.BooleanOptionalAction, default=True,
                        help="auxiliary depth loss: on in the official scripts/scannet.sh (the paper does not "
                             "describe it; the maintainers report ~+1 mIoU)")
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps: paper 60000; synthetic 150")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step and process (official 8/GPU)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD, momentum 0.9, dampening 0.1 (official)")
    parser.add_argument("--schedule", default="exp", choices=["exp", "poly"],
                        help="exp: paper, lr x0.99 every 1000 steps; poly: official code, PolyLR(0.9)")
    parser.add_argument("--temperature", type=float, default=0.4, help="paper and official script")
    parser.add_argument("--num-matches", type=int, default=None,
                        help="matches sampled per pair, with replacement iff fewer (official 1024)")
    parser.add_argument("--voxel-size", type=float, default=None, help="2 cm (paper); synthetic 10 cm")
    parser.add_argument("--loss-chunk-size", type=int, default=None, help="stream the n x n logits")
    parser.add_argument("--save-every", type=int, default=500)
    # downstream
    parser.add_argument("--finetune", action="store_true", help="skip pretraining, fine-tune --checkpoint")
    parser.add_argument("--checkpoint", default=None, help="Pri3D checkpoint (pri3d.pt) for --finetune")
    parser.add_argument("--no-finetune", action="store_true", help="pretraining only")
    parser.add_argument("--label-fraction", type=float, default=None,
                        help="the small label budget (fraction of labelled frames; also 100%%); synthetic 1/8")
    parser.add_argument("--finetune-steps", type=int, default=None, help="synthetic default 100; same for every row")
    parser.add_argument("--finetune-batch-size", type=int, default=None, help="official 8; synthetic 4")
    parser.add_argument("--finetune-lr", type=float, default=0.01, help="official semseg: SGD 0.01, PolyLR")
    args = parser.parse_args(argv)
    defaults = dict(SYNTHETIC if args.data is None else SCANNET, rooms=12, label_rooms=2, val_rooms=3, frames=16,
                    num_matches=1024, label_fraction=0.125)
    if args.quick:
        defaults.update(QUICK)
    for key, value in defaults.items():  # fill only what was not given: --quick never overrides a flag
        if getattr(args, key) is None:
            setattr(args, key, value)
    pixel_tolerance, voxel_tolerance = THRESHOLDS[args.thresholds]
    args.max_distance = pixel_tolerance if args.max_distance is None else args.max_distance
    args.max_depth_diff = voxel_tolerance if args.max_depth_diff is None else args.max_depth_diff
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse nonsense before any work (SystemExit 2 naming the flag)."""
    positive_ints = ("height", "width", "frame_skip", "finetune_frame_skip", "rooms", "label_rooms", "val_rooms",
                     "frames", "steps", "batch_size", "num_matches", "save_every", "finetune_steps",
                     "finetune_batch_size")
    for key in positive_ints:
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    for key in ("lr", "temperature", "voxel_size", "max_distance", "max_depth_diff", "finetune_lr"):
        value = getattr(args, key)
        if not (value > 0 and math.isfinite(value)):
            parser.error(f"--{key.replace('_', '-')} must be finite and > 0, got {value}")
    if args.loss_chunk_size is not None and args.loss_chunk_size < 1:
        parser.error(f"--loss-chunk-size must be >= 1, got {args.loss_chunk_size}")
    if not 0 < args.label_fraction <= 1:
        parser.error(f"--label-fraction must be in (0, 1], got {args.label_fraction}")
    if not 0 <= args.min_overlap <= 1:
        parser.error(f"--min-overlap must be in [0, 1], got {args.min_overlap}")
    if args.height < 32 or args.width < 32:
        parser.error(f"--height and --width must be >= 32 (stride-32 encoder), got {args.height} x {args.width}")
    if args.data is None and args.frames < 2:
        parser.error(f"--frames must be >= 2 (pairs of frames), got {args.frames}")
    if args.weights is not None and not Path(args.weights).is_file():
        parser.error(f"--weights: no such file {args.weights}")
    if args.data is not None and not Path(args.data).is_dir():
        parser.error(f"--data: no such folder {args.data}")
    if args.finetune and args.no_finetune:
        parser.error("--finetune and --no-finetune exclude each other")
    if args.finetune and args.checkpoint is None:
        parser.error("--finetune needs --checkpoint (a pri3d.pt written by pretraining)")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint: no such file {args.checkpoint}")


# ---------------------------------------------------------------------------------------------------
# Data: scenes of RGB-D frames with poses, the pair list, the geometry chunks
# ---------------------------------------------------------------------------------------------------

SCANNET_NYU40_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)  # 20 classes
SCANNET_CLASS_NAMES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
                       "bookshelf", "picture", "counter", "desk", "curtain", "refrigerator",
                       "shower curtain", "toilet", "sink", "bathtub", "otherfurniture")
# official common/camera_intrinsics.py: one fixed ScanNet intrinsic at 320 x 240, integer pixel centres
PRI3D_FIXED_INTRINSICS = (288.9353025, 288.9353025, 159.5, 119.5)


@dataclass
class Scene:
    name: str
    images: Tensor  # (T, 3, H, W) in [0, 1]
    depth: Tensor  # (T, H, W) metres, 0 = hole
    viewmats: Tensor  # (T, 4, 4) world-to-camera
    K: Tensor  # (3, 3)
    labels: Tensor | None  # (T, H, W) int64, -1 = unlabelled


def synthetic_scenes(seeds, args, labelled: bool) -> list[Scene]:
    """Rendered rooms (minimal3d.synthetic.room_sequence); ``labelled=False`` drops the labels (pretraining
    sees RGB-D and poses only)."""
    scenes = []
    for seed in seeds:
        room = room_sequence(seed, num_frames=args.frames, height=args.height, width=args.width)
        scenes.append(Scene(f"room{seed}", room["images"], room["depth"], room["viewmats"], room["K"],
                            room["labels"] if labelled else None))
    return scenes


def _read_image(path: Path, size: tuple[int, int], resample) -> np.ndarray:
    return np.asarray(Image.open(path).resize((size[1], size[0]), resample))


def load_scannet_scene(folder: Path, args, frame_skip: int | None = None) -> Scene:
    """One exported ScanNet scene, every ``frame_skip``-th frame (default --frame-skip), resized to
    (height, width); K from intrinsic_depth.txt (or the official fixed intrinsic with --convention pri3d)."""
    size = (args.height, args.width)
    frame_skip = args.frame_skip if frame_skip is None else frame_skip
    frame_ids = sorted(int(p.stem) for p in (folder / "depth").glob("*.png") if int(p.stem) % frame_skip == 0)
    images, depths, viewmats, labels = [], [], [], []
    for frame in frame_ids:
        pose = torch.from_numpy(np.loadtxt(folder / "pose" / f"{frame}.txt")).reshape(4, 4)
        if not bool(torch.isfinite(pose).all()):  # lost tracking: ScanNet writes -inf poses
            continue
        color_path = next((folder / "color" / f"{frame}{ext}" for ext in (".jpg", ".png")
                           if (folder / "color" / f"{frame}{ext}").exists()), None)
        if color_path is None:
            continue
        images.append(torch.from_numpy(_read_image(color_path, size, Image.BILINEAR)[..., :3].copy()))
        depth = _read_image(folder / "depth" / f"{frame}.png", size, Image.NEAREST).astype(np.float32) / 1000.0
        depths.append(torch.from_numpy(depth))
        viewmats.append(torch.linalg.inv(pose))
        label_path = folder / "label" / f"{frame}.png"
        if label_path.exists():
            nyu40 = torch.from_numpy(_read_image(label_path, size, Image.NEAREST).astype(np.int64))
            label = torch.full_like(nyu40, -1)
            for index, nyu_id in enumerate(SCANNET_NYU40_IDS):
                label[nyu40 == nyu_id] = index
            labels.append(label)
    if len(images) < 2:
        raise ValueError(f"{folder}: fewer than 2 usable frames (need color/, depth/, pose/ with finite poses)")
    if args.convention == "pri3d":  # official adjust_intrinsic of the fixed 320 x 240 intrinsic
        fx, fy, cx, cy = PRI3D_FIXED_INTRINSICS
        K = torch.tensor([[fx * args.width / 320, 0, cx * (args.width - 1) / 319],
                          [0, fy * args.height / 240, cy * (args.height - 1) / 239], [0, 0, 1]], dtype=torch.float64)
    else:  # ScanNet intrinsics put pixel centres on integers: shift by 0.5, then scale
        intrinsic = np.loadtxt(folder / "intrinsic" / "intrinsic_depth.txt")[:3, :3]
        depth_height, depth_width = np.asarray(Image.open(folder / "depth" / f"{frame_ids[0]}.png")).shape[:2]
        sx, sy = args.width / depth_width, args.height / depth_height
        K = torch.tensor([[intrinsic[0, 0] * sx, 0, (intrinsic[0, 2] + 0.5) * sx],
                          [0, intrinsic[1, 1] * sy, (intrinsic[1, 2] + 0.5) * sy], [0, 0, 1]], dtype=torch.float64)
    return Scene(folder.name, torch.stack(images).permute(0, 3, 1, 2).float() / 255, torch.stack(depths),
                 torch.stack(viewmats).float(), K.float(), torch.stack(labels) if len(labels) == len(images) else None)


def overlapping_pairs(scene: Scene, args) -> list[tuple[int, int]]:
    """Frame pairs (i < j) with overlap >= --min-overlap. paper: matched pixels of both frames / valid pixels
    of both (match tolerance --max-distance); official: 5 cm points, neighbour within 7.5 cm, max of both
    directions (PointContrast's compute_full_overlapping.py)."""
    frames = range(len(scene.depth))
    if args.overlap == "paper":
        def overlap(i, j):
            return pixel_overlap(scene.depth[i], scene.depth[j], scene.K, scene.viewmats[i], scene.viewmats[j],
                                 args.max_distance, args.convention)
    else:
        points = [overlap_points(scene.depth[t], scene.K, scene.viewmats[t], 0.05, args.convention) for t in frames]

        def overlap(i, j):
            return point_overlap(points[i], points[j], 0.075)
    return [(i, j) for i in frames for j in frames if i < j and float(overlap(i, j)) >= args.min_overlap]


def cached_pairs(scene: Scene, args) -> list[tuple[int, int]]:
    """The pair list, computed once and cached as JSON (ScanNet: <data>/pri3d_pairs/<scene>_....json)."""
    if args.data is None:
        return overlapping_pairs(scene, args)
    path = Path(args.data) / "pri3d_pairs" / (f"{scene.name}_skip{args.frame_skip}_{args.height}x{args.width}_"
                                              f"{args.convention}_{args.overlap}{args.min_overlap}_"
                                              f"{args.max_distance}.json")
    if path.exists():
        return [tuple(pair) for pair in json.loads(path.read_text())]
    pairs = overlapping_pairs(scene, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pairs))
    return pairs


def scene_cloud(scene: Scene, voxel_size: float, convention: str) -> tuple[Tensor, Tensor]:
    """The scene's geometry: all frames back-projected and fused, one point (centroid) and colour per voxel.
    (The official chunks crop ScanNet's reconstructed mesh; fusing the frames needs no mesh file.)"""
    points, colours = [], []
    for t in range(len(scene.depth)):
        valid = scene.depth[t].reshape(-1) > 0
        points.append(depth_to_world(scene.depth[t], scene.K, scene.viewmats[t], convention).float())
        colours.append(scene.images[t].reshape(3, -1).T[valid])
    points, colours = torch.cat(points), torch.cat(colours)
    _, features, _ = voxelize_points(points, voxel_size, torch.cat([points, colours], 1), convention)
    return features[:, :3], features[:, 3:]


@dataclass
class Chunk:
    voxels: Tensor  # (V, 3) int64
    inputs: Tensor  # (V, 1) ones (occupancy, paper) or (V, 3) colours in [0, 1] (official: RGB / 255)
    pixels: Tensor  # (M, 2) (row, col) of the voxel-pixel matches
    voxel_index: Tensor  # (M,)
    kernel_maps: dict | None = None  # sparse_conv's coordinate/kernel-map cache, filled on first use


def frame_chunk(scene: Scene, cloud: tuple[Tensor, Tensor], t: int, args) -> Chunk:
    voxels, colours = frame_chunk_voxels(cloud[0], scene.depth[t], scene.K, scene.viewmats[t], args.voxel_size,
                                         cloud[1], args.convention)
    pixels, voxel_index = voxel_pixel_correspondences(voxels, scene.depth[t], scene.K, scene.viewmats[t],
                                                      args.voxel_size, args.max_depth_diff, args.convention)
    inputs = colours if args.geo_input == "colour" else torch.ones(len(voxels), 1)
    return Chunk(voxels, inputs, pixels, voxel_index)


def color_jitter(images: Tensor, generator: torch.Generator) -> Tensor:
    """Colour-only augmentation (official: ColorJitter(0.4, 0.4, 0.4) p=0.8, grayscale p=0.2; geometry is
    untouched so correspondences stay valid). images: (B, 3, H, W) in [0, 1]."""
    batch = images.shape[0]

    def factors(spread: float) -> Tensor:
        apply = torch.rand(batch, 1, 1, 1, generator=generator) < 0.8
        value = 1 + (torch.rand(batch, 1, 1, 1, generator=generator) * 2 - 1) * spread
        return torch.where(apply, value, torch.ones_like(value)).to(images)

    gray = (images * torch.tensor([0.299, 0.587, 0.114]).to(images).view(1, 3, 1, 1)).sum(1, keepdim=True)
    images = images * factors(0.4)  # brightness
    images = (images - gray.mean((2, 3), keepdim=True)) * factors(0.4) + gray.mean((2, 3), keepdim=True)  # contrast
    images = (images - gray) * factors(0.4) + gray  # saturation
    to_gray = (torch.rand(batch, 1, 1, 1, generator=generator) < 0.2).to(images.device)
    return torch.where(to_gray, gray.expand_as(images), images).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------
# Model and losses
# ---------------------------------------------------------------------------------------------------

class Pri3DNet(nn.Module):
    """2D U-Net (half-resolution features) + optional sparse 3D U-Net with heads w2d, w3d + depth head."""

    def __init__(self, backbone: str = "resnet18", geo: bool = True, depth_head: bool = True,
                 backbone3d: str = "minkunet14", geo_channels: int = 1):
        super().__init__()
        channels = 32 if backbone == "resnet18" else 128  # official Res18UNet / Res50UNet outputs
        self.backbone = ResUNet(18 if backbone == "resnet18" else 50, channels)
        build3d = minkunet14 if backbone3d == "minkunet14" else minkunet34c
        self.backbone3d = build3d(geo_channels, 96) if geo else None  # in: occupancy (1) or colour (3)
        self.w2d = nn.Linear(channels, 64) if geo else None
        self.w3d = nn.Linear(96, 64) if geo else None
        self.depth_head = nn.Conv2d(channels, 1, 1) if depth_head else None

    def forward(self, images: Tensor, chunks: list[Chunk] | None = None):
        """images: (N, 3, H, W) in [0, 1] -> features (N, C, H/2, W/2), depth (N, 1, H, W) or None,
        voxel features: list of (V_i, 96) per chunk or None. Chunks run one by one (BatchNorm statistics
        per chunk; the official code batches them) and cache their kernel maps."""
        features = self.backbone(normalize_image(images, check=False))  # [0, 1] by construction: no per-step sync
        depth = None
        if self.depth_head is not None:
            depth = F.interpolate(self.depth_head(features), size=images.shape[-2:], mode="bilinear",
                                  align_corners=True)  # official: bilinear, align_corners=True
        voxel_features = None
        if self.backbone3d is not None and chunks:
            voxel_features = []
            for chunk in chunks:  # one chunk at a time so each keeps its kernel maps across steps
                if len(chunk.voxels) == 0:  # a frame without depth: no voxels, its Geo terms are skipped
                    voxel_features.append(features.new_zeros(0, self.backbone3d.config.out_channels))
                    continue
                voxels = SparseTensor(batch_coordinates([chunk.voxels]).to(images.device), chunk.inputs.to(images),
                                      cache=chunk.kernel_maps)
                voxel_features.append(self.backbone3d(voxels).feats)
                chunk.kernel_maps = voxels.cache
        return features, depth, voxel_features


def gather_half_res(features: Tensor, pixels: Tensor) -> Tensor:
    """features (C, h, w) at half resolution, pixels (M, 2) full-resolution (row, col) -> (M, C).
    Official: round((p - 0.5) / 2) == p // 2 for p >= 0."""
    pixels = pixels.to(features.device)
    return features[:, pixels[:, 0] // 2, pixels[:, 1] // 2].T


def contrastive_loss(features1: Tensor, features2: Tensor, matches: list[dict], mode: str, temperature: float,
                     choose, voxel_features1=None, voxel_features2=None, w2d=None, w3d=None,
                     chunk_size: int | None = None, symmetric: bool = True) -> tuple[Tensor, dict]:
    """View and Geo PointInfoNCE of a batch of B frame pairs (official ``Pri3D.forward``).

    features1/2: (B, C, h, w); matches[b]: dict(pos1, pos2 (M, 2) pixel matches; pixels1, voxel_index1,
    pixels2, voxel_index2 voxel-pixel matches of each frame); voxel_features1/2[b]: (V, C3) rows of that
    frame's chunk; choose(b, kind, n) -> sample indices (kind 0 view, 1/2 geo of frame 1/2). symmetric: the
    official two-directional PointInfoNCE (True) or the paper's Eq. 1 (False). No host sync per term.
    As in the official code a pair without pixel matches is skipped entirely when the View loss is on
    (its Geo terms too) while the divisors stay B and 2B. Returns the loss and skip counts.
    """
    batch = len(matches)
    total = features1.new_zeros(())
    counts = dict(view_terms=0, geo_terms=0, skipped_pairs=0, skipped_geo=0)
    for b, match in enumerate(matches):
        if "view" in mode:
            if len(match["pos1"]) == 0:
                counts["skipped_pairs"] += 1
                continue
            sample = choose(b, 0, len(match["pos1"]))
            q = gather_half_res(features1[b], match["pos1"][sample])
            k = gather_half_res(features2[b], match["pos2"][sample])
            total = total + point_info_nce(q, k, temperature, symmetric, chunk_size=chunk_size, check=False) / batch
            counts["view_terms"] += 1
        if "geo" in mode:
            frames = ((features1[b], voxel_features1[b], match["pixels1"], match["voxel_index1"]),
                      (features2[b], voxel_features2[b], match["pixels2"], match["voxel_index2"]))
            for kind, (features, voxel_features, pixels, voxel_index) in enumerate(frames, start=1):
                if len(pixels) == 0:
                    counts["skipped_geo"] += 1
                    continue
                sample = choose(b, kind, len(pixels))
                anchor = w2d(gather_half_res(features, pixels[sample]))
                positive = w3d(voxel_features[voxel_index[sample].to(voxel_features.device)])
                total = total + point_info_nce(anchor, positive, temperature, symmetric, chunk_size=chunk_size,
                                               check=False) / (2 * batch)
                counts["geo_terms"] += 1
    return total, counts


def learning_rate(args, step: int) -> float:
    if args.schedule == "poly":
        return args.lr * (1 - step / max(args.steps, 1)) ** 0.9
    return args.lr * 0.99 ** (step // 1000)  # paper / PointContrast ExpLR


# ---------------------------------------------------------------------------------------------------
# Previews
# ---------------------------------------------------------------------------------------------------

PALETTE = torch.tensor([[0.6, 0.6, 0.6], [0.85, 0.37, 0.0], [0.0, 0.45, 0.7], [0.8, 0.47, 0.65],
                        [0.95, 0.9, 0.25], [0.34, 0.7, 0.91], [0.0, 0.62, 0.45], [0.9, 0.6, 0.0],
                        [0.5, 0.2, 0.7], [0.2, 0.8, 0.2], [0.7, 0.1, 0.1], [0.1, 0.1, 0.5]])


def colorize_labels(labels: Tensor) -> Tensor:
    """(H, W) int, -1 = ignore (black) -> (3, H, W)."""
    colours = PALETTE[labels.clamp_min(0) % len(PALETTE)]
    return (colours * (labels >= 0)[..., None]).permute(2, 0, 1)


def match_preview(image1: Tensor, image2: Tensor, pos1: Tensor, pos2: Tensor) -> list[Tensor]:
    """Matched pixels painted with a colour that encodes their frame-1 position, in both frames."""
    height, width = image1.shape[-2:]
    hue = torch.stack([pos1[:, 1] / width, pos1[:, 0] / height, 1 - pos1[:, 1] / width], dim=1).float()
    view1, view2 = image1.clone() * 0.4, image2.clone() * 0.4
    view1[:, pos1[:, 0], pos1[:, 1]] = hue.T
    view2[:, pos2[:, 0], pos2[:, 1]] = hue.T
    return [image1, view1, view2, image2]


# ---------------------------------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------------------------------

def broadcast_parameters(model: nn.Module, dist: runtime.Dist) -> None:
    """Start every process from rank 0's weights (torchrun)."""
    if dist.enabled:
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)


def average_gradients(model: nn.Module, dist: runtime.Dist) -> None:
    """All-reduce gradients by hand instead of DDP: a process whose pairs were all skipped still joins
    with zero gradients, so no process waits for a parameter that got no gradient."""
    if dist.enabled:
        for parameter in model.parameters():
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            torch.distributed.all_reduce(parameter.grad)
            parameter.grad /= dist.world_size


def pretrain(args, scenes: list[Scene], dist: runtime.Dist, mode: str, checkpoint: Path) -> tuple[dict, dict]:
    """Pretrain a Pri3DNet with the prior(s) ``mode`` ("view", "geo", "view+geo") on the frame pairs of
    ``scenes`` (no labels used). Writes ``checkpoint`` (config + 2D backbone) and returns the backbone's state
    dict and a summary. With --weights the 2D encoder starts from ImageNet, else from random init."""
    device, out = dist.device, Path(args.out)
    generator = torch.Generator().manual_seed(args.seed + 1000 * dist.rank)
    pairs = [(s, i, j) for s, scene in enumerate(scenes) for i, j in cached_pairs(scene, args)]
    if not pairs:
        raise ValueError(f"no frame pairs with overlap >= {args.min_overlap}: more frames or a lower --min-overlap")
    geo = "geo" in mode
    clouds = [scene_cloud(scene, args.voxel_size, args.convention) for scene in scenes] if geo else None
    chunk_cache: dict[tuple[int, int], Chunk] = {}
    match_cache: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = {}

    def chunk_of(s: int, t: int) -> Chunk:
        if (s, t) not in chunk_cache:
            chunk_cache[(s, t)] = frame_chunk(scenes[s], clouds[s], t, args)
        return chunk_cache[(s, t)]

    def matches_of(s: int, i: int, j: int) -> tuple[Tensor, Tensor]:
        if (s, i, j) not in match_cache:
            scene = scenes[s]
            match_cache[(s, i, j)] = pixel_correspondences(scene.depth[i], scene.depth[j], scene.K, scene.viewmats[i],
                                                           scene.viewmats[j], args.max_distance, args.convention)
        return match_cache[(s, i, j)]

    model = Pri3DNet(args.backbone, geo, args.depth_loss, args.backbone3d, 1 if args.geo_input == "occupancy" else 3)
    if args.weights:
        load_torchvision_resnet(model.backbone.encoder, args.weights)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, dampening=0.1)  # official
    start, history = 0, []
    last = out / f"pri3d_{mode.replace('+', '_')}_last.pt"
    if args.resume and last.exists():
        state = runtime.load_checkpoint(last, ("model", "optimizer", "step", "history"))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
    broadcast_parameters(model, dist)
    choose = lambda b, kind, n: sample_matches(n, args.num_matches, generator)  # noqa: E731
    skipped = dict(skipped_pairs=0, skipped_geo=0)
    progress = tqdm(range(start, args.steps), desc=f"pretrain {mode}", disable=not dist.is_main)
    started = time.time()
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, step)
        batch = [pairs[int(i)] for i in torch.randint(len(pairs), (args.batch_size,), generator=generator)]
        images1 = torch.stack([scenes[s].images[i] for s, i, _ in batch])
        images2 = torch.stack([scenes[s].images[j] for s, _, j in batch])
        depth1 = torch.stack([scenes[s].depth[i] for s, i, _ in batch]).to(device)
        depth2 = torch.stack([scenes[s].depth[j] for s, _, j in batch]).to(device)
        matches, chunks1, chunks2 = [], [], []
        for s, i, j in batch:
            pos1, pos2 = matches_of(s, i, j)
            match = dict(pos1=pos1, pos2=pos2)
            if geo:
                chunks1.append(chunk_of(s, i))
                chunks2.append(chunk_of(s, j))
                match.update(pixels1=chunks1[-1].pixels, voxel_index1=chunks1[-1].voxel_index,
                             pixels2=chunks2[-1].pixels, voxel_index2=chunks2[-1].voxel_index)
            matches.append(match)
        images = color_jitter(torch.cat([images1, images2]), generator).to(device)
        features, depth_pred, voxel_features = model(images, chunks1 + chunks2 if geo else None)
        features1, features2 = features.chunk(2)
        loss, counts = contrastive_loss(
            features1, features2, matches, mode, args.temperature, choose,
            voxel_features[:len(batch)] if geo else None, voxel_features[len(batch):] if geo else None,
            model.w2d, model.w3d, args.loss_chunk_size, symmetric=args.loss == "official")
        for key in skipped:
            skipped[key] += counts[key]
        losses = dict(contrastive=loss.detach())
        if depth_pred is not None:  # official: mean of the two views' depth losses
            depth_term = (depth_loss(depth_pred[:len(batch)], depth1.to(depth_pred))
                          + depth_loss(depth_pred[len(batch):], depth2.to(depth_pred))) / 2
            losses["depth"] = depth_term.detach()
            loss = loss + depth_term
        optimizer.zero_grad(set_to_none=False)
        if loss.requires_grad:  # False only when every pair was skipped and the depth loss is off
            loss.backward()
        average_gradients(model, dist)
        optimizer.step()
        if step % 10 == 0 or step + 1 == args.steps:  # read the losses back (a host sync) every 10 steps only
            record = {key: float(runtime.all_reduce_mean(value, dist)) for key, value in losses.items()}
            if not all(math.isfinite(value) for value in record.values()):
                raise FloatingPointError(f"non-finite pretraining loss at step {step}: {record}")
            history.append(dict(step=step, **record))
            progress.set_postfix(**{key: f"{value:.3f}" for key, value in record.items()})
        if dist.is_main and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
            out.mkdir(parents=True, exist_ok=True)
            torch.save(dict(config=vars(args), model=model.state_dict(), optimizer=optimizer.state_dict(),
                            step=step + 1, history=history), last)
    backbone_state = {key: value.detach().cpu() for key, value in model.backbone.state_dict().items()}
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(dict(config=vars(args), mode=mode, backbone=backbone_state), checkpoint)
        save_pretraining_preview(out / f"pretrain_{mode.replace('+', '_')}.png", model, scenes, pairs[0],
                                 matches_of(*pairs[0]), device)
    summary = dict(mode=mode, steps=args.steps, pairs=len(pairs), seconds=time.time() - started, **skipped,
                   first_loss=history[0] if history else None, last_loss=history[-1] if history else None)
    return backbone_state, summary


def save_pretraining_preview(path: Path, model: Pri3DNet, scenes: list[Scene], pair: tuple[int, int, int],
                             matches: tuple[Tensor, Tensor], device: torch.device) -> None:
    """Labelled panels of one pair: both frames, their matches, depth and predicted depth, PCA of features."""
    s, i, j = pair
    scene = scenes[s]
    _, view1, view2, _ = match_preview(scene.images[i], scene.images[j], *matches)
    model.eval()
    with torch.no_grad():
        features, depth_pred, _ = model(torch.stack([scene.images[i], scene.images[j]]).to(device))
    model.train()
    basis = runtime.pca_basis(features[0])
    panels = [("frame 1", scene.images[i]), ("frame 2", scene.images[j]), ("matches in frame 1", view1),
              ("matches in frame 2", view2), ("depth 1", runtime.colorize_depth(scene.depth[i])),
              ("features 1 (PCA)", runtime.pca_rgb(features[0], basis)),
              ("features 2 (PCA)", runtime.pca_rgb(features[1], basis))]
    if depth_pred is not None:
        panels.insert(5, ("predicted depth 1", runtime.colorize_depth(depth_pred[0, 0].cpu(), scene.depth[i] > 0)))
    runtime.save_panels(path, panels, columns=4)


# ---------------------------------------------------------------------------------------------------
# Downstream: semantic segmentation fine-tuning
# ---------------------------------------------------------------------------------------------------

def finetune(args, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], num_classes: int,
             init: dict | str | None, label_fraction: float, device: torch.device) -> tuple[dict, Tensor]:
    """Fine-tune a ResUNet (out = classes; official Semantic2D) and return metrics on val and predictions.

    train/val: images (N, 3, H, W), labels (N, H, W) with -1 = ignore. init: None = random init (scratch),
    "imagenet" = the --weights encoder, or a pretrained backbone state dict (all but its last 1x1 conv).
    Every row gets the same frames (a seeded subset of ``label_fraction``), steps, batches and lr."""
    generator = torch.Generator().manual_seed(args.seed + 7)
    images, labels = train
    keep = torch.randperm(len(images), generator=generator)[:max(1, round(label_fraction * len(images)))]
    images, labels = images[keep], labels[keep]
    torch.manual_seed(args.seed + 11)  # the new head (and scratch's weights) start alike in every row
    model = ResUNet(18 if args.backbone == "resnet18" else 50, num_classes)
    if isinstance(init, dict):
        state = {key: value for key, value in init.items() if not key.startswith("decoder.conv0")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not key.startswith("decoder.conv0") for key in missing):
            raise ValueError(f"checkpoint does not fit the U-Net: missing {missing}, unexpected {unexpected}")
    elif init == "imagenet":
        load_torchvision_resnet(model.encoder, args.weights)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.finetune_lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    for step in tqdm(range(args.finetune_steps), desc=f"fine-tune {label_fraction:.0%}", leave=False):
        for group in optimizer.param_groups:
            group["lr"] = args.finetune_lr * (1 - step / args.finetune_steps) ** 0.9  # PolyLR
        index = torch.randint(len(images), (min(args.finetune_batch_size, len(images)),), generator=generator)
        batch_images = color_jitter(images[index], generator).to(device)
        logits = F.interpolate(model(normalize_image(batch_images)), size=batch_images.shape[-2:],
                               mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels[index].to(device), ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    final_loss = float(loss.detach())
    if not math.isfinite(final_loss):
        raise FloatingPointError(f"non-finite fine-tuning loss {final_loss}")
    model.eval()
    predictions = []
    with torch.no_grad():
        for start in range(0, len(val[0]), 8):
            batch_images = val[0][start:start + 8].to(device)
            logits = F.interpolate(model(normalize_image(batch_images)), size=batch_images.shape[-2:],
                                   mode="bilinear", align_corners=False)
            predictions.append(logits.argmax(1).cpu())
    predictions = torch.cat(predictions)
    metrics = segmentation_metrics(predictions, val[1], num_classes, ignore_index=-1)
    return dict(metrics, train_frames=len(images), final_loss=final_loss), predictions


def labelled_frames(scenes: list[Scene]) -> tuple[Tensor, Tensor]:
    scenes = [scene for scene in scenes if scene.labels is not None]
    if not scenes:
        raise ValueError("fine-tuning needs labelled frames (<scene>/label/*.png for ScanNet)")
    return torch.cat([scene.images for scene in scenes]), torch.cat([scene.labels for scene in scenes])


def load_scenes(args) -> tuple[list[Scene], list[Scene], list[Scene], tuple[str, ...]]:
    """Unlabelled pretraining scenes, labelled fine-tuning scenes, held-out evaluation scenes, class names.
    Synthetic: three disjoint sets of rooms. ScanNet: the last ~20 %% of scene folders are held out; the
    others give the pretraining sequences (--frame-skip) and the labelled frames (--finetune-frame-skip)."""
    if args.data is None:
        pretrain_scenes = synthetic_scenes(range(args.rooms), args, labelled=False)
        label_scenes = synthetic_scenes(range(500, 500 + args.label_rooms), args, labelled=True)
        val_scenes = synthetic_scenes(range(1000, 1000 + args.val_rooms), args, labelled=True)
        return pretrain_scenes, label_scenes, val_scenes, ROOM_CLASS_NAMES
    folders = sorted(p for p in Path(args.data).iterdir() if (p / "depth").is_dir())
    if len(folders) < 2:
        raise ValueError(f"{args.data}: need at least 2 scene folders (the last ~20 % are held out)")
    split = max(1, len(folders) // 5)
    pretrain_scenes = [load_scannet_scene(folder, args) for folder in folders[:-split]]
    label_scenes = [load_scannet_scene(folder, args, args.finetune_frame_skip) for folder in folders[:-split]]
    val_scenes = [load_scannet_scene(folder, args, args.finetune_frame_skip) for folder in folders[-split:]]
    return pretrain_scenes, label_scenes, val_scenes, SCANNET_CLASS_NAMES


MODE_NAMES = {"view+geo": "Pri3D View+Geo", "view": "Pri3D View", "geo": "Pri3D Geo"}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dist = runtime.init_distributed(runtime.pick_device(args.device))
    runtime.seed_everything(args.seed, dist.rank)
    out = Path(args.out)
    started = time.time()
    pretrain_scenes, label_scenes, val_scenes, class_names = load_scenes(args)
    num_classes = len(class_names)
    metrics = dict(config=vars(args), classes=list(class_names), pretrain=[])
    # --- pretraining (unlabelled RGB-D sequences) ---
    inits: dict[str, dict | str | None] = {"scratch": None}
    if args.weights:
        inits["ImageNet init"] = "imagenet"
    modes = [args.mode] + ([mode for mode in ("view", "geo") if mode != args.mode] if args.ablations else [])
    main_name = MODE_NAMES[args.mode] + (" (from ImageNet)" if args.weights else "")
    if args.finetune:
        checkpoint = runtime.load_checkpoint(args.checkpoint, ("backbone",))
        inits[main_name] = checkpoint["backbone"]
        modes = []
    for mode in modes:
        name = MODE_NAMES[mode] + (" (from ImageNet)" if args.weights else "")
        path = out / ("pri3d.pt" if mode == args.mode else f"pri3d_{mode}.pt")
        inits[name], summary = pretrain(args, pretrain_scenes, dist, mode, path)
        metrics["pretrain"].append(summary)
    if args.no_finetune or not dist.is_main:
        if dist.is_main:
            runtime.write_metrics(out, metrics)
        return metrics
    # --- fine-tuning on labelled frames of other rooms, the same budget for every row ---
    train, val = labelled_frames(label_scenes), labelled_frames(val_scenes)
    rows, results, previews = [], {}, {}
    fractions = [args.label_fraction] + ([1.0] if args.label_fraction < 1 else [])
    ablation_names = [MODE_NAMES[mode] + (" (from ImageNet)" if args.weights else "") for mode in modes[1:]]
    for fraction in fractions:
        for name, init in inits.items():
            if name in ablation_names and fraction != args.label_fraction:
                continue  # the View-only / Geo-only rows at the small label budget only (CPU time)
            result, predictions = finetune(args, train, val, num_classes, init, fraction, dist.device)
            results[(name, fraction)] = result
            rows.append(dict(init=name, labels=f"{fraction:.0%}", frames=result["train_frames"],
                             mIoU=result["mIoU"], mAcc=result["mAcc"], aAcc=result["aAcc"]))
            previews[(name, fraction)] = predictions
    baselines = ["scratch"] + (["ImageNet init"] if args.weights else [])
    claims = []
    for baseline in baselines:
        for metric, fraction, words in (("miou_low_labels", args.label_fraction, f"{args.label_fraction:.0%} of"),
                                        ("miou", 1.0, "all")):
            claims.append(runtime.claim(
                f"Pri3D pretraining ({args.mode}) on unlabelled RGB-D sequences improves segmentation of held-out "
                f"rooms fine-tuned on {words} the labelled frames of other rooms (mIoU)", metric, True,
                (baseline, results[(baseline, fraction)]["mIoU"]), (main_name, results[(main_name, fraction)]["mIoU"])))
    metrics.update(finetune=rows, claims=claims, seconds=time.time() - started)
    runtime.write_metrics(out, metrics)
    for index in (0, len(val[0]) // 2):
        runtime.save_panels(out / f"segmentation_{index}.png",
                            [("input", val[0][index]), ("ground truth", colorize_labels(val[1][index]))]
                            + [(f"{name} ({fraction:.0%} labels)", colorize_labels(previews[(name, fraction)][index]))
                               for name in (baselines + [main_name]) for fraction in fractions])
    print(runtime.format_table(rows))
    print(runtime.format_claims(claims))
    return metrics


if __name__ == "__main__":
    main()
