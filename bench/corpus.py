"""Deterministic corpora of real English available offline: the docstrings of the Python standard
library, cut into paragraphs (tokenizer tests and benchmark), and the sayings of the fortune
collection installed by the system's package manager (benchmark)."""

import importlib
import inspect
import os
import re

MODULES = [
    "argparse", "asyncio", "calendar", "collections", "configparser", "csv", "datetime", "decimal", "difflib",
    "email", "email.message", "fractions", "ftplib", "functools", "gettext", "gzip", "heapq", "http.client",
    "http.cookies", "imaplib", "inspect", "ipaddress", "itertools", "json", "locale", "logging", "mailbox",
    "os", "pathlib", "pickle", "pprint", "random", "shlex", "shutil", "smtplib", "socket", "sqlite3",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "xml.dom.minidom", "zipfile",
]


def _docstrings(module):
    yield inspect.getdoc(module) or ""
    for _, member in sorted(vars(module).items()):
        if inspect.isclass(member) or inspect.isfunction(member):
            if getattr(member, "__module__", None) == module.__name__:
                yield inspect.getdoc(member) or ""
                if inspect.isclass(member):
                    for _, method in sorted(vars(member).items()):
                        if inspect.isfunction(method):
                            yield inspect.getdoc(method) or ""


def english_texts(n=None, min_words=4):
    """Paragraphs of English prose, sorted and de-duplicated (deterministic for a Python version)."""
    seen = set()
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for doc in _docstrings(module):
            for para in re.split(r"\n\s*\n", doc):
                para = para.strip()
                if len(para.split()) >= min_words and re.search(r"[a-z]{3}", para):
                    seen.add(para)
    texts = sorted(seen)
    return texts if n is None else texts[:n]


FORTUNES = "/usr/share/games/fortunes"  # Debian's `fortunes` package (apt-get install fortunes)


def fortune_texts(folder=FORTUNES):
    """The sayings of the BSD fortune collection (a text corpus nobody on this project chose),
    sorted and de-duplicated; [] where the package is not installed."""
    if not os.path.isdir(folder):
        return []
    seen = set()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if "." in name or not os.path.isfile(path):  # skip the .dat indexes and .u8 links
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for saying in re.split(r"^%\n", f.read(), flags=re.M):
                if saying.strip():
                    seen.add(saying.strip())
    return sorted(seen)
