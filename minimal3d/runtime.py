"""Plain helpers shared by the four training scripts: device, torchrun/DDP, seeding, PNG previews, metrics.

No framework: each function does one small thing and the scripts call them from a plain loop.
"""

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; any other name is passed to ``torch.device``.

    An unknown name, or a device this machine does not have, raises ``ValueError`` naming ``device``.
    """
    if name != "auto":
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available (use --device auto or cpu)")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {name!r} requested but MPS is not available (use --device auto or cpu)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class Dist:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by ``torchrun`` (gloo on CPU/MPS, nccl on CUDA).

    Without torchrun's environment variables this is a no-op returning a single-process ``Dist``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(0, 1, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, device)


def wrap_ddp(model: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when running under torchrun, else ``model`` itself."""
    if not dist.enabled:
        return model
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DDP wrapper (for saving state dicts)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def all_reduce_mean(value: Tensor, dist: Dist) -> Tensor:
    """Mean of a tensor over all processes (identity when single-process)."""
    if not dist.enabled:
        return value
    value = value.detach().clone()
    torch_dist.all_reduce(value)
    return value / dist.world_size


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (each rank gets its own stream: seed + rank)."""
    for name, value in (("seed", seed), ("rank", rank)):
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def load_state_dict_checked(module: torch.nn.Module, state_dict: dict, description: str) -> None:
    """Compare key sets and shapes, name every missing / unexpected / mis-shaped key, then load strictly.

    ``description`` says what the checkpoint should be ("the DINOv2 layout"), for the error message.
    """
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {shape}"
                   for key, shape in expected.items() if key in state_dict and tuple(state_dict[key].shape) != shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(f"state_dict does not match {description}: missing keys {missing}, "
                         f"unexpected keys {unexpected}, shape mismatches {wrong_shape}")
    module.load_state_dict(state_dict, strict=True)


def _load_failure_reason(error: Exception) -> str:
    """Why ``torch.load`` failed, in one line, without torch's advice to retry with weights_only=False."""
    message = str(error)
    if "WeightsUnpickler error:" in message:  # not a zip archive: torch fell back to plain unpickling
        detail = message.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
        return f"corrupt or not written by torch.save: {detail[0][:120] if detail else 'unpickling failed'}"
    lines = [line for line in message.strip().splitlines() if line.strip() and "weights_only" not in line]
    first = lines[0].split(". ")[0] if lines else "unreadable"
    return f"{type(error).__name__}: {first[:160]}"


def load_checkpoint(path, required_keys: tuple[str, ...] = ()) -> dict:
    """Read a checkpoint dict saved with ``torch.save`` (tensors, numbers, strings, lists, dicts only).

    Raises ``ValueError("not a valid checkpoint: PATH (reason)")`` for a missing, empty, truncated or
    corrupt file, for one that is not a dict, and for one that lacks any of ``required_keys``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"not a valid checkpoint: {path} (no such file)")
    if path.stat().st_size == 0:
        raise ValueError(f"not a valid checkpoint: {path} (empty file)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's own message suggests weights_only=False: wrong advice for a bad file
        raise ValueError(f"not a valid checkpoint: {path} ({_load_failure_reason(error)})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"not a valid checkpoint: {path} (expected a dict, got {type(checkpoint).__name__})")
    missing = [key for key in required_keys if key not in checkpoint]
    if missing:
        raise ValueError(f"not a valid checkpoint: {path} (missing keys {missing}; has {sorted(checkpoint)[:20]})")
    return checkpoint


# ---------------------------------------------------------------------------------------------------
# Previews
# ---------------------------------------------------------------------------------------------------


def _to_rgb(image: Tensor) -> Tensor:
    if not isinstance(image, Tensor):
        raise TypeError(f"images must be tensors (3, H, W) or (H, W), got {type(image).__name__}")
    image = image.detach().float().cpu()
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"images must be (3, H, W) or (H, W), got {tuple(image.shape)}")
    return image.expand(3, -1, -1).nan_to_num(0.0).clamp(0.0, 1.0)


def save_png(path, images) -> None:
    """Save one image or a list of images side by side (each (3, H, W) or (H, W), values in [0, 1]).

    Images of different heights are padded with white at the bottom; a 2-pixel white gap separates them.
    """
    images = [_to_rgb(image) for image in (images if isinstance(images, (list, tuple)) else [images])]
    if not images:
        raise ValueError("images must hold at least one image")
    height = max(image.shape[1] for image in images)
    gap = torch.ones(3, height, 2)
    columns = []
    for image in images:
        padded = torch.ones(3, height, image.shape[2])
        padded[:, : image.shape[1]] = image
        columns += [padded, gap]
    canvas = torch.cat(columns[:-1], dim=2)
    array = (canvas.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def save_panels(path, panels, size: int = 256, columns: int | None = None) -> None:
    """Save labelled panels in a grid: ``panels`` is a list of ``(label, image)``.

    Each image is (3, H, W) or (H, W) with values in [0, 1]; it is upscaled by nearest neighbour so that its
    shorter side is at least ``size`` pixels, and its label is written above it. ``columns`` panels per
    row (default: all in one row). Meant to be looked at: input, render, depth, features side by side.
    """
    if not panels:
        raise ValueError("panels must hold at least one (label, image) pair")
    if not size >= 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    tiles = []
    for label, image in panels:
        image = _to_rgb(image)
        scale = max(1, -(-size // min(image.shape[1:])))  # ceil(size / shorter side)
        image = image.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        tiles.append((str(label), (image.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)))
    font = ImageFont.load_default(size=16)
    label_height, gap = 24, 4
    columns = len(tiles) if columns is None else max(1, min(int(columns), len(tiles)))
    rows = [tiles[i : i + columns] for i in range(0, len(tiles), columns)]
    cell_width = max(array.shape[1] for _, array in tiles)
    row_heights = [label_height + max(array.shape[0] for _, array in row) for row in rows]
    canvas = Image.new("RGB", (columns * (cell_width + gap) - gap, sum(row_heights) + gap * (len(rows) - 1)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    top = 0
    for row, height in zip(rows, row_heights):
        for i, (label, array) in enumerate(row):
            left = i * (cell_width + gap)
            draw.text((left + 4, top + 3), label, fill="black", font=font)
            canvas.paste(Image.fromarray(array), (left, top + label_height))
        top += height + gap
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


# A perceptually ordered colour ramp (dark blue -> teal -> yellow), for depth maps.
_RAMP = torch.tensor([[0.05, 0.03, 0.35], [0.13, 0.35, 0.60], [0.12, 0.62, 0.55], [0.55, 0.80, 0.30],
                      [0.99, 0.91, 0.15]])


def colorize_depth(depth: Tensor, mask: Tensor | None = None) -> Tensor:
    """Depth (H, W) -> (3, H, W) colours, near = yellow, far = blue, range from the 2-98 % percentiles.

    Pixels outside ``mask`` (or with non-finite / non-positive depth) are black.
    """
    if not isinstance(depth, Tensor) or depth.ndim != 2:
        raise ValueError(f"depth must be a tensor (H, W), got {getattr(depth, 'shape', type(depth).__name__)}")
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != depth.shape):
        raise ValueError(f"mask must have the shape of depth {tuple(depth.shape)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
    depth = depth.detach().float().cpu()
    valid = torch.isfinite(depth) & (depth > 0)
    if mask is not None:
        valid &= mask.detach().cpu().bool()
    if not bool(valid.any()):
        return torch.zeros(3, *depth.shape)
    low, high = torch.quantile(depth[valid], torch.tensor([0.02, 0.98]))
    position = 1.0 - ((depth - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)  # near -> 1
    scaled = position.nan_to_num(0.0) * (len(_RAMP) - 1)
    lower = scaled.floor().long().clamp(max=len(_RAMP) - 2)
    fraction = (scaled - lower).unsqueeze(-1)
    colours = _RAMP[lower] * (1 - fraction) + _RAMP[lower + 1] * fraction  # (H, W, 3)
    return (colours * valid.unsqueeze(-1)).permute(2, 0, 1)


@dataclass
class PCABasis:
    """Three principal directions of a feature set and the colour range of their projections."""

    mean: Tensor  # (C,)
    components: Tensor  # (C, 3)
    low: Tensor  # (3,)
    high: Tensor  # (3,)


def pca_basis(features: Tensor) -> PCABasis:
    """Fit a 3-component PCA to features (C, ...) (any trailing spatial dims), for ``pca_rgb``.

    Non-finite features are refused (ValueError); a single pixel or constant features give a valid basis."""
    if not isinstance(features, Tensor) or features.ndim < 2 or features.shape[0] == 0 or features[0].numel() == 0:
        raise ValueError(f"features must be a tensor (C, ...) with C > 0 and at least one pixel, got "
                         f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features must be finite")
    flat = features.detach().float().cpu().flatten(1).T  # (P, C)
    mean = flat.mean(0)
    _, _, vh = torch.linalg.svd(flat - mean, full_matrices=False)
    components = vh[:3].T  # (C, 3)
    if components.shape[1] < 3:
        components = torch.cat([components, torch.zeros(components.shape[0], 3 - components.shape[1])], 1)
    projected = (flat - mean) @ components
    low, high = torch.quantile(projected, 0.01, dim=0), torch.quantile(projected, 0.99, dim=0)
    return PCABasis(mean, components, low, high)


def pca_rgb(features: Tensor, basis: PCABasis | None = None) -> Tensor:
    """Features (C, H, W) -> (3, H, W) colours from the first three principal components.

    Pass a ``basis`` from ``pca_basis`` to colour several maps (before/after fine-tuning) consistently.
    """
    if not isinstance(features, Tensor) or features.ndim != 3:
        raise ValueError(f"features must be a tensor (C, H, W), got {getattr(features, 'shape', type(features).__name__)}")
    basis = basis or pca_basis(features)
    if basis.mean.shape[0] != features.shape[0]:
        raise ValueError(f"basis was fitted to {basis.mean.shape[0]} channels, features have {features.shape[0]}")
    _, height, width = features.shape
    flat = features.detach().float().cpu().flatten(1).T  # (H*W, C)
    projected = ((flat - basis.mean) @ basis.components - basis.low) / (basis.high - basis.low).clamp_min(1e-6)
    return projected.clamp(0, 1).T.reshape(3, height, width)


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


def _jsonable(value):
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (Tensor, np.ndarray, np.generic)):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def write_metrics(out_dir, metrics: dict) -> Path:
    """Write ``metrics`` (nested dicts of numbers, tensors, strings) to ``out_dir/metrics.json``."""
    path = Path(out_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(metrics), indent=2) + "\n")
    return path


def format_table(rows: list[dict], float_format: str = "{:.4f}") -> str:
    """A plain-text table of rows (dicts with the same keys in the same order)."""
    if not rows:
        return ""
    keys = list(rows[0])
    if any(not isinstance(row, dict) or list(row) != keys for row in rows):
        raise ValueError(f"rows must be dicts with the same keys in the same order ({keys})")
    cells = [[float_format.format(row[key]) if isinstance(row[key], float) else str(row[key]) for key in keys]
             for row in rows]
    widths = [max(len(key), *(len(line[i]) for line in cells)) for i, key in enumerate(keys)]
    lines = ["  ".join(key.ljust(width) for key, width in zip(keys, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in cells]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Claims (see the claims table in each script's metrics.json)
# ---------------------------------------------------------------------------------------------------


def claim(text: str, metric: str, higher_is_better: bool, baseline: tuple[str, float], method: tuple[str, float],
          margin: float = 0.0) -> dict:
    """One row of the claims table: ``method`` beats ``baseline`` on ``metric`` in the stated direction.

    ``margin`` >= 0 turns it into an "as good as" claim: the method may trail the baseline by at most
    ``margin``. ``holds`` is computed from the two measured values, nothing else.
    """
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    for name, pair in (("baseline", baseline), ("method", method)):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"{name} must be a (name, value) pair, got {pair!r}")
    (baseline_name, baseline_value), (method_name, method_value) = baseline, method
    baseline_value, method_value = float(baseline_value), float(method_value)
    for name, value in (("baseline", baseline_value), ("method", method_value)):
        if not math.isfinite(value):
            raise ValueError(f"{name} value of claim {metric!r} must be finite, got {value}")
    if higher_is_better:
        holds = method_value > baseline_value - margin if margin > 0 else method_value > baseline_value
    else:
        holds = method_value < baseline_value + margin if margin > 0 else method_value < baseline_value
    row = {"claim": text, "metric": metric, "higher_is_better": bool(higher_is_better),
           "baseline": {"name": baseline_name, "value": baseline_value},
           "method": {"name": method_name, "value": method_value}, "holds": bool(holds)}
    if margin > 0:
        row["margin"] = float(margin)
    return row


def format_claims(claims: list[dict]) -> str:
    """The claims table as plain text, one line per claim."""
    rows = [{"metric": row["metric"], "better": "higher" if row["higher_is_better"] else "lower",
             "baseline": f"{row['baseline']['name']} {row['baseline']['value']:.4f}",
             "method": f"{row['method']['name']} {row['method']['value']:.4f}",
             "holds": "yes" if row["holds"] else "NO"} for row in claims]
    return format_table(rows)
