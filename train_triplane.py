"""3D-Prior: Aygün, Dhar, Yan, Mac Aodha, Ranjan, "Enhancing 2D Representation Learning with a 3D Prior",
CVPR Workshops 2024, arXiv:2406.02535 (no official code; the renderer follows EG3D, minimal3d/triplane.py).

A ViT f is fine-tuned so that its representation h can be decoded into a triplane (decoder Φ, §3.4), which,
volume-rendered from ONE fixed camera, reconstructs the image and its (pseudo) depth (Eq. 5):
L = 0.1 MSE(image) + 1 MSE(depth, pseudo depth) + 1 ||f(I) - f_teach(I)||^2 + 1e-3 L1(densities),
with f_teach a frozen copy of the starting backbone (the "2D teacher") and f(I) the backbone's output
embedding. Only the backbone is kept. CPU deviations (flags restore the paper): Φ is first trained alone
on the frozen teacher's h (--warmup-steps), the patch tokens also reach the camera-facing plane directly
(--no-patch-skip), the depth error is measured in units of the training depth's spread (--depth-unit
metre), and in the synthetic world the 3D prior sees unlabelled images whose texture is untied from the
shape (--prior-images train).
Then both backbones are evaluated side by side with frozen linear probes, as in §4: accuracy (in
distribution and on out-of-distribution sets), shape bias on cue-conflict images (Geirhos et al. 2019)
and a linear depth probe. The default run (synthetic shape-texture world, about 4.5 CPU minutes) writes
the paper's claims as a claims table in metrics.json: the 3D prior should raise the shape bias and lower
the depth-probe RMSE of the 2D teacher (how far it does over seeds, and why: docs/triplane.md); metrics.json
also has, per backbone, how linearly decodable the shape and the texture class are on the cue-conflict
images (what the features carry, whichever cue the probe picks). All decisions and deviations:
docs/triplane.md.

Data (default synthetic: minimal3d.synthetic.shape_texture_sample). --data DIR: DIR/<class>/<name>.png
(.jpg/.jpeg) with the pseudo depth beside each image as <name>.npy (float32 (H, W), camera z) or
<name>_depth.png (16-bit, millimetres); 80 % train / 20 % test. --weights loads an official DINOv2 .pth
(vit.load_dinov2) as the 2D teacher and the student's start; without it a small ViT is trained here in
2D (cross-entropy) on the training images, and that is the 2D teacher. Evaluation folders:
--eval-data NAME=DIR (class folders), --cue-conflict DIR, --depth-data DIR (see --help).

    python train_triplane.py                       # synthetic miniature, about 4.5 CPU minutes
    python train_triplane.py --quick --out /tmp/t  # seconds (smoke test)
    python train_triplane.py --weights dinov2_vits14_pretrain.pth --data IMAGENET_DIR --image-size 224 \\
        --render-size 256 --plane-res 128 --batch-size 64 --steps 20000 --device cuda \\
        --eval-data imagenet_r=IMAGENET_R_DIR sketch=SKETCH_DIR --cue-conflict CUE_DIR --depth-data NYU_DIR
"""

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from minimal3d import cameras, runtime, synthetic, vit
from minimal3d.probes import depth_metrics, fit_linear_classifier, fit_linear_regressor, shape_bias
from minimal3d.triplane import TriplaneDecoder, TriplaneGenerator, render_triplane

# The one fixed camera (EG3D's FFHQ radius) and the cube it looks at; the shape-texture world is rendered
# from the same camera, so its metric depth can be used as it is.
CAMERA_DISTANCE, BOX_SIZE, NEAR, FAR = 2.7, 1.0, 2.2, 3.2
FIELD_OF_VIEW = 2 * math.atan(0.55 / CAMERA_DISTANCE)  # the cube [-0.5, 0.5]^3 fills the image
MAPPED_DEPTH_RANGE = (2.3, 3.1)  # --pseudo-depth per-image maps each image's depth into this z range
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

# Flags whose default depends on --quick (None in the parser, filled in after parsing; never overriding).
PROFILES = {
    "normal": dict(steps=300, warmup_steps=200, pretrain_steps=250, batch_size=8, pretrain_batch_size=32, image_size=56,
                   render_size=16, plane_res=32, plane_channels=16, embed_res=8, generator_dim=96, samples=16,
                   importance=16, train_images=2000, test_images=300, cue_conflict_images=1000, num_classes=5,
                   depth_patch=4),
    "quick": dict(steps=3, warmup_steps=2, pretrain_steps=6, batch_size=4, pretrain_batch_size=8, image_size=28, render_size=8,
                  plane_res=8, plane_channels=8, embed_res=4, generator_dim=32, samples=8, importance=4,
                  train_images=30, test_images=15, cue_conflict_images=15, num_classes=3, depth_patch=2),
}
QUICK_VIT = {"embed_dim": 64, "depth": 4, "num_heads": 2}  # --quick without --weights: a tiny ViT


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; defaults are the paper's unless CPU forces smaller (each such flag says so)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data and evaluation")
    data.add_argument("--data", help="training images DIR/<class>/<name>.png with pseudo depth beside each image "
                      "(<name>.npy float camera z, or <name>_depth.png 16-bit millimetres); 80/20 train/test split. "
                      "Default: the synthetic shape-texture world")
    data.add_argument("--eval-data", nargs="+", default=[], metavar="NAME=DIR",
                      help="extra test sets DIR/<class>/<image> (classes of --data, e.g. ImageNet-R), each "
                      "reported as linear-probe accuracy with the probe trained on the --data train split")
    data.add_argument("--cue-conflict", metavar="DIR", help="cue-conflict images DIR/<shape_class>/"
                      "<texture_class>_<name>.png for the shape bias (default: the synthetic cue-conflict split)")
    data.add_argument("--depth-data", metavar="DIR", help="depth-probe set with DIR/train and DIR/test, each "
                      "holding rgb_<id>.jpg + sync_depth_<id>.png (NYUv2 as in BTS: 16-bit millimetres) or "
                      "<name>.png + <name>.npy (float metres), in any subfolders; 0 = no depth. Default: "
                      "the synthetic world's true depth")
    data.add_argument("--num-classes", type=int, help="synthetic classes (2-5: sphere, cube, cylinder, "
                      "dumbbell, cross)")
    data.add_argument("--train-images", type=int, help="synthetic training images (2D teacher, probes; and the "
                      "number of --prior-images untied): 2000, five times the 384 probe features of vit_tiny, "
                      "so that the linear probes are fitted with more images than dimensions, as on ImageNet")
    data.add_argument("--test-images", type=int, help="synthetic images per held-out class split (test, ood)")
    data.add_argument("--cue-conflict-images", type=int, help="synthetic cue-conflict images; more than the other "
                      "splits because the shape bias counts only the images classified as their shape or texture")
    data.add_argument("--prior-images", choices=("train", "untied"), help="images of the 3D-prior stage (Φ "
                      "warm-up and Eq. 5; no labels are used): train, the labelled training split (paper; the default "
                      "with --data); untied (synthetic default, CPU deviation), as many unlabelled images of the same "
                      "world whose texture is drawn independently of the shape: in the miniature a class fixes its "
                      "depth map up to pose, so on texture-tied images depth can be read off the texture")
    data.add_argument("--texture-agreement", type=float, default=0.9,
                      help="synthetic train/test: probability that an object wears its own class's texture")
    model = parser.add_argument_group("backbone")
    model.add_argument("--weights", help="official DINOv2 .pth (vit.load_dinov2) loaded into the student and the "
                       "frozen teacher ViT; without it a random --arch ViT is first trained here in 2D "
                       "(cross-entropy on the training images): that is the 2D teacher")
    model.add_argument("--arch", default="vit_tiny", choices=sorted(vit.ARCHITECTURES),
                       help="ViT when no --weights")
    model.add_argument("--pretrain-steps", type=int, help="2D teacher training steps (no --weights)")
    model.add_argument("--pretrain-batch-size", type=int, help="2D teacher batch size")
    method = parser.add_argument_group("3D prior (paper values unless noted)")
    method.add_argument("--steps", type=int, help="3D-prior fine-tuning steps")
    method.add_argument("--warmup-steps", type=int, help="CPU deviation: steps that train Φ and the point decoder "
                        "alone (backbone frozen) before the 3D prior, so that Φ reads h before its gradient reaches "
                        "the backbone (paper: 0, Φ and backbone trained together from the start)")
    method.add_argument("--batch-size", type=int, help="paper 64; CPU default 8")
    method.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the backbone (paper)")
    method.add_argument("--decoder-lr", type=float, default=1e-3, help="Adam learning rate of Φ and the point "
                        "decoder (paper: 1e-4 like the backbone; 1e-3 because a CPU run has only a few hundred "
                        "steps in which Φ must learn to render)")
    method.add_argument("--image-size", type=int, help="ViT input side, a multiple of 14 (paper 224; CPU 56)")
    method.add_argument("--render-size", type=int, help="rendered image side (paper 256; CPU 16)")
    method.add_argument("--plane-res", type=int, help="triplane side (paper 128; CPU 32)")
    method.add_argument("--plane-channels", type=int, help="triplane channels D (paper: D, not given; CPU 16)")
    method.add_argument("--embed-res", type=int, help="side of Φ's learnable embedding grid per plane "
                        "(paper: not given; CPU 8); --plane-res must be --embed-res * 2^k")
    method.add_argument("--generator-dim", type=int, help="width of Φ's attention blocks (paper: not given)")
    method.add_argument("--generator-layers", type=int, default=2, help="attention blocks in Φ (paper: not given)")
    method.add_argument("--no-patch-skip", action="store_true", help="the paper's Φ (h reaches the planes only "
                        "through cross-attention). Default (CPU deviation): each patch token is also added to the "
                        "camera-facing xy plane's embedding at its own place, so that a briefly trained Φ reads h")
    method.add_argument("--no-self-attention", action="store_true", help="Φ without self-attention among the "
                        "embeddings (default: self-attention then cross-attention, paper §3.4)")
    method.add_argument("--samples", type=int, help="stratified samples per ray (paper 16; quick 8)")
    method.add_argument("--importance", type=int, help="importance samples per ray (paper: 'importance "
                        "sampling as in EG3D', whose default N = S = 16)")
    method.add_argument("--pseudo-depth", choices=("as-is", "per-image"), default="as-is",
                        help="as-is: pseudo depth is camera z in the renderer's units (paper); per-image: each "
                        f"image's min/max mapped into z in {MAPPED_DEPTH_RANGE} (for depth of unknown scale)")
    method.add_argument("--depth-unit", choices=("metre", "spread"), default="spread",
                        help="unit of the depth error in Eq. 5: metre (paper: real scenes, depth spread of metres) or "
                        "spread (CPU deviation), the standard deviation of the 3D prior's pseudo depth, so that "
                        "the depth term keeps the paper's size against the distillation in a 1-m miniature scene")
    method.add_argument("--density-reduction", choices=("mean", "sum"), default="mean",
                        help="L_norm as the mean |density| over all samples (default) or the sum the paper writes "
                        "(weight 1e-3 on the sum = 1e-3 * B * R * (S + N) on the mean); see docs/triplane.md")
    method.add_argument("--w-image", type=float, default=0.1, help="Eq. 5")
    method.add_argument("--w-depth", type=float, default=1.0, help="Eq. 5")
    method.add_argument("--w-distill", type=float, default=1.0, help="Eq. 5")
    method.add_argument("--w-density", type=float, default=1e-3, help="Eq. 5")
    method.add_argument("--distill-target", choices=("h", "output"), default="output",
                        help="what ||f(I) - f_teach(I)||^2 compares (paper: f(I), the backbone's output, not "
                        "specified further): output, the last layer's normalised class token (DINOv2's output "
                        "embedding); h, every token of the last 4 layers (the decoder's input)")
    method.add_argument("--no-triplane", action="store_true", help="ablation: a conv decoder predicts image and "
                        "depth directly from h (no triplane, no rendering)")
    method.add_argument("--no-distill", action="store_true", help="ablation: no distillation to the teacher")
    method.add_argument("--from-scratch", action="store_true", help="ablation (paper's from-scratch): the student "
                        "starts from random weights and is trained with the image and depth losses only")
    method.add_argument("--depth-weighting", choices=("none", "opacity"), default="none",
                        help="none: plain MSE over pixels with depth; opacity: weight each ray's error by its "
                        "detached opacity (collapses to empty renders here, see docs/triplane.md)")
    method.add_argument("--clip-grad", type=float, default=1.0, help="clip the gradient norm of each step "
                        "(paper: not stated; 0 = off)")
    method.add_argument("--chunk-rays", type=int, help="render that many rays at a time (bounded memory)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default="runs/triplane", help="output folder")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--quick", action="store_true", help="tiny sizes, a run of seconds (explicit flags win)")
    run.add_argument("--resume", action="store_true", help="continue from --out/triplane.pt")
    args = parser.parse_args(argv)

    for name, value in PROFILES["quick" if args.quick else "normal"].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    positive = ("steps", "batch_size", "pretrain_batch_size", "image_size", "render_size", "plane_res",
                "plane_channels", "embed_res", "generator_dim", "generator_layers", "train_images", "test_images",
                "cue_conflict_images", "depth_patch")
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("pretrain_steps", "warmup_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.image_size % 14:
        parser.error(f"--image-size must be a multiple of the ViT patch size 14, got {args.image_size}")
    if args.samples < 3 or args.importance < 0:
        parser.error(f"--samples must be >= 3 and --importance >= 0, got {args.samples}, {args.importance}")
    levels = math.log2(args.plane_res / args.embed_res)
    if levels < 0 or levels != int(levels):
        parser.error(f"--plane-res must be --embed-res * 2^k, got {args.plane_res} and {args.embed_res}")
    if not 2 <= args.num_classes <= len(synthetic.SHAPE_TEXTURE_CLASSES):
        parser.error(f"--num-classes must be in [2, {len(synthetic.SHAPE_TEXTURE_CLASSES)}], got {args.num_classes}")
    if args.prior_images is None:
        args.prior_images = "train" if args.data else "untied"
    elif args.prior_images == "untied" and args.data:
        parser.error("--prior-images untied needs the synthetic world (no --data): a folder has only its train split")
    if not 0.0 <= args.texture_agreement <= 1.0:
        parser.error(f"--texture-agreement must be in [0, 1], got {args.texture_agreement}")
    for name in ("lr", "decoder_lr"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("w_image", "w_depth", "w_distill", "w_density", "clip_grad"):
        if not getattr(args, name) >= 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.chunk_rays is not None and args.chunk_rays <= 0:
        parser.error(f"--chunk-rays must be a positive integer, got {args.chunk_rays}")
    if args.weights is not None and not Path(args.weights).is_file():
        parser.error(f"--weights must be an official DINOv2 .pth file, got {args.weights!r} (no such file)")
    for flag, folder in (("--data", args.data), ("--cue-conflict", args.cue_conflict),
                         ("--depth-data", args.depth_data)):
        if folder is not None and not Path(folder).is_dir():
            parser.error(f"{flag} must be a folder, got {folder!r}")
    try:
        parse_eval_data(args.eval_data)
    except ValueError as error:
        parser.error(str(error))
    return args


def parse_eval_data(items: list[str]) -> dict[str, Path]:
    """``["NAME=DIR", ...]`` -> {NAME: Path(DIR)}; names unique, folders existing."""
    sets = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--eval-data expects NAME=DIR, got {item!r}")
        if name in sets:
            raise ValueError(f"--eval-data names must be unique, got {name!r} twice")
        if not Path(folder).is_dir():
            raise ValueError(f"--eval-data {name}: {folder!r} is not a folder")
        sets[name] = Path(folder)
    return sets


# ---------------------------------------------------------------------------------------------------
# Data: a split is a dict of images (N, 3, S, S) in [0, 1], labels (N,), and where known depth (N, S, S)
# (camera z, 0 = unknown) and texture_labels (N,)
# ---------------------------------------------------------------------------------------------------


def synthetic_split(split: str, count: int, size: int, num_classes: int, seed: int,
                    texture_agreement: float) -> dict:
    """``count`` images of the shape-texture world (see minimal3d.synthetic.shape_texture_sample)."""
    samples = [synthetic.shape_texture_sample(i, split, size, num_classes, seed, texture_agreement)
               for i in range(count)]
    return {key: torch.stack([s[key_] for s in samples])
            for key, key_ in (("images", "image"), ("depth", "depth"), ("labels", "label"),
                              ("texture_labels", "texture_label"))}


def read_image(path: Path, size: int) -> Tensor:
    """An RGB file -> (3, size, size) in [0, 1] (area-resized, aspect ratio not kept)."""
    image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255)
    return F.interpolate(image.permute(2, 0, 1)[None], (size, size), mode="area")[0].clamp(0, 1)


def read_depth(path: Path, size: int) -> Tensor:
    """A depth file -> (size, size) metres (nearest resize, 0 = no depth): .npy float metres, or a 16-bit
    PNG in millimetres."""
    if path.suffix == ".npy":
        depth = np.load(path).astype(np.float32)
    else:
        depth = np.asarray(Image.open(path), dtype=np.float32) / 1000.0
    if depth.ndim != 2:
        raise ValueError(f"depth file {path} must hold an (H, W) map, got shape {depth.shape}")
    depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0)
    return F.interpolate(torch.from_numpy(depth)[None, None], (size, size), mode="nearest")[0, 0]


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and
                  not p.stem.endswith("_depth"))


def read_class_folder(root: Path, size: int, classes: list[str] | None = None,
                      with_depth: bool = False) -> tuple[dict, list[str]]:
    """DIR/<class>/<image> -> split, class names. With ``classes`` (those of --data) every subfolder must be
    one of them (labels follow that list); ``with_depth`` reads <name>.npy or <name>_depth.png beside each."""
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not found:
        raise ValueError(f"{root}: expected class folders {root}/<class>/<image>, found none")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root}: class folders {unknown} are not classes of the training data {classes}")
    images, labels, depths = [], [], []
    for name in found:
        for path in image_files(root / name):
            images.append(read_image(path, size))
            labels.append(classes.index(name))
            if with_depth:
                candidates = [path.with_suffix(".npy"), path.with_name(path.stem + "_depth.png")]
                depth_path = next((p for p in candidates if p.exists()), None)
                if depth_path is None:
                    raise ValueError(f"no pseudo depth for {path}: expected {candidates[0].name} or {candidates[1].name}")
                depths.append(read_depth(depth_path, size))
    if not images:
        raise ValueError(f"{root}: no {'/'.join(IMAGE_EXTENSIONS)} images in {root}/<class>/")
    split = {"images": torch.stack(images), "labels": torch.tensor(labels)}
    if with_depth:
        split["depth"] = torch.stack(depths)
    return split, classes


def texture_class_of(stem: str, classes: list[str]) -> int:
    """The class named by the file stem ``<texture_class>_<name>`` (the longest class name that matches)."""
    matches = [c for c in classes if stem.startswith(c + "_")]
    if not matches:
        raise ValueError(f"cue-conflict image {stem!r} must be named <texture_class>_<name> with a class of {classes}")
    return classes.index(max(matches, key=len))


def read_cue_conflict_folder(root: Path, size: int, classes: list[str]) -> dict:
    """DIR/<shape_class>/<texture_class>_<name>.png (Geirhos et al.'s layout) -> split with texture_labels."""
    split, _ = read_class_folder(root, size, classes)
    stems = [p.stem for name in sorted(p.name for p in root.iterdir() if p.is_dir()) for p in image_files(root / name)]
    split["texture_labels"] = torch.tensor([texture_class_of(stem, classes) for stem in stems])
    return split


def depth_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(image, depth) file pairs anywhere below ``folder``: rgb_<id>.jpg + sync_depth_<id>.png (NYUv2 as in
    BTS) or <name>.<png|jpg> + <name>.npy."""
    pairs = []
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        if image.stem.startswith("sync_depth_"):
            continue
        if image.stem.startswith("rgb_"):
            depth = image.with_name("sync_depth_" + image.stem[4:] + ".png")
        else:
            depth = image.with_suffix(".npy")
        if depth.exists():
            pairs.append((image, depth))
    if not pairs:
        raise ValueError(f"--depth-data: no image+depth pairs in {folder} (rgb_<id>.jpg + sync_depth_<id>.png, "
                         f"or <name>.png + <name>.npy)")
    return pairs


def read_depth_folder(root: Path, size: int) -> dict[str, dict]:
    """DIR/train and DIR/test of image+depth pairs -> {"train": split, "test": split} (depth in metres)."""
    splits = {}
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise ValueError(f"--depth-data must hold {root / part}")
        pairs = depth_pairs(root / part)
        splits[part] = {"images": torch.stack([read_image(i, size) for i, _ in pairs]),
                        "depth": torch.stack([read_depth(d, size) for _, d in pairs])}
    return splits


def load_data(args: argparse.Namespace) -> dict:
    """Training split, probe splits and evaluation sets, all at the generation size (ViT input + 1/7)."""
    size = args.image_size + args.image_size // 7  # a bit larger than the ViT input: room for random crops
    counts = {"train": args.train_images, "test": args.test_images, "ood": args.test_images,
              "cue_conflict": args.cue_conflict_images, "untied": args.train_images}
    generate = lambda split: synthetic_split(split, counts[split],  # noqa: E731
                                             size, args.num_classes, args.seed, args.texture_agreement)
    if args.data:
        full, classes = read_class_folder(Path(args.data), size, with_depth=True)
        order = torch.randperm(len(full["labels"]), generator=torch.Generator().manual_seed(args.seed))
        cut = max(1, int(0.8 * len(order)))
        data = {"train": {k: v[order[:cut]] for k, v in full.items()},
                "class_sets": {"test": {k: v[order[cut:]] for k, v in full.items()}}}
    else:
        classes = list(synthetic.SHAPE_TEXTURE_CLASSES[:args.num_classes])
        data = {"train": generate("train"), "class_sets": {"test": generate("test"), "ood": generate("ood")}}
        data["cue_conflict"] = generate("cue_conflict")
        data["depth"] = {"train": data["train"], "test": data["class_sets"]["test"]}
    data["prior"] = generate("untied") if args.prior_images == "untied" else data["train"]
    data["classes"] = classes
    for name, folder in parse_eval_data(args.eval_data).items():
        data["class_sets"][name], _ = read_class_folder(folder, size, classes)
    if args.cue_conflict:
        data["cue_conflict"] = read_cue_conflict_folder(Path(args.cue_conflict), size, classes)
    if args.depth_data:
        data["depth"] = read_depth_folder(Path(args.depth_data), size)
    elif args.data:
        data["depth"] = {"train": data["train"], "test": data["class_sets"]["test"]}
    return data


def augment(images: Tensor, depth: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Random crop (60-100 % of the side) + horizontal flip (paper), alike for image and depth."""
    side = images.shape[-1]
    out_images, out_depth = [], []
    for image, d in zip(images, depth):
        crop = int(side * (0.6 + 0.4 * torch.rand(()).item()))
        top, left = torch.randint(0, side - crop + 1, (2,)).tolist()
        image, d = image[:, top:top + crop, left:left + crop], d[top:top + crop, left:left + crop]
        if torch.rand(()).item() < 0.5:
            image, d = image.flip(-1), d.flip(-1)
        out_images.append(resize(image[None], size)[0])
        out_depth.append(F.interpolate(d[None, None], (size, size), mode="nearest")[0, 0])
    return torch.stack(out_images), torch.stack(out_depth)


def resize(images: Tensor, size: int) -> Tensor:
    return F.interpolate(images, (size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------
# §3.1-3.3: the representation h and the fixed camera
# ---------------------------------------------------------------------------------------------------


def representation(backbone: nn.Module, images: Tensor) -> Tensor:
    """h: [class; patches] of the last 4 layers, concatenated along channels: images (B, 3, S, S) ->
    (B, 1 + P, 4 D). The images are in [0, 1] by construction (loader / synthetic world), so no per-step
    value check (a host sync on GPUs)."""
    layers = backbone.get_intermediate_layers(vit.normalize_image(images, check=False), 4, return_class_token=True)
    return torch.cat([torch.cat([cls[:, None], patches], 1) for patches, cls in layers], -1)


class Representation(nn.Module):
    """The backbone as a module whose forward is h, so that DDP sees (and syncs) the student's forward."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> Tensor:
        return representation(self.backbone, images)


def fixed_camera(size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The one camera at (0, 0, -2.7) looking at the cube's centre: origins, unit directions (R, 3) and each
    ray's cosine to the optical axis (R,) (camera z = ray distance * cosine)."""
    eye = torch.tensor([0.0, 0.0, -CAMERA_DISTANCE])
    viewmat = cameras.look_at(eye, torch.zeros(3), torch.tensor([0.0, -1.0, 0.0]))
    K = cameras.fov_intrinsics(FIELD_OF_VIEW, size, size)
    origins, directions = cameras.pixel_rays(viewmat, K, size, size)
    return origins, directions, directions @ viewmat[2, :3]


# ---------------------------------------------------------------------------------------------------
# §3.4: the decoder Φ (h -> triplanes) and the --no-triplane ablation
# ---------------------------------------------------------------------------------------------------


class ConvImageDecoder(nn.Module):
    """--no-triplane ablation: patch tokens (a grid) + class token -> image (3) and camera z (1) directly."""

    def __init__(self, token_dim: int, grid: int, out_size: int, width: int):
        super().__init__()
        self.grid, self.out_size = grid, out_size
        self.proj = nn.Linear(2 * token_dim, width)
        layers, size = [], grid
        while size < out_size:
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(width, width, 3, padding=1), nn.GELU()]
            size *= 2
        self.body = nn.Sequential(*layers, nn.Conv2d(width, 4, 1))

    def forward(self, tokens: Tensor) -> dict:
        cls, patches = tokens[:, :1], tokens[:, 1:]
        x = self.proj(torch.cat([patches, cls.expand_as(patches)], -1))  # (B, P, width)
        x = x.transpose(1, 2).unflatten(-1, (self.grid, self.grid))
        x = F.interpolate(self.body(x), (self.out_size, self.out_size), mode="bilinear", align_corners=False)
        depth_z = NEAR + (FAR - NEAR) * torch.sigmoid(x[:, 3])
        return {"rgb": torch.sigmoid(x[:, :3]), "depth_z": depth_z, "opacity": torch.ones_like(depth_z)}


class Prior3D(nn.Module):
    """Φ + point decoder + renderer from the fixed camera (or the conv ablation): h -> rendered image
    (B, 3, R, R), camera z (B, R, R), opacity (B, R, R) and the activated densities of all samples."""

    def __init__(self, token_dim: int, grid: int, render_size: int, plane_channels: int, plane_res: int,
                 embed_res: int, width: int, num_layers: int, self_attention: bool, samples: int, importance: int,
                 use_triplane: bool = True, chunk_rays: int | None = None, patch_skip: bool = False):
        super().__init__()
        self.render_size, self.samples, self.importance = render_size, samples, importance
        self.use_triplane, self.chunk_rays = use_triplane, chunk_rays
        if use_triplane:
            self.generator = TriplaneGenerator(token_dim, plane_channels, plane_res, embed_res, width,
                                               max(1, width // 32), num_layers, self_attention,
                                               patch_grid=grid if patch_skip else None)
            self.decoder = TriplaneDecoder(plane_channels)
        else:
            self.image_decoder = ConvImageDecoder(token_dim, grid, render_size, width)
        origins, directions, cosine = fixed_camera(render_size)
        # pixel_rays broadcasts the one camera centre over the rays; DDP broadcasts buffers in place, so
        # each buffer needs memory of its own
        origins, directions, cosine = origins.contiguous(), directions.contiguous(), cosine.contiguous()
        self.register_buffer("origins", origins, persistent=False)
        self.register_buffer("directions", directions, persistent=False)
        self.register_buffer("cosine", cosine, persistent=False)

    def forward(self, tokens: Tensor) -> dict:
        if not self.use_triplane:
            return self.image_decoder(tokens)
        planes = self.generator(tokens)  # (B, 3, D, H, W)
        batch, size = tokens.shape[0], self.render_size
        out = render_triplane(planes, self.decoder, self.origins.expand(batch, -1, -1),
                              self.directions.expand(batch, -1, -1), NEAR, FAR, self.samples, self.importance,
                              BOX_SIZE, chunk_rays=self.chunk_rays,
                              check=False)  # fixed unit rays from cameras.pixel_rays: no value check (host sync) per step
        return {"rgb": out["rgb"].transpose(1, 2).unflatten(-1, (size, size)),
                "depth_z": (out["depth"][..., 0] * self.cosine).unflatten(-1, (size, size)),  # ray distance -> z
                "opacity": out["opacity"][..., 0].unflatten(-1, (size, size)),
                "density": F.softplus(out["raw_sigma"] - 1.0)}  # every queried sample, EG3D's activation


# ---------------------------------------------------------------------------------------------------
# Eq. 5: the loss
# ---------------------------------------------------------------------------------------------------


def map_pseudo_depth(depth: Tensor) -> Tensor:
    """--pseudo-depth per-image: each image's (min, max) affinely to MAPPED_DEPTH_RANGE: (B, H, W)."""
    low = depth.flatten(1).min(1).values.view(-1, 1, 1)
    high = depth.flatten(1).max(1).values.view(-1, 1, 1)
    unit = (depth - low) / (high - low).clamp_min(1e-6)
    return MAPPED_DEPTH_RANGE[0] + (MAPPED_DEPTH_RANGE[1] - MAPPED_DEPTH_RANGE[0]) * unit


def depth_spread(depth: Tensor, cfg: argparse.Namespace) -> float:
    """--depth-unit spread: the standard deviation (m) of the 3D prior's pseudo depth (B, S, S) (its images,
    --prior-images) over pixels with depth, as the loss sees it (after --pseudo-depth per-image mapping)."""
    if cfg.pseudo_depth == "per-image":
        depth = torch.where(depth > 0, map_pseudo_depth(depth), depth)
    valid = depth[depth > 0]
    if valid.numel() < 2:
        raise ValueError("--depth-unit spread needs training images with pseudo depth, found none")
    return float(valid.std())


def losses(prior: nn.Module, student: nn.Module, teacher: nn.Module | None, images: Tensor, depth: Tensor,
           cfg: argparse.Namespace, train_backbone: bool = True, depth_unit: float = 1.0) -> tuple[Tensor, dict, dict]:
    """Eq. 5 on augmented images (B, 3, S, S) and their pseudo depth (B, S, S): total, the terms (tensors)
    and the render. student: a ``Representation`` (maybe DDP-wrapped); teacher: frozen backbone or None;
    ``train_backbone=False`` (the warm-up of Φ): h is computed without gradient; ``depth_unit``: metres per
    unit of the depth term (1: metres)."""
    with torch.set_grad_enabled(train_backbone and torch.is_grad_enabled()):
        tokens = student(images)
    out = prior(tokens)
    size = cfg.render_size
    target_rgb = resize(images, size)
    target_z = F.interpolate(depth[:, None], (size, size), mode="area")[:, 0]
    if cfg.pseudo_depth == "per-image":
        target_z = map_pseudo_depth(target_z)
    terms = {"image": F.mse_loss(out["rgb"], target_rgb)}
    weight = (out["opacity"].detach() if cfg.depth_weighting == "opacity" else 1.0) * (target_z > 0)  # rays the model leaves empty, pixels without depth
    error = (out["depth_z"] - target_z) / depth_unit
    terms["depth"] = (weight * error.square()).sum() / weight.sum().clamp_min(1e-6)
    if teacher is not None:
        with torch.no_grad():
            teacher_tokens = representation(teacher, images)
        if cfg.distill_target == "output":  # f(I): the last layer's normalised class token, DINOv2's output
            width = tokens.shape[-1] // 4
            terms["distill"] = F.mse_loss(tokens[:, 0, -width:], teacher_tokens[:, 0, -width:])
        else:  # all of h: every token of the last 4 layers
            terms["distill"] = F.mse_loss(tokens, teacher_tokens)
    if "density" in out and not cfg.from_scratch:
        density = out["density"].abs()
        terms["density"] = density.sum() if cfg.density_reduction == "sum" else density.mean()
    weights = {"image": cfg.w_image, "depth": cfg.w_depth, "distill": cfg.w_distill, "density": cfg.w_density}
    total = sum(weights[name] * value for name, value in terms.items())
    return total, terms, {**out, "target_z": target_z, "target_rgb": target_rgb, "tokens": tokens}


def warm_up_decoder(prior: nn.Module, student: nn.Module, train: dict, cfg: argparse.Namespace,
                    dist: runtime.Dist, depth_unit: float = 1.0) -> None:
    """CPU deviation (--warmup-steps, paper: none): Φ and the point decoder alone learn to render the training
    images from the frozen backbone's h (Eq. 5; the distillation is zero while the backbone is the teacher),
    Adam at --decoder-lr. prior, student: as in the training loop (maybe DDP-wrapped)."""
    parameters = list(runtime.unwrap(prior).parameters())
    optimizer = torch.optim.Adam(parameters, lr=cfg.decoder_lr)
    images, depth = train["images"], train["depth"]
    for _ in tqdm(range(cfg.warmup_steps), desc="Φ warm-up", disable=not dist.is_main):
        index = torch.randint(0, len(images), (cfg.batch_size,))
        batch, batch_depth = augment(images[index], depth[index], cfg.image_size)
        total, _, _ = losses(prior, student, None, batch.to(dist.device), batch_depth.to(dist.device), cfg,
                             train_backbone=False, depth_unit=depth_unit)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(parameters, cfg.clip_grad)
        optimizer.step()


@torch.no_grad()
def render_conditioning(prior: nn.Module, backbone: nn.Module, split: dict, cfg: argparse.Namespace,
                        device: torch.device, count: int = 64) -> dict:
    """Does Φ read h? On ``count`` held-out images: depth RMSE (m) of each image's render against its own
    depth, and of the mean of all renders (one scene for every image) against the same depths. The two
    are equal when Φ ignores h and renders one scene."""
    prior.eval(), backbone.eval()
    images = resize(split["images"][:count], cfg.image_size).to(device)
    target = F.interpolate(split["depth"][:count, None], (cfg.render_size,) * 2, mode="area")[:, 0].to(device)
    if cfg.pseudo_depth == "per-image":
        target = map_pseudo_depth(target)
    rendered = prior(representation(backbone, images))["depth_z"]
    valid = target > 0
    own = (rendered - target)[valid].square().mean().sqrt()
    mean = (rendered.mean(0, keepdim=True).expand_as(target) - target)[valid].square().mean().sqrt()
    prior.train(), backbone.train()
    return {"render_depth_rmse": float(own), "mean_render_depth_rmse": float(mean)}


# ---------------------------------------------------------------------------------------------------
# The 2D teacher (no --weights): a ViT trained with cross-entropy on the training images
# ---------------------------------------------------------------------------------------------------


def train_2d_teacher(backbone: nn.Module, train: dict, num_classes: int, cfg: argparse.Namespace,
                     dist: runtime.Dist) -> nn.Module:
    """Cross-entropy on the class token (AdamW 1e-3, wd 0.05, warm-up + cosine decay, the paper's
    augmentation). Returns the classifier (backbone + linear head)."""
    backbone.mask_token.requires_grad_(False)  # unused here; DDP needs every trainable parameter used
    classifier = nn.Sequential(backbone, nn.Linear(backbone.embed_dim, num_classes)).to(dist.device)
    model = runtime.wrap_ddp(classifier, dist)
    optimizer = torch.optim.AdamW([p for p in classifier.parameters() if p.requires_grad], lr=1e-3,
                                  weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / cfg.pretrain_steps)))
    images, depth, labels = train["images"], train["depth"], train["labels"]
    backbone.train()
    for _ in tqdm(range(cfg.pretrain_steps), desc="2D teacher", disable=not dist.is_main):
        index = torch.randint(0, len(labels), (cfg.pretrain_batch_size,))
        batch, _ = augment(images[index], depth[index], cfg.image_size)
        x = vit.normalize_image(batch.to(dist.device), check=False)  # in [0, 1] by construction: no per-step sync
        loss = F.cross_entropy(model(x), labels[index].to(dist.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return classifier.eval()


@torch.no_grad()
def teacher_head_metrics(classifier: nn.Module, data: dict, image_size: int, device: torch.device) -> dict:
    """The 2D teacher's own classifier: accuracy on the training images (no augmentation) and on each class
    set, and its shape bias on the cue-conflict set."""
    def predict(images: Tensor) -> Tensor:
        return torch.cat([classifier(vit.normalize_image(resize(images[i:i + 64], image_size).to(device))).argmax(1)
                          .cpu() for i in range(0, len(images), 64)])

    metrics = {"train_accuracy": (predict(data["train"]["images"]) == data["train"]["labels"]).double().mean().item()}
    for name, split in data["class_sets"].items():
        metrics[f"accuracy_{name}"] = (predict(split["images"]) == split["labels"]).double().mean().item()
    if "cue_conflict" in data:
        split = data["cue_conflict"]
        metrics["shape_bias"] = shape_bias(predict(split["images"]), split["labels"], split["texture_labels"])["shape_bias"]
    return metrics


# ---------------------------------------------------------------------------------------------------
# §4: evaluation with frozen linear probes, teacher and 3D-prior backbones side by side
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def probe_features(backbone: nn.Module, images: Tensor, image_size: int, device: torch.device,
                   batch: int = 64) -> tuple[Tensor, Tensor]:
    """Frozen last-layer features of images (N, 3, S, S): [class token; mean patch token] (N, 2 D) for
    classification and [patch; class token] (N, P, 2 D) for the depth probe."""
    backbone.eval()
    pooled, patches = [], []
    for start in range(0, len(images), batch):
        x = vit.normalize_image(resize(images[start:start + batch], image_size).to(device))
        ((tokens, cls),) = backbone.get_intermediate_layers(x, 1, return_class_token=True)
        pooled.append(torch.cat([cls, tokens.mean(1)], -1).cpu())
        patches.append(torch.cat([tokens, cls[:, None].expand_as(tokens)], -1).cpu())
    return torch.cat(pooled), torch.cat(patches)


def patch_depth_targets(depth: Tensor, grid: int, per_patch: int) -> Tensor:
    """Depth (N, S, S) -> per patch the (per_patch x per_patch) depth block it predicts: (N, P, per_patch^2)
    (nearest resize, so 0 = no depth stays 0)."""
    side = grid * per_patch
    small = F.interpolate(depth[:, None], (side, side), mode="nearest")[:, 0]
    return rearrange(small, "n (gy py) (gx px) -> n (gy gx) (py px)", gy=grid, gx=grid)


def cue_decodability(features: Tensor, labels: Tensor, num_classes: int) -> float:
    """How linearly decodable ``labels`` (N,) are from ``features`` (N, C) of cue-conflict images, where shape
    and texture are not tied: two-fold cross-validated accuracy of a linear classifier (even / odd images).
    Unlike the shape bias it does not depend on which cue a probe trained on the texture-tied training split
    chooses: it measures what the representation carries."""
    halves = torch.arange(len(labels)) % 2
    correct = 0
    for fold in (0, 1):
        fit, held = halves != fold, halves == fold
        classifier = fit_linear_classifier(features[fit], labels[fit], num_classes)
        correct += int((classifier(features[held]).argmax(1).cpu() == labels[held]).sum())
    return correct / len(labels)


def evaluate(backbones: dict[str, nn.Module], data: dict, cfg: argparse.Namespace,
             device: torch.device) -> dict[str, dict]:
    """Per backbone: accuracy on each class set, shape bias on the cue-conflict set, depth-probe RMSE/AbsRel.

    Classification: a linear classifier on [class; mean patch] of the --data train split (probes.py).
    Depth: a linear head from each [patch; class] token to its (depth_patch x depth_patch) block of depth
    (ridge regression, fitted on the depth set's train split), RMSE/AbsRel in metres on its test split."""
    results = {}
    grid = cfg.image_size // 14
    for name, backbone in backbones.items():
        train_x, _ = probe_features(backbone, data["train"]["images"], cfg.image_size, device)
        classifier = fit_linear_classifier(train_x, data["train"]["labels"], len(data["classes"]))
        metrics = {}
        for set_name, split in data["class_sets"].items():
            x, _ = probe_features(backbone, split["images"], cfg.image_size, device)
            metrics[f"accuracy_{set_name}"] = (classifier(x).argmax(1).cpu() == split["labels"]).double().mean().item()
        if "cue_conflict" in data:
            split = data["cue_conflict"]
            x, _ = probe_features(backbone, split["images"], cfg.image_size, device)
            bias = shape_bias(classifier(x).argmax(1).cpu(), split["labels"], split["texture_labels"])
            metrics.update({k: bias[k] for k in ("shape_bias", "shape_fraction", "texture_fraction")})
            metrics["cue_shape_decodability"] = cue_decodability(x, split["labels"], len(data["classes"]))
            metrics["cue_texture_decodability"] = cue_decodability(x, split["texture_labels"], len(data["classes"]))
        if "depth" in data:
            _, train_patches = probe_features(backbone, data["depth"]["train"]["images"], cfg.image_size, device)
            targets = patch_depth_targets(data["depth"]["train"]["depth"], grid, cfg.depth_patch)
            valid = (targets > 0).all(-1).flatten()  # patches with depth everywhere
            regressor = fit_linear_regressor(train_patches.flatten(0, 1)[valid], targets.flatten(0, 1)[valid])
            _, test_patches = probe_features(backbone, data["depth"]["test"]["images"], cfg.image_size, device)
            test_targets = patch_depth_targets(data["depth"]["test"]["depth"], grid, cfg.depth_patch)
            predicted = regressor(test_patches.flatten(0, 1)).float().cpu()
            errors = depth_metrics(predicted, test_targets.flatten(0, 1))
            metrics["depth_rmse"], metrics["depth_absrel"] = errors["RMSE"], errors["AbsRel"]
        results[name] = metrics
    return results


# ---------------------------------------------------------------------------------------------------
# Previews
# ---------------------------------------------------------------------------------------------------


def save_preview(path: Path, out: dict, images: Tensor, grid: int) -> None:
    """Labelled panels per image: input, rendered image, rendered depth, pseudo depth, PCA of patch features."""
    panels = []
    for i in range(min(2, len(images))):
        target = out["target_z"][i].detach().cpu()
        valid = target > 0
        low, high = (target[valid].min(), target[valid].max()) if bool(valid.any()) else (NEAR, FAR)
        features = out["tokens"][i, 1:].detach().cpu().T.unflatten(-1, (grid, grid))  # (4 D, g, g)
        panels += [("input", images[i].cpu()), ("rendered image", out["rgb"][i].detach().cpu().clamp(0, 1)),
                   ("rendered depth", runtime.colorize_depth(out["depth_z"][i].detach().cpu().clamp(low, high))),
                   ("pseudo depth", runtime.colorize_depth(target)), ("features (PCA)", runtime.pca_rgb(features))]
    runtime.save_panels(path, panels, size=256, columns=5)


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started, started_cpu = time.time(), time.process_time()
    out_dir = Path(args.out)
    device = runtime.pick_device(args.device)
    dist = runtime.init_distributed(device)
    device = dist.device
    runtime.seed_everything(args.seed, dist.rank)
    log = print if dist.is_main else (lambda *a, **k: None)
    out_dir.mkdir(parents=True, exist_ok=True)

    # The 2D teacher: an official DINOv2 checkpoint (read first: a wrong file fails before any work), or a
    # small ViT trained here with cross-entropy.
    vit_overrides = QUICK_VIT if args.quick and args.weights is None else {}
    if args.weights is not None:
        try:
            teacher = vit.load_dinov2(runtime.load_checkpoint(args.weights)).to(device)
        except ValueError as error:
            raise ValueError(f"--weights must be an official DINOv2 .pth: {error}") from None
    else:
        teacher = vit.build_backbone(None, args.arch, **vit_overrides).to(device)

    data = load_data(args)
    log(f"data: {len(data['train']['labels'])} training images, {len(data['classes'])} classes "
        f"({'folder ' + args.data if args.data else 'synthetic shape-texture world'}); test sets: "
        + ", ".join(f"{k} {len(v['labels'])}" for k, v in data["class_sets"].items()))
    metrics: dict = {"config": vars(args)}

    checkpoint_path = out_dir / "triplane.pt"
    resume = runtime.load_checkpoint(checkpoint_path, ("student", "prior", "teacher", "optimizer", "step",
                                                       "config")) if args.resume else None
    if resume is not None:
        teacher.load_state_dict(resume["teacher"])
    elif args.weights is None:
        log(f"No --weights: training a random {args.arch} in 2D (cross-entropy) for {args.pretrain_steps} steps: "
            f"the 2D teacher.")
        classifier = train_2d_teacher(teacher, data["train"], len(data["classes"]), args, dist)
        metrics["teacher_head"] = teacher_head_metrics(classifier, data, args.image_size, device)
        log("2D teacher's own classifier: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics["teacher_head"].items()))
    teacher.eval().requires_grad_(False)

    # The student: a copy of the teacher (or random weights for --from-scratch) and Φ + renderer.
    if args.from_scratch:  # random initialisation of the teacher's architecture
        student = vit.DinoVisionTransformer(teacher.config).to(device)
    else:
        student = copy.deepcopy(teacher)
    student.requires_grad_(True).train()
    student.mask_token.requires_grad_(False)  # iBOT's mask token takes no part (DDP needs every grad used)
    distill_teacher = None if (args.no_distill or args.from_scratch) else teacher
    grid = args.image_size // 14
    prior = Prior3D(4 * student.embed_dim, grid, args.render_size, args.plane_channels, args.plane_res,
                    args.embed_res, args.generator_dim, args.generator_layers, not args.no_self_attention,
                    args.samples, args.importance, not args.no_triplane, args.chunk_rays,
                    patch_skip=not args.no_patch_skip).to(device)
    student_ddp, prior_ddp = runtime.wrap_ddp(Representation(student), dist), runtime.wrap_ddp(prior, dist)
    optimizer = torch.optim.Adam([{"params": [p for p in student.parameters() if p.requires_grad], "lr": args.lr},
                                  {"params": list(prior.parameters()), "lr": args.decoder_lr}])
    start_step = 0
    if resume is not None:
        student.load_state_dict(resume["student"])
        prior.load_state_dict(resume["prior"])
        optimizer.load_state_dict(resume["optimizer"])
        start_step = int(resume["step"])

    depth_unit = depth_spread(data["prior"]["depth"], args) if args.depth_unit == "spread" else 1.0
    metrics["depth_unit_metres"] = depth_unit
    preview = data["class_sets"]["test"]
    metrics["decoder_reads_h"] = {}
    if resume is None and args.warmup_steps > 0:
        warm_up_decoder(prior_ddp, student_ddp, data["prior"], args, dist, depth_unit)
        if dist.is_main and "depth" in preview:
            metrics["decoder_reads_h"]["after_warmup"] = render_conditioning(prior, student, preview, args, device)
            log("Φ after warm-up, held-out depth RMSE of each render / of the mean render: "
                "{render_depth_rmse:.4f} / {mean_render_depth_rmse:.4f} m".format(**metrics["decoder_reads_h"]["after_warmup"]))

    images, depth = data["prior"]["images"], data["prior"]["depth"]
    history = []
    progress = tqdm(range(start_step, args.steps), desc="3D prior", disable=not dist.is_main)
    for step in progress:
        index = torch.randint(0, len(images), (args.batch_size,))
        batch, batch_depth = augment(images[index], depth[index], args.image_size)
        total, terms, out = losses(prior_ddp, student_ddp, distill_teacher, batch.to(device),
                                   batch_depth.to(device), args, depth_unit=depth_unit)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if args.clip_grad > 0:
            nn.utils.clip_grad_norm_([*student.parameters(), *prior.parameters()], args.clip_grad)
        optimizer.step()
        history.append({"total": total.detach(), **{k: v.detach() for k, v in terms.items()},
                        "opacity": out["opacity"].detach().mean()})  # diagnostics: is anything rendered?
        if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:  # a host sync 10 times a run
            values = {k: float(v) for k, v in history[-1].items()}
            progress.set_postfix({k: f"{v:.4f}" for k, v in values.items()})
            if not all(math.isfinite(v) for v in values.values()):
                raise FloatingPointError(f"the loss is not finite at step {step + 1}: {values}")
    history = [{k: float(v) for k, v in h.items()} for h in history]

    if not dist.is_main:
        return {}
    window = history[-max(1, len(history) // 5):]
    metrics["train_losses_first"] = history[0] if history else {}
    metrics["train_losses_last"] = {k: float(np.mean([h[k] for h in window])) for k in window[0]} if window else {}
    if "depth" in preview:
        metrics["decoder_reads_h"]["after_3d_prior"] = render_conditioning(prior, student, preview, args, device)
    with torch.no_grad():
        student.eval(), prior.eval()
        if "depth" in preview:
            _, _, out = losses(prior, Representation(student), None, resize(preview["images"][:2], args.image_size)
                               .to(device), preview["depth"][:2].to(device), args)
            save_preview(out_dir / "preview_test.png", out, resize(preview["images"][:2], args.image_size), grid)

    results = evaluate({"2D teacher": teacher, "3D prior": student}, data, args, device)
    metrics["eval"] = results
    claims = []
    if "cue_conflict" in data:
        claims.append(runtime.claim(
            "The 3D prior raises the shape bias of the 2D backbone (§4.3, Fig. 4): linear probe trained on the "
            "training images, Geirhos' shape bias on cue-conflict images", "shape_bias", True,
            ("2D teacher", results["2D teacher"]["shape_bias"]), ("3D prior", results["3D prior"]["shape_bias"])))
    if "depth" in data:
        claims.append(runtime.claim(
            "The 3D prior improves depth estimation with a frozen backbone (§4, NYUv2 linear probe): RMSE in "
            "metres of a linear depth head on held-out images", "depth_rmse", False,
            ("2D teacher", results["2D teacher"]["depth_rmse"]), ("3D prior", results["3D prior"]["depth_rmse"])))
    metrics["claims"] = claims
    metrics["seconds"] = time.time() - started
    metrics["cpu_seconds"] = time.process_time() - started_cpu

    vit.save_dinov2(teacher, out_dir / "teacher_dinov2.pth")
    vit.save_dinov2(student, out_dir / "backbone_dinov2.pth")  # only the backbone is kept (DINOv2 layout)
    torch.save({"config": vars(args), "student": student.state_dict(), "prior": prior.state_dict(),
                "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict(), "step": args.steps},
               checkpoint_path)
    runtime.write_metrics(out_dir, metrics)
    log(runtime.format_table([{"backbone": name, **values} for name, values in results.items()]))
    log(runtime.format_claims(claims))
    log(f"wrote {out_dir}/metrics.json, backbone_dinov2.pth, teacher_dinov2.pth, triplane.pt, preview_test.png "
        f"in {metrics['seconds']:.0f} s ({metrics['cpu_seconds']:.0f} s CPU)")
    return metrics


if __name__ == "__main__":
    main()
