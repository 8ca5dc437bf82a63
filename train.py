"""Fine-tune GPT-1 as OpenAI's TF code does (docs/reference.md §5), on a CPU, one GPU or several
(torchrun), and predict the test set.

    python train.py --dataset rocstories --desc rocstories --submit --analysis --data_dir DIR
    torchrun --nproc_per_node=4 train.py ... (same flags; the same updates)
    python train.py --demo        (everything built in: no download, a few minutes on a laptop CPU)

One update uses n_batch x n_gpu examples (8 x 4 = 32, the paper's batch). The TF code ran them as
n_gpu towers of n_batch and averaged the towers' gradients; here a process runs its share of the
update as ONE forward and backward pass (the same objective: the mean over the 32 examples), or as
equal micro-batches with --micro_batch. Nothing inside an update waits for the device: the batch
layout is worked out on the host and the loss is read one update late (docs/speed.md).
"""

import argparse
import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import platform
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from sklearn.utils import shuffle
from tqdm import tqdm

import analysis
from datasets import DataError, rocstories, write_synthetic_rocstories
from loss import MultipleChoiceLossCompute, lm_losses, per_element_cross_entropy, sequence_means
from model_pytorch import (
    ACT_FNS,
    BatchPlan,
    DoubleHeadModel,
    LMModel,
    WeightsError,
    exported_special_tokens,
    first_classify_positions,
    load_openai_pretrained_model,
    make_config,
    pretrained_sizes,
    resolve_device,
    to_device,
)
from opt import SCHEDULES, OpenAIAdam
from tasks import (
    SPECIAL_TOKENS,
    TASKS,
    LanguageModelTask,
    RocStoriesTask,
    Specials,
    Task,
    add_specials,
    get_task,
    report_lines,
    to_arrays,
)
from text_utils import TextEncoder, VocabularyError, learn_bpe
from utils import ResultLogger, encode_dataset, iter_data, make_path

LOG_UPDATES = (1000, 2000, 4000, 8000, 16000, 32000)  # extra log points during the first epoch
COMPILE_BUCKET = 8  # with --compile, sequence lengths are padded to a multiple of this


class RunError(RuntimeError):
    """A failure reported as one clear message and a non-zero exit."""


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------

def build_parser():
    """The original's flags, names and defaults, then this port's. Flags in the "run" group fix the
    run's shapes and numbers: --resume refuses to change them (one source of truth)."""
    p = argparse.ArgumentParser(description="Fine-tune GPT-1 (faithful to OpenAI's TF code).")
    run = p.add_argument_group("run", "settings that fix the run's shapes and numbers (kept on --resume)")
    io = p.add_argument_group("io", "paths, reporting and devices (free to change on --resume)")
    io.add_argument("--desc", type=str, default=None, help="run name (log/DESC.jsonl, save/DESC/); default: dataset")
    run.add_argument("--dataset", type=str, default="rocstories", choices=[*TASKS, "lm"],
                     help="the task (docs/tasks.md); --data_dir is its folder as distributed. lm: language "
                          "modelling on the plain text files of --data_dir")
    io.add_argument("--log_dir", type=str, default="log/")
    io.add_argument("--save_dir", type=str, default="save/")
    io.add_argument("--data_dir", type=str, default="data/")
    io.add_argument("--submission_dir", type=str, default="submission/")
    io.add_argument("--submit", action="store_true",
                    help="keep the best validation parameters and predict the test set")
    io.add_argument("--analysis", action="store_true", help="print validation and test figures at the end")
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--n_iter", type=int, default=3, help="epochs")
    run.add_argument("--n_batch", type=int, default=8, help="examples per tower")
    run.add_argument("--max_grad_norm", type=float, default=1)
    run.add_argument("--lr", type=float, default=6.25e-5)
    run.add_argument("--lr_warmup", type=float, default=0.002)
    run.add_argument("--n_ctx", type=int, default=512)
    run.add_argument("--n_embd", type=int, default=768)
    run.add_argument("--n_head", type=int, default=12)
    run.add_argument("--n_layer", type=int, default=12)
    run.add_argument("--embd_pdrop", type=float, default=0.1)
    run.add_argument("--attn_pdrop", type=float, default=0.1)
    run.add_argument("--resid_pdrop", type=float, default=0.1)
    run.add_argument("--clf_pdrop", type=float, default=0.1)
    run.add_argument("--l2", type=float, default=0.01)
    run.add_argument("--vector_l2", action="store_true")
    run.add_argument("--n_gpu", type=int, default=4, help="towers per update (the TF code's GPUs): the batch is "
                                                          "n_batch x n_gpu")
    run.add_argument("--opt", type=str, default="adam", choices=["adam"])
    run.add_argument("--afn", type=str, default="gelu", choices=sorted(ACT_FNS))
    run.add_argument("--lr_schedule", type=str, default="warmup_linear", choices=sorted(SCHEDULES))
    io.add_argument("--encoder_path", type=str, default="model/encoder_bpe_40000.json")
    io.add_argument("--bpe_path", type=str, default="model/vocab_40000.bpe")
    run.add_argument("--n_transfer", type=int, default=12)
    run.add_argument("--lm_coef", type=float, default=0.5)
    run.add_argument("--b1", type=float, default=0.9)
    run.add_argument("--b2", type=float, default=0.999)
    run.add_argument("--e", type=float, default=1e-8)
    run.add_argument("--n_valid", type=int, default=374)
    # This port's additions.
    io.add_argument("--model_path", type=str, default="model/", help="OpenAI shards or Hugging Face weights")
    io.add_argument("--demo", action="store_true", help="run on a built-in synthetic task (no download)")
    io.add_argument("--demo_dir", type=str, default="demo_run/")
    io.add_argument("--resume", action="store_true", help="continue from save/DESC/checkpoint.pt")
    run.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast (fp16 adds a loss scaler)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the model (lengths bucketed; CUDA graphs on a GPU)")
    run.add_argument("--micro_batch", type=int, default=None,
                     help="examples per forward pass (default: a process's whole share of the update in one)")
    io.add_argument("--eval_batch", type=int, default=None,
                    help="examples per evaluation batch (default: 128 on a GPU, 16 on a CPU)")
    io.add_argument("--cache_dir", type=str, default=None,
                    help="where encoded data sets are cached (default: SAVE_DIR/encoded)")
    io.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    run.add_argument("--plain", action="store_true",
                     help="turn the speed-ups off (no trimming, explicit attention, LM logits everywhere)")
    io.add_argument("--stop_after_updates", type=int, default=None, help=argparse.SUPPRESS)  # tests: an interrupt
    return p


def run_settings(parser):
    """The names of the flags that --resume keeps fixed (the parser's "run" group)."""
    group = next(g for g in parser._action_groups if g.title == "run")
    return [a.dest for a in group._group_actions]


def validate_args(args):
    """Every numeric flag in its range, as one clear line (argparse checks only the types)."""
    rules = [
        ("n_iter", args.n_iter >= 1, "at least 1"),
        ("n_batch", args.n_batch >= 1, "at least 1"),
        ("n_gpu", args.n_gpu >= 1, "at least 1"),
        ("eval_batch", args.eval_batch is None or args.eval_batch >= 1, "at least 1"),
        ("n_valid", args.n_valid >= 1, "at least 1"),
        ("n_ctx", args.n_ctx >= 6, "at least 6"),
        ("n_embd", args.n_embd >= 1, "at least 1"),
        ("n_head", args.n_head >= 1 and args.n_embd % max(args.n_head, 1) == 0, "at least 1 and divide --n_embd"),
        ("n_layer", args.n_layer >= 1, "at least 1"),
        ("n_transfer", -1 <= args.n_transfer <= args.n_layer, f"between -1 and --n_layer ({args.n_layer})"),
        ("lr", args.lr >= 0 and np.isfinite(args.lr), "a finite number >= 0"),
        ("lr_warmup", 0 <= args.lr_warmup <= 1, "in [0, 1]"),
        ("l2", args.l2 >= 0, ">= 0"),
        ("lm_coef", args.lm_coef >= 0, ">= 0"),
        ("b1", 0 <= args.b1 < 1, "in [0, 1)"),
        ("b2", 0 <= args.b2 < 1, "in [0, 1)"),
        ("e", args.e >= 0, ">= 0"),
        ("max_grad_norm", np.isfinite(args.max_grad_norm), "a finite number (<= 0 turns clipping off)"),
        ("micro_batch", args.micro_batch is None or args.micro_batch >= 1, "at least 1"),
        ("stop_after_updates", args.stop_after_updates is None or args.stop_after_updates >= 1, "at least 1"),
    ] + [(name, 0 <= getattr(args, name) < 1, "in [0, 1)")
         for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop", "clf_pdrop")]
    for name, ok, expected in rules:
        if not ok:
            raise RunError(f"--{name} {getattr(args, name)} is invalid: it must be {expected}")
    return args


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


# The paper's pre-training recipe (its section 4.1): lr 2.5e-4 with a cosine schedule, 64 sequences of
# n_ctx tokens per update; dropout, L2 and the warm-up fraction as for fine-tuning.
LM_DEFAULTS = dict(lr=2.5e-4, lr_schedule="warmup_cosine", n_batch=16)


def parse_args(argv=None):
    """The flags; with --demo, the demo's sizes become the defaults, with --dataset lm the paper's
    pre-training recipe (explicit flags still win)."""
    parser = build_parser()
    known = parser.parse_known_args(argv)[0]
    if known.dataset == "lm":
        parser.set_defaults(**LM_DEFAULTS)
    if known.demo:
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
# Data (docs/reference.md §5)
# ------------------------------------------------------------------------------------------------

def encode_cached(splits, text_encoder, cache_dir):
    """`encode_dataset` of the splits, cached on disk under a key made of the texts themselves and
    the vocabulary files: a change to either encodes again. Stored as flat int arrays (no pickle)."""
    digest = hashlib.sha256(vocabulary_key(text_encoder).encode())
    text_fields = []
    for s, split in enumerate(splits):
        for k, values in enumerate(split):
            if len(values) and isinstance(values[0], str):
                text_fields.append((s, k))
                digest.update(f"\0{s}/{k}/{len(values)}\0".encode())
                digest.update("\0".join(values).encode("utf-8", "surrogatepass"))
    path = os.path.join(cache_dir, f"{digest.hexdigest()[:32]}.npz") if cache_dir else None
    if path and os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as stored:
                encoded = [list(split) for split in splits]
                for s, k in text_fields:
                    ids, offsets = stored[f"{s}_{k}_ids"], stored[f"{s}_{k}_offsets"]
                    encoded[s][k] = [a.tolist() for a in np.split(ids, offsets[1:-1])]
                return encoded
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache file is encoded again and rewritten
    encoded = encode_dataset(*splits, encoder=text_encoder)
    if path:
        arrays = {}
        for s, k in text_fields:
            seqs = encoded[s][k]
            arrays[f"{s}_{k}_offsets"] = np.cumsum([0] + [len(x) for x in seqs]).astype(np.int64)
            arrays[f"{s}_{k}_ids"] = np.fromiter((i for x in seqs for i in x), dtype=np.int32)
        try:
            atomic_save(arrays, path, saver=save_npz)
        except OSError as err:  # the cache only saves time: the run goes on without it
            print(f"warning: could not write the encoding cache {path} ({err.strerror or err}); "
                  f"encoding again next run", file=sys.stderr)
    return encoded


def vocabulary_key(text_encoder):
    """What the ids depend on besides the texts: the vocabulary, the merges and the tokenizer code."""
    import text_utils

    merges = sorted(text_encoder.bpe_ranks.items(), key=lambda item: item[1])
    with open(text_utils.__file__, "rb") as f:
        code = hashlib.sha256(f.read()).hexdigest()
    return "\n".join([json.dumps(text_encoder.encoder, sort_keys=True), repr(merges), code])


def save_npz(arrays, path):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def check_split(name, X, M, vocab, clf_token):
    """Once per data set, on the host: ids within the embedding, a `_classify_` in every sequence,
    masks that are a prefix of ones. The training loop then never checks on the device."""
    if X.size and (X.min() < 0 or X.max() >= vocab):
        raise RunError(f"{name}: ids range over {X.min()} ... {X.max()} but the embedding has {vocab} rows")
    try:
        if clf_token is not None:
            first_classify_positions(X[..., 0].reshape(-1, X.shape[-2]), clf_token, where=name)
    except ValueError as err:
        raise RunError(str(err)) from None
    keep = M.reshape(-1, M.shape[-1]) > 0
    if (keep[:, 1:] > keep[:, :-1]).any():
        raise RunError(f"{name}: a mask has padding before real tokens; padding must come last")


@dataclass
class TaskData:
    """A task's encoded splits as arrays: name -> (X [n, sequences, T, 2], M [n, sequences, T], labels
    or None), in the order the task reads them, and each split as read (titles, submission names)."""

    task: Task
    splits: dict
    specials: Specials
    n_ctx: int
    read: dict


def task_for(args):
    """The --dataset declaration, with this run's settings where the task takes any."""
    task = get_task(args.dataset)
    if isinstance(task, RocStoriesTask):
        task = dataclasses.replace(task, n_valid=args.n_valid)
    return task


def load_task_data(args, text_encoder, task):
    """Read, encode (cached), transform (the paper's Figure 1, cut to --n_ctx) and lay out every split.
    n_ctx becomes the longest sequence of any split, at most --n_ctx (as the original does)."""
    read = task.read(args.data_dir)
    for split in read.values():
        for note in split.notes:
            tqdm.write(note)
    cache_dir = args.cache_dir or os.path.join(args.save_dir, "encoded")
    encoded = encode_cached([split.texts for split in read.values()], text_encoder, cache_dir)
    if isinstance(task, LanguageModelTask):  # plain text: no special tokens
        specials = Specials(len(text_encoder.encoder), None, None, None, n_special=0)
    else:
        specials = add_specials(text_encoder)
    sequences, n_cut = {}, 0
    for name, texts in zip(read, encoded):
        try:
            sequences[name], cut = task.sequences(texts, specials, args.n_ctx)
        except ValueError as err:
            raise RunError(f"--n_ctx {args.n_ctx}: {err}") from None
        n_cut += cut
    if n_cut:
        tqdm.write(f"{n_cut} examples were cut to fit --n_ctx {args.n_ctx} ({task.cut_rule})")
    n_ctx = min(max(len(seq) for seqs in sequences.values() for example in seqs for seq in example), args.n_ctx)
    splits = {}
    for name, split in read.items():
        labels = split.labels if split.labels is not None or name != "train" else np.zeros(len(sequences[name]))
        splits[name] = (*to_arrays(sequences[name], n_ctx, specials), labels)
    return TaskData(task, splits, specials, n_ctx, read)


# ------------------------------------------------------------------------------------------------
# Batches: everything the device needs, prepared on the host
# ------------------------------------------------------------------------------------------------

@dataclass
class Batch:
    X: torch.Tensor
    M: torch.Tensor
    Y: "torch.Tensor | None"
    plan: "BatchPlan | None"


def trim(X, M):
    """Cut the padding shared by every sequence of a batch (exact: it lies after `_classify_`)."""
    length = int(M.sum(-1).max())
    return X[..., :length, :], M[..., :length]


def bucketed(X, M, multiple):
    """Cut the shared padding only down to a multiple of `multiple` positions (at most the full
    width): a run then sees a handful of lengths, one compiled graph each."""
    length = int(M.sum(-1).max())
    length = min(-(-length // multiple) * multiple, X.shape[-2])
    return X[..., :length, :], M[..., :length]


def make_batch(xmb, mmb, ymb, clf_token, device, mode, lm=True):
    """A Batch on `device`. mode "plain": the whole padded batch (the model checks on the device);
    "trimmed" (default): shared padding cut, real tokens only, a BatchPlan; "static" (--compile):
    lengths bucketed and every position kept, so shapes repeat and graphs can be reused."""
    Y = None if ymb is None else to_device(ymb, device, torch.long if ymb.dtype.kind in "iu" else torch.float32)
    if mode == "plain":
        return Batch(to_device(xmb, device), to_device(mmb, device), Y, None)
    xmb, mmb = bucketed(xmb, mmb, COMPILE_BUCKET) if mode == "static" else trim(xmb, mmb)
    plan = BatchPlan.build(xmb, mmb, clf_token, device, skip_padding=mode != "static", lm=lm)
    return Batch(to_device(xmb, device), to_device(mmb, device), Y, plan)


def batch_mode(args, training=True):
    if args.plain:
        return "plain"
    return "static" if args.compile and training else "trimmed"


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

    def synchronize(self):
        """Wait for the device: only at phase boundaries, for honest phase times."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def default_eval_batch(args, runtime):
    """--eval_batch by device: 128 examples at a time on a GPU, 16 on a CPU (no faster in larger
    batches there: docs/speed.md). An explicit flag wins. (Training runs a process's share of an
    update as one pass on every device unless --micro_batch says otherwise.)"""
    if args.eval_batch is None:
        args.eval_batch = 16 if runtime.device.type == "cpu" else 128


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


def setup_runtime(args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise RunError(str(err)) from None
    if device.type == "cpu":
        keep_freed_host_memory()
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
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    try:
        saver(obj, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def host_copy(obj):
    """A copy on the host of every tensor in a (nested) state: training may go on meanwhile."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


def model_state(model):
    """The state dict with tied tensors once (the LM head shares the embedding)."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            state[name] = tensor
    return state


def load_model_state(model, state, source):
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(model.state_dict()) - set(model_state(model))
    if unexpected or set(missing) - tied:
        raise RunError(f"{source} does not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                       f"unexpected {sorted(unexpected)[:5]}")


class BackgroundWriter:
    """Writes files from host copies in one background thread, in order, so training does not
    wait for the disk. `wait()` returns once all are written (and re-raises a failed write)."""

    def __init__(self):
        self._thread, self._error = None, None

    def submit(self, write, *args):
        self.wait()

        def work():
            try:
                write(*args)
            except BaseException as err:  # reported by wait()
                self._error = err

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RunError(f"writing a checkpoint failed: {err}")


def save_best_params(state, path, args=None):
    """The parameters as safetensors; `args` (the run's arguments) go into the file's metadata as JSON, so
    a model can be rebuilt from the file alone (n_head, afn; model_pytorch.read_checkpoint)."""
    from safetensors.torch import save_file

    metadata = {"args": json.dumps(args, default=str)} if args is not None else None
    atomic_save({k: v.contiguous() for k, v in state.items()}, path,
                saver=lambda tensors, file: save_file(tensors, file, metadata=metadata))


def load_best_params(model, path):
    from safetensors.torch import load_file

    load_model_state(model, load_file(path), path)


def numpy_rng_state(rng):
    """A RandomState's state as tensors and numbers (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = rng.get_state()
    return dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos), has_gauss=int(has_gauss),
                cached=float(cached))


def numpy_state(saved):
    return ("MT19937", saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"], saved["cached"])


def rng_state(data_rng):
    state = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=numpy_rng_state(data_rng))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rank_generators(runtime):
    """Every process's dropout generators (torch's, and its CUDA device's), gathered on every rank:
    each process draws its own masks, so a resumed torchrun run needs each one's state back to take
    the same updates as an uninterrupted one."""
    mine = dict(torch=torch.get_rng_state())
    if runtime.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(runtime.device)
    states = [None] * runtime.world
    dist.all_gather_object(states, mine)
    return states


def restore_rank_generators(mine, device):
    """This process's own dropout generators, as `rank_generators` gathered them."""
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], device)


def restore_rng(state):
    """Restore the generators; CUDA states only for the devices this machine has (a checkpoint
    made with more GPUs, or on a GPU machine resumed on a CPU, still resumes)."""
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if state.get("cuda") and torch.cuda.is_available():
        for index in range(min(len(state["cuda"]), torch.cuda.device_count())):
            torch.cuda.set_rng_state(state["cuda"][index], index)


def load_checkpoint(path, args, parser_defaults):
    if not os.path.exists(path):
        raise RunError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RunError(f"--resume: {path} cannot be read as a checkpoint ({err})") from None
    saved = ckpt["args"]
    changed = [k for k in run_settings(build_parser()) if saved.get(k, parser_defaults.get(k)) != getattr(args, k)]
    if changed:
        raise RunError("--resume: the checkpoint was made with other settings: " + ", ".join(
            f"--{k} {saved.get(k, parser_defaults.get(k))!r} (now {getattr(args, k)!r})" for k in changed))
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
    best_score: float = float("-inf")
    epoch_rng: dict = None  # data generator's state at the start of the current epoch


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
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def add(self, name, seconds):
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def report(self, n_updates):
        parts = [f"{name} {s:.1f} s" for name, s in self.seconds.items()]
        if n_updates and "training" in self.seconds:
            parts.append(f"{1000 * self.seconds['training'] / n_updates:.1f} ms per update")
        return "time: " + ", ".join(parts)


def autocast(args, runtime):
    if not args.amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    return torch.autocast(device_type=runtime.device.type, dtype=dtype)


def no_autocast(args, runtime):
    """Backward outside autocast, without leaving the update's autocast region (whose weight casts
    stay cached until the update ends: weights are cast once per update, not per micro-batch)."""
    if not args.amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=runtime.device.type, enabled=False)


def batch_objective(model, batch, compute, args):
    """The training objective of one (micro-)batch: mean task loss + lm_coef * mean LM loss, or (a
    language model alone, compute None) the mean LM loss."""
    plan = batch.plan
    # the LM head's own losses (lm_head_losses) wherever the plan selects the LM rows and the
    # criterion is the default cross-entropy
    row_losses = plan is not None and plan.lm_rows is not None and (
        compute is None or compute.lm_criterion is per_element_cross_entropy)
    if compute is None:
        if row_losses:
            return sequence_means(model(batch.X, plan=plan, lm_losses=True), plan).mean()
        return lm_losses(batch.X, batch.M, model(batch.X, plan=plan).float(), plan=plan).mean()
    lm, clf_logits = model(batch.X, compute_lm=args.lm_coef > 0, plan=plan, lm_losses=row_losses)
    if row_losses:
        clf = compute.clf_losses(clf_logits.float(), batch.Y)
        return compute.objective(clf, None if lm is None else sequence_means(lm, plan))
    clf, lm = compute.losses(batch.X, batch.Y, batch.M, clf_logits.float(),
                             None if lm is None else lm.float(), plan=plan)
    return compute.objective(clf, lm)


def train_update(model, micro_batches, compute, opt, scaler, args, runtime, stop_requested=False):
    """One update from this process's share; returns a device tensor [mean loss, stop flag] summed
    over processes. Nothing here waits for the device (fp16's loss scaler aside)."""
    total = None
    with autocast(args, runtime):
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or runtime.world == 1 else model.no_sync()
            with sync:
                loss = batch_objective(model, batch, compute, args) / len(micro_batches)
                with no_autocast(args, runtime):
                    (scaler.scale(loss) if scaler else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
    values = torch.stack([total.float(), total.new_full((), float(stop_requested), dtype=torch.float32)])
    if runtime.world > 1:
        dist.all_reduce(values)
        values = torch.stack([values[0] / runtime.world, values[1]])
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return values


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


def predict_logits(model, X, M, args, runtime):
    """Task logits of every example: no dropout, no LM logits, batches of similar length, read back
    once at the end. The caller's train/eval mode is restored."""
    with evaluation_mode(model):
        clf_token = _task_head(model).clf_token
        order = np.argsort(M.sum(-1).max(-1), kind="stable") if not args.plain else np.arange(len(X))
        batch_size = args.n_batch * args.n_gpu if args.plain else args.eval_batch
        outputs = []
        for idx in iter_data(order, n_batch=batch_size):
            batch = make_batch(X[idx], M[idx], None, clf_token, runtime.device, batch_mode(args, training=False),
                               lm=False)
            with autocast(args, runtime):
                _, logits = model(batch.X, mask=None, compute_lm=args.plain, plan=batch.plan)
            outputs.append(logits.float())
        logits = torch.cat(outputs).cpu().numpy() if outputs else np.zeros((0,), np.float32)
        result = np.empty_like(logits)
        result[order] = logits
        return result


def _unwrapped(model):
    """The model inside torch.compile's and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _task_head(model):
    return _unwrapped(model).task_head


LM_EVAL_LOGITS = 2 ** 28  # logits (vocabulary x positions) per evaluation forward of a language model: 1 GiB


def evaluate_lm(model, X, M, args, runtime):
    """Mean next-token loss over the sequences (all of n_ctx tokens), read back once at the end.

    A language model's logits are a row of the whole vocabulary per position (128 sequences of 512
    tokens: 10 GiB in float32, and the loss makes a copy), so a forward holds at most LM_EVAL_LOGITS
    of them, whatever --eval_batch says: the figure is the same, the memory fits a small GPU."""
    vocab = _unwrapped(model).transformer.embed.weight.size(0)
    n_batch = max(1, min(args.eval_batch, LM_EVAL_LOGITS // (X.shape[-2] * vocab)))
    with evaluation_mode(model):
        total = torch.zeros((), device=runtime.device)
        for idx in iter_data(np.arange(len(X)), n_batch=n_batch):
            batch = make_batch(X[idx], M[idx], None, None, runtime.device, "trimmed")
            with autocast(args, runtime):
                logits = model(batch.X, plan=batch.plan)
            total += lm_losses(batch.X, batch.M, logits.float(), plan=batch.plan).sum()
        return total.item() / len(X)


def evaluate(model, task, X, M, Y, args, runtime):
    """(mean task loss, {metric: value}) of the labelled examples X, M, Y."""
    if isinstance(task, LanguageModelTask):
        cost = evaluate_lm(model, X, M, args, runtime)
        return cost, task.metrics(cost)
    logits = predict_logits(model, X, M, args, runtime)
    cost = task.losses(torch.from_numpy(logits), torch.from_numpy(Y)).mean().item()
    return cost, task.metrics(logits, Y)


METRIC_KEYS = {"Accuracy": "acc", "MCC": "mcc", "F1": "f1", "Pearson": "pearson", "Spearman": "spearman",
               "Perplexity": "ppl"}


def selection_score(task, metrics):
    """The figure that picks the kept parameters, higher is better: the task's first metric
    (perplexity negated)."""
    name = task.metric_names[0]
    return -metrics[name] if name == "Perplexity" else metrics[name]


def write_submission(rows, path):
    """`index<TAB>prediction` lines from (index, prediction) pairs, written atomically."""
    def write(rows, target):
        with open(target, "w") as f:
            f.write("index\tprediction\n" + "".join(f"{i}\t{p}\n" for i, p in rows))

    atomic_save(list(rows), path, saver=write)


class StopRequest:
    """Ctrl-C / SIGTERM: finish the current update, save a resumable checkpoint, then exit.
    Under torchrun the request travels with the update's loss, so every process stops after the
    same update."""

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


def count_lines(path):
    with open(path) as f:
        return sum(1 for _ in f)


# ------------------------------------------------------------------------------------------------
# The run, phase by phase
# ------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything a run's phases share."""

    args: argparse.Namespace
    runtime: Runtime
    times: PhaseTimes
    data: TaskData = None
    text_encoder: TextEncoder = None
    model: torch.nn.Module = None
    train_model: torch.nn.Module = None
    opt: OpenAIAdam = None
    compute: object = None
    scaler: object = None
    data_rng: np.random.RandomState = None
    progress: Progress = field(default_factory=Progress)
    logger: ResultLogger = None
    writer: BackgroundWriter = field(default_factory=BackgroundWriter)
    n_updates_total: int = 0
    micro_batch: int = None  # examples per pass (None: all at once), halved when the device runs out of memory
    compile_shapes: dict = field(default_factory=dict)

    @property
    def desc(self):
        return self.args.desc or self.args.dataset

    @property
    def save_dir(self):
        return os.path.join(self.args.save_dir, self.desc)

    @property
    def best_path(self):
        return os.path.join(self.save_dir, "best_params.safetensors")

    @property
    def ckpt_path(self):
        return os.path.join(self.save_dir, "checkpoint.pt")

    @property
    def log_path(self):
        return os.path.join(self.args.log_dir, f"{self.desc}.jsonl")


def set_up(args, runtime, times):
    """Seeds, data, model with its pre-trained weights, optimizer: a Run ready for its first update.

    One numpy generator, seeded with --seed, serves as the TF script's global one: its first draw
    is the special-token rows, then it shuffles every epoch (docs/reference.md §5)."""
    default_eval_batch(args, runtime)
    run = Run(args, runtime, times, micro_batch=args.micro_batch)
    random.seed(args.seed)
    torch.manual_seed(args.seed + runtime.rank)
    run.data_rng = np.random.RandomState(args.seed)

    with times("encoding"):
        run.text_encoder = text_encoder = TextEncoder(args.encoder_path, args.bpe_path)
        n_rows, n_positions = pretrained_sizes(args.model_path)
        held = exported_special_tokens(args.model_path, n_rows)  # a fine-tune's export: its special rows
        if len(text_encoder.encoder) != n_rows - len(held):
            raise RunError(f"the vocabulary {args.encoder_path} has {len(text_encoder.encoder)} entries but the "
                           f"weights in {args.model_path} have {n_rows - len(held)} token rows"
                           + (f" (and {len(held)} special rows)" if held else "") + ": they do not belong together")
        task = task_for(args)
        if held and not isinstance(task, LanguageModelTask) and tuple(held) != SPECIAL_TOKENS:
            raise RunError(f"the weights in {args.model_path} hold the special rows {', '.join(held)}; a fine-tune "
                           f"needs {', '.join(SPECIAL_TOKENS)} in this order")
        run.data = load_task_data(args, text_encoder, task)
    data = run.data
    if data.n_ctx > n_positions:
        raise RunError(f"the data needs n_ctx={data.n_ctx} positions but the weights have only {n_positions}; "
                       f"pass --n_ctx {n_positions} ({data.task.cut_rule})")
    vocab = data.specials.n_vocab + data.specials.n_special + data.n_ctx
    for name, (X, M, _) in data.splits.items():  # once, on the host: no check inside an update
        check_split(name, X, M, vocab, data.specials.clf_token)

    with times("loading"):
        cfg = make_config(args)
        cfg.fused_attention = not args.plain
        if isinstance(data.task, LanguageModelTask):
            run.model = LMModel(cfg, vocab=vocab, n_ctx=data.n_ctx)
        else:
            run.model = DoubleHeadModel(cfg, data.specials.clf_token, data.task.head, vocab=vocab, n_ctx=data.n_ctx)
        load_openai_pretrained_model(run.model.transformer, n_ctx=data.n_ctx, n_special=data.specials.n_special,
                                     n_transfer=args.n_transfer, n_embd=args.n_embd, path=args.model_path,
                                     special_rows=run.data_rng)
        run.model.to(runtime.device)

    n_train = len(data.splits["train"][0])
    n_batch_train = args.n_batch * args.n_gpu
    if n_train < n_batch_train:
        raise RunError(f"{n_train} training examples are fewer than one update's batch of {n_batch_train}")
    share = n_batch_train // runtime.world
    if args.micro_batch and share % args.micro_batch:
        raise RunError(f"--micro_batch {args.micro_batch} must divide a process's share of the update "
                       f"({share} examples)")
    run.n_updates_total = (n_train // n_batch_train) * args.n_iter
    run.opt = OpenAIAdam(run.model.parameters(), lr=args.lr, schedule=args.lr_schedule, warmup=args.lr_warmup,
                         t_total=run.n_updates_total, b1=args.b1, b2=args.b2, e=args.e, l2=args.l2,
                         vector_l2=args.vector_l2, max_grad_norm=args.max_grad_norm)
    if not isinstance(data.task, LanguageModelTask):
        run.compute = MultipleChoiceLossCompute(lm_coef=args.lm_coef, clf_criterion=data.task.losses)
    run.scaler = torch.amp.GradScaler(runtime.device.type) if args.amp == "fp16" else None
    return run


def resume(run, parser_defaults):
    """With --resume: the model, optimizer, progress and every generator as the checkpoint left them."""
    args = run.args
    ckpt = load_checkpoint(run.ckpt_path, args, parser_defaults)
    if not os.path.exists(run.log_path):  # checked on every rank: the checkpoint continues the log it counted
        raise RunError(f"--resume: the run's log {run.log_path} is missing; the checkpoint continues that log "
                       "(give the --log_dir and --desc of the interrupted run)")
    load_model_state(run.model, ckpt["model"], run.ckpt_path)
    run.opt.load_state_dict(ckpt["optimizer"])
    run.progress = Progress(ckpt["n_epochs"], ckpt["n_updates"], ckpt["update_in_epoch"], ckpt["best_score"],
                            ckpt["epoch_rng"])
    restore_rng(ckpt["rng"])
    run.data_rng.set_state(numpy_state(ckpt["rng"]["numpy"]))
    ranks = ckpt["rng"].get("ranks")
    if run.runtime.world > 1 and ranks and len(ranks) == run.runtime.world:
        restore_rank_generators(ranks[run.runtime.rank], run.runtime.device)
    elif run.runtime.world > 1:  # another number of processes: one new stream per rank
        torch.manual_seed(args.seed + run.runtime.rank + 1_000_003 * run.progress.n_updates)
    if args.submit and not os.path.exists(run.best_path):
        run.progress.best_score = float("-inf")
        if run.runtime.main:
            tqdm.write("--submit added on resume: the best parameters are kept from the next evaluation on")
    return ckpt


def start_log(run, ckpt):
    """Rank 0's log (continued on resume), the first best parameters, and the run's summary line."""
    args, data = run.args, run.data
    if ckpt:
        run.logger = ResultLogger.reopen(run.log_path, keep_lines=ckpt["log_lines"])
    else:
        run.logger = ResultLogger(run.log_path, **vars(args))
    if args.submit and not os.path.exists(run.best_path):
        save_best_params(host_copy(model_state(run.model)), run.best_path, dict(vars(args)))
    n_batch_train = args.n_batch * args.n_gpu
    sizes = ", ".join(f"{len(arrays[0])} {name}" for name, arrays in data.splits.items())
    tqdm.write(f"{data.task.title}: {sizes} examples; n_ctx {data.n_ctx}; {run.n_updates_total} updates "
               f"of {n_batch_train} on {run.runtime.device}"
               + (f" x {run.runtime.world} processes" if run.runtime.world > 1 else ""))


def wrap_for_training(run):
    """DDP across processes, torch.compile with static shapes (CUDA graphs on a GPU)."""
    model = run.model
    if run.runtime.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.runtime.device.index] if run.runtime.device.type == "cuda" else None)
    if run.args.compile:
        mode = "reduce-overhead" if run.runtime.device.type == "cuda" else None
        model = torch.compile(model, dynamic=False, mode=mode)
    run.train_model = model


def micro_batches_of(run, xmb, mmb, ymb):
    """This process's share of an update's batch, as equal micro-batches on the device."""
    args, runtime = run.args, run.runtime
    share = len(xmb) // runtime.world
    mine = slice(runtime.rank * share, (runtime.rank + 1) * share)
    xmb, mmb, ymb = xmb[mine], mmb[mine], ymb[mine]
    size = run.micro_batch or share
    lm = args.lm_coef > 0 or run.compute is None  # (a language model alone always needs its LM rows)
    return [make_batch(xmb[k:k + size], mmb[k:k + size], ymb[k:k + size], run.data.specials.clf_token,
                       runtime.device, batch_mode(args), lm=lm) for k in range(0, share, size)]


def update_within_memory(run, xmb, mmb, ymb, stop):
    """One update; if the device runs out of memory, the same update again in micro-batches of half
    the size (the same objective), and so on for the rest of the run. Returns (values, batch shape)."""
    share = len(xmb) // run.runtime.world
    while True:
        batches = micro_batches_of(run, xmb, mmb, ymb)
        try:
            values = train_update(run.train_model, batches, run.compute, run.opt, run.scaler, run.args, run.runtime,
                                  stop_requested=stop.requested)
            return values, tuple(batches[0].X.shape)
        except torch.OutOfMemoryError:
            size = run.micro_batch or share
            if size % 2 or run.runtime.world > 1:
                raise RunError(f"out of memory with {size} examples per pass; pass a smaller --micro_batch "
                               f"(it must divide {share})") from None
            del batches
            run.opt.zero_grad(set_to_none=True)
            if run.runtime.device.type == "cuda":
                torch.cuda.empty_cache()
            run.micro_batch = size // 2
            tqdm.write(f"out of memory with {size} examples per pass: the update runs again as micro-batches of "
                       f"{run.micro_batch} (start with --micro_batch {run.micro_batch} to skip this)")


def epoch_order(rng, n):
    """The order of one epoch: scikit-learn's shuffle driven by the run's numpy generator, as the
    TF script shuffles its training arrays (the same draws, so the same order)."""
    return shuffle(np.arange(n), random_state=rng)


def train_epoch(run, stop, reader, bar_enabled):
    """The remaining updates of the current epoch; returns True when a stop was requested."""
    args, progress = run.args, run.progress
    if progress.update_in_epoch == 0:
        progress.epoch_rng = numpy_rng_state(run.data_rng)
    else:  # resuming inside an epoch: shuffle again from its start
        run.data_rng.set_state(numpy_state(progress.epoch_rng))
    X, M, Y = run.data.splits["train"]
    order = epoch_order(run.data_rng, len(X))
    n_batch_train = args.n_batch * args.n_gpu
    n_batches = len(X) // n_batch_train
    bar = tqdm(total=n_batches, initial=progress.update_in_epoch, ncols=100, leave=False, mininterval=1,
               disable=not bar_enabled, desc=f"epoch {progress.n_epochs + 1}/{args.n_iter}")
    start = time.perf_counter()
    try:
        for b in range(progress.update_in_epoch, n_batches):
            idx = order[b * n_batch_train:(b + 1) * n_batch_train]
            t0 = time.perf_counter()
            values, shape = update_within_memory(run, X[idx], M[idx], Y[idx], stop)
            progress.n_updates += 1
            progress.update_in_epoch += 1
            if args.compile and shape not in run.compile_shapes:
                run.runtime.synchronize()
                run.compile_shapes[shape] = time.perf_counter() - t0
            previous = reader.push(values, progress.n_updates)
            bar.update(1)
            if previous:
                bar.set_postfix(loss=f"{previous[0]:.3f}", lr=f"{run.opt.current_lr():.2e}", refresh=False)
            if progress.n_updates in LOG_UPDATES and progress.n_epochs == 0:
                reader.flush()
                run.times.add("training", time.perf_counter() - start)
                log_point(run)
                start = time.perf_counter()
            if args.stop_after_updates is not None and progress.n_updates >= args.stop_after_updates:
                stop.requested = True
                reader.flush()
                return True
            if reader.stop:
                return True
        reader.flush()
        return reader.stop
    finally:
        run.runtime.synchronize()
        run.times.add("training", time.perf_counter() - start)
        bar.close()


def log_point(run):
    """The original's log(): costs and metrics (ROCStories: accuracies) on the first n_valid training
    examples and the validation set; rank 0 logs them and keeps the best parameters, chosen by the
    task's first metric on the validation set."""
    args, progress, task = run.args, run.progress, run.data.task
    with run.times("evaluation"):
        score = None
        if run.runtime.main:
            trX, trM, trY = (a[:args.n_valid] for a in run.data.splits["train"])
            tr_cost, tr_metrics = evaluate(run.model, task, trX, trM, trY, args, run.runtime)
            va_cost, va_metrics = evaluate(run.model, task, *run.data.splits["valid"], args, run.runtime)
            point = dict(n_epochs=progress.n_epochs, n_updates=progress.n_updates, tr_cost=tr_cost, va_cost=va_cost)
            for prefix, metrics in (("tr", tr_metrics), ("va", va_metrics)):
                point.update({f"{prefix}_{METRIC_KEYS[name]}": value for name, value in metrics.items()})
            run.logger.log(**point)
            tqdm.write(" ".join(f"{v:.3f}" if k.endswith("cost") else f"{v:.2f}" if isinstance(v, float) else str(v)
                                for k, v in point.items()))
            score = selection_score(task, va_metrics)
    if score is not None and args.submit and score > progress.best_score:
        progress.best_score = score
        with run.times("checkpoint writing"):
            run.writer.submit(save_best_params, host_copy(model_state(run.model)), run.best_path, dict(vars(args)))


def save_checkpoint(run):
    """A resumable checkpoint from host copies, written in the background (atomic). Every rank calls
    it (their generators are gathered); rank 0 writes."""
    ranks = rank_generators(run.runtime) if run.runtime.world > 1 else None
    if not run.runtime.main:
        return
    progress = run.progress
    with run.times("checkpoint writing"):
        rng = rng_state(run.data_rng)
        if ranks:
            rng["ranks"] = ranks
        state = dict(model=host_copy(model_state(run.model)), optimizer=host_copy(run.opt.state_dict()),
                     n_epochs=progress.n_epochs, n_updates=progress.n_updates,
                     update_in_epoch=progress.update_in_epoch, best_score=progress.best_score,
                     epoch_rng=progress.epoch_rng, rng=rng,
                     log_lines=count_lines(run.log_path), args=dict(vars(run.args)))
        run.writer.submit(atomic_save, state, run.ckpt_path)


def train_all(run):
    """Every epoch, with a log point and a checkpoint after each; returns True if stopped early."""
    args, progress = run.args, run.progress
    reader = LateReader(run.runtime.device)
    with StopRequest() as stop:
        while progress.n_epochs < args.n_iter:
            stopped = train_epoch(run, stop, reader, bar_enabled=run.runtime.main)
            n_batches = len(run.data.splits["train"][0]) // (args.n_batch * args.n_gpu)
            if stopped and progress.update_in_epoch < n_batches:
                save_checkpoint(run)
                return True
            progress.n_epochs += 1
            progress.update_in_epoch = 0
            if run.runtime.main:
                log_point(run)
            save_checkpoint(run)
            if stopped:
                return True
    return False


def report_compile(run):
    """What --compile cost, and whether this run gained from it."""
    if not run.compile_shapes:
        return
    training = run.times.seconds.get("training", 0.0)
    first_calls = sum(run.compile_shapes.values())
    tqdm.write(f"--compile: {len(run.compile_shapes)} training graphs; their first updates (compiling) took "
               f"{first_calls:.1f} s of {training:.1f} s of training")
    if first_calls > 0.5 * training:
        tqdm.write("--compile: compiling took most of the training time: this run does not gain from --compile")


def predict(run):
    """With --submit, the best validation parameters predict every split after training: test sets
    go into the submission files; with --analysis, each labelled split's metrics are printed
    (ROCStories: the original's two lines, from the log and the submission)."""
    args, data = run.args, run.data
    report = []
    with run.times("prediction"):
        if args.submit:
            load_best_params(run.model, run.best_path)
        for name, split in data.read.items():
            if name == "train" or not (split.submission and args.submit or args.analysis):
                continue
            logits = predict_logits(run.model, *data.splits[name][:2], args, run.runtime)
            if split.submission and args.submit:
                index = split.index if split.index is not None else range(len(logits))
                write_submission(zip(index, data.task.predictions(logits)),
                                 os.path.join(args.submission_dir, split.submission))
            if split.labels is not None and not isinstance(data.task, RocStoriesTask):
                report += report_lines(data.task, split, logits)
    if not args.analysis:
        return
    if isinstance(data.task, RocStoriesTask):
        if args.submit:
            analysis.rocstories(args.data_dir, os.path.join(args.submission_dir, "ROCStories.tsv"), run.log_path)
        return
    for line in report:
        print(line)


def save_language_model(run):
    """The trained language model (the best on validation with --submit) in the Hugging Face format,
    with its vocabulary, in save/DESC/model: `--model_path` of a fine-tuning run loads it."""
    from export_hf import save_hf_checkpoint

    args = run.args
    with run.times("checkpoint writing"):
        if args.submit:
            load_best_params(run.model, run.best_path)
        out = os.path.join(run.save_dir, "model")
        save_hf_checkpoint(run.model, run.text_encoder, out)
    cost = evaluate_lm(run.model, *run.data.splits["valid"][:2], args, run.runtime)
    tqdm.write(f"language model saved in {out} (fine-tune it with --model_path {out})")
    if args.analysis:
        print(f"LM Valid Perplexity: {np.exp(cost):.2f}")


def check_output_folders(args):
    """Make the folders the run writes to and write a file in each, before any work: a run must not
    train for hours and then fail on its log, checkpoint or submission folder."""
    folders = [args.log_dir, args.save_dir]
    if args.submit or args.analysis:
        folders.append(args.submission_dir)
    for folder in folders:
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise RunError(f"cannot write to the output folder {folder}: {err.strerror or err}") from None


def run_training(args, runtime, parser_defaults=None, t_start=None):
    """Set-up, resume, the epochs (each: updates, evaluation, checkpoint), prediction."""
    t_start = t_start or time.time()
    times = PhaseTimes(runtime)
    times.add("start-up", time.time() - t_start)
    if runtime.main:
        check_output_folders(args)
    run = set_up(args, runtime, times)
    ckpt = resume(run, parser_defaults or {}) if args.resume else None
    wrap_for_training(run)
    try:
        if runtime.main:
            start_log(run, ckpt)
        stopped = train_all(run)
        run.writer.wait()
    finally:
        if run.logger:
            run.logger.close()
        if runtime.world > 1:
            dist.barrier()
    if stopped:
        if runtime.main:
            tqdm.write(f"stopped after {run.progress.n_updates} updates; continue with --resume "
                       f"(checkpoint: {run.ckpt_path})")
        return 130
    if runtime.main and isinstance(run.data.task, LanguageModelTask):
        save_language_model(run)
    elif runtime.main and (args.submit or args.analysis):
        predict(run)
    if runtime.main:
        report_compile(run)
        tqdm.write(times.report(run.progress.n_updates))
        tqdm.write(f"done in {time.time() - t_start:.1f} s")
    return 0


def main(argv=None):
    t_start = time.time()
    parser_defaults = vars(build_parser().parse_args([]))
    args = parse_args(argv)
    runtime = None
    try:
        validate_args(args)
        if args.demo:
            prepare_demo(args)
        runtime = setup_runtime(args)
        return run_training(args, runtime, parser_defaults, t_start)
    except (RunError, DataError, VocabularyError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if runtime is not None and runtime.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
