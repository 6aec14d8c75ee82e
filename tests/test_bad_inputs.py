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

# (cases for this area go here)


# ===================================================================================================
# vmf_contrast, neural_mesh
# ===================================================================================================


def _compnet_case():
    import torch.nn.functional as F

    from minimal3d.vmf_contrast import VertexMemory

    g = torch.Generator().manual_seed(0)
    memory = VertexMemory([4, 3], dim=4, num_background=2, generator=g)
    features = F.normalize(torch.randn(2, 4, 4, generator=g), dim=-1)
    return dict(vertex_features=features, keypoints=torch.rand(2, 4, 2, generator=g) * 10,
                visible=torch.ones(2, 4), labels=torch.tensor([0, 1]), memory=memory)


def _contrast(**changes):
    from minimal3d.vmf_contrast import grouped_vmf_contrast

    return lambda: grouped_vmf_contrast(**{**_compnet_case(), **changes})


def _memory(**kwargs):
    from minimal3d.vmf_contrast import VertexMemory

    return lambda: VertexMemory(**{**dict(num_vertices=[4, 3], dim=4, num_background=2), **kwargs})


def _update(**changes):
    def call():
        case = {**_compnet_case(), **changes}
        background = changes.get("background_features", torch.randn(2, 1, 4))
        case["memory"].update(case["vertex_features"], case["visible"], case["labels"], background)
    return call


def _pose(**changes):
    from minimal3d.cameras import intrinsics
    from minimal3d.neural_mesh import cuboid_mesh, estimate_pose
    from minimal3d.vmf_contrast import VertexMemory

    def call():
        mesh = cuboid_mesh(torch.tensor([[-1.0, 1.0], [-0.5, 0.5], [-0.4, 0.4]]), 20)
        memory = VertexMemory([mesh.vertices.shape[0]], dim=4, num_background=2)
        args = dict(feature_map=torch.nn.functional.normalize(torch.randn(4, 6, 6), dim=0), meshes=[mesh],
                    memory=memory, K=intrinsics(8.0, 8.0, 3.0, 3.0), steps=1)
        estimate_pose(**{**args, **changes})
    return call


CASES += [
    Case("contrast temperature nan", _contrast(temperature=float("nan")), ValueError, "temperature"),
    Case("contrast temperature 0", _contrast(temperature=0.0), ValueError, "temperature"),
    Case("contrast background_weight nan", _contrast(background_weight=float("nan")), ValueError, "background_weight"),
    Case("contrast background_weight inf", _contrast(background_weight=float("inf")), ValueError, "background_weight"),
    Case("contrast distance_threshold nan", _contrast(distance_threshold=float("nan")), ValueError, "distance_threshold"),
    Case("contrast num_sampled 0", _contrast(num_sampled=0), ValueError, "num_sampled"),
    Case("contrast num_sampled float", _contrast(num_sampled=2.5), ValueError, "num_sampled"),
    Case("contrast form", _contrast(form="single"), ValueError, "form"),
    Case("contrast cross_class_scale", _contrast(cross_class_scale="k"), ValueError, "cross_class_scale"),
    Case("contrast labels out of range", _contrast(labels=torch.tensor([0, 2])), ValueError, "labels"),
    Case("contrast labels negative", _contrast(labels=torch.tensor([-1, 0])), ValueError, "labels"),
    Case("contrast labels float", _contrast(labels=torch.tensor([0.0, 1.0])), ValueError, "labels"),
    Case("contrast labels batch", _contrast(labels=torch.tensor([0])), ValueError, "labels"),
    Case("contrast visible shape", _contrast(visible=torch.ones(2, 3)), ValueError, "visible"),
    Case("contrast keypoints shape", _contrast(keypoints=torch.zeros(2, 4)), ValueError, "keypoints"),
    Case("contrast features dim", _contrast(vertex_features=torch.zeros(2, 4, 3)), ValueError, "vertex_features"),
    Case("contrast features int", _contrast(vertex_features=torch.zeros(2, 4, 4, dtype=torch.long)), TypeError,
         "vertex_features"),
    Case("contrast features not unit", _contrast(vertex_features=torch.ones(2, 4, 4)), ValueError, "vertex_features"),
    Case("contrast features nan visible", _contrast(vertex_features=torch.full((2, 4, 4), float("nan"))), ValueError,
         "vertex_features"),
    Case("contrast too few slots", _contrast(vertex_features=torch.ones(2, 2, 4) / 2, keypoints=torch.zeros(2, 2, 2),
                                             visible=torch.ones(2, 2)), ValueError, "slots"),
    Case("contrast omega shape", _contrast(omega=torch.ones(3, 3)), ValueError, "omega"),
    Case("contrast omega nan", _contrast(omega=torch.full((2, 2), float("nan"))), ValueError, "omega"),
    Case("contrast omega negative", _contrast(omega=-torch.ones(2, 2)), ValueError, "omega"),
    Case("memory nan init", _memory(vertices=torch.full((7, 4), float("nan"))), ValueError, "vertices"),
    Case("memory zero row init", _memory(background=torch.zeros(2, 4)), ValueError, "background"),
    Case("memory init shape", _memory(vertices=torch.ones(6, 4)), ValueError, "vertices"),
    Case("memory momentum nan", _memory(momentum=float("nan")), ValueError, "momentum"),
    Case("memory momentum > 1", _memory(momentum=1.5), ValueError, "momentum"),
    Case("memory no classes", _memory(num_vertices=[]), ValueError, "num_vertices"),
    Case("memory zero vertices", _memory(num_vertices=[4, 0]), ValueError, "num_vertices"),
    Case("memory dim 0", _memory(dim=0), ValueError, "dim"),
    Case("memory num_background 0", _memory(num_background=0), ValueError, "num_background"),
    Case("update labels out of range", _update(labels=torch.tensor([0, 5])), ValueError, "labels"),
    Case("update background shape", _update(background_features=torch.zeros(2, 4)), ValueError, "background_features"),
    Case("update background dim", _update(background_features=torch.zeros(2, 1, 3)), ValueError, "background_features"),
    Case("pose feature_map dim", _pose(feature_map=torch.zeros(3, 6, 6)), ValueError, "feature_map"),
    Case("pose meshes count", _pose(meshes=[]), ValueError, "meshes"),
    Case("pose K shape", _pose(K=torch.eye(2)), ValueError, "K"),
    Case("pose steps negative", _pose(steps=-1), ValueError, "steps"),
    Case("pose lr nan", _pose(lr=float("nan")), ValueError, "lr"),
    Case("pose distance 0", _pose(distance=0.0), ValueError, "distance"),
    Case("pose candidates out of range", _pose(candidates=[3]), ValueError, "candidates"),
    Case("pose top_k 0", _pose(top_k=0), ValueError, "top_k"),
    Case("confusion_weights normalize", lambda: __import__("minimal3d.vmf_contrast", fromlist=["x"]).confusion_weights(
        torch.eye(2), normalize="sum"), ValueError, "normalize"),
    Case("confusion_weights nan", lambda: __import__("minimal3d.vmf_contrast", fromlist=["x"]).confusion_weights(
        torch.full((2, 2), float("nan"))), ValueError, "confusion"),
    Case("imagenet_c kind", lambda: __import__("minimal3d.synthetic", fromlist=["x"]).imagenet_c(
        torch.rand(3, 8, 8), "rain"), ValueError, "corruption"),
    Case("imagenet_c severity", lambda: __import__("minimal3d.synthetic", fromlist=["x"]).imagenet_c(
        torch.rand(3, 8, 8), "fog", 6), ValueError, "severity"),
    Case("paste_occluders fraction", lambda: __import__("minimal3d.synthetic", fromlist=["x"]).paste_occluders(
        torch.rand(3, 8, 8), torch.ones(8, 8, dtype=torch.bool), 1.5, 0.3), ValueError, "object_fraction"),
    Case("paste_occluders mask shape", lambda: __import__("minimal3d.synthetic", fromlist=["x"]).paste_occluders(
        torch.rand(3, 8, 8), torch.ones(4, 8, dtype=torch.bool), 0.1, 0.3), ValueError, "object_mask"),
]


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
