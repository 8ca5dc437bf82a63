"""Reading data files (docs/reference.md §5, docs/tasks.md "Reading the files"): one CSV/TSV stack,
ROCStories' Story Cloze files with the original's split, the task formats (GLUE and SciTail TSV,
SNLI JSON lines, RACE JSON), and loaders for a user's own CSV files.

Every reader gets its text from `read_text`, which names the line and column of a byte that is not
UTF-8; every error is a DataError naming the file and line (RACE: the question).
"""

import csv
import glob
import io
import os
from dataclasses import dataclass, field

import numpy as np
from sklearn.model_selection import train_test_split

from utils import atomic_write_text, json_lines, parse_json, read_text_file, text_lines

SEED = 3535999445  # the original's split seed
ROC_VAL = "cloze_test_val__spring2016 - cloze_test_ALL_val.csv"
ROC_TEST = "cloze_test_test__spring2016 - cloze_test_ALL_test.csv"
ROC_COLUMNS = 8  # id, four sentences, ending 1, ending 2, right ending (1 or 2)
ROC_HEADER = ["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
              "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"]
ROC_HINT = ("ROCStories / Story Cloze Test (Spring 2016) is obtained from "
            "https://cs.rochester.edu/nlp/rocstories/ (free, on request).")


class DataError(ValueError):
    """A data file is missing or malformed."""


def read_text(path):
    """The text of a UTF-8 data file (a byte-order mark dropped, line ends kept as they are)."""
    return read_text_file(path, DataError, what="data file")


def read_rows(path, delimiter=",", quotes=True):
    """(line number where the row starts, cells) of each non-blank row of a delimited file.

    quotes=True reads CSV as spreadsheets write it (quoted fields may hold the delimiter, quotes and
    line breaks); quotes=False takes quotes as plain characters, so one line is one row (GLUE's TSV
    files hold unbalanced quotes, which a quote-aware reader would run across tabs and lines).
    """
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter,
                        quoting=csv.QUOTE_MINIMAL if quotes else csv.QUOTE_NONE)
    rows, line_no = [], 1
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                rows.append((line_no, row))
            line_no = reader.line_num + 1
    except csv.Error as err:
        raise DataError(f"{path}, line {reader.line_num}: {err}") from None
    return rows


def tsv_rows(path):
    """(line number, cells) of each non-blank line of a tab-separated file whose quotes are plain
    characters, read as they are used (GLUE's largest files take the memory of one line)."""
    for line_no, line in text_lines(path, DataError, what="data file"):
        if line.strip():
            yield line_no, line.split("\t")


def read_csv_rows(path, delimiter=",", quotes=True):
    """(header, [(line number, row)]) of a delimited file with a header row."""
    rows = read_rows(path, delimiter, quotes)
    if not rows:
        raise DataError(f"{path}: the file is empty; expected a header row")
    return _trim(rows[0][1]), rows[1:]


def _trim(row):
    """Drop trailing empty cells (spreadsheet exports often add them)."""
    while row and not row[-1].strip():
        row = row[:-1]
    return row


def _nonempty(path, line_no, value, what):
    value = value.strip()
    if not value:
        raise DataError(f"{path}, line {line_no}: the {what} is empty")
    return value


def _label(path, line_no, value, allowed):
    value = value.strip()
    if value not in allowed:
        raise DataError(f"{path}, line {line_no}: label {value!r} is not one of {', '.join(allowed)}")
    return allowed.index(value)


# ------------------------------------------------------------------------------------------------
# ROCStories
# ------------------------------------------------------------------------------------------------

def _rocstories(path, labelled=True):
    """Stories (four sentences joined by spaces), endings 1 and 2, labels (right ending - 1).

    With labelled=False (the test file) a file without the label column, or with empty labels,
    is accepted too; its labels are then None.
    """
    header, rows = read_csv_rows(path)
    allowed = (ROC_COLUMNS,) if labelled else (ROC_COLUMNS, ROC_COLUMNS - 1)
    if len(header) not in allowed:
        raise DataError(f"{path}, line 1: expected a header of {ROC_COLUMNS} columns (id, four sentences, two "
                        f"endings, right ending), found {len(header)}")
    n_columns = len(header)
    stories, endings1, endings2, labels = [], [], [], []
    for line_no, row in rows:
        # Empty cells past the header are dropped (spreadsheet exports add them); those within it count,
        # so an empty ending or right ending is named as such, not as a missing column.
        row = _trim(row) if len(_trim(row)) > n_columns else row[:n_columns]
        blind = len(row) == ROC_COLUMNS and not row[7].strip()  # an empty right ending (a blind test file)
        unlabelled_row = not labelled and n_columns == ROC_COLUMNS and (len(row) == ROC_COLUMNS - 1 or blind)
        if len(row) != n_columns and not unlabelled_row:
            raise DataError(f"{path}, line {line_no}: expected {n_columns} columns, found {len(row)}")
        sentences = [_nonempty(path, line_no, s, f"sentence {i + 1}") for i, s in enumerate(row[1:5])]
        stories.append(" ".join(sentences))
        endings1.append(_nonempty(path, line_no, row[5], "ending 1"))
        endings2.append(_nonempty(path, line_no, row[6], "ending 2"))
        if len(row) == ROC_COLUMNS and labelled:
            _nonempty(path, line_no, row[7], "right ending (1 or 2)")
        labels.append(_label(path, line_no, row[7], ["1", "2"]) if len(row) == ROC_COLUMNS and not blind else None)
    if not stories:
        raise DataError(f"{path}: no stories after the header")
    return stories, endings1, endings2, (None if None in labels else labels)


def _require_files(data_dir, names, hint):
    if os.path.isfile(data_dir):  # one of the files given for its folder: it exists, so not "does not exist"
        raise DataError(f"data folder {data_dir!r} is a file; --data_dir is the folder that holds: "
                        f"{', '.join(names)}. {hint}")
    if not os.path.isdir(data_dir):
        raise DataError(f"data folder {data_dir!r} does not exist; it must hold: {', '.join(names)}. {hint}")
    missing = [n for n in names if not os.path.isfile(os.path.join(data_dir, n))]
    if missing:
        raise DataError(f"{data_dir!r} lacks {', '.join(repr(n) for n in missing)}; expected: "
                        f"{', '.join(repr(n) for n in names)}. {hint}")


def rocstories(data_dir, n_train=1497, n_valid=374, seed=SEED):
    """((trX1, trX2, trX3, trY), (vaX1, vaX2, vaX3, vaY), (teX1, teX2, teX3)) as the original.

    The labelled validation file is split by scikit-learn's train_test_split(test_size=n_valid,
    random_state=seed); as in the original, n_train is not used (training gets all the rest).
    """
    _require_files(data_dir, [ROC_VAL, ROC_TEST], ROC_HINT)
    stories, comps1, comps2, ys = _rocstories(os.path.join(data_dir, ROC_VAL))
    teX1, teX2, teX3, _ = _rocstories(os.path.join(data_dir, ROC_TEST), labelled=False)
    if len(stories) <= n_valid:
        raise DataError(f"{ROC_VAL}: {len(stories)} stories, but n_valid={n_valid} must leave some for training")
    tr_s, va_s, tr_c1, va_c1, tr_c2, va_c2, tr_y, va_y = train_test_split(
        stories, comps1, comps2, ys, test_size=n_valid, random_state=seed)
    train = (tr_s, tr_c1, tr_c2, np.asarray(tr_y, dtype=np.int32))
    valid = (va_s, va_c1, va_c2, np.asarray(va_y, dtype=np.int32))
    return train, valid, (teX1, teX2, teX3)


def rocstories_test(data_dir):
    """(stories, endings 1, endings 2, labels or None) of the test file alone."""
    _require_files(data_dir, [ROC_TEST], ROC_HINT)
    *texts, labels = _rocstories(os.path.join(data_dir, ROC_TEST), labelled=False)
    return (*texts, None if labels is None else np.asarray(labels, dtype=np.int32))


def rocstories_test_labels(data_dir):
    """Labels of the test file (for analysis); None when the file has no label column."""
    return rocstories_test(data_dir)[3]


def read_story_cloze(path):
    """(stories, endings 1, endings 2) of one Story Cloze CSV file, labelled or not (labels ignored)."""
    return _rocstories(path, labelled=False)[:3]


# ------------------------------------------------------------------------------------------------
# The task formats: what a split holds once read, and one reader per format
# ------------------------------------------------------------------------------------------------

@dataclass
class Split:
    """One split as read from disk."""

    texts: tuple                 # one list of str per text field, e.g. (premises, hypotheses)
    labels: np.ndarray | None    # int64 class indices, float32 scores (STS-B), None when unlabelled
    title: str                   # how reports name it: "SST-2 Dev", "MNLI-mm Dev", "RACE Test"
    submission: str | None = None  # the GLUE server's file name ("SST-2.tsv") for a GLUE test set
    index: list | None = None    # the test file's own ids, for the submission's index column
    groups: dict | None = None   # {title: int64 indices} of parts reported on their own (RACE-m, RACE-h)
    notes: list = field(default_factory=list)  # what the reader skipped or dropped, for the caller to print
    dropped: int = 0             # rows skipped (malformed) or dropped (no gold label)

    def __len__(self):
        return len(self.texts[0])


@dataclass(frozen=True)
class Columns:
    """Where a TSV file keeps its texts, label and index: header names, or 0-based positions in a
    file without a header (then n_columns says how many columns a row has)."""

    texts: tuple
    label: str | int | None = None
    index: str | int | None = None
    n_columns: int | None = None

    @property
    def header(self):
        return self.n_columns is None


@dataclass(frozen=True)
class Source:
    """One split's files (relative to the task's folder; RACE: glob patterns), its report title,
    whether it has labels and, for a GLUE test set, the submission file name. An optional source is
    read where its files are present and skipped where they are not; optional sources sharing a key
    are alternatives (other places or layouts of one file), the first present one read."""

    key: str
    files: tuple
    title: str
    labelled: bool = True
    submission: str | None = None
    columns: Columns | None = None
    optional: bool = False


# The readers below take the task for what only it knows: label_id (a label's class or score, or an
# error naming the place), label_array, and where used skip_malformed, n_choices and title.

def _positions(path, header_row, columns, labelled):
    """Column positions of the texts, the label and the index, from the header or as declared."""
    wanted = [*columns.texts, *([columns.label] if labelled else []),
              *([columns.index] if columns.index is not None else [])]
    if not columns.header:
        return wanted, columns.n_columns
    line_no, header = header_row
    header = [h.strip() for h in header]
    missing = [w for w in wanted if w not in header]
    if missing:
        raise DataError(f"{path}, line {line_no}: the header lacks column(s) {', '.join(map(repr, missing))}; "
                        f"found {header}")
    return [header.index(w) for w in wanted], len(header)


def read_tsv_split(folder, source, task):
    """A GLUE or SciTail TSV file: texts, labels (when labelled) and the index column (when declared)."""
    path = os.path.join(folder, source.files[0])
    columns = source.columns
    rows = tsv_rows(path)
    header_row = None
    if columns.header:
        header_row = next(rows, None)
        if header_row is None:
            raise DataError(f"{path}: the file is empty; expected a header row")
    positions, n_columns = _positions(path, header_row, columns, source.labelled)
    n_text = len(columns.texts)
    texts, labels, index, skipped = [[] for _ in range(n_text)], [], [], 0
    for line_no, row in rows:
        if len(row) != n_columns:
            if task.skip_malformed:
                skipped += 1
                continue
            raise DataError(f"{path}, line {line_no}: expected {n_columns} tab-separated columns, found {len(row)}")
        for text, i in zip(texts, positions[:n_text]):
            text.append(row[i].strip())
        if source.labelled:
            labels.append(task.label_id(row[positions[n_text]], path, line_no))
        if columns.index is not None:
            index.append(row[positions[-1]].strip())
    if not texts[0]:
        raise DataError(f"{path}: no examples")
    notes = []
    if skipped:
        notes.append(f"skipped {skipped} malformed rows (not {n_columns} columns) in {path}"
                     + ("; they get no prediction" if not source.labelled else ""))
    return Split(tuple(texts), task.label_array(labels) if source.labelled else None, source.title,
                 source.submission, index or None, notes=notes, dropped=skipped)


def read_snli(folder, source, task):
    """SNLI's JSON lines; pairs whose gold_label is '-' (no annotator majority) are dropped."""
    path = os.path.join(folder, source.files[0])
    premises, hypotheses, labels, dropped = [], [], [], 0
    for line_no, line in text_lines(path, DataError, what="data file"):
        if not line.strip():
            continue
        pair = parse_json(line, path, DataError, line=line_no)
        missing = [k for k in ("sentence1", "sentence2", "gold_label") if not isinstance(pair, dict) or k not in pair]
        if missing:
            raise DataError(f"{path}, line {line_no}: expected an object with sentence1, sentence2 and gold_label; "
                            f"{', '.join(missing)} missing")
        if pair["gold_label"] == "-":
            dropped += 1
            continue
        not_text = [k for k in ("sentence1", "sentence2") if not isinstance(pair[k], str)]
        if not_text:  # null (pandas writes NaN so) or a number: str() would train on the text "None"
            raise DataError(f"{path}, line {line_no}: {', '.join(not_text)} is {json_type(pair[not_text[0]])}; "
                            "expected a string")
        labels.append(task.label_id(str(pair["gold_label"]), path, line_no))
        premises.append(pair["sentence1"].strip())
        hypotheses.append(pair["sentence2"].strip())
    if not labels:
        raise DataError(f"{path}: no labelled pairs")
    notes = [f"dropped {dropped} pairs with gold_label '-' (no majority) in {path}"] if dropped else []
    return Split((premises, hypotheses), task.label_array(labels), source.title, notes=notes, dropped=dropped)


def read_json_fields(path, names, title):
    """New inputs from JSON lines: an object per line holding a string under each of `names` (other
    keys ignored). The index of an example is its object's "index" where it has one, else its
    position among the lines (from 0)."""
    texts, index = [[] for _ in names], []
    for position, (line_no, example) in enumerate(json_lines(read_text(path), path, DataError)):
        missing = [k for k in names if not isinstance(example, dict) or k not in example]
        if missing:
            raise DataError(f"{path}, line {line_no}: expected an object with {', '.join(names)}; "
                            f"{', '.join(missing)} missing")
        not_text = [k for k in names if not isinstance(example[k], str)]
        if not_text:
            raise DataError(f"{path}, line {line_no}: {not_text[0]} is {json_type(example[not_text[0]])}; "
                            "expected a string")
        for text, name in zip(texts, names):
            text.append(example[name].strip())
        index.append(example.get("index", position))
    if not index:
        raise DataError(f"{path}: no examples")
    return Split(tuple(texts), None, title, index=index)


def json_type(value):
    """How JSON names a value's type, for errors: 'null', 'a number', 'a string' ..."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _race_questions(path, task):
    """(article, question, options, label) for each question of one RACE file."""
    doc = parse_json(read_text(path), path, DataError)
    keys = ("article", "questions", "options", "answers")
    if not isinstance(doc, dict) or any(k not in doc for k in keys):
        raise DataError(f"{path}: expected a JSON object with {', '.join(keys)}")
    # Wrong JSON types are errors here: len() of a number would crash, a string would pass as a list of
    # characters, and null would become the text "None".
    if not isinstance(doc["article"], str):
        raise DataError(f"{path}: the article is {json_type(doc['article'])}; expected a string")
    for key in keys[1:]:
        if not isinstance(doc[key], list):
            raise DataError(f"{path}: {key} is {json_type(doc[key])}; expected a list, one entry per question")
    if not len(doc["questions"]) == len(doc["options"]) == len(doc["answers"]):
        raise DataError(f"{path}: {len(doc['questions'])} questions, {len(doc['options'])} option lists and "
                        f"{len(doc['answers'])} answers; expected as many of each")
    for q, (question, options, answer) in enumerate(zip(doc["questions"], doc["options"], doc["answers"]), 1):
        if not isinstance(options, list) or len(options) != task.n_choices:
            found = len(options) if isinstance(options, list) else json_type(options)
            raise DataError(f"{path}, question {q}: expected {task.n_choices} options, found {found}")
        if not all(isinstance(text, str) for text in (question, *options)):
            raise DataError(f"{path}, question {q}: the question and its options must be strings")
        yield doc["article"], question, options, task.label_id(str(answer), path, f"question {q}")


def _race_sort_key(path):
    """RACE's files are numbered (1.txt, 2.txt, ... 10.txt): sort them by number."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def read_race(folder, source, task):
    """RACE's JSON files, middle school first, then high school; one example per question. The
    groups name each level's examples (RACE-m, RACE-h); the split's own title covers both."""
    articles, questions, options, labels, groups = [], [], [[] for _ in range(task.n_choices)], [], {}
    for pattern in source.files:
        parts = pattern.split("/")  # split/level/*.txt; one file of new inputs: its name alone
        start = len(labels)
        for path in sorted(glob.glob(os.path.join(glob.escape(folder), pattern)), key=_race_sort_key):
            for article, question, opts, label in _race_questions(path, task):
                articles.append(article.strip())
                questions.append(question.strip())
                for choice, option in zip(options, opts):
                    choice.append(option.strip())
                labels.append(label)
        if len(parts) == 3:  # "middle" or "high"
            groups[source.title.replace(task.title, f"{task.title}-{parts[1][0]}", 1)] = np.arange(start, len(labels))
    if not labels:  # files whose question lists are all empty: an empty split would fail deep in training
        raise DataError(f"{folder}: no questions in {' or '.join(source.files)}")
    return Split((articles, questions, *options), task.label_array(labels), source.title, groups=groups)


def write_submission(rows, path):
    """A submission file as GLUE's server takes it: `index<TAB>prediction` lines from (index,
    prediction) pairs under a header, written atomically."""
    atomic_write_text(path, "index\tprediction\n" + "".join(f"{i}\t{p}\n" for i, p in rows))


# ------------------------------------------------------------------------------------------------
# A user's own CSV files
# ------------------------------------------------------------------------------------------------

def _columns(path, header, wanted):
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(f"{path}, line 1: column(s) {', '.join(repr(c) for c in missing)} not in the header "
                        f"{header}")
    return [header.index(c) for c in wanted]


def _own_rows(path, wanted):
    """(header positions of `wanted`, the rows as (line number, row)) of a user's CSV; a row of the
    wrong width is an error when it is reached."""
    header, rows = read_csv_rows(path)
    idx = _columns(path, header, wanted)

    def checked():
        for line_no, row in rows:
            if len(_trim(row)) > len(header) or len(row) <= max(idx):
                raise DataError(f"{path}, line {line_no}: expected {len(header)} columns, found {len(row)}")
            yield line_no, row
    return idx, checked()


def read_classification_csv(path, text_column="text", label_column="label", labels=None):
    """(texts, label ids, label names) from a CSV with a text and a label column.

    Label names are sorted unless `labels` gives their order.
    """
    (i_text, i_label), rows = _own_rows(path, [text_column, label_column])
    texts, raw = [], []
    for line_no, row in rows:
        texts.append(_nonempty(path, line_no, row[i_text], text_column))
        raw.append((line_no, _nonempty(path, line_no, row[i_label], label_column)))
    names = list(labels) if labels is not None else sorted({r for _, r in raw})
    ids = [_label(path, line_no, r, names) for line_no, r in raw]
    return texts, np.asarray(ids, dtype=np.int32), names


def read_multiple_choice_csv(path, context_column, ending_columns, label_column):
    """(contexts, [endings of choice 1, ...], labels) from a CSV; a label is the 1-based number of
    the right ending (as ROCStories) or its column name."""
    idx, rows = _own_rows(path, [context_column, *ending_columns, label_column])
    allowed = [str(i + 1) for i in range(len(ending_columns))]
    contexts, endings, labels = [], [[] for _ in ending_columns], []
    for line_no, row in rows:
        contexts.append(_nonempty(path, line_no, row[idx[0]], context_column))
        for k, (name, i) in enumerate(zip(ending_columns, idx[1:-1])):
            endings[k].append(_nonempty(path, line_no, row[i], name))
        value = row[idx[-1]].strip()
        value = str(ending_columns.index(value) + 1) if value in ending_columns else value
        labels.append(_label(path, line_no, value, allowed))
    return contexts, endings, np.asarray(labels, dtype=np.int32)
