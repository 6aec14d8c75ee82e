"""Tests of minimal3d/sparse_conv.py against dense convolutions and a naive dict-lookup reference."""

import time

import pytest
import torch
import torch.nn.functional as F

from minimal3d.sparse_conv import (
    SparseResUNet,
    SparseTensor,
    UNetConfig,
    batch_coordinates,
    kernel_offsets,
    minkunet14,
    sparse_conv3d,
    sparse_conv_transpose3d,
    sparse_quantize,
)

# ---------------------------------------------------------------- helpers


def full_grid(n: int, channels: int, stride: int = 1, dtype=torch.float64):
    """Fully occupied n^3 grid: dense (1, C, n, n, n) volume and the same data as a SparseTensor."""
    dense = torch.randn(1, channels, n, n, n, dtype=dtype)
    xyz = torch.stack(torch.meshgrid(*[torch.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = torch.cat([torch.zeros(n**3, 1, dtype=torch.long), xyz * stride], dim=1)
    feats = dense[0].permute(1, 2, 3, 0).reshape(-1, channels)  # raster order x, y, z
    return dense, SparseTensor(coords, feats, stride)


def dense_to_rows(dense: torch.Tensor) -> torch.Tensor:
    """(1, C, n, n, n) -> (n^3, C) in the raster order of full_grid."""
    return dense[0].permute(1, 2, 3, 0).reshape(-1, dense.shape[1])


def conv3d_weight_to_sparse(weight: torch.Tensor) -> torch.Tensor:
    """F.conv3d weight (C_out, C_in, k, k, k) -> (k^3, C_in, C_out)."""
    return weight.permute(2, 3, 4, 1, 0).reshape(-1, weight.shape[1], weight.shape[0])


def conv_transpose3d_weight_to_sparse(weight: torch.Tensor) -> torch.Tensor:
    """F.conv_transpose3d weight (C_in, C_out, k, k, k) -> (k^3, C_in, C_out)."""
    return weight.permute(2, 3, 4, 0, 1).reshape(-1, weight.shape[0], weight.shape[1])


def random_voxels(num: int, batches: int = 2, low: int = -6, high: int = 6, seed: int = 0) -> torch.Tensor:
    """Unique random (batch, x, y, z) voxels, negative coordinates included."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.cat(
        [torch.randint(0, batches, (num, 1), generator=g), torch.randint(low, high, (num, 3), generator=g)], 1
    )
    unique = torch.unique(coords, dim=0)
    return unique[torch.randperm(len(unique), generator=g)]  # unsorted rows, as real inputs are


def surface_voxels(n: int, thickness: float = 1.0) -> torch.Tensor:
    """(N, 4) voxels of a sphere shell (radius 0.4 n, ~2 voxels thick) inside an n^3 grid (batch 0)."""
    xyz = torch.stack(torch.meshgrid(*[torch.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    radius = (xyz.double() - (n - 1) / 2).norm(dim=1)
    shell = xyz[(radius - 0.4 * n).abs() < thickness]
    return torch.cat([torch.zeros(len(shell), 1, dtype=torch.long), shell], 1)


def naive_conv(in_coords, in_feats, out_coords, weight, offsets, step):
    """Loop over output sites and kernel offsets with a dict lookup: out[o] += feats[i] @ W_k where
    in_coords[i] == out_coords[o] + offsets[k] * step (batch unchanged)."""
    rows = {tuple(c): i for i, c in enumerate(in_coords.tolist())}
    out = torch.zeros(len(out_coords), weight.shape[2], dtype=in_feats.dtype)
    for o, (b, x, y, z) in enumerate(out_coords.tolist()):
        for k, (dx, dy, dz) in enumerate(offsets.tolist()):
            i = rows.get((b, x + dx * step, y + dy * step, z + dz * step))
            if i is not None:
                out[o] += in_feats[i] @ weight[k]
    return out


def naive_conv_transpose(coarse_coords, coarse_feats, fine_coords, weight, offsets, step):
    """Transposed: out[c] += feats[p] @ W_k for every coarse voxel p and offset k with c = p + offset_k * step."""
    rows = {tuple(c): i for i, c in enumerate(fine_coords.tolist())}
    out = torch.zeros(len(fine_coords), weight.shape[2], dtype=coarse_feats.dtype)
    for p, (b, x, y, z) in enumerate(coarse_coords.tolist()):
        for k, (dx, dy, dz) in enumerate(offsets.tolist()):
            c = rows.get((b, x + dx * step, y + dy * step, z + dz * step))
            if c is not None:
                out[c] += coarse_feats[p] @ weight[k]
    return out


# ---------------------------------------------------------------- equal to dense convolutions on full grids


@pytest.mark.parametrize("kernel_size,dilation,stride", [(1, 1, 1), (3, 1, 1), (3, 2, 1), (5, 1, 1), (3, 1, 4)])
def test_submanifold_equals_conv3d_on_full_grid(kernel_size, dilation, stride):
    dense, x = full_grid(6, 3, stride=stride)
    weight = torch.randn(4, 3, kernel_size, kernel_size, kernel_size, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64)
    expected = F.conv3d(dense, weight, bias, padding=dilation * (kernel_size // 2), dilation=dilation)
    y = sparse_conv3d(x, conv3d_weight_to_sparse(weight), bias, dilation=dilation)
    assert torch.equal(y.coords, x.coords) and y.stride == stride
    torch.testing.assert_close(y.feats, dense_to_rows(expected), rtol=1e-12, atol=1e-12)  # measured ~1e-14


@pytest.mark.parametrize("kernel_size,padding", [(2, 0), (3, 1)])
def test_strided_equals_conv3d_stride2_on_full_grid(kernel_size, padding):
    dense, x = full_grid(6, 3)
    weight = torch.randn(5, 3, kernel_size, kernel_size, kernel_size, dtype=torch.float64)
    expected = dense_to_rows(F.conv3d(dense, weight, stride=2, padding=padding))  # (27, 5) on the 3^3 grid
    y = sparse_conv3d(x, conv3d_weight_to_sparse(weight), stride=2)
    assert y.stride == 2
    _, coarse = full_grid(3, 1, stride=2)
    order = {tuple(c): i for i, c in enumerate(coarse.coords.tolist())}
    permutation = torch.tensor([order[tuple(c)] for c in y.coords.tolist()])
    assert len(set(permutation.tolist())) == 27
    torch.testing.assert_close(y.feats, expected[permutation], rtol=1e-12, atol=1e-12)  # measured ~1e-15


@pytest.mark.parametrize("kernel_size,padding,output_padding", [(2, 0, 0), (3, 1, 1)])
def test_transposed_equals_conv_transpose3d_on_full_grid(kernel_size, padding, output_padding):
    dense_fine, fine = full_grid(6, 2)
    coarse = sparse_conv3d(fine, torch.randn(8, 2, 3, dtype=torch.float64), stride=2)  # fills the cache
    coarse_dense = torch.zeros(1, 3, 3, 3, 3, dtype=torch.float64)
    coarse = coarse.replace(torch.randn(len(coarse), 3, dtype=torch.float64))
    x, y, z = (coarse.coords[:, 1:] // 2).T
    coarse_dense[0, :, x, y, z] = coarse.feats.T
    weight = torch.randn(3, 4, kernel_size, kernel_size, kernel_size, dtype=torch.float64)
    expected = F.conv_transpose3d(coarse_dense, weight, stride=2, padding=padding, output_padding=output_padding)
    out = sparse_conv_transpose3d(coarse, conv_transpose3d_weight_to_sparse(weight))
    assert torch.equal(out.coords, fine.coords) and out.stride == 1
    torch.testing.assert_close(out.feats, dense_to_rows(expected), rtol=1e-12, atol=1e-12)  # measured ~1e-15


# ---------------------------------------------------------------- partially occupied grids vs naive loops


@pytest.mark.parametrize("kernel_size,dilation", [(3, 1), (3, 2), (2, 1)])
def test_submanifold_matches_naive_on_partial_grid(kernel_size, dilation):
    coords = random_voxels(300)
    feats = torch.randn(len(coords), 3, dtype=torch.float64)
    weight = torch.randn(kernel_size**3, 3, 4, dtype=torch.float64)
    y = sparse_conv3d(SparseTensor(coords, feats), weight, dilation=dilation)
    expected = naive_conv(coords, feats, coords, weight, kernel_offsets(kernel_size), dilation)
    torch.testing.assert_close(y.feats, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel_size", [2, 3])
def test_strided_and_transposed_match_naive_on_partial_grid(kernel_size):
    coords = random_voxels(400, low=-9, high=9) * torch.tensor([1, 2, 2, 2])  # tensor stride 2
    x = SparseTensor(coords, torch.randn(len(coords), 3, dtype=torch.float64), stride=2)
    weight = torch.randn(kernel_size**3, 3, 4, dtype=torch.float64)
    y = sparse_conv3d(x, weight, stride=2)
    assert y.stride == 4
    expected_coords = coords.clone()
    expected_coords[:, 1:] = torch.div(coords[:, 1:], 4, rounding_mode="floor") * 4
    assert set(map(tuple, y.coords.tolist())) == set(map(tuple, expected_coords.tolist()))
    assert len(y) == len(set(map(tuple, y.coords.tolist())))
    offsets = kernel_offsets(kernel_size)
    expected = naive_conv(coords, x.feats, y.coords, weight, offsets, 2)
    torch.testing.assert_close(y.feats, expected, rtol=1e-12, atol=1e-12)

    up_weight = torch.randn(kernel_size**3, 4, 5, dtype=torch.float64)
    up = sparse_conv_transpose3d(y, up_weight)
    assert up.stride == 2 and torch.equal(up.coords, coords)
    expected_up = naive_conv_transpose(y.coords, y.feats, coords, up_weight, offsets, 2)
    torch.testing.assert_close(up.feats, expected_up, rtol=1e-12, atol=1e-12)


def test_batches_never_mix():
    xyz = random_voxels(200, batches=1)[:, 1:]
    feats_a, feats_b = torch.randn(2, len(xyz), 3, dtype=torch.float64)
    weight = torch.randn(27, 3, 2, dtype=torch.float64)
    down_weight = torch.randn(8, 2, 2, dtype=torch.float64)

    def two_convs(x: SparseTensor) -> SparseTensor:
        return sparse_conv3d(sparse_conv3d(x, weight), down_weight, stride=2)

    both = two_convs(SparseTensor(batch_coordinates([xyz, xyz]), torch.cat([feats_a, feats_b])))  # same xyz
    for b, feats in enumerate([feats_a, feats_b]):
        alone = two_convs(SparseTensor(batch_coordinates([xyz]), feats))
        rows = both.coords[:, 0] == b
        assert torch.equal(both.coords[rows][:, 1:], alone.coords[:, 1:])
        torch.testing.assert_close(both.feats[rows], alone.feats, rtol=1e-12, atol=1e-12)


def test_negative_coordinates_are_translation_equivariant():
    coords = random_voxels(300, low=0, high=10)
    x = SparseTensor(coords, torch.randn(len(coords), 3, dtype=torch.float64))
    shift = torch.tensor([0, -1000, -38, -8])  # even xyz shift keeps the stride-2 cells
    shifted = SparseTensor(coords + shift, x.feats)
    weight, down_weight = torch.randn(27, 3, 4, dtype=torch.float64), torch.randn(27, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(sparse_conv3d(shifted, weight).feats, sparse_conv3d(x, weight).feats)
    down, down_shifted = sparse_conv3d(x, down_weight, stride=2), sparse_conv3d(shifted, down_weight, stride=2)
    row_of = {tuple(c): i for i, c in enumerate((down.coords + shift).tolist())}
    permutation = torch.tensor([row_of[tuple(c)] for c in down_shifted.coords.tolist()])
    torch.testing.assert_close(down_shifted.feats, down.feats[permutation])
    assert (down_shifted.coords[:, 1] < 0).all()


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", ["submanifold", "strided", "transposed"])
def test_gradcheck(kind):
    coords = random_voxels(40, low=-2, high=3, seed=1)
    feats = torch.randn(len(coords), 2, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(27, 2, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = SparseTensor(coords, feats.detach())
    coarse = sparse_conv3d(x, torch.randn(27, 2, 2, dtype=torch.float64), stride=2)

    def conv(feats, weight, bias):
        if kind == "submanifold":
            return sparse_conv3d(x.replace(feats), weight, bias, dilation=1).feats
        if kind == "strided":
            return sparse_conv3d(x.replace(feats), weight, bias, stride=2).feats
        return sparse_conv_transpose3d(coarse.replace(feats[: len(coarse)]), weight, bias).feats

    assert torch.autograd.gradcheck(conv, (feats, weight, bias), eps=1e-6, atol=1e-8)


def test_backward_matches_plain_autograd():
    coords = random_voxels(300)
    feats = torch.randn(len(coords), 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(27, 3, 4, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(len(coords), 4, dtype=torch.float64)
    sparse_conv3d(SparseTensor(coords, feats), weight).feats.backward(grad_out)
    feats_ref, weight_ref = feats.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    naive_conv(coords, feats_ref, coords, weight_ref, kernel_offsets(3), 1).backward(grad_out)
    torch.testing.assert_close(feats.grad, feats_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight.grad, weight_ref.grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- voxelisation


@pytest.mark.parametrize("rounding", ["floor", "trunc"])
def test_sparse_quantize_matches_naive(rounding):
    g = torch.Generator().manual_seed(0)
    points = torch.rand(500, 3, generator=g, dtype=torch.float64) * 0.2 - 0.1
    colors = torch.rand(500, 3, generator=g, dtype=torch.float64)
    coords, feats, inverse = sparse_quantize(points, 0.02, colors, rounding=rounding)
    cells = {}
    for p, c in zip(points.tolist(), colors.tolist()):
        voxel = tuple(int(v // 0.02) if rounding == "floor" else int(v / 0.02) for v in p)
        cells.setdefault(voxel, []).append(c)
    assert len(coords) == len(cells)
    for voxel, feat in zip(coords.tolist(), feats):
        torch.testing.assert_close(feat, torch.tensor(cells[tuple(voxel)], dtype=torch.float64).mean(0))
    grid = torch.floor(points / 0.02) if rounding == "floor" else torch.trunc(points / 0.02)
    assert torch.equal(coords[inverse], grid.long())


# ---------------------------------------------------------------- the U-Net


def test_unet_forward_backward_on_1e4_points():
    torch.manual_seed(0)
    points = torch.randn(12000, 3)
    points = points / points.norm(dim=1, keepdim=True) * 1.0  # a 1 m sphere surface at 2 cm voxels
    coords, colors, _ = sparse_quantize(points, 0.02, torch.rand(12000, 3))
    x = SparseTensor(batch_coordinates([coords]), colors)
    net = minkunet14(out_channels=16, width=0.25)
    out = net(x)
    assert torch.equal(out.coords, x.coords) and out.feats.shape == (len(x), 16)
    assert torch.isfinite(out.feats).all() and out.feats.std() > 0
    out.feats.square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert net.final.kernel.grad.abs().sum() > 0 and net.conv0p1s1.kernel.grad.abs().sum() > 0


def test_unet_eval_is_translation_equivariant_and_batch_independent():
    """In eval mode (running BN statistics) a shift by a multiple of 16 voxels keeps every stride-16 cell,
    so the outputs must be identical; and two scenes in one batch give the same features as alone."""
    torch.manual_seed(1)
    net = SparseResUNet(UNetConfig(3, 8, 8, (8, 8, 16, 16, 16, 8, 8, 8), (1,) * 8)).double().eval()
    coords = random_voxels(1500, batches=1, low=-12, high=12)
    feats = torch.randn(len(coords), 3, dtype=torch.float64)
    out = net(SparseTensor(coords, feats)).feats
    out_shifted = net(SparseTensor(coords + torch.tensor([0, 32, -48, 16]), feats)).feats
    torch.testing.assert_close(out_shifted, out, rtol=1e-10, atol=1e-10)
    other = random_voxels(900, batches=1, low=-12, high=12, seed=5)
    both = net(SparseTensor(torch.cat([coords, other + torch.tensor([1, 0, 0, 0])]),
                            torch.cat([feats, torch.randn(len(other), 3, dtype=torch.float64)])))
    torch.testing.assert_close(both.feats[: len(coords)], out, rtol=1e-10, atol=1e-10)


def test_unet_has_minkunet34c_layout():
    net = SparseResUNet()  # MinkUNet34C, Pri3D's 3D backbone
    assert [len(getattr(net, f"block{i}")) for i in range(1, 9)] == [2, 3, 4, 6, 2, 2, 2, 2]
    assert net.conv0p1s1.kernel.shape == (125, 3, 32)
    assert net.block5[0].conv1.kernel.shape == (27, 256 + 128, 256)  # concat skip from stride 8
    assert net.block8[0].conv1.kernel.shape == (27, 96 + 32, 96)  # concat with the stem output
    assert net.final.kernel.shape == (1, 96, 96) and net.final.bias is not None


# ---------------------------------------------------------------- scale and bad input


def test_submanifold_conv_scales_to_1e5_voxels():
    coords = surface_voxels(160)  # ~1e5 voxels on a sphere shell
    assert len(coords) > 90_000
    feats = torch.randn(len(coords), 8)
    weight = torch.randn(27, 8, 8)
    start = time.perf_counter()
    y = sparse_conv3d(SparseTensor(coords, feats), weight)
    assert time.perf_counter() - start < 10.0
    check = torch.randperm(len(coords))[:50]
    rows = {tuple(c): i for i, c in enumerate(coords.tolist())}
    for o in check.tolist():
        b, x, yy, z = coords[o].tolist()
        expected = torch.zeros(8)
        for k, (dx, dy, dz) in enumerate(kernel_offsets(3).tolist()):
            i = rows.get((b, x + dx, yy + dy, z + dz))
            if i is not None:
                expected += feats[i] @ weight[k]
        torch.testing.assert_close(y.feats[o], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_unet_scales_to_1e5_voxels():
    coords = surface_voxels(160)
    x = SparseTensor(coords, torch.rand(len(coords), 3))
    out = minkunet14()(x)
    out.feats.mean().backward()
    assert torch.equal(out.coords, coords) and torch.isfinite(out.feats).all()


@pytest.mark.slow
def test_torch_compile_gives_same_numbers():
    """torch.compile is optional; on one residual block (~100 s to compile on 2 busy cores) it must give
    the same numbers. Compiling the whole U-Net traces ~1000 small ops and takes many minutes on CPU."""
    from minimal3d.sparse_conv import ResidualBlock

    torch.manual_seed(0)
    block = ResidualBlock(8, 8).eval()
    coords = random_voxels(500, batches=2, low=-6, high=6)
    x = SparseTensor(coords, torch.rand(len(coords), 8))
    torch.testing.assert_close(torch.compile(block)(x).feats, block(x).feats, rtol=1e-5, atol=1e-5)  # ~6e-8


def test_bad_inputs_raise():
    coords = random_voxels(50)
    feats = torch.randn(len(coords), 3)
    with pytest.raises(ValueError, match="integer"):
        SparseTensor(coords.float(), feats)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        SparseTensor(coords[:, 1:], feats)
    with pytest.raises(ValueError, match="rows"):
        SparseTensor(coords, feats[:-1])
    with pytest.raises(ValueError, match="duplicate"):
        SparseTensor(torch.cat([coords, coords[:1]]), torch.randn(len(coords) + 1, 3))
    with pytest.raises(ValueError, match="batch"):
        SparseTensor(coords - torch.tensor([5, 0, 0, 0]), feats)
    with pytest.raises(ValueError, match="multiples"):
        SparseTensor(coords * torch.tensor([1, 2, 2, 2]) + torch.tensor([0, 1, 0, 0]), feats, stride=2)
    with pytest.raises(ValueError, match="at least one"):
        SparseTensor(coords[:0], feats[:0])
    x = SparseTensor(coords, feats)
    with pytest.raises(ValueError, match="C_in"):
        sparse_conv3d(x, torch.randn(27, 4, 2))
    with pytest.raises(ValueError, match="cube"):
        sparse_conv3d(x, torch.randn(26, 3, 2))
    with pytest.raises(ValueError, match="downsampled"):
        sparse_conv_transpose3d(SparseTensor(coords * 2, feats, stride=2), torch.randn(8, 3, 2))
    with pytest.raises(ValueError, match="stride"):
        sparse_conv_transpose3d(x, torch.randn(8, 3, 2))
    with pytest.raises(ValueError, match="points"):
        sparse_quantize(torch.randn(10, 2), 0.02)
    with pytest.raises(ValueError, match="voxel_size"):
        sparse_quantize(torch.randn(10, 3), 0.0)
    with pytest.raises(ValueError, match="in_channels|channels"):
        minkunet14(in_channels=3)(SparseTensor(coords, torch.randn(len(coords), 4)))
