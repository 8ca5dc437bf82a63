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
