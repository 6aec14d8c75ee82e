"""Where the parity tests find their golden files.

Golden outputs of the official implementations live in ``tests/data/<area>/`` (copied from
``shared/reference/<area>/``). When ``MINIMAL3D_REFERENCE_DIR`` is set, ``$MINIMAL3D_REFERENCE_DIR/<area>/``
is read instead, so other golden sets with the same file names and keys run through the same tests.
Parity tests read their cases (names, sizes, options) from these files, never from constants.
"""

import os
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).parent / "data"


def reference_dir(area: str) -> Path:
    """Folder holding the golden files of ``area`` (vit, triplane, splatting, pri3d, compnet)."""
    root = os.environ.get("MINIMAL3D_REFERENCE_DIR")
    return Path(root) / area if root else DATA_DIR / area


def load_reference(area: str, name: str) -> dict:
    """All arrays of ``<area>/<name>`` as a plain dict of numpy arrays."""
    with np.load(reference_dir(area) / name, allow_pickle=False) as z:
        return {key: z[key] for key in z.files}
