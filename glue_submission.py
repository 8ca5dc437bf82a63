"""Assemble the GLUE server's submission: one zip with a prediction file for each of its tasks, taken
from the folder that train.py's --submit runs wrote into (docs/tasks.md, "A complete GLUE submission").

    python glue_submission.py --submission_dir submission/ --glue_dir glue_data/

GLUE scores eleven files, each `index<TAB>prediction` under a header row, named as in GLUE_FILES: the
eight tasks of the paper (MNLI twice, matched and mismatched), WNLI and the diagnostic set AX, which
an MNLI run predicts (tasks.py). The paper does not report WNLI; where the folder holds no WNLI.tsv,
the zip gets the usual stand-in, the majority class for every pair of GLUE's WNLI test file, and the
command says so. Every file is checked (header, one row per line, predictions the task's labels or
numbers, no index twice) before the zip is written; a file that is still missing is named with the
command that writes it, and no zip is written.
"""

import argparse
import math
import os
import sys
import zipfile

from datasets import DataError, read_csv_rows, read_rows
from tasks import TASKS
from utils import atomic_write

GLUE_FILES = ("CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "QNLI.tsv",
              "RTE.tsv", "WNLI.tsv", "AX.tsv")  # the server's names, as its FAQ and GLUE's own tools write them
WNLI = "WNLI.tsv"
WNLI_LABELS = ("0", "1")  # not_entailment, entailment
WNLI_MAJORITY = "0"  # not_entailment, the majority class: the stand-in BERT's GLUE submission used too
HEADER = ["index", "prediction"]


class SubmissionError(ValueError):
    """A submission folder that does not make a complete GLUE submission."""


def glue_tasks():
    """{GLUE file name: the task whose run writes it}, from the tasks' declarations (tasks.py)."""
    return {s.submission: task for task in TASKS.values() for s in task.sources if s.submission in GLUE_FILES}


def check_predictions(path, labels):
    """The number of predictions in one submission file; a DataError naming the line where it is not
    GLUE's format. `labels`: the allowed predictions, or None for scores (STS-B: numbers)."""
    rows = read_rows(path, delimiter="\t", quotes=False)
    if not rows or [cell.strip() for cell in rows[0][1]] != HEADER:
        raise DataError(f"{path}, line 1: expected the header index<TAB>prediction"
                        + (f"; found {rows[0][1]}" if rows else "; the file is empty"))
    seen = set()
    for line_no, row in rows[1:]:
        if len(row) != 2:
            raise DataError(f"{path}, line {line_no}: expected 2 tab-separated columns (index, prediction), "
                            f"found {len(row)}")
        index, value = (cell.strip() for cell in row)
        if labels is not None and value not in labels:
            raise DataError(f"{path}, line {line_no}: prediction {value!r} is not one of {', '.join(labels)}")
        if labels is None and not _finite_number(value):
            raise DataError(f"{path}, line {line_no}: prediction {value!r} is not a number")
        if not index or index in seen:
            raise DataError(f"{path}, line {line_no}: index {index!r} " + ("twice" if index else "is empty"))
        seen.add(index)
    if not seen:
        raise DataError(f"{path}: no predictions after the header")
    return len(seen)


def _finite_number(text):
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def wnli_test_index(glue_dir):
    """(the index column of GLUE's WNLI test file, its path), from the GLUE folder or the WNLI folder."""
    candidates = [os.path.join(glue_dir, "WNLI", "test.tsv"), os.path.join(glue_dir, "test.tsv")]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        raise SubmissionError(f"--glue_dir {glue_dir}: holds neither WNLI/test.tsv nor test.tsv, GLUE's WNLI test "
                              "file (from https://gluebenchmark.com/tasks)")
    header, rows = read_csv_rows(path, delimiter="\t", quotes=False)
    if "index" not in [h.strip() for h in header]:
        raise DataError(f"{path}, line 1: the header lacks column 'index'; found {header}")
    column = [h.strip() for h in header].index("index")
    index = []
    for line_no, row in rows:
        if len(row) <= column or not row[column].strip():
            raise DataError(f"{path}, line {line_no}: no index")
        index.append(row[column].strip())
    if not index:
        raise DataError(f"{path}: no test pairs after the header")
    return index, path


def how_to_write(name, task):
    """How the missing file `name` is written."""
    if name == WNLI:
        return f"{name} (give --glue_dir, the GLUE folder holding WNLI/test.tsv, for the majority class)"
    if name == "AX.tsv":
        return (f"{name} (an MNLI run writes it where GLUE's diagnostic.tsv is in its folder; or: python predict.py "
                "--model_path MNLI_RUN/best_params.safetensors --input diagnostic.tsv --labels_only --output AX.tsv)")
    return f"{name} (python train.py --dataset {task.name} --submit ...)"


def assemble(submission_dir, out, glue_dir=None):
    """Check every GLUE file of `submission_dir` and write them into the zip `out` (atomically), WNLI's
    majority class where the folder has no WNLI.tsv and --glue_dir holds GLUE's WNLI test file. Returns
    the report's lines. A SubmissionError names each file still missing; no zip is written then."""
    if not os.path.isdir(submission_dir):
        raise SubmissionError(f"submission folder {submission_dir!r} does not exist")
    tasks, members, report, missing = glue_tasks(), {}, [], []
    for name in GLUE_FILES:
        path = os.path.join(submission_dir, name)
        task = tasks.get(name)
        if os.path.isfile(path):
            n = check_predictions(path, WNLI_LABELS if name == WNLI else task.label_names)
            with open(path, "rb") as f:
                members[name] = f.read()
            report.append(f"{name}: {n} predictions ({path})")
        elif name == WNLI and glue_dir:
            index, test_file = wnli_test_index(glue_dir)
            text = "\t".join(HEADER) + "\n" + "".join(f"{i}\t{WNLI_MAJORITY}\n" for i in index)
            members[name] = text.encode("utf-8")
            report.append(f"{name}: no WNLI run in {submission_dir}: the majority class {WNLI_MAJORITY} "
                          f"(not_entailment) for all {len(index)} pairs of {test_file}, the usual stand-in (the "
                          "paper does not report WNLI)")
        else:
            missing.append(how_to_write(name, task))
    if missing:
        raise SubmissionError(f"{submission_dir} lacks {len(missing)} of GLUE's {len(GLUE_FILES)} files: "
                              + "; ".join(missing) + ". No zip written: GLUE's server scores one zip with every file")
    atomic_write(out, lambda tmp: _write_zip(tmp, members))
    return report + [f"wrote {out}: {', '.join(GLUE_FILES)}"]


def _write_zip(path, members):
    """The files at the zip's top level, in GLUE_FILES order, with a fixed date (the same files, the same zip)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in GLUE_FILES:
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), members[name],
                             compress_type=zipfile.ZIP_DEFLATED)


def build_parser():
    p = argparse.ArgumentParser(description="Assemble GLUE's submission zip from a folder of --submit predictions.")
    p.add_argument("--submission_dir", default="submission/",
                   help="the folder the GLUE runs' --submit wrote into (train.py's --submission_dir; default: "
                        "submission/)")
    p.add_argument("--glue_dir", default=None,
                   help="the GLUE data folder (holding WNLI/test.tsv): WNLI's majority class where no WNLI.tsv exists")
    p.add_argument("--out", default=None, help="the zip (default: SUBMISSION_DIR/glue_submission.zip)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = args.out or os.path.join(args.submission_dir, "glue_submission.zip")
    try:
        report = assemble(args.submission_dir, out, args.glue_dir)
    except (SubmissionError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: cannot write {out}: {err.strerror or err}", file=sys.stderr)
        return 1
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
