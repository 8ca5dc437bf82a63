"""train.py's settings: the flags (the original's names and defaults, then this port's), built once
from the fields of RunConfig, GPTConfig and OptimizerConfig, so a default is written in one place;
the presets (`--demo`, a task's recipe such as `--dataset lm`'s); the checks; and the frozen
RunConfig a run is handed. Settings in the "run" group fix the run's shapes and numbers:
`--resume` refuses to change them."""

import argparse
import os
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from model_pytorch import ACT_FNS, GPTConfig
from opt import SCHEDULES, OptimizerConfig
from tasks import TASKS, get_task

DEMO_PRESETS = dict(n_embd=64, n_head=4, n_layer=2, n_transfer=2, n_iter=8, lr=2e-3, lr_warmup=0.05, n_ctx=128,
                    desc="demo", submit=True, analysis=True)
CHOICES = {"dataset": [*TASKS, "lm"], "afn": sorted(ACT_FNS), "lr_schedule": sorted(SCHEDULES), "opt": ["adam"],
           "amp": ["bf16", "fp16"]}


class ConfigError(ValueError):
    """A flag outside its range."""


def _flag(default, help, group="run", **extra):
    return field(default=default, metadata=dict(help=help, group=group, **extra))


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is told, frozen. `model` and `optim` hold the network's and the optimizer's
    settings; the rest are the run's (group "run") and where it reads and writes (group "io")."""

    model: GPTConfig = field(default_factory=GPTConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    dataset: str = _flag("rocstories", "the task (docs/tasks.md); lm: language modelling on the plain text files "
                                       "of --data_dir")
    seed: int = _flag(42, "seeds every generator; the original's numpy stream draws the special rows, then each "
                          "epoch's order")
    n_iter: int = _flag(3, "epochs")
    n_batch: int = _flag(8, "examples per tower (the TF code's per-GPU batch)")
    n_gpu: int = _flag(4, "towers per update (the TF code's GPUs): an update is n_batch x n_gpu examples")
    n_ctx: int = _flag(512, "at most this many tokens per sequence; the run uses the longest sequence of the data, "
                            "up to it")
    n_valid: int = _flag(374, "ROCStories: stories held out of the labelled file for validation; every task: "
                              "training examples evaluated at each log point")
    n_transfer: int = _flag(12, "pre-trained layers loaded (-1: none, not even the embedding)")
    lm_coef: float = _flag(0.5, "weight of the LM loss in a task's objective (0: the task loss alone)")
    opt: str = _flag("adam", "the optimizer (the original's flag; only its modified Adam)")
    amp: str | None = _flag(None, "autocast in bf16 or fp16 (fp16 adds a loss scaler); default: float32")
    compile: bool = _flag(False, "torch.compile the model (lengths bucketed; CUDA graphs on a GPU)")
    micro_batch: int | None = _flag(None, "examples per forward pass; default: a process's whole share of an "
                                          "update in one, halved whenever the device runs out of memory")
    plain: bool = _flag(False, "turn the speed-ups off (no trimming, explicit attention, LM over every position)")
    desc: str | None = _flag(None, "the run's name: the log LOG_DIR/DESC.jsonl, the folder SAVE_DIR/DESC/; "
                                   "default: the dataset's name", "io")
    data_dir: str = _flag("data/", "the task's data folder as distributed", "io")
    log_dir: str = _flag("log/", "where the JSON-lines log goes", "io")
    save_dir: str = _flag("save/", "where the run's folder DESC/ goes (checkpoint, best parameters)", "io")
    submission_dir: str = _flag("submission/", "where --submit writes test-set predictions", "io")
    model_path: str = _flag("model/", "pre-trained weights: OpenAI's shards or a Hugging Face folder", "io")
    encoder_path: str = _flag("model/encoder_bpe_40000.json", "the BPE vocabulary (ids)", "io")
    bpe_path: str = _flag("model/vocab_40000.bpe", "the BPE merges", "io")
    submit: bool = _flag(False, "keep the best validation parameters (SAVE_DIR/DESC/best_params.safetensors) and "
                                "predict the test sets the task submits into SUBMISSION_DIR (GLUE's, ROCStories'; "
                                "docs/tasks.md)", "io")
    analysis: bool = _flag(False, "print each labelled split's figures at the end", "io")
    resume: bool = _flag(False, "continue from SAVE_DIR/DESC/checkpoint.pt", "io")
    eval_batch: int | None = _flag(None, "examples per evaluation batch (default: 128 on a GPU, 16 on a CPU)", "io")
    cache_dir: str | None = _flag(None, "where encoded data sets are cached (default: SAVE_DIR/encoded)", "io")
    device: str | None = _flag(None, "cpu, cuda, cuda:1 ... (default: cuda if present)", "io")
    threads: int | None = _flag(None, "CPU threads (default: OMP_NUM_THREADS, else the cores other programs leave "
                                      "idle)", "io")
    demo: bool = _flag(False, "run on a built-in synthetic task (no download); its presets: "
                              + ", ".join(f"--{k} {v}" for k, v in DEMO_PRESETS.items() if not isinstance(v, bool)),
                       "io")
    demo_dir: str = _flag("demo_run/", "with --demo, every input and output goes here", "io")
    dist_timeout: float = _flag(10.0, "torchrun: minutes a process waits for the others at an exchange before the "
                                      "job ends with 'rank N lost' (rank 0 alone evaluates and checkpoints "
                                      "meanwhile: keep it above the longest evaluation)", "io")
    stop_after_updates: int | None = _flag(None, argparse.SUPPRESS, "io")  # tests: an interrupt

    # -- where the run reads and writes ----------------------------------------------------------
    @property
    def name(self):
        return self.desc or self.dataset

    @property
    def run_dir(self):
        return os.path.join(self.save_dir, self.name)

    @property
    def best_path(self):
        return os.path.join(self.run_dir, "best_params.safetensors")

    @property
    def checkpoint_path(self):
        return os.path.join(self.run_dir, "checkpoint.pt")

    @property
    def log_path(self):
        return os.path.join(self.log_dir, f"{self.name}.jsonl")

    @property
    def encoding_cache(self):
        return self.cache_dir or os.path.join(self.save_dir, "encoded")

    @property
    def batch_size(self):
        """Examples per update."""
        return self.n_batch * self.n_gpu

    def flags(self):
        """Every flag's value by name, as the log's first line and the checkpoints record them."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "optim")}
        model = {k: v for k, v in asdict(self.model).items() if k != "fused_attention"}
        return dict(flat, **model, **asdict(self.optim))


def _flag_fields():
    """(name, default, help, group) of every flag: the network's, the optimizer's, then the run's."""
    for owner in (GPTConfig, OptimizerConfig):
        for f in fields(owner):
            if "help" in f.metadata:
                yield f.name, f.default, f.metadata["help"], "run"
    for f in fields(RunConfig):
        if f.name not in ("model", "optim"):
            yield f.name, f.default, f.metadata["help"], f.metadata["group"]


def fixed_settings():
    """The flags --resume keeps fixed (the "run" group)."""
    return [name for name, _, _, group in _flag_fields() if group == "run"]


def build_parser():
    parser = argparse.ArgumentParser(description="Fine-tune GPT-1 (faithful to OpenAI's TF code).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {"run": parser.add_argument_group("run", "settings that fix the run's shapes and numbers (kept on "
                                                      "--resume)"),
              "io": parser.add_argument_group("io", "paths, reporting and devices (free to change on --resume)")}
    types = {f.name: _value_type(f.type) for owner in (GPTConfig, OptimizerConfig, RunConfig) for f in fields(owner)}
    for name, default, help, group in _flag_fields():
        if types[name] is bool:
            groups[group].add_argument(f"--{name}", action="store_true", help=help)
        else:
            groups[group].add_argument(f"--{name}", type=types[name], default=default, choices=CHOICES.get(name),
                                       help=help)
    return parser


def _value_type(annotation):
    """int, float, str or bool: the type of a field annotated so, None allowed (`int | None`)."""
    options = [t for t in getattr(annotation, "__args__", (annotation,)) if t is not type(None)]
    return options[0]


def parse(argv=None, parser=None):
    """The run's frozen settings from the command line: a task's recipe and the demo's sizes become
    the defaults (explicit flags win); every number is checked."""
    parser = parser or build_parser()
    known = parser.parse_known_args(argv)[0]
    parser.set_defaults(**get_task(known.dataset).presets)
    if known.demo:
        d = known.demo_dir
        parser.set_defaults(**DEMO_PRESETS, data_dir=os.path.join(d, "data"), model_path=os.path.join(d, "model"),
                            encoder_path=os.path.join(d, "model", "encoder_bpe.json"),
                            bpe_path=os.path.join(d, "model", "vocab.bpe"), log_dir=os.path.join(d, "log"),
                            save_dir=os.path.join(d, "save"), submission_dir=os.path.join(d, "submission"))
    return from_flags(vars(parser.parse_args(argv)))


def from_flags(flags):
    """A RunConfig from flat flag values (checked)."""
    check(flags)
    split = {owner: {f.name: flags[f.name] for f in fields(owner) if f.name in flags}
             for owner in (GPTConfig, OptimizerConfig)}
    own = {k: v for k, v in flags.items() if k in {f.name for f in fields(RunConfig)}}
    return RunConfig(model=GPTConfig(**split[GPTConfig], fused_attention=not flags.get("plain", False)),
                     optim=OptimizerConfig(**split[OptimizerConfig]), **own)


def check(a):
    """Every numeric flag in its range, as one clear line (argparse checks only the types)."""
    rules = [
        ("n_iter", a["n_iter"] >= 1, "at least 1"),
        ("n_batch", a["n_batch"] >= 1, "at least 1"),
        ("n_gpu", a["n_gpu"] >= 1, "at least 1"),
        ("eval_batch", a["eval_batch"] is None or a["eval_batch"] >= 1, "at least 1"),
        ("n_valid", a["n_valid"] >= 1, "at least 1"),
        ("n_ctx", a["n_ctx"] >= 6, "at least 6"),
        ("n_embd", a["n_embd"] >= 1, "at least 1"),
        ("n_head", a["n_head"] >= 1 and a["n_embd"] % max(a["n_head"], 1) == 0, "at least 1 and divide --n_embd"),
        ("n_layer", a["n_layer"] >= 1, "at least 1"),
        ("n_transfer", -1 <= a["n_transfer"] <= a["n_layer"], f"between -1 and --n_layer ({a['n_layer']})"),
        ("lr", a["lr"] >= 0 and np.isfinite(a["lr"]), "a finite number >= 0"),
        ("lr_warmup", 0 <= a["lr_warmup"] <= 1, "in [0, 1]"),
        ("l2", a["l2"] >= 0, ">= 0"),
        ("lm_coef", a["lm_coef"] >= 0, ">= 0"),
        ("b1", 0 <= a["b1"] < 1, "in [0, 1)"),
        ("b2", 0 <= a["b2"] < 1, "in [0, 1)"),
        ("e", a["e"] >= 0, ">= 0"),
        ("max_grad_norm", np.isfinite(a["max_grad_norm"]), "a finite number (<= 0 turns clipping off)"),
        ("micro_batch", a["micro_batch"] is None or a["micro_batch"] >= 1, "at least 1"),
        ("threads", a["threads"] is None or a["threads"] >= 1, "at least 1"),
        ("stop_after_updates", a["stop_after_updates"] is None or a["stop_after_updates"] >= 1, "at least 1"),
        ("dist_timeout", a["dist_timeout"] > 0 and np.isfinite(a["dist_timeout"]), "a finite number of minutes > 0"),
    ] + [(name, 0 <= a[name] < 1, "in [0, 1)") for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop", "clf_pdrop")]
    for name, ok, expected in rules:
        if not ok:
            raise ConfigError(f"--{name} {a[name]} is invalid: it must be {expected}")
