"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel and shows what it claims."""

import ast
import os
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import one_device_optimised_xla_flags, without_shared_compile_cache

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def _execute(notebook: nbformat.NotebookNode) -> None:
    # The kernel starts in the repo root (so it imports the packages, installed or not) and
    # inherits this process's environment: the 8 fake CPU devices of conftest.py.
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails


def _outputs(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [output for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs]


def _printed(text: str, label: str) -> str:
    """The string printed as `label repr(string)` on one line."""
    return ast.literal_eval(re.search(rf"^{re.escape(label)} +(.*)$", text, re.M).group(1))


@pytest.mark.slow
def test_quickstart_trains_resumes_plots_restores_and_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's run dir, cleaned up by pytest
    for name in set(os.environ) - set(without_shared_compile_cache()):
        monkeypatch.delenv(name)  # the run keeps its own cache: its second call loads the step
    # One CPU device, as on a Colab CPU runtime; XLA's usual optimisation: running the 60
    # steps costs more than compiling them.
    monkeypatch.setenv("XLA_FLAGS", one_device_optimised_xla_flags())
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    _execute(notebook)
    outputs = _outputs(notebook)
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")

    assert "1 cpu device(s)" in text
    assert f"run dir {tmp_path}/quickstart-" in text
    assert "first call: steps 0 -> 30" in text
    assert "resumed from checkpoint step 30" in text
    assert "train step loaded as a saved executable" in text
    assert "second call: steps 30 -> 60" in text
    first, last = map(float, re.search(r"loss: step 1 ([\d.]+) -> step 60 ([\d.]+)",
                                       text).groups())
    assert 5.0 < first < 6.5  # about log(258) at initialisation
    assert last < first - 2.0
    assert len([output for output in outputs if "image/png" in output.get("data", {})]) == 1
    assert "restored step 60: equal to the trained parameters: True" in text
    greedy, sampled = _printed(text, "greedy:"), _printed(text, "t=0.6:")
    assert greedy.startswith("The ") and len(greedy) > 50
    assert sampled.startswith("The ") and len(sampled) > 50 and sampled != greedy
