"""checkpoints: files that rebuild their model (every head) from the spec they record, with the
vocabulary they were trained with; resume refuses other settings; writes are atomic and their
failures reported; every generator comes back, also on a machine with fewer GPUs."""

import os
import random

import pytest
import torch

from checkpoints import (
    BackgroundWriter,
    CheckpointError,
    atomic_save,
    check_vocabulary,
    host_copy,
    load_checkpoint,
    load_model,
    load_with_vocabulary,
    model_state,
    read_checkpoint,
    restore_rng,
    save_best_params,
    save_checkpoint,
)
from conftest import tiny_config
from model_pytorch import ClfHead, DoubleHeadModel, LMModel, ModelSpec, MultipleChoiceHead, SimilarityHead, build_model
from tasks import SPECIAL_TOKENS
from text_utils import learn_bpe
from weights import WeightsError

TEXTS = ["the cat sat on the mat .", "a dog ran to the park and the cat sat down ."] * 5
HEADS = {"multiple_choice": MultipleChoiceHead, "similarity": SimilarityHead, "inference": ClfHead,
         ("classification", 2): ClfHead, None: None}


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    base = tmp_path_factory.mktemp("vocab")
    return learn_bpe(TEXTS, str(base / "encoder.json"), str(base / "vocab.bpe"), vocab_size=60, min_frequency=1)


def spec_of(encoder, head, n_ctx=12):
    n_special = 3 if head else 0
    return ModelSpec(tiny_config(), encoder.n_vocab, n_special, n_ctx, head,
                     encoder.n_vocab + 2 if head else None, SPECIAL_TOKENS if head else (), encoder.fingerprint())


@pytest.mark.parametrize("head", list(HEADS), ids=str)
@pytest.mark.parametrize("name", ["best_params.safetensors", "checkpoint.pt"])
def test_a_file_rebuilds_its_model_with_every_head(vocabulary, tmp_path, head, name):
    spec = spec_of(vocabulary, head)
    torch.manual_seed(1)
    model = build_model(spec)
    path = str(tmp_path / name)
    flags = dict(dataset="x", n_head=4)
    if name.endswith(".safetensors"):
        save_best_params(host_copy(model_state(model)), path, spec, flags)
    else:
        save_checkpoint(dict(model=host_copy(model_state(model)), args=flags), path, spec)
    state, recorded, args = read_checkpoint(path)
    assert recorded == spec and args == flags
    loaded, loaded_spec = load_model(path)  # no sizes, no head, no vocabulary given
    assert loaded_spec == spec and type(loaded) is (LMModel if head is None else DoubleHeadModel)
    if head is not None:
        assert type(loaded.task_head) is HEADS[head] and loaded.task_head.clf_token == spec.clf_token
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    language_model, _ = load_model(path, head=None)  # its language model alone
    assert type(language_model) is LMModel
    assert torch.equal(language_model.transformer.embed.weight, model.transformer.embed.weight)


def test_the_vocabulary_must_be_the_one_the_weights_were_trained_with(vocabulary, tmp_path):
    path = str(tmp_path / "best_params.safetensors")
    spec = spec_of(vocabulary, "multiple_choice")
    save_best_params(host_copy(model_state(build_model(spec))), path, spec,
                     dict(encoder_path=vocabulary.paths[0], bpe_path=vocabulary.paths[1]))
    model, _, encoder = load_with_vocabulary(path, head="auto")  # the run's vocabulary, from the flags it records
    assert encoder.fingerprint() == vocabulary.fingerprint() and isinstance(model, DoubleHeadModel)
    merges = open(vocabulary.paths[1], encoding="utf-8").read().split("\n")
    merges[1], merges[2] = merges[2], merges[1]  # the same size, two merges' ranks swapped
    (tmp_path / "v.bpe").write_text("\n".join(merges), encoding="utf-8")
    with pytest.raises(WeightsError, match="was trained with another vocabulary than .*encoder.json"):
        load_with_vocabulary(path, vocabulary.paths[0], str(tmp_path / "v.bpe"))
    bigger = learn_bpe(TEXTS + ["zebras quietly jumped"], str(tmp_path / "b.json"), str(tmp_path / "b.bpe"),
                       vocab_size=80, min_frequency=1)
    with pytest.raises(WeightsError, match=rf"have {vocabulary.n_vocab} token rows but the vocabulary .*b.json has "
                                           rf"{bigger.n_vocab} entries"):
        load_with_vocabulary(path, str(tmp_path / "b.json"), str(tmp_path / "b.bpe"))
    check_vocabulary(spec, vocabulary, path)  # the right one passes


def test_resume_refuses_other_settings_and_a_missing_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"^--resume: no checkpoint at"):
        load_checkpoint(path, {}, [], {})
    torch.save(dict(args=dict(lr=1e-3, n_ctx=64, desc="a")), path)
    flags = dict(lr=1e-3, n_ctx=64, seed=42, desc="b")
    assert load_checkpoint(path, flags, ["lr", "n_ctx", "seed"], dict(seed=42))["args"]["desc"] == "a"
    with pytest.raises(CheckpointError, match=r"other settings: --n_ctx 64 \(now 32\), --seed 42 \(now 7\)$"):
        load_checkpoint(path, dict(flags, n_ctx=32, seed=7), ["lr", "n_ctx", "seed"], dict(seed=42))
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot be read as a checkpoint"):
        load_checkpoint(path, flags, [], {})


def test_a_failed_background_write_is_reported_and_leaves_no_file(tmp_path):
    writer = BackgroundWriter()
    target = tmp_path / "x.pt"

    def no_space(obj, file):
        with open(file, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    writer.submit(atomic_save, {"a": torch.ones(2)}, str(target), no_space)
    with pytest.raises(CheckpointError, match="writing a checkpoint failed: .*No space left on device"):
        writer.wait()
    assert os.listdir(tmp_path) == []
    writer.submit(atomic_save, {"a": torch.ones(2)}, str(target))
    writer.wait()
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))


def test_resume_with_more_cuda_states_than_devices(monkeypatch):
    """A checkpoint from a machine with 3 GPUs resumes on one with 1 (and on a CPU-only one)."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append(device))
    state = dict(torch=torch.get_rng_state(), python=list(random.getstate()),
                 cuda=[torch.zeros(16, dtype=torch.uint8)] * 3)
    restore_rng(state)
    assert restored == [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    restored.clear()
    restore_rng(state)
    assert restored == []
