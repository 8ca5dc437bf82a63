"""Random "pre-trained" weights in OpenAI's exact shard format (docs/reference.md §1), and in
Hugging Face format.

The real weights are not needed to exercise the loader: tests and the demo write these instead.
"""

import json
import os

import numpy as np

from model_pytorch import HF_LAYER_PARAMS, N_SHARDS, N_VOCAB, openai_shapes


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


def hf_state_dict(arrays):
    """The same arrays under Hugging Face's `openai-gpt` names (Conv1D weights squeezed)."""
    import torch

    state = {"positions_embed.weight": arrays[0], "tokens_embed.weight": arrays[1]}
    for k, a in enumerate(arrays[2:]):
        layer, j = divmod(k, 12)
        state[f"h.{layer}.{HF_LAYER_PARAMS[j]}"] = a.reshape(a.shape[1:]) if a.ndim == 3 else a
    return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in state.items()}


def hf_config(arrays, n_head):
    n_layer = (len(arrays) - 2) // 12
    return {
        "model_type": "openai-gpt", "architectures": ["OpenAIGPTLMHeadModel"], "afn": "gelu",
        "vocab_size": arrays[1].shape[0], "n_positions": arrays[0].shape[0], "n_embd": arrays[0].shape[1],
        "n_layer": n_layer, "n_head": n_head, "layer_norm_epsilon": 1e-5,
        "embd_pdrop": 0.1, "attn_pdrop": 0.1, "resid_pdrop": 0.1,
    }


def write_hf_weights(path, arrays, n_head, fmt="safetensors"):
    """Write config.json and model.safetensors (or pytorch_model.bin) holding `arrays`."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config(arrays, n_head), f, indent=2)
    state = hf_state_dict(arrays)
    if fmt == "safetensors":
        save_file(state, os.path.join(path, "model.safetensors"))
    elif fmt == "bin":
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
    else:
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
