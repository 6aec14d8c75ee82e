"""3D-Prior: fine-tune a ViT so that its representation can be rendered as a 3D scene.

Paper: Aygün, Dhar, Yan, Mac Aodha, Ranjan, "Enhancing 2D Representation Learning with a 3D Prior",
2024, arXiv:2406.02535 (no official code; the renderer follows EG3D, see minimal3d/triplane.py).
The backbone f (DINOv2 ViT) gives h = class + patch tokens of its last 4 layers; the decoder Φ
(TriplaneGenerator) turns h into triplanes; an MLP (TriplaneDecoder) decodes sampled features into
density and colour; volume rendering from ONE fixed camera reconstructs the image and its (pseudo) depth.
Eq. 5: L = 0.1 MSE(image) + 1 MSE(depth, pseudo depth) + 1 ||f(I) - f_teach(I)||^2 + 1e-3 L1(densities),
f_teach a frozen copy of the starting backbone. Adam, lr 1e-4, random crop + horizontal flip.
Only the backbone is kept (DINOv2 key layout).

Decisions where the paper is silent (all flags):
- camera: OpenCV pinhole at (0, 0, -2.7) looking at the origin (EG3D's FFHQ radius), horizontal field of
  view 2 atan(0.55 / 2.7) ~ 23 degrees so the cube [-0.5, 0.5]^3 (box_size 1) fills the image;
  rays from cameras.pixel_rays; near/far 2.2 / 3.2 (the cube's depth range); 16 + 16 samples.
- rgb: the renderer's [0, 1] range against images in [0, 1], black background (no white_back).
- pseudo depth: camera z-depth of unknown scale (ZoeDepth-like); each image is mapped affinely
  (its min/max) into z in [2.3, 3.1] (inside the cube, away from its faces); the rendered ray distance t
  is converted to z = t <d, forward> before the loss.
- low-opacity rays: the depth MSE is weighted by the detached opacity, so rays the model leaves empty do
  not pull depths around (their expected depth is undefined).
- distillation: mean squared error between student and teacher h (all tokens, all 4 layers).
- density L1: mean of softplus(raw - 1) over every queried sample (coarse + fine).
- h: per layer [class; patches] after the final norm, the 4 layers concatenated along channels.
- --from-scratch: the student starts from random weights; there is no meaningful frozen copy, so
  distillation is off.
- sizes: the paper renders 256 x 256 from 224 inputs with 128 x 128 x 32 triplanes; the defaults here are
  CPU-sized (see --image-size, --render-size, --plane-res); pass the paper's values on a GPU.

Data: synthetic single images with metric depth (minimal3d.synthetic) by default, or --data DIR with
DIR/<class>/<name>.{png,jpg,jpeg} and the pseudo depth beside each image as DIR/<class>/<name>.npy
(float (H, W)) or DIR/<class>/<name>_depth.png (16-bit). Class folders give the probe labels.
Without --weights, a small ViT is first pretrained on the synthetic classes with plain 2D supervision
(cross-entropy) for --pretrain-steps: that is the 2D "teacher" the 3D prior should improve.

    python train_triplane.py                      # synthetic, a few minutes on CPU
    python train_triplane.py --quick --out /tmp/t  # seconds (smoke test)
    python train_triplane.py --weights dinov2_vits14_pretrain.pth --data DIR --image-size 224 \\
        --render-size 256 --plane-res 128 --batch-size 64 --steps 20000 --device cuda
    torchrun --nproc_per_node=2 train_triplane.py ...
    python train_triplane.py --eval --out DIR      # probes of DIR/teacher_dinov2.pth vs DIR/backbone_dinov2.pth
"""

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from minimal3d import cameras, runtime, synthetic, vit
from minimal3d.probes import depth_metrics, fit_linear_classifier, fit_linear_regressor
from minimal3d.triplane import TriplaneDecoder, TriplaneGenerator, render_triplane

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--data", help="image folder DIR/<class>/<image> with pseudo depth beside each image")
parser.add_argument("--weights", help="official DINOv2 .pth (else a small random ViT, pretrained in 2D first)")
parser.add_argument("--arch", default="vit_tiny", help="ViT when no --weights (vit_tiny, vit_small, ...)")
parser.add_argument("--device", default="auto")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--steps", type=int, default=120, help="3D-prior fine-tuning steps")
parser.add_argument("--pretrain-steps", type=int, default=250, help="2D pretraining steps (no --weights)")
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--lr", type=float, default=1e-4)  # paper
parser.add_argument("--image-size", type=int, default=112, help="ViT input (paper 224)")
parser.add_argument("--render-size", type=int, default=32, help="rendered image side (paper 256)")
parser.add_argument("--plane-res", type=int, default=64, help="triplane resolution (paper 128)")
parser.add_argument("--plane-channels", type=int, default=32)
parser.add_argument("--generator-dim", type=int, default=128, help="width of the decoder Φ (ours; paper n/a)")
parser.add_argument("--samples", type=int, default=16)  # paper
parser.add_argument("--importance", type=int, default=16)  # EG3D default N = S
parser.add_argument("--w-image", type=float, default=0.1)  # Eq. 5
parser.add_argument("--w-depth", type=float, default=1.0)
parser.add_argument("--w-distill", type=float, default=1.0)
parser.add_argument("--w-density", type=float, default=1e-3)
parser.add_argument("--no-triplane", action="store_true", help="ablation: conv decoder predicts image + depth")
parser.add_argument("--no-distill", action="store_true", help="ablation: no distillation to the frozen copy")
parser.add_argument("--from-scratch", action="store_true", help="ablation: the student starts from random weights")
parser.add_argument("--num-classes", type=int, default=10)
parser.add_argument("--train-images", type=int, default=240)
parser.add_argument("--test-images", type=int, default=120)
parser.add_argument("--chunk-rays", type=int, default=None, help="render rays in chunks (bounded memory)")
parser.add_argument("--eval", action="store_true", help="only run the probes on --out's saved backbones")
parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
parser.add_argument("--out", default="out/triplane")
parser.add_argument("--quick", action="store_true", help="tiny sizes, a run of seconds")
args = parser.parse_args()
if args.quick:
    args.steps, args.pretrain_steps, args.batch_size = 4, 6, 4
    args.image_size, args.render_size, args.plane_res, args.plane_channels = 56, 12, 32, 8
    args.generator_dim, args.samples, args.importance = 32, 8, 8
    args.train_images, args.test_images, args.num_classes = 24, 12, 4

CAMERA_DISTANCE, BOX_SIZE, NEAR, FAR = 2.7, 1.0, 2.2, 3.2
DEPTH_RANGE = (2.3, 3.1)  # pseudo depth is mapped into this camera-z range
out_dir = Path(args.out)
device = runtime.pick_device(args.device)
dist = runtime.init_distributed(device)
device = dist.device
runtime.seed_everything(args.seed, dist.rank)
log = print if dist.is_main else (lambda *a, **k: None)


# ---------------------------------------------------------------------------------------------------
# Data: images (N, 3, S, S) in [0, 1], pseudo depth (N, S, S) > 0, labels (N,)
# ---------------------------------------------------------------------------------------------------


def synthetic_split(split: str, count: int, size: int, texture_swap: bool = False) -> dict:
    samples = [synthetic.single_image_sample(i, split, size, size, args.num_classes, args.seed, texture_swap)
               for i in range(count)]
    return {"images": torch.stack([s["image"] for s in samples]), "depth": torch.stack([s["depth"] for s in samples]),
            "labels": torch.stack([s["label"] for s in samples])}


def read_depth(image_path: Path) -> np.ndarray:
    npy, png = image_path.with_suffix(".npy"), image_path.with_name(image_path.stem + "_depth.png")
    if npy.exists():
        return np.load(npy).astype(np.float32)
    if png.exists():
        return np.asarray(Image.open(png), dtype=np.float32)
    raise FileNotFoundError(f"no pseudo depth for {image_path}: expected {npy.name} or {png.name}")


def folder_split(root: Path, size: int) -> tuple[dict, list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, depths, labels = [], [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in (".png", ".jpg", ".jpeg") or path.stem.endswith("_depth"):
                continue
            image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255)
            depth = torch.from_numpy(read_depth(path))
            images.append(F.interpolate(image.permute(2, 0, 1)[None], (size, size), mode="area")[0])
            depths.append(F.interpolate(depth[None, None], (size, size), mode="area")[0, 0])
            labels.append(label)
    if not images:
        raise ValueError(f"--data {root}: no images found in {root}/<class>/")
    return {"images": torch.stack(images), "depth": torch.stack(depths), "labels": torch.tensor(labels)}, classes


def augment(images: torch.Tensor, depth: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop (60-100% of the side) + horizontal flip, applied to image and depth alike."""
    side = images.shape[-1]
    out_images, out_depth = [], []
    for image, d in zip(images, depth):
        crop = int(side * (0.6 + 0.4 * torch.rand(()).item()))
        top, left = torch.randint(0, side - crop + 1, (2,)).tolist()
        image, d = image[:, top:top + crop, left:left + crop], d[top:top + crop, left:left + crop]
        if torch.rand(()).item() < 0.5:
            image, d = image.flip(-1), d.flip(-1)
        out_images.append(F.interpolate(image[None], (size, size), mode="bilinear", antialias=True, align_corners=False)[0])
        out_depth.append(F.interpolate(d[None, None], (size, size), mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(out_images).clamp(0, 1), torch.stack(out_depth)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images, (size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------
# Model pieces
# ---------------------------------------------------------------------------------------------------


def representation(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """h: [class; patches] of the last 4 layers, concatenated along channels -> (B, 1 + P, 4 D)."""
    layers = backbone.get_intermediate_layers(vit.normalize_image(images), 4, return_class_token=True)
    return torch.cat([torch.cat([cls[:, None], patches], 1) for patches, cls in layers], -1)


class Representation(nn.Module):
    """The backbone as a module whose forward is h, so that DDP sees (and syncs) the student's forward."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return representation(self.backbone, images)


def probe_features(backbone: nn.Module, images: torch.Tensor, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features: class token + mean patch token (N, 2D), and patch tokens (N, P, D), last layer."""
    pooled, patches = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = vit.normalize_image(images[start:start + batch].to(device))
            ((tokens, cls),) = backbone.get_intermediate_layers(x, 1, return_class_token=True)
            pooled.append(torch.cat([cls, tokens.mean(1)], -1).cpu())
            patches.append(tokens.cpu())
    return torch.cat(pooled), torch.cat(patches)


class ConvImageDecoder(nn.Module):
    """--no-triplane ablation: patch tokens (as a grid) + class token -> image (3) and depth (1) directly."""

    def __init__(self, input_dim: int, grid: int, out_size: int, width: int):
        super().__init__()
        self.grid, self.out_size = grid, out_size
        self.proj = nn.Linear(2 * input_dim, width)
        layers, size = [], grid
        while size < out_size:
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(width, width, 3, padding=1), nn.GELU()]
            size *= 2
        self.body = nn.Sequential(*layers, nn.Conv2d(width, 4, 1))

    def forward(self, tokens: torch.Tensor) -> dict:
        cls, patches = tokens[:, :1], tokens[:, 1:]
        x = self.proj(torch.cat([patches, cls.expand_as(patches)], -1))  # (B, P, width)
        x = x.transpose(1, 2).unflatten(-1, (self.grid, self.grid))
        x = F.interpolate(self.body(x), (self.out_size, self.out_size), mode="bilinear", align_corners=False)
        depth_z = DEPTH_RANGE[0] + (DEPTH_RANGE[1] - DEPTH_RANGE[0]) * torch.sigmoid(x[:, 3])
        return {"rgb": torch.sigmoid(x[:, :3]), "depth_z": depth_z, "opacity": torch.ones_like(depth_z)}


def fixed_camera(size: int):
    """The one fixed camera: rays (R, 3) and each ray's cos to the optical axis (z = t * cos)."""
    eye = torch.tensor([0.0, 0.0, -CAMERA_DISTANCE])
    viewmat = cameras.look_at(eye, torch.zeros(3), torch.tensor([0.0, -1.0, 0.0]))
    K = cameras.fov_intrinsics(2 * math.atan(0.55 / CAMERA_DISTANCE), size, size)
    origins, directions = cameras.pixel_rays(viewmat, K, size, size)
    forward = viewmat[2, :3]  # the camera's z axis in world coordinates
    return origins.to(device), directions.to(device), (directions @ forward).to(device)


def map_pseudo_depth(depth: torch.Tensor) -> torch.Tensor:
    """Per image, affinely map (min, max) of the pseudo z-depth to DEPTH_RANGE: (B, H, W)."""
    low = depth.flatten(1).min(1).values.view(-1, 1, 1)
    high = depth.flatten(1).max(1).values.view(-1, 1, 1)
    unit = (depth - low) / (high - low).clamp_min(1e-6)
    return DEPTH_RANGE[0] + (DEPTH_RANGE[1] - DEPTH_RANGE[0]) * unit


class Prior3D(nn.Module):
    """Φ + point decoder + renderer (or the conv ablation): h -> rendered image, depth, opacity, densities."""

    def __init__(self, token_dim: int, grid: int):
        super().__init__()
        if args.no_triplane:
            self.image_decoder = ConvImageDecoder(token_dim, grid, args.render_size, args.generator_dim)
        else:
            self.generator = TriplaneGenerator(token_dim, args.plane_channels, args.plane_res, embed_resolution=16,
                                               dim=args.generator_dim, num_heads=max(1, args.generator_dim // 32))
            self.decoder = TriplaneDecoder(args.plane_channels)
        self.rays = fixed_camera(args.render_size)

    def forward(self, tokens: torch.Tensor) -> dict:
        if args.no_triplane:
            return self.image_decoder(tokens)
        planes = self.generator(tokens)  # (B, 3, C, H, W)
        origins, directions, cosine = self.rays
        batch = tokens.shape[0]
        out = render_triplane(planes, self.decoder, origins.expand(batch, -1, -1), directions.expand(batch, -1, -1),
                              NEAR, FAR, args.samples, args.importance, BOX_SIZE, chunk_rays=args.chunk_rays)
        size = args.render_size
        return {"rgb": out["rgb"].transpose(1, 2).unflatten(-1, (size, size)),  # (B, 3, H, W)
                "depth_z": (out["depth"][..., 0] * cosine).unflatten(-1, (size, size)),  # ray distance -> z
                "opacity": out["opacity"][..., 0].unflatten(-1, (size, size)),
                "density": F.softplus(out["raw_sigma"] - 1.0)}  # all queried samples, EG3D's activation


def losses(prior: nn.Module, student: nn.Module, teacher, images, depth) -> tuple[torch.Tensor, dict, dict]:
    """Eq. 5 on a batch of augmented images (B, 3, S, S) and raw pseudo depth (B, S, S).

    student: a ``Representation`` (maybe DDP-wrapped); teacher: the frozen backbone or None."""
    tokens = student(images)
    out = prior(tokens)
    target_rgb = resize(images, args.render_size)
    target_z = map_pseudo_depth(F.interpolate(depth[:, None], (args.render_size,) * 2, mode="area")[:, 0])
    terms = {"image": F.mse_loss(out["rgb"], target_rgb)}
    weight = out["opacity"].detach()
    terms["depth"] = (weight * (out["depth_z"] - target_z).square()).sum() / weight.sum().clamp_min(1e-6)
    if teacher is not None:
        with torch.no_grad():
            teacher_tokens = representation(teacher, images)
        terms["distill"] = F.mse_loss(tokens, teacher_tokens)
    if "density" in out:
        terms["density"] = out["density"].abs().mean()
    weights = {"image": args.w_image, "depth": args.w_depth, "distill": args.w_distill, "density": args.w_density}
    total = sum(weights[name] * value for name, value in terms.items())
    return total, {name: value.item() for name, value in terms.items()}, {**out, "target_z": target_z,
                                                                          "target_rgb": target_rgb}


# ---------------------------------------------------------------------------------------------------
# Evaluation: linear probes on frozen features, teacher vs 3D-prior backbone
# ---------------------------------------------------------------------------------------------------


def evaluate(backbones: dict, data: dict) -> dict:
    """Linear classifier (class + mean patch token) on clean train -> clean / texture-swapped test accuracy;
    linear depth probe (patch token -> the patch's mean depth, metres) -> RMSE on the clean test images."""
    results = {}
    for name, backbone in backbones.items():
        backbone.eval()
        train_x, train_patches = probe_features(backbone, resize(data["train"]["images"], args.image_size))
        classifier = fit_linear_classifier(train_x, data["train"]["labels"], data["num_classes"])
        metrics = {}
        for split in ("test", "test_swap"):
            if split in data:
                x, _ = probe_features(backbone, resize(data[split]["images"], args.image_size))
                metrics[f"accuracy_{split}"] = (classifier(x).argmax(1) == data[split]["labels"]).double().mean().item()
        grid = args.image_size // 14
        patch_depth = lambda d: F.adaptive_avg_pool2d(d[:, None], grid).flatten(1)  # (N, P)  # noqa: E731
        regressor = fit_linear_regressor(train_patches.flatten(0, 1), patch_depth(data["train"]["depth"]).flatten())
        _, test_patches = probe_features(backbone, resize(data["test"]["images"], args.image_size))
        predicted = regressor(test_patches.flatten(0, 1))[:, 0].float()
        metrics["depth_probe_RMSE"] = depth_metrics(predicted, patch_depth(data["test"]["depth"]).flatten())["RMSE"]
        results[name] = metrics
    return results


def load_data() -> dict:
    if args.data:
        full, classes = folder_split(Path(args.data), args.image_size + args.image_size // 7)
        order = torch.randperm(len(full["labels"]), generator=torch.Generator().manual_seed(args.seed))
        cut = int(0.8 * len(order))
        split = lambda idx: {k: v[idx] for k, v in full.items()}  # noqa: E731
        return {"train": split(order[:cut]), "test": split(order[cut:]), "num_classes": len(classes)}
    size = args.image_size + args.image_size // 7  # generated a bit larger than the ViT input: room to crop
    return {"train": synthetic_split("train", args.train_images, size),
            "test": synthetic_split("test", args.test_images, size),
            "test_swap": synthetic_split("test", args.test_images, size, texture_swap=True),
            "num_classes": args.num_classes}


def pretrain_2d(backbone: nn.Module, data: dict) -> float:
    """Plain 2D supervision (cross-entropy on the class token) to get a 2D teacher; returns train accuracy."""
    log(f"No --weights: pretraining a random {args.arch} on the synthetic classes with plain 2D supervision "
        f"for {args.pretrain_steps} steps, to get a 2D teacher.")
    backbone.mask_token.requires_grad_(False)  # unused here; DDP needs every trainable parameter used
    classifier = nn.Sequential(backbone, nn.Linear(backbone.embed_dim, data["num_classes"])).to(device)
    model = runtime.wrap_ddp(classifier, dist)  # DDP also broadcasts rank 0's initial weights
    optimizer = torch.optim.AdamW([p for p in classifier.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.05)
    images, labels = data["train"]["images"], data["train"]["labels"]
    correct = []
    backbone.train()
    for step in tqdm(range(args.pretrain_steps), desc="2D pretraining", disable=not dist.is_main):
        index = torch.randint(0, len(labels), (args.batch_size * 2,))
        batch, _ = augment(images[index], data["train"]["depth"][index], args.image_size)
        logits = model(vit.normalize_image(batch.to(device)))
        loss = F.cross_entropy(logits, labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        correct.append((logits.argmax(1).cpu() == labels[index]).float().mean().item())
    return float(np.mean(correct[-20:]))


def save_preview(path: Path, images, out: dict) -> None:
    rows = []
    for i in range(min(2, len(images))):
        low, high = DEPTH_RANGE
        rows.append([resize(images[i:i + 1].cpu(), args.render_size)[0], out["rgb"][i].detach().cpu(),
                     runtime.colorize_depth(out["depth_z"][i].detach().cpu().clamp(low, high)),
                     runtime.colorize_depth(out["target_z"][i].detach().cpu())])
    for i, row in enumerate(rows):
        runtime.save_png(path.with_name(f"{path.stem}_{i}.png"), row)


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------


def main() -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data = load_data()
    log(f"data: {len(data['train']['labels'])} train / {len(data['test']['labels'])} test images, "
        f"{data['num_classes']} classes ({'folder ' + args.data if args.data else 'synthetic'})")
    metrics = {"args": vars(args)}

    if args.eval:
        backbones = {"teacher_2d": vit.load_dinov2(out_dir / "teacher_dinov2.pth").to(device),
                     "prior_3d": vit.load_dinov2(out_dir / "backbone_dinov2.pth").to(device)}
        metrics["eval"] = evaluate(backbones, data)
        log(runtime.format_table([{"backbone": k, **v} for k, v in metrics["eval"].items()]))
        runtime.write_metrics(out_dir, metrics)
        return

    # 2D teacher: an official checkpoint, or a small ViT pretrained here with plain 2D supervision
    quick_arch = {"embed_dim": 128, "depth": 4, "num_heads": 2} if args.quick and not args.weights else {}
    teacher = vit.build_backbone(args.weights, args.arch, **quick_arch).to(device)
    resume = torch.load(out_dir / "checkpoint.pt", map_location=device) if args.resume else None
    if resume is not None:
        teacher.load_state_dict(resume["teacher"])
    elif args.weights is None:
        metrics["pretrain_2d_train_accuracy"] = pretrain_2d(teacher, data)
    teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    if args.from_scratch:
        student = vit.build_backbone(None, args.arch, **quick_arch).to(device).train()
    student.mask_token.requires_grad_(False)  # iBOT's mask token takes no part here (DDP needs every grad used)
    distill = not (args.no_distill or args.from_scratch)
    if dist.is_main:
        vit.save_dinov2(teacher, out_dir / "teacher_dinov2.pth")

    token_dim = 4 * student.embed_dim
    prior = Prior3D(token_dim, args.image_size // 14).to(device)
    student_ddp, prior_ddp = runtime.wrap_ddp(Representation(student), dist), runtime.wrap_ddp(prior, dist)
    optimizer = torch.optim.Adam([p for p in [*student.parameters(), *prior.parameters()] if p.requires_grad],
                                 lr=args.lr)
    start_step = 0
    if resume is not None:
        student.load_state_dict(resume["student"]), prior.load_state_dict(resume["prior"])
        optimizer.load_state_dict(resume["optimizer"])
        start_step = resume["step"]

    images, depth = data["train"]["images"], data["train"]["depth"]
    history, bad_steps = [], 0
    progress = tqdm(range(start_step, args.steps), desc="3D prior", disable=not dist.is_main)
    for step in progress:
        index = torch.randint(0, len(images), (args.batch_size,))
        batch, batch_depth = augment(images[index], depth[index], args.image_size)
        total, terms, out = losses(prior_ddp, student_ddp, teacher if distill else None,
                                   batch.to(device), batch_depth.to(device))
        if not torch.isfinite(total):
            bad_steps += 1
            if bad_steps > 5:
                raise FloatingPointError(f"loss is not finite for {bad_steps} steps in a row: {terms}")
            log(f"step {step}: non-finite loss {terms}, step skipped")
            continue
        bad_steps = 0
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        history.append({"total": total.item(), **terms})
        progress.set_postfix({k: f"{v:.4f}" for k, v in history[-1].items()})
        if dist.is_main and (step + 1) % max(1, args.steps // 4) == 0:
            save_preview(out_dir / f"preview_step{step + 1}", batch, out)
            torch.save({"student": student.state_dict(), "prior": prior.state_dict(), "teacher": teacher.state_dict(),
                        "optimizer": optimizer.state_dict(), "step": step + 1, "args": vars(args)},
                       out_dir / "checkpoint.pt")

    if not dist.is_main:
        return
    vit.save_dinov2(student, out_dir / "backbone_dinov2.pth")  # only the backbone is kept
    window = history[-max(1, len(history) // 5):]
    metrics["train_losses_last"] = {k: float(np.mean([h[k] for h in window])) for k in window[0]} if window else {}
    metrics["train_losses_first"] = history[0] if history else {}
    with torch.no_grad():
        student.eval(), prior.eval()
        preview = data["test"]["images"][:2]
        _, _, out = losses(prior, Representation(student), None, resize(preview, args.image_size).to(device),
                           data["test"]["depth"][:2].to(device))
    save_preview(out_dir / "preview_test", preview, out)
    metrics["eval"] = evaluate({"teacher_2d": teacher, "prior_3d": student}, data)
    metrics["seconds"] = time.time() - started
    runtime.write_metrics(out_dir, metrics)
    log(runtime.format_table([{"backbone": k, **v} for k, v in metrics["eval"].items()]))
    log(f"wrote {out_dir}/backbone_dinov2.pth, previews and metrics.json in {metrics['seconds']:.0f} s")


if __name__ == "__main__":
    main()
