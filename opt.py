"""The TF code's modified Adam (docs/reference.md §3): global-norm clipping, bias correction in the
step size, a warm-up schedule, and L2 decay inside the bias-corrected step."""

import math
from dataclasses import dataclass, field

import torch
from torch.optim import Optimizer


def warmup_cosine(x, warmup=0.002):
    return x / warmup if x <= warmup else 0.5 * (1 + math.cos(math.pi * x))


def warmup_constant(x, warmup=0.002):
    return x / warmup if x <= warmup else 1.0


def warmup_linear(x, warmup=0.002):
    return (x / warmup if x <= warmup else 1.0) * (1 - x)


SCHEDULES = {
    "warmup_cosine": warmup_cosine,
    "warmup_constant": warmup_constant,
    "warmup_linear": warmup_linear,
}


@dataclass(frozen=True)
class OptimizerConfig:
    """The TF code's optimizer flags, with the paper's fine-tuning values as defaults (train.py's flags
    are built from these fields)."""

    lr: float = field(default=6.25e-5, metadata={"help": "learning rate (the schedule's peak)"})
    lr_schedule: str = field(default="warmup_linear", metadata={"help": "learning-rate schedule over the run"})
    lr_warmup: float = field(default=0.002, metadata={"help": "fraction of the updates spent warming up"})
    b1: float = field(default=0.9, metadata={"help": "Adam's beta1"})
    b2: float = field(default=0.999, metadata={"help": "Adam's beta2"})
    e: float = field(default=1e-8, metadata={"help": "Adam's epsilon"})
    l2: float = field(default=0.01, metadata={"help": "L2 decay inside the bias-corrected step (docs/reference.md §3)"})
    vector_l2: bool = field(default=False, metadata={"help": "decay vectors (biases, gains) too"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip by the global gradient norm (<= 0: off)"})

    def build(self, params, t_total):
        """The optimizer for `t_total` updates."""
        return OpenAIAdam(params, lr=self.lr, schedule=self.lr_schedule, warmup=self.lr_warmup, t_total=t_total,
                          b1=self.b1, b2=self.b2, e=self.e, l2=self.l2, vector_l2=self.vector_l2,
                          max_grad_norm=self.max_grad_norm)


class OpenAIAdam(Optimizer):
    """Adam as in OpenAI's `finetune-transformer-lm` (docs/reference.md §3). One update, with t the
    step count after its increment:

        clip all gradients together to global norm max_grad_norm (if > 0)
        lrt = lr * sqrt(1 - b2^t) / (1 - b1^t) * schedule(t / t_total, warmup)
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p = p - lrt * (m / (sqrt(v) + e) + l2 * p)     (l2 term only for rank > 1, or all if vector_l2)

    The step count lives in each param group (`group["step"]`), so `state_dict()` restores it.
    """

    def __init__(self, params, lr, schedule, warmup, t_total, b1=0.9, b2=0.999, e=1e-8, l2=0,
                 vector_l2=False, max_grad_norm=-1, fused=None, **kwargs):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate lr={lr}: must be >= 0")
        if schedule not in SCHEDULES:
            raise ValueError(f"invalid schedule {schedule!r}: expected one of {sorted(SCHEDULES)}")
        if not 0.0 <= warmup <= 1.0:
            raise ValueError(f"invalid warmup={warmup}: the warm-up fraction must be in [0, 1]")
        if not t_total >= 1:
            raise ValueError(f"invalid t_total={t_total}: the number of updates must be >= 1")
        if not 0.0 <= b1 < 1.0:
            raise ValueError(f"invalid b1={b1}: must be in [0, 1)")
        if not 0.0 <= b2 < 1.0:
            raise ValueError(f"invalid b2={b2}: must be in [0, 1)")
        if not e >= 0.0:
            raise ValueError(f"invalid e={e}: must be >= 0")
        if not l2 >= 0.0:
            raise ValueError(f"invalid l2={l2}: must be >= 0")
        defaults = dict(lr=lr, schedule=schedule, warmup=warmup, t_total=t_total, b1=b1, b2=b2, e=e, l2=l2,
                        vector_l2=vector_l2, max_grad_norm=max_grad_norm, step=0, lr_t=0.0)
        super().__init__(params, defaults)
        self.fused = _fused_available() if fused is None else fused

    def step_size(self, group, t):
        """lrt at step t (docs/reference.md §3, step 2)."""
        schedule = SCHEDULES[group["schedule"]]
        bias_correction = math.sqrt(1 - group["b2"] ** t) / (1 - group["b1"] ** t)
        return group["lr"] * bias_correction * schedule(t / group["t_total"], group["warmup"])

    def current_lr(self):
        """The step size lrt of the last update (first group), for logging."""
        return self.param_groups[0]["lr_t"]

    def _clip_divisor(self):
        """max(global norm, max_grad_norm) / max_grad_norm as a device tensor (no host sync), or
        None when clipping is off: dividing the gradients by it is TF's clip_by_global_norm."""
        max_norm = max(g["max_grad_norm"] for g in self.param_groups)
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if max_norm <= 0 or not grads:
            return None
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        return torch.clamp(norm, min=max_norm).float() / max_norm  # 1 when norm <= max_norm

    @torch.no_grad()
    def clip_grad_norm_(self):
        """TF's clip_by_global_norm over every parameter of every group, in place."""
        divisor = self._clip_divisor()
        if divisor is not None:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch._foreach_div_(grads, divisor)
        return divisor

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.fused:
            self._step_fused()
            return loss
        self.clip_grad_norm_()
        for group in self.param_groups:
            group["step"] += 1
            lrt = self.step_size(group, group["step"])
            group["lr_t"] = lrt
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._update(group, params, lrt)
        return loss

    def _update(self, group, params, lrt):
        """Steps 3-4 of docs/reference.md §3 with multi-tensor kernels: no Python loop of small ops
        per tensor.

        p - lrt * (m / (sqrt(v) + e) + l2 * p) is computed as p * (1 - lrt * l2) - lrt * m / (...):
        the same value, in two passes over p and no temporary the size of the model."""
        b1, b2, e, l2 = group["b1"], group["b2"], group["e"], group["l2"]
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_lerp_(exp_avgs, grads, 1 - b1)  # m = b1 m + (1 - b1) g
        torch._foreach_mul_(exp_avg_sqs, b2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, e)
        if l2 > 0:  # - lrt * l2 * p, with p before this update
            decayed = [p for p in params if p.dim() > 1 or group["vector_l2"]]
            if decayed:
                torch._foreach_mul_(decayed, 1 - lrt * l2)
        torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lrt)  # - lrt * m / (sqrt(v) + e)

    def _step_fused(self):
        """The same update with PyTorch's fused Adam kernel: one pass over each parameter for
        clipping, moments, decay and step together (the clip divisor goes in as its grad_scale).

        The kernel computes p * (1 - lr_k wd_k) - lr_k / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + e_k).
        With lr_k = lr * schedule, e_k = e / sqrt(1 - b2^t) and wd_k = lrt * l2 / lr_k this is
        p * (1 - lrt l2) - lrt * m / (sqrt(v) + e): docs/reference.md §3 exactly, up to rounding."""
        divisor = self._clip_divisor()
        for group in self.param_groups:
            group["step"] += 1
            t = group["step"]
            lrt = self.step_size(group, t)
            group["lr_t"] = lrt
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            b1, b2, l2 = group["b1"], group["b2"], group["l2"]
            bias_correction2 = math.sqrt(1 - b2 ** t)
            lr_k = lrt * (1 - b1 ** t) / bias_correction2  # = lr * schedule(t / t_total)
            decay = lrt * l2 / lr_k if lr_k > 0 else 0.0
            decayed = [p for p in params if p.dim() > 1 or group["vector_l2"]]
            others = [p for p in params if not (p.dim() > 1 or group["vector_l2"])]
            for subset, weight_decay in ((decayed, decay), (others, 0.0)):
                if not subset:
                    continue
                steps = [self._step_tensor(subset[0].device, t)] * len(subset)
                torch._fused_adamw_(
                    subset, [p.grad for p in subset], [self.state[p]["exp_avg"] for p in subset],
                    [self.state[p]["exp_avg_sq"] for p in subset], [], steps, lr=lr_k, beta1=b1, beta2=b2,
                    weight_decay=weight_decay, eps=group["e"] / bias_correction2, amsgrad=False, maximize=False,
                    grad_scale=divisor, found_inf=None)


    def _step_tensor(self, device, t):
        """The step count as a device scalar, set by a kernel (no host-to-device copy per update)."""
        cache = self.__dict__.setdefault("_step_tensors", {})
        if device not in cache:
            cache[device] = torch.zeros((), dtype=torch.float32, device=device)
        return cache[device].fill_(float(t))


def _fused_available():
    return hasattr(torch, "_fused_adamw_")
