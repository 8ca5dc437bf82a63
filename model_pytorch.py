"""GPT-1 in PyTorch, faithful to OpenAI's TensorFlow `finetune-transformer-lm` (docs/reference.md §1-2).

Module and parameter names follow the TF variables (`h.0.attn.c_attn.w`, `ln_1.g`, ...) and the
state-dict keys of the earlier PyTorch port, so its checkpoints load. The section of
docs/reference.md each part implements is named in its docstring; docs/speed.md says why the
speed-ups (PaddingLayout, LMHead's mask) leave the results unchanged.
"""

import json
import math
import os
from argparse import Namespace
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

N_VOCAB = 40478  # rows of OpenAI's token table
N_SHARDS = 10  # OpenAI's weights come as params_0.npy ... params_9.npy
WEIGHTS_HINT = (
    "Get the weights from the `model/` folder of openai/finetune-transformer-lm (params_shapes.json "
    "and params_0.npy ... params_9.npy) or the Hugging Face `openai-gpt` checkpoint (config.json and "
    "model.safetensors); see model/README.md."
)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

@dataclass
class GPTConfig:
    """Network hyper-parameters (the TF code's model flags)."""

    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    clf_pdrop: float = 0.1
    afn: str = "gelu"
    fused_attention: bool = True  # scaled_dot_product_attention; False: the explicit form (docs/reference.md §2)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.afn not in ACT_FNS:
            raise ValueError(f"unknown activation afn={self.afn!r}; expected one of {sorted(ACT_FNS)}")


def make_config(cfg=None) -> GPTConfig:
    """A GPTConfig from a GPTConfig, an argparse Namespace or a dict; None values keep the default.

    A Namespace holds a script's other flags too, so its unknown fields are ignored; in a dict an
    unknown key is a typo (`n_layers`) that would silently build the default model, so it is refused.
    """
    if cfg is None:
        return GPTConfig()
    if isinstance(cfg, GPTConfig):
        return cfg
    known = [f.name for f in fields(GPTConfig)]
    if isinstance(cfg, Namespace):
        cfg = {k: v for k, v in vars(cfg).items() if k in known}
    if not isinstance(cfg, Mapping):
        raise TypeError(f"config must be a GPTConfig, argparse.Namespace or dict, got {type(cfg).__name__}")
    unknown = sorted(str(k) for k in cfg if k not in known)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(map(repr, unknown))}; GPTConfig's fields are "
                         f"{', '.join(known)}")
    return GPTConfig(**{k: v for k, v in cfg.items() if v is not None})


def gelu(x):
    """The tanh form of GELU used by the TF code, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),
    as PyTorch's fused kernel: one pass forward and one backward instead of eight and about fifteen
    (docs/speed.md); equal to the formula written out to rounding (tests)."""
    return F.gelu(x, approximate="tanh")


def swish(x):
    return x * torch.sigmoid(x)


ACT_FNS = {"gelu": gelu, "relu": F.relu, "swish": swish}

DEFAULT_CONFIG = GPTConfig()


# ---------------------------------------------------------------------------------------------
# The network (docs/reference.md §2)
# ---------------------------------------------------------------------------------------------

class LayerNorm(nn.Module):
    """TF's norm: mean and biased variance over the last axis, eps inside the square root."""

    def __init__(self, n_state, e=1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.ones(n_state))
        self.b = nn.Parameter(torch.zeros(n_state))
        self.e = e

    def forward(self, x):
        return F.layer_norm(x, self.g.shape, self.g, self.b, self.e)


class Conv1D(nn.Module):
    """TF's conv1d with rf=1: a matmul with w of shape (nx, nf) (the (1, nx, nf) array squeezed)."""

    def __init__(self, nf, rf, nx):
        super().__init__()
        if rf != 1:
            raise NotImplementedError("only rf=1 is used by GPT-1")
        self.nf = nf
        self.w = nn.Parameter(torch.empty(nx, nf).normal_(std=0.02))
        self.b = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        out = torch.addmm(self.b, x.reshape(-1, x.size(-1)), self.w)
        return out.view(*x.shape[:-1], self.nf)


def explicit_causal_attention(q, k, v, attn_dropout):
    """docs/reference.md §2 written out: q·k/sqrt(d), w*b - 1e9*(1-b), softmax, dropout, ·v."""
    w = q @ k.transpose(-2, -1) / math.sqrt(v.size(-1))
    n = w.size(-1)
    b = torch.tril(torch.ones(n, n, dtype=w.dtype, device=w.device))
    w = w * b - 1e9 * (1 - b)
    return attn_dropout(F.softmax(w, dim=-1)) @ v


class Attention(nn.Module):
    def __init__(self, nx, n_ctx, cfg, scale=True):
        super().__init__()
        if not scale:
            raise NotImplementedError("GPT-1 always scales attention by 1/sqrt(head_dim)")
        self.n_head = cfg.n_head
        self.n_embd = nx
        self.fused = cfg.fused_attention
        self.attn_pdrop = cfg.attn_pdrop
        self.c_attn = Conv1D(nx * 3, 1, nx)
        self.c_proj = Conv1D(nx, 1, nx)
        self.attn_dropout = nn.Dropout(cfg.attn_pdrop)
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The earlier port stored its causal mask as buffer `b`; ours is built on the fly.
        state_dict.pop(prefix + "b", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x, layout=None):
        qkv = self.c_attn(x)
        if layout is not None:  # x holds the real tokens only: lay them out as sequences again
            qkv = layout.unpack(qkv)
        B, T, _ = qkv.shape
        C = self.n_embd
        q, k, v = qkv.split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.fused:
            p = self.attn_pdrop if self.training else 0.0
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            a = explicit_causal_attention(q, k, v, self.attn_dropout)
        a = a.transpose(1, 2).reshape(B, T, C)
        if layout is not None:
            a = layout.pack(a)
        return self.resid_dropout(self.c_proj(a))


class MLP(nn.Module):
    def __init__(self, n_state, cfg):
        super().__init__()
        nx = cfg.n_embd
        self.c_fc = Conv1D(n_state, 1, nx)
        self.c_proj = Conv1D(nx, 1, n_state)
        self.act = ACT_FNS[cfg.afn]
        self.dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Post-norm block: n = LN(x + attn(x)); h = LN(n + mlp(n))."""

    def __init__(self, n_ctx, cfg, scale=True):
        super().__init__()
        nx = cfg.n_embd
        self.attn = Attention(nx, n_ctx, cfg, scale)
        self.ln_1 = LayerNorm(nx)
        self.mlp = MLP(4 * nx, cfg)
        self.ln_2 = LayerNorm(nx)

    def forward(self, x, layout=None):
        n = self.ln_1(x + self.attn(x, layout))
        return self.ln_2(n + self.mlp(n))


class PaddingLayout:
    """Where the real tokens of a padded [N, T] batch are, to run position-wise layers on them alone.

    Exact for masks that are a prefix of ones per sequence (padding only after the real tokens):
    with causal attention no real token ever sees a padded one.
    """

    def __init__(self, keep):
        self.n_seq, self.n_ctx = keep.shape
        self.index = keep.reshape(-1).nonzero().squeeze(1)

    @staticmethod
    def from_mask(mask, n_seq, n_ctx):
        """A layout, or None where skipping padding saves nothing or would not be exact."""
        keep = mask.reshape(n_seq, n_ctx) > 0
        if bool(keep.all()) or not bool((keep[:, 1:] <= keep[:, :-1]).all()):
            return None
        return PaddingLayout(keep)

    @staticmethod
    def from_host_mask(keep, device):
        """A layout from a host-side numpy boolean [N, T] prefix mask, without touching the device
        (None where nothing is padding)."""
        if keep.all():
            return None
        layout = PaddingLayout.__new__(PaddingLayout)
        layout.n_seq, layout.n_ctx = keep.shape
        layout.index = to_device(np.flatnonzero(keep), device)
        return layout

    def pack(self, x):
        """[N, T, C] -> [n_real, C]"""
        return x.reshape(-1, x.size(-1)).index_select(0, self.index)

    def unpack(self, x):
        """[n_real, C] -> [N, T, C], zeros at the padding."""
        out = x.new_zeros(self.n_seq * self.n_ctx, x.size(-1)).index_copy(0, self.index, x)
        return out.view(self.n_seq, self.n_ctx, x.size(-1))


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


def first_classify_positions(tokens, clf_token, where="input"):
    """Position of the FIRST `clf_token` in each row of a host [N, T] id array; a clear error if
    a row has none (docs/reference.md §2)."""
    is_clf = tokens == clf_token
    missing = np.flatnonzero(~is_clf.any(axis=1))
    if missing.size:
        raise ValueError(f"{where}: {missing.size} of {len(tokens)} sequences have no classify token (id "
                         f"{clf_token}); first ones (flattened index): {missing[:5].tolist()}. Every sequence "
                         "must end its input with `_classify_`.")
    return is_clf.argmax(axis=1)


@dataclass
class BatchPlan:
    """Where the real tokens, the LM targets and the `_classify_` tokens of a padded batch are,
    worked out on the host from the ids and the mask, so that a forward pass never waits for the
    device (docs/speed.md). Build it with `BatchPlan.build`; the model then skips its own checks.

    layout: the real tokens (None: run every position). clf_rows: flat index n * T + position of
    each sequence's first `_classify_`. lm_rows, lm_targets, lm_seq, lm_count: the positions whose
    next token is real, that token, the sequence of each row and the count per sequence (None:
    LM logits over every position, as the TF code).
    """

    n_seq: int
    n_ctx: int
    clf_rows: "torch.Tensor | None"
    layout: "PaddingLayout | None" = None
    lm_rows: "torch.Tensor | None" = None
    lm_targets: "torch.Tensor | None" = None
    lm_seq: "torch.Tensor | None" = None
    lm_count: "torch.Tensor | None" = None

    @staticmethod
    def build(X, M, clf_token, device="cpu", skip_padding=True, lm=True):
        """From host arrays X [..., T, 2] and M [..., T]. skip_padding=False keeps every position
        and the LM over all of them (static shapes, for compiled graphs)."""
        T = X.shape[-2]
        tokens = X[..., 0].reshape(-1, T)
        keep = M.reshape(-1, T) > 0
        n_seq = tokens.shape[0]
        clf_rows = None  # a language model alone (clf_token None) pools nothing
        if clf_token is not None:
            clf_rows = to_device(np.arange(n_seq) * T + first_classify_positions(tokens, clf_token), device)
        plan = BatchPlan(n_seq, T, clf_rows)
        if skip_padding:
            plan.layout = PaddingLayout.from_host_mask(keep, device)
            if lm:
                predicted = keep[:, 1:]
                seq, pos = np.nonzero(predicted)
                plan.lm_rows = to_device(seq * T + pos, device)
                plan.lm_targets = to_device(tokens[:, 1:][predicted], device, torch.long)
                plan.lm_seq = to_device(seq, device)
                plan.lm_count = to_device(predicted.sum(1).astype(np.float32), device)
        return plan


class TransformerModel(nn.Module):
    """The GPT-1 body. One embedding matrix `we` holds token, special and position rows (docs/reference.md §1).

    Input x: ids of shape [..., T, 2], [..., 0] the token and [..., 1] the position row.
    Returns hidden states of shape [N, T, n_embd] with N the product of the leading axes.
    With `mask` (M, [..., T], ones on real tokens, padding after them) the position-wise layers
    skip the padding; hidden states there are then 0, those of real tokens are unchanged.
    """

    def __init__(self, cfg=DEFAULT_CONFIG, vocab=40990, n_ctx=512):
        super().__init__()
        cfg = make_config(cfg)
        self.cfg = cfg
        self.vocab = vocab
        self.n_ctx = n_ctx
        self.embed = nn.Embedding(vocab, cfg.n_embd)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.h = nn.ModuleList([Block(n_ctx, cfg, scale=True) for _ in range(cfg.n_layer)])

    def embedding_matrix(self):
        """`we` with embedding dropout applied to the whole matrix, one mask per call (docs/reference.md §2).

        The same dropped matrix must serve the input look-up and the tied LM head.
        """
        return self.drop(self.embed.weight)

    def forward(self, x, we=None, mask=None, plan=None):
        """With a `plan` (BatchPlan, built and checked on the host) nothing here waits for the device;
        without one, the ids are checked here (one device sync) and `mask` gives the layout."""
        if we is None:
            we = self.embedding_matrix()
        x = x.reshape(-1, x.size(-2), x.size(-1))
        if x.size(1) > self.n_ctx:
            raise ValueError(f"input has {x.size(1)} positions but the model was built with n_ctx={self.n_ctx}")
        if plan is not None:
            layout = plan.layout
        else:
            self.check_ids(x, we.size(0))
            layout = None if mask is None else PaddingLayout.from_mask(mask, x.size(0), x.size(1))
        if layout is not None:
            x = x.reshape(-1, 2).index_select(0, layout.index)
        h = F.embedding(x[..., 0], we) + F.embedding(x[..., 1], we)
        for block in self.h:
            h = block(h, layout)
        return h if layout is None else layout.unpack(h)

    @staticmethod
    def check_ids(x, rows):
        """Every id indexes a row of the embedding (one pass, one device sync)."""
        if not x.numel():
            return
        low, high = (int(v) for v in torch.aminmax(x))
        if low < 0 or high >= rows:
            raise ValueError(f"input ids range over {low} ... {high} but the embedding has {rows} rows "
                             "(vocab = n_vocab + n_special + n_ctx)")


class LMHead(nn.Module):
    """Language-model logits from the (tied, dropped) embedding matrix over all its rows.

    With `mask` (the [..., T] mask M), logits are computed only at the positions t whose target
    t+1 is real (M[..., 1:] = 1), as a [n_selected, vocab] matrix: padding costs nothing.
    """

    def __init__(self, model, cfg=None, trunc_and_reshape=True):
        super().__init__()
        self.n_embd = model.embed.weight.size(1)
        self.decoder = nn.Linear(self.n_embd, model.embed.weight.size(0), bias=False)
        self.decoder.weight = model.embed.weight  # tied
        self.trunc_and_reshape = trunc_and_reshape

    def forward(self, h, we=None, mask=None, plan=None):
        weight = self.decoder.weight if we is None else we
        if plan is not None and plan.lm_rows is not None:
            h = h.reshape(-1, h.size(-1)).index_select(0, plan.lm_rows)
        elif mask is not None:
            keep = mask.reshape(-1, mask.size(-1))[:, 1:].bool()
            h = h[:, :-1][keep]
        elif self.trunc_and_reshape:
            h = h[:, :-1].reshape(-1, self.n_embd)
        return F.linear(h, weight)

    def losses(self, h, we, plan):
        """Cross-entropy of the next token at each of the plan's LM rows ([n_selected], float32),
        without handing the logits out (`lm_head_losses`)."""
        if plan is None or plan.lm_rows is None:
            raise ValueError("LM losses need a BatchPlan that selects the LM rows (BatchPlan.build(..., lm=True))")
        rows = h.reshape(-1, h.size(-1)).index_select(0, plan.lm_rows)
        return lm_head_losses(rows, we, plan.lm_targets)


LOGIT_ROW_ALIGNMENT = 16  # float32 elements: rows of the logits start on 64-byte boundaries


def lm_head_losses(h, we, targets):
    """F.cross_entropy(h @ we.T, targets, reduction="none") in fewer passes over the logits.

    The [rows, vocab] logits are the largest tensors of a training step. Here they live in one
    buffer whose rows start on 64-byte boundaries (with a vocabulary of 40,558 rows they would not,
    and the three matrix products run slower on a CPU), and the backward turns that same buffer into
    the gradient (softmax - one-hot) in place, with no log-softmax copy and no zero-filled gradient
    of the logits (docs/speed.md). Under autocast it is the plain computation."""
    if torch.is_autocast_enabled(h.device.type):
        return F.cross_entropy(F.linear(h, we).float(), targets, reduction="none")
    return _LMHeadLosses.apply(h, we, targets)


class _LMHeadLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, we, targets):
        n_rows, n_vocab = h.size(0), we.size(0)
        stride = -(-n_vocab // LOGIT_ROW_ALIGNMENT) * LOGIT_ROW_ALIGNMENT
        logits = h.new_empty(n_rows, stride)[:, :n_vocab]
        torch.mm(h, we.t(), out=logits)
        log_norm = torch.logsumexp(logits, dim=1)
        losses = log_norm - logits.gather(1, targets.unsqueeze(1)).squeeze(1)
        ctx.save_for_backward(h, we, targets, logits, log_norm)
        ctx.spent = False
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if ctx.spent:  # the backward reuses the logits' memory for their gradient
            raise RuntimeError("lm_head_losses: backward through the same graph twice is not supported")
        ctx.spent = True
        h, we, targets, logits, log_norm = ctx.saved_tensors
        grad_logits = logits.sub_(log_norm.unsqueeze(1)).exp_().mul_(grad.unsqueeze(1))  # softmax * grad
        grad_logits.scatter_add_(1, targets.unsqueeze(1), -grad.unsqueeze(1))  # minus the one-hot
        grad_h = grad_logits @ we if ctx.needs_input_grad[0] else None
        grad_we = grad_logits.t() @ h if ctx.needs_input_grad[1] else None
        return grad_h, grad_we, None


def pool_classify_states(h, x, clf_token, plan=None):
    """Hidden state at the FIRST `clf_token` of each sequence, shape [N, n_embd] (docs/reference.md §2).

    With a `plan` the positions come from the host (no device sync)."""
    if plan is not None:
        return h.reshape(-1, h.size(-1)).index_select(0, plan.clf_rows)
    tokens = x[..., 0].reshape(-1, x.size(-2))
    is_clf = tokens == clf_token
    has_clf = is_clf.any(dim=1)
    if not bool(has_clf.all()):
        missing = torch.nonzero(~has_clf).flatten()[:5].tolist()
        raise ValueError(
            f"{int((~has_clf).sum())} of {tokens.size(0)} sequences have no classify token (id {clf_token}); "
            f"first ones (flattened index): {missing}. Every sequence must end its input with `_classify_`."
        )
    first = is_clf.to(torch.uint8).argmax(dim=1)  # argmax returns the first maximal index
    return h[torch.arange(h.size(0), device=h.device), first]


def _init_linear(linear):
    nn.init.normal_(linear.weight, std=0.02)
    nn.init.zeros_(linear.bias)


class MultipleChoiceHead(nn.Module):
    """One logit per choice; classifier dropout uses one mask per example, shared by its choices."""

    def __init__(self, clf_token, cfg):
        super().__init__()
        cfg = make_config(cfg)
        self.clf_token = clf_token
        self.clf_pdrop = cfg.clf_pdrop
        self.linear = nn.Linear(cfg.n_embd, 1)
        _init_linear(self.linear)

    def forward(self, h, x, plan=None):
        n_examples, n_choices = x.size(0), x.size(1)
        clf_h = pool_classify_states(h, x, self.clf_token, plan).view(n_examples, n_choices, -1)
        noise = F.dropout(clf_h.new_ones(n_examples, 1, clf_h.size(-1)), self.clf_pdrop, self.training)
        return self.linear(clf_h * noise).view(n_examples, n_choices)


class ClfHead(nn.Module):
    """Classification into n_class classes from the `_classify_` state of one sequence per example."""

    def __init__(self, clf_token, cfg, n_class):
        super().__init__()
        cfg = make_config(cfg)
        self.clf_token = clf_token
        self.dropout = nn.Dropout(cfg.clf_pdrop)
        self.linear = nn.Linear(cfg.n_embd, n_class)
        _init_linear(self.linear)

    def forward(self, h, x, plan=None):
        return self.linear(self.dropout(pool_classify_states(h, x, self.clf_token, plan)))


class SimilarityHead(ClfHead):
    """The paper's similarity head: x holds both orderings of a pair, x[:, 0] and x[:, 1]; their
    `_classify_` states are added, then one linear layer gives a score per pair."""

    def __init__(self, clf_token, cfg, n_out=1):
        super().__init__(clf_token, cfg, n_out)

    def forward(self, h, x, plan=None):
        if x.dim() != 4 or x.size(1) != 2:
            raise ValueError(f"similarity input must have shape [batch, 2 orderings, T, 2], got {tuple(x.shape)}")
        clf_h = pool_classify_states(h, x, self.clf_token, plan).view(x.size(0), 2, -1).sum(dim=1)
        out = self.linear(self.dropout(clf_h))
        return out.squeeze(-1) if out.size(-1) == 1 else out


def make_task_head(task_head_type, clf_token, cfg):
    if task_head_type == "multiple_choice":
        return MultipleChoiceHead(clf_token, cfg)
    if task_head_type == "similarity":
        return SimilarityHead(clf_token, cfg)
    if task_head_type == "inference":  # three-way entailment
        return ClfHead(clf_token, cfg, 3)
    if isinstance(task_head_type, (list, tuple)) and len(task_head_type) == 2 and task_head_type[0] == "classification":
        return ClfHead(clf_token, cfg, int(task_head_type[1]))
    raise ValueError(
        f"unknown task_head_type {task_head_type!r}; expected 'multiple_choice', 'similarity', "
        "'inference' or ('classification', n_class)"
    )


class DoubleHeadModel(nn.Module):
    """Transformer + tied LM head + a task head; returns (lm_logits, task_logits)."""

    def __init__(self, cfg, clf_token, task_head_type, vocab=40990, n_ctx=512):
        super().__init__()
        self.transformer = TransformerModel(cfg, vocab=vocab, n_ctx=n_ctx)
        self.lm_head = LMHead(self.transformer, cfg)
        self.task_head = make_task_head(task_head_type, clf_token, self.transformer.cfg)

    def forward(self, x, mask=None, compute_lm=True, plan=None, lm_losses=False):
        """mask: the mask M ([..., T], ones on real tokens). With it, padding is skipped and LM
        logits are computed only at the positions a loss uses (see LMHead); without it, the TF
        code's computation over every position. compute_lm=False skips the LM logits entirely
        (evaluation) and returns None for them. plan: a BatchPlan made on the host from X and M,
        which replaces `mask` and every check that would wait for the device (training loops).
        lm_losses=True (with a plan that selects LM rows): the LM cross-entropy of each selected
        row in place of the logits (LMHead.losses: the faster way to train)."""
        we = self.transformer.embedding_matrix()
        h = self.transformer(x, we, mask=mask, plan=plan)
        if plan is not None:
            mask = None  # the plan says which LM rows to compute (none selected: every position)
        if not compute_lm:
            lm = None
        elif lm_losses:
            lm = self.lm_head.losses(h, we, plan)
        else:
            lm = self.lm_head(h, we, mask=mask, plan=plan)
        return lm, self.task_head(h, x, plan=plan)


class LMModel(nn.Module):
    """Transformer + LM head over every position, for language modelling and generation."""

    def __init__(self, cfg=DEFAULT_CONFIG, vocab=40990, n_ctx=512, return_probs=False):
        super().__init__()
        self.transformer = TransformerModel(cfg, vocab=vocab, n_ctx=n_ctx)
        self.lm_head = LMHead(self.transformer, cfg, trunc_and_reshape=False)
        self.return_probs = return_probs
        if return_probs:
            pos_emb_mask = torch.zeros(1, 1, vocab)
            pos_emb_mask[:, :, -n_ctx:] = -1e12  # never predict a position row
            self.register_buffer("pos_emb_mask", pos_emb_mask, persistent=False)

    def forward(self, x, plan=None, lm_losses=False):
        """LM logits at every position ([N, T, vocab]), or with a BatchPlan only at the positions whose
        next token is real ([n_selected, vocab], as LMHead with a mask); lm_losses=True (with such a
        plan): the cross-entropy of each of those rows instead (LMHead.losses)."""
        we = self.transformer.embedding_matrix()
        h = self.transformer(x, we, plan=plan)
        if lm_losses:
            return self.lm_head.losses(h, we, plan)
        lm_logits = self.lm_head(h, we, plan=plan)
        if self.return_probs:
            return F.softmax(lm_logits + self.pos_emb_mask, dim=-1)
        return lm_logits


# ---------------------------------------------------------------------------------------------
# Pre-trained weights (docs/reference.md §1)
# ---------------------------------------------------------------------------------------------

class WeightsError(ValueError):
    """The weights on disk do not fit the model or are damaged."""


def layer_layout(n_embd=768):
    """One layer's twelve arrays in OpenAI's shard order: (our parameter name, the Hugging Face
    name, the shape in params_shapes.json). The one source of the shard layout: the loaders, the
    exporter and the random-weights writer all read it."""
    e = n_embd
    return [
        ("attn.c_attn.w", "attn.c_attn.weight", [1, e, 3 * e]), ("attn.c_attn.b", "attn.c_attn.bias", [3 * e]),
        ("attn.c_proj.w", "attn.c_proj.weight", [1, e, e]), ("attn.c_proj.b", "attn.c_proj.bias", [e]),
        ("ln_1.g", "ln_1.weight", [e]), ("ln_1.b", "ln_1.bias", [e]),
        ("mlp.c_fc.w", "mlp.c_fc.weight", [1, e, 4 * e]), ("mlp.c_fc.b", "mlp.c_fc.bias", [4 * e]),
        ("mlp.c_proj.w", "mlp.c_proj.weight", [1, 4 * e, e]), ("mlp.c_proj.b", "mlp.c_proj.bias", [e]),
        ("ln_2.g", "ln_2.weight", [e]), ("ln_2.b", "ln_2.bias", [e]),
    ]


LAYER_PARAMS = [ours for ours, _, _ in layer_layout()]
HF_LAYER_PARAMS = [hf for _, hf, _ in layer_layout()]


def openai_shapes(n_vocab=N_VOCAB, n_ctx=512, n_embd=768, n_layer=12):
    """The list in params_shapes.json for a model of these sizes: positions, tokens, then the layers."""
    layer = [shape for _, _, shape in layer_layout(n_embd)]
    return [[n_ctx, n_embd], [n_vocab, n_embd]] + layer * n_layer


def _body(model):
    """The TransformerModel inside `model` (which may be a DoubleHeadModel or LMModel)."""
    if isinstance(model, TransformerModel):
        return model
    body = getattr(model, "transformer", None)
    if isinstance(body, TransformerModel):
        return body
    raise TypeError(f"expected a TransformerModel or a model with .transformer, got {type(model).__name__}")


def _embedding_layout(body, n_vocab, n_pos_rows, n_ctx, n_special, source):
    """Resolve n_ctx/n_special (-1 = infer from the model) and check `we` fits the model."""
    rows, n_embd = body.embed.weight.shape
    if n_ctx < 0:
        n_ctx = body.n_ctx
    if n_ctx > n_pos_rows:
        raise WeightsError(f"{source}: n_ctx={n_ctx} but the position table has only {n_pos_rows} rows")
    if n_special < 0:
        n_special = rows - n_vocab - n_ctx
    if n_vocab + n_special + n_ctx != rows or n_special < 0:
        raise WeightsError(
            f"{source}: the embedding would have {n_vocab} token + {max(n_special, 0)} special + {n_ctx} "
            f"position rows = {n_vocab + max(n_special, 0) + n_ctx}, but the model's embedding has {rows} rows "
            f"(vocab={rows}); build the model with vocab = n_vocab + n_special + n_ctx"
        )
    return n_ctx, n_special


def _layers_to_load(body, n_transfer, n_layers_available, source):
    if n_transfer == -1:
        return 0
    if not 0 <= n_transfer <= len(body.h):
        raise WeightsError(f"n_transfer={n_transfer} but the model has {len(body.h)} layers")
    if n_transfer > n_layers_available:
        raise WeightsError(f"{source}: n_transfer={n_transfer} but the weights hold only {n_layers_available} layers")
    return n_transfer


def draw_special_rows(rng, n_special, n_embd):
    """The original's draw of the special-token rows: `rng.randn(n_special, n_embd) * 0.02` as float32.

    With `rng` the numpy RandomState that the TF script seeds with --seed (its first draw), the
    rows equal the original's.
    """
    if isinstance(rng, np.random.Generator):
        values = rng.standard_normal((n_special, n_embd))
    else:
        values = rng.randn(n_special, n_embd)
    return (values * 0.02).astype(np.float32)


def _fill_special_rows(body, n_vocab, n_special, special_rows=None):
    """Fill the special rows: from torch's generator (None), a numpy generator, or given values."""
    rows = body.embed.weight[n_vocab:n_vocab + n_special]
    with torch.no_grad():
        if special_rows is None:
            rows.normal_(std=0.02)
            return
        if isinstance(special_rows, (np.random.RandomState, np.random.Generator)):
            special_rows = draw_special_rows(special_rows, n_special, rows.size(1))
        values = torch.as_tensor(np.asarray(special_rows, dtype=np.float32))
        if tuple(values.shape) != tuple(rows.shape):
            raise WeightsError(f"special_rows has shape {list(values.shape)}, expected {list(rows.shape)} "
                               "(n_special, n_embd)")
        rows.copy_(values)


@torch.no_grad()
def load_openai_pretrained_model(model, n_ctx=-1, n_special=-1, n_transfer=12, n_embd=768,
                                 path="./model/", path_names=None, verbose=False, special_rows=None):
    """Load OpenAI's released weights into `model` (docs/reference.md §1), in place.

    `path` holds either OpenAI's shards (params_shapes.json, params_0.npy ... params_9.npy) or the
    same weights in Hugging Face format (config.json + model.safetensors or pytorch_model.bin).
    n_ctx: position rows kept (-1: the model's n_ctx). n_special: new rows between the token and
    position rows, drawn from N(0, 0.02) (-1: whatever the model's vocab leaves over).
    A Hugging Face folder that export_hf.py wrote from a fine-tune holds its special rows after the
    token rows (`added_tokens.json` names them): those trained rows are loaded as the special rows.
    n_transfer: -1 loads nothing; k loads the embedding and the first k layers.
    special_rows: how the n_special new rows are drawn: None from torch's generator (N(0, 0.02)),
    a numpy RandomState as the original (`randn(n_special, n_embd) * 0.02`, float32; train.py passes
    the generator it seeded with --seed, so the rows equal the TF run's), or an array of the values.
    `path_names` is accepted for compatibility with the earlier port and unused.
    """
    body = _body(model)
    if body.cfg.n_embd != n_embd:
        raise WeightsError(f"n_embd={n_embd} was asked for but the model has n_embd={body.cfg.n_embd}")
    if weights_format(path) == "openai":
        _load_openai_shards(body, path, n_ctx, n_special, n_transfer, special_rows)
    else:
        _load_hf_checkpoint(body, path, n_ctx, n_special, n_transfer, special_rows)
    if verbose:
        print(f"loaded pre-trained weights from {path} (n_transfer={n_transfer})")
    return model


def weights_format(path):
    """"openai" (params_shapes.json + shards) or "hf" (config.json + weights); clear errors otherwise."""
    if not os.path.isdir(path):
        raise WeightsError(f"weights folder {path!r} does not exist. {WEIGHTS_HINT}")
    if os.path.exists(os.path.join(path, "params_shapes.json")):
        return "openai"
    if os.path.exists(os.path.join(path, "config.json")):
        return "hf"
    raise WeightsError(
        f"{path!r} holds neither params_shapes.json (OpenAI shards) nor config.json (Hugging Face "
        f"format). {WEIGHTS_HINT}"
    )


def pretrained_sizes(path):
    """(token rows, position rows) of the weights in `path`, read from their metadata only."""
    if weights_format(path) == "openai":
        with open(os.path.join(path, "params_shapes.json")) as f:
            shapes = json.load(f)
        return int(shapes[1][0]), int(shapes[0][0])
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    return int(config.get("vocab_size", N_VOCAB)), int(config.get("n_positions", 512))


def exported_special_tokens(path, n_rows):
    """Names, in id order, of the special rows that a Hugging Face folder's token embedding of n_rows
    rows holds after its vocabulary: the added tokens of `added_tokens.json` (as export_hf.py and
    `transformers` write it) whose ids are the last rows. [] for OpenAI's shards, or where there
    are none (the pre-trained weights)."""
    file = os.path.join(path, "added_tokens.json")
    if weights_format(path) != "hf" or not os.path.exists(file):
        return []
    try:
        with open(file, encoding="utf-8") as f:
            added = json.load(f)
    except ValueError as err:
        raise WeightsError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(added, dict) or not all(type(i) is int for i in added.values()):
        raise WeightsError(f"{file}: expected a JSON object of token name -> id")
    names = [name for name, _ in sorted(added.items(), key=lambda item: item[1])]
    if sorted(added.values()) != list(range(n_rows - len(names), n_rows)):
        return []  # added to the tokenizer only: the embedding holds no row for them
    return names


def read_npy_header(f, file_name):
    """Check a shard's .npy header (1-D little-endian float32, C order); return its length."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, EOFError) as err:
        raise WeightsError(f"{file_name}: not a valid .npy file ({err})") from None
    if dtype != np.dtype("<f4"):
        raise WeightsError(f"{file_name}: expected float32 data, found {dtype}")
    if len(shape) != 1 or fortran_order:
        raise WeightsError(f"{file_name}: expected a 1-D array, found shape {shape}")
    return shape[0]


def _read_shapes(path, body):
    shapes_file = os.path.join(path, "params_shapes.json")
    try:
        with open(shapes_file) as f:
            shapes = json.load(f)
        shapes = [tuple(int(d) for d in s) for s in shapes]
    except (ValueError, TypeError) as err:
        raise WeightsError(f"{shapes_file}: not a JSON list of shapes ({err})") from None
    n_embd = body.cfg.n_embd
    if len(shapes) < 2 or (len(shapes) - 2) % 12:
        raise WeightsError(f"{shapes_file}: expected 2 + 12 x n_layer shapes, found {len(shapes)}")
    n_layers = (len(shapes) - 2) // 12
    expected = openai_shapes(shapes[1][0], shapes[0][0], n_embd, n_layers)
    for i, (found, want) in enumerate(zip(shapes, expected)):
        if tuple(found) != tuple(want):
            raise WeightsError(
                f"{shapes_file}: array {i} has shape {list(found)} but a model with n_embd={n_embd} "
                f"expects {list(want)}"
            )
    return shapes, n_layers


def _shard_files(path):
    files = [os.path.join(path, f"params_{i}.npy") for i in range(N_SHARDS)]
    missing = [f for f in files if not os.path.exists(f)]
    extra = sorted(f for f in os.listdir(path) if f.startswith("params_") and f.endswith(".npy")
                   and os.path.join(path, f) not in files)
    if missing or extra:
        raise WeightsError(
            f"{path}: expected exactly {N_SHARDS} shards params_0.npy ... params_{N_SHARDS - 1}.npy; "
            + (f"missing: {', '.join(os.path.basename(f) for f in missing)}. " if missing else "")
            + (f"unexpected: {', '.join(extra)}. " if extra else "")
            + WEIGHTS_HINT
        )
    return files


def _check_shards(files, total):
    """Headers and sizes of all shards, before anything is written into the model."""
    lengths = []
    for name in files:
        with open(name, "rb") as f:
            n = read_npy_header(f, name)
            data_bytes = os.fstat(f.fileno()).st_size - f.tell()
        if data_bytes < 4 * n:
            raise WeightsError(f"{name}: truncated: its header promises {n} float32 values ({4 * n} bytes) "
                               f"but the file holds {data_bytes} bytes of data")
        lengths.append(n)
    if sum(lengths) != total:
        raise WeightsError(f"{os.path.dirname(files[0])}: the shards hold {sum(lengths)} values in all but "
                           f"params_shapes.json describes {total}")
    return lengths


def _openai_targets(body, shapes, n_layers_loaded, n_ctx, n_special):
    """For each array of the flat stream: the model tensor region it is copied into (or None)."""
    we = body.embed.weight
    n_vocab = shapes[1][0]
    targets = [(we, (n_vocab + n_special) * we.size(1), n_ctx * we.size(1)), (we, 0, n_vocab * we.size(1))]
    for i in range(n_layers_loaded):
        block = body.h[i]
        for name in LAYER_PARAMS:
            t = block.get_parameter(name)
            targets.append((t, 0, t.numel()))
    return targets


class _FlatReader:
    """Reads the ten shards as one flat float32 stream, sequentially, into given buffers."""

    def __init__(self, files, lengths):
        self.files, self.lengths = files, lengths
        self.index, self.left, self.f = -1, 0, None

    def _next_file(self):
        if self.f:
            self.f.close()
        self.index += 1
        self.f = open(self.files[self.index], "rb")
        read_npy_header(self.f, self.files[self.index])
        self.left = self.lengths[self.index]

    def read_into(self, out):
        """Fill the 1-D float32 array `out` (None: skip that many values given as int)."""
        n = out if isinstance(out, int) else out.size
        done = 0
        while done < n:
            if self.left == 0:
                self._next_file()
            k = min(self.left, n - done)
            if isinstance(out, int):
                self.f.seek(4 * k, os.SEEK_CUR)
            else:
                view = memoryview(out[done:done + k]).cast("B")
                if self.f.readinto(view) != 4 * k:
                    raise WeightsError(f"{self.files[self.index]}: truncated while reading")
            self.left -= k
            done += k

    def close(self):
        if self.f:
            self.f.close()


def _load_openai_shards(body, path, n_ctx, n_special, n_transfer, special_rows=None):
    shapes, n_layers_file = _read_shapes(path, body)
    files = _shard_files(path)
    sizes = [int(np.prod(s)) for s in shapes]
    lengths = _check_shards(files, sum(sizes))
    source = os.path.join(path, "params_shapes.json")
    n_layers = _layers_to_load(body, n_transfer, n_layers_file, source)
    if n_transfer == -1:
        return
    n_vocab = shapes[1][0]
    n_ctx, n_special = _embedding_layout(body, n_vocab, shapes[0][0], n_ctx, n_special, source)
    reader = _FlatReader(files, lengths)
    try:
        for size, (tensor, start, count) in zip(sizes, _openai_targets(body, shapes, n_layers, n_ctx, n_special)):
            direct = tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.is_contiguous()
            flat = tensor.detach().view(-1) if direct else torch.empty(tensor.numel(), dtype=torch.float32)
            reader.read_into(flat[start:start + count].numpy())
            reader.read_into(size - count)  # position rows beyond n_ctx
            if not direct:
                tensor.detach().view(-1)[start:start + count].copy_(flat[start:start + count])
    finally:
        reader.close()
    _fill_special_rows(body, n_vocab, n_special, special_rows)


def _open_hf_weights(path):
    """A name -> tensor getter over a Hugging Face checkpoint, without loading it whole."""
    st_file = os.path.join(path, "model.safetensors")
    bin_file = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(st_file):
        from safetensors import safe_open
        try:
            handle = safe_open(st_file, framework="pt")
        except Exception as err:  # safetensors raises its own error types
            raise WeightsError(f"{st_file}: cannot be read as safetensors ({err})") from None
        return st_file, set(handle.keys()), handle.get_tensor
    if os.path.exists(bin_file):
        try:
            state = torch.load(bin_file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise WeightsError(f"{bin_file}: cannot be loaded safely with weights_only=True ({err})") from None
        return bin_file, set(state), state.__getitem__
    raise WeightsError(f"{path}: config.json found but neither model.safetensors nor pytorch_model.bin. {WEIGHTS_HINT}")


def _load_hf_checkpoint(body, path, n_ctx, n_special, n_transfer, special_rows=None):
    config_file = os.path.join(path, "config.json")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except ValueError as err:
        raise WeightsError(f"{config_file}: not valid JSON ({err})") from None
    for key in ("n_embd", "n_head"):
        if key in config and config[key] != getattr(body.cfg, key):
            raise WeightsError(f"{config_file}: {key}={config[key]} but the model has {key}={getattr(body.cfg, key)}")
    source, names, get = _open_hf_weights(path)
    prefix = "transformer." if "transformer.tokens_embed.weight" in names else ""

    def tensor(name, shape):
        full = prefix + name
        if full not in names:
            raise WeightsError(f"{source}: tensor {full!r} is missing")
        t = get(full)
        if t.dtype != torch.float32:
            raise WeightsError(f"{source}: tensor {full!r} is {t.dtype}, expected torch.float32")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise WeightsError(f"{source}: tensor {full!r} has shape {list(t.shape)}, expected {list(shape)}")
        return t

    n_layers_file = sum(1 for n in names if n.startswith(prefix + "h.") and n.endswith(".attn.c_attn.weight"))
    n_layers = _layers_to_load(body, n_transfer, n_layers_file, source)
    if n_transfer == -1:
        return
    n_embd = body.cfg.n_embd
    tokens = tensor("tokens_embed.weight", None)
    positions = tensor("positions_embed.weight", None)
    for name, t in (("tokens_embed.weight", tokens), ("positions_embed.weight", positions)):
        if t.dim() != 2 or t.size(1) != n_embd:
            raise WeightsError(
                f"{source}: tensor {prefix + name!r} has shape {list(t.shape)}, expected [rows, {n_embd}]"
            )
    n_vocab = tokens.size(0)
    # A fine-tune's export holds its special rows after the token rows. Where the model's vocabulary
    # leaves them out, they fill its special rows (as many asked for) or stay behind (none asked
    # for); where it holds them (generation from the export), every row is a token row.
    held = len(exported_special_tokens(path, n_vocab))
    special_from_file = False
    if held and n_special in (0, held):
        model_ctx = body.n_ctx if n_ctx < 0 else n_ctx
        if n_vocab - held + n_special + model_ctx == body.embed.weight.size(0):
            n_vocab -= held
            special_from_file = n_special == held
    n_ctx, n_special = _embedding_layout(body, n_vocab, positions.size(0), n_ctx, n_special, source)
    we = body.embed.weight
    we[:n_vocab].copy_(tokens[:n_vocab])
    we[n_vocab + n_special:].copy_(positions[:n_ctx])
    trained_special_rows = tokens[n_vocab:].clone() if special_from_file else None
    del tokens, positions
    for i in range(n_layers):
        for ours, theirs in zip(LAYER_PARAMS, HF_LAYER_PARAMS):
            p = body.h[i].get_parameter(ours)
            p.copy_(tensor(f"h.{i}.{theirs}", p.shape))
    _fill_special_rows(body, n_vocab, n_special, special_rows)  # drawn in any case: a seed's stream stays
    if special_from_file:
        we[n_vocab:n_vocab + n_special].copy_(trained_special_rows)


# ---------------------------------------------------------------------------------------------
# Generation with a key/value cache
# ---------------------------------------------------------------------------------------------
# The cached forward below runs the blocks' own submodules (c_attn, c_proj, ln_1, mlp, ln_2) one
# new position at a time, keeping the keys and values of past positions per layer. Dropout is
# never applied: generation puts the model in eval mode.

class KVCache:
    """Keys and values of every layer for the positions computed so far; slot p holds position p.

    Sequences of one batch have their own lengths: the buffer is padded on the right, and a query
    at position p attends to slots 0 ... p of its own sequence only, so padding is never seen.
    """

    def __init__(self, n_layer, n_batch, n_head, n_slots, head_dim, like):
        shape = (n_batch, n_head, n_slots, head_dim)
        self.keys = [like.new_zeros(shape) for _ in range(n_layer)]
        self.values = [like.new_zeros(shape) for _ in range(n_layer)]

    def write(self, layer, k, v, pos):
        """Store k and v ([B, H, T, d]) of the positions `pos` ([B, T]) of each sequence."""
        rows = torch.arange(pos.size(0), device=pos.device)[:, None]
        self.keys[layer][rows, :, pos] = k.transpose(1, 2)  # indexed view: [B, T, H, d]
        self.values[layer][rows, :, pos] = v.transpose(1, 2)

    def attend(self, layer, q, pos):
        """Causal attention of queries q ([B, H, T, d]) at positions `pos` over the cached slots."""
        n = int(pos.max()) + 1
        allowed = torch.arange(n, device=pos.device) <= pos[:, :, None]  # [B, T, n]
        keys, values = self.keys[layer][:, :, :n], self.values[layer][:, :, :n]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed[:, None])


def cached_block(block, x, cache, layer, pos):
    """One post-norm block (docs/reference.md §2) on new positions only, their keys and values added to `cache`."""
    attn = block.attn
    B, T, C = x.shape
    q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))
    cache.write(layer, k, v, pos)
    a = attn.c_proj(cache.attend(layer, q, pos).transpose(1, 2).reshape(B, T, C))
    n = block.ln_1(x + a)
    return block.ln_2(n + block.mlp(n))


def cached_forward(body, tokens, pos, cache):
    """Hidden states [B, T, n_embd] of `tokens` ([B, T]) at positions `pos` ([B, T]), given the
    cached past: each new token costs one position, not the whole prefix."""
    we = body.embed.weight
    first_position_row = we.size(0) - body.n_ctx  # position p is row n_vocab + n_special + p
    h = F.embedding(tokens, we) + F.embedding(first_position_row + pos, we)
    for layer, block in enumerate(body.h):
        h = cached_block(block, h, cache, layer, pos)
    return h


def prefix_forward(body, tokens, lengths):
    """Hidden state at the last real position of each sequence, re-running the whole prefix with
    the ordinary forward (the uncached baseline). `tokens` is padded on the right, which causal
    attention makes exact."""
    T = int(lengths.max())
    positions = body.embed.weight.size(0) - body.n_ctx + torch.arange(T, device=tokens.device)
    x = torch.stack([tokens[:, :T], positions.expand(tokens.size(0), T)], dim=-1)
    h = body(x, body.embed.weight)
    return h[torch.arange(h.size(0), device=h.device), lengths - 1]


def next_token_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The distribution the next token is drawn from: softmax(logits / temperature) kept to the
    top_k largest logits (ties with the k-th kept too; 0: all), then to the smallest set of most
    likely tokens whose probability reaches top_p (1: all), renormalised."""
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_probs, order = F.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the tokens ranked above
        drop = torch.zeros_like(mass_before, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return F.softmax(logits, dim=-1)


def choose_next(logits, greedy, temperature, top_k, top_p, generator):
    if greedy:
        return logits.argmax(-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@dataclass
class Generation:
    """What `generate` returns: the new token ids of each prompt (ending with the stop token
    where one was produced) and, with return_logits, the raw LM logits over every row of the
    embedding before each choice, [n_prompts, n_steps, rows] (steps after a stop are filler)."""

    tokens: list
    logits: torch.Tensor = None


class GenerationError(ValueError):
    """Prompts or settings that generation cannot honour."""


def _check_generation_args(prompts, rows, n_vocab, n_ctx, max_new_tokens, greedy, temperature, top_k, top_p,
                           stop_token):
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise GenerationError("prompts must be a non-empty list of token id lists")
    if not 0 < n_vocab <= rows - n_ctx:
        raise GenerationError(f"n_vocab={n_vocab} but the embedding has {rows} rows, {n_ctx} of them positions")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise GenerationError(f"temperature must be > 0 (or use greedy decoding), got {temperature}")
    if top_k < 0 or not 0 < top_p <= 1:
        raise GenerationError(f"top_k must be >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    if stop_token is not None and not 0 <= stop_token < n_vocab:
        raise GenerationError(f"stop_token {stop_token} is not a token id (0 ... {n_vocab - 1})")
    n_token_rows = rows - n_ctx  # token and special rows may be given; position rows may not
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompt {i} is empty: give at least one token")
        bad = [t for t in prompt if not 0 <= int(t) < n_token_rows]
        if bad:
            raise GenerationError(f"prompt {i} holds id {bad[0]}, outside the token and special rows 0 ... "
                             f"{n_token_rows - 1}")
        if len(prompt) + max_new_tokens > n_ctx:
            raise GenerationError(
                f"prompt {i} has {len(prompt)} tokens: with max_new_tokens={max_new_tokens} it would reach "
                f"{len(prompt) + max_new_tokens} positions but the model has n_ctx={n_ctx}; shorten the prompt "
                f"or ask for at most {max(n_ctx - len(prompt), 0)} new tokens"
            )


@torch.no_grad()
def generate(model, prompts, n_vocab, max_new_tokens=20, greedy=False, temperature=1.0, top_k=0, top_p=1.0,
             seed=None, stop_token=None, use_cache=True, return_logits=False):
    """Continue each prompt (a list of token ids) of `model` (LMModel, DoubleHeadModel or
    TransformerModel) with the tied LM head.

    Only token rows 0 ... n_vocab-1 may come out: special and position rows are masked. Each
    prompt plus max_new_tokens must fit in n_ctx (an error says by how much it does not; there is
    no sliding window, as positions beyond n_ctx have no embedding). greedy takes the most likely
    token; otherwise tokens are drawn from `next_token_probs`, reproducibly when `seed` is given.
    A sequence ends at `stop_token` (kept in its output); all stop when every one has.
    use_cache=False re-runs the whole prefix for every token (the baseline: same results).
    """
    body = _body(model)
    we = body.embed.weight
    _check_generation_args(prompts, we.size(0), n_vocab, body.n_ctx, max_new_tokens, greedy, temperature, top_k,
                           top_p, stop_token)
    device = we.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    buffer = torch.zeros(B, int(lengths.max()) + max_new_tokens, dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        buffer[i, :len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
    rows = torch.arange(B, device=device)
    was_training = model.training
    model.eval()
    try:
        if use_cache:
            P = int(lengths.max())
            head_dim = body.cfg.n_embd // body.cfg.n_head
            cache = KVCache(len(body.h), B, body.cfg.n_head, buffer.size(1), head_dim, we)
            h = cached_forward(body, buffer[:, :P], torch.arange(P, device=device).expand(B, P), cache)
            h_last = h[rows, lengths - 1]
        else:
            h_last = prefix_forward(body, buffer, lengths)
        steps, done = [], torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            logits = F.linear(h_last, we)
            if return_logits:
                steps.append(logits)
            logits = logits.clone()
            logits[:, n_vocab:] = float("-inf")  # never a special or position row
            token = choose_next(logits, greedy, temperature, top_k, top_p, generator)
            buffer[rows, lengths] = token
            lengths = lengths + 1
            if stop_token is not None:
                done |= token == stop_token
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            if use_cache:
                h_last = cached_forward(body, token[:, None], (lengths - 1)[:, None], cache)[:, 0]
            else:
                h_last = prefix_forward(body, buffer, lengths)
    finally:
        model.train(was_training)
    tokens = [_until_stop(buffer[i, len(p):int(lengths[i])].tolist(), stop_token) for i, p in enumerate(prompts)]
    return Generation(tokens, torch.stack(steps, dim=1) if return_logits and steps else None)


def _until_stop(tokens, stop_token):
    return tokens[:tokens.index(stop_token) + 1] if stop_token in tokens else tokens


# ---------------------------------------------------------------------------------------------
# Models from weights on disk, for generation and export
# ---------------------------------------------------------------------------------------------

def read_checkpoint(path):
    """(state dict, recorded args or {}) of a `.safetensors` file (best_params.safetensors) or of a
    train.py checkpoint (checkpoint.pt: its "model" and "args"), loaded without unpickling code."""
    if not os.path.isfile(path):
        raise WeightsError(f"checkpoint file {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            return _read_safetensors(path)
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as err:  # both libraries raise their own error types
        raise WeightsError(f"{path}: cannot be read as a checkpoint ({err})") from None
    if isinstance(saved, Mapping) and isinstance(saved.get("model"), Mapping):
        return dict(saved["model"]), dict(saved.get("args") or {})
    if isinstance(saved, Mapping) and all(isinstance(v, torch.Tensor) for v in saved.values()):
        return dict(saved), {}
    raise WeightsError(f"{path}: expected a state dict or a train.py checkpoint holding one under 'model'")


def _read_safetensors(path):
    """The tensors and the arguments train.py records in the metadata (none in files from elsewhere)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:  # reads the header only
        recorded = (f.metadata() or {}).get("args")
    state = load_file(path)
    try:
        args = json.loads(recorded) if recorded else {}
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: the 'args' metadata is not JSON ({err})") from None
    if not isinstance(args, dict):
        raise WeightsError(f"{path}: the 'args' metadata should be a JSON object, got {type(args).__name__}")
    return state, args


def _resolve_n_head(n_head, n_embd, recorded, source):
    """n_head as given, else as recorded with the weights, else GPT-1's 12 at n_embd 768."""
    n_head = n_head or recorded.get("n_head")
    if n_head:
        return int(n_head)
    if n_embd == 768:
        return 12
    raise WeightsError(f"{source}: the weights do not record n_head and n_embd={n_embd} is not GPT-1's 768; "
                       "give n_head (--n_head)")


def model_from_checkpoint(path, n_vocab, n_special=None, n_head=None, task_head_type=None):
    """An LMModel (task_head_type None) or a DoubleHeadModel holding a checkpoint of this project.

    The embedding has n_vocab + n_special + n_ctx rows and the file does not say where the
    specials end: n_special is as given, else 0 for a recorded `--dataset lm` run (plain text has
    no specials), else the 3 that train.py's tasks add; n_ctx is what is left.
    The classify token of a DoubleHeadModel is taken as the last special (train.py's order);
    task_head_type "auto": an LMModel if the file holds no task head, else the head of the task
    train.py recorded (--dataset), else a multiple-choice head.
    """
    state, recorded = read_checkpoint(path)
    if n_special is None:
        n_special = _recorded_n_special(recorded)
    if task_head_type == "auto":
        has_head = any(k.startswith("task_head.") for k in state)
        task_head_type = (_recorded_task_head(recorded) or "multiple_choice") if has_head else None
    embed = next((k for k in ("transformer.embed.weight", "lm_head.decoder.weight", "embed.weight") if k in state),
                 None)
    if embed is None:
        raise WeightsError(f"{path}: no embedding (transformer.embed.weight or lm_head.decoder.weight) found")
    rows, n_embd = state[embed].shape
    prefix = "" if embed == "embed.weight" else "transformer."
    n_layer = sum(1 for k in state if k.startswith(prefix + "h.") and k.endswith(".attn.c_attn.w"))
    n_ctx = rows - n_vocab - n_special
    if n_ctx <= 0:
        raise WeightsError(f"{path}: the embedding has {rows} rows, too few for n_vocab={n_vocab} tokens + "
                           f"n_special={n_special} specials + positions: wrong vocabulary or n_special?")
    # the recorded arguments are train.py's flags: a Namespace, whose fields other than GPTConfig's are ignored
    cfg = make_config(Namespace(**dict(recorded, n_embd=n_embd, n_layer=n_layer,
                                       n_head=_resolve_n_head(n_head, n_embd, recorded, path))))
    if task_head_type is None:
        model = LMModel(cfg, vocab=rows, n_ctx=n_ctx)
    else:
        model = DoubleHeadModel(cfg, n_vocab + n_special - 1, task_head_type, vocab=rows, n_ctx=n_ctx)
        head = {k[len("task_head."):]: v for k, v in state.items() if k.startswith("task_head.")}
        _load_part(model.task_head, head, path, "task_head.")
    body = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    body.setdefault("embed.weight", state[embed])
    _load_part(model.transformer, body, path, prefix)
    return model


def _recorded_task_head(recorded):
    """The task_head_type of the task a train.py run recorded (its --dataset), or None."""
    from tasks import get_task  # the task registry (it does not import this module)

    if not recorded.get("dataset"):
        return None
    try:
        return getattr(get_task(str(recorded["dataset"])), "head", None)
    except ValueError:  # a task this version does not know
        return None


def _recorded_n_special(recorded):
    """Special rows of a train.py run: none for a language model on plain text, else its tasks' 3."""
    from tasks import LANGUAGE_MODEL

    return 0 if recorded.get("dataset") == LANGUAGE_MODEL.name else 3


def _load_part(module, state, source, prefix):
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{source}: the tensors under {prefix!r} do not fit the model ({err})") from None


def model_from_pretrained(path, n_head=None):
    """An LMModel holding pre-trained weights (OpenAI shards or Hugging Face format, docs/reference.md §1) with
    every position row and no special rows: its n_ctx is the position table's length."""
    if weights_format(path) == "openai":
        with open(os.path.join(path, "params_shapes.json")) as f:
            shapes = json.load(f)
        n_vocab, (n_positions, n_embd), n_layer, recorded = shapes[1][0], shapes[0], (len(shapes) - 2) // 12, {}
    else:
        with open(os.path.join(path, "config.json")) as f:
            recorded = json.load(f)
        n_vocab, n_positions = pretrained_sizes(path)
        n_embd, n_layer = recorded.get("n_embd", 768), recorded.get("n_layer", 12)
    cfg = make_config(dict(n_embd=n_embd, n_layer=n_layer, afn=recorded.get("afn", "gelu"),
                           n_head=_resolve_n_head(n_head, n_embd, recorded, path)))
    model = LMModel(cfg, vocab=n_vocab + n_positions, n_ctx=n_positions)
    load_openai_pretrained_model(model, n_ctx=n_positions, n_special=0, n_transfer=n_layer, n_embd=n_embd, path=path)
    return model


def load_lm(path, n_vocab, n_head=None, n_special=None):
    """An LMModel from a weights folder (pre-trained or exported) or a checkpoint file of this project."""
    if os.path.isdir(path):
        return model_from_pretrained(path, n_head)
    return model_from_checkpoint(path, n_vocab, n_special, n_head)
