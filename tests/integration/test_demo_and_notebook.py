import os
import subprocess
import sys

import nbformat
from nbclient import NotebookClient

from tests.conftest import ROOT


def test_demo_command_writes_a_report_that_names_the_bug(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "alignkit", "demo", "--steps", "6"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr  # the planted bug was found
    assert "unet step 1: input mismatch" in proc.stdout.replace("\n", " ")
    html = (tmp_path / "reports" / "demo.html").read_text()
    assert "input mismatch" in html and (tmp_path / "dumps" / "demo_ref.h5").exists()


def test_demo_without_a_bug_is_aligned(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "alignkit", "demo", "--bug", "none", "--steps", "3", "--out", "r.html"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ALIGNED" in (tmp_path / "r.html").read_text()


def test_walkthrough_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nb = nbformat.read(ROOT / "notebooks" / "walkthrough.ipynb", as_version=4)
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "reports" / "walkthrough.html").exists()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "diverged" in outputs
