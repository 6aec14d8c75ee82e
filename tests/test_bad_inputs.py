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


def _foundation_cases() -> list[Case]:
    from minimal3d import cameras, probes, runtime, synthetic
    from minimal3d.resunet import ResNetEncoder, ResUNet, load_torchvision_resnet
    from minimal3d.vit import DinoVisionTransformer, ViTConfig, build_backbone, load_dinov2, normalize_image

    nan, inf = float("nan"), float("inf")
    eye4, K = torch.eye(4), cameras.intrinsics(10.0, 10.0, 4.0, 4.0)
    points = torch.zeros(5, 3)

    def K_with(row: int, col: int, value: float) -> torch.Tensor:
        bad = K.clone()
        bad[row, col] = value
        return bad

    def viewmat_with(scale: float = 1.0, row3=(0.0, 0.0, 0.0, 1.0), flip: bool = False, shear: float = 0.0):
        bad = torch.eye(4)
        bad[:3, :3] *= scale
        bad[0, 1] = shear
        bad[3] = torch.tensor(row3)
        if flip:
            bad[0, 0] = -1.0
        return bad

    up, zero3 = torch.tensor([0.0, 0.0, 1.0]), torch.zeros(3)
    tiny_vit = DinoVisionTransformer(ViTConfig(embed_dim=8, depth=2, num_heads=2, patch_size=2, img_size=8))
    tiny_unet = ResUNet(18, 4, 32)

    def bad_file(tmp: str, content: bytes):
        import tempfile
        from pathlib import Path

        path = Path(tempfile.mkdtemp()) / tmp
        path.write_bytes(content)
        return path

    cases = [
        # -- cameras: shapes
        Case("cameras-shape-project-points", lambda: cameras.project(torch.zeros(2, 2), eye4, K), ValueError, "points"),
        Case("cameras-shape-project-one-point", lambda: cameras.project(torch.zeros(3), eye4, K), ValueError, "points"),
        Case("cameras-shape-project-K", lambda: cameras.project(points, eye4, torch.eye(4)), ValueError, "K must"),
        Case("cameras-shape-pixel_rays-viewmat", lambda: cameras.pixel_rays(torch.eye(3), K, 4, 4), ValueError, "viewmat"),
        Case("cameras-shape-unproject-depth", lambda: cameras.unproject_depth(torch.ones(5), eye4, K), ValueError, "depth"),
        Case("cameras-shape-look_at-eye", lambda: cameras.look_at(torch.zeros(2), zero3, up), ValueError, "eye"),
        Case("cameras-shape-rotation_error", lambda: cameras.rotation_error(torch.eye(3)[:, :2], torch.eye(3)), ValueError, "R_pred"),
        Case("cameras-shape-transform-matrix", lambda: cameras.transform_points(points, torch.eye(4)[:3]), ValueError, "matrix"),
        Case("cameras-shape-camera_center", lambda: cameras.camera_center(torch.eye(4)[:, :3]), ValueError, "viewmat"),
        Case("cameras-shape-make_viewmat", lambda: cameras.make_viewmat(torch.eye(3), torch.zeros(4)), ValueError, "translation"),
        Case("cameras-shape-opengl", lambda: cameras.opengl_to_opencv_c2w(torch.eye(3)), ValueError, "c2w"),
        Case("cameras-type-list-viewmat", lambda: cameras.camera_center([[1.0]]), TypeError, "viewmat"),
        # -- cameras: batch sizes
        Case("cameras-batch-project", lambda: cameras.project(torch.zeros(2, 5, 3), eye4.expand(3, 4, 4), K), ValueError, "viewmat"),
        Case("cameras-batch-pixel_rays", lambda: cameras.pixel_rays(eye4.expand(2, 4, 4), K.expand(3, 3, 3), 4, 4), ValueError, "K must"),
        Case("cameras-batch-unproject", lambda: cameras.unproject_depth(torch.ones(2, 4, 4), eye4.expand(3, 4, 4), K), ValueError, "depth"),
        Case("cameras-batch-look_at", lambda: cameras.look_at(torch.ones(2, 3), torch.zeros(3, 3), up), ValueError, "target"),
        Case("cameras-batch-rotation_error", lambda: cameras.rotation_error(torch.eye(3).expand(2, 3, 3), torch.eye(3).expand(3, 3, 3)), ValueError, "R_gt"),
        Case("cameras-batch-intrinsics", lambda: cameras.intrinsics(torch.ones(2), 1.0, torch.ones(3), 1.0), ValueError, "cx"),
        Case("cameras-batch-pose_from_angles", lambda: cameras.pose_from_angles(torch.zeros(2), 0.0, 0.0, torch.ones(3) * 5), ValueError, "distance"),
        Case("cameras-batch-make_viewmat", lambda: cameras.make_viewmat(torch.eye(3).expand(2, 3, 3), torch.zeros(3, 3)), ValueError, "translation"),
        # -- cameras: dtypes
        Case("cameras-dtype-project-mixed", lambda: cameras.project(points.double(), eye4, K), TypeError, "points"),
        Case("cameras-dtype-project-half", lambda: cameras.project(points.half(), eye4.half(), K.half()), TypeError, "points"),
        Case("cameras-dtype-project-int-points", lambda: cameras.project(torch.zeros(5, 3, dtype=torch.long), eye4, K), TypeError, "points"),
        Case("cameras-dtype-look_at-up", lambda: cameras.look_at(torch.ones(3), zero3, up.double()), TypeError, "up"),
        Case("cameras-dtype-unproject-depth", lambda: cameras.unproject_depth(torch.ones(4, 4, dtype=torch.long), eye4, K), TypeError, "depth"),
        Case("cameras-dtype-pixel_centers", lambda: cameras.pixel_centers(4, 4, dtype=torch.int64), TypeError, "dtype"),
        Case("cameras-dtype-intrinsics", lambda: cameras.intrinsics(torch.ones(1), torch.ones(1, dtype=torch.float64), 1.0, 1.0), TypeError, "fy"),
        Case("cameras-dtype-rotation_error", lambda: cameras.rotation_error(torch.eye(3), torch.eye(3, dtype=torch.float64)), TypeError, "R_gt"),
        # -- cameras: focal lengths and parameters
        Case("cameras-range-intrinsics-zero-fx", lambda: cameras.intrinsics(0.0, 1.0, 1.0, 1.0), ValueError, "fx"),
        Case("cameras-range-intrinsics-negative-fy", lambda: cameras.intrinsics(1.0, -1.0, 1.0, 1.0), ValueError, "fy"),
        Case("cameras-range-intrinsics-nan-fx", lambda: cameras.intrinsics(nan, 1.0, 1.0, 1.0), ValueError, "fx"),
        Case("cameras-range-intrinsics-inf-cx", lambda: cameras.intrinsics(1.0, 1.0, inf, 1.0), ValueError, "cx"),
        Case("cameras-range-fov-zero", lambda: cameras.fov_intrinsics(0.0, 8, 8), ValueError, "fov_x"),
        Case("cameras-range-fov-nan", lambda: cameras.fov_intrinsics(nan, 8, 8), ValueError, "fov_x"),
        Case("cameras-range-project-zero-focal", lambda: cameras.project(points, eye4, K_with(0, 0, 0.0)), ValueError, "K must"),
        Case("cameras-range-pixel_rays-negative-focal", lambda: cameras.pixel_rays(eye4, K_with(1, 1, -10.0), 4, 4), ValueError, "K must"),
        Case("cameras-range-unproject-nan-K", lambda: cameras.unproject_depth(torch.ones(4, 4), eye4, K_with(0, 2, nan)), ValueError, "K must"),
        Case("cameras-range-project-K-not-pinhole", lambda: cameras.project(points, eye4, K_with(2, 0, 1.0)), ValueError, "K must"),
        Case("cameras-range-pose-distance-zero", lambda: cameras.pose_from_angles(0.0, 0.0, 0.0, 0.0), ValueError, "distance"),
        Case("cameras-range-pose-distance-nan", lambda: cameras.pose_from_angles(0.0, 0.0, 0.0, nan), ValueError, "distance"),
        Case("cameras-range-pose-azimuth-nan", lambda: cameras.pose_from_angles(nan, 0.0, 0.0, 5.0), ValueError, "azimuth"),
        # -- cameras: image sizes
        Case("cameras-size-width-zero", lambda: cameras.pixel_rays(eye4, K, 0, 4), ValueError, "width"),
        Case("cameras-size-width-float", lambda: cameras.pixel_rays(eye4, K, 3.5, 4), TypeError, "width"),
        Case("cameras-size-height-negative", lambda: cameras.pixel_centers(4, -2), ValueError, "height"),
        Case("cameras-size-fov-width-float", lambda: cameras.fov_intrinsics(1.0, 10.0, 8), TypeError, "width"),
        Case("cameras-size-height-bool", lambda: cameras.pixel_centers(4, True), TypeError, "height"),
        # -- cameras: poses
        Case("cameras-pose-singular", lambda: cameras.project(points, viewmat_with(scale=0.0), K), ValueError, "viewmat"),
        Case("cameras-pose-scaled", lambda: cameras.project(points, viewmat_with(scale=2.0), K), ValueError, "viewmat"),
        Case("cameras-pose-sheared", lambda: cameras.pixel_rays(viewmat_with(shear=0.3), K, 4, 4), ValueError, "viewmat"),
        Case("cameras-pose-reflection", lambda: cameras.unproject_depth(torch.ones(4, 4), viewmat_with(flip=True), K), ValueError, "viewmat"),
        Case("cameras-pose-last-row", lambda: cameras.project(points, viewmat_with(row3=(0.0, 0.0, 1.0, 1.0)), K), ValueError, "viewmat"),
        Case("cameras-pose-nan", lambda: cameras.camera_center(torch.full((4, 4), nan)), ValueError, "viewmat"),
        Case("cameras-pose-camera_center-scaled", lambda: cameras.camera_center(viewmat_with(scale=3.0)), ValueError, "viewmat"),
        Case("cameras-pose-transform-sheared", lambda: cameras.transform_points(points, viewmat_with(shear=0.2)), ValueError, "matrix"),
        Case("cameras-pose-rotation_error-scaled", lambda: cameras.rotation_error(2 * torch.eye(3), torch.eye(3)), ValueError, "R_pred"),
        Case("cameras-pose-make_viewmat-rotation", lambda: cameras.make_viewmat(torch.ones(3, 3), zero3), ValueError, "rotation"),
        Case("cameras-pose-make_viewmat-translation", lambda: cameras.make_viewmat(torch.eye(3), torch.full((3,), nan)), ValueError, "translation"),
        Case("cameras-pose-opengl-scaled", lambda: cameras.opengl_to_opencv_c2w(viewmat_with(scale=2.0)), ValueError, "c2w"),
        Case("cameras-pose-look_at-eye-is-target", lambda: cameras.look_at(torch.ones(3), torch.ones(3), up), ValueError, "target"),
        Case("cameras-pose-look_at-zero-up", lambda: cameras.look_at(torch.ones(3), zero3, zero3), ValueError, "up"),
        Case("cameras-pose-look_at-parallel-up", lambda: cameras.look_at(torch.tensor([0.0, 0, 1]), zero3, up), ValueError, "up"),
        Case("cameras-pose-look_at-nan-eye", lambda: cameras.look_at(torch.full((3,), nan), zero3, up), ValueError, "eye"),
        # -- vit
        Case("vit-shape-x", lambda: tiny_vit(torch.randn(3, 8, 8)), ValueError, "x must"),
        Case("vit-shape-x-channels", lambda: tiny_vit(torch.randn(1, 4, 8, 8)), ValueError, "x must"),
        Case("vit-shape-x-not-multiple", lambda: tiny_vit(torch.randn(1, 3, 8, 7)), ValueError, "x must"),
        Case("vit-dtype-x-uint8", lambda: tiny_vit(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)), TypeError, "x must"),
        Case("vit-dtype-x-double", lambda: tiny_vit(torch.zeros(1, 3, 8, 8, dtype=torch.float64)), TypeError, "x must"),
        Case("vit-shape-masks", lambda: tiny_vit.forward_features(torch.randn(1, 3, 8, 8), masks=torch.ones(1, 3, dtype=torch.bool)), ValueError, "masks"),
        Case("vit-range-n-zero", lambda: tiny_vit.get_intermediate_layers(torch.randn(1, 3, 8, 8), n=0), ValueError, "n must"),
        Case("vit-range-n-above-depth", lambda: tiny_vit.get_intermediate_layers(torch.randn(1, 3, 8, 8), n=3), ValueError, "n must"),
        Case("vit-range-n-index", lambda: tiny_vit.get_intermediate_layers(torch.randn(1, 3, 8, 8), n=[0, 5]), ValueError, "n must"),
        Case("vit-type-n-float", lambda: tiny_vit.get_intermediate_layers(torch.randn(1, 3, 8, 8), n=1.5), TypeError, "n must"),
        Case("vit-range-pos-height", lambda: tiny_vit.interpolate_pos_encoding(0, 8), ValueError, "height"),
        Case("vit-range-normalize-255", lambda: normalize_image(torch.rand(1, 3, 4, 4) * 255), ValueError, "images"),
        Case("vit-config-heads", lambda: ViTConfig(embed_dim=10, num_heads=3), ValueError, "num_heads"),
        Case("vit-config-patch-zero", lambda: ViTConfig(patch_size=0), ValueError, "patch_size"),
        Case("vit-config-depth-zero", lambda: ViTConfig(depth=0), ValueError, "depth"),
        Case("vit-config-registers", lambda: ViTConfig(num_register_tokens=-1), ValueError, "num_register_tokens"),
        Case("vit-config-mlp_ratio-nan", lambda: ViTConfig(mlp_ratio=nan), ValueError, "mlp_ratio"),
        Case("vit-config-ffn", lambda: ViTConfig(ffn_layer="geglu"), ValueError, "ffn_layer"),
        Case("vit-config-arch", lambda: build_backbone(arch="vit_huge"), ValueError, "arch"),
        # -- resunet
        Case("resunet-shape-images", lambda: tiny_unet(torch.randn(3, 32, 32)), ValueError, "images"),
        Case("resunet-shape-images-small", lambda: tiny_unet(torch.randn(1, 3, 16, 32)), ValueError, "images"),
        Case("resunet-dtype-images-int", lambda: tiny_unet(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), TypeError, "images"),
        Case("resunet-dtype-images-double", lambda: tiny_unet(torch.zeros(1, 3, 32, 32, dtype=torch.float64)), TypeError, "images"),
        Case("resunet-batchnorm-batch1", lambda: tiny_unet.train()(torch.randn(1, 3, 32, 32)), ValueError, "images"),
        Case("resunet-config-stride", lambda: ResUNet(18, 4, 3), ValueError, "output_stride"),
        Case("resunet-config-out_channels", lambda: ResUNet(18, 2.5), ValueError, "out_channels"),
        Case("resunet-config-depth", lambda: ResNetEncoder(101), ValueError, "depth"),
        Case("resunet-type-encoder", lambda: load_torchvision_resnet(tiny_unet, {}), TypeError, "encoder"),
        # -- checkpoints
        Case("checkpoint-dinov2-missing-file", lambda: load_dinov2("/nonexistent/dinov2.pth"), ValueError, "not a valid checkpoint"),
        Case("checkpoint-dinov2-empty", lambda: load_dinov2(bad_file("empty.pth", b"")), ValueError, "not a valid checkpoint"),
        Case("checkpoint-dinov2-corrupt", lambda: load_dinov2(bad_file("corrupt.pth", b"\x80\x02garbage" * 4)), ValueError, "not a valid checkpoint"),
        Case("checkpoint-dinov2-missing-key", lambda: load_dinov2({"pos_embed": torch.zeros(1, 5, 64)}), ValueError, "cls_token"),
        Case("checkpoint-dinov2-type", lambda: load_dinov2(3), TypeError, "path_or_state_dict"),
        Case("checkpoint-resnet-truncated", lambda: load_torchvision_resnet(ResNetEncoder(18), bad_file("r.pth", b"PK\x03\x04trunc")), ValueError, "not a valid checkpoint"),
        Case("checkpoint-resnet-missing-key", lambda: load_torchvision_resnet(ResNetEncoder(18), {"conv1.weight": torch.zeros(64, 3, 7, 7)}), ValueError, "bn1.weight"),
        Case("checkpoint-runtime-missing-file", lambda: runtime.load_checkpoint("/nonexistent/run.pt"), ValueError, "not a valid checkpoint"),
        Case("checkpoint-runtime-corrupt", lambda: runtime.load_checkpoint(bad_file("c.pt", b"\x00garbage" * 8)), ValueError, "not a valid checkpoint"),
        # -- runtime
        Case("runtime-device-unknown", lambda: runtime.pick_device("tpu7"), ValueError, "device"),
        Case("runtime-panels-empty", lambda: runtime.save_panels("/tmp/unused.png", []), ValueError, "panels"),
        Case("runtime-panels-size", lambda: runtime.save_panels("/tmp/unused.png", [("a", torch.zeros(4, 4))], size=0), ValueError, "size"),
        Case("runtime-png-empty", lambda: runtime.save_png("/tmp/unused.png", []), ValueError, "images"),
        Case("runtime-depth-shape", lambda: runtime.colorize_depth(torch.ones(1, 4, 4)), ValueError, "depth"),
        Case("runtime-depth-mask-shape", lambda: runtime.colorize_depth(torch.ones(4, 4), torch.ones(3, 3, dtype=torch.bool)), ValueError, "mask"),
        Case("runtime-pca-shape", lambda: runtime.pca_rgb(torch.ones(4, 4)), ValueError, "features"),
        Case("runtime-pca-nan", lambda: runtime.pca_basis(torch.full((4, 3, 3), nan)), ValueError, "features"),
        Case("runtime-pca-basis-channels", lambda: runtime.pca_rgb(torch.rand(5, 3, 3), runtime.pca_basis(torch.rand(4, 3, 3))), ValueError, "basis"),
        Case("runtime-claim-margin", lambda: runtime.claim("c", "m", True, ("a", 1.0), ("b", 2.0), margin=-1.0), ValueError, "margin"),
        Case("runtime-claim-pair", lambda: runtime.claim("c", "m", True, 1.0, ("b", 2.0)), ValueError, "baseline"),
        Case("runtime-table-keys", lambda: runtime.format_table([{"a": 1}, {"b": 2}]), ValueError, "rows"),
        # -- probes
        Case("probes-shape-segmentation", lambda: probes.segmentation_metrics(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), 2), ValueError, "pred"),
        Case("probes-empty-segmentation", lambda: probes.segmentation_metrics(torch.zeros(2, dtype=torch.long), torch.full((2,), -1), 2), ValueError, "target"),
        Case("probes-range-num_classes", lambda: probes.segmentation_metrics(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 0), ValueError, "num_classes"),
        Case("probes-dtype-labels-fraction", lambda: probes.segmentation_metrics(torch.full((2,), 0.5), torch.zeros(2, dtype=torch.long), 2), ValueError, "pred"),
        Case("probes-range-labels", lambda: probes.segmentation_metrics(torch.full((2,), 5), torch.zeros(2, dtype=torch.long), 2), ValueError, "labels"),
        Case("probes-shape-depth", lambda: probes.depth_metrics(torch.ones(3), torch.ones(4)), ValueError, "pred"),
        Case("probes-shape-depth-mask", lambda: probes.depth_metrics(torch.ones(3), torch.ones(3), torch.ones(2, dtype=torch.bool)), ValueError, "mask"),
        Case("probes-empty-depth", lambda: probes.depth_metrics(torch.ones(3), torch.zeros(3)), ValueError, "target"),
        Case("probes-empty-depth-nan-holes", lambda: probes.depth_metrics(torch.ones(2), torch.full((2,), nan)), ValueError, "target"),
        Case("probes-shape-classifier-labels", lambda: probes.fit_linear_classifier(torch.ones(4, 2), torch.zeros(3, dtype=torch.long), 2), ValueError, "labels"),
        Case("probes-empty-classifier", lambda: probes.fit_linear_classifier(torch.ones(0, 2), torch.zeros(0, dtype=torch.long), 2), ValueError, "labels"),
        Case("probes-empty-classifier-ignored", lambda: probes.fit_linear_classifier(torch.ones(2, 2), torch.full((2,), -1), 2), ValueError, "labels"),
        Case("probes-range-classifier-classes", lambda: probes.fit_linear_classifier(torch.ones(2, 2), torch.zeros(2, dtype=torch.long), 0), ValueError, "num_classes"),
        Case("probes-range-classifier-decay", lambda: probes.fit_linear_classifier(torch.ones(2, 2), torch.zeros(2, dtype=torch.long), 2, weight_decay=-1.0), ValueError, "weight_decay"),
        Case("probes-range-classifier-iter", lambda: probes.fit_linear_classifier(torch.ones(2, 2), torch.zeros(2, dtype=torch.long), 2, max_iter=0), ValueError, "max_iter"),
        Case("probes-shape-regressor-rows", lambda: probes.fit_linear_regressor(torch.ones(4, 2), torch.ones(3)), ValueError, "targets"),
        Case("probes-range-regressor-ridge", lambda: probes.fit_linear_regressor(torch.ones(4, 2), torch.ones(4), ridge=-1.0), ValueError, "ridge"),
        Case("probes-range-regressor-ridge-nan", lambda: probes.fit_linear_regressor(torch.ones(4, 2), torch.ones(4), ridge=nan), ValueError, "ridge"),
        Case("probes-nan-regressor-features", lambda: probes.fit_linear_regressor(torch.full((4, 2), nan), torch.ones(4)), ValueError, "features"),
        Case("probes-nan-regressor-targets", lambda: probes.fit_linear_regressor(torch.ones(4, 2), torch.full((4,), nan)), ValueError, "targets"),
        Case("probes-shape-probe-call", lambda: probes.fit_linear_regressor(torch.rand(4, 2), torch.ones(4))(torch.ones(4, 3)), ValueError, "features"),
        # -- synthetic
        Case("synthetic-size-render", lambda: synthetic.render_scene(synthetic.SceneBuilder().build(), eye4, K, 4, 16), ValueError, "width"),
        Case("synthetic-pose-render", lambda: synthetic.render_scene(synthetic.SceneBuilder().build(), viewmat_with(scale=2.0), K, 16, 16), ValueError, "viewmat"),
        Case("synthetic-range-render-light", lambda: synthetic.render_scene(synthetic.SceneBuilder().build(), eye4, K, 16, 16, light_direction=(0, 0, 0)), ValueError, "light_direction"),
        Case("synthetic-range-render-ambient", lambda: synthetic.render_scene(synthetic.SceneBuilder().build(), eye4, K, 16, 16, ambient=nan), ValueError, "ambient"),
        Case("synthetic-shape-add-center", lambda: synthetic.SceneBuilder().add("box", (0.0, 0.0), (1, 1, 1), synthetic.Texture()), ValueError, "center"),
        Case("synthetic-range-add-half_size", lambda: synthetic.SceneBuilder().add("box", (0, 0, 0), (1, inf, 1), synthetic.Texture()), ValueError, "half_size"),
        Case("synthetic-shape-add-quad", lambda: synthetic.SceneBuilder().add("quad", (0, 0, 0), (1, 1), synthetic.Texture()), ValueError, "half_size"),
        Case("synthetic-pose-add-rotation", lambda: synthetic.SceneBuilder().add("box", (0, 0, 0), (1, 1, 1), synthetic.Texture(), rotation=2 * torch.eye(3)), ValueError, "rotation"),
        Case("synthetic-range-camera-path", lambda: synthetic.room_camera_path(0, 0), ValueError, "num_frames"),
        Case("synthetic-shape-corrupt-image", lambda: synthetic.corrupt_image(torch.rand(4, 8), torch.ones(4, 8), "noise", 1), ValueError, "image"),
        Case("synthetic-shape-corrupt-fog-depth", lambda: synthetic.corrupt_image(torch.rand(3, 4, 8), torch.ones(8, 4), "fog", 1), ValueError, "depth"),
    ]
    return cases


CASES += _foundation_cases()


# ===================================================================================================
# triplane
# ===================================================================================================


def _triplane_cases() -> list[Case]:
    import torch.nn.functional as F

    from minimal3d.triplane import (TriplaneDecoder, TriplaneGenerator, composite, project_onto_planes,
                                    ray_box_intersection, render_triplane, sample_importance, sample_pdf,
                                    sample_triplane, stratified_depths)

    planes = torch.zeros(1, 3, 4, 8, 8)
    origins = torch.tensor([0.0, 0.0, -1.5]).expand(1, 5, 3).clone()
    directions = F.normalize(torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(0)) * 0.2
                             + torch.tensor([0.0, 0.0, 1.0]), dim=-1)
    nan, inf = float("nan"), float("inf")

    def render(**overrides):
        args = dict(planes=planes, decoder=TriplaneDecoder(4), origins=origins, directions=directions,
                    near=1.0, far=2.0, num_samples=4, num_importance=3)
        args.update(overrides)
        return lambda: render_triplane(**args)

    def with_value(tensor, index, value):
        tensor = tensor.clone()
        tensor[index] = value
        return tensor

    cases = [
        # shapes, batch sizes, dtypes, devices
        Case("render: 2 planes", render(planes=torch.zeros(1, 2, 4, 8, 8)), ValueError, "planes"),
        Case("render: planes without batch", render(planes=torch.zeros(3, 4, 8, 8)), ValueError, "planes"),
        Case("render: integer planes", render(planes=torch.zeros(1, 3, 4, 8, 8, dtype=torch.long)), TypeError, "planes"),
        Case("render: float16 planes", render(planes=planes.half()), TypeError, "planes"),
        Case("render: planes not a tensor", render(planes=planes.numpy()), TypeError, "planes"),
        Case("render: decoder not callable", render(decoder=3), TypeError, "decoder"),
        Case("render: decoder returns a wrong shape", render(decoder=lambda f: (f, f)), ValueError, "decoder"),
        Case("render: origins (B, R, 2)", render(origins=torch.zeros(1, 5, 2)), ValueError, "origins"),
        Case("render: origins batch != planes batch", render(origins=origins.expand(2, 5, 3)), ValueError, "origins"),
        Case("render: zero rays", render(origins=origins[:, :0], directions=directions[:, :0]), ValueError, "origins"),
        Case("render: directions of another ray count", render(directions=directions[:, :4]), ValueError, "directions"),
        Case("render: float64 directions", render(directions=directions.double()), TypeError, "directions"),
        Case("render: float64 jitter", render(jitter=torch.zeros(1, 5, 4, dtype=torch.float64)), TypeError, "jitter"),
        Case("render: float64 near tensor", render(near=torch.ones(1, 5, 1, dtype=torch.float64)), TypeError, "near"),
        Case("render: far of the wrong shape", render(far=torch.ones(1, 4)), ValueError, "far"),
        Case("render: jitter of the wrong shape", render(jitter=torch.zeros(1, 5, 3)), ValueError, "jitter"),
        Case("render: importance_u of the wrong shape", render(importance_u=torch.zeros(1, 5, 2)), ValueError, "importance_u"),
        # options
        Case("render: box_size inf", render(box_size=inf), ValueError, "box_size"),
        Case("render: box_size < 0", render(box_size=-1.0), ValueError, "box_size"),
        Case("render: box_size tensor", render(box_size=torch.tensor(1.0)), TypeError, "box_size"),
        Case("render: unknown plane_axes", render(plane_axes="xz"), ValueError, "plane_axes"),
        Case("render: num_samples 1", render(num_samples=1), ValueError, "num_samples"),
        Case("render: num_samples float", render(num_samples=4.0), ValueError, "num_samples"),
        Case("render: num_samples 2 with importance", render(num_samples=2), ValueError, "num_samples"),
        Case("render: num_importance < 0", render(num_importance=-1), ValueError, "num_importance"),
        Case("render: chunk_rays 0", render(chunk_rays=0), ValueError, "chunk_rays"),
        Case("render: fast not a bool", render(fast="yes"), TypeError, "fast"),
        Case("render: white_background not a bool", render(white_background=None), TypeError, "white_background"),
        Case("render: fast=True with direction gradients", render(directions=directions.clone().requires_grad_(), fast=True),
             ValueError, "fast"),
        # values: near / far
        Case("render: near > far", render(near=2.0, far=1.0), ValueError, "near"),
        Case("render: near == far", render(near=1.0, far=1.0), ValueError, "near"),
        Case("render: near < 0", render(near=-0.5), ValueError, "near"),
        Case("render: near nan", render(near=nan), ValueError, "near"),
        Case("render: far inf", render(far=inf), ValueError, "far"),
        Case("render: near tensor >= far", render(near=torch.full((1, 5, 1), 3.0)), ValueError, "near"),
        Case("render: near tensor nan", render(near=with_value(torch.ones(1, 5, 1), (0, 2, 0), nan)), ValueError, "near"),
        Case("render: far tensor inf", render(far=with_value(torch.full((1, 5), 2.0), (0, 1), inf)), ValueError, "far"),
        # values: rays, jitter, importance_u
        Case("render: nan origin", render(origins=with_value(origins, (0, 1, 2), nan)), ValueError, "origins"),
        Case("render: inf origin", render(origins=with_value(origins, (0, 1, 0), inf)), ValueError, "origins"),
        Case("render: zero direction", render(directions=with_value(directions, (0, 3), 0.0)), ValueError, "directions"),
        Case("render: non-unit directions", render(directions=directions * 2), ValueError, "directions"),
        Case("render: nan direction", render(directions=with_value(directions, (0, 0, 1), nan)), ValueError, "directions"),
        Case("render: jitter 1", render(jitter=torch.ones(1, 5, 4)), ValueError, "jitter"),
        Case("render: jitter < 0", render(jitter=torch.full((1, 5, 4), -0.1)), ValueError, "jitter"),
        Case("render: jitter nan", render(jitter=torch.full((), nan)), ValueError, "jitter"),
        Case("render: importance_u 1.5", render(importance_u=torch.full((1, 5, 3), 1.5)), ValueError, "importance_u"),
        Case("render: importance_u nan", render(importance_u=with_value(torch.zeros(1, 5, 3), (0, 0, 0), nan)),
             ValueError, "importance_u"),
        # the building blocks
        Case("sample_triplane: 4 planes", lambda: sample_triplane(torch.zeros(1, 4, 2, 3, 3), torch.zeros(1, 5, 3), 1.0),
             ValueError, "planes"),
        Case("sample_triplane: points (B, M, 2)", lambda: sample_triplane(torch.zeros(1, 3, 2, 3, 3), torch.zeros(1, 5, 2), 1.0),
             ValueError, "points"),
        Case("sample_triplane: points batch", lambda: sample_triplane(torch.zeros(1, 3, 2, 3, 3), torch.zeros(2, 5, 3), 1.0),
             ValueError, "points"),
        Case("sample_triplane: float64 points", lambda: sample_triplane(torch.zeros(1, 3, 2, 3, 3), torch.zeros(1, 5, 3).double(), 1.0),
             TypeError, "points"),
        Case("sample_triplane: box_size nan", lambda: sample_triplane(torch.zeros(1, 3, 2, 3, 3), torch.zeros(1, 5, 3), nan),
             ValueError, "box_size"),
        Case("project_onto_planes: plane_axes", lambda: project_onto_planes(torch.zeros(1, 5, 3), 1.0, "eg3"),
             ValueError, "plane_axes"),
        Case("ray_box_intersection: shapes", lambda: ray_box_intersection(torch.zeros(4, 3), torch.zeros(5, 3), 1.0),
             ValueError, "directions"),
        Case("stratified_depths: 0 samples", lambda: stratified_depths(1.0, 2.0, 0, torch.zeros(4)),
             ValueError, "num_samples"),
        Case("composite: one sample", lambda: composite(torch.zeros(1, 3), torch.zeros(1), torch.zeros(1)),
             ValueError, "colors"),
        Case("composite: raw_sigma shape", lambda: composite(torch.zeros(2, 4, 3), torch.zeros(2, 5), torch.zeros(2, 4)),
             ValueError, "raw_sigma"),
        Case("composite: density_shift nan", lambda: composite(torch.zeros(2, 4, 3), torch.zeros(2, 4), torch.zeros(2, 4),
                                                               density_shift=nan), ValueError, "density_shift"),
        Case("composite: float64 t", lambda: composite(torch.zeros(2, 4, 3), torch.zeros(2, 4), torch.zeros(2, 4).double()),
             TypeError, "t"),
        Case("sample_pdf: bins shape", lambda: sample_pdf(torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2, 3)),
             ValueError, "bins"),
        Case("sample_pdf: u batch", lambda: sample_pdf(torch.zeros(2, 6), torch.zeros(2, 5), torch.zeros(3, 3)),
             ValueError, "u"),
        Case("sample_importance: weights shape", lambda: sample_importance(torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2, 3)),
             ValueError, "weights"),
        Case("TriplaneGenerator: tokens width", lambda: TriplaneGenerator(8, 4, 16, 4, 16, 2, 1)(torch.zeros(1, 3, 7)),
             ValueError, "tokens"),
    ]
    return cases


CASES += _triplane_cases()


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


def _pri3d_cases() -> list[Case]:
    from minimal3d import correspondences as corr
    from minimal3d import point_info_nce as nce
    from minimal3d import sparse_conv as sc

    q, k = torch.randn(4, 3), torch.randn(4, 3)
    nan_q = q.clone()
    nan_q[1, 1] = float("nan")
    depth, K, viewmat = torch.ones(6, 8), torch.tensor([[8.0, 0, 4], [0, 8.0, 3], [0, 0, 1]]), torch.eye(4)
    nan_viewmat = viewmat.clone()
    nan_viewmat[0, 3] = float("nan")
    voxels = torch.tensor([[0, 0, 10], [1, 0, 10]])
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]])
    tensor = sc.SparseTensor(coords, torch.randn(2, 2))
    pred = torch.zeros(1, 1, 4, 4)
    cases = [
        Case("nce_q_ndim", lambda: nce.point_info_nce(q[0], k[0]), ValueError, "(n, D)"),
        Case("nce_batch_mismatch", lambda: nce.point_info_nce(q, k[:3]), ValueError, "same shape"),
        Case("nce_integer", lambda: nce.point_info_nce(q.long(), k.long()), TypeError, "floating"),
        Case("nce_dtype_mismatch", lambda: nce.point_info_nce(q, k.double()), TypeError, "dtype"),
        Case("nce_nan_features", lambda: nce.point_info_nce(nan_q, k), ValueError, "NaN"),
        Case("nce_chunk_size_zero", lambda: nce.point_info_nce(q, k, chunk_size=0), ValueError, "chunk_size"),
        Case("nce_temperature_string", lambda: nce.point_info_nce(q, k, "0.4"), TypeError, "temperature"),
        Case("depth_loss_pred_shape", lambda: nce.depth_loss(pred[:, 0], pred[:, 0]), ValueError, "pred"),
        Case("depth_loss_target_batch", lambda: nce.depth_loss(pred, torch.zeros(2, 4, 4)), ValueError, "target"),
        Case("depth_loss_pred_integer", lambda: nce.depth_loss(pred.long(), pred[:, 0]), TypeError, "pred"),
        Case("depth_loss_invalid_value", lambda: nce.depth_loss(pred, pred[:, 0], None), TypeError, "invalid_value"),
        Case("pix_depth_ndim", lambda: corr.pixel_correspondences(depth[None], depth, K, viewmat, viewmat),
             ValueError, "depth1"),
        Case("pix_depth_integer", lambda: corr.pixel_correspondences(depth, depth.long(), K, viewmat, viewmat),
             ValueError, "depth2"),
        Case("pix_sizes_without_K2", lambda: corr.pixel_correspondences(depth, depth[:5], K, viewmat, viewmat),
             ValueError, "K2"),
        Case("pix_K_shape", lambda: corr.pixel_correspondences(depth, depth, K[:2], viewmat, viewmat), ValueError, "K"),
        Case("pix_zero_focal", lambda: corr.pixel_correspondences(depth, depth, K * 0, viewmat, viewmat),
             ValueError, "K"),
        Case("pix_nan_pose", lambda: corr.pixel_correspondences(depth, depth, K, nan_viewmat, viewmat),
             ValueError, "viewmat1"),
        Case("pix_convention", lambda: corr.pixel_correspondences(depth, depth, K, viewmat, viewmat, 0.05, "x"),
             ValueError, "convention"),
        Case("vox_float_voxels", lambda: corr.voxel_pixel_correspondences(voxels.float(), depth, K, viewmat),
             ValueError, "voxels"),
        Case("voxelize_points_shape", lambda: corr.voxelize_points(torch.zeros(3, 2)), ValueError, "points"),
        Case("voxelize_features_rows", lambda: corr.voxelize_points(torch.zeros(3, 3), 0.1, torch.zeros(2, 1)),
             ValueError, "features"),
        Case("sample_matches_empty", lambda: corr.sample_matches(0, 8), ValueError, "num_matches"),
        Case("overlap_depth_ndim", lambda: corr.pixel_overlap(depth[0], depth, K, viewmat, viewmat),
             ValueError, "depth1"),
        Case("sparse_float_coords", lambda: sc.SparseTensor(coords.float(), torch.randn(2, 2)), ValueError, "coords"),
        Case("sparse_coords_width", lambda: sc.SparseTensor(coords[:, :3], torch.randn(2, 2)), ValueError, "coords"),
        Case("sparse_feats_rows", lambda: sc.SparseTensor(coords, torch.randn(3, 2)), ValueError, "feats"),
        Case("sparse_duplicates", lambda: sc.SparseTensor(coords[[0, 0]], torch.randn(2, 2)), ValueError, "duplicate"),
        Case("sparse_empty", lambda: sc.SparseTensor(coords[:0], torch.randn(0, 2)), ValueError, "coords"),
        Case("sparse_weight_channels", lambda: sc.sparse_conv3d(tensor, torch.randn(27, 3, 4)), ValueError, "C_in"),
        Case("sparse_weight_not_cube", lambda: sc.sparse_conv3d(tensor, torch.randn(26, 2, 4)), ValueError, "K^3"),
        Case("sparse_weight_dtype", lambda: sc.sparse_conv3d(tensor, torch.randn(27, 2, 4).double()),
             ValueError, "weight is torch.float64"),
        Case("sparse_stride_zero", lambda: sc.sparse_conv3d(tensor, torch.randn(27, 2, 4), stride=0),
             ValueError, "stride"),
        Case("sparse_quantize_nan", lambda: sc.sparse_quantize(torch.full((2, 3), float("nan")), 0.1),
             ValueError, "finite"),
        Case("sparse_batch_coordinates_empty", lambda: sc.batch_coordinates([]), ValueError, "coords_list"),
        Case("sparse_conv_module_kernel_zero", lambda: sc.SparseConv3d(2, 4, kernel_size=0), ValueError, "kernel_size"),
        Case("sparse_conv_module_channels", lambda: sc.SparseConv3d(0, 4), ValueError, "in_channels"),
        Case("kernel_offsets_zero", lambda: sc.kernel_offsets(0), ValueError, "kernel_size"),
    ]
    for value in (0.0, -0.4, float("nan"), float("inf")):
        cases.append(Case(f"nce_temperature_{value}", lambda v=value: nce.point_info_nce(q, k, v), ValueError,
                          "temperature"))
        cases.append(Case(f"pix_max_distance_{value}",
                          lambda v=value: corr.pixel_correspondences(depth, depth, K, viewmat, viewmat, v),
                          ValueError, "max_distance"))
        cases.append(Case(f"vox_voxel_size_{value}",
                          lambda v=value: corr.voxel_pixel_correspondences(voxels, depth, K, viewmat, v),
                          ValueError, "voxel_size"))
        cases.append(Case(f"vox_depth_tolerance_{value}",
                          lambda v=value: corr.voxel_pixel_correspondences(voxels, depth, K, viewmat, 0.1, v),
                          ValueError, "max_depth_diff"))
        cases.append(Case(f"voxelize_voxel_size_{value}",
                          lambda v=value: corr.voxelize_points(torch.zeros(3, 3), v), ValueError, "voxel_size"))
        cases.append(Case(f"sparse_quantize_voxel_size_{value}",
                          lambda v=value: sc.sparse_quantize(torch.zeros(3, 3), v), ValueError, "voxel_size"))
    return cases


CASES += _pri3d_cases()


# ===================================================================================================
# vmf_contrast, neural_mesh
# ===================================================================================================


def _compnet_case():
    import torch.nn.functional as F

    from minimal3d.vmf_contrast import VertexMemory

    g = torch.Generator().manual_seed(0)
    memory = VertexMemory([4, 3], dim=4, num_background=2, generator=g)
    features = F.normalize(torch.randn(2, 4, 4, generator=g), dim=-1)
    return dict(vertex_features=features, keypoints=torch.rand(2, 4, 2, generator=g) * 10,
                visible=torch.ones(2, 4), labels=torch.tensor([0, 1]), memory=memory)


def _contrast(**changes):
    from minimal3d.vmf_contrast import grouped_vmf_contrast

    return lambda: grouped_vmf_contrast(**{**_compnet_case(), **changes})


def _memory(**kwargs):
    from minimal3d.vmf_contrast import VertexMemory

    return lambda: VertexMemory(**{**dict(num_vertices=[4, 3], dim=4, num_background=2), **kwargs})


def _update(**changes):
    def call():
        case = {**_compnet_case(), **changes}
        background = changes.get("background_features", torch.randn(2, 1, 4))
        case["memory"].update(case["vertex_features"], case["visible"], case["labels"], background)
    return call


def _pose(**changes):
    from minimal3d.cameras import intrinsics
    from minimal3d.neural_mesh import cuboid_mesh, estimate_pose
    from minimal3d.vmf_contrast import VertexMemory

    def call():
        mesh = cuboid_mesh(torch.tensor([[-1.0, 1.0], [-0.5, 0.5], [-0.4, 0.4]]), 20)
        memory = VertexMemory([mesh.vertices.shape[0]], dim=4, num_background=2)
        args = dict(feature_map=torch.nn.functional.normalize(torch.randn(4, 6, 6), dim=0), meshes=[mesh],
                    memory=memory, K=intrinsics(8.0, 8.0, 3.0, 3.0), steps=1)
        estimate_pose(**{**args, **changes})
    return call


CASES += [
    Case("contrast temperature nan", _contrast(temperature=float("nan")), ValueError, "temperature"),
    Case("contrast temperature 0", _contrast(temperature=0.0), ValueError, "temperature"),
    Case("contrast background_weight nan", _contrast(background_weight=float("nan")), ValueError, "background_weight"),
    Case("contrast background_weight inf", _contrast(background_weight=float("inf")), ValueError, "background_weight"),
    Case("contrast distance_threshold nan", _contrast(distance_threshold=float("nan")), ValueError, "distance_threshold"),
    Case("contrast num_sampled 0", _contrast(num_sampled=0), ValueError, "num_sampled"),
    Case("contrast num_sampled float", _contrast(num_sampled=2.5), ValueError, "num_sampled"),
    Case("contrast form", _contrast(form="single"), ValueError, "form"),
    Case("contrast cross_class_scale", _contrast(cross_class_scale="k"), ValueError, "cross_class_scale"),
    Case("contrast labels out of range", _contrast(labels=torch.tensor([0, 2])), ValueError, "labels"),
    Case("contrast labels negative", _contrast(labels=torch.tensor([-1, 0])), ValueError, "labels"),
    Case("contrast labels float", _contrast(labels=torch.tensor([0.0, 1.0])), ValueError, "labels"),
    Case("contrast labels batch", _contrast(labels=torch.tensor([0])), ValueError, "labels"),
    Case("contrast visible shape", _contrast(visible=torch.ones(2, 3)), ValueError, "visible"),
    Case("contrast keypoints shape", _contrast(keypoints=torch.zeros(2, 4)), ValueError, "keypoints"),
    Case("contrast features dim", _contrast(vertex_features=torch.zeros(2, 4, 3)), ValueError, "vertex_features"),
    Case("contrast features int", _contrast(vertex_features=torch.zeros(2, 4, 4, dtype=torch.long)), TypeError,
         "vertex_features"),
    Case("contrast features not unit", _contrast(vertex_features=torch.ones(2, 4, 4)), ValueError, "vertex_features"),
    Case("contrast features nan visible", _contrast(vertex_features=torch.full((2, 4, 4), float("nan"))), ValueError,
         "vertex_features"),
    Case("contrast too few slots", _contrast(vertex_features=torch.ones(2, 2, 4) / 2, keypoints=torch.zeros(2, 2, 2),
                                             visible=torch.ones(2, 2)), ValueError, "slots"),
    Case("contrast omega shape", _contrast(omega=torch.ones(3, 3)), ValueError, "omega"),
    Case("contrast omega nan", _contrast(omega=torch.full((2, 2), float("nan"))), ValueError, "omega"),
    Case("contrast omega negative", _contrast(omega=-torch.ones(2, 2)), ValueError, "omega"),
    Case("memory nan init", _memory(vertices=torch.full((7, 4), float("nan"))), ValueError, "vertices"),
    Case("memory zero row init", _memory(background=torch.zeros(2, 4)), ValueError, "background"),
    Case("memory init shape", _memory(vertices=torch.ones(6, 4)), ValueError, "vertices"),
    Case("memory momentum nan", _memory(momentum=float("nan")), ValueError, "momentum"),
    Case("memory momentum > 1", _memory(momentum=1.5), ValueError, "momentum"),
    Case("memory no classes", _memory(num_vertices=[]), ValueError, "num_vertices"),
    Case("memory zero vertices", _memory(num_vertices=[4, 0]), ValueError, "num_vertices"),
    Case("memory dim 0", _memory(dim=0), ValueError, "dim"),
    Case("memory num_background 0", _memory(num_background=0), ValueError, "num_background"),
    Case("update labels out of range", _update(labels=torch.tensor([0, 5])), ValueError, "labels"),
    Case("update background shape", _update(background_features=torch.zeros(2, 4)), ValueError, "background_features"),
    Case("update background dim", _update(background_features=torch.zeros(2, 1, 3)), ValueError, "background_features"),
    Case("pose feature_map dim", _pose(feature_map=torch.zeros(3, 6, 6)), ValueError, "feature_map"),
    Case("pose meshes count", _pose(meshes=[]), ValueError, "meshes"),
    Case("pose K shape", _pose(K=torch.eye(2)), ValueError, "K"),
    Case("pose steps negative", _pose(steps=-1), ValueError, "steps"),
    Case("pose lr nan", _pose(lr=float("nan")), ValueError, "lr"),
    Case("pose distance 0", _pose(distance=0.0), ValueError, "distance"),
    Case("pose candidates out of range", _pose(candidates=[3]), ValueError, "candidates"),
    Case("pose top_k 0", _pose(top_k=0), ValueError, "top_k"),
    Case("confusion_weights normalize", lambda: __import__("minimal3d.vmf_contrast", fromlist=["x"]).confusion_weights(
        torch.eye(2), normalize="sum"), ValueError, "normalize"),
    Case("confusion_weights nan", lambda: __import__("minimal3d.vmf_contrast", fromlist=["x"]).confusion_weights(
        torch.full((2, 2), float("nan"))), ValueError, "confusion"),
    Case("confusion_weights images_per_class", lambda: __import__("minimal3d.vmf_contrast", fromlist=["x"])
         .confusion_weights(torch.eye(2), images_per_class=torch.ones(3)), ValueError, "images_per_class"),
    Case("pairwise_confusion scores", lambda: __import__("minimal3d.vmf_contrast", fromlist=["x"]).pairwise_confusion(
        torch.rand(4, 2), torch.zeros(4, dtype=torch.long), 3), ValueError, "scores"),
    Case("pairwise_confusion labels", lambda: __import__("minimal3d.vmf_contrast", fromlist=["x"]).pairwise_confusion(
        torch.rand(4, 3), torch.zeros(5, dtype=torch.long), 3), ValueError, "labels"),
    Case("pairwise_confusion label range", lambda: __import__("minimal3d.vmf_contrast", fromlist=["x"])
         .pairwise_confusion(torch.rand(2, 3), torch.tensor([0, 3]), 3), ValueError, "labels"),
    Case("imagenet_c kind", lambda: __import__("minimal3d.synthetic", fromlist=["x"]).imagenet_c(
        torch.rand(3, 8, 8), "rain"), ValueError, "corruption"),
    Case("imagenet_c severity", lambda: __import__("minimal3d.synthetic", fromlist=["x"]).imagenet_c(
        torch.rand(3, 8, 8), "fog", 6), ValueError, "severity"),
    Case("paste_occluders fraction", lambda: __import__("minimal3d.synthetic", fromlist=["x"]).paste_occluders(
        torch.rand(3, 8, 8), torch.ones(8, 8, dtype=torch.bool), 1.5, 0.3), ValueError, "object_fraction"),
    Case("paste_occluders mask shape", lambda: __import__("minimal3d.synthetic", fromlist=["x"]).paste_occluders(
        torch.rand(3, 8, 8), torch.ones(4, 8, dtype=torch.bool), 0.1, 0.3), ValueError, "object_mask"),
    Case("paste_occluders cutout shape", lambda: __import__("minimal3d.synthetic", fromlist=["x"]).paste_occluders(
        torch.rand(3, 8, 8), torch.ones(8, 8, dtype=torch.bool), 0.1, 0.3,
        cutouts=[(torch.rand(3, 4, 4), torch.ones(4, 5, dtype=torch.bool))]), ValueError, "cutouts"),
    Case("paste_occluders empty cutout", lambda: __import__("minimal3d.synthetic", fromlist=["x"]).paste_occluders(
        torch.rand(3, 8, 8), torch.ones(8, 8, dtype=torch.bool), 0.1, 0.3,
        cutouts=[(torch.rand(3, 4, 4), torch.zeros(4, 4, dtype=torch.bool))]), ValueError, "empty mask"),
    Case("object_sample clutter classes", lambda: __import__("minimal3d.synthetic", fromlist=["x"]).object_sample(
        0, height=16, width=16, clutter_classes=[]), ValueError, "clutter_classes"),
    Case("object_sample clutter class range", lambda: __import__("minimal3d.synthetic", fromlist=["x"]).object_sample(
        0, height=16, width=16, clutter_classes=[-1]), ValueError, "class_index"),
    Case("object_cutouts no classes", lambda: __import__("minimal3d.synthetic", fromlist=["x"]).object_cutouts([]),
         ValueError, "classes"),
    Case("object_cutouts class range", lambda: __import__("minimal3d.synthetic", fromlist=["x"]).object_cutouts(
        [5000]), ValueError, "class_index"),
]


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
