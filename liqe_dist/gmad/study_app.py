"""The gMAD study as a web app (Flask, served by waitress): people judge the pairs of a pairs.csv.

Pages, in the order a participant meets them:
- ``/``: enter a participant id (the same id later resumes where it stopped);
- ``/p/<id>``: the instructions with four practice pairs (``study_db.practice_plan``; not
  recorded; a wrong answer shows a hint and the pair again), then one trial at a time until every
  trial is answered, then a thank-you;
- ``POST /p/<id>/practice``: ``step`` (the practice pair shown), the answer, ``token``;
- ``POST /p/<id>/answer``: ``position`` (the trial shown), the answer: ``answer`` (left, right,
  same) with ``--scale buttons``, ``value`` (the slider, an integer in [−100, 100], negative:
  left is better) with ``--scale slider``; optional ``response_ms`` and the display fields
  (``left_w``, ``left_h``, ``right_w``, ``right_h``: CSS px in (0, 100000]; ``window_w``,
  ``window_h``: integers in [1, 100000]; ``dpr`` in (0, 16]; ``display_scale`` in (0, 1]; each
  absent or empty: NULL); ``token``. The answer is committed before the next trial is sent.

Display, as the toolbox's ``image_compare_gui.m``: on a grey page (its figure colour [0.8 0.8
0.8], #cccccc) both images side by side (centred together, 2rem apart; the toolbox centres them at
¼ and ¾ of the screen) at their native pixel size, one image pixel on one device pixel (CSS
size = natural size / ``devicePixelRatio``), never upscaled. When the pair does not fit the
window (both widths and the gap; the height left by the controls), both are shrunk by the same
factor, the smaller of the two fits, and the factor is sent with the answer with the sizes shown.
EXIF orientation: the model reads the stored pixels without applying it (``data/images.py``
decodes with Pillow and never transposes; ``gmad search`` copies the shards' bytes). CSS
``image-orientation: none`` alone is not enough: Chromium still reports ``naturalWidth`` and
``naturalHeight`` rotated (seen with the tests' chromium), and the native size is taken from
them. So both are done: the page sets ``image-orientation: none`` on the images, and an image
whose EXIF orientation is not 1 is served as the model read it (``as_model_reads``: the pixels
``decode_image`` gives, as a lossless PNG without EXIF); every other image is served byte for
byte as stored.

Images are served only as ``/p/<id>/image/<position>/<left|right>`` (a trial's side) and
``/p/<id>/practice/<step>/<left|right>``: numbers and fixed words that index the pairs read at
start (the practice images are made in memory from the first pair's best image), so no text of a
request reaches the file system. Anything malformed is a 4xx with a short page (400 bad form
values, 404 unknown participant/trial/route, 409 an answer for a trial or practice pair that is
not the next one, or before the practice, 413 oversized form).

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
import re
import secrets
import stat
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, Response, abort, g, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter

from liqe_dist.gmad.pairs import MEDIA_TYPES, SIDES, PairsFile
from liqe_dist.gmad.study_db import (ANSWERS, BUSY_TIMEOUT_S, DISPLAY_FIELDS, PARTICIPANT_ID, PRACTICE,
                                     SAME_TOLERANCE, Busy, Conflict, Display, Status, StudyDB, StudySettings)

log = logging.getLogger(__name__)

MAX_RESPONSE_MS = 24 * 3600 * 1000
MAX_THREADS = 256
BUSY_RETRY_S = 2
RESENT_FIELDS = ("participant", "position", "step", "answer", "value", "response_ms", *DISPLAY_FIELDS,
                 "token")  # what a busy page sends again
MAX_CSS_PX = 100_000.0
NUMBER = re.compile(r"\d{1,9}(\.\d{1,12})?")  # a plain decimal: no sign, exponent, inf or nan
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


class PositionConverter(IntegerConverter):
    """A trial position: at most 9 digits, so a huge number never reaches int() or SQLite."""

    regex = r"\d{1,9}"


def practice_images(source: Path, size: int = 512) -> dict[str, tuple[bytes, str]]:
    """The practice images (name -> (bytes, media type)): ``original``, ``source`` fitted into
    ``size`` px (never enlarged) as PNG; two strongly degraded copies, ``blurred`` (blurred and
    blocky) and ``noisy`` (heavy noise), for the obvious pairs; ``identical`` (the same bytes) and
    ``near`` (a JPEG of quality 95: imperceptibly different) for the "same" pairs."""
    import numpy as np
    from PIL import Image, ImageFilter

    with Image.open(source) as img:
        img = img.convert("RGB")
        img.thumbnail((size, size))

    def encode(im, fmt: str, **kw) -> tuple[bytes, str]:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue(), f"image/{fmt.lower()}"

    pixels = np.asarray(img, dtype=np.float32)
    noise = np.random.default_rng(0).normal(0.0, 60.0, pixels.shape)
    noisy = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    blurred = img.filter(ImageFilter.GaussianBlur(radius=max(2.0, min(img.size) / 60)))
    original = encode(img, "PNG")
    return {"original": original, "identical": original, "near": encode(img, "JPEG", quality=95),
            "blurred": encode(blurred, "JPEG", quality=15), "noisy": encode(noisy, "JPEG", quality=30)}


EXIF_MARKERS = (b"Exif", b"eXIf", b"EXIF")  # JPEG APP1, PNG chunk, WebP chunk: no marker, no orientation
ORIENTATION_TAG = 0x0112


def as_model_reads(data: bytes, media_type: str) -> tuple[bytes, str]:
    """``data`` unchanged, unless it carries an EXIF orientation other than 1, which a browser
    would apply and the model does not: then the pixels the model reads (``decode_image``, not
    transposed) as a lossless PNG without EXIF. An image Pillow cannot read is left as it is."""
    if not any(marker in data for marker in EXIF_MARKERS):
        return data, media_type
    from PIL import Image

    from liqe_dist.data.images import ImageDecodeError, decode_image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.getexif().get(ORIENTATION_TAG, 1) == 1:
                return data, media_type
        pixels = decode_image(data)
    except (ImageDecodeError, OSError, SyntaxError, ValueError):
        return data, media_type
    buf = io.BytesIO()
    pixels.save(buf, "PNG")
    return buf.getvalue(), "image/png"


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
            step = db.practice(participant)[status.practice_step]
            return render_template("trial.html", practice=step, steps=len(PRACTICE), participant=participant,
                                   done=status.done, total=status.total, position=status.practice_step,
                                   hint=request.args.get("hint") == "1", token=token(participant),
                                   scale=settings.scale, tolerance=SAME_TOLERANCE)
        if status.finished:
            return render_template("done.html", participant=participant, total=status.total)
        # the images are fetched by position; the page needs no more than the next position
        return render_template("trial.html", practice=None, participant=participant, done=status.done,
                               total=status.total, position=status.done, hint=False, token=token(participant),
                               scale=settings.scale)

    def given_answer() -> tuple[str | None, int | None]:
        """(button answer, slider value): the one field of this study's scale (400 otherwise)."""
        other = "value" if settings.scale == "buttons" else "answer"
        if _field(other) != "":
            abort(400, f"this study answers with the {settings.scale}; {other} is not a field of it")
        if settings.scale == "buttons":
            return _answer_field(), None
        return None, _int_field("value", -100, 100, required=True)

    @app.post("/p/<participant>/practice")
    def practice_answer(participant: str):
        status = known(participant)
        step = _int_field("step", 0, len(PRACTICE) - 1, required=True)
        answer, slider = given_answer()
        if step != status.practice_step:  # another tab, the back button, or the practice is over
            return render_template("error.html", code=409, name="Conflict",
                                   description=f"practice pair {step + 1} is not the one shown now",
                                   next=url_for("participant_page", participant=participant)), 409
        if not db.practice(participant)[step].correct(answer, slider):  # a hint, and the same pair again
            return redirect(url_for("participant_page", participant=participant, hint=1), 303)
        db.pass_practice(participant, step)
        return redirect(url_for("participant_page", participant=participant), 303)

    @app.post("/p/<participant>/answer")
    def answer(participant: str):
        status = known(participant)
        answer, slider = given_answer()
        position = _int_field("position", 0, 10_000_000, required=True)
        response_ms = _int_field("response_ms", 0, MAX_RESPONSE_MS, required=False)
        display = _display_fields()
        if not status.practice_done:
            return render_template("error.html", code=409, name="Conflict", description="the practice pairs come first",
                                   next=url_for("participant_page", participant=participant)), 409
        try:
            db.answer(participant, position, answer, response_ms, slider=slider, display=display)
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
        data, media_type = as_model_reads(data, MEDIA_TYPES[name.rsplit(".", 1)[1]])
        return Response(data, mimetype=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/p/<participant>/practice/<position:step>/<any(left, right):side>")
    def practice_image(participant: str, step: int, side: str):
        known(participant)
        if step >= len(PRACTICE):
            abort(404, "no such practice pair")
        data, mimetype = practice[db.practice(participant)[step].side_image(side)]
        return Response(data, mimetype=mimetype, headers={"Cache-Control": "private, max-age=3600"})

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
    digits = raw[1:] if low < 0 and raw.startswith("-") else raw
    if not digits.isascii() or not digits.isdigit() or len(digits) > 12 or not low <= int(raw) <= high:
        abort(400, f"{name} must be an integer in [{low}, {high}]")
    return int(raw)


def _number_field(name: str, high: float) -> float | None:
    """An optional plain decimal in (0, ``high``] (None when absent or empty)."""
    raw = _field(name)
    if raw == "":
        return None
    if not raw.isascii() or not NUMBER.fullmatch(raw) or not 0 < float(raw) <= high:
        abort(400, f"{name} must be a number in (0, {high:g}]")
    return float(raw)


def _display_fields() -> Display:
    """How the page showed the trial (each field optional: NULL)."""
    sizes = {k: _number_field(k, MAX_CSS_PX) for k in ("left_w", "left_h", "right_w", "right_h")}
    window = {k: _int_field(k, 1, int(MAX_CSS_PX), required=False) for k in ("window_w", "window_h")}
    return Display(**sizes, **window, dpr=_number_field("dpr", 16.0),
                   display_scale=_number_field("display_scale", 1.0))


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
