"""3D-CompNets: "Scaling 3D Compositional Models for Robust Classification and Pose Estimation" (X. Yuan,
G. Zhang, P. Kaushik, L. Jesslen, A. Kortylewski, A. Yuille, ICCV 2025), with NOVUM (Jesslen et al., ECCV 2024)
as its full-contrast baseline. Trains three models on the same images, from the same initial backbone
(--init) and with the same steps:
  grouped  3D-CompNets: a cuboid neural mesh per class, unit vertex features learned with the grouped vMF
           contrast (Eq. 5 = Eq. 2 + Eq. 4, omega from the calibration confusion matrix every 2 epochs, as
           the paper; --omega-confusion pairwise counts every class that outranks the true one);
  full     NOVUM's full contrast (one softmax over every vertex of every class, `--full-contrast` trains
           only this one);
  plain    the backbone with a classification head and a pose head (azimuth/elevation/theta bins), both
           cross-entropy.
Inference as in the paper: class y_hat = argmax_y S_y (Eq. 7); pose by render-and-compare with the mesh of
y_hat (Eq. 8); classes held out of training get the pose of the known class with the lowest Eq. 8 loss.
Splits: IID, occlusion L1-L3 (segmented objects of classes never trained on pasted over about 10/30/50 % of
the object and 30/50/70 % of the background, as OccludedPASCAL3D+ pastes MS-COCO objects; --occluders patterns:
textured rectangles) and ImageNet-C brightness/fog/frost/snow at level 4; with --data the same splits are
generated from the test images with a fixed seed. The default run (synthetic textured objects, no download) writes the
claims table: occluded_accuracy (3D-CompNets > plain head), iid_accuracy (grouped as good as full, within
5 points) and loss_seconds (grouped loss faster than full at Y=50, K=500, N=32, D=128, B=8).

    python train_compnet.py                       # synthetic classes, about 4.8 CPU-minutes (user + sys, 1 thread)
    python train_compnet.py --quick --out /tmp/x  # smoke run (seconds)
    python train_compnet.py --data DIR --dataset imagenet3d|pascal3d --classes car bus ... --backbone resunet50
    torchrun --nproc_per_node=2 train_compnet.py  # DDP (memory bank averaged over ranks after each update)

Real data (`--data DIR`, images resized to --image-size x --image-size):
  imagenet3d: DIR/images/<class>/<id>.JPEG, DIR/annotations/<class>/<id>.npz with key `annotations`
              (list of dicts azimuth, elevation, theta, distance, px, py, focal, viewport, object_status),
              DIR/lists/<class>_imagenet_{train,val}.txt; every good object (status != status_bad,
              distance > 0) is centred on (px, py) and rescaled to distance 4 (imagenet3d_exp
              preprocess_data.py --center_and_resize) at load time.
  pascal3d:   NOVUM/NeMo preprocessed layout DIR/<train|val>/images/<class>/<name>.JPEG,
              DIR/<train|val>/annotations/<class>/<name>.npz (azimuth, elevation, theta, distance,
              principal; focal 1 and viewport 3000 unless stored), DIR/<train|val>/lists/<class>/mesh01.txt.
  both:       DIR/CAD/<class>/*.off, whose pooled vertices give the class cuboid (NOVUM createCuboidMesh).
  Keypoints and visibility come from our z-buffer; the calibration split for omega is every 10th training
  image; occluders use the projected cuboid as the object mask.
--weights: a DINOv2 .pth for --backbone vit, a torchvision ResNet-18/50 state dict (the encoder) for
--backbone resunet18/resunet50; the default `cnn8` backbone (and `cnn`) takes no weights and starts from random
initialisation (--init scratch); --init pretrained first trains it as a classifier of 48 other synthetic
classes, a stand-in for the paper's ImageNet pretraining, and starts every model from it.
Details and every deviation from the paper: docs/compnet.md.
"""

import argparse
import math
from collections.abc import Callable
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from minimal3d import resunet, runtime, vit
from minimal3d.cameras import intrinsics, pose_from_angles, project, rotation_error
from minimal3d.neural_mesh import (Mesh, cuboid_mesh, cuboid_ranges, estimate_pose, inside_image, rasterize,
                                   vertex_visibility)
from minimal3d.synthetic import (IMAGENET_C, OCCLUSION_LEVELS, class_cuboid, imagenet_c, object_cutouts, object_sample,
                                 paste_occluders)
from minimal3d.vmf_contrast import (VertexMemory, background_repulsion, cell_class_scores, classification_scores,
                                    confusion_weights, grouped_vmf_contrast, pairwise_confusion)

MODELS = ("grouped", "full", "plain")
POSE_THRESHOLDS = {"pi6": math.pi / 6, "pi18": math.pi / 18}
CLUTTER_CLASSES = list(range(500, 1000))  # pool classes of the clutter objects (--clutter objects)
OCCLUDER_OBJECTS = 64  # rendered objects of unknown pool classes whose cut-outs are the occluders (--occluders objects)
QUICK = dict(num_classes=3, num_heldout=1, train_per_class=6, calib_per_class=2, test_per_class=3, image_size=48,
             epochs=2, width=8, dim=16, vertices=40, num_background=64, pose_steps=2, pose_images=2,
             timing_classes=6, timing_vertices=40, timing_repeats=1, batch_size=6, pretrain_classes=4,
             pretrain_per_class=3, pretrain_epochs=1)
NORMAL = dict(num_classes=6, num_heldout=2, train_per_class=150, calib_per_class=20, test_per_class=84, image_size=96,
              epochs=12, width=16, dim=128, vertices=100, num_background=2560, pose_steps=10, pose_images=24,
              timing_classes=50, timing_vertices=500, timing_repeats=3, batch_size=16, pretrain_classes=48,
              pretrain_per_class=20, pretrain_epochs=8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data", default=None, help="real data root (default: synthetic classes, no download)")
    add("--dataset", default="imagenet3d", choices=["imagenet3d", "pascal3d"])
    add("--classes", nargs="*", default=None, help="real-data class names (default: all in DIR/CAD)")
    add("--num-classes", type=int, default=None, help="synthetic known classes Y (6; quick 3)")
    add("--num-heldout", type=int, default=None,
        help="classes kept out of training for unknown-class pose (2; quick 1; synthetic: the partners of the "
             "first known classes, same base shape)")
    add("--train-per-class", type=int, default=None,
        help="synthetic training images per class (150 on CPU: 900 images, 672 steps in the paper's 12 epochs; "
             "the paper has hundreds to thousands per class, and at 100 the scratch backbone's run-to-run "
             "spread exceeded the claims' margins)")
    add("--calib-per-class", type=int, default=None, help="synthetic calibration images per class for omega (20)")
    add("--test-per-class", type=int, default=None, help="synthetic test images per class (84: 504 for Y = 6)")
    add("--image-size", type=int, default=None,
        help="input side in pixels (96 on CPU; the paper uses ImageNet3D's 512 x 512 crops)")
    add("--backbone", default="cnn8", choices=["cnn8", "cnn", "resunet18", "resunet50", "vit"],
        help="cnn8 (default, CPU): a small ResNet-style encoder to stride 8 whose cells see 59 px of the 96-px "
             "image, local features as a deep ResNet's effective receptive field gives them (see --init and "
             "docs/compnet.md, 'Local features'); cnn: the same with a stride-16 stage fused in (a small U-Net, "
             "~123 px, wider than the image); resunet50: the paper's ResNet-50 U-Net at stride 8; vit: DINOv2 "
             "ViT-S/14 patch features")
    add("--weights", default=None,
        help="resunet18/resunet50: a torchvision ResNet state dict (.pth) for the encoder; vit: a DINOv2 .pth; "
             "rejected with the cnn8 and cnn backbones (see --init)")
    add("--init", default="scratch", choices=["scratch", "pretrained"],
        help="backbone initialisation of all three models when no --weights is given: scratch (default, CPU "
             "budget): random initialisation; pretrained (a stand-in for the paper's ImageNet-pretrained "
             "ResNet-50): a classifier of --pretrain-classes other synthetic pool classes (never known, held out, "
             "occluders or clutter) trained first, its backbone copied into every model. It adds about 100 s of "
             "CPU (with --backbone cnn it took the run from 4 min 24 s to 5 min 20 s on a quiet 2-core machine), "
             "over the 5-minute budget (docs/compnet.md)")
    add("--pretrain-classes", type=int, default=None, help="pool classes of the pretraining (48; quick 4)")
    add("--pretrain-per-class", type=int, default=None, help="pretraining images per class (20: 960 images)")
    add("--pretrain-epochs", type=int, default=None, help="epochs of the pretraining classifier (8)")
    add("--width", type=int, default=None, help="channels of the first cnn8 / cnn stage (16; doubled per stage)")
    add("--dim", type=int, default=None, help="feature dimension D (128 as the paper)")
    add("--vertices", type=int, default=None,
        help="vertices per cuboid mesh (100 on CPU for 12x12 feature maps; the paper about 500)")
    add("--num-sampled", type=int, default=32, help="N vertices sampled per other class (paper: 32)")
    add("--num-background", type=int, default=None, help="background bank N_b (NOVUM 2560)")
    add("--background-cells", default="vertex_free", choices=["vertex_free", "off_object"],
        help="cells the background features are sampled from: vertex_free (default, NOVUM's and NeMo's training "
             "scripts): every cell without a projected vertex; off_object: also outside the object mask (their "
             "networks' noise_on_mask option)")
    add("--background-per-image", type=int, default=5, help="background features per image and step (NOVUM 5)")
    add("--temperature", type=float, default=0.07, help="T = 1/kappa (NOVUM 0.07)")
    add("--momentum", type=float, default=0.9, help="memory momentum (paper 0.9)")
    add("--distance-threshold", type=float, default=None,
        help="near-mask radius in input pixels (default 48 * image_size / 640: NOVUM's 48 px at 640 px)")
    add("--omega-every", type=int, default=2, help="epochs between confusion-matrix updates of omega (paper 2)")
    add("--omega-start", type=int, default=2,
        help="epoch of the first calibration; omega = 1 before it (paper: 2, every --omega-every epochs)")
    add("--omega-threshold", type=float, default=0.05, help="omega = 0 below this confusion rate (paper 0.05)")
    add("--omega-normalize", default="mean", choices=["none", "mean", "max", "binary"],
        help="scale of omega, left open by the paper: mean (default) rescales each row's kept confusion rates "
             "to average 1 (the most confused class gets omega > 1); binary gives every kept pair omega = 1; "
             "none uses the rates themselves; max divides by the row maximum")
    add("--omega-confusion", default="argmax", choices=["argmax", "pairwise"],
        help="what counts as confusing class y with y' on a calibration image of class y: argmax (default, the "
             "paper's confusion matrix): y' is the prediction; pairwise: S_y' >= S_y, every class that outranks "
             "the true one (the default with the earlier --backbone cnn, whose scratch backbone classified the "
             "calibration split at chance when omega was first computed, so that the argmax matrix kept one "
             "class; docs/compnet.md)")
    add("--omega-symmetric", action=argparse.BooleanOptionalAction, default=False,
        help="omega[y, :] from row y of the confusion alone (default, as the paper writes omega[y, y']); "
             "--omega-symmetric keeps a pair when either class is confused with the other (max of the two "
             "rates; the default with the earlier --backbone cnn)")
    add("--cross-class-scale", default="none", choices=["none", "k_over_n"],
        help="none (default): Eq. 4 as written; k_over_n adds log(K/N) to the sampled columns")
    add("--full-contrast", action="store_true", help="train only NOVUM's full-contrast model")
    add("--models", nargs="+", default=list(MODELS), choices=MODELS, help="models to train (all three)")
    add("--epochs", type=int, default=None, help="training epochs per model (12 as the paper)")
    add("--steps", type=int, default=None, help="optimizer steps per model (overrides --epochs)")
    add("--batch-size", type=int, default=None, help="images per step (16)")
    add("--lr", type=float, default=1e-3, help="Adam learning rate of every stage (1e-3 for the small cnn8)")
    add("--lr-schedule", default="cosine", choices=["cosine", "constant"],
        help="cosine (default, CPU; the paper states none): the lr falls from --lr to 0 over the run, so the "
             "scratch backbone's last steps settle instead of ending on a noisy iterate that decides Eq. 7's "
             "narrow class margins; constant: --lr throughout (NeMo's training script keeps one lr, 0.2 x its lr, after its first epoch)")
    add("--pose-bins", type=int, nargs=3, default=[24, 6, 4], metavar=("AZIMUTH", "ELEVATION", "THETA"),
        help="bins of the plain pose head over [0, 2pi), [-pi/6, pi/3], [-pi/6, pi/6] (15 degrees each)")
    add("--pose-steps", type=int, default=None, help="Adam refinement steps of render-and-compare (10; paper 30)")
    add("--pose-images", type=int, default=None,
        help="images per split whose pose is estimated by render-and-compare (24 on CPU, paying for the larger "
             "training set; 0 = all, as the paper)")
    add("--occluders", default="objects", choices=["objects", "patterns"],
        help="what the occlusion splits paste: objects (default, the paper's OccludedPASCAL3D+ protocol, which "
             "pastes segmented MS-COCO objects): cut-outs of 64 rendered objects of pool classes that are neither "
             "known nor held out; patterns: textured rectangles (stripes, checkers, blobs)")
    add("--clutter", default="primitives", choices=["primitives", "objects"],
        help="what stands behind the synthetic objects: primitives (default): 3-5 single textured boxes, spheres, "
             "cylinders; objects: 3-5 objects of the pool classes 500-999, as real photographs show other objects "
             "behind the annotated one (did not widen the occlusion margin over design seeds, docs/compnet.md)")
    add("--severity", type=int, default=4, help="ImageNet-C severity of the corruption splits (paper 4)")
    add("--timing-classes", type=int, default=None, help="Y of the loss_seconds timing (paper's 50)")
    add("--timing-vertices", type=int, default=None, help="K of the loss_seconds timing (paper's 500)")
    add("--timing-repeats", type=int, default=None, help="timed repetitions per loss (median reported)")
    add("--device", default="auto")
    add("--seed", type=int, default=0)
    add("--out", default="runs/compnet")
    add("--resume", action="store_true", help="reuse the finished models' checkpoints in --out")
    add("--quick", action="store_true", help="seconds-long smoke run (fills only the flags not given)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else NORMAL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.full_contrast:
        args.models = ["full"]
    positive = ["num_classes", "train_per_class", "calib_per_class", "test_per_class", "image_size", "width", "dim",
                "vertices", "num_sampled", "num_background", "background_per_image", "omega_every", "epochs",
                "batch_size", "timing_classes", "timing_vertices", "timing_repeats", "pretrain_classes",
                "pretrain_per_class", "pretrain_epochs"]
    for key in positive:
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    for key in ("num_heldout", "pose_steps", "pose_images"):
        if getattr(args, key) < 0:
            parser.error(f"--{key.replace('_', '-')} must be >= 0, got {getattr(args, key)}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    for key in ("temperature", "lr"):
        if not (getattr(args, key) > 0 and math.isfinite(getattr(args, key))):
            parser.error(f"--{key} must be finite and > 0, got {getattr(args, key)}")
    if not 0 <= args.momentum <= 1:
        parser.error(f"--momentum must be in [0, 1], got {args.momentum}")
    if not 0 <= args.omega_threshold <= 1:
        parser.error(f"--omega-threshold must be in [0, 1], got {args.omega_threshold}")
    if args.distance_threshold is not None and not args.distance_threshold >= 0:
        parser.error(f"--distance-threshold must be >= 0, got {args.distance_threshold}")
    if min(args.pose_bins) < 1:
        parser.error(f"--pose-bins must be >= 1 each, got {args.pose_bins}")
    if args.severity not in (1, 2, 3, 4, 5):
        parser.error(f"--severity must be in 1..5, got {args.severity}")
    if args.weights is not None and args.backbone in ("cnn", "cnn8"):
        parser.error("--weights needs --backbone resunet18, resunet50 (torchvision ResNet) or vit (DINOv2); "
                     "the cnn and cnn8 backbones have no published weights (see --init)")
    if args.weights is not None and not Path(args.weights).is_file():
        parser.error(f"--weights: no such file {args.weights}")
    if args.data is not None and not Path(args.data).is_dir():
        parser.error(f"--data: no such directory {args.data}")
    if args.data is None and 2 * args.num_classes + OCCLUDER_OBJECTS > CLUTTER_CLASSES[0]:
        parser.error(f"--num-classes must be <= {(CLUTTER_CLASSES[0] - OCCLUDER_OBJECTS) // 2} with synthetic data "
                     f"(known, held-out and occluder classes lie below the clutter classes), got {args.num_classes}")
    if (args.data is None and args.weights is None and args.init == "pretrained"
            and 2 * args.num_classes + OCCLUDER_OBJECTS + args.pretrain_classes > CLUTTER_CLASSES[0]):
        parser.error(f"--pretrain-classes must be <= {CLUTTER_CLASSES[0] - 2 * args.num_classes - OCCLUDER_OBJECTS} "
                     f"(pretraining classes lie between the occluder and the clutter classes), got {args.pretrain_classes}")
    if args.data is None and args.num_heldout > args.num_classes:
        parser.error(f"--num-heldout ({args.num_heldout}) must not exceed --num-classes ({args.num_classes})")
    if args.backbone == "vit":  # patch grid: the image side must be a multiple of 14
        args.image_size = 14 * max(2, round(args.image_size / 14))
    if args.distance_threshold is None:
        args.distance_threshold = 48.0 * args.image_size / 640
    return args


# ---------------------------------------------------------------------------------------------------
# Data: a split is a dict of stacked tensors: images (N, 3, S, S) in [0, 1], labels (N,), azimuth,
# elevation, theta, distance (N,), K (N, 3, 3) at image resolution, object_mask (N, S, S)
# ---------------------------------------------------------------------------------------------------

KEYS = ("image", "label", "azimuth", "elevation", "theta", "distance", "K", "object_mask")


def stack_samples(samples: list[dict]) -> dict:
    return {key + ("s" if key in ("image", "label") else ""): torch.stack([s[key] for s in samples])
            for key in KEYS}


def subset(split: dict, index) -> dict:
    return {key: value[index] for key, value in split.items()}


def synthetic_split(split: str, classes: list[int], per_class: int, image_size: int, seed: int,
                    clutter_classes: list[int] | None = None) -> dict:
    """Rendered object images (`synthetic.object_sample`); class c of the pool keeps its label c here."""
    samples = []
    for c in classes:
        for i in range(per_class):
            s = object_sample(i * 1000 + c, num_classes=1000, split=split, height=image_size, width=image_size,
                              seed=seed, class_textures=True, clutter_classes=clutter_classes)
            s["object_mask"] = s["amodal_mask"]
            samples.append(s)
    return stack_samples(samples)


def synthetic_classes(num_known: int, num_heldout: int) -> tuple[list[int], list[int]]:
    """Known classes: one member of each confusable pair (0, 2, 4, ...); held out: the partners of the first
    known ones (same base shape and colours, other parts), whose pose is estimated with the known meshes."""
    known = [2 * k for k in range(num_known)]
    return known, [2 * k + 1 for k in range(num_heldout)]


def synthetic_meshes(classes: list[int], vertices: int) -> list[Mesh]:
    meshes = []
    for c in classes:
        half = class_cuboid(1000, c) / 2
        meshes.append(cuboid_mesh(torch.stack([-half, half], dim=1), vertices))
    return meshes


def read_off(path: Path) -> torch.Tensor:
    """Vertices (V, 3) of an .off file."""
    lines = [line for line in Path(path).read_text().split("\n") if line.strip() and not line.startswith("#")]
    header = lines[0].split()
    counts = header[1:] if len(header) > 1 else lines.pop(1).split()  # "OFF V F E" or "OFF" then "V F E"
    count = int(counts[0])
    return torch.tensor([[float(x) for x in line.split()[:3]] for line in lines[1:1 + count]])


def real_meshes(root: Path, names: list[str], vertices: int) -> list[Mesh]:
    meshes = []
    for name in names:
        files = sorted((root / "CAD" / name).glob("*.off"))
        if not files:
            raise FileNotFoundError(f"no CAD models in {root / 'CAD' / name} (needed for the cuboid)")
        ranges = cuboid_ranges(torch.cat([read_off(f) for f in files]).double()).float()
        meshes.append(cuboid_mesh(ranges, vertices))
    return meshes


def real_sample(image: Image.Image, label: int, pose, principal, focal_pixels: float, scale: float, size: int) -> dict:
    """Resize an image by `scale` around the principal point into size x size (principal at the centre)."""
    width, height = image.size
    image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    left, top = round(principal[0] * scale - size / 2), round(principal[1] * scale - size / 2)
    canvas = torch.zeros(3, size, size)
    src = array[:, max(0, top):max(0, top) + size - max(0, -top), max(0, left):max(0, left) + size - max(0, -left)]
    canvas[:, max(0, -top):max(0, -top) + src.shape[1], max(0, -left):max(0, -left) + src.shape[2]] = src
    # PASCAL pixel centres are integers, ours at +0.5: the principal point moves by +0.5 into our frame
    cx, cy = principal[0] * scale - left + 0.5, principal[1] * scale - top + 0.5
    a, e, t, d = (torch.tensor(float(v)) for v in pose)
    return dict(image=canvas, label=torch.tensor(label), azimuth=a, elevation=e, theta=t, distance=d,
                K=intrinsics(focal_pixels * scale, focal_pixels * scale, cx, cy))


def real_split(root: Path, dataset: str, split: str, names: list[str], labels: list[int], size: int) -> list[dict]:
    samples = []
    for label, name in zip(labels, names):
        if dataset == "imagenet3d":
            ids = (root / "lists" / f"{name}_imagenet_{split}.txt").read_text().split()
            for sample_id in ids:
                annotations = np.load(root / "annotations" / name / f"{sample_id}.npz", allow_pickle=True)["annotations"]
                for a in annotations:
                    if a.get("object_status", "status_bad") == "status_bad" or float(a["distance"]) <= 0:
                        continue
                    scale = float(a["distance"]) / 4.0 * size / 512  # rescale to distance 4 (center_and_resize)
                    image = Image.open(root / "images" / name / f"{sample_id}.JPEG")
                    pose = (a["azimuth"], a["elevation"], a["theta"], 4.0)
                    samples.append(real_sample(image, label, pose, (float(a["px"]), float(a["py"])),
                                               float(a["focal"]) * float(a["viewport"]), scale, size))
        else:
            folder = root / split
            for line in (folder / "lists" / name / "mesh01.txt").read_text().split():
                a = np.load(folder / "annotations" / name / f"{Path(line).stem}.npz", allow_pickle=True)
                image = Image.open(folder / "images" / name / f"{Path(line).stem}.JPEG")
                focal = float(a["focal"]) if "focal" in a else 1.0
                viewport = float(a["viewport"]) if "viewport" in a else 3000.0
                pose = (a["azimuth"], a["elevation"], a["theta"], a["distance"])
                samples.append(real_sample(image, label, pose, tuple(float(v) for v in a["principal"]),
                                           focal * viewport, size / max(image.size), size))
    return samples


def with_cuboid_masks(samples: list[dict], meshes: list[Mesh], size: int) -> dict:
    """Real data: the object mask of the occlusion protocol is the silhouette of the class cuboid."""
    for s in samples:
        viewmat = pose_from_angles(s["azimuth"], s["elevation"], s["theta"], s["distance"])
        face_index, _ = rasterize(meshes[int(s["label"])], viewmat, s["K"], size, size)
        s["object_mask"] = face_index[0] >= 0
    return stack_samples(samples)


def occluder_cutouts(num_known: int, image_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """OCCLUDER_OBJECTS segmented objects of the pool classes 2 Y, 2 Y + 1, ... (never a known class 2k < 2 Y nor
    a held-out partner 2k + 1 < 2 Y), rendered at twice the image size so that large occluders stay sharp."""
    classes = list(range(2 * num_known, 2 * num_known + OCCLUDER_OBJECTS))
    return object_cutouts(classes, size=min(2 * image_size, 512), seed=seed)


def occluded_split(split: dict, level: int, seed: int, cutouts: list | None = None) -> dict:
    """OccludedPASCAL3D+-style level L1-L3: occluders (object cut-outs, or textured rectangles when `cutouts` is
    None) over about 10/30/50 % of the object and 30/50/70 % of the background (fixed seed); the split gains
    occluder_mask (N, S, S)."""
    generator = torch.Generator().manual_seed(seed * 100 + level)
    object_fraction, background_fraction = OCCLUSION_LEVELS[level]
    pasted = [paste_occluders(image, mask, object_fraction, background_fraction, generator, cutouts=cutouts)
              for image, mask in zip(split["images"], split["object_mask"])]
    return {**split, "images": torch.stack([image for image, _ in pasted]),
            "occluder_mask": torch.stack([mask for _, mask in pasted])}


def corrupted_split(split: dict, corruption: str, severity: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed * 100 + 10 + IMAGENET_C.index(corruption))
    return {**split, "images": torch.stack([imagenet_c(image, corruption, severity, generator)
                                            for image in split["images"]])}


def keypoints_of(split: dict, meshes: list[Mesh], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected vertices (N, K_max, 2) in image pixels and visibility (N, K_max) (z-buffer, inside the image)."""
    K_max = max(m.vertices.shape[0] for m in meshes)
    N = len(split["labels"])
    uv_all, visible_all = torch.full((N, K_max, 2), -1.0), torch.zeros(N, K_max)
    for n in range(N):
        mesh = meshes[int(split["labels"][n])]
        viewmat = pose_from_angles(split["azimuth"][n], split["elevation"][n], split["theta"][n], split["distance"][n])
        uv, _ = project(mesh.vertices, viewmat, split["K"][n])
        visible = vertex_visibility(mesh, viewmat, split["K"][n])[0] & inside_image(uv, size, size)
        uv_all[n, :len(uv)], visible_all[n, :len(uv)] = uv, visible.float()
    return uv_all, visible_all


# ---------------------------------------------------------------------------------------------------
# Backbone: unit features at stride 8 (ViT: 14), projected to D
# ---------------------------------------------------------------------------------------------------


def conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallUNet(nn.Module):
    """ResNet-style encoder to stride 16, upsampled and fused with the stride-8 stage (a CPU-sized ResUNet).

    Receptive field of an output cell: about 123 px (59 px through the stride-8 path alone). With
    ``deepest_stride=8`` the stride-16 stage is left out and every cell sees 59 px."""

    def __init__(self, width: int, out_channels: int, deepest_stride: int = 16):
        super().__init__()
        self.encoder8 = nn.Sequential(conv_block(3, width, 2), conv_block(width, 2 * width, 2),
                                      conv_block(2 * width, 4 * width, 2))
        self.encoder16 = conv_block(4 * width, 8 * width, 2) if deepest_stride == 16 else None
        self.fuse = nn.Conv2d((12 if deepest_stride == 16 else 4) * width, out_channels, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x8 = self.encoder8(images)
        if self.encoder16 is None:
            return self.fuse(x8)
        x16 = F.interpolate(self.encoder16(x8), size=x8.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x8, x16], dim=1))


class FeatureNet(nn.Module):
    """images (B, 3, S, S) in [0, 1] -> features (B, D, S/stride, S/stride) (not normalised)."""

    def __init__(self, backbone: str, dim: int, width: int = 16, weights: str | None = None):
        super().__init__()
        self.backbone, self.stride = backbone, 14 if backbone == "vit" else 8
        if backbone == "vit":
            self.body = vit.build_backbone(weights, arch="vit_small")  # config from the weights when given
            channels = self.body.embed_dim
        elif backbone.startswith("resunet"):
            self.body = getattr(resunet, backbone)(out_channels=dim, output_stride=8, encoder_weights=weights)
            channels = dim
        else:
            self.body, channels = SmallUNet(width, dim, deepest_stride=8 if backbone == "cnn8" else 16), dim
        self.project = nn.Conv2d(channels, dim, 1)
        self.register_buffer("mean", torch.tensor(vit.IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(vit.IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        if self.backbone == "vit":
            return self.project(self.body.get_intermediate_layers(x, n=1, reshape=True)[0])
        return self.project(self.body(x))


class PlainNet(nn.Module):
    """The plain baseline: the same backbone, global average pooling, a class head and a pose head whose
    logits are bins of azimuth, elevation and theta."""

    def __init__(self, features: FeatureNet, num_classes: int, pose_bins: list[int]):
        super().__init__()
        self.features, self.pose_bins = features, list(pose_bins)
        dim = features.project.out_channels
        self.class_head = nn.Linear(dim, num_classes)
        self.pose_head = nn.Linear(dim, sum(pose_bins))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pooled = self.features(images).mean(dim=(2, 3))
        return self.class_head(pooled), list(self.pose_head(pooled).split(self.pose_bins, dim=1))


POSE_RANGES = ((0.0, 2 * math.pi), (-math.pi / 6, math.pi / 3), (-math.pi / 6, math.pi / 6))


def angle_to_bin(angle: torch.Tensor, bins: int, low: float, high: float, periodic: bool) -> torch.Tensor:
    position = (angle - low) / (high - low) * bins
    position = position % bins if periodic else position.clamp(0, bins - 1e-6)
    return position.floor().long()


def bin_to_angle(index: torch.Tensor, bins: int, low: float, high: float) -> torch.Tensor:
    return low + (index.float() + 0.5) * (high - low) / bins


def gather(feature_map: torch.Tensor, uv: torch.Tensor, stride: int) -> torch.Tensor:
    """Features (B, K_max, D) of the cells holding the keypoints uv (B, K_max, 2) (image pixels)."""
    h, w = feature_map.shape[-2:]
    cell = (uv / stride).floor().long()
    col, row = cell[..., 0].clamp(0, w - 1), cell[..., 1].clamp(0, h - 1)
    batch = torch.arange(feature_map.shape[0], device=uv.device)[:, None]
    return feature_map.permute(0, 2, 3, 1)[batch, row, col]


def background_features(feature_map: torch.Tensor, uv: torch.Tensor, count: int, stride: int,
                        generator: torch.Generator, object_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`count` features (B, count, D) per image at cells holding no projected vertex (NOVUM, NeMo), and with
    `object_mask` (B, S, S) also no object pixel (NeMo's `noise_on_mask` with the object mask)."""
    B, D, h, w = feature_map.shape
    cell = (uv / stride).floor().long()
    inside = (cell[..., 0] >= 0) & (cell[..., 0] < w) & (cell[..., 1] >= 0) & (cell[..., 1] < h)
    occupied = torch.zeros(B, h * w, device=uv.device)
    index = cell[..., 1].clamp(0, h - 1) * w + cell[..., 0].clamp(0, w - 1)
    occupied.scatter_add_(1, index, inside.float())
    if object_mask is not None:
        occupied += F.adaptive_max_pool2d(object_mask[:, None].float(), (h, w)).flatten(1)
    keys = torch.rand(B, h * w, generator=generator).to(uv.device) + 2 * (occupied > 0).float()
    chosen = keys.argsort(1)[:, :count]  # free cells first
    return feature_map.flatten(2).transpose(1, 2).gather(1, chosen[..., None].expand(-1, -1, D))


# ---------------------------------------------------------------------------------------------------
# Pretraining: the paper fine-tunes an ImageNet-pretrained backbone; without --weights the backbone of
# every model starts from a classifier of other synthetic classes (--init pretrained)
# ---------------------------------------------------------------------------------------------------


def pretraining_classes(num_known: int, count: int) -> list[int]:
    """Pool classes of the pretraining: after the known/held-out pairs (0 .. 2Y - 1) and the occluder classes,
    below the clutter classes, so no pretraining class is ever a test object, an occluder or clutter."""
    start = 2 * num_known + OCCLUDER_OBJECTS
    return list(range(start, start + count))


def pretrain_backbone(cfg: argparse.Namespace, num_known: int, device: torch.device, dist: runtime.Dist,
                      out: Path) -> dict:
    """A FeatureNet + linear class head on its pooled features, cross-entropy over `cfg.pretrain_classes` pool
    classes (`cfg.pretrain_per_class` images each, Adam, cfg.lr, the run's lr schedule). Returns the FeatureNet's
    state dict (copied into every model) and a log with the accuracy on held-out images of those classes."""
    checkpoint = out / "pretrained.pt"
    if cfg.resume and checkpoint.exists():
        state = runtime.load_checkpoint(checkpoint, ("model", "log"))
        return dict(model=state["model"], log=state["log"])
    classes = pretraining_classes(num_known, cfg.pretrain_classes)
    if classes[-1] >= CLUTTER_CLASSES[0]:
        raise ValueError(f"--pretrain-classes {cfg.pretrain_classes} with {num_known} known classes reaches the "
                         f"clutter classes (pool class {CLUTTER_CLASSES[0]}); use at most "
                         f"{CLUTTER_CLASSES[0] - 2 * num_known - OCCLUDER_OBJECTS}")
    train = synthetic_split("train", classes, cfg.pretrain_per_class, cfg.image_size, cfg.seed)
    test = synthetic_split("test", classes, max(1, cfg.pretrain_per_class // 5), cfg.image_size, cfg.seed)
    relabel = {c: i for i, c in enumerate(classes)}
    for split in (train, test):
        split["labels"] = torch.tensor([relabel[int(c)] for c in split["labels"]])
    features = FeatureNet(cfg.backbone, cfg.dim, cfg.width, cfg.weights)
    model = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cfg.dim, len(classes))).to(device)
    ddp_model = runtime.wrap_ddp(model, dist)
    steps = cfg.pretrain_epochs * max(1, len(train["labels"]) // (cfg.batch_size * dist.world_size))

    def step_loss(index: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(ddp_model(train["images"][index].to(device)), train["labels"][index].to(device))

    epoch_losses = supervised_loop(cfg, model, step_loss, len(train["labels"]), steps,
                                   torch.Generator().manual_seed(cfg.seed + 3), device, dist, "pretrain")
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(test["images"][i:i + 64].to(device)).argmax(1).cpu()
                               for i in range(0, len(test["labels"]), 64)])
    log = dict(epoch_losses=epoch_losses, steps=steps, classes=len(classes), images=len(train["labels"]),
               test_accuracy=float((predicted == test["labels"]).float().mean()))
    if dist.is_main:
        print(f"pretrained backbone: {len(classes)} classes, held-out accuracy {log['test_accuracy']:.3f}")
        torch.save(dict(config=vars(cfg), model=features.state_dict(), log=log), checkpoint)
    return dict(model=features.state_dict(), log=log)


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def batches(n: int, batch_size: int, generator: torch.Generator, dist: runtime.Dist) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)[dist.rank::dist.world_size]
    return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)] or [order]


def num_steps(cfg: argparse.Namespace, num_images: int, dist: runtime.Dist) -> int:
    return cfg.steps or cfg.epochs * max(1, num_images // (cfg.batch_size * dist.world_size))


def schedule_lr(cfg: argparse.Namespace, optimizer: torch.optim.Optimizer, step: int, steps: int) -> None:
    """--lr-schedule cosine: lr_t = lr (1 + cos(pi t / steps)) / 2 at step t; constant: lr."""
    scale = 0.5 * (1 + math.cos(math.pi * step / steps)) if cfg.lr_schedule == "cosine" else 1.0
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * scale


def supervised_loop(cfg: argparse.Namespace, model: nn.Module, step_loss: Callable[[torch.Tensor], torch.Tensor],
                    num_images: int, steps: int, generator: torch.Generator, device: torch.device, dist: runtime.Dist,
                    desc: str) -> list[float]:
    """The plain loop of the pretraining and of the plain head: Adam at cfg.lr with the run's schedule over
    `steps` batches of shuffled image indices; `step_loss(index)` returns the batch loss. Returns the mean loss
    of every epoch (one host sync per epoch)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step, epoch_losses = 0, []
    progress = tqdm(total=steps, desc=desc, disable=not dist.is_main)
    while step < steps:
        loss_sum, count = torch.zeros((), device=device), 0
        model.train()
        for index in batches(num_images, cfg.batch_size, generator, dist):
            if step >= steps:
                break
            loss = step_loss(index)
            schedule_lr(cfg, optimizer, step, steps)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum, count, step = loss_sum + loss.detach(), count + 1, step + 1
            progress.update(1)
        epoch_losses.append(float(loss_sum) / max(count, 1))
        if not math.isfinite(epoch_losses[-1]):
            raise FloatingPointError(f"{desc}: non-finite loss in epoch {len(epoch_losses) - 1}")
        progress.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
    progress.close()
    return epoch_losses


def train_compnet(cfg: argparse.Namespace, mode: str, train: dict, calib: dict, meshes: list[Mesh],
                  device: torch.device, dist: runtime.Dist, out: Path,
                  init: dict | None = None) -> tuple[FeatureNet, VertexMemory, dict]:
    """mode "grouped" (3D-CompNets, Eq. 5) or "full" (NOVUM's full contrast); `init`: a FeatureNet state dict
    to start from (the pretrained backbone). Returns model, memory, log."""
    model = FeatureNet(cfg.backbone, cfg.dim, cfg.width, cfg.weights)
    if init is not None:
        runtime.load_state_dict_checked(model, init, "pretrained backbone")
    model = model.to(device)
    memory = VertexMemory([m.vertices.shape[0] for m in meshes], dim=cfg.dim, num_background=cfg.num_background,
                          momentum=cfg.momentum, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    checkpoint = out / f"{mode}.pt"
    if cfg.resume and checkpoint.exists():
        state = runtime.load_checkpoint(checkpoint, ("model", "memory", "log"))
        runtime.load_state_dict_checked(model, state["model"], f"{mode} model")
        memory.load_state_dict(state["memory"])
        return model, memory, state["log"]
    ddp_model = runtime.wrap_ddp(model, dist)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    uv, visible = keypoints_of(train, meshes, cfg.image_size)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    Y = len(meshes)
    omega = torch.ones(Y, Y, device=device) if mode == "grouped" else None
    steps, step, epoch = num_steps(cfg, len(train["labels"]), dist), 0, 0
    epoch_losses, kept, calib_accuracy, top_share = [], [], [], []
    progress = tqdm(total=steps, desc=mode, disable=not dist.is_main)
    while step < steps:
        calibrate = epoch >= cfg.omega_start and (epoch - cfg.omega_start) % cfg.omega_every == 0
        if mode == "grouped" and calibrate:  # omega from calibration (Sec. 3.3)
            scores = compnet_scores(model, memory, calib["images"], device)
            confusion = confusion_matrix(calib["labels"], scores.argmax(1), Y)
            pairs = (confusion if cfg.omega_confusion == "argmax"
                     else pairwise_confusion(scores.cpu(), calib["labels"], Y).float())
            omega = confusion_weights(pairs, cfg.omega_threshold, cfg.omega_normalize, cfg.omega_symmetric,
                                      images_per_class=torch.bincount(calib["labels"], minlength=Y)).to(device)
            kept.append(float((omega > 0).float().sum(1).mean()))
            calib_accuracy.append(float(confusion.trace() / confusion.sum()))
            top_share.append(float(confusion.sum(0).max() / confusion.sum()))  # 1/Y: predictions spread evenly
        loss_sum, count = torch.zeros((), device=device), 0
        model.train()
        for index in batches(len(train["labels"]), cfg.batch_size, generator, dist):
            if step >= steps:
                break
            images, labels = train["images"][index].to(device), train["labels"][index].to(device)
            batch_uv, batch_visible = uv[index].to(device), visible[index].to(device)
            feature_map = F.normalize(ddp_model(images), dim=1)
            vertex_features = gather(feature_map, batch_uv, model.stride)
            off_object = train["object_mask"][index].to(device) if cfg.background_cells == "off_object" else None
            clutter = background_features(feature_map, batch_uv, cfg.background_per_image, model.stride, generator,
                                          off_object)
            loss = grouped_vmf_contrast(
                vertex_features, batch_uv, batch_visible, labels, memory, omega=omega,
                num_sampled=cfg.num_sampled if mode == "grouped" else None, temperature=cfg.temperature,
                distance_threshold=cfg.distance_threshold, cross_class_scale=cfg.cross_class_scale,
                generator=generator, form="paper" if mode == "grouped" else "novum", check=False)  # Eq. 5 / NOVUM
            loss = loss + background_repulsion(clutter, memory.vertices)
            schedule_lr(cfg, optimizer, step, steps)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            memory.update(vertex_features.detach(), batch_visible, labels, clutter.detach(), check=False)
            if dist.enabled:  # keep one memory: average the ranks' updates
                for buffer in (memory.vertices, memory.background):
                    buffer.copy_(F.normalize(runtime.all_reduce_mean(buffer, dist), dim=-1))
            loss_sum, count, step = loss_sum + loss.detach(), count + 1, step + 1
            progress.update(1)
        epoch_losses.append(float(loss_sum) / max(count, 1))  # one host sync per epoch
        if not math.isfinite(epoch_losses[-1]):
            raise FloatingPointError(f"{mode}: non-finite loss in epoch {epoch}")
        progress.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
        epoch += 1
    progress.close()
    log = dict(epoch_losses=epoch_losses, steps=steps, mean_kept_classes=kept, calibration_accuracy=calib_accuracy,
               calibration_top_share=top_share)
    if dist.is_main:
        torch.save(dict(config=vars(cfg), model=model.state_dict(), memory=memory.state_dict(), log=log,
                        omega=omega), checkpoint)
    return model, memory, log


def train_plain(cfg: argparse.Namespace, train: dict, num_classes: int, device: torch.device, dist: runtime.Dist,
                out: Path, init: dict | None = None) -> tuple[PlainNet, dict]:
    """Class head + pose-bin head on the same backbone (started from `init` when given), both cross-entropy
    (the paper's plain baseline)."""
    features = FeatureNet(cfg.backbone, cfg.dim, cfg.width, cfg.weights)
    if init is not None:
        runtime.load_state_dict_checked(features, init, "pretrained backbone")
    model = PlainNet(features, num_classes, cfg.pose_bins).to(device)
    checkpoint = out / "plain.pt"
    if cfg.resume and checkpoint.exists():
        state = runtime.load_checkpoint(checkpoint, ("model", "log"))
        runtime.load_state_dict_checked(model, state["model"], "plain model")
        return model, state["log"]
    ddp_model = runtime.wrap_ddp(model, dist)
    targets = torch.stack([angle_to_bin(train[key], bins, low, high, periodic=key == "azimuth")
                           for key, bins, (low, high) in zip(("azimuth", "elevation", "theta"), cfg.pose_bins,
                                                              POSE_RANGES)], dim=1)  # (N, 3)
    steps = num_steps(cfg, len(train["labels"]), dist)

    def step_loss(index: torch.Tensor) -> torch.Tensor:
        class_logits, pose_logits = ddp_model(train["images"][index].to(device))
        loss = F.cross_entropy(class_logits, train["labels"][index].to(device))
        for logits, target in zip(pose_logits, targets[index].to(device).unbind(1)):
            loss = loss + F.cross_entropy(logits, target)
        return loss

    epoch_losses = supervised_loop(cfg, model, step_loss, len(train["labels"]), steps,
                                   torch.Generator().manual_seed(cfg.seed + 2), device, dist, "plain")
    log = dict(epoch_losses=epoch_losses, steps=steps)
    if dist.is_main:
        torch.save(dict(config=vars(cfg), model=model.state_dict(), log=log), checkpoint)
    return model, log


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def feature_maps(model: FeatureNet, images: torch.Tensor, device: torch.device, chunk: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat([F.normalize(model(images[i:i + chunk].to(device)), dim=1) for i in range(0, len(images), chunk)])


@torch.no_grad()
def compnet_scores(model: FeatureNet, memory: VertexMemory, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """S_y (N, Y) of Eq. 7."""
    maps = feature_maps(model, images, device)
    return classification_scores(maps, memory.vertices, memory.vertex_class, memory.num_classes, memory.background)


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    confusion = torch.zeros(num_classes, num_classes)
    confusion.index_put_((labels.cpu(), predicted.cpu()), torch.ones(len(labels)), accumulate=True)
    return confusion


def pose_errors(split: dict, azimuth: torch.Tensor, elevation: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Geodesic rotation errors (N,) in radians."""
    n = len(azimuth)
    truth = pose_from_angles(split["azimuth"][:n], split["elevation"][:n], split["theta"][:n], 5.0)
    guess = pose_from_angles(azimuth, elevation, theta, 5.0)
    return rotation_error(guess[:, :3, :3], truth[:, :3, :3])


def pose_metrics(errors: torch.Tensor) -> dict:
    if len(errors) == 0:
        return {}
    metrics = {f"pose_accuracy_{name}": float((errors < limit).float().mean()) for name, limit in POSE_THRESHOLDS.items()}
    metrics["median_pose_error_deg"] = float(errors.median().rad2deg())
    return metrics


def feature_intrinsics(K: torch.Tensor, stride: int) -> torch.Tensor:
    """Intrinsics at feature resolution: feature cell j covers input pixels [stride j, stride (j + 1))."""
    return torch.diag(torch.tensor([1.0 / stride, 1.0 / stride, 1.0])) @ K


def render_and_compare(cfg: argparse.Namespace, maps: torch.Tensor, split: dict, candidates: list[list[int]],
                       meshes: list[Mesh], memory: VertexMemory, stride: int, grid_cache: dict) -> list:
    """Eq. 8 pose (and the winning class) of the first len(candidates) images, each among its candidate classes."""
    estimates = []
    for n, classes in enumerate(candidates):
        estimates.append(estimate_pose(maps[n], meshes, memory, feature_intrinsics(split["K"][n], stride).to(maps),
                                       candidates=classes, steps=cfg.pose_steps, grid_cache=grid_cache))
    return estimates


def pose_count(cfg: argparse.Namespace, n: int) -> int:
    return n if cfg.pose_images == 0 else min(cfg.pose_images, n)


def evaluate_compnet(cfg: argparse.Namespace, model: FeatureNet, memory: VertexMemory, meshes: list[Mesh],
                     split: dict, device: torch.device, grid_cache: dict) -> tuple[dict, torch.Tensor, list]:
    """Accuracy of y_hat = argmax S_y (Eq. 7) and the Eq. 8 pose with the mesh of y_hat."""
    maps = feature_maps(model, split["images"], device)
    predicted = classification_scores(maps, memory.vertices, memory.vertex_class, memory.num_classes,
                                      memory.background).argmax(1).cpu()
    n = pose_count(cfg, len(predicted))
    estimates = render_and_compare(cfg, maps, split, [[int(y)] for y in predicted[:n]], meshes, memory, model.stride,
                                   grid_cache)
    angles = torch.tensor([[e.azimuth, e.elevation, e.theta] for e in estimates]).reshape(-1, 3)
    metrics = dict(accuracy=float((predicted == split["labels"]).float().mean()),
                   **pose_metrics(pose_errors(split, *angles.unbind(1))))
    return metrics, maps, estimates


def cell_evidence(class_max: torch.Tensor, background_max: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A cell's evidence for its image's class y (P,): max(0, max_k f.C^y_k - max_n f.beta_n), what the cell
    adds to S_y (Eq. 7) beyond the background score that every class gets. labels: (P,) per cell."""
    return (class_max - background_max[:, None]).clamp(min=0).gather(1, labels[:, None])[:, 0]


@torch.no_grad()
def true_class_evidence(memory: VertexMemory, maps: torch.Tensor, labels: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """cell_evidence of every cell of maps (N, D, h, w) for its image's label: (N, h w)."""
    h, w = maps.shape[-2:]
    parts = []
    for i in range(0, len(labels), chunk):
        cells = maps[i:i + chunk].flatten(2).transpose(1, 2).reshape(-1, maps.shape[1])  # (B h w, D)
        terms = cell_class_scores(cells, memory.vertices, memory.vertex_class, memory.num_classes, memory.background)
        parts.append(cell_evidence(*terms, labels[i:i + chunk].to(maps.device).repeat_interleave(h * w)))
    return torch.cat(parts).reshape(len(labels), h * w)


@torch.no_grad()
def occlusion_evidence(memory: VertexMemory, clean_evidence: torch.Tensor, occluded_maps: torch.Tensor, split: dict,
                       chunk: int = 64) -> dict:
    """Where Eq. 7 finds the true class under occlusion (diagnostic, not in the paper): the true-class
    cell_evidence on the visible object cells of the occluded images and of the same cells without
    occluders, and Eq. 7 without the occluder cells (an oracle). Object cells: at least half object pixels;
    occluder cells: at least half occluded. clean_evidence: (N, h w) true_class_evidence of the images
    without occluders (computed once for every occlusion level); occluded_maps: (N, D, h, w)."""
    h, w = occluded_maps.shape[-2:]
    covered = lambda mask: F.adaptive_avg_pool2d(mask[:, None].float(), (h, w)).flatten(1) >= 0.5  # (N, h w)
    object_cells, occluder_cells = covered(split["object_mask"]), covered(split["occluder_mask"])
    visible = object_cells & ~occluder_cells
    labels = split["labels"]
    totals = dict(occluded=0.0, clean=0.0, correct_without_occluder_cells=0.0)
    for i in range(0, len(labels), chunk):
        visible_cells = visible[i:i + chunk].reshape(-1).to(occluded_maps.device)
        cells = occluded_maps[i:i + chunk].flatten(2).transpose(1, 2).reshape(-1, occluded_maps.shape[1])  # (B h w, D)
        class_max, background_max = cell_class_scores(cells, memory.vertices, memory.vertex_class,
                                                      memory.num_classes, memory.background)
        label = labels[i:i + chunk].to(cells.device).repeat_interleave(h * w)
        totals["occluded"] += float((cell_evidence(class_max, background_max, label) * visible_cells).sum())
        totals["clean"] += float((clean_evidence[i:i + chunk].reshape(-1) * visible_cells).sum())
        kept = ~occluder_cells[i:i + chunk].reshape(-1, 1).to(cells.device)  # Eq. 7 without the occluder cells
        scores = (torch.maximum(class_max, background_max[:, None]) * kept).reshape(-1, h * w, memory.num_classes).sum(1)
        totals["correct_without_occluder_cells"] += float((scores.argmax(1).cpu() == labels[i:i + chunk]).sum())
    n = len(labels)
    return dict(visible_object_cells=float(visible.float().sum(1).mean()),
                true_class_evidence_occluded=totals["occluded"] / n,
                true_class_evidence_same_cells_clean=totals["clean"] / n,
                accuracy_without_occluder_cells=totals["correct_without_occluder_cells"] / n)


def evaluate_unknown(cfg: argparse.Namespace, model: FeatureNet, memory: VertexMemory, meshes: list[Mesh],
                     split: dict, device: torch.device, grid_cache: dict) -> dict:
    """Held-out classes: the pose of the known class with the lowest Eq. 8 loss."""
    maps = feature_maps(model, split["images"], device)
    n = pose_count(cfg, len(maps))
    estimates = render_and_compare(cfg, maps, split, [list(range(len(meshes)))] * n, meshes, memory, model.stride,
                                   grid_cache)
    angles = torch.tensor([[e.azimuth, e.elevation, e.theta] for e in estimates]).reshape(-1, 3)
    return pose_metrics(pose_errors(split, *angles.unbind(1)))


@torch.no_grad()
def evaluate_plain(cfg: argparse.Namespace, model: PlainNet, split: dict, device: torch.device,
                   with_class: bool = True) -> dict:
    model.eval()
    outputs = [model(split["images"][i:i + 64].to(device)) for i in range(0, len(split["images"]), 64)]
    class_logits = torch.cat([o[0] for o in outputs]).cpu()
    angles = [bin_to_angle(torch.cat([o[1][k] for o in outputs]).argmax(1).cpu(), bins, *POSE_RANGES[k])
              for k, bins in enumerate(cfg.pose_bins)]
    metrics = pose_metrics(pose_errors(split, *angles))
    if with_class:
        metrics = dict(accuracy=float((class_logits.argmax(1) == split["labels"]).float().mean()), **metrics)
    return metrics


def time_contrast_losses(cfg: argparse.Namespace, device: torch.device) -> dict:
    """Forward + backward seconds (median) of the contrastive loss per step at the paper's efficiency scale:
    Y classes of K vertices, N = num_sampled, D, B = 8 images with 80 % of the vertices visible, N_b = 2560."""
    generator = torch.Generator().manual_seed(cfg.seed + 3)
    Y, K, B, D = cfg.timing_classes, cfg.timing_vertices, 8, 128
    memory = VertexMemory([K] * Y, dim=D, num_background=2560, generator=generator).to(device)
    labels = torch.randint(Y, (B,), generator=generator).to(device)
    features = F.normalize(torch.randn(B, K, D, generator=generator), dim=-1).to(device)
    keypoints = (torch.rand(B, K, 2, generator=generator) * 512).to(device)
    visible = (torch.rand(B, K, generator=generator).argsort(1) < int(0.8 * K)).float().to(device)
    losses = {"full": dict(num_sampled=None, form="novum"), "grouped": dict(num_sampled=cfg.num_sampled, form="paper")}
    times = {name: [] for name in losses}
    for _ in range(cfg.timing_repeats + 1):  # the first round warms up
        for name, options in losses.items():
            leaf = features.clone().requires_grad_(True)
            start = time.perf_counter()
            grouped_vmf_contrast(leaf, keypoints, visible, labels, memory, generator=generator, check=False,
                                 **options).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def previews(path: Path, model: FeatureNet, memory: VertexMemory, meshes: list[Mesh], split: dict, maps: torch.Tensor,
             estimates: list, names: list[str], count: int = 3) -> None:
    """Per image: input | vertex activation max_k f.C_k of the predicted class | pose of y_hat over the input."""
    size = split["images"].shape[-1]
    panels = []
    for n, estimate in enumerate(estimates[:count]):
        image, y = split["images"][n], estimate.label
        activation = (memory.class_vertices(y) @ maps[n].flatten(1)).max(0).values.reshape(maps.shape[-2:])
        activation = F.interpolate(activation[None, None].clamp(0, 1).cpu(), size=(size, size), mode="nearest")[0, 0]
        viewmat = pose_from_angles(estimate.azimuth, estimate.elevation, estimate.theta, float(split["distance"][n]))
        face_index, _ = rasterize(meshes[y], viewmat, split["K"][n], size, size)
        covered = (face_index[0] >= 0).float()
        edge = (covered + F.max_pool2d(-covered[None, None], 3, 1, 1)[0, 0]).clamp(0, 1)  # inner silhouette ring
        overlay = image * (1 - 0.35 * covered) + torch.tensor([0.0, 0.8, 0.2])[:, None, None] * 0.35 * covered
        overlay = torch.where(edge > 0, torch.tensor([1.0, 1.0, 0.0])[:, None, None], overlay)
        truth = names[int(split["labels"][n])] if int(split["labels"][n]) < len(names) else "held out"
        panels += [(f"input ({truth})", image), ("vertex activation", runtime.colorize_depth(1 - activation)),
                   (f"pose of {names[y]}", overlay)]
    runtime.save_panels(path, panels, size=256, columns=3)


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------


def load_data(cfg: argparse.Namespace) -> tuple[dict, dict, dict, dict | None, list[Mesh], list[str]]:
    """train, calib, test splits (IID + occlusion + corruption), held-out-class split, meshes, class names."""
    if cfg.data is None:
        known, heldout = synthetic_classes(cfg.num_classes, cfg.num_heldout)
        names = [f"class{c}" for c in known]
        clutter = CLUTTER_CLASSES if cfg.clutter == "objects" else None
        train = synthetic_split("train", known, cfg.train_per_class, cfg.image_size, cfg.seed, clutter)
        calib = synthetic_split("calib", known, cfg.calib_per_class, cfg.image_size, cfg.seed, clutter)
        iid = synthetic_split("test", known, cfg.test_per_class, cfg.image_size, cfg.seed, clutter)
        relabel = torch.full((max(known + heldout) + 1,), -1, dtype=torch.long)
        relabel[torch.tensor(known)] = torch.arange(len(known))
        for split in (train, calib, iid):
            split["labels"] = relabel[split["labels"]]
        unknown = (synthetic_split("test", heldout, cfg.test_per_class, cfg.image_size, cfg.seed, clutter)
                   if heldout else None)
        if unknown is not None:
            unknown["labels"] = torch.full_like(unknown["labels"], len(known))  # outside the known classes
        meshes = synthetic_meshes(known, cfg.vertices)
    else:
        root = Path(cfg.data)
        all_names = cfg.classes or sorted(p.name for p in (root / "CAD").iterdir())
        if cfg.num_heldout >= len(all_names):
            raise ValueError(f"--num-heldout {cfg.num_heldout} leaves no known class of {len(all_names)}")
        names = all_names[:len(all_names) - cfg.num_heldout]
        meshes = real_meshes(root, names, cfg.vertices)
        everything = real_split(root, cfg.dataset, "train", names, list(range(len(names))), cfg.image_size)
        train = with_cuboid_masks([s for i, s in enumerate(everything) if i % 10 != 9], meshes, cfg.image_size)
        calib = with_cuboid_masks([s for i, s in enumerate(everything) if i % 10 == 9] or everything[:1], meshes,
                                  cfg.image_size)
        iid = with_cuboid_masks(real_split(root, cfg.dataset, "val", names, list(range(len(names))), cfg.image_size),
                                meshes, cfg.image_size)
        heldout_names = all_names[len(names):]
        unknown = None
        if heldout_names:
            held_meshes = real_meshes(root, heldout_names, cfg.vertices)
            samples = real_split(root, cfg.dataset, "val", heldout_names, list(range(len(heldout_names))), cfg.image_size)
            unknown = with_cuboid_masks(samples, held_meshes, cfg.image_size)
            unknown["labels"] = torch.full_like(unknown["labels"], len(names))
    tests = {"iid": iid}
    num_known = cfg.num_classes if cfg.data is None else len(names)
    cutouts = occluder_cutouts(num_known, cfg.image_size, cfg.seed) if cfg.occluders == "objects" else None
    for level in OCCLUSION_LEVELS:
        tests[f"occlusion_L{level}"] = occluded_split(iid, level, cfg.seed, cutouts)
    for corruption in IMAGENET_C:
        tests[corruption] = corrupted_split(iid, corruption, cfg.severity, cfg.seed)
    return train, calib, tests, unknown, meshes, names


def summary_rows(results: dict) -> list[dict]:
    rows = []
    for model_name, per_split in results.items():
        for split_name, values in per_split.items():
            rows.append(dict(model=model_name, split=split_name, accuracy=values.get("accuracy", float("nan")),
                             pose_pi6=values.get("pose_accuracy_pi6", float("nan")),
                             pose_pi18=values.get("pose_accuracy_pi18", float("nan")),
                             median_err_deg=values.get("median_pose_error_deg", float("nan"))))
    return rows


def add_means(per_split: dict) -> None:
    """occlusion_mean over L1-L3 and corruption_mean over the four ImageNet-C types (every metric)."""
    for name, members in (("occlusion_mean", [f"occlusion_L{level}" for level in OCCLUSION_LEVELS]),
                          ("corruption_mean", list(IMAGENET_C))):
        present = [per_split[m] for m in members if m in per_split]
        if present:
            per_split[name] = {key: float(np.mean([p[key] for p in present])) for key in present[0]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = runtime.pick_device(args.device)
    dist = runtime.init_distributed(device)
    device = dist.device
    runtime.seed_everything(args.seed, dist.rank)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    train, calib, tests, unknown, meshes, names = load_data(args)
    Y = len(meshes)
    for split in (train, calib, tests["iid"]):  # labels are checked once here, not per step
        if int(split["labels"].min()) < 0 or int(split["labels"].max()) >= Y:
            raise ValueError(f"labels must lie in [0, {Y}) for the known classes")
    if dist.is_main:
        print(f"{Y} known classes, {0 if unknown is None else len(unknown['labels'])} held-out-class images; "
              f"{len(train['labels'])} train, {len(calib['labels'])} calib, {len(tests['iid']['labels'])} test "
              f"images per split ({len(tests)} splits); device {device}")

    results, logs, grid_cache, preview_data = {}, {}, {}, {}
    init = None
    if args.weights is None and args.init == "pretrained":
        pretrained = pretrain_backbone(args, Y, device, dist, out)
        init, logs["pretrain"] = pretrained["model"], pretrained["log"]
    for mode in [m for m in ("grouped", "full") if m in args.models]:
        model, memory, logs[mode] = train_compnet(args, mode, train, calib, meshes, device, dist, out, init)
        if dist.is_main:
            results[mode] = {}
            occlusion_maps = {}
            for split_name, split in tests.items():
                results[mode][split_name], maps, estimates = evaluate_compnet(args, model, memory, meshes, split,
                                                                             device, grid_cache)
                if split_name in ("iid", "occlusion_L2", "snow"):  # keep the first 3 images for the previews
                    preview_data[(mode, split_name)] = (model, memory, subset(split, slice(0, 3)), maps[:3], estimates)
                if split_name == "iid" or split_name.startswith("occlusion_L"):
                    occlusion_maps[split_name] = maps
            clean_evidence = true_class_evidence(memory, occlusion_maps["iid"], tests["iid"]["labels"])
            logs[mode]["occlusion_evidence"] = {
                name: occlusion_evidence(memory, clean_evidence, maps, tests[name])
                for name, maps in occlusion_maps.items() if name != "iid"}
            if unknown is not None:
                results[mode]["unknown_class_pose"] = evaluate_unknown(args, model, memory, meshes, unknown, device,
                                                                       grid_cache)
            add_means(results[mode])
            print(f"{mode}: " + ", ".join(f"{k} {v.get('accuracy', float('nan')):.3f} / pose {v.get('pose_accuracy_pi6', float('nan')):.3f}"
                                          for k, v in results[mode].items()))
    if "plain" in args.models:
        plain, logs["plain"] = train_plain(args, train, Y, device, dist, out, init)
        if dist.is_main:
            results["plain"] = {name: evaluate_plain(args, plain, split, device) for name, split in tests.items()}
            if unknown is not None:
                results["plain"]["unknown_class_pose"] = evaluate_plain(args, plain, unknown, device, with_class=False)
            add_means(results["plain"])
    if not dist.is_main:
        return {}

    loss_seconds = time_contrast_losses(args, device)
    for (mode, split_name), (model, memory, split, maps, estimates) in preview_data.items():
        previews(out / f"preview_{mode}_{split_name}.png", model, memory, meshes, split, maps, estimates, names)
    claims = []
    if "grouped" in results and "plain" in results:
        claims.append(runtime.claim(
            "3D-CompNets classify occluded objects (mean over L1-L3) better than the plain backbone + head",
            "occluded_accuracy", True, ("plain head", results["plain"]["occlusion_mean"]["accuracy"]),
            ("3D-CompNets", results["grouped"]["occlusion_mean"]["accuracy"])))
    if "grouped" in results and "full" in results:
        claims.append(runtime.claim(
            "the grouped contrast (Eq. 5) classifies IID images as well as NOVUM's full contrast (within 5 points)",
            "iid_accuracy", True, ("full contrast", results["full"]["iid"]["accuracy"]),
            ("grouped", results["grouped"]["iid"]["accuracy"]), margin=0.05))
    claims.append(runtime.claim(
        f"the grouped loss is cheaper per step than the full contrast (forward + backward, Y={args.timing_classes}, "
        f"K={args.timing_vertices}, N={args.num_sampled}, D=128, B=8)",
        "loss_seconds", False, ("full contrast", loss_seconds["full"]), ("grouped", loss_seconds["grouped"])))
    print(runtime.format_table(summary_rows(results)))
    print(runtime.format_claims(claims))
    seconds = time.perf_counter() - start
    print(f"total {seconds:.0f} s")
    metrics = dict(config=vars(args), claims=claims, results=results, loss_seconds=loss_seconds, training=logs,
                   class_names=names, chance_accuracy=1.0 / Y, seconds=seconds)
    runtime.write_metrics(out, metrics)
    return metrics


if __name__ == "__main__":
    main()
