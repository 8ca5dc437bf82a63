"""Shared test fixtures: tiny configs, random weights in OpenAI's shard format, the real vocabulary."""

from pathlib import Path

import numpy as np
import pytest
import torch

from model_pytorch import GPTConfig
from random_weights import random_openai_arrays, write_hf_weights, write_openai_weights

ROOT = Path(__file__).resolve().parents[1]
OPENAI_GPT = ROOT / "model"  # OpenAI's BPE vocabulary is shipped here (model/README.md)
TEST_DATA = ROOT / "tests" / "data"

TINY = dict(n_vocab=60, n_ctx=16, n_embd=32, n_layer=2)
TINY_HEADS = 4


def tiny_config(**overrides):
    return GPTConfig(n_embd=TINY["n_embd"], n_head=TINY_HEADS, n_layer=TINY["n_layer"], **overrides)


@pytest.fixture
def tiny_arrays():
    return random_openai_arrays(**TINY, seed=1)


@pytest.fixture
def tiny_openai_dir(tmp_path, tiny_arrays):
    path = tmp_path / "openai"
    write_openai_weights(path, tiny_arrays)
    return path


@pytest.fixture
def tiny_hf_dir(tmp_path, tiny_arrays):
    path = tmp_path / "hf"
    write_hf_weights(path, tiny_arrays, TINY_HEADS)
    return path


@pytest.fixture(scope="session")
def full_size_weights(tmp_path_factory):
    """Random weights at the real shapes: (arrays, OpenAI shard folder, Hugging Face folder)."""
    arrays = random_openai_arrays(seed=7)
    base = tmp_path_factory.mktemp("full")
    write_openai_weights(base / "model", arrays)
    write_hf_weights(base / "hf", arrays, n_head=12)
    return arrays, base / "model", base / "hf"


def make_inputs(n_vocab, n_special, n_ctx, shape, seed=0, high=None):
    """X of shape shape + (T, 2): random token ids and the position rows of docs/reference.md §2."""
    g = torch.Generator().manual_seed(seed)
    *lead, T = shape
    tokens = torch.randint(0, high or n_vocab, (*lead, T), generator=g)
    positions = n_vocab + n_special + torch.arange(T).expand(*lead, T)
    return torch.stack([tokens, positions], dim=-1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


class SyncCounter:
    """Counts the tensor calls that make the host wait for the device on a GPU (item, bool, int,
    float, tolist, cpu, numpy, nonzero, boolean-mask indexing), while `active`. On a CPU they cost
    nothing, but where they happen is the same: this is how GPU stalls are found without a GPU."""

    NAMES = ("item", "__bool__", "__int__", "__float__", "tolist", "cpu", "numpy", "nonzero")

    def __init__(self, monkeypatch):
        self.active, self.calls = False, []
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name), name))
        monkeypatch.setattr(torch, "nonzero", self._counted(torch.nonzero, "torch.nonzero"))
        getitem = torch.Tensor.__getitem__

        def counted_getitem(tensor, index):
            parts = index if isinstance(index, tuple) else (index,)
            if self.active and any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                self.calls.append("boolean indexing")
            return getitem(tensor, index)

        monkeypatch.setattr(torch.Tensor, "__getitem__", counted_getitem)

    def _counted(self, method, name):
        def counted(*args, **kwargs):
            if self.active:
                self.calls.append(name)
            return method(*args, **kwargs)
        return counted

    def wrap(self, owner, name, monkeypatch):
        """Count inside every call of owner.name."""
        method = getattr(owner, name)

        def counting(*args, **kwargs):
            outer, self.active = self.active, True
            try:
                return method(*args, **kwargs)
            finally:
                self.active = outer
        monkeypatch.setattr(owner, name, counting)


@pytest.fixture
def sync_counter(monkeypatch):
    return SyncCounter(monkeypatch)
