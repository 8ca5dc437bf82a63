"""Pre-trained weights on disk (docs/reference.md §1): OpenAI's shards and the Hugging Face folder,
read into a model and written from one, both driven by one layout table (`layer_layout`).

Readers stream the shards straight into the model's parameters (never a second copy) and check
every header, size and shape first, with errors naming the file. Writers: random weights in the
exact shard format (the demo and the tests: the real weights are not needed to exercise the
loader) and the export of a model of this project (export_hf.py, docs/export.md). This module
knows a model only by its parts (`transformer.embed`, `transformer.h`, `task_head`).
"""

import json
import os
from types import SimpleNamespace

import numpy as np
import torch

from utils import atomic_write, atomic_write_text, read_json

N_VOCAB = 40478  # rows of OpenAI's token table
N_SHARDS = 10  # OpenAI's weights come as params_0.npy ... params_9.npy
WEIGHTS_HINT = (
    "Get the weights from the `model/` folder of openai/finetune-transformer-lm (params_shapes.json "
    "and params_0.npy ... params_9.npy) or the Hugging Face `openai-gpt` checkpoint (config.json and "
    "model.safetensors); see model/README.md."
)


class WeightsError(ValueError):
    """The weights on disk do not fit the model or are damaged."""


def layer_layout(n_embd=768):
    """One layer's twelve arrays in OpenAI's shard order: (our parameter name, the Hugging Face
    name, the shape in params_shapes.json). The one source of the shard layout."""
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
    return getattr(model, "transformer", model)


def weights_format(path):
    """"openai" (params_shapes.json + shards) or "hf" (config.json + weights); clear errors otherwise."""
    if not os.path.isdir(path):
        raise WeightsError(f"weights folder {path!r} does not exist. {WEIGHTS_HINT}")
    if os.path.exists(os.path.join(path, "params_shapes.json")):
        return "openai"
    if os.path.exists(os.path.join(path, "config.json")):
        return "hf"
    raise WeightsError(f"{path!r} holds neither params_shapes.json (OpenAI shards) nor config.json (Hugging Face "
                       f"format). {WEIGHTS_HINT}")


def read_shapes(path):
    """params_shapes.json as a list of shape tuples (no model needed)."""
    shapes_file = os.path.join(path, "params_shapes.json")
    shapes = read_json(shapes_file, WeightsError)
    try:
        return [tuple(int(d) for d in s) for s in shapes]
    except (ValueError, TypeError):
        raise WeightsError(f"{shapes_file}: not a JSON list of shapes") from None


def read_hf_config(path):
    config = read_json(os.path.join(path, "config.json"), WeightsError)
    if not isinstance(config, dict):
        raise WeightsError(f"{os.path.join(path, 'config.json')}: expected a JSON object")
    return config


def pretrained_sizes(path):
    """(token rows, position rows, n_embd, n_layer, recorded config) of the weights in `path`, from
    their metadata only."""
    if weights_format(path) == "openai":
        shapes = read_shapes(path)
        if len(shapes) < 2:
            raise WeightsError(f"{os.path.join(path, 'params_shapes.json')}: expected 2 + 12 x n_layer shapes")
        return shapes[1][0], shapes[0][0], shapes[0][-1], (len(shapes) - 2) // 12, {}
    config = read_hf_config(path)
    return (int(config.get("vocab_size", N_VOCAB)), int(config.get("n_positions", 512)),
            int(config.get("n_embd", 768)), int(config.get("n_layer", 12)), config)


def exported_special_tokens(path, n_rows):
    """Names, in id order, of the special rows that a Hugging Face folder's token embedding of n_rows
    rows holds after its vocabulary: the added tokens of `added_tokens.json` (as export_hf.py and
    `transformers` write it) whose ids are the last rows. [] for OpenAI's shards, or where there
    are none (the pre-trained weights)."""
    file = os.path.join(path, "added_tokens.json")
    if weights_format(path) != "hf" or not os.path.exists(file):
        return []
    added = read_json(file, WeightsError)
    if not isinstance(added, dict) or not all(type(i) is int for i in added.values()):
        raise WeightsError(f"{file}: expected a JSON object of token name -> id")
    names = [name for name, _ in sorted(added.items(), key=lambda item: item[1])]
    if sorted(added.values()) != list(range(n_rows - len(names), n_rows)):
        return []  # added to the tokenizer only: the embedding holds no row for them
    return names


# ---------------------------------------------------------------------------------------------
# Reading into a model
# ---------------------------------------------------------------------------------------------

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
    load = _load_openai_shards if weights_format(path) == "openai" else _load_hf_checkpoint
    load(body, path, n_ctx, n_special, n_transfer, special_rows)
    if verbose:
        print(f"loaded pre-trained weights from {path} (n_transfer={n_transfer})")
    return model


def _embedding_layout(body, n_vocab, n_pos_rows, n_ctx, n_special, source):
    """Resolve n_ctx/n_special (-1 = infer from the model) and check `we` fits the model."""
    rows = body.embed.weight.size(0)
    n_ctx = body.n_ctx if n_ctx < 0 else n_ctx
    if n_ctx > n_pos_rows:
        raise WeightsError(f"{source}: n_ctx={n_ctx} but the position table has only {n_pos_rows} rows")
    if n_special < 0:
        n_special = rows - n_vocab - n_ctx
    if n_vocab + n_special + n_ctx != rows or n_special < 0:
        raise WeightsError(
            f"{source}: the embedding would have {n_vocab} token + {max(n_special, 0)} special + {n_ctx} "
            f"position rows = {n_vocab + max(n_special, 0) + n_ctx}, but the model's embedding has {rows} rows "
            f"(vocab={rows}); build the model with vocab = n_vocab + n_special + n_ctx")
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


def read_npy_header(f, file_name):
    """Check a shard's .npy header (1-D little-endian float32, C order); return its length."""
    try:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"unsupported .npy format version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
    except (ValueError, OSError, EOFError) as err:
        raise WeightsError(f"{file_name}: not a valid .npy file ({err})") from None
    if dtype != np.dtype("<f4"):
        raise WeightsError(f"{file_name}: expected float32 data, found {dtype}")
    if len(shape) != 1 or fortran_order:
        raise WeightsError(f"{file_name}: expected a 1-D array, found shape {shape}")
    return shape[0]


def _checked_shapes(path, n_embd):
    """params_shapes.json, checked against a model with n_embd; (shapes, layers held)."""
    shapes_file = os.path.join(path, "params_shapes.json")
    shapes = read_shapes(path)
    if len(shapes) < 2 or (len(shapes) - 2) % 12:
        raise WeightsError(f"{shapes_file}: expected 2 + 12 x n_layer shapes, found {len(shapes)}")
    n_layers = (len(shapes) - 2) // 12
    for i, (found, want) in enumerate(zip(shapes, openai_shapes(shapes[1][0], shapes[0][0], n_embd, n_layers))):
        if tuple(found) != tuple(want):
            raise WeightsError(f"{shapes_file}: array {i} has shape {list(found)} but a model with n_embd={n_embd} "
                               f"expects {list(want)}")
    return shapes, n_layers


def _checked_shards(path, total):
    """The ten shard files and their lengths: headers and sizes checked before anything is written."""
    files = [os.path.join(path, f"params_{i}.npy") for i in range(N_SHARDS)]
    missing = [os.path.basename(f) for f in files if not os.path.exists(f)]
    extra = sorted(f for f in os.listdir(path) if f.startswith("params_") and f.endswith(".npy")
                   and os.path.join(path, f) not in files)
    if missing or extra:
        raise WeightsError(f"{path}: expected exactly {N_SHARDS} shards params_0.npy ... params_{N_SHARDS - 1}.npy; "
                           + (f"missing: {', '.join(missing)}. " if missing else "")
                           + (f"unexpected: {', '.join(extra)}. " if extra else "") + WEIGHTS_HINT)
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
        raise WeightsError(f"{path}: the shards hold {sum(lengths)} values in all but params_shapes.json "
                           f"describes {total}")
    return files, lengths


class _FlatReader:
    """Reads the ten shards as one flat float32 stream, sequentially, into given buffers."""

    def __init__(self, files, lengths):
        self.files, self.lengths = files, lengths
        self.index, self.left, self.f = -1, 0, None

    def read_into(self, out):
        """Fill the 1-D float32 array `out` (an int: skip that many values)."""
        n = out if isinstance(out, int) else out.size
        done = 0
        while done < n:
            if self.left == 0:
                self.close()
                self.index += 1
                self.f = open(self.files[self.index], "rb")
                read_npy_header(self.f, self.files[self.index])
                self.left = self.lengths[self.index]
            k = min(self.left, n - done)
            if isinstance(out, int):
                self.f.seek(4 * k, os.SEEK_CUR)
            elif self.f.readinto(memoryview(out[done:done + k]).cast("B")) != 4 * k:
                raise WeightsError(f"{self.files[self.index]}: truncated while reading")
            self.left -= k
            done += k

    def close(self):
        if self.f:
            self.f.close()


def _load_openai_shards(body, path, n_ctx, n_special, n_transfer, special_rows=None):
    shapes, n_layers_file = _checked_shapes(path, body.cfg.n_embd)
    sizes = [int(np.prod(s)) for s in shapes]
    files, lengths = _checked_shards(path, sum(sizes))
    source = os.path.join(path, "params_shapes.json")
    n_layers = _layers_to_load(body, n_transfer, n_layers_file, source)
    if n_transfer == -1:
        return
    n_vocab = shapes[1][0]
    n_ctx, n_special = _embedding_layout(body, n_vocab, shapes[0][0], n_ctx, n_special, source)
    we = body.embed.weight
    # where each array of the flat stream goes: (tensor, first value, how many; the rest is skipped)
    targets = [(we, (n_vocab + n_special) * we.size(1), n_ctx * we.size(1)), (we, 0, n_vocab * we.size(1))]
    targets += [(t, 0, t.numel()) for block in body.h[:n_layers] for t in map(block.get_parameter, LAYER_PARAMS)]
    reader = _FlatReader(files, lengths)
    try:
        for size, (tensor, start, count) in zip(sizes, targets):
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
    st_file, bin_file = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    try:
        if os.path.exists(st_file):
            from safetensors import safe_open
            handle = safe_open(st_file, framework="pt")
            return st_file, set(handle.keys()), handle.get_tensor
        if os.path.exists(bin_file):
            state = torch.load(bin_file, map_location="cpu", weights_only=True, mmap=True)
            return bin_file, set(state), state.__getitem__
    except Exception as err:  # both libraries raise their own error types
        raise WeightsError(f"{st_file if os.path.exists(st_file) else bin_file}: cannot be read safely as weights "
                           f"({err})") from None
    raise WeightsError(f"{path}: config.json found but neither model.safetensors nor pytorch_model.bin. {WEIGHTS_HINT}")


def _load_hf_checkpoint(body, path, n_ctx, n_special, n_transfer, special_rows=None):
    config = read_hf_config(path)
    for key in ("n_embd", "n_head"):
        if key in config and config[key] != getattr(body.cfg, key):
            raise WeightsError(f"{os.path.join(path, 'config.json')}: {key}={config[key]} but the model has "
                               f"{key}={getattr(body.cfg, key)}")
    source, names, get = _open_hf_weights(path)
    prefix = "transformer." if "transformer.tokens_embed.weight" in names else ""

    def tensor(name, shape=None):
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
    tokens, positions = tensor("tokens_embed.weight"), tensor("positions_embed.weight")
    for name, t in (("tokens_embed.weight", tokens), ("positions_embed.weight", positions)):
        if t.dim() != 2 or t.size(1) != body.cfg.n_embd:
            raise WeightsError(f"{source}: tensor {prefix + name!r} has shape {list(t.shape)}, expected "
                               f"[rows, {body.cfg.n_embd}]")
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
# Writing: random weights in the exact formats, and the export of a model
# ---------------------------------------------------------------------------------------------

def random_openai_arrays(n_vocab=N_VOCAB, n_ctx=512, n_embd=768, n_layer=12, seed=0):
    """The arrays of params_shapes.json order: weights ~ N(0, 0.02), LN gains ~ 1 + N(0, 0.1)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for i, shape in enumerate(openai_shapes(n_vocab, n_ctx, n_embd, n_layer)):
        is_gain = i >= 2 and (i - 2) % 12 in (4, 10)  # ln_1/g, ln_2/g
        a = rng.standard_normal(shape, dtype=np.float32)
        arrays.append((1 + 0.1 * a) if is_gain else 0.02 * a)
    return arrays


def write_openai_weights(path, arrays=None, n_shards=N_SHARDS, **sizes):
    """Write params_shapes.json and params_0.npy ... as the OpenAI release does; return the arrays.

    The flat concatenation of all arrays is cut into `n_shards` nearly equal 1-D float32 pieces.
    """
    if arrays is None:
        arrays = random_openai_arrays(**sizes)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "params_shapes.json"), "w") as f:
        json.dump([list(a.shape) for a in arrays], f)
    flat = np.concatenate([a.ravel() for a in arrays]).astype(np.float32)
    for i, piece in enumerate(np.array_split(flat, n_shards)):
        np.save(os.path.join(path, f"params_{i}.npy"), piece)
    return arrays


def hf_state(token_rows, position_rows, layers, prefix=""):
    """A Hugging Face `openai-gpt` state dict from the token and position rows and, per layer, a
    dict of our parameter names (Conv1D weights [nx, nf]: no transpose) to tensors."""
    state = {f"{prefix}tokens_embed.weight": token_rows, f"{prefix}positions_embed.weight": position_rows}
    for i, layer in enumerate(layers):
        state.update({f"{prefix}h.{i}.{theirs}": layer[ours] for ours, theirs in zip(LAYER_PARAMS, HF_LAYER_PARAMS)})
    return {name: torch.as_tensor(t).detach().cpu().contiguous().clone() for name, t in state.items()}


def hf_config(cfg, n_token_rows, n_positions, double_heads=False):
    """config.json of a model of GPTConfig `cfg` (tanh GELU is transformers' "gelu" for openai-gpt)."""
    return {
        "model_type": "openai-gpt",
        "architectures": ["OpenAIGPTDoubleHeadsModel" if double_heads else "OpenAIGPTLMHeadModel"],
        "vocab_size": n_token_rows, "n_positions": n_positions, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "afn": cfg.afn, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "embd_pdrop": cfg.embd_pdrop, "attn_pdrop": cfg.attn_pdrop, "resid_pdrop": cfg.resid_pdrop,
        "summary_type": "cls_index", "summary_use_proj": True, "summary_activation": None,
        "summary_proj_to_labels": True, "summary_first_dropout": cfg.clf_pdrop,
        "tie_word_embeddings": True, "torch_dtype": "float32",
    }


def _write_hf(path, config, state, fmt="safetensors"):
    """config.json and the weights, each written atomically (a failed write: a WriteError naming it)."""
    from safetensors.torch import save

    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    atomic_write_text(os.path.join(path, "config.json"), json.dumps(config, indent=2))
    if fmt == "safetensors":
        data = save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"})
        atomic_write(os.path.join(path, "model.safetensors"), lambda tmp: _write_bytes(tmp, data))
    else:
        atomic_write(os.path.join(path, "pytorch_model.bin"), lambda tmp: torch.save(state, tmp))


def _write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def write_hf_weights(path, arrays, n_head, fmt="safetensors"):
    """Write config.json and model.safetensors (or pytorch_model.bin) holding OpenAI-ordered `arrays`."""
    layers = [{ours: a.reshape(a.shape[1:]) if a.ndim == 3 else a for ours, a in zip(LAYER_PARAMS, arrays[k:k + 12])}
              for k in range(2, len(arrays), 12)]
    n_positions, n_embd = arrays[0].shape
    cfg = SimpleNamespace(n_embd=n_embd, n_layer=len(layers), n_head=n_head, afn="gelu", embd_pdrop=0.1,
                          attn_pdrop=0.1, resid_pdrop=0.1, clf_pdrop=0.1)
    _write_hf(path, hf_config(cfg, arrays[1].shape[0], n_positions), hf_state(arrays[1], arrays[0], layers), fmt)


def write_hf_model(model, out_dir, n_token_rows, multiple_choice_head=None):
    """Write `model` (LMModel, DoubleHeadModel or TransformerModel) as config.json and model.safetensors:
    `tokens_embed` gets its first n_token_rows rows (tokens, then specials), `positions_embed` the rest;
    `multiple_choice_head` (a DoubleHeadModel's multiple-choice linear layer) goes to the summary head."""
    body = _body(model)
    we = body.embed.weight.float()
    layers = [{name: block.get_parameter(name).float() for name in LAYER_PARAMS} for block in body.h]
    state = hf_state(we[:n_token_rows], we[n_token_rows:], layers, prefix="transformer.")
    if multiple_choice_head is not None:
        state["multiple_choice_head.summary.weight"] = multiple_choice_head.weight.detach().cpu().clone()
        state["multiple_choice_head.summary.bias"] = multiple_choice_head.bias.detach().cpu().clone()
    _write_hf(out_dir, hf_config(body.cfg, n_token_rows, body.n_ctx, multiple_choice_head is not None), state)


class ExportError(ValueError):
    """The model cannot be written in the Hugging Face format as asked."""


def special_token_names(text_encoder, n_special, special_tokens=None):
    """Names of the n_special rows: those the encoder holds (ids n_vocab ...), else the given ones,
    else a fine-tune's three (_start_, _delimiter_, _classify_)."""
    held = sorted((i, name) for name, i in text_encoder.encoder.items() if i >= text_encoder.n_vocab)
    defaults = ("_start_", "_delimiter_", "_classify_") if n_special == 3 else ()
    names = [name for _, name in held] or list(special_tokens or defaults)
    if len(names) != n_special:
        raise ExportError(f"the model has {n_special} special rows but {len(names)} special token names were "
                          f"found ({names}); give their names in id order (--special_tokens)")
    return names


def write_tokenizer(text_encoder, special_names, out_dir, n_ctx):
    """vocab.json and merges.txt (the base vocabulary, as OpenAI's files), the specials as added tokens."""
    n_vocab = text_encoder.n_vocab
    base = sorted(((i, piece) for piece, i in text_encoder.encoder.items() if i < n_vocab))
    atomic_write_text(os.path.join(out_dir, "vocab.json"), json.dumps({piece: i for i, piece in base},
                                                                      ensure_ascii=False))
    merges = sorted(text_encoder.bpe_ranks, key=text_encoder.bpe_ranks.get)
    atomic_write_text(os.path.join(out_dir, "merges.txt"), "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    unknown = base[0][1]  # id 0, what an unknown piece becomes (docs/reference.md §4)
    specials = {name: n_vocab + k for k, name in enumerate(special_names)}
    added = {str(i): dict(content=name, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
             for name, i in specials.items()}
    files = {
        "tokenizer_config.json": dict(tokenizer_class="OpenAIGPTTokenizer", unk_token=unknown, model_max_length=n_ctx,
                                      additional_special_tokens=special_names, added_tokens_decoder=added,
                                      clean_up_tokenization_spaces=False),
        "special_tokens_map.json": dict(unk_token=unknown, additional_special_tokens=special_names),
        "added_tokens.json": specials,
    }
    for name, content in files.items():
        atomic_write_text(os.path.join(out_dir, name), json.dumps(content, indent=2, ensure_ascii=False))


def save_hf_checkpoint(model, text_encoder, out_dir, special_tokens=None):
    """Write `model` (DoubleHeadModel with a multiple-choice head, LMModel or TransformerModel) and
    its vocabulary to `out_dir` as config.json, model.safetensors, vocab.json, merges.txt and the
    tokenizer's special-token files (docs/export.md). Returns out_dir.

    For `OpenAIGPTDoubleHeadsModel`, set mc_token_ids to the index of the FIRST `_classify_` token
    of each sequence: that is where our classifier reads the hidden state.
    """
    body = _body(model)
    head = getattr(model, "task_head", None)
    if head is not None and getattr(head, "kind", None) != "multiple_choice":
        raise ExportError(f"transformers' OpenAIGPTDoubleHeadsModel has a multiple-choice head only; this model's "
                          f"task head is {type(head).__name__}. Export its language model instead: "
                          "export_hf.py --lm_only, or save_hf_checkpoint(model.transformer, ...)")
    n_vocab, rows = text_encoder.n_vocab, body.embed.weight.size(0)
    n_special = rows - n_vocab - body.n_ctx
    if n_special < 0:
        raise ExportError(f"the model's embedding has {rows} rows, fewer than the vocabulary's {n_vocab} tokens + "
                          f"n_ctx={body.n_ctx} positions: the vocabulary does not belong to this model")
    names = special_token_names(text_encoder, n_special, special_tokens)
    write_hf_model(model, out_dir, n_vocab + n_special, None if head is None else head.linear)
    write_tokenizer(text_encoder, names, out_dir, body.n_ctx)
    return out_dir
