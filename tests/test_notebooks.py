"""Every notebook (notebooks/*.ipynb, one glob) runs top to bottom, is thin, and is committed
in a form GitHub renders.

The notebooks run with a smaller block (``TEST_PARAMETERS``) and one drift cache shared by the
session, so that analyses common to several notebooks are computed once.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("render_notebooks", ROOT / "scripts" / "render_notebooks.py")
render_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_notebooks)

NOTEBOOKS = render_notebooks.notebooks()
TEST_PARAMETERS = {"block": (0, 2)}
"""Overrides for speed, applied where a notebook defines the name."""


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"01_explore.ipynb", "02_gauge_symmetry_primer.ipynb",
                                           "03_shared_operators.ipynb"}


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("drift-cache"))


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_thin_and_parameterised(path):
    nb = nbformat.read(path, as_version=4)
    assert render_notebooks.parameters_cell(nb) >= 0  # the first code cell is tagged 'parameters'
    assert {"model"} <= set(render_notebooks.parameter_names(nb))
    for src in _code(nb):
        tree = ast.parse("\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!"))))
        defs = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not defs, f"{path.name} defines {defs}: library logic belongs in the package"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_renders_on_github(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert "widgets" not in nb.metadata  # GitHub refuses widget metadata without state
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), "commit the notebook executed top to bottom"
    pngs = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert pngs >= 1
    for c in nb.cells:
        for o in c.get("outputs", []):
            assert o.output_type != "error", f"{path.name} was committed with an error output"
            assert render_notebooks.WIDGET_MIME not in o.get("data", {})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, shared_cache):
    nb = nbformat.read(path, as_version=4)
    params = {k: v for k, v in TEST_PARAMETERS.items() if k in render_notebooks.parameter_names(nb)}
    out = render_notebooks.execute(path, params, timeout=600, env={"DRIFT_CACHE_DIR": shared_cache})
    errors = [o for c in out.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any("image/png" in o.get("data", {}) for c in out.cells if c.cell_type == "code" for o in c.outputs)
