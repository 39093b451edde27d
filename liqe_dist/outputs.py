"""Which folders a command may write, replace or delete: only ones it created and can prove it owns.

A user's files are never collateral. Every folder a command creates for its output carries an
owner file (``.liqe-dist-output.json``: which command made it, when); a later run of the same
command writes into it again, and a folder without the mark is refused unless it is empty. A
shard set is proven by its manifest (:func:`liqe_dist.data.packing.is_shard_set`). An output
folder must also stand apart from the command's inputs: neither inside one nor holding one, so
``pack folder photos --out .`` cannot replace the photographs it reads.

Names that become path components (set names, model names) are checked to be plain names:
one component, no ``..``, no separators or control characters.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import unicodedata
from pathlib import Path
from typing import Callable, Iterable

OWNER_FILE = ".liqe-dist-output.json"
MAX_NAME_BYTES = 200  # leaves room in a 255-byte file name for suffixes such as "-000000.tar.partial"


class OutputError(ValueError):
    """An output folder or name that a command refuses to use (nothing was written)."""


def plain_name(name: str, what: str = "name") -> str:
    """``name`` when it can be one folder or file name on every system; otherwise OutputError
    naming ``what`` and the problem."""
    if not isinstance(name, str) or not name.strip():
        raise OutputError(f"{what} must not be empty")
    if name in (".", ".."):
        raise OutputError(f"{what} {name!r} is not a plain name")
    bad = sorted({c for c in name if c in "/\\" or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")})
    if bad:
        raise OutputError(f"{what} {name!r} must be one plain name: it holds {', '.join(repr(c) for c in bad)}")
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        raise OutputError(f"{what} is {len(os.fsencode(name))} bytes long; at most {MAX_NAME_BYTES}")
    return name


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_apart(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], what: str = "--out") -> None:
    """OutputError when the output folder ``out`` is, holds, or lies inside one of ``inputs``
    (files or folders; symbolic links resolved): writing there could replace what is read."""
    guard = InputGuard(out, what)
    for given in inputs:
        guard(given)


class InputGuard:
    """``guard(path)`` raises OutputError when ``path`` (an input file or folder) is or lies
    inside the output folder, or the output folder lies inside it: for inputs met one by one
    (a streamed listing), the output folder resolved once."""

    def __init__(self, out: str | os.PathLike, what: str = "--out"):
        self.out, self.what, self.target = out, what, _resolved(out)

    def __call__(self, given: str | os.PathLike | None) -> None:
        if given is None:
            return
        source = _resolved(given)
        if _inside(source, self.target):
            raise OutputError(f"{self.what} {self.out}: holds the input {given}; choose an output folder outside it")
        if _inside(self.target, source) and source.is_dir():
            raise OutputError(f"{self.what} {self.out}: lies inside the input {given}; choose an output folder "
                              f"outside it")


def owner(path: str | os.PathLike) -> dict | None:
    """The owner record of a folder this project created, or None."""
    try:
        record = json.loads((Path(path) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def mark(path: str | os.PathLike, kind: str) -> None:
    """Write the owner record of the folder ``path`` (made by command ``kind``)."""
    record = {"owner": "liqe-dist", "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (Path(path) / OWNER_FILE).write_text(json.dumps(record) + "\n")


def owned_by(path: str | os.PathLike, kind: str) -> bool:
    """Whether ``path`` carries the owner record of command ``kind``."""
    record = owner(path)
    return record is not None and record.get("kind") == kind


def _is_empty(path: Path) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def check_claim(out: str | os.PathLike, kind: str, inputs: Iterable[str | os.PathLike | None] = (),
                what: str = "--out", legacy: Callable[[Path], bool] | None = None) -> None:
    """OutputError unless :func:`claim_dir` would accept ``out`` for command ``kind``; creates and
    changes nothing (what ``--check`` runs)."""
    path = Path(out)
    check_apart(path, inputs, what)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {out}: exists and is not a folder")
    if path.is_dir() and not owned_by(path, kind):
        found = owner(path)
        if found is not None:  # another command's folder, whatever its files look like
            raise OutputError(f"{what} {out}: is the output of `liqe-dist {found.get('kind')}`, not of this "
                              f"command; choose a new or empty folder (nothing was changed)")
        if not (_is_empty(path) or (legacy is not None and legacy(path))):
            raise OutputError(f"{what} {out}: holds files not written by this command; choose a new or empty "
                              f"folder (nothing was changed)")


def claim_dir(out: str | os.PathLike, kind: str, inputs: Iterable[str | os.PathLike | None] = (),
              what: str = "--out", legacy: Callable[[Path], bool] | None = None) -> Path:
    """Make ``out`` the output folder of command ``kind`` and return it.

    A missing folder is created (its parents too) and marked; an existing one is used when it is
    empty, carries ``kind``'s owner record, or passes ``legacy`` (what the command wrote before
    folders were marked, e.g. a scores manifest); anything else is refused with OutputError and
    left untouched. ``inputs`` must lie apart from it (:func:`check_apart`)."""
    check_claim(out, kind, inputs, what, legacy)
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    if not owned_by(path, kind):
        mark(path, kind)
    return path


def remove_owned(path: str | os.PathLike, proof: Callable[[Path], bool]) -> None:
    """Delete the folder ``path`` only when ``proof`` shows it is this project's; a folder that
    fails the proof is an OutputError and stays as it is. A missing path is nothing to do."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir() or not proof(path):
        raise OutputError(f"{path}: not a folder this project wrote; left as it is (remove it yourself "
                          f"if it is yours to lose)")
    shutil.rmtree(path)
