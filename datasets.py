"""Data sets (docs/reference.md §5): ROCStories Story Cloze with the original's files, split and
labels, and loaders for a user's own CSV files.

CSV files are read with a real CSV reader: UTF-8 with or without a byte-order mark, quoted fields
holding commas, quotes or newlines, and CRLF line ends. Errors name the file and line; every
reader gets its text from `read_text`, which names the line and column of a byte that is not UTF-8.
"""

import codecs
import csv
import io
import os
import re

import numpy as np
from sklearn.model_selection import train_test_split

SEED = 3535999445  # the original's split seed
ROC_VAL = "cloze_test_val__spring2016 - cloze_test_ALL_val.csv"
ROC_TEST = "cloze_test_test__spring2016 - cloze_test_ALL_test.csv"
ROC_COLUMNS = 8  # id, four sentences, ending 1, ending 2, right ending (1 or 2)
ROC_HINT = ("ROCStories / Story Cloze Test (Spring 2016) is obtained from "
            "https://cs.rochester.edu/nlp/rocstories/ (free, on request).")


class DataError(ValueError):
    """A data file is missing or malformed."""


def read_text(path):
    """The text of a UTF-8 data file (a byte-order mark is dropped, line ends are kept as they are).

    A byte that is not UTF-8 gives a DataError naming its line and column, as other data errors
    do; every reader of a data file should get its text here.
    """
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} not found")
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(undecodable_message(path, data, err)) from None


LINE_END = re.compile(rb"\r\n|\r|\n")  # the line ends the csv module counts


def undecodable_message(path, data, err):
    """'FILE, line L, column C: not UTF-8 text (byte 0xNN ...)' for the first bad byte of `data`."""
    line_ends = list(LINE_END.finditer(data, 0, err.start))
    line_start = line_ends[-1].end() if line_ends else 0
    column = len(data[line_start:err.start].decode("utf-8")) + 1  # characters, all valid before err.start
    return (f"{path}, line {len(line_ends) + 1}, column {column}: not UTF-8 text (byte 0x{data[err.start]:02x}: "
            f"{err.reason}); save the file as UTF-8")


def read_csv_rows(path, **reader_options):
    """(line number, row) for each non-blank row after the header, and the header.

    `reader_options` go to `csv.reader` (e.g. delimiter="\\t" for a TSV file).
    """
    reader = csv.reader(io.StringIO(read_text(path), newline=""), **reader_options)
    try:
        header = _trim(next(reader, None) or [])
        if not header:
            raise DataError(f"{path}: the file is empty; expected a header row")
        rows = []
        line_no = reader.line_num + 1
        for row in reader:
            if any(cell.strip() for cell in row):
                rows.append((line_no, row))
            line_no = reader.line_num + 1
    except csv.Error as err:
        raise DataError(f"{path}, line {reader.line_num}: {err}") from None
    return header, rows


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


def rocstories_test_labels(data_dir):
    """Labels of the test file (for analysis); None when the file has no label column."""
    labels = _rocstories(os.path.join(data_dir, ROC_TEST), labelled=False)[3]
    return None if labels is None else np.asarray(labels, dtype=np.int32)


# ------------------------------------------------------------------------------------------------
# A user's own CSV files
# ------------------------------------------------------------------------------------------------

def _columns(path, header, wanted):
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(f"{path}, line 1: column(s) {', '.join(repr(c) for c in missing)} not in the header "
                        f"{header}")
    return [header.index(c) for c in wanted]


def read_classification_csv(path, text_column="text", label_column="label", labels=None):
    """(texts, label ids, label names) from a CSV with a text and a label column.

    Label names are sorted unless `labels` gives their order.
    """
    header, rows = read_csv_rows(path)
    i_text, i_label = _columns(path, header, [text_column, label_column])
    texts, raw = [], []
    for line_no, row in rows:
        if len(_trim(row)) > len(header) or len(row) <= max(i_text, i_label):
            raise DataError(f"{path}, line {line_no}: expected {len(header)} columns, found {len(row)}")
        texts.append(_nonempty(path, line_no, row[i_text], text_column))
        raw.append((line_no, _nonempty(path, line_no, row[i_label], label_column)))
    names = list(labels) if labels is not None else sorted({r for _, r in raw})
    ids = [_label(path, line_no, r, names) for line_no, r in raw]
    return texts, np.asarray(ids, dtype=np.int32), names


def read_multiple_choice_csv(path, context_column, ending_columns, label_column):
    """(contexts, [endings of choice 1, ...], labels) from a CSV; a label is the 1-based number of
    the right ending (as ROCStories) or its column name."""
    header, rows = read_csv_rows(path)
    idx = _columns(path, header, [context_column, *ending_columns, label_column])
    allowed = [str(i + 1) for i in range(len(ending_columns))]
    contexts, endings, labels = [], [[] for _ in ending_columns], []
    for line_no, row in rows:
        if len(_trim(row)) > len(header) or len(row) <= max(idx):
            raise DataError(f"{path}, line {line_no}: expected {len(header)} columns, found {len(row)}")
        contexts.append(_nonempty(path, line_no, row[idx[0]], context_column))
        for k, (name, i) in enumerate(zip(ending_columns, idx[1:-1])):
            endings[k].append(_nonempty(path, line_no, row[i], name))
        value = row[idx[-1]].strip()
        value = str(ending_columns.index(value) + 1) if value in ending_columns else value
        labels.append(_label(path, line_no, value, allowed))
    return contexts, endings, np.asarray(labels, dtype=np.int32)


# ------------------------------------------------------------------------------------------------
# A synthetic, learnable story-cloze set in the real ROCStories format (demo, tests, benchmarks)
# ------------------------------------------------------------------------------------------------

ROC_HEADER = ["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
              "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"]
_NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack", "Kate", "Leo"]
_PLACES = ["market", "park", "library", "beach", "station", "school", "museum", "garden", "bakery", "harbor"]
_THINGS = ["a red kite", "an old book", "a new bike", "a small cake", "a blue hat", "a warm coat", "a puppy"]
_FILLERS = ["It was a cold morning in the middle of the week", "The streets were busy and loud that day",
            "Everyone in town seemed to be out and about", "The sun was shining over the quiet little town",
            "A light rain had fallen during the night before", "Nobody expected anything unusual to happen"]
_GOOD = (["happy", "glad", "proud", "excited", "thrilled"],
         ["{n} smiled and thanked everyone.", "{n} laughed and hugged a friend.", "{n} cheered with joy.",
          "{n} decided it was the best day ever.", "{n} danced all the way home."])
_BAD = (["sad", "upset", "angry", "lonely", "scared"],
        ["{n} cried quietly on the way home.", "{n} yelled and slammed the door.", "{n} sighed and gave up.",
         "{n} decided it was the worst day ever.", "{n} sulked alone for hours."])
_ODD = ["{n} flew to the moon on a silver spoon.", "{n} turned into a purple fish.",
        "{n} ate the whole station for lunch.", "{n} married a cloud in the sky.", "{n} grew wings and became a clock."]


def synthetic_story(rng):
    """One story. The right ending matches the mood stated in the last sentence; the wrong ending
    has the other mood (half the stories: telling needs the story) or is absurd (the other half,
    as real ROCStories' wrong endings are often implausible on their own)."""
    name = rng.choice(_NAMES)
    good = rng.random() < 0.5
    moods, endings = _GOOD if good else _BAD
    _, other_endings = _BAD if good else _GOOD
    place, thing = rng.choice(_PLACES), rng.choice(_THINGS)
    filler = rng.choice(_FILLERS)
    sentences = [f"{filler}, so {name} walked to the {place}.", f"There {name} saw {thing} for sale.",
                 f"{name} thought about it for a long time before deciding what to do.",
                 f"In the end {name} felt very {rng.choice(moods)}."]
    wrong = rng.choice(other_endings if rng.random() < 0.5 else _ODD)
    right, wrong = rng.choice(endings).format(n=name), wrong.format(n=name)
    label = 1 if rng.random() < 0.5 else 2
    ending1, ending2 = (right, wrong) if label == 1 else (wrong, right)
    return sentences, ending1, ending2, label


def write_synthetic_rocstories(data_dir, n_val=1871, n_test=1871, seed=0):
    """Write both ROCStories files (the real names and columns) with synthetic stories."""
    import random
    import uuid

    rng = random.Random(seed)
    os.makedirs(data_dir, exist_ok=True)
    for name, n in ((ROC_VAL, n_val), (ROC_TEST, n_test)):
        with open(os.path.join(data_dir, name), "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(ROC_HEADER)
            for _ in range(n):
                sentences, e1, e2, label = synthetic_story(rng)
                writer.writerow([str(uuid.UUID(int=rng.getrandbits(128))), *sentences, e1, e2, label])
    return data_dir
