"""Every module in minimal3d/ copies alone.

A kernel module imports only the standard library, torch, numpy and einops, plus at most ``cameras`` and
one other kernel it builds on (which itself imports at most ``cameras``). ``runtime``, ``probes`` and
``synthetic`` are glue and may import any sibling and tqdm / PIL. The modules are discovered, not listed.

``test_each_module_imports_from_a_copy`` copies each module with the siblings it imports into an empty folder
(a flat ``minimal3d`` package holding only those files) and imports it there in one subprocess, isolated
(``python -I``, cwd = the temp folder, the repository not on the path), with an import hook that refuses any
third-party package other than torch / numpy / einops / tqdm / PIL to the copied files.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "minimal3d"
MODULES = sorted(p.stem for p in PACKAGE_DIR.glob("*.py") if p.stem != "__init__")
GLUE = {"runtime", "probes", "synthetic"}  # shared helpers of the scripts: may import what they need
KERNEL_THIRD_PARTY = {"torch", "numpy", "einops"}
GLUE_THIRD_PARTY = KERNEL_THIRD_PARTY | {"tqdm", "PIL"}


def imports_of(module: str) -> tuple[set[str], set[str]]:
    """(siblings, other top-level packages) that ``minimal3d/<module>.py`` imports, anywhere in the file."""
    tree = ast.parse((PACKAGE_DIR / f"{module}.py").read_text())
    siblings, packages = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "minimal3d":
                    siblings.update(parts[1:2])
                else:
                    packages.add(parts[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level > 0 or node.module == "minimal3d" or (node.module or "").startswith("minimal3d."):
                if node.level > 0 and node.module:  # from .x import y
                    siblings.add(node.module.split(".")[0])
                elif node.module and node.module.startswith("minimal3d."):  # from minimal3d.x import y
                    siblings.add(node.module.split(".")[1])
                else:  # from minimal3d import x / from . import x
                    siblings.update(alias.name for alias in node.names)
            else:
                packages.add(node.module.split(".")[0])
    return siblings - {"__init__"}, packages


def closure(module: str) -> set[str]:
    """``module`` and every sibling it imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += sorted(imports_of(name)[0])
    return seen


def test_modules_found():
    assert {"cameras", "vit", "runtime"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_imports_are_allowed(module):
    siblings, packages = imports_of(module)
    assert siblings <= set(MODULES), f"{module} imports unknown siblings {sorted(siblings - set(MODULES))}"
    third_party = packages - set(sys.stdlib_module_names)
    allowed = GLUE_THIRD_PARTY if module in GLUE else KERNEL_THIRD_PARTY
    assert third_party <= allowed, f"{module} imports {sorted(third_party - allowed)}"
    if module in GLUE:
        return
    assert not siblings & GLUE, f"kernel module {module} imports {sorted(siblings & GLUE)}"
    built_on = siblings - {"cameras"}
    assert len(built_on) <= 1, f"{module} builds on more than one kernel: {sorted(built_on)}"
    for base in built_on:  # the kernel it builds on copies with it: it may bring cameras, nothing else
        assert imports_of(base)[0] <= {"cameras"}, f"{module} builds on {base}, which imports {imports_of(base)[0]}"


CHILD = r"""
import importlib, importlib.abc, json, sys
from pathlib import Path

root = Path(sys.argv[1]).resolve()
allowed = {"torch", "numpy", "einops", "tqdm", "PIL", "minimal3d"}

class Refuse(importlib.abc.MetaPathFinder):
    # refuses third-party packages other than the allowed ones to imports made by the copied files
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in allowed or top in sys.stdlib_module_names:
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
            frame = frame.f_back
        if frame is not None and Path(frame.f_code.co_filename).resolve().is_relative_to(root):
            raise ImportError(f"{frame.f_code.co_filename} imports {name}, which a copied module may not use")
        return None

sys.meta_path.insert(0, Refuse())
results = {}
for folder in sorted(p for p in root.iterdir() if p.is_dir()):
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module("minimal3d." + folder.name)
        where = Path(module.__file__).resolve()
        results[folder.name] = "ok" if where.is_relative_to(folder.resolve()) else f"imported from {where}"
    except Exception as error:
        results[folder.name] = f"{type(error).__name__}: {error}"
    finally:
        sys.path.remove(str(folder))
        for name in [n for n in sys.modules if n == "minimal3d" or n.startswith("minimal3d.")]:
            del sys.modules[name]
print(json.dumps(results))
"""


def test_each_module_imports_from_a_copy(tmp_path):
    for module in MODULES:
        package = tmp_path / module / "minimal3d"  # an empty folder holding a flat package of the copies
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        for name in closure(module):
            (package / f"{name}.py").write_text((PACKAGE_DIR / f"{name}.py").read_text())
    script = tmp_path / "import_copies.py"
    script.write_text(CHILD)
    completed = subprocess.run([sys.executable, "-I", str(script), str(tmp_path)], cwd=tmp_path,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert set(results) == set(MODULES)
    failed = {name: result for name, result in results.items() if result != "ok"}
    assert not failed, failed
