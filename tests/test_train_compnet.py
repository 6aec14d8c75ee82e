"""Smoke tests of train_compnet.py: main([...]) in process with --quick writes finite metrics, the claims
table, previews and checkpoints; nonsensical flags are rejected before any work."""

import math
from pathlib import Path

import pytest
import torch
from train_scripts import load_script

train_compnet = load_script("train_compnet")


def finite_values(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from finite_values(value)
    elif isinstance(tree, float):
        yield tree


def test_quick_run(tmp_path):
    torch.set_num_threads(1)
    metrics = train_compnet.main(["--quick", "--init", "pretrained", "--out", str(tmp_path), "--seed", "1"])
    assert {claim["metric"] for claim in metrics["claims"]} == {"occluded_accuracy", "iid_accuracy", "loss_seconds"}
    for claim in metrics["claims"]:
        assert math.isfinite(claim["baseline"]["value"]) and math.isfinite(claim["method"]["value"])
        assert isinstance(claim["holds"], bool)
    results = metrics["results"]
    assert set(results) == {"grouped", "full", "plain"}
    splits = {"iid", "occlusion_L1", "occlusion_L2", "occlusion_L3", "brightness", "fog", "frost", "snow",
              "occlusion_mean", "corruption_mean", "unknown_class_pose"}
    for model in results.values():
        assert splits == set(model)
        for split, values in model.items():
            assert all(math.isfinite(v) for v in finite_values(values)), (split, values)
            assert 0.0 <= values["pose_accuracy_pi18"] <= values["pose_accuracy_pi6"] <= 1.0
            if split != "unknown_class_pose":
                assert 0.0 <= values["accuracy"] <= 1.0
    occlusion = [results["plain"][f"occlusion_L{k}"]["accuracy"] for k in (1, 2, 3)]
    assert results["plain"]["occlusion_mean"]["accuracy"] == pytest.approx(sum(occlusion) / 3)
    assert all(v > 0 for v in metrics["loss_seconds"].values())
    written = __import__("json").loads((tmp_path / "metrics.json").read_text())
    assert written["claims"] == metrics["claims"] and written["config"]["quick"] is True
    for name in ("grouped_iid", "grouped_occlusion_L2", "full_iid"):
        assert (tmp_path / f"preview_{name}.png").stat().st_size > 0
    checkpoint = torch.load(tmp_path / "grouped.pt", weights_only=True)
    assert checkpoint["config"]["seed"] == 1 and "memory" in checkpoint
    evidence = metrics["training"]["grouped"]["occlusion_evidence"]
    assert set(evidence) == {"occlusion_L1", "occlusion_L2", "occlusion_L3"}
    assert all(v["true_class_evidence_occluded"] >= 0 and 0 <= v["accuracy_without_occluder_cells"] <= 1
               for v in evidence.values())
    pretrain = metrics["training"]["pretrain"]  # --init pretrained: a classifier of other classes first
    assert pretrain["classes"] == train_compnet.QUICK["pretrain_classes"] and 0.0 <= pretrain["test_accuracy"] <= 1.0
    assert set(torch.load(tmp_path / "pretrained.pt", weights_only=True)["model"]) == set(
        train_compnet.FeatureNet("cnn8", 16, 8).state_dict())


def test_quick_never_overrides_explicit_flags():
    args = train_compnet.parse_args(["--quick", "--epochs", "5", "--image-size", "80", "--vertices", "30"])
    assert (args.epochs, args.image_size, args.vertices) == (5, 80, 30)
    assert args.num_classes == train_compnet.QUICK["num_classes"]
    normal = train_compnet.parse_args([])
    assert normal.epochs == 12 and normal.out == "runs/compnet" and normal.models == ["grouped", "full", "plain"]


@pytest.mark.parametrize("argv, flag", [
    (["--steps", "-1"], "--steps"), (["--epochs", "0"], "--epochs"), (["--image-size", "0"], "--image-size"),
    (["--weights", "x.pth"], "--weights"), (["--temperature", "nan"], "--temperature"),
    (["--num-heldout", "9", "--num-classes", "3"], "--num-heldout"), (["--severity", "6"], "--severity"),
    (["--pose-bins", "0", "6", "4"], "--pose-bins"), (["--init", "pretrained", "--pretrain-classes", "500"], "--pretrain-classes"),
    (["--pretrain-epochs", "0"], "--pretrain-epochs"), (["--backbone", "cnn8", "--weights", "x.pth"], "--weights")])
def test_nonsense_flags_are_rejected(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        train_compnet.parse_args(argv)
    assert info.value.code == 2 and flag in capsys.readouterr().err


def test_pretraining_classes_are_never_known_heldout_occluder_or_clutter_classes():
    for num_known in (3, 6, 20):
        classes = set(train_compnet.pretraining_classes(num_known, 48))
        used = set(range(2 * num_known))  # known 2k and their held-out partners 2k + 1
        used |= set(range(2 * num_known, 2 * num_known + train_compnet.OCCLUDER_OBJECTS))  # occluder_cutouts
        assert len(classes) == 48 and not classes & used and not classes & set(train_compnet.CLUTTER_CLASSES)


def test_every_model_starts_from_the_pretrained_backbone(tmp_path):
    """With init, the first forward of each model equals the pretrained FeatureNet's (zero steps of training
    cannot be asked for, so compare before any step via a zero learning rate)."""
    torch.manual_seed(0)
    args = train_compnet.parse_args(["--quick", "--steps", "1", "--lr", "1e-30", "--out", str(tmp_path)])
    reference = train_compnet.FeatureNet(args.backbone, args.dim, args.width)
    init = {k: v.clone() for k, v in reference.state_dict().items()}
    train, calib, _, _, meshes, _ = train_compnet.load_data(args)
    dist = train_compnet.runtime.init_distributed(torch.device("cpu"))
    model, _, _ = train_compnet.train_compnet(args, "grouped", train, calib, meshes, torch.device("cpu"), dist,
                                              tmp_path, init)
    plain, _ = train_compnet.train_plain(args, train, len(meshes), torch.device("cpu"), dist, tmp_path, init)
    for features in (model, plain.features):
        for key, value in features.state_dict().items():
            if "running" not in key and "num_batches" not in key:  # BatchNorm statistics move in train mode
                assert torch.allclose(value, init[key], atol=1e-20), key


def test_nothing_runs_at_import():
    assert not hasattr(train_compnet, "args")


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_schedule(schedule):
    """cosine: lr (1 + cos(pi t / T)) / 2 per step, from --lr at step 0 through lr/2 at T/2 towards 0;
    constant: --lr at every step. Both models' optimizers read it the same way."""
    cfg = train_compnet.parse_args(["--lr", "0.002", "--lr-schedule", schedule])
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    seen = []
    for step in range(100):
        train_compnet.schedule_lr(cfg, optimizer, step, 100)
        seen.append(optimizer.param_groups[0]["lr"])
    if schedule == "constant":
        assert seen == [0.002] * 100
    else:
        expected = [0.002 * (1 + math.cos(math.pi * t / 100)) / 2 for t in range(100)]
        assert seen == pytest.approx(expected) and seen[0] == 0.002 and seen[50] == pytest.approx(0.001)
        assert all(a > b for a, b in zip(seen, seen[1:])) and 0 < seen[-1] < 1e-5
    assert train_compnet.parse_args([]).lr_schedule == "cosine"


def test_pose_bins_round_trip():
    angles = torch.tensor([0.1, 1.0, 3.0, 6.2])
    index = train_compnet.angle_to_bin(angles, 24, 0.0, 2 * math.pi, periodic=True)
    back = train_compnet.bin_to_angle(index, 24, 0.0, 2 * math.pi)
    assert float((back - angles).abs().max()) <= math.pi / 24 + 1e-6


def test_occluders_cover_the_requested_fractions():
    from minimal3d.synthetic import OCCLUSION_LEVELS, paste_occluders

    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 64, 64, generator=generator)
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[16:48, 20:44] = True
    for object_fraction, background_fraction in OCCLUSION_LEVELS.values():
        occluded, covered = paste_occluders(image, mask, object_fraction, background_fraction, generator)
        assert abs(float(covered[mask].float().mean()) - object_fraction) < 0.08
        assert abs(float(covered[~mask].float().mean()) - background_fraction) < 0.08
        assert torch.equal(occluded[:, ~covered], image[:, ~covered])  # only occluder pixels change


def test_object_cutouts_are_the_rendered_objects_cropped_to_their_masks():
    from minimal3d.synthetic import MAX_OBJECT_CLASSES, object_cutouts, object_sample

    cutouts = object_cutouts([12, 13], size=48, seed=3)
    for c, (image, mask) in zip((12, 13), cutouts):
        sample = object_sample(c, num_classes=MAX_OBJECT_CLASSES, split="test", height=48, width=48, seed=3,
                               class_textures=True)
        rows = sample["amodal_mask"].any(1).nonzero()[:, 0]
        cols = sample["amodal_mask"].any(0).nonzero()[:, 0]
        window = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
        assert torch.equal(mask, sample["amodal_mask"][window])
        assert torch.equal(image, sample["image"][(slice(None),) + window])
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()  # tight box


def test_clutter_objects_change_only_the_background():
    from minimal3d.synthetic import MAX_OBJECT_CLASSES, object_sample

    options = dict(num_classes=MAX_OBJECT_CLASSES, split="train", height=48, width=48, seed=2, class_textures=True)
    changed = 0
    for index in (4, 1006, 2008):
        plain = object_sample(index, **options)
        cluttered = object_sample(index, clutter_classes=[700, 701], **options)
        for key in ("amodal_mask", "viewmat", "K", "azimuth", "elevation", "theta", "distance"):
            assert torch.equal(plain[key], cluttered[key])
        mask = plain["amodal_mask"]
        assert torch.equal(plain["image"][:, mask], cluttered["image"][:, mask])  # the object is in front
        changed += int((plain["image"][:, ~mask] != cluttered["image"][:, ~mask]).any())
    assert changed >= 2  # the clutter objects are seen behind most objects


def test_object_occluders_cover_the_requested_fractions_with_the_cutout_pixels():
    from minimal3d.synthetic import OCCLUSION_LEVELS, paste_occluders

    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 64, 64, generator=generator) * 0.5
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[16:48, 20:44] = True
    v, u = torch.meshgrid(torch.linspace(-1, 1, 20), torch.linspace(-1, 1, 30), indexing="ij")
    disc = u ** 2 + v ** 2 <= 1  # a 20 x 30 ellipse: the cut-out fills about 79 % of its box
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 20, 30).clone()
    for object_fraction, background_fraction in OCCLUSION_LEVELS.values():
        occluded, covered = paste_occluders(image, mask, object_fraction, background_fraction, generator,
                                            cutouts=[(red, disc)])
        assert abs(float(covered[mask].float().mean()) - object_fraction) < 0.08
        assert abs(float(covered[~mask].float().mean()) - background_fraction) < 0.08
        assert torch.equal(occluded[:, ~covered], image[:, ~covered])  # only occluder pixels change
        torch.testing.assert_close(occluded[:, covered], red[:, :1, :1].reshape(3, 1).expand(3, int(covered.sum())))


def test_imagenet_c_brightness_is_exact_and_all_stay_in_range():
    from minimal3d.synthetic import IMAGENET_C, imagenet_c

    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 32, 32, generator=generator) * 0.5
    brighter = imagenet_c(image, "brightness", 4)
    value = image.max(0).values
    torch.testing.assert_close(brighter.max(0).values, (value + 0.4).clamp(max=1))  # V + 0.4 in HSV
    torch.testing.assert_close(brighter / brighter.max(0, keepdim=True).values,
                               image / image.max(0, keepdim=True).values)  # hue and saturation kept
    for corruption in IMAGENET_C:
        out = imagenet_c(image, corruption, 4, generator)
        assert out.shape == image.shape and float(out.min()) >= 0 and float(out.max()) <= 1
        assert float((out - image).abs().mean()) > 0.02


def write_fake_dataset(root: Path, layout: str) -> None:
    """A tiny dataset in the ImageNet3D or NOVUM/NeMo PASCAL3D+ layout (noise images, valid poses, CAD cubes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    cube = "OFF\n8 0 0\n" + "\n".join(f"{x} {y} {z}" for x in (-0.6, 0.6) for y in (-0.4, 0.4) for z in (-0.3, 0.3))
    for name in ["bus", "car", "chair"]:
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
    metrics = train_compnet.main(["--quick", "--data", str(tmp_path / "data"), "--dataset", layout,
                                  "--out", str(tmp_path / "out")])
    assert metrics["class_names"] == ["bus", "car"]
    for split in ("iid", "occlusion_L3", "snow", "unknown_class_pose"):  # OOD splits made from the test images
        assert all(math.isfinite(v) for v in finite_values(metrics["results"]["grouped"][split]))


def test_occlusion_evidence_matches_a_loop_over_cells():
    """The diagnostic against dense loops: per image and cell, the true class's best vertex minus the best
    background feature, clamped at 0, summed over the visible object cells; Eq. 7 without occluder cells."""
    g = torch.Generator().manual_seed(0)
    memory = train_compnet.VertexMemory([3, 4, 2], dim=5, num_background=6, generator=g)
    N, S, h = 5, 8, 4  # 2 x 2 pixels per cell
    clean = torch.nn.functional.normalize(torch.randn(N, 5, h, h, generator=g), dim=1)
    occluded = torch.nn.functional.normalize(torch.randn(N, 5, h, h, generator=g), dim=1)
    split = dict(labels=torch.tensor([0, 1, 2, 1, 0]), object_mask=torch.rand(N, S, S, generator=g) > 0.4,
                 occluder_mask=torch.rand(N, S, S, generator=g) > 0.6)
    clean_evidence = train_compnet.true_class_evidence(memory, clean, split["labels"], chunk=2)
    result = train_compnet.occlusion_evidence(memory, clean_evidence, occluded, split, chunk=2)
    visible_count, sums, correct = 0, {"occluded": 0.0, "clean": 0.0}, 0
    for n in range(N):
        label, scores = int(split["labels"][n]), torch.zeros(3)
        for r in range(h):
            for c in range(h):
                block = (slice(2 * r, 2 * r + 2), slice(2 * c, 2 * c + 2))
                is_object = split["object_mask"][n][block].float().mean() >= 0.5
                is_occluder = split["occluder_mask"][n][block].float().mean() >= 0.5
                for name, maps in (("occluded", occluded), ("clean", clean)):
                    f = maps[n, :, r, c]
                    best = [max(float(f @ memory.vertices[k]) for k in range(9) if memory.vertex_class[k] == y)
                            for y in range(3)]
                    background = max(float(f @ b) for b in memory.background)
                    if is_object and not is_occluder:
                        sums[name] += max(0.0, best[label] - background)
                    if name == "occluded" and not is_occluder:
                        scores += torch.tensor([max(b, background) for b in best])
                visible_count += int(is_object and not is_occluder)
        correct += int(int(scores.argmax()) == label)
    assert result["visible_object_cells"] == pytest.approx(visible_count / N)
    assert result["true_class_evidence_occluded"] == pytest.approx(sums["occluded"] / N, abs=1e-6)
    assert result["true_class_evidence_same_cells_clean"] == pytest.approx(sums["clean"] / N, abs=1e-6)
    assert result["accuracy_without_occluder_cells"] == pytest.approx(correct / N)
    assert sums["occluded"] > 0 and sums["clean"] > 0  # the case exercises the clamp's positive side


def test_background_cells_off_object_avoid_the_object():
    g = torch.Generator().manual_seed(0)
    feature_map = torch.randn(2, 3, 6, 6, generator=g)
    feature_map[:, :, 1:4, 1:4] += 100.0  # object cells carry a marker
    object_mask = torch.zeros(2, 48, 48, dtype=torch.bool)
    object_mask[:, 8:32, 8:32] = True  # cells 1..3 at stride 8
    uv = torch.tensor([[[12.0, 12.0], [40.0, 40.0]]]).expand(2, -1, -1)  # one vertex on the object, one off it
    picked = train_compnet.background_features(feature_map, uv, 20, 8, g, object_mask)
    assert (picked.abs() < 50).all()  # no object cell among 20 of the 26 free cells
    default = train_compnet.background_features(feature_map, uv, 34, 8, g)  # every vertex-free cell
    assert (default.abs() > 50).any(-1).sum(1).tolist() == [8, 8]  # the 8 object cells without a vertex


@pytest.mark.parametrize("backbone, layers", [
    ("cnn8", [(3, 2), (3, 1)] * 3 + [(3, 1)]),  # the stride-8 encoder, then the 3 x 3 fuse at stride 8
    ("cnn", [(3, 2), (3, 1)] * 4),  # ... with the stride-16 stage (its path is the wider one)
])
def test_receptive_field_of_the_small_unet(backbone, layers):
    """The pixels that reach one output cell (gradient footprint, eval mode) span the receptive field
    computed from the layers: 1 + sum (k - 1) * jump. The stride-16 path adds the bilinear upsampling
    (one stride-16 cell to each side: +16) and the fuse conv at stride 8 (+16)."""
    expected, jump = 1, 1
    for kernel, stride in layers:
        expected, jump = expected + (kernel - 1) * jump, jump * stride
    if backbone == "cnn":
        expected += 16 + 16
    torch.manual_seed(0)
    net = train_compnet.FeatureNet(backbone, 8, 4).eval()
    images = torch.rand(1, 3, 160, 160, requires_grad=True)
    net(images)[0, :, 10, 10].sum().backward()
    footprint = images.grad.abs().sum(dim=(0, 1)) > 0
    rows, columns = footprint.any(1).nonzero().flatten(), footprint.any(0).nonzero().flatten()
    assert rows.max() - rows.min() + 1 == expected == columns.max() - columns.min() + 1
    assert expected == (59 if backbone == "cnn8" else 123)
