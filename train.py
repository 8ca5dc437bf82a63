"""Fine-tune GPT-1 on ROCStories as OpenAI's TF code does (SPEC §5), on a CPU, one GPU or several
(torchrun), and predict the test set.

    python train.py --dataset rocstories --desc rocstories --submit --analysis --data_dir DIR
    torchrun --nproc_per_node=4 train.py ... (same flags; the same updates)
    python train.py --demo        (everything built in: no download, a few minutes on a laptop CPU)

One update uses n_batch x n_gpu stories (8 x 4 = 32, the paper's batch), as n_gpu "towers" of
n_batch stories: gradients of the towers are averaged, whether they run one after the other on one
device or spread over torchrun's processes.
"""

import argparse
import contextlib
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.utils import shuffle
from tqdm import tqdm

import analysis
from datasets import DataError, rocstories, write_synthetic_rocstories
from loss import MultipleChoiceLossCompute
from model_pytorch import (
    ACT_FNS,
    DoubleHeadModel,
    WeightsError,
    load_openai_pretrained_model,
    make_config,
    pretrained_sizes,
)
from opt import SCHEDULES, OpenAIAdam
from text_utils import TextEncoder, VocabularyError, learn_bpe
from utils import ResultLogger, encode_dataset, iter_data, make_path

LOG_UPDATES = (1000, 2000, 4000, 8000, 16000, 32000)  # extra log points during the first epoch


class RunError(RuntimeError):
    """A failure reported as one clear message and a non-zero exit."""


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description="Fine-tune GPT-1 (faithful to OpenAI's TF code).")
    # The original's flags, names and defaults.
    p.add_argument("--desc", type=str, default=None, help="run name (log/DESC.jsonl, save/DESC/); default: dataset")
    p.add_argument("--dataset", type=str, default="rocstories", choices=["rocstories"])
    p.add_argument("--log_dir", type=str, default="log/")
    p.add_argument("--save_dir", type=str, default="save/")
    p.add_argument("--data_dir", type=str, default="data/")
    p.add_argument("--submission_dir", type=str, default="submission/")
    p.add_argument("--submit", action="store_true", help="keep the best validation parameters and predict the test set")
    p.add_argument("--analysis", action="store_true", help="print validation and test accuracy at the end")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--n_iter", type=int, default=3, help="epochs")
    p.add_argument("--n_batch", type=int, default=8, help="stories per tower")
    p.add_argument("--max_grad_norm", type=float, default=1)
    p.add_argument("--lr", type=float, default=6.25e-5)
    p.add_argument("--lr_warmup", type=float, default=0.002)
    p.add_argument("--n_ctx", type=int, default=512)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--embd_pdrop", type=float, default=0.1)
    p.add_argument("--attn_pdrop", type=float, default=0.1)
    p.add_argument("--resid_pdrop", type=float, default=0.1)
    p.add_argument("--clf_pdrop", type=float, default=0.1)
    p.add_argument("--l2", type=float, default=0.01)
    p.add_argument("--vector_l2", action="store_true")
    p.add_argument("--n_gpu", type=int, default=4, help="towers per update (the TF code's GPUs)")
    p.add_argument("--opt", type=str, default="adam", choices=["adam"])
    p.add_argument("--afn", type=str, default="gelu", choices=sorted(ACT_FNS))
    p.add_argument("--lr_schedule", type=str, default="warmup_linear", choices=sorted(SCHEDULES))
    p.add_argument("--encoder_path", type=str, default="model/encoder_bpe_40000.json")
    p.add_argument("--bpe_path", type=str, default="model/vocab_40000.bpe")
    p.add_argument("--n_transfer", type=int, default=12)
    p.add_argument("--lm_coef", type=float, default=0.5)
    p.add_argument("--b1", type=float, default=0.9)
    p.add_argument("--b2", type=float, default=0.999)
    p.add_argument("--e", type=float, default=1e-8)
    p.add_argument("--n_valid", type=int, default=374)
    # This port's additions.
    p.add_argument("--model_path", type=str, default="model/", help="OpenAI shards or Hugging Face weights")
    p.add_argument("--demo", action="store_true", help="run on a built-in synthetic task (no download)")
    p.add_argument("--demo_dir", type=str, default="demo_run/")
    p.add_argument("--resume", action="store_true", help="continue from save/DESC/checkpoint.pt")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast (fp16 adds a loss scaler)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--eval_batch", type=int, default=128, help="stories per evaluation batch")
    p.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--plain", action="store_true",
                   help="turn the speed-ups off (no trimming, explicit attention, LM logits everywhere)")
    p.add_argument("--stop_after_updates", type=int, default=None, help=argparse.SUPPRESS)  # tests: an interrupt
    return p


DEMO_DEFAULTS = dict(n_embd=64, n_head=4, n_layer=2, n_transfer=2, n_iter=8, lr=2e-3, lr_warmup=0.05, n_ctx=128,
                     desc="demo", submit=True, analysis=True)


def demo_paths(args):
    """Every input and output of the demo lives under --demo_dir."""
    d = args.demo_dir
    args.data_dir, args.model_path = os.path.join(d, "data"), os.path.join(d, "model")
    args.encoder_path = os.path.join(d, "model", "encoder_bpe.json")
    args.bpe_path = os.path.join(d, "model", "vocab.bpe")
    args.log_dir, args.save_dir = os.path.join(d, "log"), os.path.join(d, "save")
    args.submission_dir = os.path.join(d, "submission")
    return args


def parse_args(argv=None):
    """The flags; with --demo, the demo's sizes become the defaults (explicit flags still win)."""
    parser = build_parser()
    if parser.parse_known_args(argv)[0].demo:
        parser.set_defaults(**DEMO_DEFAULTS)
        return demo_paths(parser.parse_args(argv))
    return parser.parse_args(argv)


def prepare_demo(args):
    """Write the demo's data set, vocabulary and random weights (once)."""
    from random_weights import write_openai_weights

    if not os.path.exists(os.path.join(args.data_dir, "cloze_test_val__spring2016 - cloze_test_ALL_val.csv")):
        write_synthetic_rocstories(args.data_dir, seed=args.seed)
    if not os.path.exists(args.encoder_path):
        train, valid, test = rocstories(args.data_dir, n_valid=args.n_valid)
        learn_bpe(list(train[0]) + list(train[1]) + list(train[2]), args.encoder_path, args.bpe_path,
                  vocab_size=400, min_frequency=2)
    if not os.path.exists(os.path.join(args.model_path, "params_shapes.json")):
        n_vocab = len(TextEncoder(args.encoder_path, args.bpe_path).encoder)
        write_openai_weights(args.model_path, n_vocab=n_vocab, n_ctx=args.n_ctx, n_embd=args.n_embd,
                             n_layer=args.n_layer, seed=args.seed)


# ------------------------------------------------------------------------------------------------
# Data (SPEC §5)
# ------------------------------------------------------------------------------------------------

@dataclass
class Specials:
    n_vocab: int
    start: int
    delimiter: int
    clf_token: int
    n_special: int = 3


def add_specials(text_encoder):
    encoder = text_encoder.encoder
    n_vocab = len(encoder)
    for name in ("_start_", "_delimiter_", "_classify_"):
        encoder[name] = len(encoder)
    return Specials(n_vocab, encoder["_start_"], encoder["_delimiter_"], encoder["_classify_"])


def context_size(splits, max_len, n_ctx):
    """The original's n_ctx: the longest story + longer ending + 3 specials, capped at n_ctx."""
    longest = max(len(x1[:max_len]) + max(len(x2[:max_len]), len(x3[:max_len]))
                  for X1, X2, X3 in splits for x1, x2, x3 in zip(X1, X2, X3))
    return min(longest + 3, n_ctx)


def transform_roc(X1, X2, X3, specials, max_len, n_ctx):
    """X [n, 2, n_ctx, 2] and M [n, 2, n_ctx]: [start] story [delimiter] ending [classify], zero-padded."""
    n = len(X1)
    xmb = np.zeros((n, 2, n_ctx, 2), dtype=np.int64)
    mmb = np.zeros((n, 2, n_ctx), dtype=np.float32)
    for i, (x1, x2, x3) in enumerate(zip(X1, X2, X3)):
        for j, ending in enumerate((x2, x3)):
            seq = [specials.start] + x1[:max_len] + [specials.delimiter] + ending[:max_len] + [specials.clf_token]
            xmb[i, j, :len(seq), 0] = seq
            mmb[i, j, :len(seq)] = 1
    xmb[..., 1] = np.arange(specials.n_vocab + specials.n_special, specials.n_vocab + specials.n_special + n_ctx)
    return xmb, mmb


def load_rocstories(args, text_encoder):
    train, valid, test = rocstories(args.data_dir, n_valid=args.n_valid)
    (trX1, trX2, trX3, trY), (vaX1, vaX2, vaX3, vaY), (teX1, teX2, teX3) = encode_dataset(
        *[train, valid, test], encoder=text_encoder)
    specials = add_specials(text_encoder)
    max_len = args.n_ctx // 2 - 2
    n_ctx = context_size([(trX1, trX2, trX3), (vaX1, vaX2, vaX3), (teX1, teX2, teX3)], max_len, args.n_ctx)
    data = dict(
        train=(*transform_roc(trX1, trX2, trX3, specials, max_len, n_ctx), np.asarray(trY)),
        valid=(*transform_roc(vaX1, vaX2, vaX3, specials, max_len, n_ctx), np.asarray(vaY)),
        test=transform_roc(teX1, teX2, teX3, specials, max_len, n_ctx),
    )
    return data, specials, n_ctx


def trim(X, M):
    """Cut the padding shared by every sequence of a batch (exact: it lies after `_classify_`)."""
    length = int(M.sum(-1).max())
    return X[..., :length, :], M[..., :length]


# ------------------------------------------------------------------------------------------------
# Devices, processes, checkpoints
# ------------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self):
        return self.rank == 0


def setup_runtime(args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if world == 1:
        return Runtime(device)
    if args.n_gpu % world:
        raise RunError(f"n_gpu={args.n_gpu} towers cannot be spread over {world} processes: "
                       f"n_gpu must be a multiple of the number of processes")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, world)


def atomic_save(obj, path, saver=torch.save):
    """Write through a temporary file and rename: a crash never leaves a half-written file."""
    make_path(path)
    tmp = f"{path}.tmp{os.getpid()}"
    saver(obj, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_best_params(model, path):
    from safetensors.torch import save_model

    atomic_save(model, path, saver=save_model)


def load_best_params(model, path):
    from safetensors.torch import load_model

    load_model(model, path)


def numpy_rng_state(rng):
    """A RandomState's state as tensors and numbers (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = rng.get_state()
    return dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos), has_gauss=int(has_gauss),
                cached=float(cached))


def rng_state(shuffle_rng):
    state = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=numpy_rng_state(shuffle_rng))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def numpy_state(saved):
    return ("MT19937", saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"], saved["cached"])


def restore_rng(state):
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


RESUME_KEYS = ("dataset", "seed", "n_iter", "n_batch", "n_gpu", "lr", "lr_schedule", "lr_warmup", "n_embd", "n_head",
               "n_layer", "l2", "lm_coef", "max_grad_norm", "n_valid")


def load_checkpoint(path, args):
    if not os.path.exists(path):
        raise RunError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RunError(f"--resume: {path} cannot be read as a checkpoint ({err})") from None
    changed = [k for k in RESUME_KEYS if ckpt["args"].get(k) != getattr(args, k)]
    if changed:
        raise RunError("--resume: the checkpoint was made with other settings: " + ", ".join(
            f"{k}={ckpt['args'].get(k)!r} (now {getattr(args, k)!r})" for k in changed))
    return ckpt


# ------------------------------------------------------------------------------------------------
# Training and evaluation
# ------------------------------------------------------------------------------------------------

class NonFiniteLoss(RunError):
    pass


@dataclass
class Progress:
    n_epochs: int = 0  # finished epochs
    n_updates: int = 0
    update_in_epoch: int = 0  # updates done in the current epoch
    best_score: float = 0.0
    epoch_rng: dict = None  # shuffle state at the start of the current epoch


def to_device(array, runtime, dtype=None):
    t = torch.from_numpy(np.ascontiguousarray(array))
    if dtype is not None:
        t = t.to(dtype)
    if runtime.device.type == "cuda":
        return t.pin_memory().to(runtime.device, non_blocking=True)
    return t


def autocast(args, runtime):
    if not args.amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    return torch.autocast(device_type=runtime.device.type, dtype=dtype)


def train_update(model, towers, compute, opt, scaler, args, runtime):
    """One update from this process's towers; returns the loss averaged over all towers."""
    total = torch.zeros((), device=runtime.device)
    for i, (xmb, mmb, ymb) in enumerate(towers):
        if not args.plain:
            xmb, mmb = trim(xmb, mmb)
        X, M, Y = to_device(xmb, runtime), to_device(mmb, runtime), to_device(ymb, runtime, torch.long)
        last = i == len(towers) - 1
        sync = contextlib.nullcontext() if last or runtime.world == 1 else model.no_sync()
        with sync:
            with autocast(args, runtime):
                lm_logits, clf_logits = model(X, mask=None if args.plain else M, compute_lm=args.lm_coef > 0)
            clf, lm = compute.losses(X, Y, M, clf_logits.float(), None if lm_logits is None else lm_logits.float())
            loss = compute.objective(clf, lm) / len(towers)
            (scaler.scale(loss) if scaler else loss).backward()
        total += loss.detach()
    if runtime.world > 1:
        dist.all_reduce(total)
        total /= runtime.world
    if not torch.isfinite(total):
        raise NonFiniteLoss(f"the training loss became {total.item()} at update {opt.param_groups[0]['step'] + 1}; "
                            "the run is stopped (lower --lr, or drop --amp fp16). The best checkpoint is untouched.")
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return total.item()


@torch.no_grad()
def predict_logits(model, X, M, args, runtime):
    """Classifier logits of every example: no dropout, no LM logits, batches of similar length."""
    model.eval()
    order = np.argsort(M.sum(-1).max(-1), kind="stable") if not args.plain else np.arange(len(X))
    logits = np.zeros((len(X), X.shape[1]), dtype=np.float32)
    batch = args.n_batch * args.n_gpu if args.plain else args.eval_batch
    for idx in iter_data(order, n_batch=batch):
        xmb, mmb = (X[idx], M[idx]) if args.plain else trim(X[idx], M[idx])
        with autocast(args, runtime):
            mask = None if args.plain else to_device(mmb, runtime)
            _, clf_logits = model(to_device(xmb, runtime), mask=mask, compute_lm=args.plain)
        logits[idx] = clf_logits.float().cpu().numpy()
    model.train()
    return logits


def evaluate(model, X, M, Y, args, runtime):
    logits = predict_logits(model, X, M, args, runtime)
    cost = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(Y).long()).item()
    return cost, float(np.mean(np.argmax(logits, 1) == Y) * 100)


def log_point(model, data, progress, logger, args, runtime, best_path):
    """The original's log(): costs and accuracies on 374 training and the validation stories."""
    trX, trM, trY = (a[:args.n_valid] for a in data["train"])
    tr_cost, tr_acc = evaluate(model, trX, trM, trY, args, runtime)
    va_cost, va_acc = evaluate(model, *data["valid"], args, runtime)
    logger.log(n_epochs=progress.n_epochs, n_updates=progress.n_updates, tr_cost=tr_cost, va_cost=va_cost,
               tr_acc=tr_acc, va_acc=va_acc)
    tqdm.write(f"{progress.n_epochs} {progress.n_updates} {tr_cost:.3f} {va_cost:.3f} {tr_acc:.2f} {va_acc:.2f}")
    if args.submit and va_acc > progress.best_score:
        progress.best_score = va_acc
        save_best_params(model, best_path)


def write_submission(predictions, path):
    """`index<TAB>prediction` lines, written atomically."""
    def write(rows, target):
        with open(target, "w") as f:
            f.write("index\tprediction\n" + "".join(f"{i}\t{p}\n" for i, p in enumerate(rows)))

    atomic_save(predictions, path, saver=write)


class StopRequest:
    """Ctrl-C / SIGTERM: finish the current update, save a resumable checkpoint, then exit."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"signal {signum}: saving a checkpoint after this update (again to stop at once)")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def save_checkpoint(path, model, opt, progress, logger_lines, args, shuffle_rng):
    state = dict(model=model.state_dict(), optimizer=opt.state_dict(), n_epochs=progress.n_epochs,
                 n_updates=progress.n_updates, update_in_epoch=progress.update_in_epoch,
                 best_score=progress.best_score, epoch_rng=progress.epoch_rng, rng=rng_state(shuffle_rng),
                 log_lines=logger_lines, args=vars(args))
    atomic_save(state, path)


def count_lines(path):
    with open(path) as f:
        return sum(1 for _ in f)


def run(args, runtime):
    t_start = time.time()
    desc = args.desc or args.dataset
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed + runtime.rank)
    shuffle_rng = np.random.RandomState(args.seed)

    text_encoder = TextEncoder(args.encoder_path, args.bpe_path)
    n_vocab_weights, n_positions = pretrained_sizes(args.model_path)
    if len(text_encoder.encoder) != n_vocab_weights:
        raise RunError(f"the vocabulary {args.encoder_path} has {len(text_encoder.encoder)} entries but the weights "
                       f"in {args.model_path} have {n_vocab_weights} token rows: they do not belong together")
    if args.n_ctx // 2 - 2 < 1:
        raise RunError(f"--n_ctx {args.n_ctx} is too small")
    data, specials, n_ctx = load_rocstories(args, text_encoder)
    if n_ctx > n_positions:
        raise RunError(f"the data needs n_ctx={n_ctx} positions but the weights have only {n_positions}; "
                       f"pass --n_ctx {n_positions} to cut stories and endings")

    cfg = make_config(args)
    cfg.fused_attention = not args.plain
    vocab = specials.n_vocab + specials.n_special + n_ctx
    model = DoubleHeadModel(cfg, specials.clf_token, "multiple_choice", vocab=vocab, n_ctx=n_ctx)
    load_openai_pretrained_model(model.transformer, n_ctx=n_ctx, n_special=specials.n_special,
                                 n_transfer=args.n_transfer, n_embd=args.n_embd, path=args.model_path)
    model.to(runtime.device)

    n_train = len(data["train"][2])
    n_batch_train = args.n_batch * args.n_gpu
    if n_train < n_batch_train:
        raise RunError(f"{n_train} training stories are fewer than one update's batch of {n_batch_train}")
    n_updates_total = (n_train // n_batch_train) * args.n_iter
    opt = OpenAIAdam(model.parameters(), lr=args.lr, schedule=args.lr_schedule, warmup=args.lr_warmup,
                     t_total=n_updates_total, b1=args.b1, b2=args.b2, e=args.e, l2=args.l2,
                     vector_l2=args.vector_l2, max_grad_norm=args.max_grad_norm)
    compute = MultipleChoiceLossCompute(lm_coef=args.lm_coef)
    scaler = torch.amp.GradScaler(runtime.device.type) if args.amp == "fp16" else None

    save_dir = os.path.join(args.save_dir, desc)
    best_path, ckpt_path = os.path.join(save_dir, "best_params.safetensors"), os.path.join(save_dir, "checkpoint.pt")
    log_path = os.path.join(args.log_dir, f"{desc}.jsonl")
    progress = Progress()
    ckpt = load_checkpoint(ckpt_path, args) if args.resume else None
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        progress = Progress(ckpt["n_epochs"], ckpt["n_updates"], ckpt["update_in_epoch"], ckpt["best_score"],
                            ckpt["epoch_rng"])
        restore_rng(ckpt["rng"])
        shuffle_rng.set_state(numpy_state(ckpt["rng"]["numpy"]))
        if runtime.world > 1:  # the checkpoint holds rank 0's dropout generator: one stream per rank again
            torch.manual_seed(args.seed + runtime.rank + 1_000_003 * progress.n_updates)
    train_model = model
    if runtime.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model, dynamic=True)

    logger = None
    if runtime.main:
        if ckpt:
            logger = ResultLogger.reopen(log_path, keep_lines=ckpt["log_lines"])
        else:
            logger = ResultLogger(log_path, **vars(args))
        if args.submit and not ckpt:
            save_best_params(model, best_path)
        tqdm.write(f"{n_train} train, {len(data['valid'][2])} valid, {len(data['test'][0])} test stories; "
                   f"n_ctx {n_ctx}; {n_updates_total} updates of {n_batch_train} stories on {runtime.device}"
                   + (f" x {runtime.world} processes" if runtime.world > 1 else ""))

    towers_here = args.n_gpu // runtime.world
    stop_after = args.stop_after_updates
    try:
        with StopRequest() as stop:
            while progress.n_epochs < args.n_iter:
                if progress.update_in_epoch == 0:
                    progress.epoch_rng = numpy_rng_state(shuffle_rng)
                else:  # resuming inside an epoch: shuffle again from its start
                    shuffle_rng.set_state(numpy_state(progress.epoch_rng))
                trX, trM, trY = shuffle(*data["train"], random_state=shuffle_rng)
                batches = list(iter_data(trX, trM, trY, n_batch=n_batch_train, truncate=True))
                bar = tqdm(total=len(batches), initial=progress.update_in_epoch, ncols=100, leave=False, mininterval=1,
                           disable=not runtime.main, desc=f"epoch {progress.n_epochs + 1}/{args.n_iter}")
                for xmb, mmb, ymb in batches[progress.update_in_epoch:]:
                    mine = slice(runtime.rank * towers_here * args.n_batch,
                                 (runtime.rank + 1) * towers_here * args.n_batch)
                    xmb, mmb, ymb = xmb[mine], mmb[mine], ymb[mine]
                    towers = [(xmb[k:k + args.n_batch], mmb[k:k + args.n_batch], ymb[k:k + args.n_batch])
                              for k in range(0, len(xmb), args.n_batch)]
                    cost = train_update(train_model, towers, compute, opt, scaler, args, runtime)
                    progress.n_updates += 1
                    progress.update_in_epoch += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{cost:.3f}", lr=f"{opt.current_lr():.2e}")
                    if progress.n_updates in LOG_UPDATES and progress.n_epochs == 0 and runtime.main:
                        log_point(model, data, progress, logger, args, runtime, best_path)
                    if stop_after is not None and progress.n_updates >= stop_after:
                        stop.requested = True
                    if stop.requested:
                        break
                bar.close()
                if stop.requested and progress.update_in_epoch < len(batches):
                    break
                progress.n_epochs += 1
                progress.update_in_epoch = 0
                if runtime.main:
                    log_point(model, data, progress, logger, args, runtime, best_path)
                    save_checkpoint(ckpt_path, model, opt, progress, count_lines(log_path), args, shuffle_rng)
                if stop.requested:
                    break
            if stop.requested:
                if runtime.main and progress.update_in_epoch:  # (at an epoch's end it is saved already)
                    save_checkpoint(ckpt_path, model, opt, progress, count_lines(log_path), args, shuffle_rng)
                if runtime.main:
                    tqdm.write(f"stopped after {progress.n_updates} updates; continue with --resume "
                               f"(checkpoint: {ckpt_path})")
                return 130
    finally:
        if logger:
            logger.close()
        if runtime.world > 1:
            dist.barrier()

    if runtime.main and args.submit:
        load_best_params(model, best_path)
        logits = predict_logits(model, *data["test"], args, runtime)
        pred_path = os.path.join(args.submission_dir, "ROCStories.tsv")
        write_submission(np.argmax(logits, 1), pred_path)
        if args.analysis:
            analysis.rocstories(args.data_dir, pred_path, log_path)
    if runtime.main:
        tqdm.write(f"done in {time.time() - t_start:.1f} s")
    return 0


def main(argv=None):
    args = parse_args(argv)
    runtime = None
    try:
        if args.demo:
            prepare_demo(args)
        runtime = setup_runtime(args)
        return run(args, runtime)
    except (RunError, DataError, VocabularyError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if runtime is not None and runtime.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
