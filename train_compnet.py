"""Train and evaluate 3D-CompNets (grouped vMF contrast), NOVUM's full contrast and a plain head, one script.

Paper: X. Yuan, G. Zhang, P. Kaushik, L. Jesslen, A. Kortylewski, A. Yuille, "Scaling 3D Compositional
Models for Robust Classification and Pose Estimation" (ICCV 2025); conventions of NOVUM (GenIntel/NOVUM).

Each class is a cuboid neural mesh; a backbone gives unit features at stride 8 (D = 128); the visible
vertices of the annotated pose are contrasted with the grouped loss (`vmf_contrast.grouped_vmf_contrast`,
omega from a calibration confusion matrix every 2 epochs) or the full one (`--full-contrast`, NOVUM).
Classification by S_y (Eq. 7), pose by render-and-compare (Eq. 8, `neural_mesh.estimate_pose`).

Runs three models on the same data (3D-CompNets, full contrast, plain classification + pose-regression
head on the same backbone), evaluates them on IID / occlusion L1-L3 / corrupted test images and estimates
the pose of held-out ("unknown") classes with the closest known class.

    python train_compnet.py                       # synthetic cuboid classes, a few minutes on CPU
    python train_compnet.py --quick --out /tmp/x  # smoke run (seconds)
    python train_compnet.py --data DIR --dataset imagenet3d|pascal3d --classes car bus ...
    torchrun --nproc_per_node=2 train_compnet.py  # DDP (memory bank averaged over ranks after each update)

Real data layouts (`--data DIR`, images are resized to --image-size x --image-size):
  imagenet3d: DIR/images/<class>/<id>.JPEG, DIR/annotations/<class>/<id>.npz with key `annotations`
              (list of dicts azimuth, elevation, theta, distance, px, py, focal, viewport, object_status),
              DIR/lists/<class>_imagenet_{train,val}.txt; every good object (status != status_bad,
              distance > 0) is centred on (px, py) and rescaled to distance 4 (imagenet3d_exp
              preprocess_data.py --center_and_resize) at load time.
  pascal3d:   NOVUM/NeMo preprocessed layout DIR/<train|val>/images/<class>/<name>.JPEG,
              DIR/<train|val>/annotations/<class>/<name>.npz (azimuth, elevation, theta, distance,
              principal; focal 1 and viewport 3000 unless stored), DIR/<train|val>/lists/<class>/mesh01.txt.
  both:       DIR/CAD/<class>/*.off, the CAD models whose pooled vertices give the class cuboid
              (NOVUM createCuboidMesh). Keypoints and visibility are computed on the fly with our z-buffer.
  The calibration split for omega is a held-back tenth of the training images.
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from minimal3d import runtime
from minimal3d.cameras import intrinsics, pose_from_angles, project, rotation_error
from minimal3d.neural_mesh import (Mesh, cuboid_mesh, cuboid_ranges, estimate_pose, inside_image, rasterize,
                                   vertex_visibility)
from minimal3d.vmf_contrast import (VertexMemory, background_repulsion, classification_scores,
                                    confusion_weights, grouped_vmf_contrast)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data", default=None, help="real data root (else synthetic cuboid classes)")
parser.add_argument("--dataset", default="imagenet3d", choices=["imagenet3d", "pascal3d"])
parser.add_argument("--classes", nargs="*", default=None, help="real-data class names (default: all)")
parser.add_argument("--num-classes", type=int, default=10, help="synthetic classes Y (confusable pairs)")
parser.add_argument("--num-heldout", type=int, default=2, help="classes kept out of training (unknown-category pose)")
parser.add_argument("--train-per-class", type=int, default=64)
parser.add_argument("--test-per-class", type=int, default=4)
parser.add_argument("--image-size", type=int, default=96)
parser.add_argument("--backbone", default="cnn", choices=["cnn", "resunet18", "resunet50", "vit"],
                    help="cnn: small ResNet-style net at stride 8 (CPU default); resunet50 as in the paper")
parser.add_argument("--weights", default=None, help="DINOv2 .pth for --backbone vit")
parser.add_argument("--dim", type=int, default=128, help="feature dimension D")
parser.add_argument("--vertices", type=int, default=100, help="vertices per cuboid mesh (paper ~500; fewer for 12x12 maps)")
parser.add_argument("--num-sampled", type=int, default=32, help="N vertices sampled per other class")
parser.add_argument("--num-background", type=int, default=2560, help="background bank N_b")
parser.add_argument("--background-per-image", type=int, default=5, help="T background features per image")
parser.add_argument("--temperature", type=float, default=0.07)
parser.add_argument("--momentum", type=float, default=0.9)
parser.add_argument("--distance-threshold", type=float, default=None,
                    help="near-mask radius in input pixels (default 48 * image_size / 640, NOVUM's 48 px at 640)")
parser.add_argument("--omega-every", type=int, default=2, help="epochs between confusion-matrix updates of omega")
parser.add_argument("--omega-threshold", type=float, default=0.05)
parser.add_argument("--cross-class-scale", default="none", choices=["none", "k_over_n"])
parser.add_argument("--full-contrast", action="store_true", help="train only the NOVUM full-contrast model")
parser.add_argument("--models", nargs="+", default=["grouped", "full", "plain"], choices=["grouped", "full", "plain"],
                    help="which of 3D-CompNets (grouped), NOVUM (full) and the plain head to train")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--steps", type=int, default=None, help="optimizer steps per model (overrides --epochs)")
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--pose-steps", type=int, default=30, help="Adam refinement steps of render-and-compare")
parser.add_argument("--device", default="auto")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="runs/compnet")
parser.add_argument("--resume", action="store_true", help="reuse finished models' checkpoints in --out")
parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
args = parser.parse_args()
if args.quick:
    args.num_classes, args.num_heldout, args.train_per_class, args.test_per_class = 4, 1, 4, 1
    args.image_size, args.epochs, args.vertices, args.num_background, args.pose_steps = 64, 2, 60, 64, 3
    args.batch_size, args.dim = 6, 32
if args.backbone == "vit":  # patch grid: the image side must be a multiple of 14
    args.image_size = 14 * max(2, round(args.image_size / 14))
if args.distance_threshold is None:
    args.distance_threshold = 48.0 * args.image_size / 640

device = runtime.pick_device(args.device)
dist = runtime.init_distributed(device)
device = dist.device
runtime.seed_everything(args.seed, dist.rank)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
STRIDE = 14 if args.backbone == "vit" else 8
POSE_THRESHOLD = math.pi / 6

# ---------------------------------------------------------------------------------------------------
# Data: samples are dicts image (3, S, S) in [0, 1], label, azimuth, elevation, theta, distance, K (3, 3)
# ---------------------------------------------------------------------------------------------------


def synthetic_split(split, classes, per_class, occlusion=0, corruption=False):
    """Rendered once, cached under --out/cache (corruption=True cycles noise/blur/fog/brightness)."""
    from minimal3d.synthetic import CORRUPTIONS, object_sample

    Y, S = args.num_classes, args.image_size
    cache = out / "cache" / f"{split}_Y{Y}_S{S}_o{occlusion}_c{int(corruption)}_{per_class}_{'-'.join(map(str, classes))}_s{args.seed}.pt"
    if cache.exists():
        return torch.load(cache)
    samples = []
    for c in classes:
        for i in range(per_class):
            index = i * Y + c
            kind = CORRUPTIONS[index % len(CORRUPTIONS)] if corruption else None
            s = object_sample(index, num_classes=Y, split=split, occlusion=occlusion, corruption=kind,
                              height=S, width=S, seed=args.seed)
            samples.append({k: s[k] for k in ("image", "label", "azimuth", "elevation", "theta", "distance", "K")})
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(samples, cache)
    return samples


def synthetic_meshes():
    from minimal3d.synthetic import class_cuboid

    meshes = []
    for c in range(args.num_classes):
        half = class_cuboid(args.num_classes, c) / 2
        meshes.append(cuboid_mesh(torch.stack([-half, half], dim=1), args.vertices))
    return meshes


def read_off(path):
    """Vertices (V, 3) of an .off file."""
    lines = [line for line in Path(path).read_text().split("\n") if line.strip() and not line.startswith("#")]
    header = lines[0].split()
    counts = header[1:] if len(header) > 1 else lines.pop(1).split()  # "OFF V F E" or "OFF" then "V F E"
    count = int(counts[0])
    return torch.tensor([[float(x) for x in line.split()[:3]] for line in lines[1:1 + count]])


def real_meshes(classes):
    meshes = []
    for name in classes:
        files = sorted((Path(args.data) / "CAD" / name).glob("*.off"))
        if not files:
            raise FileNotFoundError(f"no CAD models in {Path(args.data) / 'CAD' / name} (needed for the cuboid)")
        meshes.append(cuboid_mesh(cuboid_ranges(torch.cat([read_off(f) for f in files]).double()).float(), args.vertices))
    return meshes


def real_sample(image, label, pose, principal, focal_pixels, scale):
    """Resize an image by `scale` around the principal point into S x S (principal at the centre)."""
    S = args.image_size
    width, height = image.size
    image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    left, top = round(principal[0] * scale - S / 2), round(principal[1] * scale - S / 2)
    canvas = torch.zeros(3, S, S)
    src = array[:, max(0, top):max(0, top) + S - max(0, -top), max(0, left):max(0, left) + S - max(0, -left)]
    canvas[:, max(0, -top):max(0, -top) + src.shape[1], max(0, -left):max(0, -left) + src.shape[2]] = src
    # PASCAL pixel centres are integers, ours at +0.5: the principal point moves by +0.5 into our frame
    cx, cy = principal[0] * scale - left + 0.5, principal[1] * scale - top + 0.5
    K = intrinsics(focal_pixels * scale, focal_pixels * scale, cx, cy)
    a, e, t, d = (float(v) for v in pose)
    return dict(image=canvas, label=torch.tensor(label), azimuth=torch.tensor(a), elevation=torch.tensor(e),
                theta=torch.tensor(t), distance=torch.tensor(d), K=K)


def real_split(split, classes):
    root, samples = Path(args.data), []
    for label, name in enumerate(classes):
        if args.dataset == "imagenet3d":
            ids = (root / "lists" / f"{name}_imagenet_{split}.txt").read_text().split()
            for sample_id in ids:
                annotations = np.load(root / "annotations" / name / f"{sample_id}.npz", allow_pickle=True)["annotations"]
                for a in annotations:
                    if a.get("object_status", "status_bad") == "status_bad" or float(a["distance"]) <= 0:
                        continue
                    scale = float(a["distance"]) / 4.0  # rescale to distance 4 (center_and_resize)
                    image = Image.open(root / "images" / name / f"{sample_id}.JPEG")
                    pose = (a["azimuth"], a["elevation"], a["theta"], 4.0)
                    samples.append(real_sample(image, label, pose, (float(a["px"]), float(a["py"])),
                                               float(a["focal"]) * float(a["viewport"]), scale * args.image_size / 512))
        else:
            folder = root / split
            for line in (folder / "lists" / name / "mesh01.txt").read_text().split():
                a = np.load(folder / "annotations" / name / f"{Path(line).stem}.npz", allow_pickle=True)
                image = Image.open(folder / "images" / name / f"{Path(line).stem}.JPEG")
                focal = float(a["focal"]) if "focal" in a else 1.0
                viewport = float(a["viewport"]) if "viewport" in a else 3000.0
                pose = (a["azimuth"], a["elevation"], a["theta"], a["distance"])
                samples.append(real_sample(image, label, pose, tuple(float(v) for v in a["principal"]),
                                           focal * viewport, args.image_size / max(image.size)))
    return samples


def keypoints_of(samples, meshes):
    """Projected vertices (N, K_max, 2) in image pixels and visibility (N, K_max) (z-buffer, in the image)."""
    K_max = max(m.vertices.shape[0] for m in meshes)
    uv_all, visible_all = torch.zeros(len(samples), K_max, 2), torch.zeros(len(samples), K_max)
    for n, s in enumerate(samples):
        mesh = meshes[int(s["label"])]
        viewmat = pose_from_angles(s["azimuth"], s["elevation"], s["theta"], s["distance"])
        uv, _ = project(mesh.vertices, viewmat, s["K"])
        visible = vertex_visibility(mesh, viewmat, s["K"])[0] & inside_image(uv, args.image_size, args.image_size)
        uv_all[n, :len(uv)], visible_all[n, :len(uv)] = uv, visible.float()
    return uv_all, visible_all


def stack(samples, key):
    return torch.stack([s[key] for s in samples])


# ---------------------------------------------------------------------------------------------------
# Backbone: unit features at stride 8 (ViT: 14), projected to D
# ---------------------------------------------------------------------------------------------------


def conv_block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallUNet(nn.Module):
    """ResNet-style encoder to stride 16, upsampled and fused with the stride-8 stage (CPU-sized ResUNet)."""

    def __init__(self, out_channels):
        super().__init__()
        self.stem, self.s4, self.s8, self.s16 = conv_block(3, 32, 2), conv_block(32, 64, 2), conv_block(64, 128, 2), conv_block(128, 256, 2)
        self.fuse = nn.Conv2d(256 + 128, out_channels, 3, padding=1)

    def forward(self, images):
        x8 = self.s8(self.s4(self.stem(images)))
        x16 = F.interpolate(self.s16(x8), size=x8.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x8, x16], dim=1))


class FeatureNet(nn.Module):
    """images (B, 3, S, S) in [0, 1] -> features (B, D, S/stride, S/stride); `head` adds class + pose outputs."""

    def __init__(self, num_classes=0):
        super().__init__()
        if args.backbone == "vit":
            from minimal3d.vit import build_backbone

            self.body = build_backbone(args.weights, arch="vit_small")  # config from the weights when given
            width = self.body.embed_dim
        elif args.backbone.startswith("resunet"):
            from minimal3d import resunet

            self.body = getattr(resunet, args.backbone)(out_channels=args.dim, output_stride=8)
            width = args.dim
        else:
            self.body, width = SmallUNet(args.dim), args.dim
        self.project = nn.Conv2d(width, args.dim, 1)
        self.head = nn.Linear(args.dim, num_classes + 4) if num_classes else None  # plain baseline

    def forward(self, images):
        from minimal3d.vit import normalize_image

        x = normalize_image(images)
        if args.backbone == "vit":
            x = self.body.get_intermediate_layers(x, n=1, reshape=True)[0]
        return self.project(self.body(x) if args.backbone != "vit" else x)  # (B, D, h, w)


def gather(feature_map, uv):
    """Features (B, K_max, D) of the cells holding the keypoints uv (B, K_max, 2) (image pixels)."""
    h, w = feature_map.shape[-2:]
    cell = (uv / STRIDE).floor().long()
    col, row = cell[..., 0].clamp(0, w - 1), cell[..., 1].clamp(0, h - 1)
    batch = torch.arange(feature_map.shape[0], device=uv.device)[:, None]
    return feature_map.permute(0, 2, 3, 1)[batch, row, col]


def background_features(feature_map, uv, visible, count, generator):
    """`count` features per image at cells holding no projected vertex (NOVUM: off the object)."""
    B, D, h, w = feature_map.shape
    cell = (uv / STRIDE).floor().long()
    occupied = torch.zeros(B, h * w, device=uv.device)
    index = (cell[..., 1].clamp(0, h - 1) * w + cell[..., 0].clamp(0, w - 1))
    occupied.scatter_(1, index, (visible > 0).float() + (uv >= 0).all(-1).float())  # any projected vertex
    keys = torch.rand(B, h * w, generator=generator).to(uv.device) + 2 * (occupied > 0).float()
    chosen = keys.argsort(1)[:, :count]  # free cells first
    return feature_map.flatten(2).transpose(1, 2).gather(1, chosen[..., None].expand(-1, -1, D))


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def batches(n, batch_size, generator):
    order = torch.randperm(n, generator=generator)[dist.rank::dist.world_size]
    return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)] or [order]


def train_compnet(mode, train, calib, meshes):
    """mode "grouped" (3D-CompNets) or "full" (NOVUM). Returns model, memory and per-step loss times."""
    checkpoint = out / f"{mode}.pt"
    model = FeatureNet().to(device)
    memory = VertexMemory([m.vertices.shape[0] for m in meshes], dim=args.dim, num_background=args.num_background,
                          momentum=args.momentum, generator=torch.Generator().manual_seed(args.seed)).to(device)
    if args.resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device)
        model.load_state_dict(state["model"])
        memory.load_state_dict(state["memory"])
        return model, memory, state["loss_seconds"], state["omega"]
    ddp_model = runtime.wrap_ddp(model, dist)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    images, labels = stack(train, "image"), stack(train, "label")
    uv, visible = keypoints_of(train, meshes)
    generator = torch.Generator().manual_seed(args.seed + 1)
    omega = torch.ones(len(meshes), len(meshes), device=device) if mode == "grouped" else None
    steps = args.steps or args.epochs * max(1, len(train) // (args.batch_size * dist.world_size))
    loss_seconds, step, epoch = [], 0, 0
    progress = tqdm(total=steps, desc=f"{mode}", disable=not dist.is_main)
    while step < steps:
        if mode == "grouped" and epoch > 0 and epoch % args.omega_every == 0:
            omega = confusion_weights(confusion_matrix(model, memory, calib, len(meshes)), args.omega_threshold).to(device)
        for index in batches(len(train), args.batch_size, generator):
            if step >= steps:
                break
            model.train()
            feature_map = F.normalize(ddp_model(images[index].to(device)), dim=1)
            vertex_features = gather(feature_map, uv[index].to(device))
            clutter = background_features(feature_map, uv[index].to(device), visible[index].to(device),
                                          args.background_per_image, generator)
            start = time.perf_counter()
            loss_main = grouped_vmf_contrast(
                vertex_features, uv[index].to(device), visible[index].to(device), labels[index].to(device), memory,
                omega=omega, num_sampled=args.num_sampled if mode == "grouped" else None,
                temperature=args.temperature, distance_threshold=args.distance_threshold,
                cross_class_scale=args.cross_class_scale, generator=generator)  # Eq. 5
            loss_seconds.append(time.perf_counter() - start)  # contrast forward only (backward includes the backbone)
            loss = loss_main + background_repulsion(clutter, memory.vertices)
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"{mode}: non-finite loss {float(loss)} at step {step}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            memory.update(vertex_features.detach(), visible[index].to(device), labels[index].to(device), clutter.detach())
            if dist.enabled:  # keep one memory: average the ranks' updates
                for buffer in (memory.vertices, memory.background):
                    buffer.copy_(F.normalize(runtime.all_reduce_mean(buffer, dist), dim=-1))
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{float(loss.detach()):.3f}")
        epoch += 1
    progress.close()
    if dist.is_main:
        torch.save(dict(model=model.state_dict(), memory=memory.state_dict(), loss_seconds=loss_seconds,
                        omega=omega, args=vars(args)), checkpoint)
    return model, memory, loss_seconds, omega


def train_plain(train, num_classes):
    """Same backbone, global pooling, linear class logits + (cos a, sin a, elevation, theta) regression."""
    checkpoint = out / "plain.pt"
    model = FeatureNet(num_classes).to(device)
    if args.resume and checkpoint.exists():
        model.load_state_dict(torch.load(checkpoint, map_location=device)["model"])
        return model
    ddp_model = runtime.wrap_ddp(model, dist)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    images, labels = stack(train, "image"), stack(train, "label")
    targets = torch.stack([stack(train, "azimuth").cos(), stack(train, "azimuth").sin(),
                           stack(train, "elevation"), stack(train, "theta")], dim=1)
    generator = torch.Generator().manual_seed(args.seed + 2)
    steps = args.steps or args.epochs * max(1, len(train) // (args.batch_size * dist.world_size))
    progress = tqdm(total=steps, desc="plain", disable=not dist.is_main)
    step = 0
    while step < steps:
        for index in batches(len(train), args.batch_size, generator):
            if step >= steps:
                break
            model.train()
            outputs = plain_outputs(ddp_model, images[index].to(device))
            loss = F.cross_entropy(outputs[:, :num_classes], labels[index].to(device)) + \
                F.l1_loss(outputs[:, num_classes:], targets[index].to(device))
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"plain: non-finite loss at step {step}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{float(loss.detach()):.3f}")
    progress.close()
    if dist.is_main:
        torch.save(dict(model=model.state_dict(), args=vars(args)), checkpoint)
    return model


def plain_outputs(model, images):
    net = runtime.unwrap(model)
    return net.head(model(images).mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def feature_maps(model, samples):
    model.eval()
    images = stack(samples, "image")
    return torch.cat([F.normalize(model(images[i:i + 32].to(device)), dim=1) for i in range(0, len(images), 32)])


def confusion_matrix(model, memory, samples, num_classes):
    scores = classification_scores(feature_maps(model, samples), memory.vertices, memory.vertex_class, num_classes,
                                   memory.background)
    confusion = torch.zeros(num_classes, num_classes)
    confusion.index_put_((stack(samples, "label"), scores.argmax(1).cpu()), torch.ones(len(samples)), accumulate=True)
    return confusion


def pose_error(samples, azimuth, elevation, theta):
    truth = pose_from_angles(stack(samples, "azimuth"), stack(samples, "elevation"), stack(samples, "theta"), 5.0)
    guess = pose_from_angles(azimuth, elevation, theta, 5.0)
    return rotation_error(guess[:, :3, :3], truth[:, :3, :3])


def feature_K(sample, feature_map):
    """Intrinsics at feature resolution: feature cell j covers input pixels [stride j, stride (j + 1))."""
    scale = torch.diag(torch.tensor([1.0 / STRIDE, 1.0 / STRIDE, 1.0]))
    return (scale @ sample["K"]).to(feature_map)


def evaluate_compnet(model, memory, meshes, samples, grid_cache, closest=False):
    """Accuracy of S_y and render-and-compare pose (given the true class, or the closest known class)."""
    maps = feature_maps(model, samples)
    scores = classification_scores(maps, memory.vertices, memory.vertex_class, memory.num_classes, memory.background)
    predicted = scores.argmax(1).cpu()
    angles = []
    for n, s in enumerate(samples):
        candidate = int(predicted[n]) if closest else int(s["label"])
        estimate = estimate_pose(maps[n], meshes, memory, feature_K(s, maps[n]), candidates=[candidate],
                                 steps=args.pose_steps, grid_cache=grid_cache)
        angles.append((estimate.azimuth, estimate.elevation, estimate.theta))
    angles = torch.tensor(angles)
    errors = pose_error(samples, *angles.unbind(1))
    accuracy = float((predicted == stack(samples, "label")).float().mean())
    return dict(accuracy=accuracy, pose_accuracy=float((errors < POSE_THRESHOLD).float().mean()),
                median_pose_error_deg=float(errors.median().rad2deg())), angles


@torch.no_grad()
def evaluate_plain(model, samples, num_classes):
    model.eval()
    outputs = torch.cat([plain_outputs(model, stack(samples, "image")[i:i + 32].to(device)).cpu()
                         for i in range(0, len(samples), 32)])
    predicted = outputs[:, :num_classes].argmax(1)
    azimuth = torch.atan2(outputs[:, num_classes + 1], outputs[:, num_classes])
    errors = pose_error(samples, azimuth, outputs[:, num_classes + 2], outputs[:, num_classes + 3])
    return dict(accuracy=float((predicted == stack(samples, "label")).float().mean()),
                pose_accuracy=float((errors < POSE_THRESHOLD).float().mean()),
                median_pose_error_deg=float(errors.median().rad2deg()))


def previews(model, memory, meshes, samples, angles, name):
    """Per image: input | vertex-activation map (max_k f . C_k of its class) | estimated pose's mesh overlay."""
    maps = feature_maps(model, samples)
    S = args.image_size
    panels = []
    for n, s in enumerate(samples):
        label = int(s["label"])
        activation = (memory.class_vertices(label) @ maps[n].flatten(1)).max(0).values.reshape(maps.shape[-2:])
        activation = F.interpolate(activation[None, None].clamp(0, 1), size=(S, S), mode="nearest")[0, 0].cpu()
        viewmat = pose_from_angles(*angles[n].tolist(), float(s["distance"]))
        face_index, _ = rasterize(meshes[label], viewmat, s["K"], S, S)
        covered = (face_index[0] >= 0).float()
        edge = (covered - F.max_pool2d(-covered[None, None], 3, 1, 1)[0, 0].neg()).clamp(0, 1)  # silhouette ring
        overlay = s["image"] * (1 - 0.35 * covered) + torch.tensor([0.0, 0.8, 0.2])[:, None, None] * 0.35 * covered
        overlay = torch.where(edge > 0, torch.tensor([1.0, 1.0, 0.0])[:, None, None], overlay)
        panels += [s["image"], runtime.colorize_depth(activation), overlay]
    runtime.save_png(out / f"preview_{name}.png", panels)


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------

if args.data is None:
    all_classes = list(range(args.num_classes))
    heldout = [args.num_classes - 1 - 2 * k for k in range(args.num_heldout)]  # odd members of the last pairs
    known = [c for c in all_classes if c not in heldout]
    meshes_all = synthetic_meshes()
    relabel = {c: i for i, c in enumerate(known)}

    def split(name, classes, per_class, **kw):
        return synthetic_split(name, classes, per_class, **kw)

    train = split("train", known, args.train_per_class)
    calib = split("calib", known, max(1, args.train_per_class // 4))
    tests = {"iid": split("test", known, args.test_per_class)}
    for level in (1, 2, 3):
        tests[f"occlusion_L{level}"] = split("test", known, args.test_per_class, occlusion=level)
    tests["corruption"] = split("test", known, args.test_per_class, corruption=True)
    unknown = split("test", heldout, args.test_per_class) if heldout else []
else:
    names = args.classes or sorted(p.name for p in (Path(args.data) / "CAD").iterdir())
    heldout = list(range(len(names) - args.num_heldout, len(names)))
    known = [c for c in range(len(names)) if c not in heldout]
    meshes_all = real_meshes(names)
    relabel = {c: i for i, c in enumerate(known)}
    val_split = "val"
    everything = real_split("train", [names[c] for c in known])
    calib_mask = torch.arange(len(everything)) % 10 == 9
    train = [s for s, m in zip(everything, calib_mask) if not m]
    calib = [s for s, m in zip(everything, calib_mask) if m]
    tests = {"iid": real_split(val_split, [names[c] for c in known])}
    unknown = real_split(val_split, [names[c] for c in heldout]) if heldout else []
    for s in unknown:  # labels of the held-out classes follow the known ones (only used for the true pose)
        s["label"] = torch.tensor(len(known))

if args.data is None:  # labels 0..|known|-1 for the models; held-out images keep an out-of-range label
    for group in [train, calib, *tests.values()]:
        for s in group:
            s["label"] = torch.tensor(relabel[int(s["label"])])
    for s in unknown:
        s["label"] = torch.tensor(len(known))
meshes = [meshes_all[c] for c in known]
if dist.is_main:
    print(f"{len(known)} known classes, {len(heldout)} held out; {len(train)} train, {len(calib)} calib, "
          f"{sum(len(t) for t in tests.values())} test, {len(unknown)} unknown-class images; device {device}")

if args.full_contrast:
    args.models = ["full"]
modes = [m for m in ("grouped", "full") if m in args.models]
results, loss_times, grid_cache = {}, {}, {}
trained = {}
for mode in modes:
    model, memory, seconds, omega = train_compnet(mode, train, calib, meshes)
    trained[mode] = (model, memory)
    loss_times[mode] = float(np.median(seconds)) if seconds else float("nan")
    if dist.is_main:
        results[mode] = {}
        for name, samples in tests.items():
            results[mode][name], angles = evaluate_compnet(model, memory, meshes, samples, grid_cache)
            if name in ("iid", "occlusion_L2"):
                previews(model, memory, meshes, samples[:4], angles[:4], f"{mode}_{name}")
        if unknown:
            metrics_unknown, _ = evaluate_compnet(model, memory, meshes, unknown, grid_cache, closest=True)
            results[mode]["unknown_class_pose"] = {k: v for k, v in metrics_unknown.items() if k != "accuracy"}
        runtime.write_metrics(out, dict(results=results, partial=True))  # kept if a later model fails
if "plain" in args.models:
    plain = train_plain(train, len(known))
    if dist.is_main:
        results["plain"] = {name: evaluate_plain(plain, samples, len(known)) for name, samples in tests.items()}
        if unknown:
            metrics_unknown = evaluate_plain(plain, unknown, len(known))
            results["plain"]["unknown_class_pose"] = {k: v for k, v in metrics_unknown.items() if k != "accuracy"}

if dist.is_main:
    rows = []
    for model_name, per_split in results.items():
        for split_name, values in per_split.items():
            rows.append(dict(model=model_name, split=split_name, accuracy=values.get("accuracy", float("nan")),
                             pose_acc_pi6=values["pose_accuracy"], median_err_deg=values["median_pose_error_deg"]))
    print(runtime.format_table(rows))
    print("median contrast-loss forward time per step: " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in loss_times.items()))
    runtime.write_metrics(out, dict(results=results, loss_seconds_per_step=loss_times, known_classes=known,
                                    heldout_classes=heldout, args=vars(args)))
