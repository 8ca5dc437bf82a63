"""run_folder: one run per folder (a second is refused naming the first's process id; a killed run's
lock is no obstacle), and the temporary files of killed writes removed at start."""

import os
import signal
import subprocess
import sys

import pytest

import config
from conftest import ROOT
from run_folder import RunFolderError, claimed, remove_dead_temporaries


def settings(tmp_path, desc="run", **io):
    folders = dict(log_dir=str(tmp_path / "log"), save_dir=str(tmp_path / "save"),
                   submission_dir=str(tmp_path / "sub"))
    return config.parse(["--desc", desc, *[f"--{k}={v}" for k, v in dict(folders, **io).items()]])


def test_a_second_run_on_the_same_folder_or_log_is_refused_naming_the_first(tmp_path):
    cfg = settings(tmp_path)
    with claimed(cfg):
        with pytest.raises(RunFolderError, match=rf"^{tmp_path / 'save' / 'run'} is in use by another run \(process "
                                                 rf"{os.getpid()}\); wait for it to end, or give this run another"):
            with claimed(cfg):
                pass
        elsewhere = settings(tmp_path, save_dir=str(tmp_path / "other"))  # the same log
        with pytest.raises(RunFolderError, match=rf"^{tmp_path / 'log' / 'run.jsonl'} is in use by another run"):
            with claimed(elsewhere):
                pass
        with claimed(settings(tmp_path, desc="another")):  # another run's folder and log
            pass
    with pytest.raises(KeyError), claimed(cfg):
        raise KeyError("an error inside the run")
    with claimed(cfg):  # released on leaving, by an exception too
        pass


HOLD = """
import sys, time
sys.path.insert(0, {root!r})
import config
from run_folder import claimed
cfg = config.parse(sys.argv[1:])
with claimed(cfg):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_lock_of_a_killed_run_is_no_obstacle(tmp_path):
    cfg = settings(tmp_path)
    argv = ["--desc", "run", "--log_dir", cfg.log_dir, "--save_dir", cfg.save_dir]
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT)), *argv], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunFolderError, match=rf"in use by another run \(process {holder.pid}\)"):
            with claimed(cfg):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with claimed(cfg):  # the dead process's lock went with it
        pass


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_of_dead_processes_are_removed_and_others_kept(tmp_path):
    dead = dead_pid()
    names = {f"checkpoint.pt.tmp{dead}.140213": True, f"best_params.safetensors.tmp{dead}.7": True,
             f"checkpoint.pt.tmp{os.getpid()}.1": False, "checkpoint.pt.tmp1.1": False,  # living processes
             "checkpoint.pt": False, f"notes.tmp{dead}": False}  # not a temporary's name
    for name in names:
        (tmp_path / name).write_bytes(b"x" * 10)
    removed = remove_dead_temporaries([str(tmp_path), str(tmp_path / "missing")])
    assert sorted(removed) == sorted(str(tmp_path / n) for n, dead in names.items() if dead)
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, dead in names.items() if not dead)


def test_claiming_removes_the_temporaries_a_killed_run_left(tmp_path, capsys):
    cfg = settings(tmp_path)
    dead = dead_pid()
    for folder in (cfg.run_dir, cfg.log_dir, cfg.encoding_cache):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"x.tmp{dead}.1"), "w") as f:
            f.write("half")
    with claimed(cfg):
        pass
    assert "removed 3 temporary file(s) of killed runs" in capsys.readouterr().out
    assert not [n for folder in (cfg.run_dir, cfg.log_dir, cfg.encoding_cache) for n in os.listdir(folder)
                if ".tmp" in n]


def test_an_unwritable_folder_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(RunFolderError, match=r"^cannot write to the output folder .*a_file/save: "):
        with claimed(settings(tmp_path, save_dir=str(tmp_path / "a_file" / "save"))):
            pass


def test_only_the_main_process_claims(tmp_path):
    cfg = settings(tmp_path)
    with claimed(cfg), claimed(cfg, main=False):  # a torchrun rank > 0 locks nothing: no refusal
        pass
