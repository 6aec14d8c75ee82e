"""Parity of vmf_contrast.py and neural_mesh.py with NOVUM's code (golden files, see tests/data/compnet/README.md).

Conventions converted at the boundary:
- NOVUM's memory is padded to max_n rows per class; ours is ragged. Row c*max_n + k (k < K[c]) is our row
  class_offsets[c] + k. Padded rows are masked with -1e5 in NOVUM's loss (exactly zero weight), enter the
  regulariser mean (we pass NOVUM's padded row set to `background_repulsion`) and the classifier's argmax
  (we pass them with class -1 and NOVUM's normaliser Y*max_n).
- The full NOVUM contrast is our loss with form="novum", num_sampled=None (all vertices) and omega = 1
  (the default form="paper" is Eq. 5, two softmax terms, tested in test_vmf_contrast.py).
- PASCAL pixel coordinates put pixel centres on integers, ours at +0.5: K gets cx = px + 0.5 and
  projected coordinates are compared as uv - 0.5. NOVUM's camera_position is -C (sign quirk).
- Our OpenCV rotation is diag(1, -1, -1) times the PASCAL rotation.
"""

import numpy as np
import pytest
import torch
from refdata import load_reference, reference_dir

from minimal3d.cameras import camera_center, intrinsics, pose_from_angles, project, rotation_error
from minimal3d.neural_mesh import Mesh, cuboid_mesh, cuboid_ranges, vertex_visibility
from minimal3d.vmf_contrast import VertexMemory, background_repulsion, classification_scores, grouped_vmf_contrast

CONTRAST_FILES = sorted(p.name for p in reference_dir("compnet").glob("contrast_*.npz"))
FLIP = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))


def tensors(name):
    return {k: torch.from_numpy(v) for k, v in load_reference("compnet", name).items()}


def test_reference_files_found():
    assert len(CONTRAST_FILES) >= 2 and (reference_dir("compnet") / "pose_mesh.npz").exists()


@pytest.mark.parametrize("name", CONTRAST_FILES)
def test_contrast_loss_gradients_memory_and_scores(name):
    d = tensors(name)
    Y, max_n, T = int(d["Y"]), int(d["max_n"]), int(d["num_noise"])
    sizes = d["K"].tolist()
    num_background = d["memory_init"].shape[0] - Y * max_n
    ours = torch.cat([torch.arange(k) + c * max_n for c, k in enumerate(sizes)])  # NOVUM row of each of our rows
    padded = torch.ones(Y * max_n, dtype=torch.bool)
    padded[ours] = False
    assert torch.equal(torch.nonzero(padded).flatten(), d["pad_index"])
    memory = VertexMemory(sizes, dim=int(d["D"]), num_background=num_background, momentum=float(d["momentum"]),
                          vertices=d["memory_init"][ours], background=d["memory_init"][Y * max_n:])
    novum_memory = d["memory_init"]
    steps = sorted({int(k[4:].split("_")[0]) for k in d if k.startswith("step")})
    for s in steps:
        p = f"step{s}_"
        assert int(memory.pointer) == int(d[p + "fifo_slot"]) * T * len(d[p + "labels"])
        assert torch.equal(d[p + "index"], d[p + "labels"][:, None] * max_n + torch.arange(max_n))
        features = d[p + "features"].clone().requires_grad_(True)
        loss_main, groups = grouped_vmf_contrast(
            features[:, :max_n], d[p + "keypoints"], d[p + "visible"], d[p + "labels"], memory, omega=None,
            num_sampled=None, temperature=float(d["T"]), distance_threshold=float(d["distance_thr"]),
            background_weight=float(d["weight_noise"]), return_logits=True, form="novum")
        loss_reg = background_repulsion(features[:, max_n:], novum_memory[: Y * max_n])  # padded rows included
        loss = loss_main + loss_reg
        loss.backward()
        # measured max errors (both files, both steps): loss_main 9e-16, loss_reg 4e-19, grad 3.7e-16
        torch.testing.assert_close(loss_main, d[p + "loss_main"], rtol=0, atol=1e-10)
        torch.testing.assert_close(loss_reg, d[p + "loss_reg"], rtol=0, atol=1e-10)
        torch.testing.assert_close(loss, d[p + "loss"], rtol=0, atol=1e-10)
        torch.testing.assert_close(features.grad, d[p + "grad_features"], rtol=0, atol=1e-10)

        # masked logits of every gathered column -- measured 7e-15, 1.5e-11 on -1e5-masked entries (1 ulp at 1e5)
        novum_column = torch.cat([ours, Y * max_n + torch.arange(num_background)])
        reference = d[p + "logits_masked"]
        covered = torch.zeros(reference.shape, dtype=torch.bool)
        for g in groups:
            torch.testing.assert_close(g["logits"].detach(), reference[g["image"], g["slot"]][:, novum_column[g["columns"]]],
                                       rtol=0, atol=1e-10)
            covered[g["image"][:, None], g["slot"][:, None], novum_column[g["columns"]][None]] = True
        visible_rows = d[p + "visible"] > 0
        # the columns we do not have are NOVUM's padded rows, masked with -1e5 (zero weight)
        ours_or_background = torch.cat([~padded, torch.ones(num_background, dtype=torch.bool)])
        assert torch.equal(covered[visible_rows], ours_or_background.expand(int(visible_rows.sum()), -1))
        raw = torch.einsum("bkd,jd->bkj", d[p + "features"][:, :max_n], novum_memory) / float(d["T"])
        pad_logits = reference[visible_rows][:, : Y * max_n][:, padded]
        torch.testing.assert_close(pad_logits, raw[visible_rows][:, : Y * max_n][:, padded] - 1e5, rtol=0, atol=1e-10)

        memory.update(features[:, :max_n].detach(), d[p + "visible"], d[p + "labels"], features[:, max_n:].detach())
        after = d[p + "memory_after"]
        # measured: vertices 2.2e-16, background 1.1e-16
        torch.testing.assert_close(memory.vertices, after[ours], rtol=0, atol=1e-10)
        torch.testing.assert_close(memory.background, after[Y * max_n:], rtol=0, atol=1e-10)
        # NOVUM's padded rows keep their direction (they are only re-normalised)
        torch.testing.assert_close(after[: Y * max_n][padded], novum_memory[: Y * max_n][padded], rtol=0, atol=1e-10)
        novum_memory = after

    owner = torch.full((Y * max_n,), -1)
    owner[ours] = memory.vertex_class
    raw_scores = classification_scores(d["cls_feature_map"], novum_memory[: Y * max_n], owner, Y, rule="novum",
                                       normalizer=Y * max_n)[0]
    # measured: raw 2.1e-17, softmax 2.8e-17
    torch.testing.assert_close(raw_scores, d["cls_scores_raw"], rtol=0, atol=1e-12)
    torch.testing.assert_close(raw_scores.softmax(0), d["cls_scores_softmax"], rtol=0, atol=1e-12)
    assert int(raw_scores.argmax()) == int(d["cls_pred"])


def test_cuboid_meshes():
    d = tensors("pose_mesh.npz")
    classes = sorted(int(k[6:].split("_")[0]) for k in d if k.endswith("_cad_vertices"))
    assert classes
    for c in classes:
        mesh = cuboid_mesh(cuboid_ranges(d[f"cuboid{c}_cad_vertices"]), int(d[f"cuboid{c}_number_vertices"]))
        # measured 1.3e-7 (the reference went through a float32 .off file)
        torch.testing.assert_close(mesh.vertices, d[f"cuboid{c}_vertices"], rtol=0, atol=1e-6)
        assert torch.equal(mesh.faces, d[f"cuboid{c}_faces"])


def test_pose_projection_geodesic_and_visibility():
    d = tensors("pose_mesh.npz")
    viewmat = pose_from_angles(d["azimuth"], d["elevation"], d["theta"], d["distance"])  # (n, 4, 4) OpenCV
    rotation = FLIP @ viewmat[:, :3, :3]  # back to the PASCAL camera (looks down -z)
    torch.testing.assert_close(rotation, d["rotation"], rtol=0, atol=1e-12)  # measured 1.1e-16
    at_zero_theta = pose_from_angles(d["azimuth"], d["elevation"], torch.zeros_like(d["theta"]), d["distance"])
    extrinsic = at_zero_theta.clone()
    extrinsic[:, :3] = FLIP @ at_zero_theta[:, :3]
    torch.testing.assert_close(extrinsic, d["extrinsic"], rtol=0, atol=1e-12)  # measured 8.9e-16
    torch.testing.assert_close(-camera_center(viewmat), d["camera_position"], rtol=0, atol=1e-12)  # 2.7e-15

    focal = float(d["focal"] * d["viewport"])
    K = intrinsics(focal, focal, d["principal"][:, 0] + 0.5, d["principal"][:, 1] + 0.5)  # integer -> +0.5 centres
    vertices = d["cuboid0_vertices"]
    uv, _ = project(vertices.expand(len(viewmat), -1, -1), viewmat, K)
    torch.testing.assert_close(uv - 0.5, d["projected_xy"], rtol=0, atol=1e-8)  # measured 4.5e-13

    geodesic = rotation_error(rotation[:, None], rotation[None])
    torch.testing.assert_close(geodesic, d["geodesic_error"], rtol=0, atol=1e-6)  # measured 3.1e-15

    faces = d["cuboid0_faces"]
    for i in range(len(viewmat)):
        ours = vertex_visibility(Mesh(vertices, faces), viewmat[i], K[i])[0]
        agreement = float((ours == d["visible"][i]).double().mean())
        assert agreement >= 0.85, (i, agreement)  # measured 0.87 .. 0.96
