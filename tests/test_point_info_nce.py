import math

import pytest
import torch

from minimal3d.point_info_nce import depth_loss, point_info_nce


def naive_point_info_nce(q, k, temperature, symmetric=True, normalize=True):
    """Explicit loops: per-row and per-column log-softmax of S_ij = q_i . k_j / T."""
    n = q.shape[0]
    if normalize:
        q = [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in q.tolist()]
        k = [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in k.tolist()]
    else:
        q, k = q.tolist(), k.tolist()
    similarity = [[sum(a * b for a, b in zip(q[i], k[j])) / temperature for j in range(n)] for i in range(n)]
    rows = 0.0
    for i in range(n):
        rows += -similarity[i][i] + math.log(sum(math.exp(similarity[i][j]) for j in range(n)))
    if not symmetric:
        return rows / n
    columns = 0.0
    for j in range(n):
        columns += -similarity[j][j] + math.log(sum(math.exp(similarity[i][j]) for i in range(n)))
    return (rows / n + columns / n) / 2


@pytest.mark.parametrize("symmetric,normalize", [(True, True), (False, False), (False, True), (True, False)])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_matches_naive_loops(symmetric, normalize, chunk_size):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    k = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    loss = point_info_nce(q, k, 0.4, symmetric=symmetric, normalize=normalize, chunk_size=chunk_size)
    expected = naive_point_info_nce(q, k, 0.4, symmetric, normalize)
    assert abs(loss.item() - expected) < 1e-12


@pytest.mark.parametrize("symmetric,normalize", [(True, True), (False, False)])
@pytest.mark.parametrize("chunk_size", [None, 2, 6])
def test_gradcheck(symmetric, normalize, chunk_size):
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: point_info_nce(a, b, 0.4, symmetric, normalize, chunk_size), (q, k))


@pytest.mark.parametrize("symmetric", [True, False])
def test_chunked_equals_dense(symmetric):
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(53, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    k = torch.randn(53, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    dense = point_info_nce(q, k, 0.07, symmetric=symmetric)
    grads_dense = torch.autograd.grad(dense, (q, k))
    chunked = point_info_nce(q, k, 0.07, symmetric=symmetric, chunk_size=8)
    grads_chunked = torch.autograd.grad(chunked, (q, k))
    torch.testing.assert_close(chunked, dense, rtol=0, atol=1e-12)
    for a, b in zip(grads_chunked, grads_dense):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_single_pair_is_zero_and_perfect_match_is_low():
    q = torch.randn(1, 8, dtype=torch.float64)
    assert point_info_nce(q, torch.randn(1, 8, dtype=torch.float64)).item() == 0.0
    assert abs(point_info_nce(q, q, chunk_size=4).item()) < 1e-15  # S_ii from a dot product vs a matmul
    eye = torch.eye(4, dtype=torch.float64)  # orthogonal negatives: loss = log(1 + 3 exp(-1/T))
    assert abs(point_info_nce(eye, eye, 0.4).item() - math.log(1 + 3 * math.exp(-2.5))) < 1e-14


def test_zero_vector_gives_finite_loss():
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    q[2] = 0
    k = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    # documented eps: a zero row stays zero, so its similarities are all 0
    q_unit = torch.where(q.norm(dim=1, keepdim=True) > 0, q / q.norm(dim=1, keepdim=True).clamp_min(1e-300), q)
    expected = naive_point_info_nce(q_unit, k / k.norm(dim=1, keepdim=True), 0.4, normalize=False)
    q.requires_grad_(True)
    for chunk_size in (None, 2):
        loss = point_info_nce(q, k, chunk_size=chunk_size)
        (grad,) = torch.autograd.grad(loss, q)
        assert abs(loss.item() - expected) < 1e-12
        assert torch.isfinite(grad).all()


def test_bad_inputs():
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match="same shape"):
        point_info_nce(q, torch.randn(5, 3))
    with pytest.raises(ValueError, match="NaN"):
        point_info_nce(q, torch.full((4, 3), float("nan")))
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        point_info_nce(q[0], q[0])
    for temperature in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            point_info_nce(q, q, temperature=temperature)
    with pytest.raises(ValueError, match="chunk_size"):
        point_info_nce(q, q, chunk_size=0)
    with pytest.raises(TypeError):
        point_info_nce(q.long(), q.long())


def test_no_matches_give_an_attached_zero():
    q = torch.randn(0, 3, requires_grad=True)
    k = torch.randn(0, 3, requires_grad=True)
    for symmetric in (True, False):
        loss = point_info_nce(q, k, symmetric=symmetric)
        loss.backward()
        assert loss.item() == 0.0 and q.grad.shape == (0, 3)


def test_check_false_skips_only_the_nan_scan():
    q = torch.randn(4, 3)
    q[1, 0] = float("nan")
    assert torch.isnan(point_info_nce(q, torch.randn(4, 3), check=False))  # NaN data flows through
    with pytest.raises(ValueError, match="temperature"):
        point_info_nce(q, q, temperature=float("nan"), check=False)  # parameter checks stay on


def naive_depth_loss(pred, target):
    """Per-pixel loops for the Sobel responses and the masked means."""
    batch, height, width = target.shape
    kx = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
    ky = [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]

    def sobel(image, kernel, r, c):
        total = 0.0
        for i in range(3):
            for j in range(3):
                rr, cc = r + i - 1, c + j - 1
                if 0 <= rr < height and 0 <= cc < width:
                    total += kernel[i][j] * image[rr][cc]
        return total

    sums, count = [0.0, 0.0, 0.0, 0.0], 0
    for b in range(batch):
        t, p = target[b].tolist(), pred[b, 0].tolist()
        for r in range(height):
            for c in range(width):
                if t[r][c] == 0:
                    continue
                count += 1
                dxt, dyt, dxp, dyp = sobel(t, kx, r, c), sobel(t, ky, r, c), sobel(p, kx, r, c), sobel(p, ky, r, c)
                cos = (dxt * dxp + dyt * dyp + 1) / math.sqrt((dxt ** 2 + dyt ** 2 + 1) * (dxp ** 2 + dyp ** 2 + 1))
                sums[0] += math.log(abs(t[r][c] - p[r][c]) + 0.5)
                sums[1] += abs(1 - cos)
                sums[2] += math.log(abs(dxt - dxp) + 0.5)
                sums[3] += math.log(abs(dyt - dyp) + 0.5)
    return sum(s / count for s in sums) / 3


def test_depth_loss_matches_naive_and_gradcheck():
    generator = torch.Generator().manual_seed(3)
    target = torch.rand(2, 5, 6, generator=generator, dtype=torch.float64) + 0.5
    target[0, 1, 2] = 0  # holes
    target[1, 4, :] = 0
    pred = torch.rand(2, 1, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    assert abs(depth_loss(pred, target).item() - naive_depth_loss(pred.detach(), target)) < 1e-13
    assert torch.autograd.gradcheck(lambda p: depth_loss(p, target), (pred,))


@pytest.mark.parametrize("hole", [float("nan"), float("inf")])
def test_depth_loss_masks_non_finite_holes(hole):
    generator = torch.Generator().manual_seed(6)
    target = torch.rand(2, 5, 6, generator=generator, dtype=torch.float64) + 0.5
    target[0, 1, 2] = 0
    target[1, 4, :] = 0
    pred = torch.rand(2, 1, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    expected = depth_loss(pred, target)  # 0 = hole
    (grad_expected,) = torch.autograd.grad(expected, pred)
    holes = torch.where(target == 0, torch.full_like(target, hole), target)
    for invalid_value in (float("nan"), 0.0):  # non-finite targets are holes whatever invalid_value is
        loss = depth_loss(pred, holes, invalid_value=invalid_value)
        (grad,) = torch.autograd.grad(loss, pred)
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-15)
        torch.testing.assert_close(grad, grad_expected, rtol=0, atol=1e-15)


def test_depth_loss_without_valid_pixels_is_zero():
    pred = torch.rand(1, 1, 4, 4, requires_grad=True)
    loss = depth_loss(pred, torch.zeros(1, 4, 4))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(pred.grad).all()
    with pytest.raises(ValueError, match="target"):
        depth_loss(pred, torch.zeros(1, 5, 4))


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [None, 16])
def test_torch_compile_gives_same_numbers(chunk_size):
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(64, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    k = torch.randn(64, 8, generator=generator, dtype=torch.float64)
    eager = point_info_nce(q, k, chunk_size=chunk_size)
    (grad_eager,) = torch.autograd.grad(eager, q)
    compiled = torch.compile(point_info_nce)(q, k, chunk_size=chunk_size)
    (grad_compiled,) = torch.autograd.grad(compiled, q)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=0, atol=1e-12)
