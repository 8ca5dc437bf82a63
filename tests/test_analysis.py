"""analysis: accuracies from a log and a submission, the learning curve."""

import json
import re

import pytest

import analysis
from datasets import rocstories_test_labels
from synthetic import write_synthetic_rocstories


def write_log(path, points):
    with open(path, "w") as f:
        f.write(json.dumps({"desc": "x", "time": 0}) + "\n")
        for p in points:
            f.write(json.dumps(p) + "\n")


def point(n, va_acc):
    return dict(n_epochs=n, n_updates=10 * n, tr_cost=0.6, va_cost=0.7, tr_acc=60.0, va_acc=va_acc)


def test_best_validation_and_test_accuracy(tmp_path, capsys):
    write_synthetic_rocstories(tmp_path, n_val=10, n_test=8, seed=2)
    labels = rocstories_test_labels(tmp_path)
    predictions = list(labels[:6]) + [1 - labels[6], 1 - labels[7]]
    (tmp_path / "pred.tsv").write_text("index\tprediction\n" + "".join(f"{i}\t{p}\n" for i, p in
                                                                       enumerate(predictions)))
    write_log(tmp_path / "run.jsonl", [point(1, 55.0), point(2, 61.5), point(3, 58.0)])
    valid, test = analysis.rocstories(tmp_path, tmp_path / "pred.tsv", tmp_path / "run.jsonl")
    assert (valid, test) == (61.5, 75.0)
    assert capsys.readouterr().out == "ROCStories Valid Accuracy: 61.50\nROCStories Test Accuracy: 75.00\n"
    png = analysis.plot_learning_curve(str(tmp_path / "run.jsonl"), str(tmp_path / "curve.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs(tmp_path):
    write_synthetic_rocstories(tmp_path, n_val=10, n_test=8, seed=2)
    write_log(tmp_path / "run.jsonl", [point(1, 50.0)])
    (tmp_path / "pred.tsv").write_text("index\tprediction\n0\t1\n")
    with pytest.raises(ValueError, match="1 predictions for 8 test stories"):
        analysis.rocstories(tmp_path, tmp_path / "pred.tsv", tmp_path / "run.jsonl")
    (tmp_path / "pred.tsv").write_text("id,pred\n")
    with pytest.raises(ValueError, match="line 1: expected the header"):
        analysis.rocstories(tmp_path, tmp_path / "pred.tsv", tmp_path / "run.jsonl")
    with pytest.raises(ValueError, match="log file .* not found"):
        analysis.read_log(str(tmp_path / "none.jsonl"))
    write_log(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="no evaluation was logged"):
        analysis.rocstories(tmp_path, tmp_path / "pred.tsv", tmp_path / "empty.jsonl")


@pytest.mark.parametrize("case, message", [
    ("no log", r"log file '.*none.jsonl' not found"),
    ("bad log line", r"run.jsonl, line 2: not valid JSON"),
    ("no submission", r"submission file '.*missing.tsv' not found"),
    ("bad prediction", r"pred.tsv, line 3: expected an index and an integer prediction, found '1\\tyes'"),
])
def test_command_line_errors_are_one_line(tmp_path, capsys, case, message):
    write_synthetic_rocstories(tmp_path, n_val=10, n_test=8, seed=2)
    write_log(tmp_path / "run.jsonl", [point(1, 50.0)])
    (tmp_path / "pred.tsv").write_text("index\tprediction\n0\t1\n1\tyes\n")
    log, pred = tmp_path / "run.jsonl", tmp_path / "pred.tsv"
    if case == "no log":
        log = tmp_path / "none.jsonl"
    elif case == "bad log line":
        log.write_text('{"desc": "x"}\n{"n_epochs": 1,\n')
    elif case == "no submission":
        pred = tmp_path / "missing.tsv"
    assert analysis.main(["--data_dir", str(tmp_path), "--log", str(log), "--pred", str(pred)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err.strip()), err
