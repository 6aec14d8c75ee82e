import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("train_pri3d", ROOT / "train_pri3d.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(ROOT / "train_pri3d.py"), "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    pretrain = metrics["pretrain"]
    assert pretrain["steps"] == 3 and pretrain["pairs"] > 0
    assert all(math.isfinite(v) for v in pretrain["last_loss"].values() if isinstance(v, float))
    rows = metrics["finetune"]
    assert {(row["init"], row["labels"]) for row in rows} == {("scratch", "100%"), ("pri3d", "100%"),
                                                               ("scratch", "20%"), ("pri3d", "20%")}
    assert all(0.0 <= row["mIoU"] <= 1.0 for row in rows)
    for name in ("matches.png", "features.png", "pri3d.pt"):
        assert (out / name).stat().st_size > 0
    assert list(out.glob("segmentation_*.png"))
    assert "mIoU" in result.stdout  # the table


def test_pairs_without_matches_are_skipped_and_counted():
    script = load_script()
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

    script = load_script()
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
                              min_overlap=0.3)
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
                             "--no-finetune", "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert math.isfinite(metrics["pretrain"]["last_loss"]["contrastive"])
