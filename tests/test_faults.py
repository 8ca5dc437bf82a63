"""bench/faults.py: a run killed (SIGKILL) at random moments and inside checkpoint writes, resumed each
time, ends bit for bit as an uninterrupted one."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_killed_and_resumed_runs_end_as_an_uninterrupted_one(roc_files, tmp_path):
    flags = ["--data_dir", str(roc_files / "data"), "--model_path", str(roc_files / "model"),
             "--encoder_path", str(roc_files / "model" / "encoder.json"), "--bpe_path",
             str(roc_files / "model" / "vocab.bpe"), "--desc", "run", "--n_embd", "32", "--n_head", "4",
             "--n_layer", "2", "--n_transfer", "2", "--n_batch", "4", "--n_gpu", "4", "--n_valid", "40",
             "--n_iter", "4", "--lr", "1e-3", "--submit"]
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "faults.py"), "--kills", "4", "--seed", "1",
                             "--work_dir", str(tmp_path), "--", *flags], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    print(result.stdout)
    kills = re.search(r"(\d+) SIGKILLs \((\d+) inside a checkpoint or best-parameters write\), (\d+) resumes",
                      result.stdout)
    assert kills and int(kills.group(1)) >= 1 and int(kills.group(3)) >= 1, result.stdout
    assert "identical to the uninterrupted run, bit for bit" in result.stdout
