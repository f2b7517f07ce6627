#!/usr/bin/env python
"""Re-execute the notebooks in place (committed with outputs) and export them to HTML.

    python scripts/render_notebooks.py                    # every notebooks/*.ipynb
    python scripts/render_notebooks.py notebooks/01_explore.ipynb -p block="(0, 3)"
    python scripts/render_notebooks.py --no-html --cache-dir ~/.cache/drift

Each notebook starts with a cell tagged ``parameters`` (papermill's convention). ``-p
name=value`` overrides one of them: a cell tagged ``injected-parameters`` is inserted after
it, as papermill does. Only names the parameters cell defines can be overridden.

What is committed must render on GitHub and nbviewer, which do not run widgets:

* widget state is not stored (``metadata.widgets`` removed), and each widget output keeps
  only its plain-text fallback; the drift Explorer's says what it showed;
* progress-bar outputs (tqdm widgets and text bars) are dropped;
* figures are static PNGs (matplotlib's inline backend), execution timings are not recorded.

Analyses go through the drift cache. By default a fresh, temporary cache folder is used, so
the committed numbers are those of the current code; ``--cache-dir`` reuses a folder.

The same functions execute the notebooks in ``tests/test_notebooks.py`` (one list: the glob).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
HTML_DIR = ROOT / "build" / "notebooks"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
EXPLORER_FALLBACK = "[drift Explorer"
PROGRESS = re.compile(r"\d+%\|.*\|")


def notebooks(folder: Path = NOTEBOOKS) -> list[Path]:
    """Every notebook, in name order: the single list that CI and rendering use."""
    return sorted(folder.glob("*.ipynb"))


# --------------------------------------------------------------------------- parameters

def parameters_cell(nb: nbformat.NotebookNode) -> int:
    """Index of the cell tagged ``parameters``.

    Raises:
        ValueError: no such cell, or it is not the first code cell.
    """
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    tagged = [i for i in code if "parameters" in c_tags(nb.cells[i])]
    if not tagged:
        raise ValueError("no code cell tagged 'parameters'")
    if tagged[0] != code[0]:
        raise ValueError("the 'parameters' cell must be the first code cell")
    return tagged[0]


def c_tags(cell: nbformat.NotebookNode) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def parameter_names(nb: nbformat.NotebookNode) -> list[str]:
    """Names assigned in the parameters cell."""
    src = nb.cells[parameters_cell(nb)].source
    return [t.id for node in ast.parse(src).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)]


def inject_parameters(nb: nbformat.NotebookNode, params: dict[str, Any]) -> nbformat.NotebookNode:
    """Insert (or replace) an ``injected-parameters`` cell after the parameters cell.

    Raises:
        ValueError: a name the parameters cell does not define.
    """
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c_tags(c)]
    if not params:
        return nb
    known = parameter_names(nb)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; the notebook defines {known}")
    src = "# Parameters injected by scripts/render_notebooks.py\n" + "".join(
        f"{k} = {v!r}\n" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(parameters_cell(nb) + 1, cell)
    return nb


# --------------------------------------------------------------------------- execute

def execute(path: Path, parameters: dict[str, Any] | None = None, timeout: int = 1200,
            env: dict[str, str] | None = None) -> nbformat.NotebookNode:
    """Run ``path`` top to bottom in a fresh ``python3`` kernel, in the notebook's folder;
    return the executed notebook (``path`` is not written).

    Raises:
        nbclient.exceptions.CellExecutionError: a cell failed (the message has its traceback).
    """
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    inject_parameters(nb, parameters or {})
    saved = dict(os.environ)
    os.environ.update(env or {})  # the kernel inherits this process's environment
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return nb


def clean_for_github(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop widget state and progress bars; keep widgets' plain-text fallback (see module doc)."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and out.name == "stderr" and PROGRESS.search(out.text):
                continue
            data = out.get("data", {})
            if WIDGET_MIME in data:
                text = str(data.get("text/plain", ""))
                if not text.startswith(EXPLORER_FALLBACK):
                    continue  # a progress bar or a bare control: nothing to show without a kernel
                data.pop(WIDGET_MIME)
            kept.append(out)
        cell.outputs = kept
    return nb


def export_html(nb: nbformat.NotebookNode, target: Path) -> Path:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(body)
    return target


def render(path: Path, parameters: dict[str, Any] | None = None, html_dir: Path | None = HTML_DIR,
           env: dict[str, str] | None = None, timeout: int = 1200) -> nbformat.NotebookNode:
    """Execute, clean and write ``path`` in place; export HTML to ``html_dir`` (None: skip)."""
    nb = clean_for_github(execute(path, parameters, timeout=timeout, env=env))
    nbformat.validate(nb)
    nbformat.write(nb, path)
    if html_dir is not None:
        export_html(nb, html_dir / (path.stem + ".html"))
    return nb


# --------------------------------------------------------------------------- command line

def _parse_param(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value  # a bare string: -p model=minilm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    ap.add_argument("-p", "--parameter", action="append", type=_parse_param, default=[],
                    metavar="NAME=VALUE", help="override a parameter (Python literal)")
    ap.add_argument("--html-dir", type=Path, default=HTML_DIR, help=f"default: {HTML_DIR}")
    ap.add_argument("--no-html", action="store_true")
    ap.add_argument("--cache-dir", type=Path, help="reuse this drift cache (default: a fresh one)")
    ap.add_argument("--timeout", type=int, default=1200, help="per cell, seconds")
    args = ap.parse_args(argv)
    paths = args.paths or notebooks()
    params = dict(args.parameter)
    with tempfile.TemporaryDirectory(prefix="drift-render-") as tmp:
        env = {"DRIFT_CACHE_DIR": str(args.cache_dir or tmp)}
        for path in paths:
            t0 = time.perf_counter()
            sys.stderr.write(f"{path.name}: executing ...\n")
            render(path, params, None if args.no_html else args.html_dir, env=env, timeout=args.timeout)
            sys.stderr.write(f"{path.name}: written in {time.perf_counter() - t0:.0f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
