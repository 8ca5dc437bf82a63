"""analysis: every task's figures from a run's log (and its submissions where the data has test
labels), found through the flags the log records; the learning curve; one-line errors."""

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
    with pytest.raises(ValueError, match="1 predictions for 8 examples of ROCStories Test"):
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
    ("bad prediction", r"pred.tsv, line 3: prediction 'yes' is not one of 0, 1$"),
])
def test_command_line_errors_are_one_line(tmp_path, capsys, case, message):
    write_synthetic_rocstories(tmp_path, n_val=10, n_test=8, seed=2)
    write_log(tmp_path / "run.jsonl", [point(1, 50.0)])
    (tmp_path / "pred.tsv").write_text("index\tprediction\n0\t1\n1\tyes\n" + "".join(f"{i}\t0\n" for i in range(2, 8)))
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


# Each task's report name for its validation split and its metrics, written out from docs/tasks.md.
VALID_TITLES = {"rocstories": "ROCStories Valid", "sst2": "SST-2 Dev", "cola": "CoLA Dev", "mrpc": "MRPC Dev",
                "qqp": "QQP Dev", "stsb": "STS-B Dev", "mnli": "MNLI-m Dev", "qnli": "QNLI Dev", "rte": "RTE Dev",
                "snli": "SNLI Dev", "scitail": "SciTail Dev", "race": "RACE Dev", "lm": "LM Valid"}
METRICS = {"cola": [("MCC", "mcc")], "mrpc": [("F1", "f1"), ("Accuracy", "acc")],
           "qqp": [("F1", "f1"), ("Accuracy", "acc")], "stsb": [("Pearson", "pearson"), ("Spearman", "spearman")],
           "lm": [("Perplexity", "ppl")]}


@pytest.mark.parametrize("name", list(VALID_TITLES))
def test_every_task_reports_its_own_lines_from_its_log(tmp_path, capsys, name):
    """The kept point is the best by the task's first metric (perplexity: the lowest); every metric of
    that point is printed under the task's own split title; the curve draws the task's metric."""
    metrics = METRICS.get(name, [("Accuracy", "acc")])
    values = [31.0, 47.5, 39.25]
    points = [dict(n_epochs=i + 1, n_updates=5 * (i + 1), tr_cost=1.0, va_cost=0.5,
                   **{f"{p}_{key}": v + j for p in ("tr", "va") for j, (_, key) in enumerate(metrics)})
              for i, v in enumerate(values)]
    log = tmp_path / "log" / "run.jsonl"
    log.parent.mkdir()
    log.write_text("\n".join(json.dumps(x) for x in [dict(dataset=name, desc="run", data_dir=str(tmp_path / "none"),
                                                            submission_dir=str(tmp_path / "sub"))] + points) + "\n")
    assert analysis.main(["--log", str(log), "--plot", str(tmp_path / "curve.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    best = points[0] if name == "lm" else points[1]  # lower perplexity, else higher
    expected = [f"{VALID_TITLES[name]} {metric}: {best['va_' + key]:.2f}" for metric, key in metrics]
    assert out[:len(expected)] == expected
    assert out[-1] == f"learning curve: {tmp_path / 'curve.png'}"


def test_the_submission_is_found_through_the_log(tmp_path, capsys):
    data = write_synthetic_rocstories(tmp_path / "data", n_val=10, n_test=8, seed=2)
    labels = rocstories_test_labels(data)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ROCStories.tsv").write_text("index\tprediction\n" + "".join(
        f"{i}\t{y if i else 1 - y}\n" for i, y in enumerate(labels)))  # one of 8 wrong
    log = tmp_path / "run.jsonl"
    log.write_text("\n".join(json.dumps(x) for x in [
        dict(dataset="rocstories", data_dir=str(data), submission_dir=str(tmp_path / "sub")), point(1, 70.0)]) + "\n")
    assert analysis.main(["--log", str(log)]) == 0
    assert capsys.readouterr().out == "ROCStories Valid Accuracy: 70.00\nROCStories Test Accuracy: 87.50\n"
