"""Every training script runs unchanged under torchrun with two CPU processes (DDP over gloo)."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_triplane.py", "train_gaussian.py", "train_pri3d.py", "train_compnet.py"]


def finite_numbers(value):
    if isinstance(value, dict):
        return all(finite_numbers(item) for item in value.values())
    if isinstance(value, list):
        return all(finite_numbers(item) for item in value)
    return not isinstance(value, float) or math.isfinite(value)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_under_torchrun(script, tmp_path):
    torchrun = shutil.which("torchrun")
    command = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(command + ["--standalone", "--nproc_per_node=2", str(ROOT / script), "--quick",
                                       "--out", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics and finite_numbers(metrics)
    assert list(tmp_path.glob("*.png"))
