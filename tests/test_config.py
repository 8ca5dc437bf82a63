"""config: the flags keep the original's names and defaults (written out here from the TF script),
are built from the config classes' fields, take a task's recipe and the demo's presets, refuse
numbers out of range in one line, and make a frozen RunConfig."""

import dataclasses

import pytest

import config
from model_pytorch import GPTConfig
from opt import OptimizerConfig

# The TF script's argparse defaults (docs/reference.md §3, §5), written out independently.
TF_DEFAULTS = dict(seed=42, n_iter=3, n_batch=8, max_grad_norm=1, lr=6.25e-5, lr_warmup=0.002, n_ctx=512, n_embd=768,
                   n_head=12, n_layer=12, embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1, clf_pdrop=0.1, l2=0.01,
                   vector_l2=False, n_gpu=4, opt="adam", afn="gelu", lr_schedule="warmup_linear", n_transfer=12,
                   lm_coef=0.5, b1=0.9, b2=0.999, e=1e-8, n_valid=374, dataset="rocstories", submit=False,
                   analysis=False, log_dir="log/", save_dir="save/", data_dir="data/", submission_dir="submission/")


def test_the_defaults_are_the_original_scripts():
    flags = config.parse([]).flags()
    assert {k: flags[k] for k in TF_DEFAULTS} == TF_DEFAULTS


def test_each_default_is_written_once_in_the_config_classes():
    parser = config.build_parser()
    defaults = vars(parser.parse_args([]))
    for owner in (GPTConfig, OptimizerConfig):
        for f in dataclasses.fields(owner):
            if f.name != "fused_attention":
                assert defaults[f.name] == f.default, f.name
    assert config.parse([]).model == GPTConfig() and config.parse([]).optim == OptimizerConfig()
    helpless = [a.dest for a in parser._actions if a.dest != "help" and not a.help]
    assert helpless == []  # every flag says what it does


def test_presets_are_defaults_that_explicit_flags_override():
    lm = config.parse(["--dataset", "lm"])
    assert (lm.optim.lr, lm.optim.lr_schedule, lm.n_batch) == (2.5e-4, "warmup_cosine", 16)
    assert config.parse(["--dataset", "lm", "--lr", "1e-3"]).optim.lr == 1e-3
    demo = config.parse(["--demo", "--demo_dir", "d"])
    assert (demo.model.n_embd, demo.n_iter, demo.name, demo.submit) == (64, 8, "demo", True)
    assert demo.data_dir == "d/data" and demo.best_path == "d/save/demo/best_params.safetensors"
    assert config.parse(["--demo", "--n_iter", "2"]).n_iter == 2


def test_the_config_is_frozen_and_round_trips_through_its_flags():
    cfg = config.parse(["--n_embd", "32", "--n_head", "4", "--plain", "--desc", "x"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_iter = 5
    assert config.from_flags(cfg.flags()) == cfg
    assert cfg.model.fused_attention is False  # --plain: the explicit attention
    assert (cfg.log_path, cfg.checkpoint_path, cfg.encoding_cache) == ("log/x.jsonl", "save/x/checkpoint.pt",
                                                                       "save/encoded")


def test_resume_compares_every_setting_of_the_run_group():
    settings = set(config.fixed_settings())
    assert {"n_ctx", "embd_pdrop", "attn_pdrop", "resid_pdrop", "clf_pdrop", "plain", "amp", "n_transfer",
            "micro_batch", "compile", "seed", "n_iter", "n_batch", "n_gpu", "lr", "afn", "l2", "dataset"} <= settings
    assert not {"submit", "analysis", "data_dir", "log_dir", "save_dir", "device", "eval_batch", "resume"} & settings


@pytest.mark.parametrize("flag, value, expected", [
    ("--n_gpu", "0", "at least 1"), ("--eval_batch", "0", "at least 1"), ("--n_batch", "-2", "at least 1"),
    ("--n_iter", "0", "at least 1"), ("--lr", "-1", ">= 0"), ("--embd_pdrop", "1.5", r"in \[0, 1\)"),
    ("--b2", "1", r"in \[0, 1\)"), ("--micro_batch", "0", "at least 1"), ("--n_head", "5", "divide --n_embd"),
    ("--n_transfer", "13", "between -1 and --n_layer"), ("--lr_warmup", "2", r"in \[0, 1\]"),
    ("--n_valid", "0", "at least 1"), ("--lr", "inf", "a finite number"),
])
def test_a_number_out_of_range_is_one_line(flag, value, expected):
    with pytest.raises(config.ConfigError, match=rf"^{flag} \S+ is invalid: it must be .*{expected}"):
        config.parse([flag, value])
