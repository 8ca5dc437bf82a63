"""From encoded sequences to device batches: a split's examples kept ragged (`EncodedSplit`), each
batch's arrays X and M (docs/reference.md §2) laid out when it is drawn, the checks made once per
data set on the host, and each batch's BatchPlan, worked out on the host so that a forward pass
never waits for the device (docs/speed.md)."""

from dataclasses import dataclass, replace

import numpy as np
import torch

from ragged import Ragged

COMPILE_BUCKET = 8  # with --compile, sequence lengths are padded to a multiple of this


class BatchError(ValueError):
    """Encoded data that the model cannot take."""


def resolve_device(name=None):
    """The --device of a script as a torch.device this machine has (None: CUDA when present, else
    the CPU). A name torch cannot parse, or a CUDA device that is not there, raises ValueError with
    one line naming the flag, instead of torch's traceback deep inside the first copy."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1 ...)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s)"
                             + ("" if count else " (or this torch is built without CUDA)"))
    return device


def to_device(array, device, dtype=None):
    """A numpy array as a tensor on `device`: pinned and non-blocking for CUDA (no host stall)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if dtype is not None:
        t = t.to(dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def batch_width(longest, n_ctx, mode):
    """The positions of a batch whose longest sequence has `longest` tokens: all n_ctx with --plain
    ("plain"), that length rounded up to a multiple of COMPILE_BUCKET with --compile ("static"),
    that length itself by default ("trimmed"); never more than n_ctx."""
    if mode == "plain":
        return n_ctx
    multiple = COMPILE_BUCKET if mode == "static" else 1
    return min(-(-longest // multiple) * multiple, n_ctx)


@dataclass(frozen=True)
class EncodedSplit:
    """A split's examples kept as their token sequences (no padding, the positions implied) and
    labels: 4 bytes per token and 16 per sequence, where the padded arrays X and M of the whole split
    took 20 per position up to n_ctx. `batch` lays out the examples of one batch when it is drawn."""

    sequences: Ragged     # n_examples x n_sequences rows, example-major
    labels: np.ndarray    # int64 classes or float32 scores; zeros where the split has none
    n_sequences: int      # sequences per example: the choices axis of X
    n_ctx: int            # the data's width: the longest sequence of any split, at most --n_ctx
    n_token_rows: int     # n_vocab + n_special: position t is row n_token_rows + t of the embedding

    @staticmethod
    def from_padded(X, M, Y):
        """A split from padded arrays as the model takes them: X [n, n_sequences, T, 2] (position rows
        in X[..., 1]) and M, each sequence's real tokens first."""
        n, n_sequences, T, _ = X.shape
        keep = M.reshape(n * n_sequences, T) > 0
        lengths = keep.sum(axis=1)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        tokens = Ragged.from_offsets(X[..., 0].reshape(n * n_sequences, T)[keep], offsets)
        return EncodedSplit(tokens, np.asarray(Y), n_sequences, T, int(X[0, 0, 0, 1]))

    def __len__(self):
        return len(self.labels)

    def longest(self):
        """Each example's longest sequence, in tokens (evaluation sorts by it)."""
        return self.sequences.lengths.reshape(-1, self.n_sequences).max(axis=1)

    def head(self, n):
        """The first n examples, sharing this split's tokens."""
        n = min(n, len(self))
        return replace(self, sequences=self.sequences.take(np.arange(n * self.n_sequences)), labels=self.labels[:n])

    def batch(self, idx, mode="trimmed"):
        """X int64 [b, n_sequences, T, 2] (token ids, then position rows n_token_rows + t), M float32
        [b, n_sequences, T] (1 on real tokens) and the labels of the examples idx, zero-padded to T =
        `batch_width` of their longest sequence: the numbers the padded arrays of the whole split at
        width n_ctx gave, less the columns that are padding in every sequence of the batch."""
        idx = np.asarray(idx, dtype=np.int64)
        rows = (idx[:, None] * self.n_sequences + np.arange(self.n_sequences)).reshape(-1)
        lengths, starts = self.sequences.lengths[rows], self.sequences.starts[rows]
        T = batch_width(int(lengths.max(initial=0)), self.n_ctx, mode)
        positions = np.arange(T)
        keep = positions < lengths[:, None]
        X = np.zeros((len(rows), T, 2), dtype=np.int64)
        X[..., 0][keep] = self.sequences.ids[(starts[:, None] + positions)[keep]]
        X[..., 1] = self.n_token_rows + positions
        shape = (len(idx), self.n_sequences, T)
        return X.reshape(*shape, 2), keep.astype(np.float32).reshape(shape), self.labels[idx]


def first_classify_positions(tokens, clf_token, where="input"):
    """Position of the FIRST `clf_token` in each row of a host [N, T] id array; a clear error if
    a row has none (docs/reference.md §2)."""
    is_clf = tokens == clf_token
    _no_classify_token(where, np.flatnonzero(~is_clf.any(axis=1)), len(tokens), clf_token)
    return is_clf.argmax(axis=1)


def _no_classify_token(where, missing, n_sequences, clf_token):
    if missing.size:
        raise BatchError(f"{where}: {missing.size} of {n_sequences} sequences have no classify token (id "
                         f"{clf_token}); first ones (flattened index): {missing[:5].tolist()}. Every sequence "
                         "must end its input with `_classify_`.")


def check_split(name, split, vocab, clf_token):
    """Once per data set, on the host: token ids within the embedding, a `_classify_` in every
    sequence. The training loop then never checks on the device. (Each sequence's tokens come
    first and its padding after, by construction.)"""
    seqs = split.sequences
    if seqs.ids.size and (seqs.ids.min() < 0 or seqs.ids.max() >= vocab):
        raise BatchError(f"{name}: ids range over {seqs.ids.min()} ... {seqs.ids.max()} but the embedding has "
                         f"{vocab} rows")
    if clf_token is not None:
        seen = np.zeros(len(seqs.ids) + 1, dtype=np.int32)  # classify tokens before each id
        np.cumsum(seqs.ids == clf_token, out=seen[1:])
        missing = np.flatnonzero(seen[seqs.starts + seqs.lengths] == seen[seqs.starts])
        _no_classify_token(name, missing, len(seqs), clf_token)


class PaddingLayout:
    """Where the real tokens of a padded [N, T] batch are, to run position-wise layers on them alone.

    Exact for masks that are a prefix of ones per sequence (padding only after the real tokens):
    with causal attention no real token ever sees a padded one.
    """

    def __init__(self, n_seq, n_ctx, index):
        self.n_seq, self.n_ctx, self.index = n_seq, n_ctx, index

    @staticmethod
    def from_mask(mask, n_seq, n_ctx):
        """A layout from a device mask (it waits for the device), or None where skipping padding
        saves nothing or would not be exact."""
        keep = mask.reshape(n_seq, n_ctx) > 0
        if bool(keep.all()) or not bool((keep[:, 1:] <= keep[:, :-1]).all()):
            return None
        return PaddingLayout(n_seq, n_ctx, keep.reshape(-1).nonzero().squeeze(1))

    @staticmethod
    def from_host_mask(keep, device):
        """A layout from a host-side numpy boolean [N, T] prefix mask, without touching the device
        (None where nothing is padding)."""
        if keep.all():
            return None
        return PaddingLayout(*keep.shape, to_device(np.flatnonzero(keep), device))

    def pack(self, x):
        """[N, T, C] -> [n_real, C]"""
        return x.reshape(-1, x.size(-1)).index_select(0, self.index)

    def unpack(self, x):
        """[n_real, C] -> [N, T, C], zeros at the padding."""
        out = x.new_zeros(self.n_seq * self.n_ctx, x.size(-1)).index_copy(0, self.index, x)
        return out.view(self.n_seq, self.n_ctx, x.size(-1))


@dataclass
class BatchPlan:
    """Where the real tokens, the LM targets and the `_classify_` tokens of a padded batch are,
    worked out on the host from the ids and the mask. Build it with `BatchPlan.build`.

    layout: the real tokens (None: run every position). clf_rows: flat index n * T + position of
    each sequence's first `_classify_` (None: no task head). lm_rows, lm_targets, lm_weights,
    lm_seq, lm_count: the rows whose next token the LM loss scores, that token, its weight (None:
    1), the sequence of each row and the weight per sequence (lm_rows None: no LM loss).
    """

    n_seq: int
    n_ctx: int
    clf_rows: "torch.Tensor | None" = None
    layout: "PaddingLayout | None" = None
    lm_rows: "torch.Tensor | None" = None
    lm_targets: "torch.Tensor | None" = None
    lm_weights: "torch.Tensor | None" = None
    lm_seq: "torch.Tensor | None" = None
    lm_count: "torch.Tensor | None" = None

    @staticmethod
    def build(X, M, clf_token, device="cpu", skip_padding=True, lm=True):
        """From host arrays X [..., T, 2] and M [..., T]. skip_padding=True runs the real tokens
        only and scores the LM at the rows whose next token is real; False keeps every position
        and scores every row with its weight M[t+1], the TF code's computation (static shapes, for
        compiled graphs and --plain). lm=False: no LM loss (evaluation)."""
        T = X.shape[-2]
        tokens = X[..., 0].reshape(-1, T)
        keep = M.reshape(-1, T) > 0
        n_seq = tokens.shape[0]
        plan = BatchPlan(n_seq, T)
        if clf_token is not None:
            plan.clf_rows = to_device(np.arange(n_seq) * T + first_classify_positions(tokens, clf_token), device)
        if skip_padding:
            plan.layout = PaddingLayout.from_host_mask(keep, device)
        if lm:
            scored = keep[:, 1:] if skip_padding else np.ones_like(keep[:, 1:])
            seq, pos = np.nonzero(scored)
            plan.lm_rows = to_device(seq * T + pos, device)
            plan.lm_targets = to_device(tokens[:, 1:][scored], device, torch.long)
            plan.lm_seq = to_device(seq, device)
            plan.lm_count = to_device(keep[:, 1:].sum(1).astype(np.float32), device)
            if not skip_padding:
                plan.lm_weights = to_device(M.reshape(-1, T)[:, 1:][scored].astype(np.float32), device)
        return plan


@dataclass
class Batch:
    X: torch.Tensor
    M: torch.Tensor
    Y: "torch.Tensor | None"
    plan: BatchPlan


def make_batch(xmb, mmb, ymb, clf_token, device, mode="trimmed", lm=True):
    """A Batch on `device` with its plan. mode "trimmed" (the default): shared padding cut, real
    tokens only; "static" (--compile): lengths bucketed to a multiple of COMPILE_BUCKET and every
    position kept, so shapes repeat and graphs can be reused; "plain" (--plain): the whole padded
    batch and every position, the TF code's computation."""
    Y = None if ymb is None else to_device(ymb, device, torch.long if ymb.dtype.kind in "iu" else torch.float32)
    length = batch_width(int(mmb.sum(-1).max()), mmb.shape[-1], mode)  # the columns after it: padding everywhere
    xmb, mmb = xmb[..., :length, :], mmb[..., :length]
    plan = BatchPlan.build(xmb, mmb, clf_token, device, skip_padding=mode == "trimmed", lm=lm)
    return Batch(to_device(xmb, device), to_device(mmb, device), Y, plan)
