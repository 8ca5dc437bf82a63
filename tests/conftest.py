"""Shared test fixtures: tiny configs, random weights in OpenAI's shard format, the real vocabulary."""

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from model_pytorch import GPTConfig, TransformerModel
from weights import load_openai_pretrained_model, random_openai_arrays, write_hf_weights, write_openai_weights

# One CPU thread count for the whole session and the processes it starts: train.py's default follows
# the machine's load, and runs compared bit for bit must sum their floats with the same threads.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

ROOT = Path(__file__).resolve().parents[1]
OPENAI_GPT = ROOT / "model"  # OpenAI's BPE vocabulary is shipped here (model/README.md)
TEST_DATA = ROOT / "tests" / "data"

TINY = dict(n_vocab=60, n_ctx=16, n_embd=32, n_layer=2)
TINY_HEADS = 4


def tiny_config(**overrides):
    return GPTConfig(n_embd=TINY["n_embd"], n_head=TINY_HEADS, n_layer=TINY["n_layer"], **overrides)


@pytest.fixture
def tiny_arrays():
    return random_openai_arrays(**TINY, seed=1)


@pytest.fixture
def tiny_openai_dir(tmp_path, tiny_arrays):
    path = tmp_path / "openai"
    write_openai_weights(path, tiny_arrays)
    return path


@pytest.fixture
def tiny_hf_dir(tmp_path, tiny_arrays):
    path = tmp_path / "hf"
    write_hf_weights(path, tiny_arrays, TINY_HEADS)
    return path


@pytest.fixture(scope="session")
def roc_files(tmp_path_factory):
    """A small ROCStories folder (120 labelled + 40 test synthetic stories), a vocabulary learned from
    its training split and tiny random weights (32 wide, 2 layers, 96 positions)."""
    from datasets import rocstories
    from synthetic import write_synthetic_rocstories
    from text_utils import learn_bpe

    base = tmp_path_factory.mktemp("roc")
    data = write_synthetic_rocstories(base / "data", n_val=120, n_test=40, seed=5)
    train_split = rocstories(data, n_valid=40)[0]
    encoder = learn_bpe(list(train_split[0]) + list(train_split[1]), str(base / "model" / "encoder.json"),
                        str(base / "model" / "vocab.bpe"), vocab_size=300, min_frequency=1)
    write_openai_weights(base / "model", n_vocab=len(encoder.encoder), n_ctx=96, n_embd=32, n_layer=2, seed=1)
    return base


class TaskFolders(dict):
    """name -> (the task's synthetic folder in its real layout, a folder with a vocabulary learned from its
    training texts and tiny random weights: 32 wide, 2 layers, 128 positions), each made when first asked."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def __missing__(self, name):
        from synthetic import write_synthetic
        from tasks import get_task
        from text_utils import learn_bpe

        data = write_synthetic(name, str(self.base / name / "data"), 160, 48, 24, seed=1)
        texts = [t for field in get_task(name).configured(n_valid=48).read(data)["train"].texts for t in field]
        model = self.base / name / "model"
        encoder = learn_bpe(texts, str(model / "encoder.json"), str(model / "vocab.bpe"), vocab_size=300,
                            min_frequency=1)
        write_openai_weights(model, n_vocab=len(encoder.encoder), n_ctx=128, n_embd=32, n_layer=2, seed=1)
        self[name] = (data, model)
        return self[name]


@pytest.fixture(scope="session")
def task_folders(tmp_path_factory):
    """Every task's folders for end-to-end runs (`TaskFolders`)."""
    return TaskFolders(tmp_path_factory.mktemp("tasks"))


def task_arguments(task_folders, name, out, *extra):
    """train.py's flags for a tiny fine-tune of task `name` on `task_folders`, writing under `out`."""
    data, model = task_folders[name]
    return ["--dataset", name, "--data_dir", data, "--model_path", str(model), "--encoder_path",
            str(model / "encoder.json"), "--bpe_path", str(model / "vocab.bpe"), "--log_dir", str(out / "log"),
            "--save_dir", str(out / "save"), "--submission_dir", str(out / "sub"), "--desc", "run",
            "--n_embd", "32", "--n_head", "4", "--n_layer", "2", "--n_transfer", "2", "--n_batch", "4",
            "--n_gpu", "4", "--n_valid", "48", "--n_iter", "3", "--lr", "2e-3", "--lr_warmup", "0.1",
            "--n_ctx", "128", *extra]


GLUE_TASKS = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]


@pytest.fixture(scope="session")
def glue_runs(task_folders, tmp_path_factory):
    """Every GLUE task of the paper fine-tuned for one epoch with --submit, all predictions in one folder as
    a GLUE submission gathers them: (that folder, {task: the run's save folder})."""
    import train

    base = tmp_path_factory.mktemp("glue")
    runs = {}
    for name in GLUE_TASKS:
        argv = task_arguments(task_folders, name, base / name, "--submit", "--n_iter", "1",
                              "--submission_dir", str(base / "submission"))
        assert train.main(argv) == 0, name
        runs[name] = base / name / "save" / "run"
    return base / "submission", runs


@pytest.fixture(scope="session")
def full_size_weights(tmp_path_factory):
    """Random weights at the real shapes: (arrays, OpenAI shard folder, Hugging Face folder)."""
    arrays = random_openai_arrays(seed=7)
    base = tmp_path_factory.mktemp("full")
    write_openai_weights(base / "model", arrays)
    write_hf_weights(base / "hf", arrays, n_head=12)
    return arrays, base / "model", base / "hf"


N_SPECIAL = 3


def openai_order(n_vocab, n_ctx, n_embd, n_layer):
    """(name, shape) of each array in OpenAI's shards, in params_shapes.json order.

    Written out here from the released file, independently of the loader's own lists, so that a
    consistent mistake in those lists cannot pass. Names are the TF variables' (`h0/attn/c_attn/w`).
    """
    e = n_embd
    layer = [
        ("attn/c_attn/w", (1, e, 3 * e)), ("attn/c_attn/b", (3 * e,)),
        ("attn/c_proj/w", (1, e, e)), ("attn/c_proj/b", (e,)),
        ("ln_1/g", (e,)), ("ln_1/b", (e,)),
        ("mlp/c_fc/w", (1, e, 4 * e)), ("mlp/c_fc/b", (4 * e,)),
        ("mlp/c_proj/w", (1, 4 * e, e)), ("mlp/c_proj/b", (e,)),
        ("ln_2/g", (e,)), ("ln_2/b", (e,)),
    ]
    per_layer = [(f"h{i}/{name}", shape) for i in range(n_layer) for name, shape in layer]
    return [("positions", (n_ctx, e)), ("tokens", (n_vocab, e))] + per_layer


def our_name(tf_name):
    """Our parameter for a TF variable: `h0/attn/c_attn/w` -> `h.0.attn.c_attn.w`."""
    return re.sub(r"^h(\d+)/", r"h.\1.", tf_name).replace("/", ".")


def hf_name(tf_name):
    """The Hugging Face tensor for a TF variable: same module path, w/g -> weight, b -> bias."""
    path, leaf = our_name(tf_name).rsplit(".", 1)
    return f"{path}.{ {'w': 'weight', 'g': 'weight', 'b': 'bias'}[leaf] }"


def labelled_arrays(order, seed=0):
    """Array k holds 100 k + noise: distinct, and a misplaced one tells where it came from."""
    rng = np.random.default_rng(seed)
    return [(100 * k + rng.standard_normal(shape)).astype(np.float32) for k, (_, shape) in enumerate(order)]


def label(t):
    return round(float(np.asarray(t).mean()) / 100)


def write_hf_checkpoint(path, arrays, n_head):
    """OpenAI-order arrays as a Hugging Face checkpoint, named by `hf_name`, with transformers' own config."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    n_ctx, n_embd = arrays[0].shape
    n_layer = (len(arrays) - 2) // 12
    order = openai_order(arrays[1].shape[0], n_ctx, n_embd, n_layer)
    names = {"tokens": "tokens_embed.weight", "positions": "positions_embed.weight"}
    state = {names.get(tf) or hf_name(tf): torch.from_numpy(a.reshape(a.shape[1:]) if a.ndim == 3 else a)
             for (tf, _), a in zip(order, arrays)}
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"))
    config = transformers.OpenAIGPTConfig(vocab_size=arrays[1].shape[0], n_positions=n_ctx, n_embd=n_embd,
                                          n_layer=n_layer, n_head=n_head, afn="gelu")
    config.to_json_file(os.path.join(path, "config.json"))
    return path


def tiny_model(n_special=N_SPECIAL, cls=TransformerModel, **cfg):
    vocab = TINY["n_vocab"] + n_special + TINY["n_ctx"]
    if cls is TransformerModel:
        return TransformerModel(tiny_config(**cfg), vocab=vocab, n_ctx=TINY["n_ctx"])
    return cls(tiny_config(**cfg), TINY["n_vocab"] + 2, "multiple_choice", vocab=vocab, n_ctx=TINY["n_ctx"])


def load_tiny(model, path, **kw):
    kw.setdefault("n_transfer", TINY["n_layer"])
    return load_openai_pretrained_model(model, n_embd=TINY["n_embd"], path=str(path), **kw)


def log_softmax(row):
    row = np.asarray(row, np.float64)
    return row - row.max() - math.log(np.exp(row - row.max()).sum())


def tf_lm_losses(h, we, X, M):
    """docs/reference.md §2 in float64: per sequence, sum_t M[t+1] CE(h_t weᵀ, x_{t+1}) / sum_t M[t+1]."""
    h, we = np.asarray(h, np.float64), np.asarray(we, np.float64)
    tokens, mask = X[..., 0].reshape(-1, X.shape[-2]), M.reshape(-1, M.shape[-1])
    out = []
    for s in range(tokens.shape[0]):
        terms = [-log_softmax(h[s, t] @ we.T)[tokens[s, t + 1]] * mask[s, t + 1] for t in range(tokens.shape[1] - 1)]
        out.append(sum(terms) / mask[s, 1:].sum())
    return np.array(out)


def make_inputs(n_vocab, n_special, n_ctx, shape, seed=0, high=None):
    """X of shape shape + (T, 2): random token ids and the position rows of docs/reference.md §2."""
    g = torch.Generator().manual_seed(seed)
    *lead, T = shape
    tokens = torch.randint(0, high or n_vocab, (*lead, T), generator=g)
    positions = n_vocab + n_special + torch.arange(T).expand(*lead, T)
    return torch.stack([tokens, positions], dim=-1)


def sequences_of(task, texts, specials, max_tokens):
    """task.sequences of texts given as lists (one list of id lists per text field), as lists: per
    example, per sequence, the ids; and the number of examples cut."""
    from ragged import Ragged

    seqs, n_cut = task.sequences([Ragged.from_lists(field) for field in texts], specials, max_tokens)
    rows, n = seqs.tolist(), task.n_sequences
    return [rows[i:i + n] for i in range(0, len(rows), n)], n_cut


def reference_sequences(task, texts, specials, max_tokens):
    """Figure 1 and the cut rule example by example, written out as docs/tasks.md states them (the
    data path's code before it was vectorized): (per example, per sequence, the ids; examples cut)."""
    from tasks import fit_lengths

    s, form, out, n_cut = specials, task.form, [], 0
    if task.name == "rocstories":  # the original's own cut: each part to max_tokens // 2 - 2
        n = max_tokens // 2 - 2
        for story, *endings in zip(*texts):
            n_cut += max(len(story), *map(len, endings)) > n
            out.append([[s.start, *story[:n], s.delimiter, *e[:n], s.clf_token] for e in endings])
        return out, n_cut
    n_alternatives = task.n_choices if form == "choices" else 0
    for example in zip(*texts):
        lengths = [len(t) for t in example]
        kept = fit_lengths(lengths, n_alternatives, max_tokens - (2 if form == "text" else 3))
        n_cut += kept != lengths
        t = [f[:k] for f, k in zip(example, kept)]
        if form == "text":
            out.append([[s.start, *t[0], s.clf_token]])
        elif form == "pair":
            out.append([[s.start, *t[0], s.delimiter, *t[1], s.clf_token]])
        elif form == "both_orders":
            out.append([[s.start, *t[0], s.delimiter, *t[1], s.clf_token],
                        [s.start, *t[1], s.delimiter, *t[0], s.clf_token]])
        else:
            context = [i for f in t[:-task.n_choices] for i in f]
            out.append([[s.start, *context, s.delimiter, *a, s.clf_token] for a in t[-task.n_choices:]])
    return out, n_cut


def padded_arrays(seqs, n_ctx, n_token_rows):
    """A whole split as padded arrays, as the data path kept it before it kept sequences ragged:
    X int64 [n, n_sequences, n_ctx, 2] (token ids, then position rows n_token_rows + t), M float32
    [n, n_sequences, n_ctx] (1 on real tokens)."""
    X = np.zeros((len(seqs), len(seqs[0]), n_ctx, 2), dtype=np.int64)
    M = np.zeros((len(seqs), len(seqs[0]), n_ctx), dtype=np.float32)
    for i, example in enumerate(seqs):
        for j, seq in enumerate(example):
            X[i, j, :len(seq), 0] = seq
            M[i, j, :len(seq)] = 1
    X[..., 1] = n_token_rows + np.arange(n_ctx)
    return X, M


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


class SyncCounter:
    """Counts the tensor calls that make the host wait for the device on a GPU (item, bool, int,
    float, tolist, cpu, numpy, nonzero, boolean-mask indexing), while `active`. On a CPU they cost
    nothing, but where they happen is the same: this is how GPU stalls are found without a GPU."""

    NAMES = ("item", "__bool__", "__int__", "__float__", "tolist", "cpu", "numpy", "nonzero")

    def __init__(self, monkeypatch):
        self.active, self.calls = False, []
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name), name))
        monkeypatch.setattr(torch, "nonzero", self._counted(torch.nonzero, "torch.nonzero"))
        getitem = torch.Tensor.__getitem__

        def counted_getitem(tensor, index):
            parts = index if isinstance(index, tuple) else (index,)
            if self.active and any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                self.calls.append("boolean indexing")
            return getitem(tensor, index)

        monkeypatch.setattr(torch.Tensor, "__getitem__", counted_getitem)

    def _counted(self, method, name):
        def counted(*args, **kwargs):
            if self.active:
                self.calls.append(name)
            return method(*args, **kwargs)
        return counted

    def wrap(self, owner, name, monkeypatch):
        """Count inside every call of owner.name."""
        method = getattr(owner, name)

        def counting(*args, **kwargs):
            outer, self.active = self.active, True
            try:
                return method(*args, **kwargs)
            finally:
                self.active = outer
        monkeypatch.setattr(owner, name, counting)


@pytest.fixture
def sync_counter(monkeypatch):
    return SyncCounter(monkeypatch)


def flip_bit(path, offset, bit=0):
    """Flip one bit of the file at `path` in place (offset < 0: from the end)."""
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        position = f.tell()
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ (1 << bit)]))
