"""text_utils: ids identical to the original pipeline (docs/reference.md §4), checked against `transformers` 4.57."""

import json
import multiprocessing
import pickle
import re
import shutil
import subprocess
import sys

import ftfy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import text_utils
from bench.corpus import english_texts
from conftest import OPENAI_GPT, ROOT
from text_utils import TextEncoder, VocabularyError, contiguous_chunks, learn_bpe, text_standardize

ENCODER = OPENAI_GPT / "encoder_bpe_40000.json"
MERGES = OPENAI_GPT / "vocab_40000.bpe"

EDGE_CASES = [
    "", " ", "\n", "Mr. and Mrs. Dursley, of number four, Privet Drive, were proud to say they were normal.",
    "She paused—then ran – fast ― very fast… and stopped.", "It’s “curly” and ‘single’ ´quoted´.",
    "Line one\nLine two\r\nLine three\n\n\n  indented", "Dr. J. R. R. Tolkien vs. U.S.A. e.g. i.e. etc.",
    "In 1984, 3.14159 and 1,000,000 people paid $4.50 (or 10%).", "Visit https://example.com/a_b?x=1&y=2#frag now",
    "email me at someone@example.org!!!", "Emoji: 😀🎉👍🏽 and ☃ snow.",
    "Café, naïve, façade, jalapeño, Zürich, Øresund.",
    "Ümlauts ÄÖÜ and ß", "tabs\tbetween\twords", "&amp; &lt;b&gt; HTML entities &quot;", "mojibake: Ã©tÃ© â€œhiâ€\x9d",
    "--- ~~~ !!! \"\"\" ;;; ??? +++ ,,, ))) ((( /// *** [[[ ]]] }}} {{{ ||| ___", "can't won't shouldn't y'all",
    "ALL CAPS SHOUTING", "MixedCase iPhone McDonald's", "a" * 60, "supercalifragilisticexpialidocious",
    "日本語のテキスト", "Привет, мир", "ﬁnancial ﬂow ligatures", "full-width ＡＢＣ１２３",
    "\x00control\x07chars\x1b[31m",
    "   leading and trailing   ", "semi;colon? question!exclaim", "She said, \"Hello.\" He said: 'Bye'.",
]


@pytest.fixture(scope="module")
def ours():
    return TextEncoder(str(ENCODER), str(MERGES))


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    assert transformers.__version__.startswith("4.57"), "the reference must be 4.57's slow tokenizer"
    return transformers.OpenAIGPTTokenizer(str(ENCODER), str(MERGES))


def reference_ids(tokenizer, text):
    # `_tokenize`, not `tokenize`: the latter lower-cases before spaCy (docs/reference.md §4).
    return tokenizer.convert_tokens_to_ids(tokenizer._tokenize(text))


def original_standardize(text):
    """docs/reference.md §4 step 2 as the TF source wrote it: a NON-raw string, so '\\\\+' became '\\+'."""
    text = text.replace("—", "-").replace("–", "-").replace("―", "-").replace("…", "...").replace("´", "'")
    # The TF source has `\\+` in a non-raw string: the regex engine receives `\+`, a second "+" rule.
    pattern = '(-+|~+|!+|"+|;+|\\?+|\\++|,+|\\)+|\\(+|\\++|\\/+|\\*+|\\[+|\\]+|}+|{+|\\|+|_+)'
    text = re.sub(pattern, r" \1 ", text)
    text = re.sub(r"\s*\n\s*", " \n ", text)
    text = re.sub(r"[^\S\n]+", " ", text)
    return text.strip()


@pytest.fixture(scope="module")
def parity_corpus(reference):
    """Real texts (backslash-free: see the next test) with the reference's ids."""
    texts = [t for t in english_texts() if "\\" not in t] + EDGE_CASES
    assert len(texts) >= 2000
    return texts, [reference_ids(reference, t) for t in texts]


def count_pools(monkeypatch):
    """Lower the size threshold to 0 and count the worker pools encode() starts."""
    monkeypatch.setattr(text_utils, "PARALLEL_MIN_CHARS", {"fork": 0, "spawn": 0})
    started = []
    get_context = multiprocessing.get_context

    def counting(method):
        started.append(method)
        return get_context(method)

    monkeypatch.setattr(text_utils.multiprocessing, "get_context", counting)
    return started


def test_ids_identical_to_the_original_pipeline(ours, parity_corpus):
    texts, expected = parity_corpus
    got = ours.encode(texts, verbose=False, workers=1)
    mismatches = [t for t, a, b in zip(texts, got, expected) if a != b]
    print(f"tokenizer parity: {len(mismatches)} mismatches in {len(texts)} texts")
    assert mismatches == []


def test_worker_processes_give_the_same_ids_in_the_same_order(parity_corpus, monkeypatch):
    texts, expected = parity_corpus
    started = count_pools(monkeypatch)
    got = TextEncoder(str(ENCODER), str(MERGES)).encode(texts, verbose=False, workers=3)
    assert started == [text_utils.start_method()]
    assert got == expected


def test_spawned_workers_rebuild_the_same_encoder(parity_corpus, monkeypatch):
    texts, expected = parity_corpus
    started = count_pools(monkeypatch)
    monkeypatch.setattr(text_utils, "start_method", lambda: "spawn")
    got = TextEncoder(str(ENCODER), str(MERGES)).encode(texts[:300], verbose=False, workers=2)
    assert started == ["spawn"] and got == expected[:300]


def test_small_inputs_start_no_process(ours, monkeypatch):
    started = []
    monkeypatch.setattr(text_utils.multiprocessing, "get_context", lambda method: started.append(method))
    texts = english_texts()[:200]
    assert sum(map(len, texts)) < min(text_utils.PARALLEL_MIN_CHARS.values())
    ours.encode(texts, verbose=False, workers=4)
    assert started == []
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        ours.encode(texts, workers=0)


@pytest.mark.parametrize("cpus, load, expected", [(2, 0.2, 2), (2, 1.0, 2), (2, 2.3, 1), (2, 6.0, 1), (8, 1.5, 4),
                                                   (8, 6.0, 3), (1, 0.0, 1)])
def test_default_workers_leave_busy_cpus_alone(monkeypatch, cpus, load, expected):
    monkeypatch.setattr(text_utils.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(text_utils.os, "getloadavg", lambda: (load, load, load))
    assert text_utils.default_workers() == expected


def test_pickled_encoder_keeps_added_tokens(ours):
    ours.encoder["_start_"] = len(ours.encoder)
    try:
        clone = pickle.loads(pickle.dumps(ours))
    finally:
        del ours.encoder["_start_"]
    assert clone.encoder["_start_"] == ours.n_vocab and clone.n_vocab == ours.n_vocab
    assert clone.encode(EDGE_CASES, verbose=False, workers=1) == ours.encode(EDGE_CASES, verbose=False, workers=1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=60), st.integers(1, 16))
def test_contiguous_chunks(texts, n_chunks):
    chunks = contiguous_chunks(texts, n_chunks)
    assert [t for chunk in chunks for t in chunk] == texts
    assert len(chunks) <= n_chunks and all(chunks)
    total, longest = sum(map(len, texts)), max(map(len, texts), default=0)
    assert all(sum(map(len, c)) <= total / n_chunks + longest for c in chunks)


def test_backslashes_follow_the_tf_rule(ours, reference, monkeypatch):
    texts = [t for t in english_texts() if "\\" in t] + ["a\\b", "C:\\\\path\\to\\file", "\\\\n escape \\"]
    assert len(texts) > 20
    # Where the reference pads backslashes (raw-string pattern), ours must not ...
    differs = sum(a != reference_ids(reference, t) for t, a in zip(texts, ours.encode(texts, verbose=False)))
    assert differs > 0
    # ... and equals the reference once its standardizing is the TF one.
    tokenization_openai = __import__("transformers.models.openai.tokenization_openai", fromlist=["x"])
    monkeypatch.setattr(tokenization_openai, "text_standardize", original_standardize)
    assert ours.encode(texts, verbose=False) == [reference_ids(reference, t) for t in texts]
    assert text_standardize("a\\\\b") == "a\\\\b"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abc -~!\";?+,)(/*[]}{|_\\\n\t .'—–―…´")), max_size=40))
def test_standardize_equals_the_original_regexes(text):
    assert text_standardize(text) == original_standardize(text)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="&")
               | st.sampled_from(["\n", "\t"]), max_size=80))
def test_ftfy_is_the_identity_where_it_is_skipped(text):
    assert text_utils.FTFY_IDENTITY.fullmatch(text)
    assert ftfy.fix_text(text) == text


def test_ftfy_still_runs_where_it_matters():
    for text in ["&amp; more", "Ã©tÃ©", "line\r\nend", "ﬁne"]:
        assert text_utils.fix_text(text) == ftfy.fix_text(text) != text


def test_decode(ours):
    ids = ours.encode(["The cat sat on the mat. It was... happy!"], verbose=False)[0]
    assert ours.decode(ids) == "the cat sat on the mat . it was ... happy !"
    ours.encoder["_start_"] = len(ours.encoder)
    try:
        assert ours.decode([ours.encoder["_start_"]] + ids[:2]) == "_start_ the cat"
    finally:
        del ours.encoder["_start_"]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ours.decode([10 ** 6])


def test_hugging_face_file_names(tmp_path, ours):
    shutil.copy(ENCODER, tmp_path / "vocab.json")
    shutil.copy(MERGES, tmp_path / "merges.txt")
    hf_named = TextEncoder(str(tmp_path / "encoder_bpe_40000.json"), str(tmp_path / "vocab_40000.bpe"))
    direct = TextEncoder(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    texts = EDGE_CASES[:8]
    assert hf_named.encode(texts, verbose=False) == direct.encode(texts, verbose=False) == ours.encode(texts,
                                                                                                       verbose=False)


def test_vocabulary_errors(tmp_path):
    good_enc, good_bpe = tmp_path / "enc.json", tmp_path / "v.bpe"
    good_enc.write_text(json.dumps({"<unk>": 0, "a</w>": 1}))
    good_bpe.write_text("#version: 0.2\na b\n")
    with pytest.raises(VocabularyError, match="not found"):
        TextEncoder(str(tmp_path / "none.json"), str(good_bpe))
    with pytest.raises(VocabularyError, match="merges file .* not found"):
        TextEncoder(str(good_enc), str(tmp_path / "none.bpe"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(VocabularyError, match="bad.json, line 1, column 2: not valid JSON"):
        TextEncoder(str(tmp_path / "bad.json"), str(good_bpe))
    (tmp_path / "ids.json").write_text(json.dumps({"a": 0, "b": 5}))
    with pytest.raises(VocabularyError, match="ids must be 0 ... 1"):
        TextEncoder(str(tmp_path / "ids.json"), str(good_bpe))
    (tmp_path / "bad.bpe").write_text("#version: 0.2\na b\nabc\n")
    with pytest.raises(VocabularyError, match=r"bad.bpe, line 3: expected two symbols"):
        TextEncoder(str(good_enc), str(tmp_path / "bad.bpe"))


def test_encode_rejects_a_bare_string(tmp_path):
    enc = learn_bpe(["the cat sat"] * 3, str(tmp_path / "e.json"), str(tmp_path / "m.bpe"), vocab_size=40,
                    min_frequency=1)
    with pytest.raises(TypeError, match="list of texts"):
        enc.encode("the cat")


def test_learn_bpe_writes_the_original_format(tmp_path):
    corpus = ["The cat sat on the mat.", "The dog sat on the log!", "A bird flew over the house."] * 20
    enc = learn_bpe(corpus, str(tmp_path / "encoder.json"), str(tmp_path / "vocab.bpe"), vocab_size=80,
                    min_frequency=2)
    lines = (tmp_path / "vocab.bpe").read_text().split("\n")
    assert lines[0].startswith("#version") and lines[-1] == ""
    assert all(len(line.split()) == 2 for line in lines[1:-1])
    encoder = json.loads((tmp_path / "encoder.json").read_text())
    assert encoder["<unk>"] == 0 and "the</w>" in encoder and "sat</w>" in encoder
    ids = enc.encode(["the cat sat on the log!"], verbose=False)[0]
    assert 0 not in ids
    assert enc.decode(ids) == "the cat sat on the log !"
    assert TextEncoder(str(tmp_path / "encoder.json"), str(tmp_path / "vocab.bpe")).encode(corpus[:3], False) == \
        enc.encode(corpus[:3], False)


LEARN_IN_A_NEW_PROCESS = """
import json, sys
sys.path.insert(0, {root!r})
from text_utils import learn_bpe
texts = json.load(open(sys.argv[1]))
learn_bpe(texts, sys.argv[2] + "/encoder.json", sys.argv[2] + "/vocab.bpe", vocab_size=400, min_frequency=1)
"""


@pytest.mark.slow
def test_learn_bpe_learns_the_same_vocabulary_in_every_process(tmp_path):
    """tokenizers' trainer breaks ties by ids it gives in a hash map's order, which changes with each
    process: without learn_bpe's fix, 3 processes often disagree on these texts."""
    from datasets import rocstories
    from synthetic import write_synthetic_rocstories

    stories, endings, _, _ = rocstories(write_synthetic_rocstories(tmp_path / "data", n_val=300, n_test=10, seed=5),
                                        n_valid=40)[0]
    (tmp_path / "texts.json").write_text(json.dumps(list(stories) + list(endings)))
    script = tmp_path / "learn.py"
    script.write_text(LEARN_IN_A_NEW_PROCESS.format(root=str(ROOT)))
    files = []
    for i in range(3):
        out = tmp_path / str(i)
        subprocess.run([sys.executable, str(script), str(tmp_path / "texts.json"), str(out)], check=True,
                       capture_output=True, text=True)
        files.append(((out / "encoder.json").read_bytes(), (out / "vocab.bpe").read_bytes()))
    assert files[0] == files[1] == files[2]


def test_rust_bpe_equals_the_original_bpe_on_every_vocabulary_word(ours):
    assert ours._fast_bpe is not None
    words = [w[:-4] if w.endswith("</w>") else w for w in ours.encoder if w != "\n</w>"]
    words += ["a😀b", "zzzzqx", "ééé", "aaaa", "n't", "'s", "1,000", "x" * 40]
    fast = [[t.id for t in ours._fast_bpe.tokenize(w)] for w in words]
    slow = [[ours.encoder.get(piece, 0) for piece in ours.bpe(w).split(" ")] for w in words]
    assert len(words) > 40000
    assert [w for w, a, b in zip(words, fast, slow) if a != b] == []


def test_the_fingerprint_follows_the_vocabulary_not_its_files(tmp_path):
    """Weights record it: the same pieces and merges in other files (an export's vocab.json and
    merges.txt) give the same fingerprint, a task's added specials do not change it, one changed
    merge does."""
    base = TextEncoder(str(ENCODER), str(MERGES))
    copy = {"vocab.json": json.dumps(json.loads(ENCODER.read_text()), indent=1),
            "merges.txt": MERGES.read_text(encoding="utf-8").replace("\n", "\r\n")}
    for name, text in copy.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    same = TextEncoder(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert same.fingerprint() == base.fingerprint() and base.fingerprint().startswith("sha256:")
    same.encoder["_classify_"] = len(same.encoder)
    same._fingerprint = None
    assert same.fingerprint() == base.fingerprint()
    lines = MERGES.read_text(encoding="utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # two merges' ranks swapped
    (tmp_path / "other.txt").write_text("\n".join(lines), encoding="utf-8")
    assert TextEncoder(str(ENCODER), str(tmp_path / "other.txt")).fingerprint() != base.fingerprint()


def test_a_vocabulary_file_with_bytes_that_are_not_utf8_is_one_line(tmp_path):
    (tmp_path / "v.json").write_bytes(b'{"a": 0, "\xff": 1}')
    (tmp_path / "m.bpe").write_bytes(b"#version: 0.2\na b\n\xfe c\n")
    with pytest.raises(VocabularyError, match=r"v.json, line 1, column 11: not UTF-8 text \(byte 0xff"):
        TextEncoder(str(tmp_path / "v.json"), str(tmp_path / "m.bpe"))
    (tmp_path / "v.json").write_text(json.dumps({"<unk>": 0, "a": 1}))
    with pytest.raises(VocabularyError, match=r"m.bpe, line 3, column 1: not UTF-8 text \(byte 0xfe"):
        TextEncoder(str(tmp_path / "v.json"), str(tmp_path / "m.bpe"))


def test_the_shipped_vocabulary_is_known_to_the_byte():
    """The sums the code holds are those model/README.md lists and those of the files shipped."""
    import hashlib

    readme = (OPENAI_GPT / "README.md").read_text()
    for name, digest in text_utils.OPENAI_VOCABULARY_SHA256.items():
        assert hashlib.sha256((OPENAI_GPT / name).read_bytes()).hexdigest() == digest and digest in readme


@pytest.mark.parametrize("name", ["encoder_bpe_40000.json", "vocab_40000.bpe"])
@pytest.mark.parametrize("n_bytes", [1, 16])
def test_a_damaged_openai_vocabulary_file_is_refused_in_one_line(tmp_path, name, n_bytes):
    """One bit flipped (a fresh run trained on other tokens), or 16 bytes (a UnicodeDecodeError traceback)."""
    import random

    for original in (ENCODER, MERGES):
        shutil.copy(original, tmp_path / original.name)
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    rng = random.Random(n_bytes)
    for offset in rng.sample(range(len(data)), n_bytes):
        data[offset] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    with pytest.raises(VocabularyError, match=rf"^{re.escape(str(path))} is not OpenAI's {re.escape(name)}: its "
                                              r"sha256 is [0-9a-f]{16}\.\.\., the released file's") as err:
        TextEncoder(str(tmp_path / ENCODER.name), str(tmp_path / MERGES.name))
    assert "\n" not in str(err.value)


def test_a_learned_vocabulary_is_not_held_to_openais_sums(tmp_path):
    encoder = learn_bpe(["a cat sat"] * 3, str(tmp_path / "encoder.json"), str(tmp_path / "vocab.bpe"),
                        vocab_size=40, min_frequency=1)
    assert TextEncoder(*encoder.paths).n_vocab == encoder.n_vocab
def test_spacy_is_imported_only_to_encode():
    """A run whose data is in the encoding cache never encodes, so it never pays spaCy's import
    (about 2 s of start-up); the first encode brings it, with the same ids."""
    probe = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from text_utils import TextEncoder; "
             f"enc = TextEncoder({str(ENCODER)!r}, {str(MERGES)!r}); enc.fingerprint(); enc.decode([0, 1]); "
             "print('spacy' in sys.modules); print(enc.encode(['Hello there.'], verbose=False)); "
             "print('spacy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "False" and out[2] == "True"
    assert out[1] == str(TextEncoder(ENCODER, MERGES).encode(["Hello there."], verbose=False))
