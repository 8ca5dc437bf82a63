"""One run per folder, and nothing left behind by killed ones: a run holds locks on its folder
SAVE_DIR/DESC/ and on its log for its whole life, and removes at start the temporary files that
killed processes left in the folders it writes to.

The locks are `filelock`'s (flock on Linux): the operating system drops them when their process
ends in any way, a SIGKILL included, so the lock of a dead run never stands in the way. Beside
each lock a run writes its process id, for the line that refuses a second run.
"""

import contextlib
import os
import tempfile

from filelock import FileLock, Timeout

from utils import TEMPORARY


class RunFolderError(RuntimeError):
    """A run's folder that cannot be written or is in use by another run (one line)."""


def check_writable(folders):
    """Make each folder and write a file in it, before any work: a run must not train for hours and
    then fail on its log, checkpoint or submission folder."""
    for folder in folders:
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise RunFolderError(f"cannot write to the output folder {folder}: {err.strerror or err}") from None


def output_folders(cfg):
    """The folders a run writes to: its log's, its own, and its submission's."""
    return [cfg.log_dir, cfg.save_dir, cfg.run_dir] + ([cfg.submission_dir] if cfg.submit or cfg.analysis else [])


@contextlib.contextmanager
def claimed(cfg, main=True):
    """The run's folders checked, locked (SAVE_DIR/DESC/ and the log) and cleared of dead processes'
    temporary files, for the duration of the block. Only the main process of a torchrun job (the
    one that writes files) claims them; the others pass."""
    if not main:
        yield
        return
    check_writable(output_folders(cfg))
    with contextlib.ExitStack() as locks:
        locks.enter_context(locked(os.path.join(cfg.run_dir, "run.lock"), cfg.run_dir))
        locks.enter_context(locked(cfg.log_path + ".lock", cfg.log_path))
        written = output_folders(cfg) + [cfg.encoding_cache, os.path.join(cfg.run_dir, "model")]
        removed = remove_dead_temporaries(written)
        if removed:
            print(f"removed {len(removed)} temporary file(s) of killed runs: {', '.join(removed[:3])}"
                  + (" ..." if len(removed) > 3 else ""))
        yield


@contextlib.contextmanager
def locked(lock_path, what):
    """Hold the lock at `lock_path` (for `what`) or refuse in one line naming the holder's process id."""
    lock = FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = read_holder(lock_path + ".pid")
        raise RunFolderError(f"{what} is in use by another run ({f'process {holder}' if holder else 'another process'}"
                             "); wait for it to end, or give this run another --desc") from None
    except OSError as err:
        raise RunFolderError(f"cannot lock {lock_path}: {err.strerror or err}") from None
    try:
        with open(lock_path + ".pid", "w") as f:
            f.write(f"{os.getpid()}\n")
        yield
    finally:
        lock.release()


def read_holder(pid_path):
    try:
        with open(pid_path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def is_alive(pid):
    """Whether a process of this id runs (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temporaries(folders):
    """Remove atomic_write's temporary files (`NAME.tmpPID.THREAD`) whose writing process is gone:
    a write killed half-way. Those of living processes (another run's write in progress) stay.
    Returns the paths removed."""
    removed = []
    for folder in dict.fromkeys(folders):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            match = TEMPORARY.match(name)
            if match and int(match["pid"]) != os.getpid() and not is_alive(int(match["pid"])):
                path = os.path.join(folder, name)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                    removed.append(path)
    return removed
