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


def _triplane_cases() -> list[Case]:
    import torch.nn.functional as F

    from minimal3d.triplane import (TriplaneDecoder, TriplaneGenerator, composite, project_onto_planes,
                                    ray_box_intersection, render_triplane, sample_importance, sample_pdf,
                                    sample_triplane, stratified_depths)

    planes = torch.zeros(1, 3, 4, 8, 8)
    origins = torch.tensor([0.0, 0.0, -1.5]).expand(1, 5, 3).clone()
    directions = F.normalize(torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(0)) * 0.2
                             + torch.tensor([0.0, 0.0, 1.0]), dim=-1)
    nan, inf = float("nan"), float("inf")

    def render(**overrides):
        args = dict(planes=planes, decoder=TriplaneDecoder(4), origins=origins, directions=directions,
                    near=1.0, far=2.0, num_samples=4, num_importance=3)
        args.update(overrides)
        return lambda: render_triplane(**args)

    def with_value(tensor, index, value):
        tensor = tensor.clone()
        tensor[index] = value
        return tensor

    cases = [
        # shapes, batch sizes, dtypes, devices
        Case("render: 2 planes", render(planes=torch.zeros(1, 2, 4, 8, 8)), ValueError, "planes"),
        Case("render: planes without batch", render(planes=torch.zeros(3, 4, 8, 8)), ValueError, "planes"),
        Case("render: integer planes", render(planes=torch.zeros(1, 3, 4, 8, 8, dtype=torch.long)), TypeError, "planes"),
        Case("render: float16 planes", render(planes=planes.half()), TypeError, "planes"),
        Case("render: planes not a tensor", render(planes=planes.numpy()), TypeError, "planes"),
        Case("render: decoder not callable", render(decoder=3), TypeError, "decoder"),
        Case("render: decoder returns a wrong shape", render(decoder=lambda f: (f, f)), ValueError, "decoder"),
        Case("render: origins (B, R, 2)", render(origins=torch.zeros(1, 5, 2)), ValueError, "origins"),
        Case("render: origins batch != planes batch", render(origins=origins.expand(2, 5, 3)), ValueError, "origins"),
        Case("render: zero rays", render(origins=origins[:, :0], directions=directions[:, :0]), ValueError, "origins"),
        Case("render: directions of another ray count", render(directions=directions[:, :4]), ValueError, "directions"),
        Case("render: float64 directions", render(directions=directions.double()), TypeError, "directions"),
        Case("render: float64 jitter", render(jitter=torch.zeros(1, 5, 4, dtype=torch.float64)), TypeError, "jitter"),
        Case("render: float64 near tensor", render(near=torch.ones(1, 5, 1, dtype=torch.float64)), TypeError, "near"),
        Case("render: far of the wrong shape", render(far=torch.ones(1, 4)), ValueError, "far"),
        Case("render: jitter of the wrong shape", render(jitter=torch.zeros(1, 5, 3)), ValueError, "jitter"),
        Case("render: importance_u of the wrong shape", render(importance_u=torch.zeros(1, 5, 2)), ValueError, "importance_u"),
        # options
        Case("render: box_size inf", render(box_size=inf), ValueError, "box_size"),
        Case("render: box_size < 0", render(box_size=-1.0), ValueError, "box_size"),
        Case("render: box_size tensor", render(box_size=torch.tensor(1.0)), TypeError, "box_size"),
        Case("render: unknown plane_axes", render(plane_axes="xz"), ValueError, "plane_axes"),
        Case("render: num_samples 1", render(num_samples=1), ValueError, "num_samples"),
        Case("render: num_samples float", render(num_samples=4.0), ValueError, "num_samples"),
        Case("render: num_samples 2 with importance", render(num_samples=2), ValueError, "num_samples"),
        Case("render: num_importance < 0", render(num_importance=-1), ValueError, "num_importance"),
        Case("render: chunk_rays 0", render(chunk_rays=0), ValueError, "chunk_rays"),
        Case("render: fast not a bool", render(fast="yes"), TypeError, "fast"),
        Case("render: white_background not a bool", render(white_background=None), TypeError, "white_background"),
        Case("render: fast=True with direction gradients", render(directions=directions.clone().requires_grad_(), fast=True),
             ValueError, "fast"),
        # values: near / far
        Case("render: near > far", render(near=2.0, far=1.0), ValueError, "near"),
        Case("render: near == far", render(near=1.0, far=1.0), ValueError, "near"),
        Case("render: near < 0", render(near=-0.5), ValueError, "near"),
        Case("render: near nan", render(near=nan), ValueError, "near"),
        Case("render: far inf", render(far=inf), ValueError, "far"),
        Case("render: near tensor >= far", render(near=torch.full((1, 5, 1), 3.0)), ValueError, "near"),
        Case("render: near tensor nan", render(near=with_value(torch.ones(1, 5, 1), (0, 2, 0), nan)), ValueError, "near"),
        Case("render: far tensor inf", render(far=with_value(torch.full((1, 5), 2.0), (0, 1), inf)), ValueError, "far"),
        # values: rays, jitter, importance_u
        Case("render: nan origin", render(origins=with_value(origins, (0, 1, 2), nan)), ValueError, "origins"),
        Case("render: inf origin", render(origins=with_value(origins, (0, 1, 0), inf)), ValueError, "origins"),
        Case("render: zero direction", render(directions=with_value(directions, (0, 3), 0.0)), ValueError, "directions"),
        Case("render: non-unit directions", render(directions=directions * 2), ValueError, "directions"),
        Case("render: nan direction", render(directions=with_value(directions, (0, 0, 1), nan)), ValueError, "directions"),
        Case("render: jitter 1", render(jitter=torch.ones(1, 5, 4)), ValueError, "jitter"),
        Case("render: jitter < 0", render(jitter=torch.full((1, 5, 4), -0.1)), ValueError, "jitter"),
        Case("render: jitter nan", render(jitter=torch.full((), nan)), ValueError, "jitter"),
        Case("render: importance_u 1.5", render(importance_u=torch.full((1, 5, 3), 1.5)), ValueError, "importance_u"),
        Case("render: importance_u nan", render(importance_u=with_value(torch.zeros(1, 5, 3), (0, 0, 0), nan)),
             ValueError, "importance_u"),
        # the building blocks
        Case("sample_triplane: 4 planes", lambda: sample_triplane(torch.zeros(1, 4, 2, 3, 3), torch.zeros(1, 5, 3), 1.0),
             ValueError, "planes"),
        Case("sample_triplane: points (B, M, 2)", lambda: sample_triplane(torch.zeros(1, 3, 2, 3, 3), torch.zeros(1, 5, 2), 1.0),
             ValueError, "points"),
        Case("sample_triplane: points batch", lambda: sample_triplane(torch.zeros(1, 3, 2, 3, 3), torch.zeros(2, 5, 3), 1.0),
             ValueError, "points"),
        Case("sample_triplane: float64 points", lambda: sample_triplane(torch.zeros(1, 3, 2, 3, 3), torch.zeros(1, 5, 3).double(), 1.0),
             TypeError, "points"),
        Case("sample_triplane: box_size nan", lambda: sample_triplane(torch.zeros(1, 3, 2, 3, 3), torch.zeros(1, 5, 3), nan),
             ValueError, "box_size"),
        Case("project_onto_planes: plane_axes", lambda: project_onto_planes(torch.zeros(1, 5, 3), 1.0, "eg3"),
             ValueError, "plane_axes"),
        Case("ray_box_intersection: shapes", lambda: ray_box_intersection(torch.zeros(4, 3), torch.zeros(5, 3), 1.0),
             ValueError, "directions"),
        Case("stratified_depths: 0 samples", lambda: stratified_depths(1.0, 2.0, 0, torch.zeros(4)),
             ValueError, "num_samples"),
        Case("composite: one sample", lambda: composite(torch.zeros(1, 3), torch.zeros(1), torch.zeros(1)),
             ValueError, "colors"),
        Case("composite: raw_sigma shape", lambda: composite(torch.zeros(2, 4, 3), torch.zeros(2, 5), torch.zeros(2, 4)),
             ValueError, "raw_sigma"),
        Case("composite: density_shift nan", lambda: composite(torch.zeros(2, 4, 3), torch.zeros(2, 4), torch.zeros(2, 4),
                                                               density_shift=nan), ValueError, "density_shift"),
        Case("composite: float64 t", lambda: composite(torch.zeros(2, 4, 3), torch.zeros(2, 4), torch.zeros(2, 4).double()),
             TypeError, "t"),
        Case("sample_pdf: bins shape", lambda: sample_pdf(torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2, 3)),
             ValueError, "bins"),
        Case("sample_pdf: u batch", lambda: sample_pdf(torch.zeros(2, 6), torch.zeros(2, 5), torch.zeros(3, 3)),
             ValueError, "u"),
        Case("sample_importance: weights shape", lambda: sample_importance(torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2, 3)),
             ValueError, "weights"),
        Case("TriplaneGenerator: tokens width", lambda: TriplaneGenerator(8, 4, 16, 4, 16, 2, 1)(torch.zeros(1, 3, 7)),
             ValueError, "tokens"),
    ]
    return cases


CASES += _triplane_cases()


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

# (cases for this area go here)


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
