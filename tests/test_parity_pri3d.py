"""Parity with the official Pri3D / PointContrast code (golden files in tests/data/pri3d, README there).

Every case stored in each file is checked; tolerances are the README's (rtol 1e-9, atol 1e-12 on losses and
gradients, exact equality on integer matches). Measured worst errors are noted next to each comparison.
"""


import numpy as np
import pytest
import torch

from minimal3d.correspondences import pixel_correspondences, voxel_pixel_correspondences
from minimal3d.point_info_nce import depth_loss, point_info_nce
from refdata import load_reference
from train_scripts import load_script

RTOL, ATOL = 1e-9, 1e-12


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(np.asarray(expected)), rtol=RTOL, atol=ATOL)


def cases(name):
    ref = load_reference("pri3d", name)
    return [(ref, i) for i in range(int(ref["num_cases"]))]


@pytest.mark.parametrize("chunk_size", [None, 64])
@pytest.mark.parametrize("ref,case", cases("loss_pri3d.npz"))
def test_pri3d_contrastive_loss(ref, case, chunk_size):
    p = f"case{case}_"
    F1 = torch.tensor(ref["F1"], requires_grad=True)
    F2 = torch.tensor(ref["F2"], requires_grad=True)
    # The stored grad_F1 is d loss / d (scale1 * F1): the README says "w.r.t. the unscaled F1", but for the
    # scale1 = 1e-3 case the file holds exactly 1000x that gradient, i.e. the gradient w.r.t. the scaled
    # features (for scale1 = 1 both readings agree). We compare against what the file holds.
    scaled = (float(ref[p + "scale1"]) * F1).detach().requires_grad_(True)
    q, k = scaled[torch.tensor(ref[p + "idx1"])], F2[torch.tensor(ref[p + "idx2"])]
    loss = point_info_nce(q, k, float(ref[p + "T"]), symmetric=True, normalize=True, chunk_size=chunk_size)
    loss.backward()
    close(loss, ref[p + "loss"])  # measured: 0 dense, <= 1.8e-15 chunked
    close(scaled.grad, ref[p + "grad_F1"])  # measured: 0 dense, <= 2.1e-17 chunked
    close(F2.grad, ref[p + "grad_F2"])  # measured: 0 dense, <= 2.5e-17 chunked


@pytest.mark.parametrize("chunk_size", [None, 64])
@pytest.mark.parametrize("ref,case", cases("loss_pointcontrast.npz"))
def test_pointcontrast_loss(ref, case, chunk_size):
    p = f"case{case}_"
    F0 = torch.tensor(ref["F0"], requires_grad=True)
    F1 = torch.tensor(ref["F1"], requires_grad=True)
    corr = torch.tensor(ref[p + "corr"])
    loss = point_info_nce(F0[corr[:, 0]], F1[corr[:, 1]], float(ref[p + "T"]), symmetric=False,
                          normalize=bool(ref[p + "normalize"]), chunk_size=chunk_size)
    loss.backward()
    close(loss, ref[p + "loss"])  # measured: 0 dense, <= 3.6e-15 chunked
    close(F0.grad, ref[p + "grad_F0"])  # measured: 0 dense, <= 1e-14 chunked
    close(F1.grad, ref[p + "grad_F1"])  # measured: 0 dense, <= 1.2e-14 chunked


def test_depth_loss():
    ref = load_reference("pri3d", "depth_loss.npz")
    pred = torch.tensor(ref["pred"], requires_grad=True)
    loss = depth_loss(pred, torch.tensor(ref["target"]), invalid_value=0.0)
    loss.backward()
    close(loss, ref["loss"])  # measured: 2.1e-17
    close(pred.grad, ref["grad_pred"])  # measured: 1.7e-18


def pair_ids():
    ref = load_reference("pri3d", "correspondences.npz")
    return [(ref, p) for p in range(int(ref["num_pairs"]))]


@pytest.mark.parametrize("ref,pair", pair_ids())
def test_correspondences(ref, pair):
    p = f"pair{pair}_"
    K = torch.tensor(ref["K"])
    depth1, depth2 = torch.tensor(ref[p + "depth1"]), torch.tensor(ref[p + "depth2"])
    assert depth1.shape == (int(ref["H"]), int(ref["W"]))
    viewmat1 = torch.linalg.inv(torch.tensor(ref[p + "camera2world1"]))
    viewmat2 = torch.linalg.inv(torch.tensor(ref[p + "camera2world2"]))
    # the anchor's bbox (-0.5, -0.5) cancels its +0.5: pixel centres on integers, i.e. convention="pri3d"
    assert np.allclose(ref["bbox"], -0.5)
    pos1, pos2 = pixel_correspondences(depth1, depth2, K, viewmat1, viewmat2, float(ref["thresh"]), "pri3d")
    assert torch.equal(pos1, torch.tensor(ref[p + "pos1"]))  # exact
    assert torch.equal(pos2, torch.tensor(ref[p + "pos2"]))  # exact
    world2grid = torch.tensor(ref["world2grid"])
    voxel_size = 1.0 / float(world2grid[0, 0])
    assert torch.equal(world2grid, torch.diag(torch.tensor([1 / voxel_size] * 3 + [1.0], dtype=torch.float64)))
    pixels, voxel_index = voxel_pixel_correspondences(torch.tensor(ref[p + "voxels"]), depth1, K, viewmat1,
                                                      voxel_size, float(ref["voxel_depth_tol"]), "pri3d")
    assert torch.equal(pixels.flip(1), torch.tensor(ref[p + "vox_ind2d"]))  # exact; the anchor stores (x, y)
    assert torch.equal(voxel_index, torch.tensor(ref[p + "vox_ind3d"]))  # exact
    for dtype in (torch.float32,):  # the file records how many matches change in float32 (0 everywhere)
        pos1_32, _ = pixel_correspondences(depth1.to(dtype), depth2.to(dtype), K.to(dtype), viewmat1.to(dtype),
                                           viewmat2.to(dtype), float(ref["thresh"]), "pri3d")
        symdiff = len(set(map(tuple, pos1_32.tolist())) ^ set(map(tuple, pos1.tolist())))
        assert symdiff == int(ref[p + "float32_symdiff"])


def test_pipeline_view_and_geo():
    """Whole Pri3D.forward (View + Geo, identity backbones) with the recorded sampling draws."""
    script = load_script("train_pri3d")
    ref = load_reference("pri3d", "pipeline_pri3d.npz")
    leaves = {key: torch.tensor(ref[key], requires_grad=True) for key in
              ("fmap1", "fmap2", "feature3d1", "feature3d2", "w2d_weight", "w2d_bias", "w3d_weight", "w3d_bias")}
    w2d = lambda x: x @ leaves["w2d_weight"].T + leaves["w2d_bias"]  # noqa: E731  torch Linear
    w3d = lambda x: x @ leaves["w3d_weight"].T + leaves["w3d_bias"]  # noqa: E731
    batch, K = int(ref["B"]), torch.tensor(ref["K"])
    assert ref["fmap1"].shape[-2:] == (int(ref["H"]) // 2, int(ref["W"]) // 2)
    voxel_size = 1.0 / float(ref["world2grid"][0, 0])
    # the pipeline was built from the pairs of correspondences.npz (README section 4): its voxel tolerance
    voxel_depth_tol = float(load_reference("pri3d", "correspondences.npz")["voxel_depth_tol"])
    matches, voxel_features1, voxel_features2 = [], [], []
    for b in range(batch):
        viewmat1, viewmat2 = torch.tensor(ref["world2camera1"][b]), torch.tensor(ref["world2camera2"][b])
        depth1, depth2 = torch.tensor(ref["depth1"][b]), torch.tensor(ref["depth2"][b])
        pos1, pos2 = pixel_correspondences(depth1, depth2, K, viewmat1, viewmat2, float(ref["thresh"]), "pri3d")
        match = dict(pos1=pos1, pos2=pos2)
        for frame, depth, viewmat, voxel_features in ((1, depth1, viewmat1, voxel_features1),
                                                      (2, depth2, viewmat2, voxel_features2)):
            in_batch = torch.tensor(ref[f"pointcloud{frame}"][:, 0] == b)
            voxels = torch.tensor(ref[f"pointcloud{frame}"])[in_batch, 1:]
            match[f"pixels{frame}"], match[f"voxel_index{frame}"] = voxel_pixel_correspondences(
                voxels, depth, K, viewmat, voxel_size, voxel_depth_tol, "pri3d")
            voxel_features.append(leaves[f"feature3d{frame}"][in_batch])
        matches.append(match)
    draws = {(int(ref["choice_batch"][i]), int(ref["choice_kind"][i])): i for i in range(int(ref["num_choices"]))}

    def choose(b, kind, population):
        i = draws[(b, kind)]
        assert population == int(ref[f"choice{i}_n"])  # our match counts equal the anchor's
        assert (population < int(ref["sample_points"])) == bool(ref[f"choice{i}_replace"])
        return torch.tensor(ref[f"choice{i}"])

    loss, counts = script.contrastive_loss(leaves["fmap1"], leaves["fmap2"], matches, "view+geo", float(ref["T"]),
                                           choose, voxel_features1, voxel_features2, w2d, w3d)
    assert counts["view_terms"] + counts["skipped_pairs"] == batch
    assert counts["view_terms"] + counts["geo_terms"] == len(draws)
    loss.backward()
    close(loss, ref["loss"])  # measured: 0
    for key, leaf in leaves.items():
        close(leaf.grad, ref[f"grad_{key}"])  # measured: <= 8.3e-18


def test_a_wrong_reference_value_fails():
    """The comparisons above are tight enough to catch a reference off by one part in 1e8 or one pixel."""
    ref = load_reference("pri3d", "loss_pri3d.npz")
    p = "case1_"
    q, k = torch.tensor(ref["F1"])[torch.tensor(ref[p + "idx1"])], torch.tensor(ref["F2"])[torch.tensor(ref[p + "idx2"])]
    loss = point_info_nce(float(ref[p + "scale1"]) * q, k, float(ref[p + "T"]))
    close(loss, ref[p + "loss"])
    with pytest.raises(AssertionError):
        close(loss, ref[p + "loss"] * (1 + 1e-8))
    with pytest.raises(AssertionError):  # the paper's one-directional form is not the official loss
        close(point_info_nce(float(ref[p + "scale1"]) * q, k, float(ref[p + "T"]), symmetric=False), ref[p + "loss"])
    corr = load_reference("pri3d", "correspondences.npz")
    depth1, depth2 = torch.tensor(corr["pair0_depth1"]), torch.tensor(corr["pair0_depth2"])
    viewmat1 = torch.linalg.inv(torch.tensor(corr["pair0_camera2world1"]))
    viewmat2 = torch.linalg.inv(torch.tensor(corr["pair0_camera2world2"]))
    pos1, _ = pixel_correspondences(depth1, depth2, torch.tensor(corr["K"]), viewmat1, viewmat2,
                                    float(corr["thresh"]), "pri3d")
    wrong = torch.tensor(corr["pair0_pos1"]).clone()
    wrong[len(wrong) // 2, 1] += 1
    assert torch.equal(pos1, torch.tensor(corr["pair0_pos1"])) and not torch.equal(pos1, wrong)
