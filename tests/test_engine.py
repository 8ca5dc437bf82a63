"""engine: an update trains on the objective the task declares; one pass equals micro-batches and
the out-of-memory fallback; autocast casts the weights once per update; updates prepared ahead in a
background thread are the updates prepared in place; evaluation keeps the caller's mode and equals
the plain path; the loss is read one update late; malloc keeps freed memory."""

import platform
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import config
import engine
from batches import EncodedSplit
from conftest import ROOT
from engine import LateReader, NonFiniteLoss, RunError, Runtime, Trainer
from model_pytorch import ModelSpec, build_model
from synthetic import story_arrays
from tasks import get_task

N_VOCAB, N_CTX = 50, 77
CLF = N_VOCAB + 2
SIZES = ["--n_embd", "32", "--n_head", "4", "--n_layer", "2", "--n_transfer", "2", "--n_batch", "4", "--n_gpu", "4",
         "--lr", "1e-3"]
NO_DROPOUT = ["--embd_pdrop", "0", "--attn_pdrop", "0", "--resid_pdrop", "0", "--clf_pdrop", "0"]


def make_trainer(*flags, device="cpu", seed=0):
    """A Trainer of a tiny DoubleHeadModel for ROCStories, its weights drawn from `seed`."""
    cfg = config.parse([*SIZES, *flags])
    torch.manual_seed(seed)
    model = build_model(ModelSpec(cfg.model, N_VOCAB, 3, N_CTX, "multiple_choice", CLF))
    optimizer = cfg.optim.build(model.parameters(), t_total=100)
    return Trainer(model, get_task("rocstories"), optimizer, cfg, Runtime(torch.device(device)), CLF)


@pytest.fixture(scope="module")
def stories():
    return story_arrays(16, N_VOCAB, N_CTX, seed=1)


def recording(trainer):
    """Keep the gradients the optimizer sees at each update."""
    seen, step = [], trainer.opt.step

    def record(*a, **k):
        seen.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return step(*a, **k)

    trainer.opt.step = record
    return seen


def test_the_update_trains_on_the_task_and_the_lm_loss(stories):
    """The gradient of one update equals that of mean(clf loss) + 0.5 mean(LM loss) written out from the
    model's full outputs (docs/reference.md §2): dropping the LM term fails here."""
    X, M, Y = stories
    trainer = make_trainer(*NO_DROPOUT)
    model = trainer.model
    grads = recording(trainer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    values = trainer.update(X, M, Y)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    Xt, Mt, Yt = torch.from_numpy(X), torch.from_numpy(M), torch.from_numpy(Y).long()
    we = model.transformer.embed.weight
    h = model.transformer(Xt, we)  # [32 sequences, T, n_embd], every position
    logits = h[:, :-1] @ we.T
    targets = Xt[..., 1:, 0].reshape(32, -1)
    token_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    mask = Mt.reshape(32, -1)[:, 1:]
    lm = ((token_loss.view(32, -1) * mask).sum(1) / mask.sum(1)).mean()
    first_clf = (Xt[..., 0].reshape(32, -1) == CLF).int().argmax(1)
    clf_logits = model.task_head.linear(h[torch.arange(32), first_clf]).view(16, 2)
    expected = F.cross_entropy(clf_logits, Yt) + 0.5 * lm
    model.zero_grad()
    expected.backward()
    assert values[0].item() == pytest.approx(expected.item(), rel=1e-5)
    for name, p in model.named_parameters():
        if name != "task_head.linear.bias":
            torch.testing.assert_close(grads[0][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def passes(monkeypatch):
    """Examples per forward pass of the updates that follow."""
    sizes, real = [], Trainer.objective
    monkeypatch.setattr(Trainer, "objective", lambda self, batch: sizes.append(len(batch.Y)) or real(self, batch))
    return sizes


def test_one_pass_per_update_equals_equal_micro_batches(stories, monkeypatch):
    """The same objective: the mean over the update's examples (docs/speed.md)."""
    X, M, Y = stories
    results, sizes = {}, passes(monkeypatch)
    for flags in ([], ["--micro_batch", "4"]):
        trainer = make_trainer(*NO_DROPOUT, *flags)
        grads = recording(trainer)
        sizes.clear()
        trainer.update(X, M, Y)
        results[bool(flags)] = list(sizes), grads[0], dict(trainer.model.named_parameters())
    (one, one_grads, one_params), (micro, micro_grads, micro_params) = results[False], results[True]
    assert one == [16] and micro == [4, 4, 4, 4]  # one pass of the process's share by default
    for name, g in one_grads.items():
        assert (g - micro_grads[name]).abs().max() <= 3e-7, name  # measured 2.2e-8
    for name, p in one_params.items():
        if name != "task_head.linear.bias":  # its analytic gradient is 0 (docs/reference.md §3): noise steps
            assert (p - micro_params[name]).abs().max() <= 1e-6, name  # measured 1.3e-7


def test_out_of_memory_runs_the_update_again_in_halves(stories, monkeypatch, capsys):
    """A device that holds 4 examples per pass: the update runs again as micro-batches of 4, and
    its parameters equal those of --micro_batch 4 from the start."""
    X, M, Y = stories
    asked = make_trainer(*NO_DROPOUT, "--micro_batch", "4")
    asked.update(X, M, Y)
    real = Trainer.objective

    def small_device(self, batch):
        if len(batch.Y) > 4:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real(self, batch)

    monkeypatch.setattr(Trainer, "objective", small_device)
    fallback = make_trainer(*NO_DROPOUT)
    fallback.update(X, M, Y)
    assert fallback.micro_batch == 4
    assert "out of memory with 8 examples per pass: the update runs again as micro-batches of 4" in \
        capsys.readouterr().out
    a, b = asked.model.state_dict(), fallback.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    odd = make_trainer("--n_batch", "5", "--n_gpu", "1")  # an odd pass cannot be halved
    with pytest.raises(RunError, match="out of memory with 5 examples per pass; pass a smaller --micro_batch"):
        odd.update(X[:5], M[:5], Y[:5])


def test_a_micro_batch_must_divide_the_share():
    with pytest.raises(RunError, match=r"--micro_batch 5 must divide a process's share of the update \(16"):
        make_trainer("--micro_batch", "5")


def param_casts(model, fn):
    """How many times autocast casts a parameter while fn runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    params = {p.data_ptr() for p in model.parameters()}

    class Casts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in params:
                Casts.count += 1
            return func(*args, **(kwargs or {}))

    with Casts():
        fn()
    return Casts.count


def test_autocast_casts_the_weights_once_per_update(stories):
    X, M, Y = stories
    counts = {}
    for micro in ("16", "4"):
        trainer = make_trainer("--amp", "bf16", "--micro_batch", micro)
        counts[micro] = param_casts(trainer.model, lambda trainer=trainer: trainer.update(X, M, Y))
    print(f"parameter casts per update: {counts}")
    assert counts["16"] > 0 and counts["4"] == counts["16"]


def test_evaluation_keeps_the_callers_mode(stories):
    trainer, split = make_trainer(), EncodedSplit.from_padded(*stories).head(8)
    for training in (True, False):
        trainer.model.train(training)
        trainer.outputs(split)
        assert trainer.model.training is training and trainer.model.transformer.h[0].training is training


def test_fast_evaluation_equals_the_plain_path(stories):
    """Sorted batches of real tokens only, fused attention, no LM: the logits of the TF computation."""
    X, M, Y = stories
    split = EncodedSplit.from_padded(X, M, Y)
    fast, plain = make_trainer(), make_trainer("--plain")
    plain.model.load_state_dict(fast.model.state_dict())
    a, b = fast.outputs(split), plain.outputs(split)
    assert a.shape == (16, 2) and np.abs(a - b).max() <= 1e-5
    cost, metrics = fast.evaluate(split)
    assert cost == pytest.approx(F.cross_entropy(torch.from_numpy(a), torch.from_numpy(Y)).item(), rel=1e-6)
    assert metrics == {"Accuracy": 100.0 * np.mean(a.argmax(1) == Y)}


def test_prefetched_updates_are_the_updates_prepared_here(monkeypatch):
    """The background thread lays out and prepares the updates of the caller's draws, in order, the
    same batches as preparing the drawn examples here; it draws no random number (numpy's and
    torch's generators untouched), and closing it early stops it."""
    X, M, Y = story_arrays(40, N_VOCAB, N_CTX, seed=3)
    split = EncodedSplit.from_padded(X, M, Y)
    trainer = make_trainer("--micro_batch", "8")
    draws = [np.random.default_rng(k).permutation(40)[:16] for k in range(4)]
    states = np.random.get_state()[1].copy(), torch.get_rng_state()
    threads = set()
    real = Trainer.prepare
    monkeypatch.setattr(Trainer, "prepare", lambda self, *a: threads.add(threading.get_ident()) or real(self, *a))
    prepared = list(trainer.prefetched(split, iter(draws)))
    assert threads and threading.get_ident() not in threads
    assert np.array_equal(np.random.get_state()[1], states[0]) and torch.equal(torch.get_rng_state(), states[1])
    for update, idx in zip(prepared, draws, strict=True):
        here = real(trainer, X[idx], M[idx], Y[idx])
        assert update.size == here.size == 8 and len(update.batches) == len(here.batches) == 2
        for ours, theirs in zip(update.batches, here.batches):
            assert all(torch.equal(getattr(ours, k), getattr(theirs, k)) for k in ("X", "M", "Y"))
            assert torch.equal(ours.plan.lm_rows, theirs.plan.lm_rows)
    asked = []
    early = trainer.prefetched(split, (asked.append(k) or idx for k, idx in enumerate(draws * 10)))
    next(early)
    early.close()
    assert len(asked) <= 4  # the first, then at most two ahead (and one more taken as the first was handed out)


def test_evaluation_batches_by_device_and_one_pass_per_update():
    for device, size in (("cuda", 128), ("cpu", 16)):  # the Trainer touches no device when it is made
        cfg = config.parse(SIZES)
        trainer = Trainer(torch.nn.Linear(1, 1), get_task("rocstories"), None, cfg, Runtime(torch.device(device)), CLF)
        assert trainer.eval_batch == size and trainer.micro_batch is None
    assert make_trainer("--eval_batch", "3").eval_batch == 3


def test_the_loss_is_read_one_update_late_and_a_non_finite_one_stops():
    reader = LateReader(torch.device("cpu"))
    assert reader.push(torch.tensor([0.5, 0.0]), 1) is None
    assert reader.push(torch.tensor([0.25, 1.0]), 2) == (0.5, False)
    assert reader.flush() == (0.25, True) and reader.stop and reader.flush() is None
    reader.push(torch.tensor([float("nan"), 0.0]), 3)
    with pytest.raises(NonFiniteLoss, match="the training loss became nan at update 3"):
        reader.flush()


KEEP_MEMORY_PROBE = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import engine
from batches import EncodedSplit
applied = engine.keep_freed_host_memory() if sys.argv[1] == "keep" else False
for _ in range(2):  # the first round may grow the heap
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, allocated, touched and freed
    blocks = [torch.ones(768 * 2 ** 20 // 4) for _ in range(3)]  # a pass's activations: 2.25 GiB held at once
    del blocks  # freed together: more than 2 GiB free at the heap's top
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, faults)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator only")
def test_freed_host_memory_is_reused_without_page_faults(tmp_path):
    """Without keep_freed_host_memory every 64 MiB block is a fresh mmap: 16,384 page faults to
    touch it, each time; with it the second round reuses the heap, also after more than 2 GiB were
    freed at once (with a trimming threshold of 2 GiB that was handed back: 573,000 faults in the second round)."""
    script = tmp_path / "probe.py"
    script.write_text(KEEP_MEMORY_PROBE.format(root=str(ROOT)))
    results = {}
    for mode in ("keep", "default"):
        out = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, check=True)
        applied, faults = out.stdout.split()
        results[mode] = (applied, int(faults))
    print(results)
    assert results["keep"][0] == "True"
    assert results["default"][1] > 5 * 10_000  # about 16,384 faults per block
    assert results["keep"][1] < 1_000
    assert engine.keep_freed_host_memory.__doc__


def test_cpu_threads_follow_the_flag_the_environment_then_the_idle_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setattr(engine, "idle_cpus", lambda: 1)  # the load does not matter then
        torch.set_num_threads(2)
        assert engine.set_cpu_threads(None) == 2 == torch.get_num_threads()  # the environment's choice stands
        assert engine.set_cpu_threads(1) == 1 and torch.get_num_threads() == 1  # --threads wins
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(engine, "idle_cpus", lambda: 1)  # a busy machine: one thread
        assert engine.set_cpu_threads(None) == 1
        monkeypatch.setattr(engine, "idle_cpus", lambda: 64)  # idle: the threads torch uses (its default: the cores)
        torch.set_num_threads(2)
        assert engine.set_cpu_threads(None) == 2
    finally:
        torch.set_num_threads(before)
