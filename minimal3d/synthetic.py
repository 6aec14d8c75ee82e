"""Procedural synthetic worlds rendered by an analytic ray caster in pure PyTorch.

Every training script of minimal3d runs on these worlds when no real data is given, standing in for
the data of the four papers: ImageNet-style single images with pseudo depth for 3D-Prior (Aygun et al.,
"Enhancing 2D Representation Learning with a 3D Prior", 2024, arXiv:2406.02535); ScanNet-style RGB-D
sequences with poses and semantic labels for Pri3D (Hou et al., 2021, arXiv:2104.11225) and FiT3D
(Yue et al., 2024, arXiv:2407.20229); PASCAL3D+/ImageNet3D-style posed objects with OccludedPASCAL3D+
occluder levels and ImageNet-C-style corruptions for 3D-CompNets (Yuan et al., "Scaling 3D Compositional
Models for Robust Classification and Pose Estimation", ICCV 2025).
No official code is followed: the worlds are our own, documented below. Each scene is a
handful of analytic primitives (quads, oriented boxes, ellipsoids, cylinders) with procedural solid
textures (solid colour, stripes, checkers, value noise), rendered exactly: the pixel rays are
intersected with the primitives in closed form, vectorised over rays x primitives (with one bounding
sphere per object and primitive kind to skip rays that cannot hit it, and chunks of rays to bound
memory); the nearest hit gives metric z-depth, the per-object labels and a Lambert-shaded colour.
Cameras follow ``minimal3d.cameras`` (OpenCV axes, world-to-camera ``viewmat``, pixel centres at +0.5,
depth = camera z). Worlds are z-up.

Determinism: every sample draws from its own ``torch.Generator`` seeded by a hash of (world, seed,
split, index, stream), so the same arguments give bit-identical tensors in any order of requests.

API
---
Rendering (build your own scenes):
- ``Texture(pattern, color_a, color_b, frequency, axis, offset, seed)``; ``PATTERNS``.
- ``SceneBuilder().add(kind, center, half_size, texture, label=0, instance=0, yaw=0.0, rotation=None)``,
  ``.build() -> Scene``; ``kind`` in ``PRIMITIVES`` = ("quad", "box", "sphere", "cylinder").
- ``render_scene(scene, viewmat (4,4), K (3,3), width, height) -> dict(image (3,H,W) in [0,1],
  depth (H,W) camera z (0 where nothing is hit), label (H,W) int64, instance (H,W) int64, -1 where
  nothing is hit)``.

1. Single images with depth and shape classes (3D-Prior):
- ``single_image_sample(index, split="train", height=128, width=128, num_classes=10, seed=0,
  texture_swap=False, camera_jitter=1.0) -> dict(image, depth, label (), instance (H,W), viewmat, K)``.
  Depth is valid everywhere (closed room). Classes are shape layouts (``single_image_class_names``);
  textures are nuisance. ``texture_swap=True`` re-draws every texture from another stream (same
  shapes, bit-identical depth) and biases object colours towards a *different* class (cue conflict).
- ``SingleImageDataset(num_images, split, size=128, num_classes=10, texture_swap=False, seed=0)``;
  ``single_image_camera(height, width) -> (viewmat, K)`` the nominal fixed camera.
2. Multi-view RGB-D room sequences with semantic labels (Pri3D, FiT3D):
- ``room_sequence(seed, num_frames=40, height=240, width=320, step_degrees=6.0) -> dict(images
  (T,3,H,W), depth (T,H,W), labels (T,H,W) int64 in [0, NUM_ROOM_CLASSES), instances (T,H,W),
  viewmats (T,4,4), K (3,3), class_names)``. ``seed`` selects the room; use disjoint seeds for splits.
  ``ROOM_CLASS_NAMES``, ``NUM_ROOM_CLASSES``; ``room_camera_path(seed, num_frames, step_degrees)``.
  Scene geometry: unproject ``depth`` with ``cameras.unproject_depth`` (valid everywhere).
3. Object-centric images of Y cuboid classes at a known pose (3D-CompNets):
- ``object_sample(index, num_classes=10, split="train"|"calib"|"test", occlusion=0..3,
  corruption=None|"noise"|"blur"|"fog"|"brightness", severity=2, height=128, width=128, seed=0)
  -> dict(image, depth, mask (visible object, bool), amodal_mask, occluder_mask, occlusion_fraction,
  label, azimuth, elevation, theta, distance, viewmat, K, cuboid (3,))``; label = index % num_classes.
- ``ObjectDataset(num_images, num_classes=10, split="train", occlusion=0, corruption=None, ...)``;
  ``corrupt_image(image, depth, corruption, severity, generator)``; ``OCCLUSION_TARGETS``, ``CORRUPTIONS``.
- ``class_cuboid(num_classes, class_index) -> (3,)`` full extents (x, y, z) of the class's cuboid,
  centred on the object origin; ``class_parts(num_classes, class_index) -> list[dict(kind, center,
  half_size)]`` the primitives inside it. Classes come in confusable pairs (2k, 2k+1).
"""

import colorsys
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from minimal3d import cameras

PRIMITIVES = ("quad", "box", "sphere", "cylinder")
PATTERNS = ("solid", "stripes", "checkers", "noise")
_QUAD, _BOX, _SPHERE, _CYLINDER = range(4)
_SOLID, _STRIPES, _CHECKERS, _NOISE = range(4)
_HIT_EPS = 1e-6  # rays start at the camera centre; hits closer than this are ignored


# ---------------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------------


def _generator(*keys) -> torch.Generator:
    """A CPU generator seeded by a stable hash of ``keys`` (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class _Random:
    """Python-number draws from one seeded torch generator (scene construction only, not hot paths)."""

    def __init__(self, *keys):
        self.generator = _generator(*keys)

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def integer(self, n: int) -> int:
        return int(torch.randint(n, (), generator=self.generator))

    def choice(self, options):
        return options[self.integer(len(options))]

    def unit_vector(self) -> tuple[float, float, float]:
        v = torch.randn(3, generator=self.generator, dtype=torch.float64)
        return tuple((v / v.norm().clamp_min(1e-9)).tolist())


# ---------------------------------------------------------------------------------------------------
# Scenes: primitives and textures
# ---------------------------------------------------------------------------------------------------


@dataclass
class Texture:
    """A procedural solid texture, evaluated at the hit point in the primitive's local metric frame.

    albedo = color_a + s (color_b - color_a) with s from ``pattern`` at p = frequency * x_local + offset:
    solid s = 0; stripes a soft square wave of p . axis; checkers the parity of sum(floor(p));
    noise two octaves of hashed value noise. Flat faces (quads, box faces) use their 2D face coordinates.
    """

    pattern: str = "solid"
    color_a: tuple = (0.6, 0.6, 0.6)
    color_b: tuple = (0.3, 0.3, 0.3)
    frequency: float = 2.0
    axis: tuple = (1.0, 0.0, 0.0)
    offset: tuple = (0.0, 0.0, 0.0)
    seed: int = 0


@dataclass
class Scene:
    """P primitives, sorted by kind. Local frame: x_world = center + rotation @ x_local; the primitive is
    the unit shape scaled by ``half_size``: quad |x|,|y| <= 1 at z = 0; box the cube [-1, 1]^3; sphere the
    unit ball (an ellipsoid with radii half_size); cylinder x^2 + y^2 <= 1, |z| <= 1 (axis = local z)."""

    kind: Tensor  # (P,) int64 index into PRIMITIVES
    center: Tensor  # (P, 3)
    rotation: Tensor  # (P, 3, 3) local-to-world, columns are the local axes
    half_size: Tensor  # (P, 3)
    label: Tensor  # (P,) int64
    instance: Tensor  # (P,) int64
    pattern: Tensor  # (P,) int64 index into PATTERNS
    color_a: Tensor  # (P, 3)
    color_b: Tensor  # (P, 3)
    frequency: Tensor  # (P,)
    texture_axis: Tensor  # (P, 3)
    texture_offset: Tensor  # (P, 3)
    noise_seed: Tensor  # (P,) int64

    def to(self, device) -> "Scene":
        return Scene(**{name: value.to(device) for name, value in vars(self).items()})


def _yaw_rotation(yaw: float) -> list:
    c, s = math.cos(yaw), math.sin(yaw)
    return [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]


class SceneBuilder:
    """Collects primitives (plain Python numbers) and stacks them into a ``Scene``."""

    def __init__(self):
        self.primitives: list[dict] = []

    def add(self, kind: str, center, half_size, texture: Texture, *, label: int = 0, instance: int = 0,
            yaw: float = 0.0, rotation=None) -> None:
        """Add one primitive. center (3,), half_size (3,) > 0 (a quad's third entry is ignored);
        rotation (3, 3) local-to-world, or a rotation by ``yaw`` radians about world z."""
        if kind not in PRIMITIVES:
            raise ValueError(f"kind must be one of {PRIMITIVES}, got {kind!r}")
        if texture.pattern not in PATTERNS:
            raise ValueError(f"texture.pattern must be one of {PATTERNS}, got {texture.pattern!r}")
        half_size = [float(h) for h in half_size]
        if len(half_size) != 3:
            raise ValueError(f"half_size must be 3 positive numbers, got {half_size}")
        if kind == "quad":
            half_size[2] = 1.0
        if not all(0 < h < math.inf for h in half_size):
            raise ValueError(f"half_size must be 3 finite positive numbers, got {half_size}")
        center = [float(c) for c in center]
        if len(center) != 3 or not all(math.isfinite(c) for c in center):
            raise ValueError(f"center must be 3 finite numbers, got {center}")
        if not math.isfinite(yaw):
            raise ValueError(f"yaw must be finite, got {yaw}")
        if rotation is not None:
            matrix = torch.as_tensor(rotation, dtype=torch.float64)
            if matrix.shape != (3, 3) or not bool(torch.isfinite(matrix).all()) or \
                    not torch.allclose(matrix.T @ matrix, torch.eye(3, dtype=torch.float64), atol=1e-4):
                raise ValueError(f"rotation must be a (3, 3) rotation matrix (R^T R = I), got {matrix.tolist()}")
        rotation = _yaw_rotation(yaw) if rotation is None else torch.as_tensor(rotation, dtype=torch.float64).tolist()
        self.primitives.append(dict(kind=PRIMITIVES.index(kind), center=center,
                                    half_size=half_size, rotation=rotation, label=label, instance=instance,
                                    texture=texture))

    def build(self, dtype: torch.dtype = torch.float32) -> Scene:
        prims = sorted(self.primitives, key=lambda p: p["kind"])  # stable: contiguous groups per kind
        tex = [p["texture"] for p in prims]

        def floats(values, shape):
            return torch.tensor(values, dtype=dtype).reshape(shape)

        def longs(values):
            return torch.tensor(values, dtype=torch.int64).reshape(-1)

        count = len(prims)
        return Scene(
            kind=longs([p["kind"] for p in prims]),
            center=floats([p["center"] for p in prims], (count, 3)),
            rotation=floats([p["rotation"] for p in prims], (count, 3, 3)),
            half_size=floats([p["half_size"] for p in prims], (count, 3)),
            label=longs([p["label"] for p in prims]),
            instance=longs([p["instance"] for p in prims]),
            pattern=longs([PATTERNS.index(t.pattern) for t in tex]),
            color_a=floats([list(t.color_a) for t in tex], (count, 3)),
            color_b=floats([list(t.color_b) for t in tex], (count, 3)),
            frequency=floats([t.frequency for t in tex], (count,)),
            texture_axis=floats([list(t.axis) for t in tex], (count, 3)),
            texture_offset=floats([list(t.offset) for t in tex], (count, 3)),
            noise_seed=longs([t.seed for t in tex]),
        )


def _hsv(hue: float, saturation: float, value: float) -> tuple:
    return colorsys.hsv_to_rgb(hue % 1.0, min(max(saturation, 0.0), 1.0), min(max(value, 0.0), 1.0))


def _random_texture(rng: _Random, hue: float | None = None, frequency=(1.0, 4.0),
                    patterns=PATTERNS) -> Texture:
    """A random texture; ``hue`` in [0, 1) fixes the base colour's hue (class-correlated palettes)."""
    hue = rng.uniform() if hue is None else hue
    saturation, value = rng.uniform(0.3, 0.85), rng.uniform(0.55, 0.95)
    color_a = _hsv(hue, saturation, value)
    color_b = _hsv(hue + rng.uniform(-0.12, 0.12), saturation * rng.uniform(0.4, 1.0), value * rng.uniform(0.3, 0.7))
    return Texture(pattern=rng.choice(patterns), color_a=color_a, color_b=color_b,
                   frequency=rng.uniform(*frequency), axis=rng.unit_vector(),
                   offset=(rng.uniform(0, 10), rng.uniform(0, 10), rng.uniform(0, 10)), seed=rng.integer(2**31))


# ---------------------------------------------------------------------------------------------------
# Ray-primitive intersection. Rays are written in each primitive's scaled local frame, where the shape
# is a unit quad/cube/ball/cylinder; the ray parameter t (world distance along the unit ray) is the same.
# Inputs: origins o (P, 3), directions d (R, P, 3) (not unit). Output t (R, P), +inf where missed.
# ---------------------------------------------------------------------------------------------------


def _safe(x: Tensor) -> Tensor:
    return torch.where(x.abs() < 1e-12, torch.full_like(x, 1e-12), x)


def _miss_where(valid: Tensor, t: Tensor) -> Tensor:
    return torch.where(valid & (t > _HIT_EPS), t, torch.full_like(t, math.inf))


def _intersect_quad(o: Tensor, d: Tensor) -> Tensor:
    t = -o[:, 2] / _safe(d[..., 2])  # plane z = 0
    x, y = o[:, 0] + t * d[..., 0], o[:, 1] + t * d[..., 1]
    return _miss_where((x.abs() <= 1) & (y.abs() <= 1), t)


def _intersect_box(o: Tensor, d: Tensor) -> Tensor:
    inverse = 1.0 / _safe(d)  # slab test
    t0, t1 = (-1.0 - o) * inverse, (1.0 - o) * inverse  # (R, P, 3)
    t_near = torch.minimum(t0, t1).amax(-1)
    t_far = torch.maximum(t0, t1).amin(-1)
    t = torch.where(t_near > _HIT_EPS, t_near, t_far)  # from inside a box (a room) the exit face is hit
    return _miss_where(t_near <= t_far, t)


def _intersect_sphere(o: Tensor, d: Tensor) -> Tensor:
    a = (d * d).sum(-1)  # |o + t d|^2 = 1
    b = (d * o).sum(-1)
    c = (o * o).sum(-1) - 1.0
    discriminant = b * b - a * c
    root = discriminant.clamp_min(0).sqrt()
    t_near, t_far = (-b - root) / a, (-b + root) / a
    t = torch.where(t_near > _HIT_EPS, t_near, t_far)
    return _miss_where(discriminant >= 0, t)


def _intersect_cylinder(o: Tensor, d: Tensor) -> Tensor:
    a = (d[..., :2] ** 2).sum(-1)  # side: x^2 + y^2 = 1, |z| <= 1
    b = (d[..., :2] * o[:, :2]).sum(-1)
    c = (o[:, :2] ** 2).sum(-1) - 1.0
    discriminant = b * b - a * c
    root = discriminant.clamp_min(0).sqrt()
    a_safe = a.clamp_min(1e-12)
    candidates = []
    for t in ((-b - root) / a_safe, (-b + root) / a_safe):
        z = o[:, 2] + t * d[..., 2]
        candidates.append(_miss_where((discriminant >= 0) & (a > 1e-12) & (z.abs() <= 1), t))
    for cap in (-1.0, 1.0):  # caps: z = +-1, x^2 + y^2 <= 1
        t = (cap - o[:, 2]) / _safe(d[..., 2])
        xy = o[:, :2] + t.unsqueeze(-1) * d[..., :2]
        candidates.append(_miss_where((xy ** 2).sum(-1) <= 1, t))
    return torch.stack(candidates, -1).amin(-1)


_INTERSECT = {_QUAD: _intersect_quad, _BOX: _intersect_box, _SPHERE: _intersect_sphere,
              _CYLINDER: _intersect_cylinder}


def _bounding_groups(scene: Scene) -> tuple[list[Tensor], Tensor, Tensor]:
    """Primitives grouped by (instance, kind) with one bounding sphere per group: the members (list of
    (P_g,) index tensors), centres (G, 3) and radii (G,). Every primitive lies inside its unit shape
    scaled by half_size, hence within |half_size| of its centre (a quad within |(hx, hy)|)."""
    key = scene.instance * len(PRIMITIVES) + scene.kind
    groups = [torch.nonzero(key == k).squeeze(1) for k in torch.unique(key)]
    flat = torch.tensor([1.0, 1.0, 0.0]).to(scene.half_size)  # a quad has no thickness
    extent = torch.where(scene.kind.unsqueeze(-1) == _QUAD, scene.half_size * flat, scene.half_size).norm(dim=-1)
    centers = torch.stack([scene.center[g].mean(0) for g in groups])
    radii = torch.stack([((scene.center[g] - c).norm(dim=-1) + extent[g]).amax() for g, c in zip(groups, centers)])
    return groups, centers, radii


def _nearest_hit(scene: Scene, origin: Tensor, directions: Tensor, chunk_rays: int) -> tuple[Tensor, Tensor]:
    """Nearest hit of rays from one ``origin`` (3,) along unit ``directions`` (R, 3) with every primitive.

    Returns t (R,) (+inf on a miss) and the primitive index (R,). Rays are first tested against one
    bounding sphere per (instance, kind) group; only the rays that hit a group's sphere are intersected
    with its primitives, in chunks of ``chunk_rays`` (memory O(chunk_rays * P_g)).
    """
    num_rays = directions.shape[0]
    nearest_t = directions.new_full((num_rays,), math.inf)
    nearest_index = torch.zeros(num_rays, dtype=torch.int64, device=directions.device)
    to_local = scene.rotation.transpose(1, 2) / scene.half_size.unsqueeze(-1)  # (P, 3, 3): q = M (x - c)
    origin_local = ((origin - scene.center).unsqueeze(1) * to_local).sum(-1)  # (P, 3)
    groups, centers, radii = _bounding_groups(scene)
    to_center = centers - origin  # ray-sphere test for all groups at once: (R, G)
    along = directions @ to_center.T
    outside = (to_center ** 2).sum(-1) - radii ** 2  # > 0 when the origin is outside the sphere
    touches = (along ** 2 >= outside) & ((along > 0) | (outside < 0))  # a real root with t > 0
    for group, touched in zip(groups, touches.T):
        kind = int(scene.kind[group[0]])
        weights = to_local[group].permute(2, 0, 1).reshape(3, -1)  # directions @ weights = M d per member
        for rays in torch.nonzero(touched).squeeze(1).split(chunk_rays):
            d_local = (directions[rays] @ weights).view(len(rays), len(group), 3)  # (R_g, P_g, 3)
            t, member = _INTERSECT[kind](origin_local[group], d_local).min(dim=1)
            closer = t < nearest_t[rays]
            nearest_t[rays] = torch.where(closer, t, nearest_t[rays])
            nearest_index[rays] = torch.where(closer, group[member], nearest_index[rays])
    return nearest_t, nearest_index


# ---------------------------------------------------------------------------------------------------
# Textures and shading
# ---------------------------------------------------------------------------------------------------


def _hash01(cells: Tensor, seed: Tensor) -> Tensor:
    """Deterministic pseudo-random value in [0, 1] per integer lattice point: cells (N, 3), seed (N,)."""
    h = cells[:, 0] * 73856093 ^ cells[:, 1] * 19349663 ^ cells[:, 2] * 83492791 ^ seed * 2654435761
    h = (h ^ (h >> 13)) * 1274126177  # int64 arithmetic wraps around: a cheap integer mixer
    h = h ^ (h >> 16)
    return (h & 0xFFFF).to(torch.float32) / 65535.0


def _value_noise(points: Tensor, seed: Tensor) -> Tensor:
    """Trilinear value noise (N,) in [0, 1] at points (N, 3) with smoothstep weights."""
    cell = points.floor()
    frac = points - cell
    weight = frac * frac * (3 - 2 * frac)
    cell = cell.long()
    noise = torch.zeros_like(points[:, 0])
    for corner in range(8):  # the 8 lattice corners of each cell
        offset = torch.tensor([(corner >> i) & 1 for i in range(3)], device=points.device)
        corner_weight = torch.where(offset.bool(), weight, 1 - weight).prod(-1)
        noise = noise + corner_weight * _hash01(cell + offset, seed).to(points.dtype)
    return noise


def _pattern_value(scene: Scene, index: Tensor, points: Tensor) -> Tensor:
    """Texture mix factor s (R,) in [0, 1] of hit primitives ``index`` (R,) at local points (R, 3)."""
    pattern = scene.pattern[index]
    p = points * scene.frequency[index].unsqueeze(-1) + scene.texture_offset[index]
    s = torch.zeros_like(p[:, 0])
    wave = torch.sin(2 * math.pi * (p * scene.texture_axis[index]).sum(-1))
    s = torch.where(pattern == _STRIPES, 0.5 + 0.5 * (3 * wave).clamp(-1, 1), s)
    s = torch.where(pattern == _CHECKERS, torch.remainder(p.floor().sum(-1), 2), s)
    is_noise = pattern == _NOISE
    seeds = scene.noise_seed[index][is_noise]
    noise = 0.6 * _value_noise(p[is_noise], seeds) + 0.4 * _value_noise(2.1 * p[is_noise] + 5.3, seeds)
    s[is_noise] = ((noise - 0.5) * 2.0 + 0.5).clamp(0, 1)
    return s


def render_scene(scene: Scene, viewmat: Tensor, K: Tensor, width: int, height: int, *,
                 light_direction=(0.35, -0.45, 0.82), ambient: float = 0.35,
                 chunk_rays: int = 8192) -> dict[str, Tensor]:
    """Ray-cast ``scene`` from a pinhole camera.

    viewmat: (4, 4) world-to-camera; K: (3, 3). Returns image (3, H, W) in [0, 1] (Lambert shading:
    albedo * (ambient + (1 - ambient) (0.7 max(n.l, 0) + 0.3 max(n.v, 0)))), depth (H, W) camera z
    (0 where nothing is hit), label and instance (H, W) int64 of the hit primitive (-1 where nothing is hit).
    """
    _check_size(height, width)
    if not isinstance(viewmat, Tensor) or not isinstance(K, Tensor):
        raise TypeError("viewmat and K must be torch.Tensors")
    if viewmat.shape != (4, 4) or K.shape != (3, 3):
        raise ValueError(f"viewmat must be (4, 4) and K (3, 3), got {tuple(viewmat.shape)} and {tuple(K.shape)}")
    light = torch.as_tensor(light_direction, dtype=torch.float64)
    if light.shape != (3,) or not bool(torch.isfinite(light).all()) or not bool((light != 0).any()):
        raise ValueError(f"light_direction must be 3 finite numbers, not all 0, got {light_direction}")
    if not 0.0 <= ambient <= 1.0:
        raise ValueError(f"ambient must be in [0, 1], got {ambient}")
    if not isinstance(chunk_rays, int) or isinstance(chunk_rays, bool) or chunk_rays < 1:
        raise ValueError(f"chunk_rays must be a positive int, got {chunk_rays!r}")
    viewmat, K = viewmat.to(scene.center), K.to(scene.center)
    origins, directions = cameras.pixel_rays(viewmat, K, width, height)  # (R, 3) each
    if scene.kind.shape[0] == 0:  # an empty scene: every ray misses
        misses = torch.full((height, width), -1, dtype=torch.int64, device=directions.device)
        return dict(image=directions.new_zeros(3, height, width), depth=directions.new_zeros(height, width),
                    label=misses, instance=misses.clone())
    t, index = _nearest_hit(scene, origins[0], directions, chunk_rays)
    hit = torch.isfinite(t)
    t = torch.where(hit, t, torch.zeros_like(t))
    index = torch.where(hit, index, torch.zeros_like(index))

    rotation, half = scene.rotation[index], scene.half_size[index]  # (R, 3, 3), (R, 3)
    points = origins + t.unsqueeze(-1) * directions
    local = torch.einsum("rj,rji->ri", points - scene.center[index], rotation)  # metric local coordinates
    scaled = local / half
    kind = scene.kind[index].unsqueeze(-1)
    # local normals: quad +z; box the dominant axis; ellipsoid grad |x / h|^2; cylinder side or cap
    axis = F.one_hot(scaled.abs().argmax(-1), 3).to(scaled) * scaled.sign()
    radial = scaled[:, :2].norm(dim=-1)
    on_cap = (scaled[:, 2].abs() > radial).unsqueeze(-1)
    cylinder_side = torch.cat([scaled[:, :2] / half[:, :2], torch.zeros_like(scaled[:, :1])], -1)
    cylinder_cap = torch.stack([torch.zeros_like(radial), torch.zeros_like(radial), scaled[:, 2].sign()], -1)
    normal_local = torch.where(kind == _BOX, axis, scaled / half)
    normal_local = torch.where(kind == _QUAD, torch.tensor([0.0, 0.0, 1.0]).to(scaled), normal_local)
    normal_local = torch.where(kind == _CYLINDER, torch.where(on_cap, cylinder_cap, cylinder_side), normal_local)
    normal = F.normalize(torch.einsum("rij,rj->ri", rotation, normal_local), dim=-1)
    normal = torch.where((normal * directions).sum(-1, keepdim=True) > 0, -normal, normal)  # two-sided

    flat = (kind == _QUAD) | (kind == _BOX)
    face_coordinates = torch.where(flat, local * (1 - normal_local.abs()), local)  # 2D on flat faces
    s = _pattern_value(scene, index, face_coordinates).unsqueeze(-1)
    albedo = scene.color_a[index] + s * (scene.color_b[index] - scene.color_a[index])

    light = F.normalize(torch.as_tensor(light_direction).to(normal), dim=-1)
    diffuse = (normal @ light).clamp_min(0)
    facing = -(normal * directions).sum(-1)
    shade = ambient + (1 - ambient) * (0.7 * diffuse + 0.3 * facing.clamp_min(0))
    color = (albedo * shade.unsqueeze(-1)).clamp(0, 1) * hit.unsqueeze(-1)

    depth = t * (directions @ viewmat[2, :3])  # z-depth = t * (d . camera forward)
    minus_one = torch.full_like(index, -1)
    return dict(
        image=color.T.reshape(3, height, width),
        depth=depth.reshape(height, width),
        label=torch.where(hit, scene.label[index], minus_one).reshape(height, width),
        instance=torch.where(hit, scene.instance[index], minus_one).reshape(height, width),
    )


# ---------------------------------------------------------------------------------------------------
# Shared scene pieces and input checks
# ---------------------------------------------------------------------------------------------------


def _check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or not 8 <= value <= 4096:
            raise ValueError(f"{name} must be an int in [8, 4096], got {value!r}")


def _check_index(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _add_room(builder: SceneBuilder, rng: _Random, center_xy, half_xy, height: float, labels: tuple,
              instance: int = 0, frequency=(0.8, 3.0)) -> None:
    """Six quads closing the box [cx -+ hx] x [cy -+ hy] x [0, height]: floor, 4 walls, ceiling.

    labels = (floor, wall, ceiling). Every ray from inside hits something, so depth is valid everywhere.
    """
    cx, cy = center_xy
    hx, hy = half_xy
    hz = height / 2
    x, y, z = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
    walls_y = [[x[i], z[i], -y[i]] for i in range(3)]  # columns (x, z, -y): a proper rotation, normal -y
    walls_x = [[y[i], z[i], x[i]] for i in range(3)]  # columns (y, z, x), normal x
    floor_texture = _random_texture(rng, frequency=frequency)
    builder.add("quad", (cx, cy, 0.0), (hx, hy, 1), floor_texture, label=labels[0], instance=instance)
    builder.add("quad", (cx, cy, height), (hx, hy, 1), _random_texture(rng, patterns=("solid", "noise")),
                label=labels[2], instance=instance)
    for sign in (-1.0, 1.0):
        builder.add("quad", (cx, cy + sign * hy, hz), (hx, hz, 1), _random_texture(rng, frequency=frequency),
                    label=labels[1], instance=instance, rotation=walls_y)
        builder.add("quad", (cx + sign * hx, cy, hz), (hy, hz, 1), _random_texture(rng, frequency=frequency),
                    label=labels[1], instance=instance, rotation=walls_x)


# ---------------------------------------------------------------------------------------------------
# World 1: single images with depth, classes defined by shape layout (3D-Prior)
# ---------------------------------------------------------------------------------------------------

_SHAPES = ("box", "sphere", "cylinder")


def _single_image_class_specs() -> list[tuple[str, tuple[str, ...]]]:
    """(arrangement, shapes) of every class, interleaved over arrangements so that the first 10 vary."""
    arrangements = {
        "single": [(a,) for a in _SHAPES],
        "stack": [(a, b) for a in _SHAPES for b in _SHAPES],  # a below, b on top
        "pair": [(a, b) for i, a in enumerate(_SHAPES) for b in _SHAPES[i:]],  # side by side, unordered
        "row": [(a, a, a) for a in _SHAPES],
        "front_back": [(a, b) for a in _SHAPES for b in _SHAPES],  # a small in front, b large behind
    }
    longest = max(len(v) for v in arrangements.values())
    return [(name, options[i]) for i in range(longest) for name, options in arrangements.items() if i < len(options)]


_SINGLE_IMAGE_CLASSES = _single_image_class_specs()
MAX_SINGLE_IMAGE_CLASSES = len(_SINGLE_IMAGE_CLASSES)  # 30


def single_image_class_names(num_classes: int = 10) -> list[str]:
    """Names like "stack:box+sphere" of the first ``num_classes`` shape-layout classes."""
    _check_single_classes(num_classes)
    return [f"{name}:{'+'.join(shapes)}" for name, shapes in _SINGLE_IMAGE_CLASSES[:num_classes]]


def _check_single_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or not 2 <= num_classes <= MAX_SINGLE_IMAGE_CLASSES:
        raise ValueError(f"num_classes must be an int in [2, {MAX_SINGLE_IMAGE_CLASSES}], got {num_classes!r}")


def single_image_camera(height: int = 128, width: int = 128) -> tuple[Tensor, Tensor]:
    """The nominal fixed camera (viewmat (4, 4), K (3, 3)) of the single-image world: 1.6 m high, 2.55 m
    in front of the layout centre, looking down at it; horizontal field of view 55 degrees."""
    _check_size(height, width)
    return _single_camera(0.0, 0.0, 0.0), cameras.fov_intrinsics(math.radians(55.0), width, height)


def _single_camera(dx: float, dz: float, dtarget: float) -> Tensor:
    eye = torch.tensor([dx, -2.1, 1.6 + dz])
    target = torch.tensor([dtarget, 0.45, 0.4 + dtarget])
    return cameras.look_at(eye, target, torch.tensor([0.0, 0.0, 1.0]))


def _shape_half_size(rng: _Random, shape: str, size: float) -> tuple[float, float, float]:
    if shape == "box":
        return (size * rng.uniform(0.7, 1.15), size * rng.uniform(0.7, 1.15), size * rng.uniform(0.7, 1.15))
    if shape == "sphere":
        radius = size * rng.uniform(0.85, 1.1)
        return (radius, radius, radius)
    radius = size * rng.uniform(0.55, 0.85)
    return (radius, radius, size * rng.uniform(0.8, 1.4))


def single_image_sample(index: int, split: str = "train", height: int = 128, width: int = 128,
                        num_classes: int = 10, seed: int = 0, texture_swap: bool = False,
                        camera_jitter: float = 1.0) -> dict[str, Tensor]:
    """One image of the single-image world.

    The layout (class, positions, sizes, yaw, camera jitter) comes from the stream (seed, split, index);
    textures from a second stream. Label = index % num_classes. With probability 0.6 an object's hue
    follows its class's hue (a mild texture shortcut, in every split); ``texture_swap=True`` re-draws all
    textures from a third stream with the hue bias pointing at another class, leaving depth bit-identical.
    Returns image (3, H, W), depth (H, W) > 0 everywhere, label () int64, instance (H, W) int64
    (0 room, 1.. objects), viewmat (4, 4), K (3, 3).
    """
    _check_index("index", index)
    _check_size(height, width)
    _check_single_classes(num_classes)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if not 0.0 <= camera_jitter <= 4.0:
        raise ValueError(f"camera_jitter must be in [0, 4], got {camera_jitter}")
    label = index % num_classes
    arrangement, shapes = _SINGLE_IMAGE_CLASSES[label]
    layout = _Random("single", seed, split, index, "layout")
    textures = _Random("single", seed, split, index, "texture-swap" if texture_swap else "texture")
    hue_class = label
    if texture_swap:
        hue_class = (label + 1 + textures.integer(num_classes - 1)) % num_classes
    class_hue = (0.618034 * hue_class) % 1.0

    # layout: (shape, centre x, centre y, base z, size) per object
    cx, cy = layout.uniform(-0.25, 0.25), 0.5 + layout.uniform(-0.2, 0.2)
    objects = []
    if arrangement == "single":
        objects.append((shapes[0], cx, cy, 0.0, layout.uniform(0.42, 0.6)))
    elif arrangement == "stack":
        objects.append((shapes[0], cx, cy, 0.0, layout.uniform(0.4, 0.52)))
        objects.append((shapes[1], cx, cy, None, layout.uniform(0.24, 0.34)))  # base z: top of the first
    elif arrangement == "pair":
        order = shapes if layout.uniform() < 0.5 else shapes[::-1]
        for side, shape in zip((-1, 1), order):
            objects.append((shape, cx + side * layout.uniform(0.6, 0.8), cy + layout.uniform(-0.2, 0.2), 0.0,
                            layout.uniform(0.3, 0.42)))
    elif arrangement == "row":
        for side in (-1, 0, 1):
            objects.append((shapes[0], cx + side * 0.85 + layout.uniform(-0.08, 0.08), cy + layout.uniform(-0.25, 0.25),
                            0.0, layout.uniform(0.22, 0.32)))
    else:  # front_back
        objects.append((shapes[0], cx + layout.uniform(-0.3, 0.3), cy - 0.55, 0.0, layout.uniform(0.2, 0.28)))
        objects.append((shapes[1], cx + layout.uniform(-0.3, 0.3), cy + 0.7, 0.0, layout.uniform(0.45, 0.6)))

    builder = SceneBuilder()
    _add_room(builder, textures, (0.0, -0.75), (3.5, 3.75), 3.2, labels=(0, 0, 0))
    top = 0.0
    for number, (shape, x, y, base, size) in enumerate(objects, start=1):
        half = _shape_half_size(layout, shape, size)
        base = top if base is None else base
        yaw = layout.uniform(0, 2 * math.pi)
        hue = class_hue + textures.uniform(-0.04, 0.04) if textures.uniform() < 0.6 else None
        builder.add(shape, (x, y, base + half[2]), half, _random_texture(textures, hue=hue, frequency=(2.0, 7.0)),
                    label=1, instance=number, yaw=yaw)
        top = base + 2 * half[2]

    jitter = [camera_jitter * layout.uniform(-a, a) for a in (0.15, 0.1, 0.05)]
    viewmat = _single_camera(*jitter)
    K = cameras.fov_intrinsics(math.radians(55.0), width, height)
    light = (layout.uniform(-0.6, 0.6), layout.uniform(-0.8, 0.0), 1.0)
    render = render_scene(builder.build(), viewmat, K, width, height, light_direction=light)
    return dict(image=render["image"], depth=render["depth"], label=torch.tensor(label),
                instance=render["instance"], viewmat=viewmat, K=K)


class SingleImageDataset(torch.utils.data.Dataset):
    """``num_images`` samples of ``single_image_sample`` (square images of side ``size``), made on the fly."""

    def __init__(self, num_images: int, split: str = "train", size: int = 128, num_classes: int = 10,
                 texture_swap: bool = False, seed: int = 0):
        _check_index("num_images", num_images)
        single_image_sample(0, split, size, size, num_classes, seed)  # validates the arguments
        self.num_images, self.split, self.size = num_images, split, size
        self.num_classes, self.texture_swap, self.seed = num_classes, texture_swap, seed

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        return single_image_sample(index, self.split, self.size, self.size, self.num_classes, self.seed,
                                   self.texture_swap)


# ---------------------------------------------------------------------------------------------------
# World 1b (3D-Prior): one object whose class is its 3D shape, with a texture shortcut and cue conflict
# ---------------------------------------------------------------------------------------------------

SHAPE_TEXTURE_CLASSES = ("sphere", "cube", "cylinder", "dumbbell", "cross")
SHAPE_TEXTURE_SPLITS = ("train", "test", "ood", "cue_conflict", "untied")
SHAPE_TEXTURE_DISTANCE = 2.7  # camera to object centre; the backdrop is 3.1 in front of the camera
SHAPE_TEXTURE_FOV = 2 * math.atan(0.55 / 2.7)  # horizontal field of view: the cube [-0.5, 0.5]^3 fills it
_CLASS_PATTERNS = ("stripes", "checkers", "noise", "solid", "stripes")


def shape_texture_camera(size: int = 64) -> tuple[Tensor, Tensor]:
    """The fixed camera of the shape-texture world: viewmat (4, 4) at (0, -2.7, 0) looking at the origin
    (world z up), K (3, 3) square ``size`` images with field of view ``SHAPE_TEXTURE_FOV``."""
    _check_size(size, size)
    eye, target, up = torch.tensor([0.0, -SHAPE_TEXTURE_DISTANCE, 0.0]), torch.zeros(3), torch.tensor([0.0, 0.0, 1.0])
    return cameras.look_at(eye, target, up), cameras.fov_intrinsics(SHAPE_TEXTURE_FOV, size, size)


def _random_rotation(rng: _Random) -> list:
    """A uniformly random rotation (3, 3) from a random unit quaternion."""
    w, x, y, z = torch.randn(4, generator=rng.generator, dtype=torch.float64).div_(1.0).tolist()
    norm = math.sqrt(w * w + x * x + y * y + z * z) or 1.0
    w, x, y, z = w / norm, x / norm, y / norm, z / norm
    return [[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]]


def _class_texture(rng: _Random, texture_class: int, num_classes: int) -> Texture:
    """The texture of ``texture_class``: its own hue (evenly spaced) and pattern, random details."""
    hue = texture_class / num_classes + rng.uniform(-0.03, 0.03)
    saturation, value = rng.uniform(0.6, 0.9), rng.uniform(0.7, 0.95)
    return Texture(pattern=_CLASS_PATTERNS[texture_class % len(_CLASS_PATTERNS)], color_a=_hsv(hue, saturation, value),
                   color_b=_hsv(hue + rng.uniform(-0.05, 0.05), saturation, value * rng.uniform(0.35, 0.6)),
                   frequency=rng.uniform(5.0, 9.0), axis=rng.unit_vector(),
                   offset=(rng.uniform(0, 10), rng.uniform(0, 10), rng.uniform(0, 10)), seed=rng.integer(2**31))


def _shape_parts(shape: str, rng: _Random) -> list[tuple[str, tuple, tuple]]:
    """(kind, centre, half size) of the primitives of one object in its own frame (bounding radius < 0.42)."""
    if shape == "sphere":
        radius = rng.uniform(0.27, 0.36)
        return [("sphere", (0.0, 0.0, 0.0), (radius,) * 3)]
    if shape == "cube":
        half = rng.uniform(0.19, 0.23)
        return [("box", (0.0, 0.0, 0.0), (half,) * 3)]
    if shape == "cylinder":
        radius, half_height = rng.uniform(0.16, 0.22), rng.uniform(0.26, 0.33)
        return [("cylinder", (0.0, 0.0, 0.0), (radius, radius, half_height))]
    if shape == "dumbbell":
        radius, offset = rng.uniform(0.14, 0.17), rng.uniform(0.22, 0.25)
        bar = rng.uniform(0.045, 0.06)
        return [("sphere", (0.0, 0.0, -offset), (radius,) * 3), ("sphere", (0.0, 0.0, offset), (radius,) * 3),
                ("cylinder", (0.0, 0.0, 0.0), (bar, bar, offset))]
    arm, thickness = rng.uniform(0.3, 0.38), rng.uniform(0.06, 0.08)  # cross: three orthogonal bars
    return [("box", (0.0, 0.0, 0.0), (arm, thickness, thickness)), ("box", (0.0, 0.0, 0.0), (thickness, arm, thickness)),
            ("box", (0.0, 0.0, 0.0), (thickness, thickness, arm))]


def shape_texture_sample(index: int, split: str = "train", size: int = 64, num_classes: int = 5, seed: int = 0,
                         texture_agreement: float = 0.9) -> dict[str, Tensor]:
    """One image of the shape-texture world: a single object in front of a grey backdrop.

    The class is the object's 3D shape (``SHAPE_TEXTURE_CLASSES[label]``, label = index % num_classes),
    seen in a uniformly random 3D orientation, size and small offset, under a random light. Each class
    also owns a texture (hue evenly spaced over the classes, plus a pattern). In "train" and "test" the
    object wears its own class's texture with probability ``texture_agreement`` and a uniformly random
    class's texture otherwise: a texture shortcut that a 2D classifier can take. "ood" draws the texture
    class uniformly (texture says nothing), and so does "untied" (other indices: unlabelled images for
    training in which depth cannot be read off the texture); "cue_conflict" always draws another class's
    texture (Geirhos et al. 2019: shape and texture disagree). The depth of a sample does not depend on its texture.
    Returns image (3, size, size) in [0, 1], depth (size, size) camera z in metres (in [2.3, 3.1]; the
    backdrop is at 3.1), label () shape class, texture_label () texture class (int64).
    """
    _check_index("index", index)
    _check_size(size, size)
    if not isinstance(num_classes, int) or not 2 <= num_classes <= len(SHAPE_TEXTURE_CLASSES):
        raise ValueError(f"num_classes must be an int in [2, {len(SHAPE_TEXTURE_CLASSES)}], got {num_classes!r}")
    if split not in SHAPE_TEXTURE_SPLITS:
        raise ValueError(f"split must be one of {SHAPE_TEXTURE_SPLITS}, got {split!r}")
    if not 0.0 <= texture_agreement <= 1.0:
        raise ValueError(f"texture_agreement must be in [0, 1], got {texture_agreement!r}")
    label = index % num_classes
    layout = _Random("shape-texture", seed, split, index, "layout")
    textures = _Random("shape-texture", seed, split, index, "texture")
    if split == "cue_conflict":
        texture_class = (label + 1 + textures.integer(num_classes - 1)) % num_classes
    elif split in ("ood", "untied") or textures.uniform() >= texture_agreement:
        texture_class = textures.integer(num_classes)
    else:
        texture_class = label

    builder = SceneBuilder()
    grey = textures.uniform(0.35, 0.65)
    backdrop = Texture(pattern="noise", color_a=_hsv(textures.uniform(), 0.08, grey),
                       color_b=_hsv(textures.uniform(), 0.08, grey * 0.75), frequency=textures.uniform(2.0, 4.0),
                       offset=(textures.uniform(0, 10), textures.uniform(0, 10), 0.0), seed=textures.integer(2**31))
    wall = [[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]  # local z -> world -y (faces the camera)
    builder.add("quad", (0.0, 3.1 - SHAPE_TEXTURE_DISTANCE, 0.0), (1.5, 1.5, 1), backdrop, label=0, instance=0,
                rotation=wall)
    rotation = torch.tensor(_random_rotation(layout), dtype=torch.float64)
    centre = torch.tensor([layout.uniform(-0.06, 0.06), layout.uniform(-0.05, 0.05), layout.uniform(-0.06, 0.06)],
                          dtype=torch.float64)
    texture = _class_texture(textures, texture_class, num_classes)
    for kind, part_centre, half in _shape_parts(SHAPE_TEXTURE_CLASSES[label], layout):
        world_centre = centre + rotation @ torch.tensor(part_centre, dtype=torch.float64)
        builder.add(kind, world_centre.tolist(), half, texture, label=1, instance=1, rotation=rotation)
    viewmat, K = shape_texture_camera(size)
    light = (layout.uniform(-0.7, 0.7), -1.0, layout.uniform(-0.2, 0.9))
    render = render_scene(builder.build(), viewmat, K, size, size, light_direction=light)
    return dict(image=render["image"], depth=render["depth"], label=torch.tensor(label),
                texture_label=torch.tensor(texture_class))


# ---------------------------------------------------------------------------------------------------
# World 2: rooms with furniture, RGB-D sequences with semantic labels (Pri3D, FiT3D)
# ---------------------------------------------------------------------------------------------------

ROOM_CLASS_NAMES = ("floor", "wall", "ceiling", "table", "chair", "bed", "sofa", "cabinet", "lamp", "plant")
NUM_ROOM_CLASSES = len(ROOM_CLASS_NAMES)


def _furniture_parts(name: str, rng: _Random) -> tuple[list, tuple[float, float]]:
    """Parts [(kind, centre, half_size, part_role)] in the furniture frame (floor z = 0, front = -y)
    and the footprint half extents (hx, hy). part_role 0 = main texture, 1 = secondary texture."""
    u = rng.uniform
    if name == "table":
        hx, hy, height = u(0.45, 0.8), u(0.35, 0.55), u(0.7, 0.78)
        parts = [("box", (0, 0, height - 0.025), (hx, hy, 0.025), 0)]
        leg = (height - 0.05) / 2
        parts += [("cylinder", (sx * (hx - 0.07), sy * (hy - 0.07), leg), (0.03, 0.03, leg), 1)
                  for sx in (-1, 1) for sy in (-1, 1)]
    elif name == "chair":
        hx = hy = u(0.2, 0.26)
        seat = u(0.42, 0.48)
        back = u(0.2, 0.3)
        parts = [("box", (0, 0, seat), (hx, hy, 0.03), 0),
                 ("box", (0, hy - 0.03, seat + 0.03 + back), (hx, 0.03, back), 0)]
        parts += [("box", (sx * (hx - 0.03), sy * (hy - 0.03), (seat - 0.03) / 2), (0.025, 0.025, (seat - 0.03) / 2), 1)
                  for sx in (-1, 1) for sy in (-1, 1)]
    elif name == "bed":
        hx, hy = u(0.7, 0.9), u(0.95, 1.05)
        parts = [("box", (0, 0, 0.17), (hx, hy, 0.17), 1), ("box", (0, 0.02, 0.42), (hx - 0.03, hy - 0.04, 0.09), 0),
                 ("box", (0, hy - 0.04, 0.5), (hx, 0.04, 0.5), 1),  # headboard
                 ("box", (0, hy - 0.3, 0.56), (0.6 * hx, 0.16, 0.06), 0)]  # pillow
    elif name == "sofa":
        hx, hy = u(0.8, 1.1), u(0.4, 0.47)
        parts = [("box", (0, 0, 0.22), (hx, hy, 0.22), 0), ("box", (0, hy - 0.1, 0.69), (hx, 0.1, 0.25), 0)]
        parts += [("box", (sx * (hx - 0.1), 0, 0.59), (0.1, hy, 0.15), 1) for sx in (-1, 1)]
    elif name == "cabinet":
        hx, hy, hz = u(0.3, 0.6), u(0.2, 0.3), u(0.4, 0.95)
        parts = [("box", (0, 0, hz), (hx, hy, hz), 0), ("box", (0, -hy - 0.01, 1.4 * hz), (0.5 * hx, 0.012, 0.02), 1)]
    elif name == "lamp":
        hx = hy = 0.2
        pole = u(0.6, 0.8)
        parts = [("cylinder", (0, 0, 0.02), (0.15, 0.15, 0.02), 1),
                 ("cylinder", (0, 0, 0.04 + pole), (0.02, 0.02, pole), 1),
                 ("sphere", (0, 0, 0.04 + 2 * pole + 0.12), (0.2, 0.2, 0.18), 0)]
    elif name == "plant":
        radius, pot = u(0.14, 0.2), u(0.14, 0.22)
        foliage = u(0.25, 0.38)
        hx = hy = max(radius, foliage)
        parts = [("cylinder", (0, 0, pot), (radius, radius, pot), 1),
                 ("sphere", (0, 0, 2 * pot + 0.8 * foliage), (foliage, foliage, 1.1 * foliage), 0)]
    else:
        raise ValueError(f"unknown furniture {name!r}")
    return parts, (hx, hy)


def _room_layout(seed: int):
    """Room size, the furniture placements [(name, x, y, yaw)] and the camera orbit of room ``seed``."""
    rng = _Random("room", seed, "layout")
    half = (rng.uniform(2.8, 3.6), rng.uniform(2.4, 3.1))
    height = rng.uniform(2.5, 2.9)
    free_radius = 0.95  # a disc around the room centre kept free for the camera path
    names = ["bed" if rng.uniform() < 0.5 else "sofa", "table", "chair", "chair", "cabinet", "lamp", "plant"]
    names += [rng.choice(ROOM_CLASS_NAMES[3:]) for _ in range(3 + rng.integer(4))]
    placed, boxes = [], []
    for name in names:
        parts, (hx, hy) = _furniture_parts(name, rng)
        for _ in range(40):  # rejection sampling of a free axis-aligned footprint
            quarter = rng.integer(4)
            fx, fy = (hx, hy) if quarter % 2 == 0 else (hy, hx)
            x = rng.uniform(-half[0] + fx + 0.05, half[0] - fx - 0.05)
            y = rng.uniform(-half[1] + fy + 0.05, half[1] - fy - 0.05)
            gap_x, gap_y = max(abs(x) - fx, 0.0), max(abs(y) - fy, 0.0)  # footprint to room centre
            if math.hypot(gap_x, gap_y) < free_radius:
                continue
            if any(abs(x - bx) < fx + bfx + 0.1 and abs(y - by) < fy + bfy + 0.1 for bx, by, bfx, bfy in boxes):
                continue
            boxes.append((x, y, fx, fy))
            placed.append((name, parts, x, y, quarter * math.pi / 2))
            break
    orbit = dict(radius=rng.uniform(0.4, 0.6), phase=rng.uniform(0, 2 * math.pi), direction=rng.choice((-1.0, 1.0)),
                 eye_height=rng.uniform(1.35, 1.65), wobble=rng.uniform(0, 2 * math.pi))
    return half, height, placed, orbit


def _room_scene(seed: int) -> Scene:
    half, height, placed, _ = _room_layout(seed)
    textures = _Random("room", seed, "texture")
    builder = SceneBuilder()
    floor, wall, ceiling = (ROOM_CLASS_NAMES.index(n) for n in ("floor", "wall", "ceiling"))
    _add_room(builder, textures, (0.0, 0.0), half, height, labels=(floor, wall, ceiling))
    for number, (name, parts, x, y, yaw) in enumerate(placed, start=1):
        part_textures = [_random_texture(textures, frequency=(2.0, 8.0)) for _ in range(2)]
        c, s = math.cos(yaw), math.sin(yaw)
        for kind, (px, py, pz), half_size, role in parts:
            builder.add(kind, (x + c * px - s * py, y + s * px + c * py, pz), half_size, part_textures[role],
                        label=ROOM_CLASS_NAMES.index(name), instance=number, yaw=yaw)
    return builder.build()


def room_camera_path(seed: int, num_frames: int, step_degrees: float = 6.0) -> Tensor:
    """viewmats (T, 4, 4) of room ``seed``: the camera orbits the room centre and looks across the room,
    turning ``step_degrees`` per frame, with a slow wobble of height, heading and pitch."""
    _check_index("seed", seed)
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if not math.isfinite(step_degrees):
        raise ValueError(f"step_degrees must be finite, got {step_degrees}")
    _, _, _, orbit = _room_layout(seed)
    step = torch.arange(num_frames, dtype=torch.float64) * math.radians(step_degrees)
    phi = orbit["phase"] + orbit["direction"] * step
    wobble = orbit["wobble"] + 0.7 * step
    eye = torch.stack([orbit["radius"] * phi.cos(), orbit["radius"] * phi.sin(),
                       orbit["eye_height"] + 0.1 * wobble.sin()], -1)
    heading = phi + math.pi + 0.35 * (0.5 * wobble).sin()
    pitch = -0.2 + 0.12 * (1.3 * wobble).cos()
    target = eye + torch.stack([heading.cos(), heading.sin(), pitch], -1)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(eye)
    return cameras.look_at(eye, target, up).float()


def room_sequence(seed: int, num_frames: int = 40, height: int = 240, width: int = 320,
                  step_degrees: float = 6.0, fov_degrees: float = 58.0) -> dict:
    """An RGB-D sequence of the room ``seed`` (room and camera path are functions of ``seed`` alone).

    Returns images (T, 3, H, W) in [0, 1], depth (T, H, W) camera z > 0 everywhere, labels (T, H, W)
    int64 in [0, NUM_ROOM_CLASSES), instances (T, H, W) int64 (0 = room shell, 1.. furniture pieces),
    viewmats (T, 4, 4) world-to-camera, K (3, 3) (58 degrees horizontal, like ScanNet's depth camera),
    class_names. At the defaults, frames up to 5 steps apart overlap by more than 40 % (measured).
    """
    _check_index("seed", seed)
    _check_size(height, width)
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if not 0.0 <= step_degrees <= 45.0:
        raise ValueError(f"step_degrees must be in [0, 45], got {step_degrees}")
    if not 10.0 <= fov_degrees <= 120.0:
        raise ValueError(f"fov_degrees must be in [10, 120], got {fov_degrees}")
    scene = _room_scene(seed)
    viewmats = room_camera_path(seed, num_frames, step_degrees)
    K = cameras.fov_intrinsics(math.radians(fov_degrees), width, height)
    frames = [render_scene(scene, viewmat, K, width, height) for viewmat in viewmats]
    stacked = {key: torch.stack([frame[key] for frame in frames]) for key in frames[0]}
    return dict(images=stacked["image"], depth=stacked["depth"], labels=stacked["label"],
                instances=stacked["instance"], viewmats=viewmats, K=K, class_names=list(ROOM_CLASS_NAMES))


# ---------------------------------------------------------------------------------------------------
# World 3: objects of Y cuboid classes at a known pose, occluders and corruptions (3D-CompNets)
# ---------------------------------------------------------------------------------------------------

OBJECT_SPLITS = ("train", "calib", "test")
CORRUPTIONS = ("noise", "blur", "fog", "brightness")
OCCLUSION_TARGETS = (0.0, 0.2, 0.4, 0.6)  # covered fraction of the object mask at levels 0..3 (+-0.05)
OBJECT_DISTANCE = (4.5, 5.5)  # camera distance range; every class's bounding sphere has radius 1.2
OBJECT_FOCAL = 1.6  # focal length in units of min(H, W): the object spans about half the image
MAX_OBJECT_CLASSES = 1000


def _check_object_class(num_classes: int, class_index: int = 0) -> None:
    if not isinstance(num_classes, int) or not 2 <= num_classes <= MAX_OBJECT_CLASSES:
        raise ValueError(f"num_classes must be an int in [2, {MAX_OBJECT_CLASSES}], got {num_classes!r}")
    if not isinstance(class_index, int) or not 0 <= class_index < num_classes:
        raise ValueError(f"class_index must be an int in [0, {num_classes}), got {class_index!r}")


def _object_class(class_index: int) -> tuple[list[float], list, float]:
    """Half extents (3,), parts [(kind, centre, half_size)] and hue of class ``class_index``.

    Classes 2k and 2k+1 form a confusable pair: the same base shape, legs and hue, proportions within
    +-7 %; they differ in the parts on top. The parts' union spans the cuboid exactly (the body spans x
    and y, the legs or body reach the bottom, the first top part reaches the top). Object frame z-up.
    """
    pair, own = _Random("object-class-pair", class_index // 2), _Random("object-class", class_index)
    dims = [pair.uniform(0.6, 2.0) * own.uniform(0.93, 1.07), pair.uniform(0.5, 1.6) * own.uniform(0.93, 1.07),
            pair.uniform(0.5, 1.8) * own.uniform(0.93, 1.07)]
    scale = 1.2 / math.sqrt(sum(d * d for d in dims))  # bounding sphere radius 1.2
    ex, ey, ez = (d * scale for d in dims)
    base = pair.choice(("box", "box", "cylinder"))
    leg_height = 2 * ez * pair.uniform(0.2, 0.35) if pair.uniform() < 0.35 else 0.0
    body_height = (2 * ez - leg_height) * own.uniform(0.45, 0.75)
    parts = []
    if leg_height > 0:
        r = 0.1 * min(ex, ey)
        parts += [("cylinder", (sx * (ex - r), sy * (ey - r), -ez + leg_height / 2), (r, r, leg_height / 2))
                  for sx in (-1, 1) for sy in (-1, 1)]
    top_of_body = -ez + leg_height + body_height
    parts.append((base, (0.0, 0.0, top_of_body - body_height / 2), (ex, ey, body_height / 2)))
    num_top = 1 + own.integer(2)
    for k in range(num_top):
        kind = own.choice(("box", "cylinder", "sphere"))
        fx, fy = ex * own.uniform(0.2, 0.45), ey * own.uniform(0.3, 0.9)
        lo, hi = (-(ex - fx), ex - fx) if num_top == 1 else ((-(ex - fx), 0.0) if k == 0 else (0.0, ex - fx))
        height = (ez - top_of_body) * (1.0 if k == 0 else own.uniform(0.4, 0.9))
        center = (own.uniform(lo, hi), own.uniform(-(ey - fy), ey - fy), top_of_body + height / 2)
        parts.append((kind, center, (fx, fy, height / 2)))
    return [ex, ey, ez], parts, pair.uniform()


def class_cuboid(num_classes: int, class_index: int) -> Tensor:
    """Full extents (3,) (x, y, z; z up) of the cuboid of class ``class_index``, centred on the object
    origin: the tight bounding box of the class's parts. The shape of class k is the same for every
    ``num_classes`` (which only bounds the index)."""
    _check_object_class(num_classes, class_index)
    half, _, _ = _object_class(class_index)
    return 2 * torch.tensor(half)


def class_parts(num_classes: int, class_index: int) -> list[dict]:
    """The primitives of class ``class_index`` in the object frame: [dict(kind, center (3,), half_size (3,))]."""
    _check_object_class(num_classes, class_index)
    _, parts, _ = _object_class(class_index)
    return [dict(kind=kind, center=torch.tensor(center), half_size=torch.tensor(half)) for kind, center, half in parts]


def _class_part_texture(class_index: int, part: int, hue: float, rng: _Random) -> Texture:
    """The texture of part ``part`` of class ``class_index``: pattern, frequency, axis and offset fixed per
    class and part (never solid), colours jittered per image by +-15 % brightness from ``rng``."""
    fixed = _random_texture(_Random("object-part-texture", class_index, part), hue=hue, frequency=(2.0, 6.0),
                            patterns=("stripes", "checkers", "noise"))
    gain_a, gain_b = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)
    return Texture(pattern=fixed.pattern, color_a=tuple(min(1.0, c * gain_a) for c in fixed.color_a),
                   color_b=tuple(min(1.0, c * gain_b) for c in fixed.color_b), frequency=fixed.frequency,
                   axis=fixed.axis, offset=fixed.offset, seed=fixed.seed)


def _occluder_rectangle(remaining: Tensor, want: float, rng: _Random) -> tuple[int, int, int, int]:
    """Pixel rectangle [u0, u1) x [v0, v1) around a random pixel of ``remaining`` (H, W) whose overlap with
    it is closest to ``want`` pixels: 96 candidate sizes are scored at once with a summed-area table."""
    height, width = remaining.shape
    rows, cols = torch.nonzero(remaining, as_tuple=True)
    pick = rng.integer(len(rows)) if len(rows) else 0
    cv, cu = (float(rows[pick]) + 0.5, float(cols[pick]) + 0.5) if len(rows) else (height / 2, width / 2)
    aspect = math.exp(rng.uniform(-0.7, 0.7))
    size = torch.linspace(1.0, float(max(height, width)), 96, dtype=torch.float64)
    u0 = (cu - size * math.sqrt(aspect)).round().clamp(0, width).long()
    u1 = (cu + size * math.sqrt(aspect)).round().clamp(0, width).long()
    v0 = (cv - size / math.sqrt(aspect)).round().clamp(0, height).long()
    v1 = (cv + size / math.sqrt(aspect)).round().clamp(0, height).long()
    table = F.pad(remaining.double().cumsum(0).cumsum(1), (1, 0, 1, 0))  # (H + 1, W + 1)
    covered = table[v1, u1] - table[v0, u1] - table[v1, u0] + table[v0, u0]
    best = int((covered - want).abs().argmin())
    return int(u0[best]), int(v0[best]), int(u1[best]), int(v1[best])


def _occluder_scene(amodal: Tensor, level: int, viewmat: Tensor, K: Tensor, nearest_depth: float,
                    rng: _Random) -> Scene:
    """Camera-facing textured quads in front of the object covering OCCLUSION_TARGETS[level] of ``amodal``.

    A quad parallel to the image plane at depth z covering [u0, u1] x [v0, v1] in the image hits exactly
    the pixels whose centres lie inside the rectangle, so the coverage is chosen in 2D and then lifted."""
    target = (OCCLUSION_TARGETS[level] + rng.uniform(-0.05, 0.05)) * float(amodal.sum())
    remaining = amodal.clone()
    builder = SceneBuilder()
    rotation, translation = viewmat[:3, :3].double(), viewmat[:3, 3].double()
    focal_x, focal_y, cx, cy = (float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]))
    for k in range(level):
        covered = float(amodal.sum() - remaining.sum())
        u0, v0, u1, v1 = _occluder_rectangle(remaining, (target - covered) / (level - k), rng)
        if u1 <= u0 or v1 <= v0:
            continue
        remaining[v0:v1, u0:u1] = False
        z = nearest_depth * rng.uniform(0.45, 0.8)
        center_camera = torch.tensor([((u0 + u1) / 2 - cx) / focal_x * z, ((v0 + v1) / 2 - cy) / focal_y * z, z],
                                     dtype=torch.float64)
        half = ((u1 - u0) / 2 / focal_x * z, (v1 - v0) / 2 / focal_y * z, 1.0)
        builder.add("quad", rotation.T @ (center_camera - translation), half,
                    _random_texture(rng, frequency=(3.0, 10.0)), label=2, instance=100 + k, rotation=rotation.T)
    return builder.build()


def _gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of image (3, H, W) with reflect padding."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(image.unsqueeze(0), (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return x.squeeze(0)


def corrupt_image(image: Tensor, depth: Tensor, corruption: str, severity: int,
                  generator: torch.Generator | None = None) -> Tensor:
    """ImageNet-C-style corruption of image (3, H, W) in [0, 1] at severity 1..3: "noise" adds Gaussian
    noise (sigma 0.04/0.08/0.12); "blur" a Gaussian blur (sigma 0.7/1.2/2.0 px); "fog" blends towards grey
    0.75 by transmittance exp(-beta depth) (beta 0.04/0.08/0.14 per unit of depth (H, W)); "brightness"
    adds 0.15/0.3/0.45 to every channel. The result is clamped to [0, 1]."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"corruption must be None or one of {CORRUPTIONS}, got {corruption!r}")
    if severity not in (1, 2, 3):
        raise ValueError(f"severity must be 1, 2 or 3, got {severity!r}")
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a floating-point tensor (3, H, W), got "
                         f"{getattr(image, 'shape', type(image).__name__)} {getattr(image, 'dtype', '')}")
    if corruption == "fog" and (not isinstance(depth, Tensor) or depth.shape != image.shape[1:]):
        raise ValueError(f"depth must be (H, W) = {tuple(image.shape[1:])} for fog, got "
                         f"{getattr(depth, 'shape', type(depth).__name__)}")
    level = severity - 1
    if corruption == "noise":
        noise = torch.randn(image.shape, generator=generator, dtype=image.dtype)
        image = image + (0.04, 0.08, 0.12)[level] * noise.to(image.device)
    elif corruption == "blur":
        image = _gaussian_blur(image, (0.7, 1.2, 2.0)[level])
    elif corruption == "fog":
        transmittance = torch.exp(-(0.04, 0.08, 0.14)[level] * depth)
        image = image * transmittance + 0.75 * (1 - transmittance)
    else:
        image = image + (0.15, 0.3, 0.45)[level]
    return image.clamp(0, 1)


# ---------------------------------------------------------------------------------------------------
# 3D-CompNets OOD protocol: pasted occluders (OccludedPASCAL3D+ levels L1-L3) and ImageNet-C corruptions
# (brightness, fog, frost, snow) written in torch. Both work on any image batch (synthetic or real).
# ---------------------------------------------------------------------------------------------------

OCCLUSION_LEVELS = {1: (0.1, 0.3), 2: (0.3, 0.5), 3: (0.5, 0.7)}  # covered fraction of (object, background)
IMAGENET_C = ("brightness", "fog", "frost", "snow")


def _fractal_noise(height: int, width: int, decay: float, generator: torch.Generator | None,
                   octaves: int = 7) -> Tensor:
    """(H, W) noise in [0, 1]: octave o is uniform noise on a 2^o grid, bilinearly upsampled, weighted by
    decay^-o (the per-level amplitude decay of ImageNet-C's diamond-square plasma fractal)."""
    total = torch.zeros(1, 1, height, width)
    for o in range(octaves):
        cells = 2 ** (o + 1)
        grid = torch.rand(1, 1, cells + 1, cells + 1, generator=generator)
        total = total + F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=True) * decay ** -o
    total = total[0, 0]
    return (total - total.min()) / (total.max() - total.min()).clamp_min(1e-12)


def occluder_texture(height: int, width: int, generator: torch.Generator | None = None) -> Tensor:
    """(3, H, W) procedural occluder texture: two random colours mixed by stripes, checkers or blobs."""
    colours = torch.rand(2, 3, 1, 1, generator=generator)
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                          indexing="ij")
    angle, frequency, kind = torch.rand(3, generator=generator).tolist()
    period = 3.0 + 9.0 * frequency
    if kind < 1 / 3:  # stripes
        mix = ((u * math.cos(math.pi * angle) + v * math.sin(math.pi * angle)) / period).floor() % 2
    elif kind < 2 / 3:  # checkers
        mix = ((u / period).floor() + (v / period).floor()) % 2
    else:  # blobs: thresholded coarse noise
        coarse = torch.rand(1, 1, max(2, round(height / period)), max(2, round(width / period)), generator=generator)
        mix = (F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0, 0] > 0.5).float()
    return colours[0] * mix + colours[1] * (1 - mix)


def object_cutouts(classes: list[int], size: int = 96, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Segmented objects to paste as occluders: one render of each pool class in ``classes``
    (``object_sample`` with ``class_textures=True``, num_classes = MAX_OBJECT_CLASSES, its own random pose,
    size x size), cropped to the bounding box of its object mask. These are the synthetic analogue of the
    MS-COCO object cut-outs of OccludedPASCAL3D+: whole objects of categories the classifier does not know.
    Returns [(image (3, h, w), mask (h, w) bool)], one per class, h and w the extent of the mask.
    """
    if not isinstance(classes, (list, tuple)) or not classes:
        raise ValueError(f"classes must be a non-empty list of pool class indices, got {classes!r}")
    for c in classes:
        _check_object_class(MAX_OBJECT_CLASSES, c)
    _check_size(size, size)
    cutouts = []
    for c in classes:
        sample = object_sample(c, num_classes=MAX_OBJECT_CLASSES, split="test", height=size, width=size, seed=seed,
                               class_textures=True)
        mask = sample["amodal_mask"]
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        a, b, c0, d = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        cutouts.append((sample["image"][:, a:b, c0:d].clone(), mask[a:b, c0:d].clone()))
    return cutouts


def _check_cutouts(cutouts) -> None:
    if not isinstance(cutouts, (list, tuple)) or not cutouts:
        raise ValueError("cutouts must be None or a non-empty list of (image (3, h, w), mask (h, w)) pairs")
    for k, pair in enumerate(cutouts):
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)
        if not ok or pair[0].ndim != 3 or pair[0].shape[0] != 3 or pair[1].shape != pair[0].shape[1:]:
            raise ValueError(f"cutouts[{k}] must be (image (3, h, w), mask (h, w)), got "
                             f"{[tuple(getattr(t, 'shape', ())) for t in pair] if isinstance(pair, (list, tuple)) else pair!r}")
        if not pair[1].bool().any():
            raise ValueError(f"cutouts[{k}] has an empty mask")


def paste_occluders(image: Tensor, object_mask: Tensor, object_fraction: float, background_fraction: float,
                    generator: torch.Generator | None = None, max_occluders: int = 12,
                    cutouts: list[tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor]:
    """Paste occluders on image (3, H, W) until about `object_fraction` of `object_mask` (H, W) and
    `background_fraction` of the rest are covered (OccludedPASCAL3D+ L1-L3: 10/30/50 % of the object and
    30/50/70 % of the background). Occluders are textured rectangles (``occluder_texture``; default) or, with
    ``cutouts`` [(image (3, h, w), mask (h, w))], segmented objects (OccludedPASCAL3D+ pastes MS-COCO object
    cut-outs; ``object_cutouts`` renders synthetic ones): each occluder is a random cut-out, scaled at its
    own aspect ratio, pasted where its mask is set. Greedy: each occluder is the rectangle, among 16 centres
    on uncovered pixels x 32 sizes (scored at once with summed-area tables; a cut-out is counted as covering
    its mask's fraction of the rectangle), that minimises 2 |object coverage - target| + |background
    coverage - target|; a cut-out whose actual coverage brings the cost no lower ends the loop.
    Returns (image, occluder_mask (H, W)).
    """
    if image.ndim != 3 or image.shape[0] != 3 or object_mask.shape != image.shape[1:]:
        raise ValueError(f"image must be (3, H, W) and object_mask (H, W), got {tuple(image.shape)}, "
                         f"{tuple(object_mask.shape)}")
    for name, value in (("object_fraction", object_fraction), ("background_fraction", background_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if cutouts is not None:
        _check_cutouts(cutouts)
    height, width = object_mask.shape
    inside = object_mask.bool().cpu()
    regions = (inside, ~inside)
    counts = [max(int(r.sum()), 1) for r in regions]
    targets, weights = (object_fraction, background_fraction), (2.0, 1.0)

    def cost_of(covered: Tensor) -> float:
        return sum(w * abs(float((covered & r).sum()) / n - t) for r, n, t, w in zip(regions, counts, targets, weights))

    covered = torch.zeros(height, width, dtype=torch.bool)
    image = image.clone()
    sizes = torch.linspace(2.0, float(max(height, width)), 32, dtype=torch.float64)
    current = sum(w * t for w, t in zip(weights, targets))
    for _ in range(max_occluders):
        rows, cols = torch.nonzero(~covered, as_tuple=True)
        if len(rows) == 0:
            break
        pick = torch.randint(len(rows), (16,), generator=generator)
        cv, cu = rows[pick].double()[:, None] + 0.5, cols[pick].double()[:, None] + 0.5  # (16, 1)
        aspect = torch.exp(torch.rand(16, 1, generator=generator, dtype=torch.float64) * 1.4 - 0.7).sqrt()
        fill = 1.0
        if cutouts is not None:  # the drawn cut-out keeps its own aspect ratio w / h
            cut_image, cut_mask = cutouts[int(torch.randint(len(cutouts), (1,), generator=generator))]
            cut_mask = cut_mask.bool().cpu()
            aspect = torch.full((16, 1), math.sqrt(cut_mask.shape[1] / cut_mask.shape[0]), dtype=torch.float64)
            fill = float(cut_mask.float().mean())
        u0_free, u1_free = (cu - sizes * aspect / 2).round().long(), (cu + sizes * aspect / 2).round().long()
        v0_free, v1_free = (cv - sizes / aspect / 2).round().long(), (cv + sizes / aspect / 2).round().long()
        u0, u1 = u0_free.clamp(0, width), u1_free.clamp(0, width)  # (16, 32)
        v0, v1 = v0_free.clamp(0, height), v1_free.clamp(0, height)
        cost = torch.zeros(16, 32, dtype=torch.float64)
        for region, n, target, weight in zip(regions, counts, targets, weights):
            table = F.pad((region & ~covered).double().cumsum(0).cumsum(1), (1, 0, 1, 0))
            new = fill * (table[v1, u1] - table[v0, u1] - table[v1, u0] + table[v0, u0])
            cost = cost + weight * (float((covered & region).sum()) / n + new / n - target).abs()
        if cutouts is None:
            best = int(cost.argmin())
            if float(cost.flatten()[best]) >= current - 1e-9:  # no rectangle brings both coverages closer
                break
            current = float(cost.flatten()[best])
            a, b = int(v0.flatten()[best]), int(v1.flatten()[best])
            c, d = int(u0.flatten()[best]), int(u1.flatten()[best])
            image[:, a:b, c:d] = occluder_texture(b - a, d - c, generator).to(image)
            covered[a:b, c:d] = True
            continue
        best_trial = None  # the 16 best estimates are re-scored with the cut-out's actual mask
        for index in cost.flatten().argsort()[:16].tolist():
            a, b = int(v0.flatten()[index]), int(v1.flatten()[index])
            c, d = int(u0.flatten()[index]), int(u1.flatten()[index])
            if b <= a or d <= c:
                continue
            top, left = int(v0_free.flatten()[index]), int(u0_free.flatten()[index])
            full = (max(1, int(v1_free.flatten()[index]) - top), max(1, int(u1_free.flatten()[index]) - left))
            scaled_mask = F.interpolate(cut_mask[None, None].float(), size=full, mode="bilinear",
                                        align_corners=False)[0, 0] > 0.5
            window = (slice(a - top, b - top), slice(c - left, d - left))
            trial = covered.clone()
            trial[a:b, c:d] |= scaled_mask[window]
            trial_cost = cost_of(trial)
            if best_trial is None or trial_cost < best_trial[0]:
                best_trial = (trial_cost, trial, (a, b, c, d), full, window, scaled_mask[window])
        if best_trial is None or best_trial[0] >= current - 1e-9:  # no placement brings the coverages closer
            break
        current, covered, (a, b, c, d), full, window, paste = best_trial
        scaled = F.interpolate(cut_image[None].float(), size=full, mode="bilinear", align_corners=False)[0]
        image[:, a:b, c:d] = torch.where(paste.to(image.device), scaled[(slice(None),) + window].to(image),
                                         image[:, a:b, c:d])
    return image, covered.to(object_mask.device)


def imagenet_c(image: Tensor, corruption: str, severity: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """ImageNet-C corruption (Hendrycks & Dietterich, ICLR 2019) of image (3, H, W) in [0, 1], severity 1..5,
    with the constants of the reference code (imagecorruptions), written in torch:

    brightness: V += c in HSV, c = .1 .2 .3 .4 .5 (done as rgb * min(V + c, 1) / V, which keeps hue and
        saturation).
    fog: x += c0 * plasma, x *= max(x) / (max(x) + c0), (c0, decay) = (1.5, 2) (2, 2) (2.5, 1.7) (2.5, 1.5)
        (3, 1.4); the plasma fractal is octave value noise with the same per-octave amplitude decay.
    frost: x = c0 x + c1 frost, (c0, c1) = (1, .4) (.8, .6) (.7, .7) (.65, .7) (.6, .75). ImageNet-C
        blends one of six frost photographs; with no download, the frost layer is synthesised: fractal
        noise (decay 1.3, fine crystals) sharpened by a power 1.5, plus its thresholded high-frequency
        part as bright needles, tinted ice-blue (0.85, 0.93, 1.0), mean about 0.45 like the photographs.
    snow: flakes = N(loc, scale) noise on an H/zoom grid, upsampled by zoom, zero below a threshold,
        motion-blurred along a random angle in [-135, -45] degrees; x = b x + (1 - b) max(x, 1.5 gray + .5);
        x = x + flakes + flakes rotated by 180 degrees; constants (loc, scale, zoom, threshold, radius,
        sigma, b) per level as the reference (level 4: .55 .3 4.5 .85 12 8 .65), radius and sigma scaled by
        min(H, W) / 224 (ImageNet-C images are 224 px).
    The result is clamped to [0, 1].
    """
    if corruption not in IMAGENET_C:
        raise ValueError(f"corruption must be one of {IMAGENET_C}, got {corruption!r}")
    if isinstance(severity, bool) or severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    level, (height, width) = severity - 1, image.shape[1:]
    if corruption == "brightness":
        value = image.max(0, keepdim=True).values
        new_value = (value + (0.1, 0.2, 0.3, 0.4, 0.5)[level]).clamp(max=1.0)
        image = torch.where(value > 0, image * new_value / value.clamp_min(1e-12), new_value.expand_as(image))
    elif corruption == "fog":
        strength, decay = ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))[level]
        peak = image.max()
        image = image + strength * _fractal_noise(height, width, decay, generator).to(image)
        image = image * peak / (peak + strength)
    elif corruption == "frost":
        keep, weight = ((1.0, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))[level]
        base = _fractal_noise(height, width, 1.3, generator) ** 1.5
        fine = base - F.avg_pool2d(base[None, None], 5, 1, 2, count_include_pad=False)[0, 0]
        needles = (fine > fine.quantile(0.9)).float()
        frost = (0.7 * base + 0.5 * needles).clamp(0, 1)
        tint = torch.tensor([0.85, 0.93, 1.0]).view(3, 1, 1)
        image = keep * image + weight * (frost * tint).to(image)
    else:
        loc, scale, zoom, threshold, radius, sigma, blend = (
            (0.1, 0.3, 3.0, 0.5, 10, 4, 0.8), (0.2, 0.3, 2.0, 0.5, 12, 4, 0.7), (0.55, 0.3, 4.0, 0.9, 12, 8, 0.7),
            (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55))[level]
        small = (max(1, round(height / zoom)), max(1, round(width / zoom)))
        flakes = loc + scale * torch.randn(1, 1, *small, generator=generator)
        flakes = F.interpolate(flakes, size=(height, width), mode="bilinear", align_corners=False)
        flakes = torch.where(flakes < threshold, torch.zeros_like(flakes), flakes)
        factor = min(height, width) / 224
        length, spread = max(2, round(radius * factor)), max(0.5, sigma * factor)
        angle = math.radians(-135 + 90 * float(torch.rand((), generator=generator)))
        steps = torch.arange(length, dtype=torch.float32)
        taps = torch.exp(-0.5 * (steps / spread) ** 2)
        kernel = torch.zeros(2 * length + 1, 2 * length + 1)  # one-sided Gaussian line along the angle
        rows = (length + steps * math.sin(angle)).round().long()
        cols = (length + steps * math.cos(angle)).round().long()
        kernel.index_put_((rows, cols), taps, accumulate=True)
        kernel = kernel / kernel.sum()
        flakes = F.conv2d(flakes, kernel[None, None], padding=length)[0, 0].to(image)
        gray = (image * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1).to(image)).sum(0, keepdim=True)
        image = blend * image + (1 - blend) * torch.maximum(image, gray * 1.5 + 0.5)
        image = image + flakes + flakes.flip(0, 1)
    return image.clamp(0, 1)


def object_sample(index: int, num_classes: int = 10, split: str = "train", occlusion: int = 0,
                  corruption: str | None = None, severity: int = 2, height: int = 128, width: int = 128,
                  seed: int = 0, class_textures: bool = False,
                  clutter_classes: list[int] | None = None) -> dict[str, Tensor]:
    """One object-centric image of class ``index % num_classes`` at a random ImageNet3D-like pose.

    Pose prior: azimuth U[0, 2 pi), elevation U[-pi/6, pi/3], theta U[-pi/6, pi/6], distance
    U(OBJECT_DISTANCE); viewmat = cameras.pose_from_angles (object at the origin, z up); K has focal
    OBJECT_FOCAL * min(H, W) and the principal point at the image centre. The object stands in a large
    textured box with a few distractor primitives behind it (clutter; depth valid everywhere).
    ``occlusion`` 1..3 adds camera-facing textured quads between camera and object covering about
    20/40/60 % of the object mask (measured: ``occlusion_fraction``); ``corruption`` is applied last.
    The pose, scene and occluders depend only on (seed, split, index), so the occluded and corrupted
    variants of a test index show the same object at the same pose. Part textures are drawn per image
    (default) or, with ``class_textures=True``, fixed per class and part up to a per-image colour jitter
    (``_class_part_texture``: every instance of a class shows the same parts where the same vertices are,
    as real categories do).
    The clutter behind the object is 3-5 textured primitives (default) or, with ``clutter_classes``, 3-5
    objects of pool classes drawn from that list (their parts and class textures at their class size, a
    random yaw): backgrounds full of other objects, as real photographs have.
    Returns image (3, H, W), depth (H, W), mask (H, W) bool visible object pixels, amodal_mask (H, W)
    bool, occluder_mask (H, W) bool, occlusion_fraction (), label () int64, azimuth, elevation, theta,
    distance (), viewmat (4, 4), K (3, 3), cuboid (3,) full extents (``class_cuboid``).
    """
    _check_index("index", index)
    _check_size(height, width)
    _check_object_class(num_classes)
    if split not in OBJECT_SPLITS:
        raise ValueError(f"split must be one of {OBJECT_SPLITS}, got {split!r}")
    if occlusion not in (0, 1, 2, 3):
        raise ValueError(f"occlusion must be 0, 1, 2 or 3, got {occlusion!r}")
    if corruption is not None and corruption not in CORRUPTIONS:
        raise ValueError(f"corruption must be None or one of {CORRUPTIONS}, got {corruption!r}")
    if severity not in (1, 2, 3):
        raise ValueError(f"severity must be 1, 2 or 3, got {severity!r}")
    if clutter_classes is not None:
        if not isinstance(clutter_classes, (list, tuple)) or not clutter_classes:
            raise ValueError(f"clutter_classes must be None or a non-empty list of pool classes, got {clutter_classes!r}")
        for c in clutter_classes:
            _check_object_class(MAX_OBJECT_CLASSES, c)
    label = index % num_classes
    rng = _Random("object", seed, split, index)
    azimuth, elevation = rng.uniform(0, 2 * math.pi), rng.uniform(-math.pi / 6, math.pi / 3)
    theta, distance = rng.uniform(-math.pi / 6, math.pi / 6), rng.uniform(*OBJECT_DISTANCE)
    viewmat = cameras.pose_from_angles(azimuth, elevation, theta, distance).float()
    focal = OBJECT_FOCAL * min(height, width)
    K = cameras.intrinsics(focal, focal, width / 2, height / 2)

    half, parts, hue = _object_class(label)
    builder = SceneBuilder()
    for part, (kind, center, half_size) in enumerate(parts):
        if class_textures:
            texture = _class_part_texture(label, part, hue, rng)
        else:
            texture = _random_texture(rng, hue=hue + rng.uniform(-0.04, 0.04), frequency=(2.0, 6.0))
        builder.add(kind, center, half_size, texture, label=1, instance=1)
    builder.add("box", (0.0, 0.0, 0.0), (20.0, 20.0, 20.0), _random_texture(rng, frequency=(0.2, 1.0)))
    eye = cameras.camera_center(viewmat.double())
    axes = viewmat[:3, :3].double()  # rows: camera right, down, forward in the object frame
    for k in range(3 + rng.integer(3)):  # clutter behind the object, inside the view
        sideways, vertical = rng.uniform(-0.45, 0.45), rng.uniform(-0.45, 0.45)
        direction = F.normalize(axes[2] + sideways * axes[0] + vertical * axes[1], dim=0)
        center = eye + direction * (distance + rng.uniform(3.5, 8.0))
        shape, size = rng.choice(_SHAPES), [rng.uniform(0.3, 1.2) for _ in range(3)]
        texture, yaw = _random_texture(rng, frequency=(0.5, 3.0)), rng.uniform(0, 2 * math.pi)
        if clutter_classes is None:
            builder.add(shape, center, size, texture, instance=2 + k, yaw=yaw)
            continue
        # an object in place of the primitive; its class and colours come from their own stream, so the
        # pose, room and light of the image stay those of the primitives' version
        other_rng = _Random("object-clutter", seed, split, index, k)
        other = clutter_classes[other_rng.integer(len(clutter_classes))]
        _, other_parts, other_hue = _object_class(other)
        turn = torch.tensor(_yaw_rotation(yaw), dtype=torch.float64)
        for part, (kind, part_center, half_size) in enumerate(other_parts):
            offset = turn @ torch.tensor(part_center, dtype=torch.float64)
            builder.add(kind, (center + offset).tolist(), half_size,
                        _class_part_texture(other, part, other_hue, other_rng), instance=2 + k, yaw=yaw)
    light = (rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.3, 1.5))
    render = render_scene(builder.build(), viewmat, K, width, height, light_direction=light)
    image, depth = render["image"], render["depth"]
    amodal = render["instance"] == 1
    occluder_mask = torch.zeros_like(amodal)
    if occlusion > 0:
        occluders = _occluder_scene(amodal, occlusion, viewmat, K, distance - 1.25, rng)
        occluded = render_scene(occluders, viewmat, K, width, height, light_direction=light)
        occluder_mask = occluded["depth"] > 0
        image = torch.where(occluder_mask, occluded["image"], image)
        depth = torch.where(occluder_mask, occluded["depth"], depth)
    if corruption is not None:
        image = corrupt_image(image, depth, corruption, severity, rng.generator)
    mask = amodal & ~occluder_mask
    fraction = (amodal & occluder_mask).sum() / amodal.sum().clamp_min(1)
    angles = torch.tensor([azimuth, elevation, theta, distance], dtype=torch.float32)
    return dict(image=image, depth=depth, mask=mask, amodal_mask=amodal, occluder_mask=occluder_mask,
                occlusion_fraction=fraction.float(), label=torch.tensor(label), azimuth=angles[0],
                elevation=angles[1], theta=angles[2], distance=angles[3], viewmat=viewmat, K=K,
                cuboid=2 * torch.tensor(half))


class ObjectDataset(torch.utils.data.Dataset):
    """``num_images`` samples of ``object_sample`` (label = index % num_classes), made on the fly."""

    def __init__(self, num_images: int, num_classes: int = 10, split: str = "train", occlusion: int = 0,
                 corruption: str | None = None, severity: int = 2, height: int = 128, width: int = 128,
                 seed: int = 0):
        _check_index("num_images", num_images)
        self.options = dict(num_classes=num_classes, split=split, occlusion=occlusion, corruption=corruption,
                            severity=severity, height=height, width=width, seed=seed)
        object_sample(0, **self.options)  # validates the arguments
        self.num_images = num_images

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        return object_sample(index, **self.options)
