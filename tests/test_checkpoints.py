"""checkpoints: files that rebuild their model (every head) from the spec they record, with the
vocabulary they were trained with; resume refuses other settings; writes are atomic and their
failures reported; every generator comes back, also on a machine with fewer GPUs."""

import json
import os
import random
import re

import pytest
import safetensors.torch
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
        file.write(b"half")
        raise OSError(28, "No space left on device")

    writer.submit(atomic_save, {"a": torch.ones(2)}, str(target), no_space)
    with pytest.raises(CheckpointError, match=rf"^cannot write {target}: No space left on device$"):
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


# ----------------------------------------------------------------------------- integrity: checksums

def written_files(vocabulary, tmp_path):
    """best_params.safetensors and checkpoint.pt of a tiny model (with Adam's state), and the model's
    tensors in each as safetensors and torch read them."""
    spec = spec_of(vocabulary, "multiple_choice")
    torch.manual_seed(2)
    model = build_model(spec)
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    flags = dict(dataset="rocstories", n_head=4)
    best, ckpt = str(tmp_path / "best_params.safetensors"), str(tmp_path / "checkpoint.pt")
    save_best_params(host_copy(model_state(model)), best, spec, flags)
    state = dict(model=host_copy(model_state(model)), optimizer=host_copy(opt.state_dict()), n_epochs=1, n_updates=5,
                 update_in_epoch=0, best_score=61.5, rng=dict(python=list(random.getstate())), args=flags)
    save_checkpoint(state, ckpt, spec)
    return {best: safetensors.torch.load_file(best), ckpt: torch.load(ckpt, weights_only=True)["model"]}


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def every_reader(path):
    """Each reader of the file, taking what it gives of the model and the run: read_checkpoint
    (generate.py, export_hf.py, prediction) and, for checkpoint.pt, --resume's load_checkpoint."""
    readers = [lambda: read_checkpoint(path)]
    if path.endswith(".pt"):
        readers.append(lambda: load_checkpoint(path, dict(dataset="rocstories"), ["dataset"], {}))
    return readers


@pytest.mark.parametrize("name", ["best_params.safetensors", "checkpoint.pt"])
def test_a_single_flipped_bit_is_refused_in_one_line_or_changes_nothing(vocabulary, tmp_path, name):
    """Bits flipped at random anywhere in the file (tensors, header, pickle, zip records): every reader
    refuses the file in one line naming it, or reads exactly what was written (a padding byte)."""
    written = written_files(vocabulary, tmp_path)
    path = str(tmp_path / name)
    original = open(path, "rb").read()
    expected = [read() for read in every_reader(path)]  # each reader on the intact file ...
    assert all(same(intact[0] if isinstance(intact, tuple) else intact["model"], written[path]) for intact in expected)
    rng = random.Random(0)
    refused = harmless = 0
    for _ in range(150):
        data = bytearray(original)
        bit = rng.randrange(8 * len(data))
        data[bit // 8] ^= 1 << (bit % 8)
        with open(path, "wb") as f:
            f.write(data)
        outcomes = []
        for read, intact in zip(every_reader(path), expected):  # each reader on its own
            try:
                loaded = read()
            except (WeightsError, CheckpointError) as err:
                assert path in str(err) and "\n" not in str(err), str(err)
                outcomes.append("refused")
                continue
            assert same(loaded, intact)
            outcomes.append("read")
        assert len(set(outcomes)) == 1, outcomes  # the readers agree: all refuse, or all read what was written
        refused += outcomes[0] == "refused"
        harmless += outcomes[0] == "read"
    print(f"{name}: {refused} flips refused, {harmless} harmless (the same contents read)")
    assert refused >= 120  # the rest: zip padding and records torch does not read


@pytest.mark.parametrize("name", ["best_params.safetensors", "checkpoint.pt"])
def test_a_truncated_file_is_refused_in_one_line(vocabulary, tmp_path, name):
    written_files(vocabulary, tmp_path)
    path = str(tmp_path / name)
    original = open(path, "rb").read()
    for size in (0, 7, len(original) // 3, len(original) - 1):
        with open(path, "wb") as f:
            f.write(original[:size])
        named = rf"^{re.escape(path)}|^--resume: {re.escape(path)}"
        for read in every_reader(path):  # each reader refuses it
            with pytest.raises((WeightsError, CheckpointError), match=named):
                read()


def test_a_damaged_key_name_is_refused_and_files_without_a_checksum_still_load(vocabulary, tmp_path):
    """A flip inside the name 'sha256' would leave a file without a checksum: an entry the project never
    writes is refused. Older files without one (and files from elsewhere) load as they are."""
    written_files(vocabulary, tmp_path)
    path = str(tmp_path / "checkpoint.pt")
    saved = torch.load(path, weights_only=True)
    saved["sha257"] = saved.pop("sha256")
    torch.save(saved, path)
    with pytest.raises(WeightsError, match=r"is damaged: it holds the entry 'sha257', which this project never"):
        read_checkpoint(path)
    del saved["sha257"]
    torch.save(saved, path)  # as written before checksums
    assert same(read_checkpoint(path)[0], saved["model"])
    from safetensors.torch import save_file

    best = str(tmp_path / "best_params.safetensors")
    state, spec, flags = read_checkpoint(best)
    save_file(state, best, metadata={"spec": json.dumps(spec.to_dict()), "args": json.dumps(flags)})
    assert read_checkpoint(best)[1] == spec
    save_file(state, best, metadata={"spec": json.dumps(spec.to_dict()), "sha256x": "0"})
    with pytest.raises(WeightsError, match=r"holds the entry 'sha256x'"):
        read_checkpoint(best)
    save_file(state, best, metadata={"format": "pt"})  # a plain file from elsewhere
    assert same(read_checkpoint(best)[0], state)


def test_the_checksum_is_the_sha256_of_the_contents_written_out(vocabulary, tmp_path):
    """Written out here independently: sha256 over each entry in key order, tensors as dtype, shape, bytes."""
    import hashlib

    written_files(vocabulary, tmp_path)
    from safetensors import safe_open

    path = str(tmp_path / "best_params.safetensors")
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    digest = hashlib.sha256(b"D2")
    digest.update(b"K'metadata'D2")
    for key in ("args", "spec"):
        digest.update(f"K{key!r}V" f"str:{metadata[key]!r}".encode())
    digest.update(f"K'tensors'D{len(tensors)}".encode())
    for name in sorted(tensors, key=repr):
        t = tensors[name]
        digest.update(f"K{name!r}T{t.dtype}{tuple(t.shape)}".encode() + t.contiguous().numpy().tobytes())
    assert metadata["sha256"] == digest.hexdigest()
