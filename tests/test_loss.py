"""loss: the LM loss of each sequence against the TF formula written out in NumPy, for every way a
plan scores the rows; the fused cross-entropy and its gradients; the task losses."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import loss
from batches import BatchPlan
from conftest import log_softmax, tf_lm_losses


def padded_batch(seed=0, n=3, choices=2, T=7, vocab=11, n_embd=8):
    """Host arrays X, M (prefixes of ones of random lengths) and hidden states h [n * choices, T, n_embd]."""
    rng = np.random.default_rng(seed)
    X = np.stack([rng.integers(0, vocab, (n, choices, T)), np.broadcast_to(np.arange(T), (n, choices, T))], -1)
    lengths = rng.integers(2, T + 1, (n, choices))
    M = (np.arange(T) < lengths[..., None]).astype(np.float32)
    return X, M, torch.randn(n * choices, T, n_embd, generator=torch.Generator().manual_seed(seed)), \
        torch.randn(vocab, n_embd, generator=torch.Generator().manual_seed(seed + 1))


@pytest.mark.parametrize("skip_padding", [True, False], ids=["real rows", "every row weighted"])
def test_lm_losses_are_the_tf_sequence_losses(skip_padding):
    X, M, h, we = padded_batch()
    plan = BatchPlan.build(X, M, None, skip_padding=skip_padding)
    got = loss.lm_losses(h, we, plan)
    # float32 against float64: measured relative differences below 1.5e-7
    np.testing.assert_allclose(got.detach().numpy(), tf_lm_losses(h, we, X, M), rtol=1e-6)


def test_lm_losses_in_evaluation_hold_bounded_logits_and_give_the_same_figures(monkeypatch):
    """Without gradients the logits are made in pieces (a row is the whole vocabulary): the same losses."""
    X, M, h, we = padded_batch(seed=3, n=6)
    plan = BatchPlan.build(X, M, None)
    whole = loss.lm_losses(h, we, plan)
    shapes, real = [], loss.token_losses
    monkeypatch.setattr(loss, "token_losses", lambda h, we, t: shapes.append(h.shape[0]) or real(h, we, t))
    monkeypatch.setattr(loss, "EVAL_LOGITS", 5 * we.size(0))
    with torch.no_grad():
        pieces = loss.lm_losses(h, we, plan)
    assert len(shapes) > 1 and max(shapes) == 5 and sum(shapes) == plan.lm_rows.numel()
    torch.testing.assert_close(pieces, whole.detach(), rtol=0, atol=0)


def numpy_token_losses_and_grads(h, we, targets, grad):
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
def test_token_losses_equal_the_cross_entropy_formula(n_vocab):
    torch.manual_seed(0)
    h = torch.randn(23, 16, requires_grad=True)
    we = (torch.randn(n_vocab, 16) * 0.5).requires_grad_()
    targets = torch.randint(0, n_vocab, (23,))
    grad = torch.rand(23)
    losses = loss.token_losses(h, we, targets)
    losses.backward(grad)
    ref, ref_h, ref_we = numpy_token_losses_and_grads(h.detach(), we.detach(), targets.numpy(), grad)
    # measured up to 5.9e-7 (losses up to 9), 2.2e-7 and 7.7e-7 (gradients)
    torch.testing.assert_close(losses.double(), torch.as_tensor(ref), rtol=0, atol=5e-6)
    torch.testing.assert_close(h.grad.double(), torch.as_tensor(ref_h), rtol=0, atol=3e-6)
    torch.testing.assert_close(we.grad.double(), torch.as_tensor(ref_we), rtol=0, atol=3e-6)
    again = loss.token_losses(h, we, targets).sum()
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):  # its backward reuses the logits' memory
        again.backward()


def test_token_losses_under_autocast_are_the_plain_computation():
    h, we, targets = torch.randn(9, 16), torch.randn(40, 16), torch.randint(0, 40, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss.token_losses(h, we, targets)
        expected = F.cross_entropy(F.linear(h, we).float(), targets, reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_task_losses_against_their_formulas():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 3, generator=g), torch.tensor([0, 2, 1, 1, 0, 2])
    expected = [-log_softmax(logits[i])[y[i]] for i in range(6)]
    np.testing.assert_allclose(loss.cross_entropy(logits, y).numpy(), expected, rtol=1e-6)  # measured 1.4e-7
    one, y2 = torch.randn(6, generator=g), torch.tensor([0, 1, 1, 0, 1, 0])
    p = 1 / (1 + np.exp(-one.double().numpy()))
    bce = -(y2.numpy() * np.log(p) + (1 - y2.numpy()) * np.log(1 - p))
    np.testing.assert_allclose(loss.binary_cross_entropy(one, y2).numpy(), bce, rtol=1e-6)
    scores = torch.tensor([0.5, 2.0])
    np.testing.assert_array_equal(loss.squared_error(scores, torch.tensor([1.0, 1.5])).numpy(), [0.25, 0.25])
    assert set(loss.TASK_LOSSES) == {"cross_entropy", "binary_cross_entropy", "squared_error"}
