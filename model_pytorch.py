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
    """A GPTConfig from a GPTConfig, an argparse Namespace or a dict; unknown fields are ignored."""
    if cfg is None:
        return GPTConfig()
    if isinstance(cfg, GPTConfig):
        return cfg
    if isinstance(cfg, Namespace):
        cfg = vars(cfg)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"config must be a GPTConfig, argparse.Namespace or dict, got {type(cfg).__name__}")
    known = {f.name for f in fields(GPTConfig)}
    return GPTConfig(**{k: v for k, v in cfg.items() if k in known and v is not None})


def gelu(x):
    """The tanh form of GELU used by the TF code."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


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

    def pack(self, x):
        """[N, T, C] -> [n_real, C]"""
        return x.reshape(-1, x.size(-1)).index_select(0, self.index)

    def unpack(self, x):
        """[n_real, C] -> [N, T, C], zeros at the padding."""
        out = x.new_zeros(self.n_seq * self.n_ctx, x.size(-1)).index_copy(0, self.index, x)
        return out.view(self.n_seq, self.n_ctx, x.size(-1))


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

    def forward(self, x, we=None, mask=None):
        if we is None:
            we = self.embedding_matrix()
        x = x.reshape(-1, x.size(-2), x.size(-1))
        if x.size(1) > self.n_ctx:
            raise ValueError(f"input has {x.size(1)} positions but the model was built with n_ctx={self.n_ctx}")
        if x.numel():
            low, high = torch.aminmax(x)  # one pass, one device sync
            low, high = int(low), int(high)
            if low < 0 or high >= we.size(0):
                raise ValueError(f"input ids range over {low} ... {high} but the embedding has {we.size(0)} rows "
                                 "(vocab = n_vocab + n_special + n_ctx)")
        layout = None if mask is None else PaddingLayout.from_mask(mask, x.size(0), x.size(1))
        if layout is not None:
            x = x.reshape(-1, 2).index_select(0, layout.index)
        h = F.embedding(x[..., 0], we) + F.embedding(x[..., 1], we)
        for block in self.h:
            h = block(h, layout)
        return h if layout is None else layout.unpack(h)


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

    def forward(self, h, we=None, mask=None):
        weight = self.decoder.weight if we is None else we
        if mask is not None:
            keep = mask.reshape(-1, mask.size(-1))[:, 1:].bool()
            h = h[:, :-1][keep]
        elif self.trunc_and_reshape:
            h = h[:, :-1].reshape(-1, self.n_embd)
        return F.linear(h, weight)


def pool_classify_states(h, x, clf_token):
    """Hidden state at the FIRST `clf_token` of each sequence, shape [N, n_embd] (docs/reference.md §2)."""
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

    def forward(self, h, x):
        n_examples, n_choices = x.size(0), x.size(1)
        clf_h = pool_classify_states(h, x, self.clf_token).view(n_examples, n_choices, -1)
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

    def forward(self, h, x):
        return self.linear(self.dropout(pool_classify_states(h, x, self.clf_token)))


class SimilarityHead(ClfHead):
    """The paper's similarity head: x holds both orderings of a pair, x[:, 0] and x[:, 1]; their
    `_classify_` states are added, then one linear layer gives a score per pair."""

    def __init__(self, clf_token, cfg, n_out=1):
        super().__init__(clf_token, cfg, n_out)

    def forward(self, h, x):
        if x.dim() != 4 or x.size(1) != 2:
            raise ValueError(f"similarity input must have shape [batch, 2 orderings, T, 2], got {tuple(x.shape)}")
        clf_h = pool_classify_states(h, x, self.clf_token).view(x.size(0), 2, -1).sum(dim=1)
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

    def forward(self, x, mask=None, compute_lm=True):
        """mask: the mask M ([..., T], ones on real tokens). With it, padding is skipped and LM
        logits are computed only at the positions a loss uses (see LMHead); without it, the TF
        code's computation over every position. compute_lm=False skips the LM logits entirely
        (evaluation) and returns None for them."""
        we = self.transformer.embedding_matrix()
        h = self.transformer(x, we, mask=mask)
        lm_logits = self.lm_head(h, we, mask=mask) if compute_lm else None
        return lm_logits, self.task_head(h, x)


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

    def forward(self, x):
        we = self.transformer.embedding_matrix()
        lm_logits = self.lm_head(self.transformer(x, we), we)
        if self.return_probs:
            return F.softmax(lm_logits + self.pos_emb_mask, dim=-1)
        return lm_logits


# ---------------------------------------------------------------------------------------------
# Pre-trained weights (docs/reference.md §1)
# ---------------------------------------------------------------------------------------------

class WeightsError(ValueError):
    """The weights on disk do not fit the model or are damaged."""


LAYER_PARAMS = [  # order of a layer's twelve arrays in OpenAI's shards
    "attn.c_attn.w", "attn.c_attn.b", "attn.c_proj.w", "attn.c_proj.b", "ln_1.g", "ln_1.b",
    "mlp.c_fc.w", "mlp.c_fc.b", "mlp.c_proj.w", "mlp.c_proj.b", "ln_2.g", "ln_2.b",
]
HF_LAYER_PARAMS = [
    "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
    "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
    "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_2.weight", "ln_2.bias",
]


def openai_shapes(n_vocab=N_VOCAB, n_ctx=512, n_embd=768, n_layer=12):
    """The list in params_shapes.json for a model of these sizes."""
    layer = [
        [1, n_embd, 3 * n_embd], [3 * n_embd], [1, n_embd, n_embd], [n_embd], [n_embd], [n_embd],
        [1, n_embd, 4 * n_embd], [4 * n_embd], [1, 4 * n_embd, n_embd], [n_embd], [n_embd], [n_embd],
    ]
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


def _fill_special_rows(body, n_vocab, n_special):
    with torch.no_grad():
        body.embed.weight[n_vocab:n_vocab + n_special].normal_(std=0.02)


@torch.no_grad()
def load_openai_pretrained_model(model, n_ctx=-1, n_special=-1, n_transfer=12, n_embd=768,
                                 path="./model/", path_names=None, verbose=False):
    """Load OpenAI's released weights into `model` (docs/reference.md §1), in place.

    `path` holds either OpenAI's shards (params_shapes.json, params_0.npy ... params_9.npy) or the
    same weights in Hugging Face format (config.json + model.safetensors or pytorch_model.bin).
    n_ctx: position rows kept (-1: the model's n_ctx). n_special: new rows between the token and
    position rows, drawn from N(0, 0.02) (-1: whatever the model's vocab leaves over).
    n_transfer: -1 loads nothing; k loads the embedding and the first k layers.
    `path_names` is accepted for compatibility with the earlier port and unused.
    """
    body = _body(model)
    if body.cfg.n_embd != n_embd:
        raise WeightsError(f"n_embd={n_embd} was asked for but the model has n_embd={body.cfg.n_embd}")
    if weights_format(path) == "openai":
        _load_openai_shards(body, path, n_ctx, n_special, n_transfer)
    else:
        _load_hf_checkpoint(body, path, n_ctx, n_special, n_transfer)
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


def _load_openai_shards(body, path, n_ctx, n_special, n_transfer):
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
    _fill_special_rows(body, n_vocab, n_special)


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


def _load_hf_checkpoint(body, path, n_ctx, n_special, n_transfer):
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
    n_ctx, n_special = _embedding_layout(body, n_vocab, positions.size(0), n_ctx, n_special, source)
    we = body.embed.weight
    we[:n_vocab].copy_(tokens)
    we[n_vocab + n_special:].copy_(positions[:n_ctx])
    del tokens, positions
    for i in range(n_layers):
        for ours, theirs in zip(LAYER_PARAMS, HF_LAYER_PARAMS):
            p = body.h[i].get_parameter(ours)
            p.copy_(tensor(f"h.{i}.{theirs}", p.shape))
    _fill_special_rows(body, n_vocab, n_special)
