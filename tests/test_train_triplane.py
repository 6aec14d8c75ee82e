"""Smoke test: train_triplane.py --quick runs end to end and writes a loadable backbone, previews, metrics."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from minimal3d import vit

ROOT = Path(__file__).resolve().parents[1]


def test_train_triplane_quick(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "train_triplane.py"), "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "plain 2D supervision" in result.stdout  # no --weights: the 2D teacher is pretrained and says so
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for backbone in ("teacher_2d", "prior_3d"):
        values = metrics["eval"][backbone]
        assert set(values) == {"accuracy_test", "accuracy_test_swap", "depth_probe_RMSE"}
        assert all(math.isfinite(v) for v in values.values())
        assert 0.0 <= values["accuracy_test"] <= 1.0 and values["depth_probe_RMSE"] > 0
    losses = metrics["train_losses_last"]
    assert {"image", "depth", "distill", "density"} <= set(losses) and all(math.isfinite(v) for v in losses.values())
    assert list(tmp_path.glob("preview_*.png"))
    backbone = vit.load_dinov2(tmp_path / "backbone_dinov2.pth")  # DINOv2 key layout, loads strictly
    teacher = vit.load_dinov2(tmp_path / "teacher_dinov2.pth")
    moved = [(a - b).abs().max().item() for a, b in zip(backbone.parameters(), teacher.parameters())]
    assert max(moved) > 0  # the 3D prior changed the backbone
