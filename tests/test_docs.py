"""The documentation's Python: every ```python block of README.md and docs/*.md runs as written, in a
folder holding what the docs say to prepare: weights in model/, the demo's export in hf_model/, an MNLI
fine-tune in save/mnli/ and MNLI inputs in new.tsv."""

import os
import re
import shutil
import subprocess
import sys

import pytest

import export_hf
from conftest import ROOT, task_arguments

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(path.name, i, block) for path in DOCS
          for i, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S))]


@pytest.fixture(scope="module")
def docs_folder(full_size_weights, task_folders, tmp_path_factory):
    """model/: random weights of the real sizes; hf_model/: `python export_hf.py --demo --out hf_model/`;
    save/mnli/: a tiny one-epoch MNLI run with --submit; new.tsv: MNLI's test file."""
    import train

    folder = tmp_path_factory.mktemp("docs")
    os.symlink(full_size_weights[1], folder / "model")
    assert export_hf.main(["--demo", "--demo_dir", str(folder / "demo_run"), "--out", str(folder / "hf_model")]) == 0
    assert train.main(task_arguments(task_folders, "mnli", folder / "mnli_run", "--n_iter", "1", "--submit")) == 0
    (folder / "save").mkdir()
    os.symlink(folder / "mnli_run" / "save" / "run", folder / "save" / "mnli")
    shutil.copy(os.path.join(task_folders["mnli"][0], "test_matched.tsv"), folder / "new.tsv")
    return folder


def test_the_docs_hold_python():
    assert {name for name, _, _ in BLOCKS} >= {"README.md", "export.md"}


@pytest.mark.slow
@pytest.mark.parametrize("name, index, block", BLOCKS, ids=[f"{name}-{i}" for name, i, _ in BLOCKS])
def test_every_python_block_runs(docs_folder, name, index, block):
    result = subprocess.run([sys.executable, "-c", block], cwd=docs_folder, capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, f"{name}, block {index}:\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"{name}, block {index} printed nothing"
