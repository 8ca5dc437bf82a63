"""The training engine: runs the updates and evaluations of a model for a task on this process's
device (a CPU, one GPU, or one of several under torchrun) and knows nothing of which task it runs:
the task says what the model must compute, how it is scored and what evaluation keeps.

One update uses n_batch x n_gpu examples (8 x 4 = 32, the paper's batch). The TF code ran them as
n_gpu towers of n_batch and averaged the towers' gradients; here a process runs its share of the
update as ONE forward and backward pass (the same objective: the mean over the 32 examples), or as
equal micro-batches. Nothing inside an update waits for the device: the batch layout is worked out
on the host, by a background thread while the update before runs, and the loss is read one update
late (docs/speed.md).
"""

import contextlib
import ctypes
import datetime
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from batches import make_batch, resolve_device
from utils import computed_ahead, idle_cpus, iter_data


class RunError(RuntimeError):
    """A failure reported as one clear message and a non-zero exit."""


class NonFiniteLoss(RunError):
    pass


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self):
        return self.rank == 0

    def synchronize(self):
        """Wait for the device: only at phase boundaries, for honest phase times."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def use_device(self):
        """Make this process's GPU the calling thread's current device (a thread starts on GPU 0)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)


def setup_runtime(device_name, n_gpu, timeout_minutes=10.0, threads=None):
    """This process's device, and its rank among torchrun's processes (the process group joined, its
    exchanges ending with an error after `timeout_minutes` without an answer); on a CPU, malloc keeps
    freed memory and `threads` (else set_cpu_threads' default) compute."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        device = resolve_device(device_name)
    except ValueError as err:
        raise RunError(str(err)) from None
    if device.type == "cpu":
        keep_freed_host_memory()
        set_cpu_threads(threads)
    if world == 1:
        return Runtime(device)
    if n_gpu % world:
        raise RunError(f"n_gpu={n_gpu} towers cannot be spread over {world} processes: "
                       f"n_gpu must be a multiple of the number of processes")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return Runtime(device, rank, world)


class PeerLost(RunError):
    """Another process of a torchrun job died or stopped answering."""


COMMUNICATION_FAILURES = ("gloo", "NCCL", "Connection reset", "Connection closed", "Connection refused",
                          "Broken pipe", "Timed out", "timed out")


@contextlib.contextmanager
def peers_watched(runtime, stop):
    """Under torchrun, an exchange that fails because another process was lost (killed: its
    connection closed; stopped: --dist_timeout) becomes one PeerLost line on every other process."""
    try:
        yield
    except RuntimeError as err:
        lost = peer_failure(err, runtime, stop)
        if lost is None:
            raise
        raise lost from None


def peer_failure(err, runtime, stop):
    """A PeerLost naming the processes that do not answer, where `err` is a failed exchange of a
    multi-process run; else None. The survivors each mark themselves present in the job's store
    and wait a moment: the ranks still unmarked are the lost ones (a blocked or dead process cannot
    mark itself). Signals are only noted from then on (torchrun's agent sends SIGTERM meanwhile)."""
    if runtime.world == 1 or isinstance(err, RunError) or not (
            isinstance(err, dist.DistError) or any(word in str(err) for word in COMMUNICATION_FAILURES)):
        return None
    stop.hold()
    cause = "no answer within --dist_timeout" if "timed out" in str(err).lower() else "its connection closed"
    lost = silent_ranks(runtime)
    who = f"rank {', '.join(map(str, lost))}" if lost else "another process"
    return PeerLost(f"{who} lost ({cause})")


def silent_ranks(runtime, wait=3.0):
    """The ranks that do not mark themselves present in the job's store within `wait` seconds."""
    prefix = f"present/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(prefix + str(runtime.rank), "1")
        deadline = time.monotonic() + wait
        while True:
            silent = [r for r in range(runtime.world) if not store.check([prefix + str(r)])]
            if not silent or time.monotonic() > deadline:
                return silent
            time.sleep(0.1)
    except (RuntimeError, ValueError):  # the store itself is gone (it lived in a lost process)
        return []


def keep_freed_host_memory():
    """Have glibc's malloc keep freed blocks of any size for reuse instead of handing them back.

    By default glibc serves every block over 32 MiB with a fresh mmap and unmaps it when freed, so
    a CPU training pass whose activations are that large pays a page fault and a page clearing per
    4 KiB the first time it touches each one, in every pass (docs/speed.md has the figures). The
    process keeps its peak memory instead: no block is mmapped, and the heap is never trimmed (a
    threshold of -1, mallopt(3); any finite one, even the largest, 2 GiB, still handed back the
    several GiB a pass of 32 stories frees at once). Linux with glibc only; elsewhere nothing
    changes. True when applied."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters of <malloc.h>
    never = -1  # as the threshold: never trim the heap
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, never))


def set_cpu_threads(requested=None):
    """Threads for a CPU run: as requested (--threads), else as OMP_NUM_THREADS says, else the CPUs
    other programs leave idle, at most the threads torch uses now (in a fresh process its default,
    the physical cores). More threads than idle
    CPUs make each update several times slower on a busy machine (the threads wait for each
    other), so the default follows the load. Returns the number set."""
    if requested is None and "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    threads = requested or max(1, min(torch.get_num_threads(), idle_cpus()))
    torch.set_num_threads(threads)
    return threads


class PhaseTimes:
    """Wall time per phase of a run (start-up, encoding, loading, training, ...), for the report."""

    def __init__(self, runtime):
        self.runtime, self.seconds = runtime, {}

    @contextlib.contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.runtime.synchronize()
            self.add(name, time.perf_counter() - start)

    def add(self, name, seconds):
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def report(self, n_updates):
        parts = [f"{name} {s:.1f} s" for name, s in self.seconds.items()]
        if n_updates and "training" in self.seconds:
            parts.append(f"{1000 * self.seconds['training'] / n_updates:.1f} ms per update")
        return "time: " + ", ".join(parts)


class Stopped(BaseException):
    """Ctrl-C or SIGTERM where the run cannot finish its step first: it ends at once (a BaseException,
    as KeyboardInterrupt: no `except Exception` swallows it)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """Ctrl-C / SIGTERM for the whole of a run: set-up, encoding, training, evaluation, prediction.

    Inside `deferred()` (the epochs: updates, evaluation, checkpoint) a signal asks to stop after
    the current update, with a resumable checkpoint; a second one stops at once. Elsewhere a signal
    stops at once (raises Stopped). Under torchrun the request travels with the update's loss, so
    every process stops after the same update. `exit_code`: 128 + the signal's number (130 for
    SIGINT, 143 for SIGTERM; 130 for a stop asked otherwise)."""

    def __init__(self):
        self.requested, self.signum, self.resumable = False, None, False
        self._deferring, self._holding, self._previous = False, False, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = self.signum or signum
        if self._holding:
            return
        if self._deferring and not self.requested:
            self.requested = True
            tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after this update (again to stop at once)")
            return
        raise Stopped(signum)

    @contextlib.contextmanager
    def deferred(self):
        """Signals inside ask to stop after the current update instead of stopping at once."""
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False

    def hold(self):
        """From now on signals are only noted: the run is ending on its own (a lost peer's report)."""
        self._holding = True

    @property
    def exit_code(self):
        return 128 + (self.signum or signal.SIGINT)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def any_rank(flag, runtime):
    """Whether `flag` is true on any process (every process gets the same answer)."""
    if runtime.world == 1:
        return flag
    value = torch.tensor([float(flag)], device=runtime.device)
    dist.all_reduce(value)
    return value.item() > 0


class LateReader:
    """Reads an update's [loss, stop flag] one update later, so the host never waits for the
    device inside an update; `flush()` reads the last one (before any evaluation or checkpoint)."""

    def __init__(self, device):
        self.device, self.pending, self.n_update = device, None, 0
        self.loss, self.stop = None, False

    def push(self, values, n_update):
        previous = self.flush()
        if self.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = (host, event)
        self.pending, self.n_update = values, n_update
        return previous

    def flush(self):
        """(loss, stop flag) of the update pushed last, or None; raises on a non-finite loss."""
        if self.pending is None:
            return None
        values, self.pending = self.pending, None
        if isinstance(values, tuple):
            values[1].synchronize()
            values = values[0]
        self.loss, stop = values.tolist()
        self.stop = self.stop or stop > 0
        if not np.isfinite(self.loss):
            raise NonFiniteLoss(f"the training loss became {self.loss} at update {self.n_update}; the run is "
                                "stopped (lower --lr, or drop --amp fp16). The best checkpoint is untouched.")
        return self.loss, self.stop


@contextlib.contextmanager
def evaluation_mode(model):
    """No dropout and no gradients inside; the caller's train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class Trainer:
    """Updates and evaluations of `model` for `task` under the frozen RunConfig `cfg`."""

    def __init__(self, model, task, optimizer, cfg, runtime, clf_token):
        self.model, self.task, self.opt, self.cfg, self.runtime = model, task, optimizer, cfg, runtime
        self.clf_token = clf_token
        self.scaler = torch.amp.GradScaler(runtime.device.type) if cfg.amp == "fp16" else None
        self.micro_batch = cfg.micro_batch  # None: all at once; halved when the device runs out of memory
        self.eval_batch = cfg.eval_batch or (16 if runtime.device.type == "cpu" else 128)
        self.share = cfg.batch_size // runtime.world  # this process's examples per update
        if cfg.micro_batch and self.share % cfg.micro_batch:
            raise RunError(f"--micro_batch {cfg.micro_batch} must divide a process's share of the update "
                           f"({self.share} examples)")
        self.train_model = self._wrapped(model)
        self.compile_shapes = {}  # with --compile: seconds of each new shape's first update (compiling)

    def _wrapped(self, model):
        """DDP across processes, torch.compile with static shapes (CUDA graphs on a GPU)."""
        if self.runtime.world > 1:
            cuda = self.runtime.device.type == "cuda"
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[self.runtime.device.index]
                                                              if cuda else None)
        if self.cfg.compile:
            mode = "reduce-overhead" if self.runtime.device.type == "cuda" else None
            model = torch.compile(model, dynamic=False, mode=mode)
        return model

    def autocast(self, enabled=True):
        """The run's autocast (--amp); enabled=False turns it off inside an autocast region."""
        if not self.cfg.amp:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.runtime.device.type, dtype=dtype, enabled=enabled)

    def batch_mode(self, training):
        if self.cfg.plain:
            return "plain"
        return "static" if self.cfg.compile and training else "trimmed"

    # -- training ----------------------------------------------------------------------------------
    def micro_batches(self, X, M, Y, size):
        """This process's share of an update's examples, as micro-batches of `size` on the device."""
        rank = self.runtime.rank
        X, M, Y = (a[rank * self.share:(rank + 1) * self.share] for a in (X, M, Y))
        lm = self.task.uses_lm(True, self.cfg.lm_coef)
        return [make_batch(X[k:k + size], M[k:k + size], Y[k:k + size], self.clf_token, self.runtime.device,
                           self.batch_mode(training=True), lm=lm) for k in range(0, self.share, size)]

    def prepare(self, X, M, Y):
        """An update's examples X, M, Y (every process's) made into this process's device batches and
        their plans: host work that can run before the update does (`prefetched`)."""
        size = self.micro_batch or self.share
        return PreparedUpdate((X, M, Y), size, self.micro_batches(X, M, Y, size))

    def prefetched(self, split, draws):
        """The prepared updates of `draws` (each an index array into the EncodedSplit `split`): each
        laid out and prepared in a background thread up to two updates before it runs, so that the
        device never waits for the host. Nothing here draws a random number: the order is the caller's.
        Close the generator to stop the thread."""
        mode = self.batch_mode(training=True)
        return computed_ahead(lambda idx: self.prepare(*split.batch(idx, mode)), draws,
                              initializer=self.runtime.use_device)

    def objective(self, batch):
        """The training objective of one (micro-)batch, as the task defines it."""
        lm, logits = self.train_model(batch.X, plan=batch.plan)
        return self.task.objective(lm, logits, batch.Y, self.cfg.lm_coef)

    def update(self, X, M, Y, stop_requested=False):
        """One update from the examples X, M, Y (every process's): `step` of `prepare`."""
        return self.step(self.prepare(X, M, Y), stop_requested)

    def step(self, prepared, stop_requested=False):
        """One update from a PreparedUpdate; returns a device tensor [mean loss, stop flag] summed over
        processes. If the device runs out of memory, the same update runs again in micro-batches of half
        the size (the same objective), and so on for the rest of the run."""
        t0 = time.perf_counter()
        while True:
            if prepared.size != (self.micro_batch or self.share):  # prepared before a fall-back: again
                prepared = self.prepare(*prepared.examples)
            try:
                values = self._update(prepared.batches, stop_requested)
                break
            except torch.OutOfMemoryError:
                prepared.batches.clear()  # their device memory freed before the smaller passes
                self._shrink_passes()
        shape = tuple(prepared.batches[0].X.shape)
        if self.cfg.compile and shape not in self.compile_shapes:
            self.runtime.synchronize()
            self.compile_shapes[shape] = time.perf_counter() - t0
        return values

    def _update(self, batches, stop_requested):
        """Nothing here waits for the device (fp16's loss scaler aside)."""
        total = None
        with self.autocast():  # one region for all micro-batches: weights are cast once per update
            for i, batch in enumerate(batches):
                last = i == len(batches) - 1
                sync = contextlib.nullcontext() if last or self.runtime.world == 1 else self.train_model.no_sync()
                with sync:
                    loss = self.objective(batch) / len(batches)
                    with self.autocast(enabled=False):
                        (self.scaler.scale(loss) if self.scaler else loss).backward()
                total = loss.detach() if total is None else total + loss.detach()
        values = torch.stack([total.float(), total.new_full((), float(stop_requested), dtype=torch.float32)])
        if self.runtime.world > 1:
            dist.all_reduce(values)
            values = torch.stack([values[0] / self.runtime.world, values[1]])
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return values

    def _shrink_passes(self):
        size = self.micro_batch or self.share
        if size % 2 or self.runtime.world > 1:
            raise RunError(f"out of memory with {size} examples per pass; pass a smaller --micro_batch "
                           f"(it must divide {self.share})") from None
        self.opt.zero_grad(set_to_none=True)
        if self.runtime.device.type == "cuda":
            torch.cuda.empty_cache()
        self.micro_batch = size // 2
        tqdm.write(f"out of memory with {size} examples per pass: the update runs again as micro-batches of "
                   f"{self.micro_batch} (start with --micro_batch {self.micro_batch} to skip this)")

    def compile_report(self, training_seconds):
        """What --compile cost, and whether this run gained from it."""
        if not self.compile_shapes:
            return []
        first_calls = sum(self.compile_shapes.values())
        lines = [f"--compile: {len(self.compile_shapes)} training graphs; their first updates (compiling) took "
                 f"{first_calls:.1f} s of {training_seconds:.1f} s of training"]
        if first_calls > 0.5 * training_seconds:
            lines.append("--compile: compiling took most of the training time: this run does not gain from --compile")
        return lines

    # -- evaluation --------------------------------------------------------------------------------
    def outputs(self, split):
        """What the task keeps of each example of the EncodedSplit `split` (task logits; a language
        model's per-sequence LM loss), in the examples' order: no dropout, batches of similar length
        (laid out in a background thread while the previous one runs), read back once at the end.
        The caller's train/eval mode is restored."""
        with evaluation_mode(self.model):
            order = np.argsort(split.longest(), kind="stable") if not self.cfg.plain else np.arange(len(split))
            batch_size = self.cfg.batch_size if self.cfg.plain else self.eval_batch
            lm, mode = self.task.uses_lm(False, self.cfg.lm_coef), self.batch_mode(training=False)

            def prepare(idx):
                X, M, _ = split.batch(idx, mode)
                return make_batch(X, M, None, self.clf_token, self.runtime.device, mode, lm=lm)

            outputs = []
            batches = computed_ahead(prepare, iter_data(order, n_batch=batch_size), initializer=self.runtime.use_device)
            with contextlib.closing(batches):
                for batch in batches:
                    with self.autocast():
                        outputs.append(self.task.outputs(*self.model(batch.X, plan=batch.plan)).float())
            result = torch.cat(outputs).cpu().numpy() if outputs else np.zeros((0,), np.float32)
            ordered = np.empty_like(result)
            ordered[order] = result
            return ordered

    def evaluate(self, split):
        """(mean task loss, {metric: value}) of the labelled EncodedSplit `split`."""
        outputs = self.outputs(split)
        cost = self.task.losses(torch.from_numpy(outputs), torch.from_numpy(split.labels)).mean().item()
        return cost, self.task.metrics(outputs, split.labels)


@dataclass
class PreparedUpdate:
    """An update's examples (host arrays: the out-of-memory fall-back prepares them again) and this
    process's device batches, made for `size` examples per pass."""

    examples: tuple
    size: int
    batches: list
