"""The Colab quickstart notebook runs top to bottom (tiny settings, CPU)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "colab" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("CURRICULAX_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("CURRICULAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("XLA_FLAGS", "")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "'step': 6" in outputs
    assert "reference:" in outputs
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2
    assert (tmp_path / "run" / "metrics.jsonl").exists()
