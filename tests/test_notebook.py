"""notebooks/inspect_update.ipynb runs top to bottom (its own small SAC and Rainbow runs, on CPU)
and shows what it claims: the actor's gradient into the shared convs is exactly zero and the
jitted update's critic loss equals the directly computed one."""
import os
import re

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "inspect_update.ipynb")


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_the_notebook_executes_without_error():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": ROOT}}).execute()   # raises on a failing cell
    out = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert "actor-loss gradient into the shared convs exactly zero: True" in out
    m = re.search(r"update's critic loss ([\d.]+) \(above: ([\d.]+)\)", out)
    assert m and abs(float(m.group(1)) - float(m.group(2))) <= 1e-3 * max(1.0, float(m.group(2)))
    m = re.search(r"actor loss (-?[\d.]+) \(actor_loss at the updated critic: (-?[\d.]+);", out)
    assert m and abs(float(m.group(1)) - float(m.group(2))) <= 1e-3 * max(1.0, abs(float(m.group(2))))
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 4          # gradient norms, Q-values, flow, return distributions
