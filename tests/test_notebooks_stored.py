"""The notebooks are stored with their outputs (figures included) and stay small; the
example plots of a short and a long run are in the repository.

The notebooks themselves run in the slow tier (nbmake); ``python3 notebooks/refresh.py``
refreshes what these tests read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
MAX_TOTAL_BYTES = 3 * 2**20


def code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_notebook_is_stored_executed_with_figures(path):
    code = code_cells(path)
    unrun = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    assert code and not unrun, f"{path.name}: code cells {unrun} not executed; run refresh.py"
    cells = [c.get("outputs", []) for c in code]
    kinds = {o["output_type"] for cell in cells for o in cell}
    assert "error" not in kinds, f"{path.name}: an error output is stored"
    images = [o for cell in cells for o in cell if "image/png" in o.get("data", {})]
    assert images, f"{path.name}: no figure is stored"


def test_notebooks_are_small():
    assert {p.name for p in PATHS} >= {"01_quickstart.ipynb", "04_how_to.ipynb"}
    total = sum(p.stat().st_size for p in PATHS)
    assert total < MAX_TOTAL_BYTES, f"notebooks take {total / 2**20:.1f} MiB"


@pytest.mark.parametrize("steps", [200, 20_000])
def test_example_plots_are_in_the_repository(steps):
    folder = NOTEBOOKS / "figures" / f"run_{steps}"
    for name in ("loss_vs_step.png", "loss_vs_time.png", "confidence_horizon.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", folder / name
    assert "adamw" in (folder / "summary.txt").read_text()
