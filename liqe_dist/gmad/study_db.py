"""The gMAD study's database: participants, their trial schedules and every answer, in SQLite.

WAL mode with ``synchronous=FULL``: an answer is on disk when its request returns, so a closed
tab, a killed server or a power cut loses nothing, and readers (the analysis) never block the
server. Every request opens its own connection; writes take the database's write lock first
(``BEGIN IMMEDIATE``), so two participants, or two tabs of one, cannot interleave a check and a
write.

A participant's schedule is drawn once, at their first visit, from ``Random(f"{seed}:{id}")``
(reproducible) and stored: every pair once in random order, plus ``round(repeat_fraction × N)``
pairs (at most N − repeat_gap) shown again at least ``repeat_gap`` trials after their first
showing (for the consistency check), each trial with the attacker's best image on a random side.
``trials.left`` records the side; ``answers.chosen`` holds the answer in the pair's terms: ``best``
(the attacker's best image looks better), ``worst`` or ``same``.

A database belongs to one pairs file (its SHA-256 is stored) and one schedule setting; opening it
with another is refused. Its ``meta`` table also keeps a random ``form_secret`` (made once), from
which the app derives the forms' anti-forgery tokens, so that tokens survive a restart.

A write waits at most ``busy_timeout`` seconds (a few: a request must not hang) for the write lock
and then raises ``Busy``, which the app answers with "busy, send again" instead of an error.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, ConfigDict, Field

from liqe_dist.gmad.pairs import PairsFile
from liqe_dist.gmad.search import GMADError

SCHEMA_VERSION = "1"
PARTICIPANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ANSWERS = ("left", "right", "same")
BUSY_TIMEOUT_S = 3.0  # how long a request waits for the write lock before "busy, send again"
SECRET_KEY = "form_secret"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS participants (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    practice_done INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS trials (
    participant TEXT NOT NULL REFERENCES participants(id),
    position INTEGER NOT NULL,
    pair INTEGER NOT NULL,
    repeat INTEGER NOT NULL CHECK (repeat IN (0, 1)),
    left TEXT NOT NULL CHECK (left IN ('best', 'worst')),
    PRIMARY KEY (participant, position)
);
CREATE TABLE IF NOT EXISTS answers (
    participant TEXT NOT NULL,
    position INTEGER NOT NULL,
    answer TEXT NOT NULL CHECK (answer IN ('left', 'right', 'same')),
    chosen TEXT NOT NULL CHECK (chosen IN ('best', 'worst', 'same')),
    response_ms INTEGER,
    answered_at REAL NOT NULL,
    PRIMARY KEY (participant, position),
    FOREIGN KEY (participant, position) REFERENCES trials(participant, position)
);
"""


class StudySettings(BaseModel):
    """How schedules are drawn; fixed when the database is made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repeat_fraction: float = Field(0.1, ge=0.0, le=1.0, allow_inf_nan=False,
                                   description="share of the pairs each participant sees a second time")
    repeat_gap: int = Field(3, ge=0, le=1000, description="at least this many trials between a pair's two showings")
    seed: int = Field(0, ge=0, description="schedules are drawn from Random(f'{seed}:{participant}')")


class StudyError(GMADError):
    """A database that does not fit the pairs file or the settings, or is not a study database."""


class Busy(StudyError):
    """The database's write lock stayed taken (another program writing) for the whole busy timeout."""


class Conflict(Exception):
    """An answer for a trial that is not the participant's next one (already answered, or ahead)."""


@dataclass(frozen=True)
class Trial:
    participant: str
    position: int
    pair: int
    repeat: bool
    left: str               # 'best' or 'worst': which image of the pair is shown on the left

    def side_image(self, side: str) -> str:
        """'left'/'right' -> 'best'/'worst'."""
        right = "worst" if self.left == "best" else "best"
        return self.left if side == "left" else right


@dataclass(frozen=True)
class Status:
    """A participant's progress: practice done, trials answered, trials in their schedule."""

    practice_done: bool
    done: int
    total: int

    @property
    def finished(self) -> bool:
        return self.done >= self.total


def repeats_per_participant(n_pairs: int, settings: StudySettings) -> int:
    """How many pairs each participant sees twice (the gap leaves the last ones out)."""
    return min(round(settings.repeat_fraction * n_pairs), max(0, n_pairs - settings.repeat_gap))


def schedule(pair_ids: list[int], participant: str, settings: StudySettings) -> list[tuple[int, bool, str]]:
    """The trials (pair, repeat, left) of one participant, in order (see the module docstring)."""
    rng = random.Random(f"{settings.seed}:{participant}")
    order: list[tuple[int, bool]] = [(p, False) for p in pair_ids]
    rng.shuffle(order)
    # only pairs first shown early enough can keep the gap (later insertions only widen it)
    room = [p for p, _ in order[:max(0, len(order) - settings.repeat_gap)]]
    for pair in rng.sample(room, repeats_per_participant(len(pair_ids), settings)):
        first = order.index((pair, False))
        order.insert(rng.randint(first + 1 + settings.repeat_gap, len(order)), (pair, True))
    return [(p, rep, "best" if rng.random() < 0.5 else "worst") for p, rep in order]


class StudyDB:
    """One study database file (see the module docstring)."""

    def __init__(self, path: str | Path, pairs: PairsFile, settings: StudySettings,
                 busy_timeout: float = BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.pairs = pairs
        self.settings = settings
        self.busy_timeout = busy_timeout
        self.pair_ids = [p.pair for p in pairs.pairs]
        self.secret = b""
        self._init()

    @contextmanager
    def connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection (``write``: inside ``BEGIN IMMEDIATE`` ... ``COMMIT``); a lock held past the
        busy timeout is ``Busy``."""
        try:
            con = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise database_error(self.path, exc) from None
        try:
            con.execute("PRAGMA foreign_keys = ON")
            con.execute("PRAGMA synchronous = FULL")
            if write:
                con.execute("BEGIN IMMEDIATE")
                try:
                    yield con
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
            else:
                yield con
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):  # closing the connection below rolls back whatever was begun
                raise database_error(self.path, exc) from None
            raise
        finally:
            con.close()

    def _init(self) -> None:
        wanted = {"schema": SCHEMA_VERSION, "pairs_sha256": self.pairs.sha256, "pairs": str(len(self.pair_ids)),
                  **{k: str(v) for k, v in self.settings.model_dump().items()}}
        try:
            with self.connect() as con:
                mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise StudyError(f"{self.path}: SQLite refused WAL mode ({mode}); put the database on a local "
                                     f"file system")
                con.executescript(SCHEMA)
            with self.connect(write=True) as con:
                have = dict(con.execute("SELECT key, value FROM meta").fetchall())
                fresh = not have
                if fresh:
                    con.executemany("INSERT INTO meta VALUES (?, ?)", sorted(wanted.items()))
                if SECRET_KEY not in have:  # databases made before the tokens get their secret now
                    have[SECRET_KEY] = secrets.token_hex(32)
                    con.execute("INSERT INTO meta VALUES (?, ?)", (SECRET_KEY, have[SECRET_KEY]))
        except sqlite3.DatabaseError as exc:
            raise database_error(self.path, exc) from None
        self.secret = bytes.fromhex(have[SECRET_KEY])
        if fresh:
            return
        if have.get("schema") != SCHEMA_VERSION:
            raise StudyError(f"{self.path}: study database schema {have.get('schema')!r}, this version reads "
                             f"{SCHEMA_VERSION!r}")
        if have.get("pairs_sha256") != self.pairs.sha256:
            raise StudyError(f"{self.path}: made for another pairs file ({have.get('pairs')} pairs, sha256 "
                             f"{have.get('pairs_sha256', '?')[:12]}...), not {self.pairs.path} ({len(self.pair_ids)} "
                             f"pairs, sha256 {self.pairs.sha256[:12]}...); use a new --db")
        changed = [k for k in self.settings.model_dump() if have.get(k) != wanted[k]]
        if changed:
            raise StudyError(f"{self.path}: made with " + ", ".join(f"--{k.replace('_', '-')} {have.get(k)}"
                                                                   for k in changed) +
                             "; the schedules already drawn depend on it: give the same value or use a new --db")

    @staticmethod
    def settings_of(path: str | Path) -> StudySettings | None:
        """The settings an existing database was made with (None: no database there yet)."""
        if not Path(path).exists():
            return None
        meta = read_study(path).meta
        return StudySettings(**{k: meta[k] for k in StudySettings.model_fields if k in meta})

    # --- participants and trials -------------------------------------------------------------

    def register(self, participant: str) -> bool:
        """Create the participant and their schedule (True), or do nothing if they exist (False)."""
        check_participant(participant)
        with self.connect(write=True) as con:
            if con.execute("SELECT 1 FROM participants WHERE id = ?", (participant,)).fetchone():
                return False
            con.execute("INSERT INTO participants (id, created) VALUES (?, ?)", (participant, time.time()))
            con.executemany("INSERT INTO trials VALUES (?, ?, ?, ?, ?)",
                            [(participant, i, pair, int(rep), left) for i, (pair, rep, left)
                             in enumerate(schedule(self.pair_ids, participant, self.settings))])
        return True

    def status(self, participant: str) -> Status | None:
        """Where the participant stands (one query); None if there is no such participant."""
        with self.connect() as con:
            row = con.execute(
                "SELECT p.practice_done, (SELECT COUNT(*) FROM answers a WHERE a.participant = p.id), "
                "(SELECT COUNT(*) FROM trials t WHERE t.participant = p.id) FROM participants p WHERE p.id = ?",
                (participant,)).fetchone()
        return None if row is None else Status(bool(row[0]), row[1], row[2])

    def finish_practice(self, participant: str) -> None:
        with self.connect(write=True) as con:
            con.execute("UPDATE participants SET practice_done = 1 WHERE id = ?", (participant,))

    def trial(self, participant: str, position: int) -> Trial | None:
        with self.connect() as con:
            return _trial(con, participant, position)

    def next_trial(self, participant: str) -> Trial | None:
        """The first trial without an answer (answers are given in order); None when all are done."""
        status = self.status(participant)
        return None if status is None or status.finished else self.trial(participant, status.done)

    def answer(self, participant: str, position: int, answer: str, response_ms: int | None = None) -> Trial:
        """Record the answer to the participant's next trial; ``Conflict`` if ``position`` is not it."""
        if answer not in ANSWERS:
            raise ValueError(f"answer must be one of {ANSWERS}, got {answer!r}")
        with self.connect(write=True) as con:
            done = con.execute("SELECT COUNT(*) FROM answers WHERE participant = ?", (participant,)).fetchone()[0]
            trial = _trial(con, participant, position)
            if trial is None:
                raise LookupError(f"participant {participant!r} has no trial {position}")
            if position != done:
                raise Conflict(f"trial {position} {'is already answered' if position < done else 'is not shown yet'}; "
                               f"the next one is {done}")
            chosen = "same" if answer == "same" else trial.side_image(answer)
            con.execute("INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                        (participant, position, answer, chosen, response_ms, time.time()))
        return trial


def _trial(con: sqlite3.Connection, participant: str, position: int) -> Trial | None:
    row = con.execute("SELECT pair, repeat, left FROM trials WHERE participant = ? AND position = ?",
                      (participant, position)).fetchone()
    return None if row is None else Trial(participant, position, row[0], bool(row[1]), row[2])


def check_participant(participant: str) -> None:
    if not PARTICIPANT_ID.fullmatch(participant or ""):
        raise ValueError("a participant id is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or "
                         "digit")


@dataclass(frozen=True)
class StudyRecords:
    """What a study database holds: ``meta`` (pairs file hash, settings), ``participants`` (ids) and
    ``judgments``: every answer with its trial, dicts with participant, position, pair, repeat,
    left, answer, chosen, response_ms, answered_at, in participant and position order."""

    meta: dict[str, str]
    participants: list[str]
    judgments: list[dict]


def read_study(path: str | Path) -> StudyRecords:
    """Read a study database without writing to it (the server may be running)."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"{path}: no such study database")
    try:
        con = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise database_error(path, exc) from None
    con.row_factory = sqlite3.Row
    try:
        meta = dict(tuple(r) for r in con.execute("SELECT key, value FROM meta").fetchall())
        participants = [r[0] for r in con.execute("SELECT id FROM participants ORDER BY id")]
        rows = con.execute(
            "SELECT a.participant, a.position, t.pair, t.repeat, t.left, a.answer, a.chosen, a.response_ms, "
            "a.answered_at FROM answers a JOIN trials t USING (participant, position) "
            "ORDER BY a.participant, a.position").fetchall()
    except sqlite3.DatabaseError as exc:
        raise database_error(path, exc) from None
    finally:
        con.close()
    return StudyRecords(meta=meta, participants=participants, judgments=[dict(r) for r in rows])


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+; the message before
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _cannot_open(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM)
    return "unable to open" in str(exc) or "readonly" in str(exc)


def database_error(path: Path, exc: sqlite3.Error) -> StudyError:
    """The error to show for ``exc`` on ``path``: locked by another program, cannot be opened (and
    why, as far as the file system tells), or not a study database: three different fixes."""
    if _is_busy(exc):
        return Busy(f"{path}: the database is locked by another program (another `gmad study` server or a "
                    f"writer?); stop it or try again")
    if _cannot_open(exc):
        folder = path.parent
        if not folder.is_dir():
            why = f"its folder {folder} does not exist"
        elif path.is_dir():
            why = "it is a folder"
        elif not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.R_OK | os.W_OK)):
            why = (f"no permission to read and write it and its folder {folder} (SQLite writes -wal and -shm "
                   f"files beside it)")
        else:
            why = str(exc)
        return StudyError(f"{path}: cannot open the study database: {why}")
    return StudyError(f"{path}: not a study database ({exc})")
