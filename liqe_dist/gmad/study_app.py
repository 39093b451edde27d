"""The gMAD study as a web app (Flask, served by waitress): people judge the pairs of a pairs.csv.

Pages, in the order a participant meets them:
- ``/``: enter a participant id (the same id later resumes where it stopped);
- ``/p/<id>``: the instructions with one practice pair (an image beside a strongly blurred copy of
  itself; not recorded), then one trial at a time until every trial is answered, then a thank-you;
- ``POST /p/<id>/answer``: ``position`` (the trial shown), ``answer`` (left, right, same),
  optional ``response_ms``; the answer is committed before the next trial is sent.

Images are served only as ``/p/<id>/image/<position>/<left|right>`` (a trial's side) and
``/practice/<original|blurred>``: numbers and fixed words that index the pairs read at start, so
no text of a request reaches the file system. Anything malformed is a 4xx with a short page
(400 bad form values, 404 unknown participant/trial/route, 409 an answer for a trial that is not
the next one or before the practice, 413 oversized form).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from flask import Flask, Response, abort, redirect, render_template, request, send_file, url_for
from werkzeug.exceptions import HTTPException

from liqe_dist.gmad.pairs import MEDIA_TYPES, PairsFile
from liqe_dist.gmad.study_db import ANSWERS, PARTICIPANT_ID, Conflict, Status, StudyDB, StudySettings

log = logging.getLogger(__name__)

MAX_RESPONSE_MS = 24 * 3600 * 1000


def practice_images(source: Path, size: int = 512) -> dict[str, bytes]:
    """The practice pair: ``source`` fitted into ``size`` px, and a strongly blurred, blocky copy
    (an obvious difference, so the practice teaches the keys, not the task's hard cases)."""
    from PIL import Image, ImageFilter

    with Image.open(source) as img:
        img = img.convert("RGB")
        img.thumbnail((size, size))
    out = {}
    blurred = img.filter(ImageFilter.GaussianBlur(radius=max(2.0, min(img.size) / 60)))
    for name, im in (("original", img), ("blurred", blurred)):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=95 if name == "original" else 15)
        out[name] = buf.getvalue()
    return out


def create_app(pairs: PairsFile, db_path: str | Path, settings: StudySettings) -> Flask:
    """The study app over ``pairs`` (read with its images) writing to ``db_path``."""
    db = StudyDB(db_path, pairs, settings)
    by_id = pairs.by_id()
    practice = practice_images(pairs.pairs[0].images["best"])
    app = Flask(__name__, static_folder=None)  # no static route: nothing is served from a folder
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024
    app.extensions["study_db"] = db

    def known(participant: str) -> Status:
        status = db.status(participant) if PARTICIPANT_ID.fullmatch(participant) else None
        if status is None:
            abort(404, f"no participant {participant!r}: start at the first page")
        return status

    @app.get("/")
    def welcome():
        return render_template("welcome.html", pairs=len(pairs.pairs), error=None)

    @app.post("/start")
    def start():
        participant = _field("participant").strip()
        try:
            new = db.register(participant)
        except ValueError as exc:
            return render_template("welcome.html", pairs=len(pairs.pairs), error=str(exc)), 400
        status = db.status(participant)
        log.info("participant %s %s", participant,
                 "starts" if new else f"resumes after {status.done} of {status.total} trials")
        return redirect(url_for("participant_page", participant=participant), 303)

    @app.get("/p/<participant>")
    def participant_page(participant: str):
        status = known(participant)
        if not status.practice_done:
            return render_template("trial.html", practice=True, participant=participant, done=status.done,
                                   total=status.total, position=0, hint=request.args.get("hint") == "1")
        if status.finished:
            return render_template("done.html", participant=participant, total=status.total)
        # the images are fetched by position; the page needs no more than the next position
        return render_template("trial.html", practice=False, participant=participant, done=status.done,
                               total=status.total, position=status.done, hint=False)

    @app.post("/p/<participant>/practice")
    def practice_answer(participant: str):
        known(participant)
        if _answer_field() != "left":  # the original is on the left: say so, and show the practice again
            return redirect(url_for("participant_page", participant=participant, hint=1), 303)
        db.finish_practice(participant)
        return redirect(url_for("participant_page", participant=participant), 303)

    @app.post("/p/<participant>/answer")
    def answer(participant: str):
        status = known(participant)
        answer = _answer_field()
        position = _int_field("position", 0, 10_000_000, required=True)
        response_ms = _int_field("response_ms", 0, MAX_RESPONSE_MS, required=False)
        if not status.practice_done:
            return render_template("error.html", code=409, name="Conflict", description="the practice pair comes first",
                                   next=url_for("participant_page", participant=participant)), 409
        try:
            db.answer(participant, position, answer, response_ms)
        except LookupError as exc:
            abort(404, str(exc))
        except Conflict as exc:  # a second tab, or the browser's back button: show the way on
            return render_template("error.html", code=409, name="Conflict", description=str(exc),
                                   next=url_for("participant_page", participant=participant)), 409
        log.log(logging.INFO if position + 1 == status.total else logging.DEBUG,
                "participant %s: %d of %d trials answered", participant, position + 1, status.total)
        return redirect(url_for("participant_page", participant=participant), 303)

    @app.get("/p/<participant>/image/<int:position>/<any(left, right):side>")
    def trial_image(participant: str, position: int, side: str):
        known(participant)
        trial = db.trial(participant, position)
        if trial is None:
            abort(404, "no such trial")
        path = by_id[trial.pair].images[trial.side_image(side)]
        response = send_file(path, mimetype=MEDIA_TYPES[path.suffix[1:]], conditional=True)
        response.headers["Cache-Control"] = "private, max-age=3600"
        return response

    @app.get("/practice/<any(original, blurred):which>")
    def practice_image(which: str):
        return Response(practice[which], mimetype="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return render_template("error.html", code=exc.code, name=exc.name, description=exc.description), exc.code

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    return app


def _field(name: str) -> str:
    """A form field given at most once ('' when absent)."""
    values = request.form.getlist(name)
    if len(values) > 1:
        abort(400, f"{name} given {len(values)} times")
    return values[0] if values else ""


def _answer_field() -> str:
    answer = _field("answer")
    if answer not in ANSWERS:
        abort(400, f"answer must be one of {', '.join(ANSWERS)}")
    return answer


def _int_field(name: str, low: int, high: int, required: bool) -> int | None:
    raw = _field(name)
    if raw == "" and not required:
        return None
    if not raw.isascii() or not raw.isdigit() or not low <= int(raw) <= high:
        abort(400, f"{name} must be an integer in [{low}, {high}]")
    return int(raw)


def serve(app: Flask, host: str = "127.0.0.1", port: int = 8080, threads: int = 8) -> None:
    """Serve until interrupted; prints the address (``port`` 0: a free port)."""
    from waitress import create_server

    try:
        server = create_server(app, host=host, port=port, threads=threads, ident="liqe-dist-study")
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (another server there? "
                      f"choose another --port, or 0 for any free one)") from None
    shown = f"[{host}]" if ":" in host else host
    print(f"study at http://{shown}:{server.effective_port}/  (Ctrl+C stops; answers are saved as they come)",
          flush=True)
    try:
        server.run()
    finally:
        server.close()
