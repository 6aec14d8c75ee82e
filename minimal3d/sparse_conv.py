"""Sparse 3D convolution and a residual sparse U-Net (MinkUNet) in pure PyTorch.

Pri3D (Hou, Xie, Graham, Dai, Niessner, ICCV 2021, arXiv:2104.11225; official code Sekunde/Pri3D) embeds
the voxels of each frame's reconstructed chunk (2 cm) with a MinkUNet34C from MinkowskiEngine
("4D Spatio-Temporal ConvNets: Minkowski Convolutional Neural Networks", Choy, Gwak, Savarese, CVPR 2019,
arXiv:1904.08755; NVIDIA/MinkowskiEngine) and contrasts the per-voxel features with pixel features (Geo).
Stride-1 convolutions are submanifold ("3D Semantic Segmentation with Submanifold Sparse Convolutional
Networks", Graham, Engelcke, van der Maaten, CVPR 2018, arXiv:1711.10275): outputs live only on the input
voxels. This file re-implements the parts of MinkowskiEngine that the U-Net needs with plain tensor ops:

1. Coordinates (N, 4) int64 = (batch, x, y, z) are packed into one int64 key per voxel (shifted by the
   minimum so negative coordinates work) and sorted once per coordinate set.
2. A kernel map lists, per kernel offset, the pairs (input row, output row) with
   ``in_coords[i] == out_coords[o] + offset``. Keys are linear in the coordinates, so a neighbour's key is
   one addition; ``torch.searchsorted`` on the sorted keys finds it for all (voxel, offset) pairs at once.
   Maps are cached per stride, because one coordinate set is reused by many convolutions.
3. A convolution is, per offset k: gather rows, multiply by W_k (C_in, C_out), ``index_add`` into outputs:
   ``out[o] = sum_k sum_{(i, o) in map_k} feats[i] @ W_k``.

API (MinkowskiEngine conventions: coordinates stay in input-voxel units; a tensor at ``stride`` s has
coordinates that are multiples of s):

- ``SparseTensor(coords (N, 4) int, feats (N, C), stride=1)``; ``x.replace(feats)`` keeps coordinates.
- ``sparse_quantize(points (N, 3), voxel_size, features=None) -> (coords (M, 3), feats (M, C) | None,
  inverse (N,))``; ``batch_coordinates([coords_b (M_b, 3), ...]) -> (sum M_b, 4)``.
- ``sparse_conv3d(x, weight (K^3, C_in, C_out), bias=None, stride=1, dilation=1)``: stride 1 is
  submanifold (output coords = input coords); stride 2 outputs ``unique(floor(coords / 2s) * 2s)``.
- ``sparse_conv_transpose3d(x, weight, bias=None, stride=2)``: back onto the finer coordinate set that x
  was downsampled from (MinkowskiEngine's ``generative=False`` transposed convolution).
- ``sparse_relu``, ``sparse_cat``; modules ``SparseConv3d``, ``SparseConvTranspose3d``,
  ``SparseBatchNorm`` (BatchNorm1d over feats), ``ResidualBlock`` (MinkowskiEngine ``BasicBlock``).
- ``SparseResUNet(UNetConfig)``: MinkUNet (stem conv k=5, four stride-2 stages with residual blocks,
  four transposed-conv stages with skip concatenation, final 1x1 conv). ``minkunet34c()`` is Pri3D's
  network (in 3 = RGB/255, out 96); ``minkunet14()`` is a small CPU default (one block per stage, half
  the channels). Usage for the Geo branch::

      coords, colors, inverse = sparse_quantize(xyz, 0.02, features=rgb)    # one chunk
      x = SparseTensor(batch_coordinates([coords]), colors)
      voxel_features = minkunet14(in_channels=3, out_channels=96)(x).feats   # (M, 96), row i = coords[i]

Kernel offsets are ordered x slowest, z fastest, so ``F.conv3d`` weights (C_out, C_in, kx, ky, kz)
convert by ``w.permute(2, 3, 4, 1, 0).reshape(-1, C_in, C_out)`` (MinkowskiEngine orders offsets
differently, so its checkpoints would need a permutation). Odd kernels are centred (offsets -k//2..k//2),
even kernels start at the voxel (offsets 0..k-1), as in MinkowskiEngine.
"""

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------------------------------
# Coordinate keys: pack (batch, x, y, z) into one int64, sort once, look up with searchsorted.
# ----------------------------------------------------------------------------------------------------


def _pack(coords: Tensor, lower: Tensor, extent: Tensor) -> Tensor:
    """Mixed-radix int64 key of (M, D) coordinates inside [lower, lower + extent): (M,).

    The key is linear in the coordinates: key(c + o) = key(c) + _pack(o, 0, extent) for an offset o as
    long as c + o stays inside the box; kernel maps pad the box by the kernel reach to guarantee that."""
    shifted = coords - lower
    key = shifted[:, 0]
    for axis in range(1, shifted.shape[1]):
        key = key * extent[axis] + shifted[:, axis]
    return key


def _unpack(key: Tensor, lower: Tensor, extent: Tensor) -> Tensor:
    """Inverse of ``_pack``: (M,) keys -> (M, D) coordinates."""
    columns = []
    for axis in range(extent.shape[0] - 1, 0, -1):
        columns.append(key % extent[axis])
        key = torch.div(key, extent[axis], rounding_mode="floor")
    columns.append(key)
    return torch.stack(columns[::-1], dim=1) + lower


def _box(*coord_sets: Tensor, margin: int = 0) -> tuple[Tensor, Tensor]:
    """Lower corner and extent (D,) of a box holding all coord sets (M_i, D), padded by ``margin`` in every
    column but the first (the batch index); raises if its keys would overflow int64."""
    lower = torch.stack([c.min(0).values for c in coord_sets]).min(0).values
    upper = torch.stack([c.max(0).values for c in coord_sets]).max(0).values
    pad = torch.full_like(lower, margin)
    pad[0] = 0
    lower, extent = lower - pad, upper - lower + 1 + 2 * pad
    if math.prod(extent.tolist()) >= 2**62:
        raise ValueError(f"coords span {extent.tolist()} voxels per axis: too large to pack into int64 keys")
    return lower, extent


def _unique_coords(coords: Tensor) -> tuple[Tensor, Tensor]:
    """Unique rows of (N, D) integer coords, sorted by key, and the inverse map (N,)."""
    lower, extent = _box(coords)
    unique_keys, inverse = torch.unique(_pack(coords, lower, extent), sorted=True, return_inverse=True)
    return _unpack(unique_keys, lower, extent), inverse


def kernel_offsets(kernel_size: int, device: torch.device | None = None) -> Tensor:
    """(k^3, 3) int64 offsets, x slowest and z fastest; centred for odd k, 0..k-1 for even k."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"kernel_size must be an int >= 1, got {kernel_size!r}")
    start = -(kernel_size // 2) if kernel_size % 2 == 1 else 0
    steps = range(start, start + kernel_size)
    return torch.tensor(list(itertools.product(steps, steps, steps)), dtype=torch.int64, device=device)


KernelMap = list[tuple[int, Tensor | None, Tensor | None]]  # (offset k, input rows, output rows)


def neighbour_table(in_coords: Tensor, out_coords: Tensor, offsets: Tensor, block: int = 2**22) -> Tensor:
    """(N_out, K) int64 row of ``out_coords[o] + offsets[k]`` in ``in_coords``, or -1 where no voxel is there.

    in_coords, out_coords: (N, 4) (batch, x, y, z); offsets: (K, 3) in voxel units. The input keys are
    sorted once; each query is one key addition plus a binary search (torch.searchsorted). Output rows are
    processed in blocks of ``block`` queries to bound memory."""
    reach = int(offsets.abs().max()) if offsets.numel() else 0
    lower, extent = _box(in_coords, out_coords, margin=reach)
    sorted_keys, order = torch.sort(_pack(in_coords, lower, extent))
    out_keys = _pack(out_coords, lower, extent)
    offsets4 = torch.cat([offsets.new_zeros(offsets.shape[0], 1), offsets], dim=1)  # never cross batches
    deltas = _pack(offsets4, lower.new_zeros(4), extent)  # (K,) key(c + o) - key(c)
    table = torch.empty(out_keys.shape[0], offsets.shape[0], dtype=torch.int64, device=out_keys.device)
    for rows in torch.arange(out_keys.shape[0], device=out_keys.device).split(max(1, block // len(deltas))):
        queries = out_keys[rows, None] + deltas  # (rows, K)
        position = torch.searchsorted(sorted_keys, queries).clamp(max=sorted_keys.shape[0] - 1)
        table[rows] = torch.where(sorted_keys[position] == queries, order[position], -1)
    return table


def _kernel_map(in_coords: Tensor, out_coords: Tensor, offsets: Tensor, same_set: bool) -> KernelMap:
    """Pairs (i, o) with ``in_coords[i] == out_coords[o] + offsets[k]``, grouped by offset k.

    offsets: (K, 3) already scaled to input-voxel units. When input and output are the same set, the zero
    offset maps every row to itself and is stored as ``(k, None, None)`` (a plain matmul, no gather)."""
    table = neighbour_table(in_coords, out_coords, offsets)  # (N_out, K)
    found = table >= 0
    offset_ids, out_rows = found.T.nonzero(as_tuple=True)  # grouped by offset, one sync for all offsets
    in_rows = table[out_rows, offset_ids]
    counts = found.sum(dim=0).tolist()
    is_zero_offset = (offsets == 0).all(dim=1).tolist()
    kernel_map: KernelMap = []
    for k, (rows_in, rows_out) in enumerate(zip(in_rows.split(counts), out_rows.split(counts))):
        if counts[k] == 0:
            continue
        if same_set and is_zero_offset[k]:
            kernel_map.append((k, None, None))
        else:
            kernel_map.append((k, rows_in, rows_out))
    return kernel_map


# ----------------------------------------------------------------------------------------------------
# Sparse tensor container and voxelisation.
# ----------------------------------------------------------------------------------------------------


class SparseTensor:
    """Features on sparse voxels, like MinkowskiEngine's ``SparseTensor``.

    coords: (N, 4) int64 (batch, x, y, z), unique rows, xyz multiples of ``stride``.
    feats: (N, C) floating. ``cache`` is shared by every tensor derived from the same input (pass None to
    start a new one): it holds the coordinates of each stride (key ``("coords", s)``) and the kernel maps
    built so far, like MinkowskiEngine's coordinate manager. Build a new SparseTensor for new voxels."""

    def __init__(self, coords: Tensor, feats: Tensor, stride: int = 1, cache: dict | None = None):
        if not isinstance(coords, Tensor) or not isinstance(feats, Tensor):
            raise TypeError("coords and feats must be torch.Tensor")
        if coords.dtype.is_floating_point or coords.dtype.is_complex or coords.dtype == torch.bool:
            raise ValueError(f"coords must be an integer tensor (batch, x, y, z), got dtype {coords.dtype}")
        if coords.ndim != 2 or coords.shape[1] != 4:
            raise ValueError(f"coords must have shape (N, 4) as (batch, x, y, z), got {tuple(coords.shape)}")
        if feats.ndim != 2 or not feats.dtype.is_floating_point:
            raise ValueError(f"feats must be a floating (N, C) tensor, got {tuple(feats.shape)} {feats.dtype}")
        if feats.shape[0] != coords.shape[0]:
            raise ValueError(f"feats has {feats.shape[0]} rows but coords has {coords.shape[0]}")
        if coords.shape[0] == 0:
            raise ValueError("coords must contain at least one voxel")
        if coords.device != feats.device:
            raise ValueError(f"coords are on {coords.device} but feats on {feats.device}")
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        self.coords = coords.long()
        self.feats = feats
        self.stride = stride
        if cache is None:
            self._validate_coords()
            cache = {("coords", stride): self.coords}
        self.cache = cache

    def _validate_coords(self) -> None:
        """Reject duplicate voxels, negative batch indices and coordinates off the stride lattice."""
        if (self.coords[:, 0] < 0).any():
            raise ValueError("coords[:, 0] (batch index) must be >= 0")
        if self.stride > 1 and (self.coords[:, 1:] % self.stride != 0).any():
            raise ValueError(f"coords xyz must be multiples of stride={self.stride}")
        if _unique_coords(self.coords)[0].shape[0] != self.coords.shape[0]:
            raise ValueError("coords contain duplicate voxels; merge them first (sparse_quantize)")

    def replace(self, feats: Tensor) -> "SparseTensor":
        """Same voxels (and cache), new features (N, C')."""
        return SparseTensor(self.coords, feats, self.stride, self.cache)

    def __len__(self) -> int:
        return self.coords.shape[0]

    def __repr__(self) -> str:
        return f"SparseTensor(voxels={len(self)}, channels={self.feats.shape[1]}, stride={self.stride})"


def sparse_quantize(
    points: Tensor, voxel_size: float, features: Tensor | None = None, rounding: str = "floor"
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Voxelise points: (N, 3) float -> (voxel coords (M, 3) int64, mean features (M, C) or None,
    inverse (N,) with ``coords[inverse[n]]`` = voxel of point n). Voxel v covers
    [v * voxel_size, (v + 1) * voxel_size). ``rounding="trunc"`` reproduces Pri3D's voxelizer
    (``trunc(xyz / voxel_size)``, which merges the two cells around 0). Voxels are sorted by key."""
    if not isinstance(points, Tensor) or points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be a (N, 3) tensor, got {getattr(points, 'shape', type(points))}")
    if points.shape[0] == 0 or not points.dtype.is_floating_point or not torch.isfinite(points).all():
        raise ValueError("points must be a non-empty, finite floating tensor")
    if not (voxel_size > 0 and math.isfinite(voxel_size)):
        raise ValueError(f"voxel_size must be finite and > 0, got {voxel_size}")
    if features is not None and (features.ndim != 2 or features.shape[0] != points.shape[0]):
        raise ValueError(f"features must be (N={points.shape[0]}, C), got {tuple(features.shape)}")
    if rounding not in ("floor", "trunc"):
        raise ValueError(f"rounding must be 'floor' or 'trunc', got {rounding!r}")
    scaled = points / voxel_size
    grid = (torch.floor(scaled) if rounding == "floor" else torch.trunc(scaled)).long()
    coords, inverse = _unique_coords(grid)
    if features is None:
        return coords, None, inverse
    counts = features.new_zeros(coords.shape[0]).index_add_(0, inverse, features.new_ones(inverse.shape[0]))
    sums = features.new_zeros(coords.shape[0], features.shape[1]).index_add_(0, inverse, features)
    return coords, sums / counts[:, None], inverse


def batch_coordinates(coords_list: list[Tensor]) -> Tensor:
    """Stack per-sample voxel coords [(M_b, 3) int] into (sum M_b, 4) with the batch index in column 0."""
    if len(coords_list) == 0 or any(c.ndim != 2 or c.shape[1] != 3 for c in coords_list):
        raise ValueError("coords_list must be a non-empty list of (M_b, 3) integer tensors")
    return torch.cat(
        [torch.cat([torch.full_like(c[:, :1], b), c], dim=1).long() for b, c in enumerate(coords_list)]
    )


# ----------------------------------------------------------------------------------------------------
# Convolutions: gather -> matmul per offset -> index_add.
# ----------------------------------------------------------------------------------------------------


def _kernel_size_of(weight: Tensor) -> int:
    if weight.ndim != 3:
        raise ValueError(f"weight must have shape (K^3, C_in, C_out), got {tuple(weight.shape)}")
    kernel_size = round(weight.shape[0] ** (1 / 3))
    if kernel_size**3 != weight.shape[0]:
        raise ValueError(f"weight.shape[0] must be a cube K^3, got {weight.shape[0]}")
    return kernel_size


def _check_conv_inputs(x: SparseTensor, weight: Tensor, bias: Tensor | None) -> int:
    if not isinstance(x, SparseTensor):
        raise TypeError(f"x must be a SparseTensor, got {type(x).__name__}")
    kernel_size = _kernel_size_of(weight)
    if weight.shape[1] != x.feats.shape[1]:
        raise ValueError(f"weight expects C_in={weight.shape[1]} but x has {x.feats.shape[1]} channels")
    if weight.dtype != x.feats.dtype or weight.device != x.feats.device:
        raise ValueError(f"weight is {weight.dtype} on {weight.device}, feats {x.feats.dtype} on {x.feats.device}")
    if bias is not None and bias.shape != (weight.shape[2],):
        raise ValueError(f"bias must have shape ({weight.shape[2]},), got {tuple(bias.shape)}")
    return kernel_size


def _gather_matmul_scatter(feats: Tensor, weight: Tensor, kernel_map: KernelMap, num_out: int) -> Tensor:
    """out[o] = sum_k sum_{(i, o) in map_k} feats[i] @ weight[k]: (N_in, C_in) -> (num_out, C_out).
    (index_select is the gather: on CPU it is several times faster than ``feats[in_rows]``.)"""
    out = feats.new_zeros(num_out, weight.shape[2])
    for k, in_rows, out_rows in kernel_map:
        if in_rows is None:
            out += feats @ weight[k]  # centre offset of a submanifold conv: every voxel maps to itself
        else:
            out.index_add_(0, out_rows, feats.index_select(0, in_rows) @ weight[k])
    return out


class _SparseConvFunction(torch.autograd.Function):
    """Gather-matmul-scatter whose backward re-gathers instead of saving K gathered copies of feats, so a
    conv keeps O(N C) memory for backward (plain autograd would keep sum_k |map_k| x C_in).
    The backward is the same kernel map read the other way (a transposed conv) plus per-offset x^T g."""

    @staticmethod
    def forward(ctx, feats: Tensor, weight: Tensor, kernel_map: KernelMap, num_out: int) -> Tensor:
        ctx.save_for_backward(feats, weight)
        ctx.kernel_map = kernel_map
        return _gather_matmul_scatter(feats, weight, kernel_map, num_out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        feats, weight = ctx.saved_tensors
        grad_feats = torch.zeros_like(feats) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for k, in_rows, out_rows in ctx.kernel_map:
            grad_k = grad_out if out_rows is None else grad_out.index_select(0, out_rows)  # (M_k, C_out)
            if grad_weight is not None:
                grad_weight[k] = (feats if in_rows is None else feats.index_select(0, in_rows)).T @ grad_k
            if grad_feats is not None:
                if in_rows is None:
                    grad_feats += grad_k @ weight[k].T
                else:
                    grad_feats.index_add_(0, in_rows, grad_k @ weight[k].T)
        return grad_feats, grad_weight, None, None


def _downsampled_coords(cache: dict, in_stride: int, out_stride: int) -> Tensor:
    """Voxels at ``out_stride``: unique(floor(coords / out_stride) * out_stride), cached."""
    key = ("coords", out_stride)
    if key not in cache:
        coords = cache[("coords", in_stride)].clone()
        coords[:, 1:] = torch.div(coords[:, 1:], out_stride, rounding_mode="floor") * out_stride
        cache[key] = _unique_coords(coords)[0]
    return cache[key]


def _strided_map(cache: dict, in_stride: int, kernel_size: int, stride: int) -> KernelMap:
    """Kernel map from the set at ``in_stride`` s to its downsampled set at s * stride; offsets step s."""
    key = ("down", in_stride, kernel_size, stride)
    if key not in cache:
        in_coords = cache[("coords", in_stride)]
        out_coords = _downsampled_coords(cache, in_stride, in_stride * stride)
        offsets = kernel_offsets(kernel_size, in_coords.device) * in_stride
        cache[key] = _kernel_map(in_coords, out_coords, offsets, same_set=False)
    return cache[key]


def _submanifold_map(cache: dict, in_stride: int, kernel_size: int, dilation: int) -> KernelMap:
    """Kernel map of a stride-1 conv on the set at ``in_stride`` s; offsets step s * dilation."""
    key = ("sub", in_stride, kernel_size, dilation)
    if key not in cache:
        coords = cache[("coords", in_stride)]
        offsets = kernel_offsets(kernel_size, coords.device) * in_stride * dilation
        cache[key] = _kernel_map(coords, coords, offsets, same_set=True)
    return cache[key]


def sparse_conv3d(
    x: SparseTensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1, dilation: int = 1
) -> SparseTensor:
    """Sparse 3D convolution. weight: (K^3, C_in, C_out), bias: (C_out,).

    stride 1: submanifold, outputs on x's voxels, out[p] = sum_k W_k^T x[p + offset_k * s * dilation].
    stride > 1: outputs on unique(floor(coords / (s * stride)) * s * stride), inputs p + offset_k * s
    (kernel 2 partitions the inputs into 2x2x2 cells; kernel 3 is F.conv3d's padding=1 stencil)."""
    kernel_size = _check_conv_inputs(x, weight, bias)
    if not isinstance(stride, int) or stride < 1 or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"stride and dilation must be positive ints, got {stride!r}, {dilation!r}")
    if stride == 1:
        kernel_map = _submanifold_map(x.cache, x.stride, kernel_size, dilation)
        out_coords = x.coords
    else:
        if dilation != 1:
            raise ValueError("dilation > 1 is only supported with stride 1")
        kernel_map = _strided_map(x.cache, x.stride, kernel_size, stride)
        out_coords = x.cache[("coords", x.stride * stride)]
    feats = _SparseConvFunction.apply(x.feats, weight, kernel_map, out_coords.shape[0])
    if bias is not None:
        feats = feats + bias
    return SparseTensor(out_coords, feats, x.stride * stride, x.cache)


def sparse_conv_transpose3d(
    x: SparseTensor, weight: Tensor, bias: Tensor | None = None, stride: int = 2
) -> SparseTensor:
    """Transposed sparse conv onto the finer set that x was downsampled from (``generative=False``).

    weight: (K^3, C_in, C_out). The kernel map is the strided conv's map (fine -> coarse) reversed:
    out[c] += W_k^T x[p] for every pair with c = p + offset_k * s_fine, so with a full grid this equals
    F.conv_transpose3d (kernel 2: padding 0; kernel 3: padding 1, output_padding 1)."""
    kernel_size = _check_conv_inputs(x, weight, bias)
    if not isinstance(stride, int) or stride < 2 or x.stride % stride != 0:
        raise ValueError(f"stride must be an int >= 2 dividing x.stride={x.stride}, got {stride!r}")
    fine_stride = x.stride // stride
    if ("coords", fine_stride) not in x.cache:
        raise ValueError(f"x was not downsampled from a stride-{fine_stride} tensor: no target voxels")
    fine_coords = x.cache[("coords", fine_stride)]
    forward_map = _strided_map(x.cache, fine_stride, kernel_size, stride)
    reversed_map = [(k, out_rows, in_rows) for k, in_rows, out_rows in forward_map]
    feats = _SparseConvFunction.apply(x.feats, weight, reversed_map, fine_coords.shape[0])
    if bias is not None:
        feats = feats + bias
    return SparseTensor(fine_coords, feats, fine_stride, x.cache)


def sparse_relu(x: SparseTensor) -> SparseTensor:
    """ReLU of the features, same voxels."""
    return x.replace(F.relu(x.feats))


def sparse_cat(*tensors: SparseTensor) -> SparseTensor:
    """Concatenate features of tensors on the same voxels (same coords, same row order): (N, sum C)."""
    first = tensors[0]
    for other in tensors[1:]:
        if other.stride != first.stride or not (
            other.coords is first.coords or torch.equal(other.coords, first.coords)
        ):
            raise ValueError("sparse_cat needs tensors on identical coordinates (same stride and row order)")
    return first.replace(torch.cat([t.feats for t in tensors], dim=1))


# ----------------------------------------------------------------------------------------------------
# Modules and the residual sparse U-Net (MinkowskiEngine examples / Pri3D resunet3d.py MinkUNetBase).
# ----------------------------------------------------------------------------------------------------


class SparseConv3d(nn.Module):
    """``sparse_conv3d`` with a learned kernel (K^3, C_in, C_out); MinkowskiConvolution (bias off)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
        dilation: int = 1, bias: bool = False,
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.stride, self.dilation = stride, dilation
        self.kernel = nn.Parameter(torch.empty(kernel_size**3, in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        bound = 1 / math.sqrt(in_channels * kernel_size**3)  # MinkowskiEngine's reset_parameters
        nn.init.uniform_(self.kernel, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return sparse_conv3d(x, self.kernel, self.bias, self.stride, self.dilation)


class SparseConvTranspose3d(SparseConv3d):
    """``sparse_conv_transpose3d`` with a learned kernel; MinkowskiConvolutionTranspose (bias off)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, stride: int = 2, bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, 1, bias)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return sparse_conv_transpose3d(x, self.kernel, self.bias, self.stride)


class SparseBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the (N, C) features of all voxels of the batch (MinkowskiBatchNorm)."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self.training and len(x) < 2:
            raise ValueError(
                f"SparseBatchNorm in training mode needs >= 2 voxels, got 1 at stride {x.stride}: "
                "batch more scenes, use a larger chunk, or call .eval()"
            )
        return x.replace(super().forward(x.feats))


class ResidualBlock(nn.Module):
    """MinkowskiEngine BasicBlock: relu(bn(conv3(relu(bn(conv3(x))))) + shortcut(x)), submanifold convs.
    The shortcut is a 1x1 conv + BN when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1, bn_momentum: float = 0.1):
        super().__init__()
        self.conv1 = SparseConv3d(in_channels, out_channels, 3, dilation=dilation)
        self.norm1 = SparseBatchNorm(out_channels, momentum=bn_momentum)
        self.conv2 = SparseConv3d(out_channels, out_channels, 3, dilation=dilation)
        self.norm2 = SparseBatchNorm(out_channels, momentum=bn_momentum)
        self.downsample = None
        if in_channels != out_channels:
            self.downsample = nn.Sequential(
                SparseConv3d(in_channels, out_channels, 1), SparseBatchNorm(out_channels, momentum=bn_momentum)
            )

    def forward(self, x: SparseTensor) -> SparseTensor:
        out = sparse_relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out.replace(F.relu(out.feats + shortcut.feats))


@dataclass
class UNetConfig:
    """MinkUNet hyper-parameters; the defaults are MinkUNet34C as used by Pri3D (in RGB, out 96)."""

    in_channels: int = 3
    out_channels: int = 96
    init_dim: int = 32  # channels of the stem conv (concatenated into the last up stage)
    planes: tuple[int, ...] = (32, 64, 128, 256, 256, 128, 96, 96)  # 4 down stages, 4 up stages
    layers: tuple[int, ...] = (2, 3, 4, 6, 2, 2, 2, 2)  # residual blocks per stage
    stem_kernel_size: int = 5
    down_kernel_size: int = 2  # stride-2 convs and transposed convs


class SparseResUNet(nn.Module):
    """Residual sparse U-Net (MinkUNetBase). Input and output on the same voxels, stride 1 -> 16 -> 1.

    Layer names follow MinkUNetBase (conv0p1s1, bn0, conv1p1s2, block1, ..., convtr7p2s2, block8, final).
    Skips are concatenations: up stage i gets [transposed conv output, encoder features at that stride]."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        if len(config.planes) != 8 or len(config.layers) != 8:
            raise ValueError("UNetConfig.planes and .layers need 8 entries (4 down, 4 up stages)")
        self.config = config
        planes, layers, k = config.planes, config.layers, config.down_kernel_size
        self.conv0p1s1 = SparseConv3d(config.in_channels, config.init_dim, config.stem_kernel_size)
        self.bn0 = SparseBatchNorm(config.init_dim)
        channels = config.init_dim
        encoder_channels = [channels]
        for stage in range(4):  # conv{i}p{2^(i-1)}s2 -> bn{i} -> block{i}, stride 2^(i+1)
            setattr(self, f"conv{stage + 1}p{2**stage}s2", SparseConv3d(channels, channels, k, stride=2))
            setattr(self, f"bn{stage + 1}", SparseBatchNorm(channels))
            setattr(self, f"block{stage + 1}", self._stage(channels, planes[stage], layers[stage]))
            channels = planes[stage]
            encoder_channels.append(channels)
        for stage in range(4, 8):  # convtr{i}p{16/2^(i-4)}s2 -> bntr{i} -> cat skip -> block{i+1}
            setattr(self, f"convtr{stage}p{2 ** (8 - stage)}s2", SparseConvTranspose3d(channels, planes[stage], k, 2))
            setattr(self, f"bntr{stage}", SparseBatchNorm(planes[stage]))
            skip_channels = encoder_channels[7 - stage]
            setattr(self, f"block{stage + 1}", self._stage(planes[stage] + skip_channels, planes[stage], layers[stage]))
            channels = planes[stage]
        self.final = SparseConv3d(channels, config.out_channels, 1, bias=True)
        for module in self.modules():  # ResNetBase.weight_initialization: kaiming fan_out on (non-transposed) convs
            if type(module) is SparseConv3d:
                fan_out = module.kernel.shape[0] * module.kernel.shape[2]
                nn.init.normal_(module.kernel, 0.0, math.sqrt(2.0 / fan_out))

    @staticmethod
    def _stage(in_channels: int, out_channels: int, num_blocks: int) -> nn.Sequential:
        blocks = [ResidualBlock(in_channels, out_channels)]
        blocks += [ResidualBlock(out_channels, out_channels) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: SparseTensor) -> SparseTensor:
        """x: SparseTensor with (N, in_channels) feats -> SparseTensor on the same coords, (N, out_channels)."""
        if not isinstance(x, SparseTensor) or x.feats.shape[1] != self.config.in_channels:
            raise ValueError(f"x must be a SparseTensor with {self.config.in_channels} feature channels")
        out = sparse_relu(self.bn0(self.conv0p1s1(x)))
        skips = [out]  # strides 1, 2, 4, 8
        for stage in range(1, 5):
            out = getattr(self, f"conv{stage}p{2 ** (stage - 1)}s2")(out)
            out = getattr(self, f"block{stage}")(sparse_relu(getattr(self, f"bn{stage}")(out)))
            skips.append(out)
        skips.pop()  # the stride-16 output is the bottleneck, not a skip
        for stage in range(4, 8):
            out = getattr(self, f"convtr{stage}p{2 ** (8 - stage)}s2")(out)
            out = sparse_relu(getattr(self, f"bntr{stage}")(out))
            out = getattr(self, f"block{stage + 1}")(sparse_cat(out, skips.pop()))
        return self.final(out)


def minkunet34c(in_channels: int = 3, out_channels: int = 96) -> SparseResUNet:
    """Pri3D's 3D network: MinkUNet34C (blocks 2,3,4,6,2,2,2,2; planes 32,64,128,256,256,128,96,96)."""
    return SparseResUNet(UNetConfig(in_channels, out_channels))


def minkunet14(in_channels: int = 3, out_channels: int = 96, width: float = 0.5) -> SparseResUNet:
    """Small CPU default: MinkUNet14 (one block per stage) with planes of 34C scaled by ``width``."""
    planes = tuple(max(1, round(p * width)) for p in UNetConfig.planes)
    return SparseResUNet(
        UNetConfig(in_channels, out_channels, max(1, round(32 * width)), planes, (1,) * 8)
    )
