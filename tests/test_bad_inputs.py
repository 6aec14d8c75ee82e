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
