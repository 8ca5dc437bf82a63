"""From encoded sequences to device batches: the arrays X and M (docs/reference.md §2), the checks
made once per data set on the host, and each batch's BatchPlan, worked out on the host so that a
forward pass never waits for the device (docs/speed.md)."""

from dataclasses import dataclass

import numpy as np
import torch

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


def to_arrays(seqs, n_ctx, n_token_rows):
    """X int64 [n, n_sequences, n_ctx, 2] (token ids; position rows n_token_rows + t, where
    n_token_rows = n_vocab + n_special) and the mask M float32 [n, n_sequences, n_ctx], zero-padded."""
    if not seqs:
        raise ValueError("no examples")
    n_seq = len(seqs[0])
    X = np.zeros((len(seqs), n_seq, n_ctx, 2), dtype=np.int64)
    M = np.zeros((len(seqs), n_seq, n_ctx), dtype=np.float32)
    for i, example in enumerate(seqs):
        if len(example) != n_seq:
            raise ValueError(f"example {i} has {len(example)} sequences; example 0 has {n_seq}")
        for j, seq in enumerate(example):
            if len(seq) > n_ctx:
                raise ValueError(f"example {i}, sequence {j}: {len(seq)} tokens do not fit n_ctx={n_ctx}")
            X[i, j, :len(seq), 0] = seq
            M[i, j, :len(seq)] = 1
    X[..., 1] = n_token_rows + np.arange(n_ctx)
    return X, M


def first_classify_positions(tokens, clf_token, where="input"):
    """Position of the FIRST `clf_token` in each row of a host [N, T] id array; a clear error if
    a row has none (docs/reference.md §2)."""
    is_clf = tokens == clf_token
    missing = np.flatnonzero(~is_clf.any(axis=1))
    if missing.size:
        raise BatchError(f"{where}: {missing.size} of {len(tokens)} sequences have no classify token (id "
                         f"{clf_token}); first ones (flattened index): {missing[:5].tolist()}. Every sequence "
                         "must end its input with `_classify_`.")
    return is_clf.argmax(axis=1)


def check_split(name, X, M, vocab, clf_token):
    """Once per data set, on the host: ids within the embedding, a `_classify_` in every sequence,
    masks that are a prefix of ones. The training loop then never checks on the device."""
    if X.size and (X.min() < 0 or X.max() >= vocab):
        raise BatchError(f"{name}: ids range over {X.min()} ... {X.max()} but the embedding has {vocab} rows")
    if clf_token is not None:
        first_classify_positions(X[..., 0].reshape(-1, X.shape[-2]), clf_token, where=name)
    keep = M.reshape(-1, M.shape[-1]) > 0
    if (keep[:, 1:] > keep[:, :-1]).any():
        raise BatchError(f"{name}: a mask has padding before real tokens; padding must come last")


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


def shared_length(M, multiple=1):
    """The batch's longest sequence, rounded up to a multiple of `multiple` (at most the full width):
    the columns after it are padding in every sequence."""
    length = int(M.sum(-1).max())
    return min(-(-length // multiple) * multiple, M.shape[-1])


def make_batch(xmb, mmb, ymb, clf_token, device, mode="trimmed", lm=True):
    """A Batch on `device` with its plan. mode "trimmed" (the default): shared padding cut, real
    tokens only; "static" (--compile): lengths bucketed to a multiple of COMPILE_BUCKET and every
    position kept, so shapes repeat and graphs can be reused; "plain" (--plain): the whole padded
    batch and every position, the TF code's computation."""
    Y = None if ymb is None else to_device(ymb, device, torch.long if ymb.dtype.kind in "iu" else torch.float32)
    if mode != "plain":
        length = shared_length(mmb, COMPILE_BUCKET if mode == "static" else 1)
        xmb, mmb = xmb[..., :length, :], mmb[..., :length]
    plan = BatchPlan.build(xmb, mmb, clf_token, device, skip_padding=mode == "trimmed", lm=lm)
    return Batch(to_device(xmb, device), to_device(mmb, device), Y, plan)
