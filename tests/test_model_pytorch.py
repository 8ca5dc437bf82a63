"""model_pytorch: parity with `transformers`' OpenAI GPT, the network's behaviour, its forward contract
and the spec that rebuilds a model (docs/reference.md §2)."""

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model_pytorch as mp
from batches import BatchPlan, PaddingLayout
from conftest import (
    N_SPECIAL,
    TINY,
    TINY_HEADS,
    load_tiny,
    make_inputs,
    tf_lm_losses,
    tiny_config,
    tiny_model,
    write_hf_checkpoint,
)
from model_pytorch import DEFAULT_CONFIG, DoubleHeadModel, LMModel, ModelSpec, TransformerModel, build_model
from weights import load_openai_pretrained_model


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

# ----------------------------------------------------------------------------- bad weights

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


def plan_inputs(model, seed=0):
    """x [3, 2, 10, 2] with `_classify_` ending each sequence, and a prefix mask of several lengths."""
    x = make_inputs(TINY["n_vocab"], N_SPECIAL, 10, (3, 2, 10), seed=seed)
    mask = np.zeros((3, 2, 10), np.float32)
    mask[..., :7] = 1
    mask[1, 0, :9] = 1
    x[..., 6, 0] = model.task_head.clf_token
    x[1, 0, 6, 0], x[1, 0, 8, 0] = 5, model.task_head.clf_token
    return x, mask


def test_without_a_plan_the_outputs_are_the_tf_graphs():
    """LM logits h[:, :-1] · weᵀ at every position but the last, over every row of `we`, and the task logits."""
    model = tiny_model(cls=DoubleHeadModel).eval()
    x, _ = plan_inputs(model)
    lm_logits, task_logits = model(x)
    h = model.transformer(x)
    assert lm_logits.shape == (6 * 9, model.transformer.vocab)
    torch.testing.assert_close(lm_logits, h[:, :-1].reshape(-1, TINY["n_embd"]) @ model.transformer.embed.weight.T,
                               rtol=0, atol=0)
    torch.testing.assert_close(task_logits, model.task_head(h, x), rtol=0, atol=0)


@pytest.mark.parametrize("skip_padding", [True, False], ids=["trimmed", "every position"])
def test_with_a_plan_the_outputs_are_the_lm_losses_of_those_logits(skip_padding):
    """The training and evaluation contract: per-sequence LM losses (docs/reference.md §2's formula applied
    to the logits above) and the same task logits; a plan without LM rows gives no LM losses."""
    model = tiny_model(cls=DoubleHeadModel).eval()
    x, mask = plan_inputs(model)
    clf = model.task_head.clf_token
    plan = BatchPlan.build(x.numpy(), mask, clf, skip_padding=skip_padding)
    lm, task_logits = model(x, plan=plan)
    logits, task_full = model(x)
    h = model.transformer(x)
    expected = tf_lm_losses(h.detach(), model.transformer.embed.weight.detach(), x.numpy(), mask)
    np.testing.assert_allclose(lm.detach().numpy(), expected, rtol=1e-6)  # measured 1.9e-7
    torch.testing.assert_close(task_logits, task_full, rtol=0, atol=1e-6)  # measured 0 (rows skipped: 1 ulp)
    assert model(x, plan=BatchPlan.build(x.numpy(), mask, clf, lm=False))[0] is None
    lm_model = LMModel(tiny_config(), vocab=model.transformer.vocab, n_ctx=TINY["n_ctx"]).eval()
    lm_model.transformer.load_state_dict(model.transformer.state_dict())
    lm_alone, nothing = lm_model(x, plan=BatchPlan.build(x.numpy(), mask, None, skip_padding=skip_padding))
    assert nothing is None
    torch.testing.assert_close(lm_alone, lm, rtol=0, atol=0)


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
    layout = PaddingLayout.from_mask(mask, 6, 12)
    assert layout.index.numel() == int(lengths.sum())
    holes = mask.clone()
    holes[0, 4] = 0  # not a prefix: skipping would change what later tokens attend to
    assert PaddingLayout.from_mask(holes, 6, 12) is None
    assert PaddingLayout.from_mask(torch.ones(6, 12), 6, 12) is None


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
    mask = np.ones((2, 2, 8), np.float32)
    if padded:  # a plan skips the padding: only real tokens are looked up
        mask[0, 1, 5:] = 0
        x[0, 1, 4, 0] = model.task_head.clf_token
    seen = capture_embeddings_and_hidden(model.transformer)

    # docs/reference.md §2: ONE dropout mask on the whole matrix `we`, drawn here from the RNG state the model sees
    torch.manual_seed(11)
    we = model.transformer.embed.weight.detach()
    keep = F.dropout(torch.ones_like(we), p) > 0
    dropped = we * keep / (1 - p)
    torch.manual_seed(11)
    lm, _ = model(x, plan=BatchPlan.build(x.numpy(), mask, model.task_head.clf_token)) if padded else model(x)

    real = torch.from_numpy(mask).reshape(-1).bool()
    expected = (dropped[x[..., 0]] + dropped[x[..., 1]]).reshape(-1, TINY["n_embd"])[real]
    assert torch.equal(seen["embeddings"].reshape(-1, TINY["n_embd"]), expected)  # input = we[token] + we[position]
    # the LM comes from the SAME dropped matrix, over all its rows
    hidden = seen["hidden"].view(4, 8, -1)
    if padded:  # the per-sequence losses of those logits
        np.testing.assert_allclose(lm.detach().numpy(), tf_lm_losses(hidden.detach(), dropped, x.numpy(), mask),
                                   rtol=1e-6)
    else:
        torch.testing.assert_close(lm, hidden[:, :-1].reshape(-1, TINY["n_embd"]) @ dropped.T, rtol=0, atol=5e-7)
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


def test_a_spec_rebuilds_its_model():
    """What checkpoints record: through JSON and back, the same spec and a model of the same shapes."""

    for head, clf in ((None, None), ("multiple_choice", 62), (("classification", 3), 62), ("similarity", 62)):
        spec = ModelSpec(tiny_config(afn="relu"), 60, 3 if head else 0, 16, head, clf,
                         ("_start_", "_delimiter_", "_classify_") if head else (), "sha256:abc")
        again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
        assert again == spec
        model = build_model(again)
        assert type(model) is (LMModel if head is None else DoubleHeadModel)
        assert model.transformer.embed.weight.shape == (60 + spec.n_special + 16, 32)
        assert model.transformer.cfg.afn == "relu" and model.transformer.n_ctx == 16
        if head:
            assert model.task_head.clf_token == 62
