"""colab/quickstart.ipynb: valid nbformat 4 without outputs, and it runs end to end (tiny).

The notebook is executed without Jupyter: its code cells (plain Python, no ! or % magics)
are concatenated into one script and run in a fresh interpreter from the repository root.
"""

import ast
import json
import os
import subprocess
import sys

import pytest

from conftest import COMPILE_CACHE, FAST_COMPILE_FLAGS, ROOT

NOTEBOOK = os.path.join(ROOT, "colab", "quickstart.ipynb")
# The PNGs the notebook's `show` writes to WORKDIR/notebook/ in the tiny run (K = 2 and 5).
PICTURES = ("samples_K2.png", "samples_K5.png", "reconstruction.png", "interpolation.png",
            "edit_Trouser.png")


def load_notebook() -> dict:
    with open(NOTEBOOK, encoding="utf-8") as f:
        return json.load(f)


def cell_source(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def code_cells(notebook: dict) -> list[str]:
    return [cell_source(c) for c in notebook["cells"] if c["cell_type"] == "code"]


def test_notebook_is_nbformat4_without_outputs():
    notebook = load_notebook()
    assert notebook["nbformat"] == 4 and isinstance(notebook["nbformat_minor"], int)
    assert isinstance(notebook["metadata"], dict)
    assert notebook["metadata"]["kernelspec"]["language"] == "python"
    cells = notebook["cells"]
    assert cells and {c["cell_type"] for c in cells} == {"code", "markdown"}
    ids = [c.get("id") for c in cells]
    if notebook["nbformat_minor"] >= 5:  # nbformat 4.5: every cell has a unique id
        assert all(isinstance(i, str) and i for i in ids) and len(set(ids)) == len(ids)
    for n, cell in enumerate(cells):
        assert isinstance(cell["metadata"], dict), n
        source = cell["source"]
        assert isinstance(source, str) or all(isinstance(line, str) for line in source), n
        if cell["cell_type"] == "code":  # never commit outputs or execution counts
            assert cell["outputs"] == [], f"cell {n} has outputs: clear them before committing"
            assert cell["execution_count"] is None, f"cell {n} has an execution count"
        else:
            assert "outputs" not in cell and "execution_count" not in cell, n


def test_code_cells_are_plain_python():
    """No IPython magics or shell escapes, so the notebook runs as a script (the test below)."""
    for n, source in enumerate(code_cells(load_notebook())):
        for line in source.splitlines():
            assert not line.lstrip().startswith(("!", "%")), f"code cell {n}: {line}"
        ast.parse(source, filename=f"code cell {n}")


@pytest.mark.slow  # trains the tiny config and runs every demo of the notebook
def test_notebook_runs_end_to_end(tmp_path):
    workdir = tmp_path / "workdir"
    script = tmp_path / "quickstart.py"
    script.write_text("\n\n".join(code_cells(load_notebook())) + "\n", encoding="utf-8")
    env = {key: value for key, value in os.environ.items()
           if key not in ("XLA_FLAGS", "PYTHONPATH")}
    env.update(DMZ_NOTEBOOK_VARIANT="tiny", DMZ_NOTEBOOK_WORKDIR=str(workdir),
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1",
               XLA_FLAGS=FAST_COMPILE_FLAGS)  # 4 steps: compiling dominates
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-3000:] + "\n" + result.stderr[-6000:]
    assert "dmz_jax is already installed" in result.stdout  # nothing was installed
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert json.loads((workdir / "summary.json").read_text())["step"] == 4
    for name in PICTURES:
        path = workdir / "notebook" / name
        assert path.is_file() and path.read_bytes().startswith(b"\x89PNG"), name
    for line in ("PSNR z only:", "PSNR z + inverted x_T:", "'Trouser' vs the rest from z"):
        assert line in result.stdout, line
