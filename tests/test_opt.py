"""opt.OpenAIAdam against a NumPy re-statement of docs/reference.md §3."""

import io
import math

import numpy as np
import pytest
import torch

from batches import BatchPlan
from conftest import TINY, make_inputs, tiny_config
from model_pytorch import DoubleHeadModel
from opt import SCHEDULES, OpenAIAdam
from tasks import get_task


def np_schedule(name, x, w):
    """docs/reference.md §3's schedules of x = t / t_total."""
    if name == "warmup_linear":
        return (x / w if x <= w else 1.0) * (1 - x)
    if name == "warmup_cosine":
        return x / w if x <= w else 0.5 * (1 + math.cos(math.pi * x))
    return x / w if x <= w else 1.0


class NumpyAdam:
    """docs/reference.md §3 in float64. `variant` breaks the decay rule on purpose, to show the tests can fail."""

    def __init__(self, params, lr, schedule, warmup, t_total, b1=0.9, b2=0.999, e=1e-8, l2=0.0,
                 vector_l2=False, max_grad_norm=-1, variant="tf"):
        self.p = [np.asarray(p, np.float64).copy() for p in params]
        self.m = [np.zeros_like(p) for p in self.p]
        self.v = [np.zeros_like(p) for p in self.p]
        self.hp = dict(lr=lr, schedule=schedule, warmup=warmup, t_total=t_total, b1=b1, b2=b2, e=e, l2=l2,
                       vector_l2=vector_l2, max_grad_norm=max_grad_norm)
        self.t = 0
        self.variant = variant

    def step(self, grads):
        hp = self.hp
        grads = [np.asarray(g, np.float64) for g in grads]
        if hp["max_grad_norm"] > 0:  # 1. global-norm clipping
            norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
            grads = [g * hp["max_grad_norm"] / max(norm, hp["max_grad_norm"]) for g in grads]
        self.t += 1
        t = self.t
        correction = math.sqrt(1 - hp["b2"] ** t) / (1 - hp["b1"] ** t)
        lrt = hp["lr"] * correction * np_schedule(hp["schedule"], t / hp["t_total"], hp["warmup"])  # 2.
        for i, g in enumerate(grads):
            self.m[i] = hp["b1"] * self.m[i] + (1 - hp["b1"]) * g  # 3.
            self.v[i] = hp["b2"] * self.v[i] + (1 - hp["b2"]) * g * g
            adam = self.m[i] / (np.sqrt(self.v[i]) + hp["e"])
            p = self.p[i]
            decays = (p.ndim > 1 or hp["vector_l2"]) and hp["l2"] > 0
            if not decays:  # 4.
                self.p[i] = p - lrt * adam
            elif self.variant == "tf":
                self.p[i] = p - lrt * (adam + hp["l2"] * p)
            elif self.variant == "decay_after_step":
                q = p - lrt * adam
                self.p[i] = q - lrt * hp["l2"] * q
            elif self.variant == "no_bias_correction":
                self.p[i] = p - lrt * adam - hp["lr"] * np_schedule(hp["schedule"], t / hp["t_total"],
                                                                    hp["warmup"]) * hp["l2"] * p


def tiny_problem(seed=0):
    torch.manual_seed(seed)
    model = DoubleHeadModel(tiny_config(embd_pdrop=0, attn_pdrop=0, resid_pdrop=0, clf_pdrop=0),
                            TINY["n_vocab"] + 2, "multiple_choice", vocab=TINY["n_vocab"] + 3 + 12, n_ctx=12)
    X = make_inputs(TINY["n_vocab"], 3, 12, (4, 2, 12), seed=seed)
    X[..., -1, 0] = TINY["n_vocab"] + 2
    M = torch.ones(4, 2, 12)
    Y = torch.tensor([0, 1, 1, 0])
    return model, (X, Y, M)


def raw_gradients(model, batch):
    X, Y, M = batch
    model.zero_grad()
    lm, clf_logits = model(X, plan=BatchPlan.build(X.numpy(), M.numpy(), TINY["n_vocab"] + 2))
    get_task("rocstories").objective(lm, clf_logits, Y, 0.5).backward()
    return [p.grad.detach().numpy().copy() for p in model.parameters()]


def assert_same_params(model, reference, rtol=4e-6):
    """rtol: measured at most 3.5e-07 here, 8.3e-07 with ATEN_CPU_CAPABILITY=default (no SIMD)."""
    worst = max_relative_difference(model, reference)
    print(f"largest difference to the NumPy restatement, relative to the tensor's largest value: {worst:.2e}")
    for p, q in zip(model.parameters(), reference.p):
        err = np.abs(p.detach().numpy() - q).max()
        assert err <= rtol * np.abs(q).max(), (err, np.abs(q).max())


def max_relative_difference(model, reference):
    return max(np.abs(p.detach().numpy() - q).max() / np.abs(q).max() for p, q in zip(model.parameters(), reference.p))


def run(hp, n_steps=6, reload_at=None, variant="tf"):
    model, batch = tiny_problem()
    opt = OpenAIAdam(model.parameters(), **hp)
    spec_hp = {k: v for k, v in hp.items() if k != "fused"}
    ref = NumpyAdam([p.detach().numpy() for p in model.parameters()], **spec_hp, variant=variant)
    for step in range(n_steps):
        if step == reload_at:
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            opt = OpenAIAdam(model.parameters(), **hp)
            opt.load_state_dict(torch.load(buffer, weights_only=True))
        grads = raw_gradients(model, batch)
        ref.step(grads)
        opt.step()
    return model, ref, opt


HP = dict(lr=1e-2, warmup=0.2, t_total=10, l2=0.01, max_grad_norm=0.05)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("vector_l2", [False, True])
def test_matches_numpy_restatement(schedule, vector_l2):
    model, ref, opt = run(dict(HP, schedule=schedule, vector_l2=vector_l2))
    assert_same_params(model, ref)
    assert opt.param_groups[0]["step"] == 6


def test_clipping_is_active_in_these_tests():
    model, batch = tiny_problem()
    norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in raw_gradients(model, batch)))
    assert norm > 10 * HP["max_grad_norm"]


def test_state_dict_round_trip_continues_the_schedule():
    hp = dict(HP, schedule="warmup_linear")
    model, ref, opt = run(hp, n_steps=6, reload_at=3)
    assert_same_params(model, ref)
    assert opt.param_groups[0]["step"] == 6
    assert opt.current_lr() == opt.step_size(opt.param_groups[0], 6)  # the same float64 computation


def test_large_weight_decay_follows_the_tf_formula_exactly():
    hp = dict(lr=0.05, schedule="warmup_constant", warmup=0.2, t_total=10, l2=1.0, max_grad_norm=1.0)
    model, ref, _ = run(hp)
    assert_same_params(model, ref)
    for variant in ("decay_after_step", "no_bias_correction"):
        model, wrong, _ = run(hp, variant=variant)
        assert max_relative_difference(model, wrong) > 1e-3, variant


def test_first_update_uses_the_incremented_step():
    model, batch = tiny_problem()
    opt = OpenAIAdam(model.parameters(), lr=1.0, schedule="warmup_linear", warmup=0.5, t_total=4)
    raw_gradients(model, batch)
    opt.step()
    # schedule(1/4) = (0.25/0.5) * 0.75, bias correction sqrt(1-b2)/(1-b1) at t = 1
    expected = math.sqrt(1 - 0.999) / (1 - 0.9) * 0.5 * 0.75
    assert opt.current_lr() == pytest.approx(expected, rel=1e-15)  # float64; measured 0


def test_zero_warmup_means_no_warmup():
    p = torch.nn.Parameter(torch.ones(2))
    opt = OpenAIAdam([p], lr=1.0, schedule="warmup_constant", warmup=0, t_total=10)
    p.grad = torch.ones(2)
    opt.step()
    assert opt.current_lr() == pytest.approx(math.sqrt(1 - 0.999) / (1 - 0.9), rel=1e-15)  # float64; measured 0


def test_no_decay_on_vectors_without_vector_l2():
    bias = torch.nn.Parameter(torch.ones(3))
    weight = torch.nn.Parameter(torch.ones(2, 3))
    opt = OpenAIAdam([bias, weight], lr=0.1, schedule="warmup_constant", warmup=1.0, t_total=1, l2=0.5)
    bias.grad = torch.zeros(3)
    weight.grad = torch.zeros(2, 3)
    opt.step()
    assert torch.equal(bias, torch.ones(3))
    assert (weight < 1).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "learning rate"),
    (dict(schedule="warmup_exp"), "invalid schedule"),
    (dict(warmup=-0.1), "warmup"),
    (dict(warmup=1.5), "warmup"),
    (dict(t_total=0), "t_total"),
    (dict(b1=1.0), "b1"),
    (dict(b2=-0.1), "b2"),
    (dict(e=-1.0), "e="),
    (dict(l2=-0.1), "l2"),
])
def test_invalid_arguments(kwargs, match):
    args = dict(lr=1e-3, schedule="warmup_linear", warmup=0.002, t_total=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        OpenAIAdam([torch.nn.Parameter(torch.ones(2))], **args)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_fused_and_foreach_steps_both_match_numpy(fused, schedule):
    """The fused kernel (default) and the multi-tensor path each equal the NumPy restatement,
    clipping and decay on vectors included, across a reload; the last step has schedule 0."""
    hp = dict(HP, schedule=schedule, vector_l2=True, fused=fused, t_total=6)
    model, ref, opt = run(hp, n_steps=6, reload_at=3)
    assert opt.fused is fused
    assert_same_params(model, ref)
