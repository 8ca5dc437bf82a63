"""glue_submission.py: the GLUE server's zip from a folder of every task's predictions (file names as GLUE
documents them), WNLI's majority class where no WNLI run exists, each missing task named, bad files refused."""

import os
import re
import shutil
import zipfile

import pytest

import glue_submission
from datasets import DataError
from synthetic import write_synthetic_wnli

# The files GLUE's server scores, as its FAQ names them (written out here, independently of the module).
GLUE_NAMES = {"CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "QNLI.tsv",
              "RTE.tsv", "WNLI.tsv", "AX.tsv"}


def submission_copy(glue_runs, tmp_path):
    """A copy of the folder that every GLUE task's --submit wrote into."""
    return shutil.copytree(glue_runs[0], tmp_path / "submission")


def wnli_index(folder):
    """The index column of WNLI's test.tsv, read by splitting lines on tabs."""
    with open(os.path.join(folder, "test.tsv"), encoding="utf-8") as f:
        rows = [line.split("\t") for line in f.read().splitlines()]
    return [row[rows[0].index("index")] for row in rows[1:]]


def run(capsys, *argv):
    status = glue_submission.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


@pytest.mark.slow
def test_every_tasks_submission_makes_the_zip_glue_wants(glue_runs, tmp_path, capsys):
    folder = submission_copy(glue_runs, tmp_path)
    assert set(os.listdir(folder)) == GLUE_NAMES - {"WNLI.tsv"}  # the runs' files: every task but WNLI, AX from MNLI
    wnli = write_synthetic_wnli(str(tmp_path / "glue_data"), 10, 6, 9, seed=2)
    out = tmp_path / "glue.zip"
    status, printed, err = run(capsys, "--submission_dir", str(folder), "--glue_dir", str(tmp_path / "glue_data"),
                               "--out", str(out))
    assert status == 0, err
    with zipfile.ZipFile(out) as archive:
        assert set(archive.namelist()) == GLUE_NAMES  # at the top level, GLUE's names
        for name in GLUE_NAMES - {"WNLI.tsv"}:
            assert archive.read(name) == (folder / name).read_bytes(), name
        wnli_rows = archive.read("WNLI.tsv").decode().splitlines()
    assert wnli_rows == ["index\tprediction"] + [f"{i}\t0" for i in wnli_index(wnli)] and len(wnli_rows) == 10
    assert re.search(r"^WNLI.tsv: no WNLI run in .*: the majority class 0 \(not_entailment\) for all 9 pairs of "
                     r".*WNLI/test.tsv, the usual stand-in \(the paper does not report WNLI\)$", printed, re.M)
    assert re.search(r"^AX.tsv: 24 predictions", printed, re.M) and f"wrote {out}" in printed
    first = out.read_bytes()
    assert run(capsys, "--submission_dir", str(folder), "--glue_dir", str(wnli), "--out", str(out))[0] == 0
    assert out.read_bytes() == first  # the WNLI folder itself does too; the same files make the same zip


@pytest.mark.slow
def test_each_missing_task_is_named_and_no_zip_is_written(glue_runs, tmp_path, capsys):
    folder = submission_copy(glue_runs, tmp_path)
    os.remove(folder / "CoLA.tsv")
    os.remove(folder / "AX.tsv")
    status, _, err = run(capsys, "--submission_dir", str(folder))
    assert status == 1 and len(err.splitlines()) == 1
    assert re.match(r"error: .*submission lacks 3 of GLUE's 11 files: CoLA.tsv \(python train.py --dataset cola "
                    r"--submit \.\.\.\); WNLI.tsv \(give --glue_dir, the GLUE folder holding WNLI/test.tsv, for the "
                    r"majority class\); AX.tsv \(an MNLI run writes it where GLUE's diagnostic.tsv is in its folder; "
                    r"or: python predict.py .* --labels_only --output AX.tsv\)\. No zip written", err), err
    assert not os.path.exists(folder / "glue_submission.zip")


@pytest.mark.slow
def test_a_wnli_run_is_taken_as_it_is(glue_runs, tmp_path, capsys):
    folder = submission_copy(glue_runs, tmp_path)
    (folder / "WNLI.tsv").write_text("index\tprediction\n0\t1\n1\t0\n")
    status, printed, _ = run(capsys, "--submission_dir", str(folder))
    assert status == 0 and "majority" not in printed and "WNLI.tsv: 2 predictions" in printed
    with zipfile.ZipFile(folder / "glue_submission.zip") as archive:
        assert archive.read("WNLI.tsv") == b"index\tprediction\n0\t1\n1\t0\n"


def test_the_tasks_write_every_glue_file_but_wnli():
    assert set(glue_submission.glue_tasks()) == GLUE_NAMES - {"WNLI.tsv"}
    assert {name: task.name for name, task in glue_submission.glue_tasks().items()} == {
        "CoLA.tsv": "cola", "SST-2.tsv": "sst2", "MRPC.tsv": "mrpc", "STS-B.tsv": "stsb", "QQP.tsv": "qqp",
        "MNLI-m.tsv": "mnli", "MNLI-mm.tsv": "mnli", "QNLI.tsv": "qnli", "RTE.tsv": "rte", "AX.tsv": "mnli"}


@pytest.mark.parametrize("text, labels, expected", [
    ("index\tprediction\n0\tentailment\n1\tmaybe\n", ("entailment", "not_entailment"),
     r"line 3: prediction 'maybe' is not one of entailment, not_entailment"),
    ("index\tprediction\n0\t2.5\n1\tabc\n", None, r"line 3: prediction 'abc' is not a number"),
    ("index\tprediction\n0\tnan\n", None, r"line 2: prediction 'nan' is not a number"),
    ("id\tlabel\n0\t1\n", ("0", "1"), r"line 1: expected the header index<TAB>prediction; found \['id', 'label'\]"),
    ("", ("0", "1"), r"line 1: expected the header index<TAB>prediction; the file is empty"),
    ("index\tprediction\n0\t1\n0\t0\n", ("0", "1"), r"line 3: index '0' twice"),
    ("index\tprediction\n0\t1\t0.9\n", ("0", "1"), r"line 2: expected 2 tab-separated columns \(index, prediction\), "
                                                   r"found 3"),
    ("index\tprediction\n", ("0", "1"), r": no predictions after the header"),
])
def test_a_file_not_in_glues_format_is_named_with_its_line(tmp_path, text, labels, expected):
    path = tmp_path / "RTE.tsv"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"RTE.tsv(, )?{expected}$"):
        glue_submission.check_predictions(str(path), labels)


def test_a_bad_file_or_a_glue_folder_without_wnli_stops_the_command(tmp_path, capsys):
    folder = tmp_path / "submission"
    folder.mkdir()
    (folder / "CoLA.tsv").write_text("index\tprediction\n0\tacceptable\n")
    status, _, err = run(capsys, "--submission_dir", str(folder))
    assert status == 1 and re.fullmatch(r"error: .*CoLA.tsv, line 2: prediction 'acceptable' is not one of 0, 1\n",
                                        err), err
    os.remove(folder / "CoLA.tsv")
    status, _, err = run(capsys, "--submission_dir", str(folder), "--glue_dir", str(tmp_path / "nowhere"))
    assert status == 1 and "--glue_dir " in err and "holds neither WNLI/test.tsv nor test.tsv" in err
    status, _, err = run(capsys, "--submission_dir", str(tmp_path / "none"))
    assert status == 1 and "submission folder" in err and "does not exist" in err
