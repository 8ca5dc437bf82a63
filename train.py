"""Fine-tune GPT-1 as OpenAI's TF code does (docs/reference.md §5), on a CPU, one GPU or several
(torchrun), and predict the test set.

    python train.py --dataset rocstories --desc rocstories --submit --analysis --data_dir DIR
    torchrun --nproc_per_node=4 train.py ... (same flags; the same updates)
    python train.py --demo        (everything built in: no download; about 70 s on 2 idle CPU cores)

This file orchestrates: the flags are config.py's, the task's declaration tasks.py's, the data
task_data.py's, the update and evaluation engine.py's, the files checkpoints.py's.
"""

import os
import random
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from sklearn.utils import shuffle
from tqdm import tqdm

import config
from batches import BatchError, check_split
from checkpoints import (
    BackgroundWriter,
    CheckpointError,
    check_best_params,
    host_copy,
    load_checkpoint,
    load_model_state,
    model_state,
    numpy_rng_state,
    numpy_state,
    rank_generators,
    read_checkpoint,
    restore_rank_generators,
    restore_rng,
    rng_state,
    save_best_params,
    save_checkpoint,
)
from datasets import DataError, write_submission
from engine import (
    LateReader,
    PeerLost,
    PhaseTimes,
    RunError,
    Stopped,
    StopRequest,
    Trainer,
    any_rank,
    peers_watched,
    setup_runtime,
)
from metrics import METRIC_KEYS
from model_pytorch import ModelSpec, build_model
from run_folder import RunFolderError, claimed
from synthetic import write_demo_files
from task_data import load_task_data
from tasks import get_task
from text_utils import TextEncoder, VocabularyError
from utils import ResultLogger, WriteError
from weights import (
    ExportError,
    WeightsError,
    exported_special_tokens,
    load_openai_pretrained_model,
    pretrained_sizes,
    save_hf_checkpoint,
)

LOG_UPDATES = (1000, 2000, 4000, 8000, 16000, 32000)  # extra log points during the first epoch
ERRORS = (RunError, config.ConfigError, DataError, BatchError, VocabularyError, WeightsError, CheckpointError,
          ExportError, RunFolderError, WriteError)


@dataclass
class Progress:
    n_epochs: int = 0  # finished epochs
    n_updates: int = 0
    update_in_epoch: int = 0  # updates done in the current epoch
    best_score: float = float("-inf")
    epoch_rng: dict = None  # data generator's state at the start of the current epoch


class Run:
    """One fine-tuning run: set up from its frozen settings, then trained epoch by epoch, evaluated,
    checkpointed, and finished by the task's predictions and report. Rank 0 alone writes files."""

    def __init__(self, cfg, runtime, times, stop=None):
        """Seeds, data, model with its pre-trained weights, optimizer and engine: ready for the first update.

        One numpy generator, seeded with --seed, serves as the TF script's global one: its first draw
        is the special-token rows, then it shuffles every epoch (docs/reference.md §5). `stop`: the
        process's StopRequest (signals)."""
        self.cfg, self.runtime, self.times, self.stop = cfg, runtime, times, stop or StopRequest()
        self.progress, self.writer, self.logger, self.columns_named = Progress(), BackgroundWriter(), None, False
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed + runtime.rank)
        self.data_rng = np.random.RandomState(cfg.seed)
        self.task = get_task(cfg.dataset).configured(n_valid=cfg.n_valid)
        with times("encoding"):
            self.text_encoder = TextEncoder(cfg.encoder_path, cfg.bpe_path)
            n_positions = self._check_weights_fit_the_vocabulary()
            self.data = load_task_data(self.task, cfg.data_dir, self.text_encoder, cfg.n_ctx, cfg.encoding_cache,
                                       note=tqdm.write)
        data, specials = self.data, self.data.specials
        if data.n_ctx > n_positions:
            raise RunError(f"the data needs n_ctx={data.n_ctx} positions but the weights have only {n_positions}; "
                           f"pass --n_ctx {n_positions} ({self.task.cut_rule})")
        self.spec = ModelSpec(cfg.model, specials.n_vocab, specials.n_special, data.n_ctx, self.task.head,
                              specials.clf_token, self.task.special_tokens, self.text_encoder.fingerprint())
        for name, split in data.splits.items():  # once, on the host: no check inside an update
            check_split(name, split, self.spec.vocab, specials.clf_token)
        with times("loading"):
            self.model = build_model(self.spec)
            load_openai_pretrained_model(self.model.transformer, n_ctx=data.n_ctx, n_special=specials.n_special,
                                         n_transfer=cfg.n_transfer, n_embd=cfg.model.n_embd, path=cfg.model_path,
                                         special_rows=self.data_rng)
            self.model.to(runtime.device)
        n_train = len(data.splits["train"])
        if n_train < cfg.batch_size:
            raise RunError(f"{n_train} training examples are fewer than one update's batch of {cfg.batch_size}")
        self.n_updates_total = (n_train // cfg.batch_size) * cfg.n_iter
        optimizer = cfg.optim.build(self.model.parameters(), self.n_updates_total)
        self.trainer = Trainer(self.model, self.task, optimizer, cfg, runtime, specials.clf_token)

    def _check_weights_fit_the_vocabulary(self):
        """The weights' position rows, once their token rows are known to fit the vocabulary."""
        cfg, encoder = self.cfg, self.text_encoder
        n_rows, n_positions, *_ = pretrained_sizes(cfg.model_path)
        held = exported_special_tokens(cfg.model_path, n_rows)  # a fine-tune's export: its special rows
        if encoder.n_vocab != n_rows - len(held):
            raise RunError(f"the vocabulary {cfg.encoder_path} has {encoder.n_vocab} entries but the weights in "
                           f"{cfg.model_path} have {n_rows - len(held)} token rows"
                           + (f" (and {len(held)} special rows)" if held else "") + ": they do not belong together")
        if held and self.task.special_tokens and tuple(held) != self.task.special_tokens:
            raise RunError(f"the weights in {cfg.model_path} hold the special rows {', '.join(held)}; a fine-tune "
                           f"needs {', '.join(self.task.special_tokens)} in this order")
        return n_positions

    # -- resume, log, checkpoints -----------------------------------------------------------------
    def resume(self):
        """The model, optimizer, progress and every generator as the checkpoint left them."""
        cfg, runtime = self.cfg, self.runtime
        ckpt = load_checkpoint(cfg.checkpoint_path, cfg.flags(), config.fixed_settings(), config.RunConfig().flags(),
                               self.inputs())
        if not os.path.exists(cfg.log_path):  # checked on every rank: the checkpoint continues the log it counted
            raise RunError(f"--resume: the run's log {cfg.log_path} is missing; the checkpoint continues that log "
                           "(give the --log_dir and --desc of the interrupted run)")
        if cfg.submit and ckpt["best_score"] > float("-inf"):  # needed at the end: checked now, never replaced
            check_best_params(cfg.best_path, self.spec)
        load_model_state(self.model, ckpt["model"], cfg.checkpoint_path)
        self.trainer.opt.load_state_dict(ckpt["optimizer"])
        self.progress = Progress(ckpt["n_epochs"], ckpt["n_updates"], ckpt["update_in_epoch"], ckpt["best_score"],
                                 ckpt["epoch_rng"])
        restore_rng(ckpt["rng"])
        self.data_rng.set_state(numpy_state(ckpt["rng"]["numpy"]))
        if runtime.device.type == "cpu" and cfg.threads is None and ckpt.get("threads"):
            torch.set_num_threads(ckpt["threads"])  # the same threads, the same float sums: the same updates
        ranks = ckpt["rng"].get("ranks")
        if runtime.world > 1 and ranks and len(ranks) == runtime.world:
            restore_rank_generators(ranks[runtime.rank], runtime.device)
        elif runtime.world > 1:  # another number of processes: one new stream per rank
            torch.manual_seed(cfg.seed + runtime.rank + 1_000_003 * self.progress.n_updates)
        if cfg.submit and self.progress.best_score == float("-inf") and not os.path.exists(cfg.best_path):
            if runtime.main:
                tqdm.write("--submit added on resume: the best parameters are kept from the next evaluation on")
        self.stop.resumable = True
        return ckpt

    def inputs(self):
        """What the run was made from, as --resume compares it: {name: (fingerprint, how to name it)}."""
        cfg = self.cfg
        return dict(data=(self.data.fingerprint, f"the data in {cfg.data_dir}"),
                    vocabulary=(self.text_encoder.fingerprint(), f"the vocabulary {cfg.encoder_path} / {cfg.bpe_path}"))

    def start_log(self, ckpt):
        """Rank 0's log (continued on resume) and the run's summary line. (The best parameters are
        written at the first evaluation: a run stopped before it leaves none that were never chosen.)"""
        cfg, data = self.cfg, self.data
        if ckpt:
            self.logger = ResultLogger.reopen(cfg.log_path, ckpt["log_lines"], ckpt.get("log"), RunError)
        else:
            self.logger = ResultLogger(cfg.log_path, **cfg.flags())
        sizes = ", ".join(f"{len(split)} {name}" for name, split in data.splits.items())
        tqdm.write(f"{self.task.title}: {sizes} examples; n_ctx {data.n_ctx}; {self.n_updates_total} updates "
                   f"of {cfg.batch_size} on {self.runtime.device}"
                   + (f" x {self.runtime.world} processes" if self.runtime.world > 1 else ""))

    def log_point(self):
        """The original's log(): costs and the task's metrics on the first n_valid training examples and
        the validation set; rank 0 logs them and keeps the best parameters, chosen by the task."""
        cfg, progress, trainer = self.cfg, self.progress, self.trainer
        with self.times("evaluation"):
            tr_cost, tr_metrics = trainer.evaluate(self.data.splits["train"].head(cfg.n_valid))
            va_cost, va_metrics = trainer.evaluate(self.data.splits["valid"])
        point = dict(n_epochs=progress.n_epochs, n_updates=progress.n_updates, tr_cost=tr_cost, va_cost=va_cost)
        for prefix, metrics in (("tr", tr_metrics), ("va", va_metrics)):
            point.update({f"{prefix}_{METRIC_KEYS[name]}": value for name, value in metrics.items()})
        self.logger.log(**point)
        if not self.columns_named:  # the printed columns, once: they depend on the task's metrics
            tqdm.write(" ".join(point))
            self.columns_named = True
        tqdm.write(" ".join(f"{v:.3f}" if k.endswith("cost") else f"{v:.2f}" if isinstance(v, float) else str(v)
                            for k, v in point.items()))
        score = self.task.selection_score(va_metrics)
        if cfg.submit and score > progress.best_score:
            progress.best_score = score
            with self.times("checkpoint writing"):
                self.writer.submit(save_best_params, host_copy(model_state(self.model)), cfg.best_path, self.spec,
                                   cfg.flags())

    def save_checkpoint(self):
        """A resumable checkpoint from host copies, written in the background (atomic). Every rank calls
        it (their generators are gathered); rank 0 writes."""
        ranks = rank_generators(self.runtime) if self.runtime.world > 1 else None
        self.stop.resumable = True
        if not self.runtime.main:
            return
        progress = self.progress
        with self.times("checkpoint writing"):
            rng = dict(rng_state(self.data_rng), **({"ranks": ranks} if ranks else {}))
            with open(self.cfg.log_path, encoding="utf-8") as f:
                log = f.read()
            state = dict(model=host_copy(model_state(self.model)), optimizer=host_copy(self.trainer.opt.state_dict()),
                         n_epochs=progress.n_epochs, n_updates=progress.n_updates,
                         update_in_epoch=progress.update_in_epoch, best_score=progress.best_score,
                         epoch_rng=progress.epoch_rng, rng=rng, log_lines=log.count("\n"), log=log,
                         inputs={name: fingerprint for name, (fingerprint, _) in self.inputs().items()},
                         args=self.cfg.flags(), threads=torch.get_num_threads())
            self.writer.submit(save_checkpoint, state, self.cfg.checkpoint_path, self.spec)

    # -- training ---------------------------------------------------------------------------------
    def train(self):
        """Every epoch, with a log point and a checkpoint after each; returns True if stopped early
        (a stop asked during an evaluation too, the last epoch's included: the run then predicts on
        --resume)."""
        progress, reader = self.progress, LateReader(self.runtime.device)
        n_batches = len(self.data.splits["train"]) // self.cfg.batch_size
        with self.stop.deferred() as stop:
            while progress.n_epochs < self.cfg.n_iter:
                stopped = self.train_epoch(stop, reader)
                if stopped and progress.update_in_epoch < n_batches:
                    self.save_checkpoint()
                    return True
                progress.n_epochs += 1
                progress.update_in_epoch = 0
                if self.runtime.main:
                    self.log_point()
                self.save_checkpoint()
                if any_rank(stopped or stop.requested, self.runtime):
                    return True
        return False

    def train_epoch(self, stop, reader):
        """The remaining updates of the current epoch, in the original's order; True when a stop was
        requested (a signal, or another process's)."""
        cfg, progress, trainer = self.cfg, self.progress, self.trainer
        if progress.update_in_epoch == 0:
            progress.epoch_rng = numpy_rng_state(self.data_rng)
        else:  # resuming inside an epoch: shuffle again from its start
            self.data_rng.set_state(numpy_state(progress.epoch_rng))
        split, size, first = self.data.splits["train"], cfg.batch_size, progress.update_in_epoch
        order = epoch_order(self.data_rng, len(split))
        n_batches = len(split) // size
        updates = trainer.prefetched(split, (order[b * size:(b + 1) * size] for b in range(first, n_batches)))
        bar = tqdm(total=n_batches, initial=progress.update_in_epoch, ncols=100, leave=False, mininterval=1,
                   disable=not self.runtime.main, desc=f"epoch {progress.n_epochs + 1}/{cfg.n_iter}")
        start = time.perf_counter()
        try:
            for prepared in updates:
                self.writer.check()  # a failed background write is reported before the next update
                values = trainer.step(prepared, stop_requested=stop.requested)
                progress.n_updates += 1
                progress.update_in_epoch += 1
                previous = reader.push(values, progress.n_updates)
                bar.update(1)
                if previous:
                    bar.set_postfix(loss=f"{previous[0]:.3f}", lr=f"{trainer.opt.current_lr():.2e}", refresh=False)
                if progress.n_updates in LOG_UPDATES and progress.n_epochs == 0:
                    reader.flush()
                    self.times.add("training", time.perf_counter() - start)
                    if self.runtime.main:
                        self.log_point()
                    start = time.perf_counter()
                if cfg.stop_after_updates is not None and progress.n_updates >= cfg.stop_after_updates:
                    stop.requested = True
                    reader.flush()
                    return True
                if reader.stop:
                    return True
            reader.flush()
            return reader.stop
        finally:
            updates.close()
            self.runtime.synchronize()
            self.times.add("training", time.perf_counter() - start)
            bar.close()

    # -- the end ----------------------------------------------------------------------------------
    def finish(self):
        """The kept parameters (the best on validation with --submit) predict every split the task
        submits or reports: test sets into the submission files, and with --analysis each labelled
        split's figures; a language model is also saved in the Hugging Face format."""
        cfg, task = self.cfg, self.task
        with self.times("prediction"):
            if cfg.submit:
                load_model_state(self.model, read_checkpoint(cfg.best_path)[0], cfg.best_path)
            report = []
            for name, split in self.data.read.items():
                if name == "train" or not (split.submission and cfg.submit or cfg.analysis):
                    continue
                outputs = self.trainer.outputs(self.data.splits[name])
                if split.submission and cfg.submit:
                    index = split.index if split.index is not None else range(len(outputs))
                    write_submission(zip(index, task.predictions(outputs)),
                                     os.path.join(cfg.submission_dir, split.submission))
                report += task.report_lines(split, outputs)
        if task.saves_language_model:
            out = os.path.join(cfg.run_dir, "model")
            with self.times("checkpoint writing"):
                save_hf_checkpoint(self.model, self.text_encoder, out)
            tqdm.write(f"language model saved in {out} (fine-tune it with --model_path {out})")
        if cfg.analysis:
            print("\n".join(report))


def epoch_order(rng, n):
    """The order of one epoch: scikit-learn's shuffle driven by the run's numpy generator, as the
    TF script shuffles its training arrays (the same draws, so the same order)."""
    return shuffle(np.arange(n), random_state=rng)


def run(cfg, runtime, t_start, stop=None):
    """Set-up, resume, the epochs (each: updates, evaluation, checkpoint), then the task's outputs."""
    times = PhaseTimes(runtime)
    times.add("start-up", time.time() - t_start)
    fine_tune = Run(cfg, runtime, times, stop)
    ckpt = fine_tune.resume() if cfg.resume else None
    try:
        if runtime.main:
            fine_tune.start_log(ckpt)
        stopped = fine_tune.train()
        fine_tune.writer.wait()
    finally:
        if fine_tune.logger:
            fine_tune.logger.close()
    if runtime.world > 1:
        dist.barrier()
    if stopped:
        if runtime.main:
            tqdm.write(f"stopped after {fine_tune.progress.n_updates} updates; continue with --resume "
                       f"(checkpoint: {cfg.checkpoint_path})")
            tqdm.write(times.report(fine_tune.progress.n_updates))
        return fine_tune.stop.exit_code
    if runtime.main:
        fine_tune.finish()
        for line in fine_tune.trainer.compile_report(times.seconds.get("training", 0.0)):
            tqdm.write(line)
        tqdm.write(times.report(fine_tune.progress.n_updates))
        tqdm.write(f"done in {time.time() - t_start:.1f} s")
    return 0


def main(argv=None):
    """Exit status: 0 done, 1 an error (one line), 130 / 143 stopped by Ctrl-C / SIGTERM (one line)."""
    t_start = time.time()
    runtime, cfg = None, None
    with StopRequest() as stop:  # from here to the end, a signal is one line and exit 130 / 143
        try:
            cfg = config.parse(argv)
            if cfg.demo:
                write_demo_files(cfg)
            runtime = setup_runtime(cfg.device, cfg.n_gpu, cfg.dist_timeout, cfg.threads)
            with claimed(cfg, runtime.main), peers_watched(runtime, stop):  # folders writable, locked, cleared
                return run(cfg, runtime, t_start, stop)
        except ERRORS as err:
            print(f"error: {err}" + (f"; {resume_hint(cfg, stop)}" if isinstance(err, PeerLost) else ""),
                  file=sys.stderr)
            return 1
        except Stopped as stopped:
            print(f"stopped by {signal.Signals(stopped.signum).name}; {resume_hint(cfg, stop)}", file=sys.stderr)
            return stop.exit_code
        finally:
            if runtime is not None and runtime.world > 1 and dist.is_initialized():
                dist.destroy_process_group()


def resume_hint(cfg, stop):
    resumable = stop.resumable or (cfg is not None and cfg.resume and os.path.exists(cfg.checkpoint_path))
    return f"continue with --resume (checkpoint: {cfg.checkpoint_path})" if resumable else "nothing to resume"


if __name__ == "__main__":
    sys.exit(main())
