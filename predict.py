"""Label new inputs with a fine-tuned model. A train.py run's best_params.safetensors or checkpoint.pt
records its task, its model and its vocabulary, so the file is all that is needed.

    python predict.py --model_path save/sst2/best_params.safetensors --text "a charming film" --text "a dull plot"
    python predict.py --model_path save/mnli/best_params.safetensors --text "A man sleeps ." --text_b "He is awake ."
    python predict.py --model_path save/mnli/best_params.safetensors --input new.tsv --output labelled.jsonl
    python predict.py --model_path save/mnli/best_params.safetensors --input GLUE/diagnostic/diagnostic.tsv \\
        --labels_only --output submission/AX.tsv

Inputs go through the task's input transformation and cut rule (tasks.py), then through the model in
length-sorted batches as train.py's evaluation runs them, so a test file's predictions are those
`--submit` wrote. From Python: `Predictor(model_path).predict(texts)` (docs/predict.md).
"""

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from batches import BatchError, BatchPlan, EncodedSplit, resolve_device, to_device
from checkpoints import CheckpointError, check_vocabulary, load_model_state, read_checkpoint, vocabulary_paths
from datasets import Columns, DataError, Source, read_json_fields, read_text, read_tsv_split
from model_pytorch import build_model
from ragged import Ragged
from tasks import add_specials, get_task
from text_utils import TextEncoder, VocabularyError
from utils import atomic_write_text
from weights import WeightsError

UNCUT = 1 << 40  # a budget no input reaches: the task's sequences before any cut
INDEX_COLUMNS = ("index", "id")  # a TSV file's column of ids, kept as the predictions' index


class PredictError(ValueError):
    """A model file or inputs that prediction cannot take."""


@dataclass
class Predictions:
    """One entry per input, in the inputs' order."""

    index: list                      # the inputs' own ids (a file's index column), else their positions
    values: list                     # label names, or scores as text (STS-B), as a submission writes them
    probabilities: np.ndarray | None  # [n, classes] in label_names order; None where the task predicts a score
    label_names: tuple | None
    outputs: np.ndarray              # the task's raw outputs: logits, or STS-B's scores
    n_cut: int = 0                   # inputs cut to fit (the task's cut rule)
    notes: list = field(default_factory=list)  # what the file's reader skipped (QQP's malformed rows)


def fine_tuned_task(path, spec, flags):
    """The task that a model file's record names; a PredictError saying why a file is not a fine-tune."""
    if spec is None or not flags.get("dataset"):
        raise PredictError(f"{path} records no model spec and task, as a file of train.py does: give the "
                           "best_params.safetensors or checkpoint.pt of a fine-tuning run")
    if spec.head is None:
        raise PredictError(f"{path} is a language model (--dataset {flags['dataset']}) without a task head, not a "
                           "fine-tune of a task: it predicts no labels (generate.py continues text with it)")
    try:
        task = get_task(flags["dataset"])
    except ValueError as err:
        raise PredictError(f"{path}: {err}") from None
    if task.head != spec.head:
        raise PredictError(f"{path}: its model's head {spec.head} is not {task.title}'s ({task.head})")
    return task


class Predictor:
    """A fine-tuned model of a task, ready to label new inputs: on `device` (default: CUDA when present)
    in batches of `batch_size` (default: the run's --eval_batch, else 128 on a GPU, 16 on a CPU)."""

    def __init__(self, model_path, encoder_path=None, bpe_path=None, device=None, batch_size=None):
        if os.path.isdir(model_path):
            raise PredictError(f"{model_path} is a weights folder (pre-trained or exported), not a fine-tune: give "
                               "the best_params.safetensors or checkpoint.pt of a train.py run of a task")
        state, spec, flags = read_checkpoint(model_path)
        self.task, self.spec = fine_tuned_task(model_path, spec, flags), spec
        self.text_encoder = TextEncoder(*vocabulary_paths(model_path, encoder_path, bpe_path))
        check_vocabulary(spec, self.text_encoder, model_path)
        self.specials = add_specials(self.text_encoder, self.task.special_tokens)
        if (self.specials.n_special, self.specials.clf_token) != (spec.n_special, spec.clf_token):
            raise PredictError(f"{model_path}: its model has {spec.n_special} special rows and the classify token "
                               f"{spec.clf_token}; {self.task.title} adds {self.specials.n_special}, the classify "
                               f"token {self.specials.clf_token}")
        try:
            self.device = resolve_device(device)
        except ValueError as err:
            raise PredictError(str(err)) from None
        self.model = build_model(spec)
        load_model_state(self.model, state, model_path)
        self.model.to(self.device).eval()
        self.run_n_ctx = int(flags.get("n_ctx") or spec.n_ctx)  # the run's --n_ctx: its cut rule's limit
        self.batch_size = batch_size or flags.get("eval_batch") or (128 if self.device.type == "cuda" else 16)
        self.amp = flags.get("amp") if self.device.type == "cuda" else None  # as the run's evaluation on a GPU

    def sequences(self, texts):
        """(the inputs as an EncodedSplit, the number of inputs cut): the task's input transformation
        and cut rule as the run applied them (to its --n_ctx); an input still longer than the model's
        positions is cut by the same rule to fit them (ROCStories' rule cuts to half of n_ctx, so it
        matters there)."""
        fields = [Ragged.from_lists(self.text_encoder.encode(list(column), verbose=False)) for column in texts]
        n_sequences = self.task.n_sequences
        try:
            whole, _ = self.task.sequences(fields, self.specials, UNCUT)
            seqs, _ = self.task.sequences(fields, self.specials, self.run_n_ctx)
            too_long = np.flatnonzero(seqs.lengths.reshape(-1, n_sequences).max(axis=1) > self.spec.n_ctx)
            if len(too_long):
                refit, _ = self.task.sequences([f.take(too_long) for f in fields], self.specials, self.spec.n_ctx)
                rows = (too_long[:, None] * n_sequences + np.arange(n_sequences)).reshape(-1)
                starts, lengths = seqs.starts.copy(), seqs.lengths.copy()
                starts[rows], lengths[rows] = refit.starts + len(seqs.ids), refit.lengths
                seqs = Ragged(np.concatenate([seqs.ids, refit.ids]), starts, lengths)
        except ValueError as err:  # n_ctx too small for the task's specials
            raise PredictError(f"the model's n_ctx {self.spec.n_ctx}: {err}") from None
        n_cut = int((seqs.lengths != whole.lengths).reshape(-1, n_sequences).any(axis=1).sum())
        labels = np.zeros(len(texts[0]), np.int64)
        n_token_rows = self.spec.n_vocab + self.spec.n_special
        return EncodedSplit(seqs, labels, n_sequences, self.spec.n_ctx, n_token_rows), n_cut

    def outputs(self, inputs):
        """The task's outputs of each input of an EncodedSplit, in order: batches of similar length
        (each laid out at its longest sequence), no dropout, read back once at the end."""
        order = np.argsort(inputs.longest(), kind="stable")
        results = []
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(order), self.batch_size):
                X, M, _ = inputs.batch(order[start:start + self.batch_size])
                plan = BatchPlan.build(X, M, self.specials.clf_token, self.device, lm=False)
                results.append(self.task.outputs(*self.model(to_device(X, self.device), plan=plan)).float())
        result = torch.cat(results).cpu().numpy()
        ordered = np.empty_like(result)
        ordered[order] = result
        return ordered

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

    def predict(self, texts, index=None):
        """Predictions of inputs given as one list of strings per text field of the task (`text_fields`:
        SST-2 [sentences], MNLI [premises, hypotheses], RACE [articles, questions, As, Bs, Cs, Ds] ...)."""
        fields = self.task.text_fields
        if isinstance(texts, str) or len(texts) != len(fields) or any(isinstance(f, str) for f in texts):
            raise PredictError(f"{self.task.title} takes {len(fields)} text field(s) per input ({', '.join(fields)}): "
                               "give one list of strings per field")
        texts = [list(column) for column in texts]
        if len({len(column) for column in texts}) != 1 or not texts[0]:
            raise PredictError(f"expected as many texts in each field ({', '.join(fields)}), at least one; got "
                               f"{[len(column) for column in texts]}")
        if any(not isinstance(text, str) for column in texts for text in column):
            raise PredictError("every text must be a string")
        if index is not None and len(index) != len(texts[0]):
            raise PredictError(f"{len(index)} index values for {len(texts[0])} inputs")
        sequences, n_cut = self.sequences(texts)
        outputs = self.outputs(sequences)
        return Predictions(list(index) if index is not None else list(range(len(outputs))),
                           self.task.predictions(outputs), self.task.probabilities(outputs), self.task.label_names,
                           outputs, n_cut)

    def predict_file(self, path):
        """Predictions of the inputs in a file (`read_inputs`), with what its reader skipped as notes."""
        split = read_inputs(path, self.task)
        predictions = self.predict(split.texts, split.index)
        predictions.notes = list(split.notes)
        return predictions


def read_inputs(path, task):
    """A file of new inputs for `task` as a Split: JSON lines (.jsonl) whose objects hold the task's text
    fields; a TSV whose first row names them (other columns ignored, an index or id column kept); or a
    file in a format of the task's own files (CoLA's headerless TSV, a Story Cloze CSV, a RACE file ...)."""
    fields = task.text_fields
    if path.lower().endswith(".jsonl"):
        return read_json_fields(path, fields, task.title)
    header = [cell.strip() for cell in read_text(path).split("\n", 1)[0].rstrip("\r").split("\t")]
    if set(fields) <= set(header):
        index = next((name for name in INDEX_COLUMNS if name in header), None)
        folder, name = os.path.split(os.path.abspath(path))
        source = Source("inputs", (name,), task.title, labelled=False, columns=Columns(fields, index=index))
        return read_tsv_split(folder, source, task)
    try:
        return task.read_file(path)
    except DataError as err:
        own = str(err).removeprefix(f"{path}: ")
        raise DataError(f"{path}: expected a TSV whose first row names {task.title}'s text fields "
                        f"({', '.join(fields)}; found {header[:8]}), JSON lines (.jsonl) with those keys, or a "
                        f"file of {task.title}'s own: {own}") from None


def prediction_rows(predictions, labels_only=False):
    """(header, rows) of the predictions as cells: index, prediction, then each class's probability."""
    header = ["index", "prediction"]
    columns = [predictions.index, predictions.values]
    if predictions.probabilities is not None and not labels_only:
        header += [f"p_{name}" for name in predictions.label_names]
        columns += [[repr(float(p)) for p in column] for column in predictions.probabilities.T]
    return header, [[str(cell) for cell in row] for row in zip(*columns)]


def format_predictions(predictions, jsonl=False, labels_only=False):
    """The predictions as TSV text (a header row, then one row per input) or as JSON lines (an object per
    input: index, prediction (a score as a number), probabilities by label name)."""
    if not jsonl:
        header, rows = prediction_rows(predictions, labels_only)
        return "".join("\t".join(row) + "\n" for row in [header, *rows])
    lines = []
    for i, (index, value) in enumerate(zip(predictions.index, predictions.values)):
        record = {"index": index, "prediction": value if predictions.label_names else float(value)}
        if predictions.probabilities is not None and not labels_only:
            record["probabilities"] = dict(zip(predictions.label_names, map(float, predictions.probabilities[i])))
        lines.append(json.dumps(record) + "\n")
    return "".join(lines)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description="Label new inputs with a fine-tuned model (a train.py run's "
                                            "best_params.safetensors or checkpoint.pt).")
    p.add_argument("--model_path", required=True, help="best_params.safetensors or checkpoint.pt of a fine-tuning run")
    p.add_argument("--text", action="append", help="an input's text (its first field); repeat for more inputs")
    p.add_argument("--text_b", action="append", help="a pair's second text, one per --text, in the same order")
    p.add_argument("--input", help="a file of inputs: a TSV whose first row names the task's text fields, JSON "
                                   "lines (.jsonl) with those keys, or a file in the task's own format")
    p.add_argument("--output", help="the predictions' file: JSON lines if it ends in .jsonl, else TSV (default: "
                                    "TSV on stdout)")
    p.add_argument("--labels_only", action="store_true",
                   help="index and prediction only, the GLUE server's format (AX.tsv from an MNLI run)")
    p.add_argument("--encoder_path", default=None, help="the BPE vocabulary (default: the run's)")
    p.add_argument("--bpe_path", default=None, help="the BPE merges (default: the run's)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if present)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="inputs per batch (default: the run's --eval_batch, else 128 on a GPU, 16 on a CPU)")
    return p


def command_line_texts(args, task):
    """The texts of --text and --text_b, one list per text field of the task."""
    fields = task.text_fields
    if len(fields) > 2:
        raise PredictError(f"{task.title} takes {len(fields)} texts per input ({', '.join(fields)}): give them "
                           "in a file (--input)")
    pairs = len(fields) == 2
    if pairs and len(args.text_b or []) != len(args.text):
        raise PredictError(f"{task.title} takes pairs ({', '.join(fields)}): give one --text_b per --text "
                           f"({len(args.text)} --text, {len(args.text_b or [])} --text_b)")
    if not pairs and args.text_b:
        raise PredictError(f"{task.title} takes one text per input ({fields[0]}): --text_b has no place")
    return [args.text, args.text_b] if pairs else [args.text]


def run(args):
    """(the predictions' text or the output file written, notes for stderr)."""
    if bool(args.text) == bool(args.input):
        raise PredictError("give the inputs either on the command line (--text, --text_b) or in a file (--input)")
    if args.batch_size is not None and args.batch_size < 1:
        raise PredictError(f"--batch_size {args.batch_size} is invalid: it must be at least 1")
    predictor = Predictor(args.model_path, args.encoder_path, args.bpe_path, args.device, args.batch_size)
    if args.input:
        predictions = predictor.predict_file(args.input)
    else:
        predictions = predictor.predict(command_line_texts(args, predictor.task))
    notes = list(predictions.notes)
    if predictions.n_cut:
        notes.append(f"{predictions.n_cut} inputs were cut to fit ({predictor.task.cut_rule})")
    jsonl = bool(args.output) and args.output.lower().endswith(".jsonl")
    text = format_predictions(predictions, jsonl, args.labels_only)
    if not args.output:
        return text, notes
    atomic_write_text(args.output, text)
    return None, notes + [f"{len(predictions.values)} predictions written to {args.output}"]


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        text, notes = run(args)
    except (PredictError, DataError, WeightsError, CheckpointError, VocabularyError, BatchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for line in notes:
        print(line, file=sys.stderr)
    if text:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
