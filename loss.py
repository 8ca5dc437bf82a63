"""Training objectives (docs/reference.md §2): mean task loss + lm_coef * mean LM loss, as the TF code.

Each compute object keeps the earlier port's call signature
`(X, Y, M, clf_logits, lm_logits=None, only_return_losses=False)`. With `opt`, a call also runs
backward and, once `n_accumulate` micro-batches of equal size have been seen, one optimizer update:
the accumulated gradient then equals that of the whole batch.
"""

import torch
import torch.nn.functional as F


def per_element_cross_entropy(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none")


def lm_losses(X, M, lm_logits, criterion=per_element_cross_entropy, plan=None):
    """Per-sequence LM loss: cross-entropy of each next token, masked by M[..., 1:] and averaged.

    lm_logits is either over every position ([N * (T - 1), vocab], as the TF code; or [N, T, vocab]
    as `LMModel` returns them, whose last position predicts nothing here) or only over the positions
    with M[..., 1:] = 1 (what `LMHead(mask=M)` returns); all give the same losses. With a BatchPlan
    that selected the rows, its host-made targets and counts are used: no step waits for the device.
    """
    if plan is not None and plan.lm_rows is not None:
        return sequence_means(criterion(lm_logits, plan.lm_targets), plan)
    T = X.size(-2)
    tokens = X[..., 1:, 0].reshape(-1, T - 1)
    mask = M.reshape(-1, M.size(-1))[:, 1:].to(lm_logits.dtype)
    n_seq = tokens.size(0)
    if lm_logits.dim() > 2:
        if lm_logits.size(-2) != T or lm_logits[..., 0].numel() != n_seq * T:
            raise ValueError(f"lm_logits of shape {tuple(lm_logits.shape)} do not fit X of shape {tuple(X.shape)}: "
                             f"expected [{n_seq}, {T}, vocab], a row per position of each sequence")
        # every row as it is (no copy of the logits without their last position): that position gets a
        # placeholder target and its loss is dropped
        targets = F.pad(tokens, (0, 1)).reshape(-1)
        losses = criterion(lm_logits.reshape(n_seq * T, -1), targets).view(n_seq, T)[:, :-1]
        summed = (losses * mask).sum(1)
    elif lm_logits.size(0) == n_seq * (T - 1):
        losses = criterion(lm_logits, tokens.reshape(-1)).view(n_seq, T - 1)
        summed = (losses * mask).sum(1)
    else:
        keep = mask.bool()
        if lm_logits.size(0) != int(keep.sum()):
            raise ValueError(
                f"lm_logits has {lm_logits.size(0)} rows; expected {n_seq * (T - 1)} (every position) or "
                f"{int(keep.sum())} (the positions where M[..., 1:] = 1)"
            )
        losses = criterion(lm_logits, tokens[keep])
        seq_index = torch.arange(n_seq, device=X.device).unsqueeze(1).expand_as(keep)[keep]
        summed = losses.new_zeros(n_seq).index_add_(0, seq_index, losses)
    return summed / mask.sum(1)


def sequence_means(row_losses, plan):
    """Per-sequence LM loss from the losses of a BatchPlan's LM rows (as `model(..., lm_losses=True)`
    returns them): the mean over each sequence's predicted tokens."""
    summed = row_losses.new_zeros(plan.n_seq).index_add_(0, plan.lm_seq, row_losses)
    return summed / plan.lm_count.to(summed.dtype)


class MultipleChoiceLossCompute:
    """Loss for [batch, n_choices] logits against the index of the right choice."""

    def __init__(self, lm_criterion=None, clf_criterion=None, lm_coef=0.5, opt=None, n_accumulate=1):
        self.lm_criterion = lm_criterion or per_element_cross_entropy
        self.clf_criterion = clf_criterion or per_element_cross_entropy
        self.lm_coef = lm_coef
        self.opt = opt
        if n_accumulate < 1:
            raise ValueError(f"n_accumulate must be >= 1, got {n_accumulate}")
        self.n_accumulate = n_accumulate
        self._seen = 0

    def clf_losses(self, clf_logits, Y):
        return self.clf_criterion(clf_logits, Y)

    def losses(self, X, Y, M, clf_logits, lm_logits=None, plan=None):
        """(task losses per example, LM losses per sequence or None)."""
        lm = lm_losses(X, M, lm_logits, self.lm_criterion, plan) if lm_logits is not None else None
        return self.clf_losses(clf_logits, Y), lm

    def objective(self, clf_losses, lm=None):
        """mean(task losses) + lm_coef * mean(LM losses); the task loss alone when lm_coef is 0."""
        if self.lm_coef > 0 and lm is not None:
            return clf_losses.mean() + self.lm_coef * lm.mean()
        return clf_losses.mean()

    def __call__(self, X, Y, M, clf_logits, lm_logits=None, only_return_losses=False):
        clf, lm = self.losses(X, Y, M, clf_logits, lm_logits)
        if only_return_losses:
            return (clf, lm) if lm is not None else clf
        loss = self.objective(clf, lm)
        if self.opt is not None:
            (loss / self.n_accumulate).backward()
            self._seen += 1
            if self._seen == self.n_accumulate:
                self.opt.step()
                self.opt.zero_grad()
                self._seen = 0
        return loss.item()


class ClassificationLossCompute(MultipleChoiceLossCompute):
    """Loss for [batch, n_class] logits against class indices; X is [batch, T, 2]."""


class SimilarityLossCompute(MultipleChoiceLossCompute):
    """Squared error of the similarity score ([batch] logits) against a real-valued target."""

    def clf_losses(self, clf_logits, Y):
        if self.clf_criterion is not per_element_cross_entropy:
            return self.clf_criterion(clf_logits, Y)
        return (clf_logits - Y.to(clf_logits.dtype)) ** 2
