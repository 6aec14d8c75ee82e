"""A DINOv2-compatible Vision Transformer, written from scratch.

Paper: M. Oquab, T. Darcet, T. Moutakanni et al., "DINOv2: Learning Robust Visual Features without
Supervision", 2023, arXiv:2304.07193; registers: T. Darcet, M. Oquab, J. Mairal, P. Bojanowski, "Vision
Transformers Need Registers", 2023, arXiv:2309.16588. Architecture: A. Dosovitskiy et al., "An Image is
Worth 16x16 Words", 2020, arXiv:2010.11929.

Official code followed: facebookresearch/dinov2 (commit b8931f7), ``DinoVisionTransformer`` with the
hub settings of the released backbones (patch 14, img_size 518, LayerScale 1.0, LayerNorm eps 1e-6,
exact GELU, ``block_chunks=0``). ``DinoVisionTransformer`` here computes the same function and has the same
state-dict keys, so the official ``dinov2_vit*14*_pretrain.pth`` files load with ``strict=True`` and
``save_dinov2`` writes files the official code loads.

Token layout: ``[cls, reg_1 .. reg_R, patch_1 .. patch_hw]`` with patches in row-major (h, w) order.
Only cls and patches carry a position embedding.
"""

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ViTConfig:
    """Hyper-parameters of a DINOv2 ViT; defaults are the hub's ViT-S/14."""

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    ffn_layer: str = "mlp"  # "mlp" (fc1, GELU, fc2) or "swiglu" (ViT-g: w12, SiLU gate, w3)
    patch_size: int = 14
    img_size: int = 518  # pos_embed holds a (img_size // patch_size)^2 grid: 37 x 37
    in_chans: int = 3
    num_register_tokens: int = 0
    interpolate_offset: float = 0.1  # hub: 0.1 without registers, 0.0 with registers
    interpolate_antialias: bool = False  # hub: False without registers, True with registers
    layerscale_init: float = 1.0

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "in_chans"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.num_register_tokens, bool) or not isinstance(self.num_register_tokens, int) \
                or self.num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be an integer >= 0, got {self.num_register_tokens!r}")
        if not 0 < self.mlp_ratio < math.inf:
            raise ValueError(f"mlp_ratio must be a finite number > 0, got {self.mlp_ratio}")
        if not 0 <= self.interpolate_offset < 1:
            raise ValueError(f"interpolate_offset must be in [0, 1) (hub: 0.1 or 0.0), got {self.interpolate_offset}")
        if not math.isfinite(self.layerscale_init):
            raise ValueError(f"layerscale_init must be finite, got {self.layerscale_init}")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.ffn_layer not in ("mlp", "swiglu"):
            raise ValueError(f"ffn_layer must be 'mlp' or 'swiglu', got {self.ffn_layer!r}")
        if self.img_size % self.patch_size != 0:
            raise ValueError(f"img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})")


def ffn_hidden_dim(config: ViTConfig) -> int:
    """Hidden width of the feed-forward layer (SwiGLU: the official fused rounding to a multiple of 8)."""
    hidden = int(config.embed_dim * config.mlp_ratio)
    if config.ffn_layer == "swiglu":
        return (int(hidden * 2 / 3) + 7) // 8 * 8  # 1536 * 4 -> 4096 for ViT-g/14
    return hidden


# ----------------------------------------------------------------------------------------------------
# Building blocks (module and parameter names are the official ones)
# ----------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, 3, H, W) -> (B, h*w, D), row-major over (h, w)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


class Attention(nn.Module):
    """Multi-head self-attention: softmax(q k^T / sqrt(hd)) v per head, heads concatenated, projected.

    Written out: ``q, k, v = split(x @ W_qkv^T + b_qkv)``; ``A = softmax(q @ k.T * hd**-0.5, dim=-1)``;
    ``out = concat_heads(A @ v) @ W_proj^T + b_proj``. ``F.scaled_dot_product_attention`` computes exactly
    this (default scale hd^-0.5, no mask) with a fused kernel where one is available.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        # the 3D outputs are [q | k | v], each split into heads contiguously: (B, N, 3, heads, hd)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, hd)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward of ViT-g/14: w3(silu(x1) * x2) with [x1 | x2] = w12(x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """Per-channel residual scaling x * gamma, gamma: (D,) (CaiT, arXiv:2103.17239)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, config.num_heads)
        self.ls1 = LayerScale(dim, config.layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        ffn = SwiGLUFFN if config.ffn_layer == "swiglu" else Mlp
        self.mlp = ffn(dim, ffn_hidden_dim(config))
        self.ls2 = LayerScale(dim, config.layerscale_init)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------------------------------
# Position embedding for any image size
# ----------------------------------------------------------------------------------------------------


def interpolate_pos_embed(
    pos_embed: Tensor, h: int, w: int, offset: float, antialias: bool, same_size_is_identity: bool
) -> Tensor:
    """Resize a (1, 1 + M*M, D) position embedding to an h x w patch grid -> (1, 1 + h*w, D).

    Official semantics (``interpolate_pos_encoding``): the cls entry is kept; the M x M grid is resized by
    bicubic interpolation (``align_corners=False``). With ``offset > 0`` (DINO's kludge, no-register models)
    PyTorch gets ``scale_factor=((h + offset) / M, (w + offset) / M)``: the output is still h x w but the
    sampling step is M / (h + offset), not M / h. With ``offset == 0`` (register models) it gets
    ``size=(h, w)``. ``antialias=True`` switches to the Keys kernel a = -0.5, which changes values even
    when upsampling. ``same_size_is_identity``: the official code returns ``pos_embed`` unchanged when
    h*w == M*M and the image is square (a 518 x 518 input), where a 0.1-offset resize would not be the
    identity.

    The official code resizes in float32; we resize in float32 or the input dtype if wider (float64), which
    is the same in float32 and lets float64 gradcheck see an exact float64 function.
    """
    num_grid = pos_embed.shape[1] - 1
    grid = int(math.sqrt(num_grid))
    if grid * grid != num_grid:
        raise ValueError(f"pos_embed must hold 1 + M*M entries, got {pos_embed.shape[1]}")
    if same_size_is_identity:
        return pos_embed
    compute_dtype = torch.promote_types(pos_embed.dtype, torch.float32)
    cls_pos = pos_embed[:, :1]
    patch_pos = rearrange(pos_embed[:, 1:].to(compute_dtype), "1 (m n) d -> 1 d m n", m=grid, n=grid)
    if offset:
        resize = {"scale_factor": ((h + offset) / grid, (w + offset) / grid)}
    else:
        resize = {"size": (h, w)}
    patch_pos = F.interpolate(patch_pos, mode="bicubic", align_corners=False, antialias=antialias, **resize)
    if patch_pos.shape[-2:] != (h, w):
        raise ValueError(f"position-embedding resize gave {tuple(patch_pos.shape[-2:])}, expected {(h, w)}")
    patch_pos = rearrange(patch_pos, "1 d h w -> 1 (h w) d").to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT backbone (the official ``DinoVisionTransformer`` in eval mode, head = identity).

    State-dict keys: ``cls_token (1,1,D)``, ``pos_embed (1,1+M*M,D)``, ``register_tokens (1,R,D)`` (R > 0
    only), ``mask_token (1,D)``, ``patch_embed.proj.*``, ``blocks.<i>.{norm1, attn.qkv, attn.proj,
    ls1.gamma, norm2, mlp.fc1|w12, mlp.fc2|w3, ls2.gamma}.*``, ``norm.*``.
    """

    def __init__(self, config: ViTConfig | None = None, **overrides):
        super().__init__()
        config = replace(config or ViTConfig(), **overrides)
        self.config = config
        dim = config.embed_dim
        self.embed_dim = dim
        self.patch_size = config.patch_size
        self.num_register_tokens = config.num_register_tokens
        self.interpolate_offset = config.interpolate_offset
        self.interpolate_antialias = config.interpolate_antialias
        grid = config.img_size // config.patch_size

        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, dim)) if config.num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # replaces masked patches in iBOT training
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official init: pos_embed trunc_normal(0.02), cls/register tokens normal(1e-6), Linear weights
        trunc_normal(0.02) with zero bias, mask_token 0, LayerScale ``layerscale_init``; conv and LayerNorm
        keep PyTorch's defaults."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    # -- tokens -------------------------------------------------------------------------------------

    def _check_images(self, x: Tensor) -> None:
        p, c = self.patch_size, self.config.in_chans
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != c:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be images of shape (B, {c}, H, W), got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor (normalised images), got {x.dtype}")
        if x.dtype != self.pos_embed.dtype:
            raise TypeError(f"x must have the model's dtype {self.pos_embed.dtype}, got {x.dtype} (cast x or the model)")
        height, width = x.shape[-2:]
        if height == 0 or width == 0 or height % p or width % p:
            raise ValueError(
                f"x must have H and W that are positive multiples of the patch size {p}, got H={height}, W={width}"
            )

    def interpolate_pos_encoding(self, height: int, width: int) -> Tensor:
        """Position embedding for an image of height x width pixels -> (1, 1 + h*w, D)."""
        for name, size in (("height", height), ("width", width)):
            if isinstance(size, bool) or not isinstance(size, int) or size < self.patch_size:
                raise ValueError(f"{name} must be an integer >= the patch size {self.patch_size}, got {size!r}")
        h, w = height // self.patch_size, width // self.patch_size
        num_grid = self.pos_embed.shape[1] - 1
        return interpolate_pos_embed(
            self.pos_embed,
            h,
            w,
            self.interpolate_offset,
            self.interpolate_antialias,
            same_size_is_identity=(h * w == num_grid and height == width),
        )

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Images (B, 3, H, W) -> tokens (B, 1 + R + h*w, D) in the order [cls, registers, patches]."""
        batch, _, height, width = x.shape
        tokens = self.patch_embed(x)  # (B, h*w, D)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(height, width)
        if self.register_tokens is not None:  # registers go after cls, without a position embedding
            registers = self.register_tokens.expand(batch, -1, -1)
            tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
        return tokens

    # -- public outputs ------------------------------------------------------------------------------

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Tensor | None]:
        """Images x: (B, 3, H, W), H and W multiples of 14 -> dict of
        ``x_norm_clstoken (B, D)``, ``x_norm_regtokens (B, R, D)``, ``x_norm_patchtokens (B, h*w, D)``,
        ``x_prenorm (B, 1+R+h*w, D)`` and ``masks`` (as given: optional (B, h*w) bool, True = use mask_token).
        x must have the model's dtype; NaN in x is data and flows through to the outputs.
        """
        self._check_images(x)
        if masks is not None:
            h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
            if not isinstance(masks, Tensor) or masks.shape != (x.shape[0], h * w) or masks.dtype != torch.bool:
                raise ValueError(f"masks must be a bool tensor of shape (B, h*w) = {(x.shape[0], h * w)}")
        tokens = self.prepare_tokens(x, masks)
        for block in self.blocks:
            tokens = block(tokens)
        normed = self.norm(tokens)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1 : 1 + r],
            "x_norm_patchtokens": normed[:, 1 + r :],
            "x_prenorm": tokens,
            "masks": masks,
        }

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> normalised class token (B, D) (the official eval-mode output)."""
        return self.forward_features(x)["x_norm_clstoken"]

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of selected blocks, official semantics.

        n: an int takes the last n blocks (indices depth-n .. depth-1); a sequence takes those 0-based
        block indices. Outputs come in block order (whatever the order of ``n``). ``norm`` applies the final
        LayerNorm to each. Patch tokens drop cls and registers: (B, h*w, D), or (B, D, h, w) with
        ``reshape``. Returns a tuple of patch tensors, or of ``(patch, cls (B, D))`` pairs with
        ``return_class_token``.
        """
        self._check_images(x)
        depth = len(self.blocks)
        if isinstance(n, bool) or not isinstance(n, (int, Sequence)) or (
            not isinstance(n, int) and not all(isinstance(i, int) and not isinstance(i, bool) for i in n)
        ):
            raise TypeError(f"n must be an int (the last n blocks) or a sequence of int block indices, got {n!r}")
        if isinstance(n, int):
            if not 1 <= n <= depth:
                raise ValueError(f"n must be between 1 and depth={depth} blocks, got {n}")
            take = list(range(depth - n, depth))
        else:
            take = sorted(n)
            if not take or take[0] < 0 or take[-1] >= depth or len(set(take)) != len(take):
                raise ValueError(f"n must list distinct block indices in [0, {depth - 1}], got {list(n)}")
        tokens = self.prepare_tokens(x)
        outputs = []
        for index, block in enumerate(self.blocks[: take[-1] + 1]):  # later blocks are not needed
            tokens = block(tokens)
            if index in take:
                outputs.append(self.norm(tokens) if norm else tokens)
        class_tokens = [out[:, 0] for out in outputs]
        patches = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
            patches = [rearrange(p, "b (h w) d -> b d h w", h=h, w=w).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        return tuple(patches)


# ----------------------------------------------------------------------------------------------------
# Named configurations (the hub's)
# ----------------------------------------------------------------------------------------------------


def _make(num_register_tokens: int, overrides: dict, **arch) -> DinoVisionTransformer:
    # the hub ties the interpolation settings to the registers: R = 0 -> (0.1, False), R > 0 -> (0.0, True)
    tied = {
        "num_register_tokens": num_register_tokens,
        "interpolate_offset": 0.0 if num_register_tokens else 0.1,
        "interpolate_antialias": bool(num_register_tokens),
    }
    return DinoVisionTransformer(ViTConfig(**{**arch, **tied, **overrides}))


def vit_tiny(num_register_tokens: int = 0, **overrides) -> DinoVisionTransformer:
    """Small random-init ViT for quick runs and tests: D=192, depth 6, 3 heads (head dim 64), 3.0M params."""
    return _make(num_register_tokens, overrides, embed_dim=192, depth=6, num_heads=3)


def vit_small(num_register_tokens: int = 0, **overrides) -> DinoVisionTransformer:
    """ViT-S/14 (dinov2_vits14[_reg]): D=384, depth 12, 6 heads."""
    return _make(num_register_tokens, overrides, embed_dim=384, depth=12, num_heads=6)


def vit_base(num_register_tokens: int = 0, **overrides) -> DinoVisionTransformer:
    """ViT-B/14 (dinov2_vitb14[_reg]): D=768, depth 12, 12 heads."""
    return _make(num_register_tokens, overrides, embed_dim=768, depth=12, num_heads=12)


def vit_large(num_register_tokens: int = 0, **overrides) -> DinoVisionTransformer:
    """ViT-L/14 (dinov2_vitl14[_reg]): D=1024, depth 24, 16 heads."""
    return _make(num_register_tokens, overrides, embed_dim=1024, depth=24, num_heads=16)


def vit_giant2(num_register_tokens: int = 0, **overrides) -> DinoVisionTransformer:
    """ViT-g/14 (dinov2_vitg14[_reg]): D=1536, depth 40, 24 heads, SwiGLU feed-forward."""
    return _make(num_register_tokens, overrides, embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglu")


ARCHITECTURES = {
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "vit_base": vit_base,
    "vit_large": vit_large,
    "vit_giant2": vit_giant2,
}


# ----------------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------------


def _load_failure_reason(error: Exception) -> str:
    """Why ``torch.load`` failed, in one line, without torch's advice to retry with weights_only=False."""
    message = str(error)
    if "WeightsUnpickler error:" in message:  # not a zip archive: torch fell back to plain unpickling
        detail = message.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
        return f"corrupt or not written by torch.save: {detail[0][:120] if detail else 'unpickling failed'}"
    lines = [line for line in message.strip().splitlines() if line.strip() and "weights_only" not in line]
    first = lines[0].split(". ")[0] if lines else "unreadable"
    return f"{type(error).__name__}: {first[:160]}"


def read_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A flat state dict (name -> tensor) from a ``torch.save`` file, read with ``weights_only=True``.

    Raises ``ValueError("not a valid checkpoint: PATH (reason)")`` for a missing, empty, truncated or corrupt
    file and for one that does not hold a dict of tensors. (torch's own message for a corrupt file suggests
    ``weights_only=False``, which is wrong and unsafe advice here, so it is replaced.)
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"not a valid checkpoint: {path} (no such file)")
    if path.stat().st_size == 0:
        raise ValueError(f"not a valid checkpoint: {path} (empty file)")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, or not written by torch.save
        raise ValueError(f"not a valid checkpoint: {path} ({_load_failure_reason(error)})") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise ValueError(f"not a valid checkpoint: {path} (expected a flat dict of name -> tensor, "
                         f"got {type(state_dict).__name__})")
    return state_dict


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, Tensor], description: str) -> None:
    """Compare key sets and shapes with ``module``, name every missing / unexpected / mis-shaped key in one
    ``ValueError``, then load with ``strict=True``. ``description`` says what was expected (for the message)."""
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {shape}"
                   for key, shape in expected.items() if key in state_dict and tuple(state_dict[key].shape) != shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(f"state_dict does not match {description}: missing keys {missing}, "
                         f"unexpected keys {unexpected}, shape mismatches {wrong_shape}")
    module.load_state_dict(state_dict, strict=True)


def config_from_state_dict(state_dict: dict[str, Tensor], **overrides) -> ViTConfig:
    """Read a ViTConfig from an official DINOv2 state dict.

    From the weights: D, depth, registers, patch size, base grid, MLP vs SwiGLU (and MLP width).
    Not in the weights: heads (D / 64, as in every released model, unless ``num_heads`` is given) and the
    interpolation flags (tied to registers as the hub does, unless given). A state dict without the keys
    this needs raises ``ValueError`` naming them.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of name -> tensor, got {type(state_dict).__name__}")
    ffn_key = "blocks.0.mlp.w12.weight" if "blocks.0.mlp.w12.weight" in state_dict else "blocks.0.mlp.fc1.weight"
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", ffn_key)
    missing = [key for key in needed if key not in state_dict]
    if missing:
        found = sorted(state_dict)[:8]
        raise ValueError(f"state_dict is not a DINOv2 ViT state dict: missing keys {missing} (has {found}...)")
    shapes = {key: tuple(state_dict[key].shape) for key in needed}
    if len(shapes["cls_token"]) != 3 or len(shapes["pos_embed"]) != 3 or len(shapes["patch_embed.proj.weight"]) != 4:
        raise ValueError(f"state_dict has shapes cls_token {shapes['cls_token']}, pos_embed {shapes['pos_embed']}, "
                         f"patch_embed.proj.weight {shapes['patch_embed.proj.weight']}: not a DINOv2 ViT")
    dim = shapes["cls_token"][-1]
    block_ids = {key.split(".")[1] for key in state_dict if key.startswith("blocks.")}
    if not block_ids or not all(index.isdigit() for index in block_ids):
        raise ValueError(f"state_dict must name its blocks 'blocks.<i>.*' (i = 0, 1, ...), got {sorted(block_ids)[:5]}")
    grid = math.isqrt(max(shapes["pos_embed"][1] - 1, 0))
    patch = shapes["patch_embed.proj.weight"][-1]
    registers = state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0
    swiglu = ffn_key.endswith("w12.weight")
    mlp_ratio = 4.0 if swiglu else shapes[ffn_key][0] / dim
    if "num_heads" not in overrides and dim % 64:
        raise ValueError(f"cannot infer num_heads for embed_dim {dim} (not a multiple of 64): pass num_heads=")
    config = ViTConfig(
        embed_dim=dim,
        depth=max(int(index) for index in block_ids) + 1,
        num_heads=dim // 64 if dim % 64 == 0 else 1,
        mlp_ratio=mlp_ratio,
        ffn_layer="swiglu" if swiglu else "mlp",
        patch_size=patch,
        img_size=grid * patch,
        in_chans=shapes["patch_embed.proj.weight"][1],
        num_register_tokens=registers,
        interpolate_offset=0.0 if registers else 0.1,
        interpolate_antialias=bool(registers),
    )
    return replace(config, **overrides)


def load_dinov2(path_or_state_dict: str | os.PathLike | dict, **overrides) -> DinoVisionTransformer:
    """Build the ViT that an official DINOv2 checkpoint describes and load it strictly.

    path_or_state_dict: a ``.pth`` file (e.g. ``dinov2_vits14_pretrain.pth``) or a dict of tensors /
    arrays with the official keys. overrides: ViTConfig fields the weights do not determine (``num_heads``,
    ``interpolate_offset``, ``interpolate_antialias``). An unreadable file raises ``ValueError("not a valid
    checkpoint: PATH (reason)")``; missing or unexpected keys and shape mismatches raise ``ValueError``
    listing them by name.
    """
    if isinstance(path_or_state_dict, dict):
        state_dict = {}
        for key, value in path_or_state_dict.items():
            try:
                state_dict[key] = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"path_or_state_dict[{key!r}] must be a tensor or an array, "
                                f"got {type(value).__name__}") from None
    elif isinstance(path_or_state_dict, (str, os.PathLike)):
        state_dict = read_state_dict_file(path_or_state_dict)
    else:
        raise TypeError(f"path_or_state_dict must be a path or a dict, got {type(path_or_state_dict).__name__}")
    model = DinoVisionTransformer(config_from_state_dict(state_dict, **overrides))
    load_state_dict_strict(model, state_dict, "the DINOv2 layout")
    return model


def save_dinov2(model: DinoVisionTransformer, path: str | os.PathLike) -> None:
    """Write the model as a flat float32 CPU state dict with the official keys (loads in DINOv2 code)."""
    state_dict = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    torch.save(state_dict, path)


def build_backbone(
    weights: str | os.PathLike | dict | None = None, arch: str = "vit_small", **overrides
) -> DinoVisionTransformer:
    """A DINOv2 checkpoint (config read from the weights; ``arch`` is then ignored) or a random-init model
    of the named architecture (``vit_tiny``, ``vit_small``, ``vit_base``, ``vit_large``, ``vit_giant2``)."""
    if weights is not None:
        return load_dinov2(weights, **overrides)
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    return ARCHITECTURES[arch](**overrides)


def normalize_image(images: Tensor, check: bool = True) -> Tensor:
    """RGB images (..., 3, H, W) in [0, 1] -> ImageNet-normalised (x - mean) / std, as DINOv2 expects.

    ``check=True`` verifies the value range, which costs a host sync on GPUs; training loops that checked
    their data once pass ``check=False``."""
    if not isinstance(images, Tensor) or images.ndim < 3 or images.shape[-3] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must have shape (..., 3, H, W), got {shape}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [0, 1], got {images.dtype} (divide 8-bit images by 255)")
    if check and images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):  # host sync
        raise ValueError("images must be RGB values in [0, 1] (not 0..255 and not already normalised)")
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(3, 1, 1)
    return (images - mean) / std


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ViTConfig",
    "DinoVisionTransformer",
    "interpolate_pos_embed",
    "vit_tiny",
    "vit_small",
    "vit_base",
    "vit_large",
    "vit_giant2",
    "config_from_state_dict",
    "read_state_dict_file",
    "load_state_dict_strict",
    "load_dinov2",
    "save_dinov2",
    "build_backbone",
    "normalize_image",
]
