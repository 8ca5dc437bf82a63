"""loss: hand-computed losses, restricted LM logits, gradient accumulation."""

import math

import numpy as np
import pytest
import torch

from conftest import TINY, make_inputs, tiny_config
from loss import ClassificationLossCompute, MultipleChoiceLossCompute, SimilarityLossCompute, lm_losses
from model_pytorch import DoubleHeadModel
from opt import OpenAIAdam


def log_softmax(row):
    row = np.asarray(row, np.float64)
    return row - row.max() - math.log(np.exp(row - row.max()).sum())


def test_losses_equal_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    B, C, T, V = 2, 2, 4, 7
    X = torch.randint(0, V, (B, C, T, 2), generator=g)
    M = torch.tensor([[[1, 1, 1, 0], [1, 1, 1, 1]], [[1, 1, 0, 0], [1, 1, 1, 0]]], dtype=torch.float32)
    Y = torch.tensor([1, 0])
    clf_logits = torch.randn(B, C, generator=g)
    lm_logits = torch.randn(B * C * (T - 1), V, generator=g)
    compute = MultipleChoiceLossCompute(lm_coef=0.5)
    clf, lm = compute(X, Y, M, clf_logits, lm_logits, only_return_losses=True)

    expected_clf = [-log_softmax(clf_logits[b])[Y[b]] for b in range(B)]
    expected_lm = []
    rows = lm_logits.view(B * C, T - 1, V)
    for s in range(B * C):
        b, c = divmod(s, C)
        terms = [-log_softmax(rows[s, t])[X[b, c, t + 1, 0]] * M[b, c, t + 1] for t in range(T - 1)]
        expected_lm.append(sum(terms) / M[b, c, 1:].sum())
    # float32 losses against float64: measured relative differences 5.5e-08 (clf), 8.4e-08 (lm), 8.5e-09
    # (total) and 3.2e-08 (clf only), the same with every CPU kernel tried
    np.testing.assert_allclose(clf.numpy(), expected_clf, rtol=5e-7)
    np.testing.assert_allclose(lm.numpy(), [float(x) for x in expected_lm], rtol=8e-7)
    total = compute(X, Y, M, clf_logits, lm_logits)
    assert total == pytest.approx(np.mean(expected_clf) + 0.5 * np.mean([float(x) for x in expected_lm]), rel=1e-7)
    assert MultipleChoiceLossCompute(lm_coef=0)(X, Y, M, clf_logits, lm_logits) == pytest.approx(
        np.mean(expected_clf), rel=3e-7)


def test_restricted_lm_logits_give_the_same_losses():
    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, 9, (3, 2, 6, 2), generator=g)
    M = (torch.rand(3, 2, 6, generator=g) > 0.3).float()
    M[..., :2] = 1
    full = torch.randn(3 * 2 * 5, 9, generator=g)
    keep = M.view(-1, 6)[:, 1:].reshape(-1).bool()
    torch.testing.assert_close(lm_losses(X, M, full[keep]), lm_losses(X, M, full), rtol=8e-7, atol=0)  # 7.9e-08
    with pytest.raises(ValueError, match="lm_logits has 4 rows"):
        lm_losses(X, M, full[:4])


def test_lm_logits_at_every_position_as_a_language_model_returns_them():
    """LMModel's [N, T, vocab] (the last position predicts nothing) equals the TF layout [N * (T - 1), vocab]."""
    g = torch.Generator().manual_seed(2)
    X = torch.randint(0, 9, (3, 1, 6, 2), generator=g)
    M = (torch.rand(3, 1, 6, generator=g) > 0.3).float()
    M[..., :2] = 1
    every = torch.randn(3, 6, 9, generator=g)
    torch.testing.assert_close(lm_losses(X, M, every), lm_losses(X, M, every[:, :-1].reshape(-1, 9)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"lm_logits of shape \(3, 5, 9\) do not fit X of shape \(3, 1, 6, 2\)"):
        lm_losses(X, M, every[:, :-1])


def test_classification_and_similarity_losses():
    X = torch.zeros(3, 5, 2, dtype=torch.long)
    M = torch.ones(3, 5)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0]])
    Y = torch.tensor([0, 2, 1])
    clf = ClassificationLossCompute(lm_coef=0.5)(X, Y, M, logits, only_return_losses=True)
    np.testing.assert_allclose(clf.numpy(), [-log_softmax(logits[i])[Y[i]] for i in range(3)], rtol=1e-6)  # 1.4e-07
    scores = torch.tensor([0.5, 2.0])
    sim = SimilarityLossCompute()(torch.zeros(2, 2, 5, 2, dtype=torch.long), torch.tensor([1.0, 1.5]),
                                  torch.ones(2, 2, 5), scores, only_return_losses=True)
    np.testing.assert_array_equal(sim.numpy(), [0.25, 0.25])  # (0.5 - 1)^2 and (2 - 1.5)^2 are exact


class RecordingAdam(OpenAIAdam):
    """Keeps the gradients each update saw."""

    def step(self, closure=None):
        self.seen_grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def update_once(micro_batches, n_accumulate):
    torch.manual_seed(0)
    model = DoubleHeadModel(tiny_config(embd_pdrop=0, attn_pdrop=0, resid_pdrop=0, clf_pdrop=0),
                            TINY["n_vocab"] + 2, "multiple_choice", vocab=TINY["n_vocab"] + 3 + 10, n_ctx=10)
    opt = RecordingAdam(model.parameters(), lr=1e-3, schedule="warmup_linear", warmup=0.002, t_total=10,
                     l2=0.01, max_grad_norm=1)
    compute = MultipleChoiceLossCompute(lm_coef=0.5, opt=opt, n_accumulate=n_accumulate)
    for X, Y, M in micro_batches:
        lm_logits, clf_logits = model(X, mask=M)
        compute(X, Y, M, clf_logits, lm_logits)
    return model, opt.seen_grads


def test_accumulated_micro_batches_equal_one_batch():
    X = make_inputs(TINY["n_vocab"], 3, 10, (32, 2, 10), seed=4)
    lengths = torch.randint(4, 11, (32, 2), generator=torch.Generator().manual_seed(5))
    M = (torch.arange(10) < lengths.unsqueeze(-1)).float()
    X[..., 0] = X[..., 0] * M.long()
    X[torch.arange(32).unsqueeze(1), torch.arange(2), lengths - 1, 0] = TINY["n_vocab"] + 2
    Y = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(6))
    whole, whole_grads = update_once([(X, Y, M)], 1)
    split, split_grads = update_once([(X[i:i + 8], Y[i:i + 8], M[i:i + 8]) for i in range(0, 32, 8)], 4)
    grad_err = max((a - b).abs().max().item() for a, b in zip(whole_grads, split_grads))
    param_err = max((a - b).abs().max().item() for (name, a), b in zip(whole.named_parameters(), split.parameters())
                    if name != "task_head.linear.bias")
    print(f"one batch vs micro-batches: gradients {grad_err:.2e}, parameters {param_err:.2e}, "
          f"classifier bias gradient {whole_grads[-1].abs().max().item():.2e}")
    for (name, _), a, b in zip(whole.named_parameters(), whole_grads, split_grads):
        assert (a - b).abs().max() <= 3e-7, name  # measured 2.2e-08 (4.5e-08 without SIMD)
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        if name == "task_head.linear.bias":
            # docs/reference.md §3: its analytic gradient is 0 with two choices; Adam turns rounding noise into a
            # step of size ~lr, so only its gradient is compared.
            assert whole_grads[-1].abs().max() < 1e-7  # measured 7.5e-09 (1.9e-08 without SIMD)
            continue
        assert (a - b).abs().max() <= 1e-6, name  # measured 1.3e-07 (1.5e-07 with AVX2)
    assert all(p.grad is None for p in split.parameters())  # zero_grad ran after the update
