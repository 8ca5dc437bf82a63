"""The project's own files: best_params.safetensors (the kept parameters) and checkpoint.pt (a
resumable run: model, optimizer, progress, every random generator), both written atomically from
host copies in a background thread, both loaded without unpickling code, and both self-describing:
they record the ModelSpec that rebuilds their model (sizes, head, classify token, special rows,
n_ctx, the vocabulary's fingerprint) and the run's flags. Each records the sha256 of its contents
(computed in the writing thread), checked by every reader: a changed bit is one error line naming
the file, never other weights. Models from any file or folder: `load_model`.
"""

import dataclasses
import hashlib
import json
import os
import random
import threading
from argparse import Namespace

import numpy as np
import torch
import torch.distributed as dist

from model_pytorch import LMModel, ModelSpec, build_model, make_config
from text_utils import TextEncoder
from utils import WriteError, atomic_write
from weights import WeightsError, load_openai_pretrained_model, pretrained_sizes

BEST_PARAMS, CHECKPOINT = "best_params.safetensors", "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot serve as asked."""


def atomic_save(obj, path, saver=torch.save):
    """`saver(obj, file object)` through a temporary file and a rename: a crash never leaves a
    half-written file. The file object keeps the operating system's error (no space left, file too
    large): torch reports a failed write only as "unexpected pos"."""
    def write(tmp):
        with open(tmp, "wb") as f:
            recorder = _ErrorRecorder(f)
            try:
                saver(obj, recorder)
            except Exception:
                if recorder.error is not None:
                    raise recorder.error from None
                raise
    atomic_write(path, write)


class _ErrorRecorder:
    """A binary file that remembers the first OSError of its writes."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self):
        self.file.flush()


def content_digest(obj):
    """sha256 of a (nested) state: each tensor's dtype, shape and bytes, every other value by type and
    repr, dict entries in key order. hashlib releases the GIL on large tensors: a background writer
    computes it while training goes on."""
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest, obj):
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"T{flat.dtype}{tuple(obj.shape)}".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            digest.update(f"K{key!r}".encode())
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"L{len(obj)}".encode())
        for value in obj:
            _feed(digest, value)
    else:
        digest.update(f"V{type(obj).__name__}:{obj!r}".encode())


def host_copy(obj):
    """A copy on the host of every tensor in a (nested) state: training may go on meanwhile."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


def model_state(model):
    """The state dict with tied tensors once (the LM head shares the embedding)."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            state[name] = tensor
    return state


def load_model_state(model, state, source):
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(model.state_dict()) - set(model_state(model))
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"{source} does not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")


class BackgroundWriter:
    """Writes files from host copies in one background thread, in order, so training does not
    wait for the disk. `wait()` returns once all are written and `check()` at once; both re-raise
    a failed write as one line naming its file (training calls `check()` before every update)."""

    def __init__(self):
        self._thread, self._error = None, None

    def submit(self, write, state, path, *args):
        """`write(state, path, *args)` in the background, once the previous write is done."""
        self.wait()

        def work():
            try:
                write(state, path, *args)
            except BaseException as err:  # reported by wait() or check()
                self._error = CheckpointError(str(err) if isinstance(err, WriteError) else
                                              f"writing {path} failed: {err}")

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def check(self):
        """Raise the error of a finished write, without waiting for one in progress."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


# ------------------------------------------------------------------------------------------------
# The kept parameters and the run's checkpoint
# ------------------------------------------------------------------------------------------------

SHA256 = "sha256"  # the key of a file's checksum: safetensors metadata, a checkpoint's entry
BEST_PARAMS_KEYS = {"spec", "args", SHA256}
CHECKPOINT_KEYS = {"model", "optimizer", "n_epochs", "n_updates", "update_in_epoch", "best_score", "epoch_rng",
                   "rng", "log_lines", "log", "inputs", "args", "spec", SHA256}


def save_best_params(state, path, spec, flags):
    """The parameters as safetensors; the spec, the run's flags and the sha256 of them all go into
    the file's metadata."""
    from safetensors.torch import save

    tensors = {k: v.contiguous() for k, v in state.items()}
    metadata = {"spec": json.dumps(spec.to_dict()), "args": json.dumps(flags, default=str)}
    metadata[SHA256] = content_digest(dict(tensors=tensors, metadata=metadata))
    atomic_save(tensors, path, saver=lambda tensors, file: file.write(save(tensors, metadata=metadata)))


def save_checkpoint(state, path, spec):
    """A resumable checkpoint (`state`: host copies of the model, optimizer, progress, generators and
    flags under "args"), with the spec that rebuilds its model and the sha256 of it all."""
    state = dict(state, spec=json.dumps(spec.to_dict()))
    atomic_save(dict(state, **{SHA256: content_digest(state)}), path)


def verify(saved, recorded, path, error, known):
    """The checksum a file records against its contents: a mismatch, or keys that are not the
    project's (a damaged key name), are one `error` line naming the file. Files without a
    checksum (written before checksums, or elsewhere) are taken as they are."""
    if recorded is None:
        unknown = sorted(k for k in saved if k not in known) if isinstance(saved, dict) else []
        if unknown and known & set(saved):
            raise error(f"{path} is damaged: it holds the entry {unknown[0]!r}, which this project never "
                        "writes (use another copy, or start again)")
        return
    if recorded != content_digest(saved):
        raise error(f"{path} is damaged: its contents do not match the sha256 it records (a changed byte on "
                    "the disk or in a copy); use another copy, or start again")


def read_checkpoint(path):
    """(state dict, ModelSpec or None, recorded flags or {}) of a `.safetensors` file
    (best_params.safetensors) or of a train.py checkpoint (checkpoint.pt), loaded without unpickling code."""
    if not os.path.isfile(path):
        raise WeightsError(f"checkpoint file {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(path, framework="pt") as f:  # reads the header only
                metadata = f.metadata() or {}
            tensors = load_file(path)
        else:
            saved = load_verified(path, WeightsError)
    except WeightsError:
        raise
    except Exception as err:  # both libraries raise their own error types
        raise WeightsError(f"{path}: cannot be read as a checkpoint ({first_line(err)})") from None
    if path.endswith(".safetensors"):
        recorded = metadata.pop(SHA256, None)
        verify(dict(tensors=tensors, metadata=metadata) if recorded else metadata, recorded, path, WeightsError,
               BEST_PARAMS_KEYS)
        saved = dict(model=tensors, **metadata)
    if isinstance(saved, dict) and all(isinstance(v, torch.Tensor) for v in saved.values()):
        saved = dict(model=saved)  # a plain state dict from elsewhere
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise WeightsError(f"{path}: expected a state dict or a train.py checkpoint holding one under 'model'")
    args, spec = _json(saved.get("args"), path, "args"), _json(saved.get("spec"), path, "spec")
    try:
        spec = ModelSpec.from_dict(spec) if spec else None
    except (KeyError, TypeError, ValueError) as err:
        raise WeightsError(f"{path}: the recorded model spec is damaged ({err})") from None
    return dict(saved["model"]), spec, args


def _json(value, path, key):
    """A recorded JSON object: checkpoint.pt holds the flags as a dict, safetensors metadata as text."""
    if value is None or isinstance(value, dict):
        return value or {}
    try:
        value = json.loads(value)
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: the {key!r} metadata is not JSON ({err})") from None
    if not isinstance(value, dict):
        raise WeightsError(f"{path}: the {key!r} metadata should be a JSON object, got {type(value).__name__}")
    return value


def load_checkpoint(path, flags, fixed, defaults, inputs=None):
    """A checkpoint to resume from; refused (one line) where a flag of `fixed` (the settings that fix
    the run's shapes and numbers) differs from the run's `flags` (`defaults`: for older checkpoints),
    or where one of `inputs` ({name: (fingerprint, description)}: the data, the vocabulary) is not
    the one the checkpoint recorded."""
    if not os.path.exists(path):
        raise CheckpointError(f"--resume: no checkpoint at {path}")
    ckpt = load_verified(path, CheckpointError, "--resume: ")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("args"), dict):
        raise CheckpointError(f"--resume: {path} is not a checkpoint of train.py (no recorded flags)")
    saved = ckpt["args"]
    changed = [k for k in fixed if saved.get(k, defaults.get(k)) != flags[k]]
    if changed:
        raise CheckpointError("--resume: the checkpoint was made with other settings: " + ", ".join(
            f"--{k} {saved.get(k, defaults.get(k))!r} (now {flags[k]!r})" for k in changed))
    recorded = ckpt.get("inputs") or {}
    changed = [what for name, (fingerprint, what) in (inputs or {}).items()
               if recorded.get(name, fingerprint) != fingerprint]
    if changed:
        raise CheckpointError(f"--resume: {' and '.join(changed)} changed since the checkpoint was made; resume with "
                              "the interrupted run's own inputs (or start a new run)")
    return ckpt


def check_best_params(path, spec):
    """The kept parameters a resumed run will predict with: readable, intact and of this model, now
    rather than at the end of the run (and never replaced by other parameters)."""
    if not os.path.exists(path):
        raise CheckpointError(f"--resume: the best parameters {path} are missing; the checkpoint counts on them "
                              "(restore the file, or resume without --submit)")
    try:
        recorded = read_checkpoint(path)[1]
    except WeightsError as err:
        raise CheckpointError(f"--resume: {err}") from None
    if recorded is not None and recorded != spec:
        raise CheckpointError(f"--resume: the best parameters {path} are of another model than the checkpoint's")


def first_line(err):
    """A library's error in one line: torch's unpickler explains itself over many, its cause on one."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines[:-1]):
        if line.endswith("WeightsUnpickler error:"):
            return lines[i + 1][:300]
    return (lines[0] if lines else type(err).__name__)[:300]


def load_verified(path, error, prefix=""):
    """A torch checkpoint file, loaded without unpickling code and checked against its checksum."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise error(f"{prefix}{path} cannot be read as a checkpoint ({first_line(err)})") from None
    if isinstance(saved, dict):
        verify({k: v for k, v in saved.items() if k != SHA256}, saved.pop(SHA256, None), path, error,
               CHECKPOINT_KEYS)
    return saved


# ------------------------------------------------------------------------------------------------
# Random generators: the original's numpy stream, Python's, torch's (every rank's) and CUDA's
# ------------------------------------------------------------------------------------------------

def numpy_rng_state(rng):
    """A RandomState's state as tensors and numbers (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = rng.get_state()
    return dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos), has_gauss=int(has_gauss),
                cached=float(cached))


def numpy_state(saved):
    return ("MT19937", saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"], saved["cached"])


def rng_state(data_rng):
    state = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=numpy_rng_state(data_rng))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rank_generators(runtime):
    """Every process's dropout generators (torch's, and its CUDA device's), gathered on every rank:
    each process draws its own masks, so a resumed torchrun run needs each one's state back to take
    the same updates as an uninterrupted one."""
    mine = dict(torch=torch.get_rng_state())
    if runtime.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(runtime.device)
    states = [None] * runtime.world
    dist.all_gather_object(states, mine)
    return states


def restore_rank_generators(mine, device):
    """This process's own dropout generators, as `rank_generators` gathered them."""
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], device)


def restore_rng(state):
    """Restore the generators; CUDA states only for the devices this machine has (a checkpoint
    made with more GPUs, or on a GPU machine resumed on a CPU, still resumes)."""
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if state.get("cuda") and torch.cuda.is_available():
        for index in range(min(len(state["cuda"]), torch.cuda.device_count())):
            torch.cuda.set_rng_state(state["cuda"][index], index)


# ------------------------------------------------------------------------------------------------
# Models from files
# ------------------------------------------------------------------------------------------------

def load_model(path, head="auto", n_vocab=None, n_special=None, n_head=None):
    """(model, ModelSpec) from a checkpoint file of this project or a weights folder (pre-trained or
    exported: a language model with every position row). head "auto": the file's task head (a
    DoubleHeadModel) if it holds one, None: its language model alone (an LMModel). Files of this
    project rebuild their model from the spec they record; for files without one (older runs,
    plain state dicts) n_vocab (the vocabulary's size) and, where the file does not say, n_head
    and n_special are needed."""
    if os.path.isdir(path):
        return model_from_pretrained(path, n_head)
    state, spec, recorded = read_checkpoint(path)
    if spec is None:
        spec = _spec_of_unrecorded(state, recorded, path, n_vocab, n_special, n_head)
    if head is None or not any(k.startswith("task_head.") for k in state):
        spec = dataclasses.replace(spec, head=None, clf_token=None)  # the language model alone
        state = {k: v for k, v in state.items() if not k.startswith("task_head.")}
    model = build_model(spec)
    state = {k if k.startswith(("transformer.", "task_head.", "lm_head.")) else "transformer." + k: v
             for k, v in state.items()}  # a TransformerModel's own state dict has no prefix
    if "transformer.embed.weight" not in state and "lm_head.decoder.weight" in state:
        state["transformer.embed.weight"] = state["lm_head.decoder.weight"]
    state.pop("lm_head.decoder.weight", None)
    try:
        load_model_state(model, state, path)
    except CheckpointError as err:
        raise WeightsError(str(err)) from None
    return model, spec


def _spec_of_unrecorded(state, recorded, path, n_vocab, n_special, n_head):
    """The spec of a file that records none, from its tensors and the flags it may record."""
    embed = next((k for k in ("transformer.embed.weight", "lm_head.decoder.weight", "embed.weight") if k in state),
                 None)
    if embed is None:
        raise WeightsError(f"{path}: no embedding (transformer.embed.weight or lm_head.decoder.weight) found")
    if n_vocab is None:
        raise WeightsError(f"{path}: the file records no model spec; the vocabulary's size is needed to rebuild it")
    rows, n_embd = state[embed].shape
    prefix = "" if embed == "embed.weight" else "transformer."
    n_layer = sum(1 for k in state if k.startswith(prefix + "h.") and k.endswith(".attn.c_attn.w"))
    task = _recorded_task(recorded)
    if n_special is None:  # the recorded task's specials (a task run's 3 where the file names no task)
        n_special = len(task.special_tokens) if task else 3
    n_ctx = rows - n_vocab - n_special
    if n_ctx <= 0:
        raise WeightsError(f"{path}: the embedding has {rows} rows, too few for n_vocab={n_vocab} tokens + "
                           f"n_special={n_special} specials + positions: wrong vocabulary or n_special?")
    cfg = make_config(Namespace(**dict(recorded, n_embd=n_embd, n_layer=n_layer,
                                       n_head=_resolve_n_head(n_head, n_embd, recorded, path))))
    head = None
    if any(k.startswith("task_head.") for k in state):
        head = (task.head if task else None) or "multiple_choice"
    names = ("_start_", "_delimiter_", "_classify_")[:n_special] if n_special == 3 else ()
    return ModelSpec(cfg, n_vocab, n_special, n_ctx, head, n_vocab + n_special - 1 if head else None, names)


def _recorded_task(recorded):
    """The task of the --dataset a file records, or None."""
    from tasks import get_task  # only for files without a spec: tasks.py stays out of the model's imports

    try:
        return get_task(str(recorded.get("dataset")))
    except ValueError:
        return None


def _resolve_n_head(n_head, n_embd, recorded, source):
    """n_head as given, else as recorded with the weights, else GPT-1's 12 at n_embd 768."""
    n_head = n_head or recorded.get("n_head")
    if n_head:
        return int(n_head)
    if n_embd == 768:
        return 12
    raise WeightsError(f"{source}: the weights do not record n_head and n_embd={n_embd} is not GPT-1's 768; "
                       "give n_head (--n_head)")


def model_from_pretrained(path, n_head=None):
    """(LMModel, ModelSpec) of a weights folder (OpenAI shards or Hugging Face format, docs/reference.md
    §1) with every position row and no special rows: its n_ctx is the position table's length."""
    n_vocab, n_positions, n_embd, n_layer, recorded = pretrained_sizes(path)
    cfg = make_config(dict(n_embd=n_embd, n_layer=n_layer, afn=recorded.get("afn", "gelu"),
                           n_head=_resolve_n_head(n_head, n_embd, recorded, path)))
    model = LMModel(cfg, vocab=n_vocab + n_positions, n_ctx=n_positions)
    load_openai_pretrained_model(model, n_ctx=n_positions, n_special=0, n_transfer=n_layer, n_embd=n_embd, path=path)
    return model, ModelSpec(cfg, n_vocab, 0, n_positions)


def check_vocabulary(spec, text_encoder, source):
    """A clear error where the vocabulary is not the one the weights were trained with."""
    if text_encoder.n_vocab != spec.n_vocab:
        raise WeightsError(f"the weights in {source} have {spec.n_vocab} token rows but the vocabulary "
                           f"{text_encoder.paths[0]} has {text_encoder.n_vocab} entries: they do not belong together")
    if spec.vocabulary and spec.vocabulary != text_encoder.fingerprint():
        raise WeightsError(f"{source} was trained with another vocabulary than {text_encoder.paths[0]} (same size, "
                           "other pieces or merges): give the run's --encoder_path and --bpe_path")


def vocabulary_paths(model_path, encoder_path=None, bpe_path=None):
    """The vocabulary files: as given, else those a checkpoint file of train.py records (where they
    still exist), else OpenAI's in model/."""
    recorded = {}
    if not encoder_path and os.path.isfile(model_path):
        recorded = read_checkpoint(model_path)[2]
        if not (os.path.exists(str(recorded.get("encoder_path"))) and os.path.exists(str(recorded.get("bpe_path")))):
            recorded = {}
    return (encoder_path or recorded.get("encoder_path") or "model/encoder_bpe_40000.json",
            bpe_path or recorded.get("bpe_path") or "model/vocab_40000.bpe")


def load_with_vocabulary(model_path, encoder_path=None, bpe_path=None, head=None, n_head=None, n_special=None):
    """(model, spec, text encoder) of a weights folder or a checkpoint file, with its vocabulary
    (as given, else the run's), a clear error where the two do not belong together."""
    text_encoder = TextEncoder(*vocabulary_paths(model_path, encoder_path, bpe_path))
    model, spec = load_model(model_path, head=head, n_vocab=text_encoder.n_vocab, n_special=n_special, n_head=n_head)
    if spec.vocabulary or not os.path.isdir(model_path):
        check_vocabulary(spec, text_encoder, model_path)
    elif spec.n_vocab < text_encoder.n_vocab:  # a folder: its token rows may hold an export's specials too
        raise WeightsError(f"the weights in {model_path} have {spec.n_vocab} token rows but the vocabulary "
                           f"{text_encoder.paths[0]} has {text_encoder.n_vocab} entries: they do not belong together")
    return model, spec, text_encoder
