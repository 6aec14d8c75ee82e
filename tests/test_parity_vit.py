"""Parity of minimal3d.vit with the official DINOv2 DinoVisionTransformer (golden files in tests/data/vit/).

Every case file ``dinov2_*.npz`` holds a state dict, its config and the official outputs on every input of
``inputs.npz``; every stored output is recomputed and compared at the README's atol = rtol = 1e-5.
Measured max abs error on CPU float32: 0.0 for every array (bit-identical) on both cases.
"""

import json

import numpy as np
import pytest
import torch
from refdata import load_reference, reference_dir

from minimal3d.vit import load_dinov2, vit_base, vit_giant2, vit_large, vit_small

TOL = dict(atol=1e-5, rtol=1e-5)  # README tolerance; measured max error 0.0 (see module docstring)
CASES = sorted(p.name for p in reference_dir("vit").glob("dinov2_*.npz"))
FACTORIES = {384: vit_small, 768: vit_base, 1024: vit_large, 1536: vit_giant2}  # by embed dim


def test_reference_files_found():
    assert CASES, f"no dinov2_*.npz in {reference_dir('vit')}"


def _state_dict(case: dict) -> dict:
    return {k.removeprefix("state_dict/"): v for k, v in case.items() if k.startswith("state_dict/")}


def _model_from_case(case: dict):
    config = json.loads(str(case["config_json"]))
    model = load_dinov2(
        _state_dict(case),
        num_heads=config["num_heads"],
        interpolate_offset=config["interpolate_offset"],
        interpolate_antialias=config["interpolate_antialias"],
    ).eval()
    return model, config


def _outputs(model, images: torch.Tensor, what: set[str]) -> dict[str, torch.Tensor]:
    """Recompute the named outputs the way the README describes them."""
    out = {}
    with torch.no_grad():
        features = model.forward_features(images)
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            out[key] = features[key]
        out["pos_embed_interp"] = model.interpolate_pos_encoding(*images.shape[-2:])
        if {"gil_patch", "gil_cls"} & what:
            pairs = model.get_intermediate_layers(images, n=4, reshape=True, return_class_token=True, norm=True)
            out["gil_patch"] = torch.stack([patch for patch, _ in pairs])
            out["gil_cls"] = torch.stack([cls for _, cls in pairs])
        if "gil_list_nonorm" in what:
            out["gil_list_nonorm"] = torch.stack(model.get_intermediate_layers(images, n=[0, 2], norm=False))
    return out


@pytest.mark.parametrize("case_name", CASES)
def test_outputs_match_official(case_name):
    case = load_reference("vit", case_name)
    inputs = load_reference("vit", "inputs.npz")
    model, config = _model_from_case(case)
    # the hub ties the interpolation flags to the registers; the golden configs follow it
    inferred = load_dinov2(_state_dict(case), num_heads=config["num_heads"])
    assert inferred.interpolate_offset == config["interpolate_offset"]
    assert inferred.interpolate_antialias == config["interpolate_antialias"]
    compared = 0
    for input_name, array in inputs.items():
        stored = {k.split("/", 1)[1]: v for k, v in case.items() if k.startswith(input_name + "/")}
        assert stored, f"{case_name} has no outputs for input {input_name}"
        got = _outputs(model, torch.from_numpy(array), set(stored))
        for what, expected in stored.items():
            assert what in got, f"{case_name}: unknown stored output {input_name}/{what}"
            torch.testing.assert_close(got[what], torch.from_numpy(expected), **TOL, msg=f"{input_name}/{what}")
            compared += 1
    expected_count = sum(1 for k in case if not k.startswith("state_dict/") and k != "config_json")
    assert compared == expected_count


def _official_shapes() -> dict:
    return json.loads((reference_dir("vit") / "official_state_dict_shapes.json").read_text())


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
