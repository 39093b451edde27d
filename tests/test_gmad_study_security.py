"""Security and fuzz findings on `gmad study`, each kept fixed: images that tell their role, forged
cross-site answers and foreign Hosts, huge positions, a locked database, misleading database
errors, unchecked --port/--threads, symlinks swapped into images/, and pairs files that broke
the CSV reading. The app is the real one (Flask's test client, or a real waitress server)."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from liqe_dist.gmad.pairs import read_pairs
from liqe_dist.gmad.search import GMADError
from liqe_dist.gmad.study_app import check_listen, create_app, parse_public_url
from liqe_dist.gmad.study_db import StudyDB, StudyError, StudySettings, practice_plan, read_study
from test_gmad_study import SECRET, Server, pairs_dir  # noqa: F401 - pairs_dir is a fixture

BUTTONS = StudySettings(scale="buttons", schedule="random")  # what these tests were written for

BASE = "http://127.0.0.1:8080"  # the address create_app answers to by default
TOKEN = re.compile(r'name="token" value="([0-9a-f]+)"')


class Browser:
    """Flask's test client sending what a browser on the study's page sends (Host, Origin, token)."""

    def __init__(self, app) -> None:
        self.app = app
        self.client = app.test_client()

    def get(self, path: str, **kw):
        return self.client.get(path, base_url=kw.pop("base_url", BASE), **kw)

    def post(self, path: str, data: dict, **kw):
        return self.client.post(path, data=data, base_url=kw.pop("base_url", BASE), **kw)

    def token(self, page: str) -> str:
        found = TOKEN.search(self.get(page).get_data(as_text=True))
        return found.group(1) if found else ""

    def start(self, participant: str, practice: bool = True) -> str:
        """Register ``participant`` (and pass the four practice pairs); returns their form token."""
        assert self.post("/start", {"participant": participant, "token": self.token("/")}).status_code == 303
        token = self.token(f"/p/{participant}")
        if practice:
            settings = self.app.extensions["study_db"].settings
            for step in practice_plan(participant, settings):
                answer = ({"answer": step.better or "same"} if settings.scale == "buttons" else
                          {"value": {"left": "-50", "right": "50", None: "0"}[step.better]})
                assert self.post(f"/p/{participant}/practice", {"step": str(step.step), **answer,
                                                                 "token": token}).status_code == 303
        return token


def make_app(pairs_csv: Path, db: Path, settings: StudySettings = BUTTONS, **kw):
    return create_app(read_pairs(pairs_csv), db, settings, **kw)


@pytest.fixture
def browser(pairs_dir, tmp_path) -> Browser:  # noqa: F811 - the imported fixture
    return Browser(make_app(pairs_dir / "pairs.csv", tmp_path / "s.sqlite"))


def answers(db: Path, participant: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT position, answer FROM answers WHERE participant = ? ORDER BY position",
                           (participant,)).fetchall()
    finally:
        con.close()


# --- 1. the images of a trial carry no hint of which is the attacker's best ---------------------

def test_trial_images_tell_nothing_of_their_role(browser, pairs_dir):  # noqa: F811
    browser.start("ann")
    pairs = read_pairs(pairs_dir / "pairs.csv").by_id()
    db = browser.app.extensions["study_db"]
    for position in range(3):
        page = browser.get("/p/ann").get_data(as_text=True)
        trial = db.trial("ann", position)
        names = {p.name.lower() for p in pairs[trial.pair].images.values()}
        names |= {n.rsplit(".", 1)[0] for n in names}
        srcs = re.findall(r'<img id="(?:left|right)" src="([^"]+)"', page)
        assert len(srcs) == 2
        served = []
        for src in srcs:
            response = browser.get(src)
            assert response.status_code == 200
            told = " ".join([src, *(f"{k}: {v}" for k, v in response.headers.items())]).lower()
            for hint in ("best", "worst", *names):
                assert hint not in told, (hint, told)
            for header in ("Content-Disposition", "ETag", "Last-Modified"):
                assert header not in response.headers, header
            served.append(response.get_data())
        shown = [pairs[trial.pair].images[trial.side_image(side)].read_bytes() for side in ("left", "right")]
        assert served == shown
        assert browser.post("/p/ann/answer", {"answer": "same", "position": str(position),
                                              "token": browser.token("/p/ann")}).status_code == 303


# --- 2. cross-site forms, DNS rebinding, framing ------------------------------------------------

def test_forged_posts_foreign_hosts_and_framing_are_refused(browser, pairs_dir, tmp_path):  # noqa: F811
    db = tmp_path / "s.sqlite"
    start_token = browser.token("/")
    evil = {"Origin": "http://evil.example"}
    assert browser.post("/start", {"participant": "bob", "token": start_token}, headers=evil).status_code == 403
    assert browser.post("/start", {"participant": "bob"}).status_code == 403                   # no token
    assert browser.post("/start", {"participant": "bob", "token": "0" * 64}).status_code == 403
    assert browser.app.extensions["study_db"].status("bob") is None                            # nothing made
    bob = browser.start("bob")
    eve = browser.start("eve")
    form = {"answer": "left", "position": "0", "token": bob}
    response = browser.post("/p/bob/answer", form, headers=evil)
    assert response.status_code == 403 and "another site" in response.get_data(as_text=True)
    assert browser.post("/p/bob/answer", form | {"token": eve}).status_code == 403             # another's token
    assert browser.post("/p/bob/answer", form | {"token": ""}).status_code == 403
    assert browser.post("/p/bob/practice", {"answer": "left"}).status_code == 403
    assert answers(db, "bob") == []
    # what the page's own form sends: its origin, or "null" under Referrer-Policy no-referrer
    assert browser.post("/p/bob/answer", form, headers={"Origin": BASE}).status_code == 303
    assert browser.post("/p/bob/answer", form | {"position": "1"}, headers={"Origin": "null"}).status_code == 303
    assert answers(db, "bob") == [(0, "left"), (1, "left")]
    # DNS rebinding: the attacker's name resolves to us, the browser sends it as Host
    for host in ("http://evil.example:8080", "http://evil.example", "http://127.0.0.1:9999", "http://localhost"):
        for path in ("/", "/p/bob", "/p/bob/image/2/left", "/p/bob/practice/0/left"):
            response = browser.get(path, base_url=host)
            assert response.status_code == 421, (host, path)
            assert SECRET not in response.get_data(as_text=True)
    for host in ("http://localhost:8080", "http://[::1]:8080", BASE):
        assert browser.get("/", base_url=host).status_code == 200, host
    # every response: no framing, nothing from other origins, the pages' style and script by nonce
    for path in ("/", "/p/bob", "/p/bob/image/2/left", "/nowhere"):
        response = browser.get(path)
        h = response.headers
        assert h["X-Frame-Options"] == "DENY" and h["X-Content-Type-Options"] == "nosniff"
        assert h["Referrer-Policy"] == "no-referrer"
        csp = dict(d.strip().split(" ", 1) for d in h["Content-Security-Policy"].split(";"))
        assert csp["default-src"] == "'none'" and csp["frame-ancestors"] == "'none'"
        assert csp["form-action"] == "'self'" and csp["img-src"] == "'self'"
        if response.mimetype == "text/html":
            nonce = re.fullmatch(r"'nonce-([\w-]+)'", csp["script-src"]).group(1)
            page = response.get_data(as_text=True)
            tags = re.findall(r"<(?:script|style)\b[^>]*>", page)
            assert tags and all(f'nonce="{nonce}"' in t for t in tags), tags
            assert re.search(r"\son[a-z]+=", page) is None    # no inline handlers: CSP would block them
    # the secret is the database's: tokens survive a restart, and a --public-url host is let in
    again = Browser(make_app(pairs_dir / "pairs.csv", db, public_url="https://study.example.org/"))
    assert again.token("/p/bob") == bob
    public = "https://study.example.org"
    assert again.get("/p/bob", base_url=public).status_code == 200
    assert again.post("/p/bob/answer", form | {"position": "2"}, base_url=public,
                      headers={"Origin": public}).status_code == 303
    assert again.post("/p/bob/answer", form | {"position": "3"}, base_url=public,
                      headers={"Origin": "http://study.example.org"}).status_code == 403   # not its scheme


@pytest.mark.slow
def test_waitress_refuses_foreign_hosts_and_forged_posts(pairs_dir, tmp_path):  # noqa: F811
    server = Server(pairs_dir / "pairs.csv", tmp_path / "w.sqlite")  # the default: the slider
    try:
        assert server.post("/start", participant="kim") == 303
        assert server.request("GET", "/", headers={"Host": f"127.0.0.1:{server.port}"})[0] == 200
        assert server.request("GET", "/", headers={"Host": "rebound.example"})[0] == 421
        assert server.request("GET", "/p/kim", headers={"Host": f"rebound.example:{server.port}"})[0] == 421
        form = f"step=0&value=-40&token={server.token('/p/kim')}"
        assert server.request("POST", "/p/kim/practice", form, {"Origin": "http://evil.example"})[0] == 403
        assert server.request("POST", "/p/kim/practice", "step=0&value=-40")[0] == 403
        assert server.request("POST", "/p/kim/practice", form,
                              {"Origin": f"http://127.0.0.1:{server.port}"})[0] == 303
    finally:
        server.stop()


# --- 3. positions beyond the schedule -----------------------------------------------------------

def test_positions_beyond_the_schedule_are_404(browser):
    browser.start("cat")
    total = browser.app.extensions["study_db"].status("cat").total
    assert browser.get(f"/p/cat/image/{total - 1}/left").status_code == 200
    for position in (str(total), "999999999", str(2 ** 63), str(2 ** 64 + 1), "9" * 5000):
        response = browser.get(f"/p/cat/image/{position}/right")
        assert response.status_code == 404, position[:30]
    assert browser.post("/p/cat/answer", {"answer": "left", "position": str(2 ** 63),
                                          "token": browser.token("/p/cat")}).status_code == 400


# --- 4. a locked database: 503 busy, and the form can be sent again ----------------------------

def test_a_locked_database_is_503_busy_and_the_answer_can_be_sent_again(pairs_dir, tmp_path):  # noqa: F811
    db = tmp_path / "s.sqlite"
    browser = Browser(make_app(pairs_dir / "pairs.csv", db, busy_timeout=0.3))
    token = browser.start("dan")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another program holds the write lock
    try:
        started = time.monotonic()
        response = browser.post("/p/dan/answer", {"answer": "right", "position": "0", "response_ms": "812",
                                                  "token": token})
        assert time.monotonic() - started < 5
        assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0
        page = response.get_data(as_text=True)
        assert "busy" in page and "nothing was recorded" in page
        resend = re.search(r'<form id="resend" method="post" action="([^"]+)">(.*?)</form>', page, re.S)
        fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', resend.group(2)))
        assert resend.group(1) == "/p/dan/answer"
        assert fields == {"answer": "right", "position": "0", "response_ms": "812", "token": token}
        assert browser.post("/start", {"participant": "eli", "token": browser.token("/")}).status_code == 503
        assert browser.get("/p/dan").status_code == 200   # readers are not blocked (WAL)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert browser.post(resend.group(1), fields).status_code == 303
    assert answers(db, "dan") == [(0, "right")]


# --- 5. database errors say which of three things is wrong ------------------------------------

def test_database_errors_tell_locked_from_unopenable_from_foreign(pairs_dir, tmp_path):  # noqa: F811
    pairs = read_pairs(pairs_dir / "pairs.csv")
    missing = tmp_path / "no" / "such" / "s.sqlite"
    with pytest.raises(StudyError, match=rf"{re.escape(str(missing))}: cannot open the study database: its folder "
                                         rf".* does not exist"):
        StudyDB(missing, pairs, StudySettings())
    folder = tmp_path / "a_folder"
    folder.mkdir()
    with pytest.raises(StudyError, match=rf"{re.escape(str(folder))}: cannot open the study database: it is a folder"):
        StudyDB(folder, pairs, StudySettings())
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StudyError, match=rf"{re.escape(str(junk))}: not a study database"):
        StudyDB(junk, pairs, StudySettings())
    db = tmp_path / "s.sqlite"
    StudyDB(db, pairs, StudySettings())
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        locked = rf"{re.escape(str(db))}: the database is locked by another program"
        with pytest.raises(StudyError, match=locked) as err:
            StudyDB(db, pairs, StudySettings(), busy_timeout=0.2)
        assert "not a study database" not in str(err.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    if os.geteuid() != 0:  # root may write anywhere
        locked_dir = tmp_path / "read_only"
        locked_dir.mkdir()
        locked_dir.chmod(0o500)
        try:
            with pytest.raises(StudyError, match="cannot open the study database: no permission"):
                StudyDB(locked_dir / "s.sqlite", pairs, StudySettings())
        finally:
            locked_dir.chmod(0o700)


# --- 6. --port and --threads are checked ------------------------------------------------------

def test_port_threads_and_public_url_are_checked_with_one_line_errors(pairs_dir, tmp_path):  # noqa: F811
    db = tmp_path / "s.sqlite"
    for flags, named in ((["--threads", "0"], "--threads"), (["--port", "70000"], "--port"),
                         (["--public-url", "http://lab:8080/study/"], "--public-url")):
        proc = subprocess.run([sys.executable, "-m", "liqe_dist.cli", "gmad", "study", str(pairs_dir / "pairs.csv"),
                               "--db", str(db), *flags], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (flags, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and named in proc.stderr, (flags, proc.stderr)
        assert not db.exists()                    # refused before anything is made
    for port, threads, named in ((65536, 8, "--port"), (-1, 8, "--port"), (8080, 100_000, "--threads"),
                                 (8080, -3, "--threads")):
        with pytest.raises(ValueError, match=named):
            check_listen(port, threads)
    check_listen(0, 1)
    check_listen(65535, 256)
    for url in ("ftp://lab/", "http://lab:99999/", "http://user@lab/", "http:///", "lab:8080", "http://lab/?q=1"):
        with pytest.raises(ValueError, match="--public-url"):
            parse_public_url(url)
    assert parse_public_url("https://Lab.example/") == ("https", "lab.example", 443)
    assert parse_public_url("http://[fe80::1]:8080") == ("http", "fe80::1", 8080)


# --- 7. a symlink, FIFO or folder swapped into images/ after start -----------------------------

def test_files_swapped_into_images_after_start_are_not_served(pairs_dir, tmp_path):  # noqa: F811
    study = tmp_path / "study"
    study.mkdir()
    shutil.copy(pairs_dir / "pairs.csv", study / "pairs.csv")
    shutil.copytree(pairs_dir / "images", study / "images")
    (tmp_path / "secret.txt").write_text(SECRET)
    browser = Browser(make_app(study / "pairs.csv", tmp_path / "s.sqlite"))
    browser.start("fay")
    db = browser.app.extensions["study_db"]
    by_id = read_pairs(study / "pairs.csv").by_id()

    def shown(position: int, side: str) -> Path:
        trial = db.trial("fay", position)
        return by_id[trial.pair].images[trial.side_image(side)]

    assert browser.get("/p/fay/image/0/left").status_code == 200
    shown(0, "left").unlink()
    shown(0, "left").symlink_to(tmp_path / "secret.txt")
    response = browser.get("/p/fay/image/0/left")
    assert response.status_code == 404 and SECRET not in response.get_data(as_text=True)
    shown(0, "right").unlink()
    os.mkfifo(shown(0, "right"))  # opening a FIFO to read would wait for a writer forever
    assert browser.get("/p/fay/image/0/right").status_code == 404
    assert browser.get("/p/fay/image/1/left").status_code == 200
    # the whole folder swapped for a symlink to a look-alike holding other files
    (study / "images").rename(study / "images_old")
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    for f in (study / "images_old").iterdir():
        if f.is_file() and not f.is_symlink():
            (decoy / f.name).write_text(SECRET)
    (study / "images").symlink_to(decoy)
    response = browser.get("/p/fay/image/1/left")
    assert response.status_code == 404 and SECRET not in response.get_data(as_text=True)


# --- 8 and 9. pairs files: a BOM, huge fields, any character in a field -----------------------

def _rows(pairs_csv: Path) -> tuple[list[str], list[dict]]:
    with open(pairs_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def _write(path: Path, fields: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    path.write_bytes(buf.getvalue().encode("utf-8"))


def test_pairs_file_with_a_bom_or_a_huge_field_reads_or_fails_clearly(pairs_dir, tmp_path):  # noqa: F811
    (tmp_path / "images").symlink_to(pairs_dir / "images")
    original = read_pairs(pairs_dir / "pairs.csv")
    bom = tmp_path / "pairs.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + (pairs_dir / "pairs.csv").read_bytes())  # as spreadsheet programs save it
    assert [(p.pair, p.keys, p.sources) for p in read_pairs(bom).pairs] == \
        [(p.pair, p.keys, p.sources) for p in original.pairs]
    fields, rows = _rows(pairs_dir / "pairs.csv")
    rows[1]["best_source"] = "x" * 200_000  # over the csv module's 128 KiB field limit
    huge = tmp_path / "huge.csv"
    _write(huge, fields, rows)
    with pytest.raises(GMADError, match=rf"{re.escape(str(huge))}, line 3: a field is longer than \d+ characters"):
        read_pairs(huge)
    proc = subprocess.run([sys.executable, "-m", "liqe_dist.cli", "gmad", "study", str(huge),
                           "--db", str(tmp_path / "s.sqlite"), "--port", "0"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "line 3: a field is longer" in proc.stderr
    short = tmp_path / "short.csv"  # a row cut short: named, not a KeyError or None values
    text = io.StringIO()
    csv.writer(text).writerows([fields, [rows[0][k] for k in fields], [rows[2][k] for k in fields][:-1]])
    short.write_text(text.getvalue())
    with pytest.raises(GMADError, match=rf"line 3: {len(fields) - 1} fields, the header has {len(fields)}"):
        read_pairs(short)


def test_any_character_in_a_pairs_field_round_trips(pairs_dir, tmp_path):  # noqa: F811
    (tmp_path / "images").symlink_to(pairs_dir / "images")
    fields, rows = _rows(pairs_dir / "pairs.csv")
    odd = "a\x0bb\x0cc\x1cd\x1de\x1ef\x85g\u2028h\u2029i\nj\r\nk\rl,m\"n"
    for i, row in enumerate(rows):
        row["best_source"] = f"photos/{i}{odd}.png"
        row["worst_key"] = f"{odd}{i}"
    path = tmp_path / "pairs.csv"
    _write(path, fields, rows)
    read = read_pairs(path).pairs
    assert len(read) == len(rows)
    assert [p.sources["best"] for p in read] == [r["best_source"] for r in rows]
    assert [p.keys["worst"] for p in read] == [r["worst_key"] for r in rows]
    assert [p.pair for p in read] == [int(r["pair"]) for r in rows]


# --- 10. the slider's value and the display fields go through the same checks ----------------

def test_slider_and_display_fields_are_checked_and_need_the_token(pairs_dir, tmp_path):  # noqa: F811
    db = tmp_path / "s.sqlite"
    browser = Browser(make_app(pairs_dir / "pairs.csv", db, StudySettings()))  # the slider
    token = browser.start("ivy")
    good = {"value": "-40", "position": "0", "left_w": "300", "left_h": "200.5", "right_w": "300",
            "right_h": "200.5", "window_w": "1400", "window_h": "800", "dpr": "1.25", "display_scale": "0.533333"}
    assert browser.post("/p/ivy/answer", good).status_code == 403                      # no token
    assert browser.post("/p/ivy/answer", good | {"token": token}, headers={"Origin": "http://evil.example"}
                        ).status_code == 403
    bad = [{"value": "101"}, {"value": "-101"}, {"value": "1.5"}, {"value": "+5"}, {"value": "-"}, {"value": ""},
           {"value": "9" * 5000}, {"value": "１"}, {"value": ["1", "2"]}, {"answer": "left"},
           {"left_w": "0"}, {"left_w": "-3"}, {"left_w": "nan"}, {"left_w": "inf"}, {"left_w": "1e3"},
           {"right_h": "100001"}, {"window_w": "0"}, {"window_h": "2.5"}, {"dpr": "0"}, {"dpr": "16.5"},
           {"display_scale": "0"}, {"display_scale": "1.000001"}, {"display_scale": "٠.5"}]
    for change in bad:
        body = good | {"token": token} | change
        response = browser.client.post("/p/ivy/answer", data=body, base_url=BASE)
        assert response.status_code == 400, (str(change)[:40], response.status_code)
    assert answers(db, "ivy") == []
    assert browser.post("/p/ivy/answer", {"value": "7", "position": "0", "token": token}).status_code == 303
    assert browser.post("/p/ivy/answer", good | {"position": "1", "token": token}).status_code == 303
    first, second = read_study(db).judgments
    assert first["left_w"] is None and first["dpr"] is None                              # not sent: NULL
    assert (second["left_h"], second["window_w"], second["dpr"], second["display_scale"]) == (200.5, 1400, 1.25,
                                                                                            0.533333)
