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
