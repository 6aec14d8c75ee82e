"""Bad input across the public API: every case must raise ValueError/TypeError naming the argument.

One section per area; each section builds a list of ``Case``s (a name, a call that must fail, the
exception type, and a fragment the message must contain, usually the argument's name) and the single
parametrised test at the bottom runs them all. Cases are tiny so the file stays fast.
"""

from dataclasses import dataclass
from typing import Callable

import pytest
import torch


@dataclass
class Case:
    name: str
    call: Callable[[], object]
    error: type[Exception] | tuple[type[Exception], ...]
    names: str  # a fragment the message must contain (the argument's name)


CASES: list[Case] = []


# ===================================================================================================
# cameras, vit, resunet, runtime, checkpoints
# ===================================================================================================

# (cases for this area go here)


# ===================================================================================================
# triplane
# ===================================================================================================

# (cases for this area go here)


# ===================================================================================================
# splatting, gaussians
# ===================================================================================================


def _splat_scene(dtype=torch.float64, num=6):
    """A few Gaussians in front of an identity camera, 16 x 12 image; returns rasterize_gaussians' args."""
    generator = torch.Generator().manual_seed(0)
    means = torch.rand(num, 3, generator=generator, dtype=dtype) - 0.5 + torch.tensor([0.0, 0.0, 3.0], dtype=dtype)
    return {
        "means": means,
        "quats": torch.randn(num, 4, generator=generator, dtype=dtype),
        "scales": torch.full((num, 3), 0.2, dtype=dtype),
        "opacities": torch.full((num,), 0.7, dtype=dtype),
        "colors": torch.rand(num, 3, generator=generator, dtype=dtype),
        "viewmat": torch.eye(4, dtype=dtype),
        "K": torch.tensor([[16.0, 0, 8], [0, 16, 6], [0, 0, 1]], dtype=dtype),
        "width": 16,
        "height": 12,
    }


def _splat(**changes):
    from minimal3d.splatting import rasterize_gaussians

    args = _splat_scene()
    options = {key: changes.pop(key) for key in list(changes) if key not in args}
    args.update(changes)
    return lambda: rasterize_gaussians(*args.values(), **options)


def _splat_edit(name, index, value):
    tensor = _splat_scene()[name].clone()
    tensor[index] = value
    return _splat(**{name: tensor})


def _splat_float16():
    return _splat(**{key: value.half() if isinstance(value, torch.Tensor) else value for key, value in _splat_scene().items()})


def _gaussian_model():
    from minimal3d.gaussians import FeatureGaussians

    points = torch.rand(8, 3, generator=torch.Generator().manual_seed(1))
    return FeatureGaussians.from_points(points, torch.rand(8, 3), vit_width=4, feature_dim=3, sh_degree=1)


def _scene_file(kind):
    """A bad scene checkpoint in a fresh temporary folder: empty, truncated, garbage or missing a key."""
    import tempfile
    from pathlib import Path

    from minimal3d.gaussians import save_scene

    path = Path(tempfile.mkdtemp()) / f"{kind}.pt"
    if kind == "missing_file":
        return path
    save_scene(_gaussian_model(), path)
    data = path.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(b"not a checkpoint at all" * 10)
    elif kind == "missing_key":
        state = torch.load(path, weights_only=True)
        del state["features"]
        torch.save(state, path)
    elif kind == "wrong_shape":
        state = torch.load(path, weights_only=True)
        state["features"] = state["features"][:, :2]
        torch.save(state, path)
    return path


def _load_scene(kind):
    from minimal3d.gaussians import load_scene

    return lambda: load_scene(_scene_file(kind))


def _gaussians(function_name, *args, **kwargs):
    from minimal3d import gaussians

    return lambda: getattr(gaussians, function_name)(*args, **kwargs)


def _schedule(**changes):
    from minimal3d.gaussians import GaussianSchedule

    return lambda: GaussianSchedule(**changes)


def _optimizer_with_extent(extent):
    from minimal3d.gaussians import GaussianSchedule, build_optimizer

    return lambda: build_optimizer(_gaussian_model(), GaussianSchedule(), extent)


CASES += [
    # rasterize_gaussians: options
    Case("splat-near>far", _splat(near_plane=5.0, far_plane=1.0), ValueError, "far_plane"),
    Case("splat-near-nan", _splat(near_plane=float("nan")), ValueError, "near_plane"),
    Case("splat-near-negative", _splat(near_plane=-1.0), ValueError, "near_plane"),
    Case("splat-near-zero", _splat(near_plane=0.0), ValueError, "near_plane"),
    Case("splat-far-nan", _splat(far_plane=float("nan")), ValueError, "far_plane"),
    Case("splat-eps2d-zero", _splat(eps2d=0.0), ValueError, "eps2d"),
    Case("splat-eps2d-negative", _splat(eps2d=-0.3), ValueError, "eps2d"),
    Case("splat-eps2d-nan", _splat(eps2d=float("nan")), ValueError, "eps2d"),
    Case("splat-alpha-max-one", _splat(alpha_max=1.0), ValueError, "alpha_max"),
    Case("splat-alpha-max-nan", _splat(alpha_max=float("nan")), ValueError, "alpha_max"),
    Case("splat-tile-size-zero", _splat(tile_size=0), ValueError, "tile_size"),
    Case("splat-sh-degree-4", _splat(sh_degree=4), ValueError, "sh_degree"),
    Case("splat-sh-needs-coeffs", _splat(sh_degree=1), ValueError, "colors"),
    Case("splat-background-size", _splat(background=torch.zeros(4, dtype=torch.float64)), ValueError, "background"),
    Case("splat-width-zero", _splat(width=0), ValueError, "width"),
    Case("splat-height-float", _splat(height=7.5), ValueError, "height"),
    # rasterize_gaussians: tensors
    Case("splat-float16", _splat_float16(), TypeError, "means"),
    Case("splat-int-colors", _splat(colors=torch.ones(6, 3, dtype=torch.int64)), TypeError, "colors"),
    Case("splat-mixed-dtype", _splat(scales=torch.full((6, 3), 0.2)), TypeError, "scales"),
    Case("splat-means-shape", _splat(means=torch.zeros(6, 2, dtype=torch.float64)), ValueError, "means"),
    Case("splat-quats-batch", _splat(quats=torch.ones(5, 4, dtype=torch.float64)), ValueError, "quats"),
    Case("splat-opacities-batch", _splat(opacities=torch.ones(5, dtype=torch.float64)), ValueError, "opacities"),
    Case("splat-means-nan", _splat_edit("means", (0, 0), float("nan")), ValueError, "means"),
    Case("splat-quats-zero", _splat_edit("quats", 1, 0.0), ValueError, "quats"),
    Case("splat-quats-inf", _splat_edit("quats", (1, 1), float("inf")), ValueError, "quats"),
    Case("splat-scales-zero", _splat_edit("scales", (2, 0), 0.0), ValueError, "scales"),
    Case("splat-scales-inf", _splat_edit("scales", (2, 0), float("inf")), ValueError, "scales"),
    Case("splat-opacity-above-one", _splat_edit("opacities", 0, 1.5), ValueError, "opacities"),
    Case("splat-colors-nan", _splat_edit("colors", (0, 0), float("nan")), ValueError, "colors"),
    Case("splat-K-negative-focal", _splat_edit("K", (1, 1), -16.0), ValueError, "K"),
    Case("splat-K-nan", _splat_edit("K", (0, 2), float("nan")), ValueError, "K"),
    Case("splat-viewmat-scaled", _splat(viewmat=2 * torch.eye(4, dtype=torch.float64)), ValueError, "viewmat"),
    Case("splat-viewmat-mirror", _splat(viewmat=torch.diag(torch.tensor([1.0, 1, -1, 1], dtype=torch.float64))),
         ValueError, "viewmat"),
    Case("splat-viewmat-shape", _splat(viewmat=torch.eye(3, dtype=torch.float64)), ValueError, "viewmat"),
    # gaussians
    Case("gauss-psnr-shapes", _gaussians("psnr", torch.rand(3, 8, 8), torch.rand(3, 8, 1)), ValueError, "shape"),
    Case("gauss-extent-nan", _gaussians("scene_extent", torch.tensor([[0.0, 0, 0], [float("nan"), 0, 0]])),
         ValueError, "camera_centers"),
    Case("gauss-extent-shape", _gaussians("scene_extent", torch.zeros(3)), ValueError, "camera_centers"),
    Case("gauss-optimizer-extent-negative", _optimizer_with_extent(-1.0), ValueError, "extent"),
    Case("gauss-optimizer-extent-nan", _optimizer_with_extent(float("nan")), ValueError, "extent"),
    Case("gauss-schedule-negative-lr", _schedule(position_lr_init=-1e-4), ValueError, "position_lr_init"),
    Case("gauss-schedule-nan-lr", _schedule(feature_lr=float("nan")), ValueError, "feature_lr"),
    Case("gauss-schedule-zero-iterations", _schedule(iterations=0), ValueError, "iterations"),
    Case("gauss-init-sh-degree", lambda: __import__("minimal3d.gaussians").gaussians.FeatureGaussians(
        torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), vit_width=4, sh_degree=5), ValueError, "sh_degree"),
    Case("gauss-init-nan-means", lambda: __import__("minimal3d.gaussians").gaussians.FeatureGaussians(
        torch.full((2, 3), float("nan")), torch.zeros(2, 3), torch.zeros(2, 3), vit_width=4), ValueError, "means"),
    Case("gauss-load-missing-file", _load_scene("missing_file"), ValueError, "not a valid checkpoint"),
    Case("gauss-load-empty", _load_scene("empty"), ValueError, "not a valid checkpoint"),
    Case("gauss-load-truncated", _load_scene("truncated"), ValueError, "not a valid checkpoint"),
    Case("gauss-load-garbage", _load_scene("garbage"), ValueError, "not a valid checkpoint"),
    Case("gauss-load-missing-key", _load_scene("missing_key"), ValueError, "'features'"),
    Case("gauss-load-wrong-shape", _load_scene("wrong_shape"), ValueError, "features"),
]


# ===================================================================================================
# point_info_nce, correspondences, sparse_conv
# ===================================================================================================

# (cases for this area go here)


# ===================================================================================================
# vmf_contrast, neural_mesh
# ===================================================================================================

# (cases for this area go here)


# ===================================================================================================
# the runner
# ===================================================================================================


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input_raises_and_names_the_argument(case: Case) -> None:
    with pytest.raises(case.error) as info:
        case.call()
    assert case.names in str(info.value), f"message does not name {case.names!r}: {info.value}"


def test_there_are_cases() -> None:
    assert len(CASES) > 0
