import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_gaussian_quick_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "train_gaussian.py"), "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["lift"]) == 1
    for row in metrics["lift"]:
        assert math.isfinite(row["PSNR"]) and row["PSNR"] > 5.0
        assert math.isfinite(row["feature_L1"]) and row["gaussians"] > 0
    assert metrics["finetune"]["steps"] > 0 and math.isfinite(metrics["finetune"]["loss_last"])
    assert [row["features"] for row in metrics["probe"]] == ["original", "fine-tuned", "[original, fine-tuned]"]
    for row in metrics["probe"]:
        for key in ("mIoU", "mAcc", "aAcc", "RMSE", "AbsRel"):
            assert math.isfinite(row[key]), key
        assert 0.0 <= row["mIoU"] <= 1.0
    assert metrics["probe"][2]["dim"] == 2 * metrics["probe"][0]["dim"]
    for name in ("backbone_original.pth", "backbone_finetuned.pth", "finetune_pca.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert len(list(tmp_path.glob("lift_*.png"))) == 1
    assert len(list((tmp_path / "scenes").glob("*.pt"))) == 1
    assert "Linear probes" in result.stdout
