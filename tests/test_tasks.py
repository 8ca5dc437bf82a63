"""tasks: every task's reader on its real layout and quirks, clear errors, the paper's input
transformations token by token, the cut rule, metrics against independent formulas."""

import csv
import glob
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tasks
from conftest import padded_arrays, reference_sequences, sequences_of, tiny_config
from datasets import DataError
from model_pytorch import DoubleHeadModel
from synthetic import write_synthetic
from tasks import Specials, get_task

SPECIALS = Specials(n_vocab=20, start=20, delimiter=21, clf_token=22)
S, D, C = SPECIALS.start, SPECIALS.delimiter, SPECIALS.clf_token
N_TRAIN, N_DEV, N_TEST = 12, 7, 5

# GLUE's layouts as distributed, written out independently of tasks.py: for each file, whether it has
# a header, the text columns (names, or positions without a header), the label column, the index column.
GLUE = {
    "sst2": ("SST-2", {"train.tsv": (("sentence",), "label", None), "dev.tsv": (("sentence",), "label", None),
                       "test.tsv": (("sentence",), None, "index")}),
    "cola": ("CoLA", {"train.tsv": ((3,), 1, None), "dev.tsv": ((3,), 1, None),
                      "test.tsv": (("sentence",), None, "index")}),
    "mrpc": ("MRPC", {f: (("#1 String", "#2 String"), "Quality", None) for f in ("train.tsv", "dev.tsv")}
             | {"test.tsv": (("#1 String", "#2 String"), None, "index")}),
    "qqp": ("QQP", {f: (("question1", "question2"), "is_duplicate", None) for f in ("train.tsv", "dev.tsv")}
            | {"test.tsv": (("question1", "question2"), None, "id")}),
    "stsb": ("STS-B", {f: (("sentence1", "sentence2"), "score", None) for f in ("train.tsv", "dev.tsv")}
             | {"test.tsv": (("sentence1", "sentence2"), None, "index")}),
    "mnli": ("MNLI", {f: (("sentence1", "sentence2"), "gold_label", None)
                      for f in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv")}
             | {f: (("sentence1", "sentence2"), None, "index") for f in ("test_matched.tsv", "test_mismatched.tsv",
                                                                           "diagnostic/diagnostic.tsv")}),
    "qnli": ("QNLI", {f: (("question", "sentence"), "label", None) for f in ("train.tsv", "dev.tsv")}
             | {"test.tsv": (("question", "sentence"), None, "index")}),
    "rte": ("RTE", {f: (("sentence1", "sentence2"), "label", None) for f in ("train.tsv", "dev.tsv")}
            | {"test.tsv": (("sentence1", "sentence2"), None, "index")}),
}
KEYS = {"mnli": ["train", "valid", "valid_mm", "test", "test_mm", "diagnostic"]}
SUBMISSIONS = {"AX Diagnostic": "AX.tsv"}  # GLUE's diagnostic set, predicted by the MNLI model


def naive_tsv(path, texts, label, index, n_columns=None):
    """The file read by splitting lines on tabs: (texts per field, labels, index), rows of the wrong
    width skipped."""
    with open(path, encoding="utf-8-sig") as f:
        rows = [line.split("\t") for line in f.read().split("\n") if line]
    if isinstance(texts[0], str):
        header, rows = rows[0], rows[1:]
        pos = {name: header.index(name) for name in [*texts, label, index] if name is not None}
        n_columns = len(header)
    else:
        pos = {k: k for k in [*texts, label]}
    rows = [r for r in rows if len(r) == n_columns]
    return ([[r[pos[t]].strip() for r in rows] for t in texts],
            [r[pos[label]] for r in rows] if label is not None else None,
            [r[pos[index]] for r in rows] if index is not None else None)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Every task's synthetic folder, under one root (as a GLUE download holds its tasks)."""
    root = tmp_path_factory.mktemp("data")
    return root, {name: write_synthetic(name, root, N_TRAIN, N_DEV, N_TEST, seed=3) for name in tasks.TASKS}


# ------------------------------------------------------------------------------------------------
# Readers on the real layouts
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(GLUE))
def test_glue_folders_read_as_distributed(synthetic, name):
    task, (folder_name, layout) = get_task(name), GLUE[name]
    folder = synthetic[1][name]
    assert os.path.basename(folder) == folder_name
    splits = task.read(folder)
    assert list(splits) == KEYS.get(name, ["train", "valid", "test"])
    for split, (file, (texts, label, index)) in zip(splits.values(), layout.items()):
        n_columns = 4 if name == "cola" and label is not None else None
        want_texts, want_labels, want_index = naive_tsv(os.path.join(folder, file), texts, label, index, n_columns)
        assert [list(t) for t in split.texts] == want_texts
        if label is None:  # a GLUE test set: predicted, into the server's file
            assert split.labels is None and split.index == want_index
            assert split.submission == SUBMISSIONS.get(split.title, split.title.replace(" Test", "") + ".tsv")
        elif task.label_names is None:
            np.testing.assert_allclose(split.labels, np.array(want_labels, dtype=np.float32))
        else:
            assert [task.label_names[y] for y in split.labels] == [w.strip() for w in want_labels]
            assert split.labels.dtype == np.int64 and split.submission is None
    sizes = [len(s) for s in splits.values()]
    assert sizes == ([N_TRAIN, N_DEV, N_DEV, N_TEST, N_TEST, N_TEST] if name == "mnli" else [N_TRAIN, N_DEV, N_TEST])


def test_split_titles_and_submission_names(synthetic):
    titles = {name: [(s.title, s.submission) for s in get_task(name).read(path).values()]
              for name, path in synthetic[1].items() if name != "rocstories"}
    assert titles["mnli"] == [("MNLI Train", None), ("MNLI-m Dev", None), ("MNLI-mm Dev", None),
                              ("MNLI-m Test", "MNLI-m.tsv"), ("MNLI-mm Test", "MNLI-mm.tsv"),
                              ("AX Diagnostic", "AX.tsv")]
    assert titles["sst2"][1:] == [("SST-2 Dev", None), ("SST-2 Test", "SST-2.tsv")]
    assert titles["stsb"][2] == ("STS-B Test", "STS-B.tsv")
    assert titles["snli"][1:] == [("SNLI Dev", None), ("SNLI Test", None)]
    assert titles["scitail"][2] == ("SciTail Test", None)
    assert titles["race"][2] == ("RACE Test", None)


def test_mrpc_starts_with_a_byte_order_mark(synthetic):
    path = os.path.join(synthetic[1]["mrpc"], "train.tsv")
    with open(path, "rb") as f:
        assert f.read(3) == b"\xef\xbb\xbf"
    assert len(get_task("mrpc").read(path.rsplit(os.sep, 1)[0])["train"]) == N_TRAIN


def test_cola_train_has_no_header(synthetic):
    with open(os.path.join(synthetic[1]["cola"], "train.tsv"), encoding="utf-8") as f:
        first = f.readline().rstrip("\n").split("\t")
    assert len(first) == 4 and first[1] in ("0", "1")  # a sentence, not a header
    assert len(get_task("cola").read(synthetic[1]["cola"])["train"]) == N_TRAIN


def test_unbalanced_quotes_are_plain_text(synthetic):
    path = os.path.join(synthetic[1]["mnli"], "train.tsv")
    with open(path, encoding="utf-8", newline="") as f:
        quote_aware = list(csv.reader(f, delimiter="\t"))
    assert len(quote_aware) - 1 != N_TRAIN  # a quote-aware reader runs a quoted field across lines
    premises = get_task("mnli").read(synthetic[1]["mnli"])["train"].texts[0]
    assert any(p.startswith('"') and p.count('"') == 1 for p in premises)


def test_malformed_qqp_rows_are_skipped_and_counted(synthetic):
    folder = synthetic[1]["qqp"]
    splits = get_task("qqp").read(folder)
    for key, file in (("train", "train.tsv"), ("valid", "dev.tsv")):
        with open(os.path.join(folder, file), encoding="utf-8") as f:
            n_bad = sum(1 for line in f if line.strip() and len(line.rstrip("\n").split("\t")) != 6)
        assert n_bad > 0 and splits[key].dropped == n_bad
        assert splits[key].notes == [f"skipped {n_bad} malformed rows (not 6 columns) in {os.path.join(folder, file)}"]
    assert splits["test"].dropped == 0 and splits["test"].notes == []


def test_snli_drops_pairs_without_gold_label(synthetic):
    folder = synthetic[1]["snli"]
    splits = get_task("snli").read(folder)
    for key, part in (("train", "train"), ("valid", "dev"), ("test", "test")):
        path = os.path.join(folder, f"snli_1.0_{part}.jsonl")
        with open(path, encoding="utf-8") as f:
            pairs = [json.loads(line) for line in f]
        kept = [p for p in pairs if p["gold_label"] != "-"]
        assert len(kept) < len(pairs) and splits[key].dropped == len(pairs) - len(kept)
        assert splits[key].texts[0] == [p["sentence1"] for p in kept]
        assert [tasks.NLI[y] for y in splits[key].labels] == [p["gold_label"] for p in kept]
        assert splits[key].notes == [f"dropped {len(pairs) - len(kept)} pairs with gold_label '-' (no majority) "
                                     f"in {path}"]


def test_scitail_has_no_header(synthetic):
    folder = synthetic[1]["scitail"]
    assert os.path.basename(folder) == "SciTailV1.1"
    splits = get_task("scitail").read(folder)
    path = os.path.join(folder, "tsv_format", "scitail_1.0_test.tsv")
    texts, labels, _ = naive_tsv(path, (0, 1), 2, None, n_columns=3)
    assert [list(t) for t in splits["test"].texts] == texts and len(texts[0]) == N_TEST
    assert [("entails", "neutral")[y] for y in splits["test"].labels] == labels


def test_race_json_folders_one_example_per_question(synthetic):
    folder = synthetic[1]["race"]
    splits = get_task("race").read(folder)
    for key, part in (("train", "train"), ("valid", "dev"), ("test", "test")):
        split, expected = splits[key], {}
        for level in ("middle", "high"):
            docs = [json.load(open(p, encoding="utf-8")) for p in glob.glob(os.path.join(folder, part, level, "*.txt"))]
            expected[level] = sorted((d["questions"][q], tuple(d["options"][q]), "ABCD".index(d["answers"][q]))
                                     for d in docs for q in range(len(d["questions"])))
        assert list(split.groups) == [f"RACE-m {part.title()}", f"RACE-h {part.title()}"]
        for (title, idx), level in zip(split.groups.items(), ("middle", "high")):
            got = sorted((split.texts[1][i], tuple(split.texts[k][i] for k in range(2, 6)), int(split.labels[i]))
                         for i in idx)
            assert got == expected[level], title
        assert len(split) == sum(len(v) for v in expected.values())
    assert [len(splits[k]) for k in ("train", "valid", "test")] == [N_TRAIN, N_DEV, N_TEST]


# ------------------------------------------------------------------------------------------------
# GLUE's diagnostic set (AX), an optional split of MNLI
# ------------------------------------------------------------------------------------------------

def write_diagnostic_full(path, pairs):
    """GLUE's diagnostic-full.tsv: the annotation columns, Premise, Hypothesis, Label."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    header = ["Lexical Semantics", "Predicate-Argument Structure", "Logic", "Knowledge", "Domain", "Premise",
              "Hypothesis", "Label"]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines("\t".join(row) + "\n" for row in
                     [header] + [["", "Negation" if i % 2 else "", "", "", "ACL", p, h, "neutral"]
                                 for i, (p, h) in enumerate(pairs)])


def test_mnli_diagnostic_is_read_where_glue_puts_it_and_is_optional(tmp_path):
    folder = copy_folder("mnli", tmp_path)  # tmp_path/MNLI/diagnostic/diagnostic.tsv, as GLUE's MNLI download
    inside = os.path.join(folder, "diagnostic", "diagnostic.tsv")
    texts, _, index = naive_tsv(inside, ("sentence1", "sentence2"), None, "index")
    split = get_task("mnli").read(folder)["diagnostic"]
    assert [list(t) for t in split.texts] == texts and split.index == index and split.labels is None
    assert split.submission == "AX.tsv"
    beside = tmp_path / "diagnostic" / "diagnostic.tsv"  # GLUE's download script: glue_data/diagnostic/ beside MNLI/
    os.makedirs(beside.parent)
    os.replace(inside, beside)
    for data_dir in (folder, str(tmp_path)):
        assert get_task("mnli").read(data_dir)["diagnostic"].index == index
    os.remove(beside)
    assert "diagnostic" not in get_task("mnli").read(folder)  # absent: no split, no error
    pairs = [("A man sleeps .", "Nobody sleeps ."), ('"Quoted premise .', "A hypothesis .")]
    write_diagnostic_full(os.path.join(folder, "diagnostic-full.tsv"), pairs)
    split = get_task("mnli").read(folder)["diagnostic"]
    assert list(zip(*split.texts)) == pairs and split.index is None  # numbered from 0 when submitted
    with open(os.path.join(folder, "diagnostic.tsv"), "w", encoding="utf-8") as f:  # diagnostic.tsv comes first
        f.write("index\tsentence1\tsentence2\n7\tOne .\tTwo .\n")
    assert get_task("mnli").read(folder)["diagnostic"].index == ["7"]
    with open(os.path.join(folder, "diagnostic.tsv"), "w", encoding="utf-8") as f:  # present but wrong: an error
        f.write("index\tsentence1\n7\tOne .\n")
    with pytest.raises(DataError, match=r"diagnostic.tsv, line 1: the header lacks column\(s\) 'sentence2'"):
        get_task("mnli").read(folder)


# ------------------------------------------------------------------------------------------------
# New inputs: the text fields, one file in a task's own format
# ------------------------------------------------------------------------------------------------

def test_text_fields_are_the_texts_each_task_reads(synthetic):
    for name, task in tasks.TASKS.items():
        splits = task.read(synthetic[1][name]) if name != "rocstories" else None
        n_texts = 3 if name == "rocstories" else len(splits["train"].texts)
        assert len(task.text_fields) == n_texts == len(set(task.text_fields)), name
    for name, (_, layout) in GLUE.items():  # GLUE's: the test file's column names
        assert get_task(name).text_fields == layout["test.tsv" if name != "mnli" else "test_matched.tsv"][0]
    assert get_task("race").text_fields == ("article", "question", "A", "B", "C", "D")
    assert get_task("snli").text_fields == ("sentence1", "sentence2")


def own_files(folder, name):
    """Files of a task's folder in each of its formats."""
    if name == "rocstories":
        return [os.path.join(folder, "cloze_test_test__spring2016 - cloze_test_ALL_test.csv")]
    if name == "scitail":
        return [os.path.join(folder, "tsv_format", "scitail_1.0_test.tsv")]
    if name == "snli":
        return [os.path.join(folder, "snli_1.0_test.jsonl")]
    if name == "race":
        return [sorted(glob.glob(os.path.join(folder, "test", "high", "*.txt")))[0]]
    return [os.path.join(folder, f) for f in GLUE[name][1] if not f.startswith("diagnostic")]


@pytest.mark.parametrize("name", [n for n in tasks.TASKS if n != "snli"])  # SNLI's JSON lines: predict.py's reader
def test_read_file_reads_each_of_the_tasks_own_files(synthetic, name):
    task, folder = get_task(name), synthetic[1][name]
    for path in own_files(folder, name):
        got = task.read_file(path)
        if name == "rocstories":
            with open(path, encoding="utf-8") as f:
                rows = list(csv.reader(f))[1:]
            expected = [[" ".join(r[1:5]) for r in rows], [r[5] for r in rows], [r[6] for r in rows]]
        elif name == "race":
            doc = json.load(open(path, encoding="utf-8"))
            expected = [[doc["article"].strip()] * len(doc["questions"]), doc["questions"],
                        *([o[k] for o in doc["options"]] for k in range(4))]
        elif name == "scitail":
            expected = naive_tsv(path, (0, 1), 2, None, n_columns=3)[0]
        else:
            texts, label, index = GLUE[name][1][os.path.basename(path)]
            expected = naive_tsv(path, texts, label, index, 4 if isinstance(texts[0], int) else None)[0]
        assert [list(t) for t in got.texts] == [list(t) for t in expected], path


def test_read_file_names_each_formats_problem(tmp_path):
    path = tmp_path / "new.tsv"
    path.write_text("text\nA fine film .\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"new.tsv: not in a format of SST-2's files \(line 1: the header lacks "
                                        r"column\(s\) 'sentence', 'index'; found \['text'\]; line 1: the header "
                                        r"lacks column\(s\) 'sentence', 'label'; found \['text'\]\)$"):
        get_task("sst2").read_file(str(path))


def test_parent_folder_is_accepted(synthetic):
    root, folders = synthetic
    for name in ("sst2", "mnli", "snli", "scitail", "race"):
        assert get_task(name).locate(str(root)) == folders[name]


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def append_line(path, line):
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def copy_folder(name, tmp_path):
    return write_synthetic(name, tmp_path, N_TRAIN, N_DEV, N_TEST, seed=5)


def n_lines(path):
    with open(path, encoding="utf-8-sig") as f:
        return len(f.read().rstrip("\n").split("\n"))


@pytest.mark.parametrize("name, file, line, n_columns", [
    ("sst2", "dev.tsv", "a film\t1\textra", 2),
    ("cola", "train.tsv", "gj04\t1\tJohn ate .", 4),
    ("mnli", "dev_mismatched.tsv", "1\t2\tthree", 16),  # 10 + label1-5 + gold_label
    ("rte", "test.tsv", "0\tjust one sentence", 3),
    ("scitail", "tsv_format/scitail_1.0_dev.tsv", "a premise\tentails", 3),
])
def test_wrong_column_count_names_file_and_line(tmp_path, name, file, line, n_columns):
    folder = copy_folder(name, tmp_path)
    path = os.path.join(folder, file)
    append_line(path, line)
    found = len(line.split("\t"))
    with pytest.raises(DataError, match=rf"{file}, line {n_lines(path)}: expected {n_columns} tab-separated "
                                        rf"columns, found {found}$"):
        get_task(name).read(folder)


@pytest.mark.parametrize("name, file, line, label, allowed", [
    ("sst2", "train.tsv", "a film\t2", "2", "0, 1"),
    ("mrpc", "dev.tsv", "yes\t1\t2\ta\tb", "yes", "0, 1"),
    ("qnli", "train.tsv", "9\ta\tb\tneutral", "neutral", "entailment, not_entailment"),
    ("scitail", "tsv_format/scitail_1.0_test.tsv", "a\tb\tcontradiction", "contradiction", "entails, neutral"),
])
def test_label_outside_the_set(tmp_path, name, file, line, label, allowed):
    folder = copy_folder(name, tmp_path)
    path = os.path.join(folder, file)
    append_line(path, line)
    with pytest.raises(DataError, match=rf"{file}, line {n_lines(path)}: label '{label}' is not one of {allowed}$"):
        get_task(name).read(folder)


def test_stsb_score_outside_zero_to_five(tmp_path):
    folder = copy_folder("stsb", tmp_path)
    path = os.path.join(folder, "train.tsv")
    append_line(path, "\t".join(["9", "g", "f", "y", "o", "s", "s", "a", "b", "5.2"]))
    with pytest.raises(DataError, match=rf"train.tsv, line {n_lines(path)}: score '5.2' is not a number from 0 to 5"):
        get_task("stsb").read(folder)


def test_snli_errors_name_file_and_line(tmp_path):
    folder = copy_folder("snli", tmp_path)
    path = os.path.join(folder, "snli_1.0_dev.jsonl")
    append_line(path, json.dumps({"sentence1": "a", "sentence2": "b", "gold_label": "unsure"}))
    with pytest.raises(DataError, match=rf"snli_1.0_dev.jsonl, line {n_lines(path)}: label 'unsure' is not one of "
                                        "entailment, neutral, contradiction$"):
        get_task("snli").read(folder)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"sentence1": "a", "sentence2": "b", "gold_label": "neutral"}) + "\n\n")
        f.write(json.dumps({"sentence1": "a", "gold_label": "neutral"}) + "\n")
    with pytest.raises(DataError, match=r"snli_1.0_dev.jsonl, line 3: expected an object with sentence1, sentence2 "
                                        "and gold_label; sentence2 missing"):
        get_task("snli").read(folder)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"sentence1": "a", "sentence2": None, "gold_label": "neutral"}) + "\n")
    with pytest.raises(DataError, match=r"snli_1.0_dev.jsonl, line 1: sentence2 is null; expected a string$"):
        get_task("snli").read(folder)
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"sentence1": "a",\n')
    with pytest.raises(DataError, match=r"snli_1.0_dev.jsonl, line 1: not valid JSON"):
        get_task("snli").read(folder)


@pytest.mark.parametrize("change, match", [
    (lambda d: d["options"][0].pop(), r"question 1: expected 4 options, found 3"),
    (lambda d: d["answers"].__setitem__(0, "E"), r"question 1: label 'E' is not one of A, B, C, D"),
    (lambda d: d.pop("article"), r"expected a JSON object with article, questions, options, answers"),
    (lambda d: d.__setitem__("questions", 3), r"questions is a number; expected a list, one entry per question"),
    (lambda d: d.__setitem__("article", None), r"the article is null; expected a string"),
    (lambda d: d["options"].__setitem__(0, "ABCD"), r"question 1: expected 4 options, found a string"),
    (lambda d: d["options"][0].__setitem__(2, None), r"question 1: the question and its options must be strings"),
])
def test_race_errors_name_file_and_question(tmp_path, change, match):
    folder = copy_folder("race", tmp_path)
    path = sorted(glob.glob(os.path.join(folder, "dev", "high", "*.txt")))[0]
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    change(doc)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    with pytest.raises(DataError, match=rf"{os.path.basename(path)}(, |: ){match}"):
        get_task("race").read(folder)


def test_race_split_without_questions(tmp_path):
    folder = copy_folder("race", tmp_path)
    for path in glob.glob(os.path.join(folder, "dev", "*", "*.txt")):
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"article": "A text.", "questions": [], "options": [], "answers": []}, f)
    with pytest.raises(DataError, match=r"RACE: no questions in dev/middle/\*.txt or dev/high/\*.txt$"):
        get_task("race").read(folder)


def test_not_the_tasks_folder_names_the_expected_files(synthetic, tmp_path):
    with pytest.raises(DataError, match=r"is not the MNLI folder: it lacks train.tsv, dev_matched.tsv, "
                                        r"dev_mismatched.tsv, test_matched.tsv, test_mismatched.tsv.*gluebenchmark"):
        get_task("mnli").read(str(tmp_path))
    with pytest.raises(DataError, match=r"is not the MNLI folder: it lacks dev_matched.tsv, dev_mismatched.tsv, "
                                        r"test_matched.tsv, test_mismatched.tsv\. Expected train.tsv"):
        get_task("mnli").read(synthetic[1]["sst2"])
    with pytest.raises(DataError, match=r"is not the RACE folder: it does not exist\. Expected train/middle/\*.txt, "
                                        r"train/high/\*.txt, dev/middle/\*.txt.*RACE/"):
        get_task("race").read(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"snli_1.0_train.jsonl.*\(in the folder snli_1.0/ as distributed"):
        get_task("snli").read(synthetic[1]["scitail"])


def test_parent_folder_with_an_incomplete_task_folder_names_what_it_lacks(tmp_path):
    folder = copy_folder("mnli", tmp_path)  # tmp_path/MNLI, as a GLUE download holds it
    os.remove(os.path.join(folder, "test_mismatched.tsv"))
    with pytest.raises(DataError, match=rf"^{re.escape(repr(folder))} is not the MNLI folder: it lacks "
                                        r"test_mismatched.tsv\. Expected train.tsv"):
        get_task("mnli").read(str(tmp_path))
    os.remove(os.path.join(folder, "train.tsv"))  # the task's folder itself: what it lacks, as before
    with pytest.raises(DataError, match=r"MNLI' is not the MNLI folder: it lacks train.tsv, test_mismatched.tsv\."):
        get_task("mnli").read(folder)


def test_a_data_file_given_as_the_folder_is_named_a_file(synthetic, tmp_path):
    path = os.path.join(synthetic[1]["sst2"], "train.tsv")
    with pytest.raises(DataError, match=rf"^{re.escape(repr(path))} is not the SST-2 folder: it is a file; --data_dir "
                                        r"is the folder that holds the files\. Expected train.tsv"):
        get_task("sst2").read(path)
    text = tmp_path / "corpus.txt"
    text.write_text("one line of text\n" * 5, encoding="utf-8")
    with pytest.raises(DataError, match=r"corpus.txt' is a file, not a folder: --dataset lm reads plain text files"):
        get_task("lm").read(str(text))


def test_not_utf8_and_unknown_task(tmp_path):
    folder = copy_folder("rte", tmp_path)
    with open(os.path.join(folder, "dev.tsv"), "ab") as f:
        f.write(b"7\t\xff\xfe\tb\tentailment\n")
    with open(os.path.join(folder, "dev.tsv"), "rb") as f:
        bad_line = len(f.read().splitlines())
    with pytest.raises(DataError, match=rf"dev.tsv, line {bad_line}, column 3: not UTF-8"):
        get_task("rte").read(folder)
    with pytest.raises(ValueError, match=r"unknown task 'glue'; known tasks: rocstories, sst2, cola, mrpc, qqp, "
                                         r"stsb, mnli, "
                                         r"qnli, rte, snli, scitail, race, lm"):
        get_task("glue")


# ------------------------------------------------------------------------------------------------
# Input transformations (the paper's Figure 1) and the cut rule
# ------------------------------------------------------------------------------------------------

def test_add_specials_appends_three_tokens():
    class Encoder:
        encoder = {"a</w>": 0, "b</w>": 1}

    specials = tasks.add_specials(Encoder)
    assert specials == Specials(2, 2, 3, 4, 3)
    assert list(Encoder.encoder)[2:] == ["_start_", "_delimiter_", "_classify_"]


def test_text_classification_tokens():
    seqs, n_cut = sequences_of(get_task("sst2"), ([[1, 2, 3], [4]],), SPECIALS, 512)
    assert seqs == [[[S, 1, 2, 3, C]], [[S, 4, C]]] and n_cut == 0


def test_entailment_tokens():
    seqs, _ = sequences_of(get_task("mnli"), ([[1, 2]], [[3, 4, 5]]), SPECIALS, 512)
    assert seqs == [[[S, 1, 2, D, 3, 4, 5, C]]]


def test_similarity_tokens_both_orderings():
    seqs, _ = sequences_of(get_task("stsb"), ([[1, 2]], [[3]]), SPECIALS, 512)
    assert seqs == [[[S, 1, 2, D, 3, C], [S, 3, D, 1, 2, C]]]


def test_multiple_choice_tokens():
    article, question, answers = [1, 2, 3], [4, 5], [[6], [7, 8], [9], [10, 11, 12]]
    seqs, _ = sequences_of(get_task("race"), ([article], [question], *[[a] for a in answers]), SPECIALS, 512)
    assert seqs == [[[S, 1, 2, 3, 4, 5, D, *a, C] for a in answers]]


def test_cut_takes_the_longer_sentence_first():
    premise, hypothesis = list(range(100, 110)), [1, 2, 3]
    seqs, n_cut = sequences_of(get_task("rte"), ([premise, [5]], [hypothesis, [6]]), SPECIALS, 10)
    assert seqs[0] == [[S, 100, 101, 102, 103, D, 1, 2, 3, C]]  # 10 tokens: 7 for texts, 3 specials
    assert seqs[1] == [[S, 5, D, 6, C]] and n_cut == 1


def test_cut_keeps_the_question_and_answers_of_race():
    article, question, answers = list(range(100, 150)), [1, 2, 3, 4, 5], [[6, 7], [8, 9, 10], [11] * 4, [12]]
    seqs, n_cut = sequences_of(get_task("race"), ([article], [question], *[[a] for a in answers]), SPECIALS, 30)
    assert n_cut == 1
    for seq, answer in zip(seqs[0], answers):
        assert seq == [S, *article[:18], *question, D, *answer, C]  # 18 + 5 + longest answer 4 + 3 = 30
    assert max(len(s) for s in seqs[0]) == 30


def test_cut_shares_a_spare_token():
    a, b = list(range(100, 107)), list(range(200, 207))
    seqs, _ = sequences_of(get_task("mrpc"), ([a], [b]), SPECIALS, 12)  # 9 text tokens for 7 + 7
    assert seqs[0] == [[S, *a[:5], D, *b[:4], C], [S, *b[:4], D, *a[:5], C]]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["sst2", "rte", "stsb", "race"]), st.lists(st.integers(0, 40), min_size=6, max_size=6),
       st.integers(3, 60))
def test_cut_rule_properties(name, lengths, max_tokens):
    task = get_task(name)
    n_fields = {"sst2": 1, "rte": 2, "stsb": 2, "race": 6}[name]
    fields = [list(range(1000 * (k + 1), 1000 * (k + 1) + n)) for k, n in enumerate(lengths[:n_fields])]
    (example,), n_cut = sequences_of(task, tuple([f] for f in fields), SPECIALS, max_tokens)
    (uncut,), _ = sequences_of(task, tuple([f] for f in fields), SPECIALS, 10**6)
    assert len(example) == task.n_sequences
    assert all(len(seq) <= max_tokens and seq[-1] == C and seq[0] == S for seq in example)
    kept = [[t for t in f if any(t in s for s in example)] for f in fields]
    assert all(k == f[:len(k)] for k, f in zip(kept, fields))  # each text keeps its first tokens
    longest = max(len(s) for s in example)
    assert n_cut == (longest < max(len(s) for s in uncut))
    if n_cut:
        assert longest == max_tokens  # no token cut that fits
        cut_lengths = [len(k) for k, f in zip(kept, fields) if len(k) < len(f)]
        assert min(cut_lengths) >= max(len(k) for k in kept) - 1  # only the longest texts lose tokens


@pytest.mark.parametrize("name", [*tasks.TASKS, "lm"])
def test_a_whole_split_is_transformed_as_example_by_example(name):
    """The sequences of a whole split, made with numpy at once, equal Figure 1 and the cut rule applied
    example by example as written out in conftest.reference_sequences (a language model: its stream
    cut into pieces), some examples cut and some not."""
    task = get_task(name)
    n_fields = {"text": 1, "pair": 2, "both_orders": 2, "stream": 1}.get(task.form)
    n_fields = n_fields or 1 + task.n_choices + (name == "race")  # RACE: article, question, answers
    rng = np.random.default_rng(4)
    texts = [[rng.integers(0, 50, rng.integers(0, 70)).tolist() for _ in range(300)] for _ in range(n_fields)]
    got, n_cut = sequences_of(task, texts, SPECIALS, 64)
    if name == "lm":
        stream = [i for text in texts[0] for i in text]
        expected, n_expected = [[stream[k * 64:(k + 1) * 64]] for k in range(len(stream) // 64)], 0
    else:
        expected, n_expected = reference_sequences(task, texts, SPECIALS, 64)
        assert 0 < n_cut < 300
    assert got == expected and n_cut == n_expected


def test_too_few_tokens_for_the_specials():
    with pytest.raises(ValueError, match="max_tokens=2 cannot hold the 3 special tokens"):
        sequences_of(get_task("rte"), ([[1]], [[2]]), SPECIALS, 2)


def test_similarity_head_adds_the_two_orderings():
    """The model's similarity score equals linear(h[classify of a,b] + h[classify of b,a]), computed here."""
    seqs, _ = sequences_of(get_task("stsb"), ([[1, 2, 3]], [[4, 5]]), Specials(60, 60, 61, 62), 16)
    X, M = map(torch.from_numpy, padded_arrays(seqs, 16, 63))
    torch.manual_seed(0)
    model = DoubleHeadModel(tiny_config(), 62, get_task("stsb").head, vocab=60 + 3 + 16, n_ctx=16).eval()
    with torch.no_grad():
        _, score = model(X)
        h = model.transformer(X, model.transformer.embedding_matrix()).view(1, 2, 16, -1)
        summed = h[0, 0, len(seqs[0][0]) - 1] + h[0, 1, len(seqs[0][1]) - 1]
        expected = summed @ model.task_head.linear.weight[0] + model.task_head.linear.bias[0]
    assert score.shape == (1,)
    torch.testing.assert_close(score[0], expected)


# ------------------------------------------------------------------------------------------------
# Metrics, predictions, losses
# ------------------------------------------------------------------------------------------------

def binary_counts(y, p):
    return [int(np.sum((y == a) & (p == b))) for a, b in ((1, 1), (0, 0), (0, 1), (1, 0))]  # tp, tn, fp, fn


def ranks(x):
    return np.argsort(np.argsort(x)).astype(np.float64)


@pytest.mark.parametrize("seed", range(5))
def test_metrics_against_their_formulas(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    logits = rng.normal(size=(200, 2)) + 0.8 * np.eye(2)[y]  # better than chance
    p = logits.argmax(1)
    tp, tn, fp, fn = binary_counts(y, p)
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert get_task("cola").metrics(logits, y) == pytest.approx({"MCC": 100 * mcc})
    assert get_task("sst2").metrics(logits, y) == pytest.approx({"Accuracy": 100 * np.mean(p == y)})
    single = logits[:, 1] - logits[:, 0]  # MRPC's one logit
    got = get_task("mrpc").metrics(single, y)
    assert list(got) == ["F1", "Accuracy"]
    assert got == pytest.approx({"F1": 100 * 2 * tp / (2 * tp + fp + fn), "Accuracy": 100 * np.mean(p == y)})
    three = rng.normal(size=(200, 3))
    y3 = rng.integers(0, 3, 200)
    assert get_task("mnli").metrics(three, y3)["Accuracy"] == pytest.approx(100 * np.mean(three.argmax(1) == y3))
    scores, gold = rng.normal(size=200), rng.uniform(0, 5, 200)
    scores += gold
    got = get_task("stsb").metrics(scores, gold)
    assert list(got) == ["Pearson", "Spearman"]
    assert got["Pearson"] == pytest.approx(100 * np.corrcoef(scores, gold)[0, 1])
    assert got["Spearman"] == pytest.approx(100 * np.corrcoef(ranks(scores), ranks(gold))[0, 1])


def test_constant_scores_correlate_zero():
    assert get_task("stsb").metrics(np.ones(5), np.arange(5.0)) == {"Pearson": 0.0, "Spearman": 0.0}


def test_logits_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"MNLI: logits of shape \[4, 2\]; expected \[n, 3\]"):
        get_task("mnli").metrics(np.zeros((4, 2)), np.zeros(4))
    with pytest.raises(ValueError, match=r"STS-B: logits of shape \[4, 2\]; expected \[n\]"):
        get_task("stsb").predictions(np.zeros((4, 2)))


def test_predictions_are_what_glue_wants():
    assert get_task("sst2").predictions(np.array([[0.1, 0.3], [2.0, -1.0]])) == ["1", "0"]
    assert get_task("mnli").predictions(np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]])) == \
        ["contradiction", "neutral", "entailment"]
    assert get_task("qnli").predictions(np.array([[0.0, 1.0]])) == ["not_entailment"]
    assert get_task("qqp").predictions(np.array([0.2, -0.1])) == ["1", "0"]
    assert get_task("stsb").predictions(np.array([3.14159, -0.5])) == ["3.142", "-0.500"]
    assert get_task("race").predictions(np.array([[0, 0, 3, 1]])) == ["C"]


def test_probabilities_against_their_formulas():
    rng = np.random.default_rng(1)
    three = rng.normal(size=(5, 3))
    softmax = np.exp(three) / np.exp(three).sum(1, keepdims=True)
    np.testing.assert_allclose(get_task("mnli").probabilities(three), softmax, rtol=1e-12)
    one = rng.normal(size=5)  # MRPC, QQP: one logit, class 1's
    np.testing.assert_allclose(get_task("mrpc").probabilities(one),
                               np.stack([1 / (1 + np.exp(one)), 1 / (1 + np.exp(-one))], 1), rtol=1e-12)
    four = rng.normal(size=(5, 4))  # RACE: over the answers
    np.testing.assert_allclose(get_task("race").probabilities(four), np.exp(four) / np.exp(four).sum(1, keepdims=True),
                               rtol=1e-12)
    assert get_task("stsb").probabilities(one) is None
    for name, logits in (("mnli", three), ("qqp", one), ("race", four)):
        task = get_task(name)
        assert [task.label_names[i] for i in task.probabilities(logits).argmax(1)] == task.predictions(logits)


def test_race_report_gives_middle_high_and_all(synthetic):
    split = get_task("race").read(synthetic[1]["race"])["test"]
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(split), 4))
    right = logits.argmax(1) == split.labels
    middle, high = split.groups.values()
    expected = [f"RACE-m Test Accuracy: {100 * right[middle].mean():.2f}",
                f"RACE-h Test Accuracy: {100 * right[high].mean():.2f}",
                f"RACE Test Accuracy: {100 * right.mean():.2f}"]
    assert get_task("race").report_lines(split, logits) == expected


def test_losses_against_their_formulas():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 3), torch.tensor([0, 2, 1, 1, 0, 2])
    expected = -logits.log_softmax(-1)[torch.arange(6), y]
    torch.testing.assert_close(get_task("mnli").losses(logits, y), expected)
    one, y2 = torch.randn(6), torch.tensor([0, 1, 1, 0, 1, 0])
    p = torch.sigmoid(one)
    torch.testing.assert_close(get_task("mrpc").losses(one, y2), -(y2 * p.log() + (1 - y2) * (1 - p).log()))
    # two-class softmax on (0, logit) is the same classifier
    torch.testing.assert_close(get_task("mrpc").losses(one, y2),
                               F.cross_entropy(torch.stack([torch.zeros(6), one], 1), y2, reduction="none"))
    scores = torch.rand(6) * 5
    torch.testing.assert_close(get_task("stsb").losses(one, scores), (one - scores) ** 2)


def test_every_task_is_declared():
    heads = {name: task.head for name, task in tasks.TASKS.items()}
    assert heads == {"rocstories": "multiple_choice",
                     "sst2": ("classification", 2), "cola": ("classification", 2), "mrpc": "similarity",
                     "qqp": "similarity", "stsb": "similarity", "mnli": "inference", "qnli": ("classification", 2),
                     "rte": ("classification", 2), "snli": "inference", "scitail": ("classification", 2),
                     "race": "multiple_choice"}
    assert {n: t.n_sequences for n, t in tasks.TASKS.items() if t.n_sequences != 1} == \
        {"rocstories": 2, "mrpc": 2, "qqp": 2, "stsb": 2, "race": 4}


def test_rocstories_declaration_keeps_the_original_split_and_cut(synthetic):
    """The original's split (n_valid held out with its seed) and cut (each part to n_ctx // 2 - 2)."""
    import dataclasses

    from datasets import rocstories

    task = dataclasses.replace(get_task("rocstories"), n_valid=N_DEV)
    splits = task.read(synthetic[1]["rocstories"])
    train, valid, test = rocstories(synthetic[1]["rocstories"], n_valid=N_DEV)
    assert splits["train"].texts == tuple(train[:3]) and list(splits["valid"].labels) == list(valid[3])
    assert splits["test"].submission == "ROCStories.tsv" and len(splits["test"]) == N_TEST
    s = Specials(100, 100, 101, 102)
    seqs, n_cut = sequences_of(task, ([list(range(10))], [[50, 51, 52]], [[60]]), s, 12)
    assert seqs == [[[100, 0, 1, 2, 3, 101, 50, 51, 52, 102], [100, 0, 1, 2, 3, 101, 60, 102]]] and n_cut == 1


@pytest.mark.parametrize("name, pattern", [
    ("snli", "snli_1.0_dev.jsonl"), ("scitail", "tsv_format/scitail_1.0_dev.tsv"), ("race", "dev/high/*.txt"),
    ("cola", "dev.tsv"), ("lm", "b.txt")])
def test_every_reader_names_the_line_and_column_of_a_byte_that_is_not_utf8(tmp_path, name, pattern):
    import glob

    if name == "lm":
        folder = tmp_path / "corpus"
        folder.mkdir()
        (folder / "a.txt").write_text("one line of text\n" * 5)
        (folder / "b.txt").write_text("another line\n" * 5)
        folder = str(folder)
    else:
        folder = copy_folder(name, tmp_path)
    path = sorted(glob.glob(os.path.join(folder, pattern)))[0]
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    k = 1 if len(lines) > 1 and lines[1] else 0  # line 2, or line 1 of a one-line file (RACE's JSON)
    lines[k] = lines[k][:2] + b"\xe9" + lines[k][2:]  # Latin-1 e-acute at column 3
    with open(path, "wb") as f:
        f.write(b"\n".join(lines))
    with pytest.raises(DataError, match=rf"{re.escape(os.path.basename(path))}, line {k + 1}, column 3: not UTF-8"):
        get_task(name).read(folder)


def test_the_objective_outputs_and_selection_each_task_declares():
    """What the training engine asks of a task instead of asking which task it runs."""
    from datasets import Split

    lm, logits, y = torch.tensor([2.0, 4.0]), torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1])
    roc = get_task("rocstories")
    task_loss = F.cross_entropy(logits, y).item()
    assert roc.objective(lm, logits, y, 0.5).item() == pytest.approx(task_loss + 0.5 * 3.0)
    assert roc.objective(lm, logits, y, 0).item() == pytest.approx(task_loss)
    assert roc.uses_lm(True, 0.5) and not roc.uses_lm(True, 0) and not roc.uses_lm(False, 0.5)
    assert roc.outputs(lm, logits) is logits and roc.selection_score({"Accuracy": 80.0}) == 80.0
    assert roc.configured(n_valid=40).n_valid == 40 and get_task("sst2").configured(n_valid=40) is get_task("sst2")
    language_model = get_task("lm")
    assert language_model.head is None and language_model.special_tokens == () and language_model.presets
    assert language_model.objective(lm, None, y, 0).item() == 3.0 and language_model.uses_lm(False, 0)
    assert language_model.outputs(lm, None) is lm
    assert language_model.metrics(np.array([2.0, 4.0]), None) == {"Perplexity": pytest.approx(np.exp(3.0))}
    assert language_model.selection_score({"Perplexity": 5.0}) == -5.0  # lower is better
    valid = Split((["a text"],), None, "LM Valid")
    assert language_model.report_lines(valid, np.array([2.0, 4.0])) == [f"LM Valid Perplexity: {np.exp(3.0):.2f}"]
    assert roc.report_lines(Split((["a"],), None, "ROCStories Test"), np.zeros((1, 2))) == []  # no labels


@pytest.mark.parametrize("name", ["sst2", "mrpc", "stsb", "mnli", "race"])
def test_the_metrics_of_a_submission_are_those_of_its_logits(name):
    """analysis.py scores a submission file: its text values give the figures of the logits they came from."""
    task, rng = get_task(name), np.random.default_rng(0)
    n_out = {"sst2": 2, "mnli": 3, "race": 4}.get(name)
    logits = rng.standard_normal((40, n_out) if n_out else 40).astype(np.float32)
    labels = rng.uniform(0, 5, 40).astype(np.float32) if name == "stsb" else rng.integers(0, n_out or 2, 40)
    rows = list(enumerate(task.predictions(logits), 2))
    expected = task.metrics(logits, labels)
    got = task.metrics_of_predictions(rows, labels, "sub.tsv")
    assert got.keys() == expected.keys()
    for metric in got:  # STS-B's scores are written with 3 decimals
        assert got[metric] == pytest.approx(expected[metric], abs=0.05 if name == "stsb" else 0)
    with pytest.raises(DataError, match=r"^sub.tsv, line 3: prediction 'x' is not (one of|a score)"):
        task.metrics_of_predictions([(2, rows[0][1]), (3, "x")], labels[:2], "sub.tsv")
