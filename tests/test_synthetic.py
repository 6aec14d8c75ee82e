import math

import pytest
import torch

from minimal3d import cameras, synthetic

UP = torch.tensor([0.0, 0.0, 1.0])


def camera(eye, target, width=24, height=20, fov=60.0, dtype=torch.float32):
    viewmat = cameras.look_at(torch.tensor(eye, dtype=dtype), torch.tensor(target, dtype=dtype), UP.to(dtype))
    return viewmat, cameras.fov_intrinsics(math.radians(fov), width, height).to(dtype)


def one_primitive_scene(kind, center, half_size, yaw=0.3, dtype=torch.float32):
    builder = synthetic.SceneBuilder()
    builder.add(kind, center, half_size, synthetic.Texture(), label=3, instance=7, yaw=yaw)
    return builder.build(dtype)


# ------------------------------------------------------------------------------------------------
# Ray caster: geometry against the camera functions and against a naive per-pixel loop
# ------------------------------------------------------------------------------------------------


def test_unprojected_depth_lands_on_analytic_surfaces():
    viewmat, K = camera((0.3, -4.0, 1.5), (0.0, 0.0, 0.5), 40, 32, fov=50.0)
    # a tilted plane (quad), a sphere and a rotated box, one scene each
    normal = torch.tensor([0.0, -math.sin(0.4), math.cos(0.4)])  # the quad's local z after Rx(0.4)
    rotation = [[1, 0, 0], [0, math.cos(0.4), -math.sin(0.4)], [0, math.sin(0.4), math.cos(0.4)]]
    builder = synthetic.SceneBuilder()
    builder.add("quad", (0.0, 0.0, 0.2), (20.0, 20.0, 1.0), synthetic.Texture(), rotation=rotation)
    render = synthetic.render_scene(builder.build(), viewmat, K, 40, 32)
    hit = render["depth"] > 0
    points = cameras.unproject_depth(render["depth"], viewmat, K)[hit]
    assert hit.float().mean() > 0.5
    residual = (points - torch.tensor([0.0, 0.0, 0.2])) @ normal  # plane equation
    assert residual.abs().max() < 1e-4

    sphere = one_primitive_scene("sphere", (0.2, 0.1, 0.6), (0.9, 0.9, 0.9))
    render = synthetic.render_scene(sphere, viewmat, K, 40, 32)
    hit = render["depth"] > 0
    points = cameras.unproject_depth(render["depth"], viewmat, K)[hit]
    assert 0.1 < hit.float().mean() < 0.9
    radius = (points - torch.tensor([0.2, 0.1, 0.6])).norm(dim=-1)
    assert (radius - 0.9).abs().max() < 1e-4
    assert torch.equal(render["label"][hit], torch.full_like(render["label"][hit], 3))
    assert (render["label"][~hit] == -1).all() and (render["instance"][~hit] == -1).all()

    box = one_primitive_scene("box", (0.0, 0.0, 0.5), (0.8, 0.5, 0.6), yaw=0.5)
    render = synthetic.render_scene(box, viewmat, K, 40, 32)
    hit = render["depth"] > 0
    points = cameras.unproject_depth(render["depth"], viewmat, K)[hit]
    c, s = math.cos(0.5), math.sin(0.5)
    local = (points - torch.tensor([0.0, 0.0, 0.5])) @ torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    on_surface = (local.abs() / torch.tensor([0.8, 0.5, 0.6])).amax(-1)
    assert (on_surface - 1).abs().max() < 1e-4


def test_camera_inside_box_sees_its_walls_everywhere():
    viewmat, K = camera((0.5, -1.0, 1.2), (0.0, 2.0, 1.0), 32, 24, fov=90.0, dtype=torch.float64)
    room = one_primitive_scene("box", (0.0, 0.0, 1.5), (3.0, 4.0, 1.5), yaw=0.0, dtype=torch.float64)
    render = synthetic.render_scene(room, viewmat, K, 32, 24)
    assert (render["depth"] > 0).all()
    points = cameras.unproject_depth(render["depth"], viewmat, K).reshape(-1, 3)
    center, half = torch.tensor([0.0, 0.0, 1.5]).double(), torch.tensor([3.0, 4.0, 1.5]).double()
    local = (points - center).abs() / half
    torch.testing.assert_close(local.amax(-1), torch.ones(32 * 24, dtype=torch.float64), atol=1e-9, rtol=0)


def test_empty_scene_and_misses():
    viewmat, K = camera((0.0, -3.0, 1.0), (0.0, 0.0, 1.0), 16, 12)
    render = synthetic.render_scene(synthetic.SceneBuilder().build(), viewmat, K, 16, 12)
    assert (render["depth"] == 0).all() and (render["image"] == 0).all() and (render["label"] == -1).all()
    behind = one_primitive_scene("sphere", (0.0, -6.0, 1.0), (0.5, 0.5, 0.5))  # behind the camera
    assert (synthetic.render_scene(behind, viewmat, K, 16, 12)["instance"] == -1).all()
    with pytest.raises(TypeError):
        synthetic.render_scene(behind, viewmat.tolist(), K, 16, 12)


def naive_ray_cast(primitives, viewmat, K, width, height):
    """Per-pixel, per-primitive loops in float64 Python: (depth (H, W), index (H, W)) of the nearest hit."""
    R = viewmat[:3, :3].double().tolist()
    t_vec = viewmat[:3, 3].double().tolist()
    eye = [-sum(R[j][i] * t_vec[j] for j in range(3)) for i in range(3)]
    fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
    depth = torch.zeros(height, width, dtype=torch.float64)
    index = torch.full((height, width), -1)
    for v in range(height):
        for u in range(width):
            d_cam = [(u + 0.5 - cx) / fx, (v + 0.5 - cy) / fy, 1.0]
            d = [sum(R[j][i] * d_cam[j] for j in range(3)) for i in range(3)]
            norm = math.sqrt(sum(x * x for x in d))
            d = [x / norm for x in d]
            best = math.inf
            for p, (kind, center, half, yaw) in enumerate(primitives):
                c, s = math.cos(yaw), math.sin(yaw)
                rel = [eye[i] - center[i] for i in range(3)]
                o = [(c * rel[0] + s * rel[1]) / half[0], (-s * rel[0] + c * rel[1]) / half[1], rel[2] / half[2]]
                dl = [(c * d[0] + s * d[1]) / half[0], (-s * d[0] + c * d[1]) / half[1], d[2] / half[2]]
                roots = []
                if kind == "quad" and dl[2] != 0:
                    t = -o[2] / dl[2]
                    if abs(o[0] + t * dl[0]) <= 1 and abs(o[1] + t * dl[1]) <= 1:
                        roots.append(t)
                if kind == "box":
                    lo, hi = -math.inf, math.inf
                    for i in range(3):
                        t1, t2 = (-1 - o[i]) / dl[i], (1 - o[i]) / dl[i]
                        lo, hi = max(lo, min(t1, t2)), min(hi, max(t1, t2))
                    if lo <= hi:
                        roots += [lo, hi]
                if kind == "sphere":
                    a, b = sum(x * x for x in dl), sum(x * y for x, y in zip(o, dl))
                    disc = b * b - a * (sum(x * x for x in o) - 1)
                    if disc >= 0:
                        roots += [(-b - math.sqrt(disc)) / a, (-b + math.sqrt(disc)) / a]
                if kind == "cylinder":
                    a, b = dl[0] ** 2 + dl[1] ** 2, o[0] * dl[0] + o[1] * dl[1]
                    disc = b * b - a * (o[0] ** 2 + o[1] ** 2 - 1)
                    if disc >= 0:
                        roots += [t for t in ((-b - math.sqrt(disc)) / a, (-b + math.sqrt(disc)) / a)
                                  if abs(o[2] + t * dl[2]) <= 1]
                    for cap in (-1, 1):
                        t = (cap - o[2]) / dl[2]
                        if (o[0] + t * dl[0]) ** 2 + (o[1] + t * dl[1]) ** 2 <= 1:
                            roots.append(t)
                for t in roots:
                    if 1e-6 < t < best:
                        best, index[v, u] = t, p
            if best < math.inf:
                depth[v, u] = best * d_cam[2] / norm  # z-depth
    return depth, index


def test_ray_caster_matches_naive_loops():
    primitives = [("quad", (0.0, 0.0, 0.0), (3.0, 3.0, 1.0), 0.2),
                  ("box", (-0.8, 0.3, 0.5), (0.4, 0.3, 0.5), 0.7),
                  ("sphere", (0.6, -0.2, 0.6), (0.5, 0.35, 0.6), 1.1),
                  ("cylinder", (0.1, 0.9, 0.7), (0.3, 0.2, 0.7), -0.4)]
    builder = synthetic.SceneBuilder()
    for number, (kind, center, half, yaw) in enumerate(primitives):
        builder.add(kind, center, half, synthetic.Texture(), instance=number, yaw=yaw)
    scene = builder.build(torch.float64)
    viewmat, K = camera((1.0, -3.5, 2.2), (0.0, 0.2, 0.4), 26, 20, dtype=torch.float64)
    render = synthetic.render_scene(scene, viewmat, K, 26, 20, chunk_rays=37)
    depth, index = naive_ray_cast(primitives, viewmat, K, 26, 20)
    assert torch.equal(render["instance"], index)  # instance number = position in the list above
    torch.testing.assert_close(render["depth"], depth, atol=1e-9, rtol=0)  # measured 4e-15
    assert len(index.unique()) == 5  # every primitive and the background are visible


def test_textures_and_shading_are_in_range_and_patterned():
    viewmat, K = camera((0.0, -3.0, 1.0), (0.0, 0.0, 1.0), 48, 32, fov=70.0)
    for pattern in synthetic.PATTERNS:
        texture = synthetic.Texture(pattern, (0.9, 0.2, 0.1), (0.1, 0.3, 0.9), frequency=3.0, axis=(1, 0, 0), seed=5)
        builder = synthetic.SceneBuilder()
        builder.add("quad", (0.0, 0.0, 1.0), (3.0, 3.0, 1.0), texture, rotation=[[1, 0, 0], [0, 0, -1], [0, 1, 0]])
        image = synthetic.render_scene(builder.build(), viewmat, K, 48, 32)["image"]
        assert image.shape == (3, 32, 48) and image.min() >= 0 and image.max() <= 1
        spread = image[0].std()
        assert (spread < 0.02) if pattern == "solid" else (spread > 0.05)


# ------------------------------------------------------------------------------------------------
# World 1: single images
# ------------------------------------------------------------------------------------------------


def test_single_image_sample_shapes_ranges_and_determinism():
    sample = synthetic.single_image_sample(13, "train", 40, 48, num_classes=10, seed=3)
    assert sample["image"].shape == (3, 40, 48) and sample["image"].dtype == torch.float32
    assert 0 <= sample["image"].min() and sample["image"].max() <= 1
    assert sample["depth"].shape == (40, 48) and (sample["depth"] > 0.5).all() and sample["depth"].max() < 12
    assert sample["label"].dtype == torch.int64 and int(sample["label"]) == 3
    assert sample["instance"].dtype == torch.int64 and (sample["instance"] > 0).any()
    assert sample["viewmat"].shape == (4, 4) and sample["K"].shape == (3, 3)
    # bit-identical and independent of the order of requests
    other = synthetic.single_image_sample(2, "train", 40, 48, num_classes=10, seed=3)
    again = synthetic.single_image_sample(13, "train", 40, 48, num_classes=10, seed=3)
    for key in sample:
        assert torch.equal(sample[key], again[key]), key
    assert not torch.equal(other["image"], sample["image"])
    assert not torch.equal(synthetic.single_image_sample(13, "test", 40, 48, seed=3)["image"], sample["image"])
    # the nominal camera is the jitter-free one
    fixed = synthetic.single_image_sample(13, "train", 40, 48, seed=3, camera_jitter=0.0)
    viewmat, K = synthetic.single_image_camera(40, 48)
    torch.testing.assert_close(fixed["viewmat"], viewmat)
    torch.testing.assert_close(fixed["K"], K)


def test_texture_swap_keeps_shapes_and_depth():
    for index in range(4):
        clean = synthetic.single_image_sample(index, "test", 48, 48)
        swapped = synthetic.single_image_sample(index, "test", 48, 48, texture_swap=True)
        assert torch.equal(clean["depth"], swapped["depth"])
        assert torch.equal(clean["instance"], swapped["instance"])
        assert torch.equal(clean["label"], swapped["label"])
        assert (clean["image"] - swapped["image"]).abs().mean() > 0.05


def test_single_image_classes_differ_by_shape():
    names = synthetic.single_image_class_names(10)
    assert len(set(names)) == 10 and len(synthetic.single_image_class_names(30)) == 30
    counts = [int(synthetic.single_image_sample(i, "train", 48, 48)["instance"].amax()) for i in range(10)]
    expected = [len(name.split(":")[1].split("+")) for name in names]
    assert counts == expected  # the number of visible objects follows the class layout
    dataset = synthetic.SingleImageDataset(5, "test", size=32, texture_swap=True, seed=1)
    assert len(dataset) == 5
    expected = synthetic.single_image_sample(4, "test", 32, 32, seed=1, texture_swap=True)
    assert torch.equal(dataset[4]["image"], expected["image"])


# ------------------------------------------------------------------------------------------------
# World 2: room sequences
# ------------------------------------------------------------------------------------------------


def test_room_sequence_geometry_labels_and_overlap():
    sequence = synthetic.room_sequence(seed=2, num_frames=6, height=48, width=64)
    images, depth, labels = sequence["images"], sequence["depth"], sequence["labels"]
    viewmats, K = sequence["viewmats"], sequence["K"]
    assert images.shape == (6, 3, 48, 64) and depth.shape == labels.shape == (6, 48, 64)
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < synthetic.NUM_ROOM_CLASSES
    assert len(sequence["class_names"]) == synthetic.NUM_ROOM_CLASSES
    assert (depth > 0.2).all() and 0 <= images.min() and images.max() <= 1
    assert len(labels.unique()) >= 4  # floor, wall and some furniture
    rotations = viewmats[:, :3, :3]
    torch.testing.assert_close(rotations @ rotations.transpose(1, 2), torch.eye(3).expand(6, 3, 3), atol=1e-5, rtol=0)
    # reproject frame 0 into frame k with depth and poses: most pixels land on the same surface
    points = cameras.unproject_depth(depth[0], viewmats[0], K).reshape(-1, 3)
    for k in (1, 3, 5):
        uv, z = cameras.project(points, viewmats[k], K)
        col, row = uv[:, 0].floor().long(), uv[:, 1].floor().long()
        inside = (col >= 0) & (col < 64) & (row >= 0) & (row < 48) & (z > 0)
        target_depth = depth[k][row.clamp(0, 47), col.clamp(0, 63)]
        match = inside & ((target_depth - z).abs() < 0.05)
        assert match.float().mean() > 0.3, k
        same_label = labels[k][row[match], col[match]] == labels[0].flatten()[match]
        assert same_label.float().mean() > 0.95
    again = synthetic.room_sequence(seed=2, num_frames=2, height=48, width=64)
    assert torch.equal(again["images"], images[:2]) and torch.equal(again["labels"], labels[:2])


# ------------------------------------------------------------------------------------------------
# World 3: posed objects
# ------------------------------------------------------------------------------------------------


def test_object_sample_pose_mask_and_parts_are_consistent():
    for index in range(6):
        sample = synthetic.object_sample(index, num_classes=6, split="train", height=64, width=64)
        label = int(sample["label"])
        assert label == index % 6 and sample["mask"].dtype == torch.bool
        assert torch.equal(sample["mask"], sample["amodal_mask"]) and sample["occlusion_fraction"] == 0
        viewmat = cameras.pose_from_angles(sample["azimuth"], sample["elevation"], sample["theta"], sample["distance"])
        torch.testing.assert_close(viewmat, sample["viewmat"])
        assert 64 * 64 * 0.05 < sample["mask"].sum() < 64 * 64 * 0.8
        # the body's centre (inside a solid part) projects into the object mask
        parts = synthetic.class_parts(6, label)
        body = max(parts, key=lambda p: p["half_size"][0] * p["half_size"][1])
        uv, _ = cameras.project(body["center"][None], sample["viewmat"], sample["K"])
        col, row = int(uv[0, 0]), int(uv[0, 1])
        assert sample["mask"][row, col]
        # object pixels unproject into the class cuboid, and the cuboid's corners bound the mask
        cuboid = sample["cuboid"]
        torch.testing.assert_close(cuboid, synthetic.class_cuboid(6, label))
        points = cameras.unproject_depth(sample["depth"], sample["viewmat"], sample["K"])[sample["mask"]]
        assert (points.abs() <= cuboid / 2 + 1e-4).all()
        corners = torch.cartesian_prod(*[torch.tensor([-0.5, 0.5])] * 3) * cuboid
        uv, _ = cameras.project(corners, sample["viewmat"], sample["K"])
        rows, cols = torch.nonzero(sample["mask"], as_tuple=True)
        assert cols.min() + 0.5 >= uv[:, 0].min() and cols.max() + 0.5 <= uv[:, 0].max()
        assert rows.min() + 0.5 >= uv[:, 1].min() and rows.max() + 0.5 <= uv[:, 1].max()


def test_object_classes_are_confusable_pairs_spanning_their_cuboid():
    for class_index in (0, 1, 6, 7, 150, 151):
        parts = synthetic.class_parts(200, class_index)
        lows = torch.stack([p["center"] - p["half_size"] for p in parts]).amin(0)
        highs = torch.stack([p["center"] + p["half_size"] for p in parts]).amax(0)
        cuboid = synthetic.class_cuboid(200, class_index)
        torch.testing.assert_close(highs - lows, cuboid)
        torch.testing.assert_close(highs, cuboid / 2)
        torch.testing.assert_close(cuboid.norm(), torch.tensor(2.4))
    for pair in (0, 3, 75):
        first, second = synthetic.class_cuboid(200, 2 * pair), synthetic.class_cuboid(200, 2 * pair + 1)
        assert ((first - second).abs() / first).max() < 0.2
    assert not torch.equal(synthetic.class_cuboid(10, 0), synthetic.class_cuboid(10, 2))


def test_occlusion_levels_cover_the_requested_fraction():
    for level, target in ((1, 0.2), (2, 0.4), (3, 0.6)):
        fractions = []
        for index in range(6):
            sample = synthetic.object_sample(index, split="test", occlusion=level, height=64, width=64)
            fraction = float(sample["occlusion_fraction"])
            measured = (sample["amodal_mask"] & sample["occluder_mask"]).sum() / sample["amodal_mask"].sum()
            assert abs(fraction - float(measured)) < 1e-6
            assert torch.equal(sample["mask"], sample["amodal_mask"] & ~sample["occluder_mask"])
            assert abs(fraction - target) < 0.15
            fractions.append(fraction)
        assert abs(sum(fractions) / len(fractions) - target) < 0.1
        # same object and pose as the unoccluded test image; occluders lie in front of it
        clean = synthetic.object_sample(5, split="test", height=64, width=64)
        assert torch.equal(clean["amodal_mask"], sample["amodal_mask"])
        occluded = sample["occluder_mask"] & sample["amodal_mask"]
        assert (sample["depth"][occluded] < clean["depth"][occluded]).all()


def test_corruptions_change_the_image_and_stay_in_range():
    clean = synthetic.object_sample(3, split="test", height=48, width=48)
    for corruption in synthetic.CORRUPTIONS:
        sample = synthetic.object_sample(3, split="test", corruption=corruption, severity=3, height=48, width=48)
        assert 0 <= sample["image"].min() and sample["image"].max() <= 1
        assert (sample["image"] - clean["image"]).abs().mean() > 0.01, corruption
        assert torch.equal(sample["mask"], clean["mask"])
        again = synthetic.object_sample(3, split="test", corruption=corruption, severity=3, height=48, width=48)
        assert torch.equal(sample["image"], again["image"])
    # fog: far pixels move further towards grey than near ones
    fogged = synthetic.corrupt_image(clean["image"], clean["depth"], "fog", 3)
    distance_to_grey = (fogged - 0.75).abs().mean(0)
    near, far = clean["depth"] < clean["depth"].median(), clean["depth"] >= clean["depth"].median()
    assert distance_to_grey[far].mean() < distance_to_grey[near].mean()
    # blur: a Gaussian blur (reflect padding) of a constant image is the constant
    flat = torch.full((3, 16, 16), 0.3)
    torch.testing.assert_close(synthetic.corrupt_image(flat, torch.ones(16, 16), "blur", 2), flat)
    dataset = synthetic.ObjectDataset(4, num_classes=4, split="calib", occlusion=1, height=32, width=32)
    assert len(dataset) == 4 and int(dataset[3]["label"]) == 3


# ------------------------------------------------------------------------------------------------
# Input validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda: synthetic.single_image_sample(0, height=4),
    lambda: synthetic.single_image_sample(0, width=32.0),
    lambda: synthetic.single_image_sample(-1),
    lambda: synthetic.single_image_sample(0, split="validation"),
    lambda: synthetic.single_image_sample(0, num_classes=31),
    lambda: synthetic.room_sequence(0, num_frames=0),
    lambda: synthetic.room_sequence(0, height=0),
    lambda: synthetic.object_sample(0, occlusion=4),
    lambda: synthetic.object_sample(0, corruption="jpeg"),
    lambda: synthetic.object_sample(0, severity=0),
    lambda: synthetic.object_sample(0, split="val"),
    lambda: synthetic.object_sample(0, num_classes=1),
    lambda: synthetic.class_cuboid(10, 10),
    lambda: synthetic.SceneBuilder().add("cone", (0, 0, 0), (1, 1, 1), synthetic.Texture()),
    lambda: synthetic.SceneBuilder().add("box", (0, 0, 0), (1, 0, 1), synthetic.Texture()),
    lambda: synthetic.render_scene(one_primitive_scene("box", (0, 0, 0), (1, 1, 1)), torch.eye(3), torch.eye(3), 8, 8),
])
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.slow
def test_default_room_sequence_overlap_and_classes():
    sequence = synthetic.room_sequence(seed=0, num_frames=24)  # 240 x 320, 6 degrees per frame
    depth, viewmats, K = sequence["depth"], sequence["viewmats"], sequence["K"]
    assert len(sequence["labels"].unique()) >= 7
    for k in (1, 5):
        points = cameras.unproject_depth(depth[:-k], viewmats[:-k], K).flatten(1, 2)  # (T - k, H W, 3)
        uv, z = cameras.project(points, viewmats[k:], K)
        col, row = uv[..., 0].floor().long(), uv[..., 1].floor().long()
        inside = (col >= 0) & (col < 320) & (row >= 0) & (row < 240) & (z > 0)
        frames = torch.arange(len(points))[:, None].expand_as(col)
        target = depth[k:][frames, row.clamp(0, 239), col.clamp(0, 319)]
        overlap = (inside & ((target - z).abs() < 0.05)).float().mean(-1)
        assert overlap.min() > 0.3, (k, overlap.min())
