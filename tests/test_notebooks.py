"""The notebooks run top to bottom on the CPU, with their default (small) parameters or the smaller ones below, and are
committed clean."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
# Parameters the test sets after the notebook's own (as papermill injects them): the same code paths at a smaller size.
SMALLER = {
    "own_data": "DEMO_IMAGES = 32\nEPOCHS = 1\nIMAGE_SIZE = 32\nWORKERS = 0",
    "ablation": 'ASSIGNMENTS = "top"',
}


def test_the_four_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == ["ablation", "montage_gallery", "own_data", "transfer_analysis"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    code = [cell for cell in book.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert any("parameters" in cell.metadata.get("tags", []) for cell in code)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    book = nbformat.read(path, as_version=4)
    if path.stem in SMALLER:
        index = next(i for i, cell in enumerate(book.cells) if "parameters" in cell.metadata.get("tags", []))
        book.cells.insert(index + 1, nbformat.v4.new_code_cell(SMALLER[path.stem]))
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in book.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "every notebook draws at least one figure"
