"""Synthetic, learnable data sets in each task's real files, layout and quirks, for the demo, the
tests and the benchmarks (no download). A label-bearing word decides each label, so a tiny model
learns each task in a few epochs."""

import csv
import functools
import json
import os
import random
import uuid

import numpy as np

from datasets import ROC_HEADER, ROC_TEST, ROC_VAL, rocstories
from tasks import BINARY, ENTAILMENT, NLI, get_task
from text_utils import TextEncoder, learn_bpe
from weights import write_openai_weights


def write_demo_files(cfg):
    """The demo's inputs, each written once: a synthetic Story Cloze set in the real files, a BPE
    vocabulary learned from its stories, and random "pre-trained" weights in OpenAI's shard format at
    the demo's sizes (`cfg`: the demo's RunConfig)."""
    if not os.path.exists(os.path.join(cfg.data_dir, ROC_VAL)):
        write_synthetic_rocstories(cfg.data_dir, seed=cfg.seed)
    if not os.path.exists(cfg.encoder_path):
        train, _, _ = rocstories(cfg.data_dir, n_valid=cfg.n_valid)
        learn_bpe(list(train[0]) + list(train[1]) + list(train[2]), cfg.encoder_path, cfg.bpe_path,
                  vocab_size=400, min_frequency=2)
    if not os.path.exists(os.path.join(cfg.model_path, "params_shapes.json")):
        n_vocab = TextEncoder(cfg.encoder_path, cfg.bpe_path).n_vocab
        write_openai_weights(cfg.model_path, n_vocab=n_vocab, n_ctx=cfg.n_ctx, n_embd=cfg.model.n_embd,
                             n_layer=cfg.model.n_layer, seed=cfg.seed)

def demo_files(demo_dir):
    """(weights, vocabulary, merges, n_head) of the demo: its fine-tune, else its random pre-trained
    weights; the demo's vocabulary and weights are written first if absent (no training, no download)."""
    import config  # the demo's settings and folders are train.py's --demo presets

    demo = config.parse(["--demo", "--demo_dir", demo_dir])
    if not os.path.exists(demo.encoder_path) or not os.path.exists(demo.model_path):
        write_demo_files(demo)
    best = demo.best_path
    return (best if os.path.exists(best) else demo.model_path), demo.encoder_path, demo.bpe_path, demo.model.n_head


# ------------------------------------------------------------------------------------------------
# ROCStories: the Story Cloze files
# ------------------------------------------------------------------------------------------------

_STORY_NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack", "Kate", "Leo"]
_STORY_PLACES = ["market", "park", "library", "beach", "station", "school", "museum", "garden", "bakery", "harbor"]
_STORY_THINGS = ["a red kite", "an old book", "a new bike", "a small cake", "a blue hat", "a warm coat", "a puppy"]
_STORY_FILLERS = ["It was a cold morning in the middle of the week", "The streets were busy and loud that day",
            "Everyone in town seemed to be out and about", "The sun was shining over the quiet little town",
            "A light rain had fallen during the night before", "Nobody expected anything unusual to happen"]
_GOOD = (["happy", "glad", "proud", "excited", "thrilled"],
         ["{n} smiled and thanked everyone.", "{n} laughed and hugged a friend.", "{n} cheered with joy.",
          "{n} decided it was the best day ever.", "{n} danced all the way home."])
_BAD = (["sad", "upset", "angry", "lonely", "scared"],
        ["{n} cried quietly on the way home.", "{n} yelled and slammed the door.", "{n} sighed and gave up.",
         "{n} decided it was the worst day ever.", "{n} sulked alone for hours."])
_ODD = ["{n} flew to the moon on a silver spoon.", "{n} turned into a purple fish.",
        "{n} ate the whole station for lunch.", "{n} married a cloud in the sky.", "{n} grew wings and became a clock."]


def synthetic_story(rng):
    """One story. The right ending matches the mood stated in the last sentence; the wrong ending
    has the other mood (half the stories: telling needs the story) or is absurd (the other half,
    as real ROCStories' wrong endings are often implausible on their own)."""
    name = rng.choice(_STORY_NAMES)
    good = rng.random() < 0.5
    moods, endings = _GOOD if good else _BAD
    _, other_endings = _BAD if good else _GOOD
    place, thing = rng.choice(_STORY_PLACES), rng.choice(_STORY_THINGS)
    filler = rng.choice(_STORY_FILLERS)
    sentences = [f"{filler}, so {name} walked to the {place}.", f"There {name} saw {thing} for sale.",
                 f"{name} thought about it for a long time before deciding what to do.",
                 f"In the end {name} felt very {rng.choice(moods)}."]
    wrong = rng.choice(other_endings if rng.random() < 0.5 else _ODD)
    right, wrong = rng.choice(endings).format(n=name), wrong.format(n=name)
    label = 1 if rng.random() < 0.5 else 2
    ending1, ending2 = (right, wrong) if label == 1 else (wrong, right)
    return sentences, ending1, ending2, label


def write_synthetic_rocstories(data_dir, n_val=1871, n_test=1871, seed=0):
    """Write both ROCStories files (the real names and columns) with synthetic stories."""
    rng = random.Random(seed)
    os.makedirs(data_dir, exist_ok=True)
    for name, n in ((ROC_VAL, n_val), (ROC_TEST, n_test)):
        with open(os.path.join(data_dir, name), "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(ROC_HEADER)
            for _ in range(n):
                sentences, e1, e2, label = synthetic_story(rng)
                writer.writerow([str(uuid.UUID(int=rng.getrandbits(128))), *sentences, e1, e2, label])
    return data_dir


def story_arrays(n, n_vocab, n_ctx=77, seed=0, n_special=3):
    """X [n, 2, n_ctx, 2], M, Y of n encoded two-ending stories with ROCStories' length mix (stories of
    35-55 tokens, endings of 5-19) and random ids: batches of the real shape without a vocabulary."""
    rng = np.random.default_rng(seed)
    X = np.zeros((n, 2, n_ctx, 2), np.int64)
    M = np.zeros((n, 2, n_ctx), np.float32)
    start, delimiter, clf = n_vocab, n_vocab + 1, n_vocab + 2
    for i in range(n):
        story = list(rng.integers(0, n_vocab, rng.integers(35, 56)))
        for j in range(2):
            seq = [start] + story + [delimiter] + list(rng.integers(0, n_vocab, rng.integers(5, 20))) + [clf]
            X[i, j, :len(seq), 0] = seq
            M[i, j, :len(seq)] = 1
    X[..., 1] = np.arange(n_vocab + n_special, n_vocab + n_special + n_ctx)
    return X, M, rng.integers(0, 2, n)


# ------------------------------------------------------------------------------------------------
# The GLUE tasks, SNLI, SciTail and RACE
# ------------------------------------------------------------------------------------------------

_NAMES = ["anna", "ben", "carla", "david", "emma", "frank", "grace", "henry"]
_NOUNS = ["film", "story", "cast", "plot", "script", "ending", "music", "acting"]
_THINGS = ["bike", "book", "cake", "hat", "coat", "kite", "lamp", "chair"]
_PLACES = ["market", "park", "library", "beach", "station", "school", "museum", "garden"]
_FILLERS = ["all the way through", "from start to finish", "for most of its length", "in every scene"]
# Label-bearing words: each class of each task has its own.
_CUES = {
    "sst2": (["boring", "dull", "awful", "tedious"], ["wonderful", "charming", "brilliant", "moving"]),
    "cola": (["eated", "goed", "seed", "buyed"], ["ate", "went", "saw", "bought"]),
    "mrpc": (["denied", "doubted", "disputed"], ["stated", "reported", "confirmed"]),
    "qqp": (["cheapest", "fastest", "oldest"], ["best", "easiest", "simplest"]),
    "nli": (["definitely", "certainly", "surely"], ["perhaps", "maybe", "possibly"], ["never", "not", "nobody"]),
    "binary_nli": (["definitely", "certainly", "indeed"], ["unrelated", "unknown", "elsewhere"]),
    "stsb": (["unrelated", "barely", "somewhat", "fairly", "mostly", "exactly"]),
    "race": (["red", "blue", "green", "yellow"], ["broken", "stolen", "lost", "empty"]),
}


def _premise(rng):
    return f"{rng.choice(_NAMES)} walked to the {rng.choice(_PLACES)} to buy a {rng.choice(_THINGS)} ."


def _write_lines(path, rows, bom=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        f.writelines("\t".join(map(str, row)) + "\n" for row in rows)


def _labels(rng, n, n_class):
    return [rng.randrange(n_class) for _ in range(n)]


def _write_sst2(rng, folder, sizes):
    def sentence(label):
        return f"the {rng.choice(_NOUNS)} is {rng.choice(_CUES['sst2'][label])} {rng.choice(_FILLERS)} . "

    for part, n in sizes.items():
        if part == "test":
            rows = [["index", "sentence"]] + [[i, sentence(y)] for i, y in enumerate(_labels(rng, n, 2))]
        else:
            rows = [["sentence", "label"]] + [[sentence(y), y] for y in _labels(rng, n, 2)]
        _write_lines(os.path.join(folder, f"{part}.tsv"), rows)


def _write_cola(rng, folder, sizes):
    def sentence(label):
        return f"{rng.choice(_NAMES).title()} {rng.choice(_CUES['cola'][label])} the {rng.choice(_THINGS)} ."

    for part, n in sizes.items():
        if part == "test":  # the test file alone has a header
            rows = [["index", "sentence"]] + [[i, sentence(y)] for i, y in enumerate(_labels(rng, n, 2))]
        else:  # source, label, the original's mark ('*': unacceptable), sentence
            rows = [[f"gj0{rng.randrange(1, 5)}", y, "" if y else "*", sentence(y)] for y in _labels(rng, n, 2)]
        _write_lines(os.path.join(folder, f"{part}.tsv"), rows)


def _write_mrpc(rng, folder, sizes):
    def pair(label):
        name, thing = rng.choice(_NAMES).title(), rng.choice(_THINGS)
        return (f"{name} said the {thing} cost {rng.randrange(10, 99)} dollars .",
                f"The {thing} price was {rng.choice(_CUES['mrpc'][label])} by {name} .")

    for part, n in sizes.items():
        first = "index" if part == "test" else "Quality"
        rows = [[first, "#1 ID", "#2 ID", "#1 String", "#2 String"]]
        for i, y in enumerate(_labels(rng, n, 2)):
            rows.append([i if part == "test" else y, rng.randrange(10**6), rng.randrange(10**6), *pair(y)])
        _write_lines(os.path.join(folder, f"{part}.tsv"), rows, bom=part != "test")  # MRPC's byte-order mark


def _write_qqp(rng, folder, sizes, pad=None):
    def pair(label):
        thing = rng.choice(_THINGS)
        texts = f"How do I fix my {thing}?", f"What is the {rng.choice(_CUES['qqp'][label])} way to fix a {thing}?"
        return pad(texts) if pad else texts

    for part, n in sizes.items():
        if part == "test":
            rows = [["id", "question1", "question2"]] + [[i, *pair(y)] for i, y in enumerate(_labels(rng, n, 2))]
        else:
            rows = [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]]
            rows += [[i, 2 * i + 1, 2 * i + 2, *pair(y), y] for i, y in enumerate(_labels(rng, n, 2))]
            # QQP's malformed rows: a question holding a line break splits one row into two short ones
            broken = [n + 7, 1, 2, "Why is my"]
            rows[len(rows) // 2:len(rows) // 2] = [broken, ["kite blue?", "Is my kite blue?", "0"]]
        _write_lines(os.path.join(folder, f"{part}.tsv"), rows)


def _write_stsb(rng, folder, sizes):
    levels = _CUES["stsb"]

    def pair(score):
        name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        word = levels[min(int(round(score)), 5)]
        return f"A man named {name} is holding a {thing} .", f"The picture is {word} like that ."

    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
    for part, n in sizes.items():
        rows = [header + ([] if part == "test" else ["score"])]
        for i in range(n):
            score = min(5.0, max(0.0, rng.randrange(6) + rng.uniform(-0.4, 0.4)))
            meta = [i, "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", *pair(score)]
            rows.append(meta + ([] if part == "test" else [f"{score:.3f}"]))
        _write_lines(os.path.join(folder, f"{part}.tsv"), rows)


def _nli_pair(rng, label, cues, quote=False):
    """A premise and a hypothesis whose cue word decides the label; with quote, an unbalanced quote."""
    premise = _premise(rng)
    if quote:
        premise = '"' + premise[0].upper() + premise[1:]  # opened, never closed: as in MNLI and QQP
    name = premise.split()[0].strip('"').lower()
    return premise, f"{name} {rng.choice(cues[label])} went to the {rng.choice(_PLACES)} ."


def _parse(text):
    return "( " + " ".join(f"( {w} )" for w in text.split()) + " )"


def _write_mnli(rng, folder, sizes, pad=None):
    heads = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
             "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
    files = {"train": ("train.tsv", 1), "dev": ("dev_matched.tsv", 5), "dev_mm": ("dev_mismatched.tsv", 5),
             "test": ("test_matched.tsv", 0), "test_mm": ("test_mismatched.tsv", 0)}
    for part, (name, n_annotators) in files.items():
        n = sizes[part.split("_")[0]]
        label_cols = [f"label{k + 1}" for k in range(n_annotators)] + (["gold_label"] if n_annotators else [])
        rows = [heads + label_cols]
        genre = "letters" if part.endswith("_mm") else "fiction"
        for i, y in enumerate(_labels(rng, n, 3)):
            s1, s2 = _nli_pair(rng, y, _CUES["nli"], quote=i % 5 == 0)
            s1, s2 = pad((s1, s2)) if pad else (s1, s2)
            labels = [NLI[y]] * n_annotators + ([NLI[y]] if n_annotators else [])
            rows.append([i, rng.randrange(10**5), f"{rng.randrange(10**5)}e", genre, _parse(s1), _parse(s2),
                         _parse(s1), _parse(s2), s1, s2, *labels])
        _write_lines(os.path.join(folder, name), rows)
    # GLUE's diagnostic set (predicted into AX.tsv): index, sentence1, sentence2; as many pairs as a test set
    rows = [["index", "sentence1", "sentence2"]]
    for i, y in enumerate(_labels(rng, sizes["test"], 3)):
        rows.append([i, *_nli_pair(rng, y, _CUES["nli"], quote=i % 7 == 0)])
    _write_lines(os.path.join(folder, "diagnostic", "diagnostic.tsv"), rows)


def _pair_glue(columns, label_names, cues):
    def write(rng, folder, sizes):
        for part, n in sizes.items():
            rows = [["index", *columns] + ([] if part == "test" else ["label"])]
            for i, y in enumerate(_labels(rng, n, 2)):
                rows.append([i, *_nli_pair(rng, y, cues)] + ([] if part == "test" else [label_names[y]]))
            _write_lines(os.path.join(folder, f"{part}.tsv"), rows)
    return write


def _write_snli(rng, folder, sizes, pad=None):
    for part, n in sizes.items():
        lines = []
        labels = _labels(rng, n, 3)
        for i, y in enumerate(labels):
            s1, s2 = _nli_pair(rng, y, _CUES["nli"])
            s1, s2 = pad((s1, s2)) if pad else (s1, s2)
            if i % 10 == 0:  # a pair without a majority: gold_label '-', annotators split (dropped)
                lines.append(_snli_line(rng, s1, s2, "-", ["neutral", "entailment", "contradiction"]))
            lines.append(_snli_line(rng, s1, s2, NLI[y], [NLI[y]] * 5))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"snli_1.0_{part}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)


def _snli_line(rng, s1, s2, gold, annotators):
    return json.dumps({"annotator_labels": annotators, "captionID": f"{rng.randrange(10**6)}.jpg#0",
                       "gold_label": gold, "pairID": f"{rng.randrange(10**6)}.jpg#0r1n", "sentence1": s1,
                       "sentence1_binary_parse": _parse(s1), "sentence1_parse": _parse(s1), "sentence2": s2,
                       "sentence2_binary_parse": _parse(s2), "sentence2_parse": _parse(s2)})


def _write_scitail(rng, folder, sizes):
    names = ("entails", "neutral")
    for part, n in sizes.items():
        rows = [[*_nli_pair(rng, y, _CUES["binary_nli"]), names[y]] for y in _labels(rng, n, 2)]
        _write_lines(os.path.join(folder, "tsv_format", f"scitail_1.0_{part}.tsv"), rows)


def _write_race(rng, folder, sizes):
    right, wrong = _CUES["race"]
    for part, n in sizes.items():
        for level in ("middle", "high"):
            os.makedirs(os.path.join(folder, part, level), exist_ok=True)
        done, number = 0, 1
        while done < n:
            level = ("middle", "high")[number % 2]
            k = min(n - done, rng.randrange(1, 4))  # 1-3 questions per article
            doc = {"answers": [], "options": [], "questions": [], "article": "", "id": f"{level}{number}.txt"}
            facts = []
            for _ in range(k):
                name, thing, colour = rng.choice(_NAMES).title(), rng.choice(_THINGS), rng.choice(right)
                facts.append(f"{name} bought a {colour} {thing} at the {rng.choice(_PLACES)}.")
                options = [f"the {colour} {thing}"] + [f"the {w} {thing}" for w in rng.sample(wrong, 3)]
                rng.shuffle(options)
                doc["questions"].append(f"What did {name} buy?")
                doc["options"].append(options)
                doc["answers"].append("ABCD"[options.index(f"the {colour} {thing}")])
            doc["article"] = " ".join(facts) + "\nIt was a busy day in town."
            with open(os.path.join(folder, part, level, f"{number}.txt"), "w", encoding="utf-8") as f:
                json.dump(doc, f)
            done, number = done + k, number + 1


def _write_rocstories(rng, folder, sizes):
    """Both Story Cloze files; the labelled one holds train + dev stories (n_valid = dev to split)."""
    write_synthetic_rocstories(folder, n_val=sizes["train"] + sizes["dev"], n_test=sizes["test"],
                                        seed=rng.randrange(2 ** 31))


_WRITERS = {"rocstories": _write_rocstories,
            "sst2": _write_sst2, "cola": _write_cola, "mrpc": _write_mrpc, "qqp": _write_qqp, "stsb": _write_stsb,
            "mnli": _write_mnli,
            "qnli": _pair_glue(("question", "sentence"), ENTAILMENT, _CUES["binary_nli"]),
            "rte": _pair_glue(("sentence1", "sentence2"), ENTAILMENT, _CUES["binary_nli"]),
            "snli": _write_snli, "scitail": _write_scitail, "race": _write_race}


def write_synthetic_wnli(folder, n_train, n_dev, n_test, seed=0):
    """GLUE's WNLI folder under folder (train.tsv, dev.tsv, test.tsv in its layout; labels 0/1); return it.
    No task here trains on WNLI: its test file gives a GLUE submission's WNLI indices."""
    path = os.path.join(folder, "WNLI")
    write = _pair_glue(("sentence1", "sentence2"), BINARY, _CUES["binary_nli"])
    write(random.Random(seed), path, {"train": n_train, "dev": n_dev, "test": n_test})
    return path


# Words per text of the real data sets (their means), and the share of first texts that are long
# (200-600 words, so that n_ctx reaches 512 and a few are cut, as in MNLI): with real_lengths, the
# texts of these tasks get filler words up to such lengths.
REAL_LENGTHS = {"mnli": (20, 10, 0.001), "qqp": (11, 11, 0.001), "snli": (13, 7, 0.0005)}
_FILLER_WORDS = ("the of and to in that it was for on with as they at one have this from by but what some can out "
                 "other were all there when your how said each which their time will about many then would like so "
                 "these long make thing see look more day could come number people over know water than first who "
                 "down been now find work part place after back little only year every good under very through just "
                 "great think help before move right same tell does three want also small large even land must big "
                 "high such follow change light house picture again animal mother world near building earth father "
                 "country answer school study learn plant cover food between never thought city tree cross farm "
                 "start story far night real life open seem together children begin walk example paper group always "
                 "music those letter until river second book carry science friend idea mountain horse color enough "
                 "ready remember hundred interest morning simple several against pattern person money appear certain "
                 "machine figure develop ocean special produce nothing surface possible language unexpectedly "
                 "neighbourhood conversation government organisation extraordinary particularly responsibility "
                 "telephone restaurant disappointment accommodation").split()


def _real_lengths(rng, means, long_share):
    """A function that lengthens a text pair with filler words (before the final mark) to lengths drawn
    around the real data set's means, a few first texts to 200-600 words."""
    def pad(texts):
        out = []
        for k, (text, mean) in enumerate(zip(texts, means)):
            long = k == 0 and rng.random() < long_share
            words = rng.randint(200, 600) if long else round(rng.gammavariate(4, mean / 4))
            body, mark = (text[:-1].rstrip(), text[-1]) if text[-1] in ".?" else (text, "")
            filler = [rng.choice(_FILLER_WORDS) for _ in range(words - len(body.split()))]
            out.append(" ".join([body, *filler]) + (f" {mark}" if mark else ""))
        return tuple(out)
    return pad


def write_synthetic(task_name, folder, n_train, n_dev, n_test, seed=0, real_lengths=False):
    """Write a small synthetic data set for the task, in its real folder, file names, layout and
    quirks, under folder; return the task's folder (folder/SST-2, folder/snli_1.0 ...).

    A label-bearing word decides each label, so a tiny model learns it in a few epochs. Reading it
    gives n_train, n_dev and n_test examples per split (MNLI: n_dev per dev set, n_test per test set and in
    its diagnostic set): the quirky extra rows (QQP's malformed rows, SNLI's '-' pairs) are on top of
    those. real_lengths (MNLI, QQP, SNLI): texts as long as the real data set's (REAL_LENGTHS), for the
    benchmarks.
    """
    task = get_task(task_name)
    path = os.path.join(folder, task.folder)
    rng = random.Random(seed)
    write = _WRITERS[task.name]
    if real_lengths:
        if task.name not in REAL_LENGTHS:
            raise ValueError(f"real_lengths: only {', '.join(REAL_LENGTHS)} have them, not {task.name}")
        means = REAL_LENGTHS[task.name]
        write = functools.partial(write, pad=_real_lengths(random.Random(seed + 1), means[:2], means[2]))
    write(rng, path, {"train": n_train, "dev": n_dev, "test": n_test})
    return path
