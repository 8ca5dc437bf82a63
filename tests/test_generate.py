"""Generation: the KV cache against re-running the prefix with the ordinary forward, the sampler
against an explicit NumPy restatement, the rows that may come out, n_ctx, checkpoints and the CLI."""

import json
import re

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import generate as generate_cli
from checkpoints import host_copy, load_model, model_state, save_best_params
from conftest import OPENAI_GPT, TINY_HEADS, flip_bit, tiny_config
from generate import GenerationError, choose_next, generate, next_token_probs
from model_pytorch import DoubleHeadModel, LMModel, ModelSpec
from text_utils import TextEncoder, learn_bpe
from weights import WeightsError, write_openai_weights

N_VOCAB, N_SPECIAL, N_CTX = 60, 3, 24
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [10]]  # different lengths: one padded batch


def lively(model, seed=1):
    """Random weights large enough that greedy continuations do not just repeat one token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".g"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def model():
    return lively(LMModel(tiny_config(), vocab=N_VOCAB + N_SPECIAL + N_CTX, n_ctx=N_CTX)).eval()


def reference_greedy(model, prompt, n_new):
    """Greedy decoding by running LMModel.forward on the whole prefix for each token, one prompt
    at a time (no padding, no cache): the logits of every row at the last position, and the
    argmax over the token rows."""
    tokens, steps = list(prompt), []
    first_position = model.transformer.embed.weight.size(0) - N_CTX
    for _ in range(n_new):
        x = torch.tensor([[[t, first_position + p] for p, t in enumerate(tokens)]])
        with torch.no_grad():
            logits = model(x)[0, -1]
        steps.append(logits)
        tokens.append(int(logits[:N_VOCAB].argmax()))
    return tokens[len(prompt):], torch.stack(steps)


# ----------------------------------------------------------------------------- cache == no cache

@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_equals_rerunning_the_prefix_for_a_batch_of_lengths(model, use_cache):
    n_new = 12
    out = generate(model, PROMPTS, N_VOCAB, max_new_tokens=n_new, greedy=True, use_cache=use_cache,
                   return_logits=True)
    assert out.logits.shape == (len(PROMPTS), n_new, N_VOCAB + N_SPECIAL + N_CTX)
    for i, prompt in enumerate(PROMPTS):
        tokens, logits = reference_greedy(model, prompt, n_new)
        assert out.tokens[i] == tokens
        assert len(set(tokens)) > 1  # the check is not trivial
        err = (out.logits[i] - logits).abs().max().item()
        assert err <= 1e-5, f"prompt {i}: max |logit diff| {err:.1e}"


def test_generation_may_fill_every_position(model):
    prompt = [7, 8, 9, 10]
    out = generate(model, [prompt], N_VOCAB, max_new_tokens=N_CTX - len(prompt), greedy=True)
    assert out.tokens[0] == reference_greedy(model, prompt, N_CTX - len(prompt))[0]


def test_sampled_batch_cached_equals_uncached(model):
    kw = dict(max_new_tokens=10, temperature=1.5, top_k=20, top_p=0.95, seed=3)
    assert generate(model, PROMPTS, N_VOCAB, **kw).tokens == generate(model, PROMPTS, N_VOCAB, use_cache=False,
                                                                       **kw).tokens


def test_generation_leaves_the_training_mode_as_it_was(model):
    model.train()
    generate(model, PROMPTS, N_VOCAB, max_new_tokens=2, greedy=True)
    assert model.training


# ----------------------------------------------------------------------------- sampling

def test_sampling_is_reproducible_with_a_seed(model):
    kw = dict(max_new_tokens=15, temperature=2.0)
    a, b = (generate(model, PROMPTS, N_VOCAB, seed=11, **kw).tokens for _ in range(2))
    assert a == b
    assert generate(model, PROMPTS, N_VOCAB, seed=12, **kw).tokens != a


def explicit_probs(logits, temperature, top_k, top_p):
    """The filters written out in NumPy, one row at a time."""
    out = np.zeros_like(logits)
    for r, row in enumerate(logits / temperature):
        order = np.argsort(-row)  # the test's logits are distinct: no ties
        keep = order[:top_k] if top_k else order
        p = np.exp(row[keep] - row[keep].max())
        p /= p.sum()
        n = np.searchsorted(np.cumsum(p), top_p) + 1 if top_p < 1 else len(keep)  # smallest prefix reaching top_p
        keep = keep[:n]
        p = np.exp(row[keep] - row[keep].max())
        out[r, keep] = p / p.sum()
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.6), (1.3, 12, 0.8),
                                                     (1.0, 1, 0.5), (2.0, 0, 0.05)])
def test_top_k_and_top_p_keep_the_right_tokens(temperature, top_k, top_p):
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(1)) * 2
    ours = next_token_probs(logits, temperature, top_k, top_p).double().numpy()
    expected = explicit_probs(logits.double().numpy(), temperature, top_k, top_p)
    assert ((ours > 0) == (expected > 0)).all()
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_draws_follow_the_filtered_distribution():
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(2))
    probs = next_token_probs(logits, 0.8, 10, 0.9)[0]
    support = probs > 0
    draws = choose_next(logits.expand(20000, -1), False, 0.8, 10, 0.9, torch.Generator().manual_seed(0))
    assert support[draws].all()
    counts = torch.bincount(draws, minlength=30)[support].numpy()
    expected = probs[support].double().numpy()
    assert chisquare(counts, expected / expected.sum() * counts.sum()).pvalue > 1e-3


# ----------------------------------------------------------------------------- rows, stop, limits

def test_special_and_position_rows_never_come_out(model):
    with torch.no_grad():  # make the non-token rows the most likely by far
        model.transformer.embed.weight[N_VOCAB:] *= 30
    for kw in (dict(greedy=True), dict(temperature=5.0, seed=0)):
        out = generate(model, PROMPTS, N_VOCAB, max_new_tokens=8, return_logits=True, **kw)
        assert (out.logits.argmax(-1) >= N_VOCAB).float().mean() > 0.5  # they would, unmasked
        assert all(0 <= t < N_VOCAB for tokens in out.tokens for t in tokens)


def test_stop_token_ends_each_sequence_where_it_comes(model):
    free = generate(model, PROMPTS, N_VOCAB, max_new_tokens=12, greedy=True).tokens
    stop = free[0][2]
    out = generate(model, PROMPTS, N_VOCAB, max_new_tokens=12, greedy=True, stop_token=stop).tokens
    for tokens, unstopped in zip(out, free):
        end = unstopped.index(stop) + 1 if stop in unstopped else len(unstopped)
        assert tokens == unstopped[:end]


def test_prompt_beyond_n_ctx_is_a_clear_error(model):
    with pytest.raises(GenerationError, match=r"prompt 1 has 9 tokens: with max_new_tokens=16 it would reach 25 "
                                              r"positions but the model has n_ctx=24; .* at most 15 new tokens"):
        generate(model, PROMPTS, N_VOCAB, max_new_tokens=16)


@pytest.mark.parametrize("kw,message", [
    (dict(prompts=[[1], []]), "prompt 1 is empty"),
    (dict(prompts=[[1, N_VOCAB + N_SPECIAL]]), r"prompt 0 holds id 63, outside the token and special rows 0 \.\.\. 62"),
    (dict(stop_token=N_VOCAB), "stop_token 60 is not a token id"),
    (dict(top_p=0.0), "0 < top_p <= 1"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(n_vocab=N_VOCAB + N_SPECIAL + 1), "n_vocab=64 but the embedding has 87 rows, 24 of them positions"),
])
def test_bad_settings_are_clear_errors(model, kw, message):
    args = dict(prompts=PROMPTS, n_vocab=N_VOCAB) | kw
    with pytest.raises(GenerationError, match=message):
        generate(model, args.pop("prompts"), args.pop("n_vocab"), **args)


def test_prompts_may_hold_special_tokens(model):
    prompt = [N_VOCAB, 4, 5, N_VOCAB + 1]  # e.g. _start_ ... _delimiter_ of a fine-tuned model
    out = generate(model, [prompt], N_VOCAB, max_new_tokens=5, greedy=True)
    assert out.tokens[0] == reference_greedy(model, prompt, 5)[0]


# ----------------------------------------------------------------------------- checkpoints

def fine_tuned(tmp_path):
    """A DoubleHeadModel saved as train.py saves its best parameters (with the spec that rebuilds it)."""
    model = DoubleHeadModel(tiny_config(), N_VOCAB + 2, "multiple_choice", vocab=N_VOCAB + N_SPECIAL + N_CTX,
                            n_ctx=N_CTX)
    lively(model.transformer, seed=4)
    path = tmp_path / "best_params.safetensors"
    spec = ModelSpec(tiny_config(), N_VOCAB, N_SPECIAL, N_CTX, "multiple_choice", N_VOCAB + 2,
                     ("_start_", "_delimiter_", "_classify_"))
    save_best_params(host_copy(model_state(model)), str(path), spec, dict(n_head=TINY_HEADS))
    return model, path


def test_a_fine_tuned_checkpoint_generates_as_the_model_it_came_from(tmp_path):
    model, path = fine_tuned(tmp_path)
    loaded, spec = load_model(str(path), head=None)  # the spec it records: no sizes given
    assert isinstance(loaded, LMModel) and loaded.transformer.n_ctx == N_CTX and spec.n_special == N_SPECIAL
    for (name, a), (_, b) in zip(model.transformer.state_dict().items(), loaded.transformer.state_dict().items()):
        assert torch.equal(a, b), name
    kw = dict(max_new_tokens=10, temperature=1.2, top_p=0.9, seed=5)
    assert generate(loaded, PROMPTS, N_VOCAB, **kw).tokens == generate(model, PROMPTS, N_VOCAB, **kw).tokens


def test_files_without_a_spec_rebuild_their_model_from_the_recorded_flags(tmp_path):
    """Checkpoints of earlier versions record the run's flags only: n_head comes from them."""
    model, _ = fine_tuned(tmp_path)
    args = dict(n_head=TINY_HEADS, afn="gelu")
    torch.save(dict(model=model.state_dict(), args=args), tmp_path / "checkpoint.pt")
    from safetensors.torch import save_file
    save_file(host_copy(model_state(model)), str(tmp_path / "best.safetensors"), metadata={"args": json.dumps(args)})
    for name in ("checkpoint.pt", "best.safetensors"):
        loaded, spec = load_model(str(tmp_path / name), head="auto", n_vocab=N_VOCAB)  # no n_head given
        assert loaded.transformer.cfg.n_head == TINY_HEADS and spec.n_ctx == N_CTX, name
        assert loaded.task_head.clf_token == N_VOCAB + 2, name


@pytest.mark.parametrize("args, message", [("{n_head: 4", "the 'args' metadata is not JSON"),
                                           ("[4]", "the 'args' metadata should be a JSON object, got list")])
def test_unreadable_recorded_args_are_a_clear_error(tmp_path, args, message):
    from safetensors.torch import load_file, save_file

    _, best = fine_tuned(tmp_path)
    path = tmp_path / "odd.safetensors"
    save_file(load_file(best), str(path), metadata={"args": args})
    with pytest.raises(WeightsError, match=f"odd.safetensors: {re.escape(message)}"):
        load_model(str(path), n_vocab=N_VOCAB)


def test_a_file_without_a_spec_and_the_wrong_vocabulary_is_a_clear_error(tmp_path):
    model, _ = fine_tuned(tmp_path)
    torch.save(model.state_dict(), tmp_path / "plain.pt")  # a state dict from elsewhere: nothing recorded
    with pytest.raises(WeightsError, match="87 rows, too few for n_vocab=90"):
        load_model(str(tmp_path / "plain.pt"), n_vocab=90, n_special=N_SPECIAL, n_head=TINY_HEADS)
    with pytest.raises(WeightsError, match="do not record n_head and n_embd=32"):
        load_model(str(tmp_path / "plain.pt"), n_vocab=N_VOCAB, n_special=N_SPECIAL)
    with pytest.raises(WeightsError, match="records no model spec; the vocabulary's size is needed"):
        load_model(str(tmp_path / "plain.pt"))


# ----------------------------------------------------------------------------- command line

TEXTS = ["the cat sat on the mat .", "a dog ran to the park and the cat sat down .",
         "she went to the store , then she went home ."] * 5


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    base = tmp_path_factory.mktemp("gen")
    encoder = learn_bpe(TEXTS, str(base / "encoder.json"), str(base / "vocab.bpe"), vocab_size=120, min_frequency=1)
    write_openai_weights(base / "model", n_vocab=len(encoder.encoder), n_ctx=32, n_embd=32, n_layer=2, seed=3)
    return base, encoder


def cli(base, *extra):
    return ["--model_path", str(base / "model"), "--encoder_path", str(base / "encoder.json"),
            "--bpe_path", str(base / "vocab.bpe"), "--n_head", str(TINY_HEADS), *extra]


def direct(base, encoder, prompts, **kw):
    """What the command should print, computed with the library."""
    model, _ = load_model(str(base / "model"), n_head=TINY_HEADS)
    return generate(model, encoder.encode(prompts, verbose=False), len(encoder.encoder), **kw).tokens


def test_cli_prints_the_decoded_continuations(cli_files, capsys):
    base, encoder = cli_files
    prompts = ["the cat sat", "she went to the store ,"]
    argv = cli(base, "--prompt", prompts[0], "--prompt", prompts[1], "--max_new_tokens", "6", "--top_k", "8",
               "--seed", "2")
    assert generate_cli.main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    tokens = direct(base, encoder, prompts, max_new_tokens=6, top_k=8, seed=2)
    assert printed == [f"{p} >>> {encoder.decode(t)}" for p, t in zip(prompts, tokens)]
    assert generate_cli.main(argv) == 0 and capsys.readouterr().out.splitlines() == printed  # the seed


def test_cli_errors_are_one_line(cli_files, capsys):
    base, _ = cli_files
    assert generate_cli.main(cli(base, "--prompt", "the cat", "--max_new_tokens", "40")) == 1
    assert "error: prompt 0 has 2 tokens: with max_new_tokens=40 it would reach 42" in capsys.readouterr().err
    assert generate_cli.main(cli(base, "--prompt", "the cat", "--stop", "the cat")) == 1
    assert "error: --stop 'the cat' encodes to 2 tokens" in capsys.readouterr().err
    assert generate_cli.main(cli(base, "--prompt", "x", "--encoder_path", str(base / "nope.json"))) == 1
    assert "nope.json" in capsys.readouterr().err


def test_cli_stop_text(cli_files, capsys):
    base, encoder = cli_files
    kw = dict(max_new_tokens=25, temperature=3.0, seed=0)
    free = direct(base, encoder, ["the cat sat"], **kw)[0]
    # a generated token whose text encodes back to that one token (a whole word)
    stop = next(t for t in free[1:] if encoder.encode([encoder.decode([t])], verbose=False)[0] == [t])
    argv = cli(base, "--prompt", "the cat sat", "--max_new_tokens", "25", "--temperature", "3", "--seed", "0",
               "--stop", encoder.decode([stop]))
    assert generate_cli.main(argv) == 0
    assert capsys.readouterr().out == f"the cat sat >>> {encoder.decode(free[:free.index(stop) + 1])}\n"


def test_cli_defaults_read_model_folder(tmp_path, monkeypatch, capsys):
    """OpenAI's vocabulary (the real files: a file of their names must be them) and weights in ./model/."""
    import shutil

    (tmp_path / "model").mkdir()
    for name in ("encoder_bpe_40000.json", "vocab_40000.bpe"):
        shutil.copy(OPENAI_GPT / name, tmp_path / "model" / name)
    encoder = TextEncoder(*(str(tmp_path / "model" / name) for name in ("encoder_bpe_40000.json", "vocab_40000.bpe")))
    write_openai_weights(tmp_path / "model", n_vocab=encoder.n_vocab, n_ctx=32, n_embd=32, n_layer=2, seed=3)
    monkeypatch.chdir(tmp_path)
    assert generate_cli.main(["--prompt", "the cat sat", "--greedy", "--max_new_tokens", "4", "--n_head", "4"]) == 0
    model, _ = load_model(str(tmp_path / "model"), n_head=TINY_HEADS)
    tokens = generate(model, encoder.encode(["the cat sat"], verbose=False), encoder.n_vocab, max_new_tokens=4,
                      greedy=True).tokens[0]
    assert capsys.readouterr().out == f"the cat sat >>> {encoder.decode(tokens)}\n"


def test_cli_demo_needs_no_download(tmp_path, capsys):
    argv = ["--demo", "--demo_dir", str(tmp_path / "demo"), "--prompt", "tom was happy .", "--max_new_tokens", "5",
            "--seed", "0"]
    assert generate_cli.main(argv) == 0  # writes the demo's vocabulary and random weights first
    first = capsys.readouterr().out
    assert first.startswith("tom was happy . >>> ") and len(first.split(" >>> ")[1].strip()) > 0
    assert (tmp_path / "demo" / "model" / "params_shapes.json").exists()
    assert generate_cli.main(argv) == 0 and capsys.readouterr().out == first


def test_cli_device_this_machine_lacks_is_one_line(cli_files, capsys, monkeypatch):
    base, _ = cli_files
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert generate_cli.main(cli(base, "--prompt", "the cat", "--device", "cuda")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: this machine has 0 CUDA device(s)") and "Traceback" not in err


def test_model_pytorch_still_offers_generate(model):
    import model_pytorch

    kw = dict(max_new_tokens=6, greedy=True)
    expected = generate(model, PROMPTS, N_VOCAB, **kw).tokens
    assert model_pytorch.generate(model, PROMPTS, N_VOCAB, **kw).tokens == expected


def test_cli_refuses_a_damaged_checkpoint_in_one_line(cli_files, tmp_path, capsys):
    """One bit flipped in a run's parameters: exit 1 and one line naming the file (it generated from
    the changed weights)."""
    base, encoder = cli_files
    model, spec = load_model(str(base / "model"), n_head=TINY_HEADS)
    spec = ModelSpec(spec.config, spec.n_vocab, 0, spec.n_ctx, vocabulary=encoder.fingerprint())
    path = tmp_path / "best_params.safetensors"
    save_best_params(host_copy(model_state(model)), str(path), spec,
                     dict(encoder_path=str(base / "encoder.json"), bpe_path=str(base / "vocab.bpe")))
    argv = ["--model_path", str(path), "--prompt", "the cat", "--max_new_tokens", "2"]
    assert generate_cli.main(argv) == 0
    capsys.readouterr()
    flip_bit(path, -100, bit=5)
    assert generate_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} is damaged: its contents do not match the sha256") and err.count("\n") == 1
