"""The gMAD study as a web app (Flask, served by waitress): people judge the pairs of a pairs.csv.

Pages, in the order a participant meets them:
- ``/``: enter a participant id (the same id later resumes where it stopped);
- ``/p/<id>``: the instructions with one practice pair (an image beside a strongly blurred copy of
  itself; not recorded), then one trial at a time until every trial is answered, then a thank-you;
- ``POST /p/<id>/answer``: ``position`` (the trial shown), ``answer`` (left, right, same),
  optional ``response_ms``, ``token``; the answer is committed before the next trial is sent.

Images are served only as ``/p/<id>/image/<position>/<left|right>`` (a trial's side) and
``/practice/<original|blurred>``: numbers and fixed words that index the pairs read at start, so
no text of a request reaches the file system. Anything malformed is a 4xx with a short page
(400 bad form values, 404 unknown participant/trial/route, 409 an answer for a trial that is not
the next one or before the practice, 413 oversized form).

Security rules (the server has no login, so these keep other sites and curious eyes out):
- blind sides: an image response carries nothing of its role or file: no file name
  (Content-Disposition), no ETag or Last-Modified, and its URL names only position and side;
- trial positions are bounded by the participant's schedule (404 beyond it, never a 500);
- an image is read at each request from the images folder resolved at start, opened without
  following a symlink and served only if it is a regular file (a symlink, FIFO or folder swapped
  in later is a 404);
- Host allow-list (DNS rebinding): only the bound address, localhost, 127.0.0.1 and [::1] with the
  port, and the host of ``--public-url``; any other Host is a 421;
- forgery: every form carries a token, an HMAC of the participant (or of the start page) under a
  random secret kept in the database, checked on every POST (403 otherwise), and a POST whose
  Origin is another site's is a 403. ``Origin: null`` is left to the token: browsers send it for
  our own forms because of ``Referrer-Policy: no-referrer``;
- every response: ``Content-Security-Policy`` (nothing but this origin; the pages' one style and
  script by a per-response nonce; no framing), ``X-Frame-Options: DENY``, ``nosniff``,
  ``Referrer-Policy: no-referrer``, ``Cross-Origin-Resource-Policy: same-origin``;
- a database locked by another program for longer than a few seconds is a 503 "busy, send
  again" page with ``Retry-After`` that keeps the submitted form, so resending it works.
"""

from __future__ import annotations

import hmac
import io
import logging
import os
import secrets
import stat
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, Response, abort, g, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter

from liqe_dist.gmad.pairs import MEDIA_TYPES, SIDES, PairsFile
from liqe_dist.gmad.study_db import (ANSWERS, BUSY_TIMEOUT_S, PARTICIPANT_ID, Busy, Conflict, Status, StudyDB,
                                     StudySettings)

log = logging.getLogger(__name__)

MAX_RESPONSE_MS = 24 * 3600 * 1000
MAX_THREADS = 256
BUSY_RETRY_S = 2
RESENT_FIELDS = ("participant", "position", "answer", "response_ms", "token")  # what a busy page sends again
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


class PositionConverter(IntegerConverter):
    """A trial position: at most 9 digits, so a huge number never reaches int() or SQLite."""

    regex = r"\d{1,9}"


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


def form_token(secret: bytes, scope: str) -> str:
    """The anti-forgery token of one form scope ('start' or 'participant:<id>'): only a page of
    this server, which other sites cannot read, shows it."""
    return hmac.new(secret, scope.encode(), "sha256").hexdigest()


def read_image(folder: Path, name: str) -> bytes | None:
    """The bytes of the regular file ``name`` directly in ``folder`` (resolved at start), or None.
    Neither the folder nor the file is followed if it became a symlink, and a FIFO never blocks."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        dir_fd = os.open(folder, flags | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        if os.path.realpath(folder / name) != str(folder / name):  # a second guard; the open above is the rule
            return None
        return f.read()


def parse_public_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``--public-url``: the server's root as participants reach it."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password
            or port == -1 or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ValueError(f"--public-url must be http(s)://HOST[:PORT]/ (the server's root as participants reach "
                         f"it), got {url!r}")
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)


def check_listen(port: int, threads: int) -> None:
    """Refuse what waitress would take silently: a port beyond 16 bits (it wraps), no threads (it hangs)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in [0, 65535] (0: any free port), got {port}")
    if not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"--threads must be in [1, {MAX_THREADS}], got {threads}")


def _netloc(name: str, port: int | None) -> str:
    name = f"[{name}]" if ":" in name else name
    return name if port is None else f"{name}:{port}"


def allow_hosts(app: Flask, host: str, port: int, public_url: str | None = None) -> None:
    """Answer only requests whose Host (and POSTs whose Origin) names this server: ``host`` (unless
    a wildcard) and the local names at ``port``, and ``public_url``'s host."""
    names = {n for n in (host.lower().strip("[]"), *LOCAL_NAMES) if n not in WILDCARD_HOSTS}
    hosts = {_netloc(n, port) for n in names} | ({_netloc(n, None) for n in names} if port == 80 else set())
    origins = {f"http://{_netloc(n, None if port == 80 else port)}" for n in names}
    if public_url:
        scheme, name, public_port = parse_public_url(public_url)
        hosts |= {_netloc(name, public_port), _netloc(name, None)}  # a proxy may or may not name a default port
        default = public_port == (443 if scheme == "https" else 80)
        origins.add(f"{scheme}://{_netloc(name, None if default else public_port)}")
    app.config["STUDY_HOSTS"] = frozenset(hosts)
    app.config["STUDY_ORIGINS"] = frozenset(origins)


def create_app(pairs: PairsFile, db_path: str | Path, settings: StudySettings, host: str = "127.0.0.1",
               port: int = 8080, public_url: str | None = None, busy_timeout: float = BUSY_TIMEOUT_S) -> Flask:
    """The study app over ``pairs`` (read with its images) writing to ``db_path``; it answers to
    ``host``:``port`` (``serve`` sets the port it got) and ``public_url``."""
    db = StudyDB(db_path, pairs, settings, busy_timeout=busy_timeout)
    # resolved once: a folder swapped for a symlink later is not followed (read_image)
    files = {(p.pair, role): (p.images[role].parent.resolve(), p.images[role].name) for p in pairs.pairs
             for role in SIDES}
    practice = practice_images(pairs.pairs[0].images["best"])
    app = Flask(__name__, static_folder=None)  # no static route: nothing is served from a folder
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024
    app.config["STUDY_PUBLIC_URL"] = public_url
    app.url_map.converters["position"] = PositionConverter
    app.extensions["study_db"] = db
    allow_hosts(app, host, port, public_url)

    def known(participant: str) -> Status:
        status = db.status(participant) if PARTICIPANT_ID.fullmatch(participant) else None
        if status is None:
            abort(404, f"no participant {participant!r}: start at the first page")
        return status

    def token(participant: str | None) -> str:
        return form_token(db.secret, "start" if participant is None else f"participant:{participant}")

    def forbidden(why: str, participant: str | None) -> Response:
        page = render_template("error.html", code=403, name="Forbidden", description=why + "; nothing was recorded",
                               next=url_for("participant_page", participant=participant) if participant else None)
        return Response(page, 403, mimetype="text/html")

    @app.before_request
    def guard():
        g.csp_nonce = secrets.token_urlsafe(16)
        if request.headers.get("Host", "").lower() not in app.config["STUDY_HOSTS"]:
            abort(421, "this server does not answer to that address; open the address it printed "
                       "(or start it with --public-url)")
        if request.method != "POST" or request.endpoint is None:
            return None
        participant = (request.view_args or {}).get("participant")
        if participant is not None:
            known(participant)  # an unknown participant stays a 404
        origin = request.headers.get("Origin")
        if origin is not None and origin != "null" and origin.lower() not in app.config["STUDY_ORIGINS"]:
            return forbidden(f"this form was sent from another site ({origin})", participant)
        if not hmac.compare_digest(_field("token").encode(), token(participant).encode()):
            return forbidden("this form is out of date or was not sent from this study's page: reload the page "
                             "and answer again", participant)
        return None

    @app.context_processor
    def page_values() -> dict:
        return {"csp_nonce": g.get("csp_nonce", ""), "start_token": token(None)}

    @app.get("/")
    def welcome():
        return render_template("welcome.html", pairs=len(pairs.pairs), error=None)

    @app.post("/start")
    def start():
        participant = _field("participant").strip()
        try:
            new = db.register(participant)
        except Busy:
            raise
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
                                   total=status.total, position=0, hint=request.args.get("hint") == "1",
                                   token=token(participant))
        if status.finished:
            return render_template("done.html", participant=participant, total=status.total)
        # the images are fetched by position; the page needs no more than the next position
        return render_template("trial.html", practice=False, participant=participant, done=status.done,
                               total=status.total, position=status.done, hint=False, token=token(participant))

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

    @app.get("/p/<participant>/image/<position:position>/<any(left, right):side>")
    def trial_image(participant: str, position: int, side: str):
        status = known(participant)
        trial = db.trial(participant, position) if position < status.total else None
        if trial is None:
            abort(404, "no such trial")
        folder, name = files[trial.pair, trial.side_image(side)]
        data = read_image(folder, name)
        if data is None:
            log.warning("image %s of pair %d is no longer a regular file in %s: not served", name, trial.pair, folder)
            abort(404, "no such trial")
        # bytes, not send_file: it would name the file (..._best.png) and derive an ETag from it
        return Response(data, mimetype=MEDIA_TYPES[name.rsplit(".", 1)[1]],
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/practice/<any(original, blurred):which>")
    def practice_image(which: str):
        return Response(practice[which], mimetype="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.errorhandler(Busy)
    def busy(exc: Busy):
        log.warning("%s: answered 503, the client is asked to send again", exc)
        resend = None
        if request.method == "POST" and request.endpoint:
            fields = [(k, request.form[k]) for k in RESENT_FIELDS if len(request.form.getlist(k)) == 1]
            resend = {"action": url_for(request.endpoint, **(request.view_args or {})), "fields": fields}
        page = render_template("error.html", code=503, name="Busy",
                               description=f"the study's database is busy; nothing was recorded yet. "
                                           f"{'Send your answer again' if resend else 'Reload the page'} in a moment.",
                               resend=resend, retry=None if resend else request.path)
        return Response(page, 503, headers={"Retry-After": str(BUSY_RETRY_S)}, mimetype="text/html")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return render_template("error.html", code=exc.code, name=exc.name, description=exc.description), exc.code

    @app.after_request
    def headers(response: Response) -> Response:
        nonce = g.get("csp_nonce", "")
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; img-src 'self'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
            f"form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cross-Origin-Resource-Policy"] = "same-origin"
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

    check_listen(port, threads)
    try:
        server = create_server(app, host=host, port=port, threads=threads, ident="liqe-dist-study")
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (another server there? "
                      f"choose another --port, or 0 for any free one)") from None
    public_url = app.config.get("STUDY_PUBLIC_URL")
    allow_hosts(app, host, server.effective_port, public_url)
    shown = f"[{host}]" if ":" in host else host
    print(f"study at http://{shown}:{server.effective_port}/  (Ctrl+C stops; answers are saved as they come)",
          flush=True)
    if public_url:
        print(f"participants open {public_url}", flush=True)
    elif host in WILDCARD_HOSTS:
        print("other machines are refused until the server is started with --public-url http://ADDRESS:PORT/ "
              "(the address they open)", flush=True)
    try:
        server.run()
    finally:
        server.close()
