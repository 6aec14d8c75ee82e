"""Triplanes rendered by volume ray marching, and the triplane decoder of 3D-Prior.

Paper: Aygün, Dhar, Yan, Mac Aodha, Ranjan, "Enhancing 2D Representation Learning with a 3D Prior",
2024, arXiv:2406.02535. A ViT representation h is decoded into a triplane (``TriplaneGenerator``, the
decoder Φ), a two-layer MLP turns bilinearly sampled triplane features into density and colour
(``TriplaneDecoder``), and the triplane is rendered from one fixed camera (``render_triplane``).

The renderer is EG3D's (Chan et al., "Efficient Geometry-aware 3D Generative Adversarial Networks",
CVPR 2022, arXiv:2112.07945; github.com/NVlabs/eg3d at 7cf1fd1: ``ImportanceRenderer``,
``MipRayMarcher2``, ``sample_from_planes``, ``OSGDecoder``), number for number. Its volume rendering is
NeRF's (Mildenhall et al., ECCV 2020, arXiv:2003.08934); the equation numbers in this file are NeRF's
(3D-Prior takes the renderer from EG3D and numbers none of its equations).

The file reads in the order of the method:
1. Φ: representation tokens -> triplanes (B, 3, C, H, W).
2. The triplane lookup (EG3D ``sample_from_planes``): a world point p is scaled to q = 2 p / box_size,
   projected onto three planes and sampled bilinearly with ``grid_sample`` (u along W, v along H,
   ``align_corners=False``, zero padding). ``plane_axes="eg3d"`` reproduces EG3D's planes (x,y), (x,z),
   (z,x), which never see the y-z plane (eg3d issues #30, #53, #67); the default "xy_yz_zx" fixes that.
3. The point decoder (EG3D ``OSGDecoder``): mean over the planes, Linear -> softplus -> Linear.
4. Samples along the rays: ``linspace(near, far, S)`` (both ends) + jitter * (far - near) / (S - 1).
5. Volume rendering (EG3D ``MipRayMarcher2``): the midpoint rule over the S - 1 intervals, raw densities
   averaged between neighbours before sigma = softplus(raw - 1).
6. Importance sampling (EG3D ``sample_importance``): blurred interval weights, the pdf ``weights[1:-1]``
   over the midpoints ``t_mid[:-1]`` (EG3D's slice, a leftover of NeRF code: the last interval is never
   drawn); fine depths are detached.
7. ``render_triplane``: coarse pass, importance sampling, fine pass, one march over S + N samples.
8. The fast path (the same math): a texel-table ``embedding_bag`` lookup whose backward is a product of
   sparse matrices over sorted cells on CPU (``index_add_`` elsewhere), blocks of rows, rays padded to a
   multiple of RAY_BLOCK, and a hand-written backward of the decoder MLP. ``render_triplane(fast=None)``
   takes it whenever no gradient is needed at the sample positions.

Where this file differs from EG3D on purpose: rgb is returned in EG3D's colour range (about [0, 1]),
not mapped to [-1, 1]; transmittance is computed in log space (EG3D multiplies 1 - alpha + 1e-10; the two
differ by less than 1e-9 and the log form has an exact gradient at alpha = 1); a ray with zero total
weight gets depth = far of that ray instead of a clamp to the largest sample depth of the whole batch
(the two agree for fixed near/far without jitter); fine depths come from coarse weights computed under
``torch.no_grad`` (EG3D builds and drops that graph); features are never expanded per view direction
(OSGDecoder ignores it).
"""

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Which two world axes (of q = 2 p / box_size) give (u, v) on each of the three planes.
PLANE_AXES = {
    "xy_yz_zx": ((0, 1), (1, 2), (2, 0)),
    "eg3d": ((0, 1), (0, 2), (2, 0)),  # EG3D's generate_planes(): no y-z plane
}
DENSITY_SHIFT = -1.0  # EG3D's softplus(raw - 1): "activation bias of -1 makes things initialize better"
UNIT_TOLERANCE = 1e-3  # |norm(direction) - 1| allowed for a "unit" ray direction


# ---------------------------------------------------------------------------------------------------
# Input checks (public boundary only)
# ---------------------------------------------------------------------------------------------------


def _check_tensor(name: str, tensor, ndim: int | None = None, last_dims: tuple = (), min_ndim: int = 1,
                  half: bool = False) -> None:
    """A float32/float64 tensor (any float if ``half``) with ``ndim`` dims (at least ``min_ndim`` if
    None) ending in ``last_dims``."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point() or (not half and tensor.dtype not in (torch.float32, torch.float64)):
        raise TypeError(f"{name} must be a float32 or float64 tensor, got {tensor.dtype}")
    bad_ndim = tensor.ndim != ndim if ndim is not None else tensor.ndim < max(len(last_dims), min_ndim)
    if bad_ndim or (last_dims and tuple(tensor.shape[-len(last_dims):]) != tuple(last_dims)):
        lead = ["..."] if ndim is None else ["?"] * (ndim - len(last_dims))
        dims = ", ".join(lead + [str(d) for d in last_dims])
        raise ValueError(f"{name} must have shape ({dims}), got {tuple(tensor.shape)}")


def _check_like(name: str, tensor: Tensor, like: Tensor, like_name: str) -> None:
    if tensor.dtype != like.dtype or tensor.device != like.device:
        raise TypeError(f"{name} ({tensor.dtype}, {tensor.device}) must have the dtype and device of "
                        f"{like_name} ({like.dtype}, {like.device})")


def _check_box_size(box_size) -> float:
    if isinstance(box_size, (Tensor, bool)) or not isinstance(box_size, (int, float)):
        raise TypeError(f"box_size must be a Python float, got {type(box_size).__name__}")
    if not math.isfinite(box_size) or box_size <= 0:
        raise ValueError(f"box_size must be finite and > 0, got {box_size}")
    return float(box_size)


def _check_plane_axes(plane_axes: str) -> tuple:
    if not isinstance(plane_axes, str) or plane_axes not in PLANE_AXES:
        raise ValueError(f"plane_axes must be one of {sorted(PLANE_AXES)}, got {plane_axes!r}")
    return PLANE_AXES[plane_axes]


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_planes_points(planes, points) -> None:
    _check_tensor("planes", planes, 5)
    if planes.shape[1] != 3:
        raise ValueError(f"planes must have shape (B, 3, C, H, W) with 3 planes, got {tuple(planes.shape)}")
    _check_tensor("points", points, 3, (3,))
    if points.shape[0] != planes.shape[0]:
        raise ValueError(f"points batch {points.shape[0]} does not match planes batch {planes.shape[0]}")
    _check_like("points", points, planes, "planes")


def _as_ray_limit(name: str, value, like: Tensor) -> Tensor | float:
    """near/far as a finite float >= 0, or a tensor broadcastable to (B, R) or (B, R, 1) -> (B, R, 1)."""
    batch, rays = like.shape[:2]
    if not isinstance(value, Tensor):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        return float(value)
    _check_tensor(name, value, min_ndim=0)
    _check_like(name, value, like, "origins")
    try:
        return (value.unsqueeze(-1) if value.ndim == 2 else value).expand(batch, rays, 1)
    except RuntimeError:
        raise ValueError(f"{name} must be a float or broadcastable to (B, R, 1) = ({batch}, {rays}, 1), "
                         f"got {tuple(value.shape)}") from None


def _check_render_inputs(planes, decoder, origins, directions, near, far, num_samples, num_importance,
                         box_size, plane_axes, jitter, importance_u, white_background, chunk_rays, fast,
                         check) -> dict:
    """Every check of ``render_triplane``: shapes, dtypes and devices, options, and (``check``) the
    values, with one host sync for all value checks together. Returns the normalised arguments."""
    _check_tensor("planes", planes, 5)
    if planes.shape[1] != 3:
        raise ValueError(f"planes must have shape (B, 3, C, H, W) with 3 planes, got {tuple(planes.shape)}")
    if not callable(decoder):
        raise TypeError(f"decoder must be callable features (..., C) -> (raw_sigma, rgb), got "
                        f"{type(decoder).__name__}")
    _check_tensor("origins", origins, 3, (3,))
    _check_tensor("directions", directions, 3, (3,))
    if origins.shape[0] != planes.shape[0] or origins.shape[1] == 0:
        raise ValueError(f"origins must have shape (B, R, 3) with B = {planes.shape[0]} (planes) and R >= 1, "
                         f"got {tuple(origins.shape)}")
    if directions.shape != origins.shape:
        raise ValueError(f"directions must have the shape of origins {tuple(origins.shape)}, "
                         f"got {tuple(directions.shape)}")
    _check_like("origins", origins, planes, "planes")
    _check_like("directions", directions, planes, "planes")
    box_size = _check_box_size(box_size)
    axes = _check_plane_axes(plane_axes)
    num_samples = _check_count("num_samples", num_samples, 2)
    num_importance = _check_count("num_importance", num_importance, 0)
    if num_importance > 0 and num_samples < 3:
        raise ValueError(f"num_samples must be >= 3 for importance sampling (EG3D's pdf has S - 3 bins), "
                         f"got {num_samples}")
    near, far = _as_ray_limit("near", near, origins), _as_ray_limit("far", far, origins)
    if isinstance(near, float) and isinstance(far, float) and not near < far:
        raise ValueError(f"near must be < far, got near={near}, far={far}")
    batch, rays = origins.shape[:2]
    if jitter is not None:
        _check_tensor("jitter", jitter, min_ndim=0)
        _check_like("jitter", jitter, origins, "origins")
        try:
            jitter = jitter.expand(batch, rays, num_samples)
        except RuntimeError:
            raise ValueError(f"jitter must broadcast to (B, R, S) = ({batch}, {rays}, {num_samples}), "
                             f"got {tuple(jitter.shape)}") from None
    if num_importance == 0:
        importance_u = None
    elif importance_u is not None:
        _check_tensor("importance_u", importance_u, 3)
        _check_like("importance_u", importance_u, origins, "origins")
        if importance_u.shape != (batch, rays, num_importance):
            raise ValueError(f"importance_u must have shape (B, R, N) = ({batch}, {rays}, {num_importance}), "
                             f"got {tuple(importance_u.shape)}")
    if chunk_rays is not None:
        _check_count("chunk_rays", chunk_rays, 1)
    if not isinstance(white_background, bool):
        raise TypeError(f"white_background must be a bool, got {white_background!r}")
    if not isinstance(check, bool):
        raise TypeError(f"check must be a bool, got {check!r}")
    if fast not in (None, True, False):
        raise TypeError(f"fast must be None, True or False, got {fast!r}")
    position_grad = any(isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled()
                        for x in (origins, directions, near, far, jitter))
    if fast and position_grad:
        raise ValueError("fast=True gives no gradient to the sample positions, but origins, directions, "
                         "near, far or jitter require grad: pass fast=None or False")
    if check:
        _check_render_values(origins, directions, near, far, jitter, importance_u)
    return dict(near=near, far=far, jitter=jitter, importance_u=importance_u, num_samples=num_samples,
                num_importance=num_importance, box_size=box_size,
                fast=(not position_grad) if fast is None else fast)


def _check_render_values(origins, directions, near, far, jitter, importance_u) -> None:
    """Finite origins, unit directions, finite 0 <= near < far, jitter and importance_u in [0, 1): all
    conditions are reduced on the device and read with ONE host sync; the message is built only on error."""
    def in_unit_interval(x):
        return (x >= 0) & (x < 1)  # False for NaN

    tests = {
        "origins must be finite": lambda: torch.isfinite(origins).all(),
        f"directions must be unit vectors (|norm - 1| <= {UNIT_TOLERANCE})":
            lambda: ((torch.linalg.vector_norm(directions, dim=-1) - 1).abs() <= UNIT_TOLERANCE).all(),
    }
    if isinstance(near, Tensor):
        tests["near must be finite and >= 0 for every ray"] = lambda: (torch.isfinite(near) & (near >= 0)).all()
    if isinstance(far, Tensor):
        tests["far must be finite for every ray"] = lambda: torch.isfinite(far).all()
    if isinstance(near, Tensor) or isinstance(far, Tensor):
        tests["near must be < far for every ray"] = lambda: (torch.as_tensor(near) < torch.as_tensor(far)).all()
    if jitter is not None:
        tests["jitter must lie in [0, 1)"] = lambda: in_unit_interval(jitter).all()
    if importance_u is not None:
        tests["importance_u must lie in [0, 1)"] = lambda: in_unit_interval(importance_u).all()
    passed = torch.stack([test().to(origins.device) for test in tests.values()]).tolist()  # the one sync
    failed = [message for message, ok in zip(tests, passed) if not ok]
    if failed:
        raise ValueError("; ".join(failed) + " (check=False skips these value checks)")


# ---------------------------------------------------------------------------------------------------
# 1. The decoder Φ of 3D-Prior: representation tokens h -> triplanes
# ---------------------------------------------------------------------------------------------------


class _AttentionBlock(nn.Module):
    """Pre-norm transformer block on the plane embeddings x (B, N, dim) given the memory h (B, T, dim):
    x += SelfAttn(x) (when ``self_attention``); x += CrossAttn(x, h); x += MLP(x)."""

    def __init__(self, dim: int, num_heads: int, self_attention: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.self_attention = self_attention
        if self_attention:
            self.norm_self, self.qkv, self.proj_self = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q, self.to_kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        heads = self.num_heads
        if self.self_attention:
            q, k, v = rearrange(self.qkv(self.norm_self(x)), "b n (three h d) -> three b h n d", three=3, h=heads)
            x = x + self.proj_self(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))
        q = rearrange(self.to_q(self.norm_q(x)), "b n (h d) -> b h n d", h=heads)
        k, v = rearrange(self.to_kv(self.norm_kv(memory)), "b m (two h d) -> two b h m d", two=2, h=heads)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, dim / heads)
        x = x + self.proj(rearrange(attended, "b h n d -> b n (h d)"))
        return x + self.mlp(self.norm_mlp(x))


class TriplaneGenerator(nn.Module):
    """The decoder Φ of 3D-Prior (§3.4): representation tokens h -> triplanes (B, 3, D, 128, 128).

    Learnable triplane embeddings (3 x 16 x 16 tokens of width ``dim``) attend to themselves
    (``self_attention``, as §3.4 describes) and cross-attend to h (``num_layers`` blocks), then each plane
    is upsampled by bilinear x2 + 3x3 conv + GELU blocks from ``embed_resolution`` to
    ``plane_resolution`` and projected to ``plane_channels`` (D). The three planes share the conv weights.
    Paper sizes are the defaults; smaller ones are selectable for quick runs.

    ``patch_grid`` (not in the paper; None = the paper's Φ): the last ``patch_grid``² tokens are a
    row-major patch grid seen by a camera looking along +z (image columns = world x, rows = world y);
    each is projected to ``dim`` and bilinearly resized onto the first plane (xy, the one facing that
    camera), where it is added to the embeddings before the attention blocks. This gives a briefly
    trained Φ a direct, image-aligned path to h; the paper's Φ must learn that alignment in its
    cross-attention.
    """

    def __init__(self, input_dim: int, plane_channels: int = 32, plane_resolution: int = 128,
                 embed_resolution: int = 16, dim: int = 256, num_heads: int = 8, num_layers: int = 2,
                 self_attention: bool = True, patch_grid: int | None = None):
        super().__init__()
        if patch_grid is not None and (isinstance(patch_grid, bool) or not isinstance(patch_grid, int) or patch_grid < 1):
            raise ValueError(f"patch_grid must be None or a positive int, got {patch_grid!r}")
        num_upsamples = round(math.log2(plane_resolution / embed_resolution))
        if embed_resolution * 2 ** num_upsamples != plane_resolution:
            raise ValueError(f"plane_resolution must be embed_resolution * 2^k, got {plane_resolution}, "
                             f"{embed_resolution}")
        if dim % num_heads != 0:
            raise ValueError(f"dim must be divisible by num_heads, got {dim}, {num_heads}")
        self.embed_resolution = embed_resolution
        self.embeddings = nn.Parameter(torch.randn(3 * embed_resolution ** 2, dim) * 0.02)
        self.input_proj = nn.Linear(input_dim, dim)
        self.patch_grid = patch_grid
        self.patch_proj = nn.Linear(input_dim, dim) if patch_grid is not None else None
        self.blocks = nn.ModuleList(_AttentionBlock(dim, num_heads, self_attention) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        layers, channels = [], dim
        for _ in range(num_upsamples):
            out_channels = max(channels // 2, plane_channels)
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(channels, out_channels, 3, padding=1), nn.GELU()]
            channels = out_channels
        layers.append(nn.Conv2d(channels, plane_channels, 1))
        self.upsample = nn.Sequential(*layers)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: (B, T, input_dim), e.g. class + patch tokens of the last 4 ViT layers -> (B, 3, C, H, W)."""
        _check_tensor("tokens", tokens, 3, (self.input_proj.in_features,))
        memory = self.input_proj(tokens)  # (B, T, dim)
        x = self.embeddings.expand(tokens.shape[0], -1, -1)  # (B, 3*16*16, dim)
        if self.patch_grid is not None:  # not in the paper: the xy plane reads its own patches directly
            grid, side = self.patch_grid, self.embed_resolution
            if tokens.shape[1] < grid * grid:
                raise ValueError(f"tokens must hold the {grid}x{grid} patch grid last, got {tokens.shape[1]} tokens")
            patches = rearrange(self.patch_proj(tokens[:, -grid * grid:]), "b (h w) c -> b c h w", h=grid)
            patches = F.interpolate(patches, (side, side), mode="bilinear", align_corners=False)
            x = torch.cat([x[:, :side * side] + rearrange(patches, "b c h w -> b (h w) c"), x[:, side * side:]], 1)
        for block in self.blocks:
            x = block(x, memory)
        x = rearrange(self.norm(x), "b (k h w) c -> (b k) c h w", k=3, h=self.embed_resolution)
        return rearrange(self.upsample(x), "(b k) c h w -> b k c h w", k=3)


# ---------------------------------------------------------------------------------------------------
# 2. Triplane lookup (EG3D sample_from_planes)
# ---------------------------------------------------------------------------------------------------


def project_onto_planes(points: Tensor, box_size: float, plane_axes: str = "xy_yz_zx") -> Tensor:
    """Plane coordinates (B, 3, M, 2) of points (B, M, 3); the cube of side box_size maps to [-1, 1]^2.

    EG3D computes them as q @ inverse(axes[k]) keeping two components; with its permutation matrices
    that is picking two coordinates of q, which is what this does.
    """
    _check_tensor("points", points, 3, (3,))
    box_size = _check_box_size(box_size)
    axes = _check_plane_axes(plane_axes)
    return _project(points, box_size, axes).transpose(1, 2)


def _project(points: Tensor, box_size: float, axes: tuple) -> Tensor:
    """Plane coordinates (B, M, 3, 2) of points (B, M, 3): plane k reads the world axes axes[k]."""
    q = points * (2.0 / box_size)  # the cube [-box/2, box/2]^3 becomes [-1, 1]^3
    index = torch.tensor(axes, device=points.device).flatten()  # (6,)
    return q.index_select(-1, index).unflatten(-1, (3, 2))


def sample_triplane(planes: Tensor, points: Tensor, box_size: float, plane_axes: str = "xy_yz_zx") -> Tensor:
    """Bilinear features of each plane at each point, all three planes in one ``grid_sample`` call.

    planes: (B, 3, C, H, W); points: (B, M, 3) world points, the planes span [-box_size/2, box_size/2]^3.
    Returns (B, 3, M, C), per plane (not yet averaged). As in EG3D (``padding_mode="zeros"``,
    ``align_corners=False``), a plane reads 0 only where the point's projection onto that plane lies more
    than half a texel beyond its edge; a point outside the cube still reads the planes its projection
    falls on (e.g. (x, y, 5) reads the xy plane at (x, y)). Differentiable in planes and points; NaN
    points flow through as grid_sample handles them.
    """
    _check_planes_points(planes, points)
    box_size = _check_box_size(box_size)
    axes = _check_plane_axes(plane_axes)
    batch, _, channels, height, width = planes.shape
    uv = _project(points, box_size, axes)  # (B, M, 3, 2)
    grid = rearrange(uv, "b m k two -> (b k) 1 m two")  # u along W, v along H
    features = F.grid_sample(planes.reshape(batch * 3, channels, height, width), grid, mode="bilinear",
                             padding_mode="zeros", align_corners=False)  # (B*3, C, 1, M)
    return rearrange(features, "(b k) c 1 m -> b k m c", k=3)


# ---------------------------------------------------------------------------------------------------
# 3. The point decoder (EG3D OSGDecoder)
# ---------------------------------------------------------------------------------------------------


class TriplaneDecoder(nn.Module):
    """EG3D's OSGDecoder: FC(C -> 64) -> softplus -> FC(64 -> 1 + 3), rgb = sigmoid * 1.002 - 0.001.

    Maps plane-averaged features (..., C) to (raw_sigma (..., 1), rgb (..., 3)); the mean over the three
    planes that OSGDecoder starts with is done by the renderer. The view direction is not used. Plain
    ``nn.Linear`` layers with EG3D's initialisation (weights N(0, 1/fan_in), zero bias) stand for its
    equalized-lr layers (the same function: EG3D multiplies N(0, 1) weights by 1/sqrt(fan_in)).
    """

    def __init__(self, feature_dim: int = 32, hidden_dim: int = 64, rgb_dim: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(feature_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, 1 + rgb_dim)
        for layer in (self.fc1, self.fc2):
            nn.init.normal_(layer.weight, std=1 / math.sqrt(layer.in_features))
            nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        out = self.fc2(F.softplus(self.fc1(features)))  # (..., 1 + rgb_dim)
        return self.split_outputs(out)

    @staticmethod
    def split_outputs(out: Tensor) -> tuple[Tensor, Tensor]:
        """(..., 1 + rgb_dim) -> raw density (..., 1) and colour (..., rgb_dim) in [-0.001, 1.001]."""
        return out[..., :1], torch.sigmoid(out[..., 1:]) * (1 + 2 * 0.001) - 0.001  # MipNeRF's clamp


# ---------------------------------------------------------------------------------------------------
# 4. Samples along the rays
# ---------------------------------------------------------------------------------------------------


def ray_box_intersection(origins: Tensor, directions: Tensor, box_size: float) -> tuple[Tensor, Tensor]:
    """Slab test of rays against the cube [-box_size/2, box_size/2]^3 (EG3D ``get_ray_limits_box``).

    origins, directions: (..., 3). Returns t_start, t_end (..., 1) along the rays; a ray that misses
    the cube gets EG3D's markers t_start = -1, t_end = -2 (so t_end < t_start marks a miss).
    """
    _check_tensor("origins", origins, None, (3,))
    _check_tensor("directions", directions, origins.ndim, (3,))
    if directions.shape != origins.shape:
        raise ValueError(f"directions must have the shape of origins {tuple(origins.shape)}, "
                         f"got {tuple(directions.shape)}")
    _check_like("directions", directions, origins, "origins")
    half = _check_box_size(box_size) / 2
    inverse = 1.0 / directions  # +-inf for axis-parallel rays, as in EG3D
    t_low = (-half - origins) * inverse
    t_high = (half - origins) * inverse
    t_start = torch.minimum(t_low, t_high).amax(-1, keepdim=True)
    t_end = torch.maximum(t_low, t_high).amin(-1, keepdim=True)
    hit = ~(t_start > t_end)
    return torch.where(hit, t_start, -1.0), torch.where(hit, t_end, -2.0)


def stratified_depths(near: Tensor | float, far: Tensor | float, num_samples: int, jitter: Tensor) -> Tensor:
    """EG3D's coarse depths (..., S): linspace(near, far, S) + jitter * (far - near) / (S - 1).

    near, far: floats or (..., 1) tensors; jitter: broadcastable to (..., S), uniform in [0, 1) for
    training, 0 for a deterministic render. EG3D jitters by a whole step, not inside NeRF's bins (NeRF
    Eq. 2), so the last sample can pass ``far``. One sample (S = 1) has one step of far - near:
    t_0 = near + jitter (far - near). Rounding follows EG3D (torch.linspace for floats,
    near + k/(S-1) (far - near) for tensors): the random test planes amplify one-ulp position changes.
    """
    _check_count("num_samples", num_samples, 1)
    _check_tensor("jitter", jitter, min_ndim=0)
    steps = max(num_samples - 1, 1)
    step_size = (far - near) / steps
    if isinstance(near, Tensor) or isinstance(far, Tensor):
        fraction = torch.arange(num_samples, device=jitter.device, dtype=jitter.dtype) / steps
        return near + fraction * (far - near) + jitter * step_size
    return torch.linspace(near, far, num_samples, device=jitter.device, dtype=jitter.dtype) + jitter * step_size


# ---------------------------------------------------------------------------------------------------
# 5. Volume rendering (EG3D MipRayMarcher2)
# ---------------------------------------------------------------------------------------------------


def composite(colors: Tensor, raw_sigma: Tensor, t: Tensor, density_shift: float = DENSITY_SHIFT,
              white_background: bool = False, far: Tensor | float | None = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EG3D's midpoint ray marcher: NeRF's quadrature (Eq. 3) over the S - 1 intervals between samples.

    colors: (..., S, C); raw_sigma: (..., S) raw densities (before softplus); t: (..., S) sorted depths
    along unit rays; far: depth given to a ray with zero total weight, (..., 1) or float (default: its
    last sample t[..., -1]).
    Returns rgb (..., C) = sum_i w_i c_i (+ 1 - opacity on a white background), depth (..., 1) =
    sum_i w_i t_i / opacity, opacity (..., 1) = sum_i w_i, weights w (..., S-1). Never NaN from finite
    input, also in backward.
    """
    _check_tensor("colors", colors)
    if colors.ndim < 2 or colors.shape[-2] < 2:
        raise ValueError(f"colors must have shape (..., S, C) with S >= 2, got {tuple(colors.shape)}")
    _check_tensor("raw_sigma", raw_sigma, colors.ndim - 1)
    _check_tensor("t", t, colors.ndim - 1)
    if raw_sigma.shape != colors.shape[:-1] or t.shape != colors.shape[:-1]:
        raise ValueError(f"raw_sigma {tuple(raw_sigma.shape)} and t {tuple(t.shape)} must have shape "
                         f"colors.shape[:-1] = {tuple(colors.shape[:-1])}")
    _check_like("raw_sigma", raw_sigma, colors, "colors")
    _check_like("t", t, colors, "colors")
    if (isinstance(density_shift, bool) or not isinstance(density_shift, (int, float))
            or not math.isfinite(density_shift)):
        raise ValueError(f"density_shift must be a finite float, got {density_shift!r}")
    # Midpoints: colour, raw density and depth of interval i are the means of samples i and i + 1.
    colors_mid = (colors[..., 1:, :] + colors[..., :-1, :]) / 2  # (..., S-1, C)
    sigma = F.softplus((raw_sigma[..., 1:] + raw_sigma[..., :-1]) / 2 + density_shift)  # raw averaged first
    t_mid = (t[..., 1:] + t[..., :-1]) / 2
    delta = t[..., 1:] - t[..., :-1]  # delta_i = t_{i+1} - t_i
    optical_depth = sigma * delta
    alpha = -torch.expm1(-optical_depth)  # alpha_i = 1 - exp(-sigma_i delta_i)                 (NeRF Eq. 3)
    # T_i = prod_{j<i} (1 - alpha_j) = exp(-sum_{j<i} sigma_j delta_j): an exclusive cumsum  (NeRF Eq. 3)
    transmittance = torch.exp(-F.pad(torch.cumsum(optical_depth, -1)[..., :-1], (1, 0)))
    weights = transmittance * alpha  # w_i = T_i alpha_i                                       (NeRF Eq. 5)
    rgb = (weights.unsqueeze(-1) * colors_mid).sum(-2)  # C = sum_i w_i c_i                    (NeRF Eq. 3)
    opacity = weights.sum(-1, keepdim=True)
    has_weight = opacity > 0
    # depth = sum_i w_i t_i / sum_i w_i, divided by a safe denominator so that no 0/0 reaches forward or
    # backward; clamped to the marched range (EG3D clamps to the batch's range), far for empty rays.
    depth = (weights * t_mid).sum(-1, keepdim=True) / torch.where(has_weight, opacity, 1.0)
    depth = torch.clamp(depth, t_mid[..., :1], t_mid[..., -1:])
    depth = torch.where(has_weight, depth, t[..., -1:] if far is None else far)
    if white_background:
        rgb = rgb + (1 - opacity)
    return rgb, depth, opacity, weights


# ---------------------------------------------------------------------------------------------------
# 6. Importance sampling (EG3D sample_importance + sample_pdf)
# ---------------------------------------------------------------------------------------------------


def sample_pdf(bins: Tensor, weights: Tensor, u: Tensor) -> Tensor:
    """Inverse-transform sampling of the piecewise-constant pdf w_i / sum_j w_j (NeRF Eq. 5).

    bins: (..., n+1) bin edges; weights: (..., n) >= 0; u: (..., N) uniforms in [0, 1].
    Returns samples (..., N). EG3D's details: weights + 1e-5, a cdf with a leading 0,
    searchsorted(right=True), and a cdf step below 1e-5 treated as 1.
    """
    _check_tensor("bins", bins)
    _check_tensor("weights", weights, bins.ndim)
    _check_tensor("u", u, bins.ndim)
    if bins.shape[:-1] != weights.shape[:-1] or bins.shape[-1] != weights.shape[-1] + 1:
        raise ValueError(f"bins (..., n+1) and weights (..., n) must share leading dims, got "
                         f"{tuple(bins.shape)} and {tuple(weights.shape)}")
    if u.shape[:-1] != weights.shape[:-1]:
        raise ValueError(f"u must have shape (..., N) with the leading dims of weights "
                         f"{tuple(weights.shape[:-1])}, got {tuple(u.shape)}")
    _check_like("weights", weights, bins, "bins")
    _check_like("u", u, bins, "bins")
    eps = 1e-5
    num_bins = weights.shape[-1]
    weights = weights + eps
    pdf = weights / weights.sum(-1, keepdim=True)
    cdf = F.pad(torch.cumsum(pdf, -1), (1, 0))  # (..., n+1), cdf[0] = 0
    index = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True)
    below = (index - 1).clamp(min=0)
    above = index.clamp(max=num_bins)
    cdf_below, cdf_above = cdf.gather(-1, below), cdf.gather(-1, above)
    bins_below, bins_above = bins.gather(-1, below), bins.gather(-1, above)
    denom = cdf_above - cdf_below
    denom = torch.where(denom < eps, 1.0, denom)
    return bins_below + (u - cdf_below) / denom * (bins_above - bins_below)


def sample_importance(depths: Tensor, weights: Tensor, u: Tensor) -> Tensor:
    """EG3D's fine depths (..., N) from coarse depths (..., S) and their interval weights (..., S-1).

    The weights are blurred (max_pool1d(2, 1, pad=1), avg_pool1d(2, 1), + 0.01); the pdf uses
    ``blurred[1:-1]`` over the midpoints ``t_mid[:-1]`` (EG3D's slice: the last interval is never drawn).
    u: (..., N) uniforms in [0, 1]. Computed without gradient; the result is detached.
    """
    _check_tensor("depths", depths)
    _check_tensor("weights", weights, depths.ndim)
    if depths.shape[-1] < 3 or weights.shape != depths.shape[:-1] + (depths.shape[-1] - 1,):
        raise ValueError(f"depths (..., S) with S >= 3 and weights (..., S-1) expected, got "
                         f"{tuple(depths.shape)} and {tuple(weights.shape)}")
    _check_like("weights", weights, depths, "depths")
    with torch.no_grad():
        pad = float("-inf")  # max_pool1d's padding: missing neighbours are ignored
        blurred = torch.maximum(F.pad(weights, (1, 0), value=pad), F.pad(weights, (0, 1), value=pad))  # (..., S)
        blurred = (blurred[..., :-1] + blurred[..., 1:]) / 2 + 0.01  # (..., S-1)
        t_mid = (depths[..., 1:] + depths[..., :-1]) / 2
        return sample_pdf(t_mid[..., :-1], blurred[..., 1:-1], u).detach()


# ---------------------------------------------------------------------------------------------------
# 7. The renderer (EG3D ImportanceRenderer)
# ---------------------------------------------------------------------------------------------------


def render_triplane(planes: Tensor, decoder: Callable, origins: Tensor, directions: Tensor, near, far,
                    num_samples: int = 16, num_importance: int = 16, box_size: float = 1.0,
                    plane_axes: str = "xy_yz_zx", jitter: Tensor | None = None,
                    importance_u: Tensor | None = None, white_background: bool = False,
                    chunk_rays: int | None = None, fast: bool | None = None, check: bool = True
                    ) -> dict[str, Tensor]:
    """Render triplanes along rays: S stratified samples, N importance samples, one march over S + N.

    planes: (B, 3, C, H, W); decoder: callable features (..., C) -> (raw_sigma (..., 1), rgb (..., 3)),
    e.g. ``TriplaneDecoder``; origins, directions: (B, R, 3), unit directions (``cameras.pixel_rays``);
    near, far: finite floats or tensors broadcastable to (B, R, 1), 0 <= near < far;
    jitter: broadcastable to (B, R, S), in [0, 1) (drawn with torch.rand if None; zeros for a
    deterministic render); importance_u: (B, R, N) in [0, 1) (drawn if None);
    chunk_rays: render that many rays at a time (bounded memory; with gradients each chunk is
    checkpointed and recomputed in backward);
    fast: the fast path of the same math (section 8): True, False, or None = automatic (fast unless
    origins, directions, near, far or jitter require grad, which only the grid_sample path serves);
    check: the value checks (finite origins, unit directions, limits, ranges of jitter and
    importance_u), one host sync per call; pass False inside a training loop once inputs are known good.
    Returns rgb (B, R, 3) (EG3D range, about [0, 1]), depth (B, R, 1) (distance along the ray; far for
    empty rays), opacity (B, R, 1), raw_sigma (B, R, S+N) (raw densities of every sample, sorted by depth).
    NaN in planes or decoder weights flows through to the outputs.
    """
    args = _check_render_inputs(planes, decoder, origins, directions, near, far, num_samples, num_importance,
                                box_size, plane_axes, jitter, importance_u, white_background, chunk_rays, fast,
                                check)
    batch, rays = origins.shape[:2]
    jitter, importance_u = args["jitter"], args["importance_u"]
    if jitter is None:  # EG3D jitters always, at inference too
        jitter = torch.rand(batch, rays, args["num_samples"], dtype=origins.dtype, device=origins.device)
    if args["num_importance"] > 0 and importance_u is None:
        importance_u = torch.rand(batch, rays, args["num_importance"], dtype=origins.dtype, device=origins.device)
    per_ray = [origins, directions, args["near"], args["far"], jitter, importance_u]
    chunk = rays if chunk_rays is None else min(chunk_rays, rays)
    if args["fast"]:
        per_ray, chunk = _pad_rays(per_ray, rays, chunk)
    options = dict(num_samples=args["num_samples"], box_size=args["box_size"], plane_axes=plane_axes,
                   white_background=white_background, fast=args["fast"])
    num_rays = per_ray[0].shape[1]
    chunks = []
    for start in range(0, num_rays, chunk):
        part = [x if x is None or isinstance(x, float) else x[:, start:start + chunk] for x in per_ray]
        if chunk < num_rays and torch.is_grad_enabled():  # keep only the chunk inputs, recompute in backward
            chunks.append(checkpoint(_render_rays, planes, decoder, *part, **options, use_reentrant=False))
        else:
            chunks.append(_render_rays(planes, decoder, *part, **options))
    rgb, depth, opacity, raw_sigma = [torch.cat(parts, 1)[:, :rays] for parts in zip(*chunks)]
    return {"rgb": rgb, "depth": depth, "opacity": opacity, "raw_sigma": raw_sigma}


def _render_rays(planes, decoder, origins, directions, near, far, jitter, importance_u, *, num_samples,
                 box_size, plane_axes, white_background, fast):
    """One chunk of rays: coarse pass, importance sampling, fine pass, the march over all samples."""
    query = (_fast_query if fast else _query)(planes, decoder, box_size, plane_axes)
    t_coarse = stratified_depths(near, far, num_samples, jitter)  # (B, R, S)
    raw_sigma, rgb = query(origins, directions, t_coarse)  # (B, R, S), (B, R, S, 3)
    t = t_coarse
    if importance_u is not None:
        with torch.no_grad():  # only the fine depths come out of the coarse march, and they are detached
            coarse_weights = composite(rgb, raw_sigma, t_coarse)[3]  # (B, R, S-1)
            t_fine = sample_importance(t_coarse, coarse_weights, importance_u)  # (B, R, N)
        raw_fine, rgb_fine = query(origins, directions, t_fine)
        t, order = torch.sort(torch.cat([t_coarse, t_fine], -1), -1)  # (B, R, S+N)
        raw_sigma = torch.cat([raw_sigma, raw_fine], -1).gather(-1, order)
        rgb = torch.cat([rgb, rgb_fine], -2).gather(-2, order.unsqueeze(-1).expand(-1, -1, -1, rgb.shape[-1]))
    rgb, depth, opacity, _ = composite(rgb, raw_sigma, t, white_background=white_background, far=far)
    return rgb, depth, opacity, raw_sigma


def _query(planes: Tensor, decoder: Callable, box_size: float, plane_axes: str) -> Callable:
    """The decoder at o + t d: a function (origins, directions (B, R, 3), t (B, R, K)) -> raw_sigma
    (B, R, K), rgb (B, R, K, 3), through ``sample_triplane`` and the mean over the planes."""
    def query(origins: Tensor, directions: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        batch, rays, samples = t.shape
        points = origins.unsqueeze(-2) + t.unsqueeze(-1) * directions.unsqueeze(-2)  # (B, R, K, 3): r(t) = o + t d
        features = sample_triplane(planes, points.view(batch, rays * samples, 3), box_size, plane_axes)
        raw_sigma, rgb = _decoded(decoder, features.mean(1))  # mean over the 3 planes: (B, R*K, C)
        return raw_sigma.view(batch, rays, samples), rgb.view(batch, rays, samples, -1)

    return query


def _decoded(decoder: Callable, features: Tensor) -> tuple[Tensor, Tensor]:
    """decoder(features (..., C)), its outputs checked for shape: raw_sigma (..., 1), rgb (..., K)."""
    outputs = decoder(features)
    if not (isinstance(outputs, tuple) and len(outputs) == 2 and all(isinstance(x, Tensor) for x in outputs)
            and outputs[0].shape == features.shape[:-1] + (1,) and outputs[1].shape[:-1] == features.shape[:-1]):
        shapes = [tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__ for x in
                  (outputs if isinstance(outputs, tuple) else [outputs])]
        raise ValueError(f"decoder must return (raw_sigma {(*features.shape[:-1], 1)}, rgb "
                         f"{(*features.shape[:-1], 'K')}) for features {tuple(features.shape)}, got {shapes}")
    return outputs


# ---------------------------------------------------------------------------------------------------
# 8. Fast path (the same math)
#
# ``render_triplane(fast=True)`` (the automatic choice when no gradient is needed at the sample
# positions) computes what sections 2, 3 and 7 compute, tested equal to them in float64 and by gradcheck
# (tests/test_triplane.py). Three changes, all for CPU time and memory (benchmarks/bench_triplane.py):
# - the lookup: the three bilinear lookups and the plane mean are one weighted ``embedding_bag`` sum of
#   12 texel rows of a channels-last copy of the planes with a border of zero texels (grid_sample's zero
#   padding without masks). Its backward is a splat: on CPU, sparse products over the points' cells
#   sorted once per block (``_scatter_by_cells``; CPU grid_sampler_2d_backward scatters channel by
#   channel and dominates EG3D's CPU time, and CPU ``index_add_`` sorts its indices anew in each of the
#   12 calls per block), on other devices ``index_add_`` (atomic adds). Sample positions get no gradient
#   (EG3D detaches the fine ones; the coarse ones come from the rays);
# - the decoder MLP of a ``TriplaneDecoder`` keeps only its input features for backward and recomputes
#   the 64-wide hidden layer there, instead of autograd's three (M, 64) tensors;
# - on CPU both go through the samples block by block (a fresh 32 MiB temporary costs more in page
#   faults than the arithmetic done on it; a block stays in cache from one op to the next), and the rays
#   are padded to a multiple of RAY_BLOCK: vectorised CPU kernels (softplus, sigmoid, exp, ...) run the
#   last numel % 16 elements through a scalar path that can differ in the last bit, so padding and
#   cutting chunks at multiples of RAY_BLOCK puts every element on the same code path whatever the
#   chunking: ``chunk_rays`` changes the memory, never the numbers.
# ---------------------------------------------------------------------------------------------------

RAY_BLOCK = 64  # rays are processed in multiples of this on the fast path
CPU_LOOKUP_ROWS = 32768  # points per block of the plane lookup on CPU (see _row_blocks)
CPU_DECODER_ROWS = 8192  # samples per block of the decoder MLP on CPU
CPU_SCATTER_ROWS = 131072  # points per block of the lookup's backward on CPU (see _scatter_by_cells)
SORTED_SCATTER_DEVICES = ("cpu",)  # the lookup's backward: sorted sparse products here, index_add_ elsewhere


def _pad_rays(per_ray: list, rays: int, chunk: int) -> tuple[list, int]:
    """Pad the per-ray tensors (B, R, ...) to a multiple of RAY_BLOCK rays by repeating the last ray, and
    round the chunk size up to a multiple of RAY_BLOCK."""
    padded = -(-rays // RAY_BLOCK) * RAY_BLOCK
    index = torch.arange(padded, device=per_ray[0].device).clamp(max=rays - 1)
    per_ray = [x if x is None or isinstance(x, float) else x.index_select(1, index) for x in per_ray]
    return per_ray, min(padded, -(-chunk // RAY_BLOCK) * RAY_BLOCK)


def _fast_query(planes: Tensor, decoder: Callable, box_size: float, plane_axes: str) -> Callable:
    """``_query`` through the texel table and (for a ``TriplaneDecoder``) the hand-written MLP backward."""
    axes = PLANE_AXES[plane_axes]
    table = _plane_table(planes)  # channels-last copy shared by both passes
    height, width = planes.shape[-2:]

    def query(origins: Tensor, directions: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        batch, rays, samples = t.shape
        points = origins.unsqueeze(-2) + t.unsqueeze(-1) * directions.unsqueeze(-2)  # (B, R, K, 3)
        uv = _project(points.view(batch, rays * samples, 3), box_size, axes)  # (B, R*K, 3, 2)
        features = _MeanPlaneFeatures.apply(table, uv.detach(), height, width)  # (B*R*K, C)
        if type(decoder) is TriplaneDecoder:  # exactly the readable module: its MLP with our backward
            out = _DecoderMLP.apply(features, decoder.fc1.weight, decoder.fc1.bias, decoder.fc2.weight,
                                    decoder.fc2.bias)
            raw_sigma, rgb = TriplaneDecoder.split_outputs(out)
        else:
            raw_sigma, rgb = _decoded(decoder, features)  # 2-D, so linear layers run as one addmm
        return raw_sigma.view(batch, rays, samples), rgb.view(batch, rays, samples, -1)

    return query


def _plane_table(planes: Tensor) -> Tensor:
    """(B, 3, C, H, W) -> (B*3*(H+2)*(W+2), C): one contiguous row of C features per texel, with a border
    of zero texels around each plane (grid_sample's zero padding, so that no corner needs a mask)."""
    channels_last = rearrange(planes, "b k c h w -> (b k) h w c")
    return F.pad(channels_last, (0, 0, 1, 1, 1, 1)).view(-1, planes.shape[2])  # backward: a slice, no copy


def _row_blocks(num_rows: int, device: torch.device, cpu_rows_per_block: int) -> list[slice]:
    """Ranges of rows worked through one at a time: cpu_rows_per_block on CPU, all at once elsewhere."""
    step = cpu_rows_per_block if device.type == "cpu" else max(num_rows, 1)
    return [slice(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


def _bilinear_rows(uv: Tensor, first_row: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """The 12 texels (4 corners x 3 planes) behind each point and their weights / 3.

    uv: (n, 3, 2) plane coordinates; first_row: (3,) the table row of texel (0, 0) of each of the
    point's planes. Returns rows (12, n) into the bordered table of ``_plane_table`` and weights (12, n)
    (/ 3: the mean over the planes), corner-major.
    """
    cells, weights = _bilinear_cells(uv, first_row, height, width)
    corner_offsets = torch.tensor([0, 1, width + 2, width + 3], device=uv.device)  # (x, y): 00 10 01 11
    return (cells + corner_offsets.view(4, 1, 1)).view(12, -1), weights


def _bilinear_cells(uv: Tensor, first_row: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """The cell (its lower corner 00, a row of the bordered table) of each point on each plane, and the
    weights / 3 of its 4 corners: cells (3, n), weights (12, n) corner-major (00 10 01 11, then plane).

    A coordinate beyond the plane (or NaN) is moved onto the zero border, where it reads exactly 0, as
    grid_sample's zero padding does.
    """
    size = uv.new_tensor([width, height]).view(2, 1, 1)
    uv = uv.permute(2, 1, 0).contiguous()  # (2 axes, 3, n): the points contiguous in every op below
    x = ((uv + 1) * size - 1) / 2  # align_corners=False: texel centres at integers
    x = torch.minimum(torch.where(x > -1, x, -1.0), size)  # [-1, size]: the border texels -1 and size
    low = torch.minimum(x.floor(), size - 1)  # lower corner in [-1, size - 1]
    fraction = x - low  # in [0, 1]
    low = low.long()  # row arithmetic in int64: exact for any plane size and dtype
    cells = low[0] + low[1] * (width + 2) + first_row.unsqueeze(1)  # (3, n)
    weight_x = torch.stack([1 - fraction[0], fraction[0]])  # (2, 3, n): lower and upper corner
    weight_y = torch.stack([1 - fraction[1], fraction[1]]) / 3
    weights = weight_y.unsqueeze(1) * weight_x  # (2 (y), 2 (x), 3, n)
    return cells, weights.view(12, -1)


def _lookup_blocks(uv: Tensor, height: int, width: int):
    """(batch index, slice of points, first table row (3,) of its planes) for each block of points."""
    plane_rows = (height + 2) * (width + 2)
    for batch_index in range(uv.shape[0]):  # texel (0, 0) sits one row and one column inside the border
        first_row = (torch.arange(3, device=uv.device) + 3 * batch_index) * plane_rows + (width + 2 + 1)
        for block in _row_blocks(uv.shape[1], uv.device, CPU_LOOKUP_ROWS):
            yield batch_index, block, first_row


class _MeanPlaneFeatures(torch.autograd.Function):
    """Features averaged over the 3 planes, (B*M, C): a weighted sum of 12 rows of the bordered table.

    The same numbers as ``sample_triplane(...).mean(1)``, block by block of points of one batch element.
    The forward is one ``embedding_bag`` per block (mode "sum" with per-sample weights), the backward the
    transposed splat (``_scatter_by_cells`` on CPU, an index_add_ of C-wide rows per corner elsewhere);
    nothing but uv (B, M, 3, 2) is kept for it. No gradient to uv.
    """

    @staticmethod
    def forward(ctx, table: Tensor, uv: Tensor, height: int, width: int) -> Tensor:
        features = table.new_empty(uv.shape[0], uv.shape[1], table.shape[1])  # (B, M, C)
        for batch_index, block, first_row in _lookup_blocks(uv, height, width):
            rows, weights = _bilinear_rows(uv[batch_index, block], first_row, height, width)
            features[batch_index, block] = F.embedding_bag(  # one bag of 12 texel rows per point
                rows.t().contiguous(), table, per_sample_weights=weights.t().contiguous(), mode="sum")
        ctx.save_for_backward(uv)
        ctx.sizes = (table.shape[0], height, width)
        return features.view(-1, table.shape[1])  # (B*M, C)

    @staticmethod
    def backward(ctx, grad_features: Tensor):
        (uv,) = ctx.saved_tensors
        num_rows, height, width = ctx.sizes
        grad_features = grad_features.reshape(uv.shape[0], uv.shape[1], -1)
        grad_table = grad_features.new_zeros(num_rows, grad_features.shape[-1])
        if uv.device.type in SORTED_SCATTER_DEVICES:
            _scatter_by_cells(grad_table, grad_features, uv, height, width)
            return grad_table, None, None, None
        for batch_index, block, first_row in _lookup_blocks(uv, height, width):  # atomic adds on GPUs
            rows, weights = _bilinear_rows(uv[batch_index, block], first_row, height, width)  # recomputed
            grad_block = grad_features[batch_index, block]
            for corner in range(12):
                grad_table.index_add_(0, rows[corner], grad_block * weights[corner].unsqueeze(-1))
        return grad_table, None, None, None


def _scatter_by_cells(grad_table: Tensor, grad_features: Tensor, uv: Tensor, height: int, width: int) -> None:
    """The lookup's backward on CPU: grad_table (B*3*(H+2)*(W+2), C) += the bilinear splat of
    grad_features (B, M, C) at uv (B, M, 3, 2), as sparse matrix products over texels sorted once.

    A point's 4 corners on a plane are the texels c, c + 1, c + W+2, c + W+3 of its cell's lower corner
    c. Per block of points the (plane, point) pairs are sorted by c once; then, for each corner k, a CSR
    matrix S_k (cells x points) holding that corner's weights gives S_k @ grad_features, which lands on
    texel c + shift_k. The products run in parallel over cells; a scatter (index_add_) on CPU sorts its
    indices anew in every call and would do that 12 times per block.
    """
    padded_width = width + 2
    batch_rows = grad_table.shape[0] // uv.shape[0]  # the 3 bordered planes of one batch element
    corner_shifts = (0, 1, padded_width, padded_width + 1)  # (x, y) = 00 10 01 11, as in _bilinear_rows
    first_row = torch.arange(3, device=uv.device) * (height + 2) * padded_width + padded_width + 1  # texel (0, 0)
    for batch_index in range(uv.shape[0]):
        grad_batch = grad_table[batch_index * batch_rows:(batch_index + 1) * batch_rows]
        for block in _row_blocks(uv.shape[1], uv.device, CPU_SCATTER_ROWS):
            cells, weights = _bilinear_cells(uv[batch_index, block], first_row, height, width)  # recomputed
            points = cells.shape[1]
            cells = cells.reshape(-1)  # (3 n,): the cell of each (plane, point), plane-major
            index_dtype = torch.int32 if batch_rows < 2**31 and 3 * points < 2**31 else torch.int64
            order = torch.argsort(cells.to(index_dtype), stable=True)  # int32 sorts in half the time; stable:
            cell_counts = torch.bincount(cells, minlength=batch_rows)  # the same sums in the same order
            cell_offsets = torch.cat([cell_counts.new_zeros(1), torch.cumsum(cell_counts, 0)]).to(index_dtype)
            point_of_entry = (order % points).to(index_dtype)  # (MKL's sparse products take int32 as they are)
            corner_weights = weights.view(4, 3 * points)[:, order]  # (4, 3 n) in cell order
            for corner, shift in enumerate(corner_shifts):
                # cell c + shift stays inside its plane, so the last `shift` cells hold no point: S_k has
                # batch_rows - shift rows and adds straight into the texels it lands on
                splat = _csr(cell_offsets[:batch_rows - shift + 1], point_of_entry, corner_weights[corner],
                             (batch_rows - shift, points))
                grad_batch[shift:].addmm_(splat, grad_features[batch_index, block])


def _csr(row_offsets: Tensor, columns: Tensor, entries: Tensor, size: tuple[int, int]) -> Tensor:
    """A sparse CSR matrix; torch's beta-state notice for CSR is silenced here only, for this call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(row_offsets, columns, entries, size=size, check_invariants=False)


class _DecoderMLP(torch.autograd.Function):
    """fc2(softplus(fc1(x))) on (M, C) features, block by block of rows, keeping only x for backward.

    The backward recomputes the hidden layer block by block (one more (M, C) x (C, 64) matmul) and uses
    softplus' = sigmoid, instead of keeping autograd's three (M, hidden)-sized tensors.
    """

    @staticmethod
    def forward(ctx, features: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor) -> Tensor:
        out = features.new_empty(features.shape[0], weight2.shape[0])  # (M, 1 + rgb)
        for rows in _row_blocks(features.shape[0], features.device, CPU_DECODER_ROWS):
            hidden = torch.addmm(bias1, features[rows], weight1.t())  # (rows, hidden)
            torch.addmm(bias2, F.softplus(hidden), weight2.t(), out=out[rows])
        ctx.save_for_backward(features, weight1, bias1, weight2)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        features, weight1, bias1, weight2 = ctx.saved_tensors
        grad_features = torch.empty_like(features) if ctx.needs_input_grad[0] else None
        grad_weight1, grad_bias1 = torch.zeros_like(weight1), torch.zeros_like(bias1)
        grad_weight2 = torch.zeros_like(weight2)
        for rows in _row_blocks(features.shape[0], features.device, CPU_DECODER_ROWS):
            hidden = torch.addmm(bias1, features[rows], weight1.t())  # recomputed
            activation, slope = F.softplus(hidden), hidden.sigmoid_()  # softplus' = sigmoid
            grad_weight2.addmm_(grad_out[rows].t(), activation)
            grad_hidden = (grad_out[rows] @ weight2).mul_(slope)
            if grad_features is not None:  # addmm with beta=0 ignores the (empty) output: faster than mm(out=)
                torch.addmm(grad_features[rows], grad_hidden, weight1, beta=0, out=grad_features[rows])
            grad_weight1.addmm_(grad_hidden.t(), features[rows])
            grad_bias1 += grad_hidden.sum(0)
        return grad_features, grad_weight1, grad_bias1, grad_weight2, grad_out.sum(0)
