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


@pytest.mark.slow
def test_data_section_measures_a_cold_and_a_warm_start(tmp_path):
    """The full-size data section at a small share of MNLI's counts: both runs reach their first update,
    the second from the encoding cache; memory and seconds are recorded for each."""
    rows_path = tmp_path / "rows.json"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "benchmark.py"), "--only", "data", "--data_tasks",
                          "mnli", "--data_scale", "0.002", "--json", str(rows_path)], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-2000:]
    assert "MNLI: 785 train, 32 valid, 32 valid_mm, 32 test, 32 test_mm, 32 diagnostic examples" in out.stdout
    encoding = [float(s) for s in re.findall(r"^    time: start-up [\d.]+ s, encoding ([\d.]+) s, .* training [\d.]+ s",
                                             out.stdout, re.M)]
    assert len(encoding) == 2 and encoding[1] < encoding[0] / 2  # the warm run reads the cache its cold run wrote
    rows = {(row["section"], row["variant"]): row["median"] for row in json.loads(rows_path.read_text())}
    units = ("GiB peak RSS", "s to first update")
    assert set(rows) == {(f"data mnli, {unit}", f"ours, {cache} cache") for unit in units for cache in ("cold", "warm")}
    assert all(0 < value < 60 for value in rows.values())
