"""Writing files so that a reader never sees a half-written one."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | Path) -> Path:
    """The temporary sibling ``path`` is written under until it is complete."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` (one rename) when the
    block ends normally and is removed when it raises, so an interrupted write never leaves a
    file that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
