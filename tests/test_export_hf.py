"""export_hf: `transformers` 4.57 loads the exported folder and gives our logits; our loader and
TextEncoder read it back; its tokenizer gives our ids."""

import json

import pytest
import torch
import torch.nn.functional as F

import export_hf
from checkpoints import host_copy, model_from_pretrained, model_state, save_best_params
from conftest import TINY_HEADS, flip_bit, tiny_config
from generate import generate
from model_pytorch import DoubleHeadModel, LMModel, ModelSpec
from tasks import SPECIAL_TOKENS, add_specials
from text_utils import TextEncoder, learn_bpe
from weights import ExportError, WeightsError, save_hf_checkpoint, write_openai_weights

transformers = pytest.importorskip("transformers")

N_CTX = 20
TEXTS = ["the cat sat on the mat , and the dog sat by the door .",
         "she didn't go home ; she went to the park with her friend !",
         "it's 5 o'clock - time for tea ? yes , tea and cake ( with cream ) .",
         "tom was sad because his team lost the game . he cried ."] * 4
FAITHFUL = ["the cat sat by the door .", "she didn't go home ; did she ?", "tom's friend cried - then he smiled !",
            "a zebra went to the park", "it's  5   o'clock\nand caf\u00e9 time\u2026 ok"]
MIXED_CASE = ["Mr. Smith went to Washington.", "The Cat SAT on THE mat!", "I'm sure he'll come, won't he?"]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    base = tmp_path_factory.mktemp("vocab")
    learn_bpe(TEXTS, str(base / "encoder.json"), str(base / "vocab.bpe"), vocab_size=150, min_frequency=1)
    return base / "encoder.json", base / "vocab.bpe"


def text_encoder(vocab, specials=True):
    enc = TextEncoder(str(vocab[0]), str(vocab[1]))
    if specials:
        add_specials(enc)
    return enc


def randomize(model, seed=0):
    """Weights of a realistic scale, and a classifier bias that is not 0 (so its export is checked)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1 + 0.1 * torch.randn(p.shape, generator=g)) if name.endswith(".g")
                    else 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def double_model(n_vocab, task_head_type="multiple_choice"):
    model = DoubleHeadModel(tiny_config(), n_vocab + 2, task_head_type, vocab=n_vocab + 3 + N_CTX, n_ctx=N_CTX)
    return randomize(model)


def story_inputs(n_vocab, seed=0):
    """[2 stories, 2 choices, N_CTX, 2] as train.py builds them; one choice has a second `_classify_`
    after its first, so only first-token pooling gives our logits."""
    g = torch.Generator().manual_seed(seed)
    start, delim, clf = n_vocab, n_vocab + 1, n_vocab + 2
    X = torch.zeros(2, 2, N_CTX, 2, dtype=torch.long)
    first_clf = torch.zeros(2, 2, dtype=torch.long)
    for i in range(2):
        story = torch.randint(0, n_vocab, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        for j in range(2):
            ending = torch.randint(0, n_vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
            seq = [start] + story + [delim] + ending + [clf]
            X[i, j, :len(seq), 0] = torch.tensor(seq)
            first_clf[i, j] = len(seq) - 1
    X[1, 0, int(first_clf[1, 0]) + 2, 0] = clf
    X[..., 1] = n_vocab + 3 + torch.arange(N_CTX)
    return X, first_clf


def our_lm_logits(model, X, n_rows):
    """Logits over the first n_rows rows (tokens and specials) at every position."""
    body = model.transformer
    with torch.no_grad():
        return F.linear(body(X), body.embed.weight)[..., :n_rows].reshape(*X.shape[:-1], n_rows)


def load_hf(cls, path):
    """The model, after checking every tensor it has was in the file (the LM head is tied)."""
    model, info = getattr(transformers, cls).from_pretrained(str(path), output_loading_info=True)
    unexpected = [k for k in info["unexpected_keys"]
                  if not (cls == "OpenAIGPTLMHeadModel" and k.startswith("multiple_choice_head."))]
    assert not info["missing_keys"] and not unexpected and not info["mismatched_keys"], info
    return model.eval()


# ----------------------------------------------------------------------------- transformers loads it

def test_double_heads_model_gives_our_lm_and_multiple_choice_logits(vocab, tmp_path):
    enc = text_encoder(vocab)
    model = double_model(enc.n_vocab)
    save_hf_checkpoint(model, enc, str(tmp_path / "hf"))
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
            "special_tokens_map.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    hf = load_hf("OpenAIGPTDoubleHeadsModel", tmp_path / "hf")
    X, first_clf = story_inputs(enc.n_vocab)
    with torch.no_grad():
        _, clf_logits = model(X)
        out = hf(input_ids=X[..., 0], mc_token_ids=first_clf)
    n_rows = enc.n_vocab + 3
    lm_err = (out.logits - our_lm_logits(model, X, n_rows)).abs().max().item()
    mc_err = (out.mc_logits - clf_logits).abs().max().item()
    print(f"DoubleHeads export: LM logits {lm_err:.1e}, multiple-choice logits {mc_err:.1e}")
    assert lm_err <= 1e-5 and mc_err <= 1e-5
    with torch.no_grad():  # why mc_token_ids must be the FIRST `_classify_`: the last one differs here
        last_clf = (X[..., 0] == enc.n_vocab + 2).long().cumsum(-1).argmax(-1)
        assert (hf(input_ids=X[..., 0], mc_token_ids=last_clf).mc_logits - clf_logits).abs().max() > 1e-3


def test_lm_head_model_gives_our_logits(vocab, tmp_path):
    enc = text_encoder(vocab)
    model = double_model(enc.n_vocab)
    save_hf_checkpoint(model, enc, str(tmp_path / "hf"))
    hf = load_hf("OpenAIGPTLMHeadModel", tmp_path / "hf")
    X, _ = story_inputs(enc.n_vocab, seed=1)
    with torch.no_grad():
        err = (hf(input_ids=X[..., 0]).logits - our_lm_logits(model, X, enc.n_vocab + 3)).abs().max().item()
    assert err <= 1e-5


def test_pretrained_lm_exports_without_specials(vocab, tmp_path):
    enc = text_encoder(vocab, specials=False)
    write_openai_weights(tmp_path / "openai", n_vocab=enc.n_vocab, n_ctx=N_CTX, n_embd=32, n_layer=2, seed=4)
    model = model_from_pretrained(str(tmp_path / "openai"), n_head=TINY_HEADS)[0].eval()
    save_hf_checkpoint(model, enc, str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["OpenAIGPTLMHeadModel"] and config["vocab_size"] == enc.n_vocab
    hf = load_hf("OpenAIGPTLMHeadModel", tmp_path / "hf")
    x = torch.randint(0, enc.n_vocab, (3, N_CTX))
    X = torch.stack([x, enc.n_vocab + torch.arange(N_CTX).expand(3, -1)], dim=-1)
    with torch.no_grad():
        err = (hf(input_ids=x).logits - our_lm_logits(model, X, enc.n_vocab)).abs().max().item()
    assert err <= 1e-5


# ----------------------------------------------------------------------------- our side reads it back

def test_our_loader_and_encoder_read_the_export_back(vocab, tmp_path):
    enc = text_encoder(vocab)
    model = double_model(enc.n_vocab)
    save_hf_checkpoint(model, enc, str(tmp_path / "hf"))
    back = model_from_pretrained(str(tmp_path / "hf"))[0]  # n_head from config.json
    ours, theirs = model.transformer.state_dict(), back.transformer.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name  # specials and positions in the same rows
    enc_back = TextEncoder(str(tmp_path / "hf" / "vocab.json"), str(tmp_path / "hf" / "merges.txt"))
    assert enc_back.n_vocab == enc.n_vocab and enc_back.encode(FAITHFUL, verbose=False) == enc.encode(FAITHFUL,
                                                                                                      verbose=False)
    prompts = enc.encode(["the cat sat", "she went to the park with"], verbose=False)
    kw = dict(max_new_tokens=8, top_k=10, seed=3)
    assert generate(back, prompts, enc_back.n_vocab, **kw).tokens == generate(model, prompts, enc.n_vocab, **kw).tokens


def test_transformers_tokenizer_gives_our_ids(vocab, tmp_path):
    enc = text_encoder(vocab)
    save_hf_checkpoint(double_model(enc.n_vocab), enc, str(tmp_path / "hf"))
    tok = transformers.OpenAIGPTTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert len(tok) == enc.n_vocab + 3
    assert tok.convert_tokens_to_ids(["_start_", "_delimiter_", "_classify_"]) == [enc.n_vocab + k for k in range(3)]
    ours = enc.encode(FAITHFUL + MIXED_CASE, verbose=False)
    assert any(0 in ids for ids in ours)  # unknown pieces occur, and map to the same id
    # the public tokenize lower-cases before spaCy: the same as ours on lower-case texts
    assert [tok.encode(t) for t in FAITHFUL] == ours[:len(FAITHFUL)]
    # _tokenize is the original pipeline on any text without backslashes
    assert [tok.convert_tokens_to_ids(tok._tokenize(t)) for t in FAITHFUL + MIXED_CASE] == ours


# ----------------------------------------------------------------------------- command and errors

def test_export_command_from_a_fine_tuned_checkpoint(vocab, tmp_path, capsys):
    enc = text_encoder(vocab)
    model = double_model(enc.n_vocab)
    spec = ModelSpec(tiny_config(), enc.n_vocab, 3, N_CTX, "multiple_choice", enc.n_vocab + 2, SPECIAL_TOKENS,
                     enc.fingerprint())
    save_best_params(host_copy(model_state(model)), str(tmp_path / "best_params.safetensors"), spec, {})
    argv = ["--model_path", str(tmp_path / "best_params.safetensors"), "--encoder_path", str(vocab[0]),
            "--bpe_path", str(vocab[1])]  # the file records its sizes, head and special rows
    assert export_hf.main(argv + ["--out", str(tmp_path / "hf")]) == 0
    assert "OpenAIGPTDoubleHeadsModel" in capsys.readouterr().out
    hf = load_hf("OpenAIGPTDoubleHeadsModel", tmp_path / "hf")
    X, first_clf = story_inputs(enc.n_vocab, seed=2)
    with torch.no_grad():
        err = (hf(input_ids=X[..., 0], mc_token_ids=first_clf).mc_logits - model(X)[1]).abs().max().item()
    assert err <= 1e-5
    assert hf.config.n_positions == N_CTX
    assert export_hf.main(argv + ["--out", str(tmp_path / "lm"), "--lm_only"]) == 0
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["architectures"] == ["OpenAIGPTLMHeadModel"]
    from safetensors.torch import save_file  # a state dict from elsewhere: the flags say what the file does not
    save_file(host_copy(model_state(model)), str(tmp_path / "plain.safetensors"))
    argv[1] = str(tmp_path / "plain.safetensors")
    assert export_hf.main(argv + ["--out", str(tmp_path / "x"), "--n_head", str(TINY_HEADS), "--n_special", "500"]) == 1
    assert "too few for n_vocab" in capsys.readouterr().err


def test_a_damaged_checkpoint_is_refused_in_one_line(vocab, tmp_path, capsys):
    """One bit flipped in the weights: exit 1 and one line naming the file, nothing written (it exported other
    weights silently)."""
    enc = text_encoder(vocab)
    spec = ModelSpec(tiny_config(), enc.n_vocab, 3, N_CTX, "multiple_choice", enc.n_vocab + 2, SPECIAL_TOKENS,
                     enc.fingerprint())
    best = tmp_path / "best_params.safetensors"
    save_best_params(host_copy(model_state(double_model(enc.n_vocab))), str(best), spec, {})
    flip_bit(best, -100, bit=3)
    argv = ["--model_path", str(best), "--encoder_path", str(vocab[0]), "--bpe_path", str(vocab[1]),
            "--out", str(tmp_path / "hf")]
    assert export_hf.main(argv) == 1
    err = capsys.readouterr().err
    assert err == f"error: {best} is damaged: its contents do not match the sha256 it records (a changed byte on the " \
                  "disk or in a copy); use another copy, or start again\n"
    assert not (tmp_path / "hf").exists()


def test_a_folder_that_cannot_be_written_is_one_line(vocab, tmp_path, capsys):
    """It was an OSError traceback (a full disk, a read-only folder: here a file where the folder should go)."""
    enc = text_encoder(vocab)
    spec = ModelSpec(tiny_config(), enc.n_vocab, 3, N_CTX, "multiple_choice", enc.n_vocab + 2, SPECIAL_TOKENS,
                     enc.fingerprint())
    best = tmp_path / "best_params.safetensors"
    save_best_params(host_copy(model_state(double_model(enc.n_vocab))), str(best), spec, {})
    (tmp_path / "a_file").write_text("")
    argv = ["--model_path", str(best), "--encoder_path", str(vocab[0]), "--bpe_path", str(vocab[1]),
            "--out", str(tmp_path / "a_file" / "hf")]
    assert export_hf.main(argv) == 1
    assert capsys.readouterr().err == f"error: cannot write {tmp_path / 'a_file' / 'hf' / 'config.json'}: " \
                                      "Not a directory\n"


def test_heads_transformers_lacks_are_a_clear_error(vocab, tmp_path):
    enc = text_encoder(vocab)
    with pytest.raises(ExportError, match="multiple-choice head only; this model's task head is ClfHead"):
        save_hf_checkpoint(double_model(enc.n_vocab, ("classification", 3)), enc, str(tmp_path / "hf"))


def test_vocabulary_of_another_model_is_a_clear_error(vocab, tmp_path):
    model = LMModel(tiny_config(), vocab=30 + N_CTX, n_ctx=N_CTX)
    with pytest.raises(ExportError, match="fewer than the vocabulary's"):
        save_hf_checkpoint(model, text_encoder(vocab), str(tmp_path / "hf"))
    enc = text_encoder(vocab, specials=False)
    with pytest.raises(ExportError, match="the model has 2 special rows but 0 special token names"):
        save_hf_checkpoint(LMModel(tiny_config(), vocab=enc.n_vocab + 2 + N_CTX, n_ctx=N_CTX), enc, str(tmp_path))


def test_missing_export_folder_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        model_from_pretrained(str(tmp_path / "nothing"))


def test_the_demo_exports_without_a_download(tmp_path, capsys):
    """Before the demo has run: its vocabulary and random pre-trained weights are written, and the
    language model is exported."""
    assert export_hf.main(["--demo", "--demo_dir", str(tmp_path / "demo"), "--out", str(tmp_path / "hf")]) == 0
    assert "as Hugging Face OpenAIGPTLMHeadModel" in capsys.readouterr().out
    assert (tmp_path / "demo" / "model" / "params_shapes.json").exists()
    load_hf("OpenAIGPTLMHeadModel", tmp_path / "hf")
