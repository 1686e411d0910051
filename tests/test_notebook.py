"""notebooks/convergence.ipynb: committed without outputs, and runs top to bottom on a sweep's
results (a synthetic results dir written here)."""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "convergence.ipynb"
STEPS = [100, 200, 400, 800, 1600]
BUCKETS = 5


def write_results(results_dir: Path) -> None:
    """const, dysigma (2x faster: fid linear in log step), learned (never reaches); 2 seeds."""
    rates = {"const": 1.0, "dysigma": 2.0, "learned": 0.25}
    rows = []
    for seed in (0, 1):
        for strategy, rate in rates.items():
            for i, step in enumerate(STEPS):
                rows.append({"strategy": strategy, "target": "x0", "seed": seed, "step": step,
                             "fid": 120.0 + seed - 10 * np.log(rate * step), "loss": 0.05,
                             # 0 at the lowest bucket: the log-axis plot must cope with it
                             **{f"w_t{b}": b * (1 + i) / BUCKETS for b in range(BUCKETS)}})
    results_dir.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(results_dir / "curves.csv", index=False)
    pd.DataFrame([{"strategy": s, "target": "x0", "seed": seed, "status": "ok", "final_fid": 1.0, "metric": "fid_featurenet",
                   "steps": STEPS[-1], "seconds": 1.0, "error": ""} for s in rates for seed in (0, 1)]
                 ).to_csv(results_dir / "trials.csv", index=False)


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells
    assert all(c.outputs == [] and c.execution_count is None for c in code_cells)
    assert any("parameters" in c.metadata.get("tags", []) for c in code_cells)


def test_notebook_runs_on_sweep_results(tmp_path):
    write_results(tmp_path / "sweep")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Papermill-style: a cell right after the tagged parameters cell overrides them.
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(f"RESULTS_DIR = {str(tmp_path / 'sweep')!r}"))
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('KERNEL_PREFIX=' + sys.prefix)"))

    # The 'python3' kernel spec runs sys.executable, i.e. this venv's interpreter.
    NotebookClient(nb, kernel_name="python3", timeout=120,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"KERNEL_PREFIX={sys.prefix}" in text
    assert "metric 'fid_featurenet'" in text
    assert "x0          dysigma: 2.00x [2.00, 2.00] 95% CI over 2 seeds; 2.00x ± 0.00 (2/2 seeds)" in text
    assert "learned: no mean (censored seeds: below 1.00x) [0, 1.00] 95% CI over 2 seeds; not reached (0/2 seeds)" in text
    assert "MSDM Dy-Sigma, the authors' code 3.7x, target x0: contradicted at this budget" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # speedup bars, convergence curves, weight dynamics
    html = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code"
            for o in c.outputs if "text/html" in o.get("data", {})]
    assert any("not reached" in h and "learned" in h for h in html)  # the per-seed table

