"""Kill train.py again and again (SIGKILL, at random moments and inside checkpoint writes), resume it
each time, and compare the result with an uninterrupted run, bit for bit:

    python bench/faults.py --kills 30 -- --demo          # the demo's files and settings
    python bench/faults.py --kills 5 -- --data_dir ... --model_path ... (any train.py flags)

After every kill the files left must load (checkpoint and best parameters verified against their
checksums, the log one JSON object a line) and no temporary file of a killed write may survive the
next start. At the end the resumed run's parameters, optimizer state, progress, generators, log
(times aside) and submission must equal the uninterrupted run's. Prints the counts; exit 1 on any
difference.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import config  # noqa: E402
from checkpoints import read_checkpoint  # noqa: E402
from utils import TEMPORARY  # noqa: E402


def output_flags(train_flags, folder):
    """train.py's flags with every output (and the demo's inputs) under `folder`."""
    if "--demo" in train_flags:
        return [*train_flags, "--demo_dir", folder]
    return [*train_flags, "--log_dir", os.path.join(folder, "log"), "--save_dir", os.path.join(folder, "save"),
            "--submission_dir", os.path.join(folder, "sub"), "--cache_dir", os.path.join(folder, "cache")]


def start(argv):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def temporaries(folder, pid=None):
    """atomic_write's temporary files under `folder` (of process `pid` only, if given)."""
    return [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names
            if TEMPORARY.match(n) and (pid is None or int(TEMPORARY.match(n)["pid"]) == pid)]


def check_files(cfg):
    """What a kill left must load: the checkpoint and best parameters (verified), the log's lines."""
    for path in (cfg.checkpoint_path, cfg.best_path):
        if os.path.exists(path):
            read_checkpoint(path)
    if os.path.exists(cfg.log_path):
        with open(cfg.log_path, encoding="utf-8") as f:
            for line in f:
                json.loads(line)


def final_state(cfg):
    ckpt = torch.load(cfg.checkpoint_path, map_location="cpu", weights_only=True)
    with open(cfg.log_path, encoding="utf-8") as f:
        log = [{k: v for k, v in json.loads(line).items() if k != "time"} for line in f]
    submissions = {}
    if os.path.isdir(cfg.submission_dir):
        for name in sorted(os.listdir(cfg.submission_dir)):
            with open(os.path.join(cfg.submission_dir, name)) as f:
                submissions[name] = f.read()
    return {k: v for k, v in ckpt.items() if k not in ("log", "sha256", "args")}, log[1:], submissions


def differences(a, b, where="checkpoint"):
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b) else [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [where]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}/{i}")]
    return [] if a == b else [where]


def kill_at_random(proc, cfg, rng, max_delay, in_write):
    """SIGKILL `proc` inside a write (`in_write`: as soon as a temporary file appears: three times in
    four one that replaces an existing checkpoint, else any) or after a random delay; (killed,
    whether a temporary file existed at the kill)."""
    deadline = time.time() + (600 if in_write else rng.uniform(0.2, max_delay))
    target = os.path.basename(cfg.checkpoint_path) if rng.random() < 0.75 else ""
    while time.time() < deadline and proc.poll() is None:
        writes = temporaries(cfg.run_dir, proc.pid)
        if in_write and any(os.path.basename(t).startswith(target) for t in writes) and \
                (not target or os.path.exists(cfg.checkpoint_path)):
            break
        time.sleep(0.002 if in_write else 0.02)
    writing = bool(temporaries(cfg.run_dir, proc.pid))
    if proc.poll() is not None:
        return False, False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True, writing


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=30, help="SIGKILLs before the run may finish")
    parser.add_argument("--in_writes", type=float, default=0.5, help="share of the kills aimed at checkpoint writes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default=None, help="where both runs go (default: a temporary folder)")
    parser.add_argument("train_flags", nargs="*", help="train.py's flags (after --)")
    args = parser.parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="faults_")
    whole_argv = output_flags(args.train_flags, os.path.join(work, "whole"))
    parts_argv = output_flags(args.train_flags, os.path.join(work, "parts"))
    whole, parts = config.parse(whole_argv), config.parse(parts_argv)

    t0 = time.time()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *whole_argv], capture_output=True,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if result.returncode != 0:
        sys.exit(f"the uninterrupted run failed:\n{result.stderr[-2000:]}")
    duration = time.time() - t0
    print(f"uninterrupted run: {duration:.1f} s")
    if "--demo" in args.train_flags:  # the demo's inputs, as the first run wrote them (not the subject here)
        for name in ("data", "model"):
            shutil.copytree(os.path.join(work, "whole", name), os.path.join(work, "parts", name))

    rng = random.Random(args.seed)
    counts = dict(kills=0, in_writes=0, resumes=0, fresh_starts=0)
    left_behind = set()  # temporary files of killed writes found at a start
    while True:
        resume = os.path.exists(parts.checkpoint_path)
        counts["resumes" if resume else "fresh_starts"] += 1
        left_behind.update(temporaries(os.path.dirname(parts.run_dir)))
        proc = start(parts_argv + (["--resume"] if resume else []))
        if counts["kills"] >= args.kills:
            _, err = proc.communicate()
            if proc.returncode != 0:
                sys.exit(f"the last resumed run failed (exit {proc.returncode}):\n{err[-2000:]}")
            break
        killed, writing = kill_at_random(proc, parts, rng, max_delay=min(10.0, duration),
                                         in_write=rng.random() < args.in_writes)
        if not killed:  # it finished first
            _, err = proc.communicate()
            if proc.returncode != 0:
                sys.exit(f"a resumed run failed (exit {proc.returncode}):\n{err[-2000:]}")
            print(f"the run finished after {counts['kills']} of {args.kills} kills")
            break
        counts["kills"] += 1
        counts["in_writes"] += writing
        check_files(parts)
    if temporaries(os.path.dirname(parts.run_dir)):
        sys.exit(f"temporary files survived a start: {temporaries(os.path.dirname(parts.run_dir))}")
    a, b = final_state(whole), final_state(parts)
    found = differences(a[0], b[0]) + (["log"] if a[1] != b[1] else []) + (["submission"] if a[2] != b[2] else [])
    print(f"{counts['kills']} SIGKILLs ({counts['in_writes']} inside a checkpoint or best-parameters write), "
          f"{counts['resumes']} resumes, {counts['fresh_starts']} fresh starts; temporary files of killed writes "
          f"found at a start: {len(left_behind)}, all removed; after every kill the files loaded "
          f"(checksums verified)")
    if found:
        print(f"DIFFERENT from the uninterrupted run: {found[:10]}")
        return 1
    print(f"identical to the uninterrupted run, bit for bit: parameters, optimizer state, progress, generators "
          f"({len(a[0]['model'])} tensors), log ({len(a[1])} points), submission ({', '.join(a[2]) or 'none'})")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
