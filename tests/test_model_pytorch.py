"""model_pytorch: parity with `transformers`' OpenAI GPT, the loader and the network (docs/reference.md §1-2)."""

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model_pytorch as mp
from conftest import ROOT, TEST_DATA, TINY, TINY_HEADS, make_inputs, tiny_config
from model_pytorch import (
    DEFAULT_CONFIG,
    DoubleHeadModel,
    LMModel,
    TransformerModel,
    WeightsError,
    load_openai_pretrained_model,
)
from random_weights import random_openai_arrays, write_hf_weights, write_openai_weights

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


def hf_reference(hf_dir):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.OpenAIGPTLMHeadModel.from_pretrained(str(hf_dir), output_loading_info=True)
    assert not any(info.values()), info  # every tensor was found under transformers' own name
    # its modeling_openai maps afn "gelu" to the tanh form (gelu_new), as the TF code
    assert model.config.afn == "gelu" and type(model.transformer.h[0].mlp.act).__name__ == "NewGELUActivation"
    return model.eval()


def compare_with_hf(ours, hf, n_vocab, n_special, shape, seed=0):
    x = make_inputs(n_vocab, n_special, ours.n_ctx, shape, seed=seed)
    with torch.no_grad():
        h = ours(x)
        logits = F.linear(h, ours.embed.weight)[..., :n_vocab]
        out = hf(input_ids=x[..., 0], output_hidden_states=True)
    h_err = (h - out.hidden_states[-1]).abs().max().item()
    logit_err = (logits - out.logits).abs().max().item()
    return h_err, logit_err


# ----------------------------------------------------------------------------- parity

def test_parity_with_transformers_tiny(tiny_openai_dir, tiny_arrays, tmp_path):
    ours = load_tiny(tiny_model().eval(), tiny_openai_dir)
    hf = hf_reference(write_hf_checkpoint(tmp_path / "hf", tiny_arrays, TINY_HEADS))
    h_err, logit_err = compare_with_hf(ours, hf, TINY["n_vocab"], N_SPECIAL, (3, TINY["n_ctx"]))
    print(f"tiny parity: hidden {h_err:.2e}, logits {logit_err:.2e}")
    # measured: hidden 4.8e-07, logits 8.9e-08 (at most 1.2e-06, 1.2e-07 over the CPU kernels tried)
    assert h_err <= 5e-6 and logit_err <= 1e-6


@pytest.mark.slow
def test_parity_with_transformers_full_size(full_size_weights, tmp_path):
    arrays, openai_dir, _ = full_size_weights
    ours = TransformerModel(DEFAULT_CONFIG, vocab=40478 + N_SPECIAL + 512, n_ctx=512).eval()
    load_openai_pretrained_model(ours, n_special=N_SPECIAL, path=str(openai_dir))
    hf = hf_reference(write_hf_checkpoint(tmp_path / "hf", arrays, n_head=12))
    h_err, logit_err = compare_with_hf(ours, hf, 40478, N_SPECIAL, (2, 77))
    print(f"full-size parity: hidden {h_err:.2e}, logits {logit_err:.2e}")
    # measured: hidden 3.1e-06, logits 1.9e-06 (at most 5.5e-06, 3.1e-06 over the CPU kernels tried)
    assert h_err <= 3e-5 and logit_err <= 2e-5


def test_fused_attention_equals_explicit_softmax():
    fused = tiny_model().eval()
    explicit = tiny_model(fused_attention=False).eval()
    explicit.load_state_dict(fused.state_dict())
    x = make_inputs(TINY["n_vocab"], N_SPECIAL, 16, (4, 16))
    with torch.no_grad():
        err = (fused(x) - explicit(x)).abs().max().item()
    print(f"fused vs explicit attention: {err:.2e}")
    assert err <= 4e-6  # measured 4.8e-07 (3.6e-07 with other CPU kernels)


def test_explicit_attention_is_the_tf_formula():
    q, k, v = torch.randn(3, 2, 4, 7, 8).unbind(0)
    w = q @ k.transpose(-1, -2) / np.sqrt(8)
    w = w.masked_fill(~torch.tril(torch.ones(7, 7, dtype=torch.bool)), float("-inf"))
    expected = torch.softmax(w, -1) @ v
    got = mp.explicit_causal_attention(q, k, v, torch.nn.Identity())
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-7)  # measured 0: -1e9 and -inf both give exp 0


def test_gelu_is_tanh_form():
    """The fused kernel computes the TF formula, and its gradient is the formula's derivative."""
    x = np.linspace(-8, 8, 2001)
    c = np.sqrt(2 / np.pi)
    t = np.tanh(c * (x + 0.044715 * x ** 3))
    ref = 0.5 * x * (1 + t)
    ref_grad = 0.5 * (1 + t) + 0.5 * x * (1 - t ** 2) * c * (1 + 3 * 0.044715 * x ** 2)
    # measured: float64 8.9e-16 (value) and 5.1e-15 (gradient); float32 5.4e-7 and 1.0e-6
    for dtype, atol in ((torch.float64, 4e-14), (torch.float32, 8e-6)):
        xt = torch.tensor(x, dtype=dtype, requires_grad=True)
        y = mp.gelu(xt)
        y.sum().backward()
        torch.testing.assert_close(y.double(), torch.as_tensor(ref), rtol=0, atol=atol)
        torch.testing.assert_close(xt.grad.double(), torch.as_tensor(ref_grad), rtol=0, atol=atol)


# ----------------------------------------------------------------------------- loader

def test_shards_load_in_openai_order(tmp_path):
    order = openai_order(TINY["n_vocab"], TINY["n_ctx"], TINY["n_embd"], TINY["n_layer"])
    arrays = labelled_arrays(order)
    write_openai_weights(tmp_path, arrays)
    model = load_tiny(tiny_model(), tmp_path, n_special=N_SPECIAL)
    we = model.embed.weight.detach().numpy()
    assert np.array_equal(we[: TINY["n_vocab"]], arrays[1])
    assert np.array_equal(we[TINY["n_vocab"] + N_SPECIAL:], arrays[0])
    for k, (tf_name, _) in enumerate(order[2:], start=2):
        got = model.get_parameter(our_name(tf_name)).detach().numpy()
        assert np.array_equal(got, arrays[k].reshape(got.shape)), \
            f"{our_name(tf_name)} holds array {label(got)}, expected array {k} ({tf_name})"
    assert {our_name(n) for n, _ in order[2:]} == {n for n, _ in model.named_parameters()} - {"embed.weight"}


def test_hugging_face_names_are_transformers_module_names(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D as HFConv1D

    hf = transformers.OpenAIGPTModel(transformers.OpenAIGPTConfig(
        vocab_size=TINY["n_vocab"], n_positions=TINY["n_ctx"], n_embd=TINY["n_embd"], n_layer=TINY["n_layer"],
        n_head=TINY_HEADS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, p in enumerate(hf.parameters()):
            p.copy_(100 * k + torch.randn(p.shape, generator=g))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_tiny(tiny_model(), tmp_path, n_special=N_SPECIAL)

    we = model.embed.weight
    assert torch.equal(we[: TINY["n_vocab"]], hf.tokens_embed.weight)
    assert torch.equal(we[TINY["n_vocab"] + N_SPECIAL:], hf.positions_embed.weight)
    leaves = {HFConv1D: {"w": "weight", "b": "bias"}, torch.nn.LayerNorm: {"g": "weight", "b": "bias"}}
    checked = set()
    for path, module in hf.named_modules():
        for ours, theirs in leaves.get(type(module), {}).items():
            got, want = model.get_parameter(f"{path}.{ours}"), getattr(module, theirs)
            assert torch.equal(got, want), f"{path}.{ours} holds {label(got.detach())}, expected {path}.{theirs}"
            checked.add(f"{path}.{ours}")
    assert checked == {n for n, _ in model.named_parameters()} - {"embed.weight"}


def test_n_ctx_and_n_special(tiny_openai_dir, tiny_arrays):
    n_ctx, n_special, n_vocab = 9, 4, TINY["n_vocab"]
    model = TransformerModel(tiny_config(), vocab=n_vocab + n_special + n_ctx, n_ctx=n_ctx)
    load_tiny(model, tiny_openai_dir, n_ctx=n_ctx, n_special=n_special)
    we = model.embed.weight.detach().numpy()
    assert np.array_equal(we[:n_vocab], tiny_arrays[1])
    assert np.array_equal(we[n_vocab + n_special:], tiny_arrays[0][:n_ctx])
    special = we[n_vocab:n_vocab + n_special]
    assert not np.isin(special, tiny_arrays[0]).any() and not np.isin(special, tiny_arrays[1]).any()
    assert 0.005 < special.std() < 0.05  # N(0, 0.02) rows


def test_n_transfer(tiny_openai_dir, tiny_arrays):
    before = tiny_model()
    untouched = {k: v.clone() for k, v in before.state_dict().items()}
    load_tiny(before, tiny_openai_dir, n_transfer=-1)
    assert all(torch.equal(v, before.state_dict()[k]) for k, v in untouched.items())

    model = tiny_model()
    layer1 = model.h[1].attn.c_attn.w.detach().clone()
    load_tiny(model, tiny_openai_dir, n_transfer=1)
    assert np.array_equal(model.h[0].attn.c_attn.w.detach().numpy(), tiny_arrays[2][0])
    assert torch.equal(model.h[1].attn.c_attn.w, layer1)
    assert np.array_equal(model.embed.weight[: TINY["n_vocab"]].detach().numpy(), tiny_arrays[1])


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hugging_face_format_loads_the_same(tmp_path, tiny_openai_dir, tiny_arrays, fmt):
    write_hf_weights(tmp_path / fmt, tiny_arrays, TINY_HEADS, fmt=fmt)
    torch.manual_seed(3)
    a = load_tiny(tiny_model(), tiny_openai_dir)
    torch.manual_seed(3)
    b = load_tiny(tiny_model(), tmp_path / fmt)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_loads_into_double_head_model(tiny_openai_dir, tiny_arrays):
    model = load_tiny(tiny_model(cls=DoubleHeadModel), tiny_openai_dir)
    assert np.array_equal(model.transformer.h[0].ln_1.g.detach().numpy(), tiny_arrays[6])
    assert model.lm_head.decoder.weight is model.transformer.embed.weight


# ----------------------------------------------------------------------------- bad weights

def expect_error(path, match, **kw):
    with pytest.raises(WeightsError, match=match):
        load_tiny(tiny_model(), path, **kw)


def test_missing_folder_has_a_hint(tmp_path):
    expect_error(tmp_path / "nowhere", r"does not exist.*model/README.md")


def test_empty_folder(tmp_path):
    expect_error(tmp_path, r"neither params_shapes.json.*nor config.json")


def test_missing_shard(tiny_openai_dir):
    os.remove(tiny_openai_dir / "params_7.npy")
    expect_error(tiny_openai_dir, r"missing: params_7.npy")


def test_extra_shard(tiny_openai_dir):
    np.save(tiny_openai_dir / "params_10.npy", np.zeros(3, np.float32))
    expect_error(tiny_openai_dir, r"unexpected: params_10.npy")


def test_truncated_shard(tiny_openai_dir):
    path = tiny_openai_dir / "params_3.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    expect_error(tiny_openai_dir, r"params_3.npy: truncated.*promises \d+ float32 values")


def test_shard_sizes_do_not_add_up(tiny_openai_dir):
    np.save(tiny_openai_dir / "params_9.npy", np.zeros(5, np.float32))
    expect_error(tiny_openai_dir, r"shards hold \d+ values in all but params_shapes.json describes \d+")


def test_non_float32_shard(tiny_openai_dir):
    path = tiny_openai_dir / "params_2.npy"
    np.save(path, np.load(path).astype(np.float64))
    expect_error(tiny_openai_dir, r"params_2.npy: expected float32 data, found float64")


def test_not_an_npy_file(tiny_openai_dir):
    (tiny_openai_dir / "params_0.npy").write_bytes(b"garbage")
    expect_error(tiny_openai_dir, r"params_0.npy: not a valid .npy file")


def test_shapes_do_not_match_config(tmp_path):
    write_openai_weights(tmp_path, n_vocab=60, n_ctx=16, n_embd=24, n_layer=2)
    expect_error(tmp_path, r"params_shapes.json: array 0 has shape \[16, 24\] but a model with "
                           r"n_embd=32 expects \[16, 32\]")


def test_vocab_rows_do_not_match(tiny_openai_dir):
    model = TransformerModel(tiny_config(), vocab=100, n_ctx=16)
    with pytest.raises(WeightsError, match=r"60 token \+ 3 special \+ 16 position rows = 79.*has 100 rows"):
        load_tiny(model, tiny_openai_dir, n_special=3)


def test_n_ctx_beyond_position_table(tiny_openai_dir):
    model = TransformerModel(tiny_config(), vocab=60 + 32, n_ctx=32)
    with pytest.raises(WeightsError, match=r"n_ctx=32 but the position table has only 16 rows"):
        load_tiny(model, tiny_openai_dir)


def test_too_few_layers_in_file(tmp_path):
    write_openai_weights(tmp_path, n_vocab=60, n_ctx=16, n_embd=32, n_layer=1)
    expect_error(tmp_path, r"n_transfer=2 but the weights hold only 1 layers")


def test_hf_wrong_shape_and_dtype(tmp_path, tiny_arrays):
    bad = list(tiny_arrays)
    bad[2] = bad[2][:, :, :48]  # layer 0 c_attn.w cut short
    write_hf_weights(tmp_path / "shape", bad, TINY_HEADS)
    expect_error(tmp_path / "shape", r"'h.0.attn.c_attn.weight' has shape \[32, 48\], expected \[32, 96\]")
    bad = [a.astype(np.float16) if i == 3 else a for i, a in enumerate(tiny_arrays)]
    write_hf_weights(tmp_path / "dtype", bad, TINY_HEADS)
    expect_error(tmp_path / "dtype", r"'h.0.attn.c_attn.bias' is torch.float16, expected torch.float32")


def test_hf_missing_weights_file(tmp_path, tiny_arrays):
    write_hf_weights(tmp_path, tiny_arrays, TINY_HEADS)
    os.remove(tmp_path / "model.safetensors")
    expect_error(tmp_path, r"neither model.safetensors nor pytorch_model.bin")


# ----------------------------------------------------------------------------- network behaviour

def test_pooling_takes_the_first_classify_token():
    h = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1).expand(2, 5, 3)
    x = torch.zeros(1, 2, 5, 2, dtype=torch.long)
    x[0, 0, [1, 3], 0] = 9
    x[0, 1, [4], 0] = 9
    pooled = mp.pool_classify_states(h, x, clf_token=9)
    assert pooled[:, 0].tolist() == [1.0, 9.0]


def test_missing_classify_token_is_a_clear_error():
    model = tiny_model(cls=DoubleHeadModel).eval()
    x = make_inputs(TINY["n_vocab"], N_SPECIAL, 8, (2, 2, 8), high=TINY["n_vocab"] - 5)
    x[0, 0, 7, 0] = model.task_head.clf_token
    with pytest.raises(ValueError, match=r"3 of 4 sequences have no classify token"):
        model(x)


def test_lm_logits_restricted_to_masked_positions():
    model = tiny_model(cls=DoubleHeadModel).eval()
    x = make_inputs(TINY["n_vocab"], N_SPECIAL, 10, (3, 2, 10))
    x[..., 6, 0] = model.task_head.clf_token
    mask = torch.zeros(3, 2, 10)
    mask[..., :7] = 1
    mask[1, 0, :9] = 1
    full, clf_a = model(x)
    part, clf_b = model(x, mask=mask)
    keep = mask.view(-1, 10)[:, 1:].reshape(-1).bool()
    # measured 0 here; 6.0e-08 (1 ulp) with one thread and MKL_CBWR=COMPATIBLE: another GEMM blocking
    torch.testing.assert_close(part, full[keep], rtol=0, atol=5e-7)
    torch.testing.assert_close(clf_a, clf_b, rtol=0, atol=1e-7)  # measured 0; values below 0.03
    assert model(x, compute_lm=False)[0] is None


def numpy_lm_losses_and_grads(h, we, targets, grad):
    """docs/reference.md §2's LM cross-entropy in float64 NumPy, and its gradients by hand."""
    h, we, grad = (np.asarray(a, np.float64) for a in (h, we, grad))
    logits = h @ we.T
    top = logits.max(1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(1))
    rows = np.arange(len(targets))
    losses = log_norm - logits[rows, targets]
    d_logits = np.exp(logits - log_norm[:, None]) * grad[:, None]
    d_logits[rows, targets] -= grad
    return losses, d_logits @ we, d_logits.T @ h


@pytest.mark.parametrize("n_vocab", [37, 48])  # rows of the logits padded to 64 bytes, or not
def test_lm_head_losses_equal_the_cross_entropy_formula(n_vocab):
    torch.manual_seed(0)
    h = torch.randn(23, 16, requires_grad=True)
    we = (torch.randn(n_vocab, 16) * 0.5).requires_grad_()
    targets = torch.randint(0, n_vocab, (23,))
    grad = torch.rand(23)
    losses = mp.lm_head_losses(h, we, targets)
    losses.backward(grad)
    ref, ref_h, ref_we = numpy_lm_losses_and_grads(h.detach(), we.detach(), targets.numpy(), grad)
    # measured up to 5.9e-7 (losses up to 9), 2.2e-7 and 7.7e-7 (gradients)
    torch.testing.assert_close(losses.double(), torch.as_tensor(ref), rtol=0, atol=5e-6)
    torch.testing.assert_close(h.grad.double(), torch.as_tensor(ref_h), rtol=0, atol=3e-6)
    torch.testing.assert_close(we.grad.double(), torch.as_tensor(ref_we), rtol=0, atol=3e-6)
    again = mp.lm_head_losses(h, we, targets).sum()
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):  # its backward reuses the logits' memory
        again.backward()


def test_lm_head_losses_under_autocast_are_the_plain_computation():
    h, we, targets = torch.randn(9, 16), torch.randn(40, 16), torch.randint(0, 40, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mp.lm_head_losses(h, we, targets)
        expected = F.cross_entropy(F.linear(h, we).float(), targets, reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_model_lm_losses_equal_the_losses_of_its_logits():
    """The training path (`lm_losses=True`) against the logits path, both heads, with a plan."""
    from loss import lm_losses, sequence_means

    model = tiny_model(cls=DoubleHeadModel).eval()
    x = make_inputs(TINY["n_vocab"], N_SPECIAL, 10, (3, 2, 10))
    mask = np.zeros((3, 2, 10), np.float32)
    mask[..., :7] = 1
    mask[1, 0, :9] = 1
    x[..., 6, 0] = model.task_head.clf_token
    x[1, 0, 6, 0], x[1, 0, 8, 0] = 5, model.task_head.clf_token
    plan = mp.BatchPlan.build(x.numpy(), mask, model.task_head.clf_token)
    logits, clf_a = model(x, plan=plan)
    rows, clf_b = model(x, plan=plan, lm_losses=True)
    expected = lm_losses(x, torch.from_numpy(mask), logits, plan=plan)
    torch.testing.assert_close(sequence_means(rows, plan), expected, rtol=0, atol=2e-6)  # measured 4.8e-7
    torch.testing.assert_close(clf_a, clf_b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="BatchPlan"):
        model(x, lm_losses=True)


def test_skipping_padding_leaves_real_tokens_unchanged():
    model = tiny_model().eval()
    x = make_inputs(TINY["n_vocab"], N_SPECIAL, 12, (6, 12))
    lengths = torch.tensor([12, 3, 7, 1, 9, 12])
    mask = (torch.arange(12) < lengths.unsqueeze(1)).float()
    with torch.no_grad():
        full, packed = model(x), model(x, mask=mask)
    real = mask.bool()
    # measured 0 with every CPU kernel tried; values up to 3.4, so 1e-6 is about 4 float32 ulps
    torch.testing.assert_close(packed[real], full[real], rtol=0, atol=1e-6)
    assert (packed[~real] == 0).all()
    layout = mp.PaddingLayout.from_mask(mask, 6, 12)
    assert layout.index.numel() == int(lengths.sum())
    holes = mask.clone()
    holes[0, 4] = 0  # not a prefix: skipping would change what later tokens attend to
    assert mp.PaddingLayout.from_mask(holes, 6, 12) is None
    assert mp.PaddingLayout.from_mask(torch.ones(6, 12), 6, 12) is None


def capture_embeddings_and_hidden(transformer):
    """Record what the first block receives (the input embeddings) and what the transformer returns."""
    seen = {}
    transformer.h[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("embeddings", args[0]))
    transformer.register_forward_hook(lambda m, args, out: seen.__setitem__("hidden", out))
    return seen


@pytest.mark.parametrize("padded", [False, True])
def test_embedding_dropout_drops_the_matrix_shared_with_the_lm_head(padded):
    p = 0.5
    model = tiny_model(cls=DoubleHeadModel, embd_pdrop=p, attn_pdrop=0, resid_pdrop=0, clf_pdrop=0).train()
    x = make_inputs(TINY["n_vocab"], N_SPECIAL, 8, (2, 2, 8), high=6)  # few tokens, each looked up often
    x[..., -1, 0] = model.task_head.clf_token
    mask = torch.ones(2, 2, 8)
    if padded:  # the padding is skipped: only real tokens are looked up
        mask[0, 1, 5:] = 0
    seen = capture_embeddings_and_hidden(model.transformer)

    # docs/reference.md §2: ONE dropout mask on the whole matrix `we`, drawn here from the RNG state the model sees
    torch.manual_seed(11)
    we = model.transformer.embed.weight.detach()
    keep = F.dropout(torch.ones_like(we), p) > 0
    dropped = we * keep / (1 - p)
    torch.manual_seed(11)
    lm_logits, _ = model(x, mask=mask)

    real = mask.reshape(-1).bool()
    expected = (dropped[x[..., 0]] + dropped[x[..., 1]]).reshape(-1, TINY["n_embd"])[real]
    assert torch.equal(seen["embeddings"].reshape(-1, TINY["n_embd"]), expected)  # input = we[token] + we[position]
    # the LM logits come from the SAME dropped matrix, over all its rows, where the target is real
    hidden = seen["hidden"].view(4, 8, -1)[:, :-1][mask.view(4, 8)[:, 1:].bool()]
    torch.testing.assert_close(lm_logits, hidden @ dropped.T, rtol=0, atol=5e-7)  # measured 0; values below 1
    assert (~keep[x[..., 0].unique()]).any() and (~keep[x[..., 1].unique()]).any()  # the test sees dropped rows


def test_multiple_choice_dropout_mask_shared_by_choices():
    model = tiny_model(cls=DoubleHeadModel, clf_pdrop=0.5).train()
    head = model.task_head
    h = torch.ones(4 * 3, 5, TINY["n_embd"])
    x = torch.zeros(4, 3, 5, 2, dtype=torch.long)
    x[..., -1, 0] = head.clf_token
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.weight[0, 0] = 1.0  # logit = first unit of the dropped state
    logits = head(h, x)
    assert set(logits.unique().tolist()) <= {0.0, 2.0}
    assert (logits == logits[:, :1]).all()  # same mask for every choice of an example
    assert logits.shape == (4, 3)


def test_classifier_bias_starts_at_zero():
    for task in ("multiple_choice", "similarity", "inference", ("classification", 5)):
        head = mp.make_task_head(task, 1, tiny_config())
        assert torch.count_nonzero(head.linear.bias) == 0
        assert 0.01 < head.linear.weight.std() < 0.03


def test_similarity_head_is_symmetric_in_the_orderings():
    model = DoubleHeadModel(tiny_config(), 61, "similarity", vocab=60 + 3 + 16, n_ctx=16).eval()
    x = make_inputs(TINY["n_vocab"], N_SPECIAL, 8, (3, 2, 8), high=50)
    x[..., -1, 0] = 61
    _, a = model(x)
    _, b = model(x.flip(1))
    assert a.shape == (3,)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-7)  # measured 0; values below 0.4


def test_unknown_task_head():
    with pytest.raises(ValueError, match="unknown task_head_type"):
        DoubleHeadModel(tiny_config(), 1, "regression", vocab=80, n_ctx=16)


def test_state_dict_keys_follow_the_earlier_port():
    keys = set(tiny_model(cls=DoubleHeadModel).state_dict())
    for key in ("transformer.embed.weight", "transformer.h.0.attn.c_attn.w", "transformer.h.1.ln_1.g",
                "transformer.h.0.mlp.c_proj.b", "lm_head.decoder.weight", "task_head.linear.weight",
                "task_head.linear.bias"):
        assert key in keys
    state = tiny_model(cls=DoubleHeadModel).state_dict()
    assert tuple(state["transformer.h.0.attn.c_attn.w"].shape) == (TINY["n_embd"], 3 * TINY["n_embd"])


def test_loads_a_checkpoint_of_the_earlier_port():
    source = tiny_model(cls=DoubleHeadModel)
    state = source.state_dict()
    for i in range(TINY["n_layer"]):  # the earlier port saved its causal mask as `attn.b`
        state[f"transformer.h.{i}.attn.b"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
    target = tiny_model(cls=DoubleHeadModel)
    target.load_state_dict(state)
    assert torch.equal(target.transformer.h[1].attn.c_proj.w, source.transformer.h[1].attn.c_proj.w)


def test_config_from_namespace_and_dict():
    ns = argparse.Namespace(n_embd=32, n_head=4, n_layer=2, embd_pdrop=0.0, attn_pdrop=0.1, resid_pdrop=0.1,
                            clf_pdrop=0.1, afn="relu", lr=1e-3, dataset="rocstories")
    model_fields = {k: v for k, v in vars(ns).items() if k not in ("lr", "dataset")}
    for cfg in (ns, model_fields):  # a Namespace may carry a script's other flags
        model = TransformerModel(cfg, vocab=50, n_ctx=8)
        assert model.cfg.afn == "relu" and len(model.h) == 2 and model.cfg.embd_pdrop == 0.0
    assert mp.make_config(dict(n_layer=None)).n_layer == 12  # None keeps the default


def test_config_dict_with_an_unknown_key_is_refused():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) 'lr', 'n_layers'; GPTConfig's fields are "
                                         r"n_embd, n_head, n_layer, .*fused_attention"):
        mp.make_config(dict(n_layers=2, n_embd=32, n_head=4, lr=0.1))
    with pytest.raises(TypeError, match="got list"):
        mp.make_config([("n_layer", 2)])


def test_config_errors():
    with pytest.raises(ValueError, match="divisible"):
        mp.GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="unknown activation"):
        mp.GPTConfig(afn="tanh")


def test_input_longer_than_n_ctx_is_a_clear_error():
    model = tiny_model()
    x = make_inputs(TINY["n_vocab"], N_SPECIAL, 16, (1, 17))
    with pytest.raises(ValueError, match="17 positions but the model was built with n_ctx=16"):
        model(x)


def test_ids_outside_the_embedding_are_a_clear_error():
    model = tiny_model()
    x = make_inputs(TINY["n_vocab"], N_SPECIAL, 16, (1, 4))
    x[0, 2, 0] = model.vocab
    with pytest.raises(ValueError, match=r"input ids range over \d+ \.\.\. 79 but the embedding has 79 rows"):
        model(x)


def test_lm_model_probs_never_predict_positions():
    model = LMModel(tiny_config(), vocab=79, n_ctx=16, return_probs=True).eval()
    probs = model(make_inputs(60, 3, 16, (2, 5)))
    assert probs.shape == (2, 5, 79)
    assert (probs[..., -16:] == 0).all()  # exp(-1e12) underflows to exactly 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 5), rtol=0, atol=1e-6)  # measured 1.2e-07


# ----------------------------------------------------------------------------- README

@pytest.mark.slow
def test_readme_usage_snippet_runs_as_written(full_size_weights, tmp_path):
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- usage -->\s*```python\n(.*?)```", readme, re.S).group(1)
    os.symlink(full_size_weights[1], tmp_path / "model")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 5, 768])" in result.stdout


def test_fixture_shapes_match_the_real_file():
    real = json.loads((TEST_DATA / "params_shapes.json").read_text())  # OpenAI's file (model/README.md)
    assert real == [list(shape) for _, shape in openai_order(40478, 512, 768, 12)]
    assert real == mp.openai_shapes()
    assert sum(int(np.prod(s)) for s in real) == 116_534_784
    assert [list(a.shape) for a in random_openai_arrays(n_layer=1, seed=0)] == real[:14]


def test_special_rows_argument_of_the_loader(tiny_openai_dir):
    n_vocab, n_ctx = TINY["n_vocab"], TINY["n_ctx"]
    model = TransformerModel(tiny_config(), vocab=n_vocab + 3 + n_ctx, n_ctx=n_ctx)
    rows = lambda: model.embed.weight[n_vocab:n_vocab + 3].detach().numpy().copy()
    load_openai_pretrained_model(model, n_special=3, n_transfer=2, n_embd=32, path=tiny_openai_dir,
                                 special_rows=np.random.RandomState(42))
    np.testing.assert_array_equal(rows(), (np.random.RandomState(42).randn(3, 32) * 0.02).astype(np.float32))
    values = np.arange(96, dtype=np.float32).reshape(3, 32)
    load_openai_pretrained_model(model, n_special=3, n_transfer=2, n_embd=32, path=tiny_openai_dir, special_rows=values)
    np.testing.assert_array_equal(rows(), values)
    torch.manual_seed(3)
    load_openai_pretrained_model(model, n_special=3, n_transfer=2, n_embd=32, path=tiny_openai_dir)  # torch's generator
    torch.manual_seed(3)
    np.testing.assert_array_equal(rows(), torch.empty(3, 32).normal_(std=0.02).numpy())
