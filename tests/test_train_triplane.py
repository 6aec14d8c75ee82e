"""train_triplane.py: the --quick run in process (claims table, files), the evaluation helpers on tiny
hand-made folders, the shape-bias definition, and flag rejection."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minimal3d import runtime, synthetic, vit
from minimal3d.probes import shape_bias
from train_scripts import load_script


script = load_script("train_triplane")


def write_png(path: Path, value: float, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), int(value * 255), dtype=np.uint8)).save(path)


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def test_quick_run_writes_claims_metrics_and_files(tmp_path, capsys):
    metrics = script.main(["--quick", "--out", str(tmp_path), "--seed", "3"])
    assert "training a random" in capsys.readouterr().out  # no --weights: the 2D teacher is trained here
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["claims"] == json.loads(json.dumps(metrics["claims"]))
    claims = {row["metric"]: row for row in written["claims"]}
    assert set(claims) == {"shape_bias", "depth_rmse"}
    assert claims["shape_bias"]["higher_is_better"] and not claims["depth_rmse"]["higher_is_better"]
    for row in claims.values():
        assert (row["baseline"]["name"], row["method"]["name"]) == ("2D teacher", "3D prior")
        assert math.isfinite(row["baseline"]["value"]) and math.isfinite(row["method"]["value"])
    for backbone in ("2D teacher", "3D prior"):
        values = written["eval"][backbone]
        assert {"accuracy_test", "accuracy_ood", "shape_bias", "depth_rmse", "depth_absrel", "cue_shape_decodability",
                "cue_texture_decodability"} <= set(values)
        assert all(math.isfinite(v) for v in values.values())
        assert 0 <= values["accuracy_test"] <= 1 and 0 <= values["shape_bias"] <= 1 and values["depth_rmse"] > 0
    assert written["eval"]["2D teacher"]["shape_bias"] == claims["shape_bias"]["baseline"]["value"]
    assert {"image", "depth", "distill", "density"} <= set(written["train_losses_last"])
    assert 0 < written["depth_unit_metres"] < 1  # the default depth unit: the training depth's spread (m)
    for stage in ("after_warmup", "after_3d_prior"):  # does Φ read h: each image's render vs the mean render
        assert all(math.isfinite(v) and v > 0 for v in written["decoder_reads_h"][stage].values())
    assert written["config"]["steps"] == 3 and written["config"]["seed"] == 3
    assert Image.open(tmp_path / "preview_test.png").size[1] >= 2 * 256  # two rows of panels >= 256 px
    checkpoint = runtime.load_checkpoint(tmp_path / "triplane.pt", ("config", "student", "prior", "teacher"))
    assert checkpoint["config"]["out"] == str(tmp_path)
    student, teacher = vit.load_dinov2(tmp_path / "backbone_dinov2.pth"), vit.load_dinov2(tmp_path / "teacher_dinov2.pth")
    moved = max((a - b).abs().max().item() for a, b in zip(student.parameters(), teacher.parameters()))
    assert moved > 0  # the 3D prior changed the backbone


def test_quick_never_overrides_explicit_flags():
    args = script.parse_args(["--quick", "--steps", "7", "--render-size", "16"])
    assert args.steps == 7 and args.render_size == 16
    assert args.batch_size == script.PROFILES["quick"]["batch_size"]
    assert script.parse_args([]).steps == script.PROFILES["normal"]["steps"]


def test_from_scratch_uses_only_image_and_depth_losses(tmp_path):
    metrics = script.main(["--quick", "--out", str(tmp_path), "--from-scratch", "--steps", "1",
                           "--pretrain-steps", "1"])
    assert set(metrics["train_losses_last"]) == {"total", "image", "depth", "opacity"}  # opacity: a diagnostic


def test_depth_term_in_units_of_the_depth_spread():
    torch.manual_seed(0)
    depth = 2.5 + 0.3 * torch.rand(3, 8, 8)
    depth[0, :2] = 0.0  # no depth: left out of the spread
    cfg = script.parse_args(["--quick"])
    valid = depth[depth > 0].double()
    expected = math.sqrt(((valid - valid.mean()) ** 2).sum().item() / (len(valid) - 1))
    assert script.depth_spread(depth, cfg) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="depth-unit"):
        script.depth_spread(torch.zeros(2, 4, 4), cfg)
    # the depth term in spread units is the metre MSE over pixels with depth divided by spread^2
    cfg = script.parse_args(["--quick", "--render-size", "8", "--image-size", "28"])
    torch.manual_seed(1)
    prior = script.Prior3D(4 * 64, 2, 8, 8, 8, 4, 32, 1, True, 8, 4, use_triplane=False)
    student = script.Representation(vit.build_backbone(None, "vit_tiny", **script.QUICK_VIT))
    images = torch.rand(2, 3, 28, 28)
    depth = 2.4 + 0.5 * torch.rand(2, 28, 28)
    with torch.no_grad():
        _, metres, out = script.losses(prior, student, None, images, depth, cfg)
        _, spread, _ = script.losses(prior, student, None, images, depth, cfg, depth_unit=0.25)
    assert metres["depth"].item() == pytest.approx((out["depth_z"] - out["target_z"]).square().mean().item(), rel=1e-5)
    assert spread["depth"].item() == pytest.approx(metres["depth"].item() / 0.25 ** 2, rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, flag", [
    (["--steps", "0"], "--steps"), (["--steps", "-1"], "--steps"), (["--batch-size", "0"], "--batch-size"),
    (["--image-size", "50"], "--image-size"), (["--render-size", "-4"], "--render-size"),
    (["--pretrain-steps", "-1"], "--pretrain-steps"), (["--warmup-steps", "-1"], "--warmup-steps"), (["--plane-res", "24", "--embed-res", "8"], "--plane-res"),
    (["--num-classes", "9"], "--num-classes"), (["--texture-agreement", "1.5"], "--texture-agreement"),
    (["--lr", "0"], "--lr"), (["--w-depth", "-1"], "--w-depth"), (["--weights", "/no/such.pth"], "--weights"),
    (["--eval-data", "nameless"], "--eval-data"), (["--eval-data", "a=/no/such/dir"], "--eval-data"),
    (["--data", "/no/such/dir"], "--data"), (["--decoder-lr", "-1"], "--decoder-lr"),
    (["--cue-conflict-images", "0"], "--cue-conflict-images"), (["--depth-unit", "inch"], "--depth-unit"),
    (["--clip-grad", "-1"], "--clip-grad"), (["--depth-weighting", "alpha"], "--depth-weighting"), (["--samples", "2"], "--samples"), (["--chunk-rays", "0"], "--chunk-rays"),
])
def test_nonsense_flags_are_rejected_before_work(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        script.parse_args(argv)
    assert info.value.code == 2
    assert flag in capsys.readouterr().err


def test_weights_that_are_not_a_dinov2_checkpoint_fail_before_work(tmp_path):
    (tmp_path / "bad.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="--weights.*not a valid checkpoint"):
        script.main(["--quick", "--weights", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "out")])
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="--weights"):
        script.main(["--quick", "--weights", str(tmp_path / "other.pth"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_eval_data_pairs(tmp_path):
    (tmp_path / "r").mkdir()
    assert script.parse_eval_data([f"imagenet_r={tmp_path / 'r'}"]) == {"imagenet_r": tmp_path / "r"}
    with pytest.raises(ValueError, match="unique"):
        script.parse_eval_data([f"a={tmp_path / 'r'}", f"a={tmp_path / 'r'}"])


# ---------------------------------------------------------------------------------------------------
# Shape bias and evaluation folders
# ---------------------------------------------------------------------------------------------------


def test_shape_bias_geirhos_definition():
    shape = torch.tensor([0, 1, 2, 0, 1, 2])
    texture = torch.tensor([1, 2, 0, 2, 1, 1])  # image 4 has shape == texture: left out
    predictions = torch.tensor([0, 2, 2, 1, 0, 1])
    # conflicting images 0, 1, 2, 3, 5: shape hits at 0 and 2, texture hits at 1 and 5, image 3 neither
    result = shape_bias(predictions, shape, texture)
    assert result["shape_bias"] == pytest.approx(2 / 4)
    assert result["shape_fraction"] == pytest.approx(2 / 5) and result["texture_fraction"] == pytest.approx(2 / 5)
    assert result["conflicting_images"] == 5
    assert shape_bias(shape, shape, texture)["shape_bias"] == 1.0
    assert math.isnan(shape_bias(torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))["shape_bias"])
    with pytest.raises(ValueError, match="predictions"):
        shape_bias(torch.zeros(3), shape[:3], texture[:3])
    with pytest.raises(ValueError, match="same length"):
        shape_bias(shape[:2], shape, texture)


def test_class_and_cue_conflict_folders(tmp_path):
    classes = ["cat", "cat_big", "dog"]
    write_png(tmp_path / "eval" / "dog" / "a.png", 0.2)
    write_png(tmp_path / "eval" / "cat_big" / "b.jpg", 0.8)
    split, names = script.read_class_folder(tmp_path / "eval", 14, classes)
    assert names == classes and split["images"].shape == (2, 3, 14, 14)
    assert split["labels"].tolist() == [1, 2]  # folders in sorted order, labels from --data's classes
    assert split["images"][0].mean().item() == pytest.approx(204 / 255, abs=1e-6)
    write_png(tmp_path / "cue" / "dog" / "cat_big_0001.png", 0.5)  # longest matching texture class
    write_png(tmp_path / "cue" / "cat" / "dog_x.png", 0.5)
    cue = script.read_cue_conflict_folder(tmp_path / "cue", 14, classes)
    assert cue["labels"].tolist() == [0, 2] and cue["texture_labels"].tolist() == [2, 1]
    write_png(tmp_path / "bad" / "horse" / "a.png", 0.5)
    with pytest.raises(ValueError, match="horse"):
        script.read_class_folder(tmp_path / "bad", 14, classes)
    write_png(tmp_path / "cue2" / "dog" / "plain.png", 0.5)
    with pytest.raises(ValueError, match="texture_class"):
        script.read_cue_conflict_folder(tmp_path / "cue2", 14, classes)


def test_depth_folder_nyu_layout(tmp_path):
    for part in ("train", "test"):
        write_png(tmp_path / part / "kitchen" / "rgb_00001.jpg", 0.5, size=8)
        Image.fromarray(np.full((8, 8), 2500, dtype=np.uint16)).save(tmp_path / part / "kitchen" / "sync_depth_00001.png")
        write_png(tmp_path / part / "x.png", 0.5, size=8)
        np.save(tmp_path / part / "x.npy", np.full((8, 8), 1.25, dtype=np.float32))
    splits = script.read_depth_folder(tmp_path, 4)
    assert splits["test"]["images"].shape == (2, 3, 4, 4)
    assert sorted(splits["train"]["depth"].flatten().unique().tolist()) == [1.25, 2.5]  # millimetres -> metres
    with pytest.raises(ValueError, match="train"):
        script.read_depth_folder(tmp_path / "train", 4)


def test_cue_decodability_measures_what_the_features_carry():
    torch.manual_seed(0)
    shape, texture = torch.arange(200) % 4, torch.randint(0, 4, (200,))
    features = torch.cat([F.one_hot(texture, 4).double(), 0.1 * torch.randn(200, 6, dtype=torch.float64)], 1)
    assert script.cue_decodability(features, texture, 4) == 1.0  # texture carried: decoded on held-out images
    expected_chance = max(torch.bincount(shape[1::2]).max().item(), torch.bincount(shape[::2]).max().item()) / 100
    assert script.cue_decodability(features, shape, 4) <= expected_chance + 0.1  # shape not carried: about chance


def test_synthetic_world_splits():
    cue = [synthetic.shape_texture_sample(i, "cue_conflict", 16, 5, 0) for i in range(10)]
    assert all(s["label"] != s["texture_label"] for s in cue)
    train = [synthetic.shape_texture_sample(i, "train", 16, 5, 0, texture_agreement=1.0) for i in range(5)]
    assert all(s["label"] == s["texture_label"] for s in train)
    depth = train[0]["depth"]
    assert 2.2 < depth.min() and depth.max() <= 3.1 + 1e-5  # inside the renderer's [near, far]
    with pytest.raises(ValueError, match="split"):
        synthetic.shape_texture_sample(0, "val")
    # untied: the texture class is drawn independently of the shape class, whatever texture_agreement says
    untied = [synthetic.shape_texture_sample(i, "untied", 8, 5, 0, texture_agreement=1.0) for i in range(30)]
    agree = sum(int(s["label"] == s["texture_label"]) for s in untied)
    assert 0 < agree < 20 and len({int(s["texture_label"]) for s in untied}) == 5


def test_prior_images_default_and_data_folder(tmp_path):
    assert script.parse_args([]).prior_images == "untied"  # synthetic: unlabelled images with untied texture
    assert script.parse_args(["--data", str(tmp_path)]).prior_images == "train"  # a folder has its train split
    with pytest.raises(SystemExit):
        script.parse_args(["--data", str(tmp_path), "--prior-images", "untied"])
