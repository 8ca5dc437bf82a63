"""Text to ids exactly as the original (docs/reference.md §4): ftfy, standardizing, spaCy's
English tokenizer rules, lower-casing, then BPE with "</w>"; plus `decode` and a BPE learner.

Speed without changing a single id: ftfy is skipped for texts it provably leaves alone (plain
printable ASCII without '&'), the standardizing rules run as one pass each, spaCy runs in
batches, computes no lexical attributes and hands over hashes instead of Token objects, BPE runs
in Hugging Face `tokenizers` (Rust) with the same merges, once per distinct word, and large
inputs are spread over worker processes (docs/speed.md).
"""

import functools
import gc
import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
from itertools import chain

import ftfy
from tqdm import tqdm

from utils import idle_cpus, read_json, read_text_file

# docs/reference.md §4 step 2. The TF code wrote its pattern in a non-raw string, so its backslash
# alternative became a second "+" rule: backslashes are NOT padded. A run of one of these characters:
PUNCTUATION_RUN = re.compile(r'([-~!";?+,)(/*\[\]}{|_])\1*')
NEWLINE = re.compile(r"\s*\n\s*")
BLANKS = re.compile(r"[^\S\n]+")
CHAR_FIXES = str.maketrans({"—": "-", "–": "-", "―": "-", "…": "...", "´": "'"})
# Texts made only of these characters are returned unchanged by ftfy.fix_text (proved by a test).
FTFY_IDENTITY = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")


def text_standardize(text):
    """The original's standardizing (docs/reference.md §4 step 2)."""
    text = text.translate(CHAR_FIXES)
    text = PUNCTUATION_RUN.sub(_spaced, text)
    if "\n" in text:
        text = NEWLINE.sub(" \n ", text)
    return BLANKS.sub(" ", text).strip()


def _spaced(match):
    """The run with a space on each side. A function: Python 3.11 expands a replacement template
    in Python for every match, which is slower."""
    return " " + match.group() + " "


def fix_text(text):
    """ftfy.fix_text, skipped where it is the identity."""
    return text if FTFY_IDENTITY.fullmatch(text) else ftfy.fix_text(text)


def get_pairs(word):
    return set(zip(word, word[1:]))


def english_tokenizer():
    """spaCy's rule-based English tokenizer: no model download needed.

    Its vocabulary computes no lexical attributes (shape, like_num, ...) for new words: the
    tokenizer's rules never read them and we keep only the token text, so the tokens are the same.
    """
    from spacy.lang.en import English

    tokenizer = English().tokenizer
    tokenizer.vocab.lex_attr_getters = {}
    return tokenizer


def spacy_docs(texts, nlp):
    """spaCy Docs of the texts after ftfy and standardizing (docs/reference.md §4 steps 1-3)."""
    return nlp.pipe((text_standardize(fix_text(t)) for t in texts), batch_size=1000)


def pre_tokenize(texts, nlp):
    """spaCy token texts of each text (docs/reference.md §4 steps 1-3)."""
    for doc in spacy_docs(texts, nlp):
        yield [token.text for token in doc]


def fast_bpe_model(encoder, bpe_ranks):
    """The same merges in Hugging Face `tokenizers`' BPE (Rust), or None where it could differ.

    It equals `TextEncoder.bpe` + `encoder.get(piece, 0)` when every merge and its result are in
    the vocabulary (true of OpenAI's files and of `learn_bpe`'s) and id 0 is the unknown piece.
    """
    from tokenizers.models import BPE

    merges = sorted(bpe_ranks, key=bpe_ranks.get)
    unknown = next((piece for piece, i in encoder.items() if i == 0), None)
    if unknown is None or not all(a in encoder and b in encoder and a + b in encoder for a, b in merges):
        return None
    return BPE(vocab=dict(encoder), merges=merges, unk_token=unknown, end_of_word_suffix="</w>")


SHIPPED_VOCABULARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")  # OpenAI's two files


def _resolve(path, alternative):
    """`path`; else the Hugging Face-named file beside it (vocab.json, merges.txt); else, for OpenAI's
    files named relative to a folder that lacks them (model/encoder_bpe_40000.json from another
    working folder), the copies that ship with the project in its model/ folder."""
    if os.path.exists(path):
        return path
    other = os.path.join(os.path.dirname(path), alternative)
    if os.path.exists(other):
        return other
    shipped = os.path.join(SHIPPED_VOCABULARY, os.path.basename(path))
    if not os.path.isabs(path) and os.path.basename(path) in ("encoder_bpe_40000.json", "vocab_40000.bpe") \
            and os.path.exists(shipped):
        return shipped
    return path


# Below this many characters (fork: about 1-2 s of work in one process) an input is encoded in one
# process. Workers cost their start-up (fork: ~50 ms; spawn: 2-3 s each, as each re-imports spaCy)
# and warm their own caches (10-25% more work in all); small inputs would lose.
PARALLEL_MIN_CHARS = {"fork": 2_000_000, "spawn": 10_000_000}


def start_method():
    """fork where it is the platform's usual safe choice (Linux): workers start in milliseconds
    and inherit the loaded encoder. spawn elsewhere (macOS, Windows)."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def default_workers():
    """Worker processes for large inputs: the CPUs other programs leave idle (utils.idle_cpus), at
    most 4. Busy CPUs give a worker no time (Linux's autogroup scheduling shares CPU time between
    sessions, not processes), so it would only add its cost; beyond 4, gathering the results eats
    the gain."""
    return max(1, min(4, idle_cpus()))


def contiguous_chunks(texts, n_chunks):
    """`texts` cut into at most `n_chunks` consecutive slices of about the same number of characters."""
    total = max(1, sum(len(t) for t in texts))
    chunks, start, done = [], 0, 0
    for i, text in enumerate(texts):
        done += len(text)
        if len(chunks) < n_chunks - 1 and done * n_chunks >= total * (len(chunks) + 1):
            chunks.append(texts[start:i + 1])
            start = i + 1
    if start < len(texts):
        chunks.append(texts[start:])
    return chunks


_worker_encoder = None  # the TextEncoder of a worker process (set once by _start_worker)


def _start_worker(encoder):
    """A worker leaves Ctrl-C and SIGTERM to its parent, which ends the pool (no worker tracebacks)."""
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker_encoder = encoder


def _encode_in_worker(texts):
    return _worker_encoder._encode_here(texts)


class ComputedOnce(dict):
    """A dict that fills a missing key with compute(key): look-ups stay in C for known keys."""

    def __init__(self, compute):
        super().__init__()
        self.compute = compute

    def __missing__(self, key):
        value = self[key] = self.compute(key)
        return value


class VocabularyError(ValueError):
    """A vocabulary file is missing or malformed."""


# OpenAI's vocabulary files, shipped in model/ (model/README.md lists the same sums): known to the
# byte, so a file of either name that differs by one bit is refused instead of giving other ids.
# A vocabulary learned with learn_bpe has other names; weights record its fingerprint instead.
OPENAI_VOCABULARY_SHA256 = {
    "encoder_bpe_40000.json": "fdf49b19e7de236852091da09b84a7a3cd5e7b0e79916376cf45f6b8127b8078",
    "vocab_40000.bpe": "0ea9b51ae695073cd871e0358f7016311d671a7ff3963e367d5236522f294725",
}


def check_openai_file(path):
    """A file named as one of OpenAI's vocabulary files must be that file, byte for byte."""
    name = os.path.basename(path)
    expected = OPENAI_VOCABULARY_SHA256.get(name)
    if expected is None or not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        found = hashlib.sha256(f.read()).hexdigest()
    if found != expected:
        raise VocabularyError(f"{path} is not OpenAI's {name}: its sha256 is {found[:16]}..., the released file's "
                              f"{expected[:16]}... (damaged or changed); get it again (model/README.md)")


def load_encoder(path):
    if not os.path.exists(path):
        raise VocabularyError(f"vocabulary file {path!r} not found (expected encoder_bpe_40000.json or vocab.json; "
                              "see model/README.md)")
    encoder = read_json(path, VocabularyError, what="vocabulary file")
    if not isinstance(encoder, dict) or not encoder:
        raise VocabularyError(f"{path}: expected a JSON object mapping BPE pieces to ids")
    bad = [k for k, v in encoder.items() if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise VocabularyError(f"{path}: the id of {bad[0]!r} is {encoder[bad[0]]!r}, expected an integer")
    if sorted(encoder.values()) != list(range(len(encoder))):
        raise VocabularyError(f"{path}: ids must be 0 ... {len(encoder) - 1}, each once")
    return encoder


def load_merges(path):
    """Merge ranks from a `#version` line then one "a b" pair per line (rank = line order)."""
    if not os.path.exists(path):
        raise VocabularyError(f"merges file {path!r} not found (expected vocab_40000.bpe or merges.txt; "
                              "see model/README.md)")
    ranks = {}
    for line_no, line in enumerate(read_text_file(path, VocabularyError, what="merges file").split("\n"), start=1):
        line = line.rstrip("\r")
        if (line_no == 1 and line.startswith("#")) or not line:
            continue
        pair = tuple(line.split())
        if len(pair) != 2:
            raise VocabularyError(f"{path}, line {line_no}: expected two symbols separated by a space, "
                                  f"found {line!r}")
        ranks.setdefault(pair, len(ranks))
    if not ranks:
        raise VocabularyError(f"{path}: no merges found")
    return ranks


class TextEncoder:
    """Encodes texts to the original's BPE ids (docs/reference.md §4) and decodes ids back to text."""

    def __init__(self, encoder_path, bpe_path):
        encoder_path = _resolve(encoder_path, "vocab.json")
        bpe_path = _resolve(bpe_path, "merges.txt")
        self.paths = (encoder_path, bpe_path)
        for path in self.paths:
            check_openai_file(path)
        self.encoder = load_encoder(encoder_path)
        self.n_vocab = len(self.encoder)  # ids from here on are special tokens added by a task
        self.bpe_ranks = load_merges(bpe_path)
        self._fast_bpe = fast_bpe_model(self.encoder, self.bpe_ranks)
        self._fingerprint = None
        self.cache = {}  # BPE of a lower-cased word, as a space-joined string (the original's cache)
        self._ids = ComputedOnce(self._token_ids)  # spaCy token (its ORTH hash) -> ids
        self._decoder = {}

    @functools.cached_property
    def nlp(self):
        """spaCy's tokenizer, made when a text is first encoded: a run whose data is in the encoding
        cache never imports spaCy (about 2 s of its start-up)."""
        return english_tokenizer()

    def fingerprint(self):
        """A digest of the vocabulary and the merges as loaded (not of their files' bytes, nor of the
        special tokens a task adds): weights record it, so a vocabulary that does not belong to
        them is found before it gives other ids."""
        if self._fingerprint is None:
            base = sorted((i, piece) for piece, i in self.encoder.items() if i < self.n_vocab)
            merges = sorted(self.bpe_ranks, key=self.bpe_ranks.get)
            data = json.dumps([base, merges], ensure_ascii=False).encode("utf-8")
            self._fingerprint = "sha256:" + hashlib.sha256(data).hexdigest()
        return self._fingerprint

    # -- BPE (docs/reference.md §4 step 4) ---------------------------------------------------------
    def bpe(self, token):
        """Merge the lowest-ranked pair first until no pair is in the merges file."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = get_pairs(word)
        if not pairs:
            return token + "</w>"
        ranks = self.bpe_ranks
        while True:
            bigram = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
            if bigram not in ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = get_pairs(word)
        word = " ".join(word)
        if word == "\n  </w>":
            word = "\n</w>"
        self.cache[token] = word
        return word

    def _token_ids(self, orth):
        """Ids of one spaCy token, given by its ORTH hash (no Token object is built)."""
        word = self.nlp.vocab.strings[orth].lower()
        if self._fast_bpe is not None and not any(c.isspace() for c in word):
            return [t.id for t in self._fast_bpe.tokenize(word)]
        get = self.encoder.get  # whitespace tokens keep the original's exact (quirky) handling
        return [get(piece, 0) for piece in self.bpe(word).split(" ")]

    def __getstate__(self):
        """Pickled as its files plus the entries added since (special tokens): a spawned worker
        process rebuilds the same encoder instead of receiving spaCy's and Rust's objects."""
        added = {k: v for k, v in self.encoder.items() if v >= self.n_vocab}
        return {"paths": self.paths, "added": added}

    def __setstate__(self, state):
        self.__init__(*state["paths"])
        self.encoder.update(state["added"])

    # -- public API -------------------------------------------------------------------------------
    def encode(self, texts, verbose=True, workers=None):
        """One list of ids per text, in order.

        Inputs of at least PARALLEL_MIN_CHARS characters are spread over `workers` processes
        (default: `default_workers()`); the ids are the same as in one process. workers=1 never
        starts a process. Where workers are spawned (not Linux), call this under
        `if __name__ == "__main__":`, as multiprocessing requires.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text in a list")
        n_processes = self._processes_for(texts, workers)
        if n_processes > 1:
            return self._encode_in_workers(texts, n_processes, verbose)
        return self._encode_here(texts, verbose)

    def _encode_here(self, texts, verbose=False):
        """encode() in this process."""
        from spacy.attrs import ORTH

        ids_of = self._ids.__getitem__
        # Whole texts go to spaCy: its special cases can look across spaces ("'rset' 's':").
        docs = tqdm(spacy_docs(texts, self.nlp), total=len(texts), ncols=80, leave=False, disable=not verbose)
        return [list(chain.from_iterable(map(ids_of, doc.to_array(ORTH).tolist()))) for doc in docs]

    def _processes_for(self, texts, workers):
        """How many processes to encode `texts` with: 1 unless the input is large enough for the
        start-up of worker processes to pay off."""
        if workers is None:
            workers = default_workers()
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        if workers == 1 or len(texts) < 2:
            return 1
        n_chars = sum(len(t) for t in texts)
        return min(workers, len(texts)) if n_chars >= PARALLEL_MIN_CHARS[start_method()] else 1

    def _encode_in_workers(self, texts, n_processes, verbose):
        """encode() over `n_processes` worker processes; results are gathered in input order."""
        chunks = contiguous_chunks(texts, 4 * n_processes)
        out = []
        context = multiprocessing.get_context(start_method())
        # While the workers live, no garbage collection walks the objects they share with this
        # process: walking them would copy every memory page of the parent, in the workers and here.
        gc.freeze()
        try:
            with context.Pool(n_processes, initializer=_start_worker, initargs=(self,)) as pool, \
                    tqdm(total=len(texts), ncols=80, leave=False, disable=not verbose) as progress:
                for ids in pool.imap(_encode_in_worker, chunks):
                    out.extend(ids)
                    progress.update(len(ids))
        finally:
            gc.unfreeze()
        return out

    def decode(self, ids):
        """Readable text from ids (BPE pieces joined, "</w>" read as a word end)."""
        if len(self._decoder) != len(self.encoder):  # specials may have been added to `encoder`
            self._decoder = {v: k for k, v in self.encoder.items()}
        pieces = []
        for i in ids:
            i = int(i)
            if i not in self._decoder:
                raise ValueError(f"id {i} is not in the vocabulary (0 ... {len(self._decoder) - 1})")
            piece = self._decoder[i]
            pieces.append(piece if i < self.n_vocab else f" {piece}</w>")
        return "".join(pieces).replace("</w>", " ").replace(" \n ", "\n").strip()


def learn_bpe(texts, encoder_path, bpe_path, vocab_size=1000, min_frequency=2):
    """Learn a BPE vocabulary from `texts` with Hugging Face `tokenizers`, on the words of the
    original pipeline, and write it in the original two-file format (ids JSON + merges file).

    Id 0 is `<unk>`, as in OpenAI's vocabulary. Returns a TextEncoder over the new files.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    docs = pre_tokenize(texts, english_tokenizer())
    lowered = [" ".join(w.lower() for w in doc if not w.isspace()) for doc in docs]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # The trainer numbers the word-final symbols ("k</w>") as it meets them in a hash map's order, which
    # changes from run to run, and breaks ties between merges by those numbers: the same texts gave
    # other vocabularies. Declared up front, in sorted order, they are numbered the same every run.
    word_final = sorted({word[-1] + "</w>" for line in lowered for word in line.split()})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=["<unk>", *word_final], end_of_word_suffix="</w>",
                                  show_progress=False)
    tokenizer.train_from_iterator(lowered, trainer)
    state = json.loads(tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    for path in (encoder_path, bpe_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(encoder_path, "w", encoding="utf-8") as f:
        json.dump(state["vocab"], f, ensure_ascii=False)
    with open(bpe_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return TextEncoder(encoder_path, bpe_path)
