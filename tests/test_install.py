"""The installed project (`pip install -e .`, as the README's commands do): its commands and its modules
work from any folder, with OpenAI's vocabulary found where the project keeps it."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

try:
    importlib.metadata.distribution("gpt1-finetune")
    INSTALLED = True
except importlib.metadata.PackageNotFoundError:
    INSTALLED = False
installed = pytest.mark.skipif(not INSTALLED, reason="the project is not installed (pip install -e .)")
COMMANDS = ["gpt1-train", "gpt1-generate", "gpt1-export", "gpt1-analysis", "gpt1-predict", "gpt1-glue-submission"]


def run(argv, cwd, **env):
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the install alone
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=1800, env=dict(environment, **env))


def test_every_module_is_installed():
    """pyproject.toml lists every module at the top of the repository (a module left out is missing
    from an install, and the commands fail from another folder)."""
    listed = re.findall(r'"(\w+)"', re.search(r"^py-modules = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(),
                                                re.S | re.M).group(1))
    assert sorted(listed) == sorted(path.stem for path in ROOT.glob("*.py"))


@pytest.mark.slow
@installed
def test_the_commands_run_from_another_folder(tmp_path):
    assert all(shutil.which(c) for c in COMMANDS), [c for c in COMMANDS if not shutil.which(c)]
    assert str(tmp_path).find(str(ROOT)) == -1
    trained = run(["gpt1-train", "--demo", "--n_iter", "1"], tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "ROCStories Test Accuracy:" in trained.stdout and (tmp_path / "demo_run" / "save" / "demo").is_dir()
    generated = run(["gpt1-generate", "--demo", "--prompt", "tom was happy .", "--max_new_tokens", "3"], tmp_path)
    assert generated.returncode == 0 and generated.stdout.startswith("tom was happy . >>> "), generated.stderr
    exported = run(["gpt1-export", "--demo", "--out", "hf_model"], tmp_path)
    assert exported.returncode == 0 and (tmp_path / "hf_model" / "model.safetensors").exists(), exported.stderr
    analysed = run(["gpt1-analysis", "--log", "demo_run/log/demo.jsonl"], tmp_path)
    assert analysed.returncode == 0 and re.search(r"^ROCStories Valid Accuracy: [\d.]+$", analysed.stdout, re.M)
    helped = run(["gpt1-train", "--help"], tmp_path)
    assert helped.returncode == 0
    for command in ("gpt1-predict", "gpt1-glue-submission"):
        assert run([command, "--help"], tmp_path).returncode == 0, command
    assert re.search(r"--lr LR\s+learning rate.*?\(default:\s+6.25e-05\)", helped.stdout, re.S)  # defaults shown


@pytest.mark.slow
@installed
def test_the_readme_import_example_runs_from_another_folder(full_size_weights, tmp_path):
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- usage -->\s*```python\n(.*?)```", readme, re.S).group(1)
    os.symlink(full_size_weights[1], tmp_path / "model")
    result = run([sys.executable, "-c", snippet], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch.Size([1, 5, 768])" in result.stdout
