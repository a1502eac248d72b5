"""Execute every tutorial notebook in ``notebooks/`` and check that it runs and draws figures."""

from __future__ import annotations

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _n_images(nb) -> int:
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if any(key.startswith("image/") for key in out.get("data", {}))
    )


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    shared = NOTEBOOK_DIR.parent.parent / "shared" / "data"
    if nb.metadata.get("blase_specutils", {}).get("needs_shared_data") and not shared.exists():
        pytest.skip(f"{path.name} needs {shared} (the project's shared data folder is not next to this checkout)")
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    assert _n_images(nb) >= 1, f"{path.name} produced no figures"
