"""Smoke test of train_compnet.py: a --quick run writes finite metrics and the PNG previews."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "train_compnet.py"), "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    results = metrics["results"]
    assert set(results) == {"grouped", "full", "plain"}
    for model in results.values():
        assert {"iid", "occlusion_L1", "occlusion_L2", "occlusion_L3", "corruption", "unknown_class_pose"} <= set(model)
        for split, values in model.items():
            for key, value in values.items():
                assert math.isfinite(value), (split, key, value)
            assert 0.0 <= values["pose_accuracy"] <= 1.0
    assert all(math.isfinite(v) and v > 0 for v in metrics["loss_seconds_per_step"].values())
    for name in ("grouped_iid", "grouped_occlusion_L2", "full_iid"):
        assert (tmp_path / f"preview_{name}.png").stat().st_size > 0
    assert "grouped" in result.stdout and "occlusion_L3" in result.stdout


def write_fake_dataset(root: Path, layout: str) -> None:
    """A tiny dataset in the ImageNet3D or NOVUM/NeMo PASCAL3D+ layout (noise images, valid poses, CAD cubes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    cube = "OFF\n8 0 0\n" + "\n".join(f"{x} {y} {z}" for x in (-0.6, 0.6) for y in (-0.4, 0.4) for z in (-0.3, 0.3))
    for c, name in enumerate(["bus", "car", "chair"]):
        (root / "CAD" / name).mkdir(parents=True)
        (root / "CAD" / name / "01.off").write_text(cube + "\n")
        for split, count in (("train", 10), ("val", 2)):
            ids = [f"{name}_{split}_{i}" for i in range(count)]
            folder = root if layout == "imagenet3d" else root / split
            for sample_id in ids:
                (folder / "images" / name).mkdir(parents=True, exist_ok=True)
                (folder / "annotations" / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (400, 480, 3), dtype=np.uint8)).save(
                    folder / "images" / name / f"{sample_id}.JPEG")
                pose = dict(azimuth=rng.uniform(0, 6.28), elevation=rng.uniform(-0.5, 1.0), theta=rng.uniform(-0.5, 0.5))
                if layout == "imagenet3d":
                    annotation = dict(pose, distance=4.0, px=240.0, py=200.0, focal=1.0, viewport=1500.0,
                                      object_status="status_good")
                    np.savez(folder / "annotations" / name / f"{sample_id}.npz",
                             annotations=np.array([annotation, dict(annotation, object_status="status_bad")]))
                else:
                    np.savez(folder / "annotations" / name / f"{sample_id}.npz", distance=5.0,
                             principal=np.array([240.0, 200.0]), viewport=400.0, **pose)
            if layout == "imagenet3d":
                (root / "lists").mkdir(exist_ok=True)
                (root / "lists" / f"{name}_imagenet_{split}.txt").write_text("\n".join(ids) + "\n")
            else:
                (root / split / "lists" / name).mkdir(parents=True)
                (root / split / "lists" / name / "mesh01.txt").write_text("\n".join(ids) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["imagenet3d", "pascal3d"])
def test_quick_run_on_real_data_layouts(tmp_path, layout):
    write_fake_dataset(tmp_path / "data", layout)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "train_compnet.py"), "--quick", "--data", str(tmp_path / "data"),
                             "--dataset", layout, "--out", str(tmp_path / "out")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["known_classes"] == [0, 1] and metrics["heldout_classes"] == [2]
    assert all(math.isfinite(v) for v in metrics["results"]["grouped"]["iid"].values())
