"""Feature Gaussian scenes: Stage I of FiT3D.

Paper: Yuanwen Yue, Anurag Das, Francis Engelmann, Siyu Tang, Jan Eric Lenssen, "Improving 2D Feature
Representations by 3D-Aware Fine-Tuning", ECCV 2024, arXiv:2407.20229. Official code: ywyue/FiT3D
(`scene/gaussian_model.py`, `train_feat_gaussian.py`, `arguments/__init__.py`), itself built on
3D Gaussian splatting (Kerbl, Kopanas, Leimkühler, Drettakis, 2023, arXiv:2308.04079,
graphdeco-inria/gaussian-splatting), whose optimisation schedule is followed here.

Every Gaussian carries, besides the 3DGS parameters, a low-dimensional feature (64 channels, initialised
to zero as in FiT3D's code; the paper's Sec. 4.2 starts from random vectors, so callers may overwrite them). Rendered feature maps are up-projected to the ViT width by a scene-specific 3x3 convolution.
The RGB loss `0.8 L1 + 0.2 (1 - SSIM)` trains every Gaussian parameter; the feature L1 loss trains only
the features and the convolution, because features are composited with detached blending weights
(`rasterize_gaussians(..., detach_geometry=True)`), which is what FiT3D's CUDA backward does.

Contents, in the order of the method: initialisation (`FeatureGaussians.from_points`, `from_box`),
rendering (`render_rgb`, `render_features`), losses (`ssim`, `rgb_loss`, `feature_loss`, `psnr`),
optimisation (`GaussianSchedule`, `build_optimizer`, `update_position_lr`), adaptive density control
(`accumulate_densification_stats`, `densify`, `prune`, `reset_opacity`), `save_scene` / `load_scene`.
"""

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minimal3d.splatting import SH_C0, quaternion_to_rotation, rasterize_gaussians

PER_GAUSSIAN = ("means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest", "features")


# ----------------------------------------------------------------------------------------------------
# Initialisation
# ----------------------------------------------------------------------------------------------------


def nearest_neighbor_distances(points: Tensor, k: int = 3, chunk_size: int = 1024) -> Tensor:
    """Mean squared distance to the k nearest other points (3DGS `distCUDA2`), computed in chunks.

    points: (N, 3). Returns (N,). Memory is O(chunk_size * N), never N x N.
    """
    if points.ndim != 2 or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {tuple(points.shape)}")
    if points.shape[0] < 2:
        raise ValueError(f"need at least 2 points to measure neighbour distances, got {points.shape[0]}")
    k = min(k, points.shape[0] - 1)
    out = []
    for start in range(0, points.shape[0], chunk_size):
        query = points[start : start + chunk_size]
        dist2 = torch.cdist(query, points).square()  # (chunk, N)
        rows = torch.arange(query.shape[0], device=points.device)
        dist2[rows, rows + start] = float("inf")  # exclude the point itself
        out.append(dist2.topk(k, dim=1, largest=False).values.mean(dim=1))
    return torch.cat(out)


def inverse_sigmoid(x: Tensor) -> Tensor:
    """logit(x) with x clamped into (0, 1) so the result is finite."""
    eps = torch.finfo(x.dtype).eps
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


class FeatureGaussians(nn.Module):
    """A 3D scene of feature Gaussians and its scene-specific up-projection convolution.

    Raw (pre-activation) parameters, as in 3DGS:
      means (N, 3), log_scales (N, 3), quats (N, 4) (w, x, y, z), opacity_logits (N,),
      sh_dc (N, 1, 3), sh_rest (N, (sh_degree+1)^2 - 1, 3), features (N, feature_dim).
    Activations: `scales = exp(log_scales)`, `opacities = sigmoid(opacity_logits)`, quats are normalised
    by the renderer. `up_projection`: Conv2d(feature_dim, vit_width, 3, padding=1, bias=False).
    Densification statistics (`grad_accum`, `grad_count`, `max_radii`) are non-persistent buffers.
    """

    def __init__(self, means: Tensor, rgb: Tensor, log_scales: Tensor, *, vit_width: int,
                 feature_dim: int = 64, sh_degree: int = 3, initial_opacity: float = 0.1):
        super().__init__()
        for name, value in (("means", means), ("rgb", rgb), ("log_scales", log_scales)):
            if not isinstance(value, Tensor) or value.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"{name} must be a float32 or float64 tensor, got {getattr(value, 'dtype', value)!r}")
        if means.ndim != 2 or means.shape[-1] != 3:
            raise ValueError(f"means must have shape (N, 3), got {tuple(means.shape)}")
        if rgb.shape != means.shape:
            raise ValueError(f"rgb must have shape {tuple(means.shape)}, got {tuple(rgb.shape)}")
        if log_scales.shape != means.shape:
            raise ValueError(f"log_scales must have shape {tuple(means.shape)}, got {tuple(log_scales.shape)}")
        if sh_degree not in (0, 1, 2, 3) or isinstance(sh_degree, bool):
            raise ValueError(f"sh_degree must be 0, 1, 2 or 3, got {sh_degree!r}")
        for name, size in (("vit_width", vit_width), ("feature_dim", feature_dim)):
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise ValueError(f"{name} must be a positive int, got {size!r}")
        if not bool(torch.isfinite(means).all() & torch.isfinite(rgb).all() & torch.isfinite(log_scales).all()):
            raise ValueError("means, rgb and log_scales must be finite (got NaN or Inf)")
        if not 0 < initial_opacity < 1:
            raise ValueError(f"initial_opacity must be in (0, 1), got {initial_opacity}")
        n, dtype, device = means.shape[0], means.dtype, means.device
        self.max_sh_degree = sh_degree
        self.active_sh_degree = 0  # raised by one every `sh_increase_interval` steps (3DGS)
        self.means = nn.Parameter(means.detach().clone())
        self.log_scales = nn.Parameter(log_scales.detach().clone())
        quats = torch.zeros(n, 4, dtype=dtype, device=device)
        quats[:, 0] = 1.0  # identity rotation
        self.quats = nn.Parameter(quats)
        opacity = torch.full((n,), initial_opacity, dtype=dtype, device=device)
        self.opacity_logits = nn.Parameter(inverse_sigmoid(opacity))
        self.sh_dc = nn.Parameter(((rgb.detach() - 0.5) / SH_C0).reshape(n, 1, 3).clone())  # 3DGS RGB2SH
        self.sh_rest = nn.Parameter(torch.zeros(n, (sh_degree + 1) ** 2 - 1, 3, dtype=dtype, device=device))
        # FiT3D's code starts features at zero; its paper (Sec. 4.2) at random vectors: overwrite for that
        self.features = nn.Parameter(torch.zeros(n, feature_dim, dtype=dtype, device=device))
        self.up_projection = nn.Conv2d(feature_dim, vit_width, 3, padding=1, bias=False,
                                       device=device, dtype=dtype)
        self.register_buffer("grad_accum", torch.zeros(n, dtype=dtype, device=device), persistent=False)
        self.register_buffer("grad_count", torch.zeros(n, dtype=dtype, device=device), persistent=False)
        self.register_buffer("max_radii", torch.zeros(n, dtype=dtype, device=device), persistent=False)

    @classmethod
    def from_points(cls, points: Tensor, rgb: Tensor, *, vit_width: int, feature_dim: int = 64,
                    sh_degree: int = 3) -> "FeatureGaussians":
        """Gaussians at `points` (N, 3) with colours `rgb` (N, 3) in [0, 1] (e.g. back-projected RGB-D).

        Isotropic scale = sqrt of the mean squared distance to the 3 nearest neighbours (3DGS).
        """
        dist2 = nearest_neighbor_distances(points).clamp_min(1e-7)
        log_scales = (0.5 * dist2.log())[:, None].repeat(1, 3)  # log(sqrt(dist2))
        return cls(points, rgb, log_scales, vit_width=vit_width, feature_dim=feature_dim, sh_degree=sh_degree)

    @classmethod
    def from_box(cls, num_points: int, box_min: Tensor, box_max: Tensor, *, vit_width: int,
                 feature_dim: int = 64, sh_degree: int = 3, generator: torch.Generator | None = None
                 ) -> "FeatureGaussians":
        """`num_points` Gaussians uniform in the box [box_min, box_max] (3,), random colours (3DGS)."""
        if box_min.shape != (3,) or box_max.shape != (3,):
            raise ValueError("box_min and box_max must have shape (3,)")
        if not bool((box_max > box_min).all()):
            raise ValueError("box_max must be larger than box_min in every axis")
        device, dtype = box_min.device, box_min.dtype
        unit = torch.rand(num_points, 3, generator=generator, dtype=dtype).to(device)
        rgb = torch.rand(num_points, 3, generator=generator, dtype=dtype).to(device)
        return cls.from_points(box_min + unit * (box_max - box_min), rgb, vit_width=vit_width,
                               feature_dim=feature_dim, sh_degree=sh_degree)

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[0]

    @property
    def scales(self) -> Tensor:
        """(N, 3) standard deviations along the local axes."""
        return self.log_scales.clamp(max=20.0).exp()

    @property
    def opacities(self) -> Tensor:
        """(N,) opacities in (0, 1)."""
        return torch.sigmoid(self.opacity_logits)

    @property
    def sh_coeffs(self) -> Tensor:
        """(N, (max_sh_degree+1)^2, 3) spherical-harmonic colour coefficients."""
        return torch.cat([self.sh_dc, self.sh_rest], dim=1)


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


def render_rgb(model: FeatureGaussians, viewmat: Tensor, K: Tensor, width: int, height: int,
               background: Tensor | None = None) -> dict:
    """Render colour through the view-dependent SH of the active degree; gradients reach every parameter.

    viewmat: (4, 4) world-to-camera (OpenCV), K: (3, 3). Returns the renderer's dict: `render` (H, W, 3),
    `alpha`, `depth_acc`, `depth_exp` (H, W), `radii`, `means2d` (N, 2) (non-leaf; call
    `retain_grad()` on it before backward to read the view-space gradient used for densification).
    """
    num_coeffs = (model.active_sh_degree + 1) ** 2
    return rasterize_gaussians(model.means, model.quats, model.scales, model.opacities,
                               model.sh_coeffs[:, :num_coeffs], viewmat, K, width, height,
                               sh_degree=model.active_sh_degree, background=background)


def render_features(model: FeatureGaussians, viewmat: Tensor, K: Tensor, width: int, height: int) -> Tensor:
    """Render the per-Gaussian features and up-project them: returns (vit_width, H, W).

    Features are composited with detached geometry (FiT3D backward.cu: the feature loss adds nothing to
    dL/dalpha), and without a background term, so only `features` and `up_projection` get gradients.
    """
    out = rasterize_gaussians(model.means, model.quats, model.scales, model.opacities, model.features,
                              viewmat, K, width, height, detach_geometry=True)
    low = out["render"].permute(2, 0, 1)  # (feature_dim, H, W)
    return model.up_projection(low[None])[0]


# ----------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------


def gaussian_window(size: int = 11, sigma: float = 1.5, *, device=None, dtype=None) -> Tensor:
    """(size, size) normalised Gaussian kernel, the 3DGS SSIM window."""
    coords = torch.arange(size, device=device, dtype=dtype) - size // 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(image: Tensor, target: Tensor, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean structural similarity (Wang et al. 2004) with the 3DGS conventions.

    image, target: (C, H, W) or (B, C, H, W), values in [0, 1]. Gaussian window 11x11, sigma 1.5,
    zero padding of window_size // 2 (so borders are included, as in 3DGS `utils/loss_utils.py`),
    C1 = 0.01^2, C2 = 0.03^2. Returns a scalar.
    """
    if image.shape != target.shape:
        raise ValueError(f"image {tuple(image.shape)} and target {tuple(target.shape)} must have the same shape")
    if image.ndim not in (3, 4):
        raise ValueError(f"image must have shape (C, H, W) or (B, C, H, W), got {tuple(image.shape)}")
    x, y = (image[None], target[None]) if image.ndim == 3 else (image, target)
    channels = x.shape[1]
    window = gaussian_window(window_size, sigma, device=x.device, dtype=x.dtype)
    window = window.expand(channels, 1, window_size, window_size)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, window, padding=window_size // 2, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return ssim_map.mean()


def rgb_loss(image: Tensor, target: Tensor, lambda_dssim: float = 0.2) -> Tensor:
    """3DGS photometric loss (1 - lambda) L1 + lambda (1 - SSIM). image, target: (3, H, W)."""
    return (1 - lambda_dssim) * (image - target).abs().mean() + lambda_dssim * (1 - ssim(image, target))


def feature_loss(rendered: Tensor, target: Tensor) -> Tensor:
    """FiT3D feature loss: mean L1 between up-projected rendered features and ViT features, (D, H, W)."""
    if rendered.shape != target.shape:
        raise ValueError(f"rendered {tuple(rendered.shape)} and target {tuple(target.shape)} must match")
    return (rendered - target).abs().mean()


def psnr(image: Tensor, target: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB for images in [0, 1] of the same shape (no broadcasting)."""
    if image.shape != target.shape:
        raise ValueError(f"image {tuple(image.shape)} and target {tuple(target.shape)} must have the same shape")
    mse = (image - target).square().mean()
    return -10 * torch.log10(mse.clamp_min(1e-10))


# ----------------------------------------------------------------------------------------------------
# Optimisation schedule
# ----------------------------------------------------------------------------------------------------


@dataclass
class GaussianSchedule:
    """3DGS / FiT3D optimisation parameters (`arguments/__init__.py`); defaults are the paper's 30k steps."""

    iterations: int = 30_000
    position_lr_init: float = 1.6e-4  # times the scene extent
    position_lr_final: float = 1.6e-6  # times the scene extent
    sh_lr: float = 2.5e-3  # 3DGS `feature_lr`; SH rest uses sh_lr / 20
    feature_lr: float = 2.5e-3 / 40  # FiT3D: semantic features and up-projection use feature_lr / 40
    opacity_lr: float = 0.05
    scaling_lr: float = 5e-3
    rotation_lr: float = 1e-3
    lambda_dssim: float = 0.2
    percent_dense: float = 0.01
    densify_grad_threshold: float = 2e-4
    densify_from: int = 500
    densify_until: int = 15_000
    densification_interval: int = 100
    opacity_reset_interval: int = 3000
    sh_increase_interval: int = 1000
    min_opacity: float = 0.005
    max_screen_size: float = 20.0  # pixels of 3D-sigma radius, used after the first opacity reset
    max_world_size: float = 0.1  # times the scene extent
    max_gaussians: int | None = None  # optional cap on densification (3DGS: unlimited)

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "max_gaussians" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"GaussianSchedule.{field.name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"GaussianSchedule.{field.name} must be >= 0 (a learning rate, step or size), "
                                 f"got {value}")
        if self.iterations < 1:
            raise ValueError(f"GaussianSchedule.iterations must be >= 1, got {self.iterations}")
        for name in ("densification_interval", "opacity_reset_interval", "sh_increase_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"GaussianSchedule.{name} must be >= 1, got {getattr(self, name)}")
        if self.position_lr_init > 0 and not self.position_lr_final > 0:
            raise ValueError(f"GaussianSchedule.position_lr_final must be > 0 (log-linear decay), got "
                             f"{self.position_lr_final}")

    def scaled(self, iterations: int, min_densification_interval: int = 10) -> "GaussianSchedule":
        """The same schedule compressed to `iterations` steps (every step count times iterations / 30000).

        Short runs keep densification_interval >= min_densification_interval (the view-space gradient is
        averaged over that many views before it is thresholded) and opacity_reset_interval >= 10 x the
        densification interval (after a reset the opacities need steps to recover; 3DGS has 30 rounds of
        densification between two resets).
        """
        if iterations < 1:
            raise ValueError(f"iterations must be positive, got {iterations}")
        factor = iterations / self.iterations

        def steps(n: int) -> int:
            return max(1, round(n * factor))

        interval = max(steps(self.densification_interval), min_densification_interval)
        return replace(self, iterations=iterations, densify_from=steps(self.densify_from),
                       densify_until=steps(self.densify_until), densification_interval=interval,
                       opacity_reset_interval=max(steps(self.opacity_reset_interval), 10 * interval),
                       sh_increase_interval=steps(self.sh_increase_interval))


def scene_extent(camera_centers: Tensor) -> float:
    """3DGS `getNerfppNorm` radius: 1.1 x the largest distance of a camera centre from their mean.

    camera_centers: (V, 3), finite. Falls back to 1.0 when all cameras coincide (radius <= 1e-6).
    """
    if camera_centers.ndim != 2 or camera_centers.shape[-1] != 3 or camera_centers.shape[0] < 1:
        raise ValueError(f"camera_centers must have shape (V >= 1, 3), got {tuple(camera_centers.shape)}")
    radius = float(1.1 * (camera_centers - camera_centers.mean(0)).norm(dim=-1).max())
    if not math.isfinite(radius):
        raise ValueError("camera_centers must be finite (got NaN or Inf)")
    return radius if radius > 1e-6 else 1.0


def _check_extent(extent: float) -> None:
    if isinstance(extent, bool) or not isinstance(extent, (int, float)) or not (math.isfinite(extent) and extent > 0):
        raise ValueError(f"extent must be a finite number > 0 (the scene radius, see scene_extent), got {extent!r}")


def build_optimizer(model: FeatureGaussians, schedule: GaussianSchedule, extent: float) -> torch.optim.Adam:
    """Adam with one named group per parameter and the 3DGS / FiT3D learning rates (eps 1e-15).

    A step pre-hook sets non-finite gradient entries to 0 before every step (no host sync), so Adam's
    moments never absorb a NaN or Inf (a NaN loss then leaves the parameters unchanged).
    """
    _check_extent(extent)
    groups = [
        {"name": "means", "params": [model.means], "lr": schedule.position_lr_init * extent},
        {"name": "sh_dc", "params": [model.sh_dc], "lr": schedule.sh_lr},
        {"name": "sh_rest", "params": [model.sh_rest], "lr": schedule.sh_lr / 20},
        {"name": "features", "params": [model.features], "lr": schedule.feature_lr},
        {"name": "opacity_logits", "params": [model.opacity_logits], "lr": schedule.opacity_lr},
        {"name": "log_scales", "params": [model.log_scales], "lr": schedule.scaling_lr},
        {"name": "quats", "params": [model.quats], "lr": schedule.rotation_lr},
        {"name": "up_projection", "params": list(model.up_projection.parameters()), "lr": schedule.feature_lr},
    ]
    optimizer = torch.optim.Adam(groups, lr=0.0, eps=1e-15)
    optimizer.register_step_pre_hook(_zero_non_finite_gradients)
    return optimizer


def _zero_non_finite_gradients(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                torch.nan_to_num_(param.grad, nan=0.0, posinf=0.0, neginf=0.0)


def position_lr(step: int, schedule: GaussianSchedule, extent: float) -> float:
    """Log-linear decay from position_lr_init to position_lr_final over the run (3DGS get_expon_lr_func)."""
    _check_extent(extent)
    if schedule.position_lr_init == 0:
        return 0.0
    t = min(max(step / max(schedule.iterations, 1), 0.0), 1.0)
    log_lr = math.log(schedule.position_lr_init) * (1 - t) + math.log(schedule.position_lr_final) * t
    return math.exp(log_lr) * extent


def update_position_lr(optimizer: torch.optim.Optimizer, step: int, schedule: GaussianSchedule,
                       extent: float) -> None:
    """Set the learning rate of the `means` group for this step."""
    for group in optimizer.param_groups:
        if group["name"] == "means":
            group["lr"] = position_lr(step, schedule, extent)


# ----------------------------------------------------------------------------------------------------
# Adaptive density control
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def accumulate_densification_stats(model: FeatureGaussians, means2d_grad: Tensor, radii: Tensor,
                                   width: int, height: int) -> None:
    """Add one view's view-space gradient norms to the running statistics of the visible Gaussians.

    means2d_grad: (N, 2) gradient of the loss w.r.t. the projected means in pixels; it is converted to
    NDC units (x W/2, x H/2) so the 3DGS threshold 2e-4 applies at any resolution. radii: (N,) or (N, 2),
    0 = not visible. A non-finite gradient is not counted (the statistics never absorb NaN or Inf).
    """
    n = model.num_gaussians
    if means2d_grad is None:
        raise ValueError("means2d_grad is None: call backward on a loss of render_rgb(...) first")
    if means2d_grad.shape != (n, 2):
        raise ValueError(f"means2d_grad must have shape ({n}, 2), got {tuple(means2d_grad.shape)}")
    if radii.shape[0] != n:
        raise ValueError(f"radii must have shape ({n},) or ({n}, 2), got {tuple(radii.shape)}")
    radius = radii.reshape(n, -1).amax(dim=1).to(model.max_radii.dtype)
    scale = means2d_grad.new_tensor([width / 2, height / 2])
    grad_norm = (means2d_grad * scale).norm(dim=-1).to(model.grad_accum.dtype)
    visible = radius > 0
    counted = visible & torch.isfinite(grad_norm)
    model.grad_accum += torch.where(counted, grad_norm, torch.zeros_like(grad_norm))
    model.grad_count += counted.to(model.grad_count.dtype)
    model.max_radii.copy_(torch.where(visible, torch.maximum(model.max_radii, radius), model.max_radii))


def _replace_gaussians(model: FeatureGaussians, optimizer: torch.optim.Optimizer, keep: Tensor,
                       new: dict[str, Tensor] | None = None) -> None:
    """Keep the Gaussians where `keep` (N,) is True and append `new` ones, in the model and in Adam's state.

    Kept rows keep their Adam moments; appended rows start with zero moments (3DGS cat_tensors_to_optimizer).
    """
    groups = {group["name"]: group for group in optimizer.param_groups}
    for name in PER_GAUSSIAN:
        old = getattr(model, name)
        data = old.detach()[keep]
        if new is not None:
            data = torch.cat([data, new[name].detach().to(data)], dim=0)
        param = nn.Parameter(data)
        state = optimizer.state.pop(old, None)
        if state is not None:
            for key in ("exp_avg", "exp_avg_sq"):
                moment = state[key][keep]
                if new is not None:
                    moment = torch.cat([moment, torch.zeros_like(new[name], dtype=moment.dtype)], dim=0)
                state[key] = moment
            optimizer.state[param] = state
        groups[name]["params"] = [param]
        setattr(model, name, param)
    if new is None:
        for name in ("grad_accum", "grad_count", "max_radii"):
            setattr(model, name, getattr(model, name)[keep])


def _reset_stats(model: FeatureGaussians) -> None:
    for name in ("grad_accum", "grad_count", "max_radii"):
        setattr(model, name, torch.zeros_like(model.means[:, 0].detach()))


@torch.no_grad()
def densify(model: FeatureGaussians, optimizer: torch.optim.Optimizer, grad_threshold: float,
            extent: float, percent_dense: float = 0.01, generator: torch.Generator | None = None,
            max_gaussians: int | None = None) -> dict:
    """Clone small and split large Gaussians whose mean view-space gradient exceeds `grad_threshold`.

    Clone (under-reconstruction): max scale <= percent_dense * extent -> an identical copy is appended.
    Split (over-reconstruction): max scale > percent_dense * extent -> replaced by two Gaussians sampled
    from the original, with scales divided by 1.6 (3DGS densify_and_split, N = 2).
    Both add one Gaussian net. With `max_gaussians` (not in 3DGS; a budget for short, small runs) only
    the candidates with the largest gradients are taken so the count stays <= max_gaussians.
    Resets the statistics afterwards. Returns {"cloned": int, "split": int}.
    """
    grads = model.grad_accum / model.grad_count.clamp_min(1)
    selected = grads >= grad_threshold
    if max_gaussians is not None:
        budget = max(max_gaussians - model.num_gaussians, 0)
        if int(selected.sum()) > budget:
            ranked = torch.where(selected, grads, torch.full_like(grads, -1.0))
            selected = torch.zeros_like(selected)
            selected[ranked.topk(budget).indices] = True
    large = model.scales.amax(dim=1) > percent_dense * extent
    clone, split = selected & ~large, selected & large

    cloned = {name: getattr(model, name)[clone] for name in PER_GAUSSIAN}
    stds = model.scales[split].repeat(2, 1)
    noise = torch.randn(stds.shape, generator=generator, dtype=stds.dtype).to(stds.device) * stds
    rotations = quaternion_to_rotation(model.quats[split]).repeat(2, 1, 1)
    children = {name: getattr(model, name)[split].repeat(2, *([1] * (getattr(model, name).ndim - 1)))
                for name in PER_GAUSSIAN}
    children["means"] = children["means"] + (rotations @ noise[..., None])[..., 0]
    children["log_scales"] = children["log_scales"] - math.log(0.8 * 2)

    new = {name: torch.cat([cloned[name], children[name]]) for name in PER_GAUSSIAN}
    _replace_gaussians(model, optimizer, ~split, new)
    _reset_stats(model)
    return {"cloned": int(clone.sum()), "split": int(split.sum())}


@torch.no_grad()
def prune(model: FeatureGaussians, optimizer: torch.optim.Optimizer, min_opacity: float, extent: float,
          max_screen_size: float | None = None, max_world_size: float = 0.1) -> int:
    """Remove Gaussians with opacity < min_opacity and, when `max_screen_size` is given, those whose
    screen radius exceeded it or whose largest scale exceeds max_world_size * extent (3DGS). Returns the
    number removed. At least one Gaussian is always kept.
    """
    remove = model.opacities < min_opacity
    if max_screen_size is not None:
        remove |= model.max_radii > max_screen_size
        remove |= model.scales.amax(dim=1) > max_world_size * extent
    if bool(remove.all()):
        remove[model.opacities.argmax()] = False
    _replace_gaussians(model, optimizer, ~remove)
    return int(remove.sum())


@torch.no_grad()
def reset_opacity(model: FeatureGaussians, optimizer: torch.optim.Optimizer, value: float = 0.01) -> None:
    """Clamp every opacity to at most `value` and zero its Adam moments (3DGS reset_opacity)."""
    model.opacity_logits.copy_(inverse_sigmoid(model.opacities.clamp(max=value)))
    state = optimizer.state.get(model.opacity_logits)
    if state:
        state["exp_avg"].zero_()
        state["exp_avg_sq"].zero_()


def densification_step(model: FeatureGaussians, optimizer: torch.optim.Optimizer, step: int,
                       schedule: GaussianSchedule, extent: float, background_is_white: bool = False,
                       generator: torch.Generator | None = None) -> dict:
    """Run the 3DGS density-control schedule after `step` (1-based) has accumulated its statistics.

    Densify and prune every `densification_interval` steps in (densify_from, densify_until); reset the
    opacities every `opacity_reset_interval` steps. Returns what happened (for logging).
    """
    events = {}
    if step >= schedule.densify_until:
        return events
    if step > schedule.densify_from and step % schedule.densification_interval == 0:
        events.update(densify(model, optimizer, schedule.densify_grad_threshold, extent,
                              schedule.percent_dense, generator, schedule.max_gaussians))
        screen = schedule.max_screen_size if step > schedule.opacity_reset_interval else None
        events["pruned"] = prune(model, optimizer, schedule.min_opacity, extent, screen, schedule.max_world_size)
    if step % schedule.opacity_reset_interval == 0 or (background_is_white and step == schedule.densify_from):
        reset_opacity(model, optimizer)
        events["opacity_reset"] = True
    return events


# ----------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------


def save_scene(model: FeatureGaussians, path) -> None:
    """torch.save a plain dict of tensors and ints (loadable with weights_only=True)."""
    state = {name: getattr(model, name).detach().cpu() for name in PER_GAUSSIAN}
    state["up_projection.weight"] = model.up_projection.weight.detach().cpu()
    state["max_sh_degree"] = model.max_sh_degree
    state["active_sh_degree"] = model.active_sh_degree
    torch.save(state, path)


SCENE_KEYS = PER_GAUSSIAN + ("up_projection.weight", "max_sh_degree", "active_sh_degree")


def _read_scene_file(path: Path, map_location) -> dict:
    """``torch.load(weights_only=True)`` of a ``save_scene`` file; ValueError("not a valid checkpoint: ...")."""
    if not path.is_file():
        raise ValueError(f"not a valid checkpoint: {path} (no such file)")
    if path.stat().st_size == 0:
        raise ValueError(f"not a valid checkpoint: {path} (empty file)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch's message would suggest weights_only=False: wrong for a bad file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "weights_only" in reason:  # the unpickler's message: never pass on its advice
            reason = "corrupt, or holds objects other than tensors, numbers and strings"
        raise ValueError(f"not a valid checkpoint: {path} ({type(error).__name__}: {reason[:200]})") from None
    if not isinstance(state, dict):
        raise ValueError(f"not a valid checkpoint: {path} (expected a dict, got {type(state).__name__})")
    missing = [key for key in SCENE_KEYS if key not in state]
    if missing:
        raise ValueError(f"not a valid checkpoint: {path} (missing keys {missing})")
    return state


def load_scene(path, map_location=None) -> FeatureGaussians:
    """Inverse of `save_scene`.

    A missing, empty, truncated or corrupt file, one that lacks any of `SCENE_KEYS` or whose arrays do not
    fit together raises ``ValueError("not a valid checkpoint: PATH (reason)")``.
    """
    path = Path(path)
    state = _read_scene_file(path, map_location)
    weight = state["up_projection.weight"]
    try:
        if not isinstance(weight, Tensor) or weight.ndim != 4:
            raise ValueError("up_projection.weight must be a (vit_width, feature_dim, 3, 3) tensor")
        model = FeatureGaussians(state["means"], torch.zeros_like(state["means"]), state["log_scales"],
                                 vit_width=weight.shape[0], feature_dim=weight.shape[1],
                                 sh_degree=state["max_sh_degree"])
        with torch.no_grad():
            for name in PER_GAUSSIAN:
                value = state[name]
                if not isinstance(value, Tensor) or value.shape != getattr(model, name).shape:
                    raise ValueError(f"{name} has shape {tuple(getattr(value, 'shape', ()))}, expected "
                                     f"{tuple(getattr(model, name).shape)}")
                getattr(model, name).copy_(value)
            model.up_projection.weight.copy_(weight)
        active = state["active_sh_degree"]
        if active not in range(model.max_sh_degree + 1):
            raise ValueError(f"active_sh_degree must be in 0..{model.max_sh_degree}, got {active!r}")
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(f"not a valid checkpoint: {path} ({error})") from None
    model.active_sh_degree = int(active)
    return model
