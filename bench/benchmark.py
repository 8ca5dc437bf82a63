"""One command for every speed and memory figure of the README, each next to a baseline run in the
same process (alternating, several runs, median and min-max):

    python bench/benchmark.py            # full-size model, about 10 minutes on 2 CPU cores
    python bench/benchmark.py --quick    # small model, about a minute on 2 idle cores (65 s measured)
    python bench/benchmark.py --only encode,optimizer
    python bench/benchmark.py --only generate   # KV-cached generation vs re-running the prefix
    python bench/benchmark.py --only data --data_tasks mnli   # a full-size data set: peak memory and
                                                             # seconds to the first update, cold and warm cache
                                                             # (--data_before DIR: against another checkout)
    python bench/benchmark.py --device cuda --only train,run   # the GPU checks: per-update table
                                                               # (fp32, bf16) and a whole ROCStories run

Baselines: Hugging Face `transformers`' OpenAI GPT classes holding the same weights, and this
project's own code with its speed-ups turned off ("plain": no trimming, explicit attention, LM
logits everywhere). Batches follow ROCStories' length mix (stories 35-55 tokens, endings 5-19).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import config  # noqa: E402
from batches import EncodedSplit  # noqa: E402
from bench.corpus import FORTUNES, english_texts, fortune_texts  # noqa: E402
from bench.data_sets import bench_data  # noqa: E402
from engine import Runtime, Trainer, keep_freed_host_memory  # noqa: E402
from model_pytorch import DoubleHeadModel, GPTConfig, TransformerModel, load_openai_pretrained_model  # noqa: E402
from opt import OpenAIAdam  # noqa: E402
from synthetic import story_arrays, synthetic_story  # noqa: E402
from tasks import get_task  # noqa: E402
from weights import random_openai_arrays, write_hf_weights, write_openai_weights  # noqa: E402

N_SPECIAL = 3
SIZES = {  # name: (n_vocab, n_embd, n_head, n_layer)
    "full": (40478, 768, 12, 12),
    "quick": (2000, 128, 4, 2),
}
ROWS = []


# ------------------------------------------------------------------------------------------------
# Timing helpers
# ------------------------------------------------------------------------------------------------

def compare(name, unit, variants, repeats, work=1.0, note="", warmup=1, seconds_scale=1.0):
    """Time each variant `repeats` times, alternating; record work/second (or seconds x seconds_scale
    if work=None). A variant must return only once its work is done (synchronise on a GPU)."""
    times = {label: [] for label in variants}
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    for _ in range(repeats):
        for label, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    ours = next(iter(variants))
    for label, ts in times.items():
        values = [work / t for t in ts] if work else [t * seconds_scale for t in ts]
        ROWS.append(dict(section=name, variant=label, unit=unit, median=statistics.median(values),
                         low=min(values), high=max(values), note=note,
                         ratio=(statistics.median(times[label]) / statistics.median(times[ours])) if label != ours
                         else None))


def print_table():
    print(f"\n{'section':<22} {'variant':<34} {'median':>12} {'min-max':>23}  {'ours is':>9}  unit")
    for r in ROWS:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else ""
        spread = "" if r["low"] != r["low"] else f"{r['low']:.4g}-{r['high']:.4g}"  # NaN: one run
        print(f"{r['section']:<22} {r['variant']:<34} {r['median']:>12.4g} {spread:>23}  {ratio:>9}  {r['unit']} "
              f"{r['note']}")
    print("('ours is': how many times faster our variant is than that baseline; higher is better)")


def markdown_table(rows):
    """The rows as the README's results table."""
    lines = ["| measure | variant | median | min-max | unit | ours is |", "| --- | --- | ---: | ---: | --- | ---: |"]
    for r in rows:
        ratio = f"**{r['ratio']:.2f}x**" if r["ratio"] else ""
        spread = "" if r["low"] != r["low"] else f"{r['low']:.4g}-{r['high']:.4g}"  # NaN: one run
        lines.append(f"| {r['section']} | {r['variant']} | {r['median']:.4g} | {spread} | {r['unit']} | {ratio} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Realistic ROCStories-shaped batches
# ------------------------------------------------------------------------------------------------

def trainer_for(model, size, device, *flags):
    """train.py's engine for `model` (ROCStories: one update of n_batch x n_gpu stories), with train.py's
    flags: the paper's optimizer settings unless `flags` say otherwise."""
    n_vocab, n_embd, n_head, n_layer = size
    cfg = config.parse(["--n_embd", str(n_embd), "--n_head", str(n_head), "--n_layer", str(n_layer),
                        "--n_transfer", str(n_layer), *flags])
    optimizer = cfg.optim.build(model.parameters(), t_total=10 ** 6)
    return Trainer(model, get_task("rocstories"), optimizer, cfg, Runtime(device), n_vocab + 2)


def hf_inputs(X, M, Y):
    ids = torch.from_numpy(X[..., 0])
    lengths = torch.from_numpy(M.sum(-1).astype(np.int64))
    labels = ids.clone()
    labels[torch.from_numpy(M) == 0] = -100
    return dict(input_ids=ids, mc_token_ids=lengths - 1, labels=labels, mc_labels=torch.from_numpy(Y))


def build_models(size, weights_dir):
    """Ours (fast), ours (plain) and transformers' DoubleHeads model, all with the same weights."""
    import transformers

    n_vocab, n_embd, n_head, n_layer = size
    models = {}
    for plain in (False, True):
        cfg = GPTConfig(n_embd=n_embd, n_head=n_head, n_layer=n_layer, fused_attention=not plain)
        torch.manual_seed(0)
        model = DoubleHeadModel(cfg, n_vocab + 2, "multiple_choice", vocab=n_vocab + N_SPECIAL + 77, n_ctx=77)
        load_openai_pretrained_model(model, n_ctx=77, n_special=N_SPECIAL, n_transfer=n_layer, n_embd=n_embd,
                                     path=os.path.join(weights_dir, "openai"))
        models["plain" if plain else "ours"] = model
    hf = transformers.OpenAIGPTDoubleHeadsModel.from_pretrained(os.path.join(weights_dir, "hf"))
    hf.resize_token_embeddings(n_vocab + N_SPECIAL)
    with torch.no_grad():  # the same special rows as ours
        hf.transformer.tokens_embed.weight[n_vocab:] = models["ours"].transformer.embed.weight[n_vocab:n_vocab + 3]
    models["hf"] = hf
    return models


def write_weights(size, directory):
    n_vocab, n_embd, n_head, n_layer = size
    arrays = random_openai_arrays(n_vocab=n_vocab, n_ctx=512, n_embd=n_embd, n_layer=n_layer, seed=0)
    write_openai_weights(os.path.join(directory, "openai"), arrays)
    write_hf_weights(os.path.join(directory, "hf"), arrays, n_head)
    return arrays


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------

def bench_forward(size, weights_dir, repeats):
    """Issue 2: forward at the ROCStories shape (8 stories x 2 choices x 77 tokens, all rows full)."""
    import transformers

    n_vocab, n_embd, n_head, n_layer = size
    ours = TransformerModel(GPTConfig(n_embd=n_embd, n_head=n_head, n_layer=n_layer),
                            vocab=n_vocab + N_SPECIAL + 77, n_ctx=77).eval()
    load_openai_pretrained_model(ours, n_ctx=77, n_special=N_SPECIAL, n_transfer=n_layer, n_embd=n_embd,
                                 path=os.path.join(weights_dir, "openai"))
    hf = transformers.OpenAIGPTModel.from_pretrained(os.path.join(weights_dir, "hf")).eval()
    X = torch.randint(0, n_vocab, (8, 2, 77, 2))
    X[..., 1] = n_vocab + N_SPECIAL + torch.arange(77)
    ids = X[..., 0].reshape(16, 77)
    with torch.no_grad():
        err = (ours(X) - hf(input_ids=ids).last_hidden_state).abs().max().item()
        variants = {"ours": lambda: ours(X), "transformers OpenAIGPTModel": lambda: hf(input_ids=ids)}
        compare("forward 8x2x77", "s", variants, repeats, work=None, note=f"(max |diff| of hidden states {err:.1e})")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device, amp):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else torch.autocast(device.type, enabled=False)


def bench_train_and_eval(models, size, repeats, device, amps, n_eval, parts=("update", "eval")):
    """Issue 9: one update of 32 stories (the paper's batch) and the evaluation of n_eval stories.

    ours: train.py's default (one pass per update); ours, plain: 4 towers of 8 with the speed-ups off
    (the TF code's layout); transformers: DoubleHeads + fused AdamW + foreach clipping, also in one
    pass (its strongest setting). Also the measure of the earlier README (issue 6): a step of 8
    stories with an optimizer step each, transformers with torch.optim.AdamW's and clipping's
    defaults. Evaluation: both in batches of train.py's default for the device (128 on a GPU, 16 on
    a CPU). Host-side batch preparation is inside the timed part for ours, as in train.py."""
    n_vocab = size[0]
    X, M, Y = story_arrays(32, n_vocab, seed=1)
    tokens = float(M.sum())
    for model in models.values():
        model.to(device)
    hf = models["hf"]
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=6.25e-5, weight_decay=0.01, fused=True)
    plain_flags = ("--plain", "--micro_batch", "8")  # the TF code's layout: 4 towers of 8, speed-ups off
    trainers = {}

    def trainer(name, amp=None, stories=32):
        """One engine per variant, made when first used (each has its own optimizer state)."""
        if (name, amp, stories) not in trainers:
            flags = [*(plain_flags if name == "plain" else ()), *(("--amp", amp) if amp else ()),
                     *(("--n_batch", "8", "--n_gpu", "1") if stories == 8 else ())]
            trainers[name, amp, stories] = trainer_for(models[name], size, device, *flags)
        return trainers[name, amp, stories]

    eval_batch = trainer("ours").eval_batch  # train.py's default for the device
    split = EncodedSplit.from_padded(X, M, Y)
    a, b = trainer("ours").outputs(split), trainer("plain").outputs(split)
    print(f"eval logits before training, ours vs plain: max |diff| {np.abs(a - b).max():.1e}")

    def ours_step(name, amp, stories=32):
        engine = trainer(name, amp, stories)

        def step():
            engine.update(X[:stories], M[:stories], Y[:stories])
            synchronize(device)
        return step

    def hf_step(amp, stories=32, opt=hf_opt, foreach_clip=True):
        batch = {k: v[:stories].to(device) for k, v in hf_inputs(X, M, Y).items()}

        def step():
            hf.train()
            with autocast(device, amp):
                out = hf(**batch)
                loss = out.mc_loss + 0.5 * out.loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0, foreach=foreach_clip or None)
            opt.step()
            opt.zero_grad(set_to_none=True)
            synchronize(device)
        return step

    for amp in amps if "update" in parts else ():
        kind = "bf16" if amp else "fp32"
        variants = {"ours (one pass)": ours_step("ours", amp),
                    "transformers DoubleHeads + fused AdamW (one pass)": hf_step(amp),
                    "ours, plain (4 towers of 8)": ours_step("plain", amp)}
        if amp:
            variants["ours in fp32 (the default)"] = ours_step("ours", None)
        compare(f"update of 32, {kind}", "ms", variants, repeats, work=None, seconds_scale=1000, warmup=2,
                note=f"({int(tokens)} real of {32 * 2 * 77} tokens; {device.type})")
    if "update" in parts and None in amps:
        default_adamw = torch.optim.AdamW(hf.parameters(), lr=6.25e-5, weight_decay=0.01)
        compare("step of 8 + optimizer", "ms",
                {"ours": ours_step("ours", None, stories=8),
                 "transformers + AdamW, clipping (defaults)": hf_step(None, 8, default_adamw, foreach_clip=False)},
                repeats, work=None, seconds_scale=1000, warmup=2,
                note=f"(the earlier README's measure; fp32; {device.type})")

    EX, EM, EY = story_arrays(n_eval, n_vocab, seed=2)
    eval_split = EncodedSplit.from_padded(EX, EM, EY)
    eval_tokens = float(EM.sum())
    hf_ids = torch.from_numpy(EX[..., 0]).to(device)
    hf_last = torch.from_numpy(EM.sum(-1).astype(np.int64) - 1).to(device)

    def ours_eval(amp):
        return lambda: trainer("ours", amp).outputs(eval_split)

    def hf_eval(amp):
        def run():
            hf.eval()
            with torch.no_grad(), autocast(device, amp):
                outs = [hf(input_ids=hf_ids[k:k + eval_batch], mc_token_ids=hf_last[k:k + eval_batch]).mc_logits
                        for k in range(0, n_eval, eval_batch)]
            torch.cat(outs).float().cpu()
        return run

    for amp in amps if "eval" in parts else ():
        kind = "bf16" if amp else "fp32"
        compare(f"evaluate {n_eval}, {kind}", "real tokens/s",
                {"ours": ours_eval(amp), "transformers DoubleHeads": hf_eval(amp)}, repeats, work=eval_tokens,
                note=f"(batches of {eval_batch}; {device.type})")
    for model in models.values():
        model.to("cpu")


def bench_passes(models, size, repeats, kept_host_memory):
    """One pass of 32 stories against 4 passes of 8 (ours, fp32, CPU), alternating. Run it once as
    is and once with --glibc_malloc to see what keeping freed host memory changes."""
    device = torch.device("cpu")
    X, M, Y = story_arrays(32, size[0], seed=1)
    one, four = (trainer_for(models["ours"], size, device, *flags) for flags in ((), ("--micro_batch", "8")))

    def update(trainer):
        return lambda: trainer.update(X, M, Y)

    kept = "kept" if kept_host_memory else "glibc's default"
    variants = {"ours, one pass of 32": update(one), "ours, 4 passes of 8": update(four)}
    compare(f"update of 32, malloc {kept}", "ms", variants, repeats, work=None, seconds_scale=1000, note="(fp32; cpu)")
    for label, step in variants.items():  # after the timed ones: the heap has grown to its size by now
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        print(f"{label}, malloc {kept}: {resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before} page faults "
              "in one more update")


def bench_updates(models, size, n_updates):
    """Issue 5: n_updates full updates of 32 stories, ours (one pass) vs the plain loop (4 towers of
    8), alternating update by update."""
    n_vocab, device = size[0], torch.device("cpu")
    runs = {"ours": (trainer_for(models["ours"], size, device), []),
            "ours, plain": (trainer_for(models["plain"], size, device, "--plain", "--micro_batch", "8"), [])}
    for i in range(n_updates):
        X, M, Y = story_arrays(32, n_vocab, seed=100 + i)
        for trainer, times in runs.values():
            t0 = time.perf_counter()
            trainer.update(X, M, Y)
            times.append(time.perf_counter() - t0)
    ours_total = sum(runs["ours"][1])
    for name, (_, times) in runs.items():
        ROWS.append(dict(section=f"{n_updates} updates x 32 stories", variant=name, unit="s total", median=sum(times),
                         low=float("nan"), high=float("nan"), note="(alternating update by update)",
                         ratio=sum(times) / ours_total if name != "ours" else None))


def bench_run(weights_dir, device, extra):
    """Issue 9: the whole ROCStories-shaped fine-tune (1,497 train / 374 valid / 1,871 test synthetic
    stories, full-size random weights, the real vocabulary), as `train.py` runs it; prints its phase
    times. `extra`: more train.py flags (e.g. --amp bf16)."""
    from synthetic import write_synthetic_rocstories

    vocab = next((d for d in (os.path.join(ROOT, "model"), os.path.join(os.path.dirname(ROOT), "shared", "openai-gpt"))
                  if os.path.exists(os.path.join(d, "encoder_bpe_40000.json"))), None)
    if vocab is None:
        print("run: the vocabulary (model/encoder_bpe_40000.json) is absent, skipped")
        return
    base = os.path.join(weights_dir, "run")
    data = write_synthetic_rocstories(os.path.join(base, "data"), n_val=1871, n_test=1871, seed=0)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "rocstories", "--desc", "bench", "--submit",
           "--analysis", "--data_dir", data, "--model_path", os.path.join(weights_dir, "openai"),
           "--encoder_path", os.path.join(vocab, "encoder_bpe_40000.json"),
           "--bpe_path", os.path.join(vocab, "vocab_40000.bpe"), "--log_dir", os.path.join(base, "log"),
           "--save_dir", os.path.join(base, "save"), "--submission_dir", os.path.join(base, "sub"),
           "--device", str(device), *extra]
    print("run:", " ".join(cmd[1:]))
    for attempt in ("first run (encodes, fills the cache)", "second run (encoding cached)"):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if out.returncode:
            print(out.stderr[-3000:])
            return
        lines = [line for line in out.stdout.splitlines() if line.startswith(("time:", "done in", "--compile", "ROC"))]
        print(f"{attempt}: process wall {wall:.1f} s")
        for line in lines:
            print("   ", line)


def bench_optimizer(size, repeats):
    """Issue 4: one optimizer step over every parameter of the model, against torch's AdamW."""
    n_vocab, n_embd, n_head, n_layer = size
    model = DoubleHeadModel(GPTConfig(n_embd=n_embd, n_head=n_head, n_layer=n_layer), n_vocab + 2,
                            "multiple_choice", vocab=n_vocab + N_SPECIAL + 77, n_ctx=77)
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    ours = OpenAIAdam(params, lr=6.25e-5, schedule="warmup_linear", warmup=0.002, t_total=10 ** 6, l2=0.01,
                      max_grad_norm=1)
    adamw = torch.optim.AdamW(params, lr=6.25e-5, weight_decay=0.01, foreach=True)

    def adamw_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        adamw.step()

    n = sum(p.numel() for p in params)
    compare("optimizer step", "s", {"ours (OpenAIAdam)": ours.step, "torch AdamW (foreach) + clip": adamw_step},
            repeats, work=None, note=f"({n / 1e6:.1f}M parameters)")


def bench_encode(repeats, n_stories):
    """Issues 3, 6 and 12: encoding throughput on each corpus, a fresh encoder (cold caches) each
    run, built outside the timed part, with OpenAI's vocabulary shipped in model/."""
    enc_path = os.path.join(ROOT, "model", "encoder_bpe_40000.json")
    bpe_path = os.path.join(ROOT, "model", "vocab_40000.bpe")
    rng = __import__("random").Random(0)
    stories = [synthetic_story(rng) for _ in range(n_stories)]
    corpora = {"docs": english_texts(),
               "docs+stories": english_texts() + [t for s, e1, e2, _ in stories for t in (" ".join(s), e1, e2)]}
    fortunes = fortune_texts()
    if fortunes:
        corpora["fortunes"] = fortunes
    else:
        print(f"encode fortunes: {FORTUNES} is absent (apt-get install fortunes), skipped")
    for name, texts in corpora.items():
        bench_encode_corpus(f"encode {name}", texts, repeats, enc_path, bpe_path)


def bench_encode_corpus(section, texts, repeats, enc_path, bpe_path):
    import transformers

    from text_utils import PARALLEL_MIN_CHARS, TextEncoder, default_workers, start_method

    ours_pool = [TextEncoder(enc_path, bpe_path) for _ in range(2 * repeats + 2)]
    ref_pool = [transformers.OpenAIGPTTokenizer(enc_path, bpe_path) for _ in range(repeats + 1)]
    ids = {}

    def ours(workers=None):
        ids[workers] = ours_pool.pop().encode(texts, verbose=False, workers=workers)

    def reference():
        tok = ref_pool.pop()
        ids["reference"] = [tok.convert_tokens_to_ids(tok._tokenize(t)) for t in texts]

    compare(section, "texts/s", {"ours": ours, "transformers 4.57 slow tokenizer": reference,
                                 "ours, 1 process": lambda: ours(workers=1)}, repeats, work=len(texts))
    if ids[None] != ids[1]:
        raise AssertionError(f"{section}: the ids of {default_workers()} workers differ from those of 1 process")
    # The reference pads backslashes, the TF code does not (docs/reference.md §4): compare the rest.
    same = [a == b for t, a, b in zip(texts, ids[None], ids["reference"]) if "\\" not in t]
    n_tokens, n_chars = sum(len(x) for x in ids[None]), sum(len(t) for t in texts)
    threshold = PARALLEL_MIN_CHARS[start_method()]
    processes = f"1 process (< {threshold})"
    if n_chars >= threshold:
        processes = f"workers by load: {default_workers()} at the end"
    note = (f"({len(texts)} texts, {n_chars} characters: {processes}; {n_tokens} tokens; ids equal to 1 process; "
            f"equal to the reference on {sum(same)} of {len(same)} texts without a backslash)")
    for r in [r for r in ROWS if r["section"] == section]:
        r["note"] = note
        scale = n_tokens / len(texts)
        ROWS.append(dict(r, section=f"{section} (tokens)", unit="tokens/s", median=r["median"] * scale,
                         low=r["low"] * scale, high=r["high"] * scale, note=""))


LOAD_WORKER = r"""
import json, sys, time, os
sys.path.insert(0, sys.argv[3])
import numpy as np, torch, json as _json
mode, path = sys.argv[1], sys.argv[2]
def status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024
from model_pytorch import TransformerModel, GPTConfig, load_openai_pretrained_model
base = status_mb("VmRSS:")
t0 = time.perf_counter()
if mode == "read":
    arrays = [np.load(os.path.join(path, f"params_{i}.npy")) for i in range(10)]
elif mode == "ours":
    model = TransformerModel(GPTConfig(), vocab=40478 + 512, n_ctx=512)
    t0 = time.perf_counter()
    load_openai_pretrained_model(model, path=path)
elif mode == "original":
    model = TransformerModel(GPTConfig(), vocab=40478 + 512, n_ctx=512)
    t0 = time.perf_counter()
    shapes = _json.load(open(os.path.join(path, "params_shapes.json")))
    offsets = np.cumsum([np.prod(s) for s in shapes])
    params = [np.load(os.path.join(path, f"params_{i}.npy")) for i in range(10)]
    params = np.split(np.concatenate(params, 0), offsets)[:-1]
    params = [p.reshape(s) for p, s in zip(params, shapes)]
    params[0] = np.concatenate([params[1], params[0]], 0)
    del params[1]
    targets = [model.embed.weight] + [p for b in model.h for p in b.parameters()]
    with torch.no_grad():
        for t, p in zip(targets, params):
            t.copy_(torch.from_numpy(p.reshape(t.shape)))
elapsed = time.perf_counter() - t0
peak = status_mb("VmHWM:")  # this process's high-water mark (ru_maxrss would include the parent's)
print(json.dumps(dict(seconds=elapsed, peak_mb=peak - base)))
"""


def bench_load(weights_dir, repeats):
    """Issue 6: loading the full-size shards: time and peak memory, in fresh processes."""
    path = os.path.join(weights_dir, "openai")
    weights_mb = sum(os.path.getsize(os.path.join(path, f"params_{i}.npy")) for i in range(10)) / 2 ** 20
    results = {m: [] for m in ("ours", "read", "original")}
    for _ in range(repeats + 1):
        for mode in results:
            out = subprocess.run([sys.executable, "-c", LOAD_WORKER, mode, path, ROOT], capture_output=True,
                                 text=True, check=True)
            results[mode].append(json.loads(out.stdout))
    labels = {"ours": "ours", "read": "np.load of the 10 files", "original": "original (concatenate + split)"}
    ours_t = statistics.median(r["seconds"] for r in results["ours"][1:])
    for mode, runs in results.items():
        runs = runs[1:]  # the first round warms the page cache
        secs = [r["seconds"] for r in runs]
        peaks = [r["peak_mb"] / weights_mb for r in runs]
        ROWS.append(dict(section="load weights (time)", variant=labels[mode], unit="s", median=statistics.median(secs),
                         low=min(secs), high=max(secs), note="", ratio=statistics.median(secs) / ours_t
                         if mode != "ours" else None))
        ROWS.append(dict(section="load weights (memory)", variant=labels[mode], unit="x weights' size",
                         median=statistics.median(peaks), low=min(peaks), high=max(peaks),
                         note=f"(peak RSS growth; weights {weights_mb:.0f} MB; model built inside for ours and "
                              "original)", ratio=None))



def bench_generate(size, weights_dir, rounds, n_new=256, prompt_len=32):
    """Issue 11: new tokens/s generating n_new tokens (greedy) after one prompt of prompt_len tokens,
    with the key/value cache vs re-running the whole prefix for every token, alternating."""
    from checkpoints import model_from_pretrained
    from generate import generate

    n_vocab, _, n_head, _ = size
    model = model_from_pretrained(os.path.join(weights_dir, "openai"), n_head=n_head)[0].eval()
    prompt = [np.random.default_rng(0).integers(0, n_vocab, prompt_len).tolist()]
    variants = {"ours (KV cache)": True, "re-running the prefix": False}
    for use_cache in variants.values():  # warm-up
        generate(model, prompt, n_vocab, max_new_tokens=8, greedy=True, use_cache=use_cache)
    times, tokens = {label: [] for label in variants}, {}
    for _ in range(rounds):
        for label, use_cache in variants.items():
            t0 = time.perf_counter()
            tokens[label] = generate(model, prompt, n_vocab, max_new_tokens=n_new, greedy=True,
                                     use_cache=use_cache).tokens
            times[label].append(time.perf_counter() - t0)
    same = len(set(map(str, tokens.values()))) == 1
    ours = statistics.median(times["ours (KV cache)"])
    for label, ts in times.items():
        rates = [n_new / t for t in ts]
        ROWS.append(dict(section=f"generate {n_new} tokens", variant=label, unit="new tokens/s",
                         median=statistics.median(rates), low=min(rates), high=max(rates),
                         note=f"(prompt {prompt_len} tokens, batch 1, greedy; same tokens: {same})",
                         ratio=statistics.median(ts) / ours if label != "ours (KV cache)" else None))

# ------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, about a minute on 2 idle cores")
    parser.add_argument("--only", default="forward,train,optimizer,encode,load",
                        help="comma-separated sections: forward,train (updates and evaluation),eval (evaluation "
                        "alone),updates,passes,optimizer,encode,load,run,generate,data (full-size data sets: memory "
                        "and start-up; CPU heavy: minutes per task)")
    parser.add_argument("--device", default="cpu", help="device of the train and run sections (cuda: the GPU checks)")
    parser.add_argument("--n_eval", type=int, default=None, help="stories evaluated in the train section "
                        "(default: 1871 on a GPU, 64 on a CPU)")
    parser.add_argument("--amps", default=None, help="precisions of the train and eval sections, e.g. fp32,bf16 "
                        "(default: fp32,bf16 on a GPU, fp32 on a CPU; bf16 on a CPU pays off where it has "
                        "AVX512-BF16 or AMX)")
    parser.add_argument("--glibc_malloc", action="store_true",
                        help="leave glibc's malloc as it is (train.py has it keep freed memory on a CPU)")
    parser.add_argument("--data_tasks", default="mnli,qqp,snli", help="tasks of the 'data' section (mnli,qqp,snli)")
    parser.add_argument("--data_scale", type=float, default=1.0, help="the 'data' section's share of the real counts")
    parser.add_argument("--data_before", default=None, metavar="DIR",
                        help="the 'data' section's baseline: another checkout of the project (an earlier commit), "
                             "run the same way on the same folders")
    parser.add_argument("--run_args", default="", help="extra train.py flags for the run section, e.g. '--amp bf16'")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--updates", type=int, default=10, help="updates in the 'updates' section")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--markdown", nargs="*", metavar="JSON",
                        help="print the rows of earlier --json files as a Markdown table, and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        rows = [row for path in args.markdown for row in json.load(open(path))]
        print(markdown_table(rows))
        return
    size = SIZES["quick" if args.quick else "full"]
    repeats = args.repeats or (3 if args.quick else 5)
    sections = set(args.only.split(","))
    gpu = f", {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if args.device.startswith("cuda") else ""
    # as train.py does on a CPU; both ours and transformers run in this process, so both gain
    kept = not args.device.startswith("cuda") and not args.glibc_malloc and keep_freed_host_memory()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores{gpu}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}; "
          f"model {'quick' if args.quick else 'full'} {size}; freed host memory kept for reuse: {kept}")
    with tempfile.TemporaryDirectory() as tmp:
        if sections - {"optimizer", "encode", "data"}:  # the sections that load the random weights
            write_weights(size, tmp)
        if "forward" in sections:
            bench_forward(size, tmp, repeats)
        if sections & {"train", "eval", "updates", "passes"}:
            models = build_models(size, tmp)
            if sections & {"train", "eval"}:
                device = torch.device(args.device)
                amps = args.amps.split(",") if args.amps else (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
                amps = [None if amp == "fp32" else amp for amp in amps]
                parts = ("update", "eval") if "train" in sections else ("eval",)
                bench_train_and_eval(models, size, repeats, device, amps,
                                     args.n_eval or (1871 if device.type == "cuda" else 64), parts)
            if "updates" in sections:
                bench_updates(models, size, args.updates)
            if "passes" in sections:
                bench_passes(models, size, repeats, kept)
            del models
        if "optimizer" in sections:
            bench_optimizer(size, repeats)
        if "encode" in sections:
            bench_encode(repeats, 300 if args.quick else 2500)
        if "load" in sections:
            if args.quick:
                print("load: measured at full size only (skipped with --quick)")
            else:
                bench_load(tmp, repeats)
        if "generate" in sections:
            bench_generate(size, tmp, args.repeats or 3)
        if "data" in sections:
            bench_data(tmp, args.data_tasks.split(","), args.device, ROWS, args.data_scale, args.data_before)
        if "run" in sections:
            bench_run(tmp, args.device, args.run_args.split())
    print_table()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ROWS, f, indent=1)


if __name__ == "__main__":
    main()
