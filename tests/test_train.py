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
from conftest import ROOT, flip_bit, padded_arrays, reference_sequences, task_arguments
from datasets import ROC_TEST, rocstories, rocstories_test_labels
from engine import PhaseTimes, Runtime, Trainer
from metrics import METRIC_KEYS
from model_pytorch import MultipleChoiceHead, make_task_head
from synthetic import synthetic_story, write_synthetic, write_synthetic_rocstories
from tasks import get_task
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


def test_non_finite_loss_stops_the_run_before_any_parameters_are_kept(setup, tmp_path, capsys):
    argv = arguments(setup, tmp_path, "--submit", "--lr", "1e30", "--max_grad_norm", "0")
    expect_failure(argv, r"the training loss became (nan|inf) at update \d+; the run is stopped", capsys)
    assert not (tmp_path / "save" / "run" / "best_params.safetensors").exists()  # none was ever evaluated


def test_no_best_parameters_before_the_first_evaluation(setup, tmp_path):
    """A run stopped before its first evaluation leaves no "best" parameters (untrained ones were written
    at the start, and generate.py and export_hf.py used them without a word)."""
    assert train.main(arguments(setup, tmp_path, "--submit", "--stop_after_updates", "2")) == 130
    assert not (tmp_path / "save" / "run" / "best_params.safetensors").exists()
    assert train.main(arguments(setup, tmp_path, "--submit", "--resume")) == 0
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
    """The README's demo command (4 of its 8 epochs, so that a busy machine finishes it), then the
    demo's generation and export on its fine-tune, with no other flag."""
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"&& python (train\.py --demo)\s", readme).group(1).split()
    result = subprocess.run([sys.executable, *command, "--demo_dir", str(tmp_path), "--n_iter", "4"], cwd=ROOT,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    valid = float(re.search(r"ROCStories Valid Accuracy: ([\d.]+)", result.stdout).group(1))
    test = float(re.search(r"ROCStories Test Accuracy: ([\d.]+)", result.stdout).group(1))
    took = re.search(r"done in [\d.]+ s", result.stdout).group(0)
    print(f"demo, 4 epochs: valid {valid}, test {test}; {took}")
    assert valid > 90 and test > 90  # 100.00 / 100.00 after 4 epochs here; chance is 50
    assert os.path.exists(tmp_path / "data" / ROC_TEST) and os.path.exists(tmp_path / "model" / "params_9.npy")
    demo = ["--demo", "--demo_dir", str(tmp_path)]
    assert export_hf.main([*demo, "--out", str(tmp_path / "hf")]) == 0  # the fine-tune, with its head
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["OpenAIGPTDoubleHeadsModel"]
    assert generate.main([*demo, "--prompt", "tom was happy .", "--max_new_tokens", "4", "--seed", "0"]) == 0


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
    assert proc.returncode == 143, err[-2000:]  # 128 + SIGTERM
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
    ("--n_valid", "0", "at least 1"), ("--dist_timeout", "0", "minutes > 0"),
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


def test_a_resumed_run_sums_with_the_threads_of_the_interrupted_one(setup, tmp_path):
    """Float sums depend on the CPU thread count: a resume without --threads takes the checkpoint's,
    so it ends as an uninterrupted run with those threads (with 2 threads instead: 5.8e-4 apart on the demo)."""
    before = torch.get_num_threads()
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    try:
        assert train.main(arguments(setup, whole, "--threads", "1")) == 0
        assert train.main(arguments(setup, parts, "--threads", "1", "--stop_after_updates", "3")) == 130
        torch.set_num_threads(2)
        assert train.main(arguments(setup, parts, "--resume")) == 0
        assert torch.get_num_threads() == 1 and final_state(parts)["threads"] == 1
    finally:
        torch.set_num_threads(before)
    a, b = final_state(whole)["model"], final_state(parts)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- nothing lost, nothing silently wrong

def copy_of(folder, to):
    import shutil

    shutil.copytree(folder, to)
    return to


def test_resume_refuses_changed_data_in_one_line(setup, interrupted, tmp_path, capsys):
    """The data changed under the checkpoint: it went on silently on the new data."""
    out, data = copy_of(interrupted, tmp_path / "out"), copy_of(setup / "data", tmp_path / "data")
    story = data / ROC_TEST
    story.write_text(story.read_text().replace("smiled", "grinned"))
    argv = arguments(setup, out, "--resume")
    argv[argv.index("--data_dir") + 1] = str(data)
    expect_failure(argv, rf"^error: --resume: the data in {re.escape(str(data))} changed since the checkpoint was "
                         r"made; resume with the interrupted run's own inputs", capsys)


def test_resume_refuses_another_vocabulary_in_one_line(setup, interrupted, tmp_path, capsys):
    """Two merges swapped: the same sizes, other ids; it went on silently."""
    out = copy_of(interrupted, tmp_path / "out")
    merges = (setup / "model" / "vocab.bpe").read_text().split("\n")
    merges[1], merges[2] = merges[2], merges[1]
    (tmp_path / "vocab.bpe").write_text("\n".join(merges))
    argv = arguments(setup, out, "--resume", "--bpe_path", str(tmp_path / "vocab.bpe"))
    expect_failure(argv, r"^error: --resume: the vocabulary .*encoder.json / .*vocab.bpe changed since the checkpoint",
                   capsys)


@pytest.fixture(scope="module")
def interrupted_with_best(setup, tmp_path_factory):
    """A --submit run stopped inside epoch 2: the best parameters of epoch 1 are kept."""
    out = tmp_path_factory.mktemp("with_best")
    assert train.main(arguments(setup, out, "--submit", "--stop_after_updates", "7")) == 130
    return out


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_resume_checks_the_best_parameters_at_start(setup, interrupted_with_best, tmp_path, capsys, damage,
                                                    monkeypatch):
    """A damaged best file trained to the end, then failed in prediction; a deleted one was silently replaced by
    the last parameters while the report showed the best epoch's accuracy. Both are refused before training."""
    out = copy_of(interrupted_with_best, tmp_path / "out")
    best = out / "save" / "run" / "best_params.safetensors"
    if damage == "flip":
        flip_bit(best, -200, bit=2)
        expected = rf"^error: --resume: {re.escape(str(best))} is damaged: its contents do not match the sha256"
    else:
        best.unlink()
        expected = rf"^error: --resume: the best parameters {re.escape(str(best))} are missing"
    monkeypatch.setattr(train.Run, "train", lambda self: pytest.fail("trained before the check"))
    expect_failure(arguments(setup, out, "--submit", "--resume"), expected, capsys)


def test_a_log_emptied_by_a_kill_is_restored_from_the_checkpoint(setup, interrupted, tmp_path, capsys):
    """A kill inside the log's rewrite on resume left it empty; the next resume accepted it and the final report
    and log were wrong. The checkpoint holds the lines it counted: the log is restored, with a warning."""
    whole = tmp_path / "whole"
    assert train.main(arguments(setup, whole)) == 0
    out = copy_of(interrupted, tmp_path / "out")
    (out / "log" / "run.jsonl").write_text("")
    capsys.readouterr()
    assert train.main(arguments(setup, out, "--resume")) == 0
    assert "warning: the log" in capsys.readouterr().err
    strip = lambda log: [{k: v for k, v in line.items() if k != "time"} for line in log]
    assert strip(read_log(out))[1:] == strip(read_log(whole))[1:] and read_log(out)[0]["desc"] == "run"


def test_a_second_run_on_the_same_folder_is_refused_and_the_first_goes_on(setup, tmp_path, capsys):
    """Two runs with the same --desc at once: the second (other settings) overwrote the first's checkpoint, best
    parameters, log and submission, and the first ended in a traceback. Now it is one line naming the first's
    process id and writes nothing; after the first is killed (SIGKILL), its lock is no obstacle."""
    import signal
    import time

    argv = arguments(setup, tmp_path, "--submit")
    argv[argv.index("--n_iter") + 1] = "400"
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    log, checkpoint = tmp_path / "log" / "run.jsonl", tmp_path / "save" / "run" / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not (checkpoint.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    before = log.read_text()
    second = arguments(setup, tmp_path, "--submit", "--lr", "1e-4")
    expect_failure(second, rf"^error: {re.escape(str(tmp_path / 'save' / 'run'))} is in use by another run \(process "
                           rf"{first.pid}\)", capsys)
    assert log.read_text().startswith(before) and first.poll() is None
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert train.main(arguments(setup, tmp_path, "--resume", "--submit", "--n_iter", "400",
                                "--stop_after_updates", "1")) == 130


def run_with_file_size_limit(argv, limit):
    """train.py in a process whose files may not grow beyond `limit` bytes (a full disk, as the writes see it)."""
    import resource
    import signal

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], capture_output=True, text=True,
                          timeout=300, preexec_fn=limited)


def test_a_full_disk_during_training_is_one_line_before_the_next_update(setup, tmp_path):
    """The checkpoint after epoch 1 cannot be written (it is 3 times the parameters, with Adam's moments): the
    failure was reported an epoch later as '[enforce fail at inline_container.cc:672] unexpected pos' without a
    file name. Now one line naming the file and the cause, raised before epoch 2's second update (so the log holds
    epoch 1 only), and the best parameters written before it are intact."""
    out = tmp_path / "out"
    argv = arguments(setup, out, "--submit", "--n_iter", "3", "--cache_dir", str(tmp_path / "cache"))
    size = os.path.getsize  # best parameters: about 160 KB; the checkpoint about 500 KB
    result = run_with_file_size_limit(argv, 300_000)
    checkpoint = out / "save" / "run" / "checkpoint.pt"
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: cannot write {checkpoint}: File too large"], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len(read_log(out)) == 2 and not checkpoint.exists()
    assert size(out / "save" / "run" / "best_params.safetensors") < 300_000
    read_checkpoint(str(out / "save" / "run" / "best_params.safetensors"))  # intact and verified
    assert not [n for n in os.listdir(out / "save" / "run") if ".tmp" in n]


def test_a_disk_full_at_start_is_one_line(setup, tmp_path):
    """The first best parameters cannot be written: it was a SafetensorError traceback."""
    out = tmp_path / "out"
    result = run_with_file_size_limit(arguments(setup, out, "--submit", "--cache_dir", str(tmp_path / "c")), 40_000)
    best = out / "save" / "run" / "best_params.safetensors"
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1] == f"error: cannot write {best}: File too large"


def test_a_write_refused_by_the_system_names_the_file_and_the_cause(setup, tmp_path, capsys, monkeypatch):
    """A read-only folder (as root, only a refusal from the system shows it): one line with the system's words."""
    import checkpoints

    real = checkpoints.atomic_write

    def refused(path, write):
        if path.endswith("checkpoint.pt"):
            def write(tmp):
                raise PermissionError(13, "Permission denied", tmp)
        return real(path, write)

    monkeypatch.setattr(checkpoints, "atomic_write", refused)
    expect_failure(arguments(setup, tmp_path), rf"error: cannot write {re.escape(str(tmp_path))}/save/run/"
                                              r"checkpoint.pt: Permission denied$", capsys)


def signal_when(monkeypatch, owner, name, sig, call=1):
    """Send `sig` to this process inside the `call`-th call of owner.name (after it ran)."""
    real, calls = getattr(owner, name), []

    def signalling(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), sig)
        return result

    monkeypatch.setattr(owner, name, signalling)


@pytest.mark.parametrize("phase, where, resumable", [
    ("set-up", "text_utils:TextEncoder.fingerprint", False),
    ("encoding", "task_data:encode_dataset", False),
    ("loading", "train:load_openai_pretrained_model", False),
    ("prediction", "engine:Trainer.outputs:3", True),  # calls 1 and 2: the evaluation (there a stop waits)
])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_anywhere_is_one_line_and_exit_130_or_143(setup, tmp_path, monkeypatch, capsys, phase, where,
                                                          resumable, sig):
    """Ctrl-C in set-up, encoding or prediction was a KeyboardInterrupt traceback, SIGTERM exit 143 with no
    message: now one line, exit 128 + the signal, resumable where a checkpoint of the run exists (prediction:
    --resume predicts again)."""
    import importlib
    import signal

    module, path, *call = where.split(":")
    *owners, attribute = path.split(".")
    target = importlib.import_module(module)
    for owner in owners:
        target = getattr(target, owner)
    signal_when(monkeypatch, target, attribute, getattr(signal, sig), call=int(call[0]) if call else 1)
    argv = arguments(setup, tmp_path, "--submit", "--analysis", "--n_iter", "1")
    assert train.main(argv) == 128 + getattr(signal, sig)
    captured = capsys.readouterr()
    lines = [line.split("\r")[-1] for line in captured.err.split("\n") if line.split("\r")[-1].strip()]  # no bars
    expected = (f"stopped by {sig}; continue with --resume (checkpoint: {tmp_path / 'save' / 'run' / 'checkpoint.pt'})"
                if resumable else f"stopped by {sig}; nothing to resume")
    assert lines == [expected] and "Traceback" not in captured.err
    if resumable:
        monkeypatch.undo()
        assert train.main(argv + ["--resume"]) == 0
        assert len((tmp_path / "sub" / "ROCStories.tsv").read_text().splitlines()) == 41


def test_a_stop_during_the_last_evaluation_is_honoured(setup, tmp_path, monkeypatch, capsys):
    """It was announced, then ignored: the run went on to predict. Now it stops with a checkpoint of the
    finished training, and --resume predicts as the uninterrupted run does."""
    import signal

    whole = tmp_path / "whole"
    assert train.main(arguments(setup, whole, "--submit")) == 0
    signal_when(monkeypatch, Trainer, "evaluate", signal.SIGINT, call=4)  # epoch 2's validation set
    out = tmp_path / "out"
    assert train.main(arguments(setup, out, "--submit")) == 130
    assert "continue with --resume" in capsys.readouterr().out
    assert final_state(out)["n_epochs"] == 2 and not (out / "sub" / "ROCStories.tsv").exists()
    monkeypatch.undo()
    assert train.main(arguments(setup, out, "--submit", "--resume")) == 0
    assert (out / "sub" / "ROCStories.tsv").read_text() == (whole / "sub" / "ROCStories.tsv").read_text()


def rank_pids(proc):
    """{rank: pid} of a torchrun job's worker processes."""
    ranks = {}
    for pid in child_pids(proc.pid):
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        ranks[int(env[b"RANK"])] = pid
    return ranks


def ended(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_torchrun_a_lost_rank_ends_the_other_with_one_line(setup, tmp_path, how):
    """A killed rank left the other with gloo 'Connection reset by peer' tracebacks; a stopped one (SIGSTOP) hung
    it for the default 30 minutes. Now the survivor ends with one line naming the lost rank, at once for a killed
    one, after --dist_timeout (here 0.25 minutes) for a stopped one."""
    import signal
    import time

    argv = arguments(setup, tmp_path, *NO_DROPOUT, "--dist_timeout", "0.25")
    argv[argv.index("--n_iter") + 1] = "400"
    ranks_dir = tmp_path / "ranks"
    command = TORCHRUN[:-1] + ["--log_dir", str(ranks_dir), "--redirects", "3", TORCHRUN[-1], *argv]
    proc = subprocess.Popen(command, cwd=tmp_path, env=one_thread_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log, checkpoint = tmp_path / "log" / "run.jsonl", tmp_path / "save" / "run" / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoint.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    ranks = rank_pids(proc)
    os.kill(ranks[1], getattr(signal, how))
    signalled = time.time()
    while not ended(ranks[0]) and time.time() < signalled + 120:
        time.sleep(0.1)
    took = time.time() - signalled
    if how == "SIGSTOP":
        os.kill(ranks[1], signal.SIGCONT)
    proc.communicate(timeout=120)
    print(f"rank 0 ended {took:.1f} s after rank 1's {how}")
    assert took < (10 if how == "SIGKILL" else 15 + 20)
    (rank0_err,) = ranks_dir.glob("*/attempt_0/0/stderr.log")
    err = rank0_err.read_text()
    last = err.strip().split("\n")[-1].split("\r")[-1]
    cause = "its connection closed" if how == "SIGKILL" else "no answer within --dist_timeout"
    assert last == f"error: rank 1 lost ({cause}); continue with --resume (checkpoint: {checkpoint})", err[-3000:]
    assert "Traceback" not in err
    load_checkpoint(str(checkpoint), config.parse(argv).flags(), config.fixed_settings(), config.RunConfig().flags())


def test_a_stop_while_a_resumed_run_sets_up_points_to_its_checkpoint(setup, interrupted, tmp_path, monkeypatch,
                                                                   capsys):
    import signal

    import task_data

    out = copy_of(interrupted, tmp_path / "out")
    signal_when(monkeypatch, task_data, "encode_dataset", signal.SIGTERM)
    assert train.main(arguments(setup, out, "--resume", "--cache_dir", str(tmp_path / "cache"))) == 143
    assert capsys.readouterr().err.split("\r")[-1] == \
        f"stopped by SIGTERM; continue with --resume (checkpoint: {out / 'save' / 'run' / 'checkpoint.pt'})\n"
    assert final_state(out)["n_updates"] == 3  # untouched
