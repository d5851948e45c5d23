"""Every notebook under ``notebooks/`` runs top to bottom, and the committed ones show their grids.

Each notebook runs (the tokenizer zoo as a slow test), in a fresh IPython kernel of
this interpreter (``sys.executable``, whatever kernels the machine has installed) on one CPU
device with ``VQGEN_NOTEBOOK_SMALL=1``, which its parameter cell reads to shrink every size to a
few training steps; its working directory is a temporary folder, so the runs it writes
(``runs/...``) vanish with it. Any error in any cell fails the test with
the cell's traceback. The committed notebooks are checked without running them: saved outputs
from a run at the notebook's own settings (not the small ones), no error, and the plotted grids.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebooks run with nbclient (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="the notebooks run with nbclient (pip install -e '.[test]')")
pytest.importorskip("ipykernel", reason="the notebooks run in an IPython kernel (pip install -e '.[test]')")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ("quickstart", "tokenizer_zoo", "sampling", "released_weights")
# At the small settings the quickstart and the released weights take about 40 s each and
# sampling's three models about 2 minutes on 2 cores, in the default suite; the zoo's seven
# tokenizers took 5 minutes in a full run of the suite (its compiles, not its few training steps),
# so it is a slow test (`pytest -m slow`).
RUN = [pytest.param(name, marks=pytest.mark.slow) if name == "tokenizer_zoo" else name for name in NOTEBOOKS]
CELL_TIMEOUT_S = 900


def _kernel_manager(root: Path) -> AsyncKernelManager:
    """A kernel manager whose only kernel is this interpreter's IPython kernel."""
    spec = root / "kernels" / "vqgen-this-python"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(root / "kernels")], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name="vqgen-this-python", kernel_spec_manager=specs)


def _kernel_env() -> dict[str, str]:
    """A user's machine (one CPU device, not the eight the tests simulate) in small settings."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "VQGEN_NOTEBOOK_SMALL": "1",
            "MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}


def _read(name: str):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_four_notebooks_exist():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", RUN)
def test_notebook_runs_top_to_bottom(name, tmp_path):
    nb = _read(name)
    for cell in _code_cells(nb):
        cell.outputs, cell.execution_count = [], None
    work = tmp_path / "work"
    work.mkdir()
    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(work)}}, allow_errors=False)
    client.execute(cleanup_kc=True, env=_kernel_env())  # raises CellExecutionError with the traceback
    params = "".join(o.get("text", "") for o in _code_cells(nb)[1].outputs)
    assert "small settings: True" in params, params  # the parameter cell read VQGEN_NOTEBOOK_SMALL
    images = [o for c in _code_cells(nb) for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{name}.ipynb plotted nothing"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_shows_a_full_run(name):
    """The saved outputs come from one run, top to bottom, at the notebook's own settings."""
    nb = _read(name)
    cells = _code_cells(nb)
    first = cells[0].source
    assert "pip" in first and "install" in first, "the first code cell installs vqgen (Colab)"
    assert "parameters" in cells[1].metadata.get("tags", []), "the second code cell holds the parameters"
    counts = [c.execution_count for c in cells]
    assert counts == list(range(1, len(cells) + 1)), f"{name}.ipynb was not run top to bottom: {counts}"
    params = "".join(o.get("text", "") for o in cells[1].outputs)
    assert "small settings: False" in params, f"{name}.ipynb's outputs come from small settings: {params!r}"
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors[0].get("ename") if errors else None
    images = [o for c in cells for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2, f"{name}.ipynb's saved outputs hold {len(images)} plots"
