"""Parity of minimal3d.vit with the official DINOv2 DinoVisionTransformer (golden files in tests/data/vit/).

Every case file ``dinov2_*.npz`` holds a state dict, its config and the official outputs on the inputs of
``inputs.npz``. Everything is taken from the files: the model (sizes, depth, heads, registers, patch and
grid size from the state dict and ``config_json``), the images, and how many blocks
``get_intermediate_layers`` returns (the stored layer count). Each stored output, and only those, is
recomputed and compared at the reference README's atol = rtol = 1e-5; a stored output this test does not
know fails. What is compared, the measured errors and the conventions: tests/data/vit/README.md.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from refdata import load_reference, reference_dir

from minimal3d.vit import config_from_state_dict, load_dinov2, vit_base, vit_giant2, vit_large, vit_small

TOL = dict(atol=1e-5, rtol=1e-5)  # the reference README's tolerance; never loosen it
GIL_LIST_BLOCKS = [0, 2]  # ``gil_list_nonorm`` = get_intermediate_layers(x, n=[0, 2], norm=False), per the README
FACTORIES = {384: vit_small, 768: vit_base, 1024: vit_large, 1536: vit_giant2}  # by embed dim
CONFIG_FIELDS = ("embed_dim", "depth", "num_register_tokens", "patch_size", "img_size", "mlp_ratio")


def case_names() -> list[str]:
    return sorted(p.name for p in reference_dir("vit").glob("dinov2_*.npz"))


def test_reference_files_found():
    assert case_names(), f"no dinov2_*.npz in {reference_dir('vit')}"


def _state_dict(case: dict) -> dict:
    return {k.removeprefix("state_dict/"): v for k, v in case.items() if k.startswith("state_dict/")}


def _model_from_case(case: dict):
    """The model the case describes: shapes from its state dict, heads and interpolation flags from config_json."""
    config = json.loads(str(case["config_json"]))
    state_dict = _state_dict(case)
    overrides = {"num_heads": config["num_heads"], "interpolate_offset": config["interpolate_offset"],
                 "interpolate_antialias": config["interpolate_antialias"]}
    inferred = config_from_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, **overrides)
    for field in CONFIG_FIELDS:  # what the weights tell must agree with what config_json says
        if field in config:
            assert getattr(inferred, field) == config[field], f"{field}: weights say {getattr(inferred, field)}"
    return load_dinov2(state_dict, **overrides).eval(), config


def _outputs(model, images: torch.Tensor, stored: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Recompute the stored outputs of one input the way the README defines them (nothing else)."""
    out = {}
    with torch.no_grad():
        if {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"} & set(stored):
            features = model.forward_features(images)
            out.update({k: features[k] for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens",
                                                 "x_prenorm")})
        if "pos_embed_interp" in stored:
            out["pos_embed_interp"] = model.interpolate_pos_encoding(*images.shape[-2:])
        if {"gil_patch", "gil_cls"} & set(stored):
            counts = {len(stored[k]) for k in ("gil_patch", "gil_cls") if k in stored}
            assert len(counts) == 1, f"gil_patch and gil_cls store different layer counts {counts}"
            pairs = model.get_intermediate_layers(images, n=counts.pop(), reshape=True, return_class_token=True,
                                                  norm=True)
            out["gil_patch"] = torch.stack([patch for patch, _ in pairs])
            out["gil_cls"] = torch.stack([cls for _, cls in pairs])
        if "gil_list_nonorm" in stored:
            out["gil_list_nonorm"] = torch.stack(model.get_intermediate_layers(images, n=GIL_LIST_BLOCKS, norm=False))
    return out


def compare_case(case_name: str, only_input: str | None = None) -> dict[str, float]:
    """Compare every stored output of ``case_name`` (of one input if given); max abs error per output."""
    case = load_reference("vit", case_name)
    inputs = load_reference("vit", "inputs.npz")
    model, _ = _model_from_case(case)
    errors, outputs = {}, [k for k in case if not k.startswith("state_dict/") and k != "config_json"]
    for input_name, array in inputs.items():
        if only_input is not None and input_name != only_input:
            continue
        stored = {k.split("/", 1)[1]: case[k] for k in outputs if k.startswith(input_name + "/")}
        got = _outputs(model, torch.from_numpy(array), stored)
        for what, expected in stored.items():
            assert what in got, f"{case_name}: unknown stored output {input_name}/{what}"
            expected = torch.from_numpy(expected)
            torch.testing.assert_close(got[what], expected, **TOL, msg=lambda m: f"{input_name}/{what}: {m}")
            errors[f"{input_name}/{what}"] = (got[what] - expected).abs().max().item() if expected.numel() else 0.0
    unread = {k.split("/", 1)[0] for k in outputs} - set(inputs)
    assert not unread, f"{case_name} stores outputs for inputs missing from inputs.npz: {sorted(unread)}"
    if only_input is None:
        assert len(errors) == len(outputs)
    return errors


@pytest.mark.parametrize("case_name", case_names())
def test_outputs_match_official(case_name):
    assert compare_case(case_name)


def _official_shapes() -> dict:
    path = reference_dir("vit") / "official_state_dict_shapes.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@pytest.mark.parametrize("name", sorted(_official_shapes()))
def test_state_dict_layout_matches_official(name):
    official = _official_shapes()[name]
    dim = official["cls_token"][-1]
    registers = official["register_tokens"][1] if "register_tokens" in official else 0
    with torch.device("meta"):  # keys and shapes only, no memory
        model = FACTORIES[dim](num_register_tokens=registers)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(official)  # same keys in the same order
    assert ours == official


# ---------------------------------------------------------------- the test itself, on other golden sets


def _other_golden_set(tmp_path, monkeypatch, name: str, case: dict) -> None:
    """A golden folder holding the inputs and one case ``name``, made the one ``refdata`` reads."""
    target = tmp_path / "vit"
    target.mkdir()
    shutil.copyfile(reference_dir("vit") / "inputs.npz", target / "inputs.npz")
    np.savez(target / name, **case)
    monkeypatch.setenv("MINIMAL3D_REFERENCE_DIR", str(tmp_path))


PERTURBED = [("dinov2_tiny_noreg.npz", "img98x126/gil_cls", (3, 1, 5)),  # the last of the stored layers
             ("dinov2_tiny_reg4.npz", "img98x126/x_norm_regtokens", (1, 3, 0))]


@pytest.mark.parametrize("case_name, key, index", PERTURBED, ids=[f"{c[11:-4]}-{k}" for c, k, _ in PERTURBED])
def test_fails_on_a_wrong_reference_value(tmp_path, monkeypatch, case_name, key, index):
    if not (reference_dir("vit") / case_name).is_file():
        pytest.skip(f"{case_name} is not in this golden set")
    case = load_reference("vit", case_name)
    case[key][index] += 1e-4  # ten times the tolerance, on one value
    _other_golden_set(tmp_path, monkeypatch, case_name, case)
    with pytest.raises(AssertionError, match=key.split("/")[1]):
        compare_case(case_name, only_input=key.split("/")[0])


def test_depth3_golden_set_runs(tmp_path, monkeypatch):
    """A set whose model has depth 3: the reg4 model without its last block, with the official outputs that
    block does not change (the first three of the stored intermediate layers, blocks 0 and 2 un-normed, the
    position embeddings) and without those it changes. n for get_intermediate_layers comes from the file."""
    case = load_reference("vit", "dinov2_tiny_reg4.npz")
    config = json.loads(str(case["config_json"]))
    derived = {"config_json": np.array(json.dumps({**config, "depth": 3}))}
    for key, value in case.items():
        if key.startswith("state_dict/blocks.3."):
            continue
        if key.endswith(("/gil_patch", "/gil_cls")):
            derived[key] = value[:3]  # last 4 of 4 blocks = blocks 0..3 -> last 3 of 3 = blocks 0..2
        elif key.startswith("state_dict/") or key.endswith(("/gil_list_nonorm", "/pos_embed_interp")):
            derived[key] = value
    _other_golden_set(tmp_path, monkeypatch, "dinov2_tiny_reg4_depth3.npz", derived)
    assert case_names() == ["dinov2_tiny_reg4_depth3.npz"]
    errors = compare_case("dinov2_tiny_reg4_depth3.npz")
    assert {"img224/gil_cls", "img98x126/gil_list_nonorm"} <= set(errors)
