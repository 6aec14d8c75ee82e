import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run(tmp_path):
    script = load_script("train_pri3d")
    out = tmp_path / "run"
    metrics = script.main(["--quick", "--ablations", "--out", str(out), "--seed", "3"])
    written = json.loads((out / "metrics.json").read_text())
    assert written["claims"] == metrics["claims"]
    assert [summary["mode"] for summary in metrics["pretrain"]] == ["view+geo", "view", "geo"]
    for summary in metrics["pretrain"]:
        assert summary["steps"] == 3 and summary["pairs"] > 0
        assert all(math.isfinite(value) for key, value in summary["last_loss"].items() if key != "step")
    rows = {(row["init"], row["labels"]): row for row in metrics["finetune"]}
    names = ("scratch", "Pri3D View+Geo", "Pri3D View", "Pri3D Geo")
    assert set(rows) == {(name, labels) for name in names for labels in ("12%", "100%")
                         if labels == "12%" or name in names[:2]}  # ablations at the small budget only
    assert all(0.0 <= row["mIoU"] <= 1.0 for row in rows.values())
    assert rows[("scratch", "12%")]["frames"] == 1 and rows[("scratch", "100%")]["frames"] == 5
    claims = {claim["metric"]: claim for claim in metrics["claims"]}
    assert set(claims) == {"miou_low_labels", "miou"}
    low = claims["miou_low_labels"]
    assert low["baseline"] == {"name": "scratch", "value": rows[("scratch", "12%")]["mIoU"]}
    assert low["method"] == {"name": "Pri3D View+Geo", "value": rows[("Pri3D View+Geo", "12%")]["mIoU"]}
    assert low["holds"] == (low["method"]["value"] > low["baseline"]["value"])
    assert claims["miou"]["method"]["value"] == rows[("Pri3D View+Geo", "100%")]["mIoU"]
    checkpoint = torch.load(out / "pri3d.pt", weights_only=True)
    assert checkpoint["config"]["out"] == str(out) and checkpoint["mode"] == "view+geo"
    assert "encoder.conv1.weight" in checkpoint["backbone"]
    for name in ("pretrain_view_geo.png", "segmentation_0.png"):
        with Image.open(out / name) as image:
            assert min(image.size) >= 256


def test_imagenet_rows_and_finetune_only(tmp_path):
    """--weights adds 'ImageNet init' and 'Pri3D (from ImageNet)'; 'scratch' stays random init."""
    from minimal3d.resunet import ResUNet

    script = load_script("train_pri3d")
    encoder = ResUNet(18, 32).encoder.state_dict()
    weights = tmp_path / "resnet18.pth"
    torch.save({key: value + 0.01 for key, value in encoder.items()}, weights)  # torchvision key names
    out = tmp_path / "run"
    metrics = script.main(["--quick", "--no-ablations", "--weights", str(weights), "--out", str(out),
                           "--label-fraction", "1"])
    assert [row["init"] for row in metrics["finetune"]] == ["scratch", "ImageNet init", "Pri3D View+Geo (from ImageNet)"]
    assert {(claim["metric"], claim["baseline"]["name"]) for claim in metrics["claims"]} == {
        ("miou_low_labels", "scratch"), ("miou", "scratch"), ("miou_low_labels", "ImageNet init"),
        ("miou", "ImageNet init")}
    again = script.main(["--quick", "--finetune", "--checkpoint", str(out / "pri3d.pt"), "--out", str(tmp_path / "ft"),
                         "--label-fraction", "1"])
    assert [row["init"] for row in again["finetune"]] == ["scratch", "Pri3D View+Geo"]
    assert again["pretrain"] == []


@pytest.mark.parametrize("flags, message", [
    (["--steps", "-1"], "--steps"), (["--steps", "0"], "--steps"), (["--finetune-steps", "0"], "--finetune-steps"),
    (["--label-fraction", "0"], "--label-fraction"), (["--temperature", "nan"], "--temperature"),
    (["--voxel-size", "0"], "--voxel-size"), (["--height", "16"], "--height"), (["--frames", "1"], "--frames"),
    (["--weights", "/nonexistent/resnet18.pth"], "--weights"), (["--finetune"], "--checkpoint"),
    (["--max-distance", "-0.02"], "--max-distance"), (["--batch-size", "0"], "--batch-size"),
])
def test_nonsense_flags_are_refused_before_work(flags, message, capsys):
    script = load_script("train_pri3d")
    with pytest.raises(SystemExit) as info:
        script.parse_args(["--quick", *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_quick_never_overrides_explicit_flags():
    script = load_script("train_pri3d")
    args = script.parse_args(["--quick", "--steps", "7", "--rooms", "2", "--num-matches", "64"])
    assert (args.steps, args.rooms, args.num_matches, args.finetune_steps) == (7, 2, 64, 3)
    paper = script.parse_args([])
    assert (paper.loss, paper.overlap, paper.geo_input, paper.depth_loss) == ("paper", "paper", "occupancy", True)
    assert (paper.max_distance, paper.max_depth_diff, paper.finetune_frame_skip, paper.out) == (
        0.02, 0.02, 100, "runs/pri3d")
    official = script.parse_args(["--thresholds", "official", "--max-distance", "0.03"])
    assert (official.max_distance, official.max_depth_diff) == (0.03, 0.2)


def test_pairs_without_matches_are_skipped_and_counted():
    script = load_script("train_pri3d")
    torch.manual_seed(0)
    features1 = torch.randn(2, 8, 4, 5, requires_grad=True)
    features2 = torch.randn(2, 8, 4, 5)
    empty = torch.zeros(0, 2, dtype=torch.long)
    pos = torch.tensor([[0, 0], [2, 3], [7, 9], [5, 1]])
    matches = [dict(pos1=empty, pos2=empty), dict(pos1=pos, pos2=pos.flip(0))]
    choose = lambda b, kind, n: torch.arange(n)  # noqa: E731
    loss, counts = script.contrastive_loss(features1, features2, matches, "view", 0.4, choose)
    assert counts["skipped_pairs"] == 1 and counts["view_terms"] == 1
    q = script.gather_half_res(features1[1], pos)
    assert torch.equal(q, features1[1][:, [0, 1, 3, 2], [0, 1, 4, 0]].T)  # p // 2
    expected = script.point_info_nce(q, script.gather_half_res(features2[1], pos.flip(0))) / 2  # divisor stays B
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(features1.grad).all()
    loss, counts = script.contrastive_loss(features1, features2, matches[:1], "view", 0.4, choose)
    assert loss.item() == 0.0 and not loss.requires_grad and counts["skipped_pairs"] == 1


def test_scannet_loader_round_trip(tmp_path):
    """Write a tiny ScanNet-style export of a synthetic room and read it back."""
    from minimal3d.correspondences import pixel_correspondences
    from minimal3d.synthetic import room_sequence

    script = load_script("train_pri3d")
    room = room_sequence(3, num_frames=3, height=48, width=64, step_degrees=4.0)
    scene = tmp_path / "scene0000_00"
    for folder in ("color", "depth", "pose", "intrinsic", "label"):
        (scene / folder).mkdir(parents=True)
    for t in range(3):
        frame = t * 25
        Image.fromarray((room["images"][t].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            scene / "color" / f"{frame}.jpg", quality=95)
        depth_mm = (room["depth"][t].numpy() * 1000).round().astype(np.uint16)
        Image.fromarray(depth_mm).save(scene / "depth" / f"{frame}.png")
        np.savetxt(scene / "pose" / f"{frame}.txt", torch.linalg.inv(room["viewmats"][t].double()).numpy())
        Image.fromarray(np.uint8(room["labels"][t].numpy() + 1)).save(scene / "label" / f"{frame}.png")
    intrinsic = np.eye(4)
    intrinsic[:3, :3] = room["K"].numpy()
    intrinsic[:2, 2] -= 0.5  # ScanNet files put pixel centres on integers
    np.savetxt(scene / "intrinsic" / "intrinsic_depth.txt", intrinsic)
    args = argparse.Namespace(height=48, width=64, frame_skip=25, convention="minimal3d", data=str(tmp_path),
                              min_overlap=0.3, overlap="official", max_distance=0.05)
    loaded = script.load_scannet_scene(scene, args)
    torch.testing.assert_close(loaded.K, room["K"], rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded.depth, room["depth"], rtol=0, atol=5e-4)  # mm quantisation
    torch.testing.assert_close(loaded.viewmats, room["viewmats"], rtol=0, atol=1e-5)
    # labels 0..9 were written as NYU40 ids 1..10, which are the first ten benchmark classes
    assert torch.equal(loaded.labels, room["labels"])
    pairs = script.cached_pairs(loaded, args)
    assert (0, 1) in pairs and list((tmp_path / "pri3d_pairs").glob("*.json"))
    assert script.cached_pairs(loaded, args) == pairs  # read back from the cache
    ours = pixel_correspondences(loaded.depth[0], loaded.depth[1], loaded.K, loaded.viewmats[0], loaded.viewmats[1])
    truth = pixel_correspondences(room["depth"][0], room["depth"][1], room["K"], room["viewmats"][0],
                                  room["viewmats"][1])
    overlap = len(set(map(tuple, ours[0].tolist())) & set(map(tuple, truth[0].tolist())))
    assert overlap > 0.95 * len(truth[0])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["view", "geo"])
def test_quick_run_single_prior(tmp_path, mode):
    result = subprocess.run([sys.executable, str(ROOT / "train_pri3d.py"), "--quick", "--mode", mode,
                             "--no-ablations", "--no-finetune", "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert math.isfinite(metrics["pretrain"][0]["last_loss"]["contrastive"])
