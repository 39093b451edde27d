"""The gMAD study's database: participants, their trial schedules and every answer, in SQLite.

WAL mode with ``synchronous=FULL``: an answer is on disk when its request returns, so a closed
tab, a killed server or a power cut loses nothing, and readers (the analysis) never block the
server. Every request opens its own connection; writes take the database's write lock first
(``BEGIN IMMEDIATE``), so two participants, or two tabs of one, cannot interleave a check and a
write.

A participant's schedule is drawn once, at their first visit, and stored: every pair once in
random order, plus ``round(repeat_fraction × N)`` pairs (at most N − repeat_gap) shown again at
least ``repeat_gap`` trials after their first showing (for the consistency check), each trial
with the attacker's best image on a random side. ``schedule="fixed"`` (the toolbox's
``run_subjective_test.m``: ``randperm`` and ``randi(2, …)`` drawn once at initialization) draws
it from ``Random(f"{seed}::fixed")``, the same for every participant (the same order, sides and
repeat positions); ``schedule="random"`` draws each participant's own from
``Random(f"{seed}:{id}")`` (reproducible; ids cannot hold ':'). ``trials.left`` records the side.

An answer is kept in the pair's terms as ``answers.value`` in [−100, 100], positive when the
attacker's best image is preferred (the toolbox's sign-corrected slider score): with
``scale="slider"`` it is the slider's position (negative: left is better) sign-corrected by the
side the best image was on; with ``scale="buttons"`` best = +100, worst = −100, same = 0.
``answers.answer`` is the side (left/right/same; for the slider the side it leans to) and
``answers.chosen`` its image (best/worst/same: the sign of ``value``). With each answer the page's
display is kept: the CSS size of the left and right images as shown, the window's inner size,
``devicePixelRatio`` and the common shrink factor (1.0: native size); NULL when not sent.

Practice (``practice_plan``): four pairs before the study, as the toolbox's ``run_training.m``:
two obvious ones (the image vs a strongly degraded copy) and two "same" ones (the image vs an
identical or imperceptibly re-encoded copy), in that interleaved order, each with the original
on a side drawn from ``Random(f"{seed}:{id}:practice")``; ``participants.practice_step`` counts
the ones answered correctly. Practice answers are not recorded.

A database belongs to one pairs file (its SHA-256 is stored) and one set of settings; opening it
with another is refused. Its ``meta`` table also keeps a random ``form_secret`` (made once), from
which the app derives the forms' anti-forgery tokens, so that tokens survive a restart.

Schema 2 (this version) adds ``answers.value`` and the display columns and
``participants.practice_step``. A schema-1 database (the version before) is migrated when the
server opens it (``ALTER TABLE … ADD COLUMN``; value from chosen: best 100, worst −100, same 0;
display NULL; its settings ``scale=buttons``, ``schedule=random``, what that version did);
``read_study`` reads either without writing.

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
from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from liqe_dist.gmad.pairs import PairsFile
from liqe_dist.gmad.search import GMADError

SCHEMA_VERSION = "2"
PARTICIPANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ANSWERS = ("left", "right", "same")
BUSY_TIMEOUT_S = 3.0  # how long a request waits for the write lock before "busy, send again"
SECRET_KEY = "form_secret"
BUTTON_VALUES = {"best": 100.0, "worst": -100.0, "same": 0.0}
LEGACY_SETTINGS = {"scale": "buttons", "schedule": "random"}  # what a schema-1 database did
DISPLAY_FIELDS = ("left_w", "left_h", "right_w", "right_h", "window_w", "window_h", "dpr", "display_scale")
PRACTICE = (("blurred", "obvious"), ("identical", "same"), ("noisy", "obvious"), ("near", "same"))
SAME_TOLERANCE = 20  # slider: a "same" practice pair is answered right within +-20 of the middle

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS participants (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    practice_done INTEGER NOT NULL DEFAULT 0,
    practice_step INTEGER NOT NULL DEFAULT 0
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
    value REAL NOT NULL CHECK (value BETWEEN -100 AND 100),
    left_w REAL CHECK (left_w > 0),
    left_h REAL CHECK (left_h > 0),
    right_w REAL CHECK (right_w > 0),
    right_h REAL CHECK (right_h > 0),
    window_w INTEGER CHECK (window_w > 0),
    window_h INTEGER CHECK (window_h > 0),
    dpr REAL CHECK (dpr > 0 AND dpr <= 16),
    display_scale REAL CHECK (display_scale > 0 AND display_scale <= 1),
    PRIMARY KEY (participant, position),
    FOREIGN KEY (participant, position) REFERENCES trials(participant, position)
);
"""

# schema 1 -> 2, inside the opening write transaction (ADD COLUMN appends: the same columns as SCHEMA)
MIGRATE_1_TO_2 = (
    "ALTER TABLE participants ADD COLUMN practice_step INTEGER NOT NULL DEFAULT 0",
    f"UPDATE participants SET practice_step = {len(PRACTICE)} WHERE practice_done = 1",
    "ALTER TABLE answers ADD COLUMN value REAL NOT NULL DEFAULT 0 CHECK (value BETWEEN -100 AND 100)",
    "UPDATE answers SET value = CASE chosen WHEN 'best' THEN 100 WHEN 'worst' THEN -100 ELSE 0 END",
    "ALTER TABLE answers ADD COLUMN left_w REAL CHECK (left_w > 0)",
    "ALTER TABLE answers ADD COLUMN left_h REAL CHECK (left_h > 0)",
    "ALTER TABLE answers ADD COLUMN right_w REAL CHECK (right_w > 0)",
    "ALTER TABLE answers ADD COLUMN right_h REAL CHECK (right_h > 0)",
    "ALTER TABLE answers ADD COLUMN window_w INTEGER CHECK (window_w > 0)",
    "ALTER TABLE answers ADD COLUMN window_h INTEGER CHECK (window_h > 0)",
    "ALTER TABLE answers ADD COLUMN dpr REAL CHECK (dpr > 0 AND dpr <= 16)",
    "ALTER TABLE answers ADD COLUMN display_scale REAL CHECK (display_scale > 0 AND display_scale <= 1)",
)


class StudySettings(BaseModel):
    """How schedules are drawn; fixed when the database is made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repeat_fraction: float = Field(0.1, ge=0.0, le=1.0, allow_inf_nan=False,
                                   description="share of the pairs each participant sees a second time")
    repeat_gap: int = Field(3, ge=0, le=1000, description="at least this many trials between a pair's two showings")
    seed: int = Field(0, ge=0, description="schedules are drawn from Random(f'{seed}:{participant}') "
                                          "(random) or Random(f'{seed}::fixed') (fixed)")
    scale: Literal["buttons", "slider"] = Field(
        "slider", description="slider: the toolbox's -100..100 slider; buttons: left / same / right")
    schedule: Literal["random", "fixed"] = Field(
        "fixed", description="fixed: one order and side assignment for every participant (the toolbox); "
                             "random: each participant's own")


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
class Display:
    """How a trial was shown, as the page measured it (any field None: not sent): the CSS size of
    the left and right images, the window's inner size (CSS px), ``devicePixelRatio`` and the
    shrink factor common to both images (1.0: native size)."""

    left_w: float | None = None
    left_h: float | None = None
    right_w: float | None = None
    right_h: float | None = None
    window_w: int | None = None
    window_h: int | None = None
    dpr: float | None = None
    display_scale: float | None = None

    def values(self) -> tuple:
        return tuple(getattr(self, k) for k in DISPLAY_FIELDS)


@dataclass(frozen=True)
class PracticeStep:
    """One practice pair of a participant: ``image`` the copy shown beside the original
    ('blurred', 'noisy': obvious; 'identical', 'near': the same), ``original_left`` its side."""

    step: int
    image: str
    kind: str               # 'obvious' or 'same'
    original_left: bool

    def side_image(self, side: str) -> str:
        """'left'/'right' -> 'original' or the copy."""
        return "original" if (side == "left") == self.original_left else self.image

    @property
    def better(self) -> str | None:
        """The side of the better image ('left'/'right'), None for a 'same' pair."""
        if self.kind == "same":
            return None
        return "left" if self.original_left else "right"

    def correct(self, answer: str | None = None, slider: int | None = None) -> bool:
        """A right answer: buttons: the better side, or 'same' for a same pair; slider (negative:
        left is better): on the better side (not 0), or within ±SAME_TOLERANCE of 0."""
        if slider is not None:
            if self.better is None:
                return abs(slider) <= SAME_TOLERANCE
            return slider < 0 if self.better == "left" else slider > 0
        return answer == (self.better or "same")


def practice_plan(participant: str, settings: StudySettings) -> list[PracticeStep]:
    """The participant's four practice pairs, in order (see the module docstring)."""
    rng = random.Random(f"{settings.seed}:{participant}:practice")
    return [PracticeStep(k, image, kind, rng.random() < 0.5) for k, (image, kind) in enumerate(PRACTICE)]


@dataclass(frozen=True)
class Status:
    """A participant's progress: practice pairs passed (of ``len(PRACTICE)``), trials answered,
    trials in their schedule."""

    practice_step: int
    done: int
    total: int

    @property
    def practice_done(self) -> bool:
        return self.practice_step >= len(PRACTICE)

    @property
    def finished(self) -> bool:
        return self.done >= self.total


def repeats_per_participant(n_pairs: int, settings: StudySettings) -> int:
    """How many pairs each participant sees twice (the gap leaves the last ones out)."""
    return min(round(settings.repeat_fraction * n_pairs), max(0, n_pairs - settings.repeat_gap))


def schedule(pair_ids: list[int], participant: str, settings: StudySettings) -> list[tuple[int, bool, str]]:
    """The trials (pair, repeat, left) of one participant, in order (see the module docstring)."""
    rng = random.Random(f"{settings.seed}::fixed" if settings.schedule == "fixed" else f"{settings.seed}:{participant}")
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
                if not have:
                    con.executemany("INSERT INTO meta VALUES (?, ?)", sorted(wanted.items()))
                    have = dict(wanted)
                else:
                    migrate = have.get("schema") == "1" and "value" not in _columns(con, "answers")
                    added = {k: v for k, v in LEGACY_SETTINGS.items() if k not in have} | {"schema": SCHEMA_VERSION}
                    if migrate:
                        have |= added
                    self._check(have, wanted)  # raised here: rolled back, nothing migrated
                    if migrate:
                        for statement in MIGRATE_1_TO_2:
                            con.execute(statement)
                        con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", sorted(added.items()))
                if SECRET_KEY not in have:  # databases made before the tokens get their secret now
                    have[SECRET_KEY] = secrets.token_hex(32)
                    con.execute("INSERT INTO meta VALUES (?, ?)", (SECRET_KEY, have[SECRET_KEY]))
        except sqlite3.DatabaseError as exc:
            raise database_error(self.path, exc) from None
        self.secret = bytes.fromhex(have[SECRET_KEY])

    def _check(self, have: dict[str, str], wanted: dict[str, str]) -> None:
        """Refuse a database of another schema, pairs file or settings."""
        if have.get("schema") != SCHEMA_VERSION:
            raise StudyError(f"{self.path}: study database schema {have.get('schema')!r}, this version reads "
                             f"{SCHEMA_VERSION!r} (and migrates '1'); use the liqe-dist that made it, or a new --db")
        if have.get("pairs_sha256") != self.pairs.sha256:
            raise StudyError(f"{self.path}: made for another pairs file ({have.get('pairs')} pairs, sha256 "
                             f"{have.get('pairs_sha256', '?')[:12]}...), not {self.pairs.path} ({len(self.pair_ids)} "
                             f"pairs, sha256 {self.pairs.sha256[:12]}...); use a new --db")
        changed = [k for k in self.settings.model_dump() if have.get(k) != wanted[k]]
        if changed:
            raise StudyError(f"{self.path}: made with " + ", ".join(f"--{k.replace('_', '-')} {have.get(k)}"
                                                                   for k in changed) +
                             "; the schedules and answers already there depend on it: give the same value or use "
                             "a new --db")

    @staticmethod
    def settings_of(path: str | Path) -> StudySettings | None:
        """The settings an existing database was made with (None: no database there yet)."""
        if not Path(path).exists():
            return None
        meta = LEGACY_SETTINGS | read_study(path).meta  # a schema-1 database stored no scale or schedule
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
                "SELECT p.practice_done, p.practice_step, (SELECT COUNT(*) FROM answers a WHERE a.participant = p.id), "
                "(SELECT COUNT(*) FROM trials t WHERE t.participant = p.id) FROM participants p WHERE p.id = ?",
                (participant,)).fetchone()
        if row is None:
            return None
        return Status(len(PRACTICE) if row[0] else min(row[1], len(PRACTICE)), row[2], row[3])

    def practice(self, participant: str) -> list[PracticeStep]:
        return practice_plan(participant, self.settings)

    def pass_practice(self, participant: str, step: int) -> bool:
        """Mark practice pair ``step`` passed (the last one: the practice is done); False if the
        participant is not at that step (another tab answered it)."""
        with self.connect(write=True) as con:
            done = int(step + 1 >= len(PRACTICE))
            cur = con.execute("UPDATE participants SET practice_step = ?, practice_done = ? WHERE id = ? AND "
                              "practice_step = ? AND practice_done = 0", (step + 1, done, participant, step))
            return cur.rowcount == 1

    def finish_practice(self, participant: str) -> None:
        """Skip the rest of the practice (tests, tools)."""
        with self.connect(write=True) as con:
            con.execute("UPDATE participants SET practice_done = 1, practice_step = ? WHERE id = ?",
                        (len(PRACTICE), participant))

    def trial(self, participant: str, position: int) -> Trial | None:
        with self.connect() as con:
            return _trial(con, participant, position)

    def next_trial(self, participant: str) -> Trial | None:
        """The first trial without an answer (answers are given in order); None when all are done."""
        status = self.status(participant)
        return None if status is None or status.finished else self.trial(participant, status.done)

    def answer(self, participant: str, position: int, answer: str | None = None, response_ms: int | None = None,
               *, slider: int | None = None, display: Display | None = None) -> Trial:
        """Record the answer to the participant's next trial, either a button's ``answer`` (left,
        right, same) or the ``slider``'s position (−100..100, negative: left is better), with how it
        was shown; ``Conflict`` if ``position`` is not the next trial."""
        if (answer is None) == (slider is None):
            raise ValueError("give either a button's answer or the slider's value")
        if answer is not None and answer not in ANSWERS:
            raise ValueError(f"answer must be one of {ANSWERS}, got {answer!r}")
        if slider is not None and (isinstance(slider, bool) or not isinstance(slider, int) or abs(slider) > 100):
            raise ValueError(f"the slider's value must be an integer in [-100, 100], got {slider!r}")
        with self.connect(write=True) as con:
            done = con.execute("SELECT COUNT(*) FROM answers WHERE participant = ?", (participant,)).fetchone()[0]
            trial = _trial(con, participant, position)
            if trial is None:
                raise LookupError(f"participant {participant!r} has no trial {position}")
            if position != done:
                raise Conflict(f"trial {position} {'is already answered' if position < done else 'is not shown yet'}; "
                               f"the next one is {done}")
            if slider is None:
                chosen = "same" if answer == "same" else trial.side_image(answer)
                value = BUTTON_VALUES[chosen]
            else:
                value = float(-slider if trial.left == "best" else slider)  # positive: the best image preferred
                answer = "left" if slider < 0 else "right" if slider > 0 else "same"
                chosen = "best" if value > 0 else "worst" if value < 0 else "same"
            con.execute(f"INSERT INTO answers (participant, position, answer, chosen, response_ms, answered_at, "
                        f"value, {', '.join(DISPLAY_FIELDS)}) VALUES ({', '.join('?' * (7 + len(DISPLAY_FIELDS)))})",
                        (participant, position, answer, chosen, response_ms, time.time(), value,
                         *(display or Display()).values()))
        return trial


def _trial(con: sqlite3.Connection, participant: str, position: int) -> Trial | None:
    row = con.execute("SELECT pair, repeat, left FROM trials WHERE participant = ? AND position = ?",
                      (participant, position)).fetchone()
    return None if row is None else Trial(participant, position, row[0], bool(row[1]), row[2])


def _columns(con: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in con.execute(f"PRAGMA table_info({table})")}


def check_participant(participant: str) -> None:
    if not PARTICIPANT_ID.fullmatch(participant or ""):
        raise ValueError("a participant id is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or "
                         "digit")


@dataclass(frozen=True)
class StudyRecords:
    """What a study database holds: ``meta`` (pairs file hash, settings), ``participants`` (ids) and
    ``judgments``: every answer with its trial, dicts with participant, position, pair, repeat,
    left, answer, chosen, response_ms, answered_at, value (float, −100..100, positive: the
    attacker's best image preferred) and the display: left_w, left_h, right_w, right_h (CSS px of
    the image shown on each side), window_w, window_h, dpr, display_scale (None where not
    recorded, as in a schema-1 database), in participant and position order."""

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
        have = _columns(con, "answers")  # a schema-1 database: value from chosen, no display
        value = ("a.value" if "value" in have else
                 "CASE a.chosen WHEN 'best' THEN 100.0 WHEN 'worst' THEN -100.0 ELSE 0.0 END")
        display = ", ".join(f"a.{k}" if k in have else f"NULL AS {k}" for k in DISPLAY_FIELDS)
        rows = con.execute(
            f"SELECT a.participant, a.position, t.pair, t.repeat, t.left, a.answer, a.chosen, a.response_ms, "
            f"a.answered_at, {value} AS value, {display} FROM answers a JOIN trials t USING (participant, position) "
            f"ORDER BY a.participant, a.position").fetchall()
    except sqlite3.DatabaseError as exc:
        raise database_error(path, exc) from None
    finally:
        con.close()
    judgments = [dict(r) for r in rows]
    for j in judgments:
        j["value"] = float(j["value"])
    return StudyRecords(meta=meta, participants=participants, judgments=judgments)


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
