import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minimal3d import probes
from train_scripts import load_script


script = load_script("train_gaussian")


# ---------------------------------------------------------------------------------------------------
# the script, in process
# ---------------------------------------------------------------------------------------------------


def test_quick_run_writes_claims_and_files(tmp_path):
    torch.set_num_threads(1)
    metrics = script.main(["--quick", "--out", str(tmp_path)])
    claims = {row["metric"]: row for row in metrics["claims"]}
    assert set(claims) == {"miou", "depth_rmse"}
    assert claims["miou"]["higher_is_better"] and not claims["depth_rmse"]["higher_is_better"]
    for row in claims.values():
        assert row["baseline"]["name"] == "original" and row["method"]["name"] == "[original, fine-tuned]"
        assert math.isfinite(row["baseline"]["value"]) and math.isfinite(row["method"]["value"])
        assert row["holds"] == ((row["method"]["value"] > row["baseline"]["value"]) == row["higher_is_better"])
    assert [row["features"] for row in metrics["probe"]] == ["original", "fine-tuned", "[original, fine-tuned]"]
    for row in metrics["probe"]:
        assert 0.0 <= row["mIoU"] <= 1.0 and row["RMSE"] > 0 and math.isfinite(row["AbsRel"])
    assert metrics["probe"][2]["dim"] == 2 * metrics["probe"][0]["dim"]
    prior = metrics["probe_image_free_prior"]
    assert 0.0 < prior["mIoU"] <= 1.0 and prior["RMSE"] > 0 and prior["AbsRel"] > 0
    assert metrics["lift"][0]["PSNR"] > 5.0 and metrics["finetune"]["steps"] > 0
    assert len(metrics["finetune"]["loss_per_epoch"]) == metrics["config"]["epochs"]
    lifted = {row["features"]: row for row in metrics["lifted_features"]}
    grid = lifted["rendered"]["consistency_patch_grid"]  # a difference of two mean cosines
    assert math.isnan(grid) or -2.0 <= grid <= 2.0
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["claims"] == json.loads(json.dumps(metrics["claims"]))
    for name in ("backbone_original.pth", "backbone_finetuned.pth", "gaussian.pt", "preview.png", "probes.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert min(Image.open(tmp_path / "preview.png").size) >= 256
    checkpoint = torch.load(tmp_path / "gaussian.pt", weights_only=False)
    assert checkpoint["config"]["quick"] and "blocks.0.attn.qkv.weight" in checkpoint["model"]


@pytest.mark.parametrize("flags, name", [(["--steps", "0"], "--steps"), (["--epochs", "-1"], "--epochs"),
                                         (["--height", "8"], "--height"), (["--finetune-lr", "0"], "--finetune-lr"),
                                         (["--weights", "missing.pth"], "--weights"),
                                         (["--probe-pixels", "0"], "--probe-pixels"),
                                         (["--grad-clip", "-1"], "--grad-clip"),
                                         (["--assembly", "mean"], "--assembly"),
                                         (["--class-token", "both"], "--class-token"),
                                         (["--probe-train-frames", "0"], "--probe-train-frames"),
                                         (["--probe-train-scenes", "450", "--probe-test-scenes", "60"],
                                          "--probe-train-scenes"),
                                         (["--pretrain-task", "depth"], "--pretrain-task"),
                                         (["--view-step", "50"], "--view-step"),
                                         (["--finetune-targets", "blurred"], "--finetune-targets")])
def test_nonsense_flags_are_rejected_before_work(flags, name, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        script.main(flags + ["--out", str(tmp_path / "never")])
    assert info.value.code == 2 and name in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_quick_never_overrides_explicit_flags():
    args = script.parse_args(["--quick", "--steps", "7", "--epochs", "3"])
    assert (args.steps, args.epochs) == (7, 3)
    assert args.frames == script.PROFILES["frames"][1]  # unset flags take the quick profile
    assert script.parse_args([]).steps == script.PROFILES["steps"][0]
    assert script.parse_args([]).control and not script.parse_args(["--quick"]).control
    assert script.parse_args(["--quick", "--control"]).control


def test_stage0_pretraining_changes_the_original_and_lowers_its_loss(tmp_path):
    torch.set_num_threads(1)
    args = script.parse_args(["--quick", "--pretrain-steps", "12", "--out", str(tmp_path)])
    torch.manual_seed(0)
    backbone = script.build_backbone(arch=args.arch)
    before = {name: value.clone() for name, value in backbone.state_dict().items()}
    report = script.pretrain_original(backbone, args, torch.device("cpu"), show_progress=False)
    assert report["steps"] == 12 and report["images"] == args.pretrain_rooms * args.pretrain_frames
    assert math.isfinite(report["loss_last"]) and report["loss_last"] < report["loss_first"]
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], backbone.state_dict()["blocks.0.attn.qkv.weight"])
    assert not backbone.training
    args = script.parse_args(["--quick", "--original", "random", "--out", str(tmp_path / "random")])
    (tmp_path / "random").mkdir()
    dist = script.runtime.init_distributed(torch.device("cpu"))
    random_backbone, report = script.original_backbone(args, tmp_path / "random", dist, torch.device("cpu"))
    assert report is None
    torch.manual_seed(args.seed)
    assert torch.equal(random_backbone.pos_embed, script.build_backbone(arch=args.arch).pos_embed)


def test_smoothed_original_targets_are_the_originals_features_blurred_in_2d():
    torch.manual_seed(0)
    args = script.parse_args(["--quick"])
    backbone = script.build_backbone(arch=args.arch).eval()
    scenes = script.synthetic_scenes(range(3, 4), 2, 28, 42)
    samples = [("room00003", 0), ("room00003", 1)]
    targets = script.smoothed_original_targets(scenes, backbone, samples, torch.device("cpu"))
    with torch.no_grad():
        patches = script.vit_features(backbone, scenes["room00003"]["images"])
    assert targets.shape == patches.shape == (2, backbone.embed_dim, 2, 3)
    # 3 x 3 Gaussian of sigma 0.5 patch, replicate padding: centre weight e^0 / (1 + 4 e^-2 + 4 e^-4)
    centre, edge, corner = 1.0, math.exp(-2.0), math.exp(-4.0)
    total = centre + 4 * edge + 4 * corner
    padded = F.pad(patches, (1, 1, 1, 1), mode="replicate")
    expected = sum(padded[..., 1 + dy : 3 + dy, 1 + dx : 4 + dx]
                   * (centre if dy == dx == 0 else edge if dy == 0 or dx == 0 else corner) / total
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    torch.testing.assert_close(targets, expected)
    assert float((targets - patches).abs().mean()) > 0  # the targets differ from the original's own features


def test_stage0_semantic_task_leaves_depth_out_of_the_loss(tmp_path):
    torch.set_num_threads(1)
    first_losses = {}
    for task in ("semantic", "semantic+depth"):
        args = script.parse_args(["--quick", "--pretrain-steps", "1", "--pretrain-task", task, "--out", str(tmp_path)])
        torch.manual_seed(0)
        backbone = script.build_backbone(arch=args.arch)
        first_losses[task] = script.pretrain_original(backbone, args, torch.device("cpu"), False)["loss_first"]
    # same initial weights and batch: the difference is the L1 of the untrained log-depth output, > 0
    assert first_losses["semantic+depth"] > first_losses["semantic"] + 1e-3


def test_probe_test_rooms_do_not_depend_on_the_training_rooms():
    def room_names(train_scenes: int) -> tuple[set, set]:
        args = script.parse_args(["--quick", "--probe-train-scenes", str(train_scenes), "--probe-test-scenes", "2",
                                  "--probe-frames", "2", "--probe-train-frames", "1"])
        train, test = script.synthetic_probe_frames(args)
        assert len(train) == train_scenes and len(test) == 4
        ids = lambda frames: {id(scene) for scene, _ in frames}  # noqa: E731
        assert not ids(train) & ids(test)
        return ({float(scene["images"].sum()) for scene, _ in train}, {float(scene["images"].sum()) for scene, _ in test})
    train_one, test_one = room_names(1)
    train_three, test_three = room_names(3)
    assert test_one == test_three and train_one < train_three and not train_three & test_three


def test_cross_view_consistency_of_surface_features_and_of_noise():
    room = script.room_sequence(3, 4, 36, 48, step_degrees=8.0)
    depths, viewmats, K = room["depth"], room["viewmats"], room["K"].expand(4, 3, 3)
    # a feature that is a function of the 3D point: the same in every view; noise: unrelated between views
    points = script.unproject_depth(depths, viewmats, K)  # (V, H, W, 3)
    surface = torch.cat([torch.sin(3 * points), torch.cos(3 * points)], -1).permute(0, 3, 1, 2)
    noise = torch.randn(surface.shape, generator=torch.Generator().manual_seed(0))
    consistent = script.cross_view_consistency(surface, depths, viewmats, K)
    inconsistent = script.cross_view_consistency(noise, depths, viewmats, K)
    assert consistent > 0.5 and abs(inconsistent) < 0.05
    with pytest.raises(ValueError, match="2 views"):
        script.cross_view_consistency(surface[:1], depths[:1], viewmats[:1], K[:1])


def test_camera_response_is_per_frame_and_seeded():
    images = torch.full((3, 3, 8, 8), 0.5)
    jittered = script.camera_response(images, 1.0, torch.Generator().manual_seed(0))
    again = script.camera_response(images, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(jittered, again) and jittered.min() >= 0 and jittered.max() <= 1
    means = jittered.mean((1, 2, 3))
    assert float(means.max() - means.min()) > 0.01  # frames differ in exposure
    torch.testing.assert_close(script.camera_response(images, 0.0, torch.Generator()), images)


# ---------------------------------------------------------------------------------------------------
# probes with a known answer
# ---------------------------------------------------------------------------------------------------


def test_bilinear_taps_equal_interpolate():
    grid = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    pixels = torch.randperm(11 * 13)[:40]
    indices, weights = probes.bilinear_taps((3, 4), (11, 13), pixels)
    expected = F.interpolate(grid, size=(11, 13), mode="bilinear", align_corners=False).flatten(-2)[..., pixels]
    torch.testing.assert_close((grid.flatten(-2)[..., indices] * weights).sum(-1), expected)


def test_segmentation_head_separates_linearly_separable_patches():
    generator = torch.Generator().manual_seed(0)
    classes = torch.randint(0, 4, (12,), generator=generator)
    classes[:4] = torch.arange(4)
    centres = torch.randn(4, 6, generator=generator) * 3
    features = centres[classes][:, :, None, None] + 0.1 * torch.randn(12, 6, 3, 4, generator=generator)
    labels = classes[:, None, None].expand(12, 14, 16).clone()  # one class per image
    labels[:, 0, 0] = -1  # ignored pixels do not matter
    head = probes.fit_segmentation_head(features[:8], labels[:8], 4, pixels_per_image=50, generator=generator)
    predicted = head.predict(features[8:], (14, 16))
    assert probes.segmentation_metrics(predicted, labels[8:], 4)["mIoU"] == 1.0
    # the logits are upsampled after the linear layer: equal to a linear layer on upsampled features
    up = F.interpolate(features[8:].double(), size=(14, 16), mode="bilinear", align_corners=False)
    manual = torch.einsum("bchw,ck->bkhw", (up - head.mean[:, None, None]) / head.std[:, None, None], head.weight)
    torch.testing.assert_close(head.logits(features[8:], (14, 16)), manual + head.bias[:, None, None])


def test_depth_head_recovers_a_depth_linear_in_the_features():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(40, 4, 4, 5, generator=generator)
    depth_grid = 3.0 + features[:, 0] - 0.5 * features[:, 1]  # linear in the features
    depths = F.interpolate(depth_grid[:, None], size=(12, 15), mode="bilinear", align_corners=False)[:, 0]
    head, _ = probes.fit_depth_head(features[:30], depths[:30], num_bins=64, pixels_per_image=None,
                                    weight_decay=1e-6, generator=generator)
    rmse = probes.depth_metrics(head.predict(features[30:], (12, 15)), depths[30:])["RMSE"]
    spread = float(depths[30:][depths[30:] > 0].std())
    assert rmse < 0.1 * spread  # a constant prediction has RMSE = spread


def test_depth_head_reads_the_class_token():
    generator = torch.Generator().manual_seed(2)
    patches = torch.randn(40, 3, 2, 2, generator=generator)
    tokens = torch.rand(40, 2, generator=generator)
    depths = (1.0 + 3.0 * tokens[:, 0])[:, None, None].expand(40, 6, 6)  # depth is set by the class token
    rmse = {}
    for name, train_tokens, test_tokens in [("with", tokens[:30], tokens[30:]), ("without", None, None)]:
        head, _ = probes.fit_depth_head(patches[:30], depths[:30], train_tokens, num_bins=32, pixels_per_image=None,
                                        weight_decay=1e-6)
        predicted = head.predict(probes.with_class_token(patches[30:], test_tokens), (6, 6))
        rmse[name] = probes.depth_metrics(predicted, depths[30:])["RMSE"]
    assert rmse["with"] < 0.4 * rmse["without"]  # measured 0.27


def patch_head_problem(images: int, seed: int) -> tuple:
    """A float64 patch-head fit: patch features (B, 3, 2, 3) on a 5 x 7 image, class tokens (B, 2), 20 pixels per
    image and their classes in -1..3 (-1 = ignored)."""
    generator = torch.Generator().manual_seed(seed)
    patches = torch.randn(images, 3, 2, 3, generator=generator, dtype=torch.float64)
    tokens = torch.randn(images, 2, generator=generator, dtype=torch.float64)
    pixels = torch.stack([torch.randperm(5 * 7, generator=generator)[:20] for _ in range(images)])
    classes = torch.randint(-1, 4, (images, 20), generator=generator)
    return patches, tokens, pixels, classes


def test_patch_head_with_class_tokens_equals_the_head_on_appended_features():
    # the class token's half computed once per image (fast path) == the token repeated over every patch
    patches, tokens, pixels, classes = patch_head_problem(images=6, seed=3)
    fast = probes._fit_patch_head(patches, (5, 7), pixels, classes, 4, 1e-3, 50, torch.float64, tokens)
    dense = probes._fit_patch_head(probes.with_class_token(patches, tokens), (5, 7), pixels, classes, 4, 1e-3, 50,
                                   torch.float64)
    for a, b in zip(fast, dense):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert float(dense[2].abs().max()) > 0.1  # the heads learnt something


def test_patch_head_chunked_over_images_equals_one_chunk():
    # the loss is a sum over images: computed and differentiated chunk by chunk == over the whole batch at once
    patches, tokens, pixels, classes = patch_head_problem(images=7, seed=5)
    for class_tokens in (None, tokens):
        whole = probes._fit_patch_head(patches, (5, 7), pixels, classes, 4, 1e-3, 50, torch.float64, class_tokens,
                                       pixels_per_chunk=7 * 20)
        for pixels_per_chunk in (1, 40):  # one image per chunk; chunks of 2 images and a last one of 1
            chunked = probes._fit_patch_head(patches, (5, 7), pixels, classes, 4, 1e-3, 50, torch.float64,
                                             class_tokens, pixels_per_chunk=pixels_per_chunk)
            for a, b in zip(whole, chunked):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert float(whole[2].abs().max()) > 0.1  # the heads learnt something


def test_image_free_prior_is_the_per_pixel_mode_and_mean_of_the_training_frames():
    generator = torch.Generator().manual_seed(0)
    num_classes, ignore = 4, script.IGNORE
    labels = torch.randint(0, num_classes, (5, 2, 3), generator=generator)
    labels[:, 0, 0] = ignore  # a position never labelled: the overall mode
    labels[1:, 1, 2] = ignore
    depths = torch.rand(5, 2, 3, generator=generator) * 4 + 0.5
    depths[:, 1, 1] = 0.0  # never observed: the overall mean
    depths[2, 0, 1] = float("nan")
    test_labels = torch.randint(0, num_classes, (3, 2, 3), generator=generator)
    test_depths = torch.rand(3, 2, 3, generator=generator) * 4 + 0.5
    overall = [int((labels == c).sum()) for c in range(num_classes)]
    valid_depths = [float(d) for d in depths.flatten() if math.isfinite(d) and d > 0]
    mode, mean = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)
    for y in range(2):
        for x in range(3):
            counts = [sum(int(labels[f, y, x]) == c for f in range(5)) for c in range(num_classes)]
            counts = counts if sum(counts) else overall
            mode[y, x] = max(range(num_classes), key=lambda c: (counts[c], -c))
            seen = [float(depths[f, y, x]) for f in range(5) if math.isfinite(depths[f, y, x]) and depths[f, y, x] > 0]
            mean[y, x] = sum(seen) / len(seen) if seen else sum(valid_depths) / len(valid_depths)
    prior = script.image_free_prior(labels, depths, test_labels, test_depths, num_classes)
    expected = {**probes.segmentation_metrics(mode.expand(3, -1, -1), test_labels, num_classes, ignore),
                **probes.depth_metrics(mean.expand(3, -1, -1), test_depths)}
    assert prior.keys() == expected.keys()
    for key in expected:
        assert prior[key] == pytest.approx(expected[key], rel=1e-6), key
    assert script.image_free_prior(None, depths, None, test_depths, num_classes).keys() == {"RMSE", "AbsRel"}


def test_assembly_combines_patches_and_keeps_the_original_class_token():
    generator = torch.Generator().manual_seed(4)
    original = (torch.randn(2, 3, 2, 2, generator=generator), torch.randn(2, 3, generator=generator))
    other = (torch.randn(2, 3, 2, 2, generator=generator), torch.randn(2, 3, generator=generator))
    patches, tokens = script.assemble(original, other, "concat")
    torch.testing.assert_close(patches, torch.cat([original[0], other[0]], 1))
    torch.testing.assert_close(tokens, original[1])  # official FiT3D model: patch features only are assembled
    patches, tokens = script.assemble(original, other, "add", class_token="assembled")
    torch.testing.assert_close(patches, original[0] + other[0])
    torch.testing.assert_close(tokens, original[1] + other[1])
    fusion = torch.randn(6, 3, generator=generator)
    patches, tokens = script.assemble(original, other, "linear", fusion, class_token="assembled")
    torch.testing.assert_close(patches, torch.einsum("bchw,cd->bdhw", torch.cat([original[0], other[0]], 1), fusion))
    torch.testing.assert_close(tokens, torch.cat([original[1], other[1]], 1) @ fusion)


def test_probe_heads_name_bad_arguments():
    with pytest.raises(ValueError, match="labels"):
        probes.fit_segmentation_head(torch.zeros(2, 3, 2, 2), torch.full((2, 4, 4), 7), 3)
    with pytest.raises(ValueError, match="depths"):
        probes.fit_depth_head(torch.zeros(2, 3, 2, 2), torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="num_bins"):
        probes.fit_depth_head(torch.zeros(2, 3, 2, 2), torch.ones(2, 4, 4), num_bins=1)
    with pytest.raises(ValueError, match="depth > 0"):
        probes.fit_depth_head(torch.zeros(2, 3, 2, 2), torch.zeros(2, 4, 4))


# ---------------------------------------------------------------------------------------------------
# real-data labels
# ---------------------------------------------------------------------------------------------------


def write_scannet_scene(root: Path, with_tsv: bool = True) -> None:
    scene = root / "scene0000_00"
    for folder in ("color", "depth", "pose", "intrinsic", "label-filt"):
        (scene / folder).mkdir(parents=True)
    np.savetxt(scene / "intrinsic" / "intrinsic_color.txt", np.array([[20, 0, 16, 0], [0, 20, 12, 0],
                                                                       [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float))
    for frame in range(2):
        Image.fromarray(np.full((24, 32, 3), 100 + frame, np.uint8)).save(scene / "color" / f"{frame}.jpg")
        Image.fromarray(np.full((24, 32), 1500, np.uint16)).save(scene / "depth" / f"{frame}.png")
        np.savetxt(scene / "pose" / f"{frame}.txt", np.eye(4))
        ids = np.zeros((12, 16), np.uint16)  # label maps are smaller than colour in ScanNet
        ids[:, :8] = 3  # ScanNet id 3 -> nyu40 5 (chair) -> ScanNet-20 index 4
        ids[:6, 8:] = 40  # nyu40 7 (table) -> index 6
        ids[6:, 8:] = 2  # nyu40 0: not a benchmark class -> ignored
        Image.fromarray(ids).save(scene / "label-filt" / f"{frame}.png")
    if with_tsv:
        (root / "scannetv2-labels.combined.tsv").write_text(
            "id\traw_category\tcategory\tcount\tnyu40id\n3\tchair\tchair\t1\t5\n40\ttable\ttable\t1\t7\n2\tx\tx\t1\t\n")


def test_scannet_label_filt_maps_to_the_20_benchmark_classes(tmp_path):
    write_scannet_scene(tmp_path)
    args = script.parse_args(["--data", str(tmp_path), "--height", "24", "--width", "32", "--frames", "2"])
    scenes, class_names = script.load_real_scenes(tmp_path, args)
    labels = scenes["scene0000_00"]["labels"]
    assert labels.shape == (2, 24, 32) and class_names[4] == "chair" and class_names[6] == "table"
    assert (labels[:, :, :16] == 4).all() and (labels[:, :12, 16:] == 6).all()
    assert (labels[:, 12:, 16:] == script.IGNORE).all()
    torch.testing.assert_close(scenes["scene0000_00"]["depths"], torch.full((2, 24, 32), 1.5))


def test_label_filt_without_the_class_table_names_the_flag(tmp_path):
    write_scannet_scene(tmp_path, with_tsv=False)
    args = script.parse_args(["--data", str(tmp_path), "--height", "24", "--width", "32"])
    with pytest.raises(ValueError, match="--label-map"):
        script.load_real_scenes(tmp_path, args)


def test_index_labels_with_classes_txt(tmp_path):
    (tmp_path / "classes.txt").write_text("floor\nwall\nchair\n")
    ids = np.array([[0, 1], [2, 255]], np.uint8)
    Image.fromarray(ids).save(tmp_path / "0.png")
    lookup = script.index_label_lookup(3)
    labels = script.read_label_png(tmp_path / "0.png", lookup, (2, 2))
    assert labels.tolist() == [[0, 1], [2, script.IGNORE]]


def test_quick_run_on_a_scannet_layout_uses_label_filt(tmp_path):
    torch.set_num_threads(1)
    data = tmp_path / "data"
    write_scannet_scene(data)
    metrics = script.main(["--quick", "--data", str(data), "--out", str(tmp_path / "run"), "--height", "24",
                           "--width", "32", "--frames", "2", "--test-every", "2", "--no-control"])
    assert {row["metric"] for row in metrics["claims"]} == {"miou", "depth_rmse"}
    assert all(0.0 <= row["mIoU"] <= 1.0 and math.isfinite(row["RMSE"]) for row in metrics["probe"])


def test_real_data_without_held_out_views_is_refused(tmp_path):
    write_scannet_scene(tmp_path / "data")
    with pytest.raises(ValueError, match="--test-every"):
        script.main(["--quick", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--frames", "2"])
