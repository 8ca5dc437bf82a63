"""A run's figures from its files, for any task: the best validation figures of its log, the test
figures of its submissions where the data has test labels (ROCStories), and its learning curve.

    python analysis.py --log log/DESC.jsonl [--plot curve.png]

The log's first line records the run's flags: the task, its data folder and its submission folder,
so nothing else needs saying (--data_dir, --submission_dir and --pred override them).
"""

import argparse
import os
import sys

from datasets import DataError
from metrics import METRIC_KEYS
from tasks import get_task
from utils import json_lines, read_text_file


def read_log(log_path):
    """(the run's flags, its evaluation points) from a JSON-lines log."""
    lines = [value for _, value in json_lines(read_text_file(log_path, ValueError, "log file"), log_path)]
    if not lines:
        raise ValueError(f"{log_path}: empty log")
    return lines[0], [line for line in lines[1:] if "n_updates" in line and "va_cost" in line]


def task_of(flags):
    """The task a log's run trained (logs of earlier versions without --dataset: ROCStories)."""
    return get_task(flags.get("dataset") or "rocstories").configured(n_valid=flags.get("n_valid", 374))


def point_metrics(task, point, prefix="va"):
    """{metric name: value} of one logged point."""
    return {name: point[f"{prefix}_{METRIC_KEYS[name]}"] for name in task.metric_names
            if f"{prefix}_{METRIC_KEYS[name]}" in point}


def best_point(task, points, log_path):
    """The logged point the run kept: the best validation figure by the task's selection rule."""
    if not points:
        raise ValueError(f"{log_path}: no evaluation was logged")
    return max(points, key=lambda p: task.selection_score(point_metrics(task, p)))


def read_predictions(pred_path):
    """The prediction column of a submission file (index<TAB>prediction), as text."""
    if not os.path.exists(pred_path):
        raise FileNotFoundError(f"submission file {str(pred_path)!r} not found")
    with open(pred_path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != ["index", "prediction"]:
            raise ValueError(f"{pred_path}, line 1: expected the header 'index<TAB>prediction', found {header}")
        predictions = []
        for line_no, line in enumerate(f, 2):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 2 or not fields[1].strip():
                raise ValueError(f"{pred_path}, line {line_no}: expected an index and a prediction, "
                                 f"found {line.rstrip()!r}")
            predictions.append((line_no, fields[1].strip()))
        return predictions


def report(log_path, data_dir=None, submission_dir=None, pred_path=None):
    """The lines of a run's figures: its kept validation point, then each labelled split it submitted
    (its predictions against the data's labels). Returns (lines, {title: metrics})."""
    flags, points = read_log(log_path)
    task = task_of(flags)
    best = best_point(task, points, log_path)
    figures = {task.title_of("valid"): point_metrics(task, best)}
    data_dir = data_dir or flags.get("data_dir")
    submission_dir = submission_dir or flags.get("submission_dir") or "submission/"
    submitted = [(key, name) for key, name in task.submissions() if pred_path or
                 os.path.exists(os.path.join(submission_dir, name))]
    notes = []
    for key, name in submitted if data_dir else ():
        try:
            split = task.read_split(data_dir, key)
        except DataError as err:
            notes.append(f"({task.title_of(key)}: its figures need the data: {err})")
            continue
        if split.labels is not None:
            path = pred_path or os.path.join(submission_dir, name)
            rows = read_predictions(path)
            if len(rows) != len(split):
                raise ValueError(f"{path}: {len(rows)} predictions for {len(split)} examples of {split.title}")
            figures[split.title] = task.metrics_of_predictions(rows, split.labels, path)
        pred_path = None  # --pred names the first submitted split's file only
    lines = [f"{title} {name}: {value:.2f}" for title, metrics in figures.items() for name, value in metrics.items()]
    return lines + notes, figures


def rocstories(data_dir, pred_path, log_path):
    """The original's analysis: print (and return) the best validation accuracy of the log and the
    test accuracy of the submission (None when the test file has no labels)."""
    lines, figures = report(log_path, data_dir=str(data_dir), pred_path=str(pred_path))
    if "ROCStories Test" not in figures:
        lines.append("ROCStories Test Accuracy: unknown (the test file has no labels)")
    print("\n".join(lines))
    return figures["ROCStories Valid"]["Accuracy"], figures.get("ROCStories Test", {}).get("Accuracy")


def plot_learning_curve(log_path, png_path):
    """Costs and the task's first metric (a language model: perplexity) per logged point, against
    the update count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flags, points = read_log(log_path)
    task = task_of(flags)
    metric = task.metric_names[0]
    updates = [p["n_updates"] for p in points]
    fig, (ax_cost, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    for prefix, label in (("tr", "train"), ("va", "valid")):
        ax_cost.plot(updates, [p[f"{prefix}_cost"] for p in points], marker="o", label=label)
        ax_metric.plot(updates, [p[f"{prefix}_{METRIC_KEYS[metric]}"] for p in points], marker="o", label=label)
    ax_cost.set(xlabel="updates", ylabel="cost", title="cost")
    ax_metric.set(xlabel="updates", ylabel=metric + ("" if metric == "Perplexity" else " (%)"), title=metric)
    for ax in (ax_cost, ax_metric):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{task.title}: {flags.get('desc') or os.path.basename(log_path)}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", required=True, help="the run's JSON-lines log (LOG_DIR/DESC.jsonl)")
    parser.add_argument("--data_dir", default=None, help="the task's data (default: as the log records)")
    parser.add_argument("--submission_dir", default=None, help="the run's submissions (default: as the log records)")
    parser.add_argument("--pred", default=None, help="a submission file for the task's test split (ROCStories.tsv)")
    parser.add_argument("--plot", help="write a PNG learning curve here")
    args = parser.parse_args(argv)
    try:
        lines, _ = report(args.log, args.data_dir, args.submission_dir, args.pred)
        print("\n".join(lines))
        if args.plot:
            print(f"learning curve: {plot_learning_curve(args.log, args.plot)}")
    except (OSError, ValueError) as err:  # missing or malformed files (DataError is a ValueError)
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
