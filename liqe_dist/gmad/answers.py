"""The judgments a gMAD analysis reads, whatever gathered them: the study database of
``gmad study``, or an answers CSV from elsewhere (a crowd platform, a lab running the authors'
MATLAB toolbox, a spreadsheet).

Every answer becomes one signed value in the pair's terms, on the toolbox's slider scale
(``image_compare_gui.m``: −100..100, sign-corrected for the side the images were shown on):

    value > 0: the attacker's best image is preferred; < 0: its worst; 0: "same" / "uncertain".

Buttons map to the ends and the centre: best = +100, worst = −100, same = 0.

An answers CSV has the columns ``participant,pair,answer`` and optionally ``repeat`` and
``response_ms``; ``answer`` is ``best``, ``worst``, ``same`` or a number in [−100, 100]; ``repeat``
is 0/1 (or false/true); without it, a participant's first row of a pair is its first showing and
any later row a repeat. A malformed row is an error naming the file and line; nothing is guessed.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from liqe_dist.gmad.pairs import PairsFile
from liqe_dist.gmad.search import GMADError
from liqe_dist.gmad.study_db import StudyError, read_study
from liqe_dist.tables import read_cell

BUTTON_VALUES = {"best": 100.0, "worst": -100.0, "same": 0.0}
SCALE = 100.0  # the toolbox's slider: −100..100
MAX_PARTICIPANT = 200  # characters: an id, not a document
REQUIRED = ("participant", "pair", "answer")
TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no", "")


@dataclass(frozen=True)
class Answer:
    """One answer: ``value`` in [−100, 100] as the module docstring says; ``repeat``: a second
    showing of the pair to the same participant (measures consistency, not counted in the verdict)."""

    participant: str
    pair: int
    value: float
    repeat: bool = False
    response_ms: int | None = None


@dataclass(frozen=True)
class Answers:
    """Every answer of a study, and where they came from (``source``: the file read)."""

    answers: list[Answer]
    participants: list[str]
    source: Path


def category(value: float) -> str:
    """'best', 'worst' or 'same': the sign of a value (what a button would have said)."""
    return "best" if value > 0 else "worst" if value < 0 else "same"


def from_study(db_path: str | Path, pairs: PairsFile) -> Answers:
    """The answers of a ``gmad study`` database made for ``pairs`` (refused if made for another)."""
    records = read_study(db_path)
    if records.meta.get("pairs_sha256") != pairs.sha256:
        raise StudyError(f"the study database {db_path} was made for another pairs file than {pairs.path} "
                         f"(sha256 {records.meta.get('pairs_sha256', '?')[:12]}... vs {pairs.sha256[:12]}...)")
    known = {p.pair for p in pairs.pairs}
    answers = []
    for j in records.judgments:
        if j["pair"] not in known:
            raise StudyError(f"the study database {db_path} holds pair {j['pair']}, which {pairs.path} does not have")
        value = j.get("value")
        value = BUTTON_VALUES[j["chosen"]] if value is None else float(value)  # databases from before the slider
        answers.append(Answer(j["participant"], j["pair"], value, bool(j["repeat"]), j.get("response_ms")))
    return Answers(answers, list(records.participants), Path(db_path))


def read_answers(path: str | Path, pairs: PairsFile) -> Answers:
    """Read an answers CSV (see the module docstring) for ``pairs``."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise GMADError(f"{path}: cannot read the answers file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise GMADError(f"{path}: not a UTF-8 CSV file") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip().lower() for h in next(reader, [])]
    except csv.Error as exc:
        raise GMADError(f"{path}, line 1: not a readable CSV header ({exc})") from None
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise GMADError(f"{path}: an answers file needs the columns participant,pair,answer (optional repeat, "
                        f"response_ms); {missing} missing")
    col = {name: header.index(name) for name in (*REQUIRED, "repeat", "response_ms") if name in header}
    known = {p.pair for p in pairs.pairs}
    answers: list[Answer] = []
    firsts: set[tuple[str, int]] = set()
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise GMADError(f"{path}, line {reader.line_num}: not a readable CSV row ({exc})") from None
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise GMADError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)}")
        answer = _row(path, line, row, col, known)
        key = (answer.participant, answer.pair)
        if "repeat" not in col:
            answer = Answer(answer.participant, answer.pair, answer.value, key in firsts, answer.response_ms)
        elif not answer.repeat and key in firsts:
            raise GMADError(f"{path}, line {line}: participant {answer.participant!r} has a first showing of "
                            f"pair {answer.pair} already (mark later showings repeat=1)")
        if not answer.repeat:
            firsts.add(key)
        answers.append(answer)
    if not answers:
        raise GMADError(f"{path}: no answers")
    participants = sorted({a.participant for a in answers})
    return Answers(answers, participants, path)


def _row(path: Path, line: int, row: list[str], col: dict[str, int], known: set[int]) -> Answer:
    where = f"{path}, line {line}"
    participant = read_cell(row[col["participant"]].strip())  # as write_answers escaped it
    if not participant or len(participant) > MAX_PARTICIPANT or not participant.isprintable():
        raise GMADError(f"{where}: participant must be a printable id of 1 to {MAX_PARTICIPANT} characters")
    raw_pair = row[col["pair"]].strip()
    if not raw_pair.isascii() or not raw_pair.isdigit() or int(raw_pair) not in known:
        raise GMADError(f"{where}: pair {raw_pair!r} is not a pair number of the pairs file")
    raw = row[col["answer"]].strip().lower()
    if raw in BUTTON_VALUES:
        value = BUTTON_VALUES[raw]
    else:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not -SCALE <= value <= SCALE:  # NaN fails too
            raise GMADError(f"{where}: answer must be best, worst, same or a number in [-100, 100] (positive: the "
                            f"attacker's best image preferred), got {row[col['answer']]!r}")
    repeat = False
    if "repeat" in col:
        flag = row[col["repeat"]].strip().lower()
        if flag not in TRUE + FALSE:
            raise GMADError(f"{where}: repeat must be 0 or 1, got {row[col['repeat']]!r}")
        repeat = flag in TRUE
    response_ms = None
    if "response_ms" in col and row[col["response_ms"]].strip():
        ms = row[col["response_ms"]].strip()
        if not ms.isascii() or not ms.isdigit():
            raise GMADError(f"{where}: response_ms must be a whole number of milliseconds, got {ms!r}")
        response_ms = int(ms)
    return Answer(participant, int(raw_pair), value, repeat, response_ms)


def write_answers(path: str | Path, answers: Answers) -> None:
    """Write ``answers`` as an answers CSV (read back by :func:`read_answers` to the same answers)."""
    from liqe_dist.tables import write_csv

    write_csv(path, [{"participant": a.participant, "pair": a.pair, "answer": a.value,
                      "repeat": int(a.repeat), "response_ms": "" if a.response_ms is None else a.response_ms}
                     for a in answers.answers], ["participant", "pair", "answer", "repeat", "response_ms"])
