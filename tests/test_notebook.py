"""notebooks/sample.ipynb runs headless end to end (nbclient) on the
checkpoints of the quick demo; any cell error fails the test."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests import demo_fixture
from tests import helpers


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return demo_fixture.quick_demo_workdir(tmp_path_factory)


def test_sample_notebook_runs_headless(workdir, monkeypatch):
  monkeypatch.setenv("IMAGEN_STAGES", f"{workdir}/base,{workdir}/sr")
  monkeypatch.setenv("IMAGEN_NUM_STEPS", "3,2")
  path = os.path.join(helpers.ROOT, "notebooks", "sample.ipynb")
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": helpers.ROOT}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  pngs = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(pngs) >= 3  # the grid, the guidance sweep, the super-resolution
