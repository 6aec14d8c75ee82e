import numpy as np
import pytest
import torch

from minimal3d import probes


def test_segmentation_metrics_against_hand_count():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, -1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])
    metrics = probes.segmentation_metrics(pred, target, num_classes=4)
    # class 0: tp 1, gt 2, pred 2 -> IoU 1/3; class 1: tp 2, gt 2, pred 3 -> 2/3; class 2: tp 2, gt 3, pred 2 -> 2/3
    assert metrics["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)
    assert metrics["mAcc"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert metrics["aAcc"] == pytest.approx(5 / 7)


def test_depth_metrics():
    target = torch.tensor([1.0, 2.0, 0.0, 4.0])
    pred = torch.tensor([1.5, 2.0, 9.0, 3.0])
    metrics = probes.depth_metrics(pred, target)
    assert metrics["RMSE"] == pytest.approx(((0.25 + 0 + 1) / 3) ** 0.5)
    assert metrics["AbsRel"] == pytest.approx((0.5 + 0 + 0.25) / 3)


def test_linear_classifier_separates_linearly_separable_classes():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator) * 4
    labels = torch.arange(300) % 3
    features = centres[labels] + torch.randn(300, 8, generator=generator) * 100 + 1000  # offset and scale
    features[:, :3] = centres[labels][:, :3] * 50 + torch.randn(300, 3, generator=generator)
    probe = probes.fit_linear_classifier(features, labels, num_classes=3)
    accuracy = (probe(features).argmax(-1) == labels).float().mean()
    assert accuracy > 0.95


def test_linear_regressor_recovers_weights():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(500, 5, generator=generator, dtype=torch.float64) * 3 + 2
    weights = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    targets = features @ weights + 0.7
    probe = probes.fit_linear_regressor(features, targets, ridge=1e-10)
    torch.testing.assert_close(probe(features).squeeze(-1), targets, atol=1e-6, rtol=0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        probes.segmentation_metrics(torch.zeros(2, 2), torch.zeros(2, 3), 2)
    with pytest.raises(ValueError, match="labels"):
        probes.segmentation_metrics(torch.full((2, 2), 5), torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="features"):
        probes.fit_linear_regressor(torch.tensor([[float("nan")]]), torch.zeros(1))
    with pytest.raises(ValueError, match="target > 0"):
        probes.depth_metrics(torch.ones(3), torch.zeros(3))


def test_label_dtypes_and_empty_sets():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, -1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])
    expected = probes.segmentation_metrics(pred, target, num_classes=4)
    # integer-valued float labels and a numpy integer class count give the same numbers
    assert probes.segmentation_metrics(pred.float(), target.double(), num_classes=np.int64(4)) == expected
    with pytest.raises(ValueError, match="pred must hold integer labels"):
        probes.segmentation_metrics(pred.float() + 0.5, target, 4)
    with pytest.raises(ValueError, match="no pixel to evaluate"):
        probes.segmentation_metrics(pred, torch.full_like(target, -1), 4)
    # NaN holes in the target are left out of the depth metrics, as are pixels outside the mask
    depth = probes.depth_metrics(torch.tensor([1.0, 5.0, 2.0]), torch.tensor([1.0, float("nan"), 4.0]))
    assert depth["AbsRel"] == pytest.approx(0.25)
    masked = probes.depth_metrics(torch.tensor([1.0, 5.0]), torch.tensor([1.0, 1.0]), torch.tensor([True, False]))
    assert masked["RMSE"] == 0.0


def test_probe_with_constant_feature_and_one_class_stays_finite():
    features = torch.cat([torch.ones(6, 1), torch.arange(6.0).unsqueeze(1)], dim=1)  # a constant channel
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    probe = probes.fit_linear_classifier(features, labels, num_classes=2)
    assert bool(torch.isfinite(probe(features)).all())
    assert (probe(features).argmax(-1) == labels).all()
    single = probes.fit_linear_classifier(features, torch.zeros(6, dtype=torch.long), num_classes=1)
    assert bool(torch.isfinite(single(features)).all())
    regressor = probes.fit_linear_regressor(features, features[:, 1] * 2.0 + 1.0)
    torch.testing.assert_close(regressor(features).squeeze(-1), features[:, 1].double() * 2.0 + 1.0, atol=1e-2, rtol=0)
