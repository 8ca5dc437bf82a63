"""bench/benchmark.py runs its training and evaluation sections end to end (small model)."""

import json
import platform
import re
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_quick_train_section_compares_the_same_models(tmp_path):
    rows_path = tmp_path / "rows.json"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "benchmark.py"), "--quick", "--only", "train",
                          "--repeats", "1", "--json", str(rows_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    # the timed models hold the same weights: ours and the plain path give the same evaluation logits
    diff = float(re.search(r"ours vs plain: max \|diff\| (\S+)", out.stdout).group(1))
    assert diff < 1e-5
    rows = json.loads(rows_path.read_text())
    sections = {(row["section"], row["variant"]) for row in rows}
    assert {("update of 32, fp32", "ours (one pass)"),
            ("update of 32, fp32", "transformers DoubleHeads + fused AdamW (one pass)"),
            ("update of 32, fp32", "ours, plain (4 towers of 8)"),
            ("step of 8 + optimizer", "ours"),
            ("evaluate 64, fp32", "transformers DoubleHeads")} <= sections
    assert all(row["median"] > 0 for row in rows)
    assert all((row["ratio"] is None) == (row["variant"] in ("ours", "ours (one pass)")) for row in rows)
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert f"freed host memory kept for reuse: {glibc}" in out.stdout
