"""predict.py: a fine-tune labels new inputs from the command line, a TSV or JSON-lines file or its task's own
files; its predictions are the run's submission, its probabilities the model's own; clear errors."""

import csv
import json
import os
import re

import numpy as np
import pytest
import torch

import predict
import train
from checkpoints import load_model, model_state, save_best_params
from conftest import sequences_of, task_arguments, tiny_config
from datasets import ROC_TEST
from model_pytorch import ModelSpec, build_model
from tasks import get_task
from text_utils import TextEncoder

pytestmark = pytest.mark.slow  # each test fine-tunes a tiny model first (a few seconds each)

SUBMITTED = {  # task -> [(its test file in the task's folder, the submission file its run wrote)]
    "cola": [("test.tsv", "CoLA.tsv")], "sst2": [("test.tsv", "SST-2.tsv")], "mrpc": [("test.tsv", "MRPC.tsv")],
    "stsb": [("test.tsv", "STS-B.tsv")], "qqp": [("test.tsv", "QQP.tsv")], "qnli": [("test.tsv", "QNLI.tsv")],
    "rte": [("test.tsv", "RTE.tsv")],
    "mnli": [("test_matched.tsv", "MNLI-m.tsv"), ("test_mismatched.tsv", "MNLI-mm.tsv"),
             (os.path.join("diagnostic", "diagnostic.tsv"), "AX.tsv")],
}


@pytest.fixture(scope="module")
def rocstories_run(task_folders, tmp_path_factory):
    """A one-epoch ROCStories fine-tune with --submit: its output folder."""
    out = tmp_path_factory.mktemp("roc")
    assert train.main(task_arguments(task_folders, "rocstories", out, "--submit", "--n_iter", "1")) == 0
    return out


def best_of(run):
    return str(run / "best_params.safetensors")


def run_predict(capsys, *argv):
    """(exit status, stdout, stderr) of predict.py."""
    status = predict.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


# ----------------------------------------------------------------------------- the run's own predictions

@pytest.mark.parametrize("name", list(SUBMITTED))
def test_predictions_of_a_test_file_are_those_submit_wrote(glue_runs, task_folders, tmp_path, name, capsys):
    """The GLUE server's format (--labels_only) from the run's kept parameters: byte for byte the file of
    --submit, GLUE's diagnostic set (AX.tsv) included; QQP's malformed rows skipped in both, and said so."""
    submission, runs = glue_runs
    folder = get_task(name).locate(task_folders[name][0])
    for test_file, submitted in SUBMITTED[name]:
        path = os.path.join(folder, test_file)
        if name == "qqp":  # a question broken over two lines, as in QQP's files
            lines = open(path, encoding="utf-8").read().splitlines(keepends=True)
            path = str(tmp_path / "test.tsv")
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(lines[:5] + ["999\tHow do I fix my\n", "kite?\tWhat is the best way?\n"] + lines[5:])
        out = tmp_path / submitted
        status, _, err = run_predict(capsys, "--model_path", best_of(runs[name]), "--input", path, "--labels_only",
                                     "--output", str(out))
        assert status == 0, err
        assert out.read_text() == (submission / submitted).read_text(), submitted
        if name == "qqp":
            assert "skipped 2 malformed rows (not 3 columns)" in err and "they get no prediction" in err


def test_story_cloze_test_file_gives_the_submission(rocstories_run, task_folders, tmp_path, capsys):
    """ROCStories' own CSV file, and its own cut rule (each part to the run's n_ctx // 2 - 2)."""
    out = tmp_path / "ROCStories.tsv"
    status, _, err = run_predict(capsys, "--model_path", best_of(rocstories_run / "save" / "run"), "--input",
                                 os.path.join(task_folders["rocstories"][0], ROC_TEST), "--labels_only",
                                 "--output", str(out))
    assert status == 0, err
    assert out.read_text() == (rocstories_run / "sub" / "ROCStories.tsv").read_text()


# ----------------------------------------------------------------------------- probabilities: the model's own

def reference_logits(path, model_dir, texts, form):
    """The task logits of each input by hand: the file's model (checkpoints.load_model) without a plan (the TF
    graph's outputs) on sequences written out from Figure 1, one input at a time."""
    model, spec = load_model(path)
    model.eval()
    encoder = TextEncoder(str(model_dir / "encoder.json"), str(model_dir / "vocab.bpe"))
    start, delimiter, clf = spec.n_vocab, spec.n_vocab + 1, spec.n_vocab + 2
    out = []
    for example in zip(*texts):
        ids = [encoder.encode([text], verbose=False)[0] for text in example]
        if form == "text":
            seqs = [[start, *ids[0], clf]]
        elif form == "pair":
            seqs = [[start, *ids[0], delimiter, *ids[1], clf]]
        else:  # both orders
            seqs = [[start, *ids[0], delimiter, *ids[1], clf], [start, *ids[1], delimiter, *ids[0], clf]]
        T = len(seqs[0])
        x = torch.tensor([[[[t, spec.n_vocab + spec.n_special + p] for p, t in enumerate(s)] for s in seqs]])
        with torch.no_grad():
            out.append(model(x)[1][0].double().numpy())
        assert T <= spec.n_ctx
    return np.stack(out)


@pytest.mark.parametrize("name, form", [("sst2", "text"), ("mnli", "pair"), ("mrpc", "both_orders")])
def test_probabilities_are_the_models_own(glue_runs, task_folders, name, form):
    run = glue_runs[1][name]
    task = get_task(name)
    texts = [list(field[:9]) for field in task.read(task_folders[name][0])["valid"].texts]
    for path in (best_of(run), str(run / "checkpoint.pt")):  # either file of the run
        got = predict.Predictor(path).predict(texts)
        logits = reference_logits(path, task_folders[name][1], texts, form)
        if form == "both_orders":  # one logit, class 1's
            expected = np.stack([1 / (1 + np.exp(logits)), 1 / (1 + np.exp(-logits))], 1)
        else:
            expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        np.testing.assert_allclose(got.probabilities, expected, atol=2e-6)
        assert got.values == [task.label_names[i] for i in expected.argmax(1)]
        assert got.index == list(range(9)) and got.label_names == task.label_names


def test_a_score_task_predicts_scores_without_probabilities(glue_runs, capsys):
    status, out, _ = run_predict(capsys, "--model_path", best_of(glue_runs[1]["stsb"]), "--text", "A man sleeps .",
                                 "--text_b", "A man is asleep .")
    assert status == 0
    header, row = out.splitlines()
    assert header == "index\tprediction" and re.fullmatch(r"0\t-?\d+\.\d{3}", row)


# ----------------------------------------------------------------------------- files in and out

def parse_tsv(text):
    rows = list(csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[0], rows[1:]


def test_jsonl_and_tsv_round_trips(glue_runs, task_folders, tmp_path, capsys):
    """Inputs written as JSON lines and as a TSV, predicted into JSON lines and TSV: read back, the same
    labels and probabilities as the Python call and as --text / --text_b."""
    best = best_of(glue_runs[1]["mnli"])
    premises, hypotheses = (list(f[:12]) for f in get_task("mnli").read(task_folders["mnli"][0])["valid"].texts)
    premises[3] = 'A "quoted premise, with a comma .'
    expected = predict.Predictor(best).predict([premises, hypotheses], index=[f"id{i}" for i in range(12)])
    labels = ("entailment", "neutral", "contradiction")
    jsonl, tsv = tmp_path / "in.jsonl", tmp_path / "in.tsv"
    jsonl.write_text("".join(json.dumps({"id": i, "sentence2": h, "sentence1": p, "index": f"id{i}"}) + "\n"
                             for i, (p, h) in enumerate(zip(premises, hypotheses))))
    tsv.write_text("pairID\tsentence1\tsentence2\tindex\n"
                   + "".join(f"{i}e\t{p}\t{h}\tid{i}\n" for i, (p, h) in enumerate(zip(premises, hypotheses))))
    for source in (jsonl, tsv):
        out = tmp_path / f"{source.stem}_{source.suffix[1:]}.jsonl"
        assert run_predict(capsys, "--model_path", best, "--input", str(source), "--output", str(out))[0] == 0
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["index"] for r in records] == expected.index
        assert [r["prediction"] for r in records] == expected.values
        assert [[r["probabilities"][k] for k in labels] for r in records] == expected.probabilities.tolist()
        out = tmp_path / f"{source.stem}_{source.suffix[1:]}.tsv"
        assert run_predict(capsys, "--model_path", best, "--input", str(source), "--output", str(out))[0] == 0
        header, rows = parse_tsv(out.read_text())
        assert header == ["index", "prediction", "p_entailment", "p_neutral", "p_contradiction"]
        assert [r[:2] for r in rows] == [[i, v] for i, v in zip(expected.index, expected.values)]
        assert [[float(p) for p in r[2:]] for r in rows] == expected.probabilities.tolist()
    argv = [a for p, h in zip(premises[:3], hypotheses[:3]) for a in ("--text", p, "--text_b", h)]
    status, out, _ = run_predict(capsys, "--model_path", best, *argv)
    header, rows = parse_tsv(out)
    assert status == 0 and [r[1] for r in rows] == expected.values[:3] and [r[0] for r in rows] == ["0", "1", "2"]
    assert [[float(p) for p in r[2:]] for r in rows] == expected.probabilities[:3].tolist()


def examples(inputs, n_cut):
    """Predictor.sequences' EncodedSplit as lists (per input, per sequence, the ids), and n_cut."""
    rows, n = inputs.sequences.tolist(), inputs.n_sequences
    return [rows[i:i + n] for i in range(0, len(rows), n)], n_cut


def test_inputs_longer_than_the_model_are_cut_by_the_tasks_rule(glue_runs, capsys):
    """n_ctx is the longest sequence of the run's data; a longer input loses tokens from the end of its
    longer text (the cut rule), keeps its specials, and is counted."""
    predictor = predict.Predictor(best_of(glue_runs[1]["mnli"]))
    long_text = " ".join(["anna walked to the park ."] * 40)
    texts = [[long_text, "a short one ."], ["ben went home .", "nobody walked ."]]
    sequences, n_cut = examples(*predictor.sequences(texts))
    encoded = [predictor.text_encoder.encode(field, verbose=False) for field in texts]
    n_ctx = predictor.spec.n_ctx
    assert n_ctx < 40 and len(sequences[0][0]) == n_ctx and n_cut == 1
    assert sequences[0][0] == sequences_of(get_task("mnli"), [encoded[0][:1], encoded[1][:1]], predictor.specials,
                                           n_ctx)[0][0][0]
    s = predictor.specials
    assert sequences[1][0] == [s.start, *encoded[0][1], s.delimiter, *encoded[1][1], s.clf_token]  # whole
    status, _, err = run_predict(capsys, "--model_path", best_of(glue_runs[1]["mnli"]), "--text", long_text,
                                 "--text_b", "ben went home .")
    assert status == 0 and "1 inputs were cut to fit (longer examples are cut by the rule in docs/tasks.md)" in err


def test_story_cloze_inputs_keep_the_runs_cut(rocstories_run):
    """ROCStories cuts each part to n_ctx // 2 - 2 of the run's --n_ctx (128 here: 62 tokens), not of the model's
    n_ctx (the data's longest sequence, 83): inputs are cut as the run cut its data; one that still does not fit
    the model's positions is cut by the same rule to them."""
    predictor = predict.Predictor(best_of(rocstories_run / "save" / "run"))
    n_ctx, encode, s = predictor.spec.n_ctx, predictor.text_encoder.encode, predictor.specials
    run_cut, model_cut = 128 // 2 - 2, n_ctx // 2 - 2
    story = "anna walked to the market ."
    while len(encode([story], verbose=False)[0]) <= n_ctx // 2:
        story += " anna walked to the market ."
    ending, long_ending = "she smiled .", " ".join(["she smiled and laughed ."] * 6)
    ids = {text: encode([text], verbose=False)[0] for text in (story, ending, long_ending, story * 4)}
    assert model_cut < len(ids[story]) < n_ctx - 10 and model_cut < len(ids[long_ending]) < run_cut
    (seqs,), n_cut = examples(*predictor.sequences([[story], [ending], [ending]]))  # the model's own n_ctx would cut it
    assert n_cut == 0 and seqs[0] == [s.start, *ids[story], s.delimiter, *ids[ending], s.clf_token]
    (seqs,), n_cut = examples(*predictor.sequences([[story * 4], [ending], [ending]]))  # cut as the run cut
    assert n_cut == 1 and seqs[0] == [s.start, *ids[story * 4][:run_cut], s.delimiter, *ids[ending], s.clf_token]
    (seqs,), n_cut = examples(*predictor.sequences([[story * 4], [long_ending], [ending]]))  # 62 + 40 + 3 > n_ctx
    assert n_cut == 1 and seqs[0] == [s.start, *ids[story * 4][:model_cut], s.delimiter,
                                      *ids[long_ending][:model_cut], s.clf_token]


# ----------------------------------------------------------------------------- clear errors

def test_a_file_without_the_tasks_fields_is_one_line(glue_runs, tmp_path, capsys):
    best = best_of(glue_runs[1]["mnli"])
    wrong = tmp_path / "new.tsv"
    wrong.write_text("premise\thypothesis\nA man sleeps .\tHe is awake .\n")
    status, _, err = run_predict(capsys, "--model_path", best, "--input", str(wrong))
    assert status == 1 and len(err.splitlines()) == 1
    assert re.match(r"error: .*new.tsv: expected a TSV whose first row names MNLI's text fields \(sentence1, "
                    r"sentence2; found \['premise', 'hypothesis'\]\), JSON lines \(.jsonl\) with those keys, or a "
                    r"file of MNLI's own: not in a format of MNLI's files \(line 1: the header lacks", err), err
    lines = tmp_path / "new.jsonl"
    lines.write_text(json.dumps({"sentence1": "a", "sentence2": "b"}) + "\n" + json.dumps({"sentence1": "c"}) + "\n")
    status, _, err = run_predict(capsys, "--model_path", best, "--input", str(lines))
    assert status == 1 and re.fullmatch(r"error: .*new.jsonl, line 2: expected an object with sentence1, sentence2; "
                                        r"sentence2 missing\n", err), err
    lines.write_text(json.dumps({"sentence1": "a", "sentence2": None}) + "\n")
    status, _, err = run_predict(capsys, "--model_path", best, "--input", str(lines))
    assert status == 1 and "new.jsonl, line 1: sentence2 is null; expected a string" in err


@pytest.mark.parametrize("argv, expected", [
    (["--text", "a"], r"MNLI takes pairs \(sentence1, sentence2\): give one --text_b per --text \(1 --text, 0 "
                      r"--text_b\)"),
    (["--text", "a", "--text_b", "b", "--input", "x.tsv"], r"give the inputs either on the command line"),
    ([], r"give the inputs either on the command line"),
    (["--text", "a", "--text_b", "b", "--batch_size", "0"], r"--batch_size 0 is invalid"),
    (["--text", "a", "--text_b", "b", "--device", "cuda:99"], r"--device cuda:99: this machine has"),
])
def test_command_line_mistakes_are_one_line(glue_runs, argv, expected, capsys):
    status, _, err = run_predict(capsys, "--model_path", best_of(glue_runs[1]["mnli"]), *argv)
    assert status == 1 and re.fullmatch(rf"error: {expected}.*\n", err), err


def test_single_text_and_multiple_choice_tasks_refuse_what_has_no_place(glue_runs, rocstories_run, capsys):
    status, _, err = run_predict(capsys, "--model_path", best_of(glue_runs[1]["sst2"]), "--text", "a", "--text_b", "b")
    assert status == 1 and "SST-2 takes one text per input (sentence): --text_b has no place" in err
    status, _, err = run_predict(capsys, "--model_path", best_of(rocstories_run / "save" / "run"), "--text", "a")
    assert status == 1 and "ROCStories takes 3 texts per input (story, ending1, ending2): give them in a file" in err


def test_a_model_file_that_is_not_a_fine_tune_is_refused(task_folders, tmp_path, capsys):
    """A pre-trained weights folder, a language model's file, a state dict that records nothing, no file."""
    weights = task_folders["sst2"][1]
    n_vocab = len(json.loads((weights / "encoder.json").read_text()))
    spec = ModelSpec(tiny_config(), n_vocab, 0, 16)
    lm = tmp_path / "lm.safetensors"
    save_best_params(model_state(build_model(spec)), str(lm), spec, {"dataset": "lm"})
    bare = tmp_path / "bare.pt"
    torch.save(model_state(build_model(spec)), bare)
    for path, expected in [(weights, r"is a weights folder \(pre-trained or exported\), not a fine-tune"),
                           (lm, r"lm.safetensors is a language model \(--dataset lm\) without a task head"),
                           (bare, r"bare.pt records no model spec and task, as a file of train.py does"),
                           (tmp_path / "none.pt", r"checkpoint file .*none.pt' does not exist")]:
        status, _, err = run_predict(capsys, "--model_path", str(path), "--text", "a film")
        assert status == 1 and re.fullmatch(rf"error: .*{expected}.*\n", err), err


def test_the_python_call_refuses_texts_that_do_not_fit_the_task(glue_runs):
    predictor = predict.Predictor(best_of(glue_runs[1]["mnli"]))
    for texts, index, expected in [
        (["a", "b"], None, r"MNLI takes 2 text field\(s\) per input \(sentence1, sentence2\): give one list"),
        ([["a"]], None, r"MNLI takes 2 text field\(s\) per input"),
        ([["a", "b"], ["c"]], None, r"expected as many texts in each field \(sentence1, sentence2\), at least one; "
                                    r"got \[2, 1\]"),
        ([[], []], None, r"at least one; got \[0, 0\]"),
        ([["a"], [None]], None, r"every text must be a string"),
        ([["a"], ["b"]], [1, 2], r"2 index values for 1 inputs"),
    ]:
        with pytest.raises(predict.PredictError, match=expected):
            predictor.predict(texts, index)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_the_same_as_on_the_cpu(glue_runs, task_folders):
    best = best_of(glue_runs[1]["mnli"])
    texts = [list(f) for f in get_task("mnli").read(task_folders["mnli"][0])["valid"].texts]
    cpu = predict.Predictor(best, device="cpu").predict(texts)
    gpu = predict.Predictor(best).predict(texts)
    assert gpu.values == cpu.values
    np.testing.assert_allclose(gpu.probabilities, cpu.probabilities, atol=1e-4)
