"""The full-size data sets of `bench/benchmark.py --only data` (issue 21): MNLI, QQP and SNLI at their
real counts and lengths, and train.py's peak memory and start-up on them, with the encoding cache
cold and warm."""

import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# train.py's main, then the time it returned: after the first update and the stop's checkpoint, before
# the interpreter's own teardown (about 1-2 s for torch's modules, in any run)
TIMED_MAIN = """
import sys, time
root, args = sys.argv[1], sys.argv[2:]
sys.argv = ["train.py", *args]
sys.path.insert(0, root)
import train
code = train.main(args)
print(f"train.main returned at {time.time():.3f}", flush=True)
sys.exit(code)
"""

REAL_COUNTS = {"mnli": (392702, 9815, 9796), "qqp": (363846, 40430, 390965), "snli": (549367, 9842, 9824)}
# training, dev and test examples of the real data sets (MNLI: per matched and mismatched set)


def bench_data(base, names, device, rows, scale=1.0, before=None):
    """Issue 21: full-size data sets in little memory. Per task, a synthetic folder of the real counts
    and lengths (`write_synthetic(..., real_lengths=True)`: the real files and columns), then train.py's
    set-up and first update in a fresh process (a 32-wide one-layer model with random weights, the
    real vocabulary, --stop_after_updates 1), twice: with a cold encoding cache (it encodes, in worker
    processes, and fills the cache) and with it warm. Prints each process's peak RSS (the largest of
    it and its encoding workers), its seconds from its launch to the end of train.py's main after the
    first update (and to its exit), its CPU seconds and train.py's phase times; each figure is added
    to `rows` as a table row. `scale` < 1: that share of the real counts (a quick check). `before`:
    another checkout of the project (an earlier commit) run the same way on the same folder, with a
    cache of its own, after each of ours: its figures are the baseline rows ("ours is" = its / ours)."""
    from synthetic import write_synthetic
    from weights import write_openai_weights

    vocab = os.path.join(ROOT, "model")
    if not os.path.exists(os.path.join(vocab, "encoder_bpe_40000.json")):
        print("data: the vocabulary (model/encoder_bpe_40000.json) is absent, skipped")
        return
    write_openai_weights(os.path.join(base, "tiny"), n_vocab=40478, n_ctx=512, n_embd=32, n_layer=1, seed=0)
    for name in names:
        t0 = time.perf_counter()
        counts = [max(32, round(n * scale)) for n in REAL_COUNTS[name]]
        folder = write_synthetic(name, os.path.join(base, name), *counts, seed=0, real_lengths=True)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
        print(f"data {name}: wrote {folder} ({size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
        counts_note = "its real counts" if scale == 1 else f"{scale:g} of its real counts"
        note = f"({name.upper()} at {counts_note}, synthetic text; 32-wide 1-layer model; {device})"
        commands = {"ours": _command(ROOT, name, folder, base, vocab, device, f"run_{name}", "cache")}
        if before:
            commands[f"before ({os.path.basename(os.path.normpath(before))})"] = _command(
                before, name, folder, base, vocab, device, f"run_{name}_before", "cache_before")
        print("data: train.py", " ".join(commands["ours"][4:]))
        for cache in ("cold cache", "warm cache"):
            figures = {}
            for who, cmd in commands.items():
                log = os.path.join(base, f"run_{name}_{len(figures)}_{cache.split()[0]}.out")
                peak_gib, seconds, wall, cpu, lines = _measured_run(cmd, log)
                print(f"data {name}, {who}, {cache}: peak RSS {peak_gib:.2f} GiB, {seconds:.1f} s from launch to the "
                      f"first update done ({wall:.1f} s to the process's exit, {cpu:.1f} s of CPU)")
                for line in lines:
                    print("   ", line)
                figures[who] = {"GiB peak RSS": peak_gib, "s to first update": seconds}
            for who, values in figures.items():
                for unit, value in values.items():
                    ratio = None if who == "ours" else value / figures["ours"][unit]
                    rows.append(dict(section=f"data {name}, {unit}", variant=f"{who}, {cache}", unit=unit,
                                     median=value, low=float("nan"), high=float("nan"), note=note, ratio=ratio))


def _command(root, name, folder, base, vocab, device, out, cache):
    """The command that runs `root`'s train.py to its first update on `folder`, its outputs in base/out."""
    out = os.path.join(base, out)
    os.makedirs(out, exist_ok=True)
    return [sys.executable, "-c", TIMED_MAIN, root, "--dataset", name, "--data_dir", folder,
            "--model_path", os.path.join(base, "tiny"), "--encoder_path",
            os.path.join(vocab, "encoder_bpe_40000.json"), "--bpe_path", os.path.join(vocab, "vocab_40000.bpe"),
            "--n_embd", "32", "--n_head", "4", "--n_layer", "1", "--n_transfer", "1",
            "--stop_after_updates", "1", "--device", str(device), "--desc", "data",
            "--log_dir", os.path.join(out, "log"), "--save_dir", os.path.join(out, "save"),
            "--submission_dir", os.path.join(out, "sub"), "--cache_dir", os.path.join(base, cache)]


def _measured_run(cmd, log_path):
    """Run cmd to its end: (peak RSS in GiB, seconds to the end of train.main, to the exit, CPU
    seconds, its summary lines)."""
    launched, t0 = time.time(), time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    with open(log_path) as f:
        text = f.read().replace("\r", "\n")
    if proc.returncode not in (0, 130):  # 130: stopped after the first update, as asked
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    lines = [line for line in text.splitlines() if line.startswith(("time:", "MNLI", "QQP", "SNLI", "skipped",
                                                                      "dropped")) or "were cut" in line]
    returned = float(re.search(r"^train.main returned at ([\d.]+)$", text, re.M).group(1))
    return usage.ru_maxrss / 2**20, returned - launched, wall, usage.ru_utime + usage.ru_stime, lines
