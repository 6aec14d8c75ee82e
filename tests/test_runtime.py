import json

import numpy as np
import pytest
import torch
from PIL import Image

from minimal3d import runtime


def test_save_png_places_images_side_by_side(tmp_path):
    red = torch.zeros(3, 4, 5)
    red[0] = 1.0
    gray = torch.full((2, 3), 0.5)
    runtime.save_png(tmp_path / "a.png", [red, gray])
    array = np.asarray(Image.open(tmp_path / "a.png"))
    assert array.shape == (4, 5 + 2 + 3, 3)
    assert tuple(array[0, 0]) == (255, 0, 0)
    assert tuple(array[0, 7]) == (128, 128, 128)
    assert tuple(array[3, 7]) == (255, 255, 255)  # padding below the shorter image


def test_colorize_depth_orders_near_and_far():
    depth = torch.linspace(1, 5, 20).reshape(4, 5)
    colours = runtime.colorize_depth(depth)
    assert colours.shape == (3, 4, 5)
    assert colours[0, 0, 0] > colours[0, -1, -1]  # near is yellow (high red), far is blue
    assert runtime.colorize_depth(torch.zeros(2, 2)).abs().sum() == 0


def test_pca_rgb_shared_basis():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(16, 6, 7, generator=generator)
    basis = runtime.pca_basis(features)
    rgb = runtime.pca_rgb(features, basis)
    assert rgb.shape == (3, 6, 7) and 0 <= rgb.min() and rgb.max() <= 1
    torch.testing.assert_close(runtime.pca_rgb(features), rgb)


def test_write_metrics_and_table(tmp_path):
    path = runtime.write_metrics(tmp_path, {"a": torch.tensor(1.5), "b": {"c": np.float32(2.0)}, "d": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": {"c": 2.0}, "d": "nan"}
    table = runtime.format_table([{"model": "x", "acc": 0.5}, {"model": "longer", "acc": 0.25}])
    assert table.splitlines()[2].startswith("x       0.5000")


def test_single_process_distributed_is_a_no_op():
    dist = runtime.init_distributed(torch.device("cpu"))
    assert dist.world_size == 1 and dist.is_main and not dist.enabled
    model = torch.nn.Linear(2, 2)
    assert runtime.wrap_ddp(model, dist) is model and runtime.unwrap(model) is model
    assert runtime.pick_device("cpu") == torch.device("cpu")


def test_save_panels_upscales_and_labels(tmp_path):
    image = torch.zeros(3, 32, 48)
    image[0] = 1.0  # red
    path = tmp_path / "panels.png"
    runtime.save_panels(path, [("input", image), ("depth", torch.full((32, 48), 0.5))], size=256)
    canvas = torch.from_numpy(np.asarray(Image.open(path))).float() / 255
    # each 32 px panel is scaled by ceil(256 / 32) = 8: 256 px tall under a 24 px label strip
    assert canvas.shape == (24 + 256, 2 * 384 + 4, 3)
    assert torch.allclose(canvas[100, 100], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(canvas[100, 388 + 100], torch.full((3,), 128 / 255), atol=1e-6)
    assert canvas[:24, :100].min() < 0.5  # the label is drawn in black on white
    with pytest.raises(ValueError, match="panels"):
        runtime.save_panels(path, [])


def test_claim_direction_and_margin():
    assert runtime.claim("c", "acc", True, ("base", 0.5), ("ours", 0.6))["holds"]
    assert not runtime.claim("c", "acc", True, ("base", 0.5), ("ours", 0.5))["holds"]
    assert runtime.claim("c", "rmse", False, ("base", 0.5), ("ours", 0.4))["holds"]
    assert not runtime.claim("c", "rmse", False, ("base", 0.5), ("ours", 0.6))["holds"]
    row = runtime.claim("c", "acc", True, ("full", 0.80), ("grouped", 0.77), margin=0.05)
    assert row["holds"] and row["margin"] == 0.05
    assert not runtime.claim("c", "acc", True, ("full", 0.80), ("grouped", 0.74), margin=0.05)["holds"]
    assert "NO" in runtime.format_claims([runtime.claim("c", "acc", True, ("b", 1.0), ("m", 0.0))])


def test_load_checkpoint_names_the_file_and_the_reason(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"config": {"seed": 0}, "model": {"w": torch.ones(2)}}, good)
    assert torch.equal(runtime.load_checkpoint(good, ("config", "model"))["model"]["w"], torch.ones(2))
    empty, truncated, listed = tmp_path / "empty.pt", tmp_path / "truncated.pt", tmp_path / "list.pt"
    corrupt = tmp_path / "corrupt.pt"  # not a zip archive: torch falls back to unpickling and advises weights_only
    empty.write_bytes(b"")
    truncated.write_bytes(good.read_bytes()[:40])
    corrupt.write_bytes(b"\x00 not a checkpoint " * 8)
    torch.save([1, 2], listed)
    for path, reason in [(tmp_path / "missing.pt", "no such file"), (empty, "empty"), (truncated, ""),
                         (corrupt, "corrupt"), (listed, "expected a dict")]:
        with pytest.raises(ValueError, match="not a valid checkpoint") as info:
            runtime.load_checkpoint(path)
        assert str(path) in str(info.value) and reason in str(info.value)
        assert "weights_only" not in str(info.value)
    with pytest.raises(ValueError, match="missing keys"):
        runtime.load_checkpoint(good, ("config", "optimizer"))


def test_claim_refuses_non_finite_values():
    with pytest.raises(ValueError, match="baseline"):
        runtime.claim("c", "acc", True, ("base", float("nan")), ("ours", 0.5))
    with pytest.raises(ValueError, match="method"):
        runtime.claim("c", "acc", True, ("base", 0.5), ("ours", float("inf")))
