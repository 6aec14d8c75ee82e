"""Tests of minimal3d.vit: checkpoint round trip, input validation, get_intermediate_layers semantics,
float64 gradcheck and a naive attention reference. Parity with the official code: test_parity_vit.py."""

import math

import pytest
import torch
from torch.func import functional_call

from minimal3d.vit import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DinoVisionTransformer,
    ViTConfig,
    build_backbone,
    load_dinov2,
    normalize_image,
    save_dinov2,
    vit_tiny,
)


def tiny_model(registers: int = 0, dtype=torch.float32, **overrides) -> DinoVisionTransformer:
    """D=8, 2 heads, patch 2, 4x4 base grid: a few tokens, fast in float64."""
    torch.manual_seed(0)
    config = ViTConfig(
        embed_dim=8,
        depth=2,
        num_heads=2,
        patch_size=2,
        img_size=8,
        num_register_tokens=registers,
        interpolate_offset=0.0 if registers else 0.1,
        interpolate_antialias=bool(registers),
    )
    model = DinoVisionTransformer(config, **overrides).to(dtype).eval()
    with torch.no_grad():  # random values everywhere so every convention shows in the output
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.5 + (1.0 if param.ndim == 1 and param.numel() == 8 else 0.0))
    return model


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("registers", [0, 4])
def test_save_load_round_trip(tmp_path, registers):
    model = vit_tiny(num_register_tokens=registers, depth=2).eval()
    path = tmp_path / "backbone.pth"
    save_dinov2(model, path)
    saved = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in saved.values())
    loaded = load_dinov2(path).eval()
    assert loaded.config == model.config  # heads = D / 64 and the flags tied to registers
    assert loaded.interpolate_offset == (0.0 if registers else 0.1)
    assert loaded.interpolate_antialias == bool(registers)
    images = torch.randn(1, 3, 56, 70)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)


def test_load_reports_missing_unexpected_and_shape_mismatch():
    state_dict = vit_tiny(depth=2).state_dict()
    broken = dict(state_dict)
    del broken["mask_token"]
    broken["head.weight"] = torch.zeros(3)
    broken["blocks.1.attn.proj.bias"] = torch.zeros(7)
    with pytest.raises(ValueError) as error:
        load_dinov2(broken)
    message = str(error.value)
    assert "mask_token" in message and "head.weight" in message and "blocks.1.attn.proj.bias" in message


def test_load_needs_heads_when_not_inferable():
    state_dict = tiny_model().state_dict()  # D = 8, not a multiple of 64
    with pytest.raises(ValueError, match="num_heads"):
        load_dinov2(state_dict)
    model = load_dinov2(state_dict, num_heads=2)
    torch.testing.assert_close(model.pos_embed, state_dict["pos_embed"], rtol=0, atol=0)


def test_swiglu_keys_and_function():
    torch.manual_seed(0)
    model = DinoVisionTransformer(ViTConfig(embed_dim=24, depth=1, num_heads=2, ffn_layer="swiglu", img_size=28))
    keys = model.state_dict().keys()
    assert "blocks.0.mlp.w12.weight" in keys and "blocks.0.mlp.w3.weight" in keys
    assert model.blocks[0].mlp.w3.weight.shape == (24, (int(24 * 4 * 2 / 3) + 7) // 8 * 8)  # (24, 64)
    mlp = model.blocks[0].mlp
    x = torch.randn(2, 5, 24)
    hidden = mlp.w3.in_features
    a = x @ mlp.w12.weight[:hidden].T + mlp.w12.bias[:hidden]
    b = x @ mlp.w12.weight[hidden:].T + mlp.w12.bias[hidden:]
    expected = (a / (1 + torch.exp(-a)) * b) @ mlp.w3.weight.T + mlp.w3.bias
    torch.testing.assert_close(mlp(x), expected)
    assert load_dinov2(model.state_dict(), num_heads=2).config.ffn_layer == "swiglu"


def test_build_backbone():
    assert build_backbone(arch="vit_tiny").config.embed_dim == 192
    weights = vit_tiny(depth=1).state_dict()
    model = build_backbone(weights)
    torch.testing.assert_close(model.cls_token, weights["cls_token"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="arch"):
        build_backbone(arch="vit_huge")


def test_random_init_follows_official():
    model = vit_tiny(depth=1)
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.cls_token.abs().max().item() < 1e-4
    assert torch.all(model.mask_token == 0)
    assert torch.all(model.blocks[0].ls1.gamma == 1.0)
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert model.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)


# ---------------------------------------------------------------- inputs


def test_bad_inputs_raise():
    model = tiny_model()
    for bad in (torch.randn(3, 8, 8), torch.randn(1, 4, 8, 8)):
        with pytest.raises(ValueError, match=r"x must be images of shape \(B, 3, H, W\)"):
            model(bad)
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        model(torch.randn(1, 3, 8, 7))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="masks"):
        model.forward_features(torch.randn(1, 3, 8, 8), masks=torch.ones(1, 3, dtype=torch.bool))


def test_normalize_image():
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(2, 3, 4, 5)
    torch.testing.assert_close(normalize_image(mean), torch.zeros(2, 3, 4, 5))
    white = normalize_image(torch.ones(1, 3, 2, 2))
    torch.testing.assert_close(white[0, :, 0, 0], (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))
    with pytest.raises(ValueError, match="images"):
        normalize_image(torch.rand(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        normalize_image(torch.rand(1, 3, 4, 4) * 255)
    with pytest.raises(TypeError, match="images"):
        normalize_image(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    scaled = torch.rand(1, 3, 4, 4) * 255  # check=False skips only the value range (no host sync): same formula
    torch.testing.assert_close(normalize_image(scaled, check=False),
                               (scaled - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1))


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("registers", [0, 3])
def test_get_intermediate_layers_semantics(registers):
    model = tiny_model(registers, depth=3)
    images = torch.randn(2, 3, 6, 10)  # h=3, w=5: non-square
    with torch.no_grad():
        features = model.forward_features(images)
        last_two = model.get_intermediate_layers(images, n=2)
        listed = model.get_intermediate_layers(images, n=[2, 1])  # any order -> block order
        pairs = model.get_intermediate_layers(images, n=1, reshape=True, return_class_token=True)
        raw = model.get_intermediate_layers(images, n=[2], norm=False)
    assert len(last_two) == 2 and len(listed) == 2
    for a, b in zip(last_two, listed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the last block, normed, is forward_features' patch tokens (registers dropped)
    torch.testing.assert_close(last_two[1], features["x_norm_patchtokens"], rtol=0, atol=0)
    assert last_two[1].shape == (2, 15, 8)
    patch, cls = pairs[0]
    assert patch.shape == (2, 8, 3, 5)
    torch.testing.assert_close(patch[:, :, 1, 4], features["x_norm_patchtokens"][:, 1 * 5 + 4], rtol=0, atol=0)
    torch.testing.assert_close(cls, features["x_norm_clstoken"], rtol=0, atol=0)
    torch.testing.assert_close(raw[0], features["x_prenorm"][:, 1 + registers :], rtol=0, atol=0)
    assert features["x_norm_regtokens"].shape == (2, registers, 8)
    torch.testing.assert_close(model(images), features["x_norm_clstoken"], rtol=0, atol=0)
    for bad in (4, 0, [3], [-1], [1, 1], []):
        with pytest.raises(ValueError, match="n must"):
            model.get_intermediate_layers(images, n=bad)


def test_masks_replace_patch_tokens_by_mask_token():
    model = tiny_model()
    images = torch.randn(1, 3, 8, 8)
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, 5] = True
    tokens = model.prepare_tokens(images, masks)
    position = model.interpolate_pos_encoding(8, 8)
    torch.testing.assert_close(tokens[0, 1 + 5], model.mask_token[0] + position[0, 1 + 5])
    unmasked = model.prepare_tokens(images)
    torch.testing.assert_close(tokens[0, 1 + 4], unmasked[0, 1 + 4], rtol=0, atol=0)


def test_pos_embed_identity_only_for_square_base_size():
    model = tiny_model()  # base grid 4x4 (img_size 8), offset 0.1
    torch.testing.assert_close(model.interpolate_pos_encoding(8, 8), model.pos_embed, rtol=0, atol=0)
    resized = model.interpolate_pos_encoding(6, 10)
    assert resized.shape == (1, 1 + 3 * 5, 8)
    torch.testing.assert_close(resized[:, 0], model.pos_embed[:, 0], rtol=0, atol=0)  # cls entry kept


# ---------------------------------------------------------------- naive references and gradients


def naive_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """Multi-head attention with explicit loops over batch, heads, queries and keys."""
    batch, tokens, dim = x.shape
    heads = attn.num_heads
    head_dim = dim // heads
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias  # (B, N, 3D) = [q | k | v]
    out = torch.zeros(batch, tokens, dim, dtype=x.dtype)
    for b in range(batch):
        for h in range(heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            q = qkv[b, :, :dim][:, cols]
            k = qkv[b, :, dim : 2 * dim][:, cols]
            v = qkv[b, :, 2 * dim :][:, cols]
            for i in range(tokens):
                scores = [sum(q[i, d] * k[j, d] for d in range(head_dim)) / math.sqrt(head_dim) for j in range(tokens)]
                top = max(scores)
                weights = [torch.exp(s - top) for s in scores]
                total = sum(weights)
                out[b, i, cols] = sum(weights[j] / total * v[j] for j in range(tokens))
    return out @ attn.proj.weight.T + attn.proj.bias


def test_attention_matches_naive_loops():
    model = tiny_model(dtype=torch.float64)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    attn = model.blocks[0].attn
    with torch.no_grad():
        torch.testing.assert_close(attn(x), naive_attention(attn, x))


def naive_block(block, x: torch.Tensor) -> torch.Tensor:
    """Pre-norm block written out: LayerNorm eps 1e-6, exact GELU, LayerScale."""

    def layer_norm(t, norm):
        mean = t.mean(-1, keepdim=True)
        var = ((t - mean) ** 2).mean(-1, keepdim=True)
        return (t - mean) / torch.sqrt(var + 1e-6) * norm.weight + norm.bias

    x = x + block.ls1.gamma * naive_attention(block.attn, layer_norm(x, block.norm1))
    hidden = layer_norm(x, block.norm2) @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return x + block.ls2.gamma * (hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias)


def test_block_matches_naive():
    model = tiny_model(dtype=torch.float64)
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[1](x), naive_block(model.blocks[1], x))


@pytest.mark.parametrize(
    "registers, fast_mode", [(0, True), (2, True), pytest.param(0, False, marks=pytest.mark.slow),
                             pytest.param(2, False, marks=pytest.mark.slow)])
def test_gradcheck_float64(registers, fast_mode):
    """Gradients w.r.t. images, pos_embed (through the bicubic resize) and a qkv weight. fast_mode compares
    a random projection u^T J v of the analytic and numerical Jacobians (10x cheaper); the slow variant
    compares every entry."""
    model = tiny_model(registers, dtype=torch.float64, depth=1)
    params = dict(model.named_parameters())
    images = torch.randn(1, 3, 6, 4, dtype=torch.float64, requires_grad=True)  # grid 3x2: resized
    pos_embed = params["pos_embed"].detach().clone().requires_grad_(True)
    qkv = params["blocks.0.attn.qkv.weight"].detach().clone().requires_grad_(True)

    def run(images, pos_embed, qkv):
        values = {**params, "pos_embed": pos_embed, "blocks.0.attn.qkv.weight": qkv}
        features = functional_call(model, values, (images,), {}, strict=True)
        return features

    assert torch.autograd.gradcheck(run, (images, pos_embed, qkv), eps=1e-6, atol=1e-6, fast_mode=fast_mode)


@pytest.mark.slow
def test_torch_compile_gives_same_numbers():
    model = tiny_model(4)
    images = torch.randn(2, 3, 6, 10)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), atol=1e-5, rtol=1e-5)


def test_load_dinov2_bad_files_say_not_a_valid_checkpoint(tmp_path):
    good = tmp_path / "good.pth"
    save_dinov2(vit_tiny(depth=1), good)
    empty, truncated, corrupt, listed = (tmp_path / n for n in ("empty.pth", "truncated.pth", "corrupt.pth", "list.pth"))
    empty.write_bytes(b"")
    truncated.write_bytes(good.read_bytes()[:200])
    corrupt.write_bytes(b"\x00 not a zip archive " * 10)
    torch.save([torch.zeros(1)], listed)
    for path, reason in [(tmp_path / "missing.pth", "no such file"), (empty, "empty"), (truncated, "("),
                         (corrupt, "("), (listed, "flat dict")]:
        with pytest.raises(ValueError, match="not a valid checkpoint") as info:
            load_dinov2(path)
        assert str(path) in str(info.value) and reason in str(info.value)
        assert "weights_only" not in str(info.value)


def test_load_dinov2_names_missing_keys_without_key_error():
    state_dict = vit_tiny(depth=1).state_dict()
    for key in ("cls_token", "blocks.0.mlp.fc1.weight", "pos_embed"):
        broken = {k: v for k, v in state_dict.items() if k != key}
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            load_dinov2(broken)
    with pytest.raises(ValueError, match="blocks"):
        load_dinov2({**state_dict, "blocks.x.norm1.weight": torch.zeros(1)})
