"""The tasks: each declared once (where its files are and how they are read, how an example becomes
token sequences, which head and loss train it, which metrics report it, what a submission holds),
behind one protocol, `Task`, that the training code asks instead of asking which task it runs.
The paper's fine-tuning tasks (its Tables 2-4), ROCStories with the original's split and cut rule
(`RocStoriesTask`), and language modelling on plain text (`LanguageModelTask`, `--dataset lm`).

`Task.read` returns 'train', then 'valid', the split that selects the kept parameters, then the
splits reported or submitted at the end (docs/tasks.md: which split is which). The input
transformations (the paper's Figure 1) and the cut rule (`fit_lengths`): docs/tasks.md.
"""

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

import datasets
from datasets import Columns, DataError, Source, Split, read_race, read_snli, read_text, read_tsv_split
from loss import TASK_LOSSES
from metrics import LOWER_IS_BETTER, METRICS, ON_SCORES, is_number
from ragged import Ragged, join

# ------------------------------------------------------------------------------------------------
# Special tokens
# ------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("_start_", "_delimiter_", "_classify_")  # the rows a fine-tune adds, in id order


@dataclass(frozen=True)
class Specials:
    """The ids of the special tokens a task adds after the vocabulary's n_vocab tokens (none: None)."""

    n_vocab: int
    start: int | None
    delimiter: int | None
    clf_token: int | None
    n_special: int = 3


def add_specials(text_encoder, names=SPECIAL_TOKENS):
    """Append the special tokens `names` to the encoder (ids n_vocab, n_vocab + 1, ...)."""
    encoder = text_encoder.encoder
    n_vocab = len(encoder)
    for name in names:
        encoder.setdefault(name, len(encoder))
    ids = [encoder[name] if name in names else None for name in SPECIAL_TOKENS]
    return Specials(n_vocab, *ids, n_special=len(names))


# ------------------------------------------------------------------------------------------------
# The protocol
# ------------------------------------------------------------------------------------------------

FORMS = ("text", "pair", "both_orders", "choices", "stream")


@dataclass(frozen=True)
class Task:
    """One task: its data, its input transformation, head, loss, metrics, report and submission.

    head is DoubleHeadModel's task_head_type (None: a language model alone); loss a name of
    loss.TASK_LOSSES: 'cross_entropy' (class logits), 'squared_error' (STS-B: the similarity head
    regresses the 0-5 score itself) or 'binary_cross_entropy' (MRPC, QQP: the similarity head gives
    one logit, that of class 1; with two classes a softmax over two logits equals a sigmoid of their
    difference, so this is the paper's classifier with one redundant parameter row removed).
    "outputs" are what evaluation keeps per example: the task logits (a language model: its LM loss).
    """

    cut_rule = "longer examples are cut by the rule in docs/tasks.md"  # for messages about --n_ctx
    special_tokens = SPECIAL_TOKENS  # added to the vocabulary, in id order
    presets = {}  # train.py flag defaults of the task's recipe (explicit flags win)
    saves_language_model = False  # also write the trained language model in the Hugging Face format

    name: str                  # the --dataset value
    title: str                 # the report name: "SST-2"
    folder: str                # the folder as distributed: "SST-2", "snli_1.0", "SciTailV1.1", "RACE"
    form: str                  # one of FORMS: which input transformation
    head: object
    loss: str | None
    label_names: tuple | None  # label strings in id order (None: a score)
    metric_names: tuple        # the first selects the kept parameters
    sources: tuple             # Source per split, in the order `read` returns them
    reader: Callable | None    # (folder, source, task) -> Split
    obtain: str                # where the data set is obtained
    n_choices: int = 1         # answers per example (multiple choice)
    skip_malformed: bool = False  # QQP: rows with the wrong number of columns are skipped, and counted
    score_range: tuple | None = None  # STS-B: the allowed scores
    text_fields: tuple = ()    # an example's texts by name, as `sequences` takes them: a file of new inputs

    def __post_init__(self):
        if self.form not in FORMS or (self.loss is not None and self.loss not in TASK_LOSSES):
            raise ValueError(f"{self.name}: form {self.form!r} must be one of {FORMS}, "
                             f"loss {self.loss!r} one of {tuple(TASK_LOSSES)}")

    def configured(self, **settings):
        """This task with the run's settings where it declares them (ROCStories: n_valid)."""
        own = {k: v for k, v in settings.items() if k in {f.name for f in fields(self)}}
        return replace(self, **own) if own else self

    # -- data --------------------------------------------------------------------------------------
    def locate(self, data_dir):
        """The task's folder: data_dir itself, or the folder as distributed inside it.

        When neither holds every file, the error names what the task's folder inside data_dir lacks
        if data_dir holds none of the files itself (a parent folder with a half-copied task folder):
        listing every file as missing from the parent would hide the one that is.
        """
        candidates = [data_dir, os.path.join(data_dir, self.folder)]
        expected = [f for s in self.sources if not s.optional for f in s.files]
        for folder in candidates:
            if not _absent(folder, expected):
                return folder
        folder, missing = data_dir, _absent(data_dir, expected)
        if len(missing) == len(expected) and os.path.isdir(candidates[1]):
            folder, missing = candidates[1], _absent(candidates[1], expected)
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
        """{'train': Split, 'valid': Split (selects the kept parameters), then the report splits}; an
        optional split where its files are present (MNLI's diagnostic set)."""
        folder, splits = self.locate(data_dir), {}
        for s in self.sources:
            if s.key not in splits and not (s.optional and _absent(folder, s.files)):
                splits[s.key] = self.reader(folder, s, self)
        return splits

    def read_file(self, path):
        """New inputs from one file in a format of the task's own files (its test split's tried first):
        a Split, its labels (where the file has them) not needed. The error names each format's problem."""
        folder, name = os.path.split(os.path.abspath(path))
        problems = []
        for source in sorted(self.sources, key=lambda s: s.labelled):
            try:
                return self.reader(folder, replace(source, files=(name,), optional=False), self)
            except DataError as err:
                problems.append(str(err).replace(f"{os.path.join(folder, name)}, ", ""))
        raise DataError(f"{path}: not in a format of {self.title}'s files ({'; '.join(dict.fromkeys(problems))})")

    def read_split(self, data_dir, key):
        """One split alone (analysis reads a test split's labels)."""
        return self.reader(self.locate(data_dir), next(s for s in self.sources if s.key == key), self)

    def label_id(self, value, path, where):
        """A label's class index (or score), or a DataError naming the file and line."""
        value = value.strip()
        if self.label_names is not None and value in self.label_names:
            return self.label_names.index(value)
        where = f"line {where}" if isinstance(where, int) else where  # formatted for errors only
        if self.label_names is not None:
            raise DataError(f"{path}, {where}: label {value!r} is not one of {', '.join(self.label_names)}")
        low, high = self.score_range
        try:
            score = float(value)
        except ValueError:
            score = None
        if score is None or not low <= score <= high:
            raise DataError(f"{path}, {where}: score {value!r} is not a number from {low:g} to {high:g}")
        return score

    def label_array(self, labels):
        return np.asarray(labels, dtype=np.int64 if self.label_names is not None else np.float32)

    # -- input transformation ---------------------------------------------------------------------
    @property
    def n_sequences(self):
        """Sequences per example: the choices axis of X."""
        return {"text": 1, "pair": 1, "both_orders": 2, "choices": self.n_choices, "stream": 1}[self.form]

    def sequences(self, encoded_texts, specials, max_tokens):
        """(the token sequences: a Ragged of n_examples x n_sequences rows, example-major; the number
        of examples cut). encoded_texts holds one Ragged of encoded texts per text field, as Split.texts.
        """
        n_specials = 2 if self.form == "text" else 3
        if max_tokens < n_specials:
            raise ValueError(f"max_tokens={max_tokens} cannot hold the {n_specials} special tokens")
        n_alternatives = self.n_choices if self.form == "choices" else 0
        lengths = np.stack([f.lengths for f in encoded_texts], axis=1)
        kept = fit_every_length(lengths, n_alternatives, max_tokens - n_specials)
        n_cut = int((kept != lengths).any(axis=1).sum())
        return join(self._build([f.cut(n) for f, n in zip(encoded_texts, kept.T)], specials)), n_cut

    def _build(self, texts, s):
        """Figure 1: each sequence's parts in order, a text (one row per example) or a special token."""
        if self.form == "text":
            return [[s.start, texts[0], s.clf_token]]
        if self.form == "pair":
            return [[s.start, texts[0], s.delimiter, texts[1], s.clf_token]]
        if self.form == "both_orders":
            a, b = texts
            return [[s.start, a, s.delimiter, b, s.clf_token], [s.start, b, s.delimiter, a, s.clf_token]]
        context = texts[:-self.n_choices]
        return [[s.start, *context, s.delimiter, answer, s.clf_token] for answer in texts[-self.n_choices:]]

    # -- training: what the model computes and how it is scored -----------------------------------
    def uses_lm(self, training, lm_coef):
        """Whether a forward needs the LM losses: in training, when they count in the objective."""
        return training and lm_coef > 0

    def objective(self, lm_losses, task_logits, labels, lm_coef):
        """mean(task losses) + lm_coef * mean(per-sequence LM losses), as the TF code (docs/reference.md §2)."""
        task = self.losses(task_logits.float(), labels).mean()
        return task + lm_coef * lm_losses.mean() if lm_coef > 0 and lm_losses is not None else task

    def outputs(self, lm_losses, task_logits):
        """What evaluation keeps per example: the task logits."""
        return task_logits

    def losses(self, outputs, labels):
        """Per-example task losses (torch) of the outputs."""
        return TASK_LOSSES[self.loss](outputs, labels)

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

    def metrics(self, outputs, labels):
        """{metric name: value in percent}, in the paper's order; the first selects parameters."""
        logits = self._check_logits(outputs)
        return self._figures(labels, self.classes(logits), logits)

    def metrics_of_predictions(self, rows, labels, path):
        """The metrics of submitted predictions ((line number, text) of a submission file) against the labels."""
        if self.label_names is None:
            bad = next(((n, v) for n, v in rows if not is_number(v)), None)
            classes, scores = None, np.array([float(v) for _, v in rows]) if bad is None else None
        else:
            bad = next(((n, v) for n, v in rows if v not in self.label_names), None)
            classes, scores = np.array([self.label_names.index(v) for _, v in rows]) if bad is None else None, None
        if bad is not None:
            expected = f"one of {', '.join(self.label_names)}" if self.label_names else "a score"
            raise DataError(f"{path}, line {bad[0]}: prediction {bad[1]!r} is not {expected}")
        return self._figures(labels, classes, scores)

    def _figures(self, labels, classes, scores):
        return {name: float(METRICS[name](labels, scores if name in ON_SCORES else classes))
                for name in self.metric_names}

    def selection_score(self, metrics):
        """The figure that picks the kept parameters, higher is better: the first metric (negated
        where lower is better)."""
        name = self.metric_names[0]
        return -metrics[name] if name in LOWER_IS_BETTER else metrics[name]

    def probabilities(self, outputs):
        """Class probabilities [n, classes] in label_names order (None for a score): the softmax of the
        logits; for one binary logit (MRPC, QQP) its sigmoid, class 1's, and the complement."""
        logits = torch.from_numpy(self._check_logits(outputs)).double()
        if self.label_names is None:
            return None
        if self.loss == "binary_cross_entropy":
            return torch.stack([torch.sigmoid(-logits), torch.sigmoid(logits)], 1).numpy()
        return torch.softmax(logits, -1).numpy()

    def predictions(self, outputs):
        """Submission values: label names (GLUE's 0/1 where its labels are digits), STS-B a score."""
        logits = self._check_logits(outputs)
        if self.label_names is None:
            return [f"{score:.3f}" for score in logits.tolist()]
        return [self.label_names[c] for c in self.classes(logits).tolist()]

    def title_of(self, key):
        """How reports name the split `key` ("valid": "SST-2 Dev", "MNLI-m Dev" ...)."""
        return next(s.title for s in self.sources if s.key == key)

    def submissions(self):
        """(split key, file name) of each split the task submits."""
        return [(s.key, s.submission) for s in self.sources if s.submission]

    def report(self, split, outputs):
        """[(title, metrics)] for a labelled split: its groups first (RACE-m, RACE-h), then all; []
        for an unlabelled one."""
        if split.labels is None:
            return []
        parts = [(title, idx) for title, idx in (split.groups or {}).items()] + [(split.title, None)]
        outputs = np.asarray(outputs)
        return [(title, self.metrics(outputs if idx is None else outputs[idx],
                                     split.labels if idx is None else split.labels[idx]))
                for title, idx in parts if idx is None or len(idx)]

    def report_lines(self, split, outputs):
        """Lines like 'SST-2 Dev Accuracy: 91.30', one per metric of each reported part."""
        return [f"{title} {name}: {value:.2f}"
                for title, values in self.report(split, outputs) for name, value in values.items()]


def _absent(folder, files):
    """The files (glob patterns) of `files` that `folder` lacks."""
    return [f for f in files if not glob.glob(os.path.join(glob.escape(folder), f))]


def fit_every_length(lengths, n_alternatives, budget):
    """`fit_lengths` of every example (lengths [n_examples, n_texts]), called for those that do not fit."""
    n_shared = lengths.shape[1] - n_alternatives
    longest = lengths[:, :n_shared].sum(axis=1) + (lengths[:, n_shared:].max(axis=1) if n_alternatives else 0)
    kept = lengths.copy()
    for i in np.flatnonzero(longest > budget):
        kept[i] = fit_lengths(lengths[i].tolist(), n_alternatives, budget)
    return kept


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


# ------------------------------------------------------------------------------------------------
# ROCStories and language modelling: their own reading, cutting and scoring
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RocStoriesTask(Task):
    """Story Cloze as OpenAI's script runs it (docs/reference.md §5): n_valid stories of the labelled
    file held out with the original's seed, the rest trained on; the test file predicted into
    ROCStories.tsv (0 or 1: the index of the right ending); story and each ending cut to
    max_tokens // 2 - 2 tokens apiece."""

    cut_rule = "the story and each ending are cut to n_ctx // 2 - 2 tokens, as the original does"
    n_valid: int = 374

    def read(self, data_dir):
        train, valid, _ = datasets.rocstories(data_dir, n_valid=self.n_valid)
        return {"train": Split(tuple(train[:3]), train[3].astype(np.int64), self.title_of("train")),
                "valid": Split(tuple(valid[:3]), valid[3].astype(np.int64), self.title_of("valid")),
                "test": self.read_split(data_dir, "test")}

    def read_split(self, data_dir, key):
        if key != "test":
            return self.read(data_dir)[key]
        *texts, labels = datasets.rocstories_test(data_dir)
        return Split(tuple(texts), None if labels is None else labels.astype(np.int64), self.title_of("test"),
                     submission="ROCStories.tsv")

    def read_file(self, path):
        """New inputs from one Story Cloze CSV file (labelled or not)."""
        return Split(tuple(datasets.read_story_cloze(path)), None, "ROCStories")

    def sequences(self, encoded_texts, specials, max_tokens):
        max_len = max_tokens // 2 - 2
        if max_len < 1:
            raise ValueError(f"n_ctx={max_tokens} is too small for a story and an ending")
        n_cut = int((np.stack([f.lengths for f in encoded_texts], axis=1).max(axis=1) > max_len).sum())
        story, *endings = (f.cut(max_len) for f in encoded_texts)
        s = specials
        return join([[s.start, story, s.delimiter, ending, s.clf_token] for ending in endings]), n_cut


@dataclass(frozen=True)
class LanguageModelTask(Task):
    """Language modelling on a user's plain text, with the paper's pre-training recipe (`--dataset lm`).

    Files: every `*.txt` under the folder (sorted by path), or `train.txt` and `valid.txt` where both
    exist. Each non-blank line is encoded on its own and the ids are joined into one stream per split,
    cut into contiguous sequences of n_ctx tokens (the last, partial one is dropped). Without
    `valid.txt` the last `valid_fraction` of the lines (by characters, at least one line) is held out
    for validation. No task head, no special tokens; the objective and the outputs are the per-sequence
    LM losses, the metric perplexity: exp of their mean. The result is also saved in the Hugging Face
    format (save/DESC/model), which a fine-tuning run loads with --model_path.
    """

    cut_rule = "the text is cut into sequences of n_ctx tokens"
    special_tokens = ()
    # The paper's pre-training recipe (its section 4.1): lr 2.5e-4 with a cosine schedule, 64 sequences of
    # n_ctx tokens per update; dropout, L2 and the warm-up fraction as for fine-tuning.
    presets = dict(lr=2.5e-4, lr_schedule="warmup_cosine", n_batch=16)
    saves_language_model = True

    name: str = "lm"
    title: str = "LM"
    folder: str = "."
    form: str = "stream"
    head: object = None
    loss: str | None = None
    label_names: tuple | None = None
    metric_names: tuple = ("Perplexity",)
    sources: tuple = ()
    reader: Callable | None = None
    obtain: str = ""
    valid_fraction: float = 0.05

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
        return {"train": Split((train,), None, self.title_of("train")),
                "valid": Split((valid,), None, self.title_of("valid"))}

    def title_of(self, key):
        return f"{self.title} {key.title()}"

    def sequences(self, encoded_texts, specials, max_tokens):
        """Contiguous n_ctx-token pieces of the split's id stream (its lines' ids one after another),
        one piece per example; 0 cut."""
        stream = encoded_texts[0].compact().ids
        if len(stream) < max_tokens:
            raise ValueError(f"a split holds {len(stream)} tokens, fewer than one sequence of {max_tokens}")
        return Ragged.fixed(stream, max_tokens), 0

    def uses_lm(self, training, lm_coef):
        return True

    def objective(self, lm_losses, task_logits, labels, lm_coef):
        return lm_losses.mean()

    def outputs(self, lm_losses, task_logits):
        return lm_losses

    def losses(self, outputs, labels):
        return torch.as_tensor(outputs)

    def metrics(self, outputs, labels):
        return {"Perplexity": float(np.exp(np.mean(outputs, dtype=np.float64)))}

    def predictions(self, outputs):
        raise ValueError("a language model makes no predictions to submit")

    def report(self, split, outputs):
        return [(split.title, self.metrics(outputs, None))]


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
    return Task(name, title, title, form, head, loss, labels, metrics, sources, read_tsv_split, GLUE_OBTAIN,
                text_fields=test.texts, **extra)


def _mnli_task():
    texts = ("sentence1", "sentence2")
    labelled, test = Columns(texts, "gold_label"), Columns(texts, index="index")
    sources = (Source("train", ("train.tsv",), "MNLI Train", columns=labelled),
               Source("valid", ("dev_matched.tsv",), "MNLI-m Dev", columns=labelled),
               Source("valid_mm", ("dev_mismatched.tsv",), "MNLI-mm Dev", columns=labelled),
               Source("test", ("test_matched.tsv",), "MNLI-m Test", False, "MNLI-m.tsv", test),
               Source("test_mm", ("test_mismatched.tsv",), "MNLI-mm Test", False, "MNLI-mm.tsv", test))
    # GLUE's diagnostic set, predicted into AX.tsv where present: diagnostic.tsv (index, sentence1, sentence2) in
    # diagnostic/ inside the folder, in the folder, or in diagnostic/ beside it (GLUE's download script), else
    # diagnostic-full.tsv (Premise, Hypothesis, the annotations; rows numbered from 0 as diagnostic.tsv numbers them)
    full = Columns(("Premise", "Hypothesis"))
    diagnostic = tuple(Source("diagnostic", (path,), "AX Diagnostic", False, "AX.tsv", columns, optional=True)
                       for path, columns in (("diagnostic/diagnostic.tsv", test), ("diagnostic.tsv", test),
                                             ("../diagnostic/diagnostic.tsv", test), ("diagnostic-full.tsv", full),
                                             ("diagnostic/diagnostic-full.tsv", full)))
    return Task("mnli", "MNLI", "MNLI", "pair", "inference", "cross_entropy", NLI, ("Accuracy",),
                sources + diagnostic, read_tsv_split, GLUE_OBTAIN, text_fields=texts)


def _snli_task():
    sources = tuple(Source(key, (f"snli_1.0_{part}.jsonl",), f"SNLI {part.title()}")
                    for key, part in (("train", "train"), ("valid", "dev"), ("test", "test")))
    return Task("snli", "SNLI", "snli_1.0", "pair", "inference", "cross_entropy", NLI, ("Accuracy",), sources,
                read_snli, "SNLI 1.0 is obtained from https://nlp.stanford.edu/projects/snli/ (snli_1.0.zip).",
                text_fields=("sentence1", "sentence2"))


def _scitail_task():
    columns = Columns((0, 1), 2, n_columns=3)
    sources = tuple(Source(key, (f"tsv_format/scitail_1.0_{part}.tsv",), f"SciTail {part.title()}", columns=columns)
                    for key, part in (("train", "train"), ("valid", "dev"), ("test", "test")))
    return Task("scitail", "SciTail", "SciTailV1.1", "pair", ("classification", 2), "cross_entropy",
                ("entails", "neutral"), ("Accuracy",), sources, read_tsv_split,
                "SciTail 1.1 is obtained from https://allenai.org/data/scitail (SciTailV1.1.zip).",
                text_fields=("premise", "hypothesis"))


def _race_task():
    sources = tuple(Source(key, (f"{part}/middle/*.txt", f"{part}/high/*.txt"), f"RACE {part.title()}")
                    for key, part in (("train", "train"), ("valid", "dev"), ("test", "test")))
    return Task("race", "RACE", "RACE", "choices", "multiple_choice", "cross_entropy", ("A", "B", "C", "D"),
                ("Accuracy",), sources, read_race,
                "RACE is obtained from https://www.cs.cmu.edu/~glai1/data/race/ (non-commercial research use only).",
                n_choices=4, text_fields=("article", "question", "A", "B", "C", "D"))


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


def _rocstories_task():
    sources = (Source("train", (datasets.ROC_VAL,), "ROCStories Train"),
               Source("valid", (datasets.ROC_VAL,), "ROCStories Valid"),
               Source("test", (datasets.ROC_TEST,), "ROCStories Test", labelled=False, submission="ROCStories.tsv"))
    return RocStoriesTask("rocstories", "ROCStories", ".", "choices", "multiple_choice", "cross_entropy", ("0", "1"),
                          ("Accuracy",), sources, None, datasets.ROC_HINT, n_choices=2,
                          text_fields=("story", "ending1", "ending2"))


LANGUAGE_MODEL = LanguageModelTask()
TASKS = {task.name: task for task in [_rocstories_task(), *_declarations()]}


def get_task(name):
    """The task named by --dataset: one of TASKS, or 'lm'."""
    if name == LANGUAGE_MODEL.name:
        return LANGUAGE_MODEL
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}, lm")
    return TASKS[name]
