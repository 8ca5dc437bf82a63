"""train.py end to end on a small synthetic ROCStories folder: outputs, resume, torchrun, failures."""

import contextlib
import json
import os
import platform
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import analysis
import config
import engine
import export_hf
import generate
import train
from checkpoints import load_checkpoint, load_model, read_checkpoint
from conftest import ROOT, padded_arrays, reference_sequences
from datasets import ROC_TEST, rocstories, rocstories_test_labels
from engine import PhaseTimes, Runtime, Trainer
from model_pytorch import MultipleChoiceHead, make_task_head
from synthetic import synthetic_story, write_synthetic, write_synthetic_rocstories
from tasks import METRIC_KEYS, get_task
from text_utils import learn_bpe
from weights import write_openai_weights

SIZES = ["--n_embd", "32", "--n_head", "4", "--n_layer", "2", "--n_transfer", "2", "--n_batch", "4", "--n_gpu", "4",
         "--n_valid", "40", "--n_iter", "2", "--lr", "1e-3", "--eval_batch", "16"]
pytestmark = pytest.mark.slow  # end-to-end runs of train.py; `pytest -m "not slow"` leaves them out

NO_DROPOUT = ["--embd_pdrop", "0", "--attn_pdrop", "0", "--resid_pdrop", "0", "--clf_pdrop", "0"]


@pytest.fixture(scope="session")
def setup(roc_files):
    """Data (120 labelled + 40 test stories), a learned vocabulary and random weights."""
    return roc_files


def arguments(setup, out, *extra):
    return ["--data_dir", str(setup / "data"), "--model_path", str(setup / "model"),
            "--encoder_path", str(setup / "model" / "encoder.json"), "--bpe_path", str(setup / "model" / "vocab.bpe"),
            "--log_dir", str(out / "log"), "--save_dir", str(out / "save"), "--submission_dir", str(out / "sub"),
            "--desc", "run", *SIZES, *extra]


def vocabulary_size(model_dir):
    """Tokens in the learned vocabulary of a fixture's model folder."""
    return len(json.loads((model_dir / "encoder.json").read_text()))


def run_of(argv):
    """train.py's Run of these flags, set up (data, model, optimizer, engine) on the CPU."""
    runtime = Runtime(torch.device("cpu"))
    return train.Run(config.parse(argv), runtime, PhaseTimes(runtime))


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
    _, spec, recorded = read_checkpoint(str(tmp_path / "save" / "run" / "best_params.safetensors"))
    assert recorded["n_head"] == 4 and recorded["dataset"] == "rocstories"  # the run's arguments, as JSON
    assert (spec.head, spec.n_special, spec.n_vocab, spec.config.n_head) == ("multiple_choice", 3,
                                                                           vocabulary_size(setup / "model"), 4)
    png = analysis.plot_learning_curve(str(tmp_path / "log" / "run.jsonl"), str(tmp_path / "curve.png"))
    assert os.path.getsize(png) > 1000


def test_saved_parameters_load_for_generation_and_export_without_flags(setup, tmp_path):
    """Both files a run writes record the spec of their model: the loaders need no sizes and build the run's head."""
    assert train.main(arguments(setup, tmp_path, "--submit")) == 0
    trained = final_state(tmp_path)["model"]
    for name in ("best_params.safetensors", "checkpoint.pt"):
        path = str(tmp_path / "save" / "run" / name)
        model, spec = load_model(path)
        assert isinstance(model.task_head, MultipleChoiceHead) and model.transformer.cfg.n_head == 4, name
        assert load_model(path, head=None)[0].transformer.cfg.n_head == 4, name
        if name == "checkpoint.pt":
            loaded = model.state_dict()
            assert all(torch.equal(loaded[k], v) for k, v in trained.items())


def test_best_checkpoint_predicts_the_submission(setup, tmp_path):
    assert train.main(arguments(setup, tmp_path, "--submit")) == 0
    model, _ = load_model(str(tmp_path / "save" / "run" / "best_params.safetensors"))
    run = run_of(arguments(setup, tmp_path))
    run.model.load_state_dict(model.state_dict())
    logits = run.trainer.outputs(run.data.splits["test"])
    lines = (tmp_path / "sub" / "ROCStories.tsv").read_text().splitlines()[1:]
    assert np.argmax(logits, 1).tolist() == [int(line.split("\t")[1]) for line in lines]


@pytest.mark.parametrize("stop_after", [5, 3])  # at the end of epoch 1, and inside it
def test_interrupted_and_resumed_run_ends_the_same(setup, tmp_path, stop_after, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main(arguments(setup, whole, "--submit")) == 0
    capsys.readouterr()
    assert train.main(arguments(setup, parts, "--submit", "--stop_after_updates", str(stop_after))) == 130
    assert re.search(r"^time: start-up [\d.]+ s, encoding [\d.]+ s, .*training [\d.]+ s", capsys.readouterr().out, re.M)
    assert final_state(parts)["n_updates"] == stop_after
    assert train.main(arguments(setup, parts, "--submit", "--resume")) == 0
    a, b = final_state(whole), final_state(parts)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    strip = lambda log: [{k: v for k, v in line.items() if k != "time"} for line in log[1:]]
    assert strip(read_log(whole)) == strip(read_log(parts))
    assert (whole / "sub" / "ROCStories.tsv").read_text() == (parts / "sub" / "ROCStories.tsv").read_text()


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py")]


def one_thread_env():
    return dict(os.environ, OMP_NUM_THREADS="1")  # 2 processes on 2 cores


def torchrun(argv, cwd):
    """train.py in 2 CPU processes, run to its end."""
    return subprocess.run(TORCHRUN + argv, cwd=cwd, env=one_thread_env(), capture_output=True, text=True,
                          timeout=600)


def test_torchrun_two_processes_take_the_same_updates(setup, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    assert train.main(arguments(setup, single, *NO_DROPOUT)) == 0
    result = torchrun(arguments(setup, double, *NO_DROPOUT), tmp_path)
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



@pytest.mark.parametrize("flag", ["--log_dir", "--save_dir", "--submission_dir"])
def test_an_output_folder_that_cannot_be_written_fails_before_training(setup, tmp_path, flag, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv = arguments(setup, tmp_path, "--submit")
    argv[argv.index(flag) + 1] = str(blocker / "out")
    monkeypatch.setattr(train, "Run", lambda *a: pytest.fail("set up before the output folders were checked"))
    expect_failure(argv, rf"error: cannot write to the output folder {re.escape(str(blocker / 'out'))}: ", capsys)

def test_vocabulary_that_does_not_fit_the_weights(setup, tmp_path, capsys):
    write_openai_weights(tmp_path / "w", n_vocab=123, n_ctx=96, n_embd=32, n_layer=2)
    argv = arguments(setup, tmp_path)
    argv[argv.index("--model_path") + 1] = str(tmp_path / "w")
    expect_failure(argv, r"the vocabulary .*encoder.json has \d+ entries but the weights in .* have 123 token rows",
                   capsys)


def test_n_ctx_too_large_for_the_position_table(setup, tmp_path, capsys):
    vocab = vocabulary_size(setup / "model")
    write_openai_weights(tmp_path / "w", n_vocab=vocab, n_ctx=16, n_embd=32, n_layer=2)
    argv = arguments(setup, tmp_path)
    argv[argv.index("--model_path") + 1] = str(tmp_path / "w")
    expect_failure(argv, r"the data needs n_ctx=\d+ positions but the weights have only 16; pass --n_ctx 16 \(the "
                         r"story and each ending are cut to n_ctx // 2 - 2 tokens, as the original does\)$", capsys)


def test_n_ctx_too_large_for_the_position_table_names_the_task_cut_rule(tmp_path, capsys):
    data = write_synthetic("sst2", str(tmp_path / "data"), 16, 8, 8, seed=1)
    texts = get_task("sst2").read(data)["train"].texts[0]
    encoder = learn_bpe(texts, str(tmp_path / "encoder.json"), str(tmp_path / "vocab.bpe"), vocab_size=300,
                        min_frequency=1)
    write_openai_weights(tmp_path / "w", n_vocab=len(encoder.encoder), n_ctx=8, n_embd=32, n_layer=2)
    argv = ["--dataset", "sst2", "--data_dir", data, "--model_path", str(tmp_path / "w"),
            "--encoder_path", str(tmp_path / "encoder.json"), "--bpe_path", str(tmp_path / "vocab.bpe"),
            "--log_dir", str(tmp_path / "log"), "--save_dir", str(tmp_path / "save"), *SIZES]
    expect_failure(argv, r"the data needs n_ctx=\d+ positions but the weights have only 8; pass --n_ctx 8 \(longer "
                         r"examples are cut by the rule in docs/tasks.md\)$", capsys)


def test_non_finite_loss_stops_and_keeps_the_best_checkpoint(setup, tmp_path, capsys):
    argv = arguments(setup, tmp_path, "--submit", "--lr", "1e30", "--max_grad_norm", "0")
    expect_failure(argv, r"the training loss became (nan|inf) at update \d+; the run is stopped", capsys)
    assert (tmp_path / "save" / "run" / "best_params.safetensors").exists()


def test_resume_without_a_checkpoint(setup, tmp_path, capsys):
    expect_failure(arguments(setup, tmp_path, "--resume"), r"--resume: no checkpoint at", capsys)


def test_towers_not_divisible_by_processes(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    expect_failure(arguments(setup, tmp_path), r"n_gpu=4 towers cannot be spread over 3 processes", capsys)


@pytest.mark.parametrize("flag, value", [("--dataset", "imdb"), ("--lr_schedule", "warmup_exp")])
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


# ----------------------------------------------------------------------------- the original's numpy stream

def reference_orders(seed, n_embd, n_train, n_epochs):
    """The TF script's draws written out: seed numpy's generator, special rows first, then one
    scikit-learn shuffle of the training arrays per epoch from the same generator."""
    from sklearn.utils import shuffle

    rng = np.random.RandomState(seed)
    special = (rng.randn(3, n_embd) * 0.02).astype(np.float32)
    return special, [shuffle(np.arange(n_train), random_state=rng) for _ in range(n_epochs)]


def record_epochs(monkeypatch):
    """The order of each epoch and the first batch the training loop then used."""
    seen = dict(orders=[], first_batches=[])
    real_order, real_micro = train.epoch_order, Trainer.micro_batches

    def order(rng, n):
        seen["orders"].append(real_order(rng, n))
        seen["expect_first"] = True
        return seen["orders"][-1]

    def micro(trainer, xmb, mmb, ymb, size):
        if seen.pop("expect_first", False):
            seen["first_batches"].append(xmb.copy())
        return real_micro(trainer, xmb, mmb, ymb, size)

    monkeypatch.setattr(train, "epoch_order", order)
    monkeypatch.setattr(Trainer, "micro_batches", micro)
    return seen


def test_special_rows_and_epoch_orders_follow_the_original_numpy_stream(setup, tmp_path, monkeypatch):
    argv = arguments(setup, tmp_path, "--seed", "42", "--n_iter", "3")
    run = run_of(argv)
    n_vocab, n_train = run.data.specials.n_vocab, len(run.data.splits["train"])
    special, orders = reference_orders(42, 32, n_train, 3)
    np.testing.assert_array_equal(run.model.transformer.embed.weight[n_vocab:n_vocab + 3].detach().numpy(), special)

    seen = record_epochs(monkeypatch)
    assert train.main(argv) == 0
    assert len(seen["orders"]) == 3
    X = run.data.splits["train"].batch(np.arange(n_train), mode="plain")[0]  # the whole split, padded
    for got, want, first in zip(seen["orders"], orders, seen["first_batches"]):
        np.testing.assert_array_equal(got, want)
        width = first.shape[-2]  # the batch's own: the columns after it are padding in each of its sequences
        np.testing.assert_array_equal(first, X[want[:16]][..., :width, :])  # the loop trains on that order
        assert not X[want[:16]][..., width:, 0].any()


def test_resumed_run_keeps_the_original_epoch_orders(setup, tmp_path, monkeypatch):
    argv = arguments(setup, tmp_path, "--seed", "42", "--n_iter", "3")
    assert train.main(argv + ["--stop_after_updates", "7"]) == 130  # inside epoch 2
    seen = record_epochs(monkeypatch)
    assert train.main(argv + ["--resume"]) == 0
    n_train = 80
    _, orders = reference_orders(42, 32, n_train, 3)
    assert len(seen["orders"]) == 2  # epoch 2 (shuffled again from its start) and epoch 3
    for got, want in zip(seen["orders"], orders[1:]):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("flags", [[], ["--plain"]])
def test_the_ragged_data_path_trains_as_the_padded_arrays_did(setup, tmp_path, monkeypatch, flags):
    """Three epochs, dropout off: every update's batches and the parameters after them are those of the
    data path that kept each split as padded arrays (the whole split laid out at n_ctx by
    conftest.reference_sequences and padded_arrays, X[idx] per update in the original's epoch orders),
    bit for bit."""
    argv = arguments(setup, tmp_path, *NO_DROPOUT, *flags, "--seed", "42", "--n_iter", "3")
    made, real = [], Trainer.micro_batches
    monkeypatch.setattr(Trainer, "micro_batches", lambda self, *a: made.append(real(self, *a)) or made[-1])
    assert train.main(argv) == 0
    ragged_batches = list(made)
    made.clear()
    run = run_of(argv)  # set up again: the same seed, so the same weights and special rows
    split = run.task.read(str(setup / "data"))["train"]
    texts = [run.text_encoder.encode(field, verbose=False) for field in split.texts]
    seqs, _ = reference_sequences(run.task, texts, run.data.specials, run.cfg.n_ctx)
    X, M = padded_arrays(seqs, run.data.n_ctx, run.data.specials.n_vocab + run.data.specials.n_special)
    _, orders = reference_orders(42, 32, len(X), 3)
    for order in orders:
        for b in range(len(X) // 16):
            idx = order[b * 16:(b + 1) * 16]
            run.trainer.update(X[idx], M[idx], split.labels[idx])
    assert len(made) == len(ragged_batches) == 15
    for ours, dense in zip(ragged_batches, made):
        for a, b in zip(ours, dense, strict=True):
            assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("X", "M", "Y"))
            for name in ("clf_rows", "lm_rows", "lm_targets", "lm_weights", "lm_count"):
                x, y = getattr(a.plan, name), getattr(b.plan, name)
                assert (x is None and y is None) or torch.equal(x, y), name
    trained, dense_state = final_state(tmp_path)["model"], run.model.state_dict()
    assert len(trained) > 10 and all(torch.equal(v, dense_state[k]) for k, v in trained.items())


# ----------------------------------------------------------------------------- the GPU-first training step

def count_syncs(argv, monkeypatch, sync_counter):
    """Runs train.py; (sync-capable calls inside each update, inside each evaluation forward, in all
    but the evaluation forwards)."""
    from model_pytorch import DoubleHeadModel, LMModel

    updates, forwards = [], []
    real_step = Trainer.step

    def step(*a, **k):
        before = len(sync_counter.calls)
        values = real_step(*a, **k)
        updates.append(len(sync_counter.calls) - before)
        return values

    sync_counter.wrap(Trainer, "step", monkeypatch)
    monkeypatch.setattr(Trainer, "step", step)
    sync_counter.wrap(engine.LateReader, "push", monkeypatch)
    for model_class in (DoubleHeadModel, LMModel):
        def forward(self, *a, real_forward=model_class.forward, **k):
            before = len(sync_counter.calls)
            outer, sync_counter.active = sync_counter.active, True
            try:
                return real_forward(self, *a, **k)
            finally:
                sync_counter.active = outer
                if not self.training:
                    forwards.append(len(sync_counter.calls) - before)

        monkeypatch.setattr(model_class, "forward", forward)
    assert train.main(argv) == 0
    print(f"syncs: {sync_counter.calls[:12]}; per update {updates}; evaluation forwards {set(forwards)}")
    return updates, forwards, len(sync_counter.calls) - sum(forwards)


def test_an_update_makes_at_most_one_sync_and_evaluation_none(setup, tmp_path, monkeypatch, sync_counter):
    updates, forwards, total = count_syncs(arguments(setup, tmp_path, "--n_iter", "1"), monkeypatch, sync_counter)
    assert len(updates) == 5 and max(updates) == 0  # inside train_update: none
    assert total <= len(updates)  # with reading the loss one update late: at most 1 per update
    assert forwards and set(forwards) == {0}


def test_one_pass_per_update_by_default_and_micro_batches_on_request(setup, tmp_path, monkeypatch):
    calls = []
    real = Trainer.objective
    monkeypatch.setattr(Trainer, "objective", lambda self, batch: calls.append(len(batch.Y)) or real(self, batch))
    assert train.main(arguments(setup, tmp_path / "one", "--n_iter", "1")) == 0
    assert calls == [16] * 5  # n_batch 4 x n_gpu 4 in one forward per update, on this CPU too
    calls.clear()
    assert train.main(arguments(setup, tmp_path / "micro", "--n_iter", "1", "--micro_batch", "4")) == 0
    assert calls == [4] * 20


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator only")
def test_one_pass_equals_the_towers_with_dropout_off(setup, tmp_path):
    """At the paper's learning rate, as the objective is the same: the float32 sums only run in another order.
    (At this file's lr of 1e-3 the rounding differences grow with the steps: 2.4e-7 here, 1.6e-6 on CI's CPU.)"""
    one, towers = tmp_path / "one", tmp_path / "towers"
    paper_lr = ["--lr", "6.25e-5"]
    assert train.main(arguments(setup, one, *NO_DROPOUT, *paper_lr, "--micro_batch", "16")) == 0
    assert train.main(arguments(setup, towers, *NO_DROPOUT, *paper_lr, "--micro_batch", "4")) == 0
    a, b = final_state(one)["model"], final_state(towers)["model"]
    worst = max((a[k] - b[k]).abs().max().item() for k in a if k != "task_head.linear.bias")
    print(f"one pass vs 4 micro-batches: max parameter difference {worst:.1e}")
    assert worst <= 1e-6  # measured 7.5e-9 (up to 6e-8 with earlier, random vocabularies); training moves 2.8e-4


def test_compiled_bucketed_path_equals_eager(setup, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert train.main(arguments(setup, eager, *NO_DROPOUT, "--n_iter", "1")) == 0
    assert train.main(arguments(setup, compiled, *NO_DROPOUT, "--n_iter", "1", "--compile")) == 0
    a, b = final_state(eager)["model"], final_state(compiled)["model"]
    worst = max((a[k] - b[k]).abs().max().item() for k in a if k != "task_head.linear.bias")
    print(f"--compile vs eager: max parameter difference {worst:.1e}")
    assert worst <= 1e-5


def test_an_unwritable_encoding_cache_warns_and_the_run_goes_on(setup, tmp_path, capsys):
    """The cache only saves time: a folder that cannot be made (here under a file) is one warning."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cache = blocker / "cache"
    assert train.main(arguments(setup, tmp_path, "--n_iter", "1", "--cache_dir", str(cache))) == 0
    err = capsys.readouterr().err
    assert f"could not write the encoding cache {cache}" in err and "Traceback" not in err
    assert (tmp_path / "save" / "run" / "checkpoint.pt").exists()


# On a CUDA device (skipped elsewhere): what the CPU tests above show by counting calls, checked by
# CUDA itself, and the device's numbers against the CPU's.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextlib.contextmanager
def cuda_syncs_are_errors():
    """Any synchronising CUDA call inside raises (torch.cuda.set_sync_debug_mode)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("amp", [[], ["--amp", "bf16"]], ids=["fp32", "bf16"])
def test_cuda_update_and_evaluation_forward_never_synchronise(setup, tmp_path, monkeypatch, amp):
    from model_pytorch import DoubleHeadModel

    real_update, real_forward, checked = Trainer._update, DoubleHeadModel.forward, []

    def update(*a, **k):
        with cuda_syncs_are_errors():
            checked.append("update")
            return real_update(*a, **k)

    def forward(self, *a, **k):
        if self.training:
            return real_forward(self, *a, **k)
        with cuda_syncs_are_errors():
            checked.append("evaluation")
            return real_forward(self, *a, **k)

    monkeypatch.setattr(Trainer, "_update", update)
    monkeypatch.setattr(DoubleHeadModel, "forward", forward)
    assert train.main(arguments(setup, tmp_path, "--n_iter", "1", "--device", "cuda", *amp)) == 0
    assert checked.count("update") == 5 and "evaluation" in checked


@needs_cuda
@pytest.mark.parametrize("flags", [[], ["--compile"]], ids=["eager", "compiled"])
def test_cuda_training_equals_the_cpu(setup, tmp_path, flags):
    """fp32 on the GPU (CUDA graphs with --compile) against the CPU's eager run, at the paper's
    learning rate, where training moves weights by about 3e-4."""
    cpu, cuda = tmp_path / "cpu", tmp_path / "cuda"
    common = [*NO_DROPOUT, "--n_iter", "1", "--lr", "6.25e-5"]
    assert train.main(arguments(setup, cpu, *common, "--device", "cpu")) == 0
    assert train.main(arguments(setup, cuda, *common, "--device", "cuda", *flags)) == 0
    a, b = final_state(cpu)["model"], final_state(cuda)["model"]
    worst = max((a[k] - b[k].cpu()).abs().max().item() for k in a)
    print(f"cuda {flags} vs cpu: max parameter difference {worst:.1e}")
    assert worst <= 2e-5

# ----------------------------------------------------------------------------- the objective, schedule, best parameters

def test_schedule_length_is_the_number_of_updates(setup, tmp_path):
    assert train.main(arguments(setup, tmp_path)) == 0
    group = final_state(tmp_path)["optimizer"]["param_groups"][0]
    n_train, n_batch, n_gpu, n_iter = 80, 4, 4, 2
    assert group["t_total"] == (n_train // (n_batch * n_gpu)) * n_iter == 10


def test_the_best_epoch_not_the_last_predicts_the_test_set(setup, tmp_path, monkeypatch):
    """Validation accuracy scripted to peak at epoch 1: the submission must come from the
    parameters of epoch 1 (saved as the best), not from those of the last epoch."""
    real_evaluate = Trainer.evaluate
    scripted = iter([None, 90.0, None, 50.0])  # (train, valid) per log point: valid 90, then 50

    def evaluate(self, *a):
        cost, metrics = real_evaluate(self, *a)
        forced = next(scripted)
        return cost, metrics if forced is None else {"Accuracy": forced}

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    used = {}
    real_outputs = Trainer.outputs

    def outputs(self, *a, **k):
        used["params"] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        return real_outputs(self, *a, **k)

    monkeypatch.setattr(Trainer, "outputs", outputs)
    assert train.main(arguments(setup, tmp_path, "--submit")) == 0
    from safetensors.torch import load_file
    best = load_file(tmp_path / "save" / "run" / "best_params.safetensors")
    last = final_state(tmp_path)["model"]
    name = "transformer.h.1.mlp.c_fc.w"
    assert not torch.equal(best[name], last[name])
    assert all(torch.equal(used["params"][n], best[n]) for n in best)


# ----------------------------------------------------------------------------- resume, flags, stops

@pytest.fixture(scope="module")
def interrupted(setup, tmp_path_factory):
    """A run stopped after 3 updates, without --submit."""
    out = tmp_path_factory.mktemp("interrupted")
    assert train.main(arguments(setup, out, "--stop_after_updates", "3")) == 130
    return out


@pytest.mark.parametrize("flag, value", [
    ("--n_ctx", "64"), ("--embd_pdrop", "0.5"), ("--attn_pdrop", "0.2"), ("--clf_pdrop", "0.3"), ("--plain", None),
    ("--amp", "bf16"), ("--n_transfer", "1"), ("--micro_batch", "4"), ("--lr", "1e-4"), ("--seed", "7"),
    ("--compile", None), ("--lm_coef", "0"),
])
def test_resume_refuses_a_changed_setting(setup, interrupted, flag, value, capsys):
    argv = arguments(setup, interrupted, "--resume", flag, *([value] if value else []))
    expect_failure(argv, rf"error: --resume: the checkpoint was made with other settings: {flag} ", capsys)


def test_submit_added_on_resume(setup, interrupted, capsys):
    import shutil

    out = interrupted.parent / "submit_added"
    shutil.copytree(interrupted, out)
    assert train.main(arguments(setup, out, "--resume", "--submit", "--analysis")) == 0
    assert "--submit added on resume" in capsys.readouterr().out
    assert len((out / "sub" / "ROCStories.tsv").read_text().splitlines()) == 41


@pytest.mark.parametrize("flag, value, expected", [
    ("--n_gpu", "0", "at least 1"), ("--eval_batch", "0", "at least 1"), ("--n_batch", "-2", "at least 1"),
    ("--n_iter", "0", "at least 1"), ("--lr", "-1", ">= 0"), ("--embd_pdrop", "1.5", r"in \[0, 1\)"),
    ("--b2", "1", r"in \[0, 1\)"), ("--micro_batch", "0", "at least 1"), ("--n_head", "5", "divide --n_embd"),
    ("--n_transfer", "9", "between -1 and --n_layer"), ("--lr_warmup", "2", r"in \[0, 1\]"),
    ("--n_valid", "0", "at least 1"),
])
def test_invalid_numeric_flag(setup, tmp_path, flag, value, expected, capsys):
    expect_failure(arguments(setup, tmp_path) + [flag, value], rf"^error: {flag} \S+ is invalid: .*{expected}",
                   capsys)


def test_micro_batch_must_divide_the_share(setup, tmp_path, capsys):
    expect_failure(arguments(setup, tmp_path, "--micro_batch", "5"), r"--micro_batch 5 must divide", capsys)


def test_invalid_flag_in_a_subprocess_is_one_line(setup, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *arguments(setup, tmp_path), "--n_gpu", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip() == "error: --n_gpu 0 is invalid: it must be at least 1"


def child_pids(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_torchrun_stop_signal_to_one_rank_stops_every_rank(setup, tmp_path):
    import signal
    import time

    argv = arguments(setup, tmp_path, *NO_DROPOUT)
    argv[argv.index("--n_iter") + 1] = "400"
    proc = subprocess.Popen(TORCHRUN + argv, cwd=tmp_path, env=one_thread_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / "log" / "run.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.2)
    ranks = child_pids(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGTERM)  # one rank only
    signalled = time.time()
    out, err = proc.communicate(timeout=120)
    print(f"both ranks ended {time.time() - signalled:.1f} s after the signal")
    assert time.time() - signalled < 60
    assert "continue with --resume" in out, err[-3000:]
    ckpt = final_state(tmp_path)
    assert 0 < ckpt["n_updates"] < 400 * 5
    argv[argv.index("--n_iter") + 1] = "400"
    resumed = load_checkpoint(str(tmp_path / "save" / "run" / "checkpoint.pt"), config.parse(argv).flags(),
                              config.fixed_settings(), config.RunConfig().flags())
    assert resumed["n_updates"] == ckpt["n_updates"]


# ----------------------------------------------------------------------------- every task of the paper, end to end

TASK_NAMES = ["sst2", "cola", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "snli", "scitail", "race"]


@pytest.fixture(scope="module")
def task_folders(tmp_path_factory):
    """Each task's synthetic folder in its real layout, a vocabulary learned from its training texts and
    tiny random weights."""
    base = tmp_path_factory.mktemp("tasks")
    folders = {}
    for name in TASK_NAMES:
        data = write_synthetic(name, str(base / name / "data"), 160, 48, 24, seed=1)
        texts = [t for field in get_task(name).read(data)["train"].texts for t in field]
        model = base / name / "model"
        encoder = learn_bpe(texts, str(model / "encoder.json"), str(model / "vocab.bpe"), vocab_size=300,
                            min_frequency=1)
        write_openai_weights(model, n_vocab=len(encoder.encoder), n_ctx=128, n_embd=32, n_layer=2, seed=1)
        folders[name] = (data, model)
    return folders


def task_arguments(task_folders, name, out, *extra):
    data, model = task_folders[name]
    return ["--dataset", name, "--data_dir", data, "--model_path", str(model), "--encoder_path",
            str(model / "encoder.json"), "--bpe_path", str(model / "vocab.bpe"), "--log_dir", str(out / "log"),
            "--save_dir", str(out / "save"), "--submission_dir", str(out / "sub"), "--desc", "run",
            "--n_embd", "32", "--n_head", "4", "--n_layer", "2", "--n_transfer", "2", "--n_batch", "4",
            "--n_gpu", "4", "--n_valid", "48", "--n_iter", "3", "--lr", "2e-3", "--lr_warmup", "0.1",
            "--n_ctx", "128", *extra]



def exported_fine_tune(setup, tmp_path, *export_flags):
    """(best_params.safetensors, export_hf.py's folder of it) of a one-epoch fine-tune."""
    first = tmp_path / "first"
    assert train.main(arguments(setup, first, "--n_iter", "1", "--submit")) == 0  # --submit keeps the best
    best, hf = first / "save" / "run" / "best_params.safetensors", tmp_path / "hf"
    assert export_hf.main(["--model_path", str(best), "--out", str(hf), "--encoder_path",
                           str(setup / "model" / "encoder.json"), "--bpe_path", str(setup / "model" / "vocab.bpe"),
                           *export_flags]) == 0
    return best, hf


def test_fine_tuning_goes_on_from_an_exported_fine_tune(setup, tmp_path):
    """export_hf.py's folder of a fine-tune holds its trained special rows after the token rows
    (added_tokens.json names them): as --model_path it starts the next fine-tune with those rows,
    not new draws, and with every other weight as exported."""
    best, hf = exported_fine_tune(setup, tmp_path)
    argv = arguments(setup, tmp_path / "second", "--n_iter", "1")
    argv[argv.index("--model_path") + 1] = str(hf)
    run = run_of(argv)
    exported = read_checkpoint(str(best))[0]
    loaded = run.model.state_dict()
    for name, tensor in exported.items():
        if not name.startswith("task_head"):  # a new head, as from pre-trained weights
            torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    n_vocab = vocabulary_size(setup / "model")
    drawn = run_of(arguments(setup, tmp_path / "third"))
    assert not torch.equal(exported["transformer.embed.weight"][n_vocab:n_vocab + 3],
                           drawn.model.transformer.embed.weight[n_vocab:n_vocab + 3])  # trained, not the seed's draw
    assert train.main(argv) == 0


def test_a_language_model_trains_from_an_exported_fine_tune(setup, tmp_path):
    """A language model has no special rows: the export's stay behind, every other row loads."""
    import random as _random

    best, hf = exported_fine_tune(setup, tmp_path)
    text = tmp_path / "corpus"
    text.mkdir()
    rng = _random.Random(4)
    (text / "a.txt").write_text("\n".join(" ".join(s) + " " + e1 for s, e1, _, _ in
                                          (synthetic_story(rng) for _ in range(60))) + "\n")
    out = tmp_path / "lm"
    argv = ["--dataset", "lm", "--data_dir", str(text), "--model_path", str(hf),
            "--encoder_path", str(setup / "model" / "encoder.json"), "--bpe_path", str(setup / "model" / "vocab.bpe"),
            "--log_dir", str(out / "log"), "--save_dir", str(out / "save"), "--desc", "run", "--n_embd", "32",
            "--n_head", "4", "--n_layer", "2", "--n_transfer", "2", "--n_ctx", "16", "--n_batch", "4", "--n_gpu", "2",
            "--n_iter", "1", "--n_valid", "8", "--lr", "0"]
    assert train.main(argv) == 0
    exported, trained = read_checkpoint(str(best))[0]["transformer.embed.weight"], final_state(out)["model"]
    n_vocab = vocabulary_size(setup / "model")
    we = trained["transformer.embed.weight"]
    assert we.size(0) == n_vocab + 16  # token and position rows, no special row
    torch.testing.assert_close(we[:n_vocab], exported[:n_vocab], rtol=0, atol=0)
    torch.testing.assert_close(we[n_vocab:], exported[n_vocab + 3:n_vocab + 3 + 16], rtol=0, atol=0)

def test_exported_special_rows_that_are_not_a_fine_tunes_are_refused(setup, tmp_path, capsys):
    _, hf = exported_fine_tune(setup, tmp_path, "--special_tokens", "<a>", "<b>", "<c>")
    argv = arguments(setup, tmp_path / "second")
    argv[argv.index("--model_path") + 1] = str(hf)
    expect_failure(argv, r"hold the special rows <a>, <b>, <c>; a fine-tune needs _start_, _delimiter_, _classify_",
                   capsys)

@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_trains_end_to_end(task_folders, tmp_path, name, capsys):
    """Each task's run, its report and submission; then its kept parameters generate and export with no size,
    head or vocabulary flag (the file records its model and the run's vocabulary)."""
    data = task_folders[name][0]
    assert train.main(task_arguments(task_folders, name, tmp_path, "--submit", "--analysis")) == 0
    printed = capsys.readouterr().out
    task = get_task(name)
    best = str(tmp_path / "save" / "run" / "best_params.safetensors")
    kept, _ = load_model(best)  # the head the file records
    assert type(kept.task_head) is type(make_task_head(task.head, 0, kept.transformer.cfg))
    assert generate.main(["--model_path", best, "--prompt", "the", "--max_new_tokens", "3", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("the >>> ")
    export = ["--model_path", best, "--out", str(tmp_path / "hf")]
    if task.head == "multiple_choice":
        assert export_hf.main(export) == 0
    else:  # transformers has no such head: a clear refusal, and the language model exports
        assert export_hf.main(export) == 1 and "export_hf.py --lm_only" in capsys.readouterr().err
        assert export_hf.main([*export, "--lm_only"]) == 0
    read = task.read(data)
    log = read_log(tmp_path)[1:]
    first = f"va_{METRIC_KEYS[task.metric_names[0]]}"
    for key, split in read.items():
        if key == "train" or split.labels is None:
            continue
        for metric in task.metric_names:
            match = re.search(rf"^{re.escape(split.title)} {metric}: (-?[\d.]+)$", printed, re.M)
            assert match, (split.title, metric, printed[-2000:])
        for group in split.groups or {}:
            assert re.search(rf"^{re.escape(group)} {task.metric_names[0]}: [\d.]+$", printed, re.M), group
    # the kept parameters are the best on the validation split: its printed figure is the best logged one
    valid = re.search(rf"^{re.escape(read['valid'].title)} {task.metric_names[0]}: (-?[\d.]+)$", printed, re.M)
    assert float(valid.group(1)) == pytest.approx(max(p[first] for p in log), abs=0.006)
    print(f"{name}: {valid.group(0)}")
    for split in read.values():
        if not split.submission:
            continue
        lines = (tmp_path / "sub" / split.submission).read_text().splitlines()
        assert lines[0] == "index\tprediction" and len(lines) == len(split) + 1
        index, values = zip(*(line.split("\t") for line in lines[1:]))
        assert list(index) == [str(i) for i in (split.index if split.index is not None else range(len(split)))]
        if task.label_names is None:
            assert all(re.fullmatch(r"-?\d+\.\d{3}", v) for v in values)
        else:
            assert set(values) <= set(task.label_names)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_updates_with_at_most_one_sync_and_evaluates_with_none(task_folders, tmp_path, name, monkeypatch,
                                                                          sync_counter):
    """Every head and loss (classification, similarity, regression, 4 choices) keeps the GPU path's promise."""
    argv = task_arguments(task_folders, name, tmp_path, "--n_iter", "1")
    updates, forwards, total = count_syncs(argv, monkeypatch, sync_counter)
    assert updates and max(updates) == 0 and total <= len(updates)
    assert forwards and set(forwards) == {0}


# ----------------------------------------------------------------------------- language modelling on a corpus

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small plain-text corpus (stories), a vocabulary learned from it and the ROCStories data, and
    tiny random weights."""
    import random as _random

    base = tmp_path_factory.mktemp("lm")
    rng = _random.Random(3)
    text = base / "corpus"
    text.mkdir()
    lines = [" ".join(s) + " " + e1 for s, e1, _, _ in (synthetic_story(rng) for _ in range(400))]
    (text / "a.txt").write_text("\n".join(lines[:200]) + "\n")
    (text / "b.txt").write_text("\n\n".join(lines[200:]) + "\n")
    data = write_synthetic_rocstories(base / "roc", n_val=120, n_test=40, seed=5)
    roc = rocstories(data, n_valid=40)[0]
    model = base / "model"
    encoder = learn_bpe(lines + list(roc[0]) + list(roc[1]) + list(roc[2]), str(model / "encoder.json"),
                        str(model / "vocab.bpe"), vocab_size=300, min_frequency=1)
    write_openai_weights(model, n_vocab=len(encoder.encoder), n_ctx=96, n_embd=32, n_layer=2, seed=1)
    return base


def lm_arguments(corpus, out, *extra):
    return ["--dataset", "lm", "--data_dir", str(corpus / "corpus"), "--model_path", str(corpus / "model"),
            "--encoder_path", str(corpus / "model" / "encoder.json"), "--bpe_path", str(corpus / "model" / "vocab.bpe"),
            "--log_dir", str(out / "log"), "--save_dir", str(out / "save"), "--submission_dir", str(out / "sub"),
            "--desc", "run", "--n_embd", "32", "--n_head", "4", "--n_layer", "2", "--n_transfer", "2",
            "--n_ctx", "32", "--n_batch", "4", "--n_gpu", "2", "--n_iter", "3", "--lr", "3e-3", "--lr_warmup", "0.05",
            "--n_valid", "16", *extra]


def test_language_model_training_lowers_validation_perplexity(corpus, tmp_path, capsys):
    assert train.main(lm_arguments(corpus, tmp_path, "--submit", "--analysis")) == 0
    printed = capsys.readouterr().out
    log = read_log(tmp_path)
    assert log[0]["lr_schedule"] == "warmup_cosine"  # the pre-training recipe's defaults
    points = log[1:]
    assert [p["n_epochs"] for p in points] == [1, 2, 3]
    assert points[-1]["va_ppl"] < points[0]["va_ppl"] < 300  # (300: the vocabulary's size)
    for p in points:  # perplexity is exp of the mean next-token loss
        assert p["va_ppl"] == pytest.approx(np.exp(p["va_cost"]), rel=1e-6)
    best = min(p["va_ppl"] for p in points)
    assert f"LM Valid Perplexity: {best:.2f}" in printed
    print(f"validation perplexity by epoch: {[round(p['va_ppl'], 2) for p in points]}")


def test_language_model_updates_with_at_most_one_sync_and_evaluates_with_none(corpus, tmp_path, monkeypatch,
                                                                              sync_counter):
    updates, forwards, total = count_syncs(lm_arguments(corpus, tmp_path, "--n_iter", "1"), monkeypatch, sync_counter)
    assert updates and max(updates) == 0 and total <= len(updates)
    assert forwards and set(forwards) == {0}


def test_language_model_plain_and_compiled_paths_train_the_same(corpus, tmp_path):
    """--plain and --compile keep a row per position ([N, T, vocab] from LMModel); the default selects rows."""
    states = {}
    for variant in ("default", "--plain", "--compile"):
        out = tmp_path / variant.strip("-")
        extra = [variant] if variant != "default" else []
        assert train.main(lm_arguments(corpus, out, *NO_DROPOUT, "--n_iter", "1", "--lr", "2.5e-4", *extra)) == 0
        states[variant] = final_state(out)["model"]
    a = states["default"]
    for variant in ("--plain", "--compile"):
        worst = max((a[k] - states[variant][k]).abs().max().item() for k in a)
        print(f"language model, {variant} vs default: max parameter difference {worst:.1e}")
        assert worst <= 1e-5  # measured 1.2e-7 (--plain) and 3.4e-8 (--compile) at the recipe's lr of 2.5e-4


def test_language_model_checkpoint_loads_with_its_own_positions(corpus, tmp_path):
    """checkpoint.pt records --dataset lm, so its loader counts no special rows (3 would shift every position)."""
    assert train.main(lm_arguments(corpus, tmp_path, "--n_iter", "1")) == 0
    n_vocab = vocabulary_size(corpus / "model")
    run = tmp_path / "save" / "run"
    from_checkpoint, from_folder = load_model(str(run / "checkpoint.pt"))[0], load_model(str(run / "model"))[0]
    assert from_checkpoint.transformer.n_ctx == from_folder.transformer.n_ctx == 32
    x = torch.stack([torch.randint(0, n_vocab, (2, 32)), n_vocab + torch.arange(32).expand(2, 32)], dim=-1)
    torch.testing.assert_close(from_checkpoint.eval()(x), from_folder.eval()(x), rtol=0, atol=1e-6)


def test_language_model_resume_equals_an_uninterrupted_run(corpus, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main(lm_arguments(corpus, whole)) == 0
    assert train.main(lm_arguments(corpus, parts, "--stop_after_updates", "4")) == 130
    assert train.main(lm_arguments(corpus, parts, "--resume")) == 0
    a, b = final_state(whole)["model"], final_state(parts)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tuning_starts_from_the_trained_language_model(corpus, tmp_path):
    from safetensors.torch import load_file

    assert train.main(lm_arguments(corpus, tmp_path / "lm")) == 0
    lm_dir = tmp_path / "lm" / "save" / "run" / "model"
    argv = ["--data_dir", str(corpus / "roc"), "--model_path", str(lm_dir), "--encoder_path",
            str(lm_dir / "vocab.json"), "--bpe_path", str(lm_dir / "merges.txt"), "--log_dir", str(tmp_path / "log"),
            "--save_dir", str(tmp_path / "save"), "--submission_dir", str(tmp_path / "sub"), "--desc", "run",
            *SIZES, "--n_ctx", "32", "--n_iter", "1", "--stop_after_updates", "1"]
    run = run_of(argv)
    trained = final_state(tmp_path / "lm")["model"]
    ours = run.model.transformer.state_dict()
    n_vocab = run.data.specials.n_vocab
    assert torch.equal(ours["h.1.mlp.c_fc.w"], trained["transformer.h.1.mlp.c_fc.w"])
    we, lm_we = ours["embed.weight"], trained["transformer.embed.weight"]
    assert torch.equal(we[:n_vocab], lm_we[:n_vocab])  # tokens
    assert torch.equal(we[n_vocab + 3:], lm_we[n_vocab:n_vocab + we.size(0) - n_vocab - 3])  # positions
    assert "transformer.tokens_embed.weight" in load_file(lm_dir / "model.safetensors") or \
        "tokens_embed.weight" in load_file(lm_dir / "model.safetensors")
    assert train.main(argv) == 130  # and it trains


def test_resume_with_another_log_dir_is_a_clear_error(setup, interrupted, tmp_path, capsys):
    """--log_dir is not compared on resume, but the checkpoint continues the log it counted: a missing
    log is one line naming it (it was a FileNotFoundError traceback)."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(interrupted, out)
    argv = arguments(setup, out, "--resume")
    argv[argv.index("--log_dir") + 1] = str(tmp_path / "elsewhere")
    expect_failure(argv, r"^error: --resume: the run's log .*elsewhere/run\.jsonl is missing", capsys)


@pytest.mark.parametrize("device, expected", [("cuda:1", r"--device cuda:1: this machine has 1 CUDA device\(s\)$"),
                                              ("gpu", r"--device 'gpu' is not a device name")])
def test_device_this_machine_lacks_is_one_line(setup, tmp_path, device, expected, capsys, monkeypatch):
    """The README's flag `--device cuda:1` on a machine without it: one line, not torch's traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    expect_failure(arguments(setup, tmp_path, "--device", device), rf"^error: {expected}", capsys)


def test_torchrun_resumed_run_with_dropout_ends_the_same(setup, tmp_path):
    """Each process draws its own dropout masks: the checkpoint keeps every rank's generator, so a
    resumed torchrun run ends with the parameters of an uninterrupted one (it reseeded the ranks)."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert torchrun(arguments(setup, whole), tmp_path).returncode == 0
    assert "continue with --resume" in torchrun(arguments(setup, parts, "--stop_after_updates", "3"), tmp_path).stdout
    result = torchrun(arguments(setup, parts, "--resume"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = final_state(whole)["model"], final_state(parts)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
