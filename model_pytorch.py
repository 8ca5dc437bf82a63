"""GPT-1 in PyTorch, faithful to OpenAI's TensorFlow `finetune-transformer-lm` (docs/reference.md §1-2).

Module and parameter names follow the TF variables (`h.0.attn.c_attn.w`, `ln_1.g`, ...) and the
state-dict keys of the earlier PyTorch port, so its checkpoints load. One forward contract: given a
BatchPlan (batches.py, made on the host), a model returns the per-sequence LM losses and the task
logits; without one, the TF graph's outputs (LM logits at every position). Generation runs through
the same blocks with a key/value cache (generate.py). Weights on disk: weights.py, checkpoints.py.
"""

import math
from argparse import Namespace
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from batches import PaddingLayout
from loss import lm_losses
from weights import load_openai_pretrained_model  # noqa: F401  (the design card's import path)

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTConfig:
    """Network hyper-parameters (the TF code's model flags)."""

    n_embd: int = field(default=768, metadata={"help": "width of the hidden states"})
    n_head: int = field(default=12, metadata={"help": "attention heads (must divide n_embd)"})
    n_layer: int = field(default=12, metadata={"help": "transformer blocks"})
    embd_pdrop: float = field(default=0.1, metadata={"help": "dropout on the embedding matrix"})
    attn_pdrop: float = field(default=0.1, metadata={"help": "dropout on the attention weights"})
    resid_pdrop: float = field(default=0.1, metadata={"help": "dropout on each block's two outputs"})
    clf_pdrop: float = field(default=0.1, metadata={"help": "dropout before the task head"})
    afn: str = field(default="gelu", metadata={"help": "activation of the MLP (gelu: the tanh form)"})
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


class KVCache:
    """Keys and values of every layer for the positions computed so far (generation); slot p holds
    position p. Sequences of one batch have their own lengths: a query at position p attends to
    slots 0 ... p of its own sequence only, so the right padding of shorter prompts is never seen."""

    def __init__(self, n_layer, n_batch, n_slots, n_head, head_dim, like):
        shape = (n_batch, n_head, n_slots, head_dim)
        self.keys = [like.new_zeros(shape) for _ in range(n_layer)]
        self.values = [like.new_zeros(shape) for _ in range(n_layer)]
        self.pos = None  # [B, T] positions of the tokens of the current forward

    def attend(self, layer, q, k, v):
        """Store k and v ([B, H, T, d]) at their positions, then causal attention of q over the cache."""
        rows = torch.arange(self.pos.size(0), device=q.device)[:, None]
        self.keys[layer][rows, :, self.pos] = k.transpose(1, 2)  # indexed view: [B, T, H, d]
        self.values[layer][rows, :, self.pos] = v.transpose(1, 2)
        n = int(self.pos.max()) + 1
        allowed = torch.arange(n, device=q.device) <= self.pos[:, :, None]  # [B, T, n]
        keys, values = self.keys[layer][:, :, :n], self.values[layer][:, :, :n]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed[:, None])


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

    def forward(self, x, layout=None, cache=None, layer=0):
        qkv = self.c_attn(x)
        if layout is not None:  # x holds the real tokens only: lay them out as sequences again
            qkv = layout.unpack(qkv)
        B, T, _ = qkv.shape
        C = self.n_embd
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
        if cache is not None:
            a = cache.attend(layer, q, k, v)
        elif self.fused:
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

    def forward(self, x, layout=None, cache=None, layer=0):
        n = self.ln_1(x + self.attn(x, layout, cache, layer))
        return self.ln_2(n + self.mlp(n))


class TransformerModel(nn.Module):
    """The GPT-1 body. One embedding matrix `we` holds token, special and position rows (docs/reference.md §1).

    Input x: ids of shape [..., T, 2], [..., 0] the token and [..., 1] the position row.
    Returns hidden states of shape [N, T, n_embd] with N the product of the leading axes.
    With `mask` (M, [..., T], ones on real tokens, padding after them) or a plan's layout the
    position-wise layers skip the padding; hidden states there are then 0, those of real tokens
    are unchanged. With a KVCache, x holds the new positions only (generation).
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

    def forward(self, x, we=None, mask=None, plan=None, cache=None):
        """With a `plan` (batches.BatchPlan, built and checked on the host) nothing here waits for
        the device; without one, the ids are checked here (one device sync) and `mask` gives the layout."""
        if we is None:
            we = self.embedding_matrix()
        x = x.reshape(-1, x.size(-2), x.size(-1))
        if x.size(1) > self.n_ctx:
            raise ValueError(f"input has {x.size(1)} positions but the model was built with n_ctx={self.n_ctx}")
        layout = None
        if plan is not None:
            layout = plan.layout
        elif cache is not None:
            cache.pos = x[..., 1] - (we.size(0) - self.n_ctx)
        else:
            self.check_ids(x, we.size(0))
            layout = None if mask is None else PaddingLayout.from_mask(mask, x.size(0), x.size(1))
        if layout is not None:
            x = x.reshape(-1, 2).index_select(0, layout.index)
        h = F.embedding(x[..., 0], we) + F.embedding(x[..., 1], we)
        for layer, block in enumerate(self.h):
            h = block(h, layout, cache, layer)
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
    """Language-model logits from the (tied, dropped) embedding matrix over all its rows, at every
    position but the last (trunc_and_reshape: [N * (T - 1), vocab], as the TF code) or at every one."""

    def __init__(self, model, cfg=None, trunc_and_reshape=True):
        super().__init__()
        self.n_embd = model.embed.weight.size(1)
        self.decoder = nn.Linear(self.n_embd, model.embed.weight.size(0), bias=False)
        self.decoder.weight = model.embed.weight  # tied
        self.trunc_and_reshape = trunc_and_reshape

    def forward(self, h, we=None):
        if self.trunc_and_reshape:
            h = h[:, :-1].reshape(-1, self.n_embd)
        return F.linear(h, self.decoder.weight if we is None else we)


# ---------------------------------------------------------------------------------------------
# Task heads
# ---------------------------------------------------------------------------------------------

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

    kind = "multiple_choice"  # the head type; the only one transformers' OpenAIGPTDoubleHeadsModel has

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

    kind = "classification"

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

    kind = "similarity"

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


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------

class DoubleHeadModel(nn.Module):
    """Transformer + tied LM head + a task head.

    model(x) returns the TF graph's outputs (LM logits [N * (T - 1), vocab] at every position but
    the last, task logits); model(x, plan=plan) the training and evaluation outputs: per-sequence LM
    losses at the rows the plan scores (None where it scores none) and the task logits.
    """

    def __init__(self, cfg, clf_token, task_head_type, vocab=40990, n_ctx=512):
        super().__init__()
        self.transformer = TransformerModel(cfg, vocab=vocab, n_ctx=n_ctx)
        self.lm_head = LMHead(self.transformer, cfg)
        self.task_head = make_task_head(task_head_type, clf_token, self.transformer.cfg)

    def forward(self, x, plan=None):
        we = self.transformer.embedding_matrix()
        h = self.transformer(x, we, plan=plan)
        if plan is None:
            return self.lm_head(h, we), self.task_head(h, x)
        lm = lm_losses(h, we, plan) if plan.lm_rows is not None else None
        return lm, self.task_head(h, x, plan=plan)


class LMModel(nn.Module):
    """Transformer + tied LM head, for language modelling and generation.

    model(x) returns LM logits at every position, [N, T, vocab] (return_probs: softmax over the
    token and special rows); model(x, plan=plan) follows DoubleHeadModel: (per-sequence LM losses, None).
    """

    def __init__(self, cfg=DEFAULT_CONFIG, vocab=40990, n_ctx=512, return_probs=False):
        super().__init__()
        self.transformer = TransformerModel(cfg, vocab=vocab, n_ctx=n_ctx)
        self.lm_head = LMHead(self.transformer, cfg, trunc_and_reshape=False)
        self.return_probs = return_probs
        if return_probs:
            pos_emb_mask = torch.zeros(1, 1, vocab)
            pos_emb_mask[:, :, -n_ctx:] = -1e12  # never predict a position row
            self.register_buffer("pos_emb_mask", pos_emb_mask, persistent=False)

    def forward(self, x, plan=None):
        we = self.transformer.embedding_matrix()
        h = self.transformer(x, we, plan=plan)
        if plan is not None:
            return lm_losses(h, we, plan), None
        lm_logits = self.lm_head(h, we)
        if self.return_probs:
            return F.softmax(lm_logits + self.pos_emb_mask, dim=-1)
        return lm_logits


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds a model of this project, recorded beside its weights (checkpoints.py): the
    network's config, the embedding's rows (n_vocab tokens, n_special specials, n_ctx positions),
    the task head (None: a language model alone) and its classify token, the special tokens' names
    and a fingerprint of the vocabulary files the token rows belong to."""

    config: GPTConfig
    n_vocab: int
    n_special: int
    n_ctx: int
    head: object = None
    clf_token: int | None = None
    special_tokens: tuple = ()
    vocabulary: str = ""

    @property
    def vocab(self):
        """Rows of the embedding."""
        return self.n_vocab + self.n_special + self.n_ctx

    def to_dict(self):
        return dict(asdict(self), config=asdict(replace(self.config, fused_attention=True)))

    @staticmethod
    def from_dict(d):
        head = d.get("head")
        return ModelSpec(make_config(d["config"]), int(d["n_vocab"]), int(d["n_special"]), int(d["n_ctx"]),
                         tuple(head) if isinstance(head, list) else head, d.get("clf_token"),
                         tuple(d.get("special_tokens") or ()), d.get("vocabulary") or "")


def build_model(spec):
    """A new model of `spec`: an LMModel where it has no task head, else a DoubleHeadModel."""
    if spec.head is None:
        return LMModel(spec.config, vocab=spec.vocab, n_ctx=spec.n_ctx)
    return DoubleHeadModel(spec.config, spec.clf_token, spec.head, vocab=spec.vocab, n_ctx=spec.n_ctx)


def body_of(model):
    """The TransformerModel inside `model` (which may be a DoubleHeadModel or LMModel, or wrapped
    by torch.compile or DDP)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    body = model if isinstance(model, TransformerModel) else getattr(model, "transformer", None)
    if not isinstance(body, TransformerModel):
        raise TypeError(f"expected a TransformerModel or a model with .transformer, got {type(model).__name__}")
    return body


def generate(model, prompts, n_vocab, **options):
    """Continue token-id prompts with the KV cache: generate.generate, reachable from here as in
    earlier versions (see generate.py for the options)."""
    from generate import generate as continue_prompts  # generate.py imports this module

    return continue_prompts(model, prompts, n_vocab, **options)
