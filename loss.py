"""The objectives' formulas (docs/reference.md §2): the LM loss of each sequence, in one
implementation, and the task losses. How they combine is the task's (tasks.Task.objective).

The LM loss of a sequence is the cross-entropy of each next token, weighted by M[t+1] and averaged:
sum_t M[t+1] CE(h_t weᵀ, x_{t+1}) / sum_t M[t+1]. A BatchPlan (batches.py) says which rows of h are
scored: only those with M[t+1] = 1 (the default; the others weigh 0 in the TF code), or every row
with its weight M[t+1] (--plain, and --compile's static shapes: the TF code's computation).
"""

import torch
import torch.nn.functional as F

LOGIT_ROW_ALIGNMENT = 16  # float32 elements: rows of the logits start on 64-byte boundaries
EVAL_LOGITS = 2 ** 28  # logits held at once when no gradient is kept (1 GiB in float32)


def lm_losses(h, we, plan):
    """Per-sequence LM losses [plan.n_seq] of the hidden states h ([N, T, C] or [N*T, C]), with the
    tied output layer `we`, at the rows, targets and weights of `plan`."""
    rows = h.reshape(-1, h.size(-1)).index_select(0, plan.lm_rows)
    if torch.is_grad_enabled():
        losses = token_losses(rows, we, plan.lm_targets)
    else:  # evaluation: the logits of a long batch in bounded pieces (a row is the whole vocabulary)
        step = max(1, EVAL_LOGITS // we.size(0))
        losses = torch.cat([token_losses(rows[k:k + step], we, plan.lm_targets[k:k + step])
                            for k in range(0, rows.size(0), step)])
    if plan.lm_weights is not None:
        losses = losses * plan.lm_weights
    summed = losses.new_zeros(plan.n_seq).index_add_(0, plan.lm_seq, losses)
    return summed / plan.lm_count.to(summed.dtype)


def token_losses(h, we, targets):
    """F.cross_entropy(h @ we.T, targets, reduction="none") in fewer passes over the logits.

    The [rows, vocab] logits are the largest tensors of a training step. Here they live in one
    buffer whose rows start on 64-byte boundaries (with a vocabulary of 40,558 rows they would not,
    and the three matrix products run slower on a CPU), and the backward turns that same buffer into
    the gradient (softmax - one-hot) in place, with no log-softmax copy and no zero-filled gradient
    of the logits (docs/speed.md). Under autocast it is the plain computation."""
    if torch.is_autocast_enabled(h.device.type):
        return F.cross_entropy(F.linear(h, we).float(), targets, reduction="none")
    return _TokenLosses.apply(h, we, targets)


class _TokenLosses(torch.autograd.Function):
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
            raise RuntimeError("token_losses: backward through the same graph twice is not supported")
        ctx.spent = True
        h, we, targets, logits, log_norm = ctx.saved_tensors
        grad_logits = logits.sub_(log_norm.unsqueeze(1)).exp_().mul_(grad.unsqueeze(1))  # softmax * grad
        grad_logits.scatter_add_(1, targets.unsqueeze(1), -grad.unsqueeze(1))  # minus the one-hot
        grad_h = grad_logits @ we if ctx.needs_input_grad[0] else None
        grad_we = grad_logits.t() @ h if ctx.needs_input_grad[1] else None
        return grad_h, grad_we, None


def cross_entropy(logits, labels):
    """Class logits [n, classes] against class indices."""
    return F.cross_entropy(logits, labels.long(), reduction="none")


def binary_cross_entropy(logits, labels):
    """One logit per example (that of class 1) against 0/1 labels."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")


def squared_error(scores, targets):
    """A regressed score (STS-B) against the real-valued target."""
    return (scores - targets.to(scores.dtype)) ** 2


TASK_LOSSES = {"cross_entropy": cross_entropy, "binary_cross_entropy": binary_cross_entropy,
               "squared_error": squared_error}  # per-example losses, by the name a task declares
