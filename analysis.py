"""Results of a run: best validation accuracy from its log, test accuracy of its submission, and an
optional PNG learning curve."""

import argparse
import os
import sys

import numpy as np

from datasets import rocstories_test_labels
from utils import json_lines, read_text_file


def read_log(log_path):
    """(arguments of the run, list of logged points) from a JSON-lines log."""
    lines = [value for _, value in json_lines(read_text_file(log_path, ValueError, "log file"), log_path)]
    if not lines:
        raise ValueError(f"{log_path}: empty log")
    return lines[0], [line for line in lines[1:] if "va_acc" in line]


def read_predictions(pred_path):
    """The prediction column of a submission file (index<TAB>prediction)."""
    if not os.path.exists(pred_path):
        raise FileNotFoundError(f"submission file {str(pred_path)!r} not found")
    with open(pred_path) as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != ["index", "prediction"]:
            raise ValueError(f"{pred_path}, line 1: expected the header 'index<TAB>prediction', found {header}")
        predictions = []
        for line_no, line in enumerate(f, 2):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 2 or not fields[1].strip().lstrip("-").isdigit():
                raise ValueError(f"{pred_path}, line {line_no}: expected an index and an integer prediction, "
                                 f"found {line.rstrip()!r}")
            predictions.append(int(fields[1]))
        return np.array(predictions)


def rocstories(data_dir, pred_path, log_path):
    """Print (and return) the best validation accuracy of the log and the test accuracy."""
    _, points = read_log(log_path)
    if not points:
        raise ValueError(f"{log_path}: no evaluation was logged")
    valid_accuracy = max(p["va_acc"] for p in points)
    print(f"ROCStories Valid Accuracy: {valid_accuracy:.2f}")
    labels = rocstories_test_labels(data_dir)
    if labels is None:
        print("ROCStories Test Accuracy: unknown (the test file has no labels)")
        return valid_accuracy, None
    predictions = read_predictions(pred_path)
    if len(predictions) != len(labels):
        raise ValueError(f"{pred_path}: {len(predictions)} predictions for {len(labels)} test stories")
    test_accuracy = float(np.mean(predictions == labels) * 100)
    print(f"ROCStories Test Accuracy: {test_accuracy:.2f}")
    return valid_accuracy, test_accuracy


def plot_learning_curve(log_path, png_path):
    """Costs and accuracies per logged point, against the update count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args, points = read_log(log_path)
    updates = [p["n_updates"] for p in points]
    fig, (ax_cost, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("tr_cost", "train"), ("va_cost", "valid")):
        ax_cost.plot(updates, [p[key] for p in points], marker="o", label=label)
    for key, label in (("tr_acc", "train"), ("va_acc", "valid")):
        ax_acc.plot(updates, [p[key] for p in points], marker="o", label=label)
    ax_cost.set(xlabel="updates", ylabel="classification cost", title="cost")
    ax_acc.set(xlabel="updates", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_cost, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(args.get("desc") or os.path.basename(log_path))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data_dir", default="data/")
    parser.add_argument("--log", required=True, help="the run's JSON-lines log (log/DESC.jsonl)")
    parser.add_argument("--pred", default="submission/ROCStories.tsv")
    parser.add_argument("--plot", help="write a PNG learning curve here")
    args = parser.parse_args(argv)
    try:
        rocstories(args.data_dir, args.pred, args.log)
        if args.plot:
            print(f"learning curve: {plot_learning_curve(args.log, args.plot)}")
    except (OSError, ValueError) as err:  # missing or malformed files (DataError is a ValueError)
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
