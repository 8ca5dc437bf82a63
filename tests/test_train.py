"""train.py end to end on a small synthetic ROCStories folder: outputs, resume, torchrun, failures."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import analysis
import train
from conftest import ROOT
from datasets import ROC_TEST, rocstories, rocstories_test_labels, write_synthetic_rocstories
from random_weights import write_openai_weights
from text_utils import learn_bpe

SIZES = ["--n_embd", "32", "--n_head", "4", "--n_layer", "2", "--n_transfer", "2", "--n_batch", "4", "--n_gpu", "4",
         "--n_valid", "40", "--n_iter", "2", "--lr", "1e-3", "--eval_batch", "16"]
NO_DROPOUT = ["--embd_pdrop", "0", "--attn_pdrop", "0", "--resid_pdrop", "0", "--clf_pdrop", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data (120 labelled + 40 test stories), a learned vocabulary and random weights."""
    base = tmp_path_factory.mktemp("train")
    data = write_synthetic_rocstories(base / "data", n_val=120, n_test=40, seed=5)
    train_split = rocstories(data, n_valid=40)[0]
    encoder = learn_bpe(list(train_split[0]) + list(train_split[1]), str(base / "model" / "encoder.json"),
                        str(base / "model" / "vocab.bpe"), vocab_size=300, min_frequency=1)
    write_openai_weights(base / "model", n_vocab=len(encoder.encoder), n_ctx=96, n_embd=32, n_layer=2, seed=1)
    return base


def arguments(setup, out, *extra):
    return ["--data_dir", str(setup / "data"), "--model_path", str(setup / "model"),
            "--encoder_path", str(setup / "model" / "encoder.json"), "--bpe_path", str(setup / "model" / "vocab.bpe"),
            "--log_dir", str(out / "log"), "--save_dir", str(out / "save"), "--submission_dir", str(out / "sub"),
            "--desc", "run", *SIZES, *extra]


def read_log(out):
    with open(out / "log" / "run.jsonl") as f:
        return [json.loads(line) for line in f]


def final_state(out):
    return torch.load(out / "save" / "run" / "checkpoint.pt", weights_only=True)


def test_end_to_end_outputs_are_consistent(setup, tmp_path, capsys):
    assert train.main(arguments(setup, tmp_path, "--submit", "--analysis")) == 0
    printed = capsys.readouterr().out
    log = read_log(tmp_path)
    assert log[0]["n_batch"] == 4 and log[0]["dataset"] == "rocstories"  # first line: the arguments
    points = log[1:]
    assert [p["n_epochs"] for p in points] == [1, 2] and [p["n_updates"] for p in points] == [5, 10]
    for key in ("tr_cost", "va_cost", "tr_acc", "va_acc"):
        assert all(np.isfinite(p[key]) for p in points)

    lines = (tmp_path / "sub" / "ROCStories.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 41
    predictions = np.array([int(line.split("\t")[1]) for line in lines[1:]])
    assert [int(line.split("\t")[0]) for line in lines[1:]] == list(range(40)) and set(predictions) <= {0, 1}
    test_acc = np.mean(predictions == rocstories_test_labels(setup / "data")) * 100
    best_va = max(p["va_acc"] for p in points)
    assert f"ROCStories Valid Accuracy: {best_va:.2f}" in printed
    assert f"ROCStories Test Accuracy: {test_acc:.2f}" in printed

    ckpt = final_state(tmp_path)  # loads without unpickling code
    assert ckpt["n_updates"] == 10 and ckpt["best_score"] == best_va
    from safetensors.torch import load_file
    best = load_file(tmp_path / "save" / "run" / "best_params.safetensors")
    assert "transformer.h.1.attn.c_attn.w" in best and "task_head.linear.weight" in best
    png = analysis.plot_learning_curve(str(tmp_path / "log" / "run.jsonl"), str(tmp_path / "curve.png"))
    assert os.path.getsize(png) > 1000


def test_best_checkpoint_predicts_the_submission(setup, tmp_path):
    assert train.main(arguments(setup, tmp_path, "--submit")) == 0
    from safetensors.torch import load_model

    from model_pytorch import DoubleHeadModel, GPTConfig
    vocab = final_state(tmp_path)["model"]["transformer.embed.weight"].shape[0]
    n_vocab = len(json.loads((setup / "model" / "encoder.json").read_text()))
    n_ctx = vocab - n_vocab - 3
    model = DoubleHeadModel(GPTConfig(n_embd=32, n_head=4, n_layer=2), n_vocab + 2, "multiple_choice",
                            vocab=vocab, n_ctx=n_ctx)
    load_model(model, tmp_path / "save" / "run" / "best_params.safetensors")
    args = train.parse_args(arguments(setup, tmp_path))
    encoder = train.TextEncoder(args.encoder_path, args.bpe_path)
    data, specials, data_n_ctx = train.load_rocstories(args, encoder)
    assert data_n_ctx == n_ctx
    logits = train.predict_logits(model, *data["test"], args, train.Runtime(torch.device("cpu")))
    lines = (tmp_path / "sub" / "ROCStories.tsv").read_text().splitlines()[1:]
    assert np.argmax(logits, 1).tolist() == [int(line.split("\t")[1]) for line in lines]


@pytest.mark.parametrize("stop_after", [5, 3])  # at the end of epoch 1, and inside it
def test_interrupted_and_resumed_run_ends_the_same(setup, tmp_path, stop_after):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main(arguments(setup, whole, "--submit")) == 0
    assert train.main(arguments(setup, parts, "--submit", "--stop_after_updates", str(stop_after))) == 130
    assert final_state(parts)["n_updates"] == stop_after
    assert train.main(arguments(setup, parts, "--submit", "--resume")) == 0
    a, b = final_state(whole), final_state(parts)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    strip = lambda log: [{k: v for k, v in line.items() if k != "time"} for line in log[1:]]
    assert strip(read_log(whole)) == strip(read_log(parts))
    assert (whole / "sub" / "ROCStories.tsv").read_text() == (parts / "sub" / "ROCStories.tsv").read_text()


def test_torchrun_two_processes_take_the_same_updates(setup, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    assert train.main(arguments(setup, single, *NO_DROPOUT)) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *arguments(setup, double, *NO_DROPOUT)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = final_state(single)["model"], final_state(double)["model"]
    worst = max((a[k] - b[k]).abs().max().item() for k in a if k != "task_head.linear.bias")
    print(f"torchrun x2 vs one process: max parameter difference {worst:.2e}")
    assert worst <= 1e-5
    assert len(read_log(double)) == len(read_log(single))  # only rank 0 writes


def test_speedups_train_the_same_as_the_plain_path(setup, tmp_path):
    fast, plain = tmp_path / "fast", tmp_path / "plain"
    assert train.main(arguments(setup, fast, *NO_DROPOUT)) == 0
    assert train.main(arguments(setup, plain, *NO_DROPOUT, "--plain")) == 0
    a, b = final_state(fast)["model"], final_state(plain)["model"]
    # The classifier bias has an analytic gradient of 0 (docs/reference.md §3): Adam turns rounding noise into
    # steps of size ~lr there, so it is left out.
    worst = max((a[k] - b[k]).abs().max().item() for k in a if k != "task_head.linear.bias")
    print(f"trimmed + fused + masked LM logits vs plain: max parameter difference {worst:.2e}")
    assert worst <= 1e-5
    for x, y in zip(read_log(fast)[1:], read_log(plain)[1:]):
        assert x["va_acc"] == y["va_acc"] and x["tr_cost"] == pytest.approx(y["tr_cost"], abs=1e-5)


# ----------------------------------------------------------------------------- clear failures

def expect_failure(argv, match, capsys):
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert "Traceback" not in err


def test_missing_data(setup, tmp_path, capsys):
    argv = arguments(setup, tmp_path)
    argv[argv.index("--data_dir") + 1] = str(tmp_path / "nodata")
    expect_failure(argv, r"error: data folder .*nodata' does not exist; it must hold: cloze_test_val", capsys)


def test_missing_weights(setup, tmp_path, capsys):
    argv = arguments(setup, tmp_path)
    argv[argv.index("--model_path") + 1] = str(tmp_path / "noweights")
    expect_failure(argv, r"error: weights folder .*noweights' does not exist\. Get the weights", capsys)


def test_vocabulary_that_does_not_fit_the_weights(setup, tmp_path, capsys):
    write_openai_weights(tmp_path / "w", n_vocab=123, n_ctx=96, n_embd=32, n_layer=2)
    argv = arguments(setup, tmp_path)
    argv[argv.index("--model_path") + 1] = str(tmp_path / "w")
    expect_failure(argv, r"the vocabulary .*encoder.json has \d+ entries but the weights in .* have 123 token rows",
                   capsys)


def test_n_ctx_too_large_for_the_position_table(setup, tmp_path, capsys):
    vocab = len(json.load(open(setup / "model" / "encoder.json")))
    write_openai_weights(tmp_path / "w", n_vocab=vocab, n_ctx=16, n_embd=32, n_layer=2)
    argv = arguments(setup, tmp_path)
    argv[argv.index("--model_path") + 1] = str(tmp_path / "w")
    expect_failure(argv, r"the data needs n_ctx=\d+ positions but the weights have only 16; pass --n_ctx 16", capsys)


def test_non_finite_loss_stops_and_keeps_the_best_checkpoint(setup, tmp_path, capsys):
    argv = arguments(setup, tmp_path, "--submit", "--lr", "1e30", "--max_grad_norm", "0")
    expect_failure(argv, r"the training loss became (nan|inf) at update \d+; the run is stopped", capsys)
    assert (tmp_path / "save" / "run" / "best_params.safetensors").exists()


def test_resume_without_a_checkpoint(setup, tmp_path, capsys):
    expect_failure(arguments(setup, tmp_path, "--resume"), r"--resume: no checkpoint at", capsys)


def test_towers_not_divisible_by_processes(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    expect_failure(arguments(setup, tmp_path), r"n_gpu=4 towers cannot be spread over 3 processes", capsys)


@pytest.mark.parametrize("flag, value", [("--dataset", "sst2"), ("--lr_schedule", "warmup_exp")])
def test_unknown_dataset_or_schedule_in_a_subprocess(setup, tmp_path, flag, value):
    argv = arguments(setup, tmp_path) + [flag, value]
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert f"invalid choice: '{value}'" in result.stderr and "Traceback" not in result.stderr


def test_clear_message_in_a_subprocess(setup, tmp_path):
    argv = arguments(setup, tmp_path)
    argv[argv.index("--data_dir") + 1] = str(tmp_path / "x")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0  # one line
    assert result.stderr.startswith("error: data folder")


def test_demo_from_the_readme(tmp_path):
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"&& python (train\.py --demo)\s", readme).group(1).split()
    result = subprocess.run([sys.executable, *command, "--demo_dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    valid = float(re.search(r"ROCStories Valid Accuracy: ([\d.]+)", result.stdout).group(1))
    test = float(re.search(r"ROCStories Test Accuracy: ([\d.]+)", result.stdout).group(1))
    took = re.search(r"done in [\d.]+ s", result.stdout).group(0)
    print(f"demo: valid {valid}, test {test}; {took}")
    assert valid > 70 and test > 70
    assert os.path.exists(tmp_path / "data" / ROC_TEST) and os.path.exists(tmp_path / "model" / "params_9.npy")


def test_sigterm_saves_a_resumable_checkpoint(setup, tmp_path):
    import signal
    import time

    argv = arguments(setup, tmp_path)
    argv[argv.index("--n_iter") + 1] = "400"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / "log" / "run.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "continue with --resume" in out
    ckpt = final_state(tmp_path)
    assert 0 < ckpt["n_updates"] < 400 * 5
    assert ckpt["log_lines"] == len(log.read_text().splitlines())


def test_bf16_autocast_runs_on_cpu(setup, tmp_path):
    assert train.main(arguments(setup, tmp_path, "--amp", "bf16")) == 0
    assert all(np.isfinite(p["va_cost"]) for p in read_log(tmp_path)[1:])


def test_fast_evaluation_equals_the_plain_path(setup):
    args = train.parse_args(arguments(setup, setup))
    encoder = train.TextEncoder(args.encoder_path, args.bpe_path)
    data, specials, n_ctx = train.load_rocstories(args, encoder)
    from model_pytorch import DoubleHeadModel, GPTConfig
    torch.manual_seed(0)
    model = DoubleHeadModel(GPTConfig(n_embd=32, n_head=4, n_layer=2), specials.clf_token, "multiple_choice",
                            vocab=specials.n_vocab + 3 + n_ctx, n_ctx=n_ctx)
    runtime = train.Runtime(torch.device("cpu"))
    fast = train.predict_logits(model, *data["test"], args, runtime)
    args.plain = True
    plain = train.predict_logits(model, *data["test"], args, runtime)
    assert np.abs(fast - plain).max() <= 1e-5
