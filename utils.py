"""File helpers every module shares (text and JSON read with errors that name the file, line and
column; atomic writes), and the original's batching and logging helpers."""

import codecs
import collections
import itertools
import json
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

LINE_END = re.compile(rb"\r\n|\r|\n")  # the line ends the csv module counts


def make_path(f):
    """Create the folder of file path `f` if needed; return `f`."""
    d = os.path.dirname(f)
    if d:
        os.makedirs(d, exist_ok=True)
    return f


def idle_cpus():
    """The CPUs this process may use that other programs leave idle, by the 1-minute load average
    less this process's own 1 (at least 1)."""
    try:
        n_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n_cpus = os.cpu_count() or 1
    try:
        busy = max(0.0, os.getloadavg()[0] - 1)
    except (AttributeError, OSError):  # no load average (Windows)
        busy = 0.0
    return max(1, round(n_cpus - busy))


def decode_utf8(data, path, error=ValueError):
    """The text of UTF-8 bytes read from `path` (a byte-order mark dropped, line ends kept); a byte
    that is not UTF-8 raises `error` naming its line and column."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_ends = list(LINE_END.finditer(data, 0, err.start))
        line_start = line_ends[-1].end() if line_ends else 0
        column = len(data[line_start:err.start].decode("utf-8")) + 1  # characters, all valid before err.start
        raise error(f"{path}, line {len(line_ends) + 1}, column {column}: not UTF-8 text (byte "
                    f"0x{data[err.start]:02x}: {err.reason}); save the file as UTF-8") from None


def read_text_file(path, error=ValueError, what="file"):
    """The UTF-8 text of `path`; a missing, unreadable or undecodable file raises `error` in one line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise error(f"{what} {str(path)!r} not found") from None
    except OSError as err:
        raise error(f"{what} {str(path)!r} cannot be read ({err.strerror or err})") from None
    return decode_utf8(data, path, error)


def text_lines(path, error=ValueError, what="file"):
    """(line number, text without its line end) of each line of a UTF-8 file, read as they are used:
    a file of any size takes the memory of one line. Lines end at \n, \r\n or \r (as `csv` and
    `read_text_file` count them); a byte-order mark is dropped. A missing or unreadable file, or a
    byte that is not UTF-8 (named by line and column), raises `error` in one line."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # universal newlines: each line end read as \n
            for line_no, line in enumerate(f, 1):
                yield line_no, line[:-1] if line.endswith("\n") else line
    except UnicodeDecodeError:
        read_text_file(path, error, what)  # reads the whole file to name the line and column
        raise
    except FileNotFoundError:
        raise error(f"{what} {str(path)!r} not found") from None
    except OSError as err:
        raise error(f"{what} {str(path)!r} cannot be read ({err.strerror or err})") from None


def parse_json(text, path, error=ValueError, line=None):
    """The JSON value of `text` (from `path`, at `line` for JSON lines); `error` names where it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {line}" if line is not None else f"line {err.lineno}, column {err.colno}"
        raise error(f"{path}, {where}: not valid JSON ({err.msg})") from None


def read_json(path, error=ValueError, what="file"):
    """The JSON value stored in `path`, every failure one `error` line naming the file."""
    return parse_json(read_text_file(path, error, what), path, error)


def json_lines(text, path, error=ValueError):
    """(line number, value) of each non-blank line of JSON-lines text."""
    return [(n, parse_json(line, path, error, line=n)) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


class WriteError(OSError):
    """A file that could not be written, as one line naming it and the cause (no space left,
    permission denied, file too large)."""

    def __init__(self, path, cause):
        super().__init__(f"cannot write {path}: {cause}")
        self.path, self.cause = path, cause


TEMPORARY = re.compile(r"^(?P<target>.+)\.tmp(?P<pid>\d+)\.(?P<thread>\d+)$")  # atomic_write's temporaries


def atomic_write(path, write):
    """Run `write(temporary path)`, flush it to disk, then rename it to `path`: a crash never leaves a
    half-written file. A failed write removes its temporary file; an OSError becomes a WriteError
    naming `path`. The temporary's name holds the writer's process id (TEMPORARY): what a killed
    process leaves is recognised and removed later (run_folder.remove_dead_temporaries)."""
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    try:
        make_path(path)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(path, err.strerror or err) from None
        raise


def atomic_write_text(path, text):
    """Write `text` (UTF-8) to `path` atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def encode_dataset(*splits, encoder, workers=None):
    """Encode every field of every split that holds texts; other fields (labels) pass through.

    Called as the original: `encode_dataset(*[(trX1, trX2, trX3, trY), ...], encoder=text_encoder)`
    or with the splits in one tuple, `encode_dataset((train, valid, test), encoder=...)`.
    All texts go to the encoder in one call, so a large data set is spread over its worker
    processes at once; `workers` is passed on to `encoder.encode` when given.
    """
    if len(splits) == 1 and isinstance(splits[0], (list, tuple)) and splits[0] and isinstance(splits[0][0], tuple):
        splits = splits[0]
    texts = [text for split in splits for field in split if _holds_texts(field) for text in field]
    options = {} if workers is None else {"workers": workers}
    ids = iter(encoder.encode(texts, verbose=False, **options) if texts else [])
    return [[[next(ids) for _ in field] if _holds_texts(field) else field for field in split] for split in splits]


def _holds_texts(field):
    return len(field) > 0 and isinstance(field[0], str)


def iter_data(*datas, n_batch=128, truncate=False, verbose=False, max_batches=float("inf")):
    """Batches of `n_batch` rows of each array (a tuple of slices when several are given).

    truncate=True drops the last partial batch. Ends with `return`, not `raise StopIteration`
    (an error inside generators since Python 3.7).
    """
    n = len(datas[0])
    if any(len(d) != n for d in datas):
        raise ValueError(f"iter_data: arrays of different lengths {[len(d) for d in datas]}")
    if truncate:
        n = (n // n_batch) * n_batch
    n = int(min(n, max_batches * n_batch))
    for n_done, i in enumerate(tqdm(range(0, n, n_batch), total=-(-n // n_batch), file=sys.stderr, ncols=80,
                                    leave=False, disable=not verbose)):
        if n_done >= max_batches:
            return
        if len(datas) == 1:
            yield datas[0][i:i + n_batch]
        else:
            yield tuple(d[i:i + n_batch] for d in datas)


def computed_ahead(fn, items, ahead=2, initializer=None):
    """fn(item) of each item, in order, each computed in a background thread up to `ahead` items
    before it is asked for, so that the caller's work and fn's overlap (the items themselves are
    taken in the caller's thread). `initializer` runs first in the thread. An exception in fn is
    raised where its result is asked for; closing the generator stops the thread."""
    items = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ahead", initializer=initializer) as pool:
        pending = collections.deque(pool.submit(fn, item) for item in itertools.islice(items, ahead))
        try:
            while pending:
                result = pending.popleft().result()
                pending.extend(pool.submit(fn, item) for item in itertools.islice(items, 1))
                yield result
        finally:
            for future in pending:
                future.cancel()


class ResultLogger:
    """JSON-lines log: the first line holds the run's arguments, then one line per `log` call,
    flushed at once. `ResultLogger.reopen` continues an existing log (resumed runs)."""

    def __init__(self, path, *args, **kwargs):
        self.path = path
        try:
            self.f_log = open(make_path(path), "w", encoding="utf-8")
        except OSError as err:
            raise WriteError(path, err.strerror or err) from None
        kwargs.setdefault("time", time.time())
        self._write(kwargs)

    @classmethod
    def reopen(cls, path, keep_lines, kept=None, error=ValueError):
        """Continue the log at `path` from the lines a checkpoint counted: `kept`, their text as the
        checkpoint holds it (a log damaged since is restored from it, with a warning), else the
        log's own first `keep_lines` lines (an `error` where it has fewer). The log is rewritten
        through a temporary file and a rename: a crash leaves the old log or the new, never a cut one."""
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        if kept is None:
            lines = text.splitlines(keepends=True)
            if len(lines) < keep_lines:
                raise error(f"the log {path} holds {len(lines)} lines but the checkpoint counted {keep_lines}: it "
                            "was cut or damaged since")
            kept = "".join(lines[:keep_lines])
        elif not text.startswith(kept):
            print(f"warning: the log {path} does not hold the {keep_lines} lines the checkpoint counted (cut or "
                  "damaged): rewritten from the checkpoint's copy", file=sys.stderr)
        atomic_write_text(path, kept)
        logger = cls.__new__(cls)
        logger.path, logger.f_log = path, open(path, "a", encoding="utf-8")
        return logger

    def _write(self, record):
        """One line, flushed; a failed write (no space left) is a WriteError naming the log."""
        try:
            self.f_log.write(json.dumps(record) + "\n")
            self.f_log.flush()
        except OSError as err:
            raise WriteError(self.path, err.strerror or err) from None

    def log(self, **kwargs):
        kwargs.setdefault("time", time.time())
        self._write(kwargs)

    def close(self):
        self.f_log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
