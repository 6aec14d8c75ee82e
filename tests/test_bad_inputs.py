"""Bad input across the public API: every case must raise ValueError/TypeError naming the argument.

One section per area; each section builds a list of ``Case``s (a name, a call that must fail, the
exception type, and a fragment the message must contain, usually the argument's name) and the single
parametrised test at the bottom runs them all. Cases are tiny so the file stays fast.
"""

from dataclasses import dataclass
from typing import Callable

import pytest
import torch


@dataclass
class Case:
    name: str
    call: Callable[[], object]
    error: type[Exception] | tuple[type[Exception], ...]
    names: str  # a fragment the message must contain (the argument's name)


CASES: list[Case] = []


# ===================================================================================================
# cameras, vit, resunet, runtime, checkpoints
# ===================================================================================================

# (cases for this area go here)


# ===================================================================================================
# triplane
# ===================================================================================================

# (cases for this area go here)


# ===================================================================================================
# splatting, gaussians
# ===================================================================================================

# (cases for this area go here)


# ===================================================================================================
# point_info_nce, correspondences, sparse_conv
# ===================================================================================================


def _pri3d_cases() -> list[Case]:
    from minimal3d import correspondences as corr
    from minimal3d import point_info_nce as nce
    from minimal3d import sparse_conv as sc

    q, k = torch.randn(4, 3), torch.randn(4, 3)
    nan_q = q.clone()
    nan_q[1, 1] = float("nan")
    depth, K, viewmat = torch.ones(6, 8), torch.tensor([[8.0, 0, 4], [0, 8.0, 3], [0, 0, 1]]), torch.eye(4)
    nan_viewmat = viewmat.clone()
    nan_viewmat[0, 3] = float("nan")
    voxels = torch.tensor([[0, 0, 10], [1, 0, 10]])
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]])
    tensor = sc.SparseTensor(coords, torch.randn(2, 2))
    pred = torch.zeros(1, 1, 4, 4)
    cases = [
        Case("nce_q_ndim", lambda: nce.point_info_nce(q[0], k[0]), ValueError, "(n, D)"),
        Case("nce_batch_mismatch", lambda: nce.point_info_nce(q, k[:3]), ValueError, "same shape"),
        Case("nce_integer", lambda: nce.point_info_nce(q.long(), k.long()), TypeError, "floating"),
        Case("nce_dtype_mismatch", lambda: nce.point_info_nce(q, k.double()), TypeError, "dtype"),
        Case("nce_nan_features", lambda: nce.point_info_nce(nan_q, k), ValueError, "NaN"),
        Case("nce_chunk_size_zero", lambda: nce.point_info_nce(q, k, chunk_size=0), ValueError, "chunk_size"),
        Case("nce_temperature_string", lambda: nce.point_info_nce(q, k, "0.4"), TypeError, "temperature"),
        Case("depth_loss_pred_shape", lambda: nce.depth_loss(pred[:, 0], pred[:, 0]), ValueError, "pred"),
        Case("depth_loss_target_batch", lambda: nce.depth_loss(pred, torch.zeros(2, 4, 4)), ValueError, "target"),
        Case("depth_loss_pred_integer", lambda: nce.depth_loss(pred.long(), pred[:, 0]), TypeError, "pred"),
        Case("depth_loss_invalid_value", lambda: nce.depth_loss(pred, pred[:, 0], None), TypeError, "invalid_value"),
        Case("pix_depth_ndim", lambda: corr.pixel_correspondences(depth[None], depth, K, viewmat, viewmat),
             ValueError, "depth1"),
        Case("pix_depth_integer", lambda: corr.pixel_correspondences(depth, depth.long(), K, viewmat, viewmat),
             ValueError, "depth2"),
        Case("pix_sizes_without_K2", lambda: corr.pixel_correspondences(depth, depth[:5], K, viewmat, viewmat),
             ValueError, "K2"),
        Case("pix_K_shape", lambda: corr.pixel_correspondences(depth, depth, K[:2], viewmat, viewmat), ValueError, "K"),
        Case("pix_zero_focal", lambda: corr.pixel_correspondences(depth, depth, K * 0, viewmat, viewmat),
             ValueError, "K"),
        Case("pix_nan_pose", lambda: corr.pixel_correspondences(depth, depth, K, nan_viewmat, viewmat),
             ValueError, "viewmat1"),
        Case("pix_convention", lambda: corr.pixel_correspondences(depth, depth, K, viewmat, viewmat, 0.05, "x"),
             ValueError, "convention"),
        Case("vox_float_voxels", lambda: corr.voxel_pixel_correspondences(voxels.float(), depth, K, viewmat),
             ValueError, "voxels"),
        Case("voxelize_points_shape", lambda: corr.voxelize_points(torch.zeros(3, 2)), ValueError, "points"),
        Case("voxelize_features_rows", lambda: corr.voxelize_points(torch.zeros(3, 3), 0.1, torch.zeros(2, 1)),
             ValueError, "features"),
        Case("sample_matches_empty", lambda: corr.sample_matches(0, 8), ValueError, "num_matches"),
        Case("overlap_depth_ndim", lambda: corr.pixel_overlap(depth[0], depth, K, viewmat, viewmat),
             ValueError, "depth1"),
        Case("sparse_float_coords", lambda: sc.SparseTensor(coords.float(), torch.randn(2, 2)), ValueError, "coords"),
        Case("sparse_coords_width", lambda: sc.SparseTensor(coords[:, :3], torch.randn(2, 2)), ValueError, "coords"),
        Case("sparse_feats_rows", lambda: sc.SparseTensor(coords, torch.randn(3, 2)), ValueError, "feats"),
        Case("sparse_duplicates", lambda: sc.SparseTensor(coords[[0, 0]], torch.randn(2, 2)), ValueError, "duplicate"),
        Case("sparse_empty", lambda: sc.SparseTensor(coords[:0], torch.randn(0, 2)), ValueError, "coords"),
        Case("sparse_weight_channels", lambda: sc.sparse_conv3d(tensor, torch.randn(27, 3, 4)), ValueError, "C_in"),
        Case("sparse_weight_not_cube", lambda: sc.sparse_conv3d(tensor, torch.randn(26, 2, 4)), ValueError, "K^3"),
        Case("sparse_weight_dtype", lambda: sc.sparse_conv3d(tensor, torch.randn(27, 2, 4).double()),
             ValueError, "weight is torch.float64"),
        Case("sparse_stride_zero", lambda: sc.sparse_conv3d(tensor, torch.randn(27, 2, 4), stride=0),
             ValueError, "stride"),
        Case("sparse_quantize_nan", lambda: sc.sparse_quantize(torch.full((2, 3), float("nan")), 0.1),
             ValueError, "finite"),
        Case("sparse_batch_coordinates_empty", lambda: sc.batch_coordinates([]), ValueError, "coords_list"),
        Case("sparse_conv_module_kernel_zero", lambda: sc.SparseConv3d(2, 4, kernel_size=0), ValueError, "kernel_size"),
        Case("sparse_conv_module_channels", lambda: sc.SparseConv3d(0, 4), ValueError, "in_channels"),
        Case("kernel_offsets_zero", lambda: sc.kernel_offsets(0), ValueError, "kernel_size"),
    ]
    for value in (0.0, -0.4, float("nan"), float("inf")):
        cases.append(Case(f"nce_temperature_{value}", lambda v=value: nce.point_info_nce(q, k, v), ValueError,
                          "temperature"))
        cases.append(Case(f"pix_max_distance_{value}",
                          lambda v=value: corr.pixel_correspondences(depth, depth, K, viewmat, viewmat, v),
                          ValueError, "max_distance"))
        cases.append(Case(f"vox_voxel_size_{value}",
                          lambda v=value: corr.voxel_pixel_correspondences(voxels, depth, K, viewmat, v),
                          ValueError, "voxel_size"))
        cases.append(Case(f"vox_depth_tolerance_{value}",
                          lambda v=value: corr.voxel_pixel_correspondences(voxels, depth, K, viewmat, 0.1, v),
                          ValueError, "max_depth_diff"))
        cases.append(Case(f"voxelize_voxel_size_{value}",
                          lambda v=value: corr.voxelize_points(torch.zeros(3, 3), v), ValueError, "voxel_size"))
        cases.append(Case(f"sparse_quantize_voxel_size_{value}",
                          lambda v=value: sc.sparse_quantize(torch.zeros(3, 3), v), ValueError, "voxel_size"))
    return cases


CASES += _pri3d_cases()


# ===================================================================================================
# vmf_contrast, neural_mesh
# ===================================================================================================

# (cases for this area go here)


# ===================================================================================================
# the runner
# ===================================================================================================


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input_raises_and_names_the_argument(case: Case) -> None:
    with pytest.raises(case.error) as info:
        case.call()
    assert case.names in str(info.value), f"message does not name {case.names!r}: {info.value}"


def test_there_are_cases() -> None:
    assert len(CASES) > 0
