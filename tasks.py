"""The paper's fine-tuning tasks (its Tables 2-4), each declared once: where its files are and how
they are read, how an example becomes token sequences (the paper's Figure 1), which head and loss
train it, which metrics report it, and what a submission holds. ROCStories is declared here too,
with the original's own split and cut rule (`RocStoriesTask`).

Splits. `Task.read` returns 'train', then 'valid', the split that selects the kept parameters, then
the splits reported at the end, in report order. For every task 'valid' is the dev set: GLUE keeps
its test labels private, so a GLUE test set is only predicted, into the file the GLUE server wants;
SNLI, SciTail and RACE publish theirs, so their test accuracy is reported. MNLI has two dev sets:
'valid' is the matched one, 'valid_mm' the mismatched one (reported, not used for selection).

Input transformations (Figure 1), with the specials `_start_`, `_delimiter_`, `_classify_`:
    text classification  [start] text [classify]                            1 sequence per example
    entailment           [start] premise [delimiter] hypothesis [classify]  1 sequence
    similarity           [start] a [delimiter] b [classify] and [start] b [delimiter] a [classify]
                         (both orderings; the head adds their classify states)   2 sequences
    multiple choice      [start] context [delimiter] answer_k [classify]    1 per answer
                         (RACE: the context is the article followed by the question)

Cut rule. A sequence holds at most max_tokens tokens, specials included (max_tokens is n_ctx, at
most 512). When an example is longer, every text keeps its first tokens and tokens are taken from
the end of the example's longest text until the longest sequence of the example fits: the texts
longer than some length L are cut to L (a few to L + 1, earlier texts first) and shorter texts stay
whole. So RACE's article is cut first and its question and answers stay whole; an entailment pair
loses from its longer sentence. All sequences of an example (both orderings, every answer) get the
same cut. The specials are never cut: every sequence ends in `_classify_`.
"""

import csv
import glob
import io
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

import datasets
from datasets import DataError, read_text  # every reader decodes through it: undecodable bytes by line and column

# ------------------------------------------------------------------------------------------------
# Special tokens
# ------------------------------------------------------------------------------------------------


@dataclass
class Specials:
    n_vocab: int
    start: int
    delimiter: int
    clf_token: int
    n_special: int = 3


SPECIAL_TOKENS = ("_start_", "_delimiter_", "_classify_")  # the rows a fine-tune adds, in id order


def add_specials(text_encoder):
    """Append `_start_`, `_delimiter_`, `_classify_` to the encoder (ids n_vocab, +1, +2)."""
    encoder = text_encoder.encoder
    n_vocab = len(encoder)
    for name in SPECIAL_TOKENS:
        encoder[name] = len(encoder)
    return Specials(n_vocab, encoder["_start_"], encoder["_delimiter_"], encoder["_classify_"])


# ------------------------------------------------------------------------------------------------
# Reading files
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


def read_tsv(path):
    """(line number, cells) for each non-blank line of a tab-separated file.

    Quotes are plain characters (csv.QUOTE_NONE): MNLI and QQP texts hold unbalanced quotes, which a
    quote-aware reader would run across tabs and lines. So one line is one row.
    """
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    rows = []
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                rows.append((reader.line_num, row))
    except csv.Error as err:
        raise DataError(f"{path}, line {reader.line_num}: {err}") from None
    return rows


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
    whether it has labels and, for a GLUE test set, the submission file name."""

    key: str
    files: tuple
    title: str
    labelled: bool = True
    submission: str | None = None
    columns: Columns | None = None


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


def _read_tsv_split(folder, source, task):
    """A GLUE or SciTail TSV file: texts, labels (when labelled) and the index column (when declared)."""
    path = os.path.join(folder, source.files[0])
    columns = source.columns
    rows = read_tsv(path)
    if columns.header:
        if not rows:
            raise DataError(f"{path}: the file is empty; expected a header row")
        header_row, rows = rows[0], rows[1:]
    else:
        header_row = None
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


def _read_snli(folder, source, task):
    """SNLI's JSON lines; pairs whose gold_label is '-' (no annotator majority) are dropped."""
    path = os.path.join(folder, source.files[0])
    premises, hypotheses, labels, dropped = [], [], [], 0
    for line_no, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {line_no}: not a JSON object ({err.msg})") from None
        missing = [k for k in ("sentence1", "sentence2", "gold_label") if not isinstance(pair, dict) or k not in pair]
        if missing:
            raise DataError(f"{path}, line {line_no}: expected an object with sentence1, sentence2 and gold_label; "
                            f"{', '.join(missing)} missing")
        if pair["gold_label"] == "-":
            dropped += 1
            continue
        not_text = [k for k in ("sentence1", "sentence2") if not isinstance(pair[k], str)]
        if not_text:  # null (pandas writes NaN so) or a number: str() would train on the text "None"
            raise DataError(f"{path}, line {line_no}: {', '.join(not_text)} is {_json_type(pair[not_text[0]])}; "
                            "expected a string")
        labels.append(task.label_id(str(pair["gold_label"]), path, line_no))
        premises.append(str(pair["sentence1"]).strip())
        hypotheses.append(str(pair["sentence2"]).strip())
    if not labels:
        raise DataError(f"{path}: no labelled pairs")
    notes = [f"dropped {dropped} pairs with gold_label '-' (no majority) in {path}"] if dropped else []
    return Split((premises, hypotheses), task.label_array(labels), source.title, notes=notes, dropped=dropped)


def _race_questions(path, task):
    """(article, question, options, label) for each question of one RACE file."""
    try:
        doc = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: not a JSON object ({err.msg})") from None
    keys = ("article", "questions", "options", "answers")
    if not isinstance(doc, dict) or any(k not in doc for k in keys):
        raise DataError(f"{path}: expected a JSON object with {', '.join(keys)}")
    # Wrong JSON types are errors here: len() of a number would crash, a string would pass as a list of
    # characters, and null would become the text "None".
    if not isinstance(doc["article"], str):
        raise DataError(f"{path}: the article is {_json_type(doc['article'])}; expected a string")
    for key in keys[1:]:
        if not isinstance(doc[key], list):
            raise DataError(f"{path}: {key} is {_json_type(doc[key])}; expected a list, one entry per question")
    if not len(doc["questions"]) == len(doc["options"]) == len(doc["answers"]):
        raise DataError(f"{path}: {len(doc['questions'])} questions, {len(doc['options'])} option lists and "
                        f"{len(doc['answers'])} answers; expected as many of each")
    for q, (question, options, answer) in enumerate(zip(doc["questions"], doc["options"], doc["answers"]), 1):
        if not isinstance(options, list) or len(options) != task.n_choices:
            found = len(options) if isinstance(options, list) else _json_type(options)
            raise DataError(f"{path}, question {q}: expected {task.n_choices} options, found {found}")
        if not all(isinstance(text, str) for text in (question, *options)):
            raise DataError(f"{path}, question {q}: the question and its options must be strings")
        yield doc["article"], question, options, task.label_id(str(answer), path, f"question {q}")


def _json_type(value):
    """How JSON names a value's type, for errors: 'null', 'a number', 'a string' ..."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _race_sort_key(path):
    """RACE's files are numbered (1.txt, 2.txt, ... 10.txt): sort them by number."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def _read_race(folder, source, task):
    """RACE's JSON files, middle school first, then high school; one example per question. The
    groups name each level's examples (RACE-m, RACE-h); the split's own title covers both."""
    articles, questions, options, labels, groups = [], [], [[] for _ in range(task.n_choices)], [], {}
    for pattern in source.files:
        level = pattern.split("/")[1]  # "middle" or "high"
        start = len(labels)
        for path in sorted(glob.glob(os.path.join(glob.escape(folder), pattern)), key=_race_sort_key):
            for article, question, opts, label in _race_questions(path, task):
                articles.append(str(article).strip())
                questions.append(str(question).strip())
                for choice, option in zip(options, opts):
                    choice.append(str(option).strip())
                labels.append(label)
        groups[source.title.replace(task.title, f"{task.title}-{level[0]}", 1)] = np.arange(start, len(labels))
    if not labels:  # files whose question lists are all empty: an empty split would fail deep in training
        raise DataError(f"{folder}: no questions in {' or '.join(source.files)}")
    return Split((articles, questions, *options), task.label_array(labels), source.title, groups=groups)


# ------------------------------------------------------------------------------------------------
# Metrics (percent, as the paper prints them)
# ------------------------------------------------------------------------------------------------


def accuracy(labels, predicted):
    return 100.0 * accuracy_score(labels, predicted)


def mcc(labels, predicted):
    return 100.0 * matthews_corrcoef(labels, predicted)


def f1(labels, predicted):
    """F1 of the positive class (1: paraphrase, duplicate), as GLUE reports MRPC and QQP."""
    return 100.0 * f1_score(labels, predicted, zero_division=0.0)


def _correlation(fn, labels, scores):
    """0 where the correlation is undefined (constant scores), as scikit-learn's MCC does."""
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if len(labels) < 2 or np.ptp(labels) == 0 or np.ptp(scores) == 0:
        return 0.0
    return 100.0 * float(fn(labels, scores)[0])


def pearson(labels, scores):
    return _correlation(pearsonr, labels, scores)


def spearman(labels, scores):
    return _correlation(spearmanr, labels, scores)


METRICS = {"Accuracy": accuracy, "MCC": mcc, "F1": f1, "Pearson": pearson, "Spearman": spearman}
ON_SCORES = ("Pearson", "Spearman")  # the others compare predicted classes


# ------------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------------

FORMS = ("text", "pair", "both_orders", "choices")
LOSSES = ("cross_entropy", "binary_cross_entropy", "squared_error")


@dataclass(frozen=True)
class Task:
    """One task of the paper: its data, its input transformation, head, loss, metrics, submission.

    head is DoubleHeadModel's task_head_type; loss is 'cross_entropy' (class logits), 'squared_error'
    (STS-B: the similarity head regresses the 0-5 score itself) or 'binary_cross_entropy' (MRPC,
    QQP: the similarity head gives one logit, that of class 1; with two classes a softmax over two
    logits equals a sigmoid of their difference, so this is the paper's classifier with one
    redundant parameter row removed).
    """

    cut_rule = "longer examples are cut by the rule in docs/tasks.md"  # for messages about --n_ctx

    name: str                  # the --dataset value
    title: str                 # the report name: "SST-2"
    folder: str                # the folder as distributed: "SST-2", "snli_1.0", "SciTailV1.1", "RACE"
    form: str                  # one of FORMS: which input transformation
    head: object
    loss: str
    label_names: tuple | None  # label strings in id order (None: a score)
    metric_names: tuple        # the first selects the kept parameters
    sources: tuple             # Source per split, in the order `read` returns them
    reader: Callable           # (folder, source, task) -> Split
    obtain: str                # where the data set is obtained
    n_choices: int = 1         # answers per example (multiple choice)
    skip_malformed: bool = False  # QQP: rows with the wrong number of columns are skipped, and counted
    score_range: tuple | None = None  # STS-B: the allowed scores

    def __post_init__(self):
        if self.form not in FORMS or self.loss not in LOSSES:
            raise ValueError(f"{self.name}: form {self.form!r} must be one of {FORMS}, "
                             f"loss {self.loss!r} one of {LOSSES}")

    # -- data --------------------------------------------------------------------------------------
    def locate(self, data_dir):
        """The task's folder: data_dir itself, or the folder as distributed inside it.

        When neither holds every file, the error names what the task's folder inside data_dir lacks
        if data_dir holds none of the files itself (a parent folder with a half-copied task folder):
        listing every file as missing from the parent would hide the one that is.
        """
        candidates = [data_dir, os.path.join(data_dir, self.folder)]
        for folder in candidates:
            if all(glob.glob(os.path.join(glob.escape(folder), f)) for s in self.sources for f in s.files):
                return folder
        expected = [f for s in self.sources for f in s.files]
        def lacks(folder):
            return [f for f in expected if not glob.glob(os.path.join(glob.escape(folder), f))]

        folder, missing = data_dir, lacks(data_dir)
        if len(missing) == len(expected) and os.path.isdir(candidates[1]):
            folder, missing = candidates[1], lacks(candidates[1])
        if os.path.isfile(folder):  # a data file given for its folder: it exists, so not "does not exist"
            where = "is a file; --data_dir is the folder that holds the files"
        elif not os.path.isdir(folder):
            where = "does not exist"
        else:
            where = f"lacks {', '.join(missing)}"
        raise DataError(f"{folder!r} is not the {self.title} folder: it {where}. Expected {', '.join(expected)} "
                        f"(in the folder {self.folder}/ as distributed, or in a folder holding {self.folder}/). "
                        f"{self.obtain}")

    def read(self, data_dir):
        """{'train': Split, 'valid': Split (selects the kept parameters), then the report splits}."""
        folder = self.locate(data_dir)
        return {s.key: self.reader(folder, s, self) for s in self.sources}

    def label_id(self, value, path, where):
        """A label's class index (or score), or a DataError naming the file and line."""
        value = value.strip()
        if self.label_names is not None:
            if value not in self.label_names:
                raise DataError(f"{path}, {_where(where)}: label {value!r} is not one of {', '.join(self.label_names)}")
            return self.label_names.index(value)
        low, high = self.score_range
        try:
            score = float(value)
        except ValueError:
            score = None
        if score is None or not low <= score <= high:
            raise DataError(f"{path}, {_where(where)}: score {value!r} is not a number from {low:g} to {high:g}")
        return score

    def label_array(self, labels):
        return np.asarray(labels, dtype=np.int64 if self.label_names is not None else np.float32)

    # -- input transformation ---------------------------------------------------------------------
    @property
    def n_sequences(self):
        """Sequences per example: the choices axis of X."""
        return {"text": 1, "pair": 1, "both_orders": 2, "choices": self.n_choices}[self.form]

    def sequences(self, encoded_texts, specials, max_tokens):
        """(per example, per sequence, the token ids with specials; the number of examples cut).

        encoded_texts holds one list of token-id lists per text field, as Split.texts.
        """
        n_specials = 2 if self.form == "text" else 3
        if max_tokens < n_specials:
            raise ValueError(f"max_tokens={max_tokens} cannot hold the {n_specials} special tokens")
        n_alternatives = self.n_choices if self.form == "choices" else 0
        out, n_cut = [], 0
        for fields in zip(*encoded_texts):
            lengths = [len(f) for f in fields]
            kept = fit_lengths(lengths, n_alternatives, max_tokens - n_specials)
            n_cut += kept != lengths
            out.append(self._build([f[:n] for f, n in zip(fields, kept)], specials))
        return out, n_cut

    def _build(self, fields, s):
        if self.form == "text":
            return [[s.start, *fields[0], s.clf_token]]
        if self.form == "pair":
            return [[s.start, *fields[0], s.delimiter, *fields[1], s.clf_token]]
        if self.form == "both_orders":
            a, b = fields
            return [[s.start, *a, s.delimiter, *b, s.clf_token], [s.start, *b, s.delimiter, *a, s.clf_token]]
        context = [t for f in fields[:-self.n_choices] for t in f]
        return [[s.start, *context, s.delimiter, *answer, s.clf_token] for answer in fields[-self.n_choices:]]

    # -- outputs ----------------------------------------------------------------------------------
    def _check_logits(self, logits):
        logits = np.asarray(logits)
        if self.loss == "cross_entropy":
            n_out = self.n_choices if self.form == "choices" else len(self.label_names)
            ok, shape = logits.ndim == 2 and logits.shape[1] == n_out, f"[n, {n_out}]"
        else:
            ok, shape = logits.ndim == 1, "[n]"
        if not ok:
            raise ValueError(f"{self.title}: logits of shape {list(logits.shape)}; expected {shape}")
        return logits

    def classes(self, logits):
        """Predicted class indices: the largest logit, or logit > 0 for one binary logit."""
        logits = self._check_logits(logits)
        if self.loss == "binary_cross_entropy":
            return (logits > 0).astype(np.int64)
        return logits.argmax(-1)

    def metrics(self, logits, labels):
        """{metric name: value in percent}, in the paper's order; the first selects parameters."""
        logits = self._check_logits(logits)
        out = {}
        for name in self.metric_names:
            predicted = logits if name in ON_SCORES else self.classes(logits)
            out[name] = float(METRICS[name](labels, predicted))
        return out

    def predictions(self, logits):
        """Submission values: label names (GLUE's 0/1 where its labels are digits), STS-B a score."""
        logits = self._check_logits(logits)
        if self.label_names is None:
            return [f"{score:.3f}" for score in logits.tolist()]
        return [self.label_names[c] for c in self.classes(logits).tolist()]

    def report(self, split, logits):
        """[(title, metrics)] for a labelled split: its groups first (RACE-m, RACE-h), then all."""
        parts = [(title, idx) for title, idx in (split.groups or {}).items()] + [(split.title, None)]
        logits = np.asarray(logits)
        return [(title, self.metrics(logits if idx is None else logits[idx],
                                     split.labels if idx is None else split.labels[idx]))
                for title, idx in parts if idx is None or len(idx)]

    def losses(self, logits, labels):
        """Per-example task losses (torch), for the task's loss."""
        import torch.nn.functional as F

        if self.loss == "cross_entropy":
            return F.cross_entropy(logits, labels.long(), reduction="none")
        if self.loss == "binary_cross_entropy":
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        return (logits - labels.to(logits.dtype)) ** 2


def _where(where):
    return f"line {where}" if isinstance(where, int) else where


def report_lines(task, split, logits):
    """Lines like 'SST-2 Dev Accuracy: 91.30', one per metric of each reported part."""
    return [f"{title} {name}: {value:.2f}"
            for title, values in task.report(split, logits) for name, value in values.items()]


def fit_lengths(lengths, n_alternatives, budget):
    """The cut rule (module docstring) on lengths: the first texts are shared by every sequence of an
    example, the last n_alternatives go one to a sequence (the answers). Returns the kept lengths."""
    shared, alternatives = lengths[:len(lengths) - n_alternatives], lengths[len(lengths) - n_alternatives:]

    def total(cap):
        return sum(min(n, cap) for n in shared) + max((min(n, cap) for n in alternatives), default=0)

    longest = max(lengths, default=0)
    if total(longest) <= budget:
        return list(lengths)
    low, high = 0, longest  # total(low) <= budget < total(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if total(mid) <= budget else (low, mid)
    kept = [min(n, low) for n in lengths]
    slack = budget - total(low)  # fewer than the texts longer than low: give them one more, in order
    for i, n in enumerate(shared):
        if slack and n > low:
            kept[i], slack = low + 1, slack - 1
    if slack and any(n > low for n in alternatives):
        kept[len(shared):] = [low + 1 if n > low else n for n in alternatives]
    return kept


def to_arrays(seqs, n_ctx, specials):
    """X int64 [n, n_sequences, n_ctx, 2] (token ids; position rows n_vocab + n_special + t) and the
    mask M float32 [n, n_sequences, n_ctx], zero-padded."""
    if not seqs:
        raise ValueError("no examples")
    n_seq = len(seqs[0])
    X = np.zeros((len(seqs), n_seq, n_ctx, 2), dtype=np.int64)
    M = np.zeros((len(seqs), n_seq, n_ctx), dtype=np.float32)
    for i, example in enumerate(seqs):
        if len(example) != n_seq:
            raise ValueError(f"example {i} has {len(example)} sequences; example 0 has {n_seq}")
        for j, seq in enumerate(example):
            if len(seq) > n_ctx:
                raise ValueError(f"example {i}, sequence {j}: {len(seq)} tokens do not fit n_ctx={n_ctx}")
            X[i, j, :len(seq), 0] = seq
            M[i, j, :len(seq)] = 1
    X[..., 1] = specials.n_vocab + specials.n_special + np.arange(n_ctx)
    return X, M


# ------------------------------------------------------------------------------------------------
# The declarations
# ------------------------------------------------------------------------------------------------

GLUE_OBTAIN = ("GLUE is obtained from https://gluebenchmark.com/tasks (its download script writes these "
               "folders; test predictions are scored by its server).")
ENTAILMENT = ("entailment", "not_entailment")
NLI = ("entailment", "neutral", "contradiction")
BINARY = ("0", "1")


def _glue(name, title, form, head, loss, labels, metrics, texts, label, index="index", test_texts=None,
          headerless=None, **extra):
    """A GLUE task with train.tsv, dev.tsv (selects the kept parameters) and test.tsv (submitted)."""
    labelled = Columns(*headerless) if headerless else Columns(texts, label)
    test = Columns(test_texts or texts, index=index)
    sources = (Source("train", ("train.tsv",), f"{title} Train", columns=labelled),
               Source("valid", ("dev.tsv",), f"{title} Dev", columns=labelled),
               Source("test", ("test.tsv",), f"{title} Test", labelled=False, submission=f"{title}.tsv", columns=test))
    return Task(name, title, title, form, head, loss, labels, metrics, sources, _read_tsv_split, GLUE_OBTAIN, **extra)


def _mnli_task():
    texts = ("sentence1", "sentence2")
    labelled, test = Columns(texts, "gold_label"), Columns(texts, index="index")
    sources = (Source("train", ("train.tsv",), "MNLI Train", columns=labelled),
               Source("valid", ("dev_matched.tsv",), "MNLI-m Dev", columns=labelled),
               Source("valid_mm", ("dev_mismatched.tsv",), "MNLI-mm Dev", columns=labelled),
               Source("test", ("test_matched.tsv",), "MNLI-m Test", False, "MNLI-m.tsv", test),
               Source("test_mm", ("test_mismatched.tsv",), "MNLI-mm Test", False, "MNLI-mm.tsv", test))
    return Task("mnli", "MNLI", "MNLI", "pair", "inference", "cross_entropy", NLI, ("Accuracy",), sources,
                _read_tsv_split, GLUE_OBTAIN)


def _snli_task():
    sources = tuple(Source(key, (f"snli_1.0_{part}.jsonl",), f"SNLI {part.title()}")
                    for key, part in (("train", "train"), ("valid", "dev"), ("test", "test")))
    return Task("snli", "SNLI", "snli_1.0", "pair", "inference", "cross_entropy", NLI, ("Accuracy",), sources,
                _read_snli, "SNLI 1.0 is obtained from https://nlp.stanford.edu/projects/snli/ (snli_1.0.zip).")


def _scitail_task():
    columns = Columns((0, 1), 2, n_columns=3)
    sources = tuple(Source(key, (f"tsv_format/scitail_1.0_{part}.tsv",), f"SciTail {part.title()}", columns=columns)
                    for key, part in (("train", "train"), ("valid", "dev"), ("test", "test")))
    return Task("scitail", "SciTail", "SciTailV1.1", "pair", ("classification", 2), "cross_entropy",
                ("entails", "neutral"), ("Accuracy",), sources, _read_tsv_split,
                "SciTail 1.1 is obtained from https://allenai.org/data/scitail (SciTailV1.1.zip).")


def _race_task():
    sources = tuple(Source(key, (f"{part}/middle/*.txt", f"{part}/high/*.txt"), f"RACE {part.title()}")
                    for key, part in (("train", "train"), ("valid", "dev"), ("test", "test")))
    return Task("race", "RACE", "RACE", "choices", "multiple_choice", "cross_entropy", ("A", "B", "C", "D"),
                ("Accuracy",), sources, _read_race,
                "RACE is obtained from https://www.cs.cmu.edu/~glai1/data/race/ (non-commercial research use only).",
                n_choices=4)


def _declarations():
    clf2 = ("classification", 2)
    return [
        _glue("sst2", "SST-2", "text", clf2, "cross_entropy", BINARY, ("Accuracy",), ("sentence",), "label"),
        _glue("cola", "CoLA", "text", clf2, "cross_entropy", BINARY, ("MCC",), ("sentence",), None,
              headerless=((3,), 1, None, 4)),
        _glue("mrpc", "MRPC", "both_orders", "similarity", "binary_cross_entropy", BINARY, ("F1", "Accuracy"),
              ("#1 String", "#2 String"), "Quality"),
        _glue("qqp", "QQP", "both_orders", "similarity", "binary_cross_entropy", BINARY, ("F1", "Accuracy"),
              ("question1", "question2"), "is_duplicate", index="id", skip_malformed=True),
        _glue("stsb", "STS-B", "both_orders", "similarity", "squared_error", None, ("Pearson", "Spearman"),
              ("sentence1", "sentence2"), "score", score_range=(0.0, 5.0)),
        _mnli_task(),
        _glue("qnli", "QNLI", "pair", clf2, "cross_entropy", ENTAILMENT, ("Accuracy",), ("question", "sentence"),
              "label"),
        _glue("rte", "RTE", "pair", clf2, "cross_entropy", ENTAILMENT, ("Accuracy",), ("sentence1", "sentence2"),
              "label"),
        _snli_task(),
        _scitail_task(),
        _race_task(),
    ]


@dataclass(frozen=True)
class RocStoriesTask(Task):
    """Story Cloze as OpenAI's script runs it (docs/reference.md §5): n_valid stories of the labelled
    file held out with the original's seed, the rest trained on; the test file predicted into
    ROCStories.tsv (0 or 1: the index of the right ending); story and each ending cut to
    max_tokens // 2 - 2 tokens apiece."""

    cut_rule = "the story and each ending are cut to n_ctx // 2 - 2 tokens, as the original does"
    n_valid: int = 374

    def read(self, data_dir):
        train, valid, test = datasets.rocstories(data_dir, n_valid=self.n_valid)
        test_labels = datasets.rocstories_test_labels(data_dir)
        return {"train": Split(tuple(train[:3]), train[3].astype(np.int64), "ROCStories Train"),
                "valid": Split(tuple(valid[:3]), valid[3].astype(np.int64), "ROCStories Valid"),
                "test": Split(tuple(test), None if test_labels is None else test_labels.astype(np.int64),
                              "ROCStories Test", submission="ROCStories.tsv")}

    def sequences(self, encoded_texts, specials, max_tokens):
        max_len = max_tokens // 2 - 2
        if max_len < 1:
            raise ValueError(f"n_ctx={max_tokens} is too small for a story and an ending")
        out, n_cut = [], 0
        for story, *endings in zip(*encoded_texts):
            n_cut += max(len(story), *map(len, endings)) > max_len
            out.append([[specials.start, *story[:max_len], specials.delimiter, *ending[:max_len], specials.clf_token]
                        for ending in endings])
        return out, n_cut


def _rocstories_task():
    sources = (Source("train", (datasets.ROC_VAL,), "ROCStories Valid"),
               Source("test", (datasets.ROC_TEST,), "ROCStories Test", labelled=False, submission="ROCStories.tsv"))
    return RocStoriesTask("rocstories", "ROCStories", ".", "choices", "multiple_choice", "cross_entropy", ("0", "1"),
                          ("Accuracy",), sources, None, datasets.ROC_HINT, n_choices=2)


TASKS = {task.name: task for task in [_rocstories_task(), *_declarations()]}


@dataclass(frozen=True)
class LanguageModelTask:
    """Language modelling on a user's plain text, with the paper's pre-training recipe (`--dataset lm`).

    Files: every `*.txt` under the folder (sorted by path), or `train.txt` and `valid.txt` where both
    exist. Each non-blank line is encoded on its own and the ids are joined into one stream per split,
    cut into contiguous sequences of n_ctx tokens (the last, partial one is dropped). Without
    `valid.txt` the last `valid_fraction` of the lines (by characters, at least one line) is held out
    for validation. The metric is perplexity: exp of the mean next-token loss.
    """

    cut_rule = "the text is cut into sequences of n_ctx tokens"
    name: str = "lm"
    title: str = "LM"
    metric_names: tuple = ("Perplexity",)
    valid_fraction: float = 0.05
    n_sequences: int = 1

    def files(self, data_dir):
        train, valid = os.path.join(data_dir, "train.txt"), os.path.join(data_dir, "valid.txt")
        if os.path.isfile(train) and os.path.isfile(valid):
            return [train], [valid]
        found = sorted(glob.glob(os.path.join(glob.escape(data_dir), "**", "*.txt"), recursive=True))
        if not found:
            where = ("is a file, not a folder" if os.path.isfile(data_dir) else
                     "does not exist" if not os.path.isdir(data_dir) else "holds no *.txt file")
            raise DataError(f"{data_dir!r} {where}: --dataset lm reads plain text files (*.txt, UTF-8), or "
                            "train.txt and valid.txt")
        return found, []

    def read(self, data_dir):
        train_files, valid_files = self.files(data_dir)
        lines = lambda files: [line.strip() for path in files for line in read_text(path).splitlines()
                               if line.strip()]
        train, valid = lines(train_files), lines(valid_files)
        if not valid_files:
            total, held, cut = sum(map(len, train)), 0, len(train)
            while cut > 1 and held < self.valid_fraction * total:
                cut -= 1
                held += len(train[cut])
            train, valid = train[:cut], train[cut:]
        if not train or not valid:
            raise DataError(f"{data_dir}: too little text for a training and a validation part")
        return {"train": Split((train,), None, "LM Train"), "valid": Split((valid,), None, "LM Valid")}

    def sequences(self, encoded_texts, specials, max_tokens):
        """Contiguous n_ctx-token pieces of the split's id stream: ([[piece]] per example, 0 cut)."""
        stream = [i for ids in encoded_texts[0] for i in ids]
        n = len(stream) // max_tokens
        if n == 0:
            raise ValueError(f"a split holds {len(stream)} tokens, fewer than one sequence of {max_tokens}")
        return [[stream[k * max_tokens:(k + 1) * max_tokens]] for k in range(n)], 0

    def metrics(self, mean_loss):
        return {"Perplexity": float(np.exp(mean_loss))}


LANGUAGE_MODEL = LanguageModelTask()


def get_task(name):
    if name == LANGUAGE_MODEL.name:
        return LANGUAGE_MODEL
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}, lm")
    return TASKS[name]


# ------------------------------------------------------------------------------------------------
# Synthetic, learnable data in each task's real layout and quirks (tests, demos)
# ------------------------------------------------------------------------------------------------

_NAMES = ["anna", "ben", "carla", "david", "emma", "frank", "grace", "henry"]
_NOUNS = ["film", "story", "cast", "plot", "script", "ending", "music", "acting"]
_THINGS = ["bike", "book", "cake", "hat", "coat", "kite", "lamp", "chair"]
_PLACES = ["market", "park", "library", "beach", "station", "school", "museum", "garden"]
_FILLERS = ["all the way through", "from start to finish", "for most of its length", "in every scene"]
# Label-bearing words: each class of each task has its own.
_CUES = {
    "sst2": (["boring", "dull", "awful", "tedious"], ["wonderful", "charming", "brilliant", "moving"]),
    "cola": (["eated", "goed", "seed", "buyed"], ["ate", "went", "saw", "bought"]),
    "mrpc": (["denied", "doubted", "disputed"], ["stated", "reported", "confirmed"]),
    "qqp": (["cheapest", "fastest", "oldest"], ["best", "easiest", "simplest"]),
    "nli": (["definitely", "certainly", "surely"], ["perhaps", "maybe", "possibly"], ["never", "not", "nobody"]),
    "binary_nli": (["definitely", "certainly", "indeed"], ["unrelated", "unknown", "elsewhere"]),
    "stsb": (["unrelated", "barely", "somewhat", "fairly", "mostly", "exactly"]),
    "race": (["red", "blue", "green", "yellow"], ["broken", "stolen", "lost", "empty"]),
}


def _premise(rng):
    return f"{rng.choice(_NAMES)} walked to the {rng.choice(_PLACES)} to buy a {rng.choice(_THINGS)} ."


def _write_lines(path, rows, bom=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        f.writelines("\t".join(map(str, row)) + "\n" for row in rows)


def _labels(rng, n, n_class):
    return [rng.randrange(n_class) for _ in range(n)]


def _write_sst2(rng, folder, sizes):
    def sentence(label):
        return f"the {rng.choice(_NOUNS)} is {rng.choice(_CUES['sst2'][label])} {rng.choice(_FILLERS)} . "

    for part, n in sizes.items():
        if part == "test":
            rows = [["index", "sentence"]] + [[i, sentence(y)] for i, y in enumerate(_labels(rng, n, 2))]
        else:
            rows = [["sentence", "label"]] + [[sentence(y), y] for y in _labels(rng, n, 2)]
        _write_lines(os.path.join(folder, f"{part}.tsv"), rows)


def _write_cola(rng, folder, sizes):
    def sentence(label):
        return f"{rng.choice(_NAMES).title()} {rng.choice(_CUES['cola'][label])} the {rng.choice(_THINGS)} ."

    for part, n in sizes.items():
        if part == "test":  # the test file alone has a header
            rows = [["index", "sentence"]] + [[i, sentence(y)] for i, y in enumerate(_labels(rng, n, 2))]
        else:  # source, label, the original's mark ('*': unacceptable), sentence
            rows = [[f"gj0{rng.randrange(1, 5)}", y, "" if y else "*", sentence(y)] for y in _labels(rng, n, 2)]
        _write_lines(os.path.join(folder, f"{part}.tsv"), rows)


def _write_mrpc(rng, folder, sizes):
    def pair(label):
        name, thing = rng.choice(_NAMES).title(), rng.choice(_THINGS)
        return (f"{name} said the {thing} cost {rng.randrange(10, 99)} dollars .",
                f"The {thing} price was {rng.choice(_CUES['mrpc'][label])} by {name} .")

    for part, n in sizes.items():
        first = "index" if part == "test" else "Quality"
        rows = [[first, "#1 ID", "#2 ID", "#1 String", "#2 String"]]
        for i, y in enumerate(_labels(rng, n, 2)):
            rows.append([i if part == "test" else y, rng.randrange(10**6), rng.randrange(10**6), *pair(y)])
        _write_lines(os.path.join(folder, f"{part}.tsv"), rows, bom=part != "test")  # MRPC's byte-order mark


def _write_qqp(rng, folder, sizes):
    def pair(label):
        thing = rng.choice(_THINGS)
        return f"How do I fix my {thing}?", f"What is the {rng.choice(_CUES['qqp'][label])} way to fix a {thing}?"

    for part, n in sizes.items():
        if part == "test":
            rows = [["id", "question1", "question2"]] + [[i, *pair(y)] for i, y in enumerate(_labels(rng, n, 2))]
        else:
            rows = [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]]
            rows += [[i, 2 * i + 1, 2 * i + 2, *pair(y), y] for i, y in enumerate(_labels(rng, n, 2))]
            # QQP's malformed rows: a question holding a line break splits one row into two short ones
            broken = [n + 7, 1, 2, "Why is my"]
            rows[len(rows) // 2:len(rows) // 2] = [broken, ["kite blue?", "Is my kite blue?", "0"]]
        _write_lines(os.path.join(folder, f"{part}.tsv"), rows)


def _write_stsb(rng, folder, sizes):
    levels = _CUES["stsb"]

    def pair(score):
        name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        word = levels[min(int(round(score)), 5)]
        return f"A man named {name} is holding a {thing} .", f"The picture is {word} like that ."

    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
    for part, n in sizes.items():
        rows = [header + ([] if part == "test" else ["score"])]
        for i in range(n):
            score = min(5.0, max(0.0, rng.randrange(6) + rng.uniform(-0.4, 0.4)))
            meta = [i, "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", *pair(score)]
            rows.append(meta + ([] if part == "test" else [f"{score:.3f}"]))
        _write_lines(os.path.join(folder, f"{part}.tsv"), rows)


def _nli_pair(rng, label, cues, quote=False):
    """A premise and a hypothesis whose cue word decides the label; with quote, an unbalanced quote."""
    premise = _premise(rng)
    if quote:
        premise = '"' + premise[0].upper() + premise[1:]  # opened, never closed: as in MNLI and QQP
    name = premise.split()[0].strip('"').lower()
    return premise, f"{name} {rng.choice(cues[label])} went to the {rng.choice(_PLACES)} ."


def _parse(text):
    return "( " + " ".join(f"( {w} )" for w in text.split()) + " )"


def _write_mnli(rng, folder, sizes):
    heads = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
             "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
    files = {"train": ("train.tsv", 1), "dev": ("dev_matched.tsv", 5), "dev_mm": ("dev_mismatched.tsv", 5),
             "test": ("test_matched.tsv", 0), "test_mm": ("test_mismatched.tsv", 0)}
    for part, (name, n_annotators) in files.items():
        n = sizes[part.split("_")[0]]
        label_cols = [f"label{k + 1}" for k in range(n_annotators)] + (["gold_label"] if n_annotators else [])
        rows = [heads + label_cols]
        genre = "letters" if part.endswith("_mm") else "fiction"
        for i, y in enumerate(_labels(rng, n, 3)):
            s1, s2 = _nli_pair(rng, y, _CUES["nli"], quote=i % 5 == 0)
            labels = [NLI[y]] * n_annotators + ([NLI[y]] if n_annotators else [])
            rows.append([i, rng.randrange(10**5), f"{rng.randrange(10**5)}e", genre, _parse(s1), _parse(s2),
                         _parse(s1), _parse(s2), s1, s2, *labels])
        _write_lines(os.path.join(folder, name), rows)


def _pair_glue(columns, label_names, cues):
    def write(rng, folder, sizes):
        for part, n in sizes.items():
            rows = [["index", *columns] + ([] if part == "test" else ["label"])]
            for i, y in enumerate(_labels(rng, n, 2)):
                rows.append([i, *_nli_pair(rng, y, cues)] + ([] if part == "test" else [label_names[y]]))
            _write_lines(os.path.join(folder, f"{part}.tsv"), rows)
    return write


def _write_snli(rng, folder, sizes):
    for part, n in sizes.items():
        lines = []
        labels = _labels(rng, n, 3)
        for i, y in enumerate(labels):
            s1, s2 = _nli_pair(rng, y, _CUES["nli"])
            if i % 10 == 0:  # a pair without a majority: gold_label '-', annotators split (dropped)
                lines.append(_snli_line(rng, s1, s2, "-", ["neutral", "entailment", "contradiction"]))
            lines.append(_snli_line(rng, s1, s2, NLI[y], [NLI[y]] * 5))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"snli_1.0_{part}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)


def _snli_line(rng, s1, s2, gold, annotators):
    return json.dumps({"annotator_labels": annotators, "captionID": f"{rng.randrange(10**6)}.jpg#0",
                       "gold_label": gold, "pairID": f"{rng.randrange(10**6)}.jpg#0r1n", "sentence1": s1,
                       "sentence1_binary_parse": _parse(s1), "sentence1_parse": _parse(s1), "sentence2": s2,
                       "sentence2_binary_parse": _parse(s2), "sentence2_parse": _parse(s2)})


def _write_scitail(rng, folder, sizes):
    names = ("entails", "neutral")
    for part, n in sizes.items():
        rows = [[*_nli_pair(rng, y, _CUES["binary_nli"]), names[y]] for y in _labels(rng, n, 2)]
        _write_lines(os.path.join(folder, "tsv_format", f"scitail_1.0_{part}.tsv"), rows)


def _write_race(rng, folder, sizes):
    right, wrong = _CUES["race"]
    for part, n in sizes.items():
        for level in ("middle", "high"):
            os.makedirs(os.path.join(folder, part, level), exist_ok=True)
        done, number = 0, 1
        while done < n:
            level = ("middle", "high")[number % 2]
            k = min(n - done, rng.randrange(1, 4))  # 1-3 questions per article
            doc = {"answers": [], "options": [], "questions": [], "article": "", "id": f"{level}{number}.txt"}
            facts = []
            for _ in range(k):
                name, thing, colour = rng.choice(_NAMES).title(), rng.choice(_THINGS), rng.choice(right)
                facts.append(f"{name} bought a {colour} {thing} at the {rng.choice(_PLACES)}.")
                options = [f"the {colour} {thing}"] + [f"the {w} {thing}" for w in rng.sample(wrong, 3)]
                rng.shuffle(options)
                doc["questions"].append(f"What did {name} buy?")
                doc["options"].append(options)
                doc["answers"].append("ABCD"[options.index(f"the {colour} {thing}")])
            doc["article"] = " ".join(facts) + "\nIt was a busy day in town."
            with open(os.path.join(folder, part, level, f"{number}.txt"), "w", encoding="utf-8") as f:
                json.dump(doc, f)
            done, number = done + k, number + 1


def _write_rocstories(rng, folder, sizes):
    """Both Story Cloze files; the labelled one holds train + dev stories (n_valid = dev to split)."""
    datasets.write_synthetic_rocstories(folder, n_val=sizes["train"] + sizes["dev"], n_test=sizes["test"],
                                        seed=rng.randrange(2 ** 31))


_WRITERS = {"rocstories": _write_rocstories,
            "sst2": _write_sst2, "cola": _write_cola, "mrpc": _write_mrpc, "qqp": _write_qqp, "stsb": _write_stsb,
            "mnli": _write_mnli,
            "qnli": _pair_glue(("question", "sentence"), ENTAILMENT, _CUES["binary_nli"]),
            "rte": _pair_glue(("sentence1", "sentence2"), ENTAILMENT, _CUES["binary_nli"]),
            "snli": _write_snli, "scitail": _write_scitail, "race": _write_race}


def write_synthetic(task_name, folder, n_train, n_dev, n_test, seed=0):
    """Write a small synthetic data set for the task, in its real folder, file names, layout and
    quirks, under folder; return the task's folder (folder/SST-2, folder/snli_1.0 ...).

    A label-bearing word decides each label, so a tiny model learns it in a few epochs. Reading it
    gives n_train, n_dev and n_test examples per split (MNLI: n_dev per dev set, n_test per test set):
    the quirky extra rows (QQP's malformed rows, SNLI's '-' pairs) are on top of those.
    """
    task = get_task(task_name)
    path = os.path.join(folder, task.folder)
    _WRITERS[task.name](random.Random(seed), path, {"train": n_train, "dev": n_dev, "test": n_test})
    return path
